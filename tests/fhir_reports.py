"""A DiagnosticReport as a county platform serves it, for the tests of reports coming back over
FHIR (the poller's, and the console's printing of them)."""

from __future__ import annotations

from tests.fhir_server import validate_resource

TOKEN = "s3cret-token"  # the platform's bearer token in the FHIR report tests


def diagnostic_report(study_uid: str, **extra: object) -> dict:
    """The platform's final report on the ECG study `study_uid` of patient P1, `extra` fields
    added or replaced - unchecked: a malformed one's faults are given in `extra`."""
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "11524-6", "display": "EKG study"}]},
        "subject": {"identifier": {"system": "urn:lastmile:patient-id", "value": "P1"}},
        "issued": "2026-11-02T10:00:00+08:00",
        "conclusion": "Sinus rhythm. Normal ECG.",
        **extra,
    }


def report_for(
    study_uid: str, *, status: str = "final", conclusion: str = "Sinus rhythm. Normal ECG.", **extra
) -> dict:
    """`diagnostic_report` with its reader named, checked valid R4."""
    named = {"resultsInterpreter": [{"display": "Dr. Chen Jing"}], **extra}  # `extra` may name another reader
    resource = diagnostic_report(study_uid, status=status, conclusion=conclusion, **named)
    validate_resource(resource)  # what the platform serves is valid R4
    return resource
