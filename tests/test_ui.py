"""The registry browser over HTTP (no browser): sessions, CSRF, rights, escaping, the audit line.

Every test runs against the real registry through a real proxy with `ui: true`. The same pages
in a real Chromium are tested in tests/test_ui_browser.py.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import (
    OCI_MANIFEST,
    UI_RULES,
    PageClient,
    Proxy,
    RedisServer,
    Registry,
    access_records,
    basic_auth,
    call,
    fetch,
    htpasswd,
    listed_repositories,
    push_labelled,
    signed_in,
    ui_env,
    ui_proxy,
    wait_until,
)

pytestmark = pytest.mark.system

# Labels as an attacker who may push would write them.
HOSTILE = {
    "org.example.note": "<script>document.title='pwned'</script>",
    "org.example.img": "<img src=x onerror=alert(1)>",
    '"><svg onload=alert(2)>': "quote-breaker",
}


@pytest.fixture(scope="module")
def ui_htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ui-auth") / "htpasswd"
    for user in ("alice", "bob", "carol", "dave"):
        htpasswd(path, "-B", "-C", "4", user=user, password=f"{user}-pw")
    return path


@pytest.fixture(scope="module")
def site(
    registry: Registry, ui_htpasswd: Path, key_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """A proxy with the browser on, and images pushed through it by alice."""
    server = ui_proxy(tmp_path_factory.mktemp("ui"), registry, ui_htpasswd, key_file)
    server.start()
    alice = basic_auth("alice", "alice-pw")
    push_labelled(server.url, "team/app", "v1", alice, HOSTILE)
    push_labelled(server.url, "team/app", "latest", alice, {"tier": "web"})
    push_labelled(server.url, "team/lib", "1.0", alice)
    push_labelled(server.url, "team/lib", "edge", alice)
    push_labelled(server.url, "other/secret", "v1", alice)
    yield server
    server.stop()


def test_sign_in_sets_a_session_cookie_scripts_cannot_read(site: Proxy) -> None:
    """Guards the session cookie's flags: readable by script (HttpOnly), sent cross-site
    (SameSite), or sent to the API (Path) would each widen what a stolen page can do."""
    browser = PageClient(site.url)
    status, _, page = browser.sign_in("alice", "alice-pw")
    assert status == 303, page
    session = [line for line in browser.last_set_cookie if line.startswith("rp_session=")]
    assert len(session) == 1
    flags = {part.strip().lower() for part in session[0].split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui/"} <= flags
    assert "secure" not in flags  # plain http here; over https it is set (below)
    status, _, page = browser.request("/ui/")
    assert status == 200
    assert "alice" in page


def test_the_session_cookie_is_secure_when_the_client_came_over_https(
    registry: Registry, ui_htpasswd: Path, key_file: Path, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards a session cookie a browser would send over plain http after an https sign-in
    (behind a TLS-terminating balancer, the scheme it forwarded counts)."""
    env = ui_env(key_file, PROXY_TRUSTED_PROXIES="127.0.0.1/32")
    server = start_proxy(registry.url, ui_htpasswd, **env)
    browser = PageClient(server.url)
    https = {"X-Forwarded-Proto": "https"}
    _, _, page = browser.request("/ui/login", headers=https)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf
    form = {"csrf": csrf[1], "username": "alice", "password": "alice-pw"}
    origin = {**https, "Origin": "https://" + server.host}
    status, _, _ = browser.request("/ui/login", "POST", form, origin)
    assert status == 303
    session = next(line for line in browser.last_set_cookie if "rp_session=" in line)
    assert "secure" in session.lower()


def test_pages_carry_a_strict_content_security_policy_and_no_inline_script(site: Proxy) -> None:
    """Guards the pages' browser rules: an inline script or style, a missing CSP or framing
    allowed would let an escaped-but-injected string, or another site's frame, act."""
    browser = signed_in(site, "alice")
    for path in (
        "/ui/login",
        "/ui/",
        "/ui/tags?repository=team/app",
        "/ui/manifest?repository=team/app&reference=v1",
    ):
        client = PageClient(site.url) if path == "/ui/login" else browser
        status, headers, page = client.request(path)
        assert status == 200, (path, page)
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "same-origin"
        assert not re.search(r"<script(?![^>]*\bsrc=)", page), path
        assert not re.search(r"<[a-z][^>]*\s(on\w+|style)=", page), path
        assert "http://" not in page and "https://" not in page, path


def test_root_leads_to_the_browser(site: Proxy) -> None:
    """Guards `/` when the browser is on: people type the bare host name."""
    status, headers, _ = fetch(site.url + "/")
    assert (status, headers["Location"]) == (302, "/ui/")


def test_without_ui_the_pages_do_not_exist(proxy: Proxy) -> None:
    """Guards the default: with `ui` off, /ui/ is no page, only the API's refusal."""
    status, _, _ = call(proxy.url + "/ui/login")
    assert status == 401


def test_each_user_sees_only_repositories_they_may_pull(site: Proxy) -> None:
    """Guards the browser's catalog: the same filter as /v2/_catalog, and the catalog right."""
    # The registry is shared with other tests: only these names are known here.
    _, _, page = signed_in(site, "alice").request("/ui/")
    assert {"other/secret", "team/app", "team/lib"} <= set(listed_repositories(page))
    bob = signed_in(site, "bob")
    _, _, page = bob.request("/ui/")
    seen = listed_repositories(page)
    assert {"team/app", "team/lib"} <= set(seen)
    assert all(name.startswith("team/") for name in seen)
    _, _, page = bob.request("/ui/?q=LIB")
    assert "team/lib" in listed_repositories(page)
    assert all("lib" in name for name in listed_repositories(page))
    status, _, page = bob.request("/ui/tags?repository=other/secret")
    assert status == 403
    assert "other/secret" not in listed_repositories(page)
    # carol has no catalog right: the page says so and offers to open a repository by name.
    carol = signed_in(site, "carol")
    status, _, page = carol.request("/ui/")
    assert status == 200
    assert 'id="no-catalog"' in page and listed_repositories(page) == []
    status, _, page = carol.request("/ui/tags?repository=team/app")
    assert status == 200 and 'data-tag="v1"' in page


def test_the_tag_page_shows_digest_size_platform_created_and_pull_line(site: Proxy) -> None:
    """Guards the tag page's facts, read from this page's manifests and config blobs."""
    alice = basic_auth("alice", "alice-pw")
    _, headers, _ = call(
        f"{site.url}/v2/team/app/manifests/v1", "HEAD", {**alice, "Accept": OCI_MANIFEST}
    )
    digest = headers["Docker-Content-Digest"]
    _, _, page = signed_in(site, "bob").request("/ui/tags?repository=team/app")
    row = re.search(r'<tr class="tag" data-tag="v1">(.*?)</tr>', page, re.S)
    assert row, page
    cells = row[1]
    assert digest in cells
    assert "linux/arm64" in cells
    assert "2026-11-30 12:34 UTC" in cells
    assert f"docker pull {site.host}/team/app:v1" in html.unescape(cells)
    assert re.search(r'class="size">\d+(\.\d)? (B|kB)<', cells)


def test_a_config_larger_than_one_read_is_read_whole(site: Proxy) -> None:
    """Guards reading a registry answer in one `read(n)`, which returns only what has arrived:
    a config blob bigger than the client's buffer was cut short, read as no JSON, and the page
    (and the cache, for good) lost its created time and platform."""
    alice = basic_auth("alice", "alice-pw")
    big = {"org.example.padding": "x" * 300_000}  # many reads, within what pages parse
    push_labelled(site.url, "team/big", "v1", alice, big, created="2026-10-09T08:07:06Z")
    _, _, page = signed_in(site, "bob").request("/ui/tags?repository=team/big")
    row = re.search(r'<tr class="tag" data-tag="v1">(.*?)</tr>', page, re.S)
    assert row, page
    assert "linux/arm64" in row[1]
    assert "2026-10-09 08:07 UTC" in row[1]


def test_labels_and_annotations_are_shown_escaped(site: Proxy) -> None:
    """Guards escaping of what a pusher wrote: labels and annotations carry markup here."""
    _, _, page = signed_in(site, "bob").request("/ui/manifest?repository=team/app&reference=v1")
    assert "<script>document.title" not in page
    assert "<img src=x" not in page
    assert "<svg onload" not in page
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &#39;quoted&#39;" in page
    assert 'id="layers"' in page


def test_a_large_manifest_is_read_whole(site: Proxy) -> None:
    """Guards reading the registry's answer with one read: a manifest of several hundred KiB
    arrives in many pieces, and the first is no manifest."""
    notes = {f"org.example.note.{n}": "x" * 1000 for n in range(400)}
    alice = basic_auth("alice", "alice-pw")
    push_labelled(site.url, "team/large", "v1", alice, annotations=notes)
    status, _, page = signed_in(site, "bob").request(
        "/ui/manifest?repository=team/large&reference=v1"
    )
    assert status == 200, page
    assert "org.example.note.399" in page
    assert "not a JSON manifest" not in page


def test_delete_is_offered_only_with_the_right_and_never_for_an_immutable_tag(
    site: Proxy,
) -> None:
    """Guards the delete buttons: shown to whom the API would let delete, hidden for fixed tags."""
    _, _, page = signed_in(site, "bob").request("/ui/tags?repository=team/app")
    assert 'class="delete"' not in page
    _, _, page = signed_in(site, "alice").request("/ui/tags?repository=team/lib")
    forms = re.findall(r'name="reference" value="([^"]+)"', page)
    assert forms == ["edge"]
    # Opened through the immutable tag, its manifest is not offered for deletion either.
    _, _, page = signed_in(site, "alice").request("/ui/manifest?repository=team/lib&reference=1.0")
    assert 'class="delete"' not in page


def record_of(site: Proxy, headers: dict[str, str]) -> dict[str, object]:
    """The access log line of the answer with these headers, once written (after it is sent)."""

    def found() -> list[dict[str, object]]:
        wanted = headers["X-Request-Id"]
        return [record for record in access_records(site.log()) if record["request_id"] == wanted]

    wait_until(lambda: bool(found()), "the access log line")
    return found()[0]


def delete(browser: PageClient, repository: str, reference: str, **extra: str) -> int:
    form = {"csrf": browser.csrf("/ui/"), "repository": repository, "reference": reference}
    form.update(extra)
    status, _, _ = browser.request("/ui/delete", "POST", form)
    return status


def manifest_status(site: Proxy, repository: str, reference: str) -> int:
    alice = basic_auth("alice", "alice-pw")
    status, _, _ = call(
        f"{site.url}/v2/{repository}/manifests/{reference}",
        "HEAD",
        {**alice, "Accept": OCI_MANIFEST},
    )
    return status


def test_delete_follows_the_api_rules(site: Proxy) -> None:
    """Guards the browser doing what the API refuses: a user without `delete`, an immutable
    tag, and a digest an immutable tag points to are refused; alice's delete goes through."""
    alice = basic_auth("alice", "alice-pw")
    digest = push_labelled(site.url, "team/gone", "v1", alice, created="2026-01-01T00:00:00Z")
    bob = signed_in(site, "bob")
    assert delete(bob, "team/gone", digest) == 403
    assert manifest_status(site, "team/gone", digest) == 200
    admin = signed_in(site, "alice")
    assert delete(admin, "team/lib", "1.0") == 403
    _, headers, _ = call(
        f"{site.url}/v2/team/lib/manifests/1.0", "HEAD", {**alice, "Accept": OCI_MANIFEST}
    )
    fixed = headers["Docker-Content-Digest"]
    assert delete(admin, "team/lib", fixed) == 403
    assert manifest_status(site, "team/lib", "1.0") == 200
    form = {"csrf": admin.csrf("/ui/"), "repository": "team/gone", "reference": digest}
    status, headers, _ = admin.request("/ui/delete", "POST", form)
    assert status == 303
    assert manifest_status(site, "team/gone", digest) == 404
    record = record_of(site, headers)
    assert record["event"] == "delete"
    assert (record["user"], record["repository"], record["reference"]) == (
        "alice",
        "team/gone",
        digest,
    )


def test_a_delete_without_the_csrf_token_or_from_another_origin_is_refused(site: Proxy) -> None:
    """Guards cross-site request forgery: a form posted by another page (another origin, or a
    sibling host that SameSite counts as the same site) lacks the token and is refused."""
    alice = basic_auth("alice", "alice-pw")
    digest = push_labelled(site.url, "team/csrf", "v1", alice, created="2026-01-02T00:00:00Z")
    admin = signed_in(site, "alice")
    form = {"repository": "team/csrf", "reference": digest}
    status, _, _ = admin.request("/ui/delete", "POST", {**form, "csrf": "forged"})
    assert status == 403
    status, _, _ = admin.request("/ui/delete", "POST", form)
    assert status == 403
    other_origin = {"Origin": "https://evil.example.net"}
    csrf = admin.csrf("/ui/")
    status, _, _ = admin.request("/ui/delete", "POST", {**form, "csrf": csrf}, other_origin)
    assert status == 403
    cross_site = {"Sec-Fetch-Site": "cross-site"}
    status, _, _ = admin.request("/ui/delete", "POST", {**form, "csrf": csrf}, cross_site)
    assert status == 403
    # Another user's token is no token: it is bound to its session.
    status, _, _ = admin.request(
        "/ui/delete", "POST", {**form, "csrf": signed_in(site, "bob").csrf("/ui/")}
    )
    assert status == 403
    assert manifest_status(site, "team/csrf", digest) == 200


def test_the_sign_in_form_needs_its_token_too(site: Proxy) -> None:
    """Guards login CSRF: another site signing a victim's browser in as the attacker."""
    browser = PageClient(site.url)
    form = {"username": "alice", "password": "alice-pw", "csrf": "x"}
    status, _, _ = browser.request("/ui/login", "POST", form)
    assert status == 403
    assert "rp_session" not in browser.cookies


def test_a_wrong_password_is_refused_and_audited_like_basic(site: Proxy) -> None:
    """Guards the form's audit line: the same `auth` outcome and `tried_user` as Basic."""
    browser = PageClient(site.url)
    status, headers, page = browser.sign_in("alice", "wrong")
    assert status == 401
    assert "Wrong user name or password" in page
    assert "rp_session" not in browser.cookies
    refused = record_of(site, headers)
    assert (refused["auth"], refused["tried_user"]) == ("bad_credentials", "alice")
    status, headers, _ = browser.sign_in("alice", "alice-pw")
    assert status == 303
    login = record_of(site, headers)
    assert (login["event"], login["user"]) == ("login", "alice")
    assert login["auth"] in ("success", "cached")  # alice signed in before: her check is cached


def test_sign_out_ends_the_session_on_the_server(site: Proxy) -> None:
    """Guards sign-out that only deletes the cookie: a copy replayed later must be refused."""
    browser = signed_in(site, "alice")
    stolen = dict(browser.cookies)
    status, _, _ = browser.request("/ui/logout", "POST", {"csrf": browser.csrf("/ui/")})
    assert status == 303
    replay = PageClient(site.url)
    replay.cookies = stolen
    status, headers, _ = replay.request("/ui/")
    assert status == 303 and headers["Location"].startswith("/ui/login")


def test_sign_out_ends_the_users_sessions_in_every_browser(site: Proxy) -> None:
    """Guards sign-out as "sign out everywhere": it ends every session of the user issued up to
    it (so a copy of any of her cookies, stolen from whichever browser, is refused), and no
    other user's."""
    laptop, phone, other = (
        signed_in(site, "alice"),
        signed_in(site, "alice"),
        signed_in(site, "bob"),
    )
    assert phone.request("/ui/")[0] == 200
    status, _, _ = laptop.request("/ui/logout", "POST", {"csrf": laptop.csrf("/ui/")})
    assert status == 303
    status, headers, _ = phone.request("/ui/")
    assert status == 303 and headers["Location"].startswith("/ui/login")
    assert other.request("/ui/")[0] == 200


def test_signing_in_right_after_signing_out_works(site: Proxy) -> None:
    """Guards the issue time's resolution: a sign-out ends the sessions issued up to it, and in
    whole seconds a session made in the same second as the sign-out would be ended too, so a
    user signing straight back in was sent back to the sign-in form."""
    for _ in range(3):
        browser = signed_in(site, "alice")
        assert browser.request("/ui/")[0] == 200
        status, _, _ = browser.request("/ui/logout", "POST", {"csrf": browser.csrf("/ui/")})
        assert status == 303
        again = signed_in(site, "alice")
        assert again.request("/ui/")[0] == 200


def test_a_forged_or_altered_cookie_is_no_session(site: Proxy) -> None:
    """Guards the cookie's signature: a user who edits the name in it becomes nobody."""
    browser = signed_in(site, "bob")
    value = browser.cookies["rp_session"]
    payload, mac = value.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields["n"] = "alice"
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    browser.cookies["rp_session"] = f"{forged}.{mac}"
    status, headers, _ = browser.request("/ui/")
    assert status == 303 and headers["Location"].startswith("/ui/login")


def test_a_user_removed_or_given_a_new_password_loses_the_session_at_once(
    registry: Registry, key_file: Path, tmp_path: Path, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards sessions outliving their user: the htpasswd file is asked on every request."""
    passwords = tmp_path / "htpasswd"
    for user in ("alice", "dave"):
        htpasswd(passwords, "-B", "-C", "4", user=user, password=f"{user}-pw")
    server = start_proxy(registry.url, passwords, **ui_env(key_file))
    dave = signed_in(server, "dave")
    alice = signed_in(server, "alice")
    htpasswd(passwords, "-B", "-C", "4", user="alice", password="new-pw")
    passwords.write_text(
        "\n".join(
            line for line in passwords.read_text().splitlines() if not line.startswith("dave:")
        )
        + "\n"
    )
    wait_until(lambda: dave.request("/ui/")[0] == 303, "dave's session to end")
    assert alice.request("/ui/")[0] == 303


def test_a_lost_right_applies_to_an_open_session(
    registry: Registry,
    ui_htpasswd: Path,
    key_file: Path,
    tmp_path: Path,
    start_proxy: Callable[..., Proxy],
) -> None:
    """Guards rights frozen into a session: the rules in force decide every page (SIGHUP)."""
    config = tmp_path / "proxy.yml"
    config.write_text(f"access: {UI_RULES}\n")
    env = ui_env(key_file, PROXY_CONFIG=str(config))
    del env["PROXY_ACCESS"]
    server = start_proxy(registry.url, ui_htpasswd, **env)
    bob = signed_in(server, "bob")
    assert bob.request("/ui/tags?repository=team/app")[0] == 200
    config.write_text("access: [{users: [alice], repositories: ['**'], actions: [pull]}]\n")
    assert server.process is not None and server.process.popen is not None
    server.process.popen.send_signal(1)
    wait_until(lambda: bob.request("/ui/tags?repository=team/app")[0] == 403, "bob's right to end")


def test_the_throttle_applies_to_the_form(
    registry: Registry, ui_htpasswd: Path, key_file: Path, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards a sign-in form that guesses passwords past the throttle Basic is held to."""
    limits = {"PROXY_AUTH_MAX_FAILURES": "3", "PROXY_AUTH_MAX_FAILURES_PER_USER": "3"}
    server = start_proxy(registry.url, ui_htpasswd, **ui_env(key_file, **limits))
    browser = PageClient(server.url)
    statuses = [browser.sign_in("carol", f"guess-{n}")[0] for n in range(3)]
    assert statuses == [401, 401, 401]
    status, headers, page = browser.sign_in("carol", "guess-4")
    assert status == 429 and "Too many failed sign-ins" in page
    assert int(headers["Retry-After"]) > 0
    # The API shares the count: Basic from the same address is throttled as well.
    status, _, _ = call(server.url + "/v2/", headers=basic_auth("carol", "guess-5"))
    assert status == 429


def test_read_only_shows_a_banner_and_refuses_deletes(
    registry: Registry, ui_htpasswd: Path, key_file: Path, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards the read-only switch in the browser: told, and a delete refused as by the API."""
    server = start_proxy(registry.url, ui_htpasswd, **ui_env(key_file, PROXY_READ_ONLY="true"))
    alice = signed_in(server, "alice")
    _, _, page = alice.request("/ui/")
    assert 'id="read-only"' in page
    _, _, page = alice.request("/ui/tags?repository=team/app")
    assert 'class="delete"' not in page
    assert delete(alice, "team/app", "latest") == 405
    assert manifest_status(server, "team/app", "latest") == 200


def test_a_session_works_on_every_worker_and_sign_out_reaches_them_all(
    registry: Registry, ui_htpasswd: Path, key_file: Path, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards sessions kept per process: with workers, each new connection may meet another."""
    server = start_proxy(registry.url, ui_htpasswd, **ui_env(key_file, PROXY_WORKERS="2"))
    browser = signed_in(server, "alice")
    stolen = dict(browser.cookies)
    assert all(browser.request("/ui/")[0] == 200 for _ in range(12))
    browser.request("/ui/logout", "POST", {"csrf": browser.csrf("/ui/")})
    replay = PageClient(server.url)
    replay.cookies = stolen
    assert all(replay.request("/ui/")[0] == 303 for _ in range(12))


def test_two_proxies_with_one_key_share_sessions_and_redis_shares_sign_outs(
    registry: Registry,
    ui_htpasswd: Path,
    key_file: Path,
    start_proxy: Callable[..., Proxy],
    redis_server: RedisServer,
) -> None:
    """Guards the Swarm shape: a session from one task works on another, and a sign-out on
    one is refused on the other (the revocation lives in the throttle's shared store)."""
    env = ui_env(key_file, PROXY_SHARED_STATE=redis_server.url)
    first = start_proxy(registry.url, ui_htpasswd, **env)
    second = start_proxy(registry.url, ui_htpasswd, **env)
    browser = signed_in(first, "alice")
    elsewhere = PageClient(second.url)
    elsewhere.cookies = dict(browser.cookies)
    assert elsewhere.request("/ui/")[0] == 200
    browser.request("/ui/logout", "POST", {"csrf": browser.csrf("/ui/")})
    assert elsewhere.request("/ui/")[0] == 303


def test_the_session_cookie_never_reaches_the_registry() -> None:
    """Guards a browser's cookies forwarded with an API request: the session is a credential."""
    from aiohttp.test_utils import make_mocked_request

    from proxy.relay.headers import upstream_request_headers

    request = make_mocked_request(
        "GET", "/v2/", headers={"Cookie": "rp_session=secret", "Accept": "*/*"}
    )
    headers = upstream_request_headers(request, "192.0.2.1", "https")
    assert "Cookie" not in headers and headers["Accept"] == "*/*"
