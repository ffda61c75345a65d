"""Pulse Oximeter Service: PLX Spot-check Measurement (0x2A5E), PLX Continuous Measurement
(0x2A5F) and PLX Features (0x2A60).

Spot-check: Flags u8 (bit 0 Timestamp, bit 1 Measurement Status, bit 2 Device and Sensor
Status, bit 3 Pulse Amplitude Index, bit 4 Device Clock is Not Set; 5-7 reserved); SpO2 SFLOAT,
PR SFLOAT; Timestamp (Date Time); Measurement Status u16; Device and Sensor Status u24; PAI SFLOAT.

Continuous: Flags u8 (bit 0 SpO2PR-Fast, bit 1 SpO2PR-Slow, bit 2 Measurement Status, bit 3
Device and Sensor Status, bit 4 Pulse Amplitude Index; 5-7 reserved); SpO2PR-Normal (2 SFLOAT);
SpO2PR-Fast (2 SFLOAT); SpO2PR-Slow (2 SFLOAT); Measurement Status u16; Device and Sensor Status
u24; PAI SFLOAT.
"""

from __future__ import annotations

from devices.ble.measurement import Measurement, bit_flags, quantity
from devices.ble.payload import PayloadReader
from devices.ble.uuids import PLX_CONTINUOUS_MEASUREMENT, PLX_SPOT_CHECK_MEASUREMENT
from devices.errors import UnsupportedFeatureError
from devices.observation import Quantity

SPOT_TIMESTAMP = 0x01
SPOT_MEASUREMENT_STATUS = 0x02
SPOT_DEVICE_SENSOR_STATUS = 0x04
SPOT_PULSE_AMPLITUDE_INDEX = 0x08
SPOT_CLOCK_NOT_SET = 0x10
SPOT_RESERVED = 0xE0

CONT_FAST = 0x01
CONT_SLOW = 0x02
CONT_MEASUREMENT_STATUS = 0x04
CONT_DEVICE_SENSOR_STATUS = 0x08
CONT_PULSE_AMPLITUDE_INDEX = 0x10
CONT_RESERVED = 0xE0

MEASUREMENT_STATUS_BITS: dict[int, str] = {
    5: "measurement-ongoing",
    6: "early-estimated-data",
    7: "validated-data",
    8: "fully-qualified-data",
    9: "data-from-storage",
    10: "data-for-demonstration",
    11: "data-for-testing",
    12: "calibration-ongoing",
    13: "measurement-unavailable",
    14: "questionable-measurement",
    15: "invalid-measurement",
}
DEVICE_SENSOR_STATUS_BITS: dict[int, str] = {
    0: "extended-display-update-ongoing",
    1: "equipment-malfunction",
    2: "signal-processing-irregularity",
    3: "inadequate-signal",
    4: "poor-signal",
    5: "low-perfusion",
    6: "erratic-signal",
    7: "nonpulsatile-signal",
    8: "questionable-pulse",
    9: "signal-analysis-ongoing",
    10: "sensor-interference",
    11: "sensor-unconnected-to-user",
    12: "unknown-sensor-connected",
    13: "sensor-displaced",
    14: "sensor-malfunctioning",
    15: "sensor-disconnected",
}
FEATURE_BITS: dict[int, str] = {
    0: "measurement-status",
    1: "device-and-sensor-status",
    2: "spot-check-measurement-storage",
    3: "spot-check-timestamp",
    4: "spo2pr-fast",
    5: "spo2pr-slow",
    6: "pulse-amplitude-index",
    7: "multiple-bonds",
}
# Status bits that mean the numbers must not be taken as a result.
UNUSABLE = frozenset(
    {
        "measurement-unavailable",
        "invalid-measurement",
        "data-for-demonstration",
        "data-for-testing",
        "calibration-ongoing",
        "measurement-ongoing",
    }
)


def _statuses(r: PayloadReader, has_measurement: bool, has_sensor: bool, details: dict[str, object]) -> tuple[str, ...]:
    flags: tuple[str, ...] = ()
    if has_measurement:
        status = r.u16("Measurement Status")
        details["measurement_status"] = status
        flags += bit_flags(status, MEASUREMENT_STATUS_BITS)
    if has_sensor:
        sensor = r.u24("Device and Sensor Status")
        details["device_and_sensor_status"] = sensor
        flags += bit_flags(sensor, DEVICE_SENSOR_STATUS_BITS)
    return flags


def _pair(r: PayloadReader, suffix: str, field: str) -> list[Quantity]:
    spo2 = r.sfloat(f"SpO2 ({field})")
    pulse = r.sfloat(f"PR ({field})")
    return [quantity("spo2" + suffix, spo2, "%", "%"), quantity("pulse-rate" + suffix, pulse, "/min", "/min")]


def decode_plx_spot_check(data: bytes) -> Measurement:
    what = "PLX Spot-check Measurement (0x2A5E)"
    r = PayloadReader(data, what)
    flags = r.u8("Flags")
    if flags & SPOT_RESERVED:
        raise UnsupportedFeatureError(f"{what}: reserved flag bits {flags & SPOT_RESERVED:#04x} set")
    quantities = _pair(r, "", "spot-check")
    device_time = r.date_time("Timestamp") if flags & SPOT_TIMESTAMP else None
    details: dict[str, object] = {"flags": flags}
    status_flags = _statuses(r, bool(flags & SPOT_MEASUREMENT_STATUS), bool(flags & SPOT_DEVICE_SENSOR_STATUS), details)
    if flags & SPOT_PULSE_AMPLITUDE_INDEX:
        quantities.append(quantity("pulse-amplitude-index", r.sfloat("Pulse Amplitude Index"), "%", "%"))
    r.end()
    clock_not_set = bool(flags & SPOT_CLOCK_NOT_SET)
    if clock_not_set:
        status_flags += ("device-clock-not-set",)
    return Measurement(
        characteristic=PLX_SPOT_CHECK_MEASUREMENT,
        kind="spo2",
        quantities=tuple(quantities),
        device_time=device_time,
        flags=status_flags,
        details=details,
        clock_untrusted=clock_not_set,
        stored="data-from-storage" in status_flags,
    )


def decode_plx_continuous(data: bytes) -> Measurement:
    what = "PLX Continuous Measurement (0x2A5F)"
    r = PayloadReader(data, what)
    flags = r.u8("Flags")
    if flags & CONT_RESERVED:
        raise UnsupportedFeatureError(f"{what}: reserved flag bits {flags & CONT_RESERVED:#04x} set")
    quantities = _pair(r, "", "normal")
    if flags & CONT_FAST:
        quantities += _pair(r, "-fast", "fast")
    if flags & CONT_SLOW:
        quantities += _pair(r, "-slow", "slow")
    details: dict[str, object] = {"flags": flags}
    status_flags = _statuses(r, bool(flags & CONT_MEASUREMENT_STATUS), bool(flags & CONT_DEVICE_SENSOR_STATUS), details)
    if flags & CONT_PULSE_AMPLITUDE_INDEX:
        quantities.append(quantity("pulse-amplitude-index", r.sfloat("Pulse Amplitude Index"), "%", "%"))
    r.end()
    return Measurement(
        characteristic=PLX_CONTINUOUS_MEASUREMENT,
        kind="spo2",
        quantities=tuple(quantities),
        flags=status_flags,
        details=details,
        live=True,
        stored="data-from-storage" in status_flags,
    )


def decode_plx_features(data: bytes) -> tuple[str, ...]:
    """PLX Features (0x2A60): Supported Features u16, then the supported status masks if flagged."""
    what = "PLX Features (0x2A60)"
    r = PayloadReader(data, what)
    bits = r.u16("Supported Features")
    if bits & 0x01:
        r.u16("Measurement Status Support")
    if bits & 0x02:
        r.u24("Device and Sensor Status Support")
    r.end()
    return bit_flags(bits, FEATURE_BITS)
