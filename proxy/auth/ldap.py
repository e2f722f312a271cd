"""HTTP Basic against an LDAP directory, for names the htpasswd file does not hold.

A success is cached for `auth_cache_ttl` with the user's directory groups, like an htpasswd
success; when it expires the next request logs in again and reads the groups afresh. While the
directory does not answer, cached logins keep working and new ones get 503 (not 401): they do
not count as failed logins, and `registry_proxy_auth_backend_up{backend="ldap"}` is 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

from proxy.auth.backend import Result, basic_challenge, sends_credentials
from proxy.auth.credentials import parse_basic
from proxy.auth.directory import Directory, DirectoryUnavailable
from proxy.auth.pacing import RefusalPacer
from proxy.exchange import Exchange
from proxy.identity import ANONYMOUS_GROUP, AuthFailure, AuthOutcome, Identity
from proxy.throttle.policy import Throttle, Throttled

log = logging.getLogger("registry_proxy")

Groups = frozenset[str]


class LoginCache:
    """Recent directory logins: keyed MACs of user and password, with the groups they got."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        # Keys are keyed MACs, so a memory dump holds nothing to crack offline quickly.
        self._secret = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[float, Groups]] = OrderedDict()

    def key(self, user: str, password: str) -> bytes:
        message = b"\0".join(s.encode() for s in (user, password))
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def get(self, key: bytes) -> Groups | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expiry, groups = entry
        if expiry <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return groups

    def remember(self, key: bytes, groups: Groups) -> None:
        self._entries[key] = (self._clock() + self._ttl, groups)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class LdapAuthenticator:
    """HTTP Basic against the directory, behind the password-guessing throttle."""

    def __init__(
        self,
        directory: Directory,
        cache: LoginCache,
        throttle: Throttle,
        pacer: RefusalPacer,
        realm: str,
        on_reachable: Callable[[bool], None],
    ) -> None:
        self._directory = directory
        self._cache = cache
        self._throttle = throttle
        self._pacer = pacer
        self._on_reachable = on_reachable
        self.directory = directory
        self.reachable = True
        self._pending: dict[bytes, asyncio.Future[Groups | None]] = {}
        self.challenge = basic_challenge(realm)

    async def authenticate(self, request: web.Request, exchange: Exchange) -> Result:
        if not sends_credentials(request):
            return None
        credentials = parse_basic(request.headers.get("Authorization"))
        if credentials is None:
            return AuthFailure(AuthOutcome.BAD_CREDENTIALS, self.challenge)
        return await self.log_in(exchange, *credentials)

    async def log_in(self, exchange: Exchange, user: str, password: str) -> Result:
        """Check a user and password (from Basic or the browser's sign-in form)."""
        result = await self._log_in(exchange, user, password)
        if isinstance(result, AuthFailure) and result.how is not AuthOutcome.UNAVAILABLE:
            # As htpasswd does: the audit line names the user of a refused login.
            exchange.tried_user = user
        return result

    async def _log_in(self, exchange: Exchange, user: str, password: str) -> Result:
        key = self._cache.key(user, password)
        groups = self._cache.get(key)
        if groups is not None:
            return Identity(user, AuthOutcome.CACHED, groups)
        try:
            admission = await self._throttle.admit(exchange.client, user)
        except Throttled as refusal:
            await self._pacer.hold(exchange.client)
            return AuthFailure(AuthOutcome.THROTTLED, self.challenge, refusal.retry_after)
        try:
            found = await self._ask_directory(key, user, password)
        except DirectoryUnavailable as exc:
            # Nobody guessed anything: the directory never judged the password.
            await admission.release()
            self.mark_reachable(False)
            log.warning("ldap: directory not answering: %s", exc)
            return AuthFailure(AuthOutcome.UNAVAILABLE, self.challenge)
        except BaseException:
            # A login abandoned half-way (a cancelled handler) counts as a failure.
            await asyncio.shield(admission.failed())
            raise
        self.mark_reachable(True)
        if found is None:
            await admission.failed()
            return AuthFailure(AuthOutcome.BAD_CREDENTIALS, self.challenge)
        await admission.succeeded()
        self._cache.remember(key, found)
        return Identity(user, AuthOutcome.SUCCESS, found)

    def mark_reachable(self, answered: bool) -> None:
        """Record whether the directory answered (the backend-up gauge follows)."""
        self.reachable = answered
        self._on_reachable(answered)

    async def _ask_directory(self, key: bytes, user: str, password: str) -> Groups | None:
        """Concurrent identical logins share one directory round trip."""
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._directory.login(user, password))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        groups = await asyncio.shield(pending)
        # `@anonymous` means a request without credentials: no directory group may claim it.
        return None if groups is None else groups - {ANONYMOUS_GROUP}
