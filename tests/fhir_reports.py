"""A DiagnosticReport as a county platform serves it, for the tests of reports coming back over
FHIR (the poller's, and the console's printing of them)."""

from __future__ import annotations

from tests.fhir_server import validate_resource

TOKEN = "s3cret-token"  # the platform's bearer token in the FHIR report tests


def report_for(
    study_uid: str, *, status: str = "final", conclusion: str = "Sinus rhythm. Normal ECG.", **extra
) -> dict:
    resource = {
        "resourceType": "DiagnosticReport",
        "status": status,
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "11524-6", "display": "EKG study"}]},
        "subject": {"identifier": {"system": "urn:lastmile:patient-id", "value": "P1"}},
        "issued": "2026-11-02T10:00:00+08:00",
        "resultsInterpreter": [{"display": "Dr. Chen Jing"}],
        "conclusion": conclusion,
        **extra,
    }
    validate_resource(resource)  # what the platform serves is valid R4
    return resource
