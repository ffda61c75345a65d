"""Fast tests that would catch the bug in the ECG quality gate (devices/ecg/quality.py) and in
what it says to the village doctor (devices/ecg/quality_wording.py).

Each test builds a small synthetic recording with numpy (a few seconds of signal at most, often
less) or calls the wording directly, so that the mutation bench (bench/mutation.py) can run them
for every mutant; the slow real-recording tests stay in tests/test_ecg_quality.py. Each test's
name or docstring says what a doctor or a patient would suffer from the bug it catches.
"""

from __future__ import annotations

import numpy as np
import pytest

from devices.ecg import quality_wording as wording
from devices.ecg.quality import (
    ACCEPTABLE,
    RE_RECORD,
    WARN,
    EcgQualityError,
    LeadMeasures,
    Problem,
    QualityReport,
    check_quality,
    converter_limits,
)
from devices.ecg.recording import STANDARD_12_LEADS, EcgRecording, SampleGap
from tests.ecg_factories import device_recording

LIMB_ONLY = ("I", "II", "III", "aVR", "aVL", "aVF")

# ----------------------------------------------------------------------------- the wording

WARN_TAIL_ZH = "本次可以发送；如患者还在，处理后重做更好"
WARN_TAIL_EN = "this ECG can be sent, but if the patient is still here, record again"


@pytest.mark.parametrize(
    "leads, shown",
    [
        (("V1", "V2", "V3", "V4"), ["V1-V4"]),
        (("V1", "V2", "V3"), ["V1-V3"]),  # three in a row: one item
        (("V1", "V2"), ["V1", "V2"]),  # two stay two
        (("V1", "V3", "V4", "V5"), ["V1", "V3-V5"]),  # a gap ends the run
        (("I", "V2", "V3", "V4", "aVF", "V6"), ["I", "V2-V4", "aVF", "V6"]),
        (("V3R", "V4R", "V7"), ["V3R", "V4R", "V7"]),  # right-sided leads are not numbers
        (("V5", "V4", "V3"), ["V5", "V4", "V3"]),  # only ascending runs
        ((), []),
    ],
)
def test_chest_lead_runs_are_named_so_the_doctor_finds_every_lead(leads: tuple[str, ...], shown: list[str]) -> None:
    """A wrong run (V2-V4 for V1-V4, V1-V4 across a gap) sends the doctor to the wrong electrodes."""
    assert wording.compact(leads) == shown


def test_lead_lists_in_both_languages_say_one_lead_some_leads_or_all() -> None:
    two = ("I", "II")
    assert (wording.leads_zh(two, two), wording.leads_en(two, two)) == ("所有导联", "all leads")
    assert (wording.leads_zh(("II",), ("II",)), wording.leads_en(("II",), ("II",))) == ("II 导联", "lead II")
    assert (wording.leads_zh(("II",), two), wording.leads_en(("II",), two)) == ("II 导联", "lead II")
    three = ("I", "II", "III")
    assert (wording.leads_zh(two, three), wording.leads_en(two, three)) == ("I、II 导联", "leads I, II")
    assert wording.leads_en(["V1", "V2", "V3"], STANDARD_12_LEADS) == "leads V1-V3"


def test_lead_off_names_the_limb_electrode_to_reattach() -> None:
    zh, en = wording.lead_off(("I", "III", "aVL"), STANDARD_12_LEADS, "LA", ["I", "III", "aVL"], [], [])
    assert zh == "左臂（L）电极脱落，请重新贴好后重做"
    assert en == "Left-arm (L) electrode off: reattach and record again"


def test_lead_off_without_a_known_electrode_names_the_leads() -> None:
    zh, en = wording.lead_off(("I", "aVR"), STANDARD_12_LEADS, None, ["I", "aVR"], [], [])
    assert zh == "I、aVR 导联无信号（肢体电极脱落或导联线松动），请重新贴好后重做"
    assert en == "No signal in leads I, aVR (limb electrodes off or cable loose): reattach and record again"


def test_lead_off_lists_one_or_several_chest_electrodes_and_other_leads() -> None:
    zh, en = wording.lead_off(("V3",), STANDARD_12_LEADS, None, [], ["V3"], [])
    assert (zh, en) == ("V3 电极脱落，请重新贴好后重做", "V3 electrode off: reattach and record again")
    zh, en = wording.lead_off(("V2", "V5"), STANDARD_12_LEADS, None, [], ["V2", "V5"], [])
    assert (zh, en) == ("V2、V5 电极脱落，请重新贴好后重做", "V2, V5 electrodes off: reattach and record again")
    names = (*STANDARD_12_LEADS, "X")
    zh, en = wording.lead_off(("II", "V1", "X"), names, "RA", ["II"], ["V1"], ["X"])
    assert zh == "右臂（R）电极脱落，V1 电极脱落，X 导联无信号，请重新贴好后重做"
    assert en == "Right-arm (R) electrode off; V1 electrode off; no signal in lead X: reattach and record again"


@pytest.mark.parametrize(
    "severity, tail_zh, tail_en",
    [("re-record", "然后重做心电图", "then record again"), ("warn", WARN_TAIL_ZH, WARN_TAIL_EN)],
)
def test_saturation_says_which_electrode_and_whether_the_ecg_can_go(severity: str, tail_zh: str, tail_en: str) -> None:
    """A warn told as re-record keeps a patient waiting; a re-record told as warn sends an unreadable ECG."""
    zh, en = wording.saturation(("I", "II"), STANDARD_12_LEADS, "RA", severity)
    assert zh == f"I、II 导联信号超出量程（削顶）：请清洁皮肤、把右臂（R）电极贴紧，让患者保持不动，{tail_zh}"
    assert en == (
        "Signal out of range (clipped) in leads I, II: clean the skin, press the right-arm (R) electrode on "
        f"firmly and keep the patient still; {tail_en}"
    )
    zh, en = wording.saturation(("V3",), STANDARD_12_LEADS, "V3", severity)
    assert zh == f"V3 导联信号超出量程（削顶）：请清洁皮肤、把V3 电极贴紧，让患者保持不动，{tail_zh}"
    assert en.startswith("Signal out of range (clipped) in lead V3: clean the skin, press the V3 electrode on firmly")
    zh, en = wording.saturation(("V1", "V4"), STANDARD_12_LEADS, None, severity)
    assert zh == f"V1、V4 导联信号超出量程（削顶）：请清洁皮肤、贴紧电极，让患者保持不动，{tail_zh}"
    assert en == (
        "Signal out of range (clipped) in leads V1, V4: clean the skin, press the electrodes on firmly and keep "
        f"the patient still; {tail_en}"
    )


def test_baseline_wander_names_the_electrode_that_does_not_stick() -> None:
    zh, en = wording.baseline_wander(("III",), LIMB_ONLY, "LL", "warn")
    assert zh == f"III 导联基线漂移：请让患者平静呼吸、不说话、不移动，检查左腿（F）电极贴牢，{WARN_TAIL_ZH}"
    assert en == (
        "Baseline wander in lead III: ask the patient to breathe quietly and keep still, check the left-leg (F) "
        f"electrode sticks; {WARN_TAIL_EN}"
    )
    zh, en = wording.baseline_wander(("V2",), STANDARD_12_LEADS, "V2", "re-record")
    assert "检查V2 电极贴牢，然后重做心电图" in zh and "check the V2 electrode sticks; then record again" in en
    zh, en = wording.baseline_wander(("V2", "V6"), STANDARD_12_LEADS, None, "re-record")
    assert zh.endswith("不移动，检查电极贴牢，然后重做心电图")
    assert en.endswith("keep still, check the electrodes stick; then record again")


def test_mains_noise_names_the_grid_and_the_electrode() -> None:
    zh, en = wording.mains_noise(("I", "II"), STANDARD_12_LEADS, "RA", 50.0, "re-record")
    assert zh == (
        "I、II 导联有 50 Hz 交流电干扰：请擦净皮肤重贴右臂（R）电极，拔掉附近电器插头，让患者不接触金属床和墙，"
        "然后重做心电图"
    )
    assert en == (
        "50 Hz mains interference in leads I, II: clean the skin and reattach the right-arm (R) electrode, "
        "unplug nearby appliances, keep the patient off metal and walls; then record again"
    )
    zh, en = wording.mains_noise(("V4",), STANDARD_12_LEADS, "V4", 60.0, "warn")
    assert zh.startswith("V4 导联有 60 Hz 交流电干扰：请擦净皮肤重贴V4 电极，") and zh.endswith(WARN_TAIL_ZH)
    assert "reattach the V4 electrode" in en
    zh, en = wording.mains_noise(STANDARD_12_LEADS, STANDARD_12_LEADS, None, 50.0, "warn")
    assert (
        zh
        == f"所有导联有 50 Hz 交流电干扰：请检查右腿（N）电极贴好，拔掉附近电器插头，让患者不接触金属床和墙，{WARN_TAIL_ZH}"
    )
    assert en == (
        "50 Hz mains interference in all leads: check the right-leg (N) electrode, unplug nearby appliances, "
        f"keep the patient off metal and walls; {WARN_TAIL_EN}"
    )


def test_muscle_noise_tells_how_to_relax_the_patient() -> None:
    zh, en = wording.muscle_noise(("V1", "V2", "V3"), STANDARD_12_LEADS, "warn")
    assert zh == f"V1-V3 导联有肌电干扰：请让患者平躺放松、保暖、双臂放在身体两侧，{WARN_TAIL_ZH}"
    assert en == (
        "Muscle tremor noise in leads V1-V3: let the patient lie relaxed and warm with arms resting at the "
        f"sides; {WARN_TAIL_EN}"
    )


def test_each_electrode_swap_gets_its_own_instruction() -> None:
    """Telling a doctor to swap the arms when R and F are swapped leaves the ECG wrong twice."""
    arms = wording.limb_lead_reversal(("I", "aVL"), STANDARD_12_LEADS, ("RA", "LA"))
    assert arms == (
        "左右手电极接反（I 导联倒置）：请对调右臂（R）和左臂（L）电极后重做",
        "Arm electrodes swapped (lead I upside down): swap the right-arm (R) and left-arm (L) electrodes and "
        "record again",
    )
    arm_leg = wording.limb_lead_reversal(("II",), STANDARD_12_LEADS, ("RA", "LL"))
    assert arm_leg == (
        "右臂（R）和左腿（F）电极接反（II 导联倒置）：请对调后重做",
        "Right-arm (R) and left-leg (F) electrodes swapped (lead II upside down): swap them back and record again",
    )
    zh, en = wording.limb_lead_reversal(("III",), STANDARD_12_LEADS, ("LA", "RL"))
    assert zh == (
        "III 导联几乎是一条直线：左臂（L）电极可能夹在了右腿上（与右腿（N）接反），请按字母标记重新连接四肢电极后重做"
    )
    assert en == (
        "Lead III nearly flat: the left-arm (L) electrode is probably on the right leg (swapped with the "
        "right-leg (N) one): reconnect the limb electrodes by their letters and record again"
    )


@pytest.mark.parametrize(
    "seconds, severity, zh, en",
    [
        (0.5, "re-record", "心电图只记录了 0.50 秒", "Only 0.50 s recorded, less than the standard 10 s"),
        (1.0, "re-record", "心电图只记录了 1.0 秒", "Only 1.0 s recorded"),
        (1.5, "re-record", "心电图只记录了 1.5 秒", "Only 1.5 s recorded"),
        (9.0, "warn", "心电图只有 9.0 秒，略短于标准的 10 秒：本次可以发送", "Only 9.0 s recorded, a little under"),
    ],
)
def test_too_short_says_how_long_and_whether_to_send(seconds: float, severity: str, zh: str, en: str) -> None:
    got_zh, got_en = wording.too_short(seconds, severity)
    assert got_zh.startswith(zh) and got_en.startswith(en)
    assert got_en.endswith("record a full 10 s again" if severity == "re-record" else "record the full 10 s next time")


# ----------------------------------------------------------------------------- a synthetic heart

RATE_HZ = 500.0
RR_S = 0.8  # 75 bpm
FIRST_PEAK_S = 0.4
NOISE_UV = 4.0  # amplifier noise at rest
P_UV, R_UV, T_UV = 150.0, 1200.0, 250.0
# Frontal-plane axes (degrees, 0 = lead I, 90 = aVF) of the P, QRS and T vectors: a normal heart.
P_AXIS, QRS_AXIS, T_AXIS = 60.0, 45.0, 40.0
# Chest leads V1-V6: QRS mostly negative in V1, upright from V3 (R-wave progression);
# dextrocardia mirrors it (R waves shrink across the chest).
CHEST_QRS = (-0.6, -0.3, 0.3, 0.8, 1.0, 0.9)
CHEST_QRS_DEXTRO = (0.6, 0.5, 0.2, -0.3, -0.6, -0.7)


def gauss(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-((t - centre) ** 2) / (2 * width * width))


def heart_waves(n: int, rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P, QRS and T of a regular rhythm (µV of a unit lead), QRS peaks at 0.4 s + k x 0.8 s."""
    t = np.arange(n) / rate
    phase = (t - FIRST_PEAK_S + RR_S / 2) % RR_S - RR_S / 2  # time from the nearest QRS peak
    p = P_UV * gauss(phase, -0.16, 0.02)
    qrs = R_UV * gauss(phase, 0.0, 0.01) - 250 * gauss(phase, 0.025, 0.008) - 100 * gauss(phase, -0.022, 0.006)
    t_wave = T_UV * (gauss(phase, 0.28, 0.04) + gauss(phase + RR_S, 0.28, 0.04))
    return p, qrs, t_wave


def electrodes(
    seconds: float = 10.0,
    rate: float = RATE_HZ,
    chest_qrs: tuple[float, ...] = CHEST_QRS,
    qrs_axis: float = QRS_AXIS,
    t_axis: float = T_AXIS,
    p_axis: float = P_AXIS,
    p_scale: float = 1.0,
    t_scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """Potentials (µV) at RA, LA, LL (summing to zero) and at the chest electrodes V1-V6."""
    p, qrs, t_wave = heart_waves(int(seconds * rate), rate)
    p, t_wave = p * p_scale, t_wave * t_scale

    def along(angle_deg: float) -> np.ndarray:  # the heart's vector projected on a lead axis
        return sum(
            (w * np.cos(np.radians(axis - angle_deg)) for w, axis in ((p, p_axis), (qrs, qrs_axis), (t_wave, t_axis))),
            np.zeros_like(p),
        )

    lead_i, lead_ii = along(0.0), along(60.0)
    pots = {"RA": -(lead_i + lead_ii) / 3, "LA": (2 * lead_i - lead_ii) / 3, "LL": (2 * lead_ii - lead_i) / 3}
    for k, gain in enumerate(chest_qrs, start=1):
        pots[f"V{k}"] = 0.5 * p + gain * qrs + 0.8 * t_wave
    return pots


def twelve_leads(pots: dict[str, np.ndarray]) -> np.ndarray:
    """What a cart computes from the electrodes: Einthoven, Goldberger and Wilson."""
    ra, la, ll = pots["RA"], pots["LA"], pots["LL"]
    wilson = (ra + la + ll) / 3
    limb = [la - ra, ll - ra, ll - la, ra - (la + ll) / 2, la - (ra + ll) / 2, ll - (ra + la) / 2]
    return np.stack(limb + [pots[f"V{k}"] - wilson for k in range(1, 7)])


def heart(seconds: float = 10.0, rate: float = RATE_HZ) -> np.ndarray:
    """A clean 12-lead ECG, µV (leads, samples)."""
    return twelve_leads(electrodes(seconds, rate))


def to_recording(
    x_uv: np.ndarray,
    *,
    rate: float = RATE_HZ,
    names: tuple[str, ...] = STANDARD_12_LEADS,
    uv_per_unit: float = 1.0,
    dtype: type = np.int16,
    fmt: str = "test",
    seed: int = 0,
    noise_uv: float = NOISE_UV,
    derived: frozenset[str] = frozenset(),
    gaps: tuple[SampleGap, ...] = (),
    amplifier_limit_uv: float = np.inf,
    rails: tuple[int, int] | None = None,
) -> EcgRecording:
    noisy = x_uv + np.random.default_rng(seed).normal(0.0, noise_uv, x_uv.shape)
    noisy = np.minimum(noisy, amplifier_limit_uv)  # an amplifier stops at its limit, noise and all
    word = np.iinfo(dtype)  # what the converter writes beyond its range: its rail
    low, high = rails or (int(word.min) + 1, int(word.max))
    units = np.clip(np.round(noisy / uv_per_unit), low, high)
    return device_recording(
        units.astype(dtype), rate=rate, names=names, uv_per_unit=uv_per_unit, fmt=fmt, derived=derived, gaps=gaps
    )


def row(name: str) -> int:
    return STANDARD_12_LEADS.index(name)


def kinds(report: QualityReport) -> list[str]:
    return [p.kind for p in report.problems]


def measures(report: QualityReport, lead: str) -> LeadMeasures:
    return next(m for m in report.leads if m.lead == lead)


def only(report: QualityReport, kind: str) -> Problem:
    (problem,) = [p for p in report.problems if p.kind == kind]
    return problem


def sine(hz: float, amplitude: float, seconds: float = 10.0, rate: float = RATE_HZ, phase: float = 0.3) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate + phase)


# ----------------------------------------------------------------------------- a clean heart


def test_a_clean_heart_is_acceptable_with_its_rate_and_every_beat() -> None:
    """A good ECG held for re-recording keeps a patient waiting for nothing; a wrong rate misleads."""
    report = check_quality(to_recording(heart()))
    assert report.verdict == ACCEPTABLE and report.problems == ()
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)
    assert len(report.beats) == 12
    assert report.duration_s == 10.0
    for m in report.leads:
        assert (m.flat_s, m.rail_s) == (0.0, 0.0)
        assert m.mains_uv < 1 and m.muscle_uv < 10 and m.wander_uv < 50, m
    assert report.to_json() == {"verdict": "acceptable", "heart_rate_bpm": 75, "problems": []}


def test_a_recording_ending_on_a_tall_r_wave_is_not_baseline_wander() -> None:
    """Regression: the baseline's median filters padded the ends with the last value, so a 3 mV R
    wave (left ventricular hypertrophy in V5) cut by the end of the recording filled half the
    window and was reported as baseline wander: a good ECG held back for re-recording."""
    x = heart()  # the last QRS peak falls on the first sample after the end: the R's upstroke
    x[row("V5")] *= 2.5
    report = check_quality(to_recording(x))
    assert report.verdict == ACCEPTABLE, [p.message_en for p in report.problems]
    assert measures(report, "V5").wander_uv < 50
    start_on_r = check_quality(to_recording(x[:, int(FIRST_PEAK_S * RATE_HZ) - 2 :]))
    assert "baseline-wander" not in kinds(start_on_r)


# ----------------------------------------------------------------------------- lost electrodes


def test_a_blanked_chest_lead_is_reported_off_by_its_electrode() -> None:
    """A cart writes a constant for a lost electrode: passing it would send an ECG without V3."""
    x = heart()
    x[row("V3")] = 0.0
    report = check_quality(to_recording(x, noise_uv=0.0))
    off = only(report, "lead-off")
    assert (off.leads, off.severity, off.value, off.unit) == (("V3",), RE_RECORD, 0.0, "uV")
    assert off.message_en == "V3 electrode off: reattach and record again"
    assert report.verdict == RE_RECORD and kinds(report) == ["lead-off"]
    assert measures(report, "V3").flat_s == 10.0 and measures(report, "V2").flat_s == 0.0
    assert report.problems_on("V3") == (off,) and report.problems_on("V2") == ()


def test_a_floating_chest_lead_that_picks_up_only_hum_is_off() -> None:
    """An unattached input shows 50 Hz hum, not a heartbeat: it must not pass as a living lead."""
    x = heart()
    x[row("V4")] = sine(50.0, 150.0)
    report = check_quality(to_recording(x))
    assert only(report, "lead-off").leads == ("V4",)
    assert "mains-noise" not in kinds(report)  # a lost lead's hum is not the doctor's mains problem


def test_one_lead_at_a_tenth_of_the_others_is_off_but_a_low_voltage_ecg_is_not() -> None:
    """Pericardial effusion makes every lead small: that ECG is readable, not twelve lost leads.
    One lead at 1/40 of the others while they are normal has lost its electrode."""
    small = check_quality(to_recording(heart() * 0.12))
    assert small.verdict == ACCEPTABLE, [p.message_en for p in small.problems]
    x = heart()
    x[row("V6")] *= 0.025
    assert only(check_quality(to_recording(x)), "lead-off").leads == ("V6",)


def test_a_flat_two_seconds_is_enough_to_call_a_lead_off() -> None:
    x = heart()
    x[row("V2"), 2500:3600] = 0.0  # 2.2 s without signal, then the electrode pressed back
    report = check_quality(to_recording(x, noise_uv=0.0))
    assert only(report, "lead-off").leads == ("V2",)
    assert 2.0 <= measures(report, "V2").flat_s <= 2.5


def test_a_pause_of_the_heart_flattens_every_lead_and_is_no_lost_electrode() -> None:
    x = heart()
    x[:, 1900:3760] = 0.0  # 3.7 s of sinus arrest: every lead flat at once, noise stays
    report = check_quality(to_recording(x))
    assert "lead-off" not in kinds(report)
    assert all(m.flat_s == 0.0 for m in report.leads)


def test_no_heartbeat_anywhere_is_every_lead_off_not_a_pause() -> None:
    report = check_quality(to_recording(np.zeros((12, 5000))))
    off = only(report, "lead-off")
    assert off.leads == STANDARD_12_LEADS and "所有导联" in off.message_zh and off.message_en.startswith("No signal")


def test_an_input_that_drifts_to_the_rail_and_stays_there_is_off_not_clipped() -> None:
    """The electrode came off at 8 s: the input sits at the converter's rail to the end."""
    x = heart()
    x[row("V1"), 4000:] = 40000.0  # beyond the 16-bit word: written as the rail
    report = check_quality(to_recording(x))
    assert only(report, "lead-off").leads == ("V1",)
    assert "saturation" not in kinds(report)
    assert measures(report, "V1").rail_s == pytest.approx(2.0)


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("seconds, severity", [(0.1, WARN), (0.6, RE_RECORD)])
def test_clipping_is_measured_and_its_length_decides_the_verdict(seconds: float, severity: str) -> None:
    """0.1 s at the rail hides a QRS peak (send, with a warning); 0.6 s hides whole beats."""
    x = heart()
    x[row("V2"), 3000 : 3000 + int(seconds * RATE_HZ)] = 40000.0  # knocked: the amplifier at its rail
    report = check_quality(to_recording(x))
    sat = only(report, "saturation")
    assert (sat.leads, sat.severity, sat.unit) == (("V2",), severity, "s")
    assert "press the V2 electrode on firmly" in sat.message_en  # the one chest electrode to fix
    assert sat.value == pytest.approx(seconds) and measures(report, "V2").rail_s == pytest.approx(seconds)
    assert report.verdict == severity and "lead-off" not in kinds(report)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=1)  # no beat invented at the step


def test_a_touch_of_the_rail_shorter_than_a_qrs_peak_is_no_clipping() -> None:
    x = heart()
    x[row("V2"), 3000:3005] = 40000.0  # 10 ms
    report = check_quality(to_recording(x))
    assert "saturation" not in kinds(report) and measures(report, "V2").rail_s == pytest.approx(0.01)


def test_the_negative_rail_counts_as_well() -> None:
    x = heart()
    x[row("V5"), 1000:1100] = -40000.0
    assert only(check_quality(to_recording(x)), "saturation").leads == ("V5",)


def test_clipping_without_known_rails_is_found_as_a_far_plateau() -> None:
    """int32 samples (an XML ECG) have no converter range: 0.1 s of one value 3 mV from the
    baseline is an amplifier at its limit, not a heartbeat."""
    x = heart()
    x[row("V3"), 3000:3050] = 5000.0
    rec = to_recording(x, dtype=np.int32, amplifier_limit_uv=3000.0)
    assert converter_limits(rec) == [None] * 12
    report = check_quality(rec)
    sat = only(report, "saturation")
    assert sat.leads == ("V3",) and sat.value == pytest.approx(0.1)
    near = heart()
    near[row("V3"), 3000:3050] = 5000.0
    near_limit = 900.0  # a plateau under 1 mV from the baseline: an R wave's flat top, perhaps
    assert "saturation" not in kinds(check_quality(to_recording(near, dtype=np.int32, amplifier_limit_uv=near_limit)))


def test_a_short_plateau_is_a_pointed_r_wave_not_clipping() -> None:
    x = heart()
    x[row("V3"), 3000:3015] = 5000.0  # 30 ms: under the 40 ms an amplifier's limit leaves
    assert "saturation" not in kinds(check_quality(to_recording(x, dtype=np.int32, amplifier_limit_uv=3000.0)))


def test_converter_limits_per_format() -> None:
    """Wrong rails make clipping invisible (too wide) or every R peak clipped (too narrow)."""
    contec = to_recording(heart()[:6] / 5, names=LIMB_ONLY, fmt="contec", derived=frozenset({"I", "aVR", "aVL", "aVF"}))
    assert converter_limits(contec) == [None, (-2048, 2047), (-2048, 2047), None, None, None]
    assert converter_limits(to_recording(heart()[:2], names=("I", "II"))) == [(-32767, 32767)] * 2
    assert converter_limits(to_recording(heart()[:2], names=("I", "II"), dtype=np.int64)) == [None, None]


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("amplitude, severity", [(500.0, WARN), (1200.0, RE_RECORD)])
def test_baseline_wander_is_measured_peak_to_peak(amplitude: float, severity: str) -> None:
    """Breathing that moves V2 by 1 mV blurs its ST level (warn); 2.4 mV runs into the next row."""
    x = heart()
    x[row("V2")] += sine(0.3, amplitude)
    report = check_quality(to_recording(x))
    wander = only(report, "baseline-wander")
    assert (wander.leads, wander.severity, wander.unit) == (("V2",), severity, "uV")
    assert wander.value == pytest.approx(2 * amplitude, rel=0.05)
    assert measures(report, "V2").wander_uv == wander.value and report.verdict == severity


def test_breathing_of_a_normal_size_is_no_wander() -> None:
    x = heart()
    x[row("V2")] += sine(0.3, 300.0)
    report = check_quality(to_recording(x))
    assert report.verdict == ACCEPTABLE and measures(report, "V2").wander_uv == pytest.approx(600, rel=0.05)


@pytest.mark.parametrize("hz, amplitude, severity", [(50.0, 40.0, WARN), (60.0, 100.0, RE_RECORD)])
def test_mains_hum_is_measured_in_microvolts_on_its_grid(hz: float, amplitude: float, severity: str) -> None:
    """A 100 µV hum hides P waves and ST (re-record); 40 µV blurs them (warn); the doctor is told
    which grid so that a 60 Hz appliance is not looked for on a 50 Hz grid."""
    x = heart()
    x[row("V5")] += sine(hz, amplitude)
    report = check_quality(to_recording(x))
    mains = only(report, "mains-noise")
    assert (mains.leads, mains.severity, mains.unit) == (("V5",), severity, "uV")
    assert mains.value == pytest.approx(amplitude, rel=0.03)
    assert measures(report, "V5").mains_hz == hz and f"{hz:g} Hz" in mains.message_en
    assert report.verdict == severity and kinds(report) == ["mains-noise"]
    # the combs take the hum out of the muscle band: not also told to warm the patient
    assert measures(report, "V5").muscle_uv < 8


def test_a_harmonic_rich_hum_counts_its_harmonics() -> None:
    """A transformer's hum (50 Hz plus 150 Hz and 250 Hz) is as visible as its sum of lines."""
    x = heart()
    x[row("V3")] += sine(50.0, 20.0) + sine(150.0, 15.0) + sine(200.0, 15.0)
    v3 = measures(check_quality(to_recording(x)), "V3")
    assert v3.mains_uv == pytest.approx(np.sqrt(20.0**2 + 15.0**2 + 15.0**2), rel=0.05)


def test_hum_under_the_warning_level_is_no_fault() -> None:
    x = heart()
    x[row("V5")] += sine(50.0, 20.0)
    report = check_quality(to_recording(x))
    assert report.verdict == ACCEPTABLE and measures(report, "V5").mains_uv == pytest.approx(20.0, rel=0.05)


def test_hum_on_the_right_arm_names_the_right_arm_electrode() -> None:
    """Hum in I, II and aVR but not III comes in through RA: the doctor re-attaches that one."""
    pots = electrodes()
    pots["RA"] = pots["RA"] + sine(50.0, 40.0)
    mains = only(check_quality(to_recording(twelve_leads(pots))), "mains-noise")
    assert mains.leads == ("I", "II", "aVR")
    assert "reattach the right-arm (R) electrode" in mains.message_en and "右臂（R）" in mains.message_zh


@pytest.mark.parametrize("sigma, severity", [(60.0, WARN), (150.0, RE_RECORD)])
def test_muscle_tremor_is_measured_outside_the_qrs(sigma: float, severity: str) -> None:
    """A shivering patient: 20-150 Hz noise hides P waves (warn) or ST as well (re-record)."""
    x = heart()
    x[row("V1")] += np.random.default_rng(1).normal(0.0, sigma, x.shape[-1])
    report = check_quality(to_recording(x))
    muscle = only(report, "muscle-noise")
    assert (muscle.leads, muscle.severity, muscle.unit) == (("V1",), severity, "uV")
    band_rms = sigma * np.sqrt((150 - 20) / (RATE_HZ / 2))  # white noise's share of 20-150 Hz
    assert muscle.value == pytest.approx(band_rms, rel=0.12)
    assert measures(report, "V1").muscle_uv == muscle.value and report.verdict == severity


def test_light_tremor_under_the_warning_level_is_no_fault() -> None:
    x = heart()
    x[row("V1")] += np.random.default_rng(1).normal(0.0, 30.0, x.shape[-1])
    report = check_quality(to_recording(x))
    assert report.verdict == ACCEPTABLE and 18 < measures(report, "V1").muscle_uv < 27


def test_heavy_tremor_alone_is_muscle_noise_not_mains_hum() -> None:
    """A shivering patient and no hum at all: 300 µV of tremor in 30-80 Hz, thirty patients' worth
    of noise. The tremor has power at 50 and 60 Hz as at every frequency of its band, but no line
    there: the doctor must be told to let the patient relax (muscle noise, re-record), not to
    unplug appliances and check the cable. Read as a line, the tremor's 50/60 Hz bins came out at
    25-63 µV of "mains" for 21 of these 30 patients."""
    for seed in range(30):
        x = heart()
        x[row("V1")] += band_limited_noise(300.0, RATE_HZ, seed=seed, low_hz=30.0, top=80.0 / RATE_HZ)
        report = check_quality(to_recording(x))
        assert "mains-noise" not in kinds(report), (seed, measures(report, "V1").mains_uv)
        muscle = only(report, "muscle-noise")
        assert (muscle.leads, muscle.severity) == (("V1",), RE_RECORD), seed


def test_tremor_ending_at_a_harmonic_is_no_hum() -> None:
    """Tremor in every lead, up to a cart's 150 Hz low-pass: its spectrum stops at 150 Hz, the 50 Hz
    grid's third harmonic. The line's neighbourhood above 150 Hz is quiet, below it full of tremor:
    against the two sides' median the tremor's own bins at 150 Hz stand out as hum (40-50 µV in each
    of these strips; 56-62 µV when no line had to stand out at all). The floor a line must stand out
    of is the higher side's."""
    for seed in range(4):
        x = heart()
        for lead in range(x.shape[0]):
            x[lead] += band_limited_noise(300.0, RATE_HZ, seed=100 * seed + lead)
        report = check_quality(to_recording(x))
        assert "mains-noise" not in kinds(report), (seed, max(m.mains_uv for m in report.leads))
        assert len(only(report, "muscle-noise").leads) == 12


def test_a_second_of_tremor_is_too_short_and_muscle_noise_but_no_hum() -> None:
    """The cart stopped after a second of a shivering patient: too short, and muscle noise. Over
    2-5 Hz beside the line a second-long strip has 3 bins a side, whose median can sit far under the
    tremor's level; one bin of tremor then stands out of it as hum (63-135 µV in 7 of these 30
    strips; 100-197 µV in all 30 when no line had to stand out at all). The neighbourhood reaches
    out far enough to hold 30 bins a side."""
    for seed in range(30):
        x = heart(1.0)
        for lead in range(x.shape[0]):
            x[lead] += band_limited_noise(300.0, RATE_HZ, seconds=1.0, seed=100 * seed + lead)
        report = check_quality(to_recording(x))
        assert "mains-noise" not in kinds(report), (seed, max(m.mains_uv for m in report.leads))
        assert {"too-short", "muscle-noise"} <= set(kinds(report)), seed


# ----------------------------------------------------------------------------- swapped electrodes


def swapped(a: str, b: str, chest_qrs: tuple[float, ...] = CHEST_QRS, qrs_axis: float = QRS_AXIS) -> np.ndarray:
    pots = electrodes(chest_qrs=chest_qrs, qrs_axis=qrs_axis)
    pots[a], pots[b] = pots[b], pots[a]
    return twelve_leads(pots)


def on_the_right_leg(arm: str) -> np.ndarray:
    """The arm electrode clipped on the right leg: it reads the legs' potential (the left leg's)."""
    pots = electrodes()
    pots[arm] = pots["LL"].copy()
    return twelve_leads(pots)


def test_swapped_arm_electrodes_are_found_from_lead_i_upside_down() -> None:
    """Arms swapped make lead I a mirror image: read as it is, it suggests a lateral infarct."""
    report = check_quality(to_recording(swapped("RA", "LA")))
    swap = only(report, "limb-lead-reversal")
    assert swap.leads == ("I", "II", "III", "aVR", "aVL") and swap.severity == RE_RECORD
    assert "swap the right-arm (R) and left-arm (L)" in swap.message_en and report.verdict == RE_RECORD
    assert kinds(report) == ["limb-lead-reversal"]


def test_dextrocardia_is_not_taken_for_swapped_arms() -> None:
    """A mirror-image heart also turns lead I over, but V5 and V6 point away too: telling the
    doctor to swap the electrodes would produce a wrong ECG of a real condition."""
    report = check_quality(to_recording(swapped("RA", "LA", CHEST_QRS_DEXTRO)))
    assert "limb-lead-reversal" not in kinds(report)
    one_lateral_lead = list(CHEST_QRS_DEXTRO)
    one_lateral_lead[4] = 1.0  # V5 upright: not dextrocardia, the arms are swapped
    assert "limb-lead-reversal" in kinds(check_quality(to_recording(swapped("RA", "LA", tuple(one_lateral_lead)))))


def test_dextrocardia_test_needs_a_lateral_lead_to_look_at() -> None:
    """Without V5 and V6 nothing says dextrocardia: an upside-down lead I is swapped arms."""
    x = swapped("RA", "LA", CHEST_QRS_DEXTRO)[:10]
    report = check_quality(to_recording(x, names=STANDARD_12_LEADS[:10]))
    assert only(report, "limb-lead-reversal").leads == ("I", "II", "III", "aVR", "aVL")


def test_right_arm_and_left_leg_swapped_are_found_from_lead_ii_and_avr() -> None:
    """Lead II upside down with aVR upright. (A horizontal QRS axis: with the usual 45 degrees the
    swap turns lead I over as well and is told as swapped arms, still a re-record.)"""
    report = check_quality(to_recording(swapped("RA", "LL", qrs_axis=0.0)))
    swap = only(report, "limb-lead-reversal")
    assert swap.leads == ("I", "II", "III", "aVR", "aVF")
    assert swap.message_en.startswith("Right-arm (R) and left-leg (F) electrodes swapped")


@pytest.mark.parametrize("arm, flat_lead, electrode", [("RA", "II", "right-arm (R)"), ("LA", "III", "left-arm (L)")])
def test_an_arm_electrode_on_the_right_leg_is_a_swap_not_a_lost_lead(arm: str, flat_lead: str, electrode: str) -> None:
    """II (or III) near zero: the electrode is on, on the wrong limb; "reattach" would not help."""
    report = check_quality(to_recording(on_the_right_leg(arm)))
    swap = only(report, "limb-lead-reversal")
    assert swap.leads == (flat_lead,) and swap.severity == RE_RECORD
    assert swap.message_en.startswith(f"Lead {flat_lead} nearly flat: the {electrode} electrode")
    assert "lead-off" not in kinds(report)
    assert measures(report, flat_lead).muscle_uv == 0.0  # a lead near zero: its noise is not judged


def test_a_limb_lead_blanked_by_the_cart_is_off_not_an_arm_on_the_leg() -> None:
    x = heart()
    x[row("II")] = 0.0
    report = check_quality(to_recording(x, noise_uv=0.0))
    assert "II" in only(report, "lead-off").leads and "limb-lead-reversal" not in kinds(report)


def test_a_noisy_lead_is_not_trusted_for_a_swap() -> None:
    """Hum on lead I must not make its P wave's sign, and so a swap, up."""
    x = swapped("RA", "LA")
    x[row("I")] += sine(50.0, 60.0)
    report = check_quality(to_recording(x))
    assert "limb-lead-reversal" not in kinds(report) and "I" in only(report, "mains-noise").leads


# ----------------------------------------------------------------------------- length and rate


@pytest.mark.parametrize("seconds, severity", [(3.0, RE_RECORD), (4.9, RE_RECORD), (7.0, WARN), (9.4, WARN)])
def test_a_short_recording_is_told_with_its_length(seconds: float, severity: str) -> None:
    """Under 5 s too few beats for rate and rhythm (re-record); under 9.5 s half a print column
    is missing (send, warn)."""
    report = check_quality(to_recording(heart(seconds)))
    short = only(report, "too-short")
    assert (short.leads, short.severity, short.unit) == ((), severity, "s")
    assert short.value == pytest.approx(seconds) and f"Only {seconds:.1f} s recorded" in short.message_en
    assert report.verdict == severity and report.duration_s == pytest.approx(seconds)


def test_nine_and_a_half_seconds_is_a_full_print() -> None:
    assert check_quality(to_recording(heart(9.6))).problems == ()


def test_under_a_second_no_noise_figure_is_made_up() -> None:
    x = heart(0.9)
    x[row("V1")] += sine(50.0, 200.0, seconds=0.9)
    report = check_quality(to_recording(x))
    assert kinds(report) == ["too-short"] and measures(report, "V1").mains_uv == 0.0
    assert check_quality(to_recording(heart(1.0) + sine(50.0, 200.0, seconds=1.0))).leads[0].mains_uv > 100


@pytest.mark.parametrize("rate", [99.9, 2000.1])
def test_a_rate_outside_100_to_2000_hz_is_refused_with_the_typed_error(rate: float) -> None:
    with pytest.raises(EcgQualityError, match="Hz"):
        check_quality(to_recording(np.zeros((1, 400)), rate=rate, names=("II",)))


@pytest.mark.parametrize("rate", [100.0, 2000.0])
def test_the_edge_rates_are_analysed(rate: float) -> None:
    report = check_quality(to_recording(heart(3.0, rate)[1:2], rate=rate, names=("II",)))
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=1)


def test_samples_lost_in_transit_do_not_make_a_short_rr() -> None:
    """0.7 s lost over the bridge link: counted across the join, the rate would be too fast."""
    x = heart()
    cut = slice(2150, 2400)  # the beat at 4.4 s lost, the one at 4.8 s kept
    kept = np.concatenate([x[:, : cut.start], x[:, cut.stop :]], axis=1)
    gap = SampleGap(cut.start, cut.stop - cut.start)
    assert check_quality(to_recording(kept, gaps=(gap,))).heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)
    undeclared = check_quality(to_recording(kept)).heart_rate_bpm
    assert undeclared is not None and abs(undeclared - 60 / RR_S) > 2  # the check can fail


# ----------------------------------------------------------------------------- derived limb leads


def contec_like(x_uv: np.ndarray) -> EcgRecording:
    """II and III recorded by a 12-bit converter (offset 2048); I, aVR, aVL, aVF computed."""
    return to_recording(
        x_uv[:6],
        names=LIMB_ONLY,
        fmt="contec",
        uv_per_unit=5.0,
        derived=frozenset({"I", "aVR", "aVL", "aVF"}),
        rails=(-2048, 2047),
    )


def test_derived_leads_are_lost_with_the_recorded_lead_they_come_from() -> None:
    """III at the 12-bit rail from 6 s: I, aVR, aVL, aVF computed from it are no ECG either."""
    x = heart()
    x[row("III"), 3000:] = 20000.0
    report = check_quality(contec_like(x))
    off = only(report, "lead-off")
    assert off.leads == ("I", "III", "aVR", "aVL", "aVF")
    assert off.message_en == "Left-arm (L) electrode off: reattach and record again"  # III's electrode
    assert measures(report, "I").rail_s == pytest.approx(4.0)  # the derived lead shares the rail


def test_a_clipped_recorded_lead_marks_its_derived_leads_clipped() -> None:
    x = heart()
    x[row("II"), 3000:3100] = 20000.0
    sat = only(check_quality(contec_like(x)), "saturation")
    assert sat.leads == ("I", "II", "aVR", "aVL", "aVF") and sat.value == pytest.approx(0.2)


# ----------------------------------------------------------------------------- the stored form


def stored_report() -> dict[str, object]:
    x = heart(7.0)
    x[row("V2")] += sine(50.0, 40.0, seconds=7.0)
    return check_quality(to_recording(x)).to_dict()


def test_a_stored_report_reads_back_to_the_same_report() -> None:
    """The report stored with the ECG is what the console shows the doctor later."""
    data = stored_report()
    report = QualityReport.from_dict(data)
    assert report.to_dict() == data and report.verdict == WARN and report.duration_s == pytest.approx(7.0)
    assert [(p.kind, p.leads, p.unit) for p in report.problems] == [
        ("mains-noise", ("V2",), "uV"),
        ("too-short", (), "s"),
    ]
    bare = {**data, "problems": [{k: v for k, v in p.items() if k not in ("value", "unit")} for p in data["problems"]]}
    del bare["duration_s"]
    again = QualityReport.from_dict(bare)
    assert again.duration_s == 0.0 and [(p.value, p.unit) for p in again.problems] == [(None, "")] * 2


@pytest.mark.parametrize(
    "spoil",
    [
        lambda d: {**d, "verdict": "fine"},
        lambda d: {**d, "problems": [{**d["problems"][0], "kind": "gremlins"}]},
        lambda d: {k: v for k, v in d.items() if k != "beats"},
        lambda d: {**d, "heart_rate_bpm": "fast"},
        lambda d: {**d, "problems": [{**d["problems"][0], "value": "big"}]},
        lambda d: {**d, "beats": None},
    ],
)
def test_a_spoiled_stored_report_is_refused_with_the_typed_error(spoil) -> None:
    with pytest.raises(EcgQualityError):
        QualityReport.from_dict(spoil(stored_report()))


# ----------------------------------------------------------------------------- the thresholds
# A noise figure decides, at the documented threshold, whether the doctor is told; the leads are
# given disturbances whose measured figures fall just either side of it (asserted first, so the
# test cannot pass for want of a lead near the threshold).

WANDER_AMPLITUDES_UV = (356.7, 357.1, 364.3, 363.1, 353.9, 367.1, 356.5, 363.8, 367.0, 358.5, 367.1, 355.1)
HUM_AMPLITUDES_UV = tuple(np.linspace(23.9, 26.65, 12))
TREMOR_SIGMAS_UV = tuple(np.linspace(44.0, 50.0, 12))


def disturbed_heart(kind: str, sizes: tuple[float, ...]) -> QualityReport:
    """A heart whose every lead gets its own size of one disturbance."""
    x = heart()
    for i, size in enumerate(sizes):
        if kind == "wander":
            x[i] += sine(0.3, size, phase=0.3 + i)
        elif kind == "mains":
            x[i] += sine(50.0, size, phase=0.3 + i)
        else:
            x[i] += np.random.default_rng(i).normal(0.0, size, x.shape[-1])
    return check_quality(to_recording(x))


@pytest.mark.parametrize(
    "kind, sizes, figure, warn_at",
    [
        ("wander", WANDER_AMPLITUDES_UV, "wander_uv", 700.0),
        ("mains", HUM_AMPLITUDES_UV, "mains_uv", 25.0),
        ("muscle", TREMOR_SIGMAS_UV, "muscle_uv", 35.0),
    ],
)
def test_the_doctor_is_told_from_the_documented_level_on(
    kind: str, sizes: tuple[float, ...], figure: str, warn_at: float
) -> None:
    """A noisy lead passed as clean, or a clean one flagged, if the warning level moves by 1 µV."""
    report = disturbed_heart(kind, sizes)
    values = {m.lead: getattr(m, figure) for m in report.leads}
    assert any(warn_at - 1 <= v < warn_at for v in values.values())
    assert any(warn_at <= v < warn_at + 1 for v in values.values())
    expected = tuple(lead for lead, v in values.items() if v >= warn_at)
    problem = only(report, {"wander": "baseline-wander", "mains": "mains-noise"}.get(kind, "muscle-noise"))
    assert problem.leads == expected and problem.value == max(values.values()) and problem.severity == WARN


@pytest.mark.parametrize(
    "kind, size, figure, severity",
    [
        ("wander", 1026.2, "wander_uv", WARN),  # 1999.5 µV
        ("wander", 1026.7, "wander_uv", RE_RECORD),  # 2000.7 µV
        ("mains", 74.5, "mains_uv", WARN),  # 74.4 µV
        ("mains", 75.6, "mains_uv", RE_RECORD),  # 75.5 µV
        ("muscle", 89.5, "muscle_uv", WARN),  # 69.0 µV (lead II)
        ("muscle", 88.5, "muscle_uv", RE_RECORD),  # 70.7 µV (lead I)
    ],
)
def test_re_record_is_asked_from_the_documented_level_on(kind: str, size: float, figure: str, severity: str) -> None:
    """Just under the re-record level the ECG goes with a warning; at it, the patient records again."""
    sizes = (0.0, size) + (0.0,) * 10 if (kind, severity) == ("muscle", WARN) else (size,) + (0.0,) * 11
    report = disturbed_heart(kind, sizes)
    rerecord_at = {"wander": 2000.0, "mains": 75.0, "muscle": 70.0}[kind]
    worst = max(getattr(m, figure) for m in report.leads)
    assert abs(worst - rerecord_at) < 1
    assert report.verdict == severity and [p.severity for p in report.problems] == [severity]


# ----------------------------------------------------------------------------- what counts as flat

FINE_UV_PER_UNIT = 0.1  # fine units, so that a lead's range is what the test asks for


def with_slow_leads(pp_uv: dict[str, float], seconds: float = 10.0) -> QualityReport:
    """A heart whose named leads carry only a slow 1 Hz swing of the given peak-to-peak size."""
    x = heart(seconds)
    t = np.arange(x.shape[-1]) / RATE_HZ
    for name, pp in pp_uv.items():
        x[row(name)] = pp / 2 * np.sin(2 * np.pi * t)
    return check_quality(to_recording(x, noise_uv=0.0, uv_per_unit=FINE_UV_PER_UNIT))


def test_a_lead_under_40_uv_among_living_leads_is_off_and_one_over_it_is_not() -> None:
    """40 µV is less than any living lead's beat: under it the electrode is off (re-record);
    over it, a lead at right angles to the heart's axis is still a lead (send)."""
    report = with_slow_leads({"V1": 39.5, "V2": 40.5})
    off = only(report, "lead-off")
    assert off.leads == ("V1",) and off.value == pytest.approx(39.5, abs=0.1)
    assert measures(report, "V1").flat_s == 10.0 and measures(report, "V2").flat_s == 0.0


def test_when_every_lead_is_tiny_each_under_40_uv_is_off() -> None:
    """No heartbeat bigger than 40 µV anywhere: the cable is off, however the leads compare."""
    x = heart() * 0.025
    report = check_quality(to_recording(x, noise_uv=0.0, uv_per_unit=FINE_UV_PER_UNIT))
    assert only(report, "lead-off").leads == STANDARD_12_LEADS


def test_under_two_seconds_only_a_constant_lead_is_surely_lost() -> None:
    """1.5 s may hold no beat at all: a small lead is not called off, a constant one is."""
    small = with_slow_leads({"V1": 20.0}, seconds=1.5)
    assert kinds(small) == ["too-short"]
    constant = with_slow_leads({"V1": 0.0}, seconds=1.5)
    assert only(constant, "lead-off").leads == ("V1",)


@pytest.mark.parametrize("units, lost", [(2, True), (3, False)])
def test_a_cart_blanking_a_lost_input_writes_at_most_two_units(units: int, lost: bool) -> None:
    """At 25 µV per unit a blanked input can still toggle by 2 units (50 µV, over the 40 µV
    flat level); 3 units of swing is a signal."""
    uv_per_unit = 25.0
    x = heart()
    x[row("V2")] = uv_per_unit * units * (np.arange(x.shape[-1]) // int(RATE_HZ / 2) % 2)  # a 1 s square
    report = check_quality(to_recording(x, noise_uv=0.0, uv_per_unit=uv_per_unit))
    assert [p.leads for p in report.problems if p.kind == "lead-off"] == ([("V2",)] if lost else [])


@pytest.mark.parametrize("seconds, kind", [(0.3, "saturation"), (0.5, "lead-off"), (1.0, "lead-off")])
def test_half_a_second_at_the_rail_to_the_end_is_a_lost_electrode(seconds: float, kind: str) -> None:
    """From 0.5 s at the rail up to the end the electrode has drifted off; less is a clipped stretch."""
    x = heart()
    x[row("V6"), x.shape[-1] - int(seconds * RATE_HZ) :] = 40000.0
    report = check_quality(to_recording(x))
    assert only(report, kind).leads == ("V6",)
    assert measures(report, "V6").rail_s == pytest.approx(seconds)
    # bridged to the end from the baseline before it: the other leads' figures stay clean numbers
    assert all(m.wander_uv < 50 and m.muscle_uv < 10 for m in report.leads if m.lead != "V6")


def test_an_exact_forty_millisecond_plateau_is_clipping() -> None:
    x = heart()
    x[row("V3"), 3000:3020] = 5000.0  # 20 samples at 500 Hz
    rec = to_recording(x, dtype=np.int32, amplifier_limit_uv=3000.0)
    assert only(check_quality(rec), "saturation").value == pytest.approx(0.04)


def test_a_plateau_at_the_negative_extreme_is_clipping_too() -> None:
    x = heart()
    x[row("V3"), 3000:3050] = -5000.0
    x_clipped = np.maximum(x, -3000.0)
    assert only(check_quality(to_recording(x_clipped, dtype=np.int32, noise_uv=0.0)), "saturation").leads == ("V3",)


# ----------------------------------------------------------------------------- knocked electrodes


def knock(pots: dict[str, np.ndarray], at: int, samples: int = 25, offset_uv: float = 0.0) -> None:
    """The right-arm electrode knocked at sample `at`: its input jumps beyond the converter's
    range (60 mV) for `samples` and comes back `offset_uv` off, a new half-cell offset from then on
    (a step through the central terminal)."""
    pots["RA"][at : at + samples] += 60000.0
    pots["RA"][at + samples :] += offset_uv


def knocked_right_arm(seconds_at_rail: float = 0.3, offset_after_uv: float = 1200.0) -> np.ndarray:
    """The right-arm electrode knocked at 4 s, back 1.2 mV off."""
    pots = electrodes()
    knock(pots, 2000, int(seconds_at_rail * RATE_HZ), offset_after_uv)
    leads = twelve_leads(pots)
    leads[row("V2")] += 500.0  # and V2's own electrode sits 0.5 mV off zero: the bridge starts there
    return leads


def test_a_knocked_electrode_clips_its_leads_and_its_step_is_no_noise_elsewhere() -> None:
    """I, II and aVR hit the rail (saturation); aVL, aVF and every chest lead see the step through
    the central terminal: bridged over, it must not be reported as wander or noise on them."""
    report = check_quality(to_recording(knocked_right_arm()))
    sat = only(report, "saturation")
    assert sat.leads == ("I", "II", "aVR") and sat.value == pytest.approx(0.3)
    assert "press the right-arm (R) electrode on firmly" in sat.message_en
    assert kinds(report) == ["saturation"], [p.message_en for p in report.problems]
    for name in ("III", "aVL", "aVF", "V1", "V4"):
        m = measures(report, name)
        assert m.muscle_uv < 10 and m.mains_uv < 3, m
    # the chest leads' baseline steps by a third of the offset: the bridge joins the two levels
    assert measures(report, "V2").wander_uv == pytest.approx(1200.0 / 3, rel=0.05)
    assert measures(report, "aVL").wander_uv == pytest.approx(1200.0 / 2, rel=0.05)
    assert report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=1)


# ----------------------------------------------------------------------------- windows


def test_an_electrode_lost_in_the_last_two_seconds_is_still_found() -> None:
    """Regression: the 2 s windows step by 0.5 s and the last one is aligned on the end, but its
    range was taken from whole 0.5 s blocks (8.0-10.0 s for the last window of a 10.3 s recording,
    not 8.3-10.3 s): the end was in no window, and an electrode lost for the last 2 s passed."""
    x = heart(10.3)
    x[row("V2"), x.shape[-1] - int(2.0 * RATE_HZ) :] = 0.0
    report = check_quality(to_recording(x, noise_uv=0.0))
    assert only(report, "lead-off").leads == ("V2",) and measures(report, "V2").flat_s == pytest.approx(2.0)


@pytest.mark.parametrize("quiet", [slice(250, 1000), slice(4600, 5000)])
def test_a_lead_quiet_for_less_than_two_seconds_is_not_lost(quiet: slice) -> None:
    """1.5 s without signal between two beats, or the last 0.8 s: at 30 bpm a living lead can be
    that quiet; calling the electrode off would send the patient to record again for nothing."""
    x = heart()
    x[row("V2"), quiet] = 0.0
    report = check_quality(to_recording(x, noise_uv=0.0))
    assert "lead-off" not in kinds(report) and measures(report, "V2").flat_s == 0.0


def test_a_constant_lead_in_a_short_recording_is_flat_for_its_whole_length() -> None:
    report = with_slow_leads({"V1": 0.0}, seconds=1.5)
    assert measures(report, "V1").flat_s == pytest.approx(1.5)


# ----------------------------------------------------------------------------- edges of the rules


def test_swapped_arms_are_found_when_lead_i_has_no_t_wave() -> None:
    """A T axis at 90 degrees leaves lead I's T flat: P and QRS upside down are enough."""
    pots = electrodes(t_axis=90.0)
    pots["RA"], pots["LA"] = pots["LA"], pots["RA"]
    assert only(check_quality(to_recording(twelve_leads(pots))), "limb-lead-reversal").leads[0] == "I"


@pytest.mark.parametrize("seconds, expected", [(5.0, WARN), (5.5, WARN), (9.5, None)])
def test_the_length_limits_are_five_and_nine_and_a_half_seconds(seconds: float, expected: str | None) -> None:
    report = check_quality(to_recording(heart(seconds)))
    assert [p.severity for p in report.problems if p.kind == "too-short"] == ([expected] if expected else [])


def test_a_line_one_hertz_off_the_grid_is_not_mains() -> None:
    """The grid holds 50 Hz within 0.5 Hz: a 51 Hz line is something else, not a reason to unplug."""
    x = heart()
    x[row("V5")] += sine(51.0, 60.0)
    assert measures(check_quality(to_recording(x)), "V5").mains_uv < 5


def test_the_fifth_harmonic_is_counted_and_the_sixth_is_not() -> None:
    """At 1000 Hz: 250 Hz (the fifth of 50 Hz) is counted; 300 Hz, the sixth, is left out."""
    rate = 1000.0
    x = heart(4.0, rate)
    x[row("V3")] += sine(50.0, 10.0, 4.0, rate) + sine(250.0, 30.0, 4.0, rate) + sine(300.0, 30.0, 4.0, rate)
    v3 = measures(check_quality(to_recording(x, rate=rate)), "V3")
    assert v3.mains_uv == pytest.approx(np.hypot(10.0, 30.0), rel=0.03) and v3.mains_hz == 50.0


@pytest.mark.parametrize("drift_in_ten_seconds, flagged", [(650.0, True), (600.0, False)])
def test_wander_is_judged_on_one_ten_second_print(drift_in_ten_seconds: float, flagged: bool) -> None:
    """A steady drift over a 20 s recording: what shows on one 10 s print (the drift plus the
    T waves' share of the baseline: about 725 or 676 µV here) decides, not the whole 20 s."""
    x = heart(20.0)
    x[row("V2")] += np.linspace(0.0, 2 * drift_in_ten_seconds, x.shape[-1])
    report = check_quality(to_recording(x))
    assert abs(measures(report, "V2").wander_uv - 700.0) < 30
    assert ("baseline-wander" in kinds(report)) == flagged


@pytest.mark.parametrize(
    "excursion_uv, uv_per_unit, clipped",
    [(1000.5, FINE_UV_PER_UNIT, True), (999.5, FINE_UV_PER_UNIT, False), (1000.0, 1.0, True)],
)
def test_a_plateau_is_clipping_from_one_millivolt_off_the_baseline(
    excursion_uv: float, uv_per_unit: float, clipped: bool
) -> None:
    x = heart()
    x[row("V3"), 3000:3050] = 5000.0
    baseline = float(np.median(to_recording(x, dtype=np.int32, uv_per_unit=uv_per_unit).microvolts()[row("V3")]))
    limit = baseline + excursion_uv  # whole µV at 1 µV/unit: exactly 1 mV off
    rec = to_recording(x, dtype=np.int32, uv_per_unit=uv_per_unit, amplifier_limit_uv=limit)
    assert ("saturation" in kinds(check_quality(rec))) == clipped


@pytest.mark.parametrize("samples, severity", [(10, WARN), (250, RE_RECORD)])
def test_twenty_milliseconds_at_the_rail_is_clipping_and_half_a_second_needs_a_new_ecg(
    samples: int, severity: str
) -> None:
    x = heart()
    x[row("V2"), 3000 : 3000 + samples] = 40000.0
    assert only(check_quality(to_recording(x)), "saturation").severity == severity


def test_with_no_clean_half_second_left_tremor_is_still_measured() -> None:
    """V6's electrode bounces to the rail every 0.4 s, coming back 1.5 mV up or down each time (a
    knock, not a clipped R: see tests/test_ecg_tall_beats.py): with the stretches around it left
    out, no 0.5 s window keeps 30 % of its samples, so the whole band is measured instead; the
    shivering on V1 must still be reported and the quiet leads must not be."""
    x = heart()
    for k, start in enumerate(range(0, x.shape[-1], 200)):
        x[row("V6"), start : start + 15] = 40000.0
        x[row("V6"), start + 15 :] += 1500.0 if k % 2 == 0 else -1500.0
    x[row("V1")] += np.random.default_rng(1).normal(0.0, 150.0, x.shape[-1])
    report = check_quality(to_recording(x))
    assert only(report, "saturation").leads == ("V6",)
    assert only(report, "muscle-noise").leads == ("V1",)
    assert all(2 < measures(report, n).muscle_uv < 30 for n in ("I", "III", "V2", "V5"))


def test_a_lost_lead_is_not_said_to_hum_on_a_60_hz_grid() -> None:
    """A lead not measured (lost) shows the default grid, 50 Hz (China's), and no hum."""
    v3 = measures(with_slow_leads({"V3": 0.0}), "V3")
    assert (v3.mains_uv, v3.mains_hz, v3.muscle_uv, v3.wander_uv) == (0.0, 50.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- the swap rules' limits


def arms_swapped(**shape: float) -> QualityReport:
    pots = electrodes(**shape)
    pots["RA"], pots["LA"] = pots["LA"], pots["RA"]
    return check_quality(to_recording(twelve_leads(pots)))


@pytest.mark.parametrize(
    "shape, swap_found",
    [
        ({"t_axis": 90.0, "p_scale": 0.561}, True),  # lead I: QRS down, P -40.7 µV, T flat
        ({"t_axis": 90.0, "p_scale": 0.547}, False),  # P -39.7 µV: too small to have a sign
        ({"p_axis": 90.0, "t_scale": 0.2037}, True),  # QRS down, T -40.1 µV, P flat
        ({"p_axis": 90.0, "t_scale": 0.201}, False),  # T -39.5 µV
    ],
)
def test_a_wave_counts_for_the_arm_swap_from_40_uv(shape: dict[str, float], swap_found: bool) -> None:
    """Under 40 µV a P or T wave's sign is noise: it must not tip a normal ECG into "swap the
    arms", and from 40 µV it must count, or a real swap is sent to the cardiologist."""
    report = arms_swapped(**shape)
    assert ("limb-lead-reversal" in kinds(report)) == swap_found


@pytest.mark.parametrize("share_of_ra, neutral", [(0.114, True), (0.116, False)])
def test_lead_ii_under_60_uv_means_the_right_arm_electrode_is_on_the_leg(share_of_ra: float, neutral: bool) -> None:
    """The RA clip on the right leg, touching the arm a little (lead II's beat 59.8 or 60.8 µV while
    I and III carry 1 mV): under 60 µV the doctor is told to move the clip off the leg."""
    pots = electrodes(qrs_axis=120.0)
    pots["RA"] = pots["LL"] + share_of_ra * (pots["RA"] - pots["LL"])
    swap = only(check_quality(to_recording(twelve_leads(pots))), "limb-lead-reversal")
    assert (swap.leads == ("II",)) == neutral


# ----------------------------------------------------------------------------- hum, precisely


@pytest.mark.parametrize("hz", [50.3, 49.6, 60.4])
def test_a_grid_off_its_frequency_by_up_to_half_a_hertz_is_measured_in_full(hz: float) -> None:
    """Rural grids drift: 50.3 Hz is still the mains, and its whole line must be counted."""
    x = heart()
    x[row("V1")] += sine(hz, 40.0)
    assert measures(check_quality(to_recording(x)), "V1").mains_uv == pytest.approx(40.0, rel=0.02)


def test_hum_under_heavy_tremor_is_measured_above_the_noise_floor() -> None:
    """A shivering patient next to a fridge: the line is measured above the tremor's spectrum,
    not with it (averaged over ten patients' worth of noise: 30.3 µV). Where the harmonics' own
    share of the noise counted as hum as well, the same ten read 32.1 µV."""
    figures = []
    for seed in range(10):
        x = heart()
        x[row("V1")] += sine(50.0, 30.0) + np.random.default_rng(seed).normal(0.0, 100.0, x.shape[-1])
        figures.append(measures(check_quality(to_recording(x)), "V1").mains_uv)
    assert float(np.mean(figures)) == pytest.approx(30.0, rel=0.05)


def test_thirty_milliseconds_at_the_negative_rail_is_clipping() -> None:
    """Too short for the plateau rule (40 ms): only the converter's lowest code says it."""
    x = heart()
    x[row("V5"), 1000:1015] = -40000.0
    sat = only(check_quality(to_recording(x)), "saturation")
    assert sat.leads == ("V5",) and sat.value == pytest.approx(0.03)


def test_a_flat_topped_wave_near_the_baseline_of_an_offset_lead_is_not_clipping() -> None:
    """An unfiltered cart leaves V3 2 mV off zero: a 0.9 mV flat top above that lead's own
    baseline is a wave, not an amplifier at its limit, whatever the other leads' level."""
    x = heart()
    x[row("V3")] += 2000.0
    x[row("V3"), 3000:3050] = 5000.0
    rec = to_recording(x, dtype=np.int32, amplifier_limit_uv=2900.0)
    assert "saturation" not in kinds(check_quality(rec))


def test_a_report_built_without_a_length_or_lead_figures_says_none() -> None:
    """Older stored reports have no duration: 0 s (unknown), never a made-up second."""
    report = QualityReport(verdict=ACCEPTABLE, heart_rate_bpm=None, beats=(), problems=())
    assert (report.duration_s, report.leads) == (0.0, ())


def test_hum_on_two_chest_leads_names_no_single_electrode() -> None:
    """V1 and V2 humming share no electrode of their own: the doctor checks the right leg (N)."""
    x = heart()
    x[row("V1")] += sine(50.0, 40.0)
    x[row("V2")] += sine(50.0, 40.0, phase=1.0)
    mains = only(check_quality(to_recording(x)), "mains-noise")
    assert mains.leads == ("V1", "V2") and "check the right-leg (N) electrode" in mains.message_en


def test_a_three_lead_recording_is_not_said_swapped_without_avr_to_confirm() -> None:
    """Lead II upside down is RA/LL only with an upright aVR; with I, II, III alone, no claim."""
    pots = electrodes(qrs_axis=0.0)
    pots["RA"], pots["LL"] = pots["LL"], pots["RA"]
    three = twelve_leads(pots)[:3]
    report = check_quality(to_recording(three, names=("I", "II", "III")))
    assert "limb-lead-reversal" not in kinds(report)


@pytest.mark.parametrize("seconds", [2.0, 2.3])
def test_in_a_two_second_recording_a_small_lead_is_already_judged_flat(seconds: float) -> None:
    """From 2 s there is a whole window: a 20 µV lead among living ones is lost (the recording is
    too short as well, but the doctor should fix the electrode before recording again)."""
    report = with_slow_leads({"V1": 20.0}, seconds=seconds)
    assert only(report, "lead-off").leads == ("V1",)


def test_an_electrode_lost_after_the_first_beat_of_a_short_recording_is_found() -> None:
    """2.3 s: the window aligned on the end (0.3-2.3 s) is not the first one (0-2 s, which holds
    V2's P wave): it alone shows that V2 went flat."""
    x = heart(2.3)
    x[row("V2"), int(0.3 * RATE_HZ) :] = 0.0
    report = check_quality(to_recording(x, noise_uv=0.0))
    assert only(report, "lead-off").leads == ("V2",)


def test_samples_lost_after_the_last_one_take_no_beat_away() -> None:
    """The link dropped at the very end (a gap declared after the last sample): nothing joins
    there, so the last beat, 50 ms before the end, still counts."""
    x = heart(9.25)
    report = check_quality(to_recording(x, gaps=(SampleGap(x.shape[-1], 50),)))
    assert len(report.beats) == 12


@pytest.mark.parametrize("flat_in_avr", ["p_axis", "t_axis"])
def test_lead_ii_upside_down_is_no_arm_leg_swap_without_an_upright_avr(flat_in_avr: str) -> None:
    """RA/LL is told by II upside down AND aVR's P and T both upright; with one of them flat
    (its axis at right angles to aVR's view) the doctor is not sent to swap electrodes on a guess."""
    pots = electrodes(qrs_axis=0.0, **{flat_in_avr: 0.0})
    pots["RA"], pots["LL"] = pots["LL"], pots["RA"]
    assert "limb-lead-reversal" not in kinds(check_quality(to_recording(twelve_leads(pots))))


def test_an_electrode_knocked_once_and_later_lost_is_off() -> None:
    """A touch of the rail at 3 s, then the electrode drifts there for good from 9 s: the last
    stretch decides, not the first."""
    x = heart()
    x[row("V6"), 1500:1515] = 40000.0
    x[row("V6"), 4500:] = 40000.0
    report = check_quality(to_recording(x))
    assert only(report, "lead-off").leads == ("V6",) and "saturation" not in kinds(report)
    assert len(report.beats) == 12  # a lost lead's rail does not hide the other leads' beats


def test_a_lead_swinging_exactly_40_uv_is_alive() -> None:
    """Flat means under 40 µV: a square swing of exactly 40 µV (1 µV units) is a lead."""
    x = heart()
    x[row("V1")] = 40.0 * (np.arange(x.shape[-1]) // int(RATE_HZ / 2) % 2)
    report = check_quality(to_recording(x, noise_uv=0.0))
    assert "lead-off" not in kinds(report)


# ----------------------------------------------------------------------------- figures at every rate


def band_limited_noise(
    rms_uv: float, rate: float, seconds: float = 10.0, seed: int = 3, low_hz: float = 20.0, top: float = 0.45
) -> np.ndarray:
    """Tremor spread evenly over the muscle band (20-150 Hz, or up to 0.45 x the rate), of this
    RMS; or over a part of it (from low_hz, up to `top` x the rate)."""
    n = int(seconds * rate)
    spectrum = np.fft.rfft(np.random.default_rng(seed).normal(0.0, 1.0, n))
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    spectrum[(freqs < low_hz) | (freqs > min(150.0, top * rate))] = 0.0
    noise = np.fft.irfft(spectrum, n)
    return noise * rms_uv / np.sqrt(np.mean(noise**2))


@pytest.mark.parametrize("rate", [100.0, 256.0, 500.0, 1000.0, 2000.0])
def test_tremor_of_50_uv_reads_50_uv_at_every_accepted_rate(rate: float) -> None:
    """The muscle figure is the tremor's own RMS whatever the cart's rate: a 100 Hz Holter-style
    recording must not pass a shivering patient that a 500 Hz cart would flag (or the reverse).
    50 µV RMS is a warning (35-70 µV) at every rate."""
    x = heart(rate=rate)
    x[row("V1")] += band_limited_noise(50.0, rate)
    report = check_quality(to_recording(x, rate=rate))
    assert measures(report, "V1").muscle_uv == pytest.approx(50.0, rel=0.08)
    muscle = only(report, "muscle-noise")
    assert (muscle.leads, muscle.severity) == (("V1",), WARN)


# ----------------------------------------------------------------------------- edges, exactly


def test_a_right_arm_knocked_for_twenty_milliseconds_between_beats_makes_no_heartbeat() -> None:
    """From 20 ms at the rail the step is left out of the beat search: the spike it sends through
    every lead mid-RR, counted as a QRS, would add a beat and misstate the rate."""
    report = check_quality(to_recording(knocked_right_arm(seconds_at_rail=0.02, offset_after_uv=0.0)))
    assert only(report, "saturation").leads == ("I", "II", "aVR")
    assert len(report.beats) == 12 and report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)


def square_swings(pp_uv: dict[str, int], typical_uv: int) -> QualityReport:
    """Every lead a square swing (0.5 s steps, whole µV, no noise) of typical_uv, except the named ones."""
    steps = np.arange(int(10 * RATE_HZ)) // int(RATE_HZ / 2) % 2
    x = np.stack([pp_uv.get(name, typical_uv) * steps for name in STANDARD_12_LEADS]).astype(np.float64)
    return check_quality(to_recording(x, noise_uv=0.0))


def test_in_a_low_voltage_ecg_of_40_uv_a_30_uv_lead_is_alive() -> None:
    """Flat relative to the others only when the typical lead is under 40 µV: at exactly 40 µV a
    30 µV lead (over a tenth of it) is a lead at right angles to the axis, not a lost electrode."""
    assert "lead-off" not in kinds(square_swings({"V1": 30}, 40))
    assert only(square_swings({"V1": 3}, 40), "lead-off").leads == ("V1",)


def test_a_lead_at_exactly_a_tenth_of_the_others_is_alive() -> None:
    """Among 250 µV leads, flat means under a tenth of them: 25 µV is still a lead, 24 µV is off."""
    assert "lead-off" not in kinds(square_swings({"V1": 25}, 250))
    assert only(square_swings({"V1": 24}, 250), "lead-off").leads == ("V1",)


def test_a_baseline_shifting_by_exactly_0_7_mv_is_wander() -> None:
    """From 0.7 mV (7 mm) ST levels and the row layout suffer: a baseline swinging by exactly
    that much (whole-µV steps, so the figure is exact) is told to the doctor."""
    wander = only(square_swings({}, 700), "baseline-wander")
    assert (wander.value, wander.severity) == (700.0, WARN)


def test_clipping_twice_the_second_time_in_the_last_tenth_of_a_second_is_no_lost_electrode() -> None:
    """Lost means at the rail from some moment to the end for 0.5 s: V2 clipped for 0.1 s at 2 s
    and again in its last 0.1 s is clipping (send, with a warning), not an electrode to reattach."""
    x = heart()
    x[row("V2"), 1000:1050] = 40000.0
    x[row("V2"), -50:] = 40000.0
    report = check_quality(to_recording(x))
    assert kinds(report) == ["saturation"] and only(report, "saturation").value == pytest.approx(0.2)


def test_wander_across_the_middle_of_a_twenty_second_strip_is_found() -> None:
    """Any 10 s of a longer strip may be the print the cardiologist reads: a baseline climbing
    0.8 mV between 5 and 15 s is wander, though each half alone climbs only 0.4 mV."""
    x = heart(20.0)
    t = np.arange(x.shape[-1]) / RATE_HZ
    x[row("V1")] += 800.0 * np.clip((t - 5.0) / 10.0, 0.0, 1.0)
    wander = only(check_quality(to_recording(x)), "baseline-wander")
    assert wander.leads == ("V1",) and wander.value == pytest.approx(800.0, rel=0.05)


def test_an_odd_length_recording_counts_flat_time_where_it_was() -> None:
    """10.3 s, V2 lost for its last 3 s: the flat windows are those from 7.5 s to the end (2.8 s
    inside them), and the window aligned on the end is measured on its own samples, not lent to
    another window."""
    x = heart(10.3)
    x[row("V2"), x.shape[-1] - int(3.0 * RATE_HZ) :] = 0.0
    report = check_quality(to_recording(x, noise_uv=0.0))
    assert only(report, "lead-off").leads == ("V2",) and measures(report, "V2").flat_s == pytest.approx(2.8)


def test_an_odd_length_recording_quiet_for_under_two_seconds_before_its_end_is_not_lost() -> None:
    """10.3 s, V2 quiet from 8.3 to 10.0 s (1.7 s) and alive again after: no 2 s window is flat."""
    x = heart(10.3)
    x[row("V2"), int(8.3 * RATE_HZ) : int(10.0 * RATE_HZ)] = 0.0
    assert "lead-off" not in kinds(check_quality(to_recording(x, noise_uv=0.0)))


@pytest.mark.parametrize(
    "p_axis, t_axis",
    [
        (-150.0, 150.0),  # retrograde P (a junctional rhythm): inverted in II, upright in aVR; T flat in II
        (150.0, -150.0),  # P flat in II; T inverted in II and upright in aVR
    ],
)
def test_lead_ii_needs_both_p_and_t_inverted_for_an_arm_leg_swap(p_axis: float, t_axis: float) -> None:
    """Right arm and left leg swapped turn lead II's P and T both upside down. One inverted wave
    with the other flat is the patient's own heart (a junctional rhythm, T inversion): calling it a
    swap would have the nurse move correctly placed electrodes and record the same ECG again."""
    report = check_quality(to_recording(twelve_leads(electrodes(p_axis=p_axis, t_axis=t_axis))))
    assert report.verdict == ACCEPTABLE and kinds(report) == []


def test_at_500_hz_the_line_on_the_nyquist_frequency_is_not_counted_as_a_harmonic() -> None:
    """At 500 Hz the 50 Hz mains' fifth harmonic would sit on 250 Hz, the Nyquist frequency, where
    there is no neighbouring spectrum above to tell a line from: a 40 µV sample-to-sample alternation
    there (converter crosstalk) is not hum; a 20 µV hum is measured as 20 µV and stays under the
    warning level."""
    x = heart()
    x[row("V1")] += sine(50.0, 20.0) + sine(250.0, 40.0, phase=np.pi / 2)
    report = check_quality(to_recording(x))
    assert measures(report, "V1").mains_uv == pytest.approx(20.0, rel=0.03) and report.verdict == ACCEPTABLE


# ----------------------------------------------------------------------------- exact figures (q20)


def test_a_baseline_swinging_by_exactly_2_mv_asks_for_a_new_ecg() -> None:
    """From 2 mV (2 cm) the trace runs into the next row: a baseline swinging by exactly that much
    is re-recorded, not sent with a warning. Whole-µV levels whose 20 ms block means are exact
    (each block alternates between two codes 1 µV apart, so that no exact plateau looks clipped)."""
    n = int(10 * RATE_HZ)
    level = 2000.0 * (np.arange(n) // int(RATE_HZ / 2) % 2) + np.arange(n) % 2
    report = check_quality(to_recording(np.tile(level, (12, 1)), noise_uv=0.0))
    wander = only(report, "baseline-wander")
    assert (wander.value, wander.severity) == (2000.0, RE_RECORD)


def test_a_harmonic_whose_neighbourhood_reaches_the_nyquist_frequency_is_not_counted() -> None:
    """At 212 Hz the 50 Hz line's second harmonic (100 Hz) has its neighbouring spectrum up to
    100 + 5 + 1 = 106 Hz, the Nyquist frequency itself: with no spectrum above it to stand out
    from, it is left out. The hum is its 20 µV fundamental, under the warning level; counting the
    40 µV at 100 Hz (a converter's own tone there) would send the doctor to unplug appliances."""
    rate = 212.0
    x = heart(rate=rate)
    x[row("V1")] += sine(50.0, 20.0, rate=rate) + sine(100.0, 40.0, rate=rate)
    report = check_quality(to_recording(x, rate=rate))
    assert measures(report, "V1").mains_uv == pytest.approx(20.0, rel=0.02) and "mains-noise" not in kinds(report)


def test_a_second_long_knock_leaves_the_other_leads_without_wander() -> None:
    """The right arm knocked for a whole second: aVL and aVF see its 1.2 mV return offset halved
    (0.6 mV, under the 0.7 mV warning level), bridged by a line from one baseline to the other.
    A bridge that overshot the far baseline would show 0.9 mV and call for wander that is not there."""
    report = check_quality(to_recording(knocked_right_arm(seconds_at_rail=1.0)))
    assert kinds(report) == ["saturation"]
    for name in ("aVL", "aVF"):
        assert measures(report, name).wander_uv == pytest.approx(600.0, rel=0.02)


def test_at_600_hz_hum_on_the_60_hz_grid_adds_almost_nothing_to_the_muscle_figure() -> None:
    """At 600 Hz both combs delay by whole samples (12 and 10): they null 60 Hz and its harmonics
    exactly, but where the boxcars' edges bend the hum (the first and last few dozen samples:
    under 1 µV of the figure here). The combs' start-up samples, before both delays are filled,
    let the hum through whole: they are left out. 500 µV of hum (20 times the mains warning level)
    moves the muscle figure by under 2 µV (6 % of its 35 µV warning level): a lead that hums must
    not be said to shiver. Counting two start-up samples adds 4.5 µV; all of them, 28 µV."""
    rate = 600.0
    clean = heart(2.0, rate)
    humming = clean.copy()
    humming[row("V1")] += sine(60.0, 500.0, 2.0, rate)
    without, with_hum = (check_quality(to_recording(x, rate=rate)) for x in (clean, humming))
    assert with_hum.beats == without.beats
    assert measures(with_hum, "V1").muscle_uv == pytest.approx(measures(without, "V1").muscle_uv, abs=2.0)


def test_an_electrode_dying_in_steps_counts_its_flat_time_where_it_was() -> None:
    """10.3 s, V2 lost from 7.5 s and drifting in 30 µV steps (0, then 30 from 8.3 s, then 60 from
    9.5 s): the windows 7.5-9.5 s and 8.3-10.3 s are each flat (30 µV), the one between them,
    8.0-10.0 s, spans 60 µV and is not. Flat time is 7.5 s to the end: 2.8 s; lending the end
    window's range to its neighbour would count 7.5-10.0 s."""
    x = heart(10.3)
    v2 = np.zeros(x.shape[-1])
    v2[int(8.3 * RATE_HZ) :] = 30.0
    v2[int(9.5 * RATE_HZ) :] = 60.0
    x[row("V2"), int(7.5 * RATE_HZ) :] = v2[int(7.5 * RATE_HZ) :]
    report = check_quality(to_recording(x, noise_uv=0.0))
    assert only(report, "lead-off").leads == ("V2",) and measures(report, "V2").flat_s == pytest.approx(2.8)


# ----------------------------------------------------------------------------- the swap rules, exactly
#
# Beats drawn as rectangles of whole µV (no noise): the mains-free copy (boxcars of 10 and 8
# samples) keeps every plateau of 30 samples or more exactly, so the median beat's waves come out
# exactly as drawn, and a rule can be tried at its very threshold.

P_WAVE_S = (-0.19, -0.13)
T_WAVE_S = (0.20, 0.32)
NARROW_QRS_S = (-0.02, 0.02)


def beat_train(parts: list[tuple[float, float, float]], seconds: float = 10.0) -> np.ndarray:
    """Rectangles (from, to, µV), placed around every QRS peak (0.4 s + k x 0.8 s)."""
    t = np.arange(int(seconds * RATE_HZ)) / RATE_HZ
    phase = (t - FIRST_PEAK_S + RR_S / 2) % RR_S - RR_S / 2
    return sum((height * ((phase >= start) & (phase < end)) for start, end, height in parts), np.zeros(t.size))


def drawn_limb_leads(
    lead_i: list[tuple[float, float, float]],
    lead_ii: list[tuple[float, float, float]],
    chest: dict[str, list[tuple[float, float, float]]] | None = None,
) -> QualityReport:
    """I and II as drawn, III = II - I (Einthoven), and any chest leads: whole µV, no noise."""
    i_, ii = beat_train(lead_i), beat_train(lead_ii)
    chest = chest or {}
    x = np.stack([i_, ii, ii - i_, *(beat_train(parts) for parts in chest.values())])
    return check_quality(to_recording(x, names=("I", "II", "III", *chest), noise_uv=0.0))


UPRIGHT_II = [(*P_WAVE_S, 60.0), (*NARROW_QRS_S, 400.0), (*T_WAVE_S, 150.0)]


def test_a_p_wave_of_exactly_40_uv_counts_for_the_arm_swap() -> None:
    """Swapped arms: lead I's QRS upside down and its P exactly -40 µV (T flat). From 40 µV a P
    wave's sign counts: two waves upside down, the doctor is told to swap the arm electrodes back."""
    report = drawn_limb_leads([(*P_WAVE_S, -40.0), (*NARROW_QRS_S, -500.0)], UPRIGHT_II)
    assert only(report, "limb-lead-reversal").leads == ("I", "II", "III")


def test_a_qrs_under_0_2_of_polarity_has_no_sign_and_p_and_t_decide() -> None:
    """Swapped arms in a heart whose QRS axis is near 90 degrees: lead I's QRS is biphasic, its
    polarity (R + S) / (R - S) = (330 - 270) / 600 = 0.1, no sign. P and T upside down are
    enough; counting the QRS as upright would send the swapped ECG to the cardiologist."""
    qrs = [(-0.06, 0.0, 330.0), (0.0, 0.06, -270.0)]
    report = drawn_limb_leads([(*P_WAVE_S, -100.0), *qrs, (*T_WAVE_S, -100.0)], UPRIGHT_II)
    assert only(report, "limb-lead-reversal").leads == ("I", "II", "III")


def test_a_lateral_qrs_of_exactly_zero_polarity_is_no_mirror_image_heart() -> None:
    """Dextrocardia is suspected when V5 and V6 point away (QRS polarity under 0). A biphasic QRS
    of equal R and S (polarity exactly 0) does not point away: lead I upside down is swapped arms."""
    biphasic = [(-0.06, 0.0, 300.0), (0.0, 0.06, -300.0)]
    lead_i = [(*P_WAVE_S, -100.0), (*NARROW_QRS_S, -500.0), (*T_WAVE_S, -100.0)]
    report = drawn_limb_leads(lead_i, UPRIGHT_II, {"V5": biphasic, "V6": biphasic})
    assert "limb-lead-reversal" in kinds(report)


@pytest.mark.parametrize(
    "own_uv, others_uv",
    [
        (50.0, 500.0),  # exactly a tenth of I and III (and under 60 µV)
        (60.0, 900.0),  # exactly 60 µV (and under a tenth)
    ],
)
def test_lead_ii_exactly_at_the_neutral_limits_is_no_arm_on_the_leg(own_uv: float, others_uv: float) -> None:
    """An arm electrode on the right leg leaves lead II under 60 µV AND under a tenth of I and III.
    Exactly at either limit the clip is on the arm: the nurse is not sent to move it."""
    x = np.stack([beat_train([(*NARROW_QRS_S, h)]) for h in (others_uv, own_uv, -others_uv)])
    report = check_quality(to_recording(x, names=("I", "II", "III"), noise_uv=0.0))
    assert "limb-lead-reversal" not in kinds(report) and len(report.beats) == 12


def test_a_qrs_in_the_first_80_ms_is_left_out_of_the_muscle_figure_too() -> None:
    """A 1 s strip (the shortest whose noise is measured) that starts 48 ms before an R peak: that
    QRS is left out from the strip's first sample, like any other (80 ms before the peak), so a
    noise-free heart shows no tremor. Counted, its edges alone read as 95 µV of muscle noise."""
    x = heart(1.35)[:, int(0.35 * RATE_HZ) :]
    report = check_quality(to_recording(x, noise_uv=0.0, uv_per_unit=FINE_UV_PER_UNIT, dtype=np.int32))
    assert report.beats[0] < int(0.08 * RATE_HZ)
    assert kinds(report) == ["too-short"] and max(m.muscle_uv for m in report.leads) < 10


# ----------------------------------------------------------------------------- bridged stretches, again


def test_an_electrode_knocked_every_second_leaves_the_other_leads_clean() -> None:
    """The right arm knocked ten times, each time coming back with its half-cell offset 1.5 mV up
    or down: every knocked stretch is bridged by a line joining the baselines either side, so the
    leads that see the steps through the central terminal show neither tremor (within 2 µV of the
    same heart never knocked) nor more wander than the step itself (V2: a third of 1.5 mV). A
    bridge that held one side's level and stepped at its edge would ring through the muscle band
    ten times (aVF and V1 read 15-20 µV, the step on V2 7 % more)."""
    pots = electrodes()
    for k, start in enumerate(range(100, 5000, 500)):
        knock(pots, start, offset_uv=1500.0 if k % 2 == 0 else -1500.0)
    report = check_quality(to_recording(twelve_leads(pots)))
    never = check_quality(to_recording(heart()))
    assert only(report, "saturation").leads == ("I", "II", "aVR")
    for name in ("III", "aVL", "aVF", "V1", "V2", "V5"):
        assert measures(report, name).muscle_uv == pytest.approx(measures(never, name).muscle_uv, abs=2.0), name
    assert measures(report, "V2").wander_uv == pytest.approx(1500.0 / 3, rel=0.03)


def test_a_knock_in_the_first_third_of_a_second_is_bridged_from_the_baseline_before_it() -> None:
    """A 2 s strip, the right arm knocked at 0.3 s and back 1.5 mV higher: the bridge starts from
    the baseline in the 0.15 s before the stretch (all there is), so V2's baseline step, a third of
    1.5 mV, is measured (within 10 %: the stretch starts 0.15 s before the knock). Starting it from
    the far side instead hides the step: 35 µV."""
    pots = electrodes(seconds=2.0)
    knock(pots, 150, offset_uv=1500.0)
    report = check_quality(to_recording(twelve_leads(pots)))
    assert measures(report, "V2").wander_uv == pytest.approx(1500.0 / 3, rel=0.1)


@pytest.mark.parametrize("rate", [256.0, 360.0])
def test_fast_tremor_at_the_top_of_the_band_reads_its_rms_at_a_low_rate(rate: float) -> None:
    """At rates under 450 Hz the band's top (0.45 x the rate) is already below 150 Hz: nothing
    more may be filtered there. Tremor of 50 µV RMS between 70 Hz and 0.42 x the rate (a
    shivering patient's fast component) reads 50 µV; an extra two-sample average would take a
    third of it away (34 µV at 256 Hz) and pass a noisy ECG as clean."""
    x = heart(rate=rate)
    x[row("V1")] += band_limited_noise(50.0, rate, low_hz=70.0, top=0.42)
    assert measures(check_quality(to_recording(x, rate=rate)), "V1").muscle_uv == pytest.approx(50.0, rel=0.08)


# ----------------------------------------------------------------------------- rails and beats, exactly


def test_exactly_twenty_milliseconds_at_the_rail_is_bridged_in_every_lead() -> None:
    """From 20 ms at the rail an electrode counts as knocked: the stretch is left out of the beat
    search and bridged in every lead's noise figures. A 1 s strip (two 0.5 s windows) with the
    right arm at the rail for exactly 20 ms: the spike it sends through the central terminal must
    not read as tremor in the chest leads (unbridged, V1 reads 82 µV of muscle noise)."""
    pots = electrodes(seconds=1.0)
    knock(pots, 100, samples=10)  # 20 ms at 500 Hz
    report = check_quality(to_recording(twelve_leads(pots)))
    assert only(report, "saturation").value == pytest.approx(0.02)
    assert kinds(report) == ["saturation", "too-short"]
    assert all(m.muscle_uv < 10 for m in report.leads)


@pytest.mark.parametrize("stretch_s, beats", [(1.0, 8), (1.25, 0)])
def test_a_lead_at_the_rail_for_more_than_a_fifth_of_the_time_is_not_read_for_beats(
    stretch_s: float, beats: int
) -> None:
    """One lead (II), clipped twice: for exactly a fifth of the 10 s (2 x 1 s) it still gives the
    beats outside the clipped stretches (75 bpm); for a quarter (2 x 1.25 s) it is not read for
    beats at all, and no heart rate is made up from what is left."""
    x = heart()[[row("II")]]
    for start in (600, 3000):
        x[0, start : start + int(stretch_s * RATE_HZ)] = 40000.0
    report = check_quality(to_recording(x, names=("II",)))
    assert kinds(report) == ["saturation"] and len(report.beats) == beats
    assert report.heart_rate_bpm == (pytest.approx(60 / RR_S, abs=0.5) if beats else None)


def test_every_lead_clipped_for_30_ms_at_once_still_gives_the_heart_rate() -> None:
    """The patient moves: every lead touches the rail for 30 ms between two beats. Each lead is
    at the rail for far less than a fifth of the time, so all are still read for beats."""
    x = heart()
    x[:, 2100:2115] = 40000.0
    report = check_quality(to_recording(x))
    assert len(report.beats) == 12 and report.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.5)


def test_a_dropout_right_after_the_first_sample_is_a_join_like_any_other() -> None:
    """A bridge stream whose first sample arrived before a dropout (the gap declared at sample 1)
    and 8 mV away from the rest: the join is left out of the beat search like any other join, so
    no beat is made of the jump (counted, it is a beat at sample 0 and the rate reads 78, not 75)."""
    x = heart()
    x[:, 0] += 8000.0
    joined = check_quality(to_recording(x, gaps=(SampleGap(1, 250),)))
    assert len(joined.beats) == 12 and joined.beats[0] > int(0.1 * RATE_HZ)
    assert joined.heart_rate_bpm == pytest.approx(60 / RR_S, abs=0.3)
    undeclared = check_quality(to_recording(x))  # the check can fail: the same jump, no gap declared
    assert undeclared.beats[0] < int(0.05 * RATE_HZ) and undeclared.heart_rate_bpm > 60 / RR_S + 1


def test_a_knock_in_the_first_tenth_of_a_second_is_bridged_from_the_level_after_it() -> None:
    """The right arm knocked at 0.1 s and back 1.5 mV higher: the stretch left out reaches the
    strip's first sample, so there is no baseline before it and the bridge holds the level after it
    (V2: a third of 1.5 mV) from the start. The 0.1 s before the knock is too short to be a
    baseline: V2 shows no wander from the step, nor any other fault."""
    pots = electrodes()
    knock(pots, 50, offset_uv=1500.0)
    report = check_quality(to_recording(twelve_leads(pots)))
    never = check_quality(to_recording(heart()))
    assert only(report, "saturation").leads == ("I", "II", "aVR") and kinds(report) == ["saturation"]
    for name in ("III", "V2", "V5"):
        assert measures(report, name).wander_uv == pytest.approx(measures(never, name).wander_uv, abs=30.0), name


def test_hum_under_tremor_at_1000_hz_is_measured_above_the_spectrum_beside_the_line() -> None:
    """The fridge and the shivering patient again, on a 1000 Hz cart: the tremor fills 20-150 Hz
    (as muscle noise does) and the spectrum above it, most of the bins, holds only the amplifier's
    noise. The line's background is the spectrum beside it (2-5 Hz away), where the tremor is: the
    30 µV hum reads 30 µV (within 5 %, averaged over ten patients: 29.7 µV). Taken from the whole,
    mostly quiet, spectrum, the tremor under the line would count as hum: 34 µV; so it did where the
    tremor's bins at 100 and 150 Hz (150 Hz: the edge of the band, quiet above) counted: 33.5 µV."""
    figures = []
    for seed in range(10):
        x = heart(rate=1000.0)
        x[row("V1")] += sine(50.0, 30.0, rate=1000.0) + band_limited_noise(100.0, 1000.0, seed=seed)
        figures.append(measures(check_quality(to_recording(x, rate=1000.0)), "V1").mains_uv)
    assert float(np.mean(figures)) == pytest.approx(30.0, rel=0.05)


def test_the_amplifier_s_recovery_after_each_knock_is_left_out_with_the_knock() -> None:
    """The right arm knocked every second (as in
    test_an_electrode_knocked_every_second_leaves_the_other_leads_clean), but the input comes back from the rail the way
    an amplifier does, settling over 20 ms (an exponential tail, 60 mV at the rail). The 0.15 s
    left out on either side of each knocked stretch covers the tail: no lead shows tremor (within
    2 µV of the same heart never knocked). With half that margin the tail's end rings through the
    muscle band after each of the ten knocks: 27-47 µV of 'muscle noise' on aVL, aVF, V1, V2 and V5,
    and the doctor would be told to relax a patient who is lying still."""
    pots = electrodes()
    n = pots["RA"].size
    for k, start in enumerate(range(100, 5000, 500)):
        knock(pots, start, offset_uv=1500.0 if k % 2 == 0 else -1500.0)
        pots["RA"][start + 25 :] += 60000.0 * np.exp(-np.arange(n - start - 25) / (0.02 * RATE_HZ))  # settling
    report = check_quality(to_recording(twelve_leads(pots)))
    never = check_quality(to_recording(heart()))
    assert kinds(report) == ["saturation", "baseline-wander"]  # the half-cell offsets' 0.75 mV steps on aVL, aVF
    for name in ("III", "aVL", "aVF", "V1", "V2", "V5"):
        assert measures(report, name).muscle_uv == pytest.approx(measures(never, name).muscle_uv, abs=2.0), name


def test_an_electrode_pushed_further_every_0_6_s_is_bridged_from_the_baseline_right_beside_each_knock() -> None:
    """The right arm knocked every 0.6 s and coming back 1.5 mV further each time (a loose electrode
    pressed again and again): each bridge starts and ends at the baseline of the 0.3 s beside the
    knocked stretch, so the leads that see the steps through the central terminal show no tremor.
    Medians over 1.3 s would reach back two or three knocks, to an older level: every bridge would
    step at both ends and V1, V2 and V5 would read 73 µV of muscle noise (re-record)."""
    pots = electrodes()
    for start in range(100, 4950, 300):
        knock(pots, start, offset_uv=1500.0)
    report = check_quality(to_recording(twelve_leads(pots)))
    never = check_quality(to_recording(heart()))
    assert "muscle-noise" not in kinds(report)
    for name in ("III", "V1", "V2", "V5"):
        assert measures(report, name).muscle_uv == pytest.approx(measures(never, name).muscle_uv, abs=2.0), name
