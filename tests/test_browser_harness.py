"""The browser harness itself: its CSP check can fail, and it never asks Selenium Manager.

The UI tests conclude "no CSP error" from an empty list; these tests show that the list fills
when a page breaks its policy, so that conclusion means something.
"""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable, Iterator

import pytest
from aiohttp import web
from selenium.webdriver.common.selenium_manager import SeleniumManager

from tests.support import CHROMIUM, PHONE, Browser, artifacts_dir, serve_in_thread

POLICY = {"Content-Security-Policy": "default-src 'self'"}
INLINE = "<!doctype html><title>inline</title><script>document.title = 'ran'</script>"
CLEAN = (
    "<!doctype html><meta name=viewport content='width=device-width'><title>clean</title>"
    "<script src='/ran.js'></script>"
)
Handler = Callable[[web.Request], Awaitable[web.Response]]


def under_policy(text: str, content_type: str = "text/html") -> Handler:
    """A handler answering `text` under the strict policy."""

    async def answer(_: web.Request) -> web.Response:
        return web.Response(text=text, content_type=content_type, headers=POLICY)

    return answer


@pytest.fixture(autouse=True)
def no_selenium_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test of this module that asks Selenium Manager for a browser or a driver."""

    def refuse(*args: object, **kwargs: object) -> dict[str, str]:
        raise AssertionError("Selenium Manager was asked for a browser or a driver")

    monkeypatch.setattr(SeleniumManager, "binary_paths", refuse)


@pytest.fixture
def site() -> Iterator[str]:
    """A same-origin site under `default-src 'self'`: one page with inline script, one without."""
    app = web.Application()
    app.router.add_get("/inline", under_policy(INLINE))
    app.router.add_get("/clean", under_policy(CLEAN))
    app.router.add_get("/ran.js", under_policy("document.title = 'ran';", "text/javascript"))
    with serve_in_thread(app) as url:
        yield url


def test_an_inline_script_under_the_policy_is_reported_as_a_csp_violation(
    browser: Browser, site: str
) -> None:
    """Guards the CSP check: a page whose inline script the policy blocks yields a violation."""
    browser.open(site + "/inline")
    assert browser.driver.title == "inline"  # the script did not run
    violations = browser.csp_violations()
    assert len(violations) == 1, browser.console_messages()
    assert "script-src" in violations[0] or "default-src" in violations[0]


def test_a_same_origin_script_file_under_the_policy_reports_nothing(
    browser: Browser, site: str
) -> None:
    """Guards the CSP check against false alarms: an allowed script runs and reports nothing."""
    browser.open(site + "/clean")
    assert browser.driver.title == "ran"
    assert browser.csp_violations() == []


def test_phone_viewport_and_screenshots_land_among_the_artifacts(
    browser: Browser, site: str
) -> None:
    """Guards the phone size and the artifacts: a page made for phones is laid out 390 px wide
    (a phone's width, not the 500 px a headless window cannot go below) and saved."""
    browser.use(PHONE)
    browser.open(site + "/clean")
    assert browser.driver.execute_script("return window.innerWidth") == PHONE.width
    shot = browser.screenshot("harness-phone")
    assert shot.parent == artifacts_dir()
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_browser_starts_from_the_system_chromium_without_selenium_manager(
    browser: Browser,
) -> None:
    """Guards the offline run: the browser is Debian's Chromium, started while Selenium Manager
    (which downloads browsers and drivers) refuses every call (`no_selenium_manager`)."""
    browser.open("about:blank")
    assert browser.driver.capabilities["browserName"] == "chrome"
    version = browser.driver.capabilities["browserVersion"]
    reported = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, check=True)
    assert version in reported.stdout
