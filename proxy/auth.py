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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from passlib.hash import apr_md5_crypt, bcrypt

from proxy.htpasswd import HASHES

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


class CredentialChecker:
    """Checks Basic credentials, caching successes so bcrypt runs once per login, not per request.

    Docker and podman send credentials on every request; without the cache a cost-10 bcrypt per
    request caps a core at ~20 requests per second.
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
    ) -> None:
        self._clock = clock
        self._on_hash = on_hash
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcrypt")
        # Cache keys are keyed MACs, so a memory dump holds no fast-to-crack password hashes.
        self._key_secret = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[bool]] = {}
        self._users: dict[str, str] = {}
        self._decoy = ""
        self.replace_users(users)

    @property
    def user_count(self) -> int:
        return len(self._users)

    @property
    def users(self) -> Mapping[str, str]:
        """The user table in use (user -> stored hash)."""
        return self._users

    def replace_users(self, users: Mapping[str, str], decoy: str | None = None) -> None:
        """Swap in a new user table; every cached success is forgotten."""
        self._users = dict(users)
        self._decoy = decoy if decoy is not None else decoy_hash(self._users)
        self._cache.clear()

    def is_cached(self, user: str, password: str) -> bool:
        """True when these exact credentials succeeded recently (no hash computed)."""
        key = self._cache_key(user, password, self._users.get(user))
        expiry = self._cache.get(key)
        return expiry is not None and expiry > self._clock()

    async def check(self, user: str, password: str) -> Outcome:
        """Check credentials; concurrent identical checks share one hash computation."""
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
            pending = asyncio.get_running_loop().run_in_executor(
                self._pool, self._timed_verify, password, target
            )
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        ok = await asyncio.shield(pending)
        if not ok or stored is None:
            return Outcome.REJECTED
        self._remember(key)
        return Outcome.VERIFIED

    def _timed_verify(self, password: str, stored: str) -> bool:
        started = time.perf_counter()
        try:
            return verify_password(password, stored)
        finally:
            if self._on_hash is not None:
                self._on_hash(time.perf_counter() - started)

    def close(self) -> None:
        """Stop the worker pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _cache_key(self, user: str, password: str, stored: str | None) -> bytes:
        message = b"\0".join(s.encode() for s in (user, password, stored or ""))
        return hmac.new(self._key_secret, message, hashlib.sha256).digest()

    def _remember(self, key: bytes) -> None:
        self._cache[key] = self._clock() + self._cache_ttl
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
