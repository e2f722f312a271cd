"""Refusals paced per client address: a 429 ignored in bulk costs the client time, not our CPU.

A client that keeps resending at once after 429 (instead of waiting for `Retry-After`) would
otherwise make the event loop answer thousands of refusals a second, and every other client's
login waits behind them. Each address may get `burst` refusals at once, refilled at `per_second`;
beyond that its refusals are answered after `delay` seconds (a sleep, no work). This lives in
each process, as the CPU it protects does; with workers each paces its part of the numbers,
so an address gets `burst` at once and `per_second` on the host.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from proxy.edge.forwarded import client_key
from proxy.host_share import worker_share


class RefusalPacer:
    """How long to hold an address's next refusal: 0 within its burst, else `delay`."""

    def __init__(
        self,
        burst: int = 100,
        per_second: float = 100.0,
        delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10000,
        workers: int = 1,
    ) -> None:
        self._burst = worker_share(burst, workers)
        self._rate = per_second / workers
        self._delay = delay
        self._clock = clock
        self._max_keys = max_keys
        # address -> (tokens, time of the last refill), least recently refused first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def delay_for(self, client: str) -> float:
        """Count one refusal for `client`; seconds to wait before sending it."""
        now = self._clock()
        tokens, then = self._buckets.pop(client, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + (now - then) * self._rate)
        wait = 0.0
        if tokens >= 1 - 1e-9:  # refills add up in floating point
            tokens -= 1
        else:
            wait = self._delay
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait

    async def hold(self, client: str) -> None:
        """Wait before a refusal to `client` (an address: counted under its client key) if it
        keeps resending without waiting."""
        delay = self.delay_for(client_key(client))
        if delay:
            await asyncio.sleep(delay)
