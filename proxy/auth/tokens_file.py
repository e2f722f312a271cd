"""The access tokens file: reading and checking it, writing it atomically, making secrets."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from proxy.access.rules import Right, glob_pattern
from proxy.auth.atomic_file import WriteError, write_atomically
from proxy.config import parse_duration
from proxy.identity import TokenScope

# Secret scanners find leaked secrets by this prefix.
SECRET_PREFIX = "rpt_"
# Random bytes in a secret (URL-safe base64: 43 characters).
SECRET_BYTES = 32
DEFAULT_MAX_LIFETIME = 90 * 86400.0
_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class TokensError(Exception):
    """The tokens file cannot be used, or a token cannot be made; the message says why."""


@dataclass(frozen=True)
class Token:
    """One access token: who owns it, what it may do, until when; only its secret's hash."""

    name: str
    owner: str
    repositories: tuple[str, ...]
    actions: tuple[str, ...]
    networks: tuple[str, ...]
    created: float
    expires: float
    sha256: str
    revoked: float | None = None

    def expired(self, now: float) -> bool:
        return now >= self.expires

    def scope(self) -> TokenScope:
        patterns = tuple(
            glob_pattern(f"{self.name}.repositories", pattern) for pattern in self.repositories
        )
        networks = tuple(ipaddress.ip_network(network) for network in self.networks)
        return TokenScope(self.name, patterns, frozenset(self.actions), networks)

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "owner": self.owner,
            "repositories": list(self.repositories),
            "actions": list(self.actions),
            "networks": list(self.networks),
            "created": _iso(self.created),
            "expires": _iso(self.expires),
            "revoked": None if self.revoked is None else _iso(self.revoked),
            "sha256": self.sha256,
        }


def new_secret() -> tuple[str, str]:
    """A fresh secret and the hash the file keeps of it."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)
    return secret, secret_hash(secret)


def secret_hash(secret: str) -> str:
    """SHA-256 hex: the secret is random and long, so a slow password hash would add nothing."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def parse_expiry(text: str, now: float) -> float:
    """Unix time of `--expires`: a duration from now, or an ISO 8601 date or date-time (UTC)."""
    try:
        return now + parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected a duration (90d, 12h, 30m) or an ISO 8601 date, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise TokensError(
            f"invalid token name {name!r} (1 to 64 letters, digits, '.', '_', '@', '-', "
            "starting with a letter or digit)"
        )


def check_scope(
    repositories: Iterable[str], actions: Iterable[str], networks: Iterable[str]
) -> None:
    """Raise TokensError naming the first glob, action or network the access rules would refuse."""
    try:
        for pattern in repositories:
            glob_pattern("--repositories", pattern)
        for network in networks:
            ipaddress.ip_network(network, strict=True)
    except ValueError as exc:
        raise TokensError(str(exc)) from None
    known = {right.value for right in Right}
    unknown = sorted(set(actions) - known)
    if unknown or not list(actions):
        raise TokensError(
            f"--actions: expected some of {', '.join(sorted(known))}, got {', '.join(unknown)}"
        )


def load_tokens(path: Path) -> dict[str, Token]:
    """Name -> token; an empty dict for a missing file; TokensError naming the file otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise TokensError(f"{path}: cannot read tokens file: {exc.strerror}") from None
    try:
        root = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokensError(f"{path}: not a tokens file (invalid JSON: {exc})") from None
    if not isinstance(root, dict) or root.get("version") != _VERSION:
        raise TokensError(f"{path}: not a tokens file (expected version {_VERSION})")
    entries = root.get("tokens")
    if not isinstance(entries, list):
        raise TokensError(f"{path}: tokens: expected a list")
    tokens: dict[str, Token] = {}
    for index, entry in enumerate(entries):
        try:
            token = _token(entry)
        except (TypeError, KeyError, ValueError, TokensError) as exc:
            raise TokensError(f"{path}: tokens[{index}]: {exc}") from None
        if token.name in tokens:
            raise TokensError(f"{path}: tokens[{index}]: {token.name!r} defined twice")
        tokens[token.name] = token
    return tokens


def _token(entry: object) -> Token:
    if not isinstance(entry, dict):
        raise TypeError("expected a mapping")
    name, owner, sha256 = str(entry["name"]), str(entry["owner"]), str(entry["sha256"])
    check_name(name)
    if not owner or ":" in owner or not owner.isprintable():
        raise ValueError(f"owner {owner!r} is not a possible user name")
    if not _SHA256_HEX.fullmatch(sha256):
        raise ValueError("sha256: expected 64 lowercase hex digits")
    repositories = tuple(str(r) for r in entry["repositories"])
    actions = tuple(str(a) for a in entry["actions"])
    networks = tuple(str(n) for n in entry.get("networks") or ())
    check_scope(repositories, actions, networks)
    revoked = entry.get("revoked")
    return Token(
        name,
        owner,
        repositories,
        actions,
        networks,
        _timestamp(entry["created"]),
        _timestamp(entry["expires"]),
        sha256,
        None if revoked is None else _timestamp(revoked),
    )


def write_tokens(path: Path, tokens: Mapping[str, Token]) -> None:
    """Replace the file atomically (a temporary file, fsync, rename), mode 0600."""
    document = {"version": _VERSION, "tokens": [t.as_json() for t in tokens.values()]}
    text = json.dumps(document, indent=2) + "\n"
    try:
        write_atomically(path, text.encode(), new_mode=0o600, keep_mode=False)
    except WriteError as exc:
        raise TokensError(str(exc)) from None


def _iso(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat(timespec="seconds")


def _timestamp(value: object) -> float:
    moment = datetime.datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()
