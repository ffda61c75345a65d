"""The county cardiologist of the demo (and of the tests): reads an ECG study and writes the
report objects a reading center returns — a Comprehensive SR (TID 3700 ECG Report shape:
observer context, Findings, Impressions; coded findings where there are codes) and, for some,
an Encapsulated PDF.

Built with pydicom only; the PDF is a one-page PDF 1.4 written by hand (Helvetica, ASCII).
"""

from __future__ import annotations

import datetime as dt
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComprehensiveSRStorage, EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid

from lastmile import __version__

ECG_REPORT = ("28010-7", "LN", "ECG Report")
FINDINGS = ("121070", "DCM", "Findings")
FINDING = ("121071", "DCM", "Finding")
IMPRESSIONS = ("121072", "DCM", "Impressions")
IMPRESSION = ("121073", "DCM", "Impression")
OBSERVER_TYPE = ("121005", "DCM", "Observer Type")
PERSON = ("121006", "DCM", "Person")
PERSON_OBSERVER_NAME = ("121008", "DCM", "Person Observer Name")
STEMI = ("401303003", "SCT", "Acute ST segment elevation myocardial infarction")
SINUS_RHYTHM = ("426783006", "SCT", "Sinus rhythm")
READING_DOCTOR = "Chen^Jing"
READING_CENTER = "County Hospital ECG Reading Center"
# the demo's PDF report title, as a Chinese county's reading center writes it (a county's own
# title is shown as written: the demo's, ours, is Chinese first like the rest of its report)
PDF_TITLE = "心电图报告"


@dataclass(frozen=True)
class StudyToRead:
    """What the reading center knows of the ECG study it reads."""

    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession: str = ""
    description: str = ""  # the ECG study's description ("STAT ..." when urgent)
    ecg_sop_class_uid: str = ""
    ecg_sop_instance_uid: str = ""
    ecg_series_uid: str = ""


def code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def content_item(relationship: str, value_type: str, concept: tuple[str, str, str], **values: object) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [code(concept)]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _common(ds: Dataset, study: StudyToRead, sop_class: str, modality: str, when: dt.datetime) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the impression may be in Chinese
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.Manufacturer = "Lastmile demo reading center"
    ds.SoftwareVersions = __version__
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime


def _verifier(reader: str, when: dt.datetime) -> Dataset:
    v = Dataset()
    v.VerifyingObserverName = reader
    v.VerifyingOrganization = READING_CENTER
    v.VerificationDateTime = when.strftime("%Y%m%d%H%M%S") + when.strftime("%z")
    v.VerifyingObserverIdentificationCodeSequence = []
    return v


def predecessor_reference(earlier: Dataset) -> Dataset:
    """A Predecessor Documents Sequence item naming `earlier` (study → series → SOP)."""
    sop = Dataset()
    sop.ReferencedSOPClassUID = earlier.SOPClassUID
    sop.ReferencedSOPInstanceUID = earlier.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = earlier.SeriesInstanceUID
    series.ReferencedSOPSequence = [sop]
    study = Dataset()
    study.StudyInstanceUID = earlier.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    return study


def ecg_report_sr(
    study: StudyToRead,
    *,
    findings: Sequence[str],
    impression: str,
    coded_findings: Sequence[tuple[str, str, str]] = (),
    reader: str = READING_DOCTOR,
    when: dt.datetime | None = None,
    complete: bool = True,
    verified: bool = True,
    amends: Dataset | None = None,
) -> Dataset:
    """A Comprehensive SR ECG report for `study`; `amends`: the earlier report it corrects."""
    when = when or dt.datetime.now(dt.timezone.utc).astimezone()
    ds = Dataset()
    _common(ds, study, ComprehensiveSRStorage, "SR", when)
    ds.SeriesDescription = "ECG report"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.CompletionFlag = "COMPLETE" if complete else "PARTIAL"
    ds.VerificationFlag = "VERIFIED" if verified else "UNVERIFIED"
    if verified:
        ds.VerifyingObserverSequence = [_verifier(reader, when)]
    if amends is not None:
        ds.PredecessorDocumentsSequence = [predecessor_reference(amends)]
    if study.ecg_sop_instance_uid:
        ds.CurrentRequestedProcedureEvidenceSequence = [
            _evidence(study.study_uid, study.ecg_series_uid, study.ecg_sop_class_uid, study.ecg_sop_instance_uid)
        ]
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [code(ECG_REPORT)]
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "3700"
    ds.ContentTemplateSequence = [template]
    found = content_item("CONTAINS", "CONTAINER", FINDINGS, ContinuityOfContent="SEPARATE")
    found.ContentSequence = [content_item("CONTAINS", "TEXT", FINDING, TextValue=text) for text in findings] + [
        content_item("CONTAINS", "CODE", FINDING, ConceptCodeSequence=[code(c)]) for c in coded_findings
    ]
    impressions = content_item("CONTAINS", "CONTAINER", IMPRESSIONS, ContinuityOfContent="SEPARATE")
    impressions.ContentSequence = [content_item("CONTAINS", "TEXT", IMPRESSION, TextValue=impression)]
    ds.ContentSequence = [
        content_item("HAS OBS CONTEXT", "CODE", OBSERVER_TYPE, ConceptCodeSequence=[code(PERSON)]),
        content_item("HAS OBS CONTEXT", "PNAME", PERSON_OBSERVER_NAME, PersonName=reader),
        found,
        impressions,
    ]
    return ds


def _evidence(study_uid: str, series_uid: str, sop_class: str, sop_instance: str) -> Dataset:
    sop = Dataset()
    sop.ReferencedSOPClassUID = sop_class
    sop.ReferencedSOPInstanceUID = sop_instance
    series = Dataset()
    series.SeriesInstanceUID = series_uid or generate_uid()
    series.ReferencedSOPSequence = [sop]
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = [series]
    return study


def report_pdf(
    study: StudyToRead,
    lines: Sequence[str],
    *,
    title: str = "ECG report",
    reader: str = READING_DOCTOR,
    when: dt.datetime | None = None,
) -> Dataset:
    """An Encapsulated PDF report for `study`."""
    when = when or dt.datetime.now(dt.timezone.utc).astimezone()
    ds = Dataset()
    _common(ds, study, EncapsulatedPDFStorage, "DOC", when)
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = [code(ECG_REPORT)]
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.VerificationFlag = "VERIFIED"
    heading = title if title.isascii() else ECG_REPORT[2]  # the page's Helvetica has no Chinese
    document = minimal_pdf([heading, "", *lines, "", f"Read by {reader.replace('^', ' ')}, {when:%Y-%m-%d %H:%M}"])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + (b"\x00" if len(document) % 2 else b"")
    return ds


def _pdf_text(text: str) -> str:
    ascii_only = text.encode("ascii", "replace").decode("ascii")
    return ascii_only.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def minimal_pdf(lines: Sequence[str]) -> bytes:
    """A valid one-page PDF 1.4 showing `lines` (ASCII; other characters become '?')."""
    text = "BT /F1 12 Tf 56 780 Td 16 TL " + " ".join(f"({_pdf_text(line)}) Tj T*" for line in lines) + " ET"
    stream = text.encode("ascii")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


class DemoCardiologist:
    """Reads every ECG: a Comprehensive SR for each (in Chinese, as the county writes), a PDF for
    every third, and for a STAT ECG the critical finding the demo's doctor must not miss."""

    def __init__(self, pdf_every: int = 3) -> None:
        self.pdf_every = pdf_every
        self.read = 0
        self._lock = threading.Lock()  # the reading center stores on several associations at once

    def __call__(self, study: StudyToRead) -> list[Dataset]:
        with self._lock:
            self.read += 1
            number = self.read
        if study.description.upper().startswith("STAT"):
            sr = ecg_report_sr(
                study,
                findings=["窦性心律，心率 96 次/分", "V1-V4 导联 ST 段抬高 0.3 mV"],
                impression="急性前壁 ST 段抬高型心肌梗死（危急值），请立即转上级医院",
                coded_findings=[STEMI],
            )
        else:
            sr = ecg_report_sr(
                study,
                findings=["窦性心律，心率 72 次/分", "电轴正常，各间期正常"],
                impression="正常心电图",
                coded_findings=[SINUS_RHYTHM],
            )
        out = [sr]
        if self.pdf_every and number % self.pdf_every == 0:
            lines = ["Sinus rhythm, 72 bpm", "Normal axis and intervals", "Normal ECG"]
            out.append(report_pdf(study, lines, title=PDF_TITLE))
        return out


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
