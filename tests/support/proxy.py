"""registry-proxy as a child process, and what its log and /proc say about it."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.harness import Process, free_port, http_status
from tests.support.polling import wait_until

# Short-lived cached logins, so each login runs a real password check.
NO_CACHE = {"PROXY_AUTH_CACHE_TTL": "0.001"}


@dataclass
class Proxy:
    """registry-proxy started through its real console entry point."""

    workdir: Path
    upstream: str
    htpasswd: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if "PROXY_TLS_CERT" in self.extra_env else "http"
        return f"{scheme}://{self.host}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
        env.update(
            PROXY_LISTEN=self.host,
            PROXY_ADMIN_LISTEN=f"127.0.0.1:{self.admin_port}",
            PROXY_UPSTREAM=self.upstream,
            PROXY_HTPASSWD=str(self.htpasswd),
            PROXY_LOG_LEVEL="info",
        )
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = Process(
            [sys.executable, "-m", "proxy", "serve"],
            self.workdir / f"proxy-{self.port}.log",
            env=self.environment(),
        )
        self.process.start()
        assert self.process.popen is not None
        popen = self.process.popen

        def admin_answers() -> bool:
            if popen.poll() is not None:
                raise AssertionError(f"proxy exited {popen.returncode}:\n{self.log()}")
            return http_status(self.admin_url + "/healthz") == 200

        wait_until(admin_answers, "the proxy to start")

    def log(self) -> str:
        assert self.process is not None
        return self.process.log()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def access_records(log: str) -> list[dict[str, object]]:
    """The access log records in a proxy's combined output (its stderr lines are not JSON)."""
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def worker_pids(proxy: Proxy) -> dict[int, int]:
    """Worker index -> pid of the latest process started in that slot, from the parent's log."""
    return {
        int(index): int(pid)
        for index, pid in re.findall(r"worker (\d+) started: pid (\d+)", proxy.log())
    }


def serving(proxy: Proxy) -> int:
    """How many workers told the parent they serve (their signal handlers are set by then);
    the parent's log in text or in JSON (`log_format`)."""
    pattern = r'workers(?::|","message":") ?worker \d+ \(pid \d+\) serves'
    return len(re.findall(pattern, proxy.log()))


def rss(proxy: Proxy) -> int:
    """The resident memory of the proxy's (parent) process, in bytes."""
    assert proxy.process is not None and proxy.process.popen is not None
    status = Path(f"/proc/{proxy.process.popen.pid}/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
        * 1024
    )
