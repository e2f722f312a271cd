"""Relaying one request to the upstream registry and its response back, streaming both bodies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import errors
from proxy.access import CatalogPage, cap_catalog_query
from proxy.exchange import Exchange
from proxy.metrics import Metrics

log = logging.getLogger("registry_proxy.forward")

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones clients still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never passed upstream: our own credentials, the 100-continue we already answered, and
# forwarding headers a client could spoof (the registry trusts them over Host when building
# Location URLs: distribution registry/api/v2/urls.go).
_CLIENT_ONLY = frozenset({"authorization", "expect", "forwarded", "host", "x-real-ip"})
_FORWARDING_PREFIX = "x-forwarded-"

# Registry catalog pages a filtered catalog request may read before answering.
_CATALOG_PAGES = 20

# The best relay buffer measured on loopback (see README, Performance).
READ_BUFSIZE = 1 << 20


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names a sender listed in Connection, which are hop-by-hop too."""
    return {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    }


def upstream_request_headers(request: web.Request, client: str, scheme: str) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop and spoofable ones, plus our forwarding headers."""
    dropped = HOP_BY_HOP | _connection_tokens(request.headers)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lowered = name.lower()
        if lowered in dropped or lowered in _CLIENT_ONLY or lowered.startswith(_FORWARDING_PREFIX):
            continue
        headers.add(name, value)
    # The client's own Host (with its port) makes the registry build Locations that point at us.
    headers["Host"] = request.host
    headers["X-Forwarded-Proto"] = scheme
    if client:
        headers["X-Forwarded-For"] = client
    return headers


def client_response_headers(
    upstream: aiohttp.ClientResponse, upstream_origin: URL, client_origin: str
) -> CIMultiDict[str]:
    """The upstream's headers minus hop-by-hop ones, with Locations at the upstream rewritten."""
    return relayed_headers(upstream.headers, upstream_origin, client_origin)


def relayed_headers(
    received: CIMultiDictProxy[str] | CIMultiDict[str], upstream_origin: URL, client_origin: str
) -> CIMultiDict[str]:
    """Response headers as the client gets them: hop-by-hop dropped, upstream Locations ours."""
    dropped = HOP_BY_HOP | _connection_tokens(received)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in received.items():
        if name.lower() not in dropped:
            headers.add(name, value)
    location = headers.get("Location")
    if location and location.startswith(("http://", "https://")):
        target = URL(location, encoded=True)
        if target.origin() == upstream_origin:
            # A user must never be sent to the upstream directly.
            headers["Location"] = client_origin + (target.raw_path_qs or "/")
    return headers


def request_target(raw_path: str, query: str | None) -> str:
    """The upstream request target: the client's, with the query access control may rewrite."""
    # raw_path is the request target as sent: percent-escapes and query (`_state`,
    # `digest=sha256%3A...`) pass byte for byte unless access control rewrote the query.
    path, _, raw_query = raw_path.partition("?")
    if query is not None and query != raw_query:
        return f"{path}?{query}" if query else path
    return raw_path


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
        self, session: aiohttp.ClientSession, upstream: URL, metrics: Metrics, body_timeout: float
    ) -> None:
        self._session = session
        self._body_timeout = body_timeout
        self._errors = metrics.upstream_errors
        self._upstream = upstream.origin()
        self._base = str(self._upstream)

    def _url(self, request: web.Request, query: str | None) -> URL:
        return URL(self._base + request_target(request.raw_path, query), encoded=True)

    async def __call__(
        self, request: web.Request, exchange: Exchange, query: str | None = None
    ) -> web.StreamResponse:
        """Forward the request; errors before the response starts become registry JSON errors."""
        url = self._url(request, query)
        body = _ClientBody(request, self._body_timeout) if request.body_exists else None
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=upstream_request_headers(request, exchange.client, exchange.scheme),
                data=body,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            if body is not None and body.stalled:
                log.info(
                    "client sent no %s body for %gs: closing", request.method, self._body_timeout
                )
                response = errors.request_timeout()
                response.force_close()
                return response
            return self._failed_before_headers(request, exc)

        exchange.upstream_status = upstream.status
        if upstream.status >= 500:
            self._errors.labels("5xx").inc()
        try:
            return await self._relay_response(request, upstream, exchange.scheme)
        finally:
            upstream.release()

    async def catalog(
        self,
        request: web.Request,
        exchange: Exchange,
        query: str,
        visible: Callable[[bytes, str | None], CatalogPage],
    ) -> web.StreamResponse:
        """GET /v2/_catalog, keeping only what `visible` lets through (pages hold <= 1000)."""
        headers: CIMultiDict[str] = CIMultiDict()
        page = CatalogPage(b'{"repositories":[]}', None)
        for _ in range(_CATALOG_PAGES):
            try:
                async with self._session.get(
                    self._url(request, query),
                    headers=upstream_request_headers(request, exchange.client, exchange.scheme),
                    allow_redirects=False,
                ) as upstream:
                    exchange.upstream_status = upstream.status
                    body = await upstream.read()
                    origin = f"{exchange.scheme}://{request.host}"
                    headers = client_response_headers(upstream, self._upstream, origin)
                    headers.popall("Content-Length", None)
                    if upstream.status != 200:
                        return web.Response(status=upstream.status, body=body, headers=headers)
            except (TimeoutError, aiohttp.ClientError) as exc:
                return self._failed_before_headers(request, exc)
            try:
                page = visible(body, headers.get("Link"))
            except ValueError:
                log.warning("upstream %s sent a catalog that is not one", self._base)
                return errors.bad_gateway()
            if page.resume_after is None:
                break
            # Nothing visible on this page: skip ahead rather than answer an empty page.
            query = cap_catalog_query(query, last=page.resume_after)
        headers.popall("Link", None)
        if page.link:
            headers["Link"] = page.link
        elif page.resume_after is not None:
            headers["Link"] = f'</v2/_catalog?{query}>; rel="next"'
        return web.Response(status=200, body=page.body, headers=headers)

    def _failed_before_headers(
        self, request: web.Request, exc: TimeoutError | aiohttp.ClientError
    ) -> web.Response:
        """Map a failure before the upstream's response headers to a JSON error."""
        if isinstance(exc, aiohttp.ClientConnectorError):
            self._errors.labels("connect").inc()
            log.warning("upstream %s unreachable: %s", self._base, exc.os_error or exc)
            return errors.bad_gateway()
        if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
            self._errors.labels("timeout").inc()
            log.warning("upstream %s timed out before answering %s", self._base, request.method)
            return errors.gateway_timeout()
        if _client_gone(request):
            log.debug("client went away during %s upload", request.method)
        else:
            self._errors.labels("reset").inc()
            log.warning("upstream %s failed before answering: %s", self._base, _describe(exc))
        return errors.bad_gateway()

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
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._errors.labels("timeout" if isinstance(exc, TimeoutError) else "reset").inc()
                # Headers (maybe a Content-Length) are out: ending the body cleanly would make
                # a truncated blob look complete, so the client's connection is cut instead.
                log.warning(
                    "upstream %s broke off %s %s mid-body: %s",
                    self._base,
                    request.method,
                    request.rel_url.path,
                    _describe(exc),
                )
                upstream.close()
                abort_client(request)
                return response
            if not chunk:
                break
            try:
                async with asyncio.timeout(self._body_timeout):
                    await response.write(chunk)
            except (ConnectionError, TimeoutError) as exc:
                # The client went away or stopped reading; the half-read upstream connection
                # cannot be reused.
                upstream.close()
                if isinstance(exc, TimeoutError):
                    log.info("client stopped reading for %gs: closing", self._body_timeout)
                    abort_client(request)
                return response
        await response.write_eof()
        return response


def abort_client(request: web.Request) -> None:
    """Cut the client's connection: a response already begun must not look complete."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


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
