"""One reading of each request, the registry's: refuse bytes Go and the proxy could read two ways.

The registry is Go (net/http, net/url, mime, gorilla/mux, go-digest); the proxy is aiohttp and
yarl. Wherever the two could read the same bytes differently, an attacker picks the reading that
passes the access rules and gets the other one carried out, so such requests get a 400 and are
never forwarded: framing and target before authentication, the body's type after it (a request
without credentials still gets its 401). Decisions (docs/security.md has them as a table):

- Request target: origin-form only (Go also takes `http://host/...`). `#` is refused (Go keeps
  it in the path or query, yarl drops it), and so is any byte outside RFC 3986 (llhttp already
  refuses controls, space and non-ASCII). A bad `%` escape is refused (Go: 400 in the path, the
  pair skipped in the query); `;` in the query too (Go >= 1.17 skips the pair, older Go split).
- Read alike, so passed: `+` as a space and the first of repeated keys (`parse_query` below),
  percent-escapes in the path, `%2F` included, decoded before routing (`paths.classify`); `//`
  and a trailing `/`, which the registry's router answers with a 301 and nothing else.
- Content-Type of POST/PUT/PATCH: Go's `mime.ParseMediaType` lower-cases with Unicode rules
  (U+0130 becomes `i`, U+212A `k`) and trims Unicode spaces, then `FormValue` reads form and
  multipart bodies (`mount`, `from`, `digest`). Refused: non-ASCII, more than one, a media type Go
  cannot parse, and the two form types whatever their parameters.
- Digests: go-digest's Parse changed between the registry's versions (2.8.2 takes 64 `Z` or
  upper-case hex as sha256, v3 does not), and a manifest reference it cannot parse is a tag. Only
  what both take (`paths.is_digest`) passes; any other manifest reference with ':' and any other
  blob or referrers digest is refused.
- HTTP/1.0 with Transfer-Encoding: the framing is faulty (RFC 9112 §6.1): 400, then close.
- Transfer-Encoding other than a lone `chunked`: Go's net/http refuses it (501), llhttp takes
  `identity, chunked` or `gzip, chunked` as chunked and the proxy would forward the coded bytes
  as the body: 400, then close.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from urllib.parse import quote

from aiohttp import web

from proxy.paths import Action, Target, is_digest

# RFC 3986 unreserved, sub-delims, ':' '@' '/' '?' and '%' (checked separately).
_TARGET = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ATOI = re.compile(r"[+-]?[0-9]+")
# The registry rejects larger `n` (its `catalog.maxentries` defaults to 1000), and a filtered
# catalog page is buffered whole.
CATALOG_MAX_N = 1000
# What Go's FormValue reads a body as (net/http parsePostForm, ParseMultipartForm).
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
# RFC 2045 token characters, as Go's mime.isTokenChar.
_TOKEN = r"[!#$%&'*+\-.0-9A-Z^_`a-z|~]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}(?:/{_TOKEN})?")
# Go's unicode.IsSpace restricted to ASCII (non-ASCII never gets this far).
_GO_SPACE = " \t\n\v\f\r"
_PRINTABLE = re.compile(r"[\t\x20-\x7e]*")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_problem(request: web.BaseRequest) -> str | None:
    """Why the registry could read this request's framing or target otherwise, or None."""
    if request.version < (1, 1) and "Transfer-Encoding" in request.headers:
        return "HTTP/1.0 request with Transfer-Encoding"
    codings = request.headers.getall("Transfer-Encoding", ())
    # net/http transfer.go: one field, `chunked` (any case, trimmed), or it answers 501.
    if codings and (len(codings) > 1 or codings[0].strip(" \t").lower() != "chunked"):
        return "Transfer-Encoding other than chunked"
    return target_problem(request.raw_path)


def reference_problem(target: Target) -> str | None:
    """Why one registry could read the target's reference as a digest and another as a tag."""
    reference = target.reference
    if reference is None or is_digest(reference):
        return None
    if target.action in (Action.BLOB, Action.REFERRERS):
        return "invalid digest"
    if target.action is Action.MANIFEST and ":" in reference:
        return "manifest reference with ':' that is not a valid digest"
    return None


def body_problem(request: web.BaseRequest) -> str | None:
    """Why the registry could read this request's body otherwise than as a plain upload, or None."""
    if request.method not in _BODY_METHODS:
        return None
    return content_type_problem(request.headers.getall("Content-Type", ()))


def target_problem(target: str) -> str | None:
    """Why a request target (path and query, as sent) cannot be forwarded as read, or None."""
    if not _TARGET.fullmatch(target):
        if "#" in target:
            return "'#' in the request target"
        if not target.startswith("/"):
            return "request target not in origin form"
        return "characters outside RFC 3986 in the request target"
    if _BAD_PERCENT.search(target):
        return "malformed percent-escape in the request target"
    if ";" in target.partition("?")[2]:
        return "';' in the query string"
    return None


def content_type_problem(values: Sequence[str]) -> str | None:
    """Why Go could read a write body with these Content-Type values as a form, or None."""
    if not values:
        return None
    if len(values) > 1:
        return "more than one Content-Type"
    value = values[0]
    if not _PRINTABLE.fullmatch(value):
        # aiohttp decodes header bytes as Latin-1; Go lower-cases them as UTF-8 with Unicode rules.
        return "non-ASCII Content-Type"
    media_type = go_media_type(value)
    if media_type is None:
        return "unreadable Content-Type"
    if media_type in _FORM_TYPES:
        return "form-encoded request body"
    return None


def go_media_type(value: str) -> str | None:
    """The media type Go's mime.ParseMediaType reads from an ASCII value (parameters aside)."""
    media_type = value.partition(";")[0].lower().strip(_GO_SPACE)
    return media_type if _MEDIA_TYPE.fullmatch(media_type) else None


# Query strings, read the way the registry (Go's net/url) reads them.


def _go_unescape(text: str) -> str | None:
    """url.QueryUnescape: None where Go reports an error (and skips the pair)."""
    if _BAD_PERCENT.search(text):
        return None
    data = bytearray()
    i = 0
    raw = text.encode("utf-8", "surrogateescape")
    while i < len(raw):
        byte = raw[i]
        if byte == 0x25:  # %
            data.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        data.append(0x20 if byte == 0x2B else byte)  # + is a space
        i += 1
    return data.decode("utf-8", "surrogateescape")


def _pairs(raw_query: str) -> list[tuple[str, tuple[str, str] | None]]:
    """Each `&`-separated pair raw, with its decoded (key, value), or None if Go skips it."""
    pairs: list[tuple[str, tuple[str, str] | None]] = []
    for pair in raw_query.split("&") if raw_query else []:
        decoded: tuple[str, str] | None = None
        if pair and ";" not in pair:
            raw_key, _, raw_value = pair.partition("=")
            key, value = _go_unescape(raw_key), _go_unescape(raw_value)
            if key is not None and value is not None:
                decoded = (key, value)
        pairs.append((pair, decoded))
    return pairs


def parse_query(raw_query: str) -> dict[str, str]:
    """The query as the registry sees it: the first value of every key."""
    query: dict[str, str] = {}
    for _, decoded in _pairs(raw_query):
        if decoded is not None:
            query.setdefault(*decoded)
    return query


def _edit_query(raw_query: str, edit: Callable[[str, str, str], str | None]) -> str:
    """Apply `edit(raw, key, value)` to every pair the registry reads; None drops the pair.

    Pairs containing `;` are dropped (Go ignores them; Go before 1.17 split on them instead).
    Everything else stays byte for byte.
    """
    out: list[str] = []
    for raw, decoded in _pairs(raw_query):
        if decoded is None:
            if ";" not in raw:
                out.append(raw)
            continue
        edited = edit(raw, *decoded)
        if edited is not None:
            out.append(edited)
    return "&".join(out)


def strip_mount(raw_query: str) -> str:
    """The query without `mount` and `from`: the registry then starts a normal upload."""
    return _edit_query(raw_query, lambda raw, key, _: None if key in ("mount", "from") else raw)


# The catalog.


def _above_cap(value: str) -> bool:
    if not _ATOI.fullmatch(value) or value.startswith("-"):
        return False
    digits = value.lstrip("+").lstrip("0")
    # Length first: int() refuses very long digit strings.
    return len(digits) > len(str(CATALOG_MAX_N)) or int(digits or "0") > CATALOG_MAX_N


def cap_catalog_query(raw_query: str, *, last: str | None = None) -> str:
    """Clamp every `n` to CATALOG_MAX_N (and replace `last` if given); other pairs unchanged."""

    def edit(raw: str, key: str, value: str) -> str | None:
        if key == "n" and _above_cap(value):
            return f"n={CATALOG_MAX_N}"
        if key == "last" and last is not None:
            return None
        return raw

    query = _edit_query(raw_query, edit)
    if last is not None:
        query = "&".join(part for part in (query, f"last={quote(last, safe='')}") if part)
    return query
