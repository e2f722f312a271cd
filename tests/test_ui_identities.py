"""Signing in to the browser with an access token or as a directory (LDAP) user, against the real
registry, a real slapd and the real `registry-proxy token` command."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import (
    LDAP_USERS,
    PageClient,
    Proxy,
    Registry,
    Slapd,
    basic_auth,
    create_token,
    listed_repositories,
    push_labelled,
    signed_in,
    token_cli,
    user_dn,
    wait_until,
)

pytestmark = pytest.mark.system


def test_a_token_session_keeps_the_token_scope_and_ends_when_it_is_revoked(
    registry: Registry,
    htpasswd_file: Path,
    users: dict[str, str],
    key_file: Path,
    tmp_path: Path,
    start_proxy: Callable[..., Proxy],
) -> None:
    """Guards a token signing in to the browser: the session must keep the token's scope (not
    its owner's rights) and end the moment the token is revoked."""
    tokens = tmp_path / "tokens.json"
    secret = create_token(
        tokens, "ci-reader", repositories=("tok/app",), actions="pull,catalog", expires="1d"
    )
    proxy = start_proxy(
        registry.url,
        PROXY_UI="true",
        PROXY_UI_SESSION_KEY_FILE=str(key_file),
        PROXY_TOKENS=str(tokens),
    )
    alice = basic_auth("alice", users["alice"])
    push_labelled(proxy.url, "tok/app", "v1", alice)
    push_labelled(proxy.url, "tok/other", "v1", alice)
    browser = signed_in(proxy, "ci-reader", secret)
    status, _, page = browser.request("/ui/")
    assert status == 200
    assert "tok/app" in listed_repositories(page)
    assert "tok/other" not in listed_repositories(page)
    assert browser.request("/ui/tags?repository=tok/other")[0] == 403
    assert token_cli("revoke", "ci-reader", "--file", str(tokens)).returncode == 0
    wait_until(lambda: browser.request("/ui/")[0] == 303, "the token's session to end")


@pytest.fixture
def directory_site(
    slapd: Slapd,
    registry: Registry,
    key_file: Path,
    users: dict[str, str],
    start_proxy: Callable[..., Proxy],
) -> Proxy:
    access = json.dumps(
        [
            {"users": ["@builders"], "repositories": ["dir/**"], "actions": ["pull", "catalog"]},
            {"users": ["alice"], "repositories": ["**"], "actions": ["pull", "push", "catalog"]},
        ]
    )
    proxy = start_proxy(
        registry.url,
        PROXY_UI="true",
        PROXY_UI_SESSION_KEY_FILE=str(key_file),
        PROXY_ACCESS=access,
        PROXY_AUTH_CACHE_TTL="1",
        **slapd.proxy_env(),
    )
    push_labelled(proxy.url, "dir/app", "v1", basic_auth("alice", users["alice"]))
    return proxy


def test_a_directory_user_signs_in_with_directory_groups(directory_site: Proxy) -> None:
    """Guards the form on the LDAP backend: a directory user and their groups' rights."""
    browser = signed_in(directory_site, "dave", LDAP_USERS["dave"])
    _, _, page = browser.request("/ui/")
    assert "dir/app" in listed_repositories(page)
    refused = PageClient(directory_site.url)
    assert refused.sign_in("dave", "not-dave's")[0] == 401


def test_a_directory_user_losing_a_group_loses_its_rights_in_the_open_session(
    directory_site: Proxy, slapd: Slapd
) -> None:
    """Guards directory groups frozen into a session: they are looked up again, at most every
    auth_cache_ttl, as a cached Basic login is."""
    browser = signed_in(directory_site, "dave", LDAP_USERS["dave"])
    assert browser.request("/ui/tags?repository=dir/app")[0] == 200
    slapd.modify(
        "dn: cn=builders,ou=groups,dc=example,dc=org\nchangetype: modify\n"
        f"delete: member\nmember: {user_dn('dave')}\n"
    )
    wait_until(
        lambda: browser.request("/ui/tags?repository=dir/app")[0] == 403, "dave's right to end"
    )
