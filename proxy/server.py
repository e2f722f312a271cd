"""Running the proxy: listeners, signals, reloads and the drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from proxy.app import (
    ACCESS,
    CHECKER,
    CONFIG,
    HANDLER_ARGS,
    METRICS,
    RELOADER,
    STATE,
    TOKEN_RELOADER,
    create_admin_app,
    create_app,
    warn_about_unknown_users,
)
from proxy.config import Address, Config, ConfigError, load_config, restart_only_changes
from proxy.edge.client_slots import ClientSlots
from proxy.edge.listen import Listener, listen
from proxy.edge.open_connections import OpenConnections
from proxy.host_share import worker_share
from proxy.log import access_log, access_logger_class, count
from proxy.metrics import Metrics
from proxy.preflight import require_aiohttp
from proxy.reload import CertificateReloader

log = logging.getLogger("registry_proxy")
T = TypeVar("T")

# After the drain deadline, how long cancelled handlers get to unwind.
_CANCEL_GRACE = 1.0
# The public listener's accept queue (a worker's inherited socket keeps this length too).
_BACKLOG = 1024


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
    require_aiohttp()
    certificates = CertificateReloader(config.tls) if config.tls.enabled else None
    asyncio.run(_serve(config, users, certificates, config_path, listener, on_serving, host_store))


async def _serve(
    config: Config,
    users: Mapping[str, str],
    certificates: CertificateReloader | None,
    config_path: Path | None,
    listener: socket.socket | None = None,
    on_serving: OnServing | None = None,
    host_store: socket.socket | None = None,
) -> None:
    server = _Server(config, certificates, config_path)
    await server.start(users, listener, on_serving, host_store)
    await server.serve()
    await server.drain()


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
    app[METRICS].read_only.set(1 if fresh.read_only else 0)
    access.immutable = fresh.immutable_tags
    warn_about_unknown_users(
        fresh.access, app[CHECKER].users, config_path, directory=fresh.ldap.enabled
    )
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


def listen_error(exc: OSError, key: str, address: Address) -> ListenError:
    """The error naming the setting and the address that could not be bound, and why."""
    # asyncio's message repeats the address; the errno's own text is enough.
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return ListenError(f"cannot listen on {address} ({key}): {reason}")


async def _start_listening(starting: Awaitable[T], key: str, address: Address) -> T:
    try:
        return await starting
    except OSError as exc:
        raise listen_error(exc, key, address) from None


def _handler_args(config: Config, metrics: Metrics) -> dict[str, Any]:
    """aiohttp's RequestHandler keywords for every public connection, built once."""
    return {
        "access_log": access_log,
        "access_log_class": access_logger_class(metrics, config.access_log),
        "keepalive_timeout": config.keepalive_timeout,
        **HANDLER_ARGS,
    }


class _Server:
    """One serving process: `start` listens, `serve` runs until SIGTERM or SIGINT (SIGHUP
    reloads), `drain` stops accepting and lets requests in progress finish."""

    def __init__(
        self, config: Config, certificates: CertificateReloader | None, config_path: Path | None
    ) -> None:
        self.config = config
        self.certificates = certificates
        self.config_path = config_path
        self.connections = OpenConnections()
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None
        self.listener: Listener | None = None
        self.admin_runner: web.AppRunner | None = None
        self.cert_watch: asyncio.Task[None] | None = None

    async def start(
        self,
        users: Mapping[str, str],
        sock: socket.socket | None,
        on_serving: OnServing | None,
        host_store: socket.socket | None,
    ) -> None:
        """Build the application and listen (on `sock` when a worker inherited it)."""
        config, certificates = self.config, self.certificates
        self.app = app = create_app(config, users, host_store)
        metrics = app[METRICS]
        if certificates is not None:
            certificates.report_to(metrics)
        self.runner = runner = web.AppRunner(app, shutdown_timeout=_CANCEL_GRACE)
        await runner.setup()
        assert runner.server is not None
        starting = listen(
            runner.server,
            _handler_args(config, metrics),
            config.listen.host,
            config.listen.port,
            max_connections=config.max_connections,
            on_refused=metrics.connections_refused.inc,
            # Edge proxies carry many clients on their connections: their addresses are not capped.
            clients=ClientSlots(
                worker_share(config.max_connections_per_client, config.workers),
                config.trusted_proxies,
            ),
            on_client_refused=metrics.client_connections_refused.inc,
            connections=self.connections,
            proxy_protocol_from=config.trusted_proxies if config.proxy_protocol else (),
            on_proxy_rejected=lambda reason: metrics.proxy_protocol_rejected.labels(reason).inc(),
            ssl_context=certificates.listener_context if certificates else None,
            tls_handshake_timeout=config.tls_handshake_timeout,
            backlog=_BACKLOG,
            sock=sock,
        )
        try:
            self.listener = await _start_listening(starting, "listen", config.listen)
        except ListenError:
            await runner.cleanup()
            raise
        # Nothing says "serving" until every listener is bound: an admin port clash fails first.
        if on_serving is None and config.admin_listen is not None:
            await self._start_admin(app, config.admin_listen)
        log.info(
            "serving %s://%s%s for %s, forwarding to %s",
            "https" if certificates else "http",
            config.listen,
            " behind the PROXY protocol" if config.proxy_protocol else "",
            count(len(users), "user"),
            config.upstream,
        )
        if on_serving is not None:
            on_serving(app)

    async def _start_admin(self, app: web.Application, address: Address) -> None:
        admin_runner = web.AppRunner(create_admin_app(app), access_log=None)
        await admin_runner.setup()
        admin_site = web.TCPSite(admin_runner, address.host, address.port)
        try:
            await _start_listening(admin_site.start(), "admin_listen", address)
        except ListenError:
            await admin_runner.cleanup()
            assert self.runner is not None and self.listener is not None
            self.listener.close()
            await self.runner.cleanup()
            raise
        self.admin_runner = admin_runner
        log.info("admin listener on http://%s", address)

    async def serve(self) -> None:
        """Until SIGTERM or SIGINT; SIGHUP reloads access rules, users and certificates."""
        app, certificates = self.app, self.certificates
        assert app is not None
        # Reload tasks are kept referenced until they finish (asyncio holds tasks weakly).
        reloads: set[asyncio.Task[None]] = set()

        def reload_all() -> None:
            _reload_access(app, self.config_path)
            coroutines = [app[RELOADER].reload("SIGHUP")]
            if TOKEN_RELOADER in app:
                coroutines.append(app[TOKEN_RELOADER].reload("SIGHUP"))
            if certificates is not None:
                coroutines.append(certificates.reload("SIGHUP"))
            for coroutine in coroutines:
                task = asyncio.create_task(coroutine)
                reloads.add(task)
                task.add_done_callback(reloads.discard)

        if certificates is not None:
            self.cert_watch = asyncio.create_task(certificates.watch())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_all)
        await stop.wait()

    async def drain(self) -> None:
        """Stop accepting, close idle connections, wait up to `shutdown_timeout` for requests
        in progress, then cut what is left and clean up."""
        app, runner, listener = self.app, self.runner, self.listener
        assert app is not None and runner is not None and listener is not None
        assert runner.server is not None
        config, state = self.config, app[STATE]
        state.draining = True
        listener.close()
        # Busy connections close after their current request; idle keep-alive ones now
        # (aiohttp's pre_shutdown only stops an idle connection's handler, not its socket).
        runner.server.pre_shutdown()
        idle = self.connections.close_idle()
        log.info(
            "shutting down: stopped accepting; closed %d idle connections, %d more close after "
            "their request",
            idle,
            self.connections.busy,
        )
        log.info(
            "waiting up to %gs for %d requests in progress",
            config.shutdown_timeout,
            state.in_flight,
        )
        if await state.wait_idle(config.shutdown_timeout):
            log.info("all requests finished")
        else:
            log.warning(
                "shutdown timeout reached: cutting %d requests in progress", state.in_flight
            )
        if self.cert_watch is not None:
            self.cert_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.cert_watch
        await runner.cleanup()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        log.info("stopped")
