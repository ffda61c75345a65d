"""Who made a measurement, on whom, and how far its time can be trusted."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable
from dataclasses import dataclass

from devices.errors import DeviceError, InvalidRecordingError

# Years a date from a device, a file or an ID card (acquisition, birth, a report) can hold;
# outside, the field is garbled (e.g. "0202" for "2020", 3990 for 1990), and parsers treat it
# as unreadable rather than pass it on.
POSSIBLE_YEARS = range(1900, 2201)


class TimeSource(str, enum.Enum):
    """Where the time stamp of a measurement came from."""

    DEVICE_CLOCK = "device-clock"  # the device's own clock, believed plausible
    DEVICE_CLOCK_CORRECTED = "device-clock-corrected"  # device clock, shifted by a measured offset
    FILE = "file"  # written into a file by the device that made it
    GATEWAY_RECEIPT = "gateway-receipt"  # when the gateway received it (device time unknown or implausible)
    # the device's own time (or its file's), kept as it said but not believed: before anything we
    # record can be (a clock reset to 2000-01-01), judged against the gateway's trusted clock
    DEVICE_CLOCK_UNTRUSTED = "device-clock-untrusted"
    GPS = "gps"  # GNSS time
    UNKNOWN = "unknown"


# Nothing we record can predate this: a Pi without RTC boots in 1970.
EARLIEST_PLAUSIBLE = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
# A device's time further ahead of its receipt than this is a clock set wrong, not a time.
DEVICE_CLOCK_TOLERANCE = dt.timedelta(minutes=10)
# A cart sending each ECG as it records it (the clinic LAN) whose time is further behind the newest
# one it sent before than this had its clock reset, if to a date after EARLIEST_PLAUSIBLE: more
# than a backlog sent late (a cart off the LAN for weeks, last month's ECG sent again to be read),
# less than any reset to a factory or firmware date (a year or more back).
DEVICE_CLOCK_BACKWARDS = dt.timedelta(days=90)
# Observation flag: a record from a device's memory (taken earlier, perhaps on another patient)
# whose own time could not be used, so its time is only when we received it. Such a reading is
# held for the doctor, never given to the current patient.
STORED_TIME_UNKNOWN = "stored-record-time-unknown"
# Recording flags (devices.ecg.formats.believable_time): the device's clock needs setting.
DEVICE_TIME_AHEAD = "device-time-ahead"  # ":<ISO time>": the file's own time, ahead of its receipt
DEVICE_CLOCK_RESET = "device-clock-reset"  # the file's time predates anything we record, or its cart's last ECG


def device_clock_wrong(flags: Iterable[str]) -> bool:
    """Whether a recording's flags say its device's clock needs setting (reset, or set ahead)."""
    return any(f == DEVICE_CLOCK_RESET or f.startswith(DEVICE_TIME_AHEAD + ":") for f in flags)


def plausible_device_time(
    when: dt.datetime, received_at: dt.datetime, tolerance: dt.timedelta = DEVICE_CLOCK_TOLERANCE
) -> bool:
    """Whether a device's time stamp can be when it measured: not before EARLIEST_PLAUSIBLE, and
    not further ahead of its receipt than `tolerance`."""
    return EARLIEST_PLAUSIBLE <= when <= received_at + tolerance


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


# Issuer of the temporary per-study Patient ID an ECG sent without a patient carries in DICOM
# ("UNASSIGNED-<hash>"): an object with it names no patient, whoever reads it back.
UNASSIGNED_ISSUER = "LASTMILE-UNASSIGNED"


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


# -- China's resident identity number (GB 11643-1999) ----------------------------------------------

RESIDENT_ID_KIND = "cn-resident-id"
_RESIDENT_ID_WEIGHTS = tuple(2 ** (17 - i) % 11 for i in range(17))  # 7, 9, 10, 5, 8, 4, 2, 1, 6, 3, ...
_CHECK_CHARS = "10X98765432"  # index: weighted sum mod 11 (ISO 7064 MOD 11-2)
# full-width digits and X, and every kind of space, as a phone keyboard or a QR code gives them
_FULL_WIDTH = str.maketrans("０１２３４５６７８９ｘＸ", "0123456789XX")


class InvalidPatientIdError(DeviceError, ValueError):
    """A patient identifier of the configured kind that is not valid (e.g. a wrong check digit).

    The message is bilingual (Chinese first) and shown to the village doctor as it is; it never
    repeats the whole number (it may be logged). `reason` names the rule broken ("length",
    "check-character", "birth-date", or "" for other kinds), for pages that word it themselves."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ResidentId:
    """A verified 18-character resident identity number and what it encodes."""

    number: str
    birth_date: dt.date
    sex: str  # "M" (odd sequence digit) or "F" (even)


def resident_id_check_char(first17: str) -> str:
    """The GB 11643 check character of the first 17 digits."""
    total = sum(int(d) * w for d, w in zip(first17, _RESIDENT_ID_WEIGHTS))
    return _CHECK_CHARS[total % 11]


def normalise_resident_id(text: str) -> str:
    """Spaces and separators out, full-width digits to ASCII, lower-case x to X."""
    cleaned = text.translate(_FULL_WIDTH).upper()
    return "".join(ch for ch in cleaned if not ch.isspace() and ch not in "-_")


def looks_like_resident_id(text: str) -> bool:
    """Digits (and perhaps an X) only, 15 to 19 of them: what someone typing or scanning a resident
    ID produces, typos included. Such input must pass `parse_resident_id`; anything else (a clinic
    number such as "MRN-0042") is another kind of identifier."""
    number = normalise_resident_id(text)
    return 15 <= len(number) <= 19 and number.rstrip("X").isdigit() and number.isascii()


def resident_id_required(text: str, id_kind: str) -> bool:
    """Whether the patient identifier `text` must pass `parse_resident_id` under `[patient]
    id_kind`: always with "cn-resident-id"; with any kind of ID allowed (""), when it looks like
    one (a misread card or a typo must not become a patient, and "...2x" typed and "...2X"
    scanned are one patient). Every path an ID enters by (CLI, console, scanner, ECG files)
    asks this one question."""
    return id_kind == RESIDENT_ID_KIND or (not id_kind and looks_like_resident_id(text))


def parse_resident_id(text: str) -> ResidentId:
    """Check a resident identity number (normalised first); InvalidPatientIdError says why not."""
    number = normalise_resident_id(text)
    # ASCII 0-9 only: str.isdigit() also passes superscripts (int() refuses them) and other
    # scripts' digits (the same number spelled otherwise would be another patient)
    if len(number) != 18 or not number.isascii() or not number[:17].isdigit() or number[17] not in "0123456789X":
        raise InvalidPatientIdError(
            f"身份证号应为18位（17位数字加校验位 0-9 或 X），输入的有 {len(number)} 位 / "
            f"a resident ID has 18 characters (17 digits and a check digit 0-9 or X); this one has {len(number)}",
            "length",
        )
    expected = resident_id_check_char(number[:17])
    if number[17] != expected:
        raise InvalidPatientIdError(
            f"身份证号校验位错误（最后一位应为 {expected}，不是 {number[17]}），请核对号码 / "
            f"wrong check digit in the resident ID (the last character should be {expected}, not "
            f"{number[17]}): check the number",
            "check-character",
        )
    try:
        born = dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        born = None
    if born is None or born.year not in POSSIBLE_YEARS:
        raise InvalidPatientIdError(
            f"身份证号中的出生日期 {number[6:14]} 无效 / the birth date {number[6:14]} in the resident ID is not a date",
            "birth-date",
        )
    return ResidentId(number, born, "M" if int(number[16]) % 2 else "F")
