"""Client side of the benchmark: registry API calls, curl transfers, wrk, a lean HEAD timer,
aborted downloads, and /proc readings of a server's memory."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urljoin, urlsplit

from bench.services import BENCH_DIR

CURL = shutil.which("curl") or "/usr/bin/curl"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
WRK_SCRIPT = BENCH_DIR / "wrk.lua"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MiB = 1 << 20


class BenchError(RuntimeError):
    """A request in the benchmark did not do what it must: the harness, not speed, is broken."""


def basic(user: str, password: str) -> str:
    """The Authorization header value for HTTP Basic."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_blob(path: Path, size: int) -> str:
    """Write `size` random bytes to `path` a MiB at a time; return their digest."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, MiB))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def call(
    method: str, url: str, headers: Mapping[str, str] | None = None, body: bytes = b""
) -> Reply:
    """One small request on a fresh connection."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        all_headers = dict(headers or {})
        if method in ("POST", "PUT", "PATCH"):
            all_headers.setdefault("Content-Length", str(len(body)))
        conn.request(method, target, body=body or None, headers=all_headers)
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def expect(reply: Reply, status: int, what: str) -> Reply:
    if reply.status != status:
        raise BenchError(f"{what}: expected {status}, got {reply.status}: {reply.body[:300]!r}")
    return reply


def start_upload(base: str, repo: str, headers: Mapping[str, str]) -> str:
    """Open an upload session; return the absolute URL to send data to."""
    reply = expect(
        call("POST", f"{base}/v2/{repo}/blobs/uploads/", headers), 202, "starting an upload"
    )
    location = reply.headers.get("Location")
    if not location:
        raise BenchError("upload session without a Location")
    return urljoin(base + "/", location)


def with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + "digest=" + quote(digest, safe="")


def push_bytes(base: str, repo: str, headers: Mapping[str, str], data: bytes) -> str:
    """Upload a small blob monolithically; return its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = start_upload(base, repo, headers)
    put_headers = {**headers, "Content-Type": "application/octet-stream"}
    expect(call("PUT", with_digest(location, digest), put_headers, data), 201, "pushing a blob")
    return digest


def push_manifest(
    base: str, repo: str, tag: str, headers: Mapping[str, str], layer: str, layer_size: int
) -> bytes:
    """Push an OCI image manifest whose one layer is the big blob; return the manifest."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [layer]},
        }
    ).encode()
    config_digest = push_bytes(base, repo, headers, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer, "size": layer_size}],
        }
    ).encode()
    expect(
        call(
            "PUT",
            f"{base}/v2/{repo}/manifests/{tag}",
            {**headers, "Content-Type": OCI_MANIFEST},
            manifest,
        ),
        201,
        "pushing the manifest",
    )
    return manifest


# --- curl transfers ------------------------------------------------------------------------

_WRITE_OUT = "%{http_code} %{size_download} %{size_upload} %{time_total}\\n"


@dataclass
class CurlResult:
    status: int
    downloaded: int
    uploaded: int
    seconds: float
    headers: str = ""


def _curl_args(url: str, headers: Mapping[str, str]) -> list[str]:
    args = [CURL, "--silent", "--show-error", "--http1.1", "--write-out", _WRITE_OUT]
    for name, value in headers.items():
        args += ["--header", f"{name}: {value}"]
    return [*args, url]


def _parse_curl(proc: subprocess.CompletedProcess[str], what: str) -> CurlResult:
    if proc.returncode != 0:
        raise BenchError(f"{what}: curl exited {proc.returncode}: {proc.stderr.strip()}")
    fields = proc.stdout.strip().splitlines()[-1].split()
    return CurlResult(int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3]))


def download(url: str, headers: Mapping[str, str], size: int, streams: int) -> float:
    """GET `url` on `streams` concurrent curl processes into /dev/null; return the seconds
    from the first start to the last finish (for one stream, curl's own total time)."""
    args = [*_curl_args(url, headers), "--output", "/dev/null"]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(streams)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        results.append(
            _parse_curl(subprocess.CompletedProcess(args, proc.returncode, out, err), "GET blob")
        )
    elapsed = time.perf_counter() - start
    for result in results:
        if result.status != 200 or result.downloaded != size:
            raise BenchError(
                f"GET blob: status {result.status}, {result.downloaded} of {size} bytes"
            )
    return results[0].seconds if streams == 1 else elapsed


def _curl_upload(
    method: str, url: str, headers: Mapping[str, str], path: Path, chunked: bool
) -> tuple[CurlResult, str]:
    """Send the file at `path` as the body; return curl's figures and the reply's Location."""
    sent = {**headers, "Content-Type": "application/octet-stream"}
    if chunked:
        sent["Transfer-Encoding"] = "chunked"
    args = _curl_args(url, sent)[:-1]
    # Docker's client sends no `Expect: 100-continue`; `Name:` with no value stops curl's.
    args += ["--header", "Expect:", "--request", method, "--upload-file", str(path)]
    args += ["--dump-header", "-", "--output", "/dev/null", url]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    result = _parse_curl(proc, f"{method} upload")
    location = ""
    for line in proc.stdout.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() == "location":
            location = value.strip()
    return result, location


def upload_monolithic(
    base: str, repo: str, headers: Mapping[str, str], path: Path, digest: str, size: int
) -> float:
    """POST, then one PUT carrying the whole blob; return the seconds for both."""
    start = time.perf_counter()
    location = start_upload(base, repo, headers)
    result, _ = _curl_upload("PUT", with_digest(location, digest), headers, path, chunked=False)
    elapsed = time.perf_counter() - start
    if result.status != 201 or result.uploaded != size:
        raise BenchError(f"PUT upload: status {result.status}, sent {result.uploaded} of {size}")
    return elapsed


def upload_chunked(
    base: str, repo: str, headers: Mapping[str, str], path: Path, digest: str, size: int
) -> float:
    """POST, a PATCH streaming the blob with chunked encoding (as docker push does), then the
    closing PUT; return the seconds for all three."""
    start = time.perf_counter()
    location = start_upload(base, repo, headers)
    result, next_location = _curl_upload("PATCH", location, headers, path, chunked=True)
    if result.status != 202 or not next_location:
        raise BenchError(f"PATCH upload: status {result.status}, Location {next_location!r}")
    final = call("PUT", with_digest(urljoin(base + "/", next_location), digest), headers)
    elapsed = time.perf_counter() - start
    expect(final, 201, "closing a chunked upload")
    if result.uploaded < size:
        raise BenchError(f"PATCH upload: sent {result.uploaded} of {size}")
    return elapsed


# --- wrk -----------------------------------------------------------------------------------


def run_wrk(
    url: str,
    *,
    authorization: str,
    accept: str,
    connections: int,
    threads: int,
    seconds: float,
) -> dict[str, object]:
    """wrk's summary (requests, duration_us, errors, latency_us percentiles) as a dict."""
    env = {**os.environ, "BENCH_AUTHORIZATION": authorization, "BENCH_ACCEPT": accept}
    args = [
        WRK,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(WRK_SCRIPT),
        url,
    ]
    proc = subprocess.run(
        args, capture_output=True, text=True, env=env, check=False, timeout=seconds + 90
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            summary: dict[str, object] = json.loads(line.removeprefix("BENCH_JSON "))
            return summary
    raise BenchError(
        f"wrk printed no summary (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
    )


# --- one-connection HEAD latency -------------------------------------------------------------


def head_latencies(
    url: str,
    headers: Mapping[str, str],
    *,
    requests: int,
    seconds: float,
    warmup: int,
) -> list[float]:
    """Sequential HEADs on one keep-alive connection; each request's seconds, request written
    to headers read. A raw socket keeps the client's own cost small and equal for every path."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    lines = [f"HEAD {parts.path} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    latencies: list[float] = []
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = None
        for index in range(warmup + requests):
            if index == warmup:
                deadline = time.perf_counter() + seconds
            start = time.perf_counter_ns()
            sock.sendall(request)
            response = b""
            while b"\r\n\r\n" not in response:
                data = sock.recv(65536)
                if not data:
                    raise BenchError(f"HEAD {url}: connection closed after {index} requests")
                response += data
            took = time.perf_counter_ns() - start
            if not response.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                status_line = response.partition(b"\r\n")[0]
                raise BenchError(f"HEAD {url}: {status_line!r}")
            if response[-4:] != b"\r\n\r\n":
                raise BenchError(f"HEAD {url}: unexpected bytes after the headers")
            if index >= warmup:
                latencies.append(took / 1e9)
                if deadline is not None and time.perf_counter() > deadline:
                    break
    return latencies


# --- aborted downloads -------------------------------------------------------------------------


async def _one_abort(host: str, port: int, request: bytes, abort_after: int) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        received = b""
        while len(received) < abort_after:
            data = await reader.read(65536)
            if not data:
                break
            received += data
        return received.startswith(b"HTTP/1.1 200")
    finally:
        # Gone mid-body, the way a killed `docker pull` goes: unread data makes this a reset.
        writer.transport.abort()


async def _aborts(
    url: str, headers: Mapping[str, str], count: int, concurrency: int, abort_after: int
) -> int:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    lines = [f"GET {parts.path} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    gate = asyncio.Semaphore(concurrency)
    host, port = parts.hostname, parts.port

    async def gated() -> bool:
        async with gate:
            return await _one_abort(host, port, request, abort_after)

    results = await asyncio.gather(*(gated() for _ in range(count)))
    return sum(results)


def aborted_downloads(
    url: str, headers: Mapping[str, str], *, count: int, concurrency: int, abort_after: int
) -> int:
    """Start `count` GETs of a blob, `concurrency` at a time, each dropped after `abort_after`
    bytes; return how many had started with 200."""
    return asyncio.run(_aborts(url, headers, count, concurrency, abort_after))


# --- /proc readings ------------------------------------------------------------------------


def status_kib(pid: int, field_name: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field_name} for pid {pid}")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class RssSampler:
    """Samples VmRSS of some processes every `interval` seconds while in a `with` block."""

    pids: list[int]
    interval: float = 0.02
    peak_kib: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            total = sum(status_kib(pid, "VmRSS") for pid in self.pids)
        except (OSError, BenchError):
            return
        self.peak_kib = max(self.peak_kib, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
