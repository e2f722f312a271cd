"""Connections counted from the moment they are accepted, in all and per client, before any
TLS work: a refused connection costs no handshake and no TLS buffer."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

from proxy.edge.client_slots import ClientSlots


class Refused(enum.Enum):
    """Why a connection was not admitted: every place taken, or its client's."""

    FULL = "max_connections"
    CLIENT_FULL = "max_connections_per_client"


class Ticket:
    """One admitted connection's places; `release` gives them back (once, however often called)."""

    __slots__ = ("_admission", "_key")

    def __init__(self, admission: Admission, key: str) -> None:
        self._admission: Admission | None = admission
        self._key = key

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.released(self._key)


class Admission:
    """Open connections, at most `limit` in all and `clients`' limit per client; each refusal
    is reported to `on_refused` (all places taken) or `on_client_refused` (the client's)."""

    def __init__(
        self,
        limit: int,
        on_refused: Callable[[], None],
        clients: ClientSlots | None = None,
        on_client_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self.limit = limit
        self.open = 0
        self._on_refused = on_refused
        self._clients = clients
        self._on_client_refused = on_client_refused

    def admit(self, transport: asyncio.BaseTransport) -> Ticket | Refused:
        """A ticket for the connection on `transport` (its peer is the client), or why not."""
        if self.open >= self.limit:
            self._on_refused()
            return Refused.FULL
        key = ""
        if self._clients is not None:
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else ""
            admitted = self._clients.admit(address)
            if admitted is None:
                self._on_client_refused()
                return Refused.CLIENT_FULL
            key = admitted
        self.open += 1
        return Ticket(self, key)

    def released(self, key: str) -> None:
        self.open -= 1
        if self._clients is not None:
            self._clients.release(key)
