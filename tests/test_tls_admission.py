"""Connections limited before their TLS handshake, and handshakes with a deadline.

Class: connection and memory exhaustion before TLS. Every connection counts against
`max_connections` and `max_connections_per_client` from the moment it is accepted (after the
PROXY header, when there is one), beyond the caps it is closed before any TLS work, and a
handshake that does not finish within `tls_handshake_timeout` is closed.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from asyncio import sslproto
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from proxy.config import ConfigError
from proxy.edge.internals import SSL_PROTOCOL_BUFFER
from proxy.edge.listen import listen
from proxy.edge.tls import TLS_READ_BUFFER
from proxy.preflight import require_aiohttp
from tests.support import Proxy, Registry, scrape, value, wait_until, write_certificate

MiB = 1 << 20
# Long enough that no silent connection in the cap tests is closed by its handshake deadline.
PATIENT = "120"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(ca: trustme.CA, tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    directory.mkdir()
    write_certificate(ca, directory)
    return directory


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def tls_proxy(
    start_proxy: Callable[..., Proxy], registry: Registry, certs: Path, **env: str
) -> Proxy:
    return start_proxy(
        registry.url,
        PROXY_TLS_CERT=str(certs / "cert.pem"),
        PROXY_TLS_KEY=str(certs / "key.pem"),
        **env,
    )


def open_silent(
    held: list[socket.socket], port: int, source: str, count: int, first: bytes = b""
) -> list[socket.socket]:
    """`count` connections from `source` that send `first` (if anything) and then nothing."""
    opened = []
    for _ in range(count):
        sock = socket.socket()
        held.append(sock)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        if first:
            sock.sendall(first)
        sock.setblocking(False)
        opened.append(sock)
    return opened


def closed_by_proxy(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def settle(sockets: list[socket.socket], closed: int, what: str) -> int:
    """Wait until the proxy has closed `closed` of `sockets`; how many it keeps open."""
    shut: set[int] = set()

    def enough() -> bool:
        shut.update(index for index, sock in enumerate(sockets) if closed_by_proxy(sock))
        return len(shut) >= closed

    wait_until(enough, what, deadline=30)
    return len(sockets) - len(shut)


def https_status(proxy: Proxy, context: ssl.SSLContext, source: str) -> bytes:
    """The status line of GET /v2/ over a fresh TLS connection from `source`."""
    with (
        socket.create_connection(
            ("127.0.0.1", proxy.port), timeout=10, source_address=(source, 0)
        ) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(
            f"GET /v2/ HTTP/1.1\r\nHost: {proxy.host}\r\nConnection: close\r\n\r\n".encode()
        )
        return tls.recv(64).split(b"\r\n")[0]


def test_silent_connections_from_one_address_are_held_to_the_per_client_cap(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    certs: Path,
    client_context: ssl.SSLContext,
    held: list[socket.socket],
) -> None:
    """40 connections from one address that never send a ClientHello: 8 stay open (the cap),
    32 are closed without a byte, and another address still gets through."""
    proxy = tls_proxy(
        start_proxy, registry, certs,
        PROXY_MAX_CONNECTIONS_PER_CLIENT="8", PROXY_TLS_HANDSHAKE_TIMEOUT=PATIENT,
    )  # fmt: skip
    sockets = open_silent(held, proxy.port, "127.0.0.2", 40)
    assert settle(sockets, 32, "32 connections beyond the cap closed") == 8
    assert value(scrape(proxy), "registry_proxy_client_connections_refused_total") == 32
    assert https_status(proxy, client_context, "127.0.0.3") == b"HTTP/1.1 401 Unauthorized"
    assert not any(closed_by_proxy(sock) for sock in sockets[:8])


def test_silent_connections_from_many_addresses_are_held_to_max_connections(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    certs: Path,
    held: list[socket.socket],
) -> None:
    """100 silent connections from 25 addresses against `max_connections: 64`: 36 closed."""
    proxy = tls_proxy(
        start_proxy, registry, certs,
        PROXY_MAX_CONNECTIONS="64", PROXY_TLS_HANDSHAKE_TIMEOUT=PATIENT,
    )  # fmt: skip
    sockets: list[socket.socket] = []
    for index in range(25):
        sockets += open_silent(held, proxy.port, f"127.0.3.{10 + index}", 4)
    assert settle(sockets, 36, "36 connections beyond max_connections closed") == 64
    assert value(scrape(proxy), "registry_proxy_connections_refused_total") == 36


def test_a_stalled_client_behind_the_proxy_protocol_is_held_to_its_cap(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    certs: Path,
    held: list[socket.socket],
) -> None:
    """A balancer sends the PROXY header for one client, who then never sends a ClientHello:
    that client holds its 4 places of 20 connections, counted once the header is read."""
    proxy = tls_proxy(
        start_proxy, registry, certs,
        PROXY_PROXY_PROTOCOL="true", PROXY_TRUSTED_PROXIES="127.0.0.1/32",
        PROXY_MAX_CONNECTIONS_PER_CLIENT="4", PROXY_TLS_HANDSHAKE_TIMEOUT=PATIENT,
    )  # fmt: skip
    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n"
    sockets = open_silent(held, proxy.port, "127.0.0.1", 20, first=header)
    assert settle(sockets, 16, "16 of the client's connections closed") == 4
    assert value(scrape(proxy), "registry_proxy_client_connections_refused_total") == 16


@pytest.mark.parametrize(
    "first",
    [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
    ids=["silent", "half-a-client-hello"],
)
def test_a_handshake_that_never_finishes_is_closed_and_gives_its_place_back(
    first: bytes,
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    certs: Path,
    client_context: ssl.SSLContext,
    held: list[socket.socket],
) -> None:
    """`tls_handshake_timeout` closes a connection stuck before the end of its handshake
    (asyncio alone waits 60 s, whatever keepalive_timeout says), and its place comes back:
    with a cap of 1, the address gets in again once the stuck one is gone, and again after
    handshakes that failed."""
    proxy = tls_proxy(
        start_proxy, registry, certs,
        PROXY_MAX_CONNECTIONS_PER_CLIENT="1", PROXY_TLS_HANDSHAKE_TIMEOUT="1",
    )  # fmt: skip
    [stuck] = open_silent(held, proxy.port, "127.0.0.2", 1, first=first)
    assert settle([stuck], 1, "the stuck handshake closed") == 0
    assert https_status(proxy, client_context, "127.0.0.2") == b"HTTP/1.1 401 Unauthorized"
    # A failed handshake (plain HTTP on the TLS listener) gives its place back too.
    for _ in range(3):
        [plain] = open_silent(held, proxy.port, "127.0.0.2", 1, first=b"GET / HTTP/1.1\r\n\r\n")
        assert settle([plain], 1, "the failed handshake closed") == 0
    assert https_status(proxy, client_context, "127.0.0.2") == b"HTTP/1.1 401 Unauthorized"


async def test_an_accepted_tls_connection_reads_into_the_bounded_buffer(
    ca: trustme.CA, client_context: ssl.SSLContext
) -> None:
    """Class: memory per TLS connection. The accepted connection's TLS read buffer is
    TLS_READ_BUFFER, not asyncio's 256 KiB, and is that again once an upload has passed."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def swallow(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    app = web.Application(client_max_size=8 * MiB)
    app.router.add_post("/", swallow)
    runner = web.AppRunner(app)
    await runner.setup()
    assert runner.server is not None
    listener = await listen(runner.server, {}, "127.0.0.1", 0, max_connections=10,
                            on_refused=lambda: None, ssl_context=server_context)  # fmt: skip
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context, server_hostname="127.0.0.1"
        )
        async with asyncio.timeout(10):
            while not runner.server.connections:
                await asyncio.sleep(0)
        transport = runner.server.connections[0].transport
        assert transport is not None
        layer = transport._ssl_protocol  # type: ignore[attr-defined]
        assert TLS_READ_BUFFER < 256 * 1024
        assert len(layer._ssl_buffer) == TLS_READ_BUFFER
        # A 4 MiB upload, then a small request on the same connection.
        for body in (b"x" * 4 * MiB, b"y"):
            writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
            writer.write(body)
            async with asyncio.timeout(30):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                assert await reader.readexactly(length) == str(len(body)).encode()
        assert len(layer._ssl_buffer) == TLS_READ_BUFFER
        writer.close()
    finally:
        listener.close()
        await runner.cleanup()


@pytest.mark.parametrize("name", SSL_PROTOCOL_BUFFER)
def test_the_start_up_check_names_a_missing_tls_buffer(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the names tls.py sizes the TLS read buffer through (set in SSLProtocol's
    __init__, so no class attribute shows them): without one, the proxy refuses to start."""
    made = sslproto.SSLProtocol.__init__

    @functools.wraps(made)
    def without(self: sslproto.SSLProtocol, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        delattr(self, name)

    monkeypatch.setattr(sslproto.SSLProtocol, "__init__", without)
    with pytest.raises(ConfigError) as refused:
        require_aiohttp()
    assert f"SSLProtocol has no {name}" in str(refused.value)
