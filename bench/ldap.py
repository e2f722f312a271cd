"""LDAP login latency: first logins and cached requests through the proxy, at 32 connections.

`python -m bench.ldap [--users N] [--requests N]` (from the repository root) starts the real
registry, a real OpenLDAP slapd (StartTLS with a test CA, as tests/test_ldap.py does) and the
proxy with the `ldap` block, adds N directory users, then:

1. **first login**: 32 connections each send `GET /v2/` as users nobody has logged in as yet
   (each request is a directory round trip: StartTLS, service bind, user search, group search,
   user bind), N requests in all;
2. **cached**: the same 32 connections send `GET /v2/` as users already logged in (the login
   cache answers, no directory), `--requests` in all; and the same as an htpasswd user (its
   cache answers too), the baseline of the proxy and registry on this machine.

A quarter of the users first log in one at a time on one connection (a login's own latency;
at 32 connections logins queue for the directory pool's four threads).

It prints the p50 and p95 of each in milliseconds and one JSON line. Nothing about speed is
asserted; the figures compare only within one run on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
from pathlib import Path

import trustme

from bench.latency import summary, timed_gets
from tests.support import Proxy, Registry, Slapd, htpasswd

CONNECTIONS = 32
PEOPLE = "ou=people,dc=example,dc=org"


def _authorization(user: str) -> str:
    # Directory users are benchN with password benchN-pw; the htpasswd user is admin.
    return "Basic " + base64.b64encode(f"{user}:{user}-pw".encode()).decode()


def _users_ldif(count: int) -> str:
    return "\n".join(
        f"dn: uid=bench{i},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: bench{i}\n"
        f"cn: bench{i}\nsn: bench{i}\nuserPassword: bench{i}-pw\n"
        for i in range(count)
    )


async def _timed_gets(url: str, users: list[str], connections: int = CONNECTIONS) -> list[float]:
    """GET `url` once per user, `connections` at a time; seconds per request."""
    return await timed_gets(url, [_authorization(user) for user in users], connections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ldap", description=__doc__)
    parser.add_argument("--users", type=int, default=320, help="first logins (default 320)")
    parser.add_argument("--requests", type=int, default=3200, help="cached requests")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-ldap-"))
    registry = Registry(root / "registry", quiet=True)
    slapd = Slapd(root / "slapd", trustme.CA())
    password_file = root / "htpasswd"
    htpasswd(password_file, "-B", "-C", "10", user="admin", password="admin-pw")  # admin:admin-pw
    registry.start()
    slapd.start()
    proxy = None
    try:
        slapd.modify(_users_ldif(args.users))
        env = {
            **slapd.proxy_env(PROXY_LDAP_TIMEOUT="5"),
            "PROXY_AUTH_MAX_FAILURES": "1000000",
            "PROXY_AUTH_MAX_FAILURES_PER_USER": "1000000",
            "PROXY_LOG_LEVEL": "warning",
            "PROXY_ACCESS_LOG": "off",
        }
        proxy = Proxy(root / "proxy", registry.url, password_file, env)
        proxy.start()
        users = [f"bench{i}" for i in range(args.users)]
        url = proxy.url + "/v2/"
        alone = asyncio.run(_timed_gets(url, users[: args.users // 4], connections=1))
        first = asyncio.run(_timed_gets(url, users[args.users // 4 :]))
        repeated = [users[i % len(users)] for i in range(args.requests)]
        cached = asyncio.run(_timed_gets(url, repeated))
        # The same requests as an htpasswd user, cached too: the proxy's own cost here.
        baseline = asyncio.run(_timed_gets(url, ["admin"] * args.requests))
    finally:
        if proxy is not None:
            proxy.stop()
        slapd.stop()
        registry.stop()
    result = {"connections": CONNECTIONS, "first_login_one_connection": summary(alone),
              "first_login": summary(first), "cached": summary(cached),
              "htpasswd_cached": summary(baseline)}  # fmt: skip
    print(f"LDAP first login, one connection: p50 {result['first_login_one_connection']['p50_ms']}"
          f" ms ({len(alone)} requests)")  # fmt: skip
    print(f"LDAP first login at {CONNECTIONS} connections: p50 {result['first_login']['p50_ms']} "
          f"ms, p95 {result['first_login']['p95_ms']} ms ({len(first)} requests)")  # fmt: skip
    print(f"LDAP cached request at {CONNECTIONS} connections: p50 {result['cached']['p50_ms']} "
          f"ms, p95 {result['cached']['p95_ms']} ms ({len(cached)} requests)")  # fmt: skip
    print(f"htpasswd cached request at {CONNECTIONS} connections: p50 "
          f"{result['htpasswd_cached']['p50_ms']} ms ({len(baseline)} requests)")  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
