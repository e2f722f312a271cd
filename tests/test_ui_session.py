"""The browser's session cookie, CSRF tokens and page helpers, in this process."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from proxy.paths import Action
from proxy.throttle.store import check_owner
from proxy.ui.manifests import read_config, read_manifest
from proxy.ui.registry import Refused, api_path
from proxy.ui.session import Kind, SessionSigner, owner_key, read_session_key

KEY = b"k" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_cookie_reads_back_until_it_expires() -> None:
    """Guards the session lifetime: a cookie past `ui_session_lifetime` is no session."""
    clock = Clock()
    signer = SessionSigner(KEY, 3600, clock)
    session, value = signer.issue(Kind.PASSWORD, "alice", "bound")
    assert signer.read(value) == session
    clock.now += 3599
    assert signer.read(value) == session
    clock.now += 1
    assert signer.read(value) is None


@pytest.mark.parametrize("field", ["n", "k", "e", "i", "b"])
def test_any_altered_field_breaks_the_signature(field: str) -> None:
    """Guards a cookie edited by its holder (another name, a later expiry, another kind)."""
    signer = SessionSigner(KEY, 3600)
    _, value = signer.issue(Kind.PASSWORD, "bob")
    payload, mac = value.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields[field] = {"n": "alice", "k": "t", "e": fields["e"] + 10**6, "i": "x", "b": "y"}[field]
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    assert signer.read(f"{forged}.{mac}") is None


def test_sessions_are_issued_to_the_millisecond_and_older_cookies_read_as_none() -> None:
    """Guards the issue time a sign-out compares with: whole seconds would end a session made
    in the same second after a sign-out. A cookie of the earlier format (seconds) is no session."""
    clock = Clock()
    clock.now = 1_796_000_000.1234
    signer = SessionSigner(KEY, 3600, clock)
    session, value = signer.issue(Kind.PASSWORD, "alice")
    assert session.issued == 1_796_000_000_123
    assert session.expires == 1_796_003_600
    payload = value.split(".")[0]
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields.update(v=1, t=1_796_000_000)
    old = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    mac = hmac.new(KEY, b"session\0" + old.encode(), hashlib.sha256).digest()
    signed = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    assert signer.read(f"{old}.{signed}") is None


def test_a_users_key_in_the_stores_is_a_fixed_size_hash_of_kind_and_name() -> None:
    """Guards the key sign-outs are kept under: any name (long, odd characters) must make a key
    the stores take, and a user and a token of the same name must not share one."""
    for name in ("alice", "a" * 256, "caf\u00e9 : \n", ""):
        key = owner_key(Kind.PASSWORD, name)
        assert len(key) == 43 and check_owner(key) == key
    assert owner_key(Kind.PASSWORD, "ci") != owner_key(Kind.TOKEN, "ci")
    assert owner_key(Kind.PASSWORD, "ci") != owner_key(Kind.PASSWORD, "cj")
    session, _ = SessionSigner(KEY, 3600).issue(Kind.TOKEN, "ci")
    assert session.owner_key == owner_key(Kind.TOKEN, "ci")


def test_another_key_reads_nothing_and_garbage_is_no_session() -> None:
    """Guards sessions across keys (a rotated key ends them) and malformed cookies."""
    _, value = SessionSigner(KEY, 3600).issue(Kind.TOKEN, "ci")
    assert SessionSigner(b"o" * 32, 3600).read(value) is None
    signer = SessionSigner(KEY, 3600)
    for garbage in ("", ".", "a.b", "x" * 5000, value + "x", "." + value):
        assert signer.read(garbage) is None


def test_csrf_tokens_are_bound_to_their_session_and_purpose() -> None:
    """Guards a token usable in another session, or a sign-in token usable as a session's."""
    signer = SessionSigner(KEY, 3600)
    first, _ = signer.issue(Kind.PASSWORD, "alice")
    second, _ = signer.issue(Kind.PASSWORD, "alice")
    assert signer.csrf_ok(first, signer.csrf(first))
    assert not signer.csrf_ok(second, signer.csrf(first))
    nonce = signer.login_nonce()
    assert signer.login_csrf_ok(nonce, signer.login_csrf(nonce))
    assert not signer.login_csrf_ok(signer.login_nonce(), signer.login_csrf(nonce))
    assert not signer.login_csrf_ok(None, signer.login_csrf(nonce))
    assert signer.login_csrf(first.id) != signer.csrf(first)


def test_the_key_file_must_hold_32_bytes(tmp_path: Path) -> None:
    """Guards a guessable signing key: a short file is refused (serve and check-config exit 2)."""
    short = tmp_path / "short"
    short.write_text("0123456789\n")
    with pytest.raises(ValueError, match="at least 32"):
        read_session_key(short)
    good = tmp_path / "good"
    good.write_text("a" * 44 + "\n")
    assert read_session_key(good) == b"a" * 44


@pytest.mark.parametrize(
    ("repository", "reference"),
    [
        ("Team/App", "v1"),
        ("team/../app", "v1"),
        ("team/app", "sha256:abc"),
        ("team/app", "v1/manifests/v2"),
        ("team%2fapp", "v1"),
        ("team/app", "-v1"),
        ("", "v1"),
    ],
)
def test_page_parameters_the_registry_would_read_otherwise_are_refused(
    repository: str, reference: str
) -> None:
    """Guards the API path a page builds: it must read back as exactly what was authorized."""
    with pytest.raises(Refused):
        api_path(Action.MANIFEST, repository, reference)


def test_a_manifest_and_config_are_read_defensively() -> None:
    """Guards pages that fail on what a pusher may write: wrong types, missing fields."""
    image = read_manifest(
        "sha256:" + "a" * 64,
        "application/vnd.oci.image.manifest.v1+json",
        json.dumps(
            {
                "config": {"digest": "sha256:" + "b" * 64, "size": 10},
                "layers": [{"digest": "d", "size": 5}, "junk", {"size": "big"}],
                "annotations": {"k": 1},
            }
        ).encode(),
    )
    assert image.size is None  # one layer's size is not a number
    assert image.annotations == {"k": "1"}
    assert len(image.layers) == 2
    index = read_manifest(
        "d",
        "",
        json.dumps(
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "digest": "x",
                        "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                    },
                    {"digest": "y", "platform": {"os": "unknown", "architecture": "unknown"}},
                ],
            }
        ).encode(),
    )
    assert index.is_index and index.platforms == ["linux/arm64/v8"]
    assert read_manifest("d", "", b"[1]").problem
    assert read_config(b"not json").labels == {}
    facts = read_config(json.dumps({"created": 5, "config": {"Labels": None}}).encode())
    assert facts.created is None and facts.labels == {}


def test_a_session_is_issued_after_the_sign_out_it_follows() -> None:
    """Guards a sign-in in the same millisecond as a sign-out: its session would be ended by it
    (issued at or before the sign-out) and never hold a page."""
    clock = Clock()
    signer = SessionSigner(KEY, 3600, clock)
    signed_out = int(clock.now * 1000)
    session, _ = signer.issue(Kind.PASSWORD, "alice", after=signed_out)
    assert session.issued > signed_out
