"""clinic.db as a gateway left it before 0009_report_lines: reports stored with their English
text and the object as received, no lines (for tests/test_old_report_lines.py and
bench/startup.py --old-reports)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from lastmile.clinic.db import DB_NAME, MIGRATIONS
from lastmile.data_dir import ensure_data_dir
from lastmile.demo.cardiologist import StudyToRead, ecg_report_sr, part10, report_pdf
from uploader.sqlite_store import open_database, transaction

BEFORE_REPORT_LINES = "0009_report_lines"
DAMAGED = b"\x00"  # an object the SD card damaged: the reader cannot take it


def write_old_reports(data_dir: Path, count: int, *, pdf_every: int = 0, damaged: tuple[int, ...] = ()) -> None:
    """`count` reports (SR; every `pdf_every`th an Encapsulated PDF; the `damaged` numbers'
    objects unreadable), one per sent study, in clinic.db of `data_dir` migrated before 0009."""
    db = open_database(
        ensure_data_dir(data_dir) / DB_NAME, tuple(m for m in MIGRATIONS if m.name < BEFORE_REPORT_LINES)
    )
    at = dt.datetime(2025, 11, 3, 9, 30, tzinfo=dt.timezone.utc)
    try:
        with transaction(db) as conn:
            for n in range(count):
                study = StudyToRead(f"2.25.{1000 + n}", patient_id=f"MZ-{n:05d}", patient_name="Zhang^San=张^三")
                if pdf_every and n % pdf_every == pdf_every - 1:
                    ds, kind = report_pdf(study, ["Sinus rhythm", "Normal ECG"], when=at), "pdf"
                else:
                    ds, kind = ecg_report_sr(study, findings=["窦性心律"], impression="心电图正常", when=at), "sr"
                conn.execute(
                    "INSERT INTO sent_studies (study_uid, patient_id, patient_name, sent_at, stat, polls) "
                    "VALUES (?, ?, ?, ?, 0, 1)",
                    (study.study_uid, study.patient_id, study.patient_name, at.isoformat()),
                )
                conn.execute(
                    "INSERT INTO reports (study_uid, source, kind, object_uid, version, status, title, text, "
                    "received_at, data) VALUES (?, 'dicom', ?, ?, '', 'final', 'ECG Report', ?, ?, ?)",
                    (
                        study.study_uid,
                        kind,
                        str(ds.SOPInstanceUID),
                        "ECG Report\n==========\nFindings\n  Sinus rhythm",
                        at.isoformat(),
                        DAMAGED if n in damaged else part10(ds),
                    ),
                )
    finally:
        db.conn.close()
