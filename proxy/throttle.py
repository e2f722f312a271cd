"""Password-guessing throttle: failed checks counted per client address and per user name.

- A key is blocked for `block` seconds once it has `max_failures` failed checks within the last
  `window` seconds (a sliding window: each failure counts for `window` seconds after it). The
  block ends by itself; it is not extended by failures during it (the proxy answers 429 without
  checking then, so there are none unless checks were already running), and the key starts
  afresh afterwards.
- Addresses and user names are counted separately: guessing many passwords for one user from
  many addresses blocks that user name, guessing from one address blocks that address. An IPv6
  address counts as its /64 (the usual allocation of one site, which a single client can
  otherwise rotate through); an IPv4-mapped IPv6 address counts as the IPv4 address.
- A successful check clears the user's failures (and block), not the address's: otherwise a
  client holding one valid account could reset its address between guesses at others.
- Memory is bounded: at most `max_keys` addresses and `max_keys` user names, each with at most
  `max_failures` timestamps; user names are kept as 16-byte hashes (clients choose them). When
  full, the key whose last failure is oldest goes first; blocked keys go only once no
  unblocked key is left, soonest-expiring first.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable


class _Table:
    """Failures and blocks for one kind of key."""

    def __init__(self, max_failures: int, window: float, block: float, max_keys: int) -> None:
        self._max_failures = max_failures
        self._window = window
        self._block = block
        self._max_keys = max_keys
        # Ordered by last failure, so stale keys sit at the front.
        self._failures: OrderedDict[Hashable, deque[float]] = OrderedDict()
        # Ordered by expiry: every block lasts the same time and the clock only moves forward.
        self._blocked: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures) + len(self._blocked)

    def remaining(self, key: Hashable, now: float) -> float | None:
        self._expire(now)
        until = self._blocked.get(key)
        return None if until is None else until - now

    def fail(self, key: Hashable, now: float) -> None:
        self._expire(now)
        if key in self._blocked:
            return
        failures = self._failures.pop(key, None) or deque(maxlen=self._max_failures)
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        failures.append(now)
        if len(failures) >= self._max_failures:
            self._blocked[key] = now + self._block
        else:
            self._failures[key] = failures
        while len(self) > self._max_keys:
            (self._failures or self._blocked).popitem(last=False)

    def clear(self, key: Hashable) -> None:
        self._failures.pop(key, None)
        self._blocked.pop(key, None)

    def _expire(self, now: float) -> None:
        while self._blocked and next(iter(self._blocked.values())) <= now:
            self._blocked.popitem(last=False)
        while self._failures and next(iter(self._failures.values()))[-1] <= now - self._window:
            self._failures.popitem(last=False)


def _address_key(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _user_key(user: str) -> bytes:
    return hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Throttle:
    """Blocks password guessing by client address and by user name."""

    def __init__(
        self,
        max_failures: int,
        window: float,
        block: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_keys: int = 10000,
    ) -> None:
        if max_failures < 1 or max_keys < 1:
            raise ValueError("max_failures and max_keys must be at least 1")
        if not window > 0 or not block > 0:
            raise ValueError("window and block must be positive")
        self._clock = clock
        self._addresses = _Table(max_failures, window, block, max_keys)
        self._users = _Table(max_failures, window, block, max_keys)

    @property
    def tracked(self) -> int:
        """Addresses and user names currently remembered."""
        return len(self._addresses) + len(self._users)

    def blocked(self, address: str, user: str) -> float | None:
        """Seconds until the address's or the user's block ends (the later one), or None."""
        if not self.tracked:
            return None  # the usual case, on every authenticated request: nothing to look up
        now = self._clock()
        waits = [
            wait
            for wait in (
                self._addresses.remaining(_address_key(address), now),
                self._users.remaining(_user_key(user), now),
            )
            if wait is not None
        ]
        return max(waits) if waits else None

    def record_failure(self, address: str, user: str) -> None:
        """A wrong password, or a user that does not exist."""
        now = self._clock()
        self._addresses.fail(_address_key(address), now)
        self._users.fail(_user_key(user), now)

    def record_success(self, address: str, user: str) -> None:
        """A correct password: the user's failures are forgotten, the address's are not."""
        if len(self._users):
            self._users.clear(_user_key(user))
