"""What the proxy learns about one request: for auth, forwarding, the access log and metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from proxy.config import Network
from proxy.forwarded import MalformedHop, canonical_address, forwarded_client, hops, is_trusted
from proxy.paths import Target, classify

# Request key holding the Exchange.
EXCHANGE_KEY = "registry_proxy.exchange"


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
    # An X-Forwarded-For hop from a trusted proxy that is no address: the request is refused.
    malformed_hop: str | None = None


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


def exchange_of(request: web.BaseRequest, trusted: Sequence[Network] = ()) -> Exchange:
    """The request's Exchange, created on first use."""
    found = request.get(EXCHANGE_KEY)
    if isinstance(found, Exchange):
        return found
    client, scheme, malformed = _client_and_scheme(request, trusted)
    created = Exchange(client=client, scheme=scheme, target=classify(request.raw_path))
    created.malformed_hop = malformed
    request[EXCHANGE_KEY] = created
    return created
