"""The registry browser under /ui/, driven in headless Chromium against the real registry.

Each test starts a proxy with the browser on (`ui`, a session key file) and access rules for the
htpasswd users: alice pulls and deletes under acme/, bob only pulls there, carol pulls one
repository and has no catalog right. Screenshots of the main pages go to the artifacts.
"""

from __future__ import annotations

import html
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from aiohttp import web
from selenium.common.exceptions import NoSuchElementException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement

from tests.support import (
    DESKTOP,
    OCI_MANIFEST,
    PHONE,
    Browser,
    Proxy,
    Registry,
    Viewport,
    call,
    push_image,
    push_labelled,
    serve_in_thread,
    wait_until,
)

# The module's repositories live under acme/ (no other test uses it), so the rules keep the
# shared registry's other repositories off these pages; payroll/ is one nobody here may pull.
RULES = """
access:
  - {users: [alice], repositories: ["acme/**"], actions: [pull, push, delete]}
  - {users: [bob], repositories: ["acme/**"], actions: [pull]}
  - {users: [carol], repositories: ["acme/web"], actions: [pull]}
  - {users: [alice, bob], actions: [catalog]}
"""
APP = "acme/web"
TOOLS = "acme/tools"
HIDDEN = "payroll/db"
# Attacker-controlled strings: config labels and manifest annotations, keys and values.
PAYLOADS = {
    "script": "<script>window.pwned = 'script'; document.title = 'pwned'</script>",
    "img": "<img src=x onerror=\"window.pwned = 'img'; document.title = 'pwned'\">",
    "svg": "\"><svg onload=\"window.pwned = 'svg'; document.title = 'pwned'\">",
    "<b id=injected-key>key</b>": "plain",
}
TITLE = "org.opencontainers.image.title"
CREATED = "2026-01-02T03:04:05Z"
# The size of the tags page's picture in the README (docs/images/ui-tags.png).
README = Viewport(1000, 360, mobile=False)
INJECTED = "script:not([src]), img[src=x], svg, #injected-key, [onerror], [onload]"


def assert_clean(browser: Browser) -> None:
    """No script the pages were given ran, and no page so far broke its policy."""
    assert browser.driver.execute_script("return window.pwned === undefined")
    assert "pwned" not in browser.driver.title
    assert browser.csp_violations() == []


@pytest.fixture(scope="module")
def images(registry: Registry) -> dict[str, str]:
    """The module's repositories pushed straight to the registry: name -> manifest digest."""
    pushed = {repo: described(registry, repo, repo.split("/")[-1]) for repo in (APP, TOOLS, HIDDEN)}
    described(registry, APP, "web", "v2")
    return pushed


def described(registry: Registry, repository: str, title: str, tag: str = "v1") -> str:
    """Push an image created at CREATED, titled `title` by a label and an annotation."""
    labels = {TITLE: title}
    return push_labelled(registry.url, repository, tag, {}, labels, CREATED, labels)


@pytest.fixture
def ui_proxy(
    registry: Registry,
    start_proxy: Callable[..., Proxy],
    key_file: Path,
    images: dict[str, str],
    tmp_path: Path,
) -> Callable[..., Proxy]:
    """Start a proxy with the browser on, RULES and `env` on top."""
    config = tmp_path / "proxy.yml"
    config.write_text(RULES)

    def start(**env: str) -> Proxy:
        return start_proxy(
            registry.url,
            PROXY_UI="true",
            PROXY_UI_SESSION_KEY_FILE=str(key_file),
            PROXY_CONFIG=str(config),
            **env,
        )

    return start


@pytest.fixture
def proxy_ui(ui_proxy: Callable[..., Proxy]) -> Proxy:
    """A proxy with the browser on and the module's rules."""
    return ui_proxy()


def find(browser: Browser, selector: str) -> WebElement:
    return browser.driver.find_element(By.CSS_SELECTOR, selector)


def find_all(browser: Browser, selector: str) -> list[WebElement]:
    return browser.driver.find_elements(By.CSS_SELECTOR, selector)


def present(browser: Browser, selector: str) -> bool:
    try:
        find(browser, selector)
    except NoSuchElementException:
        return False
    return True


def path_of(browser: Browser) -> str:
    """The current page's path and query."""
    url = browser.driver.current_url
    return "/" + url.split("/", 3)[3] if url.count("/") >= 3 else url


def submit_login(browser: Browser, proxy: Proxy, user: str, password: str) -> None:
    """Fill and send the sign-in form; wait for the answer to load."""
    browser.open(proxy.url + "/ui/login")
    assert_clean(browser)
    form = find(browser, "form#login")
    form.find_element(By.CSS_SELECTOR, "input[name=username]").send_keys(user)
    form.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(password)
    submit_and_wait(browser, form)


def submit_and_wait(browser: Browser, form: WebElement) -> None:
    """Click the form's submit button and wait until the page it led to has loaded."""
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    loaded(browser, form)


def follow(browser: Browser, link: WebElement) -> None:
    """Click a link and wait until the page it leads to has loaded."""
    link.click()
    loaded(browser, link)


def loaded(browser: Browser, old: WebElement) -> None:
    """Wait until `old`'s page has been replaced and the new one has loaded."""
    wait_until(lambda: _is_stale(old), "the next page to load")
    wait_until(
        lambda: browser.driver.execute_script("return document.readyState") == "complete",
        "the page to finish loading",
    )


def _is_stale(element: WebElement) -> bool:
    try:
        element.is_enabled()
    except Exception:  # StaleElementReferenceException: the page was replaced
        return True
    return False


def sign_in(browser: Browser, proxy: Proxy, user: str, users: dict[str, str]) -> None:
    """Sign in as `user` through the form; land on the repositories page."""
    submit_login(browser, proxy, user, users[user])
    assert path_of(browser) == "/ui/", browser.driver.page_source[:2000]
    assert_clean(browser)


def listed(browser: Browser) -> list[str]:
    return [link.text.strip() for link in find_all(browser, "ul#repositories li a")]


def manifest_exists(registry: Registry, repository: str, reference: str) -> bool:
    status, _, _ = call(
        f"{registry.url}/v2/{repository}/manifests/{reference}",
        "HEAD",
        {"Accept": OCI_MANIFEST},
    )
    return status == 200


def by_digest(registry: Registry, repository: str) -> dict[str, str]:
    """The delete form's fields for the manifest tagged v1, named by digest: every registry
    version deletes that (2.8 cannot delete a tag), so a forged request let through deletes."""
    status, headers, _ = call(
        f"{registry.url}/v2/{repository}/manifests/v1", "HEAD", {"Accept": OCI_MANIFEST}
    )
    assert status == 200
    return {"repository": repository, "reference": headers["Docker-Content-Digest"]}


def tags_url(proxy: Proxy, repository: str) -> str:
    return f"{proxy.url}/ui/tags?{urlencode({'repository': repository})}"


def manifest_url(proxy: Proxy, repository: str, reference: str) -> str:
    query = urlencode({"repository": repository, "reference": reference})
    return f"{proxy.url}/ui/manifest?{query}"


def post_from_page(browser: Browser, path: str, fields: dict[str, str]) -> int:
    """POST a form from the current page with fetch(); the status the proxy answered."""
    status = browser.driver.execute_async_script(
        "const [path, fields, done] = arguments;"
        "fetch(path, {method: 'POST', body: new URLSearchParams(fields), redirect: 'manual'})"
        ".then(r => done(r.status), e => done(String(e)));",
        path,
        fields,
    )
    return int(status)


def csrf_of(browser: Browser) -> str:
    """The CSRF token the current page's forms carry (the sign-out form has one)."""
    return str(find(browser, "form#logout input[name=csrf]").get_attribute("value"))


# --- sign-in, the repositories, a tag ---------------------------------------------------------


def test_sign_in_shows_only_the_repositories_the_user_may_pull(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], images: dict[str, str]
) -> None:
    """Guards the filtered catalog in the browser: alice sees acme/ and nothing hidden; the
    search narrows the list; every page passes the CSP."""
    browser.open(proxy_ui.url + "/ui/login")
    browser.screenshot("ui-login")
    sign_in(browser, proxy_ui, "alice", users)
    names = listed(browser)
    # Other tests of the module add repositories under acme/ (theirs to delete).
    assert {APP, TOOLS} <= set(names) and names == sorted(names)
    assert all(name.startswith("acme/") for name in names), names
    assert HIDDEN not in browser.driver.page_source
    for link in find_all(browser, "ul#repositories li a"):
        href = urlsplit(link.get_attribute("href") or "")
        assert (href.path, parse_qs(href.query)) == ("/ui/tags", {"repository": [link.text]})
    browser.screenshot("ui-repositories")

    search = find(browser, "form#search")
    search.find_element(By.CSS_SELECTOR, "input[name=q]").send_keys("tools")
    submit_and_wait(browser, search)
    assert parse_qs(urlsplit(browser.driver.current_url).query)["q"] == ["tools"]
    assert listed(browser) == [TOOLS]
    assert_clean(browser)


def test_a_user_without_the_catalog_right_opens_a_repository_by_name(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], images: dict[str, str]
) -> None:
    """Guards the catalog right in the browser: carol is told she cannot list, and the box
    opens the one repository she may pull."""
    sign_in(browser, proxy_ui, "carol", users)
    assert present(browser, "#no-catalog")
    assert listed(browser) == []
    form = find(browser, "form#open-repository")
    form.find_element(By.CSS_SELECTOR, "input[name=repository]").send_keys(APP)
    submit_and_wait(browser, form)
    assert path_of(browser).startswith("/ui/tags?")
    assert {row.get_attribute("data-tag") for row in find_all(browser, "tr.tag")} == {"v1", "v2"}
    assert_clean(browser)


def test_a_tag_shows_its_facts_and_the_pull_line_is_copied(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], images: dict[str, str]
) -> None:
    """Guards the tags page: digest, size, the `docker pull` line with the host the browser
    used, the copy button, and the manifest page it links to."""
    sign_in(browser, proxy_ui, "bob", users)
    follow(browser, next(a for a in find_all(browser, "ul#repositories li a") if a.text == APP))
    assert_clean(browser)
    row = find(browser, "table#tags tr.tag[data-tag=v1]")
    assert row.find_element(By.CSS_SELECTOR, ".digest").text.strip().startswith(images[APP][:19])
    assert row.find_element(By.CSS_SELECTOR, ".size").text.strip()
    assert row.find_element(By.CSS_SELECTOR, ".platforms").text.strip() == "linux/arm64"
    assert CREATED[:10] in row.find_element(By.CSS_SELECTOR, ".created").text
    line = row.find_element(By.CSS_SELECTOR, "code.pull-line").text.strip()
    assert line == f"docker pull {proxy_ui.host}/{APP}:v1"
    browser.screenshot("ui-tags")
    browser.use(README)  # the README's picture: the same page, less empty space
    browser.screenshot("ui-tags-readme")
    browser.use(DESKTOP)

    browser.grant_clipboard(proxy_ui.url)
    copy = row.find_element(By.CSS_SELECTOR, "button.copy")
    copy.click()
    wait_until(lambda: copy.get_attribute("data-copied") is not None, "the copy to be confirmed")
    assert browser.clipboard() == line
    assert_clean(browser)

    follow(browser, row.find_element(By.CSS_SELECTOR, "a.manifest"))
    assert path_of(browser).startswith("/ui/manifest?")
    for section in ("dl#labels", "dl#annotations"):
        assert find(browser, section).text.split("\n") == [TITLE, "web"], section
    assert len(find_all(browser, "table#layers tbody tr")) == 1
    assert_clean(browser)
    browser.screenshot("ui-manifest")


# --- delete ---------------------------------------------------------------------------------


@pytest.fixture
def doomed(registry: Registry) -> str:
    """A repository of its own under acme/, with one tag, for a test that deletes."""
    repository = f"acme/doomed-{uuid.uuid4().hex[:6]}"
    push_image(registry.url, repository, "v1")
    return repository


def test_a_user_with_the_delete_right_deletes_a_tag(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], registry: Registry, doomed: str
) -> None:
    """Guards delete in the browser: alice's form on the tags page, with its CSRF token, deletes
    the tag where the registry deletes tags (v3); registry 2.x deletes only by digest, and the
    page says so and what to do instead, with the tag left in place."""
    sign_in(browser, proxy_ui, "alice", users)
    browser.open(tags_url(proxy_ui, doomed))
    find(browser, "tr.tag[data-tag=v1] details.danger summary").click()
    form = find(browser, "tr.tag[data-tag=v1] form.delete")
    assert form.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    submit_and_wait(browser, form)
    assert_clean(browser)
    if manifest_exists(registry, doomed, "v1"):
        assert "deletes manifests only by digest" in find(browser, "main").text
    else:
        assert path_of(browser).startswith("/ui/tags?"), find(browser, "main").text


def test_a_user_with_the_delete_right_deletes_a_manifest(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], registry: Registry, doomed: str
) -> None:
    """Guards delete by digest in the browser: the manifest page's form deletes the manifest."""
    sign_in(browser, proxy_ui, "alice", users)
    browser.open(manifest_url(proxy_ui, doomed, "v1"))
    find(browser, "details.danger summary").click()
    submit_and_wait(browser, find(browser, "form.delete"))
    assert_clean(browser)
    assert not manifest_exists(registry, doomed, "v1")
    assert path_of(browser).startswith("/ui/tags?"), find(browser, "main").text
    assert find_all(browser, "tr.tag") == []


def test_a_post_from_the_proxys_own_origin_without_the_sessions_token_deletes_nothing(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], registry: Registry, doomed: str
) -> None:
    """Guards the CSRF token itself, where the browser's origin checks cannot help (markup
    slipped into one of the proxy's own pages): no token, an empty one, or bob's are refused."""
    sign_in(browser, proxy_ui, "bob", users)
    bobs = csrf_of(browser)
    browser.driver.delete_all_cookies()
    sign_in(browser, proxy_ui, "alice", users)
    fields = by_digest(registry, doomed)
    for token in ({}, {"csrf": ""}, {"csrf": bobs}):
        assert post_from_page(browser, "/ui/delete", {**fields, **token}) == 403, token
    assert manifest_exists(registry, doomed, "v1")


def test_a_user_without_the_delete_right_has_no_form_and_a_forged_post_is_refused(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], registry: Registry, doomed: str
) -> None:
    """Guards the delete right in the browser: bob sees no delete form, and a POST he makes
    himself with his own valid CSRF token is refused; the manifest stays."""
    sign_in(browser, proxy_ui, "bob", users)
    browser.open(tags_url(proxy_ui, doomed))
    assert present(browser, "tr.tag[data-tag=v1]")
    assert find_all(browser, "form.delete") == []
    fields = {**by_digest(registry, doomed), "csrf": csrf_of(browser)}
    assert post_from_page(browser, "/ui/delete", fields) == 403
    assert manifest_exists(registry, doomed, "v1")


ATTACK = """<!doctype html><title>attacker</title>
<form id=attack method=post action="{action}">{fields}</form>
<script>document.getElementById('attack').submit()</script>"""


@pytest.fixture
def attacker() -> Iterator[Callable[[str, str, dict[str, str]], str]]:
    """Serve, on a free port of a given host, a page that auto-submits a form; return its URL."""
    with ExitStack() as sites:

        def serve(host: str, action: str, fields: dict[str, str]) -> str:
            inputs = "".join(
                f'<input type=hidden name="{html.escape(name)}" value="{html.escape(value)}">'
                for name, value in fields.items()
            )
            page = ATTACK.format(action=html.escape(action), fields=inputs)

            async def attack(_: web.Request) -> web.Response:
                return web.Response(text=page, content_type="text/html")

            app = web.Application()
            app.router.add_get("/", attack)
            return sites.enter_context(serve_in_thread(app, host)) + "/"

        yield serve


@pytest.mark.parametrize(
    ("host", "token"),
    [("127.0.0.2", "none"), ("127.0.0.1", "none"), ("127.0.0.1", "bob's")],
    ids=["cross-site", "same-site-other-port", "same-site-bobs-token"],
)
def test_a_form_posted_from_another_origin_deletes_nothing(
    browser: Browser,
    proxy_ui: Proxy,
    users: dict[str, str],
    registry: Registry,
    doomed: str,
    attacker: Callable[[str, str, dict[str, str]], str],
    host: str,
    token: str,
) -> None:
    """Guards CSRF: a page elsewhere makes alice's browser POST /ui/delete without her token
    (from another site; from the same site on another port, where SameSite=Strict still sends
    the cookie; with a token of bob's session). The manifest stays."""
    fields = by_digest(registry, doomed)
    if token != "none":
        sign_in(browser, proxy_ui, "bob", users)
        fields["csrf"] = csrf_of(browser)
        browser.driver.delete_all_cookies()
    sign_in(browser, proxy_ui, "alice", users)
    page = attacker(host, proxy_ui.url + "/ui/delete", fields)
    browser.open(page)
    # Cross-site, the cookie stays home and the answer is the sign-in page; else a refusal.
    wait_until(lambda: browser.driver.current_url.startswith(proxy_ui.url), "the POST to land")
    assert manifest_exists(registry, doomed, "v1")
    browser.open(tags_url(proxy_ui, doomed))
    assert present(browser, "tr.tag[data-tag=v1]")


# --- the session, the policy, the throttle ----------------------------------------------------


def test_the_session_cookie_is_invisible_to_scripts(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str]
) -> None:
    """Guards HttpOnly and SameSite on the session cookie: document.cookie never shows it."""
    sign_in(browser, proxy_ui, "alice", users)
    assert "rp_session" not in browser.driver.execute_script("return document.cookie")
    cookie = browser.driver.get_cookie("rp_session")
    assert cookie is not None
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/ui/")


def test_a_cookie_replayed_after_sign_out_is_refused(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], images: dict[str, str]
) -> None:
    """Guards sign-out on the server: the old cookie, put back after sign-out, opens nothing;
    and the Back button does not bring the signed-in page back from the browser's cache."""
    sign_in(browser, proxy_ui, "alice", users)
    cookie = browser.driver.get_cookie("rp_session")
    assert cookie is not None
    browser.open(tags_url(proxy_ui, APP))
    submit_and_wait(browser, find(browser, "form#logout"))
    assert path_of(browser).startswith("/ui/login")
    assert_clean(browser)
    browser.driver.back()
    wait_until(lambda: path_of(browser).startswith("/ui/login"), "Back to ask for a sign-in")
    assert not present(browser, "table#tags")

    browser.driver.add_cookie(
        {"name": cookie["name"], "value": cookie["value"], "path": cookie["path"]}
    )
    browser.open(proxy_ui.url + "/ui/")
    assert path_of(browser).startswith("/ui/login")
    assert listed(browser) == []


def test_a_signed_out_visitor_lands_on_the_page_they_asked_for_after_signing_in(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], images: dict[str, str]
) -> None:
    """Guards the sign-in detour: a link to a tags page, opened signed out, leads there."""
    browser.open(tags_url(proxy_ui, APP))
    assert path_of(browser).startswith("/ui/login?")
    form = find(browser, "form#login")
    form.find_element(By.CSS_SELECTOR, "input[name=username]").send_keys("bob")
    form.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(users["bob"])
    submit_and_wait(browser, form)
    assert browser.driver.current_url == tags_url(proxy_ui, APP)
    assert present(browser, "tr.tag[data-tag=v1]")
    assert_clean(browser)


def test_every_page_enforces_the_policy_and_breaks_none_of_it(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], images: dict[str, str]
) -> None:
    """Guards the CSP in the browser, page by page: the page itself causes no CSP refusal, and
    the policy is really enforced there (an inline script put into the page does not run), so
    the first check is not passing only for want of a policy."""
    pages = [
        proxy_ui.url + "/ui/login",
        proxy_ui.url + "/ui/",
        proxy_ui.url + "/ui/?" + urlencode({"q": "web"}),
        tags_url(proxy_ui, APP),
        manifest_url(proxy_ui, APP, "v1"),
        manifest_url(proxy_ui, APP, images[APP]),
        proxy_ui.url + "/ui/no-such-page",
    ]
    for number, url in enumerate(pages):
        if number == 1:
            sign_in(browser, proxy_ui, "alice", users)
        browser.open(url)
        assert browser.driver.current_url == url, "the page redirected elsewhere"
        assert_clean(browser)
        browser.driver.execute_script(
            "const probe = document.createElement('script');"
            "probe.textContent = 'window.probeRan = true';"
            "document.body.appendChild(probe);"
        )
        assert browser.driver.execute_script("return window.probeRan === undefined"), url
        assert len(browser.csp_violations()) == 1, url
        browser.console.clear()


def test_the_throttle_answers_the_sign_in_form(
    browser: Browser, ui_proxy: Callable[..., Proxy], users: dict[str, str]
) -> None:
    """Guards the throttle on the form: after the allowed wrong passwords, even the right one
    gets the throttled answer, shown as the form's error."""
    proxy = ui_proxy(PROXY_AUTH_MAX_FAILURES="3", PROXY_AUTH_CACHE_TTL="0.001")
    for attempt in range(3):
        submit_login(browser, proxy, "alice", f"wrong-{attempt}")
        assert path_of(browser).startswith("/ui/login")
        error = find(browser, ".error")
        assert error.get_attribute("role") == "alert"
        assert_clean(browser)
    wrong = error.text
    submit_login(browser, proxy, "alice", users["alice"])
    assert path_of(browser).startswith("/ui/login")
    throttled = find(browser, ".error").text
    assert throttled.startswith("Too many failed sign-ins"), (wrong, throttled)
    assert browser.driver.get_cookie("rp_session") is None
    assert_clean(browser)


def test_a_read_only_proxy_shows_its_banner_and_deletes_nothing(
    browser: Browser,
    ui_proxy: Callable[..., Proxy],
    users: dict[str, str],
    registry: Registry,
    doomed: str,
) -> None:
    """Guards the read-only banner, and delete answered as the API answers it while read-only."""
    proxy = ui_proxy(PROXY_READ_ONLY="true")
    sign_in(browser, proxy, "alice", users)
    assert present(browser, "#read-only")
    browser.open(tags_url(proxy, doomed))
    assert present(browser, "#read-only")
    fields = {**by_digest(registry, doomed), "csrf": csrf_of(browser)}
    assert post_from_page(browser, "/ui/delete", fields) >= 400
    assert manifest_exists(registry, doomed, "v1")
    assert_clean(browser)


# --- attacker-controlled labels -------------------------------------------------------------


def test_labels_and_annotations_carrying_markup_are_shown_as_text(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], registry: Registry
) -> None:
    """Guards escaping: an image whose labels and annotations hold script and HTML is shown on
    the tags and manifest pages as text; nothing runs and no element is injected."""
    repository = "acme/labels"
    push_labelled(registry.url, repository, "v1", {}, PAYLOADS, CREATED, PAYLOADS)
    sign_in(browser, proxy_ui, "alice", users)
    browser.open(tags_url(proxy_ui, repository))
    assert_clean(browser)
    assert find_all(browser, f"table#tags {INJECTED}") == []
    browser.open(manifest_url(proxy_ui, repository, "v1"))
    assert_clean(browser)
    for section in ("dl#labels", "dl#annotations"):
        shown = find(browser, section)
        assert shown.find_elements(By.CSS_SELECTOR, INJECTED) == []
        for key, value in PAYLOADS.items():
            assert key in shown.text and value in shown.text, (section, key)


def test_the_pages_fit_a_phone(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], images: dict[str, str]
) -> None:
    """Guards phone width: the pages are laid out 390 px wide without sideways scrolling of
    the page, and the copy button still works there."""
    browser.use(PHONE)
    sign_in(browser, proxy_ui, "bob", users)
    for url in (proxy_ui.url + "/ui/", tags_url(proxy_ui, APP), manifest_url(proxy_ui, APP, "v1")):
        browser.open(url)
        assert_clean(browser)
        assert browser.driver.execute_script("return window.innerWidth") == PHONE.width
        width = browser.driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= PHONE.width, url
    browser.open(tags_url(proxy_ui, APP))
    browser.screenshot("ui-tags-phone")
    browser.grant_clipboard(proxy_ui.url)
    copy = find(browser, "tr.tag[data-tag=v1] button.copy")
    copy.click()
    wait_until(lambda: copy.get_attribute("data-copied") is not None, "the copy to be confirmed")
    assert browser.clipboard() == f"docker pull {proxy_ui.host}/{APP}:v1"


def test_sign_in_and_copy_by_keyboard_alone(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], images: dict[str, str]
) -> None:
    """Guards keyboard use: the form takes focus, Tab and Enter sign in, and Tab reaches a
    copy button that Enter presses."""
    browser.open(proxy_ui.url + "/ui/login")

    def focused() -> WebElement:
        return browser.driver.switch_to.active_element

    assert focused().get_attribute("name") == "username"
    focused().send_keys("bob", Keys.TAB)
    assert focused().get_attribute("name") == "password"
    focused().send_keys(users["bob"], Keys.ENTER)
    wait_until(lambda: path_of(browser) == "/ui/", "the repositories page")
    browser.open(tags_url(proxy_ui, APP))
    copy = find(browser, "tr.tag[data-tag=v1] button.copy")
    for _ in range(30):
        if focused() == copy:
            break
        ActionChains(browser.driver).send_keys(Keys.TAB).perform()
    assert focused() == copy, "Tab never reached the copy button"
    browser.grant_clipboard(proxy_ui.url)
    ActionChains(browser.driver).send_keys(Keys.ENTER).perform()
    wait_until(lambda: copy.get_attribute("data-copied") is not None, "the copy to be confirmed")
    assert browser.clipboard() == f"docker pull {proxy_ui.host}/{APP}:v1"
    assert_clean(browser)


def test_the_tags_page_pages_through_every_tag_once(
    browser: Browser, proxy_ui: Proxy, users: dict[str, str], registry: Registry
) -> None:
    """Guards paging in the browser: following the next link shows every tag exactly once."""
    repository = f"acme/many-{uuid.uuid4().hex[:6]}"
    tags = [f"t{number:02}" for number in range(30)]
    for tag in tags:
        push_labelled(registry.url, repository, tag, {}, {TITLE: "many"}, CREATED, {})
    sign_in(browser, proxy_ui, "bob", users)
    browser.open(tags_url(proxy_ui, repository))
    seen: list[str] = []
    for _ in range(len(tags)):
        assert_clean(browser)
        seen += [str(row.get_attribute("data-tag")) for row in find_all(browser, "tr.tag")]
        if not present(browser, "a#next"):
            break
        follow(browser, find(browser, "a#next"))
    assert seen == tags
