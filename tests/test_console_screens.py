"""Console pages looked at in a real browser, Chinese, on a phone (390x844) and a cheap tablet
(1024x768): the Visits page's flags and the storage-full refusal. Screenshots land in
$LASTMILE_SCREENSHOTS (default tmp/console-screenshots)."""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.uid import generate_uid

from devices.identity import DeviceIdentity
from devices.observation import Observation, Quantity, TimeSource
from lastmile.clinic.devices import DeviceRegistry
from lastmile.config import Config
from lastmile.demo.cardiologist import PDF_TITLE, StudyToRead, ecg_report_sr, part10, report_pdf
from lastmile.reports.store import ReportStore, SentStudy
from lastmile.visits.book import FixRecord, VisitBook, VisitPolicy
from tests.conftest import REPO, on_private_tmpfs
from tests.console_browser import (
    WAIT_S,
    by,
    choose_language,
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
    Client,
    console_config,
    enqueue_ecg,
    hold_readings,
    running_console,
    store_returned_reports,
    store_unassigned_ecg_report,
)
from tests.visit_harness import GPS_T, HOUSE, FakeClocks, fix_at, offset
from uploader.report_reading import read_dicom_report

pytestmark = pytest.mark.timeout(600)

PHONE = (390, 844)
TABLET = (1024, 768)
HOUSEHOLD = "HH-0001-东村-12组"
LOST = "110105194912310021"  # stopped after one reboot, signed after another: both times lost
FAR = "11010519491231002X"  # 2.3 km from the household
PENDING = "110105198001010016"  # stopped before GPS or the network gave the time


def _book(data: Path, clocks: FakeClocks, register: Path) -> VisitBook:
    book = VisitBook.open(data, gateway_id="gw-1", policy=VisitPolicy(), clock=clocks.clock())
    book.register.sync_from(register, "2026-01-01")
    return book


def field_day(data: Path, register: Path) -> None:
    """Three visits from the real visit book, each with the flag the doctor must understand."""
    register.write_text("household_id,latitude,longitude\n%s,%f,%f\n" % (HOUSEHOLD, *HOUSE))
    with _book(data, FakeClocks(wall=0.0, boot="boot-1"), register) as book:  # 1970, indoors: no time
        book.start(LOST, doctor_id="DR-1", household_id=HOUSEHOLD)
    with _book(data, FakeClocks(wall=0.0, boot="boot-2"), register) as book:  # the battery died
        book.stop()
    clocks = FakeClocks(wall=0.0, boot="boot-3")
    with _book(data, clocks, register) as book:  # and again; then GPS gives the time
        book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())
        far = fix_at(*offset(*HOUSE, 2345), GPS_T)
        book.start(FAR, doctor_id="DR-1", household_id=HOUSEHOLD, fix=FixRecord(far, book.clock.now()))
        clocks.advance(900)
        book.stop(FixRecord(far, book.clock.now()))
    clocks = FakeClocks(wall=0.0, boot="boot-4")
    with _book(data, clocks, register) as book:  # the next day, still no time in this boot
        book.start(PENDING, doctor_id="DR-1", household_id=HOUSEHOLD)
        clocks.advance(600)
        book.stop()
        flags = {v.patient_id: set(v.flags) for v in book.visits()}
    assert {"start-time-lost", "end-time-lost"} <= flags[LOST], flags
    assert "outside-radius" in flags[FAR] and "provisional-time" in flags[PENDING], flags


def card_of(driver: object, patient_id: str) -> object:
    (card,) = [c for c in driver.find_elements(by("css"), ".visit-list > li") if patient_id in c.text]  # type: ignore[attr-defined]
    return card


def badges_fit(driver: object, card: object) -> list[str]:
    """The card's flags as shown: each one visible, inside the viewport, overlapping no other."""
    shown = driver.execute_script(  # type: ignore[attr-defined]
        """const card = arguments[0]; card.scrollIntoView({block: "center"});
        const width = document.documentElement.clientWidth;
        return [...card.querySelectorAll(".badge")].map(b => {
          const r = b.getBoundingClientRect();
          return {text: b.innerText.trim(), left: r.left, right: r.right, top: r.top, bottom: r.bottom,
                  width: width, visible: r.width > 0 && r.height > 0 && getComputedStyle(b).visibility === "visible"};
        });""",
        card,
    )
    for badge in shown:
        assert badge["visible"], badge
        assert badge["left"] >= 0 and badge["right"] <= badge["width"], f"outside the screen: {badge}"
    for i, a in enumerate(shown):
        for b in shown[i + 1 :]:
            apart = (
                a["right"] <= b["left"] or b["right"] <= a["left"] or a["bottom"] <= b["top"] or b["bottom"] <= a["top"]
            )
            assert apart, f"overlapping flags: {a} {b}"
    return [b["text"] for b in shown]


def test_visit_flags_read_as_plain_chinese_and_fit_a_phone_and_a_tablet(browser: object, tmp_path: Path) -> None:
    """A family doctor reviews yesterday's visits on her phone: each flag says in Chinese what
    happened, on screen; a visit whose times were lost says "time unknown", not a bare dash, and
    not also "time not known at the start" beside "start time lost"."""
    data = tmp_path / "data"
    field_day(data, tmp_path / "households.csv")
    with running_console(console_config(data)) as server:
        log_in(browser, server)
        for name, size in (("phone", PHONE), ("tablet", TABLET)):
            set_viewport(browser, size)
            browser.get(server.url + "/visits")  # type: ignore[attr-defined]
            save_screenshot(browser, f"visits-flags-{name}")
            lost = card_of(browser, LOST)
            # both lost times, and no "time not known at the start" beside "start time lost"
            assert sorted(badges_fit(browser, lost)) == sorted(
                ["开始时间因网关重启而丢失", "结束时间因网关重启而丢失", "没有 GPS 定位"]
            )
            assert "时间未知" in lost.text and "—" not in lost.text, lost.text  # type: ignore[attr-defined]
            far = card_of(browser, FAR)
            assert badges_fit(browser, far) == ["离住户太远"] and "距住户 2,345 米" in far.text  # type: ignore[attr-defined]
            pending = card_of(browser, PENDING)
            assert sorted(badges_fit(browser, pending)) == sorted(
                ["没有 GPS 定位", "时间待定：有 GPS 或网络后自动补上"]
            )
            assert "时间未知" in pending.text, pending.text  # type: ignore[attr-defined]
            body = browser.find_element(by("css"), "main").text  # type: ignore[attr-defined]
            assert "time" not in body and "radius" not in body, body
            # under the count, who checks them and what is left to the doctor (REV-R finding 9)
            next_step = body.split("次随访需要核查。", 1)[1].strip().splitlines()[0]
            assert next_step.startswith("县里会核查这些随访") and "无需处理" in next_step, body
            assert "请告诉县里" in next_step, body


def test_a_visit_names_its_patient_as_the_gateway_knows_them_and_says_no_doctor_name_is_stored(
    browser: object, tmp_path: Path
) -> None:
    """Each visit card said 医生 DR-1 (a bare practitioner code) and the patient's ID alone, though
    the gateway had sent an ECG of 张三 under that ID. It names the patient where the gateway holds
    a name for that ID, says when it holds none, and says the doctor's name is not recorded."""
    from tests.console_harness import store_returned_reports

    data = tmp_path / "data"
    field_day(data, tmp_path / "households.csv")
    config = console_config(data)
    store_returned_reports(config)  # an ECG of 张三 (FAR's ID) sent to the county
    with running_console(config) as server:
        log_in(browser, server)
        browser.get(server.url + "/visits")  # type: ignore[attr-defined]
        far, lost = card_of(browser, FAR).text, card_of(browser, LOST).text  # type: ignore[attr-defined]
    assert "张三" in far and FAR in far, far
    assert "姓名未登记" in lost and LOST in lost, lost
    for card in (far, lost):
        assert "医生 DR-1" not in card and "医生姓名未登记（编号 DR-1）" in card, card


# -- the storage-full refusal ----------------------------------------------------------------------

# Runs inside `unshare -m` with a 16 MB tmpfs on argv[1]: the console on it, told by stdin when to fill.
FULL_DISK_CONSOLE = r"""
import json, os, sys
from pathlib import Path
from tests.conftest import fill_to_the_last_block
from tests.console_harness import ADMIN, DOCTOR, VALID_ID, Client, console_config, running_console

mnt = Path(sys.argv[1])
with running_console(console_config(mnt / "data")) as server:
    print(json.dumps({"url": server.url}), flush=True)
    sys.stdin.readline()  # the doctor has logged in
    fill_to_the_last_block(mnt / "filler")
    print(json.dumps({"full": True}), flush=True)
    sys.stdin.readline()  # the doctor has read the page
    os.unlink(mnt / "filler")
"""


def test_a_check_in_on_a_full_disk_explains_in_chinese_and_leads_back_to_today(browser: object, tmp_path: Path) -> None:
    """The data partition is full; the doctor checks in the next patient on her phone. The page
    must say in Chinese what happened, that nothing stored before is lost, what to do now, and
    take her back to Today - not a line of bilingual plain text with no way on."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    console = subprocess.Popen(
        on_private_tmpfs(mnt, "16m", FULL_DISK_CONSOLE),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert console.stdin is not None and console.stdout is not None
    try:
        url = json.loads(console.stdout.readline())["url"]

        set_viewport(browser, PHONE)
        log_in(browser, SimpleNamespace(url=url))  # type: ignore[arg-type]
        console.stdin.write("login\n")
        console.stdin.flush()
        assert json.loads(console.stdout.readline()) == {"full": True}
        browser.find_element(by("id"), "patient_name").send_keys("李四")  # type: ignore[attr-defined]
        browser.find_element(by("id"), "patient_id").send_keys("110105198001010016\n")  # type: ignore[attr-defined]
        wait_for(browser, on_page("/today/check-in"))
        save_screenshot(browser, "storage-full-phone")
        page = browser.find_element(by("css"), "body").text  # type: ignore[attr-defined]
        assert "存储空间已满" in page, page  # what happened
        assert "没有保存" in page, page  # this step was not recorded
        assert "之前保存的测量结果和心电图都还在" in page, page  # nothing stored is lost
        assert "县信息科" in page and "记在纸上" in page, page  # what to do now
        assert "storage full" not in page, page  # Chinese, not the technician's English
        fits = browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")  # type: ignore[attr-defined]
        assert fits, "the phone must not scroll sideways"
        browser.find_element(by("css"), "a[href='/today']").click()  # type: ignore[attr-defined]
        wait_for(browser, on_page("/today"), WAIT_S)
        assert browser.find_element(by("css"), "h1").text == "今天"  # type: ignore[attr-defined]
        console.stdin.write("done\n")
        console.stdin.flush()
        assert console.wait(timeout=WAIT_S) == 0
    finally:
        if console.poll() is None:
            console.kill()
            console.wait()


# -- the other pages on a phone --------------------------------------------------------------------


def test_every_check_on_the_system_page_is_on_screen_skipped_ones_too(browser: object, tmp_path: Path) -> None:
    """A check that was skipped (no reading center set up yet, services not running) is listed
    with "已跳过" like the others - not moved off the screen by the skip link's style."""
    with running_console(console_config(tmp_path / "data")) as server:
        set_viewport(browser, PHONE)
        log_in(browser, server, ADMIN)
        browser.get(server.url + "/system")  # type: ignore[attr-defined]
        save_screenshot(browser, "system-checks-phone")
        checks = browser.execute_script(  # type: ignore[attr-defined]
            """const width = document.documentElement.clientWidth;
            return [...document.querySelectorAll("li.finding")].map(li => {
              const r = li.getBoundingClientRect();
              return {text: li.innerText.split("\\n")[0], left: r.left, right: r.right, width: width};
            });"""
        )
        skipped = [c for c in checks if c["text"].startswith("已跳过")]
        assert skipped, checks  # the test's console has checks to skip
        for check in checks:
            assert check["left"] >= 0 and check["right"] <= check["width"], f"off the screen: {check}"


def test_the_system_page_says_what_waits_why_the_links_are_skipped_and_which_device(
    browser: object, tmp_path: Path
) -> None:
    """With the county platform and the reading center set up, one ECG waiting and a cuff that
    lost its link: "等待发送" says 1 份心电图, not a bare 1; the two network checks the console
    skips say that this page does not test the network and which row has the link's state; the
    devices warning names the cuff and links to the Devices page (zh-CN screenshot:
    system-links-and-devices)."""
    from tests.metering_setup import queue_items

    config = console_config(tmp_path / "data")
    config.fhir.base_url = "https://county-platform.example/fhir"
    queue_items(config.data_dir, 1, at=time.time())
    registry = DeviceRegistry.open(config.data_dir)
    try:
        now = dt.datetime.now(dt.timezone.utc)
        registry.allow("AA:BB:CC:DD:EE:01", name="血压计 1号诊室", now=now)
        registry.update_status("AA:BB:CC:DD:EE:01", now=now, connected=False, error="link lost")
    finally:
        registry.close()
    with running_console(config) as server:
        log_in(browser, server, ADMIN)
        browser.get(server.url + "/system")  # type: ignore[attr-defined]
        text_in(browser, "#h-checks", "检查项目")
        save_screenshot(browser, "system-links-and-devices")
        facts = browser.find_element(by("css"), "#h-state + dl").text  # type: ignore[attr-defined]
        assert "等待发送\n1 份心电图" in facts, facts
        rows = {
            li.find_element(by("css"), "strong").text: li.text
            for li in browser.find_elements(by("css"), "li.finding")  # type: ignore[attr-defined]
        }
        assert "本页不测试网络" in rows["诊断中心"] and "与诊断中心的连接" in rows["诊断中心"], rows
        assert "本页不测试网络" in rows["县健康平台"] and "与县健康平台的连接" in rows["县健康平台"], rows
        assert "血压计 1号诊室" in rows["设备"], rows
        devices = browser.find_elements(by("css"), "li.finding a[href='/devices']")  # type: ignore[attr-defined]
        assert devices, rows


def test_who_did_what_on_the_system_page_reads_chinese(browser: object, tmp_path: Path) -> None:
    """The audit trail says 登录 and 登记患者, not the codes login and check-in."""
    with running_console(console_config(tmp_path / "data")) as server:
        set_viewport(browser, PHONE)
        log_in(browser, server, ADMIN)
        browser.find_element(by("id"), "patient_id").send_keys(VALID_ID + "\n")  # type: ignore[attr-defined]
        text_in(browser, "#panel-session", VALID_ID)
        browser.get(server.url + "/system")  # type: ignore[attr-defined]
        save_screenshot(browser, "system-audit-phone")
        trail = browser.find_element(by("css"), "ul.audit").text  # type: ignore[attr-defined]
        assert "登录" in trail and "登记患者" in trail, trail
        assert not re.search(r"\b(login|check-in)\b", trail), trail


def menu_rows(driver: object) -> list[list[dict[str, float]]]:
    """The menu's items as laid out, row by row (by their top): each item's label width and its box."""
    items: list[dict[str, float]] = driver.execute_script(  # type: ignore[attr-defined]
        "return [...document.querySelectorAll('.nav a')].map(a => {const b = a.getBoundingClientRect();"
        " return {top: Math.round(b.top), height: Math.round(b.height), width: b.width,"
        " label: a.scrollWidth, box: a.clientWidth, right: b.right, screen: window.innerWidth};});"
    )
    rows: dict[float, list[dict[str, float]]] = {}
    for item in items:
        rows.setdefault(item["top"], []).append(item)
    return list(rows.values())


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_the_page_menu_is_one_row_or_two_even_rows_on_a_phone(browser: object, tmp_path: Path, language: str) -> None:
    """The six pages on a phone of 320 to 412 px, at text sizes 100/115/130% (older village doctors
    enlarge it): one row, or two rows of three - not five and "System" alone on a second row
    (English at 390 px, Chinese at 320 px, Chinese at 115% and 360 px), the header taking a quarter
    of the screen for one word. Each label whole on one line inside its box and the screen."""
    with running_console(console_config(tmp_path / "data")) as server:
        log_in(browser, server)
        if language == "en":
            choose_language(browser, "en")
        for text_size in (100, 115, 130):
            for width in (320, 360, 390, 412):
                set_viewport(browser, (width, 844))
                browser.get(server.url + "/visits")  # type: ignore[attr-defined]
                # the root font size, as a browser's larger text setting sets it (CSSOM: not blocked by the CSP)
                browser.execute_script(f"document.documentElement.style.fontSize = '{text_size}%';")  # type: ignore[attr-defined]
                rows = menu_rows(browser)
                save_screenshot(browser, f"menu-{language}-{width}-{text_size}", full_page=False)
                where = f"{language} at {width} px, text {text_size}%"
                counts = [len(row) for row in rows]
                assert sum(counts) == 6 and len(set(counts)) == 1, f"{where}: rows of {counts}"
                items = [item for row in rows for item in row]
                assert len({item["height"] for item in items}) == 1, f"{where}: a label on two lines"
                assert all(i["label"] <= i["box"] and i["right"] <= i["screen"] for i in items), (where, items)
                if len(rows) > 1:  # two rows: a grid, each page as wide as the one above it
                    assert len({round(item["width"]) for item in items}) == 1, (where, items)


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_the_page_menu_sits_in_the_header_row_on_a_tablet_or_pc(browser: object, tmp_path: Path, language: str) -> None:
    """On a tablet or PC (from 720 px) the menu sits in the header between the console's name and the
    user, as on a phone it takes a row of its own: the phone's `order: 3; width: 100%` left on the
    <nav> made it a full-width second row at 1280 px (its top 56, the name's 8)."""
    with running_console(console_config(tmp_path / "data")) as server:
        log_in(browser, server)
        if language == "en":
            choose_language(browser, "en")
        for width in (1024, 1280):
            set_viewport(browser, (width, 800))
            browser.get(server.url + "/visits")  # type: ignore[attr-defined]
            save_screenshot(browser, f"menu-{language}-{width}", full_page=False)
            # the header centres its row: the menu's middle is the name's middle
            brand, nav = browser.execute_script(  # type: ignore[attr-defined]
                "return ['.top .brand', '.top > nav'].map(s => {"
                " const b = document.querySelector(s).getBoundingClientRect(); return b.top + b.height / 2;});"
            )
            assert abs(nav - brand) <= 2, f"{language} at {width} px: the menu's middle {nav}, the name's {brand}"
            assert len(menu_rows(browser)) == 1, f"{language} at {width} px: the menu on two rows"


# each card on the page: the space from its border to its first and to its last line of content
CARD_MARGINS = """return Array.from(document.querySelectorAll('main .card')).map(c => {
  const box = c.getBoundingClientRect(), first = c.firstElementChild.getBoundingClientRect(),
        last = c.lastElementChild.getBoundingClientRect();
  return [c.className, Math.round(first.top - box.top), Math.round(box.bottom - last.bottom)];});"""


def test_a_cards_content_sits_as_far_from_its_top_as_from_its_bottom(browser: object, tmp_path: Path) -> None:
    """Sent's ECG cards opened with a blank line above the patient's name (29 px to the first line,
    17 to the border below), Reports' cards ended with one (13 above, 29 below): the first and last
    paragraph's own margins added to the card's padding. Every card now holds its content at the
    padding alone, top and bottom, on a phone and a PC."""
    config = console_config(tmp_path / "data")
    store_returned_reports(config)
    enqueue_ecg(config, lead_off=False)
    with running_console(config) as server:
        log_in(browser, server)
        for width in (360, 1280):
            set_viewport(browser, (width, 800))
            for page in ("/sent", "/reports"):
                browser.get(server.url + page)  # type: ignore[attr-defined]
                cards = browser.execute_script(CARD_MARGINS)  # type: ignore[attr-defined]
                assert len(cards) >= 2, (page, cards)
                uneven = [card for card in cards if abs(card[1] - card[2]) > 2]
                assert uneven == [], f"{page} at {width} px: (card, top, bottom) {uneven}"


def test_a_wait_outlives_the_page_it_began_on(browser: object, tmp_path: Path) -> None:
    """A wait that polls a page while it is replaced (a form sent, its redirect) can find an element
    on the old page and read it on the new one: Selenium's StaleElementReferenceException. That means
    "not yet", not a failure: the menu test above failed so once, its language switch on a busy machine."""
    with running_console(console_config(tmp_path / "data")) as server:
        log_in(browser, server)
        replaced: list[str] = []

        def language_read_across_a_reload(d: object) -> str:
            html = d.find_element(by("css"), "html")  # type: ignore[attr-defined]
            if not replaced:  # the first poll: the page is replaced between finding and reading
                replaced.append("once")
                d.get(server.url + "/visits")  # type: ignore[attr-defined]
            return html.get_attribute("lang")  # type: ignore[no-any-return]

        assert wait_for(browser, language_read_across_a_reload) == "zh-CN"


def test_a_form_sent_after_the_login_expired_says_so_and_leads_to_the_login(browser: object, tmp_path: Path) -> None:
    """The Today page left open overnight (logins end after 12 idle hours): the first scan of the
    morning must say in Chinese that the login ended and nothing was saved, and lead to the login
    and back to Today - not a bare "login required / 请先登录" line with no way on."""
    with running_console(console_config(tmp_path / "data")) as server:
        set_viewport(browser, PHONE)
        log_in(browser, server)
        browser.delete_cookie("lastmile_session")  # type: ignore[attr-defined]  # what the idle timeout does
        browser.find_element(by("id"), "patient_id").send_keys(VALID_ID + "\n")  # type: ignore[attr-defined]
        wait_for(browser, on_page("/today/check-in"))
        save_screenshot(browser, "login-expired-phone")
        page = browser.find_element(by("css"), "body").text  # type: ignore[attr-defined]
        assert "登录已过期" in page and "没有保存" in page, page
        assert "login required" not in page, page
        browser.find_element(by("css"), "main a[href^='/login']").click()  # type: ignore[attr-defined]
        wait_for(browser, on_page("/login"))
        browser.find_element(by("id"), "name").send_keys(DOCTOR[0])  # type: ignore[attr-defined]
        browser.find_element(by("id"), "password").send_keys(DOCTOR[1] + "\n")  # type: ignore[attr-defined]
        wait_for(browser, on_page("/today"))


def test_the_login_page_tells_a_doctor_without_an_account_whom_to_ask(browser: object, tmp_path: Path) -> None:
    """The login page said, to every doctor, "账户在网关上创建" and the command "lastmile user add 姓名 --role doctor":
    a command line. She reads whom to ask; the command stays folded away for the technician."""
    with running_console(console_config(tmp_path / "data")) as server:
        set_viewport(browser, PHONE)
        browser.delete_all_cookies()  # type: ignore[attr-defined]
        browser.get(server.url + "/login")  # type: ignore[attr-defined]
        save_screenshot(browser, "login-phone")
        shown = browser.find_element(by("css"), "main").text  # type: ignore[attr-defined]
        assert "请县信息科" in shown, shown
        assert "lastmile" not in shown and "--role" not in shown, shown


# -- a report opened by an id that a newer version replaced ----------------------------------------


def replaced_report_chain(config: Config) -> tuple[int, int, int]:
    """A study whose report came back three times, each replacing the last, in the real report
    store as the poller keeps them: (preliminary, final, amended) report ids."""
    now = dt.datetime.now(dt.timezone.utc)
    study = StudyToRead(generate_uid(), VALID_ID, "Zhang^San=张^三")
    with ReportStore.open(config.data_dir) as store:
        store.record_sent(SentStudy(study.study_uid, now, patient_id=study.patient_id, patient_name=study.patient_name))
        preliminary = ecg_report_sr(study, findings=[], impression="窦性心律", complete=False, verified=False)
        final = ecg_report_sr(study, findings=[], impression="窦性心律，心电图正常")
        amended = ecg_report_sr(study, findings=[], impression="一度房室传导阻滞，请复查", amends=final)
        ids = [
            store.add_report(read_dicom_report(part10(ds)), part10(ds), "dicom", now).report.id
            for ds in (preliminary, final, amended)
        ]
        assert [store.get(i).superseded_by for i in ids] == [ids[1], ids[2], None]
    return ids[0], ids[1], ids[2]


def test_a_replaced_report_opened_by_its_old_link_says_so_and_leads_to_the_current_one(
    browser: object, tmp_path: Path
) -> None:
    """The doctor opens a report from a link kept from before (the back button, a printed page's
    number): the county has since replaced it twice. The page must say in Chinese, above the old
    text, that this report was replaced and must not be acted on, and lead to the current version
    (not merely the next one, itself replaced); the current one says nothing of the kind."""
    config = console_config(tmp_path / "data")
    preliminary, final, current = replaced_report_chain(config)
    with running_console(config) as server:
        log_in(browser, server)
        set_viewport(browser, PHONE)
        try:
            for old in (preliminary, final):
                browser.get(f"{server.url}/reports/{old}")  # type: ignore[attr-defined]
                text_in(browser, ".report-full", "窦性心律")
                notices = browser.find_elements(by("css"), ".report-full [role=alert].replaced")  # type: ignore[attr-defined]
                page = browser.find_element(by("css"), "main").text  # type: ignore[attr-defined]
                assert len(notices) == 1, f"report {old} does not say it was replaced: {page}"
                notice = notices[0]
                assert "此报告已被新版本替代" in notice.text, notice.text
                link = notice.find_element(by("css"), "a")
                assert link.get_attribute("href").endswith(f"/reports/{current}"), link.get_attribute("href")
                save_screenshot(browser, f"report-replaced-{old}-phone")
            link.click()
            wait_for(browser, on_page(f"/reports/{current}"))
            text_in(browser, ".report-full", "一度房室传导阻滞")
            assert not browser.find_elements(by("css"), ".report-full .replaced")  # type: ignore[attr-defined]
        finally:
            set_viewport(browser, TABLET)


# -- a report on an ECG sent without a patient -----------------------------------------------------


def test_a_report_on_an_ecg_sent_without_a_patient_gives_the_countys_patient_as_the_countys(
    browser: object, tmp_path: Path
) -> None:
    """An ECG was sent unassigned (no patient known at the gateway); the county's report names a
    patient its staff typed. The list, the report and the critical alert must not head it with
    that name as if it were this clinic's record: they say the gateway did not know the patient,
    show the county's name flagged as what the county wrote, and which ECG it was (its device)."""
    config = console_config(tmp_path / "data")
    report_id, device = store_unassigned_ecg_report(config)
    with running_console(config) as server:
        log_in(browser, server)
        set_viewport(browser, PHONE)
        try:
            for path, card in (("/reports", f"[data-report='{report_id}']"), (f"/reports/{report_id}", ".report-full")):
                browser.get(f"{server.url}{path}")  # type: ignore[attr-defined]
                text_in(browser, card, "急性下壁心肌梗死")
                heading = browser.find_element(by("css"), f"{card} h1, {card} h2").text  # type: ignore[attr-defined]
                # the county's name as a Chinese name is written: 张三 (the reader keeps its PN's parts spaced)
                assert "张" not in heading and VALID_ID not in heading, f"{path}: {heading}"
                assert "患者未确定" in heading, f"{path}: {heading}"
                flags = browser.find_elements(by("css"), f"{card} [role=alert].unassigned")  # type: ignore[attr-defined]
                page = browser.find_element(by("css"), "main").text  # type: ignore[attr-defined]
                assert len(flags) == 1, f"{path} does not flag the county's patient: {page}"
                flag = flags[0].text
                assert "发送时没有指定患者" in flag and "县里" in flag, flag
                assert "张三" in flag and "张 三" not in flag and VALID_ID in flag, flag
                alert = browser.find_element(by("css"), ".alert.critical").text  # type: ignore[attr-defined]
                assert "张" not in alert and "发送时没有指定患者" in alert, alert
                save_screenshot(browser, f"report-unassigned{path.replace('/', '-')}-phone")
            facts = browser.find_element(by("css"), ".report-full .facts").text  # type: ignore[attr-defined]
            assert device in facts, facts
        finally:
            set_viewport(browser, TABLET)


def test_a_form_from_a_page_older_than_the_login_says_so_and_leads_back_to_today(
    browser: object, tmp_path: Path
) -> None:
    """The Devices page left open in one tab while the doctor logged out and in again in another:
    adding a device there is refused (its form carries the old login's token), and the doctor read
    a bare "refused / 已拒绝" with no word of what happened and no way on."""
    with running_console(console_config(tmp_path / "data")) as server:
        set_viewport(browser, PHONE)
        log_in(browser, server)
        browser.get(server.url + "/devices")  # type: ignore[attr-defined]
        old_tab = browser.current_window_handle  # type: ignore[attr-defined]
        browser.switch_to.new_window("tab")  # type: ignore[attr-defined]
        browser.get(server.url + "/today")  # type: ignore[attr-defined]
        browser.find_element(by("css"), "form[action='/logout'] button").click()  # type: ignore[attr-defined]
        wait_for(browser, on_page("/login"))
        browser.find_element(by("id"), "name").send_keys(DOCTOR[0])  # type: ignore[attr-defined]
        browser.find_element(by("id"), "password").send_keys(DOCTOR[1] + "\n")  # type: ignore[attr-defined]
        wait_for(browser, on_page("/today"))
        browser.close()  # type: ignore[attr-defined]
        browser.switch_to.window(old_tab)  # type: ignore[attr-defined]
        browser.find_element(by("id"), "address").send_keys("AA:BB:CC:DD:EE:01\n")  # type: ignore[attr-defined]
        wait_for(browser, on_page("/devices/pair"))
        save_screenshot(browser, "refused-old-page-phone")
        page = browser.find_element(by("css"), "body").text  # type: ignore[attr-defined]
        assert "没有保存" in page and "页面" in page, page  # what happened: an old page, nothing saved
        assert "refused" not in page and "已拒绝" not in page, page
        fits = browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")  # type: ignore[attr-defined]
        assert fits, "the phone must not scroll sideways"
        browser.find_element(by("css"), "main a[href='/today']").click()  # type: ignore[attr-defined]
        wait_for(browser, on_page("/today"), WAIT_S)
        assert browser.find_element(by("css"), "h1").text == "今天"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("path", "said"),
    [("/reports/999999", "没有这份报告"), ("/no-such-page", "找不到"), ("/ecg/99999/preview.svg", "没有这份心电图")],
    ids=["gone-report", "unknown-address", "gone-ecg"],
)
def test_an_address_that_is_not_there_says_so_in_chinese_and_leads_back_to_today(
    browser: object, tmp_path: Path, path: str, said: str
) -> None:
    """A report link from an old alert (the report purged since), an old bookmark, or the address
    a check-in left in the address bar opened again: the doctor read a bare line ("Not Found",
    "Method Not Allowed" in English for the latter two) with the menu gone."""
    with running_console(console_config(tmp_path / "data")) as server:
        set_viewport(browser, PHONE)
        log_in(browser, server)
        browser.get(server.url + path)  # type: ignore[attr-defined]
        save_screenshot(browser, f"not-found-{path.strip('/').replace('/', '-')}-phone")
        page = browser.find_element(by("css"), "body").text  # type: ignore[attr-defined]
        assert said in page, page
        assert "Not Found" not in page and "not found" not in page and "Not Allowed" not in page, page
        assert len(browser.find_elements(by("css"), "nav .nav a")) == 6, page  # type: ignore[attr-defined]
        browser.find_element(by("css"), "main a[href='/today']").click()  # type: ignore[attr-defined]
        wait_for(browser, on_page("/today"), WAIT_S)
        assert browser.find_element(by("css"), "h1").text == "今天"  # type: ignore[attr-defined]


def test_a_form_address_opened_again_is_the_page_of_the_form(browser: object, tmp_path: Path) -> None:
    """A form's address left in the address bar (a refused check-in), bookmarked, or reached by the
    back button: opened again it said 找不到这个页面; it is the page the form is on."""
    config = console_config(tmp_path / "data")
    critical, _routine = store_returned_reports(config)
    with running_console(config) as server:
        log_in(browser, server)
        for address, page, heading in (
            ("/today/check-in", "/today", "今天"),
            ("/today/assign-ecg", "/today", "今天"),
            ("/devices/pair", "/devices", "设备"),
            (f"/reports/{critical}/acknowledge", f"/reports/{critical}", ""),
        ):
            browser.get(server.url + address)  # type: ignore[attr-defined]
            wait_for(browser, on_page(page), WAIT_S)
            shown = browser.find_element(by("css"), "main").text  # type: ignore[attr-defined]
            assert "找不到" not in shown and heading in shown, (address, shown)


# Every form's address (POST), and the page its form is on: where opening the address goes.
FORM_PAGES = {
    "/logout": "/today",
    "/language": "/today",
    "/today/check-in": "/today",
    "/today/end-session": "/today",
    "/today/assign-reading": "/today",
    "/today/assign-ecg": "/today",
    "/today/map-user": "/today",
    "/today/ecg/{item_id}/re-record": "/today",
    "/today/ecg/{item_id}/send-anyway": "/today",
    "/today/ecg/{item_id}/checked-in-name": "/today",
    "/today/ecg/{item_id}/name-right": "/today",
    "/today/ecg/{item_id}/id-values": "/today",
    "/today/stick-file/{file_id}/seen": "/today",
    "/reports/{report_id}/acknowledge": "/reports/{report_id}",
    "/reports/{report_id}/print": "/reports/{report_id}",
    "/devices/pair": "/devices",
    "/devices/unpair": "/devices",
    "/devices/map-user": "/devices",
    "/devices/unmap-user": "/devices",
}


def test_every_form_address_opened_as_a_page_leads_to_the_page_of_its_form(tmp_path: Path) -> None:
    """A doctor's refresh after a form, a bookmark or the back button opens a form's address with
    GET: only the check-in's led anywhere, every other one said 找不到这个页面 (404). Each now
    leads to the page its form is on - and never does the action again (the login stays, the
    critical report stays unseen)."""
    from starlette.routing import Route

    from lastmile.console.app import routes

    forms = {r.path.replace(":int}", "}") for r in routes() if isinstance(r, Route) and "POST" in (r.methods or ())}
    assert forms - {"/login"} == set(FORM_PAGES), "a form's address without the page it leads back to"
    config = console_config(tmp_path / "data")
    critical, _routine = store_returned_reports(config)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        for form, page in FORM_PAGES.items():
            address, back_to = (p.format(item_id=7, file_id=7, report_id=critical) for p in (form, page))
            reply = client.get(address)
            assert (reply.status, reply.location) == (303, back_to), (address, reply.status, reply.location)
            shown = client.get(back_to)
            assert shown.status == 200 and "找不到" not in shown.body, (address, shown.status)
        report = client.get(f"/reports/{critical}").body
    assert f'action="/reports/{critical}/acknowledge"' in report, "a GET on acknowledge acknowledged the report"


def test_the_refusal_and_not_found_pages_read_english_in_english(tmp_path: Path) -> None:
    """The same pages through gettext: a doctor who chose English reads English, not Chinese."""
    with running_console(console_config(tmp_path / "data")) as server:
        client = Client(server.url, language="en")
        client.login(DOCTOR)
        missing_page = client.get("/no-such-page")
        refused = client.post("/devices/pair", {"address": "AA:BB:CC:DD:EE:01", "csrf": "from-an-old-page"})
    assert missing_page.status == 404 and refused.status == 403
    for reply in (missing_page, refused):
        assert '<html lang="en">' in reply.body and 'href="/today"' in reply.body, reply.body
        assert not re.search(r"[\u4e00-\u9fff]", reply.body.split("<main", 1)[1]), reply.body
    assert "not saved" in refused.body, refused.body


def test_pairing_a_bluetooth_address_of_five_bytes_is_refused_in_chinese(tmp_path: Path) -> None:
    """A label's address typed one byte short (AA:BB:CC:DD:EE) is not paired: the Devices page says,
    in Chinese, what a Bluetooth address looks like, and the registry has no such device."""
    config = console_config(tmp_path / "data")
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        client.get("/devices")
        reply = client.post("/devices/pair", {"address": "aa:bb:cc:dd:ee", "name": "血压计"})
    assert reply.status == 400, reply.status
    assert "蓝牙地址的格式是 AA:BB:CC:DD:EE:FF" in reply.body, reply.body
    registry = DeviceRegistry.open(config.data_dir)
    try:
        assert not any(d.address.startswith("AA:BB:CC:DD:EE") for d in registry.all(config))
    finally:
        registry.close()


def test_the_not_found_and_refusal_pages_offer_no_language_switch_to_a_visitor_not_logged_in(tmp_path: Path) -> None:
    """Someone not logged in opening an old link (404) or posting a stale form (401) was offered the
    language switch; its form has no token for them, and a click led to the refusal page."""
    with running_console(console_config(tmp_path / "data")) as server:
        visitor = Client(server.url)
        missing_page = visitor.get("/no-such-page")
        refused = visitor.post("/language", {"language": "en", "next": "/today"})  # its switch, clicked
        doctor = Client(server.url)
        doctor.login(DOCTOR)
        hers = doctor.get("/no-such-page")
    # the switch's form from a page behind a login, without a live login: the login expired (401)
    assert (missing_page.status, refused.status) == (404, 401)
    for reply in (missing_page, refused):
        assert 'action="/language"' not in reply.body, reply.body
    assert 'action="/language"' in hers.body, hers.body  # a logged-in doctor still has it


def sent_purged_ecg_with_report(config: Config) -> int:
    """An ECG recorded on VALID_ID (张三), sent, committed, its report back, then purged as the
    forwarder does after the retention time (its patient and meta erased): the report's id."""
    from devices.identity import Patient
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from lastmile.reports.sent import sent_study_of
    from tests.ecg_factories import make_recording

    now = dt.datetime.now(dt.timezone.utc)
    with open_outbox(config) as outbox:
        rec = make_recording(5, patient=Patient(VALID_ID, "Zhang^San=张^三"))
        item = enqueue_recording(outbox, rec, config, key="purged").item
        study = sent_study_of(item, {}, now)
        assert study is not None and study.patient_id == VALID_ID, study
        at = item.created_at + 1
        outbox.release_hold(item.id, at)  # a synthetic trace may be held to re-record
        (claimed,) = outbox.claim("dicom", 1, at)
        outbox.mark_sent([claimed.id], at)
        outbox.mark_committed([claimed.id], at)
        assert outbox.purge_due(at + 1, 0.0) == 1
        assert outbox.get(item.id).patient is None  # type: ignore[union-attr]
    with ReportStore.open(config.data_dir) as store:
        store.record_sent(study)
        sr = ecg_report_sr(
            StudyToRead(study.study_uid, VALID_ID, "Zhang^San=张^三"), findings=[], impression="窦性心律"
        )
        data = part10(sr)
        return store.add_report(read_dicom_report(data), data, "dicom", now).report.id


def test_the_sent_page_names_the_patient_and_report_of_an_ecg_purged_after_it_was_confirmed(tmp_path: Path) -> None:
    """After the county confirmed an ECG the gateway purges it (patient erased with the payload):
    the Sent page then said 无患者 and 已收到报告 — while the Reports page showed that patient's
    report on the same ECG. It names the patient and links the report, as sent_studies remembers."""
    config = console_config(tmp_path / "data")
    report_id = sent_purged_ecg_with_report(config)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = client.get("/sent").body
    journey = page.split('<li class="card journey', 1)[1].split("</li>\n</ol>", 1)[0]
    assert "张三" in journey and VALID_ID in journey, journey
    assert "无患者" not in journey, journey
    assert f'href="/reports/{report_id}"' in journey, journey


def test_a_pdf_report_tells_the_doctor_how_to_print_it_without_a_command(tmp_path: Path) -> None:
    """A county PDF report: the Reports page and the report told the doctor to print it "or with
    `lastmile report print`" - a command on a box the doctor has no shell on."""
    config = console_config(tmp_path / "data")
    report_id, _device = store_unassigned_ecg_report(config, as_pdf=True)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        pages = {path: client.get(path).body for path in ("/reports", f"/reports/{report_id}")}
    for path, body in pages.items():
        main = body.split("<main", 1)[1]
        assert "PDF 文件" in main, (path, main)
        assert "lastmile" not in main and "`" not in main, (path, main)


def report_cards(page: str) -> list[str]:
    """The Reports page's cards, each as its HTML."""
    return [card.split("</li>", 1)[0] for card in page.split('<li class="card report')[1:]]


def test_one_ecg_read_as_an_sr_and_a_pdf_is_one_report_card_read_once(tmp_path: Path) -> None:
    """REV-R 8: the county sent an SR and a PDF for one ECG; the Reports page showed two
    "new: not read yet" cards (one per report object, the PDF's saying "诊断医生 —" and "PDF 文件"),
    as if the county had read the ECG twice, and the new-report count doubled. One card per ECG
    (the SR's words, the PDF under it), read once; a later correction still says so."""
    config = console_config(tmp_path / "data")
    now = dt.datetime.now(dt.timezone.utc)
    both = StudyToRead(generate_uid(), VALID_ID, "Zhang^San=张^三")
    alone = StudyToRead(generate_uid(), "DEMO-0002", "Li^Wei=李^伟")
    sr = ecg_report_sr(both, findings=["窦性心律，心率 72 次/分"], impression="正常心电图")
    with ReportStore.open(config.data_dir) as store:
        for study in (both, alone):
            store.record_sent(
                SentStudy(study.study_uid, now, patient_id=study.patient_id, patient_name=study.patient_name)
            )
        sr_id, pdf_id, alone_id = (
            store.add_report(read_dicom_report(part10(ds)), part10(ds), "dicom", now).report.id
            for ds in (
                sr,
                report_pdf(both, ["Sinus rhythm, 72 bpm", "Normal ECG"], title=PDF_TITLE),
                ecg_report_sr(alone, findings=[], impression="窦性心律"),
            )
        )
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        cards = report_cards(client.get("/reports").body)
        assert len(cards) == 2, cards
        (card,) = [c for c in cards if VALID_ID in c]
        assert card.count("新报告，尚未阅读") == 1 and "正常心电图" in card, card
        assert f'<a href="/reports/{pdf_id}">打印县里的 PDF 报告</a>' in card, card
        assert "PDF 文件" not in card and "诊断医生 —" not in card, card
        assert sum("新报告，尚未阅读" in c for c in cards) == 2, cards

        client.get(f"/reports/{sr_id}")  # the doctor reads the SR: the ECG's card is read
        cards = report_cards(client.get("/reports").body)
        (card,) = [c for c in cards if VALID_ID in c]
        assert "新报告，尚未阅读" not in card, card
        assert sum("新报告，尚未阅读" in c for c in cards) == 1, cards

        # the county corrects its reading: the card is new again and says it was corrected
        amended = ecg_report_sr(both, findings=[], impression="一度房室传导阻滞，请复查", amends=sr)
        with ReportStore.open(config.data_dir) as store:
            store.add_report(read_dicom_report(part10(amended)), part10(amended), "dicom", now)
        cards = report_cards(client.get("/reports").body)
        assert len(cards) == 2, cards
        (card,) = [c for c in cards if VALID_ID in c]
        assert "已更正" in card and "新报告，尚未阅读" in card and "一度房室传导阻滞" in card, card
        assert "正常心电图" not in card and f'href="/reports/{pdf_id}"' in card, card

        # a PDF that comes after its ECG's SR was read: the card is new, and opening it reads it
        client.get(f"/reports/{alone_id}")
        late_pdf = report_pdf(alone, ["Sinus rhythm"], title=PDF_TITLE)
        with ReportStore.open(config.data_dir) as store:
            late_id = store.add_report(read_dicom_report(part10(late_pdf)), part10(late_pdf), "dicom", now).report.id
        (card,) = [c for c in report_cards(client.get("/reports").body) if "DEMO-0002" in c]
        assert "新报告，尚未阅读" in card and "窦性心律" in card, card
        opened = re.search(r'<h2 class="h3"><a href="([^"]+)"', card)
        assert opened is not None and opened[1] == f"/reports/{late_id}", card
        client.get(opened[1])
        (card,) = [c for c in report_cards(client.get("/reports").body) if "DEMO-0002" in c]
        assert "新报告，尚未阅读" not in card, card


def cuff_reading(key: str, *quantities: Quantity) -> Observation:
    """A blood-pressure cuff's reading of `quantities`, measured now by its own clock."""
    now = dt.datetime.now(dt.timezone.utc)
    return Observation(
        kind="blood-pressure",
        quantities=quantities,
        measured_at=now,
        time_source=TimeSource.DEVICE_CLOCK,
        received_at=now,
        device=DeviceIdentity("Acme", "BP-1", "42", "AA:BB:CC:DD:EE:01"),
        record_key=key,
    )


def pages_in_both_languages(config: Config, path: str) -> dict[str, str]:
    """The console's page at `path` as the doctor reads it in zh-CN and in English."""
    with running_console(config) as server:
        pages = {}
        for language in ("zh-CN", "en"):
            client = Client(server.url, language=language)
            client.login(DOCTOR)
            pages[language] = client.get(path).body
    return pages


def test_a_held_pulse_reads_in_the_same_unit_as_the_ecgs_heart_rate(tmp_path: Path) -> None:
    """A cuff's reading waiting to be assigned said 脉搏 71 /min, while the ECG beside it says
    心率 61 次/分: the same beats per minute in two units, one of them English. And it read
    "128/84 mmHg, 脉搏 71": an ASCII comma on a Chinese page."""
    config = console_config(tmp_path / "data")
    reading = cuff_reading(
        "pulse-1",
        Quantity("systolic", 128.0, "mm[Hg]", 128.0, "mm[Hg]"),
        Quantity("diastolic", 84.0, "mm[Hg]", 84.0, "mm[Hg]"),
        Quantity("pulse-rate", 71.0, "/min", 71.0, "/min"),
    )
    hold_readings(config, reading)
    pages = pages_in_both_languages(config, "/today")
    assert "脉搏 71 次/分" in pages["zh-CN"] and "/min" not in pages["zh-CN"], pages["zh-CN"]
    assert "pulse 71 /min" in pages["en"], pages["en"]
    # and its values apart as each language writes it: no ASCII comma between Chinese words
    assert shown_readings(pages["zh-CN"]) == ["血压 128/84 mmHg，脉搏 71 次/分"], shown_readings(pages["zh-CN"])
    assert shown_readings(pages["en"]) == ["Blood pressure 128/84 mmHg, pulse 71 /min"], shown_readings(pages["en"])


def zhang_san_with_readings(server: object, config: Config, *keys: str) -> Client:
    """张三 (VALID_ID) checked in by the doctor (her client), and a cuff's BP reading stored on
    him for each of `keys`."""
    from tests.console_harness import record_receipt_timed_bp

    client = Client(server.url)  # type: ignore[attr-defined]
    client.login(DOCTOR)
    assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
    for key in keys:
        record_receipt_timed_bp(config, key)
    return client


def test_readings_for_the_platform_are_not_counted_as_ecg_studies_waiting_for_the_county(tmp_path: Path) -> None:
    """A BP reading queued for the health platform, no ECG at all: the Sent page said 1 份检查等待发送
    above an empty list of ECG studies (the demo: 3 waiting, one ECG listed); and, under 0 份, since
    when the oldest waited: the BP reading's time. It gives the oldest ECG's, or nothing."""
    from devices.identity import Patient
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from tests.ecg_factories import make_recording

    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0  # the synthetic ECG waits for the link, not for a re-record decision
    with running_console(config) as server:
        client = zhang_san_with_readings(server, config, "bp-1")
        page = client.get("/sent").body
        with open_outbox(config) as outbox:  # then an ECG: the oldest ECG waiting is its
            enqueue_recording(outbox, make_recording(6, patient=Patient(VALID_ID, "")), config, key="ecg-6")
        with_ecg = client.get("/sent").body
    link = page.split('id="h-link"', 1)[1].split("</section>", 1)[0]
    assert "0 份检查等待发送" in link and "最早的一份" not in link, link
    link = with_ecg.split('id="h-link"', 1)[1].split("</section>", 1)[0]
    assert "1 份检查等待发送" in link and "最早的一份自" in link, link


def test_the_sent_page_lists_the_readings_for_the_county_whose_what_when_and_where(
    browser: object, tmp_path: Path
) -> None:
    """A cuff user's reading is stored for the patient that user is mapped to, whoever is checked
    in: the Sent page listed ECGs only, so the doctor could not see where a reading went. It lists
    the readings too: whose (name and ID), what (with its unit), when, and sent or waiting."""
    import time

    from lastmile.clinic.observations import OBSERVATION_KIND
    from lastmile.data_dir import open_outbox

    config = console_config(tmp_path / "data")
    with running_console(config) as server:
        zhang_san_with_readings(server, config, "bp-1", "bp-2")
        with open_outbox(config) as outbox:  # the first one sent: the county platform took it
            at = time.time()
            (claimed,) = outbox.claim(OBSERVATION_KIND, 1, at)
            outbox.mark_sent([claimed.id], at)
            outbox.mark_committed([claimed.id], at)
        log_in(browser, server)
        browser.get(server.url + "/sent")  # type: ignore[attr-defined]
        save_screenshot(browser, "sent-readings")
        section = browser.find_element(by("css"), "section[aria-labelledby='h-readings']").text  # type: ignore[attr-defined]
        rows = [r.text for r in browser.find_elements(by("css"), "section[aria-labelledby='h-readings'] li.card")]  # type: ignore[attr-defined]
    assert "读数" in section and len(rows) == 2, section
    for row in rows:
        assert "张三" in row and VALID_ID in row and "血压 131/84 mmHg" in row, row
    waiting, sent = rows  # newest first
    assert "等待发送" in waiting and "已发送" not in waiting, waiting
    assert "已发送" in sent and "等待" not in sent, sent


def assign_box(page: str, held_id: int | str) -> str:
    (box,) = re.findall(rf'<input id="assign-{held_id}"[^>]*>', page)
    return box


def test_a_reading_held_from_yesterday_is_not_offered_to_the_patient_checked_in_today(tmp_path: Path) -> None:
    """A cuff's reading from yesterday, held unassigned, had its Assign box filled with today's
    patient: one click put yesterday's blood pressure on the wrong patient. Only a reading measured
    during this check-in is offered (and says so); an empty box is refused, never the current one."""
    from tests.console_harness import bp_reading

    config = console_config(tmp_path / "data")
    now = dt.datetime.now(dt.timezone.utc)
    # the second one's cuff dates it just after the check-in below (its clock runs a little ahead)
    yesterday, during = hold_readings(
        config,
        bp_reading(now - dt.timedelta(days=1), "bp-yesterday"),
        bp_reading(now + dt.timedelta(seconds=60), "bp-now"),
    )
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
        page = client.get("/today").body
        empty = client.post("/today/assign-reading", {"held_id": str(yesterday), "patient_id": ""})
        after = client.get("/today").body
    assert 'value=""' in assign_box(page, yesterday), assign_box(page, yesterday)
    assert f'value="{VALID_ID}"' in assign_box(page, during), assign_box(page, during)
    assert f"在 {VALID_ID} 就诊期间测量" in page and "在本次就诊之前测量" in page, page
    assert empty.status in (200, 303, 400), empty.status
    assert f'id="assign-{yesterday}"' in after, after  # still held: nobody's


def one_value_reading(kind: str, code: str, value: float, unit: str, key: str) -> object:
    from devices.identity import DeviceIdentity
    from devices.observation import Observation, Quantity, TimeSource

    now = dt.datetime.now(dt.timezone.utc)
    return Observation(
        kind=kind,
        quantities=(Quantity(code, value, unit, value, unit),),
        measured_at=now,
        time_source=TimeSource.DEVICE_CLOCK,
        received_at=now,
        device=DeviceIdentity("Acme", kind, "42", "AA:BB:CC:DD:EE:02"),
        record_key=key,
    )


def shown_readings(page: str) -> list[str]:
    """Each held reading's line as the doctor reads it: its kind's name, then its values."""
    rows = re.findall(r'<strong>([^<]*)</strong> <span class="reading">([^<]*)</span>', page)
    return [f"{name} {values}" for name, values in rows]


def test_a_reading_names_its_kind_once_whatever_the_kind_and_language(tmp_path: Path) -> None:
    """A thermometer's reading read 体温 体温 37.2 °C on Today (Temperature temperature 37.2 °C in
    English): the kind's name, then the same quantity named again before its value."""
    config = console_config(tmp_path / "data")
    hold_readings(
        config,
        one_value_reading("body-temperature", "body-temperature", 37.2, "Cel", "t-1"),
        one_value_reading("spo2", "spo2", 97.0, "%", "o-1"),
        one_value_reading("body-weight", "body-weight", 61.5, "kg", "w-1"),
        one_value_reading("glucose", "glucose", 5.6, "mmol/L", "g-1"),
    )
    pages = {language: shown_readings(page) for language, page in pages_in_both_languages(config, "/today").items()}
    assert pages["zh-CN"] == ["体温 37.2 °C", "血氧 97 %", "体重 61.5 kg", "血糖 5.6 mmol/L"], pages["zh-CN"]
    assert pages["en"] == ["Temperature 37.2 °C", "Blood oxygen 97 %", "Weight 61.5 kg", "Blood glucose 5.6 mmol/L"], (
        pages["en"]
    )


def test_a_value_the_device_sent_as_none_is_said_in_words(tmp_path: Path) -> None:
    """A device's "no value" (a cuff that had no result, a BLE oximeter's NRes) read "血氧 (nres) %"
    on Today and Sent: now 无结果, its unit gone with the number; a value beside it is kept."""
    from dataclasses import replace

    config = console_config(tmp_path / "data")
    failed_bp = cuff_reading(
        "bp-nres",
        Quantity("systolic", None, "mm[Hg]", None, "mmHg", special="nres"),
        Quantity("diastolic", None, "mm[Hg]", None, "mmHg", special="nres"),
        Quantity("pulse-rate", 72.0, "/min", 72.0, "bpm"),
    )
    no_spo2 = replace(
        one_value_reading("spo2", "spo2", 97.0, "%", "o-nres"),  # type: ignore[type-var]
        quantities=(Quantity("spo2", None, "%", special="nres"),),
    )
    hold_readings(config, failed_bp, no_spo2)
    pages = {language: shown_readings(page) for language, page in pages_in_both_languages(config, "/today").items()}
    assert sorted(pages["zh-CN"]) == ["血压 无结果/无结果，脉搏 72 次/分", "血氧 无结果"], pages["zh-CN"]
    assert sorted(pages["en"]) == ["Blood oxygen no result", "Blood pressure no result/no result, pulse 72 /min"], (
        pages["en"]
    )


def test_an_impossible_value_the_device_sent_is_said_in_the_pages_words(tmp_path: Path) -> None:
    """A thermometer's 26251 °C and a cuff's systolic with no number, kept flagged as the device
    sent them, read "体温 (implausible: 26251 °C) °C" and "血压 (implausible)/80 mmHg" on a Chinese
    Today: English, and the unit said twice. Now 不可能的数值 with what the device said."""
    from dataclasses import replace

    from devices.plausibility import IMPLAUSIBLE

    config = console_config(tmp_path / "data")
    blank_systolic = cuff_reading(
        "bp-implausible",
        Quantity("systolic", None, "mm[Hg]", special=IMPLAUSIBLE),
        Quantity("diastolic", 80.0, "mm[Hg]", 80.0, "mm[Hg]"),
    )
    hot = replace(
        one_value_reading("body-temperature", "body-temperature", 37.0, "Cel", "t-implausible"),  # type: ignore[type-var]
        quantities=(Quantity("body-temperature", None, "Cel", 26251.0, "Cel", special=IMPLAUSIBLE),),
    )
    hold_readings(config, blank_systolic, hot)
    pages = {language: shown_readings(page) for language, page in pages_in_both_languages(config, "/today").items()}
    zh = pages["zh-CN"]
    assert sorted(zh) == ["体温 不可能的数值（设备显示 26251 °C）", "血压 不可能的数值/80 mmHg"], zh
    assert sorted(pages["en"]) == [
        "Blood pressure impossible value/80 mmHg",
        "Temperature impossible value (the device said 26251 °C)",
    ], pages["en"]


def test_an_impossible_value_is_shown_as_a_plain_number_a_doctor_can_read(tmp_path: Path) -> None:
    """A cuff that sent 11360000 mmHg read 不可能的数值 (设备显示 1.136e+07 mmHg) on Today: a
    number in scientific notation no village doctor reads, and six significant digits at most
    (a thermometer's 1234567.89 °C as 1.23457e+06). Now plain numbers, with the unit's decimals."""
    from dataclasses import replace

    from devices.plausibility import IMPLAUSIBLE

    config = console_config(tmp_path / "data")
    huge_systolic = cuff_reading(
        "bp-huge",
        Quantity("systolic", None, "mm[Hg]", 11360000.0, "mm[Hg]", special=IMPLAUSIBLE),
        Quantity("diastolic", 80.0, "mm[Hg]", 80.0, "mm[Hg]"),
    )
    huge_temperature = replace(
        one_value_reading("body-temperature", "body-temperature", 37.0, "Cel", "t-huge"),  # type: ignore[type-var]
        quantities=(Quantity("body-temperature", None, "Cel", 1234567.891, "Cel", special=IMPLAUSIBLE),),
    )
    hold_readings(config, huge_systolic, huge_temperature)
    pages = {language: shown_readings(page) for language, page in pages_in_both_languages(config, "/today").items()}
    assert sorted(pages["zh-CN"]) == [
        "体温 不可能的数值（设备显示 1234567.89 °C）",
        "血压 不可能的数值（设备显示 11360000 mmHg）/80 mmHg",
    ], pages["zh-CN"]
    assert sorted(pages["en"]) == [
        "Blood pressure impossible value (the device said 11360000 mmHg)/80 mmHg",
        "Temperature impossible value (the device said 1234567.89 °C)",
    ], pages["en"]


def test_a_damaged_huge_or_tiny_value_is_said_in_few_digits_a_doctor_can_read(tmp_path: Path) -> None:
    """A damaged BLE FLOAT thermometer value (exponent 127) read 设备显示 83886059999...(134 digits)
    °C: every digit past the 17th float's noise the device never sent; and an impossible 0.004 kg
    read "0 kg", a value the scale did not send. Now the huge one is "> 1000000000000" and the tiny
    one keeps its significant digits."""
    from dataclasses import replace

    from devices.plausibility import IMPLAUSIBLE

    config = console_config(tmp_path / "data")
    damaged = 8388605 * 10.0**127  # the FLOAT's largest mantissa and exponent
    huge_temperature = replace(
        one_value_reading("body-temperature", "body-temperature", 37.0, "Cel", "t-damaged"),  # type: ignore[type-var]
        quantities=(Quantity("body-temperature", None, "Cel", damaged, "Cel", special=IMPLAUSIBLE),),
    )
    tiny_weight = replace(
        one_value_reading("body-weight", "body-weight", 60.0, "kg", "w-tiny"),  # type: ignore[type-var]
        quantities=(Quantity("body-weight", None, "kg", 0.004, "kg", special=IMPLAUSIBLE),),
    )
    hold_readings(config, huge_temperature, tiny_weight)
    pages = {
        language: [html.unescape(shown) for shown in shown_readings(page)]  # the page's "&gt;" as read
        for language, page in pages_in_both_languages(config, "/today").items()
    }
    assert sorted(pages["zh-CN"]) == [
        "体温 不可能的数值（设备显示 > 1000000000000 °C）",
        "体重 不可能的数值（设备显示 0.004 kg）",
    ], pages["zh-CN"]
    assert sorted(pages["en"]) == [
        "Temperature impossible value (the device said > 1000000000000 °C)",
        "Weight impossible value (the device said 0.004 kg)",
    ], pages["en"]


def test_plain_numbers_at_their_edges() -> None:
    """The edges of `plain_number`: at most 7 significant digits for a value its decimals would
    round to 0, "less than" words nearer 0 than 0.000001, "more than" words from 10^12 on."""
    from lastmile.clinic.observations import plain_number

    assert plain_number(0.00412345678, "kg") == "0.004123457"
    assert plain_number(-0.004, "kg") == "-0.004"
    assert plain_number(0.4, "mm[Hg]") == "0.4"  # not "0" mmHg
    assert plain_number(1e-9, "kg") == "< 0.000001"
    assert plain_number(-5e13, "kg") == "< -1000000000000"
    assert plain_number(999999999999.4, "mm[Hg]") == "999999999999"  # below 10^12 every digit the device's
    assert plain_number(0.0, "kg") == "0"
    assert plain_number(36.8149, "Cel") == "36.81"


def test_a_last_reading_written_before_the_plain_numbers_reads_plain_too(tmp_path: Path) -> None:
    """A device row (and a Sent record) keeps the summary written when the reading came: one
    written before the numbers were plain still said "1.136e+07" on the Devices page. The page
    now says the device's number plain, whenever the summary was written."""
    from lastmile.clinic.devices import DeviceRegistry

    config = console_config(tmp_path / "data")
    registry = DeviceRegistry.open(config.data_dir)
    try:
        registry.update_status(
            "serial:cuff",
            now=dt.datetime.now(dt.timezone.utc),
            transport="serial",
            reading="(implausible: 1.136e+07 mm[Hg])/80 mm[Hg], pulse-rate 72 /min",
        )
    finally:
        registry.close()
    pages = pages_in_both_languages(config, "/devices")
    shown = {language: re.findall(r'<span class="reading">([^<]*)</span>', page) for language, page in pages.items()}
    assert shown["zh-CN"] == ["不可能的数值（设备显示 11360000 mmHg）/80 mmHg，脉搏 72 次/分"], shown
    assert shown["en"] == ["impossible value (the device said 11360000 mmHg)/80 mmHg, pulse 72 /min"], shown


def recorded_times(page: str) -> list[dt.datetime]:
    """The Sent page's 已记录 step of each ECG, newest first, as its <time> gives it."""
    return [dt.datetime.fromisoformat(t) for t in re.findall(r'<li class="done">已记录 <time datetime="([^"]+)"', page)]


def test_the_sent_page_says_an_ecg_was_recorded_when_its_report_says(tmp_path: Path) -> None:
    """The Sent page's 已记录 was when the ECG entered the gateway, the Reports page's "ECG recorded"
    when the cart recorded it: two times for one ECG. Both give the acquisition time, a purged
    ECG's too (kept with what was sent)."""
    from devices.identity import Patient
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from tests.ecg_factories import T0, make_recording

    config = console_config(tmp_path / "data")
    report_id = sent_purged_ecg_with_report(config)  # make_recording(5): acquired at T0 + 5 min
    with open_outbox(config) as outbox:
        enqueue_recording(outbox, make_recording(6, patient=Patient(VALID_ID, "Zhang^San=张^三")), config, key="ecg-6")
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        sent = client.get("/sent").body
        report = client.get(f"/reports/{report_id}").body
    assert recorded_times(sent) == [T0 + dt.timedelta(minutes=6), T0 + dt.timedelta(minutes=5)], recorded_times(sent)
    local = (T0 + dt.timedelta(minutes=5)).astimezone(recorded_times(sent)[1].tzinfo)
    assert local.strftime("%H:%M:%S") in report, report


def test_the_versions_on_the_system_page_are_named_in_the_pages_language(tmp_path: Path) -> None:
    """System -> Versions named two of them "kernel" and "OS" on the Chinese page."""
    pages = {
        language: re.findall(r"<dt>([^<]*)</dt>", page.split('id="h-versions"', 1)[1].split("</section>")[0])
        for language, page in pages_in_both_languages(console_config(tmp_path / "data"), "/system").items()
    }
    assert "kernel" not in pages["zh-CN"] and "OS" not in pages["zh-CN"], pages["zh-CN"]
    assert "Linux 内核" in pages["zh-CN"] and "Linux kernel" in pages["en"], pages
    if Path("/etc/os-release").exists():
        assert "操作系统" in pages["zh-CN"] and "Operating system" in pages["en"], pages


def test_the_assign_box_says_whom_it_offers_on_a_phone(browser: object, tmp_path: Path) -> None:
    """The held reading's Assign form on a phone: the line saying whether the box offers the patient
    checked in (measured during the check-in) is on screen, under the box, not squeezed beside it."""
    from tests.console_harness import bp_reading

    config = console_config(tmp_path / "data")
    now = dt.datetime.now(dt.timezone.utc)
    hold_readings(config, bp_reading(now - dt.timedelta(days=1), "bp-yesterday"))
    with running_console(config) as server:
        log_in(browser, server)
        set_viewport(browser, PHONE)
        browser.find_element(by("id"), "patient_id").send_keys(VALID_ID + "\n")  # type: ignore[attr-defined]
        text_in(browser, "#panel-session", VALID_ID)
        browser.get(server.url + "/today")  # type: ignore[attr-defined]
        text_in(browser, "#panel-held form.assign", "在本次就诊之前测量")
        save_screenshot(browser, "today-held-assign-phone")
        box = browser.execute_script(  # type: ignore[attr-defined]
            """const f = document.querySelector("#panel-held form.assign");
            f.scrollIntoView({block: "center"});
            const r = e => e.getBoundingClientRect();
            return {input: r(f.querySelector("input[name=patient_id]")), note: r(f.querySelector("p")),
                    button: r(f.querySelector("button")), width: document.documentElement.clientWidth,
                    value: f.querySelector("input[name=patient_id]").value};"""
        )
    assert box["value"] == "", box
    assert box["note"]["top"] >= box["input"]["bottom"] and box["note"]["top"] >= box["button"]["bottom"], box
    for part in ("input", "note", "button"):
        assert box[part]["left"] >= 0 and box[part]["right"] <= box["width"], (part, box)


def test_an_ecg_held_from_before_the_check_in_is_not_offered_to_the_patient_checked_in(tmp_path: Path) -> None:
    """As a held reading: an ECG recorded without a patient before this check-in (the cart's
    earlier one) had its Assign box filled with the checked-in patient's ID."""
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from tests.ecg_factories import make_recording

    config = console_config(tmp_path / "data")
    with open_outbox(config) as outbox:  # recorded at T0, weeks ago
        item = enqueue_recording(outbox, make_recording(7, patient=None), config, key="ecg-before").item
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
        page = client.get("/today").body
    assert 'value=""' in assign_box(page, f"ecg-{item.id}"), assign_box(page, f"ecg-{item.id}")


def test_a_monitor_unplugged_with_readings_waiting_for_space_shows_both_on_devices(
    browser: object, tmp_path: Path
) -> None:
    """A serial monitor's 3 readings wait for space (the outbox refuses them), then it is unplugged:
    the unplug error replaced the row's "3 reading(s) waiting for space" words on Devices (the
    status flag and the doctor's FAIL survived). The row shows both, the waiting readings first,
    said from the row's status in the page's words (zh-CN screenshot: devices-waiting-unplugged-phone)."""
    from tests.serial_gateway import Running, monitor_prints_a_report_the_full_outbox_refuses
    from tests.serial_pty import PtyDevice
    from tests.waiting import wait_for as wait_until

    monitor = PtyDevice(tmp_path / "usb-monitor")
    devices = [{"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"}]
    r = Running(tmp_path, devices)
    try:
        monitor_prints_a_report_the_full_outbox_refuses(
            r, monitor, "3 reading(s) waiting for space", patient_id=VALID_ID
        )
        assert r.registry.get("serial:monitor").last_error == ""  # what waits is its status: no other problem
        monitor.unplug()

        def unplug_said() -> bool:
            row = r.registry.get("serial:monitor")
            return not row.connected and bool(row.last_error)

        wait_until(unplug_said)
        error = r.registry.get("serial:monitor").last_error
        config = console_config(Path(r.config.data_dir))
        config.serial.devices = devices
        with running_console(config) as server:
            log_in(browser, server)
            set_viewport(browser, PHONE)
            browser.get(server.url + "/devices")  # type: ignore[attr-defined]
            text_in(browser, "ul.device-list", "monitor")
            save_screenshot(browser, "devices-waiting-unplugged-phone")
            card = browser.find_element(by("css"), "ul.device-list li.card")  # type: ignore[attr-defined]
            row = card.text
            # the row's own words, folded under the technician's details
            details = card.find_element(by("css"), "details").get_attribute("textContent")
    finally:
        r.close()
    assert "等待存储空间：3 条测量结果（" in row, row
    assert "最近的问题" in row and "已拔出" in row and error in details, (row, details)
    assert row.index("等待存储空间") < row.index("已拔出"), row
    assert row.count("3 reading(s)") == 0, row  # what waits is said once, in the page's words
