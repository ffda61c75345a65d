"""Check-in, check-out, assigning and logging in, in a real Chromium, in Chinese: the page never
drops what the doctor said (STAT, reason, name) and says what became of each patient.

Each test has its own data directory and console (real HTTP on loopback); the module shares one
browser (tests/conftest.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lastmile.cli import main
from lastmile.clinic.db import open_clinic_db
from lastmile.clinic.device_users import DeviceUsers
from lastmile.clinic.patients import CurrentPatient, PatientContext
from lastmile.config import Config
from lastmile.console.audit import AuditLog
from lastmile.console.service import ConsoleServer
from lastmile.data_dir import open_outbox
from tests.console_browser import PHONE, TABLET, by, log_in, on_page, save_screenshot, set_viewport, text_in, wait_for
from tests.console_harness import (
    DOCTOR,
    VALID_ID,
    bp_reading,
    console_config,
    hold_readings,
    record_readings,
    running_console,
)

pytestmark = pytest.mark.timeout(600)

OTHER_ID = "110105198001010016"  # 李四


@pytest.fixture
def console(tmp_path: Path) -> Iterator[ConsoleServer]:
    with running_console(console_config(tmp_path / "data")) as server:
        yield server


def checked_in(config: Config) -> CurrentPatient | None:
    """The clinic session's patient, as the acquire service sees it (clinic.db)."""
    db = open_clinic_db(config.data_dir)
    try:
        return PatientContext(db, config.patient.idle_timeout_s).current(dt.datetime.now(dt.timezone.utc))
    finally:
        db.conn.close()


def submitted(driver: object, act: Callable[[Any], object]) -> None:
    """`act(driver)` submits a form: wait until the browser shows the page that answered it."""
    driver.execute_script("window.__beforeSubmit = true")  # type: ignore[attr-defined]
    act(driver)
    wait_for(
        driver,
        lambda d: d.execute_script("return document.readyState === 'complete' && !window.__beforeSubmit"),
    )


def click(css: str) -> Callable[[Any], object]:
    return lambda d: d.find_element(by("css"), css).click()


def check_in(driver: object, patient_id: str, *, name: str = "", reason: str = "", stat: bool = False) -> None:
    """Fill Today's check-in form as a doctor does (it is empty on every visit) and submit it."""
    for field, text in (("patient_name", name), ("reason", reason)):
        if text:
            driver.find_element(by("id"), field).send_keys(text)  # type: ignore[attr-defined]
    if stat:
        driver.find_element(by("css"), "input[name=stat]").click()  # type: ignore[attr-defined]
    submitted(driver, lambda d: d.find_element(by("id"), "patient_id").send_keys(patient_id + "\n"))


def done_text(driver: object) -> str:
    return str(driver.find_element(by("css"), "p.done").text)  # type: ignore[attr-defined]


def session_text(driver: object) -> str:
    return str(driver.find_element(by("id"), "panel-session").text)  # type: ignore[attr-defined]


def test_checking_the_same_patient_in_again_keeps_stat_reason_and_name(browser: object, console: ConsoleServer) -> None:
    """李四 is checked in as 急 with 胸痛. The ID is scanned again into the (empty) form: the page
    said 患者已登记, the badge and reason were gone and the next ECG went to the county ROUTINE.
    Now STAT, reason and name stay, the page says nothing changed; turning STAT off is a button
    of its own, and the page says so."""
    log_in(browser, console)
    check_in(browser, OTHER_ID, name="李四", reason="胸痛", stat=True)
    text_in(browser, "#panel-session", "急")
    check_in(browser, OTHER_ID)
    current = checked_in(console.config)
    assert current is not None and current.stat and current.reason == "胸痛" and "李^四" in current.name, current
    session = session_text(browser)
    assert "急" in session and "胸痛" in session and "李四" in session, session
    assert "没有改动" in done_text(browser), done_text(browser)
    # a new reason typed replaces the old one, and the page says what changed
    check_in(browser, OTHER_ID, reason="心悸")
    current = checked_in(console.config)
    assert current is not None and current.stat and current.reason == "心悸", current
    assert "原因改为：心悸" in done_text(browser), done_text(browser)
    # the doctor turns STAT off on purpose
    submitted(browser, click("#not-stat button"))
    assert "已取消加急" in done_text(browser), done_text(browser)
    current = checked_in(console.config)
    assert current is not None and not current.stat and current.reason == "心悸", current
    db = open_clinic_db(console.config.data_dir)
    try:
        entry = AuditLog(db).latest("check-in", OTHER_ID)
    finally:
        db.conn.close()
    assert entry is not None and entry.detail.get("changed") == ["stat-off"], entry


def confirm_clear(driver: object, which: str) -> None:
    """Press the session's 清除姓名 / 清除原因 (`which`: name, reason), then 确认 on the page that asks."""
    submitted(driver, click(f"#clear-{which} button"))
    submitted(driver, click("#confirm-clear button[name=confirmed]"))


def test_a_wrong_name_or_reason_checked_in_can_be_cleared(browser: object, console: ConsoleServer) -> None:
    """李四 was checked in under a wrong name, with a wrong STAT reason. Checking her in again with
    the fields emptied kept both (empty means "as it was"), and they went to the county with the
    ECG. Now 清除姓名 / 清除原因 beside them clear each, once confirmed: the session (the next ECG's
    patient) has no name, then no reason, STAT stays, and the page says what was cleared - not
    "已在就诊中" (the words for checking her in again), which is not what the doctor did."""
    log_in(browser, console)
    check_in(browser, OTHER_ID, name="王五", reason="胸痛", stat=True)
    text_in(browser, "#panel-session", "王五")
    confirm_clear(browser, "name")
    assert done_text(browser).startswith("已清除姓名"), done_text(browser)
    assert "已在就诊中" not in done_text(browser), done_text(browser)
    current = checked_in(console.config)
    assert current is not None and current.name == "" and current.reason == "胸痛" and current.stat, current
    assert "王五" not in session_text(browser) and "未填姓名" in session_text(browser), session_text(browser)
    confirm_clear(browser, "reason")
    assert done_text(browser).startswith("已清除原因"), done_text(browser)
    current = checked_in(console.config)
    assert current is not None and current.name == "" and current.reason == "" and current.stat, current
    assert not browser.find_elements(by("css"), "#clear-name, #clear-reason")  # type: ignore[attr-defined]


def test_a_clear_not_confirmed_changes_nothing(browser: object, console: ConsoleServer) -> None:
    """清除姓名 cleared 王五's name at one tap: a slip of the thumb beside 不急了 took the name off
    the next ECG with the patient in front of the doctor. Now the tap asks first, naming what goes;
    going back to Today instead keeps the name and the reason."""
    log_in(browser, console)
    check_in(browser, OTHER_ID, name="王五", reason="胸痛", stat=True)
    text_in(browser, "#panel-session", "王五")
    for which in ("name", "reason"):
        submitted(browser, click(f"#clear-{which} button"))
        current = checked_in(console.config)
        assert current is not None and "王^五" in current.name and current.reason == "胸痛", current
        asked = browser.find_element(by("id"), "confirm-clear").text  # type: ignore[attr-defined]
        assert ("王五" if which == "name" else "胸痛") in asked and OTHER_ID in asked, asked
        submitted(browser, click("#confirm-clear a[href='/today']"))
        wait_for(browser, on_page("/today"))
        current = checked_in(console.config)
        assert current is not None and "王^五" in current.name and current.reason == "胸痛", current
        assert not browser.find_elements(by("css"), "p.done"), "a notice for a clear that did not happen"  # type: ignore[attr-defined]


CLINIC_NUMBER = "MZ-0042"  # 王五's clinic number; VALID_ID is his ID card number


def name_known_for(config: Config, patient_id: str) -> str:
    """The name the gateway gives `patient_id` (a mapping or an assignment to it is sent so)."""
    db = open_clinic_db(config.data_dir)
    try:
        return PatientContext(db, config.patient.idle_timeout_s).known_name(
            patient_id, dt.datetime.now(dt.timezone.utc)
        )
    finally:
        db.conn.close()


def reading_goes_to(config: Config, key: str) -> dict[str, Any]:
    """A BP reading arriving now, as the acquire service records it: the outbox row's patient."""
    [result] = record_readings(config, bp_reading(dt.datetime.now(dt.timezone.utc), key))
    assert result.outcome == "stored" and result.item_id is not None, result
    with open_outbox(config) as outbox:
        item = outbox.get(result.item_id)
    assert item is not None and item.patient is not None, item
    return item.patient


def checked_in_under_his_other_number(driver: object, console: ConsoleServer) -> None:
    """王五 is checked in by his ID card number, then, still checked in, by his clinic number: the
    page asks which it is, in Chinese, and nothing changes before the doctor answers."""
    log_in(driver, console)
    check_in(driver, VALID_ID, name="王五")
    text_in(driver, "#panel-session", VALID_ID)
    check_in(driver, CLINIC_NUMBER, name="王五")
    asked = driver.find_element(by("id"), "confirm-other-id").text  # type: ignore[attr-defined]
    assert f"王五 已用 {VALID_ID} 登记就诊。{CLINIC_NUMBER} 是：" in asked, asked
    assert f"更正输错的号码（替换 {VALID_ID}）" in asked and "同一人的另一个号码（两个都保留）" in asked, asked
    current = checked_in(console.config)
    assert current is not None and current.patient_id == VALID_ID, current


def test_a_patients_other_number_checked_in_keeps_both_numbers_and_names(
    browser: object, console: ConsoleServer
) -> None:
    """王五 was checked in by his ID card number and, still checked in, by his clinic number under
    the same name: the gateway took it for a mistyped number corrected, and his ID card number
    lost his name (a guess from words; both numbers are his). Now the page asks; "the same
    person's other number" keeps both numbers named 王五, and the next reading goes to the clinic
    number, named."""
    checked_in_under_his_other_number(browser, console)
    set_viewport(browser, (360, 800))
    save_screenshot(browser, "confirm-other-id-360x800")
    set_viewport(browser, TABLET)
    submitted(browser, click("#confirm-other-id button[value=other-id]"))
    wait_for(browser, on_page("/today"))
    said = browser.find_element(by("id"), "id-answer").text  # type: ignore[attr-defined]
    assert CLINIC_NUMBER in said and VALID_ID in said and "王五" in said, said
    current = checked_in(console.config)
    assert current is not None and current.patient_id == CLINIC_NUMBER and "王^五" in current.name, current
    assert "王^五" in name_known_for(console.config, VALID_ID)
    assert "王^五" in name_known_for(console.config, CLINIC_NUMBER)
    patient = reading_goes_to(console.config, "bp-after-other-id")
    assert patient["patient_id"] == CLINIC_NUMBER and "王^五" in patient["name"], patient


def test_his_reading_under_his_first_number_stays_on_todays_readings(browser: object, console: ConsoleServer) -> None:
    """王五's BP is taken under his ID card number; the doctor then checks him in under his clinic
    number, "his other number". Today's readings listed the clinic number's only: his first BP was
    gone from the page. Now his readings under both numbers are listed, each with its number."""
    checked_in_under_his_other_number(browser, console)
    assert reading_goes_to(console.config, "bp-id-card")["patient_id"] == VALID_ID  # before the answer
    submitted(browser, click("#confirm-other-id button[value=other-id]"))
    wait_for(browser, on_page("/today"))
    assert reading_goes_to(console.config, "bp-clinic-number")["patient_id"] == CLINIC_NUMBER
    browser.get(console.url + "/today")  # type: ignore[attr-defined]  # the page as it is drawn now
    listed = {
        li.get_attribute("data-key"): li.text
        for li in browser.find_elements(by("css"), "#panel-readings li[data-key]")  # type: ignore[attr-defined]
    }
    assert sorted(listed) == ["bp-clinic-number", "bp-id-card"], listed
    assert VALID_ID in listed["bp-id-card"] and CLINIC_NUMBER in listed["bp-clinic-number"], listed


def test_a_mistyped_number_corrected_replaces_it(browser: object, console: ConsoleServer) -> None:
    """The same question answered "a mistyped number corrected": as before, the first number is
    replaced and names nobody, the next reading goes to the corrected number; going back first
    changes nothing."""
    checked_in_under_his_other_number(browser, console)
    submitted(browser, click("#confirm-other-id a[href='/today']"))
    current = checked_in(console.config)
    assert current is not None and current.patient_id == VALID_ID, current
    check_in(browser, CLINIC_NUMBER, name="王五")
    submitted(browser, click("#confirm-other-id button[value=corrected]"))
    wait_for(browser, on_page("/today"))
    said = browser.find_element(by("id"), "id-answer").text  # type: ignore[attr-defined]
    assert VALID_ID in said and CLINIC_NUMBER in said, said
    current = checked_in(console.config)
    assert current is not None and current.patient_id == CLINIC_NUMBER and "王^五" in current.name, current
    assert name_known_for(console.config, VALID_ID) == ""
    patient = reading_goes_to(console.config, "bp-after-correction")
    assert patient["patient_id"] == CLINIC_NUMBER and "王^五" in patient["name"], patient


def test_another_patient_of_the_same_name_ends_the_first_ones_check_in(browser: object, console: ConsoleServer) -> None:
    """王五 (急, 胸痛) is checked in; the next patient is another 王五 and the doctor forgot to end
    the first's check-in. The page offered only "a mistyped number" or "his other number": either
    put the first man's triage or name on the wrong patient. A third answer says so: the first
    王五's check-in ends (he keeps his name), the second starts routine, the next reading is his."""
    log_in(browser, console)
    check_in(browser, VALID_ID, name="王五", reason="胸痛", stat=True)
    text_in(browser, "#panel-session", "急")
    check_in(browser, CLINIC_NUMBER, name="王五")
    asked = browser.find_element(by("id"), "confirm-other-id").text  # type: ignore[attr-defined]
    assert f"另一位同名的患者（结束 {VALID_ID} 的就诊）" in asked, asked
    submitted(browser, click("#confirm-other-id button[value=another-person]"))
    wait_for(browser, on_page("/today"))
    text_in(browser, "#panel-session", CLINIC_NUMBER)
    session = session_text(browser)
    assert "急" not in session and "胸痛" not in session, session
    current = checked_in(console.config)
    assert current is not None and (current.patient_id, current.stat, current.reason) == (CLINIC_NUMBER, False, "")
    assert "王^五" in name_known_for(console.config, VALID_ID)
    patient = reading_goes_to(console.config, "bp-another-wang-wu")
    assert patient["patient_id"] == CLINIC_NUMBER and "王^五" in patient["name"], patient


@pytest.mark.parametrize("before", [(), (OTHER_ID, "李四")], ids=["nobody", "another-name"])
def test_a_card_read_while_today_asks_is_never_taken_for_a_number_corrected(
    browser: object, console: ConsoleServer, monkeypatch: pytest.MonkeyPatch, before: tuple[str, ...]
) -> None:
    """Nobody (or 李四) is checked in; the doctor checks 王五 in by his clinic number. Today asked
    whether that replaces the checked-in patient under his own name (no one to ask about), then
    checked in: two steps. 王五's ID card, read at the acquire service between the two, was then
    replaced unasked, as a mistyped number corrected: his ID card number lost his name, his
    readings went on under the clinic number. Now the check-in expects whom the ask saw: refused,
    Today says his card's check-in came since and goes on (named), the form keeps what was typed."""
    log_in(browser, console)
    if before:
        check_in(browser, before[0], name=before[1])
    asked = PatientContext.same_name_replaced
    cards = [VALID_ID]

    def card_read_meanwhile(
        self: PatientContext, patient_id: str, name: str, now: dt.datetime
    ) -> CurrentPatient | None:
        question = asked(self, patient_id, name, now)
        if cards:  # the acquire service's own connection on the same clinic.db
            scanner = PatientContext.open(console.config.data_dir, console.config.patient.idle_timeout_s)
            try:
                scanner.set_patient(cards.pop(), "Wang^Wu=王^五", now=dt.datetime.now(dt.timezone.utc))
            finally:
                scanner.close()
        return question

    monkeypatch.setattr(PatientContext, "same_name_replaced", card_read_meanwhile)
    check_in(browser, CLINIC_NUMBER, name="王五")
    monkeypatch.undo()
    assert not cards, "the card was not read between the ask and the check-in"
    current = checked_in(console.config)
    assert current is not None and (current.patient_id, current.name) == (VALID_ID, "Wang^Wu=王^五"), current
    assert name_known_for(console.config, VALID_ID) == "Wang^Wu=王^五"
    said = browser.find_element(by("id"), "form-error").text  # type: ignore[attr-defined]
    assert f"已有患者 {VALID_ID} 登记" in said, said
    typed = browser.find_element(by("id"), "patient_id").get_attribute("value")  # type: ignore[attr-defined]
    assert typed == CLINIC_NUMBER, typed


@pytest.mark.parametrize("answer", ["corrected", "other-id"])
def test_the_same_man_under_another_number_keeps_the_stat_check_in(
    browser: object, console: ConsoleServer, answer: str
) -> None:
    """王五 is checked in as 急 for 胸痛 by one number; the nurse then types another under the same
    name (the form's 急 box empty, as on every visit) and the doctor answers "a mistyped number
    corrected" or "his other number". The badge and the reason were gone from Today and his next
    ECG went ROUTINE: the number was taken for a new patient. Now he is still 急 for 胸痛, checked
    in since the first check-in (his ECG recorded since then is STAT)."""
    log_in(browser, console)
    check_in(browser, VALID_ID, name="王五", reason="胸痛", stat=True)
    text_in(browser, "#panel-session", "急")
    first = checked_in(console.config)
    assert first is not None
    check_in(browser, CLINIC_NUMBER, name="王五")
    submitted(browser, click(f"#confirm-other-id button[value={answer}]"))
    wait_for(browser, on_page("/today"))
    session = session_text(browser)
    assert "急" in session and "胸痛" in session and CLINIC_NUMBER in session, session
    current = checked_in(console.config)
    assert current is not None and current.patient_id == CLINIC_NUMBER, current
    assert (current.stat, current.reason, current.since) == (True, "胸痛", first.since), current


def test_his_stat_ecg_under_his_first_number_shows_on_today(
    browser: object, console: ConsoleServer, tmp_path: Path
) -> None:
    """王五, 急 for 胸痛, is checked in under his other number; the cart (still programmed with his ID
    card number) sends his ECG, STAT. Today's ECG panel showed none - it looked for the clinic
    number only - and the doctor of a chest-pain patient saw no ECG. Now it shows his, 急, under
    the number the ECG carries."""
    import dataclasses

    from devices.ecg.npz import write_npz
    from devices.identity import Patient
    from lastmile.ecg.intake import import_files
    from tests.ecg_factories import make_recording

    log_in(browser, console)
    check_in(browser, VALID_ID, name="王五", reason="胸痛", stat=True)
    check_in(browser, CLINIC_NUMBER, name="王五")
    submitted(browser, click("#confirm-other-id button[value=other-id]"))
    wait_for(browser, on_page("/today"))
    stick = tmp_path / "stick"
    stick.mkdir()
    recording = make_recording(1, patient=Patient(VALID_ID, "", dt.date(1949, 12, 31), "M"))
    recorded = dt.datetime.now(dt.timezone.utc)
    (stick / "ecg.npz").write_bytes(write_npz(dataclasses.replace(recording, acquired_at=recorded)))
    config = console.config
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)

    def now() -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    try:
        with open_outbox(config) as outbox:  # as the acquire service's watched USB folder
            import_files(
                outbox,
                config,
                [stick],
                current_patient_ids=lambda: context.patient_ids(now()),
                stat_session=lambda: context.stat_session(now()),
            )
    finally:
        context.close()
    browser.get(console.url + "/today")  # type: ignore[attr-defined]
    text_in(browser, "#panel-ecg", VALID_ID)
    panel = str(browser.find_element(by("id"), "panel-ecg").text)  # type: ignore[attr-defined]
    assert "急" in panel, panel


def gaps_between(driver: object, css: str) -> list[float]:
    """The space between each two of the elements `css` matches, in CSS pixels: the larger of
    their horizontal and vertical distance (negative where they overlap)."""
    boxes = driver.execute_script(  # type: ignore[attr-defined]
        "return [...document.querySelectorAll(arguments[0])].map(e => e.getBoundingClientRect())"
        ".map(b => ({left: b.left, right: b.right, top: b.top, bottom: b.bottom}));",
        css,
    )
    assert len(boxes) >= 2, boxes
    return [
        max(b["left"] - a["right"], a["left"] - b["right"], b["top"] - a["bottom"], a["top"] - b["bottom"])
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
    ]


def test_the_checked_in_patients_buttons_are_apart_on_a_phone_and_a_tablet(
    browser: object, console: ConsoleServer
) -> None:
    """On a 360 px phone the checked-in patient's 不急了 / 清除姓名 / 清除原因 / 结束就诊 stacked
    touching each other: a tap meant for one could land on the next. Now they are apart by the
    console's button-row rule (as the ECG's 重新记录 / 仍然发送), on a phone and on a tablet."""
    log_in(browser, console)
    check_in(browser, OTHER_ID, name="王五", reason="胸痛", stat=True)
    text_in(browser, "#panel-session", "王五")
    buttons = "#panel-session button"
    assert len(browser.find_elements(by("css"), buttons)) == 4  # type: ignore[attr-defined]
    for size in (PHONE, TABLET):
        set_viewport(browser, size)
        try:
            gaps = gaps_between(browser, buttons)
            assert min(gaps) >= 8, (size, gaps)
        finally:
            set_viewport(browser, TABLET)


def test_reloading_the_answer_to_not_urgent_says_nothing_it_did_not_do(browser: object, console: ConsoleServer) -> None:
    """After "not urgent" the page said 已取消加急; reloading it (the address still says what was
    done) said 已在就诊中 ... 没有改动 without a name, right after STAT was turned off. A reload
    now says nothing about an action."""
    log_in(browser, console)
    check_in(browser, OTHER_ID, name="李四", reason="胸痛", stat=True)
    submitted(browser, click("#not-stat button"))
    assert "已取消加急" in done_text(browser), done_text(browser)
    assert "done=check-in-again" in browser.current_url  # type: ignore[attr-defined]
    browser.refresh()  # type: ignore[attr-defined]
    wait_for(browser, lambda d: d.execute_script("return document.readyState === 'complete'"))
    text_in(browser, "#panel-session", OTHER_ID)
    said = [e.text for e in browser.find_elements(by("css"), "p.done")]  # type: ignore[attr-defined]
    assert said == [], said


def test_checking_in_another_patient_says_whose_check_in_ended(browser: object, console: ConsoleServer) -> None:
    """张三 is checked in; the doctor checks in 李四. 张三's check-in ended without a word on the
    page (only the session log knew): the page now says 张三 的就诊已结束."""
    log_in(browser, console)
    check_in(browser, VALID_ID, name="张三")
    assert "张三 的就诊已结束" not in done_text(browser)
    check_in(browser, OTHER_ID, name="李四")
    text_in(browser, "#panel-session", OTHER_ID)
    assert "张三 的就诊已结束" in done_text(browser), done_text(browser)


def test_logging_out_with_a_patient_checked_in_offers_to_end_the_check_in(
    browser: object, console: ConsoleServer
) -> None:
    """Logging out left 张三 checked in: readings kept going to her, whoever logged in next. Now
    logging out says she is still checked in and offers to end it."""
    log_in(browser, console)
    check_in(browser, VALID_ID, name="张三")
    submitted(browser, click("form[action='/logout'] button"))
    assert "/logout" in browser.current_url, "logged out at once, 张三 left checked in"  # type: ignore[attr-defined]
    said = browser.find_element(by("id"), "logout-check-in").text  # type: ignore[attr-defined]
    assert "张三" in said and "仍在就诊中" in said, said
    assert checked_in(console.config) is not None
    submitted(browser, click("button[value=end]"))
    wait_for(browser, on_page("/login"))
    assert checked_in(console.config) is None, "张三 is still checked in after logging out"
    # logged out: Today asks for the login again
    browser.get(console.url + "/today")  # type: ignore[attr-defined]
    wait_for(browser, on_page("/login"))


def test_logging_out_may_keep_the_check_in(browser: object, console: ConsoleServer) -> None:
    """The other choice: the check-in goes on (another tablet may be examining her)."""
    log_in(browser, console)
    check_in(browser, VALID_ID, name="张三")
    submitted(browser, click("form[action='/logout'] button"))
    submitted(browser, click("button[value=keep]"))
    wait_for(browser, on_page("/login"))
    current = checked_in(console.config)
    assert current is not None and current.patient_id == VALID_ID


def test_a_held_reading_assigned_to_a_typed_number_says_whose_it_now_is(
    browser: object, console: ConsoleServer
) -> None:
    """A held reading assigned to a mistyped "12345" (taken as a clinic number) was accepted with
    "已指定" and vanished: the page now says it went to 12345 with no name."""
    hold_readings(console.config, bp_reading(dt.datetime.now(dt.timezone.utc), "held-1"))
    log_in(browser, console)
    box = "#panel-held form.assign input[name=patient_id]"
    wait_for(browser, lambda d: d.find_elements(by("css"), box))
    browser.find_element(by("css"), box).send_keys("12345")  # type: ignore[attr-defined]
    submitted(browser, click("#panel-held form.assign button"))
    assert "已指定给 12345（未填姓名）" in done_text(browser), done_text(browser)


def wrong_password(driver: object) -> None:
    name = driver.find_element(by("id"), "name")  # type: ignore[attr-defined]
    name.clear()
    name.send_keys(DOCTOR[0])
    submitted(driver, lambda d: d.find_element(by("id"), "password").send_keys("not the password\n"))


def test_a_locked_account_tells_the_doctor_whom_to_ask_and_warns_before(
    browser: object, console: ConsoleServer
) -> None:
    """Four wrong passwords said nothing of the lock to come; the fifth showed a doctor a command
    line. Now each says how many tries are left; the lock says to ask the county IT office, the
    command only under the technician's details."""
    browser.delete_all_cookies()  # type: ignore[attr-defined]
    browser.get(console.url + "/login")  # type: ignore[attr-defined]
    for left in (4, 3, 2, 1):
        wrong_password(browser)
        error = browser.find_element(by("id"), "login-error").text  # type: ignore[attr-defined]
        assert f"再输错 {left} 次" in error, error
    wrong_password(browser)
    error = browser.find_element(by("id"), "login-error").text  # type: ignore[attr-defined]
    assert "已锁定" in error and "县信息科" in error and "lastmile" not in error, error
    unlock = browser.find_element(by("id"), "unlock-command")  # type: ignore[attr-defined]
    assert unlock.get_attribute("textContent") == f"lastmile user unlock {DOCTOR[0]}"


def space_above_id_label(driver: object) -> float:
    """CSS pixels between what the patient panel shows last (the session's buttons, or the words
    that nobody is checked in) and the check-in form's first label, 身份证号或门诊号."""
    return float(
        driver.execute_script(  # type: ignore[attr-defined]
            "const last = [...document.querySelectorAll('#panel-session button, #panel-session .empty')]"
            ".map(e => e.getBoundingClientRect().bottom);"
            "return document.querySelector('label[for=patient_id]').getBoundingClientRect().top - Math.max(...last);"
        )
    )


def test_the_id_label_is_set_apart_from_the_session_buttons_on_a_phone(browser: object, console: ConsoleServer) -> None:
    """At 360 px the label 身份证号或门诊号 sat 0.5 rem under 结束该患者的就诊, as close as the
    session's buttons are to each other: it read as one more line of the session, not the start of
    the form for the next patient. Now it keeps the space it has when nobody is checked in."""
    from tests.console_browser import save_screenshot  # the page as the doctor sees it, for a look

    log_in(browser, console)
    set_viewport(browser, (360, 800))
    try:
        nobody = space_above_id_label(browser)
        check_in(browser, OTHER_ID, name="王五", reason="胸痛", stat=True)
        text_in(browser, "#panel-session", "王五")
        button_gap = min(gaps_between(browser, "#panel-session button"))
        above = space_above_id_label(browser)
        save_screenshot(browser, "today-session-phone-360x800")
        assert above >= nobody and above > button_gap, (above, nobody, button_gap)
    finally:
        set_viewport(browser, TABLET)


CUFF = "AA:BB:CC:DD:EE:01"  # bp_reading's cuff: the family's, with user buttons


def users_reading_goes_to(config: Config, user: int, key: str) -> dict[str, Any]:
    """A BP reading of the cuff's user `user` arriving now: the outbox row's patient."""
    taken = replace(bp_reading(dt.datetime.now(dt.timezone.utc), key), device_user=user)
    [result] = record_readings(config, taken)
    assert result.outcome == "stored" and result.item_id is not None, result
    with open_outbox(config) as outbox:
        item = outbox.get(result.item_id)
    assert item is not None and item.patient is not None, item
    return item.patient


def mapped_name(config: Config) -> str:
    """The name the cuff's one mapped user keeps (what its readings go as once the session forgets)."""
    db = open_clinic_db(config.data_dir)
    try:
        [user] = DeviceUsers(db).mappings()
    finally:
        db.conn.close()
    return user.mapping.patient_name


@pytest.mark.parametrize(("answer", "right"), [("typed-name-right", "张^山"), ("mapped-name-right", "张^三")])
def test_a_check_in_under_another_name_than_a_mapped_device_user_asks_which_is_right(
    browser: object, console: ConsoleServer, answer: str, right: str
) -> None:
    """The cuff's user 2 is mapped to 张三's ID with his name; the doctor checks that ID in as 张山.
    Today checked him in unasked: user 2's readings went to the county as 张山 (a typo taken as
    corrected), and a day later as 张三 again. Now it asks which name is right, naming both and
    the cuff's user, and checks in nobody before the answer. "张山 is right" corrects the user's
    name for good; "张三 is right" checks him in as 张三."""
    data = str(console.config.data_dir)
    assert main(["patient", "map-user", CUFF, "2", "--patient", VALID_ID, "--name", "张三", "--data-dir", data]) == 0
    log_in(browser, console)
    check_in(browser, VALID_ID, name="张山")
    asked = [e.text for e in browser.find_elements(by("id"), "confirm-which-name")]  # type: ignore[attr-defined]
    assert asked and "张三" in asked[0] and "张山" in asked[0] and "用户 2" in asked[0], asked
    assert checked_in(console.config) is None
    set_viewport(browser, (360, 800))
    save_screenshot(browser, f"confirm-which-name-{answer}-360x800")
    set_viewport(browser, TABLET)
    submitted(browser, click(f"#{answer}"))
    wait_for(browser, on_page("/today"))
    current = checked_in(console.config)
    assert current is not None and current.patient_id == VALID_ID and right in current.name, current
    assert right in users_reading_goes_to(console.config, 2, f"bp-user-2-{answer}")["name"]
    assert right in mapped_name(console.config)  # still his a day on, when the session has forgotten
    corrected = [e.text for e in browser.find_elements(by("id"), "name-corrected")]  # type: ignore[attr-defined]
    if answer == "typed-name-right":
        assert len(corrected) == 1 and "姓名已更正为 张山" in corrected[0], corrected
    else:
        assert corrected == [], corrected


def test_a_check_in_refused_because_the_checked_in_patient_left_meanwhile_says_what_happened(
    browser: object, console: ConsoleServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """李四 is checked in; the doctor checks in 王五. Between Today's look at who is checked in and
    the check-in, 李四's check-in ended (on another screen, or idle too long): refused as
    "这次检查已经结束了", naming nobody and saying nothing to do. Now it says whose check-in ended,
    that nothing changed and to press 登记患者 again; the form keeps what was typed, and pressed
    again, 王五 is checked in."""
    log_in(browser, console)
    check_in(browser, OTHER_ID, name="李四")
    asked = PatientContext.same_name_replaced
    config = console.config
    left = [OTHER_ID]

    def ended_meanwhile(self: PatientContext, patient_id: str, name: str, now: dt.datetime) -> CurrentPatient | None:
        question = asked(self, patient_id, name, now)
        if left:  # ended on another screen: its own connection on the same clinic.db
            other = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
            try:
                other.clear(now=dt.datetime.now(dt.timezone.utc), patient_id=left.pop())
            finally:
                other.close()
        return question

    monkeypatch.setattr(PatientContext, "same_name_replaced", ended_meanwhile)
    check_in(browser, CLINIC_NUMBER, name="王五")
    monkeypatch.undo()
    assert not left, "李四's check-in did not end between the look and the check-in"
    said = browser.find_element(by("id"), "form-error").text  # type: ignore[attr-defined]
    assert "李四 的就诊在您提交前已经结束" in said and "请再按一次“登记患者”" in said, said
    assert checked_in(config) is None
    typed = browser.find_element(by("id"), "patient_id").get_attribute("value")  # type: ignore[attr-defined]
    assert typed == CLINIC_NUMBER, typed
    submitted(browser, lambda d: d.find_element(by("id"), "patient_id").send_keys("\n"))  # 登记患者 again
    current = checked_in(config)
    assert current is not None and current.patient_id == CLINIC_NUMBER and "王^五" in current.name, current
