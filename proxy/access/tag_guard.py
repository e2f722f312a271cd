"""Enforcing `immutable_tags`: ask the registry what a tag points to before a write may change it.

See proxy/access/immutable.py for what is checked, what it costs and the race that remains.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.access.immutable import ImmutableTags
from proxy.exchange import Exchange
from proxy.paths import Action
from proxy.relay.failure import UPSTREAM_ERRORS
from proxy.relay.headers import upstream_url

log = logging.getLogger("registry_proxy.immutable")

# distribution v3 refuses larger manifests (4 MiB); a bigger body cannot be the same manifest.
MANIFEST_MAX_BYTES = 4 * 1024 * 1024
TAGS_PAGE = 1000
# Tag-list pages one delete may read before the proxy gives up (and refuses the delete).
TAGS_PAGES_MAX = 100
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


def _is_digest(reference: str) -> bool:
    return ":" in reference


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
            if not _is_digest(reference):
                if tags.fixed(repository, reference):
                    return TagRefusal(f"tag {reference} of {repository} is immutable")
                return None
            return await self._delete_refusal(repository, reference, tags)
        if _is_digest(reference) or not tags.fixed(repository, reference):
            return None
        status, current = await self._digest_of(repository, reference)
        if status == 404:
            return None
        if current is None:
            return TagRefusal(f"tag {reference} is immutable and its digest could not be read")
        body = await _read_manifest(request, self._body_timeout)
        if body is None:
            return TagRefusal(f"tag {reference} is immutable: it points to {current}")
        exchange.body = body
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if digest != current:
            return TagRefusal(f"tag {reference} is immutable: it points to {current}")
        return None

    async def _delete_refusal(
        self, repository: str, digest: str, tags: ImmutableTags
    ) -> TagRefusal | None:
        listed = await self._tags_of(repository)
        if listed is None:
            return TagRefusal(
                f"the tags of {repository} could not be read to protect immutable tags"
            )
        for tag in listed:
            if not tags.fixed(repository, tag):
                continue
            status, current = await self._digest_of(repository, tag)
            if current == digest:
                return TagRefusal(f"immutable tag {tag} of {repository} points to {digest}")
            if status != 404 and current is None:
                return TagRefusal(f"immutable tag {tag} of {repository} could not be read")
        return None

    async def _digest_of(self, repository: str, tag: str) -> tuple[int, str | None]:
        """The registry's status for HEAD of the tag, and the digest it names (if 200)."""
        url = upstream_url(self._base, f"/v2/{repository}/manifests/{tag}")
        try:
            async with self._session.head(
                url, headers={"Accept": MANIFEST_TYPES}, allow_redirects=False
            ) as response:
                digest = response.headers.get("Docker-Content-Digest")
                return response.status, digest if response.status == 200 else None
        except UPSTREAM_ERRORS as exc:
            log.warning("immutable tag look-up of %s:%s failed: %s", repository, tag, exc)
            return 0, None

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
