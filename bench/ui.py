"""`bench/run --ui`: the registry browser's pages, timed, beside the registry requests they need.

A real registry is filled (bench/seed.py) with many repositories (`apps/svc-NNNNN`) and one
repository (`apps/tagged`) with many tags, each its own image. The proxy runs with `ui: true` and
rules that let the signed-in user pull every other repository (names ending in an even digit)
and read the catalog, so the catalog filter drops half of what it reads. The client signs in
through the form, keeps the session cookie and loads each page on one keep-alive connection, as
a browser would. Beside each page load, the registry requests that page needs are sent to the
registry directly, in the same order and concurrency, so the table shows what the registry
itself costs. A second registry on the same storage, with its request log on, behind a second
proxy, counts the upstream requests one tag page makes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp

from bench import report, seed
from bench.client import BenchError
from bench.services import Proxy
from proxy.ui.manifests import MANIFEST_ACCEPT
from proxy.ui.pages import REPOSITORIES_PER_PAGE, TAGS_PER_PAGE
from proxy.ui.registry import PAGE_CONCURRENCY
from tests.support.harness import Registry, htpasswd
from tests.support.polling import wait_until

USER, PASSWORD = "viewer", "viewer-secret"
TAGGED = "apps/tagged"
# Pull on half the repositories (by the last digit of the name), the tagged one, and the catalog.
RULES = (
    "[{users: [viewer], repositories: ['apps/svc-*0', 'apps/svc-*2', 'apps/svc-*4',"
    " 'apps/svc-*6', 'apps/svc-*8', 'apps/tagged'], actions: [pull]},"
    " {users: [viewer], actions: [catalog]}]"
)
CATALOG_N = 1000
TARGET_MS = 300.0


@dataclass(frozen=True)
class Size:
    """How big a run is."""

    mode: str
    repositories: int
    tags: int
    loads: int
    warmup: int


FULL = Size("full", repositories=10_000, tags=1_000, loads=50, warmup=3)
SMALL = Size("small", repositories=300, tags=100, loads=10, warmup=3)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def repository_names(count: int) -> list[str]:
    return [f"apps/svc-{number:05d}" for number in range(count)]


def tag_names(count: int) -> list[str]:
    return [f"v{number:04d}" for number in range(count)]


def search_term(count: int) -> str:
    """A name part whose 100 matches (50 visible) start 42% of the way into the catalog."""
    return f"svc-{count * 42 // 100 // 100:03d}"


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def summary(seconds: list[float]) -> dict[str, float]:
    """p50, p95 and max in milliseconds, and the count."""
    if not seconds:
        return {}
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "max_ms": round(max(ms), 2),
        "loads": len(ms),
    }


class Browser:
    """One signed-in browser: the session cookie, one keep-alive connection."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self._session = session
        self.base = base
        self.cookies: dict[str, str] = {}

    def _cookie_header(self) -> dict[str, str]:
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}

    def _keep(self, response: aiohttp.ClientResponse) -> None:
        for name, morsel in response.cookies.items():
            self.cookies[name] = morsel.value

    async def sign_in(self, user: str, password: str) -> None:
        async with self._session.get(self.base + "/ui/login") as response:
            page = await response.text()
            self._keep(response)
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        if response.status != 200 or not found or "rp_login" not in self.cookies:
            raise BenchError(f"GET /ui/login: {response.status}, no form or no rp_login cookie")
        form = {"username": user, "password": password, "csrf": found[1], "next": ""}
        headers = {**self._cookie_header(), "Origin": self.base}
        async with self._session.post(
            self.base + "/ui/login", data=form, headers=headers, allow_redirects=False
        ) as response:
            await response.read()
            self._keep(response)
        if response.status != 303 or "rp_session" not in self.cookies:
            raise BenchError(f"POST /ui/login: {response.status}, no rp_session cookie")
        self.cookies = {"rp_session": self.cookies["rp_session"]}

    async def load(self, path: str, must_have: str) -> float:
        """Seconds to GET a page (the whole body); it must be a 200 showing `must_have`."""
        started = time.perf_counter()
        async with self._session.get(
            self.base + path, headers=self._cookie_header(), allow_redirects=False
        ) as response:
            body = await response.text()
        seconds = time.perf_counter() - started
        if response.status != 200 or must_have not in body:
            shown = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))[-300:]
            raise BenchError(f"GET {path}: {response.status}, {must_have!r} not shown: {shown}")
        return seconds


class Direct:
    """The registry requests a page needs, sent to the registry itself."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self._session = session
        self._base = base
        self.catalog_seconds: dict[int, list[float]] = {}

    async def get(self, path: str, accept: str | None = None) -> bytes:
        headers = {"Accept": accept} if accept else {}
        async with self._session.get(self._base + path, headers=headers) as response:
            body = await response.read()
            if response.status != 200:
                raise BenchError(f"GET {path} at the registry: {response.status}")
            return body

    async def catalog(self, pages: int) -> None:
        """`pages` catalog pages of CATALOG_N names, one after the other (as a search reads);
        each page's time is kept by its number."""
        last = ""
        for number in range(1, pages + 1):
            query = f"n={CATALOG_N}" + (f"&last={quote(last, safe='')}" if last else "")
            started = time.perf_counter()
            names = json.loads(await self.get(f"/v2/_catalog?{query}"))["repositories"]
            self.catalog_seconds.setdefault(number, []).append(time.perf_counter() - started)
            last = names[-1]

    async def tag_page(self, tags: list[str], configs: bool) -> None:
        """The tag list, then each tag's manifest (and config blob), PAGE_CONCURRENCY at once."""
        await self.get(f"/v2/{TAGGED}/tags/list")
        semaphore = asyncio.Semaphore(PAGE_CONCURRENCY)

        async def one(tag: str) -> None:
            async with semaphore:
                await self.manifest(tag, configs)

        await asyncio.gather(*(one(tag) for tag in tags))

    async def manifest(self, reference: str, config: bool) -> None:
        body = await self.get(f"/v2/{TAGGED}/manifests/{reference}", MANIFEST_ACCEPT)
        if config:
            await self.get(f"/v2/{TAGGED}/blobs/{json.loads(body)['config']['digest']}")


async def _timed(work: Awaitable[Any]) -> float:
    started = time.perf_counter()
    await work
    return time.perf_counter() - started


def catalog_pages_for_search(size: Size) -> int:
    """Catalog pages the search reads before its page is full (repositories sort by number)."""
    term = search_term(size.repositories)
    names = repository_names(size.repositories)
    first = next(i for i, name in enumerate(names) if term in name)
    # The page is full at the 2 * REPOSITORIES_PER_PAGE-th match (half are visible).
    return (first + 2 * REPOSITORIES_PER_PAGE - 1) // CATALOG_N + 1


@dataclass
class Page:
    """One row: a page, the registry requests it needs, and the timings of both."""

    key: str
    label: str
    path: str
    must_have: str
    direct_label: str
    direct: Callable[[], Awaitable[None]]
    proxy_seconds: list[float]
    direct_seconds: list[float]


class UIBench:
    def __init__(self, size: Size, workdir: Path) -> None:
        self.size = size
        self.workdir = workdir
        self.registry = Registry(workdir / "registry", quiet=True)
        self.servers: list[Registry | Proxy] = []
        self.results: dict[str, Any] = {}
        self.htpasswd = workdir / "htpasswd"
        self.key = workdir / "ui-session.key"

    def _proxy(self, name: str, upstream: str) -> Proxy:
        env = {
            "PROXY_UI": "true",
            "PROXY_UI_SESSION_KEY_FILE": str(self.key),
            "PROXY_ACCESS": RULES,
            "PROXY_LOG_LEVEL": "warning",
            "PROXY_ACCESS_LOG": "off",
        }
        proxy = Proxy(self.workdir / name, upstream, self.htpasswd, env=env)
        self.servers.append(proxy)
        proxy.start()
        return proxy

    def start(self) -> None:
        htpasswd(self.htpasswd, "-B", "-C", "5", user=USER, password=PASSWORD)
        # 32 random bytes, hex-written (the key file is read stripped of whitespace).
        self.key.write_text(secrets.token_hex(32))
        self.servers.append(self.registry)
        self.registry.start()
        started = time.perf_counter()
        asyncio.run(
            seed.seed(
                self.registry.url,
                repository_names(self.size.repositories),
                TAGGED,
                tag_names(self.size.tags),
            )
        )
        seconds = time.perf_counter() - started
        self.results["seed_seconds"] = round(seconds, 1)
        log(f"seeded {self.size.repositories} repositories and {self.size.tags} tags through "
            f"the API in {seconds:.1f} s")  # fmt: skip

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def pages(self, direct: Direct) -> list[Page]:
        size = self.size
        tags = tag_names(size.tags)
        first_tags = sorted(tags)[:TAGS_PER_PAGE]
        term = search_term(size.repositories)
        search_pages = catalog_pages_for_search(size)
        first_visible = f"{term}00"
        tag_path = "/ui/tags?" + urlencode({"repository": TAGGED})
        manifest_path = "/ui/manifest?" + urlencode({"repository": TAGGED, "reference": tags[0]})
        return [
            Page("repositories", "repositories, first page", "/ui/", "apps/svc-00000",
                 f"GET /v2/_catalog?n={CATALOG_N}", lambda: direct.catalog(1), [], []),
            Page("search", f"search ?q={term}", "/ui/?" + urlencode({"q": term}), first_visible,
                 f"{search_pages} catalog GETs in turn", lambda: direct.catalog(search_pages),
                 [], []),
            Page("tags", f"tags of {TAGGED} ({size.tags}), first page, warm", tag_path,
                 first_tags[-1], f"tags/list + {TAGS_PER_PAGE} manifest GETs",
                 lambda: direct.tag_page(first_tags, configs=False), [], []),
            Page("manifest", "manifest page, warm", manifest_path, "sha256:",
                 "1 manifest GET (config cached)",
                 lambda: direct.manifest(tags[0], config=False), [], []),
        ]  # fmt: skip

    async def measure(self, proxy: Proxy) -> None:
        size = self.size
        connector = aiohttp.TCPConnector(limit=1)
        direct_connector = aiohttp.TCPConnector(limit=PAGE_CONCURRENCY)
        async with (
            aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as s,
            aiohttp.ClientSession(connector=direct_connector) as d,
        ):
            browser = Browser(s, proxy.url)
            direct = Direct(d, self.registry.url)
            await browser.sign_in(USER, PASSWORD)
            await self._cold_tag_pages(browser, direct)
            pages = self.pages(direct)
            for page in pages:
                for _ in range(size.warmup):
                    await browser.load(page.path, page.must_have)
                    await page.direct()
            # Round-robin over the pages, each load beside its direct replay.
            for _ in range(size.loads):
                for page in pages:
                    page.proxy_seconds.append(await browser.load(page.path, page.must_have))
                    page.direct_seconds.append(await _timed(page.direct()))
            self.results["pages"] = [
                {"key": p.key, "label": p.label, "path": p.path, "proxy": summary(p.proxy_seconds),
                 "direct_requests": p.direct_label, "direct": summary(p.direct_seconds),
                 "proxy_samples_ms": [round(s * 1000, 2) for s in p.proxy_seconds],
                 "direct_samples_ms": [round(s * 1000, 2) for s in p.direct_seconds]}
                for p in pages
            ]  # fmt: skip
            # The registry walks its storage from the start for every page: later pages cost more.
            self.results["catalog_page_p50_ms"] = {
                str(number): summary(seconds)["p50_ms"]
                for number, seconds in sorted(direct.catalog_seconds.items())
            }

    async def _cold_tag_pages(self, browser: Browser, direct: Direct) -> None:
        """The first load of every tag page: their config blobs are not cached yet."""
        tags = sorted(tag_names(self.size.tags))
        proxy_seconds: list[float] = []
        direct_seconds: list[float] = []
        for start in range(0, len(tags), TAGS_PER_PAGE):
            query = {"repository": TAGGED}
            if start:
                query["after"] = tags[start - 1]
            page_tags = tags[start : start + TAGS_PER_PAGE]
            path = "/ui/tags?" + urlencode(query)
            proxy_seconds.append(await browser.load(path, page_tags[-1]))
            direct_seconds.append(await _timed(direct.tag_page(page_tags, configs=True)))
        self.results["tags_cold_first"] = {
            "proxy_ms": round(proxy_seconds[0] * 1000, 2),
            "direct_ms": round(direct_seconds[0] * 1000, 2),
        }
        self.results["tags_cold_each_page"] = {
            "proxy": summary(proxy_seconds),
            "direct": summary(direct_seconds),
            "direct_requests": f"tags/list + {TAGS_PER_PAGE} manifest GETs + "
            f"{TAGS_PER_PAGE} config blob GETs",
        }

    def count_upstream(self) -> None:
        """A registry with its request log on, on the same storage, behind a proxy of its own:
        which requests one tag page (cold, then warm) and one repository page send it."""
        logged = Registry(
            self.workdir / "registry-logged",
            env={"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(self.registry.root / "data")},
        )
        self.servers.append(logged)
        logged.start()
        proxy = self._proxy("proxy-counted", logged.url)
        tag_path = "/ui/tags?" + urlencode({"repository": TAGGED})
        first_tag = sorted(tag_names(self.size.tags))[TAGS_PER_PAGE - 1]
        steps = [("tags_cold", tag_path, first_tag), ("tags_warm", tag_path, first_tag),
                 ("repositories", "/ui/", "apps/svc-00000")]  # fmt: skip

        async def count() -> dict[str, dict[str, int]]:
            counts: dict[str, dict[str, int]] = {}
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
                browser = Browser(session, proxy.url)
                await browser.sign_in(USER, PASSWORD)
                # The start-up polls of /v2/ are logged too: count from here.
                seen = len(logged.requested_uris())
                for key, path, must_have in steps:
                    await browser.load(path, must_have)
                    # A request sent after the page: once it is logged, the page's requests are.
                    marker = f"/v2/?after={key}"
                    async with session.get(logged.url + marker) as response:
                        await response.read()
                    wait_until(lambda m=marker: m in logged.requested_uris(), f"{marker} logged")
                    uris = logged.requested_uris()
                    end = uris.index(marker)
                    counts[key] = _kinds(uris[seen:end])
                    seen = end + 1
            return counts

        self.results["upstream_requests"] = asyncio.run(count())


def _kinds(uris: list[str]) -> dict[str, int]:
    """Registry requests by kind."""
    kinds: Counter[str] = Counter()
    for uri in uris:
        path = urlsplit(uri).path
        if path.startswith("/v2/_catalog"):
            kinds["catalog"] += 1
        elif path.endswith("/tags/list"):
            kinds["tags/list"] += 1
        elif "/manifests/" in path:
            kinds["manifest GETs"] += 1
        elif "/blobs/" in path:
            kinds["blob GETs"] += 1
        else:
            kinds["other"] += 1
    kinds["total"] = len(uris)
    return dict(kinds)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def table(results: dict[str, Any]) -> str:
    """The plain-text table, laid out as bench/report.py lays out the main one."""
    header = ["page", "proxy p50", "p95", "max", "loads", "registry requests it needs",
              "direct p50", "p95"]  # fmt: skip
    rows: list[list[str]] = []
    cold = results["tags_cold_first"]
    needs = results["tags_cold_each_page"]["direct_requests"]
    rows.append(["tag page, first load (cold)", _ms(cold["proxy_ms"]), "", "", "1", needs,
                 _ms(cold["direct_ms"]), ""])  # fmt: skip
    each = results["tags_cold_each_page"]
    rows.append(["  every tag page's first load (cold)", _ms(each["proxy"]["p50_ms"]),
                 _ms(each["proxy"]["p95_ms"]), _ms(each["proxy"]["max_ms"]),
                 str(each["proxy"]["loads"]), "the same", _ms(each["direct"]["p50_ms"]),
                 _ms(each["direct"]["p95_ms"])])  # fmt: skip
    for page in results["pages"]:
        proxy, direct = page["proxy"], page["direct"]
        rows.append([page["label"], _ms(proxy["p50_ms"]), _ms(proxy["p95_ms"]),
                     _ms(proxy["max_ms"]), str(proxy["loads"]), page["direct_requests"],
                     _ms(direct["p50_ms"]), _ms(direct["p95_ms"])])  # fmt: skip
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) if i != 4 else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells[1:], widths[1:], strict=True))]  # fmt: skip
        return "  ".join([first, *rest])

    size = results["size"]
    out = [
        f"registry browser benchmark, {results['date']}, {size['mode']} run: "
        f"{size['repositories']:,} repositories, {size['tags']:,} tags in {TAGGED}; "
        f"registry {results['registry']}",
        f"machine: {results['machine']['summary']}; times in ms, one keep-alive connection",
        "",
        fmt(header),
        fmt(["-" * w for w in widths]),
        *(fmt(row) for row in rows),
    ]
    by_page = results.get("catalog_page_p50_ms", {})
    if by_page:
        shown = ", ".join(f"page {number}: {_ms(ms)}" for number, ms in by_page.items())
        out.append(f"registry alone, GET /v2/_catalog?n={CATALOG_N} p50 by page: {shown} ms")
    counted = results.get("upstream_requests", {})
    for key, label in (("tags_cold", "one tag page, cold"), ("tags_warm", "one tag page, warm"),
                       ("repositories", "one repository page")):  # fmt: skip
        if key in counted:
            kinds = ", ".join(f"{n} {kind}" for kind, n in counted[key].items() if kind != "total")
            out.append(f"upstream requests, {label}: {counted[key]['total']} ({kinds})")
    return "\n".join(out)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    by_key = {page["key"]: page for page in results["pages"]}
    rows = []
    for key, what in (("repositories", f"repository list ({results['size']['repositories']:,} "
                       "repositories), first page p95"),
                      ("tags", f"tag page ({results['size']['tags']:,} tags), first page p95, "
                       "warm")):  # fmt: skip
        value = by_key[key]["proxy"]["p95_ms"]
        rows.append({"target": f"{what} <= {TARGET_MS:.0f} ms", "value": value, "unit": "ms",
                     "threshold": TARGET_MS, "met": value <= TARGET_MS})  # fmt: skip
    cold = results["tags_cold_each_page"]["proxy"]["p95_ms"]
    rows.append({"target": f"tag page, first load of each page (config blobs not cached) p95 "
                 f"<= {TARGET_MS:.0f} ms", "value": cold, "unit": "ms", "threshold": TARGET_MS,
                 "met": cold <= TARGET_MS})  # fmt: skip
    tags_cold = results.get("upstream_requests", {}).get("tags_cold", {})
    needed = 1 + 2 * TAGS_PER_PAGE
    total = tags_cold.get("total")
    rows.append({"target": f"one cold tag page sends <= {needed} registry requests (tags/list, "
                 f"{TAGS_PER_PAGE} manifests, {TAGS_PER_PAGE} configs), not one per tag",
                 "value": total, "unit": "requests", "threshold": needed,
                 "met": total is not None and total <= needed})  # fmt: skip
    return rows


def targets_text(rows: list[dict[str, Any]]) -> str:
    lines = ["targets:"]
    for row in rows:
        mark = "met   " if row["met"] else "MISSED"
        value = "no figure" if row["value"] is None else f"{row['value']:,.1f} {row['unit']}"
        lines.append(f"  {mark} {row['target']}: {value}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The browser benchmark; prints the table and the targets, writes bench/out/ui.json."""
    size = SMALL if args.small else FULL
    workdir = Path(tempfile.mkdtemp(prefix="registry-proxy-ui-bench-"))
    bench = UIBench(size, workdir)
    started = datetime.now(UTC)
    clock = time.monotonic()
    try:
        bench.start()
        proxy = bench._proxy("proxy", bench.registry.url)
        asyncio.run(bench.measure(proxy))
        bench.count_upstream()
    except Exception as exc:
        print(f"bench: FAILED: {exc!r}\n(logs in {workdir})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        bench.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            log(f"removing {workdir} (the registry's storage is many small files)")
            shutil.rmtree(workdir, ignore_errors=True)
    machine = report.machine()
    results: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(time.monotonic() - clock, 1),
        "size": asdict(size),
        "machine": machine,
        "registry": machine["registry"],
        **bench.results,
    }
    results["targets"] = targets(results)
    print(table(results))
    print()
    print(targets_text(results["targets"]))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "ui.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0
