"""Per-client limits hold per host: with `workers: 2` one client gets what is configured, not
twice as much."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.auth.pacing import RefusalPacer
from proxy.host_share import worker_share
from tests.support import (
    Proxy,
    Registry,
    gauge,
    http_status,
    push_blob,
    session_from,
    start_stalled_download,
    status_of,
    token,
    wait_until,
)
from tests.support.clock import Clock

MiB = 1 << 20
WORKERS = "2"


def start_workers(
    start_proxy: Callable[..., Proxy], upstream: str, htpasswd: Path | None = None, **env: str
) -> Proxy:
    """A proxy with two workers, once both serve (connections then land on either)."""
    proxy = start_proxy(upstream, htpasswd, PROXY_WORKERS=WORKERS, **env)
    wait_until(lambda: http_status(proxy.admin_url + "/readyz") == 200, "every worker ready")
    return proxy


@pytest.mark.parametrize(
    ("limit", "workers", "share"), [(6, 2, 3), (7, 2, 3), (256, 3, 85), (1, 4, 1), (8, 1, 8)]
)
def test_a_worker_gets_its_part_of_a_per_client_limit(limit: int, workers: int, share: int) -> None:
    """Rounded down (one client never exceeds the limit on the host), at least one."""
    assert worker_share(limit, workers) == share


def test_the_refusal_pacer_paces_its_part_of_an_address_refusals() -> None:
    """With two workers each gives an address half the burst, refilled at half the rate."""
    clock = Clock()
    pacer = RefusalPacer(burst=100, per_second=100, delay=1.0, clock=clock, workers=2)
    assert [pacer.delay_for("203.0.113.1") for _ in range(51)] == [0.0] * 50 + [1.0]
    clock.now += 0.02  # one refusal's worth at 50 a second
    assert [pacer.delay_for("203.0.113.1") for _ in range(2)] == [0.0, 1.0]


async def test_one_address_cannot_hold_more_connections_than_its_cap_across_workers(
    registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    """Class: per-client limits multiplied by the workers. With `workers: 2` each worker
    counted max_connections_per_client on its own, so one address held twice the cap."""
    proxy = start_workers(start_proxy, registry.url, PROXY_MAX_CONNECTIONS_PER_CLIENT="6")
    held: list[asyncio.StreamWriter] = []
    served = refused = 0
    try:
        for _ in range(24):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", proxy.port, local_addr=("127.0.0.2", 0)
            )
            held.append(writer)
            writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode())
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 401 "):
                served += 1  # and held open: keep-alive
            else:
                assert head.startswith(b"HTTP/1.1 503 "), head
                refused += 1
        # Each worker admits 3 of the address's connections: 6 in all once both took some.
        assert 3 <= served <= 6, served
        assert gauge(proxy, "registry_proxy_client_connections_refused_total") == refused
    finally:
        for writer in held:
            writer.transport.abort()


async def test_one_user_cannot_hold_more_upstream_connections_than_her_share_across_workers(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Class: per-client limits multiplied by the workers. upstream_connections_per_user
    was each worker's, so one user stalling downloads held twice her share of the host."""
    proxy = start_workers(
        start_proxy,
        registry.url,
        PROXY_UPSTREAM_CONNECTIONS="8",
        PROXY_UPSTREAM_CONNECTIONS_PER_USER="2",
        PROXY_CONNECT_TIMEOUT="1",
        PROXY_UPSTREAM_PROBE_INTERVAL="30",
    )
    digest = push_blob(registry.url, "shares/app", os.urandom(64 * MiB))
    alice = f"Authorization: {token('alice', users['alice'])}\r\n"
    held: list[asyncio.StreamWriter] = []
    try:
        statuses = []
        for _ in range(8):
            status, writer = await start_stalled_download(proxy, digest, alice)
            statuses.append(status)
            held.append(writer)
        assert 1 <= statuses.count(200) <= 2, statuses
        assert set(statuses) <= {200, 503}, statuses
    finally:
        for writer in held:
            writer.transport.abort()


async def test_one_address_cannot_queue_more_password_checks_than_its_cap_across_workers(
    registry: Registry, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Class: per-client limits multiplied by the workers. auth_max_pending_per_client was each
    worker's, so one address flooding wrong passwords had twice its checks hashed at once."""
    passwd = tmp_path / "htpasswd"
    # A costly hash: the flood arrives well within the first check.
    subprocess.run(["htpasswd", "-cbB", "-C", "12", str(passwd), "alice", "alice-password"],
                   check=True, capture_output=True)  # fmt: skip
    proxy = start_workers(
        start_proxy,
        registry.url,
        htpasswd=passwd,
        PROXY_AUTH_WORKERS="1",
        PROXY_AUTH_MAX_PENDING_PER_CLIENT="4",
    )
    async with session_from("127.0.0.2") as session:
        results = await asyncio.gather(
            *(status_of(session, proxy, "alice", f"guess{n}") for n in range(16))
        )
    statuses = sorted(status for status, _ in results)
    assert statuses.count(401) <= 4 and statuses.count(429) >= 12, statuses
