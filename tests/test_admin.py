"""The admin listener, in one process and in the workers' supervising parent."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support import Proxy, Registry, call, http_status, wait_until


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
