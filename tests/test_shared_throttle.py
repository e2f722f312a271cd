"""Password-guessing counts shared by the workers of one host and, with `shared_state`, by every
proxy naming the same real redis-server, which is killed and restarted in the middle of a run.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from proxy.throttle.fallback import PROBE_INTERVAL
from tests.support import (
    NO_CACHE,
    Proxy,
    RedisServer,
    Registry,
    call,
    scrape,
    serving,
    session_from,
    status_of,
    value,
    wait_until,
    worker_pids,
)
from tests.support import basic_auth as basic

THROTTLED = {"PROXY_AUTH_MAX_FAILURES": "3", **NO_CACHE}


@contextmanager
def only_worker(proxy: Proxy, index: int) -> Iterator[None]:
    """Every other worker stopped (SIGSTOP): the connections made meanwhile go to `index`."""
    others = [pid for i, pid in worker_pids(proxy).items() if i != index]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


async def guess(proxy: Proxy, password: str, address: str = "127.0.0.2") -> int:
    async with session_from(address) as session:
        status, _ = await status_of(session, proxy, "alice", password)
        return status


async def test_workers_share_the_count_n_failures_block_after_n_in_all(
    registry: Registry, start_proxy: Callable[..., Proxy], costly_htpasswd: Path
) -> None:
    """With workers: 4 and counts per worker, 3 failures spread over the workers took 4x3."""
    proxy = start_proxy(registry.url, htpasswd=costly_htpasswd, PROXY_WORKERS="4", **THROTTLED)
    wait_until(lambda: serving(proxy) == 4, "every worker to serve")
    for index, wrong in [(1, "one"), (2, "two"), (3, "three")]:
        with only_worker(proxy, index):
            assert await guess(proxy, wrong) == 401
    for index in (4, 1):
        with only_worker(proxy, index):
            assert await guess(proxy, "alice-password") == 429  # the pair is blocked
    with only_worker(proxy, 2):
        assert await guess(proxy, "alice-password", "127.0.0.3") == 200  # elsewhere: not


def store_up(proxy: Proxy) -> float:
    return value(scrape(proxy), "registry_proxy_throttle_store_up", store="redis")


async def test_proxies_naming_one_redis_share_the_count(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    costly_htpasswd: Path,
    redis_server: RedisServer,
) -> None:
    """Two proxy tasks, each with its own throttle: guesses spread over both took 2x3."""
    settings = {"PROXY_SHARED_STATE": redis_server.url, **THROTTLED}
    first, second = (start_proxy(registry.url, costly_htpasswd, **settings) for _ in range(2))
    assert [await guess(first, "one"), await guess(second, "two")] == [401, 401]
    assert await guess(first, "three") == 401
    assert await guess(second, "alice-password") == 429
    assert await guess(first, "alice-password", "127.0.0.3") == 200
    assert store_up(first) == store_up(second) == 1
    assert f"password-guessing counts shared in Redis at {redis_server.url}" in first.log()


async def test_redis_killed_and_restarted_mid_run(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    costly_htpasswd: Path,
    redis_server: RedisServer,
) -> None:
    """Redis going away stops no login: each proxy counts on its own, says so, and goes back."""
    # Cached logins (the default auth_cache_ttl) as in production.
    settings = {"PROXY_SHARED_STATE": redis_server.url, "PROXY_AUTH_MAX_FAILURES": "3"}
    proxy, other = (start_proxy(registry.url, costly_htpasswd, **settings) for _ in range(2))
    bob = basic("bob", "bob-password")
    assert call(proxy.url + "/v2/", headers=bob)[0] == 200
    assert await guess(proxy, "before") == 401  # counted in Redis

    redis_server.kill()
    # A logged-in user and a first login go on at once, without waiting for Redis.
    async with asyncio.timeout(5):
        assert call(proxy.url + "/v2/", headers=bob)[0] == 200
        assert await guess(proxy, "alice-password", "127.0.0.3") == 200
    # Guessing is still limited, by this proxy's own count, which kept the failure before the
    # outage: two more, then blocked.
    assert [await guess(proxy, f"during{n}") for n in range(3)] == [401, 401, 429]
    assert store_up(proxy) == 0
    samples = scrape(proxy)
    assert value(samples, "registry_proxy_throttle_store_failures_total", store="redis") >= 1
    assert re.search(
        r"ERROR .*throttle: counting .* until the redis store answers again: Redis at "
        r"redis://127\.0\.0\.1:\d+/0: ",
        proxy.log(),
    )

    redis_server.start()  # empty, on the same port
    deadline = 5 * PROBE_INTERVAL
    wait_until(lambda: store_up(proxy) == store_up(other) == 1, "the store back up", deadline)
    assert "the redis store answers again" in proxy.log()
    # Shared again: failures through either proxy add up in the new Redis.
    statuses = [await guess(p, f"after{n}", "127.0.0.4")
                for n, p in enumerate([proxy, other, proxy, other])]  # fmt: skip
    assert statuses == [401, 401, 401, 429]


def test_check_config_prints_the_redis_url_without_its_password(htpasswd_file: Path) -> None:
    env = {**os.environ, "PROXY_HTPASSWD": str(htpasswd_file),
           "PROXY_SHARED_STATE": "redis://:s3cret@redis:6379/2"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "proxy", "check-config"], env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done
    assert "redis://:***@redis:6379/2" in done.stdout and "s3cret" not in done.stdout


def test_shared_state_must_be_a_redis_url(htpasswd_file: Path) -> None:
    """Bad configuration exits 2 naming the key, and never echoes the password in the URL."""
    env = {**os.environ, "PROXY_HTPASSWD": str(htpasswd_file),
           "PROXY_SHARED_STATE": "http://:secret@127.0.0.1:6379/0"}  # fmt: skip
    for command in ("check-config", "serve"):
        done = subprocess.run(
            [sys.executable, "-m", "proxy", command], env=env, capture_output=True, text=True,
            timeout=30,
        )  # fmt: skip
        assert done.returncode == 2, done
        assert "PROXY_SHARED_STATE: shared_state: expected redis://HOST:PORT/DB" in done.stderr
        assert "secret" not in done.stderr + done.stdout


async def test_a_redis_that_hangs_costs_one_timeout_not_one_per_login(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    costly_htpasswd: Path,
    redis_server: RedisServer,
) -> None:
    """A stopped Redis (SIGSTOP: connections open, no answers) must not hold every login for
    its timeouts: after the first call times out, the proxy counts locally until a ping works."""
    proxy = start_proxy(
        registry.url, costly_htpasswd, PROXY_SHARED_STATE=redis_server.url, **THROTTLED
    )
    assert await guess(proxy, "alice-password") == 200
    redis_server.signal(signal.SIGSTOP)
    try:
        async with asyncio.timeout(5):  # one timeout, not retried: about 0.5 s
            assert await guess(proxy, "alice-password", "127.0.0.3") == 200
        # Without the fallback each login waits 1 s on each of its four calls.
        async with asyncio.timeout(5):
            for n in range(4, 10):
                assert await guess(proxy, "alice-password", f"127.0.0.{n}") == 200
        assert store_up(proxy) == 0
    finally:
        redis_server.signal(signal.SIGCONT)
    wait_until(lambda: store_up(proxy) == 1, "the store back up", 5 * PROBE_INTERVAL)
