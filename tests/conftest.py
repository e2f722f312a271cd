"""Fixtures: the real registry, an htpasswd file written by apache2-utils, the proxy, Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RedisServer
from tests.support import Proxy, Registry, htpasswd

FIGURES = pytest.StashKey[list[str]]()

# user -> (htpasswd flags, password); every scheme apache2-utils writes that we accept.
USERS = {
    "alice": (["-B", "-C", "5"], "alice-secret-ü"),
    "bob": (["-m"], "bob:pass with colon"),
    "carol": (["-s"], "carol-sha1"),
}
# The other limits on password guessing, lifted too unless a test sets them.
UNTHROTTLED = {
    "PROXY_AUTH_MAX_FAILURES_PER_USER": "1000000",
    "PROXY_AUTH_MAX_PENDING_PER_CLIENT": "1000000",
}


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


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The real registry binary with its own storage directory."""
    server = Registry(tmp_path_factory.mktemp("registry"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def proxy(
    registry: Registry, htpasswd_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """registry-proxy in front of the real registry."""
    # Many tests send wrong passwords from 127.0.0.1 on purpose; the throttle has its own tests.
    server = Proxy(
        tmp_path_factory.mktemp("proxy"),
        registry.url,
        htpasswd_file,
        {"PROXY_AUTH_MAX_FAILURES": "1000000", **UNTHROTTLED},
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_proxy(htpasswd_file: Path, tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Start extra proxies (another upstream, other settings); stopped after the test."""
    started: list[Proxy] = []

    def start(upstream: str, htpasswd: Path | None = None, **env: str) -> Proxy:
        env = {"PROXY_AUTH_MAX_FAILURES": "1000000", **UNTHROTTLED, **env}
        server = Proxy(tmp_path / f"proxy{len(started)}", upstream, htpasswd or htpasswd_file, env)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of the test's own: tests kill, stop and restart it."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


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
