"""HTTP Basic credentials: parsing the header, and checking them against the user table quickly."""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping

from passlib.hash import apr_md5_crypt, bcrypt

from proxy.auth.hashpool import FairPool
from proxy.auth.htpasswd_file import HASHES

# bcrypt looks at 72 bytes only; a longer password that shares them would pass.
_BCRYPT_MAX_BYTES = 72
# A Basic token longer than this cannot carry credentials we would accept anyway.
_MAX_TOKEN_CHARS = 4096


class Outcome(enum.Enum):
    """How a credential check ended."""

    CACHED = "cached"
    VERIFIED = "verified"
    REJECTED = "rejected"

    @property
    def ok(self) -> bool:
        return self is not Outcome.REJECTED


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """Return (user, password) from an `Authorization: Basic ...` value, or None if malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "basic" or not token or len(token) > _MAX_TOKEN_CHARS:
        return None
    try:
        text = base64.b64decode(token, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, colon, password = text.partition(":")
    if not colon or not user or not user.isprintable() or "\x00" in password:
        return None
    return user, password


def verify_password(password: str, stored: str) -> bool:
    """Check one password against one stored hash (runs in the worker pool)."""
    if stored.startswith("$2") and len(password.encode()) > _BCRYPT_MAX_BYTES:
        return False
    try:
        return bool(HASHES.verify(password, stored))
    except (ValueError, TypeError):
        return False


def decoy_hash(users: Mapping[str, str]) -> str:
    """A hash as costly to check as the table's most costly one, for users that do not exist."""
    costs = [bcrypt.from_string(h).rounds for h in users.values() if h.startswith("$2")]
    if costs:
        return str(bcrypt.using(rounds=max(costs)).hash(secrets.token_hex(16)))
    return str(apr_md5_crypt.hash(secrets.token_hex(16)))


def measure_check(stored: str, timer: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one wrong password takes to check against `stored` (blocks: call off the loop)."""
    started = timer()
    HASHES.verify(secrets.token_hex(8), stored)
    return timer() - started


class CredentialChecker:
    """Checks Basic credentials, caching successes so bcrypt runs once per login, not per request.

    Docker and podman send credentials on every request; without the cache a cost-10 bcrypt per
    request caps a core at ~20 requests per second. Hashes run in a `FairPool` keyed by client.
    Every failed check lasts as long as a check against the decoy (the table's costliest hash):
    the rest is slept, not computed, so unknown users and cheaper hashes ({SHA}, apr1, a lower
    bcrypt cost) cannot be told apart by timing. The decoy's cost is measured when the table is
    loaded and follows every check against it (a moving average), so it tracks the machine's load.
    """

    def __init__(
        self,
        users: Mapping[str, str],
        *,
        cache_ttl: float,
        cache_size: int,
        workers: int,
        clock: Callable[[], float] = time.monotonic,
        on_hash: Callable[[float], None] | None = None,
        max_pending_per_client: int = 1_000_000,
        timer: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._on_hash = on_hash
        self._timer = timer
        self._sleep = sleep
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._pool = FairPool(workers, max_pending_per_client)
        # Cache keys are keyed MACs, so a memory dump holds no fast-to-crack password hashes.
        self._key_secret = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[tuple[bool, float]]] = {}
        self._users: dict[str, str] = {}
        self._decoy = ""
        self._decoy_cost = 0.0
        self.replace_users(users)

    @property
    def user_count(self) -> int:
        return len(self._users)

    @property
    def users(self) -> Mapping[str, str]:
        """The user table in use (user -> stored hash)."""
        return self._users

    @property
    def decoy_cost(self) -> float:
        """Seconds a failed check lasts: the decoy's measured cost."""
        return self._decoy_cost

    def replace_users(
        self, users: Mapping[str, str], decoy: str | None = None, decoy_cost: float | None = None
    ) -> None:
        """Swap in a new user table; every cached success is forgotten.

        Without `decoy`, one is made, and without `decoy_cost` it is measured: both block.
        """
        self._users = dict(users)
        self._decoy = decoy if decoy is not None else decoy_hash(self._users)
        if decoy_cost is None:
            decoy_cost = measure_check(self._decoy, self._timer)
        self._decoy_cost = decoy_cost
        self._cache.clear()

    def is_cached(self, user: str, password: str) -> bool:
        """True when these exact credentials succeeded recently (no hash computed)."""
        key = self._cache_key(user, password, self._users.get(user))
        expiry = self._cache.get(key)
        return expiry is not None and expiry > self._clock()

    async def check(
        self,
        user: str,
        password: str,
        client: Hashable = "",
    ) -> Outcome:
        """Check credentials; concurrent identical checks share one hash computation.

        Raises `Busy` when `client` already has its share of the pool.
        """
        stored = self._users.get(user)
        key = self._cache_key(user, password, stored)
        expiry = self._cache.get(key)
        if expiry is not None:
            if expiry > self._clock():
                self._cache.move_to_end(key)
                return Outcome.CACHED
            del self._cache[key]

        pending = self._pending.get(key)
        if pending is None:
            # Unknown users are checked against a decoy of the same cost: equal timing.
            target = stored if stored is not None else self._decoy
            pending = self._pool.run(client, lambda: self._timed_verify(password, target))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
            if stored is None:
                pending.add_done_callback(self._follow_decoy_cost)
        ok, spent = await asyncio.shield(pending)
        if ok and stored is not None:
            self._remember(key)
            outcome = Outcome.VERIFIED
        else:
            outcome = Outcome.REJECTED
        if outcome is Outcome.REJECTED:
            await self._sleep(max(0.0, self._decoy_cost - spent))
        return outcome

    def _follow_decoy_cost(self, done: asyncio.Future[tuple[bool, float]]) -> None:
        if not done.cancelled() and done.exception() is None:
            self._decoy_cost += 0.2 * (done.result()[1] - self._decoy_cost)

    def _timed_verify(self, password: str, stored: str) -> tuple[bool, float]:
        started = self._timer()
        ok = False
        try:
            ok = verify_password(password, stored)
        finally:
            spent = self._timer() - started
            if self._on_hash is not None:
                self._on_hash(spent)
        return ok, spent

    def close(self) -> None:
        """Stop the worker pool."""
        self._pool.close()

    def _cache_key(self, user: str, password: str, stored: str | None) -> bytes:
        message = b"\0".join(s.encode() for s in (user, password, stored or ""))
        return hmac.new(self._key_secret, message, hashlib.sha256).digest()

    def _remember(self, key: bytes) -> None:
        self._cache[key] = self._clock() + self._cache_ttl
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
