"""What a password check, a hashing call or an upstream request reserves is given back exactly
once, whichever way it ends: success, failure, refusal, a full pool or cancellation."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from yarl import URL

from proxy.auth.hashpool import Busy, FairPool
from proxy.auth.htpasswd import BUSY_RETRY_AFTER
from proxy.auth.pacing import RefusalPacer
from proxy.exchange import Exchange
from proxy.identity import AuthFailure, AuthOutcome, Identity
from proxy.metrics import Metrics
from proxy.paths import Action, Target
from proxy.relay.forward import Forwarder
from proxy.relay.slots import UpstreamSlots
from proxy.throttle.policy import Throttle, Throttled
from proxy.throttle.store import (
    RESERVATION_LEASE,
    Entry,
    MemoryStore,
    StoreUnavailable,
    ThrottleStore,
)
from proxy.throttle.supervisor import HostStoreClient
from tests.support import eventually
from tests.support.clock import Clock
from tests.support.doubles import (
    RIGHT,
    STORES,
    GatedHash,
    authenticator,
    gated_hash,
    login,
    open_store,
)

WINDOW = 60.0


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ThrottleStore]:
    """Each rule holds on every store: this process's, the supervisor's and Redis."""
    async with open_store(request) as opened:
        yield opened


class Ledger:
    """A `ThrottleStore` around another that remembers every key touched and counts each
    member's reservations taken and given back (a commit gives one back too)."""

    def __init__(self, inner: ThrottleStore) -> None:
        self.inner = inner
        self.keys: set[str] = set()
        self.balance: Counter[tuple[str, str]] = Counter()
        self.overdrawn: list[tuple[str, str]] = []
        # See `pause`.
        self._pause: tuple[str, int, asyncio.Event] | None = None
        self.calls: Counter[str] = Counter()
        self.paused = 0

    def pause(self, call: str, after: int = 0) -> None:
        """Make every `call` (reserve, commit, release) after the first `after` wait until
        `resume`: as a shared store's round trip would, a check stops there half-way."""
        self._pause = (call, after, asyncio.Event())

    def resume(self) -> None:
        if self._pause is not None:
            self._pause[2].set()

    async def _called(self, call: str) -> None:
        self.calls[call] += 1
        if self._pause is not None:
            name, after, resumed = self._pause
            if name == call and self.calls[call] > after:
                self.paused += 1
                await resumed.wait()

    async def get(self, key: str, window: float, now: float) -> Entry:
        return await self.inner.get(key, window, now)

    async def reserve(
        self, key: str, member: str, limit: int, window: float, now: float
    ) -> Entry | None:
        self.keys.add(key)
        await self._called("reserve")
        refused = await self.inner.reserve(key, member, limit, window, now)
        if refused is None:
            self.balance[key, member] += 1
        return refused

    async def commit(
        self, key: str, member: str, window: float, now: float, *, limit: int = 0,
        block: float = 0,
    ) -> None:  # fmt: skip
        await self._called("commit")
        if not key.startswith("known:"):  # a success's mark, not a reservation's end
            self._give_back(key, member)
        await self.inner.commit(key, member, window, now, limit=limit, block=block)

    async def release(self, key: str, member: str, now: float) -> None:
        await self._called("release")
        self._give_back(key, member)
        await self.inner.release(key, member, now)

    async def clear(self, key: str, now: float, member: str | None = None) -> None:
        await self.inner.clear(key, now, member)

    async def remember(self, user: str, client: str, ttl: float, now: float) -> None:
        await self.inner.remember(user, client, ttl, now)

    async def recall(self, user: str, client: str, ttl: float, now: float) -> bool:
        return await self.inner.recall(user, client, ttl, now)

    async def end_sessions(self, user: str, before: float, until: float, now: float) -> None:
        await self.inner.end_sessions(user, before, until, now)

    async def sessions_ended(self, user: str, now: float) -> float | None:
        return await self.inner.sessions_ended(user, now)

    def _give_back(self, key: str, member: str) -> None:
        self.balance[key, member] -= 1
        if self.balance[key, member] < 0:
            self.overdrawn.append((key, member))

    def in_flight(self) -> dict[tuple[str, str], int]:
        """Reservations taken and not given back, by the policy's own calls."""
        return {held: n for held, n in self.balance.items() if n}

    async def reserved(self, now: float) -> dict[str, dict[str, int]]:
        """Reservations the store itself still holds, by key."""
        held = {key: (await self.inner.get(key, WINDOW, now)).reserved for key in self.keys}
        return {key: members for key, members in held.items() if members}

    async def failures(self, now: float) -> int:
        return sum([len((await self.inner.get(key, WINDOW, now)).failed) for key in self.keys])


async def settled_cleanly(ledger: Ledger, now: float) -> None:
    assert ledger.overdrawn == [], "a reservation was given back twice"
    assert ledger.in_flight() == {}
    assert await ledger.reserved(now) == {}


# --- The throttle's own settlements, on every store. ------------------------------------------


async def test_a_refused_admission_gives_back_the_budgets_it_took_first(
    store: ThrottleStore,
) -> None:
    """Guards `admit`: when a later budget (the name's rate) refuses, the pair's and the
    address's reservations already taken are given back, not left to lapse after the lease."""
    clock, ledger = Clock(), Ledger(store)
    throttle = Throttle(3, WINDOW, 300, clock, max_failures_per_user=1, store=ledger)
    await (await throttle.admit("192.0.2.1", "alice")).failed()  # the name's rate is spent
    with pytest.raises(Throttled):
        await throttle.admit("198.51.100.7", "alice")
    await settled_cleanly(ledger, clock.now)
    assert await ledger.failures(clock.now) == 3  # only the first check's pair, address, name


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "release"])
async def test_each_settlement_gives_back_every_reservation_once(
    store: ThrottleStore, outcome: str
) -> None:
    """Guards `Admission`: a settled check holds nothing, and settling it again (as a
    cancelled handler's cleanup may) gives back nothing of a check still running."""
    clock, ledger = Clock(), Ledger(store)
    throttle = Throttle(3, WINDOW, 300, clock, store=ledger)
    first = await throttle.admit("192.0.2.1", "alice")
    second = await throttle.admit("192.0.2.1", "alice")  # same address and name, in flight
    settle: Callable[[], Awaitable[None]] = getattr(first, outcome)
    await settle()
    for again in (first.succeeded, first.failed, first.release):
        await again()
    assert ledger.overdrawn == []
    # The second check's reservations are all still there, one for each budget.
    assert sorted(ledger.in_flight().values()) == [1, 1, 1]
    assert len(await ledger.reserved(clock.now)) == 3
    await second.release()
    await settled_cleanly(ledger, clock.now)
    expected = 3 if outcome == "failed" else 0
    assert await ledger.failures(clock.now) == expected


async def test_a_released_check_counts_as_no_failure(store: ThrottleStore) -> None:
    """Guards `release`: a check that never hashed (a full pool) spends no failure, so a
    client retrying after "busy" is not blocked by its retries."""
    clock, ledger = Clock(), Ledger(store)
    throttle = Throttle(2, WINDOW, 300, clock, store=ledger)
    for _ in range(10):
        await (await throttle.admit("192.0.2.1", "alice")).release()
    await settled_cleanly(ledger, clock.now)
    assert await ledger.failures(clock.now) == 0
    await (await throttle.admit("192.0.2.1", "alice")).release()


async def test_a_failure_turns_its_reservation_into_the_failure(store: ThrottleStore) -> None:
    """Guards `commit`: the failure replaces the reservation; a reservation left next to it
    would hold a place in the budget until the lease ends."""
    clock, ledger = Clock(), Ledger(store)
    throttle = Throttle(3, WINDOW, 300, clock, store=ledger)
    await (await throttle.admit("192.0.2.1", "alice")).failed()
    await settled_cleanly(ledger, clock.now)
    assert await ledger.failures(clock.now) == 3


async def cancel_half_way(ledger: Ledger, call: str, work: Coroutine[Any, Any, Any]) -> None:
    """Run `work` until the ledger holds its second `call`, cancel it there, let the store
    answer, and wait for every reservation to be settled."""
    ledger.pause(call, after=1)
    task = asyncio.create_task(work)
    await eventually(lambda: ledger.paused == 1, f"a second {call} to be sent")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    ledger.resume()
    await eventually(lambda: not ledger.in_flight(), "every reservation to be settled", 5)


async def test_a_check_cancelled_between_its_reservations_leaves_none_behind() -> None:
    """Guards `admit` against cancellation: a handler cancelled while its check waits for the
    store to take its second reservation gives back the first (else it holds a place in the
    pair's budget until the lease ends, in Redis across a rolling restart)."""
    clock, ledger = Clock(), Ledger(MemoryStore())
    throttle = Throttle(3, WINDOW, 300, clock, store=ledger)
    await cancel_half_way(ledger, "reserve", throttle.admit("192.0.2.1", "alice"))
    await settled_cleanly(ledger, clock.now)


@pytest.mark.parametrize(
    ("outcome", "call"), [("succeeded", "release"), ("failed", "commit"), ("release", "release")]
)
async def test_a_settlement_cancelled_half_way_still_reaches_every_budget(
    outcome: str, call: str
) -> None:
    """Guards `Admission` against cancellation: settling writes one key after another, and a
    cancellation between two of them must not leave the later ones reserved."""
    clock, ledger = Clock(), Ledger(MemoryStore())
    throttle = Throttle(3, WINDOW, 300, clock, store=ledger)
    admission = await throttle.admit("192.0.2.1", "alice")
    await cancel_half_way(ledger, call, getattr(admission, outcome)())
    await settled_cleanly(ledger, clock.now)
    assert await ledger.failures(clock.now) == (3 if outcome == "failed" else 0)


# --- The store's reservations, on every store. ------------------------------------------------


async def test_a_release_gives_back_one_reservation_of_the_member(store: ThrottleStore) -> None:
    """Guards `release`/`_unreserve`: a member reserved twice (two checks of one name at one
    address) holds its place until both are given back, and none is left at zero."""
    now = 1000.0
    assert await store.reserve("k", "alice", 1, WINDOW, now) is None
    assert await store.reserve("k", "alice", 1, WINDOW, now) is None
    await store.release("k", "alice", now)
    assert await store.reserve("k", "bob", 1, WINDOW, now) is not None  # alice's still held
    assert (await store.get("k", WINDOW, now)).reserved == {"alice": 1}
    await store.release("k", "alice", now)
    assert (await store.get("k", WINDOW, now)).reserved == {}
    assert await store.reserve("k", "bob", 1, WINDOW, now) is None


async def test_releasing_what_was_never_reserved_gives_back_nothing(
    store: ThrottleStore,
) -> None:
    """Guards `release`: a stray release (of another member, or after a commit) leaves the
    other reservations and the failures as they were."""
    now = 1000.0
    assert await store.reserve("k", "alice", 2, WINDOW, now) is None
    await store.release("k", "bob", now)
    await store.commit("k", "carol", WINDOW, now)
    await store.release("k", "carol", now)
    entry = await store.get("k", WINDOW, now)
    assert (entry.reserved, set(entry.failed)) == ({"alice": 1}, {"carol"})


async def test_a_reservation_lapses_exactly_at_its_lease(store: ThrottleStore) -> None:
    """Guards the lease's boundary: a reservation taken at t still holds just before
    t + lease and is gone at t + lease, as a failure leaves its window."""
    now = 1000.0
    assert await store.reserve("k", "alice", 1, WINDOW, now) is None
    assert await store.reserve("k", "bob", 1, WINDOW, now + RESERVATION_LEASE - 0.5) is not None
    assert await store.reserve("k", "bob", 1, WINDOW, now + RESERVATION_LEASE) is None


async def test_a_lease_runs_from_the_members_latest_reservation(store: ThrottleStore) -> None:
    """Guards `reserve`: a second check of the same member renews the lease, so a check that
    is still running is not dropped because an earlier one of its name started long ago."""
    now = 1000.0
    assert await store.reserve("k", "alice", 1, WINDOW, now) is None
    assert await store.reserve("k", "alice", 1, WINDOW, now + 500) is None
    assert await store.reserve("k", "bob", 1, WINDOW, now + RESERVATION_LEASE + 1) is not None


async def test_a_memory_store_keeps_no_key_once_everything_is_given_back() -> None:
    """Guards `MemoryStore.release`: an emptied key is dropped, so reservations given back
    at once (most refused checks) do not fill the store's bound."""
    clock, store = Clock(), MemoryStore()
    throttle = Throttle(3, WINDOW, 300, clock, store=store)
    for n in range(50):
        await (await throttle.admit(f"10.0.0.{n}", f"user{n}")).release()
    assert len(store) == 0


async def test_a_full_memory_store_never_evicts_a_key_with_a_check_in_flight() -> None:
    """Guards eviction: a key holding a reservation stays while unreserved keys remain, so a
    flood of failures cannot erase a running check's reservation (and let it be given back
    into nothing, or its pair slip past its budget)."""
    store = MemoryStore(max_keys=3)
    now = 1000.0
    assert await store.reserve("running", "alice", 1, WINDOW, now) is None
    for n in range(10):
        await store.commit(f"failed{n}", "x", WINDOW, now)
    assert (await store.get("running", WINDOW, now)).reserved == {"alice": 1}


# --- The htpasswd authenticator: refusals and cancellations hand everything back. -------------


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedHash]:
    yield from gated_hash(monkeypatch)


class Site:
    """An htpasswd authenticator whose throttle counts on a `Ledger`."""

    def __init__(self, max_failures: int = 5, max_pending: int = 10) -> None:
        self.clock = Clock()
        self.ledger = Ledger(MemoryStore())
        throttle = Throttle(max_failures, WINDOW, 300, self.clock, store=self.ledger)
        pacer = RefusalPacer(clock=self.clock)
        self.auth, self.checker = authenticator(throttle, pacer, max_pending)

    def login(self, password: str) -> asyncio.Task[Any]:
        return login(self.auth, "192.0.2.1", password)

    def close(self) -> None:
        self.checker.close()


@pytest.fixture
def site() -> Iterator[Site]:
    made = Site()
    yield made
    made.close()


async def test_a_check_cancelled_while_hashing_counts_as_one_failure(
    gate: GatedHash, site: Site
) -> None:
    """Guards the authenticator's cancellation path: a handler cancelled mid-hash settles its
    reservations as a failure (a guesser cannot hang up to spend nothing), leaving none held."""
    login = site.login("guess")
    await eventually(lambda: gate.started == 1, "the hash to start")
    login.cancel()
    with pytest.raises(asyncio.CancelledError):
        await login
    await settled_cleanly(site.ledger, site.clock.now)
    assert await site.ledger.failures(site.clock.now) == 3
    gate.opened.set()


async def test_a_second_cancellation_cannot_interrupt_settling_the_check(
    gate: GatedHash, site: Site
) -> None:
    """Guards the shield around settling a cancelled check: cancelled again while its failure
    is being written (a drain's deadline after the client left), every budget still gets it."""
    site.ledger.pause("commit")
    login = site.login("guess")
    await eventually(lambda: gate.started == 1, "the hash to start")
    login.cancel()
    await eventually(lambda: site.ledger.paused == 1, "the failure to be written")
    login.cancel()
    with pytest.raises(asyncio.CancelledError):
        await login
    site.ledger.resume()
    await eventually(lambda: not site.ledger.in_flight(), "the failure to reach every budget")
    await settled_cleanly(site.ledger, site.clock.now)
    assert await site.ledger.failures(site.clock.now) == 3
    gate.opened.set()


async def test_a_check_refused_for_a_full_pool_gives_its_reservations_back(
    gate: GatedHash,
) -> None:
    """Guards the `Busy` path: a check refused because the client's share of the hashing
    pool is full spends no failure and holds no reservation."""
    site = Site(max_failures=5, max_pending=1)
    try:
        first = site.login("guess-1")
        await eventually(lambda: gate.started == 1, "the first hash to start")
        refused = await site.login("guess-2")
        assert isinstance(refused, AuthFailure)
        assert (refused.how, refused.retry_after) == (AuthOutcome.THROTTLED, BUSY_RETRY_AFTER)
        assert sorted(site.ledger.in_flight().values()) == [1, 1, 1]  # the first check's own
        gate.opened.set()
        assert isinstance(await first, AuthFailure)
        await settled_cleanly(site.ledger, site.clock.now)
        assert await site.ledger.failures(site.clock.now) == 3
    finally:
        site.close()


async def test_a_correct_password_leaves_nothing_reserved(gate: GatedHash, site: Site) -> None:
    """Guards the success path: reservations back, and no failure counted."""
    gate.opened.set()
    assert isinstance(await site.login(RIGHT), Identity)
    await settled_cleanly(site.ledger, site.clock.now)
    assert await site.ledger.failures(site.clock.now) == 0


async def test_a_throttled_login_reserves_nothing(gate: GatedHash) -> None:
    """Guards the refusal path: a throttled check (429) holds nothing and counts nothing."""
    gate.opened.set()
    site = Site(max_failures=1)
    try:
        assert isinstance(await site.login("guess"), AuthFailure)
        throttled = await site.login("guess again")
        assert isinstance(throttled, AuthFailure) and throttled.how is AuthOutcome.THROTTLED
        await settled_cleanly(site.ledger, site.clock.now)
        assert await site.ledger.failures(site.clock.now) == 3
    finally:
        site.close()


# --- The hashing pool: a caller that gives up frees its place. --------------------------------


async def test_a_call_cancelled_while_running_frees_its_place_when_it_ends() -> None:
    """Guards `FairPool._finished`: a caller cancelled while its hash runs (a client that hung
    up) gets its place in the queue back once the thread is done, not never."""
    opened = threading.Event()
    pool = FairPool(workers=1, max_pending=1)
    try:
        running = pool.run("client", lambda: opened.wait(10))
        await asyncio.sleep(0)
        running.cancel()
        with pytest.raises(Busy):
            pool.run("client", lambda: True)  # still running: the place is still taken
        opened.set()
        await eventually(lambda: pool.pending("client") == 0, "the place to be freed")
        assert await pool.run("client", lambda: "next") == "next"
    finally:
        opened.set()
        pool.close()


async def test_calls_cancelled_while_queued_free_their_places_and_threads() -> None:
    """Guards `FairPool._dispatch`: queued calls cancelled before running free their places,
    and the thread goes to the next call rather than idling."""
    opened = threading.Event()
    pool = FairPool(workers=1, max_pending=3)
    try:
        first = pool.run("a", lambda: opened.wait(10))
        queued = [pool.run("a", lambda: "never") for _ in range(2)]
        for future in queued:
            future.cancel()
        assert pool.pending("a") == 3
        opened.set()
        assert await first is True
        await eventually(lambda: pool.pending("a") == 0, "the cancelled places to be freed")
        assert await asyncio.gather(*(pool.run("a", lambda: "x") for _ in range(3))) == ["x"] * 3
    finally:
        opened.set()
        pool.close()


# --- Upstream slots: a waiter that gives up takes nothing with it. ----------------------------


async def test_a_waiter_handed_a_slot_as_it_is_cancelled_gives_the_slot_back() -> None:
    """Guards `UpstreamSlots.acquire`: a slot handed on to a request that is cancelled before
    it resumes (its client left) is released, or the pool shrinks by one for good."""
    slots = UpstreamSlots(total=1, per_user=1, wait=30)
    assert await slots.acquire("alice")
    bob = asyncio.create_task(slots.acquire("bob"))
    await eventually(lambda: slots.waiting == 1, "bob to queue")
    slots.release("alice")  # handed to bob's waiter...
    bob.cancel()  # ...who is cancelled before running again
    with pytest.raises(asyncio.CancelledError):
        await bob
    assert (slots.in_use, slots.held_by("bob"), slots.waiting) == (0, 0, 0)
    assert await slots.acquire("carol")


async def test_a_cancelled_waiter_leaves_the_queue_and_is_never_handed_a_slot() -> None:
    """Guards `UpstreamSlots.acquire` and `release`: a waiter cancelled before the slot frees
    leaves the queue, and a release in between passes over it to the next waiter."""
    slots = UpstreamSlots(total=1, per_user=1, wait=30)
    assert await slots.acquire("alice")
    bob = asyncio.create_task(slots.acquire("bob"))
    await eventually(lambda: slots.waiting == 1, "bob to queue")
    carol = asyncio.create_task(slots.acquire("carol"))
    await eventually(lambda: slots.waiting == 2, "carol to queue")
    bob.cancel()
    slots.release("alice")  # bob's wait is cancelled but has not run yet: carol's turn
    with pytest.raises(asyncio.CancelledError):
        await bob
    assert await carol
    assert (slots.in_use, slots.held_by("bob"), slots.held_by("carol")) == (1, 0, 1)
    assert slots.waiting == 0


async def test_a_waiter_that_times_out_leaves_the_queue() -> None:
    """Guards the wait's timeout: the request that gave up is no longer counted as waiting
    (the gauge) and takes no slot freed later."""
    slots = UpstreamSlots(total=1, per_user=1, wait=0.05)
    assert await slots.acquire("alice")
    assert not await slots.acquire("bob")
    assert slots.waiting == 0
    slots.release("alice")
    assert (slots.in_use, slots.held_by("bob")) == (0, 0)


async def test_a_forward_cancelled_mid_request_gives_its_upstream_slot_back() -> None:
    """Guards `Forwarder.__call__`: a request cancelled while it holds an upstream slot (its
    handler cancelled at the drain's deadline) releases the slot like any other ending."""
    slots = UpstreamSlots(total=1, per_user=1, wait=30)
    stalled = asyncio.Event()

    async def stalls(
        request: web.Request, exchange: Exchange, query: str | None
    ) -> web.StreamResponse:
        stalled.set()
        await asyncio.Event().wait()
        raise AssertionError("never set")

    async def fails(
        request: web.Request, exchange: Exchange, query: str | None
    ) -> web.StreamResponse:
        raise ConnectionResetError("client went away")

    forwarder = Forwarder(
        None,  # type: ignore[arg-type]  # the fast paths here never reach the session
        URL("http://127.0.0.1:9"),
        Metrics(),
        body_timeout=30,
        slots=slots,
    )
    request = make_mocked_request("GET", "/v2/app/blobs/sha256:" + "0" * 64)
    exchange = Exchange(client="192.0.2.1", scheme="http", target=Target(Action.BLOB))
    exchange.user = "alice"
    forwarding = asyncio.create_task(forwarder(request, exchange, fast=stalls))
    await stalled.wait()
    assert slots.held_by("alice") == 1
    forwarding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await forwarding
    assert (slots.in_use, slots.held_by("alice")) == (0, 0)
    with pytest.raises(ConnectionResetError):
        await forwarder(request, exchange, fast=fails)
    assert (slots.in_use, slots.held_by("alice")) == (0, 0)


# --- The supervisor's store: calls waiting when it goes away. ---------------------------------


async def test_calls_waiting_when_the_supervisor_goes_away_fail_at_once() -> None:
    """Guards `HostStoreClient._disconnect`: a settlement in flight when the supervisor's end
    closes fails then (and falls back), rather than hang until its own timeout as if the
    supervisor were only slow; later calls fail at once too."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = HostStoreClient(theirs)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    try:
        releasing = asyncio.create_task(client.release("k", "alice", 1000.0))
        assert json.loads(await reader.readline()) == ["release", "k", "alice", 1000.0]
        writer.close()
        with pytest.raises(StoreUnavailable, match="closed the connection"):
            await releasing
        with pytest.raises(StoreUnavailable, match="is closed"):
            await client.commit("k", "alice", WINDOW, 1000.0)
    finally:
        await client.close()
