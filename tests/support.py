"""Test helpers: real processes on loopback ports, and generated OCI images."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
STARTUP_DEADLINE = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], bool], what: str, deadline: float = STARTUP_DEADLINE
) -> None:
    """Poll `condition` until it holds; fail the test naming `what` after `deadline` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {deadline}s waiting for {what}")


async def eventually(
    condition: Callable[[], bool], what: str, deadline: float = STARTUP_DEADLINE
) -> None:
    """`wait_until` for async tests: polls without blocking the event loop (and fake upstreams)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {deadline}s waiting for {what}")


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


def call(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request: status, headers and body, whatever the status."""
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}), data=data)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def push_blob(base: str, repo: str, blob: bytes, headers: Mapping[str, str] | None = None) -> str:
    """Upload a blob as containerd does (POST, then one monolithic PUT); return its digest."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    status, reply, body = call(f"{base}/v2/{repo}/blobs/uploads/", "POST", headers)
    assert status == 202, body
    location = reply["Location"] + "&digest=" + digest.replace(":", "%3A")
    put_headers = {**(headers or {}), "Content-Type": "application/octet-stream"}
    status, _, body = call(location, "PUT", put_headers, blob)
    assert status == 201, body
    return digest


def push_image(
    base: str, repo: str, tag: str = "v1", headers: Mapping[str, str] | None = None
) -> str:
    """Push a one-layer OCI image as a client does (blobs, then the manifest); return its digest.

    Registry v3 lists only repositories with a manifest in its catalog, so seed with this.
    """
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                         "diff_ids": []}}).encode()  # fmt: skip
    layer = gzip.compress(repo.encode(), mtime=0)
    descriptors = [
        {"mediaType": media_type, "digest": push_blob(base, repo, data, headers), "size": len(data)}
        for media_type, data in (
            ("application/vnd.oci.image.config.v1+json", config),
            ("application/vnd.oci.image.layer.v1.tar+gzip", layer),
        )
    ]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptors[0],
            "layers": descriptors[1:],
        }
    ).encode()
    put_headers = {**(headers or {}), "Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    status, _, body = call(f"{base}/v2/{repo}/manifests/{tag}", "PUT", put_headers, manifest)
    assert status == 201, body
    return _sha256(manifest)


@dataclass
class Process:
    """A background process whose combined output goes to a log file."""

    args: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


@dataclass
class Registry:
    """The real distribution registry (Debian's `docker-registry`) on a loopback port."""

    root: Path
    port: int = field(default_factory=free_port)
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
  level: info
  accesslog:
    disabled: false
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
        self.process = Process([REGISTRY_BINARY, "serve", str(config)], self.root / "registry.log")
        self.process.start()
        wait_until(lambda: http_status(self.url + "/v2/") == 200, "the registry to answer /v2/")

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


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def fake_upstream(behaviour: Behaviour) -> AsyncIterator[str]:
    """Serve `behaviour` for each connection; yield the upstream URL; close everything after."""
    connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections[task] = writer
        try:
            await behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in connections.values():
            writer.close()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


# --- OCI images built from bytes, so no test needs a network or a Docker engine.


def _tar_gz(files: Mapping[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_oci_layout(directory: Path, tag: str, layers: list[Mapping[str, bytes]]) -> list[str]:
    """Write an OCI image layout with one image of the given layers; return the layer digests."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = _sha256(data)
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    layer_descriptors: list[dict[str, str | int]] = []
    diff_ids = []
    for files in layers:
        compressed = _tar_gz(files)
        uncompressed = gzip.decompress(compressed)
        layer_descriptors.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": put(compressed),
                "size": len(compressed),
            }
        )
        diff_ids.append(_sha256(uncompressed))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": layer_descriptors,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return [str(d["digest"]) for d in layer_descriptors]
