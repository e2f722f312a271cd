"""The password-guessing throttle, driven by an injected clock, on each of its stores: this
process's memory, the supervisor's over its Unix socket, and a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio

from proxy.throttle.policy import Admission, Throttle, Throttled
from proxy.throttle.redis import RedisStore
from proxy.throttle.store import RESERVATION_LEASE, MemoryStore, ThrottleStore
from tests.support import RedisServer
from tests.support.clock import Clock
from tests.support.doubles import STORES, fail, open_store, retry_after


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """conftest's, one for the module: nothing here stops it, each test flushes it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ThrottleStore]:
    """Each test runs on every store: the rules must not depend on where the counts are."""
    async with open_store(request) as opened:
        yield opened


@pytest.fixture
def make(store: ThrottleStore) -> Callable[..., Throttle]:
    def make(clock: Clock, max_failures: int = 3, **kwargs: Any) -> Throttle:
        kwargs.setdefault("store", store)
        return Throttle(max_failures, window=60, block=300, clock=clock, **kwargs)

    return make


async def test_a_pair_is_blocked_after_max_failures(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock)
    await fail(throttle, "192.0.2.1", "alice", 2)
    assert await retry_after(throttle, "192.0.2.1", "alice") is None
    await fail(throttle, "192.0.2.1", "alice")
    assert await retry_after(throttle, "192.0.2.1", "alice") == 300
    clock.now += 100
    assert await retry_after(throttle, "192.0.2.1", "alice") == 200


async def test_parallel_checks_take_the_budget_before_they_run(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    """Concurrency: 60 guesses in flight at once get only max_failures reservations."""
    throttle = make(clock, max_failures=5)
    admitted: list[Admission] = []
    refused = 0
    for _ in range(60):
        try:
            admitted.append(await throttle.admit("192.0.2.1", "alice"))
        except Throttled:
            refused += 1
    assert (len(admitted), refused) == (5, 55)
    for admission in admitted:
        await admission.failed()
    assert await retry_after(throttle, "192.0.2.1", "alice") == 300


async def test_a_success_gives_its_reservation_back(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock)
    held = [await throttle.admit("192.0.2.1", "alice") for _ in range(3)]
    assert await retry_after(throttle, "192.0.2.1", "alice") is not None
    await held[0].succeeded()
    await held[1].release()
    assert await retry_after(throttle, "192.0.2.1", "alice") is None
    await held[2].failed()
    await held[2].succeeded()  # settled already: no effect
    await fail(throttle, "192.0.2.1", "alice", 1)
    assert await retry_after(throttle, "192.0.2.1", "alice") is None


async def test_success_clears_the_users_count_at_the_address(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    """record_success must clear the user's failures there (issue 15: a suite let this through)."""
    throttle = make(clock)
    await fail(throttle, "192.0.2.1", "alice", 2)
    await (await throttle.admit("192.0.2.1", "alice")).succeeded()
    await fail(throttle, "192.0.2.1", "alice", 2)
    assert await retry_after(throttle, "192.0.2.1", "alice") is None


async def test_success_clears_the_pair_with_checks_in_flight(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock)
    held = await throttle.admit("192.0.2.1", "alice")  # the right password, still being checked
    await fail(throttle, "192.0.2.1", "alice", 2)
    assert await retry_after(throttle, "192.0.2.1", "alice") == 60
    await held.succeeded()
    assert await retry_after(throttle, "192.0.2.1", "alice") is None


async def test_success_clears_only_its_own_name_at_the_address(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    """A client with one valid account cannot reset the address between guesses at others."""
    throttle = make(clock)
    await fail(throttle, "192.0.2.1", "alice")
    await fail(throttle, "192.0.2.1", "bob")
    await (await throttle.admit("192.0.2.1", "mallory")).succeeded()
    await fail(throttle, "192.0.2.1", "carol")  # the third name with failures
    assert await retry_after(throttle, "192.0.2.1", "dave") == 300
    # alice's success removes her name from the address's count (so it has two names left) ...
    clock.now += 400
    await fail(throttle, "192.0.2.1", "alice")
    await fail(throttle, "192.0.2.1", "bob")
    await (await throttle.admit("192.0.2.1", "alice")).succeeded()
    await fail(throttle, "192.0.2.1", "carol")
    assert await retry_after(throttle, "192.0.2.1", "dave") is None
    # ... and not bob's, whose failure still counts.
    await fail(throttle, "192.0.2.1", "erin")
    assert await retry_after(throttle, "192.0.2.1", "dave") == 300


async def test_an_address_is_blocked_after_max_failures_names(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock)
    for user in ("alice", "bob", "carol"):
        await fail(throttle, "192.0.2.1", user)
    assert await retry_after(throttle, "192.0.2.1", "dave") == 300
    assert await retry_after(throttle, "192.0.2.2", "alice") is None


async def test_parallel_guesses_at_many_names_take_the_address_budget_first(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock, max_failures=5)
    admitted = 0
    for n in range(60):
        try:
            await throttle.admit("192.0.2.1", f"user{n}")
            admitted += 1
        except Throttled:
            pass
    assert admitted == 5


async def test_one_colleague_mistyping_does_not_block_a_shared_address(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    """Shared addresses: the typist's pair is blocked; colleagues behind the same NAT are not."""
    throttle = make(clock)
    await fail(throttle, "198.51.100.1", "alice", 3)
    assert await retry_after(throttle, "198.51.100.1", "alice") == 300
    for colleague in ("bob", "carol", "dave"):
        await (await throttle.admit("198.51.100.1", colleague)).succeeded()
    await fail(throttle, "198.51.100.1", "bob")  # a second typist counts as a second name
    assert await retry_after(throttle, "198.51.100.1", "carol") is None


async def test_guessing_one_name_from_many_addresses_is_slowed_not_blocked(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    """No lockout by name: many addresses share a slow rate for the name, never a block."""
    throttle = make(clock, max_failures_per_user=6)
    for n in range(6):
        await fail(throttle, f"203.0.113.{n}", "alice")
    # The rate is spent: a seventh address waits until the oldest failure leaves the window.
    assert await retry_after(throttle, "203.0.113.99", "alice") == 60
    clock.now += 30
    assert await retry_after(throttle, "203.0.113.99", "alice") == 30
    clock.now += 30
    assert await retry_after(throttle, "203.0.113.99", "alice") is None
    # Other names are untouched.
    assert await retry_after(throttle, "203.0.113.99", "bob") is None


async def test_the_owner_from_a_known_address_is_exempt_from_the_names_rate(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock, max_failures_per_user=6, known_client_ttl=3600)
    await (await throttle.admit("192.0.2.50", "alice")).succeeded()
    for n in range(6):
        await fail(throttle, f"203.0.113.{n}", "alice")
    assert await retry_after(throttle, "203.0.113.99", "alice") is not None
    assert await retry_after(throttle, "192.0.2.50", "alice") is None
    # The owner's own typos there still meet the pair's hard limit.
    await fail(throttle, "192.0.2.50", "alice", 3)
    assert await retry_after(throttle, "192.0.2.50", "alice") == 300
    # An address is known for known_client_ttl after its last success.
    clock.now += 3601
    for n in range(6):
        await fail(throttle, f"203.0.113.{n}", "alice")
    assert await retry_after(throttle, "192.0.2.50", "alice") is not None


async def test_one_guessing_address_leaves_the_owner_a_fresh_address(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock)  # max_failures_per_user defaults to twice max_failures
    await fail(throttle, "203.0.113.1", "alice", 3)
    assert await retry_after(throttle, "203.0.113.1", "alice") == 300
    await (await throttle.admit("192.0.2.7", "alice")).succeeded()


async def test_block_expires_by_itself_and_the_count_starts_afresh(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock)
    await fail(throttle, "192.0.2.1", "alice", 3)
    clock.now += 299.5
    assert await retry_after(throttle, "192.0.2.1", "alice") == pytest.approx(0.5)
    clock.now += 0.5
    assert await retry_after(throttle, "192.0.2.1", "alice") is None
    await fail(throttle, "192.0.2.1", "alice", 2)
    assert await retry_after(throttle, "192.0.2.1", "alice") is None


async def test_failures_during_a_block_do_not_extend_it(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock)
    held = await throttle.admit("192.0.2.1", "alice")  # a check already running
    for user in ("bob", "carol", "alice"):
        await fail(throttle, "192.0.2.1", user)
    assert await retry_after(throttle, "192.0.2.1", "dave") == 300
    clock.now += 200
    await held.failed()
    assert await retry_after(throttle, "192.0.2.1", "dave") == 100


async def test_the_window_slides(clock: Clock, make: Callable[..., Throttle]) -> None:
    throttle = make(clock)
    await fail(throttle, "192.0.2.1", "alice")
    clock.now += 40
    await fail(throttle, "192.0.2.1", "alice")
    clock.now += 30  # the first failure is now 70 s old: out of the window
    await fail(throttle, "192.0.2.1", "alice")
    assert await retry_after(throttle, "192.0.2.1", "alice") is None
    clock.now += 20  # the second is 50 s old: still in
    await fail(throttle, "192.0.2.1", "alice")
    assert await retry_after(throttle, "192.0.2.1", "alice") == 300


async def test_slow_guessing_is_never_blocked(clock: Clock, make: Callable[..., Throttle]) -> None:
    throttle = make(clock)
    for _ in range(100):
        await fail(throttle, "192.0.2.1", "alice")
        assert await retry_after(throttle, "192.0.2.1", "alice") is None
        clock.now += 30.01


async def test_ipv6_counts_per_64(clock: Clock, make: Callable[..., Throttle]) -> None:
    throttle = make(clock)
    for n in range(1, 4):
        await fail(throttle, f"2001:db8:1:2::{n:x}", f"user{n}")
    assert await retry_after(throttle, "2001:db8:1:2:ffff:ffff:ffff:ffff", "other") == 300
    assert await retry_after(throttle, "2001:db8:1:3::1", "other") is None


async def test_ipv4_mapped_addresses_count_as_ipv4(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock)
    for n in range(3):
        await fail(throttle, "::ffff:192.0.2.1" if n % 2 else "192.0.2.1", f"user{n}")
    assert await retry_after(throttle, "192.0.2.1", "other") == 300
    assert await retry_after(throttle, "::ffff:192.0.2.1", "other") == 300


async def test_addresses_that_are_not_ip_addresses_are_keys_as_they_are(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    throttle = make(clock, max_failures=1)
    await fail(throttle, "unix-socket", "alice")
    assert await retry_after(throttle, "unix-socket", "bob") == 300
    assert await retry_after(throttle, "fe80::1%eth0", "bob") is None


async def test_memory_is_bounded(clock: Clock) -> None:
    store = MemoryStore(max_keys=50)
    throttle = Throttle(3, window=60, block=300, clock=clock, store=store)
    for n in range(10_000):
        await fail(throttle, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", "x" * 4000 + str(n))
        assert len(store) <= 50
        clock.now += 0.001
    assert len(store) == 50


async def test_blocked_keys_outlive_a_flood_of_unblocked_ones(clock: Clock) -> None:
    store = MemoryStore(max_keys=10)
    throttle = Throttle(3, window=60, block=300, clock=clock, store=store)
    await fail(throttle, "192.0.2.1", "alice", 3)
    for n in range(1000):
        await fail(throttle, f"10.0.{n >> 8}.{n & 255}", f"user{n}")
    assert await retry_after(throttle, "192.0.2.1", "alice") == 300


async def test_stale_keys_are_forgotten(clock: Clock) -> None:
    store = MemoryStore()
    throttle = Throttle(3, window=60, block=300, clock=clock, store=store)
    for n in range(20):
        await fail(throttle, f"10.0.0.{n}", f"user{n}")
    assert len(store) == 60  # pair, address and name for each
    clock.now += 61
    for n in range(20):
        assert await retry_after(throttle, f"10.0.0.{n}", f"user{n}") is None
    assert len(store) == 0


async def test_a_reservation_lost_with_its_worker_lapses_after_the_lease(
    clock: Clock, make: Callable[..., Throttle]
) -> None:
    """A worker that dies mid-check never settles its reservations: they must not hold the
    pair's budget for ever in a store that outlives the worker."""
    throttle = make(clock)
    for _ in range(3):
        await throttle.admit("192.0.2.1", "alice")  # never settled
    assert await retry_after(throttle, "192.0.2.1", "alice") is not None
    clock.now += RESERVATION_LEASE + 1
    assert await retry_after(throttle, "192.0.2.1", "alice") is None


async def test_redis_forgets_keys_when_their_failures_and_blocks_end(
    clock: Clock, redis_server: RedisServer
) -> None:
    """Redis keeps nothing longer than the rules need: each key's TTL follows its contents."""
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    await admin.flushdb()
    store = RedisStore(redis_server.url)
    throttle = Throttle(3, window=60, block=300, clock=clock, store=store)
    try:
        await fail(throttle, "192.0.2.1", "alice", 2)
        ttls = {key: await admin.pttl(key) for key in await admin.keys("*")}
        assert len(ttls) == 3 and all(55_000 < ttl <= 60_000 for ttl in ttls.values()), ttls
        await fail(throttle, "192.0.2.1", "alice")
        pair = next(key for key in ttls if b":pair:" in key)
        assert 295_000 < await admin.pttl(pair) <= 300_000  # blocked: kept for the block
        await (await throttle.admit("192.0.2.2", "bob")).succeeded()
        # Known addresses have no TTL, so `volatile-ttl` never evicts them: the script ends them.
        known = [key for key in await admin.keys("*") if b":known" in key]
        assert len(known) == 2 and [await admin.pttl(key) for key in known] == [-1, -1]
    finally:
        await store.close()
        await admin.aclose()


@pytest.mark.parametrize(
    "arguments",
    [
        {"max_failures": 0, "window": 60, "block": 60},
        {"max_failures": 3, "window": 0, "block": 60},
        {"max_failures": 3, "window": 60, "block": -1},
        {"max_failures": 3, "window": 60, "block": 60, "max_failures_per_user": 0},
        {"max_failures": 3, "window": 60, "block": 60, "known_client_ttl": 0},
    ],
)
def test_refuses_unusable_settings(arguments: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Throttle(**arguments)  # type: ignore[arg-type]


def test_the_store_refuses_no_room() -> None:
    with pytest.raises(ValueError):
        MemoryStore(max_keys=0)
