"""The beat detector (devices/ecg/qrs.py) and the median beat (devices/ecg/median_beat.py) on small
synthetic signals built here with numpy: the mutation bench's focused tests for both modules (the
real-recording tests in test_ecg_quality.py stay in the suite, but take seconds per mutant).

Each test names the clinical consequence of the bug it catches: a beat missed or invented, a
wrong heart rate, a noisy lead outvoting clean ones, a median beat from the wrong window, a wave
measured against the wrong level or with the wrong sign.
"""

from __future__ import annotations

import numpy as np
import pytest

from devices.ecg import median_beat as median_beat_module
from devices.ecg import qrs
from devices.ecg.median_beat import Waves, median_beat
from devices.ecg.qrs import (
    QrsDetection,
    band_pass,
    detect_qrs,
    heart_rate_bpm,
    local_peaks,
    moving_average,
    qrs_energy,
)

RATE_HZ = 500.0
SECONDS = 10.0
QRS_SIGMA_S = 0.010  # a narrow QRS: about 50 ms wide
QRS_UV = 1000.0
T_UV = 250.0
T_SIGMA_S = 0.040
T_AFTER_S = 0.28
RR_S = 0.8  # 75 bpm
FIDUCIAL_TOLERANCE = 3  # samples (6 ms at 500 Hz): the band-pass may shift a peak by a sample or two
SEED = 2026


def gaussian(n: int, centre: float, sigma: float, rate_hz: float) -> np.ndarray:
    t = np.arange(n) / rate_hz
    return np.exp(-0.5 * ((t - centre) / sigma) ** 2)


def beat_lead(
    beat_times_s: list[float],
    rate_hz: float = RATE_HZ,
    seconds: float = SECONDS,
    qrs_uv: float | list[float] = QRS_UV,
    t_uv: float = T_UV,
) -> np.ndarray:
    """One lead: a Gaussian QRS at each time (its own size when a list is given) and a T wave."""
    n = round(seconds * rate_hz)
    sizes = qrs_uv if isinstance(qrs_uv, list) else [qrs_uv] * len(beat_times_s)
    x = np.zeros(n)
    for t, size in zip(beat_times_s, sizes, strict=True):
        x += size * gaussian(n, t, QRS_SIGMA_S, rate_hz)
        x += t_uv * gaussian(n, t + T_AFTER_S, T_SIGMA_S, rate_hz)
    return x


def regular_times(rr_s: float = RR_S, first_s: float = 0.5, seconds: float = SECONDS) -> list[float]:
    return list(np.arange(first_s, seconds - 0.5, rr_s))


def assert_beats_at(found: tuple[int, ...], times_s: list[float], rate_hz: float = RATE_HZ) -> None:
    expected = np.round(np.asarray(times_s) * rate_hz).astype(int)
    assert len(found) == len(expected), (found, expected.tolist())
    assert np.all(np.abs(np.asarray(found) - expected) <= FIDUCIAL_TOLERANCE), (found, expected.tolist())


# --- moving_average, band_pass, qrs_energy: the filters ------------------------------------------


def naive_moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """The definition: the mean of the samples from i - (w-1)//2 to i + w//2 that exist."""
    width = max(1, width)
    n = x.shape[-1]
    out = np.empty(x.shape, dtype=np.float64)
    for i in range(n):
        lo, hi = max(0, i - (width - 1) // 2), min(n, i + width // 2 + 1)
        out[..., i] = x[..., lo:hi].mean(axis=-1)
    return out


@pytest.mark.parametrize("width", [0, 1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 12])
def test_moving_average_is_the_mean_of_the_samples_around_each_one(width: int, n: int) -> None:
    """Every filter of the detector is this average: a wrong edge or offset shifts every beat or
    weighs the recording's ends wrongly (a beat at the start missed or invented)."""
    x = np.random.default_rng(SEED + n).normal(0, 100, size=(2, 3, n))
    got = moving_average(x, width)
    assert got.dtype == np.float64 and got.shape == x.shape
    np.testing.assert_allclose(got, naive_moving_average(x, width), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(moving_average(x[0, 0], width), naive_moving_average(x[0, 0], width), atol=1e-9)


def test_a_width_one_average_is_a_float_copy_that_leaves_the_caller_s_samples_alone() -> None:
    """Integer samples come back as floats; writing into the result never alters the recording."""
    samples = np.array([[3, -7, 12, 0]], dtype=np.int16)
    got = moving_average(samples, 1)
    assert got.dtype == np.float64 and got.tolist() == [[3.0, -7.0, 12.0, 0.0]]
    got[0, 0] = 99
    assert samples[0, 0] == 3
    microvolts = np.array([1.5, 2.5])
    moving_average(microvolts, 1)[0] = 99.0
    assert microvolts[0] == 1.5
    # exactly the samples, not differences of running sums (which would lose the 1 µV here)
    assert moving_average(np.array([1e17, 1.0, -1e17, 3.0]), 1).tolist() == [1e17, 1.0, -1e17, 3.0]


MAINS_RATE_HZ = 1200.0  # both mains periods are a whole number of samples: 24 (50 Hz) and 20 (60 Hz)


@pytest.mark.parametrize("mains_hz", [50.0, 60.0, 100.0, 150.0, 120.0])
def test_mains_hum_and_its_harmonics_never_reach_the_detector(mains_hz: float) -> None:
    """50 or 60 Hz hum (and harmonics) is removed exactly: hum is not turned into beats."""
    t = np.arange(round(2 * MAINS_RATE_HZ)) / MAINS_RATE_HZ
    hum = 500.0 * np.sin(2 * np.pi * mains_hz * t + 0.3)
    inner = slice(200, -200)
    assert np.max(np.abs(band_pass(hum, MAINS_RATE_HZ)[inner])) < 1e-6


def test_band_pass_keeps_the_qrs_band_and_removes_baseline_and_offset() -> None:
    """A 10 Hz QRS-like wave keeps most of its size; a DC offset and a slow baseline drift go:
    a drifting baseline must not hide beats or make beats of its own."""
    t = np.arange(round(4 * RATE_HZ)) / RATE_HZ
    inner = slice(300, -300)
    qrs_band = np.sin(2 * np.pi * 10.0 * t)
    kept = np.max(np.abs(band_pass(qrs_band, RATE_HZ)[inner]))
    assert 0.95 < kept < 1.12  # the gain at 10 Hz of the three boxcars (20, 16, 120 ms at 500 Hz)
    assert np.max(np.abs(band_pass(np.full(t.size, 800.0), RATE_HZ))) < 1e-9
    drift = band_pass(300.0 * np.sin(2 * np.pi * 0.3 * t), RATE_HZ)[inner]
    assert np.max(np.abs(drift)) < 0.02 * 300.0


def test_band_pass_is_the_mains_boxcars_minus_the_120_ms_mean() -> None:
    """The filter lengths in seconds as documented (1/50 s, 1/60 s, 120 ms) at 500 Hz: 10, 8, 60."""
    x = np.random.default_rng(SEED).normal(0, 100, size=(2, 700))
    low = naive_moving_average(naive_moving_average(x, 10), 8)
    np.testing.assert_allclose(band_pass(x, RATE_HZ), low - naive_moving_average(low, 60), atol=1e-9)
    assert qrs.MAINS_PERIODS_S == (1 / 50, 1 / 60)


def test_qrs_energy_is_the_squared_slope_integrated_over_100_ms() -> None:
    """The envelope the beats are picked from: slope squared (sign-free), summed over a QRS width."""
    x = np.random.default_rng(SEED).normal(0, 100, size=(2, 400))
    filtered = band_pass(x, RATE_HZ)
    slope = np.diff(filtered, axis=-1, prepend=filtered[..., :1])
    np.testing.assert_allclose(qrs_energy(x, RATE_HZ), naive_moving_average(slope**2, 50), rtol=1e-9)
    assert qrs_energy(x, RATE_HZ)[:, 0] == pytest.approx(naive_moving_average(slope**2, 50)[:, 0])


# --- heart_rate_bpm ---------------------------------------------------------------------------


def test_heart_rate_is_sixty_over_the_mean_rr() -> None:
    """Beats 0.8 s apart are 75 bpm; uneven RRs give 60 / their mean, as carts state it."""
    assert heart_rate_bpm((0, 400, 800, 1200), RATE_HZ) == pytest.approx(75.0)
    assert heart_rate_bpm(np.array([0, 300, 800]), RATE_HZ) == pytest.approx(75.0)
    assert heart_rate_bpm((0, 250, 500), 250.0) == pytest.approx(60.0)


def test_no_rate_from_fewer_than_three_beats_or_beats_at_one_sample() -> None:
    """One RR interval is no rate worth stating; repeated indices (no RR at all) give no rate
    instead of a division by zero."""
    assert heart_rate_bpm((), RATE_HZ) is None
    assert heart_rate_bpm((100, 500), RATE_HZ) is None
    assert heart_rate_bpm((100, 100, 100), RATE_HZ) is None


def test_a_rate_outside_20_to_300_bpm_is_a_detector_failure_not_a_rate() -> None:
    """Exactly 20 and 300 bpm are stated; just outside them is no rate (not a wrong number)."""
    assert heart_rate_bpm((0, 1500, 3000), RATE_HZ) == pytest.approx(20.0)
    assert heart_rate_bpm((0, 100, 200), RATE_HZ) == pytest.approx(300.0)
    assert heart_rate_bpm((0, 1501, 3002), RATE_HZ) is None
    assert heart_rate_bpm((0, 99, 198), RATE_HZ) is None
    assert heart_rate_bpm((0, 100, 200), 501.0) is None  # 300.6 bpm
    assert heart_rate_bpm((0, 1500, 3000), 499.0) is None  # 19.96 bpm


def test_rr_intervals_across_an_excluded_stretch_are_not_counted() -> None:
    """While an electrode sat at its rail beats could not be seen: the long RR spanning that
    stretch is not a slow heart. Only RRs with no excluded sample between their beats count."""
    beats = (0, 400, 800, 2000, 2400, 2800)
    exclude = np.zeros(3000, dtype=bool)
    assert heart_rate_bpm(beats, RATE_HZ, exclude) == pytest.approx(60.0 * RATE_HZ / (2800 / 5))
    exclude[1000:1500] = True
    assert heart_rate_bpm(beats, RATE_HZ, exclude) == pytest.approx(75.0)
    exclude[799] = True  # the beat at 800 itself is seen; the RR 400-800 crosses sample 799
    assert heart_rate_bpm(beats, RATE_HZ, exclude) == pytest.approx(75.0)
    exclude[2400] = True  # ... RR 2400-2800 starts on an excluded sample
    assert heart_rate_bpm(beats, RATE_HZ, exclude) == pytest.approx(75.0)
    exclude[0] = True  # only the RR 2000-2400 is left: no rate from one RR
    assert heart_rate_bpm(beats, RATE_HZ, exclude) is None
    assert heart_rate_bpm(beats, RATE_HZ, None) == heart_rate_bpm(beats, RATE_HZ, np.zeros(3000, dtype=bool))


def test_rr_intervals_are_in_seconds() -> None:
    assert QrsDetection((100, 500, 1100), 60.0, (0,)).rr_intervals_s(RATE_HZ).tolist() == [0.8, 1.2]


# --- detect_qrs --------------------------------------------------------------------------------


def test_every_beat_of_a_regular_rhythm_is_found_at_its_qrs_with_its_rate() -> None:
    """75 bpm on two leads: every beat, none invented, each at its QRS peak, rate 75 (9.7 s: not
    a whole number of the 2 s level windows)."""
    times = regular_times(seconds=9.7)
    x = np.stack([beat_lead(times, seconds=9.7), -0.6 * beat_lead(times, seconds=9.7)])
    found = detect_qrs(x, RATE_HZ)
    assert_beats_at(found.beats, times)
    assert found.heart_rate_bpm == pytest.approx(75.0, abs=0.3)
    assert sorted(found.leads_used) == [0, 1]


@pytest.mark.parametrize("rate_hz", [250.0, 1000.0])
def test_every_accepted_sampling_rate_finds_the_same_beats(rate_hz: float) -> None:
    """Filter lengths are in seconds: a 250 Hz or 1000 Hz cart gives the same beats in time."""
    times = regular_times(rr_s=0.9)
    found = detect_qrs(beat_lead(times, rate_hz)[None, :], rate_hz)
    scale = rate_hz / RATE_HZ
    expected = np.round(np.asarray(times) * rate_hz)
    assert len(found.beats) == len(times)
    assert np.all(np.abs(np.asarray(found.beats) - expected) <= FIDUCIAL_TOLERANCE * scale)
    assert found.heart_rate_bpm == pytest.approx(60 / 0.9, abs=0.3)


def test_a_one_dimensional_lead_is_one_lead() -> None:
    times = regular_times()
    assert detect_qrs(beat_lead(times), RATE_HZ).beats == detect_qrs(beat_lead(times)[None, :], RATE_HZ).beats


def test_an_offset_lead_finds_the_same_beats() -> None:
    """A lead sitting 5 mV off zero (electrode offset) beats the same: the median is removed first."""
    times = regular_times()
    assert (
        detect_qrs(beat_lead(times)[None, :] + 5000.0, RATE_HZ).beats
        == detect_qrs(beat_lead(times)[None, :], RATE_HZ).beats
    )


def test_a_small_beat_in_a_long_gap_is_found_by_searching_back() -> None:
    """A small ectopic beat (40 % of the others' size: energy 16 % of the QRS level, under the
    30 % threshold) in the middle of a double-length gap is still found: a beat not missed."""
    times = regular_times()
    sizes = [QRS_UV] * len(times)
    sizes[5] = 0.4 * QRS_UV
    found = detect_qrs(beat_lead(times, qrs_uv=sizes)[None, :], RATE_HZ)
    assert_beats_at(found.beats, times)
    assert found.heart_rate_bpm == pytest.approx(75.0, abs=0.3)


def test_two_small_beats_in_a_row_are_both_found_in_their_long_gap() -> None:
    """Each long gap gets the strongest candidate inside it: a run of two small beats makes a
    triple gap, whose first search finds one; the second is then within a long gap of its own."""
    times = regular_times()
    sizes = [QRS_UV] * len(times)
    sizes[4] = 0.4 * QRS_UV
    found = detect_qrs(beat_lead(times, qrs_uv=sizes)[None, :], RATE_HZ)
    assert_beats_at(found.beats, times)


def test_a_blip_far_below_the_beats_is_not_a_beat_even_in_a_long_gap() -> None:
    """A 20 % blip (energy 4 % of the QRS level) in a pause is noise, not a beat."""
    times = regular_times()
    sizes = [QRS_UV] * len(times)
    sizes[5] = 0.2 * QRS_UV
    found = detect_qrs(beat_lead(times, qrs_uv=sizes)[None, :], RATE_HZ)
    assert_beats_at(found.beats, times[:5] + times[6:])


def test_a_small_beat_in_a_regular_rhythm_is_not_searched_for() -> None:
    """Search-back happens only in gaps much longer than usual: a small blip where the RR is
    normal (a tall T wave's notch, a bump) does not add a beat."""
    times = regular_times(rr_s=1.0)
    x = beat_lead(times)
    blip_times = [t + 0.5 for t in times[2:4]]
    x += beat_lead(blip_times, qrs_uv=0.4 * QRS_UV, t_uv=0.0)
    found = detect_qrs(x[None, :], RATE_HZ)
    assert_beats_at(found.beats, times)


def test_beats_exactly_one_refractory_period_apart_are_all_counted() -> None:
    """A flutter-like run at exactly 220 ms per beat (272.7 bpm): every beat counts, none is
    suppressed as its neighbour's double (the refractory period is the shortest RR, inclusive)."""
    times = regular_times(rr_s=qrs.REFRACTORY_S, seconds=4.0)
    found = detect_qrs(beat_lead(times, seconds=4.0, t_uv=0.0)[None, :], RATE_HZ)
    assert_beats_at(found.beats, times)
    assert found.heart_rate_bpm == pytest.approx(60 / qrs.REFRACTORY_S, abs=0.5)


def test_a_second_peak_within_the_refractory_period_is_the_same_beat() -> None:
    """A notched QRS (a second peak 120 ms later, 70 % of the first) is one beat, not two:
    the rate is not doubled."""
    times = regular_times()
    x = beat_lead(times) + beat_lead([t + 0.12 for t in times], qrs_uv=0.7 * QRS_UV, t_uv=0.0)
    found = detect_qrs(x[None, :], RATE_HZ)
    assert len(found.beats) == len(times)
    assert found.heart_rate_bpm == pytest.approx(75.0, abs=0.5)


def test_beats_just_over_the_refractory_period_apart_are_two_beats() -> None:
    """A fast run (RR 260 ms, 230 bpm) is still counted beat by beat: beats are not merged."""
    times = regular_times(rr_s=0.26, seconds=4.0)
    found = detect_qrs(beat_lead(times, seconds=4.0, t_uv=0.0)[None, :], RATE_HZ)
    assert_beats_at(found.beats, times)


def test_a_noisy_lead_is_outweighed_by_clean_ones() -> None:
    """A lead of pure noise (no QRS standing out) is not combined with the clean leads: its noise
    is never turned into beats."""
    times = regular_times()
    noise = np.random.default_rng(SEED).normal(0, 300, size=round(SECONDS * RATE_HZ))
    x = np.stack([noise, beat_lead(times), 0.8 * beat_lead(times)])
    found = detect_qrs(x, RATE_HZ)
    assert 0 not in found.leads_used and sorted(found.leads_used) == [1, 2]
    assert_beats_at(found.beats, times)


def test_leads_are_combined_in_order_of_clarity_up_to_six() -> None:
    """Eight clean leads: the six clearest (ties: in lead order) carry the beat; a flat lead
    (no QRS at all) is never among them."""
    times = regular_times()
    rng = np.random.default_rng(SEED)
    clean = beat_lead(times)
    leads = [clean + rng.normal(0, 5 * (k + 1), clean.size) for k in range(8)]
    x = np.stack([np.zeros(clean.size), *leads[::-1]])
    found = detect_qrs(x, RATE_HZ)
    assert found.leads_used == (8, 7, 6, 5, 4, 3)
    assert qrs.MAX_LEADS_COMBINED == 6
    assert_beats_at(found.beats, times)


def test_a_lead_much_less_clear_than_the_best_is_left_out() -> None:
    """A lead whose QRS barely stands out of its noise is not averaged with a clean one."""
    times = regular_times()
    rng = np.random.default_rng(SEED)
    poor = beat_lead(times) + rng.normal(0, 250, round(SECONDS * RATE_HZ))
    found = detect_qrs(np.stack([poor, beat_lead(times)]), RATE_HZ)
    assert found.leads_used == (1,)


def test_a_lead_that_dies_half_way_is_not_used() -> None:
    """An electrode that came off after 4 s beats in only half the windows: its later noise
    would become beats, so the lead is left out and the other one carries the rhythm."""
    times = regular_times()
    dying = beat_lead(times)
    dying[round(4 * RATE_HZ) :] = np.random.default_rng(SEED).normal(0, 2, dying.size - round(4 * RATE_HZ))
    found = detect_qrs(np.stack([dying, 0.5 * beat_lead(times)]), RATE_HZ)
    assert found.leads_used == (1,)
    assert_beats_at(found.beats, times)


RAIL_UV = 8000.0  # an input sitting at its converter's rail while an electrode is off


def railed_beats(times: list[float], start_s: float, end_s: float) -> tuple[np.ndarray, np.ndarray]:
    """A lead with beats at `times` held at the rail from start_s to end_s, and that stretch as
    the caller's `exclude` mask."""
    x = beat_lead(times)
    stretch = slice(round(start_s * RATE_HZ), round(end_s * RATE_HZ))
    x[stretch] = RAIL_UV
    exclude = np.zeros(x.size, dtype=bool)
    exclude[stretch] = True
    return x, exclude


def test_a_stretch_at_the_rail_has_no_beats_and_its_edges_make_none() -> None:
    """While an electrode sat at its rail (the caller's `exclude`), no beat is placed there; the
    steps into and out of the rail (QRS-like edges within the filters' reach) make no beats and
    do not drown the real ones; the rate skips the RR that spans the stretch."""
    times = regular_times()
    x, exclude = railed_beats(times, 3.0, 5.0)
    found = detect_qrs(x[None, :], RATE_HZ, exclude)
    assert_beats_at(found.beats, [t for t in times if not 3.0 <= t < 5.0])
    assert found.heart_rate_bpm == pytest.approx(75.0, abs=0.3)
    clean = beat_lead(times)[None, :]
    assert detect_qrs(clean, RATE_HZ, np.zeros(x.size, dtype=bool)) == detect_qrs(clean, RATE_HZ)


@pytest.mark.parametrize(
    "x",
    [
        pytest.param(np.zeros((0, 5000)), id="no leads"),
        pytest.param(np.zeros((2, 5000)), id="flat leads"),
        pytest.param(np.ones((1, 219)) * np.arange(219), id="shorter than two refractory periods"),
    ],
)
def test_nothing_beat_like_gives_no_beats_and_no_rate(x: np.ndarray) -> None:
    """No signal, no leads, or too short to hold two beats: no beats, no rate, never a crash."""
    found = detect_qrs(x, RATE_HZ)
    assert found == QrsDetection((), None, ())


def test_one_beat_in_a_short_recording_is_found_without_a_rate() -> None:
    """440 ms (two refractory periods) with one QRS: that beat, and no rate from one beat."""
    x = beat_lead([0.2], seconds=0.44, t_uv=0.0)[None, :]
    found = detect_qrs(x, RATE_HZ)
    assert_beats_at(found.beats, [0.2])
    assert found.heart_rate_bpm is None and found.leads_used == (0,)


def test_beats_are_ascending_sample_indices_within_the_recording() -> None:
    """A QRS at the very start or end is clipped to the recording, never an index outside it."""
    times = [0.01, *regular_times(first_s=0.8), SECONDS - 0.01]
    x = beat_lead(times)[None, :]
    found = detect_qrs(x, RATE_HZ)
    assert list(found.beats) == sorted(set(found.beats))
    assert all(0 <= b < x.shape[-1] for b in found.beats)
    assert all(isinstance(b, int) for b in found.beats)
    assert found.beats[0] <= FIDUCIAL_TOLERANCE
    assert_beats_at(found.beats[1:], times[1:-1])


# --- median_beat ---------------------------------------------------------------------------------

BEFORE = 225  # TEMPLATE_S at 500 Hz: 450 ms before the QRS peak ...
AFTER = 300  # ... and 600 ms after it
DC_UV = 200.0  # the lead's offset: every wave is measured from the PR segment, not from zero
P_UV, Q_UV, R_UV, S_UV = 150.0, -100.0, 1000.0, -300.0
P_AT_S, Q_AT_S, S_AT_S, T_AT_S = -0.16, -0.03, 0.03, 0.28
WAVE_SIGMA_S = 0.020
QRS_WAVE_SIGMA_S = 0.008
WAVE_TOLERANCE_UV = 1.0
NORMAL_ONSET, NORMAL_OFFSET = 203, 252  # where this beat's combined slope falls under 10 % for 10 ms


def pqrst_lead(
    beat_times_s: list[float] | np.ndarray,
    seconds: float = SECONDS,
    p: float = P_UV,
    q: float = Q_UV,
    r: float = R_UV,
    s: float = S_UV,
    t: float = 300.0,
    t_at_s: float = T_AT_S,
    t_sigma_s: float = 0.040,
    p_at_s: float = P_AT_S,
    dc: float = DC_UV,
) -> np.ndarray:
    """One lead of identical beats: P, Q, R, S and T as Gaussians around each R peak, on an offset."""
    n = round(seconds * RATE_HZ)
    x = np.full(n, dc)
    for c in beat_times_s:
        x += p * gaussian(n, c + p_at_s, WAVE_SIGMA_S, RATE_HZ)
        x += q * gaussian(n, c + Q_AT_S, QRS_WAVE_SIGMA_S, RATE_HZ)
        x += r * gaussian(n, c, QRS_WAVE_SIGMA_S, RATE_HZ)
        x += s * gaussian(n, c + S_AT_S, QRS_WAVE_SIGMA_S, RATE_HZ)
        x += t * gaussian(n, c + t_at_s, t_sigma_s, RATE_HZ)
    return x


BEAT_TIMES = np.arange(0.5, 9.5, 1.0)  # 60 bpm, nine beats
BEATS = tuple(int(b) for b in np.round(BEAT_TIMES * RATE_HZ))


def two_leads() -> np.ndarray:
    """An upright lead (like II) and one with an inverted P and T and a deep S (like aVR/V1)."""
    return np.stack([pqrst_lead(BEAT_TIMES), pqrst_lead(BEAT_TIMES, p=-150.0, r=200.0, s=-900.0, t=-200.0)])


def test_the_median_beat_is_the_window_around_each_qrs_peak() -> None:
    """450 ms before to 600 ms after the QRS peak, the peak at index 225: a median beat from the
    wrong window would put the P wave or the T wave in the wrong place."""
    x = two_leads()
    beat = median_beat(x, BEATS, RATE_HZ)
    assert beat is not None
    assert beat.peak == BEFORE and beat.template.shape == (2, BEFORE + AFTER)
    np.testing.assert_allclose(beat.template, x[:, BEATS[3] - BEFORE : BEATS[3] + AFTER], atol=1e-9)
    assert beat.beats_used == len(BEATS)


def test_the_median_ignores_one_ectopic_beat() -> None:
    """One beat of five is an ectopic with a huge, wide complex: the median beat is the normal one."""
    times = BEAT_TIMES[:5]
    beats = tuple(int(b) for b in np.round(times * RATE_HZ))
    x = pqrst_lead(times)
    x[beats[2] - 60 : beats[2] + 60] += 3000.0
    beat = median_beat(x[None, :], beats, RATE_HZ)
    assert beat is not None
    np.testing.assert_allclose(beat.template[0], x[beats[0] - BEFORE : beats[0] + AFTER], atol=1e-9)


def test_fewer_than_three_whole_beats_make_no_median_beat() -> None:
    """Two beats are no median: None, not a 'median' of two that is their mean."""
    x = two_leads()
    assert median_beat(x, BEATS[:2], RATE_HZ) is None
    three = median_beat(x, BEATS[:3], RATE_HZ)
    assert three is not None and three.beats_used == 3


def test_only_beats_with_a_whole_window_in_the_recording_are_used() -> None:
    """A beat too near either end has no whole window: it is left out (its missing part is not
    filled with samples of another place). The window must start at sample 0 or later and end
    before the last sample."""
    x = two_leads()
    n = x.shape[-1]
    inside = BEATS[2:5]
    assert median_beat(x, (BEFORE, *inside, n - AFTER - 1), RATE_HZ).beats_used == 5  # type: ignore[union-attr]
    assert median_beat(x, (BEFORE - 1, *inside, n - AFTER), RATE_HZ).beats_used == 3  # type: ignore[union-attr]
    assert median_beat(x, (BEFORE - 1, BEATS[3], n - AFTER), RATE_HZ) is None


def test_qrs_onset_and_offset_are_where_the_slope_of_the_qrs_ends() -> None:
    """The QRS of this beat (Q at -30 ms, R, S at +30 ms) starts 44 ms before its peak and ends
    54 ms after it: a wrong edge is a wrong QRS duration and moves every wave's baseline."""
    beat = median_beat(two_leads(), BEATS, RATE_HZ)
    assert beat is not None
    assert (beat.qrs_onset, beat.qrs_offset) == (NORMAL_ONSET, NORMAL_OFFSET)


def test_waves_are_signed_and_measured_from_the_pr_segment() -> None:
    """P, QRS and T against the PR segment (not against zero: the 200 µV offset is gone), with
    their sign: an inverted T wave stays negative, an upright one positive."""
    beat = median_beat(two_leads(), BEATS, RATE_HZ)
    assert beat is not None
    upright, inverted = beat.waves
    assert upright.p_uv == pytest.approx(P_UV, abs=WAVE_TOLERANCE_UV)
    assert upright.t_uv == pytest.approx(300.0, abs=WAVE_TOLERANCE_UV)
    assert upright.qrs_range_uv == pytest.approx(R_UV - S_UV, abs=2 * WAVE_TOLERANCE_UV)
    assert upright.qrs_polarity == pytest.approx((R_UV + S_UV) / (R_UV - S_UV), abs=0.01)
    assert upright.beat_range_uv == pytest.approx(R_UV - S_UV, abs=2 * WAVE_TOLERANCE_UV)
    assert inverted.p_uv == pytest.approx(-150.0, abs=WAVE_TOLERANCE_UV)
    assert inverted.t_uv == pytest.approx(-200.0, abs=WAVE_TOLERANCE_UV)
    assert inverted.qrs_range_uv == pytest.approx(1100.0, abs=2 * WAVE_TOLERANCE_UV)
    assert inverted.qrs_polarity == pytest.approx((200.0 - 900.0) / 1100.0, abs=0.01)


def test_an_all_negative_qrs_has_polarity_minus_one_and_a_flat_lead_zero() -> None:
    """A QS complex (no R at all) is -1, an all-R complex +1; a flat lead has no polarity (0),
    never NaN in the report."""
    x = np.stack(
        [
            pqrst_lead(BEAT_TIMES, q=0.0, r=-800.0, s=0.0),
            pqrst_lead(BEAT_TIMES, q=0.0, s=0.0),
            np.full(round(SECONDS * RATE_HZ), DC_UV),
        ]
    )
    beat = median_beat(x, BEATS, RATE_HZ)
    assert beat is not None
    qs, all_r, flat = beat.waves
    assert qs.qrs_polarity == pytest.approx(-1.0, abs=0.01)
    assert all_r.qrs_polarity == pytest.approx(1.0, abs=0.01)
    assert flat == Waves(0.0, 0.0, 0.0, 0.0, 0.0)


def test_a_recording_with_no_signal_gives_zero_waves_not_nan() -> None:
    """Every lead flat: the beat's edges fall back to all leads, every wave is 0."""
    beat = median_beat(np.zeros((2, round(SECONDS * RATE_HZ))), BEATS, RATE_HZ)
    assert beat is not None
    assert beat.waves == (Waves(0.0, 0.0, 0.0, 0.0, 0.0),) * 2
    assert beat.qrs_onset == beat.peak == beat.qrs_offset == BEFORE  # a QRS of no width


def test_a_lead_full_of_hum_does_not_widen_the_qrs() -> None:
    """The QRS edges come from the clearest leads: a lead with strong 50 Hz hum (whose slope is
    high everywhere) would make the whole beat look like QRS."""
    t = np.arange(round(SECONDS * RATE_HZ)) / RATE_HZ
    hum = pqrst_lead(BEAT_TIMES, r=300.0) + 400.0 * np.sin(2 * np.pi * 50.3 * t)
    beat = median_beat(np.vstack([hum[None, :], two_leads()]), BEATS, RATE_HZ)
    assert beat is not None
    assert (beat.qrs_onset, beat.qrs_offset) == (NORMAL_ONSET, NORMAL_OFFSET)


def test_at_a_fast_rate_the_neighbouring_beats_are_not_taken_for_p_or_t() -> None:
    """At 150 bpm the previous beat's T wave lies before this P wave and the next QRS 400 ms
    after this one: the P wave is not the previous T, the T wave is not the next R."""
    times = np.arange(0.5, 9.5, 0.4)
    beats = tuple(int(b) for b in np.round(times * RATE_HZ))
    x = pqrst_lead(times, p_at_s=-0.10, t=400.0, t_at_s=0.18, t_sigma_s=0.015)
    beat = median_beat(x[None, :], beats, RATE_HZ)
    assert beat is not None
    (waves,) = beat.waves
    assert waves.p_uv == pytest.approx(P_UV, abs=5.0)
    assert waves.t_uv == pytest.approx(400.0, abs=5.0)


def two_morphologies(times: list[float], seconds: float = SECONDS) -> np.ndarray:
    """Two leads whose QRS peaks differ in time and shape (as limb and chest leads do): an R
    wave, and a deep S wave 24 ms later, each with a little noise."""
    rng = np.random.default_rng(SEED)
    n = round(seconds * RATE_HZ)
    s_times = [t + 0.024 for t in times]
    return np.stack(
        [
            beat_lead(times, seconds=seconds) + rng.normal(0, 8, n),
            -beat_lead(s_times, seconds=seconds, qrs_uv=1500.0) + rng.normal(0, 30, n),
        ]
    )


@pytest.mark.parametrize("gain", [1e-3, 0.05, 20.0, 1e3])
def test_each_lead_s_gain_does_not_change_the_beats(gain: float) -> None:
    """Leads are weighed by how clearly their QRS stands out, not by their voltage: a
    low-voltage lead (or one in mV rather than µV) gives the same beats, at the same samples."""
    times = regular_times()
    x = two_morphologies(times)
    reference = detect_qrs(x, RATE_HZ)
    assert len(reference.beats) == len(times) and sorted(reference.leads_used) == [0, 1]
    for lead in (0, 1):
        scaled = x.copy()
        scaled[lead] *= gain
        assert detect_qrs(scaled, RATE_HZ) == reference
    assert detect_qrs(x * gain, RATE_HZ) == reference


def test_a_beat_seen_in_only_one_lead_is_found_however_small_that_lead() -> None:
    """An ectopic beat visible only in a 0.2 mV lead, next to a 2 mV lead that does not show it:
    each lead counts by its own QRS level, so the beat is not lost under the big lead."""
    times = regular_times()
    ectopic = (times[5] + times[6]) / 2
    rng = np.random.default_rng(SEED)
    n = round(SECONDS * RATE_HZ)
    big = beat_lead(times, qrs_uv=2000.0, t_uv=0.0) + rng.normal(0, 20, n)
    small = beat_lead(sorted([*times, ectopic]), qrs_uv=200.0, t_uv=0.0) + rng.normal(0, 2, n)
    found = detect_qrs(np.stack([big, small]), RATE_HZ)
    assert_beats_at(found.beats, sorted([*times, ectopic]))


def test_the_only_lead_dying_half_way_gives_no_beats_rather_than_noise_beats() -> None:
    """When the one lead there is lost its electrode after 4 s, no beats are made up from its
    noise (the quality check then says so); nothing is detected."""
    times = regular_times()
    dying = beat_lead(times)
    dying[round(4 * RATE_HZ) :] = np.random.default_rng(SEED).normal(0, 2, dying.size - round(4 * RATE_HZ))
    assert detect_qrs(dying[None, :], RATE_HZ) == QrsDetection((), None, ())


SLOW_RR_S = 2.0  # 30 bpm: the slowest rhythm whose every 2 s window holds a QRS


def test_tall_t_waves_at_30_bpm_are_not_counted_as_beats() -> None:
    """At 30 bpm a tall T wave (0.9 mV) follows each QRS: the QRS level comes from 2 s windows,
    each holding a QRS, so the T waves stay under the threshold and the rate is not doubled."""
    times = list(np.arange(0.5, SECONDS, SLOW_RR_S))
    x = np.zeros(round(SECONDS * RATE_HZ))
    for c in times:
        x += QRS_UV * gaussian(x.size, c, QRS_SIGMA_S, RATE_HZ) + 900.0 * gaussian(x.size, c + 0.3, 0.03, RATE_HZ)
    found = detect_qrs(x[None, :], RATE_HZ)
    assert_beats_at(found.beats, times)
    assert found.heart_rate_bpm == pytest.approx(30.0, abs=0.2)


def test_a_small_beat_is_searched_for_with_only_three_beats_found() -> None:
    """A short strip with three clear beats and a long gap: the small beat in the gap is found."""
    strong = [0.4, 1.0, 3.6]
    x = beat_lead(strong, seconds=4.2, t_uv=0.0) + beat_lead([2.3], seconds=4.2, qrs_uv=0.4 * QRS_UV, t_uv=0.0)
    found = detect_qrs(x[None, :], RATE_HZ)
    assert_beats_at(found.beats, [0.4, 1.0, 2.3, 3.6])


def test_a_gap_of_exactly_1_6_rr_is_searched() -> None:
    """RR 1 s and one gap of 1.6 s: 'an RR this many times the median' includes the boundary."""
    times = [0.5, 1.5, 2.5, 3.5, 4.5, 6.1, 7.1, 8.1]
    x = beat_lead(times, t_uv=0.0) + beat_lead([5.3], qrs_uv=0.4 * QRS_UV, t_uv=0.0)
    found = detect_qrs(x[None, :], RATE_HZ)
    assert_beats_at(found.beats, sorted([*times, 5.3]))


def test_a_blip_exactly_one_refractory_period_after_a_beat_is_not_added() -> None:
    """Search-back looks strictly more than 220 ms after the beat before the gap: a blip exactly
    220 ms after a beat is within its refractory period, not a beat."""
    times = [0.5, 1.3, 2.1, 2.9, 3.7, 5.3, 6.1, 6.9, 7.7, 8.5]
    blip = 3.7 + qrs.REFRACTORY_S
    x = beat_lead(times, t_uv=0.0) + beat_lead([blip], qrs_uv=0.4 * QRS_UV, t_uv=0.0)
    assert_beats_at(detect_qrs(x[None, :], RATE_HZ).beats, times)


def test_a_low_voltage_lead_at_its_rail_still_has_its_beats_found() -> None:
    """The rail stretch's energy is zeroed, not set to some µV² value: a lead recorded in mV-sized
    units keeps its beats around an excluded stretch."""
    times = regular_times()
    x, exclude = railed_beats(times, 3.0, 5.0)
    found = detect_qrs(x[None, :] * 1e-3, RATE_HZ, exclude)
    assert_beats_at(found.beats, [t for t in times if not 3.0 <= t < 5.0])


def test_a_beat_cut_by_the_recording_s_start_is_at_sample_zero() -> None:
    """A QRS whose peak is the first sample is placed there, not one sample in."""
    times = [0.0, *regular_times(first_s=0.8)]
    found = detect_qrs(beat_lead(times, t_uv=0.0)[None, :], RATE_HZ)
    assert found.beats[0] == 0
    assert_beats_at(found.beats[1:], times[1:])


def test_a_beat_in_the_last_60_ms_stays_inside_the_recording() -> None:
    """A QRS 40 ms before the end: its search window runs past the last sample, which is clipped,
    so the beat is found at its peak and no index outside the recording is read."""
    times = [*regular_times(), SECONDS - 0.04]
    found = detect_qrs(beat_lead(times, t_uv=0.0)[None, :], RATE_HZ)
    assert_beats_at(found.beats, times)


def test_beats_are_found_around_a_rail_stretch_longer_than_half_the_recording() -> None:
    """Five of ten seconds at the rail: the beats in the other half are still found (the rail's
    samples weigh nothing in the lead's background, rather than a negative amount)."""
    times = regular_times()
    x, exclude = railed_beats(times, 3.1, 8.0)
    found = detect_qrs(x[None, :], RATE_HZ, exclude)
    assert_beats_at(found.beats, [t for t in times if not 3.1 <= t < 8.0])


QRS_HALF_MAX = 60  # samples: the QRS edge search stops 120 ms either side of the peak


def test_a_very_wide_complex_has_its_edges_at_120_ms_from_the_peak() -> None:
    """A complex whose slope never falls (300 ms wide, e.g. a ventricular rhythm or an artefact)
    gets onset and offset 120 ms either side of its peak: never beyond, never at the peak."""
    t = np.arange(round(SECONDS * RATE_HZ)) / RATE_HZ
    x = np.zeros(t.size)
    for c in BEAT_TIMES:
        x += 1500.0 * np.clip(1 - np.abs(t - c) / 0.15, 0, None)
    beat = median_beat(x[None, :], BEATS, RATE_HZ)
    assert beat is not None
    assert (beat.qrs_onset, beat.qrs_offset) == (BEFORE - QRS_HALF_MAX, BEFORE + QRS_HALF_MAX)


def test_with_a_long_qt_at_75_bpm_the_previous_t_wave_is_not_this_p_wave() -> None:
    """T 450 ms after the QRS at 75 bpm: the previous beat's T ends 350 ms before this QRS, just
    outside the P search (200 ms before the onset): the P wave stays the P wave."""
    times = np.arange(0.5, 9.5, 0.8)
    beats = tuple(int(b) for b in np.round(times * RATE_HZ))
    beat = median_beat(pqrst_lead(times, t_at_s=0.45)[None, :], beats, RATE_HZ)
    assert beat is not None
    assert beat.waves[0].p_uv == pytest.approx(P_UV, abs=5.0)
    assert beat.waves[0].t_uv == pytest.approx(300.0, abs=5.0)


U_UV = 150.0
U_AFTER_S = 0.50


def test_an_inverted_t_wave_followed_by_a_u_wave_stays_inverted() -> None:
    """The T search ends 400 ms after the QRS offset: a U wave 500 ms after the QRS (larger
    than the inverted T, as in hypokalaemia) is not measured as an upright T."""
    n = round(SECONDS * RATE_HZ)
    x = pqrst_lead(BEAT_TIMES, t=-100.0) + U_UV * sum(gaussian(n, c + U_AFTER_S, 0.02, RATE_HZ) for c in BEAT_TIMES)
    beat = median_beat(x[None, :], BEATS, RATE_HZ)
    assert beat is not None
    assert beat.waves[0].t_uv == pytest.approx(-100.0, abs=5.0)


PACING_SPIKE_UV = 3000.0
PACING_SPIKE_BEFORE = 80  # samples: an atrial pacing spike 160 ms before the QRS


def test_a_pacing_spike_before_the_p_wave_does_not_shrink_the_qrs() -> None:
    """The QRS edges are relative to the steepest slope within 50 ms of the peak: an atrial
    pacing spike (steeper than any QRS) 160 ms earlier does not make the QRS look flat."""
    x = pqrst_lead(BEAT_TIMES)
    plain = median_beat(x[None, :], BEATS, RATE_HZ)
    for b in BEATS:
        x[b - PACING_SPIKE_BEFORE] += PACING_SPIKE_UV
    paced = median_beat(x[None, :], BEATS, RATE_HZ)
    assert plain is not None and paced is not None
    assert (paced.qrs_onset, paced.qrs_offset) == (plain.qrs_onset, plain.qrs_offset)
    assert paced.qrs_offset - paced.qrs_onset >= round(0.06 * RATE_HZ)


def test_a_deep_s_lead_alone_has_its_qrs_edges_from_its_s_wave() -> None:
    """A lead whose steepest part is the S wave after the peak (V1, aVR): the QRS ends where the
    S wave's slope ends, 54 ms after the peak, not earlier (which would shorten the QRS)."""
    x = pqrst_lead(BEAT_TIMES, p=-150.0, r=200.0, s=-900.0, t=-200.0)
    beat = median_beat(x[None, :], BEATS, RATE_HZ)
    assert beat is not None
    assert (beat.qrs_onset, beat.qrs_offset) == (212, NORMAL_OFFSET)


CLOSE_BEATS = tuple(range(300, 4000, 20))  # 40 ms apart: no room for a P or a T wave


def test_beats_too_close_for_p_and_t_waves_give_zero_p_and_t() -> None:
    """Beats 40 ms apart (a detector gone wrong): the P and T windows are empty, so P and T are 0,
    never a neighbouring QRS's size."""
    beat = median_beat(pqrst_lead(BEAT_TIMES)[None, :], CLOSE_BEATS, RATE_HZ)
    assert beat is not None
    assert (beat.waves[0].p_uv, beat.waves[0].t_uv) == (0.0, 0.0)


def test_a_deep_q_lead_has_its_qrs_onset_from_its_q_wave() -> None:
    """A lead with a deep Q wave (an old infarct) and a small R: its steepest slope is before the
    peak, so the QRS starts where the Q wave starts, 52 ms before the peak."""
    beat = median_beat(pqrst_lead(BEAT_TIMES, q=-900.0, r=200.0, s=0.0)[None, :], BEATS, RATE_HZ)
    assert beat is not None
    assert (beat.qrs_onset, beat.qrs_offset) == (199, 234)


def test_the_qrs_of_an_rsr_complex_ends_after_its_r_prime() -> None:
    """An RSR' complex (right bundle branch block: a tall R' 70 ms after the R): the QRS ends
    after the R' (98 ms after the peak), so its duration is not halved."""
    n = round(SECONDS * RATE_HZ)
    r_prime = 900.0 * sum(gaussian(n, c + 0.07, QRS_WAVE_SIGMA_S, RATE_HZ) for c in BEAT_TIMES)
    beat = median_beat((pqrst_lead(BEAT_TIMES, q=0.0, r=300.0, s=-200.0) + r_prime)[None, :], BEATS, RATE_HZ)
    assert beat is not None
    assert (beat.qrs_onset, beat.qrs_offset) == (214, 274)


def test_a_peaked_t_wave_does_not_change_the_qrs_edges() -> None:
    """A small QRS with a tall, peaked T wave (hyperkalaemia: steeper than the QRS): the QRS edges
    are those of the same QRS with a normal T wave."""
    small_qrs = {"q": 0.0, "r": 200.0, "s": 0.0}
    normal = median_beat(pqrst_lead(BEAT_TIMES, **small_qrs)[None, :], BEATS, RATE_HZ)
    peaked = pqrst_lead(BEAT_TIMES, **small_qrs, t=600.0, t_sigma_s=0.02, t_at_s=0.25)
    beat = median_beat(peaked[None, :], BEATS, RATE_HZ)
    assert normal is not None and beat is not None
    assert (beat.qrs_onset, beat.qrs_offset) == (normal.qrs_onset, normal.qrs_offset) == (214, 237)


def smeared_leads() -> np.ndarray:
    """Five leads by clarity: three with a narrow QRS, a fourth a little less clear with a wider
    QRS, a fifth less clear still with the widest (each with the same 3 µV noise)."""
    rng = np.random.default_rng(SEED)
    n = round(SECONDS * RATE_HZ)
    leads = []
    for sigma_s, size in [(0.008, 1120.0), (0.008, 1040.0), (0.008, 1000.0), (0.016, 1920.0), (0.024, 2760.0)]:
        x = np.full(n, DC_UV) + rng.normal(0, 3, n)
        for c in BEAT_TIMES:
            x += size * gaussian(n, c, sigma_s, RATE_HZ)
        leads.append(x)
    return np.stack(leads)


def test_the_qrs_edges_come_from_the_four_clearest_leads() -> None:
    """The edges are the four clearest leads' together: the fourth (wider) lead counts, the
    fifth and least clear does not widen the QRS further."""
    beat = median_beat(smeared_leads(), BEATS, RATE_HZ)
    assert beat is not None
    assert (beat.qrs_onset, beat.qrs_offset) == (208, 243)


Q_AND_R_ONSET, Q_AND_R_OFFSET = 199, 249  # an upright lead and a deep-Q lead at 30 % of its size


@pytest.mark.parametrize("gain", [1e-3, 1.0, 1e3])
def test_the_qrs_edges_do_not_depend_on_the_leads_gain(gain: float) -> None:
    """The same leads in mV or in nV-sized units: the same edges (a low-voltage ECG is not
    read as having no clear lead, which would let the hum lead widen the QRS)."""
    t = np.arange(round(SECONDS * RATE_HZ)) / RATE_HZ
    hum = pqrst_lead(BEAT_TIMES, r=300.0) + 400.0 * np.sin(2 * np.pi * 50.3 * t)
    beat = median_beat(np.vstack([hum[None, :], pqrst_lead(BEAT_TIMES)[None, :]]) * gain, BEATS, RATE_HZ)
    assert beat is not None
    assert (beat.qrs_onset, beat.qrs_offset) == (212, 250)
    five = median_beat(smeared_leads() * gain, BEATS, RATE_HZ)
    assert five is not None and (five.qrs_onset, five.qrs_offset) == (208, 243)
    q_and_r = np.stack([pqrst_lead(BEAT_TIMES), 0.3 * pqrst_lead(BEAT_TIMES, q=-900.0, r=200.0, s=0.0)])
    two = median_beat(q_and_r * gain, BEATS, RATE_HZ)
    assert two is not None and (two.qrs_onset, two.qrs_offset) == (Q_AND_R_ONSET, Q_AND_R_OFFSET)


LOW_RATE_HZ = 100.0  # the lowest rate the quality check accepts: 10 ms is one sample


def test_at_100_hz_the_qrs_edges_are_where_the_slope_ends() -> None:
    """At 100 Hz the 10 ms of quiet that ends the QRS is one sample: the edges are not pushed a
    sample outwards."""
    beats = tuple(int(b) for b in np.round(BEAT_TIMES * LOW_RATE_HZ))
    n = round(SECONDS * LOW_RATE_HZ)
    x = np.zeros(n)
    for c in BEAT_TIMES:
        x += R_UV * gaussian(n, c, 0.02, LOW_RATE_HZ)
    beat = median_beat(x[None, :], beats, LOW_RATE_HZ)
    assert beat is not None and beat.peak == 45
    assert (beat.qrs_onset, beat.qrs_offset) == (39, 52)


ST_DROP_UV = -500.0  # the QRS ends in a depressed ST segment ...
ST_SLOPE_UV_PER_S = -1500.0  # ... that keeps sloping down (1.5 µV/ms: slower than any QRS slope)


def test_the_qrs_size_includes_its_last_sample_and_nothing_after() -> None:
    """A QRS ending in a depressed, downsloping ST segment (ischaemia): its deepest point is its
    last sample (the offset). The QRS range runs from onset to offset inclusive, neither dropping
    that sample nor adding the ST segment's further descent."""
    n = round(SECONDS * RATE_HZ)
    t = np.arange(n) / RATE_HZ
    x = np.zeros(n)
    for c in BEAT_TIMES:
        x += 300.0 * gaussian(n, c, QRS_WAVE_SIGMA_S, RATE_HZ)
        after = t - (c + 0.02)
        st = 1 / (1 + np.exp(-np.clip(after / 0.003, -50, 50)))  # a steep step down at +20 ms ...
        st -= 1 / (1 + np.exp(-np.clip((after - 0.4) / 0.05, -50, 50)))  # ... back up by +500 ms
        x += ST_DROP_UV * st + ST_SLOPE_UV_PER_S * np.clip(after, 0, 0.2) * st
    beat = median_beat(x[None, :], BEATS, RATE_HZ)
    assert beat is not None
    qrs = beat.template[0, beat.qrs_onset : beat.qrs_offset + 1]
    assert int(np.argmin(qrs)) == qrs.size - 1  # the deepest point is the offset sample
    assert beat.waves[0].qrs_range_uv == pytest.approx(float(np.ptp(qrs)), abs=1e-9)


def test_one_beat_listed_three_times_gives_its_qrs_but_no_p_t_or_beat_range() -> None:
    """The same QRS given three times (a caller's duplicate): there is no RR to bound the P and T
    windows, so P, T and the beat's range are 0 rather than measured from a neighbour."""
    beat = median_beat(two_leads(), (BEATS[3],) * 3, RATE_HZ)
    assert beat is not None and beat.beats_used == 3
    upright = beat.waves[0]
    assert (upright.p_uv, upright.t_uv, upright.beat_range_uv) == (0.0, 0.0, 0.0)
    assert upright.qrs_range_uv == pytest.approx(R_UV - S_UV, abs=2 * WAVE_TOLERANCE_UV)


@pytest.mark.parametrize("rate_hz", [110.0, 125.0, 140.0, 500.0])
def test_an_rsr_complex_keeps_its_r_prime_at_low_sampling_rates(rate_hz: float) -> None:
    """Regression (found by the mutation bench): at 110-149 Hz '10 ms of quiet' rounded to one
    sample, and the one low-slope sample at the S trough ended the QRS: an RSR' complex (right
    bundle branch block) measured 32-36 ms instead of ~100 ms, its R' left out of the QRS.
    Two samples at least: the QRS ends after the R' (70 ms after the R) at every accepted rate."""
    times = BEAT_TIMES + 0.0013  # beats between samples, as a cart's clock puts them
    beats = tuple(int(b) for b in np.round(times * rate_hz))
    n = round(SECONDS * rate_hz)
    x = np.zeros(n)
    for c in times:
        x += 300.0 * gaussian(n, c, QRS_WAVE_SIGMA_S, rate_hz) - 200.0 * gaussian(
            n, c + 0.03, QRS_WAVE_SIGMA_S, rate_hz
        )
        x += 900.0 * gaussian(n, c + 0.07, QRS_WAVE_SIGMA_S, rate_hz) + 300.0 * gaussian(n, c + 0.3, 0.04, rate_hz)
    beat = median_beat(x[None, :], beats, rate_hz)
    assert beat is not None
    offset_s = (beat.qrs_offset - beat.peak) / rate_hz
    assert 0.09 <= offset_s <= 0.12
    assert beat.waves[0].qrs_range_uv > 1000.0  # the R' (900 µV) is inside the QRS


SIMULATOR_QRS_HALF_S = 0.04  # a patient simulator's triangular 80 ms QRS on an exactly flat baseline


@pytest.mark.parametrize("gain", [1.0, 1e-3])
def test_a_simulator_s_exactly_flat_lead_is_the_clearest(gain: float) -> None:
    """A patient simulator (used to test carts in the clinic) draws an exactly flat baseline: its
    slope's noise floor is 0, and that makes its lead the clearest, not one to leave out (in µV or
    in mV-sized units alike); the QRS edges are the simulator's own, not the noisy lead's."""
    n = round(SECONDS * RATE_HZ)
    t = np.arange(n) / RATE_HZ
    simulator = np.zeros(n)
    for c in BEAT_TIMES:
        simulator += R_UV * np.clip(1 - np.abs(t - c) / SIMULATOR_QRS_HALF_S, 0, None)
    noisy = pqrst_lead(BEAT_TIMES) + np.random.default_rng(SEED).normal(0, 5, n)
    alone = median_beat(simulator[None, :] * gain, BEATS, RATE_HZ)
    both = median_beat(np.stack([noisy, simulator]) * gain, BEATS, RATE_HZ)
    assert alone is not None and both is not None
    assert (both.qrs_onset, both.qrs_offset) == (alone.qrs_onset, alone.qrs_offset) == (205, 246)


STRIP_S = 1.088  # a 544-sample strip
STEP_AT_S = 1.08  # an electrode making contact 8 ms before the strip ends: a step, no QRS in sight


def test_a_step_at_the_very_end_of_a_strip_is_no_beat() -> None:
    """Regression for a path no test reached: the step's energy only rises to the strip's last
    sample, so its envelope has no peak at all. No beat is made of it (and no crash); the lead
    is still the one that was looked at."""
    t = np.arange(round(STRIP_S * RATE_HZ)) / RATE_HZ
    x = np.where(t >= STEP_AT_S, QRS_UV, 0.0)
    assert detect_qrs(x[None, :], RATE_HZ) == QrsDetection((), None, (0,))


def test_a_slow_wave_at_the_end_of_a_strip_is_no_beat() -> None:
    """A slow, 100 ms-wide wave (a T wave, a sway of the baseline) cut by the strip's end: its
    energy is largest at the very edge, and its peaks inside the strip are far under 30 % of
    that. No beat is made of it (none survives to be placed on a QRS peak)."""
    n = 661
    x = QRS_UV * gaussian(n, 1.2837, 0.108, RATE_HZ)
    assert detect_qrs(x[None, :], RATE_HZ) == QrsDetection((), None, (0,))


MARGIN = round(qrs.EXCLUDE_MARGIN_S * RATE_HZ)  # 75 samples either side of an excluded stretch
SEARCH = round(qrs.FIDUCIAL_SEARCH_S * RATE_HZ)  # 30 samples either side of a beat's energy peak
HIDDEN_BY = 32  # samples from the last (first) visible energy sample to a QRS peak in the margin


def test_a_qrs_in_an_exclusion_margin_is_placed_from_its_visible_energy_at_most_60_ms_away() -> None:
    """A cart flags lead-off for 0.6 s just after one QRS and just before the next: both QRS peaks
    sit in the stretch's 150 ms margin, where energy is not looked at. Each beat is found from the
    edge of its energy that is still visible (the margin is exactly 150 ms, not a sample more or
    less) and moved towards its QRS peak by at most 60 ms: the search stops at its window's last
    sample and never walks on into the margin (onto a rail's step, say)."""
    before_peak = round(3.7 * RATE_HZ)
    start = before_peak - HIDDEN_BY + MARGIN + 1  # the last visible sample is start - MARGIN - 1
    end = start + round(0.6 * RATE_HZ)
    after_peak = end + MARGIN - HIDDEN_BY  # the first visible sample is end - 1 + MARGIN + 1
    times = [
        *regular_times(seconds=4.0),
        before_peak / RATE_HZ,
        after_peak / RATE_HZ,
        *(after_peak / RATE_HZ + RR_S * k for k in (1, 2, 3)),
    ]
    x = beat_lead(times, t_uv=0.0)
    exclude = np.zeros(x.size, dtype=bool)
    exclude[start:end] = True
    found = detect_qrs(x[None, :], RATE_HZ, exclude)
    assert found.beats[4] == start - MARGIN - 1 + SEARCH == before_peak - 2
    assert found.beats[5] == end + MARGIN - SEARCH == after_peak + 2
    assert_beats_at(found.beats, times)


CONTACT_STEP_UV = 2 * QRS_UV  # an electrode making contact in the strip's last 8 ms: a step twice a QRS
CONTACT_STEP_SAMPLES = 4


def test_a_beat_at_the_strip_s_start_is_never_moved_onto_its_end() -> None:
    """A QRS at the very first sample, and a large step in the strip's last 8 ms (no beat): the
    search around the first beat is clipped to the strip's start, never wrapped round to its end,
    so the beat stays at sample 0 (not at the step, nor at index -1)."""
    times = [0.0, *regular_times(first_s=0.8)]
    x = beat_lead(times, t_uv=0.0)
    x[-CONTACT_STEP_SAMPLES:] += CONTACT_STEP_UV
    found = detect_qrs(x[None, :], RATE_HZ)
    assert found.beats[0] == 0
    assert_beats_at(found.beats, times)


S_LAG = 20  # samples (40 ms): one lead's S wave after the other lead's R


def test_a_beat_whose_deflection_runs_past_the_strip_s_end_is_at_its_last_sample() -> None:
    """Two leads, an R wave in one and an S wave 40 ms later in the other; the last beat's R is
    40 ms before the strip ends, so its S wave is cut by the end: the beat's largest deflection
    is the last sample, and that is where it is placed (not one sample in, not outside)."""
    n = round(SECONDS * RATE_HZ)
    times = [*regular_times(), (n - S_LAG) / RATE_HZ]
    r_lead = beat_lead(times, t_uv=0.0)
    s_lead = -beat_lead([t + S_LAG / RATE_HZ for t in times], t_uv=0.0)
    found = detect_qrs(np.stack([r_lead, s_lead]), RATE_HZ)
    assert found.beats[-1] == n - 1
    assert len(found.beats) == len(times)


ELECTRODE_POP_UV = 10 * QRS_UV  # one sample: an electrode pop, inside a stretch the cart flagged
LATE_S_S = 0.040  # the S wave of the second lead, 40 ms after the first lead's R
WIDE_S_SIGMA_S = 0.015


def test_an_electrode_pop_in_an_excluded_stretch_does_not_move_the_beats() -> None:
    """Each lead's QRS size (what its deflection counts against when a beat is placed) is its
    typical 2 s peak, which one artefact does not move: a pop in a flagged stretch of the R-wave
    lead leaves every beat on its R wave, rather than shrinking that lead's weight so the beats
    slide 40 ms to the other lead's S wave (a wrong fiducial for every median beat and interval)."""
    times = regular_times()
    n = round(SECONDS * RATE_HZ)
    r_lead = beat_lead(times, t_uv=0.0)
    s_lead = -sum(1500.0 * gaussian(n, t + LATE_S_S, WIDE_S_SIGMA_S, RATE_HZ) for t in times)
    x = np.stack([r_lead, s_lead])
    exclude = np.zeros(n, dtype=bool)
    exclude[round(3.3 * RATE_HZ) : round(3.5 * RATE_HZ)] = True
    clean = detect_qrs(x, RATE_HZ, exclude)
    x[0, round(3.4 * RATE_HZ)] += ELECTRODE_POP_UV
    popped = detect_qrs(x, RATE_HZ, exclude)
    assert popped == clean and sorted(popped.leads_used) == [0, 1]
    assert_beats_at(popped.beats, times)


BLIP_BEFORE_BEAT = 92  # samples (184 ms): the blip's first energy peak is then 220 ms before the beat's


def test_a_blip_exactly_one_refractory_period_before_a_beat_is_not_added() -> None:
    """Search-back looks strictly more than 220 ms before the beat after the gap too: a blip
    whose energy peaks exactly 220 ms before that beat's (its QRS 184 ms before: each QRS has an
    energy peak on either flank, and the beat's is its later one) is within that beat's
    refractory period, not a beat."""
    times = [0.5, 1.3, 2.1, 2.9, 3.7, 5.3, 6.1, 6.9, 7.7, 8.5]
    blip = 5.3 - BLIP_BEFORE_BEAT / RATE_HZ
    x = beat_lead(times, t_uv=0.0) + beat_lead([blip], qrs_uv=0.4 * QRS_UV, t_uv=0.0)
    assert_beats_at(detect_qrs(x[None, :], RATE_HZ).beats, times)


CROSSTALK_GAIN = 1e-6  # -120 dB: a disconnected input's faint copy of another lead's beats


def test_a_faint_crosstalk_lead_with_a_digitally_flat_baseline_is_not_the_one_beats_come_from() -> None:
    """An input with no electrode on it can carry a millionth of another lead's QRS on an exactly
    flat (digital zero) baseline. Its zero background would make it infinitely clear: the floor
    under each lead's background is a share of the largest lead's QRS level, so this lead is
    measured against that, and the beats come from the lead that really carries them."""
    n = round(SECONDS * RATE_HZ)
    t = np.arange(n) / RATE_HZ
    times = regular_times()
    crosstalk = sum(QRS_UV * np.clip(1 - np.abs(t - c) / SIMULATOR_QRS_HALF_S, 0, None) for c in times)
    real = beat_lead(times) + np.random.default_rng(SEED).normal(0, 5, n)
    found = detect_qrs(np.stack([real, CROSSTALK_GAIN * crosstalk]), RATE_HZ)
    assert found.leads_used == (0,)
    assert_beats_at(found.beats, times)


SINE_UV = 300.0


@pytest.mark.parametrize("rate_hz", [250.0, 500.0, 1000.0])
@pytest.mark.parametrize("sine_hz", [0.5, 2.5, 8.0, 10.0, 12.0])
def test_a_pure_sine_is_no_heartbeat(sine_hz: float, rate_hz: float) -> None:
    """Regression (found by the mutation bench): a pure 10 Hz sine at 500 Hz (a tremor, a signal
    generator's test tone) gave 23 'beats' and a heart rate of 134 bpm; 8 Hz and 12 Hz gave
    209-242 bpm at every rate. A sine's energy envelope is a raised cosine, whose peak is at most
    twice its median: a lead whose QRS stands out no more than that has nothing beat-like, so
    no beats and no rate are stated (a slow sway, 0.5 or 2.5 Hz, already gave none)."""
    t = np.arange(round(SECONDS * rate_hz)) / rate_hz
    x = SINE_UV * np.sin(2 * np.pi * sine_hz * t + 0.3)
    assert detect_qrs(x[None, :], rate_hz) == QrsDetection((), None, ())
    assert qrs.MIN_LEAD_CLARITY == 2.0


DRIFT_UV_PER_SAMPLE = 2.0  # 1 mV/s of baseline drift (breathing, a moving cable)


def simulator_beats(seconds: float = SECONDS, half_s: float = SIMULATOR_QRS_HALF_S) -> np.ndarray:
    """A patient simulator's triangular QRS at each of BEAT_TIMES, exactly 0 elsewhere."""
    n = round(seconds * RATE_HZ)
    t = np.arange(n) / RATE_HZ
    return sum(R_UV * np.clip(1 - np.abs(t - c) / half_s, 0, None) for c in BEAT_TIMES) + np.zeros(n)


def test_on_a_drifting_baseline_waves_are_measured_from_the_middle_of_the_pr_segment() -> None:
    """The isoelectric level is the median of the PR segment from 40 to 10 ms before the QRS
    onset, both ends included: on a baseline drifting 1 mV/s that is the drift's value 25 ms
    before the onset, not half a sample later (which would move every P and T amplitude)."""
    x = simulator_beats() + DRIFT_UV_PER_SAMPLE * np.arange(round(SECONDS * RATE_HZ))
    beat = median_beat(x[None, :], BEATS, RATE_HZ)
    assert beat is not None
    row, onset = beat.template[0], beat.qrs_onset
    first, last = (
        onset - round(median_beat_module.BASELINE_S[0] * RATE_HZ),
        onset - round(median_beat_module.BASELINE_S[1] * RATE_HZ),
    )
    level = (row[first] + row[last]) / 2
    p_first = onset - round(median_beat_module.P_SEARCH_S[0] * RATE_HZ)  # the drift's lowest point
    assert beat.waves[0].p_uv == pytest.approx(row[p_first] - level, abs=1e-6)
    assert row[last + 1] - row[last] == pytest.approx(DRIFT_UV_PER_SAMPLE)  # still the drift there


WIDE_SIMULATOR_QRS_HALF_S = 0.10  # a 200 ms complex: its steepest slope 40 % of the 80 ms one's


def test_of_two_exactly_flat_leads_the_edges_come_from_the_clearer() -> None:
    """Two simulator leads, both on an exactly flat baseline (zero noise floor, so clarity is the
    steepest slope against a floor shared by all leads): the one with a slow 200 ms complex is
    less than half as clear and does not widen the QRS, which is the 80 ms complex's."""
    narrow = simulator_beats()
    beat = median_beat(np.stack([simulator_beats(half_s=WIDE_SIMULATOR_QRS_HALF_S), narrow]), BEATS, RATE_HZ)
    alone = median_beat(narrow[None, :], BEATS, RATE_HZ)
    assert beat is not None and alone is not None
    assert (beat.qrs_onset, beat.qrs_offset) == (alone.qrs_onset, alone.qrs_offset) == (205, 246)


@pytest.mark.parametrize(
    ("envelope", "peaks"),
    [
        pytest.param([0.0, 1.0, 3.0, 3.0, 2.0, 0.0], [2], id="a plateau gives its first sample"),
        pytest.param([0.0, 2.0, 2.0, 2.0, 1.0, 4.0, 1.0], [1, 5], id="two peaks, one flat-topped"),
        pytest.param([5.0, 3.0, 1.0, 2.0, 6.0], [], id="the ends are never peaks"),
        pytest.param([1.0, 2.0, 1.0], [1], id="three samples"),
        pytest.param([1.0, 2.0], [], id="two samples"),
        pytest.param([], [], id="empty"),
    ],
)
def test_local_peaks_are_the_first_sample_of_each_top(envelope: list[float], peaks: list[int]) -> None:
    """A QRS's energy peak, where its beat is looked for (60 ms either side): an exactly flat top
    gives one candidate, its first sample (as documented), not its last nor one per sample; a
    rise that runs into a strip's end is no peak (the beat-less step at a strip's end)."""
    assert local_peaks(np.asarray(envelope)).tolist() == peaks


def test_a_rail_stretch_in_one_lead_does_not_move_the_beats_to_another_lead() -> None:
    """Regression (found by the mutation bench): each lead's QRS size was its 99th percentile,
    which a 2 s rail stretch's edges (over 1 % of the samples) set: the R-wave lead's say shrank
    and every beat slid 40 ms onto the other lead's S wave. The size is now the lead's typical
    2 s peak, as for the energy: the beats stay on the R wave."""
    times = regular_times()
    n = round(SECONDS * RATE_HZ)
    r_lead = beat_lead(times, t_uv=0.0)
    s_lead = -sum(1500.0 * gaussian(n, t + LATE_S_S, WIDE_S_SIGMA_S, RATE_HZ) for t in times)
    stretch = slice(round(3.0 * RATE_HZ), round(5.0 * RATE_HZ))
    r_lead[stretch] = RAIL_UV
    exclude = np.zeros(n, dtype=bool)
    exclude[stretch] = True
    found = detect_qrs(np.stack([r_lead, s_lead]), RATE_HZ, exclude)
    assert sorted(found.leads_used) == [0, 1]
    assert_beats_at(found.beats, [t for t in times if not 3.0 <= t < 5.0])
