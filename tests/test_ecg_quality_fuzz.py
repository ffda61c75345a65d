"""The quality gate and the QRS detector on any samples a device can hand over: a report (or the
typed error for a rate outside 100-2000 Hz), never a crash, and never an impossible answer -
beats inside the recording and ascending, a heart rate inside 20-300 bpm or none.

Two kinds of input: raw samples (anything a broken device could send), and rhythms made of beats
of random size and spacing, clipped at the converter's rail at random - what reaches the hidden-
beat search, the T-wave test and the clipped-peak rule, which raw noise seldom does.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from devices.ecg.qrs import RATE_RANGE_BPM, detect_qrs
from devices.ecg.quality import MAX_RATE_HZ, MIN_RATE_HZ, EcgQualityError, QualityReport, check_quality
from devices.ecg.recording import STANDARD_12_LEADS
from tests.ecg_factories import device_recording

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def assert_possible(report: QualityReport, n: int) -> None:
    beats = np.asarray(report.beats)
    assert np.all((beats >= 0) & (beats < n)) and np.all(np.diff(beats) > 0), report.beats
    rate = report.heart_rate_bpm
    assert rate is None or RATE_RANGE_BPM[0] <= rate <= RATE_RANGE_BPM[1], rate
    assert report.verdict in ("acceptable", "warn", "re-record")


@FUZZ
@given(
    samples=hnp.arrays(
        np.int16,
        st.tuples(st.integers(1, 12), st.integers(1, 1500)),  # a recording needs samples (its own check)
        elements=st.integers(-32768, 32767),
    ),
    rate=st.sampled_from([50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0]),
)
def test_any_samples_give_a_report_or_the_typed_error(samples: np.ndarray, rate: float) -> None:
    rec = device_recording(samples, rate=rate)
    try:
        report = check_quality(rec)
    except EcgQualityError:
        assert not MIN_RATE_HZ <= rate <= MAX_RATE_HZ
        return
    assert_possible(report, samples.shape[1])


@st.composite
def rhythms(draw: st.DrawFn) -> tuple[np.ndarray, float]:
    """12 leads, 2-10 s: beats of random size (0.2-5x) and spacing (0.25-2.5 s), T waves of
    random size and place, noise, and a rail that may cut the tallest."""
    rate = draw(st.sampled_from([125.0, 250.0, 500.0, 1000.0]))
    seconds = draw(st.floats(2.0, 10.0))
    n = int(seconds * rate)
    t = np.arange(n) / rate
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = np.zeros(n)
    at = draw(st.floats(0.0, 0.5))
    while at < seconds:
        size = draw(st.floats(0.2, 5.0))
        x += size * 1000.0 * np.exp(-0.5 * ((t - at) / draw(st.floats(0.005, 0.04))) ** 2)
        t_at = at + draw(st.floats(0.15, 0.45))
        x += size * draw(st.floats(0.0, 0.8)) * 1000.0 * np.exp(-0.5 * ((t - t_at) / 0.04) ** 2)
        at += draw(st.floats(0.25, 2.5))
    gains = rng.uniform(-1.5, 1.5, len(STANDARD_12_LEADS))
    leads = gains[:, None] * x[None, :] + rng.normal(0, draw(st.floats(0.0, 80.0)), (gains.size, n))
    rail = draw(st.floats(300.0, 40000.0))  # µV at the converter's limit
    units = np.clip(np.round(leads * 32767 / rail), -32767, 32767).astype(np.int16)
    return units, rate


@FUZZ
@given(rhythm=rhythms(), uv_scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_any_rhythm_of_tall_and_small_beats_gives_a_possible_report(
    rhythm: tuple[np.ndarray, float], uv_scale: float
) -> None:
    units, rate = rhythm
    report = check_quality(device_recording(units, rate=rate, uv_per_unit=uv_scale))
    assert_possible(report, units.shape[1])
    found = detect_qrs(units.astype(np.float64) * uv_scale, rate)
    beats = np.asarray(found.beats)
    assert np.all((beats >= 0) & (beats < units.shape[1])) and np.all(np.diff(beats) > 0)
