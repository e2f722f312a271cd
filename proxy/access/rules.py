"""Access rules: who may pull, push and delete which repositories, and read the catalog.

Configuration (the values of the `groups` and `access` keys):

    groups:
      ci: [ci-bot]
      team-a: [alice, bob]
    access:
      - {users: ["@ci"], repositories: ["**"], actions: [pull]}
      - {users: ["@team-a"], repositories: ["team-a/**"], actions: [pull, push, delete]}
      - {users: ["*"], actions: [catalog]}

Semantics:

- No rules (no `access` key, or an empty list): every authenticated user may do everything.
- Otherwise a user's rights are the union over every rule naming them: there are no deny rules,
  so the order of the rules does not matter. A user no rule names may only log in (`/v2/`).
- `users`: user names, `@group` (from `groups`), `*` for any authenticated user, or the reserved
  `@anonymous` for requests without credentials (pull and catalog only; `*` does not include it).
- `networks` (optional): CIDR networks; the rule then grants its rights only to clients whose real
  address (after `trusted_proxies` / PROXY protocol) is inside one of them.
- `repositories`: globs over the whole repository name; `*` matches any run of characters
  within one path component, `**` any run including `/`. `team-a/*` matches `team-a/app` but not
  `team-a/app/x`; `team-a/**` matches both; neither matches `team-a` itself.
- `actions`: `pull`, `push`, `delete` (on the rule's repositories) and `catalog` (reading
  `/v2/_catalog`, which only ever lists repositories the user may pull; a rule that grants only
  `catalog` needs no `repositories`).
- A request needs what the registry's own token authorization asks for (distribution,
  `registry/handlers/app.go`): GET/HEAD pull; POST/PUT/PATCH pull *and* push (so push without
  pull is useless, as with the registry); DELETE delete (cancelling an upload too); `/v2/`
  nothing beyond authentication; `/v2/_catalog` catalog. A cross-repository blob mount also
  needs pull on its `from` repository; without it `authorize` drops the mount parameters and the
  registry starts a normal upload instead (containerd retries a mount only after a 401, so a 403
  would fail its push).
- Paths the registry's router does not know and methods it does not use are refused unless the
  policy is unrestricted.

Query strings are read like Go's `net/url` reads them (the registry is Go): `&` separates
pairs, pairs containing `;` are ignored, `+` is a space, a pair with a bad `%` escape is ignored,
and the first value of a repeated key wins.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from proxy.identity import ANONYMOUS_GROUP, Identity
from proxy.paths import Action, Target, classify, is_repository
from proxy.reading import cap_catalog_query, parse_query, strip_mount


class Right(StrEnum):
    """What a rule grants."""

    PULL = "pull"
    PUSH = "push"
    DELETE = "delete"
    CATALOG = "catalog"


REPOSITORY_RIGHTS = frozenset({Right.PULL, Right.PUSH, Right.DELETE})
ANY_USER = "*"
# distribution's NameTotalLengthMax: the registry refuses longer names, and the bound keeps glob
# backtracking cheap on names a client makes up.
REPOSITORY_MAX_LENGTH = 255

_RULE_KEYS = ("users", "repositories", "actions", "networks")
# What `@anonymous` may be granted: reading, never writing.
ANONYMOUS_RIGHTS = frozenset({Right.PULL, Right.CATALOG})
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PATTERN_CHARS = re.compile(r"[a-z0-9._/*-]+")
_WILDCARDS = re.compile(r"(\*\*|\*)")
# Go's strconv.Atoi, which reads the registry's `n`.


@dataclass(frozen=True)
class RequestContext:
    """What a rule may look at: who asks, for what, and from where."""

    identity: Identity
    method: str = "GET"
    target: Target = field(default_factory=lambda: Target(Action.OTHER))
    raw_query: str = ""
    content_type: str = ""
    # The real client address (after trusted_proxies / PROXY protocol); "" if unknown.
    client: str = ""

    @classmethod
    def of(
        cls, user: str, method: str = "GET", target: Target | None = None, raw_query: str = ""
    ) -> RequestContext:
        """A password-authenticated `user` from no known address (for tests and tools)."""
        return cls(Identity.user(user), method, target or Target(Action.OTHER), raw_query)

    @cached_property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.client)
        except ValueError:
            return None


# A bare user name stands for `RequestContext.of(name)`: rules with `networks` never apply to it.
Subject = RequestContext | str


def _context(who: Subject) -> RequestContext:
    return RequestContext.of(who) if isinstance(who, str) else who


@dataclass(frozen=True)
class Rule:
    """One entry of `access`, with groups expanded and globs compiled."""

    users: frozenset[str]
    any_user: bool
    patterns: tuple[re.Pattern[str], ...]
    rights: frozenset[Right]
    # Groups the identity itself carries: the reserved `anonymous`, and directory groups.
    groups: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    def names(self, identity: Identity) -> bool:
        if self.groups & identity.groups:
            return True
        return not identity.anonymous and (self.any_user or identity.name in self.users)

    def reaches(self, context: RequestContext) -> bool:
        """Whether the client's address is inside the rule's networks (if it has any)."""
        if not self.networks:
            return True
        address = context.address
        return address is not None and any(address in network for network in self.networks)

    def applies(self, context: RequestContext) -> bool:
        return self.names(context.identity) and self.reaches(context)

    def covers(self, repository: str) -> bool:
        return any(pattern.fullmatch(repository) for pattern in self.patterns)


class AccessPolicy:
    """The parsed `access` rules; empty means unrestricted."""

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self._rules = tuple(rules)

    @property
    def unrestricted(self) -> bool:
        return not self._rules

    @property
    def named_users(self) -> frozenset[str]:
        """Every user name the rules and their groups mention (to warn about typos)."""
        return frozenset().union(*(rule.users for rule in self._rules))

    @property
    def public(self) -> bool:
        """Whether some rule grants `@anonymous` anything (else no request is anonymous)."""
        return any(ANONYMOUS_GROUP in rule.groups for rule in self._rules)

    def restricts(self, identity: Identity) -> bool:
        """Whether some requests of `identity` may be refused (rules, or a token's scope)."""
        return not self.unrestricted or identity.scope is not None

    def allows(self, who: Subject, right: Right, repository: str | None) -> bool:
        """Whether `who` has `right`; no rule grants a repository right on `None`.

        A token has the right only where its scope and its owner's rights both grant it.
        """
        context = _context(who)
        scope = context.identity.scope
        if scope is not None:
            if right is not Right.CATALOG and (
                repository is None or len(repository) > REPOSITORY_MAX_LENGTH
            ):
                return False
            target = None if right is Right.CATALOG else repository
            if not scope.permits(right, target, context.address):
                return False
        if self.unrestricted:
            return True
        if right is Right.CATALOG:
            return any(right in rule.rights and rule.applies(context) for rule in self._rules)
        if repository is None or len(repository) > REPOSITORY_MAX_LENGTH:
            return False
        return any(
            right in rule.rights and rule.applies(context) and rule.covers(repository)
            for rule in self._rules
        )

    def may_pull_any(self, who: Subject) -> bool:
        """Whether any rule lets `who` pull some repository (else the catalog is empty)."""
        context = _context(who)
        scope = context.identity.scope
        if scope is not None and not (Right.PULL in scope.actions and scope.patterns):
            return False
        return self.unrestricted or any(
            Right.PULL in rule.rights and rule.applies(context) and rule.patterns
            for rule in self._rules
        )

    def may_pull(self, who: Subject, repository: str) -> bool:
        """Whether the catalog may show `repository` to `who`."""
        return self.allows(who, Right.PULL, repository)


def parse_access(groups: object, rules: object, *, directory_groups: bool = False) -> AccessPolicy:
    """Build the policy from the YAML values of `groups` and `access`; ValueError names the key.

    With `directory_groups` (an LDAP directory configured), `@NAME` also matches identities that
    carry the group NAME (members of the directory group), and need not be defined in `groups`.
    """
    members = _parse_groups(groups)
    if rules is None:
        return AccessPolicy()
    if not isinstance(rules, list):
        raise ValueError(f"access: expected a list of rules, got {rules!r}")
    return AccessPolicy(
        [
            _parse_rule(f"access[{i}]", rule, members, directory_groups)
            for i, rule in enumerate(rules)
        ]
    )


def _parse_groups(groups: object) -> dict[str, frozenset[str]]:
    if groups is None:
        return {}
    if not isinstance(groups, Mapping):
        raise ValueError(f"groups: expected a mapping of group name to users, got {groups!r}")
    parsed: dict[str, frozenset[str]] = {}
    for name, users in groups.items():
        if not isinstance(name, str) or not _GROUP_NAME.fullmatch(name):
            raise ValueError(
                f"groups: invalid group name {name!r} (expected letters, digits, '.', '_', '-')"
            )
        where = f"groups.{name}"
        if name == ANONYMOUS_GROUP:
            raise ValueError(
                f"groups.{name}: the name is reserved (@{ANONYMOUS_GROUP} means requests "
                "without credentials)"
            )
        if users is None:
            parsed[name] = frozenset()
            continue
        entries = _strings(where, users)
        for index, user in enumerate(entries):
            if user == ANY_USER or user.startswith("@"):
                raise ValueError(f"{where}[{index}]: a group lists user names only, got {user!r}")
            _check_user(f"{where}[{index}]", user)
        parsed[name] = frozenset(entries)
    return parsed


def _parse_rule(
    where: str, rule: object, groups: Mapping[str, frozenset[str]], directory_groups: bool = False
) -> Rule:
    if not isinstance(rule, Mapping):
        raise ValueError(f"{where}: expected a mapping with users, repositories and actions")
    for key in rule:
        if key not in _RULE_KEYS:
            raise ValueError(f"{where}: unknown key {key!r} (expected {', '.join(_RULE_KEYS)})")

    rights: set[Right] = set()
    for action in _required(where, rule, "actions"):
        try:
            rights.add(Right(action))
        except ValueError:
            expected = ", ".join(right.value for right in Right)
            raise ValueError(
                f"{where}.actions: unknown action {action!r} (expected {expected})"
            ) from None

    users: set[str] = set()
    identity_groups: set[str] = set()
    any_user = False
    for index, entry in enumerate(_required(where, rule, "users")):
        if entry == ANY_USER:
            any_user = True
        elif entry == f"@{ANONYMOUS_GROUP}":
            writes = sorted(right.value for right in rights - ANONYMOUS_RIGHTS)
            if writes:
                raise ValueError(
                    f"{where}.users[{index}]: @{ANONYMOUS_GROUP} may only pull and read the "
                    f"catalog, not {', '.join(writes)} (give those to named users)"
                )
            identity_groups.add(ANONYMOUS_GROUP)
        elif entry.startswith("@"):
            if directory_groups:
                # A directory group of that name, a configured one, or both: members of either.
                identity_groups.add(entry[1:])
                users |= groups.get(entry[1:], frozenset())
                continue
            if entry[1:] not in groups:
                defined = ", ".join(sorted(groups)) or "none"
                raise ValueError(
                    f"{where}.users[{index}]: unknown group {entry!r} (defined: {defined})"
                )
            users |= groups[entry[1:]]
        else:
            _check_user(f"{where}.users[{index}]", entry)
            users.add(entry)

    patterns: list[re.Pattern[str]] = []
    if rights & REPOSITORY_RIGHTS or rule.get("repositories") is not None:
        for index, pattern in enumerate(_required(where, rule, "repositories")):
            patterns.append(_glob(f"{where}.repositories[{index}]", pattern))
    networks = tuple(_parse_networks(f"{where}.networks", rule.get("networks")))
    return Rule(
        frozenset(users),
        any_user,
        tuple(patterns),
        frozenset(rights),
        frozenset(identity_groups),
        networks,
    )


def _parse_networks(where: str, value: object) -> list[Network]:
    if value is None:
        return []
    entries = _strings(where, value)
    if not entries:
        raise ValueError(f"{where}: expected at least one CIDR network")
    networks: list[Network] = []
    for index, entry in enumerate(entries):
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"{where}[{index}]: {entry!r} is not a CIDR network ({exc})") from None
    return networks


def _required(where: str, rule: Mapping[object, object], key: str) -> list[str]:
    value = rule.get(key)
    if value is None:
        raise ValueError(f"{where}.{key}: required")
    entries = _strings(f"{where}.{key}", value)
    if not entries:
        raise ValueError(f"{where}.{key}: expected at least one entry")
    return entries


def _strings(where: str, value: object) -> list[str]:
    """A list of strings; a single string counts as a list of one."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {value!r}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            # YAML reads unquoted no, on, 007 ... as booleans and numbers.
            raise ValueError(f"{where}[{index}]: expected a string, got {item!r} (quote it)")
    return list(value)


def _check_user(where: str, user: str) -> None:
    # What proxy.auth.credentials.parse_basic can return; any other name could never match.
    if not user or ":" in user or not user.isprintable():
        raise ValueError(f"{where}: {user!r} is not a possible user name")


def _glob(where: str, pattern: str) -> re.Pattern[str]:
    """`*` within one path component, `**` across components; anything else literal."""
    # Wildcards standing for a plain component must leave a valid name, or nothing matches.
    example = _WILDCARDS.sub("x", pattern)
    if (
        not _PATTERN_CHARS.fullmatch(pattern)
        or "***" in pattern
        or classify(f"/v2/{example}/tags/list").repository != example
    ):
        raise ValueError(
            f"{where}: {pattern!r} can never match a repository name (lowercase letters, "
            "digits, '.', '_', '-' and '/' components; wildcards '*' and '**')"
        )
    parts = _WILDCARDS.split(pattern)
    regex = "".join(
        ".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part) for part in parts
    )
    return re.compile(regex)


# For other rule kinds that take repository globs and string lists (proxy/access/immutable.py).
def glob_pattern(where: str, pattern: str) -> re.Pattern[str]:
    """A repository glob, as `repositories` in `access` reads it."""
    return _glob(where, pattern)


def strings(where: str, value: object) -> list[str]:
    """A list of strings; a single string counts as a list of one."""
    return _strings(where, value)


# Which rights a request needs.


def required_rights(
    method: str, target: Target, query: Mapping[str, str]
) -> list[tuple[Right, str | None]]:
    """The rights a request needs, as the registry itself decides; [] means any user.

    `query` should come from `parse_query` (Go's reading of the query string). A mount's
    `(pull, from)` comes last.
    """
    if target.action is Action.PING:
        return []
    if target.action is Action.CATALOG:
        return [(Right.CATALOG, None)]
    repository = target.repository
    rights: list[Right]
    if method in ("GET", "HEAD"):
        rights = [Right.PULL]
    elif method in ("POST", "PUT", "PATCH"):
        rights = [Right.PULL, Right.PUSH]
    elif method == "DELETE":
        rights = [Right.DELETE]
    else:
        rights = [Right.PULL, Right.PUSH, Right.DELETE]
    needed: list[tuple[Right, str | None]] = [(right, repository) for right in rights]
    source = mount_source(method, target, query)
    if source is not None:
        needed.append((Right.PULL, source))
    return needed


def mount_source(method: str, target: Target, query: Mapping[str, str]) -> str | None:
    """The `from` repository of a cross-repository mount, or None."""
    # The registry mounts on any POST to an upload URL, with or without an upload id.
    if method != "POST" or target.action is not Action.UPLOAD:
        return None
    if not query.get("mount") or not query.get("from"):
        return None
    return query["from"]


@dataclass(frozen=True)
class Decision:
    """What `authorize` concluded for one request."""

    allowed: bool
    # The raw query string to send upstream (mount dropped, catalog `n` capped).
    query: str
    # Why it was refused, for the log and the 403 message; empty when allowed.
    reason: str = ""


def authorize(policy: AccessPolicy, context: RequestContext) -> Decision:
    """Decide one identified request (its bytes already passed `proxy.reading`)."""
    method, target, raw_query = context.method, context.target, context.raw_query
    if target.action is Action.CATALOG:
        raw_query = cap_catalog_query(raw_query)
    if not policy.restricts(context.identity):
        return Decision(True, raw_query)
    for right, repository in required_rights(method, target, {}):
        if not policy.allows(context, right, repository):
            where = f" on {repository}" if repository else ""
            return Decision(False, raw_query, f"{right.value}{where} denied")
    source = mount_source(method, target, parse_query(raw_query))
    # A glob can match what is no name to the registry (`shared/**` takes `shared/x#/y`).
    if source is not None and not (
        is_repository(source) and policy.allows(context, Right.PULL, source)
    ):
        raw_query = strip_mount(raw_query)
    return Decision(True, raw_query)
