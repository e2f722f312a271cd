"""Root podman with a storage of its own, and the stand-in for python:3.11-slim-bookworm.

podman runs as root with runc, cgroupfs and its images under CACHE, so root's default storage is
never touched. The stand-in base is made with debootstrap from Debian's python3 and kept in CACHE
while its recipe holds. tests/test_image.py and tests/test_compose.py build and run the image
with these.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

CACHE = (
    Path("/var/cache/registry-proxy-test")
    if os.geteuid() == 0
    else Path.home() / ".cache" / "registry-proxy-test"
)
# podman remembers its run root in the storage's database and refuses another one later, so it
# is fixed; and it must be short (podman limits it to 50 characters).
RUNROOT = "/run/registry-proxy-test"
STORAGE = ["--root", str(CACHE / "storage"), "--runroot", RUNROOT]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The stand-in base: what python:3.11-slim-bookworm offers the Dockerfile (python, venv, PATH).
SUITE = "bookworm"
BASE_PACKAGES = ["python3", "python3-venv", "python-is-python3"]
BASE_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
]
# pip inside the build reaches PyPI through whatever the host trusts (here a TLS-intercepting
# proxy whose CA is only in the host's bundle): the base carries the bundle when the host has one.
CA_CHANGE = f"ENV PIP_CERT={CA_BUNDLE}"
# runc refuses podman's default rlimits here.
CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"


def debian_mirror() -> str:
    """The Debian mirror apt uses for the suite (deb822 .sources or one-line .list), if any."""
    sources = Path("/etc/apt")
    for path in sorted([sources / "sources.list", *sources.glob("sources.list.d/*")]):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split():
                for uri in fields.get("URIs", "").split():
                    if "security" not in uri:
                        return uri.rstrip("/")
        for match in re.finditer(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.MULTILINE):
            if "security" not in match.group(1):
                return match.group(1).rstrip("/")
    return "http://deb.debian.org/debian"


class RootPodman:
    """podman as root with its own storage under CACHE, runc, cgroupfs and a test-owned config."""

    def __init__(self, runc: str, config: Path) -> None:
        self.global_args = [
            *STORAGE,
            "--runtime",
            runc,
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]
        self.env = {**os.environ, "CONTAINERS_CONF": str(config)}

    def command(self, *args: str) -> list[str]:
        return ["podman", *self.global_args, *args]

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check:
            assert result.returncode == 0, (
                f"`podman {' '.join(args)}` exited {result.returncode}\n"
                f"--- stdout:\n{result.stdout[-4000:]}\n--- stderr:\n{result.stderr[-4000:]}"
            )
        return result

    def inspect(self, *args: str) -> Any:
        return json.loads(self.run(*args).stdout)[0]


def why_unavailable() -> str | None:
    """What this machine lacks to build and run the image, or None."""
    if os.geteuid() != 0:
        return "needs root (rootful podman with runc)"
    for tool in ("podman", "runc", "skopeo", "debootstrap"):
        if not shutil.which(tool):
            return f"{tool} is missing (scripts/install-deps installs it)"
    exists = subprocess.run(
        ["podman", *STORAGE, "image", "exists", base_recipe()[0]], capture_output=True, check=False
    )
    if exists.returncode != 0:
        mirror = debian_mirror()
        try:
            urllib.request.urlopen(f"{mirror}/dists/{SUITE}/Release", timeout=10).close()
        except OSError as exc:
            return f"Debian's mirror {mirror} does not answer ({exc})"
    return None


def base_recipe() -> tuple[str, list[str], bytes | None]:
    """The stand-in base's tag (a hash of its recipe), its image changes and the CA bundle."""
    bundle = CA_BUNDLE.read_bytes() if CA_BUNDLE.is_file() else None
    changes = [*BASE_CHANGES, *([CA_CHANGE] if bundle is not None else [])]
    recipe = json.dumps([SUITE, "minbase", BASE_PACKAGES, changes]).encode() + (bundle or b"")
    tag = hashlib.sha256(recipe).hexdigest()[:16]
    return f"localhost/registry-proxy-test/python-base:{tag}", changes, bundle


def unmount_below(path: Path) -> None:
    """Undo the /proc and /sys mounts an interrupted debootstrap leaves in its target."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)


def build_base(podman: RootPodman, name: str, changes: list[str], bundle: bytes | None) -> None:
    """debootstrap a minimal bookworm with Debian's python3 and import it as `name`."""
    mirror = debian_mirror()
    target = CACHE / f"rootfs-{uuid.uuid4().hex[:8]}"
    try:
        result = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(target),
                mirror,
            ],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=900,
            check=False,
        )
        assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-4000:]}"
        # As slim images are: no package downloads or lists.
        for leftover in [target / "var/cache/apt/archives", target / "var/lib/apt/lists"]:
            for entry in leftover.glob("*"):
                if entry.is_file():
                    entry.unlink()
        if bundle is not None:
            (target / CA_BUNDLE.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
            (target / CA_BUNDLE.relative_to("/")).write_bytes(bundle)
        change_args = [arg for change in changes for arg in ("--change", change)]
        with subprocess.Popen(
            podman.command("import", *change_args, "-", name),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=podman.env,
        ) as importer:
            assert importer.stdin is not None and importer.stderr is not None
            with tarfile.open(fileobj=importer.stdin, mode="w|") as tar:
                tar.add(target, arcname=".")
            importer.stdin.close()
            assert importer.wait(300) == 0, importer.stderr.read()
    finally:
        unmount_below(target)
        shutil.rmtree(target, ignore_errors=True)


def build_stand_in_base(podman: RootPodman) -> tuple[str, float | None]:
    """The python:3.11-slim-bookworm stand-in's name, and its build time (None: cached)."""
    name, changes, bundle = base_recipe()
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "base.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if podman.run("image", "exists", name, check=False).returncode == 0:
            return name, None
        started = time.monotonic()
        build_base(podman, name, changes, bundle)
    return name, time.monotonic() - started
