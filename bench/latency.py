"""Request latency through a server: GETs with given credentials, so many at a time, p50/p95."""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp


async def timed_gets(url: str, authorizations: list[str | None], connections: int) -> list[float]:
    """GET `url` once per Authorization value (None: none), `connections` at a time; seconds
    per request (every answer must be a 200)."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    for authorization in authorizations:
        queue.put_nowait(authorization)
    seconds: list[float] = []
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                authorization = queue.get_nowait()
                headers = {"Authorization": authorization} if authorization else {}
                started = time.perf_counter()
                async with session.get(url, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise SystemExit(f"GET {url}: {response.status}")
                seconds.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(connections)))
    return seconds


def summary(seconds: list[float]) -> dict[str, float]:
    """p50 and p95 in milliseconds, and the count."""
    ordered = sorted(seconds)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 2),
        "requests": len(ordered),
    }
