"""The console's sources over the real stores of a real data directory: returned reports (the
report store the `lastmile report` commands use), held ECGs (the outbox holds the `lastmile
patient assign` / `ecg release|discard` commands use), the check-in's STAT and reason on the
session, the patient ID checked against `[patient] id_kind` - and each time, what the CLI then sees."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from devices.identity import Patient
from lastmile.cli import main as cli
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config
from lastmile.console import views
from lastmile.console.sources import ClinicData, ConsoleInputError, checked_patient
from lastmile.console.stores import OutboxHeldEcgs, StoredReports
from lastmile.data_dir import open_outbox
from lastmile.demo.cardiologist import STEMI, StudyToRead, ecg_report_sr, part10, report_pdf
from lastmile.ecg.intake import QUALITY_HOLD, enqueue_recording, with_patient_check
from lastmile.reports.sent import sent_study_of
from lastmile.reports.sent_readings import SentReading
from lastmile.reports.store import ReportStore, SentStudy
from lastmile.reports.views import render_report
from tests.console_harness import store_unassigned_ecg_report
from tests.ecg_factories import make_recording
from tests.statement_trace import traced
from uploader.outbox import ItemState, Kind
from uploader.report_reading import CriticalRules, read_dicom_report

VALID_ID = "11010519491231002X"  # GB 11643's own example
WRONG_CHECK = "110105194912310021"
RULES = CriticalRules.parse(["SCT:401303003"], ["危急值"])


def make_config(tmp_path: Path, id_kind: str = "") -> Config:
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.outbox.min_free_mb = 1
    config.patient.id_kind = id_kind
    config.patient.unassigned_ecg_hold_s = 3600
    config.ecg.re_record_hold_s = 3600
    return config


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def sent_study(store: ReportStore, patient_id: str, name: str, *, verdict: str = "acceptable", stat: bool = False):
    uid = generate_uid()
    store.record_sent(
        SentStudy(
            uid,
            now() - dt.timedelta(hours=2),
            stat=stat,
            patient_id=patient_id,
            patient_name=name,
            ecg_time="2026-11-02T09:30:00+08:00",
            quality_verdict=verdict,
        )
    )
    return StudyToRead(uid, patient_id=patient_id, patient_name=name)


def add_report(store: ReportStore, ds, at: dt.datetime | None = None) -> int:
    data = part10(ds)
    return store.add_report(read_dicom_report(data, RULES), data, "dicom", at or now()).report.id


def cli_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> object:
    assert cli(args) == 0
    return json.loads(capsys.readouterr().out)


# -- reports -----------------------------------------------------------------------------------------


def test_reports_come_from_the_store_and_acknowledging_is_the_cli_s_ack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(tmp_path)
    data_args = ["--data-dir", str(config.data_dir)]
    with ReportStore.open(config.data_dir) as store:
        normal = sent_study(store, "DEMO-0002", "Li^Wei=李^伟", verdict="warn")
        urgent = sent_study(store, VALID_ID, "Zhang^San=张^三", stat=True)
        normal_id = add_report(
            store,
            ecg_report_sr(normal, findings=["Sinus rhythm"], impression="正常心电图"),
            now() - dt.timedelta(hours=1),
        )
        critical_id = add_report(
            store,
            ecg_report_sr(
                urgent, findings=["ST elevation II III aVF"], impression="急性下壁心肌梗死", coded_findings=[STEMI]
            ),
            now() - dt.timedelta(hours=3),  # older: critical still comes first
        )
    data = ClinicData(config)  # the real sources, by default
    try:
        assert isinstance(data.reports, StoredReports)
        listed = views.reports(data, now())["reports"]
        assert [r.report_id for r in listed] == [str(critical_id), str(normal_id)]
        critical, routine = listed
        assert critical.critical and critical.stat and critical.patient_name == "Zhang^San=张^三"
        assert critical.ecg_time == dt.datetime.fromisoformat("2026-11-02T09:30:00+08:00")
        assert routine.quality_verdict == "warn" and routine.unread and not routine.critical
        assert "正常心电图" in routine.text
        assert [a.report_id for a in views.critical_alerts(data)] == [str(critical_id)]

        # the CLI acknowledges the critical one: the console's alert is gone
        assert cli(["report", "ack", str(critical_id), "--by", "Dr Chen", *data_args]) == 0
        capsys.readouterr()
        assert views.critical_alerts(data) == []
        assert data.reports.report(str(critical_id)).acknowledged_by == "Dr Chen"  # type: ignore[union-attr]

        # opening the routine report in the console reads it: the CLI sees it acknowledged
        opened = views.report(data, now(), str(normal_id), "王医生")["report"]
        assert opened is not None and not opened.unread and opened.acknowledged_by == "王医生"
    finally:
        data.close()
    listed_cli = cli_json(["report", "list", "--json", "--all", *data_args], capsys)
    by_patient = {s["patient_id"]: s for s in listed_cli}  # type: ignore[union-attr]
    assert by_patient["DEMO-0002"]["reports"][0]["acknowledged_by"] == "王医生"
    assert by_patient["DEMO-0002"]["ecg_quality"] == "warn"
    assert by_patient[VALID_ID]["status"] == "critical (seen)"


def routine_reports_since(store: ReportStore, routine_id: int, count: int) -> None:
    """`count` more routine reports, newer than any before: copies of `routine_id`'s row (each a
    read of a real object would take minutes on two cores)."""
    columns = [c.name for c in store.db["reports"].columns if c.name not in ("id", "object_uid", "received_at")]
    listed = ", ".join(columns)
    with store.db.conn:
        for n in range(count):
            store.db.conn.execute(
                f"INSERT INTO reports ({listed}, object_uid, received_at) "
                f"SELECT {listed}, object_uid || '-copy-{n}', ? FROM reports WHERE id = ?",
                ((now() + dt.timedelta(seconds=n)).isoformat(), routine_id),
            )


def test_the_critical_banner_costs_the_same_with_2_or_262_reports_and_names_one_under_200_newer(
    tmp_path: Path,
) -> None:
    """The banner is drawn on every page and every live push of every open Today page: it read
    every report (each with its object) and every sent study each time, 0.36 s at 2,000 reports
    on x86, and only the newest 200 of them: a critical result with 200 routine ones after it
    (months at a busy clinic, not acknowledged) was no longer said."""
    config = make_config(tmp_path)
    with ReportStore.open(config.data_dir) as store:
        urgent = sent_study(store, VALID_ID, "Zhang^San=张^三", stat=True)
        critical_id = add_report(
            store, ecg_report_sr(urgent, findings=[], impression="急性下壁心肌梗死", coded_findings=[STEMI])
        )
        normal = sent_study(store, "DEMO-0002", "Li^Wei=李^伟")
        routine_id = add_report(store, ecg_report_sr(normal, findings=[], impression="正常心电图"))
    data = ClinicData(config)
    steps = [0]

    def step() -> int:
        steps[0] += 1
        return 0  # go on

    def banner_cost() -> tuple[list[str], int]:
        steps[0] = 0
        data.db.conn.set_progress_handler(step, 100)  # SQLite's own work, in 100s of VM steps
        try:
            return [a.report_id for a in views.critical_alerts(data)], steps[0]
        finally:
            data.db.conn.set_progress_handler(None, 0)

    try:
        few = banner_cost()
        routine_reports_since(data.report_store, routine_id, 260)
        many = banner_cost()
    finally:
        data.close()
    assert few[0] == [str(critical_id)]
    assert many[0] == [str(critical_id)], "a critical result with 260 routine reports after it is not said"
    assert many[1] <= few[1] + 1, f"the banner took {many[1]} x100 VM steps with 262 reports, {few[1]} with 2"


def test_a_critical_report_is_not_read_by_opening_it_but_by_saying_so(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with ReportStore.open(config.data_dir) as store:
        study = sent_study(store, VALID_ID, "Zhang^San")
        report_id = str(add_report(store, ecg_report_sr(study, findings=[], impression="x", coded_findings=[STEMI])))
    data = ClinicData(config)
    try:
        assert views.report(data, now(), report_id, "王医生")["report"].unread
        views.acknowledge(data, "王医生", report_id, now())
        assert views.critical_alerts(data) == []
        assert data.audit.latest("acknowledge-report", report_id) is not None  # who, in the audit trail
        assert views.acknowledge(data, "王医生", "999", now()) is None  # an unknown report: nothing
    finally:
        data.close()
    with ReportStore.open(config.data_dir) as store:
        assert store.unacknowledged_critical() == []
        assert store.get(int(report_id)).acknowledged_by == "王医生"  # type: ignore[union-attr]


def test_the_pdf_of_a_report_comes_out_of_the_stored_object(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with ReportStore.open(config.data_dir) as store:
        study = sent_study(store, VALID_ID, "Zhang^San")
        pdf_id = str(add_report(store, report_pdf(study, ["Sinus rhythm", "Normal ECG"])))
        sr_id = str(add_report(store, ecg_report_sr(study, findings=[], impression="normal")))
        stored = store.data_of(int(pdf_id))
        source = StoredReports(store)
        assert source.report(pdf_id).has_pdf and not source.report(sr_id).has_pdf  # type: ignore[union-attr]
        document = source.pdf(pdf_id)
        assert document is not None and document.startswith(b"%PDF-") and document in (stored or b"")
        assert source.pdf(sr_id) is None and source.pdf("nope") is None


def test_the_sent_study_keeps_the_quality_verdict_of_the_ecg(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.ecg.re_record_hold_s = 0
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, make_recording(1, patient=Patient(VALID_ID)), config, key="q").item
    verdict = item.meta["quality"]["verdict"]
    study = sent_study_of(item, {}, now())
    assert study is not None and study.quality_verdict == verdict
    with ReportStore.open(config.data_dir) as store:
        store.record_sent(study)
        assert store.study(study.study_uid).quality_verdict == verdict  # type: ignore[union-attr]
        report_id = add_report(
            store, ecg_report_sr(StudyToRead(study.study_uid, patient_id=VALID_ID), findings=[], impression="ok")
        )
        shown = render_report(store, store.get(report_id))  # type: ignore[arg-type]
    assert f"ECG quality at the clinic: {verdict}" in shown


def test_show_and_print_give_the_countys_patient_of_an_unassigned_ecg_as_the_countys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lastmile report show` and `lastmile report print` say what the console says of a report on
    an ECG sent without a patient: unassigned at the gateway, the county's patient as the county
    wrote it (flagged), and which ECG it was (its device)."""
    config = make_config(tmp_path)
    report_id, device = store_unassigned_ecg_report(config)
    data_args = ["--data-dir", str(config.data_dir)]
    assert cli(["report", "show", str(report_id), *data_args]) == 0
    shown = capsys.readouterr().out
    assert "Patient: (unassigned)" in shown, shown
    assert f"The county's report names {VALID_ID} 张三 (Zhang San): that is what the county wrote" in shown, shown
    assert f"Device: {device}" in shown, shown
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no lp: the printout goes to a file
    out = tmp_path / "printed.txt"
    assert cli(["report", "print", str(report_id), "-o", str(out), *data_args]) == 0
    printed = out.read_text(encoding="utf-8")
    assert printed.splitlines()[0] == "心电图报告：患者未确定", printed
    flagged = [line for line in printed.splitlines() if line.startswith("县里的报告写的是 张三 ")]
    assert len(flagged) == 1 and VALID_ID in flagged[0] and device in printed, printed


def test_list_gives_the_countys_patient_of_an_unassigned_ecg_as_the_countys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lastmile report list` said "(unassigned)" of a report on an ECG sent without a patient and
    nothing of the patient the county's report names, which `show` and the pages give (flagged as
    the county's): the list says it too, in the same words."""
    config = make_config(tmp_path)
    report_id, _device = store_unassigned_ecg_report(config)
    assert cli(["report", "list", "--all", "--data-dir", str(config.data_dir)]) == 0
    listed = capsys.readouterr().out.splitlines()
    row = next(line for line in listed if line.startswith(str(report_id)))
    assert "(unassigned)" in row and "CRITICAL" in row, listed
    flagged = [line for line in listed if "The county's report names" in line]
    assert len(flagged) == 1 and f"names {VALID_ID} 张三 (Zhang San): that is what the county wrote" in flagged[0], (
        listed
    )
    assert any("sent without a patient" in line for line in listed), listed


def test_names_are_written_as_people_write_them_in_list_and_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Chinese name is family + given with no space (张三); a Latin-script one keeps its space.
    The CLI printed this clinic's patient as its PN with "^" spaced ("Zhang San=张 三")."""
    config = make_config(tmp_path)
    with ReportStore.open(config.data_dir) as store:
        chinese = sent_study(store, VALID_ID, "Zhang^San=张^三")
        latin = sent_study(store, "P-CLARK", "Clark^Ann")
        report_id = add_report(store, ecg_report_sr(chinese, findings=[], impression="正常心电图"))
        add_report(store, ecg_report_sr(latin, findings=[], impression="normal"))
    data_args = ["--data-dir", str(config.data_dir)]
    assert cli(["report", "list", "--all", *data_args]) == 0
    listed = capsys.readouterr().out
    assert f"{VALID_ID} 张三 (Zhang San)" in listed and "P-CLARK Clark Ann" in listed, listed
    assert cli(["report", "show", str(report_id), *data_args]) == 0
    shown = capsys.readouterr().out
    assert f"Patient: {VALID_ID} 张三 (Zhang San)" in shown, shown


def test_the_reading_doctors_name_is_written_as_people_write_it_in_list_show_and_print(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reading doctor (the SR's Verifying Observer and its Person Observer Name item) came out
    of `lastmile report list/show/print` as the reader keeps a PN, its parts spaced: 陈 静."""
    config = make_config(tmp_path)
    with ReportStore.open(config.data_dir) as store:
        chinese = sent_study(store, VALID_ID, "Zhang^San=张^三")
        latin = sent_study(store, "P-CLARK", "Clark^Ann")
        report_id = add_report(
            store, ecg_report_sr(chinese, findings=[], impression="正常心电图", reader="Chen^Jing=陈^静")
        )
        add_report(store, ecg_report_sr(latin, findings=[], impression="normal", reader="Clark^Ann"))
    data_args = ["--data-dir", str(config.data_dir)]
    assert cli(["report", "list", "--all", *data_args]) == 0
    listed = capsys.readouterr().out
    assert "陈静 (Chen Jing)" in listed and "Clark Ann" in listed and "陈 静" not in listed, listed
    assert cli(["report", "show", str(report_id), *data_args]) == 0
    shown = capsys.readouterr().out
    assert "诊断医生：陈静 (Chen Jing)" in shown and "陈 静" not in shown, shown
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no lp: the printout goes to a file
    out = tmp_path / "printed.txt"
    assert cli(["report", "print", str(report_id), "-o", str(out), *data_args]) == 0
    printed = out.read_text(encoding="utf-8")
    assert "诊断医生：陈静 (Chen Jing)" in printed and "陈 静" not in printed, printed


# -- held ECGs -----------------------------------------------------------------------------------------


def test_held_ecgs_are_the_outbox_holds_and_the_decisions_are_the_cli_s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(tmp_path, "cn-resident-id")
    config.patient.id_issuer = "county register"
    data_args = ["--data-dir", str(config.data_dir)]
    t = time.time()
    with open_outbox(config) as outbox:
        unassigned = enqueue_recording(outbox, make_recording(1, patient=None), config, key="u", now=t).item
        to_release = enqueue_recording(
            outbox, make_recording(2, patient=Patient(VALID_ID)), config, key="r", now=t
        ).item
        to_discard = enqueue_recording(
            outbox, make_recording(3, patient=Patient(VALID_ID)), config, key="d", now=t
        ).item
    assert {unassigned.hold_reason, to_release.hold_reason} == {"unassigned", "re-record"}
    data = ClinicData(config)
    try:
        assert isinstance(data.held_ecg_source, OutboxHeldEcgs)
        held = {h.item_id: h for h in data.held_ecgs(now())}
        assert set(held) == {unassigned.id, to_release.id, to_discard.id}
        assert held[unassigned.id].reason == "unassigned" and held[to_release.id].quality_verdict == "re-record"
        with pytest.raises(ConsoleInputError):
            data.assign_ecg("王医生", unassigned.id, WRONG_CHECK, now=now())  # checked as the CLI checks
        # the name comes from the session when the ID is the checked-in patient's (never from the form)
        data.check_in("王医生", VALID_ID, "张三", "", False, "", now=now())
        assert data.assign_ecg("王医生", unassigned.id, VALID_ID.lower(), now=now())
        assert data.send_anyway("王医生", to_release.id, now=now())
        assert data.re_record("王医生", to_discard.id, now=now()) == "re-record"
        assert not data.send_anyway("王医生", to_discard.id, now=now())  # decided already: nothing happens
        # the assigned ECG keeps only its quality hold (a 2 s synthetic ECG: "re-record"), for the doctor
        assert [(h.item_id, h.reason) for h in data.held_ecgs(now())] == [(unassigned.id, "re-record")]
    finally:
        data.close()
    with open_outbox(config) as outbox:
        assigned = outbox.get(unassigned.id)
        released = outbox.get(to_release.id)
        discarded = outbox.get(to_discard.id)
    assert assigned is not None and released is not None and discarded is not None
    # the object was rebuilt for the patient, with what the resident ID says (the CLI's clinic_patient)
    assert assigned.patient is not None and assigned.patient["patient_id"] == VALID_ID
    assert assigned.patient["name"] == "Zhang^San=张^三" and assigned.patient["sex"] == "F"
    assert assigned.patient["issuer"] == "county register"
    assert "patient-assigned-by-doctor" in assigned.meta["flags"] and not assigned.meta["unassigned"]
    assert released.hold_until is None and released.state == ItemState.QUEUED
    assert discarded.state == ItemState.QUARANTINED and "王医生" in (discarded.quarantine_reason or "")
    shown = cli_json(["patient", "show", "--json", *data_args], capsys)
    still_held = {e["id"] for e in shown["held_ecgs"]}  # type: ignore[index]
    assert still_held == {f"E{unassigned.id}"}  # as the console said


def test_an_ecg_already_on_its_way_cannot_be_assigned(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    t = time.time()
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, make_recording(1, patient=None), config, key="u", now=t).item
        source = OutboxHeldEcgs(outbox, config)
        assert outbox.release_hold(item.id, t)
        assert [c.id for c in outbox.claim(Kind.DICOM, 10, t)] == [item.id]  # the forwarder took it
        assert outbox.begin_send(item.id, t)
        assert not source.assign(item.id, Patient("MRN-1"), now=now())
        assert not source.assign(4242, Patient("MRN-1"), now=now())  # no such ECG
        assert not source.send_anyway(item.id, now=now()) and not source.discard(item.id, now=now())
        after = outbox.get(item.id)
    assert after is not None and after.patient is None and after.meta["unassigned"]


def test_assigning_a_held_ecg_reads_no_other_held_ecg(tmp_path: Path) -> None:
    """One held ECG assigned among 50 others held: the console read every held ECG to find the
    name the one's file gives, then the one again (does it still wait for its quality?). The
    worker that assigns it has the item and answers both: the console reads no item itself."""
    config = make_config(tmp_path)
    t = time.time()
    unassigned = make_recording(1, patient=None)
    on_file = with_patient_check(make_recording(2, patient=Patient(VALID_ID, "Zhang^San=张^三")), frozenset({"P-77"}))
    with open_outbox(config) as outbox:
        for n in range(50):
            enqueue_recording(outbox, unassigned, config, key=f"other-{n}", now=t)
        one = enqueue_recording(outbox, on_file, config, key="one", now=t).item
    assert one.hold_reason == "patient-mismatch"
    data = ClinicData(config)
    try:
        assert len(data.held_ecgs(now())) == 51
        with traced(data.outbox.db.conn) as statements:
            assigned = data.assign_ecg("王医生", one.id, VALID_ID, now=now())  # typed alone: no name
        read = [sql for sql in statements if "items" in sql]
        assert read == [], read
        # the page still says whose it now is (the name its file gives that ID) and that it waits
        assert assigned is not None and assigned.waits_for_quality
        assert (assigned.patient.patient_id, assigned.patient.name) == (VALID_ID, "Zhang^San=张^三")
    finally:
        data.close()
    with open_outbox(config) as outbox:
        item = outbox.get(one.id)
    assert item is not None and item.patient is not None and item.patient["name"] == "Zhang^San=张^三"
    assert item.hold_reason == QUALITY_HOLD and item.held(time.time())


# -- check-in --------------------------------------------------------------------------------------------


def test_check_in_puts_stat_and_reason_on_the_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path, "cn-resident-id")
    data = ClinicData(config)
    try:
        view = data.check_in("王医生", VALID_ID, "张三", "Dr Li", True, "胸痛 chest pain", now=now()).session
    finally:
        data.close()
    assert view.stat and view.reason == "胸痛 chest pain"
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        current = context.current(now())
    finally:
        context.close()
    assert current is not None and current.stat and current.reason == "胸痛 chest pain"
    assert current.patient_id == VALID_ID and current.name == "Zhang^San=张^三"
    shown = cli_json(["patient", "show", "--json", "--data-dir", str(config.data_dir)], capsys)
    assert shown["current_patient"]["stat"] is True  # type: ignore[index]


def test_not_urgent_refuses_once_a_card_checked_another_patient_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page shows 张三 as STAT; the doctor presses "not urgent" just as the acquire service takes
    李四's card (its own connection): 李四 stays checked in, and the button says so."""
    from lastmile.clinic import patients

    config = make_config(tmp_path)
    data = ClinicData(config)
    acquire = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    real_transaction = patients.transaction
    scans = ["P-LISI"]

    def card_scanned_first(db, **how):  # the card reaches clinic.db the moment the button's write starts
        if scans and db is data.db:
            acquire.set_patient(scans.pop(), now=now())
        return real_transaction(db, **how)

    try:
        data.check_in("王医生", VALID_ID, "张三", "", True, "胸痛", now=now())
        monkeypatch.setattr(patients, "transaction", card_scanned_first)
        with pytest.raises(ConsoleInputError) as refused:
            data.check_in("王医生", VALID_ID, "", "", False, "", now=now(), shown_patient_id=VALID_ID)
    finally:
        acquire.close()
        data.close()
    assert not scans  # the card was scanned during the button's check-in
    assert refused.value.values == {"patient": "P-LISI"}
    shown = cli_json(["patient", "show", "--json", "--data-dir", str(config.data_dir)], capsys)
    assert shown["current_patient"]["patient_id"] == "P-LISI"  # type: ignore[index]


def test_a_stale_check_in_with_a_doctor_leaves_the_other_patients_doctor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page showed 张三, checked in by 王医生; a card checked 李四 in since. The stale form,
    sent with 李医生 as doctor, was refused - after it had made 李医生 the doctor of 李四's session."""
    config = make_config(tmp_path)
    data = ClinicData(config)
    acquire = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        data.check_in("王医生", VALID_ID, "张三", "王医生", True, "胸痛", now=now())
        acquire.set_patient("P-LISI", now=now())
        with pytest.raises(ConsoleInputError):
            data.check_in("李医生", VALID_ID, "", "李医生", False, "", now=now(), shown_patient_id=VALID_ID)
    finally:
        acquire.close()
        data.close()
    shown = cli_json(["patient", "show", "--json", "--data-dir", str(config.data_dir)], capsys)
    assert shown["current_patient"]["patient_id"] == "P-LISI"  # type: ignore[index]
    assert shown["doctor_id"] == "王医生"


def next_cart_ecg(config: Config) -> tuple[Any, Any]:
    """The ECG the cart sends now (the serial bridge's path, with the clinic session's patient,
    STAT and reason): its outbox item and its DICOM."""
    import io
    from dataclasses import replace

    import pydicom

    from firmware_bridge.serial_link import LinkSpec, PortMatch
    from lastmile.services.serial_devices import SerialService

    with open_outbox(config) as outbox:
        service = SerialService.open(config, outbox=outbox)
        try:
            recording = replace(make_recording(4, patient=None), acquired_at=now())
            cart = LinkSpec("ecg-cart", PortMatch(path="/dev/ttyUSB9"), profile="bridge")
            assert service.ctx.store_recording(cart, recording, "cart-ecg")
        finally:
            service.close()
        item = outbox.find("cart-ecg")
        assert item is not None
        return item, pydicom.dcmread(io.BytesIO(outbox.read_payload(item)))


def test_a_stat_check_in_makes_the_next_ecg_stat(tmp_path: Path) -> None:
    """The console's STAT and reason reach the ECG the cart sends next (the serial bridge's path):
    sent first, never held, the reason in the DICOM request."""
    from uploader.outbox import Priority

    config = make_config(tmp_path)
    data = ClinicData(config)
    try:
        data.check_in("王医生", VALID_ID, "张三", "Dr Li", True, "胸痛 chest pain", now=now())
    finally:
        data.close()
    item, ds = next_cart_ecg(config)
    assert item.priority == Priority.STAT and item.meta["stat"] and item.hold_until is None  # STAT: never held
    assert item.patient is not None and item.patient["patient_id"] == VALID_ID
    assert ds.StudyDescription.startswith("STAT ") and "胸痛 chest pain" in ds.StudyDescription
    assert ds.RequestAttributesSequence[0].ReasonForTheRequestedProcedure == "胸痛 chest pain"


def test_a_cleared_name_and_reason_leave_the_next_ecg_without_them(tmp_path: Path) -> None:
    """张三 was checked in as 王五 with a wrong reason; the doctor clears both (the page showed
    张三): the ECG the cart sends next names no one and asks for no reason."""
    config = make_config(tmp_path)
    data = ClinicData(config)
    try:
        data.check_in("王医生", VALID_ID, "王五", "Dr Li", True, "胸痛 chest pain", now=now())
        clear = {"clear_name": True, "clear_reason": True}
        done = data.check_in("王医生", VALID_ID, "", "", None, "", now=now(), shown_patient_id=VALID_ID, **clear)
    finally:
        data.close()
    assert done.changed == ("name", "reason") and done.session.stat
    item, ds = next_cart_ecg(config)
    assert item.patient is not None and item.patient["patient_id"] == VALID_ID
    assert item.patient["name"] == "" and str(ds.PatientName) == "", (item.patient, ds.PatientName)
    assert "胸痛" not in str(ds.get("StudyDescription", ""))
    assert "RequestAttributesSequence" not in ds or not ds.RequestAttributesSequence[0].get(
        "ReasonForTheRequestedProcedure"
    )


def test_clearing_a_name_on_a_stale_page_clears_nobody_elses(tmp_path: Path) -> None:
    """The page showed 张三; a card checked 李四 in since: its 清除姓名 is refused, 李四 keeps her name."""
    config = make_config(tmp_path)
    data = ClinicData(config)
    acquire = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        data.check_in("王医生", VALID_ID, "张三", "", None, "", now=now())
        acquire.set_patient("P-LISI", "李四", now=now())
        with pytest.raises(ConsoleInputError):
            data.check_in("王医生", VALID_ID, "", "", None, "", now=now(), shown_patient_id=VALID_ID, clear_name=True)
        current = acquire.current(now())
    finally:
        acquire.close()
        data.close()
    assert current is not None and current.patient_id == "P-LISI" and current.name == "李四", current


@pytest.mark.parametrize(
    ("id_kind", "typed", "expected"),
    [
        ("cn-resident-id", VALID_ID.lower(), VALID_ID),
        ("cn-resident-id", WRONG_CHECK, None),
        ("cn-resident-id", "MRN-0042", None),  # the clinic says: resident IDs only
        ("", "MRN-0042", "MRN-0042"),
        ("", WRONG_CHECK, None),  # any ID, but a misread resident ID is still caught
        ("clinic-mrn", "0042 ", "0042"),
    ],
)
def test_the_patient_id_is_checked_against_the_configured_kind(
    tmp_path: Path, id_kind: str, typed: str, expected: str | None
) -> None:
    config = make_config(tmp_path, id_kind)
    if expected is None:
        with pytest.raises(ConsoleInputError):
            checked_patient(typed, "", config)
    else:
        assert checked_patient(typed, "", config).patient_id == expected


def test_the_console_process_loads_neither_pydicom_nor_the_senders(tmp_path: Path) -> None:
    """The sources are imported as the console imports them (numpy blocked first, as
    `lastmile console` does) and the System page's doctor runs: pydicom only in the worker; the
    FHIR sender (requests, urllib3) and prometheus_client not at all. Each was once pulled in by
    one small name (visit_bundle_key, the metrics listen address): ~9 MB of a 64 MB budget."""
    code = (
        "import sys; from pathlib import Path; from lastmile.console.service import prepare_console_process; "
        "prepare_console_process(); "
        "import lastmile.console.app, lastmile.console.stores, lastmile.console.sources; "
        "from lastmile.config import Config; from lastmile.doctor import Doctor; "
        f"config = Config(); config.set_data_dir(Path({str(tmp_path)!r})); "
        "Doctor(config, offline=True).run_all(); "
        "heavy = ('pydicom', 'pynetdicom', 'numpy', 'requests', 'urllib3', 'prometheus_client'); "
        "print(sorted({m.split('.')[0] for m, mod in sys.modules.items() if mod and m.split('.')[0] in heavy}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_system_pages_checks_run_whole_with_numpy_blocked(tmp_path: Path) -> None:
    """Every check the System page runs (views.DoctorRuns, in a process that blocks numpy as
    `lastmile console` does) on a gateway's data directory: none breaks. The data and devices
    checks once imported the serial spill module, which loaded the ECG .npz code and numpy: two
    false "问题" (check failed: ModuleNotFoundError) on every gateway."""
    config = make_config(tmp_path)
    with open_outbox(config):
        pass
    ClinicData(config)  # clinic.db, as the console's first start leaves it
    code = (
        "import asyncio, json, sys; from pathlib import Path; "
        "from lastmile.console.service import prepare_console_process; prepare_console_process(); "
        "from lastmile.config import Config; from lastmile.console.views import DoctorRuns; "
        f"config = Config(); config.set_data_dir(Path({str(config.data_dir)!r})); "
        "found = asyncio.run(DoctorRuns().findings(config)); "
        "print(json.dumps([[f.check, f.level.name, f.message] for f in found]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert {check for check, _, _ in found} >= {"data", "devices", "queue", "reports", "visits"}
    assert [f for f in found if f[2].startswith("check failed")] == []


def test_the_pages_redrawn_on_every_wake_find_their_outbox_rows_by_index_not_a_scan(tmp_path: Path) -> None:
    """Today (its readings and mapped ones, on every SSE wake and heartbeat, for every tablet),
    Visits and Sent each read the
    outbox with a scan of every row ever queued (purged rows stay): ~50 ms a run at 300k rows,
    several times that on a Pi. Each is an index search (items_claim) now."""
    from lastmile.clinic.observations import MAPPED_USER, OBSERVATION_KIND, observation_to_json
    from tests.console_harness import bp_reading

    config = make_config(tmp_path)
    at = now()
    with open_outbox(config) as outbox:
        patient = {"patient_id": VALID_ID, "name": "Zhang^San=张^三"}
        reading = json.dumps(observation_to_json(bp_reading(at, "bp-1"))).encode()
        outbox.add(OBSERVATION_KIND, "bp-1", reading, meta={MAPPED_USER: 2, "device": "cuff"}, patient=patient)
        enqueue_recording(outbox, make_recording(6, patient=Patient(VALID_ID, "张三")), config, key="ecg-6")
    data = ClinicData(config)
    try:
        conn = data.outbox.db.conn
        for name, page_view in (
            ("mapped_elsewhere", lambda: data.mapped_elsewhere(None, at)),
            ("known_names", lambda: data.known_names([VALID_ID], at)),
            ("sent_readings", lambda: data.sent_readings()),
            ("patient_readings", lambda: data.patient_readings(VALID_ID, at - dt.timedelta(minutes=5))),
        ):
            traced: list[str] = []
            conn.set_trace_callback(traced.append)
            try:
                assert page_view(), name  # each finds the rows it looks for
            finally:
                conn.set_trace_callback(None)
            queries = [sql for sql in traced if sql.lstrip().upper().startswith("SELECT")]
            plans = {sql: [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)] for sql in queries}
            scans = {sql: plan for sql, plan in plans.items() if any(s.startswith("SCAN items") for s in plan)}
            assert not scans, (name, scans)
    finally:
        data.close()


def gateway_of_a_year(config: Config, readings: int, ecgs: int) -> list[SentReading]:
    """An outbox as a gateway keeps it after a year: `readings` purged readings (rows stay, their
    data erased), `ecgs` purged ECGs among the oldest ones, one real ECG queued last; and the
    records of the last 50 readings, whose bundles the county platform has not taken yet. Rows
    written in bulk in one transaction (the test stays fast)."""
    from lastmile.clinic.observations import OBSERVATION_KIND
    from uploader.sqlite_store import transaction

    t0 = time.time() - 365 * 86400
    step = readings // (2 * ecgs)  # the ECGs spread over the older half
    rows = [
        (Kind.DICOM.value if n % step == 0 and n // step < ecgs else OBSERVATION_KIND, f"row-{n}", t0 + n)
        for n in range(readings + ecgs)
    ]
    with open_outbox(config) as outbox:
        with transaction(outbox.db) as conn:
            conn.executemany(
                "INSERT INTO items (kind, key, priority, state, attempts, next_attempt_at, created_at, updated_at, "
                "sha256, size) VALUES (?, ?, 1, 'purged', 0, ?3, ?3, ?3, '', 0)",
                rows,
            )
            last = conn.execute(
                "SELECT id, key FROM items WHERE kind = ? ORDER BY id DESC LIMIT 50", (OBSERVATION_KIND,)
            )
            items = last.fetchall()
        enqueue_recording(outbox, make_recording(6, patient=Patient(VALID_ID, "张三")), config, key="ecg-new")
    at = dt.datetime.fromtimestamp(t0 + readings, dt.timezone.utc)
    return [
        SentReading(
            item_id,
            key,
            VALID_ID,
            "Zhang^San=张^三",
            "blood-pressure",
            "131/84 mmHg",
            "cuff",
            at,
            "device-clock",
            at,
            "https://county.example/fhir",
            bundle_key=f"bundle-{item_id}",
        )
        for item_id, key in items
    ]


def test_the_sent_page_finds_its_studies_and_readings_by_index_in_a_few_statements(tmp_path: Path) -> None:
    """A gateway's outbox keeps its purged rows: a year of readings (200k) and few ECGs. The Sent
    page (rendered on every wake) found its 50 ECGs walking the table backwards, every reading
    since the 50th newest ECG: here all 200k rows, ~30 ms a view on a PC, several times that on a
    Pi; then read each ECG, each reading and each untaken reading's bundle by one statement each
    (over 150 a view). Now an index search for each list and one statement for its items."""
    config = make_config(tmp_path)
    ecgs = 60
    ClinicData(config).report_store.record_sent_readings(gateway_of_a_year(config, 200_000, ecgs))
    data = ClinicData(config)
    try:
        conn = data.outbox.db.conn
        at = now()
        views.sent(data, at)  # the pages' first read of each table
        started = time.perf_counter()
        with traced(conn, data.db.conn) as statements:
            page = views.sent(data, at)
        print(f"Sent page: {(time.perf_counter() - started) * 1000:.1f} ms, {len(statements)} statements")
        assert len(page["journeys"]) == 50 and len(page["readings"]) == 50
        assert page["journeys"][0].patient_id == VALID_ID
        queries = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
        plans = {
            sql: [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)] for sql in queries if "items" in sql
        }
        # items_ecgs holds only the ECG rows: its walk stops at the 50th
        walks = [s for plan in plans.values() for s in plan if s.startswith("SCAN items")]
        assert all(s == "SCAN items USING INDEX items_ecgs" for s in walks), plans
        assert len(statements) <= 12, statements  # as many for 50 studies and readings as for one
    finally:
        data.close()


def clinic_with_a_reading_named(tmp_path: Path, name: str, at: dt.datetime) -> ClinicData:
    """The console's data of a clinic whose outbox holds one reading of VALID_ID named `name`."""
    from lastmile.clinic.observations import OBSERVATION_KIND, observation_to_json
    from tests.console_harness import bp_reading

    config = make_config(tmp_path)
    with open_outbox(config) as outbox:
        reading = json.dumps(observation_to_json(bp_reading(at, "bp-1"))).encode()
        outbox.add(OBSERVATION_KIND, "bp-1", reading, patient={"patient_id": VALID_ID, "name": name})
    return ClinicData(config)


def test_visits_name_a_patient_as_the_latest_check_in_does_not_an_older_reading(tmp_path: Path) -> None:
    """张三 is checked in with a typo in his name, a reading is stored under it, the doctor checks
    him in again with the name corrected (张三丰), then the next patient. Visits named him by the
    reading's old name while an assignment or a cuff user mapped to his ID takes the corrected one
    (`PatientContext.named`): one gateway, two names for one ID. The session's name comes first."""
    at = now()
    data = clinic_with_a_reading_named(tmp_path, "Zhang^San=张^三", at)
    try:
        data.context.set_patient(VALID_ID, "Zhang^Sanfeng=张^三丰", now=at - dt.timedelta(minutes=10))
        data.context.set_patient("P-NEXT", "Li^Si=李^四", now=at - dt.timedelta(minutes=5))
        assert data.context.named(Patient(VALID_ID), at).name == "Zhang^Sanfeng=张^三丰"
        assert data.known_names([VALID_ID, "P-NEXT"], at) == {VALID_ID: "张三丰", "P-NEXT": "李四"}
    finally:
        data.close()


def test_naming_the_mapped_users_and_visits_reads_the_session_once_not_once_per_patient(tmp_path: Path) -> None:
    """Today (its held readings' mapped users, on every render and SSE wake) and Visits name each
    patient ID as the session does: one read of the session and one or two of its log per ID.
    The statements are as many for 12 mapped users or visits as for one (behaviour kept)."""
    at = now()
    data = ClinicData(make_config(tmp_path))
    try:
        ids = [f"P-{n}" for n in range(12)]
        for n, patient_id in enumerate(ids):
            data.context.set_patient(patient_id, f"Name^{n}", now=at - dt.timedelta(minutes=30 - n))
        data.context.current(at)  # the last check-in's idle end, once
        counted = {}
        for count in (1, len(ids)):
            for n, patient_id in enumerate(ids[:count]):
                data.store.device_users.map_user(f"AA:BB:CC:DD:EE:{n:02X}", 2, patient_id, now=at)
            with traced(data.db.conn) as today:
                data.device_users(at)
            with traced(data.db.conn) as visits:
                data.known_names(ids[:count], at)
            counted[count] = (len(today), len(visits))
        assert counted[1] == counted[len(ids)], counted
        assert [u.mapping.patient_name for u in data.device_users(at)] == [f"Name^{n}" for n in range(12)]
        assert data.known_names(ids, at) == {p: f"Name {n}" for n, p in enumerate(ids)}
    finally:
        data.close()


def test_visits_name_a_patient_the_session_never_named_by_the_newest_outbox_item(tmp_path: Path) -> None:
    """What only the outbox knows (a patient checked in more than a day ago, or named by a
    card's ECG) still names the ID; an ID nothing named has no name."""
    at = now()
    data = clinic_with_a_reading_named(tmp_path, "Zhang^San=张^三", at)
    try:
        assert data.known_names([VALID_ID, "P-NOBODY"], at) == {VALID_ID: "张三"}
    finally:
        data.close()


def held_ecg_row(page: str, item_id: int) -> str:
    """The text of the Today page's row of held ECG `item_id` (its markup stripped)."""
    import re

    row = re.search(rf'<li data-held-ecg="{item_id}">(.*?)</li>', page, re.S)
    assert row is not None, page
    return " ".join(re.sub(r"<[^>]+>", " ", row.group(1)).split())


def test_a_held_ecg_names_the_files_patient_until_the_doctor_assigns_another(tmp_path: Path) -> None:
    """An ECG whose file names SBJ-123 while P-77 is checked in: its row says the file names
    SBJ-123 (sent as that patient's unless the doctor decides); assigned to P-77 and still held for
    its quality, the row is P-77's and says nothing of SBJ-123's."""
    from lastmile.ecg.intake import with_patient_check
    from tests.console_harness import Client, console_config, running_console

    config = console_config(tmp_path / "data")
    t = time.time()
    with open_outbox(config) as outbox:
        recording = with_patient_check(make_recording(1, patient=Patient("SBJ-123")), frozenset({"P-77"}))
        item = enqueue_recording(outbox, recording, config, key="m", now=t).item
    assert item.hold_reason == "patient-mismatch"
    with running_console(config) as server:
        client = Client(server.url, language="en")
        client.login()
        row = held_ecg_row(client.get("/today").body, item.id)
        assert "SBJ-123" in row and "The ECG names patient SBJ-123, not the current one" in row, row
        with open_outbox(config) as outbox:
            assert OutboxHeldEcgs(outbox, config).assign(item.id, Patient("P-77", "Li^Si"), now=now())
        row = held_ecg_row(client.get("/today").body, item.id)
    assert "P-77" in row and "SBJ-123" not in row, row
