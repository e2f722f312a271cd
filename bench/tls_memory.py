"""Memory held by TLS connections on the proxy: idle after their handshake, and pending (never
sending a ClientHello), the proxy's RSS growth per 1,000 of each."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from bench.client import BenchError, open_fds, status_kib
from bench.heads import unfinished_head
from tests.support.harness import unread_bytes

# Source addresses the connections come from (loopback), under max_connections_per_client.
SOURCES = 10
SETTLE_DEADLINE = 60.0
# Connections per run mode; the figures are scaled to 1,000.
COUNTS = {"full": 1000, "small": 200}
# The proxy's handshake deadline for the run: pending handshakes must outlive the reading.
HANDSHAKE_TIMEOUT = 600
MB = 1_000_000


def write_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1: (certificate chain, key, CA bundle)."""
    import trustme

    ca = trustme.CA()
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, bundle = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    issued.private_key_pem.write_to_path(str(key))
    for index, pem in enumerate(issued.cert_chain_pems):
        pem.write_to_path(str(cert), append=index > 0)
    ca.cert_pem.write_to_path(str(bundle))
    return cert, key, bundle


def _server_sockets(port: int) -> int:
    """Connections the proxy's side of `port` still has (established, or closed by the client
    and not yet by the proxy), from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] in ("01", "08"):
            count += 1
    return count


def _settle(port: int, done: Callable[[], bool], what: str) -> None:
    """Wait until `done()` holds and the proxy has accepted every connection and read every
    byte (an empty accept queue and receive queues)."""
    deadline = time.monotonic() + SETTLE_DEADLINE
    while time.monotonic() < deadline:
        if done() and not unread_bytes(port):
            return
        time.sleep(0.05)
    raise BenchError(f"{what}: not settled after {SETTLE_DEADLINE}s")


def _held(
    port: int, pid: int, count: int, connect: Callable[[socket.socket], socket.socket], what: str
) -> float:
    """Open `count` connections with `connect`; the proxy's RSS growth in MB once it holds
    them all (every one accepted, every byte read). After they are closed it lets them go."""
    _settle(port, lambda: _server_sockets(port) == 0, f"{what}: earlier connections closed")
    before = status_kib(pid, "VmRSS")
    fds = open_fds(pid)
    held: list[socket.socket] = []
    try:
        for index in range(count):
            sock = socket.socket()
            sock.bind((f"127.0.4.{10 + index % SOURCES}", 0))
            sock.connect(("127.0.0.1", port))
            held.append(connect(sock))
        _settle(port, lambda: open_fds(pid) >= fds + count, what)
        return (status_kib(pid, "VmRSS") - before) * 1024 / MB
    finally:
        for sock in held:
            sock.close()
        _settle(port, lambda: _server_sockets(port) == 0, f"{what}: closed")


def warm_up(port: int, bundle: Path) -> None:
    """One request over TLS, so what every connection shares is loaded before a reading."""
    context = ssl.create_default_context(cafile=str(bundle))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        if not tls.recv(64).startswith(b"HTTP/1.1 401 "):
            raise BenchError("GET /v2/ over TLS: not a 401")


def pending_handshakes_rss(port: int, pid: int, count: int, bundle: Path) -> float:
    """RSS growth in MB for `count` connections that never send a ClientHello."""
    return _held(port, pid, count, lambda sock: sock, "pending handshakes")


def idle_tls_rss(port: int, pid: int, count: int, bundle: Path) -> float:
    """RSS growth in MB for `count` connections idle after a finished handshake."""
    context = ssl.create_default_context(cafile=str(bundle))

    def handshake(sock: socket.socket) -> socket.socket:
        return context.wrap_socket(sock, server_hostname="127.0.0.1")

    return _held(port, pid, count, handshake, "idle TLS connections")


def unfinished_heads_tls_rss(port: int, pid: int, count: int, bundle: Path) -> float:
    """RSS growth in MB for `count` TLS connections holding an unfinished head near the cap."""
    context = ssl.create_default_context(cafile=str(bundle))
    head = unfinished_head()

    def handshake_and_head(sock: socket.socket) -> socket.socket:
        tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
        tls.sendall(head)
        return tls

    return _held(port, pid, count, handshake_and_head, "unfinished heads over TLS")


# (figure, what is held, how): each read on a proxy of its own, since a proxy that held and
# let go of connections before reuses what its allocator kept and shows less growth.
READINGS: tuple[tuple[str, str, Callable[[int, int, int, Path], float]], ...] = (
    ("rss_tls_pending_per_1000", "pending TLS handshakes", pending_handshakes_rss),
    ("rss_tls_idle_per_1000", "idle TLS connections", idle_tls_rss),
    ("rss_tls_heads_per_1000", "unfinished heads over TLS", unfinished_heads_tls_rss),
)
