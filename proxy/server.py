"""Running the proxy: listeners, signals and an orderly shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping

from aiohttp import web

from proxy.app import create_admin_app, create_app
from proxy.config import Config
from proxy.log import AccessLogger, access_log
from proxy.tls import server_context

log = logging.getLogger("registry_proxy")


def run(config: Config, users: Mapping[str, str]) -> None:
    """Serve until SIGTERM or SIGINT, then drain for up to `shutdown_timeout` seconds."""
    ssl_context = server_context(config.tls) if config.tls.enabled else None
    asyncio.run(_serve(config, users, ssl_context))


async def _serve(config: Config, users: Mapping[str, str], ssl_context: object) -> None:
    runner = web.AppRunner(
        create_app(config, users),
        access_log=access_log,
        access_log_class=AccessLogger,
        keepalive_timeout=config.keepalive_timeout,
        shutdown_timeout=config.shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        config.listen.host,
        config.listen.port,
        ssl_context=ssl_context,  # type: ignore[arg-type]
        backlog=1024,
    )
    await site.start()
    scheme = "https" if ssl_context else "http"
    log.info(
        "serving %s://%s for %d users, forwarding to %s",
        scheme,
        config.listen,
        len(users),
        config.upstream,
    )

    admin_runner: web.AppRunner | None = None
    if config.admin_listen is not None:
        admin_runner = web.AppRunner(create_admin_app(), access_log=None)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, config.admin_listen.host, config.admin_listen.port).start()
        log.info("admin listener on http://%s", config.admin_listen)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    log.info("shutting down: no new connections, waiting up to %gs", config.shutdown_timeout)
    await runner.cleanup()
    if admin_runner is not None:
        await admin_runner.cleanup()
    log.info("stopped")
