"""The ECG recording every decoder produces and every builder consumes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from devices.ecg.findings import EcgMeasurement, EcgStatement, MedianBeats
from devices.errors import InvalidRecordingError
from devices.identity import DeviceIdentity, Patient, TimeSource, require_aware
from devices.plausibility import implausibility

STANDARD_12_LEADS: tuple[str, ...] = (
    "I",
    "II",
    "III",
    "aVR",
    "aVL",
    "aVF",
    "V1",
    "V2",
    "V3",
    "V4",
    "V5",
    "V6",
)


@dataclass(frozen=True, slots=True)
class SampleGap:
    """`missing` samples that never arrived, just before sample index `start`.

    The missing samples are absent from `EcgRecording.samples` (no placeholder values are
    inserted there); the DICOM builder re-inserts them as padding and annotates each gap.
    """

    start: int
    missing: int


def merged_gaps(gaps: Iterable[SampleGap]) -> list[tuple[int, int]]:
    """(start, missing) of `gaps` in sample order, those before the same sample added up."""
    merged: dict[int, int] = {}
    for gap in gaps:
        merged[gap.start] = merged.get(gap.start, 0) + gap.missing
    return sorted(merged.items())


def on_time_axis(
    samples: np.ndarray, gaps: list[tuple[int, int]], fill: float
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(leads, samples) with `fill` where samples never arrived (`merged_gaps`), so that sample
    index / rate is the time since the start of the recording; and each gap's 0-based (first,
    count) there."""
    n_leads, n = samples.shape
    out = np.full((n_leads, n + sum(missing for _, missing in gaps)), fill, dtype=np.result_type(samples.dtype, fill))
    positions = []
    src = dst = 0
    for start, missing in gaps:
        out[:, dst : dst + start - src] = samples[:, src:start]
        dst += start - src
        positions.append((dst, missing))
        dst += missing
        src = start
    out[:, dst:] = samples[:, src:]
    return out, positions


@dataclass(frozen=True, slots=True)
class EcgRecording:
    """A multi-lead ECG.

    `samples` has shape (leads, samples) and an integer dtype; physical value in µV is
    `samples * uv_per_unit`. `patient` None means unassigned: held for the doctor, never guessed.
    """

    samples: np.ndarray
    lead_names: tuple[str, ...]
    sampling_rate_hz: float
    uv_per_unit: float
    acquired_at: dt.datetime
    time_source: TimeSource
    device: DeviceIdentity = field(default_factory=DeviceIdentity)
    patient: Patient | None = None
    derived_leads: frozenset[str] = frozenset()  # computed (Einthoven/Goldberger), not recorded
    source_format: str = ""  # "scp", "aecg", "dicom", "contec", "bridge", "npz" ...
    resampled_from_hz: float | None = None  # set when the rate was changed to fit DICOM
    gaps: tuple[SampleGap, ...] = ()  # samples lost in transit (streamed ECG)
    stat: bool = False  # urgent read requested
    flags: tuple[str, ...] = ()  # e.g. "patient-mismatch": things the doctor must look at
    measurements: tuple[EcgMeasurement, ...] = ()  # the cart's own findings, as it reported them
    statements: tuple[EcgStatement, ...] = ()  # its interpretation statements and comments
    median_beats: MedianBeats | None = None  # its representative beats, when the file has them

    def __post_init__(self) -> None:
        s = self.samples
        if not isinstance(s, np.ndarray) or s.ndim != 2:
            raise InvalidRecordingError("samples must be a 2-D array (leads, samples)")
        if not np.issubdtype(s.dtype, np.integer):
            raise InvalidRecordingError(f"samples must be integers, not {s.dtype}")
        if s.shape[0] == 0 or s.shape[1] == 0:
            raise InvalidRecordingError(f"a recording needs leads and samples (shape {s.shape})")
        if len(self.lead_names) != s.shape[0]:
            raise InvalidRecordingError(f"{len(self.lead_names)} lead names for {s.shape[0]} leads")
        if len(set(self.lead_names)) != len(self.lead_names) or not all(self.lead_names):
            raise InvalidRecordingError(f"lead names must be unique and non-empty: {self.lead_names}")
        if not (np.isfinite(self.sampling_rate_hz) and self.sampling_rate_hz > 0):
            raise InvalidRecordingError(f"bad sampling rate {self.sampling_rate_hz!r}")
        implausible = implausibility("ecg-sampling-rate", float(self.sampling_rate_hz), "Hz")
        if implausible:  # decoders turn this into their ProtocolError: misread bytes, not an ECG
            raise InvalidRecordingError(f"bad sampling rate: {implausible}")
        if not (np.isfinite(self.uv_per_unit) and self.uv_per_unit > 0):
            raise InvalidRecordingError(f"bad scale {self.uv_per_unit!r} µV per unit")
        require_aware(self.acquired_at, "acquired_at")
        if not self.derived_leads <= set(self.lead_names):
            raise InvalidRecordingError("derived leads must be among the lead names")
        for gap in self.gaps:
            if gap.start < 0 or gap.missing <= 0 or gap.start > s.shape[1]:
                raise InvalidRecordingError(f"bad gap {gap}")

    @property
    def n_leads(self) -> int:
        return int(self.samples.shape[0])

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.sampling_rate_hz

    def microvolts(self) -> np.ndarray:
        """Samples in µV as float64 (leads, samples)."""
        return self.samples.astype(np.float64) * self.uv_per_unit

    def lead(self, name: str) -> np.ndarray:
        return self.samples[self.lead_names.index(name)]
