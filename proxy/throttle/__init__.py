"""The password-guessing throttle: its policy, and the stores that keep its counts (and the
browser's signed-out sessions, shared the same way).

`policy.py` takes a failure budget before each hash; `store.py` is the store interface and the
in-process store; `supervisor.py` shares one store among the workers of a host; `redis.py`
shares one across proxy tasks; `fallback.py` chains them, falling back while one is away, and
`store_chain` builds, watches and closes that chain for the life of a proxy.
"""

from proxy.throttle.fallback import FallbackStore, build_store, store_chain
from proxy.throttle.policy import Throttle, Throttled

__all__ = ["FallbackStore", "Throttle", "Throttled", "build_store", "store_chain"]
