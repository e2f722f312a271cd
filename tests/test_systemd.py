"""deploy/registry-proxy.service: systemd's own verifier accepts it, and it keeps its hardening.

`systemd-analyze verify` checks a copy whose ExecStart is this venv's `registry-proxy` (the unit
names /opt/registry-proxy, which a test machine lacks); everything else is the file as shipped.
Without systemd-analyze (Debian's `systemd` package) the module skips, except in CI (CI=true).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import SETTINGS

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "registry-proxy.service"
INSTALLED = "/opt/registry-proxy/bin/registry-proxy"

if shutil.which("systemd-analyze") is None and os.environ.get("CI") != "true":
    pytest.skip(
        "systemd-analyze is missing (scripts/install-deps installs it)", allow_module_level=True
    )


def directives(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of the unit, by key, in order (a key may repeat)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def runnable_copy(directory: Path, text: str) -> Path:
    """The unit with ExecStart pointing at this venv's console script."""
    script = Path(sys.executable).parent / "registry-proxy"
    assert os.access(script, os.X_OK), f"{script}: the venv's console script"
    assert text.count(INSTALLED) == 1, "ExecStart names the pip-installed console script"
    path = directory / UNIT.name
    path.write_text(text.replace(INSTALLED, str(script)))
    return path


def verify(unit: Path) -> str:
    """What `systemd-analyze verify` says about `unit` (its exit status appended when not 0)."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (result.stdout + result.stderr).strip()
    return output if result.returncode == 0 else f"{output}\nexit status {result.returncode}"


def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(
    tmp_path: Path, report_figure: Callable[[str, str], None]
) -> None:
    """Guards the unit against settings systemd ignores or rejects (a misspelt key or value is
    only a warning to systemd, so the output must be empty, not just the exit status 0)."""
    unit = runnable_copy(tmp_path, UNIT.read_text())
    assert verify(unit) == ""
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    level = re.search(r"Overall exposure level for \S+: (.+)", security.stdout)
    report_figure("systemd unit: exposure", level.group(1) if level else security.stderr.strip())


def test_verify_reports_what_systemd_would_ignore(tmp_path: Path) -> None:
    """Guards the check above: a value systemd cannot parse shows up in what it prints."""
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=stricter")
    assert "ProtectSystem=stricter" in broken
    assert "protect system" in verify(runnable_copy(tmp_path, broken)).lower()


def test_the_unit_runs_the_console_script_hardened() -> None:
    """Guards the unit's promises: the pip-installed command with the /etc configuration, a
    user of its own, a read-only system, no capability beyond binding 443, the syscall filter,
    reload by SIGHUP, restart on failure, and room for max_connections and the drain."""
    unit = directives(UNIT.read_text())
    assert unit["ExecStart"] == [f"{INSTALLED} serve --config /etc/registry-proxy/proxy.yml"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert unit.get("DynamicUser") == ["yes"] or unit["User"] not in ([], ["root"], ["0"])
    expected = {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "SystemCallFilter": "@system-service",
    }
    assert {key: unit[key] for key in expected} == {k: [v] for k, v in expected.items()}
    for capabilities in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert set(" ".join(unit[capabilities]).split()) <= {"CAP_NET_BIND_SERVICE"}
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    # A client's connection and its upstream connection each take a descriptor.
    max_connections = SETTINGS["max_connections"].default
    assert isinstance(max_connections, int)
    assert int(unit["LimitNOFILE"][0]) >= 4 * max_connections
    shutdown_timeout = SETTINGS["shutdown_timeout"].default
    assert isinstance(shutdown_timeout, int | float)
    assert float(unit["TimeoutStopSec"][0].removesuffix("s")) > shutdown_timeout
