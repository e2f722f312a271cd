"""Test helpers: real processes on loopback ports, and generated OCI images."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import ssl
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import (
    REGISTRY_BIN,
    STARTUP_DEADLINE,
    Process,
    Registry,
    basic_auth,
    free_port,
    htpasswd,
    http_status,
    sha256,
    wait_until,
)

# Re-exported: tests import them from here.
__all__ = [
    "REGISTRY_BIN",
    "REGISTRY_BINARY",
    "STARTUP_DEADLINE",
    "Process",
    "Registry",
    "basic_auth",
    "free_port",
    "htpasswd",
    "http_status",
    "sha256",
    "wait_until",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

# The process and registry helpers live in tests/harness.py, shared with bench/.
REGISTRY_BINARY = REGISTRY_BIN


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


def access_records(log: str) -> list[dict[str, object]]:
    """The access log records in a proxy's combined output (its stderr lines are not JSON)."""
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


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
    digest = sha256(blob)
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
    """Push what a client pushes (config, one layer, an OCI manifest tagged `tag`); return the
    manifest's digest. Registry v3 lists a repository in its catalog only once it has a manifest.
    """
    layer = _tar_gz({"repository.txt": repo.encode()})
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [
            sha256(gzip.decompress(layer))]}}
    ).encode()  # fmt: skip
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": push_blob(base, repo, config, headers),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": push_blob(base, repo, layer, headers),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    put_headers = {**(headers or {}), "Content-Type": OCI_MANIFEST}
    status, _, body = call(f"{base}/v2/{repo}/manifests/{tag}", "PUT", put_headers, manifest)
    assert status == 201, body
    return sha256(manifest)


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


_sha256 = sha256


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
