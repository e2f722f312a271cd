"""Rendering the pages (Jinja2, autoescaped) and serving their static files."""

from __future__ import annotations

import datetime
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web

# Everything a page loads comes from the proxy itself; no inline script or style anywhere.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_STATIC_TYPES = {"ui.css": "text/css", "ui.js": "text/javascript", "icon.svg": "image/svg+xml"}
_STATIC = {
    name: (resources.files("proxy.ui") / "static" / name).read_bytes() for name in _STATIC_TYPES
}


def _size(value: int | None) -> str:
    """Bytes as people read them: 1.2 MB (powers of 1000, as docker prints sizes)."""
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _created(value: str | None) -> str:
    """An RFC 3339 time as `2026-12-07 19:20 UTC`; other text as given."""
    if not value:
        return "—"
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value[:64]
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _short(digest: str) -> str:
    algorithm, _, hexa = digest.partition(":")
    return f"{algorithm}:{hexa[:12]}" if hexa else digest


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("proxy.ui", "templates"),
    # Every value is escaped: labels, annotations and names are whatever a pusher wrote.
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENVIRONMENT.filters.update(size=_size, created=_created, short=_short)


def render(name: str, *, status: int = 200, **values: Any) -> web.Response:
    """A page, with the headers every page carries."""
    body = _ENVIRONMENT.get_template(name).render(**values)
    response = web.Response(status=status, text=body, content_type="text/html", charset="utf-8")
    response.headers["Cache-Control"] = "no-store"
    return response


def message(status: int, title: str, text: str) -> web.Response:
    """A page that only says something (no session needed)."""
    return render("message.html", status=status, title=title, text=text)


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    body = _STATIC.get(name)
    if body is None:
        return message(404, "Not found", "There is no such file.")
    response = web.Response(body=body, content_type=_STATIC_TYPES[name], charset="utf-8")
    response.headers["Cache-Control"] = "no-cache"
    return response


async def add_security_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """On every answer of the pages (not the API's): the browser's rules for them."""
    if request.path == "/" or request.path.startswith("/ui"):
        response.headers.update(SECURITY_HEADERS)
