"""A patient entered at the gateway (CLI, scanner, console) by ID and name, checked against
`[patient] id_kind`. Kept apart from `lastmile.ecg.intake` (pydicom) so the console, whose
process must stay small, checks IDs exactly as the commands do."""

from __future__ import annotations

from devices.identity import InvalidPatientIdError, Patient, parse_resident_id, resident_id_required
from lastmile.clinic.names import dicom_person_name
from lastmile.config import Config


def clinic_patient(patient_id: str, name: str, config: Config) -> Patient:
    """The patient `patient_id` (`name`), checked against `[patient] id_kind`:
    InvalidPatientIdError (bilingual message, `reason` naming the rule) for a wrong resident ID
    (with any kind of ID, also for what only looks like one: `resident_id_required`).
    A resident ID gives birth date and sex; the issuer comes from `[patient] id_issuer`."""
    patient_id = " ".join(patient_id.split())
    if not patient_id:
        raise InvalidPatientIdError("请输入患者编号 / a patient needs a non-empty identifier")
    birth, sex = None, ""
    if resident_id_required(patient_id, config.patient.id_kind):
        resident = parse_resident_id(patient_id)
        patient_id, birth, sex = resident.number, resident.birth_date, resident.sex
    return Patient(
        patient_id=patient_id, name=dicom_person_name(name), birth_date=birth, sex=sex, issuer=config.patient.id_issuer
    )
