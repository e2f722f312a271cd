"""The proxy in front of the real registry, driven with curl and raw sockets."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import Proxy, Registry, basic_auth, sha256, wait_until


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def curl(url: str, *args: str, auth: tuple[str, str] | None = None, tmp: Path) -> Reply:
    """Run curl; return the final status, lower-cased headers and body."""
    body_file = tmp / f"body-{uuid.uuid4().hex}"
    command = ["curl", "-sS", "-D", "-", "-o", str(body_file), "--max-time", "60", *args]
    if auth:
        command += ["-u", f"{auth[0]}:{auth[1]}"]
    result = subprocess.run([*command, url], capture_output=True, timeout=90, check=True)
    blocks = result.stdout.decode("latin-1").strip().split("\r\n\r\n")
    lines = blocks[-1].split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = body_file.read_bytes() if body_file.exists() else b""
    return Reply(int(lines[0].split()[1]), headers, body)


@pytest.fixture
def alice(users: dict[str, str]) -> tuple[str, str]:
    return "alice", users["alice"]


def assert_challenge(reply: Reply, *, head: bool = False) -> None:
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == 'Basic realm="Registry"'
    assert reply.headers["docker-distribution-api-version"] == "registry/2.0"
    if not head:
        assert reply.headers["content-type"].startswith("application/json")
        errors = reply.json()["errors"]  # type: ignore[index]
        assert errors[0]["code"] == "UNAUTHORIZED"


BAD_AUTH = [
    None,
    ("alice", "wrong password"),
    ("mallory", "whatever"),
    ("", "empty user"),
    ("alice", "x" * 8000),
]


@pytest.mark.parametrize(
    "method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"]
)
@pytest.mark.parametrize(
    "credentials", BAD_AUTH, ids=["none", "wrong", "unknown", "empty-user", "8k"]
)
def test_requests_without_valid_credentials_are_challenged_and_never_forwarded(
    proxy: Proxy,
    registry: Registry,
    alice: tuple[str, str],
    tmp_path: Path,
    method: str,
    credentials: tuple[str, str] | None,
) -> None:
    marker = f"unauth-{uuid.uuid4().hex}"
    for path in [
        "/v2/",
        f"/v2/{marker}/manifests/latest",
        f"/v2/{marker}/blobs/uploads/",
        f"/{marker}",
    ]:
        args = ["-X", method] if method != "HEAD" else ["-I"]
        if method in ("POST", "PUT", "PATCH"):
            args += ["--data-binary", "layer bytes"]
        reply = curl(proxy.url + path, *args, auth=credentials, tmp=tmp_path)
        assert_challenge(reply, head=method == "HEAD")

    # The registry logs requests in order: once a later authenticated request shows up,
    # every earlier one would have too.
    sentinel = f"/v2/sentinel-{uuid.uuid4().hex}/tags/list"
    assert curl(proxy.url + sentinel, auth=alice, tmp=tmp_path).status == 404
    wait_until(lambda: sentinel in registry.requested_uris(), "the sentinel in the registry log")
    assert not [uri for uri in registry.requested_uris() if marker in uri]


@pytest.mark.parametrize(
    "header",
    [
        "Bearer abc.def.ghi",
        "Basic",
        "Basic !!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"alice:pass\x00word").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
        "Digest username=alice",
    ],
)
def test_malformed_authorization_is_401_not_5xx(proxy: Proxy, tmp_path: Path, header: str) -> None:
    reply = curl(proxy.url + "/v2/", "-H", f"Authorization: {header}", tmp=tmp_path)
    assert_challenge(reply)


@pytest.mark.parametrize("user", ["alice", "bob", "carol"])
def test_every_htpasswd_scheme_logs_in(
    proxy: Proxy, users: dict[str, str], tmp_path: Path, user: str
) -> None:
    reply = curl(proxy.url + "/v2/", auth=(user, users[user]), tmp=tmp_path)
    assert reply.status == 200
    assert reply.headers["docker-distribution-api-version"] == "registry/2.0"


@pytest.mark.parametrize(
    "path", ["/", "/metrics", "/healthz", "/v1/_ping", "/v2", "/v2/../etc", "/v2/%2e%2e/x"]
)
def test_paths_outside_the_api_are_404_json_and_not_forwarded(
    proxy: Proxy, registry: Registry, alice: tuple[str, str], tmp_path: Path, path: str
) -> None:
    reply = curl(proxy.url + path, "--path-as-is", auth=alice, tmp=tmp_path)
    assert reply.status == 404
    assert reply.json()["errors"][0]["code"] == "NOT_FOUND"  # type: ignore[index]
    assert not [uri for uri in registry.requested_uris() if uri == path]


def start_upload(proxy: Proxy, repo: str, alice: tuple[str, str], tmp_path: Path) -> str:
    reply = curl(proxy.url + f"/v2/{repo}/blobs/uploads/", "-X", "POST", auth=alice, tmp=tmp_path)
    assert reply.status == 202
    location = reply.headers["location"]
    # Clients keep credentials only if the Location stays on the host they logged in to.
    assert location.startswith(proxy.url + f"/v2/{repo}/blobs/uploads/")
    assert "_state=" in location
    assert reply.headers["docker-upload-uuid"]
    return location


def test_chunked_patch_upload_then_get_head_and_range(
    proxy: Proxy, alice: tuple[str, str], tmp_path: Path
) -> None:
    repo = f"chunked/{uuid.uuid4().hex[:8]}"
    blob = os.urandom(3 * 1024 * 1024 + 17)
    digest = sha256(blob)
    (tmp_path / "blob").write_bytes(blob)

    location = start_upload(proxy, repo, alice, tmp_path)
    patched = curl(
        location,
        "-X", "PATCH",
        "-H", "Transfer-Encoding: chunked",
        "-H", "Content-Type: application/octet-stream",
        "--data-binary", f"@{tmp_path / 'blob'}",
        auth=alice,
        tmp=tmp_path,
    )  # fmt: skip
    assert patched.status == 202, patched.body
    assert patched.headers["range"] == f"0-{len(blob) - 1}"
    finished = curl(
        patched.headers["location"] + f"&digest={digest.replace(':', '%3A')}",
        "-X", "PUT",
        auth=alice,
        tmp=tmp_path,
    )  # fmt: skip
    assert finished.status == 201, finished.body
    assert finished.headers["docker-content-digest"] == digest
    assert finished.headers["location"].startswith(proxy.url + "/v2/")

    blob_url = proxy.url + f"/v2/{repo}/blobs/{digest}"
    got = curl(blob_url, auth=alice, tmp=tmp_path)
    assert got.status == 200
    assert got.body == blob
    assert got.headers["docker-content-digest"] == digest

    # HEAD over a kept-alive connection: any body bytes would corrupt the next response.
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    for _ in range(2):
        connection.request("HEAD", f"/v2/{repo}/blobs/{digest}", headers=basic_auth(*alice))
        head = connection.getresponse()
        assert head.status == 200
        assert head.getheader("Content-Length") == str(len(blob))
        assert head.getheader("Docker-Content-Digest") == digest
        assert head.read() == b""
    connection.close()

    part = curl(blob_url, "-H", "Range: bytes=1000-1999", auth=alice, tmp=tmp_path)
    assert part.status == 206
    assert part.body == blob[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(blob)}"


def test_monolithic_put_with_content_length_keeps_the_query_byte_for_byte(
    proxy: Proxy, registry: Registry, alice: tuple[str, str], tmp_path: Path
) -> None:
    repo = f"mono/{uuid.uuid4().hex[:8]}"
    blob = os.urandom(1024 * 1024)
    digest = sha256(blob)
    (tmp_path / "blob").write_bytes(blob)
    location = start_upload(proxy, repo, alice, tmp_path)
    put_url = location + f"&digest={digest.replace(':', '%3A')}"
    reply = curl(
        put_url,
        "-X", "PUT",
        # Not curl's default form type: the registry would parse the body as a form.
        "-H", "Content-Type: application/octet-stream",
        "--data-binary", f"@{tmp_path / 'blob'}",
        auth=alice,
        tmp=tmp_path,
    )  # fmt: skip
    assert reply.status == 201, reply.body
    assert reply.headers["docker-content-digest"] == digest
    sent = put_url.split(proxy.host, 1)[1]
    assert sent in registry.requested_uris()


def test_upstream_errors_pass_through_unchanged(
    proxy: Proxy, alice: tuple[str, str], tmp_path: Path
) -> None:
    reply = curl(proxy.url + "/v2/nothing/here/manifests/latest", auth=alice, tmp=tmp_path)
    assert reply.status == 404
    assert reply.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"  # type: ignore[index]


def raw_exchange(proxy: Proxy, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(head)
    return sock


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_expect_100_continue_without_credentials_gets_401_before_any_100(proxy: Proxy) -> None:
    head = (
        b"PATCH /v2/expect/blobs/uploads/x HTTP/1.1\r\nHost: " + proxy.host.encode() + b"\r\n"
        b"Content-Length: 1073741824\r\nExpect: 100-continue\r\n\r\n"
    )
    with raw_exchange(proxy, head) as sock:
        reply = read_head(sock)
    assert reply.startswith(b"HTTP/1.1 401 "), reply
    assert b"100 Continue" not in reply


def test_expect_100_continue_with_credentials_continues(
    proxy: Proxy, alice: tuple[str, str], tmp_path: Path
) -> None:
    repo = f"expect/{uuid.uuid4().hex[:8]}"
    location = start_upload(proxy, repo, alice, tmp_path)
    target = location.split(proxy.host, 1)[1]
    token = basic_auth(*alice)["Authorization"]
    body = b"x" * 1000
    head = (
        f"PATCH {target} HTTP/1.1\r\nHost: {proxy.host}\r\nAuthorization: {token}\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with raw_exchange(proxy, head) as sock:
        interim = read_head(sock)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        rest = interim.split(b"\r\n\r\n", 1)[1]
        sock.sendall(body)
        final = rest if b"\r\n\r\n" in rest else rest + read_head(sock)
    assert final.startswith(b"HTTP/1.1 202 "), final
