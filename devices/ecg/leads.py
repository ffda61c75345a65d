"""Lead names and the limb leads a cart does not record but a reader expects.

Carts record two limb leads (I and II, or II and III) plus the chest leads; the other four
limb leads follow from Einthoven (I + III = II) and Goldberger (aVR = -(I + II)/2, ...).
Derived leads are computed in integer sample units and marked derived on the recording.

Rounding: the augmented leads are half-sums, so an odd sum falls between two sample values.
We round the way the producer's own software does, so that our samples equal the reference
exports exactly (the difference between conventions is at most half a sample unit):

- "toward-zero" (default; ECGToolkit's SCP/aECG/DICOM writers): each augmented lead is the
  exact Goldberger value truncated toward zero.
- "contec" (the ECG90A's PC export, which starts from II and III): the half term is
  truncated toward zero before it is combined (aVR = trunc(III/2) - II, aVL = trunc(II/2) - III).
"""

from __future__ import annotations

import re

import numpy as np

from devices.ecg.recording import STANDARD_12_LEADS
from devices.errors import ProtocolError

LIMB_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF")
DERIVATION_ROUNDING: tuple[str, ...] = ("toward-zero", "contec")

# SCP-ECG lead identification (EN 1064 section 3 / ISO 11073-91064 table); the MDC codes of
# ECG leads (MDC_ECG_LEAD_*, DICOM "2:n") use the same numbers.
SCP_LEAD_NAMES: dict[int, str] = {
    0: "unspecified",
    1: "I",
    2: "II",
    3: "V1",
    4: "V2",
    5: "V3",
    6: "V4",
    7: "V5",
    8: "V6",
    9: "V7",
    10: "V2R",
    11: "V3R",
    12: "V4R",
    13: "V5R",
    14: "V6R",
    15: "V7R",
    16: "X",
    17: "Y",
    18: "Z",
    19: "CC5",
    20: "CM5",
    21: "LA",
    22: "RA",
    23: "LL",
    24: "fI",
    25: "fE",
    26: "fC",
    27: "fA",
    28: "fM",
    29: "fF",
    30: "fH",
    61: "III",
    62: "aVR",
    63: "aVL",
    64: "aVF",
    65: "-aVR",
    66: "V8",
    67: "V9",
    68: "V8R",
    69: "V9R",
    70: "D",
    71: "A",
    72: "J",
    73: "Defib",
    74: "ExtPace",
    75: "A1",
    76: "A2",
    77: "A3",
    78: "A4",
}
# 31..60 are the calibration signals of 1..30, 79..85 those of 66..72.
SCP_LEAD_NAMES.update({31 + i: f"{SCP_LEAD_NAMES[1 + i]}-cal" for i in range(30)})
SCP_LEAD_NAMES.update({79 + i: f"{SCP_LEAD_NAMES[66 + i]}-cal" for i in range(7)})
SCP_LEAD_CODES: dict[str, int] = {name: code for code, name in SCP_LEAD_NAMES.items()}

# DICOM CID 3001 "ECG Leads" in MDC form ("2:n"): the recorded leads above keep their numbers,
# but 31-38 and 111-114 are the *derived* leads there (not SCP's calibration signals).
MDC_LEADS: dict[int, str] = {n: name for n, name in SCP_LEAD_NAMES.items() if n and not name.endswith("-cal")}
MDC_DERIVED_LEADS: dict[int, str] = {
    31: "I",
    32: "II",
    **{33 + i: f"V{i + 1}" for i in range(6)},
    111: "III",
    112: "aVR",
    113: "aVL",
    114: "aVF",
}

# Spellings seen in files (upper-cased, separators removed) -> our lead name.
_ALIASES: dict[str, str] = {
    "AVR": "aVR",
    "AVL": "aVL",
    "AVF": "aVF",
    "-AVR": "-aVR",
    "AVRNEG": "-aVR",
    "NEGAVR": "-aVR",
    "LEADI": "I",
    "LEADII": "II",
    "LEADIII": "III",
    "DI": "I",
    "DII": "II",
    "DIII": "III",
    "1": "I",
    "2": "II",
    "3": "III",
}
_CANONICAL_UPPER: dict[str, str] = {name.upper(): name for name in SCP_LEAD_NAMES.values()}
_PREFIXES = ("MDC_ECG_LEAD_", "MDC_ECG_", "LEAD_", "LEAD ")


def lead_name_from_scp_code(code: int) -> str:
    """The lead name of an SCP-ECG / MDC lead number; unknown numbers keep their number."""
    return SCP_LEAD_NAMES.get(code, f"lead-{code}")


def normalise_lead_name(raw: str) -> str:
    """Map a label from a file ("MDC_ECG_LEAD_AVR", "Lead I (Einthoven)", "v3r") to our name.

    Unusual leads keep their true label (V3R stays V3R); an unknown label is kept as written
    (stripped), never forced onto a standard lead.
    """
    text = raw.strip()
    if not text:
        return text
    upper = text.upper()
    for prefix in _PREFIXES:
        if upper.startswith(prefix):
            text, upper = text[len(prefix) :], upper[len(prefix) :]
            break
    # "Lead I (Einthoven)", "Lead aVR, augmented voltage, right": keep the first word.
    word = re.split(r"[\s,(]", text.strip(), maxsplit=1)[0]
    key = word.upper().replace("_", "").replace(".", "")
    if key in _ALIASES:
        return _ALIASES[key]
    if key in _CANONICAL_UPPER:
        return _CANONICAL_UPPER[key]
    return text.strip()


def standard_order(names: tuple[str, ...] | list[str]) -> list[int]:
    """Indices that put the standard 12 leads first (I, II, III, aVR ... V6), others after in
    their original order: every decoder returns leads in this order, so one ECG stored in
    different formats gives the same array."""
    rank = {name: i for i, name in enumerate(STANDARD_12_LEADS)}
    return sorted(range(len(names)), key=lambda i: (rank.get(names[i], len(rank)), i))


def _trunc_half(x: np.ndarray) -> np.ndarray:
    """x / 2 truncated toward zero, in integers."""
    return np.where(x < 0, -((-x) // 2), x // 2)


def derive_limb_leads(
    samples: np.ndarray, names: tuple[str, ...], *, rounding: str = "toward-zero"
) -> tuple[np.ndarray, tuple[str, ...], frozenset[str]]:
    """Add the missing limb leads when two of I, II, III are recorded.

    Returns (samples, names, derived) with the leads in standard order; nothing is added when
    fewer than two of I/II/III are present or all six limb leads are already there. Samples
    are integers in the recording's unit; derived values are computed in int32 and then kept
    in the narrowest integer type of the input that holds them.
    """
    if rounding not in DERIVATION_ROUNDING:
        raise ValueError(f"unknown rounding {rounding!r}")
    present = {name: i for i, name in enumerate(names)}
    if all(name in present for name in LIMB_LEADS):
        order = standard_order(names)
        return samples[order], tuple(names[i] for i in order), frozenset()
    have = [n for n in ("I", "II", "III") if n in present]
    if len(have) < 2:
        order = standard_order(names)
        return samples[order], tuple(names[i] for i in order), frozenset()
    s = samples.astype(np.int32)
    lead: dict[str, np.ndarray] = {n: s[present[n]] for n in have}
    derived: dict[str, np.ndarray] = {}
    if "III" not in lead:
        derived["III"] = lead["II"] - lead["I"]
    elif "I" not in lead:
        derived["I"] = lead["II"] - lead["III"]
    elif "II" not in lead:
        derived["II"] = lead["I"] + lead["III"]
    full: dict[str, np.ndarray] = {**lead, **derived}
    i_, ii, iii = full["I"], full["II"], full["III"]
    if rounding == "contec":
        augmented = {"aVR": _trunc_half(iii) - ii, "aVL": _trunc_half(ii) - iii, "aVF": _trunc_half(ii + iii)}
    else:
        augmented = {"aVR": -_trunc_half(i_ + ii), "aVL": _trunc_half(i_ - iii), "aVF": _trunc_half(ii + iii)}
    for name, values in augmented.items():
        if name not in present:
            derived[name] = values
    out_names = list(names) + list(derived)
    stacked = np.concatenate([s, np.stack(list(derived.values()))]) if derived else s
    dtype = samples.dtype
    info = np.iinfo(dtype)
    if stacked.size and (stacked.min() < info.min or stacked.max() > info.max):
        dtype = np.dtype(np.int32)
    order = standard_order(out_names)
    return (stacked[order].astype(dtype, copy=False), tuple(out_names[i] for i in order), frozenset(derived))


def require_unique(names: list[str], what: str) -> None:
    """Refuse a file that names one lead twice: we cannot tell which is which."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ProtocolError(f"{what}: lead {name} appears twice; cannot tell which recording is which")
        seen.add(name)
