"""`workers: N`: every worker takes one connection at a time from the shared listening socket.

asyncio accepts up to `backlog` queued connections per wakeup, so with all workers woken by
the same connection the first to run would take every one queued. The accept queue is read
from the kernel (`ss`: Recv-Q and Send-Q of the listening socket): no timing is assumed.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Callable
from contextlib import ExitStack

import pytest
from aiohttp import web

from proxy.edge.listen import Listener, listen
from proxy.workers import BACKLOG
from tests.support import Proxy, Registry, serving, wait_until

# The accept queue is read with ss; the proxies run with workers.
pytestmark = pytest.mark.system

QUEUED = 8


def accept_queue(port: int) -> tuple[int, int]:
    """The connections waiting in the accept queue of the listener on `port`, and its length."""
    listening = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    # State, Recv-Q (waiting), Send-Q (the queue's length), local and peer address.
    assert len(listening) == 5 and listening[0] == "LISTEN", listening
    return int(listening[1]), int(listening[2])


def connect(stack: ExitStack, port: int) -> None:
    """Open QUEUED connections to `port` at once, closed with `stack`."""
    for _ in range(QUEUED):
        stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))


async def accepted(runner: web.AppRunner, count: int) -> None:
    """Let the loop run until aiohttp has `count` connections."""
    async with asyncio.timeout(10):
        while not (runner.server and len(runner.server.connections) >= count):
            await asyncio.sleep(0)


async def start(runner: web.AppRunner, sock: socket.socket | None = None) -> Listener:
    assert runner.server is not None
    return await listen(runner.server, {}, "127.0.0.1", 0, max_connections=100,
                        on_refused=lambda: None, backlog=BACKLOG, sock=sock)  # fmt: skip


async def test_a_worker_accepts_one_queued_connection_at_a_time() -> None:
    """Guards the spread: when a worker has its first connection the others are still queued
    for its siblings (asyncio's batch takes all 8 at once), and the shared socket keeps its
    queue length (create_server calls listen(1) on it)."""
    runner = web.AppRunner(web.Application())
    await runner.setup()
    with ExitStack() as clients, socket.create_server(("127.0.0.1", 0), backlog=BACKLOG) as sock:
        port = sock.getsockname()[1]
        connect(clients, port)
        assert accept_queue(port) == (QUEUED, BACKLOG)
        listener = await start(runner, sock)
        try:
            await accepted(runner, 1)
            waiting, length = accept_queue(port)
            await accepted(runner, QUEUED)
            clients.close()
        finally:
            listener.close()
            await runner.cleanup()
    assert waiting > 0, f"all {QUEUED} taken at once"
    assert length == BACKLOG


async def test_a_single_process_accepts_every_queued_connection_at_once() -> None:
    """Guards the scope: without an inherited socket, asyncio's batch accept is kept."""
    runner = web.AppRunner(web.Application())
    await runner.setup()
    with ExitStack() as clients:
        listener = await start(runner)
        try:
            ((_, port),) = (sock.getsockname() for sock in listener.sockets)
            # Connected while this holds the loop: all are queued before it accepts any.
            connect(clients, port)
            await accepted(runner, 1)
            waiting, _ = accept_queue(port)
            await accepted(runner, QUEUED)
            clients.close()
        finally:
            listener.close()
            await runner.cleanup()
    assert waiting == 0


def test_workers_leave_the_shared_queue_its_length(
    registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards the listen() after each worker's start: the queue stays BACKLOG long, not 1."""
    proxy = start_proxy(registry.url, PROXY_WORKERS="2")
    wait_until(lambda: serving(proxy) == 2, "both workers to serve")
    assert accept_queue(proxy.port)[1] == BACKLOG
