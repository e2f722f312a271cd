"""PROXY protocol v1 and v2 on the public listener: the balancer names the real client.

HAProxy's doc/proxy-protocol.txt: the header comes first on the connection, before TLS, and only
trusted peers may send it; anything else is dropped without an answer. The header is read on
the raw socket with MSG_PEEK, so not one byte past it is consumed: what follows (a TLS
ClientHello or an HTTP request) is left in the kernel for the transport made afterwards.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.config import Network

log = logging.getLogger("registry_proxy.proxy_protocol")

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The longest v1 line (an UNKNOWN line with IPv6 addresses) is 107 bytes with its CRLF.
_V1_MAX = 107
# v2 headers are 16 bytes plus addresses and TLVs; balancers send well under this.
MAX_HEADER = 4096
# The spec asks receivers to wait at least 3 s (one TCP retransmit) for the header.
HEADER_DEADLINE = 5.0

REJECT_REASONS = ("untrusted_peer", "invalid_header", "timeout", "closed")
# Transport extra info: True when the header named nobody (LOCAL, UNKNOWN, UNSPEC), so the peer
# is still the balancer but what follows is a client's own bytes (forwarding headers included).
NAMED_NOBODY = "proxy_protocol_named_nobody"

Address = tuple[str, int]
# Takes a connection once its header is read (still plain: TLS, if any, follows), with what
# makes its transports name the client.
Enter = Callable[[asyncio.Transport, Callable[[asyncio.Transport], asyncio.Transport]], None]


class ProxyProtocolError(Exception):
    """A header that does not follow the spec (the connection is dropped)."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer said; `source` is None for LOCAL, UNKNOWN and non-IP families."""

    source: Address | None
    length: int


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError(f"bad address {text[:64]!r}") from None
    if address.version != version or (
        isinstance(address, ipaddress.IPv6Address) and address.scope_id
    ):
        raise ProxyProtocolError(f"bad address {text[:64]!r}")
    return str(address)


def _v1_port(text: bytes) -> int:
    # Decimal without leading zeros (the spec forbids them), 0 to 65535.
    if not text.isdigit() or (len(text) > 1 and text.startswith(b"0")) or int(text) > 65535:
        raise ProxyProtocolError(f"bad port {text[:16]!r}")
    return int(text)


def _parse_v1(buffer: bytes) -> ProxyHeader | None:
    end = buffer.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(buffer) >= _V1_MAX:
            raise ProxyProtocolError("v1 line without CRLF in 107 bytes")
        if b"\n" in buffer or b"\r" in buffer[:-1]:
            raise ProxyProtocolError("v1 line ends without CRLF")
        return None
    line = buffer[len(V1_PREFIX) : end]
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        # The receiver must ignore the rest of an UNKNOWN line.
        return ProxyHeader(None, end + 2)
    fields = line.split(b" ")
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"bad v1 line {buffer[:end][:120]!r}")
    version = 4 if fields[0] == b"TCP4" else 6
    source = _v1_address(fields[1], version)
    _v1_address(fields[2], version)
    port = _v1_port(fields[3])
    _v1_port(fields[4])
    return ProxyHeader((source, port), end + 2)


def _parse_v2(buffer: bytes) -> ProxyHeader | None:
    if len(buffer) < 16:
        return None
    version_command, family_protocol, length = struct.unpack("!BBH", buffer[12:16])
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"v2 version {version_command >> 4}")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyProtocolError(f"v2 command {command}")
    total = 16 + length
    if total > MAX_HEADER:
        raise ProxyProtocolError(f"v2 header of {total} bytes")
    if len(buffer) < total:
        return None
    family, protocol = family_protocol >> 4, family_protocol & 0x0F
    if family > 3 or protocol > 2:
        raise ProxyProtocolError(f"v2 family/protocol {family_protocol:#04x}")
    if command == 0:
        # LOCAL: the balancer's own connection (a health check); the block is ignored.
        return ProxyHeader(None, total)
    if protocol == 2:
        raise ProxyProtocolError("v2 DGRAM on a stream connection")
    block = buffer[16:total]
    # TLVs after the addresses are skipped: nothing in them is needed here.
    if family == 1 and protocol == 1:
        if len(block) < 12:
            raise ProxyProtocolError("v2 TCP4 block too short")
        source = str(ipaddress.IPv4Address(block[0:4]))
        return ProxyHeader((source, struct.unpack("!H", block[8:10])[0]), total)
    if family == 2 and protocol == 1:
        if len(block) < 36:
            raise ProxyProtocolError("v2 TCP6 block too short")
        address = ipaddress.IPv6Address(block[0:16])
        mapped = address.ipv4_mapped
        source = str(mapped if mapped is not None else address)
        return ProxyHeader((source, struct.unpack("!H", block[32:34])[0]), total)
    # UNSPEC, AF_UNIX or an UNSPEC protocol: the real connection's endpoints count.
    return ProxyHeader(None, total)


def parse_header(buffer: bytes) -> ProxyHeader | None:
    """The header at the start of `buffer`, or None when every byte so far belongs to a header
    that is not complete yet; ProxyProtocolError when it cannot be one."""
    if buffer[:12] == V2_SIGNATURE[: len(buffer)]:
        return _parse_v2(buffer)
    if buffer[:6] == V1_PREFIX[: len(buffer)]:
        return None if len(buffer) < len(V1_PREFIX) else _parse_v1(buffer)
    raise ProxyProtocolError(f"no PROXY header: {buffer[:16]!r}")


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def read_header(sock: socket.socket) -> ProxyHeader:
    """Consume exactly the header from `sock` (non-blocking), leaving what follows unread."""
    consumed = b""
    while True:
        await _readable(sock)
        try:
            peeked = sock.recv(MAX_HEADER - len(consumed), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not peeked:
            raise ConnectionResetError("closed before the end of the PROXY header")
        header = parse_header(consumed + peeked)
        take = len(peeked) if header is None else header.length - len(consumed)
        # The bytes are in the socket buffer (peeked), so this returns them all at once.
        taken = sock.recv(take)
        if len(taken) != take:
            raise ConnectionResetError("socket buffer shrank under MSG_PEEK")
        consumed += taken
        if header is not None:
            return header
        if len(consumed) >= MAX_HEADER:
            raise ProxyProtocolError(f"no complete header in {MAX_HEADER} bytes")


class AddressedTransport(asyncio.Transport):
    """A transport that reports the client the PROXY header named as its peer.

    Everything that asks for `peername` (aiohttp's `request.remote`, so the throttle, the access
    log and X-Forwarded-For, and the per-client connection limit at accept) sees
    the client instead of the balancer; `balancer` keeps the socket's own peer.
    """

    def __init__(
        self, transport: asyncio.Transport, client: Address, balancer: Any, *, named: bool = True
    ) -> None:
        super().__init__()
        self._transport = transport
        self._own = {"peername": client, "balancer": balancer, NAMED_NOBODY: not named}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._own:
            return self._own[name]
        return self._transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()


def addressing(header: ProxyHeader) -> Callable[[asyncio.Transport], asyncio.Transport]:
    """Wraps a transport of this connection to report the client `header` named as its peer."""

    def wrap(transport: asyncio.Transport) -> asyncio.Transport:
        peer = transport.get_extra_info("peername")
        if header.source is not None:
            return AddressedTransport(transport, header.source, peer)
        return AddressedTransport(transport, peer, peer, named=False)

    return wrap


class _Entering(asyncio.Protocol):
    """The new transport, after the header, handed to `enter` with the header's wrapping."""

    def __init__(self, enter: Enter, header: ProxyHeader) -> None:
        self._enter = enter
        self._header = header

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._enter(transport, addressing(self._header))


def _is_trusted(peer: Any, trusted: Sequence[Network]) -> bool:
    if not isinstance(peer, tuple):
        return False
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped if mapped is not None else address
    return any(address in network for network in trusted)


class _Dropped(asyncio.Protocol):
    """The listener's transport, given up at once: the socket moves to the header reader."""


class ProxyProtocolListener:
    """Protocol factory for `create_server`: checks the peer, reads the header, then hands the
    connection, still plain, to `enter` (which counts it, and starts TLS when it is set)."""

    def __init__(
        self,
        enter: Enter,
        trusted: Sequence[Network],
        on_rejected: Callable[[str], None],
        deadline: float = HEADER_DEADLINE,
    ) -> None:
        self._enter = enter
        self._trusted = tuple(trusted)
        self._on_rejected = on_rejected
        self._deadline = deadline
        self._pending: set[asyncio.Task[None]] = set()

    def __call__(self) -> asyncio.BaseProtocol:
        listener = self

        class _Accepted(_Dropped):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                listener._accepted(transport)

        return _Accepted()

    def _accepted(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        if not _is_trusted(peer, self._trusted):
            transport.abort()
            self._on_rejected("untrusted_peer")
            return
        # A duplicate of the socket outlives the transport, which would read past the header.
        sock = transport.get_extra_info("socket").dup()
        sock.setblocking(False)
        transport.abort()
        task = asyncio.get_running_loop().create_task(self._serve(sock, peer))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _serve(self, sock: socket.socket, peer: Any) -> None:
        try:
            async with asyncio.timeout(self._deadline):
                header = await read_header(sock)
        except (TimeoutError, ProxyProtocolError, OSError) as exc:
            reason = {TimeoutError: "timeout", ProxyProtocolError: "invalid_header"}.get(
                type(exc), "closed"
            )
            log.info("PROXY header from %s refused (%s): %s", peer[0], reason, exc)
            self._on_rejected(reason)
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: _Entering(self._enter, header), sock)
        except OSError as exc:
            log.debug("connection from %s failed after its PROXY header: %s", peer[0], exc)
            sock.close()

    def close(self) -> None:
        """Drop connections still sending their header (the listener is closing)."""
        for task in list(self._pending):
            task.cancel()
