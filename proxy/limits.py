"""Limits aiohttp does not enforce by itself: concurrent connections and the C HTTP parser."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Sequence

from aiohttp import http_parser, web

from proxy.config import Network
from proxy.errors import API_VERSION, API_VERSION_HEADER
from proxy.proxy_protocol import ProxyProtocolListener


def c_parser_in_use() -> bool:
    """True when aiohttp parses requests with its C (llhttp) parser, not the pure-Python one."""
    return bool(http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser")


_OVERLOADED_BODY = json.dumps(
    {"errors": [{"code": "UNAVAILABLE", "message": "too many connections", "detail": None}]}
).encode()
_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    + f"{API_VERSION_HEADER}: {API_VERSION}\r\n".encode()
    + b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    + f"Content-Length: {len(_OVERLOADED_BODY)}\r\n\r\n".encode()
    + _OVERLOADED_BODY
)


class _Overloaded(asyncio.Protocol):
    """Answers 503 at once and closes: a prompt refusal instead of a hang."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_OVERLOADED)
        transport.close()


class ConnectionLimit:
    """Protocol factory that hands out aiohttp handlers while fewer than `limit` are open."""

    def __init__(self, server: web.Server, limit: int, on_refused: Callable[[], None]) -> None:
        self._server = server
        self._limit = limit
        self._on_refused = on_refused

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._server.connections) >= self._limit:
            self._on_refused()
            return _Overloaded()
        return self._server()


class LimitedTCPSite(web.TCPSite):
    """A TCPSite whose listener refuses connections beyond `max_connections` with a 503.

    With `proxy_protocol_from` (the trusted balancers), every connection must start with a
    PROXY header from one of them; the limit then applies once the header is read.
    With `sock` (a worker's inherited listening socket) it serves that instead of binding.
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int,
                 on_refused: Callable[[], None], proxy_protocol_from: Sequence[Network] = (),
                 on_proxy_rejected: Callable[[str], None] = lambda reason: None,
                 sock: socket.socket | None = None, **kwargs: object) -> None:  # fmt: skip
        super().__init__(runner, host, port, **kwargs)  # type: ignore[arg-type]
        self._max_connections = max_connections
        self._on_refused = on_refused
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
        factory = ConnectionLimit(server, self._max_connections, self._on_refused)
        ssl_context = self._ssl_context
        if self._proxy_protocol_from:
            # The PROXY header comes before TLS: the socket stays plain until it is read.
            self._proxy_listener = ProxyProtocolListener(
                factory, self._proxy_protocol_from, ssl_context, self._on_proxy_rejected
            )
            factory, ssl_context = self._proxy_listener, None
        if self._sock is not None:
            self._server = await asyncio.get_running_loop().create_server(
                factory, sock=self._sock, ssl=ssl_context, backlog=self._backlog
            )
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
