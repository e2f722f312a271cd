"""The password-guessing throttle, driven by an injected clock."""

from __future__ import annotations

import pytest

from proxy.throttle import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, max_failures: int = 3, **kwargs: int) -> Throttle:
    return Throttle(max_failures, window=60, block=300, clock=clock, **kwargs)


def test_blocks_after_max_failures(clock: Clock) -> None:
    throttle = make(clock)
    for _ in range(2):
        throttle.record_failure("192.0.2.1", "alice")
        assert throttle.blocked("192.0.2.1", "alice") is None
    throttle.record_failure("192.0.2.1", "alice")
    assert throttle.blocked("192.0.2.1", "alice") == 300
    clock.now += 100
    assert throttle.blocked("192.0.2.1", "alice") == 200


def test_block_expires_by_itself_and_the_count_starts_afresh(clock: Clock) -> None:
    throttle = make(clock)
    for _ in range(3):
        throttle.record_failure("192.0.2.1", "alice")
    clock.now += 299.5
    assert throttle.blocked("192.0.2.1", "alice") == pytest.approx(0.5)
    clock.now += 0.5
    assert throttle.blocked("192.0.2.1", "alice") is None
    throttle.record_failure("192.0.2.1", "alice")
    assert throttle.blocked("192.0.2.1", "alice") is None
    assert throttle.tracked == 2


def test_failures_during_a_block_do_not_extend_it(clock: Clock) -> None:
    throttle = make(clock)
    for _ in range(3):
        throttle.record_failure("192.0.2.1", "alice")
    clock.now += 200
    throttle.record_failure("192.0.2.1", "alice")
    assert throttle.blocked("192.0.2.1", "alice") == 100


def test_the_window_slides(clock: Clock) -> None:
    throttle = make(clock)
    throttle.record_failure("192.0.2.1", "alice")
    clock.now += 40
    throttle.record_failure("192.0.2.1", "alice")
    clock.now += 30  # the first failure is now 70 s old: out of the window
    throttle.record_failure("192.0.2.1", "alice")
    assert throttle.blocked("192.0.2.1", "alice") is None
    clock.now += 20  # the second is 50 s old: still in
    throttle.record_failure("192.0.2.1", "alice")
    assert throttle.blocked("192.0.2.1", "alice") == 300


def test_slow_guessing_is_never_blocked(clock: Clock) -> None:
    throttle = make(clock)
    for _ in range(100):
        throttle.record_failure("192.0.2.1", "alice")
        assert throttle.blocked("192.0.2.1", "alice") is None
        clock.now += 30.01


def test_a_user_is_blocked_from_every_address(clock: Clock) -> None:
    throttle = make(clock)
    for n in range(3):
        throttle.record_failure(f"192.0.2.{n}", "alice")
    assert throttle.blocked("198.51.100.7", "alice") == 300
    # The addresses themselves had one failure each, so other users pass.
    assert throttle.blocked("192.0.2.0", "bob") is None


def test_an_address_is_blocked_for_every_user(clock: Clock) -> None:
    throttle = make(clock)
    for user in ("alice", "bob", "carol"):
        throttle.record_failure("192.0.2.1", user)
    assert throttle.blocked("192.0.2.1", "dave") == 300
    assert throttle.blocked("192.0.2.2", "alice") is None


def test_blocked_reports_the_later_of_two_blocks(clock: Clock) -> None:
    throttle = make(clock)
    for _ in range(3):
        throttle.record_failure("192.0.2.1", "alice")
    clock.now += 100
    for n in range(3):
        throttle.record_failure(f"198.51.100.{n}", "bob")
    assert throttle.blocked("192.0.2.1", "bob") == 300
    assert throttle.blocked("192.0.2.1", "carol") == 200


def test_success_clears_the_user_not_the_address(clock: Clock) -> None:
    throttle = make(clock)
    for _ in range(2):
        throttle.record_failure("192.0.2.1", "alice")
    throttle.record_success("192.0.2.1", "alice")
    throttle.record_failure("192.0.2.2", "alice")
    throttle.record_failure("192.0.2.2", "alice")
    assert throttle.blocked("192.0.2.2", "alice") is None
    # The first address still has its two failures: one more (any user) blocks it.
    throttle.record_failure("192.0.2.1", "bob")
    assert throttle.blocked("192.0.2.1", "zed") == 300


def test_success_ends_a_users_block(clock: Clock) -> None:
    throttle = make(clock)
    for n in range(3):
        throttle.record_failure(f"192.0.2.{n}", "alice")
    throttle.record_success("192.0.2.9", "alice")
    assert throttle.blocked("192.0.2.9", "alice") is None


def test_ipv6_counts_per_64(clock: Clock) -> None:
    throttle = make(clock)
    for n in range(1, 4):
        throttle.record_failure(f"2001:db8:1:2::{n:x}", f"user{n}")
    assert throttle.blocked("2001:db8:1:2:ffff:ffff:ffff:ffff", "other") == 300
    assert throttle.blocked("2001:db8:1:3::1", "other") is None


def test_ipv4_mapped_addresses_count_as_ipv4(clock: Clock) -> None:
    throttle = make(clock)
    for n in range(3):
        throttle.record_failure("::ffff:192.0.2.1" if n % 2 else "192.0.2.1", f"user{n}")
    assert throttle.blocked("192.0.2.1", "other") == 300
    assert throttle.blocked("::ffff:192.0.2.1", "other") == 300


def test_addresses_that_are_not_ip_addresses_are_keys_as_they_are(clock: Clock) -> None:
    throttle = make(clock, max_failures=1)
    throttle.record_failure("unix-socket", "alice")
    assert throttle.blocked("unix-socket", "bob") == 300
    assert throttle.blocked("fe80::1%eth0", "bob") is None


def test_a_limit_of_one_blocks_at_the_first_failure(clock: Clock) -> None:
    throttle = make(clock, max_failures=1)
    throttle.record_failure("192.0.2.1", "alice")
    assert throttle.blocked("192.0.2.1", "alice") == 300


def test_memory_is_bounded(clock: Clock) -> None:
    throttle = make(clock, max_keys=50)
    for n in range(10_000):
        throttle.record_failure(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", "x" * 4000 + str(n))
        assert throttle.tracked <= 100
        clock.now += 0.001
    assert throttle.tracked == 100


def test_blocked_keys_outlive_a_flood_of_unblocked_ones(clock: Clock) -> None:
    throttle = make(clock, max_keys=10)
    for _ in range(3):
        throttle.record_failure("192.0.2.1", "alice")
    for n in range(1000):
        throttle.record_failure(f"10.0.{n >> 8}.{n & 255}", f"user{n}")
    assert throttle.blocked("192.0.2.1", "nobody") == 300
    assert throttle.blocked("203.0.113.1", "alice") == 300


def test_stale_keys_are_forgotten(clock: Clock) -> None:
    throttle = make(clock)
    for n in range(20):
        throttle.record_failure(f"10.0.0.{n}", f"user{n}")
    assert throttle.tracked == 40
    clock.now += 61
    throttle.record_failure("192.0.2.1", "alice")
    assert throttle.tracked == 2


@pytest.mark.parametrize(
    "arguments",
    [
        {"max_failures": 0, "window": 60, "block": 60},
        {"max_failures": 3, "window": 0, "block": 60},
        {"max_failures": 3, "window": 60, "block": -1},
        {"max_failures": 3, "window": 60, "block": 60, "max_keys": 0},
    ],
)
def test_refuses_unusable_settings(arguments: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Throttle(**arguments)  # type: ignore[arg-type]
