"""Weight Scale Service: Weight Measurement (0x2A9D).

Flags u8 (bit 0: imperial units, bit 1: Time Stamp, bit 2: User ID, bit 3: BMI and Height;
bits 4-7 reserved); Weight u16 (0.005 kg or 0.01 lb; 0xFFFF = measurement unsuccessful);
Time Stamp (Date Time); User ID u8; BMI u16 (0.1 kg/m2); Height u16 (0.001 m or 0.1 in).
"""

from __future__ import annotations

from devices.ble.measurement import UNKNOWN_USER, Measurement
from devices.ble.payload import PayloadReader
from devices.ble.sfloat import NAN
from devices.ble.uuids import WEIGHT_MEASUREMENT
from devices.errors import UnsupportedFeatureError
from devices.observation import Quantity

FLAG_IMPERIAL = 0x01
FLAG_TIME_STAMP = 0x02
FLAG_USER_ID = 0x04
FLAG_BMI_HEIGHT = 0x08
FLAGS_RESERVED = 0xF0

UNSUCCESSFUL = 0xFFFF
KG_PER_LB = 0.45359237
M_PER_IN = 0.0254


def _scaled(
    code: str,
    raw: int,
    resolution: float,
    sent_unit: str,
    unit: str,
    factor: float,
    digits: int,
    unsuccessful_marker: bool = False,
) -> Quantity:
    if unsuccessful_marker and raw == UNSUCCESSFUL:
        return Quantity(code, None, unit, None, sent_unit, NAN)
    sent = round(raw * resolution, digits)
    return Quantity(code, round(sent * factor, digits + 2), unit, sent, sent_unit)


def decode_weight_measurement(data: bytes) -> Measurement:
    what = "Weight Measurement (0x2A9D)"
    r = PayloadReader(data, what)
    flags = r.u8("Flags")
    if flags & FLAGS_RESERVED:
        raise UnsupportedFeatureError(f"{what}: reserved flag bits {flags & FLAGS_RESERVED:#04x} set")
    imperial = bool(flags & FLAG_IMPERIAL)
    raw_weight = r.u16("Weight")
    device_time = r.date_time("Time Stamp") if flags & FLAG_TIME_STAMP else None
    user = r.u8("User ID") if flags & FLAG_USER_ID else None
    bmi_height = (r.u16("BMI"), r.u16("Height")) if flags & FLAG_BMI_HEIGHT else None
    r.end()

    if imperial:
        quantities = [_scaled("body-weight", raw_weight, 0.01, "[lb_av]", "kg", KG_PER_LB, 2, True)]
    else:
        quantities = [_scaled("body-weight", raw_weight, 0.005, "kg", "kg", 1.0, 3, True)]
    if bmi_height is not None:
        bmi, height = bmi_height
        quantities.append(Quantity("body-mass-index", round(bmi * 0.1, 1), "kg/m2", round(bmi * 0.1, 1), "kg/m2"))
        if imperial:
            quantities.append(_scaled("body-height", height, 0.1, "[in_i]", "m", M_PER_IN, 1))
        else:
            quantities.append(_scaled("body-height", height, 0.001, "m", "m", 1.0, 3))
    details: dict[str, object] = {"flags": flags, "units": "imperial" if imperial else "SI"}
    if user is not None:
        details["user_id"] = user
    return Measurement(
        characteristic=WEIGHT_MEASUREMENT,
        kind="body-weight",
        quantities=tuple(quantities),
        device_time=device_time,
        flags=("measurement-unsuccessful",) if raw_weight == UNSUCCESSFUL else (),
        details=details,
        user_id=None if user in (None, UNKNOWN_USER) else user,
    )
