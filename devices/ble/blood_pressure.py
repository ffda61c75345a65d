"""Blood Pressure Service: Blood Pressure Measurement (0x2A35), Intermediate Cuff Pressure
(0x2A36) and Blood Pressure Feature (0x2A49), per the Bluetooth SIG GATT Specification Supplement.

Layout (little endian): Flags u8; Systolic, Diastolic, Mean Arterial Pressure SFLOAT (mmHg or
kPa by flag bit 0); Time Stamp (Date Time, bit 1); Pulse Rate SFLOAT (bit 2); User ID u8 (bit 3);
Measurement Status u16 (bit 4). Flag bits 5-7 are reserved: a device setting them may be adding
fields we do not know, so we refuse rather than misread the rest.
"""

from __future__ import annotations

from devices.ble.measurement import UNKNOWN_USER, Measurement, bit_flags, quantity
from devices.ble.payload import PayloadReader
from devices.ble.uuids import BLOOD_PRESSURE_MEASUREMENT, INTERMEDIATE_CUFF_PRESSURE
from devices.errors import UnsupportedFeatureError

FLAG_UNITS_KPA = 0x01
FLAG_TIME_STAMP = 0x02
FLAG_PULSE_RATE = 0x04
FLAG_USER_ID = 0x08
FLAG_MEASUREMENT_STATUS = 0x10
FLAGS_RESERVED = 0xE0

MMHG_PER_KPA = 1000 / 133.322387415

STATUS_BITS: dict[int, str] = {
    0: "body-movement",
    1: "cuff-too-loose",
    2: "irregular-pulse",
    5: "improper-measurement-position",
}
PULSE_RATE_RANGE: dict[int, str | None] = {
    0: None,  # within range
    1: "pulse-rate-above-range",
    2: "pulse-rate-below-range",
    3: "pulse-rate-range-reserved",
}
FEATURE_BITS: dict[int, str] = {
    0: "body-movement-detection",
    1: "cuff-fit-detection",
    2: "irregular-pulse-detection",
    3: "pulse-rate-range-detection",
    4: "measurement-position-detection",
    5: "multiple-bond",
}


def _decode(data: bytes, characteristic: int, what: str) -> Measurement:
    r = PayloadReader(data, what)
    flags = r.u8("Flags")
    if flags & FLAGS_RESERVED:
        raise UnsupportedFeatureError(
            f"{what}: reserved flag bits {flags & FLAGS_RESERVED:#04x} set (a newer format we do not read)"
        )
    kpa = bool(flags & FLAG_UNITS_KPA)
    sent_unit = "kPa" if kpa else "mm[Hg]"
    factor, digits = (MMHG_PER_KPA, 1) if kpa else (1.0, 6)
    systolic = r.sfloat("Systolic")
    diastolic = r.sfloat("Diastolic")
    mean = r.sfloat("Mean Arterial Pressure")
    device_time = r.date_time("Time Stamp") if flags & FLAG_TIME_STAMP else None
    pulse = r.sfloat("Pulse Rate") if flags & FLAG_PULSE_RATE else None
    user = r.u8("User ID") if flags & FLAG_USER_ID else None
    status = r.u16("Measurement Status") if flags & FLAG_MEASUREMENT_STATUS else None
    r.end()

    status_flags: tuple[str, ...] = ()
    details: dict[str, object] = {"flags": flags, "units": sent_unit}
    if status is not None:
        status_flags = bit_flags(status, STATUS_BITS)
        range_flag = PULSE_RATE_RANGE[(status >> 3) & 0x3]
        if range_flag:
            status_flags += (range_flag,)
        details["measurement_status"] = status
    if user is not None:
        details["user_id"] = user
    if characteristic == BLOOD_PRESSURE_MEASUREMENT:
        quantities = [
            quantity("systolic", systolic, "mm[Hg]", sent_unit, factor, digits=digits),
            quantity("diastolic", diastolic, "mm[Hg]", sent_unit, factor, digits=digits),
            quantity("mean-arterial-pressure", mean, "mm[Hg]", sent_unit, factor, digits=digits),
        ]
        kind = "blood-pressure"
    else:
        # Diastolic and MAP are unused (NaN) in a cuff-pressure update.
        quantities = [quantity("cuff-pressure", systolic, "mm[Hg]", sent_unit, factor, digits=digits)]
        kind = "cuff-pressure"
    if pulse is not None:
        quantities.append(quantity("pulse-rate", pulse, "/min", "/min"))
    return Measurement(
        characteristic=characteristic,
        kind=kind,
        quantities=tuple(quantities),
        device_time=device_time,
        flags=status_flags,
        details=details,
        user_id=None if user in (None, UNKNOWN_USER) else user,
        live=characteristic == INTERMEDIATE_CUFF_PRESSURE,
    )


def decode_blood_pressure_measurement(data: bytes) -> Measurement:
    return _decode(data, BLOOD_PRESSURE_MEASUREMENT, "Blood Pressure Measurement (0x2A35)")


def decode_intermediate_cuff_pressure(data: bytes) -> Measurement:
    return _decode(data, INTERMEDIATE_CUFF_PRESSURE, "Intermediate Cuff Pressure (0x2A36)")


def decode_blood_pressure_feature(data: bytes) -> tuple[str, ...]:
    """Blood Pressure Feature (0x2A49): what the cuff can detect."""
    r = PayloadReader(data, "Blood Pressure Feature (0x2A49)")
    bits = r.u16("Feature")
    r.end()
    return bit_flags(bits, FEATURE_BITS)
