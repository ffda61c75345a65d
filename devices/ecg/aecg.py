"""HL7 aECG (FDA annotated ECG, HL7 v3 XML) decoder.

Parsed with defusedxml (no DTDs, no entity expansion: the XML is untrusted). We read the
first RHYTHM series: its TIME_ABSOLUTE or TIME_RELATIVE sequence (start and increment) and
its lead sequences (SLIST: physical value = digits * scale + origin), and the cart's findings:
the representative beats (REPRESENTATIVE_BEAT derived series) as median beats, the global
measurements of its annotation sets (MDC_ECG_TIME_PD_*, MDC_ECG_ANGLE_*, MDC_ECG_HEART_RATE;
those of the representative beat first, per-beat values inside MDC_ECG_BEAT never), the
statements (rhythm and interpretation annotations; a set authored by a person is a physician's)
and the subject finding comment.

Acquisition time, first that is present: the absolute time sequence's head; else the
series' effectiveTime (low; center; high minus the duration); else the document's
effectiveTime the same way. A relative time head (seconds) is added to that base. In the
FDA examples `center` is the acquisition time itself, so it is read as the start.
"""

from __future__ import annotations

import codecs
import datetime as dt
import re
from dataclasses import dataclass
from xml.etree.ElementTree import Element

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from devices.ecg.findings import EcgMeasurement, EcgStatement, MedianBeats, StatementSource, measurement
from devices.ecg.leads import derive_limb_leads, normalise_lead_name, require_unique
from devices.ecg.recording import EcgRecording
from devices.ecg.scaling import Channel, to_common_unit
from devices.errors import InvalidRecordingError, ProtocolError, UnsupportedFeatureError
from devices.identity import POSSIBLE_YEARS, DeviceIdentity, Patient, TimeSource

NS = "{urn:hl7-org:v3}"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
MAX_SAMPLES_PER_LEAD = 10_000_000

_UNIT_TO_UV = {"uV": 1.0, "mV": 1000.0, "V": 1_000_000.0, "nV": 0.001}
_TIME_TO_S = {"s": 1.0, "ms": 0.001, "us": 0.000001}
_SEX = {"M": "M", "F": "F"}
_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6})\d*)?([+-]\d{4})?$")


# The XML declaration's encoding name (in the first bytes, ASCII-compatible encodings only).
_DECLARED = re.compile(rb"""\A(?:\xef\xbb\xbf)?\s*<\?xml[^>]*?\sencoding\s*=\s*["']([A-Za-z][A-Za-z0-9._-]*)["']""")
_DECLARED_TEXT = re.compile(r"""\A(\ufeff?\s*<\?xml[^>]*?\sencoding\s*=\s*["'])[A-Za-z][A-Za-z0-9._-]*""")
# what the XML parser (expat) reads itself; it refuses every other multi-byte encoding
_PARSER_CODECS = frozenset({"utf-8", "utf-16", "utf-16-le", "utf-16-be", "iso8859-1", "ascii"})


def _parseable(data: bytes) -> bytes:
    """`data` as the XML parser can read it: a document in an encoding the parser does not
    know (GB 2312, GBK, GB 18030: Chinese carts' PC software) is decoded with Python's codec
    and handed over as UTF-8, its declaration saying so. Anything else is left as it is."""
    declared = _DECLARED.match(data[:256])
    if declared is None:
        return data
    name = declared.group(1).decode("ascii")
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        return data  # the parser refuses it with its own message
    if codec in _PARSER_CODECS:
        return data
    try:
        text = data.decode(codec)
    except (UnicodeDecodeError, LookupError):  # LookupError: a codec of bytes, such as "zlib"
        raise ProtocolError(f"HL7 aECG: the document is not {name} text as its XML declaration says") from None
    return _DECLARED_TEXT.sub(r"\1utf-8", text, count=1).encode("utf-8")


def _q(path: str) -> str:
    """'a/b' -> '{ns}a/{ns}b' for ElementTree."""
    return "/".join(part if part in (".", "..") or part.startswith(".") else NS + part for part in path.split("/"))


def _attr(el: Element | None, path: str, name: str = "value") -> str | None:
    if el is None:
        return None
    node = el.find(_q(path)) if path else el
    return None if node is None else node.get(name)


def parse_ts(value: str, local_tz: dt.tzinfo) -> dt.datetime:
    """HL7 TS (YYYYMMDDHHMMSS.UUUU+ZZZZ, any trailing precision) to an aware datetime."""
    m = _TS.match(value.strip())
    if not m or m.group(2) is None or m.group(3) is None:
        raise ProtocolError(f"HL7 aECG: unreadable time stamp {value!r}")
    year, month, day, hour, minute, second = (int(g) if g else 0 for g in m.groups()[:6])
    micro = int((m.group(7) or "0").ljust(6, "0"))
    tz = local_tz
    if m.group(8):
        sign = -1 if m.group(8)[0] == "-" else 1
        hours, minutes = int(m.group(8)[1:3]), int(m.group(8)[3:5])
        if hours > 14 or minutes > 59:
            raise ProtocolError(f"HL7 aECG: bad time zone in {value!r}")
        tz = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
    if year not in POSSIBLE_YEARS:
        raise ProtocolError(f"HL7 aECG: impossible date/time {value!r}")
    try:
        return dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        raise ProtocolError(f"HL7 aECG: impossible date/time {value!r}") from None


def _quantity_s(el: Element | None, what: str) -> float | None:
    if el is None or el.get("value") is None:
        return None
    unit = el.get("unit", "s")
    if unit not in _TIME_TO_S:
        raise UnsupportedFeatureError(f"HL7 aECG: {what} in unit {unit!r} is not supported")
    try:
        seconds = float(el.get("value", "")) * _TIME_TO_S[unit]
    except ValueError:
        raise ProtocolError(f"HL7 aECG: {what} {el.get('value')!r} is not a number") from None
    if not np.isfinite(seconds):  # "inf"/"nan" parse as floats and would crash the rate below
        raise ProtocolError(f"HL7 aECG: {what} {el.get('value')!r} is not finite")
    return seconds


def _number(el: Element | None, what: str, default: float) -> tuple[float, str]:
    if el is None or el.get("value") is None:  # an absent scale or origin: the caller says what stands in
        return default, "uV"
    try:
        value = float(el.get("value", ""))
    except ValueError:
        raise ProtocolError(f"HL7 aECG: {what} {el.get('value')!r} is not a number") from None
    if not np.isfinite(value):
        raise ProtocolError(f"HL7 aECG: {what} is not finite")
    return value, el.get("unit", "uV")


@dataclass
class _Sequences:
    start: dt.datetime | None
    relative_s: float | None
    increment_s: float
    leads: list[tuple[str, Channel]]


def _read_sequence_set(seq_set: Element, local_tz: dt.tzinfo) -> _Sequences:
    start = None
    relative = None
    increment = None
    leads: list[tuple[str, Channel]] = []
    for comp in seq_set.findall(_q("component/sequence")):
        code = _attr(comp, "code", "code") or ""
        value = comp.find(_q("value"))
        if value is None:
            continue
        if code in ("TIME_ABSOLUTE", "TIME_RELATIVE"):
            head = value.find(_q("head"))
            increment = _quantity_s(value.find(_q("increment")), "time increment")
            if code == "TIME_ABSOLUTE" and head is not None and head.get("value"):
                start = parse_ts(head.get("value", ""), local_tz)
            elif code == "TIME_RELATIVE":
                relative = _quantity_s(head, "relative start") or 0.0
            continue
        digits = value.find(_q("digits"))
        if digits is None:
            continue
        vtype = value.get(XSI_TYPE, "")
        if vtype and not vtype.startswith("SLIST"):
            raise UnsupportedFeatureError(f"HL7 aECG: lead {code} stores its samples as {vtype}, not SLIST")
        scale, scale_unit = _number(value.find(_q("scale")), f"lead {code} scale", 1.0)
        origin, origin_unit = _number(value.find(_q("origin")), f"lead {code} origin", 0.0)
        if scale_unit not in _UNIT_TO_UV or origin_unit not in _UNIT_TO_UV:
            raise UnsupportedFeatureError(f"HL7 aECG: lead {code} is in {scale_unit!r}/{origin_unit!r}, not a voltage")
        if scale <= 0:
            raise ProtocolError(f"HL7 aECG: lead {code} has scale {scale}")
        tokens = (digits.text or "").split()
        if len(tokens) > MAX_SAMPLES_PER_LEAD:
            raise UnsupportedFeatureError(f"HL7 aECG: lead {code} has {len(tokens)} samples")
        try:
            raw = np.array(tokens, dtype=np.int64)
        except (ValueError, OverflowError):
            raise ProtocolError(f"HL7 aECG: lead {code} has digits that are not whole numbers") from None
        if raw.size and (raw.min() < -(2**31) or raw.max() >= 2**31):
            raise ProtocolError(f"HL7 aECG: lead {code} has digits beyond 32 bits")
        leads.append(
            (
                code,
                Channel(
                    raw=raw, uv_per_unit=scale * _UNIT_TO_UV[scale_unit], offset_uv=origin * _UNIT_TO_UV[origin_unit]
                ),
            )
        )
    if increment is None or not np.isfinite(increment) or increment <= 0:
        raise ProtocolError("HL7 aECG: the rhythm series has no time sequence with a positive increment")
    return _Sequences(start, relative, increment, leads)


def _interval_start(eff: Element | None, duration_s: float, local_tz: dt.tzinfo) -> dt.datetime | None:
    if eff is None:
        return None
    low, center, high = (_attr(eff, name) for name in ("low", "center", "high"))
    if low:
        return parse_ts(low, local_tz)
    if center:
        return parse_ts(center, local_tz)
    if high:
        try:
            return parse_ts(high, local_tz) - dt.timedelta(seconds=duration_s)
        except OverflowError:  # a near-zero rate makes the duration absurd
            raise ProtocolError(f"HL7 aECG: a recording of {duration_s:g} s cannot end at {high!r}") from None
    return None


def _patient(root: Element) -> Patient | None:
    subject = root.find(_q("componentOf/timepointEvent/componentOf/subjectAssignment/subject/trialSubject"))
    if subject is None:
        return None
    ident = subject.find(_q("id"))
    patient_id = (ident.get("extension") or "").strip() if ident is not None else ""
    if not patient_id:
        return None  # an id with only a root names the register, not the patient
    person = subject.find(_q("subjectDemographicPerson"))
    name = ""
    birth = None
    sex = ""
    if person is not None:
        name_el = person.find(_q("name"))
        if name_el is not None:
            family = name_el.findtext(_q("family")) or ""
            given = name_el.findtext(_q("given")) or ""
            name = f"{family.strip()}^{given.strip()}" if (family or given) else (name_el.text or "").strip()
        sex = _SEX.get(_attr(person, "administrativeGenderCode", "code") or "", "")
        born = _attr(person, "birthTime")
        if born and re.fullmatch(r"\d{8}.*", born):
            try:
                birth = dt.date(int(born[:4]), int(born[4:6]), int(born[6:8]))
            except ValueError:
                birth = None
    return Patient(
        patient_id=patient_id,
        name=name,
        birth_date=birth,
        sex=sex,
        issuer=(ident.get("root") or "").strip() if ident is not None else "",
    )


def _device(series: Element) -> DeviceIdentity:
    author = series.find(_q("author/seriesAuthor"))
    if author is None:
        return DeviceIdentity()
    dev = author.find(_q("manufacturedSeriesDevice"))
    return DeviceIdentity(
        manufacturer=(author.findtext(_q("manufacturerOrganization/name")) or "").strip(),
        model=(dev.findtext(_q("manufacturerModelName")) or "").strip() if dev is not None else "",
        serial=(_attr(dev, "id", "extension") or "").strip(),
        software_version=(dev.findtext(_q("softwareName")) or "").strip() if dev is not None else "",
    )


# ---------------------------------------------------------------- the cart's findings

_MEASUREMENT_CODES: dict[str, tuple[str, str]] = {
    "MDC_ECG_HEART_RATE": ("heart-rate", ""),
    "MDC_ECG_TIME_PD_RR": ("rr-interval", ""),
    "MDC_ECG_TIME_PD_RR_GL": ("rr-interval", ""),
    "MDC_ECG_TIME_PD_PP": ("pp-interval", ""),
    "MDC_ECG_TIME_PD_PP_GL": ("pp-interval", ""),
    "MDC_ECG_TIME_PD_P": ("p-duration", ""),
    "MDC_ECG_TIME_PD_P_GL": ("p-duration", ""),
    "MDC_ECG_TIME_PD_PR": ("pr-interval", ""),
    "MDC_ECG_TIME_PD_PR_GL": ("pr-interval", ""),
    "MDC_ECG_TIME_PD_QRS": ("qrs-duration", ""),
    "MDC_ECG_TIME_PD_QRS_GL": ("qrs-duration", ""),
    "MDC_ECG_TIME_PD_QT": ("qt-interval", ""),
    "MDC_ECG_TIME_PD_QT_GL": ("qt-interval", ""),
    "MDC_ECG_TIME_PD_QTc": ("qtc-interval", ""),
    "MDC_ECG_TIME_PD_QTcB": ("qtc-interval", "bazett"),
    "MDC_ECG_TIME_PD_QTcF": ("qtc-interval", "fridericia"),
    "MDC_ECG_TIME_PD_QTcH": ("qtc-interval", "hodges"),
    "MDC_ECG_ANGLE_P_FRONT": ("p-axis", ""),
    "MDC_ECG_ANGLE_QRS_FRONT": ("qrs-axis", ""),
    "MDC_ECG_ANGLE_T_FRONT": ("t-axis", ""),
}
_TO_UNIT = {
    "ms": ("ms", 1.0),
    "s": ("ms", 1000.0),
    "us": ("ms", 0.001),
    "deg": ("deg", 1.0),
    "/min": ("/min", 1.0),
    "bpm": ("/min", 1.0),
    "{beats}/min": ("/min", 1.0),
}
_STATEMENT_CODES = (
    "MDC_ECG_RHY",
    "MDC_ECG_INTERPRETATION",
    "MDC_ECG_INTERPRETATION_STATEMENT",
    "MDC_ECG_INTERPRETATION_SUMMARY",
)


def _annotation_sets(series: Element) -> list[Element]:
    return series.findall(_q("subjectOf/annotationSet"))


def _set_source(annotation_set: Element) -> StatementSource:
    person = annotation_set.find(_q("author/assignedEntity/assignedAuthorType/assignedPerson"))
    return StatementSource.PHYSICIAN if person is not None else StatementSource.DEVICE


def _has_lead(annotation: Element) -> bool:
    """A supporting region that names a lead makes the annotation per-lead, not global."""
    for code in annotation.findall(_q("support/supportingROI/component/boundary/code")):
        if (code.get("code") or "").startswith("MDC_ECG_LEAD"):
            return True
    return False


def _walk(parent: Element, inside_beat: bool, found: list[tuple[Element, bool]]) -> None:
    for annotation in parent.findall(_q("component/annotation")):
        found.append((annotation, inside_beat))
        beat = inside_beat or _attr(annotation, "code", "code") == "MDC_ECG_BEAT"
        _walk(annotation, beat, found)


def _findings_of_set(
    annotation_set: Element, where: str, measurements: dict[str, EcgMeasurement], statements: list[EcgStatement]
) -> None:
    source = _set_source(annotation_set)
    found: list[tuple[Element, bool]] = []
    _walk(annotation_set, False, found)
    for annotation, inside_beat in found:
        code = _attr(annotation, "code", "code") or ""
        value = annotation.find(_q("value"))
        if value is None:
            continue
        vtype = value.get(XSI_TYPE, "")
        if code in _MEASUREMENT_CODES and vtype == "PQ" and not inside_beat and not _has_lead(annotation):
            kind, method = _MEASUREMENT_CODES[code]
            unit = _TO_UNIT.get(value.get("unit", ""))
            try:
                number = float(value.get("value", ""))
            except ValueError:
                continue
            if unit is None or kind in measurements:
                continue
            extra = {"method": method} if method else {}
            m = measurement(kind, number * unit[1], f"aecg:{where}", **extra)
            if m is not None and m.unit == unit[0]:
                measurements[kind] = m
        elif code in _STATEMENT_CODES and not inside_beat:
            if vtype in ("ST", "ED"):
                text, coded = (value.text or "").strip(), ""
            else:
                coded = value.get("code", "")
                text = (value.get("displayName") or coded).strip()
            if text:
                statements.append(EcgStatement(text, source, f"aecg:{where}", coded))


def _representative(root: Element, rhythm: Element, local_tz: dt.tzinfo) -> tuple[Element | None, MedianBeats | None]:
    for derived in rhythm.findall(_q("derivation/derivedSeries")) + root.findall(_q("component/series")):
        if _attr(derived, "code", "code") != "REPRESENTATIVE_BEAT":
            continue
        for seq_set in derived.findall(_q("component/sequenceSet")):
            try:
                parsed = _read_sequence_set(seq_set, local_tz)
            except ProtocolError:
                continue  # the median beats are unreadable: the rhythm and its findings still go
            lengths = {c.raw.size for _, c in parsed.leads}
            if not parsed.leads or len(lengths) != 1 or 0 in lengths:
                continue
            names = tuple(normalise_lead_name(code) for code, _ in parsed.leads)
            if len(set(names)) != len(names):
                continue
            try:
                samples, uv_per_unit = to_common_unit([c for _, c in parsed.leads], "HL7 aECG median beats")
                return derived, MedianBeats(
                    samples=samples,
                    lead_names=names,
                    sampling_rate_hz=_rate(parsed.increment_s),
                    uv_per_unit=uv_per_unit,
                    source="aecg:representative-beat",
                )
            except (ProtocolError, InvalidRecordingError):
                continue
        return derived, None
    return None, None


def _findings(
    root: Element, rhythm: Element, representative: Element | None
) -> tuple[tuple[EcgMeasurement, ...], tuple[EcgStatement, ...]]:
    measurements: dict[str, EcgMeasurement] = {}
    statements: list[EcgStatement] = []
    # the representative beat's global values are the cart's summary: they come first
    if representative is not None:
        for annotation_set in _annotation_sets(representative):
            _findings_of_set(annotation_set, "representative-beat", measurements, statements)
    for annotation_set in _annotation_sets(rhythm):
        _findings_of_set(annotation_set, "rhythm", measurements, statements)
    comment = (root.findtext(_q("pertainsTo/subjectFindingComment/text")) or "").strip()
    if comment:
        statements.append(EcgStatement(comment, StatementSource.COMMENT, "aecg:subjectFindingComment"))
    return tuple(measurements.values()), tuple(statements)


def _rate(increment_s: float) -> float:
    rate = 1.0 / increment_s
    if not np.isfinite(rate):  # a subnormal increment such as 1e-320 s
        raise ProtocolError(f"HL7 aECG: time increment {increment_s!r} s gives no usable sampling rate")
    whole = round(rate)
    return float(whole) if whole and abs(rate - whole) < 1e-6 * whole else rate


def read_aecg(
    data: bytes, *, local_tz: dt.tzinfo = dt.timezone.utc, received_at: dt.datetime | None = None
) -> EcgRecording:
    """Decode the rhythm series of an HL7 aECG document.

    `local_tz` interprets time stamps written without a zone; `received_at` is used
    (TimeSource.GATEWAY_RECEIPT) only when the document carries no time at all.
    """
    document = _parseable(bytes(data))
    try:
        root = fromstring(document, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise ProtocolError(f"HL7 aECG: refused unsafe XML ({type(exc).__name__})") from None
    except (ParseError, ValueError, LookupError) as exc:  # LookupError: an unknown declared encoding
        raise ProtocolError(f"HL7 aECG: not well-formed XML ({exc})") from None
    if root.tag != NS + "AnnotatedECG":
        raise ProtocolError(f"not an HL7 aECG document (root element {root.tag!r})")
    rhythm = None
    for series in root.findall(_q("component/series")):
        if _attr(series, "code", "code") == "RHYTHM":
            rhythm = series
            break
    if rhythm is None:
        raise ProtocolError(
            "HL7 aECG document contains no rhythm ECG (no RHYTHM series): "
            "nothing to forward; check the export settings of the cart"
        )
    parsed = None
    for seq_set in rhythm.findall(_q("component/sequenceSet")):
        candidate = _read_sequence_set(seq_set, local_tz)
        if candidate.leads:
            parsed = candidate
            break
    if parsed is None:
        raise ProtocolError("HL7 aECG rhythm series has no lead sequences")
    lengths = {c.raw.size for _, c in parsed.leads}
    if len(lengths) != 1 or 0 in lengths:
        raise UnsupportedFeatureError(f"HL7 aECG leads have different or zero lengths {sorted(lengths)}")
    names = [normalise_lead_name(code) for code, _ in parsed.leads]
    require_unique(names, "HL7 aECG")
    samples, uv_per_unit = to_common_unit([c for _, c in parsed.leads], "HL7 aECG")
    rate = _rate(parsed.increment_s)
    duration = lengths.pop() / rate

    source = TimeSource.FILE
    start = parsed.start
    if start is None:
        start = _interval_start(rhythm.find(_q("effectiveTime")), duration, local_tz) or _interval_start(
            root.find(_q("effectiveTime")), duration, local_tz
        )
        if start is not None and parsed.relative_s:
            try:
                start += dt.timedelta(seconds=parsed.relative_s)
            except OverflowError:  # e.g. a date written where seconds belong
                raise ProtocolError(f"HL7 aECG relative start {parsed.relative_s} s is out of range") from None
    if start is None:
        if received_at is None:
            raise ProtocolError("HL7 aECG document carries no acquisition time")
        start, source = received_at, TimeSource.GATEWAY_RECEIPT
    all_samples, all_names, derived = derive_limb_leads(samples, tuple(names))
    try:
        representative, median = _representative(root, rhythm, local_tz)
        measurements, statements = _findings(root, rhythm, representative)
        return EcgRecording(
            samples=all_samples,
            lead_names=all_names,
            sampling_rate_hz=rate,
            uv_per_unit=uv_per_unit,
            acquired_at=start,
            time_source=source,
            device=_device(rhythm),
            patient=_patient(root),
            derived_leads=derived,
            source_format="aecg",
            measurements=measurements,
            statements=statements,
            median_beats=median,
        )
    except InvalidRecordingError as exc:
        raise ProtocolError(f"HL7 aECG: {exc}") from None


def looks_like_aecg(data: bytes) -> bool:
    head = bytes(data[:4096])
    return b"AnnotatedECG" in head and b"<" in head
