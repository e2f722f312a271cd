"""The browser's session: a signed, expiring cookie naming who signed in, and its CSRF tokens.

Nothing is stored per session: the cookie carries the session's id, who signed in, when (to the
millisecond) and when it expires, with an HMAC under the `ui_session_key_file` key, so every
worker and every proxy task holding the key reads it alike. Sign-out ends every session of that
user issued up to that moment: one entry per user in the throttle's shared store (`owner_key`),
kept until those sessions would have expired anyway.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

COOKIE = "rp_session"
# Holds the nonce that the sign-in form's CSRF token is bound to, before any session exists.
LOGIN_COOKIE = "rp_login"
COOKIE_PATH = "/ui/"
MIN_KEY_BYTES = 32
# A cookie longer than this is no cookie of ours (names are at most a few hundred bytes).
MAX_COOKIE_CHARS = 2048
# 2: issue times in milliseconds (a cookie of version 1 is no session).
_VERSION = 2


class Kind(enum.StrEnum):
    """Which backend signed the user in: each is asked again on every request."""

    PASSWORD = "p"
    TOKEN = "t"
    DIRECTORY = "d"


@dataclass(frozen=True)
class Session:
    """One signed-in browser: the cookie's contents."""

    id: str
    kind: Kind
    # The user's name, or the access token's.
    name: str
    # Wall-clock milliseconds: a sign-out ends the sessions issued up to its own millisecond, so
    # signing in again right after it makes a session that works.
    issued: int
    # Wall-clock seconds.
    expires: int
    # For htpasswd users, a MAC of the password hash they signed in with: a new password ends it.
    binding: str = ""

    @property
    def owner_key(self) -> str:
        """Who signed in, as the stores keep her sign-outs (`owner_key`)."""
        return owner_key(self.kind, self.name)


def owner_key(kind: Kind, name: str) -> str:
    """A user's or token's key in the stores: 43 characters of [A-Za-z0-9_-], whatever the name."""
    return _b64(hashlib.sha256(f"{kind}\0{name}".encode()).digest())


def milliseconds(seconds: float) -> int:
    """Wall-clock seconds as the sessions' issue times count them (rounded down)."""
    return math.floor(seconds * 1000)


def read_session_key(path: Path) -> bytes:
    """The signing key: the file's bytes (OSError if unreadable, ValueError if too short)."""
    key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"holds {len(key)} bytes; at least {MIN_KEY_BYTES} random bytes are needed "
            "(e.g. `head -c 32 /dev/urandom | base64`)"
        )
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Makes and reads session cookies, CSRF tokens and password bindings under one key."""

    def __init__(self, key: bytes, lifetime: float, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self.lifetime = lifetime
        self._clock = clock

    def _mac(self, purpose: str, data: str) -> str:
        message = purpose.encode() + b"\0" + data.encode()
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def issue(
        self, kind: Kind, name: str, binding: str = "", after: int | None = None
    ) -> tuple[Session, str]:
        """A new session and its cookie value; issued later than `after` (a sign-out's time)."""
        now = self._clock()
        issued = milliseconds(now) if after is None else max(milliseconds(now), after + 1)
        session = Session(
            secrets.token_urlsafe(16),
            kind,
            name,
            issued,
            int(now) + int(self.lifetime),
            binding,
        )
        fields = {
            "v": _VERSION,
            "i": session.id,
            "k": str(kind),
            "n": name,
            "b": binding,
            "t": session.issued,
            "e": session.expires,
        }
        payload = _b64(json.dumps(fields, separators=(",", ":")).encode())
        return session, f"{payload}.{self._mac('session', payload)}"

    def read(self, value: str | None) -> Session | None:
        """The session a cookie value holds, if its signature is ours and it has not expired."""
        if not value or len(value) > MAX_COOKIE_CHARS:
            return None
        payload, dot, mac = value.partition(".")
        if not dot or not hmac.compare_digest(mac, self._mac("session", payload)):
            return None
        try:
            fields = json.loads(_unb64(payload))
            session = Session(
                str(fields["i"]),
                Kind(fields["k"]),
                str(fields["n"]),
                int(fields["t"]),
                int(fields["e"]),
                str(fields["b"]),
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if fields.get("v") != _VERSION or session.expires <= self._clock():
            return None
        return session

    def csrf(self, session: Session) -> str:
        """The token a form must carry to act in this session's name."""
        return self._mac("csrf", session.id)

    def csrf_ok(self, session: Session, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf(session).encode())

    @staticmethod
    def login_nonce() -> str:
        return secrets.token_urlsafe(16)

    def login_csrf(self, nonce: str) -> str:
        """The sign-in form's token, bound to the nonce in its cookie (no session exists yet)."""
        return self._mac("login", nonce)

    def login_csrf_ok(self, nonce: str | None, given: str) -> bool:
        if not nonce or len(nonce) > 64:
            return False
        return hmac.compare_digest(given.encode(), self.login_csrf(nonce).encode())

    def binding(self, stored_hash: str) -> str:
        """What ties a session to the password hash it signed in with."""
        return self._mac("password", stored_hash)[:22]
