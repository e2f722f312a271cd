"""The blob fast path's upstream connections: kept alive and reused, and each request asked once.

Counted at the upstream: a small counting TCP relay in front of the real registry, the
registry's own log of requests, and fake upstreams where a connection must be closed under the
proxy (a stale keep-alive) or a redirect answered (the filesystem registry never sends one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from yarl import URL

from proxy.relay import connections
from tests.support import (
    Proxy,
    Registry,
    basic_auth,
    call,
    eventually,
    fake_upstream,
    push_blob,
    sha256,
)

BLOB = "/v2/r/blobs/sha256:" + "e" * 64
BODY = b"b" * 100_000


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """The request line and the whole head (a GET has no body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode("latin-1"), head


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class Relayed:
    """What the counting relay saw: the connections accepted so far."""

    accepted: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if not writer.is_closing() and writer.can_write_eof():
            writer.write_eof()


@asynccontextmanager
async def counting_relay(upstream: str) -> AsyncIterator[tuple[str, Relayed]]:
    """A TCP relay to `upstream` that counts the connections made to it; yields its URL."""
    target = URL(upstream)
    seen = Relayed()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        seen.tasks.add(task)
        seen.writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(target.host, target.port)
            seen.writers.append(up_writer)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            writer.close()
            seen.tasks.discard(task)

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        for writer in seen.writers:
            writer.close()
        await asyncio.gather(*seen.tasks, return_exceptions=True)
        await server.wait_closed()


def auth(users: dict[str, str]) -> dict[str, str]:
    return basic_auth("alice", users["alice"])


@pytest.mark.parametrize("limit", ["100", "2"])
async def test_blob_gets_reuse_upstream_connections(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], limit: str
) -> None:
    """Guards the connection per blob GET (closed by the proxy first, so one TIME_WAIT socket
    each: a few hundred GETs a second ran a remote registry out of ports): N GETs over a few
    client connections use about one upstream connection per client, also when every
    `upstream_connections` slot is busy, and each GET reaches the registry once."""
    repo = f"keep/{uuid.uuid4().hex[:8]}"
    digest = push_blob(registry.url, repo, os.urandom(100_000))
    clients, gets = 3, 60
    async with counting_relay(registry.url) as (upstream, seen):
        proxy = start_proxy(upstream, PROXY_UPSTREAM_CONNECTIONS=limit)
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, headers=auth(users)) as session:

            async def get() -> str:
                async with session.get(f"{proxy.url}/v2/{repo}/blobs/{digest}") as response:
                    assert response.status == 200
                    return sha256(await response.read())

            assert await asyncio.gather(*(get() for _ in range(gets))) == [digest] * gets
    # At most two per client (the next GET may start while the last gives its connection back),
    # and the readiness probe's own.
    assert seen.accepted <= 2 * clients + 2, seen
    path = f"/v2/{repo}/blobs/{digest}"
    await eventually(lambda: registry.requested_uris().count(path) >= gets, "the registry's log")
    assert registry.requested_uris().count(path) == gets


async def test_a_404_reaches_the_client_from_one_registry_request(
    registry: Registry, proxy: Proxy, users: dict[str, str]
) -> None:
    """Guards the refetch of every answer but a plain body: a blob the registry does not have
    was asked for twice (the fast path, then the normal relay); now its 404 is relayed."""
    path = f"/v2/{uuid.uuid4().hex[:8]}/app/blobs/sha256:" + "0" * 64
    status, _, body = call(proxy.url + path, headers=auth(users))
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    # Anything the proxy sent for the GET was sent before its answer: a later request to the
    # registry, once logged, comes after it in the log.
    marker = f"/v2/{uuid.uuid4().hex[:8]}/tags/list"
    call(registry.url + marker)
    await eventually(lambda: marker in registry.requested_uris(), "the registry's log")
    assert registry.requested_uris().count(path) == 1


async def test_a_redirect_is_relayed_once_and_its_connection_reused(
    start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards the second GET for each 307 (an S3-backed registry answers every blob GET so):
    the client gets the first answer with the same header filter as the normal relay, the
    upstream one request per GET, all on one kept-alive connection."""
    storage = "https://bucket.s3.example.com/blobs/data?X-Amz-Signature=abc%2Fdef"
    gets: list[int] = []
    connections = 0

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connection = None
        while True:
            line, _ = await read_request(reader)
            if line.startswith("GET /v2/ "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                continue
            if connection is None:
                connections += 1
                connection = connections
            gets.append(connection)
            writer.write(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {storage}\r\n"
                "Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                "Docker-Distribution-Api-Version: registry/2.0\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            await writer.drain()

    async with fake_upstream(redirect) as upstream:
        proxy = start_proxy(upstream)
        async with aiohttp.ClientSession(headers=auth(users)) as session:
            for _ in range(20):
                async with session.get(proxy.url + BLOB, allow_redirects=False) as response:
                    assert response.status == 307
                    assert response.headers["Location"] == storage
                    assert "X-Hop" not in response.headers
                    assert "Keep-Alive" not in response.headers
                    assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert gets == [1] * 20


@pytest.mark.parametrize("closing", ["idle", "on-request-fin", "on-request-reset"])
async def test_a_stale_pooled_connection_does_not_fail_the_next_get(
    start_proxy: Callable[..., Proxy], users: dict[str, str], closing: str
) -> None:
    """Guards reuse against stale keep-alives: the upstream closes each connection after two
    answers, while it is idle or as the next request arrives (FIN or RST, before a byte of an
    answer); every GET still succeeds, asked again once on a new connection."""
    answered: list[int] = []

    async def two_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        served = 0
        while True:
            line, _ = await read_request(reader)
            if line.startswith("GET /v2/ "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                continue
            if served == 2:
                if closing == "on-request-reset":
                    reset(writer)
                answered.append(served)
                return
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
            await writer.drain()
            if served == 2 and closing == "idle":
                answered.append(served)
                return

    async with fake_upstream(two_per_connection) as upstream:
        proxy = start_proxy(upstream)
        async with aiohttp.ClientSession(headers=auth(users)) as session:
            for _ in range(10):
                async with session.get(proxy.url + BLOB) as response:
                    assert response.status == 200
                    assert await response.read() == BODY
        assert "Traceback" not in proxy.log()
    # Every connection that was closed under the proxy had served two GETs.
    assert answered and set(answered) == {2}, answered


async def test_a_request_that_may_have_been_answered_is_not_sent_again(
    start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards the retry's limit: on a reused connection that breaks off after part of an
    answer, the client gets a 502 and the upstream never sees the request a second time."""
    gets: list[str] = []

    async def break_the_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while True:
            line, _ = await read_request(reader)
            if line.startswith("GET /v2/ "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                continue
            gets.append(line)
            if served == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Len")
                await writer.drain()
                return
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
            await writer.drain()

    async with fake_upstream(break_the_second) as upstream:
        proxy = start_proxy(upstream)
        async with aiohttp.ClientSession(headers=auth(users)) as session:
            async with session.get(proxy.url + BLOB) as response:
                assert response.status == 200
                assert await response.read() == BODY
            async with session.get(proxy.url + BLOB) as response:
                assert response.status == 502
                assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert len(gets) == 2, gets


@pytest.mark.parametrize("fast", ["true", "false"], ids=["fast", "normal"])
async def test_an_answer_framed_two_ways_is_a_502_from_one_request(
    start_proxy: Callable[..., Proxy], users: dict[str, str], fast: str
) -> None:
    """Guards the framing of relayed answers: a head with both Content-Length and chunked
    Transfer-Encoding is refused on both relays, not passed on with a length the body it
    comes with does not have."""
    gets: list[str] = []

    async def both(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _ = await read_request(reader)
            if line.startswith("GET /v2/ "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                continue
            gets.append(line)
            writer.write(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 40\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
            )
            await writer.drain()

    async with fake_upstream(both) as upstream:
        proxy = start_proxy(upstream, PROXY_FAST_BLOB_RELAY=fast)
        async with (
            aiohttp.ClientSession(headers=auth(users)) as session,
            session.get(proxy.url + BLOB) as response,
        ):
            assert response.status == 502
    assert len(gets) == 1


async def test_idle_connections_are_bounded_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the pool's own bounds: no more idle connections than its limit, none kept past
    its idle time, and none left open once it is closed."""
    ended: list[int] = []

    async def count_ends(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        ended.append(1)

    async with fake_upstream(count_ends) as upstream:
        url = URL(upstream)
        assert url.host is not None and url.port is not None
        pool = connections.UpstreamConnections(url.host, url.port, limit=2, connect_timeout=5)
        taken = [await pool.take() for _ in range(3)]
        assert [reused for _, reused in taken] == [False] * 3
        for sock, _ in taken:
            pool.give_back(sock)
        await eventually(lambda: len(ended) == 1, "the connection beyond the limit closed")
        # The last one given back is the first taken again.
        again, reused = await pool.take()
        assert reused and again is taken[1][0]
        monkeypatch.setattr(connections, "IDLE_SECONDS", 0.05)
        pool.give_back(again)
        await eventually(lambda: len(ended) == 2, "an idle connection to expire")
        pool.close()
        await eventually(lambda: len(ended) == 3, "the pool's close")
