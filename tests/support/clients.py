"""The real clients users run (docker, skopeo, podman), each in a sealed environment.

Every client runs with its own HOME, DOCKER_CONFIG, auth file and, for podman, its own storage,
so nothing is read from or left in /root.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.proxy import Proxy

CLIENT_TIMEOUT = 60.0


class Clients:
    """Runs client CLIs in a sealed environment; failures report the client's output."""

    def __init__(self, workdir: Path, proxy: Proxy) -> None:
        self.proxy = proxy
        self.home = workdir / "home"
        self.docker_config = workdir / "docker-config"
        # Default auth file for skopeo and podman; absent unless a test logs in with it.
        self.authfile = workdir / "auth.json"
        runtime = workdir / "runtime"
        for directory in (self.home, self.docker_config, runtime):
            directory.mkdir(parents=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "DOCKER_CONFIG": str(self.docker_config),
            "REGISTRY_AUTH_FILE": str(self.authfile),
            "XDG_RUNTIME_DIR": str(runtime),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
        }

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            env=self.env,
            timeout=CLIENT_TIMEOUT,
            check=False,
        )

    def ok(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command that must succeed."""
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, self._report(result, "failed")
        return result

    def fails(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command that must fail."""
        result = self.run(*args, stdin=stdin)
        assert result.returncode != 0, self._report(result, "unexpectedly succeeded")
        return result

    def _report(self, result: subprocess.CompletedProcess[str], what: str) -> str:
        proxy_log = "\n".join(self.proxy.log().splitlines()[-30:])
        return (
            f"`{' '.join(result.args)}` {what} (exit {result.returncode})\n"
            f"--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}\n"
            f"--- proxy log (tail):\n{proxy_log}"
        )


class Podman:
    """podman as root with its own storage, run and tmp dirs, without systemd or journald.

    `--cgroup-manager=cgroupfs` and `--events-backend=file` because there is no systemd;
    `--tmpdir` keeps podman's state out of /run/libpod. podman refuses a runroot
    longer than 50 characters, too short for pytest's tmp_path, hence a separate `rundir`.
    """

    def __init__(self, clients: Clients, workdir: Path, rundir: Path) -> None:
        self.clients = clients
        self.global_args = (
            "--root",
            str(workdir / "root"),
            "--runroot",
            str(rundir),
            "--tmpdir",
            str(workdir / "tmp"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
        )

    def ok(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.clients.ok("podman", *self.global_args, *args, stdin=stdin)

    def fails(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.clients.fails("podman", *self.global_args, *args, stdin=stdin)
