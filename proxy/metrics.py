"""Prometheus metrics, one registry per application; label values come from small fixed sets."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Mapping

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
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.edge.proxy_protocol import REJECT_REASONS
from proxy.identity import AuthOutcome
from proxy.refusal import Refusal

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

AUTH_OUTCOMES = tuple(outcome.value for outcome in AuthOutcome)
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "5xx")
RELOAD_RESULTS = ("success", "failure")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Every status the proxy sends itself, and those the registry (and Go's net/http under it) sends.
CODES = frozenset(
    {200, 201, 202, 204, 206, 304, 307, 400, 401, 403, 404, 405, 408, 412, 413, 416, 417, 429,
     431, 500, 501, 502, 503, 504}
)  # fmt: skip
OTHER_CODE = "other"


def method_label(method: str) -> str:
    """The method, or OTHER: clients choose methods, labels must stay bounded."""
    return method if method in METHODS else "OTHER"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def code_label(status: int) -> str:
    """The exact status when it is one the proxy or the registry sends, else `other`."""
    return str(status) if status in CODES else OTHER_CODE


class CertificateExpiry(Collector):
    """The served certificate's notAfter, read at each scrape; nothing without TLS."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.source: Callable[[], float] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            self._name, "Unix time the certificate served on `listen` expires (notAfter)."
        )
        if self.source is not None:
            family.add_metric([], self.source())
        yield family


class TokenExpiry(Collector):
    """Each unrevoked access token's expiry, read at each scrape: a revoked one disappears."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.source: Callable[[], Mapping[str, float]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            self._name,
            "Unix time each access token in the tokens file expires (revoked ones left out).",
            labels=["token"],
        )
        if self.source is not None:
            for name, expires in sorted(self.source().items()):
                family.add_metric([name], expires)
        yield family


class Metrics:
    """Every metric the proxy exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by method, action, status class and status code.",
            ["method", "action", "status_class", "code"],
            registry=r,
        )
        self.refusals = Counter(
            f"{PREFIX}_refusals",
            "Requests the proxy refused itself (never forwarded), by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_time_to_headers = Histogram(
            f"{PREFIX}_upstream_time_to_headers_seconds",
            "Time from sending a request upstream to the upstream's response headers, by action.",
            ["action"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_connections_in_use = Gauge(
            f"{PREFIX}_upstream_connections_in_use",
            "Upstream connections carrying a request (blob fast path included) at the last scrape.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.upstream_connections_limit = Gauge(
            f"{PREFIX}_upstream_connections_limit",
            "The most upstream connections the pool opens (upstream_connections).",
            multiprocess_mode="livesum",
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
        self.token_expiry = TokenExpiry(f"{PREFIX}_token_expiry_timestamp_seconds")
        r.register(self.token_expiry)
        self.token_refusals = Counter(
            f"{PREFIX}_token_refusals",
            "Logins with an access token's right secret refused because it expired or was revoked.",
            ["token", "reason"],
            registry=r,
        )
        self.token_reloads = Counter(
            f"{PREFIX}_token_reloads",
            "Tokens file reloads by result; a failure keeps the last good table.",
            ["result"],
            registry=r,
        )
        self.config_reloads = Counter(
            f"{PREFIX}_config_reloads",
            "Configuration file reloads on SIGHUP by result; a failure keeps the rules in force.",
            ["result"],
            registry=r,
        )
        self.tls_reloads = Counter(
            f"{PREFIX}_tls_reloads",
            "Certificate reloads by result; a failure keeps the certificate in use.",
            ["result"],
            registry=r,
        )
        self.certificate_expiry = CertificateExpiry(
            f"{PREFIX}_tls_certificate_expiry_timestamp_seconds"
        )
        r.register(self.certificate_expiry)
        self.read_only = Gauge(
            f"{PREFIX}_read_only",
            "1 while read_only is on (every write refused with 405), else 0; follows SIGHUP.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.auth_backend_up = Gauge(
            f"{PREFIX}_auth_backend_up",
            "1 while an authentication backend answers (the LDAP directory), 0 while it does not.",
            ["backend"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.upstream_up = Gauge(
            f"{PREFIX}_upstream_up",
            "1 when the upstream answered its last /v2/ probe, else 0.",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.throttle_store_up = Gauge(
            f"{PREFIX}_throttle_store_up",
            "1 while the shared store the throttle counts in answers (store: redis for "
            "shared_state, host for the workers' supervisor), 0 while counting locally instead.",
            ["store"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.throttle_store_failures = Counter(
            f"{PREFIX}_throttle_store_failures",
            "Times a shared throttle store stopped answering and the throttle fell back.",
            ["store"],
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
        self.client_connections_refused = Counter(
            f"{PREFIX}_client_connections_refused",
            "Client connections answered 503 at once because their address (IPv6: /64) "
            "held max_connections_per_client.",
            registry=r,
        )
        self.upstream_pool_timeouts = Counter(
            f"{PREFIX}_upstream_pool_timeouts",
            "Requests answered 503 (proxy busy) because no upstream connection slot freed "
            "for their user within connect_timeout.",
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
            self.config_reloads.labels(result)
            self.token_reloads.labels(result)
            self.tls_reloads.labels(result)
        for reason in REJECT_REASONS:
            self.proxy_protocol_rejected.labels(reason)
        for reason in Refusal:
            self.refusals.labels(reason)

    def store_state(self, store: str, up: bool) -> None:
        """A shared throttle store started or stopped answering."""
        self.throttle_store_up.labels(store).set(1 if up else 0)
        if not up:
            self.throttle_store_failures.labels(store).inc()

    def observe_pool(self, in_use: int, limit: int) -> None:
        """Record the upstream slots taken (proxy/relay/slots.py) and how many there are."""
        self.upstream_connections_in_use.set(in_use)
        self.upstream_connections_limit.set(limit)

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
