"""`/v2/_catalog` under access rules: only repositories the user may pull, in the body and the Link.

The registry's `Link` names the last entry of its page, which may be hidden, and a page may hold
nothing the user may see. So the proxy pages through the registry itself, `CATALOG_MAX_N` names at
a time, keeps what the user may pull, and builds its own `Link` from the last name it returns: a
client never sees any other name. One client request costs at most `UPSTREAM_PAGES` registry
requests; when that many pages in a row hold nothing the user may pull, the listing ends there
(and the log says so) rather than continue from a hidden name.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict

from proxy import errors
from proxy.access.rules import AccessPolicy, RequestContext
from proxy.exchange import Exchange
from proxy.reading import CATALOG_MAX_N, parse_query
from proxy.relay.forward import Fetched, Forwarder

log = logging.getLogger("registry_proxy.catalog")

# Registry requests one filtered catalog request may make (each reads up to CATALOG_MAX_N names).
UPSTREAM_PAGES = 5
# The registry's page size when the client gives no `n`.
DEFAULT_N = 100
# Go's strconv.Atoi, which reads the registry's `n`.
_ATOI = re.compile(r"[+-]?[0-9]+")

# One registry page: its names, and whether the registry says more follow (its `Link`).
FetchPage = Callable[[str | None], Awaitable[tuple[list[str], bool]]]


@dataclass(frozen=True)
class Listing:
    """What one client request gets."""

    repositories: list[str]
    # Whether to send a Link continuing after the last repository.
    more: bool
    # True when UPSTREAM_PAGES pages held nothing visible and the registry had more.
    cut_short: bool = False


async def collect(
    fetch: FetchPage, visible: Callable[[str], bool], want: int, last: str | None
) -> Listing:
    """Up to `want` visible names after `last`, reading at most UPSTREAM_PAGES registry pages."""
    if want <= 0:
        return Listing([], more=False)
    shown: list[str] = []
    cursor = last
    for _ in range(UPSTREAM_PAGES):
        names, upstream_more = await fetch(cursor)
        for index, name in enumerate(names):
            if visible(name):
                shown.append(name)
                if len(shown) == want:
                    return Listing(shown, more=upstream_more or index + 1 < len(names))
        if not upstream_more or not names:
            return Listing(shown, more=False)
        cursor = names[-1]
    return Listing(shown, more=bool(shown), cut_short=not shown)


class _Answer(Exception):
    """The registry's answer is not a catalog page: relay `response` instead."""

    def __init__(self, response: web.Response) -> None:
        super().__init__()
        self.response = response


def _names(body: bytes) -> list[str]:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    names = document.get("repositories") if isinstance(document, dict) else None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError('catalog response is not {"repositories": [...]}')
    return names


def _count(value: str) -> int | None:
    """`n` as the registry reads it, capped at CATALOG_MAX_N; None if it is not a count."""
    if not _ATOI.fullmatch(value):
        return None
    digits = value.lstrip("+-").lstrip("0")
    if value.startswith("-") and digits:
        return None
    # Length first: int() refuses very long digit strings.
    return CATALOG_MAX_N if len(digits) > 4 else min(int(digits or "0"), CATALOG_MAX_N)


def catalog_body(repositories: list[str]) -> bytes:
    """Shaped like the registry's own (Go's json.Encoder: compact, one trailing newline)."""
    return json.dumps({"repositories": repositories}, separators=(",", ":")).encode() + b"\n"


def next_link(last: str, n: int) -> str:
    """The registry's Link format (Go's url.Values.Encode sorts the keys)."""
    return f'</v2/_catalog?last={quote(last, safe="")}&n={n}>; rel="next"'


async def filtered(
    forwarder: Forwarder, request: web.Request, exchange: Exchange, policy: AccessPolicy
) -> web.Response:
    """Answer GET /v2/_catalog for `exchange.identity` under `policy`."""
    identity = exchange.identity
    assert identity is not None
    who = RequestContext(identity, request.method, exchange.target, client=exchange.client)
    query = parse_query(request.raw_path.partition("?")[2])
    n = query.get("n", "")
    want = DEFAULT_N if n == "" else _count(n)
    if want is None:
        return errors.pagination_number_invalid(n)
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json; charset=utf-8"})
    if not policy.may_pull_any(who):
        return web.Response(body=catalog_body([]), headers=headers)

    async def fetch(cursor: str | None) -> tuple[list[str], bool]:
        target = f"/v2/_catalog?n={CATALOG_MAX_N}"
        if cursor:
            target += f"&last={quote(cursor, safe='')}"
        fetched = await forwarder.fetch(request, exchange, target)
        if not isinstance(fetched, Fetched):
            raise _Answer(fetched)
        upstream_more = "Link" in fetched.headers
        fetched.headers.popall("Link", None)
        if fetched.status != 200:
            response = web.Response(status=fetched.status, body=fetched.body)
            response.headers.extend(fetched.headers)
            raise _Answer(response)
        try:
            names = _names(fetched.body)
        except ValueError:
            log.warning("upstream sent a catalog that is not one")
            raise _Answer(errors.bad_gateway()) from None
        headers.clear()
        headers.extend(fetched.headers)
        return names, upstream_more

    try:
        listing = await collect(fetch, partial(policy.may_pull, who), want, query.get("last"))
    except _Answer as answer:
        return answer.response
    if listing.cut_short:
        log.warning(
            "catalog for %s: %d registry pages in a row held nothing the user may pull; "
            "the listing ends there",
            identity.name or "@anonymous",
            UPSTREAM_PAGES,
        )
    if listing.more:
        headers["Link"] = next_link(listing.repositories[-1], want)
    return web.Response(body=catalog_body(listing.repositories), headers=headers)
