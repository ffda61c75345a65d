"""Faults found reviewing the console: each test fails on the code as reviewed.

A real console (real report store, real outbox holds) on loopback, a doctor logged in like a
browser; each test states the doctor's scenario and what must hold for them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from devices.ecg.recording import EcgRecording
from devices.identity import Patient
from lastmile.clinic.db import open_clinic_db
from lastmile.clinic.observations import ObservationStore
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config
from lastmile.console.audit import AuditLog
from lastmile.console.service import ConsoleServer
from lastmile.console.sources import person_name
from lastmile.data_dir import open_outbox
from lastmile.ecg.intake import QUALITY_HOLD, enqueue_recording, read_ecg_file, with_patient_check
from tests.conftest import shared_file
from tests.console_harness import (
    ADMIN,
    DOCTOR,
    VALID_ID,
    Client,
    Reply,
    bp_reading,
    console_config,
    record_receipt_timed_bp,
    running_console,
    store_returned_reports,
)
from tests.ecg_factories import make_recording

OTHER_ID = "110105198001010016"  # another valid GB 11643 number (the previous patient)
HUGE = "9" * 25  # digits, but more than SQLite's 64-bit INTEGER holds


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Config, ConsoleServer, int, int]]:
    config = console_config(tmp_path_factory.mktemp("faults") / "data")
    with running_console(config) as server:
        critical, routine = store_returned_reports(config)
        yield config, server, critical, routine


@pytest.fixture
def doctor(clinic: tuple[Config, ConsoleServer, int, int]) -> Client:
    client = Client(clinic[1].url)
    client.login()
    return client


def no_server_error(reply: object, what: str) -> None:
    status = reply.status  # type: ignore[attr-defined]
    if status >= 500:
        pytest.fail(f"{what}: HTTP {status}, the doctor sees an Internal Server Error")


# -- odd report ids in the address bar: a 404, never a 500 ---------------------------------------


@pytest.mark.parametrize(
    "suffix",
    ["", "/pdf"],
    ids=["page", "pdf"],
)
def test_a_report_id_of_superscript_digits_is_not_found_not_a_crash(doctor: Client, suffix: str) -> None:
    # "²" is str.isdigit() but not int(): StoredReports._stored takes it for a number.
    reply = doctor.get(f"/reports/%C2%B2{suffix}")
    no_server_error(reply, f"/reports/²{suffix}")
    assert reply.status == 404


@pytest.mark.parametrize("suffix", ["", "/pdf"], ids=["page", "pdf"])
def test_a_report_id_too_large_for_sqlite_is_not_found_not_a_crash(doctor: Client, suffix: str) -> None:
    reply = doctor.get(f"/reports/{HUGE}{suffix}")
    no_server_error(reply, f"/reports/<25 digits>{suffix}")
    assert reply.status == 404


def test_acknowledging_a_report_id_too_large_for_sqlite_is_not_a_crash(doctor: Client) -> None:
    reply = doctor.post(f"/reports/{HUGE}/acknowledge", {"next": "/reports"})
    no_server_error(reply, "POST /reports/<25 digits>/acknowledge")


# -- odd ECG / held-reading numbers: refused in words or 404, never a 500 ------------------------


def test_an_ecg_preview_number_too_large_is_not_found_not_a_crash(doctor: Client) -> None:
    reply = doctor.get(f"/ecg/{HUGE}/preview.svg")
    no_server_error(reply, "/ecg/<25 digits>/preview.svg")
    assert reply.status == 404


@pytest.mark.parametrize("action", ["send-anyway", "re-record"])
def test_a_held_ecg_action_on_a_number_too_large_is_not_a_crash(doctor: Client, action: str) -> None:
    reply = doctor.post(f"/today/ecg/{HUGE}/{action}", {})
    no_server_error(reply, f"POST /today/ecg/<25 digits>/{action}")


def test_assigning_a_held_reading_number_too_large_is_refused_in_words(doctor: Client) -> None:
    # a tampered or stale form: the page says so (400 with a message), as for "abc"
    reply = doctor.post("/today/assign-reading", {"held_id": HUGE, "patient_id": VALID_ID, "name": ""})
    no_server_error(reply, "POST /today/assign-reading held_id=<25 digits>")
    assert reply.status == 400


# -- a held reading assigned to another patient keeps the current patient's name ------------------


def _hold_reading(config: Config, measured_at: dt.datetime, key: str) -> int:
    """A cuff's reading with no patient (measured before the current session): held."""
    with open_outbox(config) as outbox:
        store = ObservationStore.open(config.data_dir, outbox=outbox, idle_timeout_s=900)
        try:
            result = store.record(bp_reading(measured_at, key), now=dt.datetime.now(dt.timezone.utc))
        finally:
            store.close()
    assert result.outcome == "held", result
    assert result.held_id is not None
    return result.held_id


def assign_to_another(doctor: Client, id_field: str, held: int, action: str, prefilled: str = VALID_ID):
    """Today's Assign form of a held reading or ECG, sent as the doctor fills it: prefilled with
    `prefilled` (the checked-in patient's ID, or nobody), the doctor types OTHER_ID (the previous
    patient) instead."""
    page = doctor.get("/today")
    form = re.search(rf'<input type="hidden" name="{id_field}" value="{held}">.*?</form>', page.body, flags=re.S)
    assert form, f"the held item's Assign form ({id_field} {held}) is on Today"
    fields = dict(re.findall(r'name="(\w+)" value="([^"]*)"', form.group(0)))
    assert fields["patient_id"] == prefilled
    fields["patient_id"] = OTHER_ID
    return doctor.post(action, fields)


def test_a_held_reading_assigned_to_another_patient_does_not_carry_the_current_patients_name(
    clinic: tuple[Config, ConsoleServer, int, int], doctor: Client
) -> None:
    """Patient 张三 is checked in. The cuff delivers late a reading taken before (the previous
    patient's, 李四). The doctor types 李四's ID into that reading's Assign field (empty: measured
    before 张三's check-in) and presses Assign. The reading must not go to the county as "张三"
    with 李四's ID."""
    config = clinic[0]
    reply = doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"})
    assert reply.status == 303, reply.body[:300]
    held_id = _hold_reading(config, dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1), "faults:late-bp")
    reply = assign_to_another(doctor, "held_id", held_id, "/today/assign-reading", prefilled="")
    assert reply.status == 303, reply.body[:300]
    with open_outbox(config) as outbox:
        stored = [i for i in outbox.items(kind="observation") if i.key == "faults:late-bp"]
    assert len(stored) == 1
    patient = stored[0].patient or {}
    assert patient.get("patient_id") == OTHER_ID
    name = str(patient.get("name") or "")
    if "张" in name:
        pytest.fail(f"reading for {OTHER_ID} stored under the checked-in patient's name: {patient}")


def test_a_held_ecg_assigned_to_another_patient_does_not_carry_the_current_patients_name(
    clinic: tuple[Config, ConsoleServer, int, int], doctor: Client
) -> None:
    """As for a held reading: an ECG without a patient is held; 张三 is checked in, the doctor
    types 李四's ID into the ECG's Assign field (empty: recorded before the check-in). The rebuilt
    ECG must not name 张三."""
    config = clinic[0]
    reply = doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"})
    assert reply.status == 303, reply.body[:300]
    with open_outbox(config) as outbox:
        rec = make_recording(7, patient=None)
        item_id = enqueue_recording(outbox, rec, config, key="faults:late-ecg", now=time.time()).item.id
    # recorded at T0, before this check-in: the box offers nobody
    reply = assign_to_another(doctor, "item_id", item_id, "/today/assign-ecg", prefilled="")
    assert reply.status == 303 and "done=assigned" in reply.location, (reply.status, reply.location)
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
    assert item is not None and item.patient is not None
    assert item.patient.get("patient_id") == OTHER_ID
    name = str(item.patient.get("name") or "")
    if "张" in name or "Zhang" in name:
        pytest.fail(f"ECG for {OTHER_ID} rebuilt under the checked-in patient's name: {item.patient}")


FILE_ID = "320122198001010038"  # a valid resident ID an ECG file names, checked in nowhere here
FILE_PATIENT = Patient(FILE_ID, "Wang^Wu=王^五")


@pytest.mark.parametrize(
    ("on_file", "typed", "said"),
    [
        (None, VALID_ID, f"已指定给 张三（{VALID_ID}）"),
        (None, OTHER_ID, f"已指定给 {OTHER_ID}（未填姓名）"),
        (FILE_PATIENT, VALID_ID, f"已指定给 张三（{VALID_ID}）"),
        (FILE_PATIENT, FILE_ID, f"已指定给 王五（{FILE_ID}）"),
    ],
    ids=["unassigned-to-checked-in", "unassigned-to-typed-number", "mismatch-to-checked-in", "mismatch-to-its-own"],
)
def test_a_held_ecg_assigned_says_whose_it_now_is(
    clinic: tuple[Config, ConsoleServer, int, int], doctor: Client, on_file: Patient | None, typed: str, said: str
) -> None:
    """A held ECG (no patient, or another patient than the one checked in) assigned on Today said
    only "已指定" and to the county: the doctor could not see whether it went to the right person.
    It names them - the name the page shows for that ID (check-in's, or the one the ECG file gave
    with it), or the number alone - and a reload of that answer never says a bare "已指定"."""
    config = clinic[0]
    key = f"faults:whose-ecg-{on_file is not None}-{typed}"
    item_id, reply = assign_held_ecg_on_today(config, doctor, make_recording(8, patient=on_file), key, typed)
    assert said in done_said(doctor.get(reply.location).body)
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
    assert item is not None and item.patient is not None
    assert person_name(str(item.patient.get("name") or "")) in said, "the answer names whom the ECG now goes as"
    again = done_said(doctor.get(reply.location).body)  # the doctor reloads the answer
    assert "已指定" not in again or said in again


# an ECG file's patient by clinic number: no birth date or sex in the number
CLINIC_FILE_PATIENT = Patient("MZ-20418", "Wang^Wu=王^五", dt.date(1950, 3, 2), "M")


def assign_held_ecg_on_today(
    config: Config, doctor: Client, recording: EcgRecording, key: str, typed: str
) -> tuple[int, Reply]:
    """张三 is checked in; `recording` arrives (held: no patient, another one, or its quality); the
    doctor types `typed` into its Assign form on Today and presses Assign. The outbox item, the reply."""
    assert doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
    with open_outbox(config) as outbox:
        rec = with_patient_check(recording, frozenset({VALID_ID}))
        item_id = enqueue_recording(outbox, rec, config, key=key, now=time.time()).item.id
    page = doctor.get("/today")
    form = re.search(rf'<input type="hidden" name="item_id" value="{item_id}">.*?</form>', page.body, flags=re.S)
    assert form, f"the held ECG's Assign form (E{item_id}) is on Today"
    fields = dict(re.findall(r'name="(\w+)" value="([^"]*)"', form.group(0))) | {"patient_id": typed}
    reply = doctor.post("/today/assign-ecg", fields)
    assert reply.status == 303 and "done=assigned" in reply.location, (reply.status, reply.location)
    return item_id, reply


def _assigned_object(config: Config, doctor: Client, key: str, typed: str) -> pydicom.Dataset:
    """An ECG whose file names CLINIC_FILE_PATIENT (born 1950, male), held as a mismatch (张三 is
    checked in), assigned on Today to `typed`: the DICOM object the county will be sent."""
    item_id, _ = assign_held_ecg_on_today(config, doctor, make_recording(9, patient=CLINIC_FILE_PATIENT), key, typed)
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
        assert item is not None
        return pydicom.dcmread(io.BytesIO(outbox.read_payload(item)))


def test_a_mismatch_ecg_assigned_to_its_own_patient_keeps_the_birth_date_and_sex_its_file_gave(
    clinic: tuple[Config, ConsoleServer, int, int], doctor: Client
) -> None:
    """The cart recorded 王五 (clinic number MZ-20418, born 1950-03-02, male) while 张三 was checked
    in: held as a mismatch. The doctor assigns it to MZ-20418, the patient its own file names. The
    county's cardiologist reads an ECG by age and sex: they must still be in the object sent."""
    ds = _assigned_object(clinic[0], doctor, "faults:own-patient-birth", CLINIC_FILE_PATIENT.patient_id)
    assert (ds.PatientID, str(ds.PatientName)) == ("MZ-20418", "Wang^Wu=王^五")
    assert (ds.PatientBirthDate, ds.PatientSex) == ("19500302", "M"), "the file's birth date and sex were lost"
    assert ds.PatientAge.endswith("Y")  # an age again, from the birth date


def test_a_mismatch_ecg_assigned_to_another_patient_does_not_carry_its_files_birth_date_and_sex(
    clinic: tuple[Config, ConsoleServer, int, int], doctor: Client
) -> None:
    """The same ECG, assigned instead to another clinic number (the cart's entry was wrong): the
    check-in knows no birth date or sex for MZ-30001, so none is sent - never 王五's."""
    ds = _assigned_object(clinic[0], doctor, "faults:other-patient-birth", "MZ-30001")
    assert ds.PatientID == "MZ-30001" and "Wang" not in str(ds.PatientName)
    assert (ds.PatientBirthDate, ds.PatientSex) == ("", ""), "another patient's birth date and sex sent"
    assert "PatientAge" not in ds


@pytest.mark.parametrize(
    ("quality_held", "said"),
    [
        (True, f"已指定给 张三（{VALID_ID}）；此心电图质量待定，请选择“需要重做”或“仍然发送”。"),
        (False, f"已指定给 张三（{VALID_ID}），将以该患者的名义发送到县里。"),
    ],
    ids=["re-record-verdict", "good-recording"],
)
def test_an_ecg_held_for_its_quality_and_assigned_says_it_still_waits_for_the_doctor(
    clinic: tuple[Config, ConsoleServer, int, int], doctor: Client, quality_held: bool, said: str
) -> None:
    """An ECG with no patient and a 're-record' quality verdict: the doctor assigns it to 张三. The
    answer said it goes to the county as 张三's - but it stays held under the quality verdict until
    the doctor records again or sends it anyway (or the hold ends). The answer must say so."""
    good = read_ecg_file(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"))
    recording = make_recording(10, patient=None) if quality_held else dataclasses.replace(good, patient=None)
    item_id, reply = assign_held_ecg_on_today(clinic[0], doctor, recording, f"faults:quality-{quality_held}", VALID_ID)
    with open_outbox(clinic[0]) as outbox:
        item = outbox.get(item_id)
    assert item is not None and (item.hold_reason == QUALITY_HOLD and item.held(time.time())) == quality_held
    assert done_said(doctor.get(reply.location).body) == said


def done_said(page: str) -> str:
    """What Today's answer to the last action says, as text ("" if it says nothing)."""
    answer = re.search(r'<p class="done".*?</p>', html.unescape(page), flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", answer.group(0)).split()) if answer else ""


# -- the critical report's acknowledgement: one doctor in the audit trail --------------------------


def test_a_critical_report_acknowledged_twice_is_audited_once_for_the_doctor_who_saw_it(
    clinic: tuple[Config, ConsoleServer, int, int], doctor: Client
) -> None:
    """Two doctors have the Reports page open; 王医生 presses "I have seen this critical result",
    then admin presses it on the other screen. The report says seen by 王医生; the audit trail
    must not say that admin acknowledged it."""
    config, server, critical, _routine = clinic
    doctor.get("/reports")
    reply = doctor.post(f"/reports/{critical}/acknowledge", {"next": "/reports"})
    assert reply.status == 303
    other = Client(server.url)
    other.login(ADMIN)
    other.get("/reports")
    reply = other.post(f"/reports/{critical}/acknowledge", {"next": "/reports"})
    assert reply.status == 303
    page = other.get(f"/reports/{critical}")
    assert DOCTOR[0] in page.body  # "Seen by 王医生"
    db = open_clinic_db(config.data_dir)
    try:
        entries = AuditLog(db).recent(50, action="acknowledge-report", target=str(critical))
    finally:
        db.conn.close()
    who = [e.user_name for e in entries]
    assert who == [DOCTOR[0]], f"audit trail says the critical report was acknowledged by {who}"


# -- what the doctor reads is in Chinese ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/reports/999999", "/reports/999999/pdf"], ids=["page", "pdf"])
def test_a_report_that_is_gone_is_said_in_chinese(doctor: Client, path: str) -> None:
    """A report link from an old alert or a bookmark (the report purged meanwhile): the doctor gets
    a bare English sentence, where every other refusal of the console is bilingual
    ("login required / 请先登录", "refused / 已拒绝")."""
    reply = doctor.get(path)
    assert reply.status == 404
    assert re.search(r"[\u4e00-\u9fff]", reply.body), f"untranslated English on a zh-CN page: {reply.body!r}"


# -- a reading whose time is only the time it was received says so -------------------------------


def test_a_reading_timed_by_the_gateway_on_receipt_says_its_time_is_the_time_received(
    clinic: tuple[Config, ConsoleServer, int, int], doctor: Client
) -> None:
    """A cuff without a clock (or with an implausible one): the reading's time is when the gateway
    received it (time_source gateway-receipt), possibly long after it was measured. The ECG preview
    says so ("接收时间 time received"); this patient's readings on Today show it as the measuring time."""
    config = clinic[0]
    reply = doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"})
    assert reply.status == 303, reply.body[:300]
    record_receipt_timed_bp(config, "faults:receipt-time")
    page = doctor.get("/today")
    item = re.search(r'<li data-key="faults:receipt-time">.*?</li>', page.body, flags=re.S)
    assert item, "the reading is on the patient's Today page"
    assert "接收" in item.group(0), f"receipt time shown as the measuring time: {item.group(0)}"


# -- a stale Today page ends another patient's session ---------------------------------------------


def end_session_form(doctor: Client) -> dict[str, str]:
    """The fields of Today's "End this patient's check-in" form, as the page shows them now."""
    page = doctor.get("/today")
    form = re.search(r'<form method="post" action="/today/end-session".*?</form>', page.body, flags=re.S)
    assert form, "Today shows the End session button"
    return dict(re.findall(r'name="(\w+)" value="([^"]*)"', form.group(0)))


def test_ending_the_session_shown_never_ends_the_patient_checked_in_since(
    clinic: tuple[Config, ConsoleServer, int, int], doctor: Client
) -> None:
    """李四 is checked in; the doctor's Today page shows him. Meanwhile the nurse checks in 张三
    on the cart's tablet. The doctor, done with 李四, presses "End this patient's check-in" on
    the page still showing 李四: 张三's session must go on (her readings would be held, her
    STAT lost), and the doctor must be told why nothing ended."""
    config = clinic[0]
    assert doctor.post("/today/check-in", {"patient_id": OTHER_ID, "name": "李四"}).status == 303
    shown = end_session_form(doctor)
    nurse = Client(clinic[1].url)
    nurse.login()
    reply = nurse.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三", "stat": "on"})
    assert reply.status == 303, reply.body[:300]
    reply = doctor.post("/today/end-session", shown)
    no_server_error(reply, "POST /today/end-session from a page showing another patient")
    db = open_clinic_db(config.data_dir)
    try:
        current = PatientContext(db, config.patient.idle_timeout_s).current(dt.datetime.now(dt.timezone.utc))
    finally:
        db.conn.close()
    assert current is not None and current.patient_id == VALID_ID and current.stat, "张三's session was ended"
    alert = re.search(r'<p class="error" role="alert"[^>]*>([^<]*)</p>', reply.body)
    assert reply.status == 400 and alert and VALID_ID in alert.group(1), "the doctor is told who is checked in now"
    # the page showing 张三 ends her session
    reply = doctor.post("/today/end-session", end_session_form(doctor))
    assert reply.status == 303 and "done=end-session" in reply.location


# -- a reset cart clock: the doctor is told to set it ------------------------------------------------


def test_an_ecg_from_a_cart_whose_clock_was_reset_tells_the_doctor_to_set_the_clock(tmp_path: Path) -> None:
    """The Contec cart's clock battery went flat: its ECG, imported from its stick, is dated
    2000-01-01. Today showed it like any other ECG and the cart kept dating every ECG 2000. Now
    Today says, in Chinese and in English, that the cart's clock needs setting."""
    from firmware_bridge.usb_import import import_paths
    from lastmile.ecg.intake import file_enqueuer
    from tests.conftest import shared_file

    stick = tmp_path / "stick"
    stick.mkdir()
    cart_file = shared_file("ecg", "contec", "0000037.ECG").read_bytes()
    (stick / "0000037.ECG").write_bytes(cart_file.replace(b"2020-11-15 12:59:50", b"2000-01-01 00:00:00"))
    config = console_config(tmp_path / "data")
    with open_outbox(config) as outbox:
        summary = import_paths(
            [stick],
            is_known=lambda key: outbox.find(key) is not None,
            enqueue=file_enqueuer(outbox, config),
            local_tz=dt.timezone(dt.timedelta(hours=8)),
            now=lambda: dt.datetime.now(dt.timezone.utc),
        )
    assert summary.imported == 1, summary.line()
    with running_console(config) as server:
        for language, words in (("zh-CN", "心电图机的时钟不对"), ("en", "The ECG cart's clock is wrong")):
            client = Client(server.url, language=language)
            client.login()
            page = html.unescape(client.get("/today").body)
            assert 'data-device-clock="wrong"' in page
            assert words in page


# -- a held ECG's assign whose worker fails: "try again", never "too late: sent already" ------------

FAILING_WORKERS = {
    # the worker cannot import what it needs (REV-R: a devices.py in the console's directory)
    "import-error": "import lastmile_no_such_module",
    "timeout": "import time; time.sleep(60)",  # a Pi under load, with WORKER_TIMEOUT_S cut short here
    "no-answer": "print('Segmentation fault')",  # exits 0 with no JSON: killed mid-answer, or noise
}


def zhang_san_checked_in(url: str) -> Client:
    """A doctor logged in to the console at `url`, 张三 checked in on Today."""
    doctor = Client(url)
    doctor.login()
    assert doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
    return doctor


def assign_to_zhang_san(doctor: Client, item_id: int) -> tuple[Reply, str]:
    """The doctor presses Assign for the held ECG `item_id`, typed 张三's number: the reply, the page it shows."""
    reply = doctor.post("/today/assign-ecg", {"item_id": str(item_id), "patient_id": VALID_ID})
    return reply, doctor.get(reply.location).body if reply.status == 303 else reply.body


@pytest.mark.parametrize("failure", list(FAILING_WORKERS))
def test_a_held_ecg_whose_assign_worker_fails_says_try_again_and_stays_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The console's DICOM worker rebuilds a held ECG under the patient assigned. Any failure of
    it (crash, import error, timeout) was read as "no longer held": Today said "too late: sent already",
    while the ECG was still held and went to the county as 无患者 when its hold ended. The doctor
    is told it was not assigned and to try again, and the ECG is still held, still offered;
    "too late" stays for an ECG really no longer held."""
    import sys

    from lastmile.console import stores

    monkeypatch.setattr(stores, "WORKER_TIMEOUT_S", 1.0)
    config = console_config(tmp_path / "data")
    with open_outbox(config) as outbox:
        held_id = enqueue_recording(
            outbox, make_recording(7, patient=None), config, key="held", now=time.time()
        ).item.id
        gone_id = enqueue_recording(
            outbox, make_recording(8, patient=None), config, key="gone", now=time.time()
        ).item.id
        assert outbox.release_hold(gone_id, time.time())  # "send anyway" on another tablet: no longer held
        worker = [sys.executable, "-c", FAILING_WORKERS[failure]]
        held_ecgs = stores.OutboxHeldEcgs(outbox, config, worker=worker)
        with running_console(config, held_ecgs=held_ecgs) as server:
            doctor = zhang_san_checked_in(server.url)
            reply, page = assign_to_zhang_san(doctor, held_id)
            too_late = doctor.post("/today/assign-ecg", {"item_id": str(gone_id), "patient_id": VALID_ID})
            # he tries again, and it fails again (it would every time): whom to call
            _again, page_again = assign_to_zhang_san(doctor, held_id)
        item = outbox.get(held_id)
    assert reply.status == 303 and "done=assign-failed" in reply.location, (reply.status, reply.location)
    answer = html.unescape(page.split('id="done-notice">', 1)[1].split("</p>", 1)[0])
    assert "没有指定成功，心电图还在等待，请再试一次" in answer and "太晚了" not in answer, answer
    assert item is not None and item.held(time.time()) and item.patient is None, item
    assert f'name="item_id" value="{held_id}"' in page, "its Assign form is still on Today"
    assert too_late.status == 303 and "done=too-late" in too_late.location, (too_late.status, too_late.location)
    assert "县信息科" not in answer, answer  # the first failure: only "try again"
    answer_again = html.unescape(page_again.split('id="done-notice">', 1)[1].split("</p>", 1)[0])
    assert "请再试一次" in answer_again and "如仍失败，请联系县信息科" in answer_again, answer_again


# the real worker's assign, committed, and then no answer: a Pi under load, the console's timeout
ASSIGNS_THEN_HANGS = (
    "import json, sys, time\n"
    "from lastmile.console.dicom_worker import assign_ecg\n"
    "assign_ecg(json.load(sys.stdin))\n"
    "time.sleep(60)\n"
)


@pytest.mark.parametrize(
    ("quality_held", "said"),
    [
        (True, f"已指定给 张三（{VALID_ID}）；此心电图质量待定，请选择“需要重做”或“仍然发送”。"),
        (False, f"已指定给 张三（{VALID_ID}），将以该患者的名义发送到县里。"),
    ],
    ids=["re-record-verdict", "good-recording"],
)
def test_a_held_ecg_assigned_by_a_worker_that_then_times_out_says_assigned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quality_held: bool, said: str
) -> None:
    """The worker saved the assign to 张三, then did not answer in time (a loaded Pi). Today said
    "not assigned, try again" (held for its quality) or "too late: sent already" (released): the
    doctor records again - a second study - though the ECG IS 张三's. What the item carries is what
    Today says: assigned to 张三."""
    import sys

    from lastmile.console import stores

    monkeypatch.setattr(stores, "WORKER_TIMEOUT_S", 10.0)  # the assign is done well within it, then it hangs
    config = console_config(tmp_path / "data")
    good = read_ecg_file(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"))
    recording = make_recording(10, patient=None) if quality_held else dataclasses.replace(good, patient=None)
    with open_outbox(config) as outbox:
        held_id = enqueue_recording(outbox, recording, config, key="held", now=time.time()).item.id
        held_ecgs = stores.OutboxHeldEcgs(outbox, config, worker=[sys.executable, "-c", ASSIGNS_THEN_HANGS])
        with running_console(config, held_ecgs=held_ecgs) as server:
            doctor = zhang_san_checked_in(server.url)
            reply, page = assign_to_zhang_san(doctor, held_id)
        item = outbox.get(held_id)
    assert item is not None and item.patient is not None and item.patient["patient_id"] == VALID_ID, item
    assert reply.status == 303 and "done=assigned" in reply.location, (reply.status, reply.location)
    assert done_said(page) == said


NAME_HOLD_ANSWERS = ["checked-in-name", "name-right"]  # "是 张三 的" / "李四 是对的"


@pytest.mark.parametrize("failure", list(FAILING_WORKERS))
@pytest.mark.parametrize("answer", NAME_HOLD_ANSWERS)
def test_an_ecg_held_for_its_name_whose_answer_worker_fails_says_try_again_and_is_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str, failure: str
) -> None:
    """张三 is checked in; the cart's ECG names his ID under 李四: held for its name. The doctor
    answers "it is 张三's" or "李四 is right", and the worker fails. Today says "not assigned, try
    again" (never an Internal Server Error), the ECG still waits for his answer, and the audit
    trail has the answer that failed."""
    import sys

    from lastmile.console import stores
    from lastmile.ecg.holds import NAME_MISMATCH

    monkeypatch.setattr(stores, "WORKER_TIMEOUT_S", 1.0)
    config = console_config(tmp_path / "data")
    with open_outbox(config) as outbox:
        held_ecgs = stores.OutboxHeldEcgs(outbox, config, worker=[sys.executable, "-c", FAILING_WORKERS[failure]])
        with running_console(config, held_ecgs=held_ecgs) as server:
            doctor = zhang_san_checked_in(server.url)
            rec = with_patient_check(
                make_recording(7, patient=Patient(VALID_ID, "李四")), frozenset({VALID_ID}), "张三"
            )
            held_id = enqueue_recording(
                outbox, rec, config, key="name-held", now=time.time(), checked_in_name="张三"
            ).item.id
            assert f'data-answer="{answer}"' in doctor.get("/today").body, "Today asks whose ECG it is"
            reply = doctor.post(f"/today/ecg/{held_id}/{answer}")
            page = doctor.get(reply.location).body if reply.status == 303 else reply.body
        item = outbox.get(held_id)
    no_server_error(reply, f"POST /today/ecg/E/{answer} with a failing worker")
    assert reply.status == 303 and "done=assign-failed" in reply.location, (reply.status, reply.location)
    said = html.unescape(page.split('id="done-notice">', 1)[1].split("</p>", 1)[0])
    assert "没有指定成功，心电图还在等待，请再试一次" in said, said
    assert item is not None and item.held(time.time()) and item.hold_reason == NAME_MISMATCH, item
    db = open_clinic_db(config.data_dir)
    try:
        audited = AuditLog(db).recent(5, action=f"ecg-{answer}")
    finally:
        db.conn.close()
    assert [e.detail.get("failed") for e in audited] == [True], audited


def test_a_held_ecg_whose_hold_ends_while_its_worker_hangs_is_not_said_to_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doctor assigns an ECG held for its missing patient; the worker hangs (a loaded Pi) and
    the hold ends meanwhile: the forwarder sends it as 无患者. Today said "still waiting, try
    again" (held at the request's time); it says what is true when the worker gave up."""
    import sys

    from lastmile.console import stores

    hold_s = 5.0
    monkeypatch.setattr(stores, "WORKER_TIMEOUT_S", hold_s + 1.0)
    config = console_config(tmp_path / "data")
    config.patient.unassigned_ecg_hold_s = hold_s
    config.ecg.re_record_hold_s = 0  # held for its patient only
    with open_outbox(config) as outbox:
        held_ecgs = stores.OutboxHeldEcgs(outbox, config, worker=[sys.executable, "-c", FAILING_WORKERS["timeout"]])
        with running_console(config, held_ecgs=held_ecgs) as server:
            doctor = zhang_san_checked_in(server.url)
            held_id = enqueue_recording(outbox, make_recording(7, patient=None), config, key="held").item.id
            reply = doctor.post("/today/assign-ecg", {"item_id": str(held_id), "patient_id": VALID_ID})
        item = outbox.get(held_id)
    assert item is not None and item.hold_until is not None and item.patient is None
    assert reply.status == 303 and "done=too-late" in reply.location, (reply.status, reply.location)
