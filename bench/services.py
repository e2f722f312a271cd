"""The three servers under test, each a child process on free loopback ports in a temp dir.

The process, registry, polling and port helpers are the test suite's (tests/support/harness.py,
tests/support/polling.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.support.harness import REGISTRY_BIN, Process, free_port, http_status
from tests.support.polling import wait_until

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
NGINX_TEMPLATE = BENCH_DIR / "nginx.conf.template"
REGISTRY_BINARY = REGISTRY_BIN
NGINX_BINARY = shutil.which("nginx") or "/usr/sbin/nginx"


def render_nginx_conf(
    template: str, *, root: Path, port: int, upstream_port: int, htpasswd: Path, workers: int | str
) -> str:
    """The recipe's server block with this run's ports, paths and (as root) worker user."""
    user_line = "user root;" if os.geteuid() == 0 else ""
    values = {
        "@USER_LINE@": user_line,
        "@WORKERS@": str(workers),
        "@ROOT@": str(root),
        "@PORT@": str(port),
        "@UPSTREAM_PORT@": str(upstream_port),
        "@HTPASSWD@": str(htpasswd),
    }
    text = template
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    leftover = [word for word in text.split() if word.startswith("@") and word.endswith("@")]
    if leftover:
        raise RuntimeError(f"unfilled placeholders in {NGINX_TEMPLATE}: {leftover}")
    return text


class Nginx:
    """nginx as distribution's "authenticate proxy with nginx" recipe, a non-daemon child."""

    def __init__(
        self,
        root: Path,
        upstream_port: int,
        htpasswd: Path,
        workers: int | str = 1,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        # `tls`: (certificate, key) for `listen ... ssl` (bench/scaling.py's --tls rows).
        self.tls = tls
        self.root = root
        self.port = free_port()
        self.upstream_port = upstream_port
        self.htpasswd = htpasswd
        self.workers = workers
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The worker processes (children of the master)."""
        assert self.process is not None
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.root / "temp" / sub).mkdir(parents=True, exist_ok=True)
        conf = self.root / "nginx.conf"
        conf.write_text(
            render_nginx_conf(
                NGINX_TEMPLATE.read_text(),
                root=self.root,
                port=self.port,
                upstream_port=self.upstream_port,
                htpasswd=self.htpasswd,
                workers=self.workers,
            )
        )
        if self.tls is not None:
            cert, key = self.tls
            listen = f"listen 127.0.0.1:{self.port};"
            conf.write_text(
                conf.read_text().replace(
                    listen,
                    f"listen 127.0.0.1:{self.port} ssl;\n    ssl_certificate {cert};\n"
                    f"    ssl_certificate_key {key};",
                )
            )
        test = subprocess.run(
            [NGINX_BINARY, "-t", "-p", str(self.root), "-c", str(conf)],
            capture_output=True,
            text=True,
            check=False,
        )
        if test.returncode != 0:
            raise RuntimeError(f"nginx rejected {conf}:\n{test.stderr}")
        self.process = Process(
            [NGINX_BINARY, "-p", str(self.root), "-c", str(conf)],
            self.root / "nginx.log",
        )
        self.process.start()
        process = self.process

        def answers() -> bool:
            process.check_alive()
            return http_status(self.url + "/v2/") == 401

        wait_until(answers, "nginx to answer /v2/")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def proxy_snapshot(rev: str, into: Path) -> Path:
    """Extract the `proxy` package as committed at `rev`, so the benchmark runs code that the
    working tree's edits in progress cannot change under it."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO_DIR), "archive", "--format=tar", rev, "proxy"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {rev} proxy: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def proxy_source_info(rev: str | None) -> dict[str, object]:
    """Which proxy code ran: a commit, or the working tree and whether proxy/ had edits."""

    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, check=False
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""

    if rev is not None:
        return {"source": "git", "rev": rev, "commit": git("rev-parse", f"{rev}^{{commit}}")}
    return {
        "source": "working tree",
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes_in_proxy": bool(git("status", "--porcelain", "--", "proxy")),
    }


class Proxy:
    """registry-proxy started as `python -m proxy serve`, configured by environment."""

    def __init__(
        self,
        root: Path,
        upstream: str,
        htpasswd: Path,
        *,
        source: Path = REPO_DIR,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        # Extra PROXY_* settings (PROXY_WORKERS, PROXY_TLS_CERT, ...).
        self.extra_env = dict(env or {})
        self.upstream = upstream
        self.htpasswd = htpasswd
        # `python -m proxy` imports the `proxy` package from the directory it starts in.
        self.source = source
        self.python = python or sys.executable
        self.port = free_port()
        self.admin_port = free_port()
        self.process: Process | None = None

    @property
    def url(self) -> str:
        scheme = "https" if "PROXY_TLS_CERT" in self.extra_env else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """With `workers` above 1, the worker processes (children of the supervisor)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
        env.update(
            PROXY_LISTEN=f"127.0.0.1:{self.port}",
            PROXY_ADMIN_LISTEN=f"127.0.0.1:{self.admin_port}",
            PROXY_UPSTREAM=self.upstream,
            PROXY_HTPASSWD=str(self.htpasswd),
        )
        env.update(self.extra_env)
        self.process = Process(
            [self.python, "-m", "proxy", "serve"],
            self.root / "proxy.log",
            env=env,
            cwd=self.source,
        )
        self.process.start()
        process = self.process

        def answers() -> bool:
            process.check_alive()
            return http_status(f"http://127.0.0.1:{self.admin_port}/healthz") == 200

        wait_until(answers, "the proxy's /healthz")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
