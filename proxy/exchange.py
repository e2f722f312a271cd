"""What the proxy learns about one request: for auth, forwarding, the access log and metrics."""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web

from proxy.config import Network
from proxy.paths import Target, classify
from proxy.refusal import Refusal

# Request key holding the Exchange.
EXCHANGE_KEY = "registry_proxy.exchange"

REQUEST_ID_HEADER = "X-Request-Id"
# What a request id from a trusted proxy may look like (uuids, W3C trace ids, ULIDs...).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Exchange:
    """One request's facts, filled in as it is handled."""

    client: str
    scheme: str
    target: Target
    user: str | None = None
    auth_outcome: str | None = None
    # Seconds until a password-guessing block ends, when auth_outcome is "throttled".
    retry_after: float = 0.0
    # The query string to send upstream (access control may drop a mount or cap `n`).
    upstream_query: str | None = None
    upstream_status: int | None = None
    request_id: str = field(default_factory=new_request_id)
    # Why the proxy refused the request (None: it did not); `refusal_detail` says more, for the log.
    refusal: Refusal | None = None
    refusal_detail: str | None = None
    # Milliseconds from sending the request upstream to the upstream's response headers.
    upstream_ms: float | None = None


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _client_and_scheme(request: web.BaseRequest, trusted: Sequence[Network]) -> tuple[str, str]:
    """The client's address and scheme; forwarding headers count only from a trusted peer."""
    peer = request.remote or ""
    scheme = request.scheme
    if not trusted or not _trusted(peer, trusted):
        return peer, scheme
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
    client = peer
    # The rightmost address not added by one of our own proxies is the real client.
    for hop in reversed([h for h in hops if h]):
        client = hop
        if not _trusted(hop, trusted):
            break
    protos = [
        p.strip().lower()
        for v in request.headers.getall("X-Forwarded-Proto", ())
        for p in v.split(",")
    ]
    if protos and protos[-1] in ("http", "https"):
        scheme = protos[-1]
    return client, scheme


def _request_id(request: web.BaseRequest, trusted: Sequence[Network]) -> str:
    """A trusted proxy's well-formed X-Request-Id, else a fresh one."""
    given = request.headers.getall(REQUEST_ID_HEADER, ())
    trusted_peer = _trusted(request.remote or "", trusted)
    if trusted_peer and len(given) == 1 and _REQUEST_ID.fullmatch(given[0]):
        return given[0]
    return new_request_id()


def exchange_of(request: web.BaseRequest, trusted: Sequence[Network] = ()) -> Exchange:
    """The request's Exchange, created on first use."""
    found = request.get(EXCHANGE_KEY)
    if isinstance(found, Exchange):
        return found
    client, scheme = _client_and_scheme(request, trusted)
    created = Exchange(
        client=client,
        scheme=scheme,
        target=classify(request.raw_path),
        request_id=_request_id(request, trusted),
    )
    request[EXCHANGE_KEY] = created
    return created
