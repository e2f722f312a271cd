"""The access log as an audit trail: JSON lines on stdout, digests and events, request ids,
escaping of client bytes; and metrics whose labels stay in their fixed sets."""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import signal
import socket
import string
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from proxy.edge.proxy_protocol import REJECT_REASONS
from proxy.log import EscapingFormatter, bounded, escape
from proxy.metrics import AUTH_OUTCOMES, CODES, METHODS, RELOAD_RESULTS, UPSTREAM_ERROR_KINDS
from proxy.paths import Action
from proxy.refusal import Refusal
from proxy.relay.headers import upstream_request_headers
from tests.support import (
    Proxy,
    Registry,
    call,
    http_status,
    push_blob,
    wait_until,
    write_oci_layout,
)

FIELDS = [
    "time", "request_id", "client", "user", "tried_user", "method", "path", "action", "repository",
    "reference", "digest", "event", "mount_from", "status", "upstream_status", "bytes_in",
    "bytes_out", "duration_ms", "upstream_ms", "user_agent", "auth", "decision", "reason",
]  # fmt: skip


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def records(log: str) -> list[dict[str, object]]:
    """Every access record in a proxy's combined output (stderr lines are not JSON objects)."""
    found = []
    for line in log.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            assert list(record) == FIELDS, line
            found.append(record)
    return found


def skopeo(home: Path, *args: str) -> None:
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr


def test_skopeo_push_pull_and_delete_each_write_their_audit_line(
    proxy: Proxy, users: dict[str, str], tmp_path: Path
) -> None:
    """Guards the audit trail: who pushed, pulled and deleted which digest, one JSON line each."""
    layout = tmp_path / "image"
    layers = write_oci_layout(layout, "v1", [{"a.txt": os.urandom(2048)}])
    index = json.loads((layout / "index.json").read_text())
    manifest = index["manifests"][0]["digest"]
    repo = f"audit/{uuid.uuid4().hex[:8]}"
    ref = f"docker://{proxy.host}/{repo}:v1"
    creds = f"alice:{users['alice']}"
    tls = "--dest-tls-verify=false"
    skopeo(tmp_path, "copy", tls, "--dest-creds", creds, f"oci:{layout}:v1", ref)
    skopeo(tmp_path, "copy", "--src-tls-verify=false", "--src-creds", creds, ref,
           f"oci:{tmp_path / 'pulled'}:v1")  # fmt: skip
    skopeo(tmp_path, "delete", "--tls-verify=false", "--creds", creds, ref)

    def events() -> list[dict[str, object]]:
        mine = [r for r in records(proxy.log()) if r["repository"] == repo]
        return [r for r in mine if r["event"] is not None]

    # skopeo delete fetches the manifest first (a pull too) to learn the digest it deletes.
    wait_until(lambda: len(events()) == 4, "the push, pull and delete records")
    push, pull, _, delete = events()
    assert push["event"] == "push" and push["method"] == "PUT" and push["reference"] == "v1"
    assert pull["event"] == "pull" and pull["method"] == "GET"
    assert delete["event"] == "delete" and delete["method"] == "DELETE"
    for record in (push, pull, delete):
        assert record["digest"] == manifest, record
        assert record["user"] == "alice" and record["auth"] in ("success", "cached")
        assert record["decision"] == "allowed" and record["action"] == "manifest"
        assert str(record["user_agent"]).startswith("skopeo/")
        assert isinstance(record["upstream_ms"], float) and record["upstream_status"] in (
            200,
            201,
            202,
        )
    # The layer's upload names its digest (read from the final PUT's query, never logged itself).
    uploads = [r for r in records(proxy.log()) if r["repository"] == repo and r["method"] == "PUT"]
    assert {r["digest"] for r in uploads} >= set(layers)
    assert "_state" not in proxy.log() and users["alice"] not in proxy.log()


def test_a_docker_login_is_a_login_event_and_a_bare_ping_is_not(
    proxy: Proxy, users: dict[str, str]
) -> None:
    """Guards the login event: only a /v2/ whose credentials were checked and good."""
    agent = f"login-test/{uuid.uuid4().hex}"
    assert call(proxy.url + "/v2/", headers={"User-Agent": agent})[0] == 401
    status, reply, _ = call(
        proxy.url + "/v2/", headers={**basic("bob", users["bob"]), "User-Agent": agent}
    )
    assert status == 200
    wait_until(
        lambda: len([r for r in records(proxy.log()) if r["user_agent"] == agent]) == 2,
        "both records",
    )
    ping, login = [r for r in records(proxy.log()) if r["user_agent"] == agent]
    assert ping["event"] is None and ping["decision"] == "no_credentials" and ping["user"] is None
    assert login["event"] == "login" and login["user"] == "bob"
    assert login["request_id"] == reply["X-Request-Id"]


def test_a_cross_repository_mount_is_a_mount_event_with_its_source(
    proxy: Proxy, users: dict[str, str]
) -> None:
    """Guards the mount event: which blob came from which repository, by whom."""
    auth = basic("carol", users["carol"])
    source, target = f"mount/{uuid.uuid4().hex[:8]}", f"mount/{uuid.uuid4().hex[:8]}"
    digest = push_blob(proxy.url, source, os.urandom(1024), auth)
    query = f"mount={digest.replace(':', '%3A')}&from={source}"
    assert call(f"{proxy.url}/v2/{target}/blobs/uploads/?{query}", "POST", auth)[0] == 201
    wait_until(lambda: any(r["repository"] == target for r in records(proxy.log())), "the record")
    (mount,) = [r for r in records(proxy.log()) if r["repository"] == target]
    assert mount["event"] == "mount" and mount["digest"] == digest
    assert mount["mount_from"] == source and mount["user"] == "carol"


@pytest.fixture
def split_proxy(
    registry: Registry, htpasswd_file: Path, tmp_path: Path
) -> Iterator[Callable[..., tuple[Proxy, Path, Path]]]:
    """Start a proxy whose stdout and stderr go to separate files."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> tuple[Proxy, Path, Path]:
        proxy = Proxy(tmp_path, registry.url, htpasswd_file, env)
        out, err = tmp_path / f"stdout-{proxy.port}", tmp_path / f"stderr-{proxy.port}"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve"],
                stdout=stdout,
                stderr=stderr,
                env=proxy.environment(),
            )
        started.append(popen)
        wait_until(lambda: http_status(proxy.admin_url + "/healthz") == 200, "the proxy")
        return proxy, out, err

    yield start
    for popen in started:
        popen.send_signal(signal.SIGTERM)
        popen.wait(15)


def test_access_log_is_json_lines_on_stdout_whatever_the_log_level(
    split_proxy: Callable[..., tuple[Proxy, Path, Path]], users: dict[str, str]
) -> None:
    """Guards issue 13: no logging prefix, and `log_level: warning` keeps the access log."""
    proxy, out, err = split_proxy(PROXY_LOG_LEVEL="warning")
    assert call(proxy.url + "/v2/", headers=basic("alice", users["alice"]))[0] == 200
    assert call(proxy.url + "/nothing-here", headers=basic("alice", users["alice"]))[0] == 404
    # aiohttp's router answers a decoded LF itself: that must not read as an allowed request.
    call(proxy.url + "/v2/x%0ay/manifests/v1", headers=basic("alice", users["alice"]))
    wait_until(lambda: len(out.read_text().splitlines()) == 3, "three lines on stdout")
    login, outside, newline = [json.loads(line) for line in out.read_text().splitlines()]
    assert login["event"] == "login" and login["time"].endswith("Z")
    assert len(login["time"]) == len("2026-12-03T07:26:31.238Z")
    assert outside["decision"] == "not_api" and outside["upstream_status"] is None
    assert newline["decision"] != "allowed" or newline["upstream_status"] is not None
    assert "request_id" not in err.read_text() and "INFO" not in err.read_text()


def test_text_access_log_and_stderr_escape_control_characters(
    split_proxy: Callable[..., tuple[Proxy, Path, Path]], users: dict[str, str], tmp_path: Path
) -> None:
    """Guards issue 10 §5: percent-decoded CR, LF and ESC never reach a log line raw."""
    rules = tmp_path / "rules.yml"
    rules.write_text("access:\n  - {users: [alice], repositories: ['team/**'], actions: [pull]}\n")
    proxy, out, err = split_proxy(PROXY_ACCESS_LOG="text", PROXY_CONFIG=str(rules))
    # (aiohttp's router answers a decoded LF itself, with a plain-text 404: not our line.)
    forged = "/v2/x%0dFORGED%1b%5b31m%e2%80%a8/manifests/v1"
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    token = basic("alice", users["alice"])["Authorization"]
    sock.sendall(
        f"GET {forged} HTTP/1.1\r\nHost: {proxy.host}\r\nAuthorization: {token}\r\n"
        'User-Agent: agent\u202e"quoted\u0085\r\nConnection: close\r\n\r\n'.encode()
    )
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.1 403"), reply[:100]
    wait_until(lambda: "denied" in err.read_text() and bool(out.read_text()), "the log lines")
    for text in (out.read_bytes(), err.read_bytes()):
        assert b"\x1b" not in text and b"\r" not in text and b"\xc2\x85" not in text
        assert "\u202e".encode() not in text
        assert not any(line.startswith(b"FORGED") for line in text.splitlines())
        assert "\u2028".encode() not in text
    (line,) = out.read_text().splitlines()
    assert " 403 " in line and " denied " in line and '"agent\\u202e\\"quoted\\x85"' in line


def test_escape_makes_every_control_character_visible() -> None:
    assert escape("a\r\nb\x1b[31m\x00\x7f\x85\u2028\u202e\\") == (
        "a\\x0d\\x0ab\\x1b[31m\\x00\\x7f\\x85\\u2028\\u202e\\\\"
    )
    assert escape("plain/repo:tag ü") == "plain/repo:tag ü"
    assert bounded("x" * 300, 256) == "x" * 256 + "..."
    assert bounded(None) is None


def test_stderr_formatter_escapes_what_a_log_call_forgot_and_nothing_twice() -> None:
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord(
        "registry_proxy", logging.INFO, __file__, 1, "%s then %s", (escape("a\\b\r"), "x\ny"), None
    )
    assert formatter.format(record) == "INFO a\\\\b\\x0d then x\\x0ay"


@pytest.mark.parametrize("trusted", [True, False])
def test_request_id_is_returned_and_taken_only_from_trusted_peers(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], trusted: bool
) -> None:
    """Guards request ids: an untrusted client cannot choose the id the audit log records."""
    env = {"PROXY_TRUSTED_PROXIES": "127.0.0.0/8"} if trusted else {}
    proxy = start_proxy(registry.url, **env)
    given = f"edge-{uuid.uuid4().hex}"
    headers = {**basic("alice", users["alice"]), "X-Request-Id": given}
    _, reply, _ = call(f"{proxy.url}/v2/rid/tags/list", headers=headers)
    assert (reply["X-Request-Id"] == given) is trusted
    wait_until(lambda: len(records(proxy.log())) == 1, "the record")
    (record,) = records(proxy.log())
    assert record["request_id"] == reply["X-Request-Id"]
    # A malformed id from a trusted peer is replaced too.
    headers["X-Request-Id"] = "bad id\twith space"
    assert call(f"{proxy.url}/v2/", headers=headers)[1]["X-Request-Id"] != "bad id\twith space"


def test_upstream_gets_our_request_id_never_the_clients() -> None:
    """Guards the id the registry sees: the client's own X-Request-Id is replaced."""
    request = make_mocked_request(
        "GET", "/v2/", headers={"X-Request-Id": "chosen-by-client", "x-request-id": "again"}
    )
    headers = upstream_request_headers(request, "203.0.113.7", "https", "ours")
    assert headers.getall("X-Request-Id") == ["ours"]


def random_token(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(size))


def raw_request(port: int, head: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        while sock.recv(65536):
            pass


# Every label name the proxy uses, and the values each may take.
KNOWN_LABELS: dict[str, set[str]] = {
    "method": set(METHODS) | {"OTHER"},
    "action": {str(a) for a in Action},
    "status_class": {f"{n}xx" for n in range(1, 6)},
    "code": {str(c) for c in CODES} | {"other"},
    "outcome": set(AUTH_OUTCOMES),
    "kind": set(UPSTREAM_ERROR_KINDS),
    "result": set(RELOAD_RESULTS),
    # refusals_total and proxy_protocol_rejected_total.
    "reason": {str(r) for r in Refusal} | set(REJECT_REASONS),
}


def test_cardinality_guard_every_label_value_is_in_its_fixed_set(
    proxy: Proxy, users: dict[str, str]
) -> None:
    """Guards the metrics: nothing a client sends (method, agent, repository, tag) is a label."""
    rng = random.Random(13)
    token = basic("alice", users["alice"])["Authorization"]
    for _ in range(60):
        method = rng.choice([random_token(rng, 7).upper(), "GET", "PUT", "HEAD", "PROPFIND"])
        repo = f"{random_token(rng, 6).lower()}/{random_token(rng, 5).lower()}"
        reference = rng.choice([random_token(rng, 10), "sha256:" + os.urandom(32).hex()])
        kind = rng.choice(["manifests", "blobs", "tags", "weird"])
        agent = f"agent-{random_token(rng, 12)}"
        auth = rng.choice(
            [f"Authorization: {token}\r\n", "", "Authorization: Basic Zm9vOmJhcg==\r\n"]
        )
        raw_request(
            proxy.port,
            f"{method} /v2/{repo}/{kind}/{reference} HTTP/1.1\r\nHost: {proxy.host}\r\n"
            f"User-Agent: {agent}\r\n{auth}Connection: close\r\n\r\n",
        )
    _, _, body = call(proxy.admin_url + "/metrics")
    text = body.decode()
    buckets: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                if name == "le":
                    buckets.add(value)
                    continue
                if family.name == "registry_proxy_build_info":
                    continue  # one series, from the running software
                assert name in KNOWN_LABELS, f"{sample.name}: unknown label {name}"
                assert value in KNOWN_LABELS[name], f"{sample.name}: {name}={value!r}"
    assert len(buckets) < 40
    assert "agent-" not in text and "PROPFIND" not in text


def test_code_refusal_upstream_latency_and_pool_metrics(
    proxy: Proxy, users: dict[str, str]
) -> None:
    """Guards the metrics issue 13 asks for: exact codes, refusals by reason, time to headers."""
    assert call(proxy.url + "/v2/")[0] == 401
    assert call(proxy.url + "/v2/none/manifests/v1", headers=basic("bob", users["bob"]))[0] == 404
    _, _, body = call(proxy.admin_url + "/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    code = {k: v for k, v in samples.items() if k[0] == "registry_proxy_requests_total"}
    assert any(("code", "401") in labels for _, labels in code)
    assert any(("code", "404") in labels and ("action", "manifest") in labels for _, labels in code)
    reasons = {dict(k[1])["reason"]: v for k, v in samples.items()
               if k[0] == "registry_proxy_refusals_total"}  # fmt: skip
    assert set(reasons) == {str(r) for r in Refusal} and reasons["no_credentials"] >= 1
    headers = ("registry_proxy_upstream_time_to_headers_seconds_count", (("action", "manifest"),))
    assert samples[headers] >= 1
    assert samples[("registry_proxy_upstream_connections_limit", ())] == 100
    assert ("registry_proxy_upstream_connections_in_use", ()) in samples
    # Without TLS there is no certificate, so no expiry sample (0 would read as "expired").
    assert not [k for k in samples if "certificate_expiry" in k[0]]


def test_sighup_counts_config_reloads(
    registry: Registry, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Guards the reload counter: success and failure of the SIGHUP configuration reload."""
    config = tmp_path / "proxy.yml"
    config.write_text("read_only: false\n")
    proxy = start_proxy(registry.url, PROXY_CONFIG=str(config))
    assert proxy.process is not None

    def reloads(result: str) -> float:
        _, _, body = call(proxy.admin_url + "/metrics")
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name == "registry_proxy_config_reloads_total" and s.labels == {
                    "result": result
                }:
                    return s.value
        return 0.0

    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: reloads("success") == 1, "a successful reload")
    config.write_text("read_only: maybe\n")
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: reloads("failure") == 1, "a failed reload")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_certificate_expiry_is_exported(
    workers: str, registry: Registry, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Guards the expiry gauge: the served certificate's notAfter, as Unix time; with workers
    too, where a worker's own collector never reaches the supervisor's /metrics."""
    trustme = pytest.importorskip("trustme")
    from cryptography import x509

    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    proxy = start_proxy(
        registry.url,
        PROXY_TLS_CERT=str(tmp_path / "cert.pem"),
        PROXY_TLS_KEY=str(tmp_path / "key.pem"),
        PROXY_WORKERS=workers,
    )
    expected = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).not_valid_after_utc
    _, _, body = call(proxy.admin_url + "/metrics")
    (value,) = [
        s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "registry_proxy_tls_certificate_expiry_timestamp_seconds"
    ]
    assert value == expected.timestamp()


OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def test_operations_page_documents_every_access_log_field_and_metric(proxy: Proxy) -> None:
    """Guards docs/operations.md against drifting from the log and the metrics it documents."""
    text = OPERATIONS.read_text()
    section = text.split("\n## Access log\n", 1)[1].split("\n## ", 1)[0]
    example = section.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert list(json.loads(example)) == FIELDS
    for field in FIELDS:
        assert f"`{field}`" in section, field
    _, _, body = call(proxy.admin_url + "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        # (The text format shows each counter's `_created` as a gauge family of its own.)
        if family.name.startswith("registry_proxy_") and not family.name.endswith("_created"):
            name = family.name.removeprefix("registry_proxy_")
            name += "_total" if family.type == "counter" else ""
            assert f"`{name}`" in text, name
