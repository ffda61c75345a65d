"""Reading report objects (pure): SR content trees to text, PDFs as they are, FHIR
DiagnosticReports, the critical flag, and odd or hostile bytes (read with problems, or the typed
error — never anything else)."""

from __future__ import annotations

import base64
import copy
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from lastmile.demo.cardiologist import (
    SINUS_RHYTHM,
    STEMI,
    StudyToRead,
    content_item,
    ecg_report_sr,
    minimal_pdf,
    part10,
    report_pdf,
)
from lastmile.reports.report_text import English, report_text
from tests.fhir_server import validate_resource
from tests.report_peers import critical_observation
from uploader.report_lines import LineKind, ReportLine
from uploader.report_reading import (
    MAX_DEPTH,
    CriticalRules,
    ReportContent,
    UnreadableReport,
    read_dicom_report,
    read_fhir_report,
    unreadable_fhir_report,
)

STUDY = StudyToRead("1.2.826.0.1.3680043.8.498.1", patient_id="P0042", patient_name="Wang^Fang")
RULES = CriticalRules.parse(["SCT:401303003", "SCT:71908006"], ["危急值", "Critical Result"])


def text_of(c: ReportContent) -> str:
    """The report's lines worded in English (as the store keeps its text)."""
    return report_text(c.lines, English())


def normal_sr(**kw) -> Dataset:
    return ecg_report_sr(
        STUDY,
        findings=["Sinus rhythm, 72/min", "Normal axis"],
        impression="Normal ECG",
        coded_findings=[SINUS_RHYTHM],
        reader="Chen^Jing",
        **kw,
    )


def test_sr_is_rendered_to_readable_text_with_its_reading_doctor() -> None:
    sr = normal_sr()
    c = read_dicom_report(part10(sr), RULES)
    assert (c.kind, c.object_uid, c.study_uid, c.patient_id) == ("sr", sr.SOPInstanceUID, STUDY.study_uid, "P0042")
    assert c.title == "ECG Report" and c.status == "final" and not c.problems and not c.critical
    assert c.findings == ("Sinus rhythm, 72/min", "Normal axis", "Sinus rhythm")
    assert c.impressions == ("Normal ECG",)
    assert c.observer == "Chen^Jing"  # the PN as sent: report_text.display_name writes it
    assert c.report_time.startswith(sr.ContentDate[:4])
    lines = text_of(c).splitlines()
    assert lines[0] == "ECG Report"
    assert "  Finding: Sinus rhythm, 72/min" in lines and "  Impression: Normal ECG" in lines
    assert lines[-1].startswith("Read by Chen Jing, ")


def test_chinese_text_survives() -> None:
    sr = ecg_report_sr(STUDY, findings=["窦性心律"], impression="正常心电图")
    c = read_dicom_report(part10(sr), RULES)
    assert c.impressions == ("正常心电图",) and "窦性心律" in text_of(c)


@pytest.mark.parametrize(
    ("complete", "verified", "status"),
    [
        (True, True, "final"),
        (False, True, "preliminary"),
        (True, False, "preliminary"),
        (False, False, "preliminary"),
    ],
)
def test_status_from_completion_and_verification(complete: bool, verified: bool, status: str) -> None:
    c = read_dicom_report(part10(normal_sr(complete=complete, verified=verified)), RULES)
    assert c.status == status and not c.problems


def test_predecessor_documents_make_an_amendment() -> None:
    first = normal_sr()
    second = normal_sr(amends=first)
    c = read_dicom_report(part10(second), RULES)
    assert c.status == "amended" and c.amends == (first.SOPInstanceUID,) and "AMENDED" in text_of(c)


def test_critical_by_code_by_scheme_alias_and_by_keyword() -> None:
    coded = read_dicom_report(
        part10(ecg_report_sr(STUDY, findings=["ST up"], impression="x", coded_findings=[STEMI])), RULES
    )
    assert coded.critical and "401303003" in coded.critical[0] and "CRITICAL RESULT" in text_of(coded)
    old_scheme = ecg_report_sr(STUDY, findings=[], impression="x", coded_findings=[("71908006", "SRT", "VF")])
    assert read_dicom_report(part10(old_scheme), RULES).critical  # SRT is SNOMED's old designator
    keyword = read_dicom_report(part10(ecg_report_sr(STUDY, findings=[], impression="请立即处理：危急值")), RULES)
    assert keyword.critical and "危急值" in keyword.critical[0]
    shouting = read_dicom_report(
        part10(ecg_report_sr(STUDY, findings=["CRITICAL RESULT called"], impression="")), RULES
    )
    assert shouting.critical
    assert not read_dicom_report(part10(normal_sr()), RULES).critical
    assert not read_dicom_report(
        part10(ecg_report_sr(STUDY, findings=[], impression="x", coded_findings=[STEMI])), CriticalRules()
    ).critical  # nothing configured: nothing critical


def test_critical_rules_refuse_a_code_without_scheme() -> None:
    with pytest.raises(ValueError, match="SCHEME:CODE"):
        CriticalRules.parse(["401303003"], [])


def test_pdf_is_kept_as_it_is() -> None:
    ds = report_pdf(STUDY, ["Normal ECG"], title="ECG report")
    c = read_dicom_report(part10(ds), RULES)
    assert (c.kind, c.status, c.title, c.document_type) == ("pdf", "final", "ECG report", "application/pdf")
    assert c.document == ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength]  # pad byte dropped
    assert c.document.startswith(b"%PDF-1.4") and c.document.rstrip().endswith(b"%%EOF")


def test_an_encapsulated_document_that_is_no_pdf_is_flagged() -> None:
    ds = report_pdf(STUDY, ["x"])
    ds.EncapsulatedDocument = b"<html>not a pdf</html>"
    c = read_dicom_report(part10(ds), RULES)
    assert c.status == "preliminary" and "not a PDF" in " ".join(c.problems)


def test_minimal_pdf_cross_reference_points_at_its_objects() -> None:
    pdf = minimal_pdf(["Line (one)", "back\\slash", "非ASCII"])
    startxref = int(re.search(rb"startxref\n(\d+)", pdf).group(1))
    assert pdf[startxref:].startswith(b"xref")
    offsets = [int(m) for m in re.findall(rb"(\d{10}) 00000 n", pdf)]
    assert [pdf[o:].split(b"\n", 1)[0] for o in offsets] == [b"%d 0 obj" % i for i in range(1, 6)]
    assert b"(Line \\(one\\)) Tj" in pdf and b"(back\\\\slash) Tj" in pdf and b"(?ASCII) Tj" in pdf


def test_malformed_tree_is_read_with_problems_never_raised() -> None:
    sr = normal_sr()
    findings = sr.ContentSequence[2].ContentSequence
    del findings[0].TextValue
    findings[1].ValueType = "SPLINE"
    del findings[2].ConceptCodeSequence
    findings.append(Dataset())  # no value type, no concept
    sr.ValueType = "TEXT"
    c = read_dicom_report(part10(sr), RULES)
    problems = " ".join(c.problems)
    for expected in ("no TextValue", "SPLINE", "no ConceptCodeSequence", "no ValueType", "not CONTAINER"):
        assert expected in problems
    assert "Could not read:" in text_of(c) and "Normal ECG" in text_of(c)  # the rest is still shown


def test_deep_and_huge_trees_are_bounded() -> None:
    sr = normal_sr()
    node = sr.ContentSequence[2]
    for _ in range(MAX_DEPTH + 5):
        child = content_item("CONTAINS", "CONTAINER", ("121070", "DCM", "Findings"))
        child.ContentSequence = []
        node.ContentSequence = [child]
        node = child
    c = read_dicom_report(part10(sr), RULES)
    assert any("deeper than" in p for p in c.problems)
    wide = normal_sr()
    wide.ContentSequence[2].ContentSequence = [
        content_item("CONTAINS", "TEXT", ("121071", "DCM", "Finding"), TextValue=f"f{i}") for i in range(6000)
    ]
    c = read_dicom_report(part10(wide), RULES)
    assert any("more than 5000" in p for p in c.problems) and len(c.findings) < 5000


def test_bytes_that_are_no_dicom_raise_the_typed_error() -> None:
    with pytest.raises(UnreadableReport):
        read_dicom_report(b"", RULES)
    with pytest.raises(UnreadableReport):
        read_dicom_report(b"%PDF-1.4 this is a PDF, not DICOM", RULES)


SAMPLES = [part10(normal_sr()), part10(report_pdf(STUDY, ["Normal ECG"]))]


@settings(deadline=None, max_examples=400)
@given(
    sample=st.sampled_from(SAMPLES),
    cuts=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=8),
    truncate=st.one_of(st.none(), st.integers(0, 2000)),
)
def test_fuzz_mutated_reports_read_or_raise_the_typed_error(sample, cuts, truncate) -> None:
    data = bytearray(sample)
    for at, value in cuts:
        data[at % len(data)] = value
    if truncate is not None:
        data = data[:truncate]
    try:
        c = read_dicom_report(bytes(data), RULES)
    except UnreadableReport:
        return
    assert isinstance(text_of(c), str) and c.object_uid


# -- FHIR ------------------------------------------------------------------------------------------


def diagnostic_report(**overrides) -> dict:
    pdf = minimal_pdf(["Normal ECG"])
    resource = {
        "resourceType": "DiagnosticReport",
        "id": "dr-1",
        "meta": {"versionId": "3"},
        "status": "final",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY.study_uid}"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "11524-6", "display": "EKG study"}]},
        "subject": {"identifier": {"system": "urn:lastmile:patient-id", "value": "P0042"}},
        "issued": "2026-11-02T10:00:00+08:00",
        "resultsInterpreter": [{"display": "Dr. Chen Jing"}],
        "conclusion": "Sinus rhythm. Normal ECG.",
        "presentedForm": [{"contentType": "application/pdf", "data": base64.b64encode(pdf).decode()}],
    }
    resource.update(overrides)
    return resource


def test_fhir_diagnostic_report_is_read_like_an_sr() -> None:
    resource = diagnostic_report()
    validate_resource(resource)
    c = read_fhir_report(resource, RULES, [STUDY.study_uid])
    assert (c.kind, c.object_uid, c.version, c.study_uid, c.patient_id) == (
        "fhir",
        "DiagnosticReport/dr-1",
        "3",
        STUDY.study_uid,
        "P0042",
    )
    assert c.status == "final" and c.observer == "Dr. Chen Jing" and c.title == "EKG study"
    assert c.document.startswith(b"%PDF-") and c.document_type == "application/pdf"
    assert "Conclusion: Sinus rhythm. Normal ECG." in text_of(c) and not c.critical


def test_fhir_critical_by_interpretation_and_by_coded_conclusion() -> None:
    obs = critical_observation("st", "ST segment", "elevated 3 mm V1-V4")
    resource = diagnostic_report(contained=[obs], result=[{"reference": "#st"}])
    validate_resource(resource)
    c = read_fhir_report(resource, RULES)
    assert c.critical and "Critical abnormal" in c.critical[0] and "ST segment: elevated" in text_of(c)
    coded = diagnostic_report(
        conclusionCode=[{"coding": [{"system": "http://snomed.info/sct", "code": "401303003", "display": "STEMI"}]}]
    )
    validate_resource(coded)
    assert read_fhir_report(coded, RULES).critical


def test_fhir_amended_preliminary_and_withdrawn() -> None:
    assert read_fhir_report(diagnostic_report(status="corrected")).status == "amended"
    assert read_fhir_report(diagnostic_report(status="preliminary")).status == "preliminary"
    withdrawn = read_fhir_report(diagnostic_report(status="entered-in-error"))
    assert (withdrawn.status, withdrawn.final, withdrawn.problems) == ("withdrawn", False, ())
    assert ReportLine(LineKind.WITHDRAWN, value="entered-in-error") in withdrawn.lines
    bad = copy.deepcopy(diagnostic_report())
    bad["presentedForm"][0]["data"] = "***"
    assert "not valid base64" in read_fhir_report(bad).problems[0]
    with pytest.raises(UnreadableReport):
        read_fhir_report({"resourceType": "Observation", "id": "x"})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(value: object, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON document a value can be replaced at (dict keys, list indexes)."""
    found = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*path, i))
    return found


@settings(deadline=None, max_examples=400)
@given(data=st.data())
def test_fuzz_a_diagnostic_report_of_any_shape_is_read_or_raises_the_typed_error(data) -> None:
    """The platform's JSON is untrusted: a scalar where R4 has a list, a list where a string
    belongs... (`conclusionCode: [{"coding": 1}]` ended the poller thread, and with it the
    forward service). Read, or UnreadableReport - and what is kept of an unreadable one never raises."""
    resource = diagnostic_report(
        conclusionCode=[{"coding": [{"system": "http://snomed.info/sct", "code": "164865005"}]}],
        result=[{"reference": "#obs"}],
        contained=[critical_observation("obs", "ST segment", "elevated")],
    )
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(_paths(resource)[1:]))
        target = resource
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = data.draw(JSON_VALUES)
    try:
        content = read_fhir_report(resource, RULES, [STUDY.study_uid])
    except UnreadableReport as exc:
        kept = unreadable_fhir_report(resource, str(exc), [STUDY.study_uid])
        assert kept is None or (kept.problems and kept.object_uid.startswith("DiagnosticReport/"))
        return
    assert isinstance(text_of(content), str) and content.object_uid.startswith("DiagnosticReport/")
