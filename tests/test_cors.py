"""CORS for browser registry UIs on other origins (docker-registry-ui), with the real registry."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest

from proxy.config import ConfigError, describe, load_config
from tests.support import (
    OCI_MANIFEST,
    Proxy,
    Registry,
    basic_auth,
    call,
    fake_upstream,
    free_port,
    push_image,
    wait_until,
)

UI = "https://ui.example.com"
OTHER = "https://evil.example.net"
RULES = (
    "[{users: [alice], repositories: ['**'], actions: [pull, push, delete, catalog]},"
    " {users: [bob], repositories: ['**'], actions: [pull]}]"
)
EXPOSED = {"docker-content-digest", "link", "location", "docker-distribution-api-version"}


@pytest.fixture(scope="module")
def cors_proxy(
    registry: Registry, htpasswd_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """The proxy in front of the real registry, with UI listed (as the environment's YAML list)."""
    server = Proxy(
        tmp_path_factory.mktemp("cors"),
        registry.url,
        htpasswd_file,
        {"PROXY_CORS_ORIGINS": f"[{UI}]", "PROXY_ACCESS": RULES},
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def alice(users: dict[str, str]) -> dict[str, str]:
    return basic_auth("alice", users["alice"])


def cors_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("access-control-")}


def listed(items: str) -> set[str]:
    return {item.strip().lower() for item in items.split(",")}


def assert_shared_with_ui(headers: Mapping[str, str]) -> None:
    """The answer is readable by UI's script, with credentials, and says it varies by Origin."""
    found = cors_headers(headers)
    assert found["access-control-allow-origin"] == UI
    assert found["access-control-allow-credentials"] == "true"
    assert EXPOSED | {"www-authenticate"} <= listed(found["access-control-expose-headers"])
    assert "origin" in listed(headers["Vary"])


def preflight(url: str, origin: str, method: str, headers: str) -> tuple[int, dict[str, str]]:
    """What a browser sends before a cross-origin request with `headers`: no credentials."""
    status, reply, _ = call(
        url,
        "OPTIONS",
        {
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )
    return status, reply


def assert_never_reached(
    registry: Registry, target: str, proxy: Proxy, auth: Mapping[str, str]
) -> None:
    """No request for `target` reached the registry (it logs OPTIONS too, in order)."""
    sentinel = f"/v2/sentinel-{uuid.uuid4().hex}/tags/list"
    assert call(proxy.url + sentinel, headers=auth)[0] == 404
    wait_until(lambda: sentinel in registry.requested_uris(), "the sentinel in the registry log")
    assert target not in registry.requested_uris()


@pytest.mark.system
def test_docker_registry_ui_deletes_a_manifest_from_a_listed_origin(
    cors_proxy: Proxy, registry: Registry, alice: dict[str, str]
) -> None:
    """Guards the preflight of a listed origin answered 401 (asking credentials a browser never
    sends on it) or forwarded upstream, and the DELETE's answer unreadable by the UI."""
    repo = f"cors-{uuid.uuid4().hex}"
    digest = push_image(registry.url, repo)
    url = f"{cors_proxy.url}/v2/{repo}/manifests/{digest}"

    status, reply = preflight(url, UI, "DELETE", "authorization")
    assert status == 204
    assert_shared_with_ui(reply)
    found = cors_headers(reply)
    assert {"GET", "HEAD", "DELETE", "POST", "PUT", "PATCH"} <= {
        m.upper() for m in listed(found["access-control-allow-methods"])
    }
    allowed_headers = listed(found["access-control-allow-headers"])
    assert {"authorization", "accept", "content-type", "cache-control"} <= allowed_headers
    assert 0 < int(found["access-control-max-age"]) <= 7200
    assert "WWW-Authenticate" not in reply
    assert_never_reached(registry, f"/v2/{repo}/manifests/{digest}", cors_proxy, alice)

    status, reply, body = call(url, "DELETE", {**alice, "Origin": UI})
    assert status == 202, body
    assert_shared_with_ui(reply)
    assert call(url, headers={**alice, "Accept": OCI_MANIFEST})[0] == 404


@pytest.mark.system
def test_a_listed_origin_reads_manifests_and_blobs(
    cors_proxy: Proxy, registry: Registry, alice: dict[str, str]
) -> None:
    """Guards answers forwarded from the registry (the manifest, a blob by the fast path)
    without the listed origin's CORS headers, or with the digest hidden from its script."""
    repo = f"cors-{uuid.uuid4().hex}"
    digest = push_image(registry.url, repo)
    status, _ = preflight(
        f"{cors_proxy.url}/v2/{repo}/manifests/v1", UI, "GET", "accept,authorization"
    )
    assert status == 204

    status, reply, body = call(
        f"{cors_proxy.url}/v2/{repo}/manifests/v1",
        headers={**alice, "Origin": UI, "Accept": OCI_MANIFEST},
    )
    assert status == 200
    assert reply["Docker-Content-Digest"] == digest
    assert_shared_with_ui(reply)

    config_digest = json.loads(body)["config"]["digest"]
    status, reply, _ = call(
        f"{cors_proxy.url}/v2/{repo}/blobs/{config_digest}", headers={**alice, "Origin": UI}
    )
    assert status == 200
    assert_shared_with_ui(reply)


@pytest.mark.system
def test_the_proxys_own_refusals_are_readable_by_a_listed_origin(
    cors_proxy: Proxy, users: dict[str, str]
) -> None:
    """Guards a 401 or 403 the UI cannot read (a browser hides an answer without CORS headers),
    so it cannot tell "sign in" from "not allowed" from a network error."""
    url = f"{cors_proxy.url}/v2/cors-{uuid.uuid4().hex}/manifests/v1"
    status, reply, _ = call(url, headers={"Origin": UI})
    assert status == 401
    assert reply["WWW-Authenticate"].startswith("Basic ")
    assert_shared_with_ui(reply)

    status, reply, _ = call(url, "DELETE", {**basic_auth("bob", users["bob"]), "Origin": UI})
    assert status == 403
    assert_shared_with_ui(reply)


@pytest.mark.system
def test_an_unlisted_origin_gets_no_cors_headers_and_its_preflight_meets_the_gate(
    cors_proxy: Proxy, registry: Registry, alice: dict[str, str]
) -> None:
    """Guards CORS headers for any origin (another site's script reading the API with the
    user's cached credentials) and a preflight answered without credentials for it."""
    repo = f"cors-{uuid.uuid4().hex}"
    push_image(registry.url, repo)
    url = f"{cors_proxy.url}/v2/{repo}/manifests/v1"
    status, reply = preflight(url, OTHER, "DELETE", "authorization")
    assert status == 401
    assert reply["WWW-Authenticate"].startswith("Basic ")
    assert cors_headers(reply) == {}

    status, reply, _ = call(url, headers={**alice, "Origin": OTHER, "Accept": OCI_MANIFEST})
    assert status == 200
    assert cors_headers(reply) == {}
    # Nor does the listed origin's preflight open anything outside the API.
    status, reply = preflight(f"{cors_proxy.url}/ui/", UI, "GET", "authorization")
    assert status == 401
    assert cors_headers(reply) == {}


UPSTREAM_CORS = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nAccess-Control-Allow-Origin: *\r\nVary: Accept\r\n"
    b"Access-Control-Allow-Methods: GET\r\nAccess-Control-Allow-Credentials: false\r\n\r\n{}"
)


@pytest.mark.system
async def test_the_upstreams_cors_headers_give_way_to_the_proxys(
    htpasswd_file: Path, tmp_path: Path, users: dict[str, str]
) -> None:
    """Guards a registry's own Access-Control-* headers (its `http.headers`) reaching browsers
    next to ours: `*` would open the API to every origin, a second Allow-Origin breaks it; and
    the registry's own Vary lost to ours."""
    requests: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            requests.append(head)
            writer.write(UPSTREAM_CORS)
            await writer.drain()

    async with fake_upstream(answer) as upstream:
        server = Proxy(tmp_path, upstream, htpasswd_file, {"PROXY_CORS_ORIGINS": UI})
        await asyncio.to_thread(server.start)
        try:
            auth = basic_auth("alice", users["alice"])
            async with aiohttp.ClientSession() as session:
                url = f"{server.url}/v2/app/tags/list"
                async with session.get(url, headers={**auth, "Origin": UI}) as response:
                    assert response.status == 200
                    assert response.headers.getall("Access-Control-Allow-Origin") == [UI]
                    assert response.headers["Access-Control-Allow-Credentials"] == "true"
                    assert "Access-Control-Allow-Methods" not in response.headers
                    assert listed(response.headers["Vary"]) == {"accept", "origin"}
                async with session.get(url, headers={**auth, "Origin": OTHER}) as response:
                    assert response.status == 200
                    assert cors_headers(response.headers) == {}
                asked = {"Origin": UI, "Access-Control-Request-Method": "GET"}
                async with session.options(url, headers=asked) as response:
                    assert response.status == 204
                    assert response.headers.getall("Access-Control-Allow-Origin") == [UI]
                    methods = response.headers.getall("Access-Control-Allow-Methods")
                    assert len(methods) == 1 and "DELETE" in methods[0]
                # A later request on the same connection shows the preflight never went up.
                async with session.get(url, headers=auth) as response:
                    assert response.status == 200
            assert not [head for head in requests if head.startswith(b"OPTIONS ")]
        finally:
            await asyncio.to_thread(server.stop)


def test_origins_from_the_environment_are_a_yaml_list_normalised_as_browsers_send_them() -> None:
    """Guards PROXY_CORS_ORIGINS read as one string, and origins compared as written: a browser
    sends `https://ui.example.com`, never `HTTPS://UI.Example.com:443/`."""
    given = "[HTTPS://UI.Example.com:443/, 'http://[::1]:8080', http://ci.example.com:80]"
    config = load_config(None, {"PROXY_HTPASSWD": "/h", "PROXY_CORS_ORIGINS": given})
    expected = ("https://ui.example.com", "http://[::1]:8080", "http://ci.example.com")
    assert config.cors_origins == expected
    assert describe(config)["cors_origins"] == list(expected)
    assert load_config(None, {"PROXY_HTPASSWD": "/h"}).cors_origins == ()


@pytest.mark.parametrize(
    "origin",
    ["*", "https://*.example.com", "https://ui.example.com/app", "ui.example.com",
     "ftp://ui.example.com", "https://user@ui.example.com", "https://ui.example.com:99999",
     "https://ui.example.com?x=1", "null"],
)  # fmt: skip
def test_an_origin_that_no_browser_sends_is_refused_at_load_naming_the_line(
    tmp_path: Path, origin: str
) -> None:
    """Guards an origin that can never match (a path, no scheme) or that opens the API to
    every site (`*`, with credentials allowed) accepted silently."""
    config = tmp_path / "proxy.yml"
    config.write_text(
        f"htpasswd: /h\ncors_origins:\n  - https://ok.example.com\n  - {json.dumps(origin)}\n"
    )
    with pytest.raises(ConfigError, match=rf"^{config}:2: cors_origins: expected"):
        load_config(config, {})


@pytest.mark.system
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_wildcard_origin_exits_2_naming_the_key(
    tmp_path: Path, htpasswd_file: Path, command: str
) -> None:
    """Guards `*` with credentials allowed (any site reading the API as the user) starting."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy", command],
        env={"PATH": "/usr/bin:/bin", "PROXY_HTPASSWD": str(htpasswd_file),
             "PROXY_CORS_ORIGINS": '["*"]', "PROXY_LISTEN": f"127.0.0.1:{free_port()}",
             "PROXY_ADMIN_LISTEN": ""},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "environment PROXY_CORS_ORIGINS: cors_origins:" in result.stderr
    assert "'*'" in result.stderr
