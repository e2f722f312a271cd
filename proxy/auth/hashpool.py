"""The password-hashing thread pool, shared fairly: clients take turns, each with a capped queue."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Busy(Exception):
    """This client already has its share of checks queued or running."""


@dataclass
class _Job(Generic[T]):
    future: asyncio.Future[T]
    call: Callable[[], T]


class FairPool:
    """Runs blocking calls on `workers` threads, one queue per client, served round-robin.

    A client with nothing queued or running goes to the head of the line, and one client runs
    on at most half the threads (at least one), so a flood from one client leaves a thread for
    another client's first call instead of making it wait behind the flood; past `max_pending`
    queued or running calls a client's next call raises `Busy` at once.
    """

    def __init__(self, workers: int, max_pending: int) -> None:
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be at least 1")
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcrypt")
        self._idle = workers
        self._max_running = max(1, workers // 2)
        self._running: dict[Hashable, int] = {}
        self._max_pending = max_pending
        # Clients with queued calls, in the order they are served next.
        self._queues: OrderedDict[Hashable, deque[_Job[Any]]] = OrderedDict()
        self._pending: dict[Hashable, int] = {}

    def pending(self, client: Hashable) -> int:
        """Calls of this client queued or running."""
        return self._pending.get(client, 0)

    def run(self, client: Hashable, call: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `call` for `client`; the future resolves with its result. Raises `Busy`."""
        if self.pending(client) >= self._max_pending:
            raise Busy(client)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if client not in self._queues:
            self._queues[client] = deque()
            if not self.pending(client):
                # Served least recently of all: a client with nothing running goes first.
                self._queues.move_to_end(client, last=False)
        self._queues[client].append(_Job(future, call))
        self._pending[client] = self.pending(client) + 1
        self._dispatch()
        return future

    def close(self) -> None:
        """Stop the threads; queued calls never run."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        for queue in self._queues.values():
            for job in queue:
                job.future.cancel()
        self._queues.clear()

    def _dispatch(self) -> None:
        while self._idle:
            client = next(
                (c for c in self._queues if self._running.get(c, 0) < self._max_running), None
            )
            if client is None:
                return
            queue = self._queues[client]
            job = queue.popleft()
            if queue:
                self._queues.move_to_end(client)
            else:
                del self._queues[client]
            if job.future.done():  # cancelled while queued
                self._finish(client)
                continue
            self._idle -= 1
            self._running[client] = self._running.get(client, 0) + 1
            running = asyncio.get_running_loop().run_in_executor(self._executor, job.call)
            running.add_done_callback(partial(self._finished, client, job.future))

    def _finished(
        self, client: Hashable, future: asyncio.Future[Any], running: asyncio.Future[Any]
    ) -> None:
        self._idle += 1
        left = self._running.pop(client, 1) - 1
        if left:
            self._running[client] = left
        self._finish(client)
        if not future.done():
            if running.cancelled():
                future.cancel()
            elif (error := running.exception()) is not None:
                future.set_exception(error)
            else:
                future.set_result(running.result())
        self._dispatch()

    def _finish(self, client: Hashable) -> None:
        left = self._pending.pop(client, 1) - 1
        if left:
            self._pending[client] = left
