"""DICOM waveform objects (12-lead ECG, General ECG, and vendor files that store ECG leads
under other waveform classes) to an EcgRecording.

The SOP class does not decide: any object with a Waveform Sequence whose channels are coded as
ECG leads (SCPECG "5.6.3-9-n", MDC "2:n", or a "Lead ..." meaning) is read. Of several
multiplex groups we take the rhythm group (label RHYTHM; otherwise an ORIGINAL group; the
longest), never the median beat. Per channel, physical value = stored * sensitivity *
correction factor + baseline (in the sensitivity units): channels are brought onto one exact
integer unit or refused. Non-ECG channels (pressure, respiration) are left out.

Malformed UIDs (trailing or doubled dots, as some converters write) do not stop decoding: the
recording does not carry the input's UIDs (the gateway mints its own for what it sends).

The cart's findings: a median-beat group (label MEDIAN/BEAT/REPRESENTATIVE) becomes the
recording's median beats; Waveform Annotation items become measurements (a coded name we know,
MDC or the retired SCPECG codes carts still write, a numeric value and units, no temporal range)
and statements (text, or a coded name/coded value pair). In an object the gateway itself
converted (Contributing Equipment "Lastmile"), annotation group 1 holds the device's findings,
2 a physician's, 3 comments, and items without a group are the gateway's own notes (skipped).
A writer that gives an axis in a time unit (ECGToolkit writes "ms" for every value) has its
value read as degrees, and the measurement says so in its note.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from devices.ecg.findings import (
    KIND_BY_MDC,
    QTC_ALGORITHMS,
    QTC_FORMULA_CODES,
    EcgMeasurement,
    EcgStatement,
    MedianBeats,
    StatementSource,
    measurement,
)
from devices.ecg.leads import (
    MDC_DERIVED_LEADS,
    MDC_LEADS,
    derive_limb_leads,
    lead_name_from_scp_code,
    normalise_lead_name,
    require_unique,
)
from devices.ecg.recording import EcgRecording, SampleGap
from devices.ecg.scaling import Channel, to_common_unit
from devices.errors import InvalidRecordingError, NotAnEcgError, ProtocolError, UnsupportedFeatureError
from devices.identity import POSSIBLE_YEARS, UNASSIGNED_ISSUER, DeviceIdentity, Patient, TimeSource
from devices.inflate import inflate

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_DTYPES = {(8, "SB"): "i1", (8, "UB"): "u1", (16, "SS"): "i2", (16, "US"): "u2", (32, "SL"): "i4", (32, "UL"): "u4"}
_UNIT_TO_UV = {"uV": 1.0, "mV": 1000.0, "V": 1_000_000.0, "nV": 0.001}
_DT = re.compile(r"^(\d{4})(\d{2})(\d{2})(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$")
MAX_SAMPLES = 50_000_000  # samples x channels of one group, checked before any allocation
MAX_INFLATED_BYTES = 64 * 2**20  # a deflated data set may inflate to this much (a 1 MB bomb would give 1 GiB)
_DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True, slots=True)
class _Lead:
    name: str
    index: int  # channel position in the group
    derived: bool  # the file says the lead was computed, not recorded


def _from_text(text: str) -> tuple[str, bool]:
    derived = text.upper().startswith("DERIVED ")
    return normalise_lead_name(text[8:] if derived else text), derived


def _lead_of(channel: Dataset) -> tuple[str, bool] | None:
    """(lead name, derived) of a channel definition, None for a channel that is not an ECG lead."""
    source = channel.get("ChannelSourceSequence")
    unspecified = False  # an ECG lead without a code of its own: its name is in the label
    if source:
        item = source[0]
        scheme = str(item.get("CodingSchemeDesignator", "")).upper()
        value = str(item.get("CodeValue", "")).strip()
        meaning = str(item.get("CodeMeaning", "")).strip()
        m = re.fullmatch(r"5\.6\.3-9-(\d+)", value)
        if scheme.startswith("SCPECG") and m:
            if int(m.group(1)) != 0:
                return lead_name_from_scp_code(int(m.group(1))), False
            unspecified = True
        m = re.fullmatch(r"2:(\d+)", value)
        if scheme == "MDC" and m:
            number = int(m.group(1))
            if number == 0:
                unspecified = True
            elif number in MDC_DERIVED_LEADS:
                return MDC_DERIVED_LEADS[number], True
            elif number in MDC_LEADS:
                return MDC_LEADS[number], False
        if meaning.upper().startswith(("LEAD", "MDC_ECG_LEAD", "DERIVED LEAD")):
            return _from_text(meaning)
    label = str(channel.get("ChannelLabel", "")).strip()
    if label.upper().startswith(("LEAD", "MDC_ECG_LEAD", "DERIVED LEAD")):
        return _from_text(label)
    if unspecified:
        return normalise_lead_name(label) or lead_name_from_scp_code(0), False
    return None


def _is_median(group: Dataset) -> bool:
    label = str(group.get("MultiplexGroupLabel", "")).upper()
    return "MEDIAN" in label or "BEAT" in label or "REPRESENTATIVE" in label


def _group_rank(group: Dataset, n_ecg: int) -> tuple[int, ...]:
    label = str(group.get("MultiplexGroupLabel", "")).upper()
    originality = str(group.get("WaveformOriginality", "")).upper()
    samples = int(group.get("NumberOfWaveformSamples", 0) or 0)
    is_median = _is_median(group)
    return ("RHYTHM" in label, not is_median, originality == "ORIGINAL", n_ecg, samples)


def _parse_dt(text: str, local_tz: dt.tzinfo, default_offset: str = "") -> dt.datetime | None:
    m = _DT.match(text.strip())
    if not m:
        return None
    y, mo, d, h, mi, s = (int(g) if g else 0 for g in m.groups()[:6])
    micro = int((m.group(7) or "0").ljust(6, "0"))
    offset = m.group(8) or default_offset
    tz = local_tz
    if offset and re.fullmatch(r"[+-]\d{4}", offset):
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[3:5])
        if hours <= 14 and minutes < 60:
            tz = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
    if y not in POSSIBLE_YEARS:
        return None
    try:
        return dt.datetime(y, mo, d, h, mi, s, micro, tzinfo=tz)
    except ValueError:
        return None


def acquired_at_of(ds: Dataset, local_tz: dt.tzinfo) -> dt.datetime | None:
    """The acquisition time a DICOM object states (its zone, else `local_tz`), None if none."""
    offset = str(ds.get("TimezoneOffsetFromUTC", "") or "").strip()
    for value in (ds.get("AcquisitionDateTime"),):
        if value:
            found = _parse_dt(str(value), local_tz, offset)
            if found is not None:
                return found
    for date_kw, time_kw in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
    ):
        date, time = ds.get(date_kw), ds.get(time_kw)
        if date and time:
            found = _parse_dt(str(date).strip() + str(time).strip(), local_tz, offset)
            if found is not None:
                return found
    return None


def _patient(ds: Dataset) -> Patient | None:
    patient_id = str(ds.get("PatientID", "") or "").strip()
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if not patient_id or issuer == UNASSIGNED_ISSUER:
        return None  # no patient, or a gateway's placeholder for "none was identified"
    birth = None
    text = str(ds.get("PatientBirthDate", "") or "").strip()
    if re.fullmatch(r"\d{8}", text) and int(text[:4]) in POSSIBLE_YEARS:
        try:
            birth = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        except ValueError:
            birth = None
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return Patient(
        patient_id=patient_id,
        name=str(ds.get("PatientName", "") or "").strip(),
        birth_date=birth,
        sex=sex if sex in ("M", "F", "O") else "",
        issuer=issuer,
    )


def _named(ds: Dataset, keyword: str) -> str:
    """One of the equipment's names as the object gives it; "" for one that says it is not known
    (a cart writes Manufacturer "Unknown": read beside its model it named a maker, "Unknown ELI250")."""
    value = str(ds.get(keyword, "") or "").strip()
    return "" if value.lower() == "unknown" else value


def device_of(ds: Dataset) -> DeviceIdentity:
    """The equipment that made a DICOM object, as it names itself."""
    software = ds.get("SoftwareVersions", "")
    if software and not isinstance(software, str):
        software = "\\".join(str(s) for s in software)
    return DeviceIdentity(
        manufacturer=_named(ds, "Manufacturer"),
        model=_named(ds, "ManufacturerModelName"),
        serial=_named(ds, "DeviceSerialNumber"),
        software_version=str(software or "").strip(),
    )


def _inflated_data_set(data: bytes) -> bytes | None:
    """The data set of a Part-10 file in Deflated Explicit VR LE, inflated with a cap (pydicom
    would inflate it whole, however big); None for any other file."""
    from pydicom.filereader import read_dataset

    if len(data) < 144 or data[128:132] != b"DICM":
        return None
    fp = io.BytesIO(data)
    fp.seek(132)
    meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 0x0002)
    if str(meta.get("TransferSyntaxUID", "")).rstrip("\x00 ") != _DEFLATED:
        return None
    return inflate(data[fp.tell() :], max_bytes=MAX_INFLATED_BYTES)


def _read_dataset(data: bytes) -> Dataset:
    import pydicom

    data = bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inflated = _inflated_data_set(data)
            # the inflated data set is read as a raw one (force): Explicit VR Little Endian
            ds = pydicom.dcmread(io.BytesIO(inflated if inflated is not None else data), force=True)
            # touch what we need now, so that a malformed element fails here, typed
            ds.get("WaveformSequence")
        return ds
    except ProtocolError:
        raise  # e.g. InflateLimitError: its own message says what is wrong
    except Exception as exc:  # noqa: BLE001 — pydicom raises many kinds on bad bytes; all mean "not readable"
        raise ProtocolError(f"DICOM file is not readable ({type(exc).__name__}: {exc})"[:300]) from None


def _scale(channel: Dataset, lead: str) -> tuple[float, float]:
    """(µV per stored unit, µV of stored 0) of one channel."""
    sensitivity = channel.get("ChannelSensitivity")
    if sensitivity in (None, ""):
        raise UnsupportedFeatureError(f"DICOM ECG: lead {lead} has no channel sensitivity; its amplitude is unknown")
    units = channel.get("ChannelSensitivityUnitsSequence")
    unit = str(units[0].get("CodeValue", "")).strip() if units else ""
    if unit not in _UNIT_TO_UV:
        raise UnsupportedFeatureError(f"DICOM ECG: lead {lead} is in units {unit or 'unknown'!r}, not a voltage")
    correction = channel.get("ChannelSensitivityCorrectionFactor")
    baseline = channel.get("ChannelBaseline")
    try:
        factor = float(sensitivity) * (float(correction) if correction not in (None, "") else 1.0)
        offset = float(baseline) if baseline not in (None, "") else 0.0
    except (TypeError, ValueError):
        raise ProtocolError(f"DICOM ECG: lead {lead} has an unreadable sensitivity or baseline") from None
    if not (np.isfinite(factor) and np.isfinite(offset)) or factor == 0:
        raise ProtocolError(f"DICOM ECG: lead {lead} has sensitivity {factor}")
    # A negative sensitivity means an inverted channel: keep the sign in the samples.
    return factor * _UNIT_TO_UV[unit], offset * _UNIT_TO_UV[unit]


def read_dicom_ecg(
    data: bytes, *, local_tz: dt.tzinfo = dt.timezone.utc, received_at: dt.datetime | None = None
) -> EcgRecording:
    """Decode the rhythm ECG of a DICOM waveform object."""
    ds = _read_dataset(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every odd value it decodes lazily
            return _decode(ds, local_tz, received_at)
    except ProtocolError:
        raise
    except InvalidRecordingError as exc:
        raise ProtocolError(f"DICOM ECG: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        # pydicom parses elements lazily: a damaged element surfaces only when it is read, as
        # whatever exception its parser happens to raise (struct.error, EOFError, ...)
        raise ProtocolError(f"DICOM ECG: damaged element ({type(exc).__name__}: {exc})"[:300]) from None


def _ecg_leads(group: Dataset) -> list[_Lead]:
    channels = group.get("ChannelDefinitionSequence") or []
    return [_Lead(found[0], i, found[1]) for i, ch in enumerate(channels) if (found := _lead_of(ch))]


@dataclass(frozen=True, slots=True)
class _GroupSamples:
    samples: np.ndarray  # (leads, n) in one integer unit, padding rows taken out
    uv_per_unit: float
    rate: float
    leads: list[_Lead]  # the leads in `samples`: those with padding among real samples are left out
    gaps: tuple[SampleGap, ...]  # runs of rows that are padding in every lead
    not_recorded: tuple[str, ...]  # the leads left out


def _padding_value(group: Dataset, dtype: np.dtype) -> int | None:
    """Waveform Padding Value (5400,100A), the stored value that means "no sample here", when
    it can only mean that: the most negative value of signed samples (what this gateway and
    most carts write). Writers also declare values a real sample takes all the time (ECGToolkit
    declares 0 and pads nothing): those are samples, or every lead crossing 0 would be lost."""
    raw = group.get("WaveformPaddingValue")
    if not isinstance(raw, bytes) or len(raw) < dtype.itemsize or dtype.kind != "i":
        return None
    value = int(np.frombuffer(raw[: dtype.itemsize], dtype=dtype)[0])
    return value if value == np.iinfo(dtype).min else None


def _gaps(padded_rows: np.ndarray) -> tuple[SampleGap, ...]:
    """Each run of padded rows as the gap before the next kept sample."""
    edges = np.diff(np.concatenate(([0], padded_rows.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    kept_before = np.cumsum(~padded_rows)
    return tuple(SampleGap(start=int(kept_before[s - 1]) if s else 0, missing=int(e - s)) for s, e in zip(starts, ends))


def _group_samples(ds: Dataset, group: Dataset, leads: list[_Lead]) -> _GroupSamples:
    """The ECG leads of one multiplex group in one integer unit, padding taken out: rows that
    are padding in every lead become gaps (the time axis stays true), and a lead with padding
    among real samples (an electrode off for a while) is left out rather than drawn as -41 mV."""
    n_channels = int(group.get("NumberOfWaveformChannels", 0) or 0)
    n_samples = int(group.get("NumberOfWaveformSamples", 0) or 0)
    channel_defs = group.get("ChannelDefinitionSequence")
    if n_channels != len(channel_defs) or n_channels < 1 or n_samples < 1:
        raise ProtocolError(
            f"DICOM ECG: group declares {n_channels} channels x {n_samples} samples "
            f"but defines {len(channel_defs)} channels"
        )
    if n_channels * n_samples > MAX_SAMPLES:
        raise UnsupportedFeatureError(f"DICOM ECG: {n_channels} x {n_samples} samples is more than we accept")
    bits = int(group.get("WaveformBitsAllocated", 0) or 0)
    interpretation = str(group.get("WaveformSampleInterpretation", "")).strip()
    if (bits, interpretation) not in _DTYPES:
        raise UnsupportedFeatureError(f"DICOM ECG: {bits}-bit {interpretation or '?'} samples are not supported")
    raw = group.get("WaveformData")
    if raw is None:
        raise ProtocolError("DICOM ECG: the waveform group has no Waveform Data")
    raw = bytes(raw)
    expected = n_channels * n_samples * bits // 8
    if len(raw) < expected:
        raise ProtocolError(f"DICOM ECG: waveform data has {len(raw)} bytes, {expected} expected (file truncated?)")
    try:
        rate = float(group.get("SamplingFrequency"))
    except (TypeError, ValueError):
        raise ProtocolError("DICOM ECG: sampling frequency is missing or unreadable") from None
    if not (np.isfinite(rate) and rate > 0):
        raise ProtocolError(f"DICOM ECG: sampling frequency {rate}")
    little = getattr(ds, "original_encoding", (None, True))[1]
    dtype = np.dtype(_DTYPES[(bits, interpretation)]).newbyteorder("<" if little in (None, True) else ">")
    matrix = np.frombuffer(raw, dtype=dtype, count=n_channels * n_samples).reshape(n_samples, n_channels)
    require_unique([lead.name for lead in leads], "DICOM ECG")
    gaps: tuple[SampleGap, ...] = ()
    not_recorded: list[str] = []
    padding = _padding_value(group, dtype)
    if padding is not None:
        padded = matrix[:, [lead.index for lead in leads]] == padding
        padded_rows = padded.all(axis=1)
        if padded_rows.all():
            raise ProtocolError("DICOM ECG: every sample of the rhythm is Waveform Padding Value (no signal)")
        partly = padded[~padded_rows].any(axis=0)
        not_recorded = [lead.name for lead, out in zip(leads, partly) if out]
        leads = [lead for lead, out in zip(leads, partly) if not out]
        if not leads:
            raise ProtocolError("DICOM ECG: every lead has samples missing (Waveform Padding Value)")
        if padded_rows.any():
            gaps = _gaps(padded_rows)
            matrix = matrix[~padded_rows]
    channels = []
    for lead in leads:
        definition = channel_defs[lead.index]
        skew = definition.get("ChannelSampleSkew")
        if skew not in (None, "") and float(skew) != 0:
            raise UnsupportedFeatureError(f"DICOM ECG: lead {lead.name} is sampled {skew} ms apart from the others")
        scale, offset = _scale(definition, lead.name)
        channels.append(Channel(raw=matrix[:, lead.index], uv_per_unit=scale, offset_uv=offset))
    samples, uv_per_unit = to_common_unit(channels, "DICOM ECG")
    return _GroupSamples(samples, uv_per_unit, rate, leads, gaps, tuple(not_recorded))


def _median_beats(ds: Dataset, groups: list[Dataset], rhythm: Dataset) -> MedianBeats | None:
    """The median-beat group, if there is one besides the rhythm; unreadable ones are skipped."""
    for group in groups:
        if group is rhythm or not _is_median(group):
            continue
        leads = _ecg_leads(group)
        if not leads:
            continue
        try:
            found = _group_samples(ds, group, leads)
            if found.gaps:
                continue  # a beat with a hole is no representative beat
            return MedianBeats(
                samples=found.samples,
                lead_names=tuple(lead.name for lead in found.leads),
                sampling_rate_hz=found.rate,
                uv_per_unit=found.uv_per_unit,
                source="dicom:median-group",
            )
        except (ProtocolError, InvalidRecordingError):
            continue
    return None


# Retired SCPECG codes for measurements (what carts such as Mortara still write) -> ours.
_SCPECG_MEASUREMENTS: dict[str, str] = {
    "5.10.2.1-3": "rr-interval",
    "5.10.2.1-5": "pp-interval",
    "5.13.5-7": "pr-interval",
    "5.13.5-9": "qrs-duration",
    "5.13.5-11": "qt-interval",
    "5.10.2.5-5": "qtc-interval",
    "5.10.3-11": "p-axis",
    "5.10.3-13": "qrs-axis",
    "5.10.3-15": "t-axis",
}
_UNITS = {
    "ms": ("ms", 1.0),
    "s": ("ms", 1000.0),
    "us": ("ms", 0.001),
    "deg": ("deg", 1.0),
    "/min": ("/min", 1.0),
    "{beats}/min": ("/min", 1.0),
    "{H.B.}/min": ("/min", 1.0),
    "bpm": ("/min", 1.0),
    "uV": ("uV", 1.0),
    "mV": ("uV", 1000.0),
}
_GROUP_SOURCES = {1: StatementSource.DEVICE, 2: StatementSource.PHYSICIAN, 3: StatementSource.COMMENT}
_QTC_BY_CODE = {code: method for method, (code, _meaning) in QTC_FORMULA_CODES.items()}
_QTC_BY_ALGORITHM = {code: method for method, (code, _meaning) in QTC_ALGORITHMS.items()}


def _first_code(item: Dataset, keyword: str) -> tuple[str, str, str]:
    seq = item.get(keyword)
    if not seq:
        return "", "", ""
    code = seq[0]
    return (
        str(code.get("CodingSchemeDesignator", "")).strip().upper(),
        str(code.get("CodeValue", "")).strip(),
        str(code.get("CodeMeaning", "")).strip(),
    )


def _channel_refs(item: Dataset) -> list[tuple[int, int]]:
    refs = item.get("ReferencedWaveformChannels")
    if refs is None:
        return []
    values = [int(v) for v in (refs if hasattr(refs, "__iter__") else [refs])]
    return [(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)]


def _converted_by_lastmile(ds: Dataset) -> bool:
    return any(
        str(e.get("Manufacturer", "")).strip() == "Lastmile" for e in ds.get("ContributingEquipmentSequence") or []
    )


def _annotation_measurement(item: Dataset, groups: list[Dataset]) -> EcgMeasurement | None:
    scheme, code, _meaning = _first_code(item, "ConceptNameCodeSequence")
    method = ""
    if scheme == "MDC" and code in _QTC_BY_CODE:
        kind, method = "qtc-interval", _QTC_BY_CODE[code]
    elif scheme == "MDC" and code in KIND_BY_MDC:
        kind = KIND_BY_MDC[code].name
    elif scheme.startswith("SCPECG") and code in _SCPECG_MEASUREMENTS:
        kind = _SCPECG_MEASUREMENTS[code]
    else:
        return None
    for modifier in item.get("ConceptNameCodeSequence")[0].get("ModifierCodeSequence") or []:
        method = _QTC_BY_ALGORITHM.get(str(modifier.get("CodeValue", "")).strip(), method)
    _scheme, unit_code, _unit_meaning = _first_code(item, "MeasurementUnitsCodeSequence")
    raw = item.get("NumericValue")
    if hasattr(raw, "__len__") and not isinstance(raw, str):
        raw = raw[0] if len(raw) else None  # several values: the first is the measurement
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    refs = _channel_refs(item)
    lead = ""
    if refs and all(channel != 0 for _group, channel in refs):
        if len(refs) != 1 or not 1 <= refs[0][0] <= len(groups):
            return None
        leads = {lead.index + 1: lead.name for lead in _ecg_leads(groups[refs[0][0] - 1])}
        lead = leads.get(refs[0][1], "")
        kind = kind if kind.startswith("lead-") else f"lead-{kind}"
        if not lead:
            return None
    elif kind.startswith("lead-"):
        return None
    note = ""
    unit = _UNITS.get(unit_code)
    wanted = "deg" if kind.endswith("axis") else None
    if wanted and (unit is None or unit[0] != "deg"):
        # an axis is an angle whatever the writer called its unit
        note, unit = f"unit written as {unit_code or 'nothing'!r}, read as degrees", ("deg", 1.0)
    if unit is None:
        return None
    extra = {k: v for k, v in (("lead", lead), ("method", method), ("note", note)) if v}
    found = measurement(kind, value * unit[1], "dicom:annotation", **extra)
    return found if found is not None and found.unit == unit[0] else None


def _annotations(ds: Dataset, groups: list[Dataset]) -> tuple[tuple[EcgMeasurement, ...], tuple[EcgStatement, ...]]:
    ours = _converted_by_lastmile(ds)
    measurements: dict[tuple[str, str], EcgMeasurement] = {}
    statements: list[EcgStatement] = []
    for item in ds.get("WaveformAnnotationSequence") or []:
        if item.get("TemporalRangeType"):
            continue  # a fiducial point or a segment (gap, event), not a finding
        group_number = item.get("AnnotationGroupNumber")
        if ours and group_number not in _GROUP_SOURCES:
            continue  # the gateway's own notes
        source = _GROUP_SOURCES.get(group_number, StatementSource.DEVICE) if ours else StatementSource.DEVICE
        if item.get("NumericValue") not in (None, ""):
            found = _annotation_measurement(item, groups)
            if found is not None:
                measurements.setdefault((found.kind, found.lead), found)
            continue
        text = str(item.get("UnformattedTextValue", "") or "").strip()
        code = ""
        if not text:
            _s, code, text = _first_code(item, "ConceptCodeSequence")
        if text:
            statements.append(EcgStatement(text, source, "dicom:annotation", code))
    return tuple(measurements.values()), tuple(statements)


_WAVEFORM_CLASSES = "1.2.840.10008.5.1.4.1.1.9."  # every Waveform Storage SOP Class (ECGs among them)


def _sop_class(ds: Dataset) -> str:
    """The object's SOP Class UID (its own, else its file meta's), "" when it says none."""
    meta = getattr(ds, "file_meta", None)
    found = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return str(found or "").rstrip("\x00 ")


def _decode(ds: Dataset, local_tz: dt.tzinfo, received_at: dt.datetime | None) -> EcgRecording:
    groups = ds.get("WaveformSequence")
    if not groups:
        sop_class = _sop_class(ds)
        if sop_class and not sop_class.startswith(_WAVEFORM_CLASSES):
            # read whole, and of another kind (the cart's PDF report): not a damaged ECG
            raise NotAnEcgError(f"DICOM file holds no waveform (SOP Class {sop_class}): not an ECG")
        # a waveform object (or one that does not say) without its waveform: cut short, damaged
        raise ProtocolError("DICOM file holds no waveform (no Waveform Sequence): not an ECG")
    best = None
    for group in groups:
        leads = _ecg_leads(group)
        if leads and (best is None or _group_rank(group, len(leads)) > _group_rank(best[0], len(best[1]))):
            best = (group, leads)
    if best is None:
        raise ProtocolError("DICOM waveform holds no ECG leads (no channel is coded as an ECG lead)")
    group, leads = best
    found = _group_samples(ds, group, leads)
    names = [lead.name for lead in found.leads]

    start = acquired_at_of(ds, local_tz)
    source = TimeSource.FILE
    if start is not None:
        shift = group.get("MultiplexGroupTimeOffset")
        if shift not in (None, ""):
            start += dt.timedelta(milliseconds=float(shift))
    elif received_at is not None:
        start, source = received_at, TimeSource.GATEWAY_RECEIPT
    else:
        raise ProtocolError("DICOM ECG carries no acquisition date/time")
    all_samples, all_names, derived = derive_limb_leads(found.samples, tuple(names))
    derived |= {lead.name for lead in found.leads if lead.derived}
    measurements, statements = _annotations(ds, list(groups))
    return EcgRecording(
        samples=all_samples,
        lead_names=all_names,
        sampling_rate_hz=found.rate,
        uv_per_unit=found.uv_per_unit,
        gaps=found.gaps,
        flags=(f"leads-not-recorded:{','.join(found.not_recorded)}",) if found.not_recorded else (),
        acquired_at=start,
        time_source=source,
        device=device_of(ds),
        patient=_patient(ds),
        derived_leads=frozenset(derived),
        source_format="dicom",
        measurements=measurements,
        statements=statements,
        median_beats=_median_beats(ds, list(groups), group),
    )


def looks_like_dicom(data: bytes) -> bool:
    """Part 10 preamble, or a raw data set that starts with a group 0002/0008 element."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    # the element number is little endian too: compare it as a number (as bytes, (0008,0005)
    # Specific Character Set - the usual first element - compared greater than 0x1000)
    return len(data) >= 8 and data[0:2] in (b"\x02\x00", b"\x08\x00") and int.from_bytes(data[2:4], "little") < 0x1000
