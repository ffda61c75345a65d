"""A bounds-checked little-endian reader for GATT characteristic values.

Every read checks the bytes are there; running short, or leaving bytes unread where the
format says the value ends, raises ProtocolError naming the characteristic and the field.
"""

from __future__ import annotations

import datetime as dt

from devices.ble.sfloat import MedFloat, decode_float, decode_sfloat
from devices.errors import ProtocolError

DATE_TIME_LENGTH = 7
MAX_ATTRIBUTE_LENGTH = 512  # GATT: no attribute value is longer


class PayloadReader:
    def __init__(self, data: bytes | bytearray | memoryview, what: str) -> None:
        self._data = bytes(data)
        self._pos = 0
        self.what = what
        if len(self._data) > MAX_ATTRIBUTE_LENGTH:
            raise ProtocolError(f"{what}: {len(self._data)} bytes, longer than any GATT value")

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.remaining < n:
            raise ProtocolError(
                f"{self.what}: {field} needs {n} bytes at offset {self._pos}, "
                f"{self.remaining} left (payload {len(self._data)} bytes)"
            )
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def s16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little", signed=True)

    def u24(self, field: str) -> int:
        return int.from_bytes(self.take(3, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def sfloat(self, field: str) -> MedFloat:
        return decode_sfloat(self.u16(field))

    def float32(self, field: str) -> MedFloat:
        return decode_float(self.u32(field))

    def date_time(self, field: str) -> dt.datetime | None:
        return decode_date_time(self.take(DATE_TIME_LENGTH, field), f"{self.what} {field}")

    def rest(self) -> bytes:
        return self.take(self.remaining, "rest")

    def end(self) -> None:
        """The format says the value ends here: extra bytes mean we misread the flags."""
        if self.remaining:
            raise ProtocolError(f"{self.what}: {self.remaining} unexpected trailing byte(s) after offset {self._pos}")


def decode_date_time(data: bytes, what: str = "Date Time") -> dt.datetime | None:
    """Date Time (0x2A08): the device's local wall-clock time, naive; None when "not known".

    The specification uses 0 for an unknown year, month or day; a time stamp with any of those
    unknown says nothing usable, so it is None. Out-of-range fields raise ProtocolError.
    """
    if len(data) != DATE_TIME_LENGTH:
        raise ProtocolError(f"{what}: Date Time is 7 bytes, got {len(data)}")
    year = int.from_bytes(data[0:2], "little")
    month, day, hours, minutes, seconds = data[2], data[3], data[4], data[5], data[6]
    if year and not 1582 <= year <= 9999:
        raise ProtocolError(f"{what}: year {year} outside 1582-9999")
    if month > 12 or day > 31 or hours > 23 or minutes > 59 or seconds > 59:
        raise ProtocolError(
            f"{what}: field out of range in {year:04d}-{month:02d}-{day:02d} {hours:02d}:{minutes:02d}:{seconds:02d}"
        )
    if year == 0 or month == 0 or day == 0:
        return None
    try:
        return dt.datetime(year, month, day, hours, minutes, seconds)
    except ValueError as exc:  # 31 April, 29 February of a common year ...
        raise ProtocolError(f"{what}: no such date {year:04d}-{month:02d}-{day:02d}: {exc}") from None


def encode_date_time(value: dt.datetime | None) -> bytes:
    """Date Time (0x2A08) for a naive local time; None gives the all-zero "not known"."""
    if value is None:
        return bytes(DATE_TIME_LENGTH)
    if not 1582 <= value.year <= 9999:
        raise ValueError(f"year {value.year} cannot be sent as a Date Time")
    return value.year.to_bytes(2, "little") + bytes((value.month, value.day, value.hour, value.minute, value.second))
