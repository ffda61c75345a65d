"""The ECG recording every decoder produces (devices/ecg/recording.py): what it refuses and why.

Every refusal guards a reading error: a lead without its name, samples without a rate (no time
axis), a scale of 0 (a flat line), a time without a zone, a gap that points outside the record.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from devices.ecg.recording import STANDARD_12_LEADS, EcgRecording, SampleGap
from devices.errors import InvalidRecordingError
from devices.identity import DeviceIdentity, TimeSource

AT = dt.datetime(2025, 3, 5, 9, 30, tzinfo=dt.timezone.utc)


def _rec(samples: object = None, **overrides: object) -> EcgRecording:
    fields: dict[str, object] = dict(
        samples=np.array([[1, -2, 3], [4, 5, -6]], dtype=np.int16) if samples is None else samples,
        lead_names=("I", "II"),
        sampling_rate_hz=500.0,
        uv_per_unit=2.5,
        acquired_at=AT,
        time_source=TimeSource.FILE,
    )
    fields.update(overrides)
    return EcgRecording(**fields)  # type: ignore[arg-type]


def test_a_valid_recording_and_its_views() -> None:
    r = _rec()
    assert (r.n_leads, r.n_samples, r.duration_s) == (2, 3, 3 / 500.0)
    assert r.microvolts().tolist() == [[2.5, -5.0, 7.5], [10.0, 12.5, -15.0]]
    assert r.microvolts().dtype == np.float64  # no int16 overflow when scaled
    assert r.lead("II").tolist() == [4, 5, -6]
    assert (r.device, r.patient, r.derived_leads, r.gaps, r.stat, r.flags, r.resampled_from_hz, r.source_format) == (
        DeviceIdentity(),
        None,
        frozenset(),
        (),
        False,
        (),
        None,
        "",
    )
    assert STANDARD_12_LEADS == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


@pytest.mark.parametrize(
    "samples,needle",
    [
        ([[1, 2], [3, 4]], "2-D array"),  # a list, not an array
        (np.array([1, 2, 3], dtype=np.int16), "2-D array"),
        (np.zeros((2, 3, 1), dtype=np.int16), "2-D array"),
        (np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "must be integers"),
        (np.zeros((0, 3), dtype=np.int16), "needs leads and samples"),
        (np.zeros((2, 0), dtype=np.int16), "needs leads and samples"),
        (np.zeros((3, 3), dtype=np.int16), "2 lead names for 3 leads"),
    ],
)
def test_sample_arrays_that_are_not_a_recording(samples: object, needle: str) -> None:
    with pytest.raises(InvalidRecordingError, match=needle):
        _rec(samples)


@pytest.mark.parametrize("names", [("I", "I"), ("I", ""), ("", "II")])
def test_lead_names_are_unique_and_present(names: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRecordingError, match="unique and non-empty"):
        _rec(lead_names=names)


@pytest.mark.parametrize("rate", [0.0, -500.0, float("nan"), float("inf")])
def test_a_sampling_rate_must_be_a_positive_number(rate: float) -> None:
    with pytest.raises(InvalidRecordingError, match="bad sampling rate"):
        _rec(sampling_rate_hz=rate)


@pytest.mark.parametrize("scale", [0.0, -2.5, float("nan"), float("inf")])
def test_a_scale_must_be_a_positive_number(scale: float) -> None:
    with pytest.raises(InvalidRecordingError, match="bad scale"):
        _rec(uv_per_unit=scale)


def test_small_positive_rate_and_scale_are_accepted() -> None:
    assert _rec(sampling_rate_hz=25.0, uv_per_unit=1e-3).uv_per_unit == 1e-3


def test_acquisition_time_needs_a_zone() -> None:
    with pytest.raises(InvalidRecordingError, match="acquired_at must carry a time zone"):
        _rec(acquired_at=AT.replace(tzinfo=None))


def test_derived_leads_must_be_leads_of_the_recording() -> None:
    assert _rec(derived_leads=frozenset({"II"})).derived_leads == {"II"}
    with pytest.raises(InvalidRecordingError, match="derived leads"):
        _rec(derived_leads=frozenset({"III"}))


@pytest.mark.parametrize("gap", [SampleGap(0, 1), SampleGap(3, 10), SampleGap(1, 1)])
def test_gaps_inside_or_at_the_ends_are_accepted(gap: SampleGap) -> None:
    assert _rec(gaps=(gap,)).gaps == (gap,)


@pytest.mark.parametrize("gap", [SampleGap(-1, 5), SampleGap(0, 0), SampleGap(1, -1), SampleGap(4, 1)])
def test_gaps_outside_the_record_or_empty_are_refused(gap: SampleGap) -> None:
    with pytest.raises(InvalidRecordingError, match="bad gap"):
        _rec(gaps=(SampleGap(0, 2), gap))


@pytest.mark.parametrize(
    "rate,reason",
    [
        (0.0, r"^bad sampling rate 0\.0$"),
        (float("inf"), r"^bad sampling rate inf$"),
        (0.5, r"^bad sampling rate: "),  # a number, but no ECG is sampled at 0.5 Hz: misread bytes
        (1e6, r"^bad sampling rate: "),
    ],
)
def test_a_rate_that_is_no_number_is_told_apart_from_an_implausible_one(rate: float, reason: str) -> None:
    """The refusal says which: a zero or infinite rate is a broken field, an implausible finite
    rate is a misread file; the technician reading the refusal knows which device to look at."""
    with pytest.raises(InvalidRecordingError, match=reason):
        _rec(sampling_rate_hz=rate)


def test_every_lead_may_be_derived() -> None:
    """A recording whose leads were all computed from others is still stored (not refused and lost)."""
    assert _rec(derived_leads=frozenset({"I", "II"})).derived_leads == {"I", "II"}
