"""The public listener, with limits aiohttp does not enforce by itself: concurrent connections
and the C HTTP parser."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import http_parser, web

from proxy.config import Network
from proxy.edge.client_slots import ClientSlots
from proxy.edge.connection import ProxyRequestHandler
from proxy.edge.open_connections import OpenConnections
from proxy.edge.proxy_protocol import ProxyProtocolListener
from proxy.errors import unavailable_bytes


def c_parser_in_use() -> bool:
    """True when aiohttp parses requests with its C (llhttp) parser, not the pure-Python one."""
    # The C parser's private module: aiohttp says which parser it picked in no public way.
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
        handler_args: Mapping[str, Any],
        limit: int,
        on_refused: Callable[[], None],
        clients: ClientSlots | None = None,
        on_client_refused: Callable[[], None] = lambda: None,
        connections: OpenConnections | None = None,
    ) -> None:
        self._server = server
        self._handler_args = dict(handler_args)
        self._limit = limit
        self._on_refused = on_refused
        self._clients = clients
        self._on_client_refused = on_client_refused
        self._connections = connections

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._server.connections) >= self._limit:
            self._on_refused()
            return _Overloaded()
        return ProxyRequestHandler(
            self._server,
            loop=asyncio.get_running_loop(),
            clients=self._clients,
            on_client_refused=self._on_client_refused,
            connections=self._connections,
            **self._handler_args,
        )


class Listener:
    """A started listener: `close()` stops accepting; connections already made stay open."""

    def __init__(
        self, server: asyncio.Server, proxy_listener: ProxyProtocolListener | None
    ) -> None:
        self._server = server
        self._proxy_listener = proxy_listener

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets)

    def close(self) -> None:
        if self._proxy_listener is not None:
            self._proxy_listener.close()
        self._server.close()


async def listen(server: web.Server, handler_args: Mapping[str, Any], host: str, port: int, *,
                 max_connections: int, on_refused: Callable[[], None],
                 clients: ClientSlots | None = None,
                 on_client_refused: Callable[[], None] = lambda: None,
                 connections: OpenConnections | None = None,
                 proxy_protocol_from: Sequence[Network] = (),
                 on_proxy_rejected: Callable[[str], None] = lambda reason: None,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 128,
                 sock: socket.socket | None = None) -> Listener:  # fmt: skip
    """Serve `server` (a runner's) on `host`:`port`, refusing connections beyond
    `max_connections` with a 503, and beyond `clients`' limit per client address; handlers get
    `handler_args` (aiohttp's RequestHandler keywords) and report to `connections`.

    With `proxy_protocol_from` (the trusted balancers), every connection must start with a
    PROXY header from one of them; the limits then apply once the header is read, to the client
    it names. With `sock` (a worker's inherited listening socket) it serves that instead of
    binding, and takes one queued connection per wakeup, leaving the rest to its siblings.
    """
    factory: Callable[[], asyncio.BaseProtocol]
    factory = ConnectionLimit(
        server, handler_args, max_connections, on_refused, clients, on_client_refused, connections
    )
    proxy_listener = None
    if proxy_protocol_from:
        # The PROXY header comes before TLS: the socket stays plain until it is read.
        proxy_listener = ProxyProtocolListener(
            factory, proxy_protocol_from, ssl_context, on_proxy_rejected
        )
        factory, ssl_context = proxy_listener, None
    loop = asyncio.get_running_loop()
    if sock is not None:
        # asyncio accepts up to `backlog` connections per wakeup, so the worker that woke
        # first would take every queued one while its siblings, woken too, find none: one
        # at a time, as nginx does by default (`multi_accept off`), spreads them.
        listening = await loop.create_server(factory, sock=sock, ssl=ssl_context, backlog=1)
        # create_server called listen(1) on the shared socket: give its queue back its
        # length (for the one loop pass in between, connections beyond 2 queued are dropped
        # and retried by the client's TCP).
        sock.listen(backlog)
    else:
        listening = await loop.create_server(factory, host, port, ssl=ssl_context, backlog=backlog)
    return Listener(listening, proxy_listener)
