"""The benchmark: start registry, nginx and proxy, measure each path alternately, report."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from bench import client, fairness, heads, report, tls_memory
from bench.client import BenchError, MiB
from bench.services import (
    BENCH_DIR,
    NGINX_BINARY,
    REGISTRY_BINARY,
    REPO_DIR,
    Nginx,
    Proxy,
    proxy_snapshot,
    proxy_source_info,
)
from tests.support.harness import HTPASSWD_BIN, Registry, htpasswd

PATHS = ("direct", "nginx", "proxy")
REPO = "bench/image"
TAG = "latest"
# user -> (bcrypt cost, password); htpasswd -B writes cost 5 unless told otherwise.
USERS = {"bench5": (5, "bench-five-secret"), "bench10": (10, "bench-ten-secret")}
BLOB_USER = "bench10"
# RSS readings over the aborted downloads, one after each tenth.
ABORT_READINGS = 10
MB = 1_000_000


@dataclass(frozen=True)
class Settings:
    """How much of each measurement to do."""

    mode: str
    blob_size: int
    streams: int
    rounds_get: int
    rounds_get_concurrent: int
    rounds_upload: int
    rounds_wrk: int
    rounds_head: int
    wrk_seconds: float
    wrk_connections: int
    wrk_threads: int
    head_requests: int
    head_seconds: float
    head_warmup: int
    aborts: int
    abort_concurrency: int
    abort_after: int
    # nginx worker_processes: `auto` (one per CPU) is the official nginx image's default.
    nginx_workers: int | str


FULL = Settings(
    mode="full",
    blob_size=1 << 30,
    streams=8,
    rounds_get=3,
    rounds_get_concurrent=2,
    rounds_upload=2,
    rounds_wrk=3,
    rounds_head=5,
    wrk_seconds=8,
    wrk_connections=32,
    wrk_threads=1,
    head_requests=4000,
    head_seconds=2,
    head_warmup=50,
    aborts=1000,
    abort_concurrency=8,
    abort_after=1 * MiB,
    nginx_workers="auto",
)
SMALL = Settings(
    mode="small",
    blob_size=32 * MiB,
    streams=8,
    rounds_get=1,
    rounds_get_concurrent=1,
    rounds_upload=1,
    rounds_wrk=1,
    rounds_head=1,
    wrk_seconds=3,
    wrk_connections=32,
    wrk_threads=1,
    head_requests=300,
    head_seconds=1,
    head_warmup=20,
    aborts=100,
    abort_concurrency=8,
    abort_after=256 * 1024,
    nginx_workers="auto",
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotation(round_index: int) -> tuple[str, ...]:
    """The paths in a different order each round, so none always runs first or last."""
    shift = round_index % len(PATHS)
    return PATHS[shift:] + PATHS[:shift]


def users_in_turn(round_index: int) -> list[tuple[str, int]]:
    """The users with their bcrypt cost, the order flipped every other round."""
    users = [(user, cost) for user, (cost, _) in USERS.items()]
    return users if round_index % 2 == 0 else users[::-1]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


class Bench:
    """One benchmark run in its own temp dir."""

    def __init__(self, settings: Settings, workdir: Path, proxy_rev: str | None = None) -> None:
        self.settings = settings
        self.proxy_rev = proxy_rev
        self.workdir = workdir
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.extra: dict[str, object] = {}
        self.registry = Registry(workdir / "registry", quiet=True)
        self.htpasswd = workdir / "htpasswd"
        self.nginx: Nginx | None = None
        self.proxy: Proxy | None = None
        self.blob_path = workdir / "blob.bin"
        self.digest = ""

    # --- setup ---------------------------------------------------------------------------

    def start(self) -> None:
        for user, (cost, password) in USERS.items():
            htpasswd(self.htpasswd, "-B", "-C", str(cost), user=user, password=password)
        self.registry.start()
        log(f"registry on {self.registry.url}; writing a {self.settings.blob_size // MiB} MiB blob")
        self.digest = client.make_blob(self.blob_path, self.settings.blob_size)
        seconds = client.upload_monolithic(
            self.registry.url, REPO, {}, self.blob_path, self.digest, self.settings.blob_size
        )
        log(f"pushed {self.digest} directly in {seconds:.1f}s")
        client.push_manifest(self.registry.url, REPO, TAG, {}, self.digest, self.settings.blob_size)
        self.nginx = Nginx(
            self.workdir / "nginx",
            self.registry.port,
            self.htpasswd,
            workers=self.settings.nginx_workers,
        )
        self.nginx.start()
        source = REPO_DIR
        if self.proxy_rev is not None:
            source = proxy_snapshot(self.proxy_rev, self.workdir / "proxy-src")
        self.proxy = Proxy(self.workdir / "proxy", self.registry.url, self.htpasswd, source=source)
        self.proxy.start()
        log(f"nginx on {self.nginx.url}, proxy on {self.proxy.url} (pid {self.proxy.pid})")
        self.extra["nginx_workers"] = len(self.nginx.worker_pids())
        log(f"nginx worker_processes {self.settings.nginx_workers}: "
            f"{self.extra['nginx_workers']} workers")  # fmt: skip
        self.extra["proxy_rss_start_kib"] = client.status_kib(self.proxy.pid, "VmRSS")
        self._sanity()

    def stop(self) -> None:
        for server in (self.proxy, self.nginx, self.registry):
            if server is not None:
                server.stop()

    def base(self, path: str) -> str:
        if path == "direct":
            return self.registry.url
        server = self.nginx if path == "nginx" else self.proxy
        assert server is not None
        return server.url

    def headers(self, user: str) -> dict[str, str]:
        """Credentials go on every request, the way docker sends them; the registry ignores
        them on the direct path."""
        return {"Authorization": client.basic(user, USERS[user][1])}

    def _sanity(self) -> None:
        manifest_accept = {"Accept": client.OCI_MANIFEST}
        for path in PATHS:
            url = f"{self.base(path)}/v2/{REPO}/manifests/{TAG}"
            for user in USERS:
                reply = client.call("GET", url, {**self.headers(user), **manifest_accept})
                client.expect(reply, 200, f"manifest GET via {path} as {user}")
            if path != "direct":
                client.expect(
                    client.call("GET", url, manifest_accept), 401, f"anonymous GET via {path}"
                )

    def record(self, metric: str, path: str, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(path, []).append(value)

    def rounds(self, count: int) -> Iterator[tuple[int, str]]:
        for index in range(count):
            for path in rotation(index):
                yield index, path

    # --- measurements ----------------------------------------------------------------------

    def blob_get(self) -> None:
        s = self.settings
        headers = self.headers(BLOB_USER)
        for index, path in self.rounds(s.rounds_get):
            url = f"{self.base(path)}/v2/{REPO}/blobs/{self.digest}"
            pids = self._server_pids(path)
            cpu_before = sum(client.cpu_seconds(pid) for pid in pids)
            seconds = client.download(url, headers, s.blob_size, 1)
            cpu = sum(client.cpu_seconds(pid) for pid in pids) - cpu_before
            rate = s.blob_size / MiB / seconds
            self.record("get1", path, rate)
            self.record("cpu_per_gib_get1", path, cpu / (s.blob_size / (1 << 30)))
            log(
                f"blob GET 1 stream, round {index + 1}, {path}: {rate:,.0f} MiB/s, "
                f"{cpu / (s.blob_size / (1 << 30)):.2f} CPU s/GiB"
            )

    def blob_get_concurrent(self) -> None:
        s = self.settings
        headers = self.headers(BLOB_USER)
        for index, path in self.rounds(s.rounds_get_concurrent):
            url = f"{self.base(path)}/v2/{REPO}/blobs/{self.digest}"
            pids = self._server_pids(path)
            for pid in pids:
                client.reset_peak(pid)
            cpu_before = sum(client.cpu_seconds(pid) for pid in pids)
            with client.RssSampler(pids) as sampler:
                seconds = client.download(url, headers, s.blob_size, s.streams)
            cpu = sum(client.cpu_seconds(pid) for pid in pids) - cpu_before
            peak_kib = max(sampler.peak_kib, sum(client.status_kib(p, "VmHWM") for p in pids))
            rate = s.streams * s.blob_size / MiB / seconds
            self.record("get8", path, rate)
            self.record("rss_peak", path, peak_kib * 1024 / MB)
            self.record("cpu_per_gib_get", path, cpu / (s.streams * s.blob_size / (1 << 30)))
            log(
                f"blob GET {s.streams} streams, round {index + 1}, {path}: {rate:,.0f} MiB/s, "
                f"server peak RSS {peak_kib * 1024 / MB:.1f} MB, {cpu:.1f} CPU s"
            )

    def blob_get_normal_relay(self) -> None:
        """The proxy with fast_blob_relay off, alternating with the fast path in each round."""
        s = self.settings
        headers = self.headers(BLOB_USER)
        normal = Proxy(
            self.workdir / "proxy-normal",
            self.registry.url,
            self.htpasswd,
            source=self.proxy.source if self.proxy else REPO_DIR,
            env={"PROXY_FAST_BLOB_RELAY": "false"},
        )
        normal.start()
        servers = {"fast": self.base("proxy"), "normal": normal.url}
        pids = {"fast": self._server_pids("proxy")[0], "normal": normal.pid}
        try:
            for index in range(s.rounds_get):
                for relay in ("normal", "fast") if index % 2 == 0 else ("fast", "normal"):
                    for streams in (1, s.streams):
                        url = f"{servers[relay]}/v2/{REPO}/blobs/{self.digest}"
                        before = client.cpu_seconds(pids[relay])
                        seconds = client.download(url, headers, s.blob_size, streams)
                        cpu = client.cpu_seconds(pids[relay]) - before
                        gib = streams * s.blob_size / (1 << 30)
                        rate = streams * s.blob_size / MiB / seconds
                        key = "get1" if streams == 1 else "get8"
                        self.record(f"relay_{relay}_{key}", "proxy", rate)
                        self.record(f"relay_{relay}_cpu_{key}", "proxy", cpu / gib)
                        log(
                            f"relay comparison, {streams} stream(s), round {index + 1}, "
                            f"{relay}: {rate:,.0f} MiB/s, {cpu / gib:.2f} CPU s/GiB"
                        )
        finally:
            normal.stop()

    def _server_pids(self, path: str) -> list[int]:
        """The processes of what a client talks to on `path`: the registry on the direct path."""
        if path == "proxy":
            assert self.proxy is not None
            return [self.proxy.pid]
        if path == "nginx":
            assert self.nginx is not None and self.nginx.process is not None
            return [self.nginx.process.pid, *self.nginx.worker_pids()]
        assert self.registry.process is not None
        return [self.registry.process.pid]

    def blob_upload(self) -> None:
        s = self.settings
        headers = self.headers(BLOB_USER)
        uploads: dict[str, Callable[..., float]] = {
            "put": client.upload_monolithic,
            "patch": client.upload_chunked,
        }
        for index, path in self.rounds(s.rounds_upload):
            for metric, upload in uploads.items():
                seconds = upload(
                    self.base(path), REPO, headers, self.blob_path, self.digest, s.blob_size
                )
                rate = s.blob_size / MiB / seconds
                self.record(metric, path, rate)
                log(f"blob upload {metric.upper()}, round {index + 1}, {path}: {rate:,.0f} MiB/s")

    def manifest_get(self) -> None:
        s = self.settings
        for index, path in self.rounds(s.rounds_wrk):
            for user, cost in users_in_turn(index):
                url = f"{self.base(path)}/v2/{REPO}/manifests/{TAG}"
                headers = self.headers(user)
                # One request first: the proxy's first check of a password is a real bcrypt.
                client.expect(
                    client.call("GET", url, {**headers, "Accept": client.OCI_MANIFEST}),
                    200,
                    f"manifest GET via {path}",
                )
                summary = client.run_wrk(
                    url,
                    authorization=headers["Authorization"],
                    accept=client.OCI_MANIFEST,
                    connections=s.wrk_connections,
                    threads=s.wrk_threads,
                    seconds=s.wrk_seconds,
                )
                requests = int(summary["requests"])  # type: ignore[call-overload]
                errors: dict[str, int] = summary["errors"]  # type: ignore[assignment]
                if requests == 0 or errors["status"]:
                    raise BenchError(f"wrk via {path} as {user}: {summary}")
                duration = float(summary["duration_us"]) / 1e6  # type: ignore[arg-type]
                latency: dict[str, float] = summary["latency_us"]  # type: ignore[assignment]
                rps = requests / duration
                self.record(f"rps{cost}", path, rps)
                self.record(f"get_p50_{cost}", path, latency["p50"] / 1000)
                self.record(f"get_p99_{cost}", path, latency["p99"] / 1000)
                self.extra.setdefault("wrk", []).append(  # type: ignore[attr-defined]
                    {"path": path, "user": user, "round": index + 1, **summary}
                )
                log(
                    f"manifest GET bcrypt {cost}, round {index + 1}, {path}: {rps:,.1f} req/s, "
                    f"p50 {latency['p50'] / 1000:.2f} ms, p99 {latency['p99'] / 1000:.2f} ms"
                )

    def manifest_head(self) -> None:
        s = self.settings
        for index, path in self.rounds(s.rounds_head):
            for user, cost in users_in_turn(index):
                url = f"{self.base(path)}/v2/{REPO}/manifests/{TAG}"
                latencies = client.head_latencies(
                    url,
                    {**self.headers(user), "Accept": client.OCI_MANIFEST},
                    requests=s.head_requests,
                    seconds=s.head_seconds,
                    warmup=s.head_warmup if path != "nginx" or cost < 10 else 2,
                )
                p50 = percentile(latencies, 50) * 1000
                p99 = percentile(latencies, 99) * 1000
                self.record(f"head_p50_{cost}", path, p50)
                self.record(f"head_p99_{cost}", path, p99)
                self.record(f"head_n_{cost}", path, len(latencies))
                log(
                    f"manifest HEAD bcrypt {cost}, round {index + 1}, {path}: "
                    f"p50 {p50:.3f} ms, p99 {p99:.3f} ms over {len(latencies)} requests"
                )

    def aborted(self) -> None:
        """RSS of the proxy over many downloads cut off mid-body, read after every tenth of
        them. A warm-up batch goes first: the first aborts grow buffers and arenas that stay."""
        s = self.settings
        assert self.proxy is not None
        pid = self.proxy.pid
        url = f"{self.proxy.url}/v2/{REPO}/blobs/{self.digest}"
        headers = self.headers(BLOB_USER)

        def abort(count: int) -> int:
            return client.aborted_downloads(
                url,
                headers,
                count=count,
                concurrency=s.abort_concurrency,
                abort_after=s.abort_after,
            )

        def settled_rss() -> int:
            time.sleep(0.5)
            return client.status_kib(pid, "VmRSS")

        # The allocator's arenas settle over the first few hundred (measured: RSS swings by
        # +-15 MB before that, then stays flat): warm up with a fifth of the run.
        warmup = max(4 * s.abort_concurrency, s.aborts // 5)
        abort(warmup)
        before = settled_rss()
        fds_before = client.open_fds(pid)
        client.reset_peak(pid)
        readings = [before]
        batch = max(1, s.aborts // ABORT_READINGS)
        started = 0
        for _ in range(ABORT_READINGS):
            started += abort(batch)
            readings.append(settled_rss())
        count = batch * ABORT_READINGS
        if started != count:
            raise BenchError(f"only {started} of {count} aborted downloads started with 200")
        fds_after = client.open_fds(pid)
        client.expect(
            client.call(
                "GET",
                f"{self.proxy.url}/v2/{REPO}/manifests/{TAG}",
                {**headers, "Accept": client.OCI_MANIFEST},
            ),
            200,
            "manifest GET via the proxy after the aborted downloads",
        )
        peak = client.status_kib(pid, "VmHWM")
        # One reading swings by several MB with what the allocator keeps; a leak is a trend.
        growth = statistics.median(readings[-3:]) - statistics.median(readings[:3])
        self.extra["aborts"] = {
            "count": count,
            "batch": batch,
            "warmup": warmup,
            "abort_after_bytes": s.abort_after,
            "concurrency": s.abort_concurrency,
            "rss_kib": readings,
            "peak_kib": peak,
            "open_fds_before": fds_before,
            "open_fds_after": fds_after,
        }
        self.record("rss_peak_aborts", "proxy", peak * 1024 / MB)
        self.record("rss_after_aborts", "proxy", readings[-1] * 1024 / MB)
        self.record("rss_growth_aborts", "proxy", growth * 1024 / MB)
        self.record("fds_growth_aborts", "proxy", fds_after - fds_before)
        trail = " ".join(f"{kib * 1024 / MB:.0f}" for kib in readings)
        log(
            f"{count} aborted downloads (after {warmup} to warm up): proxy RSS every {batch}: "
            f"{trail} MB; peak {peak * 1024 / MB:.1f} MB; open fds {fds_before} -> {fds_after}"
        )

    def unfinished_heads(self) -> None:
        """RSS added by connections holding an unfinished request head at the proxy's cap."""
        assert self.proxy is not None
        count = heads.COUNTS[self.settings.mode]
        added, dropped = heads.unfinished_heads_rss(self.proxy.port, self.proxy.pid, count)
        if dropped:
            raise BenchError(f"the proxy dropped {dropped} of {count} heads under its cap")
        self.record("rss_heads_per_1000", "proxy", added * 1000 / count)
        log(
            f"{count} unfinished {heads.HEAD_LIMIT - 256}-byte heads: proxy RSS +{added:.1f} MB "
            f"({added * 1000 / count:.1f} MB per 1,000)"
        )

    def _tls_proxy(self, name: str, cert: Path, key: Path) -> Proxy:
        return Proxy(
            self.workdir / name,
            self.registry.url,
            self.htpasswd,
            source=self.proxy.source if self.proxy else REPO_DIR,
            env={
                "PROXY_TLS_CERT": str(cert),
                "PROXY_TLS_KEY": str(key),
                "PROXY_TLS_HANDSHAKE_TIMEOUT": str(tls_memory.HANDSHAKE_TIMEOUT),
            },
        )

    def tls_connections(self) -> None:
        """The proxy serving TLS: its blob GET, and the RSS added by pending handshakes, idle
        TLS connections and unfinished heads over TLS (bench/tls_memory.py)."""
        s = self.settings
        cert, key, bundle = tls_memory.write_certificate(self.workdir / "certs")
        # curl (the TLS GET) trusts the run's CA.
        os.environ["CURL_CA_BUNDLE"] = str(bundle)
        secure = self._tls_proxy("proxy-tls", cert, key)
        secure.start()
        try:
            url = f"{secure.url}/v2/{REPO}/blobs/{self.digest}"
            for _ in range(s.rounds_get):
                seconds = client.download(url, self.headers(BLOB_USER), s.blob_size, 1)
                rate = s.blob_size / MiB / seconds
                self.record("tls_get1", "proxy", rate)
                log(f"TLS blob GET, 1 stream: {rate:,.0f} MiB/s")
        finally:
            secure.stop()
        count = tls_memory.COUNTS[s.mode]
        for index, (metric, what, measure) in enumerate(tls_memory.READINGS):
            fresh = self._tls_proxy(f"proxy-tls-{index}", cert, key)
            fresh.start()
            try:
                tls_memory.warm_up(fresh.port, bundle)
                added = measure(fresh.port, fresh.pid, count, bundle)
            finally:
                fresh.stop()
            per_1000 = added * 1000 / count
            self.record(metric, "proxy", per_1000)
            log(f"{count} {what}: proxy RSS +{added:.1f} MB ({per_1000:.1f} MB per 1,000)")

    def login_fairness(self) -> None:
        """Fresh logins while another address floods wrong passwords (bench/fairness.py)."""
        assert self.proxy is not None
        result = fairness.measure(
            self.workdir,
            self.registry.url,
            self.htpasswd,
            self.proxy.source,
            self.settings.mode,
            self.headers(BLOB_USER)["Authorization"],
        )
        idle_ms = statistics.median(result.idle) * 1000
        self.record("login_idle_p50", "proxy", idle_ms)
        for mode, seconds in result.flooded.items():
            flooded_ms = statistics.median(seconds) * 1000
            key = mode.replace("-", "_")
            self.record(f"login_flood_{key}_p50", "proxy", flooded_ms)
            self.record(f"login_flood_{key}_ratio", "proxy", flooded_ms / idle_ms)
            log(
                f"fresh login bcrypt 10: p50 {idle_ms:.1f} ms unloaded, {flooded_ms:.1f} ms "
                f"({flooded_ms / idle_ms:.2f}x) under {fairness.FLOOD_REQUESTS} wrong-password "
                f"requests from another address, resent {mode}; flood answers "
                f"{result.flood_statuses[mode]}"
            )
        self.extra["login_fairness"] = asdict(result)

    def run(self) -> None:
        self.blob_get()
        self.blob_get_concurrent()
        self.blob_get_normal_relay()
        self.blob_upload()
        self.manifest_get()
        self.manifest_head()
        self.aborted()
        self.unfinished_heads()
        self.tls_connections()
        self.login_fairness()
        assert self.proxy is not None
        self.extra["proxy_rss_end_kib"] = client.status_kib(self.proxy.pid, "VmRSS")

    def medians(self) -> dict[str, dict[str, float]]:
        """One figure per metric and path: the median over rounds (the maximum for peaks)."""
        result: dict[str, dict[str, float]] = {}
        for metric, by_path in self.samples.items():
            pick = max if metric == "rss_peak" else statistics.median
            result[metric] = {path: float(pick(values)) for path, values in by_path.items()}
        return result


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark registry-proxy against nginx (distribution's recipe) and the "
        "registry itself.",
    )
    parser.add_argument(
        "--small", action="store_true", help="CI size: 32 MiB blob, 2 s loads (< 2 minutes)"
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="also write bench/results.json, bench/results.md and bench/chart.png",
    )
    parser.add_argument("--rounds", type=int, help="rounds of every measurement (default: mode's)")
    parser.add_argument("--blob-mib", type=int, help="blob size in MiB (default: mode's)")
    parser.add_argument(
        "--nginx-workers",
        help="nginx worker_processes: a number or auto (default auto, the nginx image's)",
    )
    parser.add_argument(
        "--workers",
        nargs="?",
        const="auto",
        metavar="N",
        help="instead: blob GETs through the proxy with 1 and N workers (default auto) next to "
        "nginx (auto and 1 worker) and the registry, with the workers targets (bench/scaling.py)",
    )
    parser.add_argument(
        "--ui",
        action="store_true",
        help="instead: the registry browser's pages with 10,000 repositories and 1,000 tags "
        "(300 and 100 with --small), beside the registry requests they need (bench/ui.py)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="with --workers (implied): the same over HTTPS too"
    )
    parser.add_argument(
        "--proxy-rev",
        metavar="REV",
        help="run the proxy package as committed at this git revision (default: working tree)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument(
        "--out", type=Path, default=BENCH_DIR / "out", help="output dir (default: bench/out)"
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    base = SMALL if args.small else FULL
    changes: dict[str, object] = {}
    if args.rounds:
        changes.update(
            rounds_get=args.rounds,
            rounds_get_concurrent=args.rounds,
            rounds_upload=args.rounds,
            rounds_wrk=args.rounds,
            rounds_head=args.rounds,
        )
    if args.blob_mib:
        changes["blob_size"] = args.blob_mib * MiB
    if args.nginx_workers:
        changes["nginx_workers"] = args.nginx_workers
    return Settings(**{**asdict(base), **changes})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    signal.signal(signal.SIGTERM, _terminate)
    tools = {
        "curl": client.CURL,
        "wrk": client.WRK,
        "nginx": NGINX_BINARY,
        "htpasswd": HTPASSWD_BIN,
        "docker-registry": REGISTRY_BINARY,
    }
    missing = [name for name, path in tools.items() if not os.access(path, os.X_OK)]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2

    if args.ui:
        from bench import ui

        return ui.run(args)

    if args.workers or args.tls:
        from bench import scaling

        return scaling.run(args, settings)

    started = datetime.now(UTC)
    workdir = Path(tempfile.mkdtemp(prefix="registry-proxy-bench-"))
    bench = Bench(settings, workdir, args.proxy_rev)
    bench.extra["proxy_code"] = proxy_source_info(args.proxy_rev)
    clock = time.monotonic()
    try:
        bench.start()
        bench.run()
    except Exception as exc:
        # Whatever broke, the servers' logs and configs stay for a look.
        if not isinstance(exc, BenchError):
            traceback.print_exc()
        print(f"bench: FAILED: {exc}\n(logs in {workdir})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        bench.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results = report.build(
        started=started,
        seconds=time.monotonic() - clock,
        settings=asdict(settings),
        figures=bench.medians(),
        samples=bench.samples,
        extra=bench.extra,
    )
    print(report.table(results))
    print()
    print(report.targets_text(results))
    report.write_outputs(results, args.out, publish=args.publish, chart=not args.no_chart)
    return 0
