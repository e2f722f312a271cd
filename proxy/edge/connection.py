"""One client connection: aiohttp's request handler with the limits and answers it lacks.

aiohttp bounds each header line but not a whole request head, reads a refused upload for
`lingering_time` whatever its size, answers malformed requests in plain text quoting the bad
line (credentials included), and announces its version in `Server`. This handler caps the head
(431), discards at most `DISCARD_LIMIT` bytes of an unread body, answers in the registry's JSON,
drops the banner, and gives its connection's places back when it ends.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web, web_protocol
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict

from proxy import errors
from proxy.edge.admission import Ticket
from proxy.edge.open_connections import OpenConnections

# A whole request head (request line and header fields). Docker's heads are a few KiB; this
# leaves room for the longest line (8 KiB) and field (16 KiB) aiohttp accepts, and keeps 1,000
# unfinished heads under ~70 MB (the parser holds about twice what it buffered).
HEAD_LIMIT = 32 * 1024
# Unread request body discarded after the response (within aiohttp's `lingering_time`) before
# the connection is closed for reading.
DISCARD_LIMIT = 4 * 1024 * 1024

# What a connection that never parsed was: a client's TLS ClientHello (a handshake record, TLS
# 1.0 to 1.3 in its version field) on a plain-HTTP listener; the access log says so.
TLS_HELLO = web.RequestKey("tls_hello", bool)
_TLS_RECORD_START = b"\x16\x03"

_REQUEST_LINE_EXTRA = len("  HTTP/1.1\r\n")
_BLANK_LINE = b"\r\n\r\n"


class HeadTooLarge(Exception):
    """A request head longer than the cap."""


def head_size(message: RawRequestMessage) -> int:
    """The bytes of a parsed head as clients write it; never more than it took on the wire."""
    size = len(message.method) + len(message.path) + _REQUEST_LINE_EXTRA + 2
    return size + sum(len(name) + len(value) + 4 for name, value in message.raw_headers)


def _after_last_blank_line(data: bytes) -> int:
    """Bytes after the last blank line: all an unfinished head can have in `data`."""
    end = data.rfind(_BLANK_LINE)
    return len(data) if end < 0 else len(data) - end - len(_BLANK_LINE)


def drop_banner(headers: CIMultiDict[str]) -> None:
    """Remove aiohttp's `Server: Python/... aiohttp/...` (an upstream's own Server stays)."""
    if headers.get(hdrs.SERVER) == SERVER_SOFTWARE:
        del headers[hdrs.SERVER]


async def drop_server_banner(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: no version banner on application responses."""
    drop_banner(response.headers)


class _BannerlessResponse(web.Response):
    """A response to a request no application saw (its hooks do not run), without `Server`."""

    # The one step after the headers are final and before they are written; no hook runs here.
    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        drop_banner(self.headers)


class ProxyRequestHandler(web.RequestHandler):
    """aiohttp's HTTP/1 handler with a head cap, a bounded discard and JSON errors; `ticket`
    (its connection's places, taken at accept) is released when the connection ends.

    The private names of aiohttp it uses are listed in proxy/edge/internals.py.
    """

    __slots__ = (
        "_body",
        "_connections",
        "_discard_left",
        "_discard_limit",
        "_head_bytes",
        "_head_limit",
        "_input_closed",
        "_started_with",
        "_ticket",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        ticket: Ticket | None = None,
        connections: OpenConnections | None = None,
        head_limit: int = HEAD_LIMIT,
        discard_limit: int = DISCARD_LIMIT,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._connections = connections
        self._ticket = ticket
        self._head_limit = head_limit
        # Bytes of the head being received; the body being received, if any.
        self._head_bytes = 0
        self._body: StreamReader | None = None
        # Set once nothing more the client sends will be parsed (refused head, parse error).
        self._input_closed = False
        self._discard_limit = discard_limit
        self._discard_left: int | None = None
        # The connection's first bytes, to tell a TLS handshake from a malformed request.
        self._started_with = b""

    # --- the connection's places ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._connections is not None:
            self._connections.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._connections is not None:
            self._connections.closed(self)
        if self._ticket is not None:
            self._ticket.release()
        # The body refers back to this handler: a cycle would keep its buffers until a full GC.
        self._body = None
        super().connection_lost(exc)

    # --- the head cap and the bounded discard ----------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._input_closed:
            return
        if len(self._started_with) < len(_TLS_RECORD_START):
            self._started_with += data[: len(_TLS_RECORD_START) - len(self._started_with)]
        if self._discard_left is not None:
            self._discard_left -= len(data)
            if self._discard_left < 0:
                self._stop_discarding()
                return
        # aiohttp's flag for a parser stopped at an Upgrade request (no public accessor).
        if self._upgraded:
            # aiohttp keeps what follows an Upgrade request to parse once it is answered.
            self._count_head(len(data))
            if not self._input_closed:
                super().data_received(data)
            return
        body = self._body
        in_body = body is not None and not body.is_eof()
        body_before = body.total_bytes if body is not None and in_body else 0
        # aiohttp's count of heads parsed on this connection: how many `data` completed.
        count_before = self._request_count
        super().data_received(data)
        new = self._request_count - count_before
        if new == 0 and not in_body:
            self._count_head(len(data))
            return
        if new == 0 and body is not None and not body.is_eof():
            return
        self._after_boundary(data, in_body, body, body_before, new)

    def _after_boundary(
        self, data: bytes, in_body: bool, body: StreamReader | None, body_before: int, new: int
    ) -> None:
        """A body ended or heads completed within `data`: check the heads, find the rest."""
        # Bytes of `data` not yet attributed; both estimates of the unfinished head that may
        # follow are upper bounds (exact for the usual framings), so take the smaller.
        unattributed = (0 if in_body else self._head_bytes) + len(data)
        if body is not None and in_body:
            unattributed -= body.total_bytes - body_before
        # aiohttp's queue of parsed heads (or parse errors) not yet handled: the heads to check.
        fresh = list(itertools.islice(reversed(self._messages), new))[::-1]
        for index, (message, payload) in enumerate(fresh):
            if isinstance(message, web_protocol._ErrInfo):
                # aiohttp answers 400 and closes; nothing after it is read.
                self._input_closed = True
                return
            size = head_size(message)
            if size > self._head_limit:
                self._refuse_head(drop=len(fresh) - index)
                return
            unattributed -= size + payload.total_bytes
        if fresh:
            body = fresh[-1][1]
        if body is not None and not body.is_eof():
            self._body = body
            self._head_bytes = 0
            return
        self._body = None
        self._discard_left = None
        self._head_bytes = 0
        self._count_head(max(0, min(unattributed, _after_last_blank_line(data))))

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._head_limit:
            self._refuse_head(drop=0)

    def _refuse_head(self, drop: int) -> None:
        """Answer 431 in place of the oversized head (and anything parsed after it), then close."""
        for _ in range(drop):
            self._messages.pop()
        # Queued as aiohttp queues its own parse errors, so its loop answers it through
        # `handle_error` in turn, after the requests before it.
        error = web_protocol._ErrInfo(
            status=431, exc=HeadTooLarge(), message="request head too large"
        )
        self._messages.append((error, EMPTY_PAYLOAD))
        self._input_closed = True
        # The future aiohttp's loop awaits while the queue is empty: wake it for the 431.
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # aiohttp's one call per request, from its head until the response is written: where a
    # request is known to start and end.
    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        if self._connections is not None:
            self._connections.request_started(self)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            if self._connections is not None:
                self._connections.request_finished(self)
            if not request.content.is_eof():
                # What aiohttp reads and drops of this body from now on is bounded.
                self._discard_left = self._discard_limit

    def _stop_discarding(self) -> None:
        """Enough of an unread body: read no more, end our side; aiohttp closes at its
        lingering deadline (the client has had the response and our FIN by then)."""
        self._discard_left = None
        self._input_closed = True
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            # Held like a full buffer, not with transport.pause_reading(): aiohttp's flow control
            # resumes the transport when the body's buffer drains unless this hold is set.
            self._pause_reading_for_buffer()
            transport.write_eof()
        else:
            self.force_close()

    # --- errors aiohttp answers itself -----------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Our JSON error instead of aiohttp's text, which quotes the offending request line."""
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send an error instead")
        if status == 400 and self._started_with == _TLS_RECORD_START:
            request[TLS_HELLO] = True
        source = errors.protocol_error(status)
        response = _BannerlessResponse(status=status, body=source.body, headers=source.headers)
        response.force_close()
        return response
