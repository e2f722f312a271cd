"""One worker process of `workers: N`: serves the listening socket its supervisor bound.

Started by proxy/workers.py as `python -m proxy.worker`; it reads the configuration and the
htpasswd file itself, like a single process does, and reports on the status pipe:
`started` once it serves (its signal handlers are in place then), `ready` and `unready` as
its /readyz state changes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from proxy.app import METRICS, STATE
from proxy.auth.htpasswd_file import HtpasswdError, load_htpasswd
from proxy.config import ConfigError, load_config
from proxy.log import setup_logging
from proxy.server import run

log = logging.getLogger("registry_proxy.worker")

# Exit status for configuration that cannot be used: the supervisor gives up at once.
EXIT_CONFIG = 2
# How often readiness and the event loop's task count are looked at.
REPORT_INTERVAL = 0.1


class StatusReporter:
    """Writes `started`, `ready` and `unready` lines to the supervisor's pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._parent = os.getppid()
        self._task: asyncio.Task[None] | None = None

    def start(self, app: web.Application) -> None:
        self._task = asyncio.create_task(self._report(app))

    def _send(self, message: str) -> None:
        try:
            os.write(self._fd, message.encode() + b"\n")
        except BrokenPipeError:
            self._orphaned()

    def _orphaned(self) -> None:
        log.error("the supervisor is gone: draining and stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    async def _report(self, app: web.Application) -> None:
        state, metrics = app[STATE], app[METRICS]
        self._send("started")
        ready: bool | None = None
        while True:
            if state.ready != ready:
                ready = state.ready
                self._send("ready" if ready else "unready")
            # The supervisor serves /metrics, so this process sets the gauge by itself.
            metrics.tasks.set(len(asyncio.all_tasks()))
            if os.getppid() != self._parent:
                self._orphaned()
                return
            await asyncio.sleep(REPORT_INTERVAL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="registry-proxy worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--throttle-fd", type=int, default=None)
    parser.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    config_path = Path(args.config) if args.config else None
    try:
        config = load_config(config_path)
        users = load_htpasswd(config.htpasswd)
    except (ConfigError, HtpasswdError) as exc:
        print(f"registry-proxy: worker {args.index}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level, config.log_format, worker=args.index)
    listener = socket.socket(fileno=args.listen_fd)
    reporter = StatusReporter(args.status_fd)
    store = socket.socket(fileno=args.throttle_fd) if args.throttle_fd is not None else None
    try:
        run(config, users, config_path, listener=listener, on_serving=reporter.start,
            host_store=store)  # fmt: skip
    except ConfigError as exc:
        print(f"registry-proxy: worker {args.index}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
