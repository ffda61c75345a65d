"""Bluetooth SIG 16-bit UUIDs of the health services and characteristics we speak."""

from __future__ import annotations

import re

from devices.errors import ProtocolError

BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"

# Services
GENERIC_ACCESS = 0x1800
BATTERY_SERVICE = 0x180F
DEVICE_INFORMATION = 0x180A
CURRENT_TIME_SERVICE = 0x1805
HEALTH_THERMOMETER = 0x1809
BLOOD_PRESSURE = 0x1810
GLUCOSE = 0x1808
USER_DATA = 0x181C  # a multi-user device's users (User Control Point, User Index)
WEIGHT_SCALE = 0x181D
PULSE_OXIMETER = 0x1822

HEALTH_SERVICES: dict[int, str] = {
    BLOOD_PRESSURE: "Blood Pressure",
    HEALTH_THERMOMETER: "Health Thermometer",
    PULSE_OXIMETER: "Pulse Oximeter",
    WEIGHT_SCALE: "Weight Scale",
    GLUCOSE: "Glucose",
}

# Characteristics
DATE_TIME = 0x2A08
CURRENT_TIME = 0x2A2B
LOCAL_TIME_INFORMATION = 0x2A0F
TEMPERATURE_MEASUREMENT = 0x2A1C
TEMPERATURE_TYPE = 0x2A1D
INTERMEDIATE_TEMPERATURE = 0x2A1E
GLUCOSE_MEASUREMENT = 0x2A18
GLUCOSE_MEASUREMENT_CONTEXT = 0x2A34
GLUCOSE_FEATURE = 0x2A51
BLOOD_PRESSURE_MEASUREMENT = 0x2A35
INTERMEDIATE_CUFF_PRESSURE = 0x2A36
BLOOD_PRESSURE_FEATURE = 0x2A49
RECORD_ACCESS_CONTROL_POINT = 0x2A52
PLX_SPOT_CHECK_MEASUREMENT = 0x2A5E
PLX_CONTINUOUS_MEASUREMENT = 0x2A5F
PLX_FEATURES = 0x2A60
WEIGHT_MEASUREMENT = 0x2A9D
WEIGHT_SCALE_FEATURE = 0x2A9E
SYSTEM_ID = 0x2A23
MODEL_NUMBER = 0x2A24
SERIAL_NUMBER = 0x2A25
FIRMWARE_REVISION = 0x2A26
HARDWARE_REVISION = 0x2A27
SOFTWARE_REVISION = 0x2A28
MANUFACTURER_NAME = 0x2A29
REGULATORY_CERTIFICATION = 0x2A2A
PNP_ID = 0x2A50
BATTERY_LEVEL = 0x2A19

_UUID_TEXT = re.compile(r"^(?:0x)?([0-9a-f]{4})$|^0000([0-9a-f]{4})" + re.escape(BASE_UUID_SUFFIX) + "$")


def full_uuid(uuid16: int) -> str:
    """The 128-bit form bleak uses, e.g. 0x2A35 -> '00002a35-0000-1000-8000-00805f9b34fb'."""
    if not 0 <= uuid16 <= 0xFFFF:
        raise ValueError(f"not a 16-bit UUID: {uuid16:#x}")
    return f"0000{uuid16:04x}{BASE_UUID_SUFFIX}"


def parse_uuid16(text: str) -> int:
    """'2a35', '0x2A35' or the full SIG-base 128-bit form -> 0x2A35; anything else: ProtocolError."""
    m = _UUID_TEXT.match(text.strip().lower())
    if not m:
        raise ProtocolError(f"{text!r} is not a 16-bit Bluetooth SIG UUID (expected e.g. 2a35 or 0x2A35)")
    return int(m.group(1) or m.group(2), 16)


def short_uuid(uuid: str) -> int | None:
    """The 16-bit number of a SIG-base UUID string, or None for a vendor UUID."""
    try:
        return parse_uuid16(uuid)
    except ProtocolError:
        return None
