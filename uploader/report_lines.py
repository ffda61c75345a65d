"""A returned report's readable text as lines in no language (pure; no pydicom, so the console
and `lastmile report show` read stored lines without it).

The reading center's words (the title, concept names, values, the conclusion, the reading
doctor's name, the report's time) are kept exactly as written. What the gateway itself says
about them ("amended", "critical result", "read by", "could not read", "(no value)") is a line's
`kind`: it is worded in the reader's language where the report is shown
(`lastmile.reports.report_text`, through the console's gettext catalog).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any


class LineKind(StrEnum):
    # the header
    TITLE = "title"  # value: the title as written ("": none given)
    UNREADABLE = "unreadable"  # the object could not be read at all (kept as received)
    AMENDED = "amended"  # number: earlier reports it replaces (0: a corrected version of itself)
    WITHDRAWN = "withdrawn"  # value: the status the reading center gave it (entered-in-error, cancelled)
    CRITICAL_CODE = "critical-code"  # name: the concept; value: its coded value's meaning; code: "SCHEME CODE"
    # name: the configured keyword; value: the text it is in; code, concept: the name (as written)
    # and its code of the SR item whose value it is in (older reports: value "name: value")
    CRITICAL_KEYWORD = "critical-keyword"
    # name: the result; value: its interpretation (FHIR: its display, else its code); concept: the
    # result's code; value_concept: the interpretation's, "V3-OBSINT HH" (older lines: none)
    CRITICAL_INTERPRETED = "critical-interpreted"
    # the body: one content item each (SR), at `depth`; `code` holds the ValueType when the
    # item has no concept name (the gateway then names the kind of item)
    CONTAINER = "container"  # name: the section's heading
    ITEM = "item"  # name: the concept; value: its value as written (value_concept: its code, if coded)
    NO_VALUE = "no-value"  # a NUM item without a measured value
    REFERENCE = "reference"  # value: the kind of object referred to (DICOM's SOP class name; "": unknown)
    COORDINATES = "coordinates"  # a spatial or temporal coordinates item (not drawn)
    CONCLUSION = "conclusion"  # value: a FHIR report's conclusion
    CODED = "coded"  # value: one coded conclusion's display; value_concept: its code
    RESULT = "result"  # name: a result's name; value: its value (concept, value_concept: their codes)
    PRESENTED = "presented"  # value: a text form of the report as sent
    # the footer
    DOCUMENT = "document"  # value: its MIME type; number: its size in bytes
    # name: the reading doctor ("": not named); value: the report's time; code: PERSON_NAME when
    # the name is a DICOM person name (its parts as sent), "" when free text (FHIR), shown as written
    READ_BY = "read-by"
    PROBLEM = "problem"  # value: what could not be read (technical, for the county's IT)
    CHECK_PATIENT = "check-patient"  # name: the patient the report names; value: the one the ECG was of


# A line's code when its name (READ_BY) or value (ITEM) is a DICOM person name kept as sent, its
# parts written as people write them where it is shown: the SR value type of a person name item
# (PS3.3 C.17.3.2.1), which an ITEM's code holds anyway; the reading doctor's line uses it too.
PERSON_NAME = "PNAME"
# What older gateways stored as a READ_BY line's code for PERSON_NAME: "PN" (the person name VR).
_OLD_READ_BY_CODE = "PN"

# coding scheme spellings that mean the same thing
_SCHEME_ALIASES = {
    "SRT": "SCT",
    "SNM3": "SCT",
    "HTTP://SNOMED.INFO/SCT": "SCT",
    "HTTP://LOINC.ORG": "LN",
    "HTTP://TERMINOLOGY.HL7.ORG/CODESYSTEM/V3-OBSERVATIONINTERPRETATION": "V3-OBSINT",
}


def normal_scheme(scheme: str) -> str:
    s = scheme.strip().upper()
    return _SCHEME_ALIASES.get(s, s)


OBSERVATION_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def interpretation_concept(code: str) -> str:
    """A FHIR result's interpretation flag ("HH") as a line keeps its code: "V3-OBSINT HH" (the
    reader takes the flag by its code, whatever system the county named)."""
    return concept_key(OBSERVATION_INTERPRETATION, code)


def concept_key(scheme: str, code: str) -> str:
    """A coded concept as a report line keeps it: "SCT 401303003" (the scheme as DICOM names it;
    "" when it has no code)."""
    return f"{normal_scheme(scheme)} {code.strip()}" if scheme.strip() and code.strip() else ""


HEADER = frozenset({LineKind.TITLE, LineKind.UNREADABLE, LineKind.AMENDED, LineKind.WITHDRAWN})
CRITICAL = frozenset({LineKind.CRITICAL_CODE, LineKind.CRITICAL_KEYWORD, LineKind.CRITICAL_INTERPRETED})
FOOTER = frozenset({LineKind.DOCUMENT, LineKind.READ_BY, LineKind.PROBLEM, LineKind.CHECK_PATIENT})


@dataclass(frozen=True)
class ReportLine:
    kind: LineKind
    name: str = ""
    value: str = ""
    code: str = ""
    depth: int = 0
    number: int = 0
    # the concept name's code, "SCHEME CODE" (DCM 121070), where the county coded it: the name
    # (TITLE: the value) is then worded in the reader's language if the gateway knows the concept
    concept: str = ""
    # a coded value's code, "SCHEME CODE" (DCM 121006, SCT 401303003): the value is then worded
    # in the reader's language if the gateway knows the code (the county's words otherwise)
    value_concept: str = ""

    def to_json(self) -> dict[str, Any]:
        """Only what differs from the defaults: a report of 200 lines stays small in clinic.db."""
        return {k: v for k, v in asdict(self).items() if k == "kind" or v != _DEFAULTS[k]}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> ReportLine:
        """A stored line; raises ValueError on a kind or field this version does not know."""
        unknown = set(value) - _DEFAULTS.keys() - {"kind"}
        if unknown:
            raise ValueError(f"unknown report line fields {sorted(unknown)}")
        kind = LineKind(value["kind"])
        code = str(value.get("code", ""))
        if kind is LineKind.READ_BY and code == _OLD_READ_BY_CODE:
            code = PERSON_NAME
        return cls(
            kind=kind,
            name=str(value.get("name", "")),
            value=str(value.get("value", "")),
            code=code,
            depth=int(value.get("depth", 0)),
            number=int(value.get("number", 0)),
            concept=str(value.get("concept", "")),
            value_concept=str(value.get("value_concept", "")),
        )


_DEFAULTS = {f.name: f.default for f in fields(ReportLine) if f.name != "kind"}


def critical_lines(lines: Iterable[ReportLine]) -> list[ReportLine]:
    """The reasons a report is critical, each once, in order."""
    return list(dict.fromkeys(line for line in lines if line.kind in CRITICAL))


def split_concept(stored: str) -> str:
    """A CRITICAL_CODE line's code as stored ("SRT 401303003", "http://snomed.info/sct
    401303003") as `concept_key` keys it ("SCT 401303003")."""
    scheme, _, code = stored.rpartition(" ")
    return concept_key(scheme, code)
