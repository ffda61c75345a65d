"""The ECG quality gate (devices/ecg/quality.py) on real ECGs, on the same ECGs with physically
modelled faults (tests/ecg_faults.py), and on anything a decoder can produce."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.ecg import quality
from devices.ecg.formats import decode_ecg
from devices.ecg.median_beat import median_beat
from devices.ecg.qrs import detect_qrs
from devices.ecg.quality import (
    ACCEPTABLE,
    KINDS,
    RE_RECORD,
    VERDICTS,
    WARN,
    EcgQualityError,
    check_quality,
    converter_limits,
)
from devices.ecg.recording import STANDARD_12_LEADS, EcgRecording, SampleGap
from devices.ecg.scp import read_sections, section_body
from devices.errors import DeviceError
from tests import ecg_faults as faults
from tests.conftest import shared_file
from tests.ecg_factories import device_recording
from tests.real_ecgs import GOOD, recording

MINIMAL_AECG = [
    "fda_minimum_aecg.xml",
    "fda_minimum_aecg_effectiveTime_high.xml",
    "fda_minimum_aecg_effectiveTime_interval.xml",
    "fda_minimum_aecg_effectiveTime_low.xml",
    "fda_minimum_aecg_nouuid.xml",
]


# ----------------------------------------------------------------------------- real ECGs


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_good_real_ecg_is_acceptable(name: str) -> None:
    report = check_quality(recording(name))
    assert report.verdict == ACCEPTABLE, [p.message_en for p in report.problems]
    assert report.problems == ()
    assert report.heart_rate_bpm is not None and len(report.beats) >= 10


def test_contec_limb_leads_with_strong_mains_is_not_acceptable() -> None:
    """0000037.ECG: chest electrodes not attached, no filter, 50 Hz as big as the ECG in II."""
    report = check_quality(recording("contec-37"))
    assert report.verdict == RE_RECORD
    mains = next(p for p in report.problems if p.kind == "mains-noise")
    assert {"I", "II", "aVR"} <= set(mains.leads) and "III" not in mains.leads
    assert mains.value is not None and mains.value > 75  # µV amplitude of the line
    assert "50 Hz" in mains.message_en and "50 Hz" in mains.message_zh
    # the hum is in I and II but not III: the right-arm electrode is the one to fix
    assert "right-arm (R)" in mains.message_en and "右臂（R）" in mains.message_zh


@pytest.mark.parametrize("name", MINIMAL_AECG)
def test_a_thirteen_sample_aecg_is_too_short_and_nothing_else(name: str) -> None:
    rec = decode_ecg(shared_file("ecg", "aecg", name).read_bytes(), name)
    report = check_quality(rec)
    assert report.verdict == RE_RECORD
    assert [p.kind for p in report.problems] == ["too-short"]
    assert report.problems[0].leads == ()
    assert report.heart_rate_bpm is None and report.to_json()["heart_rate_bpm"] is None


def test_same_ecg_in_three_formats_gives_the_same_report() -> None:
    reports = [check_quality(recording(n)) for n in ("ecgtoolkit-scp", "ecgtoolkit-aecg", "ecgtoolkit-dicom")]
    assert reports[0].beats == reports[1].beats == reports[2].beats
    assert reports[0].to_json() == reports[1].to_json() == reports[2].to_json()


# ----------------------------------------------------------------------------- the cart's own rate


def scp_cart_rate(path: Path) -> tuple[float, int]:
    """(average RR in ms, ventricular rate in bpm) from SCP-ECG section 7 (global measurements):
    bytes 2-3 the average RR, and after the per-beat-type blocks (16 bytes each) and the
    pacemaker spikes, the QRS count (2 bytes) then the ventricular rate (2 bytes)."""
    record, sections = read_sections(path.read_bytes())
    body = section_body(record, sections[7])
    types, spikes = body[0], body[1]
    rr_ms = int.from_bytes(body[2:4], "little")
    pos = 6 + 16 * types + 4 * spikes
    qrs_count = int.from_bytes(body[pos : pos + 2], "little")
    pos += 2 + qrs_count
    return rr_ms, int.from_bytes(body[pos : pos + 2], "little")


def dicom_cart_rr_ms(path: Path) -> float:
    ds = pydicom.dcmread(path)
    for item in ds.WaveformAnnotationSequence:
        names = item.get("ConceptNameCodeSequence") or []
        if names and names[0].CodeMeaning == "RR Interval":
            return float(item.NumericValue)
    raise AssertionError("no RR Interval annotation")


def aecg_cart_beats_s(path: Path) -> np.ndarray:
    """QRS onsets of the cart's beat annotations (MDC_ECG_WAVC_QRSWAVE), seconds of the day."""
    text = path.read_text(encoding="utf-8")
    lows = re.findall(r'code="MDC_ECG_WAVC_QRSWAVE".*?<low value="\d{8}(\d\d)(\d\d)(\d\d\.\d+)"', text, re.S)
    return np.array([int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in lows])


def test_heart_rate_matches_the_welch_allyn_carts_measurement() -> None:
    rr_ms, rate = scp_cart_rate(shared_file("ecg", "scp", "abtahi_ECG_20170504_163507_123456789.SCP"))
    assert (rr_ms, rate) == (1000, 60)  # what the cart wrote
    assert check_quality(recording("welch-allyn-scp")).heart_rate_bpm == pytest.approx(rate, abs=3)


def test_heart_rate_matches_the_mortara_carts_rr_interval() -> None:
    rr_ms = dicom_cart_rr_ms(Path(pydicom.data.get_testdata_file("waveform_ecg.dcm")))
    assert rr_ms == 982
    assert check_quality(recording("mortara-dicom")).heart_rate_bpm == pytest.approx(60000 / rr_ms, abs=3)


def test_heart_rate_and_beats_match_the_aecg_beat_annotations() -> None:
    path = shared_file("ecg", "aecg", "fda_hl7_Example_aECG.xml")
    onsets = aecg_cart_beats_s(path)
    assert onsets.size == 12
    cart_rate = 60 / np.diff(onsets).mean()  # 71.6 bpm
    report = check_quality(recording("ecgtoolkit-aecg"))
    assert report.heart_rate_bpm == pytest.approx(cart_rate, abs=3)
    # every annotated beat found, each of our peaks 0-150 ms after the cart's QRS onset
    rec = recording("ecgtoolkit-aecg")
    ours = np.array(report.beats) / rec.sampling_rate_hz
    start = rec.acquired_at.hour * 3600 + rec.acquired_at.minute * 60 + rec.acquired_at.second
    lag = ours - (onsets - start)
    assert ours.size == onsets.size and np.all((lag > 0) & (lag < 0.15)), lag


def test_scp_section_7_parser_is_not_a_tautology() -> None:
    """The ECGToolkit SCP file leaves the rate undefined (29999): the parser must say so."""
    rr_ms, _ = scp_cart_rate(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"))
    assert rr_ms == 29999


# ----------------------------------------------------------------------------- modelled faults

BASES = ["ecgtoolkit-scp", "welch-allyn-scp", "contec-50", "mortara-dicom"]


def _fault_cases() -> list[tuple[str, str, int]]:
    cases = []
    for base in BASES:
        for kind in (
            "off-blank",
            "off-float",
            "off-rail",
            "off-limb",
            "saturation",
            "wander",
            "mains-50",
            "mains-60",
            "muscle",
        ):
            if kind in ("off-blank", "off-float", "off-rail") and base == "contec-50":
                continue  # no chest leads
            cases += [(base, kind, seed) for seed in range(2)]
        # RA/LL is told by P waves: the Contec recording is in atrial fibrillation (a known miss)
        swaps = ["RA/LA", "RA/RL", "LA/RL"] + ([] if base == "contec-50" else ["RA/LL"])
        cases += [(base, f"swap-{pair}", 0) for pair in swaps]
    return cases


def corrupt(rec: EcgRecording, kind: str, seed: int) -> tuple[EcgRecording, faults.Fault]:
    rng = np.random.default_rng(seed)
    chest = faults.chest_electrodes(rec)
    limb = list(faults.LIMB_ELECTRODES)
    anywhere = chest + limb
    if kind == "off-blank":
        return faults.electrode_off(rec, rng, str(rng.choice(chest)), "blank")
    if kind == "off-float":
        return faults.electrode_off(rec, rng, str(rng.choice(chest)), "float")
    if kind == "off-rail":
        return faults.electrode_off(rec, rng, str(rng.choice(chest)), "rail")
    if kind == "off-limb":
        return faults.electrode_off(rec, rng, str(rng.choice(limb)), "rail")
    if kind == "saturation":
        return faults.saturation(rec, rng, str(rng.choice(anywhere)))
    if kind == "wander":
        return faults.wander(rec, rng, str(rng.choice(anywhere)))
    if kind.startswith("mains"):
        return faults.mains(rec, rng, str(rng.choice(anywhere)), grid_hz=float(kind[-2:]))
    if kind == "muscle":
        return faults.muscle(rec, rng, str(rng.choice(anywhere)))
    return faults.swap(rec, kind.removeprefix("swap-"))


def detected(report: quality.QualityReport, fault: faults.Fault) -> bool:
    found = [p for p in report.problems if p.kind == fault.kind]
    return any(set(fault.expect_leads) <= set(p.leads) for p in found) and not any(
        set(fault.forbid_leads) & set(p.leads) for p in found
    )


@pytest.mark.parametrize("base, kind, seed", _fault_cases())
def test_each_modelled_fault_is_found_with_its_kind_and_lead(base: str, kind: str, seed: int) -> None:
    clean = recording(base)
    bad, fault = corrupt(clean, kind, seed)
    report = check_quality(bad)
    assert detected(report, fault), (fault, [(p.kind, p.leads) for p in report.problems])
    assert report.verdict != ACCEPTABLE
    # the rate survives the fault (beats hidden by a clipped stretch are skipped, not invented)
    if fault.kind != "lead-off":
        assert report.heart_rate_bpm == pytest.approx(check_quality(clean).heart_rate_bpm, abs=3)


@pytest.mark.parametrize("base", BASES)
def test_heavy_tremor_alone_is_muscle_noise_not_mains_hum(base: str) -> None:
    """300 µV of tremor in 30-80 Hz at one electrode, no hum, ten patients per real ECG: the doctor
    is told to let the patient relax, never to unplug appliances or check the cable. Before the mains
    measure asked a line to stand out of the spectrum beside it, 18 of these 40 read 26-48 µV of
    "mains" (a warning) in the leads of the shivering electrode."""
    clean = recording(base)
    electrodes = faults.chest_electrodes(clean) + list(faults.LIMB_ELECTRODES)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        bad, fault = faults.muscle(clean, rng, str(rng.choice(electrodes)), rms=300.0, band_hz=(30.0, 80.0))
        report = check_quality(bad)
        assert detected(report, fault), (seed, fault, [(p.kind, p.leads) for p in report.problems])
        assert "mains-noise" not in [p.kind for p in report.problems], (seed, fault.description)


def test_a_fault_check_can_fail() -> None:
    """The harness itself: an expectation the report does not meet is reported as missed."""
    clean = recording("welch-allyn-scp")
    _, fault = faults.mains(clean, np.random.default_rng(0), "V3")
    assert not detected(check_quality(clean), fault)


def test_chest_electrode_off_says_exactly_which_one() -> None:
    bad, _ = faults.electrode_off(recording("welch-allyn-scp"), np.random.default_rng(1), "V3", "blank")
    report = check_quality(bad)
    off = [p for p in report.problems if p.kind == "lead-off"]
    assert len(off) == 1 and off[0].leads == ("V3",)
    assert off[0].message_zh == "V3 电极脱落，请重新贴好后重做"
    assert off[0].message_en == "V3 electrode off: reattach and record again"
    assert report.verdict == RE_RECORD


def test_limb_electrode_off_names_the_electrode_not_twelve_leads() -> None:
    bad, _ = faults.electrode_off(recording("mortara-dicom"), np.random.default_rng(2), "LA", "rail")
    report = check_quality(bad)
    (off,) = [p for p in report.problems if p.kind == "lead-off"]
    assert "II" not in off.leads and {"I", "III", "aVL"} <= set(off.leads)
    assert off.message_zh.startswith("左臂（L）电极脱落") and off.message_en.startswith("Left-arm (L) electrode off")


def test_arm_swap_says_to_swap_the_arm_electrodes() -> None:
    bad, _ = faults.swap(recording("ecgtoolkit-scp"), "RA/LA")
    (problem,) = check_quality(bad).problems
    assert problem.kind == "limb-lead-reversal" and "I" in problem.leads
    assert "右臂（R）和左臂（L）" in problem.message_zh
    assert "swap the right-arm (R) and left-arm (L)" in problem.message_en


def test_arm_on_the_right_leg_is_a_swap_not_a_lost_electrode() -> None:
    bad, _ = faults.swap(recording("welch-allyn-scp"), "RA/RL")
    report = check_quality(bad)
    (swap,) = [p for p in report.problems if p.kind == "limb-lead-reversal"]
    assert swap.leads == ("II",) and "右腿（N）" in swap.message_zh
    assert swap.message_en.startswith("Lead II nearly flat: the right-arm (R) electrode")
    # II is not "off"; (the central terminal moved with RA, so a chest lead may change: not checked)
    assert not any("II" in p.leads for p in report.problems if p.kind == "lead-off")


def test_mains_amplitude_is_measured_in_microvolts() -> None:
    clean = recording("welch-allyn-scp")
    for amplitude in (40.0, 100.0, 300.0):
        bad, _ = faults.mains(clean, np.random.default_rng(3), "V2", amplitude=amplitude)
        v2 = next(m for m in check_quality(bad).leads if m.lead == "V2")
        # the line plus 10 % third harmonic: sqrt(1 + 0.01) x the amplitude
        assert v2.mains_uv == pytest.approx(amplitude * np.sqrt(1.01), rel=0.1)
        assert v2.mains_hz == 50.0


def test_severity_follows_the_size_of_the_fault() -> None:
    clean = recording("mortara-dicom")
    small, _ = faults.mains(clean, np.random.default_rng(4), "V4", amplitude=40.0)
    large, _ = faults.mains(clean, np.random.default_rng(4), "V4", amplitude=300.0)
    assert check_quality(small).verdict == WARN
    assert check_quality(large).verdict == RE_RECORD


# ----------------------------------------------------------------------------- harmless changes


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("rate", [200.0, 250.0, 360.0, 1000.0])
def test_every_accepted_rate_gives_the_same_verdict_and_rate(base: str, rate: float) -> None:
    clean = recording(base)
    report = check_quality(faults.resampled(clean, rate))
    assert report.verdict == ACCEPTABLE, [p.message_en for p in report.problems]
    assert report.heart_rate_bpm == pytest.approx(check_quality(clean).heart_rate_bpm, abs=1)


@pytest.mark.parametrize("base", BASES)
def test_everyday_noise_and_low_voltage_are_no_fault(base: str) -> None:
    clean = recording(base)
    for variant in (faults.with_everyday_noise(clean, np.random.default_rng(5)), faults.scaled(clean, 0.25)):
        report = check_quality(variant)
        assert report.verdict == ACCEPTABLE, [p.message_en for p in report.problems]


@pytest.mark.parametrize(
    "leads",
    [
        ("II",),
        ("V1",),
        ("aVL",),
        ("I", "II", "III", "aVR", "aVL", "aVF"),
        ("V4", "V5", "V6"),
        ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6"),
    ],
)
def test_beats_are_found_on_any_lead_set(leads: tuple[str, ...]) -> None:
    clean = recording("mortara-dicom")
    idx = [clean.lead_names.index(n) for n in leads]
    subset = dataclasses.replace(clean, samples=clean.samples[idx], lead_names=leads, derived_leads=frozenset())
    report = check_quality(subset)
    assert report.verdict == ACCEPTABLE
    assert report.heart_rate_bpm == pytest.approx(60000 / 982, abs=3)


def test_extra_leads_keep_their_names() -> None:
    """A 15-lead ECG (V3R, V4R, V7 added) is analysed lead by lead under its own names."""
    clean = recording("mortara-dicom")
    extra = np.stack([-clean.lead("V3"), -clean.lead("V4"), clean.lead("V6")])
    names = STANDARD_12_LEADS + ("V3R", "V4R", "V7")
    rec = dataclasses.replace(clean, samples=np.concatenate([clean.samples, extra]), lead_names=names)
    bad, _fault = faults.electrode_off(rec, np.random.default_rng(0), "V4R", "blank")
    report = check_quality(bad)
    assert [(p.kind, p.leads) for p in report.problems] == [("lead-off", ("V4R",))]
    assert report.problems[0].message_en.startswith("V4R electrode off")


# ----------------------------------------------------------------------------- synthetic edge cases


def test_the_issues_example_nine_flat_leads_and_one_at_the_rail() -> None:
    clean = recording("welch-allyn-scp")
    samples = np.zeros_like(clean.samples)
    samples[:2] = clean.samples[:2]
    samples[2] = 32767
    rec = dataclasses.replace(clean, samples=samples, derived_leads=frozenset())
    report = check_quality(rec)
    assert report.verdict == RE_RECORD
    (off,) = [p for p in report.problems if p.kind == "lead-off"]
    assert set(off.leads) == set(clean.lead_names[2:])


def test_a_pause_of_the_heart_is_not_a_lost_electrode() -> None:
    """Three seconds with no beat (sinus arrest): every lead is flat but alive at once."""
    clean = recording("welch-allyn-scp")
    rate = clean.sampling_rate_hz
    x = clean.microvolts()
    rng = np.random.default_rng(0)
    paused = x.copy()
    a, b = int(3.2 * rate), int(6.2 * rate)
    paused[:, a:b] = np.median(x, axis=-1, keepdims=True) + rng.normal(0, 3, (x.shape[0], b - a))
    units = np.round(paused / clean.uv_per_unit).astype(np.int16)
    report = check_quality(dataclasses.replace(clean, samples=units))
    assert "lead-off" not in [p.kind for p in report.problems]


def test_no_signal_at_all_is_lead_off_on_every_lead() -> None:
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 3, (12, 5000)).round().astype(np.int16)
    report = check_quality(device_recording(noise))
    (off,) = [p for p in report.problems if p.kind == "lead-off"]
    assert off.leads == STANDARD_12_LEADS and "所有导联" in off.message_zh


def test_clipping_is_found_where_the_converters_range_is_unknown() -> None:
    """aECG digits are plain integers (int32 here): a far plateau at the extreme is the rail."""
    clean = recording("ecgtoolkit-aecg")
    samples = clean.samples.astype(np.int32) * 4  # 0.625 µV units: no 16-bit rail to go by
    rec = dataclasses.replace(clean, samples=samples, uv_per_unit=clean.uv_per_unit / 4)
    assert converter_limits(rec) == [None] * 12
    v2 = rec.lead_names.index("V2")
    bump = np.zeros(rec.n_samples, dtype=np.int64)
    bump[2000:2400] = int(5000 / rec.uv_per_unit)  # the electrode knocked: +5 mV for 0.8 s ...
    clipped = samples.copy()
    clipped[v2] = np.minimum(samples[v2] + bump, int(3000 / rec.uv_per_unit))  # ... the amplifier stops at 3 mV
    report = check_quality(dataclasses.replace(rec, samples=clipped))
    sat = [p for p in report.problems if p.kind == "saturation"]
    assert sat and "V2" in sat[0].leads


def test_samples_lost_in_transit_do_not_shorten_an_rr_interval() -> None:
    clean = recording("mortara-dicom")
    cut = slice(4200, 4900)  # 0.7 s that never arrived over the bridge link
    kept = np.concatenate([clean.samples[:, : cut.start], clean.samples[:, cut.stop :]], axis=1)
    streamed = dataclasses.replace(clean, samples=kept, gaps=(SampleGap(cut.start, cut.stop - cut.start),))
    assert check_quality(streamed).heart_rate_bpm == pytest.approx(60000 / 982, abs=1)
    unknown = dataclasses.replace(streamed, gaps=())  # the same samples, the gap not declared
    # the check can fail: counted across the join, the rate is off (here a beat was lost too)
    assert abs(check_quality(unknown).heart_rate_bpm - 60000 / 982) > 1.5


def test_contec_rails_are_twelve_bit() -> None:
    rec = recording("contec-50")
    limits = dict(zip(rec.lead_names, converter_limits(rec)))
    assert limits["II"] == (-2048, 2047) and limits["III"] == (-2048, 2047)
    assert limits["I"] is None  # derived: computed from II and III, no converter of its own


def test_rates_outside_the_analysed_range_raise_the_typed_error() -> None:
    samples = np.zeros((1, 1000), dtype=np.int16)
    for rate in (50.0, 5000.0):
        with pytest.raises(EcgQualityError, match="Hz"):
            check_quality(device_recording(samples, rate=rate))
    assert issubclass(EcgQualityError, DeviceError)


# ----------------------------------------------------------------------------- the JSON contract


def test_json_has_exactly_the_documented_shape() -> None:
    bad, _ = faults.muscle(recording("welch-allyn-scp"), np.random.default_rng(0), "LA")
    out = json.loads(json.dumps(check_quality(bad).to_json(), ensure_ascii=False))
    assert set(out) == {"verdict", "heart_rate_bpm", "problems"}
    assert out["verdict"] in VERDICTS and isinstance(out["heart_rate_bpm"], int)
    assert out["problems"]
    for problem in out["problems"]:
        assert set(problem) == {"kind", "leads", "message_zh", "message_en"}
        assert problem["kind"] in KINDS and isinstance(problem["leads"], list)
        assert re.search(r"[\u4e00-\u9fff]", problem["message_zh"]) and problem["message_en"].isascii()


def test_the_stored_form_reads_back_to_the_same_report() -> None:
    bad, _ = faults.saturation(recording("contec-50"), np.random.default_rng(0), "LA")
    report = check_quality(bad)
    stored = json.loads(json.dumps(report.to_dict(), ensure_ascii=False))
    again = quality.QualityReport.from_dict(stored)
    assert again.to_json() == report.to_json() and again.beats == report.beats
    assert again.problems == report.problems  # severity, value and unit too
    with pytest.raises(EcgQualityError):
        quality.QualityReport.from_dict({**stored, "verdict": "fine"})
    with pytest.raises(EcgQualityError):
        quality.QualityReport.from_dict({"verdict": "warn"})


def test_every_kind_has_a_sentence_in_both_languages() -> None:
    seen: dict[str, quality.Problem] = {}
    for base, kind, seed in _fault_cases():
        if len(seen) == len(KINDS) - 1:
            break
        for p in check_quality(corrupt(recording(base), kind, seed)[0]).problems:
            seen.setdefault(p.kind, p)
    seen.setdefault("too-short", check_quality(device_recording(np.zeros((1, 100), np.int16))).problems[-1])
    assert set(seen) == set(KINDS)
    for p in seen.values():
        assert p.message_zh and p.message_en and p.severity in (WARN, RE_RECORD)


# ----------------------------------------------------------------------------- fuzz


@st.composite
def any_recording(draw) -> EcgRecording:
    leads = draw(st.integers(1, 16))
    n = draw(st.integers(1, 6000))
    dtype = draw(st.sampled_from([np.int16, np.int32, np.int64]))
    info = np.iinfo(dtype)
    style = draw(st.sampled_from(["random", "constant", "sparse", "extreme"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if style == "random":
        data = rng.integers(max(info.min, -(2**31)), min(info.max, 2**31 - 1), (leads, n), endpoint=True)
    elif style == "constant":
        data = np.full((leads, n), draw(st.integers(max(info.min, -(2**31)), min(info.max, 2**31 - 1))))
    elif style == "sparse":
        data = np.zeros((leads, n), dtype=np.int64)
        data[rng.random((leads, n)) < 0.01] = draw(st.integers(-30000, 30000))
    else:
        data = rng.choice(np.array([info.min, info.max, 0]), (leads, n))
    names = tuple(draw(st.permutations(list(STANDARD_12_LEADS) + ["V3R", "V4R", "V7", "X"]))[:leads])
    derived = frozenset(draw(st.sets(st.sampled_from(names), max_size=leads)))
    return device_recording(
        data.astype(dtype),
        names=names,
        rate=draw(st.sampled_from([25.0, 99.9, 100.0, 128.0, 200.0, 257.3, 500.0, 1000.0, 2000.0, 2000.1])),
        uv_per_unit=draw(st.sampled_from([0.001, 1.0, 2.5, 5.0, 1000.0])),
        derived=derived,
        fmt=draw(st.sampled_from(["contec", "scp", "aecg", "npz"])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_recording())
def test_fuzz_any_recording_gives_a_report_or_the_typed_error(rec: EcgRecording) -> None:
    try:
        report = check_quality(rec)
    except EcgQualityError:
        assert not quality.MIN_RATE_HZ <= rec.sampling_rate_hz <= quality.MAX_RATE_HZ
        return
    assert report.verdict in VERDICTS
    json.dumps(report.to_json(), ensure_ascii=False)
    assert all(0 <= b < rec.n_samples for b in report.beats)
    assert all(set(p.leads) <= set(rec.lead_names) for p in report.problems)


def test_detector_and_median_beat_need_no_recording() -> None:
    """The building blocks take plain µV arrays (for the preview and future measurements)."""
    rec = recording("mortara-dicom")
    x = rec.microvolts()
    found = detect_qrs(x, rec.sampling_rate_hz)
    beat = median_beat(x, found.beats, rec.sampling_rate_hz)
    assert beat is not None and beat.beats_used >= 8
    ii = beat.waves[rec.lead_names.index("II")]
    assert ii.p_uv > 40 and ii.qrs_polarity > 0.5 and ii.t_uv > 100  # a normal lead II
