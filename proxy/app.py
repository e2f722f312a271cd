"""The aiohttp applications: public routes (authenticate, then forward), admin routes, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from proxy import errors
from proxy.access import AccessPolicy, CatalogPage, authorize, filter_catalog_page
from proxy.auth import CredentialChecker, Outcome, parse_basic
from proxy.blob_relay import BlobRelay
from proxy.config import Config
from proxy.exchange import Exchange, exchange_of
from proxy.forward import Forwarder, create_session
from proxy.metrics import Metrics
from proxy.paths import Action
from proxy.reload import CredentialReloader
from proxy.throttle import Throttle

log = logging.getLogger("registry_proxy")

_API_PREFIX = "/v2/"
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_OUTCOME_LABELS = {
    Outcome.CACHED: "cached",
    Outcome.VERIFIED: "success",
    Outcome.REJECTED: "bad_credentials",
}


class AccessControl:
    """The access rules and read-only switch in force; SIGHUP replaces them."""

    def __init__(self, policy: AccessPolicy, read_only: bool) -> None:
        self.policy = policy
        self.read_only = read_only


class ProxyState:
    """Readiness and the count of requests in progress, for /readyz and the drain on shutdown."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self.upstream_answered = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        return self.upstream_answered and not self.draining

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in progress; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", ProxyState)
CHECKER = web.AppKey("checker", CredentialChecker)
THROTTLE = web.AppKey("throttle", Throttle)
ACCESS = web.AppKey("access", AccessControl)
RELOADER = web.AppKey("reloader", CredentialReloader)
FORWARDER = web.AppKey("forwarder", Forwarder)
SESSION = web.AppKey("session", aiohttp.ClientSession)
BLOB_RELAY = web.AppKey("blob_relay", BlobRelay)
UPSTREAM_SLOTS = web.AppKey("upstream_slots", asyncio.Semaphore)


def warn_about_unknown_users(policy: AccessPolicy, users: Mapping[str, str]) -> None:
    """Rules that name users the htpasswd file lacks are usually typos: say so once."""
    unknown = sorted(policy.named_users - set(users))
    if unknown:
        log.warning("access rules name users not in the htpasswd file: %s", ", ".join(unknown))


def _exchange(request: web.Request) -> Exchange:
    return exchange_of(request, request.app[CONFIG].trusted_proxies)


async def authenticated_user(request: web.Request) -> str | None:
    """The user whose Basic credentials this request carries, checked once per request."""
    exchange = _exchange(request)
    if exchange.auth_outcome is None:
        header = request.headers.get("Authorization")
        credentials = parse_basic(header)
        if credentials is None:
            # Malformed or absent: no password was checked, so nothing counts as a guess.
            exchange.auth_outcome = "bad_credentials" if header else "no_credentials"
        else:
            await _check_password(request, exchange, *credentials)
        request.app[METRICS].auth.labels(exchange.auth_outcome).inc()
    return exchange.user


async def _check_password(
    request: web.Request, exchange: Exchange, user: str, password: str
) -> None:
    throttle, checker = request.app[THROTTLE], request.app[CHECKER]
    blocked_for = throttle.blocked(exchange.client, user)
    # A blocked name must not lock its owner out: credentials that just worked still do.
    if blocked_for is not None and not checker.is_cached(user, password):
        exchange.auth_outcome = "throttled"
        exchange.retry_after = blocked_for
        return
    outcome = await checker.check(user, password)
    exchange.auth_outcome = _OUTCOME_LABELS[outcome]
    if outcome.ok:
        exchange.user = user
        throttle.record_success(exchange.client, user)
    else:
        throttle.record_failure(exchange.client, user)


async def _gate(request: web.Request, exchange: Exchange) -> web.Response | None:
    """The refusal of a request that must not go upstream, or None to let it pass."""
    refusal = await _refusal(request, exchange)
    if refusal is not None and request.body_exists:
        # Never forward, and not keep, a connection carrying an upload we refuse.
        refusal.force_close()
    return refusal


async def _refusal(request: web.Request, exchange: Exchange) -> web.Response | None:
    """Everything that may refuse a request, in order."""
    user = await authenticated_user(request)
    if user is None:
        if exchange.auth_outcome == "throttled":
            return errors.too_many_failures(exchange.retry_after)
        return errors.unauthorized(request.app[CONFIG].realm)
    if not is_api_path(request.raw_path):
        return errors.not_found()
    access = request.app[ACCESS]
    if access.read_only and request.method in _WRITES:
        return errors.read_only()
    decision = authorize(
        access.policy,
        user,
        request.method,
        exchange.target,
        request.raw_path.partition("?")[2],
        request.headers.get("Content-Type"),
    )
    if not decision.allowed:
        log.info(
            "denied %s %s to %s: %s", request.method, request.rel_url.path, user, decision.reason
        )
        return errors.denied(decision.reason)
    exchange.upstream_query = decision.query
    return None


async def _expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Check credentials and rights before `100 Continue`: a refused upload is never sent."""
    refusal = await _gate(request, _exchange(request))
    if refusal is not None:
        return refusal
    if request.headers.get("Expect", "").lower() != "100-continue":
        return errors.expectation_failed()
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The interim response is not part of the final response's size.
        request.writer.output_size = 0
    return None


def is_api_path(raw_path: str) -> bool:
    """True for `/v2/...` targets without dot segments (plain or percent-encoded)."""
    if not raw_path.startswith(_API_PREFIX):
        return False
    path = raw_path.partition("?")[0]
    return not any(unquote(segment) in (".", "..") for segment in path.split("/"))


async def handle(request: web.Request) -> web.StreamResponse:
    """Every request on the public listener: authenticate first, then forward or 404."""
    state = request.app[STATE]
    exchange = _exchange(request)
    in_flight = request.app[METRICS].in_flight.labels(exchange.target.action)
    state.enter()
    in_flight.inc()
    try:
        refusal = await _gate(request, exchange)
        if refusal is not None:
            return refusal
        # One upstream connection at a time per request, fast path and normal relay alike.
        async with upstream_slot(request):
            return await _forward(request, exchange)
    finally:
        in_flight.dec()
        state.leave()


async def _forward(request: web.Request, exchange: Exchange) -> web.StreamResponse:
    """The fast blob path, the filtered catalog, or the normal relay."""
    forwarder = request.app[FORWARDER]
    policy = request.app[ACCESS].policy
    if exchange.target.action is Action.CATALOG and not policy.unrestricted:
        user = exchange.user
        assert user is not None

        def visible(body: bytes, link: str | None) -> CatalogPage:
            return filter_catalog_page(body, link, user, policy)

        query = exchange.upstream_query or ""
        return await forwarder.catalog(request, exchange, query, visible)
    if _takes_fast_path(request, exchange):
        fast = await request.app[BLOB_RELAY](request, exchange, exchange.upstream_query)
        if fast is not None:
            return fast
    return await forwarder(request, exchange, exchange.upstream_query)


def _takes_fast_path(request: web.Request, exchange: Exchange) -> bool:
    """Blob GETs without a body to an http:// upstream, unless `fast_blob_relay` is off."""
    config = request.app[CONFIG]
    return (
        config.fast_blob_relay
        and exchange.target.action is Action.BLOB
        and request.method == "GET"
        and not request.body_exists
        and config.upstream.scheme == "http"
    )


def upstream_slot(request: web.Request) -> asyncio.Semaphore:
    """One of `upstream_connections`, shared by the fast path and the pool, held to the end."""
    # The one call site where a per-client upstream limiter (503 "proxy busy") hooks in.
    return request.app[UPSTREAM_SLOTS]


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    session = create_session(
        connections=config.upstream_connections,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
    )
    app[SESSION] = session
    app[FORWARDER] = Forwarder(session, config.upstream, app[METRICS], config.body_timeout)
    app[BLOB_RELAY] = BlobRelay(
        config.upstream,
        app[METRICS],
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        body_timeout=config.body_timeout,
    )
    app[UPSTREAM_SLOTS] = asyncio.Semaphore(config.upstream_connections)
    try:
        yield
    finally:
        await session.close()


async def _probe_upstream_forever(app: web.Application) -> None:
    config, state, metrics = app[CONFIG], app[STATE], app[METRICS]
    url = config.upstream.with_path(_API_PREFIX)
    timeout = aiohttp.ClientTimeout(total=config.upstream_probe_interval)
    while True:
        try:
            async with app[SESSION].get(url, timeout=timeout, allow_redirects=False) as response:
                answered = response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            answered = False
        if answered and not state.upstream_answered:
            log.info("upstream %s answers", config.upstream)
        elif state.upstream_answered and not answered:
            log.warning("upstream %s stopped answering /v2/", config.upstream)
        state.upstream_answered = answered
        metrics.upstream_up.set(1 if answered else 0)
        await asyncio.sleep(config.upstream_probe_interval)


async def _background_tasks(app: web.Application) -> AsyncIterator[None]:
    tasks = [
        asyncio.create_task(_probe_upstream_forever(app)),
        asyncio.create_task(app[RELOADER].watch()),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        app[CHECKER].close()


def create_app(config: Config, users: Mapping[str, str]) -> web.Application:
    """The public application."""
    app = web.Application(
        handler_args={
            # Digests are over the bytes as sent: never inflate request bodies.
            "auto_decompress": False,
            # Room for Basic credentials with passwords of up to 8 KiB.
            "max_field_size": 16384,
            # After answering a request whose body we did not read (a 401 upload, a stalled
            # client), read and drop the rest for at most this long, so the client sees the
            # answer instead of a reset, then close.
            "lingering_time": 2.0,
        }
    )
    metrics = Metrics()
    checker = CredentialChecker(
        users,
        cache_ttl=config.auth_cache_ttl,
        cache_size=config.auth_cache_size,
        workers=config.auth_workers,
        on_hash=metrics.password_checks.observe,
    )
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STATE] = ProxyState()
    app[CHECKER] = checker
    app[THROTTLE] = Throttle(
        config.auth_max_failures, config.auth_failure_window, config.auth_block
    )
    app[ACCESS] = AccessControl(config.access, config.read_only)
    warn_about_unknown_users(config.access, users)
    app[RELOADER] = CredentialReloader(config.htpasswd, checker, metrics)
    app.cleanup_ctx.extend([_upstream_session, _background_tasks])
    app.router.add_route("*", "/{tail:.*}", handle, expect_handler=_expect_handler)
    return app


def create_admin_app(proxy_app: web.Application) -> web.Application:
    """The admin application (metrics and probes), served on `admin_listen` only."""
    metrics, state = proxy_app[METRICS], proxy_app[STATE]

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if state.ready:
            return web.Response(text="ready\n")
        reason = "draining" if state.draining else "upstream not answering"
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def metrics_page(request: web.Request) -> web.Response:
        metrics.tasks.set(len(asyncio.all_tasks()))
        body = await asyncio.to_thread(metrics.exposition)
        return web.Response(
            body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app
