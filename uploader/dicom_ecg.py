"""EcgRecording -> DICOM 12-Lead ECG / General ECG Waveform object (pure, deterministic).

The builder takes everything it writes from its arguments: no clock, no UID minting, no I/O.
`recording_to_dicom_bytes` (build + check + encode) is what the intake stores in the outbox;
the UIDs come from `mint_uids()`, called once by the caller, so a retry, crash or rebuild can
never turn one recording into a second study. Same inputs, same bytes.

Choices that go beyond "fill in the attributes" (PS3.3 A.34.3 / A.34.4 / C.10.9 / C.10.10):

- IOD. 12-Lead ECG when every lead is one of the standard twelve, at most 13 channels and
  16384 samples; otherwise General ECG (1-24 channels). Both IODs require 200-1000 Hz
  (A.34.3.4 and A.34.4.4 say 1000 for both; there is no 2000 Hz ECG IOD in the standard this
  gateway's dciodvfy knows). Any other rate is refused: resampling is the decoders' job.
- One multiplex group ("RHYTHM") holding every lead, so every viewer shows them together.
- Lead codes: CID 3001 in its current MDC form ("2:N", N = the SCP-ECG lead number, so
  V3R = 2:11, V7 = 2:9). A label we have no code for gets 2:0 "Unspecified lead"; the
  Channel Label always keeps the lead's true name.
- Derived leads (computed, not recorded): the "Derived Lead ..." code of CID 3001 where one
  exists (III 2:111, aVR 2:112, aVL 2:113, aVF 2:114, I 2:31, II 2:32, V1-V6 2:33-38), and
  always Channel Derivation Description (003A,020C) saying how.
- Resampled recordings: Waveform Originality DERIVED, the original rate in every channel's
  Channel Derivation Description, in the Contributing Equipment's description and in a
  waveform annotation.
- Amplitudes: 16-bit SS. If the recording's integers do not fit, they are divided by the
  smallest integer factor that makes them fit (an exact divisor of all samples when one is
  close, so nothing is lost) and Channel Sensitivity is multiplied by it. A lossy
  requantisation makes the waveform DERIVED and is stated, with its worst-case error, in an
  annotation.
- Gaps: `SampleGap(start, missing)` means `missing` samples that are *absent* from
  `recording.samples` and belong just before sample index `start`. They are put back as
  Waveform Padding Value (5400,100A) = -32768 (never used by real samples when there is a
  gap), so the time axis stays true, and each gap is annotated with the coded concept
  (MDC 10:11248, "No ECG signal is available", CID 3335) over its sample range, plus text.
- Time: AcquisitionDateTime in the recording's own zone with its UTC offset, Timezone Offset
  From UTC for the DA/TM attributes, and the Synchronization module (UTC frame of reference
  1.2.840.10008.15.1.1): Acquisition Time Synchronized Y only for GPS or a corrected device
  clock, Time Source = where the time came from (devices.identity.TimeSource, abbreviated to
  SH), Time Distribution Protocol GPS for GNSS time. Instance creation time and the
  gateway's contribution time = `created_at`; left out when it is not given.
- Unassigned patient (`recording.patient is None`): name, birth date, sex empty (type 2);
  Patient ID a temporary, per-study "UNASSIGNED-<hash of the study UID>" with issuer
  "LASTMILE-UNASSIGNED" (an empty ID makes dciodvfy warn, and PACSs such as Orthanc file
  every empty-ID object under one shared patient), Patient Comments and Study Description
  saying UNASSIGNED, and an annotation. The reading center reconciles it by a patient update.
- STAT: Study Description starts with "STAT" (what every worklist shows), a coded Acquisition
  Context item Priority (SCT 260870009) = Urgent Procedure (SCT 103391001, CID 3414) and an
  annotation. (Requested Procedure Priority is not part of these IODs: dciodvfy warns.)
- Triage (`StudyRequest`): the doctor on duty as Referring Physician's Name, the reason for the
  ECG in the Request Attributes Sequence (Reason for the Requested Procedure), the Study
  Description and an annotation; Accession Number minted with the UIDs; Patient's Age at
  acquisition from the birth date.
- The cart's findings (devices.ecg.findings): each measurement is a Waveform Annotation item
  with its coded concept name (MDC, CID 3227/3228/3229; a QTc formula without a code of its own
  as a CID 3678 modifier), numeric value and UCUM unit, over the whole rhythm group or one
  lead's channel; each statement a text item. Annotation Group Number says whose they are:
  1 the device's automatic analysis, 2 a physician's, 3 comments recorded with the ECG; a
  gateway note (no group) says so in words. Median beats become a second multiplex group
  "MEDIAN BEAT" (DERIVED) where the IOD allows it: the General ECG IOD takes up to 4 groups of
  24 channels, but the 12-lead ECG IOD at most 13 channels in all (PS3.3 A.34.3.4.4), so a
  12-lead object carries the rhythm only and a note says the median beats were left out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import math
import secrets
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from devices.ecg.findings import (
    MEASUREMENT_KINDS,
    QTC_ALGORITHMS,
    QTC_FORMULA_CODES,
    EcgMeasurement,
    EcgStatement,
    StatementSource,
)
from devices.ecg.leads import MDC_DERIVED_LEADS, MDC_LEADS
from devices.ecg.quality import ACCEPTABLE, QualityReport
from devices.ecg.recording import STANDARD_12_LEADS, EcgRecording, merged_gaps, on_time_axis
from devices.identity import UNASSIGNED_ISSUER, Patient, TimeSource
from uploader.errors import InvalidObjectError

log = logging.getLogger(__name__)

TWELVE_LEAD_ECG = "1.2.840.10008.5.1.4.1.1.9.1.1"
GENERAL_ECG = "1.2.840.10008.5.1.4.1.1.9.1.2"
UTC_SYNCHRONIZATION_FRAME = "1.2.840.10008.15.1.1"  # well-known "Universal Coordinated Time"

INT16_MAX = 32767
PADDING_VALUE = -32768  # Waveform Padding Value where samples never arrived
MAX_WAVEFORM_BYTES = 32 * 1024 * 1024  # one object's sample data; a Pi must build it in RAM
_UNASSIGNED_DESCRIPTION = " - UNASSIGNED PATIENT"
_UNASSIGNED_NOTE = "UNASSIGNED PATIENT"
MULTIPLEX_GROUP_LABEL = "RHYTHM"
MEDIAN_GROUP_LABEL = "MEDIAN BEAT"
# Annotation Group Number of the cart's findings, by who made them
FINDINGS_GROUPS: dict[StatementSource, int] = {
    StatementSource.DEVICE: 1,
    StatementSource.PHYSICIAN: 2,
    StatementSource.COMMENT: 3,
}


@dataclass(frozen=True)
class EcgStudyUids:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    accession_number: str = ""  # minted with the UIDs (SH, 16 characters); "" leaves it empty


@dataclass(frozen=True)
class StudyRequest:
    """What the village doctor asked for: who refers, why. (Urgency is `recording.stat`.)"""

    referring_physician: str = ""  # the doctor on duty, DICOM PN ("Li^Ming=李^明" or an id)
    reason: str = ""  # reason for the ECG, e.g. "胸痛 chest pain"


@dataclass(frozen=True)
class StationInfo:
    station_name: str = ""  # the gateway's short name (DICOM StationName, SH: 16 bytes)
    institution: str = ""  # the clinic (InstitutionName)
    gateway_id: str = ""  # the gateway's full id: the Contributing Equipment's DeviceSerialNumber


@dataclass(frozen=True)
class IodLimits:
    """The content constraints of one ECG IOD (PS3.3 A.34.x.4) that dciodvfy does not check."""

    sop_class_uid: str
    name: str
    min_rate_hz: float
    max_rate_hz: float
    max_groups: int
    max_channels_per_group: int
    max_total_channels: int | None
    max_samples: int | None


TWELVE_LEAD_LIMITS = IodLimits(TWELVE_LEAD_ECG, "12-lead ECG", 200.0, 1000.0, 5, 13, 13, 16384)
GENERAL_ECG_LIMITS = IodLimits(GENERAL_ECG, "General ECG", 200.0, 1000.0, 4, 24, None, None)
IOD_LIMITS: dict[str, IodLimits] = {limits.sop_class_uid: limits for limits in (TWELVE_LEAD_LIMITS, GENERAL_ECG_LIMITS)}

# CID 3001 "ECG Leads" code meanings by MDC partition-2 number, as PS3.16 words them (tests check
# them against pydicom's copy of the standard). Which label has which number is the decoders' table
# (devices.ecg.leads), so a lead the decoders know cannot go out as "Unspecified lead".
_CID_3001_MEANINGS: dict[int, str] = {
    1: "Lead I",
    2: "Lead II",
    **{i + 2: f"Lead V{i}" for i in range(1, 8)},  # V1 2:3 ... V7 2:9
    **{i + 8: f"Lead V{i}R" for i in range(2, 8)},  # V2R 2:10 ... V7R 2:15
    16: "Lead X",
    17: "Lead Y",
    18: "Lead Z",
    19: "Chest lead per V5 and V5R placement",  # CC5, CM5: bipolar chest leads of stress carts
    20: "Chest-manubrium lead per V5 placement",
    21: "Left Arm Lead",
    22: "Right Arm Lead",
    23: "Left Leg Lead",
    **{24 + i: f"Frank Lead {letter}" for i, letter in enumerate("IECAMFH")},  # fI 2:24 ... fH 2:30
    31: "Derived Lead I",
    32: "Derived Lead II",
    **{i + 32: f"Derived Lead V{i}" for i in range(1, 7)},  # V1 2:33 ... V6 2:38
    61: "Lead III",
    62: "aVR, augmented voltage, right",
    63: "aVL, augmented voltage, left",
    64: "aVF, augmented voltage, foot",
    65: "\u2212aVR",
    66: "Lead V8",
    67: "Lead V9",
    68: "Lead V8R",
    69: "Lead V9R",
    70: "Lead D (Nehb - Dorsal)",
    71: "Lead A (Nehb - Anterior)",
    72: "Lead J (Nehb - Inferior)",
    73: "Defibrillator lead: anterior-lateral",
    74: "External pacing lead: anterior-posterior",
    **{74 + i: f"Auxiliary unipolar lead {i}" for i in range(1, 5)},  # A1 2:75 ... A4 2:78
    111: "Derived Lead III",
    112: "Derived Lead aVR",
    113: "Derived Lead aVL",
    114: "Derived Lead aVF",
    147: "Right Leg Lead",
}
_RIGHT_LEG = 147  # RL: not an SCP-ECG lead, so not in the decoders' table


def _mdc(number: int) -> tuple[str, str]:
    return f"2:{number}", _CID_3001_MEANINGS[number]


# Our label -> (code, meaning), recorded and derived.
_LEAD_CODES: dict[str, tuple[str, str]] = {
    **{name: _mdc(number) for number, name in MDC_LEADS.items()},
    "RL": _mdc(_RIGHT_LEG),
}
_DERIVED_LEAD_CODES: dict[str, tuple[str, str]] = {name: _mdc(number) for number, name in MDC_DERIVED_LEADS.items()}
_UNSPECIFIED_LEAD = ("2:0", "Unspecified lead")
_EINTHOVEN_GOLDBERGER = {
    "III": "III = II - I",
    "aVR": "aVR = -(I + II) / 2",
    "aVL": "aVL = I - II / 2",
    "aVF": "aVF = II - I / 2",
}
_CANONICAL = {label.upper(): label for label in _LEAD_CODES}

_GAP_CONCEPT = ("10:11248", "MDC", "No ECG signal is available")  # CID 3335 ECG Annotation
_UCUM_MEANINGS = {"ms": "millisecond", "deg": "degree", "/min": "per minute", "uV": "microvolt"}
_FINDINGS_NOTE = {
    StatementSource.DEVICE: "the ECG device's own measurements and automatic interpretation, not confirmed by a physician",
    StatementSource.PHYSICIAN: "statements confirmed or over-read by a physician, as the device's file says",
    StatementSource.COMMENT: "comments recorded with the ECG (not findings)",
}
_PRIORITY_CONCEPT = ("260870009", "SCT", "Priority")
_URGENT = ("103391001", "SCT", "Urgent Procedure")  # CID 3414 Procedure Urgency
_PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")  # CID 7005
_MICROVOLT = ("uV", "UCUM", "microvolt")

# (0018,1801) Time Source is SH: 16 characters.
_TIME_SOURCE_SH = {
    TimeSource.DEVICE_CLOCK: "DEVICE CLOCK",
    TimeSource.DEVICE_CLOCK_CORRECTED: "DEVICE CORRECTED",
    TimeSource.FILE: "DEVICE FILE",
    TimeSource.GATEWAY_RECEIPT: "GATEWAY RECEIPT",
    TimeSource.DEVICE_CLOCK_UNTRUSTED: "DEVICE UNTRUSTED",
    TimeSource.GPS: "GPS",
    TimeSource.UNKNOWN: "UNKNOWN",
}
_TIME_SOURCE_TEXT = {
    TimeSource.DEVICE_CLOCK: "the ECG device's own clock",
    TimeSource.DEVICE_CLOCK_CORRECTED: "the ECG device's clock, corrected by a measured offset",
    TimeSource.FILE: "the time written into the file by the device",
    TimeSource.GATEWAY_RECEIPT: (
        "the time the gateway received it (device time unknown or implausible): acquisition was earlier"
    ),
    TimeSource.DEVICE_CLOCK_UNTRUSTED: (
        "the ECG device's own clock, NOT believed: it predates anything the gateway records "
        "(a clock reset), so the acquisition time is unknown; the device's clock needs setting"
    ),
    TimeSource.GPS: "GNSS (GPS) time",
    TimeSource.UNKNOWN: "unknown",
}
_SYNCHRONIZED = {TimeSource.GPS, TimeSource.DEVICE_CLOCK_CORRECTED}

_MAX_CHARS = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "PN": 64}


def mark_time_untrusted(ds: Dataset) -> None:
    """Say in a cart's own object (forwarded as it sent it) that its acquisition time is the cart's
    clock and not believed: Time Source and Acquisition Time Synchronized, as the objects we build
    say it; the time itself is left as the cart wrote it. They belong to the Synchronization
    module: a cart that wrote none gets its other Type 1 elements too, as ours have them (without
    them dciodvfy calls the object invalid)."""
    ds.TimeSource = _TIME_SOURCE_SH[TimeSource.DEVICE_CLOCK_UNTRUSTED]
    ds.AcquisitionTimeSynchronized = "N"
    if "SynchronizationFrameOfReferenceUID" not in ds:
        ds.SynchronizationFrameOfReferenceUID = UTC_SYNCHRONIZATION_FRAME
    if "SynchronizationTrigger" not in ds:
        ds.SynchronizationTrigger = "NO TRIGGER"


def mint_uids() -> EcgStudyUids:
    """New Study/Series/SOP Instance UIDs (2.25 UUID form). Call once per recording and keep them."""
    return EcgStudyUids(
        study_uid=generate_uid(prefix=None),
        series_uid=generate_uid(prefix=None),
        sop_instance_uid=generate_uid(prefix=None),
        accession_number="LM" + secrets.token_hex(7).upper(),  # 16 characters, 56 random bits
    )


# ---------------------------------------------------------------------------- IOD choice


def canonical_lead(label: str) -> str | None:
    """Our standard spelling of a lead label ("AVR" -> "aVR", "Lead V4R" -> "V4R"), or None."""
    key = "".join(ch for ch in label.upper().replace("\u2212", "-") if ch.isprintable() and not ch.isspace())
    if key.startswith("LEAD") and key[4:] in _CANONICAL:
        key = key[4:]
    return _CANONICAL.get(key)


def padded_length(recording: EcgRecording) -> int:
    """Samples per channel in the object: the recording's plus the padding for its gaps."""
    return recording.n_samples + sum(gap.missing for gap in recording.gaps)


def _is_twelve_lead_set(recording: EcgRecording) -> bool:
    canonical = [canonical_lead(name) for name in recording.lead_names]
    return all(c in STANDARD_12_LEADS for c in canonical) and len(set(canonical)) == len(canonical)


def choose_sop_class(recording: EcgRecording) -> str:
    """12-Lead ECG if it fits, else General ECG; InvalidObjectError if neither IOD can hold it."""
    rate = float(recording.sampling_rate_hz)
    if not (TWELVE_LEAD_LIMITS.min_rate_hz <= rate <= TWELVE_LEAD_LIMITS.max_rate_hz):
        raise InvalidObjectError(
            f"sampling rate {rate:g} Hz is outside 200-1000 Hz, the range of both DICOM ECG "
            "IODs; the decoder must resample it (and set resampled_from_hz)"
        )
    if recording.n_leads > GENERAL_ECG_LIMITS.max_channels_per_group:
        raise InvalidObjectError(
            f"{recording.n_leads} leads: a DICOM ECG object holds at most "
            f"{GENERAL_ECG_LIMITS.max_channels_per_group} channels in one multiplex group"
        )
    samples = padded_length(recording)
    if samples * recording.n_leads * 2 > MAX_WAVEFORM_BYTES:
        raise InvalidObjectError(
            f"{recording.n_leads} leads x {samples} samples (with gaps padded) exceed "
            f"{MAX_WAVEFORM_BYTES // 2**20} MiB of waveform data"
        )
    twelve = TWELVE_LEAD_LIMITS
    if (
        _is_twelve_lead_set(recording)
        and (twelve.max_total_channels is None or recording.n_leads <= twelve.max_total_channels)
        and (twelve.max_samples is None or samples <= twelve.max_samples)
    ):
        return TWELVE_LEAD_ECG
    return GENERAL_ECG


# ---------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class _Quantised:
    samples: np.ndarray  # int16 (leads, samples)
    factor: int  # new unit = factor x recording unit
    exact: bool


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _quantise(samples: np.ndarray, lowest: int) -> _Quantised:
    """Fit integer samples into [lowest, 32767], dividing by the smallest suitable integer."""
    lo, hi = int(samples.min()), int(samples.max())
    if lowest <= lo and hi <= INT16_MAX:
        return _Quantised(samples.astype(np.int16), 1, True)
    if lo <= -(2**63) or hi >= 2**63:
        raise InvalidObjectError(f"sample values {lo}..{hi} are beyond 64-bit range")
    wide = samples.astype(np.int64)
    needed = max(_ceil_div(max(hi, 0), INT16_MAX), _ceil_div(max(-lo, 0), -lowest), 1)
    # Prefer a divisor of every sample: the requantisation is then lossless.
    common = int(np.gcd.reduce(np.abs(wide).ravel()))
    divisor = next(
        (d for d in range(needed, min(common, needed + 4096) + 1) if common % d == 0), common if common >= needed else 0
    )
    if divisor:
        return _Quantised((wide // divisor).astype(np.int16), divisor, True)
    quotient = wide // needed
    remainder = wide - quotient * needed
    quotient += 2 * remainder >= needed  # round half up
    return _Quantised(np.clip(quotient, lowest, INT16_MAX).astype(np.int16), needed, False)


def _multiplexed(samples: np.ndarray, gaps: list[tuple[int, int]]) -> tuple[bytes, list[tuple[int, int]]]:
    """Channel-interleaved little-endian int16 data with padding where gaps are, and the gaps'
    0-based (first, count) positions in the padded data."""
    padded, positions = on_time_axis(samples, gaps, PADDING_VALUE)
    return np.ascontiguousarray(padded.T, dtype="<i2").tobytes(), positions


# ---------------------------------------------------------------------------- value helpers


def _fit(value: str, max_bytes: int) -> str:
    """Cut to `max_bytes` of UTF-8 (dciodvfy counts bytes) without splitting a character."""
    return value.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _text(value: str, vr: str) -> str:
    """A string a DICOM text VR accepts: no backslash (value separator), no control
    characters (except in ST/LT newlines), cut to the VR's length."""
    keep_newlines = vr in ("ST", "LT")
    cleaned = "".join(ch for ch in value.replace("\\", "/") if ch.isprintable() or (keep_newlines and ch in "\r\n"))
    return _fit(cleaned.strip(), _MAX_CHARS[vr]).strip()


def _identifier(value: str, what: str) -> str:
    """An identifier goes in exactly as it is or not at all: altering one could make it
    another patient's."""
    if _text(value, "LO") != value:
        raise InvalidObjectError(
            f"{what} does not fit a DICOM LO value (64 bytes, no backslash or control "
            "characters, no leading/trailing spaces)"
        )
    return value


def _person_name(value: str) -> str:
    """PN: up to three component groups (alphabetic=ideographic=phonetic) of five components;
    dropped from the end while the whole value exceeds 64 bytes."""
    cleaned = "".join(ch for ch in value.replace("\\", "/") if ch.isprintable())
    groups = ["^".join(c.strip() for c in g.split("^")[:5]) for g in cleaned.split("=")[:3]]
    while len(groups) > 1 and len("=".join(groups).encode("utf-8")) > _MAX_CHARS["PN"]:
        groups.pop()
    name = _fit("=".join(groups), _MAX_CHARS["PN"]).rstrip("=^ ")
    # a one-word name is the family name: "Clark^" (plain "Clark" is the retired PN form); the
    # "^" counts towards the 64 bytes too
    if name and "^" not in name and "=" not in name:
        return _fit(name, _MAX_CHARS["PN"] - 1) + "^"
    return name


def _ds(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = repr(float(value))
    return text if len(text) <= 16 else format_number_as_ds(float(value))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _da(moment: dt.datetime) -> str:
    return moment.strftime("%Y%m%d")


def _tm(moment: dt.datetime) -> str:
    return moment.strftime("%H%M%S") + (f".{moment.microsecond:06d}" if moment.microsecond else "")


def _offset(moment: dt.datetime) -> str:
    minutes = int((moment.utcoffset() or dt.timedelta()).total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def _dt(moment: dt.datetime) -> str:
    return _da(moment) + _tm(moment) + _offset(moment)


def _local_zone_moment(moment: dt.datetime) -> dt.datetime:
    """DICOM offsets are whole minutes: keep the zone if it is, else use UTC."""
    offset = moment.utcoffset()
    assert offset is not None  # EcgRecording refuses an acquired_at without an offset (require_aware)
    if offset.total_seconds() % 60:
        return moment.astimezone(dt.timezone.utc)
    return moment


def unassigned_patient_id(uids: EcgStudyUids) -> str:
    """The temporary, per-study Patient ID of an ECG nobody was assigned to."""
    return "UNASSIGNED-" + hashlib.sha256(uids.study_uid.encode("ascii")).hexdigest()[:20].upper()


# ---------------------------------------------------------------------------- builder


def _channel(label: str, *, derived: bool, sensitivity: float, derivation_notes: list[str]) -> Dataset:
    canonical = canonical_lead(label)
    if derived and canonical in _DERIVED_LEAD_CODES:
        code_value, meaning = _DERIVED_LEAD_CODES[canonical]
    elif canonical is not None:
        code_value, meaning = _LEAD_CODES[canonical]
    else:
        code_value, meaning = _UNSPECIFIED_LEAD
    channel = Dataset()
    channel.ChannelLabel = _text(label, "SH")
    channel.ChannelSourceSequence = Sequence([_code(code_value, "MDC", meaning)])
    notes = []
    if derived:
        formula = _EINTHOVEN_GOLDBERGER.get(canonical or "")
        notes.append(f"computed, not recorded: {formula}" if formula else "computed from other leads, not recorded")
    notes += derivation_notes
    if notes:
        channel.ChannelDerivationDescription = _text("; ".join(notes), "LO")
    channel.ChannelSensitivity = _ds(sensitivity)
    channel.ChannelSensitivityUnitsSequence = Sequence([_code(*_MICROVOLT)])
    channel.ChannelSensitivityCorrectionFactor = "1"
    channel.ChannelBaseline = "0"
    channel.ChannelSampleSkew = "0"
    channel.WaveformBitsStored = 16
    return channel


def _annotation(text: str, span: tuple[int, int] | None = None) -> Dataset:
    item = Dataset()
    item.UnformattedTextValue = _text(text, "ST")
    item.ReferencedWaveformChannels = [1, 0]  # multiplex group 1, all channels
    if span is not None:
        item.TemporalRangeType = "SEGMENT"
        item.ReferencedSamplePositions = [span[0] + 1, span[0] + span[1]]  # 1-based, inclusive
    return item


def _gap_annotation(first: int, count: int) -> Dataset:
    item = Dataset()
    item.ConceptNameCodeSequence = Sequence([_code(*_GAP_CONCEPT)])
    item.ReferencedWaveformChannels = [1, 0]
    item.TemporalRangeType = "SEGMENT"
    item.ReferencedSamplePositions = [first + 1, first + count]
    return item


@dataclass(frozen=True)
class _Context:
    """What every part of the object is built from."""

    recording: EcgRecording
    uids: EcgStudyUids
    station: StationInfo
    sop_class: str
    acquired: dt.datetime  # in the zone the object states
    created: dt.datetime | None  # None: not known, so not written (never "now")
    request: StudyRequest = StudyRequest()
    quality: QualityReport | None = None  # the gateway's quality check, shown to the reader

    @property
    def rate(self) -> float:
        return float(self.recording.sampling_rate_hz)


def _set_patient(ds: Dataset, ctx: _Context) -> None:
    patient = ctx.recording.patient
    if patient is None:
        ds.PatientName = ""
        ds.PatientID = unassigned_patient_id(ctx.uids)
        ds.IssuerOfPatientID = UNASSIGNED_ISSUER
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.PatientComments = (
            "UNASSIGNED: no patient was identified at the gateway. The Patient ID is a "
            "temporary per-study placeholder, not a real identifier; assign the patient "
            "before reporting."
        )
        return
    _write_patient(ds, patient, ctx.acquired.date())


def _write_patient(ds: Dataset, patient: Patient, acquired_on: dt.date) -> None:
    ds.PatientName = _person_name(patient.name)
    ds.PatientID = _identifier(patient.patient_id, "patient ID")
    if patient.issuer:
        ds.IssuerOfPatientID = _identifier(patient.issuer, "issuer of the patient ID")
    elif "IssuerOfPatientID" in ds:
        del ds.IssuerOfPatientID
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d") if patient.birth_date else ""
    ds.PatientSex = patient.sex
    age = patient_age(patient.birth_date, acquired_on) if patient.birth_date is not None else ""
    if age:
        ds.PatientAge = age
    elif "PatientAge" in ds:
        del ds.PatientAge
    if "PatientComments" in ds:
        del ds.PatientComments


def reassign_patient(ds: Dataset, patient: Patient, note: str) -> Dataset:
    """An object built for an unassigned (or another) patient, given `patient`: same UIDs, same
    waveform and findings; the patient module, the Study Description's UNASSIGNED mark and the
    UNASSIGNED annotation change, and `note` (who assigned it, when) is added as an annotation."""
    acquired = str(ds.get("AcquisitionDateTime", "") or ds.get("ContentDate", ""))[:8]
    try:
        acquired_on = dt.date(int(acquired[:4]), int(acquired[4:6]), int(acquired[6:8]))
    except ValueError:
        raise InvalidObjectError(f"cannot read the acquisition date {acquired!r} of the object") from None
    _write_patient(ds, patient, acquired_on)
    description = str(ds.get("StudyDescription", "")).replace(_UNASSIGNED_DESCRIPTION, "")
    ds.StudyDescription = _text(description, "LO")
    kept = [
        item
        for item in ds.get("WaveformAnnotationSequence") or []
        if not str(item.get("UnformattedTextValue", "")).startswith(_UNASSIGNED_NOTE)
    ]
    ds.WaveformAnnotationSequence = Sequence(kept + [_annotation(note)])
    return ds


def patient_age(born: dt.date, on: dt.date) -> str:
    """DICOM AS at `on`: years from 2 years, months below, days below a month; "" if `on` is
    before the birth (a wrong date somewhere: better no age than a false one)."""
    if on < born:
        return ""
    months = (on.year - born.year) * 12 + on.month - born.month - (on.day < born.day)
    if months >= 24:
        return f"{min(months // 12, 999):03d}Y"
    if months >= 1:
        return f"{months:03d}M"
    return f"{(on - born).days:03d}D"


def _set_study_and_series(ds: Dataset, ctx: _Context) -> None:
    rec, acquired, request = ctx.recording, ctx.acquired, ctx.request
    description = ("STAT " if rec.stat else "") + IOD_LIMITS[ctx.sop_class].name
    if rec.patient is None:
        description += _UNASSIGNED_DESCRIPTION
    if request.reason:
        description += " - " + request.reason
    if ctx.quality is not None and ctx.quality.verdict != ACCEPTABLE:
        description += f" - quality: {ctx.quality.verdict}"
    ds.StudyInstanceUID = ctx.uids.study_uid
    ds.StudyDate = _da(acquired)
    ds.StudyTime = _tm(acquired)
    ds.ReferringPhysicianName = _person_name(request.referring_physician)
    ds.StudyID = "ECG" + acquired.strftime("%y%m%d%H%M%S")
    ds.AccessionNumber = _text(ctx.uids.accession_number, "SH")
    ds.StudyDescription = _text(description, "LO")
    ds.Modality = "ECG"
    ds.SeriesInstanceUID = ctx.uids.series_uid
    ds.SeriesNumber = "1"
    ds.SeriesDate = _da(acquired)
    ds.SeriesTime = _tm(acquired)
    ds.SeriesDescription = _text(f"ECG from {rec.device.label()}", "LO")
    if request.reason:
        asked = Dataset()
        asked.ReasonForTheRequestedProcedure = _text(request.reason, "LO")
        ds.RequestAttributesSequence = Sequence([asked])


def _set_time_source(ds: Dataset, ctx: _Context) -> None:
    """Synchronization module: which clock the acquisition time comes from."""
    source = ctx.recording.time_source
    ds.SynchronizationFrameOfReferenceUID = UTC_SYNCHRONIZATION_FRAME
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "Y" if source in _SYNCHRONIZED else "N"
    ds.TimeSource = _TIME_SOURCE_SH[source]
    if source is TimeSource.GPS:
        ds.TimeDistributionProtocol = "GPS"


def _set_equipment(ds: Dataset, ctx: _Context) -> None:
    """General Equipment is the ECG device (StationName: this gateway); the gateway itself
    is Contributing Equipment, the one that converted the recording."""
    device, station, rec = ctx.recording.device, ctx.station, ctx.recording
    ds.Manufacturer = _text(device.manufacturer, "LO")
    if station.institution:
        ds.InstitutionName = _text(station.institution, "LO")
    if station.station_name:
        ds.StationName = _text(station.station_name, "SH")
    if device.model:
        ds.ManufacturerModelName = _text(device.model, "LO")
    if device.serial:
        ds.DeviceSerialNumber = _text(device.serial, "LO")
    if device.software_version:
        ds.SoftwareVersions = _text(device.software_version, "LO")

    source = rec.source_format or "a device recording"
    conversion = f"Converted to DICOM by the Lastmile gateway from {source}"
    if rec.resampled_from_hz is not None:
        conversion += f"; resampled from {rec.resampled_from_hz:g} Hz to {ctx.rate:g} Hz"
    gateway = Dataset()
    gateway.PurposeOfReferenceCodeSequence = Sequence([_code(*_PROCESSING_EQUIPMENT)])
    gateway.Manufacturer = "Lastmile"
    if station.institution:
        gateway.InstitutionName = _text(station.institution, "LO")
    if station.station_name:
        gateway.StationName = _text(station.station_name, "SH")
    if station.gateway_id:
        gateway.DeviceSerialNumber = _text(station.gateway_id, "LO")
    if ctx.created is not None:
        gateway.ContributionDateTime = _dt(ctx.created)
    gateway.ContributionDescription = _text(conversion, "ST")
    ds.ContributingEquipmentSequence = Sequence([gateway])


def _acquisition_context(ctx: _Context) -> Sequence:
    if not ctx.recording.stat:
        return Sequence([])
    urgent = Dataset()
    urgent.ValueType = "CODE"
    urgent.ConceptNameCodeSequence = Sequence([_code(*_PRIORITY_CONCEPT)])
    urgent.ConceptCodeSequence = Sequence([_code(*_URGENT)])
    return Sequence([urgent])


def _waveform_group(ctx: _Context, quantised: _Quantised, gaps: list[tuple[int, int]], data: bytes) -> Dataset:
    rec = ctx.recording
    resampled = rec.resampled_from_hz
    derivation_notes = [f"resampled from {resampled:g} Hz"] if resampled is not None else []
    sensitivity = float(rec.uv_per_unit) * quantised.factor
    group = Dataset()
    group.WaveformOriginality = "ORIGINAL" if resampled is None and quantised.exact else "DERIVED"
    group.NumberOfWaveformChannels = rec.n_leads
    group.NumberOfWaveformSamples = rec.n_samples + sum(missing for _, missing in gaps)
    group.SamplingFrequency = _ds(ctx.rate)
    group.MultiplexGroupLabel = MULTIPLEX_GROUP_LABEL
    group.ChannelDefinitionSequence = Sequence(
        [
            _channel(
                name, derived=name in rec.derived_leads, sensitivity=sensitivity, derivation_notes=derivation_notes
            )
            for name in rec.lead_names
        ]
    )
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    if gaps:
        group.add_new(0x5400100A, "OW", int(PADDING_VALUE).to_bytes(2, "little", signed=True))
    group.add_new(0x54001010, "OW", data)  # Waveform Data
    return group


def _median_group(ctx: _Context) -> Dataset | None:
    """The cart's median beats as a second multiplex group, where the IOD allows it."""
    median = ctx.recording.median_beats
    if median is None or median_left_out(ctx.recording, ctx.sop_class):
        return None
    quantised = _quantise(median.samples, PADDING_VALUE)
    group = Dataset()
    group.WaveformOriginality = "DERIVED"
    group.NumberOfWaveformChannels = len(median.lead_names)
    group.NumberOfWaveformSamples = median.n_samples
    group.SamplingFrequency = _ds(median.sampling_rate_hz)
    group.MultiplexGroupLabel = MEDIAN_GROUP_LABEL
    sensitivity = float(median.uv_per_unit) * quantised.factor
    group.ChannelDefinitionSequence = Sequence(
        [
            _channel(
                name, derived=False, sensitivity=sensitivity, derivation_notes=["median beat computed by the device"]
            )
            for name in median.lead_names
        ]
    )
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    group.add_new(0x54001010, "OW", quantised.samples.T.astype("<i2").tobytes())
    return group


def median_left_out(recording: EcgRecording, sop_class: str) -> str:
    """Why the median beats cannot go in the object ("" when they can, or there are none)."""
    median = recording.median_beats
    if median is None:
        return ""
    limits = IOD_LIMITS[sop_class]
    channels = recording.n_leads + len(median.lead_names)
    if limits.max_total_channels is not None and channels > limits.max_total_channels:
        return (
            f"the {limits.name} IOD allows at most {limits.max_total_channels} channels in all "
            f"(PS3.3 A.34.3.4.4); rhythm and median beats would need {channels}"
        )
    if len(median.lead_names) > limits.max_channels_per_group:
        return f"{len(median.lead_names)} median-beat leads exceed {limits.max_channels_per_group} per group"
    if not limits.min_rate_hz <= median.sampling_rate_hz <= limits.max_rate_hz:
        return f"median beats at {median.sampling_rate_hz:g} Hz are outside {limits.min_rate_hz:g}-{limits.max_rate_hz:g} Hz"
    if limits.max_samples is not None and median.n_samples > limits.max_samples:
        return f"{median.n_samples} median-beat samples exceed {limits.max_samples}"
    return ""


def _measurement_item(m: EcgMeasurement, channel: int) -> Dataset:
    kind = MEASUREMENT_KINDS[m.kind]
    code, meaning = kind.mdc, kind.meaning
    concept = _code(code, "MDC", meaning)
    if m.kind == "qtc-interval" and m.method in QTC_FORMULA_CODES:
        concept = _code(QTC_FORMULA_CODES[m.method][0], "MDC", QTC_FORMULA_CODES[m.method][1])
    elif m.kind == "qtc-interval" and m.method:
        # no code of its own: "QTc interval global" specialised by the algorithm (CID 3678)
        concept.ModifierCodeSequence = Sequence(
            [_code(QTC_ALGORITHMS[m.method][0], "DCM", QTC_ALGORITHMS[m.method][1])]
        )
    item = Dataset()
    item.ConceptNameCodeSequence = Sequence([concept])
    item.NumericValue = _ds(m.value)
    item.MeasurementUnitsCodeSequence = Sequence([_code(kind.unit, "UCUM", _UCUM_MEANINGS[kind.unit])])
    item.ReferencedWaveformChannels = [1, channel]
    item.AnnotationGroupNumber = FINDINGS_GROUPS[StatementSource.DEVICE]
    return item


def _statement_item(statement: EcgStatement) -> Dataset:
    item = _annotation(statement.text)
    item.AnnotationGroupNumber = FINDINGS_GROUPS[statement.source]
    return item


def _findings(ctx: _Context) -> tuple[list[Dataset], list[str]]:
    """(annotation items of the cart's findings, gateway notes about them)."""
    rec = ctx.recording
    items: list[Dataset] = []
    notes: list[str] = []
    for m in rec.measurements:
        channel = 0
        if m.lead:
            if m.lead not in rec.lead_names:
                notes.append(f"Device measurement {m.kind} of lead {m.lead} left out: no such lead in the waveform")
                continue
            channel = rec.lead_names.index(m.lead) + 1
        items.append(_measurement_item(m, channel))
        if m.note:
            notes.append(f"Device measurement {MEASUREMENT_KINDS[m.kind].meaning}: {m.note}")
    items += [_statement_item(s) for s in rec.statements]
    sources = [src for src in StatementSource if any(s.source is src for s in rec.statements)]
    if rec.measurements and StatementSource.DEVICE not in sources:
        sources.insert(0, StatementSource.DEVICE)
    if sources:
        by = f" ({rec.device.label()})" if rec.device.label() != "unknown device" else ""
        groups = "; ".join(f"group {FINDINGS_GROUPS[src]}: {_FINDINGS_NOTE[src]}" for src in sources)
        notes.insert(0, f"Annotation groups from the device{by}: {groups}")
    why = median_left_out(rec, ctx.sop_class)
    if why:
        median = rec.median_beats
        assert median is not None
        notes.append(
            f"The device's median beats ({len(median.lead_names)} leads x {median.n_samples} samples) are not "
            f"included: {why}"
        )
    return items, notes


def _quality_annotations(ctx: _Context) -> list[Dataset]:
    """What the gateway's quality check saw, for the reader: the verdict with its own heart rate
    (text: the device's measurements are group 1), then one statement per problem on its leads."""
    q = ctx.quality
    if q is None:
        return []
    rate = f"; QRS detected at {q.heart_rate_bpm:.0f}/min" if q.heart_rate_bpm is not None else ""
    items = [_annotation(f"Gateway quality check: {q.verdict}{rate}")]
    names = ctx.recording.lead_names
    for problem in q.problems:
        item = _annotation(f"Gateway quality check, {problem.kind} ({problem.severity}): {problem.message_en}")
        channels = [names.index(lead) + 1 for lead in problem.leads if lead in names]
        if channels:
            item.ReferencedWaveformChannels = [v for ch in channels for v in (1, ch)]
        items.append(item)
    return items


def _annotations(
    ctx: _Context, patient_id: str, quantised: _Quantised, gap_positions: list[tuple[int, int]]
) -> Sequence:
    """The cart's findings, gaps (coded + text) and the facts a reader must see, as ECG statements."""
    rec, rate = ctx.recording, ctx.rate
    findings, finding_notes = _findings(ctx)
    notes: list[Dataset] = findings + [_annotation(text) for text in finding_notes]
    for first, count in gap_positions:
        notes.append(_gap_annotation(first, count))
        notes.append(
            _annotation(
                f"Signal lost in transit: {count} samples ({count / rate:.3f} s) missing, shown as "
                f"padding value {PADDING_VALUE}",
                (first, count),
            )
        )
    notes += _quality_annotations(ctx)
    if rec.stat:
        notes.append(_annotation("STAT: urgent read requested"))
    if ctx.request.reason:
        notes.append(_annotation(f"Reason for the ECG: {ctx.request.reason}"))
    if rec.patient is None:
        notes.append(
            _annotation(
                f"{_UNASSIGNED_NOTE}: no patient identified at the gateway; Patient ID "
                f"{patient_id} is a temporary placeholder"
            )
        )
    if rec.resampled_from_hz is not None:
        notes.append(
            _annotation(
                f"Resampled from {rec.resampled_from_hz:g} Hz to {rate:g} Hz before storage: the "
                "samples are not the device's original samples"
            )
        )
    if rec.derived_leads:
        derived = [n for n in rec.lead_names if n in rec.derived_leads]
        notes.append(_annotation(f"Derived leads (computed, not recorded): {', '.join(derived)}"))
    if quantised.factor != 1:
        sensitivity = float(rec.uv_per_unit) * quantised.factor
        how = (
            "exactly (every sample was a multiple)"
            if quantised.exact
            else f"rounded, error at most {quantised.factor * rec.uv_per_unit / 2:g} uV"
        )
        notes.append(
            _annotation(
                f"Amplitudes requantised to 16 bits: 1 unit = {_ds(sensitivity)} uV instead of "
                f"{_ds(rec.uv_per_unit)} uV, {how}"
            )
        )
    notes.append(
        _annotation(f"Acquisition time source: {rec.time_source.value} - {_TIME_SOURCE_TEXT[rec.time_source]}")
    )
    notes += [_annotation(f"Gateway flag: {flag}") for flag in rec.flags]
    return Sequence(notes)


def _file_meta(ctx: _Context) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ctx.sop_class)
    meta.MediaStorageSOPInstanceUID = UID(ctx.uids.sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    return meta


def build_ecg_dataset(
    recording: EcgRecording,
    uids: EcgStudyUids,
    station: StationInfo,
    *,
    created_at: dt.datetime | None = None,
    request: StudyRequest | None = None,
    quality: QualityReport | None = None,
) -> Dataset:
    """The DICOM object for `recording` (with file meta, Explicit VR Little Endian); `quality`,
    the gateway's quality check of it, goes in as statements and marks the Study Description.

    Raises InvalidObjectError when neither ECG IOD can hold the recording as it is.
    """
    sop_class = choose_sop_class(recording)
    acquired = _local_zone_moment(recording.acquired_at)
    created = None
    if created_at is not None:
        if created_at.tzinfo is None or created_at.utcoffset() is None:
            raise InvalidObjectError("created_at must carry a time zone")
        created = created_at.astimezone(acquired.tzinfo)  # one Timezone Offset From UTC for all
    ctx = _Context(recording, uids, station, sop_class, acquired, created, request or StudyRequest(), quality)
    gaps = merged_gaps(recording.gaps)
    quantised = _quantise(recording.samples, -INT16_MAX if gaps else PADDING_VALUE)
    data, gap_positions = _multiplexed(quantised.samples, gaps)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uids.sop_instance_uid
    if created is not None:
        ds.InstanceCreationDate = _da(created)
        ds.InstanceCreationTime = _tm(created)
    ds.TimezoneOffsetFromUTC = _offset(acquired)
    _set_patient(ds, ctx)
    _set_study_and_series(ds, ctx)
    _set_time_source(ds, ctx)
    _set_equipment(ds, ctx)
    # Waveform Identification
    ds.InstanceNumber = "1"
    ds.ContentDate = _da(acquired)
    ds.ContentTime = _tm(acquired)
    ds.AcquisitionDateTime = _dt(acquired)
    ds.AcquisitionContextSequence = _acquisition_context(ctx)
    median = _median_group(ctx)
    ds.WaveformSequence = Sequence([_waveform_group(ctx, quantised, gaps, data)] + ([median] if median else []))
    ds.WaveformAnnotationSequence = _annotations(ctx, ds.PatientID, quantised, gap_positions)
    ds.file_meta = _file_meta(ctx)
    if not quantised.exact:
        log.info("ECG amplitudes requantised with loss (factor %d)", quantised.factor)
    return ds


# ---------------------------------------------------------------------------- checks and encoding


def _fail(message: str) -> None:
    raise InvalidObjectError(message)


def check_ecg_iod(ds: Dataset) -> None:
    """The ECG IOD limits dciodvfy does not enforce (rate range, 16-bit SS, channel and
    sample counts, data length). Raises InvalidObjectError on the first violation."""
    try:
        _check_ecg_iod(ds)
    except InvalidObjectError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise InvalidObjectError(f"malformed ECG object: {exc!r}") from exc


def _check_ecg_iod(ds: Dataset) -> None:
    limits = IOD_LIMITS.get(str(ds.SOPClassUID))
    if limits is None:
        _fail(f"SOP class {ds.SOPClassUID} is not an ECG class this gateway builds")
        return
    if ds.Modality != "ECG":
        _fail(f"Modality is {ds.Modality!r}, not ECG")
    groups = list(ds.get("WaveformSequence") or [])
    if not 1 <= len(groups) <= limits.max_groups:
        _fail(f"{limits.name}: {len(groups)} multiplex groups (1-{limits.max_groups} allowed)")
    total_channels = 0
    for number, group in enumerate(groups, start=1):
        where = f"{limits.name} group {number}"
        channels = int(group.NumberOfWaveformChannels)
        samples = int(group.NumberOfWaveformSamples)
        rate = float(group.SamplingFrequency)
        total_channels += channels
        if not 1 <= channels <= limits.max_channels_per_group:
            _fail(f"{where}: {channels} channels (1-{limits.max_channels_per_group} allowed)")
        if len(group.ChannelDefinitionSequence) != channels:
            _fail(f"{where}: {len(group.ChannelDefinitionSequence)} channel definitions for {channels} channels")
        if samples < 1 or (limits.max_samples is not None and samples > limits.max_samples):
            _fail(f"{where}: {samples} samples (1-{limits.max_samples or 'any'} allowed)")
        if not (math.isfinite(rate) and limits.min_rate_hz <= rate <= limits.max_rate_hz):
            _fail(f"{where}: sampling frequency {rate:g} Hz outside {limits.min_rate_hz:g}-{limits.max_rate_hz:g} Hz")
        if int(group.WaveformBitsAllocated) != 16 or group.WaveformSampleInterpretation != "SS":
            _fail(
                f"{where}: samples must be 16-bit SS, not {group.WaveformBitsAllocated}-bit "
                f"{group.WaveformSampleInterpretation}"
            )
        if len(group.WaveformData) != channels * samples * 2:
            _fail(f"{where}: {len(group.WaveformData)} bytes of waveform data, expected {channels * samples * 2}")
        for channel in group.ChannelDefinitionSequence:
            source = channel.get("ChannelSourceSequence")
            if not source or not source[0].get("CodeValue"):
                _fail(f"{where}: a channel has no Channel Source code")
            if int(channel.WaveformBitsStored) > 16:
                _fail(f"{where}: {channel.WaveformBitsStored} bits stored in 16-bit samples")
    if limits.max_total_channels is not None and total_channels > limits.max_total_channels:
        _fail(f"{limits.name}: {total_channels} channels in all (at most {limits.max_total_channels})")


def encode_dataset(ds: Dataset) -> bytes:
    """Part-10 file bytes (Explicit VR Little Endian): what the outbox stores."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def recording_to_dicom_bytes(
    recording: EcgRecording,
    uids: EcgStudyUids,
    station: StationInfo,
    *,
    created_at: dt.datetime | None = None,
    request: StudyRequest | None = None,
    quality: QualityReport | None = None,
    patient_comments: str = "",
) -> bytes:
    """Build, check and encode: the bytes to store, or InvalidObjectError. `patient_comments`:
    what the reader must know of the patient (0010,4000), "" for none."""
    ds = build_ecg_dataset(recording, uids, station, created_at=created_at, request=request, quality=quality)
    if patient_comments:  # in UTF-8, as every object built here
        ds.PatientComments = patient_comments
    check_ecg_iod(ds)
    return encode_dataset(ds)
