"""The fast path's sockets to the upstream: opened on demand, kept idle for a while to reuse."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

# As long as aiohttp's connector keeps an idle connection (its keepalive_timeout), so the two
# relays hold idle connections alike; below nginx's (75 s) and AWS balancers' (60 s) idle
# timeouts. A server that closes sooner is seen at the next take (its FIN), so it costs a new
# connection, not a failed request.
IDLE_SECONDS = 15.0

_AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[str, int]]


class UpstreamConnections:
    """Keep-alive sockets to one upstream, at most `limit` of them idle.

    Each is taken by a request holding one of the upstream slots (proxy/relay/slots.py) and
    given back before the slot, and a new one is opened only when none is idle (or in place of
    a stale one): so the pool never holds more than were busy at once, nor more than the
    slots' total, its `limit`.
    """

    def __init__(self, host: str, port: int, *, limit: int, connect_timeout: float) -> None:
        self._host = host
        self._port = port
        # An address needs no resolver (asyncio's getaddrinfo is a thread-pool round trip).
        self._literal = _literal_address(host, port)
        self._limit = limit
        self._connect_timeout = connect_timeout
        # Insertion-ordered: the last one given back is taken first, the oldest expire.
        self._idle: dict[socket.socket, asyncio.TimerHandle] = {}
        self._closed = False

    async def take(self, *, reuse: bool = True) -> tuple[socket.socket, bool]:
        """An idle connection that still looks open (if `reuse`), else a new one; True if idle."""
        while reuse and self._idle:
            sock = next(reversed(self._idle))
            self._idle.pop(sock).cancel()
            if _still_open(sock):
                return sock, True
            sock.close()
        return await self.connect(), False

    async def connect(self) -> socket.socket:
        """A new connection; OSError or TimeoutError if none could be opened in time."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            infos = self._literal or await loop.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM
            )
            last: OSError | None = None
            for family, kind, proto, _, address in infos:
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, address)
                except OSError as exc:
                    sock.close()
                    last = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            raise last or OSError("no address")

    def give_back(self, sock: socket.socket) -> None:
        """Keep a connection whose response was read completely, if there is room; else close."""
        if self._closed or len(self._idle) >= self._limit:
            sock.close()
            return
        loop = asyncio.get_running_loop()
        self._idle[sock] = loop.call_later(IDLE_SECONDS, self._expire, sock)

    def close(self) -> None:
        """Close every idle connection; those in use are closed by their requests."""
        self._closed = True
        for sock, timer in self._idle.items():
            timer.cancel()
            sock.close()
        self._idle.clear()

    def _expire(self, sock: socket.socket) -> None:
        if self._idle.pop(sock, None) is not None:
            sock.close()


def _still_open(sock: socket.socket) -> bool:
    """Nothing to read and no end of stream: a registry that closed it idle would show a FIN."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    # The end of the stream, or bytes nobody asked for: either way not reusable.
    return False


def _literal_address(host: str, port: int) -> list[_AddressInfo]:
    """getaddrinfo's answer for an IP address host, without asking it; empty for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return []
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
