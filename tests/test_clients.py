"""The proxy driven by the real clients users run: docker login, skopeo and podman.

Every client runs with a sealed environment (its own HOME, DOCKER_CONFIG, auth file and, for
podman, its own storage), so nothing is read from or left in /root, and over plain HTTP on
loopback (`--tls-verify=false`), which is how the proxy is reached in these tests.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    OCI_MANIFEST,
    Clients,
    Podman,
    Proxy,
    Registry,
    http_status,
    sha256,
    write_oci_layout,
)
from tests.support import basic_auth as basic

BIG_LAYER_BYTES = 4 << 20


@pytest.fixture
def clients(tmp_path: Path, proxy: Proxy) -> Clients:
    return Clients(tmp_path / "clients", proxy)


@pytest.fixture
def podman(clients: Clients, tmp_path: Path) -> Iterator[Podman]:
    rundir = Path(tempfile.mkdtemp(prefix="podman-run-", dir="/tmp"))
    try:
        yield Podman(clients, tmp_path / "podman", rundir)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def unique_repo(purpose: str) -> str:
    """A repository name no other test (or earlier run against the same registry) uses."""
    return f"clients/{purpose}-{secrets.token_hex(4)}"


def image_layers(seed: str) -> list[Mapping[str, bytes]]:
    """Three layers, one of them a few MiB of incompressible bytes, distinct for each seed."""
    rng = random.Random(seed)
    return [
        {"etc/motd": f"built for {seed}\n".encode()},
        {"opt/big.bin": rng.randbytes(BIG_LAYER_BYTES)},
        {"usr/share/doc/readme": (seed.encode() + b"\n") * 500, "usr/bin/tool": b"#!/bin/sh\n"},
    ]


class Layout:
    """An OCI layout written by `write_oci_layout`, with its digests at hand."""

    def __init__(self, directory: Path, tag: str, seed: str) -> None:
        self.directory = directory
        self.tag = tag
        self.layers = write_oci_layout(directory, tag, image_layers(seed))
        index = json.loads((directory / "index.json").read_text())
        self.manifest_digest: str = index["manifests"][0]["digest"]
        self.manifest: dict[str, Any] = json.loads(self.blob(self.manifest_digest))
        self.config_digest: str = self.manifest["config"]["digest"]
        config = json.loads(self.blob(self.config_digest))
        self.diff_ids: list[str] = config["rootfs"]["diff_ids"]

    @property
    def ref(self) -> str:
        return f"oci:{self.directory}:{self.tag}"

    def blob(self, digest: str) -> bytes:
        return (self.directory / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def stored_auths(config_file: Path) -> dict[str, Any]:
    """The `auths` table of a docker config.json / containers auth.json (empty if absent)."""
    if not config_file.exists():
        return {}
    auths: dict[str, Any] = json.loads(config_file.read_text()).get("auths", {})
    return auths


def registry_paths(registry: Registry) -> Path:
    return registry.root / "data" / "docker" / "registry" / "v2"


def stored_blob(registry: Registry, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    return registry_paths(registry) / "blobs" / "sha256" / hex_digest[:2] / hex_digest / "data"


# --- docker login


@pytest.mark.parametrize("user", ["alice", "bob", "carol"])
def test_docker_login_stores_credentials(
    proxy: Proxy, users: dict[str, str], clients: Clients, user: str
) -> None:
    """Each htpasswd scheme (bcrypt, apr1, SHA) lets `docker login` succeed."""
    clients.ok("docker", "login", proxy.host, "-u", user, "--password-stdin", stdin=users[user])

    auths = stored_auths(clients.docker_config / "config.json")
    assert proxy.host in auths, f"no auth entry for {proxy.host} in {auths}"
    assert base64.b64decode(auths[proxy.host]["auth"]).decode() == f"{user}:{users[user]}"


@pytest.mark.parametrize(
    ("user", "password"),
    [("alice", "not-alice-secret"), ("mallory", None)],
    ids=["wrong-password", "unknown-user"],
)
def test_docker_login_refuses_bad_credentials(
    proxy: Proxy, users: dict[str, str], clients: Clients, user: str, password: str | None
) -> None:
    """A wrong password, or an unknown user with another user's password, is refused."""
    password = users["alice"] if password is None else password
    clients.fails("docker", "login", proxy.host, "-u", user, "--password-stdin", stdin=password)

    assert proxy.host not in stored_auths(clients.docker_config / "config.json")
    # Control: the refusal was about the credentials, not the client setup.
    clients.ok(
        "docker", "login", proxy.host, "-u", "alice", "--password-stdin", stdin=users["alice"]
    )


# --- skopeo


def test_skopeo_push_inspect_pull_and_delete(
    proxy: Proxy, users: dict[str, str], clients: Clients, tmp_path: Path
) -> None:
    """A multi-layer image goes in, is described correctly, comes out byte for byte, is deleted.

    bob's password contains a colon and spaces, which `--creds user:password` must carry intact.
    """
    layout = Layout(tmp_path / "layout", "v1", "skopeo-roundtrip")
    repo = unique_repo("skopeo")
    ref = f"docker://{proxy.host}/{repo}"
    creds = f"bob:{users['bob']}"
    tls = "--tls-verify=false"

    clients.ok(
        "skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", creds, layout.ref, f"{ref}:v1"
    )
    # A second tag, registry to registry: every blob is already there.
    clients.ok(
        "skopeo",
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-creds",
        creds,
        "--dest-creds",
        creds,
        f"{ref}:v1",
        f"{ref}:v2",
    )

    info = json.loads(clients.ok("skopeo", "inspect", tls, "--creds", creds, f"{ref}:v1").stdout)
    assert info["Digest"] == layout.manifest_digest
    assert info["Layers"] == layout.layers
    raw = clients.ok("skopeo", "inspect", "--raw", tls, "--creds", creds, f"{ref}:v2").stdout
    assert sha256(raw.encode()) == layout.manifest_digest

    tags = json.loads(clients.ok("skopeo", "list-tags", tls, "--creds", creds, ref).stdout)
    assert sorted(tags["Tags"]) == ["v1", "v2"]

    out = tmp_path / "pulled"
    clients.ok(
        "skopeo", "copy", "--src-tls-verify=false", "--src-creds", creds, f"{ref}:v1", f"dir:{out}"
    )
    assert (out / "manifest.json").read_bytes() == layout.blob(layout.manifest_digest)
    for digest in [*layout.layers, layout.config_digest]:
        pulled = (out / digest.removeprefix("sha256:")).read_bytes()
        assert pulled == layout.blob(digest), f"blob {digest} differs after the round trip"

    manifest_url = f"{proxy.url}/v2/{repo}/manifests/v1"
    headers = {**basic("bob", users["bob"]), "Accept": OCI_MANIFEST}
    assert http_status(manifest_url, headers) == 200

    clients.ok("skopeo", "delete", tls, "--creds", creds, f"{ref}:v1")

    clients.fails("skopeo", "inspect", tls, "--creds", creds, f"{ref}:v1")
    clients.fails("skopeo", "inspect", tls, "--creds", creds, f"{ref}:v2")
    # The failure is the deletion, not a refused login: the same credentials still get a 404.
    assert http_status(manifest_url, headers) == 404
    tags = json.loads(clients.ok("skopeo", "list-tags", tls, "--creds", creds, ref).stdout)
    assert not tags["Tags"]


@pytest.mark.parametrize(
    "creds",
    [["--dest-creds", "alice:not-alice-secret"], ["--dest-creds", "mallory:x"], []],
    ids=["wrong-password", "unknown-user", "no-credentials"],
)
def test_skopeo_push_with_bad_credentials_stores_nothing(
    proxy: Proxy,
    registry: Registry,
    users: dict[str, str],
    clients: Clients,
    tmp_path: Path,
    creds: list[str],
) -> None:
    layout = Layout(tmp_path / "layout", "v1", f"skopeo-refused-{'-'.join(creds)}")
    repo = unique_repo("refused")
    ref = f"docker://{proxy.host}/{repo}:v1"

    clients.fails("skopeo", "copy", "--dest-tls-verify=false", *creds, layout.ref, ref)

    assert not (registry_paths(registry) / "repositories" / repo).exists()
    for digest in [*layout.layers, layout.config_digest]:
        assert not stored_blob(registry, digest).exists(), f"blob {digest} reached the registry"
    leaked = [uri for uri in registry.requested_uris() if repo in uri]
    assert not leaked, f"the registry saw requests for {repo}: {leaked}"

    # Control: the same push with good credentials goes through.
    good = ["--dest-creds", f"alice:{users['alice']}"]
    clients.ok("skopeo", "copy", "--dest-tls-verify=false", *good, layout.ref, ref)
    assert stored_blob(registry, layout.layers[1]).exists()


# --- podman


def test_podman_login_pull_tag_push(
    proxy: Proxy, users: dict[str, str], clients: Clients, podman: Podman, tmp_path: Path
) -> None:
    """skopeo pushes, podman logs in, pulls, re-tags and pushes; skopeo checks the result."""
    layout = Layout(tmp_path / "layout", "v1", "podman-roundtrip")
    source = f"{proxy.host}/{unique_repo('podman-src')}:v1"
    target = f"{proxy.host}/{unique_repo('podman-dst')}:v2"
    alice = f"alice:{users['alice']}"
    authfile = str(tmp_path / "podman-auth.json")
    tls = "--tls-verify=false"

    clients.ok(
        "skopeo",
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        alice,
        layout.ref,
        f"docker://{source}",
    )

    login = ("login", tls, "--authfile", authfile, "--password-stdin")
    podman.ok(*login, "-u", "carol", proxy.host, stdin=users["carol"])
    auths = stored_auths(Path(authfile))
    assert base64.b64decode(auths[proxy.host]["auth"]).decode() == f"carol:{users['carol']}"

    podman.ok("pull", "-q", tls, "--authfile", authfile, source)
    image_id = podman.ok("image", "inspect", "--format", "{{.Id}}", source).stdout.strip()
    assert f"sha256:{image_id}" == layout.config_digest

    podman.ok("tag", source, target)
    podman.ok("push", "-q", tls, "--authfile", authfile, target)

    manifest = json.loads(
        clients.ok("skopeo", "inspect", "--raw", tls, "--creds", alice, f"docker://{target}").stdout
    )
    assert manifest["config"]["digest"] == layout.config_digest
    assert len(manifest["layers"]) == len(layout.layers)
    # podman may reuse the pulled compressed blobs or recompress; either way the layer
    # contents must be the original ones, so compare them uncompressed against the diff IDs.
    out = tmp_path / "pushed"
    pull = ("skopeo", "copy", "--src-tls-verify=false", "--src-creds", alice)
    clients.ok(*pull, f"docker://{target}", f"dir:{out}")
    for descriptor, diff_id in zip(manifest["layers"], layout.diff_ids, strict=True):
        blob = (out / descriptor["digest"].removeprefix("sha256:")).read_bytes()
        assert sha256(blob) == descriptor["digest"]
        assert sha256(gzip.decompress(blob)) == diff_id


@pytest.mark.parametrize(
    ("user", "password"),
    [("carol", "not-carol-sha1"), ("mallory", None)],
    ids=["wrong-password", "unknown-user"],
)
def test_podman_login_refuses_bad_credentials(
    proxy: Proxy,
    users: dict[str, str],
    podman: Podman,
    tmp_path: Path,
    user: str,
    password: str | None,
) -> None:
    password = users["carol"] if password is None else password
    authfile = tmp_path / "podman-auth.json"
    login = ("login", "--tls-verify=false", "--authfile", str(authfile), "--password-stdin")
    podman.fails(*login, "-u", user, proxy.host, stdin=password)

    assert proxy.host not in stored_auths(authfile)
    # Control: the refusal was about the credentials, not podman's setup.
    podman.ok(*login, "-u", "carol", proxy.host, stdin=users["carol"])
    assert proxy.host in stored_auths(authfile)
