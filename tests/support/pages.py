"""The browser's pages driven over HTTP: a cookie-keeping client that submits their forms."""

from __future__ import annotations

import http.client
import re
from email.message import Message as HTTPMessage
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import quote, urlsplit

from tests.support.client import push_manifest
from tests.support.harness import Registry
from tests.support.proxy import Proxy

# The browser tests' rules: alice may do everything, bob pull team/** and list, carol pull
# team/app only (no catalog); team/lib's 1.* tags are immutable.
UI_RULES = (
    "[{users: [alice], repositories: ['**'], actions: [pull, push, delete, catalog]},"
    " {users: [bob], repositories: ['team/**'], actions: [pull, catalog]},"
    " {users: [carol], repositories: ['team/app'], actions: [pull]}]"
)
UI_IMMUTABLE = "[{repositories: ['team/lib'], tags: ['1.*']}]"
ANNOTATIONS = {"org.opencontainers.image.description": "<b>bold</b> & 'quoted'"}


def push_labelled(
    base: str,
    repo: str,
    tag: str,
    headers: dict[str, str],
    labels: dict[str, str] | None = None,
    created: str = "2026-11-30T12:34:56Z",
    annotations: dict[str, str] | None = None,
) -> str:
    """Push an image whose config carries `labels` and a created time; its manifest's digest."""
    config = {"architecture": "arm64", "os": "linux", "created": created,
              "config": {"Labels": labels or {}}}  # fmt: skip
    files = {"file.txt": f"{repo}:{tag}".encode()}
    chosen = ANNOTATIONS if annotations is None else annotations
    return push_manifest(base, repo, tag, headers, config, files, chosen)


class PageClient:
    """A cookie-keeping HTTP client that submits the pages' forms as a browser would."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.cookies: dict[str, str] = {}
        self.last_set_cookie: list[str] = []

    def request(
        self,
        path: str,
        method: str = "GET",
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], str]:
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        data = None
        if form is not None:
            data = "&".join(f"{k}={_quote(v)}" for k, v in form.items()).encode()
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
            sent.setdefault("Origin", self.base)
        status, answer, body = fetch(self.base + path, method, sent, data)
        self.last_set_cookie = answer.get_all("Set-Cookie") or []
        for line in self.last_set_cookie:
            for name, morsel in SimpleCookie(line).items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return status, dict(answer.items()), body.decode()

    def csrf(self, path: str = "/ui/login") -> str:
        status, _, page = self.request(path)
        assert status == 200, (status, page[:600])
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found, page
        return found[1]

    def sign_in(self, user: str, password: str) -> tuple[int, dict[str, str], str]:
        form = {"csrf": self.csrf(), "username": user, "password": password, "next": ""}
        return self.request("/ui/login", "POST", form)


def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, HTTPMessage, bytes]:
    """One request, redirects not followed (the pages answer with 303s)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=30)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.msg, response.read()
    finally:
        connection.close()


def _quote(value: str) -> str:
    return quote(value, safe="")


def signed_in(site: Proxy, user: str, password: str | None = None) -> PageClient:
    """A client signed in through the form (password `USER-pw` unless given)."""
    client = PageClient(site.url)
    status, headers, page = client.sign_in(user, password or f"{user}-pw")
    assert status == 303, page
    assert headers["Location"] == "/ui/"
    return client


def listed_repositories(page: str) -> list[str]:
    """The names in the repository page's list."""
    block = re.search(r'<ul id="repositories"[^>]*>(.*?)</ul>', page, re.S)
    return re.findall(r">([^<]+)</a></li>", block[1]) if block else []


def ui_env(key: Path, **env: str) -> dict[str, str]:
    """The settings of a proxy with the browser on, UI_RULES and UI_IMMUTABLE; `env` overrides."""
    return {
        "PROXY_UI": "true",
        "PROXY_UI_SESSION_KEY_FILE": str(key),
        "PROXY_ACCESS": UI_RULES,
        "PROXY_IMMUTABLE_TAGS": UI_IMMUTABLE,
        "PROXY_AUTH_MAX_FAILURES": "1000",
        "PROXY_AUTH_MAX_FAILURES_PER_USER": "1000",
        **env,
    }


def ui_proxy(root: Path, registry: Registry, passwords: Path, key: Path, **env: str) -> Proxy:
    """An unstarted proxy with `ui_env`'s settings (for a module's shared site)."""
    return Proxy(root, registry.url, passwords, ui_env(key, **env))
