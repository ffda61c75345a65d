"""Which studies did we send: the forwarder's "sent" events → `sent_studies` in clinic.db.

The forwarder knows nothing of clinic.db: the forward service hands it `SentStudyRecorder.on_event`
as its observer. The observer runs on the send threads, between C-STOREs, so it only takes a
snapshot (the outbox item: study UID, patient, STAT; the payload file's bytes, from the page cache
— the purge deletes them after commitment) and queues it; no write, no fsync. A small thread reads
the ECG's own acquisition time and accession from those bytes and writes the records in batches
(one fsync per batch, off the send path). Items still in the outbox at start
(a crash before a batch was written) are recorded by `backfill`.

A batch clinic.db refuses (busy past its busy timeout, the disk briefly full, an I/O error) is
kept - as records: the snapshots are taken, so the purge at commitment (outbox.retention_days 0)
cannot take anything from it, and `backfill` would find nothing - and retried by the writer
thread with a capped backoff, merged with the batches that come meanwhile; `stop`/`drain` try
it once more. At most KEEP_MAX records are kept (the oldest beyond are dropped, logged). Each
failure is logged at ERROR with the count waiting, shown in the forward service's status line
(`waiting`) and, as far as clinic.db lets us, in the RECORDER_STATUS row `lastmile doctor` reads.

What clinic.db still refuses at the stop (another process holding its lock past the stop's one
second) is not waited for - the stop stays prompt - but saved to a small side file in the data
directory (`UNWRITTEN_NAME`, JSON lines, written whole or not at all: temporary file, fsync,
rename), only then: no write at all on a stop with nothing left. The next start writes it into
clinic.db first (`write_left_by_last_stop`), then removes it: with outbox.retention_days 0 the
committed ECG is purged by then, and `backfill` would find nothing. A damaged side file is
logged at ERROR and set aside, the newest few such copies kept (its readable lines are written
all the same); it never stops the start. The file is an `uploader.unwritten_records` file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from lastmile.clinic.db import utc_now
from lastmile.data_dir import SENT_STUDIES_UNWRITTEN
from lastmile.reports.store import RECORDER_STATUS, ReportStore, SentStudy, is_record_of, is_surely_item_of
from uploader.errors import UploadError
from uploader.outbox import ItemState, Kind, Outbox, OutboxItem, Priority
from uploader.report_reading import dicom_datetime_iso
from uploader.sqlite_store import gave_up_at_stop
from uploader.unwritten_records import UnwrittenRecords

log = logging.getLogger(__name__)

BATCH_WINDOW_S = 0.25  # sent events within this go into one transaction
BATCH_MAX = 200
COMMITMENT_NOTE_S = 30.0  # commitment times are copied at most this often
KEEP_MAX = 5000  # records clinic.db refused, kept for the next try (a few hundred bytes each)
RETRY_FIRST_S = 1.0  # the backoff between tries of a refused batch: doubled up to RETRY_MAX_S
RETRY_MAX_S = 60.0
UNWRITTEN_NAME = SENT_STUDIES_UNWRITTEN  # in the data directory: what a stop could not write
UNWRITTEN_WHAT = "sent-study records the last stop saved"
UNWRITTEN_LOST = "the reports of those not readable will not be asked for"
ECG_FACT_TAGS = ["AcquisitionDateTime", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription"]
_STOP = object()


def ecg_facts(payload: bytes) -> dict[str, str]:
    """The ECG's acquisition time (ISO, with its offset), accession and description; {} if the
    payload cannot be read (the record then falls back to when the item was queued)."""
    try:
        ds = dcmread(io.BytesIO(payload), specific_tags=ECG_FACT_TAGS)
    except (OSError, InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
        log.debug("cannot read the ECG facts from a payload: %s", exc)
        return {}
    when = dicom_datetime_iso(ds.get("AcquisitionDateTime"))
    if not when and ds.get("StudyDate"):
        when = dicom_datetime_iso(f"{ds.get('StudyDate')}{ds.get('StudyTime', '')}")
    return {
        "ecg_time": when,
        "accession": str(ds.get("AccessionNumber", "") or ""),
        "description": str(ds.get("StudyDescription", "") or ""),
    }


def sent_study_of(item: OutboxItem, facts: dict[str, str], sent_at: dt.datetime) -> SentStudy | None:
    study_uid = str(item.meta.get("study_uid") or "")
    if not study_uid:
        return None
    patient = item.patient or {}
    queued = dt.datetime.fromtimestamp(item.created_at, dt.timezone.utc).isoformat()
    quality = item.meta.get("quality")
    return SentStudy(
        study_uid=study_uid,
        sent_at=sent_at,
        stat=item.priority == Priority.STAT,
        patient_id=str(patient.get("patient_id") or ""),
        patient_name=str(patient.get("name") or ""),
        ecg_time=str(item.meta.get("acquired_at") or "") or facts.get("ecg_time") or queued,
        accession=facts.get("accession", ""),
        description=facts.get("description", ""),
        sop_instance_uid=str(item.meta.get("sop_instance_uid") or ""),
        outbox_item_id=item.id,
        item_key=item.key,  # what ties the record to this item, not to a reused item id (is_record_of)
        committed_at=(
            dt.datetime.fromtimestamp(item.committed_at, dt.timezone.utc) if item.committed_at is not None else None
        ),
        quality_verdict=str(quality.get("verdict") or "") if isinstance(quality, dict) else "",
        device=str(item.meta.get("device") or ""),
    )


_DATETIME_FIELDS = {"sent_at", "committed_at", "final_at", "last_polled_at"}


def unwritten_line(study: SentStudy) -> str:
    """One record of the side file: its fields, times in ISO form."""
    fields = dataclasses.asdict(study)
    for name in _DATETIME_FIELDS:
        if fields[name] is not None:
            fields[name] = fields[name].isoformat()
    fields["awaiting"] = list(study.awaiting)
    return json.dumps(fields, ensure_ascii=False, sort_keys=True)


def unwritten_study(line: str) -> SentStudy:
    """The record of a side file's line; ValueError/TypeError/KeyError if it is not one."""
    fields = json.loads(line)
    if not isinstance(fields, dict) or not isinstance(fields.get("study_uid"), str) or not fields["study_uid"]:
        raise ValueError("not a sent-study record")
    if not isinstance(fields.get("sent_at"), str):
        raise ValueError("a sent-study record without its sending time")
    known = {f.name for f in dataclasses.fields(SentStudy)}
    fields = {name: value for name, value in fields.items() if name in known}
    for name in _DATETIME_FIELDS & fields.keys():
        if fields[name] is not None:
            fields[name] = dt.datetime.fromisoformat(fields[name])
    fields["awaiting"] = tuple(fields.get("awaiting") or ())
    return SentStudy(**fields)


class SentStudyRecorder:
    """Forwarder observer (`on_event`) that keeps the sent-study records, off the send path."""

    def __init__(
        self,
        outbox: Outbox,
        store: ReportStore,
        *,
        on_new_study: Callable[[], None] | None = None,
        clock: Callable[[], dt.datetime] = utc_now,
        unwritten_file: Path | None = None,
    ) -> None:
        """`unwritten_file`: where the stop saves what clinic.db still refuses, for the next start
        (`UNWRITTEN_NAME` in the data directory); None: dropped (logged), as in the demo."""
        self.outbox = outbox
        self.store = store
        self.on_new_study = on_new_study or (lambda: None)
        self.clock = clock
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._commitments_pending = False
        self._last_commitment_note = 0.0
        self.recorded = 0
        # the records clinic.db refused, retried with a backoff (the writer thread; drain/stop)
        self._write_lock = threading.Lock()
        self._kept: list[SentStudy] = []
        self._retry_s = 0.0
        self._retry_at = 0.0
        self.failing_since: float | None = None  # wall clock of the first refusal, None when written
        self.last_error = ""
        self.dropped = 0  # records given up (beyond KEEP_MAX, or still refused at stop)
        self._drops_unreported = 0  # dropped but not yet added to the status row
        self._last_drop_at: float | None = None
        self._given_up_at_stop = False  # the last refusal was the service's stop giving up a wait
        self.unwritten_file = unwritten_file
        self._unwritten = None if unwritten_file is None else UnwrittenRecords(unwritten_file, what=UNWRITTEN_WHAT)
        self._unwritten_on_disk = False  # the file holds records not yet in clinic.db: removed once they are
        self._left_by_last_stop = 0  # records the last stop saved: waiting in its status row, not dropped

    @property
    def waiting(self) -> int:
        """Sent studies whose record clinic.db refused so far, kept for the next try."""
        return len(self._kept)

    # -- the observer (send threads) ---------------------------------------------------------
    def on_event(self, kind: str, info: dict[str, Any]) -> None:
        try:
            if kind == "sent" and "id" in info:
                # snapshot now: once committed, the item may be purged (meta and patient wiped)
                item = self.outbox.get(int(info["id"]))
                if item is not None and item.kind == Kind.DICOM and item.meta:
                    self._queue.put(("sent", self.snapshot(item), self.clock()))
            elif kind == "committed" and info.get("committed"):
                self._queue.put(("committed", None, self.clock()))
        except Exception:  # an observer must never break a send
            log.exception("could not note a sent study")

    # -- the writer thread ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._settle_earlier_status()
            self._thread = threading.Thread(target=self._run, name="sent-studies", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout_s)
        self.drain()  # whatever came after the thread stopped, and what clinic.db refused: once more
        with self._write_lock:
            if self._kept and self._saved_for_next_start(self._kept):
                self._note_status()  # waiting: for the next start
                self._kept = []
            if self._kept:
                lost, self._kept = len(self._kept), []
                if self._given_up_at_stop:  # another process's lock: no fault of clinic.db's
                    self._drop(
                        lost, "the stop gave up waiting for another process's lock on clinic.db", logging.WARNING
                    )
                else:
                    self._drop(lost, "clinic.db still refused them at stop")
                self._note_status()

    def _run(self) -> None:
        while True:
            try:
                if not self._run_once():
                    return
            except Exception:  # the writer must not die: what it keeps would never be written
                log.exception("sent-study writer: unexpected error")
                time.sleep(RETRY_FIRST_S)

    def _wait_s(self) -> float | None:
        waits = [COMMITMENT_NOTE_S] if self._commitments_pending else []
        if self._kept:
            waits.append(max(0.0, self._retry_at - time.monotonic()))
        return min(waits) if waits else None

    def _run_once(self) -> bool:
        """One batch (or one retry); False once stopped."""
        try:
            first = self._queue.get(timeout=self._wait_s())
        except queue.Empty:
            self._write([])  # the deferred commitment note, the retry of what clinic.db refused
            return True
        if first is _STOP:
            return False
        batch = [first]
        # what else comes within BATCH_WINDOW_S goes in the same transaction (one fsync): a
        # chunk of C-STOREs becomes one write, not one per ECG. The snapshots are taken
        # already, so the purge cannot take anything from us meanwhile.
        deadline = time.monotonic() + BATCH_WINDOW_S
        while len(batch) < BATCH_MAX:
            try:
                more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if more is _STOP:
                self._write(batch)
                return False
            batch.append(more)
        self._write(batch)
        return True

    def drain(self) -> int:
        """Write what is queued now (tests, close), the pending commitment note included."""
        batch = []
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is not _STOP:
                batch.append(entry)
        self._commitments_pending |= any(what == "committed" for what, _s, _a in batch)
        return self._write(batch, note_now=True, retry_now=True)

    def _write(
        self, batch: list[tuple[str, Any, dt.datetime]], *, note_now: bool = False, retry_now: bool = False
    ) -> int:
        with self._write_lock:
            new = self._write_locked(batch, note_now=note_now, retry_now=retry_now)
        if new:
            self.on_new_study()
        return new

    def _write_locked(self, batch: list[tuple[str, Any, dt.datetime]], *, note_now: bool, retry_now: bool) -> int:
        studies = self._kept + self._studies_of(batch)
        self._commitments_pending |= any(what == "committed" for what, _s, _a in batch)
        if self._kept and not retry_now and time.monotonic() < self._retry_at:
            self._kept = self._capped(studies)  # clinic.db refused the last try: wait out the backoff
            return 0
        try:
            new = self.store.record_sent_many(studies)
        except Exception as exc:  # noqa: BLE001 — logged in _refused (the trace once); whatever it is, keep them
            # never lost silently: kept (records, not the outbox item: that may be purged already),
            # retried with a backoff by the writer thread, merged with what comes meanwhile
            self._refused(studies, exc)
            return 0
        self._kept = []
        if self._unwritten_on_disk:
            self._remove_unwritten()
        self.recorded += new
        if new:
            log.info("%d sent stud(ies) recorded", new)
        if self.failing_since is not None:
            log.warning(
                "sent-study records written again (clinic.db refused them for %.0f s)",
                time.time() - self.failing_since,
            )
            self.failing_since, self._retry_s, self.last_error = None, 0.0, ""
            self._note_status()
        # commitment times are a nicety: copied at most every COMMITMENT_NOTE_S (one write)
        due = time.monotonic() - self._last_commitment_note >= COMMITMENT_NOTE_S
        if self._commitments_pending and (due or note_now):
            self._commitments_pending = False
            self._last_commitment_note = time.monotonic()
            try:
                self.note_commitments()
            except Exception:
                self._commitments_pending = True  # the next note copies them
                log.exception("could not copy commitment times to the sent-study records")
        return new

    def _studies_of(self, batch: list[tuple[str, Any, dt.datetime]]) -> list[SentStudy]:
        """The records of a batch's snapshots (their bytes are not kept: a record is small)."""
        studies = []
        for what, snap, at in batch:
            if what != "sent":
                continue
            try:
                study = self.study_of(snap[0], snap[1], at)
            except Exception:  # one snapshot we cannot read must not hold up the others
                log.exception("cannot make the sent-study record of outbox item %s", getattr(snap[0], "id", "?"))
                continue
            if study is not None:
                studies.append(study)
        return studies

    def _capped(self, studies: list[SentStudy]) -> list[SentStudy]:
        if len(studies) <= KEEP_MAX:
            return studies
        lost = len(studies) - KEEP_MAX
        self._drop(lost, f"clinic.db refused them for too long (at most {KEEP_MAX} are kept)")
        return studies[lost:]  # the newest are kept

    def _drop(self, lost: int, why: str, level: int = logging.ERROR) -> None:
        self.dropped += lost
        self._drops_unreported += lost
        self._last_drop_at = time.time()
        log.log(
            level,
            "%d sent-study record(s) DROPPED: %s; their reports will not be asked for "
            "(backfill at the next start records those still in the outbox)",
            lost,
            why,
        )

    def _refused(self, studies: list[SentStudy], exc: Exception) -> None:
        first = self.failing_since is None
        if first:
            self.failing_since = time.time()
        self._kept = self._capped(studies)
        self._retry_s = min(RETRY_MAX_S, max(RETRY_FIRST_S, self._retry_s * 2))
        self._retry_at = time.monotonic() + self._retry_s
        self.last_error = f"{type(exc).__name__}: {exc}"
        # a write the stop gave up (another process held clinic.db's lock) is expected: no trace
        self._given_up_at_stop = gave_up_at_stop(exc)
        log.log(
            logging.INFO if self._given_up_at_stop else logging.ERROR,
            "could not record sent studies in clinic.db (%s): %d waiting, kept and tried again in %g s; "
            "their reports are not asked for until then",
            self.last_error,
            len(self._kept),
            self._retry_s,
            exc_info=first and not self._given_up_at_stop,
        )
        self._note_status()

    def _note_status(self) -> None:
        """The RECORDER_STATUS row `lastmile doctor` reads, as far as clinic.db lets us (best effort:
        it may refuse this write as well; the log and the service's status line have it then)."""
        try:
            earlier = self.store.status(RECORDER_STATUS) or {}
            value = {
                "waiting": len(self._kept),
                "failing_since": self.failing_since,
                "error": self.last_error or None,
                "dropped": int(earlier.get("dropped") or 0) + self._drops_unreported,
                "dropped_at": self._last_drop_at or earlier.get("dropped_at"),
            }
            self.store.set_status(RECORDER_STATUS, value, self.clock())
            self._drops_unreported = 0
        except Exception as exc:  # noqa: BLE001 — best effort: the log and the status line have it
            log.debug("cannot note the sent-study recorder's status: %s", exc)

    def _settle_earlier_status(self) -> None:
        """A status row left waiting by an earlier run (stopped while clinic.db refused its records,
        the row not updated since): what it kept is gone with it (backfill recorded those still in
        the outbox), so count it dropped rather than show it waiting for ever."""
        try:
            earlier = self.store.status(RECORDER_STATUS) or {}
        except Exception as exc:  # noqa: BLE001 — best effort, as _note_status
            log.debug("cannot read the sent-study recorder's status: %s", exc)
            return
        # what the last stop saved for this start waits still (`write_left_by_last_stop`)
        lost = int(earlier.get("waiting") or 0) - self._left_by_last_stop
        if lost > 0:
            with self._write_lock:
                self._drops_unreported += lost
                self._last_drop_at = time.time()
                self._note_status()

    # -- the side file: what a stop could not write, for the next start ------------------------
    def _saved_for_next_start(self, studies: list[SentStudy]) -> bool:
        """Save `studies` (all that waits: it replaces what the file held) whole, fsynced; False if
        there is no file or it cannot be written (they are dropped then, logged)."""
        if self._unwritten is None:
            return False
        try:
            self._unwritten.replace([unwritten_line(s) for s in studies])
        except (OSError, TypeError, ValueError) as exc:
            log.error(
                "cannot save the sent-study records clinic.db refused at the stop to %s: %s", self._unwritten.path, exc
            )
            return False
        self._unwritten_on_disk = True
        log.warning(
            "%d sent-study record(s) clinic.db could not take at the stop (%s) saved to %s: the next start writes them",
            len(studies),
            self.last_error or "refused",
            self._unwritten.path,
        )
        return True

    def write_left_by_last_stop(self) -> int:
        """At start, before `backfill`: the records the last stop saved (`unwritten_file`) written
        into clinic.db, then the file removed. Refused now, they are kept and retried as any
        (the file stays until they are written). A damaged file is copied aside, logged at ERROR,
        and keeps its readable lines until they are written. Returns how many records it held."""
        if self._unwritten is None:
            return 0
        taken = self._unwritten.take(unwritten_study, UNWRITTEN_LOST)
        studies = taken.records
        self._left_by_last_stop = len(studies)
        if not studies:
            self._remove_unwritten()
            return 0
        log.info("%d sent-study record(s) the last stop could not write: writing them into clinic.db", len(studies))
        with self._write_lock:
            self._unwritten_on_disk = self._unwritten.exists()
            self._kept = self._capped(studies + self._kept)
        self._write([], retry_now=True)
        return len(studies)

    def _remove_unwritten(self) -> None:
        assert self._unwritten is not None
        self._unwritten_on_disk = False
        try:
            self._unwritten.forget()
        except OSError as exc:  # written into clinic.db already: the next start writes them again, no harm
            log.error("cannot remove %s (its records are in clinic.db): %s", self._unwritten.path, exc)

    def snapshot(self, item: OutboxItem) -> tuple[OutboxItem, bytes | None]:
        """The item, and the object's bytes only for what intake did not note in its meta (the
        acquisition time of objects received from the clinic LAN)."""
        return item, None if item.meta.get("acquired_at") else self.payload_of(item)

    def record_item(self, item_id: int, sent_at: dt.datetime) -> int:
        item = self.outbox.get(item_id)
        if item is None or item.kind != Kind.DICOM or not item.meta:
            return 0
        study = self.study_of(*self.snapshot(item), sent_at)
        new = self.store.record_sent_many([study] if study else [])
        self.recorded += new
        return new

    def payload_of(self, item: OutboxItem) -> bytes | None:
        """The ECG object's bytes, or None. Read at once on the send thread (the page cache has
        them: they were just sent), because after commitment the purge deletes them. A payload
        file is read as a file: the outbox's verifying read_payload would quarantine from here."""
        path = self.outbox.payload_path(item)
        try:
            if path is not None:
                return path.read_bytes()
            return self.outbox.read_payload(item)  # a small object kept in the database
        except (OSError, LookupError, UploadError):
            return None

    @staticmethod
    def study_of(item: OutboxItem, payload: bytes | None, sent_at: dt.datetime) -> SentStudy | None:
        return sent_study_of(item, ecg_facts(payload) if payload else {}, sent_at)

    def note_commitments(self) -> None:
        """Copy commitment times from the outbox (they stay there after the purge), each from the
        study's own item: not from a new outbox's item of the same id (`is_record_of`)."""
        done = []
        for study in self.store.uncommitted():
            if study.outbox_item_id is None:
                continue
            item = self.outbox.get(study.outbox_item_id)
            if item is not None and is_record_of(study.item_key, item) and item.committed_at is not None:
                done.append((study.study_uid, dt.datetime.fromtimestamp(item.committed_at, dt.timezone.utc)))
        if done:
            self.store.set_committed(done)

    def give_keys_to_old_records(self) -> int:
        """Give each record written before its item's key was kept (0029) that key where its own
        item is surely still in the outbox (`is_surely_item_of`): purged later, or the Sent page
        looked up by its item, it shows its patient again. The others keep none (nobody's). At the
        forward service's start, which has both databases open; nothing to do costs one index
        lookup, and one transaction writes what there is. An item two records could be of (one
        LAN object sent again with another study UID) gives neither its key."""
        claims: dict[str, list[str]] = {}  # item key -> the study UIDs of the records surely its
        for study in self.store.keyless_studies():
            item = self.outbox.get(study.outbox_item_id) if study.outbox_item_id is not None else None
            if item is not None and item.kind == Kind.DICOM and is_surely_item_of(study, item):
                claims.setdefault(item.key, []).append(study.study_uid)
        keys = {uids[0]: key for key, uids in claims.items() if len(uids) == 1}
        given = self.store.give_item_keys(keys)
        if given:
            log.info("%d sent stud(ies) recorded before item keys were kept found their outbox item", given)
        return given

    def backfill(self) -> int:
        """Give old records their item keys (`give_keys_to_old_records`), then record sent or
        committed ECG items of the outbox that have no record yet."""
        self.give_keys_to_old_records()
        new = 0
        for state in (ItemState.SENT, ItemState.COMMITTED):
            for item in self.outbox.items(state=state, kind=Kind.DICOM):
                sent_at = dt.datetime.fromtimestamp(item.sent_at or item.updated_at, dt.timezone.utc)
                uid = str(item.meta.get("study_uid") or "")
                if uid and self.store.study(uid) is None:
                    new += self.record_item(item.id, sent_at)
        if new:
            log.info("%d sent stud(ies) recorded from the outbox at start", new)
        return new
