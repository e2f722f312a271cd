"""Failed logins in the audit trail: the user name tried (never the password), the client and the
outcome on one line; and the shipped fail2ban filter, run by the real `fail2ban-regex` on the lines
a real proxy wrote in front of the real registry."""

from __future__ import annotations

import base64
import configparser
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import Proxy, Registry, basic_auth, call, wait_until

pytestmark = pytest.mark.system

FAIL2BAN = Path(__file__).resolve().parent.parent / "deploy" / "fail2ban"
FILTER = FAIL2BAN / "filter.d" / "registry-proxy.conf"
JAIL = FAIL2BAN / "jail.d" / "registry-proxy.conf"

GUESSER = "192.0.2.10"  # a wrong password for alice, and malformed Basic
SCANNER = "2001:db8::7"  # an unknown, odd user name
PERSISTENT = "198.51.100.5"  # wrong passwords for bob until the proxy throttles them
USER = "203.0.113.9"  # logs in, pings without credentials, a forged user agent
# Quote, backslash and non-ASCII (Basic refuses control characters as malformed), 80 long.
ODD_NAME = 'q"uo\\te-\u00e9-' + "x" * 70
WRONG = "wrong-password-8d1f"
# A user agent that spells a failed login's fields: JSON escaping must keep it from matching.
FORGED_AGENT = 'x","auth":"bad_credentials","decision":"throttled",'


def from_client(address: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {"X-Forwarded-For": address, **(headers or {})}


def raw_basic(token: str) -> dict[str, str]:
    return {"Authorization": f"Basic {token}"}


def failed_logins(proxy: Proxy, users: dict[str, str]) -> None:
    """Send failed and successful logins, from four clients named by a trusted X-Forwarded-For."""
    ping = proxy.url + "/v2/"
    sent = [
        (GUESSER, basic_auth("alice", WRONG), 401),
        (GUESSER, raw_basic(base64.b64encode(b"no-colon").decode()), 401),
        (GUESSER, raw_basic("%%%not-base64"), 401),
        (SCANNER, basic_auth(ODD_NAME, WRONG), 401),
        (PERSISTENT, basic_auth("bob", WRONG), 401),
        (PERSISTENT, basic_auth("bob", WRONG), 401),
        (PERSISTENT, basic_auth("bob", WRONG), 429),
        (USER, basic_auth("carol", users["carol"]), 200),
        (USER, {}, 401),
        (USER, {**basic_auth("carol", users["carol"]), "User-Agent": FORGED_AGENT}, 200),
        (USER, {"User-Agent": FORGED_AGENT}, 401),
    ]
    for address, headers, status in sent:
        assert call(ping, headers=from_client(address, headers))[0] == status, (address, headers)
    wait_until(lambda: len(access_lines(proxy)) == len(sent), "every access line")


def access_lines(proxy: Proxy) -> list[str]:
    return [line for line in proxy.log().splitlines() if line.startswith("{")]


@pytest.fixture
def trusting_proxy(start_proxy: Callable[..., Proxy], registry: Registry) -> Proxy:
    """A proxy trusting 127.0.0.1's X-Forwarded-For, throttling an (address, user) after 2."""
    return start_proxy(registry.url, PROXY_TRUSTED_PROXIES="127.0.0.1", PROXY_AUTH_MAX_FAILURES="2")


def test_a_refused_login_names_the_user_tried_escaped_and_cut_never_the_password(
    trusting_proxy: Proxy, users: dict[str, str]
) -> None:
    """Guards the audit of failed logins: which name was tried, from where, and why, on the
    refused line itself (it said `"user": null` alone), escaped and cut to 64 characters as sent;
    the password and the name never reach the log's other fields or a metric label."""
    failed_logins(trusting_proxy, users)
    records = [json.loads(line) for line in access_lines(trusting_proxy)]
    seen = [(r["client"], r["user"], r["tried_user"], r["auth"], r["status"]) for r in records]
    # The cut is on the name as sent (64 characters), then escaped: `\` is written `\\`.
    odd = 'q"uo\\\\te-\u00e9-' + "x" * 54 + "..."
    assert seen == [
        (GUESSER, None, "alice", "bad_credentials", 401),
        (GUESSER, None, None, "bad_credentials", 401),
        (GUESSER, None, None, "bad_credentials", 401),
        (SCANNER, None, odd, "bad_credentials", 401),
        (PERSISTENT, None, "bob", "bad_credentials", 401),
        (PERSISTENT, None, "bob", "bad_credentials", 401),
        (PERSISTENT, None, "bob", "throttled", 429),
        (USER, "carol", None, "success", 200),
        (USER, None, None, "no_credentials", 401),
        (USER, "carol", None, "cached", 200),
        (USER, None, None, "no_credentials", 401),
    ]
    log = trusting_proxy.log()
    assert WRONG not in log and users["carol"] not in log
    assert all(line.isascii() for line in access_lines(trusting_proxy))
    _, _, body = call(trusting_proxy.admin_url + "/metrics")
    metrics = body.decode()
    for name in ("alice", "bob", "carol", "uo\\te", "xxxxxxxx"):
        assert name not in metrics, name


# --- fail2ban --------------------------------------------------------------------------------


def fail2ban_tool(name: str) -> str:
    """A real fail2ban command; skips without it, except in CI (CI=true), where it must be."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing in CI (scripts/install-deps installs fail2ban)")
        pytest.skip(f"{name} is not installed (Debian's fail2ban package)")
    return found


def banned_hosts(log: Path) -> list[str]:
    """The host of every line the shipped filter matches, in order, by the real fail2ban-regex."""
    result = subprocess.run(
        [fail2ban_tool("fail2ban-regex"), "--out", "ip", str(log), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()


def docker_json_file(lines: list[str]) -> str:
    """`lines` as Docker's json-file log driver stores a container's output."""
    wrapped = [
        json.dumps(
            {"log": line + "\n", "stream": "stdout", "time": "2026-12-07T10:00:00.123456789Z"},
            separators=(",", ":"),
        )
        for line in lines
    ]
    return "\n".join(wrapped) + "\n"


def test_the_fail2ban_filter_matches_failed_logins_and_nothing_else(
    trusting_proxy: Proxy, users: dict[str, str], tmp_path: Path
) -> None:
    """Guards deploy/fail2ban: every wrong password, unknown user, malformed Basic and throttled
    login is one match with the client (IPv4 and IPv6) as the host; a success, a ping without
    credentials (docker's first request), a forged user agent and the proxy's stderr lines are
    not; the same holds for the lines inside Docker's json-file log."""
    failed_logins(trusting_proxy, users)
    expected = [GUESSER] * 3 + [SCANNER] + [PERSISTENT] * 3
    # The proxy's whole output, stderr lines included, as a container's log holds it.
    combined = tmp_path / "proxy.log"
    combined.write_text(trusting_proxy.log())
    assert banned_hosts(combined) == expected
    in_docker = tmp_path / "container-json.log"
    in_docker.write_text(docker_json_file(trusting_proxy.log().splitlines()))
    assert banned_hosts(in_docker) == expected


def test_the_jail_uses_the_filter_on_port_443_with_limits_above_the_proxys_own(
    tmp_path: Path,
) -> None:
    """Guards the shipped jail: the real fail2ban-client accepts it beside Debian's defaults;
    it names the filter, 443 and the log, and bans only clients that go on after the proxy's
    own throttle (10 failures) would have stopped a person who mistypes."""
    client = fail2ban_tool("fail2ban-client")
    jail = configparser.ConfigParser(interpolation=None)
    jail.read(JAIL)
    (name,) = jail.sections()
    section = jail[name]
    assert section["filter"] == FILTER.stem and section["enabled"] == "true"
    assert section["port"] == "443" and section["logpath"].startswith("/")
    assert int(section["maxretry"]) > 10
    config = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", config)
    shutil.rmtree(config / "jail.d")  # Debian's sshd jail: not ours to test
    (config / "jail.d").mkdir()
    shutil.copy(FILTER, config / "filter.d")
    log = tmp_path / "access.log"
    log.touch()
    (config / "jail.d" / JAIL.name).write_text(
        JAIL.read_text().replace(section["logpath"], str(log))
    )
    result = subprocess.run(
        [client, "-c", str(config), "-d"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jail_commands = result.stdout.splitlines()
    assert f"['set', '{name}', 'addlogpath', '{log}', 'head']" in jail_commands
    assert f"['start', '{name}']" in jail_commands
