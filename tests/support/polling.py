"""The suite's one way to wait: poll a condition until it holds or a deadline passes.

One loop with two faces: `wait_until` blocks the thread; `eventually` is awaited in async tests,
so the event loop (and the fake upstreams and clients running on it) keeps going meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

STARTUP_DEADLINE = 20.0
INTERVAL = 0.02


def _attempts(condition: Callable[[], bool], what: str, deadline: float) -> Iterator[None]:
    """Yield after each failed check (the caller pauses there); return once `condition` holds,
    raise naming `what` once `deadline` seconds have passed."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        yield
    raise AssertionError(f"timed out after {deadline}s waiting for {what}")


def wait_until(
    condition: Callable[[], bool], what: str, deadline: float = STARTUP_DEADLINE
) -> None:
    """Poll `condition` until it holds, blocking; fail the test naming `what` after `deadline`."""
    try:
        for _ in _attempts(condition, what, deadline):
            time.sleep(INTERVAL)
    except AssertionError as exc:
        if _in_event_loop():
            exc.add_note("wait_until blocked the event loop: async tests use `await eventually`")
        raise


async def eventually(
    condition: Callable[[], bool], what: str, deadline: float = STARTUP_DEADLINE
) -> None:
    """`wait_until` for async tests: polls without blocking the event loop."""
    for _ in _attempts(condition, what, deadline):
        await asyncio.sleep(INTERVAL)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
