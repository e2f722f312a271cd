"""Browser sign-outs kept in the throttle's stores (this process's memory, the supervisor's over a
socket pair, a real redis-server) and in the fallback chain while Redis is away: one entry per
user, ending her sessions issued up to the sign-out; times are passed in, as the callers pass
`time.time()` (issue times in milliseconds)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio

from proxy.throttle.fallback import FallbackStore
from proxy.throttle.policy import Throttle
from proxy.throttle.redis import ENDED, ENDED_BEFORE, RedisStore
from proxy.throttle.store import EndedSessions, MemoryStore, StoreUnavailable, ThrottleStore
from proxy.throttle.supervisor import HostStoreClient, HostStoreServer
from tests.support import RedisServer
from tests.support.clock import Clock
from tests.support.doubles import STORES, open_store, store_maker
from tests.support.polling import eventually

# A wall-clock time, as the browser's sessions pass them, and the same in milliseconds.
NOW = 1_796_000_000.0
MS = 1_796_000_000_000


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ThrottleStore]:
    """Each test runs on every store: a sign-out must hold wherever the store is."""
    async with open_store(request) as opened:
        yield opened


@pytest.fixture(params=STORES)
async def bounded(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[int], ThrottleStore]]:
    """A store keeping the sign-outs of at most `max_users` users: in this process, behind the
    supervisor's socket pair, or in a real redis-server."""
    async with store_maker(request) as make:
        yield lambda max_users: make(max_ended_users=max_users)


async def ended(store: ThrottleStore, users: str, now: float) -> dict[str, float]:
    """The sign-outs in force at `now` for `users` (one-letter keys, given as a string)."""
    answers = {user: await store.sessions_ended(user, now) for user in users}
    return {user: before for user, before in answers.items() if before is not None}


async def test_a_sign_out_ends_the_sessions_issued_up_to_it_until_they_expire(
    store: ThrottleStore,
) -> None:
    """Sign-out on the server: the issue time it ends sessions up to holds until the sessions
    would have expired, and the entry ends then, not later."""
    assert await store.sessions_ended("alice", NOW) is None
    await store.end_sessions("alice", MS, NOW + 3600, NOW)
    assert await store.sessions_ended("alice", NOW) == MS
    assert await store.sessions_ended("alice", NOW + 3599.5) == MS
    assert await store.sessions_ended("alice", NOW + 3600) is None
    assert await store.sessions_ended("alice", NOW + 7200) is None


async def test_each_user_has_her_own_sign_out(store: ThrottleStore) -> None:
    """One user's sign-out says nothing of another's sessions, and each ends at its own time."""
    await store.end_sessions("a", MS, NOW + 100, NOW)
    assert await ended(store, "abc", NOW) == {"a": MS}
    await store.end_sessions("c", MS + 10_000, NOW + 300, NOW + 10)
    assert await ended(store, "abc", NOW + 10) == {"a": MS, "c": MS + 10_000}
    assert await ended(store, "abc", NOW + 200) == {"c": MS + 10_000}


async def test_a_later_sign_out_wins_and_an_earlier_one_never_does(store: ThrottleStore) -> None:
    """A second sign-out (another browser, a retried POST) moves the issue time forward and
    extends the end; one arriving late with an earlier issue time or a sooner end must not let
    back in a session the first one ended, nor end the refusal sooner."""
    await store.end_sessions("u", MS + 5000, NOW + 600, NOW + 5)
    await store.end_sessions("u", MS + 1000, NOW + 60, NOW + 6)  # earlier in both
    assert await store.sessions_ended("u", NOW + 300) == MS + 5000
    await store.end_sessions("u", MS + 9000, NOW + 900, NOW + 9)
    assert await store.sessions_ended("u", NOW + 10) == MS + 9000
    assert await store.sessions_ended("u", NOW + 800) == MS + 9000
    await store.end_sessions("u", MS + 2000, NOW + 1000, NOW + 10)  # earlier, ends later
    assert await store.sessions_ended("u", NOW + 950) == MS + 9000
    await store.end_sessions("t", MS, NOW - 1, NOW)  # already over: nothing to refuse
    assert await store.sessions_ended("t", NOW) is None


async def test_a_sign_out_after_the_last_one_ended_starts_afresh(store: ThrottleStore) -> None:
    """An entry that has ended counts as none: the next sign-out's issue time is the one in
    force, even an earlier one, and so is its end."""
    await store.end_sessions("u", MS + 9000, NOW + 10, NOW)
    await store.end_sessions("u", MS + 1000, NOW + 600, NOW + 20)
    assert await store.sessions_ended("u", NOW + 30) == MS + 1000


async def test_issue_times_to_the_millisecond_keep_every_digit(store: ThrottleStore) -> None:
    """Issue times are wall-clock milliseconds (13 digits): a store that rounded them (Lua
    prints numbers with 14 significant digits) would end a session made a moment later."""
    await store.end_sessions("u", MS + 123, NOW + 60, NOW)
    assert await store.sessions_ended("u", NOW) == MS + 123
    await store.end_sessions("u", MS + 124, NOW + 60, NOW)
    assert await store.sessions_ended("u", NOW) == MS + 124


@pytest.mark.parametrize("user", ["", "x" * 65, "a b", "a:b", "caf\u00e9", "a\nb"])
async def test_only_user_keys_are_kept(store: ThrottleStore, user: str) -> None:
    """Users are keyed by a bounded opaque hash: anything else (empty, long, odd) is a caller's
    bug, refused before it is stored or sent; the supervisor's connection survives."""
    with pytest.raises(ValueError):
        await store.end_sessions(user, MS, NOW + 60, NOW)
    with pytest.raises(ValueError):
        await store.sessions_ended(user, NOW)
    await store.end_sessions("x" * 64, MS, NOW + 60, NOW)
    assert await store.sessions_ended("x" * 64, NOW) == MS


async def test_past_the_bound_the_sign_out_that_ends_soonest_goes(
    bounded: Callable[[int], ThrottleStore],
) -> None:
    """Bounded sign-outs: past `max_ended_users`, the user dropped is the one whose entry ends
    soonest (her cookies would be taken again for the shortest time), never an arbitrary or
    the oldest one, and never one that still has longer to run than a new one."""
    store = bounded(3)
    await store.end_sessions("a", MS, NOW + 300, NOW)
    await store.end_sessions("b", MS, NOW + 100, NOW)
    await store.end_sessions("c", MS, NOW + 200, NOW)
    await store.end_sessions("d", MS, NOW + 400, NOW + 1)
    assert sorted(await ended(store, "abcd", NOW + 2)) == ["a", "c", "d"]
    await store.end_sessions("e", MS, NOW + 150, NOW + 2)  # ends before all the others: it goes
    assert sorted(await ended(store, "acde", NOW + 3)) == ["a", "c", "d"]


async def test_one_users_flood_of_sign_outs_evicts_no_one_else(
    bounded: Callable[[int], ThrottleStore],
) -> None:
    """Guards the flood that revived signed-out cookies: sign-outs were kept per session, so
    one account signing in and out in a loop pushed out a victim's earlier sign-out (the one
    ending soonest) and her stolen cookie worked again. Each user has one entry: the attacker's
    thousand sign-outs rewrite only his own."""
    store = bounded(3)
    await store.end_sessions("victim", MS, NOW + 3600, NOW)
    for n in range(1, 1001):
        now = NOW + n / 100
        await store.end_sessions("attacker", MS + 10 * n, now + 3600, now)
    assert await store.sessions_ended("victim", NOW + 11) == MS
    assert await store.sessions_ended("attacker", NOW + 11) == MS + 10_000


async def test_ended_sign_outs_take_no_room(bounded: Callable[[int], ThrottleStore]) -> None:
    """Ended entries are dropped, not held until the bound pushes out live ones."""
    store = bounded(2)
    await store.end_sessions("a", MS, NOW + 10, NOW)
    await store.end_sessions("b", MS, NOW + 20, NOW)
    await store.end_sessions("c", MS, NOW + 100, NOW + 30)  # a and b have ended
    await store.end_sessions("d", MS, NOW + 200, NOW + 30)
    assert sorted(await ended(store, "cd", NOW + 31)) == ["c", "d"]


def test_the_memory_bound_keeps_exactly_the_latest_ends() -> None:
    """Bounded memory under many sign-outs, repeats and lapses: at most `max_users` kept, and
    those are the ones that end last of the live ones, each with its latest issue time (the
    heap's stale entries from repeats are skipped, and compacted so they cannot grow)."""
    rng = random.Random(7)
    sign_outs = EndedSessions(100)
    # The same rules, the slow way: every live entry, and past the bound the soonest end goes.
    model: dict[str, tuple[float, float]] = {}
    now = NOW
    for n in range(20_000):
        now += rng.random()
        user, until = f"u{rng.randrange(400)}", now + rng.uniform(-10, 500)
        before = MS + rng.randrange(n + 1)
        sign_outs.end(user, before, until, now)
        model = {name: entry for name, entry in model.items() if entry[1] > now}
        if until > now:
            earlier = model.get(user, (before, until))
            model[user] = (max(before, earlier[0]), max(until, earlier[1]))
            if len(model) > 100:
                del model[min(model, key=lambda name: model[name][1])]
        assert len(sign_outs) <= 100
    kept = {f"u{n}": sign_outs.ended(f"u{n}", now) for n in range(400)}
    assert {user: before for user, before in kept.items() if before is not None} == {
        user: before for user, (before, until) in model.items() if until > now
    }
    assert len(sign_outs._ends) <= 2 * len(sign_outs) + 16


def test_the_memory_store_drops_ended_sign_outs_as_it_goes() -> None:
    """Ended entries go without a sweep: the next sign-out drops every one that has ended."""
    sign_outs = EndedSessions(1000)
    for n in range(10):
        sign_outs.end(f"u{n}", MS, NOW + n + 1, NOW)
    sign_outs.end("late", MS, NOW + 100, NOW + 5.5)
    assert len(sign_outs) == 6  # u5 .. u9 and late


async def test_redis_keeps_sign_outs_without_a_ttl(redis_server: RedisServer) -> None:
    """Redis holds sign-outs in one sorted set and one hash under the throttle's prefix, without
    a TTL (so `volatile-ttl` never evicts them), dropping ended ones as new ones come."""
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    await admin.flushdb()
    store = RedisStore(redis_server.url)
    try:
        await store.end_sessions("a", MS, NOW + 10, NOW)
        await store.end_sessions("b", MS + 1, NOW + 3600, NOW)
        assert sorted(await admin.keys("*")) == sorted([ENDED.encode(), ENDED_BEFORE.encode()])
        assert await admin.pttl(ENDED) == -1 and await admin.pttl(ENDED_BEFORE) == -1
        await store.end_sessions("c", MS + 2, NOW + 3600, NOW + 20)
        assert await admin.zrange(ENDED, 0, -1) == [b"b", b"c"]
        assert await admin.hgetall(ENDED_BEFORE) == {b"b": b"%d" % (MS + 1), b"c": b"%d" % (MS + 2)}
        assert await admin.zscore(ENDED, "b") == NOW + 3600
    finally:
        await store.close()
        await admin.aclose()


async def test_redis_under_maxmemory_evicts_failures_never_sign_outs(
    redis_server: RedisServer,
) -> None:
    """Eviction by failures in Redis: under `volatile-ttl` a sign-out with a TTL (the time left
    on its cookies: here half a minute, less than the failures' window) is evicted before any
    failure, so a flood of wrong passwords filling `maxmemory` would let signed-out cookies back
    in."""
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    await admin.flushdb()
    store = RedisStore(redis_server.url)
    clock = Clock()
    clock.now = NOW
    throttle = Throttle(1, window=60, block=3600, clock=clock, store=store)
    users = [f"user{n}" for n in range(20)]
    try:
        for user in users:
            await store.end_sessions(user, MS, NOW + 30, NOW)
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory-policy", "volatile-ttl")
        await admin.config_set("maxmemory", str(used + 256 * 1024))
        n = 0
        while int((await admin.info("stats"))["evicted_keys"]) < 500:
            for _ in range(100):
                n += 1
                await (await throttle.admit(f"10.0.{n >> 8}.{n & 255}", f"name{n}")).failed()
        for user in users:
            assert await store.sessions_ended(user, NOW + 1) == MS, user
    finally:
        await admin.config_set("maxmemory", "0")
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


async def test_the_host_store_takes_sign_outs_from_every_worker() -> None:
    """The supervisor's verbs `end_sessions` and `sessions_ended`: a sign-out through one worker
    holds on every other worker of the host, whatever connection the replay comes in on."""
    server = HostStoreServer()
    first, second = server.connect(), server.connect()
    try:
        assert await ask(first, "end_sessions", "u1", MS, NOW + 60, NOW) is None
        assert await ask(second, "sessions_ended", "u1", NOW + 1) == MS
        third = HostStoreClient(server.connect())
        assert await third.sessions_ended("u1", NOW + 59) == MS
        assert await third.sessions_ended("u1", NOW + 60) is None
        await third.close()
    finally:
        await server.close()


async def test_a_worker_whose_supervisor_is_gone_cannot_sign_out_or_check() -> None:
    """A worker's store raises `StoreUnavailable` once the supervisor's end is gone, as for
    every call, so the fallback store takes over instead of the check failing open or hanging."""
    server = HostStoreServer()
    client = HostStoreClient(server.connect())
    await client.end_sessions("u1", MS, NOW + 60, NOW)
    await server.close()
    with pytest.raises(StoreUnavailable):
        await client.sessions_ended("u1", NOW)
    with pytest.raises(StoreUnavailable):
        await client.end_sessions("u2", MS, NOW + 60, NOW)
    await client.close()


async def test_sign_outs_while_redis_is_away_live_in_the_local_store(
    redis_server: RedisServer,
) -> None:
    """Fallback: a sign-out made while Redis answers holds during an outage (it was written
    locally too); one made during the outage holds in this process then and after Redis is
    back, even where Redis still has an earlier one of the same user (the later wins); Redis
    never learns of it, so another task, with its own local store, does not know it."""
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    await admin.flushdb()
    await admin.aclose()
    states: list[tuple[str, bool]] = []
    store = FallbackStore(RedisStore(redis_server.url), MemoryStore(), lambda *s: states.append(s))
    other = FallbackStore(RedisStore(redis_server.url), MemoryStore())
    watching = asyncio.create_task(store.watch())
    try:
        await store.end_sessions("alice", MS, NOW + 600, NOW)
        assert await other.sessions_ended("alice", NOW + 1) == MS  # shared through Redis

        redis_server.kill()
        assert await store.sessions_ended("alice", NOW + 2) == MS
        await store.end_sessions("bob", MS + 3000, NOW + 600, NOW + 3)
        assert await store.sessions_ended("bob", NOW + 4) == MS + 3000
        assert states == [("redis", True), ("redis", False)]

        redis_server.start()  # empty: Redis forgot both
        await eventually(lambda: store.up, "the store back up")
        assert await store.sessions_ended("alice", NOW + 5) == MS
        assert await store.sessions_ended("bob", NOW + 5) == MS + 3000
        assert await other.sessions_ended("bob", NOW + 5) is None
        # Redis learns an earlier sign-out of bob's (through the other task): this process
        # still holds to its later one.
        await other.end_sessions("bob", MS + 1000, NOW + 600, NOW + 6)
        assert await store.sessions_ended("bob", NOW + 7) == MS + 3000
        # And Redis's, when it is the later.
        await other.end_sessions("alice", MS + 6000, NOW + 600, NOW + 6)
        assert await store.sessions_ended("alice", NOW + 7) == MS + 6000
    finally:
        watching.cancel()
        await store.close()
        await other.close()
