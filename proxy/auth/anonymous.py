"""Requests without credentials, admitted as `@anonymous` while a rule grants it a right."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from proxy.auth.backend import Result, sends_credentials
from proxy.exchange import Exchange
from proxy.identity import ANONYMOUS
from proxy.paths import Action


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
