"""The image built from the repository's Dockerfile and run for real, against the real registry.

podman (as root, runc, cgroupfs, the host network) builds the Dockerfile unchanged but for
PYTHON_IMAGE: a stand-in for python:3.11-slim-bookworm made with debootstrap from Debian's
python3, built once and cached between runs. All of it lives in a podman storage of its own
under CACHE, so root's default storage is never touched; every image and container a run makes
is removed after it. `pytest -m image` runs only this module, `-m "not image"` everything else.
Without root, podman, runc, skopeo, debootstrap or Debian's mirror the module skips, saying why,
except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    CONTAINERS_CONF,
    Registry,
    RootPodman,
    build_stand_in_base,
    free_port,
    push_blob,
    wait_until,
    why_unavailable,
    write_oci_layout,
)

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parent.parent
ADMIN_PORT = 8081
GRACE = 20
# A PEM private key or an htpasswd entry (bcrypt, apr1, SHA), whatever the file is called.
SECRET_CONTENT = re.compile(
    rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=]{16}"
    rb"|^[^:\s]+:(\$2[aby]\$\d\d\$|\$apr1\$|\{SHA\})",
    re.MULTILINE,
)
COMPILERS = {"gcc", "cc", "c++", "g++", "cpp", "clang", "tcc", "make", "ld", "as"}


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> RootPodman:
    """The podman this module runs (root, runc, cgroupfs, a containers.conf of its own)."""
    if UNAVAILABLE:
        pytest.fail(f"image test cannot run in CI: {UNAVAILABLE}", pytrace=False)
    runc = shutil.which("runc")
    assert runc is not None
    config = tmp_path_factory.mktemp("podman") / "containers.conf"
    config.write_text(CONTAINERS_CONF)
    return RootPodman(runc, config)


# A machine without the tools skips the module with one line; CI fails instead (`podman`).
UNAVAILABLE = why_unavailable()
if UNAVAILABLE and os.environ.get("CI") != "true":
    pytest.skip(f"image test: {UNAVAILABLE}", allow_module_level=True)


@pytest.fixture(scope="module")
def stand_in_base(podman: RootPodman, report_figure: Callable[[str, str], None]) -> str:
    """The python:3.11-slim-bookworm stand-in; reused from the cache while its recipe holds."""
    name, built = build_stand_in_base(podman)
    took = "(cached)" if built is None else f"built in {built:.0f} s"
    report_figure("image test: stand-in base", f"{name} {took}")
    return name


@pytest.fixture(scope="module")
def image(
    podman: RootPodman, stand_in_base: str, report_figure: Callable[[str, str], None]
) -> Iterator[str]:
    """The repository's Dockerfile built with only PYTHON_IMAGE overridden; removed afterwards."""
    name = f"localhost/registry-proxy-test/image:{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    # --format docker: the OCI format has no HEALTHCHECK. --layers=false: built afresh each run.
    podman.run(
        "build",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--format",
        "docker",
        "--layers=false",
        "--build-arg",
        f"PYTHON_IMAGE={stand_in_base}",
        "--tag",
        name,
        str(ROOT),
        timeout=600,
    )
    built = time.monotonic() - started
    try:
        size = podman.inspect("image", "inspect", name)["Size"]
        report_figure("image test: image size", f"{size / 1e6:.1f} MB ({size} bytes)")
        report_figure("image test: image build", f"{built:.0f} s")
        yield name
    finally:
        podman.run("rmi", "--force", name, check=False)


@pytest.fixture(scope="module")
def image_config(podman: RootPodman, image: str) -> dict[str, Any]:
    result: dict[str, Any] = podman.inspect("image", "inspect", image)
    return result


def healthcheck_command(image_config: dict[str, Any], admin: str) -> list[str]:
    """The image's HEALTHCHECK command, pointed at `admin` instead of the image's admin port."""
    test = image_config["Healthcheck"]["Test"]
    assert test[0] == "CMD", test
    default = f"127.0.0.1:{ADMIN_PORT}"
    assert sum(part.count(default) for part in test) == 1, test
    return [part.replace(default, admin) for part in test[1:]]


@dataclass
class Container:
    """One running container of the image, serving on free ports of the host network."""

    podman: RootPodman
    name: str
    port: int
    admin_port: int

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        result = self.podman.run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.podman.inspect("container", "inspect", self.name)["State"]
        return state

    def host_pid(self) -> int:
        return int(self.state()["Pid"])


@pytest.fixture
def start_container(
    podman: RootPodman,
    image: str,
    image_config: dict[str, Any],
    registry: Registry,
    htpasswd_file: Path,
    tmp_path: Path,
) -> Iterator[Callable[..., Container]]:
    """Start the image's `serve` in front of the real registry; containers removed afterwards."""
    started: list[Container] = []
    # The serving user (10001) reads the user list, as from a Swarm secret (mode 0444).
    secret = tmp_path / "htpasswd"
    shutil.copy(htpasswd_file, secret)
    secret.chmod(0o444)

    def start(**env: str) -> Container:
        container = Container(podman, f"registry-proxy-test-{uuid.uuid4().hex[:8]}", *free_ports())
        admin = f"127.0.0.1:{container.admin_port}"
        settings = {
            "PROXY_LISTEN": container.host,
            "PROXY_ADMIN_LISTEN": admin,
            "PROXY_UPSTREAM": registry.url,
            "PROXY_AUTH_MAX_FAILURES": "1000000",
            **env,
        }
        started.append(container)
        podman.run(
            "run",
            "--detach",
            "--name",
            container.name,
            "--network",
            "host",
            # The image's own check on this container's admin port; run on demand, not on a timer.
            "--health-cmd",
            json.dumps(healthcheck_command(image_config, admin)),
            "--health-interval",
            "disable",
            "--volume",
            f"{secret}:/run/secrets/htpasswd:ro",
            *[arg for key, value in settings.items() for arg in ("--env", f"{key}={value}")],
            image,
        )

        def answers() -> bool:
            state = container.state()
            assert state["Running"], f"container exited {state['ExitCode']}:\n{container.logs()}"
            try:
                socket.create_connection(("127.0.0.1", container.admin_port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(answers, "the container's admin listener")
        return container

    yield start
    for container in started:
        podman.run("rm", "--force", "--time", "0", container.name, check=False)


def free_ports() -> tuple[int, int]:
    while True:
        port, admin_port = free_port(), free_port()
        if port != admin_port:
            return port, admin_port


def basic(users: dict[str, str], user: str = "alice") -> str:
    return "Basic " + base64.b64encode(f"{user}:{users[user]}".encode()).decode()


# --- the running container ----------------------------------------------------------------------


def test_serves_as_uid_10001_from_pid_1(start_container: Callable[..., Container]) -> None:
    """Guards the image's USER and ENTRYPOINT: the proxy itself is PID 1, never root."""
    container = start_container()
    status = Path(f"/proc/{container.host_pid()}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split() == ["10001"] * 4
    assert fields["Gid"].split() == ["10001"] * 4
    assert fields["NSpid"].split()[-1] == "1", "PID 1 inside the container"
    cmdline = Path(f"/proc/{container.host_pid()}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"/opt/registry-proxy/bin/registry-proxy", b"serve"], cmdline


def test_sigterm_lets_a_download_finish_then_exits_0(
    start_container: Callable[..., Container], registry: Registry, users: dict[str, str]
) -> None:
    """Guards signal handling as PID 1 (a shell wrapper would ignore SIGTERM and be killed)."""
    container = start_container(PROXY_SHUTDOWN_TIMEOUT=str(GRACE // 2))
    repo = f"image/drain-{uuid.uuid4().hex[:8]}"
    digest = push_blob(registry.url, repo, os.urandom(48 << 20))
    sock = socket.create_connection(("127.0.0.1", container.port), timeout=30)
    sock.sendall(
        f"GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: {container.host}\r\n"
        f"Authorization: {basic(users)}\r\n\r\n".encode()
    )
    received = sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200"), received[:200]

    with subprocess.Popen(
        container.podman.command("stop", "--time", str(GRACE), container.name),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=container.podman.env,
    ) as stop:
        try:
            wait_until(lambda: "stopped accepting" in container.logs(), "the drain to begin")
            while chunk := sock.recv(1 << 20):
                received += chunk
            sock.close()
            _, errors = stop.communicate(timeout=GRACE + 30)
            assert stop.returncode == 0, errors
        finally:
            if stop.poll() is None:
                stop.kill()
    body = received.split(b"\r\n\r\n", 1)[1]
    assert hashlib.sha256(body).hexdigest() == digest.split(":")[1], "the download finished"
    # 137 would mean podman had to SIGKILL it at the end of the grace period.
    assert container.state()["ExitCode"] == 0, container.logs()
    assert "all requests finished" in container.logs()


def proc_status(pid: int) -> dict[str, str]:
    status = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def serving_pid(client: socket.socket, port: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the server side of `client`'s connection to `port` (host network)."""
    local = f"0100007F:{port:04X}"
    remote = f"0100007F:{client.getsockname()[1]:04X}"
    inodes = {
        fields[9]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if (fields := line.split())[1:3] == [local, remote]
    }
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in {f"socket:[{inode}]" for inode in inodes}:
                    return pid
    return None


def test_sigterm_drains_a_download_on_each_of_2_workers_then_exits_0(
    start_container: Callable[..., Container], registry: Registry, users: dict[str, str]
) -> None:
    """Guards `PROXY_WORKERS=2` in the image: the supervisor is PID 1, both workers are its
    children as uid 10001, and `podman stop` (SIGTERM to PID 1) lets a download in flight on each
    worker finish intact before the container exits 0 (not 137: podman's SIGKILL)."""
    workers = 2
    container = start_container(PROXY_WORKERS=str(workers), PROXY_SHUTDOWN_TIMEOUT=str(GRACE // 2))
    serves = re.compile(r"worker \d+ \(pid \d+\) serves")
    wait_until(lambda: len(serves.findall(container.logs())) == workers, "both workers to serve")
    parent = container.host_pid()
    assert proc_status(parent)["NSpid"].split()[-1] == "1", "the supervisor is PID 1"
    pids = children(parent)
    assert len(pids) == workers, pids
    for pid in [parent, *pids]:
        fields = proc_status(pid)
        assert fields["Uid"].split() == ["10001"] * 4, pid
        assert fields["Gid"].split() == ["10001"] * 4, pid
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"-m", b"proxy.worker"], cmdline

    repo = f"image/drain2-{uuid.uuid4().hex[:8]}"
    digest = push_blob(registry.url, repo, os.urandom(32 << 20))
    # Downloads until each worker carries one; an idle worker accepts first, so 2 usually do
    # (on a loaded machine the other may wake late: a few more are allowed).
    downloads: list[tuple[socket.socket, bytearray]] = []
    carriers: set[int] = set()
    while carriers != set(pids):
        if len(downloads) >= 24:
            for sock, _ in downloads:
                sock.close()
            raise AssertionError(f"the workers {carriers} carry every download")
        sock = socket.create_connection(("127.0.0.1", container.port), timeout=30)
        sock.sendall(
            f"GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: {container.host}\r\n"
            f"Authorization: {basic(users)}\r\n\r\n".encode()
        )
        received = bytearray(sock.recv(65536))
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        downloads.append((sock, received))
        carrier = serving_pid(sock, container.port, pids)
        assert carrier is not None, "a worker holds the connection"
        carriers.add(carrier)

    with subprocess.Popen(
        container.podman.command("stop", "--time", str(GRACE), container.name),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=container.podman.env,
    ) as stop:
        try:
            wait_until(
                lambda: container.logs().count("stopped accepting") == workers,
                "both workers to drain",
            )
            for sock, received in downloads:
                while chunk := sock.recv(1 << 20):
                    received += chunk
                sock.close()
            _, errors = stop.communicate(timeout=GRACE + 30)
            assert stop.returncode == 0, errors
        finally:
            if stop.poll() is None:
                stop.kill()
    for _, received in downloads:
        body = bytes(received).split(b"\r\n\r\n", 1)[1]
        assert hashlib.sha256(body).hexdigest() == digest.split(":")[1], "every download finished"
    logs = container.logs()
    assert container.state()["ExitCode"] == 0, logs
    assert logs.count("all requests finished") == workers, logs
    assert "all workers stopped" in logs


def test_healthcheck_passes_while_serving_and_fails_when_the_admin_listener_is_down(
    start_container: Callable[..., Container],
) -> None:
    """Guards the HEALTHCHECK command: it runs with what the image has and tells the truth."""
    container = start_container()

    def healthcheck() -> int:
        return container.podman.run("healthcheck", "run", container.name, check=False).returncode

    wait_until(lambda: healthcheck() == 0, "the image's HEALTHCHECK to pass")
    # A stopped process: the listener's socket still accepts, but nothing answers.
    os.kill(container.host_pid(), signal.SIGSTOP)
    try:
        assert healthcheck() == 1
    finally:
        os.kill(container.host_pid(), signal.SIGCONT)
    assert healthcheck() == 0


def test_skopeo_pushes_and_pulls_through_the_container(
    start_container: Callable[..., Container], users: dict[str, str], tmp_path: Path
) -> None:
    """Guards the image end to end: the real client, the container, the real registry."""
    container = start_container()
    layers: list[Mapping[str, bytes]] = [
        {"hello.txt": os.urandom(4096)},
        {"big.bin": os.urandom(3 << 20)},
    ]
    digests = write_oci_layout(tmp_path / "source", "v1", layers)
    target = f"docker://{container.host}/image/skopeo-{uuid.uuid4().hex[:8]}:v1"
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "REGISTRY_AUTH_FILE": str(home / "auth.json"),
    }
    credentials = f"alice:{users['alice']}"

    def skopeo(*args: str) -> None:
        result = subprocess.run(
            ["skopeo", *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert result.returncode == 0, f"{result.stderr}\n--- container:\n{container.logs()}"

    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", credentials,
           f"oci:{tmp_path / 'source'}:v1", target)  # fmt: skip
    skopeo("copy", "--src-tls-verify=false", "--src-creds", credentials,
           target, f"oci:{tmp_path / 'pulled'}:v1")  # fmt: skip
    for digest in digests:
        hex_digest = digest.split(":")[1]
        pulled = tmp_path / "pulled" / "blobs" / "sha256" / hex_digest
        assert hashlib.sha256(pulled.read_bytes()).hexdigest() == hex_digest


# --- the commands docs/swarm.md's `docker run` lines use -----------------------------------------


def run_with_tty(command: list[str], env: dict[str, str], answers: list[str]) -> tuple[int, str]:
    """Run `command` on a pseudo-terminal (docker run -it), typing `answers` at its prompts."""
    main, secondary = pty.openpty()
    process = subprocess.Popen(
        command, stdin=secondary, stdout=secondary, stderr=secondary, env=env
    )
    os.close(secondary)
    output = b""
    pending = list(answers)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 1)
            if ready:
                try:
                    chunk = os.read(main, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
                if pending and output.rstrip().endswith(b":"):
                    os.write(main, pending.pop(0).encode() + b"\n")
                    output += b"\n"
        return process.wait(30), output.decode(errors="replace")
    finally:
        os.close(main)
        if process.poll() is None:
            process.kill()
            process.wait()


def test_passwd_add_and_check_config_as_the_readme_says(
    podman: RootPodman, image: str, tmp_path: Path
) -> None:
    """Guards docs/swarm.md's `docker run -u "$(id -u):$(id -g)" -v "$PWD/secrets:..."` lines."""
    uid = gid = 4321  # "yourself": not root, not the image's user
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    os.chown(secrets, uid, gid)
    as_yourself = ["--rm", "--network", "none", "--user", f"{uid}:{gid}"]
    mount = ["--volume", f"{secrets}:/run/secrets"]

    # docker run --rm -it -u ... -v "$PWD/secrets:/run/secrets" IMAGE passwd add alice
    command = podman.command("run", "-it", *as_yourself, *mount, image, "passwd", "add", "alice")
    status, output = run_with_tty(command, podman.env, ["alice-pw", "alice-pw"])
    assert status == 0, output
    htpasswd = secrets / "htpasswd"
    assert (htpasswd.stat().st_uid, htpasswd.stat().st_gid) == (uid, gid), "the file stays yours"
    assert htpasswd.stat().st_mode & 0o777 == 0o640
    # docs/swarm.md step 3: another mount point, --file, and the password piped in.
    podman.run("run", "-i", *as_yourself, "--volume", f"{secrets}:/secrets", image, "passwd",
               "add", "--file", "/secrets/htpasswd", "ci-bot", "--password-stdin",
               stdin="bot-token\n")  # fmt: skip
    for user, password in [("alice", "alice-pw"), ("ci-bot", "bot-token")]:
        checked = subprocess.run(["htpasswd", "-vb", str(htpasswd), user, password], check=False)
        assert checked.returncode == 0, f"apache2-utils does not accept {user}"

    # docker run --rm -u ... -v "$PWD/secrets:/run/secrets" IMAGE check-config
    result = podman.run("run", *as_yourself, *mount, image, "check-config")
    assert "configuration valid; 2 users in /run/secrets/htpasswd" in result.stdout
    htpasswd.write_text("alice:plaintext\n")
    refused = podman.run("run", *as_yourself, *mount, image, "check-config", check=False)
    assert refused.returncode == 2, refused.stderr
    assert "/run/secrets/htpasswd:1" in refused.stderr


# --- what the image holds ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_root(podman: RootPodman, image: str) -> Iterator[Path]:
    """The image's file system, mounted read-only on the host."""
    root = Path(podman.run("image", "mount", image).stdout.strip())
    try:
        yield root
    finally:
        podman.run("image", "unmount", image, check=False)


def holds_a_secret(path: Path, in_base: Path) -> bool:
    """Whether a file the build added holds a key or an htpasswd entry.

    Files the base has byte for byte are left out: Debian's libgnutls carries self-test keys.
    """
    if path.is_symlink() or not path.is_file() or path.stat().st_size >= (4 << 20):
        return False
    content = path.read_bytes()
    if in_base.is_file() and not in_base.is_symlink() and in_base.read_bytes() == content:
        return False
    return SECRET_CONTENT.search(content) is not None


@pytest.fixture(scope="module")
def base_root(podman: RootPodman, stand_in_base: str) -> Iterator[Path]:
    """The stand-in base's file system, to tell what the build added."""
    root = Path(podman.run("image", "mount", stand_in_base).stdout.strip())
    try:
        yield root
    finally:
        podman.run("image", "unmount", stand_in_base, check=False)


def test_image_holds_no_compilers_caches_sources_tests_or_secrets(
    image_root: Path, base_root: Path
) -> None:
    """Guards the multi-stage build and .dockerignore: only the installed venv reaches the image."""
    found: dict[str, list[str]] = {
        "compilers": [],
        "pip caches": [],
        "sources or tests": [],
        "htpasswd or keys": [],
    }
    package = "/opt/registry-proxy/lib/python3.11/site-packages/proxy/"
    # The repository's own files that never belong in the image (proxy/ is installed, above).
    repository_files = {"pyproject.toml", "Dockerfile", "constraints.txt", "conftest.py"}
    repository_files |= {path.name for path in (ROOT / "tests").glob("test_*.py")}
    for directory, subdirs, files in os.walk(image_root):
        inside = "/" + str(Path(directory).relative_to(image_root)).lstrip(".")
        if inside.startswith(("/proc", "/sys", "/dev")):
            subdirs.clear()
            continue
        for name in subdirs:
            path = f"{inside.rstrip('/')}/{name}"
            if name in ("pip", "wheels", "http", "http-v2") and "/.cache" in path:
                found["pip caches"].append(path)
            if name == ".cache" or path.startswith("/tmp/pip-"):
                found["pip caches"].append(path)
            if path in ("/src", "/tests", "/bench") or name == ".git":
                found["sources or tests"].append(path)
        for name in files:
            path = f"{inside.rstrip('/')}/{name}"
            full = Path(directory) / name
            if name in COMPILERS or re.fullmatch(r"(\w+-)*(gcc|g\+\+|cc)(-\d+)?", name):
                found["compilers"].append(path)
            if name in repository_files:
                found["sources or tests"].append(path)
            if name in ("app.py", "forward.py") and not path.startswith(package):
                found["sources or tests"].append(path)
            if name.split(".")[0] == "htpasswd" and not name.endswith((".py", ".pyc")):
                found["htpasswd or keys"].append(path)
            if name.endswith((".key", ".p12", ".pfx")):
                found["htpasswd or keys"].append(path)
            if holds_a_secret(full, base_root / path[1:]):
                found["htpasswd or keys"].append(path)
    assert found == {what: [] for what in found}
    assert Path(str(image_root) + package, "app.py").is_file(), "the walk saw the package"


def test_image_installs_every_module_of_the_package(image_root: Path) -> None:
    """Guards pyproject's package list and package data: a subpackage or template left out
    passes every editable test only."""
    site_package = image_root / "opt/registry-proxy/lib/python3.11/site-packages/proxy"
    shipped = ("*.py", "*.html", "*.css", "*.js", "*.svg")
    installed = {
        str(path.relative_to(site_package)) for kind in shipped for path in site_package.rglob(kind)
    }
    sources = {
        str(path.relative_to(ROOT / "proxy"))
        for kind in shipped
        for path in (ROOT / "proxy").rglob(kind)
    }
    # The browser's templates and static files are package data: left out, only the image fails.
    assert sorted(sources - installed) == []


def test_image_installs_the_pinned_dependencies(image_root: Path) -> None:
    """Guards reproducible builds: the image's distributions are exactly constraints.txt."""
    pinned, optional = {}, set()
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement, _, marker = line.partition(";")
            name, version = requirement.split("==")
            pinned[normalize(name)] = version.strip()
            if marker:
                # For some Python versions only (async-timeout before 3.11.3): pinned if there.
                optional.add(normalize(name))
    site = image_root / "opt/registry-proxy/lib/python3.11/site-packages"
    installed = {}
    for info in site.glob("*.dist-info"):
        metadata = (info / "METADATA").read_text(errors="replace")
        fields = dict(re.findall(r"^(Name|Version): (.+)$", metadata, re.MULTILINE))
        installed[normalize(fields["Name"])] = fields["Version"].strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert installed.pop("registry-proxy") == project["version"]
    for tooling in ("pip", "setuptools"):  # what `python -m venv` puts in every venv
        installed.pop(tooling, None)
    for name in optional - set(installed):
        del pinned[name]
    assert installed == pinned


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_labels_name_the_source_version_and_revision(
    podman: RootPodman, image: str, image_config: dict[str, Any]
) -> None:
    """Guards the OCI labels: the version label is the version the image's command reports."""
    labels = image_config["Labels"]
    version = podman.run("run", "--rm", "--network", "none", image, "--version").stdout.split()
    assert labels["org.opencontainers.image.version"] == version[-1]
    assert labels["org.opencontainers.image.revision"]
    assert labels["org.opencontainers.image.source"]
