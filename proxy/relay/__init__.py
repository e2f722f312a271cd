"""Relaying an admitted request to the registry and its answer back, streaming both bodies.

`forward.py` is the general relay; `blob.py` the fast path for blob GETs; `headers.py` decides
which headers cross and builds the upstream URL; `slots.py` shares the upstream connections
fairly between users; `failure.py` turns an upstream failure into the client's answer.
"""

from proxy.relay.blob import BlobRelay
from proxy.relay.failure import UPSTREAM_ERRORS, UpstreamFailures
from proxy.relay.forward import Fetched, Forwarder, create_session
from proxy.relay.slots import UpstreamSlots

__all__ = [
    "UPSTREAM_ERRORS",
    "BlobRelay",
    "Fetched",
    "Forwarder",
    "UpstreamFailures",
    "UpstreamSlots",
    "create_session",
]
