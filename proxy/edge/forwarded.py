"""Who the client is behind trusted proxies: X-Forwarded-For read from the right.

Each trusted proxy appends the address of its own peer, so the chain is read from the socket
peer leftwards, and the first address that is not one of our proxies is the client. Anything to
its left was written by the client and is never looked at.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from proxy.config import Network


class MalformedHop(ValueError):
    """A hop a trusted proxy passed on that is no address: the chain cannot be read."""


def _port(text: str) -> bool:
    # ASCII only: str.isdigit takes `²` (int() then raises) and int() reads other scripts' digits.
    return text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536


def canonical_address(text: str) -> str | None:
    """The IP in one hop, in canonical form, or None for anything else.

    `IP`, `IP:port`, `[v6]` and `[v6]:port` are the IP; an IPv4-mapped IPv6 address is the IPv4
    one; zone ids (`fe80::1%eth0`), names, `unknown` and obfuscated ids are not addresses.
    """
    hop = text.strip()
    if hop.startswith("["):
        inside, bracket, rest = hop[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and _port(rest[1:]))):
            return None
        candidate, version = inside, 6
    elif hop.count(":") == 1:
        candidate, _, port = hop.partition(":")
        if not _port(port):
            return None
        version = 4
    else:
        candidate, version = hop, 0
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    if version and ip.version != version:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return None
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
    return str(ip)


def is_trusted(address: str, networks: Sequence[Network]) -> bool:
    """True when `address` (canonical) is inside one of `networks`."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def hops(values: Iterable[str]) -> list[str]:
    """The hops of every X-Forwarded-For header, in order; empty list elements are dropped."""
    return [hop.strip() for value in values for hop in value.split(",") if hop.strip()]


def forwarded_client(peer: str, chain: Sequence[str], trusted: Sequence[Network]) -> str:
    """The client's address: the rightmost hop not of a trusted proxy, or the peer itself.

    Raises MalformedHop when a hop that must be read (every hop to its right is a trusted
    proxy) is not an address: guessing there would let the client choose who it is.
    """
    client = canonical_address(peer) or peer
    if not is_trusted(client, trusted):
        return client
    for hop in reversed(chain):
        address = canonical_address(hop)
        if address is None:
            raise MalformedHop(hop)
        client = address
        if not is_trusted(address, trusted):
            break
    return client


def client_key(address: str) -> str:
    """What a client's connections are counted under: its IPv4 address (IPv4-mapped IPv6
    included) or its IPv6 /64, the usual allocation of one site."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
