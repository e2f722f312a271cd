"""A clock the test moves by hand, for code that takes its time from a callable."""

from __future__ import annotations


class Clock:
    """Returns `now`; a test advances it with `clock.now += seconds`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
