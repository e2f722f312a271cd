"""Where the throttle keeps its counts and blocks: a small interface, and the in-process store.

A key holds members: each has the time it last failed, or reservations (checks still running),
or both; a key may also be blocked until some time. The policy (`policy.py`) only calls `get`,
`reserve`, `commit`, `release` and `clear`, each with the time, and each call is atomic for its
key, so stores shared by processes (`supervisor.py` for the workers of one host, `redis.py`
across hosts) keep the same rules as `MemoryStore`.

Apart from those keys, `remember` and `recall` keep the addresses where each user logged in:
only a successful login makes one, so no number of failures may push one out. They have bounds
of their own (`KNOWN_PER_USER`, `MAX_KNOWN_USERS`), and failures have theirs (`MAX_KEYS`).

`end_sessions` and `sessions_ended` keep the browser's sign-outs: one entry per user, ending
every session of hers issued up to the sign-out, until those sessions would have expired. They
are apart from both and bounded apart (`MAX_ENDED_USERS`): no failure evicts one either.
"""

from __future__ import annotations

import heapq
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

# A reservation older than this is dropped: its check was lost with a worker that died.
RESERVATION_LEASE = 600.0
# The bounds of a memory store: keys of failures and blocks; users with known addresses, and
# known addresses per user (each bound makes room by dropping the least recently used).
MAX_KEYS = 30_000
MAX_KNOWN_USERS = 10_000
KNOWN_PER_USER = 16
# Users whose sign-out still ends sessions. One entry per user, however often she signs out, so
# only that many distinct accounts signing out within one session lifetime reach this bound
# (about 25 MB in memory with 43-character keys).
MAX_ENDED_USERS = 100_000
# What a user's key may be (the browser passes a hash of who signed in): bounded, and safe in
# any store.
OWNER_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


class StoreUnavailable(Exception):
    """A shared store did not answer: the caller falls back to its own."""


@dataclass
class Entry:
    """One key's state: members' last failure times, reservations in flight, and the block."""

    failed: dict[str, float] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)
    blocked_until: float | None = None

    @property
    def members(self) -> set[str]:
        return set(self.failed) | set(self.reserved)

    def oldest(self) -> float | None:
        """The earliest failure time, or None if every member is only reserved."""
        return min(self.failed.values(), default=None)


class ThrottleStore(Protocol):
    """Counts and blocks by key; every call is atomic for the key it names."""

    async def get(self, key: str, window: float, now: float) -> Entry:
        """The key's failures within `window`, its reservations and its block, if any."""
        ...

    async def reserve(
        self, key: str, member: str, limit: int, window: float, now: float
    ) -> Entry | None:
        """Reserve for `member`; None when done, the key's entry when it is blocked or a new
        member would make more than `limit`."""
        ...

    async def commit(
        self, key: str, member: str, window: float, now: float, *, limit: int = 0,
        block: float = 0,
    ) -> None:  # fmt: skip
        """The member failed at `now`; with `limit` members failed, block the key for `block`."""
        ...

    async def release(self, key: str, member: str, now: float) -> None:
        """Give one reservation of `member` back."""
        ...

    async def clear(self, key: str, now: float, member: str | None = None) -> None:
        """Forget one member's failure, or every failure of the key and its block."""
        ...

    async def remember(self, user: str, client: str, ttl: float, now: float) -> None:
        """`user` logged in from `client` at `now`: known there for `ttl`. Past the bounds, the
        user's least recent address goes, or the user whose last login is the oldest."""
        ...

    async def recall(self, user: str, client: str, ttl: float, now: float) -> bool:
        """Whether `user` logged in from `client` within `ttl` (and is still remembered)."""
        ...

    async def end_sessions(self, user: str, before: float, until: float, now: float) -> None:
        """Sessions of `user` (an opaque key, up to 64 chars of [A-Za-z0-9_-]) issued at or
        before `before` (an issue time in the caller's unit: the browser's are milliseconds)
        are refused until `until` (wall-clock seconds); a later `before` wins, never an earlier
        one, and the later `until`."""
        ...

    async def sessions_ended(self, user: str, now: float) -> float | None:
        """The latest `before` still in force for `user` (its `until` not passed), or None."""
        ...


def check_owner(user: str) -> str:
    """`user` if it is a user's key as the stores keep sign-outs; else `ValueError`."""
    if not OWNER_KEY.fullmatch(user):
        raise ValueError(f"not a user's key: {user[:80]!r}")
    return user


@dataclass
class MemoryEntry(Entry):
    """An entry as `MemoryStore` keeps it: also when each member last reserved."""

    reserved_at: dict[str, float] = field(default_factory=dict)

    def expire(self, window: float, now: float) -> None:
        """Drop what `now` has outlived: an ended block with its failures, failures older than
        `window` and reservations past their lease."""
        if self.blocked_until is not None and self.blocked_until <= now:
            # The key starts afresh once its block ends.
            self.blocked_until = None
            self.failed.clear()
        for member, at in list(self.failed.items()):
            if at <= now - window:
                del self.failed[member]
        for member, at in list(self.reserved_at.items()):
            if at <= now - RESERVATION_LEASE:
                del self.reserved_at[member]
                self.reserved.pop(member, None)

    def snapshot(self) -> Entry:
        return Entry(dict(self.failed), dict(self.reserved), self.blocked_until)

    @property
    def empty(self) -> bool:
        return not self.failed and not self.reserved and self.blocked_until is None


class KnownClients:
    """Where each user logged in lately, apart from any failure: at most `per_user` addresses
    a user (her least recent goes) and `max_users` users (the least recent login's goes)."""

    def __init__(self, per_user: int, max_users: int) -> None:
        if per_user < 1 or max_users < 1:
            raise ValueError("per_user and max_users must be at least 1")
        self._per_user = per_user
        self._max_users = max_users
        # user -> client -> time of its last login; both in the order of the last login.
        self._users: OrderedDict[str, dict[str, float]] = OrderedDict()

    def remember(self, user: str, client: str, ttl: float, now: float) -> None:
        clients = self._users.pop(user, {})
        clients.pop(client, None)
        clients[client] = now
        self._users[user] = clients
        # Oldest first in both, and the login just made is last: each loop stops before it.
        lapsed = now - ttl
        while len(clients) > self._per_user or next(iter(clients.values())) <= lapsed:
            del clients[next(iter(clients))]
        while len(self._users) > self._max_users or _last_login(self._users) <= lapsed:
            self._users.popitem(last=False)

    def recall(self, user: str, client: str, ttl: float, now: float) -> bool:
        at = self._users.get(user, {}).get(client)
        return at is not None and at > now - ttl


class EndedSessions:
    """Per user, the issue time up to which her sessions are refused, and until when; at most
    `max_users` users. Past it, the user whose entry ends soonest goes.

    That eviction is safe: a user's sign-outs all rewrite her one entry, so a flood of them
    takes no room from anyone else's. Only as many distinct accounts, each signing in with a
    (throttled) password check, signing out within one session lifetime reach the bound.
    """

    def __init__(self, max_users: int) -> None:
        if max_users < 1:
            raise ValueError("max_users must be at least 1")
        self._max_users = max_users
        # user -> (before, until)
        self._ended: dict[str, tuple[float, float]] = {}
        # (until, user), soonest first; an entry whose user signed out again since is stale: it
        # no longer matches `_ended` and is skipped when it comes up.
        self._ends: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._ended)

    def end(self, user: str, before: float, until: float, now: float) -> None:
        self._drop_ended(now)
        if until <= now:
            return  # nothing left to refuse
        earlier = self._ended.get(user)
        if earlier is not None:
            # Never an earlier `before`, never a sooner end: each only refuses more.
            before, until = max(before, earlier[0]), max(until, earlier[1])
            if (before, until) == earlier:
                return
        self._ended[user] = (before, until)
        heapq.heappush(self._ends, (until, user))
        while len(self._ended) > self._max_users:
            self._pop_soonest()
        if len(self._ends) > 2 * len(self._ended) + 16:
            self._ends = [(end, name) for name, (_, end) in self._ended.items()]
            heapq.heapify(self._ends)

    def ended(self, user: str, now: float) -> float | None:
        entry = self._ended.get(user)
        return entry[0] if entry is not None and entry[1] > now else None

    def _drop_ended(self, now: float) -> None:
        while self._ends and self._ends[0][0] <= now:
            self._pop_soonest()

    def _pop_soonest(self) -> None:
        until, user = heapq.heappop(self._ends)
        entry = self._ended.get(user)
        if entry is not None and entry[1] == until:
            del self._ended[user]


class MemoryStore:
    """`ThrottleStore` in this process's memory, bounded to `max_keys` keys of failures and
    blocks, and known addresses and sign-outs bounded apart (`KnownClients`,
    `EndedSessions`): no failure evicts one.

    When full, the key touched least recently goes first; keys with reservations in flight
    and blocked keys go only once no other key is left. Keys made by a reservation are over
    the bound until their failure is committed: only then is another key evicted for them.
    """

    def __init__(
        self,
        max_keys: int = MAX_KEYS,
        *,
        max_known_users: int = MAX_KNOWN_USERS,
        known_per_user: int = KNOWN_PER_USER,
        max_ended_users: int = MAX_ENDED_USERS,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._max_keys = max_keys
        self._entries: OrderedDict[str, MemoryEntry] = OrderedDict()
        self._known = KnownClients(known_per_user, max_known_users)
        self._ended = EndedSessions(max_ended_users)

    def __len__(self) -> int:
        """The keys of failures and blocks (known addresses are kept apart)."""
        return len(self._entries)

    async def remember(self, user: str, client: str, ttl: float, now: float) -> None:
        self._known.remember(user, client, ttl, now)

    async def recall(self, user: str, client: str, ttl: float, now: float) -> bool:
        return self._known.recall(user, client, ttl, now)

    async def end_sessions(self, user: str, before: float, until: float, now: float) -> None:
        self._ended.end(check_owner(user), before, until, now)

    async def sessions_ended(self, user: str, now: float) -> float | None:
        return self._ended.ended(check_owner(user), now)

    async def get(self, key: str, window: float, now: float) -> Entry:
        entry = self._entries.get(key)
        if entry is None:
            return Entry()
        entry.expire(window, now)
        self._drop_if_empty(key, entry)
        return entry.snapshot()

    async def reserve(
        self, key: str, member: str, limit: int, window: float, now: float
    ) -> Entry | None:
        entry = self._entries.get(key) or MemoryEntry()
        entry.expire(window, now)
        full = member not in entry.members and len(entry.members) >= limit
        if entry.blocked_until is not None or full:
            self._drop_if_empty(key, entry)
            return entry.snapshot()
        entry.reserved[member] = entry.reserved.get(member, 0) + 1
        entry.reserved_at[member] = now
        # No eviction for a reservation: most are given back at once (another budget refused),
        # and one guess each could flush the store. A failure makes room when it is committed.
        self._touch(key, entry, evict=False)
        return None

    async def commit(
        self, key: str, member: str, window: float, now: float, *, limit: int = 0,
        block: float = 0,
    ) -> None:  # fmt: skip
        entry = self._entries.get(key) or MemoryEntry()
        _unreserve(entry, member)
        entry.failed[member] = now
        if block > 0 and limit and len(entry.failed) >= limit and entry.blocked_until is None:
            entry.blocked_until = now + block
        self._touch(key, entry)

    async def release(self, key: str, member: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            _unreserve(entry, member)
            self._drop_if_empty(key, entry)

    async def clear(self, key: str, now: float, member: str | None = None) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        if member is None:
            entry.failed.clear()
            entry.blocked_until = None
        else:
            entry.failed.pop(member, None)
        self._drop_if_empty(key, entry)

    def _drop_if_empty(self, key: str, entry: MemoryEntry) -> None:
        if entry.empty:
            self._entries.pop(key, None)

    def _touch(self, key: str, entry: MemoryEntry, *, evict: bool = True) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while evict and len(self._entries) > self._max_keys:
            self._evict_one()

    def _evict_one(self) -> None:
        evictable = (
            key
            for key, entry in self._entries.items()
            if not entry.reserved and entry.blocked_until is None
        )
        del self._entries[next(evictable, next(iter(self._entries)))]


def _last_login(users: OrderedDict[str, dict[str, float]]) -> float:
    """The last login of the user whose last login is the oldest."""
    return next(reversed(next(iter(users.values())).values()))


def _unreserve(entry: MemoryEntry, member: str) -> None:
    count = entry.reserved.pop(member, 0) - 1
    if count > 0:
        entry.reserved[member] = count
    else:
        entry.reserved_at.pop(member, None)
