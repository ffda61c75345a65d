"""The Sent page's ECGs held for the doctor (no patient, another patient's, a re-record verdict):
each card says why it waits and where to decide, and the link card does not count them as
studies waiting for the link. A real console over a real outbox, the holds as intake makes them."""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterator

import pytest

from devices.identity import Patient
from lastmile.config import Config
from lastmile.console.service import ConsoleServer
from lastmile.data_dir import open_outbox
from lastmile.doctor import Doctor
from lastmile.ecg.intake import enqueue_recording, with_patient_check
from tests.console_browser import by, log_in, save_screenshot, set_viewport, text_in
from tests.console_harness import VALID_ID, Client, console_config, enqueue_ecg, running_console
from tests.ecg_factories import make_recording

pytestmark = pytest.mark.timeout(600)

FILE_PATIENT = Patient("320122198001010038", "Wang^Wu=王^五")  # the file names them; 张三 is checked in
# each kind of hold, as Today's held panel words it (zh-CN)
HELD_WORDS = {
    "unassigned": "若未指定，将于",
    "patient-mismatch": f"心电图上的患者是 {FILE_PATIENT.patient_id}，不是当前患者。如不处理，将于",
    "re-record": "质量检查结果：需要重做。如不处理，将于",
}


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Config, ConsoleServer]]:
    """张三 checked in; an ECG with no patient, one naming 王五, one with V3 off (record again), and
    one good ECG of 张三's: three held for the doctor, one waiting for the link only."""
    config = console_config(tmp_path_factory.mktemp("sent-held") / "data")
    with running_console(config) as server:
        client = Client(server.url)
        client.login()
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
        with open_outbox(config) as outbox:
            for key, patient in (("no-patient", None), ("mismatch", FILE_PATIENT)):
                rec = with_patient_check(make_recording(3, patient=patient), frozenset({VALID_ID}))
                enqueue_recording(outbox, rec, config, key=f"sent-held:{key}", now=time.time())
        enqueue_ecg(config, lead_off=True)
        enqueue_ecg(config, lead_off=False)
        yield config, server


def section(page: str, heading: str) -> str:
    return page.split(f'id="{heading}"', 1)[1].split("</section>", 1)[0]


def text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def test_a_held_ecg_on_the_sent_page_says_it_waits_for_the_doctor_and_where(
    clinic: tuple[Config, ConsoleServer],
) -> None:
    """An ECG held for the doctor showed as "已记录 · 已发送 —" like any queued study and was
    counted in "N 份检查等待发送": the doctor waited for the link while it waited for him. Its
    card says why it waits, in the held panel's words, with a link to Today; the link card
    counts it apart."""
    client = Client(clinic[1].url)
    client.login()
    page = client.get("/sent").body
    cards = section(page, "h-studies").split('<li class="card journey')[1:]
    assert len(cards) == 4, cards
    held = [c for c in cards if "data-held-for-doctor" in c]
    for reason, words in HELD_WORDS.items():
        said = [text(c) for c in held if words in text(c)]
        assert said, f"no card says why the {reason} ECG waits: {[text(c) for c in cards]}"
        assert "等待医生处理" in said[0] and "请在“今天”页面处理" in said[0], said[0]
    assert all('href="/today#h-held"' in c for c in held), held
    assert len(held) == 3, [text(c) for c in cards]  # the good ECG waits for the link only
    link = text(section(page, "h-link"))
    assert "1 份检查等待发送" in link, link
    assert "另有 3 份心电图等待医生处理" in link, link


def test_the_held_ecgs_sent_cards_on_a_phone(browser: object, clinic: tuple[Config, ConsoleServer]) -> None:
    """The same page on a 360x800 phone (zh-CN screenshot: sent-held-ecgs-phone): the held
    cards' words and their link to Today within the screen."""
    set_viewport(browser, (360, 800))
    log_in(browser, clinic[1])
    browser.get(clinic[1].url + "/sent")  # type: ignore[attr-defined]
    text_in(browser, "#h-studies + ol", "等待医生处理")
    save_screenshot(browser, "sent-held-ecgs-phone")
    links = browser.find_elements(by("css"), "[data-held-for-doctor] a[href='/today#h-held']")  # type: ignore[attr-defined]
    assert len(links) == 4, len(links)  # three cards and the link card
    width = browser.execute_script("return document.documentElement.clientWidth")  # type: ignore[attr-defined]
    for a in links:
        box = a.rect
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, f"off the screen: {box}, {a.text}"


def test_the_system_page_says_the_held_ecgs_apart_and_where_to_decide(clinic: tuple[Config, ConsoleServer]) -> None:
    """The System page said "等待发送 1 份心电图" and nothing of the three ECGs held for the doctor:
    the doctor saw one ECG in the queue and none waiting for him. It says them apart, in the Sent
    page's words, with a link to Today."""
    client = Client(clinic[1].url)
    client.login()
    state = section(client.get("/system").body, "h-state")
    assert "等待发送 1 份心电图" in text(state), text(state)
    assert "另有 3 份心电图等待医生处理，不是在等网络： 请在“今天”页面处理" in text(state), text(state)
    assert 'href="/today#h-held"' in state, state


def test_lastmile_doctor_does_not_count_the_held_ecgs_as_waiting_for_the_link(
    clinic: tuple[Config, ConsoleServer],
) -> None:
    """`lastmile doctor`'s queue line said "4 waiting": the three ECGs held for the doctor counted
    as waiting for the link. It counts the one waiting for the link, and says the held ones apart."""
    [link] = [f for f in Doctor(clinic[0]).check_queue() if f.topic == "link"]
    assert link.message.startswith("1 waiting, "), link.message
    assert "3 more ECG(s) held for the doctor" in link.message, link.message
