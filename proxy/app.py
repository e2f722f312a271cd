"""The aiohttp applications: public routes (authenticate, then forward), admin routes, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import catalog, errors, reading
from proxy.access import AccessPolicy, authorize
from proxy.auth import CredentialChecker, Outcome, parse_basic
from proxy.config import Config
from proxy.connection import drop_server_banner
from proxy.exchange import EXCHANGE_KEY, REQUEST_ID_HEADER, Exchange, exchange_of
from proxy.forward import Forwarder, create_session
from proxy.hashpool import Busy
from proxy.log import escape
from proxy.metrics import Metrics
from proxy.pacing import RefusalPacer
from proxy.paths import Action
from proxy.pool import UpstreamSlots
from proxy.refusal import Refusal
from proxy.reload import CredentialReloader
from proxy.throttle import Throttle, Throttled, client_key

log = logging.getLogger("registry_proxy")

_API_PREFIX = "/v2/"
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Seconds a client whose checks fill its share of the hashing pool is told to wait.
_BUSY_RETRY_AFTER = 1.0
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
PACER = web.AppKey("pacer", RefusalPacer)
ACCESS = web.AppKey("access", AccessControl)
RELOADER = web.AppKey("reloader", CredentialReloader)
FORWARDER = web.AppKey("forwarder", Forwarder)
SESSION = web.AppKey("session", aiohttp.ClientSession)


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
    if checker.is_cached(user, password):
        # Credentials that just worked pass without a hash, even while their name is throttled.
        await checker.check(user, password)
        exchange.auth_outcome, exchange.user = "cached", user
        return
    try:
        # The failure is reserved before the hash runs: parallel guesses cannot overtake it.
        admission = throttle.admit(exchange.client, user)
    except Throttled as refusal:
        await _pace_refusal(request, exchange)
        exchange.auth_outcome, exchange.retry_after = "throttled", refusal.retry_after
        return

    def settle(outcome: Outcome) -> None:
        (admission.succeeded if outcome.ok else admission.failed)()

    try:
        outcome = await checker.check(user, password, client_key(exchange.client), settle)
    except Busy:
        admission.release()
        await _pace_refusal(request, exchange)
        exchange.auth_outcome, exchange.retry_after = "throttled", _BUSY_RETRY_AFTER
        return
    finally:
        # A check abandoned half-way (a cancelled handler) counts as a failure.
        admission.failed()
    exchange.auth_outcome = _OUTCOME_LABELS[outcome]
    if outcome.ok:
        exchange.user = user


async def _pace_refusal(request: web.Request, exchange: Exchange) -> None:
    """Hold a 429 for an address that keeps resending without waiting (see proxy/pacing.py)."""
    delay = request.app[PACER].delay_for(client_key(exchange.client))
    if delay:
        await asyncio.sleep(delay)


async def _gate(request: web.Request, exchange: Exchange) -> web.Response | None:
    """The refusal of a request that must not go upstream, or None to let it pass."""
    refusal = await _refusal(request, exchange)
    if refusal is not None and (request.body_exists or refusal.status == 400):
        # Never forward, and not keep, a connection carrying an upload we refuse, or bytes we
        # could not read as the registry would (RFC 9112 §6.1 for HTTP/1.0 framing).
        refusal.force_close()
    return refusal


async def _refusal(request: web.Request, exchange: Exchange) -> web.Response | None:
    """Everything that may refuse a request, in order."""
    problem = reading.request_problem(request)
    if problem is not None:
        log.info("refused %s: %s", escape(request.method), problem)
        exchange.refusal, exchange.refusal_detail = Refusal.BAD_REQUEST, problem
        return errors.bad_request(problem)
    if exchange.malformed_hop is not None:
        # Whoever it is cannot be told: no throttle key, no password check, nothing forwarded.
        log.info("refused: malformed X-Forwarded-For hop %s", escape(exchange.malformed_hop[:100]))
        exchange.refusal = Refusal.BAD_REQUEST
        exchange.refusal_detail = "malformed X-Forwarded-For hop"
        return errors.malformed_forwarding()
    user = await authenticated_user(request)
    if user is None:
        if exchange.auth_outcome == "throttled":
            exchange.refusal = Refusal.THROTTLED
            return errors.too_many_failures(exchange.retry_after)
        no_credentials = exchange.auth_outcome == "no_credentials"
        exchange.refusal = Refusal.NO_CREDENTIALS if no_credentials else Refusal.BAD_CREDENTIALS
        return errors.unauthorized(request.app[CONFIG].realm)
    if not is_api_path(request.raw_path):
        exchange.refusal = Refusal.NOT_API
        return errors.not_found()
    access = request.app[ACCESS]
    if access.read_only and request.method in _WRITES:
        exchange.refusal = Refusal.READ_ONLY
        return errors.read_only()
    problem = reading.body_problem(request)
    if problem is not None:
        log.info("refused %s from %s: %s", request.method, escape(user), problem)
        exchange.refusal, exchange.refusal_detail = Refusal.BAD_REQUEST, problem
        return errors.bad_request(problem)
    decision = authorize(
        access.policy,
        user,
        request.method,
        exchange.target,
        request.raw_path.partition("?")[2],
    )
    if not decision.allowed:
        exchange.refusal, exchange.refusal_detail = Refusal.DENIED, decision.reason
        log.info(
            "denied %s %s to %s: %s",
            request.method,
            escape(request.raw_path.partition("?")[0]),
            escape(user),
            escape(decision.reason),
        )
        return errors.denied(decision.reason)
    restricted_catalog = exchange.target.action is Action.CATALOG and not access.policy.unrestricted
    if restricted_catalog and request.method != "GET":
        # Filtering answers GET only; never send the registry another method than the client's.
        exchange.refusal = Refusal.METHOD_NOT_ALLOWED
        return errors.method_not_allowed("GET")
    exchange.upstream_query = decision.query
    return None


async def _expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Check credentials and rights before `100 Continue`: a refused upload is never sent."""
    refusal = await _gate(request, _exchange(request))
    if refusal is not None:
        return refusal
    if request.headers.get("Expect", "").lower() != "100-continue":
        _exchange(request).refusal = Refusal.BAD_EXPECT
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
    # Decoded first, as Go does before gorilla/mux cleans the path: `a%2F..%2Fb` hides a `..`.
    path = unquote(raw_path.partition("?")[0])
    return not any(segment in (".", "..") for segment in path.split("/"))


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
        forwarder = request.app[FORWARDER]
        policy = request.app[ACCESS].policy
        if exchange.target.action is Action.CATALOG and not policy.unrestricted:
            return await catalog.filtered(forwarder, request, exchange, policy)
        return await forwarder(request, exchange, exchange.upstream_query)
    finally:
        in_flight.dec()
        state.leave()


async def _send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer names its request id, so that a user's report finds the log line."""
    exchange = request.get(EXCHANGE_KEY)
    # None: aiohttp answered before the handler ran (the access log calls that bad_request).
    if isinstance(exchange, Exchange):
        response.headers[REQUEST_ID_HEADER] = exchange.request_id


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    session = create_session(
        connections=config.upstream_connections,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
    )
    app[SESSION] = session
    # Waiting for a pool slot is bounded like aiohttp's own wait for a connection.
    slots = UpstreamSlots(
        config.upstream_connections, config.upstream_connections_per_user, config.connect_timeout
    )
    app[FORWARDER] = Forwarder(
        session, config.upstream, app[METRICS], config.body_timeout, slots=slots
    )
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


@web.middleware
async def _unrouted(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A target no route takes (asterisk-form `OPTIONS *`) meets the gate too, not aiohttp's 404."""
    if request.match_info.http_exception is not None:
        return await handle(request)
    return await handler(request)


def create_app(config: Config, users: Mapping[str, str]) -> web.Application:
    """The public application."""
    app = web.Application(
        handler_args={
            # Digests are over the bytes as sent: never inflate request bodies.
            "auto_decompress": False,
            # Room for Basic credentials with passwords of up to 8 KiB.
            "max_field_size": 16384,
            # After answering a request whose body we did not read (a 401 upload, a stalled
            # client), read and drop the rest for at most this long and at most
            # connection.DISCARD_LIMIT bytes, so the client sees the answer instead of a reset,
            # then close.
            "lingering_time": 2.0,
        },
        middlewares=[_unrouted],
    )
    metrics = Metrics()
    checker = CredentialChecker(
        users,
        cache_ttl=config.auth_cache_ttl,
        cache_size=config.auth_cache_size,
        workers=config.auth_workers,
        on_hash=metrics.password_checks.observe,
        max_pending_per_client=config.auth_max_pending_per_client,
    )
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STATE] = ProxyState()
    app[CHECKER] = checker
    app[THROTTLE] = Throttle(
        config.auth_max_failures,
        config.auth_failure_window,
        config.auth_block,
        max_failures_per_user=config.auth_max_failures_per_user,
        known_client_ttl=config.auth_known_client_ttl,
    )
    app[PACER] = RefusalPacer()
    app[ACCESS] = AccessControl(config.access, config.read_only)
    app[RELOADER] = CredentialReloader(config.htpasswd, checker, metrics)
    app.cleanup_ctx.extend([_upstream_session, _background_tasks])
    app.on_response_prepare.extend([_send_request_id, drop_server_banner])
    # `.` skips a decoded newline (`/v2/%0a`): aiohttp would answer such paths itself, unchecked.
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle, expect_handler=_expect_handler)
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
        session = proxy_app.get(SESSION)
        metrics.observe_pool(session.connector if session is not None else None)
        body = await asyncio.to_thread(metrics.exposition)
        return web.Response(
            body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    app = web.Application()
    app.on_response_prepare.append(drop_server_banner)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app
