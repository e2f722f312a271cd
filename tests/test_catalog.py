"""The filtered catalog never names a hidden repository, and costs the registry a bounded amount."""

from __future__ import annotations

import asyncio
import bisect
import json
import uuid
from collections.abc import Iterator

import pytest

from proxy.access.catalog import UPSTREAM_PAGES, Listing, collect
from tests.support import Proxy, Registry, basic_auth, call, push_image, wait_until
from tests.support import htpasswd as add_user

PASSWORDS = {"alice": "alice-secret", "mallory": "mallory-secret"}
RULES = """
access:
  - {users: [alice], repositories: ["team-a/**", "**/public"], actions: [pull]}
  - {users: ["*"], actions: [catalog]}
"""
VISIBLE = ["a/public", "team-a/app", "z/public"]
# More hidden names in a row than the old proxy's 20 pages of n=1.
HIDDEN = [f"m/h{i:02}" for i in range(30)]


def basic(user: str) -> dict[str, str]:
    return basic_auth(user, PASSWORDS[user])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Proxy]]:
    """A registry seeded by pushing images (v3 lists only repositories with a manifest)."""
    root = tmp_path_factory.mktemp("catalog")
    htpasswd = root / "htpasswd"
    for user, password in PASSWORDS.items():
        add_user(htpasswd, "-B", "-C", "4", user=user, password=password)
    registry = Registry(root / "registry")
    registry.start()
    for repo in VISIBLE + HIDDEN:
        push_image(registry.url, repo)
    config = root / "proxy.yml"
    config.write_text(RULES)
    proxy = Proxy(root / "proxy", registry.url, htpasswd,
                  {"PROXY_CONFIG": str(config), "PROXY_AUTH_MAX_FAILURES": "1000000"})  # fmt: skip
    proxy.start()
    yield registry, proxy
    proxy.stop()
    registry.stop()


def walk(proxy: Proxy, user: str, n: int) -> tuple[list[str], list[str]]:
    """Follow the catalog's Links from the start; return the names and every Link seen."""
    names: list[str] = []
    links: list[str] = []
    url = f"{proxy.url}/v2/_catalog?n={n}"
    for _ in range(100):
        status, headers, body = call(url, headers=basic(user))
        assert status == 200, body
        names += json.loads(body)["repositories"]
        link = headers.get("Link")
        if not link:
            return names, links
        links.append(link)
        url = proxy.url + link.split(">")[0].lstrip("<")
    raise AssertionError("the catalog's Links never ended")


def catalog_requests(registry: Registry) -> int:
    return sum(uri.startswith("/v2/_catalog") for uri in registry.requested_uris())


def settle(registry: Registry) -> None:
    """Wait until the registry has logged everything sent so far."""
    sentinel = f"/v2/sentinel-{uuid.uuid4().hex[:8]}/tags/list"
    call(registry.url + sentinel)
    wait_until(lambda: sentinel in registry.requested_uris(), "the sentinel in the registry log")


@pytest.mark.parametrize("n", [1, 2, 100])
def test_links_never_name_a_hidden_repository(site: tuple[Registry, Proxy], n: int) -> None:
    """Class: the registry's Link (the last name of its page, maybe hidden) reaching the client,
    directly or after many hidden pages in a row."""
    _, proxy = site
    names, links = walk(proxy, "alice", n)
    assert names == VISIBLE
    for link in links:
        assert "m%2Fh" not in link and "m/h" not in link, link


def test_a_user_who_may_pull_nothing_gets_an_empty_catalog_without_upstream_work(
    site: tuple[Registry, Proxy],
) -> None:
    """Class: as above, for a user with the catalog right and no pull right at all."""
    registry, proxy = site
    settle(registry)
    before = catalog_requests(registry)
    status, headers, body = call(f"{proxy.url}/v2/_catalog?n=1", headers=basic("mallory"))
    assert (status, json.loads(body), headers.get("Link")) == (200, {"repositories": []}, None)
    settle(registry)
    assert catalog_requests(registry) == before


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_on_a_filtered_catalog_are_refused_not_turned_into_get(
    site: tuple[Registry, Proxy], method: str
) -> None:
    """Class: the proxy changing the method: it answered these with a filtered GET."""
    registry, proxy = site
    settle(registry)
    before = catalog_requests(registry)
    data = b"" if method in ("POST", "PUT", "PATCH") else None
    # urllib would label the empty body a form, which proxy.reading refuses first.
    auth = {**basic("alice"), "Content-Type": "application/octet-stream"}
    status, headers, body = call(f"{proxy.url}/v2/_catalog", method, auth, data)
    assert (status, headers.get("Allow")) == (405, "GET")
    if method != "HEAD":
        assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    settle(registry)
    assert catalog_requests(registry) == before


def test_n_is_read_as_the_registry_reads_it(site: tuple[Registry, Proxy]) -> None:
    _, proxy = site
    status, headers, body = call(f"{proxy.url}/v2/_catalog?n=0", headers=basic("alice"))
    assert (status, json.loads(body), headers.get("Link")) == (200, {"repositories": []}, None)
    for bad in ("abc", "-1", "1.5"):
        status, _, body = call(f"{proxy.url}/v2/_catalog?n={bad}", headers=basic("alice"))
        assert status == 400
        assert json.loads(body)["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
    status, _, body = call(f"{proxy.url}/v2/_catalog?n=99999", headers=basic("alice"))
    assert (status, json.loads(body)["repositories"]) == (200, VISIBLE)
    status, _, body = call(f"{proxy.url}/v2/_catalog?last=m%2Fh05", headers=basic("alice"))
    assert json.loads(body)["repositories"] == VISIBLE[1:]


# --- The paging itself, over a registry far larger than a test can push.


class FakeCatalog:
    """Pages of 1000 sorted names after a cursor, as the registry serves them; counts requests."""

    def __init__(self, names: list[str]) -> None:
        self.names = sorted(names)
        self.requests = 0

    async def fetch(self, cursor: str | None) -> tuple[list[str], bool]:
        self.requests += 1
        start = bisect.bisect_right(self.names, cursor) if cursor else 0
        page = self.names[start : start + 1000]
        return page, len(page) == 1000  # the registry links every full page


def visible(name: str) -> bool:
    return name.startswith("v")


def run(catalog: FakeCatalog, want: int, last: str | None = None) -> Listing:
    return asyncio.run(collect(catalog.fetch, visible, want, last))


def test_hidden_stretches_longer_than_the_bound_cut_the_listing_short() -> None:
    """Class: unbounded registry work per client request, and hidden cursors once it ends."""
    catalog = FakeCatalog([f"h{i:06}" for i in range(20_000)] + ["v1"])
    listing = run(catalog, 100)
    assert listing == Listing([], more=False, cut_short=True)
    assert catalog.requests == UPSTREAM_PAGES


def test_visible_names_after_hidden_pages_are_found_within_the_bound() -> None:
    hidden = [f"h{i:06}" for i in range(1000 * (UPSTREAM_PAGES - 1))]
    catalog = FakeCatalog([*hidden, "v1", "v2", "v3"])
    assert run(catalog, 2) == Listing(["v1", "v2"], more=True)
    assert run(catalog, 2, "v2") == Listing(["v3"], more=False)
    assert catalog.requests <= 2 * UPSTREAM_PAGES


def test_a_bound_reached_after_some_visible_names_links_from_the_last_of_them() -> None:
    catalog = FakeCatalog(["a0", "v0", *(f"w{i:06}" for i in range(10_000)), "x9"])
    listing = asyncio.run(collect(catalog.fetch, lambda name: name in ("v0", "x9"), 5, None))
    assert listing == Listing(["v0"], more=True)
    assert catalog.requests == UPSTREAM_PAGES


def test_n_zero_costs_nothing() -> None:
    catalog = FakeCatalog(["v1"])
    assert run(catalog, 0) == Listing([], more=False)
    assert catalog.requests == 0
