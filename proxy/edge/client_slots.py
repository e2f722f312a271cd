"""Open connections per client address, so one client cannot hold every connection slot."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from proxy.config import Network
from proxy.edge.forwarded import client_key


class ClientSlots:
    """Open connections per client key, at most `limit` each; trusted proxies are not counted
    (their connections carry many clients)."""

    def __init__(self, limit: int, exempt: Sequence[Network] = ()) -> None:
        self.limit = limit
        self._exempt = tuple(exempt)
        self._open: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open_for(self, key: str) -> int:
        return self._open.get(key, 0)

    def admit(self, address: str) -> str | None:
        """Count a new connection from `address`: the key to release later, "" when not
        counted, or None when that client already holds `limit` connections."""
        if not address or self._is_exempt(address):
            return ""
        key = client_key(address)
        count = self._open.get(key, 0)
        if count >= self.limit:
            return None
        self._open[key] = count + 1
        return key

    def release(self, key: str) -> None:
        if not key:
            return
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def _is_exempt(self, address: str) -> bool:
        if not self._exempt:
            return False
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        return any(ip in network for network in self._exempt)
