"""The fast path for blob GETs: own upstream socket, the body copied past every parser."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from dataclasses import dataclass

import h11
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.relay.connections import UpstreamConnections
from proxy.relay.failure import UpstreamFailures, client_stopped
from proxy.relay.forward import record_time_to_headers, request_target
from proxy.relay.framed import MAX_HEAD, FramedRelay, response_parser
from proxy.relay.headers import relayed_headers, upstream_request_headers
from proxy.relay.slots import UpstreamSlots

log = logging.getLogger("registry_proxy.forward")

# One per transfer. Measured against 256 KiB and 1 MiB (bench/README.md): 256 KiB costs 30-50 %
# more CPU per GiB; 1 MiB no less CPU than 512 KiB but 8 MB more peak RSS at 8 downloads.
BUFFER_SIZE = 512 * 1024
# h11's end of a head: it accepts a bare LF, so the split must be the same as its.
_END_OF_HEAD = re.compile(rb"\n\r?\n")
# What aiohttp's client adds to every request unless the client sent it (Accept: */*).
_DEFAULT_ACCEPT = "*/*"


@dataclass
class _Plain:
    """A 200 or 206 with one Content-Length: the body is copied raw."""

    status: int
    reason: str
    headers: CIMultiDict[str]
    length: int
    start: bytes
    keep_alive: bool


class _Unanswered(ConnectionResetError):
    """The connection failed before a single byte of the answer: the request was not served."""


class BlobRelay:
    """GET /v2/<name>/blobs/<digest> against an http:// upstream, the body copied as it comes.

    `slots` are those its requests hold (the normal relay's); their total bounds its idle pool.
    """

    def __init__(
        self,
        upstream: URL,
        metrics: Metrics,
        *,
        slots: UpstreamSlots | None = None,
        connect_timeout: float,
        read_timeout: float,
        body_timeout: float,
    ) -> None:
        self._origin = upstream.origin()
        self._connections = UpstreamConnections(
            upstream.host or "",
            upstream.port or 80,
            # Without slots nothing bounds the requests in progress: keep one idle at most.
            limit=slots.total if slots is not None else 1,
            connect_timeout=connect_timeout,
        )
        self._failures = UpstreamFailures(upstream, metrics.upstream_errors)
        self._framed = FramedRelay(
            upstream,
            self._failures,
            metrics.upstream_errors,
            read_timeout=read_timeout,
            body_timeout=body_timeout,
        )
        self._time_to_headers = metrics.upstream_time_to_headers
        self._read_timeout = read_timeout
        self._body_timeout = body_timeout

    def close(self) -> None:
        """Close the idle upstream connections."""
        self._connections.close()

    async def __call__(
        self, request: web.Request, exchange: Exchange, query: str | None
    ) -> web.StreamResponse:
        """Relay the upstream's answer to the blob GET, asked exactly once."""
        buffer = bytearray(BUFFER_SIZE)
        view = memoryview(buffer)
        asked = await self._ask(request, self._request_head(request, exchange, query), view)
        if isinstance(asked, web.Response):
            return asked
        sock, raw, start, sent = asked
        record_time_to_headers(self._time_to_headers, exchange, sent)
        reusable = False
        try:
            plain = _plain_head(raw, start)
            if plain is None:
                response, reusable = await self._framed(request, exchange, sock, raw + start, view)
                return response
            exchange.upstream_status = plain.status
            response, reusable = await self._relay_body(request, exchange, sock, buffer, plain)
            return response
        finally:
            if reusable:
                self._connections.give_back(sock)
            else:
                sock.close()

    async def _ask(
        self, request: web.Request, wanted: bytes, view: memoryview, *, reuse: bool = True
    ) -> tuple[socket.socket, bytes, bytes, float] | web.Response:
        """Send the request, read the answer's first head; a failure before it is the answer."""
        loop = asyncio.get_running_loop()
        try:
            sock, reused = await self._connections.take(reuse=reuse)
        except (OSError, TimeoutError) as exc:
            return self._failures.before_headers(request, exc, connecting=True)
        try:
            sent = time.monotonic()
            try:
                await loop.sock_sendall(sock, wanted)
            except ConnectionError as exc:
                raise _Unanswered(str(exc)) from exc
            raw, start = await self._read_head(loop, sock, view)
        except _Unanswered as exc:
            sock.close()
            if not reused:
                return self._failures.before_headers(request, exc)
            # Not a byte of an answer on a connection that was idle: the registry closed it
            # as the request went out, so it was never served. Asked again once, on a new one.
            log.debug("upstream closed an idle connection: asking on a new one")
            return await self._ask(request, wanted, view, reuse=False)
        except (OSError, TimeoutError) as exc:  # a partial head, or none in time
            sock.close()
            return self._failures.before_headers(request, exc)
        except BaseException:
            sock.close()
            raise
        return sock, raw, start, sent

    def _request_head(self, request: web.Request, exchange: Exchange, query: str | None) -> bytes:
        headers = upstream_request_headers(
            request, exchange.client, exchange.scheme, exchange.request_id
        )
        headers.setdefault("Accept", _DEFAULT_ACCEPT)
        lines = [f"GET {request_target(request.raw_path, query)} HTTP/1.1"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    async def _read_head(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview
    ) -> tuple[bytes, bytes]:
        """The first response head, and what came after it; _Unanswered if nothing came."""
        filled = 0
        end = None
        async with asyncio.timeout(self._read_timeout):
            while end is None and filled < MAX_HEAD:
                try:
                    n = await loop.sock_recv_into(sock, view[filled:MAX_HEAD])
                except ConnectionError as exc:
                    if filled:
                        raise
                    raise _Unanswered(str(exc)) from exc
                if n == 0:
                    if filled:
                        raise ConnectionResetError("closed before the end of the response head")
                    raise _Unanswered("closed before the response head")
                filled += n
                found = _END_OF_HEAD.search(view[:filled])
                end = found.end() if found else None
        # No end within MAX_HEAD: h11 refuses the head as too large.
        end = end or filled
        return bytes(view[:end]), bytes(view[end:filled])

    async def _relay_body(
        self,
        request: web.Request,
        exchange: Exchange,
        sock: socket.socket,
        buffer: bytearray,
        plain: _Plain,
    ) -> tuple[web.StreamResponse, bool]:
        client_origin = f"{exchange.scheme}://{request.host}"
        response = web.StreamResponse(
            status=plain.status,
            reason=plain.reason,
            headers=relayed_headers(plain.headers, self._origin, client_origin),
        )
        await response.prepare(request)
        transport = request.transport
        if transport is None:
            return response, False
        limits = transport.get_write_buffer_limits()
        # Paused while anything is pending, resumed once all is sent: drain() then means "the
        # transport holds no reference to the buffer" (3.12+ keep memoryviews, not copies).
        transport.set_write_buffer_limits(high=1, low=0)
        try:
            read = await self._copy(request, sock, memoryview(buffer), plain, response)
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=limits[1], low=limits[0])
        return response, read and plain.keep_alive

    async def _copy(
        self,
        request: web.Request,
        sock: socket.socket,
        view: memoryview,
        plain: _Plain,
        response: web.StreamResponse,
    ) -> bool:
        """Copy the body; True if all of it was read from the upstream and sent on."""
        loop = asyncio.get_running_loop()
        writer, transport = request.writer, request.transport
        assert transport is not None
        remaining = plain.length
        chunk: bytes | memoryview = plain.start[:remaining]
        while True:
            if chunk:
                remaining -= len(chunk)
                try:
                    async with asyncio.timeout(self._body_timeout):
                        await response.write(chunk)
                        await writer.drain()
                except (ConnectionError, TimeoutError) as exc:
                    client_stopped(request, exc, self._body_timeout)
                    return False
                if transport.get_write_buffer_size():
                    # Still referenced (a transport that ignores the limits): never overwrite.
                    view = memoryview(bytearray(len(view)))
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(self._read_timeout):
                    n = await loop.sock_recv_into(sock, view[: min(remaining, len(view))])
                if n == 0:
                    raise ConnectionResetError("upstream closed the connection")
            except (OSError, TimeoutError) as exc:
                self._failures.mid_body(request, exc)
                return False
            chunk = view[:n]
        await response.write_eof()
        return True


def _plain_head(raw: bytes, start: bytes) -> _Plain | None:
    """The head of a plain body of one known size (200/206); None for anything else."""
    parser = response_parser(raw)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Response) or event.status_code not in (200, 206):
        return None
    headers: CIMultiDict[str] = CIMultiDict()
    lengths = []
    for name, value in event.headers.raw_items():
        try:
            text_name, text_value = name.decode("ascii"), value.decode("ascii")
        except UnicodeDecodeError:
            return None
        lowered = text_name.lower()
        if lowered == "transfer-encoding":
            return None
        if lowered == "content-length":
            lengths.append(text_value)
        headers.add(text_name, text_value)
    if len(lengths) != 1 or not lengths[0].isdigit():
        return None
    try:
        reason = event.reason.decode("ascii")
    except UnicodeDecodeError:
        return None
    length = int(lengths[0])
    closes = "close" in _connection_tokens(headers)
    # Bytes beyond the announced body were never asked for: the connection is not reusable.
    keep_alive = event.http_version == b"1.1" and not closes and len(start) <= length
    return _Plain(event.status_code, reason, headers, length, start, keep_alive)


def _connection_tokens(headers: CIMultiDict[str]) -> set[str]:
    return {
        t.strip().lower() for value in headers.getall("Connection", ()) for t in value.split(",")
    }
