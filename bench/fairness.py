"""Login fairness: fresh logins from one address while another floods wrong passwords.

A proxy of its own (the failure budgets lifted, so the flood reaches the hashing pool; the pool's
per-address cap and turns at their defaults) gets 200 concurrent wrong-password requests from
127.0.0.2, from a child process (`python -m bench.fairness URL MODE`, niced: an attacker's CPU is
not the server's; it floods until its stdin closes). In mode `at-once` each request is sent
again as soon as it is answered, 429 or not; in mode `retry-after` a 429 is followed by its
`Retry-After`. Meanwhile fresh correct logins (a new connection, a real bcrypt-10 check: the
success cache is off) come one at a time from 127.0.0.3. Their median latency is compared with
the same logins without a flood.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench import client
from bench.client import BenchError
from bench.services import REPO_DIR, Proxy

FLOOD_ADDRESS = "127.0.0.2"
LOGIN_ADDRESS = "127.0.0.3"
FLOOD_REQUESTS = 200
MODES = ("at-once", "retry-after")
# The flood's wrong passwords go to unknown names (a decoy check of the table's top cost), so
# no per-name limit turns them away before the pool.
PROXY_ENV = {"PROXY_AUTH_MAX_FAILURES": "1000000", "PROXY_AUTH_CACHE_TTL": "0.001"}


@dataclass
class Logins:
    """Fresh login latencies in seconds, unloaded and per flood mode, and the flood's answers."""

    idle: list[float] = field(default_factory=list)
    flooded: dict[str, list[float]] = field(default_factory=dict)
    flood_statuses: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    rounds: int
    logins: int


SIZES = {"full": Sizes(rounds=3, logins=30), "small": Sizes(rounds=1, logins=10)}


def login_seconds(host: str, port: int, authorization: str) -> float:
    """One fresh login (`GET /v2/` on a new connection) from LOGIN_ADDRESS; 200 or BenchError."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(
        host, port, timeout=60, source_address=(LOGIN_ADDRESS, 0)
    )
    try:
        connection.request("GET", "/v2/", headers={"Authorization": authorization})
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise BenchError(f"fresh login answered {response.status}, not 200")
    return time.perf_counter() - started


async def _flood(url: str, mode: str) -> dict[str, int]:
    """Keep FLOOD_REQUESTS wrong guesses in flight until stdin closes; count the statuses."""
    loop = asyncio.get_running_loop()
    stop = loop.run_in_executor(None, sys.stdin.read)
    statuses: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=0, local_addr=(FLOOD_ADDRESS, 0))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def guesser(n: int) -> None:
            attempt = 0
            while not stop.done():
                attempt += 1
                headers = {"Authorization": client.basic(f"flood{n}-{attempt}", "wrong")}
                async with session.get(url, headers=headers) as response:
                    await response.read()
                status = str(response.status)
                statuses[status] = statuses.get(status, 0) + 1
                if mode == "retry-after" and response.status == 429:
                    await asyncio.sleep(float(response.headers.get("Retry-After", "1")))

        tasks = [asyncio.create_task(guesser(n)) for n in range(FLOOD_REQUESTS)]
        print("started", flush=True)
        await stop
        await asyncio.gather(*tasks, return_exceptions=True)
    return statuses


@contextmanager
def flooding(url: str, mode: str, statuses: dict[str, int]) -> Iterator[None]:
    """A child process floods `url` while the block runs; its status counts go to `statuses`."""
    flood = subprocess.Popen(
        ["nice", "-n", "19", sys.executable, "-m", "bench.fairness", url, mode],
        cwd=REPO_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flood.stdin is not None and flood.stdout is not None
    try:
        if flood.stdout.readline().strip() != "started":
            raise BenchError("the wrong-password flood did not start")
        yield
    finally:
        flood.stdin.close()
        output = flood.stdout.read()
        flood.wait(120)
    for status, count in json.loads(output or "{}").items():
        statuses[status] = statuses.get(status, 0) + count


def measure(bench_workdir: Path, upstream: str, htpasswd: Path, source: Path, mode: str,
            authorization: str) -> Logins:  # fmt: skip
    """Unloaded and flooded login latencies, round by round."""
    sizes = SIZES[mode]
    proxy = Proxy(
        bench_workdir / "proxy-fairness", upstream, htpasswd, source=source, env=PROXY_ENV
    )
    proxy.start()
    result = Logins()
    host, port = "127.0.0.1", proxy.port

    def logins() -> list[float]:
        return [login_seconds(host, port, authorization) for _ in range(sizes.logins)]

    try:
        login_seconds(host, port, authorization)  # warm up: imports, first connection
        for _ in range(sizes.rounds):
            result.idle += logins()
            for flood_mode in MODES:
                with flooding(
                    proxy.url + "/v2/", flood_mode, result.flood_statuses.setdefault(flood_mode, {})
                ):
                    time.sleep(1.0)  # let the flood fill the pool's queue
                    result.flooded.setdefault(flood_mode, []).extend(logins())
    finally:
        proxy.stop()
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_flood(sys.argv[1], sys.argv[2]))), flush=True)
