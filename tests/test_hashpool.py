"""The fair hashing pool: clients served in turn, each with a capped queue."""

from __future__ import annotations

import asyncio
import threading
from functools import partial

import pytest

from proxy.auth.hashpool import Busy, FairPool
from tests.support import eventually


class Gate:
    """Blocking calls that wait until the test opens them, recording the order they ran."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.order: list[str] = []
        self.lock = threading.Lock()
        self.waiting = 0
        self.started: list[str] = []

    def call(self, name: str) -> str:
        with self.lock:
            self.waiting += 1
            self.started.append(name)
        self.opened.wait(10)
        self.order.append(name)
        return name


async def test_a_flood_from_one_client_does_not_hold_back_another() -> None:
    """Fairness: a newcomer's call runs after the calls in flight, not after the whole flood."""
    pool, gate = FairPool(workers=1, max_pending=100), Gate()
    flood = [pool.run("flooder", partial(gate.call, f"f{n}")) for n in range(50)]
    newcomer = pool.run("newcomer", lambda: gate.call("newcomer"))
    gate.opened.set()
    assert await newcomer == "newcomer"
    await asyncio.gather(*flood)
    assert gate.order.index("newcomer") == 1  # only the flood's first call ran before it
    pool.close()


async def test_clients_take_turns() -> None:
    """After the call already running, the newest client first, then each client in turn."""
    pool, gate = FairPool(workers=1, max_pending=100), Gate()
    calls = [
        pool.run(client, partial(gate.call, f"{client}{n}")) for client in "abc" for n in range(3)
    ]
    gate.opened.set()
    await asyncio.gather(*calls)
    assert gate.order == ["a0", "c0", "b0", "a1", "c1", "b1", "a2", "c2", "b2"]
    pool.close()


async def test_calls_past_a_clients_cap_are_refused_at_once() -> None:
    pool, gate = FairPool(workers=1, max_pending=3), Gate()
    held = [pool.run("a", lambda: gate.call("a")) for _ in range(3)]
    with pytest.raises(Busy):
        pool.run("a", lambda: gate.call("a"))
    other = pool.run("b", lambda: gate.call("b"))
    assert pool.pending("a") == 3
    gate.opened.set()
    await asyncio.gather(*held, other)
    assert pool.pending("a") == 0
    assert await pool.run("a", lambda: gate.call("again")) == "again"
    pool.close()


async def test_a_call_cancelled_while_queued_never_runs_and_frees_its_place() -> None:
    pool, gate = FairPool(workers=1, max_pending=2), Gate()
    first = pool.run("a", lambda: gate.call("first"))
    queued = pool.run("a", lambda: gate.call("cancelled"))
    queued.cancel()
    gate.opened.set()
    await first
    assert await pool.run("a", lambda: gate.call("next")) == "next"
    assert gate.order == ["first", "next"]
    pool.close()


async def test_errors_reach_the_caller() -> None:
    pool = FairPool(workers=2, max_pending=2)

    def broken() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await pool.run("a", broken)
    assert pool.pending("a") == 0
    pool.close()


def test_refuses_unusable_sizes() -> None:
    with pytest.raises(ValueError):
        FairPool(workers=0, max_pending=1)
    with pytest.raises(ValueError):
        FairPool(workers=1, max_pending=0)


async def test_one_client_runs_on_at_most_half_the_threads() -> None:
    """Fairness: a flood leaves a thread free, so a newcomer does not wait for a running hash."""
    pool, gate = FairPool(workers=2, max_pending=100), Gate()
    flood = [pool.run("flooder", partial(gate.call, f"f{n}")) for n in range(5)]
    newcomer = pool.run("newcomer", partial(gate.call, "newcomer"))
    # One flood call holds a thread (blocked on the gate); the newcomer has the other.
    await eventually(lambda: gate.waiting == 2, "two calls running")
    assert sorted(gate.started) == ["f0", "newcomer"]
    gate.opened.set()
    await asyncio.gather(newcomer, *flood)
    pool.close()
