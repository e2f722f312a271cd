"""The public listener, with limits aiohttp does not enforce by itself: concurrent connections
(counted at accept, before TLS), the TLS handshake's deadline, and the C HTTP parser."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import http_parser, web

from proxy.config import Network
from proxy.edge.admission import Admission, Refused
from proxy.edge.client_slots import ClientSlots
from proxy.edge.connection import ProxyRequestHandler
from proxy.edge.open_connections import OpenConnections
from proxy.edge.proxy_protocol import ProxyProtocolListener
from proxy.edge.tls import start_tls
from proxy.errors import unavailable_bytes


def c_parser_in_use() -> bool:
    """True when aiohttp parses requests with its C (llhttp) parser, not the pure-Python one."""
    # The C parser's private module: aiohttp says which parser it picked in no public way.
    return bool(http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser")


_OVERLOADED = unavailable_bytes("too many connections")
_CLIENT_OVERLOADED = unavailable_bytes("too many connections from your address")
_TURN_AWAY_LINGER = 1.0
# A handshake's own deadline when none is given (the setting's default is in proxy/config.py).
HANDSHAKE_TIMEOUT = 10.0

Wrap = Callable[[asyncio.Transport], asyncio.Transport]


def _unwrapped(transport: asyncio.Transport) -> asyncio.Transport:
    return transport


class _Overloaded(asyncio.Protocol):
    """Answers 503 at once and closes: a prompt refusal instead of a hang."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_OVERLOADED)
        transport.close()


class _TurnedAway(asyncio.Protocol):
    """The prompt 503, then our FIN; what the client already sent is read and dropped until it
    closes or `_TURN_AWAY_LINGER` passes, so the 503 is not lost to a reset."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_CLIENT_OVERLOADED)
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(_TURN_AWAY_LINGER, transport.close)
        else:
            transport.close()


class _Accepted(asyncio.Protocol):
    """The listener's protocol for one new connection: hands it to the entrance at once."""

    def __init__(self, entrance: Entrance) -> None:
        self._entrance = entrance

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._entrance.enter(transport)


class _HandOver(asyncio.Protocol):
    """Gives its transport (over TLS, the one made by the handshake) to `protocol`, wrapped by
    `wrap` to name the client a PROXY header named."""

    def __init__(self, protocol: asyncio.BaseProtocol, wrap: Wrap) -> None:
        self._protocol = protocol
        self._wrap = wrap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # From now on the transport talks to the protocol directly.
        transport.set_protocol(self._protocol)
        self._protocol.connection_made(self._wrap(transport))


class Entrance:
    """Protocol factory for the listener: each connection is counted against `admission` the
    moment it is accepted, refused beyond its caps before any TLS work, then given TLS (with
    `ssl_context`) and a request handler.

    Refused plain-HTTP connections get a 503; refused TLS connections are closed without a
    byte (a client could not read a 503 that is not TLS, and a handshake is the work to spare).
    """

    def __init__(
        self,
        server: web.Server,
        handler_args: Mapping[str, Any],
        admission: Admission,
        connections: OpenConnections | None = None,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._server = server
        self._handler_args = dict(handler_args)
        self._admission = admission
        self._connections = connections
        self._ssl_context = ssl_context
        self._handshake_timeout = handshake_timeout

    def __call__(self) -> asyncio.BaseProtocol:
        return _Accepted(self)

    def enter(self, transport: asyncio.Transport, wrap: Wrap = _unwrapped) -> None:
        """Admit, refuse or serve the connection on `transport` (plain: no TLS yet); `wrap`
        makes the transport the handler sees (naming the client a PROXY header named)."""
        ticket = self._admission.admit(wrap(transport))
        if isinstance(ticket, Refused):
            self._refuse(transport, ticket)
            return

        def protocol() -> asyncio.BaseProtocol:
            handler = ProxyRequestHandler(
                self._server,
                loop=asyncio.get_running_loop(),
                ticket=ticket,
                connections=self._connections,
                **self._handler_args,
            )
            return handler if wrap is _unwrapped else _HandOver(handler, wrap)

        if self._ssl_context is None:
            plain = protocol()
            transport.set_protocol(plain)
            plain.connection_made(transport)
            return
        start_tls(transport, protocol, self._ssl_context, self._handshake_timeout, ticket.release)

    def _refuse(self, transport: asyncio.Transport, why: Refused) -> None:
        if self._ssl_context is not None:
            transport.close()
            return
        refusal = _Overloaded() if why is Refused.FULL else _TurnedAway()
        transport.set_protocol(refusal)
        refusal.connection_made(transport)


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
                 ssl_context: ssl.SSLContext | None = None,
                 tls_handshake_timeout: float = HANDSHAKE_TIMEOUT, backlog: int = 128,
                 sock: socket.socket | None = None) -> Listener:  # fmt: skip
    """Serve `server` (a runner's) on `host`:`port`, refusing connections beyond
    `max_connections`, and beyond `clients`' limit per client address, from the moment they
    are accepted; handlers get `handler_args` (aiohttp's RequestHandler keywords) and report to
    `connections`. With `ssl_context`, each admitted connection has `tls_handshake_timeout`
    seconds for its handshake.

    With `proxy_protocol_from` (the trusted balancers), every connection must start with a
    PROXY header from one of them; the limits then apply once the header is read, to the client
    it names. With `sock` (a worker's inherited listening socket) it serves that instead of
    binding, and takes one queued connection per wakeup, leaving the rest to its siblings.
    """
    admission = Admission(max_connections, on_refused, clients, on_client_refused)
    entrance = Entrance(
        server, handler_args, admission, connections, ssl_context, tls_handshake_timeout
    )
    factory: Callable[[], asyncio.BaseProtocol] = entrance
    proxy_listener = None
    if proxy_protocol_from:
        # The PROXY header comes before TLS: the socket stays plain until it is read.
        proxy_listener = ProxyProtocolListener(
            entrance.enter, proxy_protocol_from, on_proxy_rejected
        )
        factory = proxy_listener
    loop = asyncio.get_running_loop()
    # TLS is started by the entrance once a connection is admitted, never by asyncio at accept.
    if sock is not None:
        # asyncio accepts up to `backlog` connections per wakeup, so the worker that woke
        # first would take every queued one while its siblings, woken too, find none: one
        # at a time, as nginx does by default (`multi_accept off`), spreads them.
        listening = await loop.create_server(factory, sock=sock, backlog=1)
        # create_server called listen(1) on the shared socket: give its queue back its
        # length (for the one loop pass in between, connections beyond 2 queued are dropped
        # and retried by the client's TCP).
        sock.listen(backlog)
    else:
        listening = await loop.create_server(factory, host, port, backlog=backlog)
    return Listener(listening, proxy_listener)
