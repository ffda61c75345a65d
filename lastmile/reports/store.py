"""The studies we sent and the reports that came back for them, in clinic.db.

`sent_studies` is the durable "which studies did we send" record: written when the forwarder
reports an ECG sent (lastmile.reports.sent), it outlives the outbox's purge of the item, so a
report arriving days later is still linked to its ECG (time, patient, STAT). `reports` keeps each
report object as received (bytes or JSON) with its readable text, status and flags.

Replacement rules (`add_report`): a report naming earlier ones as predecessors (SR Predecessor
Documents, a new version of the same FHIR DiagnosticReport) supersedes them - also when one of
them arrives after it (the reading center's order, a retrieval that failed once); a final SR or
FHIR report supersedes the preliminary ones of its study, also those that arrive after it (a
later round, the platform's order); any SR or FHIR report after a withdrawn one supersedes it.
A draft arriving late behind its study's standing final (not written after it) or withdrawn
report (known to be written before it), not critical, is history behind that report. Superseded reports stay (marked) until the retention
purge. A final report without problems ends routine polling for its study, once every report
object the reading center listed for it has arrived (`awaiting`).

Thread-safe (one connection under a lock): the forwarder's send threads record studies while
the poller thread adds reports; other processes (`lastmile report ack`) share the file (WAL).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import sqlite_utils

from lastmile.clinic.db import from_iso, iso, iso_or_none, open_clinic_db, transaction
from lastmile.clock import local_zone
from lastmile.reports.report_text import English, display_name, is_cjk, report_text
from lastmile.reports.sent_readings import SentReading, insert_sent_readings, sent_reading
from lastmile.reports.unread_critical import UNACKNOWLEDGED_CRITICAL
from uploader.fhir_bundle import visit_of_bundle_key
from uploader.outbox import OutboxItem, instance_key
from uploader.report_lines import PERSON_NAME, LineKind, ReportLine

if TYPE_CHECKING:
    # pydicom is heavy: the console and `doctor` read the store without it
    from uploader.report_reading import ReportContent

POLLER_STATUS = "poller"  # the status row the poller keeps (last success, fault, failing since)
# the status row the sent-study recorder keeps (records clinic.db refused: waiting, dropped)
RECORDER_STATUS = "recorder"

CACHE_KIB = 256
FINAL_KINDS = frozenset({"sr", "fhir"})  # kinds whose final report replaces the preliminary ones
MAX_REPLACEMENTS = 1000  # a chain of versions followed this far at most (a cycle cannot hang a page)


@dataclass(frozen=True)
class SentStudy:
    study_uid: str
    sent_at: dt.datetime
    stat: bool = False
    patient_id: str = ""
    patient_name: str = ""
    ecg_time: str = ""
    accession: str = ""
    description: str = ""
    sop_instance_uid: str = ""
    outbox_item_id: int | None = None
    committed_at: dt.datetime | None = None
    final_at: dt.datetime | None = None
    last_polled_at: dt.datetime | None = None
    polls: int = 0
    quality_verdict: str = ""  # the quality gate's verdict on the ECG sent ("" if not checked)
    awaiting: tuple[str, ...] = ()  # report objects listed at the reading center, not arrived yet
    device: str = ""  # the device that recorded it, as its label ("" if recorded before this was kept)
    item_key: str | None = None  # its outbox item's key (is_record_of); None: recorded before it was kept


@dataclass(frozen=True)
class StoredReport:
    id: int
    study_uid: str
    source: str
    kind: str
    object_uid: str
    version: str
    status: str
    superseded_by: int | None
    title: str
    text: str
    observer: str
    report_time: str
    patient_id: str
    patient_name: str
    critical: tuple[str, ...]
    problems: tuple[str, ...]
    document_type: str
    alerted_at: dt.datetime | None
    acknowledged_at: dt.datetime | None
    acknowledged_by: str
    received_at: dt.datetime
    impressions: tuple[str, ...] = ()  # the reading doctor's conclusion(s), as read
    findings: tuple[str, ...] = ()
    # the whole report in no language (report_text words it); None: stored before lines were
    # kept (or unreadable), `text` (English) is all there is
    lines: tuple[ReportLine, ...] | None = None

    @property
    def current(self) -> bool:
        return self.superseded_by is None

    @property
    def observer_is_pn(self) -> bool:
        """A DICOM report's reading doctor is a person name (PN); a FHIR report's is free text."""
        return self.source != "fhir"

    @property
    def reading_doctor(self) -> str:
        """Who read it, as people write the name: a DICOM report's PN by its parts (陈静 (Chen
        Jing)), a FHIR report's free text as the platform wrote it."""
        return display_name(self.observer) if self.observer_is_pn else self.observer

    @property
    def needs_acknowledgement(self) -> bool:
        return bool(self.critical) and self.acknowledged_at is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "study_uid": self.study_uid,
            "source": self.source,
            "kind": self.kind,
            "status": self.status,
            "superseded_by": self.superseded_by,
            "title": self.title,
            "observer": self.observer,
            "report_time": self.report_time,
            "critical": list(self.critical),
            "problems": list(self.problems),
            "acknowledged_at": self.acknowledged_at.isoformat() if self.acknowledged_at else None,
            "acknowledged_by": self.acknowledged_by or None,
            "received_at": self.received_at.isoformat(),
            "document_type": self.document_type or None,
        }


@dataclass(frozen=True)
class AddedReport:
    report: StoredReport
    created: bool
    superseded: tuple[int, ...] = ()


_REPORT_COLUMNS = (
    "id, study_uid, source, kind, object_uid, version, status, superseded_by, title, text, observer, "
    "report_time, patient_id, patient_name, critical, problems, document_type, alerted_at, "
    "acknowledged_at, acknowledged_by, received_at, impressions, findings, lines, names_spaced"
)


def is_record_of(record_key: str | None, item: OutboxItem) -> bool:
    """Whether a record (a sent study, a sent reading) keeping `record_key` is this outbox item's,
    not one an earlier outbox's item of the same id left: outbox.sqlite made anew (damaged and set
    aside, lost to fsck) numbers its items from 1 again. The record keeps its item's key; a sent
    study recorded before clinic.db kept it (0029) has none and is nobody's, unless its own item was
    still there to give it (`is_surely_item_of`): a patient left out is better than another shown."""
    return record_key is not None and record_key == item.key


def is_surely_item_of(study: SentStudy, item: OutboxItem) -> bool:
    """Whether `item` is certainly the one a sent study recorded before its key was kept (0029) was
    written for, not an item of the same id in an outbox made anew: the same id and the same study
    (the study UID its meta holds until the purge), or, purged, the same instance by its key (an
    object received on the clinic LAN is keyed by its SOP Instance UID, which the record keeps)."""
    if item.id != study.outbox_item_id:
        return False
    if item.meta.get("study_uid"):
        return str(item.meta["study_uid"]) == study.study_uid
    return bool(study.sop_instance_uid) and item.key == instance_key(study.sop_instance_uid)


def _study(row: sqlite3.Row) -> SentStudy:
    return SentStudy(
        study_uid=row["study_uid"],
        sent_at=from_iso(row["sent_at"]) or dt.datetime.fromtimestamp(0, dt.timezone.utc),
        stat=bool(row["stat"]),
        patient_id=row["patient_id"] or "",
        patient_name=row["patient_name"] or "",
        ecg_time=row["ecg_time"] or "",
        accession=row["accession"] or "",
        description=row["description"] or "",
        sop_instance_uid=row["sop_instance_uid"] or "",
        outbox_item_id=row["outbox_item_id"],
        committed_at=from_iso(row["committed_at"]),
        final_at=from_iso(row["final_at"]),
        last_polled_at=from_iso(row["last_polled_at"]),
        polls=row["polls"] or 0,
        quality_verdict=row["quality_verdict"] or "",
        awaiting=tuple(json.loads(row["awaiting"])) if row["awaiting"] else (),
        device=row["device"] or "",
        item_key=row["item_key"],
    )


# Before clinic.db's 0014 the report reader stored a DICOM PN with its "^" as spaces ("陈^静" ->
# "陈 静") and the display joined two short Chinese runs back. Since, a PN is stored as sent and
# shown by a rule on its components; the rows stored before (`names_spaced`) are read into
# components as that old display showed them, so no report on the console changes how it names anyone.
OLD_CJK_NAME_MAX = 4


def _spaced_pn_as_components(spaced: str) -> str:
    """A PN as the old reader stored it ("Chen Jing=陈 静") -> components the display writes as
    it wrote this one then ("Chen Jing=陈^静" -> 陈静 (Chen Jing)); "欧阳 娜 娜" stays one part."""

    def group(text: str) -> str:
        runs = text.split()
        joined = "".join(runs)
        if len(runs) == 2 and len(joined) <= OLD_CJK_NAME_MAX and all(is_cjk(ch) for ch in joined):
            return "^".join(runs)
        return text.strip()

    return "=".join(group(g) for g in spaced.split("="))


def _spaced_pn_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored report lines (parsed) with their person names (the reading doctor, person name items) as
    components."""
    for line in lines:
        if line.get("kind") == "read-by":  # a DICOM report's reading doctor is a person name
            line["name"] = _spaced_pn_as_components(line.get("name", ""))
            line["code"] = PERSON_NAME
        elif line.get("kind") == "item" and line.get("code") == PERSON_NAME and line.get("value"):
            line["value"] = _spaced_pn_as_components(line["value"])
    return lines


def checked_against_study(content: ReportContent, ours: str) -> tuple[list[str], list[ReportLine]]:
    """The report's problems and lines as stored for a study sent for patient `ours` (""): with
    what to check when the report names another patient."""
    problems, lines = list(content.problems), list(content.lines)
    if ours and content.patient_id and content.patient_id != ours:
        problems.append(f"the report names patient {content.patient_id}, the ECG was of {ours}: check before use")
        lines.append(ReportLine(LineKind.CHECK_PATIENT, name=content.patient_id, value=ours))
    return problems, lines


def filed_under(content: ReportContent, study_uid: str) -> ReportContent:
    """A DICOM report the PACS filed under our study `study_uid`: kept there, saying so if the
    object names another study."""
    if content.study_uid == study_uid:
        return content
    problem = f"the object names study {content.study_uid or '(none)'}, the PACS filed it under ours"
    return replace(
        content,
        study_uid=study_uid,
        problems=(*content.problems, problem),
        lines=(*content.lines, ReportLine(LineKind.PROBLEM, value=problem)),
    )


def _report(row: sqlite3.Row) -> StoredReport:
    # DICOM reports only: a FHIR report's reading doctor is free text, shown as the platform wrote it
    spaced = bool(row["names_spaced"]) and row["source"] != "fhir"
    observer, patient_name = row["observer"] or "", row["patient_name"] or ""
    if spaced:
        observer, patient_name = _spaced_pn_as_components(observer), _spaced_pn_as_components(patient_name)
    return StoredReport(
        id=row["id"],
        study_uid=row["study_uid"],
        source=row["source"],
        kind=row["kind"],
        object_uid=row["object_uid"],
        version=row["version"] or "",
        status=row["status"],
        superseded_by=row["superseded_by"],
        title=row["title"] or "",
        text=row["text"] or "",
        observer=observer,
        report_time=row["report_time"] or "",
        patient_id=row["patient_id"] or "",
        patient_name=patient_name,
        critical=tuple(json.loads(row["critical"])) if row["critical"] else (),
        problems=tuple(json.loads(row["problems"])) if row["problems"] else (),
        document_type=row["document_type"] or "",
        alerted_at=from_iso(row["alerted_at"]),
        acknowledged_at=from_iso(row["acknowledged_at"]),
        acknowledged_by=row["acknowledged_by"] or "",
        received_at=from_iso(row["received_at"]) or dt.datetime.fromtimestamp(0, dt.timezone.utc),
        impressions=tuple(json.loads(row["impressions"])) if row["impressions"] else (),
        findings=tuple(json.loads(row["findings"])) if row["findings"] else (),
        lines=_lines(row["lines"], _spaced_pn_lines if spaced else None),
    )


def _lines(
    stored: str | None, mend: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None
) -> tuple[ReportLine, ...] | None:
    """Stored lines (`mend`ed as parsed: an old row's names), or None (the English text is shown)
    when there are none or this version cannot read them (a newer gateway's line kind after a downgrade)."""
    if not stored:
        return None
    try:
        parsed = json.loads(stored)
        return tuple(ReportLine.from_json(x) for x in (mend(parsed) if mend else parsed))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _json_list(values: Sequence[str]) -> str | None:
    return json.dumps(list(values), ensure_ascii=False) if values else None


def _comparable_times(report_time: str, other_time: str) -> tuple[dt.datetime, dt.datetime] | None:
    """Two report times (ISO text, as the reports give them), or None when either is unknown or
    unparsed. A time without its offset is the county's local time, the clinic's zone's (as
    `readable_time` shows it): so one stored before the offset was kept orders with a new one."""
    try:
        this, other = dt.datetime.fromisoformat(report_time), dt.datetime.fromisoformat(other_time)
    except ValueError:
        return None
    return _in_clinic_zone(this), _in_clinic_zone(other)


def _in_clinic_zone(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=local_zone())


def _written_after(report_time: str, other_time: str) -> bool:
    """Whether a report's time is later than another's; False when there is no true order."""
    times = _comparable_times(report_time, other_time)
    return times is not None and times[0] > times[1]


def _known_earlier(report_time: str, other_time: str) -> bool:
    """Whether a report's time is known to be before another's: a true order, and a day before
    when either gives a date only (a draft dated the day of a 10:00 report may be of 11:00)."""
    times = _comparable_times(report_time, other_time)
    if times is None:
        return False
    if _date_only(report_time) or _date_only(other_time):
        return times[0].date() < times[1].date()
    return times[0] < times[1]


def _date_only(report_time: str) -> bool:
    return len(report_time.strip()) <= len("2026-11-02")


def _late_draft_behind(conn: sqlite3.Connection, content: ReportContent, not_ids: Sequence[int]) -> sqlite3.Row | None:
    """The study's standing final, amended or withdrawn report a new draft comes late behind (a
    later round, the platform's order): the draft is then history behind it, not the current
    report. None for a critical draft, or one written after a final (a second reading): the
    doctor must see those, and be alerted. Behind a withdrawn report only a draft known to be
    older (the draft of the reading the county took back) is history: any other is the new
    reading that replaces it - the doctor would otherwise see only "withdrawn". `not_ids`: the
    draft itself and the reports it replaces."""
    if content.critical:
        return None
    row: sqlite3.Row | None = conn.execute(
        "SELECT id, report_time, status FROM reports WHERE study_uid = ? AND kind = ? "
        "AND status IN ('final', 'amended', 'withdrawn') AND superseded_by IS NULL AND object_uid != ? "
        f"AND id NOT IN ({_placeholders(not_ids)}) ORDER BY id DESC LIMIT 1",
        (content.study_uid, content.kind, content.object_uid, *not_ids),
    ).fetchone()
    if row is None:
        return None
    standing_time = row["report_time"] or ""
    if row["status"] == "withdrawn":
        return row if content.time_written and _known_earlier(content.report_time, standing_time) else None
    return None if _written_after(content.report_time, standing_time) else row


def _placeholders(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


class ReportStore:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db
        self._lock = threading.RLock()

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str]) -> ReportStore:
        db = open_clinic_db(data_dir)
        # a few hundred small rows: SQLite's default 2 MB page cache would only grow the
        # forward process's RSS (goal 64 MB on a 512 MB Pi)
        db.conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        return cls(db)

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    def __enter__(self) -> ReportStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self.db.conn.execute(sql, params).fetchall())

    # -- sent studies --------------------------------------------------------------------------
    def record_sent(self, study: SentStudy) -> bool:
        """Remember a sent study; True if it is new. Sent again (a re-send after a failed
        commitment, a second series): the first record stays, STAT and a known patient win; a
        record without its item's key (written before 0029) takes it from its own item (the same
        study UID and item id; `SentStudyRecorder.give_keys_to_old_records` gives the others theirs)."""
        return self.record_sent_many([study]) == 1

    def record_sent_many(self, studies: Sequence[SentStudy]) -> int:
        """`record_sent` for many, in one transaction (one fsync); returns how many were new."""
        if not studies:
            return 0
        with self._lock, transaction(self.db) as conn:
            return sum(self._record_one(conn, s) for s in studies)

    @staticmethod
    def _record_one(conn: sqlite3.Connection, study: SentStudy) -> int:
        row = conn.execute("SELECT study_uid FROM sent_studies WHERE study_uid = ?", (study.study_uid,)).fetchone()
        if row is not None:
            conn.execute(
                "UPDATE sent_studies SET stat = MAX(stat, ?), "
                "patient_id = COALESCE(NULLIF(patient_id, ''), ?), "
                "patient_name = COALESCE(NULLIF(patient_name, ''), ?), "
                "quality_verdict = COALESCE(NULLIF(quality_verdict, ''), ?), "
                "device = COALESCE(NULLIF(device, ''), ?), "
                "item_key = COALESCE(item_key, CASE WHEN outbox_item_id = ? THEN ? END) WHERE study_uid = ?",
                (
                    int(study.stat),
                    study.patient_id,
                    study.patient_name,
                    study.quality_verdict,
                    study.device,
                    study.outbox_item_id,
                    study.item_key,
                    study.study_uid,
                ),
            )
            return 0
        conn.execute(
            "INSERT INTO sent_studies (study_uid, outbox_item_id, item_key, sop_instance_uid, accession, "
            "patient_id, patient_name, ecg_time, description, stat, sent_at, committed_at, quality_verdict, "
            "device, polls) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            (
                study.study_uid,
                study.outbox_item_id,
                study.item_key,
                study.sop_instance_uid,
                study.accession,
                study.patient_id,
                study.patient_name,
                study.ecg_time,
                study.description,
                int(study.stat),
                iso(study.sent_at),
                iso_or_none(study.committed_at),
                study.quality_verdict or None,
                study.device or None,
            ),
        )
        return 1

    def keyless_studies(self) -> list[SentStudy]:
        """The sent studies recorded before their item's key was kept (0029), by the partial index
        sent_studies_keyless: nothing read when there are none."""
        return [_study(r) for r in self._rows("SELECT * FROM sent_studies WHERE item_key IS NULL")]

    def give_item_keys(self, keys: Mapping[str, str]) -> int:
        """Give records without an item key (study UID -> key) theirs, in one transaction; returns
        how many took it (a record given one meanwhile keeps its own)."""
        if not keys:
            return 0
        sql = "UPDATE sent_studies SET item_key = ? WHERE study_uid = ? AND item_key IS NULL"
        with self._lock, transaction(self.db) as conn:
            return sum(conn.execute(sql, (key, uid)).rowcount for uid, key in keys.items())

    def set_committed(self, committed: Iterable[tuple[str, dt.datetime]]) -> None:
        with self._lock, transaction(self.db) as conn:
            for study_uid, at in committed:
                conn.execute(
                    "UPDATE sent_studies SET committed_at = ? WHERE study_uid = ? AND committed_at IS NULL",
                    (iso(at), study_uid),
                )

    def uncommitted(self) -> list[SentStudy]:
        return [_study(r) for r in self._rows("SELECT * FROM sent_studies WHERE committed_at IS NULL")]

    def study(self, study_uid: str) -> SentStudy | None:
        rows = self._rows("SELECT * FROM sent_studies WHERE study_uid = ?", (study_uid,))
        return _study(rows[0]) if rows else None

    def studies_of_items(self, items: Sequence[OutboxItem]) -> dict[int, SentStudy]:
        """The sent studies of these outbox items, by item id: what a purged item no longer holds
        (its patient and study UID are erased with its payload). Only an item's own (`is_record_of`):
        an earlier outbox's item of the same id left its record too."""
        if not items:
            return {}
        by_id = {item.id: item for item in items}
        ids = list(by_id)
        rows = self._rows(f"SELECT * FROM sent_studies WHERE outbox_item_id IN ({_placeholders(ids)})", ids)
        return {r["outbox_item_id"]: _study(r) for r in rows if is_record_of(r["item_key"], by_id[r["outbox_item_id"]])}

    # -- sent readings (lastmile.reports.sent_readings) ----------------------------------------
    def record_sent_readings(self, readings: Sequence[SentReading]) -> int:
        """Remember readings relayed to the county platform, in one transaction (one fsync);
        returns how many were written: new ones, and those replacing an earlier outbox's record
        under the same item id (`insert_sent_readings`)."""
        if not readings:
            return 0
        with self._lock, transaction(self.db) as conn:
            return insert_sent_readings(conn, list(readings))

    def untaken_sent_readings(self) -> list[SentReading]:
        """The readings relayed whose bundle the county platform has not taken yet (as far as known)."""
        return [sent_reading(r) for r in self._rows("SELECT * FROM sent_readings WHERE sent_at IS NULL", ())]

    def record_readings_taken(self, taken: dict[int, dt.datetime]) -> int:
        """When the platform took the readings (outbox item -> time), in one transaction."""
        if not taken:
            return 0
        sql = "UPDATE sent_readings SET sent_at = ? WHERE outbox_item_id = ? AND sent_at IS NULL"
        with self._lock, transaction(self.db) as conn:
            return sum(conn.execute(sql, (iso(at), item_id)).rowcount for item_id, at in taken.items())

    def record_bundles_taken(self, keys: Sequence[str], at: dt.datetime) -> int:
        """The platform took the bundles with outbox keys `keys` at `at`: the readings they carry
        (their own bundle, or their home visit's) are sent then. One statement, no read: never the
        refused records kept to retention. How many records."""
        if not keys:
            return 0
        visits = [v for v in map(visit_of_bundle_key, keys) if v is not None]
        sql = (
            f"UPDATE sent_readings SET sent_at = ? WHERE sent_at IS NULL AND (bundle_key IN ({_placeholders(keys)}) "
            f"OR visit_id IN ({_placeholders(visits)}))"
        )
        with self._lock, transaction(self.db) as conn:
            return conn.execute(sql, [iso(at), *keys, *visits]).rowcount

    def recent_sent_readings(self, limit: int) -> list[SentReading]:
        """The last `limit` readings recorded, newest (by outbox item) first."""
        rows = self._rows("SELECT * FROM sent_readings ORDER BY outbox_item_id DESC LIMIT ?", (int(limit),))
        return [sent_reading(r) for r in rows]

    def studies(self, *, since: dt.datetime | None = None) -> list[SentStudy]:
        """Sent studies, newest first (those sent at or after `since`)."""
        if since is None:
            return [_study(r) for r in self._rows("SELECT * FROM sent_studies ORDER BY sent_at DESC")]
        rows = self._rows("SELECT * FROM sent_studies WHERE sent_at >= ? ORDER BY sent_at DESC", (iso(since),))
        return [_study(r) for r in rows]

    def mark_polled(
        self,
        study_uids: Sequence[str],
        now: dt.datetime,
        *,
        status: tuple[str, dict[str, Any]] | None = None,
        awaiting: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """The reading center was asked about these studies now; with `status`, the poller's
        status is written in the same transaction (one write per round on the SD card), and
        with `awaiting` the report objects still to arrive per study ([]: none)."""
        with self._lock, transaction(self.db) as conn:
            for uid in study_uids:
                conn.execute(
                    "UPDATE sent_studies SET last_polled_at = ?, polls = polls + 1 WHERE study_uid = ?",
                    (iso(now), uid),
                )
            for uid, objects in (awaiting or {}).items():
                conn.execute("UPDATE sent_studies SET awaiting = ? WHERE study_uid = ?", (_json_list(objects), uid))
            if status is not None:
                self._set_status(conn, *status, now)

    # -- reports -------------------------------------------------------------------------------
    def has_object(self, object_uid: str, version: str = "") -> bool:
        rows = self._rows("SELECT 1 FROM reports WHERE object_uid = ? AND version = ?", (object_uid, version))
        return bool(rows)

    def known_versions(self, object_uids: Iterable[str]) -> dict[str, str]:
        """object uid → the version of its current report (FHIR conditional reads)."""
        uids = list(object_uids)
        if not uids:
            return {}
        rows = self._rows(
            f"SELECT object_uid, version FROM reports WHERE superseded_by IS NULL "
            f"AND object_uid IN ({_placeholders(uids)})",
            uids,
        )
        return {r[0]: r[1] for r in rows}

    def add_report(self, content: ReportContent, data: bytes, source: str, now: dt.datetime) -> AddedReport:
        """Store one report object (as received) for its study; see the module docstring for what
        it replaces. The study must be one we sent (KeyError otherwise): reports for studies this
        gateway did not send are never stored."""
        with self._lock, transaction(self.db) as conn:
            existing = conn.execute(
                f"SELECT {_REPORT_COLUMNS} FROM reports WHERE object_uid = ? AND version = ?",
                (content.object_uid, content.version),
            ).fetchone()
            if existing is not None:
                return AddedReport(_report(existing), created=False)
            study = conn.execute(
                "SELECT patient_id FROM sent_studies WHERE study_uid = ?", (content.study_uid,)
            ).fetchone()
            if study is None:
                raise KeyError(f"study {content.study_uid} was not sent by this gateway")
            problems, lines = checked_against_study(content, study["patient_id"] or "")
            final = content.final and not problems
            status = content.status if final or content.withdrawn else "preliminary"
            text = report_text(lines, English())
            amends = [u for u in content.amends if u != content.object_uid]
            cur = conn.execute(
                "INSERT INTO reports (study_uid, source, kind, object_uid, version, sop_class_uid, status, title, "
                "text, observer, report_time, patient_id, patient_name, critical, problems, document_type, "
                "received_at, data, impressions, findings, lines, amends, names_spaced) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (
                    content.study_uid,
                    source,
                    content.kind,
                    content.object_uid,
                    content.version,
                    content.sop_class_uid,
                    status,
                    content.title,
                    text,
                    content.observer,
                    content.report_time,
                    content.patient_id,
                    content.patient_name,
                    _json_list(content.critical),
                    _json_list(problems),
                    content.document_type,
                    iso(now),
                    data,
                    _json_list(content.impressions),
                    _json_list(content.findings),
                    json.dumps([line.to_json() for line in lines], ensure_ascii=False),
                    _json_list(amends),
                ),
            )
            new_id = int(cur.lastrowid or 0)
            replaced = {
                r[0]
                for r in conn.execute(
                    "SELECT id FROM reports WHERE object_uid = ? AND id != ? AND superseded_by IS NULL",
                    (content.object_uid, new_id),
                )
            }
            if amends:
                replaced |= {
                    r[0]
                    for r in conn.execute(
                        f"SELECT id FROM reports WHERE superseded_by IS NULL AND object_uid IN ({_placeholders(amends)})",
                        amends,
                    )
                }
            # a draft that comes late, behind the report that stands for its study: kept as history
            late_behind = (
                _late_draft_behind(conn, content, [new_id, *replaced])
                if content.kind in FINAL_KINDS and status == "preliminary" and not problems
                else None
            )
            if content.kind in FINAL_KINDS and status != "withdrawn" and late_behind is None:
                # the report that comes after a withdrawn one, final or not, is its replacement (one
                # current report per study); a final one replaces the drafts as well
                replaceable = ("preliminary", "withdrawn") if final else ("withdrawn",)
                replaced |= {
                    r[0]
                    for r in conn.execute(
                        "SELECT id FROM reports WHERE study_uid = ? AND kind = ? "
                        f"AND status IN ({_placeholders(replaceable)}) AND superseded_by IS NULL AND id != ?",
                        (content.study_uid, content.kind, *replaceable, new_id),
                    )
                }
            if replaced:
                ids = sorted(replaced)
                # a withdrawn report is no final that stands: what comes after it is a plain final
                replaced_final = conn.execute(
                    f"SELECT 1 FROM reports WHERE id IN ({_placeholders(ids)}) AND status IN ('final', 'amended')", ids
                ).fetchone()
                conn.execute(f"UPDATE reports SET superseded_by = ? WHERE id IN ({_placeholders(ids)})", [new_id, *ids])
                if status == "final" and replaced_final:
                    status = "amended"  # it corrects a final report the doctor may have acted on
                    conn.execute("UPDATE reports SET status = ? WHERE id = ?", (status, new_id))
            # a correction that came first (the reading center's order, or this object arrived a
            # round later): it replaces this one now, as it would have had they come in order
            successor = conn.execute(
                "SELECT r.id FROM reports r, json_each(r.amends) j WHERE r.amends IS NOT NULL "
                "AND r.superseded_by IS NULL AND r.id != ? AND j.value = ? ORDER BY r.id DESC LIMIT 1",
                (new_id, content.object_uid),
            ).fetchone()
            successor = successor or late_behind
            if successor is not None:
                conn.execute("UPDATE reports SET superseded_by = ? WHERE id = ?", (successor[0], new_id))
            if final:
                conn.execute(
                    "UPDATE sent_studies SET final_at = COALESCE(final_at, ?) WHERE study_uid = ?",
                    (iso(now), content.study_uid),
                )
            elif status == "withdrawn":
                # its final report taken back: the study waits for its report again (polled at its
                # age's pace, not the amendment poll's) unless another final one still stands
                conn.execute(
                    "UPDATE sent_studies SET final_at = NULL WHERE study_uid = ? AND NOT EXISTS ("
                    " SELECT 1 FROM reports WHERE study_uid = ? AND superseded_by IS NULL"
                    " AND status IN ('final', 'amended'))",
                    (content.study_uid, content.study_uid),
                )
            row = conn.execute(f"SELECT {_REPORT_COLUMNS} FROM reports WHERE id = ?", (new_id,)).fetchone()
            return AddedReport(_report(row), created=True, superseded=tuple(sorted(replaced)))

    def get(self, report_id: int) -> StoredReport | None:
        rows = self._rows(f"SELECT {_REPORT_COLUMNS} FROM reports WHERE id = ?", (report_id,))
        return _report(rows[0]) if rows else None

    def current_of(self, report_id: int) -> int | None:
        """The report that now stands for `report_id`: itself when no newer version replaced it,
        else the end of its chain of replacements (a preliminary → its final → an amendment).
        None: no such report."""
        rows = self._rows(
            "WITH RECURSIVE chain(id, next, depth) AS ("
            " SELECT id, superseded_by, 0 FROM reports WHERE id = ?"
            " UNION ALL SELECT r.id, r.superseded_by, c.depth + 1 FROM reports r JOIN chain c ON r.id = c.next"
            f" WHERE c.depth < {MAX_REPLACEMENTS}"
            ") SELECT id FROM chain ORDER BY depth DESC LIMIT 1",
            (report_id,),
        )
        return int(rows[0][0]) if rows else None

    def data_of(self, report_id: int) -> bytes | None:
        rows = self._rows("SELECT data FROM reports WHERE id = ?", (report_id,))
        return bytes(rows[0][0]) if rows else None

    def reports(self, *, study_uid: str | None = None, current_only: bool = False) -> list[StoredReport]:
        where, params = [], []
        if study_uid is not None:
            where.append("study_uid = ?")
            params.append(study_uid)
        if current_only:
            where.append("superseded_by IS NULL")
        sql = f"SELECT {_REPORT_COLUMNS} FROM reports" + (" WHERE " + " AND ".join(where) if where else "")
        return [_report(r) for r in self._rows(sql + " ORDER BY id", params)]

    # -- critical results ------------------------------------------------------------------------
    def unacknowledged_critical(self) -> list[StoredReport]:
        rows = self._rows(f"SELECT {_REPORT_COLUMNS} FROM reports WHERE {UNACKNOWLEDGED_CRITICAL} ORDER BY id")
        return [_report(r) for r in rows]

    def not_alerted(self) -> list[StoredReport]:
        rows = self._rows(
            # one announced per result: a report replaced before its turn is the one replacing it
            f"SELECT {_REPORT_COLUMNS} FROM reports WHERE {UNACKNOWLEDGED_CRITICAL} AND alerted_at IS NULL ORDER BY id"
        )
        return [_report(r) for r in rows]

    def mark_alerted(self, report_id: int, now: dt.datetime) -> None:
        with self._lock, transaction(self.db) as conn:
            conn.execute("UPDATE reports SET alerted_at = ? WHERE id = ?", (iso(now), report_id))

    def acknowledge(self, report_id: int, by: str, now: dt.datetime) -> StoredReport:
        """The doctor has seen this report (a critical one stops failing `lastmile doctor`), and so
        the earlier versions it replaced: the pages show only the current one, and an old critical
        version left unacknowledged would fail `doctor` and alert the county for ever."""
        with self._lock, transaction(self.db) as conn:
            # the CTE inside the UPDATE: sqlite3 counts rowcount only for a statement that starts as DML
            cur = conn.execute(
                "UPDATE reports SET acknowledged_at = COALESCE(acknowledged_at, ?), "
                "acknowledged_by = COALESCE(acknowledged_by, ?) WHERE id IN ("
                "WITH RECURSIVE replaced(id, depth) AS (SELECT ?, 0 UNION ALL SELECT r.id, p.depth + 1 "
                f"FROM reports r JOIN replaced p ON r.superseded_by = p.id WHERE p.depth < {MAX_REPLACEMENTS}) "
                "SELECT id FROM replaced)",
                (iso(now), by or None, report_id),
            )
            if cur.rowcount == 0:
                raise KeyError(f"no report {report_id}")
        report = self.get(report_id)
        assert report is not None
        return report

    # -- status of the poller (for `lastmile doctor`) ---------------------------------------------
    def set_status(self, name: str, value: dict[str, Any], now: dt.datetime) -> None:
        with self._lock, transaction(self.db) as conn:
            self._set_status(conn, name, value, now)

    @staticmethod
    def _set_status(conn: sqlite3.Connection, name: str, value: dict[str, Any], now: dt.datetime) -> None:
        conn.execute(
            "INSERT INTO report_status (name, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (name, json.dumps(value, sort_keys=True, ensure_ascii=False), iso(now)),
        )

    def status(self, name: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT value FROM report_status WHERE name = ?", (name,))
        return dict(json.loads(rows[0][0])) if rows else None

    # -- retention ---------------------------------------------------------------------------------
    def purge_expired(self, now: dt.datetime, retention_days: float, window_days: float) -> int:
        """Delete studies sent more than `retention_days` ago (and longer ago than the polling
        window) with their reports, except where a critical report awaits acknowledgement, and the
        readings sent as long ago (`sent_readings`). secure_delete zeroes the rows; the WAL is truncated so no copy stays there."""
        keep_s = max(retention_days, window_days) * 86400.0
        cutoff = iso(now - dt.timedelta(seconds=keep_s))
        with self._lock, transaction(self.db) as conn:
            uids = [
                r[0]
                for r in conn.execute(
                    "SELECT study_uid FROM sent_studies s WHERE sent_at < ? AND NOT EXISTS ("
                    " SELECT 1 FROM reports r WHERE r.study_uid = s.study_uid"
                    " AND r.critical IS NOT NULL AND r.acknowledged_at IS NULL)",
                    (cutoff,),
                )
            ]
            for start in range(0, len(uids), 500):
                chunk = uids[start : start + 500]
                conn.execute(f"DELETE FROM reports WHERE study_uid IN ({_placeholders(chunk)})", chunk)
                conn.execute(f"DELETE FROM sent_studies WHERE study_uid IN ({_placeholders(chunk)})", chunk)
            # the readings sent then go with them (no report comes back for a reading)
            readings = conn.execute("DELETE FROM sent_readings WHERE relayed_at < ?", (cutoff,)).rowcount
        if uids or readings:
            with self._lock:
                self.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return len(uids)
