"""Access rules: parsing, the rights requests need, mounts, the catalog, path properties."""

from __future__ import annotations

import fnmatch
from urllib.parse import quote

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from proxy.access.rules import (
    AccessPolicy,
    Decision,
    RequestContext,
    Right,
    authorize,
    mount_source,
    parse_access,
    required_rights,
)
from proxy.paths import Action, Target, classify
from proxy.reading import CATALOG_MAX_N, cap_catalog_query, parse_query, strip_mount


def authorize_as(
    policy: AccessPolicy, user: str, method: str, target: Target, raw_query: str
) -> Decision:
    """`authorize` for a password-authenticated user (it takes a RequestContext since issue 14)."""
    return authorize(policy, RequestContext.of(user, method, target, raw_query))


EXAMPLE = """
groups:
  ci: [ci-bot]
  team-a: [alice, bob]
access:
  - users: ["@ci"]
    repositories: ["**"]
    actions: [pull]
  - users: ["@team-a"]
    repositories: ["team-a/**"]
    actions: [pull, push, delete]
  - users: ["*"]
    actions: [catalog]
"""


def policy_from(text: str) -> AccessPolicy:
    document = yaml.safe_load(text)
    return parse_access(document.get("groups"), document.get("access"))


@pytest.fixture(scope="module")
def example() -> AccessPolicy:
    return policy_from(EXAMPLE)


DIGEST = "sha256:" + "a" * 64

# (method, path) -> what (pull-only CI, namespace owner, stranger) may do.
MATRIX = [
    ("GET", "/v2/", (True, True, True)),
    ("GET", "/v2/_catalog", (True, True, True)),
    ("GET", "/v2/team-a/app/manifests/1.0", (True, True, False)),
    ("HEAD", f"/v2/team-a/app/blobs/{DIGEST}", (True, True, False)),
    ("GET", "/v2/team-a/app/tags/list", (True, True, False)),
    ("PUT", "/v2/team-a/app/manifests/1.0", (False, True, False)),
    ("POST", "/v2/team-a/app/blobs/uploads/", (False, True, False)),
    ("PATCH", "/v2/team-a/app/blobs/uploads/0b3a-uuid", (False, True, False)),
    ("DELETE", f"/v2/team-a/app/manifests/{DIGEST}", (False, True, False)),
    ("GET", "/v2/team-a/nested/deep/app/manifests/1.0", (True, True, False)),
    ("PUT", "/v2/team-a/nested/deep/app/manifests/1.0", (False, True, False)),
    ("GET", "/v2/team-b/app/manifests/1.0", (True, False, False)),
    ("PUT", "/v2/team-b/app/manifests/1.0", (False, False, False)),
    ("DELETE", f"/v2/team-b/app/manifests/{DIGEST}", (False, False, False)),
    ("GET", "/v2/team-a/manifests/1.0", (True, False, False)),  # team-a itself: not team-a/**
    ("GET", "/v2/team-a-fork/app/manifests/1.0", (True, False, False)),
    ("OPTIONS", "/v2/team-a/app/manifests/1.0", (False, True, False)),
    ("GET", "/v2", (False, False, False)),  # not a registry route
    # The registry reads `Team-A` as a domain (reference grammar): a repository only `**` covers.
    ("GET", "/v2/Team-A/app/manifests/1.0", (True, False, False)),
    ("GET", "/v2/team-a/App/manifests/1.0", (False, False, False)),
]


def allowed(policy: AccessPolicy, user: str, method: str, path: str) -> bool:
    raw_path, _, raw_query = path.partition("?")
    return authorize_as(policy, user, method, classify(raw_path), raw_query).allowed


@pytest.mark.parametrize(("method", "path", "expected"), MATRIX)
def test_ci_pulls_everything_team_a_owns_its_namespace(
    example: AccessPolicy, method: str, path: str, expected: tuple[bool, bool, bool]
) -> None:
    got = tuple(allowed(example, user, method, path) for user in ("ci-bot", "alice", "mallory"))
    assert got == expected


def test_rights_matrix(example: AccessPolicy) -> None:
    def rights(user: str, repository: str) -> set[str]:
        return {r.value for r in Right if example.allows(user, r, repository)}

    assert rights("ci-bot", "team-a/app") == {"pull", "catalog"}
    assert rights("ci-bot", "anything/at/all") == {"pull", "catalog"}
    assert rights("alice", "team-a/app") == {"pull", "push", "delete", "catalog"}
    assert rights("bob", "team-a/x/y") == {"pull", "push", "delete", "catalog"}
    assert rights("alice", "team-b/app") == {"catalog"}
    assert rights("mallory", "team-a/app") == {"catalog"}
    assert example.named_users == {"ci-bot", "alice", "bob"}
    assert not example.unrestricted


def test_no_rules_means_everyone_may_do_everything() -> None:
    for policy in (parse_access(None, None), parse_access({"g": ["a"]}, []), AccessPolicy()):
        assert policy.unrestricted
        for right in Right:
            assert policy.allows("anyone", right, "any/repo")
            assert policy.allows("anyone", right, None)
        decision = authorize_as(policy, "anyone", "DELETE", classify("/v2/x/manifests/t"), "")
        assert decision.allowed


def test_rights_are_a_union_and_order_does_not_matter() -> None:
    rules = [
        {"users": "alice", "repositories": "a/*", "actions": "pull"},
        {"users": ["alice"], "repositories": ["a/*"], "actions": ["push"]},
        {"users": ["*"], "repositories": ["public/**"], "actions": ["pull"]},
    ]
    for ordered in (rules, rules[::-1]):
        policy = parse_access(None, ordered)
        assert policy.allows("alice", Right.PULL, "a/x")
        assert policy.allows("alice", Right.PUSH, "a/x")
        assert not policy.allows("alice", Right.DELETE, "a/x")
        assert policy.allows("zoe", Right.PULL, "public/x/y")
        assert not policy.allows("zoe", Right.CATALOG, None)
        assert not policy.allows("alice", Right.PULL, None)


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("team-a/*", ["team-a/app", "team-a/a.b_c-d"], ["team-a", "team-a/x/y", "team-ab/x"]),
        ("team-a/**", ["team-a/app", "team-a/x/y/z"], ["team-a", "team-ab/x", "x/team-a/y"]),
        ("*", ["app", "a-b"], ["a/b"]),
        ("**", ["app", "a/b", "a/b/c"], []),
        ("*/app", ["x/app", "team-a/app"], ["app", "x/y/app", "x/app2"]),
        ("**/app", ["x/app", "x/y/app"], ["app", "x/app2"]),
        ("app-*", ["app-1", "app-x.y"], ["app", "app-1/x", "xapp-1"]),
        ("a.b", ["a.b"], ["axb", "a.bb"]),  # '.' is literal, not a regex dot
        ("team-a/*/base", ["team-a/x/base"], ["team-a/base", "team-a/x/y/base"]),
    ],
)
def test_glob_edge_cases(pattern: str, matches: list[str], misses: list[str]) -> None:
    policy = parse_access(None, [{"users": "u", "repositories": [pattern], "actions": ["pull"]}])
    for name in matches:
        assert policy.may_pull("u", name), (pattern, name)
    for name in misses:
        assert not policy.may_pull("u", name), (pattern, name)


@pytest.mark.parametrize(
    ("groups", "rules", "message"),
    [
        (None, {"users": "a"}, r"^access: expected a list of rules"),
        (None, ["x"], r"^access\[0\]: expected a mapping"),
        (
            None,
            [{"users": "a", "repositories": "*", "actions": "pull", "repos": "x"}],
            r"^access\[0\]: unknown key 'repos' "
            r"\(expected users, repositories, actions, networks\)$",
        ),
        (
            None,
            [
                {"users": "a", "repositories": "*", "actions": "pull"},
                {"users": "a", "repositories": "*", "actions": "pull"},
                {"users": "a", "repositories": "*", "actions": ["push", "pul"]},
            ],
            r"^access\[2\]\.actions: unknown action 'pul' "
            r"\(expected pull, push, delete, catalog\)$",
        ),
        (None, [{"repositories": "*", "actions": "pull"}], r"^access\[0\]\.users: required$"),
        (
            None,
            [{"users": [], "repositories": "*", "actions": "pull"}],
            r"users: expected at least",
        ),
        (None, [{"users": "a", "actions": "pull"}], r"^access\[0\]\.repositories: required$"),
        (None, [{"users": "a", "repositories": "*"}], r"^access\[0\]\.actions: required$"),
        (
            None,
            [{"users": ["a", False], "repositories": "*", "actions": "pull"}],
            r"^access\[0\]\.users\[1\]: expected a string, got False \(quote it\)$",
        ),
        (
            {"ci": ["bot"]},
            [{"users": "@cii", "repositories": "*", "actions": "pull"}],
            r"^access\[0\]\.users\[0\]: unknown group '@cii' \(defined: ci\)$",
        ),
        (None, [{"users": "a:b", "repositories": "*", "actions": "pull"}], r"not a possible user"),
        (
            None,
            [{"users": "a", "repositories": ["x", "Team-A/*"], "actions": "pull"}],
            r"^access\[0\]\.repositories\[1\]: 'Team-A/\*' can never match",
        ),
        (None, [{"users": "a", "repositories": "a/", "actions": "pull"}], r"can never match"),
        (None, [{"users": "a", "repositories": "a//b", "actions": "pull"}], r"can never match"),
        (None, [{"users": "a", "repositories": "***", "actions": "pull"}], r"can never match"),
        (None, [{"users": "a", "repositories": "a?", "actions": "pull"}], r"can never match"),
        (None, [{"users": "a", "repositories": {"x": 1}, "actions": "pull"}], r"expected a list"),
        (["a"], None, r"^groups: expected a mapping"),
        ({"bad name": ["a"]}, None, r"^groups: invalid group name 'bad name'"),
        ({"g": ["@h"]}, None, r"^groups\.g\[0\]: a group lists user names only"),
        ({"g": "*"}, None, r"^groups\.g\[0\]: a group lists user names only"),
        ({"g": [7]}, None, r"^groups\.g\[0\]: expected a string, got 7"),
    ],
)
def test_parse_errors_name_the_rule_and_field(groups: object, rules: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_access(groups, rules)


def test_names_longer_than_the_registry_allows_are_refused() -> None:
    policy = parse_access(None, [{"users": "u", "repositories": "**", "actions": "pull"}])
    assert policy.may_pull("u", "a" * 255)
    assert not policy.may_pull("u", "a" * 256)


def test_catalog_only_rules_need_no_repositories() -> None:
    policy = parse_access({"ops": None}, [{"users": ["@ops", "carl"], "actions": ["catalog"]}])
    assert policy.allows("carl", Right.CATALOG, None)
    assert not policy.may_pull("carl", "x")


def target(path: str) -> Target:
    return classify(path)


def test_required_rights_follow_the_registry() -> None:
    repo = "team-a/app"
    manifest = target(f"/v2/{repo}/manifests/1")
    assert required_rights("GET", target("/v2/"), {}) == []
    assert required_rights("GET", target("/v2/_catalog"), {}) == [(Right.CATALOG, None)]
    assert required_rights("GET", manifest, {}) == [(Right.PULL, repo)]
    assert required_rights("HEAD", manifest, {}) == [(Right.PULL, repo)]
    for method in ("POST", "PUT", "PATCH"):
        assert required_rights(method, manifest, {}) == [(Right.PULL, repo), (Right.PUSH, repo)]
    assert required_rights("DELETE", manifest, {}) == [(Right.DELETE, repo)]
    assert required_rights("TRACE", manifest, {}) == [
        (Right.PULL, repo),
        (Right.PUSH, repo),
        (Right.DELETE, repo),
    ]
    assert required_rights("GET", target("/v2/x/y/z"), {}) == [(Right.PULL, None)]


def test_mount_needs_pull_on_the_source() -> None:
    upload = target("/v2/team-a/app/blobs/uploads/")
    query = {"mount": DIGEST, "from": "team-b/base"}
    assert required_rights("POST", upload, query) == [
        (Right.PULL, "team-a/app"),
        (Right.PUSH, "team-a/app"),
        (Right.PULL, "team-b/base"),
    ]
    # A POST to an existing upload starts a new (mountable) one in the registry too.
    assert mount_source("POST", target("/v2/team-a/app/blobs/uploads/some-id"), query) == (
        "team-b/base"
    )
    assert mount_source("PUT", upload, query) is None
    assert mount_source("POST", target("/v2/team-a/app/manifests/1"), query) is None
    assert mount_source("POST", upload, {"mount": DIGEST}) is None
    assert mount_source("POST", upload, {"mount": "", "from": "team-b/base"}) is None


MOUNT_POLICY = """
access:
  - {users: [alice], repositories: ["team-a/**"], actions: [pull, push]}
  - {users: [alice], repositories: ["shared/**"], actions: [pull]}
"""


@pytest.mark.parametrize(
    ("query", "forwarded"),
    [
        # Pull on the source: the mount goes through untouched.
        (f"mount={DIGEST}&from=shared%2Fbase", f"mount={DIGEST}&from=shared%2Fbase"),
        (f"from=team-a/other&mount={DIGEST}", f"from=team-a/other&mount={DIGEST}"),
        # No pull on the source: a plain upload starts instead.
        (f"mount={DIGEST}&from=team-b%2Fsecret", ""),
        (f"mount={DIGEST}&from=team-b/secret&x=1", "x=1"),
        # Go decodes keys, takes the first value and skips pairs with ';' or bad escapes.
        (f"%6Dount={DIGEST}&fr%6Fm=team-b/secret", ""),
        (f"mount={DIGEST}&from=team-b/secret&from=shared/base", ""),
        (f"from=shared/base;x&mount={DIGEST}&from=team-b/secret", ""),
        (f"from=%zz&mount={DIGEST}&from=team-b/secret", "from=%zz"),
        # Just `from` or just `mount` mounts nothing.
        ("from=team-b/secret", "from=team-b/secret"),
        # A source that is no repository name to the registry matches no rule, whatever the glob.
        (f"mount={DIGEST}&from=shared/base%23/x", ""),
        (f"mount={DIGEST}&from=shared/base+", ""),
    ],
)
def test_a_mount_without_pull_on_the_source_becomes_a_plain_upload(
    query: str, forwarded: str
) -> None:
    policy = policy_from(MOUNT_POLICY)
    decision = authorize_as(policy, "alice", "POST", target("/v2/team-a/app/blobs/uploads/"), query)
    assert decision.allowed
    assert decision.query == forwarded
    upload = target("/v2/team-a/app/blobs/uploads/")
    assert mount_source("POST", upload, parse_query(decision.query)) != "team-b/secret"


def test_a_mount_never_lets_a_stranger_push() -> None:
    policy = policy_from(MOUNT_POLICY)
    decision = authorize_as(
        policy,
        "alice",
        "POST",
        target("/v2/team-b/app/blobs/uploads/"),
        f"mount={DIGEST}&from=shared/base",
    )
    assert not decision.allowed
    assert decision.reason == "pull on team-b/app denied"


def test_parse_query_reads_like_go() -> None:
    assert parse_query("") == {}
    assert parse_query("a=1&a=2&b=%zz&c+d=e+f&x;=1&&=v&k") == {
        "a": "1",
        "c d": "e f",
        "": "v",
        "k": "",
    }
    assert parse_query("from=team-a%2Fapp") == {"from": "team-a/app"}
    assert strip_mount("a=1&mount=x&b=2&from=y;z&from=q") == "a=1&b=2"


@pytest.mark.parametrize(
    ("query", "capped"),
    [
        ("", ""),
        ("n=10", "n=10"),
        (f"n={CATALOG_MAX_N}", f"n={CATALOG_MAX_N}"),
        (f"n={CATALOG_MAX_N + 1}", f"n={CATALOG_MAX_N}"),
        ("last=a%2Fb&n=999999999999999999999999", f"last=a%2Fb&n={CATALOG_MAX_N}"),
        ("n=%35%30%30%30&x=%7E", f"n={CATALOG_MAX_N}&x=%7E"),  # Go decodes n=5000
        ("n=%2B5000", f"n={CATALOG_MAX_N}"),  # Atoi takes a sign
        ("n=0005000", f"n={CATALOG_MAX_N}"),
        ("n=" + "9" * 5000, f"n={CATALOG_MAX_N}"),
        ("n=-5", "n=-5"),  # the registry answers an error for these itself
        ("n=abc&n=5000", f"n=abc&n={CATALOG_MAX_N}"),
        ("n=+5000", "n=+5000"),  # '+' is a space: the registry refuses ' 5000'
        ("x=1;n=5000&n=2", "n=2"),
    ],
)
def test_catalog_n_is_capped(query: str, capped: str) -> None:
    assert cap_catalog_query(query) == capped
    decision = authorize_as(AccessPolicy(), "u", "GET", target("/v2/_catalog"), query)
    assert decision.query == capped


def test_cap_catalog_query_can_move_last() -> None:
    assert cap_catalog_query("last=x&n=50", last="team-a/app") == "n=50&last=team-a%2Fapp"
    assert cap_catalog_query("", last="a") == "last=a"


def test_denied_requests_say_what_was_missing(example: AccessPolicy) -> None:
    catalog = authorize_as(AccessPolicy([]), "x", "GET", target("/v2/_catalog"), "n=5000")
    assert (catalog.allowed, catalog.query) == (True, f"n={CATALOG_MAX_N}")
    no_catalog = policy_from("access: [{users: [a], repositories: ['**'], actions: [pull]}]")
    decision = authorize_as(no_catalog, "a", "GET", target("/v2/_catalog"), "")
    assert (decision.allowed, decision.reason) == (False, "catalog denied")
    decision = authorize_as(example, "alice", "DELETE", target("/v2/team-b/x/manifests/1"), "")
    assert decision.reason == "delete on team-b/x denied"


# Properties of the path classifier the rules rely on.

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
HEX = "0123456789abcdef"
TAG_CHARS = ALNUM + "ABCDEFGHIJKLMNOPQRSTUVWXYZ_"  # Go's \w is ASCII


def _component(runs: list[str], separators: list[str]) -> str:
    return runs[0] + "".join(sep + run for sep, run in zip(separators, runs[1:], strict=False))


# Distribution's grammar: [a-z0-9]+ runs joined by '.', '_', '__' or '-'s.
COMPONENT = st.builds(
    _component,
    st.lists(st.text(ALNUM, min_size=1, max_size=6), min_size=1, max_size=3),
    st.lists(st.sampled_from([".", "_", "__", "-", "--", "---"]), min_size=2, max_size=2),
)
REPOSITORY = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)
TAG = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(TAG_CHARS),
    st.text(TAG_CHARS + ".-", max_size=127),
)
DIGEST_REF = st.sampled_from([("sha256", 64), ("sha512", 128)]).flatmap(
    lambda algorithm: st.text(HEX, min_size=algorithm[1], max_size=algorithm[1]).map(
        lambda hexits: f"{algorithm[0]}:{hexits}"
    )
)
REFERENCE = TAG | DIGEST_REF


@given(REPOSITORY, REFERENCE)
def test_classify_manifests(repository: str, reference: str) -> None:
    got = classify(f"/v2/{repository}/manifests/{reference}")
    assert got == Target(Action.MANIFEST, repository, reference)


@given(REPOSITORY, DIGEST_REF)
def test_classify_blobs_and_referrers(repository: str, digest: str) -> None:
    assert classify(f"/v2/{repository}/blobs/{digest}") == Target(Action.BLOB, repository, digest)
    assert classify(f"/v2/{repository}/referrers/{digest}") == Target(
        Action.REFERRERS, repository, digest
    )


@given(REPOSITORY, st.text(TAG_CHARS + ".=-"), st.text())
def test_classify_uploads_and_tags(repository: str, upload: str, query: str) -> None:
    got = classify(f"/v2/{repository}/blobs/uploads/{upload}?{query}")
    assert got == Target(Action.UPLOAD, repository, upload or None)
    assert classify(f"/v2/{repository}/tags/list") == Target(Action.TAGS, repository)


@given(REPOSITORY, REFERENCE, st.sets(st.integers(min_value=0, max_value=400)))
def test_percent_encoding_does_not_change_the_reading(
    repository: str, reference: str, encode: set[int]
) -> None:
    path = f"/v2/{repository}/manifests/{reference}"
    # The registry decodes the path before routing; so does classify.
    encoded = "".join(quote(c, safe="") if i in encode else c for i, c in enumerate(path))
    assert classify(encoded) == classify(path)


PATH_PIECES = st.sampled_from(
    ["/", "v2", "manifests", "blobs", "uploads", "tags", "list", "%", "%2F"]
)
ANY_TEXT = st.text() | st.lists(PATH_PIECES | COMPONENT | st.text(max_size=3)).map("".join).map(
    lambda rest: "/v2/" + rest
)


@given(ANY_TEXT)
def test_classify_never_raises(text: str) -> None:
    got = classify(text)
    assert got.repository is None or classify(f"/v2/{got.repository}/tags/list").repository == (
        got.repository
    )


@given(REPOSITORY, st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "FOO"]))
def test_required_rights_only_name_the_target_repository(repository: str, method: str) -> None:
    for path in (
        f"/v2/{repository}/manifests/latest",
        f"/v2/{repository}/blobs/uploads/",
        f"/v2/{repository}/tags/list",
    ):
        needed = required_rights(method, classify(path), {})
        assert needed
        assert {repo for _, repo in needed} == {repository}


GLOB_COMPONENT = st.from_regex(r"(?:[a-z0-9]|\*)(?:[a-z0-9.-]|\*){0,4}", fullmatch=True).filter(
    lambda p: "**" not in p
)
NAME_COMPONENT = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,5}", fullmatch=True)


@given(
    st.lists(GLOB_COMPONENT, min_size=1, max_size=3),
    st.lists(NAME_COMPONENT, min_size=1, max_size=4),
)
def test_star_never_crosses_a_slash(pattern_parts: list[str], name_parts: list[str]) -> None:
    pattern, name = "/".join(pattern_parts), "/".join(name_parts)
    try:
        policy = parse_access(None, [{"users": "u", "repositories": pattern, "actions": "pull"}])
    except ValueError:
        return  # patterns that can never match are refused; see test_parse_errors
    expected = len(pattern_parts) == len(name_parts) and all(
        fnmatch.fnmatchcase(n, p) for n, p in zip(name_parts, pattern_parts, strict=True)
    )
    assert policy.may_pull("u", name) == expected


@given(st.lists(NAME_COMPONENT, min_size=1, max_size=4), st.data())
def test_double_star_crosses_slashes(name_parts: list[str], data: st.DataObject) -> None:
    name = "/".join(name_parts)
    cut = data.draw(st.integers(min_value=0, max_value=len(name)))
    # Replace a suffix of the name by `**`: it must still match when the prefix is valid.
    pattern = name[:cut] + "**"
    try:
        policy = parse_access(None, [{"users": "u", "repositories": pattern, "actions": "pull"}])
    except ValueError:
        return
    assert policy.may_pull("u", name)
    assert policy.may_pull("u", name + "/more/below")
