"""Battery Service (0x180F): Battery Level (0x2A19) is one byte, the charge left in percent (0-100;
101-255 are reserved)."""

from __future__ import annotations

from devices.ble.payload import PayloadReader
from devices.errors import ProtocolError

WHAT = "Battery Level (0x2A19)"
# A device at or below this charge is running low: a level reaching it is worth saying at once.
LOW_BATTERY_PERCENT = 20


def decode_battery_level(data: bytes) -> int:
    """The percentage; ProtocolError for a value the specification reserves or a wrong length."""
    r = PayloadReader(data, WHAT)
    level = r.u8("Battery Level")
    r.end()
    if level > 100:
        raise ProtocolError(f"{WHAT}: {level} is not a percentage (101-255 are reserved)")
    return level


def encode_battery_level(level: int) -> bytes:
    """What a device sends (the emulated peripherals serve it)."""
    if not 0 <= level <= 100:
        raise ValueError(f"battery level {level} is not a percentage")
    return bytes((level,))
