"""The browser against stand-ins for what the test registry cannot do: a blob redirected to
object storage (S3, GCS), as the registry answers with such storage, and a registry that holds
its answer while the proxy is told to stop."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.access.rules import AccessPolicy
from proxy.access.tag_guard import TagGuard
from proxy.gate import AccessControl
from proxy.identity import Identity
from proxy.ui.registry import Acting, Registry
from tests.support import Proxy, eventually, fake_upstream, signed_in

CONFIG = json.dumps({"created": "2026-01-02T03:04:05Z", "os": "linux", "architecture": "s390x"})
CONFIG_DIGEST = "sha256:" + "c" * 64
MANIFEST = json.dumps(
    {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": CONFIG_DIGEST, "size": len(CONFIG)},
        "layers": [],
    }
)


@pytest.fixture
async def storage() -> AsyncIterator[tuple[TestServer, list[dict[str, str]]]]:
    """Object storage: answers any GET with the config, and records the headers it got."""
    seen: list[dict[str, str]] = []

    async def blob(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(body=CONFIG.encode())

    app = web.Application()
    app.router.add_get("/{tail:.*}", blob)
    server = TestServer(app)
    await server.start_server()
    yield server, seen
    await server.close()


@pytest.fixture
async def registry(storage: tuple[TestServer, list[dict[str, str]]]) -> AsyncIterator[TestServer]:
    """A registry whose blobs live in `storage`: a manifest, and a 307 for the blob."""
    where = storage[0].make_url("/bucket/blob?X-Amz-Signature=abc")

    async def manifest(request: web.Request) -> web.Response:
        headers = {"Docker-Content-Digest": "sha256:" + "d" * 64}
        return web.Response(body=MANIFEST.encode(), headers=headers,
                            content_type="application/vnd.oci.image.manifest.v1+json")  # fmt: skip

    async def blob(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": str(where)})

    app = web.Application()
    app.router.add_get("/v2/team/app/manifests/v1", manifest)
    app.router.add_get(f"/v2/team/app/blobs/{CONFIG_DIGEST}", blob)
    server = TestServer(app)
    await server.start_server()
    yield server
    await server.close()


async def test_a_redirected_blob_is_fetched_without_our_headers(
    registry: TestServer, storage: tuple[TestServer, list[dict[str, str]]]
) -> None:
    """Guards the config blob fetched from object storage with the registry's Host and the
    client's address: a signed URL would refuse it, and storage learns who browses."""
    upstream = URL(str(registry.make_url("/")))
    async with aiohttp.ClientSession() as session:
        access = AccessControl(AccessPolicy(), read_only=False)
        reader = Registry(session, upstream, access, TagGuard(session, upstream, 5))
        who = Acting(Identity.user("alice"), "198.51.100.7", "https", "docker.example.com", "r1")
        manifest = await reader.manifest(who, "team/app", "v1")
    assert manifest.config.platform == "linux/s390x"
    [headers] = storage[1]
    assert headers["Host"] == f"{storage[0].host}:{storage[0].port}"
    assert "X-Forwarded-For" not in headers and "X-Request-Id" not in headers


async def test_a_page_in_progress_finishes_before_the_proxy_stops(
    start_proxy: Callable[..., Proxy], users: dict[str, str], key_file: Path
) -> None:
    """Guards the drain on SIGTERM forgetting the browser's pages: only API requests counted as
    in progress, so the drain waited for none (its log said 0, its deadline did not apply to
    them) while a page still waited for the registry."""
    asked, release = asyncio.Event(), asyncio.Event()

    async def registry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b" /v2/_catalog" in head.partition(b"\r\n")[0]:
                asked.set()
                await release.wait()
                body = b'{"repositories":["team/app"]}'
            else:
                body = b"{}"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            await writer.drain()

    async with fake_upstream(registry) as upstream:
        proxy = start_proxy(upstream, PROXY_UI="true", PROXY_UI_SESSION_KEY_FILE=str(key_file))
        browser = await asyncio.to_thread(signed_in, proxy, "alice", users["alice"])
        page = asyncio.create_task(asyncio.to_thread(browser.request, "/ui/"))
        await asyncio.wait_for(asked.wait(), 30)
        assert proxy.process is not None
        proxy.process.signal(signal.SIGTERM)
        try:
            await eventually(lambda: "stopped accepting" in proxy.log(), "the drain to start")
            await eventually(
                lambda: "for 1 requests in progress" in proxy.log(), "the drain's count", 10
            )
        finally:
            release.set()
        status, _, body = await page
        assert status == 200 and "team/app" in body
        assert await asyncio.to_thread(proxy.process.wait, 30) == 0
        assert "all requests finished" in proxy.log()
