"""Which store the throttle counts in: Redis (`shared_state`), the host's (workers), its own.

A shared store that does not answer never stops a password check: the process counts in the
next store down (Redis, then the supervisor's, then its own memory) until a ping every
`PROBE_INTERVAL` finds it back, and says so in the log and in `throttle_store_up`.

Failures and successes (`commit`, `clear`, `remember`) are written to the local store too, while the
shared one answers: so an outage starts from what this process saw, not from nothing. Above all the
addresses where users logged in through it stay known, and guesses at a name during the outage
cannot spend its rate for its owner there. Guessers get at most one extra budget per process for the
outage, minus what this process saw them use.

The browser's sign-outs (`end_sessions`) are written to the local store too, always. One made
while the shared store was away lives in the local store only: other proxy tasks (with Redis) or
other hosts never learn of it, so a copy of a cookie it ended, replayed through them, is taken
until it expires. This process (and, below Redis, every worker of its host) keeps refusing it
after the shared store is back: `sessions_ended` asks the local store too and takes the later of
the two answers. That costs a lookup in memory, or with workers a call to the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from proxy.throttle.store import Entry, MemoryStore, StoreUnavailable, ThrottleStore
from proxy.throttle.supervisor import HostStoreClient

log = logging.getLogger("registry_proxy.throttle")

PROBE_INTERVAL = 1.0

T = TypeVar("T")


class SharedStore(ThrottleStore, Protocol):
    """A store in another process: it has a name for logs and metrics, answers pings, closes."""

    name: str

    async def ping(self) -> None:
        """Return once the store answers; raise `StoreUnavailable` if it does not."""
        ...

    async def close(self) -> None: ...


class FallbackStore:
    """`ThrottleStore` on `shared` while it answers, on `local` while it does not; `local` also
    keeps this process's failures and successes meanwhile."""

    def __init__(
        self,
        shared: SharedStore,
        local: ThrottleStore,
        on_state: Callable[[str, bool], None] = lambda name, up: None,
    ) -> None:
        self.shared = shared
        self.local = local
        self._on_state = on_state
        self.up = True
        on_state(shared.name, True)

    async def get(self, key: str, window: float, now: float) -> Entry:
        return await self._call(lambda store: store.get(key, window, now))

    async def reserve(
        self, key: str, member: str, limit: int, window: float, now: float
    ) -> Entry | None:
        return await self._call(lambda store: store.reserve(key, member, limit, window, now))

    async def commit(
        self, key: str, member: str, window: float, now: float, *, limit: int = 0,
        block: float = 0,
    ) -> None:  # fmt: skip
        await self._call(
            lambda store: store.commit(key, member, window, now, limit=limit, block=block),
            mirror=True,
        )

    async def release(self, key: str, member: str, now: float) -> None:
        await self._call(lambda store: store.release(key, member, now))

    async def clear(self, key: str, now: float, member: str | None = None) -> None:
        await self._call(lambda store: store.clear(key, now, member), mirror=True)

    async def remember(self, user: str, client: str, ttl: float, now: float) -> None:
        await self._call(lambda store: store.remember(user, client, ttl, now), mirror=True)

    async def recall(self, user: str, client: str, ttl: float, now: float) -> bool:
        return await self._call(lambda store: store.recall(user, client, ttl, now))

    async def end_sessions(self, user: str, before: float, until: float, now: float) -> None:
        await self._call(lambda store: store.end_sessions(user, before, until, now), mirror=True)

    async def sessions_ended(self, user: str, now: float) -> float | None:
        ended = await self._call(lambda store: store.sessions_ended(user, now))
        if not self.up:
            return ended  # that was the local store's answer
        # A sign-out made while the shared store was away is in the local store only, and may
        # be later than the shared store's (made before the outage): the later one holds.
        local = await self.local.sessions_ended(user, now)
        if ended is None or (local is not None and local > ended):
            return local
        return ended

    async def _call(
        self, call: Callable[[ThrottleStore], Awaitable[T]], *, mirror: bool = False
    ) -> T:
        """`call` on the shared store while it answers, else on the local one; with `mirror`
        on the local one as well."""
        if self.up:
            try:
                answer = await call(self.shared)
            except StoreUnavailable as exc:
                self._went_down(exc)
            else:
                if not mirror:
                    return answer
        return await call(self.local)

    async def watch(self) -> None:
        """Ping the shared store forever; note when it stops or starts answering."""
        while True:
            try:
                await self.shared.ping()
            except StoreUnavailable as exc:
                self._went_down(exc)
            else:
                if not self.up:
                    self.up = True
                    log.warning("throttle: the %s store answers again: counting there",
                                self.shared.name)  # fmt: skip
                    self._on_state(self.shared.name, True)
            await asyncio.sleep(PROBE_INTERVAL)

    async def close(self) -> None:
        """Close the shared store's connections (not the local store's: it has its own)."""
        await self.shared.close()

    def _went_down(self, exc: StoreUnavailable) -> None:
        if self.up:
            self.up = False
            log.error(
                "throttle: counting password failures in this process until the %s store "
                "answers again: %s", self.shared.name, exc,
            )  # fmt: skip
            self._on_state(self.shared.name, False)


def build_store(
    redis_url: str | None,
    host_socket: socket.socket | None,
    on_state: Callable[[str, bool], None] = lambda name, up: None,
) -> tuple[ThrottleStore, list[FallbackStore]]:
    """The store chain for this process, and the fallbacks whose `watch` must run."""
    store: ThrottleStore = MemoryStore()
    chain: list[FallbackStore] = []
    if host_socket is not None:
        store = FallbackStore(HostStoreClient(host_socket), store, on_state)
        chain.append(store)
    if redis_url is not None:
        # Imported here: a proxy without shared_state never loads the Redis client.
        from proxy.throttle.redis import RedisStore

        redis_store = RedisStore(redis_url)
        log.info("password-guessing counts shared in Redis at %s", redis_store.url)
        store = FallbackStore(redis_store, store, on_state)
        chain.append(store)
    return store, chain


@contextlib.asynccontextmanager
async def store_chain(
    redis_url: str | None,
    host_socket: socket.socket | None,
    on_state: Callable[[str, bool], None] = lambda name, up: None,
) -> AsyncIterator[ThrottleStore]:
    """The store chain for this process (see `build_store`), each shared store watched while
    the context runs and closed when it ends."""
    store, fallbacks = build_store(redis_url, host_socket, on_state)
    watchers = [asyncio.create_task(fallback.watch()) for fallback in fallbacks]
    try:
        yield store
    finally:
        for task in watchers:
            task.cancel()
        for task in watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for fallback in fallbacks:
            await fallback.close()
