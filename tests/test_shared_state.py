"""The fallback between stores and the supervisor's store server, on real socket pairs."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.throttle import supervisor
from proxy.throttle.fallback import FallbackStore, build_store
from proxy.throttle.policy import Throttle, Throttled
from proxy.throttle.store import Entry, MemoryStore, StoreUnavailable
from proxy.throttle.supervisor import HostStoreClient, HostStoreServer


async def test_the_host_store_going_away_falls_back_to_counting_alone() -> None:
    """The supervisor gone (its end of the pair closed): the worker counts in its own memory,
    says so once, and refuses no check for it."""
    server = HostStoreServer(server_store := MemoryStore())
    states: list[tuple[str, bool]] = []
    store = FallbackStore(
        HostStoreClient(server.connect()), MemoryStore(), lambda *s: states.append(s)
    )
    throttle = Throttle(2, window=60, block=300, store=store)
    try:
        await (await throttle.admit("192.0.2.1", "alice")).failed()
        assert len(server_store) == 3
        await server.close()
        # The next calls fail over to the local store, which kept the first failure too.
        await (await throttle.admit("192.0.2.1", "alice")).failed()
        assert states == [("host", True), ("host", False)]
        with pytest.raises(Throttled):
            await throttle.admit("192.0.2.1", "alice")
        with pytest.raises(StoreUnavailable):
            await store.shared.ping()  # and it stays gone
    finally:
        await store.close()


async def test_a_late_answer_keeps_the_next_answers_in_their_places(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call that timed out leaves its answer to come: the calls after it still get theirs."""
    monkeypatch.setattr(supervisor, "CALL_TIMEOUT", 0.05)
    server = HostStoreServer()
    client = HostStoreClient(server.connect())
    try:
        await client.commit("k", "old", 60, 1000.0)
        release = asyncio.Event()
        slow_get = server._store.get

        async def stalled_get(key: str, window: float, now: float) -> Entry:
            await release.wait()
            return await slow_get(key, window, now)

        monkeypatch.setattr(server._store, "get", stalled_get)
        with pytest.raises(StoreUnavailable, match="did not answer"):
            await client.get("k", 60, 1000.0)
        monkeypatch.setattr(server._store, "get", slow_get)
        release.set()
        assert (await client.reserve("k", "new", 5, 60, 1000.0)) is None
        assert set((await client.get("k", 60, 1000.0)).members) == {"old", "new"}
    finally:
        await client.close()
        await server.close()


async def test_a_garbled_call_drops_only_that_connection() -> None:
    server = HostStoreServer()
    try:
        reader, writer = await asyncio.open_unix_connection(sock=server.connect())
        writer.write(b'["drop_everything"]\n')
        assert await reader.read() == b""  # closed, nothing answered
        writer.close()
        client = HostStoreClient(server.connect())
        assert await client.reserve("k", "m", 1, 60, 1000.0) is None
        await client.close()
    finally:
        await server.close()


def test_stores_are_chained_redis_then_the_hosts_then_memory() -> None:
    ours, theirs = socket.socketpair()
    store, watched = build_store("redis://127.0.0.1:1/0", theirs)
    ours.close()
    assert isinstance(store, FallbackStore) and store.shared.name == "redis"
    assert isinstance(store.local, FallbackStore) and store.local.shared.name == "host"
    assert isinstance(store.local.local, MemoryStore)
    assert watched == [store.local, store]
    alone, nothing = build_store(None, None)
    assert isinstance(alone, MemoryStore) and nothing == []
    theirs.close()


async def test_an_outage_keeps_the_owners_known_address_exempt_from_her_names_rate() -> None:
    """During an outage the local store knew no address where alice had logged in: guesses at
    her name from many addresses spent its rate there, and her next login from her own
    address got 429. Successes (and failures) seen while the shared store answered are kept
    locally too."""
    server = HostStoreServer()
    store = FallbackStore(HostStoreClient(server.connect()), MemoryStore())
    throttle = Throttle(3, window=60, block=300, store=store, max_failures_per_user=4)
    try:
        await (await throttle.admit("192.0.2.50", "alice")).succeeded()
        await server.close()
        for n in range(4):
            await (await throttle.admit(f"203.0.113.{n}", "alice")).failed()
        with pytest.raises(Throttled):
            await throttle.admit("203.0.113.99", "alice")  # her name's rate is spent ...
        await (await throttle.admit("192.0.2.50", "alice")).succeeded()  # ... not for her
    finally:
        await store.close()
