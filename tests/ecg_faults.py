"""Physically modelled recording faults, applied to real ECGs (tests and bench/ecg_quality.py).

Faults happen at electrodes, not at leads. A recording is turned back into electrode
potentials against Wilson's central terminal (RA, LA, LL from two limb leads, each chest
electrode from its lead), the fault is applied to one electrode, and the leads are formed again
the way a cart forms them: recorded leads in the converter's units, clipped at the converter's
rails, and the derived leads computed from them with the decoder's own rounding
(devices.ecg.leads.derive_limb_leads). So a fault on the left-arm electrode shows in I, III,
aVR, aVL, aVF and a third of it in every chest lead, as it would on a real cart.

Fault models (amplitudes in µV at the electrode):
- electrode off, chest: the cart blanks the lead (writes 0) from some moment to the end; or the
  input, no longer held by the skin, drifts to the converter's rail (50 ms time constant).
- electrode off, limb: the input drifts to a rail; every lead using it goes there.
- saturation: an electrode knocked or pressed: its half-cell potential jumps by 1.2-3 times the
  converter's range for 0.05-1 s (10 ms edges), so the lead sits at the rail for that long.
- baseline wander: a sine of 0.1-0.5 Hz with 0.5-3 mV amplitude (peak; 1-6 mV peak-to-peak),
  random phase, at one electrode (breathing moving it, a drying gel).
- mains: 50 Hz (±0.2 Hz grid deviation) at 50-500 µV amplitude plus 10 % third harmonic, at one
  electrode (its contact impedance turns the body's common-mode hum into a lead signal).
  A 60 Hz variant exists for grids that run at 60.
- muscle (EMG): Gaussian noise band-limited to 20-150 Hz (or a given band), RMS 40-160 µV (or a
  given RMS), amplitude-modulated by a 0.2-1 Hz tremor envelope between 50 % and 100 %, at one
  electrode (a tense arm, a shivering chest).
- electrode swaps: LA/RA (I -> -I, II <-> III, aVR <-> aVL), RA/LL, and RA or LA on the right
  leg (its potential becomes the leg's: lead II or III nearly vanishes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from devices.ecg.leads import derive_limb_leads
from devices.ecg.quality import converter_limits
from devices.ecg.recording import EcgRecording

LIMB_ELECTRODES = ("RA", "LA", "LL")
ELECTRODE_LEADS = {  # the leads that carry an electrode's full potential
    "RA": ("I", "II", "aVR"),
    "LA": ("I", "III", "aVL"),
    "LL": ("II", "III", "aVF"),
}
UNAFFECTED = {"RA": "III", "LA": "II", "LL": "I"}  # the limb lead that does not see the electrode


@dataclass(frozen=True, slots=True)
class Fault:
    """What was done, and what a correct gate must report."""

    kind: str  # the quality kind expected
    electrode: str  # "RA", "LA", "LL", "V3" ... or a swap "RA/LA"
    description: str
    expect_leads: tuple[str, ...]  # must all be listed by the problem of that kind
    forbid_leads: tuple[str, ...] = ()  # must not be listed (physically unaffected)


def electrodes_of(rec: EcgRecording) -> dict[str, np.ndarray]:
    """Electrode potentials (µV, against Wilson's central terminal) of a recording."""
    uv = rec.microvolts()
    lead = {name: uv[i] for i, name in enumerate(rec.lead_names)}
    if "I" in lead and "II" in lead:
        i_, ii = lead["I"], lead["II"]
    elif "II" in lead and "III" in lead:
        ii = lead["II"]
        i_ = ii - lead["III"]
    else:
        raise ValueError("needs two of the limb leads I, II, III")
    out = {"RA": -(i_ + ii) / 3, "LA": (2 * i_ - ii) / 3, "LL": (2 * ii - i_) / 3}
    for name in rec.lead_names:
        if name not in ("I", "II", "III", "aVR", "aVL", "aVF"):
            out[name] = lead[name].copy()
    return out


def leads_from(rec: EcgRecording, electrodes: dict[str, np.ndarray]) -> EcgRecording:
    """Form the recording's leads from electrode potentials as its cart would (see module doc)."""
    ra, la, ll = electrodes["RA"], electrodes["LA"], electrodes["LL"]
    wct = (ra + la + ll) / 3
    formed = {
        "I": la - ra,
        "II": ll - ra,
        "III": ll - la,
        "aVR": ra - (la + ll) / 2,
        "aVL": la - (ra + ll) / 2,
        "aVF": ll - (ra + la) / 2,
    }
    for name in rec.lead_names:
        if name not in formed:
            formed[name] = electrodes[name] - wct
    recorded = [n for n in rec.lead_names if n not in rec.derived_leads]
    limits = dict(zip(rec.lead_names, converter_limits(rec)))
    rows = []
    for name in recorded:
        units = np.round(formed[name] / rec.uv_per_unit)
        lo, hi = limits[name] or (np.iinfo(rec.samples.dtype).min, np.iinfo(rec.samples.dtype).max)
        rows.append(np.clip(units, lo, hi).astype(np.int64))
    samples = np.stack(rows)
    if rec.derived_leads:
        rounding = "contec" if rec.source_format == "contec" else "toward-zero"
        samples, names, _ = derive_limb_leads(samples.astype(rec.samples.dtype), tuple(recorded), rounding=rounding)
        order = [names.index(n) for n in rec.lead_names]
        samples = samples[order]
    return dataclasses.replace(rec, samples=samples.astype(rec.samples.dtype))


def _t(rec: EcgRecording) -> np.ndarray:
    return np.arange(rec.n_samples) / rec.sampling_rate_hz


def _rail_uv(rec: EcgRecording) -> float:
    """The smallest positive rail (µV) among the recorded leads."""
    rails = [
        lim[1]
        for name, lim in zip(rec.lead_names, converter_limits(rec))
        if lim is not None and name not in rec.derived_leads
    ]
    return (min(rails) if rails else 32767) * rec.uv_per_unit


def _limb_expectation(electrode: str, rec: EcgRecording) -> tuple[tuple[str, ...], tuple[str, ...]]:
    names = set(rec.lead_names)
    expect = tuple(n for n in ELECTRODE_LEADS[electrode] if n in names)
    # the limb lead without this electrode stays clean, unless the cart computes it from one with
    unaffected = UNAFFECTED[electrode]
    forbid = (unaffected,) if unaffected in names and unaffected not in rec.derived_leads else ()
    return expect, forbid


def chest_electrodes(rec: EcgRecording) -> list[str]:
    return [n for n in rec.lead_names if n.startswith("V")]


def electrode_off(rec: EcgRecording, rng: np.random.Generator, electrode: str, mode: str) -> tuple[EcgRecording, Fault]:
    """mode: "blank" (chest only: the cart writes 0), "float" (chest only: the loose input
    picks up 0.2-2 mV of 50 Hz hum and no ECG) or "rail" (the input drifts to a rail)."""
    t = _t(rec)
    onset = float(rng.uniform(0.0, 0.6)) * rec.duration_s
    if mode == "blank":
        if electrode in LIMB_ELECTRODES:
            raise ValueError("carts blank chest leads; limb inputs are modelled drifting to a rail")
        i = rec.lead_names.index(electrode)
        samples = rec.samples.copy()
        samples[i, t >= onset] = 0
        fault = Fault("lead-off", electrode, f"{electrode} off (blanked) from {onset:.1f} s", (electrode,))
        return dataclasses.replace(rec, samples=samples), fault
    if mode == "float":
        if electrode in LIMB_ELECTRODES:
            raise ValueError("a floating limb input is modelled drifting to a rail")
        e = electrodes_of(rec)
        wct = (e["RA"] + e["LA"] + e["LL"]) / 3
        hum = float(rng.uniform(200.0, 2000.0)) * np.sin(2 * np.pi * 50.0 * t + rng.uniform(0, 2 * np.pi))
        e[electrode] = np.where(t >= onset, wct + hum, e[electrode])
        return leads_from(rec, e), Fault(
            "lead-off", electrode, f"{electrode} off (floating) from {onset:.1f} s", (electrode,)
        )
    e = electrodes_of(rec)
    sign = float(rng.choice([-1.0, 1.0]))
    drift = sign * 4.0 * _rail_uv(rec) * (1 - np.exp(-np.maximum(t - onset, 0) / 0.05))
    e[electrode] = e[electrode] + drift
    if electrode in LIMB_ELECTRODES:
        expect, forbid = _limb_expectation(electrode, rec)
    else:
        expect, forbid = (electrode,), ()
    return leads_from(rec, e), Fault(
        "lead-off", electrode, f"{electrode} off (to rail) from {onset:.1f} s", expect, forbid
    )


def saturation(rec: EcgRecording, rng: np.random.Generator, electrode: str) -> tuple[EcgRecording, Fault]:
    t = _t(rec)
    length = float(rng.uniform(0.05, 1.0))
    start = float(rng.uniform(0.5, max(0.6, rec.duration_s - length - 0.5)))
    height = float(rng.uniform(1.2, 3.0)) * _rail_uv(rec) * float(rng.choice([-1.0, 1.0]))
    edge = 0.01
    ramp = np.clip((t - start) / edge, 0, 1) * np.clip((start + length - t) / edge, 0, 1)
    e = electrodes_of(rec)
    # a limb electrode feeds the central terminal too: 1.5x keeps its own leads past the rail
    e[electrode] = e[electrode] + height * ramp * (1.5 if electrode in LIMB_ELECTRODES else 1.0)
    expect, forbid = _limb_expectation(electrode, rec) if electrode in LIMB_ELECTRODES else ((electrode,), ())
    return leads_from(rec, e), Fault(
        "saturation", electrode, f"{electrode} at the rail {start:.1f}-{start + length:.1f} s", expect, forbid
    )


def wander(rec: EcgRecording, rng: np.random.Generator, electrode: str) -> tuple[EcgRecording, Fault]:
    freq = float(rng.uniform(0.1, 0.5))
    amplitude = float(rng.uniform(500.0, 3000.0))
    e = electrodes_of(rec)
    e[electrode] = e[electrode] + amplitude * np.sin(2 * np.pi * freq * _t(rec) + rng.uniform(0, 2 * np.pi))
    expect, forbid = _limb_expectation(electrode, rec) if electrode in LIMB_ELECTRODES else ((electrode,), ())
    return leads_from(rec, e), Fault(
        "baseline-wander",
        electrode,
        f"{freq:.2f} Hz wander of {amplitude / 1000:.1f} mV at {electrode}",
        expect,
        forbid,
    )


def mains(
    rec: EcgRecording, rng: np.random.Generator, electrode: str, grid_hz: float = 50.0, amplitude: float | None = None
) -> tuple[EcgRecording, Fault]:
    freq = grid_hz + float(rng.uniform(-0.2, 0.2))
    amplitude = float(rng.uniform(50.0, 500.0)) if amplitude is None else amplitude
    phase = rng.uniform(0, 2 * np.pi)
    t = _t(rec)
    hum = amplitude * (np.sin(2 * np.pi * freq * t + phase) + 0.1 * np.sin(2 * np.pi * 3 * freq * t + 3 * phase))
    e = electrodes_of(rec)
    e[electrode] = e[electrode] + hum
    expect, forbid = _limb_expectation(electrode, rec) if electrode in LIMB_ELECTRODES else ((electrode,), ())
    return leads_from(rec, e), Fault(
        "mains-noise", electrode, f"{freq:.1f} Hz at {amplitude:.0f} µV on {electrode}", expect, forbid
    )


def band_noise(n: int, rate: float, band: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS Gaussian noise limited to a frequency band."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    spectrum[(freqs < band[0]) | (freqs > band[1])] = 0
    noise = np.fft.irfft(spectrum, n=n)
    return noise / (np.sqrt(np.mean(noise**2)) or 1.0)


def muscle(
    rec: EcgRecording,
    rng: np.random.Generator,
    electrode: str,
    rms: float | None = None,
    band_hz: tuple[float, float] = (20.0, 150.0),
) -> tuple[EcgRecording, Fault]:
    rms = float(rng.uniform(40.0, 160.0)) if rms is None else rms
    t = _t(rec)
    tremor = 0.75 + 0.25 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t + rng.uniform(0, 2 * np.pi))
    noise = rms * tremor * band_noise(rec.n_samples, rec.sampling_rate_hz, band_hz, rng)
    e = electrodes_of(rec)
    e[electrode] = e[electrode] + noise
    expect, forbid = _limb_expectation(electrode, rec) if electrode in LIMB_ELECTRODES else ((electrode,), ())
    return leads_from(rec, e), Fault("muscle-noise", electrode, f"EMG {rms:.0f} µV RMS at {electrode}", expect, forbid)


def swap(rec: EcgRecording, pair: str) -> tuple[EcgRecording, Fault]:
    """pair: "RA/LA", "RA/LL", "RA/RL" or "LA/RL" (an arm electrode on the right leg)."""
    e = electrodes_of(rec)
    if pair == "RA/LA":
        e["RA"], e["LA"] = e["LA"], e["RA"]
        expect = ("I",)
    elif pair == "RA/LL":
        e["RA"], e["LL"] = e["LL"], e["RA"]
        expect = ("II",)
    elif pair in ("RA/RL", "LA/RL"):
        # The right leg sits at nearly the left leg's potential (a few µV of difference): the arm
        # electrode clipped there reads the leg, and II (RA) or III (LA) nearly vanishes.
        rng = np.random.default_rng(0)
        arm = pair[:2]
        e[arm] = e["LL"] + 8.0 * band_noise(rec.n_samples, rec.sampling_rate_hz, (0.5, 40.0), rng)
        expect = ("II",) if arm == "RA" else ("III",)
    else:
        raise ValueError(pair)
    return leads_from(rec, e), Fault("limb-lead-reversal", pair, f"{pair} electrodes swapped", expect)


# ----------------------------------------------------------------------------- harmless changes


def resampled(rec: EcgRecording, rate_hz: float) -> EcgRecording:
    """The same ECG at another sampling rate (band-limited interpolation, as a cart at that rate
    would have recorded it). Derived leads are formed again from the recorded ones."""
    n = rec.n_samples
    m = int(round(n * rate_hz / rec.sampling_rate_hz))
    uv = rec.microvolts()
    spectrum = np.fft.rfft(uv, axis=-1)
    keep = min(spectrum.shape[-1], m // 2 + 1)
    out = np.fft.irfft(spectrum[:, :keep], n=m, axis=-1) * (m / n)
    units = np.round(out / rec.uv_per_unit)
    info = np.iinfo(rec.samples.dtype)
    samples = np.clip(units, info.min, info.max).astype(rec.samples.dtype)
    return dataclasses.replace(rec, samples=samples, sampling_rate_hz=float(rate_hz))


def with_everyday_noise(rec: EcgRecording, rng: np.random.Generator) -> EcgRecording:
    """What a good recording in a village clinic still has: amplifier noise (4 µV RMS), a
    breathing baseline (0.1 mV at 0.25 Hz) and a trace of 50 Hz (5 µV), at random electrodes."""
    e = electrodes_of(rec)
    t = _t(rec)
    for name in e:
        e[name] = e[name] + 4.0 * rng.standard_normal(rec.n_samples) / np.sqrt(3)
    chosen = list(e)
    e[str(rng.choice(chosen))] += 100.0 * np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 6.3))
    e[str(rng.choice(chosen))] += 5.0 * np.sin(2 * np.pi * 50.0 * t + rng.uniform(0, 6.3))
    return leads_from(rec, e)


def scaled(rec: EcgRecording, factor: float) -> EcgRecording:
    """A smaller or larger heart vector (thin or obese chest, ventricular hypertrophy)."""
    return leads_from(rec, {k: v * factor for k, v in electrodes_of(rec).items()})
