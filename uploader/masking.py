"""Keeping patients out of text that leaves a sender: logs, stored errors, status lines.

A peer's own words — a FHIR OperationOutcome's diagnostics, a DICOM C-STORE ErrorComment —
are free text that may name the patient ("Patient P123 'Zhang^San' already exists"). Such text
reaches exception messages, and from there the logs, the outbox's stored `last_error` and
quarantine reasons, and `lastmile queue`. `mask_server_text` masks it where it enters:
the values of the item being sent (its patient id, name, birth date: the sender knows them)
and the shapes patient data takes anywhere (`PATIENT_PATTERNS`, also used by the log filter
in `lastmile.logs`). What the error *means* (the status, the field, the rule broken) stays.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

MASK = "<patient>"
MIN_KNOWN_LENGTH = 2  # shorter values would mask ordinary words

# Shapes patient data takes in messages we, our libraries or our peers write. Each pattern's
# group "v" is masked.
PATIENT_PATTERNS: tuple[re.Pattern[str], ...] = (
    # key=value / key: value with a patient-ish key (PatientID, patient_id, patient name, birth
    # date), also as a JSON member ("birthDate": "1950-01-01")
    re.compile(
        r"(?i)\b(?:patient[ _-]?(?:id|name|identifier)|other[ _-]?patient[ _-]?ids|"
        r"patient|birth[ _-]?date|PatientBirthDate)\b[\"']?\s*[=:]\s*"
        r"(?P<v>'[^']*'|\"[^\"]*\"|[^\s,;)\]}]+)"
    ),
    # DICOM person names: Family^Given[^Middle...]
    re.compile(r"(?P<v>\b[^\s^=,;:'\"()\[\]{}]+\^[^\s=,;'\"()\[\]{}]*)"),
    # FHIR references and search parameters: Patient/123, Patient?identifier=sys|123
    re.compile(r"\bPatient/(?P<v>[A-Za-z0-9\-.]{1,64})"),
    re.compile(r"(?i)\bpatient[^\s|]{0,80}\|(?P<v>[^\s,;)\]}&\"']+)"),
)


def mask_patterns(text: str, replace: Callable[[str], str], extra: Iterable[re.Pattern[str]] = ()) -> str:
    """Every match of `extra` and `PATIENT_PATTERNS` has its group "v" replaced by
    `replace(value)`; values already masked (`<patient...>`) are left alone."""

    def substitute(m: re.Match[str]) -> str:
        value = m.group("v")
        if value.strip("'\"").startswith("<patient"):
            return m.group(0)
        start, end = m.span("v")
        base = m.start(0)
        whole = m.group(0)
        return whole[: start - base] + replace(value.strip("'\"")) + whole[end - base :]

    for pattern in (*extra, *PATIENT_PATTERNS):
        text = pattern.sub(substitute, text)
    return text


def mask_server_text(text: str, known: Iterable[str] = ()) -> str:
    """`text` with the known patient values and anything shaped like patient data masked."""
    if not text:
        return text
    for value in sorted({v for v in known if v and len(v) >= MIN_KNOWN_LENGTH}, key=len, reverse=True):
        text = text.replace(value, MASK)
    return mask_patterns(text, lambda _value: MASK)
