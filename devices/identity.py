"""Who made a measurement, on whom, and how far its time can be trusted."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from devices.errors import InvalidRecordingError


class TimeSource(str, enum.Enum):
    """Where the time stamp of a measurement came from."""

    DEVICE_CLOCK = "device-clock"  # the device's own clock, believed plausible
    DEVICE_CLOCK_CORRECTED = "device-clock-corrected"  # device clock, shifted by a measured offset
    FILE = "file"  # written into a file by the device that made it
    GATEWAY_RECEIPT = "gateway-receipt"  # when the gateway received it (device time unknown or implausible)
    GPS = "gps"  # GNSS time
    UNKNOWN = "unknown"


# Nothing we record can predate this: a Pi without RTC boots in 1970.
EARLIEST_PLAUSIBLE = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)


def require_aware(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRecordingError(f"{what} must carry a time zone (got naive {value.isoformat()})")
    return value


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """A device as far as we know it; empty strings mean "not reported"."""

    manufacturer: str = ""
    model: str = ""
    serial: str = ""
    address: str = ""  # BLE address, serial port id, calling AE title ...
    software_version: str = ""

    def label(self) -> str:
        parts = [p for p in (self.manufacturer, self.model, self.serial or self.address) if p]
        return " ".join(parts) or "unknown device"


@dataclass(frozen=True, slots=True)
class Patient:
    """A patient as identified at the gateway; `patient_id` is an opaque identifier."""

    patient_id: str
    name: str = ""  # DICOM PN form "Family^Given" when known
    birth_date: dt.date | None = None
    sex: str = ""  # "M", "F", "O" or "" (unknown)
    issuer: str = ""  # issuer of the identifier (county register, ID card ...)

    def __post_init__(self) -> None:
        if not self.patient_id or not self.patient_id.strip():
            raise InvalidRecordingError("a patient needs a non-empty identifier")
        if self.sex not in ("", "M", "F", "O"):
            raise InvalidRecordingError(f"patient sex must be M, F, O or empty, not {self.sex!r}")
