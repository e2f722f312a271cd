"""The fast path for blob GETs: own upstream socket, the body copied past every parser."""

from __future__ import annotations

import asyncio
import ipaddress
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
from proxy.relay.failure import UpstreamFailures, client_stopped
from proxy.relay.forward import record_time_to_headers, request_target
from proxy.relay.headers import relayed_headers, upstream_request_headers

# A registry's blob response head is ~400 bytes; aiohttp's own client parser stops near 8 KiB
# a line and 100 fields, so anything larger goes to the normal relay and its limits.
MAX_HEAD = 16384
# One per transfer. Measured against 256 KiB and 1 MiB (bench/README.md): 256 KiB costs 30-50 %
# more CPU per GiB; 1 MiB no less CPU than 512 KiB but 8 MB more peak RSS at 8 downloads.
BUFFER_SIZE = 512 * 1024
# h11's end of a head: it accepts a bare LF, so the split must be the same as its.
_END_OF_HEAD = re.compile(rb"\n\r?\n")
# What aiohttp's client adds to every request unless the client sent it (Accept: */*).
_DEFAULT_ACCEPT = "*/*"


@dataclass
class _Head:
    status: int
    reason: str
    headers: CIMultiDict[str]
    length: int
    start: bytes


class _Fallback(Exception):
    """The upstream answered something other than a plain sized body: use the normal relay."""


class BlobRelay:
    """GET /v2/<name>/blobs/<digest> against an http:// upstream, the body copied as it comes."""

    def __init__(
        self,
        upstream: URL,
        metrics: Metrics,
        *,
        connect_timeout: float,
        read_timeout: float,
        body_timeout: float,
    ) -> None:
        self._origin = upstream.origin()
        self._host = upstream.host or ""
        self._port = upstream.port or 80
        # An address needs no resolver (asyncio's getaddrinfo is a thread-pool round trip).
        self._literal = _literal_address(self._host, self._port)
        self._failures = UpstreamFailures(upstream, metrics.upstream_errors)
        self._time_to_headers = metrics.upstream_time_to_headers
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._body_timeout = body_timeout

    async def __call__(
        self, request: web.Request, exchange: Exchange, query: str | None
    ) -> web.StreamResponse | None:
        """Relay the blob; None when the answer is for the normal relay (nothing sent yet)."""
        loop = asyncio.get_running_loop()
        buffer = bytearray(BUFFER_SIZE)
        try:
            sock = await self._connect(loop)
        except (OSError, TimeoutError) as exc:
            return self._failures.before_headers(request, exc, connecting=True)
        try:
            sent = time.monotonic()
            await loop.sock_sendall(sock, self._request_head(request, exchange, query))
            head = await self._read_head(loop, sock, memoryview(buffer))
        except _Fallback:
            sock.close()
            return None
        except (OSError, TimeoutError) as exc:  # not sent, or no head in time
            sock.close()
            return self._failures.before_headers(request, exc)
        except BaseException:
            sock.close()
            raise
        exchange.upstream_status = head.status
        record_time_to_headers(self._time_to_headers, exchange, sent)
        try:
            return await self._relay_body(request, exchange, loop, sock, buffer, head)
        finally:
            sock.close()

    def _request_head(self, request: web.Request, exchange: Exchange, query: str | None) -> bytes:
        headers = upstream_request_headers(
            request, exchange.client, exchange.scheme, exchange.request_id
        )
        headers.setdefault("Accept", _DEFAULT_ACCEPT)
        lines = [f"GET {request_target(request.raw_path, query)} HTTP/1.1"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        async with asyncio.timeout(self._connect_timeout):
            infos = self._literal or await loop.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM
            )
            last: OSError | None = None
            for family, kind, proto, _, address in infos:
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, address)
                except OSError as exc:
                    sock.close()
                    last = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            raise last or OSError("no address")

    async def _read_head(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview
    ) -> _Head:
        filled = 0
        end = None
        async with asyncio.timeout(self._read_timeout):
            while end is None:
                if filled >= MAX_HEAD:
                    raise _Fallback
                n = await loop.sock_recv_into(sock, view[filled:MAX_HEAD])
                if n == 0:
                    raise ConnectionResetError("closed before the response head")
                filled += n
                found = _END_OF_HEAD.search(view[: min(filled, MAX_HEAD)])
                end = found.end() if found else None
        return _parse_head(bytes(view[:end]), bytes(view[end:filled]))

    async def _relay_body(
        self,
        request: web.Request,
        exchange: Exchange,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        buffer: bytearray,
        head: _Head,
    ) -> web.StreamResponse:
        client_origin = f"{exchange.scheme}://{request.host}"
        response = web.StreamResponse(
            status=head.status,
            reason=head.reason,
            headers=relayed_headers(head.headers, self._origin, client_origin),
        )
        await response.prepare(request)
        transport = request.transport
        if transport is None:
            return response
        limits = transport.get_write_buffer_limits()
        # Paused while anything is pending, resumed once all is sent: drain() then means "the
        # transport holds no reference to the buffer" (3.12+ keep memoryviews, not copies).
        transport.set_write_buffer_limits(high=1, low=0)
        try:
            return await self._copy(request, loop, sock, memoryview(buffer), head, response)
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=limits[1], low=limits[0])

    async def _copy(
        self,
        request: web.Request,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        view: memoryview,
        head: _Head,
        response: web.StreamResponse,
    ) -> web.StreamResponse:
        writer, transport = request.writer, request.transport
        assert transport is not None
        remaining = head.length
        chunk: bytes | memoryview = head.start[:remaining]
        while True:
            if chunk:
                remaining -= len(chunk)
                try:
                    async with asyncio.timeout(self._body_timeout):
                        await response.write(chunk)
                        await writer.drain()
                except (ConnectionError, TimeoutError) as exc:
                    client_stopped(request, exc, self._body_timeout)
                    return response
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
                return response
            chunk = view[:n]
        await response.write_eof()
        return response


def _literal_address(
    host: str, port: int
) -> list[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[str, int]]]:
    """getaddrinfo's answer for an IP address host, without asking it; empty for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return []
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]


def _parse_head(raw: bytes, start: bytes) -> _Head:
    """The response head, or _Fallback unless it announces a plain body of one known size."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "upstream")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(raw)
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError:
        raise _Fallback from None
    if not isinstance(event, h11.Response) or event.status_code not in (200, 206):
        raise _Fallback
    headers: CIMultiDict[str] = CIMultiDict()
    lengths = []
    for name, value in event.headers.raw_items():
        try:
            text_name, text_value = name.decode("ascii"), value.decode("ascii")
        except UnicodeDecodeError:
            raise _Fallback from None
        lowered = text_name.lower()
        if lowered == "transfer-encoding":
            raise _Fallback
        if lowered == "content-length":
            lengths.append(text_value)
        headers.add(text_name, text_value)
    if len(lengths) != 1 or not lengths[0].isdigit():
        raise _Fallback
    try:
        reason = event.reason.decode("ascii")
    except UnicodeDecodeError:
        raise _Fallback from None
    return _Head(event.status_code, reason, headers, int(lengths[0]), start)
