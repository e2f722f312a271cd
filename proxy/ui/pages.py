"""The browser's pages under /ui/: sign-in, repositories, tags, a manifest, delete, sign-out."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from proxy.auth.directory import DirectoryUnavailable
from proxy.exchange import Exchange
from proxy.gate import Gate
from proxy.identity import AuthFailure, AuthOutcome
from proxy.log import escape
from proxy.paths import Action, Target, is_repository
from proxy.refusal import Refusal
from proxy.throttle.store import ThrottleStore
from proxy.ui import templates
from proxy.ui.forms import BadForm, query_values, read_form
from proxy.ui.registry import Acting, Refused, Registry, api_path
from proxy.ui.session import (
    COOKIE,
    COOKIE_PATH,
    LOGIN_COOKIE,
    Session,
    SessionSigner,
    milliseconds,
    owner_key,
)
from proxy.ui.signed_in import SignedIn

log = logging.getLogger("registry_proxy.ui")

REPOSITORIES_PER_PAGE = 50
TAGS_PER_PAGE = 25
# Longest user or token name the form takes (the audit line cuts what it shows shorter).
MAX_NAME_CHARS = 256
MAX_PASSWORD_CHARS = 8192
_HOME = "/ui/"
_LOGIN = "/ui/login"
# The access log's decision for a refused sign-in, as the gate records a refused Basic login.
_LOGIN_REFUSALS = {
    AuthOutcome.THROTTLED: Refusal.THROTTLED,
    AuthOutcome.UNAVAILABLE: Refusal.AUTH_UNAVAILABLE,
}

Exchanges = Callable[[web.Request], Exchange]


@dataclass
class Page:
    """A page's request, after its session was read."""

    request: web.Request
    exchange: Exchange
    session: Session
    who: Acting
    csrf: str


class BrowserUI:
    """The pages, with what they need: sessions, identities, the gate's logins and the registry."""

    def __init__(
        self,
        signer: SessionSigner,
        signed_in: SignedIn,
        gate: Gate,
        store: Callable[[], ThrottleStore],
        exchanges: Exchanges,
    ) -> None:
        self._signer = signer
        self._signed_in = signed_in
        self._gate = gate
        self._store = store
        self._exchanges = exchanges
        # Set once the upstream session exists.
        self.registry: Registry | None = None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Every /ui/ route, and `/` sent to them; the catch-all route must come after."""
        router.add_get("/", _to_home)
        router.add_get("/ui", _to_home)
        router.add_get("/ui/static/{name}", templates.static_file)
        router.add_get(_LOGIN, self.login_form)
        router.add_post(_LOGIN, self.log_in)
        router.add_post("/ui/logout", self.log_out)
        router.add_get(_HOME, self._page(self.repositories))
        router.add_get("/ui/tags", self._page(self.tags))
        router.add_get("/ui/manifest", self._page(self.manifest))
        router.add_post("/ui/delete", self._page(self.delete))
        router.add_route("*", r"/ui/{tail:[\s\S]*}", _unknown)

    # Sign-in and sign-out.

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if await self._session(request) is not None:
            return _see_other(_HOME)
        return self._login_page(request, 200)

    def _login_page(
        self, request: web.Request, status: int, error: str = "", username: str = ""
    ) -> web.Response:
        nonce = self._signer.login_nonce()
        response = templates.render(
            "login.html",
            status=status,
            csrf=self._signer.login_csrf(nonce),
            error=error,
            username=username,
            next=_safe_next(request.query.get("next", "")),
        )
        _set_cookie(response, self._exchanges(request), LOGIN_COOKIE, nonce, max_age=3600)
        return response

    async def log_in(self, request: web.Request) -> web.StreamResponse:
        exchange = self._exchanges(request)
        try:
            form = await read_form(request, ("username", "password", "csrf", "next"))
        except BadForm as exc:
            return templates.message(400, "Bad request", str(exc))
        nonce = _one_cookie(request, LOGIN_COOKIE)
        if not _same_origin(request, exchange) or not self._signer.login_csrf_ok(
            nonce, form.get("csrf", "")
        ):
            return self._login_page(request, 403, "The sign-in form expired. Please try again.")
        user, password = form.get("username", ""), form.get("password", "")
        if not _usable(user, password):
            return self._login_page(request, 400, "Enter a user name and a password.", "")
        result = await self._gate.log_in(exchange, user, password)
        if isinstance(result, AuthFailure):
            exchange.refusal = _LOGIN_REFUSALS.get(result.how, Refusal.BAD_CREDENTIALS)
            return self._refused_login(request, result, user)
        kind, name, binding = await self._signed_in.kind_of(result)
        # A sign-in in the same millisecond as a sign-out must not make a session it ends.
        ended = await self._store().sessions_ended(owner_key(kind, name), time.time())
        _, value = self._signer.issue(kind, name, binding, None if ended is None else int(ended))
        exchange.event = "login"
        log.info("ui: %s signed in", escape(name))
        response = _see_other(_safe_next(form.get("next", "")) or _HOME)
        _set_cookie(response, exchange, COOKIE, value, max_age=int(self._signer.lifetime))
        response.del_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
        return response

    def _refused_login(self, request: web.Request, failure: AuthFailure, user: str) -> web.Response:
        if failure.how is AuthOutcome.THROTTLED:
            wait = max(1, math.ceil(failure.retry_after))
            response = self._login_page(
                request, 429, f"Too many failed sign-ins. Try again in {wait} seconds.", user
            )
            response.headers["Retry-After"] = str(wait)
            return response
        if failure.how is AuthOutcome.UNAVAILABLE:
            return self._login_page(
                request, 503, "The user directory is not answering. Try again later.", user
            )
        return self._login_page(request, 401, "Wrong user name or password.", user)

    async def log_out(self, request: web.Request) -> web.StreamResponse:
        try:
            form = await read_form(request, ("csrf",))
        except BadForm as exc:
            return templates.message(400, "Bad request", str(exc))
        expired = templates.message(403, "Refused", "The form expired. Please try again.")
        # Checked with or without a session: another site's form comes without the cookie
        # (SameSite), and clearing it on such a request would let any page sign people out.
        if not _same_origin(request, self._exchanges(request)):
            return expired
        # A session already ended signs out nobody: a kept copy of its cookie must not end the
        # user's later sessions.
        session = await self._session(request)
        if session is not None:
            if not self._signer.csrf_ok(session, form.get("csrf", "")):
                return expired
            # Every session of the user up to now, in every browser, until the last of them would
            # have expired anyway: a copy of any of their cookies replayed later is refused.
            now = time.time()
            until = max(now + self._signer.lifetime, session.expires)
            await self._store().end_sessions(session.owner_key, milliseconds(now), until, now)
            log.info("ui: %s signed out", escape(session.name))
        response = _see_other(_LOGIN)
        response.del_cookie(COOKIE, path=COOKIE_PATH)
        return response

    # Pages that need a session.

    async def _session(self, request: web.Request) -> Session | None:
        session = self._signer.read(_one_cookie(request, COOKIE))
        if session is None:
            return None
        ended = await self._store().sessions_ended(session.owner_key, time.time())
        if ended is not None and session.issued <= ended:
            return None
        return session

    def _page(
        self, draw: Callable[[Page], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            exchange = self._exchanges(request)
            session = await self._session(request)
            if session is None:
                return _to_login(request)
            try:
                identity = await self._signed_in.identity(session)
            except DirectoryUnavailable:
                return templates.message(
                    503, "Unavailable", "The user directory is not answering. Try again later."
                )
            if identity is None:
                response = _to_login(request)
                response.del_cookie(COOKIE, path=COOKIE_PATH)
                return response
            exchange.identity, exchange.user = identity, session.name
            exchange.auth_outcome = AuthOutcome.CACHED
            who = Acting(identity, exchange.client, exchange.scheme, request.host,
                         exchange.request_id, session.name)  # fmt: skip
            page = Page(request, exchange, session, who, self._signer.csrf(session))
            try:
                return await draw(page)
            except BadForm as exc:
                return self._message(page, 400, "Bad request", str(exc))
            except Refused as exc:
                if exc.refusal is not None:
                    # The access log says what the API's would for the same request.
                    exchange.refusal, exchange.refusal_detail = exc.refusal, exc.reason
                return self._message(page, exc.status, "Refused", exc.reason)

        return handler

    def _registry(self) -> Registry:
        if self.registry is None:
            raise Refused(503, "the proxy is starting")
        return self.registry

    def _render(self, page: Page, name: str, status: int = 200, **values: Any) -> web.Response:
        # No registry yet (the proxy is starting): a message page still renders.
        read_only = self.registry is not None and self.registry.read_only
        return templates.render(
            name,
            status=status,
            user=page.session.name,
            csrf=page.csrf,
            read_only=read_only,
            **values,
        )

    def _message(self, page: Page, status: int, title: str, text: str) -> web.Response:
        return self._render(page, "message.html", status, title=title, text=text)

    async def repositories(self, page: Page) -> web.StreamResponse:
        registry = self._registry()
        query = query_values(page.request, ("q", "after"))
        search = query.get("q", "").strip()
        if not registry.may(page.who, "GET", api_path(Action.CATALOG)):
            return self._render(page, "repositories.html", catalog=False, search=search)
        listing = await registry.repositories(
            page.who, search, query.get("after") or None, REPOSITORIES_PER_PAGE
        )
        next_link = None
        if listing.after is not None or listing.searched_to is not None:
            cursor = listing.after or listing.searched_to or ""
            next_link = _HOME + "?" + urlencode({"q": search, "after": cursor})
        return self._render(
            page,
            "repositories.html",
            catalog=True,
            search=search,
            listing=listing,
            next_link=next_link,
        )

    async def tags(self, page: Page) -> web.StreamResponse:
        registry = self._registry()
        query = query_values(page.request, ("repository", "after", "deleted"))
        repository = _repository(query.get("repository", ""))
        listing = await registry.tags(
            page.who, repository, query.get("after") or None, TAGS_PER_PAGE
        )
        deletable = {tag: registry.may_delete(page.who, repository, tag) for tag, _ in listing.rows}
        next_link = None
        if listing.after is not None:
            next_link = "/ui/tags?" + urlencode({"repository": repository, "after": listing.after})
        return self._render(
            page,
            "tags.html",
            repository=repository,
            listing=listing,
            deletable=deletable,
            host=page.request.host,
            next_link=next_link,
            deleted=_reference_or_nothing(repository, query.get("deleted", "")),
        )

    async def manifest(self, page: Page) -> web.StreamResponse:
        registry = self._registry()
        query = query_values(page.request, ("repository", "reference"))
        repository = _repository(query.get("repository", ""))
        reference = query.get("reference", "")
        manifest = await registry.manifest(page.who, repository, reference)
        if manifest.problem == "not found":
            raise Refused(404, f"no manifest {reference} in {repository}")
        return self._render(
            page,
            "manifest.html",
            repository=repository,
            reference=reference,
            manifest=manifest,
            host=page.request.host,
            # Opened through an immutable tag, its manifest is not offered for deletion either.
            deletable=registry.may_delete(page.who, repository, reference)
            and registry.may_delete(page.who, repository, manifest.digest or reference),
        )

    async def delete(self, page: Page) -> web.StreamResponse:
        form = await read_form(page.request, ("repository", "reference", "csrf"))
        if not _same_origin(page.request, page.exchange) or not self._signer.csrf_ok(
            page.session, form.get("csrf", "")
        ):
            return self._message(page, 403, "Refused", "The form expired. Please try again.")
        repository = _repository(form.get("repository", ""))
        reference = form.get("reference", "")
        exchange = page.exchange
        # Once read as the API reads it (only then may the access log show it), and before the
        # registry is asked: a refused delete's line names what it tried too.
        api_path(Action.MANIFEST, repository, reference)
        exchange.target = Target(Action.MANIFEST, repository, reference)
        digest = await self._registry().delete(page.who, repository, reference)
        exchange.event = "delete"
        log.info("ui: %s deleted %s:%s (%s)", escape(page.session.name), repository,
                 escape(reference), escape(digest))  # fmt: skip
        return _see_other("/ui/tags?" + urlencode({"repository": repository, "deleted": reference}))


def _repository(name: str) -> str:
    if not is_repository(name):
        raise BadForm("not a repository name")
    return name


def _reference_or_nothing(repository: str, reference: str) -> str:
    """`reference` if it is a tag or digest: the notice must not say what a link wants."""
    try:
        api_path(Action.MANIFEST, repository, reference)
    except Refused:
        return ""
    return reference


def _usable(user: str, password: str) -> bool:
    return (
        0 < len(user) <= MAX_NAME_CHARS
        and user.isprintable()
        and ":" not in user
        and 0 < len(password) <= MAX_PASSWORD_CHARS
        and "\x00" not in password
    )


def _one_cookie(request: web.Request, name: str) -> str | None:
    """The cookie's value if the browser sent it exactly once (a second may be a planted one)."""
    header = ";".join(request.headers.getall("Cookie", ()))
    pairs = (part.strip().partition("=") for part in header.split(";"))
    # Read here, not from request.cookies: aiohttp also splits at spaces and commas, so a
    # cookie planted as `x=y rp_session=...` would be a second one the count did not see.
    values = [value for key, _, value in pairs if key == name]
    return values[0] if len(values) == 1 else None


def _same_origin(request: web.Request, exchange: Exchange) -> bool:
    """False for a POST a browser says came from another site or origin."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{exchange.scheme}://{request.host}"


def _safe_next(target: str) -> str:
    """Only our own pages: never another site (`//evil`, `/ui/../`)."""
    if not target.startswith(_HOME) or "//" in target or "\\" in target or ".." in target:
        return ""
    # A line break in the Location header would make aiohttp drop the answer.
    return target if target.isprintable() else ""


def _set_cookie(
    response: web.StreamResponse, exchange: Exchange, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        # The client's scheme: behind a TLS-terminating proxy, the one it forwarded.
        secure=exchange.scheme == "https",
    )


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _to_login(request: web.Request) -> web.Response:
    target = request.path_qs if request.method == "GET" else _HOME
    return _see_other(f"{_LOGIN}?next={quote(target, safe='')}")


async def _to_home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(_HOME)


async def _unknown(request: web.Request) -> web.StreamResponse:
    return templates.message(404, "Not found", "There is no such page.")
