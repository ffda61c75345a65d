"""SCP-ECG (EN 1064 / ISO 11073-91064, versions 1.x to 3.0) decoder.

A record is CRC (2) + record length (4) + sections; every section starts with a 16-byte header
(CRC, id, length, section version, protocol version, 6 reserved bytes). Section 0 points to
the others (index counted from 1). All integers are little-endian. Every section's
CRC-CCITT (and the record's) is checked before anything is decoded.

What we decode: section 1 (patient, device, acquisition time), 2 (default or custom Huffman
tables with table switching), 3 (lead definitions), 4 (reference beat length), 5 (reference
beats), 6 (rhythm data: no, first or second differences), and the cart's findings: 7 (global
measurements), 8 (interpretation statements), 10 (per-lead measurements), 11 (universal
statement codes). A findings section that does not parse costs only its findings (the
recording is flagged "cart-findings-unreadable:scp-section-N"), never the ECG. What we refuse, because no public
file lets us prove a decoder right and a wrong guess would look like a plausible ECG:
bimodal compression and reference-beat subtraction (UnsupportedFeatureError).

Custom Huffman tables: codes whose total length exceeds the prefix carry the value in the
extra bits (two's complement); the base value is added (ECGToolkit, ecgdatakit), and a table
switch names tables from 1. Sample reconstruction wraps at 16 bits like the encoders do.
"""

from __future__ import annotations

import binascii
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from devices.ecg.findings import EcgMeasurement, EcgStatement, MedianBeats, StatementSource, measurement
from devices.ecg.leads import derive_limb_leads, lead_name_from_scp_code, require_unique, standard_order
from devices.ecg.recording import EcgRecording
from devices.errors import InvalidRecordingError, ProtocolError, UnsupportedFeatureError
from devices.identity import POSSIBLE_YEARS, DeviceIdentity, Patient, TimeSource

SECTION_HEADER = 16
DEFAULT_HUFFMAN = 19999
MAX_LEADS = 64  # the standard allows 255; no cart records more than ~15
MAX_SAMPLES_PER_LEAD = 10_000_000  # sanity bound before allocating (a 24 h Holter at 100 Hz)

_SEX = {1: "M", 2: "F"}
_MANUFACTURERS = {
    1: "Burdick",
    2: "Cambridge",
    3: "Compumed",
    4: "Datamed",
    5: "Fukuda",
    6: "Hewlett-Packard",
    7: "Marquette Electronics",
    8: "Mortara Instruments",
    9: "Nihon Kohden",
    10: "Okin",
    11: "Quinton",
    12: "Siemens",
    13: "Spacelabs",
    14: "Telemed",
    15: "Hellige",
    16: "ESA-OTE",
    17: "Schiller",
    18: "Picker-Schwarzer",
    19: "et medical devices",
    20: "Zwönitz",
}


@dataclass(frozen=True, slots=True)
class ScpSection:
    id: int
    offset: int  # 0-based offset of the section header in the record
    length: int  # including the 16-byte header
    version: int
    protocol: int


@dataclass(frozen=True, slots=True)
class ScpEcg:
    """Everything we take from an SCP-ECG record."""

    rhythm: EcgRecording
    reference_beats: EcgRecording | None  # section 5, when stored (never subtracted here)
    protocol_version: int  # 10, 11, 12, 13, 20, 30 ...
    sections: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Lead:
    start: int
    end: int
    code: int

    @property
    def count(self) -> int:
        return self.end - self.start + 1


def _crc(chunk: bytes) -> int:
    """CRC-CCITT, polynomial 0x1021, initial value 0xFFFF (as EN 1064 specifies)."""
    return binascii.crc_hqx(chunk, 0xFFFF)


def _u16(b: bytes, p: int) -> int:
    return int.from_bytes(b[p : p + 2], "little")


def _u32(b: bytes, p: int) -> int:
    return int.from_bytes(b[p : p + 4], "little")


# Section 1 tag 14 byte 16, the "language support code": the character set of every text in
# the record (EN 1064 table; the codec names as ECGToolkit maps them). GB 2312 is read as
# GB 18030, its superset. Bit 0 clear means plain ASCII: such text is read as UTF-8, else
# Latin-1, as carts that say ASCII often write one of those.
_LANGUAGE_CODECS: dict[int, str] = {
    0x03: "iso8859-2",
    0x0B: "iso8859-4",
    0x13: "iso8859-5",
    0x1B: "iso8859-6",
    0x23: "iso8859-7",
    0x2B: "iso8859-8",
    0x33: "iso8859-11",
    0x3B: "iso8859-15",
    0x0F: "euc-jp",
    0x17: "euc-jp",
    0x1F: "euc-jp",
    0x27: "gb18030",
    0x2F: "euc-kr",
}


def _text_codec(device: bytes | None) -> str:
    """The codec the record's texts are written in, from tag 14 ("" for ASCII or unknown)."""
    if device is None or len(device) <= 16 or not device[16] & 0x01:
        return ""
    code = device[16]
    return "latin-1" if code & 0x03 == 0x01 else _LANGUAGE_CODECS.get(code, "")


def _asciiz(raw: bytes, codec: str = "") -> str:
    text = raw.split(b"\x00", 1)[0]
    for name in (codec, "utf-8"):
        if name:
            try:
                return text.decode(name).strip()
            except UnicodeDecodeError:
                continue
    return text.decode("latin-1").strip()


# ---------------------------------------------------------------- record and sections


def read_sections(data: bytes) -> tuple[bytes, dict[int, ScpSection]]:
    """The record (CRC checked) and its sections by id, from a whole SCP-ECG file."""
    if len(data) < 6 + SECTION_HEADER + 10:
        raise ProtocolError(f"not an SCP-ECG file: only {len(data)} bytes")
    record_len = _u32(data, 2)
    if _u16(data, 8) != 0 or record_len < 6 + SECTION_HEADER or record_len > len(data):
        raise ProtocolError(
            f"not a readable SCP-ECG file: its header gives a record length of {record_len} bytes "
            f"but the file has {len(data)} bytes. Either the copy is incomplete, or the device "
            "writes a non-conforming 'SCP' variant (some handheld recorders do) that cannot be "
            "read safely. Copy the file from the device again; if that does not help, export the "
            "ECG in another format (DICOM, or SCP-ECG from the maker's PC program)"
        )
    record = data[:record_len]  # bytes after the record (padding) are not ours to read
    if _crc(record[2:]) != _u16(record, 0):
        raise ProtocolError(
            "SCP-ECG file is damaged (record checksum mismatch): it was altered "
            "or not copied completely; copy it from the cart again"
        )
    sec0_len = _u32(record, 10)
    if sec0_len < SECTION_HEADER or 6 + sec0_len > record_len:
        raise ProtocolError(f"SCP-ECG section 0 claims {sec0_len} bytes in a {record_len}-byte record")
    sections = {0: ScpSection(0, 6, sec0_len, record[14], record[15])}
    _check_section_crc(record, sections[0])
    pos, end = 6 + SECTION_HEADER, 6 + sec0_len
    while pos + 10 <= end:
        sid, length, index = _u16(record, pos), _u32(record, pos + 2), _u32(record, pos + 6)
        pos += 10
        if sid == 0 or length == 0:
            continue
        offset = index - 1
        if index == 0 or length < SECTION_HEADER or offset + length > record_len:
            raise ProtocolError(
                f"SCP-ECG section {sid} ({length} bytes at byte {index}) lies outside the {record_len}-byte record"
            )
        if _u16(record, offset + 2) != sid or _u32(record, offset + 4) != length:
            raise ProtocolError(f"SCP-ECG section {sid}: its header does not match section 0's pointer")
        if sid in sections:
            raise ProtocolError(f"SCP-ECG section {sid} is listed twice")
        section = ScpSection(sid, offset, length, record[offset + 8], record[offset + 9])
        _check_section_crc(record, section)
        sections[sid] = section
    return record, sections


def _check_section_crc(record: bytes, section: ScpSection) -> None:
    chunk = record[section.offset : section.offset + section.length]
    if _crc(chunk[2:]) != _u16(chunk, 0):
        raise ProtocolError(
            f"SCP-ECG section {section.id} is damaged (checksum mismatch): the "
            "file was altered or not copied completely; copy it from the cart again"
        )


def section_body(record: bytes, section: ScpSection) -> bytes:
    """The bytes of one section after its 16-byte header."""
    return record[section.offset + SECTION_HEADER : section.offset + section.length]


# ---------------------------------------------------------------- section 1


@dataclass
class _Header:
    patient: Patient | None = None
    device: DeviceIdentity = field(default_factory=DeviceIdentity)
    acquired_at: dt.datetime | None = None
    protocol: int = 0
    stat: bool = False
    text_codec: str = ""  # the character set of the record's texts ("" ASCII / unknown)


def _tags(body: bytes) -> list[tuple[int, bytes]]:
    tags: list[tuple[int, bytes]] = []
    pos = 0
    while pos + 3 <= len(body):
        tag, length = body[pos], _u16(body, pos + 1)
        pos += 3
        if tag == 255:
            return tags
        if pos + length > len(body):
            raise ProtocolError(f"SCP-ECG section 1: tag {tag} claims {length} bytes beyond the section end")
        tags.append((tag, body[pos : pos + length]))
        pos += length
    return tags


def _date(v: bytes) -> dt.date | None:
    if len(v) < 4 or _u16(v, 0) not in POSSIBLE_YEARS:
        return None
    try:
        return dt.date(_u16(v, 0), v[2], v[3])
    except ValueError:
        return None


def _parse_section1(body: bytes, local_tz: dt.tzinfo) -> _Header:
    header = _Header()
    values: dict[int, bytes] = {}
    for tag, value in _tags(body):
        values.setdefault(tag, value)  # first occurrence wins (tags 10, 13, 30 may repeat)
    codec = header.text_codec = _text_codec(values.get(14))
    last, first = _asciiz(values.get(0, b""), codec), _asciiz(values.get(1, b""), codec)
    patient_id = _asciiz(values.get(2, b""), codec)
    if patient_id:
        sex = values.get(8, b"")
        header.patient = Patient(
            patient_id=patient_id,
            name="^".join(p for p in (last, first) if p) if first else last,
            birth_date=_date(values.get(5, b"")),
            sex=_SEX.get(sex[0], "") if sex else "",
        )
    device = values.get(14)
    if device is not None and len(device) >= 36:
        # byte 35: length of the analysing-program revision; then NUL-terminated serial number,
        # system software, SCP implementation software and manufacturer.
        n = device[35]
        strings = [device[36 : 36 + n]] + device[36 + n :].split(b"\x00") + [b""] * 5
        manufacturer = _asciiz(strings[4], codec) or _MANUFACTURERS.get(device[7], "")
        header.device = DeviceIdentity(
            manufacturer=manufacturer,
            model=_asciiz(device[8:14], codec),
            serial=_asciiz(strings[1], codec),
            software_version=_asciiz(strings[2], codec),
        )
        header.protocol = device[14]
    stat = values.get(24, b"")
    header.stat = bool(stat) and stat[0] > 0
    day = _date(values.get(25, b""))
    clock = values.get(26, b"")
    if day is not None and len(clock) >= 3 and clock[0] < 24 and clock[1] < 60 and clock[2] < 60:
        tz = local_tz
        zone = values.get(34, b"")
        if len(zone) >= 2:
            minutes = int.from_bytes(zone[:2], "little", signed=True)
            if minutes != 0x7FFF and abs(minutes) <= 14 * 60:
                tz = dt.timezone(dt.timedelta(minutes=minutes))
        header.acquired_at = dt.datetime(day.year, day.month, day.day, clock[0], clock[1], clock[2], tzinfo=tz)
    return header


# ---------------------------------------------------------------- Huffman (section 2)


@dataclass(frozen=True, slots=True)
class HuffmanCode:
    prefix_bits: int
    total_bits: int
    switch: bool  # True: switch to table `value` (numbered from 1)
    value: int
    code: int  # prefix, first transmitted bit most significant


def _default_table() -> tuple[HuffmanCode, ...]:
    # EN 1064 default table: 0 -> "0"; +-n (n = 1..8) -> n ones, a zero, the sign bit;
    # "1111111110" + 8-bit value; "1111111111" + 16-bit value.
    codes = [HuffmanCode(1, 1, False, 0, 0)]
    for n in range(1, 9):
        ones = (1 << n) - 1
        codes.append(HuffmanCode(n + 2, n + 2, False, n, ones << 2))
        codes.append(HuffmanCode(n + 2, n + 2, False, -n, (ones << 2) | 1))
    codes.append(HuffmanCode(10, 18, False, 0, 0b1111111110))
    codes.append(HuffmanCode(10, 26, False, 0, 0b1111111111))
    return tuple(codes)


DEFAULT_TABLE = _default_table()


def _parse_section2(body: bytes) -> list[tuple[HuffmanCode, ...]]:
    if len(body) < 2:
        raise ProtocolError("SCP-ECG section 2 (Huffman tables) is empty")
    count = _u16(body, 0)
    if count == DEFAULT_HUFFMAN:
        return [DEFAULT_TABLE]
    if count == 0 or count > 256:
        raise ProtocolError(f"SCP-ECG section 2 declares {count} Huffman tables")
    tables = []
    pos = 2
    for t in range(count):
        if pos + 2 > len(body):
            raise ProtocolError(f"SCP-ECG section 2 ends inside Huffman table {t + 1}")
        n = _u16(body, pos)
        pos += 2
        if n == 0 or pos + 9 * n > len(body):
            raise ProtocolError(f"SCP-ECG section 2: Huffman table {t + 1} claims {n} codes")
        codes = []
        for _ in range(n):
            prefix, total, mode = body[pos], body[pos + 1], body[pos + 2]
            value = int.from_bytes(body[pos + 3 : pos + 5], "little", signed=True)
            stored = _u32(body, pos + 5)
            pos += 9
            if not 1 <= prefix <= 32 or total < prefix or total - prefix > 32:
                raise ProtocolError(f"SCP-ECG section 2: bad code lengths {prefix}/{total}")
            if mode == 0 and total != prefix:
                raise ProtocolError("SCP-ECG section 2: a table switch code carries extra bits")
            # the base code is stored with its first transmitted bit in the least significant bit
            code = int(format(stored & ((1 << prefix) - 1), f"0{prefix}b")[::-1], 2)
            codes.append(HuffmanCode(prefix, total, mode == 0, value, code))
        if len({(c.prefix_bits, c.code) for c in codes}) != len(codes):
            raise ProtocolError(f"SCP-ECG section 2: Huffman table {t + 1} repeats a code")
        tables.append(tuple(codes))
    for table in tables:
        for c in table:
            if c.switch and not 1 <= c.value <= len(tables):
                raise ProtocolError(f"SCP-ECG section 2: switch to missing Huffman table {c.value}")
    return tables


def _signed(raw: int, bits: int) -> int:
    return raw - (1 << bits) if raw >> (bits - 1) else raw


def _decode_default(chunk: bytes, count: int, what: str) -> np.ndarray:
    """Default-table Huffman decoding: the code that starts at any bit position is known from
    the run of ones there, so everything but the walk from code to code is vectorised."""
    nbits = len(chunk) * 8
    bits = np.unpackbits(np.frombuffer(chunk, dtype=np.uint8))
    padded = np.concatenate([bits, np.zeros(26, dtype=np.uint8)])
    ones = np.zeros(nbits, dtype=np.uint8)  # leading ones at every position, capped at 10
    run = np.ones(nbits, dtype=bool)
    for k in range(10):
        run &= padded[k : k + nbits] == 1
        ones += run
    length = np.where(ones == 0, 1, ones + 2).astype(np.uint8)  # 0 -> "0"; n ones, 0, sign
    length[ones == 9] = 18  # "1111111110" + 8-bit value
    length[ones == 10] = 26  # "1111111111" + 16-bit value
    step = length.tolist()
    positions: list[int] = []
    append = positions.append
    pos = 0
    while len(positions) < count and pos < nbits:
        append(pos)
        pos += step[pos]
    if len(positions) < count or pos > nbits:
        raise ProtocolError(f"SCP-ECG {what}: Huffman data ends after {max(len(positions) - 1, 0)} of {count} samples")
    idx = np.asarray(positions, dtype=np.int64)
    n = ones[idx].astype(np.int64)
    sign = padded[idx + np.minimum(n, 8) + 1]
    out = np.where(sign == 1, -n, n)
    for escape, width in ((9, 8), (10, 16)):
        where = np.nonzero(n == escape)[0]
        if where.size:
            start = idx[where] + 10
            raw = np.zeros(where.size, dtype=np.int64)
            for k in range(width):
                raw = (raw << 1) | padded[start + k]
            out[where] = np.where(raw >> (width - 1), raw - (1 << width), raw)
    return out


def _decode_custom(chunk: bytes, count: int, tables: list[tuple[HuffmanCode, ...]], what: str) -> np.ndarray:
    nbits = len(chunk) * 8
    stream = int.from_bytes(chunk, "big")
    lookups = [{(c.prefix_bits, c.code): c for c in t} for t in tables]
    lengths = [sorted({c.prefix_bits for c in t}) for t in tables]
    current = 0
    out = np.empty(count, dtype=np.int64)
    pos = n = 0
    switches = 0
    while n < count:
        entry = None
        for plen in lengths[current]:
            if pos + plen > nbits:
                break
            prefix = (stream >> (nbits - pos - plen)) & ((1 << plen) - 1)
            entry = lookups[current].get((plen, prefix))
            if entry is not None:
                break
        if entry is None:
            if pos + lengths[current][0] > nbits:
                raise ProtocolError(f"SCP-ECG {what}: Huffman data ends after {n} of {count} samples")
            raise ProtocolError(f"SCP-ECG {what}: bit pattern at bit {pos} is not in the Huffman table")
        pos += entry.prefix_bits
        if entry.switch:
            switches += 1
            if switches > nbits:  # switches consume bits, so this only guards a zero-length loop
                raise ProtocolError(f"SCP-ECG {what}: endless Huffman table switching")
            current = entry.value - 1
            continue
        extra = entry.total_bits - entry.prefix_bits
        value = entry.value
        if extra:
            if pos + extra > nbits:
                raise ProtocolError(f"SCP-ECG {what}: Huffman data ends after {n} of {count} samples")
            raw = (stream >> (nbits - pos - extra)) & ((1 << extra) - 1)
            value += _signed(raw, extra)
            pos += extra
        out[n] = value
        n += 1
    return out


def huffman_decode(
    chunk: bytes, count: int, tables: list[tuple[HuffmanCode, ...]] | None, what: str = "data"
) -> np.ndarray:
    """Decode `count` values (before undoing differences); tables None means 16-bit integers."""
    if tables is None:
        if 2 * count > len(chunk):
            raise ProtocolError(f"SCP-ECG {what}: {len(chunk)} bytes hold fewer than {count} samples")
        return np.frombuffer(chunk, dtype="<i2", count=count).astype(np.int64)
    # Every code is at least one bit: more samples than bits means the lengths lie.
    if count > len(chunk) * 8:
        raise ProtocolError(f"SCP-ECG {what}: {len(chunk)} bytes cannot hold {count} samples")
    if tables[0] is DEFAULT_TABLE:
        return _decode_default(chunk, count, what)
    return _decode_custom(chunk, count, tables, what)


def undo_differences(values: np.ndarray, mode: int) -> np.ndarray:
    """Reconstruct samples from first (1) or second (2) differences, in 16-bit arithmetic."""
    v = values.astype(np.int64)
    if mode == 1 and v.size:
        out = np.cumsum(v)
    elif mode == 2 and v.size > 2:
        # x[n] = d[n] + 2 x[n-1] - x[n-2] for n >= 2; x[0], x[1] are stored as they are
        slope = np.empty(v.size - 1, dtype=np.int64)
        slope[0] = v[1] - v[0]
        slope[1:] = slope[0] + np.cumsum(v[2:])
        out = np.concatenate(([v[0]], v[0] + np.cumsum(slope)))
    else:
        out = v
    return out.astype(np.int16)


# ---------------------------------------------------------------- sections 3 to 6


def _parse_section3(body: bytes) -> tuple[list[_Lead], int]:
    if len(body) < 2:
        raise ProtocolError("SCP-ECG section 3 (lead definition) is empty")
    count, flags = body[0], body[1]
    if count == 0:
        raise ProtocolError("SCP-ECG section 3 defines no leads")
    if count > MAX_LEADS:
        raise UnsupportedFeatureError(f"SCP-ECG file defines {count} leads; at most {MAX_LEADS} are supported")
    if 2 + 9 * count > len(body):
        raise ProtocolError(f"SCP-ECG section 3 declares {count} leads but holds {(len(body) - 2) // 9}")
    leads = []
    for i in range(count):
        p = 2 + 9 * i
        lead = _Lead(_u32(body, p), _u32(body, p + 4), body[p + 8])
        if lead.start < 1 or lead.end < lead.start or lead.count > MAX_SAMPLES_PER_LEAD:
            raise ProtocolError(f"SCP-ECG lead {i + 1}: bad sample range {lead.start}..{lead.end}")
        leads.append(lead)
    return leads, flags


@dataclass(frozen=True, slots=True)
class _Encoded:
    avm_nv: int
    interval_us: int
    differences: int
    flag: int
    chunks: tuple[bytes, ...]


def _parse_encoded(body: bytes, n_leads: int, sid: int) -> _Encoded:
    if len(body) < 6 + 2 * n_leads:
        raise ProtocolError(f"SCP-ECG section {sid} is too short for {n_leads} leads")
    avm, interval, diff, flag = _u16(body, 0), _u16(body, 2), body[4], body[5]
    if diff not in (0, 1, 2):
        raise ProtocolError(f"SCP-ECG section {sid}: unknown difference encoding {diff}")
    if avm == 0:
        raise ProtocolError(f"SCP-ECG section {sid}: amplitude multiplier is 0 (samples would have no unit)")
    if interval == 0:
        raise ProtocolError(f"SCP-ECG section {sid}: sample interval is 0")
    sizes = [_u16(body, 6 + 2 * i) for i in range(n_leads)]
    pos = 6 + 2 * n_leads
    if pos + sum(sizes) > len(body):
        raise ProtocolError(f"SCP-ECG section {sid}: lead data ({sum(sizes)} bytes) exceeds the section")
    chunks = []
    for size in sizes:
        chunks.append(body[pos : pos + size])
        pos += size
    return _Encoded(avm, interval, diff, flag, tuple(chunks))


def _decode_leads(
    enc: _Encoded, counts: list[int], tables: list[tuple[HuffmanCode, ...]] | None, sid: int
) -> np.ndarray:
    # every code is at least one bit (16 without compression): check before allocating
    per_byte = 8 if tables is not None else 0.5
    for i, (chunk, count) in enumerate(zip(enc.chunks, counts)):
        if count > len(chunk) * per_byte:
            raise ProtocolError(f"SCP-ECG section {sid} lead {i + 1}: {len(chunk)} bytes cannot hold {count} samples")
    out = np.empty((len(counts), counts[0]), dtype=np.int16)
    for i, (chunk, count) in enumerate(zip(enc.chunks, counts)):
        values = huffman_decode(chunk, count, tables, f"section {sid} lead {i + 1}")
        out[i] = undo_differences(values, enc.differences)
    return out


def _rate(interval_us: int) -> float:
    """Rate from a whole-microsecond interval: 1667 us is 600 Hz, not 599.88 Hz."""
    whole = round(1_000_000 / interval_us)
    if whole and round(1_000_000 / whole) == interval_us:
        return float(whole)
    return 1_000_000 / interval_us


# ---------------------------------------------------------------- findings (sections 7, 8, 10, 11)

# "not computed", "rejected", "wave not present" (EN 1064 5.9 / 5.11): never a value
_SCP_UNDEFINED = frozenset({29999, 29998, 19999, -29999, -32768, 32767})
_AXIS_UNDEFINED = 999
_QTC_FORMULA = {1: "bazett", 2: "hodges"}
# section 10 per-lead values (int16, in this order): index -> our measurement, and the index of
# the wave duration that must be non-zero for an amplitude to mean anything
_SECTION10 = {
    0: ("lead-p-duration", None),
    1: ("lead-pr-interval", None),
    2: ("lead-qrs-duration", None),
    3: ("lead-qt-interval", None),
    9: ("lead-q-amplitude", 4),
    10: ("lead-r-amplitude", 5),
    11: ("lead-s-amplitude", 6),
    14: ("lead-j-amplitude", None),
}


@dataclass
class _Findings:
    measurements: list[EcgMeasurement] = field(default_factory=list)
    statements: list[EcgStatement] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)
    text_codec: str = ""  # section 1's character set, for the statements' text

    def add(self, kind: str, value: int, source: str, **extra: str) -> None:
        if value in _SCP_UNDEFINED:
            return
        found = measurement(kind, value, source, **extra)
        if found is not None:
            self.measurements.append(found)


def _i16(b: bytes, p: int) -> int:
    return int.from_bytes(b[p : p + 2], "little", signed=True)


def _parse_section7(body: bytes, out: _Findings) -> None:
    """Global measurements. The first measurement block is the dominant (reference) beat: its
    wave boundaries give PR, QRS and QT as the standard defines them (QRS onset - P onset ...)."""
    if len(body) < 6:
        raise ProtocolError("section 7 is shorter than its header")
    blocks, spikes = body[0], body[1]
    source = "scp:section7"
    out.add("rr-interval", _u16(body, 2), source)
    out.add("pp-interval", _u16(body, 4), source)
    pos = 6
    if pos + 16 * blocks > len(body):
        raise ProtocolError(f"section 7 declares {blocks} measurement blocks beyond its end")
    if blocks:
        p_on, p_off, qrs_on, qrs_off, t_off = (_u16(body, pos + 2 * i) for i in range(5))
        fiducials = source + " (reference-beat wave boundaries)"

        def span(start: int, end: int) -> int:
            if start in _SCP_UNDEFINED or end in _SCP_UNDEFINED or end < start:
                return 29999
            return end - start

        out.add("p-duration", span(p_on, p_off), fiducials)
        out.add("pr-interval", span(p_on, qrs_on), fiducials)
        out.add("qrs-duration", span(qrs_on, qrs_off), fiducials)
        out.add("qt-interval", span(qrs_on, t_off), fiducials)
        for i, kind in enumerate(("p-axis", "qrs-axis", "t-axis")):
            axis = _i16(body, pos + 10 + 2 * i)
            if abs(axis) != _AXIS_UNDEFINED:
                out.add(kind, axis, source)
    pos += 16 * blocks + 10 * spikes  # pacemaker spikes: 4 bytes each, then 6 bytes of info each
    if pos + 2 > len(body):
        return  # version 1.x: no QRS types and no additional measurements
    qrs_types = _u16(body, pos)
    pos += 2 + qrs_types
    if pos + 7 > len(body):
        return
    out.add("heart-rate", _u16(body, pos), source)  # ventricular rate
    qtc, formula = _u16(body, pos + 4), body[pos + 6]
    out.add("qtc-interval", qtc, source, **({"method": _QTC_FORMULA[formula]} if formula in _QTC_FORMULA else {}))


def _statement_header(body: bytes, sid: int) -> tuple[StatementSource, int]:
    if len(body) < 9:
        raise ProtocolError(f"section {sid} is shorter than its header")
    # byte 0: 0 original (not over-read), 1 confirmed report, 2 over-read but not confirmed
    return (StatementSource.DEVICE if body[0] == 0 else StatementSource.PHYSICIAN), body[8]


def _statement_fields(body: bytes, count: int, sid: int) -> list[bytes]:
    fields: list[bytes] = []
    pos = 9
    for n in range(count):
        if pos + 3 > len(body):
            raise ProtocolError(f"section {sid} ends inside statement {n + 1} of {count}")
        length = _u16(body, pos + 1)
        if pos + 3 + length > len(body):
            raise ProtocolError(f"section {sid} statement {n + 1} claims {length} bytes beyond its end")
        fields.append(body[pos + 3 : pos + 3 + length])
        pos += 3 + length
    return fields


def _parse_section8(body: bytes, out: _Findings) -> None:
    """Full-text interpretation statements."""
    source, count = _statement_header(body, 8)
    for raw in _statement_fields(body, count, 8):
        text = _asciiz(raw, out.text_codec)
        if text:
            out.statements.append(EcgStatement(text, source, "scp:section8"))


def _parse_section11(body: bytes, out: _Findings) -> None:
    """Universal statement codes: type 1 coded (NUL-separated acronyms), 2 full text,
    3 statement logic (kept as text)."""
    source, count = _statement_header(body, 11)
    for raw in _statement_fields(body, count, 11):
        if not raw:
            continue
        parts = [_asciiz(part, out.text_codec) for part in raw[1:].split(b"\x00")]
        text = " ".join(p for p in parts if p)
        if text:
            code = text if raw[0] == 1 else ""
            out.statements.append(EcgStatement(text, source, "scp:section11", code))


def _lead_blocks(body: bytes, count: int, header_counted: bool) -> list[tuple[int, bytes]] | None:
    blocks = []
    pos = 4
    for _ in range(count):
        if pos + 4 > len(body):
            return None
        code, size = _u16(body, pos), _u16(body, pos + 2)
        size -= 4 if header_counted else 0
        if size < 0 or pos + 4 + size > len(body):
            return None
        blocks.append((code, body[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return blocks


def _parse_section10(body: bytes, out: _Findings) -> None:
    """Per-lead measurements (lead id, byte count, then int16 values in a fixed order)."""
    if len(body) < 4:
        raise ProtocolError("section 10 is shorter than its header")
    count = _u16(body, 0)
    # some writers count the 4-byte block header in the block length
    blocks = _lead_blocks(body, count, False) or _lead_blocks(body, count, True)
    if blocks is None:
        raise ProtocolError(f"section 10: {count} lead blocks do not fit in {len(body)} bytes")
    for code, block in blocks:
        lead = lead_name_from_scp_code(code)
        values = [_i16(block, 2 * i) for i in range(len(block) // 2)]
        for index, (kind, duration_index) in _SECTION10.items():
            if index >= len(values):
                continue
            if duration_index is not None and (duration_index >= len(values) or values[duration_index] <= 0):
                continue  # no such wave in this lead: its amplitude means nothing
            out.add(kind, values[index], "scp:section10", lead=lead)


_FINDINGS_PARSERS = {7: _parse_section7, 8: _parse_section8, 10: _parse_section10, 11: _parse_section11}


def _findings(record: bytes, sections: dict[int, ScpSection], text_codec: str) -> _Findings:
    out = _Findings()
    for sid, parse in _FINDINGS_PARSERS.items():
        if sid not in sections:
            continue
        partial = _Findings(text_codec=text_codec)
        try:
            parse(section_body(record, sections[sid]), partial)
        except (ProtocolError, InvalidRecordingError):
            out.unreadable.append(sid)
            continue
        out.measurements += partial.measurements
        out.statements += partial.statements
    return out


def _median(reference: EcgRecording | None) -> MedianBeats | None:
    if reference is None:
        return None
    return MedianBeats(
        samples=reference.samples,
        lead_names=reference.lead_names,
        sampling_rate_hz=reference.sampling_rate_hz,
        uv_per_unit=reference.uv_per_unit,
        source="scp:section5",
    )


def parse_scp(data: bytes, *, local_tz: dt.tzinfo = dt.timezone.utc, received_at: dt.datetime | None = None) -> ScpEcg:
    """Decode an SCP-ECG record.

    `local_tz` interprets an acquisition time written without a zone (tag 34 absent);
    `received_at` is used (TimeSource.GATEWAY_RECEIPT) only when the file carries no time.
    Raises ProtocolError / UnsupportedFeatureError for anything we cannot decode exactly.
    """
    record, sections = read_sections(bytes(data))
    for required in (3, 6):
        if required not in sections:
            if required == 6 and 12 in sections:
                raise UnsupportedFeatureError("SCP-ECG long-term rhythm data (section 12) is not supported")
            raise ProtocolError(
                f"SCP-ECG section {required} ({'lead definition' if required == 3 else 'rhythm data'}) is missing"
            )
    header = _parse_section1(section_body(record, sections[1]), local_tz) if 1 in sections else _Header()
    protocol = sections[0].protocol or header.protocol
    tables = _parse_section2(section_body(record, sections[2])) if 2 in sections else None
    leads, flags = _parse_section3(section_body(record, sections[3]))
    if flags & 0x01:
        raise UnsupportedFeatureError(
            "this SCP-ECG file uses reference-beat subtraction, which this gateway does not decode "
            "(no test file exists to prove a decoder right); export the ECG without compression "
            "or as DICOM"
        )
    rhythm_enc = _parse_encoded(section_body(record, sections[6]), len(leads), 6)
    if rhythm_enc.flag and protocol < 30:
        raise UnsupportedFeatureError(
            "this SCP-ECG file uses bimodal compression (rhythm stored at reduced resolution "
            "outside the QRS complexes), which this gateway does not decode; export the ECG "
            "without compression or as DICOM"
        )
    starts, ends = {lead.start for lead in leads}, {lead.end for lead in leads}
    if len(starts) != 1 or len(ends) != 1:
        raise UnsupportedFeatureError(
            "SCP-ECG leads were recorded at different times (sequential acquisition); only "
            "simultaneously recorded leads are supported"
        )
    names = [lead_name_from_scp_code(lead.code) for lead in leads]
    require_unique(names, "SCP-ECG section 3")
    samples = _decode_leads(rhythm_enc, [lead.count for lead in leads], tables, 6)

    acquired_at, source = header.acquired_at, TimeSource.FILE
    if acquired_at is None:
        if received_at is None:
            raise ProtocolError("SCP-ECG file carries no acquisition date/time")
        acquired_at, source = received_at, TimeSource.GATEWAY_RECEIPT
    common: dict[str, Any] = dict(
        acquired_at=acquired_at,
        time_source=source,
        device=header.device,
        patient=header.patient,
        source_format="scp",
        stat=header.stat,
    )
    reference = None
    if 5 in sections:
        reference = _reference_beats(record, sections, leads, names, tables, common)
    found = _findings(record, sections, header.text_codec)
    all_samples, all_names, derived = derive_limb_leads(samples, tuple(names))
    try:
        rhythm = EcgRecording(
            samples=all_samples,
            lead_names=all_names,
            sampling_rate_hz=_rate(rhythm_enc.interval_us),
            uv_per_unit=rhythm_enc.avm_nv / 1000.0,
            derived_leads=derived,
            measurements=tuple(found.measurements),
            statements=tuple(found.statements),
            median_beats=_median(reference),
            flags=tuple(f"cart-findings-unreadable:scp-section-{sid}" for sid in found.unreadable),
            **common,
        )
    except InvalidRecordingError as exc:
        raise ProtocolError(f"SCP-ECG rhythm data: {exc}") from None

    return ScpEcg(rhythm=rhythm, reference_beats=reference, protocol_version=protocol, sections=tuple(sorted(sections)))


def _reference_beats(
    record: bytes,
    sections: dict[int, ScpSection],
    leads: list[_Lead],
    names: list[str],
    tables: list[tuple[HuffmanCode, ...]] | None,
    common: dict[str, Any],
) -> EcgRecording | None:
    enc = _parse_encoded(section_body(record, sections[5]), len(leads), 5)
    length_ms = 0
    if 4 in sections:
        body4 = section_body(record, sections[4])
        if len(body4) < 6:
            raise ProtocolError("SCP-ECG section 4 is too short")
        length_ms = _u16(body4, 0)
    if length_ms:
        count = round(length_ms * 1000 / enc.interval_us)
    elif tables is None:
        count = min(len(c) for c in enc.chunks) // 2
    else:
        return None  # Huffman-coded beats of unknown length: nothing we can decode exactly
    if count < 1 or count > MAX_SAMPLES_PER_LEAD:
        return None
    beats = _decode_leads(enc, [count] * len(leads), tables, 5)
    order = standard_order(names)
    try:
        return EcgRecording(
            samples=beats[order],
            lead_names=tuple(names[i] for i in order),
            sampling_rate_hz=_rate(enc.interval_us),
            uv_per_unit=enc.avm_nv / 1000.0,
            **common,
        )
    except InvalidRecordingError as exc:
        raise ProtocolError(f"SCP-ECG reference beats: {exc}") from None


def read_scp(
    data: bytes, *, local_tz: dt.tzinfo = dt.timezone.utc, received_at: dt.datetime | None = None
) -> EcgRecording:
    """The rhythm recording of an SCP-ECG file (see parse_scp)."""
    return parse_scp(data, local_tz=local_tz, received_at=received_at).rhythm


def looks_like_scp(data: bytes) -> bool:
    """Cheap structural check: section 0 header right after the 6-byte record header."""
    if len(data) < 32:
        return False
    return (
        _u16(data, 8) == 0
        and _u32(data, 10) >= SECTION_HEADER
        and (data[16:22] == b"SCPECG" or (_u16(data, 22) == 0 and _u32(data, 28) == 7))
    )
