"""Lead names and derived limb leads (devices/ecg/leads.py), stated exactly.

A wrong entry in the lead table shows V2 under the label V1; a wrong derivation puts a
plausible-looking but false aVR in front of the cardiologist. The lead numbers are checked
against an independent copy of the standard: DICOM's CID 3001 (MDC "2:n") as pydicom ships it.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.sr._concepts_dict import concepts

from devices.ecg.leads import (
    SCP_LEAD_CODES,
    derive_limb_leads,
    lead_name_from_scp_code,
    normalise_lead_name,
    require_unique,
    standard_order,
)
from devices.ecg.recording import STANDARD_12_LEADS
from devices.errors import ProtocolError


def _dicom_lead_meanings() -> dict[int, str]:
    out = {}
    for codes in concepts["MDC"].values():
        for code, (meaning, cids) in codes.items():
            if code.startswith("2:") and 3001 in cids:
                out[int(code[2:])] = meaning
    return out


def _our_spelling(meaning: str) -> str:
    """DICOM's code meaning -> the short name the SCP-ECG table uses for the same lead."""
    special = {
        "Unspecified lead": "unspecified",
        "Left Arm Lead": "LA",
        "Right Arm Lead": "RA",
        "Left Leg Lead": "LL",
        "Chest lead per V5 and V5R placement": "CC5",
        "Chest-manubrium lead per V5 placement": "CM5",
        "−aVR": "-aVR",
        "Defibrillator lead: anterior-lateral": "Defib",
        "External pacing lead: anterior-posterior": "ExtPace",
    }
    if meaning in special:
        return special[meaning]
    if meaning.startswith("Frank Lead "):
        return "f" + meaning.removeprefix("Frank Lead ")
    if meaning.startswith("Auxiliary unipolar lead "):
        return "A" + meaning.removeprefix("Auxiliary unipolar lead ")
    if meaning.startswith("Lead "):
        return meaning.removeprefix("Lead ").split(" ")[0]
    return meaning.split(",")[0]  # "aVR, augmented voltage, right"


# Where SCP-ECG (EN 1064) and MDC agree on the numbers: 0..30 and 61..78. (31..38 are "derived"
# leads in MDC but calibration signals in SCP-ECG; see test_calibration_codes below.)
AGREED = [*range(31), *range(61, 79)]


@pytest.mark.parametrize("code", AGREED)
def test_every_lead_number_matches_dicom_cid_3001(code: int) -> None:
    assert lead_name_from_scp_code(code) == _our_spelling(_dicom_lead_meanings()[code])
    assert SCP_LEAD_CODES[lead_name_from_scp_code(code)] == code


@pytest.mark.parametrize(
    "code,name",
    [
        (30, "fH"),
        (31, "I-cal"),
        (32, "II-cal"),
        (60, "fH-cal"),
        (61, "III"),
        (78, "A4"),
        (79, "V8-cal"),
        (85, "J-cal"),
        (86, "lead-86"),
        (255, "lead-255"),
    ],
)
def test_calibration_codes_and_unknown_numbers(code: int, name: str) -> None:
    """SCP-ECG: 31..60 are the calibration signals of 1..30, 79..85 those of 66..72; an unknown
    number keeps its number rather than borrowing a lead's name."""
    assert lead_name_from_scp_code(code) == name


@pytest.mark.parametrize(
    "raw,name",
    [
        ("", ""),
        ("  ", ""),
        ("LEAD II", "II"),
        ("MDC_ECG_AVF", "aVF"),
        ("DIII", "III"),
        ("2", "II"),
        ("aVR,augmented", "aVR"),
        ("v_1", "V1"),
        ("V.2", "V2"),
        ("AVRNEG", "-aVR"),
        ("  V5  ", "V5"),
        ("Lead_x", "X"),
        ("cc5", "CC5"),
        ("MDC_ECG_LEAD_Pleth", "Pleth"),
    ],
)
def test_more_lead_spellings(raw: str, name: str) -> None:
    assert normalise_lead_name(raw) == name


def test_standard_order_puts_the_twelve_first() -> None:
    names = ["V6", "X", "aVF", "I", "V1", "III", "Y", "aVR", "II", "aVL", "V2", "V3", "V4", "V5"]
    assert [names[i] for i in standard_order(names)] == [*STANDARD_12_LEADS, "X", "Y"]  # its order: test_ecg_recording


def _derived(names: tuple[str, ...], rows: list[list[int]], dtype=np.int16, rounding: str = "toward-zero"):
    samples, out_names, derived = derive_limb_leads(np.array(rows, dtype=dtype), names, rounding=rounding)
    return dict(zip(out_names, samples.tolist())), out_names, derived, samples.dtype


def test_goldberger_and_einthoven_exactly_toward_zero() -> None:
    got, names, derived, _ = _derived(("I", "II"), [[3, -3, 0, 7], [4, -5, 1, 10]])
    assert names == ("I", "II", "III", "aVR", "aVL", "aVF")
    assert derived == frozenset({"III", "aVR", "aVL", "aVF"})
    assert got["III"] == [1, -2, 1, 3]  # II - I
    assert got["aVR"] == [-3, 4, 0, -8]  # -(I + II) / 2 toward zero: -3.5 -> -3, 4 -> 4, -0.5 -> 0, -8.5 -> -8
    assert got["aVL"] == [1, 0, 0, 2]  # (I - III) / 2: 1, -0.5 -> 0, -0.5 -> 0, 2
    assert got["aVF"] == [2, -3, 1, 6]  # (II + III) / 2: 2.5 -> 2, -3.5 -> -3, 1, 6.5 -> 6


def test_the_missing_one_of_three_is_derived() -> None:
    got, _, derived, _ = _derived(("I", "III"), [[5, -2], [2, 7]])
    assert got["II"] == [7, 5] and "II" in derived  # I + III
    got, _, derived, _ = _derived(("II", "III"), [[5, -2], [2, 7]])
    assert got["I"] == [3, -9] and "I" in derived  # II - III


def test_contec_rounding_halves_first() -> None:
    got, _, _, _ = _derived(("II", "III"), [[7, -7], [3, -3]], rounding="contec")
    assert got["aVR"] == [1 - 7, -1 + 7]  # trunc(III/2) - II
    assert got["aVL"] == [3 - 3, -3 + 3]  # trunc(II/2) - III
    assert got["aVF"] == [5, -5]  # trunc((II + III)/2)
    with pytest.raises(ValueError, match="unknown rounding"):
        _derived(("I", "II"), [[1], [1]], rounding="nearest")


def test_recorded_augmented_leads_are_kept_not_recomputed() -> None:
    got, names, derived, _ = _derived(("I", "II", "aVR"), [[2], [4], [-99]])
    assert got["aVR"] == [-99] and "aVR" not in derived and derived == frozenset({"III", "aVL", "aVF"})
    full = ("I", "II", "III", "aVR", "aVL", "aVF", "V1")
    got, names, derived, _ = _derived(full[::-1], [[i] for i in range(7)])
    assert names == full and derived == frozenset()  # all six present: only reordered


def test_one_limb_lead_derives_nothing() -> None:
    _, names, derived, _ = _derived(("V1", "I"), [[1], [2]])
    assert names == ("I", "V1") and derived == frozenset()


def test_derived_values_that_overflow_int16_widen_the_type() -> None:
    """II - I of two large int16 values does not fit int16: kept in int32, never wrapped."""
    got, _, _, dtype = _derived(("I", "II"), [[-30000], [30000]])
    assert dtype == np.int32 and got["III"] == [60000]
    got, _, _, dtype = _derived(("I", "II"), [[-32768], [0]])
    assert dtype == np.int32 and got["III"] == [32768] and got["aVR"] == [16384]  # one past int16
    got, _, _, dtype = _derived(("I", "II"), [[-32768], [-1]])
    assert dtype == np.int16 and got["III"] == [32767]  # int16's top itself still fits
    got, _, _, dtype = _derived(("I", "II"), [[0], [-32768]])
    assert dtype == np.int16 and got["III"] == [-32768] and got["aVF"] == [-32768]  # and its bottom
    _, _, _, dtype = _derived(("I", "II"), [[-16384], [16383]])
    assert dtype == np.int16  # 32767 and every augmented value fit: the narrow type stays
    _, _, _, dtype = _derived(("I", "II"), [[], []])
    assert dtype == np.int16


def test_a_lead_named_twice_is_refused() -> None:
    require_unique(["I", "II", "V1"], "test")
    with pytest.raises(ProtocolError, match="lead II appears twice"):
        require_unique(["I", "II", "V1", "II"], "test")
