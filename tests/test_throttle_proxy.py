"""The password-guessing throttle and the fair hashing pool, in the real proxy before the registry.

Clients come from several loopback addresses (127.0.0.2, 127.0.0.3, ...) so the proxy sees
several client addresses; password checks are counted by the proxy's own histogram.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.support import NO_CACHE, Proxy, Registry, call, session_from, status_of


def password_checks(proxy: Proxy) -> float:
    _, _, body = call(proxy.admin_url + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith("registry_proxy_password_check_duration_seconds_count "):
            return float(line.split()[1])
    raise AssertionError("no password check histogram")


async def test_concurrency_parallel_guesses_run_no_more_checks_than_the_budget(
    registry: Registry, start_proxy: Callable[..., Proxy], costly_htpasswd: Path
) -> None:
    """Concurrency: the failure budget is taken before the hash (60 at once ran 60 checks)."""
    proxy = start_proxy(registry.url, htpasswd=costly_htpasswd, PROXY_AUTH_MAX_FAILURES="5")
    before = password_checks(proxy)
    async with session_from("127.0.0.2") as session:
        results = await asyncio.gather(
            *(status_of(session, proxy, "alice", f"guess{n}") for n in range(60))
        )
    statuses = sorted(status for status, _ in results)
    assert statuses.count(401) <= 5 and statuses.count(429) >= 55, statuses
    assert all(int(retry) >= 1 for status, retry in results if status == 429 and retry)
    assert all(retry for status, retry in results if status == 429)
    assert password_checks(proxy) - before <= 5


async def test_no_lockout_by_name_the_owner_logs_in_from_another_address(
    registry: Registry, start_proxy: Callable[..., Proxy], costly_htpasswd: Path
) -> None:
    """No lockout by name: guesses for alice from one address kept alice out everywhere."""
    proxy = start_proxy(
        registry.url, htpasswd=costly_htpasswd, PROXY_AUTH_MAX_FAILURES="3", **NO_CACHE
    )
    async with session_from("127.0.0.2") as attacker, session_from("127.0.0.3") as owner:
        guesses = [await status_of(attacker, proxy, "alice", f"guess{n}") for n in range(20)]
        assert [status for status, _ in guesses].count(401) == 3  # the guesser stays limited
        assert await status_of(attacker, proxy, "alice", "alice-password") == (429, "300")
        assert (await status_of(owner, proxy, "alice", "alice-password"))[0] == 200


async def test_no_lockout_by_name_from_many_addresses_slows_guesses_not_the_owner(
    registry: Registry, start_proxy: Callable[..., Proxy], costly_htpasswd: Path
) -> None:
    """No lockout by name: many addresses share a slow rate; the owner's address is exempt."""
    proxy = start_proxy(
        registry.url,
        htpasswd=costly_htpasswd,
        PROXY_AUTH_MAX_FAILURES="3",
        PROXY_AUTH_MAX_FAILURES_PER_USER="6",
        **NO_CACHE,
    )
    async with session_from("127.0.0.3") as owner:
        assert (await status_of(owner, proxy, "alice", "alice-password"))[0] == 200
    allowed = 0
    for n in range(4, 12):
        async with session_from(f"127.0.0.{n}") as attacker:
            for guess in range(3):
                status, _ = await status_of(attacker, proxy, "alice", f"guess{n}-{guess}")
                allowed += status == 401
    assert allowed == 6  # the name's rate, not 3 per address
    before = password_checks(proxy)
    async with session_from("127.0.0.20") as attacker:
        status, retry = await status_of(attacker, proxy, "alice", "alice-password")
    assert status == 429 and retry is not None and int(retry) >= 1
    assert password_checks(proxy) == before
    async with session_from("127.0.0.3") as owner:
        assert (await status_of(owner, proxy, "alice", "alice-password"))[0] == 200


async def test_shared_address_one_colleague_mistyping_does_not_lock_out_the_others(
    registry: Registry, start_proxy: Callable[..., Proxy], costly_htpasswd: Path
) -> None:
    """Shared addresses: bob's typos behind a NAT blocked every colleague at that address."""
    proxy = start_proxy(
        registry.url, htpasswd=costly_htpasswd, PROXY_AUTH_MAX_FAILURES="3", **NO_CACHE
    )
    async with session_from("127.0.0.5") as office:
        for n in range(10):
            await status_of(office, proxy, "bob", f"typo{n}")
        assert (await status_of(office, proxy, "bob", "bob-password"))[0] == 429
        assert (await status_of(office, proxy, "alice", "alice-password"))[0] == 200
        assert (await status_of(office, proxy, "carol", "carol-password"))[0] == 200


async def test_fairness_a_flood_from_one_address_does_not_hold_back_a_first_login(
    registry: Registry, start_proxy: Callable[..., Proxy], costly_htpasswd: Path
) -> None:
    """Fairness: a first login waited behind every queued wrong guess of another address."""
    proxy = start_proxy(
        registry.url,
        htpasswd=costly_htpasswd,
        PROXY_AUTH_WORKERS="1",
        PROXY_AUTH_MAX_PENDING_PER_CLIENT="50",
        **NO_CACHE,
    )
    finished: list[str] = []

    async def wrong(session: aiohttp.ClientSession, n: int) -> None:
        status, _ = await status_of(session, proxy, "bob", f"x{n}")
        assert status in (401, 429)
        finished.append("wrong")

    async def in_flight(admin: aiohttp.ClientSession) -> float:
        async with admin.get(proxy.admin_url + "/metrics") as response:
            text = await response.text()
        prefix = "registry_proxy_requests_in_flight{"
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(prefix))  # fmt: skip

    async with (
        session_from("127.0.0.2") as flooder,
        session_from("127.0.0.3") as newcomer,
        aiohttp.ClientSession() as admin,
    ):
        flood = [asyncio.create_task(wrong(flooder, n)) for n in range(50)]
        # The first login comes only once the flood waits in the proxy.
        async with asyncio.timeout(20):
            while await in_flight(admin) < 40:
                await asyncio.sleep(0.01)
        status, _ = await status_of(newcomer, proxy, "alice", "alice-password")
        finished.append("first login")
        await asyncio.gather(*flood)
    assert status == 200
    # 50 cost-9 checks on one thread take ~1.5 s; the first login waits for one or two.
    assert finished.index("first login") < 10, finished.index("first login")


async def test_fairness_a_flood_past_the_per_address_cap_gets_429_at_once(
    registry: Registry, start_proxy: Callable[..., Proxy], costly_htpasswd: Path
) -> None:
    """Fairness: beyond auth_max_pending_per_client an address's checks are refused, not queued."""
    proxy = start_proxy(
        registry.url,
        htpasswd=costly_htpasswd,
        PROXY_AUTH_WORKERS="1",
        PROXY_AUTH_MAX_PENDING_PER_CLIENT="4",
    )
    before = password_checks(proxy)
    async with session_from("127.0.0.2") as flooder:
        results = await asyncio.gather(
            *(status_of(flooder, proxy, "bob", f"x{n}") for n in range(40))
        )
    busy = [retry for status, retry in results if status == 429]
    assert len(busy) >= 10 and all(retry == "1" for retry in busy)
    assert password_checks(proxy) - before == 40 - len(busy)
