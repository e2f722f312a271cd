"""Why the proxy refused a request: one fixed set, for the audit log and a metrics label."""

from __future__ import annotations

from enum import StrEnum


class Refusal(StrEnum):
    """A refusal's reason; set on `Exchange.refusal` where the refusal is decided."""

    # 401: no credentials (every docker push/pull starts with one: normal), or an anonymous
    # request the rules do not grant.
    NO_CREDENTIALS = "no_credentials"
    # 401: malformed, unknown user or wrong password.
    BAD_CREDENTIALS = "bad_credentials"
    # 429: too many failed password checks.
    THROTTLED = "throttled"
    # 503: the directory (LDAP) that would judge the credentials is not answering.
    AUTH_UNAVAILABLE = "auth_unavailable"
    # 403: the access rules do not grant the right, or the write would move an immutable tag.
    DENIED = "denied"
    # 503: a delete immutable tags may forbid, when the registry's answers could not settle it.
    UNCONFIRMED = "unconfirmed"
    # 405: a write while `read_only` is on.
    READ_ONLY = "read_only"
    # 404: outside the registry API (`/v2/...`).
    NOT_API = "not_api"
    # 503: a limit of the proxy itself (connections, upstream pool) is reached.
    BUSY = "busy"
    # 413/431: a request head or body over a limit.
    TOO_LARGE = "too_large"
    # 400: a request that could be read in two ways, or that aiohttp could not parse.
    BAD_REQUEST = "bad_request"
    # 400: a TLS handshake (a client speaking HTTPS) on a plain-HTTP listener.
    TLS_ON_PLAIN_HTTP = "tls_on_plain_http"
    # 405: a method the proxy does not pass on for this path (the filtered catalog answers GET).
    METHOD_NOT_ALLOWED = "method_not_allowed"
    # 417: an Expect header other than 100-continue.
    BAD_EXPECT = "bad_expect"
