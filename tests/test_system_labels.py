"""Each check on the System page (and each line of `lastmile doctor`) says what it is about: a
check that gives several findings (the data partition's space and its SD card; the sending queue's
link and the daily budget holding routine ECGs; one per background service) heads each with its
own label, never the same 数据存储 / 发送队列 twice with 正常 beside one and 注意 beside the other."""

from __future__ import annotations

import datetime as dt
import html
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from lastmile.clock import local_zone
from lastmile.config import Config
from lastmile.console.app import advice_text
from lastmile.console.i18n import Localizer
from lastmile.doctor import Finding, Level, render_text
from lastmile.reports.store import RECORDER_STATUS, ReportStore
from lastmile.services.metered import meters
from tests.console_harness import DOCTOR, Client, console_config, running_console, store_returned_reports
from tests.metering_setup import DAY, queue_items
from tests.service_harness import doctor
from uploader.outbox import Outbox

FINDING_LABEL = re.compile(r'<li class="finding [a-z]+">.*?<strong>(.*?)</strong>', re.S)


def repeated(labels: list[str]) -> list[str]:
    return [label for label, n in Counter(labels).items() if n > 1]


def text_labels(findings: list[Finding]) -> list[str]:
    """The second column of `lastmile doctor`'s lines (level, what it is about, message)."""
    lines = render_text(findings).splitlines()[:-1]  # the last line is the summary
    return [re.split(r"\s{2,}", line.strip(), maxsplit=2)[1] for line in lines if not line.lstrip().startswith("hint:")]


def budget_holds_routine_ecgs(config: Config, now: float) -> None:
    """Three routine ECGs two days old, the 1 MB daily budget spent every day since: held (a WARN)
    while the link itself is fine (an OK)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    queue_items(config.data_dir, 3, at=now - 2 * DAY)
    with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
        for days_ago in (0, 1, 2):
            meters(config, outbox)["dicom"].spend(2**20, now - days_ago * DAY)


def test_no_two_checks_on_the_system_page_share_a_label(tmp_path: Path) -> None:
    """The 390 px zh-CN screenshot: 发送队列 正常 (the link) and 发送队列 注意 (the budget), 数据存储
    正常 (space) and 数据存储 注意 (the SD card's mount): the doctor cannot tell which is which."""
    config = console_config(tmp_path / "data")
    config.reading_center.metered.daily_budget_mb = 1.0
    now = time.time()
    budget_holds_routine_ecgs(config, now)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = html.unescape(client.get("/system").body)
    labels = FINDING_LABEL.findall(page)
    queue = [label for label in labels if label.startswith("发送队列")]
    assert len(queue) == 2, labels  # the link's row and the budget's
    assert not repeated(labels), f"rows sharing a label: {repeated(labels)} in {labels}"
    assert any("流量额度" in label for label in queue), queue  # the budget's row names the budget


def test_no_two_lines_of_lastmile_doctor_share_a_label(tmp_path: Path) -> None:
    """The technician's text: `WARN  queue  3 routine ...` under `OK    queue  3 waiting ...`, and
    four `services` lines, one per unit, the unit only inside the message."""
    now = time.time()
    d = doctor(tmp_path, "[reading_center.metered]\ndaily_budget_mb = 1.0\n", now=lambda: now)
    budget_holds_routine_ecgs(d.config, now)
    queue = d.check_queue()
    assert len(queue) == 2 and not repeated(text_labels(queue)), render_text(queue)

    def active(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(
            cmd, 0, "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\nSubState=running\nNRestarts=0\n", ""
        )

    (tmp_path / "systemd").mkdir()
    services = doctor(tmp_path, run=active, systemd_run_dir=tmp_path / "systemd").check_services()
    assert len(services) == 4 and not repeated(text_labels(services)), render_text(services)
    data = d.check_data_partition()
    assert len(data) == 2 and not repeated(text_labels(data)), render_text(data)


def test_a_data_partition_mounted_to_wear_the_card_is_not_said_to_be_full(tmp_path: Path) -> None:
    """The SD card row's warning (no noatime, a 5 s journal commit) began 存储空间快满了 (storage nearly
    full) beside 剩余空间 正常: the doctor reads that the storage is full. Each row says its own."""
    d = doctor(tmp_path)
    d.mountinfo.write_text(f"30 1 179:3 / {tmp_path} rw,relatime shared:9 - ext4 /dev/p3 rw\n")
    space, card = d.check_data_partition()
    assert space.level is Level.OK and card.level is Level.WARN, render_text([space, card])
    zh = Localizer("zh-CN", local_zone())
    assert "SD卡" in advice_text(card, zh) and "满" not in advice_text(card, zh), advice_text(card, zh)
    filling = Finding("data", Level.WARN, "close to outbox.min_free_mb", topic="space")
    assert "满" in advice_text(filling, zh) and "磨损" not in advice_text(filling, zh), advice_text(filling, zh)


def test_every_topic_a_check_can_name_has_a_chinese_label() -> None:
    """A topic without a label would show its bare English key beside the Chinese check."""
    from lastmile.console.app import TOPIC_LABELS
    from lastmile.doctor import SERVICE_TOPICS, SERVICES, TOPICS
    from lastmile.services.metered import QUEUED_KINDS
    from uploader import ecg_forwarder, fhir_forwarder

    assert sorted(TOPIC_LABELS) == sorted(TOPICS) and len(set(TOPICS)) == len(TOPICS)
    assert sorted(SERVICE_TOPICS) == sorted(SERVICES)
    held = {f"{reason}-{destination}" for reason in ("window", "budget") for destination in QUEUED_KINDS}
    refused = {f"refused-{name}" for name in (ecg_forwarder.STATUS_NAME, fhir_forwarder.STATUS_NAME)}
    assert held | refused <= set(TOPICS)
    zh = Localizer("zh-CN", local_zone())
    for topic, label in TOPIC_LABELS.items():
        shown = zh.gettext(label, subject="110105194912310021")
        assert shown != label and re.search(r"[\u4e00-\u9fff]", shown), (topic, shown)


def test_each_report_row_says_what_to_do_about_its_own_finding(tmp_path: Path) -> None:
    """A critical result's row read 请立即打开"报告"页: 可能有危急值报告, 或查询报告被拒绝 ("maybe a
    critical report, or report queries are refused"), the advice of every report FAIL; the row of
    sent ECGs clinic.db could not record read the same, and the one of ECGs waiting to be recorded
    that reports cannot be fetched until the link is back. Each row now has its own words."""
    d = doctor(tmp_path)
    store_returned_reports(d.config)
    now = dt.datetime.now(dt.timezone.utc)
    with ReportStore.open(tmp_path) as store:
        store.set_status(
            RECORDER_STATUS,
            {"waiting": 2, "failing_since": time.time() - 60, "error": "database is locked"}
            | {"dropped": 1, "dropped_at": time.time() - 60},
            now,
        )
    zh = Localizer("zh-CN", local_zone())
    rows = {f.topic: advice_text(f, zh) for f in d.check_reports() if f.level is not Level.OK}
    assert sorted(rows) == ["critical", "lost-records", "unrecorded"], rows
    assert "危急值" in rows["critical"] and "拒绝" not in rows["critical"], rows
    for topic in ("lost-records", "unrecorded"):
        assert "危急值" not in rows[topic] and "网络" not in rows[topic] and "县信息科" in rows[topic], rows


def test_a_peer_refusing_the_gateway_is_not_said_to_be_the_network(tmp_path: Path) -> None:
    """The reading center refuses this gateway (unknown AE title: its settings) an hour after the
    ECG was queued: the row 发送队列 · 诊断中心拒收 read "nothing has been sent for a long time: check
    the network" - the queue's FAIL advice - sending the doctor to a network that works."""
    now = time.time()
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        outbox.add("dicom", "a", b"x" * 10, now=now - 3600)
        outbox.record_status("reading_center", {"fault": "A-ASSOCIATE-RJ: called AE not recognised"}, now - 60)
    [refused] = [f for f in doctor(tmp_path, now=lambda: now).check_queue() if f.level is Level.FAIL]
    shown = advice_text(refused, Localizer("zh-CN", local_zone()))
    assert "网络" not in shown and "很长时间" not in shown and "县信息科" in shown, shown
