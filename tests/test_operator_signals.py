"""What an operator sees: the state behind an alert, the proxy's own log lines, and errors that
name where the mistake is.

Class: signals that are missing, unreadable by a pipeline, or without a location. `read_only`
is a gauge an alert can watch; `log_format: json` makes every stderr line a JSON object;
listener clashes name the setting and the address (with workers too) and nothing says
"serving" before every listener is bound; an unknown user in the rules names file and line.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.app import warn_about_unknown_users
from proxy.config import load_config
from proxy.log import JsonFormatter
from tests.support import Proxy, Registry, free_port, gauge, wait_until

WORKER_COUNTS = pytest.mark.parametrize("workers", ["1", "2"], ids=["1worker", "2workers"])


@WORKER_COUNTS
def test_read_only_is_a_gauge_that_follows_sighup(
    tmp_path: Path, registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards `read_only` left on unnoticed: no metric said it was on, so no alert could fire."""
    config = tmp_path / "proxy.yml"
    config.write_text("read_only: true\n")
    proxy = start_proxy(registry.url, PROXY_CONFIG=str(config))
    assert proxy.process is not None
    assert gauge(proxy, "registry_proxy_read_only") == 1
    config.write_text("read_only: false\n")
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: gauge(proxy, "registry_proxy_read_only") == 0, "the gauge to follow")


@WORKER_COUNTS
def test_json_log_format_makes_every_stderr_line_json(
    tmp_path: Path, registry: Registry, start_proxy: Callable[..., Proxy], workers: str
) -> None:
    """Guards `log_format: json` leaving the proxy's own lines (workers' too) in text, which a
    pipeline reading JSON drops or mangles."""
    config = tmp_path / "proxy.yml"
    config.write_text("access: [{users: [alice], repositories: ['**'], actions: [pull]}]\n")
    proxy = start_proxy(registry.url, PROXY_CONFIG=str(config), PROXY_LOG_FORMAT="json")
    assert proxy.process is not None
    config.write_text("access: [unclosed\n")
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reload (SIGHUP) failed" in proxy.log(), "the reload")
    lines = [json.loads(line) for line in proxy.log().splitlines()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    serving = [line for line in lines if line["message"].startswith("serving http://")]
    assert serving and all(line["level"] == "info" for line in serving)
    failed = [line for line in lines if "reload (SIGHUP) failed" in line["message"]]
    assert failed and all(line["level"] == "error" for line in failed)
    if workers != "1":
        assert {line.get("worker") for line in serving} == {1, 2}


def test_json_log_lines_carry_the_traceback_as_a_field_on_one_line() -> None:
    """Guards a JSON log line broken by a traceback or a newline in a message: each record is
    one line, and the traceback one field of it."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "registry_proxy",
            logging.ERROR,
            __file__,
            1,
            "bad\nline %s",
            ("\x1b[2J",),
            sys.exc_info(),
        )
    line = JsonFormatter(worker=3).format(record)
    assert "\n" not in line and "\x1b" not in line
    fields = json.loads(line)
    assert fields["message"] == "bad\nline \x1b[2J"
    assert fields["level"] == "error" and fields["logger"] == "registry_proxy"
    assert fields["worker"] == 3
    assert fields["traceback"].startswith("Traceback (most recent call last):")
    assert fields["traceback"].endswith("ValueError: boom")


@WORKER_COUNTS
@pytest.mark.parametrize("key", ["listen", "admin_listen"])
@pytest.mark.system
def test_a_port_clash_names_the_setting_and_address_and_nothing_says_serving(
    htpasswd_file: Path, key: str, workers: str
) -> None:
    """Guards, with workers above 1, `cannot listen: [Errno 98] Address already in use` naming
    neither address nor setting; and an admin port clash logged after "serving"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        addresses = {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
        }
        addresses[key] = busy
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "serve"],
            env={"PATH": "/usr/bin:/bin", "PROXY_HTPASSWD": str(htpasswd_file),
                 "PROXY_LISTEN": addresses["listen"], "PROXY_WORKERS": workers,
                 "PROXY_ADMIN_LISTEN": addresses["admin_listen"]},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"registry-proxy: cannot listen on {busy} ({key}): Address already in use\n" in (
        result.stderr
    )
    assert " serving " not in result.stderr and "serves" not in result.stderr


def test_an_unknown_user_in_the_rules_is_warned_about_with_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the warning about a user the htpasswd file lacks naming no place to fix it."""
    config = tmp_path / "proxy.yml"
    config.write_text(
        "htpasswd: /h\n"
        "groups:\n"
        "  ci: [alice, ghost]\n"
        "access:\n"
        "  - users: ['@ci']\n"
        "    repositories: ['**']\n"
        "    actions: [pull]\n"
        "  - users:\n"
        "      - ghost\n"
        "    repositories: ['ci/**']\n"
        "    actions: [push]\n"
    )
    loaded = load_config(config, {})
    with caplog.at_level(logging.WARNING):
        warn_about_unknown_users(loaded.access, {"alice": "x"}, config)
    assert caplog.messages == [
        f"{config}:3, {config}:9: access rules name users not in the htpasswd file: ghost"
    ]
