"""The admin application: /healthz, /readyz and /metrics, served on `admin_listen` only.

One process and the workers' supervising parent serve the same routes; they differ in what
makes them ready and in how they gather the metrics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.edge.connection import drop_server_banner

# Why the proxy is not ready (`draining`, `upstream not answering`...), or None when it is.
Readiness = Callable[[], str | None]
# The metrics in Prometheus' text format.
Scrape = Callable[[], Awaitable[bytes]]

EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_admin_app(not_ready: Readiness, scrape: Scrape) -> web.Application:
    """The admin routes, answering /readyz from `not_ready` and /metrics from `scrape`."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        reason = not_ready()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=await scrape(), headers={"Content-Type": EXPOSITION_TYPE})

    app = web.Application()
    app.on_response_prepare.append(drop_server_banner)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app
