"""Fake upstreams on loopback, for the faults the real registry cannot produce."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def fake_upstream(behaviour: Behaviour) -> AsyncIterator[str]:
    """Serve `behaviour` for each connection; yield the upstream URL; close everything after."""
    connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections[task] = writer
        try:
            await behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in connections.values():
            writer.close()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


class CountingUpstream:
    """A fake registry answering 200 to everything and recording each request head it parsed."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"GET /v2/ "):  # the proxy's readiness probe
                self.heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()


@asynccontextmanager
async def counting_upstream() -> AsyncIterator[tuple[CountingUpstream, str]]:
    """A `CountingUpstream` and its URL, for as long as the block runs."""
    upstream = CountingUpstream()
    async with fake_upstream(upstream.serve) as url:
        yield upstream, url
