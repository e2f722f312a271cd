"""Known addresses outlive any flood of failures: the store keeps what only successful logins
create apart from the failures' keys, with bounds of its own, in memory, in the supervisor's
store, in Redis (`volatile-ttl`) and in the real proxy behind a trusted edge."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from proxy.throttle.policy import Throttle, Throttled
from proxy.throttle.redis import RedisStore
from proxy.throttle.store import MemoryStore, ThrottleStore
from tests.support import Proxy, RedisServer, Registry, call
from tests.support.clock import Clock
from tests.support.doubles import STORES, store_maker

OWNER = "192.0.2.50"


@pytest.fixture(params=STORES)
async def bounded(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., ThrottleStore]]:
    """A store with small bounds: in this process, behind the supervisor's socket pair, or in
    a real redis-server (whose keys of failures are bounded by its `maxmemory` only)."""
    async with store_maker(request) as make:
        yield make


def throttle_on(store: ThrottleStore, clock: Clock, **settings: Any) -> Throttle:
    settings.setdefault("max_failures_per_user", 1)
    return Throttle(10, window=60, block=300, clock=clock, store=store, **settings)


async def log_in(throttle: Throttle, address: str, user: str) -> None:
    await (await throttle.admit(address, user)).succeeded()


async def flood(throttle: Throttle, addresses: int, names: int) -> None:
    """Failures from many addresses (behind a trusted edge), each at names of its own."""
    for n in range(addresses):
        address = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        for name in range(names):
            await (await throttle.admit(address, f"name{n}-{name}")).failed()


async def known_at(throttle: Throttle, user: str, addresses: Iterable[str]) -> list[str]:
    """The addresses exempt from `user`'s name rate, once a guess from elsewhere has spent it
    (the throttle's `max_failures_per_user` is 1)."""
    with contextlib.suppress(Throttled):  # spent already
        await (await throttle.admit("203.0.113.254", user)).failed()
    exempt = []
    for address in addresses:
        try:
            await (await throttle.admit(address, user)).release()
        except Throttled:
            continue
        exempt.append(address)
    return exempt


async def test_a_flood_of_failures_evicts_no_known_address(
    bounded: Callable[..., ThrottleStore],
) -> None:
    """Eviction by failures: the store evicted its least recent keys at its bound, the owner's
    known address among them, so guesses at her name from new addresses locked her out of her
    own address (429). Failures stay bounded; the known address stays."""
    clock = Clock()
    store = bounded(max_keys=100)
    throttle = throttle_on(store, clock, max_failures_per_user=20)
    await log_in(throttle, OWNER, "alice")
    await flood(throttle, addresses=150, names=10)
    for n in range(21):
        with contextlib.suppress(Throttled):
            await (await throttle.admit(f"198.51.100.{n}", "alice")).failed()
    with pytest.raises(Throttled):
        await throttle.admit("198.51.100.200", "alice")  # her name's rate is spent
    await log_in(throttle, OWNER, "alice")  # and she still logs in from her address


async def test_the_reported_flood_at_the_default_bounds_leaves_the_owner_her_address() -> None:
    """Eviction by failures, as reported, with the defaults: 1,500 addresses failing 10 names
    each filled the 30,000 keys and evicted her known address; 21 guesses at her name from new
    addresses then kept her out of it."""
    store = MemoryStore()
    throttle = Throttle(10, window=300, block=300, clock=Clock(), store=store)
    await log_in(throttle, OWNER, "alice")
    await flood(throttle, addresses=1500, names=10)
    assert len(store) == 30_000
    for n in range(21):
        with contextlib.suppress(Throttled):
            await (await throttle.admit(f"198.51.100.{n}", "alice")).failed()
    with pytest.raises(Throttled):
        await throttle.admit("198.51.100.200", "alice")
    await log_in(throttle, OWNER, "alice")


async def test_failure_keys_stay_capped_and_take_no_room_from_known_addresses() -> None:
    """Bounded memory: failures keep at most `max_keys` keys, and known addresses, counted apart,
    neither take a failure's room nor lose theirs to one."""
    clock = Clock()
    store = MemoryStore(max_keys=10)
    throttle = throttle_on(store, clock)
    users = [f"user{n}" for n in range(50)]
    for user in users:
        await log_in(throttle, OWNER, user)
    for n in range(200):
        await (await throttle.admit(f"10.0.{n >> 8}.{n & 255}", f"name{n}")).failed()
        assert len(store) <= 10
    assert len(store) == 10
    for user in users:
        assert await known_at(throttle, user, [OWNER]) == [OWNER], user


async def test_a_user_keeps_her_latest_known_addresses_and_nobody_elses(
    bounded: Callable[..., ThrottleStore],
) -> None:
    """Known addresses per user are bounded: past the bound the user's least recently used
    address goes, and only hers."""
    clock = Clock()
    throttle = throttle_on(bounded(known_per_user=3), clock)
    await log_in(throttle, "192.0.2.9", "bob")
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.1", "192.0.2.4"):
        await log_in(throttle, address, "alice")
        clock.now += 1
    everywhere = [f"192.0.2.{n}" for n in (1, 2, 3, 4, 9)]
    assert await known_at(throttle, "alice", everywhere) == ["192.0.2.1", "192.0.2.3", "192.0.2.4"]
    assert await known_at(throttle, "bob", everywhere) == ["192.0.2.9"]


async def test_the_user_whose_last_login_is_oldest_goes_first_and_never_for_failures(
    bounded: Callable[..., ThrottleStore],
) -> None:
    """Known addresses are bounded by the number of users: past it, the user whose last login
    is the oldest is forgotten; failures, however many, forget no one."""
    clock = Clock()
    throttle = throttle_on(bounded(max_keys=20, max_known_users=3), clock)
    for user in ("alice", "bob", "carol", "alice", "dave"):
        await log_in(throttle, OWNER, user)
        clock.now += 1
    await flood(throttle, addresses=50, names=2)
    known = {user: await known_at(throttle, user, [OWNER]) for user in ("alice", "bob", "carol")}
    assert known == {"alice": [OWNER], "bob": [], "carol": [OWNER]}
    assert await known_at(throttle, "dave", [OWNER]) == [OWNER]


async def test_a_known_address_still_lapses_after_its_ttl(
    bounded: Callable[..., ThrottleStore],
) -> None:
    """Kept apart, a known address is still known only for `known_client_ttl` after a login."""
    clock = Clock()
    throttle = throttle_on(bounded(), clock, known_client_ttl=3600)
    await log_in(throttle, OWNER, "alice")
    clock.now += 3599
    assert await known_at(throttle, "alice", [OWNER]) == [OWNER]
    clock.now += 2
    assert await known_at(throttle, "alice", [OWNER]) == []


async def test_redis_under_maxmemory_evicts_failures_never_known_addresses(
    redis_server: RedisServer,
) -> None:
    """Eviction by failures in Redis: `volatile-ttl` evicts the keys nearest their end first,
    and a known address was a key with a TTL like the failures'; with a block longer than
    `known_client_ttl`, a flood of blocked keys filling `maxmemory` evicted it first."""
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    store = RedisStore(redis_server.url)
    clock = Clock()
    throttle = Throttle(
        1, window=60, block=3600, clock=clock, store=store, max_failures_per_user=1,
        known_client_ttl=600,
    )  # fmt: skip
    try:
        owners = [f"user{n}" for n in range(20)]
        for user in owners:
            await log_in(throttle, OWNER, user)
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory-policy", "volatile-ttl")
        await admin.config_set("maxmemory", str(used + 256 * 1024))
        n = 0
        while int((await admin.info("stats"))["evicted_keys"]) < 500:
            for _ in range(100):
                n += 1
                await (await throttle.admit(f"10.0.{n >> 8}.{n & 255}", f"name{n}")).failed()
        for user in owners:
            assert await known_at(throttle, user, [OWNER]) == [OWNER], user
    finally:
        await store.close()
        await admin.aclose()


# Loaded by the proxy's interpreter at start (Python imports `sitecustomize` from its path):
# every memory store it makes keeps at most 40 failure keys, so a small flood fills it.
SMALL_STORE = """
import os
import sys

sys.path.insert(0, os.getcwd())

from proxy.throttle import store

_init = store.MemoryStore.__init__


def __init__(self, *args, **kwargs):
    _init(self, 40, *args[1:], **kwargs)


store.MemoryStore.__init__ = __init__
"""


def basic(user: str, password: str, address: str) -> dict[str, str]:
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {credentials}", "X-Forwarded-For": address}


def test_a_flood_behind_a_trusted_edge_leaves_the_owner_her_address(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    users: dict[str, str],
    tmp_path: Path,
) -> None:
    """Eviction by failures, in the real proxy: addresses behind a trusted edge failing names
    flushed the owner's known address (the store's bound lowered to 40 keys in the process),
    then guesses at her name from new addresses locked her out of it with 429."""
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text(SMALL_STORE)
    proxy = start_proxy(
        registry.url,
        PYTHONPATH=str(tmp_path / "hooks"),
        PROXY_TRUSTED_PROXIES="127.0.0.0/8",
        PROXY_AUTH_MAX_FAILURES_PER_USER="3",
        PROXY_AUTH_CACHE_TTL="0.001",
    )
    owner = basic("alice", users["alice"], "198.51.100.7")
    assert call(proxy.url + "/v2/", headers=owner)[0] == 200
    for n in range(30):
        for name in range(2):
            guess = basic(f"name{n}-{name}", "guess", f"10.0.0.{n}")
            assert call(proxy.url + "/v2/", headers=guess)[0] == 401
    statuses = [
        call(proxy.url + "/v2/", headers=basic("alice", "guess", f"10.0.1.{n}"))[0]
        for n in range(5)
    ]
    assert statuses == [401, 401, 401, 429, 429]  # her name's rate is spent
    assert call(proxy.url + "/v2/", headers=owner)[0] == 200
