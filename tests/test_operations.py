"""Running unattended: metrics, probes, access log, hot reload, TLS, trusted proxies, drain."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from passlib.hash import bcrypt

from tests.support import (
    Proxy,
    Registry,
    call,
    htpasswd,
    http_status,
    push_blob,
    scrape,
    sha256,
    start_download,
    value,
    wait_until,
    write_certificate,
    write_oci_layout,
)
from tests.support import basic_auth as basic

# The proxy polls files every second; users are promised 2 s. The margin absorbs a busy machine.
RELOAD_DEADLINE = 2.5


def test_metrics_move_with_a_push_and_a_pull(proxy: Proxy, users: dict[str, str]) -> None:
    auth = basic("alice", users["alice"])
    before = scrape(proxy)
    blob = os.urandom(256 * 1024)
    repo = f"metrics/{uuid.uuid4().hex[:8]}"
    digest = push_blob(proxy.url, repo, blob, auth)
    status, _, body = call(f"{proxy.url}/v2/{repo}/blobs/{digest}", headers=auth)
    assert status == 200 and body == blob
    assert call(proxy.url + "/v2/")[0] == 401
    call(proxy.url + "/v2/", headers=basic("alice", "wrong"))
    after = scrape(proxy)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "registry_proxy_requests_total"
    assert grew(requests, method="POST", action="upload", status_class="2xx", code="202") == 1
    assert grew(requests, method="PUT", action="upload", status_class="2xx", code="201") == 1
    assert grew(requests, method="GET", action="blob", status_class="2xx", code="200") == 1
    assert grew(requests, method="GET", action="ping", status_class="4xx", code="401") == 2
    assert grew("registry_proxy_received_bytes_total", action="upload") >= len(blob)
    assert grew("registry_proxy_sent_bytes_total", action="blob") >= len(blob)
    assert grew("registry_proxy_request_duration_seconds_count", action="blob") == 1
    assert grew("registry_proxy_auth_total", outcome="no_credentials") == 1
    assert grew("registry_proxy_auth_total", outcome="bad_credentials") == 1
    assert (
        grew("registry_proxy_auth_total", outcome="success")
        + grew("registry_proxy_auth_total", outcome="cached")
        == 3
    )
    assert value(after, "registry_proxy_users") == 3
    assert value(after, "registry_proxy_upstream_up") == 1

    # Labels are bounded: no user, repository or digest ever appears.
    _, _, text = call(proxy.admin_url + "/metrics")
    for secret in ["alice", repo, digest.split(":")[1], users["alice"]]:
        assert secret not in text.decode()


def test_metrics_pass_promtool(proxy: Proxy) -> None:
    _, _, text = call(proxy.admin_url + "/metrics")
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_access_log_has_one_json_line_per_request_without_secrets(
    proxy: Proxy, users: dict[str, str]
) -> None:
    auth = basic("alice", users["alice"])
    repo = f"audit/{uuid.uuid4().hex[:8]}"
    digest = push_blob(proxy.url, repo, b"audited bytes", auth)

    def records() -> list[dict[str, object]]:
        found = []
        for line in proxy.log().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record["repository"] == repo:
                    found.append(record)
        return found

    wait_until(lambda: len(records()) == 2, "two access records for the push")
    post, put = records()
    assert post["method"] == "POST" and post["action"] == "upload" and post["status"] == 202
    assert put["user"] == "alice" and put["client"] == "127.0.0.1"
    assert put["bytes_in"] == len(b"audited bytes") and put["upstream_status"] == 201
    assert isinstance(put["duration_ms"], float) and isinstance(put["bytes_out"], int)
    assert put["digest"] == digest
    log = proxy.log()
    assert "_state" not in log
    assert users["alice"] not in log
    assert auth["Authorization"].split()[1] not in log
    assert "digest=" not in log  # the digest field is read from the query, never the query


def test_readyz_follows_the_upstream(
    tmp_path: Path, htpasswd_file: Path, start_proxy: Callable[..., Proxy]
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.start()
    try:
        proxy = start_proxy(registry.url, PROXY_UPSTREAM_PROBE_INTERVAL="0.2")
        wait_until(lambda: http_status(proxy.admin_url + "/readyz") == 200, "ready")
        registry.stop()
        wait_until(lambda: http_status(proxy.admin_url + "/readyz") == 503, "not ready")
        assert http_status(proxy.admin_url + "/healthz") == 200
    finally:
        registry.stop()


@pytest.fixture
def own_htpasswd(tmp_path: Path, htpasswd_file: Path) -> Path:
    path = tmp_path / "htpasswd"
    shutil.copy(htpasswd_file, path)
    return path


def can_log_in(proxy: Proxy, user: str, password: str) -> bool:
    return http_status(proxy.url + "/v2/", basic(user, password)) == 200


def test_added_user_logs_in_and_removed_user_is_refused_within_2s(
    own_htpasswd: Path, registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    proxy = start_proxy(registry.url, htpasswd=own_htpasswd)
    assert not can_log_in(proxy, "dave", "dave-pw")
    # In place, as `htpasswd` itself writes.
    htpasswd(own_htpasswd, "-B", "-C", "5", user="dave", password="dave-pw")
    wait_until(lambda: can_log_in(proxy, "dave", "dave-pw"), "dave to log in", RELOAD_DEADLINE)

    # Replaced by rename, as Swarm and Kubernetes secrets are; alice's login is cached now.
    assert can_log_in(proxy, "alice", users["alice"])
    replacement = own_htpasswd.with_suffix(".new")
    kept = [line for line in own_htpasswd.read_text().splitlines() if not line.startswith("alice:")]
    replacement.write_text("\n".join(kept) + "\n")
    os.replace(replacement, own_htpasswd)
    wait_until(
        lambda: not can_log_in(proxy, "alice", users["alice"]),
        "alice to be refused",
        RELOAD_DEADLINE,
    )
    assert can_log_in(proxy, "dave", "dave-pw")
    assert value(scrape(proxy), "registry_proxy_users") == 3


def test_garbled_file_keeps_the_last_good_table(
    own_htpasswd: Path, registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    proxy = start_proxy(registry.url, htpasswd=own_htpasswd)
    failures = value(scrape(proxy), "registry_proxy_htpasswd_reloads_total", result="failure")
    own_htpasswd.write_text("alice:$2y$05$trunc\nmallory:plaintext\n")
    wait_until(
        lambda: (
            value(scrape(proxy), "registry_proxy_htpasswd_reloads_total", result="failure")
            > failures
        ),
        "the failed reload to show in the metrics",
        RELOAD_DEADLINE,
    )
    assert f"{own_htpasswd}:1: malformed bcrypt hash" in proxy.log()
    for user in ["alice", "bob", "carol"]:
        assert can_log_in(proxy, user, users[user])
    assert not can_log_in(proxy, "mallory", "plaintext")


def test_sighup_forces_a_reload(
    own_htpasswd: Path, registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards: SIGHUP swaps in the re-read table and drops cached logins, even for a change the
    file watcher cannot see (same inode, size and mtime), not just that it logs a reload."""
    proxy = start_proxy(registry.url, htpasswd=own_htpasswd)
    assert can_log_in(proxy, "alice", users["alice"])  # now cached
    before = own_htpasswd.stat()
    old_line = next(
        line for line in own_htpasswd.read_text().splitlines() if line.startswith("alice:")
    )
    new_line = "alice:" + bcrypt.using(rounds=5, ident="2y").hash("alice-new-password")
    assert len(new_line) == len(old_line)
    own_htpasswd.write_text(own_htpasswd.read_text().replace(old_line, new_line))
    os.utime(own_htpasswd, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert proxy.process is not None
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: "htpasswd reloaded (SIGHUP): 3 users" in proxy.log(), "the SIGHUP reload")
    assert can_log_in(proxy, "alice", "alice-new-password")
    assert not can_log_in(proxy, "alice", users["alice"])


def test_sighup_names_changed_settings_that_need_a_restart(
    tmp_path: Path, registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards a SIGHUP that silently ignored changed restart-only settings."""
    config = tmp_path / "proxy.yml"
    config.write_text("realm: before\nmax_connections: 100\n")
    proxy = start_proxy(registry.url, PROXY_CONFIG=str(config))
    assert proxy.process is not None
    config.write_text("realm: after\nmax_connections: 200\nread_only: true\n")
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: "read_only=true" in proxy.log(), "the SIGHUP reload")
    expected = "changed but not applied, restart to apply: realm, max_connections\n"
    assert expected in proxy.log()
    # What SIGHUP does apply is not reported as needing a restart.
    config.write_text("realm: after\nmax_connections: 200\n")
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: "read_only=false" in proxy.log(), "the second SIGHUP reload")
    assert proxy.log().count("restart to apply") == 2
    assert "restart to apply: realm, max_connections\n" in proxy.log().split("read_only=true")[1]


def served_certificate(proxy: Proxy, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.fixture
def tls_proxy(
    ca: trustme.CA, tmp_path: Path, registry: Registry, start_proxy: Callable[..., Proxy]
) -> Iterator[tuple[Proxy, Path]]:
    certs = tmp_path / "certs"
    certs.mkdir()
    write_certificate(ca, certs)
    ca.cert_pem.write_to_path(str(certs / "ca.crt"))
    yield (
        start_proxy(
            registry.url,
            PROXY_TLS_CERT=str(certs / "cert.pem"),
            PROXY_TLS_KEY=str(certs / "key.pem"),
        ),
        certs,
    )


def test_tls_serves_https_with_locations_in_https(
    tls_proxy: tuple[Proxy, Path], ca: trustme.CA, users: dict[str, str]
) -> None:
    proxy, _ = tls_proxy
    context = ssl.create_default_context()
    ca.configure_trust(context)
    auth = basic("alice", users["alice"])
    assert call(proxy.url + "/v2/", headers=auth, context=context)[0] == 200
    status, headers, _ = call(proxy.url + "/v2/tls/blobs/uploads/", "POST", auth, context=context)
    assert status == 202
    assert headers["Location"].startswith(f"https://{proxy.host}/v2/tls/blobs/uploads/")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_listener_refuses_a_tls_1_1_handshake(
    tls_proxy: tuple[Proxy, Path], ca: trustme.CA
) -> None:
    """Guards: the running listener (not just a context built for the test) refuses TLS < 1.2,
    even to a client that would accept any cipher."""
    proxy, _ = tls_proxy

    def handshake(highest: ssl.TLSVersion) -> str | None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(context)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = highest
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client's own limits are not the reason
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            return tls.version()

    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_1)


def test_skopeo_and_curl_push_and_pull_over_tls(
    tls_proxy: tuple[Proxy, Path], tmp_path: Path, users: dict[str, str]
) -> None:
    proxy, certs = tls_proxy
    layout = tmp_path / "image"
    write_oci_layout(layout, "v1", [{"hello.txt": os.urandom(64 * 1024)}])
    ref = f"docker://{proxy.host}/tls/app:v1"
    env = {**os.environ, "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)}
    creds = f"bob:{users['bob']}"
    for command in (
        [
            "skopeo",
            "copy",
            "--dest-cert-dir",
            str(certs),
            "--dest-creds",
            creds,
            f"oci:{layout}:v1",
            ref,
        ],
        ["skopeo", "inspect", "--cert-dir", str(certs), "--creds", creds, ref],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
    result = subprocess.run(
        ["curl", "-sS", "--cacert", str(certs / "ca.crt"), "-u", creds,
         f"{proxy.url}/v2/tls/app/tags/list"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert json.loads(result.stdout) == {"name": "tls/app", "tags": ["v1"]}


def test_certificate_is_reloaded_without_dropping_connections(
    tls_proxy: tuple[Proxy, Path], ca: trustme.CA, users: dict[str, str]
) -> None:
    proxy, certs = tls_proxy
    context = ssl.create_default_context()
    ca.configure_trust(context)
    first = served_certificate(proxy, context)
    kept = context.wrap_socket(
        socket.create_connection(("127.0.0.1", proxy.port)), server_hostname="127.0.0.1"
    )
    write_certificate(ca, certs)
    wait_until(
        lambda: served_certificate(proxy, context) != first, "the new certificate", RELOAD_DEADLINE
    )
    # The connection opened before the change still works.
    token = basic("alice", users["alice"])["Authorization"]
    kept.sendall(
        f"GET /v2/ HTTP/1.1\r\nHost: {proxy.host}\r\nAuthorization: {token}\r\n\r\n".encode()
    )
    assert kept.recv(100).startswith(b"HTTP/1.1 200")
    kept.close()


@pytest.mark.parametrize("trusted", [True, False])
def test_forwarded_proto_is_believed_only_from_trusted_proxies(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], trusted: bool
) -> None:
    env = {"PROXY_TRUSTED_PROXIES": "127.0.0.0/8"} if trusted else {}
    proxy = start_proxy(registry.url, **env)
    headers = {
        **basic("alice", users["alice"]),
        "X-Forwarded-Proto": "https",
        "X-Forwarded-For": "203.0.113.7",
    }
    status, reply, _ = call(proxy.url + "/v2/edge/blobs/uploads/", "POST", headers)
    assert status == 202
    scheme = "https" if trusted else "http"
    assert reply["Location"].startswith(f"{scheme}://{proxy.host}/")
    client = "203.0.113.7" if trusted else "127.0.0.1"
    wait_until(
        lambda: f'"client":"{client}"' in proxy.log(), "the access record with the client address"
    )


@pytest.mark.parametrize("fast", ["true", "false"], ids=["fast", "normal"])
def test_sigterm_lets_a_download_finish_and_refuses_new_connections(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], fast: str
) -> None:
    proxy = start_proxy(registry.url, PROXY_FAST_BLOB_RELAY=fast)
    sock, digest, received = start_download(registry, proxy, 48, basic("alice", users["alice"]))
    assert proxy.process is not None
    proxy.process.signal(signal.SIGTERM)
    wait_until(lambda: "stopped accepting" in proxy.log(), "the proxy to stop accepting")

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    assert refused()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    sock.close()
    body = received.split(b"\r\n\r\n", 1)[1]
    assert sha256(body) == digest
    assert proxy.process.wait(30) == 0
    assert "all requests finished" in proxy.log()


@pytest.mark.parametrize("fast", ["true", "false"], ids=["fast", "normal"])
def test_drain_deadline_cuts_what_is_left_and_says_so(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], fast: str
) -> None:
    proxy = start_proxy(registry.url, PROXY_SHUTDOWN_TIMEOUT="0.5", PROXY_FAST_BLOB_RELAY=fast)
    sock, _, _ = start_download(registry, proxy, 32, basic("alice", users["alice"]))
    assert proxy.process is not None
    started = time.monotonic()
    proxy.process.signal(signal.SIGTERM)
    # The client reads nothing more, so the transfer cannot finish: it is cut at the deadline.
    assert proxy.process.wait(30) == 0
    assert time.monotonic() - started < 10
    assert "cutting 1 requests in progress" in proxy.log()
    sock.close()


def test_drain_turns_readyz_503_and_closes_idle_connections_at_once(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards the drain's first steps: /readyz answers 503 (so the edge stops sending) and idle
    keep-alive connections are closed at once, not when the drain deadline ends."""
    proxy = start_proxy(registry.url)
    auth = basic("alice", users["alice"])
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request("GET", "/v2/", headers=auth)
    response = connection.getresponse()
    response.read()
    assert response.status == 200 and not response.will_close
    idle = connection.sock
    assert idle is not None
    # A download the client does not read keeps the drain going for shutdown_timeout (30 s).
    busy, _, _ = start_download(registry, proxy, 32, auth)
    assert http_status(proxy.admin_url + "/readyz") == 200
    assert proxy.process is not None
    proxy.process.signal(signal.SIGTERM)
    wait_until(lambda: http_status(proxy.admin_url + "/readyz") == 503, "/readyz to say 503", 5)
    idle.settimeout(5)
    assert idle.recv(65536) == b"", "the idle connection was answered instead of closed"
    idle.close()
    busy.close()
    assert proxy.process.wait(30) == 0
