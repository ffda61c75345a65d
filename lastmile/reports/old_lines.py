"""Lines for the reports stored before clinic.db kept them (migration 0032_old_report_lines).

A report stored before 0009_report_lines kept only its text in English: the Reports page showed
it so to a doctor reading Chinese. Every report keeps the object as received (`data`: the DICOM
Part-10 bytes, or the FHIR DiagnosticReport's JSON), so its lines are read from it again, as the
poller reads a report arriving now. Once, in the migration - not at each page (a Pi re-reading
DICOM on every render) - and row by row, so a row that cannot be read again keeps its text and
never stops the upgrade.

The migration has no configuration: the county's critical codes and keywords are not known. A
report whose lines, read again with none, do not give the critical reasons it was stored with
(critical by a keyword, or by a code the county configured) keeps its English text: its
critical reasons are never dropped nor changed.
"""

from __future__ import annotations

import json
import logging

import sqlite_utils

from lastmile.reports.store import checked_against_study, filed_under
from uploader.report_lines import ReportLine
from uploader.report_reading import ReportContent, read_dicom_report, read_fhir_report

log = logging.getLogger(__name__)


def add_old_report_lines(db: sqlite_utils.Database) -> None:
    """Give each report stored without lines the lines its stored object reads to; one row at a
    time (a PDF report's object is large: never all of them in memory)."""
    ids = [r[0] for r in db.conn.execute("SELECT id FROM reports WHERE lines IS NULL")]
    kept = 0
    for report_id in ids:
        row = db.conn.execute(
            "SELECT r.source, r.study_uid, r.critical, r.data, s.patient_id FROM reports r "
            "LEFT JOIN sent_studies s ON s.study_uid = r.study_uid WHERE r.id = ?",
            (report_id,),
        ).fetchone()
        try:
            lines = _lines_read_again(row[0], row[1], row[2], row[3], row[4] or "")
        except Exception as exc:  # noqa: BLE001 - an old row the reader cannot take: it keeps its text
            log.warning("report %d stored before lines: not read again (%s: %s)", report_id, type(exc).__name__, exc)
            continue
        if lines is None:
            continue
        db.conn.execute(
            "UPDATE reports SET lines = ? WHERE id = ?",
            (json.dumps([line.to_json() for line in lines], ensure_ascii=False), report_id),
        )
        kept += 1
    if ids:
        log.info("reports stored before lines: %d of %d read again in the reader's language", kept, len(ids))


def _lines_read_again(
    source: str, study_uid: str, critical: str | None, data: bytes, ours: str
) -> list[ReportLine] | None:
    """The lines `add_report` would have stored for this report, or None (it keeps its text):
    read again, it names another study, or other critical reasons than it was stored with."""
    content: ReportContent
    if source == "fhir":
        content = read_fhir_report(json.loads(data), known_studies=[study_uid])
        if content.study_uid != study_uid:
            return None
    else:
        content = filed_under(read_dicom_report(bytes(data)), study_uid)
    if list(content.critical) != (json.loads(critical) if critical else []):
        return None
    return checked_against_study(content, ours)[1]
