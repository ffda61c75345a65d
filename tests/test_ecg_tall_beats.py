"""Beats next to taller ones: bigeminy and trigeminy, tall ectopic beats, QRS peaks clipped at the
converter's rail. Each used to cost the doctor a wrong heart rate: the rate halved when every
other beat was twice as tall, no beat at all beside a beat three times as tall, the rate doubled
or lost when every tall R was clipped (each clipped peak was taken for a knocked electrode).
"""

from __future__ import annotations

import numpy as np
import pydicom.data
import pytest

from devices.ecg.formats import decode_ecg
from devices.ecg.qrs import detect_qrs
from devices.ecg.quality import SATURATION, WARN, check_quality
from devices.ecg.recording import EcgRecording
from tests.ecg_factories import device_recording

RATE_HZ = 500.0
SECONDS = 10.0
RR_S = 0.8  # 75 bpm
FIRST_S = 0.4
# lead gains: a 12-lead ECG's QRS differs in size and sign from lead to lead
GAINS = np.array([0.6, 1.0, 0.4, -0.8, 0.2, 0.7, -0.5, -0.9, 1.2, 1.4, 1.1, 0.8])
FIDUCIAL_TOLERANCE = round(0.012 * RATE_HZ)


def beat_times(rr_s: float = RR_S, seconds: float = SECONDS) -> np.ndarray:
    return np.arange(FIRST_S, seconds - 0.3, rr_s)


def pqrst(
    times: np.ndarray,
    sizes: np.ndarray,
    *,
    qrs_uv: float = 1000.0,
    t_uv: float = 250.0,
    t_sigma_s: float = 0.04,
    t_after_s: float = 0.28,
    seconds: float = SECONDS,
) -> np.ndarray:
    """One lead: at each time a QRS (10 ms Gaussian) and its T wave, both scaled by that beat's size."""
    t = np.arange(round(seconds * RATE_HZ)) / RATE_HZ
    x = np.zeros_like(t)
    for at, size in zip(times, sizes):
        x += size * qrs_uv * np.exp(-0.5 * ((t - at) / 0.010) ** 2)
        x += size * t_uv * np.exp(-0.5 * ((t - at - t_after_s) / t_sigma_s) ** 2)
    return x


def twelve(times: np.ndarray, sizes: np.ndarray, seed: int = 7, noise_uv: float = 8.0, **kw: float) -> np.ndarray:
    lead = pqrst(times, sizes, **kw)
    rng = np.random.default_rng(seed)
    return GAINS[:, None] * lead[None, :] + rng.normal(0, noise_uv, (GAINS.size, lead.size))


def every(k: int, factor: float, count: int) -> np.ndarray:
    """Beat sizes: every k-th beat `factor` times taller (bigeminy k=2, trigeminy k=3)."""
    sizes = np.ones(count)
    sizes[::k] = factor
    return sizes


def assert_found(beats: tuple[int, ...], times: np.ndarray) -> None:
    expected = np.round(times * RATE_HZ).astype(int)
    assert len(beats) == expected.size, (beats, expected.tolist())
    assert np.all(np.abs(np.asarray(beats) - expected) <= FIDUCIAL_TOLERANCE), (beats, expected.tolist())


# ----------------------------------------------------------------------------- hidden by taller beats


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("factor", [2.0, 2.5, 3.0])
def test_bigeminy_and_trigeminy_with_taller_beats_keep_the_rate(k: int, factor: float) -> None:
    """Every 2 s window holds one of the tall beats, so the QRS level was theirs: the others (a
    quarter to a ninth of their energy) fell under the threshold, every RR was equally long and
    the rate came out halved (bigeminy) or a third (trigeminy)."""
    times = beat_times()
    found = detect_qrs(twelve(times, every(k, factor, times.size)), RATE_HZ)
    assert_found(found.beats, times)
    assert found.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)


def test_the_check_of_taller_beats_can_fail_without_the_tall_ones() -> None:
    """The same rhythm with every beat the same size: found by the ordinary threshold, so the
    tests above measure the hidden-beat search, not an easy signal."""
    times = beat_times()
    assert_found(detect_qrs(twelve(times, np.ones(times.size)), RATE_HZ).beats, times)


def test_bigeminy_at_120_bpm_keeps_the_rate() -> None:
    """At 120 bpm the hidden beat lies 0.5 s after the tall one: past its T wave (at most
    0.40 s x sqrt(1 s) for the halved rhythm's gap), so it is still found."""
    times = beat_times(rr_s=0.5)
    found = detect_qrs(twelve(times, every(2, 2.0, times.size), t_after_s=0.2), RATE_HZ)
    assert_found(found.beats, times)


@pytest.mark.parametrize("leads", [12, 1])
def test_a_tall_ectopic_beat_in_every_lead_leaves_the_other_beats_found(leads: int) -> None:
    """Two beats three times as tall as the rest (nine times the energy): every lead's typical
    peak was under 15 % of its largest, every lead was dropped as 'not steady', and the doctor
    got no beat and no rate at all (a one-lead handheld as well as a 12-lead cart)."""
    times = beat_times()
    sizes = np.ones(times.size)
    sizes[[3, 8]] = 3.0
    found = detect_qrs(twelve(times, sizes)[:leads], RATE_HZ)
    assert_found(found.beats, times)


def test_a_tall_beats_t_wave_is_not_a_beat() -> None:
    """A beat four times as tall brings a T wave four times as tall (16x its energy): against the
    ordinary beats' level it passes the threshold 280 ms after the QRS. Pan and Tompkins' test
    (under a quarter of the energy of the beat 360 ms before it) leaves it out."""
    times = beat_times()
    sizes = np.ones(times.size)
    sizes[[2, 7]] = 4.0
    found = detect_qrs(twelve(times, sizes, t_uv=400.0, t_sigma_s=0.03), RATE_HZ)
    assert_found(found.beats, times)


def test_a_peaked_t_wave_is_not_a_hidden_beat() -> None:
    """Peaked T waves (0.6 mV, 40 ms wide: hyperkalaemia) after every beat of a regular rhythm
    hold a T wave in every gap: it lies before 0.40 s x sqrt(RR), so the rate is not doubled."""
    times = beat_times()
    found = detect_qrs(twelve(times, np.ones(times.size), t_uv=600.0, t_sigma_s=0.02, t_after_s=0.30), RATE_HZ)
    assert_found(found.beats, times)


def test_a_late_bump_in_only_some_gaps_is_not_a_rhythm() -> None:
    """In a bigeminy-like strip where only a third of the gaps hold a small late beat, those are
    not enough (two thirds of the long gaps must): nothing is added."""
    tall = beat_times(rr_s=1.6)
    lone = tall[:-1][::3] + 0.8
    sizes = np.r_[np.full(tall.size, 2.0), np.ones(lone.size)]
    order = np.argsort(np.r_[tall, lone])
    x = twelve(np.r_[tall, lone][order], sizes[order])
    assert_found(detect_qrs(x, RATE_HZ).beats, tall)


def test_the_real_mortara_ecg_with_every_other_beat_taller_keeps_its_rate() -> None:
    """pydicom's real 12-lead ECG (61 bpm) with every other beat scaled 2.5x about each lead's
    median (its QRS and T alike): the rate stays 61, not 30."""
    path = pydicom.data.get_testdata_file("waveform_ecg.dcm")
    rec = decode_ecg(open(path, "rb").read(), "waveform_ecg.dcm")  # noqa: SIM115 - read once
    x = rec.samples.astype(np.float64) * rec.uv_per_unit
    rate = rec.sampling_rate_hz
    plain = detect_qrs(x, rate)
    beats = np.asarray(plain.beats)
    median = np.median(x, axis=1, keepdims=True)
    y = x.copy()
    for j in range(0, beats.size, 2):
        lo = (beats[j - 1] + beats[j]) // 2 if j else 0
        hi = (beats[j] + beats[j + 1]) // 2 if j + 1 < beats.size else x.shape[1]
        y[:, lo:hi] = median + (x[:, lo:hi] - median) * 2.5
    tall = detect_qrs(y, rate)
    assert plain.heart_rate_bpm == pytest.approx(61.1, abs=0.2)
    assert len(tall.beats) == beats.size
    assert tall.heart_rate_bpm == pytest.approx(plain.heart_rate_bpm, abs=0.5)


# ----------------------------------------------------------------------------- clipped QRS peaks

UV_PER_UNIT = 0.1  # a 16-bit converter at 0.1 µV a unit: its rail is at 3.28 mV


def clipped_recording(x_uv: np.ndarray) -> tuple[np.ndarray, EcgRecording]:
    units = np.clip(np.round(x_uv / UV_PER_UNIT), -32767, 32767).astype(np.int16)
    return units, device_recording(units, rate=RATE_HZ, uv_per_unit=UV_PER_UNIT)


def test_every_tall_r_clipped_at_the_rail_keeps_every_beat() -> None:
    """V2-V4's R waves (up to 4.2 mV) run past the 3.28 mV rail at every beat: those 10-20 ms
    visits recur like beats, so they are the leads' own clipping (reported as saturation, a
    warning), not a knocked electrode whose stretch is left out of the beat search: before, every
    beat fell into a left-out stretch and the rate came out doubled or missing."""
    times = beat_times()
    x = twelve(times, np.ones(times.size), qrs_uv=3000.0)
    units, rec = clipped_recording(x)
    assert (units == 32767).any(axis=1).sum() >= 3  # the check can fail: the rail is really reached
    report = check_quality(rec)
    assert_found(report.beats, times)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)
    sat = [p for p in report.problems if p.kind == SATURATION]
    assert len(sat) == 1 and sat[0].severity == WARN and {"V3", "V4"} <= set(sat[0].leads)


def test_tall_beats_clipped_in_a_bigeminy_keep_the_rate() -> None:
    """Every other beat twice as tall and clipped (the rail cuts it to about 1.6x the others):
    the clipped visits are clipping, and the small beats between are found."""
    times = beat_times()
    x = twelve(times, every(2, 2.0, times.size), qrs_uv=2200.0)
    units, rec = clipped_recording(x)
    assert (units == 32767).any(axis=1).sum() >= 2
    report = check_quality(rec)
    assert_found(report.beats, times)


def test_a_lead_clipped_twice_where_another_clips_every_beat_is_clipping_too() -> None:
    """V3 passes the rail at only two beats (too few to recur on its own) but at the same moments
    as V4, which clips at every beat: the same tall QRS, so those beats stay in the search."""
    times = beat_times()
    x = twelve(times, np.ones(times.size), qrs_uv=1000.0)
    x[9] = pqrst(times, np.ones(times.size), qrs_uv=4000.0)  # V4: over the rail at every beat
    sizes = np.ones(times.size)
    sizes[[4, 9]] = 4.0
    x[8] = pqrst(times, sizes, qrs_uv=1000.0)  # V3: only beats 4 and 9 reach the rail
    units, rec = clipped_recording(x)
    assert (units[8] == 32767).sum() > 0 and np.count_nonzero(np.diff((units[8] == 32767).astype(int)) == 1) == 2
    report = check_quality(rec)
    assert_found(report.beats, times)


def test_an_electrode_bouncing_on_the_rail_is_still_left_out() -> None:
    """Three 20 ms visits to the rail 100 ms apart, between two beats: an electrode bouncing, not
    a QRS (no two QRS are 100 ms apart): left out of the beat search, so no beat is made of it."""
    times = beat_times()
    x = twelve(times, np.ones(times.size))
    start = round((times[5] + 0.45) * RATE_HZ)
    for k in range(3):
        lo = start + round(k * 0.1 * RATE_HZ)
        x[:3, lo : lo + round(0.02 * RATE_HZ)] = 5000.0
    _, rec = clipped_recording(x)
    report = check_quality(rec)
    bounce = range(start - round(0.03 * RATE_HZ), start + round(0.25 * RATE_HZ))
    assert [b for b in report.beats if b in bounce] == []
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)
