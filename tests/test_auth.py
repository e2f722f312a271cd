"""Basic credential parsing and the credential checker's cache, sharing and decoy."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable

import bcrypt as bcrypt_module
import pytest
from passlib.hash import bcrypt

from proxy.auth import credentials
from proxy.auth.credentials import CredentialChecker, Outcome, parse_basic

BCRYPT_PW = "correct horse"
BCRYPT_HASH = bcrypt.using(rounds=4).hash(BCRYPT_PW)


def basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic(b"alice:pw"), ("alice", "pw")),
        (basic(b"bob:a:b:c"), ("bob", "a:b:c")),
        (basic(b"u:"), ("u", "")),
        (basic("ünï:pässwörd".encode()), ("ünï", "pässwörd")),
        ("basic " + base64.b64encode(b"u:p").decode(), ("u", "p")),
        ("  Basic   " + base64.b64encode(b"u:p").decode() + "  ", ("u", "p")),
    ],
)
def test_parse_valid(header: str, expected: tuple[str, str]) -> None:
    assert parse_basic(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic ",
        "Bearer abc.def",
        "Digest username=x",
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        basic(b":password-without-user"),
        basic(b"\xff\xfe:latin1"),
        basic(b"u:pass\x00word"),
        basic(b"us\x00er:pw"),
        "Basic " + "QQ" * 5000,
    ],
)
def test_parse_malformed_is_none(header: str | None) -> None:
    assert parse_basic(header) is None


def checker(
    users: dict[str, str] | None = None,
    *,
    cache_ttl: float = 60,
    cache_size: int = 100,
    clock: Callable[[], float] = time.monotonic,
) -> CredentialChecker:
    return CredentialChecker(
        users or {"alice": BCRYPT_HASH},
        cache_ttl=cache_ttl,
        cache_size=cache_size,
        workers=2,
        clock=clock,
    )


class CountingVerify:
    """Wraps the real verify to count hash computations."""

    def __init__(self, verify: Callable[[str, str], bool]) -> None:
        self.verify = verify
        self.calls = 0
        self.targets: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, password: str, stored: str) -> bool:
        with self.lock:
            self.calls += 1
            self.targets.append(stored)
        return self.verify(password, stored)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingVerify:
    counter = CountingVerify(credentials.verify_password)
    monkeypatch.setattr(credentials, "verify_password", counter)
    return counter


async def test_success_is_cached(counting: CountingVerify) -> None:
    check = checker()
    assert await check.check("alice", BCRYPT_PW) is Outcome.VERIFIED
    assert await check.check("alice", BCRYPT_PW) is Outcome.CACHED
    assert counting.calls == 1
    check.close()


async def test_failures_are_not_cached(counting: CountingVerify) -> None:
    check = checker()
    assert await check.check("alice", "wrong") is Outcome.REJECTED
    assert await check.check("alice", "wrong") is Outcome.REJECTED
    assert counting.calls == 2
    check.close()


async def test_concurrent_identical_checks_share_one_hash(counting: CountingVerify) -> None:
    check = checker()
    outcomes = await asyncio.gather(*(check.check("alice", BCRYPT_PW) for _ in range(20)))
    assert all(o.ok for o in outcomes)
    assert counting.calls == 1
    check.close()


async def test_cache_expires(counting: CountingVerify) -> None:
    now = [1000.0]
    check = checker(cache_ttl=10, clock=lambda: now[0])
    assert await check.check("alice", BCRYPT_PW) is Outcome.VERIFIED
    now[0] += 9
    assert await check.check("alice", BCRYPT_PW) is Outcome.CACHED
    now[0] += 2
    assert await check.check("alice", BCRYPT_PW) is Outcome.VERIFIED
    assert counting.calls == 2
    check.close()


async def test_cache_is_bounded(counting: CountingVerify) -> None:
    users = {f"u{i}": bcrypt.using(rounds=4).hash("pw") for i in range(3)}
    check = checker(users, cache_size=2)
    for user in users:
        await check.check(user, "pw")
    assert await check.check("u2", "pw") is Outcome.CACHED
    assert await check.check("u0", "pw") is Outcome.VERIFIED  # evicted, least recently used
    check.close()


async def test_replacing_users_forgets_cached_credentials(counting: CountingVerify) -> None:
    check = checker()
    assert await check.check("alice", BCRYPT_PW) is Outcome.VERIFIED
    check.replace_users({"bob": BCRYPT_HASH})
    assert await check.check("alice", BCRYPT_PW) is Outcome.REJECTED
    assert await check.check("bob", BCRYPT_PW) is Outcome.VERIFIED
    check.close()


async def test_unknown_user_is_checked_against_a_decoy_of_the_same_cost(
    counting: CountingVerify,
) -> None:
    slow = bcrypt.using(rounds=6).hash("pw")
    check = checker({"alice": BCRYPT_HASH, "bob": slow})
    assert await check.check("mallory", "pw") is Outcome.REJECTED
    assert counting.calls == 1
    decoy = counting.targets[0]
    assert decoy not in (BCRYPT_HASH, slow)
    assert bcrypt.from_string(decoy).rounds == 6
    check.close()


async def test_unknown_user_never_authenticates_even_with_the_decoy_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(credentials, "verify_password", lambda password, stored: True)
    check = checker()
    assert await check.check("mallory", "anything") is Outcome.REJECTED
    check.close()


@pytest.fixture(params=["installed bcrypt", "bcrypt 4.x"])
def bcrypt_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The installed bcrypt, and one that behaves like 4.x (pyproject allows >=4.1): it reads
    only the first 72 bytes of a longer password instead of raising as 5.0 does."""
    if request.param == "bcrypt 4.x":
        real = bcrypt_module.hashpw
        monkeypatch.setattr(bcrypt_module, "hashpw", lambda secret, salt: real(secret[:72], salt))
    return str(request.param)


def test_passwords_longer_than_bcrypt_reads_never_match(bcrypt_backend: str) -> None:
    """Guards the proxy's own 72-byte limit: bcrypt 5 refuses longer passwords by itself, but
    4.x accepts the 72-byte prefix followed by anything."""
    long_password = "x" * 72
    stored = bcrypt.using(rounds=4, truncate_error=False).hash(long_password)
    assert credentials.verify_password(long_password, stored)
    assert not credentials.verify_password(long_password + "extra", stored)
    assert not credentials.verify_password("y" * 8192, stored)


# --- Timing: every failed check lasts as long as the decoy's.


class FakeTime:
    """A timer that moves only when a fake hash runs; a sleep that records instead of waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()
        self.events: list[tuple[str, float]] = []

    def timer(self) -> float:
        with self.lock:
            return self.now

    def spend(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.events.append(("sleep", seconds))


async def test_failed_checks_are_padded_to_the_decoys_cost_without_computing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timing: unknown users, {SHA}, apr1 and a cheaper bcrypt take the decoy's time to fail."""
    from passlib.hash import apr_md5_crypt, ldap_sha1

    cheap = bcrypt.using(rounds=4).hash("pw")
    users = {"alice": cheap, "bob": str(apr_md5_crypt.hash("pw")), "carol": ldap_sha1.hash("pw")}
    costs = {cheap: 0.02, users["bob"]: 0.001, users["carol"]: 0.0001, "decoy": 0.3}
    clock = FakeTime()
    real_verify = credentials.verify_password

    def verify(password: str, stored: str) -> bool:
        clock.spend(costs[stored])
        return stored != "decoy" and real_verify(password, stored)

    monkeypatch.setattr(credentials, "verify_password", verify)
    check = CredentialChecker(
        users, cache_ttl=60, cache_size=10, workers=1, timer=clock.timer, sleep=clock.sleep
    )
    check.replace_users(users, "decoy", decoy_cost=0.3)
    for user in ["alice", "bob", "carol", "nobody"]:
        clock.events.clear()
        before = clock.timer()
        outcome = await check.check(user, "wrong", "client")
        assert outcome is Outcome.REJECTED
        slept = sum(seconds for _, seconds in clock.events)
        assert clock.timer() - before + slept == pytest.approx(0.3), user
    clock.events.clear()
    assert await check.check("alice", "pw", "client") is Outcome.VERIFIED
    assert clock.events == []
    check.close()


async def test_the_decoy_cost_follows_checks_against_the_decoy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeTime()

    def verify(password: str, stored: str) -> bool:
        clock.spend(0.5)  # the machine got slower than when the decoy was measured
        return False

    monkeypatch.setattr(credentials, "verify_password", verify)
    check = CredentialChecker(
        {"alice": BCRYPT_HASH}, cache_ttl=60, cache_size=10, workers=1, timer=clock.timer
    )
    check.replace_users({"alice": BCRYPT_HASH}, "decoy", decoy_cost=0.1)
    for n in range(30):
        await check.check(f"nobody{n}", "x", "client")
    assert check.decoy_cost == pytest.approx(0.5, rel=0.01)
    check.close()


def test_the_decoy_cost_is_measured_when_users_are_loaded() -> None:
    ticks = iter([10.0, 10.25])
    check = CredentialChecker(
        {"alice": BCRYPT_HASH}, cache_ttl=60, cache_size=10, workers=1, timer=lambda: next(ticks)
    )
    assert check.decoy_cost == 0.25
    check.close()


async def test_a_client_past_its_share_of_the_pool_is_busy(counting: CountingVerify) -> None:
    """Fairness: a client's own queue is capped; other clients still get a check."""
    from proxy.auth.hashpool import Busy

    check = CredentialChecker(
        {"alice": BCRYPT_HASH}, cache_ttl=60, cache_size=10, workers=1, max_pending_per_client=2
    )
    results = await asyncio.gather(
        *(check.check("alice", f"guess{n}", "flooder") for n in range(4)),
        check.check("alice", BCRYPT_PW, "other"),
        return_exceptions=True,
    )
    assert [type(r) for r in results[:4]] == [Outcome, Outcome, Busy, Busy]
    assert results[4] is Outcome.VERIFIED
    assert counting.calls == 3
    check.close()
