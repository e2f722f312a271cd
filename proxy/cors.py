"""CORS for browser clients on listed origins: preflights answered here, headers on every answer."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from proxy.exchange import REQUEST_ID_HEADER

# Only the registry API is shared with other origins; the proxy's own pages never are.
_API_PREFIX = "/v2/"
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE"
# Range for partial blob reads, Content-Range for chunked uploads; docker-registry-ui sends
# Cache-Control with its USE_CONTROL_CACHE_HEADER option.
ALLOWED_HEADERS = "Authorization, Accept, Content-Type, Range, Content-Range, Cache-Control"
EXPOSED_HEADERS = ", ".join(
    [
        "Docker-Content-Digest",
        "Docker-Distribution-Api-Version",
        "Docker-Upload-UUID",
        "Link",
        "Location",
        "Range",
        "Retry-After",
        "WWW-Authenticate",
        REQUEST_ID_HEADER,
    ]
)
# Ten minutes: spares most preflights; a change to the lists below reaches browsers soon.
MAX_AGE = "600"
_OWN_PREFIX = "access-control-"


class CrossOrigin:
    """Which origins may read the API with credentials, and the headers that tell browsers so."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self._allowed = frozenset(allowed)

    def listed_origin(self, request: web.BaseRequest) -> str | None:
        """The request's `Origin` if it is one of ours and the target is the API, else None."""
        if not self._allowed or not request.raw_path.startswith(_API_PREFIX):
            return None
        given = request.headers.getall("Origin", ())
        if len(given) == 1 and given[0] in self._allowed:
            return given[0]
        return None

    def is_preflight(self, request: web.BaseRequest) -> bool:
        """A listed origin's CORS preflight: OPTIONS asking for a method, without a body."""
        return (
            request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
            # Browsers send none; one with a body is not a preflight and meets the gate.
            and not request.body_exists
            and self.listed_origin(request) is not None
        )

    def preflight(self, request: web.BaseRequest) -> web.Response | None:
        """The answer to a listed origin's preflight (before any credentials), or None."""
        return web.Response(status=204) if self.is_preflight(request) else None

    async def on_response_prepare(
        self, request: web.BaseRequest, response: web.StreamResponse
    ) -> None:
        """Our CORS headers replace the upstream's: the listed origin's, or none at all."""
        if not self._allowed:
            return
        headers = response.headers
        for name in {name for name in headers if name.lower().startswith(_OWN_PREFIX)}:
            del headers[name]
        _vary_on_origin(response)
        listed = self.listed_origin(request)
        if listed is None:
            return
        headers["Access-Control-Allow-Origin"] = listed
        headers["Access-Control-Allow-Credentials"] = "true"
        headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if self.is_preflight(request):
            headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            headers["Access-Control-Max-Age"] = MAX_AGE


def _vary_on_origin(response: web.StreamResponse) -> None:
    """Every answer varies by `Origin`, so that no cache gives one origin's answer to another."""
    given = ", ".join(response.headers.getall("Vary", ()))
    named = {name.strip().lower() for name in given.split(",")}
    if "origin" in named or "*" in named:
        return
    response.headers["Vary"] = f"{given}, Origin" if given else "Origin"
