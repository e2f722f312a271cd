"""The private aiohttp and asyncio names the edge relies on, in lists, and the start-up check.

aiohttp offers no public way to cap a request head, answer its parse errors in our format, or
know which parser it picked; asyncio none to size a TLS connection's read buffer or to start
TLS on a connection it has accepted plain. These names do it. Each use in proxy/edge says why
it is needed; pyproject.toml keeps aiohttp below the next minor, which may move them, and the
check runs at start on whichever Python serves.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import platform
import ssl
from asyncio import sslproto

import aiohttp

# (module, attribute path): every private aiohttp name used under proxy/edge.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    # The parse error queued in place of a request (connection.py answers a 431 with it).
    ("aiohttp.web_protocol", "_ErrInfo"),
    # The handler's queue of parsed heads, its waiter on that queue, and its count of heads.
    ("aiohttp.web_protocol", "RequestHandler._messages"),
    ("aiohttp.web_protocol", "RequestHandler._waiter"),
    ("aiohttp.web_protocol", "RequestHandler._request_count"),
    # Where one request is handled, from its head until its response is written.
    ("aiohttp.web_protocol", "RequestHandler._handle_request"),
    # Whether the parser stopped at an Upgrade request; the read hold flow control respects.
    ("aiohttp.base_protocol", "BaseProtocol._upgraded"),
    ("aiohttp.base_protocol", "BaseProtocol._pause_reading_for_buffer"),
    # The step where a response's headers are final (the banner is dropped there).
    ("aiohttp.web_response", "StreamResponse._prepare_headers"),
    # The C parser's module (listen.py tells it from the pure-Python one by this name).
    ("aiohttp._http_parser", "HttpRequestParser"),
)

# (module, attribute path): every private asyncio name used under proxy/edge (tls.py).
ASYNCIO_PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    # asyncio's TLS layer (tls.py subclasses it) and the size of its read buffer.
    ("asyncio.sslproto", "SSLProtocol.max_size"),
)
# The keywords tls.py gives SSLProtocol (a server-side layer with a handshake deadline).
SSL_PROTOCOL_KEYWORDS = ("server_side", "ssl_handshake_timeout")
# What an SSLProtocol reads into (a bytearray of max_size, and its memoryview): tls.py sizes it.
SSL_PROTOCOL_BUFFER = ("_ssl_buffer", "_ssl_buffer_view")


class MissingInternal(Exception):
    """This aiohttp lacks a private name the edge relies on; the message names it."""


def _exists(module_name: str, path: str) -> bool:
    try:
        target: object = importlib.import_module(module_name)
    except ImportError:
        return False
    for part in path.split("."):
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


def require_private_names() -> None:
    """Raise MissingInternal naming the first private name of PRIVATE_NAMES this aiohttp
    lacks, or of ASYNCIO_PRIVATE_NAMES this Python lacks."""
    for module_name, path in PRIVATE_NAMES:
        if not _exists(module_name, path):
            raise MissingInternal(
                f"aiohttp {aiohttp.__version__} has no {module_name}.{path}, which the proxy "
                "relies on; install aiohttp>=3.14.4,<3.15"
            )
    python = f"Python {platform.python_version()}"
    for module_name, path in ASYNCIO_PRIVATE_NAMES:
        if not _exists(module_name, path):
            raise MissingInternal(
                f"{python} has no {module_name}.{path}, which the proxy relies on"
            )
    parameters = inspect.signature(sslproto.SSLProtocol.__init__).parameters
    for keyword in SSL_PROTOCOL_KEYWORDS:
        if keyword not in parameters:
            raise MissingInternal(
                f"{python}'s asyncio.sslproto.SSLProtocol takes no {keyword}, which the proxy "
                "relies on"
            )
    missing = _missing_buffer_names()
    if missing:
        raise MissingInternal(
            f"{python}'s asyncio.sslproto.SSLProtocol has no {missing}, which the proxy relies on"
        )


def _missing_buffer_names() -> str | None:
    """The first of SSL_PROTOCOL_BUFFER a new server-side SSLProtocol lacks, if any."""
    loop = asyncio.new_event_loop()
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        waiter = None
        layer = sslproto.SSLProtocol(loop, asyncio.Protocol(), context, waiter, server_side=True)  # type: ignore[arg-type]
        # Ended as if its connection was lost, so it leaves no "unclosed transport" warning.
        layer.connection_lost(None)
    finally:
        loop.close()
    buffer, view = (getattr(layer, name, None) for name in SSL_PROTOCOL_BUFFER)
    if not isinstance(buffer, bytearray) or len(buffer) != sslproto.SSLProtocol.max_size:
        return SSL_PROTOCOL_BUFFER[0]
    if not isinstance(view, memoryview) or view.obj is not buffer:
        return SSL_PROTOCOL_BUFFER[1]
    return None
