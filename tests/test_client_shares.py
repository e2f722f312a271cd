"""Shares of the upstream pool: anonymous clients by client key, and never all of it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.relay.slots import UpstreamSlots
from tests.support import Proxy, Registry, eventually, push_blob, start_stalled_download, token

MiB = 1 << 20
RULES = """
access:
  - {users: ["@anonymous"], repositories: ["shares/**"], actions: [pull]}
  - {users: ["*"], repositories: ["**"], actions: [pull, push, delete, catalog]}
"""


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        # One site's /64 is one client: it gets one share.
        ([f"2001:db8:1:2::{n}" for n in range(1, 5)], [200, 503, 503, 503]),
        # Four clients: each has a share, but anonymous ones together get half the pool.
        ([f"203.0.113.{n}" for n in range(1, 5)], [200, 200, 503, 503]),
    ],
    ids=["one-ipv6-64", "four-ipv4"],
)
async def test_anonymous_downloads_that_stop_reading_cannot_starve_logged_in_users(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    users: dict[str, str],
    tmp_path: Path,
    addresses: list[str],
    expected: list[int],
) -> None:
    """Class: upstream pool exhaustion by anonymous clients. An anonymous request's share is
    its client key (an IPv6 /64, not each address), and anonymous requests together hold at
    most half of upstream_connections, so a logged-in user's pull is still served."""
    config = tmp_path / "proxy.yml"
    config.write_text(RULES)
    proxy = start_proxy(
        registry.url,
        PROXY_CONFIG=str(config),
        PROXY_TRUSTED_PROXIES="127.0.0.0/8",
        PROXY_UPSTREAM_CONNECTIONS="4",
        PROXY_UPSTREAM_CONNECTIONS_PER_USER="1",
        PROXY_CONNECT_TIMEOUT="1",
        PROXY_UPSTREAM_PROBE_INTERVAL="30",
    )
    digest = push_blob(registry.url, "shares/app", os.urandom(64 * MiB))
    held: list[asyncio.StreamWriter] = []
    try:
        statuses = []
        for address in addresses:
            status, writer = await start_stalled_download(
                proxy, digest, f"X-Forwarded-For: {address}\r\n"
            )
            statuses.append(status)
            held.append(writer)
        assert statuses == expected
        alice, writer = await start_stalled_download(
            proxy, digest, f"Authorization: {token('alice', users['alice'])}\r\n"
        )
        held.append(writer)
        assert alice == 200
    finally:
        for writer in held:
            writer.transport.abort()


async def test_anonymous_shares_are_keyed_apart_from_user_names_and_capped_together() -> None:
    """A user named like an address has her own share; anonymous requests get half the pool."""
    slots = UpstreamSlots(total=4, per_user=2, wait=30)
    assert (slots.anonymous_total, UpstreamSlots(1, 1, 1).anonymous_total) == (2, 1)
    assert await slots.acquire("203.0.113.1", anonymous=True)
    assert await slots.acquire("203.0.113.2", anonymous=True)
    third = asyncio.create_task(slots.acquire("203.0.113.3", anonymous=True))
    await eventually(lambda: slots.waiting == 1, "the anonymous half to be full")
    assert await slots.acquire("203.0.113.1")  # the user of that name is not the address
    assert slots.held_by("203.0.113.1") == 1
    assert slots.held_by("203.0.113.1", anonymous=True) == 1
    assert not third.done()
    slots.release("203.0.113.1", anonymous=True)
    assert await third
    assert slots.in_use == 3
