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
from devices.ecg.qrs import REFRACTORY_S, detect_qrs
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


@pytest.mark.parametrize("tall", [[3, 8], [2, 7]])
def test_a_tall_beats_t_wave_is_not_a_beat(tall: list[int]) -> None:
    """A beat four times as tall brings a T wave four times as tall (16x its energy): against the
    ordinary beats' level it passes the threshold 280 ms after the QRS. Pan and Tompkins' test
    (under a quarter of the energy of the beat 360 ms before it) leaves it out. Beats 3 and 8:
    most 2 s windows hold only ordinary beats, the level is theirs. Beats 2 and 7 sit on windows'
    edges and lift two windows' peaks each: the level is the tall beats', the first pass sees only
    those two, and the hidden-beat search must start from two beats."""
    times = beat_times()
    sizes = np.ones(times.size)
    sizes[tall] = 4.0
    found = detect_qrs(twelve(times, sizes, t_uv=400.0, t_sigma_s=0.03), RATE_HZ)
    assert_found(found.beats, times)


def test_a_beat_360_ms_after_a_tall_ectopic_is_a_beat_not_its_t_wave() -> None:
    """A short-coupled ordinary beat exactly 360 ms after a beat three times as tall (a ninth of
    its energy): only peaks closer than 360 ms are taken for the tall beat's T wave, so this beat
    is counted (noise-free leads without T waves: the energy peaks are exactly 360 ms apart)."""
    times = beat_times()
    couplet = times[4] + 0.36
    t = np.sort(np.r_[times, couplet])
    sizes = np.where(np.isclose(t, times[4]), 3.0, 1.0)
    found = detect_qrs(twelve(t, sizes, noise_uv=0.0, t_uv=0.0), RATE_HZ)
    assert_found(found.beats, t)


def test_a_late_t_wave_at_50_bpm_is_not_a_hidden_beat() -> None:
    """A long QT at 50 bpm: a peaked T wave (0.6 mV) 400 ms after each QRS, past the 360 ms of
    Pan and Tompkins' T-wave test but inside the T zone (0.40 s x sqrt(1.2 s) = 438 ms): it is not
    taken for a hidden beat in every gap, so the rate is 50, not doubled to 100."""
    times = beat_times(rr_s=1.2)
    found = detect_qrs(twelve(times, np.ones(times.size), t_uv=600.0, t_sigma_s=0.03, t_after_s=0.40), RATE_HZ)
    assert_found(found.beats, times)
    assert found.heart_rate_bpm == pytest.approx(50.0, abs=0.5)


def bumps_in_gaps(rr_s: float, holding: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Tall beats (twice the height) every `rr_s`, and an ordinary one half-way through the gaps
    listed in `holding`: the signal and the tall beats' times."""
    tall = beat_times(rr_s=rr_s)
    lone = tall[:-1][holding] + rr_s / 2
    t = np.r_[tall, lone]
    sizes = np.r_[np.full(tall.size, 2.0), np.ones(lone.size)]
    order = np.argsort(t)
    return twelve(t[order], sizes[order]), tall


def test_hidden_beats_in_exactly_two_thirds_of_the_long_gaps_are_a_rhythm() -> None:
    """Seven tall beats 1.4 s apart, an ordinary beat hidden in four of their six gaps: two
    thirds, the share that makes a rhythm (inclusive), so the four beats are counted, not lost."""
    x, tall = bumps_in_gaps(1.4, [0, 1, 3, 4])
    assert tall.size == 7
    found = detect_qrs(x, RATE_HZ)
    assert_found(found.beats, np.sort(np.r_[tall, tall[[0, 1, 3, 4]] + 0.7]))


def test_a_late_bump_in_three_of_five_gaps_is_not_a_rhythm() -> None:
    """Three of five long gaps (60 %, under two thirds) holding a late bump are not a rhythm:
    nothing is added, the rate is not raised by bumps that do not recur."""
    x, tall = bumps_in_gaps(1.6, [0, 2, 3])
    assert tall.size == 6
    assert_found(detect_qrs(x, RATE_HZ).beats, tall)


def test_a_run_of_ordinary_beats_among_tall_ectopics_is_found_to_its_end() -> None:
    """Sixteen beats at 100 bpm, three of them 2.5x as tall (beats 2, 12, 13), the others growing
    slightly from 0.8 to 1.0: once the hidden beats show the rhythm, the long run between the
    tall beats is searched back gap by gap, one beat a round, until no gap is long (six rounds
    here): no beat of the run is lost and the rate is not lowered."""
    times = beat_times(rr_s=0.6)
    sizes = np.linspace(0.8, 1.0, times.size)
    sizes[[2, 12, 13]] = 2.5
    found = detect_qrs(twelve(times, sizes), RATE_HZ)
    assert_found(found.beats, times)


def test_a_premature_beat_inside_the_t_zone_is_found_with_three_beats_seen() -> None:
    """A short strip with three clear beats and a small premature beat 500 ms after the second
    (inside the T zone, so only the search-back can find it): searched for with three beats
    already, the small beat is counted, not lost."""
    strong = np.array([0.4, 1.0, 3.6])
    premature = pqrst(np.array([1.5]), np.array([0.4]), t_uv=0.0, seconds=4.2)
    x = pqrst(strong, np.ones(3), t_uv=0.0, seconds=4.2) + premature
    assert_found(detect_qrs(x, RATE_HZ).beats, np.array([0.4, 1.0, 1.5, 3.6]))


def test_a_bump_exactly_one_refractory_period_after_a_beat_is_not_a_beat() -> None:
    """A bump 220 ms after a beat, at the start of a pause: the search-back looks only later
    (strictly), so it is not counted. Its energy (0.53^2 = 28 % of the beat's) is over a quarter:
    the T-wave test would not catch it."""
    times = np.array([0.5, 1.3, 2.1, 2.9, 3.7, 5.3, 6.1, 6.9, 7.7, 8.5])
    bump = np.array([3.7 + REFRACTORY_S])
    x = pqrst(times, np.ones(times.size), t_uv=0.0) + pqrst(bump, np.array([0.53]), t_uv=0.0)
    assert_found(detect_qrs(x, RATE_HZ).beats, times)


def tremor(amplitude_uv: float, seconds: float = SECONDS) -> np.ndarray:
    """A 10 Hz tremor: its energy, integrated over exactly one period (100 ms), is flat, so a gap's
    background is the tremor's energy and a hidden beat's clarity is set by its amplitude."""
    t = np.arange(round(seconds * RATE_HZ)) / RATE_HZ
    return amplitude_uv * np.sin(2 * np.pi * 10.0 * t)


def test_hidden_beats_standing_4_7_times_over_a_tremor_are_found() -> None:
    """A bigeminy (every other beat 2.5x as tall) under a 0.265 mV 10 Hz tremor: each hidden beat's
    energy is 4.7 times its gap's background, clear of it (from 4x), so the rate is not halved."""
    times = beat_times()
    found = detect_qrs(twelve(times, every(2, 2.5, times.size), noise_uv=0.0) + tremor(265.0), RATE_HZ)
    assert_found(found.beats, times)


def test_a_bump_only_3_6_times_a_tremor_in_every_gap_is_not_a_beat() -> None:
    """40 bpm under a 0.12 mV 10 Hz tremor, a bump (0.4 of a QRS) 0.9 s after every beat: 3.6 times
    its gap's background, under the 4x a hidden beat must stand clear of it, so the bumps are not
    taken for hidden beats and the rate is not doubled."""
    times = beat_times(rr_s=1.5)
    t = np.r_[times, times[:-1] + 0.9]
    sizes = np.r_[np.ones(times.size), np.full(times.size - 1, 0.4)]
    order = np.argsort(t)
    x = twelve(t[order], sizes[order], noise_uv=0.0, t_uv=0.0) + tremor(120.0)
    found = detect_qrs(x, RATE_HZ)
    assert_found(found.beats, times)
    assert found.heart_rate_bpm == pytest.approx(40.0, abs=0.5)


@pytest.mark.parametrize(("factor", "bump"), [(2.0, 0.55), (3.5, 0.75)])
def test_a_bump_in_a_pause_under_the_hidden_beats_floor_is_not_a_beat(factor: float, bump: float) -> None:
    """A bigeminy with a pause after its sixth beat (a hidden one): a bump 450 ms into the pause,
    past the T-wave test, is searched back from the hidden beats' floor: half their energy, from 5 %
    up to 12 % of the level. Tall beats 2x: hidden beats 1/4 of the level, floor 12 %, the bump
    (0.55 of a hidden beat) 7.6 %; tall beats 3.5x: hidden beats 8.2 %, floor 5 %, the bump (0.75)
    4.6 %. Under the floor, it is not counted as a beat."""
    times = beat_times()
    sizes = every(2, factor, times.size)
    times[6:] += 0.8  # the pause: the seventh beat comes 0.8 s late
    keep = times < SECONDS - 0.3
    times, sizes = times[keep], sizes[keep]
    x = twelve(np.r_[times, times[5] + 0.45], np.r_[sizes, bump])
    assert_found(detect_qrs(x, RATE_HZ).beats, times)


def test_a_bigeminy_starting_with_a_small_beat_finds_it_at_the_strip_s_head() -> None:
    """The strip opens on an ordinary beat 0.3 s in, hidden by the tall one after it (and the tail
    closes on a tall beat): once the hidden beats show the rhythm, the head is searched back to
    the strip's first sample, so that first beat is counted."""
    times = np.arange(0.3, SECONDS - 0.3, RR_S)
    sizes = np.ones(times.size)
    sizes[1::2] = 2.5
    assert sizes[-1] == 2.5
    assert_found(detect_qrs(twelve(times, sizes), RATE_HZ).beats, times)


def test_a_small_beat_at_exactly_the_reach_of_the_strip_s_tail_is_found() -> None:
    """A bigeminy (RR 400 samples) ending on a tall beat, then an ordinary beat 1.236 s later whose
    energy peaks (first of its two humps: the band-pass makes the QRS's slope twin-peaked, the
    later hump 18 samples on) exactly 1.5 typical RR after the last beat's: the tail is searched
    up to that sample inclusive, so the last beat is counted; 2 ms later it is out of reach."""
    times = np.arange(0.4, 8.41, RR_S)
    sizes = every(2, 2.5, times.size)
    found = detect_qrs(twelve(np.r_[times, 9.636], np.r_[sizes, 1.0], noise_uv=0.0), RATE_HZ)
    assert_found(found.beats, np.r_[times, 9.636])
    beyond = detect_qrs(twelve(np.r_[times, 9.638], np.r_[sizes, 1.0], noise_uv=0.0), RATE_HZ)
    assert_found(beyond.beats, times)


def test_a_hidden_beat_exactly_at_the_end_of_the_t_zone_is_found() -> None:
    """Tall beats (3x) 1.6 s apart on a 6 s strip, an ordinary beat exactly 0.40 s x sqrt(1.6 s)
    = 253 samples after the first (its later energy hump on the T zone's last sample, the earlier
    one inside it) and one in the middle of the third gap: two of three long gaps, a rhythm only
    with the beat at the T zone's edge counted (inclusive), so both hidden beats are found."""
    times = np.array([0.5, 1.006, 2.1, 3.7, 4.5, 5.3])
    sizes = np.array([3.0, 1.0, 3.0, 3.0, 1.0, 3.0])
    found = detect_qrs(twelve(times, sizes, noise_uv=0.0, seconds=6.0), RATE_HZ)
    assert_found(found.beats, times)


def test_hidden_beats_in_two_thirds_of_the_long_gaps_of_an_irregular_bigeminy_are_found() -> None:
    """Tall beats (2x) 598-880 samples apart, an ordinary beat half-way through four of the gaps
    (600, 700, 760, 840) and none in three (598, 720, 880). Long gaps start at 3/4 of the gaps'
    upper quartile (75th percentile: 800, half-way between 760 and 840): 600 is long (inclusive),
    598 is not, so exactly 4 of the 6 long gaps hold a hidden beat: a rhythm, and all four count.
    Noise-free: the energy peaks are exactly these samples apart."""
    gaps = [840, 600, 720, 760, 598, 700, 880]
    holds = [True, True, False, True, False, True, False]
    tall = 250 + np.r_[0, np.cumsum(gaps)]
    hidden = np.array([a + g // 2 for a, g, h in zip(tall[:-1], gaps, holds, strict=True) if h])
    times = np.r_[tall, hidden] / RATE_HZ
    sizes = np.r_[np.full(tall.size, 2.0), np.ones(hidden.size)]
    order = np.argsort(times)
    found = detect_qrs(twelve(times[order], sizes[order], noise_uv=0.0, seconds=12.0), RATE_HZ)
    assert_found(found.beats, times[order])


def test_an_electrode_pop_in_one_of_three_leads_is_not_a_beat() -> None:
    """One lead of three (the clearest) carries a pop three times its QRS height 0.4 s after beat
    5: its typical peak is a ninth of its largest, far under the other leads' (about 1, and 20 %
    of them), so the lead is left out and the pop is not counted as a beat."""
    times = beat_times()
    x = twelve(times, np.ones(times.size))[[1, 8, 9]]
    x[2] += 1.4 * pqrst(np.array([times[5] + 0.4]), np.array([3.0]), t_uv=0.0)
    found = detect_qrs(x, RATE_HZ)
    assert found.leads_used == (1, 0)
    assert_found(found.beats, times)


def test_the_one_clear_lead_with_a_tall_ectopic_still_carries_the_beats() -> None:
    """Three leads: two noisy (0.3 mV of noise over a 0.3 mV QRS), one clear with one ectopic beat
    2.5x as tall: its typical peak is 16 % of its largest, steady (from 15 %) though under a fifth of
    the noisy leads' (they peak on noise in every window), so it carries the beats alone; left out,
    the noisy leads' noise would have been counted as beats."""
    times = beat_times()
    sizes = np.ones(times.size)
    sizes[5] = 2.5
    clear = pqrst(times, sizes)
    rng = np.random.default_rng(3)
    noisy = [0.3 * pqrst(times, np.ones(times.size)) + rng.normal(0, 300, clear.size) for _ in range(2)]
    found = detect_qrs(np.stack([*noisy, clear]), RATE_HZ)
    assert found.leads_used == (2,)
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


RAIL = 32767  # the int16 converter's rail, in units


def rail_visits(lead_units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends (exclusive) of one lead's runs at the upper rail."""
    edges = np.diff(np.r_[0, (lead_units == RAIL).astype(np.int8), 0])
    return np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]


def test_an_electrode_bouncing_on_the_rail_in_every_lead_twice_is_still_left_out() -> None:
    """An electrode shared by every lead bounces twice (three 20 ms visits 100 ms apart, after beats
    3 and 8): each visit has a neighbour closer than a refractory period, so none is a clipped
    QRS, however many there are. The stretches stay out of the beat search: no beat is made of a
    bounce, and no true beat is displaced by one."""
    times = beat_times()
    x = twelve(times, np.ones(times.size))
    for at in (times[3] + 0.45, times[8] + 0.45):
        start = round(at * RATE_HZ)
        for k in range(3):
            lo = start + round(k * 0.1 * RATE_HZ)
            x[:, lo : lo + round(0.02 * RATE_HZ)] = 5000.0
    _, rec = clipped_recording(x)
    report = check_quality(rec)
    assert_found(report.beats, times)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)


def test_a_notched_r_with_both_tops_clipped_10_ms_apart_is_one_clipped_peak() -> None:
    """V4's M-shaped R (8 mV) runs past the rail twice at every beat, its two tops 5 samples (10 ms)
    apart: closer than the join (inclusive), one visit, so a clipped peak recurring like the beats,
    not a knocked electrode: the beats stay in the search and the rate is stated."""
    times = beat_times()
    x = twelve(times, np.ones(times.size))
    x[9] = pqrst(times, np.ones(times.size), qrs_uv=8000.0)
    units, _ = clipped_recording(x)
    for start, end in zip(*rail_visits(units[9]), strict=True):
        middle = (start + end) // 2
        units[9, middle - 2 : middle + 3] = RAIL - 1  # the notch: 5 samples off the rail
    starts, ends = rail_visits(units[9])
    assert starts.size == 2 * times.size and set((starts[1::2] - ends[::2]).tolist()) == {5}
    report = check_quality(device_recording(units, rate=RATE_HZ, uv_per_unit=UV_PER_UNIT))
    assert_found(report.beats, times)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)


def test_a_tall_t_wave_clipped_exactly_220_ms_after_its_clipped_r_is_clipping_too() -> None:
    """V4's R (5 mV) and its T wave (3.5 mV) both pass the rail at every beat, the T's visit starting
    exactly a refractory period (110 samples) after the R's ends: each visit is alone (inclusive),
    both are the lead's own clipping, and no stretch is left out: the rate is stated (an RR across
    a left-out stretch would not count)."""
    times = beat_times()
    x = twelve(times, np.ones(times.size))
    x[9] = pqrst(times, np.ones(times.size), qrs_uv=5000.0, t_uv=3500.0, t_after_s=0.244)
    units, rec = clipped_recording(x)
    starts, ends = rail_visits(units[9])
    assert starts.size == 2 * times.size and set((starts[1::2] - ends[::2]).tolist()) == {110}
    report = check_quality(rec)
    assert_found(report.beats, times)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)


def test_three_tall_ectopics_clipped_are_clipping_not_a_knock() -> None:
    """Three ectopic beats three times as tall pass the rail in V3-V5, three visits in each: three
    recur like beats (inclusive), so they are clipping and the three beats stay in the search."""
    times = beat_times()
    sizes = np.ones(times.size)
    sizes[[2, 6, 10]] = 3.0
    units, rec = clipped_recording(twelve(times, sizes))
    assert [rail_visits(units[i])[0].size for i in (8, 9, 10)] == [3, 3, 3]
    report = check_quality(rec)
    assert_found(report.beats, times)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)


def test_wide_qrs_clipped_for_exactly_120_ms_is_clipping_in_both_leads() -> None:
    """A wide, tall QRS (bundle branch block) at the rail for exactly 60 samples (120 ms, the longest
    a clipped QRS may be, inclusive) at every beat in V4, and at two beats only in V3 (too few to
    recur, but where V4 clips): both leads' visits are clipping, every beat stays in the search
    (a knock would leave each visit's stretch out and the rail's edges would make beats)."""
    times = beat_times()
    t = np.arange(round(SECONDS * RATE_HZ)) / RATE_HZ

    def wide(sizes: np.ndarray) -> np.ndarray:
        return sum(s * 6700.0 * np.exp(-0.5 * ((t - c - 0.001) / 0.05) ** 2) for c, s in zip(times, sizes))

    x = twelve(times, np.ones(times.size))
    x[9] = wide(np.ones(times.size))
    v3 = np.full(times.size, 0.4)
    v3[[3, 7]] = 1.0
    x[8] = wide(v3)
    units, rec = clipped_recording(x)
    for lead, count in ((9, times.size), (8, 2)):
        starts, ends = rail_visits(units[lead])
        assert starts.size == count and set((ends - starts).tolist()) == {60}
    report = check_quality(rec)
    assert_found(report.beats, times)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)


def test_an_electrode_knocked_three_times_for_300_ms_is_a_knock_not_clipping() -> None:
    """Every lead at the rail three times for 0.3 s, between beats: the visits recur and stand
    apart, but each is longer than any QRS (0.12 s), so they are knocks: left out of the beat
    search, whose beats and rate are those of the heart, not of the rail's edges."""
    times = beat_times()
    x = twelve(times, np.ones(times.size))
    for at in (1.5, 4.7, 7.9):
        x[:, round(at * RATE_HZ) : round((at + 0.3) * RATE_HZ)] = 5000.0
    _, rec = clipped_recording(x)
    report = check_quality(rec)
    assert_found(report.beats, times)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)


def test_a_hidden_beat_in_the_strip_s_first_quarter_second_is_found() -> None:
    """One lead, 146 bpm, every 4th beat 3.26x as tall, the strip starting 79 ms before a tall beat
    (found by a random search over 2,809 strips): the hidden beats are judged against the strip's
    background, not against what is left of a short stretch past the T wave, which the beat's own
    energy half fills - there 5 of 12 beats were lost (and with a stretch at the strip's head, the
    first)."""
    times = np.arange(0.079, 5.0 - 0.05, 0.411)
    sizes = np.ones(times.size)
    sizes[::4] = 3.26
    found = detect_qrs(twelve(times, sizes, seconds=5.0)[:1], RATE_HZ)
    assert_found(found.beats, times)


def test_an_electrode_knocked_every_second_with_a_new_offset_each_time_is_still_a_knock() -> None:
    """Ten 50 ms visits to the rail, one a second, in V2, each coming back 1.5 mV up or down (a new
    half-cell offset): they recur like beats but do not come back where they started, so they are
    knocks - left out of the beat search - not a clipped R: no beat is made of them, and as every
    RR spans a knocked stretch no rate is stated. Taken for clipped R peaks (without the test of
    where the lead comes back) they were counted as the heart: 60 /min."""
    times = beat_times()
    x = twelve(times, np.ones(times.size))
    for k, start in enumerate(range(round(0.55 * RATE_HZ), x.shape[1] - 100, round(1.0 * RATE_HZ))):
        x[7, start : start + 25] = 9000.0
        x[7, start + 25 :] += 1500.0 if k % 2 == 0 else -1500.0
    units, rec = clipped_recording(x)
    assert rail_visits(units[7])[0].size == 10
    report = check_quality(rec)
    stretches = [range(s - 5, s + 30) for s in range(round(0.55 * RATE_HZ), x.shape[1] - 100, round(RATE_HZ))]
    assert not [b for b in report.beats if any(b in r for r in stretches)]
    assert report.heart_rate_bpm is None


def test_blocked_p_waves_of_a_2_to_1_av_block_are_not_hidden_beats() -> None:
    """2:1 AV block: a P wave (0.2 mV) 160 ms before each QRS and a blocked one mid-gap, 40 QRS a
    minute. In a clean recording the blocked P stands far above the strip's background, in every
    gap and past the T wave: only the floor (5 % of the QRS level; a P wave has about 1 %) keeps it
    from being counted, and the ventricular rate - the one that matters in a block - from reading 80."""
    times = beat_times(rr_s=1.5)
    t = np.arange(round(SECONDS * RATE_HZ)) / RATE_HZ
    p = np.zeros_like(t)
    for at in np.r_[times - 0.16, times + 0.75 - 0.16]:
        p += 200.0 * np.exp(-0.5 * ((t - at) / 0.025) ** 2)
    x = twelve(times, np.ones(times.size), noise_uv=1.0) + np.abs(GAINS)[:, None] * p[None, :]
    found = detect_qrs(x, RATE_HZ)
    assert_found(found.beats, times)
    assert found.heart_rate_bpm == pytest.approx(40.0, abs=0.5)


def test_small_beats_at_both_ends_of_a_quadrigeminy_are_found_one_rr_at_a_time() -> None:
    """Every 4th beat twice as tall, the strip starting three small beats before the first tall one
    and ending two after the last: only the edge search finds those (a search-back needs a beat on
    both sides), reaching 1.5 typical RR from the first and the last beat found, again and again."""
    times = 0.2 + 0.55 * np.arange(18)  # 109 bpm, the last beat at 9.55 s
    sizes = np.ones(times.size)
    sizes[3::4] = 2.0
    assert sizes[:3].tolist() == [1.0, 1.0, 1.0] and sizes[-2:].tolist() == [1.0, 1.0]
    found = detect_qrs(twelve(times, sizes), RATE_HZ)
    assert_found(found.beats, times)


# ----------------------------------------------------------------------------- clipped or knocked: where the lead comes back


def clipped_v4(times: np.ndarray, qrs_uv: float = 5000.0, seconds: float = SECONDS) -> np.ndarray:
    """V4 alone, noise-free: a P wave (150 µV, 160 ms before each R) and an R of `qrs_uv` that
    runs past the 3.28 mV rail at every beat; no T wave, so the ST segment is the baseline."""
    t = np.arange(round(seconds * RATE_HZ)) / RATE_HZ
    x = pqrst(times, np.ones(times.size), qrs_uv=qrs_uv, t_uv=0.0, seconds=seconds)
    for at in times:
        x += 150.0 * np.exp(-0.5 * ((t - at + 0.16) / 0.02) ** 2)
    return x


@pytest.mark.parametrize("over_uv, rate_stated", [(0.0, True), (0.1, False)])
def test_an_st_segment_exactly_1_mv_from_the_pr_segment_is_still_the_clipped_beat_s_own(
    over_uv: float, rate_stated: bool
) -> None:
    """V4's R clipped at every beat, its ST segment (90-200 ms after the R) raised to exactly 1 mV
    above the PR segment's level (the median 250-80 ms before the rail visit, on the P wave's
    tail): an ST elevation within reach, so the visits are V4's own clipping and the rate is
    stated. 0.1 µV more and the lead did not come back where it left: each visit is a knock, left
    out of the beat search, and as every RR spans one no rate is stated (what beats are found are
    the ST segments' square ends, not the R's). The PR and ST windows
    are exactly these (not a second before, not the R's own down-stroke): on a lead whose level
    moves they decide whether a heart rate is given at all."""
    times = beat_times()
    x = twelve(times, np.ones(times.size))
    x[9] = clipped_v4(times)
    units, _ = clipped_recording(x)
    starts, ends = rail_visits(units[9])
    assert starts.size == times.size
    # the windows in samples at 500 Hz, written out on purpose: computed from quality's own
    # constants, a mutant of those constants would move the test's windows with the product's
    pr_uv = float(np.median(units[9, starts[0] - 125 : starts[0] - 40])) * UV_PER_UNIT
    assert pr_uv == pytest.approx(16.5)  # the P wave's tail: every PR window reads the same
    t = np.arange(x.shape[1]) / RATE_HZ
    for at in times:
        x[9, (t >= at + 0.09) & (t < at + 0.2)] += pr_uv + 1000.0 + over_uv
    units, rec = clipped_recording(x)
    after_uv = float(np.median(units[9, ends[0] + 30 : ends[0] + 70])) * UV_PER_UNIT
    assert after_uv - pr_uv == pytest.approx(1000.0 + over_uv, abs=1e-9)
    report = check_quality(rec)
    if rate_stated:
        assert_found(report.beats, times)
        assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)
    else:
        assert report.heart_rate_bpm is None


def test_clipped_r_waves_at_both_ends_of_the_strip_are_clipping_like_the_others() -> None:
    """The strip starts 60 ms before a clipped R and ends 50 ms after one: those two visits have no
    PR (or no ST) segment inside the strip, so nothing says they are knocks; they recur with the
    others and are V4's own clipping. Taken for knocks, the first and last beats would be left out
    of the beat search: 11 beats of 13."""
    times = np.arange(0.06, 9.95, RR_S)
    x = twelve(times, np.ones(times.size))
    x[9] = clipped_v4(times)
    x = x[:, : round((times[-1] + 0.05) * RATE_HZ)]
    units, rec = clipped_recording(x)
    starts, ends = rail_visits(units[9])
    assert starts[0] < 40 and ends[-1] + 30 > units.shape[1]  # no PR window first, no ST window last
    report = check_quality(rec)
    assert_found(report.beats, times)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)


def test_a_strip_that_starts_at_the_rail_inside_a_clipped_r_keeps_that_beat() -> None:
    """The first sample is already at the rail (the strip starts in a clipped R): nothing of that
    visit's PR segment is in the strip - not even the visit's own first sample may stand for it
    (the rail is 3.3 mV from the ST segment). It is clipping like the other R's: every beat,
    the first one included, stays in the beat search."""
    times = np.arange(0.0, 9.7, RR_S)
    x = twelve(times, np.ones(times.size))
    x[9] = clipped_v4(times)
    units, rec = clipped_recording(x)
    assert units[9, 0] == RAIL
    report = check_quality(rec)
    assert_found(report.beats, times)


def test_a_clipped_r_in_the_first_80_ms_is_not_judged_against_the_whole_strip() -> None:
    """V4's baseline drifts down by 2.5 mV over the strip (an electrode settling) while its tall R's
    clip at every beat; the first starts within 80 ms of the strip's start, so it has no PR segment
    to compare with. It is clipping like the others (each comes back to its own PR level): the
    first beat is kept. Compared with the strip's median instead (1.15 mV lower), it would be a
    knock and the first beat lost."""
    times = np.arange(0.06, 9.95, RR_S)
    x = twelve(times, np.ones(times.size))
    x[9] = clipped_v4(times, qrs_uv=8000.0) - 2500.0 * np.arange(x.shape[1]) / x.shape[1]
    units, rec = clipped_recording(x)
    starts, _ = rail_visits(units[9])
    assert starts.size == times.size and starts[0] < 40
    report = check_quality(rec)
    assert_found(report.beats, times)


def test_a_knock_in_the_strip_s_first_quarter_second_is_judged_on_the_pr_stretch_there_is() -> None:
    """Lead II's tall R's clip at every beat; the right arm is knocked at 0.15 s (I, II and aVR at
    the rail for 50 ms, the chest leads see the jolt through the central terminal) and comes back
    1.5 mV off. Of the PR window (250-80 ms before the visit) only the last 70 ms lie inside the
    strip, but they are a level to compare with: II did not come back there, so the visit is a knock, left out of the
    beat search, and the rate is the heart's. Taken as unknown ('yes, it came back') the knock
    would join II's clipped R's and its jolt would be counted as a 13th beat (77 bpm)."""
    times = np.arange(0.7, 9.7, RR_S)
    x = twelve(times, np.ones(times.size))
    x[1] = clipped_v4(times) + np.random.default_rng(1).normal(0.0, 8.0, x.shape[1])
    at = round(0.15 * RATE_HZ)
    x[[0, 1, 3], at : at + 25] = 9000.0
    x[[0, 1], at + 25 :] += 1500.0
    x[6:, at : at + 25] -= 2000.0
    x[6:, at + 25 :] -= 500.0
    units, rec = clipped_recording(x)
    assert rail_visits(units[1])[0][0] == at  # the knock is II's first visit to the rail
    report = check_quality(rec)
    assert_found(report.beats, times)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)
