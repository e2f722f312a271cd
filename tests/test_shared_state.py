"""The fallback between stores and the supervisor's store server, on real Unix sockets."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import shared_state
from proxy.shared_state import FallbackStore, build_store
from proxy.throttle import Throttle, Throttled
from proxy.throttle_host import HostStoreClient, HostStoreServer
from proxy.throttle_store import MemoryStore


@pytest.fixture
def socket_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="store.")  # short: Unix socket paths are limited
    yield str(Path(directory) / "store.sock")
    shutil.rmtree(directory)


async def test_the_host_store_going_away_falls_back_and_comes_back(
    socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_state, "PROBE_INTERVAL", 0.01)
    server = HostStoreServer(socket_path)
    await server.start()
    states: list[tuple[str, bool]] = []
    store = FallbackStore(HostStoreClient(socket_path), MemoryStore(), lambda *s: states.append(s))
    watch = asyncio.create_task(store.watch())
    throttle = Throttle(2, window=60, block=300, store=store)
    try:
        await (await throttle.admit("192.0.2.1", "alice")).failed()
        await server.close()
        # The next calls fail over to the local store: the first failure is not in it.
        await (await throttle.admit("192.0.2.1", "alice")).failed()
        assert states == [("host", True), ("host", False)]
        await (await throttle.admit("192.0.2.1", "alice")).failed()
        with pytest.raises(Throttled):
            await throttle.admit("192.0.2.1", "alice")
        server = HostStoreServer(socket_path, server_store := MemoryStore())
        await server.start()
        async with asyncio.timeout(5):
            while not store.up:
                await asyncio.sleep(0.01)
        assert states[-1] == ("host", True)
        # Counting in the supervisor's store again (a fresh one: nothing from before).
        await (await throttle.admit("192.0.2.1", "bob")).failed()
        assert len(server_store) == 3
    finally:
        watch.cancel()
        await store.close()
        await server.close()


async def test_a_garbled_call_drops_only_that_connection(socket_path: str) -> None:
    server = HostStoreServer(socket_path)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        writer.write(b'["drop_everything"]\n')
        assert await reader.read() == b""  # closed, nothing answered
        writer.close()
        client = HostStoreClient(socket_path)
        assert await client.reserve("k", "m", 1, 60, 1000.0) is None
        await client.close()
    finally:
        await server.close()


def test_stores_are_chained_redis_then_the_hosts_then_memory(socket_path: str) -> None:
    store, watched = build_store("redis://127.0.0.1:1/0", socket_path)
    assert isinstance(store, FallbackStore) and store.shared.name == "redis"
    assert isinstance(store.local, FallbackStore) and store.local.shared.name == "host"
    assert isinstance(store.local.local, MemoryStore)
    assert watched == [store.local, store]
    alone, nothing = build_store(None, None)
    assert isinstance(alone, MemoryStore) and nothing == []
