"""Pacing of refusals per address, driven by an injected clock."""

from __future__ import annotations

from proxy.auth.pacing import RefusalPacer
from tests.support.clock import Clock


def test_a_burst_of_refusals_goes_out_at_once_then_they_are_held() -> None:
    """Fairness: an address resending at once after 429 is slowed, not answered at full speed."""
    pacer = RefusalPacer(burst=100, per_second=100, delay=1.0, clock=Clock())
    assert [pacer.delay_for("192.0.2.1") for _ in range(100)] == [0.0] * 100
    assert pacer.delay_for("192.0.2.1") == 1.0
    assert pacer.delay_for("192.0.2.2") == 0.0  # other addresses have their own burst


def test_refusals_at_the_refill_rate_are_never_held() -> None:
    clock = Clock()
    pacer = RefusalPacer(burst=10, per_second=100, delay=1.0, clock=clock)
    for _ in range(10):
        pacer.delay_for("192.0.2.1")
    for _ in range(1000):
        clock.now += 0.01
        assert pacer.delay_for("192.0.2.1") == 0.0


def test_the_burst_refills() -> None:
    clock = Clock()
    pacer = RefusalPacer(burst=5, per_second=1, delay=2.0, clock=clock)
    for _ in range(5):
        pacer.delay_for("192.0.2.1")
    assert pacer.delay_for("192.0.2.1") == 2.0
    clock.now += 5
    assert [pacer.delay_for("192.0.2.1") for _ in range(5)] == [0.0] * 5


def test_memory_is_bounded() -> None:
    pacer = RefusalPacer(burst=1, clock=Clock(), max_keys=10)
    for n in range(1000):
        pacer.delay_for(f"10.0.{n >> 8}.{n & 255}")
    assert len(pacer._buckets) == 10
