"""The report room without Orthanc: polling policy, the store's replacement rules and retention,
the sent-study recorder, critical alerts (hook, doctor), the `lastmile report` commands, and the
embedded reading center as a PACS that only offers C-MOVE."""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lastmile.cli import main as cli
from lastmile.config import Config
from lastmile.console.stores import StoredReports
from lastmile.demo.cardiologist import STEMI, StudyToRead, ecg_report_sr, report_pdf
from lastmile.demo.reading_center import EmbeddedReadingCenter
from lastmile.doctor import Doctor, Level
from lastmile.reports.alerts import CriticalAlerter
from lastmile.reports.policy import DAY, HOUR, PollPolicy, StudyClock
from lastmile.reports.sent_readings import SentReading
from lastmile.reports.store import ReportStore, SentStudy
from tests.console_harness import printed_jobs, set_aside_outbox, stand_in_lp
from tests.ecg_factories import make_recording
from tests.peers import free_port
from tests.report_peers import (
    MOVE_AE,
    NOW,
    add,
    gateway_config,
    poller_for,
    send_ecgs,
    sent,
    to_read,
    utc,
    write_config,
)
from tests.waiting import wait_for

# -- policy ------------------------------------------------------------------------------------------


def clock(
    age_s: float, *, stat: bool = False, final: bool = False, polled_ago: float | None = None, uid: str = "s"
) -> StudyClock:
    return StudyClock(uid, NOW - age_s, stat, final, None if polled_ago is None else NOW - polled_ago)


@pytest.mark.parametrize(
    ("age", "stat", "final", "interval"),
    [
        (60, True, False, 25.0),  # STAT: every 25 s in its first hour
        (2 * HOUR, True, False, 300.0),  # then like any other
        (60, False, False, 300.0),
        (10 * HOUR, False, False, 900.0),
        (2 * DAY, False, False, HOUR),
        (10 * DAY, False, False, 4 * HOUR),
        (15 * DAY, False, False, None),  # outside the 14-day window
        (HOUR, False, True, 12 * HOUR),  # after a final report: only amendments
    ],
)
def test_interval_by_age(age, stat, final, interval) -> None:
    assert PollPolicy().interval(clock(age, stat=stat, final=final), NOW) == interval


def test_a_round_waits_for_one_due_study_then_takes_along_who_would_be_due_before_the_next() -> None:
    policy = PollPolicy()
    fresh = clock(100, uid="fresh")  # 100 s of a 300 s interval: not half-way
    almost = clock(1000, polled_ago=240, uid="almost")  # due in 60 s
    assert policy.round([fresh, almost], NOW) == []  # none due: no round at all
    due = clock(2000, polled_ago=310, uid="due")
    assert policy.round([fresh, almost, due], NOW) == ["due", "almost"]  # next round in 300 s: join now
    stat = clock(40, stat=True, uid="stat")  # due; the next STAT round comes in 25 s
    assert policy.round([fresh, almost, stat], NOW) == ["stat"]  # "almost" joins a later STAT round
    soon = clock(1000, polled_ago=285, uid="soon")  # due in 15 s: before the next STAT round
    assert policy.round([fresh, soon, stat], NOW) == ["stat", "soon"]
    assert policy.next_due_in([fresh, almost], NOW) == pytest.approx(60.0)
    assert policy.next_due_in([clock(20 * DAY)], NOW) is None


def test_no_study_is_asked_more_often_than_its_interval_allows() -> None:
    """Simulated day with 50 studies: every study's polls are spaced ≥ half its interval, and
    rounds are no more frequent than the most urgent study needs."""
    policy = PollPolicy()
    studies = {f"s{i}": [NOW - i * 1800.0, None, i % 10 == 0] for i in range(50)}
    asked: dict[str, list[float]] = {}
    t = NOW
    while t < NOW + DAY:
        clocks = [StudyClock(u, sent, stat_, False, last) for u, (sent, last, stat_) in studies.items()]
        for uid in policy.round(clocks, t):
            studies[uid][1] = t
            asked.setdefault(uid, []).append(t)
        t += policy.next_due_in([StudyClock(u, s, st_, False, la) for u, (s, la, st_) in studies.items()], t) or 1
    for uid, times in asked.items():
        sent, _last, stat_ = studies[uid]
        for a, b in itertools.pairwise(times):
            interval = policy.interval(StudyClock(uid, sent, stat_, False, a), a)
            assert b - a >= 0.5 * interval - 1e-6, (uid, a, b)


# -- store ---------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    with ReportStore.open(tmp_path / "data") as s:
        yield s


def test_a_study_is_recorded_once_and_stat_wins(store) -> None:
    study = sent(store)
    assert not store.record_sent(SentStudy(study.study_uid, utc(NOW + 5), stat=True))
    assert store.study(study.study_uid).stat and store.study(study.study_uid).patient_id == "P1"


def test_reports_for_studies_we_did_not_send_are_refused(store) -> None:
    with pytest.raises(KeyError):
        add(store, ecg_report_sr(StudyToRead(generate_uid()), findings=[], impression="x"))
    assert store.reports() == []


def test_final_replaces_preliminary_and_a_later_amendment_replaces_the_final(store) -> None:
    study = sent(store)
    pre = add(store, ecg_report_sr(study, findings=[], impression="pending", complete=False)).report
    assert pre.status == "preliminary" and store.study(study.study_uid).final_at is None
    fin_ds = ecg_report_sr(study, findings=[], impression="normal")
    fin = add(store, fin_ds)
    assert fin.report.status == "final" and fin.superseded == (pre.id,)
    assert store.study(study.study_uid).final_at is not None
    # a second final without predecessors is another report, not a replacement
    other = add(store, ecg_report_sr(study, findings=[], impression="rhythm strip"))
    assert other.superseded == ()
    amended = add(store, ecg_report_sr(study, findings=[], impression="AV block I", amends=fin_ds))
    assert amended.report.status == "amended" and amended.superseded == (fin.report.id,)
    assert [r.id for r in store.reports(study_uid=study.study_uid, current_only=True)] == [
        other.report.id,
        amended.report.id,
    ]
    assert not add(store, fin_ds).created  # the same object again: kept once


def test_the_conclusion_and_findings_are_kept_as_read(store) -> None:
    """What the console shows first (under its own heading): the cardiologist's impression and
    findings as the report gave them, not only the whole rendered text."""
    study = sent(store)
    added = add(store, ecg_report_sr(study, findings=["PR 210 ms"], impression="一度房室传导阻滞")).report
    kept = store.get(added.id)
    assert kept is not None
    assert (kept.impressions, kept.findings) == (("一度房室传导阻滞",), ("PR 210 ms",))


def test_a_report_naming_another_patient_is_flagged_not_final(store) -> None:
    study = sent(store, patient="P1")
    wrong = StudyToRead(study.study_uid, patient_id="P999")
    added = add(store, ecg_report_sr(wrong, findings=[], impression="normal"))
    assert added.report.status == "preliminary"
    assert "P999" in added.report.problems[-1] and "Check:" in added.report.text
    assert store.study(study.study_uid).final_at is None


def test_retention_deletes_old_studies_securely_but_keeps_unacknowledged_critical(store, tmp_path) -> None:
    old = sent(store, at=NOW - 40 * DAY)
    old_critical = sent(store, at=NOW - 40 * DAY)
    recent = sent(store)
    add(store, ecg_report_sr(old, findings=["MARKER-OLD-REPORT-TEXT"], impression="x"))
    crit = add(store, ecg_report_sr(old_critical, findings=[], impression="x", coded_findings=[STEMI])).report
    add(store, ecg_report_sr(recent, findings=[], impression="x"))
    assert store.purge_expired(utc(), retention_days=30, window_days=14) == 1
    assert store.study(old.study_uid) is None and store.study(recent.study_uid) is not None
    assert store.get(crit.id) is not None  # the doctor has not seen it yet
    files = [p for p in (tmp_path / "data").iterdir() if p.name.startswith("clinic.db")]
    assert not any(b"MARKER-OLD-REPORT-TEXT" in p.read_bytes() for p in files)  # secure_delete + WAL truncate
    store.acknowledge(crit.id, "dr-li", utc())
    assert store.purge_expired(utc(), retention_days=30, window_days=14) == 1
    assert store.get(crit.id) is None


def sent_bp(item_id: int, name: str, at: float) -> SentReading:
    return SentReading(
        item_id,
        f"bp-{item_id}",
        "P1",
        name,
        "blood-pressure",
        "131/84 mm[Hg]",
        "Acme BP-1",
        utc(at),
        "device-clock",
        utc(at),
        "https://county.example/fhir",
    )


def test_retention_deletes_the_sent_readings_of_as_long_ago_securely(store, tmp_path) -> None:
    """The sent-reading records (the Sent page's, past the outbox's purge) go as the sent studies
    do: after the retention, their patient zeroed in clinic.db and its WAL."""
    assert (
        store.record_sent_readings([sent_bp(1, "MARKER-OLD-READING", NOW - 40 * DAY), sent_bp(2, "Li^Lei", NOW)]) == 2
    )
    assert store.record_sent_readings([sent_bp(2, "Li^Lei", NOW)]) == 0  # a relay cut short and done again
    store.purge_expired(utc(), retention_days=30, window_days=14)
    assert [r.outbox_item_id for r in store.recent_sent_readings(10)] == [2]
    files = [p for p in (tmp_path / "data").iterdir() if p.name.startswith("clinic.db")]
    assert not any(b"MARKER-OLD-READING" in p.read_bytes() for p in files)


def test_with_reports_off_the_forward_service_prunes_old_sent_records(tmp_path) -> None:
    """A county with no report return (reports.source "off") runs no report poller: the sent
    studies and readings were pruned only by it, so clinic.db kept one row per ECG and per reading
    forever on the SD card. The forward service's own housekeeping prunes them on the retention."""
    from lastmile.services.forward import ForwardService

    config = gateway_config(tmp_path, free_port(), "PACS")
    config.reports.source = "off"
    config.reading_center.storage_commitment = False  # no ECG to send: nothing listens
    now = time.time()
    old = now - (max(config.reports.retention_days, config.reports.window_days) + 1) * DAY
    with ReportStore.open(config.data_dir) as store:
        sent(store, at=old)
        recent_study = sent(store, at=now)
        store.record_sent_readings([sent_bp(1, "MARKER-OLD-READING", old), sent_bp(2, "Li^Lei", now)])
    service = ForwardService(config)
    try:
        service.step(threading.Event())
    finally:
        service.close()
    with ReportStore.open(config.data_dir) as store:
        assert [s.study_uid for s in store.studies()] == [recent_study.study_uid]
        assert [r.outbox_item_id for r in store.recent_sent_readings(10)] == [2]


def test_a_prune_clinic_db_refuses_does_not_stop_the_forward_round(tmp_path, monkeypatch, caplog) -> None:
    """The sent records' prune runs in the forward service's step: a clinic.db that refuses it
    (full, locked past the busy timeout) faulted the whole step - the full-disk wait, or the
    runtime's restart - and no ECG went that round. It is housekeeping: logged, tried again later."""
    from lastmile.services.forward import ForwardService

    config = gateway_config(tmp_path, free_port(), "PACS")
    config.reports.source = "off"
    config.reading_center.storage_commitment = False

    def refused(*_args: object) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(ReportStore, "purge_expired", refused)
    caplog.set_level(logging.WARNING)
    service = ForwardService(config)
    try:
        service.step(threading.Event())
    finally:
        service.close()
    said = [r.getMessage() for r in caplog.records]
    assert not [line for line in said if "data partition full" in line], said  # not waiting for space
    assert any("old sent records not deleted now" in line for line in said), said


# -- critical alerts -----------------------------------------------------------------------------------


def hook_script(tmp_path: Path) -> tuple[list[str], Path]:
    out = tmp_path / "hook.log"
    script = tmp_path / "beep.sh"
    script.write_text(f'#!/bin/sh\necho "$LASTMILE_REPORT_ID|$LASTMILE_CRITICAL_REASON" >> {out}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script)], out


def test_critical_report_runs_the_hook_once_and_fails_doctor_until_acknowledged(store, tmp_path, capsys) -> None:
    command, log_file = hook_script(tmp_path)
    study = sent(store, patient="P7")
    crit = add(store, ecg_report_sr(study, findings=[], impression="STEMI", coded_findings=[STEMI])).report
    add(store, ecg_report_sr(sent(store), findings=[], impression="normal"))
    alerter = CriticalAlerter(store, command)
    assert [r.id for r in alerter.alert_pending()] == [crit.id]
    assert alerter.alert_pending() == []  # announced once
    wait_for(lambda: log_file.exists() and log_file.read_text().count("\n") == 1, interval=0.05)
    report_id, reason = log_file.read_text().strip().split("|")
    assert report_id == str(crit.id) and "401303003" in reason and "P7" not in reason  # no patient data

    config = Config()
    config.set_data_dir(tmp_path / "data")
    doctor = Doctor(config, now=lambda: NOW + 60)
    (finding, *rest) = doctor.check_reports()
    assert finding.level is Level.FAIL and f"report {crit.id}" in finding.message and "P7" in finding.message
    assert f"lastmile report ack {crit.id}" in finding.hint
    assert [f.level for f in rest] == [Level.OK]
    assert cli(["report", "ack", str(crit.id), "--by", "dr-li", "--data-dir", str(config.data_dir)]) == 0
    assert f"critical report {crit.id} acknowledged by dr-li" in capsys.readouterr().out
    assert [f.level for f in doctor.check_reports()] == [Level.OK]
    assert cli(["report", "ack", "999", "--data-dir", str(config.data_dir)]) == 1


def test_doctor_warns_when_reports_cannot_be_asked_for_an_hour(store, tmp_path) -> None:
    store.set_status("poller", {"error": "cannot connect", "failing_since": NOW - 2 * HOUR, "fault": None}, utc())
    config = Config()
    config.set_data_dir(tmp_path / "data")
    (finding,) = Doctor(config, now=lambda: NOW).check_reports()
    assert finding.level is Level.WARN and "cannot connect" in finding.message
    store.set_status("poller", {"fault": "C-FIND refused", "failing_since": NOW}, utc())
    (finding,) = Doctor(config, now=lambda: NOW).check_reports()
    assert finding.level is Level.FAIL and "refuses" in finding.message


# -- the commands ---------------------------------------------------------------------------------------


def test_list_show_and_json(store, tmp_path, capsys) -> None:
    waiting = sent(store, patient="P-WAIT", stat=True)
    done = sent(store, patient="P-DONE")
    report = add(
        store, ecg_report_sr(done, findings=["Sinus rhythm"], impression="正常心电图", reader="Chen^Jing")
    ).report
    data = ["--data-dir", str(tmp_path / "data")]
    assert cli(["report", "list", "--all", *data]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["REPORT", "PATIENT", "ECG", "TIME", "STATUS", "READ", "BY"]
    rows = {ln.split()[1]: ln for ln in out[1:]}
    assert rows["P-WAIT"].startswith("-") and "waiting" in rows["P-WAIT"] and "STAT" in rows["P-WAIT"]
    assert rows["P-DONE"].startswith(str(report.id)) and "received" in rows["P-DONE"] and "Chen Jing" in rows["P-DONE"]
    assert cli(["report", "list", "--json", "--all", *data]) == 0
    listed = {s["patient_id"]: s for s in json.loads(capsys.readouterr().out)}
    assert listed["P-WAIT"]["status"] == "waiting" and listed["P-WAIT"]["stat"] is True
    assert listed["P-DONE"]["reports"][0]["id"] == report.id and waiting.study_uid == listed["P-WAIT"]["study_uid"]
    # the name as people write it, like the table (not the PN's "^", which free text from FHIR never has)
    assert listed["P-DONE"]["reading_doctor"] == "Chen Jing" and listed["P-WAIT"]["reading_doctor"] is None
    assert cli(["report", "show", str(report.id), *data]) == 0
    shown = capsys.readouterr().out
    assert "Patient: P-DONE Wang Fang" in shown and "正常心电图" in shown
    assert "诊断医生：Chen Jing" in shown  # the report's own text in console.language (zh-CN by default)
    assert cli(["report", "show", "12345", *data]) == 1


def fake_lp(tmp_path: Path, monkeypatch, *, fail: bool = False) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    spool = tmp_path / "spool"
    lp = bin_dir / "lp"
    lp.write_text(
        f'#!/bin/sh\necho "$@" > {spool}.args\ncat > {spool}\n'
        + ("echo 'lp: no default destination' >&2; exit 1\n" if fail else "echo 'request id is lj-1'\n")
    )
    lp.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return spool


def test_print_sends_the_pdf_itself_to_cups(store, tmp_path, monkeypatch, capsys) -> None:
    spool = fake_lp(tmp_path, monkeypatch)
    pdf = report_pdf(sent(store), ["Normal ECG"])
    report = add(store, pdf).report
    assert cli(["report", "print", str(report.id), "-d", "clinic", "--data-dir", str(tmp_path / "data")]) == 0
    assert "request id is lj-1" in capsys.readouterr().out
    assert spool.read_bytes() == pdf.EncapsulatedDocument[: pdf.EncapsulatedDocumentLength]
    assert "-d clinic" in Path(f"{spool}.args").read_text()


def test_print_of_a_replaced_pdf_puts_the_replaced_note_first(store, tmp_path, monkeypatch, capsys) -> None:
    """`lastmile report print` of a PDF report a correction replaced: the PDF cannot say so, so a
    page saying it goes to the printer first (in console.language), and the operator is told."""
    spool = stand_in_lp(tmp_path, monkeypatch)
    study = sent(store)
    pdf = report_pdf(study, ["Normal ECG"])
    old = add(store, pdf).report
    current = add(store, ecg_report_sr(study, findings=[], impression="一度房室传导阻滞", amends=pdf)).report
    assert cli(["report", "print", str(old.id), "--data-dir", str(tmp_path / "data")]) == 0
    assert f"此报告已被第 {current.id} 号报告替代" in capsys.readouterr().out  # console.language
    jobs = printed_jobs(spool)
    assert len(jobs) == 2 and jobs[1].startswith(b"%PDF-"), [job[:40] for job in jobs]
    assert f"此报告已被第 {current.id} 号报告替代" in jobs[0].decode("utf-8"), jobs[0]


def test_print_writes_a_file_without_lp_or_when_lp_fails(store, tmp_path, monkeypatch, capsys) -> None:
    report = add(store, ecg_report_sr(sent(store), findings=["Sinus rhythm"], impression="Normal")).report
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no lp anywhere
    monkeypatch.chdir(tmp_path)
    assert cli(["report", "print", str(report.id), "--data-dir", str(tmp_path / "data")]) == 0
    written = tmp_path / f"lastmile-report-{report.id}.txt"
    # the report in console.language (zh-CN by default): its labels with the full-width colon
    assert "诊断意见：Normal" in written.read_text() and (written.stat().st_mode & 0o777) == 0o600
    assert "no printer" in capsys.readouterr().out
    fake_lp(tmp_path, monkeypatch, fail=True)
    target = tmp_path / "out.txt"
    assert cli(["report", "print", str(report.id), "-o", str(target), "--data-dir", str(tmp_path / "data")]) == 0
    assert target.read_text() == written.read_text()


# -- the recorder and a C-MOVE-only PACS (the embedded reading center) -----------------------------------


@pytest.fixture
def move_only_center(tmp_path):
    move_port = free_port()
    center = EmbeddedReadingCenter(
        port=free_port(),
        gateway_port=free_port(),
        ae_title="READING_CENTER",
        gateway_ae="CLINIC01",
        offer_get=False,
        move_destinations={MOVE_AE: ("127.0.0.1", move_port)},
    )
    center.start()
    config = gateway_config(tmp_path, center.port, center.ae_title, listen_port=center.gateway_port)
    config.reports.move_ae, config.reports.move_port = MOVE_AE, move_port
    yield center, config
    center.stop()


def test_recorder_keeps_what_the_doctor_needs_after_the_outbox_purged_it(move_only_center) -> None:
    _center, config = move_only_center
    (study,) = send_ecgs(config, [make_recording(5, stat=True)])
    assert (study.patient_id, study.patient_name, study.stat) == ("P00005", "Test^Patient5", True)
    assert study.ecg_time == "2026-11-02T09:35:00+00:00"  # the ECG's own time, read from the object
    assert study.sop_instance_uid and study.outbox_item_id == 1
    from lastmile.data_dir import open_outbox

    with open_outbox(config) as outbox:
        assert outbox.purge_due(time.time() + 1, 0.0) == 1
        item = outbox.get(1)
        assert item.patient is None and not item.meta  # purged: the record is all that is left
        assert study.committed_at == dt.datetime.fromtimestamp(item.committed_at, dt.timezone.utc)


def test_a_new_outbox_s_commitment_is_not_copied_to_an_earlier_outbox_s_study(move_only_center) -> None:
    """An ECG sent but not yet confirmed when its outbox was lost (set aside, made anew: item ids
    from 1 again): the recorder copied the new outbox's item 1's commitment time to it - the
    county "confirmed" an ECG it may never have kept."""
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from lastmile.reports.sent import SentStudyRecorder

    _center, config = move_only_center
    with open_outbox(config) as outbox, ReportStore.open(config.data_dir) as store:
        item = enqueue_recording(outbox, make_recording(9), config, key="lost").item
        at = time.time()
        outbox.release_hold(item.id, at)  # a synthetic trace may be held to re-record
        (claimed,) = outbox.claim("dicom", 1, at)
        outbox.mark_sent([claimed.id], at)
        assert SentStudyRecorder(outbox, store).record_item(item.id, utc(at)) == 1
    set_aside_outbox(config)
    lost, study = send_ecgs(config, [make_recording(10)])
    assert study.outbox_item_id == lost.outbox_item_id == 1 and study.committed_at is not None
    assert lost.committed_at is None, lost


def test_a_study_recorded_before_item_keys_were_kept_takes_its_own_item_s_key_at_start(move_only_center) -> None:
    """A sent study recorded before clinic.db kept its item's key (0029) matches no item; the
    recorder's start gives it the key of its item while the outbox still holds that item (the
    same study UID): purged later, it still shows its patient."""
    from lastmile.data_dir import open_outbox
    from lastmile.reports.sent import SentStudyRecorder

    _center, config = move_only_center
    # the outbox still holds it (the default purges a committed ECG at once: within the forwarder's
    # step that took the commitment, or after the sending loop saw it committed - either, by load)
    config.outbox.retention_days = 1.0
    (study,) = send_ecgs(config, [make_recording(11)])
    with open_outbox(config) as outbox, ReportStore.open(config.data_dir) as store:
        store.db.conn.execute("UPDATE sent_studies SET item_key = NULL")  # as written before 0029
        item = outbox.get(1)
        assert item is not None and item.meta.get("study_uid") == study.study_uid, item
        assert store.studies_of_items([item]) == {}
        SentStudyRecorder(outbox, store).backfill()
        assert store.studies_of_items([item])[1].study_uid == study.study_uid


def test_a_study_recorded_before_item_keys_were_kept_is_not_given_a_new_outbox_s_item_of_its_id(
    move_only_center,
) -> None:
    """Giving old records their item keys (the forward service's start): an earlier outbox's
    record of item 1 is not given the key of a new outbox's item 1 (another study), the new
    one's record is; a second start has nothing left to give."""
    from lastmile.data_dir import open_outbox
    from lastmile.reports.sent import SentStudyRecorder

    _center, config = move_only_center
    (lost,) = send_ecgs(config, [make_recording(12)])
    set_aside_outbox(config)
    new = next(s for s in send_ecgs(config, [make_recording(13)]) if s.study_uid != lost.study_uid)
    assert lost.outbox_item_id == new.outbox_item_id == 1
    with open_outbox(config) as outbox, ReportStore.open(config.data_dir) as store:
        store.db.conn.execute("UPDATE sent_studies SET item_key = NULL")  # as written before 0029
        recorder = SentStudyRecorder(outbox, store)
        assert recorder.give_keys_to_old_records() == 1
        assert recorder.give_keys_to_old_records() == 0
        assert store.study(lost.study_uid).item_key is None
        assert store.studies_of_items([outbox.get(1)])[1].study_uid == new.study_uid


def test_c_move_when_the_pacs_offers_no_c_get(move_only_center) -> None:
    center, config = move_only_center
    (study,) = send_ecgs(config, [make_recording(6)])
    center.add_report(ecg_report_sr(to_read(study), findings=["Sinus rhythm"], impression="Normal"))
    center.add_report(ecg_report_sr(StudyToRead(generate_uid()), findings=[], impression="not ours"))
    with ReportStore.open(config.data_dir) as store:
        result = poller_for(config, store).run_round(force=True)
        assert result.error is None and result.fault is None
        assert (result.found, result.stored, result.retrieved_by) == (1, 1, "C-MOVE")
        assert [r.study_uid for r in store.reports()] == [study.study_uid]


def test_reports_moved_to_us_count_against_the_report_polling_budget(move_only_center) -> None:
    """With C-MOVE the report objects come on an association of the PACS's to ours: only the move's
    own requests were counted, and a county PDF report (the bulk of a round's bytes) was free on
    the metered link."""
    from lastmile.data_dir import open_outbox
    from lastmile.reports.service import make_poller
    from lastmile.services.forward import peer_settings
    from uploader.metering import Meter, MeterPolicy

    center, config = move_only_center
    (study,) = send_ecgs(config, [make_recording(8)])
    # a scanned-like report: bytes that do not deflate away in transit
    pdf = report_pdf(to_read(study), [base64.b64encode(os.urandom(60)).decode() for _ in range(300)])
    center.add_report(pdf)
    with open_outbox(config) as outbox, ReportStore.open(config.data_dir) as store:
        meter = Meter.charging("reports", MeterPolicy(daily_budget_bytes=2**30, zone=dt.timezone.utc), outbox)
        poller = make_poller(config, store, peer_settings(config.reading_center), meter)
        try:
            result = poller.run_round(force=True)
        finally:
            poller.close()
        assert (result.stored, result.retrieved_by) == (1, "C-MOVE")
        assert meter.spent_today(time.time()) == result.bytes >= 0.7 * len(pdf.EncapsulatedDocument)


def test_report_poll_command_prints_the_round(move_only_center, tmp_path, capsys) -> None:
    center, config = move_only_center
    (study,) = send_ecgs(config, [make_recording(7)])
    center.add_report(ecg_report_sr(to_read(study), findings=[], impression="危急值: VF", coded_findings=[STEMI]))
    cfg = write_config(config, tmp_path / "lastmile.toml")
    assert cli(["-c", str(cfg), "report", "poll"]) == 0
    assert "1 new (1 critical)" in capsys.readouterr().out
    config.reading_center.port = free_port()  # nobody there
    cfg = write_config(config, tmp_path / "lastmile.toml")
    assert cli(["-c", str(cfg), "report", "poll"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_forward_service_with_reports_off_still_records_sent_studies(tmp_path) -> None:
    """Turning reports on later finds the studies sent meanwhile."""
    center = EmbeddedReadingCenter(port=free_port(), gateway_port=free_port(), gateway_ae="CLINIC01")
    center.start()
    try:
        config = gateway_config(tmp_path, center.port, center.ae_title, listen_port=center.gateway_port)
        config.reports.source = "off"
        from lastmile.data_dir import open_outbox
        from lastmile.ecg.intake import enqueue_recording
        from lastmile.services.forward import ForwardService

        with open_outbox(config) as outbox:
            enqueue_recording(outbox, make_recording(8), config, key="k8")
        service = ForwardService(config)
        try:
            assert service.reports.thread is None
            stop = threading.Event()
            deadline = time.monotonic() + 30
            while not service.reports.store.studies():
                assert time.monotonic() < deadline
                time.sleep(min(service.step(stop), 0.1))
            assert "reports: off" in service.status_line()
        finally:
            service.close()
    finally:
        center.stop()


def test_a_critical_preliminary_replaced_by_its_final_is_announced_once_and_cleared_by_reading_the_final(
    store, tmp_path
) -> None:
    """The county reads a STEMI: a preliminary report, then within the same round its final one,
    both critical. The clinic's buzzer (the hook) must sound once, for the report the doctor will
    open - not twice; and once she has seen the final one on the console (the only one it shows),
    nothing stays unacknowledged: no FAIL in `lastmile doctor`, no "critical report not opened"
    for the county, no study kept past retention for a report nobody can see."""
    command, log_file = hook_script(tmp_path)
    study = sent(store, patient="P7")
    draft = add(store, ecg_report_sr(study, findings=[], impression="STEMI", coded_findings=[STEMI], complete=False))
    final = add(store, ecg_report_sr(study, findings=[], impression="STEMI", coded_findings=[STEMI]))
    assert final.superseded == (draft.report.id,) and draft.report.critical and final.report.critical
    alerter = CriticalAlerter(store, command)
    assert [r.id for r in alerter.alert_pending()] == [final.report.id]
    wait_for(lambda: log_file.exists() and log_file.read_text().count("\n") >= 1)
    StoredReports(store).acknowledge(str(final.report.id), "王医生", utc(NOW + 60))
    assert store.unacknowledged_critical() == []
    config = Config()
    config.set_data_dir(tmp_path / "data")
    assert [f.level for f in Doctor(config, now=lambda: NOW + 120).check_reports()] == [Level.OK]
    assert alerter.alert_pending() == [] and alerter.hooks_started == 1


def at_clinic(hour: int) -> dt.datetime:
    return dt.datetime(2026, 11, 2, hour, tzinfo=dt.timezone(dt.timedelta(hours=8)))


def test_a_critical_sr_draft_written_after_the_final_is_current_and_alerted(store) -> None:
    """The reading center's normal final SR (10:00), then a second reader's preliminary SR reading
    a STEMI (12:00): it was filed behind the final, shown nowhere and never announced, while
    `doctor` failed on it."""
    study = sent(store, patient="P7")
    final = add(store, ecg_report_sr(study, findings=["Sinus rhythm"], impression="Normal ECG", when=at_clinic(10)))
    draft = add(
        store,
        ecg_report_sr(
            study, findings=[], impression="STEMI", coded_findings=[STEMI], complete=False, when=at_clinic(12)
        ),
    ).report
    assert draft.critical and store.get(draft.id).superseded_by is None
    assert {r.id for r in store.reports(current_only=True)} == {final.report.id, draft.id}
    assert [r.id for r in store.not_alerted()] == [draft.id]


def test_an_earlier_sr_draft_arriving_after_the_final_stays_history(store) -> None:
    study = sent(store)
    final = add(store, ecg_report_sr(study, findings=["Sinus rhythm"], impression="Normal ECG", when=at_clinic(11)))
    draft = add(
        store, ecg_report_sr(study, findings=["Sinus rhythm"], impression="Normal?", complete=False, when=at_clinic(10))
    ).report
    assert store.get(draft.id).superseded_by == final.report.id
    assert [r.id for r in store.reports(current_only=True)] == [final.report.id]


def county_sr(study: StudyToRead, hour: int, offset: str, **kw) -> Dataset:
    """An SR as a county PACS writes it: wall-clock times (no offset of their own), the zone (if
    any) in TimezoneOffsetFromUTC for every time in the object."""
    ds = ecg_report_sr(study, when=dt.datetime(2026, 11, 2, hour), **kw)
    if offset:
        ds.TimezoneOffsetFromUTC = offset
    return ds


def final_and_draft(store: ReportStore, final_offset: str, draft_hour: int = 12):
    """A final verified at 10:00 (`final_offset`: its PACS's zone, "" for one stored without),
    then a second reader's unverified draft with the PACS's "+0800"."""
    study = sent(store, patient="P7")
    final = add(store, county_sr(study, 10, final_offset, findings=["Sinus rhythm"], impression="Normal ECG"))
    draft = county_sr(study, draft_hour, "+0800", findings=["LBBB"], impression="LBBB?", complete=False, verified=False)
    return final.report, add(store, draft).report


def test_a_second_readers_draft_after_a_final_with_the_pacs_zone_is_current(store) -> None:
    """Final verified 10:00, a second reader's unverified draft 12:00, both "+0800" in
    TimezoneOffsetFromUTC only: the final's VerificationDateTime was read without the zone, the
    draft's ContentTime with it, no order between them: the draft was filed behind the final."""
    final, draft = final_and_draft(store, "+0800")
    assert store.get(draft.id).superseded_by is None, "second reading's draft filed behind the final"
    assert final.report_time == "2026-11-02T10:00:00+08:00"
    assert {r.id for r in store.reports(current_only=True)} == {final.id, draft.id}


@pytest.mark.parametrize(("draft_hour", "history"), [(12, False), (9, True)])
def test_a_draft_after_a_final_stored_without_its_zone_is_current(store, monkeypatch, draft_hour, history) -> None:
    """After an upgrade: the final stored with its wall-clock time only (the county's local time,
    the clinic's zone), the new draft with the PACS's offset: still the new reading (one written
    before the final is still history)."""
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    final, draft = final_and_draft(store, "", draft_hour)
    assert (final.report_time, draft.report_time[-6:]) == ("2026-11-02T10:00:00", "+08:00")
    assert (store.get(draft.id).superseded_by == final.id) is history, "the new reading filed behind an upgraded final"


def test_a_critical_draft_its_final_corrected_leaves_nothing_to_read_now(store, tmp_path) -> None:
    """A preliminary read a STEMI; the final, over it, does not. The console shows only the final
    (no critical badge, nothing to acknowledge): `doctor` must not fail "open the critical report
    now", nor the county's metric count it, for a draft nobody can open any more."""
    from lastmile.services.metrics_sources import read_reports

    study = sent(store, patient="P7")
    add(store, ecg_report_sr(study, findings=[], impression="STEMI?", coded_findings=[STEMI], complete=False))
    final = add(store, ecg_report_sr(study, findings=["Sinus rhythm"], impression="Normal ECG")).report
    assert [r.id for r in store.reports(current_only=True)] == [final.id] and not final.critical
    assert store.unacknowledged_critical() == []
    snapshot = read_reports(tmp_path / "data", NOW)
    assert snapshot is not None and snapshot.critical_unacknowledged == 0
