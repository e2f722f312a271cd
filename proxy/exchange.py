"""What the proxy learns about one request: for auth, forwarding, the access log and metrics."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web

from proxy.config import Network
from proxy.edge.forwarded import MalformedHop, canonical_address, forwarded_client, hops, is_trusted
from proxy.edge.proxy_protocol import NAMED_NOBODY
from proxy.identity import AuthOutcome, Identity
from proxy.paths import Target, classify
from proxy.refusal import Refusal

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
    # The user name a refused login tried (never its password), for the audit line.
    tried_user: str | None = None
    # Set once authentication ran: its outcome, and the identity if one was established.
    auth_outcome: AuthOutcome | None = None
    identity: Identity | None = None
    # Seconds until a password-guessing block ends, when auth_outcome is "throttled".
    retry_after: float = 0.0
    # The query string to send upstream (access control may drop a mount or cap `n`).
    upstream_query: str | None = None
    upstream_status: int | None = None
    # An X-Forwarded-For hop from a trusted proxy that is no address: the request is refused.
    malformed_hop: str | None = None
    request_id: str = field(default_factory=new_request_id)
    # Why the proxy refused the request (None: it did not); `refusal_detail` says more, for the log.
    refusal: Refusal | None = None
    refusal_detail: str | None = None
    # Milliseconds from sending the request upstream to the upstream's response headers.
    upstream_ms: float | None = None
    # The request body, when the gate had to read it whole (a manifest PUT to an immutable tag).
    body: bytes | None = None
    # What a browser page did in the user's name (`login`, `delete`), for the audit line.
    event: str | None = None


def _client_and_scheme(
    request: web.BaseRequest, trusted: Sequence[Network]
) -> tuple[str, str, str | None]:
    """The client's address and scheme, and the malformed hop if the chain cannot be read;
    forwarding headers count only from a trusted peer."""
    peer = request.remote or ""
    scheme = request.scheme
    chain = hops(request.headers.getall("X-Forwarded-For", ()))
    try:
        client = forwarded_client(peer, chain, trusted)
    except MalformedHop as exc:
        return canonical_address(peer) or peer, scheme, str(exc)
    if not is_trusted(canonical_address(peer) or "", trusted):
        return client, scheme, None
    protos = [
        p.strip().lower()
        for v in request.headers.getall("X-Forwarded-Proto", ())
        for p in v.split(",")
    ]
    if protos and protos[-1] in ("http", "https"):
        scheme = protos[-1]
    return client, scheme, None


def _request_id(request: web.BaseRequest, trusted: Sequence[Network]) -> str:
    """A trusted proxy's well-formed X-Request-Id, else a fresh one."""
    given = request.headers.getall(REQUEST_ID_HEADER, ())
    trusted_peer = is_trusted(canonical_address(request.remote or "") or "", trusted)
    if trusted_peer and len(given) == 1 and _REQUEST_ID.fullmatch(given[0]):
        return given[0]
    return new_request_id()


# Request key holding the Exchange.
EXCHANGE_KEY = web.RequestKey("exchange", Exchange)


def exchange_of(request: web.BaseRequest, trusted: Sequence[Network] = ()) -> Exchange:
    """The request's Exchange, created on first use."""
    found = request.get(EXCHANGE_KEY)
    if isinstance(found, Exchange):
        return found
    if request.transport is not None and request.transport.get_extra_info(NAMED_NOBODY):
        # Behind a TCP balancer whose header named nobody, no proxy wrote the headers.
        trusted = ()
    client, scheme, malformed = _client_and_scheme(request, trusted)
    created = Exchange(
        client=client,
        scheme=scheme,
        target=classify(request.raw_path),
        malformed_hop=malformed,
        request_id=_request_id(request, trusted),
    )
    request[EXCHANGE_KEY] = created
    return created
