"""Memory held by connections that send an unfinished request head at the proxy's cap."""

from __future__ import annotations

import socket
import time

from bench.client import BenchError, status_kib
from tests.support.harness import unread_bytes

# The proxy's cap (proxy/edge/connection.py HEAD_LIMIT); the heads stay just below it.
HEAD_LIMIT = 32 * 1024
# Source addresses the connections come from (loopback), under max_connections_per_client.
SOURCES = 10
SETTLE_DEADLINE = 30.0
# Connections per run mode; the figure is scaled to 1,000.
COUNTS = {"full": 1000, "small": 200}


def unfinished_head() -> bytes:
    head = b"GET /v2/ HTTP/1.1\r\nHost: bench\r\n"
    line = b"X-Pad: " + b"a" * 4000 + b"\r\n"
    while len(head) + len(line) <= HEAD_LIMIT - 256:
        head += line
    return head


def unfinished_heads_rss(port: int, pid: int, count: int) -> tuple[float, int]:
    """Open `count` connections each holding an unfinished head near the cap; the proxy's RSS
    growth in MB once it has read them all, and how many it had answered or closed (none
    should be: the heads are under the cap)."""
    head = unfinished_head()
    before = status_kib(pid, "VmRSS")
    held: list[socket.socket] = []
    try:
        for index in range(count):
            sock = socket.socket()
            sock.bind((f"127.0.2.{10 + index % SOURCES}", 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(head)
            held.append(sock)
        deadline = time.monotonic() + SETTLE_DEADLINE
        while unread_bytes(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        if unread_bytes(port):
            raise BenchError(f"the proxy did not read {count} heads within {SETTLE_DEADLINE}s")
        added = (status_kib(pid, "VmRSS") - before) * 1024 / 1_000_000
        dropped = 0
        for sock in held:
            sock.setblocking(False)
            try:
                sock.recv(1)
                dropped += 1
            except BlockingIOError:
                pass
        return added, dropped
    finally:
        for sock in held:
            sock.close()
