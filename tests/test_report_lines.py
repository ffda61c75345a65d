"""A returned report's lines as stored in clinic.db and read back (uploader/report_lines.py), with no
`lastmile` import: the focused tests the mutation bench runs for this module. A bug here shows the
cardiologist's report with a line lost, on the wrong line, nested wrongly, or with a critical
result hidden or repeated."""

from __future__ import annotations

import json

import pytest

from uploader.report_lines import CRITICAL, FOOTER, HEADER, PERSON_NAME, LineKind, ReportLine, critical_lines

TITLE = ReportLine(LineKind.TITLE, value="ECG report")
ST_ELEVATION = ReportLine(LineKind.ITEM, name="Finding", value="ST elevation", depth=2)
STEMI_CODE = ReportLine(LineKind.CRITICAL_CODE, name="Finding", value="STEMI", code="SCT 401303003")
STEMI_KEYWORD = ReportLine(LineKind.CRITICAL_KEYWORD, name="危急值", value="危急值: STEMI")
AMENDED_TWICE = ReportLine(LineKind.AMENDED, number=2)
PDF = ReportLine(LineKind.DOCUMENT, value="application/pdf", number=48_213)
READ_BY = ReportLine(LineKind.READ_BY, name="Li^Wei", value="2026-12-01T10:15:00+08:00")


def test_a_line_with_no_depth_or_number_is_top_level_and_counts_nothing() -> None:
    """Defaults: an unnested item (not shown as a sub-item of the line before) and an amendment
    count of zero (a corrected version of itself, not 'replaces one earlier report')."""
    line = ReportLine(LineKind.ITEM, name="Rhythm", value="Sinus")
    assert (line.depth, line.number) == (0, 0)
    assert (line.name, line.value, line.code) == ("Rhythm", "Sinus", "")


def test_stored_form_keeps_only_what_differs_from_the_defaults_and_always_the_kind() -> None:
    """A line with only defaults still stores its kind (else it could not be read back: a lost
    line); a default field is left out; every set field is kept (else a value is lost)."""
    assert ReportLine(LineKind.UNREADABLE).to_json() == {"kind": "unreadable"}
    assert ST_ELEVATION.to_json() == {"kind": "item", "name": "Finding", "value": "ST elevation", "depth": 2}
    assert PDF.to_json() == {"kind": "document", "value": "application/pdf", "number": 48_213}
    assert AMENDED_TWICE.to_json() == {"kind": "amended", "number": 2}


@pytest.mark.parametrize("line", [TITLE, ST_ELEVATION, STEMI_CODE, STEMI_KEYWORD, AMENDED_TWICE, PDF, READ_BY])
def test_every_line_reads_back_exactly_as_stored(line: ReportLine) -> None:
    """Through JSON text as clinic.db holds it: the same kind, words, nesting and number."""
    assert ReportLine.from_json(json.loads(json.dumps(line.to_json()))) == line


def test_a_stored_line_with_only_its_kind_reads_back_with_the_defaults() -> None:
    """A top-level line stays top level and an amendment of itself stays 0 after a round trip."""
    line = ReportLine.from_json({"kind": "item", "name": "Rhythm"})
    assert line == ReportLine(LineKind.ITEM, name="Rhythm")
    assert (line.value, line.code, line.depth, line.number) == ("", "", 0, 0)


def test_a_field_from_a_newer_gateway_is_refused_not_dropped() -> None:
    """A line this version cannot fully show raises (the caller shows the report as unreadable)
    instead of silently losing what the field said."""
    with pytest.raises(ValueError, match=r"unknown report line fields \['colour'\]"):
        ReportLine.from_json({"kind": "item", "name": "Rhythm", "colour": "red"})
    with pytest.raises(ValueError):
        ReportLine.from_json({"kind": "a kind from a newer gateway"})


def test_critical_lines_are_the_critical_reasons_each_once_in_report_order() -> None:
    """The critical banner lists every reason once, in the order the report gives them, and
    nothing that is not a critical reason (a title or a finding is not an alarm)."""
    lines = [TITLE, STEMI_KEYWORD, ST_ELEVATION, STEMI_CODE, STEMI_KEYWORD, READ_BY]
    assert critical_lines(lines) == [STEMI_KEYWORD, STEMI_CODE]
    assert critical_lines(iter([TITLE, ST_ELEVATION, READ_BY])) == []


def test_header_critical_and_footer_kinds_do_not_overlap() -> None:
    """A line is shown in one place only: never both in the header and among the body or footer."""
    assert not (HEADER & CRITICAL or HEADER & FOOTER or CRITICAL & FOOTER)
    assert LineKind.CHECK_PATIENT in FOOTER and LineKind.AMENDED in HEADER


def test_a_reading_doctor_stored_with_the_older_person_name_code_reads_as_a_person_name() -> None:
    """Older gateways coded the reading doctor's line "PN" (the VR), a person name item "PNAME": both
    read back as PERSON_NAME, or the doctor is shown with the "^" and "=" the county sent."""
    stored = {"kind": "read-by", "name": "Li^Wei", "value": "2026-12-01T10:15:00+08:00", "code": "PN"}
    assert ReportLine.from_json(stored) == ReportLine(LineKind.READ_BY, "Li^Wei", stored["value"], PERSON_NAME)
    item = {"kind": "item", "name": "Person Observer Name", "value": "Li^Wei", "code": "PNAME"}
    assert ReportLine.from_json(item).code == PERSON_NAME
