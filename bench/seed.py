"""Fill a real registry with many repositories and one repository with many tags, fast.

Everything goes through the registry API, so any registry version stores it its own way. One
small image (config + layer) is uploaded once; every other repository gets it by two
cross-repository mounts (`POST .../blobs/uploads/?mount=&from=`, one request each, nothing is
copied) and one manifest PUT: three requests per repository, sent concurrently on keep-alive
connections. The tagged repository's tags each point to their own image (their own config blob,
with its own created time and labels) so that a tag page reads distinct config blobs.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urljoin

import aiohttp

from bench.client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, BenchError

# Requests in flight while seeding (the registry writes small files for each).
CONCURRENCY = 16


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer() -> bytes:
    """A gzipped tar holding one small file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"hello from the registry browser benchmark\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0)


def config_for(layer: bytes, number: int) -> bytes:
    """An image config with a created time and a few labels, distinct per `number`."""
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": f"2026-{1 + number % 12:02d}-{1 + number % 28:02d}T12:00:{number % 60:02d}Z",
            "config": {
                "Cmd": ["/bin/true"],
                "Labels": {"org.opencontainers.image.version": f"1.{number}", "team": "bench"},
            },
            "rootfs": {"type": "layers", "diff_ids": [digest_of(gzip.decompress(layer))]},
        }
    ).encode()


def manifest_for(config: bytes, layer: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": len(layer)}],
            "annotations": {"org.opencontainers.image.description": "benchmark image"},
        }
    ).encode()


class Seeder:
    """API calls to one registry on a pool of keep-alive connections."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self._session = session
        self._base = base

    async def _expect(self, method: str, path: str, status: int, **kwargs: object) -> str:
        url = path if path.startswith("http") else self._base + path
        async with self._session.request(method, url, **kwargs) as response:  # type: ignore[arg-type]
            body = await response.read()
            if response.status != status:
                raise BenchError(f"{method} {path}: {response.status} {body[:200]!r}")
            return response.headers.get("Location", "")

    async def upload(self, repository: str, data: bytes) -> None:
        location = await self._expect("POST", f"/v2/{repository}/blobs/uploads/", 202)
        url = urljoin(self._base + "/", location)
        url += ("&" if "?" in url else "?") + "digest=" + quote(digest_of(data), safe="")
        headers = {"Content-Type": "application/octet-stream"}
        await self._expect("PUT", url, 201, data=data, headers=headers)

    async def mount(self, repository: str, digest: str, source: str) -> None:
        query = f"mount={quote(digest, safe='')}&from={quote(source, safe='')}"
        await self._expect("POST", f"/v2/{repository}/blobs/uploads/?{query}", 201)

    async def put_manifest(self, repository: str, tag: str, manifest: bytes) -> None:
        headers = {"Content-Type": OCI_MANIFEST}
        await self._expect(
            "PUT", f"/v2/{repository}/manifests/{tag}", 201, data=manifest, headers=headers
        )


async def _bounded(calls: list[Callable[[], Awaitable[None]]]) -> None:
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def run(call: Callable[[], Awaitable[None]]) -> None:
        async with semaphore:
            await call()

    await asyncio.gather(*(run(call) for call in calls))


async def seed(base: str, repositories: list[str], tagged: str, tags: list[str]) -> None:
    """Push one image to every repository of `repositories` (tag `latest`), and an image of its
    own under each of `tags` to `tagged`."""
    layer = _layer()
    config = config_for(layer, 0)
    manifest = manifest_for(config, layer)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        seeder = Seeder(session, base)
        first = repositories[0]
        await seeder.upload(first, layer)
        await seeder.upload(first, config)
        await seeder.put_manifest(first, "latest", manifest)

        def repository(name: str) -> Callable[[], Awaitable[None]]:
            async def push() -> None:
                await seeder.mount(name, digest_of(layer), first)
                await seeder.mount(name, digest_of(config), first)
                await seeder.put_manifest(name, "latest", manifest)

            return push

        await _bounded([repository(name) for name in repositories[1:]])
        await seeder.mount(tagged, digest_of(layer), first)

        def tag(number: int, name: str) -> Callable[[], Awaitable[None]]:
            async def push() -> None:
                own = config_for(layer, number + 1)
                await seeder.upload(tagged, own)
                await seeder.put_manifest(tagged, name, manifest_for(own, layer))

            return push

        await _bounded([tag(number, name) for number, name in enumerate(tags)])
