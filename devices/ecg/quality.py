"""ECG quality gate: what a cardiologist would send back, found while the patient is still here.

`check_quality(recording)` measures every lead of an `EcgRecording` and returns a
`QualityReport`: a verdict (`acceptable`, `warn`, `re-record`), the heart rate with the beats it
was counted from, and one `Problem` per kind of fault, with a plain sentence in Chinese and in
English that tells the village doctor what to do (devices/ecg/quality_wording.py). Pure numpy:
no I/O, no clock, no scipy. About 10-30 ms for 10 s of 12 leads at 500 Hz.

What is measured, per lead (figures in µV, s and Hz, whatever the recording's unit):
- lead-off: the lead is flat (a 2 s window whose range is below any living lead's), or it steps
  to the converter's rail and stays there to the end. Windows where every lead is flat but
  alive are a pause of the heart, not an electrode, and are not counted.
- saturation: samples at the converter's limits (`converter_limits`) or on a long exact plateau
  at the lead's extreme far from its baseline (clipping where the limits are unknown).
- baseline-wander: peak-to-peak of the baseline (median filters of 0.2 s then 0.6 s on a 50 Hz
  copy) in the worst 10 s.
- mains-noise: amplitude of the 50 Hz or 60 Hz line and its harmonics, above the neighbouring
  spectrum (Hann-windowed periodogram: the line is measured, the ECG's broad spectrum is not); a
  harmonic counts only where it stands out of that spectrum as a line (muscle tremor is broad:
  its share of 50 Hz is no hum).
- muscle-noise: RMS of the 20-150 Hz band outside the QRS complexes, with both grids' lines
  removed by comb filters (time-local: a step or a clipped stretch does not ring into the rest
  of the recording), typical over 0.5 s windows.
- limb-lead-reversal: from the median beat (devices/ecg/median_beat.py), the textbook signs:
  LA/RA makes lead I upside down (P, QRS, T negative), RA/LL makes lead II upside down with an
  upright aVR, an arm electrode on the right leg leaves lead II or III near zero. Not claimed
  when V5 and V6 point away as well (dextrocardia looks like LA/RA in the limb leads).
- too-short: less than a standard 10 s print.

A problem names the leads it shows in; where the limb leads show it in the pattern of one
electrode (I and II but not III: the right arm), the message names that electrode. Derived limb
leads (computed from two recorded ones) share their sources' faults: if recorded III is lost,
so are the I, aVR, aVL and aVF made from it.

Verdict: the worst severity among the problems. "re-record": the ECG cannot be read as it is
(an electrode off, clipping for 0.5 s or more, heavy noise or wander, swapped electrodes, under
5 s). "warn": readable, but the cardiologist will see the fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from devices.ecg import contec
from devices.ecg import order_statistics as stats
from devices.ecg import quality_wording as wording
from devices.ecg.median_beat import MedianBeat, Waves, median_beat
from devices.ecg.qrs import EXCLUDE_MARGIN_S, REFRACTORY_S, QrsDetection, detect_qrs, moving_average
from devices.ecg.recording import EcgRecording
from devices.errors import DeviceError

# ----------------------------------------------------------------------------- vocabulary

LEAD_OFF = "lead-off"
SATURATION = "saturation"
BASELINE_WANDER = "baseline-wander"
MAINS_NOISE = "mains-noise"
MUSCLE_NOISE = "muscle-noise"
LIMB_LEAD_REVERSAL = "limb-lead-reversal"
TOO_SHORT = "too-short"
KINDS: tuple[str, ...] = (
    LEAD_OFF,
    SATURATION,
    BASELINE_WANDER,
    MAINS_NOISE,
    MUSCLE_NOISE,
    LIMB_LEAD_REVERSAL,
    TOO_SHORT,
)

ACCEPTABLE = "acceptable"
WARN = "warn"
RE_RECORD = "re-record"
VERDICTS: tuple[str, ...] = (ACCEPTABLE, WARN, RE_RECORD)  # in order of severity

LIMB_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")
LIMB_TRIAD = ("I", "II", "III")
ELECTRODE_OF_TRIAD = {  # the triad leads a limb electrode is part of -> that electrode
    frozenset({"I", "II"}): "RA",
    frozenset({"I", "III"}): "LA",
    frozenset({"II", "III"}): "LL",
}

# ----------------------------------------------------------------------------- thresholds

# Rates analysed. The DICOM ECG IODs hold 200-1000 Hz; the bridge streams up to 2000 Hz. Below
# 100 Hz, QRS (10-40 Hz) and 50 Hz mains cannot be told apart.
MIN_RATE_HZ = 100.0
MAX_RATE_HZ = 2000.0

# too-short: a standard print needs 10 s (4 columns of 2.5 s); carts and streams lose a few
# samples, so 9.5 s passes. Under 5 s there are too few beats (5 at 60 bpm) for rate and rhythm
# and half the print is empty.
TOO_SHORT_WARN_S = 9.5
TOO_SHORT_RERECORD_S = 5.0
MIN_SPECTRAL_S = 1.0  # below this, noise figures have too little to go on: not measured

# lead-off: every living lead swings by 100 µV or more with each heartbeat (even one at right
# angles to the QRS axis shows its biphasic QRS, and amplifier noise alone is 10-30 µV p-p);
# 2 s holds a beat at >= 30 bpm. A 2 s window with less than 40 µV range is flat; one is enough.
FLAT_WINDOW_S = 2.0
FLAT_HOP_S = 0.5
FLAT_RANGE_UV = 40.0
# ... and, while most leads are alive, under a tenth of their typical range: a low-voltage ECG
# (pericardial effusion, obesity) can have one lead at right angles to its axis under 40 µV.
FLAT_SHARE_OF_TYPICAL = 0.10
# A cart blanking a lost electrode writes a constant: at most this many converter units of range.
BLANKED_RANGE_UNITS = 2
# An input that reaches the rail and stays there to the end for half a second has lost its
# electrode (it drifts there); shorter visits to the rail are saturation.
RAIL_STUCK_S = 0.5

# saturation: 20 ms at the rail (a clipped QRS peak is about that); from 0.5 s whole beats are
# hidden: record again.
SATURATION_MIN_S = 0.02
SATURATION_RERECORD_S = 0.5
# Where the converter's range is unknown (XML, rescaled samples), clipping shows as an exact
# plateau at the lead's extreme: 40 ms of one value at least 1 mV from the baseline does not
# happen in a living ECG (an R peak turns within a few ms).
PLATEAU_MIN_S = 0.04
PLATEAU_MIN_EXCURSION_UV = 1000.0
# A lead whose own tall QRS reaches the rail visits it briefly at each such beat: for at most a
# QRS's width, a refractory period or more from its other visits, three times or more in the
# recording. Those visits are the lead's clipping (saturation, still reported), not a knock: the
# beats there are real, and leaving them out of the beat search would halve or double the rate.
CLIPPED_PEAK_MAX_S = 0.12
CLIPPED_PEAKS_MIN = 3
CLIPPED_PEAK_JOIN_S = 0.01  # a peak near the rail may leave it for a sample or two: one visit
# ... and a clipped peak comes back to the level it left (PR segment before, ST segment after:
# within an ST elevation's reach), where a knocked electrode comes back with a new half-cell
# offset, often millivolts away
CLIPPED_PEAK_BEFORE_S = (0.25, 0.08)  # the PR segment and P wave: this long before the visit
CLIPPED_PEAK_AFTER_S = (0.06, 0.14)  # the ST segment: this long after it
CLIPPED_PEAK_RETURN_UV = 1000.0
# A lead that is at the rail for more than this share of the time is not used to find beats.
RAIL_SHARE_UNUSABLE = 0.2
# Noise is not measured where an electrode was knocked to its rail: that stretch is replaced by
# a line between the baselines (0.3 s medians) on either side.
BRIDGE_SIDE_S = 0.3

# baseline-wander: peak-to-peak of the baseline within a 10 s print. Breathing moves a good
# baseline by 0.1-0.4 mV (the clean files here: at most 0.37 mV). From 0.7 mV (7 mm) ST levels
# and the row layout suffer; from 2 mV (2 cm) the trace runs into the next row: record again.
WANDER_WINDOW_S = 10.0
WANDER_WARN_UV = 700.0
WANDER_RERECORD_UV = 2000.0
WANDER_MEDIAN_S = (0.2, 0.6)  # the first removes QRS and P, the second T (de Chazal et al. 2004)
WANDER_WORK_RATE_HZ = 50.0

# mains-noise: amplitude (peak) of the line and its harmonics. Carts with a notch leave under
# 5 µV (clean files here: <= 4 µV; an unfiltered Contec 14 µV). 25 µV (a 0.5 mm band on paper)
# starts to blur P waves; from 75 µV (a 1.5 mm band) P waves and ST are lost: record again.
MAINS_GRIDS_HZ = (50.0, 60.0)
MAINS_HARMONICS = 5
MAINS_TOLERANCE_HZ = 0.5  # grid frequency deviation allowed, times the harmonic's order
MAINS_BACKGROUND_HZ = (2.0, 5.0)  # the neighbouring spectrum the line stands out from ...
MAINS_BACKGROUND_MIN_BINS = 30  # ... reaching further out on a short strip, to hold 30 bins a side
MAINS_LOBE_BINS = 3  # a Hann-windowed line spreads over +-2 bins (+-3 when between two bins)
# A line is a narrow peak: its strongest bin holds half or more of its power (a Hann window's
# main lobe). Broadband noise (muscle tremor) has power at 50 Hz as well, spread evenly: in 10 s
# of noise the strongest of a band's 11-51 bins exceeds the floor's mean by 8-10 times in one
# strip in a hundred, by 15-19 times in one in 10 000. A harmonic counts only where its strongest
# bin reaches 20 times the floor's mean: 300 µV of tremor in 30-80 Hz reads no hum (before: 25-63
# µV in 28 strips of 40), while a 30 µV line is still measured under 100 µV of tremor spread
# over 20-150 Hz.
MAINS_LINE_OVER_FLOOR = 20.0
MAINS_WARN_UV = 25.0
MAINS_RERECORD_UV = 75.0

# muscle-noise: RMS of 20-150 Hz outside the QRS (Gaussian noise is ~6 x its RMS from edge to
# edge of the trace). An amplifier at rest gives 2-12 µV (clean files here: <= 15 µV; an
# unfiltered Contec in atrial fibrillation 26 µV, a 1.5 mm fuzz a cardiologist still reads).
# From 35 µV (a 2 mm fuzz) P waves and small Q waves are lost; from 70 µV (4 mm) ST as well.
MUSCLE_BAND_HZ = (20.0, 150.0)
MUSCLE_WINDOW_S = 0.5
MUSCLE_QRS_MASK_S = (0.08, 0.15)  # left out before / after each QRS peak (incl. the combs' echo)
MUSCLE_PERCENTILE = 60.0  # a typical window: noise counts when it stays, not a single twitch
MUSCLE_WARN_UV = 35.0
MUSCLE_RERECORD_UV = 70.0

# limb-lead-reversal, from the median beat
P_MIN_UV = 40.0  # a smaller P says nothing about polarity (atrial fibrillation leaves ~20 µV)
T_MIN_UV = 40.0
QRS_POLARITY_MIN = 0.2  # (R + S) / (R - S) beyond +-0.2: clearly upright / clearly negative
# An arm electrode on the right leg leaves II or III at the legs' potential difference: under a
# tenth of the other two limb leads' beat, and under 60 µV however large they are.
NEUTRAL_OF_OTHERS = 0.10
NEUTRAL_MAX_UV = 60.0


class EcgQualityError(DeviceError, ValueError):
    """The recording cannot be analysed (its sampling rate is outside 100-2000 Hz)."""


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Problem:
    """One fault the doctor can act on.

    `leads`: where it shows (empty: the whole recording). `severity`: "warn" or "re-record".
    `value`/`unit`: the measurement that crossed the threshold (worst lead), e.g. 86.3 "uV",
    for DICOM annotations and logs; not part of the JSON.
    """

    kind: str
    leads: tuple[str, ...]
    severity: str
    message_zh: str
    message_en: str
    value: float | None = None
    unit: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "leads": list(self.leads),
            "message_zh": self.message_zh,
            "message_en": self.message_en,
        }


@dataclass(frozen=True, slots=True)
class LeadMeasures:
    """The per-lead figures behind the problems (for logs, tuning and the bench)."""

    lead: str
    flat_s: float  # time inside flat 2 s windows
    rail_s: float  # time at the converter's limits
    wander_uv: float  # baseline peak-to-peak, worst 10 s
    mains_uv: float  # line amplitude (peak) of the worse grid
    mains_hz: float  # which grid that was: 50.0 or 60.0
    muscle_uv: float  # 20-150 Hz RMS outside QRS


@dataclass(frozen=True, slots=True)
class QualityReport:
    verdict: str
    heart_rate_bpm: float | None
    beats: tuple[int, ...]  # QRS peaks: sample indices into recording.samples
    problems: tuple[Problem, ...]
    leads: tuple[LeadMeasures, ...] = field(default=())
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The documented JSON form (`lastmile ecg check --json`); heart rate in whole bpm."""
        rate = None if self.heart_rate_bpm is None else int(round(self.heart_rate_bpm))
        return {"verdict": self.verdict, "heart_rate_bpm": rate, "problems": [p.to_json() for p in self.problems]}

    def problems_on(self, lead: str) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if lead in p.leads)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-lead figures, JSON-ready, for storing with the recording
        (`from_dict` reads it back): severities, the measured values and the beats included."""
        return {
            "verdict": self.verdict,
            "heart_rate_bpm": self.heart_rate_bpm,
            "beats": list(self.beats),
            "duration_s": self.duration_s,
            "problems": [
                {**p.to_json(), "severity": p.severity, "value": p.value, "unit": p.unit} for p in self.problems
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityReport:
        try:
            problems = tuple(
                Problem(
                    kind=str(p["kind"]),
                    leads=tuple(str(n) for n in p["leads"]),
                    severity=str(p["severity"]),
                    message_zh=str(p["message_zh"]),
                    message_en=str(p["message_en"]),
                    value=None if p.get("value") is None else float(p["value"]),
                    unit=str(p.get("unit", "")),
                )
                for p in data["problems"]
            )
            rate = data["heart_rate_bpm"]
            report = cls(
                verdict=str(data["verdict"]),
                heart_rate_bpm=None if rate is None else float(rate),
                beats=tuple(int(b) for b in data["beats"]),
                problems=problems,
                duration_s=float(data.get("duration_s", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EcgQualityError(f"not a stored quality report ({type(exc).__name__}: {exc})") from None
        if report.verdict not in VERDICTS or any(p.kind not in KINDS for p in problems):
            raise EcgQualityError(f"stored quality report has an unknown verdict or kind: {data!r:.200}")
        return report


# ----------------------------------------------------------------------------- converter rails


def converter_limits(recording: EcgRecording) -> list[tuple[int, int] | None]:
    """Per lead, the lowest and highest sample value the device's converter can write.

    Contec ECG90A: a 12-bit converter stored with an offset of 2048. Derived leads have no
    converter: they reach a rail where their sources do. Other formats store 16-bit words, so a
    16-bit recording's limits are the word's (-32768 also marks padding, so -32767 counts as the
    rail). Wider or rescaled samples have no known limit: only the plateau test finds their
    clipping.
    """
    limits: list[tuple[int, int] | None] = []
    for name in recording.lead_names:
        if name in recording.derived_leads:
            limits.append(None)  # computed: at a rail only where a recorded source is
        elif recording.source_format == "contec":
            limits.append((-contec.OFFSET, 4095 - contec.OFFSET))
        elif recording.samples.dtype == np.int16:
            limits.append((-32767, 32767))
        else:
            limits.append(None)
    return limits


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of the runs of True in a 1-D mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]


def _clipped_peaks(x_uv: np.ndarray, at_rail: np.ndarray, rate: float) -> np.ndarray:
    """(leads, samples): the rail visits that are a lead's own QRS peaks clipped, recurring
    like beats and back where they started (see CLIPPED_PEAK_MAX_S), as opposed to a knock or a
    bouncing electrode."""
    clipped = np.zeros_like(at_rail)
    longest = round(CLIPPED_PEAK_MAX_S * rate)
    apart = round(REFRACTORY_S * rate)
    join = round(CLIPPED_PEAK_JOIN_S * rate)
    for i in range(at_rail.shape[0]):
        starts, ends = _runs(at_rail[i])
        if not starts.size:
            continue
        keep = np.r_[True, starts[1:] - ends[:-1] > join]  # visits: runs closer than `join` are one
        starts, ends = starts[keep], np.r_[ends[np.nonzero(keep)[0][1:] - 1], ends[-1]]
        gaps = starts[1:] - ends[:-1]
        alone = np.r_[True, gaps >= apart] & np.r_[gaps >= apart, True]
        back = np.array([_returns(x_uv[i], start, end, rate) for start, end in zip(starts, ends)])
        peaks = alone & back & (ends - starts <= longest)
        if np.count_nonzero(peaks) >= CLIPPED_PEAKS_MIN:
            for start, end in zip(starts[peaks], ends[peaks]):
                clipped[i, start:end] = True
    # the same tall QRS clipped in a neighbouring lead, too few times there to recur on its own
    somewhere: np.ndarray = np.any(clipped, axis=0)
    for i in range(at_rail.shape[0]):
        starts, ends = _runs(at_rail[i] & ~clipped[i])
        for start, end in zip(starts, ends):
            if end - start <= longest and somewhere[start:end].any() and _returns(x_uv[i], start, end, rate):
                clipped[i, start:end] = True
    return clipped


def _returns(lead_uv: np.ndarray, start: int, end: int, rate: float) -> bool:
    """Whether a lead comes back from its rail visit [start, end) to the level it left (a clipped
    peak does; a knocked electrode's new offset does not). Unknown at the strip's edges: yes."""
    before = lead_uv[
        max(0, start - round(CLIPPED_PEAK_BEFORE_S[0] * rate)) : max(0, start - round(CLIPPED_PEAK_BEFORE_S[1] * rate))
    ]
    after = lead_uv[end + round(CLIPPED_PEAK_AFTER_S[0] * rate) : end + round(CLIPPED_PEAK_AFTER_S[1] * rate)]
    if not before.size or not after.size:
        return True
    return abs(float(stats.median(after)) - float(stats.median(before))) <= CLIPPED_PEAK_RETURN_UV


def _at_limits(samples: np.ndarray, x_uv: np.ndarray, limits: list[tuple[int, int] | None], rate: float) -> np.ndarray:
    """(leads, samples): at the converter's limits, or on a far plateau at the lead's extreme."""
    at = np.zeros(samples.shape, dtype=bool)
    for i, lim in enumerate(limits):
        if lim is not None:
            at[i] = (samples[i] <= lim[0]) | (samples[i] >= lim[1])
    min_run = max(2, round(PLATEAU_MIN_S * rate))
    median = stats.median(x_uv, axis=-1)
    for i in range(samples.shape[0]):
        for extreme in (samples[i].max(), samples[i].min()):
            hits = samples[i] == extreme
            if abs(float(x_uv[i][hits][0]) - median[i]) < PLATEAU_MIN_EXCURSION_UV:
                continue
            starts, ends = _runs(hits)
            for start, end in zip(starts, ends):
                if end - start >= min_run:
                    at[i, start:end] = True
    return at


# ----------------------------------------------------------------------------- measurements


def _window_starts(n: int, window: int, hop: int) -> np.ndarray:
    if n <= window:
        return np.array([0])
    starts = np.arange(0, n - window + 1, hop)
    if starts[-1] != n - window:
        starts = np.append(starts, n - window)  # the end of the recording is always covered
    return starts


def _windowed_range(x: np.ndarray, window: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """Range (max - min) of every window, (leads, windows), and the window starts. Built from
    hop-sized blocks, so the cost does not grow with the window."""
    n = x.shape[-1]
    window = min(window, n)
    hop = max(1, min(hop, window))
    starts = _window_starts(n, window, hop)
    blocks = -(-n // hop)
    padded = np.pad(x, ((0, 0), (0, blocks * hop - n)), mode="edge").reshape(x.shape[0], blocks, hop)
    bmax, bmin = padded.max(axis=-1), padded.min(axis=-1)
    per = -(-window // hop)
    idx = np.clip(starts[:, None] // hop + np.arange(per)[None, :], 0, blocks - 1)
    ranges = bmax[:, idx].max(axis=-1) - bmin[:, idx].min(axis=-1)
    if starts[-1] % hop:  # the window aligned on the end is not made of whole blocks: measured as it is
        last = x[:, starts[-1] : starts[-1] + window]
        ranges[:, -1] = last.max(axis=-1) - last.min(axis=-1)
    return ranges, starts


def _baseline(x_uv: np.ndarray, rate: float) -> tuple[np.ndarray, float]:
    """Baseline (leads, m) at about 50 Hz, and its rate: block means, then two median filters."""
    block = max(1, round(rate / WANDER_WORK_RATE_HZ))
    m = x_uv.shape[-1] // block  # >= 45: wander is measured from 1 s (MIN_SPECTRAL_S)
    work_rate = rate / block
    d = x_uv[:, : m * block].reshape(x_uv.shape[0], m, block).mean(axis=-1)
    for seconds in WANDER_MEDIAN_S:
        w = min(m, max(1, round(seconds * work_rate)) | 1)
        half = w // 2
        # mirrored, not the end value repeated: a recording that ends (or starts) on an R wave
        # would otherwise fill half the window with that R and report it as wander
        padded = np.pad(d, ((0, 0), (half, half)), mode="reflect")
        d = stats.median(np.lib.stride_tricks.sliding_window_view(padded, w, axis=-1), axis=-1)
    return d, work_rate


def _wander(x_uv: np.ndarray, rate: float) -> np.ndarray:
    baseline, work_rate = _baseline(x_uv, rate)
    window = max(1, round(WANDER_WINDOW_S * work_rate))
    ranges, _ = _windowed_range(baseline, window, max(1, window // 2))
    return ranges.max(axis=-1)


def _mains(x_uv: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Per lead: (line amplitude in µV of the worse grid, which grid in Hz).

    Power per bin is scaled so that a sine of amplitude A sums to A²/2 over its line; the
    neighbouring spectrum's median level, times the line's bins, is taken off. A harmonic whose
    strongest bin does not stand out of that level (MAINS_LINE_OVER_FLOOR) is the noise floor's
    own share of the grid frequency, not a line: it adds nothing.
    """
    n = x_uv.shape[-1]
    window = np.hanning(n)
    spectrum = np.fft.rfft((x_uv - x_uv.mean(axis=-1, keepdims=True)) * window, axis=-1)
    power = 2.0 * (spectrum.real**2 + spectrum.imag**2) / (n * float(np.sum(window**2)))
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    best = np.zeros(x_uv.shape[0])
    grid = np.full(x_uv.shape[0], MAINS_GRIDS_HZ[0])
    rows = np.arange(x_uv.shape[0])
    lobe = np.arange(-MAINS_LOBE_BINS, MAINS_LOBE_BINS + 1)
    # the neighbouring spectrum reaches out to 5 Hz, or on a short strip as far as it takes to hold
    # 30 bins a side: 2-5 Hz holds 3 a side at 1 s, and a median of so few can sit far under the
    # floor (100 µV of white noise then reads up to 46 µV of hum in 1 lead in 50-200 at 1-2 s)
    reach = max(MAINS_BACKGROUND_HZ[1], MAINS_BACKGROUND_HZ[0] + MAINS_BACKGROUND_MIN_BINS * rate / n)
    for f0 in MAINS_GRIDS_HZ:
        excess = np.zeros(x_uv.shape[0])
        for h in range(1, MAINS_HARMONICS + 1):
            centre = f0 * h
            if centre + reach + MAINS_TOLERANCE_HZ * h >= rate / 2:
                break
            offset = freqs - centre
            band = np.nonzero(np.abs(offset) <= MAINS_TOLERANCE_HZ * h)[0]  # >= 1 bin: bins are <= 1 Hz apart
            near, far = MAINS_BACKGROUND_HZ[0] + MAINS_TOLERANCE_HZ * h, reach + MAINS_TOLERANCE_HZ * h
            # the line is where the band peaks; its power is in the window's main lobe around it.
            # A noise bin's power is exponentially distributed: its mean is the median / ln 2. The
            # floor is the higher side's: where the spectrum steps down beside a harmonic (tremor up
            # to a cart's 150 Hz low-pass), the quiet side's level is not what the line's bins hold.
            peak = band[np.argmax(power[:, band], axis=-1)]
            line = np.clip(peak[:, None] + lobe[None, :], 0, freqs.size - 1)
            below = stats.median(power[:, (offset <= -near) & (offset >= -far)], axis=-1)
            above = stats.median(power[:, (offset >= near) & (offset <= far)], axis=-1)
            background = np.maximum(below, above) / np.log(2)
            stands_out = power[rows, peak] >= MAINS_LINE_OVER_FLOOR * background
            # where it stands out its lobe holds over 20 floors' worth: the 7 taken off leave a positive excess
            excess += np.where(stands_out, power[rows[:, None], line].sum(axis=-1) - background * lobe.size, 0.0)
        amplitude = np.sqrt(2.0 * excess)
        worse = amplitude > best
        best, grid = np.where(worse, amplitude, best), np.where(worse, f0, grid)
    return best, grid


def _mains_free(x_uv: np.ndarray, rate: float) -> np.ndarray:
    """Moving averages over one period of each grid: 50/60 Hz and all harmonics gone, the ECG
    kept but for its sharpest peaks (a 20 ms average trims an R wave by a third at most)."""
    out = x_uv
    for grid in MAINS_GRIDS_HZ:
        out = moving_average(out, round(rate / grid))
    return out


def _comb(x: np.ndarray, period: float) -> np.ndarray:
    """Along the last axis, x[t] - x[t - period] (fractional delay by linear interpolation): zeros at 1/period and
    every harmonic, twice the power of broadband noise elsewhere. The first samples are 0.
    x is >= 1 s long (MIN_SPECTRAL_S), far longer than the delay (at most 2000 / 50 = 40 samples)."""
    whole = int(period)
    frac = period - whole
    out = np.zeros_like(x)
    delayed = (1 - frac) * x[..., 1:-whole] + frac * x[..., : -whole - 1]
    out[..., whole + 1 :] = x[..., whole + 1 :] - delayed
    return out


def _bridged(x_uv: np.ndarray, gap: np.ndarray, rate: float) -> np.ndarray:
    """The signal with each `gap` stretch replaced by a straight line between the baseline
    levels (medians of 0.3 s) on either side of it."""
    if not gap.any():
        return x_uv
    out = x_uv.copy()
    side = max(1, round(BRIDGE_SIDE_S * rate))
    starts, ends = _runs(gap)
    n = x_uv.shape[-1]
    for start, end in zip(starts, ends):
        left = x_uv[:, max(0, start - side) : start]
        right = x_uv[:, end : min(n, end + side)]
        a = stats.median(left, axis=-1) if left.shape[-1] else stats.median(right, axis=-1)
        b = stats.median(right, axis=-1) if right.shape[-1] else a
        out[:, start:end] = a[:, None] + (b - a)[:, None] * np.linspace(0, 1, end - start)[None, :]
    return out


def _muscle_band(x_uv: np.ndarray, rate: float) -> np.ndarray:
    """The muscle band of each lead: ~20 Hz high-pass (two 25 ms boxcars subtracted), ~150 Hz
    low-pass, then a comb per grid (zeros on its line and every harmonic)."""
    smooth = max(1, round(rate / MUSCLE_BAND_HZ[0] / 2))
    band = x_uv - moving_average(moving_average(x_uv, smooth), smooth)
    band = moving_average(band, max(1, round(rate / (2 * MUSCLE_BAND_HZ[1]))))
    for grid in MAINS_GRIDS_HZ:
        band = _comb(band, rate / grid)
    return band


def _muscle_gain(rate: float) -> float:
    """RMS gain of _muscle_band for noise spread evenly over 20-150 Hz, so that the figure is
    the noise's own RMS at every sampling rate (the boxcars' lengths round differently).

    Not cached: it is one FFT of about a second of samples, well under a millisecond."""
    n = int(2 ** np.ceil(np.log2(rate)))  # about a second: the response (< 0.1 s) fits with room
    impulse = np.zeros(n)
    impulse[n // 2] = 1.0
    response = np.abs(np.fft.rfft(_muscle_band(impulse, rate))) ** 2
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    # at >= 100 Hz the band holds bins from 20 Hz to min(150 Hz, 0.45 x rate) >= 45 Hz
    band = (freqs >= MUSCLE_BAND_HZ[0]) & (freqs <= min(MUSCLE_BAND_HZ[1], 0.45 * rate))
    return float(np.sqrt(response[band].mean()))


def _muscle(x_uv: np.ndarray, rate: float, beats: tuple[int, ...], skip: np.ndarray) -> np.ndarray:
    """Per lead: typical RMS (µV) of the muscle band outside the QRS complexes (see module doc)."""
    n = x_uv.shape[-1]
    band = _muscle_band(x_uv, rate) / _muscle_gain(rate)
    outside = ~skip
    outside[: int(rate / MAINS_GRIDS_HZ[0]) + int(rate / MAINS_GRIDS_HZ[1]) + 2] = False  # comb start-up
    before, after = (round(s * rate) for s in MUSCLE_QRS_MASK_S)
    for b in beats:
        outside[max(0, b - before) : b + after] = False
    window = max(1, round(MUSCLE_WINDOW_S * rate))
    count = n // window  # >= 1: noise is measured from 1 s (MIN_SPECTRAL_S)
    energy = (band[:, : count * window] ** 2 * outside[: count * window]).reshape(-1, count, window).sum(-1)
    kept = outside[: count * window].reshape(count, window).sum(-1)
    valid = kept >= 0.3 * window
    if not valid.any():
        return np.sqrt(np.mean(band**2, axis=-1))
    return stats.percentile(np.sqrt(energy[:, valid] / kept[valid]), MUSCLE_PERCENTILE, axis=-1)


# ----------------------------------------------------------------------------- electrode swaps


def _sign(value: float, minimum: float) -> int:
    return 0 if abs(value) < minimum else (1 if value > 0 else -1)


def _upside_down(w: Waves) -> bool:
    """All of the lead's measurable waves negative, at least two of them: P, QRS, T."""
    signs = [
        s for s in (_sign(w.p_uv, P_MIN_UV), _sign(w.qrs_polarity, QRS_POLARITY_MIN), _sign(w.t_uv, T_MIN_UV)) if s
    ]
    return len(signs) >= 2 and all(s < 0 for s in signs)


def _upright_avr(w: Waves) -> bool:
    """aVR looks at the heart from the right shoulder: its P and T point down in almost everyone."""
    return _sign(w.p_uv, P_MIN_UV) > 0 and _sign(w.t_uv, T_MIN_UV) > 0


def _dextrocardia_suspected(waves: dict[str, Waves]) -> bool:
    """A mirror-image heart: QRS negative in V5 and V6 as well (R waves shrinking across the chest)."""
    lateral = [waves[n] for n in ("V5", "V6") if n in waves]
    return bool(lateral) and all(w.qrs_polarity < 0 for w in lateral)


def _swap_from_waves(waves: dict[str, Waves]) -> tuple[tuple[str, str], str] | None:
    """(the swapped electrodes, the lead that shows it) from the median beat, if any."""
    if "I" in waves and _upside_down(waves["I"]) and not _dextrocardia_suspected(waves):
        return ("RA", "LA"), "I"
    if "II" in waves and "aVR" in waves:
        ii = waves["II"]
        if _sign(ii.p_uv, P_MIN_UV) < 0 and _sign(ii.t_uv, T_MIN_UV) < 0 and _upright_avr(waves["aVR"]):
            return ("RA", "LL"), "II"
    return None


def _neutral_lead(waves: dict[str, Waves]) -> str | None:
    """II or III near zero while the other two limb leads carry the beat: an arm on the right leg."""
    if not all(t in waves for t in LIMB_TRIAD):
        return None
    for lead in ("II", "III"):
        others = [waves[t].beat_range_uv for t in LIMB_TRIAD if t != lead]
        own = waves[lead].beat_range_uv
        if own < NEUTRAL_MAX_UV and own < NEUTRAL_OF_OTHERS * min(others):
            return lead
    return None


# ----------------------------------------------------------------------------- the gate


@dataclass
class _Finding:
    kind: str
    leads: list[str]
    severity: str
    value: float | None = None
    unit: str = ""


def _electrode_of(leads: list[str] | tuple[str, ...], names: tuple[str, ...]) -> str | None:
    """The one limb electrode whose pattern the affected limb leads show, or the chest electrode
    when a single chest lead is affected."""
    if len(leads) == 1 and leads[0].startswith("V"):
        return leads[0]
    if not all(t in names for t in LIMB_TRIAD):
        return None
    return ELECTRODE_OF_TRIAD.get(frozenset(leads) & frozenset(LIMB_TRIAD))


def _worse(a: str, b: str) -> str:
    return a if VERDICTS.index(a) >= VERDICTS.index(b) else b


def _lead_off_problem(off: list[str], names: tuple[str, ...]) -> tuple[str, str]:
    chest_all = [n for n in names if n.startswith("V")]
    limb = [n for n in off if n in LIMB_LEADS]
    chest = [n for n in off if n.startswith("V")]
    other = [n for n in off if n not in limb and n not in chest]
    electrode = _electrode_of(limb, names) if limb else None
    if limb and chest_all and set(chest_all) <= set(chest):
        limb, chest = limb + chest, []  # the central terminal lost a limb electrode: all chest leads go
    return wording.lead_off(tuple(off), names, electrode, limb, chest, other)


def _message(f: _Finding, names: tuple[str, ...], detail: dict[str, Any]) -> tuple[str, str]:
    leads = tuple(f.leads)
    if f.kind == LEAD_OFF:
        return _lead_off_problem(f.leads, names)
    if f.kind == SATURATION:
        return wording.saturation(leads, names, _electrode_of(leads, names), f.severity)
    if f.kind == BASELINE_WANDER:
        return wording.baseline_wander(leads, names, _electrode_of(leads, names), f.severity)
    if f.kind == MAINS_NOISE:
        return wording.mains_noise(leads, names, _electrode_of(leads, names), detail["hz"], f.severity)
    if f.kind == MUSCLE_NOISE:
        return wording.muscle_noise(leads, names, f.severity)
    if f.kind == LIMB_LEAD_REVERSAL:
        return wording.limb_lead_reversal(leads, names, detail["swap"])
    return wording.too_short(detail["seconds"], f.severity)


def _lost_leads(
    x: np.ndarray, at_rail: np.ndarray, rate: float, uv_per_unit: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Leads whose electrode is lost: flat in a 2 s window (a pause of the heart flattens every
    lead at once, alive, and does not count) or at the rail from some moment to the end.

    Returns (lost, seconds inside flat windows, window ranges in µV (leads, windows), windows
    where the lead is constant: a cart blanking a lost input)."""
    count, n = x.shape
    duration = n / rate
    window = max(1, round(FLAT_WINDOW_S * rate))
    hop = max(1, round(FLAT_HOP_S * rate))
    ranges, starts = _windowed_range(x, window, hop)
    constant = ranges <= BLANKED_RANGE_UNITS * uv_per_unit
    # an input left floating picks up hum and nothing else: flat once the mains is taken out
    ranges = np.minimum(ranges, _windowed_range(_mains_free(x, rate), window, hop)[0])
    if duration >= FLAT_WINDOW_S:
        typical = stats.median(ranges, axis=0)  # when most leads are alive, flat is also relative
        small = (typical < FLAT_RANGE_UV) | (ranges < FLAT_SHARE_OF_TYPICAL * typical)
        flat = constant | ((ranges < FLAT_RANGE_UV) & small)
    else:  # too short for a beat in every window: only a constant lead is surely lost
        flat = constant.copy()
    pause = flat.all(axis=0) & ~constant.any(axis=0)
    if pause.all():
        pause[:] = False  # never a beat anywhere: no signal, not a pause
    flat &= ~pause[None, :]
    flat_s = np.zeros(count)
    stuck = np.zeros(count, dtype=bool)
    min_stuck = max(1, round(RAIL_STUCK_S * rate))
    for i in range(count):
        covered = np.zeros(n, dtype=bool)
        for start in starts[flat[i]]:
            covered[start : start + window] = True
        flat_s[i] = covered.sum() / rate
        run_starts, run_ends = _runs(at_rail[i])
        stuck[i] = bool(run_ends.size) and run_ends[-1] == n and run_ends[-1] - run_starts[-1] >= min_stuck
    return flat.any(axis=-1) | stuck, flat_s, ranges, constant


def _beatless(
    recording: EcgRecording, x: np.ndarray, at_rail: np.ndarray, off: np.ndarray, rail_s: np.ndarray, rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """Where no beat can be seen: (knocked, disturbed), per sample.

    `knocked` gathers every source:
    - a knocked electrode: the samples where a lead that is not lost (`off`) but saturated (at
      its rail for SATURATION_MIN_S or more of `rail_s`) sits at its rail; its step also runs
      through the central terminal into the other leads;
    - but not its own QRS peaks clipped at the rail (_clipped_peaks): those beats are real, and
      leaving them out would halve or double the rate;
    - samples lost in transit (`recording.gaps`): the two samples either side of each gap, whose
      sides do not join up (an RR interval across it would be short).
    `disturbed`: `knocked` widened by EXCLUDE_MARGIN_S either side, as detect_qrs widens its
    `exclude` (the filters' reach): where the noise measures bridge the signal."""
    n = x.shape[-1]
    knocked = (at_rail & ~_clipped_peaks(x, at_rail, rate))[(rail_s >= SATURATION_MIN_S) & ~off].any(axis=0)
    for gap in recording.gaps:
        if 0 < gap.start < n:
            knocked[gap.start - 1 : gap.start + 1] = True
    disturbed = knocked
    if knocked.any():  # within reach of a knocked sample: the mean of a 0/1 mask is k / width, exact
        disturbed = moving_average(knocked.astype(np.float64), 2 * round(EXCLUDE_MARGIN_S * rate) + 1) > 0.0
    return knocked, disturbed


def check_quality(recording: EcgRecording) -> QualityReport:
    """Analyse a recording. Raises EcgQualityError (only) for a rate outside 100-2000 Hz."""
    rate = float(recording.sampling_rate_hz)
    if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise EcgQualityError(
            f"cannot assess an ECG sampled at {rate:g} Hz (supported: {MIN_RATE_HZ:g}-{MAX_RATE_HZ:g} Hz)"
        )
    names = recording.lead_names
    samples = recording.samples
    x = samples.astype(np.float64) * recording.uv_per_unit
    count, n = x.shape
    duration = n / rate
    index = {name: i for i, name in enumerate(names)}
    recorded_limb = [index[t] for t in LIMB_TRIAD if t in index and t not in recording.derived_leads]
    derived_limb = [index[t] for t in LIMB_LEADS if t in index and t in recording.derived_leads]

    # --- the converter's rails; derived limb leads share their sources'
    at_rail = _at_limits(samples, x, converter_limits(recording), rate)
    if derived_limb and recorded_limb:
        at_rail[derived_limb] |= at_rail[recorded_limb].any(axis=0)

    off, flat_s, ranges, constant = _lost_leads(x, at_rail, rate, recording.uv_per_unit)

    # --- beats, from the leads that carry them: none looked for where none can be seen, and
    # the noise measures below bridge those stretches
    rail_s = at_rail.sum(axis=-1) / rate
    knocked, disturbed = _beatless(recording, x, at_rail, off, rail_s, rate)
    usable = ~off & (rail_s <= RAIL_SHARE_UNUSABLE * duration)
    detection = QrsDetection((), None, ())
    if usable.any():
        detection = detect_qrs(x[usable], rate, exclude=knocked)
    # the median beat of a hum-free copy: P and T polarity must not depend on the mains
    beat: MedianBeat | None = median_beat(_mains_free(x, rate), detection.beats, rate) if detection.beats else None
    waves = dict(zip(names, beat.waves)) if beat is not None else {}

    # --- an arm electrode on the right leg: one limb lead near zero, not lost
    neutral = _neutral_lead({t: w for t, w in waves.items() if not constant[index[t]].any()})
    if neutral is not None:
        off[index[neutral]] = False
    if derived_limb and recorded_limb and off[recorded_limb].any():
        off[derived_limb] = True  # computed from a lost lead: lost as well
    saturated = (rail_s >= SATURATION_MIN_S) & ~off
    quiet = ~off & ~saturated
    if neutral is not None:
        quiet[index[neutral]] = False

    findings: list[_Finding] = []
    details: list[dict[str, Any]] = []

    def add(finding: _Finding, detail: dict[str, Any] | None = None) -> None:
        findings.append(finding)
        details.append(detail or {})

    if off.any():
        lost = [names[i] for i in np.nonzero(off)[0]]
        add(_Finding(LEAD_OFF, lost, RE_RECORD, float(ranges[off].min()), "uV"))
    if saturated.any():
        worst = float(rail_s[saturated].max())
        add(
            _Finding(
                SATURATION,
                [names[i] for i in np.nonzero(saturated)[0]],
                RE_RECORD if worst >= SATURATION_RERECORD_S else WARN,
                worst,
                "s",
            )
        )

    # --- noise, on the leads that are neither lost nor clipped
    wander = np.zeros(count)
    mains = np.zeros(count)
    grid = np.full(count, MAINS_GRIDS_HZ[0])
    muscle = np.zeros(count)
    if duration >= MIN_SPECTRAL_S and quiet.any() and not disturbed.all():
        q = np.nonzero(quiet)[0]
        bridged = _bridged(x[q], disturbed, rate)
        wander[q] = _wander(bridged, rate)
        mains[q], grid[q] = _mains(bridged, rate)
        muscle[q] = _muscle(bridged, rate, detection.beats, disturbed)
    noisy = np.zeros(count, dtype=bool)
    for kind, values, warn_at, rerecord_at in (
        (BASELINE_WANDER, wander, WANDER_WARN_UV, WANDER_RERECORD_UV),
        (MAINS_NOISE, mains, MAINS_WARN_UV, MAINS_RERECORD_UV),
        (MUSCLE_NOISE, muscle, MUSCLE_WARN_UV, MUSCLE_RERECORD_UV),
    ):
        hit = quiet & (values >= warn_at)
        noisy |= hit
        if hit.any():
            worst = float(values[hit].max())
            add(
                _Finding(
                    kind,
                    [names[i] for i in np.nonzero(hit)[0]],
                    RE_RECORD if worst >= rerecord_at else WARN,
                    worst,
                    "uV",
                ),
                {"hz": float(grid[hit][np.argmax(values[hit])])},
            )

    # --- swapped electrodes
    if neutral is not None:
        arm = "RA" if neutral == "II" else "LA"
        add(_Finding(LIMB_LEAD_REVERSAL, [neutral], RE_RECORD), {"swap": (arm, "RL")})
    else:
        # only leads whose median beat is clean enough to trust the sign of a P wave
        found = _swap_from_waves({t: w for t, w in waves.items() if quiet[index[t]] and not noisy[index[t]]})
        if found is not None:
            swap, lead = found
            moved = ("I", "II", "III", "aVR", "aVL") if lead == "I" else ("I", "II", "III", "aVR", "aVF")
            add(_Finding(LIMB_LEAD_REVERSAL, [m for m in moved if m in index], RE_RECORD), {"swap": swap})

    if duration < TOO_SHORT_WARN_S:
        add(
            _Finding(TOO_SHORT, [], RE_RECORD if duration < TOO_SHORT_RERECORD_S else WARN, duration, "s"),
            {"seconds": duration},
        )

    problems = []
    verdict = ACCEPTABLE
    for finding, detail in zip(findings, details):
        finding.leads = sorted(finding.leads, key=index.__getitem__)
        zh, en = _message(finding, names, detail)
        problems.append(
            Problem(finding.kind, tuple(finding.leads), finding.severity, zh, en, finding.value, finding.unit)
        )
        verdict = _worse(finding.severity, verdict)
    measures = tuple(
        LeadMeasures(
            name,
            float(flat_s[i]),
            float(rail_s[i]),
            float(wander[i]),
            float(mains[i]),
            float(grid[i]),
            float(muscle[i]),
        )
        for i, name in enumerate(names)
    )
    return QualityReport(
        verdict=verdict,
        heart_rate_bpm=detection.heart_rate_bpm,
        beats=detection.beats,
        problems=tuple(problems),
        leads=measures,
        duration_s=duration,
    )
