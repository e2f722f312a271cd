"""The admin listener, in one process and in the workers' supervising parent."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Proxy, Registry, call, http_status, push_blob, wait_until
from tests.support import basic_auth as basic


@pytest.mark.parametrize("workers", ["1", "2"])
def test_admin_answers_without_a_server_banner(
    registry: Registry, start_proxy: Callable[..., Proxy], workers: str
) -> None:
    """Guards against version disclosure on the admin listener, the supervisor's included."""
    proxy = start_proxy(registry.url, PROXY_WORKERS=workers)
    wait_until(lambda: http_status(proxy.admin_url + "/readyz") == 200, "the proxy to be ready")
    for path, expected in [("/healthz", 200), ("/readyz", 200), ("/metrics", 200), ("/x", 404)]:
        status, headers, _ = call(proxy.admin_url + path)
        assert status == expected, path
        assert "Server" not in headers, (path, headers)


def in_use(proxy: Proxy) -> float:
    """`upstream_connections_in_use` as /metrics shows it now."""
    _, _, body = call(proxy.admin_url + "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "registry_proxy_upstream_connections_in_use":
                return sample.value
    raise AssertionError("no registry_proxy_upstream_connections_in_use")


@pytest.mark.parametrize("fast", ["true", "false"], ids=["fast", "normal"])
def test_pool_gauge_counts_a_download_in_flight(
    registry: Registry, start_proxy: Callable[..., Proxy], users: dict[str, str], fast: str
) -> None:
    """Guards the gauge against missing the blob fast path, which bypasses aiohttp's pool."""
    proxy = start_proxy(registry.url, PROXY_FAST_BLOB_RELAY=fast)
    repo = f"gauge/{uuid.uuid4().hex[:8]}"
    # Larger than every socket buffer on the way: the transfer stays open while unread.
    digest = push_blob(registry.url, repo, os.urandom(32 << 20))
    assert in_use(proxy) == 0
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(
            f"GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: {proxy.host}\r\n"
            f"Authorization: {basic('alice', users['alice'])['Authorization']}\r\n\r\n".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert in_use(proxy) == 1
    wait_until(lambda: in_use(proxy) == 0, "the slot to be given back")
