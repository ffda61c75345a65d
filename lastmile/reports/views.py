"""What the doctor sees of the reports: the list (one line per ECG sent), one report in full,
and the printable document (the PDF as sent, else the readable text)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from lastmile.reports.report_text import (
    English,
    Reader,
    Speaker,
    display_name,
    pdf_note,
    printout,
    shown_page_text,
    shown_reasons,
    shown_text,
    unassigned_note,
)
from lastmile.reports.store import ReportStore, SentStudy, StoredReport


@dataclass(frozen=True)
class StudyLine:
    """One ECG we sent and where its report stands."""

    study: SentStudy
    reports: tuple[StoredReport, ...]  # current ones (not superseded), oldest first

    @property
    def status(self) -> str:
        """waiting, preliminary, received, amended, withdrawn, or CRITICAL (until acknowledged)."""
        if not self.reports:
            return "waiting"
        if any(r.needs_acknowledgement for r in self.reports):
            return "CRITICAL"
        if any(r.critical for r in self.reports):
            return "critical (seen)"
        standing = [r for r in self.reports if r.status != "withdrawn"]
        if not standing:
            return "withdrawn"  # the reading center took its report back; a new one is awaited
        if any(r.status == "amended" for r in standing):
            return "amended"
        if all(r.status == "preliminary" for r in standing):
            return "preliminary"
        return "received"

    @property
    def reading_doctor(self) -> str:
        """The latest report's reading doctor as people write the name (`StoredReport.reading_doctor`)."""
        return next((r.reading_doctor for r in reversed(self.reports) if r.observer), "")

    def to_json(self) -> dict[str, Any]:
        s = self.study
        return {
            "study_uid": s.study_uid,
            "patient_id": s.patient_id or None,
            "patient_name": s.patient_name or None,
            "ecg_time": s.ecg_time or None,
            "stat": s.stat,
            "sent_at": s.sent_at.isoformat(),
            "committed_at": s.committed_at.isoformat() if s.committed_at else None,
            "ecg_quality": s.quality_verdict or None,
            "device": s.device or None,
            "status": self.status,
            "reading_doctor": self.reading_doctor or None,  # as people write it, like the table
            "reports": [r.to_json() for r in self.reports],
        }


def study_lines(store: ReportStore, *, since: dt.datetime | None = None) -> list[StudyLine]:
    current: dict[str, list[StoredReport]] = {}
    for report in store.reports(current_only=True):
        current.setdefault(report.study_uid, []).append(report)
    return [StudyLine(s, tuple(current.get(s.study_uid, ()))) for s in store.studies(since=since)]


def short_time(iso_text: str) -> str:
    """'2026-01-01T12:34:56+08:00' → '2026-01-01 12:34' (as the ECG's own clock said)."""
    return iso_text[:16].replace("T", " ") if iso_text else "-"


def our_patient(study: SentStudy) -> str:
    """This clinic's patient of a sent study, for the operator ("(unassigned)": sent without one)."""
    return " ".join(x for x in (study.patient_id, display_name(study.patient_name)) if x) or "(unassigned)"


def county_notes(line: StudyLine) -> list[str]:
    """What `lastmile report show` says of the patient the county's reports name on an ECG sent
    without a patient (flagged as the county's words), a line each; [] for our own patient's."""
    named = dict.fromkeys(county_patient(line.study, r, id_first=True) for r in line.reports)
    return [text for name in named if name for text in unassigned_note(name, English()).splitlines()]


def render_list(lines: list[StudyLine]) -> str:
    if not lines:
        return "no ECG has been sent yet"
    rows = [("REPORT", "PATIENT", "ECG TIME", "STATUS", "READ BY")]
    notes: list[list[str]] = [[]]
    for line in lines:
        s = line.study
        ids = ",".join(str(r.id) for r in line.reports) or "-"
        stamp = short_time(s.ecg_time) + (" STAT" if s.stat else "")
        rows.append((ids, our_patient(s), stamp, line.status, line.reading_doctor or "-"))
        notes.append(county_notes(line))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out: list[str] = []
    for row, under in zip(rows, notes, strict=True):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out += [" " * (widths[0] + 2) + note for note in under]  # under the patient column
    return "\n".join(out)


def speaker_for(language: str) -> Reader:
    """`console.language` and the clinic's zone, for the command line's report text and printout
    (the same words as the console's pages)."""
    from lastmile.clock import local_zone
    from lastmile.console.i18n import Localizer  # Babel: only in the commands that word a report

    return Localizer(language, local_zone())


def ecg_time(text: str) -> dt.datetime | None:
    """An ECG time as the outbox and `sent_studies` keep it (ISO with its offset, UTC when it has
    none); None if empty or unreadable."""
    try:
        value = dt.datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value and value.tzinfo is None else value


def ecg_time_of(study: SentStudy | None) -> dt.datetime | None:
    """The ECG's time as `sent_studies` keeps it; None if unknown."""
    return ecg_time(study.ecg_time) if study else None


def county_patient(study: SentStudy | None, report: StoredReport, *, id_first: bool = False) -> str:
    """The patient the county's report names, when the ECG was sent without one ("" otherwise,
    or when it names none): the county's words, shown flagged, never taken as this clinic's."""
    if study is not None and study.patient_id:
        return ""
    parts = [display_name(report.patient_name), report.patient_id]
    return " ".join(x for x in (parts[::-1] if id_first else parts) if x)


def render_report(store: ReportStore, report: StoredReport, speaker: Speaker | None = None) -> str:
    """The report for `lastmile report show`: the facts (for the operator, in English) and the
    report itself in `speaker`'s language (English when None)."""
    speaker = speaker or English()
    study = store.study(report.study_uid)
    out = [f"Report {report.id} ({report.kind}, {report.status}, from the {report.source} reading center)"]
    if study is not None:
        out.append(f"Patient: {our_patient(study)}")
        county = county_patient(study, report, id_first=True)
        if county:  # the facts are for the operator, in English; the words are the printouts'
            out.append(unassigned_note(county, English()))
        out.append(f"ECG: {short_time(study.ecg_time)}" + (" (STAT)" if study.stat else ""))
        if study.device:
            out.append(f"Device: {study.device}")
        if study.quality_verdict:
            out.append(f"ECG quality at the clinic: {study.quality_verdict}")
    if report.superseded_by is not None:
        out.append(f"REPLACED by report {store.current_of(report.id)}: read that one")
    if report.critical:
        seen = (
            f"acknowledged {report.acknowledged_at:%Y-%m-%d %H:%M}"
            + (f" by {report.acknowledged_by}" if report.acknowledged_by else "")
            if report.acknowledged_at
            else f"NOT acknowledged: lastmile report ack {report.id}"
        )
        out.append(
            f"CRITICAL RESULT (危急值), {seen}: " + "; ".join(shown_reasons(report.lines, report.critical, speaker))
        )
    if report.problems:
        out.append("Problems: " + "; ".join(report.problems))
    out += ["", shown_text(report.lines, report.text, speaker)]
    return "\n".join(out)


def printable(store: ReportStore, report: StoredReport, reader: Reader | None = None) -> tuple[bytes, str]:
    """(bytes, file suffix): the report's own document (a PDF) as sent, else the printout the
    console's clinic printer gets, in `reader`'s language (English when None)."""
    # pydicom only here: the console, which reads its PDFs in a worker, words reports with this module
    from uploader.report_reading import UnreadableReport, read_dicom_report, read_fhir_report

    data = store.data_of(report.id) or b""
    document: bytes | None = None
    try:
        if report.source == "fhir":
            document = read_fhir_report(json.loads(data)).document
        else:
            document = read_dicom_report(data).document
    except (UnreadableReport, ValueError):
        document = None
    if document and document.startswith(b"%PDF-"):
        return document, ".pdf"
    return text_printout(store, report, reader or speaker_for("en")).encode("utf-8"), ".txt"


def text_printout(store: ReportStore, report: StoredReport, reader: Reader) -> str:
    """The report as the clinic printer gets it when the county sent no PDF (`report_text.printout`),
    in `reader`'s language: one wording for the command line and the console."""
    study = store.study(report.study_uid)
    ours = study.patient_id if study else ""  # none: sent unassigned, the county's patient flagged
    return printout(
        reader,
        patient=display_name(study.patient_name) if study and ours else "",
        patient_id=ours,
        ecg_time=ecg_time_of(study),
        received_at=report.received_at,
        reading_doctor=report.reading_doctor,
        reasons=shown_reasons(report.lines, report.critical, reader),
        text=shown_page_text(report.lines, report.text, reader),  # its head says the critical reason
        replaced_by=str(store.current_of(report.id)) if report.superseded_by is not None else "",
        unassigned=not ours,
        county_patient=county_patient(study, report),
        device=study.device if study else "",
    )


def note_for_pdf(store: ReportStore, report: StoredReport, reader: Reader) -> str:
    """The page printed before the county's PDF of `report` (`report_text.pdf_note`): "" when the
    PDF can print alone."""
    study = store.study(report.study_uid)
    return pdf_note(
        reader,
        replaced_by=str(store.current_of(report.id)) if report.superseded_by is not None else "",
        unassigned=not (study and study.patient_id),
        county_patient=county_patient(study, report),
        ecg_time=ecg_time_of(study),
        device=study.device if study else "",
    )
