"""The throttle's store chain over the life of a proxy: built, watched, closed."""

from __future__ import annotations

import asyncio

from proxy.throttle.fallback import FallbackStore, store_chain
from proxy.throttle.supervisor import HostStoreServer
from tests.support import eventually


def _watchers() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if "FallbackStore.watch" in repr(task.get_coro())]


async def test_each_shared_store_is_watched_while_the_chain_is_in_use_then_closed() -> None:
    """Guards the chain's lifecycle: an outage is noticed while the proxy runs (so the throttle
    falls back), and no watcher or store connection outlives the chain."""
    host = HostStoreServer()
    states: list[tuple[str, bool]] = []
    try:
        chain = store_chain("redis://127.0.0.1:1/0", host.connect(), lambda *s: states.append(s))
        async with chain as store:
            assert isinstance(store, FallbackStore) and store.shared.name == "redis"
            assert isinstance(store.local, FallbackStore) and store.local.shared.name == "host"
            assert len(_watchers()) == 2
            # Nothing listens on port 1: the watcher finds Redis away; the host store answers.
            await eventually(lambda: ("redis", False) in states, "Redis to be found away")
            await eventually(lambda: len(host._connections) == 1, "the host store to be asked")
            assert store.local.up
        assert _watchers() == []
        await eventually(lambda: not host._connections, "the host store's connection to close")
    finally:
        await host.close()


async def test_without_shared_stores_the_chain_is_memory_alone() -> None:
    async with store_chain(None, None) as store:
        assert not isinstance(store, FallbackStore)
        assert _watchers() == []
