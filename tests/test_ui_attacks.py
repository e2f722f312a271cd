"""Attacks on the registry browser that once worked, against the real registry through a proxy.

Each test names the hole it guards. The attacks that held are in tests/test_ui.py or need no test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import http.server
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import aiohttp.web
import pytest
import yarl

from proxy.auth.tokens_file import load_tokens, new_secret, write_tokens
from tests.support import (
    LDAP_USERS,
    OCI_MANIFEST,
    PageClient,
    Proxy,
    Registry,
    Slapd,
    access_records,
    basic_auth,
    call,
    create_token,
    free_port,
    htpasswd,
    push_blob,
    push_labelled,
    rss,
    signed_in,
    tar_gz,
    ui_env,
    ui_proxy,
    user_dn,
    wait_until,
)

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry of this module's own: the images pushed here stay out of other modules' lists."""
    server = Registry(tmp_path_factory.mktemp("ui-attack-registry"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def passwords(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ui-attack-auth") / "htpasswd"
    for user in ("alice", "bob"):
        htpasswd(path, "-B", "-C", "4", user=user, password=f"{user}-pw")
    return path


@pytest.fixture(scope="module")
def site(
    registry: Registry, passwords: Path, key_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    server = ui_proxy(tmp_path_factory.mktemp("ui-attack"), registry, passwords, key_file)
    server.start()
    yield server
    server.stop()


def page_user(site: Proxy, cookie: str) -> str | None:
    """Who /ui/ says is signed in for this exact Cookie header, or None when sent to sign in."""
    connection = http.client.HTTPConnection(site.host, timeout=30)
    try:
        connection.request("GET", "/ui/", headers={"Cookie": cookie})
        response = connection.getresponse()
        page = response.read().decode()
    finally:
        connection.close()
    if response.status != 200:
        return None
    found = re.search(r'class="who">([^<]*)<', page)
    assert found, page
    return found[1]


def test_a_next_target_with_a_line_break_still_signs_in(site: Proxy) -> None:
    """Guards header injection through `next`: a sign-in link carrying CR LF in `next` made the
    redirect raise in aiohttp, so the victim's sign-in died without an answer (and a traceback
    was logged). Such a target is no page of ours: the sign-in goes to the home page."""
    browser = PageClient(site.url)
    form = {
        "csrf": browser.csrf("/ui/login?next=%2Fui%2F%0D%0ASet-Cookie%3A%20planted%3D1"),
        "username": "alice",
        "password": "alice-pw",
        "next": "/ui/\r\nSet-Cookie: planted=1",
    }
    status, headers, _ = browser.request("/ui/login", "POST", form)
    assert (status, headers["Location"]) == (303, "/ui/")
    assert "planted" not in browser.cookies
    assert "Unhandled exception" not in site.log()


def test_a_session_planted_inside_another_cookie_is_not_read(site: Proxy) -> None:
    """Guards cookie tossing past the one-cookie rule: a sibling host may set a cookie whose
    value holds ` rp_session=...` (browsers keep spaces and commas in values); aiohttp read that
    as a second session cookie and preferred it, so the victim browsed in the attacker's session.
    The value read must be the one the count saw."""
    victim = signed_in(site, "alice").cookies["rp_session"]
    planted = signed_in(site, "bob").cookies["rp_session"]
    for tossed in (f"planted=x rp_session={planted}", f"planted=x, rp_session={planted}"):
        assert page_user(site, f"rp_session={victim}; {tossed}") == "alice"
        assert page_user(site, f"{tossed}; rp_session={victim}") == "alice"


def test_a_token_session_ends_when_the_token_gets_another_secret(
    registry: Registry,
    passwords: Path,
    key_file: Path,
    tmp_path: Path,
    start_proxy: Callable[..., Proxy],
) -> None:
    """Guards a session outliving the secret it signed in with: a token whose secret (or owner)
    an administrator replaced in the tokens file kept every browser session of the old secret,
    though Basic with it is refused. A new htpasswd password ends sessions; so must this."""
    tokens = tmp_path / "tokens"
    secret = create_token(tokens, "robot", repositories=("**",), actions="pull,catalog")
    server = start_proxy(registry.url, passwords, **ui_env(key_file, PROXY_TOKENS=str(tokens)))
    browser = PageClient(server.url)
    status, _, page = browser.sign_in("robot", secret)
    assert status == 303, page
    assert browser.request("/ui/")[0] == 200
    table = load_tokens(tokens)
    _, rotated = new_secret()
    write_tokens(tokens, {"robot": dataclasses.replace(table["robot"], sha256=rotated)})

    def old_secret_refused() -> bool:
        return call(server.url + "/v2/", headers=basic_auth("robot", secret))[0] == 401

    wait_until(old_secret_refused, "the old secret to be refused by the API")
    assert browser.request("/ui/")[0] == 303


def test_config_blobs_and_manifests_longer_than_one_read_are_shown(site: Proxy) -> None:
    """Guards bodies read with one `read(n)`, which returns what has arrived so far: a config
    blob of more than about 64 KiB (labels, long history) showed no created time, platform nor
    labels, and that empty reading was cached for good under its digest."""
    alice = basic_auth("alice", "alice-pw")
    labels = {"org.example.big": "x" * 300_000, "org.example.a-mark": "found-me"}
    push_labelled(site.url, "big/config", "v1", alice, labels)
    browser = signed_in(site, "alice")
    for _ in range(2):
        status, _, page = browser.request("/ui/manifest?repository=big/config&reference=v1")
        assert status == 200
        assert "2026-11-30 12:34 UTC" in page and "linux/arm64" in page
        assert "found-me" in page


def test_labels_a_pusher_wrote_by_the_hundred_kilobytes_are_not_all_kept(site: Proxy) -> None:
    """Guards memory held for what a pusher wrote: every config a page reads is cached by digest
    (up to 4096 of them), and the cache kept labels whole, so images with large labels grew
    the proxy by their size for each one a page showed (with 7 MiB of labels, 36 images grew it
    by 300 MB). What a config's facts keep of its labels is bounded (64 KiB), however large."""
    alice = basic_auth("alice", "alice-pw")
    labels = {"org.example.pad": "0-0-" + "x" * 450_000, "org.example.z-after": "dropped"}
    push_labelled(site.url, "huge/labels", "v1", alice, labels)
    status, _, page = signed_in(site, "alice").request(
        "/ui/manifest?repository=huge/labels&reference=v1"
    )
    assert status == 200 and len(page) < 100_000
    assert re.search(r"<dd>0-0-x+…</dd>", page)
    assert "dropped" not in page


def test_a_form_whose_body_arrives_in_pieces_is_read_whole(site: Proxy) -> None:
    """Guards forms read with one `read(n)`, which returns what has arrived so far: a sign-in
    whose body came in two TCP segments (a long password, a slow link) was refused as "too
    large". Here the body is sent in two parts after the proxy answered `100 Continue`."""
    browser = PageClient(site.url)
    csrf = browser.csrf()
    body = f"csrf={quote(csrf, safe='')}&username=alice&password=alice-pw&next=".encode()
    head = (
        "POST /ui/login HTTP/1.1\r\n"
        f"Host: {site.host}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Origin: {site.url}\r\n"
        f"Cookie: rp_login={browser.cookies['rp_login']}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    host, port = site.host.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head)
        assert connection.recv(100).startswith(b"HTTP/1.1 100 ")
        connection.sendall(body[:20])
        connection.sendall(body[20:])
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 303 "), answer[:200]


def test_refusals_in_the_browser_are_audited_as_the_api_audits_them(site: Proxy) -> None:
    """Guards the audit trail of refused attempts: a delete the rules refuse and a wrong
    password went into the access log as `decision: allowed` with no reason or repository, so
    the refusal metrics and whoever watches for denied requests missed every browser attempt.
    The browser's lines must say what the API's say for the same user and request."""
    alice = basic_auth("alice", "alice-pw")
    push_labelled(site.url, "audit/app", "v1", alice)
    bob = signed_in(site, "bob")
    form = {"csrf": bob.csrf("/ui/"), "repository": "audit/app", "reference": "v1"}
    assert bob.request("/ui/delete", "POST", form)[0] == 403
    assert (
        call(f"{site.url}/v2/audit/app/manifests/v1", "DELETE", basic_auth("bob", "bob-pw"))[0]
        == 403
    )
    assert PageClient(site.url).sign_in("bob", "wrong")[0] == 401
    assert call(site.url + "/v2/", headers=basic_auth("bob", "wrong"))[0] == 401

    def lines() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        records = access_records(site.log())
        deletes = [r for r in records if r["user"] == "bob" and r["status"] == 403]
        logins = [r for r in records if r["tried_user"] == "bob" and r["status"] == 401]
        return deletes, logins

    wait_until(lambda: all(len(found) == 2 for found in lines()), "the four access lines")
    deletes, logins = lines()
    fields = ("decision", "reason", "repository", "reference")
    assert [{k: r[k] for k in fields} for r in deletes] == 2 * [
        {
            "decision": "denied",
            "reason": "delete on audit/app denied",
            "repository": "audit/app",
            "reference": "v1",
        }
    ]
    assert [(r["decision"], r["auth"]) for r in logins] == 2 * [
        ("bad_credentials", "bad_credentials")
    ]


def test_another_site_cannot_sign_the_browser_out(site: Proxy) -> None:
    """Guards logout CSRF: a form another site posts to /ui/logout comes without the session
    cookie (SameSite=Strict), so no session and no token were checked, and the answer cleared
    the cookie anyway; browsers apply that Set-Cookie on a top-level navigation, so any page
    could sign its visitors out. A cross-origin sign-out is refused and clears nothing."""
    for cross_site in ({"Origin": "https://evil.example.net"}, {"Sec-Fetch-Site": "cross-site"}):
        browser = PageClient(site.url)
        status, _, _ = browser.request("/ui/logout", "POST", {"csrf": ""}, cross_site)
        assert status == 403
        assert not [line for line in browser.last_set_cookie if "rp_session" in line]
    # Signing out from our own page still works and clears the cookie.
    browser = signed_in(site, "alice")
    status, _, _ = browser.request("/ui/logout", "POST", {"csrf": browser.csrf("/ui/")})
    assert status == 303 and "rp_session" not in browser.cookies


def test_a_flood_of_sign_outs_does_not_revive_an_earlier_one(site: Proxy) -> None:
    """Guards the bound on sign-outs (100,000 in every store): they were kept per session id and,
    when full, the one expiring soonest went, which is the oldest sign-out. Anyone with an
    account signed in and out in a loop (about 600 a second from one client), passed the bound
    within minutes, and a stolen cookie its owner signed out of worked again. A sign-out is now
    one entry per user: a flood of one account's sign-outs rewrites only its own. Shown on a
    store with a bound of 3 (the real one is the same code), then through the pages."""
    from proxy.throttle.store import MemoryStore
    from proxy.ui.session import Kind, owner_key

    async def replayed() -> bool:
        store = MemoryStore(max_ended_users=3)
        victim, attacker = owner_key(Kind.PASSWORD, "alice"), owner_key(Kind.PASSWORD, "bob")
        await store.end_sessions(victim, before=1_000, until=1000.0, now=0.0)
        for n in range(1, 1001):
            await store.end_sessions(attacker, before=1_000 + n, until=1000.0 + n, now=n / 100)
        ended = await store.sessions_ended(victim, now=10.0)
        return ended is None or ended < 1_000

    assert not asyncio.run(replayed())

    alice, elsewhere = signed_in(site, "alice"), signed_in(site, "alice")
    stolen = alice.cookies["rp_session"]
    assert alice.request("/ui/logout", "POST", {"csrf": alice.csrf("/ui/")})[0] == 303
    for _ in range(50):
        bob = signed_in(site, "bob")
        assert bob.request("/ui/logout", "POST", {"csrf": bob.csrf("/ui/")})[0] == 303
    assert page_user(site, f"rp_session={stolen}") is None
    assert page_user(site, f"rp_session={elsewhere.cookies['rp_session']}") is None


def test_a_signed_out_cookie_cannot_sign_its_user_out_again(site: Proxy) -> None:
    """Guards sign-out with a dead cookie: a sign-out ends every session of the user up to that
    moment, so whoever kept a copy of a signed-out cookie (and its form's token, which never
    changes for the session) could post it again and again to end the user's new sessions too.
    A cookie whose session has ended signs out nobody: only its own cookie is cleared."""
    alice = signed_in(site, "alice")
    stolen, csrf = dict(alice.cookies), alice.csrf("/ui/")
    assert alice.request("/ui/logout", "POST", {"csrf": csrf})[0] == 303
    again = signed_in(site, "alice")
    thief = PageClient(site.url)
    thief.cookies = stolen
    status, headers, _ = thief.request("/ui/logout", "POST", {"csrf": csrf})
    assert (status, headers["Location"]) == (303, "/ui/login")
    assert again.request("/ui/")[0] == 200


def test_a_tag_page_of_huge_manifests_does_not_swell_or_stall_the_proxy(site: Proxy) -> None:
    """Guards the work one page view makes: the tag page parsed all 25 of its manifests up to
    the registry's 4 MiB each (configs up to 8 MiB) on the event loop, so a pusher's manifests
    of 3.7 MiB of annotations cost ~300 MB and seconds of a frozen worker per view (eight views
    at once: 2.2 GB, 46 s, every client of that worker stalled). The API only streams them.
    Manifests and configs larger than real ones are not parsed: their row says so."""
    alice = basic_auth("alice", "alice-pw")
    layer = tar_gz({"file.txt": b"fat"})
    config = b'{"architecture":"amd64","os":"linux"}'
    config_digest = push_blob(site.url, "fat/app", config, alice)
    layer_digest = push_blob(site.url, "fat/app", layer, alice)
    for n in range(25):
        annotations = {f"k{i}": f"{n}-{i}" + "y" * 40 for i in range(60_000)}
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest,
                        "size": len(layer),
                    }
                ],
                "annotations": annotations,
            }
        ).encode()
        put = {**alice, "Content-Type": OCI_MANIFEST}
        status, _, body = call(f"{site.url}/v2/fat/app/manifests/t{n:02d}", "PUT", put, manifest)
        assert status == 201, body
    browser = signed_in(site, "alice")
    before = rss(site)
    status, _, page = browser.request("/ui/tags?repository=fat/app")
    assert status == 200
    assert page.count("too large to show") == 25
    assert rss(site) - before < 100 * 1024 * 1024
    status, _, page = browser.request("/ui/manifest?repository=fat/app&reference=t00")
    assert status == 200 and "too large to show" in page


class _ObjectStorage(http.server.BaseHTTPRequestHandler):
    """Serves the registry's storage as a bucket behind presigned URLs would: only for requests
    naming its own host (a presigned URL's signature covers it); records what it was sent."""

    root: Path
    own_host: str
    seen: list[dict[str, str]]

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers.items()))
        file = self.root / self.path.lstrip("/")
        if self.headers.get("Host") != self.own_host or ".." in self.path or not file.is_file():
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_blobs_the_registry_redirects_to_object_storage_are_read_without_the_clients_headers(
    key_file: Path, passwords: Path, tmp_path: Path
) -> None:
    """Guards config blobs served from object storage (S3's `redirect`, on by default): the
    pages followed the registry's 307 with the client's Host, address and request id, so the
    presigned URL was refused (created time, platform and labels never shown on such a
    registry) and the storage provider learnt every viewer's address. The API passes the 307
    to the client; the pages follow it with none of the client's headers."""
    seen: list[dict[str, str]] = []
    port = free_port()

    class Storage(_ObjectStorage):
        root = tmp_path / "r" / "data"
        own_host = f"127.0.0.1:{port}"

    Storage.seen = seen
    storage = http.server.ThreadingHTTPServer(("127.0.0.1", port), Storage)
    threading.Thread(target=storage.serve_forever, daemon=True).start()
    middleware = f'[{{name: redirect, options: {{baseurl: "http://127.0.0.1:{port}/"}}}}]'
    registry = Registry(tmp_path / "r", env={"REGISTRY_MIDDLEWARE_STORAGE": middleware})
    registry.start()
    server = ui_proxy(tmp_path / "p", registry, passwords, key_file)
    server.start()
    try:
        push_labelled(server.url, "s3/app", "v1", basic_auth("alice", "alice-pw"), {"tier": "db"})
        browser = signed_in(server, "alice")
        status, _, page = browser.request("/ui/manifest?repository=s3/app&reference=v1")
        assert status == 200
        assert "2026-11-30 12:34 UTC" in page and "linux/arm64" in page and "db" in page
        assert seen and not [h for h in seen if "X-Forwarded-For" in h or "X-Request-ID" in h]
    finally:
        server.stop()
        registry.stop()
        storage.shutdown()
        storage.server_close()


def test_the_deleted_notice_shows_only_a_reference(site: Proxy) -> None:
    """Guards text injection into a trusted page: `deleted` from the query string was shown as
    "Deleted …." whatever it held, so a link could make the registry's own page tell its
    reader anything ("Deleted latest. Your session expired: sign in at https://evil…"). Only a
    tag or digest, as the delete redirect writes it, is shown."""
    alice = basic_auth("alice", "alice-pw")
    push_labelled(site.url, "notice/app", "v1", alice)
    browser = signed_in(site, "alice")
    lure = "latest. Your session expired: sign in again at evil.example.net"
    status, _, page = browser.request(f"/ui/tags?repository=notice/app&deleted={quote(lure)}")
    assert status == 200 and "evil.example.net" not in page
    status, _, page = browser.request("/ui/tags?repository=notice/app&deleted=v0")
    assert status == 200 and "Deleted v0." in page


class _HoldingRelay:
    """Between the proxy and the registry: answers to paths holding `held` wait for `release`."""

    def __init__(self, upstream: str, held: str) -> None:
        self.upstream = upstream
        self.held = held
        self.port = free_port()
        self.waiting = 0
        self._loop = asyncio.new_event_loop()
        self._release = asyncio.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        self._started.wait(30)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._release.set)

    def stop(self) -> None:
        self.release()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.run_until_complete(self._session.close())
        self._loop.close()

    async def _serve(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = aiohttp.web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        await aiohttp.web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _relay(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if self.held in request.path:
            self.waiting += 1
            await self._release.wait()
        url = yarl.URL(self.upstream + request.raw_path, encoded=True)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self._session.request(
            request.method, url, headers=headers, data=await request.read(), allow_redirects=False
        ) as answer:
            body = await answer.read()
            kept = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            return aiohttp.web.Response(status=answer.status, body=body, headers=kept)


def test_one_browser_user_cannot_take_every_upstream_connection(
    registry: Registry, key_file: Path, passwords: Path, tmp_path: Path
) -> None:
    """Guards the fair shares of the upstream pool: the API holds one user to
    `upstream_connections_per_user` and answers 503 past it, but the pages' registry requests
    took connections from the shared pool with no share at all, so one user's tag pages (eight
    manifests at once each) could hold every connection while other users' pulls waited."""
    for n in range(8):
        push_labelled(registry.url, "team/held", f"v{n}", {})
    push_labelled(registry.url, "team/free", "v1", {})
    relay = _HoldingRelay(registry.url, "/team/held/manifests/")
    relay.start()
    server = ui_proxy(tmp_path / "p", registry, passwords, key_file)
    server.upstream = relay.url
    server.extra_env.update(
        PROXY_UPSTREAM_CONNECTIONS="4",
        PROXY_UPSTREAM_CONNECTIONS_PER_USER="2",
        PROXY_CONNECT_TIMEOUT="5",
    )
    server.start()
    try:
        alice = signed_in(server, "alice")
        page = threading.Thread(target=alice.request, args=("/ui/tags?repository=team/held",))
        page.start()
        wait_until(lambda: relay.waiting >= 2, "alice's manifest requests to be held")
        pull = f"{server.url}/v2/team/free/manifests/v1"
        status, _, _ = call(pull, headers={**basic_auth("bob", "bob-pw"), "Accept": OCI_MANIFEST})
        held_by_alice = relay.waiting
        relay.release()
        page.join(60)
        assert (status, held_by_alice) == (200, 2)
    finally:
        server.stop()
        relay.stop()


def test_a_refused_delete_of_no_reference_logs_nothing_of_it(site: Proxy) -> None:
    """Guards the access log against what a form carries: a delete's reference is logged only
    once it reads as a tag or digest (a line break or kilobytes of text stay out of it), and
    the line says `bad_request`, as the API's gate says of a reference it cannot read."""
    browser = signed_in(site, "alice")
    reference = "v1\nforged line " + "x" * 5000
    form = {"csrf": browser.csrf("/ui/"), "repository": "team/app", "reference": reference}
    assert browser.request("/ui/delete", "POST", form)[0] == 400

    def refused_line() -> bool:
        records = access_records(site.log())
        return any(r["path"] == "/ui/delete" and r["status"] == 400 for r in records)

    wait_until(refused_line, "the refused delete's access line")
    assert "forged line" not in site.log()
    refused = [r for r in access_records(site.log()) if r["path"] == "/ui/delete"][-1]
    assert (refused["decision"], refused["reference"]) == ("bad_request", None)


def test_a_directory_users_session_ends_when_the_api_would_refuse_the_user(
    registry: Registry,
    key_file: Path,
    passwords: Path,
    start_proxy: Callable[..., Proxy],
    slapd: Slapd,
) -> None:
    """Guards a directory user the directory no longer lets in: Basic binds as the user once the
    cached login expires (`auth_cache_ttl`), so a new password, a lock-out or a disabled
    account refuse the API within minutes, as docs/ldap.md promises. A browser session is
    re-checked by the service account's search, which still finds the entry: it kept working
    for the whole `ui_session_lifetime` (8 h). Now the session is bound to the entry's
    `modifyTimestamp`, which a new password, a lock-out or a disabled account changes."""
    env = slapd.proxy_env(PROXY_AUTH_CACHE_TTL="1")
    server = start_proxy(registry.url, passwords, **ui_env(key_file, **env))
    old = LDAP_USERS["dave"]
    browser = PageClient(server.url)
    status, _, page = browser.sign_in("dave", old)
    assert status == 303, page
    assert browser.request("/ui/")[0] == 200
    slapd.modify(
        f"dn: {user_dn('dave')}\nchangetype: modify\nreplace: userPassword\n"
        "userPassword: a-new-directory-pw\n"
    )

    def old_password_refused() -> bool:
        return call(server.url + "/v2/", headers=basic_auth("dave", old))[0] == 401

    wait_until(old_password_refused, "the API to refuse dave's old password")
    assert browser.request("/ui/")[0] == 303
