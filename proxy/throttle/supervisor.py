"""The throttle's store shared by the workers of one host: kept by the supervisor, asked over
a socket pair made for each worker it starts (the worker inherits its end: no path, no name
anyone else could connect to).

One JSON array per line each way. A worker sends its calls without waiting for earlier answers;
the supervisor answers each connection's calls in order, one at a time against one
`MemoryStore`, so every call is atomic for its key as the interface asks. The connection lasts
as long as the worker: once it is gone (the supervisor with it), the worker counts on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections import deque
from typing import Any

from proxy.throttle.store import Entry, MemoryStore, StoreUnavailable, check_owner

log = logging.getLogger("registry_proxy.throttle")

# Longest call a worker sends (a key, a member and numbers: far below this).
MAX_LINE = 64 * 1024
# Longest answer the supervisor sends: a refused key's whole entry, about 60 bytes a member, so
# up to the limits' members (auth_max_failures names for an address: thousands behind a NAT).
MAX_ANSWER = 16 * 1024 * 1024
# A supervisor that does not answer within this is taken for gone (its loop does nothing slow).
CALL_TIMEOUT = 1.0


def _entry(value: Any) -> Entry | None:
    if value is None:
        return None
    failed, reserved, blocked_until = value
    return Entry(dict(failed), dict(reserved), blocked_until)


def _value(entry: Entry | None) -> list[Any] | None:
    if entry is None:
        return None
    return [entry.failed, entry.reserved, entry.blocked_until]


class HostStoreServer:
    """The supervisor's side: one `MemoryStore` for every worker's connection."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self._store = store if store is not None else MemoryStore()
        self._connections: set[asyncio.StreamWriter] = set()
        self._serving: set[asyncio.Task[None]] = set()

    def connect(self) -> socket.socket:
        """A connection for one worker: its end is returned, to hand over; this end is served."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        task = asyncio.create_task(self._serve_socket(ours))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        return theirs

    async def close(self) -> None:
        """Close every worker's connection."""
        for writer in list(self._connections):
            writer.close()
        for task in list(self._serving):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve_socket(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
        await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            async for line in reader:
                writer.write(json.dumps(await self._call(json.loads(line))).encode() + b"\n")
                await writer.drain()
        except (ValueError, TypeError, KeyError, ConnectionError) as exc:
            # Only a worker of ours connects here; a garbled call ends its connection only.
            log.error("throttle store: dropping a worker's connection: %s", exc)
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _call(self, call: list[Any]) -> Any:
        op, *args = call
        store = self._store
        if op == "get":
            return _value(await store.get(*args))
        if op == "reserve":
            return _value(await store.reserve(*args))
        if op == "recall":
            return await store.recall(*args)
        if op == "sessions_ended":
            return await store.sessions_ended(*args)
        if op == "commit":
            key, member, window, now, limit, block = args
            await store.commit(key, member, window, now, limit=limit, block=block)
        elif op == "release":
            await store.release(*args)
        elif op == "clear":
            await store.clear(*args)
        elif op == "remember":
            await store.remember(*args)
        elif op == "end_sessions":
            await store.end_sessions(*args)
        elif op != "ping":
            raise KeyError(f"unknown call {op!r}")
        return None


class HostStoreClient:
    """A worker's side: `ThrottleStore` calls sent to the supervisor, answers read in order."""

    name = "host"

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._connecting = asyncio.Lock()

    async def get(self, key: str, window: float, now: float) -> Entry:
        return _entry(await self._call("get", key, window, now)) or Entry()

    async def reserve(
        self, key: str, member: str, limit: int, window: float, now: float
    ) -> Entry | None:
        return _entry(await self._call("reserve", key, member, limit, window, now))

    async def commit(
        self, key: str, member: str, window: float, now: float, *, limit: int = 0,
        block: float = 0,
    ) -> None:  # fmt: skip
        await self._call("commit", key, member, window, now, limit, block)

    async def release(self, key: str, member: str, now: float) -> None:
        await self._call("release", key, member, now)

    async def clear(self, key: str, now: float, member: str | None = None) -> None:
        await self._call("clear", key, now, member)

    async def remember(self, user: str, client: str, ttl: float, now: float) -> None:
        await self._call("remember", user, client, ttl, now)

    async def recall(self, user: str, client: str, ttl: float, now: float) -> bool:
        return bool(await self._call("recall", user, client, ttl, now))

    async def end_sessions(self, user: str, before: float, until: float, now: float) -> None:
        # Checked here: a bad key the supervisor refused would end this worker's connection.
        await self._call("end_sessions", check_owner(user), before, until, now)

    async def sessions_ended(self, user: str, now: float) -> float | None:
        ended = await self._call("sessions_ended", check_owner(user), now)
        return None if ended is None else float(ended)

    async def ping(self) -> None:
        await self._call("ping")

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._disconnect(StoreUnavailable("closed"))
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    async def _call(self, *call: Any) -> Any:
        writer = await self._connect()
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append(answer)
        writer.write(json.dumps(call).encode() + b"\n")
        try:
            return await asyncio.wait_for(asyncio.shield(answer), CALL_TIMEOUT)
        except TimeoutError:
            # The answer stays queued in its place and is dropped when it comes: the next
            # answers still reach their calls, and a ping finds the store back.
            raise StoreUnavailable(
                f"the supervisor's store did not answer within {CALL_TIMEOUT:g}s"
            ) from None

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is None:
                if self._sock is None:
                    raise StoreUnavailable("the connection to the supervisor's store is closed")
                sock, self._sock = self._sock, None
                try:
                    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_ANSWER)
                except OSError as exc:
                    sock.close()
                    raise StoreUnavailable(f"cannot reach the supervisor's store: {exc}") from None
                self._writer = writer
                self._reader_task = asyncio.create_task(self._read_answers(reader))
            return self._writer

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        failure = StoreUnavailable("the supervisor's store closed the connection")
        try:
            async for line in reader:
                answer = self._waiting.popleft()
                if not answer.done():
                    answer.set_result(json.loads(line))
        except (ValueError, IndexError, ConnectionError) as exc:
            failure = StoreUnavailable(f"the supervisor's store answered badly: {exc}")
        self._disconnect(failure)

    def _disconnect(self, failure: StoreUnavailable) -> None:
        """Fail every call still waiting; later calls fail at once (the worker counts alone)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
        while self._waiting:
            answer = self._waiting.popleft()
            if not answer.done():
                answer.set_exception(failure)
