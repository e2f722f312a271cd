"""The edge: listening sockets and client connections, before any request is read.

`listen.py` binds the public listener; `admission.py` counts each connection from its accept
(in all and per client), before TLS; `proxy_protocol.py` reads the balancer's PROXY header;
`tls.py` builds the server context and starts TLS on admitted connections;
`connection.py` is aiohttp's request handler with the deadlines and answers it lacks;
`open_connections.py` knows which connections are idle, for the drain; `forwarded.py` names
the real client behind trusted proxies; `client_slots.py` counts connections per client.
This is the only package that touches aiohttp (and asyncio) internals; `internals.py` lists them.
"""

from proxy.edge.client_slots import ClientSlots
from proxy.edge.forwarded import client_key
from proxy.edge.internals import MissingInternal, require_private_names
from proxy.edge.listen import Listener, c_parser_in_use, listen
from proxy.edge.open_connections import OpenConnections
from proxy.edge.tls import server_context

__all__ = [
    "ClientSlots",
    "Listener",
    "MissingInternal",
    "OpenConnections",
    "c_parser_in_use",
    "client_key",
    "listen",
    "require_private_names",
    "server_context",
]
