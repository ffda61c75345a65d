"""Plausible ranges of vital-sign values: the one table, with units and sources (issue 10, item 5).

A value outside its range is not a measurement of a living patient but a damaged payload, a
misread flag (kPa read as mmHg), a sensor fault or a device bug: BLE payloads were seen to decode
to systolic 11,360,000 mmHg and 26,251 °C. Such a value is **kept and flagged**, not refused: the
reading keeps its device, time, time source and the number exactly as the device sent it
(`Quantity.sent_value`/`sent_unit`), so the doctor sees what the device said and can measure
again, but its `value` becomes "no value" (special "implausible") and the observation carries the
flag `implausible-<code>`. Nothing downstream can then pass it on as a normal value: the FHIR
builder sends a dataAbsentReason, the console shows the flag. Refusing the whole reading instead
would lose its sound companions (a BP panel whose pulse is fine) and hide the fault from the
doctor.

The ranges are wide on purpose: they hold every value a living patient (newborn to very obese,
hypothermic to hyperpyrexic) or a device in its normal working range can produce, and nothing
else. Clinical judgement (hypertension, fever) is not this table's job.

Keyed by (code, unit) with `unit` the normalised UCUM unit of `Quantity.value`; a code/unit pair
not in the table is not screened (its unit was not normalised to one we know).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

IMPLAUSIBLE = "implausible"  # Quantity.special of a value outside its plausible range
FLAG_PREFIX = "implausible-"  # Observation flag: "implausible-systolic", ...


@dataclass(frozen=True, slots=True)
class PlausibleRange:
    low: float
    high: float
    unit: str  # UCUM, as in Quantity.unit
    source: str  # why these bounds

    def contains(self, value: float) -> bool:
        return math.isfinite(value) and self.low <= value <= self.high


_NIBP = "IEC 80601-2-30 (automated NIBP) and ISO 81060-2; issue 10 names systolic 20-300 mmHg"
_PULSE = "ISO 80601-2-61 oximeter and NIBP pulse ranges (25-250 /min) widened; same bounds as devices/ecg/qrs.py"
_SPO2 = "a saturation is a fraction: 0-100 % (ISO 80601-2-61)"

_TABLE: tuple[tuple[str, float, float, str, str], ...] = (
    # code, low, high, unit, source
    ("systolic", 20, 300, "mm[Hg]", _NIBP),
    ("diastolic", 10, 250, "mm[Hg]", _NIBP),
    ("mean-arterial-pressure", 15, 280, "mm[Hg]", _NIBP),
    ("cuff-pressure", 0, 330, "mm[Hg]", "IEC 80601-2-30: cuff pressure is limited to 300 mmHg (+10 %) in adult mode"),
    ("pulse-rate", 20, 300, "/min", _PULSE),
    ("heart-rate", 20, 300, "/min", _PULSE),
    ("spo2", 0, 100, "%", _SPO2),
    ("pulse-amplitude-index", 0, 100, "%", "perfusion index is a percentage of the pulsatile signal (0.02-20 % seen)"),
    ("body-temperature", 25, 45, "Cel", "issue 10: 25-45 °C; survived hypothermia ~13.7 °C is not a clinic reading"),
    ("body-weight", 0.2, 650, "kg", "extremely preterm newborns ~0.25 kg to the heaviest recorded human (~635 kg)"),
    ("body-height", 0.2, 2.8, "m", "preterm newborn length to the tallest recorded human (2.72 m)"),
    ("body-mass-index", 5, 250, "kg/m2", "follows from the weight and height bounds for any real person"),
    ("glucose", 5, 2700, "mg/dL", "lowest survivable hypoglycaemia to the highest reported (2656 mg/dL)"),
    ("glucose", 0.3, 150, "mmol/L", "the mg/dL bounds in mmol/L (1 mmol/L = 18.016 mg/dL)"),
    ("hba1c", 2, 25, "%", "HbA1c assays report ~4-20 %; outside 2-25 % is not a haemoglobin fraction"),
    # not a vital sign but a device range: a rate no ECG format or cart uses means misread bytes
    # (an aECG increment of 1e-300 s read as 1e300 Hz)
    (
        "ecg-sampling-rate",
        25,
        32_000,
        "Hz",
        "DICOM ECG IODs 200-1000 Hz (12-lead; ambulatory lower), carts 100-1000 Hz; "
        "high-resolution capture a few kHz: bounds widened by an order of magnitude",
    ),
)

PLAUSIBLE_RANGES: dict[tuple[str, str], PlausibleRange] = {
    (code, unit): PlausibleRange(float(low), float(high), unit, source) for code, low, high, unit, source in _TABLE
}
_DERIVED_SUFFIXES = ("-fast", "-slow")  # PLX continuous: spo2-fast, pulse-rate-slow ... share the base range


def plausible_range(code: str, unit: str) -> PlausibleRange | None:
    """The range a `code` value in `unit` must lie in, or None when the table has none."""
    found = PLAUSIBLE_RANGES.get((code, unit))
    if found is None:
        for suffix in _DERIVED_SUFFIXES:
            if code.endswith(suffix):
                return PLAUSIBLE_RANGES.get((code.removesuffix(suffix), unit))
    return found


def implausibility(code: str, value: float, unit: str) -> str | None:
    """Why `value` is not a plausible `code` in `unit` (one line for the doctor), or None."""
    found = plausible_range(code, unit)
    if found is None or found.contains(value):
        return None
    return f"{code} {value:g} {unit} is outside the plausible {found.low:g}-{found.high:g} {unit}"
