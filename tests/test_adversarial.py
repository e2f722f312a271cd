"""Hostile input, impatient clients and floods: each test names the defence it covers.

Raw sockets for parsing shapes, a counting fake upstream where we must know whether anything got
through, the real registry for everything else.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.auth.credentials import parse_basic
from tests.support import (
    Proxy,
    Registry,
    counting_upstream,
    eventually,
    exchange_raw,
    fake_upstream,
    gauge,
    htpasswd,
    http_status,
    push_blob,
    rss,
    token,
)

# --- Request smuggling and oversized heads: the C parser (required at start) rejects them. -----

SMUGGLING = {
    "content-length-and-chunked": b"POST /v2/x/blobs/uploads/ HTTP/1.1\r\nHost: h\r\nAUTH\r\n"
    b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /v2/_catalog HTTP/1.1\r\n\r\n",
    "duplicate-content-length": b"PUT /v2/x/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nAUTH\r\n"
    b"Content-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
    "obs-fold": b"GET /v2/x/tags/list HTTP/1.1\r\nHost: h\r\nAUTH\r\nX-Folded: a\r\n b\r\n\r\n",
    "obfuscated-transfer-encoding": b"POST /v2/x/blobs/uploads/ HTTP/1.1\r\nHost: h\r\nAUTH\r\n"
    b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": b"PATCH /v2/x/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nAUTH\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "signed-content-length": b"PUT /v2/x/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nAUTH\r\n"
    b"Content-Length: +5\r\n\r\nhello",
    "space-before-colon": b"GET /v2/x/tags/list HTTP/1.1\r\nHost: h\r\nAUTH\r\n"
    b"Content-Length : 5\r\n\r\nhello",
    "unknown-method": b"BREW /v2/ HTTP/1.1\r\nHost: h\r\nAUTH\r\n\r\n",
    # Header limits (aiohttp's defaults, the field size raised to 16 KiB for Basic credentials).
    "200-headers": b"GET /v2/x/tags/list HTTP/1.1\r\nHost: h\r\nAUTH\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    + b"\r\n",
    "9-kib-request-line": b"GET /v2/"
    + b"a" * 9000
    + b"/tags/list HTTP/1.1\r\nHost: h\r\nAUTH\r\n\r\n",
    "20-kib-header": b"GET /v2/x/tags/list HTTP/1.1\r\nHost: h\r\nAUTH\r\nX-Big: "
    + b"a" * 20000
    + b"\r\n\r\n",
}


@pytest.mark.parametrize("shape", SMUGGLING)
async def test_smuggling_shapes_are_400_and_closed_and_never_forwarded(
    start_proxy: Callable[..., Proxy], users: dict[str, str], shape: str
) -> None:
    # Defence: aiohttp's C parser (checked at start) plus never forwarding what did not parse.
    async with counting_upstream() as (upstream, url):
        proxy = start_proxy(url)
        data = SMUGGLING[shape].replace(
            b"AUTH", f"Authorization: {token('alice', users['alice'])}".encode()
        )
        answer = await exchange_raw(proxy, data)
    # aiohttp answers parse errors as HTTP/1.0, then closes: no second, smuggled request.
    assert answer.startswith(b"HTTP/1.0 400 "), answer[:200]
    assert len(re.findall(rb"(?:^|\n)HTTP/1\.[01] \d{3} ", answer)) == 1
    assert upstream.heads == []
    # Operators see the rejected request in the access log, as an unclassified 400.
    await eventually(lambda: '"action":"other","repository":null' in proxy.log(), "the record")
    assert '"status":400' in proxy.log() and "Traceback" not in proxy.log()


# --- Authorization header parsing: properties over arbitrary input. ---------------------------


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_authorization_parser_never_raises_on_any_text(header: str) -> None:
    # Defence: parse_basic returns None instead of raising, so malformed headers are 401, not 500.
    result = parse_basic(header)
    assert result is None or (result[0] and ":" not in result[0])


@given(
    # User names: printable (as our parser requires) and without the separator.
    st.text(min_size=1, max_size=40).filter(lambda u: ":" not in u and u.isprintable()),
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=100),
)
@settings(max_examples=300, deadline=None)
def test_authorization_parser_round_trips_valid_credentials(user: str, password: str) -> None:
    assert parse_basic(token(user, password)) == (user, password)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_authorization_parser_never_raises_on_any_base64_payload(payload: bytes) -> None:
    parse_basic("Basic " + base64.b64encode(payload).decode())


# --- Timing and load on authentication. ----------------------------------------------------


@pytest.fixture
def mixed_cost_htpasswd(tmp_path: Path, users: dict[str, str]) -> Path:
    path = tmp_path / "htpasswd"
    htpasswd(path, "-B", "-C", "5", user="alice", password=users["alice"])
    htpasswd(path, "-B", "-C", "9", user="slow", password="slow-password")
    return path


async def test_unknown_user_and_wrong_password_look_the_same(
    registry: Registry, start_proxy: Callable[..., Proxy], mixed_cost_htpasswd: Path
) -> None:
    # Defence: unknown users are checked against a decoy hash of the table's highest cost.
    proxy = start_proxy(registry.url, htpasswd=mixed_cost_htpasswd, PROXY_AUTH_WORKERS="1")

    async def timed(session: aiohttp.ClientSession, user: str) -> tuple[float, int, str]:
        started = time.perf_counter()
        async with session.get(
            proxy.url + "/v2/", headers={"Authorization": token(user, "guess")}
        ) as r:
            body = await r.text()
            return time.perf_counter() - started, r.status, body

    async with aiohttp.ClientSession() as session:
        wrong, unknown = [], []
        for _ in range(7):
            wrong.append(await timed(session, "slow"))
            unknown.append(await timed(session, "nobody-" + uuid.uuid4().hex[:6]))
    assert {(s, b) for _, s, b in wrong} == {(s, b) for _, s, b in unknown}
    ratio = statistics.median(t for t, _, _ in unknown) / statistics.median(t for t, _, _ in wrong)
    # A cost-9 bcrypt takes ~25 ms; answering unknown users at once would make this ratio ~0.02.
    assert 0.5 < ratio < 2, ratio


async def test_wrong_password_flood_does_not_stall_logged_in_users(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    mixed_cost_htpasswd: Path,
    users: dict[str, str],
) -> None:
    # Defence: bcrypt runs in a bounded thread pool off the event loop; cached logins skip it.
    proxy = start_proxy(registry.url, htpasswd=mixed_cost_htpasswd)
    good = {"Authorization": token("alice", users["alice"])}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(proxy.url + "/v2/", headers=good) as response:
            assert response.status == 200  # now cached
        finished: list[str] = []

        async def wrong(i: int) -> None:
            async with session.get(
                proxy.url + "/v2/", headers={"Authorization": token("slow", f"x{i}")}
            ) as r:
                assert r.status == 401
            finished.append("wrong")

        async def logged_in() -> None:
            for _ in range(5):
                async with session.get(proxy.url + "/v2/", headers=good) as r:
                    assert r.status == 200
            finished.append("good")

        async def in_flight() -> float:
            async with session.get(proxy.admin_url + "/metrics") as r:
                text = await r.text()
            prefix = "registry_proxy_requests_in_flight{"
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(prefix))  # fmt: skip

        flood = [asyncio.create_task(wrong(i)) for i in range(200)]
        # The logged-in user comes only once the proxy is busy with the flood.
        async with asyncio.timeout(20):
            while await in_flight() < 100:
                await asyncio.sleep(0.01)
        await asyncio.gather(logged_in(), *flood)
    # 200 cost-9 checks on 2 threads take seconds; the logged-in user was served long before.
    assert finished.index("good") < len(finished) // 2


# --- Slow clients. ---------------------------------------------------------------------------


async def test_idle_and_trickling_connections_are_closed_at_the_deadline(
    registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    # Defence: keepalive_timeout also bounds the time to complete a request's headers.
    proxy = start_proxy(registry.url, PROXY_KEEPALIVE_TIMEOUT="1")
    started = time.monotonic()
    assert await exchange_raw(proxy, b"", timeout=10) == b""
    assert await exchange_raw(proxy, b"GET /v2/ HTTP/1.1\r\nHost: h\r\nX-Slow: ", timeout=10) == b""
    assert time.monotonic() - started < 8


async def test_stalled_upload_body_is_closed_and_the_upstream_request_aborted(
    start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    # Defence: body_timeout on every read of the client's body.
    outcome: list[str] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /v2/ "):  # readiness probe
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return
        try:
            await reader.readexactly(1000)
            outcome.append("complete")
        except asyncio.IncompleteReadError:
            outcome.append("aborted")

    async with fake_upstream(sink) as url:
        proxy = start_proxy(url, PROXY_BODY_TIMEOUT="1")
        head = (
            f"PUT /v2/x/blobs/uploads/u?digest=sha256%3Aa HTTP/1.1\r\nHost: {proxy.host}\r\n"
            f"Authorization: {token('alice', users['alice'])}\r\nContent-Length: 1000\r\n\r\n"
        ).encode()
        answer = await exchange_raw(proxy, head + b"x" * 10, timeout=10)
        await eventually(lambda: bool(outcome), "the upstream to see the end of the body")
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"code": "UNAVAILABLE"' in answer
    assert outcome == ["aborted"]


@pytest.mark.parametrize("fast", ["true", "false"], ids=["fast", "normal"])
async def test_client_that_stops_reading_is_cut_and_memory_stays_flat(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], fast: str
) -> None:
    # Defence: backpressure (we write only as fast as the client reads) and body_timeout.
    proxy = start_proxy(registry.url, PROXY_BODY_TIMEOUT="2", PROXY_FAST_BLOB_RELAY=fast)
    blob = os.urandom(256 * 1024 * 1024)
    digest = push_blob(registry.url, "slowreader/app", blob)
    del blob
    base_rss = rss(proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 16)
    writer.transport.set_write_buffer_limits(0)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    writer.write(
        f"GET /v2/slowreader/app/blobs/{digest} HTTP/1.1\r\nHost: {proxy.host}\r\n"
        f"Authorization: {token('alice', users['alice'])}\r\n\r\n".encode()
    )
    await reader.readexactly(4096)
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    peak = base_rss
    async with asyncio.timeout(30):
        while "client stopped reading" not in proxy.log():
            peak = max(peak, rss(proxy))  # sampled until the proxy cuts the stalled client
            await asyncio.sleep(0.05)
    writer.close()
    assert peak - base_rss < 64 * 1024 * 1024, (base_rss, peak)


# --- Requests the registry must never see twice, or at all. ---------------------------------


async def test_put_is_not_retried_and_upstream_errors_pass_through(
    start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    # Defence: no retries in the forwarder; upstream answers are relayed as they are.
    puts: list[bytes] = []
    error = b'{"errors":[{"code":"BLOB_UPLOAD_INVALID","message":"boom"}]}'

    async def fail_puts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"PUT"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                continue
            puts.append(head)
            await reader.readexactly(5)
            if len(puts) > 1:
                writer.transport.abort()  # a reset before any answer
                return
            writer.write(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
            )
            writer.write(b"Content-Length: %d\r\n\r\n" % len(error) + error)

    async with fake_upstream(fail_puts) as url:
        proxy = start_proxy(url)
        headers = {"Authorization": token("alice", users["alice"])}
        target = proxy.url + "/v2/r/blobs/uploads/u"
        async with aiohttp.ClientSession() as session:
            async with session.put(target, data=b"hello", headers=headers) as response:
                assert response.status == 500
                assert await response.read() == error
            async with session.put(target, data=b"hello", headers=headers) as response:
                assert response.status == 502
    assert len(puts) == 2


async def read_head(proxy: Proxy, data: bytes) -> bytes:
    """Send raw bytes on a new connection; return the response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(data)
    try:
        async with asyncio.timeout(10):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


@pytest.mark.parametrize("connection", ["Upgrade", "keep-alive"])
async def test_upgrade_requests_are_not_upgraded(
    start_proxy: Callable[..., Proxy], users: dict[str, str], connection: str
) -> None:
    """Guards: Upgrade and Connection are hop-by-hop; the proxy never answers 101. With
    `Connection: keep-alive` the Upgrade header is not named in Connection, so only `upgrade`
    in the hop-by-hop set keeps it from the upstream."""
    async with counting_upstream() as (upstream, url):
        proxy = start_proxy(url)
        head = await read_head(
            proxy,
            f"GET /v2/x/tags/list HTTP/1.1\r\nHost: {proxy.host}\r\n"
            f"Authorization: {token('alice', users['alice'])}\r\nConnection: {connection}\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode(),
        )
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert len(upstream.heads) == 1
    forwarded = upstream.heads[0].lower()
    assert b"\r\nupgrade:" not in forwarded and b"\r\nconnection: upgrade" not in forwarded


# --- Floods. -----------------------------------------------------------------------------------


async def test_connections_beyond_the_limit_get_a_prompt_503(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    # Defence: max_connections, enforced when a connection is accepted.
    proxy = start_proxy(registry.url, PROXY_MAX_CONNECTIONS="20")
    held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(20)]
    # An answered request proves the proxy has accepted (and counts) each held connection.
    for reader, writer in held:
        writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 ")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
    started = time.monotonic()
    answer = await exchange_raw(proxy, b"", timeout=5)
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["errors"][0]["code"] == "UNAVAILABLE"
    assert time.monotonic() - started < 5
    for _, writer in held:
        writer.close()
        await writer.wait_closed()
    await eventually(lambda: http_status(proxy.url + "/v2/") == 401, "the proxy to accept again")


async def test_a_thousand_idle_connections_do_not_disturb_other_clients(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    # Defence: an event loop with no per-connection threads; limits well above this (all from
    # one address here, so above max_connections_per_client too).
    proxy = start_proxy(registry.url, PROXY_MAX_CONNECTIONS_PER_CLIENT="2000")
    held = []
    for _ in range(1000):
        held.append(await asyncio.open_connection("127.0.0.1", proxy.port))
    headers = {"Authorization": token("alice", users["alice"])}
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.get(proxy.url + "/v2/", headers=headers) as response:
                assert response.status == 200
    assert all(not reader.at_eof() for reader, _ in held)
    for _, writer in held:
        writer.close()


# --- Soak: aborted transfers leave nothing behind. --------------------------------------------


def open_fds(proxy: Proxy) -> int:
    assert proxy.process is not None and proxy.process.popen is not None
    return len(os.listdir(f"/proc/{proxy.process.popen.pid}/fd"))


@pytest.mark.parametrize("fast", ["true", "false"], ids=["fast", "normal"])
async def test_a_thousand_aborted_downloads_and_uploads_leave_no_trace(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], fast: str
) -> None:
    # Defence: every path out of the relay releases the upstream response and the client transport.
    proxy = start_proxy(registry.url, PROXY_ACCESS_LOG="off", PROXY_FAST_BLOB_RELAY=fast)
    digest = push_blob(registry.url, "soak/app", os.urandom(8 * 1024 * 1024))
    auth = token("alice", users["alice"])
    headers = f"Host: {proxy.host}\r\nAuthorization: {auth}\r\n"
    download = f"GET /v2/soak/app/blobs/{digest} HTTP/1.1\r\n{headers}\r\n".encode()

    async def aborted_download() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(download)
        await reader.readexactly(100_000)
        writer.transport.abort()

    async def aborted_upload() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"POST /v2/soak/app/blobs/uploads/ HTTP/1.1\r\n{headers}\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        location = next(
            line.split(": ", 1)[1]
            for line in head.split("\r\n")
            if line.lower().startswith("location:")
        )
        target = location.split(proxy.host, 1)[1]
        writer.write(
            f"PATCH {target} HTTP/1.1\r\nHost: {proxy.host}\r\nAuthorization: {auth}\r\n"
            f"Content-Length: 10000000\r\n\r\n".encode()
            + b"z" * 200_000
        )
        await writer.drain()
        writer.transport.abort()

    async def rounds(job: Callable[[], object], count: int) -> None:
        semaphore = asyncio.Semaphore(16)

        async def one() -> None:
            async with semaphore:
                await job()  # type: ignore[misc]

        await asyncio.gather(*(one() for _ in range(count)))

    # Warm up pools, caches and allocator arenas at the same concurrency, then take the baseline
    # (measured here: RSS plateaus after the first few hundred and moves by +-4 MB after that).
    await rounds(aborted_download, 300)
    await rounds(aborted_upload, 300)
    await eventually(lambda: in_flight(proxy) == 0, "warm-up transfers to wind down")
    base_fds, base_tasks, base_rss = (
        open_fds(proxy),
        gauge(proxy, "registry_proxy_event_loop_tasks"),
        rss(proxy),
    )

    await rounds(aborted_download, 1000)
    await rounds(aborted_upload, 1000)

    await eventually(lambda: in_flight(proxy) == 0, "aborted transfers to wind down")
    await eventually(lambda: open_fds(proxy) <= base_fds + 5, f"open fds back near {base_fds}")
    tasks = gauge(proxy, "registry_proxy_event_loop_tasks")
    assert tasks <= base_tasks + 2, (base_tasks, tasks)
    assert rss(proxy) - base_rss < 16 * 1024 * 1024, (base_rss, rss(proxy))
    assert http_status(proxy.url + "/v2/", {"Authorization": auth}) == 200


def in_flight(proxy: Proxy) -> float:
    return gauge(proxy, "registry_proxy_requests_in_flight")
