"""Access tokens without a process: the file's format and writing, expiry, the scope's limits."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest

from proxy.access.rules import AccessPolicy, RequestContext, Right, authorize, parse_access
from proxy.auth.tokens_file import (
    SECRET_PREFIX,
    Token,
    TokensError,
    load_tokens,
    new_secret,
    parse_expiry,
    secret_hash,
    write_tokens,
)
from proxy.identity import AuthOutcome, Identity
from proxy.paths import classify

NOW = 1_800_000_000.0


def token(name: str = "ci", **changes: object) -> Token:
    fields: dict[str, object] = {
        "name": name,
        "owner": "alice",
        "repositories": ("team/**",),
        "actions": ("pull",),
        "networks": (),
        "created": NOW,
        "expires": NOW + 3600,
        "sha256": secret_hash("rpt_x"),
    }
    fields.update(changes)
    return Token(**fields)  # type: ignore[arg-type]


def as_token(t: Token, address: str = "") -> RequestContext:
    identity = Identity(t.owner, AuthOutcome.SUCCESS, scope=t.scope())
    return RequestContext(identity, client=address)


def test_a_secret_is_long_random_prefixed_and_only_its_hash_is_kept(tmp_path: Path) -> None:
    """Guards the secret's form: `rpt_` for secret scanners, 32 random bytes, never in the file."""
    secret, digest = new_secret()
    assert secret.startswith(SECRET_PREFIX) and len(secret) >= len(SECRET_PREFIX) + 43
    assert new_secret()[0] != secret
    path = tmp_path / "tokens"
    write_tokens(path, {"ci": token(sha256=digest)})
    assert secret not in path.read_text()
    assert load_tokens(path)["ci"].sha256 == digest == secret_hash(secret)


def test_the_file_is_written_with_mode_0600_and_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the file's safety: mode 0600 even under a lax umask, and a write that fails half-way
    leaves the previous file whole and no temporary file behind."""
    path = tmp_path / "tokens"
    old_umask = os.umask(0o022)
    try:
        write_tokens(path, {"ci": token()})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if os.geteuid() == 0:
        # The proxy reading the file may run as another user: a rewrite keeps the owner.
        os.chown(path, 10001, 10001)
        write_tokens(path, {"ci": token()})
        assert (path.stat().st_uid, path.stat().st_gid) == (10001, 10001)
    before = path.read_bytes()

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(TokensError, match="cannot write: disk full"):
        write_tokens(path, {"ci": token(), "other": token("other")})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]


def test_a_broken_file_is_refused_naming_it(tmp_path: Path) -> None:
    """Guards loading: a hand-edited or truncated file is refused, named, never half read."""
    path = tmp_path / "tokens"
    path.write_text('{"version": 1, "tokens": [{"name": "ci"}]}')
    with pytest.raises(TokensError, match=str(path)):
        load_tokens(path)
    assert load_tokens(tmp_path / "missing") == {}


def test_expiry_takes_durations_and_iso_dates() -> None:
    """Guards `--expires`: 90d, 12h, 30m from now, or an ISO 8601 date (UTC)."""
    assert parse_expiry("90d", NOW) == NOW + 90 * 86400
    assert parse_expiry("12h", NOW) == NOW + 12 * 3600
    assert parse_expiry("30m", NOW) == NOW + 1800
    midnight = datetime.datetime(2027, 1, 31, tzinfo=datetime.UTC).timestamp()
    assert parse_expiry("2027-01-31", NOW) == midnight
    assert parse_expiry("2027-01-31T12:00:00+01:00", NOW) == midnight + 11 * 3600
    for bad in ("", "0d", "5w", "tomorrow"):
        with pytest.raises(ValueError):
            parse_expiry(bad, NOW)
    assert token().expired(NOW + 3600) and not token().expired(NOW + 3599)


def test_a_token_has_only_what_its_scope_and_its_owner_both_grant() -> None:
    """Guards the intersection: the scope limits the owner's rights, and never adds to them."""
    policy = parse_access(
        None,
        [
            {"users": ["alice"], "repositories": ["team/**"], "actions": ["pull", "push"]},
            {"users": ["alice"], "repositories": ["other/**"], "actions": ["pull"]},
        ],
    )
    wide = token(repositories=("**",), actions=("pull", "push", "delete", "catalog"))
    narrow = token(actions=("pull",))
    assert policy.allows(as_token(wide), Right.PUSH, "team/app")
    assert policy.allows(as_token(wide), Right.PULL, "other/app")
    # The owner has no delete anywhere and no push on other/: the token has none either.
    assert not policy.allows(as_token(wide), Right.DELETE, "team/app")
    assert not policy.allows(as_token(wide), Right.PUSH, "other/app")
    # The scope cuts the owner's push and her other/ repositories.
    assert policy.allows(as_token(narrow), Right.PULL, "team/app")
    assert not policy.allows(as_token(narrow), Right.PUSH, "team/app")
    assert not policy.allows(as_token(narrow), Right.PULL, "other/app")


def test_without_rules_a_token_is_still_held_to_its_scope() -> None:
    """Guards the unrestricted policy: no `access` rules must not make a token unlimited."""
    policy = AccessPolicy()
    narrow = as_token(token(actions=("pull",)))
    assert policy.restricts(narrow.identity)
    assert not policy.allows(narrow, Right.PUSH, "team/app")
    assert not policy.allows(narrow, Right.CATALOG, None)
    push = RequestContext(narrow.identity, "PUT", classify("/v2/team/app/manifests/v1"), client="")
    assert not authorize(policy, push).allowed
    pull = RequestContext(narrow.identity, "GET", classify("/v2/team/app/manifests/v1"))
    assert authorize(policy, pull).allowed


def test_a_token_with_networks_works_only_from_them() -> None:
    """Guards `--networks`: outside them, or from an unknown address, the token has no right."""
    scoped = token(networks=("10.0.0.0/8",))
    policy = AccessPolicy()
    assert policy.allows(as_token(scoped, "10.1.2.3"), Right.PULL, "team/app")
    assert not policy.allows(as_token(scoped, "192.0.2.1"), Right.PULL, "team/app")
    assert not policy.allows(as_token(scoped, ""), Right.PULL, "team/app")
