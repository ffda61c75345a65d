"""A returned report's whole text in the reader's language (报告全文 on the console's page, the
printout, `lastmile report show`).

The report is stored as lines in no language (`uploader.report_lines`): the cardiologist's words
are printed exactly as written; the gateway's own words around them ("Read by", "Critical
result", "(no value)") come from the console's gettext catalog (`scripts/i18n.sh` extracts this
module too), so a Chinese village doctor reads 审核医生 and 危急值 around the county's text.
Reports stored before the lines were kept (an old clinic.db) have only their English text: it is
shown as it is.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from lastmile.clock import local_zone
from lastmile.reports.concepts import known_concept, named_concept, standard_words
from uploader.report_lines import (
    CRITICAL,
    FOOTER,
    HEADER,
    PERSON_NAME,
    LineKind,
    ReportLine,
    critical_lines,
    interpretation_concept,
    split_concept,
)

UNDERLINE_MAX = 60
INDENT = "  "


def display_name(pn: str) -> str:
    """A DICOM person name as people write it (the ECG preview, the report printouts and pages,
    the CLI), by a rule on its components, never a guess: '王^小明' -> 王小明, '欧阳^娜^娜'
    (family^given^middle) -> 欧阳娜娜; 'Wang^Xiaoming' -> Wang Xiaoming (family name first, as
    Chinese documents write pinyin names); 'Wang^Xiaoming=王^小明' -> 王小明 (Wang Xiaoming). A
    name of one component - free text too (a FHIR report's reading doctor: '王 医生', '李明 (Li
    Ming)', 'Zhang Wei, 陈静') - stays as written, spaces and all. Here, without numpy: the
    console words printouts with it."""
    groups = [g for g in pn.split("=") if g.strip("^ ")]
    if not groups:
        return ""

    def one(group: str) -> str:
        parts = [p.strip() for p in group.split("^")[:3] if p.strip()]  # family, given, middle
        if any(is_cjk(p) for p in parts):  # CJK: family name first, no space
            return "".join(parts)
        return " ".join(parts)

    names = [one(g) for g in groups]
    cjk = [n for n in names if is_cjk(n)]
    latin = [n for n in names if n not in cjk]
    if cjk and latin:
        return f"{cjk[0]} ({latin[0]})"
    return names[0]


def is_cjk(text: str) -> bool:
    """Any character from the CJK blocks on (U+2E80): a Chinese name, not a pinyin one."""
    return any(ord(ch) > 0x2E7F for ch in text)


class Speaker(Protocol):
    """What wording needs of a language and the clinic's zone (`lastmile.console.i18n.Localizer`
    is one): a report time the county wrote without its offset is read in that zone."""

    @property
    def zone(self) -> dt.tzinfo: ...

    def gettext(self, message: str, /, **values: object) -> str: ...

    def ngettext(self, singular: str, plural: str, n: int, /, **values: object) -> str: ...


class Reader(Speaker, Protocol):
    """A speaker that writes a printout's dates too (a `Localizer` is one)."""

    def full(self, value: dt.datetime | None) -> str: ...


class English:
    """The source strings as they are: the English text the store keeps beside the lines (for
    `lastmile report list --json`, logs and older readers) without loading a catalog."""

    @property
    def zone(self) -> dt.tzinfo:
        return local_zone()

    def gettext(self, message: str, /, **values: object) -> str:
        return message % values if values else message

    def ngettext(self, singular: str, plural: str, n: int, /, **values: object) -> str:
        return (singular if n == 1 else plural) % {"n": n, **values}


class CriticalReason(NamedTuple):
    """Why a report is critical: `text` for the village doctor; `detail` for a county
    technician (the code, and the county's own words where `text` does not show them), shown
    apart (muted on a page). `words`: the county's own words for a coded finding where `text`
    does not show them (where, what to do): paper, which has no detail, prints them after it."""

    text: str
    detail: str = ""
    words: str = ""


def concept_name(name: str, concept: str, speaker: Speaker) -> str:
    """A concept's name (or a coded value) in the reader's language when the gateway knows its
    code and the county's words are only its standard name (or none); the county's words as
    written otherwise (they say more: "Sinus rhythm with first-degree AV block"), and where the
    reader's language is the catalog's English. A line stored without its code (an old report) is
    known by its words when they are a known concept's standard name."""
    concept = concept or named_concept(name)
    if name and not standard_words(name, concept):
        return name
    return term(name, concept, speaker)


def term(name: str, concept: str, speaker: Speaker) -> str:
    """Our term for a known concept in the reader's language, whatever the county's words (a
    critical finding's reason, which prints the county's words after it); the county's words as
    written where the gateway does not know the code or the county wrote Chinese already."""
    msgid = known_concept(concept)
    if msgid is None or is_cjk(name):
        return name
    shown = speaker.gettext(msgid)
    return name if name and shown == msgid else shown


def critical(line: ReportLine, speaker: Speaker) -> CriticalReason:
    """Why a report is critical, as one phrase: a coded finding as the gateway's term for its
    code, unless the county wrote it in Chinese already (then the county's words)."""
    _ = speaker.gettext
    if line.kind == LineKind.CRITICAL_KEYWORD:  # code: the item's concept name, when in its value
        # the county's sentence, not which item of its report held it ("Impression: ...": a heading too many)
        return CriticalReason(_("the county's report says “%(keyword)s”: %(text)s", keyword=line.name, text=line.value))
    if line.kind == LineKind.CRITICAL_INTERPRETED:
        result = concept_name(line.name, line.concept, speaker) or _("a result")
        flag, code = interpretation(line, speaker)
        detail = " · ".join(dict.fromkeys(w for w in (code, line.value) if w != flag))
        return CriticalReason(_("%(result)s marked %(flag)s", result=result, flag=flag), detail)
    # a coded value (name: its concept, value: the county's words) or a coded concept (name: the county's words)
    county = line.value or line.name
    finding = term(county, split_concept(line.code), speaker)
    text = labelled(concept_name(line.name, line.concept, speaker), finding, speaker) if line.value else finding
    unshown = [county] if county not in text else []
    words = "" if not unshown or standard_words(county, split_concept(line.code)) else county
    return CriticalReason(text, " · ".join([line.code, *unshown]), words)


def interpretation(line: ReportLine, speaker: Speaker) -> tuple[str, str]:
    """A result's interpretation flag in the reader's words (HH: 危急偏高), and its code for a
    technician: the county's display where it says more than the flag's standard name, the code
    as written where the gateway does not know it. A line stored before the flag's code was kept
    has it as its value when the county sent no display."""
    concept = line.value_concept or interpretation_concept(line.value)
    code = concept.partition(" ")[2]
    county = "" if line.value == code else line.value
    return concept_name(county, concept, speaker) or line.value, code


def printed(reason: CriticalReason, speaker: Speaker) -> str:
    """A reason as paper and the command line say it: its text, then the county's own words."""
    if not reason.words:
        return reason.text
    return speaker.gettext("%(reason)s (%(words)s)", reason=reason.text, words=reason.words)


def labelled(label: str, value: str, speaker: Speaker) -> str:
    """ "label: value" with the language's own colon (Chinese: full width)."""
    return speaker.gettext("%(label)s: %(value)s", label=label, value=value)


def underline(title: str) -> str:
    """As wide as the title on a terminal or a printout: a Chinese character takes two columns."""
    width = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in title)
    return "=" * min(width, UNDERLINE_MAX)


def readable_time(text: str, zone: dt.tzinfo) -> str:
    """The report's time as it gives it, spaced for reading: 2026-12-01T10:15:00+08:00 →
    2026-12-01 10:15:00 +08:00 (its own clock and offset; anything else as it is). A time the
    county wrote without its offset (a DICOM ContentTime) is its local time, the clinic's zone's:
    it gets that zone's offset (`zone`: the one the reader's other times are shown in)."""
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}(?::\d{2})?)(?:\.\d+)?([+-]\d{2}:\d{2}|Z)?", text)
    if m is None:
        return text
    day, clock, offset = m.groups()
    return f"{day} {clock} {offset or clinic_offset(dt.datetime.fromisoformat(f'{day}T{clock}'), zone)}"


def clinic_offset(wall: dt.datetime, zone: dt.tzinfo) -> str:
    """The clinic zone's UTC offset at a wall-clock time, as +08:00."""
    z = wall.replace(tzinfo=zone).strftime("%z")
    return f"{z[:3]}:{z[3:]}"


def shown_critical(lines: Sequence[ReportLine] | None, stored: Sequence[str], speaker: Speaker) -> list[CriticalReason]:
    """Why it is critical, for a page: each reason's text and its detail (an old report: its
    English reasons as they were stored)."""
    if lines is None:
        return [CriticalReason(reason) for reason in stored]
    return [critical(line, speaker) for line in critical_lines(lines)]


def unnamed(value_type: str, speaker: Speaker) -> str:
    """The label of a content item the county gave no name: what kind of item it is."""
    _ = speaker.gettext
    names = {
        "CONTAINER": _("Section"),
        "TEXT": _("Text"),
        "CODE": _("Code"),
        "NUM": _("Number"),
        PERSON_NAME: _("Name"),
        "DATE": _("Date"),
        "TIME": _("Time"),
        "DATETIME": _("Date and time"),
        "UIDREF": _("Identifier"),
    }
    return names.get(value_type, _("Item"))


def body_line(line: ReportLine, speaker: Speaker) -> str:
    """One line of the report's body, indented as its place in the content tree (gettext calls
    stay out of f-strings: Babel's extractor does not look inside them)."""
    _ = speaker.gettext
    indent = INDENT * line.depth
    label = concept_name(line.name, line.concept, speaker) or unnamed(line.code, speaker)
    match line.kind:
        case LineKind.CONTAINER:
            return indent + label
        case LineKind.NO_VALUE:
            value = _("(no value)")
        case LineKind.REFERENCE:
            value = _("(reference to %(what)s)", what=line.value or _("an object"))
        case LineKind.COORDINATES:
            value = _("(coordinates, not drawn here)")
        case LineKind.CONCLUSION:
            indent, label, value = "", _("Conclusion"), line.value
        case LineKind.CODED:
            indent, label, value = "", _("Coded conclusion"), concept_name(line.value, line.value_concept, speaker)
        case LineKind.PRESENTED:
            return line.value
        case LineKind.ITEM if line.code == PERSON_NAME:  # a person's name: 陈静, not 陈 静
            value = display_name(line.value)
        case _:  # ITEM, RESULT: the county's name and value (a coded value the gateway knows: its term)
            value = concept_name(line.value, line.value_concept, speaker)
    return indent + labelled(label, value, speaker)


def footer_line(line: ReportLine, speaker: Speaker) -> str:
    _ = speaker.gettext
    match line.kind:
        case LineKind.DOCUMENT:
            kb = f"{line.number / 1024:.0f}"
            if line.value == "application/pdf":
                return _("PDF document, %(kb)s KB: printed with the report (Print)", kb=kb)
            return _("%(type)s document, %(kb)s KB", type=line.value or "?", kb=kb)
        case LineKind.READ_BY:
            who = (display_name(line.name) if line.code == PERSON_NAME else line.name) or _("(not named)")
            if line.value:
                return _("Read by %(doctor)s, %(time)s", doctor=who, time=readable_time(line.value, speaker.zone))
            return _("Read by %(doctor)s", doctor=who)
        case LineKind.CHECK_PATIENT:
            return _(
                "Check: the report names patient %(theirs)s, the ECG was of %(ours)s: check before use",
                theirs=line.name,
                ours=line.value,
            )
        case _:
            return ""


# The SR's observer context (TID 1002) a patient's paper leaves out: what kind of observer read it,
# and the reading doctor's name where the footer says "Read by" already (a device observer's UID).
OBSERVER_KIND = {"DCM 121005", "DCM 121012"}
OBSERVER_NAME = "DCM 121008"


def report_text(lines: Sequence[ReportLine], speaker: Speaker) -> str:
    """The whole report: its title, what the gateway found about it (amended, critical), the
    county's content as written, then who read it and what could not be read."""
    return "\n".join(_whole_report(lines, speaker, for_page=False))


def page_text(lines: Sequence[ReportLine], speaker: Speaker) -> str:
    """The whole report as the console's page and the paper show it under their own heading and
    critical reason, as a patient may read it: no rule under the title, no critical line (said
    above it), no observer context (the footer names the reading doctor)."""
    return "\n".join(_whole_report(lines, speaker, for_page=True))


def _observer_context(line: ReportLine, read_by: bool) -> bool:
    concept = line.concept or named_concept(line.name)
    return concept in OBSERVER_KIND or (read_by and concept == OBSERVER_NAME)


def _whole_report(lines: Sequence[ReportLine], speaker: Speaker, *, for_page: bool) -> list[str]:
    _ = speaker.gettext
    unreadable = any(line.kind == LineKind.UNREADABLE for line in lines)
    title = next((concept_name(line.value, line.concept, speaker) for line in lines if line.kind == LineKind.TITLE), "")
    title = title or (_("Unreadable report") if unreadable else _("Report"))
    out = [title] if for_page else [title, underline(title)]
    for line in lines:
        if line.kind == LineKind.UNREADABLE:
            out.append(_("The reading center sent a report this gateway cannot read; it is kept as received."))
        elif line.kind == LineKind.AMENDED:
            if line.number:
                out.append(
                    speaker.ngettext(
                        "AMENDED: replaces %(n)d earlier report", "AMENDED: replaces %(n)d earlier reports", line.number
                    )
                )
            else:
                out.append(_("AMENDED: this is a corrected version of the report"))
        elif line.kind == LineKind.WITHDRAWN:
            out.append(_("WITHDRAWN by the reading center (%(status)s): do not act on this report", status=line.value))
    reasons = [] if for_page else shown_reasons(lines, (), speaker)
    if reasons:
        out.append(_("CRITICAL RESULT: %(reasons)s", reasons="; ".join(reasons)))
    read_by = any(line.kind == LineKind.READ_BY and line.name for line in lines)
    out += [
        body_line(line, speaker)
        for line in lines
        if line.kind not in HEADER | CRITICAL | FOOTER and not (for_page and _observer_context(line, read_by))
    ]
    out.append("")
    out += [footer_line(line, speaker) for line in lines if line.kind in (LineKind.DOCUMENT, LineKind.READ_BY)]
    problems = [line.value for line in lines if line.kind == LineKind.PROBLEM]
    if problems:
        out.append(_("Could not read: %(problems)s", problems="; ".join(problems)))
    out += [footer_line(line, speaker) for line in lines if line.kind == LineKind.CHECK_PATIENT]
    return out


def shown_text(lines: Sequence[ReportLine] | None, stored_text: str, speaker: Speaker) -> str:
    """The report's text in `speaker`'s language; a report stored before lines were kept has
    only its English text, shown as it is."""
    return stored_text if lines is None else report_text(lines, speaker)


def shown_page_text(lines: Sequence[ReportLine] | None, stored_text: str, speaker: Speaker) -> str:
    """The report's text as the page and the paper show it (`page_text`); an old report's English
    text as it is."""
    return stored_text if lines is None else page_text(lines, speaker)


def shown_reasons(lines: Sequence[ReportLine] | None, stored: Sequence[str], speaker: Speaker) -> list[str]:
    """Why it is critical, in `speaker`'s language (an old report: its English reasons)."""
    return [printed(reason, speaker) for reason in shown_critical(lines, stored, speaker)]


def replaced_note(current: str, speaker: Speaker) -> str:
    """What a replaced report's paper says first (the county's PDF gets it as a page of its own)."""
    return speaker.gettext("This report was replaced by report %(number)s: do not act on it.", number=current)


def unassigned_note(county_patient: str, speaker: Speaker) -> str:
    """Why a report on an ECG sent without a patient names no patient of this clinic, and the
    patient the county's report names as the county's words (to check, never to take as ours)."""
    _ = speaker.gettext
    note = _("This ECG was sent without a patient: the gateway did not know whose it was.")
    if not county_patient:
        return note
    named = _(
        "The county's report names %(patient)s: that is what the county wrote, not this clinic's record. "
        "Check which patient this was before you use it.",
        patient=county_patient,
    )
    return f"{note}\n{named}"


def ecg_lines(ecg_time: dt.datetime | None, device: str, reader: Reader) -> list[str]:
    """Which ECG a report reads: its time and, when known, the device that recorded it."""
    _ = reader.gettext
    when = labelled(_("ECG recorded"), reader.full(ecg_time) or "—", reader)
    return [when, *([labelled(_("Device"), device, reader)] if device else [])]


def unassigned_lines(county_patient: str, ecg_time: dt.datetime | None, device: str, reader: Reader) -> list[str]:
    """The head of a report on an ECG sent without a patient: no patient of ours, the county's
    patient flagged as the county's, and which ECG it was."""
    head = labelled(reader.gettext("ECG report"), reader.gettext("Patient not known"), reader)
    return [head, unassigned_note(county_patient, reader), *ecg_lines(ecg_time, device, reader)]


def pdf_note(
    reader: Reader,
    *,
    replaced_by: str = "",
    unassigned: bool = False,
    county_patient: str = "",
    ecg_time: dt.datetime | None = None,
    device: str = "",
) -> str:
    """What the county's PDF cannot say about itself, for a page printed before it: that a newer
    report replaced it, that the ECG was sent without a patient (the name on the PDF is the
    county's) and which ECG it was. "" when there is nothing to say (the PDF prints alone)."""
    return "\n".join(head_lines(replaced_by, unassigned, county_patient, ecg_time, device, reader))


def head_lines(
    replaced_by: str, unassigned: bool, county_patient: str, ecg_time: dt.datetime | None, device: str, reader: Reader
) -> list[str]:
    """What paper says first, on the PDF's note and the text printout alike: that a newer report
    replaced this one, and that the ECG was sent without a patient (with which ECG it was)."""
    lines = [replaced_note(replaced_by, reader)] if replaced_by else []
    if unassigned:
        lines += unassigned_lines(county_patient, ecg_time, device, reader)
    return lines


def printout(
    reader: Reader,
    *,
    patient: str,
    patient_id: str,
    ecg_time: dt.datetime | None,
    received_at: dt.datetime,
    reading_doctor: str,
    reasons: Sequence[str],
    text: str,
    replaced_by: str = "",
    unassigned: bool = False,
    county_patient: str = "",
    device: str = "",
) -> str:
    """A report on paper when the county sent no PDF (the console's clinic printer, `lastmile
    report print`): the page's facts, then the whole report, in `reader`'s language (CUPS lays
    the UTF-8 text out with the image's Noto CJK fonts). `reasons`: why it is critical, if it is;
    `replaced_by`: the current version's number, when a newer one replaced this report (said first:
    paper outlives the page). `unassigned`: the ECG was sent without a patient; `county_patient`
    (the patient the county's report names) is then printed as what the county wrote, flagged,
    and `device` says which recording it was."""
    _ = reader.gettext
    lines = [
        *head_lines(replaced_by, unassigned, county_patient, ecg_time, device, reader),
        *(
            []
            if unassigned
            else [
                labelled(_("ECG report"), f"{patient or patient_id}  {patient_id}", reader),
                *ecg_lines(ecg_time, device, reader),
            ]
        ),
        labelled(_("Report received"), reader.full(received_at), reader),
        labelled(_("Read by"), reading_doctor or "—", reader),
    ]
    if reasons:
        lines.append(labelled(_("Critical result"), "; ".join(reasons), reader))
    return "\n".join([*lines, "", text, ""])
