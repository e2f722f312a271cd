"""X-Forwarded-For behind trusted proxies: odd hop shapes, chains, and real nginx and HAProxy."""

from __future__ import annotations

import http.client
import ipaddress
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.edge.forwarded import MalformedHop, canonical_address, forwarded_client, hops
from tests import support
from tests.support import Edge, Proxy, Registry, start_haproxy, start_nginx, wait_until
from tests.support import basic_auth as basic

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ff::/48"))


@pytest.mark.parametrize(
    ("hop", "address"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("203.0.113.7:51234", "203.0.113.7"),
        ("2001:db8::7", "2001:db8::7"),
        ("2001:DB8:0::7", "2001:db8::7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("[::ffff:203.0.113.7]:8080", "203.0.113.7"),
        # Not addresses: names, RFC 7239 tokens, zones, bad ports and brackets, junk.
        ("unknown", None),
        ("_hidden", None),
        ("docker.acme.com", None),
        ("fe80::1%eth0", None),
        ("203.0.113.7:", None),
        ("203.0.113.7:0", None),
        ("203.0.113.7:65536", None),
        ("203.0.113.7:http", None),
        ("[203.0.113.7]:80", None),
        ("[2001:db8::7", None),
        ("[2001:db8::7]x", None),
        ("203.0.113.07", None),
        ("", None),
        # Class: digits to str.isdigit, not ports: superscripts made int() raise (llhttp refuses
        # such header bytes today, so only the parser stands between them and a 500); other
        # scripts' digits int() read as a port.
        ("203.0.113.7:\u00b2", None),
        ("[2001:db8::7]:\u00b9", None),
        ("203.0.113.7:\u0663", None),
    ],
)
def test_each_hop_shape(hop: str, address: str | None) -> None:
    """Guards the normalisation: a port or brackets never make another address."""
    assert canonical_address(hop) == address


def test_the_rightmost_untrusted_hop_is_the_client() -> None:
    """Guards the reading order: the leftmost hop is whatever the client wrote."""
    chain = hops(["198.51.100.66, 203.0.113.7", "10.1.1.1,10.2.2.2"])
    assert chain == ["198.51.100.66", "203.0.113.7", "10.1.1.1", "10.2.2.2"]
    assert forwarded_client("10.9.9.9", chain, TRUSTED) == "203.0.113.7"
    # A port the edge appended is the same client.
    assert forwarded_client("10.9.9.9", ["203.0.113.7:4444"], TRUSTED) == "203.0.113.7"
    assert forwarded_client("2001:db8:ff::1", ["[2001:db8::7]:1"], TRUSTED) == "2001:db8::7"


def test_an_untrusted_peer_is_the_client_whatever_it_says() -> None:
    assert forwarded_client("203.0.113.7", ["10.1.1.1"], TRUSTED) == "203.0.113.7"
    assert forwarded_client("203.0.113.7", ["unknown"], TRUSTED) == "203.0.113.7"
    assert forwarded_client("10.9.9.9", [], TRUSTED) == "10.9.9.9"


def test_a_malformed_hop_is_refused_only_where_it_must_be_read() -> None:
    """Guards the throttle key: junk reached through trusted hops is an error, never a key."""
    with pytest.raises(MalformedHop):
        forwarded_client("10.9.9.9", ["203.0.113.7", "unknown"], TRUSTED)
    with pytest.raises(MalformedHop):
        forwarded_client("10.9.9.9", ["bogus", "10.1.1.1"], TRUSTED)
    # Left of the client it is the client's own writing, and ignored.
    assert forwarded_client("10.9.9.9", ["bogus", "203.0.113.7"], TRUSTED) == "203.0.113.7"


# --- Through the running proxy -------------------------------------------------------------------


def access_records(proxy: Proxy) -> list[dict[str, object]]:
    return support.access_records(proxy.log())


def request(
    proxy: Proxy, path: str, headers: list[tuple[str, str]], method: str = "GET"
) -> tuple[int, dict[str, str]]:
    """One request with headers as given, repeated names included."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        response.read()
        return response.status, dict(response.headers)
    finally:
        connection.close()


def alice(users: dict[str, str]) -> list[tuple[str, str]]:
    return list(basic("alice", users["alice"]).items())


def test_forwarding_headers_from_a_peer_outside_trusted_proxies_are_ignored(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards the trust check: trusted_proxies is set, but 127.0.0.1 is not in it."""
    proxy = start_proxy(registry.url, PROXY_TRUSTED_PROXIES="10.0.0.0/8")
    status, reply = request(
        proxy,
        "/v2/edge/blobs/uploads/",
        [*alice(users), ("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https")],
        "POST",
    )
    assert status == 202
    assert reply["Location"].startswith(f"http://{proxy.host}/")
    wait_until(lambda: len(access_records(proxy)) == 1, "the access record")
    assert access_records(proxy)[0]["client"] == "127.0.0.1"


def test_a_chain_through_two_trusted_proxies_names_the_client(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards multi-hop chains in several headers: the client is the rightmost untrusted hop,
    not the leftmost (the client's own words) nor a proxy's."""
    proxy = start_proxy(registry.url, PROXY_TRUSTED_PROXIES="127.0.0.0/8,10.0.0.0/8")
    chain = [
        ("X-Forwarded-For", "198.51.100.66, 203.0.113.7:1234"),
        ("X-Forwarded-For", "10.1.2.3"),
    ]
    assert request(proxy, "/v2/", [*alice(users), *chain])[0] == 200
    wait_until(lambda: len(access_records(proxy)) == 1, "the access record")
    assert access_records(proxy)[0]["client"] == "203.0.113.7"
    wait_until(
        lambda: "http.request.remoteaddr=203.0.113.7" in registry.log(),
        "the registry to hear of the client",
    )


def test_ports_do_not_make_new_addresses_for_the_throttle(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards the throttle behind edges that append `IP:port`: each port used to count as a
    new client, so a guesser was never blocked."""
    proxy = start_proxy(
        registry.url, PROXY_TRUSTED_PROXIES="127.0.0.1", PROXY_AUTH_MAX_FAILURES="3"
    )
    for port in (1001, 1002, 1003):
        hop = [("X-Forwarded-For", f"203.0.113.7:{port}")]
        wrong = list(basic(f"user{port}", "wrong").items())
        assert request(proxy, "/v2/", [*wrong, *hop])[0] == 401
    status, _ = request(proxy, "/v2/", [*alice(users), ("X-Forwarded-For", "203.0.113.7:1004")])
    assert status == 429
    assert (
        request(proxy, "/v2/", [*alice(users), ("X-Forwarded-For", "[::ffff:203.0.113.8]:1")])[0]
        == 200
    )


def test_a_malformed_hop_from_a_trusted_proxy_is_a_400_and_never_forwarded(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards the key choice: `unknown` where the client should be would make every such
    client one throttle key, or a key of the client's choosing."""
    proxy = start_proxy(registry.url, PROXY_TRUSTED_PROXIES="127.0.0.1")
    repo = f"xff/{uuid.uuid4().hex[:8]}"
    status, reply = request(
        proxy, f"/v2/{repo}/tags/list", [*alice(users), ("X-Forwarded-For", "unknown")]
    )
    assert status == 400 and reply["Content-Type"].startswith("application/json")
    assert not any(repo in uri for uri in registry.requested_uris())
    assert "malformed X-Forwarded-For hop unknown" in proxy.log()


# --- Real edges in HTTP mode ---------------------------------------------------------------------


@pytest.fixture
def edges() -> Iterator[list[Edge]]:
    started: list[Edge] = []
    yield started
    for edge in started:
        edge.stop()


def curl(url: str, source: str, password: str) -> int:
    """A request from `source` that also tries to choose its own address."""
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--interface", source,
         "-H", "X-Forwarded-For: 198.51.100.66", "-u", f"alice:{password}", url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.parametrize("edge_kind", ["haproxy", "nginx"])
def test_http_edges_name_each_client(
    edge_kind: str,
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    edges: list[Edge],
    tmp_path: Path,
    users: dict[str, str],
) -> None:
    """Guards the documented HTTP-mode topologies: HAProxy `option forwardfor` (a header of
    its own) and nginx `$proxy_add_x_forwarded_for` (appended to the client's)."""
    proxy = start_proxy(registry.url, PROXY_TRUSTED_PROXIES="127.0.0.1/32")
    if edge_kind == "haproxy":
        edge = start_haproxy(tmp_path / "edge", proxy.port, mode="http", server_options="")
    else:
        edge = start_nginx(tmp_path / "edge", proxy.port)
    edges.append(edge)
    for source in ("127.0.0.2", "127.0.0.3"):
        assert curl(f"http://127.0.0.1:{edge.port}/v2/", source, users["alice"]) == 200
    wait_until(lambda: len(access_records(proxy)) == 2, "two access records")
    assert [r["client"] for r in access_records(proxy)] == ["127.0.0.2", "127.0.0.3"]
