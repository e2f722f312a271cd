"""What a registry API path asks for: the action, the repository and the reference.

The patterns are distribution's router's (`registry/api/v2/descriptors.go` with the reference and
go-digest grammars), tried in its order, so the proxy and the registry read a path the same way
(tests/test_reading.py compares them with the real registry). The referrers route is the proxy's
own: the registry has none and answers 404, but a future one will need pull.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote


class Action(StrEnum):
    """A small fixed set, safe as a metrics label."""

    PING = "ping"
    CATALOG = "catalog"
    TAGS = "tags"
    MANIFEST = "manifest"
    BLOB = "blob"
    UPLOAD = "upload"
    REFERRERS = "referrers"
    OTHER = "other"


# distribution's reference grammar: an optional domain (2.8.2's docker/distribution/reference;
# v3's distribution/reference adds IPv6 literals), then path components.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_NAME = rf"(?P<name>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
_TAG = r"[\w][\w.-]{0,127}"
# go-digest 1.0.0's DigestRegexp, which the router uses: looser than a valid digest, so
# `sha256:totallywrong` is routed as a manifest (then read as a tag) or a blob.
_DIGEST = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+"
# What every registry's digest.Parse takes: go-digest 1.0.0 (v3) wants an algorithm it links and
# lowercase hex of its length; the older one in 2.8.2 also takes other characters (`Z` * 64).
_VALID_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")

# re.ASCII: Go's \w (in the registry's patterns) matches ASCII only.
_ROUTES: list[tuple[Action, re.Pattern[str]]] = [
    (action, re.compile(pattern, re.ASCII))
    for action, pattern in [
        (Action.PING, r"/v2/"),
        (Action.CATALOG, r"/v2/_catalog"),
        (Action.TAGS, rf"/v2/{_NAME}/tags/list"),
        (Action.MANIFEST, rf"/v2/{_NAME}/manifests/(?P<ref>{_TAG}|{_DIGEST})"),
        (Action.BLOB, rf"/v2/{_NAME}/blobs/(?P<ref>{_DIGEST})"),
        (Action.UPLOAD, rf"/v2/{_NAME}/blobs/uploads/(?P<ref>[A-Za-z0-9._=-]*)"),
        (Action.REFERRERS, rf"/v2/{_NAME}/referrers/(?P<ref>{_DIGEST})"),
    ]
]


_REPOSITORY = re.compile(_NAME, re.ASCII)


def is_repository(name: str) -> bool:
    """Whether the registry reads `name` (decoded) as a repository name."""
    return _REPOSITORY.fullmatch(name) is not None


def is_digest(reference: str) -> bool:
    """Whether every registry reads `reference` as a digest (another one with ':' is ambiguous)."""
    return _VALID_DIGEST.fullmatch(reference) is not None


@dataclass(frozen=True)
class Target:
    """The parts of a request target that access rules, metrics and the audit log use."""

    action: Action
    repository: str | None = None
    reference: str | None = None


def classify(raw_path: str) -> Target:
    """Classify a raw request target (query ignored, percent-escapes decoded like the registry)."""
    try:
        path = unquote(raw_path.partition("?")[0], errors="strict")
    except UnicodeDecodeError:
        return Target(Action.OTHER)
    for action, pattern in _ROUTES:
        match = pattern.fullmatch(path)
        if match:
            groups = match.groupdict()
            return Target(action, groups.get("name"), groups.get("ref") or None)
    return Target(Action.OTHER)
