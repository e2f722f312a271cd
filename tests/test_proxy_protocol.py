"""PROXY protocol on the public listener: the parser, the exact read, and the real HAProxy."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from proxy.edge.proxy_protocol import (
    HEADER_DEADLINE,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    ProxyProtocolListener,
    parse_header,
    read_header,
)
from tests.support import (
    Edge,
    Proxy,
    Registry,
    access_records,
    scrape,
    start_haproxy,
    value,
    wait_until,
    write_certificate,
)

CLIENTS = ("127.0.0.2", "127.0.0.3")


def v2(command: int, family: int, block: bytes, tlvs: bytes = b"") -> bytes:
    body = block + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def v2_tcp4(source: str, port: int, tlvs: bytes = b"") -> bytes:
    block = (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address("192.0.2.1").packed
        + struct.pack("!HH", port, 443)
    )
    return v2(1, 0x11, block, tlvs)


def v2_tcp6(source: str, port: int) -> bytes:
    block = (
        ipaddress.IPv6Address(source).packed
        + ipaddress.IPv6Address("2001:db8::1").packed
        + struct.pack("!HH", port, 443)
    )
    return v2(1, 0x21, block)


VALID = [
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n", ("203.0.113.7", 56324)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n", ("2001:db8::7", 1)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n", None),
    (v2_tcp4("203.0.113.7", 4000), ("203.0.113.7", 4000)),
    # A TLV (PP2_TYPE_AUTHORITY) after the addresses is skipped.
    (v2_tcp4("203.0.113.8", 4001, b"\x02\x00\x0fdocker.acme.com"), ("203.0.113.8", 4001)),
    (v2_tcp6("2001:db8::9", 4002), ("2001:db8::9", 4002)),
    (v2_tcp6("::ffff:198.51.100.4", 4003), ("198.51.100.4", 4003)),
    # LOCAL (a health check) and UNSPEC: the connection's own endpoints count.
    (v2(0, 0x00, b""), None),
    (v2(0, 0x11, b"\x00" * 12), None),
    (v2(1, 0x00, b""), None),
    (v2(1, 0x31, b"\x00" * 216), None),
]


@pytest.mark.parametrize(("header", "source"), VALID)
def test_valid_headers_name_their_source(header: bytes, source: tuple[str, int] | None) -> None:
    """Guards the reading of each form HAProxy and cloud balancers send."""
    assert parse_header(header + b"GET / HTTP/1.1\r\n") == ProxyHeader(source, len(header))


@pytest.mark.parametrize(("header", "source"), VALID)
def test_every_prefix_of_a_header_asks_for_more(
    header: bytes, source: tuple[str, int] | None
) -> None:
    """Guards the exact read: a partial header is never mistaken for a whole or a wrong one."""
    for end in range(1, len(header)):
        assert parse_header(header[:end]) is None, header[:end]


INVALID = [
    b"GET /v2/ HTTP/1.1\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00",  # a TLS ClientHello without a header first
    b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\n",  # LF alone
    b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\rX",
    b"PROXY TCP4 203.0.113.07 192.0.2.1 56324 443\r\n",  # leading zero
    b"PROXY TCP4 203.0.113.7 192.0.2.1 056324 443\r\n",
    b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 443\r\n",
    b"PROXY TCP4 2001:db8::7 192.0.2.1 1 443\r\n",  # family mismatch
    b"PROXY TCP6 fe80::1%eth0 fe80::2 1 443\r\n",
    b"PROXY TCP4  203.0.113.7 192.0.2.1 1 443\r\n",
    b"PROXY TCP4 203.0.113.7 192.0.2.1 1\r\n",
    b"PROXY UDP4 203.0.113.7 192.0.2.1 1 443\r\n",
    b"PROXY TCP4 " + b"1" * 120,  # no CRLF within 107 bytes
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a v2 header
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
    V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\x00" * 12,  # family 4
    V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12,  # UDP
    V2_SIGNATURE + b"\x21\x11\x00\x08" + b"\x00" * 8,  # TCP4 block too short
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # 64 KiB of "header"
]


@pytest.mark.parametrize("data", INVALID)
def test_anything_else_is_refused(data: bytes) -> None:
    """Guards against guessing: what does not follow the spec drops the connection."""
    with pytest.raises(ProxyProtocolError):
        parse_header(data)


@pytest.mark.parametrize(
    "header", [VALID[0][0], VALID[2][0], VALID[5][0]], ids=["v1", "v1-unknown", "v2-tlv"]
)
def test_the_header_is_consumed_to_the_byte(header: bytes) -> None:
    """Guards TLS passthrough: a ClientHello sent in the same segment stays in the socket."""
    following = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(64))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(header + following)
        found = asyncio.run(asyncio.wait_for(read_header(ours), 5))
        assert found.length == len(header)
        ours.setblocking(True)
        ours.settimeout(5)
        assert ours.recv(4096) == following


def test_proxy_protocol_without_trusted_proxies_refuses_to_start(htpasswd_file: Path) -> None:
    """Guards against a listener that believes PROXY headers from anyone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env.update(PROXY_HTPASSWD=str(htpasswd_file), PROXY_PROXY_PROTOCOL="true")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "environment PROXY_PROXY_PROTOCOL: proxy_protocol" in result.stderr
    assert "trusted_proxies" in result.stderr


# --- The real HAProxy in front ------------------------------------------------------------------


@pytest.fixture
def edges() -> Iterator[list[Edge]]:
    started: list[Edge] = []
    yield started
    for edge in started:
        edge.stop()


def curl(url: str, source: str, user: str, password: str, *extra: str) -> int:
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--interface", source,
         "-u", f"{user}:{password}", *extra, url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def access_clients(proxy: Proxy) -> list[str]:
    return [str(record["client"]) for record in access_records(proxy.log())]


def behind_the_protocol(start_proxy: Callable[..., Proxy], registry: Registry, **env: str) -> Proxy:
    return start_proxy(
        registry.url,
        PROXY_PROXY_PROTOCOL="true",
        PROXY_TRUSTED_PROXIES="127.0.0.1/32",
        PROXY_AUTH_MAX_FAILURES="3",
        **env,
    )


@pytest.mark.parametrize("send", ["send-proxy-v2", "send-proxy"])
def test_haproxy_tcp_mode_tells_clients_apart(
    send: str,
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    edges: list[Edge],
    tmp_path: Path,
    users: dict[str, str],
) -> None:
    """Guards the client address behind an L4 balancer: without the header every client is
    HAProxy's 127.0.0.1, and one guesser's failures block everyone."""
    proxy = behind_the_protocol(start_proxy, registry)
    edge = start_haproxy(tmp_path / "haproxy", proxy.port, mode="tcp", server_options=send)
    edges.append(edge)
    url = f"http://127.0.0.1:{edge.port}/v2/"
    good, guesser = CLIENTS
    for attempt in range(3):
        assert curl(url, guesser, f"mallory-{attempt}", "guess") == 401
    # Failures for three names block the address: alice's first login (not cached yet) from
    # the guesser's address is refused ...
    assert curl(url, guesser, "alice", users["alice"]) == 429
    # ... and only there.
    assert curl(url, good, "alice", users["alice"]) == 200
    wait_until(lambda: len(access_clients(proxy)) == 5, "five access records")
    assert access_clients(proxy) == [guesser, guesser, guesser, guesser, good]
    # The registry hears of the client, not of HAProxy.
    wait_until(
        lambda: f"http.request.remoteaddr={good}" in registry.log(),
        "the registry to log the client's address",
    )


def test_haproxy_tls_passthrough(
    ca: trustme.CA,
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    edges: list[Edge],
    tmp_path: Path,
    users: dict[str, str],
) -> None:
    """Guards the order header-then-TLS: the proxy terminates TLS after reading the header
    on the raw connection, with its own certificate, and still knows the client."""
    certs = tmp_path / "certs"
    certs.mkdir()
    write_certificate(ca, certs)
    ca.cert_pem.write_to_path(str(certs / "ca.crt"))
    proxy = behind_the_protocol(
        start_proxy,
        registry,
        PROXY_TLS_CERT=str(certs / "cert.pem"),
        PROXY_TLS_KEY=str(certs / "key.pem"),
    )
    edge = start_haproxy(
        tmp_path / "haproxy", proxy.port, mode="tcp", server_options="send-proxy-v2"
    )
    edges.append(edge)
    url = f"https://127.0.0.1:{edge.port}/v2/"
    cacert = ("--cacert", str(certs / "ca.crt"))
    for source in CLIENTS:
        assert curl(url, source, "alice", users["alice"], *cacert) == 200
    wait_until(lambda: len(access_clients(proxy)) == 2, "two access records")
    assert access_clients(proxy) == list(CLIENTS)
    assert '"status":200' in proxy.log()


# --- Connections the listener drops --------------------------------------------------------------


def dropped_unanswered(sock: socket.socket) -> bool:
    """True when the proxy closed the connection without sending a byte."""
    sock.settimeout(15)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def rejected(proxy: Proxy, reason: str) -> float:
    return value(scrape(proxy), "registry_proxy_proxy_protocol_rejected_total", reason=reason)


def test_peers_outside_trusted_proxies_are_dropped(
    registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards against anyone naming a client: 127.0.0.1 is not a trusted balancer here."""
    proxy = start_proxy(
        registry.url, PROXY_PROXY_PROTOCOL="true", PROXY_TRUSTED_PROXIES="10.0.0.0/8"
    )
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 443\r\nGET /v2/ HTTP/1.1\r\n\r\n")
        assert dropped_unanswered(sock)
    wait_until(lambda: rejected(proxy, "untrusted_peer") == 1, "the rejection to be counted")


def test_connections_without_a_header_are_dropped(
    registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards the spec's rule that the receiver never guesses whether a header is there."""
    proxy = start_proxy(
        registry.url, PROXY_PROXY_PROTOCOL="true", PROXY_TRUSTED_PROXIES="127.0.0.1"
    )
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert dropped_unanswered(sock)
    wait_until(lambda: rejected(proxy, "invalid_header") == 1, "the invalid header counted")
    assert not access_records(proxy.log())


async def test_a_header_that_stops_short_is_dropped_at_the_deadline() -> None:
    """Guards the header deadline (the listener's own, shortened here from HEADER_DEADLINE): a
    trusted peer that starts a header and sends no more is dropped without an answer, counted
    as a timeout, and its connection never reaches the HTTP side."""
    assert HEADER_DEADLINE > 3  # the wait below would not tell the two deadlines apart
    reasons: list[str] = []
    handed_over: list[asyncio.Transport] = []

    def enter(
        transport: asyncio.Transport, addressing: Callable[[asyncio.Transport], asyncio.Transport]
    ) -> None:
        handed_over.append(transport)

    trusted = [ipaddress.ip_network("127.0.0.1/32")]
    listener = ProxyProtocolListener(enter, trusted, reasons.append, deadline=0.2)
    server = await asyncio.get_running_loop().create_server(listener, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PROXY TCP4 ")  # and then nothing
        async with asyncio.timeout(3):
            assert await reader.read() == b""
        writer.close()
    finally:
        listener.close()
        server.close()
        await server.wait_closed()
    assert reasons == ["timeout"]
    assert handed_over == []


def test_many_connections_at_once_each_keep_their_own_client(
    registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards the hand-over under concurrency: 200 connections whose headers arrive together
    each get an answer, and each request is logged with its own header's source."""
    proxy = start_proxy(
        registry.url, PROXY_PROXY_PROTOCOL="true", PROXY_TRUSTED_PROXIES="127.0.0.1"
    )
    sources = [f"198.51.100.{n}" for n in range(1, 201)]

    async def one(source: str, version: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        header = (
            v2_tcp4(source, 40000)
            if version == 2
            else f"PROXY TCP4 {source} 192.0.2.1 1 443\r\n".encode()
        )
        writer.write(header + b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        return answer

    async def all_at_once() -> list[bytes]:
        return await asyncio.wait_for(
            asyncio.gather(*(one(s, 1 + n % 2) for n, s in enumerate(sources))), 60
        )

    answers = asyncio.run(all_at_once())
    assert all(answer.startswith(b"HTTP/1.1 401 ") for answer in answers)
    wait_until(lambda: len(access_clients(proxy)) == len(sources), "an access record each")
    assert sorted(access_clients(proxy)) == sorted(sources)


@pytest.mark.parametrize(
    "header",
    [b"PROXY UNKNOWN\r\n", V2_SIGNATURE + b"\x20\x00\x00\x00", V2_SIGNATURE + b"\x21\x00\x00\x00"],
    ids=["v1-unknown", "v2-local", "v2-unspec"],
)
def test_a_header_naming_nobody_leaves_x_forwarded_for_unread(
    registry: Registry, start_proxy: Callable[..., Proxy], header: bytes
) -> None:
    """Class: a client choosing its own address: behind a TCP-mode balancer the HTTP bytes are
    the client's, so when the header names nobody (LOCAL, UNKNOWN, UNSPEC) the peer is still the
    trusted balancer and the client's own X-Forwarded-For was believed (throttle key, log)."""
    proxy = behind_the_protocol(start_proxy, registry)
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            header + b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.66\r\n"
            b"Connection: close\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 401 ")
    wait_until(lambda: bool(access_clients(proxy)), "the access record")
    assert access_clients(proxy) == ["127.0.0.1"]
