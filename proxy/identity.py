"""Who sent a request and how the proxy learned it: shared by the gate, metrics and the log."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# The group every request without credentials belongs to, when a rule grants it anything.
ANONYMOUS_GROUP = "anonymous"


class AuthOutcome(StrEnum):
    """How authentication ended: the `auth` field of the audit log and the metrics label."""

    # A password checked against its hash.
    SUCCESS = "success"
    # Credentials that succeeded recently (no hash computed).
    CACHED = "cached"
    # Malformed credentials, an unknown user or a wrong password.
    BAD_CREDENTIALS = "bad_credentials"
    # No Authorization header, and no public access for this request.
    NO_CREDENTIALS = "no_credentials"
    # Too many failed password checks (or the client's share of the hashing pool is full).
    THROTTLED = "throttled"
    # No Authorization header, admitted as `@anonymous` for the access rules to decide.
    ANONYMOUS = "anonymous"
    # An access token's right secret, past its expiry: refused like a wrong password.
    TOKEN_EXPIRED = "token_expired"
    # An access token's right secret, revoked: refused like a wrong password.
    TOKEN_REVOKED = "token_revoked"
    # The directory (LDAP) did not answer: the credentials were not judged.
    UNAVAILABLE = "unavailable"

    @property
    def identified(self) -> bool:
        return self in (AuthOutcome.SUCCESS, AuthOutcome.CACHED, AuthOutcome.ANONYMOUS)


@dataclass(frozen=True)
class TokenScope:
    """What an access token may do at most: its repositories, actions and networks."""

    token: str
    patterns: tuple[re.Pattern[str], ...]
    # Action names as the access rules spell them (`pull`, `push`, `delete`, `catalog`).
    actions: frozenset[str]
    networks: tuple[Network, ...] = ()

    def permits(self, action: str, repository: str | None, address: Address | None) -> bool:
        """Whether the scope covers `action` on `repository` (None: catalog) from `address`."""
        if action not in self.actions:
            return False
        if self.networks and (address is None or not any(address in n for n in self.networks)):
            return False
        return repository is None or any(p.fullmatch(repository) for p in self.patterns)


@dataclass(frozen=True)
class Identity:
    """An established identity: a user name (None for anonymous), its groups, and how.

    A token's identity is its owner's name, limited by the token's `scope`.
    """

    name: str | None
    how: AuthOutcome
    groups: frozenset[str] = frozenset()
    scope: TokenScope | None = None

    @property
    def anonymous(self) -> bool:
        return self.name is None

    @classmethod
    def user(cls, name: str, how: AuthOutcome = AuthOutcome.SUCCESS) -> Identity:
        return cls(name, how)


ANONYMOUS = Identity(None, AuthOutcome.ANONYMOUS, frozenset({ANONYMOUS_GROUP}))


@dataclass(frozen=True)
class AuthFailure:
    """A refused authentication: the outcome, the challenge to send, and when to retry."""

    how: AuthOutcome
    challenge: str
    retry_after: float = 0.0
