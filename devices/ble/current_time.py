"""Current Time Service: Current Time (0x2A2B), both directions.

Current Time is Exact Time 256 (Day Date Time = Date Time + Day of Week u8, then Fractions256
u8) followed by Adjust Reason u8 (bit 0 manual update, bit 1 external reference, bit 2 time
zone change, bit 3 DST change; 4-7 reserved). The time is the device's local wall clock.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from devices.ble.measurement import bit_flags
from devices.ble.payload import DATE_TIME_LENGTH, PayloadReader, decode_date_time, encode_date_time
from devices.errors import ProtocolError

CURRENT_TIME_LENGTH = 10
ADJUST_MANUAL = 0x01
ADJUST_EXTERNAL_REFERENCE = 0x02
ADJUST_TIME_ZONE = 0x04
ADJUST_DST = 0x08
ADJUST_RESERVED = 0xF0
ADJUST_REASONS = {0: "manual-time-update", 1: "external-reference-time-update", 2: "time-zone-change", 3: "dst-change"}
UNKNOWN_DAY_OF_WEEK = 0


@dataclass(frozen=True, slots=True)
class CurrentTime:
    local_time: dt.datetime | None  # naive device wall clock, microseconds from Fractions256
    day_of_week: int  # 1 Monday .. 7 Sunday; 0 unknown
    adjust_reasons: tuple[str, ...]


def decode_current_time(data: bytes) -> CurrentTime:
    what = "Current Time (0x2A2B)"
    r = PayloadReader(data, what)
    local = decode_date_time(r.take(DATE_TIME_LENGTH, "Date Time"), what)
    day_of_week = r.u8("Day of Week")
    fractions = r.u8("Fractions256")
    adjust = r.u8("Adjust Reason")
    r.end()
    if day_of_week > 7:
        raise ProtocolError(f"{what}: day of week {day_of_week} is reserved")
    if adjust & ADJUST_RESERVED:
        raise ProtocolError(f"{what}: reserved adjust-reason bits {adjust & ADJUST_RESERVED:#04x} set")
    if local is not None:
        if day_of_week and day_of_week != local.isoweekday():
            raise ProtocolError(f"{what}: {local.date()} is not day {day_of_week} of the week")
        local = local.replace(microsecond=fractions * 1_000_000 // 256)
    return CurrentTime(local, day_of_week, bit_flags(adjust, ADJUST_REASONS))


def encode_current_time(
    local_time: dt.datetime, adjust_reason: int = ADJUST_MANUAL | ADJUST_EXTERNAL_REFERENCE
) -> bytes:
    """Current Time value setting a device clock to `local_time` (naive wall clock)."""
    if local_time.tzinfo is not None:
        raise ValueError("a device clock keeps local wall-clock time: pass a naive datetime")
    if adjust_reason & ADJUST_RESERVED:
        raise ValueError(f"reserved adjust-reason bits {adjust_reason:#04x}")
    fractions = local_time.microsecond * 256 // 1_000_000
    return encode_date_time(local_time) + bytes((local_time.isoweekday(), fractions, adjust_reason))
