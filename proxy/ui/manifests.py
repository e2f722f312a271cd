"""Manifests and image configs as the pages show them: read defensively, bounded, cached.

Everything in them was written by whoever may push: any field may be missing or of another
type, and labels may be megabytes; nothing here trusts their shape.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field

INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
IMAGE_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
MANIFEST_ACCEPT = ", ".join(sorted(INDEX_TYPES | IMAGE_TYPES))

# What a page parses of one manifest or config blob. Real ones take a few KiB (an index of many
# platforms or a long history, tens); the registry takes manifests up to 4 MiB, and a tag page
# parses 25 of each on the event loop, so a pusher's largest would cost every client of the
# worker seconds and hundreds of MB per view. Larger ones are not shown.
MAX_MANIFEST_BYTES = 512 * 1024
MAX_CONFIG_BYTES = 512 * 1024

# Config blobs remembered by digest (their content never changes).
CONFIG_CACHE_SIZE = 4096
# What one config's facts keep of what its pusher wrote: the cache holds every config read, so
# megabytes of labels each would fill the memory (cut values end with "…").
MAX_LABEL_CHARS = 64 * 1024
MAX_FACT_CHARS = 256


@dataclass(frozen=True)
class ConfigFacts:
    """What a page shows from an image's config blob."""

    created: str | None = None
    platform: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int | None
    media_type: str


@dataclass(frozen=True)
class Child:
    """One manifest an index lists."""

    digest: str
    platform: str
    size: int | None
    media_type: str


@dataclass
class Manifest:
    """One manifest as the pages show it."""

    digest: str
    media_type: str
    size: int | None = None
    config_digest: str | None = None
    layers: list[Layer] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    config: ConfigFacts = field(default_factory=ConfigFacts)
    # Why the manifest could not be read, when it could not.
    problem: str | None = None

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def platforms(self) -> list[str]:
        if not self.is_index:
            return [self.config.platform] if self.config.platform else []
        return [child.platform for child in self.children if child.platform != "unknown/unknown"]


def _platform(value: object) -> str:
    if not isinstance(value, dict):
        return "unknown/unknown"
    parts = [str(value.get("os") or "unknown"), str(value.get("architecture") or "unknown")]
    if value.get("variant"):
        parts.append(str(value["variant"]))
    return "/".join(parts)


def _size(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _strings(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def read_config(body: bytes) -> ConfigFacts:
    """Created time, platform and labels of an image config (OCI or Docker), as far as present."""
    try:
        document = json.loads(body)
    except ValueError:
        return ConfigFacts()
    if not isinstance(document, dict):
        return ConfigFacts()
    inner = document.get("config")
    labels = _strings(inner.get("Labels")) if isinstance(inner, dict) else {}
    created = document.get("created")
    has_platform = "os" in document or "architecture" in document
    return ConfigFacts(
        created[:MAX_FACT_CHARS] if isinstance(created, str) else None,
        _platform(document)[:MAX_FACT_CHARS] if has_platform else None,
        _kept_labels(labels),
    )


def _kept_labels(labels: dict[str, str]) -> dict[str, str]:
    """The labels, in name order, until MAX_LABEL_CHARS of names and values are kept."""
    kept: dict[str, str] = {}
    room = MAX_LABEL_CHARS
    for key, value in sorted(labels.items()):
        if room <= len(key):
            break
        room -= len(key)
        kept[key] = value if len(value) <= room else value[: max(room - 1, 0)] + "…"
        room -= len(kept[key])
    return kept


def read_manifest(digest: str, media_type: str, body: bytes) -> Manifest:
    """The parts of a manifest the pages show; `problem` says why when it is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return Manifest(digest, media_type, problem="not a JSON manifest")
    media_type = str(document.get("mediaType") or media_type)
    manifest = Manifest(digest, media_type, annotations=_strings(document.get("annotations")))
    if media_type in INDEX_TYPES:
        for entry in document.get("manifests") or []:
            if isinstance(entry, dict):
                manifest.children.append(
                    Child(
                        str(entry.get("digest", "")),
                        _platform(entry.get("platform")),
                        _size(entry.get("size")),
                        str(entry.get("mediaType", "")),
                    )
                )
        return manifest
    config = document.get("config")
    if isinstance(config, dict):
        manifest.config_digest = str(config.get("digest", "")) or None
    total = _size(config.get("size")) if isinstance(config, dict) else None
    for entry in document.get("layers") or []:
        if isinstance(entry, dict):
            layer = Layer(
                str(entry.get("digest", "")),
                _size(entry.get("size")),
                str(entry.get("mediaType", "")),
            )
            manifest.layers.append(layer)
            total = None if total is None or layer.size is None else total + layer.size
    manifest.size = total
    return manifest


class ConfigCache:
    """Config facts by digest: content under a digest never changes, so entries never go stale."""

    def __init__(self, size: int = CONFIG_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[str, ConfigFacts] = OrderedDict()

    def get(self, digest: str) -> ConfigFacts | None:
        facts = self._entries.get(digest)
        if facts is not None:
            self._entries.move_to_end(digest)
        return facts

    def put(self, digest: str, facts: ConfigFacts) -> None:
        self._entries[digest] = facts
        self._entries.move_to_end(digest)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
