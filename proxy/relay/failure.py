"""What the client gets when the upstream fails, decided in one place.

Before the upstream's response headers a failure becomes the registry's JSON error: 504 for a
timeout, 502 for anything else (refused, reset, closed early). After them the response has
begun, perhaps with a Content-Length, so the client's connection is cut instead: ending cleanly
would make a truncated blob look complete. Each failure is counted once in `upstream_errors` by
kind (connect, timeout, reset) and logged once.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web
from prometheus_client import Counter
from yarl import URL

from proxy import errors
from proxy.log import escape

log = logging.getLogger("registry_proxy.upstream")

# What a call through the upstream client session raises when the upstream fails.
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)


class UpstreamFailures:
    """Counts, logs and answers the failures of one upstream."""

    def __init__(self, upstream: URL, counter: Counter) -> None:
        self._upstream = str(upstream.origin())
        self._counter = counter

    def before_headers(
        self, request: web.Request, exc: BaseException, *, connecting: bool = False
    ) -> web.Response:
        """The client's answer to a failure before the upstream's response headers.

        `connecting`: `exc` came from opening the connection (the fast path's own socket;
        aiohttp says so with `ClientConnectorError`).
        """
        if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
            self._counter.labels("timeout").inc()
            doing = "connecting" if connecting else f"before answering {request.method}"
            log.warning("upstream %s timed out %s", self._upstream, doing)
            return errors.gateway_timeout()
        if connecting or isinstance(exc, aiohttp.ClientConnectorError):
            self._counter.labels("connect").inc()
            cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
            log.warning("upstream %s unreachable: %s", self._upstream, describe(cause))
            return errors.bad_gateway()
        if client_gone(request):
            # The upload failed because its client left: no fault of the upstream's.
            log.debug("client went away during %s upload", request.method)
            return errors.bad_gateway()
        self._counter.labels("reset").inc()
        log.warning("upstream %s failed before answering: %s", self._upstream, describe(exc))
        return errors.bad_gateway()

    def mid_body(self, request: web.Request, exc: BaseException) -> None:
        """The upstream broke off a response already begun: cut the client's connection."""
        self._counter.labels("timeout" if isinstance(exc, TimeoutError) else "reset").inc()
        log.warning(
            "upstream %s broke off %s %s mid-body: %s",
            self._upstream,
            request.method,
            escape(request.raw_path.partition("?")[0]),
            describe(exc),
        )
        abort_client(request)


def client_stopped(request: web.Request, exc: ConnectionError | TimeoutError, idle: float) -> None:
    """Writing to the client failed: it went away, or stopped reading for `idle` seconds (cut)."""
    if isinstance(exc, TimeoutError):
        log.info("client stopped reading for %gs: closing", idle)
        abort_client(request)


def abort_client(request: web.Request) -> None:
    """Cut the client's connection: a response already begun must not look complete."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
