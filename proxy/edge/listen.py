"""Limits aiohttp does not enforce by itself: concurrent connections and the C HTTP parser."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence

from aiohttp import http_parser, web

from proxy.config import Network
from proxy.edge.client_slots import ClientSlots
from proxy.edge.connection import ProxyRequestHandler
from proxy.edge.proxy_protocol import ProxyProtocolListener
from proxy.errors import unavailable_bytes


def c_parser_in_use() -> bool:
    """True when aiohttp parses requests with its C (llhttp) parser, not the pure-Python one."""
    return bool(http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser")


_OVERLOADED = unavailable_bytes("too many connections")


class _Overloaded(asyncio.Protocol):
    """Answers 503 at once and closes: a prompt refusal instead of a hang."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_OVERLOADED)
        transport.close()


class ConnectionLimit:
    """Protocol factory that hands out request handlers while fewer than `limit` are open;
    each handler then admits its client against `clients` once it knows the address."""

    def __init__(
        self,
        server: web.Server,
        limit: int,
        on_refused: Callable[[], None],
        clients: ClientSlots | None = None,
        on_client_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self._server = server
        self._limit = limit
        self._on_refused = on_refused
        self._clients = clients
        self._on_client_refused = on_client_refused

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._server.connections) >= self._limit:
            self._on_refused()
            return _Overloaded()
        return ProxyRequestHandler(
            self._server,
            loop=asyncio.get_running_loop(),
            clients=self._clients,
            on_client_refused=self._on_client_refused,
            # The handler arguments the runner and application gave (`handler_args`).
            **self._server._kwargs,
        )


class LimitedTCPSite(web.TCPSite):
    """A TCPSite whose listener refuses connections beyond `max_connections` with a 503, and
    beyond `clients`' limit per client address.

    With `proxy_protocol_from` (the trusted balancers), every connection must start with a
    PROXY header from one of them; the limits then apply once the header is read, to the client
    it names. With `sock` (a worker's inherited listening socket) it serves that instead of
    binding, and takes one queued connection per wakeup, leaving the rest to its siblings.
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int,
                 on_refused: Callable[[], None], clients: ClientSlots | None = None,
                 on_client_refused: Callable[[], None] = lambda: None,
                 proxy_protocol_from: Sequence[Network] = (),
                 on_proxy_rejected: Callable[[str], None] = lambda reason: None,
                 sock: socket.socket | None = None, **kwargs: object) -> None:  # fmt: skip
        super().__init__(runner, host, port, **kwargs)  # type: ignore[arg-type]
        self._max_connections = max_connections
        self._on_refused = on_refused
        self._clients = clients
        self._on_client_refused = on_client_refused
        self._proxy_protocol_from = tuple(proxy_protocol_from)
        self._on_proxy_rejected = on_proxy_rejected
        self._proxy_listener: ProxyProtocolListener | None = None
        self._sock = sock

    async def start(self) -> None:
        # BaseSite.start registers the site; the listener is created here, as TCPSite does,
        # but with the limiting factory in front of the runner's server.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        factory: Callable[[], asyncio.BaseProtocol]
        factory = ConnectionLimit(
            server, self._max_connections, self._on_refused, self._clients, self._on_client_refused
        )
        ssl_context = self._ssl_context
        if self._proxy_protocol_from:
            # The PROXY header comes before TLS: the socket stays plain until it is read.
            self._proxy_listener = ProxyProtocolListener(
                factory, self._proxy_protocol_from, ssl_context, self._on_proxy_rejected
            )
            factory, ssl_context = self._proxy_listener, None
        if self._sock is not None:
            # asyncio accepts up to `backlog` connections per wakeup, so the worker that woke
            # first would take every queued one while its siblings, woken too, find none: one
            # at a time, as nginx does by default (`multi_accept off`), spreads them.
            self._server = await asyncio.get_running_loop().create_server(
                factory, sock=self._sock, ssl=ssl_context, backlog=1
            )
            # create_server called listen(1) on the shared socket: give its queue back its
            # length (for the one loop pass in between, connections beyond 2 queued are dropped
            # and retried by the client's TCP).
            self._sock.listen(self._backlog)
            return
        self._server = await asyncio.get_running_loop().create_server(
            factory,
            self._host,
            self._port,
            ssl=ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )

    async def stop(self) -> None:
        if self._proxy_listener is not None:
            self._proxy_listener.close()
        await super().stop()
