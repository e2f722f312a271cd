"""Public repositories (`@anonymous`) and rules limited to `networks`, against the registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from proxy.access.rules import RequestContext, Right, parse_access
from proxy.identity import ANONYMOUS
from tests.support import (
    Clients,
    Podman,
    Proxy,
    Registry,
    access_records,
    basic_auth,
    call,
    htpasswd,
    push_image,
    wait_until,
)

PASSWORDS = {"alice": "alice-secret", "ci-bot": "ci-secret"}
RULES = """
access:
  - {users: ["@anonymous", "*"], repositories: ["public/**"], actions: [pull]}
  - {users: ["@anonymous"], actions: [catalog]}
  - {users: ["alice"], repositories: ["**"], actions: [pull, push, delete, catalog]}
  - {users: ["ci-bot"], repositories: ["**"], actions: [pull]}
  - {users: ["ci-bot"], repositories: ["ci/**"], actions: [push], networks: ["127.0.0.2/32"]}
"""


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Proxy]]:
    """A registry with public/app and private/app behind a proxy with RULES."""
    root = tmp_path_factory.mktemp("public")
    registry = Registry(root / "registry")
    registry.start()
    for repo in ("public/app", "private/app"):
        push_image(registry.url, repo)
    passwd = root / "htpasswd"
    for user, password in PASSWORDS.items():
        htpasswd(passwd, "-B", "-C", "4", user=user, password=password)
    config = root / "proxy.yml"
    config.write_text(RULES)
    proxy = Proxy(root / "proxy", registry.url, passwd,
                  {"PROXY_CONFIG": str(config), "PROXY_AUTH_MAX_FAILURES": "2"})  # fmt: skip
    proxy.start()
    yield registry, proxy
    proxy.stop()
    registry.stop()


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(("repo", "public_repo"), [("public/app", True), ("private/app", False)])
def test_skopeo_without_credentials_pulls_only_public_repositories(
    public: tuple[Registry, Proxy], tmp_path: Path, repo: str, public_repo: bool
) -> None:
    """Guards `@anonymous`: public pulls work with no login, private ones get unauthorized."""
    _, proxy = public
    source = f"docker://{proxy.host}/{repo}:v1"
    inspect = run("skopeo", "inspect", "--no-creds", "--tls-verify=false", source, home=tmp_path)
    assert (inspect.returncode == 0) == public_repo, inspect.stderr
    copy = run("skopeo", "copy", "--src-no-creds", "--src-tls-verify=false", source,
               f"dir:{tmp_path / 'out'}", home=tmp_path)  # fmt: skip
    assert (copy.returncode == 0) == public_repo, copy.stderr
    if not public_repo:
        assert "unauthorized" in copy.stderr.lower(), copy.stderr


@pytest.mark.parametrize(("repo", "public_repo"), [("public/app", True), ("private/app", False)])
def test_podman_pull_without_login(
    public: tuple[Registry, Proxy], tmp_path: Path, repo: str, public_repo: bool
) -> None:
    """Guards `@anonymous` with podman, which holds no credentials here."""
    _, proxy = public
    rundir = Path(tempfile.mkdtemp(prefix="podman-run-", dir="/tmp"))
    try:
        clients = Clients(tmp_path / "clients", proxy)
        clients.authfile.write_text('{"auths": {}}')  # no login
        podman = Podman(clients, tmp_path / "podman", rundir)
        image = f"{proxy.host}/{repo}:v1"
        if public_repo:
            podman.ok("pull", "-q", "--tls-verify=false", image)
        else:
            result = podman.fails("pull", "-q", "--tls-verify=false", image)
            assert "unauthorized" in result.stderr.lower(), result.stderr
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def test_the_ping_still_challenges_and_bad_credentials_are_never_anonymous(
    public: tuple[Registry, Proxy],
) -> None:
    """Guards the 401s that clients need: /v2/ without credentials, and wrong passwords."""
    _, proxy = public
    status, headers, _ = call(f"{proxy.url}/v2/")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    wrong = basic_auth("alice", "wrong")
    status, headers, _ = call(f"{proxy.url}/v2/public/app/tags/list", headers=wrong)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")


def test_anonymous_requests_never_count_as_guesses(public: tuple[Registry, Proxy]) -> None:
    """Guards the throttle: many anonymous denials (limit 2) leave alice's login alone."""
    _, proxy = public
    for _ in range(5):
        assert call(f"{proxy.url}/v2/private/app/tags/list")[0] == 401
    status, _, _ = call(f"{proxy.url}/v2/private/app/tags/list",
                        headers=basic_auth("alice", PASSWORDS["alice"]))  # fmt: skip
    assert status == 200


def test_anonymous_catalog_lists_only_public_repositories(public: tuple[Registry, Proxy]) -> None:
    """Guards the catalog: anonymous clients see public names only, alice sees both."""
    _, proxy = public
    status, _, body = call(f"{proxy.url}/v2/_catalog")
    assert status == 200
    assert json.loads(body)["repositories"] == ["public/app"]
    status, _, body = call(f"{proxy.url}/v2/_catalog",
                           headers=basic_auth("alice", PASSWORDS["alice"]))  # fmt: skip
    assert {"public/app", "private/app"} <= set(json.loads(body)["repositories"])


def test_audit_log_names_no_user_and_auth_anonymous(public: tuple[Registry, Proxy]) -> None:
    """Guards the audit trail of anonymous pulls."""
    _, proxy = public
    status, headers, _ = call(f"{proxy.url}/v2/public/app/tags/list")
    assert status == 200
    request_id = headers["X-Request-Id"]

    def record() -> list[dict[str, object]]:
        return [r for r in access_records(proxy.log()) if r["request_id"] == request_id]

    wait_until(lambda: bool(record()), "the access log line")
    assert record()[0]["user"] is None and record()[0]["auth"] == "anonymous"


def curl_from(source: str, url: str, method: str, user: str) -> int:
    """The status of one curl request sent from the loopback address `source`."""
    result = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", source,
         "-X", method, "-u", f"{user}:{PASSWORDS[user]}", url],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return int(result.stdout)


@pytest.mark.parametrize(("source", "expected"), [("127.0.0.2", 202), ("127.0.0.3", 403)])
def test_a_rule_with_networks_grants_push_only_from_inside_them(
    public: tuple[Registry, Proxy], source: str, expected: int
) -> None:
    """Guards `networks`: ci-bot may push to ci/** from 127.0.0.2 only, but pulls anywhere."""
    _, proxy = public
    url = f"{proxy.url}/v2/ci/app-{uuid.uuid4().hex[:6]}/blobs/uploads/"
    assert curl_from(source, url, "POST", "ci-bot") == expected
    assert curl_from(source, f"{proxy.url}/v2/public/app/tags/list", "GET", "ci-bot") == 200


def test_networks_and_anonymous_in_the_rules() -> None:
    """Guards the rule semantics: `*` is not anonymous, networks need an address inside."""
    policy = parse_access(None, yaml_rules(RULES))
    anonymous = RequestContext(ANONYMOUS)
    assert policy.allows(anonymous, Right.PULL, "public/x")
    assert not policy.allows(anonymous, Right.PULL, "private/x")
    assert policy.allows(anonymous, Right.CATALOG, None)
    ci_inside = RequestContext.of("ci-bot")
    assert not policy.allows(ci_inside, Right.PUSH, "ci/x")  # no address: outside every network
    inside = RequestContext(ci_inside.identity, client="127.0.0.2")
    outside = RequestContext(ci_inside.identity, client="127.0.0.3")
    assert policy.allows(inside, Right.PUSH, "ci/x")
    assert not policy.allows(outside, Right.PUSH, "ci/x")
    assert not policy.allows(inside, Right.PUSH, "public/x")


def yaml_rules(text: str) -> object:
    return yaml.safe_load(text)["access"]


@pytest.mark.parametrize(
    ("groups", "rules", "message"),
    [
        ({"anonymous": ["x"]}, None, r"^groups\.anonymous: the name is reserved"),
        (None, [{"users": ["@anonymous"], "repositories": ["**"], "actions": ["push"]}],
         r"^access\[0\]\.users\[0\]: @anonymous may only pull and read the catalog, not push"),
        (None, [{"users": ["@anonymous"], "repositories": ["**"], "actions": ["delete"]}],
         r"not delete"),
        (None, [{"users": ["*"], "actions": ["pull"], "repositories": ["**"],
                 "networks": ["10.0.0.1/8"]}], r"^access\[0\]\.networks\[0\]: '10.0.0.1/8'"),
        (None, [{"users": ["*"], "actions": ["pull"], "repositories": ["**"], "networks": []}],
         r"^access\[0\]\.networks: expected at least one"),
    ],
)  # fmt: skip
def test_rule_errors_for_anonymous_and_networks(
    groups: object, rules: object, message: str
) -> None:
    """Guards the configuration errors the new grammar adds."""
    with pytest.raises(ValueError, match=message):
        parse_access(groups, rules)


@pytest.mark.system
def test_pushing_to_anonymous_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    """Guards check-config: @anonymous with push is exit 2 with file:line."""
    config = tmp_path / "proxy.yml"
    config.write_text(
        "htpasswd: /dev/null\naccess:\n"
        '  - {users: ["@anonymous"], repositories: ["**"], actions: [pull, push]}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"{config}:2: access[0].users[0]: @anonymous may only pull" in result.stderr
