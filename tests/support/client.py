"""Requests as the tests send them: urllib calls, image pushes, raw bytes and aiohttp sessions."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping

import aiohttp

from tests.support.harness import Registry, basic_auth, sha256
from tests.support.images import OCI_MANIFEST, tar_gz
from tests.support.proxy import Proxy


def token(user: str, password: str) -> str:
    """The `Authorization` header's value of HTTP Basic for these credentials."""
    return basic_auth(user, password)["Authorization"]


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
    config = {"architecture": "amd64", "os": "linux"}
    return push_manifest(base, repo, tag, headers, config, {"repository.txt": repo.encode()})


def push_manifest(
    base: str,
    repo: str,
    tag: str,
    headers: Mapping[str, str] | None,
    config: Mapping[str, object],
    files: Mapping[str, bytes],
    annotations: Mapping[str, str] | None = None,
) -> str:
    """Push an image of one layer holding `files`, its config `config` (with the layer's
    rootfs), and an OCI manifest tagged `tag` with `annotations`; the manifest's digest."""
    layer = tar_gz(files)
    rootfs = {"type": "layers", "diff_ids": [sha256(gzip.decompress(layer))]}
    config_blob = json.dumps({**config, "rootfs": rootfs}).encode()
    document: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": push_blob(base, repo, config_blob, headers),
            "size": len(config_blob),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": push_blob(base, repo, layer, headers),
                "size": len(layer),
            }
        ],
    }
    if annotations is not None:
        document["annotations"] = dict(annotations)
    manifest = json.dumps(document).encode()
    put_headers = {**(headers or {}), "Content-Type": OCI_MANIFEST}
    status, _, body = call(f"{base}/v2/{repo}/manifests/{tag}", "PUT", put_headers, manifest)
    assert status == 201, body
    return sha256(manifest)


def start_download(
    registry: Registry, proxy: Proxy, mib: int, auth: dict[str, str]
) -> tuple[socket.socket, str, bytes]:
    """Put a blob of `mib` MiB in the registry and begin its download through the proxy.

    Returns the socket, the digest and the first bytes read (the response head among them).
    """
    repo = f"drain/{uuid.uuid4().hex[:8]}"
    digest = push_blob(registry.url, repo, os.urandom(mib << 20))
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    sock.sendall(
        f"GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: {proxy.host}\r\n"
        f"Authorization: {auth['Authorization']}\r\n\r\n".encode()
    )
    received = sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock, digest, received


async def exchange_raw(proxy: Proxy, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes; return everything the proxy answers until it closes (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


def session_from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address`."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, local_addr=(address, 0), force_close=True)
    )


async def status_of(
    session: aiohttp.ClientSession, proxy: Proxy, user: str, password: str
) -> tuple[int, str | None]:
    """GET /v2/ with these credentials: the status and the Retry-After header, if any."""
    async with session.get(proxy.url + "/v2/", headers=basic_auth(user, password)) as response:
        await response.read()
        return response.status, response.headers.get("Retry-After")


async def start_stalled_download(
    proxy: Proxy, digest: str, headers: str, repository: str = "shares/app"
) -> tuple[int, asyncio.StreamWriter]:
    """A blob GET from a client that reads the head and then stops reading; its status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 16)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    target = f"/v2/{repository}/blobs/{digest}"
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {proxy.host}\r\n{headers}\r\n".encode())
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    return int(head.split(b" ")[1]), writer
