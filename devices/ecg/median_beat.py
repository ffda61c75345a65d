"""The median beat of a recording, and the signed size of its P, QRS and T waves in each lead.

The median (not the mean) of the beats aligned on their QRS peaks: an ectopic beat or a burst of
noise does not move it. QRS onset and offset come from the slope of all leads together (where
it falls below a tenth of its peak), the isoelectric level from the PR segment just before the
onset, and each wave's size from its largest deflection from that level, with its sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices.ecg import order_statistics as stats

TEMPLATE_S = (0.45, 0.60)  # before / after the QRS peak
MIN_BEATS = 3  # fewer beats than this make no median
EDGE_SLOPE_OF_PEAK = 0.10  # QRS onset/offset: combined slope below 10 % of its peak ...
EDGE_QUIET_S = 0.010  # ... for 10 ms
MIN_QUIET_SAMPLES = 2  # ... and two samples at least: one sample is an instant (every peak inside a QRS)
QRS_HALF_MAX_S = 0.12  # the onset/offset search stops 120 ms from the peak (wide QRS: LBBB)
BASELINE_S = (0.040, 0.010)  # isoelectric level: 40-10 ms before QRS onset (the PR segment)
P_SEARCH_S = (0.20, 0.02)  # P wave: 200-20 ms before QRS onset
T_SEARCH_S = (0.06, 0.40)  # T wave: 60-400 ms after QRS offset
P_OF_RR = 0.45  # the P wave lies in the last 45 % of the cycle before the QRS peak ...
T_OF_RR = 0.70  # ... the T wave in the first 70 % after it
EDGE_LEADS = 4  # QRS edges come from the clearest few leads ...
EDGE_CLARITY_OF_BEST = 0.5  # ... those at least half as clear as the best


@dataclass(frozen=True, slots=True)
class Waves:
    """Signed amplitudes (µV, against the PR segment) of one lead's median beat."""

    p_uv: float  # largest deflection where the P wave is; sign = polarity
    qrs_polarity: float  # (R + S) / (R - S): +1 all R, -1 all S (QS)
    qrs_range_uv: float  # R - S
    t_uv: float
    beat_range_uv: float  # peak-to-peak of the whole beat (P to T)


@dataclass(frozen=True, slots=True)
class MedianBeat:
    template: np.ndarray  # (leads, samples) µV, the QRS peak at index `peak`
    peak: int
    qrs_onset: int
    qrs_offset: int
    beats_used: int
    waves: tuple[Waves, ...]


def _signed_extreme(segment: np.ndarray) -> float:
    if segment.size == 0:
        return 0.0
    hi, lo = float(segment.max()), float(segment.min())
    return hi if hi >= -lo else lo


def _edge(slope: np.ndarray, start: int, step: int, limit: int, quiet: int) -> int:
    """First index from `start` (moving by `step`) where `slope` stays low for `quiet` samples."""
    low = slope < EDGE_SLOPE_OF_PEAK
    run = 0
    i = start
    for _ in range(limit):
        if not 0 <= i < low.size:
            break
        run = run + 1 if low[i] else 0
        if run >= quiet:
            return i - step * (quiet - 1)
        i += step
    return int(np.clip(start + step * limit, 0, low.size - 1))


def median_beat(x_uv: np.ndarray, beats: tuple[int, ...] | np.ndarray, rate_hz: float) -> MedianBeat | None:
    """The median beat of (leads, samples) µV data around the given QRS peaks, None with too few."""
    before, after = (round(s * rate_hz) for s in TEMPLATE_S)
    n = x_uv.shape[-1]
    peaks = np.asarray([b for b in beats if b - before >= 0 and b + after < n], dtype=np.int64)
    if peaks.size < MIN_BEATS:
        return None
    offsets = np.arange(-before, after)
    template = stats.median(x_uv[:, peaks[:, None] + offsets[None, :]], axis=1)
    slope = np.abs(np.diff(template, axis=-1, prepend=template[:, :1]))
    near = slice(max(0, before - round(0.05 * rate_hz)), before + round(0.05 * rate_hz))
    peak = slope[:, near].max(axis=-1)
    floor = stats.median(slope, axis=-1)
    # QRS edges from the leads where the QRS stands out of the beat's own noise: a lead full of
    # hum or tremor would make the whole beat look like QRS
    clarity = peak / (floor + 1e-9 * (peak.max() + 1e-30))
    chosen = np.argsort(-clarity)[:EDGE_LEADS]
    chosen = chosen[(clarity[chosen] >= EDGE_CLARITY_OF_BEST * clarity[chosen[0]]) & (peak[chosen] > 0)]
    if chosen.size == 0:
        chosen = np.arange(template.shape[0])
    relative = np.mean(slope[chosen] / np.maximum(peak[chosen, None], 1e-30), axis=0)
    top = relative[near].max()
    relative = relative / top if top > 0 else relative
    quiet = max(MIN_QUIET_SAMPLES, round(EDGE_QUIET_S * rate_hz))
    limit = round(QRS_HALF_MAX_S * rate_hz)
    onset = _edge(relative, before, -1, limit, quiet)
    offset = _edge(relative, before, +1, limit, quiet)

    def span(a: int, b: int) -> slice:
        return slice(int(np.clip(a, 0, template.shape[-1])), int(np.clip(b, 0, template.shape[-1])))

    base = span(onset - round(BASELINE_S[0] * rate_hz), onset - round(BASELINE_S[1] * rate_hz) + 1)
    level = stats.median(template[:, base], axis=-1, keepdims=True)
    t = template - level
    # at fast rates the neighbouring beats come close: P after the previous T, T before the next QRS
    rr = float(stats.median(np.diff(np.sort(peaks)))) if peaks.size > 1 else float(after + before)
    p_first = max(onset - round(P_SEARCH_S[0] * rate_hz), before - round(P_OF_RR * rr))
    t_last = min(offset + round(T_SEARCH_S[1] * rate_hz), before + round(T_OF_RR * rr))
    p_part = span(p_first, onset - round(P_SEARCH_S[1] * rate_hz))
    t_part = span(offset + round(T_SEARCH_S[0] * rate_hz), t_last)
    whole = span(p_part.start, t_part.stop)
    waves = []
    for row in t:
        qrs = row[onset : offset + 1]
        r, s = (float(qrs.max()), float(qrs.min())) if qrs.size else (0.0, 0.0)
        waves.append(
            Waves(
                p_uv=_signed_extreme(row[p_part]),
                qrs_polarity=float(np.clip((r + s) / (r - s), -1, 1)) if r > s else 0.0,
                qrs_range_uv=r - s,
                t_uv=_signed_extreme(row[t_part]),
                beat_range_uv=float(np.ptp(row[whole])) if row[whole].size else 0.0,
            )
        )
    return MedianBeat(
        template=template,
        peak=before,
        qrs_onset=int(onset),
        qrs_offset=int(offset),
        beats_used=int(peaks.size),
        waves=tuple(waves),
    )
