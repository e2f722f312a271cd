"""Prometheus metrics, one registry per application; label values come from small fixed sets."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator

import aiohttp
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.proxy_protocol import REJECT_REASONS

PREFIX = "registry_proxy"

# Request durations span cached manifest GETs (~1 ms) to multi-GB blob transfers.
_DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
)
_HASH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

AUTH_OUTCOMES = ("success", "cached", "bad_credentials", "no_credentials", "throttled")
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "5xx")
RELOAD_RESULTS = ("success", "failure")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The method, or OTHER: clients choose methods, labels must stay bounded."""
    return method if method in METHODS else "OTHER"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    """Every metric the proxy exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by method, action and status class.",
            ["method", "action", "status_class"],
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request headers to the last response byte, by action.",
            ["action"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.received_bytes = Counter(
            f"{PREFIX}_received_bytes",
            "Request body bytes received from clients, by action.",
            ["action"],
            registry=r,
        )
        self.sent_bytes = Counter(
            f"{PREFIX}_sent_bytes",
            "Response bytes (headers and body) sent to clients, by action.",
            ["action"],
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Requests being handled (transfers in progress included), by action.",
            ["action"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.auth = Counter(
            f"{PREFIX}_auth",
            "Authentication outcomes.",
            ["outcome"],
            registry=r,
        )
        self.password_checks = Histogram(
            f"{PREFIX}_password_check_duration_seconds",
            "Password hash computations (bcrypt, apr1, SHA) and their duration.",
            buckets=_HASH_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Upstream failures: connect, timeout, reset (mid-body or before headers), 5xx answers.",
            ["kind"],
            registry=r,
        )
        self.users = Gauge(
            f"{PREFIX}_users",
            "Users in the credential table in use.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.reloads = Counter(
            f"{PREFIX}_htpasswd_reloads",
            "htpasswd reloads by result; a failure keeps the last good table.",
            ["result"],
            registry=r,
        )
        self.last_reload = Gauge(
            f"{PREFIX}_htpasswd_last_success_timestamp_seconds",
            "Unix time the credential table in use was loaded.",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.upstream_up = Gauge(
            f"{PREFIX}_upstream_up",
            "1 when the upstream answered its last /v2/ probe, else 0.",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.connections_refused = Counter(
            f"{PREFIX}_connections_refused",
            "Client connections answered 503 at once because max_connections were open.",
            registry=r,
        )
        self.proxy_protocol_rejected = Counter(
            f"{PREFIX}_proxy_protocol_rejected",
            "Connections closed unanswered for lack of a valid PROXY header from a trusted peer.",
            ["reason"],
            registry=r,
        )
        self.tasks = Gauge(
            f"{PREFIX}_event_loop_tasks",
            "asyncio tasks alive at the last scrape (leak detector).",
            multiprocess_mode="livesum",
            registry=r,
        )
        # process_open_fds, process_resident_memory_bytes, process_cpu_seconds_total, ...
        ProcessCollector(registry=r)
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "Version information; always 1.",
            ["version", "python", "aiohttp"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version(), aiohttp.__version__).set(1)
        # Pre-create the fixed label sets so rates start at zero instead of appearing late.
        for outcome in AUTH_OUTCOMES:
            self.auth.labels(outcome)
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(kind)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        for reason in REJECT_REASONS:
            self.proxy_protocol_rejected.labels(reason)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


class ProcessesCollector(Collector):
    """The standard `process_*` metrics summed over processes (the workers and their parent);
    the start time is the oldest, the fd limit the lowest."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self._pids():
            for family in ProcessCollector(registry=None, pid=_constant(pid)).collect():
                if family.name not in merged:
                    merged[family.name] = family
                    continue
                kept, (sample,) = merged[family.name], family.samples
                pick = min if family.name in _LOWEST else sum
                value = pick((kept.samples[0].value, sample.value))
                kept.samples[0] = kept.samples[0]._replace(value=value)
        yield from merged.values()


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


_LOWEST = frozenset({"process_start_time_seconds", "process_max_fds"})


def multiprocess_exposition(directory: str, *collectors: Collector) -> bytes:
    """Every worker's metrics summed (prometheus_client multiprocess mode, see proxy/workers.py).

    Counters and histograms add up, dead workers' counts included; each gauge is combined by
    its `multiprocess_mode`, `live*` modes over the workers alive.
    """
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)
