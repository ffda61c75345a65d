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
