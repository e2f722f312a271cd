"""What an identity may do: access rules, immutable tags and the filtered catalog.

`rules.py` reads the `groups` and `access` settings and decides each request; `immutable.py`
reads `immutable_tags`. Both are pure and loaded with the configuration, so they are the face
exported here. `tag_guard.py` (`TagGuard`) enforces immutable tags by asking the registry, and
`catalog.py` lists only the repositories a user may pull: both talk to the registry through
`proxy.relay`, and are imported from their modules by the gate and the app.
"""

from proxy.access.immutable import ImmutableTags, parse_immutable_tags
from proxy.access.rules import AccessPolicy, RequestContext, authorize, parse_access

__all__ = [
    "AccessPolicy",
    "ImmutableTags",
    "RequestContext",
    "authorize",
    "parse_access",
    "parse_immutable_tags",
]
