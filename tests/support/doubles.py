"""Test doubles for the in-process throttle and password tests: the three throttle
stores, a hash that waits for the test, and an htpasswd authenticator built on them."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio
from aiohttp.test_utils import make_mocked_request
from passlib.hash import apr_md5_crypt

from proxy.auth import credentials
from proxy.auth.credentials import CredentialChecker
from proxy.auth.htpasswd import HtpasswdAuthenticator
from proxy.auth.pacing import RefusalPacer
from proxy.exchange import Exchange
from proxy.identity import AuthFailure, Identity
from proxy.paths import classify
from proxy.throttle.policy import Throttle, Throttled
from proxy.throttle.redis import RedisStore
from proxy.throttle.store import MAX_KEYS, MemoryStore, ThrottleStore
from proxy.throttle.supervisor import HostStoreClient, HostStoreServer

# Redis is started by its fixture, on first use: a test with that store starts a process.
STORES = ["memory", "host", pytest.param("redis", marks=pytest.mark.system)]
RIGHT = "right password"


@asynccontextmanager
async def open_store(request: pytest.FixtureRequest) -> AsyncIterator[ThrottleStore]:
    """The store `request.param` names (one of `STORES`), empty; closed after."""
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "host":
        server = HostStoreServer()
        client = HostStoreClient(server.connect())
        yield client
        await client.close()
        await server.close()
    else:
        redis_server = request.getfixturevalue("redis_server")
        admin = redis.asyncio.Redis.from_url(redis_server.url)
        await admin.flushdb()
        await admin.aclose()
        redis_store = RedisStore(redis_server.url)
        yield redis_store
        await redis_store.close()


@asynccontextmanager
async def store_maker(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., ThrottleStore]]:
    """Makes stores of the kind `request.param` names (one of `STORES`) with the bounds given;
    closes them after. `max_keys` bounds failures in memory only (Redis's: its `maxmemory`)."""
    made: list[HostStoreServer | HostStoreClient | RedisStore] = []

    def make(max_keys: int = MAX_KEYS, **bounds: int) -> ThrottleStore:
        if request.param == "redis":
            server = request.getfixturevalue("redis_server")
            made.append(redis_store := RedisStore(server.url, **bounds))
            return redis_store
        memory = MemoryStore(max_keys, **bounds)
        if request.param == "memory":
            return memory
        made.append(host := HostStoreServer(memory))
        made.append(client := HostStoreClient(host.connect()))
        return client

    try:
        yield make
    finally:
        for each in reversed(made):
            await each.close()


async def fail(throttle: Throttle, address: str, user: str, times: int = 1) -> None:
    for _ in range(times):
        await (await throttle.admit(address, user)).failed()


async def retry_after(throttle: Throttle, address: str, user: str) -> float | None:
    """Seconds the throttle asks to wait, or None when a check may run (given back at once)."""
    try:
        await (await throttle.admit(address, user)).release()
    except Throttled as refusal:
        return refusal.retry_after
    return None


class GatedHash:
    """`verify_password` that waits for the test to open it; counts the hashes started."""

    def __init__(self, verify: Callable[[str, str], bool]) -> None:
        self._verify = verify
        self.opened = threading.Event()
        self.started = 0
        self._lock = threading.Lock()

    def __call__(self, password: str, stored: str) -> bool:
        with self._lock:
            self.started += 1
        self.opened.wait(10)
        return self._verify(password, stored)


def gated_hash(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedHash]:
    """For a fixture: every password check waits for the test; opened at the end."""
    gated = GatedHash(credentials.verify_password)
    monkeypatch.setattr(credentials, "verify_password", gated)
    yield gated
    gated.opened.set()


async def no_pause(seconds: float) -> None:
    """Failed checks are padded to the decoy's cost with a sleep; not in these tests."""


def authenticator(
    throttle: Throttle, pacer: RefusalPacer, max_pending: int = 10
) -> tuple[HtpasswdAuthenticator, CredentialChecker]:
    """htpasswd with alice (password `RIGHT`), checked on two threads; close the checker."""
    checker = CredentialChecker(
        {"alice": apr_md5_crypt.hash(RIGHT)},
        cache_ttl=60,
        cache_size=10,
        workers=2,
        max_pending_per_client=max_pending,
        sleep=no_pause,
    )
    return HtpasswdAuthenticator(checker, throttle, pacer, "test"), checker


def login(
    auth: HtpasswdAuthenticator, client: str, password: str
) -> asyncio.Task[Identity | AuthFailure | None]:
    """alice's GET /v2/ from `client`, authenticated in a task of its own."""
    token = base64.b64encode(f"alice:{password}".encode()).decode()
    request = make_mocked_request("GET", "/v2/", headers={"Authorization": f"Basic {token}"})
    exchange = Exchange(client=client, scheme="http", target=classify("/v2/"))
    return asyncio.create_task(auth.authenticate(request, exchange))
