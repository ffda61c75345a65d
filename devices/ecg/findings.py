"""What the ECG cart itself concluded: its measurements, its statements, its median beats.

A reading center triages by the cart's own findings (PR, QRS, QT/QTc, axes, "sinus rhythm",
"possible infarct"). They are carried as the cart reported them - never recomputed here -
with where each came from (`source`), so the cardiologist can tell the machine's numbers from
a physician's.

Measurement names are ours ("pr-interval", ...); each has one standard code (ISO/IEEE 11073-10101
MDC, as DICOM PS3.16 CID 3227 QTc, CID 3228 ECG Timing and CID 3229 ECG Axis Measurement list
them) and one UCUM unit, used by every decoder that reads a code and by the DICOM builder that
writes one. Units are normalised at decoding: intervals in ms, axes in deg, rates in /min,
amplitudes in uV.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from devices.errors import InvalidRecordingError


class StatementSource(str, enum.Enum):
    """Who made a statement."""

    DEVICE = "device"  # the cart's automatic analysis, not confirmed by a physician
    PHYSICIAN = "physician"  # confirmed or over-read by a physician (as the file says)
    COMMENT = "comment"  # free text recorded with the ECG (operator's remark), not a finding


@dataclass(frozen=True, slots=True)
class MeasurementKind:
    """One kind of ECG measurement and its standard code."""

    name: str  # our name, e.g. "qt-interval"
    unit: str  # UCUM: "ms", "deg", "/min", "uV"
    mdc: str  # MDC code in DICOM's "partition:term" form, e.g. "2:16160"
    meaning: str  # the code meaning the standard gives
    per_lead: bool = False


# Global measurements (CID 3228 ECG Timing, CID 3229 ECG Axis, CID 3227 QTc), heart rate
# (MDC_ECG_HEART_RATE), and the per-lead ones SCP-ECG section 10 carries (CID 3687/3688).
_KINDS: tuple[MeasurementKind, ...] = (
    MeasurementKind("heart-rate", "/min", "2:16770", "Heart rate"),
    MeasurementKind("rr-interval", "ms", "2:16168", "RR interval global"),
    MeasurementKind("pp-interval", "ms", "2:16140", "PP interval global"),
    MeasurementKind("p-duration", "ms", "2:16184", "P duration global"),
    MeasurementKind("pr-interval", "ms", "2:15872", "PR interval global"),
    MeasurementKind("qrs-duration", "ms", "2:16156", "QRS duration global"),
    MeasurementKind("qt-interval", "ms", "2:16160", "QT interval global"),
    MeasurementKind("qtc-interval", "ms", "2:15876", "QTc interval global"),
    MeasurementKind("p-axis", "deg", "2:16128", "P axis"),
    MeasurementKind("qrs-axis", "deg", "2:16132", "QRS axis"),
    MeasurementKind("t-axis", "deg", "2:16136", "T axis"),
    MeasurementKind("lead-p-duration", "ms", "2:6656", "P duration, per lead", per_lead=True),
    MeasurementKind("lead-pr-interval", "ms", "2:7168", "PR interval per lead", per_lead=True),
    MeasurementKind("lead-qrs-duration", "ms", "2:7936", "QRS duration, per lead", per_lead=True),
    MeasurementKind("lead-qt-interval", "ms", "2:8192", "QT duration, per lead", per_lead=True),
    MeasurementKind("lead-q-amplitude", "uV", "2:1792", "Q amplitude, per lead", per_lead=True),
    MeasurementKind("lead-r-amplitude", "uV", "2:2048", "R amplitude, per lead", per_lead=True),
    MeasurementKind("lead-s-amplitude", "uV", "2:2304", "S amplitude, per lead", per_lead=True),
    MeasurementKind("lead-j-amplitude", "uV", "2:1024", "J point Amplitude, per lead", per_lead=True),
)
MEASUREMENT_KINDS: dict[str, MeasurementKind] = {k.name: k for k in _KINDS}
KIND_BY_MDC: dict[str, MeasurementKind] = {k.mdc: k for k in _KINDS}

# QTc formulas with a code of their own (CID 3227); other formulas are written as "QTc interval
# global" with the algorithm (CID 3678) as its modifier.
QTC_FORMULA_CODES: dict[str, tuple[str, str]] = {
    "bazett": ("2:15880", "QTc global using Bazett formula"),
    "fridericia": ("2:15892", "QTc global using Fredericia formula"),
}
# QTc correction algorithms (DICOM CID 3678, DCM codes).
QTC_ALGORITHMS: dict[str, tuple[str, str]] = {
    "bazett": ("122730", "Bazett QTc Algorithm"),
    "hodges": ("122731", "Hodges QTc Algorithm"),
    "fridericia": ("122732", "Fridericia QTc Algorithm"),
    "framingham": ("122733", "Framingham QTc Algorithm"),
}

# Plausibility bounds per unit: a value outside is a decoding error or a sentinel, not a finding
# (an interval of 0 ms is how some carts write "not computed").
_BOUNDS = {"ms": (1.0, 10_000.0), "deg": (-360.0, 360.0), "/min": (1.0, 600.0), "uV": (-100_000.0, 100_000.0)}


@dataclass(frozen=True, slots=True)
class EcgMeasurement:
    """One value the cart measured, in the unit of its kind."""

    kind: str  # a key of MEASUREMENT_KINDS
    value: float
    source: str  # where it was read, e.g. "scp:section7", "aecg:annotation", "dicom:annotation"
    lead: str = ""  # per-lead measurements only
    method: str = ""  # QTc formula ("bazett", "hodges", ...) when the file names one
    note: str = ""  # what the decoder had to interpret, e.g. a writer's wrong unit

    def __post_init__(self) -> None:
        kind = MEASUREMENT_KINDS.get(self.kind)
        if kind is None:
            raise InvalidRecordingError(f"unknown ECG measurement {self.kind!r}")
        if kind.per_lead != bool(self.lead):
            raise InvalidRecordingError(f"{self.kind} {'needs' if kind.per_lead else 'takes no'} lead")
        low, high = _BOUNDS[kind.unit]
        if not (math.isfinite(self.value) and low <= self.value <= high):
            raise InvalidRecordingError(f"{self.kind} = {self.value} {kind.unit} is not a plausible value")
        if self.method and (self.kind != "qtc-interval" or self.method not in QTC_ALGORITHMS):
            raise InvalidRecordingError(f"{self.kind}: unknown QTc formula {self.method!r}")

    @property
    def unit(self) -> str:
        return MEASUREMENT_KINDS[self.kind].unit


@dataclass(frozen=True, slots=True)
class EcgStatement:
    """One interpretation statement (or comment) as the file states it."""

    text: str
    source: StatementSource
    origin: str = ""  # where it was read, e.g. "scp:section8"
    code: str = ""  # a coded statement's code (SCP universal statement acronym, MDC) when given

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise InvalidRecordingError("an ECG statement needs text")


@dataclass(frozen=True, slots=True)
class MedianBeats:
    """The cart's representative (median / reference) beat per lead, as it stored it."""

    samples: np.ndarray  # (leads, samples), integers; µV = samples * uv_per_unit
    lead_names: tuple[str, ...]
    sampling_rate_hz: float
    uv_per_unit: float
    source: str = ""

    def __post_init__(self) -> None:
        s = self.samples
        if not isinstance(s, np.ndarray) or s.ndim != 2 or not np.issubdtype(s.dtype, np.integer):
            raise InvalidRecordingError("median beats must be a 2-D integer array (leads, samples)")
        if s.shape[0] == 0 or s.shape[1] == 0 or s.shape[0] != len(self.lead_names):
            raise InvalidRecordingError(f"median beats: {len(self.lead_names)} names for shape {s.shape}")
        if len(set(self.lead_names)) != len(self.lead_names):
            raise InvalidRecordingError("median beats: lead names repeat")
        if not (math.isfinite(self.sampling_rate_hz) and self.sampling_rate_hz > 0):
            raise InvalidRecordingError(f"median beats: bad rate {self.sampling_rate_hz!r}")
        if not (math.isfinite(self.uv_per_unit) and self.uv_per_unit > 0):
            raise InvalidRecordingError(f"median beats: bad scale {self.uv_per_unit!r}")

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[1])


def measurement(kind: str, value: float, source: str, **extra: str) -> EcgMeasurement | None:
    """An EcgMeasurement, or None when the value is not plausible (a sentinel such as 29999
    "not computed" that slipped through, or a writer's garbage): a finding is dropped, never
    invented or clipped."""
    try:
        return EcgMeasurement(kind, float(value), source, **extra)
    except InvalidRecordingError:
        return None


def findings_json(measurements: tuple[EcgMeasurement, ...], statements: tuple[EcgStatement, ...]) -> dict[str, Any]:
    """The findings as plain JSON (`lastmile ecg decode --json`, logs, tests)."""
    return {
        "measurements": [
            {
                "kind": m.kind,
                "value": m.value,
                "unit": m.unit,
                "code": f"MDC {MEASUREMENT_KINDS[m.kind].mdc}",
                "source": m.source,
                **({"lead": m.lead} if m.lead else {}),
                **({"method": m.method} if m.method else {}),
                **({"note": m.note} if m.note else {}),
            }
            for m in measurements
        ],
        "statements": [
            {"text": s.text, "source": s.source.value, "origin": s.origin, **({"code": s.code} if s.code else {})}
            for s in statements
        ],
    }
