"""HTTP Basic against the htpasswd table, behind the password-guessing throttle."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.auth.backend import Result, basic_challenge, sends_credentials
from proxy.auth.credentials import CredentialChecker, Outcome, parse_basic
from proxy.auth.hashpool import Busy
from proxy.auth.pacing import RefusalPacer
from proxy.edge.forwarded import client_key
from proxy.exchange import Exchange
from proxy.identity import AuthFailure, AuthOutcome, Identity
from proxy.throttle.policy import Throttle, Throttled

# Seconds a client whose checks fill its share of the hashing pool is told to wait.
BUSY_RETRY_AFTER = 1.0
_CHECKED = {
    Outcome.CACHED: AuthOutcome.CACHED,
    Outcome.VERIFIED: AuthOutcome.SUCCESS,
    Outcome.REJECTED: AuthOutcome.BAD_CREDENTIALS,
}


class HtpasswdAuthenticator:
    """HTTP Basic against the htpasswd table, behind the password-guessing throttle."""

    def __init__(
        self,
        checker: CredentialChecker,
        throttle: Throttle,
        pacer: RefusalPacer,
        realm: str,
        *,
        defer_unknown: bool = False,
    ) -> None:
        self._checker = checker
        # With a directory configured, names the table lacks are the directory's to judge.
        self._defer_unknown = defer_unknown
        self._throttle = throttle
        self._pacer = pacer
        self.challenge = basic_challenge(realm)

    async def authenticate(self, request: web.Request, exchange: Exchange) -> Result:
        if not sends_credentials(request):
            return None
        credentials = parse_basic(request.headers.get("Authorization"))
        if credentials is None:
            # Malformed: no password was checked, so nothing counts as a guess.
            return self._refuse(AuthOutcome.BAD_CREDENTIALS)
        return await self.log_in(exchange, *credentials)

    async def log_in(self, exchange: Exchange, user: str, password: str) -> Result:
        """Check a user and password (from Basic or the browser's sign-in form)."""
        if self._defer_unknown and user not in self._checker.users:
            return None
        result = await self._check_password(exchange, user, password)
        if isinstance(result, AuthFailure):
            exchange.tried_user = user
        return result

    def _refuse(self, how: AuthOutcome, retry_after: float = 0.0) -> AuthFailure:
        return AuthFailure(how, self.challenge, retry_after)

    async def _check_password(self, exchange: Exchange, user: str, password: str) -> Result:
        checker = self._checker
        if checker.is_cached(user, password):
            # Credentials that just worked pass without a hash, even while their name is throttled.
            await checker.check(user, password)
            return Identity.user(user, AuthOutcome.CACHED)
        try:
            # The failure is reserved before the hash runs: parallel guesses cannot overtake it.
            admission = await self._throttle.admit(exchange.client, user)
        except Throttled as refusal:
            await self._pacer.hold(exchange.client)
            return self._refuse(AuthOutcome.THROTTLED, refusal.retry_after)
        try:
            outcome = await checker.check(user, password, client_key(exchange.client))
        except Busy:
            await admission.release()
            await self._pacer.hold(exchange.client)
            return self._refuse(AuthOutcome.THROTTLED, BUSY_RETRY_AFTER)
        except BaseException:
            # A check abandoned half-way (a cancelled handler) counts as a failure.
            await asyncio.shield(admission.failed())
            raise
        if not outcome.ok:
            await admission.failed()
            return self._refuse(AuthOutcome.BAD_CREDENTIALS)
        await admission.succeeded()
        return Identity.user(user, _CHECKED[outcome])
