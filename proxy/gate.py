"""The gate: every check a request passes, in order, before anything of it goes upstream."""

from __future__ import annotations

import logging
from urllib.parse import unquote

from aiohttp import web

from proxy import errors, reading
from proxy.access.immutable import ImmutableTags
from proxy.access.rules import AccessPolicy, RequestContext, authorize
from proxy.access.tag_guard import TagGuard
from proxy.auth.backend import Authenticators
from proxy.exchange import Exchange
from proxy.identity import AuthFailure, AuthOutcome, Identity
from proxy.log import escape
from proxy.metrics import Metrics
from proxy.paths import Action
from proxy.refusal import Refusal

log = logging.getLogger("registry_proxy")

_API_PREFIX = "/v2/"
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class AccessControl:
    """The access rules, immutable tags and read-only switch in force; SIGHUP replaces them."""

    def __init__(
        self, policy: AccessPolicy, read_only: bool, immutable: ImmutableTags | None = None
    ) -> None:
        self.policy = policy
        self.read_only = read_only
        self.immutable = immutable or ImmutableTags()


def is_api_path(raw_path: str) -> bool:
    """True for `/v2/...` targets without dot segments (plain or percent-encoded)."""
    if not raw_path.startswith(_API_PREFIX):
        return False
    # Decoded first, as Go does before gorilla/mux cleans the path: `a%2F..%2Fb` hides a `..`.
    path = unquote(raw_path.partition("?")[0])
    return not any(segment in (".", "..") for segment in path.split("/"))


class Gate:
    """Authenticates, reads and authorizes requests; answers the refusal of those that fail."""

    def __init__(
        self,
        authenticator: Authenticators,
        access: AccessControl,
        metrics: Metrics,
        tags: TagGuard | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._access = access
        self._metrics = metrics
        # Set once the upstream session exists.
        self.tags = tags

    async def identify(self, request: web.Request, exchange: Exchange) -> Identity | AuthFailure:
        """Who sent the request, established once per request."""
        if exchange.auth_outcome is None:
            result = await self._authenticator.authenticate(request, exchange)
            self._record(exchange, result)
            return result
        if exchange.identity is not None:
            return exchange.identity
        return AuthFailure(
            exchange.auth_outcome, self._authenticator.challenge, exchange.retry_after
        )

    async def log_in(self, exchange: Exchange, user: str, password: str) -> Identity | AuthFailure:
        """A sign-in form's name and secret: checked and recorded as a Basic login is."""
        result = await self._authenticator.log_in(exchange, user, password)
        self._record(exchange, result)
        return result

    def _record(self, exchange: Exchange, result: Identity | AuthFailure) -> None:
        exchange.auth_outcome = result.how
        if isinstance(result, Identity):
            exchange.identity, exchange.user = result, result.name
            if result.scope is not None:
                # The audit line names the token that logged in (its owner is in the file).
                exchange.user = result.scope.token
        else:
            exchange.retry_after = result.retry_after
        self._metrics.auth.labels(result.how).inc()

    async def check(self, request: web.Request, exchange: Exchange) -> web.Response | None:
        """The refusal of a request that must not go upstream, or None to let it pass."""
        refusal = await self._refusal(request, exchange)
        if refusal is not None and (request.body_exists or refusal.status == 400):
            # Never forward, and not keep, a connection carrying an upload we refuse, or bytes we
            # could not read as the registry would (RFC 9112 §6.1 for HTTP/1.0 framing).
            refusal.force_close()
        return refusal

    async def confirm(self, request: web.Request, exchange: Exchange) -> web.Response | None:
        """Checks that ask the registry (immutable tags): run once, after `100 Continue`."""
        if self.tags is None:
            return None
        refusal = await self.tags.refusal(request, exchange, self._access.immutable)
        if refusal is not None:
            reason = Refusal.UNCONFIRMED if refusal.unconfirmed else Refusal.DENIED
            exchange.refusal, exchange.refusal_detail = reason, refusal.reason
            log.info("%s %s %s: %s", reason, request.method, exchange.target.repository,
                     escape(refusal.reason))  # fmt: skip
            response = (
                errors.registry_error(503, "UNAVAILABLE", refusal.reason)
                if refusal.unconfirmed
                else errors.denied(refusal.reason)
            )
            if request.body_exists and exchange.body is None:
                response.force_close()
            return response
        return None

    async def _refusal(self, request: web.Request, exchange: Exchange) -> web.Response | None:
        """Everything that may refuse a request, in order."""
        problem = reading.request_problem(request) or reading.reference_problem(exchange.target)
        if problem is not None:
            log.info("refused %s: %s", escape(request.method), problem)
            exchange.refusal, exchange.refusal_detail = Refusal.BAD_REQUEST, problem
            return errors.bad_request(problem)
        if exchange.malformed_hop is not None:
            # Whoever it is cannot be told: no throttle key, no password check, nothing forwarded.
            log.info(
                "refused: malformed X-Forwarded-For hop %s", escape(exchange.malformed_hop[:100])
            )
            exchange.refusal = Refusal.BAD_REQUEST
            exchange.refusal_detail = "malformed X-Forwarded-For hop"
            return errors.malformed_forwarding()
        identity = await self.identify(request, exchange)
        if isinstance(identity, AuthFailure):
            return self._unauthenticated(exchange, identity)
        if not is_api_path(request.raw_path):
            exchange.refusal = Refusal.NOT_API
            return errors.not_found()
        access = self._access
        if access.read_only and request.method in _WRITES:
            exchange.refusal = Refusal.READ_ONLY
            return errors.read_only()
        who = escape(identity.name) if identity.name is not None else "@anonymous"
        problem = reading.body_problem(request)
        if problem is not None:
            log.info("refused %s from %s: %s", request.method, who, problem)
            exchange.refusal, exchange.refusal_detail = Refusal.BAD_REQUEST, problem
            return errors.bad_request(problem)
        context = request_context(request, exchange, identity)
        decision = authorize(access.policy, context)
        if not decision.allowed:
            exchange.refusal, exchange.refusal_detail = Refusal.DENIED, decision.reason
            log.info(
                "denied %s %s to %s: %s",
                request.method,
                escape(request.raw_path.partition("?")[0]),
                who,
                escape(decision.reason),
            )
            if identity.anonymous:
                # Not a 403: the client may hold credentials it sends only after a challenge.
                exchange.refusal = Refusal.NO_CREDENTIALS
                return errors.challenge(self._authenticator.challenge)
            return errors.denied(decision.reason)
        restricted = exchange.target.action is Action.CATALOG and access.policy.restricts(identity)
        if restricted and request.method != "GET":
            # Filtering answers GET only; never send the registry another method than the client's.
            exchange.refusal = Refusal.METHOD_NOT_ALLOWED
            return errors.method_not_allowed("GET")
        exchange.upstream_query = decision.query
        return None

    def _unauthenticated(self, exchange: Exchange, failure: AuthFailure) -> web.Response:
        if failure.how is AuthOutcome.THROTTLED:
            exchange.refusal = Refusal.THROTTLED
            return errors.too_many_failures(failure.retry_after)
        if failure.how is AuthOutcome.UNAVAILABLE:
            # Not a 401: the password may be right, and clients would drop it as wrong.
            exchange.refusal = Refusal.AUTH_UNAVAILABLE
            return errors.registry_error(
                503, "UNAVAILABLE", "the user directory is not answering; try again later"
            )
        no_credentials = failure.how is AuthOutcome.NO_CREDENTIALS
        exchange.refusal = Refusal.NO_CREDENTIALS if no_credentials else Refusal.BAD_CREDENTIALS
        return errors.challenge(failure.challenge)


def request_context(request: web.Request, exchange: Exchange, identity: Identity) -> RequestContext:
    """What the access rules may look at for this request."""
    return RequestContext(
        identity=identity,
        method=request.method,
        target=exchange.target,
        raw_query=request.raw_path.partition("?")[2],
        content_type=request.headers.get("Content-Type", ""),
        client=exchange.client,
    )
