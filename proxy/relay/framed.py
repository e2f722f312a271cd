"""An upstream answer of any framing, read through h11: what the blob fast path does not copy raw.

A 307 to object storage, an error, a chunked or close-delimited body, a 1xx before the answer:
relayed from the one request already sent, never asked for again.
"""

from __future__ import annotations

import asyncio
import socket

import h11
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Counter
from yarl import URL

from proxy.exchange import Exchange
from proxy.relay.failure import UpstreamFailures, client_stopped
from proxy.relay.headers import relayed_headers

# A registry's response head is ~400 bytes; aiohttp's own client parser stops near 8 KiB a
# line and 100 fields, so a larger head is as unreadable here as on the normal relay.
MAX_HEAD = 16384

# What reading an answer raises when the upstream fails or breaks the protocol.
_READ_ERRORS = (OSError, TimeoutError, h11.RemoteProtocolError)


def response_parser(received: bytes) -> h11.Connection:
    """An h11 parser of the answer to one GET, fed the bytes received so far."""
    parser = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    # h11 frames a response by the request it answers: a GET, with keep-alive.
    parser.send(h11.Request(method="GET", target="/", headers=[("Host", "upstream")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(received)
    return parser


def decoded_headers(event: h11.Response | h11.InformationalResponse) -> CIMultiDict[str]:
    """The head's fields as aiohttp's client parser decodes them (UTF-8, surrogateescape)."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in event.headers.raw_items():
        headers.add(
            name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
        )
    return headers


class FramedRelay:
    """Relays the rest of an answer whose first bytes were read, as h11 frames it."""

    def __init__(
        self,
        upstream: URL,
        failures: UpstreamFailures,
        errors: Counter,
        *,
        read_timeout: float,
        body_timeout: float,
    ) -> None:
        self._origin = upstream.origin()
        self._failures = failures
        self._errors = errors
        self._read_timeout = read_timeout
        self._body_timeout = body_timeout

    async def __call__(
        self,
        request: web.Request,
        exchange: Exchange,
        sock: socket.socket,
        received: bytes,
        buffer: memoryview,
    ) -> tuple[web.StreamResponse, bool]:
        """Relay the answer; True if it was read whole and the connection may be reused."""
        parser = response_parser(received)
        try:
            head = await self._final_head(sock, parser, buffer)
        except _READ_ERRORS as exc:
            return self._failures.before_headers(request, exc), False
        exchange.upstream_status = head.status_code
        if head.status_code >= 500:
            self._errors.labels("5xx").inc()
        response = web.StreamResponse(
            status=head.status_code,
            reason=head.reason.decode("utf-8", "surrogateescape"),
            headers=relayed_headers(
                decoded_headers(head), self._origin, f"{exchange.scheme}://{request.host}"
            ),
        )
        await response.prepare(request)
        while True:
            try:
                event = await self._next_event(sock, parser, buffer)
            except _READ_ERRORS as exc:
                self._failures.mid_body(request, exc)
                return response, False
            if isinstance(event, h11.EndOfMessage):
                break
            if not isinstance(event, h11.Data):
                self._failures.mid_body(request, ConnectionResetError("no end of the body"))
                return response, False
            try:
                async with asyncio.timeout(self._body_timeout):
                    await response.write(event.data)
            except (ConnectionError, TimeoutError) as exc:
                client_stopped(request, exc, self._body_timeout)
                return response, False
        await response.write_eof()
        # h11 says MUST_CLOSE for HTTP/1.0, `Connection: close` or a body ended by the close;
        # bytes after the end were never asked for.
        reusable = parser.their_state is h11.DONE and not parser.trailing_data[0]
        return response, reusable

    async def _final_head(
        self, sock: socket.socket, parser: h11.Connection, buffer: memoryview
    ) -> h11.Response:
        """The final head past any 1xx, which the client does not get (nor on the normal relay)."""
        while True:
            event = await self._next_event(sock, parser, buffer)
            if isinstance(event, h11.Response):
                # h11 reads such a body as chunked; the Content-Length would reach the client
                # with it. aiohttp's parser refuses the head too (RFC 9112 §6.3).
                if {b"content-length", b"transfer-encoding"} <= {name for name, _ in event.headers}:
                    raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding")
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise ConnectionResetError("closed before the response head")

    async def _next_event(
        self, sock: socket.socket, parser: h11.Connection, buffer: memoryview
    ) -> object:
        loop = asyncio.get_running_loop()
        while (event := parser.next_event()) is h11.NEED_DATA:
            async with asyncio.timeout(self._read_timeout):
                n = await loop.sock_recv_into(sock, buffer)
            # An empty read tells h11 the stream ended: the end of a close-delimited body,
            # anywhere else a RemoteProtocolError.
            parser.receive_data(bytes(buffer[:n]))
        return event
