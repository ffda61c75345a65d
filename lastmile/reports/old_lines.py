"""Lines for the reports stored before clinic.db kept them (0009_report_lines).

A report stored before 0009_report_lines kept only its text in English: the Reports page showed
it so to a doctor reading Chinese. Every report keeps the object as received (`data`: the DICOM
Part-10 bytes, or the FHIR DiagnosticReport's JSON), so its lines are read from it again, as the
poller reads a report arriving now. Once - not at each page (a Pi re-reading DICOM on every
render) - by the forward service after its start (`OldReportLines`, its own thread and
connection), never in a migration: whichever process opened clinic.db first ran it (the console
then kept pydicom for its life), and all the rows in one write transaction held the other
services past their busy timeout on a Pi. Here BATCH rows are read (no lock held), then written
in one short transaction. A row that cannot be read again keeps its text and is marked
(`lines_not_read`): it is not read again at every start, and never stops the others. A stop
(SIGTERM) ends it between rows, and a batch's write waits for another process's write lock (the
console's) at most a second more (sqlite_store.StopWaits, the one mechanism of every service):
what was read and not written, and what was not read, is read at the next start, once.

No configuration: the county's critical codes and keywords are not known. A report whose lines,
read again with none, do not give the critical reasons it was stored with (critical by a
keyword, or by a code the county configured) keeps its English text: its critical reasons are
never dropped nor changed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path

import sqlite_utils

from lastmile.clinic.db import open_clinic_db, transaction
from lastmile.reports.store import checked_against_study, filed_under
from uploader.report_lines import ReportLine
from uploader.report_reading import ReportContent, read_dicom_report, read_fhir_report
from uploader.sqlite_store import StopWaits, WaitGivenUp, give_up_waits_on

log = logging.getLogger(__name__)

BATCH = 20  # rows read, then written in one transaction: the write lock held for 20 UPDATEs
# the rows still to read, by the partial index 0033_report_lines_not_read made (no table scan)
_STILL_TO_READ = "lines IS NULL AND lines_not_read IS NULL"


def has_old_reports(db: sqlite_utils.Database) -> bool:
    return db.conn.execute(f"SELECT 1 FROM reports WHERE {_STILL_TO_READ} LIMIT 1").fetchone() is not None


def add_old_report_lines(db: sqlite_utils.Database, stop: threading.Event | None = None) -> int:
    """Give each report stored without lines (and not marked) the lines its stored object reads
    to, or mark why it keeps its text; BATCH rows a transaction, one row's object in memory at a
    time (a PDF report's is large). Returns the rows given lines."""
    given = marked = 0
    after = 0
    try:
        while not _stopped(stop):
            ids = [
                r[0]
                for r in db.conn.execute(
                    f"SELECT id FROM reports WHERE {_STILL_TO_READ} AND id > ? ORDER BY id LIMIT ?", (after, BATCH)
                )
            ]
            if not ids:
                break
            after = ids[-1]
            outcomes: list[tuple[int, tuple[str | None, str]]] = []
            for report_id in ids:
                if _stopped(stop):  # the batch's rest is read at the next start (a PDF's read is long on a Pi)
                    break
                outcomes.append((report_id, _read_again(db, report_id)))
            if not outcomes:
                break
            written = _write(db, outcomes)
            if written is None:
                log.info("reports stored before lines: stopping; the rest are read again at the next start")
                break
            given, marked = given + written[0], marked + written[1]
    finally:  # also when a fault ends it: what this run did is said, the rest is the next start's
        if given or marked:
            log.info(
                "reports stored before lines: %d read again in the reader's language, %d keep their text",
                given,
                marked,
            )
    return given


def _stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def _write(db: sqlite_utils.Database, outcomes: list[tuple[int, tuple[str | None, str]]]) -> tuple[int, int] | None:
    """Write a batch's outcomes in one transaction: (rows given lines, rows marked), or None when
    the service's stop gave up the wait for another process's write lock (`give_up_waits_on`, as
    `OldReportLines` sets it): nothing written, these rows are the next start's."""
    try:
        with transaction(db) as conn:  # whole or nothing: every UPDATE is "still to read"
            return _write_rows(conn, outcomes)
    except WaitGivenUp:
        return None


def _write_rows(conn: sqlite3.Connection, outcomes: list[tuple[int, tuple[str | None, str]]]) -> tuple[int, int]:
    given = marked = 0
    for report_id, (lines, why) in outcomes:
        if lines is not None:
            # lines as add_report stores them now: person names as sent (0014)
            given += conn.execute(
                f"UPDATE reports SET lines = ?, names_spaced = 0 WHERE id = ? AND {_STILL_TO_READ}",
                (lines, report_id),
            ).rowcount
        else:
            marked += conn.execute(
                f"UPDATE reports SET lines_not_read = ? WHERE id = ? AND {_STILL_TO_READ}", (why, report_id)
            ).rowcount
    return given, marked


def _read_again(db: sqlite_utils.Database, report_id: int) -> tuple[str | None, str]:
    """(the row's lines as JSON, "") or (None, why it keeps its text)."""
    row = db.conn.execute(
        "SELECT r.source, r.study_uid, r.critical, r.data, s.patient_id FROM reports r "
        "LEFT JOIN sent_studies s ON s.study_uid = r.study_uid WHERE r.id = ?",
        (report_id,),
    ).fetchone()
    if row is None:
        return None, "deleted"  # purged meanwhile (retention): the UPDATE finds no row
    try:
        lines, why = _lines_read_again(row[0], row[1], row[2], row[3], row[4] or "")
    except Exception as exc:  # noqa: BLE001 - an old row the reader cannot take: it keeps its text
        log.warning("report %d stored before lines: not read again (%s: %s)", report_id, type(exc).__name__, exc)
        return None, f"unreadable: {type(exc).__name__}: {exc}"[:200]
    if lines is None:
        return None, why
    return json.dumps([line.to_json() for line in lines], ensure_ascii=False), ""


def _lines_read_again(
    source: str, study_uid: str, critical: str | None, data: bytes, ours: str
) -> tuple[list[ReportLine] | None, str]:
    """The lines `add_report` would have stored for this report, or None and why it keeps its
    text: it names another study, or other critical reasons than it was stored with."""
    content: ReportContent
    if source == "fhir":
        content = read_fhir_report(json.loads(data), known_studies=[study_uid])
        if content.study_uid != study_uid:
            return None, "another study"
    else:
        content = filed_under(read_dicom_report(bytes(data)), study_uid)
    if list(content.critical) != (json.loads(critical) if critical else []):
        return None, "other critical reasons"
    return checked_against_study(content, ours)[1], ""


class OldReportLines:
    """`add_old_report_lines` in a thread of the forward service, on its own connection (the
    report store's is the poller's), started only when there is a row to read."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="old-report-lines", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            db = open_clinic_db(self._data_dir)
            # a batch's write waits for another process's lock (the console's) at most a second
            # more once the stop is set - the service's one mechanism (sqlite_store.StopWaits)
            give_up_waits_on(db, StopWaits(self._stop))
            try:
                add_old_report_lines(db, self._stop)
            finally:
                db.conn.close()
        except (sqlite3.Error, OSError) as exc:  # the rows left are read at the next start
            log.warning("reports stored before lines: not all read again now (at the next start): %s", exc)
