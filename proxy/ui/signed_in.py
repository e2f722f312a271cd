"""Who a session stands for now: the user table, the tokens and the directory, asked every request.

A session names who signed in, not what they may do: rights come from the rules in force, so a
lost right applies at once. The session ends when its user leaves the htpasswd file or gets a
new password, when its token expires, is revoked or gets another secret or owner, or when the
directory no longer holds its user or its entry changed since the sign-in (a new password, a
lock-out, a disabled account; asked at most every `auth_cache_ttl`, as Basic logins are cached).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from proxy.auth.directory import Directory, DirectoryUnavailable, DirectoryUser
from proxy.auth.tokens import TokenTable
from proxy.auth.tokens_file import Token
from proxy.identity import ANONYMOUS_GROUP, AuthOutcome, Identity
from proxy.ui.session import Kind, Session, SessionSigner

# Directory users remembered between lookups (a bound, as every cache here has).
DIRECTORY_CACHE_SIZE = 10_000


class SignedIn:
    """Resolves sessions to identities, and says which kind of session a login makes."""

    def __init__(
        self,
        signer: SessionSigner,
        users: Callable[[], Mapping[str, str]],
        tokens: TokenTable,
        directory: Directory | None,
        directory_ttl: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._signer = signer
        self._users = users
        self._tokens = tokens
        self._directory = directory
        self._ttl = directory_ttl
        self._clock = clock
        self._wall_clock = wall_clock
        self._looked_up: OrderedDict[str, tuple[float, DirectoryUser | None]] = OrderedDict()

    async def kind_of(self, identity: Identity) -> tuple[Kind, str, str]:
        """How to remember a fresh login: its kind, the name to keep, and its binding."""
        if identity.scope is not None:
            name = identity.scope.token
            token = self._tokens.tokens.get(name)
            return Kind.TOKEN, name, "" if token is None else self._token_binding(token)
        assert identity.name is not None
        stored = self._users().get(identity.name)
        if stored is not None:
            return Kind.PASSWORD, identity.name, self._signer.binding(stored)
        found = None
        if self._directory is not None:
            # Read afresh: the session is bound to the entry as it is now.
            self._looked_up.pop(identity.name, None)
            with contextlib.suppress(DirectoryUnavailable):
                found = await self._lookup(identity.name, self._directory)
        # Without the entry's stamp the session binds to nothing, and holds no page.
        binding = "" if found is None else self._entry_binding(found)
        return Kind.DIRECTORY, identity.name, binding

    async def identity(self, session: Session) -> Identity | None:
        """The identity the session stands for now, or None if it no longer stands for one.

        Raises DirectoryUnavailable when a directory user's lookup is due and gets no answer.
        """
        users = self._users()
        if session.kind is Kind.PASSWORD:
            stored = users.get(session.name)
            if stored is None or self._signer.binding(stored) != session.binding:
                return None
            return Identity.user(session.name, AuthOutcome.CACHED)
        if session.kind is Kind.TOKEN:
            return self._token_identity(session, users)
        if self._directory is None or session.name in users:
            return None
        found = await self._lookup(session.name, self._directory)
        if found is None or not session.binding or self._entry_binding(found) != session.binding:
            return None
        # `@anonymous` means a request without credentials: no directory group may claim it.
        return Identity(session.name, AuthOutcome.CACHED, found.groups - {ANONYMOUS_GROUP})

    def _token_identity(self, session: Session, users: Mapping[str, str]) -> Identity | None:
        name = session.name
        token = self._tokens.tokens.get(name)
        if (
            token is None
            # Another secret under the same name (rewritten by hand) is another token.
            or self._token_binding(token) != session.binding
            or token.revoked is not None
            or token.expired(self._wall_clock())
            or token.owner not in users
        ):
            return None
        return Identity(token.owner, AuthOutcome.CACHED, scope=self._tokens.scope(name))

    def _token_binding(self, token: Token) -> str:
        return self._signer.binding(f"token\0{token.owner}\0{token.sha256}")

    def _entry_binding(self, found: DirectoryUser) -> str:
        return self._signer.binding(f"directory\0{found.stamp}")

    async def _lookup(self, user: str, directory: Directory) -> DirectoryUser | None:
        entry = self._looked_up.get(user)
        if entry is not None and entry[0] > self._clock():
            self._looked_up.move_to_end(user)
            return entry[1]
        found = await directory.lookup(user)
        self._looked_up[user] = (self._clock() + self._ttl, found)
        self._looked_up.move_to_end(user)
        while len(self._looked_up) > DIRECTORY_CACHE_SIZE:
            self._looked_up.popitem(last=False)
        return found
