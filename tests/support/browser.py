"""Debian's Chromium, headless, driven by Selenium: console log, screenshots, pages to serve.

Selenium is pointed at /usr/bin/chromium and /usr/bin/chromedriver, so Selenium Manager never
runs and nothing is downloaded while the tests run.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start. The rest keep
# a run offline and quiet: no update checks, no sync, no QUIC probes, no first-run pages.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
# What Chromium writes to the console when a Content-Security-Policy blocks something.
CSP_REFUSAL = "violates the following Content Security Policy directive"
REPOSITORY = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Viewport:
    """A page's size in CSS pixels, and whether the browser presents itself as a phone."""

    width: int
    height: int
    mobile: bool


PHONE = Viewport(390, 844, mobile=True)
DESKTOP = Viewport(1280, 900, mobile=False)


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    return f"{' and '.join(missing)} not installed" if missing else None


def artifacts_dir() -> Path:
    """Where screenshots go: $ARTIFACTS_DIR, or build/screenshots/ in the repository."""
    return Path(os.environ.get("ARTIFACTS_DIR") or REPOSITORY / "build" / "screenshots")


@dataclass
class Browser:
    """One headless Chromium and everything its console said so far."""

    driver: webdriver.Chrome
    console: list[dict[str, Any]] = field(default_factory=list)

    def use(self, viewport: Viewport) -> None:
        """Lay pages out at `viewport`'s size (the window itself cannot be narrower than 500)."""
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {
                "width": viewport.width,
                "height": viewport.height,
                "deviceScaleFactor": 1,
                "mobile": viewport.mobile,
            },
        )

    def open(self, url: str) -> None:
        """Load `url` and wait until its document has loaded."""
        self.driver.get(url)

    def console_messages(self) -> list[str]:
        """Every console message so far (Chromium hands each one over only once)."""
        self.console.extend(self.driver.get_log("browser"))  # type: ignore[no-untyped-call]
        return [str(entry["message"]) for entry in self.console]

    def csp_violations(self) -> list[str]:
        """The console's Content-Security-Policy refusals so far."""
        return [message for message in self.console_messages() if CSP_REFUSAL in message]

    def screenshot(self, name: str) -> Path:
        """Save what the viewport shows as `name`.png among the artifacts; return its path."""
        path = artifacts_dir() / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            raise AssertionError(f"Chromium could not save a screenshot to {path}")
        return path

    def grant_clipboard(self, origin: str) -> None:
        """Let pages of `origin` write to and read the clipboard without asking."""
        self.driver.execute_cdp_cmd(
            "Browser.grantPermissions",
            {"origin": origin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
        )

    def clipboard(self) -> str:
        """What the clipboard holds, read by the current page (see `grant_clipboard`)."""
        text = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "navigator.clipboard.readText().then(done, error => done('error: ' + error));"
        )
        return str(text)


@contextmanager
def start_browser(profile: Path, viewport: Viewport = DESKTOP) -> Iterator[Browser]:
    """Start headless Chromium with a fresh profile in `profile`; quit it afterwards."""
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={DESKTOP.width},{DESKTOP.height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile.mkdir(parents=True, exist_ok=True)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        browser = Browser(driver)
        browser.use(viewport)
        yield browser
    finally:
        driver.quit()


@contextmanager
def serve_in_thread(app: web.Application, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `app` on a free port of `host` from a thread of its own; yield its base URL.

    Selenium's calls block, so a site the browser loads cannot share the test's event loop.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"site-{host}", daemon=True)
    thread.start()
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, host, 0).start()
        return int(runner.addresses[0][1])

    try:
        port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
        yield f"http://{host}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
