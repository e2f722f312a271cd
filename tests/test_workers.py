"""`workers: N`: worker processes behind one port, the supervising parent, summed metrics.

The tests here run against proxies with two workers (`workers`). Tests of other modules run
with workers too: WITH_WORKERS in tests/conftest.py names them (the workers share one throttle:
tests/test_shared_throttle.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.support import (
    Process,
    Proxy,
    Registry,
    call,
    http_status,
    scrape,
    sha256,
    start_download,
    value,
    wait_until,
    worker_pids,
)
from tests.support import basic_auth as basic

WORKERS = 2
AUTO = len(os.sched_getaffinity(0))


@pytest.fixture
def workers() -> str:
    """`proxy` and `start_proxy` start two workers in this module."""
    return str(WORKERS)


def served_by(proxy: Proxy) -> dict[str, int]:
    """Requests answered per worker pid, each read from that worker's own metrics file (the
    access log has no per-worker prefix: it is JSON lines)."""
    counts: dict[str, int] = {}
    for path in metrics_dir(proxy).glob("counter_*.db"):
        with tempfile.TemporaryDirectory() as alone:
            shutil.copy(path, alone)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=alone)  # type: ignore[no-untyped-call]
            answered = sum(
                sample.value
                for family in registry.collect()
                for sample in family.samples
                if sample.name == "registry_proxy_requests_total"
            )
        if answered:
            counts[path.stem.partition("_")[2]] = int(answered)
    return counts


def metrics_dir(proxy: Proxy) -> Path:
    found = re.search(r"workers' metrics in (\S+)", proxy.log())
    assert found, proxy.log()
    return Path(found.group(1))


def on_new_connections(url: str, count: int, **kwargs: object) -> list[int]:
    """`count` requests, each on its own connection, eight at a time; their statuses."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: call(url, **kwargs)[0], range(count)))  # type: ignore[arg-type]


# `workers: auto` (2 where this process may use one CPU only: auto would be a single process).
@pytest.mark.parametrize("workers", ["auto" if AUTO > 1 else "2"])
def test_metrics_sum_every_worker(proxy: Proxy, users: dict[str, str]) -> None:
    """Guards the exposition: /metrics counts the requests of every worker exactly once (one
    worker's registry would show about half, a double count twice as many)."""
    auth = basic("alice", users["alice"])
    before, served_before = scrape(proxy), served_by(proxy)
    statuses = on_new_connections(proxy.url + "/v2/", 80, headers=auth)
    assert statuses == [200] * 80
    wait_until(lambda: sum(served_by(proxy).values()) - sum(served_before.values()) == 80,
               "80 access records")  # fmt: skip
    after, served_after = scrape(proxy), served_by(proxy)
    assert len(served_after) == max(AUTO, 2)
    for worker, served in served_after.items():
        assert served > served_before.get(worker, 0), f"worker {worker} served none of them"
    requests = "registry_proxy_requests_total"
    labels = {"method": "GET", "action": "ping", "status_class": "2xx", "code": "200"}
    assert value(after, requests, **labels) - value(before, requests, **labels) == 80
    durations = "registry_proxy_request_duration_seconds_count"
    assert value(after, durations, action="ping") - value(before, durations, action="ping") == 80
    assert value(after, "registry_proxy_requests_in_flight", action="ping") == 0
    assert value(after, "registry_proxy_build_info", **build_labels(after)) == 1
    # Pool gauges add up the workers' pools (each worker refreshes its own; the parent has none).
    workers = len(served_after)
    wait_until(
        lambda: value(scrape(proxy), "registry_proxy_upstream_connections_limit") == 100 * workers,
        "every worker's upstream pool limit in the sum",
    )
    # process_* add up the parent and the workers: more than the parent has alone.
    assert proxy.process is not None
    assert value(after, "process_resident_memory_bytes") > rss_bytes(proxy.process.pid)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def build_labels(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, str]:
    (labels,) = [dict(key[1]) for key in samples if key[0] == "registry_proxy_build_info"]
    return labels


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_a_download_on_a_worker_then_the_parent_exits_0(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards the forwarded drain: every worker stops accepting (the port refuses), the download
    in flight finishes intact while the parent waits, and the temp dir is gone afterwards."""
    proxy = start_proxy(registry.url)
    directory = metrics_dir(proxy)
    assert directory.is_dir()
    sock, digest, received = start_download(registry, proxy, 48, basic("alice", users["alice"]))
    assert proxy.process is not None
    proxy.process.signal(signal.SIGTERM)
    wait_until(lambda: proxy.log().count("stopped accepting") == WORKERS, "every worker to drain")
    assert refused(proxy.port)
    assert proxy.process.popen is not None and proxy.process.popen.poll() is None
    while chunk := sock.recv(1 << 20):
        received += chunk
    sock.close()
    assert sha256(received.split(b"\r\n\r\n", 1)[1]) == digest
    assert proxy.process.wait(30) == 0
    assert proxy.log().count("all requests finished") == WORKERS
    assert "all workers stopped" in proxy.log()
    assert not directory.exists()


def test_sighup_reloads_the_access_rules_in_every_worker(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], tmp_path: Path
) -> None:
    """Guards SIGHUP forwarding: after `read_only: true` and one SIGHUP to the parent, writes
    are refused on every connection, whichever worker takes it (not every other one)."""
    config = tmp_path / "proxy.yml"
    config.write_text("read_only: false\n")
    proxy = start_proxy(registry.url, PROXY_CONFIG=str(config))
    auth = basic("alice", users["alice"])
    upload = f"{proxy.url}/v2/hup/blobs/uploads/"
    assert on_new_connections(upload, 8, method="POST", headers=auth) == [202] * 8
    config.write_text("read_only: true\n")
    assert proxy.process is not None
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: proxy.log().count("access reloaded (SIGHUP)") == WORKERS,
               "every worker to reload")  # fmt: skip
    served_before = served_by(proxy)
    assert on_new_connections(upload, 40, method="POST", headers=auth) == [405] * 40
    wait_until(lambda: sum(served_by(proxy).values()) - sum(served_before.values()) == 40,
               "40 access records")  # fmt: skip
    for worker, served in served_by(proxy).items():
        assert served > served_before.get(worker, 0), f"worker {worker} served none of them"


def test_a_killed_worker_is_restarted_and_readyz_says_503_meanwhile(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards the restart: the parent logs how the worker died, /readyz is 503 until the new
    one serves (not ready while a worker is down), then the proxy serves on every worker."""
    proxy = start_proxy(registry.url, PROXY_UPSTREAM_PROBE_INTERVAL="0.2")
    wait_until(lambda: http_status(proxy.admin_url + "/readyz") == 200, "ready")
    victim = worker_pids(proxy)[1]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: http_status(proxy.admin_url + "/readyz") == 503, "/readyz to say 503")
    assert f"worker 1 (pid {victim}) was killed by signal 9 (SIGKILL); restarting it" in (
        proxy.log()
    )
    wait_until(lambda: worker_pids(proxy)[1] != victim, "a new worker 1")
    wait_until(lambda: http_status(proxy.admin_url + "/readyz") == 200, "ready again")
    auth = basic("alice", users["alice"])
    assert on_new_connections(proxy.url + "/v2/", 20, headers=auth) == [200] * 20


def test_a_bad_certificate_makes_the_parent_exit_2(
    tmp_path: Path, registry: Registry, htpasswd_file: Path
) -> None:
    """Guards the give-up: a certificate that does not load makes the parent exit with the
    configuration status (checked before any worker starts) instead of restarting workers
    forever; the keeps-dying test covers workers that fail at start for other reasons."""
    bad = tmp_path / "cert.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    proxy = Proxy(
        tmp_path,
        registry.url,
        htpasswd_file,
        {"PROXY_WORKERS": "2", "PROXY_TLS_CERT": str(bad), "PROXY_TLS_KEY": str(bad)},
    )
    proxy.process = Process(
        [sys.executable, "-m", "proxy", "serve"], tmp_path / "proxy.log", proxy.environment()
    )
    proxy.process.start()
    try:
        assert proxy.process.wait(30) == 2
    finally:
        proxy.stop()
    log = proxy.log()
    # The same check as check-config, before any worker starts (proxy/preflight.py).
    assert "tls.cert/tls.key: cannot load" in log
    assert "worker 1 started" not in log and "workers' metrics in" not in log


def test_workers_that_keep_dying_at_start_are_given_up_after_3_tries(
    tmp_path: Path, registry: Registry, htpasswd_file: Path
) -> None:
    """Guards the restart loop's end: a worker that dies before it serves (injected: it exits 3
    at interpreter start) is restarted with a growing delay, then the parent exits 1."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, sys\nif '--listen-fd' in sys.argv:\n    os._exit(3)\n"
    )
    proxy = Proxy(
        tmp_path, registry.url, htpasswd_file, {"PROXY_WORKERS": "2", "PYTHONPATH": str(hooks)}
    )
    proxy.process = Process(
        [sys.executable, "-m", "proxy", "serve"], tmp_path / "proxy.log", proxy.environment()
    )
    proxy.process.start()
    try:
        assert proxy.process.wait(30) == 1
    finally:
        proxy.stop()
    log = proxy.log()
    assert "exited with status 3; restarting it in 0.5s" in log
    assert "exited with status 3; restarting it in 1s" in log
    assert "exited with status 3 before it served (3 in a row): giving up" in log
    assert not metrics_dir(proxy).exists()


def check_config(htpasswd: Path, *prefix: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    environment.update(PROXY_HTPASSWD=str(htpasswd), **env)
    return subprocess.run(
        [*prefix, sys.executable, "-m", "proxy", "check-config"],
        env=environment, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_workers_auto_counts_the_cpus_this_process_may_use(htpasswd_file: Path) -> None:
    """Guards `auto`: sched_getaffinity (what taskset and cgroup cpusets allow), not the CPUs
    the machine has."""
    result = check_config(htpasswd_file, PROXY_WORKERS="auto")
    assert f"\nworkers: {len(os.sched_getaffinity(0))}\n" in result.stdout, result.stderr
    result = check_config(htpasswd_file, "taskset", "-c", "0", PROXY_WORKERS="auto")
    assert "\nworkers: 1\n" in result.stdout, result.stderr


@pytest.mark.parametrize("given", ["0", "two", "-1"])
def test_workers_must_be_a_count_or_auto(given: str, htpasswd_file: Path) -> None:
    result = check_config(htpasswd_file, PROXY_WORKERS=given)
    assert result.returncode == 2
    assert "environment PROXY_WORKERS: workers: expected a whole number of at least 1 or auto" in (
        result.stderr
    )
