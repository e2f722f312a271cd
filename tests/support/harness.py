"""Child processes on loopback ports for the tests and the benchmark: the real registry, Redis.

`REGISTRY_BIN` names the registry binary to run (default: Debian's `docker-registry`), so the
suite and `bench/run` can be pointed at any distribution build (registry v3, say).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.polling import wait_until

REGISTRY_BIN = (
    os.environ.get("REGISTRY_BIN") or shutil.which("docker-registry") or "/usr/bin/docker-registry"
)
HTPASSWD_BIN = shutil.which("htpasswd") or "/usr/bin/htpasswd"
REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"


# Ports already handed out: the kernel may offer a just-released port again, and a proxy given
# the same port for `listen` and `admin_listen` refuses to start.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and no earlier call returned."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def http_status(url: str, headers: Mapping[str, str] | None = None) -> int | None:
    """Status of a GET, or None when nothing answers."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def basic_auth(user: str, password: str) -> dict[str, str]:
    """The `Authorization` header of HTTP Basic for these credentials."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def sha256(data: bytes) -> str:
    """The registry's digest of `data` (`sha256:<hex>`)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def htpasswd(path: Path, *flags: str, user: str, password: str) -> None:
    """Add or replace `user` in `path` with apache2-utils' `htpasswd` (creating the file)."""
    create = [] if path.exists() else ["-c"]
    subprocess.run(
        [HTPASSWD_BIN, "-b", *create, *flags, str(path), user, password],
        check=True,
        capture_output=True,
    )


@dataclass
class Process:
    """A child process in its own session whose combined output goes to a log file."""

    args: list[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=None if self.env is None else dict(self.env),
                cwd=self.cwd,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        """Raise with the log's tail if the process has exited."""
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.args[0]} exited with {self.popen.returncode}:\n{self.log()[-3000:]}"
            )

    def signal(self, signum: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


@dataclass
class Registry:
    """The real distribution registry (`REGISTRY_BIN`) on a loopback port with its own storage.

    `quiet` turns its logs down so that it is never the benchmark's bottleneck; the tests keep
    the access records (`requested_uris`).
    """

    root: Path
    port: int = field(default_factory=free_port)
    quiet: bool = False
    # Extra environment for the registry, after the caller's REGISTRY_* variables are dropped.
    env: dict[str, str] = field(default_factory=dict)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            f"""version: 0.1
log:
  level: {"warn" if self.quiet else "info"}
  accesslog:
    disabled: {"true" if self.quiet else "false"}
storage:
  filesystem:
    rootdirectory: {self.root / "data"}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{self.port}
  secret: test-secret-shared-by-all-registry-replicas
"""
        )
        # REGISTRY_* variables override the registry's configuration (REGISTRY_BIN included).
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        # Registry v3 exports OpenTelemetry traces to localhost:4318 unless told not to.
        env["OTEL_TRACES_EXPORTER"] = "none"
        env.update(self.env)
        self.process = Process(
            [REGISTRY_BIN, "serve", str(config)], self.root / "registry.log", env
        )
        self.process.start()
        process = self.process

        def answers() -> bool:
            process.check_alive()
            return http_status(self.url + "/v2/") == 200

        wait_until(answers, "the registry to answer /v2/")

    def log(self) -> str:
        assert self.process is not None
        return self.process.log()

    def requested_uris(self) -> list[str]:
        """Request targets the registry logged (`http.request.uri=...`), in order."""
        uris = []
        for line in self.log().splitlines():
            marker = "http.request.uri="
            if marker in line:
                value = line.split(marker, 1)[1].split(" ", 1)[0]
                uris.append(value.strip('"'))
        return uris

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class RedisServer:
    """A real redis-server on a loopback port, without persistence: `kill` and `start` again
    give an empty database on the same port, as a restarted Redis without a volume does."""

    root: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        args = [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.root)]  # fmt: skip
        self.process = Process(args, self.root / "redis.log")
        self.process.start()
        process = self.process

        def answers() -> bool:
            process.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until(answers, "redis-server to answer PING")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.signal(signum)

    def kill(self) -> None:
        """SIGKILL: gone at once, with everything it held."""
        assert self.process is not None and self.process.popen is not None
        self.process.popen.kill()
        self.process.popen.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def unread_bytes(port: int) -> int:
    """Bytes in flight on loopback TCP connections to `port`: queued by the clients' kernels
    or received but not yet read by the server (/proc/net/tcp's tx_queue and rx_queue)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        tx_queue, rx_queue = (int(part, 16) for part in fields[4].split(":"))
        if local == port:
            total += rx_queue
        elif remote == port:
            total += tx_queue
    return total
