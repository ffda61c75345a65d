"""What the quality gate says to the village doctor: one plain sentence per problem, in Chinese
and in English, naming the electrode to fix where the analysis can tell, and ending in what to
do. A "warn" problem says the ECG can go as it is; a "re-record" problem says to record again.

Electrodes are named by their letters on the clip (R, L, F, N: the IEC labels Chinese carts use;
colours differ between the IEC and AHA codes, letters do not) and chest electrodes by lead
(V1-V6, V3R, V7 ...).
"""

from __future__ import annotations

ELECTRODE_ZH = {"RA": "右臂（R）", "LA": "左臂（L）", "LL": "左腿（F）", "RL": "右腿（N）"}
ELECTRODE_EN = {"RA": "right-arm (R)", "LA": "left-arm (L)", "LL": "left-leg (F)", "RL": "right-leg (N)"}


def compact(leads: tuple[str, ...] | list[str]) -> list[str]:
    """Runs of three or more consecutive chest leads as one item: V1, V2, V3, V4 -> V1-V4."""
    out: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if len(run) >= 3:
            out.append(f"V{run[0]}-V{run[-1]}")
        else:
            out.extend(f"V{k}" for k in run)
        run.clear()

    for name in leads:
        number = int(name[1:]) if name[:1] == "V" and name[1:].isdigit() else None
        if number is not None and (not run or number == run[-1] + 1):
            run.append(number)
            continue
        flush()
        if number is not None:
            run.append(number)
        else:
            out.append(name)
    flush()
    return out


def leads_zh(leads: tuple[str, ...] | list[str], all_leads: tuple[str, ...]) -> str:
    if len(leads) == len(all_leads) and len(leads) > 1:
        return "所有导联"
    return "、".join(compact(leads)) + " 导联"


def leads_en(leads: tuple[str, ...] | list[str], all_leads: tuple[str, ...]) -> str:
    if len(leads) == len(all_leads) and len(leads) > 1:
        return "all leads"
    return ("leads " if len(leads) > 1 else "lead ") + ", ".join(compact(leads))


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _again(severity: str) -> tuple[str, str]:
    if severity == "re-record":
        return "然后重做心电图", "then record again"
    return (
        "本次可以发送；如患者还在，处理后重做更好",
        "this ECG can be sent, but if the patient is still here, record again",
    )


def lead_off(
    leads: tuple[str, ...],
    names: tuple[str, ...],
    limb_electrode: str | None,
    limb_leads: list[str],
    chest_electrodes: list[str],
    other_leads: list[str],
) -> tuple[str, str]:
    """`limb_leads`: limb (and chest leads lost through the central terminal) without signal;
    `limb_electrode`: the one limb electrode that explains them, if any; `chest_electrodes`:
    chest electrodes off on their own; `other_leads`: leads of no known electrode."""
    zh, en = [], []
    if limb_leads and limb_electrode:
        zh.append(f"{ELECTRODE_ZH[limb_electrode]}电极脱落")
        en.append(f"{ELECTRODE_EN[limb_electrode]} electrode off")
    elif limb_leads:
        zh.append(f"{leads_zh(limb_leads, names)}无信号（肢体电极脱落或导联线松动）")
        en.append(f"no signal in {leads_en(limb_leads, names)} (limb electrodes off or cable loose)")
    if chest_electrodes:
        zh.append("、".join(chest_electrodes) + " 电极脱落")
        en.append(", ".join(chest_electrodes) + (" electrodes off" if len(chest_electrodes) > 1 else " electrode off"))
    if other_leads:
        zh.append(f"{leads_zh(other_leads, names)}无信号")
        en.append(f"no signal in {leads_en(other_leads, names)}")
    return "，".join(zh) + "，请重新贴好后重做", _capital("; ".join(en)) + ": reattach and record again"


def saturation(leads: tuple[str, ...], names: tuple[str, ...], electrode: str | None, severity: str) -> tuple[str, str]:
    again_zh, again_en = _again(severity)
    if electrode:
        fix_zh = f"请清洁皮肤、把{ELECTRODE_ZH.get(electrode, electrode + ' ')}电极贴紧，让患者保持不动"
        fix_en = (
            f"clean the skin, press the {ELECTRODE_EN.get(electrode, electrode)} electrode on firmly "
            "and keep the patient still"
        )
    else:
        fix_zh = "请清洁皮肤、贴紧电极，让患者保持不动"
        fix_en = "clean the skin, press the electrodes on firmly and keep the patient still"
    return (
        f"{leads_zh(leads, names)}信号超出量程（削顶）：{fix_zh}，{again_zh}",
        f"Signal out of range (clipped) in {leads_en(leads, names)}: {fix_en}; {again_en}",
    )


def baseline_wander(
    leads: tuple[str, ...], names: tuple[str, ...], electrode: str | None, severity: str
) -> tuple[str, str]:
    again_zh, again_en = _again(severity)
    at_zh = f"，检查{ELECTRODE_ZH.get(electrode, electrode + ' ')}电极贴牢" if electrode else "，检查电极贴牢"
    at_en = (
        f", check the {ELECTRODE_EN.get(electrode, electrode)} electrode sticks"
        if electrode
        else ", check the electrodes stick"
    )
    return (
        f"{leads_zh(leads, names)}基线漂移：请让患者平静呼吸、不说话、不移动{at_zh}，{again_zh}",
        f"Baseline wander in {leads_en(leads, names)}: ask the patient to breathe quietly and keep "
        f"still{at_en}; {again_en}",
    )


def mains_noise(
    leads: tuple[str, ...], names: tuple[str, ...], electrode: str | None, hz: float, severity: str
) -> tuple[str, str]:
    again_zh, again_en = _again(severity)
    if electrode:
        fix_zh = (
            f"请擦净皮肤重贴{ELECTRODE_ZH.get(electrode, electrode + ' ')}电极，拔掉附近电器插头，"
            "让患者不接触金属床和墙"
        )
        fix_en = (
            f"clean the skin and reattach the {ELECTRODE_EN.get(electrode, electrode)} electrode, unplug "
            "nearby appliances, keep the patient off metal and walls"
        )
    else:
        fix_zh = "请检查右腿（N）电极贴好，拔掉附近电器插头，让患者不接触金属床和墙"
        fix_en = "check the right-leg (N) electrode, unplug nearby appliances, keep the patient off metal and walls"
    return (
        f"{leads_zh(leads, names)}有 {hz:g} Hz 交流电干扰：{fix_zh}，{again_zh}",
        f"{hz:g} Hz mains interference in {leads_en(leads, names)}: {fix_en}; {again_en}",
    )


def muscle_noise(leads: tuple[str, ...], names: tuple[str, ...], severity: str) -> tuple[str, str]:
    again_zh, again_en = _again(severity)
    return (
        f"{leads_zh(leads, names)}有肌电干扰：请让患者平躺放松、保暖、双臂放在身体两侧，{again_zh}",
        f"Muscle tremor noise in {leads_en(leads, names)}: let the patient lie relaxed and warm with "
        f"arms resting at the sides; {again_en}",
    )


def limb_lead_reversal(leads: tuple[str, ...], names: tuple[str, ...], swap: tuple[str, str]) -> tuple[str, str]:
    if swap == ("RA", "LA"):
        return (
            "左右手电极接反（I 导联倒置）：请对调右臂（R）和左臂（L）电极后重做",
            "Arm electrodes swapped (lead I upside down): swap the right-arm (R) and left-arm (L) "
            "electrodes and record again",
        )
    if swap == ("RA", "LL"):
        return (
            "右臂（R）和左腿（F）电极接反（II 导联倒置）：请对调后重做",
            "Right-arm (R) and left-leg (F) electrodes swapped (lead II upside down): swap them back and record again",
        )
    arm, leg = swap
    return (
        f"{leads_zh(leads, names)}几乎是一条直线：{ELECTRODE_ZH[arm]}电极可能夹在了右腿上"
        f"（与{ELECTRODE_ZH[leg]}接反），请按字母标记重新连接四肢电极后重做",
        f"{_capital(leads_en(leads, names))} nearly flat: the {ELECTRODE_EN[arm]} electrode is "
        f"probably on the right leg (swapped with the {ELECTRODE_EN[leg]} one): reconnect the limb "
        "electrodes by their letters and record again",
    )


def too_short(seconds: float, severity: str) -> tuple[str, str]:
    shown = f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2f}"
    if severity == "re-record":
        return (
            f"心电图只记录了 {shown} 秒，少于标准的 10 秒：请重新记录完整的 10 秒",
            f"Only {shown} s recorded, less than the standard 10 s: record a full 10 s again",
        )
    return (
        f"心电图只有 {shown} 秒，略短于标准的 10 秒：本次可以发送，下次请记录满 10 秒",
        f"Only {shown} s recorded, a little under the standard 10 s: this ECG can be sent; "
        "record the full 10 s next time",
    )
