"""The Sent and System pages of a clinic on a metered link, in a real browser (Debian's Chromium),
Chinese, on a phone 390 px wide: the lines saying what holds routine studies and until when are
whole and inside the screen. Screenshots land in $LASTMILE_SCREENSHOTS (tests/console_browser.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.ecg.intake import enqueue_recording
from lastmile.services.metered import meters
from tests.console_browser import TABLET, by, log_in, on_page, save_screenshot, set_viewport, wait_for
from tests.console_harness import console_config, running_console
from tests.ecg_factories import make_recording
from tests.metering_setup import DAY, shut_window

pytestmark = pytest.mark.timeout(600)

PHONE_390 = (390, 844)


def metered_clinic(tmp_path: Path, *, budget_spent: bool) -> Config:
    """Three routine ECGs held by a shut send window (queued since it last opened) or by a daily
    budget spent every day since they were queued, two days ago."""
    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0  # the synthetic ECGs are re-record cases: the link is the subject
    now = time.time()
    if budget_spent:
        config.reading_center.metered.daily_budget_mb = 1.0
    else:
        config.reading_center.metered.windows = [shut_window(now)]
    with open_outbox(config) as outbox:
        queued_at = now - 2 * DAY if budget_spent else now - 3600
        for i in range(3):
            enqueue_recording(outbox, make_recording(i), config, key=f"metered-{i}", now=queued_at)
        if budget_spent:
            for days_ago in (0, 1, 2):
                meters(config, outbox)["dicom"].spend(2**20, now - days_ago * DAY)
    return config


def lines_inside_the_screen(driver: object, css: str) -> list[dict[str, float]]:
    """Each element `css` finds: its box and the screen's width (nothing cut at the right)."""
    return driver.execute_script(  # type: ignore[attr-defined,no-any-return]
        "return [...document.querySelectorAll(arguments[0])].map(e => {"
        "const b = e.getBoundingClientRect();"
        "return {left: b.left, right: b.right, scroll: e.scrollWidth, client: e.clientWidth,"
        " width: document.documentElement.clientWidth, page: document.documentElement.scrollWidth};});",
        css,
    )


@pytest.mark.parametrize("budget_spent", [False, True], ids=["window", "budget"])
def test_a_phone_shows_what_holds_routine_studies_and_until_when(
    browser: object, tmp_path: Path, budget_spent: bool
) -> None:
    config = metered_clinic(tmp_path, budget_spent=budget_spent)
    holder = "流量额度" if budget_spent else "发送时段"
    name = "budget" if budget_spent else "window"
    with running_console(config) as server:
        log_in(browser, server)
        set_viewport(browser, PHONE_390)
        try:
            # a window holds less than a day (the System page has nothing to advise); a budget too
            # small for the clinic holds days: the System page says so
            pages = [("/sent", "p.metered")] + ([("/system", ".finding .advice")] if budget_spent else [])
            for path, css in pages:
                browser.get(server.url + path)  # type: ignore[attr-defined]
                wait_for(browser, on_page(path))
                shown = [e.text for e in browser.find_elements(by("css"), css)]  # type: ignore[attr-defined]
                assert any(holder in text for text in shown), (path, shown)
                if path == "/sent":  # and on each routine study it holds, where the doctor looks for one
                    cards = browser.find_elements(by("css"), ".journey")  # type: ignore[attr-defined]
                    notes = [e.text for e in browser.find_elements(by("css"), ".journey p.metered")]  # type: ignore[attr-defined]
                    assert len(cards) == len(notes) == 3 and all(holder in n for n in notes), notes
                boxes = lines_inside_the_screen(browser, css)
                for box in boxes:
                    assert box["left"] >= 0 and box["right"] <= box["width"], (path, box)
                    assert box["scroll"] <= box["client"], (path, box)  # no text cut inside it
                assert boxes and boxes[0]["page"] <= boxes[0]["width"], (path, boxes)  # no sideways scrolling
                shot = f"{path.strip('/')}-metered-{name}-phone-390"
                save_screenshot(browser, shot)
                line = next(e for e in browser.find_elements(by("css"), css) if holder in e.text)  # type: ignore[attr-defined]
                browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", line)  # type: ignore[attr-defined]
                save_screenshot(browser, shot + "-line", full_page=False)
        finally:
            set_viewport(browser, TABLET)
