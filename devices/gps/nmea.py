"""NMEA 0183 sentences: checksum, field syntax, and typed sentence records.

One function, `parse_sentence(line)`, turns one sentence (bytes or str, with or without the
line ending) into a frozen record, or raises `NmeaError` (a `ProtocolError`). Sentences we do
not interpret (VTG, TXT, proprietary ones other than SiRF's EPE ...) come back as
`UnknownSentence`, never as an error: receivers send plenty of them.

Why our own parser rather than pynmea2: pynmea2 is pure Python and would be allowed here, but
it parses fields lazily (a bad number raises a bare ValueError at attribute access, long after
the "parse" succeeded), it knows nothing about cycles, dates, DOP or error estimates, which is
the part that matters to us, and it adds a runtime dependency of ~200 sentence classes to the SD
card image for the six sentences we read. Six sentence layouts are ~300 lines of strict,
fuzzed code whose every failure is a typed `ProtocolError`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

from devices.errors import ProtocolError

MAX_SENTENCE_LENGTH = 200  # NMEA says 82; NMEA 4.x receivers exceed it, nothing sane exceeds this


class NmeaError(ProtocolError):
    """A sentence that does not follow NMEA 0183."""


class ChecksumError(NmeaError):
    """The sentence's checksum does not match its content."""


# Talker ids we interpret, and the GNSS each one stands for ("GN" = combined solution).
TALKERS: dict[str, str] = {
    "GP": "GPS",
    "GL": "GLONASS",
    "GA": "Galileo",
    "BD": "BeiDou",
    "GB": "BeiDou",
    "GN": "GNSS",
    "GQ": "QZSS",
    "QZ": "QZSS",
    "GI": "NavIC",
}

# NMEA 4.10 system ids (GSA field 18, GSV signal-id context).
SYSTEM_IDS: dict[int, str] = {1: "GPS", 2: "GLONASS", 3: "Galileo", 4: "BeiDou", 5: "QZSS", 6: "NavIC"}


@dataclass(frozen=True, slots=True)
class Position:
    latitude: float  # degrees, north positive
    longitude: float  # degrees, east positive


@dataclass(frozen=True, slots=True)
class RMC:
    talker: str
    time: dt.time | None
    valid: bool  # status A (or D); V means the receiver has no fix
    position: Position | None
    speed_knots: float | None
    track_deg: float | None
    date: dt.date | None
    mode: str  # FAA mode indicator (NMEA 2.3+): A, D, E, M, N, S, F, R, P or ""


@dataclass(frozen=True, slots=True)
class GGA:
    talker: str
    time: dt.time | None
    position: Position | None
    quality: int  # 0 invalid, 1 GPS, 2 DGPS, 3 PPS, 4 RTK fixed, 5 RTK float, 6 dead reckoning ...
    satellites_used: int | None
    hdop: float | None
    altitude_m: float | None  # above mean sea level
    geoid_separation_m: float | None


@dataclass(frozen=True, slots=True)
class GNS:
    talker: str
    time: dt.time | None
    position: Position | None
    mode: str  # one character per system (GPS, GLONASS, Galileo, BeiDou ...): N = no fix
    satellites_used: int | None
    hdop: float | None
    altitude_m: float | None
    geoid_separation_m: float | None


@dataclass(frozen=True, slots=True)
class GSA:
    talker: str
    selection: str  # A automatic / M manual
    mode: int  # 1 no fix, 2 2D, 3 3D
    prns: tuple[int, ...]  # satellites used in the solution
    pdop: float | None
    hdop: float | None
    vdop: float | None
    system_id: int | None  # NMEA 4.10+


@dataclass(frozen=True, slots=True)
class SatelliteInView:
    prn: int
    elevation_deg: float | None
    azimuth_deg: float | None
    snr_db: float | None


@dataclass(frozen=True, slots=True)
class GSV:
    talker: str
    message_count: int
    message_number: int
    satellites_in_view: int
    satellites: tuple[SatelliteInView, ...]
    signal_id: str | None  # NMEA 4.10+


@dataclass(frozen=True, slots=True)
class GST:
    """Pseudorange error statistics: 1-sigma errors in metres, as estimated by the receiver."""

    talker: str
    time: dt.time | None
    rms_range_m: float | None
    major_m: float | None
    minor_m: float | None
    orientation_deg: float | None
    latitude_sigma_m: float | None
    longitude_sigma_m: float | None
    altitude_sigma_m: float | None


@dataclass(frozen=True, slots=True)
class ZDA:
    talker: str
    time: dt.time | None
    date: dt.date | None


@dataclass(frozen=True, slots=True)
class GLL:
    talker: str
    position: Position | None
    time: dt.time | None
    valid: bool


@dataclass(frozen=True, slots=True)
class SirfEPE:
    """SiRF's $PSRFEPE: the receiver's own 95 % error estimates (gpsd reports these as eph/epv)."""

    time: dt.time | None
    valid: bool
    hdop: float | None
    ehpe_m: float | None
    evpe_m: float | None


@dataclass(frozen=True, slots=True)
class UnknownSentence:
    talker: str  # "P" for proprietary
    kind: str
    fields: tuple[str, ...]


Sentence = RMC | GGA | GNS | GSA | GSV | GST | ZDA | GLL | SirfEPE | UnknownSentence

_ADDRESS = re.compile(r"[A-Z0-9]{3,10}")
_TIME = re.compile(r"(\d\d)(\d\d)(\d\d)(?:\.(\d{1,6}))?")
_ANGLE = re.compile(r"(\d{1,3})(\d\d(?:\.\d{1,9})?)")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_INTEGER = re.compile(r"\d{1,4}")


def checksum(body: str) -> int:
    """XOR of every character between '$' and '*'."""
    value = 0
    for ch in body.encode("ascii"):
        value ^= ch
    return value


def split_sentence(line: bytes | str) -> tuple[str, list[str]]:
    """Check framing and checksum; return the address field ("GPGGA") and the data fields."""
    if isinstance(line, (bytes, bytearray)):
        try:
            text = bytes(line).decode("ascii")
        except UnicodeDecodeError:
            raise NmeaError("sentence holds non-ASCII bytes") from None
    else:
        text = line
    text = text.rstrip("\r\n")
    if len(text) > MAX_SENTENCE_LENGTH:
        raise NmeaError(f"sentence of {len(text)} characters (limit {MAX_SENTENCE_LENGTH})")
    if not text.startswith("$"):
        raise NmeaError("a sentence starts with '$'")
    if any(not (0x20 <= ord(ch) < 0x7F) for ch in text):
        raise NmeaError("sentence holds control or non-printable characters")
    star = text.rfind("*")
    if star < 0:
        raise NmeaError("sentence has no checksum")
    body, given = text[1:star], text[star + 1 :]
    if len(given) != 2 or any(ch not in "0123456789ABCDEFabcdef" for ch in given):
        raise NmeaError(f"checksum field {given!r} is not two hex digits")
    if int(given, 16) != checksum(body):
        raise ChecksumError(f"checksum {given.upper()} does not match {checksum(body):02X}")
    fields = body.split(",")
    address = fields[0]
    if not _ADDRESS.fullmatch(address):
        raise NmeaError(f"address field {address!r} is not an NMEA address")
    return address, fields[1:]


def parse_sentence(line: bytes | str) -> Sentence:
    """One NMEA sentence → a typed record, or `NmeaError`."""
    address, fields = split_sentence(line)
    if address.startswith("P"):
        if address == "PSRFEPE":
            return _epe(fields)
        return UnknownSentence("P", address[1:], tuple(fields))
    talker, kind = address[:2], address[2:]
    parser = _PARSERS.get(kind)
    if parser is None or talker not in TALKERS:
        return UnknownSentence(talker, kind, tuple(fields))
    return parser(talker, fields)


# --- field syntax -------------------------------------------------------------------------


def _need(fields: list[str], count: int, kind: str) -> None:
    if len(fields) < count:
        raise NmeaError(f"{kind} needs at least {count} fields, got {len(fields)}")


def _float(value: str, what: str) -> float | None:
    if value == "":
        return None
    if not _NUMBER.fullmatch(value):
        raise NmeaError(f"{what} {value!r} is not a number")
    # Always finite: the sentence limit keeps a number under 10**MAX_SENTENCE_LENGTH, far from
    # float's overflow at ~1.8e308 (tests/test_gps_sentences.py holds the limit to that)
    return float(value)


def _int(value: str, what: str) -> int | None:
    if value == "":
        return None
    if not _INTEGER.fullmatch(value):
        raise NmeaError(f"{what} {value!r} is not a small whole number")
    return int(value)


def _time(value: str) -> dt.time | None:
    if value == "":
        return None
    m = _TIME.fullmatch(value)
    if not m:
        raise NmeaError(f"time {value!r} is not hhmmss[.sss]")
    hh, mm, ss = int(m[1]), int(m[2]), int(m[3])
    if hh > 23 or mm > 59 or ss > 59:
        # 60 would be a leap second: datetime cannot hold it, and one lost epoch costs nothing.
        raise NmeaError(f"time {value!r} is out of range")
    micro = int((m[4] or "0").ljust(6, "0"))
    return dt.time(hh, mm, ss, micro)


def _date(day: int, month: int, year: int) -> dt.date:
    try:
        return dt.date(year, month, day)
    except ValueError:
        raise NmeaError(f"date {day:02d}.{month:02d}.{year} does not exist") from None


def _angle(value: str, hemisphere: str, what: str) -> float | None:
    if value == "" and hemisphere == "":
        return None
    m = _ANGLE.fullmatch(value)
    if not m:
        raise NmeaError(f"{what} {value!r} is not [d]ddmm.mmmm")
    degrees, minutes = int(m[1]), float(m[2])
    if minutes >= 60.0:
        raise NmeaError(f"{what} {value!r} has {minutes} minutes")
    angle = degrees + minutes / 60.0
    limit, positive, negative = (90.0, "N", "S") if what == "latitude" else (180.0, "E", "W")
    if hemisphere not in (positive, negative):
        raise NmeaError(f"{what} hemisphere {hemisphere!r} is not {positive} or {negative}")
    if angle > limit:
        raise NmeaError(f"{what} {angle} is beyond {limit}")
    return -angle if hemisphere == negative else angle


def _position(lat: str, ns: str, lon: str, ew: str) -> Position | None:
    latitude = _angle(lat, ns, "latitude")
    longitude = _angle(lon, ew, "longitude")
    if latitude is None or longitude is None:
        if (latitude is None) != (longitude is None):
            raise NmeaError("a position needs both latitude and longitude")
        return None
    return Position(latitude, longitude)


def _range(value: float | None, low: float, high: float, what: str) -> float | None:
    if value is not None and not low <= value <= high:
        raise NmeaError(f"{what} {value} is outside {low}..{high}")
    return value


# --- sentences ------------------------------------------------------------------------------


def _rmc(talker: str, f: list[str]) -> RMC:
    _need(f, 9, "RMC")
    status = f[1]
    if status not in ("A", "V", "D", ""):
        raise NmeaError(f"RMC status {status!r} is not A or V")
    date = None
    if f[8]:
        if not re.fullmatch(r"\d{6}", f[8]):
            raise NmeaError(f"RMC date {f[8]!r} is not ddmmyy")
        yy = int(f[8][4:])
        # Two-digit years: receivers of this century; 80..99 only from old logs.
        date = _date(int(f[8][:2]), int(f[8][2:4]), (1900 if yy >= 80 else 2000) + yy)
    mode = f[11] if len(f) > 11 else ""
    if len(mode) > 1:
        raise NmeaError(f"RMC mode indicator {mode!r} is not one character")
    return RMC(
        talker,
        _time(f[0]),
        status in ("A", "D") and mode != "N",
        _position(f[2], f[3], f[4], f[5]),
        _range(_float(f[6], "speed"), 0.0, 1e5, "speed"),
        _range(_float(f[7], "track"), -360.0, 360.0, "track"),
        date,
        mode,
    )


def _gga(talker: str, f: list[str]) -> GGA:
    _need(f, 11, "GGA")
    quality = _int(f[5], "GGA quality")
    if quality is None or quality > 9:
        raise NmeaError(f"GGA quality {f[5]!r} is not 0..9")
    return GGA(
        talker,
        _time(f[0]),
        _position(f[1], f[2], f[3], f[4]),
        quality,
        _int(f[6], "satellites used"),
        _range(_float(f[7], "HDOP"), 0.0, 100.0, "HDOP"),
        _range(_float(f[8], "altitude"), -20000.0, 1e6, "altitude"),
        _range(_float(f[10], "geoid separation"), -1000.0, 1000.0, "geoid separation"),
    )


def _gns(talker: str, f: list[str]) -> GNS:
    _need(f, 10, "GNS")
    mode = f[5]
    if not re.fullmatch(r"[ADEFMNPRS]{0,8}", mode):
        raise NmeaError(f"GNS mode {mode!r} is not a string of mode indicators")
    return GNS(
        talker,
        _time(f[0]),
        _position(f[1], f[2], f[3], f[4]),
        mode,
        _int(f[6], "satellites used"),
        _range(_float(f[7], "HDOP"), 0.0, 100.0, "HDOP"),
        _range(_float(f[8], "altitude"), -20000.0, 1e6, "altitude"),
        _range(_float(f[9], "geoid separation"), -1000.0, 1000.0, "geoid separation"),
    )


def _gsa(talker: str, f: list[str]) -> GSA:
    _need(f, 17, "GSA")
    selection = f[0]
    mode = _int(f[1], "GSA mode")
    if mode is None or mode not in (1, 2, 3):
        raise NmeaError(f"GSA mode {f[1]!r} is not 1, 2 or 3")
    prns = tuple(p for p in (_int(v, "satellite PRN") for v in f[2:14]) if p is not None)
    system_id = _int(f[17], "GSA system id") if len(f) > 17 else None
    if len(f) > 18:
        raise NmeaError(f"GSA has {len(f)} fields (at most 18)")
    return GSA(
        talker,
        selection,
        mode,
        prns,
        _range(_float(f[14], "PDOP"), 0.0, 100.0, "PDOP"),
        _range(_float(f[15], "HDOP"), 0.0, 100.0, "HDOP"),
        _range(_float(f[16], "VDOP"), 0.0, 100.0, "VDOP"),
        system_id,
    )


def _gsv(talker: str, f: list[str]) -> GSV:
    _need(f, 3, "GSV")
    count, number, in_view = (_int(v, "GSV counter") for v in f[:3])
    if count is None or number is None or not 1 <= number <= count <= 99:
        raise NmeaError(f"GSV message {f[1]!r} of {f[0]!r} is not a valid part number")
    rest = f[3:]
    signal_id = None
    if len(rest) % 4 == 1:
        signal_id, rest = rest[-1], rest[:-1]
    elif len(rest) % 4:
        raise NmeaError(f"GSV carries {len(rest)} satellite fields (groups of 4 expected)")
    if len(rest) > 4 * 4:
        raise NmeaError("GSV carries more than four satellites")
    sats = []
    for i in range(0, len(rest), 4):
        prn = _int(rest[i], "satellite PRN")
        if prn is None:
            continue  # padding groups some receivers send
        sats.append(
            SatelliteInView(
                prn,
                _range(_float(rest[i + 1], "elevation"), -90.0, 90.0, "elevation"),
                _range(_float(rest[i + 2], "azimuth"), 0.0, 360.0, "azimuth"),
                _range(_float(rest[i + 3], "SNR"), 0.0, 99.0, "SNR"),
            )
        )
    return GSV(talker, count, number, in_view or 0, tuple(sats), signal_id)


def _gst(talker: str, f: list[str]) -> GST:
    _need(f, 8, "GST")

    def sigma(value: str) -> float | None:
        return _range(_float(value, "GST error"), 0.0, 1e7, "GST error")

    return GST(
        talker,
        _time(f[0]),
        sigma(f[1]),
        sigma(f[2]),
        sigma(f[3]),
        _range(_float(f[4], "GST orientation"), -360.0, 360.0, "GST orientation"),
        sigma(f[5]),
        sigma(f[6]),
        sigma(f[7]),
    )


def _zda(talker: str, f: list[str]) -> ZDA:
    _need(f, 4, "ZDA")
    day, month, year = (_int(v, "ZDA date") for v in f[1:4])
    date = None
    if day is not None and month is not None and year is not None:
        date = _date(day, month, year)
    elif (day, month, year) != (None, None, None):
        raise NmeaError("ZDA date is incomplete")
    return ZDA(talker, _time(f[0]), date)


def _gll(talker: str, f: list[str]) -> GLL:
    _need(f, 6, "GLL")
    mode = f[6] if len(f) > 6 else ""
    return GLL(talker, _position(f[0], f[1], f[2], f[3]), _time(f[4]), f[5] == "A" and mode != "N")


def _epe(f: list[str]) -> SirfEPE:
    _need(f, 5, "PSRFEPE")
    return SirfEPE(
        _time(f[0]),
        f[1] == "A",
        _range(_float(f[2], "HDOP"), 0.0, 100.0, "HDOP"),
        _range(_float(f[3], "EHPE"), 0.0, 1e7, "EHPE"),
        _range(_float(f[4], "EVPE"), 0.0, 1e7, "EVPE"),
    )


_PARSERS: dict[str, Callable[[str, list[str]], Sentence]] = {
    "RMC": _rmc,
    "GGA": _gga,
    "GNS": _gns,
    "GSA": _gsa,
    "GSV": _gsv,
    "GST": _gst,
    "ZDA": _zda,
    "GLL": _gll,
}
