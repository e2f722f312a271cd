"""Immutable tags against the real registry, with skopeo: a release tag never moves or goes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.access.immutable import parse_immutable_tags
from tests.support import (
    Proxy,
    Registry,
    basic_auth,
    call,
    htpasswd,
    push_image,
    wait_until,
    write_oci_layout,
)

PASSWORD = "alice-secret"
CONFIG = """
immutable_tags:
  - {repositories: ["**"], tags: ["v*"]}
"""
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Proxy, Path]]:
    """A registry behind a proxy whose `v*` tags are immutable (alice may do everything)."""
    root = tmp_path_factory.mktemp("immutable")
    registry = Registry(root / "registry")
    registry.start()
    passwd = root / "htpasswd"
    htpasswd(passwd, "-B", "-C", "4", user="alice", password=PASSWORD)
    config = root / "proxy.yml"
    config.write_text(CONFIG)
    proxy = Proxy(root / "proxy", registry.url, passwd, {"PROXY_CONFIG": str(config)})
    proxy.start()
    yield registry, proxy, config
    proxy.stop()
    registry.stop()


def skopeo(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120, env=env)


def image(directory: Path) -> Path:
    write_oci_layout(directory, "v1", [{"file.txt": os.urandom(2048)}])
    return directory


def push(source: Path, destination: str, home: Path) -> subprocess.CompletedProcess[str]:
    return skopeo("copy", "--dest-tls-verify=false", "--dest-creds", f"alice:{PASSWORD}",
                  f"oci:{source}:v1", destination, home=home)  # fmt: skip


def digest_of(registry: Registry, repo: str, tag: str) -> str | None:
    status, headers, _ = call(f"{registry.url}/v2/{repo}/manifests/{tag}", "HEAD", ACCEPT)
    return headers.get("Docker-Content-Digest") if status == 200 else None


def test_a_release_tag_cannot_be_moved_or_deleted_with_skopeo(
    guarded: tuple[Registry, Proxy, Path], tmp_path: Path
) -> None:
    """Guards immutable tags: push v1.0, a different image to v1.0 is refused (the original
    still served), the same image again is allowed, a new tag is allowed, deletes are refused."""
    registry, proxy, _ = guarded
    repo = f"rel/app-{uuid.uuid4().hex[:6]}"
    first, second = image(tmp_path / "first"), image(tmp_path / "second")
    tag = f"docker://{proxy.host}/{repo}:v1.0"

    assert push(first, tag, tmp_path).returncode == 0
    original = digest_of(registry, repo, "v1.0")
    assert original is not None

    moved = push(second, tag, tmp_path)
    assert moved.returncode != 0
    assert "v1.0 is immutable" in moved.stderr, moved.stderr
    assert digest_of(registry, repo, "v1.0") == original
    pulled = skopeo("inspect", "--tls-verify=false", "--creds", f"alice:{PASSWORD}", tag,
                    home=tmp_path)  # fmt: skip
    assert json.loads(pulled.stdout)["Digest"] == original

    assert push(first, tag, tmp_path).returncode == 0  # the same manifest again
    assert push(second, f"docker://{proxy.host}/{repo}:v2.0", tmp_path).returncode == 0
    assert push(second, f"docker://{proxy.host}/{repo}:latest", tmp_path).returncode == 0
    assert push(first, f"docker://{proxy.host}/{repo}:latest", tmp_path).returncode == 0

    # skopeo delete resolves the tag and deletes the manifest by digest.
    deleted = skopeo("delete", "--tls-verify=false", "--creds", f"alice:{PASSWORD}", tag,
                     home=tmp_path)  # fmt: skip
    assert deleted.returncode != 0
    assert "immutable tag v1.0" in deleted.stderr, deleted.stderr
    auth = basic_auth("alice", PASSWORD)
    status, _, body = call(f"{proxy.url}/v2/{repo}/manifests/v1.0", "DELETE", auth)
    assert status == 403 and b"v1.0" in body
    assert digest_of(registry, repo, "v1.0") == original


def test_a_manifest_no_immutable_tag_points_to_can_be_deleted(
    guarded: tuple[Registry, Proxy, Path],
) -> None:
    """Guards against over-refusing: a digest only `latest` names is deleted as usual."""
    registry, proxy, _ = guarded
    repo = f"rel/tmp-{uuid.uuid4().hex[:6]}"
    push_image(registry.url, repo, "v1")
    digest = push_image(registry.url, repo, "latest")
    # push_image writes the same manifest for the same repository: v1 protects it.
    auth = basic_auth("alice", PASSWORD)
    status, _, _ = call(f"{proxy.url}/v2/{repo}/manifests/{digest}", "DELETE", auth)
    assert status == 403
    other = f"rel/other-{uuid.uuid4().hex[:6]}"
    digest = push_image(registry.url, other, "latest")
    status, _, body = call(f"{proxy.url}/v2/{other}/manifests/{digest}", "DELETE", auth)
    assert status == 202, body
    assert digest_of(registry, other, "latest") is None


def test_sighup_rereads_immutable_tags(
    guarded: tuple[Registry, Proxy, Path], tmp_path: Path
) -> None:
    """Guards the reload: after SIGHUP, `rc*` tags are fixed too."""
    _, proxy, config = guarded
    repo = f"rel/rc-{uuid.uuid4().hex[:6]}"
    first, second = image(tmp_path / "first"), image(tmp_path / "second")
    tag = f"docker://{proxy.host}/{repo}:rc1"
    assert push(first, tag, tmp_path).returncode == 0
    config.write_text(CONFIG + '  - {repositories: ["rel/**"], tags: ["rc*"]}\n')
    reloads = proxy.log().count("access reloaded (SIGHUP)")
    assert proxy.process is not None
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: proxy.log().count("access reloaded (SIGHUP)") > reloads, "the reload")
    assert push(second, tag, tmp_path).returncode != 0
    assert push(first, tag, tmp_path).returncode == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", r"^immutable_tags: expected a list"),
        ([{"tags": ["v*"]}], r"^immutable_tags\[0\]\.repositories: expected at least one"),
        ([{"repositories": ["**"], "tags": ["v/1"]}], r"^immutable_tags\[0\]\.tags\[0\]"),
        ([{"repositories": ["**"], "tags": ["v*"], "tag": 1}], r"unknown key 'tag'"),
    ],
)
def test_immutable_tags_errors_name_the_entry(value: object, message: str) -> None:
    """Guards the configuration errors of `immutable_tags`."""
    with pytest.raises(ValueError, match=message):
        parse_immutable_tags(value)


def test_tag_globs() -> None:
    """Guards the tag glob: `*` is any run of tag characters, the rest literal."""
    rules = parse_immutable_tags([{"repositories": ["team/*"], "tags": ["v*", "stable"]}])
    assert rules.fixed("team/app", "v1.2.3") and rules.fixed("team/app", "stable")
    assert not rules.fixed("team/app", "latest") and not rules.fixed("team/app", "xv1")
    assert not rules.fixed("other/app", "v1")
