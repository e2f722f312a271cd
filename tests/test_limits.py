"""Connection and memory abuse (issue 10, section 4) and what aiohttp itself answers (section 5).

Each test names the class of abuse it guards and fails on the proxy without that defence.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import os
import re
import socket
from collections.abc import Callable

import aiohttp
import pytest

from proxy.edge.client_slots import ClientSlots
from proxy.edge.connection import HEAD_LIMIT
from proxy.edge.forwarded import client_key
from proxy.relay.slots import UpstreamSlots
from tests.support import (
    Proxy,
    Registry,
    counting_upstream,
    eventually,
    exchange_raw,
    gauge,
    http_status,
    push_blob,
    rss,
    token,
    unread_bytes,
)

MiB = 1 << 20


async def connect(proxy: Proxy, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the proxy from the loopback address `source`."""
    return await asyncio.open_connection("127.0.0.1", proxy.port, local_addr=(source, 0))


async def ping(proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One GET /v2/ on a held connection; the response head (its body read too)."""
    writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode())
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    return head


def body_of(answer: bytes) -> dict[str, object]:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


# --- Connections per client. ---------------------------------------------------------------


def test_client_key_counts_ipv6_per_64_and_ipv4_mapped_as_ipv4() -> None:
    """One site's IPv6 addresses share a key; IPv4-mapped IPv6 is the IPv4 client."""
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"


def test_client_slots_release_and_exempt_trusted_proxies() -> None:
    """Slots come back on release; edge proxies (many clients each) are never capped."""
    slots = ClientSlots(2, [ipaddress.ip_network("10.0.0.0/8")])
    keys = [slots.admit("2001:db8::1"), slots.admit("2001:db8::2")]
    assert keys == ["2001:db8::/64", "2001:db8::/64"]
    assert slots.admit("2001:db8::3") is None
    assert slots.admit("203.0.113.1") == "203.0.113.1"
    assert all(slots.admit("10.1.2.3") == "" for _ in range(5))  # an edge proxy: not counted
    slots.release("2001:db8::/64")
    assert slots.admit("2001:db8::4") == "2001:db8::/64"
    for key in ("2001:db8::/64", "2001:db8::/64", "203.0.113.1", ""):
        slots.release(key)
    assert len(slots) == 0


async def test_one_address_holding_every_slot_does_not_lock_out_others(
    registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    """Class: connection exhaustion by one client. max_connections_per_client caps an address
    below max_connections; beyond it that address gets the prompt 503, others still get in."""
    proxy = start_proxy(
        registry.url, PROXY_MAX_CONNECTIONS="20", PROXY_MAX_CONNECTIONS_PER_CLIENT="8"
    )
    served, refused = [], []
    for _ in range(20):
        reader, writer = await connect(proxy, "127.0.0.2")
        writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode())
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 503 "):
            rest = await reader.read()
            assert body_of(head + rest)["errors"][0]["code"] == "UNAVAILABLE"  # type: ignore[index]
            refused.append(writer)
            writer.close()
        else:
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            served.append((reader, writer))
    assert (len(served), len(refused)) == (8, 12)
    other = await connect(proxy, "127.0.0.3")
    assert (await ping(proxy, *other)).startswith(b"HTTP/1.1 401 ")
    assert gauge(proxy, "registry_proxy_client_connections_refused_total") == 12
    # Closing frees the address's slots.
    for _, writer in served:
        writer.close()
    again: list[bytes] = []

    async def reconnects() -> None:
        reader, writer = await connect(proxy, "127.0.0.2")
        again.append(await ping(proxy, reader, writer))
        writer.close()

    async with asyncio.timeout(20):
        while not again or not again[-1].startswith(b"HTTP/1.1 401 "):
            again.clear()
            await reconnects()
    other[1].close()


# --- Request heads: capped in total, and held unfinished in bounded memory. -----------------


def padded_head(size: int, complete: bool = True, start: bytes = b"GET /v2/ HTTP/1.1\r\n") -> bytes:
    """A head of exactly `size` bytes, padded with header lines under aiohttp's per-field
    limit, without its blank line when not `complete`."""
    start += b"Host: h\r\n"
    end = b"\r\n" if complete else b""
    room = size - len(start) - len(end)
    lines: list[bytes] = []
    while room > 0:
        value = min(room - len(b"X-Pad-00: \r\n"), 8000)
        line = b"X-Pad-%02d: " % len(lines) + b"a" * max(value, 0) + b"\r\n"
        lines.append(line[:room] if value < 0 else line)
        room -= len(lines[-1])
    head = start + b"".join(lines) + end
    assert len(head) == size, len(head)
    return head


async def test_a_head_beyond_the_cap_is_a_431_and_never_forwarded(
    start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Class: oversized request heads. Each line is within aiohttp's limits; the whole head is
    not, so the proxy answers 431 in JSON and closes, whether the head arrives at once or in
    pieces; a head at the cap still passes."""
    auth = f"Authorization: {token('alice', users['alice'])}\r\n".encode()
    async with counting_upstream() as (upstream, url):
        proxy = start_proxy(url)
        start = b"GET /v2/x/tags/list HTTP/1.1\r\nConnection: close\r\n" + auth
        at_cap = padded_head(HEAD_LIMIT, start=start)
        answer = await exchange_raw(proxy, at_cap)
        assert answer.split(b"\r\n", 1)[0].endswith(b" 200 OK"), answer[:200]
        assert len(upstream.heads) == 1

        answer = await exchange_raw(proxy, padded_head(HEAD_LIMIT + 1, start=start))
        assert answer.startswith(b"HTTP/1.0 431 "), answer[:200]
        assert body_of(answer)["errors"][0]["code"] == "UNSUPPORTED"  # type: ignore[index]

        # Trickled: refused as soon as the cap is passed, the head never completing.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        unfinished = padded_head(HEAD_LIMIT + 4096, complete=False)
        for offset in range(0, len(unfinished), 4096):
            writer.write(unfinished[offset : offset + 4096])
            await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.0 431 "), answer[:200]
        assert len(upstream.heads) == 1


async def test_upload_head_and_body_in_one_write_is_not_counted_as_head(
    registry: Registry, proxy: Proxy, users: dict[str, str]
) -> None:
    """Guards the head cap against counting bodies: a PUT whose body arrives with its head in
    one write (containerd's monolithic upload) is not a 431."""
    auth = token("alice", users["alice"])
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + "/v2/heads/app/blobs/uploads/", headers={"Authorization": auth}
        ) as response,
    ):
        assert response.status == 202
        location = response.headers["Location"]
    blob = os.urandom(512 * 1024)
    digest = "sha256%3A" + hashlib.sha256(blob).hexdigest()
    target = location.split(proxy.host, 1)[1] + "&digest=" + digest
    head = (
        f"PUT {target} HTTP/1.1\r\nHost: {proxy.host}\r\nAuthorization: {auth}\r\n"
        f"Content-Length: {len(blob)}\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = await exchange_raw(proxy, head + blob)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]


async def test_head_cap_counts_exactly_across_pipelined_bodies(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Class: oversized heads hidden behind pipelined bodies. A chunked and a Content-Length
    upload and a GET, pipelined in odd-sized writes, are all answered (no body byte counts as
    head), and an unfinished head over the cap that follows them in the same writes is a 431."""
    proxy = start_proxy(registry.url)
    auth = token("alice", users["alice"])
    locations = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(
                proxy.url + "/v2/pipelined/app/blobs/uploads/", headers={"Authorization": auth}
            ) as response:
                assert response.status == 202
                locations.append(response.headers["Location"].split(proxy.host, 1)[1])
    common = f"Host: {proxy.host}\r\nAuthorization: {auth}\r\n"
    chunked = b"".join(b"%x\r\n" % 70_000 + b"c" * 70_000 + b"\r\n" for _ in range(3))
    sized = b"\r\n\r\n" * 75_000  # blank lines inside a body are not the end of a head
    stream = (
        f"PATCH {locations[0]} HTTP/1.1\r\n{common}Transfer-Encoding: chunked\r\n\r\n".encode()
        + chunked
        + b"0\r\n\r\n"
        + f"GET /v2/pipelined/app/tags/list HTTP/1.1\r\n{common}X-P: {'p' * 8000}\r\n\r\n".encode()
        + f"PATCH {locations[1]} HTTP/1.1\r\n{common}Content-Length: {len(sized)}\r\n\r\n".encode()
        + sized
        + padded_head(HEAD_LIMIT + 8192, complete=False)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for offset in range(0, len(stream), 50_001):
        writer.write(stream[offset : offset + 50_001])
        await writer.drain()
    async with asyncio.timeout(20):
        answer = await reader.read()
    writer.close()
    statuses = re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert statuses[0] == statuses[2] == b"202" and statuses[3:] == [b"431"], statuses
    assert statuses[1] != b"431"


async def test_a_thousand_unfinished_heads_at_the_cap_stay_within_128_mb(
    start_proxy: Callable[..., Proxy],
) -> None:
    """Class: memory exhaustion by unfinished heads. 1,000 connections (from 10 addresses, under
    the per-client cap) each hold a head just under the cap: the proxy's RSS grows by at most
    128 MB; pushing each past the cap gets every one a 431 and a close."""
    async with counting_upstream() as (_, url):
        proxy = start_proxy(url, PROXY_ACCESS_LOG="off")
        base = rss(proxy)
        held = []
        unfinished = padded_head(HEAD_LIMIT - 256, complete=False)
        for index in range(1000):
            reader, writer = await connect(proxy, f"127.0.1.{10 + index % 10}")
            writer.write(unfinished)
            held.append((reader, writer))
        for _, writer in held:
            await writer.drain()
        await eventually(lambda: unread_bytes(proxy.port) == 0, "the proxy to read every head")
        added = rss(proxy) - base
        print(f"1,000 unfinished {HEAD_LIMIT - 256}-byte heads: +{added / 1e6:.1f} MB RSS")
        assert added <= 128 * 1000 * 1000, added
        for _, writer in held:
            writer.write(b"X-More: " + b"b" * 4000 + b"\r\n")
        answers = []
        for reader, writer in held:
            async with asyncio.timeout(20):
                answers.append(await reader.read())
            writer.close()
        assert all(a.startswith(b"HTTP/1.0 431 ") for a in answers), {a[:40] for a in answers}


# --- Refused uploads: discarded for a few MiB at most, then closed. -------------------------


@pytest.mark.parametrize("refusal", ["401", "405"])
async def test_a_refused_upload_is_discarded_briefly_then_closed(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], refusal: str
) -> None:
    """Class: bandwidth and CPU burnt on refused bodies. After the refusal the proxy reads at
    most a few MiB of the body, sends Connection: close and ends the connection (EOF), instead
    of reading everything the client sends for lingering_time (~900 MiB on loopback)."""
    proxy = start_proxy(registry.url, PROXY_READ_ONLY="true")
    auth = "" if refusal == "401" else f"Authorization: {token('alice', users['alice'])}\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        f"PUT /v2/x/blobs/uploads/u?digest=sha256%3Aa HTTP/1.1\r\nHost: {proxy.host}\r\n{auth}"
        f"Content-Length: {1 << 40}\r\n\r\n".encode()
    )
    sent = 0
    chunk = b"z" * (256 * 1024)

    async def flood() -> None:
        nonlocal sent
        while True:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)

    flooding = asyncio.create_task(flood())
    try:
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(f"HTTP/1.1 {refusal} ".encode()), head
            assert b"\r\nConnection: close\r\n" in head
            rest = await reader.read()  # until EOF
        assert body_of(head + rest)["errors"]
    finally:
        flooding.cancel()
        await asyncio.gather(flooding, return_exceptions=True)
        writer.transport.abort()
    # What the proxy read, plus what the two sockets' buffers hold on loopback.
    print(f"refused upload ({refusal}): {sent / MiB:.1f} MiB accepted before the close")
    assert sent < 32 * MiB, sent


# --- The upstream pool: shared fairly, and a full pool is "busy", not a timeout. -------------


async def test_one_user_stalling_downloads_cannot_take_the_whole_upstream_pool(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Class: upstream pool exhaustion by one user. Alice holds stalled downloads; she gets at
    most upstream_connections_per_user of the pool (then 503 proxy busy and its metric, not a
    504), and another user is still served."""
    proxy = start_proxy(
        registry.url,
        PROXY_UPSTREAM_CONNECTIONS="4",
        PROXY_UPSTREAM_CONNECTIONS_PER_USER="2",
        PROXY_CONNECT_TIMEOUT="1",
        PROXY_UPSTREAM_PROBE_INTERVAL="30",
    )
    digest = push_blob(registry.url, "pool/app", os.urandom(64 * MiB))
    alice = token("alice", users["alice"])
    stalled, statuses = [], []
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 16)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        writer.write(
            f"GET /v2/pool/app/blobs/{digest} HTTP/1.1\r\nHost: {proxy.host}\r\n"
            f"Authorization: {alice}\r\n\r\n".encode()
        )
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        statuses.append(int(head.split(b" ")[1]))
        if statuses[-1] == 503:
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert b"proxy busy" in await reader.readexactly(length), head
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        stalled.append(writer)
    assert sorted(statuses) == [200, 200, 503, 503], statuses
    assert gauge(proxy, "registry_proxy_upstream_pool_timeouts_total") == 2
    assert gauge(proxy, 'registry_proxy_upstream_errors_total{kind="timeout"}') == 0
    bob = {"Authorization": token("bob", users["bob"])}
    assert http_status(proxy.url + "/v2/", bob) == 200
    for writer in stalled:
        writer.transport.abort()


async def test_upstream_slots_are_handed_on_in_order_within_shares() -> None:
    """A freed slot goes to the first waiter under its share; a wait past its deadline fails."""
    slots = UpstreamSlots(total=2, per_user=1, wait=30)
    assert await slots.acquire("alice")
    alice_again = asyncio.create_task(slots.acquire("alice"))  # over her share: waits
    await eventually(lambda: slots.waiting == 1, "alice to queue")
    assert await slots.acquire("bob")  # bob's share is free
    carol = asyncio.create_task(slots.acquire("carol"))  # the pool is full: waits
    await eventually(lambda: slots.waiting == 2, "carol to queue")
    slots.release("alice")  # alice's own waiter was first
    assert await alice_again
    assert not carol.done()
    slots.release("bob")
    assert await carol
    assert (slots.in_use, slots.held_by("alice"), slots.held_by("carol")) == (2, 1, 1)
    full = UpstreamSlots(total=1, per_user=1, wait=0.01)
    assert await full.acquire("x")
    assert not await full.acquire("y")  # nothing freed within the wait
    assert full.waiting == 0


# --- What aiohttp answers by itself: our JSON, no echo, no banner. -----------------------------


async def test_malformed_request_is_json_400_without_echo_or_banner(
    start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Class: client bytes reflected in responses. aiohttp's own 400 quoted the offending header
    line (here Basic credentials); ours is the registry's JSON and names nothing sent."""
    secret = token("alice", users["alice"])
    async with counting_upstream() as (upstream, url):
        proxy = start_proxy(url)
        answer = await exchange_raw(
            proxy, f"GET /v2/ HTTP/1.1\r\nHost: h\r\nAuthorization : {secret}\r\n\r\n".encode()
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 "), answer[:300]
    assert json.loads(body)["errors"][0]["message"] == "malformed HTTP request"
    assert secret.split()[1].encode() not in answer and b"Authorization" not in answer
    assert b"\r\nserver:" not in head.lower()
    assert upstream.heads == []


async def test_a_12_kib_header_field_is_read_not_refused(
    start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Class: limits lost with the handler's arguments. Basic credentials with a password of up to
    8 KiB exceed aiohttp's 8 KiB field default; the public listener's handlers must get the
    16 KiB field limit, so the gate answers (401) instead of the parser (400)."""
    credentials = base64.b64encode(b"alice:" + b"p" * 9000).decode()
    async with counting_upstream() as (upstream, url):
        proxy = start_proxy(url)
        answer = await exchange_raw(
            proxy,
            f"GET /v2/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
            f"Authorization: Basic {credentials}\r\n\r\n".encode(),
        )
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert upstream.heads == []


async def test_no_server_banner_on_any_response(
    registry: Registry, proxy: Proxy, users: dict[str, str]
) -> None:
    """Class: version disclosure. No `Server: Python/... aiohttp/...` on proxied, refused or
    admin responses."""
    async with aiohttp.ClientSession() as session:
        for url, headers in [
            (proxy.url + "/v2/", {"Authorization": token("alice", users["alice"])}),
            (proxy.url + "/v2/", {}),
            (proxy.url + "/elsewhere", {"Authorization": token("alice", users["alice"])}),
            (proxy.admin_url + "/healthz", {}),
        ]:
            async with session.get(url, headers=headers) as response:
                assert "Server" not in response.headers, (url, response.headers)
