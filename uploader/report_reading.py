"""What a report from the reading center says: pure reading, no I/O.

- DICOM Structured Reports (Basic/Enhanced/Comprehensive/Extensible SR; a 12-lead ECG report is a
  Comprehensive SR, TID 3700) are read into lines (`uploader.report_lines`, in no language: the
  gateway's own words are worded where the report is shown): title, findings, impression, the
  reading doctor (Verifying Observer, else the Person Observer in the content tree), the time.
- Encapsulated PDFs are kept as they are (the document bytes, with the header fields around).
- FHIR R4 `DiagnosticReport`s (text conclusion, coded conclusion, a PDF or text `presentedForm`)
  are read into the same `ReportContent`.
- Status: final (SR COMPLETE + VERIFIED, a PDF, FHIR final), preliminary, or amended (an SR with a
  Predecessor Documents Sequence, FHIR amended/corrected); `amends` names what it replaces.
- Critical results (危急值): a coded finding in the configured code list (`CriticalRules`), a
  configured keyword in the text, or a FHIR result Observation interpreted AA/HH/LL.

Reports are untrusted bytes: reading never raises on odd content. What cannot be read is listed in
`ReportContent.problems` (the object is still kept as received and the doctor is told); only bytes
that are no DICOM at all raise `UnreadableReport`. The content tree walk is bounded (depth, items).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import io
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    ExtensibleSRStorage,
)

from devices.identity import POSSIBLE_YEARS
from uploader.errors import UploadError
from uploader.report_lines import (
    PERSON_NAME,
    LineKind,
    ReportLine,
    concept_key,
    interpretation_concept,
    normal_scheme,
)

REPORT_SR_CLASSES: tuple[str, ...] = (
    BasicTextSRStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    ExtensibleSRStorage,
)
REPORT_SOP_CLASSES: tuple[str, ...] = (*REPORT_SR_CLASSES, EncapsulatedPDFStorage)

MAX_DEPTH = 16  # content tree nesting we follow (TID 3700 uses 4)
MAX_ITEMS = 5000  # content items we render; a bigger tree is flagged, not walked
MAX_TEXT_CHARS = 200_000  # text kept of one value or presented form

# DICOM concepts this module looks for (CID 7001/7002, TID 1002/2000/3700)
FINDINGS_CONTAINER = ("DCM", "121070")
FINDING = ("DCM", "121071")
IMPRESSIONS_CONTAINER = ("DCM", "121072")
IMPRESSION = ("DCM", "121073")
PERSON_OBSERVER_NAME = ("DCM", "121008")
FHIR_CRITICAL_INTERPRETATIONS = frozenset({"AA", "HH", "LL"})  # v3 ObservationInterpretation
DICOM_UID_SYSTEM = "urn:dicom:uid"


class UnreadableReport(UploadError, ValueError):
    """Bytes that are not a DICOM object at all (an odd one is read, with `problems`)."""


@dataclass(frozen=True)
class CriticalRules:
    """What makes a report critical: coded findings (scheme, code) and keywords in its text."""

    codes: frozenset[tuple[str, str]] = frozenset()
    keywords: tuple[str, ...] = ()

    @classmethod
    def parse(cls, codes: Iterable[str], keywords: Iterable[str]) -> CriticalRules:
        """`codes` as "SCHEME:CODE" (e.g. "SCT:401303003"); keywords matched case-insensitively."""
        parsed = set()
        for text in codes:
            scheme, sep, value = text.partition(":")
            if not sep or not scheme.strip() or not value.strip():
                raise ValueError(f"critical code {text!r} is not SCHEME:CODE (e.g. SCT:401303003)")
            parsed.add((normal_scheme(scheme), value.strip()))
        return cls(frozenset(parsed), tuple(k.casefold() for k in keywords if k.strip()))

    def code_matches(self, scheme: str, value: str) -> bool:
        return (normal_scheme(scheme), value.strip()) in self.codes

    def keyword_in(self, text: str) -> str | None:
        folded = text.casefold()
        return next((k for k in self.keywords if k in folded), None)


@dataclass(frozen=True)
class ReportContent:
    """One report object, read. `object_uid` identifies it at its source (SOP Instance UID, or
    "DiagnosticReport/<id>"); `version` changes when a FHIR report is updated in place."""

    kind: str  # "sr", "pdf" or "fhir"
    object_uid: str
    study_uid: str = ""
    series_uid: str = ""
    sop_class_uid: str = ""
    version: str = ""
    patient_id: str = ""
    patient_name: str = ""
    title: str = ""
    findings: tuple[str, ...] = ()
    impressions: tuple[str, ...] = ()
    lines: tuple[ReportLine, ...] = ()  # the whole report, to be worded in the reader's language
    observer: str = ""  # the reading doctor
    report_time: str = ""  # ISO 8601 as the report gives it (zone only if it has one)
    # report_time says when the report was written; False: it is the ECG's time (a FHIR report
    # without `issued`, read from effectiveDateTime), which says nothing of when it was written
    time_written: bool = True
    final: bool = False
    withdrawn: bool = False  # the reading center took it back (FHIR entered-in-error, cancelled)
    amends: tuple[str, ...] = ()  # object uids this one replaces
    completion_flag: str = ""
    verification_flag: str = ""
    critical: tuple[str, ...] = ()  # why it is critical; empty: not critical
    problems: tuple[str, ...] = ()  # what could not be read
    document: bytes | None = None  # PDF (or other) document bytes as sent
    document_type: str = ""  # its MIME type

    @property
    def status(self) -> str:
        if self.withdrawn:
            return "withdrawn"
        if not self.final:
            return "preliminary"
        return "amended" if self.amends else "final"


# -- DICOM -----------------------------------------------------------------------------------------


def read_dicom_report(data: bytes, rules: CriticalRules = CriticalRules()) -> ReportContent:
    """A Part-10 SR or Encapsulated PDF → ReportContent. Raises UnreadableReport only for bytes
    pydicom cannot parse as DICOM; any odd content is listed in `problems`."""
    try:
        ds = dcmread(io.BytesIO(data), force=True)
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    except Exception as exc:  # noqa: BLE001 — pydicom raises many types on hostile bytes; one typed error out
        raise UnreadableReport(f"not a DICOM object: {type(exc).__name__}: {exc}") from None
    if not sop_instance:
        raise UnreadableReport("no SOP Instance UID")
    reader = _DicomReader(ds, rules)
    if sop_class == EncapsulatedPDFStorage:
        return reader.pdf(sop_instance)
    return reader.sr(sop_class, sop_instance)


def _code(item: Dataset | None) -> tuple[str, str, str]:
    """(scheme, value, meaning) of a code sequence item; long/URN code values included."""
    if item is None:
        return "", "", ""
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue") or ""
    return str(item.get("CodingSchemeDesignator", "") or ""), str(value), str(item.get("CodeMeaning", "") or "")


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _dicom_time(date: object, time: object) -> str:
    """DA + TM (or a DT) → ISO text; unparseable values are returned as they are."""
    d, t = str(date or "").strip(), str(time or "").strip()
    if not d:
        return ""
    try:
        day = dt.datetime.strptime(d[:8], "%Y%m%d")
    except ValueError:
        return f"{d} {t}".strip()
    m = re.match(r"(\d{2})(\d{2})?(\d{2})?", t)
    if m:
        try:
            day = day.replace(hour=int(m.group(1)), minute=int(m.group(2) or 0), second=int(m.group(3) or 0))
        except ValueError:  # e.g. TM "996000": no time of day
            return f"{d} {t}"
        return day.isoformat()
    return day.date().isoformat()


def _possible_time(when: str, problems: list[str]) -> str:
    """`when`, unless it reads as a date in a year no report was written (a garbled field, e.g.
    1013 for 2013): then "" and a problem, so that the doctor is not shown an impossible time."""
    m = re.match(r"\s*(\d{4})-?\d{2}", when)
    if m and int(m.group(1)) not in POSSIBLE_YEARS:
        problems.append(f"report time {when[:40]!r} is no possible date")
        return ""
    return when


def dicom_datetime_iso(value: object) -> str:
    """A DICOM DT value (with its UTC offset, if any) as ISO 8601 text; odd values as they are."""
    text = str(value or "").strip()
    if not text:
        return ""
    zone = ""
    m = re.search(r"([+-])(\d{2})(\d{2})$", text)
    if m:
        zone = f"{m.group(1)}{m.group(2)}:{m.group(3)}"
        text = text[: m.start()]
    return (_dicom_time(text[:8], text[8:]) or text) + zone


@dataclass
class _DicomReader:
    ds: Dataset
    rules: CriticalRules
    problems: list[str] = field(default_factory=list)
    critical: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    impressions: list[str] = field(default_factory=list)
    observers: list[str] = field(default_factory=list)
    lines: list[ReportLine] = field(default_factory=list)  # the content tree
    reasons: list[ReportLine] = field(default_factory=list)  # why it is critical
    texts: list[ReportLine] = field(default_factory=list)  # the tree's words, for the keyword scan
    items_seen: int = 0
    chars: int = 0

    def add(self, line: ReportLine) -> None:
        self.chars += len(line.name) + len(line.value)
        if self.chars > MAX_TEXT_CHARS:
            if self.chars - len(line.name) - len(line.value) <= MAX_TEXT_CHARS:
                self.problems.append(f"more than {MAX_TEXT_CHARS} characters of content: the rest is not rendered")
            return
        self.lines.append(line)
        self.texts.append(line)

    def coded_critical(self, name: str, meaning: str, scheme: str, code: str, why: str, concept: str = "") -> None:
        """`concept`: the coded name's "SCHEME CODE" when the critical code is its value."""
        self.critical.append(why)
        line = ReportLine(LineKind.CRITICAL_CODE, name=name, value=meaning, code=f"{scheme} {code}", concept=concept)
        self.reasons.append(line)

    def footer(self, observer: str, when: str) -> list[ReportLine]:
        """Who read it and when, then what could not be read."""
        read_by = (
            [ReportLine(LineKind.READ_BY, name=observer, value=when, code=PERSON_NAME)] if observer or when else []
        )
        problems = [ReportLine(LineKind.PROBLEM, value=p) for p in dict.fromkeys(self.problems)]
        return read_by + problems

    def get(self, keyword: str) -> str:
        try:
            value = self.ds.get(keyword, "")
            if isinstance(value, (DicomSequence, Dataset, bytes)):  # e.g. a PatientID sent as SQ: no text
                raise TypeError(f"{type(value).__name__} where text belongs")
            return str(value or "").strip()  # str() decodes what .get() left raw
        except Exception as exc:  # noqa: BLE001 — a value pydicom cannot decode is a problem, not a crash
            self.problems.append(f"{keyword} unreadable ({type(exc).__name__})")
            return ""

    def header(self, kind: str, sop_class: str, sop_instance: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "object_uid": sop_instance,
            "sop_class_uid": sop_class,
            "study_uid": self.get("StudyInstanceUID"),
            "series_uid": self.get("SeriesInstanceUID"),
            "patient_id": self.get("PatientID"),
            "patient_name": self.get("PatientName"),  # a PN as sent: report_text.display_name writes it
        }

    def verifying_observer(self) -> tuple[str, str]:
        """(name, verification time) of the first Verifying Observer."""
        try:
            item = _first(self.ds, "VerifyingObserverSequence")
            if item is None:
                return "", ""
            name = str(item.get("VerifyingObserverName", "") or "").strip()  # a PN as sent
            return name, self.zoned(dicom_datetime_iso(item.get("VerificationDateTime")))
        except Exception as exc:  # noqa: BLE001
            self.problems.append(f"VerifyingObserverSequence unreadable ({type(exc).__name__})")
            return "", ""

    def content_time(self) -> str:
        """Content Date/Time as ISO text, with the object's Timezone Offset From UTC when it
        gives one (without: the county's local time, shown in the clinic's zone)."""
        return self.zoned(_dicom_time(self.get("ContentDate"), self.get("ContentTime")))

    def zoned(self, when: str) -> str:
        """An ISO time of this object without an offset of its own, with the object's Timezone
        Offset From UTC (it applies to every time in the object), when it gives one."""
        offset = re.fullmatch(r"([+-]\d{2})(\d{2})", self.get("TimezoneOffsetFromUTC"))
        own = re.search(r"(?:[+-]\d{2}:\d{2}|Z)$", when)
        return f"{when}{offset[1]}:{offset[2]}" if offset and "T" in when and own is None else when

    def amends(self) -> tuple[str, ...]:
        """SOP Instance UIDs in the Predecessor Documents Sequence (study → series → SOP)."""
        found: list[str] = []
        try:
            for study in self.ds.get("PredecessorDocumentsSequence") or []:
                for series in study.get("ReferencedSeriesSequence") or []:
                    for sop in series.get("ReferencedSOPSequence") or []:
                        uid = str(sop.get("ReferencedSOPInstanceUID", "") or "")
                        if uid:
                            found.append(uid)
        except Exception as exc:  # noqa: BLE001
            self.problems.append(f"PredecessorDocumentsSequence unreadable ({type(exc).__name__})")
        return tuple(dict.fromkeys(found))

    # -- SR --
    def sr(self, sop_class: str, sop_instance: str) -> ReportContent:
        head = self.header("sr", sop_class, sop_instance)
        if sop_class not in REPORT_SR_CLASSES:
            self.problems.append(f"SOP class {UID(sop_class).name or sop_class or '(none)'} is not a report SR")
        completion = self.get("CompletionFlag").upper()
        verification = self.get("VerificationFlag").upper()
        if completion not in ("COMPLETE", "PARTIAL"):
            self.problems.append(f"CompletionFlag {completion or '(missing)'} is not COMPLETE or PARTIAL")
        if verification not in ("VERIFIED", "UNVERIFIED"):
            self.problems.append(f"VerificationFlag {verification or '(missing)'} is not VERIFIED or UNVERIFIED")
        title = title_concept = ""
        try:
            if self.ds.get("ValueType", "") != "CONTAINER":
                self.problems.append(
                    f"root content item is {self.ds.get('ValueType') or '(no value type)'}, not CONTAINER"
                )
            title_scheme, title_code, title = _code(_first(self.ds, "ConceptNameCodeSequence"))
            title_concept = concept_key(title_scheme, title_code)
            if not title:
                self.problems.append("the document has no title (root ConceptNameCodeSequence)")
            self.walk(self.ds.get("ContentSequence") or [], 0, None)
            if not self.ds.get("ContentSequence"):
                self.problems.append("the content tree is empty")
        except Exception as exc:  # noqa: BLE001 — bytes from a PACS: render what we can, flag the rest
            self.problems.append(f"content tree unreadable ({type(exc).__name__}: {exc})")
        name, verified_at = self.verifying_observer()
        observer = name or next(iter(self.observers), "")
        when = _possible_time(verified_at or self.content_time(), self.problems)
        amends = self.amends()
        final = completion == "COMPLETE" and verification == "VERIFIED"
        self.scan_keywords([ReportLine(LineKind.TITLE, value=title), *self.texts])
        return ReportContent(
            **head,
            title=title,
            findings=tuple(self.findings),
            impressions=tuple(self.impressions),
            lines=(*self.top(title, len(amends), title_concept), *self.lines, *self.footer(observer, when)),
            observer=observer,
            report_time=when,
            final=final,
            amends=amends,
            completion_flag=completion,
            verification_flag=verification,
            critical=tuple(dict.fromkeys(self.critical)),
            problems=tuple(dict.fromkeys(self.problems)),
        )

    def walk(self, items: Sequence[Dataset], depth: int, section: tuple[str, str] | None) -> None:
        if depth >= MAX_DEPTH:
            self.problems.append(f"content tree deeper than {MAX_DEPTH} levels: not rendered beyond")
            return
        for item in items:
            self.items_seen += 1
            if self.items_seen > MAX_ITEMS:
                if self.items_seen == MAX_ITEMS + 1:
                    self.problems.append(f"more than {MAX_ITEMS} content items: the rest is not rendered")
                return
            self.item(item, depth, section)

    def item(self, item: Dataset, depth: int, section: tuple[str, str] | None) -> None:
        value_type = str(item.get("ValueType", "") or "")
        scheme, code, name = _code(_first(item, "ConceptNameCodeSequence"))
        concept = (normal_scheme(scheme), code)
        if self.rules.code_matches(scheme, code):
            self.coded_critical(name or code, "", scheme, code, f"coded concept {name or code} ({scheme} {code})")
        if not value_type:
            if "ReferencedContentItemIdentifier" in item:
                return  # by-reference relationship: the target is rendered where it stands
            self.problems.append(f"a content item ({name or 'unnamed'}) has no ValueType")
            return
        if not name and value_type != "CONTAINER":
            self.problems.append(f"a {value_type} content item has no concept name")
        label = name or value_type.title()
        unnamed = "" if name else value_type
        key = concept_key(scheme, code) if name else ""
        if value_type == "CONTAINER":
            self.add(ReportLine(LineKind.CONTAINER, name=name, code=unnamed, depth=depth, concept=key))
            self.walk(item.get("ContentSequence") or [], depth + 1, concept)
            return
        line = self.value_of(item, value_type, label, key)
        if line is None:
            return
        line = replace(line, name=name, code=line.code or unnamed, depth=depth, concept=key)
        value = line.value
        if concept == PERSON_OBSERVER_NAME and value:
            self.observers.append(value)
        self.add(line)
        if value_type in ("TEXT", "CODE"):
            if concept == IMPRESSION or section == IMPRESSIONS_CONTAINER:
                self.impressions.append(value)
            elif concept == FINDING or section == FINDINGS_CONTAINER:
                self.findings.append(value)
        children = item.get("ContentSequence")
        if children:
            self.walk(children, depth + 1, section)

    def value_of(self, item: Dataset, value_type: str, label: str, concept: str = "") -> ReportLine | None:
        """One content item's value as a line (its name and depth set by the caller), or None
        (problem noted) when it has none; `concept`: its name's code, for a critical reason."""
        if value_type == "TEXT":
            text = item.get("TextValue")
            if text is None:
                self.problems.append(f"TEXT item {label} has no TextValue")
                return None
            return ReportLine(LineKind.ITEM, value=str(text).strip())
        if value_type == "CODE":
            found = _first(item, "ConceptCodeSequence")
            if found is None:
                self.problems.append(f"CODE item {label} has no ConceptCodeSequence")
                return None
            scheme, code, meaning = _code(found)
            if self.rules.code_matches(scheme, code):
                self.coded_critical(
                    label, meaning or code, scheme, code, f"{label}: {meaning or code} ({scheme} {code})", concept
                )
            return ReportLine(
                LineKind.ITEM, value=meaning or f"{scheme} {code}", value_concept=concept_key(scheme, code)
            )
        if value_type == "NUM":
            measured = _first(item, "MeasuredValueSequence")
            if measured is None:
                return ReportLine(LineKind.NO_VALUE)
            units = _code(_first(measured, "MeasurementUnitsCodeSequence"))
            unit = units[1] if units[0].upper() == "UCUM" else units[2]
            return ReportLine(
                LineKind.ITEM, value=f"{measured.get('NumericValue', '?')} {'' if unit == '1' else unit}".strip()
            )
        if value_type in ("COMPOSITE", "IMAGE", "WAVEFORM"):
            ref = _first(item, "ReferencedSOPSequence")
            cls = str(ref.get("ReferencedSOPClassUID", "")) if ref is not None else ""
            return ReportLine(LineKind.REFERENCE, value=UID(cls).name if cls else "")
        if value_type in ("SCOORD", "SCOORD3D", "TCOORD"):
            return ReportLine(LineKind.COORDINATES, code=value_type)
        if value_type == PERSON_NAME:
            # a person's name kept as sent, its parts written as people write them where it is
            # shown (report_text.display_name): "^" is no space to guess back
            name = str(item.get("PersonName", "") or "").strip()
            return ReportLine(LineKind.ITEM, value=name, code=PERSON_NAME)
        if value_type == "DATETIME":
            return ReportLine(LineKind.ITEM, value=dicom_datetime_iso(item.get("DateTime")))
        if value_type == "DATE":
            return ReportLine(LineKind.ITEM, value=_dicom_time(item.get("Date"), ""))
        if value_type == "TIME":
            return ReportLine(LineKind.ITEM, value=str(item.get("Time", "") or ""))
        if value_type == "UIDREF":
            return ReportLine(LineKind.ITEM, value=str(item.get("UID", "") or ""))
        self.problems.append(f"content item {label} has unknown ValueType {value_type!r}")
        return None

    def scan_keywords(self, lines: Iterable[ReportLine]) -> None:
        """A configured keyword in the title or a content item: the reason names the text it is
        in and, when that is an item's value, the item's concept apart (its name as written in
        `code`, its code in `concept`), so the reason words the concept in the reader's language."""
        for line in lines:
            text = f"{line.name}: {line.value}" if line.name and line.value else line.name or line.value
            keyword = self.rules.keyword_in(text)
            if keyword:
                self.critical.append(f"keyword {keyword!r} in: {text.strip()[:120]}")
                in_value = line.name and self.rules.keyword_in(line.value) == keyword
                shown = line.value if in_value else text
                self.reasons.append(
                    ReportLine(
                        LineKind.CRITICAL_KEYWORD,
                        name=keyword,
                        value=shown.strip()[:120],
                        code=line.name if in_value else "",
                        concept=line.concept if in_value else "",
                    )
                )

    def top(self, title: str, amends: int, concept: str = "") -> list[ReportLine]:
        """The title, whether it replaces earlier reports, why it is critical."""
        amended = [ReportLine(LineKind.AMENDED, number=amends)] if amends else []
        return [ReportLine(LineKind.TITLE, value=title, concept=concept), *amended, *dict.fromkeys(self.reasons)]

    # -- PDF --
    def pdf(self, sop_instance: str) -> ReportContent:
        head = self.header("pdf", EncapsulatedPDFStorage, sop_instance)
        mime = self.get("MIMETypeOfEncapsulatedDocument") or "application/pdf"
        try:
            raw = self.ds.get("EncapsulatedDocument")
            document = bytes(raw) if raw is not None else b""
        except Exception as exc:  # noqa: BLE001
            self.problems.append(f"EncapsulatedDocument unreadable ({type(exc).__name__})")
            document = b""
        if not document:
            self.problems.append("no EncapsulatedDocument")
        elif not document.startswith(b"%PDF-"):
            self.problems.append("the encapsulated document is not a PDF (no %PDF- header)")
        # the value is padded to even length: drop the pad after %%EOF
        if document.endswith(b"\x00") and b"%%EOF" in document[-16:]:
            document = document[:-1]
        title, concept = self.get("DocumentTitle"), ""
        try:
            scheme, code, name = _code(_first(self.ds, "ConceptNameCodeSequence"))
            if not title:  # the county's own title stays its words: only the code's name is our term
                title, concept = name, concept_key(scheme, code)
        except Exception as exc:  # noqa: BLE001 — only a problem when it was the title
            if not title:
                self.problems.append(f"ConceptNameCodeSequence unreadable ({type(exc).__name__})")
        observer, verified_at = self.verifying_observer()
        when = _possible_time(verified_at or self.content_time(), self.problems)
        self.scan_keywords([ReportLine(LineKind.TITLE, value=title)])
        document_line = ReportLine(LineKind.DOCUMENT, value=mime, number=len(document))
        return ReportContent(
            **head,
            title=title,
            lines=(*self.top(title, 0, concept), document_line, *self.footer(observer, when)),
            observer=observer,
            report_time=when,
            final=not self.problems,
            amends=self.amends(),
            critical=tuple(dict.fromkeys(self.critical)),
            problems=tuple(dict.fromkeys(self.problems)),
            document=document or None,
            document_type=mime,
        )


# -- FHIR DiagnosticReport -----------------------------------------------------------------------

FHIR_FINAL = frozenset({"final", "amended", "corrected", "appended"})
FHIR_AMENDED = frozenset({"amended", "corrected"})
FHIR_WITHDRAWN = frozenset({"cancelled", "entered-in-error"})


def dicom_uid_identifier(uid: str) -> tuple[str, str]:
    """(system, value) of a DICOM UID as FHIR writes it (urn:dicom:uid, urn:oid:1.2...)."""
    return DICOM_UID_SYSTEM, f"urn:oid:{uid}"


def _codings(concept: object) -> Iterator[tuple[str, str, str]]:
    if not isinstance(concept, Mapping):
        return
    for coding in concept.get("coding") or []:
        if isinstance(coding, Mapping):
            yield str(coding.get("system", "")), str(coding.get("code", "")), str(coding.get("display", ""))


def _concept_code(concept: object) -> str:
    """A CodeableConcept's first coding as a report line keeps a code ("LN 8867-4"; "": none), so
    that the concept is worded in the reader's language where the gateway knows it."""
    return next((key for system, code, _d in _codings(concept) if (key := concept_key(system, code))), "")


def _display_concept(concept: object) -> str:
    """The code of a title: only when its words are the coding's (no text), as for a DICOM
    DocumentTitle: the county's own title ("Holter 24h report - REVISED") stays its words."""
    own = isinstance(concept, Mapping) and isinstance(concept.get("text"), str) and concept["text"].strip()
    return "" if own else _concept_code(concept)


def _concept_text(concept: object) -> str:
    if not isinstance(concept, Mapping):
        return ""
    text = concept.get("text")
    if isinstance(text, str) and text.strip():
        return text.strip()
    return next((d or c for _s, c, d in _codings(concept) if d or c), "")


def _reference_display(refs: object) -> str:
    names = []
    for ref in refs if isinstance(refs, list) else []:
        if isinstance(ref, Mapping):
            name = ref.get("display") or ref.get("reference")
            if isinstance(name, str) and name:
                names.append(name)
    return ", ".join(names)


def _study_of(resource: Mapping[str, Any], known: Iterable[str]) -> str:
    """The study UID this report is linked to, from its identifiers (urn:dicom:uid urn:oid:...)."""
    wanted = {dicom_uid_identifier(u)[1]: u for u in known}
    identifiers = resource.get("identifier")
    values = [
        (str(i.get("system", "")), value)
        for i in (identifiers if isinstance(identifiers, list) else [])
        if isinstance(i, Mapping) and isinstance(value := i.get("value"), str)
    ]
    for _system, value in values:
        if value in wanted:
            return wanted[value]
    for system, value in values:
        if system == DICOM_UID_SYSTEM and value.startswith("urn:oid:"):
            return value[len("urn:oid:") :]
    return ""


def read_fhir_report(
    resource: Mapping[str, Any], rules: CriticalRules = CriticalRules(), known_studies: Iterable[str] = ()
) -> ReportContent:
    """A DiagnosticReport (R4 JSON) → ReportContent; oddities go to `problems`. A resource
    whose shape is not R4's (a scalar where a list belongs, a list where a string does) raises
    UnreadableReport, never anything else: the platform's JSON is untrusted input."""
    try:
        return _read_fhir_report(resource, rules, known_studies)
    except UnreadableReport:
        raise
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        raise UnreadableReport(f"a DiagnosticReport not shaped as FHIR R4: {type(exc).__name__}: {exc}") from exc


def unreadable_fhir_report(
    resource: Mapping[str, Any], reason: str, known_studies: Iterable[str] = ()
) -> ReportContent | None:
    """What can be kept of a DiagnosticReport that could not be read: flagged under its study,
    so the clinic sees that a report came back and could not be shown. None: it has no id or
    names no study (nothing to keep it under)."""
    if not isinstance(resource, Mapping):
        return None
    rid = resource.get("id")
    study_uid = _study_of(resource, known_studies)
    if not isinstance(rid, str) or not rid or not study_uid:
        return None
    meta = resource.get("meta")
    version = (meta.get("versionId") or meta.get("lastUpdated") or "") if isinstance(meta, Mapping) else ""
    return ReportContent(
        kind="fhir",
        object_uid=f"DiagnosticReport/{rid}",
        study_uid=study_uid,
        version=version if isinstance(version, str) else "",
        title="Unreadable report",
        lines=(ReportLine(LineKind.UNREADABLE), ReportLine(LineKind.PROBLEM, value=reason)),
        problems=(reason,),
    )


def _read_fhir_report(resource: Mapping[str, Any], rules: CriticalRules, known_studies: Iterable[str]) -> ReportContent:
    problems: list[str] = []
    critical: list[str] = []
    reasons: list[ReportLine] = []
    if resource.get("resourceType") != "DiagnosticReport":
        raise UnreadableReport(f"not a DiagnosticReport: {resource.get('resourceType')!r}")
    rid = str(resource.get("id") or "")
    if not rid:
        raise UnreadableReport("a DiagnosticReport without an id")
    meta = resource.get("meta")
    version = str(meta.get("versionId", "") or meta.get("lastUpdated", "") or "") if isinstance(meta, Mapping) else ""
    status = str(resource.get("status", ""))
    withdrawn = status in FHIR_WITHDRAWN  # its content stands for nothing: not final, not critical
    title = _concept_text(resource.get("code"))
    conclusion = str(resource.get("conclusion") or "").strip()
    coded_codings = [x for cc in resource.get("conclusionCode") or [] for x in _codings(cc)]
    coded = [d or c for _s, c, d in coded_codings]
    for cc in resource.get("conclusionCode") or []:
        for system, code, display in _codings(cc):
            if rules.code_matches(system, code):
                critical.append(f"coded conclusion {display or code} ({system} {code})")
                reasons.append(ReportLine(LineKind.CRITICAL_CODE, name=display or code, code=f"{system} {code}"))
    contained = {
        f"#{r.get('id')}": r for r in resource.get("contained") or [] if isinstance(r, Mapping) and r.get("id")
    }
    result_lines = []
    results: list[ReportLine] = []
    for ref in resource.get("result") or []:
        obs = contained.get(str(ref.get("reference", ""))) if isinstance(ref, Mapping) else None
        if obs is None:
            continue
        name, concept = _concept_text(obs.get("code")), _concept_code(obs.get("code"))
        value = obs.get("valueString") or _concept_text(obs.get("valueCodeableConcept"))
        value_concept = "" if obs.get("valueString") else _concept_code(obs.get("valueCodeableConcept"))
        quantity = obs.get("valueQuantity")
        if isinstance(quantity, Mapping):
            value = f"{quantity.get('value', '?')} {quantity.get('unit', '')}".strip()
        result_lines.append(f"{name}: {value}")
        results.append(
            ReportLine(LineKind.RESULT, name=name, value=str(value or ""), concept=concept, value_concept=value_concept)
        )
        for interp in obs.get("interpretation") or []:
            for _system, code, display in _codings(interp):
                if code in FHIR_CRITICAL_INTERPRETATIONS:
                    critical.append(f"{name or 'result'} interpreted {display or code}")
                    reasons.append(
                        ReportLine(
                            LineKind.CRITICAL_INTERPRETED,
                            name=name,
                            value=display or code,
                            concept=concept,
                            value_concept=interpretation_concept(code),
                        )
                    )
    document: bytes | None = None
    document_type = ""
    presented_text = []
    for form in resource.get("presentedForm") or []:
        if not isinstance(form, Mapping):
            continue
        ctype = str(form.get("contentType", ""))
        try:
            raw = base64.b64decode(str(form.get("data", "")), validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"presentedForm ({ctype}) is not valid base64")
            continue
        if ctype.startswith("text/"):
            presented_text.append(raw.decode("utf-8", "replace").strip()[:MAX_TEXT_CHARS])
        elif document is None and raw:
            document, document_type = raw, ctype
    observer = _reference_display(resource.get("resultsInterpreter")) or _reference_display(resource.get("performer"))
    issued = str(resource.get("issued") or "")
    when = _possible_time(issued or str(resource.get("effectiveDateTime") or ""), problems)
    texts = [conclusion, *coded, *result_lines, *presented_text]
    for text in (title, *texts):
        keyword = rules.keyword_in(text) if text else None
        if keyword:
            critical.append(f"keyword {keyword!r} in: {text.strip()[:120]}")
            reasons.append(ReportLine(LineKind.CRITICAL_KEYWORD, name=keyword, value=text.strip()[:120]))
    amends = (f"DiagnosticReport/{rid}",) if status in FHIR_AMENDED else ()
    lines = [
        ReportLine(LineKind.TITLE, value=title, concept=_display_concept(resource.get("code"))),
        *([ReportLine(LineKind.AMENDED)] if amends else []),  # a corrected version of itself
        *([ReportLine(LineKind.WITHDRAWN, value=status)] if withdrawn else dict.fromkeys(reasons)),
        *([ReportLine(LineKind.CONCLUSION, value=conclusion)] if conclusion else []),
        *(ReportLine(LineKind.CODED, value=d or c, value_concept=concept_key(s, c)) for s, c, d in coded_codings),
        *results,
        *(ReportLine(LineKind.PRESENTED, value=t) for t in presented_text),
        *([ReportLine(LineKind.DOCUMENT, value=document_type, number=len(document))] if document is not None else []),
        *([ReportLine(LineKind.READ_BY, name=observer, value=when)] if observer or when else []),
        *(ReportLine(LineKind.PROBLEM, value=p) for p in problems),
    ]
    subject = resource.get("subject")
    subject_id = subject.get("identifier") if isinstance(subject, Mapping) else None
    patient_id = str(subject_id.get("value", "") or "") if isinstance(subject_id, Mapping) else ""
    return ReportContent(
        kind="fhir",
        object_uid=f"DiagnosticReport/{rid}",
        study_uid=_study_of(resource, known_studies),
        version=version,
        patient_id=patient_id,
        title=title,
        findings=tuple(result_lines),
        impressions=tuple(x for x in (conclusion, *coded) if x),
        lines=tuple(lines),
        observer=observer,
        report_time=when,
        time_written=bool(issued),
        final=status in FHIR_FINAL and not problems,
        withdrawn=withdrawn,
        amends=amends,
        critical=() if withdrawn else tuple(dict.fromkeys(critical)),
        problems=tuple(problems),
        document=document,
        document_type=document_type,
    )
