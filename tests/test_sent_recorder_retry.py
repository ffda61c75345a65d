"""The sent-study recorder keeps what clinic.db refused and tries again (lastmile.reports.sent)."""

from __future__ import annotations

import sqlite3
import threading
import time
from types import SimpleNamespace

import pytest
from pydicom.uid import generate_uid

from lastmile.config import Config
from lastmile.doctor import Doctor, Level
from lastmile.reports import sent as sent_module
from lastmile.reports.sent import SentStudyRecorder
from lastmile.reports.store import RECORDER_STATUS, ReportStore
from tests.waiting import wait_for
from uploader.outbox import Kind, Priority


@pytest.fixture
def store(tmp_path):
    with ReportStore.open(tmp_path / "data") as s:
        yield s


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch) -> None:
    monkeypatch.setattr(sent_module, "RETRY_FIRST_S", 0.05)
    monkeypatch.setattr(sent_module, "RETRY_MAX_S", 0.2)


class SentItems:
    """The outbox as the recorder reads it: the items the forwarder reports sent."""

    def __init__(self) -> None:
        self.items: dict[int, SimpleNamespace] = {}

    def get(self, item_id: int) -> SimpleNamespace | None:
        return self.items.get(item_id)


def send(recorder: SentStudyRecorder, outbox: SentItems, uid: str, item_id: int = 1) -> None:
    """The forwarder's "sent" event for an ECG item of study `uid` (the observer's own way in)."""
    outbox.items[item_id] = SimpleNamespace(
        id=item_id,
        key=f"dicom:{uid}",  # the record keeps its item's key (lastmile.reports.store.is_record_of)
        kind=Kind.DICOM,
        meta={"study_uid": uid, "acquired_at": "2027-01-01T08:00:00+08:00"},
        patient={"patient_id": "P1"},
        created_at=time.time(),
        priority=Priority.ROUTINE,
        committed_at=None,
    )
    recorder.on_event("sent", {"id": item_id})


def refusing(store: ReportStore, monkeypatch, times: int) -> list[int]:
    """clinic.db refuses the first `times` writes of sent studies ("database is locked")."""
    real, calls = store.record_sent_many, []

    def busy(studies):
        if studies:
            calls.append(len(studies))
            if len(calls) <= times:
                raise sqlite3.OperationalError("database is locked")
        return real(studies)

    monkeypatch.setattr(store, "record_sent_many", busy)
    return calls


def test_the_writer_thread_retries_a_refused_batch_merged_with_later_ones(store, monkeypatch) -> None:
    # clinic.db refuses until the second study is kept with the first (`refused` cleared): a count of
    # refusals raced the test sending the second one under load (the third try wrote the first alone)
    refused, calls, real = threading.Event(), [], store.record_sent_many
    refused.set()

    def busy(studies):
        if studies:
            calls.append(len(studies))
            if refused.is_set():
                raise sqlite3.OperationalError("database is locked")
        return real(studies)

    monkeypatch.setattr(store, "record_sent_many", busy)
    woken = threading.Event()
    outbox = SentItems()
    recorder = SentStudyRecorder(outbox, store, on_new_study=woken.set)  # type: ignore[arg-type]
    recorder.start()
    try:
        first, second = generate_uid(), generate_uid()
        send(recorder, outbox, first)
        # `lastmile doctor` sees it: the status row, written after the record is kept (not at once)
        wait_for(lambda: (store.status(RECORDER_STATUS) or {}).get("waiting") == 1)
        send(recorder, outbox, second, item_id=2)
        wait_for(lambda: recorder.waiting == 2)
        refused.clear()
        wait_for(lambda: store.study(first) is not None and store.study(second) is not None)
        # the writer thread says so after the write commits: wait for it, not at the same instant
        wait_for(lambda: woken.is_set() and recorder.waiting == 0)
        assert recorder.dropped == 0 and calls[-1] == 2  # the kept record went with the later one
        wait_for(lambda: (store.status(RECORDER_STATUS) or {}).get("waiting") == 0)
    finally:
        recorder.stop()


def test_stop_tries_once_more_and_the_kept_records_are_capped(store, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(sent_module, "KEEP_MAX", 3)
    refusing(store, monkeypatch, times=10**6)
    outbox = SentItems()
    recorder = SentStudyRecorder(outbox, store)  # type: ignore[arg-type]
    for n in range(5):
        send(recorder, outbox, generate_uid(), item_id=n)
    assert recorder.drain() == 0
    assert recorder.waiting == 3 and recorder.dropped == 2
    recorder.stop()  # refused again: given up, and said so
    assert recorder.waiting == 0 and recorder.dropped == 5
    status = store.status(RECORDER_STATUS) or {}
    assert status["dropped"] == 5 and status["waiting"] == 0

    config = Config()
    config.set_data_dir(tmp_path / "data")
    findings = Doctor(config, now=time.time).check_reports()
    (lost,) = [f for f in findings if f.level is Level.FAIL]
    assert "5 sent ECG(s) could not be recorded" in lost.message


def test_stop_writes_what_was_refused_once(store, monkeypatch) -> None:
    refusing(store, monkeypatch, times=1)
    outbox = SentItems()
    recorder = SentStudyRecorder(outbox, store)  # type: ignore[arg-type]
    uid = generate_uid()
    send(recorder, outbox, uid)
    recorder.drain()
    assert recorder.waiting == 1 and store.study(uid) is None
    recorder.stop()
    assert store.study(uid) is not None and recorder.waiting == 0 and recorder.dropped == 0


def test_what_the_stop_could_not_write_is_saved_and_written_by_the_next_start(store, monkeypatch, tmp_path) -> None:
    side_file = tmp_path / "data" / sent_module.UNWRITTEN_NAME
    refusing(store, monkeypatch, times=10**6)
    outbox = SentItems()
    recorder = SentStudyRecorder(outbox, store, unwritten_file=side_file)  # type: ignore[arg-type]
    uids = [generate_uid(), generate_uid()]
    for n, uid in enumerate(uids):
        send(recorder, outbox, uid, item_id=n)
    recorder.stop()  # clinic.db still refuses: saved, not dropped
    assert recorder.dropped == 0 and len(side_file.read_text().splitlines()) == 2
    assert not side_file.with_name(f".{side_file.name}.tmp").exists()

    monkeypatch.undo()  # clinic.db takes writes again
    # the next start: purged items (retention_days 0) give backfill nothing, the side file gives them
    again = SentStudyRecorder(SentItems(), store, unwritten_file=side_file)  # type: ignore[arg-type]
    assert again.write_left_by_last_stop() == 2
    again.start()
    try:
        assert all(store.study(uid) is not None for uid in uids)
        study = store.study(uids[0])
        assert study is not None and study.patient_id == "P1" and study.item_key == f"dicom:{uids[0]}"
        assert not side_file.exists()
        assert again.dropped == 0 and int((store.status(RECORDER_STATUS) or {}).get("dropped") or 0) == 0
    finally:
        again.stop()
    assert not side_file.exists()  # nothing left: no write at the stop


def test_a_side_file_still_refused_at_start_stays_until_written(store, monkeypatch, tmp_path) -> None:
    side_file = tmp_path / "data" / sent_module.UNWRITTEN_NAME
    outbox, uid = SentItems(), generate_uid()
    send(SentStudyRecorder(outbox, store), outbox, uid)  # type: ignore[arg-type]
    side_file.write_text(sent_module.unwritten_line(_study(outbox, uid)) + "\n")
    refusing(store, monkeypatch, times=1)
    recorder = SentStudyRecorder(SentItems(), store, unwritten_file=side_file)  # type: ignore[arg-type]
    assert recorder.write_left_by_last_stop() == 1
    assert store.study(uid) is None and recorder.waiting == 1 and side_file.exists()
    recorder.start()
    try:
        wait_for(lambda: store.study(uid) is not None and not side_file.exists())
    finally:
        recorder.stop()
    assert recorder.dropped == 0


def _study(outbox: SentItems, uid: str) -> sent_module.SentStudy:
    item = next(i for i in outbox.items.values() if i.meta["study_uid"] == uid)
    study = SentStudyRecorder.study_of(item, None, sent_module.utc_now())  # type: ignore[arg-type]
    assert study is not None
    return study


def test_a_damaged_side_file_is_set_aside_and_said_never_a_crash(store, tmp_path, caplog) -> None:
    side_file = tmp_path / "data" / sent_module.UNWRITTEN_NAME
    outbox, uid = SentItems(), generate_uid()
    send(SentStudyRecorder(outbox, store), outbox, uid)  # type: ignore[arg-type]
    good = sent_module.unwritten_line(_study(outbox, uid))
    side_file.write_bytes(good.encode() + b'\n{"study_uid": "1.2", "sent_at": 3}\n\xff\xfenot json\n')
    recorder = SentStudyRecorder(SentItems(), store, unwritten_file=side_file)  # type: ignore[arg-type]
    assert recorder.write_left_by_last_stop() == 1  # the readable line is written all the same
    assert store.study(uid) is not None
    assert not side_file.exists()
    (aside,) = side_file.parent.glob(f"{side_file.name}.damaged-*")
    assert aside.read_bytes().startswith(good.encode())
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("damaged" in m and str(aside) in m for m in errors), errors

    side_file.write_bytes(b"\x00" * 64)  # nothing readable at all
    again = SentStudyRecorder(SentItems(), store, unwritten_file=side_file)  # type: ignore[arg-type]
    assert again.write_left_by_last_stop() == 0
    assert not side_file.exists()


def test_damaged_side_files_set_aside_over_years_are_capped_the_sd_card_never_fills(store, tmp_path) -> None:
    """Each start that found the side file damaged set it aside as a new `.damaged-<time>` copy and
    none was ever removed: over years of stops and starts they filled the SD card. Now only the
    newest few stay (uploader.unwritten_records.KEEP_ASIDE), older ones - an older version's
    too - removed."""
    from uploader.unwritten_records import KEEP_ASIDE

    side_file = tmp_path / "data" / sent_module.UNWRITTEN_NAME
    year_ago = int(time.time()) - 365 * 86400
    earlier = [side_file.with_name(f"{side_file.name}.damaged-{year_ago + n * 86400}") for n in range(KEEP_ASIDE + 2)]
    for copy in earlier:
        copy.write_bytes(b"\x00" * 64)
    side_file.write_bytes(b"\x00" * 64)
    assert SentStudyRecorder(SentItems(), store, unwritten_file=side_file).write_left_by_last_stop() == 0  # type: ignore[arg-type]
    kept = sorted(side_file.parent.glob(f"{side_file.name}.damaged-*"))
    assert len(kept) == KEEP_ASIDE, kept
    assert kept[:-1] == earlier[-(KEEP_ASIDE - 1) :]  # the newest earlier ones, and today's


def test_doctor_says_the_records_a_stop_saved_for_the_next_start_and_a_damaged_copy(
    store, monkeypatch, tmp_path
) -> None:
    side_file = tmp_path / "data" / sent_module.UNWRITTEN_NAME
    refusing(store, monkeypatch, times=10**6)
    outbox = SentItems()
    recorder = SentStudyRecorder(outbox, store, unwritten_file=side_file)  # type: ignore[arg-type]
    for n in range(2):
        send(recorder, outbox, generate_uid(), item_id=n)
    recorder.stop()  # clinic.db still refuses: saved for the next start
    config = Config()
    config.set_data_dir(tmp_path / "data")
    (kept,) = [f for f in Doctor(config, now=time.time).check_data_partition() if f.topic == "left-by-stop"]
    assert kept.level is Level.WARN and f"2 sent-study record(s) clinic.db did not take ({side_file})" in kept.message

    side_file.write_bytes(b"\x00" * 64)  # damaged on the SD card: the next start sets it aside
    assert SentStudyRecorder(SentItems(), store, unwritten_file=side_file).write_left_by_last_stop() == 0  # type: ignore[arg-type]
    (aside,) = side_file.parent.glob(f"{side_file.name}.damaged-*")
    found = {f.topic: f for f in Doctor(config, now=time.time).check_data_partition()}
    assert "left-by-stop" not in found and str(aside) in found["damaged-copy"].message, found
