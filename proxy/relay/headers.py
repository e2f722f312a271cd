"""Which headers cross the proxy, and the upstream URL of a request target."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.exchange import REQUEST_ID_HEADER

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
# X-Request-Id is replaced by ours (a trusted proxy's, when it sent a valid one). Cookies: the
# registry reads none, and a browser's may hold the proxy's own session.
_CLIENT_ONLY = frozenset(
    {"authorization", "cookie", "expect", "forwarded", "host", "x-real-ip",
     REQUEST_ID_HEADER.lower()}
)  # fmt: skip
_FORWARDING_PREFIX = "x-forwarded-"


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names a sender listed in Connection, which are hop-by-hop too."""
    return {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    }


def upstream_request_headers(
    request: web.Request, client: str, scheme: str, request_id: str | None = None
) -> CIMultiDict[str]:
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
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
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


def upstream_url(base: str, target: str) -> URL:
    """The upstream URL for a request target, exactly as sent; ValueError if yarl would alter it."""
    url = URL(base + target, encoded=True)
    # yarl drops a `?` with nothing after it; Go reads `/x?` and `/x` alike (an empty RawQuery).
    # Only that one: a `?` ending a query (`?x=?`) stays in it, for yarl as for Go.
    if url.raw_path_qs != (target.removesuffix("?") if target.count("?") == 1 else target):
        # proxy.reading refuses such targets first; this keeps the promise if that ever changes.
        raise ValueError(f"request target {target!r} would be forwarded as {url.raw_path_qs!r}")
    return url
