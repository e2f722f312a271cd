"""Responses the proxy itself produces, in the registry's JSON error envelope.

Clients (docker, containerd, containers/image) parse these bodies and choke on HTML
(harbor#3270), so every error the proxy originates goes through `registry_error`.
"""

import json
import math

from aiohttp import web

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"

_JSON = "application/json"


def registry_error(
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Build an error response shaped like distribution's `errcode.Errors`."""
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})
    response = web.Response(status=status, text=body, content_type=_JSON)
    response.headers[API_VERSION_HEADER] = API_VERSION
    if headers:
        response.headers.update(headers)
    return response


def unauthorized(realm: str) -> web.Response:
    """The Basic challenge docker and podman learn the auth scheme from."""
    return challenge(f'Basic realm="{realm}"')


def challenge(www_authenticate: str) -> web.Response:
    """401 with an authentication backend's challenge."""
    return registry_error(
        401,
        "UNAUTHORIZED",
        "authentication required",
        headers={"WWW-Authenticate": www_authenticate},
    )


def not_found() -> web.Response:
    """Anything outside the registry API."""
    return registry_error(404, "NOT_FOUND", "not found")


def bad_gateway() -> web.Response:
    """The upstream registry refused the connection or could not be resolved."""
    return registry_error(502, "UNAVAILABLE", "upstream registry unreachable")


def gateway_timeout() -> web.Response:
    """The upstream registry did not answer in time."""
    return registry_error(504, "UNAVAILABLE", "upstream registry timed out")


def expectation_failed() -> web.Response:
    """An Expect header other than 100-continue."""
    return registry_error(417, "UNSUPPORTED", "unsupported Expect header")


def request_timeout() -> web.Response:
    """The client stopped sending its body."""
    return registry_error(408, "UNAVAILABLE", "request body timed out")


def denied(reason: str) -> web.Response:
    """An authenticated user without the right for this request."""
    return registry_error(403, "DENIED", f"requested access to the resource is denied: {reason}")


def read_only() -> web.Response:
    """Writes while `read_only` is on (as the registry's own read-only mode answers)."""
    return registry_error(405, "UNSUPPORTED", "the registry is read-only for maintenance")


def too_many_failures(retry_after: float) -> web.Response:
    """Too many failed password checks from this address or for this user."""
    return registry_error(
        429,
        "TOOMANYREQUESTS",
        "too many failed logins; try again later",
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


def malformed_forwarding() -> web.Response:
    """A trusted proxy's X-Forwarded-For names no address where the client should be."""
    return registry_error(400, "UNSUPPORTED", "malformed X-Forwarded-For from a trusted proxy")


def bad_request(problem: str) -> web.Response:
    """Bytes the registry could read otherwise than the proxy (`proxy.reading`)."""
    return registry_error(400, "UNSUPPORTED", f"request refused: {problem}")


def method_not_allowed(allow: str) -> web.Response:
    """A method the proxy does not pass on for this path (as the registry's own 405, in JSON)."""
    return registry_error(
        405, "UNSUPPORTED", "the operation is unsupported", headers={"Allow": allow}
    )


def pagination_number_invalid(value: str) -> web.Response:
    """A catalog `n` that is not a count (as the registry v3 answers it)."""
    return registry_error(
        400, "PAGINATION_NUMBER_INVALID", f"invalid number of results requested: {value!r}"
    )


def unavailable_bytes(message: str) -> bytes:
    """A whole 503 `UNAVAILABLE` response that closes the connection, for raw transports."""
    body = json.dumps(
        {"errors": [{"code": "UNAVAILABLE", "message": message, "detail": None}]}
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"{API_VERSION_HEADER}: {API_VERSION}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def proxy_busy() -> web.Response:
    """No upstream connection was free for this user within `connect_timeout`."""
    return registry_error(
        503, "UNAVAILABLE", "proxy busy: no upstream connection free", headers={"Retry-After": "1"}
    )


# What aiohttp itself answers (parse errors, the head-size cap, handler failures), in our
# envelope; the message never quotes what the client sent.
_PROTOCOL_ERRORS = {
    400: ("UNSUPPORTED", "malformed HTTP request"),
    431: ("UNSUPPORTED", "request header fields too large"),
    500: ("UNKNOWN", "internal error"),
    504: ("UNAVAILABLE", "timed out"),
}


def protocol_error(status: int) -> web.Response:
    """The response to a request aiohttp refused or failed, without echoing any of it."""
    code, message = _PROTOCOL_ERRORS.get(status, ("UNKNOWN", "request failed"))
    return registry_error(status, code, message)
