"""Authentication backends: a request becomes an `Identity`, an `AuthFailure`, or nothing.

A backend returns None when the request carries nothing it reads (no `Authorization` header
for htpasswd), so the next backend may try; `Authenticators` asks them in order. A new backend
(OIDC, tokens) is one class here with `authenticate`, plus its settings in `proxy/config.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from aiohttp import web

from proxy.exchange import Exchange
from proxy.identity import AuthFailure, AuthOutcome, Identity

Result = Identity | AuthFailure | None
_EMPTY_BASIC = "Og=="  # base64 of ":"


class Authenticator(Protocol):
    """One way to establish who sent a request."""

    async def authenticate(self, request: web.Request, exchange: Exchange) -> Result:
        """The identity, a refusal with its challenge, or None if the request is not for us."""
        ...


@runtime_checkable
class PasswordAuthenticator(Authenticator, Protocol):
    """A backend that also checks a name and secret given apart (the browser's sign-in form)."""

    async def log_in(self, exchange: Exchange, user: str, password: str) -> Result:
        """As `authenticate`, for credentials that came without an Authorization header."""
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


class Authenticators:
    """Backends asked in order; the first that answers decides."""

    def __init__(self, backends: Sequence[Authenticator], challenge: str) -> None:
        self._backends = tuple(backends)
        self._password_backends = tuple(b for b in backends if isinstance(b, PasswordAuthenticator))
        self.challenge = challenge

    async def authenticate(
        self, request: web.Request, exchange: Exchange
    ) -> Identity | AuthFailure:
        for backend in self._backends:
            result = await backend.authenticate(request, exchange)
            if result is not None:
                return result
        return AuthFailure(AuthOutcome.NO_CREDENTIALS, self.challenge)

    async def log_in(self, exchange: Exchange, user: str, password: str) -> Identity | AuthFailure:
        """A name and secret from a form: the same backends, throttle and outcomes as Basic."""
        for backend in self._password_backends:
            result = await backend.log_in(exchange, user, password)
            if result is not None:
                return result
        return AuthFailure(AuthOutcome.BAD_CREDENTIALS, self.challenge)
