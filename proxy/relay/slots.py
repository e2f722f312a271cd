"""Fair shares of the upstream connection pool: one user cannot hold every connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class UpstreamSlots:
    """At most `total` requests use the upstream at once, at most `per_user` of them one
    user's; a request waits for a slot in arrival order for up to `wait` seconds."""

    def __init__(self, total: int, per_user: int, wait: float) -> None:
        self.total = total
        self.per_user = per_user
        self._wait = wait
        self.in_use = 0
        self._by_user: dict[str, int] = {}
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def held_by(self, user: str) -> int:
        return self._by_user.get(user, 0)

    async def acquire(self, user: str) -> bool:
        """Take a slot for `user`; False if none freed within the wait."""
        if self._free_for(user) and not any(self._free_for(u) for u, _ in self._waiters):
            self._take(user)
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (user, future)
        self._waiters.append(entry)
        granted = False
        try:
            async with asyncio.timeout(self._wait):
                await future
            granted = True
        except TimeoutError:
            pass
        finally:
            if not granted:
                if future.done() and not future.cancelled():
                    # Handed a slot just as the wait ended (or the request was cancelled).
                    self.release(user)
                else:
                    future.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(entry)
        return granted

    def release(self, user: str) -> None:
        """Give `user`'s slot back, to the first waiter whose user is under its share."""
        self.in_use -= 1
        held = self._by_user.get(user, 0) - 1
        if held > 0:
            self._by_user[user] = held
        else:
            self._by_user.pop(user, None)
        for entry in list(self._waiters):
            if self.in_use >= self.total:
                break
            waiter, future = entry
            if future.done():
                self._waiters.remove(entry)
            elif self._free_for(waiter):
                self._waiters.remove(entry)
                self._take(waiter)
                future.set_result(None)

    def _free_for(self, user: str) -> bool:
        return self.in_use < self.total and self._by_user.get(user, 0) < self.per_user

    def _take(self, user: str) -> None:
        self.in_use += 1
        self._by_user[user] = self._by_user.get(user, 0) + 1
