"""The console's helper process for what needs pydicom: one job as JSON on stdin, its result on stdout.

    python -m lastmile.console.dicom_worker < job.json

pydicom (and the DICOM builders) take ~25 MB that the long-lived console must not keep (its
budget is 64 MB), so the two things the doctor rarely does that need them run here, in a
short-lived child, through the very functions the commands use:
- {"job": "assign-ecg", ...}: `lastmile patient assign E<n>` (`lastmile.ecg.intake.assign_held_ecg`);
  answers what it did - {"item": ..., "patient": the patient the ECG now carries, "waits_for_quality":
  still held for its 're-record' verdict} - or {"error": ...} (with "storage_full": true when there
  was no room for it, "damaged": true when the cart's file could not carry the answer: set aside).
- {"job": "report-document", "source": ..., "data": base64}: the document (PDF) a stored report
  carries, as `lastmile report print` finds it; answers {"document": base64 | null, "type": ...}.
The exit code is 0 either way (1 only for a crash).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sqlite3
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devices.identity import Patient


def patient_json(patient: Patient) -> dict[str, Any]:
    """A patient as the assign job and its answer carry it (the outbox item's patient fields)."""
    return {
        "patient_id": patient.patient_id,
        "name": patient.name,
        "birth_date": patient.birth_date.isoformat() if patient.birth_date else None,
        "sex": patient.sex,
        "issuer": patient.issuer,
    }


def patient_from_json(p: Mapping[str, Any]) -> Patient:
    return Patient(
        patient_id=p["patient_id"],
        name=p.get("name") or "",
        birth_date=dt.date.fromisoformat(p["birth_date"]) if p.get("birth_date") else None,
        sex=p.get("sex") or "",
        issuer=p.get("issuer") or "",
    )


def assign_ecg(job: dict[str, Any]) -> dict[str, Any]:
    from lastmile.ecg.holds import QUALITY_HOLD
    from lastmile.ecg.intake import DamagedEcgError, HeldEcgError, assign_held_ecg
    from uploader.errors import OutboxFullError
    from uploader.outbox import Outbox, is_storage_full

    now = dt.datetime.fromisoformat(job["now"])
    try:
        outbox = Outbox.open(Path(job["data_dir"]), **job.get("outbox", {}))
        try:
            item = assign_held_ecg(
                outbox, int(job["item_id"]), patient_from_json(job["patient"]), now=now, by=job.get("by", "")
            )
        finally:
            outbox.close()
    except DamagedEcgError as exc:  # set aside: the doctor records it again (not "try again", not "too late")
        return {"error": str(exc), "damaged": True}
    except HeldEcgError as exc:
        return {"error": str(exc)}
    except (OutboxFullError, sqlite3.OperationalError) as exc:
        if not is_storage_full(exc):
            raise
        # the rebuilt ECG had no room: the console says so (not "too late: sent already")
        return {"error": str(exc), "storage_full": True}
    return {
        "item": item.id,
        "patient": item.patient,  # as `as_on_file` made it: the name and birth date its file gave that ID
        # a 're-record' verdict holds it still: it goes only when the doctor decides (or the hold ends)
        "waits_for_quality": item.hold_reason == QUALITY_HOLD and item.held(now.timestamp()),
        "accession": item.meta.get("accession_number"),
    }


def report_document(job: dict[str, Any]) -> dict[str, Any]:
    from uploader.report_reading import UnreadableReport, read_dicom_report, read_fhir_report

    data = base64.b64decode(job["data"])
    try:
        content = read_fhir_report(json.loads(data)) if job["source"] == "fhir" else read_dicom_report(data)
    except (UnreadableReport, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    document = content.document
    return {
        "document": base64.b64encode(document).decode("ascii") if document else None,
        "type": content.document_type,
    }


JOBS = {"assign-ecg": assign_ecg, "report-document": report_document}


def main() -> int:
    job = json.loads(sys.stdin.buffer.read())
    result = JOBS[job["job"]](job)
    sys.stdout.write(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
