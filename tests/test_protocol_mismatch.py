"""A client speaking the wrong protocol for the listener is told so, and the operator sees it.

Class: silent or misleading answers to a scheme mix-up. HTTPS sent to a plain-HTTP listener
(docker's first bytes are a TLS ClientHello) is counted as `tls_on_plain_http`, not lost among
malformed requests; plain HTTP sent to the TLS listener gets nginx's plain-text 400 instead of a
closed connection.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import trustme

from tests.support import (
    Proxy,
    Registry,
    access_records,
    call,
    scrape,
    value,
    wait_until,
    write_certificate,
)


def client_hello() -> bytes:
    """The first bytes an HTTPS client sends: a TLS ClientHello, made by Python's OpenSSL."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def answer_to(port: int, data: bytes) -> bytes:
    """Everything the listener sends back to `data` until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def decisions(proxy: Proxy) -> list[object]:
    return [record["decision"] for record in access_records(proxy.log())]


def test_a_tls_handshake_on_the_plain_listener_has_its_own_refusal_reason(
    registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards an HTTPS client on the plain-HTTP port logged and counted as `bad_request`, the
    same as any malformed request, so nothing tells the operator which mistake clients make."""
    proxy = start_proxy(registry.url)
    hello = client_hello()
    assert hello[:2] == b"\x16\x03"
    assert answer_to(proxy.port, hello).startswith(b"HTTP/1.0 400 ")
    wait_until(lambda: "tls_on_plain_http" in decisions(proxy), "the access record")
    samples = scrape(proxy)
    assert value(samples, "registry_proxy_refusals_total", reason="tls_on_plain_http") == 1
    # A request that is merely malformed is still a bad request.
    answer_to(proxy.port, b"\x01\x02 nonsense\r\n\r\n")
    wait_until(lambda: "bad_request" in decisions(proxy), "the second access record")
    assert decisions(proxy).count("tls_on_plain_http") == 1


def test_plain_http_on_the_tls_listener_gets_a_plain_text_400(
    registry: Registry, start_proxy: Callable[..., Proxy], ca: trustme.CA, tmp_path: Path
) -> None:
    """Guards plain HTTP sent to the TLS port answered by a silent close: curl said "Empty reply
    from server" and docker "EOF", neither naming the mix-up. nginx's words now, then a close;
    the listener keeps serving TLS."""
    write_certificate(ca, tmp_path)
    proxy = start_proxy(
        registry.url,
        PROXY_TLS_CERT=str(tmp_path / "cert.pem"),
        PROXY_TLS_KEY=str(tmp_path / "key.pem"),
    )
    answer = answer_to(proxy.port, b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"Content-Type: text/plain" in head
    assert body == b"400 The plain HTTP request was sent to HTTPS port\n"

    curl = subprocess.run(
        ["curl", "-sS", f"http://127.0.0.1:{proxy.port}/v2/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert curl.stdout == "400 The plain HTTP request was sent to HTTPS port\n", curl.stderr

    context = ssl.create_default_context()
    ca.configure_trust(context)
    assert call(proxy.url + "/v2/", context=context)[0] == 401
