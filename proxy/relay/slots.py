"""Fair shares of the upstream connection pool: one user, one anonymous client, or anonymous
clients together cannot hold every connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

# A share's owner: a user's name, or an anonymous client's key (kept apart from any user's).
Share = tuple[str, bool]


class UpstreamSlots:
    """At most `total` requests use the upstream at once, at most `per_user` of them one
    user's (or one anonymous client's), and at most `anonymous_total` anonymous ones; a request
    waits for a slot in arrival order for up to `wait` seconds."""

    def __init__(self, total: int, per_user: int, wait: float) -> None:
        self.total = total
        self.per_user = per_user
        # Public pulls may take half the pool at most: the rest stays for logged-in users.
        self.anonymous_total = max(1, total // 2)
        self._wait = wait
        self.in_use = 0
        self._anonymous_in_use = 0
        self._by_share: dict[Share, int] = {}
        self._waiters: deque[tuple[Share, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def held_by(self, name: str, *, anonymous: bool = False) -> int:
        return self._by_share.get((name, anonymous), 0)

    async def acquire(self, name: str, *, anonymous: bool = False) -> bool:
        """Take a slot for user `name` (an anonymous client's key when `anonymous`); False if
        none freed within the wait."""
        share = (name, anonymous)
        if self._free_for(share) and not any(self._free_for(s) for s, _ in self._waiters):
            self._take(share)
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (share, future)
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
                    self.release(name, anonymous=anonymous)
                else:
                    future.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(entry)
        return granted

    def release(self, name: str, *, anonymous: bool = False) -> None:
        """Give a slot back, to the first waiter that is under its shares."""
        share = (name, anonymous)
        self.in_use -= 1
        if anonymous:
            self._anonymous_in_use -= 1
        held = self._by_share.get(share, 0) - 1
        if held > 0:
            self._by_share[share] = held
        else:
            self._by_share.pop(share, None)
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

    def _free_for(self, share: Share) -> bool:
        _, anonymous = share
        return (
            self.in_use < self.total
            and self._by_share.get(share, 0) < self.per_user
            and not (anonymous and self._anonymous_in_use >= self.anonymous_total)
        )

    def _take(self, share: Share) -> None:
        self.in_use += 1
        if share[1]:
            self._anonymous_in_use += 1
        self._by_share[share] = self._by_share.get(share, 0) + 1
