"""The blob fast path (proxy/relay/blob.py): what it sends, when it gives way, what it counts.

Each behaviour is checked on both relays (`fast_blob_relay` true and false), against the real
registry where it can produce the case and a fake upstream where a fault must be injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import urllib.request
from collections.abc import Callable
from functools import partial

import pytest

from tests.support import Proxy, Registry, basic_auth, eventually, fake_upstream, push_blob, sha256

BOTH_RELAYS = pytest.mark.parametrize("fast", ["true", "false"], ids=["fast", "normal"])
BLOB = "/v2/r/blobs/sha256:" + "e" * 64
BIG = 2 * 1024 * 1024


def token(users: dict[str, str]) -> str:
    return basic_auth("alice", users["alice"])["Authorization"]


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
    """One response (or request) head as sent, and its headers by lower-cased name."""
    head = await reader.readuntil(b"\r\n\r\n")
    fields = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name:
            fields[name.strip().lower()] = value.strip()
    return head, fields


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response with a Content-Length: its head and its body."""
    head, fields = await read_head(reader)
    return head, await reader.readexactly(int(fields.get("content-length", "0")))


def access_record(proxy: Proxy, path: str) -> dict[str, object]:
    lines = [line for line in proxy.log().splitlines() if f'"path":"{path}"' in line]
    assert lines, proxy.log()
    return dict(json.loads(lines[-1][lines[-1].index("{") :]))


def sent_bytes(proxy: Proxy) -> float:
    with urllib.request.urlopen(proxy.admin_url + "/metrics") as response:
        text = response.read().decode()
    name = 'registry_proxy_sent_bytes_total{action="blob"}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_fast_path_sends_the_request_the_normal_relay_sends(
    start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards: the fast path's own request head (target, headers, their values) is the one
    the aiohttp relay sends, so the registry sees no difference; Accept: */* included."""
    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_head(reader)
            if not head.startswith(b"GET /v2/ "):
                heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"b" * BIG)
            await writer.drain()

    target = BLOB + "?x=%7E~&ns=a%2Fb"
    sent = (
        f"GET {target} HTTP/1.1\r\nHost: docker.acme.test:443\r\n"
        f"Authorization: {token(users)}\r\nUser-Agent: containerd/2.0\r\n"
        "X-Forwarded-For: 6.6.6.6\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n"
        "Accept-Encoding: gzip\r\nTE: trailers\r\n\r\n"
    ).encode()
    async with fake_upstream(record) as upstream:
        for fast in ("true", "false"):
            proxy = start_proxy(upstream, PROXY_FAST_BLOB_RELAY=fast)
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(sent)
            head, body = await read_response(reader)
            writer.close()
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert body == b"b" * BIG
    fast_head, normal_head = heads

    def fields(head: bytes) -> list[bytes]:
        # Each request has its own id: compare that there is one, not its value.
        lines = [
            b"X-Request-Id: <id>" if line.startswith(b"X-Request-Id: ") else line
            for line in head.split(b"\r\n")
        ]
        assert lines.count(b"X-Request-Id: <id>") == 1, head
        return sorted(lines)

    assert fast_head.split(b"\r\n", 1)[0] == f"GET {target} HTTP/1.1".encode()
    assert fields(fast_head) == fields(normal_head), (fast_head, normal_head)


# Answers the fast path does not copy raw; the client gets what the upstream sent, asked once.
NOT_PLAIN = {
    "redirect": b"HTTP/1.1 307 Temporary Redirect\r\nLocation: https://s3.test/x\r\n"
    b"Content-Length: 0\r\n\r\n",
    "json-error": b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
    b'Content-Length: 40\r\n\r\n{"errors":[{"code":"BLOB_UNKNOWN"}]}    ',
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n" % BIG
    + b"c" * BIG
    + b"\r\n0\r\n\r\n",
    "no-length": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"d" * BIG,
    "interim-1xx": b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"f" * BIG,
}
EXPECTED = {
    "redirect": (307, b""),
    "json-error": (404, NOT_PLAIN["json-error"].split(b"\r\n\r\n", 1)[1]),
    "chunked": (200, b"c" * BIG),
    "no-length": (200, b"d" * BIG),
    "interim-1xx": (200, b"f" * BIG),
}


@BOTH_RELAYS
@pytest.mark.parametrize("answer", sorted(NOT_PLAIN))
async def test_answers_other_than_a_plain_body_are_relayed_from_one_request(
    start_proxy: Callable[..., Proxy], users: dict[str, str], answer: str, fast: str
) -> None:
    """Guards: the fast path copies raw only a 200/206 with one Content-Length; anything else
    is relayed as the normal relay does, from the one request (it was asked again before)."""
    gets: list[bytes] = []

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_head(reader)
        if head.startswith(b"GET /v2/ "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return
        gets.append(head)
        writer.write(NOT_PLAIN[answer])
        await writer.drain()
        writer.close()

    async with fake_upstream(respond) as upstream:
        proxy = start_proxy(upstream, PROXY_FAST_BLOB_RELAY=fast)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(
            f"GET {BLOB} HTTP/1.1\r\nHost: {proxy.host}\r\n"
            f"Authorization: {token(users)}\r\n\r\n".encode()
        )
        head, fields = await read_head(reader)
        if "content-length" in fields:
            body = await reader.readexactly(int(fields["content-length"]))
        else:
            body = await read_chunked(reader)
        writer.close()
    status, expected_body = EXPECTED[answer]
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert body == expected_body
    assert len(gets) == 1


@BOTH_RELAYS
async def test_a_small_plain_body_is_fetched_once(
    start_proxy: Callable[..., Proxy], users: dict[str, str], fast: str
) -> None:
    """Guards: a small blob (a config blob) is relayed on the path that fetched it, not asked
    for again (a refetch measured twice the latency and CPU of the normal relay)."""
    gets: list[bytes] = []

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_head(reader)
            if not head.startswith(b"GET /v2/ "):
                gets.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")
            await writer.drain()

    async with fake_upstream(respond) as upstream:
        proxy = start_proxy(upstream, PROXY_FAST_BLOB_RELAY=fast)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(
            f"GET {BLOB} HTTP/1.1\r\nHost: {proxy.host}\r\n"
            f"Authorization: {token(users)}\r\n\r\n".encode()
        )
        head, body = await read_response(reader)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"small"
    assert len(gets) == 1


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    await reader.readuntil(b"\r\n")
    return body


@pytest.fixture(scope="module")
def big_blob(registry: Registry) -> tuple[str, bytes]:
    blob = os.urandom(5 * 1024 * 1024 + 123)
    return push_blob(registry.url, "fast/app", blob), blob


@BOTH_RELAYS
async def test_range_head_keepalive_and_pipelining_after_a_fast_path_body(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    users: dict[str, str],
    big_blob: tuple[str, bytes],
    fast: str,
) -> None:
    """Guards: after a blob body the client connection is intact for the next responses
    (pipelined requests answered in order), Range gives 206 with the right bytes, HEAD no body."""
    digest, blob = big_blob
    proxy = start_proxy(registry.url, PROXY_FAST_BLOB_RELAY=fast)
    auth = f"Host: {proxy.host}\r\nAuthorization: {token(users)}\r\n"
    path = f"/v2/fast/app/blobs/{digest}"
    last = len(blob) - 1
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        f"GET {path} HTTP/1.1\r\n{auth}\r\n"
        f"GET {path} HTTP/1.1\r\n{auth}Range: bytes=1000-{last}\r\n\r\n"
        f"HEAD {path} HTTP/1.1\r\n{auth}\r\n"
        f"GET /v2/ HTTP/1.1\r\n{auth}\r\n"
        f"GET {path} HTTP/1.1\r\n{auth}\r\n".encode()
    )
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200 ") and sha256(body) == digest
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 206 "), head
    assert f"Content-Range: bytes 1000-{last}/{len(blob)}".encode() in head
    assert body == blob[1000:]
    head, fields = await read_head(reader)
    assert head.startswith(b"HTTP/1.1 200 ") and fields["content-length"] == str(len(blob))
    assert fields["docker-content-digest"] == digest
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"{}"
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200 ") and sha256(body) == digest
    writer.close()


@BOTH_RELAYS
async def test_slow_reader_gets_every_byte_intact(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    users: dict[str, str],
    big_blob: tuple[str, bytes],
    fast: str,
) -> None:
    """Guards the reused read buffer: bytes the client transport still holds (Python 3.12+
    keeps a reference to what was written) must not be overwritten by the next read. A client
    with a small receive window that reads in bursts keeps data pending in the transport. On
    Python 3.11 the transport copies, so this fails only on 3.12+ with the bug."""
    digest, blob = big_blob
    proxy = start_proxy(registry.url, PROXY_FAST_BLOB_RELAY=fast)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 14)
    sock.connect(("127.0.0.1", proxy.port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(
        sock,
        f"GET /v2/fast/app/blobs/{digest} HTTP/1.1\r\nHost: {proxy.host}\r\n"
        f"Authorization: {token(users)}\r\nConnection: close\r\n\r\n".encode(),
    )
    received = bytearray()
    while chunk := await loop.sock_recv(sock, 4096):
        received += chunk
        if len(received) % (1 << 18) < 4096:
            # Let the proxy's writes pile up in its transport for a moment.
            for _ in range(20):
                await asyncio.sleep(0)
    sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert len(body) == len(blob)
    assert sha256(body) == digest


@BOTH_RELAYS
@pytest.mark.parametrize("ending", ["complete", "cut"])
async def test_bytes_out_and_sent_bytes_count_exactly_what_was_sent(
    start_proxy: Callable[..., Proxy], users: dict[str, str], ending: str, fast: str
) -> None:
    """Guards: the access log's bytes_out and registry_proxy_sent_bytes_total are the head and
    body bytes written, also when the upstream breaks off (they used to count 0 then)."""
    announced, sent = 3 * 1024 * 1024, (3 * 1024 * 1024 if ending == "complete" else 1_500_000)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_head(reader)
        if head.startswith(b"GET /v2/ "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % announced + b"g" * sent)
        await writer.drain()
        writer.close()  # a clean FIN: the proxy has read every byte that was sent

    async with fake_upstream(serve) as upstream:
        proxy = start_proxy(upstream, PROXY_FAST_BLOB_RELAY=fast)
        before = sent_bytes(proxy)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(
            f"GET {BLOB} HTTP/1.1\r\nHost: {proxy.host}\r\n"
            f"Authorization: {token(users)}\r\n\r\n".encode()
        )
        head, _ = await read_head(reader)
        body = b""
        # Read on until the whole body or the cut: the proxy writes only as fast as we read.
        with contextlib.suppress(ConnectionError):
            while len(body) < announced and (data := await reader.read(1 << 20)):
                body += data
        writer.close()
        assert len(body) <= sent
        await eventually(lambda: f'"path":"{BLOB}"' in proxy.log(), "the access log line")
    record = access_record(proxy, BLOB)
    assert record["bytes_out"] == len(head) + sent, (record, len(head))
    assert sent_bytes(proxy) - before == len(head) + sent


@BOTH_RELAYS
async def test_fast_path_and_pool_share_upstream_connections(
    start_proxy: Callable[..., Proxy], users: dict[str, str], fast: str
) -> None:
    """Guards: upstream_connections bounds blob GETs on the fast path too (its sockets are its
    own, not the pool's): never more requests in progress upstream than the limit."""
    in_progress = 0
    peak = 0
    releases: list[asyncio.Event] = []
    finished = False

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_progress, peak
        while True:
            head, _ = await read_head(reader)
            if head.startswith(b"GET /v2/ "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                continue
            in_progress += 1
            peak = max(peak, in_progress)
            release = asyncio.Event()
            releases.append(release)
            if finished:
                release.set()
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"h" * BIG)
            await writer.drain()
            in_progress -= 1

    def arrived(count: int) -> bool:
        return len(releases) >= count

    async def download() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(
            f"GET {BLOB} HTTP/1.1\r\nHost: {proxy.host}\r\n"
            f"Authorization: {token(users)}\r\n\r\n".encode()
        )
        _, body = await read_response(reader)
        writer.close()
        return len(body)

    async with fake_upstream(hold) as upstream:
        proxy = start_proxy(upstream, PROXY_FAST_BLOB_RELAY=fast, PROXY_UPSTREAM_CONNECTIONS="2")
        downloads = [asyncio.create_task(download()) for _ in range(6)]
        try:
            for released in range(6):
                await eventually(partial(arrived, released + 1), "a request upstream")
                assert in_progress <= 2
                releases[released].set()
            assert await asyncio.gather(*downloads) == [BIG] * 6
        finally:
            finished = True  # never leave the fake's handlers waiting when an assertion fails
            for release in releases:
                release.set()
    assert peak == 2
