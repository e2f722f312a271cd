"""The listener's open connections and which of them are in a request, for the drain."""

from __future__ import annotations

from typing import Protocol


class Closable(Protocol):
    """A connection the drain can close (aiohttp's request handler)."""

    def force_close(self) -> None: ...


class OpenConnections:
    """Connections between `connection_made` and `connection_lost`; `busy` while a request is
    being handled (from its head until its response is written), as uvicorn's ServerState."""

    def __init__(self) -> None:
        self._open: set[Closable] = set()
        self._busy: set[Closable] = set()

    @property
    def busy(self) -> int:
        return len(self._busy)

    def opened(self, connection: Closable) -> None:
        self._open.add(connection)

    def closed(self, connection: Closable) -> None:
        self._open.discard(connection)
        self._busy.discard(connection)

    def request_started(self, connection: Closable) -> None:
        self._busy.add(connection)

    def request_finished(self, connection: Closable) -> None:
        self._busy.discard(connection)

    def close_idle(self) -> int:
        """Close every connection not in a request (keep-alive ones waiting for the next);
        return how many."""
        idle = self._open - self._busy
        for connection in idle:
            connection.force_close()
        return len(idle)
