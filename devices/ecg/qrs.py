"""QRS detection on any lead set at any rate we accept, in numpy only.

The detector follows the Pan-Tompkins family: band-pass each lead, square its slope, integrate
over a QRS width, and pick peaks of the resulting energy envelope with an adaptive threshold and
a refractory period, then search back in long RR gaps for a beat the threshold missed.

What makes it work on every lead set (one lead, limb leads only, 8, 12 or 15 leads):
- Leads are combined, not chosen by name: each usable lead's envelope is scaled to its own QRS
  level, and the leads whose QRS stands out most from their background are summed. A lead that
  is flat, clipped or full of noise is left out by the caller or outweighed by clean ones.
- All filter lengths are in seconds and become samples at the recording's rate, so 200 Hz and
  1000 Hz recordings go through the same filters. The low-pass is two boxcars of 1/50 s and
  1/60 s: their zeros fall on 50 and 60 Hz and every harmonic, so mains hum — the commonest
  noise in a village clinic — never reaches the detector, whichever grid the clinic is on.

Every filter is a moving average computed by cumulative sums, so the cost is a few passes over
the samples, independent of the filter lengths (about 5 ms for 10 s of 12 leads at 500 Hz).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from devices.ecg import order_statistics as stats

# --- filter lengths (seconds) --------------------------------------------------------------
MAINS_PERIODS_S = (1 / 50, 1 / 60)  # boxcar low-pass with zeros on both mains grids
HIGH_PASS_WINDOW_S = 0.12  # subtracting a 120 ms mean removes P, T and baseline (< ~5 Hz)
ENERGY_WINDOW_S = 0.10  # integration over about one QRS width (80-120 ms)

# --- peak picking -------------------------------------------------------------------------
REFRACTORY_S = 0.22  # no two beats closer than 220 ms: 270 bpm, above any rate seen at rest
LEVEL_WINDOW_S = 2.0  # every 2 s window holds a QRS at any rate >= 30 bpm: its peak is the QRS level
THRESHOLD_OF_LEVEL = 0.30  # a beat's energy peak must reach 30 % of the typical QRS peak
SEARCH_BACK_RR = 1.6  # an RR this many times the median suggests a missed beat ...
SEARCH_BACK_OF_LEVEL = 0.12  # ... accepted there from 12 % of the QRS level (PVCs, small beats)
# Beats hidden by taller ones: in bigeminy or trigeminy every 2 s window holds one of the tall
# beats, so the level is theirs and the others (half their height: a quarter of their energy) fall
# under the threshold; every RR is then equally long and the search-back above never starts. So in
# the long gaps a candidate is a hidden beat when it is QRS-sized, stands clear of the strip's
# background, lies beyond the opening beat's T wave, and such a beat is in most long gaps: a rhythm.
HIDDEN_GAP_OF_LONG = 0.75  # long gaps: from 3/4 of the upper quartile of the gaps
# A T wave's energy peaks (its steepest slope) at 0.26-0.34 s x sqrt(RR in s) in the real files
# here and stays under 3 % of the QRS level; 0.40 leaves room for a longer QT, and still finds the
# hidden beat of a bigeminy up to about 120 bpm (at 0.5 x its gap).
HIDDEN_T_ZONE_S = 0.40  # x sqrt(gap in s): where the opening beat's T wave may still be
HIDDEN_OF_LEVEL = 0.05  # a beat a third of the tall ones' height has a ninth of their energy
HIDDEN_CLARITY = 4.0  # a hidden QRS's energy against the strip's median (noise peaks: 2-3)
HIDDEN_SHARE = 2 / 3  # of the long gaps that must hold one
HIDDEN_KIN = 0.5  # then a missed beat in a long gap may be half as strong as the hidden ones
EDGE_REACH_RR = 1.5  # the strip's head and tail: a beat within 1.5 typical RR of the last one found
# Pan and Tompkins' T-wave test: within 360 ms of a beat, a peak with under half its slope (a
# quarter of its energy) is that beat's T wave. A tall ectopic beat's T wave is as tall: against
# the level of the ordinary beats it passes the threshold and would be counted as a beat.
T_WAVE_WITHIN_S = 0.36
T_WAVE_OF_BEAT = 0.25
MAX_LEADS_COMBINED = 6  # the clearest leads carry the beat; more only adds their noise
MIN_LEAD_CLARITY = 2.0  # a sine's energy (tremor, sway, a test tone) peaks at most twice its median
LEAD_CLARITY_RATIO = 0.35  # leads whose QRS-to-background ratio is within this share of the best
STEADY_OF_LARGEST = 0.15  # a lead's typical 2 s peak against its largest (PVCs: ~0.3; dead half: ~0)
STEADY_OF_LEADS = 0.2  # ... or against the leads' typical such ratio (tall ectopics in every lead)
STEADY_FLOOR = 0.05  # ... down to an ectopic 4.5x the others' height; a lead dead for half: ~1e-5
FIDUCIAL_SEARCH_S = 0.06  # the QRS peak is looked for this far either side of the energy peak
EXCLUDE_MARGIN_S = 0.15  # around an excluded stretch: the filters' reach plus an edge's own QRS-like step

# --- heart rate ---------------------------------------------------------------------------
MIN_BEATS_FOR_RATE = 3  # two RR intervals at least before a rate is worth stating
RATE_RANGE_BPM = (20.0, 300.0)  # outside this a "rate" is a detector failure, not physiology


@dataclass(frozen=True, slots=True)
class QrsDetection:
    """Beats found in a recording.

    `beats`: sample indices of the QRS peaks (ascending). `heart_rate_bpm`: 60 / mean RR, as
    carts state it, None with fewer than MIN_BEATS_FOR_RATE beats or an implausible result.
    `leads_used`: indices of the leads whose energy was combined.
    """

    beats: tuple[int, ...]
    heart_rate_bpm: float | None
    leads_used: tuple[int, ...]

    def rr_intervals_s(self, rate_hz: float) -> np.ndarray:
        return np.diff(np.asarray(self.beats, dtype=np.float64)) / rate_hz


def moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average along the last axis (edges averaged over what is there)."""
    width = max(1, int(width))
    if width == 1:
        return x.astype(np.float64, copy=True)
    n = x.shape[-1]
    pad = [(0, 0)] * (x.ndim - 1) + [(1, 0)]
    c = np.pad(np.cumsum(x, axis=-1, dtype=np.float64), pad)
    half_lo, half_hi = (width - 1) // 2, width // 2
    out = np.empty(x.shape, dtype=np.float64)
    if n >= width:  # the interior by slices (fast); the edges below by index
        out[..., half_lo : n - half_hi] = (c[..., width:] - c[..., : n + 1 - width]) / width
    edges = np.r_[0 : min(half_lo, n), max(n - half_hi, min(half_lo, n)) : n] if n >= width else np.arange(n)
    lo = np.clip(edges - half_lo, 0, n)
    hi = np.clip(edges + half_hi + 1, 0, n)
    out[..., edges] = (c[..., hi] - c[..., lo]) / (hi - lo)
    return out


def band_pass(x: np.ndarray, rate_hz: float) -> np.ndarray:
    """The QRS band (about 5-20 Hz) with 50/60 Hz and their harmonics removed, along the last axis."""
    low = x
    for period in MAINS_PERIODS_S:
        low = moving_average(low, round(period * rate_hz))
    return low - moving_average(low, round(HIGH_PASS_WINDOW_S * rate_hz))


def qrs_energy(x_uv: np.ndarray, rate_hz: float) -> np.ndarray:
    """Integrated squared slope of the band-passed signal, per lead (leads, samples)."""
    filtered = band_pass(x_uv, rate_hz)
    slope = np.diff(filtered, axis=-1, prepend=filtered[..., :1])
    return moving_average(slope * slope, round(ENERGY_WINDOW_S * rate_hz))


def _combine(energy: np.ndarray, rate_hz: float) -> tuple[np.ndarray, tuple[int, ...]]:
    """Sum the clearest leads' envelopes, each scaled to its own QRS level."""
    n = energy.shape[-1]
    window = max(1, min(n, round(LEVEL_WINDOW_S * rate_hz)))
    usable = n // window * window or n
    blocks = energy[:, :usable].reshape(energy.shape[0], -1, min(window, usable))
    peaks = blocks.max(axis=-1)
    level = stats.median(peaks, axis=-1)  # a typical QRS peak of each lead
    background = stats.median(energy, axis=-1)
    clarity = level / (background + 1e-12 * level.max() + 1e-30)
    # a lead must beat in every stretch: one that died half-way (or carries one huge artifact)
    # has a typical peak far below its largest and would turn its noise into beats. Far below
    # the other leads' too: a tall ectopic beat (3x the height: 9x the energy) in every lead is
    # the heart's, and dropping every lead for it would find no beat at all
    steadiness = level / (peaks.max(axis=-1) + 1e-30)
    relative = (steadiness >= STEADY_OF_LEADS * stats.median(steadiness)) & (steadiness >= STEADY_FLOOR)
    steady = (steadiness >= STEADY_OF_LARGEST) | relative
    clarity = np.where(steady, clarity, 0.0)
    order = np.argsort(-clarity, kind="stable")
    best = clarity[order[0]]
    chosen = [
        int(i)
        for i in order[:MAX_LEADS_COMBINED]
        if clarity[i] > MIN_LEAD_CLARITY and clarity[i] >= LEAD_CLARITY_RATIO * best
    ]
    if not chosen:
        return np.zeros(n), ()
    combined = np.sum(energy[chosen] / level[chosen, None], axis=0) / len(chosen)
    return combined, tuple(chosen)


def local_peaks(env: np.ndarray) -> np.ndarray:
    """Indices of the local maxima of a smooth envelope (plateaus give their first sample): never
    its first or last sample, so none in an envelope of fewer than 3 samples."""
    rising = np.diff(env) > 0
    peaks = np.nonzero(rising[:-1] & ~rising[1:])[0] + 1
    return peaks[env[peaks] > 0]


def _suppress_neighbours(peaks: np.ndarray, heights: np.ndarray, distance: int) -> np.ndarray:
    """Keep the highest peak of every group closer than `distance` samples (greedy, by height)."""
    kept: list[int] = []
    taken = np.zeros(peaks.size, dtype=bool)
    for i in np.argsort(-heights, kind="stable"):
        if taken[i]:
            continue
        kept.append(int(peaks[i]))
        near = np.abs(peaks - peaks[i]) < distance
        taken |= near
    return np.sort(np.asarray(kept, dtype=np.int64))


def _levels(env: np.ndarray, rate_hz: float) -> float:
    """The typical peak of one signal: the median of its 2 s windows' maxima (each holds a QRS)."""
    window = max(1, round(LEVEL_WINDOW_S * rate_hz))
    n = env.size
    if n <= window:
        return float(env.max())
    blocks = env[: n // window * window].reshape(-1, window)
    return float(stats.median(blocks.max(axis=1)))


@dataclass(frozen=True, slots=True, eq=False)  # eq: arrays have no single truth value
class _Envelope:
    """The combined energy envelope of one strip and what every beat search reads alongside it,
    built once in detect_qrs instead of passed to each helper.

    `env`: the envelope. `candidates`: its local peaks, the only places a beat may be.
    `refractory`: samples two beats are apart at least. `rate_hz`: the recording's rate.
    `background`: the median of `env`, the strip's level between beats; hidden beats must stand
    clear of it (HIDDEN_CLARITY)."""

    env: np.ndarray
    candidates: np.ndarray
    refractory: int
    rate_hz: float
    background: float

    def search_back(self, beats: np.ndarray, floor: float) -> np.ndarray:
        """Add the strongest candidate from `floor` inside RR gaps much longer than usual."""
        if beats.size < 3:
            return beats
        median_rr = float(stats.median(np.diff(beats)))
        added: list[int] = []
        for a, b in itertools.pairwise(beats):
            if b - a < SEARCH_BACK_RR * median_rr:
                continue
            inside = self.candidates[(self.candidates > a + self.refractory) & (self.candidates < b - self.refractory)]
            if inside.size:
                best = int(inside[np.argmax(self.env[inside])])
                if self.env[best] >= floor:
                    added.append(best)
        return np.sort(np.concatenate([beats, np.asarray(added, dtype=np.int64)])) if added else beats

    def hidden_beats(self, beats: np.ndarray, level: float) -> np.ndarray:
        """Add beats hidden by taller ones (bigeminy, trigeminy): see HIDDEN_GAP_OF_LONG. Once some
        are found the rhythm is known: gaps still twice as long hold beats like them (search-back),
        and so may the strip's head and tail. Clarity is judged against the strip's background: what
        is left of a short gap past the T wave may be half filled by the very beat looked for."""
        hidden = self._hidden_rounds(beats, level)
        if hidden.size == beats.size:
            return beats
        kin = HIDDEN_KIN * float(stats.median(self.env[np.setdiff1d(hidden, beats)]))
        floor = max(HIDDEN_OF_LEVEL * level, min(SEARCH_BACK_OF_LEVEL * level, kin))
        beats = hidden
        while True:  # each round adds a beat between two others, or ends
            more = self.search_back(beats, floor)
            if more.size == beats.size:
                break
            beats = more
        return self._edge_beats(beats, floor)

    def _hidden_rounds(self, beats: np.ndarray, level: float) -> np.ndarray:
        """One hidden beat in each long gap a round, while most long gaps hold one (each round adds
        beats between others, or ends)."""
        floor = HIDDEN_OF_LEVEL * level
        while beats.size >= 2:  # two tall ectopics may be all the first pass saw
            gaps = np.diff(beats)
            long_gap = gaps >= HIDDEN_GAP_OF_LONG * stats.percentile(gaps.astype(np.float64), 75.0)
            found = [
                self._hidden_in(a + self._t_zone(b - a), b - self.refractory, floor)
                for a, b in zip(beats[:-1][long_gap].tolist(), beats[1:][long_gap].tolist())
            ]
            inside = [c for c in found if c is not None]
            if not inside or len(inside) < HIDDEN_SHARE * len(found):
                break
            beats = np.sort(np.concatenate([beats, np.asarray(inside, dtype=np.int64)]))
        return beats

    def _edge_beats(self, beats: np.ndarray, floor: float) -> np.ndarray:
        """Once hidden beats showed the rhythm: those before the first beat and after the last (a
        search-back needs a beat on both sides), one typical RR at a time, as clear of the strip's
        background as the hidden ones."""
        typical = int(stats.median(np.diff(beats)))
        reach = round(EDGE_REACH_RR * typical)
        t_zone = self._t_zone(typical)
        found = beats.tolist()
        while True:  # each round adds a beat before the first or after the last, or ends
            head = self._hidden_in(found[0] - reach, found[0] - self.refractory, floor)
            tail = self._hidden_in(found[-1] + t_zone, found[-1] + reach, floor)
            if head is None and tail is None:
                break
            found = ([head] if head is not None else []) + found + ([tail] if tail is not None else [])
        return np.asarray(found, dtype=np.int64)

    def _t_zone(self, gap: int) -> int:
        """Samples after a beat where its T wave may still be, in a gap of `gap` samples."""
        return max(self.refractory, round(HIDDEN_T_ZONE_S * np.sqrt(gap / self.rate_hz) * self.rate_hz))

    def _hidden_in(self, lo: int, hi: int, floor: float) -> int | None:
        """The hidden beat among the candidates in [lo, hi], if the strongest of them is one: from
        `floor` and HIDDEN_CLARITY times the background."""
        inside = self.candidates[(self.candidates >= lo) & (self.candidates <= hi)]
        if not inside.size:
            return None
        best = int(inside[np.argmax(self.env[inside])])
        if self.env[best] >= floor and self.env[best] >= HIDDEN_CLARITY * self.background:
            return best
        return None


def _drop_t_waves(beats: np.ndarray, env: np.ndarray, rate_hz: float) -> np.ndarray:
    """Leave out the peaks that are the T wave of the beat before them (see T_WAVE_WITHIN_S)."""
    within = round(T_WAVE_WITHIN_S * rate_hz)
    kept: list[int] = []
    for b in beats.tolist():
        if kept and b - kept[-1] < within and env[b] < T_WAVE_OF_BEAT * env[kept[-1]]:
            continue
        kept.append(b)
    return np.asarray(kept, dtype=np.int64)


def _fiducials(beats: np.ndarray, filtered: np.ndarray, scale: np.ndarray, rate_hz: float) -> np.ndarray:
    """Move each beat to the sample of largest band-passed deflection across the used leads."""
    half = max(1, round(FIDUCIAL_SEARCH_S * rate_hz))
    n = filtered.shape[-1]
    offsets = np.arange(-half, half + 1)
    idx = np.clip(beats[:, None] + offsets[None, :], 0, n - 1)
    strength = np.sum((filtered[:, idx] / scale[:, None, None]) ** 2, axis=0)  # (beats, window)
    moved = idx[np.arange(beats.size), np.argmax(strength, axis=1)]
    return stats.sorted_unique(moved)


def heart_rate_bpm(
    beats: np.ndarray | tuple[int, ...], rate_hz: float, exclude: np.ndarray | None = None
) -> float | None:
    """60 / mean RR (the way carts state the rate), None when it cannot be trusted.

    RR intervals that span an `exclude`d sample (a stretch where beats could not be seen) are
    not counted."""
    b = np.asarray(beats, dtype=np.int64)
    if b.size < MIN_BEATS_FOR_RATE:
        return None
    rr = np.diff(b).astype(np.float64)
    if exclude is not None and exclude.any():
        blocked = np.concatenate([[0], np.cumsum(exclude)])
        rr = rr[blocked[b[1:]] == blocked[b[:-1]]]
    if rr.size < MIN_BEATS_FOR_RATE - 1 or rr.sum() <= 0:
        return None
    bpm = 60.0 * rate_hz / float(rr.mean())
    return bpm if RATE_RANGE_BPM[0] <= bpm <= RATE_RANGE_BPM[1] else None


def detect_qrs(x_uv: np.ndarray, rate_hz: float, exclude: np.ndarray | None = None) -> QrsDetection:
    """Find QRS complexes in (leads, samples) µV data. Leads the caller knows to be unusable
    (flat, clipped) should be left out; the remaining ones are weighed by how clearly their QRS
    stands out. `exclude`: samples (bool, per sample) where no beat can be seen, e.g. while an
    electrode's input sat at its rail; no beat is placed there and the rate skips them.
    Returns no beats (and no rate) when nothing beat-like is found."""
    x = np.atleast_2d(np.asarray(x_uv, dtype=np.float64))
    n = x.shape[-1]
    refractory = max(1, round(REFRACTORY_S * rate_hz))
    if x.shape[0] == 0 or n < 2 * refractory:
        return QrsDetection((), None, ())
    x = x - stats.median(x, axis=-1, keepdims=True)
    filtered = band_pass(x, rate_hz)
    slope = np.diff(filtered, axis=-1, prepend=filtered[..., :1])
    energy = moving_average(slope * slope, round(ENERGY_WINDOW_S * rate_hz))
    blocked = None
    if exclude is not None and exclude.any():
        blocked = moving_average(exclude.astype(np.float64), 2 * round(EXCLUDE_MARGIN_S * rate_hz) + 1) > 0
        energy = np.where(blocked, 0.0, energy)
    env, used = _combine(energy, rate_hz)
    if not used:
        return QrsDetection((), None, ())
    candidates = local_peaks(env)  # none when the energy only rises or falls: no beats below
    envelope = _Envelope(env, candidates, refractory, rate_hz, background=float(stats.median(env)))
    level = _levels(env, rate_hz)
    strong = candidates[env[candidates] >= THRESHOLD_OF_LEVEL * level]
    beats = _suppress_neighbours(strong, env[strong], refractory)
    beats = envelope.search_back(beats, SEARCH_BACK_OF_LEVEL * level)
    beats = envelope.hidden_beats(beats, level)
    beats = _drop_t_waves(_suppress_neighbours(beats, env[beats], refractory), env, rate_hz)
    chosen = filtered[list(used)]
    # each lead's QRS size: its typical 2 s peak, as for the energy (an artefact or a rail's edges
    # in one stretch do not shrink the lead's say in where its beats are)
    scale = np.array([_levels(np.abs(lead), rate_hz) for lead in chosen]) + 1e-12
    beats = _fiducials(beats, chosen, scale, rate_hz)
    rate = heart_rate_bpm(beats, rate_hz, blocked)
    return QrsDetection(tuple(int(b) for b in beats), rate, used)
