"""The aiohttp applications: public routes (authenticate, then forward) and their lifecycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from urllib.parse import unquote

from aiohttp import web

from proxy import errors
from proxy.auth import CredentialChecker, parse_basic
from proxy.config import Config
from proxy.forward import Forwarder, create_session

log = logging.getLogger("registry_proxy")

CONFIG = web.AppKey("config", Config)
CHECKER = web.AppKey("checker", CredentialChecker)
FORWARDER = web.AppKey("forwarder", Forwarder)

# Request key holding the authenticated user name (None once a check failed).
USER = "registry_proxy.user"

_API_PREFIX = "/v2/"


async def authenticated_user(request: web.Request) -> str | None:
    """The user whose Basic credentials this request carries, checked once per request."""
    if USER not in request:
        user = None
        credentials = parse_basic(request.headers.get("Authorization"))
        if credentials is not None:
            outcome = await request.app[CHECKER].check(*credentials)
            if outcome.ok:
                user = credentials[0]
        request[USER] = user
    result: str | None = request[USER]
    return result


def _challenge(request: web.Request) -> web.Response:
    response = errors.unauthorized(request.app[CONFIG].realm)
    if request.body_exists:
        # Neither read nor linger on an upload we refuse: close after answering.
        response.force_close()
    return response


async def _expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Authenticate before sending `100 Continue`, so a refused upload is never sent."""
    if await authenticated_user(request) is None:
        return _challenge(request)
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
    if await authenticated_user(request) is None:
        return _challenge(request)
    if not is_api_path(request.raw_path):
        return errors.not_found()
    return await request.app[FORWARDER](request)


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    session = create_session(
        connections=config.upstream_connections,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
    )
    app[FORWARDER] = Forwarder(session, config.upstream)
    try:
        yield
    finally:
        await session.close()


async def _credential_checker(app: web.Application) -> AsyncIterator[None]:
    try:
        yield
    finally:
        app[CHECKER].close()


def create_app(config: Config, users: Mapping[str, str]) -> web.Application:
    """The public application."""
    app = web.Application(
        handler_args={
            # Digests are over the bytes as sent: never inflate request bodies.
            "auto_decompress": False,
            # Room for Basic credentials with passwords of up to 8 KiB.
            "max_field_size": 16384,
        }
    )
    app[CONFIG] = config
    app[CHECKER] = CredentialChecker(
        users,
        cache_ttl=config.auth_cache_ttl,
        cache_size=config.auth_cache_size,
        workers=config.auth_workers,
    )
    app.cleanup_ctx.extend([_upstream_session, _credential_checker])
    app.router.add_route("*", "/{tail:.*}", handle, expect_handler=_expect_handler)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def create_admin_app() -> web.Application:
    """The admin application, served on `admin_listen` only."""
    app = web.Application()
    app.router.add_get("/healthz", _healthz)
    return app
