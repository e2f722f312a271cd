"""scripts/demo and scripts/install-deps as a first-time user runs them."""

from __future__ import annotations

import base64
import http.cookiejar
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import call, free_port, wait_until

# Every test runs scripts/demo or scripts/install-deps.
pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo"
# The first run of install-deps may install the venv; once done, the demo starts in seconds.
DEMO_DEADLINE = 120.0


def port_is_free(port: int) -> bool:
    """Whether a server could bind the port now (as the demo's servers bind it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Demo:
    popen: subprocess.Popen[bytes]
    output: Path
    state: Path
    ports: dict[str, int]

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def password(self) -> str:
        for line in self.text().splitlines():
            if "user: demo" in line and "password: " in line:
                return line.split("password: ", 1)[1].strip()
        raise AssertionError(f"no password printed:\n{self.text()}")


def browser_sign_in(base: str, user: str, password: str) -> tuple[str, str]:
    """Sign in with the browser's form as a browser would: where it lands, and that page."""
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    with opener.open(base + "/ui/login", timeout=30) as response:
        csrf = re.search(r'name="csrf" value="([^"]+)"', response.read().decode())
    assert csrf, "no sign-in form"
    form = {"csrf": csrf[1], "username": user, "password": password}
    with opener.open(base + "/ui/login", urllib.parse.urlencode(form).encode(), 30) as response:
        return urllib.parse.urlsplit(response.geturl()).path, response.read().decode()


# Exec the demo with SIGINT ignored, as `scripts/demo &` in a non-interactive shell starts it.
IGNORING_SIGINT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def start_demo(tmp_path: Path, prefix: list[str] | None = None, **ports: int) -> Demo:
    names = ("DEMO_REGISTRY_PORT", "DEMO_PROXY_PORT", "DEMO_ADMIN_PORT")
    chosen = {name: ports.get(name) or free_port() for name in names}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "DEMO_"))}
    env |= {name: str(port) for name, port in chosen.items()}
    env["DEMO_DIR"] = str(tmp_path / "demo")
    # A caller's PROXY_* settings must not leak into the demo's proxy (the push would fail).
    env["PROXY_READ_ONLY"] = "true"
    output = tmp_path / "demo.out"
    with output.open("wb") as sink:
        popen = subprocess.Popen(
            [*(prefix or []), str(DEMO)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return Demo(popen, output, tmp_path / "demo", chosen)


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        # Whatever the test did, nothing it started outlives it.
        if group_alive(demo.popen.pid):
            os.killpg(demo.popen.pid, signal.SIGKILL)
        demo.popen.wait(10)


@pytest.mark.parametrize(
    ("signum", "started_with_sigint_ignored"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
)
def test_a_signal_to_the_demo_stops_both_servers_and_frees_the_ports(
    tmp_path: Path, demos: list[Demo], signum: signal.Signals, started_with_sigint_ignored: bool
) -> None:
    """Guards the registry and proxy outliving a SIGINT/SIGTERM sent to the demo's PID only."""
    demo = start_demo(tmp_path, IGNORING_SIGINT if started_with_sigint_ignored else None)
    demos.append(demo)

    def banner() -> bool:
        if demo.popen.poll() is not None:
            raise AssertionError(f"demo exited {demo.popen.returncode}:\n{demo.text()}")
        return "Stop with Ctrl-C" in demo.text()

    wait_until(banner, "the demo's banner", DEMO_DEADLINE)
    proxy = f"http://127.0.0.1:{demo.ports['DEMO_PROXY_PORT']}"
    auth = base64.b64encode(f"demo:{demo.password()}".encode()).decode()
    assert call(proxy + "/v2/", headers={"Authorization": "Basic " + auth})[0] == 200
    assert not any(port_is_free(port) for port in demo.ports.values())

    demo.popen.send_signal(signum)  # to the PID, not the process group
    assert demo.popen.wait(30) != 0
    assert not group_alive(demo.popen.pid), "a server of the demo is still running"
    assert all(port_is_free(port) for port in demo.ports.values())


def test_the_demo_password_file_is_private_and_its_image_pushes(
    tmp_path: Path, demos: list[Demo]
) -> None:
    """Guards a world-readable .demo/htpasswd (or session key), an `oci:IMAGE-DIR` hint with no
    image, and a browser the banner points at that is off or refuses the demo's password."""
    demo = start_demo(tmp_path)
    demos.append(demo)
    wait_until(lambda: "Stop with Ctrl-C" in demo.text(), "the demo's banner", DEMO_DEADLINE)
    assert stat.S_IMODE((demo.state / "htpasswd").stat().st_mode) == 0o600
    assert stat.S_IMODE(demo.state.stat().st_mode) == 0o700

    # The exact command the banner prints.
    lines = demo.text().splitlines()
    start = next(i for i, line in enumerate(lines) if "skopeo copy" in line)
    command = (lines[start].rstrip("\\") + lines[start + 1]).split("Try:", 1)[-1]
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "oci:" + str(demo.state / "image") in command
    proxy = f"http://127.0.0.1:{demo.ports['DEMO_PROXY_PORT']}"
    auth = base64.b64encode(f"demo:{demo.password()}".encode()).decode()
    status, _, _ = call(
        proxy + "/v2/demo/hello/manifests/1",
        headers={"Authorization": "Basic " + auth,
                 "Accept": "application/vnd.oci.image.manifest.v1+json"},
    )  # fmt: skip
    assert status == 200
    assert "podman pull --tls-verify=false" in demo.text()
    # The browser is on, at the address the banner prints, and the demo's password signs in.
    assert f"browser:   {proxy}/ui/" in demo.text()
    assert stat.S_IMODE((demo.state / "ui-session.key").stat().st_mode) == 0o600
    landed, page = browser_sign_in(proxy, "demo", demo.password())
    assert landed == "/ui/" and ">demo/hello</a>" in page


@pytest.mark.parametrize("taken", ["DEMO_REGISTRY_PORT", "DEMO_PROXY_PORT", "DEMO_ADMIN_PORT"])
def test_a_taken_port_is_named_before_anything_starts(
    tmp_path: Path, demos: list[Demo], taken: str
) -> None:
    """Guards the demo proxying to a foreign server on 5000, or printing a password and failing."""
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = foreign.getsockname()[1]
        demo = start_demo(tmp_path, **{taken: port})
        demos.append(demo)
        status = demo.popen.wait(DEMO_DEADLINE)
    assert status == 1, demo.text()
    assert f"demo: port {port} ({taken}) is taken" in demo.text()
    assert "password" not in demo.text()
    assert not group_alive(demo.popen.pid)
    assert all(port_is_free(p) for name, p in demo.ports.items() if name != taken)


# --- install-deps runs pip only when pyproject.toml changed.


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the scripts with a `.venv/bin/python` that only records how it was called."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "install-deps", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copy(ROOT / "constraints.txt", tmp_path)
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    recorder = venv / "python"
    recorder.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "pip-calls"}\n')
    recorder.chmod(0o755)
    return tmp_path


def pip_calls(checkout: Path, *args: str) -> list[str]:
    calls = checkout / "pip-calls"
    calls.unlink(missing_ok=True)
    # Every package counts as installed: only the venv part runs.
    bin_dir = checkout / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "dpkg-query").write_text("#!/bin/sh\necho 'install ok installed'\n")
    (bin_dir / "dpkg-query").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(
        [str(checkout / "scripts" / "install-deps"), *args],
        check=True, env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    return calls.read_text().splitlines() if calls.exists() else []


def test_install_deps_runs_pip_only_when_something_changed(checkout: Path) -> None:
    """Guards `pip install --upgrade pip` and `pip install -e .` on every demo start."""
    first = pip_calls(checkout, "--demo")
    assert any("--upgrade pip" in c for c in first) and any("-e ." in c for c in first)
    assert pip_calls(checkout, "--demo") == []
    # The tests need their extras: a demo install is not enough for them...
    assert any("-e .[test]" in c for c in pip_calls(checkout))
    assert pip_calls(checkout) == []
    # ...but a test install serves the demo.
    assert pip_calls(checkout, "--demo") == []
    with (checkout / "pyproject.toml").open("a") as file:
        file.write("\n# changed\n")
    assert any("-e .[test]" in c for c in pip_calls(checkout))
    # New pins (scripts/pin-deps) reinstall too.
    with (checkout / "constraints.txt").open("a") as file:
        file.write("\n# changed\n")
    assert any("-e .[test]" in c for c in pip_calls(checkout))


def test_a_second_start_keeps_the_first_starts_password(tmp_path: Path, demos: list[Demo]) -> None:
    """Guards a new password (or browser session key) on every start: the login a client stored
    on the first run (docker login, a browser's session) failed on the next one."""

    def started(demo: Demo) -> bool:
        if demo.popen.poll() is not None:
            raise AssertionError(f"demo exited {demo.popen.returncode}:\n{demo.text()}")
        return "Stop with Ctrl-C" in demo.text()

    first = start_demo(tmp_path)
    demos.append(first)
    wait_until(lambda: started(first), "the first demo's banner", DEMO_DEADLINE)
    password = first.password()
    key = (first.state / "ui-session.key").read_bytes()
    first.popen.send_signal(signal.SIGTERM)
    first.popen.wait(30)

    second = start_demo(tmp_path)
    demos.append(second)
    wait_until(lambda: started(second), "the second demo's banner", DEMO_DEADLINE)
    assert second.password() == password
    assert stat.S_IMODE((second.state / "password").stat().st_mode) == 0o600
    # The browser's session key too: a browser signed in on the first run stays signed in.
    assert (second.state / "ui-session.key").read_bytes() == key
    proxy = f"http://127.0.0.1:{second.ports['DEMO_PROXY_PORT']}"
    auth = base64.b64encode(f"demo:{password}".encode()).decode()
    assert call(proxy + "/v2/", headers={"Authorization": "Basic " + auth})[0] == 200
