"""Access tokens: Basic with a token's name and secret, within its scope and its owner's rights."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping

from aiohttp import web

from proxy.auth.backend import Result, basic_challenge, sends_credentials
from proxy.auth.credentials import parse_basic
from proxy.auth.pacing import RefusalPacer
from proxy.auth.tokens_file import Token, secret_hash
from proxy.exchange import Exchange
from proxy.identity import AuthFailure, AuthOutcome, Identity, TokenScope
from proxy.throttle.policy import Throttle, Throttled


class TokenTable:
    """The tokens in force, with their scopes compiled; a reload swaps them whole."""

    def __init__(self, tokens: Mapping[str, Token]) -> None:
        self.tokens: Mapping[str, Token] = {}
        self._scopes: dict[str, TokenScope] = {}
        self.replace(tokens)

    def replace(self, tokens: Mapping[str, Token]) -> None:
        scopes = {name: token.scope() for name, token in tokens.items()}
        self.tokens, self._scopes = dict(tokens), scopes

    def scope(self, name: str) -> TokenScope:
        return self._scopes[name]


# Called with (token name, outcome) for every refused right secret: the expired/revoked counter.
OnRefused = Callable[[str, AuthOutcome], None]


class TokenAuthenticator:
    """Basic whose user is a token's name; other names are left to the next backend.

    A wrong secret counts in the password-guessing throttle like a wrong password. The right
    secret of an expired or revoked token, or of one whose owner left the user table, gets the
    same refusal as a wrong one; only the audit line tells them apart.
    """

    def __init__(
        self,
        table: TokenTable,
        users: Callable[[], Mapping[str, str]],
        throttle: Throttle,
        pacer: RefusalPacer,
        realm: str,
        *,
        on_refused: OnRefused | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._table = table
        self._users = users
        self._throttle = throttle
        self._pacer = pacer
        self._on_refused = on_refused
        self._clock = clock
        self.challenge = basic_challenge(realm)

    async def authenticate(self, request: web.Request, exchange: Exchange) -> Result:
        if not sends_credentials(request):
            return None
        credentials = parse_basic(request.headers.get("Authorization"))
        if credentials is None:
            return None
        return await self.log_in(exchange, *credentials)

    async def log_in(self, exchange: Exchange, name: str, secret: str) -> Result:
        """Check a token's name and secret (from Basic or the browser's sign-in form)."""
        token = self._table.tokens.get(name)
        if token is None:
            return None
        exchange.tried_user = name
        if not hmac.compare_digest(secret_hash(secret), token.sha256):
            return await self._wrong_secret(exchange, name)
        how = self._refusal(token)
        if how is not None:
            if self._on_refused is not None and how is not AuthOutcome.BAD_CREDENTIALS:
                self._on_refused(name, how)
            return AuthFailure(how, self.challenge)
        exchange.tried_user = None
        return Identity(token.owner, AuthOutcome.SUCCESS, scope=self._table.scope(name))

    def _refusal(self, token: Token) -> AuthOutcome | None:
        if token.revoked is not None:
            return AuthOutcome.TOKEN_REVOKED
        if token.expired(self._clock()):
            return AuthOutcome.TOKEN_EXPIRED
        if token.owner not in self._users():
            # The owner's rights are the token's ceiling: without an owner it has none.
            return AuthOutcome.BAD_CREDENTIALS
        return None

    async def _wrong_secret(self, exchange: Exchange, name: str) -> AuthFailure:
        try:
            admission = await self._throttle.admit(exchange.client, name)
        except Throttled as refusal:
            await self._pacer.hold(exchange.client)
            return AuthFailure(AuthOutcome.THROTTLED, self.challenge, refusal.retry_after)
        await admission.failed()
        return AuthFailure(AuthOutcome.BAD_CREDENTIALS, self.challenge)
