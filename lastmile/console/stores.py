"""The console's sources over the gateway's real state: the report store and the outbox's held ECGs.

- `StoredReports`: the reports returned by the reading center (`lastmile.reports.store`, in
  clinic.db), each with what is known of the ECG it reads (patient, time, STAT, the quality
  verdict the ECG had when sent). Acknowledging here is `lastmile report ack`: one state.
- `OutboxHeldEcgs`: the ECGs held for the doctor (`lastmile.ecg.holds`); release and discard are
  `lastmile ecg release|discard E<n>`; assigning a patient is `lastmile patient assign E<n>`, run
  in `dicom_worker` (it rebuilds the DICOM object: pydicom stays out of the console).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import subprocess
import sys
import time
from typing import Any

from devices.identity import Patient
from lastmile.config import Config
from lastmile.console.dicom_worker import patient_from_json, patient_json
from lastmile.console.sources import (
    EcgAssigned,
    EcgAssignFailed,
    EcgDamaged,
    HeldEcg,
    ReportView,
    person_name,
    recorded_at,
    row_number,
)
from lastmile.ecg.holds import (
    ASSIGNED_BY_DOCTOR,
    DOCTOR_HOLDS,
    LAN_SOURCE_FORMAT,
    QUALITY_HOLD,
    UNASSIGNED_HOLD,
    HeldEcgError,
    discard_held_ecg,
    held_ecgs,
    release_held_ecg,
)
from lastmile.reports.report_text import Reader
from lastmile.reports.store import ReportStore, SentStudy, StoredReport
from lastmile.reports.views import ecg_time, note_for_pdf, text_printout
from uploader.errors import OutboxFullError
from uploader.outbox import Outbox, OutboxItem

log = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 120.0  # a Pi 3 under load: start Python, import pydicom, rebuild one ECG
PDF_TYPE = "application/pdf"


WORKER_FAILED = "worker_failed"  # in run_worker's answer: the worker itself failed, not the job's own refusal


def run_worker(job: dict[str, Any], worker: list[str]) -> dict[str, Any]:
    """One job of `lastmile.console.dicom_worker`; {"error": ...} when it could not be done, with
    WORKER_FAILED when the worker did not answer (crashed, timed out, could not start): the job
    may not have been tried at all."""
    try:
        done = subprocess.run(
            worker, input=json.dumps(job).encode(), capture_output=True, timeout=WORKER_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("DICOM worker failed: %s", exc)
        return {"error": type(exc).__name__, WORKER_FAILED: True}
    if done.returncode != 0:
        log.warning("DICOM worker exited %d: %s", done.returncode, done.stderr.decode(errors="replace")[-500:])
        return {"error": f"worker exited {done.returncode}", WORKER_FAILED: True}
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError as exc:  # killed mid-answer, or something else printed on its stdout
        log.warning("DICOM worker answered no JSON: %s", exc)
        return {"error": "worker answered no JSON", WORKER_FAILED: True}
    return result


def default_worker() -> list[str]:
    return [sys.executable, "-m", "lastmile.console.dicom_worker"]


def report_view(report: StoredReport, study: SentStudy | None, current_id: int | None = None) -> ReportView:
    """A stored report as the pages show it: the patient and ECG as we sent them (the report's
    own patient fields are what the reading center wrote; a disagreement is in its problems).
    An ECG sent without a patient stays without one here: the patient the county typed is kept
    apart, as the county's (never taken for this clinic's record, never assigned from it).
    `current_id`: the version that replaced it, for a report a newer one superseded."""
    status = {"final": "received"}.get(report.status, report.status)
    ours = study.patient_id if study else ""
    return ReportView(
        report_id=str(report.id),
        study_uid=report.study_uid,
        patient_id=ours,
        patient_name=study.patient_name if study and ours else "",
        unassigned=not ours,
        county_patient_id="" if ours else report.patient_id,
        county_patient_name="" if ours else report.patient_name,
        device=study.device if study else "",
        ecg_time=ecg_time(study.ecg_time) if study else None,
        received_at=report.received_at,
        status=status,
        critical=bool(report.critical),
        reading_doctor=person_name(report.observer) if report.observer_is_pn else report.observer,
        text=report.text,
        has_pdf=report.document_type == PDF_TYPE,
        quality_verdict=study.quality_verdict if study else "",
        acknowledged_at=report.acknowledged_at,
        acknowledged_by=report.acknowledged_by,
        stat=study.stat if study else False,
        critical_reasons=report.critical,
        impressions=report.impressions,
        findings=report.findings,
        lines=report.lines,
        replaced_by=str(current_id) if current_id is not None and current_id != report.id else "",
    )


class StoredReports:
    """`ReportsSource` over the report store (current reports only: an amended one replaces)."""

    def __init__(self, store: ReportStore, *, worker: list[str] | None = None) -> None:
        self.store = store
        self.worker = worker or default_worker()

    def reports(self, limit: int = 200) -> list[ReportView]:
        studies = {s.study_uid: s for s in self.store.studies()}
        found = self.store.reports(current_only=True)
        found.sort(key=lambda r: (r.received_at, r.id), reverse=True)
        return [report_view(r, studies.get(r.study_uid)) for r in found[:limit]]

    def unacknowledged_critical(self) -> list[ReportView]:
        found = self.store.unacknowledged_critical()  # newest first, as `reports`
        found.sort(key=lambda r: (r.received_at, r.id), reverse=True)
        return [report_view(r, self.store.study(r.study_uid)) for r in found]

    def _stored(self, report_id: str) -> StoredReport | None:
        number = row_number(report_id)
        return None if number is None else self.store.get(number)

    def report(self, report_id: str) -> ReportView | None:
        found = self._stored(report_id)
        return None if found is None else self._view(found)

    def _view(self, report: StoredReport) -> ReportView:
        """One report opened (perhaps by an old link): with the version that now stands for it."""
        current = self.store.current_of(report.id) if report.superseded_by is not None else None
        return report_view(report, self.store.study(report.study_uid), current)

    def acknowledge(self, report_id: str, by: str, now: dt.datetime) -> ReportView | None:
        """The doctor read this report, and so the ECG's other current routine reports: the
        county's PDF of the same reading is one card with it (a critical one still needs its own
        "I have seen it")."""
        found = self._stored(report_id)
        if found is None:
            return None
        done = self.store.acknowledge(found.id, by, now)
        for sibling in self.store.reports(study_uid=found.study_uid, current_only=True):
            if sibling.id != found.id and sibling.acknowledged_at is None and not sibling.critical:
                self.store.acknowledge(sibling.id, by, now)
        return self._view(done)

    def print_job(self, report_id: str, reader: Reader) -> tuple[str, bytes] | None:
        """What the clinic printer gets, from one reading of the report: (note, document), the
        county's PDF behind the page `views.note_for_pdf` words ("" when it can print alone), else
        the text `views.text_printout` words (the same as `lastmile report print`) with no note.
        None: no such report."""
        found = self._stored(report_id)
        if found is None:
            return None
        pdf = self._document(found)
        if pdf:
            return note_for_pdf(self.store, found, reader), pdf
        return "", text_printout(self.store, found, reader).encode("utf-8")

    def pdf(self, report_id: str) -> bytes | None:
        found = self._stored(report_id)
        return None if found is None else self._document(found)

    def _document(self, found: StoredReport) -> bytes | None:
        """The county's PDF taken out of the stored object (in a worker: pydicom stays out of the
        console's process); None when it sent none or none can be taken out."""
        data = self.store.data_of(found.id) if found.document_type == PDF_TYPE else None
        if not data:
            return None
        job = {
            "job": "report-document",
            "source": found.source,
            "data": base64.b64encode(data).decode(),
        }
        result = run_worker(job, self.worker)
        document = result.get("document")
        if not document:
            log.warning("report %s: no PDF could be taken out (%s)", found.id, result.get("error", "none in it"))
            return None
        return base64.b64decode(document)


def held_view(item: OutboxItem) -> HeldEcg:
    quality = item.meta.get("quality")
    refused = _refused_patient(item) if item.hold_reason == UNASSIGNED_HOLD else {}
    # a cart's object keeps the ID it refused as its patient: Today shows it as a file's, no patient
    patient = {} if refused else item.patient or {}
    return HeldEcg(
        item_id=item.id,
        recorded_at=recorded_at(item),
        reason=item.hold_reason or "",
        hold_until=dt.datetime.fromtimestamp(item.hold_until or item.created_at, dt.timezone.utc),
        device=str(item.meta.get("device") or ""),
        quality_verdict=str(quality.get("verdict") or "") if isinstance(quality, dict) else "",
        patient_id=str(patient.get("patient_id") or ""),
        patient_name=str(patient.get("name") or ""),
        stat=bool(item.meta.get("stat")),
        checked_in_name=str(item.meta.get("checked_in_name") or ""),
        file_sex=str(patient.get("sex") or ""),
        file_birth_date=str(patient.get("birth_date") or ""),
        id_sex=str(item.meta.get("id_sex") or ""),
        id_birth_date=str(item.meta.get("id_birth_date") or ""),
        **refused,
        sent_as_written=item.meta.get("source_format") == LAN_SOURCE_FORMAT,
    )


def _refused_patient(item: OutboxItem) -> dict[str, Any]:
    """What the file of an ECG held with no patient said, when its patient ID was refused
    (`lastmile.ecg.intake.refused_patient_meta`); {} for a file that named nobody."""
    if "file_patient_id_problem" not in item.meta:
        return {}
    return {
        "id_refused": True,
        "refused_id": str(item.meta.get("file_patient_id") or ""),
        "refused_name": str(item.meta.get("file_patient_name") or ""),
        "refused_id_problem": str(item.meta.get("file_patient_id_problem") or ""),
    }


def _assigned_already(item: OutboxItem | None, patient: Patient, now_s: float) -> EcgAssigned | None:
    """What held ECG `item` shows at `now_s` if the doctor's assign to `patient`'s ID is on it; None if not."""
    if item is None or item.patient is None or ASSIGNED_BY_DOCTOR not in item.meta.get("flags", []):
        return None
    if item.patient.get("patient_id") != patient.patient_id:
        return None
    waits = item.hold_reason == QUALITY_HOLD and item.held(now_s)
    log.info("held ECG E%d: its worker failed, but the assign is on it", item.id)
    return EcgAssigned(patient_from_json(item.patient), waits_for_quality=waits)


def _still_held(item: OutboxItem | None, now_s: float) -> bool:
    """Whether `item` is still held at `now_s` for the doctor to decide."""
    return item is not None and item.held(now_s) and item.hold_reason in DOCTOR_HOLDS


class OutboxHeldEcgs:
    """`HeldEcgSource` over the outbox: the same holds and decisions as the commands."""

    def __init__(self, outbox: Outbox, config: Config, *, worker: list[str] | None = None) -> None:
        self.outbox = outbox
        self.config = config
        self.worker = worker or default_worker()
        self._failed_items: set[int] = set()  # held ECGs whose assign worker failed, till one is done

    def held_ecgs(self, now: dt.datetime) -> list[HeldEcg]:
        return [held_view(item) for item in held_ecgs(self.outbox, now.timestamp())]

    def assign(self, item_id: int, patient: Patient, *, now: dt.datetime, by: str = "") -> EcgAssigned | None:
        o = self.config.outbox
        job = {
            "job": "assign-ecg",
            "data_dir": str(self.config.data_dir),
            "outbox": {
                "min_free_bytes": o.min_free_mb * 2**20,
                "backoff_base_s": o.backoff_base_s,
                "backoff_max_s": o.backoff_max_s,
            },
            "item_id": item_id,
            "patient": patient_json(patient),
            "now": now.isoformat(),
            "by": by,
        }
        result = run_worker(job, self.worker)
        if result.get("storage_full"):
            raise OutboxFullError(str(result["error"]))  # the console answers "storage full"
        if result.get("damaged"):
            self._failed_items.discard(item_id)
            raise EcgDamaged(str(result["error"]))  # set aside: the doctor records it again
        if "error" in result:
            log.info("held ECG E%d not assigned: %s", item_id, result["error"])
            # a worker that failed says nothing of the ECG: "too late" only if it is really gone
            # (believing it sent, the doctor stops trying, and it goes as 无患者 when its hold ends)
            if result.get(WORKER_FAILED):
                # the item as it is once the worker is over, read once, at one time: now, not the
                # request's (the hold may have ended while the worker hung)
                item, now_s = self.outbox.get(item_id), time.time()
                # it may have committed the assign and then failed (timed out on a loaded Pi):
                # "try again" then makes him record again, a second study
                done = _assigned_already(item, patient, now_s)
                if done is not None:
                    self._failed_items.discard(item_id)
                    return done
                if _still_held(item, now_s):
                    again = item_id in self._failed_items
                    self._failed_items.add(item_id)
                    raise EcgAssignFailed(f"held ECG E{item_id}: {result['error']}", again=again)
            self._failed_items.discard(item_id)
            return None
        self._failed_items.discard(item_id)
        return EcgAssigned(patient_from_json(result["patient"]), waits_for_quality=bool(result["waits_for_quality"]))

    def send_anyway(self, item_id: int, *, now: dt.datetime, by: str = "") -> bool:
        try:
            release_held_ecg(self.outbox, item_id, now.timestamp(), by=by)
        except HeldEcgError as exc:
            log.info("%s", exc)
            return False
        return True

    def discard(self, item_id: int, *, now: dt.datetime, by: str = "") -> bool:
        try:
            discard_held_ecg(self.outbox, item_id, now.timestamp(), by=by)
        except HeldEcgError as exc:
            log.info("%s", exc)
            return False
        return True
