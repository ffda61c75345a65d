"""Small synthetic ECG recordings for tests that need many of them quickly."""

from __future__ import annotations

import datetime as dt

import numpy as np

from devices.ecg.recording import STANDARD_12_LEADS, EcgRecording, SampleGap
from devices.identity import DeviceIdentity, Patient, TimeSource

T0 = dt.datetime(2026, 11, 2, 9, 30, tzinfo=dt.timezone.utc)


def make_recording(
    seed: int = 0,
    *,
    seconds: float = 2.0,
    rate: float = 500.0,
    leads: tuple[str, ...] = STANDARD_12_LEADS,
    stat: bool = False,
    patient: Patient | str | None = "auto",
) -> EcgRecording:
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    beat = (800 * np.exp(-(((t % 0.8) - 0.2) ** 2) / 0.0004)).astype(np.int32)
    samples = np.stack([beat * (1 + 0.1 * i) + rng.integers(-20, 20, n) for i in range(len(leads))])
    if patient == "auto":
        patient = Patient(f"P{seed:05d}", f"Test^Patient{seed}", dt.date(1960, 1, 1), "F")
    return EcgRecording(
        samples=samples.astype(np.int16),
        lead_names=leads,
        sampling_rate_hz=rate,
        uv_per_unit=1.0,
        acquired_at=T0 + dt.timedelta(minutes=seed),
        time_source=TimeSource.DEVICE_CLOCK,
        device=DeviceIdentity("Acme", "ECG-1", f"SN{seed % 3}"),
        patient=patient,  # type: ignore[arg-type]
        source_format="test",
        stat=stat,
    )


CLINIC_T0 = dt.datetime(2026, 11, 2, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))


def device_recording(
    samples: np.ndarray,
    *,
    rate: float = 500.0,
    names: tuple[str, ...] | None = None,
    uv_per_unit: float = 1.0,
    fmt: str = "test",
    derived: frozenset[str] = frozenset(),
    gaps: tuple[SampleGap, ...] = (),
) -> EcgRecording:
    """These samples as a device hands them over (its own clock, no patient): for the quality
    gate, which looks only at the samples, their scale, rate, lead names and format."""
    return EcgRecording(
        samples=samples,
        lead_names=names or STANDARD_12_LEADS[: samples.shape[0]],
        sampling_rate_hz=rate,
        uv_per_unit=uv_per_unit,
        acquired_at=CLINIC_T0,
        time_source=TimeSource.DEVICE_CLOCK,
        source_format=fmt,
        derived_leads=derived,
        gaps=gaps,
    )
