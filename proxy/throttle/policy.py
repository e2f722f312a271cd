"""Password-guessing throttle: a failure budget taken before each hash, by address and user name.

Every password check first reserves one failure from each budget below; a failure commits the
reservations, a success gives them back. So N checks running at once count as N failures before
any of them ends, and a burst of parallel guesses runs no more checks than the budget allows.

- (address, user): at most `max_failures` failures within `window`, then that pair is blocked for
  `block` seconds. This is the first limit a guesser (or a colleague mistyping) meets, and it
  touches no one else.
- address: at most `max_failures` different user names with failures within `window`, then the
  address is blocked for `block`. Guessing many names from one address stops there, while one
  colleague mistyping behind a shared address (office NAT, Swarm ingress) counts as one name and
  never locks the address. An IPv6 address counts as its /64, an IPv4-mapped one as the IPv4.
- user name, from addresses where it did not log in within `known_client_ttl`: at most
  `max_failures_per_user` failures within `window` and never a block, only a slow rate, so guesses
  from many addresses at one name cannot keep its owner out: the owner's known addresses are not
  counted, and a new address waits at most until the oldest failure leaves the window.
- A success clears the pair's failures and block and the name's entry at that address (so a
  client holding one valid account can reset nothing but its own), and marks the address as known
  for the user. It does not reset the name's rate: that would give guessers a fresh budget at every
  login of the owner, who is exempt at that address anyway. Known addresses are kept apart from
  the counts (`ThrottleStore.remember`): no flood of failures can push one out.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable

from proxy.edge.forwarded import client_key
from proxy.throttle.store import Entry, MemoryStore, ThrottleStore

# A key or a member of one in the store: plain text, the same in every process and host.
Key = str
Held = list[tuple[Key, str]]


class Throttled(Exception):
    """No password check now: try again in `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"throttled for {retry_after:.1f}s")
        self.retry_after = retry_after


def _user_key(user: str) -> str:
    # Clients choose user names: keep fixed-size hashes, not the names.
    return hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def pair_key(client: str, name: str) -> Key:
    return f"pair:{name}:{client}"


def address_key(client: str) -> Key:
    return f"address:{client}"


def user_key(name: str) -> Key:
    return f"user:{name}"


class Admission:
    """The reservations behind one password check; settle it once with its outcome.

    Settling is shielded from cancellation: it writes one key after another, and stopped
    half-way it would leave the later keys reserved until the lease ends.
    """

    def __init__(self, throttle: Throttle, client: str, user: str, held: Held) -> None:
        self._throttle = throttle
        self._client = client
        self._user = user
        self._held = held
        self._settled = False

    async def succeeded(self) -> None:
        """A correct password: reservations back, the pair and the name at the address cleared."""
        if self._take():
            await asyncio.shield(self._throttle._succeeded(self._client, self._user, self._held))

    async def failed(self) -> None:
        """A wrong password or unknown user: every reservation becomes a failure."""
        if self._take():
            await asyncio.shield(self._throttle._failed(self._held))

    async def release(self) -> None:
        """No password was checked after all: give the reservations back."""
        if self._take():
            await asyncio.shield(self._throttle._release(self._held))

    def _take(self) -> bool:
        settled, self._settled = self._settled, True
        return not settled


class Throttle:
    """The policy: which budgets a check needs, and what a success or failure does to them.

    Times are wall-clock seconds (`time.time`): a shared store compares times written by other
    processes and hosts.
    """

    def __init__(
        self,
        max_failures: int,
        window: float,
        block: float,
        clock: Callable[[], float] = time.time,
        *,
        max_failures_per_user: int | None = None,
        known_client_ttl: float = 7 * 86400,
        store: ThrottleStore | None = None,
    ) -> None:
        per_user = 2 * max_failures if max_failures_per_user is None else max_failures_per_user
        if max_failures < 1 or per_user < 1:
            raise ValueError("max_failures and max_failures_per_user must be at least 1")
        if not window > 0 or not block > 0 or not known_client_ttl > 0:
            raise ValueError("window, block and known_client_ttl must be positive")
        self._max_failures = max_failures
        self._per_user = per_user
        self._window = window
        self._block = block
        self._known_ttl = known_client_ttl
        self._clock = clock
        self.store: ThrottleStore = store if store is not None else MemoryStore()

    async def admit(self, address: str, user: str) -> Admission:
        """Reserve a failure from each budget for one check, or raise `Throttled`."""
        now = self._clock()
        client, name = client_key(address), _user_key(user)
        token = secrets.token_hex(8)
        wanted = [
            (pair_key(client, name), token, self._max_failures),
            (address_key(client), name, self._max_failures),
        ]
        if not await self.store.recall(name, client, self._known_ttl, now):
            wanted.append((user_key(name), token, self._per_user))
        held: Held = []
        try:
            for key, member, limit in wanted:
                refused = await self.store.reserve(key, member, limit, self._window, now)
                if refused is not None:
                    raise Throttled(self._retry_after(key, refused, now))
                held.append((key, member))
        except BaseException:
            # Refused, or cancelled while a shared store answers: what was taken goes back.
            await asyncio.shield(self._release(held))
            raise
        return Admission(self, client, name, held)

    def _retry_after(self, key: Key, entry: Entry, now: float) -> float:
        if entry.blocked_until is not None:
            return entry.blocked_until - now
        oldest = entry.oldest()
        if oldest is None:
            # Full of checks still running: they end within seconds, most likely as failures.
            return self._window if key.startswith("user:") else self._block
        return max(oldest + self._window - now, 1.0)

    async def _failed(self, held: Held) -> None:
        now = self._clock()
        for key, member in held:
            soft = key.startswith("user:")
            limit = self._per_user if soft else self._max_failures
            block = 0 if soft else self._block
            await self.store.commit(key, member, self._window, now, limit=limit, block=block)

    async def _succeeded(self, client: str, name: str, held: Held) -> None:
        await self._release(held)
        now = self._clock()
        await self.store.clear(pair_key(client, name), now)
        await self.store.clear(address_key(client), now, name)
        await self.store.remember(name, client, self._known_ttl, now)

    async def _release(self, held: Held) -> None:
        now = self._clock()
        for key, member in held:
            await self.store.release(key, member, now)
