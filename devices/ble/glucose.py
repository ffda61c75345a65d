"""Glucose Service: Glucose Measurement (0x2A18), Glucose Measurement Context (0x2A34) and
Glucose Feature (0x2A51). Stored records are fetched with the RACP (see `devices.ble.racp`).

Measurement: Flags u8 (bit 0 Time Offset, bit 1 Concentration + Type-Sample Location, bit 2
units mol/L (else kg/L), bit 3 Sensor Status Annunciation, bit 4 Context Information Follows;
5-7 reserved); Sequence Number u16; Base Time (Date Time); Time Offset s16 (minutes);
Glucose Concentration SFLOAT; Type (low nibble) and Sample Location (high nibble) u8;
Sensor Status Annunciation u16.

Context: Flags u8 (bit 0 Carbohydrate, bit 1 Meal, bit 2 Tester-Health, bit 3 Exercise,
bit 4 Medication, bit 5 medication in litres (else kilograms), bit 6 HbA1c, bit 7 Extended
Flags); Sequence Number u16; Extended Flags u8; Carbohydrate ID u8 + Carbohydrate SFLOAT (kg);
Meal u8; Tester (low nibble) / Health (high nibble) u8; Exercise Duration u16 (s) + Intensity u8
(%); Medication ID u8 + Medication SFLOAT (kg or L); HbA1c SFLOAT (%).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

from devices.ble.measurement import Measurement, bit_flags, quantity
from devices.ble.payload import PayloadReader
from devices.ble.uuids import GLUCOSE_MEASUREMENT
from devices.errors import ProtocolError, UnsupportedFeatureError
from devices.observation import Quantity

FLAG_TIME_OFFSET = 0x01
FLAG_CONCENTRATION = 0x02
FLAG_MOL_PER_L = 0x04
FLAG_SENSOR_STATUS = 0x08
FLAG_CONTEXT_FOLLOWS = 0x10
FLAGS_RESERVED = 0xE0

CTX_CARBOHYDRATE = 0x01
CTX_MEAL = 0x02
CTX_TESTER_HEALTH = 0x04
CTX_EXERCISE = 0x08
CTX_MEDICATION = 0x10
CTX_MEDICATION_LITRES = 0x20
CTX_HBA1C = 0x40
CTX_EXTENDED_FLAGS = 0x80

# kg/L -> mg/dL; mol/L -> mg/dL with the molar mass of glucose (180.156 g/mol).
MG_DL_PER_KG_L = 100_000.0
MG_DL_PER_MOL_L = 18_015.6

SAMPLE_TYPES: dict[int, str] = {
    1: "capillary-whole-blood",
    2: "capillary-plasma",
    3: "venous-whole-blood",
    4: "venous-plasma",
    5: "arterial-whole-blood",
    6: "arterial-plasma",
    7: "undetermined-whole-blood",
    8: "undetermined-plasma",
    9: "interstitial-fluid",
    10: "control-solution",
}
SAMPLE_LOCATIONS: dict[int, str] = {
    1: "finger",
    2: "alternate-site-test",
    3: "earlobe",
    4: "control-solution",
    15: "not-available",
}
SENSOR_STATUS_BITS: dict[int, str] = {
    0: "battery-low",
    1: "sensor-malfunction",
    2: "sample-size-insufficient",
    3: "strip-insertion-error",
    4: "strip-type-incorrect",
    5: "result-above-device-range",
    6: "result-below-device-range",
    7: "sensor-temperature-too-high",
    8: "sensor-temperature-too-low",
    9: "strip-pulled-too-soon",
    10: "general-device-fault",
    11: "time-fault",
}
CARBOHYDRATE_IDS: dict[int, str] = {
    1: "breakfast",
    2: "lunch",
    3: "dinner",
    4: "snack",
    5: "drink",
    6: "supper",
    7: "brunch",
}
MEALS: dict[int, str] = {1: "preprandial", 2: "postprandial", 3: "fasting", 4: "casual", 5: "bedtime"}
TESTERS: dict[int, str] = {1: "self", 2: "health-care-professional", 3: "lab-test", 15: "not-available"}
HEALTH: dict[int, str] = {
    1: "minor-health-issues",
    2: "major-health-issues",
    3: "during-menses",
    4: "under-stress",
    5: "no-health-issues",
    15: "not-available",
}
MEDICATION_IDS: dict[int, str] = {
    1: "rapid-acting-insulin",
    2: "short-acting-insulin",
    3: "intermediate-acting-insulin",
    4: "long-acting-insulin",
    5: "pre-mixed-insulin",
}
EXERCISE_DURATION_OVERRUN = 0xFFFF
FEATURE_BITS: dict[int, str] = {
    0: "low-battery-detection",
    1: "sensor-malfunction-detection",
    2: "sensor-sample-size",
    3: "sensor-strip-insertion-error-detection",
    4: "sensor-strip-type-error-detection",
    5: "sensor-result-high-low-detection",
    6: "sensor-temperature-high-low-detection",
    7: "sensor-read-interrupt-detection",
    8: "general-device-fault",
    9: "time-fault",
    10: "multiple-bond",
}


def _enum(table: dict[int, str], code: int, what: str, field: str) -> str:
    try:
        return table[code]
    except KeyError:
        raise ProtocolError(f"{what}: {field} value {code} is reserved") from None


def decode_glucose_measurement(data: bytes) -> Measurement:
    what = "Glucose Measurement (0x2A18)"
    r = PayloadReader(data, what)
    flags = r.u8("Flags")
    if flags & FLAGS_RESERVED:
        raise UnsupportedFeatureError(f"{what}: reserved flag bits {flags & FLAGS_RESERVED:#04x} set")
    sequence = r.u16("Sequence Number")
    base_time = r.date_time("Base Time")
    offset_min = r.s16("Time Offset") if flags & FLAG_TIME_OFFSET else 0
    details: dict[str, object] = {"flags": flags, "sequence": sequence}
    quantities: tuple[Quantity, ...] = ()
    status_flags: tuple[str, ...] = ()
    if flags & FLAG_CONCENTRATION:
        concentration = r.sfloat("Glucose Concentration")
        type_location = r.u8("Type-Sample Location")
        if flags & FLAG_MOL_PER_L:
            quantities = (quantity("glucose", concentration, "mg/dL", "mol/L", MG_DL_PER_MOL_L, digits=1),)
        else:
            quantities = (quantity("glucose", concentration, "mg/dL", "kg/L", MG_DL_PER_KG_L, digits=1),)
        sample_type = _enum(SAMPLE_TYPES, type_location & 0x0F, what, "Type")
        location = _enum(SAMPLE_LOCATIONS, type_location >> 4, what, "Sample Location")
        details.update(sample_type=sample_type, sample_location=location)
        status_flags += (f"sample-{sample_type}",)
        if location != "not-available":
            status_flags += (f"site-{location}",)
        if sample_type == "control-solution" or location == "control-solution":
            status_flags += ("control-solution",)
    if flags & FLAG_SENSOR_STATUS:
        annunciation = r.u16("Sensor Status Annunciation")
        details["sensor_status"] = annunciation
        status_flags += bit_flags(annunciation, SENSOR_STATUS_BITS)
    r.end()
    device_time = None
    if base_time is not None:
        details["time_offset_min"] = offset_min
        try:
            device_time = base_time + dt.timedelta(minutes=offset_min)
        except OverflowError:
            raise ProtocolError(f"{what}: base time plus offset leaves the calendar") from None
    return Measurement(
        characteristic=GLUCOSE_MEASUREMENT,
        kind="glucose",
        quantities=quantities,
        device_time=device_time,
        flags=status_flags,
        details=details,
        sequence=sequence,
        stored=True,  # a meter sends its records only when asked over the RACP: all are memory
        clock_untrusted="time-fault" in status_flags,
        context_follows=bool(flags & FLAG_CONTEXT_FOLLOWS),
    )


@dataclass(frozen=True, slots=True)
class GlucoseContext:
    """Glucose Measurement Context (0x2A34): what surrounded the measurement `sequence`."""

    sequence: int
    quantities: tuple[Quantity, ...]  # carbohydrate, medication, HbA1c, exercise
    flags: tuple[str, ...]  # "meal-preprandial", "tester-self", "carbohydrate-breakfast" ...
    details: dict[str, object]


def decode_glucose_context(data: bytes) -> GlucoseContext:
    what = "Glucose Measurement Context (0x2A34)"
    r = PayloadReader(data, what)
    flags = r.u8("Flags")
    sequence = r.u16("Sequence Number")
    details: dict[str, object] = {"flags": flags, "sequence": sequence}
    if flags & CTX_EXTENDED_FLAGS:
        extended = r.u8("Extended Flags")
        if extended:
            raise UnsupportedFeatureError(f"{what}: reserved extended flags {extended:#04x} set")
    quantities: list[Quantity] = []
    labels: list[str] = []
    if flags & CTX_CARBOHYDRATE:
        carb_id = _enum(CARBOHYDRATE_IDS, r.u8("Carbohydrate ID"), what, "Carbohydrate ID")
        labels.append(f"carbohydrate-{carb_id}")
        quantities.append(quantity("carbohydrate-intake", r.sfloat("Carbohydrate"), "g", "kg", 1000.0, digits=3))
    if flags & CTX_MEAL:
        labels.append("meal-" + _enum(MEALS, r.u8("Meal"), what, "Meal"))
    if flags & CTX_TESTER_HEALTH:
        tester_health = r.u8("Tester-Health")
        labels.append("tester-" + _enum(TESTERS, tester_health & 0x0F, what, "Tester"))
        labels.append("health-" + _enum(HEALTH, tester_health >> 4, what, "Health"))
    if flags & CTX_EXERCISE:
        duration = r.u16("Exercise Duration")
        intensity = r.u8("Exercise Intensity")
        if intensity > 100:
            raise ProtocolError(f"{what}: exercise intensity {intensity} % is over 100")
        if duration == EXERCISE_DURATION_OVERRUN:
            labels.append("exercise-duration-overrun")
        else:
            quantities.append(Quantity("exercise-duration", float(duration), "s", float(duration), "s"))
        quantities.append(Quantity("exercise-intensity", float(intensity), "%", float(intensity), "%"))
    if flags & CTX_MEDICATION:
        med_id = _enum(MEDICATION_IDS, r.u8("Medication ID"), what, "Medication ID")
        labels.append(f"medication-{med_id}")
        medication = r.sfloat("Medication")
        if flags & CTX_MEDICATION_LITRES:
            quantities.append(quantity("medication", medication, "mL", "L", 1000.0, digits=3))
        else:
            quantities.append(quantity("medication", medication, "mg", "kg", 1_000_000.0, digits=3))
    elif flags & CTX_MEDICATION_LITRES:
        details["medication_units_without_medication"] = True
    if flags & CTX_HBA1C:
        quantities.append(quantity("hba1c", r.sfloat("HbA1c"), "%", "%"))
    r.end()
    return GlucoseContext(sequence=sequence, quantities=tuple(quantities), flags=tuple(labels), details=details)


def with_context(m: Measurement, context: GlucoseContext) -> Measurement:
    """The measurement with its context's quantities and labels added (same sequence only)."""
    if m.sequence != context.sequence:
        raise ProtocolError(f"context for record {context.sequence} does not belong to record {m.sequence}")
    return dataclasses.replace(
        m,
        quantities=m.quantities + context.quantities,
        flags=m.flags + context.flags,
        details={**m.details, "context": context.details},
        context_follows=False,
    )


def decode_glucose_feature(data: bytes) -> tuple[str, ...]:
    r = PayloadReader(data, "Glucose Feature (0x2A51)")
    bits = r.u16("Glucose Feature")
    r.end()
    return bit_flags(bits, FEATURE_BITS)
