"""Browser sessions signed out before their cookie expires, kept in the throttle's stores (this
process's memory, the supervisor's over a socket pair, a real redis-server) and in the fallback
chain while Redis is away; times are passed in, as the callers pass `time.time()`."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterable

import pytest
import redis.asyncio

from proxy.throttle.fallback import FallbackStore
from proxy.throttle.policy import Throttle
from proxy.throttle.redis import REVOKED, RedisStore
from proxy.throttle.store import MemoryStore, Revocations, StoreUnavailable, ThrottleStore
from proxy.throttle.supervisor import HostStoreClient, HostStoreServer
from tests.support import RedisServer
from tests.support.clock import Clock
from tests.support.doubles import STORES, open_store
from tests.support.polling import eventually

# A wall-clock time, as the browser's sessions pass them.
NOW = 1_796_000_000.0


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ThrottleStore]:
    """Each test runs on every store: a sign-out must hold wherever the store is."""
    async with open_store(request) as opened:
        yield opened


@pytest.fixture(params=["memory", "host", pytest.param("redis", marks=pytest.mark.system)])
async def bounded(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[int], ThrottleStore]]:
    """A store keeping at most `max_revoked` sessions: in this process, behind the supervisor's
    socket pair, or in a real redis-server."""
    made: list[HostStoreServer | HostStoreClient | RedisStore] = []

    def make(max_revoked: int) -> ThrottleStore:
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            made.append(redis_store := RedisStore(server.url, max_revoked=max_revoked))
            return redis_store
        memory = MemoryStore(max_revoked=max_revoked)
        if request.param == "memory":
            return memory
        made.append(host := HostStoreServer(memory))
        made.append(client := HostStoreClient(host.connect()))
        return client

    yield make
    for each in reversed(made):
        await each.close()


async def revoked(store: ThrottleStore, sessions: Iterable[str], now: float) -> list[str]:
    """Which of `sessions` (one-letter ids, given as a string) the store refuses at `now`."""
    return [session for session in sessions if await store.is_revoked(session, now)]


async def test_a_revoked_session_is_refused_until_its_cookie_expires_and_not_after(
    store: ThrottleStore,
) -> None:
    """Sign-out on the server: a copy of the cookie replayed after sign-out is refused up to
    the moment the cookie would have expired, and the entry ends then, not later."""
    assert not await store.is_revoked("s1", NOW)
    await store.revoke("s1", NOW + 3600, NOW)
    assert await store.is_revoked("s1", NOW)
    assert await store.is_revoked("s1", NOW + 3599.5)
    assert not await store.is_revoked("s1", NOW + 3600)
    assert not await store.is_revoked("s1", NOW + 7200)


async def test_sessions_are_revoked_each_on_its_own(store: ThrottleStore) -> None:
    """One user's sign-out ends only that session: other sessions, the same user's on another
    device among them, stay valid, and each revocation ends at its own time."""
    await store.revoke("a", NOW + 100, NOW)
    assert await revoked(store, "abc", NOW) == ["a"]
    await store.revoke("c", NOW + 300, NOW + 10)
    assert await revoked(store, "abc", NOW + 10) == ["a", "c"]
    assert await revoked(store, "abc", NOW + 200) == ["c"]


async def test_revoking_again_never_shortens_a_revocation(store: ThrottleStore) -> None:
    """A second sign-out of a session (a second tab, a retried POST) with an earlier end must
    not let the cookie back in before the first end; a later end extends it."""
    await store.revoke("s", NOW + 600, NOW)
    await store.revoke("s", NOW + 60, NOW + 1)
    assert await store.is_revoked("s", NOW + 300)
    await store.revoke("s", NOW + 900, NOW + 2)
    assert await store.is_revoked("s", NOW + 800)
    await store.revoke("t", NOW - 1, NOW)  # already expired: nothing to refuse
    assert not await store.is_revoked("t", NOW)


@pytest.mark.parametrize("session", ["", "x" * 65, "a b", "a:b", "caf\u00e9", "a\nb"])
async def test_only_session_ids_are_kept(store: ThrottleStore, session: str) -> None:
    """Session ids are bounded opaque tokens: anything else (an empty, long or odd id) is a
    caller's bug, refused before it is stored or sent; the supervisor's connection survives."""
    with pytest.raises(ValueError):
        await store.revoke(session, NOW + 60, NOW)
    with pytest.raises(ValueError):
        await store.is_revoked(session, NOW)
    await store.revoke("x" * 64, NOW + 60, NOW)
    assert await store.is_revoked("x" * 64, NOW)


async def test_past_the_bound_the_revocation_that_ends_soonest_goes(
    bounded: Callable[[int], ThrottleStore],
) -> None:
    """Bounded revocations: past `max_revoked`, the one dropped is the one ending soonest (the
    cookie that would be taken again for the shortest time), never an arbitrary or the oldest
    one, and never one that still has longer to run than a new one."""
    store = bounded(3)
    await store.revoke("a", NOW + 300, NOW)
    await store.revoke("b", NOW + 100, NOW)
    await store.revoke("c", NOW + 200, NOW)
    await store.revoke("d", NOW + 400, NOW + 1)
    assert await revoked(store, "abcd", NOW + 2) == ["a", "c", "d"]
    await store.revoke("e", NOW + 150, NOW + 2)  # ends before all the others: it goes itself
    assert await revoked(store, "acde", NOW + 3) == ["a", "c", "d"]


async def test_ended_revocations_take_no_room(bounded: Callable[[int], ThrottleStore]) -> None:
    """Ended revocations are dropped, not held until the bound pushes out live ones."""
    store = bounded(2)
    await store.revoke("a", NOW + 10, NOW)
    await store.revoke("b", NOW + 20, NOW)
    await store.revoke("c", NOW + 100, NOW + 30)  # a and b have ended
    await store.revoke("d", NOW + 200, NOW + 30)
    assert await revoked(store, "cd", NOW + 31) == ["c", "d"]


def test_the_memory_bound_keeps_exactly_the_latest_ends() -> None:
    """Bounded memory under many sign-outs, repeats and lapses: at most `max_sessions` kept,
    and those are the ones that end last of the live ones (the heap's stale entries from
    repeats are skipped, and compacted so they cannot grow without bound)."""
    rng = random.Random(7)
    revocations = Revocations(100)
    ends: dict[str, float] = {}
    now = NOW
    for _ in range(20_000):
        now += rng.random()
        session, until = f"s{rng.randrange(400)}", now + rng.uniform(-10, 500)
        revocations.revoke(session, until, now)
        if until > now:
            ends[session] = max(until, ends.get(session, until))
        assert len(revocations) <= 100
    live = {session: until for session, until in ends.items() if until > now}
    expected = sorted(live, key=live.__getitem__)[-100:]
    assert sorted(s for s in live if revocations.is_revoked(s, now)) == sorted(expected)
    assert len(revocations._ends) <= 2 * len(revocations) + 16


def test_the_memory_store_drops_ended_revocations_as_it_goes() -> None:
    """Ended revocations go without a sweep: the next sign-out drops every one that has ended."""
    revocations = Revocations(1000)
    for n in range(10):
        revocations.revoke(f"s{n}", NOW + n + 1, NOW)
    revocations.revoke("late", NOW + 100, NOW + 5.5)
    assert len(revocations) == 6  # s5 .. s9 and late


async def test_redis_keeps_revocations_in_one_set_without_a_ttl(redis_server: RedisServer) -> None:
    """Redis holds revocations in one sorted set under the throttle's prefix, without a TTL
    (so `volatile-ttl` never evicts it), dropping ended ones as new ones come."""
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    store = RedisStore(redis_server.url)
    try:
        await store.revoke("a", NOW + 10, NOW)
        await store.revoke("b", NOW + 3600, NOW)
        assert await admin.keys("*") == [REVOKED.encode()]
        assert await admin.pttl(REVOKED) == -1
        await store.revoke("c", NOW + 3600, NOW + 20)
        assert await admin.zrange(REVOKED, 0, -1) == [b"b", b"c"]
        assert await admin.zscore(REVOKED, "b") == NOW + 3600
    finally:
        await store.close()
        await admin.aclose()


async def test_redis_under_maxmemory_evicts_failures_never_revocations(
    redis_server: RedisServer,
) -> None:
    """Eviction by failures in Redis: under `volatile-ttl` a revocation with a TTL (the time
    left on its cookie: here half a minute, less than the failures' window) is evicted before
    any failure, so a flood of wrong passwords filling `maxmemory` let signed-out cookies back
    in."""
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    store = RedisStore(redis_server.url)
    clock = Clock()
    clock.now = NOW
    throttle = Throttle(1, window=60, block=3600, clock=clock, store=store)
    sessions = [f"session{n}" for n in range(20)]
    try:
        for session in sessions:
            await store.revoke(session, NOW + 30, NOW)
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory-policy", "volatile-ttl")
        await admin.config_set("maxmemory", str(used + 256 * 1024))
        n = 0
        while int((await admin.info("stats"))["evicted_keys"]) < 500:
            for _ in range(100):
                n += 1
                await (await throttle.admit(f"10.0.{n >> 8}.{n & 255}", f"name{n}")).failed()
        for session in sessions:
            assert await store.is_revoked(session, NOW + 1), session
    finally:
        await store.close()
        await admin.aclose()


async def ask(sock: socket.socket, *call: object) -> object:
    """One call in the supervisor's line protocol, as a worker sends it; its answer."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    writer.write(json.dumps(call).encode() + b"\n")
    answer = json.loads(await reader.readline())
    writer.close()
    await writer.wait_closed()
    return answer


async def test_the_host_store_takes_revocations_from_every_worker() -> None:
    """The supervisor's verbs `revoke` and `is_revoked`: a sign-out through one worker is
    refused by every other worker of the host, whatever connection the replay comes in on."""
    server = HostStoreServer()
    first, second = server.connect(), server.connect()
    try:
        assert await ask(first, "revoke", "s1", NOW + 60, NOW) is None
        assert await ask(second, "is_revoked", "s1", NOW + 1) is True
        third = HostStoreClient(server.connect())
        assert await third.is_revoked("s1", NOW + 59)
        assert not await third.is_revoked("s1", NOW + 60)
        await third.close()
    finally:
        await server.close()


async def test_a_worker_whose_supervisor_is_gone_cannot_revoke_or_check() -> None:
    """A worker's store raises `StoreUnavailable` once the supervisor's end is gone, as for
    every call, so the fallback store takes over instead of the check failing open or hanging."""
    server = HostStoreServer()
    client = HostStoreClient(server.connect())
    await client.revoke("s1", NOW + 60, NOW)
    await server.close()
    with pytest.raises(StoreUnavailable):
        await client.is_revoked("s1", NOW)
    with pytest.raises(StoreUnavailable):
        await client.revoke("s2", NOW + 60, NOW)
    await client.close()


async def test_revocations_while_redis_is_away_live_in_the_local_store(
    redis_server: RedisServer,
) -> None:
    """Fallback: a sign-out made while Redis answers is refused during an outage (it was written
    locally too); one made during the outage is refused by this process then and after Redis is
    back (Redis never learns of it, so another task, with its own local store, takes it)."""
    states: list[tuple[str, bool]] = []
    store = FallbackStore(RedisStore(redis_server.url), MemoryStore(), lambda *s: states.append(s))
    other = FallbackStore(RedisStore(redis_server.url), MemoryStore())
    watching = asyncio.create_task(store.watch())
    try:
        await store.revoke("before", NOW + 600, NOW)
        assert await other.is_revoked("before", NOW + 1)  # shared through Redis

        redis_server.kill()
        assert await store.is_revoked("before", NOW + 2)
        await store.revoke("during", NOW + 600, NOW + 3)
        assert await revoked(store, ["before", "during"], NOW + 4) == ["before", "during"]
        assert states == [("redis", True), ("redis", False)]

        redis_server.start()  # empty: Redis forgot both
        await eventually(lambda: store.up, "the store back up")
        assert await revoked(store, ["before", "during"], NOW + 5) == ["before", "during"]
        assert not await other.is_revoked("during", NOW + 5)
        await store.revoke("after", NOW + 600, NOW + 6)
        assert await other.is_revoked("after", NOW + 7)
    finally:
        watching.cancel()
        await store.close()
        await other.close()
