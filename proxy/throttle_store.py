"""Where the throttle keeps its counts and blocks: a small interface, and the in-process store.

A key holds members (one per failed check, or one per user name at an address) with the time
each last failed, plus reservations not yet settled, and possibly a block. The policy in
`proxy/throttle.py` only calls `get`, `reserve`, `commit`, `release` and `clear`, each with the
time, so a store shared by worker processes (one Lua script per call on a Redis sorted set and
hash) can replace `MemoryStore` without changing the policy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Entry:
    """One key's state: members (member -> last failure time, None while only reserved)."""

    members: dict[Hashable, float | None] = field(default_factory=dict)
    reserved: dict[Hashable, int] = field(default_factory=dict)
    blocked_until: float | None = None

    def oldest(self) -> float | None:
        """The earliest failure time among members, or None if every member is only reserved."""
        times = [t for t in self.members.values() if t is not None]
        return min(times) if times else None


class ThrottleStore(Protocol):
    """Counts and blocks by key; every call is atomic for the key it names."""

    def get(self, key: Hashable, window: float, now: float) -> Entry:
        """The key's members failed within `window` (and reserved ones) and its block, if any."""
        ...

    def reserve(
        self, key: Hashable, member: Hashable, limit: int, window: float, now: float
    ) -> bool:
        """Count `member` as pending unless that makes more than `limit` members; False if full."""
        ...

    def commit(
        self, key: Hashable, member: Hashable, now: float, *, limit: int = 0, block: float = 0
    ) -> None:
        """The member failed at `now`; with `limit` members failed, block the key for `block`."""
        ...

    def release(self, key: Hashable, member: Hashable) -> None:
        """Give a reservation back; a member with no failure time and no reservation goes."""
        ...

    def clear(self, key: Hashable, member: Hashable | None = None) -> None:
        """Forget one member of the key, or the whole key with its block."""
        ...


class MemoryStore:
    """`ThrottleStore` in this process's memory, bounded to `max_keys` keys.

    When full, the key touched least recently goes first; keys with reservations in flight
    and blocked keys go only once no other key is left.
    """

    def __init__(self, max_keys: int = 30000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._max_keys = max_keys
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, window: float, now: float) -> Entry:
        entry = self._entries.get(key)
        if entry is None:
            return Entry()
        self._expire(key, entry, window, now)
        return Entry(dict(entry.members), dict(entry.reserved), entry.blocked_until)

    def reserve(
        self, key: Hashable, member: Hashable, limit: int, window: float, now: float
    ) -> bool:
        entry = self._entries.get(key) or Entry()
        self._expire(key, entry, window, now)
        if member not in entry.members and len(entry.members) >= limit:
            return False
        entry.members.setdefault(member, None)
        entry.reserved[member] = entry.reserved.get(member, 0) + 1
        self._touch(key, entry)
        return True

    def commit(
        self, key: Hashable, member: Hashable, now: float, *, limit: int = 0, block: float = 0
    ) -> None:
        entry = self._entries.get(key) or Entry()
        self._unreserve(entry, member)
        entry.members[member] = now
        failed = sum(1 for t in entry.members.values() if t is not None)
        if block > 0 and limit and failed >= limit and entry.blocked_until is None:
            entry.blocked_until = now + block
        self._touch(key, entry)

    def release(self, key: Hashable, member: Hashable) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        self._unreserve(entry, member)
        if entry.members.get(member, 0) is None and member not in entry.reserved:
            del entry.members[member]
        self._drop_if_empty(key, entry)

    def clear(self, key: Hashable, member: Hashable | None = None) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        if member is None:
            entry.members = {m: None for m in entry.reserved}
            entry.blocked_until = None
        elif member in entry.members:
            if member in entry.reserved:
                entry.members[member] = None
            else:
                del entry.members[member]
        self._drop_if_empty(key, entry)

    @staticmethod
    def _unreserve(entry: Entry, member: Hashable) -> None:
        count = entry.reserved.pop(member, 0) - 1
        if count > 0:
            entry.reserved[member] = count

    def _expire(self, key: Hashable, entry: Entry, window: float, now: float) -> None:
        if entry.blocked_until is not None and entry.blocked_until <= now:
            # The key starts afresh once its block ends.
            entry.blocked_until = None
            entry.members = {m: None for m in entry.reserved}
        stale = [
            m
            for m, t in entry.members.items()
            if t is not None and t <= now - window and m not in entry.reserved
        ]
        for member in stale:
            del entry.members[member]
        self._drop_if_empty(key, entry)

    def _drop_if_empty(self, key: Hashable, entry: Entry) -> None:
        if not entry.members and entry.blocked_until is None:
            self._entries.pop(key, None)

    def _touch(self, key: Hashable, entry: Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_keys:
            self._evict_one()

    def _evict_one(self) -> None:
        evictable = (
            key
            for key, entry in self._entries.items()
            if not entry.reserved and entry.blocked_until is None
        )
        del self._entries[next(evictable, next(iter(self._entries)))]
