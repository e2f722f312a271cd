"""Each setting is declared once, on `Config`: key, check-config line and reload check follow."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import pytest

from proxy.config import (
    SETTINGS,
    Config,
    Setting,
    describe,
    env_name,
    load_config,
    restart_only_changes,
)

# What SIGHUP applies (server.py's reload); a change to any other setting needs a restart.
RELOADABLE = {"groups", "access", "read_only", "immutable_tags"}
RESTART_ONLY = [key for key in SETTINGS if key not in RELOADABLE]

BASE = {
    "PROXY_HTPASSWD": "/h",
    "PROXY_TRUSTED_PROXIES": "10.0.0.0/8",
    "PROXY_SHARED_STATE": "redis://:old-password@redis:6379/0",
    "PROXY_TLS_CERT": "/cert.pem",
    "PROXY_TLS_KEY": "/key.pem",
    "PROXY_LDAP_URL": "ldap://directory:389",
    "PROXY_LDAP_USER_BASE": "ou=people,dc=example,dc=org",
    "PROXY_LDAP_BIND_DN": "cn=reader,dc=example,dc=org",
    "PROXY_LDAP_BIND_PASSWORD_FILE": "/bind-password",
    "PROXY_UI_SESSION_KEY_FILE": "/ui-session.key",
}
# A value for each restart-only setting that differs from what BASE gives it.
CHANGED = {
    "listen": "127.0.0.1:7",
    "upstream": "http://other:7",
    "htpasswd": "/other",
    "tokens": "/other-tokens",
    "token_max_lifetime": "7d",
    "realm": "Other",
    "admin_listen": "",
    "connect_timeout": "7",
    "read_timeout": "7",
    "keepalive_timeout": "7",
    "tls_handshake_timeout": "7",
    "body_timeout": "7",
    "max_connections": "7",
    "max_connections_per_client": "7",
    "workers": "7",
    "shutdown_timeout": "7",
    "upstream_connections": "7",
    "upstream_connections_per_user": "7",
    "auth_cache_ttl": "7",
    "auth_cache_size": "7",
    "auth_workers": "7",
    "log_level": "debug",
    "access_log": "text",
    "log_format": "json",
    "trusted_proxies": "192.0.2.0/24",
    "proxy_protocol": "true",
    "upstream_probe_interval": "7",
    "auth_max_failures": "7",
    "auth_failure_window": "7",
    "auth_block": "7",
    "auth_max_failures_per_user": "7",
    "auth_known_client_ttl": "7",
    "auth_max_pending_per_client": "7",
    "fast_blob_relay": "false",
    # Only the password: check-config redacts it, the comparison must not.
    "shared_state": "redis://:new-password@redis:6379/0",
    "cors_origins": "[https://ui.example.com]",
    "ui": "true",
    "ui_session_key_file": "/other-ui-session.key",
    "ui_session_lifetime": "7",
    "tls.cert": "/other-cert.pem",
    "tls.key": "/other-key.pem",
    "ldap.url": "ldap://other:389",
    "ldap.start_tls": "true",
    "ldap.ca_file": "/ca.pem",
    "ldap.bind_dn": "cn=other,dc=example,dc=org",
    "ldap.bind_password_file": "/other-password",
    "ldap.user_base": "ou=other,dc=example,dc=org",
    "ldap.user_filter": "(cn={user})",
    "ldap.group_base": "ou=groups,dc=example,dc=org",
    "ldap.group_filter": "(uniqueMember={dn})",
    "ldap.group_name_attribute": "ou",
    "ldap.timeout": "7",
}
RULES = "[{users: [alice], repositories: ['**'], actions: [pull]}]"
RELOADED = {
    "groups": "{ci: [alice]}",
    "access": RULES,
    "read_only": "true",
    "immutable_tags": "[{repositories: ['**'], tags: ['v*']}]",
}


def flattened(described: Mapping[str, object], prefix: str = "") -> Iterator[str]:
    """The dotted keys of check-config's output."""
    for key, value in described.items():
        dotted = prefix + key
        if any(name.startswith(f"{dotted}.") for name in SETTINGS):
            assert isinstance(value, Mapping), dotted
            yield from flattened(value, f"{dotted}.")
        else:
            yield dotted


def field_keys(kind: type, prefix: str = "") -> Iterator[str]:
    """The key of every field of `kind`, read from the fields themselves; each must be a setting."""
    for field in dataclasses.fields(kind):
        section = field.metadata.get("section")
        if section is not None:
            yield from field_keys(section, f"{prefix}{field.name}.")
            continue
        setting = field.metadata.get("setting")
        assert isinstance(setting, Setting), f"{kind.__name__}.{field.name} is not a setting"
        yield prefix + (setting.key or field.name)


def test_every_config_field_is_a_setting_shown_by_check_config() -> None:
    """Guards a field added to Config without its Setting, or a setting check-config leaves out:
    it would have no key, no environment name, no check-config line and no restart warning."""
    keys = list(field_keys(Config))
    assert keys == list(SETTINGS)
    assert list(flattened(describe(load_config(None, BASE)))) == keys


def test_only_the_rules_and_read_only_are_applied_by_sighup() -> None:
    """Guards a setting marked reloadable that SIGHUP does not apply: its change goes unwarned."""
    assert {key for key, setting in SETTINGS.items() if setting.reloadable} == RELOADABLE


def test_every_restart_only_setting_has_a_changed_value_here() -> None:
    """Guards a new setting the reload test below would silently skip."""
    assert set(CHANGED) == set(RESTART_ONLY)


@pytest.mark.parametrize("key", RESTART_ONLY)
def test_changing_a_restart_only_setting_is_named_on_reload(key: str) -> None:
    """Guards the SIGHUP "restart to apply" warning missing a setting: one left out of the
    comparison, or compared in its redacted form (a new Redis password went unnoticed)."""
    running = load_config(None, BASE)
    fresh = load_config(None, {**BASE, env_name(key): CHANGED[key]})
    assert restart_only_changes(running, fresh) == [key]
    assert restart_only_changes(running, running) == []


@pytest.mark.parametrize("key", sorted(RELOADABLE))
def test_changing_what_sighup_applies_needs_no_restart(key: str) -> None:
    """Guards a "restart to apply" warning for a change SIGHUP did apply."""
    running = load_config(None, BASE)
    fresh = load_config(None, {**BASE, env_name(key): RELOADED[key]})
    assert describe(fresh)[key] != describe(running)[key]
    assert restart_only_changes(running, fresh) == []


def test_check_config_redacts_the_redis_password() -> None:
    """Guards the shared_state password printed by check-config."""
    shown = describe(load_config(None, BASE))["shared_state"]
    assert shown == "redis://:***@redis:6379/0"


def test_the_rules_in_effect_are_the_ones_check_config_prints() -> None:
    """Guards `access` and `immutable_tags` built from anything but the values shown."""
    rules = {"PROXY_ACCESS": RULES, "PROXY_IMMUTABLE_TAGS": RELOADED["immutable_tags"]}
    config = load_config(None, {**BASE, **rules})
    assert not config.access.unrestricted
    assert config.immutable_tags.fixed("app", "v1") and not config.immutable_tags.fixed("app", "x")
    shown = describe(config)
    assert shown["access"] == [{"users": ["alice"], "repositories": ["**"], "actions": ["pull"]}]
    assert shown["immutable_tags"] == [{"repositories": ["**"], "tags": ["v*"]}]
    unrestricted = load_config(None, BASE)
    assert unrestricted.access.unrestricted and not unrestricted.immutable_tags
