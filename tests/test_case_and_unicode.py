"""Case, Unicode and exact boundaries at the edges: tag globs, repository names and routes, user
names and client addresses as throttle keys, and rate limits at exactly their limit."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.access.immutable import parse_immutable_tags
from proxy.access.rules import Right, parse_access
from proxy.auth.credentials import parse_basic
from proxy.auth.hashpool import Busy, FairPool
from proxy.auth.pacing import RefusalPacer
from proxy.edge.client_slots import ClientSlots
from proxy.edge.forwarded import canonical_address, client_key
from proxy.identity import AuthFailure, AuthOutcome
from proxy.paths import Action, classify, is_repository
from proxy.relay.slots import UpstreamSlots
from proxy.throttle.policy import Throttle
from proxy.throttle.store import ThrottleStore
from tests.support import OCI_MANIFEST, Proxy, Registry, basic_auth, call, eventually, push_image
from tests.support.clock import Clock
from tests.support.doubles import (
    STORES,
    GatedHash,
    authenticator,
    fail,
    gated_hash,
    login,
    open_store,
    retry_after,
)

WINDOW, BLOCK = 60.0, 300.0
ACCEPT_OCI = {"Accept": OCI_MANIFEST}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ThrottleStore]:
    """Each boundary holds on every store: this process's, the supervisor's and Redis."""
    async with open_store(request) as opened:
        yield opened


# --- Client addresses as keys: IPv6 per /64, IPv4-mapped IPv6 as IPv4. ------------------------


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("2001:db8:1:2::", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:8000::1", "2001:db8:1:2::/64"),  # bit 64 set: still the same /64
        ("2001:DB8:1:2::1", "2001:db8:1:2::/64"),  # hex digits in either case
        ("2001:db8:1:3::", "2001:db8:1:3::/64"),  # the next /64 (same /63)
        ("2001:db8:1:1:ffff:ffff:ffff:ffff", "2001:db8:1:1::/64"),  # the one before
        ("2001:db8:1:2::1%eth0", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::FFFF:192.0.2.1", "192.0.2.1"),
        ("::ffff:c000:201", "192.0.2.1"),  # the same mapped address, written in hex
        ("192.0.2.1", "192.0.2.1"),
        ("::192.0.2.1", "::/64"),  # IPv4-compatible (deprecated), not mapped: an IPv6 /64
        ("64:ff9b::192.0.2.1", "64:ff9b::/64"),  # NAT64: the translator's /64
        ("unknown", "unknown"),
    ],
)
def test_client_key_is_the_ipv4_address_or_the_ipv6_64(address: str, key: str) -> None:
    """Guards `client_key`'s prefix length and mapped addresses: one site's IPv6 addresses
    share a key, the next /64 does not, and an IPv4 client over a dual-stack socket is itself."""
    assert client_key(address) == key


@pytest.mark.parametrize(
    ("hop", "address"),
    [
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("[::FFFF:c000:201]:443", "192.0.2.1"),
        ("192.0.2.1:\uff18\uff10", None),  # fullwidth digits are no port
        ("192.0.2.1:\u0668\u0660", None),  # nor are Arabic-Indic ones
        ("\uff11\uff19\uff12.0.2.1", None),  # nor fullwidth digits in the address
    ],
)
def test_hops_read_ascii_only_and_mapped_addresses_as_ipv4(hop: str, address: str | None) -> None:
    """Guards `canonical_address`: a hop spelled with other scripts' digits is no address, and
    a mapped address is the IPv4 client it carries (one key, one budget)."""
    assert canonical_address(hop) == address


async def test_a_mapped_ipv4_client_shares_the_ipv4_clients_budgets(clock: Clock) -> None:
    """Guards the throttle's client keys: the same client through a dual-stack socket cannot
    double its budget by switching between its two spellings."""
    throttle = Throttle(2, WINDOW, BLOCK, clock)
    await fail(throttle, "192.0.2.1", "alice")
    await fail(throttle, "::ffff:192.0.2.1", "alice")
    assert await retry_after(throttle, "192.0.2.1", "alice") == BLOCK
    assert await retry_after(throttle, "::ffff:c000:201", "alice") == BLOCK


async def test_addresses_of_one_ipv6_64_share_budgets_and_the_next_64_does_not(
    clock: Clock,
) -> None:
    """Guards the throttle's /64: rotating through the interface ids of one /64 gets no new
    budget, while a neighbour in the next /64 is a different client."""
    throttle = Throttle(2, WINDOW, BLOCK, clock)
    await fail(throttle, "2001:db8:1:2::1", "alice")
    await fail(throttle, "2001:db8:1:2:8000::1", "alice")
    assert await retry_after(throttle, "2001:db8:1:2:ffff::7", "alice") == BLOCK
    assert await retry_after(throttle, "2001:db8:1:3::1", "alice") is None
    assert await retry_after(throttle, "2001:db8:1:1:ffff:ffff:ffff:ffff", "alice") is None


def test_client_slots_count_a_client_under_one_key_whatever_its_spelling() -> None:
    """Guards `ClientSlots.admit`: mapped IPv4 and the addresses of one /64 take from one
    count; the count refuses exactly at its limit."""
    slots = ClientSlots(2)
    assert slots.admit("192.0.2.1") == "192.0.2.1"
    assert slots.admit("::ffff:192.0.2.1") == "192.0.2.1"
    assert slots.admit("::ffff:c000:201") is None
    assert slots.admit("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert slots.admit("2001:db8:1:2:8000::1") == "2001:db8:1:2::/64"
    assert slots.admit("2001:db8:1:2::1%eth0") is None
    assert slots.admit("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    slots.release("192.0.2.1")
    assert slots.admit("::ffff:192.0.2.1") == "192.0.2.1"


# --- User names: exact, as the htpasswd table and the access rules read them. -----------------

# Names the registry's users would take for one but which are different accounts to htpasswd.
LOOK_ALIKES = [
    "Alice",
    "ALICE",
    "\uff41lice",  # fullwidth a
    "al\u0131ce",  # dotless i
    "AL\u0130CE",  # dotted capital I, which lowercases to i + combining dot
]


@pytest.mark.parametrize("other", LOOK_ALIKES)
async def test_guesses_at_a_look_alike_name_do_not_spend_the_names_rate(
    clock: Clock, other: str
) -> None:
    """Guards the throttle's user key: guesses at a name differing only in case or Unicode
    from many addresses spend that name's rate, not the real owner's at a new address."""
    throttle = Throttle(3, WINDOW, BLOCK, clock, max_failures_per_user=2)
    await fail(throttle, "192.0.2.1", other)
    await fail(throttle, "192.0.2.2", other)
    assert await retry_after(throttle, "192.0.2.3", other) is not None
    assert await retry_after(throttle, "198.51.100.9", "alice") is None


@pytest.mark.parametrize("other", LOOK_ALIKES)
async def test_a_known_address_exempts_only_the_exact_name_that_logged_in(
    clock: Clock, other: str
) -> None:
    """Guards the known-address key: after alice logs in from an address, guesses from there
    at a name that only looks like hers still spend that name's rate."""
    throttle = Throttle(3, WINDOW, BLOCK, clock, max_failures_per_user=1)
    await (await throttle.admit("192.0.2.1", "alice")).succeeded()
    await fail(throttle, "192.0.2.1", other)
    assert await retry_after(throttle, "198.51.100.9", other) is not None
    assert await retry_after(throttle, "198.51.100.9", "alice") is None


async def test_composed_and_decomposed_names_are_different_names(clock: Clock) -> None:
    """Guards the user key against normalisation: htpasswd compares bytes, so `é` composed
    and decomposed are two accounts, each with its own pair budget."""
    throttle = Throttle(2, WINDOW, BLOCK, clock)
    await fail(throttle, "192.0.2.1", "jos\u00e9", 2)
    assert await retry_after(throttle, "192.0.2.1", "jos\u00e9") == BLOCK
    assert await retry_after(throttle, "192.0.2.1", "jose\u0301") is None


@pytest.mark.parametrize("other", LOOK_ALIKES)
def test_access_rules_grant_the_exact_user_name_only(other: str) -> None:
    """Guards `Rule.names`: a rule for alice grants nothing to a user whose name differs from
    hers only in case or Unicode (another htpasswd account)."""
    policy = parse_access(
        {"admins": ["alice"]},
        [
            {"users": ["alice"], "repositories": ["team/**"], "actions": ["pull", "push"]},
            {"users": ["@admins"], "repositories": ["**"], "actions": ["delete"]},
        ],
    )
    assert policy.allows("alice", Right.PUSH, "team/app")
    assert policy.allows("alice", Right.DELETE, "any/app")
    assert not policy.allows(other, Right.PULL, "team/app")
    assert not policy.allows(other, Right.DELETE, "any/app")


def test_the_basic_scheme_is_read_in_any_case() -> None:
    """Guards `parse_basic`: the auth scheme is case-insensitive (RFC 9110), the user name not."""
    token = base64.b64encode(b"Alice:pw").decode()
    for scheme in ("Basic", "basic", "BASIC", "bAsIc"):
        assert parse_basic(f"{scheme} {token}") == ("Alice", "pw")


# --- Repository names and routes: lower-case ASCII, as the registry reads them. ---------------


@pytest.mark.parametrize(
    "name",
    [
        "App",
        "team/App",
        "team/APP/x",
        "\u017fecret",  # long s: [a-z] matches it when matching ignores case in Unicode
        "\u212aube",  # Kelvin sign, likewise for k
        "\u0131mage",  # dotless i
        "\u0130mage",  # dotted capital I
        "\uff41pp",  # fullwidth a
        "caf\u00e9",
        "team/\u0131mage",
    ],
)
def test_names_with_upper_case_or_non_ascii_are_no_repositories(name: str) -> None:
    """Guards the name grammar: the registry's router takes no such name (404 page not
    found), so the proxy reads no repository in it, raw or percent-encoded."""
    assert not is_repository(name)
    for path in (f"/v2/{name}/manifests/v1", f"/v2/{name}/tags/list", f"/v2/{name}/blobs/uploads/"):
        assert classify(path).action is Action.OTHER, path
    escaped = "".join(f"%{byte:02X}" for byte in name.encode())
    assert classify(f"/v2/{escaped}/tags/list").action is Action.OTHER


def test_an_upper_case_first_component_is_another_repository() -> None:
    """Guards case in repository globs: distribution reads an upper-case first component as a
    domain, so `TEAM/app` is a valid repository (the registry takes pushes to it) and not
    `team/app`; a rule or an immutable-tags entry for `team/**` covers only the latter."""
    assert is_repository("TEAM/app") and is_repository("Team.Example/app")
    assert classify("/v2/TEAM/app/manifests/v1").repository == "TEAM/app"
    policy = parse_access(
        None, [{"users": "u", "repositories": ["team/*"], "actions": ["pull", "push"]}]
    )
    assert policy.allows("u", Right.PUSH, "team/app")
    assert not policy.allows("u", Right.PULL, "TEAM/app")
    assert not policy.allows("u", Right.PUSH, "Team/app")
    tags = parse_immutable_tags([{"repositories": ["team/*"], "tags": ["v*"]}])
    assert tags.fixed("team/app", "v1") and not tags.covers("TEAM/app")


@pytest.mark.parametrize(
    "tag", ["\uff561", "v\u0131", "\u0130", "v1\u00e9", "%EF%BD%961", "%C4%B1", "v%C3%A9"]
)
def test_non_ascii_tags_are_no_manifest_references(tag: str) -> None:
    """Guards the tag grammar: Go's \\w is ASCII, so a fullwidth, dotless or accented tag, raw
    or percent-encoded, routes nowhere in the registry and names no manifest here."""
    assert classify(f"/v2/app/manifests/{tag}").action is Action.OTHER


def test_percent_encoded_ascii_reads_as_the_registry_reads_it() -> None:
    """Guards decoding before routing: escaped ASCII letters are the letters, so a rule or an
    immutable tag cannot be dodged by spelling the name or the tag with escapes."""
    target = classify("/v2/team/%61pp/manifests/%76%31")
    read = (target.action, target.repository, target.reference)
    assert read == (Action.MANIFEST, "team/app", "v1")
    assert classify("/v2/team/%41pp/manifests/v1").action is Action.OTHER  # %41 is A


@pytest.mark.parametrize("pattern", ["Team/**", "team/App", "team/\u0131mage", "caf\u00e9/*"])
def test_repository_globs_that_could_never_match_are_refused(pattern: str) -> None:
    """Guards the glob check: a pattern with upper case or non-ASCII letters can match no
    repository name, so it is a configuration error, not a silently empty rule."""
    with pytest.raises(ValueError, match="can never match a repository name"):
        parse_access(None, [{"users": "u", "repositories": [pattern], "actions": ["pull"]}])
    with pytest.raises(ValueError, match="can never match a repository name"):
        parse_immutable_tags([{"repositories": [pattern], "tags": ["v*"]}])


# --- Tag globs: tags are case-sensitive in the registry. --------------------------------------


def test_tag_globs_are_case_sensitive() -> None:
    """Guards `ImmutableTags.fixed`: `v*` fixes v1 but not V1 (another tag to the registry),
    and `RC*` fixes RC1 but not rc1; folding case either way fixes the wrong tags."""
    rules = parse_immutable_tags([{"repositories": ["**"], "tags": ["v*", "RC*", "Stable"]}])
    assert rules.fixed("app", "v1") and rules.fixed("app", "RC1") and rules.fixed("app", "Stable")
    assert not rules.fixed("app", "V1")
    assert not rules.fixed("app", "rc1")
    assert not rules.fixed("app", "stable") and not rules.fixed("app", "STABLE")


@pytest.mark.parametrize("pattern", ["v*\u00e9", "\uff56*", "\u0131*", "*-\u0130", "r\u00e9c*"])
def test_tag_globs_with_non_ascii_letters_are_refused(pattern: str) -> None:
    """Guards the tag-glob check: tags are ASCII, so a glob with other letters could never
    match one and is refused when the configuration is read."""
    with pytest.raises(ValueError, match="can never match a tag"):
        parse_immutable_tags([{"repositories": ["**"], "tags": [pattern]}])


def test_a_tag_is_at_most_128_characters_in_routes_and_globs() -> None:
    """Guards the tag grammar's length at exactly its limit: a 128-character tag names a
    manifest and a 128-character glob is read; one more character is neither."""
    assert classify(f"/v2/app/manifests/v{'1' * 127}").reference == f"v{'1' * 127}"
    assert classify(f"/v2/app/manifests/v{'1' * 128}").action is Action.OTHER
    longest = "v" + "1" * 126 + "*"
    rules = parse_immutable_tags([{"repositories": ["**"], "tags": [longest]}])
    assert rules.fixed("a", longest[:-1] + "2") and not rules.fixed("a", "v1")
    with pytest.raises(ValueError, match="can never match a tag"):
        parse_immutable_tags([{"repositories": ["**"], "tags": [longest + "1"]}])


# --- Rate limits at exactly their limit. ------------------------------------------------------


async def test_a_key_takes_exactly_limit_members(store: ThrottleStore) -> None:
    """Guards `reserve`'s bound: `limit` members are admitted, the next one is refused, and a
    member already counted is never refused by the bound."""
    now = 1000.0
    for member in ("a", "b", "c"):
        assert await store.reserve("k", member, 3, WINDOW, now) is None
    assert await store.reserve("k", "d", 3, WINDOW, now) is not None
    assert await store.reserve("k", "a", 3, WINDOW, now) is None


async def test_a_failure_leaves_the_window_exactly_at_its_end(store: ThrottleStore) -> None:
    """Guards the window's boundary: a failure at t counts until just before t + window and
    not at t + window."""
    now = 1000.0
    await store.commit("k", "a", WINDOW, now)
    assert set((await store.get("k", WINDOW, now + WINDOW - 0.5)).failed) == {"a"}
    assert await store.reserve("k", "b", 1, WINDOW, now + WINDOW - 0.5) is not None
    assert (await store.get("k", WINDOW, now + WINDOW)).failed == {}
    assert await store.reserve("k", "b", 1, WINDOW, now + WINDOW) is None


async def test_a_block_starts_at_the_limit_and_ends_exactly_at_its_end(
    store: ThrottleStore,
) -> None:
    """Guards the block's boundaries: the `limit`-th failure blocks, not the one before; the
    block holds until just before its end, and at its end the key starts afresh."""
    now = 1000.0
    await store.commit("k", "a", WINDOW, now, limit=2, block=BLOCK)
    assert (await store.get("k", WINDOW, now)).blocked_until is None
    await store.commit("k", "b", WINDOW, now, limit=2, block=BLOCK)
    assert (await store.get("k", WINDOW, now)).blocked_until == now + BLOCK
    assert await store.reserve("k", "a", 2, WINDOW, now + BLOCK - 0.5) is not None
    assert await store.reserve("k", "c", 2, WINDOW, now + BLOCK) is None
    entry = await store.get("k", WINDOW, now + BLOCK)
    assert (entry.blocked_until, entry.failed) == (None, {})


async def test_retry_after_is_at_least_a_second(clock: Clock) -> None:
    """Guards `_retry_after`: just before the oldest failure leaves the window the client is
    told one second, never zero or a fraction (`Retry-After: 0` invites a tight loop)."""
    throttle = Throttle(3, WINDOW, BLOCK, clock, max_failures_per_user=1)
    await fail(throttle, "192.0.2.1", "alice")
    clock.now += WINDOW - 0.25
    assert await retry_after(throttle, "198.51.100.9", "alice") == 1.0
    clock.now += 0.25
    assert await retry_after(throttle, "198.51.100.9", "alice") is None


async def test_a_names_rate_defaults_to_twice_the_pairs_budget(clock: Clock) -> None:
    """Guards the default of `max_failures_per_user`: 2 x max_failures failures at one name
    from new addresses, and exactly that many."""
    throttle = Throttle(2, WINDOW, BLOCK, clock)
    for n in range(4):
        await fail(throttle, f"192.0.2.{n}", "alice")
    assert await retry_after(throttle, "198.51.100.9", "alice") is not None


async def test_an_address_is_blocked_at_exactly_max_failures_names(clock: Clock) -> None:
    """Guards the address budget's boundary: max_failures - 1 names leave it open, the
    max_failures-th blocks it."""
    throttle = Throttle(3, WINDOW, BLOCK, clock)
    await fail(throttle, "192.0.2.1", "a")
    await fail(throttle, "192.0.2.1", "b")
    assert await retry_after(throttle, "192.0.2.1", "c") is None
    await fail(throttle, "192.0.2.1", "c")
    assert await retry_after(throttle, "192.0.2.1", "d") == BLOCK


# --- The 429 pacer: its burst, its refill cap, its key. ---------------------------------------


def test_an_idle_pacer_refills_to_its_burst_and_no_further() -> None:
    """Guards the refill cap: however long an address was quiet, it gets `burst` refusals at
    once again, not the whole idle time's worth."""
    clock = Clock()
    pacer = RefusalPacer(burst=5, per_second=1, delay=2.0, clock=clock)
    assert [pacer.delay_for("192.0.2.1") for _ in range(6)] == [0.0] * 5 + [2.0]
    clock.now += 3600
    assert [pacer.delay_for("192.0.2.1") for _ in range(6)] == [0.0] * 5 + [2.0]


def test_a_pacer_gives_exactly_the_tokens_refilled() -> None:
    """Guards the token boundary: one token refilled is one refusal at once, exactly."""
    clock = Clock()
    pacer = RefusalPacer(burst=1, per_second=4, delay=1.0, clock=clock)
    assert pacer.delay_for("192.0.2.1") == 0.0
    assert pacer.delay_for("192.0.2.1") == 1.0
    clock.now += 0.25
    assert pacer.delay_for("192.0.2.1") == 0.0
    assert pacer.delay_for("192.0.2.1") == 1.0


class RecordingPacer(RefusalPacer):
    """A pacer that notes the delay it gave each refusal."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delays: list[float] = []

    def delay_for(self, client: str) -> float:
        delay = super().delay_for(client)
        self.delays.append(delay)
        return delay


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedHash]:
    yield from gated_hash(monkeypatch)


async def test_refusals_are_paced_per_ipv6_64_and_mapped_ipv4(clock: Clock) -> None:
    """Guards the pacer's key: a client resending refused logins from new interface ids of its
    /64 (or as mapped IPv4) does not get a fresh burst for each address."""
    throttle = Throttle(1, WINDOW, BLOCK, clock)
    pacer = RecordingPacer(burst=1, per_second=0.001, delay=0.001, clock=clock)
    auth, checker = authenticator(throttle, pacer)
    try:
        for client in ("2001:db8:1:2::1", "192.0.2.1"):
            assert isinstance(await login(auth, client, "guess"), AuthFailure)
        for client in ("2001:db8:1:2::2", "2001:db8:1:2:8000::3", "::ffff:192.0.2.1"):
            refused = await login(auth, client, "guess")
            assert isinstance(refused, AuthFailure) and refused.how is AuthOutcome.THROTTLED
        assert pacer.delays == [0.0, 0.001, 0.0]
    finally:
        checker.close()


@pytest.mark.parametrize(
    ("first", "second"),
    [("2001:db8:1:2::1", "2001:db8:1:2:8000::2"), ("192.0.2.1", "::ffff:192.0.2.1")],
)
async def test_a_clients_share_of_the_hashing_pool_spans_its_64_and_mapped_ipv4(
    gate: GatedHash, clock: Clock, first: str, second: str
) -> None:
    """Guards the hashing pool's key: a client cannot widen its share of the pool by sending
    from more interface ids of its /64 or as mapped IPv4."""
    throttle = Throttle(10, WINDOW, BLOCK, clock)
    auth, checker = authenticator(throttle, RefusalPacer(clock=clock), max_pending=1)
    try:
        running = login(auth, first, "guess-1")
        await eventually(lambda: gate.started == 1, "the first hash to start")
        refused = await login(auth, second, "guess-2")
        assert isinstance(refused, AuthFailure) and refused.how is AuthOutcome.THROTTLED
        gate.opened.set()
        assert isinstance(await running, AuthFailure)
    finally:
        gate.opened.set()
        checker.close()


async def test_a_pool_share_holds_exactly_max_pending_calls() -> None:
    """Guards the pool's bound: `max_pending` calls of a client are taken, the next is `Busy`."""
    opened = threading.Event()
    pool = FairPool(workers=1, max_pending=2)
    try:
        held = [pool.run("a", lambda: opened.wait(10)) for _ in range(2)]
        with pytest.raises(Busy):
            pool.run("a", lambda: True)
        opened.set()
        await asyncio.gather(*held)
    finally:
        opened.set()
        pool.close()


async def test_upstream_slots_fill_to_exactly_their_shares() -> None:
    """Guards `UpstreamSlots`' bounds: a user takes exactly `per_user` slots at once and all
    users together exactly `total`; the next request waits (here: until its wait ends)."""
    slots = UpstreamSlots(total=3, per_user=2, wait=0.01)
    assert await slots.acquire("alice") and await slots.acquire("alice")
    assert not await slots.acquire("alice")
    assert await slots.acquire("bob")
    assert not await slots.acquire("carol")
    assert (slots.in_use, slots.held_by("alice"), slots.held_by("bob")) == (3, 2, 1)


# --- Through the real registry: case and escapes in repository names and tags. ----------------

SITE_CONFIG = """
access:
  - {users: [alice], repositories: ["team/**"], actions: [pull, push, delete]}
  - {users: [bob], repositories: ["**"], actions: [pull, push, delete]}
immutable_tags:
  - {repositories: ["team/**"], tags: ["RC*"]}
"""


def moved(registry: Registry, repository: str, tag: str) -> bytes:
    """The manifest `tag` points to, changed (an annotation) so that its digest differs."""
    status, _, body = call(f"{registry.url}/v2/{repository}/manifests/{tag}", "GET", ACCEPT_OCI)
    assert status == 200, body
    manifest = json.loads(body)
    manifest["annotations"] = {"moved": uuid.uuid4().hex}
    return json.dumps(manifest).encode()


def test_case_and_escapes_reach_the_registry_as_the_proxy_read_them(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    users: dict[str, str],
    tmp_path: Path,
) -> None:
    """Guards case and escapes end to end: the registry takes `TEAM/app` as its own repository,
    so alice's `team/**` grants nothing there; `RC*` fixes RC1, also spelled `%52C1`, but not
    rc1; and bob may move tags of `TEAM/app`, which no entry covers."""
    config = tmp_path / "proxy.yml"
    config.write_text(SITE_CONFIG)
    proxy = start_proxy(registry.url, PROXY_CONFIG=str(config))
    alice = basic_auth("alice", users["alice"])
    bob = basic_auth("bob", users["bob"])
    suffix = uuid.uuid4().hex[:8]
    lower, upper = f"team/app{suffix}", f"TEAM/app{suffix}"

    # The premise: the registry itself takes an upper-case first component.
    assert call(f"{registry.url}/v2/{upper}/blobs/uploads/", "POST")[0] == 202
    assert call(f"{proxy.url}/v2/{upper}/blobs/uploads/", "POST", alice)[0] == 403
    assert call(f"{proxy.url}/v2/{upper}/tags/list", "GET", alice)[0] == 403
    for tag in ("RC1", "rc1"):
        push_image(proxy.url, lower, tag, alice)
        push_image(proxy.url, upper, tag, bob)

    put = {**alice, "Content-Type": OCI_MANIFEST}
    for spelled in ("RC1", "%52C1", "R%43%31"):
        url = f"{proxy.url}/v2/{lower}/manifests/{spelled}"
        status, _, body = call(url, "PUT", put, moved(registry, lower, "RC1"))
        assert (status, b"is immutable" in body) == (403, True), (spelled, body)
    assert call(f"{proxy.url}/v2/{lower}/manifests/rc1", "PUT", put, moved(registry, lower, "rc1")
                )[0] == 201  # fmt: skip
    put_bob = {**bob, "Content-Type": OCI_MANIFEST}
    assert call(f"{proxy.url}/v2/{upper}/manifests/RC1", "PUT", put_bob,
                moved(registry, upper, "RC1"))[0] == 201  # fmt: skip
