"""Attacks on the shared throttle stores (the supervisor's, Redis), each seen to fail before its
fix: against a real redis-server, with a relay in front of it where a reply must be late.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from proxy.throttle import redis as redis_store
from proxy.throttle.fallback import FallbackStore
from proxy.throttle.policy import Throttle, Throttled
from proxy.throttle.redis import PREFIX, RedisStore
from proxy.throttle.store import MemoryStore, StoreUnavailable
from proxy.throttle.supervisor import HostStoreClient, HostStoreServer
from tests.support import RedisServer


@pytest.mark.parametrize("password", ["s3/cret", "s3#cret", "s3?cret"])
def test_a_bad_redis_url_is_refused_without_echoing_its_password(
    htpasswd_file: Path, password: str
) -> None:
    """Generated passwords (base64) hold `/`: unencoded, it ends the URL's authority early, and
    the error message printed the whole URL, password included."""
    env = {**os.environ, "PROXY_HTPASSWD": str(htpasswd_file),
           "PROXY_SHARED_STATE": f"redis://:{password}@redis:6379/0"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "proxy", "check-config"], env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2, done
    assert "shared_state: expected redis://HOST:PORT/DB" in done.stderr
    assert "redis://:***@redis:6379/0" in done.stderr
    assert "s3" not in done.stderr + done.stdout


@asynccontextmanager
async def relay(port: int, hold: asyncio.Event) -> AsyncIterator[int]:
    """A TCP relay to Redis on `port`: while `hold` is set, the next reply is kept back for good
    (its connection stays open), as from a Redis that ran the command but answers late."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        try:
            while data := await reader.read(65536):
                if not up and hold.is_set():
                    hold.clear()
                    await asyncio.Event().wait()  # this reply never comes
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", port)
        for task in (pipe(client_r, redis_w, True), pipe(redis_r, client_w, False)):
            tasks.add(asyncio.create_task(task))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_late_reply_does_not_run_the_script_twice(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that timed out was retried on a fresh connection, so Redis ran its script twice:
    one check held two reservations, and the one its settlement left behind counted for the
    10-minute lease (a `failed` or `release` retried the same way gives back a reservation of
    another check of the same name in flight)."""
    monkeypatch.setattr(redis_store, "SOCKET_TIMEOUT", 0.1)
    hold = asyncio.Event()
    direct = Redis(port=redis_server.port)
    async with relay(redis_server.port, hold) as port:
        store = RedisStore(f"redis://127.0.0.1:{port}/0")
        try:
            await store.release("warm-up", "m", time.time())  # the script is loaded
            hold.set()
            # Late: the throttle counts this check locally instead.
            with contextlib.suppress(StoreUnavailable):
                await store.reserve("address:192.0.2.1", "alice", 5, 300, time.time())
            raw = await direct.get(PREFIX + "address:192.0.2.1")
            assert raw is not None and b'"r":{"alice":1}' in raw, raw
        finally:
            await store.close()
            await direct.aclose()


def few_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two connections to Redis, and 50 ms to wait for one: a queue forms at once."""
    monkeypatch.setattr(redis_store, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(redis_store, "POOL_TIMEOUT", 0.05)


async def fail_concurrently(throttle: Throttle, count: int) -> None:
    async def guess(n: int) -> None:
        admission = await throttle.admit(f"198.51.{n // 256}.{n % 256}", f"user{n}")
        await admission.failed()

    await asyncio.gather(*(guess(n) for n in range(count)))


async def test_many_checks_at_once_queue_for_redis_instead_of_falling_back(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checks waiting for one of the pool's connections were taken for Redis not answering:
    a flood of wrong passwords (about 1000 a second from 5 addresses, against one proxy with
    the default 32 connections) switched the process to counting locally again and again,
    with a fresh budget there for every guesser, while Redis answered every call at once."""
    few_connections(monkeypatch)
    states: list[tuple[str, bool]] = []
    local = MemoryStore()
    store = FallbackStore(RedisStore(redis_server.url), local, lambda *s: states.append(s))
    try:
        await fail_concurrently(Throttle(5, 300, 300, store=store), 300)
        assert states == [("redis", True)]
        direct = Redis(port=redis_server.port)
        assert len(await direct.keys(PREFIX + "address:*")) == 300
        await direct.aclose()
    finally:
        await store.close()


async def test_checks_queued_for_redis_fall_back_at_once_when_it_stops_answering(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a call has timed out, the checks queued behind it count locally without waiting
    their turn to time out too (300 checks through 2 connections would take a minute)."""
    few_connections(monkeypatch)
    monkeypatch.setattr(redis_store, "SOCKET_TIMEOUT", 0.1)
    states: list[tuple[str, bool]] = []
    local = MemoryStore()
    store = FallbackStore(RedisStore(redis_server.url), local, lambda *s: states.append(s))
    try:
        await store.shared.ping()  # connected
        redis_server.signal(signal.SIGSTOP)
        try:
            async with asyncio.timeout(5):
                await fail_concurrently(Throttle(5, 300, 300, store=store), 300)
        finally:
            redis_server.signal(signal.SIGCONT)
        assert states == [("redis", True), ("redis", False)]
        assert len(local) >= 3 * 299  # pair and address of each, users' names
    finally:
        await store.close()


async def test_a_refusal_of_a_key_with_many_members_reaches_the_worker() -> None:
    """A refused reserve answers the key's whole entry; past ~1,200 names (an office NAT's
    `auth_max_failures: 2000`) the line was over the worker's 64 KiB read limit, the worker
    dropped the connection and counted locally: the refusal became a fresh local budget."""
    names = 2000
    server_store = MemoryStore()
    now = time.time()
    for n in range(names):
        name = f"{n:032x}"  # as the throttle's hashed names
        await server_store.commit("address:192.0.2.1", name, 300, now, limit=10**6)
    server = HostStoreServer(server_store)
    states: list[tuple[str, bool]] = []
    store = FallbackStore(
        HostStoreClient(server.connect()), MemoryStore(), lambda *s: states.append(s)
    )
    try:
        with pytest.raises(Throttled):
            await Throttle(names, 300, 300, store=store).admit("192.0.2.1", "mallory")
        assert states == [("host", True)]
    finally:
        await store.close()
        await server.close()


async def test_refused_guesses_evict_nothing_from_a_full_store() -> None:
    """The supervisor's store keeps at most `max_keys` keys. Each guess with a fresh name from
    a blocked address reserved its pair (a new key, evicting the least recently used) before
    the address refused it, and so did each guess at a name whose rate is spent: a paced 429
    each, no hash, so one address could flush the store. Flushed: alice's known address, so
    she got 429 there while guesses from elsewhere spent her name's rate (and the guessers'
    own half-spent budgets went with it)."""
    server_store = MemoryStore(max_keys=26)
    server = HostStoreServer(server_store)
    store = HostStoreClient(server.connect())
    throttle = Throttle(10, 300, 300, store=store, max_failures_per_user=2)
    try:
        await (await throttle.admit("192.0.2.1", "alice")).succeeded()  # known there (kept apart)
        for guesser in ("192.0.2.3", "192.0.2.4"):  # her name's rate spent: 5 keys
            await (await throttle.admit(guesser, "alice")).failed()
        for n in range(10):  # 192.0.2.2 blocked for 10 names: 21 keys
            await (await throttle.admit("192.0.2.2", f"name{n}")).failed()
        assert len(server_store) == 26
        for n in range(10, 40):
            with pytest.raises(Throttled):
                await throttle.admit("192.0.2.2", f"name{n}")
        for _ in range(30):  # the same from an address guessing her spent name
            with pytest.raises(Throttled):
                await throttle.admit("192.0.2.5", "alice")
        assert len(server_store) == 26
        with pytest.raises(Throttled):  # her name's rate is still spent: nothing was evicted
            await throttle.admit("192.0.2.6", "alice")
        await (await throttle.admit("192.0.2.1", "alice")).succeeded()
    finally:
        await store.close()
        await server.close()
