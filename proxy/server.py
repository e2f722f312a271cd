"""Running the proxy: listeners, signals, reloads and the drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from aiohttp import web

from proxy.app import (
    ACCESS,
    CHECKER,
    CONFIG,
    METRICS,
    RELOADER,
    STATE,
    create_admin_app,
    create_app,
    warn_about_unknown_users,
)
from proxy.config import Address, Config, ConfigError, load_config, restart_only_changes
from proxy.edge.client_slots import ClientSlots
from proxy.edge.listen import LimitedTCPSite
from proxy.log import access_log, access_logger_class, count
from proxy.preflight import require_c_parser
from proxy.reload import CertificateReloader

log = logging.getLogger("registry_proxy")

# After the drain deadline, how long cancelled handlers get to unwind.
_CANCEL_GRACE = 1.0


# A worker's hook (proxy/worker.py), called once its listener serves.
OnServing = Callable[[web.Application], None]


def run(
    config: Config,
    users: Mapping[str, str],
    config_path: Path | None = None,
    *,
    listener: socket.socket | None = None,
    on_serving: OnServing | None = None,
    host_store: socket.socket | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain for up to `shutdown_timeout` seconds.

    A worker (proxy/workers.py) passes the supervisor's `listener` and throttle store socket,
    and serves no admin routes.
    """
    require_c_parser()
    certificates = CertificateReloader(config.tls) if config.tls.enabled else None
    asyncio.run(_serve(config, users, certificates, config_path, listener, on_serving, host_store))


def _reload_access(app: web.Application, config_path: Path | None) -> None:
    """Re-read the configuration for what SIGHUP applies: access rules and read-only mode."""
    try:
        fresh = load_config(config_path)
    except ConfigError as exc:
        app[METRICS].config_reloads.labels("failure").inc()
        log.error("configuration reload (SIGHUP) failed, keeping the current rules: %s", exc)
        return
    app[METRICS].config_reloads.labels("success").inc()
    _warn_about_restart_only(app[CONFIG], fresh)
    access = app[ACCESS]
    access.policy, access.read_only = fresh.access, fresh.read_only
    access.immutable = fresh.immutable_tags
    warn_about_unknown_users(fresh.access, app[CHECKER].users)
    rules = "unrestricted" if fresh.access.unrestricted else "restricted by rules"
    log.info("access reloaded (SIGHUP): %s, read_only=%s", rules, str(fresh.read_only).lower())


def _warn_about_restart_only(running: Config, fresh: Config) -> None:
    changed = restart_only_changes(running, fresh)
    if changed:
        log.warning(
            "configuration reload (SIGHUP): changed but not applied, restart to apply: %s",
            ", ".join(changed),
        )


class ListenError(Exception):
    """A listener could not bind (port in use, no permission); the message names it."""


async def _start_site(site: web.BaseSite, key: str, address: Address) -> None:
    try:
        await site.start()
    except OSError as exc:
        # asyncio's message repeats the address; the errno's own text is enough.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"cannot listen on {address} ({key}): {reason}") from None


async def _serve(
    config: Config,
    users: Mapping[str, str],
    certificates: CertificateReloader | None,
    config_path: Path | None,
    listener: socket.socket | None = None,
    on_serving: OnServing | None = None,
    host_store: socket.socket | None = None,
) -> None:
    app = create_app(config, users, host_store)
    if certificates is not None:
        certificates.report_to(app[METRICS])
    runner = web.AppRunner(
        app,
        access_log=access_log,
        access_log_class=access_logger_class(app[METRICS], config.access_log),
        keepalive_timeout=config.keepalive_timeout,
        shutdown_timeout=_CANCEL_GRACE,
    )
    await runner.setup()
    site = LimitedTCPSite(
        runner,
        config.listen.host,
        config.listen.port,
        max_connections=config.max_connections,
        on_refused=app[METRICS].connections_refused.inc,
        # Edge proxies carry many clients on their connections: their addresses are not capped.
        clients=ClientSlots(config.max_connections_per_client, config.trusted_proxies),
        on_client_refused=app[METRICS].client_connections_refused.inc,
        proxy_protocol_from=config.trusted_proxies if config.proxy_protocol else (),
        on_proxy_rejected=lambda reason: app[METRICS].proxy_protocol_rejected.labels(reason).inc(),
        ssl_context=certificates.listener_context if certificates else None,
        backlog=1024,
        sock=listener,
    )
    try:
        await _start_site(site, "listen", config.listen)
    except ListenError:
        await runner.cleanup()
        raise
    log.info(
        "serving %s://%s%s for %s, forwarding to %s",
        "https" if certificates else "http",
        config.listen,
        " behind the PROXY protocol" if config.proxy_protocol else "",
        count(len(users), "user"),
        config.upstream,
    )

    admin_runner: web.AppRunner | None = None
    if on_serving is not None:
        on_serving(app)
    elif config.admin_listen is not None:
        admin_runner = web.AppRunner(create_admin_app(app), access_log=None)
        await admin_runner.setup()
        admin_site = web.TCPSite(admin_runner, config.admin_listen.host, config.admin_listen.port)
        try:
            await _start_site(admin_site, "admin_listen", config.admin_listen)
        except ListenError:
            await admin_runner.cleanup()
            await runner.cleanup()
            raise
        log.info("admin listener on http://%s", config.admin_listen)

    # Reload tasks are kept referenced until they finish (asyncio holds tasks weakly).
    reloads: set[asyncio.Task[None]] = set()

    def reload_all() -> None:
        _reload_access(app, config_path)
        coroutines = [app[RELOADER].reload("SIGHUP")]
        if certificates is not None:
            coroutines.append(certificates.reload("SIGHUP"))
        for coroutine in coroutines:
            task = asyncio.create_task(coroutine)
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    cert_watch = asyncio.create_task(certificates.watch()) if certificates else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_all)
    await stop.wait()

    state = app[STATE]
    state.draining = True
    await site.stop()
    assert runner.server is not None
    # Idle keep-alive connections close now; busy ones close after their current request.
    runner.server.pre_shutdown()
    # aiohttp 3.14's pre_shutdown only stops an idle connection's handler; close its socket too.
    for connection in list(runner.server.connections):
        if not connection._request_in_progress:
            connection.force_close()
    log.info(
        "shutting down: stopped accepting; waiting up to %gs for %d requests in progress",
        config.shutdown_timeout,
        state.in_flight,
    )
    if await state.wait_idle(config.shutdown_timeout):
        log.info("all requests finished")
    else:
        log.warning("shutdown timeout reached: cutting %d requests in progress", state.in_flight)
    if cert_watch is not None:
        cert_watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cert_watch
    await runner.cleanup()
    if admin_runner is not None:
        await admin_runner.cleanup()
    log.info("stopped")
