"""Relaying one request to the upstream registry and its response back, streaming both bodies."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Histogram
from yarl import URL

from proxy import errors
from proxy.edge.forwarded import client_key
from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.relay.failure import UPSTREAM_ERRORS, UpstreamFailures, client_stopped
from proxy.relay.headers import client_response_headers, upstream_request_headers, upstream_url
from proxy.relay.slots import UpstreamSlots

log = logging.getLogger("registry_proxy.forward")

# A relay used instead of the normal one (proxy/relay/blob.py); it answers whatever comes back.
FastPath = Callable[[web.Request, Exchange, str | None], Awaitable[web.StreamResponse]]

# The best relay buffer measured on loopback (see docs/performance.md).
READ_BUFSIZE = 1 << 20


@dataclass(frozen=True)
class Fetched:
    """An upstream answer read whole (small JSON documents only)."""

    status: int
    headers: CIMultiDict[str]
    body: bytes


def request_target(raw_path: str, query: str | None) -> str:
    """The upstream request target: the client's, with the query access control may rewrite."""
    # raw_path is the request target as sent: percent-escapes and query (`_state`,
    # `digest=sha256%3A...`) pass byte for byte unless access control rewrote the query.
    path, _, raw_query = raw_path.partition("?")
    if query is not None and query != raw_query:
        return f"{path}?{query}" if query else path
    return raw_path


def record_time_to_headers(histogram: Histogram, exchange: Exchange, sent: float) -> None:
    """Record the time from `sent` to the upstream's headers (summed over a catalog's pages)."""
    seconds = time.monotonic() - sent
    histogram.labels(exchange.target.action).observe(seconds)
    exchange.upstream_ms = round((exchange.upstream_ms or 0.0) + seconds * 1000, 3)


class _ClientBody:
    """The client's body as it arrives, failing if the client goes quiet for `idle` seconds."""

    def __init__(self, request: web.Request, idle: float) -> None:
        self._content = request.content
        self._idle = idle
        self.stalled = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await self._content.readany()
            except TimeoutError:
                self.stalled = True
                raise
            if not chunk:
                return
            yield chunk


class Forwarder:
    """Relays requests to one upstream registry over a pooled keep-alive client session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: URL,
        metrics: Metrics,
        body_timeout: float,
        slots: UpstreamSlots | None = None,
    ) -> None:
        self._session = session
        self._slots = slots
        self._pool_timeouts = metrics.upstream_pool_timeouts
        self._body_timeout = body_timeout
        self._errors = metrics.upstream_errors
        self._failures = UpstreamFailures(upstream, metrics.upstream_errors)
        self._time_to_headers = metrics.upstream_time_to_headers
        self._upstream = upstream.origin()
        self._base = str(self._upstream)

    def _url(self, request: web.Request, query: str | None) -> URL:
        return upstream_url(self._base, request_target(request.raw_path, query))

    async def __call__(
        self,
        request: web.Request,
        exchange: Exchange,
        query: str | None = None,
        *,
        fast: FastPath | None = None,
    ) -> web.StreamResponse:
        """Forward within the user's share of the upstream pool; 503 if no slot frees in time.

        `fast` (the blob fast path), when given, relays the request instead, in the same slot.
        """
        if self._slots is None:
            return await self._forward_either(request, exchange, query, fast)
        # An anonymous request's share is its client's, counted by client key like every
        # other per-client limit (one IPv6 /64 is one client).
        anonymous = exchange.user is None
        share = client_key(exchange.client) if exchange.user is None else exchange.user
        if not await self._slots.acquire(share, anonymous=anonymous):
            self._pool_timeouts.inc()
            log.debug("no upstream connection free: %s %s", request.method, exchange.target.action)
            return errors.proxy_busy()
        try:
            return await self._forward_either(request, exchange, query, fast)
        finally:
            self._slots.release(share, anonymous=anonymous)

    async def _forward_either(
        self, request: web.Request, exchange: Exchange, query: str | None, fast: FastPath | None
    ) -> web.StreamResponse:
        if fast is not None:
            return await fast(request, exchange, query)
        return await self._forward(request, exchange, query)

    async def _forward(
        self, request: web.Request, exchange: Exchange, query: str | None
    ) -> web.StreamResponse:
        """Forward the request; errors before the response starts become registry JSON errors."""
        url = self._url(request, query)
        body = _ClientBody(request, self._body_timeout) if request.body_exists else None
        # A body the gate read whole (proxy/access/immutable.py) is sent as read.
        data = body if exchange.body is None else exchange.body
        sent = time.monotonic()
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=upstream_request_headers(
                    request, exchange.client, exchange.scheme, exchange.request_id
                ),
                data=data,
                allow_redirects=False,
            )
        except UPSTREAM_ERRORS as exc:
            if body is not None and body.stalled:
                log.info(
                    "client sent no %s body for %gs: closing", request.method, self._body_timeout
                )
                response = errors.request_timeout()
                response.force_close()
                return response
            return self._failures.before_headers(request, exc)

        exchange.upstream_status = upstream.status
        self._took(exchange, sent)
        if upstream.status >= 500:
            self._errors.labels("5xx").inc()
        try:
            return await self._relay_response(request, upstream, exchange.scheme)
        finally:
            upstream.release()

    async def fetch(
        self, request: web.Request, exchange: Exchange, target: str
    ) -> Fetched | web.Response:
        """GET `target` upstream with the client's headers and read the answer whole.

        A failure before the answer becomes the JSON error to send instead.
        """
        sent = time.monotonic()
        try:
            async with self._session.get(
                upstream_url(self._base, target),
                headers=upstream_request_headers(
                    request, exchange.client, exchange.scheme, exchange.request_id
                ),
                allow_redirects=False,
            ) as upstream:
                exchange.upstream_status = upstream.status
                self._took(exchange, sent)
                body = await upstream.read()
        except UPSTREAM_ERRORS as exc:
            return self._failures.before_headers(request, exc)
        origin = f"{exchange.scheme}://{request.host}"
        headers = client_response_headers(upstream, self._upstream, origin)
        headers.popall("Content-Length", None)
        return Fetched(upstream.status, headers, body)

    def _took(self, exchange: Exchange, sent: float) -> None:
        record_time_to_headers(self._time_to_headers, exchange, sent)

    async def _relay_response(
        self, request: web.Request, upstream: aiohttp.ClientResponse, scheme: str
    ) -> web.StreamResponse:
        client_origin = f"{scheme}://{request.host}"
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=client_response_headers(upstream, self._upstream, client_origin),
        )
        await response.prepare(request)
        reader = upstream.content
        while True:
            try:
                chunk = await reader.readany()
            except UPSTREAM_ERRORS as exc:
                upstream.close()
                self._failures.mid_body(request, exc)
                return response
            if not chunk:
                break
            try:
                async with asyncio.timeout(self._body_timeout):
                    await response.write(chunk)
            except (ConnectionError, TimeoutError) as exc:
                # The half-read upstream connection cannot be reused.
                upstream.close()
                client_stopped(request, exc, self._body_timeout)
                return response
        await response.write_eof()
        return response


def create_session(
    *, connections: int, connect_timeout: float, read_timeout: float
) -> aiohttp.ClientSession:
    """The one upstream client session: pooled, never decompressing, no total timeout."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0, force_close=False)
    return aiohttp.ClientSession(
        connector=connector,
        # Multi-GB blobs take long: no total deadline, only connect and per-read idleness.
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout),
        auto_decompress=False,
        read_bufsize=READ_BUFSIZE,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
