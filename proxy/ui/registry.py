"""The registry API, called for a signed-in user under the API's own rules.

Every page is drawn from registry API requests the user could have sent with Basic credentials:
each is built as an API path, read back the way the gate reads a client's (`classify`), and
authorized by the same `authorize`, read-only switch and immutable tags before it is sent. So the
browser can do nothing the API would refuse the same user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

from proxy.access.rules import RequestContext, authorize
from proxy.access.tag_guard import TagGuard
from proxy.exchange import REQUEST_ID_HEADER
from proxy.gate import AccessControl
from proxy.identity import Identity
from proxy.paths import Action, Target, classify, is_digest
from proxy.reading import CATALOG_MAX_N, reference_problem
from proxy.refusal import Refusal
from proxy.relay.failure import UPSTREAM_ERRORS
from proxy.relay.slots import UpstreamSlots
from proxy.ui.forms import read_at_most
from proxy.ui.manifests import (
    MANIFEST_ACCEPT,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    ConfigCache,
    ConfigFacts,
    Manifest,
    read_config,
    read_manifest,
)

log = logging.getLogger("registry_proxy.ui")

# Tag and catalog lists: the registry's own bound on a manifest.
MAX_LIST_BYTES = 4 * 1024 * 1024
# Registry requests one page may have in flight at once.
PAGE_CONCURRENCY = 8
# Catalog pages (of CATALOG_MAX_N names) one search may read before offering to go on.
SEARCH_PAGES = 10
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TAG_DELETE_UNSUPPORTED = (
    "this registry deletes manifests only by digest, not tags alone (registry 2.x): open the "
    "tag's manifest and delete it there, which removes every tag pointing to it"
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 3

T = TypeVar("T")


class Refused(Exception):
    """The API would refuse this request to this user: `status` and why.

    `refusal` is the access log's decision when the API's gate would have refused it too.
    """

    def __init__(self, status: int, reason: str, refusal: Refusal | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.refusal = refusal


class TooLarge(Refused):
    """The registry's answer is over the bound a page reads."""


@dataclass(frozen=True)
class Acting:
    """Who a page acts for, and the request facts the registry is told (as the API forwards)."""

    identity: Identity
    client: str
    scheme: str
    host: str
    request_id: str
    # Whose share of the upstream pool the requests take (the name the API's would count).
    user: str = ""


@dataclass(frozen=True)
class RepositoryPage:
    names: list[str]
    # Where the next page starts (the last name read), or None at the end.
    after: str | None
    # A search that read SEARCH_PAGES catalog pages and stopped there.
    searched_to: str | None = None


@dataclass(frozen=True)
class TagPage:
    rows: list[tuple[str, Manifest]]
    after: str | None
    total: int


def api_path(action: Action, repository: str = "", reference: str = "") -> str:
    """The API path for a target; Refused (400) unless the gate reads it back the same."""
    if action is Action.CATALOG:
        return "/v2/_catalog"
    suffix = {
        Action.TAGS: "/tags/list",
        Action.MANIFEST: f"/manifests/{reference}",
        Action.BLOB: f"/blobs/{reference}",
    }[action]
    path = f"/v2/{repository}{suffix}"
    expected = Target(action, repository, reference or None)
    if classify(path) != expected or reference_problem(expected) is not None:
        raise Refused(
            400,
            "not a repository name and reference the registry reads one way",
            Refusal.BAD_REQUEST,
        )
    return path


async def _bounded(calls: Iterable[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    semaphore = asyncio.Semaphore(limit)

    async def run(call: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await call()

    return await asyncio.gather(*(run(call) for call in calls))


async def _answer(response: aiohttp.ClientResponse, limit: int) -> tuple[int, str, str, bytes]:
    """Status, content type, digest header and body (TooLarge past `limit` bytes)."""
    if response.content_length is not None and response.content_length > limit:
        raise TooLarge(502, f"the registry's answer is larger than {limit} bytes")
    body = await read_at_most(response.content, limit)
    if body is None:
        raise TooLarge(502, f"the registry's answer is larger than {limit} bytes")
    return (
        response.status,
        response.headers.get("Content-Type", "").partition(";")[0].strip(),
        response.headers.get("Docker-Content-Digest", ""),
        body,
    )


class Registry:
    """Registry reads and deletes for the pages, each authorized as the API would authorize it."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: URL,
        access: AccessControl,
        guard: TagGuard,
        configs: ConfigCache | None = None,
        slots: UpstreamSlots | None = None,
    ) -> None:
        self._session = session
        self._base = str(upstream.origin())
        self._access = access
        self._guard = guard
        self._configs = configs if configs is not None else ConfigCache()
        self._slots = slots

    @contextlib.asynccontextmanager
    async def _slot(self, who: Acting) -> AsyncIterator[None]:
        """A slot in the user's share of the upstream pool, as the API's requests take one."""
        if self._slots is None:
            yield
            return
        if not await self._slots.acquire(who.user):
            raise Refused(503, "proxy busy: no upstream connection free; try again")
        try:
            yield
        finally:
            self._slots.release(who.user)

    @property
    def read_only(self) -> bool:
        return self._access.read_only

    def refusal(self, who: Acting, method: str, path: str) -> str | None:
        """Why the API would refuse `method path` to this user, or None."""
        if self._access.read_only and method in _WRITES:
            return "the registry is read-only"
        target = classify(path)
        context = RequestContext(who.identity, method, target, client=who.client)
        decision = authorize(self._access.policy, context)
        return None if decision.allowed else decision.reason

    def may(self, who: Acting, method: str, path: str) -> bool:
        return self.refusal(who, method, path) is None

    def may_delete(self, who: Acting, repository: str, reference: str) -> bool:
        """Whether to offer a delete: the right, and no immutable tag named by `reference`."""
        path = api_path(Action.MANIFEST, repository, reference)
        immutable = self._access.immutable
        fixed = (
            not is_digest(reference)
            and immutable.covers(repository)
            and immutable.fixed(repository, reference)
        )
        return not fixed and self.may(who, "DELETE", path)

    def _check(self, who: Acting, method: str, path: str) -> None:
        reason = self.refusal(who, method, path)
        if reason is not None:
            # The API's statuses: 405 for a write while read-only, else 403.
            if self._access.read_only and method in _WRITES:
                raise Refused(405, reason, Refusal.READ_ONLY)
            raise Refused(403, reason, Refusal.DENIED)

    def _headers(self, who: Acting, accept: str | None = None) -> dict[str, str]:
        headers = {
            "Host": who.host,
            "X-Forwarded-Proto": who.scheme,
            REQUEST_ID_HEADER: who.request_id,
        }
        if who.client:
            headers["X-Forwarded-For"] = who.client
        if accept:
            headers["Accept"] = accept
        return headers

    async def _get(
        self, who: Acting, path: str, query: str = "", *, accept: str | None = None, limit: int
    ) -> tuple[int, str, str, bytes]:
        """GET an authorized path: status, content type, digest header and body (bounded).

        A redirect (a blob in S3) is followed with no header of ours: the storage gets neither
        the client's address nor a Host that would break its signed URL.
        """
        self._check(who, "GET", path)
        url = URL(self._base + path + (f"?{query}" if query else ""), encoded=True)
        headers = self._headers(who, accept)
        try:
            for _ in range(MAX_REDIRECTS + 1):
                async with (
                    self._slot(who),
                    self._session.get(url, headers=headers, allow_redirects=False) as response,
                ):
                    location = response.headers.get("Location")
                    if response.status not in _REDIRECTS or not location:
                        return await _answer(response, limit)
                # Blobs in object storage: a presigned URL on another host, which is told
                # nothing of the client (its Host would void the signature).
                url = url.join(URL(location, encoded=True))
                headers = {"Accept": accept} if accept else {}
            raise Refused(502, "the registry redirected too many times")
        except UPSTREAM_ERRORS as exc:
            log.warning("ui: registry request %s failed: %s", path, exc)
            raise Refused(502, "the registry did not answer") from None
        raise Refused(502, "the registry redirected too often")

    async def repositories(
        self, who: Acting, search: str, after: str | None, count: int
    ) -> RepositoryPage:
        """Up to `count` repositories the user may pull, after `after`, whose name has `search`."""
        path = api_path(Action.CATALOG)
        self._check(who, "GET", path)
        context = RequestContext(who.identity, "GET", Target(Action.CATALOG), client=who.client)
        policy = self._access.policy
        shown: list[str] = []
        cursor = after
        pages = SEARCH_PAGES if search else 2
        for _ in range(pages):
            query = f"n={CATALOG_MAX_N}" + (f"&last={quote(cursor, safe='')}" if cursor else "")
            status, _, _, body = await self._get(who, path, query, limit=MAX_LIST_BYTES)
            names = _catalog_names(status, body)
            for index, name in enumerate(names):
                if search.lower() in name and policy.may_pull(context, name):
                    shown.append(name)
                    if len(shown) == count:
                        more = index + 1 < len(names) or len(names) == CATALOG_MAX_N
                        return RepositoryPage(shown, name if more else None)
            if len(names) < CATALOG_MAX_N:
                return RepositoryPage(shown, None)
            cursor = names[-1]
        return RepositoryPage(shown, None, searched_to=cursor)

    async def tags(self, who: Acting, repository: str, after: str | None, count: int) -> TagPage:
        """A page of tags with what each points to (only this page's manifests are read)."""
        path = api_path(Action.TAGS, repository)
        status, _, _, body = await self._get(who, path, limit=MAX_LIST_BYTES)
        if status == 404:
            raise Refused(404, f"no repository {repository}")
        if status != 200:
            raise Refused(502, f"the registry answered {status} for the tags of {repository}")
        try:
            listed = json.loads(body).get("tags") or []
        except (ValueError, AttributeError):
            raise Refused(502, "the registry's tag list is not one") from None
        names = sorted(str(tag) for tag in listed)
        start = 0
        if after is not None:
            start = next((i for i, name in enumerate(names) if name > after), len(names))
        page = names[start : start + count]
        manifests = await _bounded(
            [lambda tag=tag: self.manifest(who, repository, tag) for tag in page],  # type: ignore[misc]
            PAGE_CONCURRENCY,
        )
        more = start + count < len(names)
        rows = list(zip(page, manifests, strict=True))
        return TagPage(rows, page[-1] if more else None, len(names))

    async def manifest(self, who: Acting, repository: str, reference: str) -> Manifest:
        """One manifest, with its config's facts for an image."""
        path = api_path(Action.MANIFEST, repository, reference)
        try:
            status, media_type, digest, body = await self._get(
                who, path, accept=MANIFEST_ACCEPT, limit=MAX_MANIFEST_BYTES
            )
        except TooLarge:
            known = reference if is_digest(reference) else ""
            return Manifest(
                known, "", problem=f"over {MAX_MANIFEST_BYTES // 1024} KiB: too large to show"
            )
        if status == 404:
            return Manifest(digest, media_type, problem="not found")
        if status != 200:
            return Manifest(digest, media_type, problem=f"the registry answered {status}")
        known = digest or (reference if is_digest(reference) else "")
        manifest = read_manifest(known, media_type, body)
        if manifest.config_digest and is_digest(manifest.config_digest):
            manifest.config = await self._config(who, repository, manifest.config_digest)
        return manifest

    async def _config(self, who: Acting, repository: str, digest: str) -> ConfigFacts:
        path = api_path(Action.BLOB, repository, digest)
        # Authorized every time, cached or not: the cache holds content, not rights.
        self._check(who, "GET", path)
        cached = self._configs.get(digest)
        if cached is not None:
            return cached
        try:
            status, _, _, body = await self._get(who, path, limit=MAX_CONFIG_BYTES)
        except Refused:
            return ConfigFacts()
        if status != 200:
            return ConfigFacts()
        facts = read_config(body)
        self._configs.put(digest, facts)
        return facts

    async def delete(self, who: Acting, repository: str, reference: str) -> str:
        """Delete a tag or a manifest as the API would; Refused says why not. The digest deleted."""
        path = api_path(Action.MANIFEST, repository, reference)
        self._check(who, "DELETE", path)
        refusal = await self._guard.delete_refusal(repository, reference, self._access.immutable)
        if refusal is not None:
            if refusal.unconfirmed:
                raise Refused(503, refusal.reason, Refusal.UNCONFIRMED)
            raise Refused(403, refusal.reason, Refusal.DENIED)
        url = URL(self._base + path, encoded=True)
        try:
            async with (
                self._slot(who),
                self._session.delete(
                    url, headers=self._headers(who), allow_redirects=False
                ) as response,
            ):
                body = await read_at_most(response.content, 64 * 1024) or b""
                if response.status == 400 and not is_digest(reference):
                    # Registry 2.x deletes manifests by digest only (the API answers the same).
                    raise Refused(400, TAG_DELETE_UNSUPPORTED)
                if response.status != 202:
                    raise Refused(response.status, _registry_message(response.status, body))
                return response.headers.get("Docker-Content-Digest", reference)
        except UPSTREAM_ERRORS as exc:
            log.warning("ui: registry delete %s failed: %s", path, exc)
            raise Refused(502, "the registry did not answer") from None


def _catalog_names(status: int, body: bytes) -> list[str]:
    if status != 200:
        raise Refused(502, f"the registry answered {status} for its catalog")
    try:
        names: Any = json.loads(body).get("repositories")
    except (ValueError, AttributeError):
        names = None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise Refused(502, "the registry's catalog is not one")
    return names


def _registry_message(status: int, body: bytes) -> str:
    """The registry's own error message, for the page."""
    try:
        errors = json.loads(body).get("errors") or []
        message = str(errors[0].get("message") or errors[0].get("code"))
    except (ValueError, AttributeError, IndexError, TypeError):
        message = ""
    return f"the registry refused ({status}{': ' + message if message else ''})"
