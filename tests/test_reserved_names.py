"""Where wildcards meet reserved names: `*` and `@anonymous`, groups and users, `_catalog`."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from proxy.access.immutable import parse_immutable_tags
from proxy.access.rules import AccessPolicy, RequestContext, Right, authorize, parse_access
from proxy.auth.anonymous import AnonymousAuthenticator
from proxy.exchange import Exchange
from proxy.identity import ANONYMOUS
from proxy.paths import Action, classify
from tests.support import Proxy, call

ANONYMOUSLY = RequestContext(ANONYMOUS)
EVERY_RIGHT = ["pull", "push", "delete", "catalog"]


def rights(policy: AccessPolicy, who: RequestContext | str, repository: str) -> set[str]:
    return {right.value for right in Right if policy.allows(who, right, repository)}


def test_star_never_grants_requests_without_credentials() -> None:
    """Guards `*` against `@anonymous`: any authenticated user, never an anonymous request,
    and a policy with only `*` rules is not public (anonymous requests get the challenge)."""
    policy = parse_access(None, [{"users": ["*"], "repositories": ["**"], "actions": EVERY_RIGHT}])
    assert rights(policy, "zoe", "any/repo") == set(EVERY_RIGHT)
    assert rights(policy, ANONYMOUSLY, "any/repo") == set()
    assert not policy.may_pull_any(ANONYMOUSLY)
    assert not policy.public


def test_anonymous_rules_name_only_anonymous_requests() -> None:
    """Guards the reserved group both ways: a `@anonymous` rule grants no authenticated user,
    and no rule naming users grants anonymous requests."""
    policy = parse_access(
        None,
        [
            {"users": ["@anonymous"], "repositories": ["public/**"], "actions": ["pull"]},
            {"users": ["@anonymous"], "actions": ["catalog"]},
            {"users": ["alice"], "repositories": ["**"], "actions": EVERY_RIGHT},
        ],
    )
    assert policy.public
    assert rights(policy, ANONYMOUSLY, "public/app") == {"pull", "catalog"}
    assert rights(policy, ANONYMOUSLY, "private/app") == {"catalog"}
    assert rights(policy, "bob", "public/app") == set()
    assert rights(policy, "alice", "private/app") == set(EVERY_RIGHT)


def test_a_user_named_anonymous_is_a_user_like_any_other() -> None:
    """Guards the reserved token: `anonymous` without `@` is a user name (push allowed), and
    that user's rights never reach requests without credentials."""
    policy = parse_access(
        None, [{"users": ["anonymous"], "repositories": ["**"], "actions": ["pull", "push"]}]
    )
    assert rights(policy, "anonymous", "x/y") == {"pull", "push"}
    assert rights(policy, ANONYMOUSLY, "x/y") == set()
    assert not policy.public


def test_a_group_name_is_not_a_user_name() -> None:
    """Guards group expansion: `@ci` grants its members, not a user called `ci` or `@ci`."""
    policy = parse_access(
        {"ci": ["ci-bot"]}, [{"users": ["@ci"], "repositories": ["**"], "actions": ["pull"]}]
    )
    assert policy.may_pull("ci-bot", "x")
    assert not policy.may_pull("ci", "x")
    assert not policy.may_pull("@ci", "x")
    assert policy.named_users == {"ci-bot"}


@pytest.mark.parametrize(
    "groups",
    [
        {"g": ["@anonymous"]},
        {"g": ["alice", "*"]},
        {"anonymous": ["alice"]},
        {"anonymous": []},
        {"anonymous": None},
    ],
)
def test_reserved_tokens_never_enter_groups(groups: dict[str, object]) -> None:
    """Guards the reserved names in `groups`: no `@anonymous` or `*` member, and no group
    called `anonymous`, not even an empty one (`anonymous:` with no value)."""
    with pytest.raises(ValueError, match=r"^groups\."):
        parse_access(groups, None)


@pytest.mark.parametrize("actions", [["push"], ["delete"], ["pull", "push"], ["catalog", "delete"]])
def test_anonymous_may_only_pull_and_read_the_catalog(actions: list[str]) -> None:
    """Guards the rights `@anonymous` may be given, also next to `*` in one rule."""
    with pytest.raises(ValueError, match="@anonymous may only pull"):
        parse_access(
            None, [{"users": ["*", "@anonymous"], "repositories": ["**"], "actions": actions}]
        )


@pytest.mark.parametrize(
    "path",
    [
        "/v2/_catalog/",
        "/v2/_catalogs",
        "/v2/x/_catalog",
        "/v2/_catalog/tags/list",
        "/v2/_catalog/manifests/v1",
    ],
)
def test_only_the_catalog_route_is_the_catalog(path: str) -> None:
    """Guards `_catalog` against names like it: only `/v2/_catalog` needs just the catalog
    right; the rest are no route at all, refused even to a user who may do everything."""
    assert classify(path).action is not Action.CATALOG
    policy = parse_access(None, [{"users": ["u"], "repositories": ["**"], "actions": EVERY_RIGHT}])
    assert not authorize(policy, RequestContext.of("u", "GET", classify(path))).allowed


def test_a_repository_named_catalog_needs_pull() -> None:
    """Guards the other side: `catalog` (no underscore) is a repository like any other."""
    target = classify("/v2/catalog/tags/list")
    assert (target.action, target.repository) == (Action.TAGS, "catalog")
    policy = parse_access(None, [{"users": ["u"], "actions": ["catalog"]}])
    assert authorize(policy, RequestContext.of("u", "GET", classify("/v2/_catalog"))).allowed
    assert not authorize(policy, RequestContext.of("u", "GET", target)).allowed


@pytest.mark.parametrize(
    "path", ["/v2//tags/list", "/v2/manifests/v1", "/v2/tags/list", "/v2//manifests/v1", "/v2"]
)
def test_no_glob_covers_the_empty_repository(path: str) -> None:
    """Guards the empty name: `**` matches the empty string, so a path with no repository
    must never be read as one; a user with every right on `**` is refused."""
    policy = parse_access(None, [{"users": ["u"], "repositories": ["**"], "actions": EVERY_RIGHT}])
    assert classify(path).repository is None
    assert not policy.allows("u", Right.PULL, None)
    assert not authorize(policy, RequestContext.of("u", "GET", classify(path))).allowed


def test_a_star_tag_glob_fixes_every_tag() -> None:
    """Guards `*` in `immutable_tags`: accepted alone, it matches every tag, one character too;
    `v*` matches `v` itself (the star may match nothing)."""
    every = parse_immutable_tags([{"repositories": ["**"], "tags": ["*"]}])
    for tag in ("latest", "v", "1", "_x", "a.b-c"):
        assert every.fixed("team/app", tag), tag
    release = parse_immutable_tags([{"repositories": ["**"], "tags": ["v*"]}])
    assert release.fixed("team/app", "v") and release.fixed("team/app", "v1.0")
    assert not release.fixed("team/app", "latest")


def test_tag_and_repository_globs_match_whole_names_only() -> None:
    """Guards the other edges of immutable-tag globs: whole names only (no prefix match), a
    `.` that is literal, `*` in repositories that stops at `/`, and both parts needed."""
    rules = parse_immutable_tags([{"repositories": ["team/*"], "tags": ["stable", "v1.0"]}])
    assert rules.fixed("team/app", "stable") and rules.fixed("team/app", "v1.0")
    assert not rules.fixed("team/app", "stable2")
    assert not rules.fixed("team/app", "v1x0")
    assert not rules.fixed("team/app/x", "stable")
    assert not rules.fixed("other/app", "stable")
    assert rules.covers("team/app") and not rules.covers("team/app/x")


async def admitted(policy: AccessPolicy, path: str, headers: dict[str, str]) -> bool:
    """Whether a request for `path` is admitted as `@anonymous` under `policy`."""
    request = make_mocked_request("GET", path, headers=headers)
    exchange = Exchange(client="127.0.0.1", scheme="http", target=classify(path))
    found = await AnonymousAuthenticator(lambda: policy.public).authenticate(request, exchange)
    assert found in (None, ANONYMOUS)
    return found is ANONYMOUS


async def test_requests_are_anonymous_only_while_a_rule_names_anonymous() -> None:
    """Guards the switch: with no rules (where any identity may do everything) or only `*`
    rules, a request without credentials is not admitted; with a `@anonymous` rule it is, but
    never for `/v2/` nor when it carries credentials (empty Basic `Og==` is none)."""
    star = parse_access(None, [{"users": ["*"], "repositories": ["**"], "actions": ["pull"]}])
    public = parse_access(
        None, [{"users": ["@anonymous"], "repositories": ["**"], "actions": ["pull"]}]
    )
    path = "/v2/x/tags/list"
    assert not await admitted(AccessPolicy(), path, {})
    assert not await admitted(star, path, {})
    assert await admitted(public, path, {})
    assert await admitted(public, path, {"Authorization": "Basic Og=="})
    assert not await admitted(public, path, {"Authorization": "Basic YTpi"})
    assert not await admitted(public, "/v2/", {})


def test_without_rules_a_request_without_credentials_is_challenged(proxy: Proxy) -> None:
    """Guards the unrestricted proxy (no `access` rules) against anonymous requests: every
    identity may do everything there, so none may be anonymous."""
    for path in ("/v2/x/tags/list", "/v2/_catalog", "/v2/"):
        status, headers, _ = call(f"{proxy.url}{path}")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic "), path
    status, _, _ = call(f"{proxy.url}/v2/x/blobs/uploads/", "POST")
    assert status == 401
