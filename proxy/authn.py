"""Authentication backends: a request becomes an `Identity`, an `AuthFailure`, or nothing.

A backend returns None when the request carries nothing it reads (no `Authorization` header
for htpasswd), so the next backend may try; `Authenticators` asks them in order. A new backend
(OIDC, tokens) is one class here with `authenticate`, plus its settings in `proxy/config.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from aiohttp import web

from proxy.auth import CredentialChecker, Outcome, parse_basic
from proxy.exchange import Exchange
from proxy.forwarded import client_key
from proxy.hashpool import Busy
from proxy.identity import ANONYMOUS, AuthFailure, AuthOutcome, Identity
from proxy.pacing import RefusalPacer
from proxy.paths import Action
from proxy.throttle import Throttle, Throttled

# Seconds a client whose checks fill its share of the hashing pool is told to wait.
BUSY_RETRY_AFTER = 1.0
_CHECKED = {
    Outcome.CACHED: AuthOutcome.CACHED,
    Outcome.VERIFIED: AuthOutcome.SUCCESS,
    Outcome.REJECTED: AuthOutcome.BAD_CREDENTIALS,
}

Result = Identity | AuthFailure | None
_EMPTY_BASIC = "Og=="  # base64 of ":"


class Authenticator(Protocol):
    """One way to establish who sent a request."""

    async def authenticate(self, request: web.Request, exchange: Exchange) -> Result:
        """The identity, a refusal with its challenge, or None if the request is not for us."""
        ...


def basic_challenge(realm: str) -> str:
    return f'Basic realm="{realm}"'


def sends_credentials(request: web.Request) -> bool:
    """False without an Authorization header, or with Basic of an empty user and password.

    containers/image (skopeo, podman, buildah) answers a Basic challenge with `Basic Og==`
    (`:`) when it holds no credentials: that is no login, not a wrong one.
    """
    header = request.headers.get("Authorization")
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    return not (scheme.lower() == "basic" and token.strip() == _EMPTY_BASIC)


class HtpasswdAuthenticator:
    """HTTP Basic against the htpasswd table, behind the password-guessing throttle."""

    def __init__(
        self, checker: CredentialChecker, throttle: Throttle, pacer: RefusalPacer, realm: str
    ) -> None:
        self._checker = checker
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
        return await self._check_password(exchange, *credentials)

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
            await self._pace_refusal(exchange)
            return self._refuse(AuthOutcome.THROTTLED, refusal.retry_after)
        try:
            outcome = await checker.check(user, password, client_key(exchange.client))
        except Busy:
            await admission.release()
            await self._pace_refusal(exchange)
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

    async def _pace_refusal(self, exchange: Exchange) -> None:
        """Hold a 429 for an address that keeps resending without waiting (proxy/pacing.py)."""
        delay = self._pacer.delay_for(client_key(exchange.client))
        if delay:
            await asyncio.sleep(delay)


class AnonymousAuthenticator:
    """Requests without credentials, as `@anonymous`, while some rule grants that group a right.

    `/v2/` is never anonymous: clients send the credentials they have only after its challenge.
    """

    def __init__(self, enabled: Callable[[], bool]) -> None:
        self._enabled = enabled

    async def authenticate(self, request: web.Request, exchange: Exchange) -> Result:
        if sends_credentials(request) or exchange.target.action is Action.PING:
            return None
        return ANONYMOUS if self._enabled() else None


class Authenticators:
    """Backends asked in order; the first that answers decides."""

    def __init__(self, backends: Sequence[Authenticator], challenge: str) -> None:
        self._backends = tuple(backends)
        self.challenge = challenge

    async def authenticate(
        self, request: web.Request, exchange: Exchange
    ) -> Identity | AuthFailure:
        for backend in self._backends:
            result = await backend.authenticate(request, exchange)
            if result is not None:
                return result
        return AuthFailure(AuthOutcome.NO_CREDENTIALS, self.challenge)
