"""Upstream behaviour the real registry cannot be made to produce, from small fake upstreams.

Each fake is a raw asyncio server in the test's loop, so the test controls every byte; the proxy
is the real one, started as a process.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import struct
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from yarl import URL

from proxy.relay.forward import create_session
from tests.support import Proxy, basic_auth, fake_upstream, free_port


async def read_request(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    """The request line and headers (the body, if any, is left unread)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [
        (n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:] if line)
    ]
    return lines[0], headers


# How long a client may wait to see a broken-off transfer cut (keepalive_timeout is 75 s).
CUT_DEADLINE = 10


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# Every relay behaviour holds on the blob fast path and on the normal relay.
BOTH_RELAYS = pytest.mark.parametrize("fast", ["true", "false"], ids=["fast", "normal"])


def auth_header(users: dict[str, str]) -> dict[str, str]:
    return basic_auth("alice", users["alice"])


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@BOTH_RELAYS
async def test_redirect_to_object_storage_is_passed_untouched_and_not_followed(
    start_proxy: Callable[..., Proxy],
    users: dict[str, str],
    client: aiohttp.ClientSession,
    fast: str,
) -> None:
    storage = "https://bucket.s3.example.com/docker/blobs/data?X-Amz-Signature=abc%2Fdef&X-Amz-Expires=1200"
    requests: list[str] = []

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _ = await read_request(reader)
        requests.append(line)
        writer.write(
            f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {storage}\r\n"
            "Docker-Distribution-Api-Version: registry/2.0\r\nContent-Length: 0\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()

    async with fake_upstream(redirect) as upstream:
        proxy = start_proxy(upstream, PROXY_FAST_BLOB_RELAY=fast)
        async with client.get(
            proxy.url + "/v2/r/blobs/sha256:" + "a" * 64,
            headers=auth_header(users),
            allow_redirects=False,
        ) as response:
            assert response.status == 307
            assert response.headers["Location"] == storage
    # Only the proxy's own readiness probes (GET /v2/) besides the one forwarded request.
    forwarded = [line for line in requests if line != "GET /v2/ HTTP/1.1"]
    assert forwarded == ["GET /v2/r/blobs/sha256:" + "a" * 64 + " HTTP/1.1"]


@BOTH_RELAYS
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_reset_mid_body_aborts_the_client_response(
    start_proxy: Callable[..., Proxy],
    users: dict[str, str],
    client: aiohttp.ClientSession,
    framing: str,
    fast: str,
) -> None:
    """Guards: a reset upstream cuts the client's connection at once. Ending the response
    instead (or leaving it open until keep-alive expires, 75 s) would make a truncated blob look
    complete or hang the client; the wait is bounded well below keepalive_timeout."""
    sent_part = b"x" * 100_000

    async def break_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if framing == "chunked":
            head = "Transfer-Encoding: chunked\r\n\r\n"
            body = f"{len(sent_part):x}\r\n".encode() + sent_part + b"\r\n"
        else:
            head = "Content-Length: 10000000\r\n\r\n"
            body = sent_part
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + head.encode() + body
        )
        await writer.drain()
        reset(writer)

    async with fake_upstream(break_off) as upstream:
        proxy = start_proxy(upstream, PROXY_FAST_BLOB_RELAY=fast)
        async with client.get(
            proxy.url + "/v2/r/blobs/sha256:" + "b" * 64, headers=auth_header(users)
        ) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(CUT_DEADLINE):
                    await response.read()
    assert "mid-body" in proxy.log()


@BOTH_RELAYS
@pytest.mark.parametrize("path", ["/v2/", "/v2/r/blobs/sha256:" + "c" * 64])
async def test_silent_upstream_is_a_504_json(
    start_proxy: Callable[..., Proxy],
    users: dict[str, str],
    client: aiohttp.ClientSession,
    path: str,
    fast: str,
) -> None:
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await release.wait()
        writer.close()

    async with fake_upstream(silent) as upstream:
        proxy = start_proxy(upstream, PROXY_READ_TIMEOUT="0.5", PROXY_FAST_BLOB_RELAY=fast)
        async with client.get(proxy.url + path, headers=auth_header(users)) as response:
            assert response.status == 504
            body = await response.json()
        release.set()
    assert body["errors"][0]["code"] == "UNAVAILABLE"


@BOTH_RELAYS
@pytest.mark.parametrize("path", ["/v2/", "/v2/r/blobs/sha256:" + "d" * 64])
@pytest.mark.parametrize("upstream", ["refused", "unresolvable"])
async def test_unreachable_upstream_is_a_fast_502_json(
    start_proxy: Callable[..., Proxy],
    users: dict[str, str],
    client: aiohttp.ClientSession,
    upstream: str,
    path: str,
    fast: str,
) -> None:
    """Guards: an unreachable upstream is one 502, not tried again by the other relay."""
    url = (
        f"http://127.0.0.1:{free_port()}"
        if upstream == "refused"
        else "http://registry.invalid:5000"
    )
    proxy = start_proxy(url, PROXY_FAST_BLOB_RELAY=fast)
    async with client.get(proxy.url + path, headers=auth_header(users)) as response:
        assert response.status == 502
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        body = await response.json()
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert proxy.log().count("unreachable") == 1, proxy.log()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer with the request line and headers as JSON, plus headers a proxy must filter."""
    while True:
        line, headers = await read_request(reader)
        body = json.dumps({"line": line, "headers": headers}).encode()
        port = writer.get_extra_info("sockname")[1]
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Connection: keep-alive, X-Upstream-Private\r\nX-Upstream-Private: 1\r\n"
            b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic realm=upstream\r\n"
            b"Location: http://127.0.0.1:"
            + str(port).encode()
            + b"/v2/r/blobs/uploads/u?_state=s%3D\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()


async def test_headers_are_filtered_both_ways_and_set_by_the_proxy(
    start_proxy: Callable[..., Proxy], users: dict[str, str], client: aiohttp.ClientSession
) -> None:
    target = "/v2/team/app/blobs/uploads/1f2e?_state=ab%2Bcd%3D%3D&digest=sha256%3Aabc&x=%7E~"
    async with fake_upstream(echo) as upstream:
        proxy = start_proxy(upstream)
        sent = {
            **auth_header(users),
            "Host": f"docker.acme.test:{proxy.port}",
            "Forwarded": "for=6.6.6.6;proto=https;host=evil.test",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "evil.test",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Port": "443",
            "X-Real-IP": "6.6.6.6",
            "Connection": "keep-alive, X-Client-Private",
            "X-Client-Private": "secret",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "TE": "trailers",
            "User-Agent": "docker/28.2.2",
            "Accept": "application/vnd.oci.image.manifest.v1+json",
        }
        async with client.get(
            URL(proxy.url + target, encoded=True),
            headers=sent,
            skip_auto_headers=["Accept-Encoding"],
        ) as response:
            assert response.status == 200
            seen = await response.json()
            returned = response.headers
    headers: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        headers.setdefault(name.lower(), []).append(value)

    assert seen["line"] == f"GET {target} HTTP/1.1"
    assert headers["host"] == [f"docker.acme.test:{proxy.port}"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    dropped = ["authorization", "forwarded", "x-forwarded-host", "x-forwarded-port"]
    dropped += ["x-real-ip", "x-client-private", "proxy-authorization", "te"]
    assert not [name for name in dropped if name in headers]
    assert headers["user-agent"] == ["docker/28.2.2"]
    assert headers["accept"] == ["application/vnd.oci.image.manifest.v1+json"]
    assert users["alice"] not in json.dumps(seen)

    assert "X-Upstream-Private" not in returned
    assert "Proxy-Authenticate" not in returned
    assert "Keep-Alive" not in returned
    # The upstream named itself in Location; the client is sent to the proxy instead.
    assert (
        returned["Location"]
        == f"http://docker.acme.test:{proxy.port}/v2/r/blobs/uploads/u?_state=s%3D"
    )


async def test_compressed_bodies_pass_byte_for_byte(
    start_proxy: Callable[..., Proxy], users: dict[str, str], client: aiohttp.ClientSession
) -> None:
    payload = gzip.compress(b"layer" * 10000)
    received: list[bytes] = []

    async def gzip_both_ways(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers = await read_request(reader)
        length = int(dict((n.lower(), v) for n, v in headers)["content-length"])
        received.append(await reader.readexactly(length))
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Encoding: gzip\r\nContent-Length: "
            + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )  # fmt: skip
        await writer.drain()
        writer.close()

    async with fake_upstream(gzip_both_ways) as upstream:
        proxy = start_proxy(upstream)
        async with client.put(
            proxy.url + "/v2/r/blobs/uploads/u?digest=sha256%3Aa",
            data=payload,
            headers={**auth_header(users), "Content-Encoding": "gzip"},
        ) as response:
            assert response.status == 201
            assert response.headers["Content-Encoding"] == "gzip"
            assert await response.read() == payload
    assert received == [payload]


async def test_client_disconnect_mid_upload_aborts_the_upstream_request(
    start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    loop = asyncio.get_running_loop()
    streaming: asyncio.Future[None] = loop.create_future()
    outcome: asyncio.Future[str] = loop.create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.readexactly(100_000)
        streaming.set_result(None)
        try:
            await reader.readexactly(10_000_000 - 100_000)
        except asyncio.IncompleteReadError:
            outcome.set_result("aborted")
        else:
            outcome.set_result("complete")
        writer.close()

    async with fake_upstream(sink) as upstream:
        proxy = start_proxy(upstream)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        token = auth_header(users)["Authorization"]
        writer.write(
            f"PUT /v2/r/blobs/uploads/u?digest=sha256%3Aa HTTP/1.1\r\nHost: {proxy.host}\r\n"
            f"Authorization: {token}\r\nContent-Length: 10000000\r\n\r\n".encode()
            + b"y" * 500_000
        )
        await writer.drain()
        # Cut the client only once the body is flowing upstream.
        await asyncio.wait_for(streaming, 10)
        writer.transport.abort()
        assert await asyncio.wait_for(outcome, 10) == "aborted"

        # The proxy keeps serving.
        async with aiohttp.ClientSession() as session, session.get(proxy.url + "/v2/") as response:
            assert response.status == 401


async def test_upstream_session_has_no_total_deadline() -> None:
    # Defence for multi-GB transfers: aiohttp's default ClientTimeout(total=300) would cut any
    # transfer longer than 5 minutes; only connect and per-read idleness are bounded.
    session = create_session(connections=4, connect_timeout=3, read_timeout=7)
    try:
        assert session.timeout.total is None
        assert session.timeout.connect == 3
        assert session.timeout.sock_read == 7
        assert session.auto_decompress is False
    finally:
        await session.close()
