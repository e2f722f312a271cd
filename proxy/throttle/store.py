"""Where the throttle keeps its counts and blocks: a small interface, and the in-process store.

A key holds members: each has the time it last failed, or reservations (checks still running),
or both; a key may also be blocked until some time. The policy (`policy.py`) only calls `get`,
`reserve`, `commit`, `release` and `clear`, each with the time, and each call is atomic for its
key, so stores shared by processes (`supervisor.py` for the workers of one host, `redis.py`
across hosts) keep the same rules as `MemoryStore`.

Apart from those keys, `remember` and `recall` keep the addresses where each user logged in:
only a successful login makes one, so no number of failures may push one out. They have bounds
of their own (`KNOWN_PER_USER`, `MAX_KNOWN_USERS`), and failures have theirs (`MAX_KEYS`).

`revoke` and `is_revoked` keep the browser sessions signed out before their cookies expire,
apart from both and bounded apart (`MAX_REVOKED`): no failure evicts one either.
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
# Sessions signed out before their cookie expires. Only a signed-in user can sign out, and each
# sign-in costs a password check (throttled), so only a long-lived misuse reaches this bound
# (about 22 MB in memory with 43-character ids).
MAX_REVOKED = 100_000
# What a session id may be (the browser's cookie names one): bounded, and safe in any store.
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


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

    async def revoke(self, session: str, until: float, now: float) -> None:
        """Refuse `session` (an opaque id, up to 64 chars of [A-Za-z0-9_-]) until `until`
        (wall-clock seconds)."""
        ...

    async def is_revoked(self, session: str, now: float) -> bool:
        """Whether `session` was revoked and `until` has not passed."""
        ...


def check_session(session: str) -> str:
    """`session` if it is a session id as the stores keep them; else `ValueError`."""
    if not SESSION_ID.fullmatch(session):
        raise ValueError(f"not a session id: {session[:80]!r}")
    return session


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


class Revocations:
    """Sessions refused until a time each, at most `max_sessions`: past it, the one that expires
    soonest goes (it is the one whose replay would be refused for the least time)."""

    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._max_sessions = max_sessions
        self._until: dict[str, float] = {}
        # (until, session), soonest first; an entry whose session was revoked again for longer
        # is stale: it no longer matches `_until` and is skipped when it comes up.
        self._ends: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def revoke(self, session: str, until: float, now: float) -> None:
        self._drop_ended(now)
        if until <= now or self._until.get(session, now) >= until:
            return  # over already, or revoked for as long or longer
        self._until[session] = until
        heapq.heappush(self._ends, (until, session))
        while len(self._until) > self._max_sessions:
            self._pop_soonest()
        if len(self._ends) > 2 * len(self._until) + 16:
            self._ends = [(end, sid) for sid, end in self._until.items()]
            heapq.heapify(self._ends)

    def is_revoked(self, session: str, now: float) -> bool:
        until = self._until.get(session)
        return until is not None and until > now

    def _drop_ended(self, now: float) -> None:
        while self._ends and self._ends[0][0] <= now:
            self._pop_soonest()

    def _pop_soonest(self) -> None:
        until, session = heapq.heappop(self._ends)
        if self._until.get(session) == until:
            del self._until[session]


class MemoryStore:
    """`ThrottleStore` in this process's memory, bounded to `max_keys` keys of failures and
    blocks, and known addresses and revoked sessions bounded apart (`KnownClients`,
    `Revocations`): no failure evicts one.

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
        max_revoked: int = MAX_REVOKED,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._max_keys = max_keys
        self._entries: OrderedDict[str, MemoryEntry] = OrderedDict()
        self._known = KnownClients(known_per_user, max_known_users)
        self._revoked = Revocations(max_revoked)

    def __len__(self) -> int:
        """The keys of failures and blocks (known addresses are kept apart)."""
        return len(self._entries)

    async def remember(self, user: str, client: str, ttl: float, now: float) -> None:
        self._known.remember(user, client, ttl, now)

    async def recall(self, user: str, client: str, ttl: float, now: float) -> bool:
        return self._known.recall(user, client, ttl, now)

    async def revoke(self, session: str, until: float, now: float) -> None:
        self._revoked.revoke(check_session(session), until, now)

    async def is_revoked(self, session: str, now: float) -> bool:
        return self._revoked.is_revoked(check_session(session), now)

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
