"""Access tokens made with the real `registry-proxy token` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def token_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`registry-proxy token ARGS`, with no PROXY_* variable but those in `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "token", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **(env or {})},
        timeout=60,
        check=False,
    )


def create_token(
    path: Path,
    name: str,
    *,
    owner: str = "alice",
    repositories: tuple[str, ...] = ("tok/**",),
    actions: str = "pull,push",
    expires: str = "30d",
) -> str:
    """Make a token with the CLI; its secret (the last line of stdout)."""
    result = token_cli(
        "create", name, "--file", str(path), "--owner", owner, "--repositories", *repositories,
        "--actions", actions, "--expires", expires,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]
