"""`workers: N`: a supervising parent and N worker processes serving one listening socket.

The parent binds the public socket once and every worker inherits it (`pass_fds`), rather
than each worker binding its own with SO_REUSEPORT, because:
- a bind error (port taken, no permission) is reported once, before any worker starts;
- the accept queue belongs to the one socket, which the parent keeps open: connections
  waiting in it are taken by the other workers when one dies, and by its replacement, where
  with SO_REUSEPORT the kernel resets those queued on a dead worker's own socket;
- an idle worker accepts first (it is the one waiting in epoll), where SO_REUSEPORT hashes
  connections to workers however busy they are;
- SO_REUSEPORT lets any other process of the same user bind the port and take a share.
The parent owns the admin listener: /metrics sums the workers' prometheus_client
multiprocess files in a private temp dir (removed on exit), /readyz is ready only while
every worker is. The parent also keeps the password-guessing counts for every worker
(proxy/throttle/supervisor.py), asked over a socket pair each worker inherits, so N failures from
one address block after N in all, whichever workers take its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import multiprocess

from proxy.admin import create_admin_app
from proxy.config import Address, Config, ConfigError
from proxy.metrics import (
    PREFIX,
    CertificateExpiry,
    ProcessesCollector,
    TokenExpiry,
    multiprocess_exposition,
)
from proxy.reload import certificate_expiry, read_token_expiries
from proxy.server import listen_error
from proxy.throttle.supervisor import HostStoreServer
from proxy.worker import EXIT_CONFIG

log = logging.getLogger("registry_proxy.workers")

# A worker that dies before it serves this many times in a row is given up, and the proxy too.
START_ATTEMPTS = 3
# Restart delays double from the first to the last for a worker that keeps dying.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
# A worker that served this long before it died is restarted after the first delay again.
STABLE_AFTER = 10.0
# Beyond shutdown_timeout (and the cancel grace), how long a stopping worker gets before SIGKILL.
KILL_GRACE = 10.0
BACKLOG = 1024


def bind_listener(address: Address) -> socket.socket:
    """The public listening socket, bound once here and inherited by every worker."""
    infos = socket.getaddrinfo(
        address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if len({info[4][:2] for info in infos}) > 1:
        raise ConfigError(
            f"listen: {address}: {address.host} names several addresses; with workers above 1 "
            "give one address"
        )
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise listen_error(exc, "listen", address) from None
    return sock


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-status} ({name})"
    return f"exited with status {status}"


@dataclass
class Slot:
    """One worker's place: the process in it now and how its recent ones fared."""

    index: int
    process: asyncio.subprocess.Process | None = None
    started: bool = False
    ready: bool = False
    reload_pending: bool = False
    failed_starts: int = 0
    quick_deaths: int = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def state(self) -> str:
        if not self.alive:
            return "down"
        if not self.started:
            return "starting"
        return "ready" if self.ready else "not ready"


class Supervisor:
    """Starts the workers, restarts those that die, forwards SIGTERM and SIGHUP."""

    def __init__(
        self, config: Config, config_path: Path | None, listener: socket.socket, metrics_dir: str
    ) -> None:
        self._config = config
        self._config_path = config_path
        self._listener = listener
        self._metrics_dir = metrics_dir
        self._store = HostStoreServer()
        self._slots = [Slot(index) for index in range(1, config.workers + 1)]
        self._stopping = asyncio.Event()
        self._exit_status = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        admin: web.AppRunner | None = None
        if self._config.admin_listen is not None:
            admin = web.AppRunner(self._admin_app(), access_log=None)
            await admin.setup()
            address = self._config.admin_listen
            try:
                await web.TCPSite(admin, address.host, address.port).start()
            except OSError as exc:
                await admin.cleanup()
                await self._store.close()
                raise listen_error(exc, "admin_listen", address) from None
            log.info("admin listener on http://%s", address)
        log.info("starting %d workers on %s", len(self._slots), self._config.listen)
        keepers = [asyncio.create_task(self._keep(slot)) for slot in self._slots]
        try:
            await self._stopping.wait()
            await self._stop(keepers)
        finally:
            if admin is not None:
                await admin.cleanup()
            await self._store.close()
        log.info("all workers stopped")
        return self._exit_status

    def _reload(self) -> None:
        log.info("SIGHUP: every worker reloads")
        for slot in self._slots:
            if slot.alive and slot.started:
                assert slot.process is not None
                slot.process.send_signal(signal.SIGHUP)
            else:
                # Before `started` its handler may not be set, and SIGHUP would kill it.
                slot.reload_pending = True

    async def _stop(self, keepers: list[asyncio.Task[None]]) -> None:
        # The socket closes once the last worker has closed its copy too.
        self._listener.close()
        for slot in self._slots:
            if slot.alive:
                assert slot.process is not None
                slot.process.send_signal(signal.SIGTERM)
        log.info("stopping: every worker drains for up to %gs", self._config.shutdown_timeout)
        deadline = self._config.shutdown_timeout + KILL_GRACE
        _, late = await asyncio.wait(keepers, timeout=deadline)
        for slot in self._slots:
            if late and slot.alive:
                assert slot.process is not None
                log.error("worker %d (pid %d) did not stop: killing it", slot.index,
                          slot.process.pid)  # fmt: skip
                slot.process.kill()
        await asyncio.gather(*keepers)

    def _give_up(self, status: int) -> None:
        self._exit_status = status
        self._stopping.set()

    async def _keep(self, slot: Slot) -> None:
        """Run a worker in `slot` until the proxy stops, restarting it when it dies."""
        try:
            await self._keep_running(slot)
        except Exception:
            # A worker that cannot even be spawned (no memory, no processes left) is not kept.
            log.exception("worker %d cannot be started: giving up", slot.index)
            self._give_up(1)

    async def _keep_running(self, slot: Slot) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            began = loop.time()
            pid, status = await self._run_worker(slot)
            if self._stopping.is_set():
                if status != 0:
                    log.warning("worker %d (pid %d) %s", slot.index, pid, describe_exit(status))
                return
            if not slot.started:
                slot.failed_starts += 1
                if status == EXIT_CONFIG or slot.failed_starts >= START_ATTEMPTS:
                    log.error(
                        "worker %d (pid %d) %s before it served (%d in a row): giving up",
                        slot.index, pid, describe_exit(status), slot.failed_starts,
                    )  # fmt: skip
                    self._give_up(EXIT_CONFIG if status == EXIT_CONFIG else 1)
                    return
            if loop.time() - began >= STABLE_AFTER:
                slot.quick_deaths = 0
            slot.quick_deaths += 1
            delay = min(BACKOFF_FIRST * 2 ** (slot.quick_deaths - 1), BACKOFF_MAX)
            log.error("worker %d (pid %d) %s; restarting it in %gs",
                      slot.index, pid, describe_exit(status), delay)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _run_worker(self, slot: Slot) -> tuple[int, int]:
        """Start a worker, follow its status lines until it exits; its pid and exit status."""
        read_fd, write_fd = os.pipe()
        fd = self._listener.fileno()
        # A connection to the throttle's store for this worker only: it dies with the worker.
        store = self._store.connect()
        args = [sys.executable, "-m", "proxy.worker", "--index", str(slot.index),
                "--listen-fd", str(fd), "--status-fd", str(write_fd),
                "--throttle-fd", str(store.fileno())]  # fmt: skip
        if self._config_path is not None:
            args += ["--config", str(self._config_path)]
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(self._listener.fileno(), write_fd, store.fileno()),
                env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir},
            )
        finally:
            os.close(write_fd)
            store.close()
        slot.process, slot.started, slot.ready = process, False, False
        log.info("worker %d started: pid %d", slot.index, process.pid)
        if self._stopping.is_set():
            process.send_signal(signal.SIGTERM)
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        try:
            async for line in reader:
                self._on_status(slot, line.strip().decode(errors="replace"))
            status = await process.wait()
        finally:
            transport.close()
            slot.ready = False
            # Its `live*` gauges stop counting; its counters stay in the sums.
            multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        return process.pid, status

    def _on_status(self, slot: Slot, message: str) -> None:
        if message == "started":
            slot.started, slot.failed_starts = True, 0
            assert slot.process is not None
            log.info("worker %d (pid %d) serves", slot.index, slot.process.pid)
            if slot.reload_pending:
                slot.reload_pending = False
                slot.process.send_signal(signal.SIGHUP)
        elif message in ("ready", "unready"):
            slot.ready = message == "ready"

    def _pids(self) -> list[int]:
        """The parent's and every live worker's."""
        alive = [slot.process.pid for slot in self._slots if slot.process and slot.alive]
        return [os.getpid(), *alive]

    def _admin_app(self) -> web.Application:
        """/healthz, /readyz and /metrics for all the workers."""

        def not_ready() -> str | None:
            if self._stopping.is_set():
                return "draining"
            waiting = [f"worker {s.index} {s.state()}" for s in self._slots if not s.ready]
            return ", ".join(waiting) if waiting else None

        processes = ProcessesCollector(self._pids)
        # A custom collector in a worker is not in the shared files: the parent reads the file.
        expiry = CertificateExpiry(f"{PREFIX}_tls_certificate_expiry_timestamp_seconds")
        tls = self._config.tls
        if tls.enabled:

            def expires_at() -> float:
                try:
                    return certificate_expiry(tls)
                except ConfigError:
                    return float("nan")  # the workers keep the last certificate that loaded

            expiry.source = expires_at

        tokens = TokenExpiry(f"{PREFIX}_token_expiry_timestamp_seconds")
        tokens_path = self._config.tokens
        if tokens_path is not None:
            tokens.source = lambda: read_token_expiries(tokens_path)

        async def scrape() -> bytes:
            return await asyncio.to_thread(
                multiprocess_exposition, self._metrics_dir, processes, expiry, tokens
            )

        return create_admin_app(not_ready, scrape)


def supervise(config: Config, config_path: Path | None) -> int:
    """Run `config.workers` workers until SIGTERM; the exit status for the command."""
    listener = bind_listener(config.listen)
    metrics_dir = tempfile.mkdtemp(prefix="registry-proxy-metrics.")
    log.info("workers' metrics in %s (removed on exit)", metrics_dir)
    try:
        return asyncio.run(Supervisor(config, config_path, listener, metrics_dir).run())
    finally:
        listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
