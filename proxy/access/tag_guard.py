"""Enforcing `immutable_tags`: ask the registry what a tag points to before a write may change it.

See proxy/access/immutable.py for what is checked, what it costs and the race that remains.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.access.immutable import ImmutableTags
from proxy.exchange import Exchange
from proxy.paths import Action, is_digest
from proxy.relay.failure import UPSTREAM_ERRORS
from proxy.relay.headers import upstream_url

log = logging.getLogger("registry_proxy.immutable")

# distribution v3 refuses larger manifests (4 MiB); a bigger body cannot be the same manifest.
MANIFEST_MAX_BYTES = 4 * 1024 * 1024
TAGS_PAGE = 1000
# Tag-list pages one delete may read before the proxy gives up (and refuses the delete).
TAGS_PAGES_MAX = 100
# Manifests one delete by digest may read (a HEAD per immutable tag, a GET per index they reach)
# and the seconds it may take, before the proxy gives up and refuses the delete with 503.
DELETE_LOOKUPS_MAX = 1000
DELETE_LOOKUP_SECONDS = 30.0
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
# Everything the registry may have stored, so that HEAD answers the stored manifest's digest.
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    )
)


@dataclass(frozen=True)
class TagRefusal:
    reason: str
    # The registry's answers could not settle the write (503), rather than a rule refusing it.
    unconfirmed: bool = False


class TagGuard:
    """Asks the registry what an immutable tag points to before a write may change it."""

    def __init__(self, session: aiohttp.ClientSession, upstream: URL, body_timeout: float) -> None:
        self._session = session
        self._base = str(upstream.origin())
        self._body_timeout = body_timeout

    async def refusal(
        self, request: web.Request, exchange: Exchange, tags: ImmutableTags
    ) -> TagRefusal | None:
        target = exchange.target
        if (
            not tags
            or target.action is not Action.MANIFEST
            or request.method not in ("PUT", "DELETE")
        ):
            return None
        repository, reference = target.repository, target.reference
        assert repository is not None and reference is not None
        if not tags.covers(repository):
            return None
        if request.method == "DELETE":
            return await self.delete_refusal(repository, reference, tags)
        if is_digest(reference) or not tags.fixed(repository, reference):
            return None
        status, current, _ = await self._head(repository, reference)
        if status == 404:
            return None
        if current is None:
            return TagRefusal(
                f"tag {reference} is immutable and its digest could not be read", unconfirmed=True
            )
        body = await _read_manifest(request, self._body_timeout)
        if body is None:
            return TagRefusal(f"tag {reference} is immutable: it points to {current}")
        exchange.body = body
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if digest != current:
            return TagRefusal(f"tag {reference} is immutable: it points to {current}")
        return None

    async def delete_refusal(
        self, repository: str, reference: str, tags: ImmutableTags
    ) -> TagRefusal | None:
        """Why deleting `reference` (a tag, or a digest) would change an immutable tag, if so."""
        if not tags.covers(repository):
            return None
        if not is_digest(reference):
            if tags.fixed(repository, reference):
                return TagRefusal(f"tag {reference} of {repository} is immutable")
            return None
        return await self._digest_delete_refusal(repository, reference, tags)

    async def _digest_delete_refusal(
        self, repository: str, digest: str, tags: ImmutableTags
    ) -> TagRefusal | None:
        try:
            async with asyncio.timeout(DELETE_LOOKUP_SECONDS):
                return await self._reached_by_fixed_tag(repository, digest, tags)
        except TimeoutError:
            return TagRefusal(
                f"immutable tags of {repository} not read within {DELETE_LOOKUP_SECONDS:g} s",
                unconfirmed=True,
            )

    async def _reached_by_fixed_tag(
        self, repository: str, digest: str, tags: ImmutableTags
    ) -> TagRefusal | None:
        """Refuse if an immutable tag points to `digest`, or to an index that lists it."""
        listed = await self._tags_of(repository)
        if listed is None:
            return TagRefusal(
                f"the tags of {repository} could not be read to protect immutable tags",
                unconfirmed=True,
            )
        budget = DELETE_LOOKUPS_MAX
        too_many = TagRefusal(
            f"more than {DELETE_LOOKUPS_MAX} manifests to read to protect the immutable tags "
            f"of {repository}",
            unconfirmed=True,
        )
        read: set[str] = set()
        for tag in listed:
            if not tags.fixed(repository, tag):
                continue
            budget -= 1
            if budget < 0:
                return too_many
            status, current, media_type = await self._head(repository, tag)
            if status == 404:
                continue  # deleted since the list was read
            if current is None:
                return TagRefusal(
                    f"immutable tag {tag} of {repository} could not be read", unconfirmed=True
                )
            if current == digest:
                return TagRefusal(f"immutable tag {tag} of {repository} points to {digest}")
            # Indexes nested in indexes too: a nested one is as much a part of the tag.
            pending = [current] if media_type in INDEX_TYPES else []
            while pending:
                index = pending.pop()
                if index in read:
                    continue
                read.add(index)
                budget -= 1
                if budget < 0:
                    return too_many
                children = await self._children(repository, index)
                if children is None:
                    return TagRefusal(
                        f"index {index} of immutable tag {tag} of {repository} could not be read",
                        unconfirmed=True,
                    )
                for child, child_type in children:
                    if child == digest:
                        return TagRefusal(
                            f"immutable tag {tag} of {repository} points to an index that "
                            f"lists {digest}"
                        )
                    if child_type in INDEX_TYPES:
                        pending.append(child)
        return None

    async def _head(self, repository: str, reference: str) -> tuple[int, str | None, str]:
        """The registry's status for HEAD of the manifest, its digest (if 200) and media type."""
        url = upstream_url(self._base, f"/v2/{repository}/manifests/{reference}")
        try:
            async with self._session.head(
                url, headers={"Accept": MANIFEST_TYPES}, allow_redirects=False
            ) as response:
                if response.status != 200:
                    return response.status, None, ""
                digest = response.headers.get("Docker-Content-Digest")
                return response.status, digest, response.content_type
        except UPSTREAM_ERRORS as exc:
            log.warning("immutable tag look-up of %s:%s failed: %s", repository, reference, exc)
            return 0, None, ""

    async def _children(self, repository: str, index: str) -> list[tuple[str, str]] | None:
        """The (digest, media type) of every manifest the index lists, or None if unreadable."""
        url = upstream_url(self._base, f"/v2/{repository}/manifests/{index}")
        body = bytearray()
        try:
            async with self._session.get(
                url, headers={"Accept": MANIFEST_TYPES}, allow_redirects=False
            ) as response:
                if response.status != 200:
                    return None
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MANIFEST_MAX_BYTES:
                        return None
            document = json.loads(body)
        except (*UPSTREAM_ERRORS, ValueError) as exc:
            log.warning("immutable tag look-up of %s@%s failed: %s", repository, index, exc)
            return None
        manifests = document.get("manifests") if isinstance(document, dict) else None
        if not isinstance(manifests, list):
            return None
        children: list[tuple[str, str]] = []
        for entry in manifests:
            child = entry.get("digest") if isinstance(entry, dict) else None
            if not isinstance(child, str):
                return None
            media_type = entry.get("mediaType")
            children.append((child, media_type if isinstance(media_type, str) else ""))
        return children

    async def _tags_of(self, repository: str) -> list[str] | None:
        """Every tag of `repository` ([] if it has none), or None if the registry would not say."""
        found: list[str] = []
        last: str | None = None
        for _ in range(TAGS_PAGES_MAX):
            target = f"/v2/{repository}/tags/list?n={TAGS_PAGE}"
            if last is not None:
                target += f"&last={quote(last, safe='')}"
            try:
                async with self._session.get(
                    upstream_url(self._base, target), allow_redirects=False
                ) as response:
                    if response.status == 404:
                        return found
                    if response.status != 200:
                        return None
                    document = await response.json(content_type=None)
                    more = "Link" in response.headers
            except (*UPSTREAM_ERRORS, ValueError) as exc:
                log.warning("tag list of %s for immutable tags failed: %s", repository, exc)
                return None
            # The registry always names `tags` (null when there are none): anything else is
            # no tag list, and cannot show that no immutable tag points to the digest.
            if not isinstance(document, dict) or "tags" not in document:
                return None
            page = document["tags"]
            if page is None:
                return found
            if not isinstance(page, list) or not all(isinstance(tag, str) for tag in page):
                return None
            found.extend(page)
            if not more or not page:
                return found
            last = page[-1]
        return None


async def _read_manifest(request: web.Request, idle: float) -> bytes | None:
    """The whole body, or None if it is larger than any manifest or stalls for `idle` seconds."""
    length = request.content_length
    if length is not None and length > MANIFEST_MAX_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await request.content.readany()
        except TimeoutError:
            return None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MANIFEST_MAX_BYTES:
            return None
        chunks.append(chunk)
