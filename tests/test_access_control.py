"""Access rules, read-only mode and the password-guessing throttle, against the real registry."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import (
    Proxy,
    Registry,
    basic_auth,
    call,
    htpasswd,
    push_blob,
    push_image,
    wait_until,
    write_oci_layout,
)

# Every test runs against the team's registry and proxy.
pytestmark = pytest.mark.system

PASSWORDS = {"ci-bot": "ci-secret", "alice": "alice-secret", "mallory": "mallory-secret"}
RULES = """
groups:
  ci: [ci-bot]
  team-a: [alice]
access:
  - {users: ["@ci"], repositories: ["**"], actions: [pull]}
  - {users: ["@team-a"], repositories: ["team-a/**"], actions: [pull, push, delete]}
  - {users: ["*"], actions: [catalog]}
"""


def basic(user: str) -> dict[str, str]:
    return basic_auth(user, PASSWORDS[user])


@pytest.fixture(scope="module")
def team_htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("team") / "htpasswd"
    for user, password in PASSWORDS.items():
        htpasswd(path, "-B", "-C", "4", user=user, password=password)
    return path


@pytest.fixture(scope="module")
def team(
    tmp_path_factory: pytest.TempPathFactory, team_htpasswd: Path
) -> Iterator[tuple[Registry, Proxy]]:
    """A registry of its own with team-a/app and team-b/app, behind a proxy with RULES."""
    root = tmp_path_factory.mktemp("access")
    registry = Registry(root / "registry")
    registry.start()
    for repo in ("team-a/app", "team-b/app", "team-b/lib"):
        push_image(registry.url, repo)
    config = root / "proxy.yml"
    config.write_text(RULES)
    proxy = Proxy(root / "proxy", registry.url, team_htpasswd,
                  {"PROXY_CONFIG": str(config), "PROXY_AUTH_MAX_FAILURES": "1000000"})  # fmt: skip
    proxy.start()
    yield registry, proxy
    proxy.stop()
    registry.stop()


def skopeo(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    layout = tmp_path / "image"
    write_oci_layout(layout, "v1", [{"a.txt": os.urandom(4096)}, {"b.txt": os.urandom(4096)}])
    return layout


@pytest.mark.parametrize(
    ("user", "repo", "allowed"),
    [
        ("alice", "team-a/web", True),  # namespace owner
        ("alice", "team-b/web", False),
        ("ci-bot", "team-a/ci", False),  # pull-only
        ("mallory", "team-a/evil", False),  # stranger
    ],
)
def test_push_matrix_with_skopeo(
    team: tuple[Registry, Proxy], image: Path, tmp_path: Path, user: str, repo: str, allowed: bool
) -> None:
    registry, proxy = team
    name = f"{repo}-{uuid.uuid4().hex[:6]}"
    creds = f"{user}:{PASSWORDS[user]}"
    destination = f"docker://{proxy.host}/{name}:v1"
    result = skopeo("copy", "--dest-tls-verify=false", "--dest-creds", creds,
                    f"oci:{image}:v1", destination, home=tmp_path)  # fmt: skip
    assert (result.returncode == 0) == allowed, result.stderr
    # Whatever the client saw, the registry agrees: the tag exists only for allowed pushes.
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    status, _, _ = call(f"{registry.url}/v2/{name}/manifests/v1", "HEAD", accept)
    assert (status == 200) == allowed
    if not allowed:
        assert "403" in result.stderr or "denied" in result.stderr


@pytest.mark.parametrize(
    ("user", "repo", "allowed"),
    [
        ("alice", "team-a/pulled", True),
        ("ci-bot", "team-a/pulled", True),  # CI pulls everything
        ("ci-bot", "team-b/pulled", True),
        ("alice", "team-b/pulled", False),
        ("mallory", "team-a/pulled", False),
    ],
)
def test_pull_matrix_with_skopeo(
    team: tuple[Registry, Proxy], image: Path, tmp_path: Path, user: str, repo: str, allowed: bool
) -> None:
    registry, proxy = team
    seeded = skopeo("copy", "--dest-tls-verify=false", f"oci:{image}:v1", f"docker://127.0.0.1:{registry.port}/{repo}:v1",
                    home=tmp_path)  # fmt: skip
    assert seeded.returncode == 0, seeded.stderr
    creds = f"{user}:{PASSWORDS[user]}"
    source = f"docker://{proxy.host}/{repo}:v1"
    result = skopeo("copy", "--src-tls-verify=false", "--src-creds", creds,
                    source, f"dir:{tmp_path / 'out'}", home=tmp_path)  # fmt: skip
    assert (result.returncode == 0) == allowed, result.stderr


@pytest.mark.parametrize(
    ("user", "allowed"), [("alice", True), ("ci-bot", False), ("mallory", False)]
)
def test_delete_needs_the_delete_right(
    team: tuple[Registry, Proxy], user: str, allowed: bool
) -> None:
    registry, proxy = team
    repo = f"team-a/del-{uuid.uuid4().hex[:6]}"
    digest = push_blob(registry.url, repo, os.urandom(64))
    status, _, body = call(f"{proxy.url}/v2/{repo}/blobs/{digest}", "DELETE", basic(user))
    assert status == (202 if allowed else 403), body
    if not allowed:
        assert json.loads(body)["errors"][0]["code"] == "DENIED"
    assert call(f"{registry.url}/v2/{repo}/blobs/{digest}", "HEAD")[0] == (404 if allowed else 200)


def test_denied_requests_never_reach_the_registry(team: tuple[Registry, Proxy]) -> None:
    registry, proxy = team
    marker = f"team-b/denied-{uuid.uuid4().hex[:8]}"
    assert call(f"{proxy.url}/v2/{marker}/blobs/uploads/", "POST", basic("alice"))[0] == 403
    assert call(f"{proxy.url}/v2/{marker}/tags/list", "GET", basic("mallory"))[0] == 403
    sentinel = f"/v2/team-a/sentinel-{uuid.uuid4().hex[:8]}/tags/list"
    call(proxy.url + sentinel, headers=basic("alice"))
    wait_until(lambda: sentinel in registry.requested_uris(), "the sentinel in the registry log")
    assert not [uri for uri in registry.requested_uris() if marker in uri]


@pytest.mark.parametrize(
    ("user", "visible"),
    [
        ("ci-bot", {"team-a/app", "team-b/app", "team-b/lib"}),
        ("alice", {"team-a/app"}),
        ("mallory", set()),
    ],
)
def test_catalog_shows_only_pullable_repositories(
    team: tuple[Registry, Proxy], user: str, visible: set[str]
) -> None:
    _, proxy = team
    status, _, body = call(f"{proxy.url}/v2/_catalog", headers=basic(user))
    assert status == 200
    seen = set(json.loads(body)["repositories"])
    assert visible <= seen
    if user != "ci-bot":  # other tests add repositories; only those the user may pull show
        assert {
            repo for repo in seen if not repo.startswith("team-a/") or user == "mallory"
        } == set()


def test_catalog_pages_never_name_a_hidden_repository(team: tuple[Registry, Proxy]) -> None:
    _, proxy = team
    seen: list[str] = []
    url = f"{proxy.url}/v2/_catalog?n=1"
    for _ in range(50):
        status, headers, body = call(url, headers=basic("alice"))
        assert status == 200
        seen += json.loads(body)["repositories"]
        link = headers.get("Link")
        if not link:
            break
        assert "team-b" not in link
        url = proxy.url + link.split(">")[0].lstrip("<")
    assert seen and all(repo.startswith("team-a/") for repo in seen)


def test_catalog_n_is_capped_before_the_registry(team: tuple[Registry, Proxy]) -> None:
    registry, proxy = team
    assert call(f"{proxy.url}/v2/_catalog?n=100000000", headers=basic("ci-bot"))[0] == 200
    wait_until(
        lambda: any(uri.startswith("/v2/_catalog?n=1000") for uri in registry.requested_uris()),
        "capped",
    )
    assert not [uri for uri in registry.requested_uris() if "n=100000000" in uri]


def test_mount_needs_pull_on_the_source(team: tuple[Registry, Proxy]) -> None:
    registry, proxy = team
    secret = os.urandom(128)
    digest = push_blob(registry.url, "team-b/app", secret)
    target = f"team-a/mount-{uuid.uuid4().hex[:6]}"
    url = (
        f"{proxy.url}/v2/{target}/blobs/uploads/?mount={digest.replace(':', '%3A')}&from=team-b/app"
    )
    status, headers, _ = call(url, "POST", basic("alice"))
    # alice may not pull team-b/app: a plain upload starts instead of the mount.
    assert status == 202
    assert "/blobs/uploads/" in headers["Location"]
    assert call(f"{registry.url}/v2/{target}/blobs/{digest}", "HEAD")[0] == 404

    # With pull on the source (its own namespace), the mount happens.
    own = push_blob(registry.url, "team-a/app", os.urandom(128))
    url = f"{proxy.url}/v2/{target}/blobs/uploads/?mount={own.replace(':', '%3A')}&from=team-a/app"
    assert call(url, "POST", basic("alice"))[0] == 201
    assert call(f"{registry.url}/v2/{target}/blobs/{own}", "HEAD")[0] == 200


# --- Read-only mode.


def test_read_only_blocks_writes_and_keeps_pulls(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    repo = f"ro/{uuid.uuid4().hex[:6]}"
    digest = push_blob(registry.url, repo, b"kept")
    proxy = start_proxy(registry.url, PROXY_READ_ONLY="true")
    auth = basic_auth("alice", users["alice"])
    assert call(f"{proxy.url}/v2/{repo}/blobs/{digest}", headers=auth)[:3:2] == (200, b"kept")
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        status, _, body = call(
            f"{proxy.url}/v2/{repo}/blobs/uploads/",
            method,
            auth,
            b"" if method != "DELETE" else None,
        )
        assert status == 405, method
        assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_sighup_switches_read_only_and_rules_without_dropping_connections(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "proxy.yml"
    config.write_text("read_only: false\n")
    proxy = start_proxy(registry.url, PROXY_CONFIG=str(config))
    auth = basic_auth("alice", users["alice"])
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request("POST", "/v2/hup/app/blobs/uploads/", headers=auth)
    response = connection.getresponse()
    response.read()
    assert response.status == 202

    config.write_text(
        "read_only: true\naccess:\n  - {users: [bob], repositories: ['**'], actions: [pull]}\n"
    )
    assert proxy.process is not None
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: "access reloaded (SIGHUP)" in proxy.log(), "the SIGHUP reload")

    # The same kept-alive connection now gets the new answers.
    connection.request("POST", "/v2/hup/app/blobs/uploads/", headers=auth)
    response = connection.getresponse()
    response.read()
    assert response.status == 405
    connection.request("GET", "/v2/hup/app/tags/list", headers=auth)
    response = connection.getresponse()
    response.read()
    assert response.status == 403  # alice is named by no rule now
    connection.close()


# --- Password-guessing throttle.


def test_throttle_blocks_guessing_without_hashing_and_expires(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    proxy = start_proxy(registry.url, PROXY_AUTH_MAX_FAILURES="3", PROXY_AUTH_BLOCK="1.5")
    good = {
        "Authorization": "Basic " + base64.b64encode(f"alice:{users['alice']}".encode()).decode()
    }
    assert call(proxy.url + "/v2/", headers=good)[0] == 200  # alice's login is now cached

    # Pings without credentials (every docker pull starts with one) never count.
    for _ in range(20):
        assert call(proxy.url + "/v2/")[0] == 401
    for i in range(3):
        wrong = {"Authorization": "Basic " + base64.b64encode(f"bob:guess{i}".encode()).decode()}
        assert call(proxy.url + "/v2/", headers=wrong)[0] == 401

    hashed = hash_count(proxy)
    status, headers, body = call(
        proxy.url + "/v2/",
        headers={"Authorization": "Basic " + base64.b64encode(b"bob:again").decode()},
    )
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    # bob's real password is refused too while the address is blocked, and no hash ran for either.
    bob = {"Authorization": "Basic " + base64.b64encode(f"bob:{users['bob']}".encode()).decode()}
    assert call(proxy.url + "/v2/", headers=bob)[0] == 429
    assert hash_count(proxy) == hashed
    # Credentials that already succeeded keep working: a guesser cannot lock alice out.
    assert call(proxy.url + "/v2/", headers=good)[0] == 200

    wait_until(lambda: call(proxy.url + "/v2/", headers=bob)[0] == 200, "the block to expire")


def hash_count(proxy: Proxy) -> float:
    _, _, body = call(proxy.admin_url + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith("registry_proxy_password_check_duration_seconds_count "):
            return float(line.split()[1])
    raise AssertionError("no password check histogram")


def test_rules_naming_unknown_users_are_reported(
    registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    rules = '[{users: [alice, ghost], repositories: ["**"], actions: [pull]}]'
    proxy = start_proxy(registry.url, PROXY_ACCESS=rules)
    assert "access rules name users not in the htpasswd file: ghost" in proxy.log()
