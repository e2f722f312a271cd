"""LDAP logins against a real OpenLDAP slapd: search then bind, groups as rule groups, outages."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from proxy.app import warn_about_unknown_users
from proxy.auth.directory import Directory, group_filter, user_base, user_filter
from proxy.config import ConfigError, load_config
from tests.support import (
    LDAP_USERS,
    Clients,
    Proxy,
    Registry,
    Slapd,
    access_records,
    basic_auth,
    call,
    gauge,
    push_image,
    scrape,
    user_dn,
    value,
    wait_until,
)

DAVE = ("dave", LDAP_USERS["dave"])
ERIN = ("erin", LDAP_USERS["erin"])
# Directory groups and a configured group share the name `builders`: members of either push.
GROUPS = "{builders: [carol]}"
ACCESS = json.dumps(
    [
        {"users": ["@builders"], "repositories": ["team/**"], "actions": ["pull", "push"]},
        {"users": ["@readers"], "repositories": ["team/**"], "actions": ["pull"]},
        {"users": ["@anonymous"], "repositories": ["pub/**"], "actions": ["pull"]},
    ]
)
UP = "registry_proxy_auth_backend_up"


def ping(proxy: Proxy, user: str, password: str) -> int:
    return call(proxy.url + "/v2/", headers=basic_auth(user, password))[0]


def body_of(proxy: Proxy, user: str, password: str) -> tuple[int, bytes]:
    status, _, body = call(proxy.url + "/v2/", headers=basic_auth(user, password))
    return status, body


@pytest.fixture
def ldap_proxy(
    slapd: Slapd, registry: Registry, start_proxy: Callable[..., Proxy]
) -> Callable[..., Proxy]:
    """A proxy logging in against `slapd` (StartTLS), with group rules; `env` overrides."""

    def start(**env: str) -> Proxy:
        settings = {"PROXY_GROUPS": GROUPS, "PROXY_ACCESS": ACCESS, **slapd.proxy_env(), **env}
        return start_proxy(registry.url, **settings)

    return start


# --- unit: escaping and settings


def test_filter_values_are_escaped_as_rfc_4515_says() -> None:
    """Guards filter injection: `*`, parentheses, backslash and NUL in a name stay literal."""
    assert user_filter("(uid={user})", "*") == r"(uid=\2a)"
    assert user_filter("(uid={user})", ")(uid=*") == r"(uid=\29\28uid=\2a)"
    assert user_filter("(uid={user})", "a\\b\x00") == r"(uid=a\5cb\00)"
    assert group_filter("(member={dn})", "uid=a*,dc=x", "a*") == r"(member=uid=a\2a,dc=x)"
    assert group_filter("(|(member={dn})(memberUid={user}))", "uid={user}", "x") == (
        "(|(member=uid={user})(memberUid=x))"
    )


def test_dn_values_are_escaped_as_rfc_4514_says() -> None:
    """Guards DN injection through `{user}` in user_base: `,` and `+` cannot add an RDN."""
    assert user_base("uid={user},ou=people", "a,ou=admins+cn=x") == (
        r"uid=a\,ou\=admins\+cn\=x,ou=people"
    )


def test_the_entry_stamp_is_read_whatever_the_directory_calls_its_attributes() -> None:
    """Guards the browser's directory sessions on a server that spells the change stamps in
    another case (attribute names are case-insensitive): the stamp read empty, so a new
    password no longer changed it and an open session outlived the password."""
    settings = load_config(None, {"PROXY_HTPASSWD": "/h", "PROXY_LDAP_URL": "ldap://h",
                                  "PROXY_LDAP_USER_BASE": "o=x"}).ldap  # fmt: skip

    class Answers:
        def search_ext_s(
            self, *args: object, **kwargs: object
        ) -> list[tuple[str, dict[str, list[bytes]]]]:
            return [("uid=a,o=x", {"ENTRYCSN": [b"20261207.1#0"], "modifytimestamp": [b"2026"]})]

    directory = Directory(settings, "")
    try:
        found = directory._find_entry(Answers(), "a")
    finally:
        directory.close()
    assert found is not None and "20261207.1#0" in found[1] and "2026" in found[1]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PROXY_LDAP_URL": "ldap://h"}, "ldap.user_base: not set"),
        (
            {"PROXY_LDAP_URL": "ldaps://h", "PROXY_LDAP_USER_BASE": "o=x",
             "PROXY_LDAP_START_TLS": "true"},
            "ldaps:// is TLS already",
        ),
        (
            {"PROXY_LDAP_URL": "ldap://h", "PROXY_LDAP_USER_BASE": "o=x",
             "PROXY_LDAP_BIND_DN": "cn=r"},
            "PROXY_LDAP_BIND_DN: ldap.bind_password_file: not set; expected both",
        ),
        ({"PROXY_LDAP_URL": "http://h"}, "expected ldap://HOST"),
        ({"PROXY_LDAP_USER_FILTER": "(uid=alice)"}, "with {user}"),
    ],
)  # fmt: skip
def test_an_inconsistent_ldap_block_is_refused_naming_the_key(
    env: dict[str, str], message: str
) -> None:
    """Guards an `ldap` block that cannot work being accepted until the first login."""
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_config(None, {"PROXY_HTPASSWD": "/h", **env})


# --- system: against slapd


def test_a_directory_user_logs_in_and_directory_groups_are_rule_groups(
    ldap_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards directory logins and `@NAME` matching directory and configured groups alike:
    dave (directory builders) and carol (configured builders) push, erin (readers) only pulls."""
    proxy = ldap_proxy()
    assert ping(proxy, *DAVE) == 200
    push_image(proxy.url, "team/app", headers=basic_auth(*DAVE))
    push_image(proxy.url, "team/carol", headers=basic_auth("carol", users["carol"]))
    status, _, _ = call(proxy.url + "/v2/team/app/tags/list", headers=basic_auth(*ERIN))
    assert status == 200
    status, _, body = call(proxy.url + "/v2/team/erin/blobs/uploads/", "POST", basic_auth(*ERIN))
    assert status == 403, body
    assert ping(proxy, "dave", "wrong") == 401


def test_htpasswd_users_are_never_sent_to_the_directory(
    ldap_proxy: Callable[..., Proxy], slapd: Slapd, users: dict[str, str]
) -> None:
    """Guards the order: a name in htpasswd is judged by htpasswd alone, even with the
    directory down; names htpasswd lacks go to the directory."""
    proxy = ldap_proxy()
    slapd.kill()
    assert ping(proxy, "alice", users["alice"]) == 200
    assert ping(proxy, "alice", "wrong") == 401
    assert ping(proxy, *DAVE) == 503


@pytest.mark.parametrize("name", ["*", "d*", ")(uid=*", "dave)(uid=*", "*)(|(uid=*"])
def test_filter_injection_names_match_nobody(ldap_proxy: Callable[..., Proxy], name: str) -> None:
    """Guards RFC 4515 escaping: unescaped, `d*` with dave's password finds dave and binds
    as him; `*` or `)(uid=*` would widen the search."""
    proxy = ldap_proxy()
    assert ping(proxy, name, DAVE[1]) == 401
    assert ping(proxy, *DAVE) == 200


def test_a_name_with_filter_characters_matches_itself_literally(
    ldap_proxy: Callable[..., Proxy],
) -> None:
    """Guards escaping that refuses instead of escaping: `we(ird)*` is a real user."""
    proxy = ldap_proxy()
    assert ping(proxy, "we(ird)*", LDAP_USERS["we(ird)*"]) == 200
    assert ping(proxy, "we(ird)", LDAP_USERS["we(ird)*"]) == 401


def test_a_nul_in_the_name_is_refused(ldap_proxy: Callable[..., Proxy]) -> None:
    """Guards a NUL cutting the filter short in C (libldap): refused before any search."""
    proxy = ldap_proxy()
    assert ping(proxy, "dave\x00", DAVE[1]) == 401
    assert ping(proxy, "dave\x00*", DAVE[1]) == 401


def test_an_empty_password_is_refused_before_any_bind(
    ldap_proxy: Callable[..., Proxy], slapd: Slapd
) -> None:
    """Guards the unauthenticated bind (RFC 4513 5.1.2): this slapd accepts a DN with an empty
    password, so binding as dave with "" would log anyone in as dave."""
    assert slapd.whoami(user_dn("dave"), "").returncode == 0  # the directory would accept it
    proxy = ldap_proxy()
    assert ping(proxy, "dave", "") == 401
    wait_until(
        lambda: any(r.get("tried_user") == "dave" for r in access_records(proxy.log())),
        "the refusal's audit line to name dave",
    )


def test_a_directory_group_cannot_claim_anonymous(ldap_proxy: Callable[..., Proxy]) -> None:
    """Guards a directory group named `anonymous` granting its members `@anonymous` rights."""
    proxy = ldap_proxy()
    frank = ("frank", LDAP_USERS["frank"])
    assert ping(proxy, *frank) == 200
    status, _, _ = call(proxy.url + "/v2/pub/x/manifests/v1", headers=basic_auth(*frank))
    assert status == 403


def test_ldaps_logs_in_with_the_certificate_verified(
    ldap_proxy: Callable[..., Proxy], slapd: Slapd
) -> None:
    """Guards ldaps:// (TLS from the first byte, no StartTLS) with `ca_file`."""
    proxy = ldap_proxy(PROXY_LDAP_URL=slapd.tls_url, PROXY_LDAP_START_TLS="false")
    assert ping(proxy, *DAVE) == 200


def test_starttls_with_a_certificate_not_from_ca_file_logs_nobody_in(
    ldap_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Guards StartTLS without verification: another CA's certificate means no login (503)."""
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    proxy = ldap_proxy(PROXY_LDAP_CA_FILE=str(other))
    assert ping(proxy, *DAVE) == 503


def test_outage_keeps_cached_logins_and_answers_503_to_new_ones(
    ldap_proxy: Callable[..., Proxy], slapd: Slapd
) -> None:
    """Guards the directory outage: cached logins work, new ones get a registry-style 503 that
    counts as no failed login in the throttle, the backend gauge drops to 0, and a restarted
    slapd brings logins and the gauge back."""
    proxy = ldap_proxy(PROXY_AUTH_MAX_FAILURES_PER_USER="2", PROXY_AUTH_MAX_FAILURES="2")
    assert ping(proxy, *DAVE) == 200
    assert gauge(proxy, UP) == 1
    slapd.kill()
    assert ping(proxy, *DAVE) == 200  # cached
    for _ in range(4):
        status, body = body_of(proxy, *ERIN)
        assert status == 503
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert value(scrape(proxy), UP, backend="ldap") == 0
    slapd.start()
    wait_until(lambda: gauge(proxy, UP) == 1, "the directory probe to see slapd again")
    # Four 503s counted as failures would have throttled erin (limit 2): they did not count.
    assert ping(proxy, *ERIN) == 200


@pytest.fixture
def silent_directory() -> Iterator[socket.socket]:
    """A listening socket that never accepts nor answers (a hung directory)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener


def test_a_directory_that_never_answers_gives_503_not_a_hang(
    ldap_proxy: Callable[..., Proxy], silent_directory: socket.socket
) -> None:
    """Guards a hung directory holding logins (and the event loop) forever: bounded by
    `ldap.timeout`, answered 503, while htpasswd users and /metrics keep being served."""
    proxy = ldap_proxy(
        PROXY_LDAP_URL=f"ldap://127.0.0.1:{silent_directory.getsockname()[1]}",
        PROXY_LDAP_TIMEOUT="1",
    )
    assert ping(proxy, *DAVE) == 503
    assert value(scrape(proxy), UP, backend="ldap") == 0


def test_referrals_are_not_followed(
    ldap_proxy: Callable[..., Proxy], slapd: Slapd, silent_directory: socket.socket
) -> None:
    """Guards referral chasing (libldap's default): a search reference under user_base would
    send the proxy to another server. Ignored, the login of the one real entry goes on."""
    port = silent_directory.getsockname()[1]
    slapd.modify(
        "dn: ou=elsewhere,ou=people,dc=example,dc=org\nobjectClass: referral\n"
        f"objectClass: extensibleObject\nou: elsewhere\nref: ldap://127.0.0.1:{port}/ou=x\n"
    )
    proxy = ldap_proxy()
    assert ping(proxy, *DAVE) == 200
    silent_directory.setblocking(False)
    with pytest.raises(BlockingIOError):
        silent_directory.accept()  # nobody connected to the referred server


def test_groups_are_read_again_when_the_cached_login_expires(
    ldap_proxy: Callable[..., Proxy], slapd: Slapd
) -> None:
    """Guards groups kept for as long as the process runs: a member added to `builders` in the
    directory may push once the cached login (auth_cache_ttl) has expired."""
    proxy = ldap_proxy(PROXY_AUTH_CACHE_TTL="1")
    upload = proxy.url + "/v2/team/erin/blobs/uploads/"
    assert call(upload, "POST", basic_auth(*ERIN))[0] == 403
    slapd.modify(
        f"dn: cn=builders,ou=groups,dc=example,dc=org\nchangetype: modify\n"
        f"add: member\nmember: {user_dn('erin')}\n"
    )
    wait_until(lambda: call(upload, "POST", basic_auth(*ERIN))[0] == 202, "erin to push")


def check_config(proxy_env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PROXY_HTPASSWD": proxy_env["PROXY_HTPASSWD"], **proxy_env}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", *flags],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_check_config_binds_unless_told_not_to(
    slapd: Slapd, htpasswd_file: Path, tmp_path: Path
) -> None:
    """Guards check-config passing an `ldap` block serve could not use: the service account
    must bind (`--no-connect` skips only that), and its password never appears."""
    env = {"PROXY_HTPASSWD": str(htpasswd_file), **slapd.proxy_env()}
    good = check_config(env)
    assert good.returncode == 0, good.stderr
    assert "reader-secret" not in good.stdout + good.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    bad = check_config({**env, "PROXY_LDAP_BIND_PASSWORD_FILE": str(wrong)})
    assert bad.returncode == 2
    assert "cannot bind" in bad.stderr and "not-the-password" not in bad.stderr
    slapd.kill()
    assert check_config(env).returncode == 2
    assert check_config(env, "--no-connect").returncode == 0


def test_docker_login_and_skopeo_push_and_pull_as_a_directory_user(
    ldap_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Guards the real clients with a directory user: docker login stores the login, skopeo
    pushes where a directory group grants push, and a reader is refused the push."""
    proxy = ldap_proxy()
    clients = Clients(tmp_path / "clients", proxy)
    clients.ok("docker", "login", proxy.host, "-u", DAVE[0], "--password-stdin", stdin=DAVE[1])
    clients.fails("docker", "login", proxy.host, "-u", "dave", "--password-stdin", stdin="x")
    source = tmp_path / "source"
    push_image(proxy.url, "team/seed", headers=basic_auth(*DAVE))
    erin = f"--src-creds={ERIN[0]}:{ERIN[1]}"
    tls = "--tls-verify=false"
    clients.ok("skopeo", "copy", tls, f"--src-creds={DAVE[0]}:{DAVE[1]}",
               f"--dest-creds={DAVE[0]}:{DAVE[1]}", f"docker://{proxy.host}/team/seed:v1",
               f"docker://{proxy.host}/team/copied:v1")  # fmt: skip
    clients.ok("skopeo", "copy", tls, erin, f"docker://{proxy.host}/team/copied:v1",
               f"dir:{source}")  # fmt: skip
    clients.fails("skopeo", "copy", tls, f"--src-creds={ERIN[0]}:{ERIN[1]}",
                  f"--dest-creds={ERIN[0]}:{ERIN[1]}", f"dir:{source}",
                  f"docker://{proxy.host}/team/erin:v1")  # fmt: skip


def test_rules_naming_directory_users_are_not_called_typos(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Guards a start-up warning that every directory user named in `access` is missing from
    the htpasswd file: with a directory, such names are expected."""
    config = load_config(
        None,
        {"PROXY_HTPASSWD": "/h", "PROXY_LDAP_URL": "ldap://h", "PROXY_LDAP_USER_BASE": "o=x",
         "PROXY_ACCESS": '[{users: [dave, "@builders"], repositories: ["**"], actions: [pull]}]'},
    )  # fmt: skip
    warn_about_unknown_users(config.access, {"alice": "x"}, None, directory=config.ldap.enabled)
    assert "not in the htpasswd file" not in caplog.text
    warn_about_unknown_users(config.access, {"alice": "x"}, None)
    assert "not in the htpasswd file: dave" in caplog.text
