"""The aiohttp applications: public routes (authenticate, then forward), admin routes, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import admin, errors
from proxy.access import catalog
from proxy.access.rules import AccessPolicy
from proxy.access.tag_guard import TagGuard
from proxy.auth.anonymous import AnonymousAuthenticator
from proxy.auth.backend import Authenticator, Authenticators
from proxy.auth.credentials import CredentialChecker
from proxy.auth.directory import Directory, DirectoryUnavailable, read_bind_password
from proxy.auth.htpasswd import HtpasswdAuthenticator
from proxy.auth.ldap import LdapAuthenticator, LoginCache
from proxy.auth.pacing import RefusalPacer
from proxy.auth.tokens import TokenAuthenticator, TokenTable
from proxy.auth.tokens_file import load_tokens
from proxy.config import Config, lines_naming
from proxy.cors import CrossOrigin
from proxy.edge.connection import drop_server_banner
from proxy.exchange import EXCHANGE_KEY, REQUEST_ID_HEADER, Exchange, exchange_of
from proxy.gate import AccessControl, Gate
from proxy.host_share import worker_share
from proxy.identity import AuthOutcome
from proxy.log import bounded
from proxy.metrics import Metrics
from proxy.paths import Action
from proxy.refusal import Refusal
from proxy.relay.blob import BlobRelay
from proxy.relay.failure import UPSTREAM_ERRORS, abort_client, client_gone
from proxy.relay.forward import Forwarder, create_session
from proxy.relay.slots import UpstreamSlots
from proxy.reload import CredentialReloader, TokenReloader
from proxy.throttle.fallback import store_chain
from proxy.throttle.policy import Throttle
from proxy.ui.pages import BrowserUI
from proxy.ui.registry import Registry
from proxy.ui.session import SessionSigner, read_session_key
from proxy.ui.signed_in import SignedIn
from proxy.ui.templates import add_security_headers

log = logging.getLogger("registry_proxy")

_API_PREFIX = "/v2/"


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
# Only with a `tokens` file configured.
TOKEN_RELOADER = web.AppKey("token_reloader", TokenReloader)
FORWARDER = web.AppKey("forwarder", Forwarder)
SESSION = web.AppKey("session", aiohttp.ClientSession)
GATE = web.AppKey("gate", Gate)
BLOB_RELAY = web.AppKey("blob_relay", BlobRelay)
SLOTS = web.AppKey("slots", UpstreamSlots)
CROSS_ORIGIN = web.AppKey("cross_origin", CrossOrigin)
DIRECTORY_LOGINS = web.AppKey("directory_logins", LdapAuthenticator)
# Only with `ui` on.
BROWSER = web.AppKey("browser", BrowserUI)


def warn_about_unknown_users(
    policy: AccessPolicy,
    users: Mapping[str, str],
    config_path: Path | None,
    *,
    directory: bool = False,
) -> None:
    """Rules that name users the htpasswd file lacks are usually typos: say so, and where."""
    if directory:
        # With an LDAP directory, names the file lacks are directory users: nothing to tell.
        return
    for name in sorted(policy.named_users - set(users)):
        places = lines_naming(name, ("groups", "access"), config_path)
        log.warning(
            "%s: access rules name users not in the htpasswd file: %s",
            ", ".join(places) or "access",
            name,
        )


def _restricted(policy: AccessPolicy, exchange: Exchange) -> bool:
    """Whether the catalog must be filtered: rules, or a token's scope."""
    identity = exchange.identity
    return not policy.unrestricted or (identity is not None and identity.scope is not None)


def _exchange(request: web.Request) -> Exchange:
    return exchange_of(request, request.app[CONFIG].trusted_proxies)


def _failed(request: web.Request, exc: Exception) -> web.StreamResponse:
    """Log a bug that ended a request, once, with its traceback and request id; the answer."""
    if isinstance(exc, ConnectionError) and client_gone(request):
        # The client closed its connection while its answer was written: no bug, and no one
        # left to answer.
        log.debug("request %s: the client went away", _exchange(request).request_id)
        abort_client(request)
        return errors.protocol_error(500)
    log.error(
        "request %s failed: %s %s",
        _exchange(request).request_id,
        bounded(request.method, 32),
        bounded(request.raw_path.partition("?")[0], 2048),
        exc_info=exc,
    )
    # What aiohttp answers for an exception: 504 for a timeout, else 500.
    response = errors.protocol_error(504 if isinstance(exc, TimeoutError) else 500)
    response.force_close()
    if request.writer.output_size > 0 and request.transport is not None:
        # A response began: only cutting the connection tells the client it is incomplete.
        request.transport.abort()
    return response


@web.middleware
async def _log_failures(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A bug that escapes a handler is logged here, with the request id aiohttp does not know."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        return _failed(request, exc)


async def _expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Check credentials and rights before `100 Continue`: a refused upload is never sent."""
    # aiohttp runs the expect handler before any middleware.
    try:
        return await _check_before_continue(request)
    except Exception as exc:
        return _failed(request, exc)


async def _check_before_continue(request: web.Request) -> web.StreamResponse | None:
    refusal = await request.app[GATE].check(request, _exchange(request))
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


async def handle(request: web.Request) -> web.StreamResponse:
    """Every request on the public listener: authenticate first, then forward or 404."""
    state = request.app[STATE]
    exchange = _exchange(request)
    # A browser sends its preflight without credentials: answered here, never forwarded.
    preflight = request.app[CROSS_ORIGIN].preflight(request)
    if preflight is not None:
        return preflight
    in_flight = request.app[METRICS].in_flight.labels(exchange.target.action)
    state.enter()
    in_flight.inc()
    try:
        gate = request.app[GATE]
        refusal = await gate.check(request, exchange) or await gate.confirm(request, exchange)
        if refusal is not None:
            return refusal
        forwarder = request.app[FORWARDER]
        policy = request.app[ACCESS].policy
        if exchange.target.action is Action.CATALOG and _restricted(policy, exchange):
            return await catalog.filtered(forwarder, request, exchange, policy)
        fast = request.app[BLOB_RELAY] if _takes_fast_path(request, exchange) else None
        return await forwarder(request, exchange, exchange.upstream_query, fast=fast)
    finally:
        in_flight.dec()
        state.leave()


async def _send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer names its request id, so that a user's report finds the log line."""
    exchange = request.get(EXCHANGE_KEY)
    # None: aiohttp answered before the handler ran (the access log calls that bad_request).
    if isinstance(exchange, Exchange):
        response.headers[REQUEST_ID_HEADER] = exchange.request_id


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


def _throttle_stores(
    host_store: socket.socket | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The throttle counts in the store chain (Redis, the supervisor's, memory) while serving."""

    async def counting_in_the_chain(app: web.Application) -> AsyncIterator[None]:
        # Entered at start-up, not in create_app: the chain's connections and watchers belong
        # to the serving loop. Until then the throttle has its own memory store.
        shared_state, on_state = app[CONFIG].shared_state, app[METRICS].store_state
        async with store_chain(shared_state, host_store, on_state) as store:
            app[THROTTLE].store = store
            yield

    return counting_in_the_chain


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    session = create_session(
        connections=config.upstream_connections,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
    )
    app[SESSION] = session
    # Waiting for a pool slot is bounded like aiohttp's own wait for a connection. The pool is
    # each worker's own; a user's share is her part of what she may hold on the host.
    per_user = worker_share(config.upstream_connections_per_user, config.workers)
    app[SLOTS] = slots = UpstreamSlots(
        config.upstream_connections, per_user, config.connect_timeout
    )
    app[FORWARDER] = Forwarder(
        session, config.upstream, app[METRICS], config.body_timeout, slots=slots
    )
    app[GATE].tags = guard = TagGuard(session, config.upstream, config.body_timeout)
    if BROWSER in app:
        app[BROWSER].registry = Registry(session, config.upstream, app[ACCESS], guard, slots=slots)
    app[BLOB_RELAY] = blob_relay = BlobRelay(
        config.upstream,
        app[METRICS],
        slots=slots,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        body_timeout=config.body_timeout,
    )
    try:
        yield
    finally:
        blob_relay.close()
        await session.close()


def _observe_pool(app: web.Application) -> None:
    slots = app.get(SLOTS)
    if slots is not None:
        app[METRICS].observe_pool(slots.in_use, slots.total)


async def _probe_upstream_forever(app: web.Application) -> None:
    config, state, metrics = app[CONFIG], app[STATE], app[METRICS]
    url = config.upstream.with_path(_API_PREFIX)
    timeout = aiohttp.ClientTimeout(total=config.upstream_probe_interval)
    while True:
        try:
            async with app[SESSION].get(url, timeout=timeout, allow_redirects=False) as response:
                answered = response.status < 500
        except UPSTREAM_ERRORS:
            answered = False
        if answered and not state.upstream_answered:
            log.info("upstream %s answers", config.upstream)
        elif state.upstream_answered and not answered:
            log.warning("upstream %s stopped answering /v2/", config.upstream)
        state.upstream_answered = answered
        metrics.upstream_up.set(1 if answered else 0)
        # Between scrapes too: with workers the supervisor's scrape cannot ask the pools.
        _observe_pool(app)
        await asyncio.sleep(config.upstream_probe_interval)


async def _probe_directory_forever(app: web.Application, logins: LdapAuthenticator) -> None:
    """While the directory is marked down, bind as the service account until it answers again."""
    while True:
        await asyncio.sleep(app[CONFIG].upstream_probe_interval)
        if logins.reachable:
            continue
        try:
            await logins.directory.check()
        except DirectoryUnavailable:
            continue
        log.info("ldap: directory answers again")
        logins.mark_reachable(True)


async def _background_tasks(app: web.Application) -> AsyncIterator[None]:
    tasks = [
        asyncio.create_task(_probe_upstream_forever(app)),
        asyncio.create_task(app[RELOADER].watch()),
    ]
    if TOKEN_RELOADER in app:
        tasks.append(asyncio.create_task(app[TOKEN_RELOADER].watch()))
    logins = app.get(DIRECTORY_LOGINS)
    if logins is not None:
        tasks.append(asyncio.create_task(_probe_directory_forever(app, logins)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        app[CHECKER].close()
        if logins is not None:
            logins.directory.close()


@web.middleware
async def _count_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The browser's pages are requests in progress too: a drain waits for them."""
    if handler is handle or request.match_info.http_exception is not None:
        return await handler(request)
    state = request.app[STATE]
    state.enter()
    try:
        return await handler(request)
    finally:
        state.leave()


@web.middleware
async def _unrouted(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A target no route takes (asterisk-form `OPTIONS *`) meets the gate too, not aiohttp's 404."""
    if request.match_info.http_exception is not None:
        return await handle(request)
    return await handler(request)


# aiohttp's RequestHandler keywords the proxy's connections need, in production (server.py adds
# the access log and keep-alive) and under a test client alike.
HANDLER_ARGS: Mapping[str, Any] = MappingProxyType(
    {
        # Digests are over the bytes as sent: never inflate request bodies.
        "auto_decompress": False,
        # Room for Basic credentials with passwords of up to 8 KiB.
        "max_field_size": 16384,
        # After answering a request whose body we did not read (a 401 upload, a stalled
        # client), read and drop the rest for at most this long and at most
        # connection.DISCARD_LIMIT bytes, so the client sees the answer instead of a reset,
        # then close.
        "lingering_time": 2.0,
    }
)


def create_app(
    config: Config, users: Mapping[str, str], host_store: socket.socket | None = None
) -> web.Application:
    """The public application; a worker passes its supervisor's throttle store socket."""
    app = web.Application(
        handler_args=HANDLER_ARGS,
        middlewares=[_log_failures, _unrouted, _count_pages],
    )
    metrics = Metrics()
    checker = CredentialChecker(
        users,
        cache_ttl=config.auth_cache_ttl,
        cache_size=config.auth_cache_size,
        workers=config.auth_workers,
        on_hash=metrics.password_checks.observe,
        max_pending_per_client=worker_share(config.auth_max_pending_per_client, config.workers),
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
    app[PACER] = RefusalPacer(workers=config.workers)
    app[ACCESS] = access = AccessControl(config.access, config.read_only, config.immutable_tags)
    metrics.read_only.set(1 if config.read_only else 0)
    passwords = HtpasswdAuthenticator(
        checker, app[THROTTLE], app[PACER], config.realm, defer_unknown=config.ldap.enabled
    )
    table = TokenTable(load_tokens(config.tokens) if config.tokens is not None else {})

    def count_token_refusal(name: str, how: AuthOutcome) -> None:
        metrics.token_refusals.labels(name, how).inc()

    tokens = TokenAuthenticator(
        table,
        lambda: checker.users,
        app[THROTTLE],
        app[PACER],
        config.realm,
        on_refused=count_token_refusal,
    )
    backends: list[Authenticator] = [tokens, passwords]
    if config.ldap.enabled:
        # htpasswd first: a name in the table is never sent to the directory.
        backends.append(_directory_logins(app))
    backends.append(AnonymousAuthenticator(lambda: access.policy.public))
    authenticator = Authenticators(backends, passwords.challenge)
    app[GATE] = Gate(authenticator, access, metrics)
    app[RELOADER] = CredentialReloader(config.htpasswd, checker, metrics, table, config.tokens)
    if config.tokens is not None:
        app[TOKEN_RELOADER] = TokenReloader(config.tokens, table, checker, metrics, config.htpasswd)
    app[CROSS_ORIGIN] = cross_origin = CrossOrigin(config.cors_origins)
    app.cleanup_ctx.extend([_throttle_stores(host_store), _upstream_session, _background_tasks])
    app.on_response_prepare.extend(
        [_send_request_id, drop_server_banner, cross_origin.on_response_prepare]
    )
    if config.ui:
        _add_browser(app, table)
    # `.` skips a decoded newline (`/v2/%0a`): aiohttp would answer such paths itself, unchecked.
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle, expect_handler=_expect_handler)
    return app


def _add_browser(app: web.Application, tokens: TokenTable) -> None:
    """The pages under /ui/; their routes come before the API's catch-all."""
    config = app[CONFIG]
    assert config.ui_session_key_file is not None
    signer = SessionSigner(read_session_key(config.ui_session_key_file), config.ui_session_lifetime)
    logins = app.get(DIRECTORY_LOGINS)
    checker = app[CHECKER]
    signed_in = SignedIn(
        signer,
        lambda: checker.users,
        tokens,
        logins.directory if logins is not None else None,
        config.auth_cache_ttl,
    )
    app[BROWSER] = browser = BrowserUI(
        signer, signed_in, app[GATE], lambda: app[THROTTLE].store, _exchange
    )
    browser.add_routes(app.router)
    app.on_response_prepare.append(add_security_headers)


def _directory_logins(app: web.Application) -> LdapAuthenticator:
    """The LDAP backend; the service account's password is read now and kept in memory only."""
    config, metrics = app[CONFIG], app[METRICS]
    directory = Directory(config.ldap, read_bind_password(config.ldap))
    up = metrics.auth_backend_up.labels("ldap")
    app[DIRECTORY_LOGINS] = logins = LdapAuthenticator(
        directory,
        LoginCache(config.auth_cache_ttl, config.auth_cache_size),
        app[THROTTLE],
        app[PACER],
        config.realm,
        on_reachable=lambda answered: up.set(1 if answered else 0),
    )
    # Until a login or a probe says otherwise, the directory is taken to answer.
    logins.mark_reachable(True)
    return logins


def create_admin_app(proxy_app: web.Application) -> web.Application:
    """The admin application of a proxy serving in one process (see proxy/admin.py)."""
    metrics, state = proxy_app[METRICS], proxy_app[STATE]

    def not_ready() -> str | None:
        if state.ready:
            return None
        return "draining" if state.draining else "upstream not answering"

    async def scrape() -> bytes:
        metrics.tasks.set(len(asyncio.all_tasks()))
        _observe_pool(proxy_app)
        return await asyncio.to_thread(metrics.exposition)

    return admin.create_admin_app(not_ready, scrape)
