"""Immutable tags: a matching tag never moves to another manifest and is never deleted.

These are the rules; proxy/access/tag_guard.py enforces them.

Configuration (re-read on SIGHUP):

    immutable_tags:
      - {repositories: ["**"], tags: ["v*"]}

How the proxy finds out, and what it costs (the registry is the only record of what a tag is):

- A manifest PUT to an immutable tag: one HEAD of the tag upstream. 404: a new tag, the PUT
  streams as usual. Otherwise the body (a manifest, at most `MANIFEST_MAX_BYTES`) is read whole,
  its sha256 compared with the registry's `Docker-Content-Digest`: the same digest (clients re-put
  manifests) is forwarded, another one is refused with 403 DENIED naming the tag.
- A DELETE of an immutable tag: refused, no upstream request.
- A DELETE of a manifest by digest in a repository some entry covers: the tag list is read (one
  request per `TAGS_PAGE` tags), every immutable tag in it is HEADed (one request each) and every
  index one points to is read (one GET each, nested indexes too); the delete is refused (403) if
  one of them is the digest or lists it. At most `DELETE_LOOKUPS_MAX` HEADs and GETs and
  `DELETE_LOOKUP_SECONDS` in all, else the delete is refused with 503.
- Any other answer of the registry to these look-ups refuses the write (it cannot be confirmed;
  a delete with 503).

Not covered: blobs (a layer an immutable image uses can be deleted), garbage collection, which
never passes the proxy, and manifests that only refer to an image (`subject`).

The races that remain: two concurrent first pushes of the same new tag both see 404 and both are
forwarded; the later one wins. After that the tag is fixed. A delete by digest races the tagging
of an index that lists it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proxy.access.rules import glob_pattern, strings

_ENTRY_KEYS = ("repositories", "tags")
_TAG_GLOB = re.compile(r"[\w*][\w.*-]{0,127}", re.ASCII)


@dataclass(frozen=True)
class _Entry:
    repositories: tuple[re.Pattern[str], ...]
    tags: tuple[re.Pattern[str], ...]


class ImmutableTags:
    """The parsed `immutable_tags`; empty means every tag may move."""

    def __init__(self, entries: Sequence[_Entry] = ()) -> None:
        self._entries = tuple(entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def covers(self, repository: str) -> bool:
        """Whether some entry may fix a tag of `repository`."""
        return any(_any(entry.repositories, repository) for entry in self._entries)

    def fixed(self, repository: str, tag: str) -> bool:
        """Whether `tag` of `repository` is immutable."""
        return any(
            _any(entry.repositories, repository) and _any(entry.tags, tag)
            for entry in self._entries
        )


def _any(patterns: tuple[re.Pattern[str], ...], text: str) -> bool:
    return any(pattern.fullmatch(text) for pattern in patterns)


def parse_immutable_tags(value: object) -> ImmutableTags:
    """Build from the YAML value of `immutable_tags`; ValueError names the entry."""
    if value is None:
        return ImmutableTags()
    if not isinstance(value, list):
        raise ValueError(f"immutable_tags: expected a list of entries, got {value!r}")
    entries: list[_Entry] = []
    for index, entry in enumerate(value):
        where = f"immutable_tags[{index}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a mapping with repositories and tags")
        for key in entry:
            if key not in _ENTRY_KEYS:
                raise ValueError(f"{where}: unknown key {key!r} (expected repositories, tags)")
        repositories = [
            glob_pattern(f"{where}.repositories[{i}]", pattern)
            for i, pattern in enumerate(_globs(where, entry, "repositories"))
        ]
        tags = [
            _tag(f"{where}.tags[{i}]", pattern)
            for i, pattern in enumerate(_globs(where, entry, "tags"))
        ]
        entries.append(_Entry(tuple(repositories), tuple(tags)))
    return ImmutableTags(entries)


def _globs(where: str, entry: Mapping[object, object], key: str) -> list[str]:
    given = strings(f"{where}.{key}", entry.get(key, []))
    if not given:
        raise ValueError(f"{where}.{key}: expected at least one glob")
    return given


def _tag(where: str, pattern: str) -> re.Pattern[str]:
    """`*` matches any run of tag characters; anything else is literal."""
    if not _TAG_GLOB.fullmatch(pattern):
        raise ValueError(
            f"{where}: {pattern!r} can never match a tag (letters, digits, '_', '.', '-'; "
            "wildcard '*')"
        )
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))
