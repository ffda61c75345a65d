"""ECG quality gate: sensitivity per fault kind, false alarms on good ECGs, analysis time.

    .venv/bin/python bench/ecg_quality.py [--json] [--seeds N] [--runs N] [--shared ../shared]

Clean set: every real ECG in ../shared/ecg that a cardiologist would accept, plus pydicom's
waveform_ecg.dcm; and harmless variants of them (resampled to 200-1000 Hz, everyday amplifier
noise / breathing / a trace of hum, low voltage). A false alarm is any verdict but "acceptable".

Corrupted set: each distinct clean ECG with each physically modelled fault of tests/ecg_faults.py
(electrode off, rail saturation, 0.1-0.5 Hz wander of 0.5-3 mV, 50/60 Hz at 50-500 µV, EMG,
electrode swaps), `--seeds` random draws each (electrode, size, timing). Found = a problem of
the fault's kind that lists the expected leads and none of the physically unaffected ones.

Time: check_quality per recording over every recording analysed (median, p95), and for the
10 s 12-lead 500 Hz file repeated `--runs` times, as a ratio to the 150 ms budget and to the
time decoding that same file takes (a reference measured in the same run).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devices.ecg.formats import decode_ecg
from devices.ecg.quality import ACCEPTABLE, check_quality
from devices.ecg.recording import EcgRecording
from tests import ecg_faults as faults

BUDGET_MS = 150.0
GOOD = {
    "ecgtoolkit-scp": "ecg/scp/ecgtoolkit_Example.scp",
    "ecgtoolkit-aecg": "ecg/aecg/fda_hl7_Example_aECG.xml",
    "ecgtoolkit-dicom": "ecg/dicom/ecgtoolkit_Example.dcm",
    "welch-allyn-scp": "ecg/scp/abtahi_ECG_20170504_163507_123456789.SCP",
    "contec-50": "ecg/contec/0000050.ECG",
    "mortara-dicom": None,
}
BASES = ["ecgtoolkit-scp", "welch-allyn-scp", "contec-50", "mortara-dicom"]  # distinct ECGs
FAULT_KINDS = [
    "lead-off (chest, blanked)",
    "lead-off (chest, floating)",
    "lead-off (chest, to rail)",
    "lead-off (limb, to rail)",
    "saturation",
    "baseline-wander",
    "mains-noise 50 Hz",
    "mains-noise 60 Hz",
    "muscle-noise",
    "limb-lead-reversal RA/LA",
    "limb-lead-reversal RA/LL",
    "limb-lead-reversal RA/RL",
    "limb-lead-reversal LA/RL",
]


def load(shared: Path) -> dict[str, tuple[EcgRecording, bytes]]:
    import pydicom.data

    out = {}
    for name, rel in GOOD.items():
        path = Path(pydicom.data.get_testdata_file("waveform_ecg.dcm")) if rel is None else shared / rel
        data = path.read_bytes()
        out[name] = (decode_ecg(data, path.name), data)
    return out


def timed(rec: EcgRecording, times: list[float]):
    t = time.perf_counter()
    report = check_quality(rec)
    elapsed = (time.perf_counter() - t) * 1000
    times.append(elapsed)
    PER_10_S.append(elapsed * 10.0 / max(rec.duration_s, 1e-9))
    return report


PER_10_S: list[float] = []  # the same times scaled to 10 s of signal (the Contec files run 47 s)


def corrupt(rec: EcgRecording, kind: str, rng: np.random.Generator):
    chest = faults.chest_electrodes(rec)
    limb = list(faults.LIMB_ELECTRODES)
    anywhere = chest + limb
    if kind.startswith("lead-off (chest"):
        if not chest:
            return None
        mode = {"blanked": "blank", "floating": "float", "to rail": "rail"}[kind.split(", ")[1][:-1]]
        return faults.electrode_off(rec, rng, str(rng.choice(chest)), mode)
    if kind == "lead-off (limb, to rail)":
        return faults.electrode_off(rec, rng, str(rng.choice(limb)), "rail")
    if kind == "saturation":
        return faults.saturation(rec, rng, str(rng.choice(anywhere)))
    if kind == "baseline-wander":
        return faults.wander(rec, rng, str(rng.choice(anywhere)))
    if kind.startswith("mains-noise"):
        return faults.mains(rec, rng, str(rng.choice(anywhere)), grid_hz=float(kind.split()[1]))
    if kind == "muscle-noise":
        return faults.muscle(rec, rng, str(rng.choice(anywhere)))
    return faults.swap(rec, kind.split()[1])


def _sized_mains(rec: EcgRecording, rng: np.random.Generator, size: float):
    return faults.mains(rec, rng, str(rng.choice(faults.chest_electrodes(rec) or ["LA"])), amplitude=size)


def _sized_wander(rec: EcgRecording, rng: np.random.Generator, size: float):
    e = faults.electrodes_of(rec)
    target = str(rng.choice(faults.chest_electrodes(rec) or ["LA"]))
    t = np.arange(rec.n_samples) / rec.sampling_rate_hz
    e[target] = e[target] + size / 2 * np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 6.3))
    expect = (target,) if target.startswith("V") else ("I", "III", "aVL")
    return faults.leads_from(rec, e), faults.Fault("baseline-wander", target, "", expect)


def _sized_muscle(rec: EcgRecording, rng: np.random.Generator, size: float):
    e = faults.electrodes_of(rec)
    target = str(rng.choice(faults.chest_electrodes(rec) or ["LA"]))
    e[target] = e[target] + size * faults.band_noise(rec.n_samples, rec.sampling_rate_hz, (20.0, 150.0), rng)
    expect = (target,) if target.startswith("V") else ("I", "III", "aVL")
    return faults.leads_from(rec, e), faults.Fault("muscle-noise", target, "", expect)


SWEEPS = [  # (label, sizes, fault of that size at one electrode)
    ("50 Hz amplitude (µV)", (10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0), _sized_mains),
    ("wander peak-to-peak (µV)", (400.0, 550.0, 700.0, 850.0, 1000.0), _sized_wander),
    ("EMG RMS (µV)", (20.0, 25.0, 30.0, 35.0, 40.0, 50.0), _sized_muscle),
]


def run(shared: Path, seeds: int, runs: int) -> dict:
    recordings = load(shared)
    times: list[float] = []
    clean = {}
    for name, (rec, _) in recordings.items():
        report = timed(rec, times)
        clean[name] = {
            "verdict": report.verdict,
            "heart_rate_bpm": report.heart_rate_bpm,
            "problems": [p.kind for p in report.problems],
        }
    variants = []
    for name in BASES:
        rec = recordings[name][0]
        candidates = [(f"{rate:g} Hz", faults.resampled(rec, rate)) for rate in (200.0, 250.0, 360.0, 1000.0)]
        candidates += [
            (f"everyday noise #{s}", faults.with_everyday_noise(rec, np.random.default_rng(s))) for s in range(3)
        ]
        candidates += [("low voltage x0.25", faults.scaled(rec, 0.25))]
        for label, variant in candidates:
            report = timed(variant, times)
            variants.append(
                {
                    "base": name,
                    "variant": label,
                    "verdict": report.verdict,
                    "problems": [p.kind for p in report.problems],
                }
            )

    per_kind: dict[str, collections.Counter] = {k: collections.Counter() for k in FAULT_KINDS}
    missed = []
    for name in BASES:
        rec = recordings[name][0]
        for kind in FAULT_KINDS:
            draws = 1 if kind.startswith("limb-lead-reversal") else seeds
            for seed in range(draws):
                made = corrupt(rec, kind, np.random.default_rng(seed))
                if made is None:
                    continue
                bad, fault = made
                report = timed(bad, times)
                hits = [p for p in report.problems if p.kind == fault.kind]
                found = any(set(fault.expect_leads) <= set(p.leads) for p in hits) and not any(
                    set(fault.forbid_leads) & set(p.leads) for p in hits
                )
                c = per_kind[kind]
                c["cases"] += 1
                c["found"] += found
                c["not_acceptable"] += report.verdict != ACCEPTABLE
                c["other_kinds"] += any(p.kind != fault.kind for p in report.problems)
                if not found:
                    missed.append(
                        {
                            "base": name,
                            "fault": fault.description,
                            "reported": [(p.kind, list(p.leads)) for p in report.problems],
                        }
                    )

    # where detection starts: fault size swept below and into the modelled range
    sweeps = {}
    for label, sizes, make in SWEEPS:
        found_by_size = {}
        for size in sizes:
            hits = total = 0
            for name in BASES:
                rec = recordings[name][0]
                for seed in range(3):
                    rng = np.random.default_rng(100 + seed)
                    bad, fault = make(rec, rng, size)
                    report = timed(bad, times)
                    total += 1
                    hits += any(
                        p.kind == fault.kind and set(fault.expect_leads) <= set(p.leads) for p in report.problems
                    )
            found_by_size[size] = round(hits / total, 2)
        sweeps[label] = found_by_size

    # the 10 s, 12-lead, 500 Hz recording, again and again
    rec, data = recordings["ecgtoolkit-scp"]
    check_quality(rec)
    repeat = []
    for _ in range(runs):
        t = time.perf_counter()
        check_quality(rec)
        repeat.append((time.perf_counter() - t) * 1000)
    decode = []
    for _ in range(runs):
        t = time.perf_counter()
        decode_ecg(data, "x.scp")
        decode.append((time.perf_counter() - t) * 1000)
    ten_s = statistics.median(repeat)
    ordered = sorted(times)
    return {
        "clean_real": clean,
        "clean_real_false_alarms": sum(v["verdict"] != ACCEPTABLE for v in clean.values()),
        "clean_variants_false_alarms": sum(v["verdict"] != ACCEPTABLE for v in variants),
        "clean_variants": len(variants),
        "variants_flagged": [v for v in variants if v["verdict"] != ACCEPTABLE],
        "faults": {
            k: {
                "cases": c["cases"],
                "found": c["found"],
                "sensitivity": round(c["found"] / c["cases"], 3) if c["cases"] else None,
                "not_acceptable": c["not_acceptable"],
                "with_other_kinds": c["other_kinds"],
            }
            for k, c in per_kind.items()
        },
        "missed": missed,
        "detection_by_size": sweeps,
        "time_ms": {
            "recordings": len(times),
            "median": round(statistics.median(times), 1),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
            "max": round(ordered[-1], 1),
            "per_10_s_of_signal_median": round(statistics.median(PER_10_S), 1),
            "per_10_s_of_signal_p95": round(sorted(PER_10_S)[int(0.95 * (len(PER_10_S) - 1))], 1),
            "ten_s_12_lead_500_hz_median": round(ten_s, 1),
            "ten_s_vs_budget": round(ten_s / BUDGET_MS, 3),
            "ten_s_vs_decoding_the_file": round(ten_s / statistics.median(decode), 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seeds", type=int, default=10, help="random draws per base ECG and fault kind")
    parser.add_argument("--runs", type=int, default=30, help="repeats for the 10 s 12-lead timing")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args()
    if not (args.shared / "ecg").is_dir():
        sys.exit(f"{args.shared}/ecg not found (the shared third-party ECG files): pass --shared")
    result = run(args.shared, args.seeds, args.runs)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return
    print("Clean set (real ECGs a cardiologist accepts):")
    for name, v in result["clean_real"].items():
        rate = "-" if v["heart_rate_bpm"] is None else f"{v['heart_rate_bpm']:.1f} bpm"
        print(f"  {name:18s} {v['verdict']:11s} {rate}")
    print(
        f"  false alarms: {result['clean_real_false_alarms']}/{len(result['clean_real'])} real, "
        f"{result['clean_variants_false_alarms']}/{result['clean_variants']} harmless variants"
    )
    print(f"\nModelled faults ({args.seeds} draws per base ECG and kind; swaps: 1):")
    print(f"  {'fault':28s} {'cases':>5s} {'found':>5s} {'sens.':>6s} {'not acc.':>8s} {'+other':>6s}")
    for kind, f in result["faults"].items():
        sens = "-" if f["sensitivity"] is None else f"{f['sensitivity']:.0%}"
        print(
            f"  {kind:28s} {f['cases']:5d} {f['found']:5d} {sens:>6s} {f['not_acceptable']:8d} "
            f"{f['with_other_kinds']:6d}"
        )
    for m in result["missed"]:
        print(f"  missed: {m['base']}: {m['fault']} -> {m['reported'] or 'nothing'}")
    print("\nDetection by fault size (one electrode, 4 ECGs x 3 draws):")
    for label, by_size in result["detection_by_size"].items():
        print(f"  {label:26s} " + "  ".join(f"{size:g}: {share:.0%}" for size, share in by_size.items()))
    t = result["time_ms"]
    print(
        f"\nAnalysis time per recording ({t['recordings']} recordings): median {t['median']} ms, "
        f"p95 {t['p95']} ms, max {t['max']} ms; per 10 s of signal: median {t['per_10_s_of_signal_median']} ms, "
        f"p95 {t['per_10_s_of_signal_p95']} ms"
    )
    print(
        f"10 s 12-lead 500 Hz: {t['ten_s_12_lead_500_hz_median']} ms = {t['ten_s_vs_budget']:.2f} x the "
        f"{BUDGET_MS:g} ms budget, {t['ten_s_vs_decoding_the_file']:.2f} x decoding the file"
    )


if __name__ == "__main__":
    main()
