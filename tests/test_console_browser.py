"""The doctor's console in a real browser (Debian's Chromium through chromium-driver).

Each test gets its own data directory and console (real HTTP on loopback, the real SSE path fed
by the acquire-side code writing clinic.db and the outbox) and logs in like a person. Screenshots
of each page, Chinese, on a phone and a tablet, land in $LASTMILE_SCREENSHOTS (default
tmp/console-screenshots).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from devices.identity import Patient
from lastmile.config import Config
from lastmile.console.service import ConsoleServer
from lastmile.console.sources import ReportView
from lastmile.data_dir import open_outbox
from tests.conftest import require_module
from tests.console_browser import (
    PHONE,
    TABLET,
    WAIT_S,
    by,
    log_in,
    on_page,
    save_screenshot,
    set_viewport,
    text_in,
    wait_for,
)
from tests.console_harness import (
    ADMIN,
    DOCTOR,
    VALID_ID,
    StaticReports,
    add_users,
    bp_reading,
    console_config,
    enqueue_ecg,
    record_readings,
    record_receipt_timed_bp,
    running_console,
    stand_in_lp,
    store_returned_reports,
)
from uploader.errors import CorruptPayloadError

pytestmark = pytest.mark.timeout(600)

T = TypeVar("T")
WRONG_CHECK = "110105194912310021"


@pytest.fixture
def console(tmp_path: Path) -> Iterator[ConsoleServer]:
    with running_console(console_config(tmp_path / "data")) as server:
        yield server


def live_stream_open(driver: object) -> None:
    wait_for(driver, lambda d: d.execute_script("return document.documentElement.dataset.live") == "on")


def live_events(driver: Any) -> int:
    """How many panel events the page has had from its stream (console.js counts them)."""
    return int(driver.execute_script("return document.documentElement.dataset.liveEvents || 0"))


# The Today page's live panels are swapped in by server-sent events whenever what they show
# changes; an element found a moment ago may be gone (stale) by the time it is read or clicked.
# Every read or click inside a live panel goes through these, which find the element afresh.


def _swapped() -> tuple[type[Exception], ...]:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    return (NoSuchElementException, StaleElementReferenceException)


def live_read(driver: object, read: Callable[[Any], T]) -> T:
    """`read(driver)`'s first truthy answer, retried while its element is missing or swapped out."""

    def attempt(d: object) -> T | bool:
        try:
            return read(d) or False
        except _swapped():
            return False

    return wait_for(driver, attempt)  # type: ignore[return-value]


def text_of(driver: object, css: str) -> str:
    """The live element's text (waits until it exists and has some)."""
    return live_read(driver, lambda d: str(d.find_element(by("css"), css).text))


def click_live(driver: object, kind: str, selector: str) -> None:
    """Click an element of a live panel; a click that met a swapped-out element never happened,
    so it is tried again on the element found afresh."""

    def click(d: Any) -> bool:
        d.find_element(by(kind), selector).click()
        return True

    live_read(driver, click)


def type_live(driver: object, selector: str, text: str) -> None:
    """Type into a field of a live panel, typed afresh if the panel swapped the field out."""

    def type_in(d: Any) -> bool:
        d.find_element(by("css"), selector).send_keys(text)
        return True

    live_read(driver, type_in)


def no_panel_swapped_on_connect(driver: object) -> None:
    """The stream's first round (every panel) has come and swapped nothing: the page had them."""
    live_stream_open(driver)
    wait_for(driver, lambda d: int(d.execute_script("return document.documentElement.dataset.liveEvents || 0")) >= 4)
    swapped = driver.execute_script(  # type: ignore[attr-defined]
        "return [...document.querySelectorAll('[data-live][data-updated]')].map(e => e.id)"
    )
    assert swapped == [], swapped


# -- flows -----------------------------------------------------------------------------------------


def test_keyboard_only_login(browser: object, console: ConsoleServer) -> None:
    """Name has the focus on arrival; Tab to the password, Enter logs in. No mouse."""
    from selenium.webdriver.common.keys import Keys

    browser.delete_all_cookies()
    browser.get(console.url + "/today")
    wait_for(browser, lambda d: "/login" in d.current_url)  # no session: sent to the login
    active = browser.switch_to.active_element
    assert active.get_attribute("id") == "name"
    active.send_keys(DOCTOR[0], Keys.TAB)
    active = browser.switch_to.active_element
    assert active.get_attribute("id") == "password"
    active.send_keys(DOCTOR[1], Keys.ENTER)
    wait_for(browser, on_page("/today"))
    assert browser.find_element(by("css"), "h1").text == "今天"
    # and on, by keyboard: the check-in field has the focus, ready for the scanner
    assert browser.switch_to.active_element.get_attribute("id") == "patient_id"
    no_panel_swapped_on_connect(browser)


def test_a_wrong_password_is_refused_in_chinese(browser: object, console: ConsoleServer) -> None:
    browser.delete_all_cookies()
    browser.get(console.url + "/login")
    browser.find_element(by("id"), "name").send_keys(DOCTOR[0])
    browser.find_element(by("id"), "password").send_keys("not the password\n")
    text_in(browser, "#login-error", "姓名或密码错误")
    assert "/login" in browser.current_url


def test_check_in_by_scanned_resident_id(browser: object, console: ConsoleServer) -> None:
    """A keyboard-wedge scanner types the number into the focused field and ends with Enter."""
    log_in(browser, console)
    field = browser.switch_to.active_element
    assert field.get_attribute("id") == "patient_id"  # focused on arrival: scan straight away
    field.send_keys(WRONG_CHECK + "\n")
    text_in(browser, "#form-error", "校验码")  # refused, in Chinese, saying what is wrong
    assert "没有登记患者" in text_of(browser, "#panel-session")
    field = browser.find_element(by("id"), "patient_id")
    field.clear()
    browser.find_element(by("id"), "reason").send_keys("胸痛")
    browser.find_element(by("css"), "input[name=stat]").click()
    field.send_keys(VALID_ID.lower() + "\n")  # a lower-case x from a phone keyboard is normalised
    text_in(browser, "#panel-session", VALID_ID)
    session = text_of(browser, "#panel-session")
    assert "急" in session and "胸痛" in session
    assert "患者已登记" in browser.find_element(by("css"), "p.done").text


def _console_process(config_file: Path, url: str) -> subprocess.Popen[bytes]:
    """`lastmile console` as systemd starts it, answering at `url`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lastmile", "-c", str(config_file), "console"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/login", timeout=5):
                return proc
        except (urllib.error.URLError, OSError):
            assert proc.poll() is None, f"the console ended ({proc.returncode})"
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the console did not answer at {url}")


def _console_process_configured(tmp_path: Path) -> tuple[Config, Path, ConsoleServer]:
    """A console's data directory with its users and its lastmile.toml (plain http), for
    _console_process: the configuration, its file, and where it answers (for log_in)."""
    config = console_config(tmp_path / "data")
    add_users(config)
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(
        f'[gateway]\ndata_dir = "{config.data_dir}"\n[gps]\nsource = "none"\n[outbox]\nmin_free_mb = 1\n'
        f'[console]\nlisten = "{config.console.listen}"\nhttps = false\n'
    )
    url = f"http://{config.console.listen}"
    return config, config_file, cast(ConsoleServer, type("Running", (), {"url": url}))


def _stopped(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_an_open_today_page_says_when_the_gateway_stopped_and_clears_when_it_is_back(
    browser: object, tmp_path: Path
) -> None:
    """The console process stops under an open Today page: its panels stay as they were, so a
    banner says the page is not current (once the gateway stopped, it still showed green
    "已连接" and live panels); it goes when the restarted console's stream opens again."""
    _config, config_file, server = _console_process_configured(tmp_path)
    proc = _console_process(config_file, server.url)
    try:
        set_viewport(browser, PHONE)
        log_in(browser, server)
        live_stream_open(browser)
        banner = browser.find_element(by("id"), "stream-down")
        assert not banner.is_displayed()
        _stopped(proc)
        wait_for(browser, lambda d: d.find_element(by("id"), "stream-down").is_displayed())
        assert browser.find_element(by("id"), "stream-down").text == "网关暂时没有响应，本页不是最新的。"
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the banner makes the page scroll sideways by {overflow}px on a phone"
        save_screenshot(browser, "today-gateway-stopped-phone", full_page=False)
        proc = _console_process(config_file, server.url)
        wait_for(browser, lambda d: not d.find_element(by("id"), "stream-down").is_displayed())
        live_stream_open(browser)
    finally:
        _stopped(proc)
        set_viewport(browser, TABLET)


def test_an_open_today_page_whose_login_ended_while_the_stream_was_down_goes_to_the_login_page(
    browser: object, tmp_path: Path
) -> None:
    """REV-FI 3: the stream dropped (the tablet slept, the gateway restarted) and the login ended
    meanwhile: the reconnect got "401 login required", the browser gave the stream up for good and
    the page said "网关暂时没有响应" for ever while the gateway was fine. Now the page is loaded
    afresh, and the login page follows."""
    config, config_file, server = _console_process_configured(tmp_path)
    proc = _console_process(config_file, server.url)
    try:
        log_in(browser, server)
        live_stream_open(browser)
        _stopped(proc)
        with sqlite3.connect(Path(config.data_dir) / "clinic.db") as db:  # the login timed out meanwhile
            db.execute("DELETE FROM console_logins")
        proc = _console_process(config_file, server.url)
        wait_for(browser, on_page("/login"))
    finally:
        _stopped(proc)


def _emulated_ble_clinic(config: Config, patient_id: str) -> threading.Thread:
    """The acquire side's real BLE path (bleak over an emulated radio) into the same data dir."""
    from lastmile.services.ble_devices import emulated_clinic

    result: dict[str, object] = {}

    def run() -> None:
        result["summary"] = asyncio.run(emulated_clinic(config, patient_id=patient_id, timeout_s=60.0))

    thread = threading.Thread(target=run, daemon=True)
    thread.result = result  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_a_ble_reading_appears_live_and_a_held_one_is_assigned(
    browser: object, console: ConsoleServer, tmp_path: Path
) -> None:
    require_module("bumble", "BLE emulation is the `emulation` extra")
    log_in(browser, console)
    browser.find_element(by("id"), "patient_id").send_keys(VALID_ID + "\n")
    text_in(browser, "#panel-session", VALID_ID)
    live_stream_open(browser)
    browser.execute_script("window.__sameDocument = true")
    ble = _emulated_ble_clinic(console.config, VALID_ID)
    # The cuff's "now" reading lands on the patient; its two older readings are held.
    text_in(browser, "#panel-readings", "118/76")
    text_in(browser, "#panel-held", "122/79")
    ble.join(90)
    summary = ble.result["summary"]  # type: ignore[attr-defined]
    assert summary.stored == 2 and summary.held == 2, summary.to_json()
    assert browser.execute_script("return window.__sameDocument") is True  # it came live, no reload
    readings = text_of(browser, "#panel-readings")
    assert "Demo BP Cuff" in readings and "118/76 mmHg" in readings and "脉搏 64" in readings
    save_screenshot(browser, "today-live-readings-tablet")
    set_viewport(browser, PHONE)
    save_screenshot(browser, "today-live-readings-phone")
    set_viewport(browser, TABLET)

    # both held readings are stored (the summary): wait for the panel to show both
    wait_for(browser, lambda d: len(d.find_elements(by("css"), "#panel-held li")) == 2)
    # measured before the check-in: the box offers nobody, the doctor types whose it is
    box = "#panel-held form.assign input[name=patient_id]"
    assert live_read(browser, lambda d: d.find_element(by("css"), box).get_attribute("value") == "")
    type_live(browser, box, VALID_ID)
    click_live(browser, "css", "#panel-held form.assign button")
    text_in(browser, "p.done", "已指定")
    assert len(browser.find_elements(by("css"), "#panel-held li")) == 1
    # the audit trail has who and when
    from lastmile.clinic.db import open_clinic_db
    from lastmile.console.audit import AuditLog

    db = open_clinic_db(console.config.data_dir)
    try:
        entry = AuditLog(db).latest("assign-reading", VALID_ID)
    finally:
        db.conn.close()
    assert entry is not None and entry.user_name == DOCTOR[0]


def test_a_reading_timed_on_receipt_is_badged_as_such_on_a_tablet_and_a_phone(
    browser: object, console: ConsoleServer
) -> None:
    """A cuff without a clock: its reading's time is when the gateway received it. Today says so
    beside the time (接收时间), live, legible on a tablet and, wrapped, on a phone."""
    log_in(browser, console)
    browser.find_element(by("id"), "patient_id").send_keys(VALID_ID + "\n")
    text_in(browser, "#panel-session", VALID_ID)
    live_stream_open(browser)
    record_receipt_timed_bp(console.config, "browser:receipt-time")
    text_in(browser, "#panel-readings", "131/84")
    item = '#panel-readings li[data-key="browser:receipt-time"]'
    badge = item + " .badge.amber"
    assert "接收时间" in text_of(browser, badge)
    assert "接收时间" in text_of(browser, item)  # in the reading's own line, not elsewhere
    save_screenshot(browser, "today-receipt-time-tablet")
    set_viewport(browser, PHONE)
    try:
        # on a phone the badge stays whole and inside the screen (wrapped under the reading)
        box = live_read(
            browser,
            lambda d: d.execute_script(
                "const b = document.querySelector(arguments[0]).getBoundingClientRect();"
                "return {left: b.left, right: b.right, height: b.height, width: innerWidth};",
                badge,
            ),
        )
        assert box["left"] >= 0 and box["right"] <= box["width"], box
        assert "接收时间" in text_of(browser, badge)
        save_screenshot(browser, "today-receipt-time-phone")
    finally:
        set_viewport(browser, TABLET)


def test_the_device_list_never_puts_the_last_patients_value_under_this_one(
    browser: object, console: ConsoleServer
) -> None:
    """A device's last value is whoever measured last (here the previous patient's 118/76): the
    Devices list on Today says whether a device is connected, never a value a doctor could read,
    or copy, as the checked-in patient's. Their own readings are listed under them."""
    from lastmile.clinic.devices import DeviceRegistry

    now = dt.datetime.now(dt.timezone.utc)
    registry = DeviceRegistry.open(console.config.data_dir)
    try:
        registry.allow("AA:BB:CC:DD:EE:09", now=now, name="Demo BP Cuff")
        registry.update_status("AA:BB:CC:DD:EE:09", now=now, connected=False, reading="118/76 mm[Hg]", reading_at=now)
    finally:
        registry.close()
    log_in(browser, console)
    browser.find_element(by("id"), "patient_id").send_keys(VALID_ID + "\n")
    text_in(browser, "#panel-session", VALID_ID)
    record_readings(console.config, bp_reading(dt.datetime.now(dt.timezone.utc), "browser:this-patient"))
    text_in(browser, "#panel-readings", "131/84")
    readings = text_of(browser, "#panel-readings")
    assert "Demo BP Cuff" in readings and "未连接" in readings
    assert "118/76" not in readings


def _enqueue_recording_of(config: Config, patient: Patient | None, key: str) -> None:
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from tests.ecg_factories import make_recording

    with open_outbox(config) as outbox:
        enqueue_recording(outbox, make_recording(7, patient=patient), config, key=key)


def test_the_ecg_under_a_checked_in_patient_is_only_ever_theirs(browser: object, console: ConsoleServer) -> None:
    """Nobody checked in: the ECG just recorded, saying whose (here nobody's). With a patient
    checked in: only that patient's newest ECG, never an unassigned one (it waits in "待指定患者")
    nor another patient's, with its re-record buttons, under their name."""
    _enqueue_recording_of(console.config, None, "browser:unassigned-ecg")
    log_in(browser, console)
    text_in(browser, "#panel-ecg", "无患者")
    browser.find_element(by("id"), "patient_id").send_keys(VALID_ID + "\n")
    text_in(browser, "#panel-session", VALID_ID)
    panel = text_of(browser, "#panel-ecg")
    assert "无患者" not in panel and "仍然发送" not in panel
    assert "该患者 12 小时内没有心电图" in panel
    _enqueue_recording_of(console.config, Patient("DEMO-0001", "Li^Wei"), "browser:another-patients-ecg")
    enqueue_ecg(console.config, lead_off=False)  # then this patient's
    text_in(browser, "#panel-ecg", VALID_ID)
    assert "DEMO-0001" not in text_of(browser, "#panel-ecg")


def test_an_ecg_preview_and_its_re_record_verdict(browser: object, console: ConsoleServer) -> None:
    log_in(browser, console)
    no_panel_swapped_on_connect(browser)
    enqueue_ecg(console.config, lead_off=True)  # the cart's file arrives while the page is open
    text_in(browser, "#panel-ecg", "需要重做")
    verdict = live_read(
        browser, lambda d: d.find_element(by("css"), "#panel-ecg [data-verdict]").get_attribute("data-verdict")
    )
    assert verdict == "re-record"
    panel = text_of(browser, "#panel-ecg")
    assert "V3 电极脱落" in panel and "心率" in panel
    # the verdict stored at intake shows at once; the preview follows when the worker has drawn it
    width = live_read(
        browser,
        lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth",
            d.find_element(by("css"), "#panel-ecg figure.preview img"),
        ),
    )
    assert width > 500
    set_viewport(browser, PHONE)
    # on a phone the page is a third of its size: only the printed page is at 25 mm/s, 10 mm/mV
    shown = live_read(browser, lambda d: d.find_element(by("css"), "#panel-ecg figure.preview img").rect["width"])
    caption = text_of(browser, "#panel-ecg figure.preview figcaption")
    assert shown < 400 and "实际比例" in caption and "查看" not in caption and "打印出来" in caption, (shown, caption)
    save_screenshot(browser, "today-ecg-re-record-phone")
    set_viewport(browser, TABLET)
    save_screenshot(browser, "today-ecg-re-record-tablet")
    click_live(browser, "xpath", "//div[@id='panel-ecg']//button[normalize-space()='重做，不发送这份']")
    text_in(browser, "p.done", "请重新做心电图")
    text_in(browser, "#panel-ecg", "新的记录会显示在这里")


def test_a_held_ecg_row_names_its_patient_and_its_re_record_button_is_the_panels(
    browser: object, console: ConsoleServer
) -> None:
    """The held row said 心电图 E4 19:26 · Mortara, not whose ECG it is, and called the one action
    "Recorded again: do not send this one" where the ECG panel said "Re-record" (the verdict "Record again")."""
    log_in(browser, console)
    no_panel_swapped_on_connect(browser)
    enqueue_ecg(console.config, lead_off=True)
    text_in(browser, "#panel-held [data-held-ecg]", "仍然发送")
    row = text_of(browser, "#panel-held [data-held-ecg]")
    assert VALID_ID in row and "Zhang San" in row, row
    text_in(browser, "#panel-ecg", "需要重做")
    assert "重做，不发送这份" in row and "重做，不发送这份" in text_of(browser, "#panel-ecg"), row


def re_record_form_of_a_held_ecg(browser: object, console: ConsoleServer) -> tuple[str, str]:
    """Logged in, an ECG to record again arrives: its panel's re-record form (action, csrf), as a
    page left open keeps it."""
    log_in(browser, console)
    no_panel_swapped_on_connect(browser)
    enqueue_ecg(console.config, lead_off=True)
    text_in(browser, "#panel-ecg", "重做，不发送这份")
    csrf = browser.find_element(by("css"), "#panel-ecg input[name='csrf']").get_attribute("value")  # type: ignore[attr-defined]
    action = browser.find_element(by("css"), "#panel-ecg form[action$='/re-record']").get_attribute("action")  # type: ignore[attr-defined]
    return action, csrf


def post_stale_form(browser: object, action: str, csrf: str) -> None:
    """A page left open from before sends its form (`action`) now."""
    browser.execute_script(  # type: ignore[attr-defined]
        "const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
        "const i = document.createElement('input'); i.name = 'csrf'; i.value = arguments[1];"
        "f.appendChild(i); document.body.appendChild(f); f.submit();",
        action,
        csrf,
    )


def test_a_re_record_ecg_sent_anyway_is_not_offered_to_re_record(browser: object, console: ConsoleServer) -> None:
    """重做 after 仍然发送: the panel said the ECG goes as it is, the notice said the new recording
    would be a new study, and the county got both. Once sent no re-record is offered, and a stale
    page's re-record says the ECG went as it is."""
    action, csrf = re_record_form_of_a_held_ecg(browser, console)
    click_live(browser, "xpath", "//div[@id='panel-ecg']//button[normalize-space()='仍然发送']")
    text_in(browser, "p.done", "按原样发送")
    text_in(browser, "#panel-ecg", "这份心电图会按原样发送到县里")
    panel = live_read(browser, lambda d: d.find_element(by("css"), "#panel-ecg").get_attribute("innerHTML"))
    assert "/re-record" not in panel, panel  # no re-record offered for an ECG on its way
    # a page left open from before: its re-record form is sent after the ECG was released
    post_stale_form(browser, action, csrf)
    text_in(browser, "p.done", "已经不再暂扣")
    assert "新的记录会作为一份新检查" not in text_of(browser, "p.done")


def test_a_second_re_record_click_says_the_ecg_is_kept_back_and_an_unknown_one_is_not_here(
    browser: object, console: ConsoleServer
) -> None:
    """重做 sent twice (a double click, or a second tablet's page): the second said the ECG was no
    longer held and went to the county as it was - it was kept back, never sent - and the panel lost
    its "record again" note. An ECG number not here said the same. Now: noted already, kept back;
    and not here."""
    action, csrf = re_record_form_of_a_held_ecg(browser, console)
    click_live(browser, "xpath", "//div[@id='panel-ecg']//button[normalize-space()='重做，不发送这份']")
    text_in(browser, "p.done", "请重新做心电图")
    post_stale_form(browser, action, csrf)  # the second click
    text_in(browser, "p.done", "不会发送")
    assert "不再暂扣" not in text_of(browser, "p.done"), text_of(browser, "p.done")
    text_in(browser, "#panel-ecg", "新的记录会显示在这里")
    post_stale_form(browser, re.sub(r"/\d+/re-record$", "/999999/re-record", action), csrf)
    text_in(browser, "p.done", "没有这份心电图")
    assert "不再暂扣" not in text_of(browser, "p.done"), text_of(browser, "p.done")


def test_re_record_of_an_ecg_set_aside_as_corrupt_says_it_is_not_sent_and_to_tell_the_county_it(
    browser: object, console: ConsoleServer
) -> None:
    """重做 on an ECG the outbox set aside since (its stored file found damaged) said it was no longer
    held and went to the county as it was: it is never sent. Now: not sent, see the queue, tell the
    county IT."""
    action, csrf = re_record_form_of_a_held_ecg(browser, console)
    match = re.search(r"/(\d+)/re-record$", action)
    assert match, action
    with open_outbox(console.config) as outbox:
        item = outbox.get(int(match.group(1)))
        assert item is not None
        path = outbox.payload_path(item)
        assert path is not None
        path.write_bytes(b"not the ECG that was stored")  # the SD card damaged it
        with pytest.raises(CorruptPayloadError):
            outbox.read_payload(item)  # the outbox checks it: set aside (quarantined), never sent
    post_stale_form(browser, action, csrf)
    text_in(browser, "p.done", "信息科")
    assert "不再暂扣" not in text_of(browser, "p.done"), text_of(browser, "p.done")
    assert "不会发送" in text_of(browser, "p.done"), text_of(browser, "p.done")


REPORTS = StaticReports(
    [
        ReportView(
            report_id="r-normal",
            study_uid="1.2.3.1",
            patient_id="DEMO-0002",
            patient_name="李伟",
            ecg_time=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=3),
            received_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1),
            status="received",
            critical=False,
            reading_doctor="县医院 赵医生",
            text="窦性心律，心电图正常。\nSinus rhythm, normal ECG.",
        ),
        ReportView(
            report_id="r-critical",
            study_uid="1.2.3.2",
            patient_id=VALID_ID,
            patient_name="张三",
            ecg_time=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2),
            received_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=20),
            status="received",
            critical=True,
            reading_doctor="县医院 赵医生",
            text="急性下壁心肌梗死（ST段抬高）。请立即转诊。\nAcute inferior STEMI: refer now.",
            quality_verdict="acceptable",
        ),
    ]
)


def test_a_returned_report_and_a_critical_alert(browser: object, tmp_path: Path) -> None:
    """Against reports given in memory (the real store: the next test)."""
    reports = StaticReports(list(REPORTS.items))  # acknowledging changes them: a copy per test
    with running_console(console_config(tmp_path / "data"), reports=reports) as server:
        log_in(browser, server)
        alert = browser.find_element(by("css"), "[role=alert].critical")
        assert "张三" in alert.text and "危急值" in alert.text  # on Today, impossible to miss
        browser.get(server.url + "/devices")
        assert browser.find_elements(by("css"), "[role=alert].critical")  # and on every page
        browser.get(server.url + "/reports")
        cards = browser.find_elements(by("css"), "ol.reports > li")
        assert [("critical" in c.get_attribute("class")) for c in cards] == [True, False]  # critical on top
        set_viewport(browser, TABLET)
        save_screenshot(browser, "reports-tablet")
        set_viewport(browser, PHONE)
        save_screenshot(browser, "reports-phone")
        set_viewport(browser, TABLET)
        browser.find_element(by("xpath"), "//button[normalize-space()='我已看到这个危急值']").click()
        wait_for(browser, lambda d: not d.find_elements(by("css"), "[role=alert].critical"))
        text_in(browser, "ol.reports", f"{DOCTOR[0]} 已于")
        browser.get(server.url + "/reports/r-critical")
        assert "急性下壁心肌梗死" in browser.find_element(by("css"), "pre.report-text").text
        save_screenshot(browser, "report-print-view-tablet")


def test_a_critical_result_shows_on_the_open_today_page_without_a_reload(browser: object, tmp_path: Path) -> None:
    """The county's critical report comes back while the doctor has Today open (the STAT patient in
    front of him): the banner was drawn only when a page loaded, so he learned of a STEMI only if he
    reloaded. It comes live now, without pulling away what he is typing, and goes once acknowledged."""
    config = console_config(tmp_path / "data")
    with running_console(config) as server:
        log_in(browser, server)
        live_stream_open(browser)
        wait_for(browser, lambda d: live_events(d) >= 4)  # the first round (the old code sent 4 panels)
        assert not browser.find_elements(by("css"), "[role=alert].critical")
        browser.execute_script("window.__sameDocument = true")
        typing = browser.find_element(by("id"), "patient_name")
        typing.click()
        typing.send_keys("李")
        critical_id, _routine = store_returned_reports(config)  # as the poller stores them
        from selenium.common.exceptions import TimeoutException

        try:  # within seconds (the stream is woken by clinic.db's change; 30 s: two busy cores)
            text_in(browser, "[role=alert].critical", "张三", timeout=30)
        except TimeoutException:
            shown = [e.text for e in browser.find_elements(by("css"), "[role=alert]") if e.is_displayed()]
            raise AssertionError(
                f"30 s after the critical report came back, the open Today page shows {shown}"
            ) from None
        banner = text_of(browser, "#panel-alerts")
        assert "危急值" in banner and VALID_ID in banner, banner
        assert browser.execute_script("return window.__sameDocument") is True  # live, no reload
        # the doctor typing a name lost neither his letter nor his place
        assert browser.find_element(by("id"), "patient_name").get_attribute("value") == "李"
        assert browser.execute_script("return document.activeElement.id") == "patient_name"
        save_screenshot(browser, "today-live-critical-banner-tablet")

        # loaded with the banner: the stream's first round leaves it as drawn (not announced twice)
        browser.refresh()
        live_stream_open(browser)
        wait_for(browser, lambda d: live_events(d) >= 5)  # the first round, the banner's event in it
        assert browser.find_element(by("id"), "panel-alerts").get_attribute("data-updated") is None

        # acknowledged elsewhere (`lastmile report ack`): the banner goes from the open page
        browser.execute_script("window.__sameDocument = true")
        from lastmile.reports.store import ReportStore

        with ReportStore.open(config.data_dir) as store:
            store.acknowledge(critical_id, "Dr Chen", dt.datetime.now(dt.timezone.utc))
        wait_for(browser, lambda d: not d.find_elements(by("css"), "[role=alert].critical"))
        assert browser.execute_script("return window.__sameDocument") is True


def test_a_critical_result_shows_on_an_open_sent_page_too(browser: object, tmp_path: Path) -> None:
    """The doctor waits on the Sent page for the STAT ECG to go out: the result comes back while
    he looks there, and the banner comes to that page too (its stream sends the banner alone)."""
    config = console_config(tmp_path / "data")
    with running_console(config) as server:
        log_in(browser, server)
        browser.get(server.url + "/sent")
        live_stream_open(browser)
        wait_for(browser, lambda d: live_events(d) >= 1)  # the first round: the banner, as drawn
        assert browser.find_element(by("id"), "panel-alerts").get_attribute("data-updated") is None
        assert not browser.find_elements(by("css"), "[role=alert].critical")
        browser.execute_script("window.__sameDocument = true")
        store_returned_reports(config)
        from selenium.common.exceptions import TimeoutException

        try:
            text_in(browser, "[role=alert].critical", "张三", timeout=30)
        except TimeoutException:
            shown = [e.text for e in browser.find_elements(by("css"), "[role=alert]") if e.is_displayed()]
            raise AssertionError(
                f"30 s after the critical report came back, the open Sent page shows {shown}"
            ) from None
        assert browser.execute_script("return window.__sameDocument") is True  # live, no reload


def test_a_report_printed_on_the_clinic_printer_from_a_phone(
    browser: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doctor's phone sends the county's report to the clinic printer (CUPS's `lp`: a stand-in
    that keeps the job); the page says it was sent, in Chinese."""
    spool = stand_in_lp(tmp_path, monkeypatch)
    config = console_config(tmp_path / "data")
    _critical, routine = store_returned_reports(config)
    with running_console(config) as server:
        log_in(browser, server)
        set_viewport(browser, PHONE)
        try:
            browser.get(f"{server.url}/reports/{routine}")
            text_in(browser, "pre.report-text", "窦性心律")
            # the cardiologist's conclusion first, under its own heading, then the whole report
            assert "窦性心律，心电图正常" in text_of(browser, ".conclusion .impression")
            assert "诊断意见" in text_of(browser, ".conclusion h2")
            save_screenshot(browser, "report-print-buttons-phone")
            browser.find_element(by("xpath"), "//button[normalize-space()='用诊所打印机打印']").click()
            text_in(browser, "[role=status]", "已发送到诊所打印机")
            save_screenshot(browser, "report-printed-phone")
        finally:
            set_viewport(browser, TABLET)
    assert "窦性心律，心电图正常" in spool.read_text(encoding="utf-8")  # the job the printer got


def test_the_whole_report_in_chinese_on_a_phone(browser: object, tmp_path: Path) -> None:
    """报告全文 on the village doctor's phone: the gateway's words around the county's report in
    Chinese (amended, critical, no value, read by, could not read), the county's words as written."""
    from lastmile.demo.cardiologist import part10
    from lastmile.reports.store import ReportStore, SentStudy
    from tests.report_samples import RULES, STUDY, everything_sr
    from uploader.report_reading import read_dicom_report

    config = console_config(tmp_path / "data")
    now = dt.datetime.now(dt.timezone.utc)
    with ReportStore.open(config.data_dir) as store:
        store.record_sent(
            SentStudy(
                STUDY.study_uid,
                now,
                patient_id=STUDY.patient_id,
                patient_name=STUDY.patient_name,
                ecg_time=(now - dt.timedelta(hours=1)).isoformat(),
            )
        )
        data = part10(everything_sr())
        report = store.add_report(read_dicom_report(data, RULES), data, "dicom", now).report
    with running_console(config) as server:
        log_in(browser, server)
        set_viewport(browser, PHONE)
        try:
            browser.get(f"{server.url}/reports/{report.id}")
            text = text_of(browser, "pre.report-text")
            for chinese in (
                "已更正：替代之前的 1 份报告",
                "心率：（无数值）",
                "诊断医生：李明",
                "无法读取：",
            ):
                assert chinese in text, text
            for english in ("AMENDED", "CRITICAL RESULT", "(no value)", "Read by", "Could not read"):
                assert english not in text, text
            assert (
                "诊断意见：急性前壁心肌梗死，危急值，请立即转诊" in text
            )  # DCM 121073 in Chinese, the words as written
            reason = text_of(browser, ".report-full > p strong")
            assert "县里报告写明“危急值”" in reason  # why critical, in Chinese
            # the coded reason in Chinese; its code (for a county technician) folded away apart
            assert "所见：急性ST段抬高型心肌梗死" in reason and "SCT" not in reason, reason
            code = browser.find_element(by("css"), ".report-full > details.reason-code span")
            assert "SCT 401303003" in (code.get_attribute("textContent") or "")
            assert "所见" in text and "Findings" not in text, text  # DICOM's headings in Chinese
            save_screenshot(browser, "report-whole-text-zh-phone")
        finally:
            set_viewport(browser, TABLET)


def test_a_critical_report_prints_as_a_patient_may_read_it_its_codes_for_the_technician(
    browser: object, tmp_path: Path
) -> None:
    """REV-R finding 6: the zh-CN report page and its printout said "SCT 401303003 · Acute ST segment
    elevation myocardial infarction" and the keyword "in: Impression: ...", and the paper repeated
    the whole report under 报告全文 with "==========" and "Observer Type: Person" (in Chinese). The code and the
    county's English are now the technician's, folded away and never printed."""
    from lastmile.demo.cardiologist import STEMI, ecg_report_sr, part10
    from lastmile.reports.store import ReportStore, SentStudy
    from tests.report_samples import RULES, STUDY
    from uploader.report_reading import read_dicom_report

    config = console_config(tmp_path / "data")
    now = dt.datetime.now(dt.timezone.utc)
    sr = ecg_report_sr(
        STUDY, findings=["窦性心律"], impression="急性前壁心肌梗死（危急值），请立即转诊", coded_findings=[STEMI]
    )
    with ReportStore.open(config.data_dir) as store:
        store.record_sent(SentStudy(STUDY.study_uid, now, patient_id=STUDY.patient_id, patient_name=STUDY.patient_name))
        report = store.add_report(read_dicom_report(part10(sr), RULES), part10(sr), "dicom", now).report
    assert report.critical
    with running_console(config) as server:
        log_in(browser, server)
        browser.get(f"{server.url}/reports/{report.id}")
        reason = text_of(browser, ".report-full > p strong")
        assert "县里报告写明“危急值”：急性前壁心肌梗死（危急值），请立即转诊" in reason, reason
        technician = browser.find_element(by("css"), ".report-full > details.reason-code")
        assert technician.get_attribute("open") is None  # folded: the doctor opens it only if asked
        assert "SCT 401303003" in (technician.get_attribute("textContent") or "")
        on_screen = text_of(browser, "main")
        assert "SCT" not in on_screen and "Acute" not in on_screen and "关键词" not in on_screen, on_screen
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})  # type: ignore[attr-defined]
        try:
            paper = cast(str, browser.execute_script("return document.body.innerText"))  # type: ignore[attr-defined]
            save_screenshot(browser, "report-critical-print")
        finally:
            browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})  # type: ignore[attr-defined]
    for said in ("县里报告写明“危急值”", "急性ST段抬高型心肌梗死", "请立即转诊", "诊断医生"):
        assert said in paper, paper
    for unsaid in ("SCT", "401303003", "Acute", "==", "观察者", "关键词", "技术人员"):
        assert unsaid not in paper, (unsaid, paper)


def test_a_report_stored_before_the_codes_were_kept_reads_in_chinese(browser: object, tmp_path: Path) -> None:
    """Issue s39-G: a report stored before the gateway kept the county's concept codes (its lines
    as the older gateway wrote them to clinic.db: no codes) showed DICOM's English on a Chinese
    page - "Findings", "Observer Type: Person", the coded STEMI in the body."""
    from dataclasses import replace

    from lastmile.demo.cardiologist import STEMI, ecg_report_sr, part10
    from lastmile.reports.store import ReportStore, SentStudy
    from tests.report_samples import RULES, STUDY
    from uploader.report_reading import read_dicom_report

    config = console_config(tmp_path / "data")
    now = dt.datetime.now(dt.timezone.utc)
    sr = ecg_report_sr(STUDY, findings=["窦性心律"], impression="急性前壁心肌梗死，请立即转诊", coded_findings=[STEMI])
    content = read_dicom_report(part10(sr), RULES)
    uncoded = tuple(replace(line, concept="", value_concept="") for line in content.lines)
    with ReportStore.open(config.data_dir) as store:
        store.record_sent(SentStudy(STUDY.study_uid, now, patient_id=STUDY.patient_id, patient_name=STUDY.patient_name))
        report = store.add_report(replace(content, lines=uncoded), part10(sr), "dicom", now).report
        stored = store.db.conn.execute("SELECT lines FROM reports WHERE id = ?", (report.id,)).fetchone()[0]
    assert "concept" not in stored  # the row as the older gateway wrote it
    with running_console(config) as server:
        log_in(browser, server)
        browser.get(f"{server.url}/reports/{report.id}")
        text = text_of(browser, "pre.report-text")
        assert text.startswith("心电图报告") and "  所见：窦性心律" in text, text
        assert "  所见：急性ST段抬高型心肌梗死" in text and "诊断意见" in text, text
        for english in ("ECG Report", "Findings", "Observer Type", "Person", "Impression", "Acute ST"):
            assert english not in text, text
        # the page's list of findings above it (kept as words, never with codes): the same rule
        findings = text_of(browser, "section[aria-labelledby=h-findings]")
        assert "急性ST段抬高型心肌梗死" in findings and "Acute ST" not in findings, findings


def _cli_json(args: list[str]) -> object:
    """A `lastmile` command's --json answer, from its own process (the CLI's view of the state)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lastmile", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_real_reports_and_a_real_held_ecg(browser: object, tmp_path: Path) -> None:
    """The console over the real stores: a report the county returned (report store) is on the
    Reports page, critical first and unread ones marked; acknowledging it there is what `lastmile
    report list` sees. A held ECG (outbox hold) is assigned from Today and `lastmile patient show`
    no longer holds it."""
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from tests.ecg_factories import make_recording

    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0  # a 2 s synthetic ECG is a re-record case: the patient hold is the subject
    critical_id, routine_id = store_returned_reports(config)
    with open_outbox(config) as outbox:
        held = enqueue_recording(outbox, make_recording(7, patient=None), config, key="held-ecg").item
    assert held.hold_reason == "unassigned"
    data_dir = ["--data-dir", str(config.data_dir)]
    with running_console(config) as server:
        log_in(browser, server)
        alert_text = text_of(browser, "[role=alert].critical")
        assert "张三" in alert_text  # the real critical report, on Today

        # the held ECG, assigned from the page: the outbox item is rebuilt for the patient
        row_text = text_of(browser, f"#panel-held li[data-held-ecg='{held.id}']")
        assert f"E{held.id}" in row_text
        set_viewport(browser, PHONE)
        save_screenshot(browser, "today-held-ecg-phone")
        set_viewport(browser, TABLET)
        # Once a field in the live panel has the focus, console.js holds swaps back: focus the
        # row's field first (found afresh), then type and send.
        row_css = f"#panel-held li[data-held-ecg='{held.id}']"
        click_live(browser, "css", f"{row_css} input[name=patient_id]")
        row = browser.find_element(by("css"), row_css)
        field = row.find_element(by("css"), "input[name=patient_id]")
        field.clear()
        field.send_keys(VALID_ID)
        row.find_element(by("css"), "form.assign button").click()
        text_in(browser, "p.done", "已指定")
        assert not browser.find_elements(by("css"), f"#panel-held li[data-held-ecg='{held.id}']")
        shown = _cli_json(["patient", "show", "--json", *data_dir])
        assert shown["held_ecgs"] == []  # type: ignore[index]
        with open_outbox(config) as outbox:
            item = outbox.get(held.id)
        assert item is not None and item.patient is not None and item.patient["patient_id"] == VALID_ID
        assert item.hold_until is None and "patient-assigned-by-doctor" in item.meta["flags"]

        # the reports page: the real reports, critical first, both unread
        browser.get(server.url + "/reports")
        cards = browser.find_elements(by("css"), "ol.reports > li")
        assert [c.get_attribute("data-report") for c in cards] == [str(critical_id), str(routine_id)]
        assert ["critical" in c.get_attribute("class") for c in cards] == [True, False]
        assert all("unread" in c.get_attribute("class") for c in cards)
        # why it is critical, on the card, in Chinese (the code and the county's English: the report page's details)
        assert "所见：急性ST段抬高型心肌梗死" in cards[0].text and "Acute" not in cards[0].text, cards[0].text
        assert "发送时心电图质量：合格" in cards[0].text  # the ECG's quality when it was sent (issue 14)
        set_viewport(browser, TABLET)
        save_screenshot(browser, "reports-real-store-tablet")
        browser.find_element(by("xpath"), "//button[normalize-space()='我已看到这个危急值']").click()
        wait_for(browser, lambda d: not d.find_elements(by("css"), "[role=alert].critical"))
        # opening the routine one reads it
        browser.find_element(by("css"), f"a[href='/reports/{routine_id}']").click()
        text_in(browser, "pre.report-text", "窦性心律")
        assert "合格，但有问题" in browser.find_element(by("css"), "dl.facts").text  # its ECG's quality when sent
        listed = {s["patient_id"]: s for s in _cli_json(["report", "list", "--json", *data_dir])}  # type: ignore[union-attr]
        for patient in (VALID_ID, "DEMO-0002"):
            assert listed[patient]["reports"][0]["acknowledged_by"] == DOCTOR[0], listed[patient]
        assert listed[VALID_ID]["status"] == "critical (seen)"


def test_switch_language_per_user(browser: object, console: ConsoleServer) -> None:
    log_in(browser, console)
    assert browser.find_element(by("css"), "html").get_attribute("lang") == "zh-CN"
    browser.find_element(by("xpath"), "//button[@value='en']").click()
    text_in(browser, "h1", "Today")
    assert browser.find_element(by("css"), "html").get_attribute("lang") == "en"
    # the choice is the user's: a fresh login (new cookies) keeps it
    log_in(browser, console)
    text_in(browser, "h1", "Today")
    save_screenshot(browser, "today-english-tablet")
    browser.find_element(by("xpath"), "//button[@value='zh-CN']").click()
    text_in(browser, "h1", "今天")


PAGES = ("today", "sent", "reports", "devices", "visits", "system")


def low_battery_cuff(config: Config) -> None:
    """A paired cuff whose battery is low (its longest line, on Devices and on Today)."""
    from lastmile.clinic.devices import DeviceRegistry

    registry = DeviceRegistry.open(config.data_dir)
    try:
        now = dt.datetime.now(dt.timezone.utc)
        registry.allow("C0:FF:EE:00:00:01", now=now, name="血压计（1号诊室）")
        registry.update_status("C0:FF:EE:00:00:01", now=now, connected=True, battery_level=15)
    finally:
        registry.close()


def test_every_page_on_a_phone_and_a_tablet(browser: object, tmp_path: Path) -> None:
    """No sideways scrolling at 360 px, every page in Chinese; a screenshot of each (the System
    page with an update installed and waiting for a quiet moment to reboot)."""
    from lastmile.clock import read_boot_id
    from lastmile.services.update import STATE_FILE, UPDATES_DIR, UpdateState

    config = console_config(tmp_path / "data")
    config.update.enabled = True
    (config.data_dir / UPDATES_DIR).mkdir(parents=True)
    pending = {"version": "0.3.0", "sha256": "0" * 64, "at": 1.0, "boot_id": read_boot_id()}
    UpdateState(installed=pending).save(config.data_dir / UPDATES_DIR / STATE_FILE)
    low_battery_cuff(config)
    with running_console(config, reports=REPORTS) as server:
        enqueue_ecg(config, lead_off=False)
        log_in(browser, server, ADMIN)
        browser.find_element(by("id"), "patient_name").send_keys("张三")
        browser.find_element(by("id"), "reason").send_keys("胸痛")
        browser.find_element(by("css"), "input[name=stat]").click()
        browser.find_element(by("id"), "patient_id").send_keys(VALID_ID + "\n")
        text_in(browser, "#panel-session", VALID_ID)
        text_in(browser, "#panel-ecg", "合格", timeout=WAIT_S)
        for name, size in (("phone", PHONE), ("tablet", TABLET)):
            set_viewport(browser, size)
            for page in PAGES:
                browser.get(f"{server.url}/{page}")
                assert browser.find_element(by("css"), "html").get_attribute("lang") == "zh-CN"
                overflow = browser.execute_script(
                    "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
                )
                assert overflow <= 0, f"{page} scrolls sideways by {overflow}px on a {name}"
                if page in ("today", "devices"):
                    assert "电量低（15%" in browser.find_element(by("css"), "main").text
                if page == "today":
                    wait_for(browser, lambda d: d.find_elements(by("css"), "#panel-ecg figure.preview img"))
                if page == "system":
                    shown = browser.find_element(by("css"), "body").text
                    assert "新版本 0.3.0 已就绪" in shown
                    # a warning's advice in Chinese; its technical message folded away
                    assert "县里暂时无法远程查看本网关：请告知县信息科。" in shown and "nothing answers on" not in shown
                save_screenshot(browser, f"{page}-{name}")
        set_viewport(browser, TABLET)
