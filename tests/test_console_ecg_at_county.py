"""Today's ECG panel says whether the ECG has reached the county and whether its report is back
(REV-R 4). It said only the quality: a STAT ECG stuck behind a dead link showed "合格 心率 61" and
nothing else, and with the patient in front of him the doctor could not answer "has the county got
it / read it?" without leaving Today. The real forwarder, the real reading center and the real
console's page and event stream here."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from devices.identity import Patient
from lastmile.config import Config
from lastmile.console import views
from lastmile.console.sources import ClinicData, now_utc
from lastmile.data_dir import open_outbox
from lastmile.demo.cardiologist import STEMI, ecg_report_sr
from lastmile.demo.reading_center import EmbeddedReadingCenter
from lastmile.demo.runner import source_ecg
from lastmile.ecg.holds import NAME_MISMATCH, discard_held_ecg
from lastmile.ecg.intake import enqueue_recording
from lastmile.reports.store import ReportStore
from lastmile.services.forward import forwarder_settings
from lastmile.services.link_status import LAST_ERROR_AT, READING_CENTER_STATUS
from tests.console_harness import DOCTOR, VALID_ID, Client, enqueue_ecg, panel_events, running_console
from tests.ecg_factories import make_recording
from tests.peers import free_port
from tests.report_peers import gateway_config, poller_for, send_ecgs, to_read
from tests.statement_trace import traced
from uploader.ecg_forwarder import EcgForwarder

pytestmark = pytest.mark.timeout(300)

CLOCK = r"(?:\d{1,2}月\d{1,2}日 )?\d{2}:\d{2}"  # fmt.when: a time of today, else with its date


@pytest.fixture
def center() -> Iterator[EmbeddedReadingCenter]:
    center = EmbeddedReadingCenter(port=free_port(), gateway_port=free_port(), gateway_ae="CLINIC01")
    center.start()
    yield center
    center.stop()


def console_for(config: Config) -> Config:
    config.console.listen = f"127.0.0.1:{free_port()}"
    config.gps.source = "none"
    return config


def county_line(panel: str) -> str:
    """The panel's line on where the ECG is, as the doctor reads it (its tag kept: class, link)."""
    found = re.search(r'<p class="[^"]*" data-county="[^"]*">.*?</p>', panel, re.S)
    assert found is not None, panel
    return re.sub(r"\s+", " ", found.group(0))


def ecg_panel(client: Client) -> str:
    return client.get("/today").body.split('id="panel-ecg"', 1)[1].split("</section>", 1)[0]


def test_a_stat_ecg_behind_a_dead_link_says_it_is_not_at_the_county_and_since_when(tmp_path: Path) -> None:
    config = console_for(gateway_config(tmp_path, free_port(), "READING_CENTER"))  # nothing listens there
    stop = threading.Event()
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "陈桂英", "stat": "on"}).status == 303
        with open_outbox(config) as outbox:
            rec = make_recording(7, stat=True, patient=Patient(VALID_ID, "Chen^Guiying=陈^桂英"))
            item = enqueue_recording(outbox, rec, config, key="ecg-stat").item
            with EcgForwarder(outbox, forwarder_settings(config)) as forwarder:
                deadline = time.monotonic() + 60
                while not (outbox.get(item.id).attempts >= 2 and outbox.status(READING_CENTER_STATUS)):
                    assert time.monotonic() < deadline, "no attempt failed"
                    time.sleep(min(forwarder.step(stop), 0.2))
        line = county_line(ecg_panel(client))
        sent_page = client.get("/sent").body
    said = re.search(r"网络自 (" + CLOCK + r") 起中断。检查数据安全地保存在这里，网络恢复后立即发送。", line)
    assert said is not None and line.startswith('<p class="warn" data-county="link-down">还没送到县里。'), line
    assert f"网络自 {said.group(1)} 起中断" in sent_page  # the Sent page's words and time


def test_todays_ecg_says_when_it_reached_the_county_and_its_critical_report_live(
    tmp_path: Path, center: EmbeddedReadingCenter
) -> None:
    config = console_for(gateway_config(tmp_path, center.port, center.ae_title, listen_port=center.gateway_port))
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "周玉梅"}).status == 303
        with open_outbox(config) as outbox:
            rec = make_recording(5, patient=Patient(VALID_ID, "Zhou^Yumei=周^玉梅"))
            enqueue_recording(outbox, rec, config, key="ecg-5")
        not_yet = county_line(ecg_panel(client))  # the forwarder has not run: no link known down
        (study,) = send_ecgs(config, [])
        with open_outbox(config) as outbox:
            assert outbox.purge_due(time.time() + 1, 0.0) == 1  # confirmed: its patient erased here
        at_county = county_line(ecg_panel(client))

        events = panel_events(client)  # the page left open: the stream's panels
        first = next(e for e in events if e["id"] == "panel-ecg")
        with ReportStore.open(config.data_dir) as store:
            center.add_report(
                ecg_report_sr(to_read(study), findings=[], impression="急性下壁心肌梗死", coded_findings=[STEMI])
            )
            assert poller_for(config, store).run_round(force=True).stored == 1
            (report,) = store.reports()
        # the next ECG panel pushed that differs: a push between (the sent-study record, the
        # purge's own write landing after `first`) may still say "at the county"
        pushed = next(
            e for e in events if e["id"] == "panel-ecg" and county_line(e["html"]) != county_line(first["html"])
        )
        events.close()
    assert re.fullmatch(
        r'<p class="ok" data-county="at-county">' + CLOCK + r" 已送到县里，县里的报告还没返回。</p>", at_county
    )
    assert not_yet == '<p class="muted" data-county="waiting">还没送到县里。</p>', not_yet
    assert county_line(first["html"]) == at_county
    critical = county_line(pushed["html"])
    assert re.fullmatch(
        r'<p class="error" data-county="report-critical">危急值：县里的报告已于 '
        + CLOCK
        + rf' 返回。 <span class="then-link">· <a href="/reports/{report.id}">查看报告</a></span></p>',
        critical,
    ), critical

    # the live push is rendered on every change: its report is found by the study's index, once
    data = ClinicData(config)
    try:
        with traced(data.db.conn, data.outbox.db.conn) as statements:
            model = views.today(data, now_utc())
        asked = [s for s in statements if re.search(r"\bFROM reports\b", s)]
        plans = [row[3] for s in asked for row in data.db.conn.execute("EXPLAIN QUERY PLAN " + s)]
    finally:
        data.close()
    assert model["ecg_at_county"].report_critical
    assert len(asked) == 1 and not any(p.startswith("SCAN reports") for p in plans), (asked, plans)


def test_a_routine_report_back_is_said_with_its_time_and_a_link_not_in_red(
    tmp_path: Path, center: EmbeddedReadingCenter
) -> None:
    config = console_for(gateway_config(tmp_path, center.port, center.ae_title, listen_port=center.gateway_port))
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
        (study,) = send_ecgs(config, [make_recording(6, patient=Patient(VALID_ID, "Zhang^San=张^三"))])
        with ReportStore.open(config.data_dir) as store:
            center.add_report(ecg_report_sr(to_read(study), findings=["窦性心律"], impression="心电图正常"))
            assert poller_for(config, store).run_round(force=True).stored == 1
            (report,) = store.reports()
        line = county_line(ecg_panel(client))
    assert re.fullmatch(
        r'<p class="ok" data-county="report">县里的报告已于 '
        + CLOCK
        + rf' 返回。 <span class="then-link">· <a href="/reports/{report.id}">查看报告</a></span></p>',
        line,
    ), line


def held_for_re_record_with_the_link_down(config: Config, url: str) -> tuple[Client, str]:
    """张三 checked in; an ECG with V3 off arrives and is held for the doctor's re-record decision;
    the reading center's link is down meanwhile. The doctor's client and the panel, once it offers 重做."""
    client = Client(url)
    client.login(DOCTOR)
    assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
    enqueue_ecg(config, lead_off=True)
    now = time.time()
    with open_outbox(config) as outbox:
        outbox.record_status(READING_CENTER_STATUS, {"last_success": now - 600, LAST_ERROR_AT: now - 60}, now)
    deadline = time.monotonic() + 40
    while "/re-record" not in (panel := ecg_panel(client)):
        assert time.monotonic() < deadline, panel
        time.sleep(0.5)
    return client, panel


def test_an_ecg_held_for_the_doctor_is_not_said_to_go_when_the_link_is_back(tmp_path: Path) -> None:
    """Held for his 重做 / 仍然发送 with the link down, the panel said "网络恢复后立即发送": it waits for
    him, not for the link (the Sent page says so too). It says it waits for his decision."""
    config = console_for(gateway_config(tmp_path, free_port(), "READING_CENTER"))
    config.ecg.re_record_hold_s = 900
    with running_console(config) as server:
        client, panel = held_for_re_record_with_the_link_down(config, server.url)
        sent_page = client.get("/sent").body
    line = county_line(panel)
    assert line == '<p class="warn" data-county="held">还没送到县里。 等待医生处理。</p>', line
    assert "网络恢复后立即发送" not in panel
    assert "data-held-for-doctor" in sent_page  # the Sent page: the hold before the link


def test_after_re_record_the_ecg_is_not_said_refused_by_the_county_nor_to_go_as_it_is(tmp_path: Path) -> None:
    """重做 quarantines the ECG by the doctor's own decision: the panel said in red to call the
    county IT, with the English quarantine reason, and that the ECG goes to the county as it is,
    under its own "Noted: record again"; the Sent page said to call the county IT too. Now only
    that note on Today, and the Sent page says it was not sent because he records it again."""
    config = console_for(gateway_config(tmp_path, free_port(), "READING_CENTER"))
    config.ecg.re_record_hold_s = 900
    with running_console(config) as server:
        client, panel = held_for_re_record_with_the_link_down(config, server.url)
        (action,) = re.findall(r'action="(/today/ecg/\d+/re-record)"', panel)
        assert client.post(action).status == 303
        panel = ecg_panel(client)
        sent_page = client.get("/sent").body
    text = re.sub(r"\s+", " ", panel)
    assert "已记录：请重做。新的记录会显示在这里。" in text, text
    studies = sent_page.split('id="h-studies"', 1)[1].split("</section>", 1)[0]
    # no county line on Today (its own note says where it is), no call to the county IT, no English
    wrong_today = [
        w for w in ("data-county", "信息科", "recorded again at the gateway", "按原样发送到县里") if w in text
    ]
    wrong_sent = [w for w in ("信息科", "recorded again at the gateway") if w in studies]
    assert (wrong_today, wrong_sent) == ([], []), (text, studies)
    assert "未发送：已选择重做这份心电图。" in studies, studies


def test_an_ecg_kept_back_by_lastmile_ecg_discard_says_record_again_not_call_the_county(tmp_path: Path) -> None:
    """`lastmile ecg discard` keeps back a held ECG of good enough quality (held for its name) as 重做
    does: no "record again" note under a verdict then, so the county line itself says it, not the
    red "call the county IT" with the English quarantine reason."""
    config = console_for(gateway_config(tmp_path, free_port(), "READING_CENTER"))
    config.ecg.re_record_hold_s = 0  # its name is the hold here
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
        # a good 10 s ECG the cart filed under the ID with another name: held for its name only
        rec = replace(source_ecg(), patient=Patient(VALID_ID, "Zhang^San"), flags=(NAME_MISMATCH,))
        with open_outbox(config) as outbox:
            item = enqueue_recording(outbox, replace(rec, acquired_at=now_utc()), config, key="ecg-name").item
            assert item.hold_reason == NAME_MISMATCH and item.meta["quality"]["verdict"] != "re-record", item
            discard_held_ecg(outbox, item.id, time.time())  # what `lastmile ecg discard E<n>` does
        panel = ecg_panel(client)
    line = county_line(panel)
    assert line == '<p class="done" data-county="re-recorded">已记录：请重做。新的记录会显示在这里。</p>', line
    assert "按原样发送到县里" not in panel, panel
