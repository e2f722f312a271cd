"""`bench/run --workers [N]` and `--tls`: blob GETs through the proxy with 1 and N workers.

Next to nginx (`worker_processes auto`, and 1 as an extra row) and the registry itself, each
path measured in turn every round. With `--tls` the same downloads go over HTTPS too: the proxy
terminating TLS, nginx with `ssl` on its listener, and the registry serving TLS itself (the Go
baseline, on the same storage). Manifest GETs at bcrypt cost 10 with wrk, plain HTTP only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import client
from bench.client import BenchError, MiB
from bench.services import Nginx, Proxy
from tests.support.harness import Registry, htpasswd, http_status
from tests.support.polling import wait_until

REPO = "bench/image"
TAG = "latest"
USER, PASSWORD, COST = "bench10", "bench-ten-secret", 10
MB = 1_000_000


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class TLSRegistry(Registry):
    """The registry serving HTTPS itself from another registry's storage."""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@dataclass
class Route:
    """One way to the blob: a name, a base URL and the processes that serve it."""

    name: str
    server: Registry | Nginx | Proxy
    tls: bool = False
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def pids(self) -> list[int]:
        """The processes whose memory counts per worker: nginx's and the proxy's workers."""
        if isinstance(self.server, Proxy):
            return self.server.worker_pids() or [self.server.pid]
        if isinstance(self.server, Nginx):
            return self.server.worker_pids()
        assert self.server.process is not None
        return [self.server.process.pid]

    def record(self, metric: str, value: float) -> None:
        self.samples.setdefault(metric, []).append(value)

    def figure(self, metric: str) -> float | None:
        values = self.samples.get(metric)
        if not values:
            return None
        return float(max(values) if metric.startswith("rss") else statistics.median(values))


class Scaling:
    def __init__(self, workdir: Path, blob_size: int, rounds: int, workers: str, tls: bool):
        self.workdir = workdir
        self.blob_size = blob_size
        self.rounds = rounds
        self.workers = workers
        self.tls = tls
        self.htpasswd = workdir / "htpasswd"
        self.registry = Registry(workdir / "registry", quiet=True)
        self.paths: list[Route] = []
        self.servers: list[Registry | Nginx | Proxy] = [self.registry]
        self.digest = ""

    def _start(self, path: Route) -> Route:
        if path.server not in self.servers:
            self.servers.append(path.server)
            path.server.start()
        if isinstance(path.server, Proxy):
            admin = f"http://127.0.0.1:{path.server.admin_port}/readyz"
            wait_until(lambda: http_status(admin) == 200, f"{path.name} to be ready", 60)
        self.paths.append(path)
        return path

    def start(self) -> None:
        htpasswd(self.htpasswd, "-B", "-C", str(COST), user=USER, password=PASSWORD)
        self.registry.start()
        blob = self.workdir / "blob.bin"
        self.digest = client.make_blob(blob, self.blob_size)
        client.upload_monolithic(self.registry.url, REPO, {}, blob, self.digest, self.blob_size)
        client.push_manifest(self.registry.url, REPO, TAG, {}, self.digest, self.blob_size)
        blob.unlink()
        registry_port, root = self.registry.port, self.workdir
        self._start(Route("direct", self.registry))
        self._start(Route("nginx", Nginx(root / "nginx", registry_port, self.htpasswd, "auto")))
        self._start(Route("nginx-1", Nginx(root / "nginx1", registry_port, self.htpasswd, 1)))
        for workers in ("1", self.workers):
            env = {"PROXY_WORKERS": workers, "PROXY_ACCESS_LOG": "off"}
            proxy = Proxy(root / f"proxy{workers}", self.registry.url, self.htpasswd, env=env)
            self._start(Route(f"proxy-{workers}", proxy))
        if self.tls:
            self._start_tls()

    def _start_tls(self) -> None:
        import trustme

        ca = trustme.CA()
        certs = self.workdir / "certs"
        certs.mkdir()
        issued = ca.issue_cert("127.0.0.1", "localhost")
        cert, key, bundle = certs / "cert.pem", certs / "key.pem", certs / "ca.pem"
        issued.private_key_pem.write_to_path(str(key))
        for index, pem in enumerate(issued.cert_chain_pems):
            pem.write_to_path(str(cert), append=index > 0)
        ca.cert_pem.write_to_path(str(bundle))
        # curl and urllib (the readiness polls) trust the run's CA; wrk does not check.
        os.environ["CURL_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = str(bundle)
        root, registry_port = self.workdir, self.registry.port
        registry = TLSRegistry(
            root / "registry-tls",
            quiet=True,
            env={
                "REGISTRY_HTTP_TLS_CERTIFICATE": str(cert),
                "REGISTRY_HTTP_TLS_KEY": str(key),
                "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(self.registry.root / "data"),
            },
        )
        self._start(Route("direct", registry, tls=True))
        nginx = Nginx(root / "nginx-tls", registry_port, self.htpasswd, "auto", tls=(cert, key))
        self._start(Route("nginx", nginx, tls=True))
        for workers in ("1", self.workers):
            env = {"PROXY_WORKERS": workers, "PROXY_ACCESS_LOG": "off",
                   "PROXY_TLS_CERT": str(cert), "PROXY_TLS_KEY": str(key)}  # fmt: skip
            proxy = Proxy(root / f"proxy-tls{workers}", self.registry.url, self.htpasswd, env=env)
            self._start(Route(f"proxy-{workers}", proxy, tls=True))

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def run(self) -> None:
        headers = {"Authorization": client.basic(USER, PASSWORD)}
        for index in range(self.rounds):
            shift = index % len(self.paths)
            for path in self.paths[shift:] + self.paths[:shift]:
                self._downloads(path, headers, index)
        for path in self.paths:
            if not path.tls and path.name != "direct":
                self._manifests(path, headers)

    def _downloads(self, path: Route, headers: dict[str, str], index: int) -> None:
        url = f"{path.url}/v2/{REPO}/blobs/{self.digest}"
        scheme = "https" if path.tls else "http"
        seconds = client.download(url, headers, self.blob_size, 1)
        rate = self.blob_size / MB / seconds
        path.record("get1", rate)
        pids = path.pids()
        for pid in pids:
            client.reset_peak(pid)
        # CPU of every process on the path (the proxy's supervisor and nginx's master too).
        counted = self._all_pids(path)
        cpu_before = [client.cpu_seconds(pid) for pid in counted]
        seconds = client.download(url, headers, self.blob_size, 8)
        cpu = [client.cpu_seconds(pid) - b for pid, b in zip(counted, cpu_before, strict=True)]
        rate8 = 8 * self.blob_size / MB / seconds
        path.record("get8", rate8)
        path.record("cpu_per_gib", sum(cpu) / (8 * self.blob_size / (1 << 30)))
        rss = max(client.status_kib(pid, "VmHWM") for pid in pids) * 1024 / MB
        path.record("rss_worker", rss)
        log(
            f"round {index + 1} {scheme} {path.name}: 1 stream {rate:,.0f} MB/s, 8 streams "
            f"{rate8:,.0f} MB/s, peak RSS per process {rss:.1f} MB ({len(pids)} processes), "
            f"CPU s by process {' + '.join(f'{c:.1f}' for c in cpu)}"
        )

    def _all_pids(self, path: Route) -> list[int]:
        server = path.server
        if isinstance(server, Proxy | Nginx):
            assert server.process is not None
            return [server.process.pid, *server.worker_pids()]
        return path.pids()

    def _manifests(self, path: Route, headers: dict[str, str]) -> None:
        url = f"{path.url}/v2/{REPO}/manifests/{TAG}"
        client.expect(
            client.call("GET", url, {**headers, "Accept": client.OCI_MANIFEST}), 200, path.name
        )
        summary = client.run_wrk(
            url,
            authorization=headers["Authorization"],
            accept=client.OCI_MANIFEST,
            connections=32,
            threads=1,
            seconds=8,
        )
        errors: dict[str, int] = summary["errors"]  # type: ignore[assignment]
        requests = int(summary["requests"])  # type: ignore[call-overload]
        if requests == 0 or errors["status"]:
            raise BenchError(f"wrk via {path.name}: {summary}")
        rps = requests / (float(summary["duration_us"]) / 1e6)  # type: ignore[arg-type]
        path.record("rps10", rps)
        log(f"manifest GET bcrypt 10, {path.name}: {rps:,.1f} req/s")

    def figure(self, name: str, metric: str, tls: bool = False) -> float | None:
        for path in self.paths:
            if path.name == name and path.tls == tls:
                return path.figure(metric)
        return None

    def targets(self) -> list[dict[str, Any]]:
        n = f"proxy-{self.workers}"

        def ratio(what: str, a: float | None, b: float | None, at_least: float) -> dict[str, Any]:
            value = a / b if a is not None and b else None
            met = value is not None and value >= at_least
            return {"target": f"{what} >= {at_least}x", "value": value, "met": met}

        f = self.figure
        rows = [
            ratio(f"8-stream GET, {n} vs proxy-1", f(n, "get8"), f("proxy-1", "get8"), 1.25),
            ratio(f"8-stream GET, {n} vs nginx (auto)", f(n, "get8"), f("nginx", "get8"), 1.5),
            ratio(f"1-stream GET, {n} vs proxy-1", f(n, "get1"), f("proxy-1", "get1"), 0.95),
            ratio(
                f"manifest GET bcrypt 10, {n} vs nginx (auto)",
                f(n, "rps10"),
                f("nginx", "rps10"),
                20,
            ),
        ]
        if self.tls:
            rows.append(
                ratio(
                    f"TLS 8-stream GET, {n} vs nginx (auto)",
                    f(n, "get8", True),
                    f("nginx", "get8", True),
                    1.2,
                )
            )
        rss = [f(n, "rss_worker", tls) for tls in ([False, True] if self.tls else [False])]
        worst = max((r for r in rss if r is not None), default=None)
        rows.append({"target": "peak RSS per worker, 8 concurrent GETs <= 60 MB", "value": worst,
                     "met": worst is not None and worst <= 60})  # fmt: skip
        return rows

    def table(self) -> str:
        metrics = [
            ("get1", "GET 1 stream, MB/s"),
            ("get8", "GET 8 streams, MB/s"),
            ("rss_worker", "peak RSS per process, MB"),
            ("cpu_per_gib", "CPU s per GiB, 8 streams"),
            ("rps10", "manifest req/s, bcrypt 10"),
        ]
        lines = [f"{'path':<16}" + "".join(f"{label:>28}" for _, label in metrics)]
        for path in self.paths:
            name = ("https " if path.tls else "http  ") + path.name
            cells = []
            for metric, _ in metrics:
                value = path.figure(metric)
                cells.append(f"{'-' if value is None else f'{value:,.1f}':>28}")
            lines.append(f"{name:<16}" + "".join(cells))
        return "\n".join(lines)


def run(args: argparse.Namespace, settings: Any) -> int:
    """The scaling comparison; prints the table and the targets, writes bench/out/scaling.json."""
    workers = args.workers or "auto"
    if workers == "auto":
        workers = str(len(os.sched_getaffinity(0)))
    rounds = args.rounds or (1 if args.small else 2)
    blob_size = int(settings.blob_size)
    workdir = Path(tempfile.mkdtemp(prefix="registry-proxy-scaling-"))
    scaling = Scaling(workdir, blob_size, rounds, workers, args.tls)
    started = datetime.now(UTC)
    try:
        scaling.start()
        nginx = next(p for p in scaling.paths if p.name == "nginx")
        assert isinstance(nginx.server, Nginx)
        log(f"nginx worker_processes auto: {len(nginx.server.worker_pids())} workers; "
            f"{len(os.sched_getaffinity(0))} CPUs")  # fmt: skip
        scaling.run()
    except Exception as exc:
        print(f"bench: FAILED: {exc}\n(logs in {workdir})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        scaling.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    targets = scaling.targets()
    print(f"{len(os.sched_getaffinity(0))} CPUs, {blob_size // MiB} MiB blob, {rounds} rounds; "
          "medians (peak RSS: maximum)")  # fmt: skip
    print(scaling.table())
    print()
    for target in targets:
        value = "-" if target["value"] is None else f"{target['value']:.2f}"
        print(f"[{'met' if target['met'] else 'MISSED':>6}] {target['target']}: {value}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": len(os.sched_getaffinity(0)),
        "blob_bytes": blob_size,
        "rounds": rounds,
        "paths": [{"name": p.name, "tls": p.tls, "samples": p.samples} for p in scaling.paths],
        "targets": targets,
    }
    (out / "scaling.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0
