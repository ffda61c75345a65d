"""A patient entered at the gateway (CLI, scanner, console) by ID and name, checked against
`[patient] id_kind`. Kept apart from `lastmile.ecg.intake` (pydicom) so the console, whose
process must stay small, checks IDs exactly as the commands do."""

from __future__ import annotations

from devices.identity import InvalidPatientIdError, Patient, ResidentId, parse_resident_id, resident_id_required
from lastmile.clinic.names import dicom_person_name
from lastmile.config import Config


def kept_patient_id(patient_id: str, id_kind: str) -> tuple[str, ResidentId | None]:
    """`patient_id` as the gateway keeps it, and the resident ID it is: runs of spaces as one; one
    `resident_id_required` under `id_kind` checked (InvalidPatientIdError) and normalised, e.g.
    "110105 19491231 002x" -> "11010519491231002X". Every path an ID enters by keeps it so."""
    patient_id = " ".join(patient_id.split())
    if not resident_id_required(patient_id, id_kind):
        return patient_id, None
    resident = parse_resident_id(patient_id)
    return resident.number, resident


def clinic_patient(patient_id: str, name: str, config: Config) -> Patient:
    """The patient `patient_id` (`name`), checked against `[patient] id_kind`:
    InvalidPatientIdError (bilingual message, `reason` naming the rule) for a wrong resident ID
    (with any kind of ID, also for what only looks like one: `resident_id_required`).
    A resident ID gives birth date and sex; the issuer comes from `[patient] id_issuer`."""
    if not patient_id.split():
        raise InvalidPatientIdError("请输入患者编号 / a patient needs a non-empty identifier")
    patient_id, resident = kept_patient_id(patient_id, config.patient.id_kind)
    return Patient(
        patient_id=patient_id,
        name=dicom_person_name(name),
        birth_date=resident.birth_date if resident else None,
        sex=resident.sex if resident else "",
        issuer=config.patient.id_issuer,
    )
