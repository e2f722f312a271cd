"""Immutable tags cover what they point to: an index's children, against the real registry."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.access.tag_guard import DELETE_LOOKUPS_MAX
from tests.support import (
    Proxy,
    Registry,
    basic_auth,
    call,
    fake_upstream,
    htpasswd,
    push_blob,
    sha256,
)

PASSWORD = "alice-secret"
CONFIG = """
immutable_tags:
  - {repositories: ["**"], tags: ["v*"]}
"""
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
AUTH = basic_auth("alice", PASSWORD)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Proxy]]:
    """A registry behind a proxy whose `v*` tags are immutable (alice may do everything)."""
    root = tmp_path_factory.mktemp("reach")
    registry = Registry(root / "registry")
    registry.start()
    passwd = root / "htpasswd"
    htpasswd(passwd, "-B", "-C", "4", user="alice", password=PASSWORD)
    config = root / "proxy.yml"
    config.write_text(CONFIG)
    proxy = Proxy(root / "proxy", registry.url, passwd, {"PROXY_CONFIG": str(config)})
    proxy.start()
    yield registry, proxy
    proxy.stop()
    registry.stop()


def push_platform(base: str, repo: str, arch: str) -> tuple[str, int]:
    """Push one platform's image by digest (as a client pushes an index's children)."""
    config = json.dumps({"architecture": arch, "os": "linux", "nonce": os.urandom(8).hex(),
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()  # fmt: skip
    layer = os.urandom(256)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": push_blob(base, repo, config, AUTH),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": push_blob(base, repo, layer, AUTH),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    digest = sha256(manifest)
    headers = {**AUTH, "Content-Type": OCI_MANIFEST}
    status, _, body = call(f"{base}/v2/{repo}/manifests/{digest}", "PUT", headers, manifest)
    assert status == 201, body
    return digest, len(manifest)


def index_of(children: dict[str, tuple[str, int]], media_type: str = OCI_MANIFEST) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": media_type,
                    "digest": digest,
                    "size": size,
                    "platform": {"architecture": arch, "os": "linux"},
                }
                for arch, (digest, size) in children.items()
            ],
        }
    ).encode()


def put(base: str, repo: str, reference: str, document: bytes, media_type: str) -> str:
    headers = {**AUTH, "Content-Type": media_type}
    status, _, body = call(f"{base}/v2/{repo}/manifests/{reference}", "PUT", headers, document)
    assert status == 201, body
    return sha256(document)


def pulls(registry: Registry, repo: str, reference: str) -> bool:
    return call(f"{registry.url}/v2/{repo}/manifests/{reference}", "GET", ACCEPT)[0] == 200


def test_a_child_of_an_immutable_index_cannot_be_deleted(
    guarded: tuple[Registry, Proxy],
) -> None:
    """Class: immutable tags that stop at the manifest they name: one DELETE of a child of the
    index `v1.0` points to broke `v1.0` on that platform."""
    registry, proxy = guarded
    repo = f"multi/app-{uuid.uuid4().hex[:6]}"
    children = {arch: push_platform(proxy.url, repo, arch) for arch in ("amd64", "arm64")}
    index = put(proxy.url, repo, "v1.0", index_of(children), OCI_INDEX)

    for arch, (child, _) in children.items():
        status, _, body = call(f"{proxy.url}/v2/{repo}/manifests/{child}", "DELETE", AUTH)
        assert status == 403, (arch, body)
        assert json.loads(body)["errors"][0]["code"] == "DENIED"
        assert b"v1.0" in body and child.encode() in body
        assert pulls(registry, repo, child), arch
    assert call(f"{proxy.url}/v2/{repo}/manifests/{index}", "DELETE", AUTH)[0] == 403
    assert pulls(registry, repo, "v1.0")

    unrelated, _ = push_platform(proxy.url, repo, "s390x")
    status, _, body = call(f"{proxy.url}/v2/{repo}/manifests/{unrelated}", "DELETE", AUTH)
    assert status == 202, body
    assert not pulls(registry, repo, unrelated)


def test_a_child_of_an_index_nested_in_an_immutable_index_cannot_be_deleted(
    guarded: tuple[Registry, Proxy],
) -> None:
    """Class: as above, one level deeper: an index listing an index that lists the manifest."""
    registry, proxy = guarded
    repo = f"multi/nested-{uuid.uuid4().hex[:6]}"
    leaf, size = push_platform(proxy.url, repo, "riscv64")
    inner_document = index_of({"riscv64": (leaf, size)})
    inner = put(proxy.url, repo, sha256(inner_document), inner_document, OCI_INDEX)
    outer = index_of({"riscv64": (inner, len(inner_document))}, media_type=OCI_INDEX)
    put(proxy.url, repo, "v2.0", outer, OCI_INDEX)

    for digest in (leaf, inner):
        status, _, body = call(f"{proxy.url}/v2/{repo}/manifests/{digest}", "DELETE", AUTH)
        assert status == 403, body
        assert pulls(registry, repo, digest)


def test_a_child_only_a_movable_tag_reaches_can_be_deleted(
    guarded: tuple[Registry, Proxy],
) -> None:
    """Guards against over-refusing: an index tagged `latest` protects nothing."""
    registry, proxy = guarded
    repo = f"multi/latest-{uuid.uuid4().hex[:6]}"
    children = {arch: push_platform(proxy.url, repo, arch) for arch in ("amd64", "arm64")}
    put(proxy.url, repo, "latest", index_of(children), OCI_INDEX)
    child = children["arm64"][0]
    status, _, body = call(f"{proxy.url}/v2/{repo}/manifests/{child}", "DELETE", AUTH)
    assert status == 202, body
    assert not pulls(registry, repo, child)


# --- Faults the real registry cannot be made to produce: the look-up fails, the delete is refused.

CHILD = "sha256:" + "c" * 64
INDEX = "sha256:" + "1" * 64
FAULTS = ["tags", "head", "index", "too-many"]
# One past the look-ups one delete may make: a second page of the tag list holds the last tag.
MANY = DELETE_LOOKUPS_MAX + 1


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_delete_is_refused_when_the_registry_cannot_say_what_is_protected(
    start_proxy: Callable[..., Proxy], users: dict[str, str], tmp_path: Path, fault: str
) -> None:
    """Class: a look-up that fails open: when the tag list, the tag's HEAD or the index it
    points to answers 500, or there are more immutable tags than one delete may read, the
    DELETE is refused with 503 and never forwarded."""
    seen: list[str] = []

    def answer(line: str) -> tuple[str, dict[str, str], bytes]:
        method, target, _ = line.split(" ", 2)
        if "/tags/list?n=1000" in target:
            if fault == "tags":
                return "500 Internal Server Error", {}, b'{"errors":[]}'
            if fault != "too-many":
                return "200 OK", {"Content-Type": "application/json"}, b'{"tags":["v1.0"]}'
            if "&last=" in target:
                return "200 OK", {}, json.dumps({"tags": [f"v{MANY - 1}"]}).encode()
            page = json.dumps({"tags": [f"v{n}" for n in range(MANY - 1)]}).encode()
            return "200 OK", {"Link": '</v2/multi/app/tags/list?n=1000&last=v>; rel="next"'}, page
        if fault == "too-many" and method == "HEAD":
            tag = target.rsplit("/", 1)[1]
            digest = "sha256:" + tag.encode().hex().ljust(64, "0")
            return "200 OK", {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest}, b""
        if target.endswith("/manifests/v1.0"):
            if fault == "head":
                return "500 Internal Server Error", {}, b""
            return "200 OK", {"Content-Type": OCI_INDEX, "Docker-Content-Digest": INDEX}, b""
        if target.endswith(f"/manifests/{INDEX}") and method == "GET":
            if fault == "index":
                return "500 Internal Server Error", {}, b'{"errors":[]}'
            return "200 OK", {"Content-Type": OCI_INDEX}, index_of({"amd64": (CHILD, 1)})
        return "202 Accepted", {}, b""

    async def registry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.decode("latin-1").split("\r\n", 1)[0]
            seen.append(line)
            status, headers, body = answer(line)
            fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            length = len(body) if not line.startswith("HEAD ") else 0
            writer.write(
                f"HTTP/1.1 {status}\r\n{fields}Content-Length: {length}\r\n\r\n".encode()
                + (body if length else b"")
            )
            await writer.drain()

    config = tmp_path / "proxy.yml"
    config.write_text(CONFIG)
    async with fake_upstream(registry) as upstream:
        proxy = start_proxy(upstream, PROXY_CONFIG=str(config))
        url = f"{proxy.url}/v2/multi/app/manifests/{CHILD}"
        auth = basic_auth("alice", users["alice"])
        status, _, body = await asyncio.to_thread(call, url, "DELETE", auth)
    assert status == 503, body
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert not [line for line in seen if line.startswith("DELETE ")], seen
    if fault == "too-many":
        assert len([line for line in seen if line.startswith("HEAD ")]) == DELETE_LOOKUPS_MAX
