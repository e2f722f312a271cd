"""Fixtures: the real registry, an htpasswd file written by apache2-utils, the proxy, Redis.

Every test is marked `unit` (in-process, seconds for all of them) or `system` (it starts
processes: a registry, a proxy, Redis, an edge, a client CLI). A test is `system` when it
uses a fixture from PROCESS_FIXTURES (directly or through another fixture) or carries the
mark itself (or through its module's `pytestmark`); `unit` otherwise. A `unit` test that
starts a process anyway fails, naming the mark it lacks.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trustme

from tests.support import (
    SLAPD_BIN,
    Browser,
    Proxy,
    RedisServer,
    Registry,
    Slapd,
    browser_missing,
    htpasswd,
    serving,
    start_browser,
    wait_until,
)

FIGURES = pytest.StashKey[list[str]]()

# user -> (htpasswd flags, password); every scheme apache2-utils writes that we accept.
USERS = {
    "alice": (["-B", "-C", "5"], "alice-secret-ü"),
    "bob": (["-m"], "bob:pass with colon"),
    "carol": (["-s"], "carol-sha1"),
}
# Many tests send wrong passwords from 127.0.0.1 on purpose; the throttle has its own tests.
UNTHROTTLED = {
    "PROXY_AUTH_MAX_FAILURES": "1000000",
    "PROXY_AUTH_MAX_FAILURES_PER_USER": "1000000",
    "PROXY_AUTH_MAX_PENDING_PER_CLIENT": "1000000",
}

# Fixtures that start a process, themselves or through a fixture they use: these, and the
# modules' own registry-and-proxy sites (test_catalog, test_reading, test_immutable_tags,
# test_public_access).
PROCESS_FIXTURES = frozenset(
    {"htpasswd_file", "costly_htpasswd", "registry", "proxy", "start_proxy", "redis_server"}
    | {"slapd", "browser"}
    | {"site", "guarded", "public"}
)

# Tests that run twice, in one process and with `workers: 2` (the `workers` fixture), by
# module. They reach the proxy through `proxy` or `start_proxy`, which follow `workers`.
WITH_WORKERS = {
    "test_clients.py": (
        "test_docker_login_refuses_bad_credentials",
        "test_docker_login_stores_credentials",
        "test_podman_login_pull_tag_push",
        "test_skopeo_push_inspect_pull_and_delete",
    ),
    "test_ldap.py": ("test_a_directory_user_logs_in_and_directory_groups_are_rule_groups",),
    "test_operations.py": (
        "test_drain_deadline_cuts_what_is_left_and_says_so",
        "test_drain_turns_readyz_503_and_closes_idle_connections_at_once",
        "test_metrics_move_with_a_push_and_a_pull",
        "test_metrics_pass_promtool",
        "test_readyz_follows_the_upstream",
        "test_skopeo_and_curl_push_and_pull_over_tls",
    ),
    "test_proxy_protocol.py": (
        "test_haproxy_tcp_mode_tells_clients_apart",
        "test_many_connections_at_once_each_keep_their_own_client",
    ),
    "test_tokens.py": (
        "test_expired_and_revoked_tokens_get_a_401_and_the_audit_says_why",
        "test_a_revocation_reaches_two_proxies_sharing_the_file_within_10_seconds",
    ),
    "test_throttle_proxy.py": (
        "test_concurrency_parallel_guesses_run_no_more_checks_than_the_budget",
        "test_no_lockout_by_name_from_many_addresses_slows_guesses_not_the_owner",
        "test_no_lockout_by_name_the_owner_logs_in_from_another_address",
        "test_shared_address_one_colleague_mistyping_does_not_lock_out_the_others",
    ),
}
WORKERS = "2"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the WITH_WORKERS tests once per `workers` value."""
    if metafunc.function.__name__ in WITH_WORKERS.get(metafunc.definition.path.name, ()):
        metafunc.parametrize("workers", ["1", WORKERS], ids=["1worker", f"{WORKERS}workers"])


@pytest.fixture
def workers() -> str:
    """PROXY_WORKERS for `proxy` and `start_proxy`: 1, unless a module or WITH_WORKERS says."""
    return "1"


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key for the browser's session cookies: 32 random bytes, base64 as the docs suggest."""
    path = tmp_path_factory.mktemp("ui-key") / "ui-session.key"
    path.write_text(secrets.token_urlsafe(32))
    return path


@pytest.fixture(scope="session")
def users() -> dict[str, str]:
    """user -> password for every user in `htpasswd_file`."""
    return {user: password for user, (_, password) in USERS.items()}


@pytest.fixture(scope="session")
def htpasswd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An htpasswd file written by the real `htpasswd` tool."""
    path = tmp_path_factory.mktemp("auth") / "htpasswd"
    for user, (flags, password) in USERS.items():
        htpasswd(path, *flags, user=user, password=password)
    return path


@pytest.fixture
def costly_htpasswd(tmp_path: Path) -> Path:
    """alice and bob with cost-9 bcrypt (~25 ms a check), carol with cost 5."""
    path = tmp_path / "htpasswd"
    for user, cost in [("alice", "9"), ("bob", "9"), ("carol", "5")]:
        htpasswd(path, "-B", "-C", cost, user=user, password=f"{user}-password")
    return path


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The real registry binary with its own storage directory."""
    server = Registry(tmp_path_factory.mktemp("registry"))
    server.start()
    yield server
    server.stop()


def unstarted_proxy(root: Path, upstream: str, htpasswd: Path, workers: str, **env: str) -> Proxy:
    """A proxy with UNTHROTTLED, PROXY_WORKERS=`workers` (unless 1) and `env`."""
    if workers != "1":
        env = {"PROXY_WORKERS": workers, **env}
    return Proxy(root, upstream, htpasswd, {**UNTHROTTLED, **env})


def start(server: Proxy, workers: str) -> Proxy:
    """Start `server`; with `workers` other than 1, wait until each of its workers serves."""
    server.start()
    if workers != "1":
        count = server.extra_env["PROXY_WORKERS"]
        expected = len(os.sched_getaffinity(0)) if count == "auto" else int(count)
        wait_until(lambda: serving(server) == expected, "every worker to serve")
    return server


@pytest.fixture(scope="session")
def one_process_proxy(
    registry: Registry, htpasswd_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """`proxy` for the tests with `workers: 1`, shared by the whole session."""
    server = unstarted_proxy(tmp_path_factory.mktemp("proxy"), registry.url, htpasswd_file, "1")
    yield start(server, "1")
    server.stop()


@pytest.fixture(scope="module")
def proxies_with_workers(
    registry: Registry, htpasswd_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Proxy]]:
    """`proxy` for the tests with workers, by PROXY_WORKERS: started when first asked for,
    shared by the module's tests."""
    started: dict[str, Proxy] = {}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def proxy(workers: str, request: pytest.FixtureRequest) -> Proxy:
    """registry-proxy in front of the real registry, with `workers`, shared between tests."""
    if workers == "1":
        return request.getfixturevalue("one_process_proxy")  # type: ignore[no-any-return]
    started: dict[str, Proxy] = request.getfixturevalue("proxies_with_workers")
    if workers not in started:
        registry: Registry = request.getfixturevalue("registry")
        htpasswd_file: Path = request.getfixturevalue("htpasswd_file")
        root = request.getfixturevalue("tmp_path_factory").mktemp(f"proxy-workers-{workers}")
        started[workers] = unstarted_proxy(root, registry.url, htpasswd_file, workers)
        start(started[workers], workers)
    return started[workers]


@pytest.fixture
def start_proxy(
    htpasswd_file: Path, tmp_path: Path, workers: str
) -> Iterator[Callable[..., Proxy]]:
    """Start extra proxies (another upstream, other settings); stopped after the test."""
    started: list[Proxy] = []

    def start_one(upstream: str, htpasswd: Path | None = None, **env: str) -> Proxy:
        root = tmp_path / f"proxy{len(started)}"
        server = unstarted_proxy(root, upstream, htpasswd or htpasswd_file, workers, **env)
        started.append(server)  # stopped after the test even if it fails to start
        return start(server, workers)

    yield start_one
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of the test's own: tests kill, stop and restart it."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def slapd(tmp_path: Path, ca: trustme.CA) -> Iterator[Slapd]:
    """A real OpenLDAP slapd of the test's own (StartTLS with `ca`): tests kill and restart it."""
    if not Path(SLAPD_BIN).exists() and os.environ.get("CI") != "true":
        pytest.skip("slapd is not installed (Debian's slapd and ldap-utils: scripts/install-deps)")
    server = Slapd(tmp_path / "slapd", ca)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """Headless Chromium with a fresh profile, at desktop size (`browser.use(PHONE)` narrows it)."""
    missing = browser_missing()
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run in CI: {missing}", pytrace=False)
    if missing:
        pytest.skip(f"{missing} (Debian's chromium and chromium-driver: scripts/install-deps)")
    with start_browser(tmp_path / "chromium") as started:
        yield started


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A certificate authority for the TLS tests (see `write_certificate`)."""
    return trustme.CA()


@pytest.fixture(scope="session")
def report_figure(pytestconfig: pytest.Config) -> Callable[[str, str], None]:
    """Record a figure (the image's size, build times) for the summary at the end of the run."""

    def report(name: str, value: str) -> None:
        pytestconfig.stash.setdefault(FIGURES, []).append(f"{name}: {value}")

    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print the recorded figures in every run (CI logs included), not only with -s."""
    figures = config.stash.get(FIGURES, [])
    if figures:
        terminalreporter.section("figures")
        for line in figures:
            terminalreporter.write_line(line)


# --- unit and system ------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test `unit` or `system` (see the module's docstring)."""
    for item in items:
        marked = item.get_closest_marker("system") or item.get_closest_marker("image")
        uses_processes = PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.system if marked or uses_processes else pytest.mark.unit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Run `unit` tests (their fixtures included) where starting a process fails them."""
    if item.get_closest_marker("unit") is None:
        return (yield)

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        pytest.fail(
            f"{item.nodeid} is marked unit but started a process: mark it `system` "
            "(@pytest.mark.system, or `pytestmark` for its module) or add the fixture that "
            "starts the process to PROCESS_FIXTURES in tests/conftest.py"
        )

    with pytest.MonkeyPatch.context() as patch:
        # asyncio's subprocesses are made by subprocess.Popen too; multiprocessing forks.
        patch.setattr(subprocess.Popen, "__init__", refuse)
        patch.setattr(os, "fork", refuse)
        return (yield)
