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

    A client with nothing queued or running goes to the head of the line, so a flood from one
    client delays another client's first call by at most the calls already running, not by the
    whole flood; past `max_pending` queued or running calls a client's next call raises `Busy`.
    """

    def __init__(self, workers: int, max_pending: int) -> None:
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be at least 1")
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcrypt")
        self._idle = workers
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
        while self._idle and self._queues:
            client, queue = next(iter(self._queues.items()))
            job = queue.popleft()
            if queue:
                self._queues.move_to_end(client)
            else:
                del self._queues[client]
            if job.future.done():  # cancelled while queued
                self._finish(client)
                continue
            self._idle -= 1
            running = asyncio.get_running_loop().run_in_executor(self._executor, job.call)
            running.add_done_callback(partial(self._finished, client, job.future))

    def _finished(
        self, client: Hashable, future: asyncio.Future[Any], running: asyncio.Future[Any]
    ) -> None:
        self._idle += 1
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
