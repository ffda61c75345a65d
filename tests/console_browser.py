"""Debian's Chromium driven through chromium-driver (Selenium), as the console's browser tests use it,
and what those tests share: finding elements, waiting (WAIT_S) for a page or a text, logging in.

Never downloads a browser or a driver: /usr/bin/chromium and /usr/bin/chromedriver come from apt
(scripts/setup.sh --test). Flags as verified on these machines: headless, no sandbox (root), and no
background networking (the machine's closed network refuses it, many connections at a time).
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lastmile.console.service import ConsoleServer
from tests.conftest import REPO, missing
from tests.console_harness import DOCTOR

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--metrics-recording-only",
    "--password-store=basic",
)
PHONE = (360, 640)
TABLET = (1280, 800)
WAIT_S = 90.0  # generous: two cores, other suites running


def screenshot_dir() -> Path:
    folder = Path(os.environ.get("LASTMILE_SCREENSHOTS") or REPO / "tmp" / "console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def chromium(language: str = "zh-CN,zh") -> Iterator[object]:
    """A headless Chromium under Selenium, with a fresh profile that asks for `language`."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            missing(f"{path} is not installed (scripts/setup.sh --test installs chromium and chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed (pip install -e '.[test]')")
        raise
    profile = tempfile.mkdtemp(prefix="lastmile-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--lang={language.split(',')[0]}")
    options.add_argument(f"--window-size={TABLET[0]},{TABLET[1]}")
    options.add_experimental_option("prefs", {"intl.accept_languages": language})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def set_viewport(driver: object, size: tuple[int, int]) -> None:
    width, height = size
    driver.execute_cdp_cmd(  # type: ignore[attr-defined]
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )


def save_screenshot(driver: object, name: str, *, full_page: bool = True) -> Path:
    """The page as a PNG in the screenshot folder (the whole page, not only what is in view)."""
    params: dict[str, object] = {"format": "png"}
    if full_page:
        metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})  # type: ignore[attr-defined]
        size = metrics["cssContentSize"]
        params.update(
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000), "scale": 1},
        )
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", params)  # type: ignore[attr-defined]
    path = screenshot_dir() / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def by(kind: str) -> str:
    from selenium.webdriver.common.by import By

    return {"id": By.ID, "css": By.CSS_SELECTOR, "xpath": By.XPATH}[kind]


def wait_for(driver: object, condition: object, timeout: float = WAIT_S) -> object:
    """Poll `condition(driver)` until it is truthy. A page replaced while it is polled (a form sent,
    its redirect) can leave it holding an element of the old page: that is "not yet", as a missing
    element is, so the next poll finds the element again on the new page."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    not_yet = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=not_yet).until(condition)


def choose_language(driver: object, code: str) -> None:
    """Press the header's language button for `code` and wait for the page it leads to, in `code`."""
    driver.find_element(by("css"), f"button[name='language'][value='{code}']").click()  # type: ignore[attr-defined]
    wait_for(driver, lambda d: d.find_element(by("css"), "html").get_attribute("lang") == code)


def text_in(driver: object, css: str, text: str, timeout: float = WAIT_S) -> None:
    from selenium.webdriver.support import expected_conditions as ec

    wait_for(driver, ec.text_to_be_present_in_element((by("css"), css), text), timeout)


def on_page(path: str) -> Callable[[Any], bool]:
    """The browser shows `path` (not merely a URL ending in it: `/login?next=/today` does)."""
    from urllib.parse import urlsplit

    return lambda d: urlsplit(d.current_url).path == path


def log_in(driver: object, server: ConsoleServer, user: tuple[str, str] = DOCTOR) -> None:
    driver.delete_all_cookies()  # type: ignore[attr-defined]
    driver.get(server.url + "/login")  # type: ignore[attr-defined]
    driver.find_element(by("id"), "name").send_keys(user[0])  # type: ignore[attr-defined]
    driver.find_element(by("id"), "password").send_keys(user[1] + "\n")  # type: ignore[attr-defined]
    wait_for(driver, on_page("/today"))
