"""A per-client limit is what one client gets on the host: each worker enforces its part."""

from __future__ import annotations


def worker_share(limit: int, workers: int) -> int:
    """One worker's part of a per-client `limit`: rounded down, so a client never exceeds
    `limit` on the host whichever workers take its requests, and at least one."""
    return max(1, limit // workers)
