"""TLS on the public listener: the server context (`tls.cert`, `tls.key`), and the TLS layer
started on a connection already admitted, once it sends its first byte, with a deadline for
its handshake and a bounded read buffer."""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable

from proxy.config import ConfigError, TLSConfig

# asyncio gives every TLS connection a read buffer of `SSLProtocol.max_size` (256 KiB),
# allocated and zeroed (so resident) when the connection is made: 256 KiB per idle connection,
# over 1 GiB at max_connections. A TLS record carries at most 16 KiB, so 32 KiB still takes two
# per read; measured with bench/tls_memory.py: about 59 KiB per idle TLS connection in all.
TLS_READ_BUFFER = 32 * 1024
# While reads fill the buffer (a client streaming an upload), asyncio's own size: reading
# 32 KiB at a time, 256 MiB chunked uploads over TLS were slower in each of 4 alternating
# rounds (median 152 against 202 MiB/s); growing while reads fill it, no slower (157 vs 145).
STREAMING_READ_BUFFER = sslproto.SSLProtocol.max_size

# What nginx answers a plain HTTP request on its TLS port, so the person at the client knows.
_PLAIN_HTTP_MESSAGE = b"400 The plain HTTP request was sent to HTTPS port\n"
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
    % (len(_PLAIN_HTTP_MESSAGE), _PLAIN_HTTP_MESSAGE)
)


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """A TLS >= 1.2 server context, or ConfigError naming the file that would not load."""
    assert tls.cert is not None and tls.key is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"tls.cert/tls.key: cannot load {tls.cert}, {tls.key}: {reason}"
        ) from None
    return context


# asyncio's own TLS layer (private: asyncio offers a buffer size and a hook for the end of a
# connection that never finished its handshake in no public way; proxy/edge/internals.py
# lists the names used: max_size, _ssl_buffer, _ssl_buffer_view).
class ServerTLS(sslproto.SSLProtocol):
    """asyncio's server-side TLS layer with a `TLS_READ_BUFFER` read buffer (asyncio's larger
    one only while reads fill it), calling `on_lost` when its connection ends, also when the
    handshake never finished (the HTTP protocol above it then never hears of the connection)."""

    # The buffer asyncio allocates in __init__ (of max_size) and reads into.
    max_size = TLS_READ_BUFFER
    _ssl_buffer: bytearray
    _ssl_buffer_view: memoryview

    def __init__(
        self,
        protocol: asyncio.BaseProtocol,
        context: ssl.SSLContext,
        handshake_timeout: float,
        on_lost: Callable[[], None],
    ) -> None:
        # typeshed wants a waiter and a whole number of seconds; asyncio takes neither.
        super().__init__(
            asyncio.get_running_loop(),
            protocol,
            context,
            None,  # type: ignore[arg-type]
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,  # type: ignore[arg-type]
        )
        self._on_lost = on_lost

    def get_buffer(self, n: int) -> memoryview:
        # asyncio's get_buffer sizes the buffer to max_size (a class constant); this one
        # keeps whatever buffer_updated chose.
        return self._ssl_buffer_view

    def buffer_updated(self, nbytes: int) -> None:
        size = len(self._ssl_buffer)
        # asyncio has copied the bytes out of the buffer when this returns.
        super().buffer_updated(nbytes)
        if nbytes == size and size < STREAMING_READ_BUFFER:
            # A full read: more is waiting.
            self._read_into(STREAMING_READ_BUFFER)
        elif nbytes < TLS_READ_BUFFER < size:
            # The stream has ended or paused: back to the small buffer at once.
            self._read_into(TLS_READ_BUFFER)

    def _read_into(self, size: int) -> None:
        self._ssl_buffer = bytearray(size)
        self._ssl_buffer_view = memoryview(self._ssl_buffer)

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._on_lost()


class _AwaitingHello(asyncio.Protocol):
    """An admitted connection before its first byte: nothing of TLS is allocated yet, so a
    silent connection costs its socket alone; closed if nothing comes by the deadline."""

    def __init__(
        self,
        make_protocol: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        handshake_timeout: float,
        on_lost: Callable[[], None],
    ) -> None:
        self._make_protocol = make_protocol
        self._context = context
        self._on_lost = on_lost
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + handshake_timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._answered_plain_http = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_at(self._deadline, transport.close)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None and self._timer is not None
        if self._answered_plain_http:
            return
        # A handshake starts with 0x16; a request line with its method's letters.
        if data[:1].isalpha():
            self._answer_plain_http(transport)
            return
        self._timer.cancel()
        left = self._deadline - asyncio.get_running_loop().time()
        if left <= 0:
            transport.close()
            return
        layer = ServerTLS(self._make_protocol(), self._context, left, self._on_lost)
        transport.set_protocol(layer)
        layer.connection_made(transport)
        # What came already, through the layer's public BufferedProtocol side.
        rest = memoryview(data)
        while rest:
            buffer = layer.get_buffer(len(rest))
            size = min(len(buffer), len(rest))
            buffer[:size] = rest[:size]
            layer.buffer_updated(size)
            rest = rest[size:]

    def _answer_plain_http(self, transport: asyncio.Transport) -> None:
        """Say what went wrong, end our side, and drop what else comes until the client closes
        (closing with its request unread would reset the connection before it reads this);
        the handshake deadline still closes it at the latest."""
        self._answered_plain_http = True
        transport.write(PLAIN_HTTP_ANSWER)
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._on_lost()


def start_tls(
    transport: asyncio.Transport,
    make_protocol: Callable[[], asyncio.BaseProtocol],
    context: ssl.SSLContext,
    handshake_timeout: float,
    on_lost: Callable[[], None],
) -> None:
    """Serve TLS on the accepted `transport` as asyncio's own TLS server does, from its first
    byte on, and hand the decrypted stream to a protocol from `make_protocol` once the handshake
    is done; a handshake not done within `handshake_timeout` seconds of now closes the
    connection. `on_lost` is called once the connection ends, however it ends."""
    awaiting = _AwaitingHello(make_protocol, context, handshake_timeout, on_lost)
    transport.set_protocol(awaiting)
    awaiting.connection_made(transport)
