"""What the browser sends the pages: form bodies and query strings, each read one way only."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl

from aiohttp import web

# A sign-in form with an 8 KiB password fits; nothing the pages take is larger.
MAX_FORM_BYTES = 16 * 1024
_FORM_TYPE = "application/x-www-form-urlencoded"


class BadForm(Exception):
    """The request is not a form the pages take: the reason, for a 400 page."""


def single_values(pairs: Iterable[tuple[str, str]], wanted: Iterable[str]) -> dict[str, str]:
    """The wanted fields, each at most once (a repeated one could be read two ways)."""
    fields: dict[str, str] = {}
    names = set(wanted)
    for name, value in pairs:
        if name not in names:
            continue
        if name in fields:
            raise BadForm(f"field {name} given twice")
        fields[name] = value
    return fields


async def read_form(request: web.Request, wanted: Iterable[str]) -> dict[str, str]:
    """A small URL-encoded POST body's wanted fields; BadForm otherwise."""
    if request.content_type != _FORM_TYPE:
        raise BadForm(f"expected a form ({_FORM_TYPE})")
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise BadForm("form too large")
    body = b""
    # One read(n) returns only what has arrived: a body in two TCP segments needs two.
    while len(body) <= MAX_FORM_BYTES:
        chunk = await request.content.read(MAX_FORM_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > MAX_FORM_BYTES:
        raise BadForm("form too large")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise BadForm("the form is not UTF-8 URL-encoded text") from None
    return single_values(pairs, wanted)


def query_values(request: web.Request, wanted: Iterable[str]) -> dict[str, str]:
    """The wanted query parameters, each at most once; BadForm otherwise."""
    return single_values(request.query.items(), wanted)
