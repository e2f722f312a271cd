"""Guards that ask the registry fail closed: an upstream that errs, stalls, lies or is away.

Each test runs the proxy's app in-process (aiohttp_client) in front of a fake registry that
records every request and answers with an injected fault, the answers the real registry cannot
be made to give. A protected write must then be refused and never reach the registry.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from passlib.hash import apr_md5_crypt

from proxy.access.tag_guard import MANIFEST_MAX_BYTES, TAGS_PAGES_MAX, TagRefusal
from proxy.app import GATE, create_app
from proxy.config import load_config
from tests.support import basic_auth, free_port

# The proxy stores its exchange under a plain string key; aiohttp warns (once) about that, and
# in-process the warning would become the handler's exception.

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]
Start = Callable[..., Awaitable["Site"]]

PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}
ALICE = basic_auth("alice", PASSWORDS["alice"])
BOB = basic_auth("bob", PASSWORDS["bob"])
# alice owns team/**, bob may only read the catalog; `v*` tags are immutable everywhere.
CONFIG = """
access:
  - {users: [alice], repositories: ["team/**"], actions: [pull, push, delete, catalog]}
  - {users: [bob], actions: [catalog]}
immutable_tags:
  - {repositories: ["**"], tags: ["v*"]}
"""
MANIFEST = json.dumps({"schemaVersion": 2, "layers": []}).encode()
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
OTHER_DIGEST = "sha256:" + "b" * 64
MANIFEST_TYPE = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
# A stalled registry is given up on after this long (the proxy's read_timeout in these tests).
READ_TIMEOUT = "0.5"


@dataclass
class FakeRegistry:
    """Records every request but the readiness probe's; `answer` decides the response."""

    answer: Answer
    seen: list[tuple[str, str]] = field(default_factory=list)
    # Stalled handlers wait on this; set at teardown so the server closes at once.
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path != "/v2/":
            self.seen.append((request.method, request.path_qs))
        return await self.answer(request)

    def reached(self, method: str) -> list[str]:
        """The targets of the `method` requests that reached the registry."""
        return [target for seen, target in self.seen if seen == method]


@dataclass
class Site:
    client: TestClient[web.Request, web.Application]
    registry: FakeRegistry


@pytest.fixture
async def start(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    tmp_path: Path,
) -> AsyncIterator[Start]:
    """Start the proxy's app in front of a fake registry answering with `answer` (or none)."""
    registries: list[FakeRegistry] = []
    servers: list[TestServer] = []

    async def start_site(answer: Answer | None, config: str = CONFIG) -> Site:
        registry = FakeRegistry(answer or ok)
        registries.append(registry)
        if answer is None:
            upstream = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        else:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", registry.handle)
            server = TestServer(app)
            await server.start_server()
            servers.append(server)
            upstream = str(server.make_url("/"))
        users = {user: apr_md5_crypt.hash(password) for user, password in PASSWORDS.items()}
        passwd = tmp_path / "htpasswd"
        passwd.write_text("".join(f"{user}:{hashed}\n" for user, hashed in users.items()))
        (tmp_path / "proxy.yml").write_text(config)
        loaded = load_config(
            tmp_path / "proxy.yml",
            {
                "PROXY_HTPASSWD": str(passwd),
                "PROXY_UPSTREAM": upstream,
                "PROXY_READ_TIMEOUT": READ_TIMEOUT,
                "PROXY_CONNECT_TIMEOUT": "2",
            },
        )
        return Site(await aiohttp_client(create_app(loaded, users)), registry)

    yield start_site
    for registry in registries:
        registry.release.set()
    for server in servers:
        await server.close()


async def ok(request: web.Request) -> web.StreamResponse:
    """What the registry answers to a write that was let through."""
    return web.Response(status=201 if request.method == "PUT" else 202)


def tag_points_to(digest: str | None, tags: list[str]) -> Answer:
    """A registry whose `tags` all point to `digest` (None: no such tag), answering writes."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/tags/list"):
            return web.json_response({"name": "team/app", "tags": tags})
        if request.method == "HEAD":
            if digest is None:
                return web.Response(status=404)
            return web.Response(headers={"Docker-Content-Digest": digest})
        return await ok(request)

    return answer


def faulty(fault: str, release: Callable[[], asyncio.Event]) -> Answer:
    """An answer the registry should never give (or no answer at all)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if fault == "stall":
            await release().wait()
            return web.Response(status=500)
        statuses = {"500": 500, "503": 503, "401": 401, "403": 403, "307": 307}
        if fault in statuses:
            headers = {"Location": "http://elsewhere.invalid/"} if fault == "307" else {}
            return web.Response(status=statuses[fault], headers=headers, text='{"errors":[]}')
        bodies = {
            "not-json": b"<html>oops</html>",
            "null": b"null",
            "a-list": b"[]",
            "no-tags-key": b'{"name": "team/app"}',
            "tags-not-a-list": b'{"name": "team/app", "tags": "v1"}',
            "tags-not-strings": b'{"name": "team/app", "tags": [1]}',
        }
        # A 200 without Docker-Content-Digest for HEAD; one of the bodies for GET.
        return web.Response(body=bodies.get(fault, b""))

    return answer


HEAD_FAULTS = ["500", "503", "401", "403", "307", "200-without-digest", "stall"]


@pytest.mark.parametrize("fault", [*HEAD_FAULTS, "away"])
async def test_an_immutable_tag_the_registry_cannot_confirm_is_never_overwritten(
    start: Start, fault: str
) -> None:
    """Guards the PUT check: a HEAD of the tag answering 5xx (treated like a 404), 401, a
    redirect, 200 without a digest, a stall or no connection (read as 'no such tag') refuses
    the PUT with 503 (the guard could not confirm: retry later); nothing is written."""
    site = await start_faulty(start, fault, only="HEAD")
    response = await site.client.put("/v2/team/app/manifests/v1", data=MANIFEST,
                                     headers={**ALICE, **MANIFEST_TYPE})  # fmt: skip
    assert response.status == 503, await response.text()
    assert "UNAVAILABLE" in await response.text()
    assert site.registry.reached("PUT") == []


async def start_faulty(start: Start, fault: str, only: str) -> Site:
    """A registry answering `fault` to `only` requests ("HEAD" or "tags") and 201/202 to writes,
    or no registry at all for `away`."""
    if fault == "away":
        return await start(None)
    holder: list[FakeRegistry] = []
    bad = faulty(fault, lambda: holder[0].release)
    good = tag_points_to(DIGEST, ["v1", "latest"])

    async def answer(request: web.Request) -> web.StreamResponse:
        is_tags = request.path.endswith("/tags/list")
        hit = (only == "HEAD" and request.method == "HEAD") or (only == "tags" and is_tags)
        return await (bad if hit else good)(request)

    site = await start(answer)
    holder.append(site.registry)
    return site


@pytest.mark.parametrize(
    "fault",
    [
        "500",
        "503",
        "401",
        "307",
        "stall",
        "not-json",
        "null",
        "a-list",
        "no-tags-key",
        "tags-not-a-list",
        "tags-not-strings",
        "away",
    ],
)
async def test_a_delete_by_digest_is_refused_when_the_tags_cannot_be_read(
    start: Start, fault: str
) -> None:
    """Guards the DELETE check's tag list: an error (5xx read as 404), a stall, garbage
    (not JSON, not an object, no `tags`, wrong types) or no registry must not read as 'no
    tags' and let the delete of what v1 points to through: 503, the guard could not confirm."""
    site = await start_faulty(start, fault, only="tags")
    response = await site.client.delete(f"/v2/team/app/manifests/{DIGEST}", headers=ALICE)
    assert response.status == 503, await response.text()
    assert site.registry.reached("DELETE") == []


@pytest.mark.parametrize("fault", HEAD_FAULTS)
async def test_a_delete_by_digest_is_refused_when_an_immutable_tag_cannot_be_read(
    start: Start, fault: str
) -> None:
    """Guards the DELETE check's look-ups: the tag list names v1, and v1's HEAD errs (any
    status but 404, not only 5xx or a dead connection), stalls or has no digest: refused (503)."""
    site = await start_faulty(start, fault, only="HEAD")
    response = await site.client.delete(f"/v2/team/app/manifests/{DIGEST}", headers=ALICE)
    assert response.status == 503, await response.text()
    assert site.registry.reached("DELETE") == []


async def test_an_immutable_tag_on_a_later_page_of_the_tag_list_still_protects(
    start: Start,
) -> None:
    """Guards paging: v1 is on the second page (after the registry's Link), and is found."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/tags/list"):
            if "last=" not in request.query_string:
                link = '</v2/team/app/tags/list?last=latest&n=1000>; rel="next"'
                return web.json_response({"tags": ["latest"]}, headers={"Link": link})
            return web.json_response({"tags": ["v1"]})
        if request.method == "HEAD":
            return web.Response(headers={"Docker-Content-Digest": DIGEST})
        return await ok(request)

    site = await start(answer)
    response = await site.client.delete(f"/v2/team/app/manifests/{DIGEST}", headers=ALICE)
    assert response.status == 403, await response.text()
    assert site.registry.reached("DELETE") == []


async def test_a_tag_list_that_never_ends_refuses_the_delete(start: Start) -> None:
    """Guards the bound on tag-list pages: when it runs out the delete is refused, not let
    through on what was read so far."""
    pages = 0

    async def answer(request: web.Request) -> web.StreamResponse:
        nonlocal pages
        if request.path.endswith("/tags/list"):
            pages += 1
            link = f'</v2/team/app/tags/list?last=t{pages}&n=1000>; rel="next"'
            return web.json_response({"tags": [f"t{pages}"]}, headers={"Link": link})
        return await ok(request)

    site = await start(answer)
    response = await site.client.delete(f"/v2/team/app/manifests/{DIGEST}", headers=ALICE)
    assert response.status == 503, await response.text()
    assert pages == TAGS_PAGES_MAX
    assert site.registry.reached("DELETE") == []


async def test_a_manifest_too_large_to_compare_never_overwrites_an_immutable_tag(
    start: Start,
) -> None:
    """Guards the PUT check's body bound: a body larger than any manifest cannot be the same
    manifest, so it is refused, not forwarded unchecked."""
    site = await start(tag_points_to(DIGEST, ["v1"]))
    body = io.BytesIO(b" " * (MANIFEST_MAX_BYTES + 1))
    response = await site.client.put("/v2/team/app/manifests/v1", data=body,
                                     headers={**ALICE, **MANIFEST_TYPE})  # fmt: skip
    assert response.status == 403
    assert site.registry.reached("PUT") == []


@pytest.mark.parametrize(("current", "allowed"), [(DIGEST, True), (OTHER_DIGEST, False)])
async def test_only_the_same_manifest_may_be_put_again_to_an_immutable_tag(
    start: Start, current: str, allowed: bool
) -> None:
    """Guards the comparison: the same digest is forwarded (clients re-put), another refused."""
    site = await start(tag_points_to(current, ["v1"]))
    response = await site.client.put("/v2/team/app/manifests/v1", data=MANIFEST,
                                     headers={**ALICE, **MANIFEST_TYPE})  # fmt: skip
    assert response.status == (201 if allowed else 403)
    assert len(site.registry.reached("PUT")) == (1 if allowed else 0)


async def test_a_digest_of_any_algorithm_is_checked_against_immutable_tags(start: Start) -> None:
    """Guards the tag/digest split: a `sha512:` reference is a digest too, so deleting it
    reads the tags; read as a tag name, it would pass unchecked."""
    digest = "sha512:" + "c" * 128
    site = await start(tag_points_to(digest, ["v1"]))
    response = await site.client.delete(f"/v2/team/app/manifests/{digest}", headers=ALICE)
    assert response.status == 403, await response.text()
    assert site.registry.reached("DELETE") == []


async def test_a_guard_that_raises_lets_nothing_through(start: Start) -> None:
    """Guards the gate: an unexpected error in the immutable-tag check is a 500, never a pass."""

    class Broken:
        async def refusal(self, *args: object) -> TagRefusal | None:
            raise RuntimeError("look-up broke")

    site = await start(tag_points_to(None, []))
    site.client.app[GATE].tags = Broken()  # type: ignore[assignment]
    response = await site.client.put("/v2/team/app/manifests/v1", data=MANIFEST,
                                     headers={**ALICE, **MANIFEST_TYPE})  # fmt: skip
    assert response.status == 500
    assert site.registry.reached("PUT") == []


# The filtered catalog: what the client gets when the registry's catalog is not one.


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ("500", 500),
        ("503", 503),
        ("401", 401),
        ("not-json", 502),
        ("null", 502),
        ("no-tags-key", 502),
        ("names-not-strings", 502),
        ("stall", 504),
        ("away", 502),
    ],
)
async def test_a_filtered_catalog_passes_on_registry_errors_not_an_empty_list(
    start: Start, fault: str, status: int
) -> None:
    """Guards the filtered catalog: an error, garbage or no registry reaches the client as an
    error, not as an empty (or unfiltered) list; it is never a 200."""
    if fault == "names-not-strings":

        async def answer(request: web.Request) -> web.StreamResponse:
            return web.json_response({"repositories": [1, "team/app"]})

        site = await start(answer)
    elif fault == "away":
        site = await start(None)
    else:
        holder: list[FakeRegistry] = []
        site = await start(faulty(fault, lambda: holder[0].release))
        holder.append(site.registry)
    response = await site.client.get("/v2/_catalog", headers=ALICE)
    assert response.status == status, await response.text()


async def test_refusals_stay_refusals_while_the_registry_is_away(start: Start) -> None:
    """Guards the order of checks: with no registry, what the rules or immutable tags refuse
    is still a 401 or 403 (never a 502), and a catalog with nothing to show is still empty."""
    client = (await start(None)).client
    delete_tag = await client.delete("/v2/team/app/manifests/v1", headers=ALICE)
    assert delete_tag.status == 403
    stranger = await client.get("/v2/team/app/manifests/v1", headers=BOB)
    assert stranger.status == 403
    anonymous = await client.get("/v2/team/app/manifests/v1")
    assert anonymous.status == 401 and "WWW-Authenticate" in anonymous.headers
    catalog = await client.get("/v2/_catalog", headers=BOB)
    assert catalog.status == 200
    assert await catalog.json() == {"repositories": []}
    # What passes the rules and asks nothing of the registry first meets its absence.
    pull = await client.get("/v2/team/app/manifests/latest", headers=ALICE)
    assert pull.status == 502
