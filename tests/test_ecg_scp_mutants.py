"""SCP-ECG decoder: the edges the mutation score found untested (issue 20).

Synthetic records built field by field (EN 1064 layout) around the one thing each test moves:
a truncated birth date, a cart that names its maker only by code, a lead count at the limit.
"""

from __future__ import annotations

import binascii
import datetime as dt
import struct

import numpy as np
import pytest

from devices.ecg.scp import (
    DEFAULT_TABLE,
    HuffmanCode,
    huffman_decode,
    looks_like_scp,
    parse_scp,
    read_scp,
    read_sections,
    undo_differences,
)
from devices.errors import ProtocolError, UnsupportedFeatureError
from devices.identity import TimeSource
from tests.scp_records import build_record, encode_default, lead_body, restamp, rhythm_body, table_body

# EN 1064 section 1 tag 14, byte 7: the manufacturer code table (codes 1-20).
EN1064_MANUFACTURERS = {
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


def _tag(tag: int, value: bytes) -> bytes:
    return struct.pack("<BH", tag, len(value)) + value


def _section1(*extra: bytes, when: bool = True) -> bytes:
    tags = [_tag(2, b"P-1\x00")]
    if when:
        tags += [_tag(25, struct.pack("<HBB", 2026, 11, 30)), _tag(26, bytes([8, 30, 0]))]
    return b"".join(tags) + b"".join(extra) + _tag(255, b"")


def _device(code: int, manufacturer: bytes = b"") -> bytes:
    head = bytearray(36)
    head[7] = code
    head[8:14] = b"CART\x00\x00"
    return _tag(14, bytes(head) + b"\x00\x00\x00" + manufacturer + b"\x00")


def _record(section1: bytes | None, n_leads: int = 2, n: int = 10, **kw: object) -> bytes:
    samples = np.arange(n_leads * n, dtype="<i2").reshape(n_leads, n)
    bodies = {
        3: lead_body(list(range(1, n_leads + 1)) if n_leads <= 12 else list(range(190, 190 + n_leads)), n),
        6: rhythm_body(samples, 1000, 2000, [row.tobytes() for row in samples], 0),
    }
    if section1 is not None:
        bodies[1] = section1
    return build_record(bodies, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("code", "maker"), sorted(EN1064_MANUFACTURERS.items()))
def test_a_cart_that_names_its_maker_only_by_code_gets_the_en1064_name(code: int, maker: str) -> None:
    """The maker goes into the DICOM object: a recall or a reading-centre query finds the
    device by it, so code 7 must read Marquette, not its neighbour."""
    assert read_scp(_record(_section1(_device(code)))).device.manufacturer == maker


def test_a_written_maker_name_wins_over_the_code() -> None:
    assert read_scp(_record(_section1(_device(7, b"GE Healthcare")))).device.manufacturer == "GE Healthcare"


@pytest.mark.parametrize(("code", "sex"), [(0, ""), (1, "M"), (2, "F"), (3, ""), (9, "")])
def test_sex_codes_are_read_as_en1064_defines_them(code: int, sex: str) -> None:
    """1 male, 2 female; anything else (0 not known, 9 unspecified) is left unknown, not guessed."""
    patient = read_scp(_record(_section1(_tag(8, bytes([code]))))).patient
    assert patient is not None and patient.sex == sex


def test_a_truncated_birth_date_is_dropped_not_a_crash() -> None:
    """Three bytes of a four-byte date: the patient is kept without a birth date (bad device
    bytes never raise anything but the typed error, and here they need not raise at all)."""
    patient = read_scp(_record(_section1(_tag(5, struct.pack("<HB", 1950, 3))))).patient
    assert patient is not None and patient.patient_id == "P-1" and patient.birth_date is None


def test_a_section1_without_a_device_tag_reads_with_the_device_unknown() -> None:
    recording = read_scp(_record(_section1()))
    assert recording.device.manufacturer == "" and recording.device.model == ""


def test_a_stat_flag_of_zero_is_routine_and_one_is_stat() -> None:
    """A STAT ECG jumps the queue at the reading centre: tag 24 byte 0 decides it."""
    assert read_scp(_record(_section1(_tag(24, b"\x00")))).stat is False
    assert read_scp(_record(_section1(_tag(24, b"\x01")))).stat is True


def test_sixty_four_leads_are_read_and_sixty_five_refused_as_unsupported() -> None:
    assert len(read_scp(_record(_section1(), n_leads=64)).lead_names) >= 64
    with pytest.raises(UnsupportedFeatureError, match="65 leads"):
        read_scp(_record(_section1(), n_leads=65))


def test_the_sample_count_bound_is_ten_million_per_lead() -> None:
    """At the bound the lengths are believed (and then found not to fit the data); one more is a
    bad range: either way nothing is allocated for samples that are not there."""
    bodies = {3: struct.pack("<BB", 1, 4) + struct.pack("<IIB", 1, 10_000_000, 1)}
    bodies[6] = rhythm_body(np.zeros((1, 4)), 1000, 2000, [bytes(8)], 0)
    with pytest.raises(ProtocolError, match="cannot hold"):
        read_scp(build_record({1: _section1(), **bodies}))
    bodies[3] = struct.pack("<BB", 1, 4) + struct.pack("<IIB", 1, 10_000_001, 1)
    with pytest.raises(ProtocolError, match="bad sample range"):
        read_scp(build_record({1: _section1(), **bodies}))


def test_a_record_listing_only_its_own_sections_reads_its_last_pointer() -> None:
    """Section 0's last pointer ends exactly at section 0's end: the rhythm data it points to
    must not be skipped (no "missing rhythm data" for a complete file)."""
    record = _record(_section1(), listed_only=True)
    assert parse_scp(record).sections == (0, 1, 3, 6)


def _crc(chunk: bytes) -> int:
    return binascii.crc_hqx(chunk, 0xFFFF)


def _bare_record(sec0_len: int, pointers: bytes) -> bytes:
    """A record holding only section 0 (with the given declared length and pointer bytes)."""
    rest = struct.pack("<HIBB", 0, sec0_len, 20, 20) + b"SCPECG" + pointers
    section0 = struct.pack("<H", _crc(rest)) + rest
    tail = struct.pack("<I", 6 + len(section0)) + section0
    return struct.pack("<H", _crc(tail)) + tail


def test_the_smallest_record_is_read_and_one_byte_less_is_refused() -> None:
    smallest = _bare_record(26, struct.pack("<HII", 0, 26, 7))
    assert len(smallest) == 32
    assert set(read_sections(smallest)[1]) == {0}
    with pytest.raises(ProtocolError, match="only 31 bytes"):
        read_sections(smallest[:31])


def test_a_section0_shorter_than_its_own_header_is_refused() -> None:
    record = bytearray(_bare_record(26, struct.pack("<HII", 0, 26, 7)))
    struct.pack_into("<I", record, 10, 10)  # section 0 claims 10 bytes: less than its 16-byte header
    struct.pack_into("<H", record, 6, _crc(bytes(record[8:32])))
    struct.pack_into("<H", record, 0, _crc(bytes(record[2:])))
    with pytest.raises(ProtocolError, match="section 0 claims 10 bytes"):
        read_sections(bytes(record))


def _bodies(n_leads: int = 2, n: int = 10, avm: int = 1000, interval: int = 2000, diff: int = 0) -> dict[int, bytes]:
    samples = np.arange(n_leads * n, dtype="<i2").reshape(n_leads, n)
    return {
        1: _section1(),
        3: lead_body(list(range(1, n_leads + 1)), n),
        6: rhythm_body(samples, avm, interval, [row.tobytes() for row in samples], diff),
    }


def _with(**changes: bytes | None) -> bytes:
    bodies: dict[int, bytes] = _bodies()
    for key, body in changes.items():
        sid = int(key.removeprefix("s"))
        if body is None:
            del bodies[sid]
        else:
            bodies[sid] = body
    return build_record(bodies)


# Each refusal keeps a wrong ECG out of the reading centre: without it the bytes would still
# decode, into a plausible-looking but false tracing (or a crash that loses the file's news).
REFUSALS = {
    "a zero amplitude multiplier would make every lead a flat line": (
        _with(s6=_bodies(avm=0)[6]),
        "amplitude multiplier is 0",
    ),
    "a zero sample interval has no sampling rate": (_with(s6=_bodies(interval=0)[6]), "sample interval is 0"),
    "an unknown difference encoding would integrate the samples wrongly": (
        _with(s6=_bodies(diff=3)[6]),
        "unknown difference encoding 3",
    ),
    "rhythm data too short for its lead table": (
        _with(s6=struct.pack("<HHBB", 1000, 2000, 0, 0)),
        "too short for 2 leads",
    ),
    "lead sizes beyond the section": (
        _with(s6=struct.pack("<HHBBHH", 1000, 2000, 0, 0, 20, 9999) + bytes(20)),
        "exceeds the section",
    ),
    "an empty lead definition": (_with(s3=b""), "lead definition\\) is empty"),
    "a lead definition with no leads": (_with(s3=b"\x00\x04"), "defines no leads"),
    "more leads declared than defined": (
        _with(s3=lead_body([1, 2], 10)[:-9].replace(b"\x02", b"\x03", 1)),
        "declares 3 leads but holds 1",
    ),
    "an empty Huffman section": (_with(s2=b""), "Huffman tables\\) is empty"),
    "zero Huffman tables": (_with(s2=struct.pack("<H", 0)), "declares 0 Huffman tables"),
    "257 Huffman tables": (_with(s2=struct.pack("<H", 257)), "declares 257 Huffman tables"),
    "a Huffman section ending before its table": (_with(s2=struct.pack("<H", 1)), "ends inside Huffman table 1"),
    "a Huffman table without codes": (_with(s2=struct.pack("<HH", 1, 0)), "table 1 claims 0 codes"),
    "a section 1 tag running past the section": (_with(s1=_tag(2, b"P-1\x00")[:3] + b"P"), "tag 2 claims 4 bytes"),
    "no rhythm data": (_with(s6=None), "section 6 \\(rhythm data\\) is missing"),
    "leads whose data is 0 bytes": (
        _with(s6=struct.pack("<HHBBHH", 1000, 2000, 0, 0, 0, 0)),
        "lead 1: 0 bytes cannot hold 10 samples",
    ),
    "a Huffman code of 0 bits": (
        _with(s2=table_body([[HuffmanCode(0, 0, False, 0, 0)]])),
        "bad code lengths 0/0",
    ),
    "a table switch code followed by value bits": (
        _with(s2=table_body([[HuffmanCode(1, 3, True, 1, 0), HuffmanCode(1, 1, False, 0, 1)]])),
        "a table switch code carries extra bits",
    ),
    "a Huffman table giving one code two meanings": (
        _with(s2=table_body([[HuffmanCode(1, 1, False, 0, 0), HuffmanCode(1, 1, False, 5, 0)]])),
        "table 1 repeats a code",
    ),
    "a switch to a Huffman table that is not there": (
        _with(s2=table_body([[HuffmanCode(1, 1, True, 2, 0), HuffmanCode(1, 1, False, 0, 1)]])),
        "switch to missing Huffman table 2",
    ),
    "a rhythm interval of 1 us (1 MHz) is misread bytes, not an ECG": (
        _with(s6=_bodies(interval=1)[6]),
        "SCP-ECG rhythm data: bad sampling rate",
    ),
    "two leads with the same lead code": (
        _with(s3=lead_body([1, 1], 10)),
        "lead I appears twice",
    ),
    "no lead definition": (_with(s3=None), "section 3 \\(lead definition\\) is missing"),
    # boundaries found by the full mutation run (issue 20)
    "a 1-byte Huffman section": (_with(s2=b"\x01"), "Huffman tables\\) is empty"),
    "256 Huffman tables are allowed, then the first must be there": (
        _with(s2=struct.pack("<H", 256)),
        "ends inside Huffman table 1",
    ),
    "a Huffman table with only one byte of its code count": (
        _with(s2=struct.pack("<HB", 1, 1)),
        "ends inside Huffman table 1",
    ),
    "a Huffman table one byte short of its codes": (
        _with(s2=table_body([[HuffmanCode(1, 1, False, 0, 0)]])[:-1]),
        "table 1 claims 1 codes",
    ),
    "a Huffman prefix of 33 bits": (
        _with(s2=table_body([[HuffmanCode(33, 33, False, 0, 0)]])),
        "bad code lengths 33/33",
    ),
    "33 value bits after a Huffman prefix": (
        _with(s2=table_body([[HuffmanCode(1, 34, False, 0, 0)]])),
        "bad code lengths 1/34",
    ),
    "a switch to Huffman table 0": (
        _with(s2=table_body([[HuffmanCode(1, 1, True, 0, 0), HuffmanCode(1, 1, False, 0, 1)]])),
        "switch to missing Huffman table 0",
    ),
    "a 1-byte lead definition": (_with(s3=b"\x01"), "lead definition\\) is empty"),
    "a lead definition one byte short": (_with(s3=lead_body([1, 2], 10)[:-1]), "declares 2 leads but holds 1"),
    "rhythm data one byte short of its lead table": (
        _with(s6=struct.pack("<HHBBHB", 1000, 2000, 0, 0, 0, 0)),
        "SCP-ECG section 6 is too short for 2 leads",
    ),
    "a rhythm refusal names section 6": (_with(s6=_bodies(avm=0)[6]), "SCP-ECG section 6: amplitude multiplier"),
    "a lead decoding refusal names section 6": (
        _with(s6=struct.pack("<HHBBHH", 1000, 2000, 0, 0, 0, 0)),
        "SCP-ECG section 6 lead 1: 0 bytes",
    ),
    "uncompressed lead data one byte short": (
        _with(s6=struct.pack("<HHBBHH", 1000, 2000, 0, 0, 19, 19) + bytes(38)),
        "section 6 lead 1: 19 bytes cannot hold 10 samples",
    ),
    "Huffman data of the second lead ending early": (
        _with(s2=struct.pack("<H", 19999), s6=struct.pack("<HHBBHH", 1000, 2000, 0, 0, 2, 2) + bytes(2) + b"\xff\xff"),
        "section 6 lead 2: Huffman data ends",
    ),
    "a lead starting at sample 0 (samples are numbered from 1)": (
        _with(s3=bytes([1, 4]) + struct.pack("<IIB", 0, 10, 1)),
        "bad sample range 0..10",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_malformed_sections_are_refused_with_their_reason(case: str) -> None:
    record, reason = REFUSALS[case]
    with pytest.raises(ProtocolError, match=reason):
        read_scp(record)


def test_long_term_rhythm_data_is_refused_as_unsupported_not_as_missing() -> None:
    bodies = _bodies()
    bodies[12] = bodies.pop(6)
    with pytest.raises(UnsupportedFeatureError, match="section 12"):
        read_scp(build_record(bodies))


@pytest.mark.parametrize(("interval_us", "rate"), [(2000, 500.0), (1667, 600.0), (3000, 1_000_000 / 3000)])
def test_the_rate_is_the_whole_rate_the_interval_was_rounded_from(interval_us: int, rate: float) -> None:
    """1667 µs is a 600 Hz cart (the field holds whole µs), not 599.88 Hz; 3000 µs stays 333.3 Hz."""
    assert read_scp(build_record(_bodies(interval=interval_us))).sampling_rate_hz == rate


def test_scp_files_are_recognised_by_their_structure_and_other_bytes_are_not() -> None:
    """Format detection picks the decoder: a DICOM or aECG file taken for SCP-ECG would be
    refused as damaged instead of read."""
    record = build_record(_bodies())
    assert looks_like_scp(record)
    assert not looks_like_scp(record[:31])
    assert not looks_like_scp(b"\x00" * 128 + b"DICM" + bytes(200))
    no_marker = bytearray(record)
    no_marker[16:22] = b"XXXXXX"  # without "SCPECG" the section-0 shape must decide: pointer to section 0
    assert looks_like_scp(bytes(no_marker)) is (struct.unpack_from("<H", record, 22)[0] == 0)
    broken = bytearray(record)
    struct.pack_into("<I", broken, 10, 8)  # section 0 shorter than a section header
    assert not looks_like_scp(bytes(broken))


def test_sample_counts_that_the_bytes_cannot_hold_are_refused_before_decoding() -> None:
    with pytest.raises(ProtocolError, match="hold fewer than 5 samples"):
        huffman_decode(bytes(8), 5, None)
    with pytest.raises(ProtocolError, match="cannot hold 17 samples"):
        huffman_decode(bytes(2), 17, [DEFAULT_TABLE])
    assert huffman_decode(bytes(2), 16, [DEFAULT_TABLE]).tolist() == [0] * 16  # 16 one-bit zeros


# EN 1064 default Huffman table, written out as the standard lists it: the bit string sent, the
# extra bits that follow it, the value (for an escape: the extra bits are the sample itself).
EN1064_DEFAULT_HUFFMAN = [
    ("0", 0, 0),
    *((("1" * n + "0" + sign), 0, n if sign == "0" else -n) for n in range(1, 9) for sign in "01"),
    ("1111111110", 8, 0),
    ("1111111111", 16, 0),
]


def test_the_default_huffman_table_is_the_en1064_table_code_for_code() -> None:
    """Most carts compress with this table. One wrong code and the decoder loses step at the first
    sample that uses it: every later sample of the lead is read from the wrong bits."""
    as_listed = sorted(
        (format(c.code, f"0{c.prefix_bits}b"), c.total_bits - c.prefix_bits, c.value, c.switch) for c in DEFAULT_TABLE
    )
    assert as_listed == sorted((bits, extra, value, False) for bits, extra, value in EN1064_DEFAULT_HUFFMAN)


def test_the_default_table_read_as_a_table_decodes_like_the_fast_default_decoder() -> None:
    """The fast decoder for the default table does not read DEFAULT_TABLE; the table-driven decoder
    does. Every kind of code (0, +-1..8, 8- and 16-bit escapes) must come out the same from both,
    and be the sample the cart coded: a mismatch is a lead drawn in the wrong shape."""
    values = np.array([0, 1, -1, 2, -2, 5, -5, 8, -8, 9, -9, 127, -128, 128, -129, 32767, -32768, 0] * 3)
    chunk = encode_default(values)
    as_table = tuple(code for code in DEFAULT_TABLE)  # a copy: not the default table by identity
    assert as_table is not DEFAULT_TABLE
    assert huffman_decode(chunk, len(values), [as_table]).tolist() == values.tolist()
    assert huffman_decode(chunk, len(values), [DEFAULT_TABLE]).tolist() == values.tolist()


# -- third run: what the mutants still got past ---------------------------------------------------


def _pointer(record: bytes, sid: int) -> int:
    """Offset of section `sid`'s pointer in section 0 (build_record lists sections 1-11 in order)."""
    return 22 + 10 * sid


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("index 0", "section 6 \\(\\d+ bytes at byte 0\\) lies outside"),
        ("header names another section", "section 6: its header does not match"),
        ("listed twice", "section 6 is listed twice"),
    ],
)
def test_a_section_table_that_lies_is_refused(damage: str, reason: str) -> None:
    """Section 0 says where each section is: a pointer that lies would hand the rhythm decoder
    another section's bytes (or the same lead data twice) and draw a false tracing."""
    buf = bytearray(build_record(_bodies()))
    at = _pointer(bytes(buf), 6)
    _sid, length, index = struct.unpack_from("<HII", buf, at)
    if damage == "index 0":
        struct.pack_into("<I", buf, at + 6, 0)
    elif damage == "header names another section":
        struct.pack_into("<H", buf, index - 1 + 2, 7)
    else:
        struct.pack_into("<HII", buf, _pointer(bytes(buf), 9), 6, length, index)
    with pytest.raises(ProtocolError, match=reason):
        read_scp(restamp(bytes(buf)))


def test_a_section1_without_its_terminator_tag_is_read_to_its_end() -> None:
    """Tag 255 ends section 1, but a cart that leaves it out still names the patient: the ECG
    must stay on that patient, not become unassigned or unreadable."""
    bodies = _bodies()
    bodies[1] = _tag(2, b"P-77\x00") + _tag(25, struct.pack("<HBB", 2026, 11, 30)) + _tag(26, bytes([8, 30, 0]))
    recording = read_scp(build_record(bodies))
    assert recording.patient is not None and recording.patient.patient_id == "P-77"
    assert recording.acquired_at == dt.datetime(2026, 11, 30, 8, 30, tzinfo=dt.timezone.utc)


def test_a_date_without_a_time_of_day_is_not_an_acquisition_time() -> None:
    """Midnight is not a time the cart gave: with the date alone the gateway's receipt time is
    used and said to be so (and the file is not refused)."""
    bodies = _bodies()
    bodies[1] = _tag(2, b"P-1\x00") + _tag(25, struct.pack("<HBB", 2026, 11, 30)) + _tag(255, b"")
    received = dt.datetime(2026, 12, 1, 15, 0, tzinfo=dt.timezone.utc)
    recording = read_scp(build_record(bodies), received_at=received)
    assert recording.acquired_at == received and recording.time_source is TimeSource.GATEWAY_RECEIPT


def test_a_custom_table_of_two_bit_codes_is_read_from_the_first_bit() -> None:
    """A fixed-length code is a valid Huffman table: decoding must start at bit 0, or every
    sample is read from the wrong bit pair."""
    table = tuple(HuffmanCode(2, 2, False, v, v) for v in range(4))  # 00 -> 0, 01 -> 1, 10 -> 2, 11 -> 3
    assert huffman_decode(bytes([0b01101100, 0b11100100]), 8, [table]).tolist() == [1, 2, 3, 0, 3, 2, 1, 0]


def test_custom_huffman_data_that_stops_inside_a_code_or_its_value_bits_is_refused() -> None:
    short_code = (HuffmanCode(2, 2, False, 0, 0b00), HuffmanCode(2, 2, False, 1, 0b01))
    with pytest.raises(ProtocolError, match="ends after 4 of 5 samples"):
        huffman_decode(b"\x00", 5, [short_code])
    value_bits = (HuffmanCode(1, 9, False, 0, 0b0),)  # "0" then an 8-bit value
    with pytest.raises(ProtocolError, match="ends after 0 of 1 samples"):
        huffman_decode(b"\x00", 1, [value_bits])


def test_a_table_switch_of_zero_bits_is_refused_not_an_endless_loop() -> None:
    """Section 2 refuses such a code, but huffman_decode takes tables from any caller: a switch
    that consumes no bits would spin forever and hang the ECG intake."""
    spin = (HuffmanCode(0, 0, True, 1, 0),)
    with pytest.raises(ProtocolError, match="endless Huffman table switching"):
        huffman_decode(b"\x00", 1, [spin])


@pytest.mark.parametrize("sid", [7, 10])
def test_a_findings_section_shorter_than_its_header_is_flagged_unreadable(sid: int) -> None:
    """Not the same as "the cart found nothing": the reader is told the cart's findings could
    not be read (a flag in the object), and the waveform still goes."""
    bodies = _bodies()
    bodies[sid] = b"\x00\x00"
    recording = read_scp(build_record(bodies))
    assert f"cart-findings-unreadable:scp-section-{sid}" in recording.flags
    assert recording.measurements == ()


def test_wave_boundaries_in_the_wrong_order_give_no_duration_not_a_crash() -> None:
    """P offset before P onset: that duration is unknown and left out; the others are kept."""
    bodies = _bodies()
    block = struct.pack("<HHHHHhhh", 100, 90, 260, 360, 700, 999, 999, 999)
    bodies[7] = struct.pack("<BBHH", 1, 0, 800, 800) + block
    kinds = {m.kind: m.value for m in read_scp(build_record(bodies)).measurements}
    assert kinds == {
        "rr-interval": 800,
        "pp-interval": 800,
        "pr-interval": 160,
        "qrs-duration": 100,
        "qt-interval": 440,
    }


def test_uncompressed_reference_beats_without_a_section4_are_as_long_as_their_bytes() -> None:
    """Without section 4 the beat length of 16-bit samples is the bytes / 2; Huffman-coded beats of
    unknown length cannot be cut exactly and are left out, never guessed."""
    beats = np.array([[1, 2, 3, 4, 5], [-5, -4, -3, -2, -1]], dtype="<i2")
    bodies = _bodies()
    bodies[5] = rhythm_body(beats, 1000, 2000, [row.tobytes() for row in beats], 0)
    reference = parse_scp(build_record(bodies)).reference_beats
    assert reference is not None and reference.samples.tolist() == beats.tolist()
    bodies[2] = struct.pack("<H", 19999)
    bodies[6] = rhythm_body(np.zeros((2, 10)), 1000, 2000, [bytes(2), bytes(2)], 0)  # 10 one-bit zeros a lead
    bodies[5] = rhythm_body(beats, 1000, 2000, [bytes(2), bytes(2)], 0)
    assert parse_scp(build_record(bodies)).reference_beats is None


def test_reference_beats_that_are_not_an_ecg_are_refused() -> None:
    beats = np.array([[1, 2, 3, 4, 5], [-5, -4, -3, -2, -1]], dtype="<i2")
    bodies = _bodies()
    bodies[5] = rhythm_body(beats, 1000, 1, [row.tobytes() for row in beats], 0)  # 1 us: 1 MHz
    with pytest.raises(ProtocolError, match="SCP-ECG reference beats: bad sampling rate"):
        parse_scp(build_record(bodies))
    bodies[5] = rhythm_body(beats, 1000, 2000, [row.tobytes() for row in beats], 0)
    bodies[4] = b"\x00\x00"
    with pytest.raises(ProtocolError, match="section 4 is too short"):
        parse_scp(build_record(bodies))


def test_default_coded_data_cut_inside_its_last_sample_is_refused() -> None:
    """A file cut inside its last code: that sample would be made up from zero bits."""
    with pytest.raises(ProtocolError, match="ends after 0 of 1 samples"):
        huffman_decode(b"\xff", 1, [DEFAULT_TABLE])  # a 16-bit escape needs 26 bits, 8 are there
    with pytest.raises(ProtocolError, match="ends after 5 of 7 samples"):
        huffman_decode(b"\x80", 7, [DEFAULT_TABLE])  # "100" then five "0": 6 samples, exactly 8 bits


@pytest.mark.parametrize(("code", "method"), [(1, "bazett"), (2, "hodges"), (3, "")])
def test_the_qtc_formula_code_names_the_correction_the_cart_used(code: int, method: str) -> None:
    """EN 1064 section 7: formula 1 is Bazett, 2 Hodges; the reader compares QTc values only
    under the same correction. An unknown code names none."""
    bodies = _bodies()
    bodies[7] = struct.pack("<BBHHH", 0, 0, 800, 800, 0) + struct.pack("<HHHB", 75, 75, 420, code)
    qtc = [m for m in read_scp(build_record(bodies)).measurements if m.kind == "qtc-interval"]
    assert [(m.value, m.method) for m in qtc] == [(420, method)]


def _findings_of(**sections: bytes) -> tuple[dict[str, float], tuple[str, ...]]:
    bodies = _bodies()
    bodies.update({int(key.removeprefix("s")): body for key, body in sections.items()})
    recording = read_scp(build_record(bodies))
    return {m.kind + (f"@{m.lead}" if m.lead else ""): m.value for m in recording.measurements}, recording.flags


def test_section10_values_are_read_from_their_en1064_slots() -> None:
    """Per-lead values come in a fixed order (P, PR, QRS, QT, Q/R/S durations, ..., Q/R/S
    amplitudes, ..., J): an R amplitude read from the S slot would turn voltage criteria for
    hypertrophy upside down. An amplitude of a wave with no duration is no amplitude."""
    values = [90, 160, 100, 400, 20, 40, 30, 0, 0, -150, 1200, -400, 0, 0, 50]
    block = struct.pack("<HH", 1, 2 * len(values)) + struct.pack(f"<{len(values)}h", *values)
    found, _flags = _findings_of(s10=struct.pack("<HH", 1, 0) + block)
    assert found == {
        "lead-p-duration@I": 90,
        "lead-pr-interval@I": 160,
        "lead-qrs-duration@I": 100,
        "lead-qt-interval@I": 400,
        "lead-q-amplitude@I": -150,
        "lead-r-amplitude@I": 1200,
        "lead-s-amplitude@I": -400,
        "lead-j-amplitude@I": 50,
    }
    no_q = list(values)
    no_q[4] = 0  # no Q wave: its amplitude slot means nothing
    block = struct.pack("<HH", 1, 2 * len(no_q)) + struct.pack(f"<{len(no_q)}h", *no_q)
    found, _flags = _findings_of(s10=struct.pack("<HH", 1, 0) + block)
    assert "lead-q-amplitude@I" not in found and found["lead-r-amplitude@I"] == 1200


def test_section7_of_just_its_header_gives_the_rr_and_pp_intervals() -> None:
    found, flags = _findings_of(s7=struct.pack("<BBHH", 0, 0, 800, 810))
    assert found == {"rr-interval": 800, "pp-interval": 810} and flags == ()
    for cut in (b"", b"\x00"):  # shorter than the 6-byte header: unreadable, said so, no crash
        found, flags = _findings_of(s7=cut)
        assert found == {} and flags == ("cart-findings-unreadable:scp-section-7",)


def test_section7_measurements_after_pacemaker_spikes_and_qrs_types_are_found() -> None:
    """Pacemaker spikes (10 bytes each) and QRS types (1 byte each) come before the heart rate and
    QTc: skipping them wrongly reads the heart rate from a spike's bytes."""
    spike = struct.pack("<HhHBBH", 120, 800, 0, 0, 0, 0)
    body = struct.pack("<BBHH", 0, 1, 800, 800) + spike + struct.pack("<HBB", 2, 0, 1)
    body += struct.pack("<HHHB", 75, 76, 420, 1)
    found, flags = _findings_of(s7=body)
    assert found == {"rr-interval": 800, "pp-interval": 800, "heart-rate": 75, "qtc-interval": 420}
    assert flags == ()


@pytest.mark.parametrize("sid", [8, 11])
def test_a_statement_section_of_just_its_header_holds_no_statements_and_is_not_unreadable(sid: int) -> None:
    _found, flags = _findings_of(**{f"s{sid}": bytes(9)})
    assert flags == ()


def test_section10_blocks_whose_length_counts_their_header_are_read_too() -> None:
    values = [90, 160, 100, 400]
    block = struct.pack("<HH", 1, 4 + 2 * len(values)) + struct.pack(f"<{len(values)}h", *values)
    found, flags = _findings_of(s10=struct.pack("<HH", 1, 0) + block)
    assert found["lead-qt-interval@I"] == 400 and flags == ()
    found, flags = _findings_of(s10=struct.pack("<HH", 0, 0))  # just the header: no leads, readable
    assert found == {} and flags == ()


def test_empty_reference_beats_are_left_out_and_the_rhythm_still_read() -> None:
    bodies = _bodies()
    bodies[5] = rhythm_body(np.zeros((2, 0)), 1000, 2000, [b"", b""], 0)
    ecg = parse_scp(build_record(bodies))
    assert ecg.reference_beats is None and ecg.rhythm.n_samples == 10


def test_the_smallest_record_is_recognised_as_scp() -> None:
    assert looks_like_scp(_bare_record(26, struct.pack("<HII", 0, 26, 7)))


def test_a_section0_of_exactly_its_header_is_read() -> None:
    """Section 0 may hold no pointers at all (16 bytes, its header): the record is read, not
    refused as too short (the boundary of `sec0_len < 16`)."""
    rest = struct.pack("<HIBB", 0, 16, 20, 20) + b"SCPECG"
    section0 = struct.pack("<H", _crc(rest)) + rest
    tail = struct.pack("<I", 6 + len(section0) + 10) + section0 + bytes(10)  # padded to the 32-byte minimum
    assert set(read_sections(struct.pack("<H", _crc(tail)) + tail)[1]) == {0}


def test_a_device_tag_of_exactly_its_fixed_part_names_the_cart() -> None:
    """Tag 14 may end right after its 36 fixed bytes (no strings): the cart's model and maker code
    are still read, so the ECG keeps its device (the boundary of `len(device) >= 36`)."""
    head = bytearray(36)
    head[7] = 7
    head[8:14] = b"CART\x00\x00"
    device = read_scp(_record(_section1(_tag(14, bytes(head))))).device
    assert (device.model, device.manufacturer) == ("CART", "Marquette Electronics")


def test_the_shortest_record_followed_by_padding_is_read_by_its_own_length() -> None:
    """A 22-byte record (CRC, length, a section 0 of only its header) padded to the 32-byte file
    minimum is read by the length it declares, not refused: carts pad files to a block size, and
    the padding is not ours to read (the boundary of `record_len < 22`; the file-size minimum
    bounds the file, not the record)."""
    record = _bare_record(16, b"")
    assert len(record) == 22
    data, sections = read_sections(record + bytes(10))
    assert (data, set(sections)) == (record, {0})


# ---------------------------------------------------------------- survivors of the full run (issue 20)

RECEIVED = dt.datetime(2026, 12, 1, 15, 0, tzinfo=dt.timezone.utc)


def _acquired(*tags: bytes, clock: bytes = bytes([8, 30, 0])) -> dt.datetime | None:
    """The acquisition time read from a section 1 dated 2026-11-30 with this clock and extra tags;
    the gateway's receipt time when the file's time is refused."""
    section1 = _tag(2, b"P-1\x00") + _tag(25, struct.pack("<HBB", 2026, 11, 30)) + _tag(26, clock) + b"".join(tags)
    recording = read_scp(_record(section1 + _tag(255, b"")), received_at=RECEIVED)
    if recording.time_source is TimeSource.GATEWAY_RECEIPT:
        return None
    return recording.acquired_at


def test_the_last_second_of_the_day_is_a_time_and_24_or_60_is_not() -> None:
    """23:59:59 is read; an hour of 24 or a minute or second of 60 is a broken clock: the ECG gets
    the gateway's receipt time (said so), never a crash or a time an hour off."""
    assert _acquired(clock=bytes([23, 59, 59])) == dt.datetime(2026, 11, 30, 23, 59, 59, tzinfo=dt.timezone.utc)
    assert _acquired(clock=bytes([8, 30, 45])) == dt.datetime(2026, 11, 30, 8, 30, 45, tzinfo=dt.timezone.utc)
    for broken in ([24, 0, 0], [0, 60, 0], [0, 0, 60], [8, 30]):
        assert _acquired(clock=bytes(broken)) is None, broken


@pytest.mark.parametrize(
    ("zone", "offset_min"),
    [
        (struct.pack("<h", 480), 480),  # exactly the 2 offset bytes: China Standard Time
        (struct.pack("<hH", 840, 0), 840),  # +14:00 (Kiribati), the largest real offset
        (struct.pack("<hH", -720, 0), -720),
        (struct.pack("<hH", 841, 0), None),  # beyond any real zone: the local zone is used
        (struct.pack("<hH", 0x7FFF, 0), None),  # "not specified"
        (b"\x08", None),  # one byte is no offset
    ],
)
def test_the_zone_tag_gives_the_offset_only_when_it_is_a_real_one(zone: bytes, offset_min: int | None) -> None:
    """Tag 34: a wrong zone moves the ECG hours away from when it was taken (and a ward's ECG
    out of order with the other measurements of that visit)."""
    acquired = _acquired(_tag(34, zone))
    minutes = offset_min if offset_min is not None else 0  # the local zone here is UTC
    assert acquired == dt.datetime(2026, 11, 30, 8, 30, tzinfo=dt.timezone(dt.timedelta(minutes=minutes)))
    assert acquired is not None and acquired.utcoffset() == dt.timedelta(minutes=minutes)


def test_the_device_tag_gives_serial_and_software_after_the_revision_string() -> None:
    """Tag 14 after its 36 fixed bytes: revision (length in byte 35), then serial, system software,
    SCP software and maker, NUL-terminated. A serial off by one field files the ECG under
    another cart (the device audit trail and recalls follow it)."""
    head = bytearray(36)
    head[7] = 7
    head[8:14] = b"CART\x00\x00"
    head[35] = 3
    device_tag = _tag(14, bytes(head) + b"R01" + b"SN-42\x00" + b"SW 9.1\x00" + b"IMPL\x00" + b"Maker\x00")
    device = read_scp(_record(_section1(device_tag))).device
    assert (device.serial, device.software_version, device.manufacturer, device.model) == (
        "SN-42",
        "SW 9.1",
        "Maker",
        "CART",
    )


def test_a_device_tag_shorter_than_its_fixed_part_is_ignored_not_a_crash() -> None:
    recording = read_scp(_record(_section1(_tag(14, bytes(35)))))
    assert recording.device.manufacturer == "" and recording.patient is not None


def test_a_patient_with_first_and_last_name_is_named_last_caret_first() -> None:
    """Tags 0 (last) and 1 (first): "Wang^Fang"; the first name lost would make two patients alike."""
    section1 = _tag(0, b"Wang\x00") + _tag(1, b"Fang\x00")
    patient = read_scp(_record(_section1(section1))).patient
    assert patient is not None and patient.name == "Wang^Fang"


def test_sex_and_stat_are_read_from_the_first_byte_of_their_tags() -> None:
    """A cart writing a wider tag still means its first byte: female stays female, STAT stays urgent."""
    recording = read_scp(_record(_section1(_tag(8, bytes([2, 1])), _tag(24, bytes([1, 0])))))
    assert recording.patient is not None and recording.patient.sex == "F"
    assert recording.stat


def test_a_section1_ending_in_two_stray_bytes_is_read() -> None:
    """Fewer than a tag header's 3 bytes at the end are padding, not a tag claiming bytes beyond."""
    body = _tag(2, b"P-1\x00") + _tag(25, struct.pack("<HBB", 2026, 11, 30)) + _tag(26, bytes([8, 30, 0]))
    patient = read_scp(_record(body + b"\x07\x09")).patient
    assert patient is not None and patient.patient_id == "P-1"


def test_tags_after_the_255_terminator_are_not_read_and_tag_254_does_not_end_the_list() -> None:
    """Bytes after the terminator (here a tag claiming more than the section) are not ours to
    read; tag 254 is some other tag and the patient's ID after it is still read."""
    body = _tag(254, b"x") + _tag(2, b"P-1\x00") + _tag(25, struct.pack("<HBB", 2026, 11, 30)) + _tag(26, bytes(3))
    patient = read_scp(_record(body + _tag(255, b"") + struct.pack("<BH", 3, 500))).patient
    assert patient is not None and patient.patient_id == "P-1"


def test_the_protocol_version_is_section0s_protocol_byte_not_its_version_byte() -> None:
    """Byte 15 of section 0 is the protocol version (which decides how compressed rhythm data is
    read), byte 14 the section's own version."""
    data = bytearray(_record(_section1()))
    data[14] = 10
    assert parse_scp(restamp(bytes(data))).protocol_version == 20


def test_a_damaged_section0_is_named_as_section_0() -> None:
    """The doctor is told which part of the file is damaged: section 0, the table of contents."""
    data = bytearray(_record(_section1()))
    data[16] ^= 0xFF  # in section 0's reserved bytes: its CRC no longer matches
    data[0:2] = struct.pack("<H", _crc(bytes(data[2:])))
    with pytest.raises(ProtocolError, match="section 0 is damaged"):
        read_sections(bytes(data))


def test_a_section0_ending_in_a_partial_pointer_ignores_it() -> None:
    """9 stray bytes after section 0's pointers are not a 10-byte pointer: reading one would take
    its last byte from beyond section 0 and refuse a readable file."""
    record = _bare_record(16 + 9, struct.pack("<HIBBB", 1, 40, 1, 0, 0))
    assert set(read_sections(record + bytes(10))[1]) == {0}


def test_huffman_codes_of_the_widest_allowed_lengths_are_accepted() -> None:
    """A 32-bit prefix, and 32 value bits after a prefix, are within EN 1064: a table holding them
    (unused by this rhythm) is read, not refused, so the cart's ECG still reaches the reader."""
    table = [HuffmanCode(1, 1, False, 0, 0), HuffmanCode(32, 32, False, 1, 1 << 31), HuffmanCode(2, 34, False, 0, 0b10)]
    zeros = rhythm_body(np.zeros((2, 10)), 1000, 2000, [b"\x00\x00"] * 2, 0)
    recording = read_scp(_with(s2=table_body([table]), s6=zeros))
    assert recording.samples.shape[1] == 10 and not recording.samples.any()


def test_only_the_prefix_bits_of_a_stored_huffman_code_are_the_code() -> None:
    """The 4 stored bytes of a code hold its prefix bits in the low bits; bits above them are not
    part of the code: a cart leaving them set must decode to the same samples."""
    body = table_body([[HuffmanCode(1, 1, False, 0, 0), HuffmanCode(1, 1, False, 1, 1)]])
    high = bytearray(body)
    high[2 + 2 + 5 + 3] = 0x80  # the first code's stored value: bit 31 set above its 1-bit prefix
    rhythm = rhythm_body(np.zeros((2, 10)), 1000, 2000, [b"\x55\x01"] * 2, 0)
    plain = read_scp(_with(s2=body, s6=rhythm)).samples
    assert plain.any() and np.array_equal(read_scp(_with(s2=bytes(high), s6=rhythm)).samples, plain)


def test_a_lead_of_a_single_sample_is_a_valid_range() -> None:
    """Start == end is one sample, not an empty lead."""
    assert read_scp(_record(_section1(), n=1)).samples.shape[1] == 1


def test_scp_is_recognised_by_its_scpecg_mark_and_a_section0_of_exactly_its_header() -> None:
    """The import picks the decoder by this check: a real SCP file missed would be refused as an
    unknown format, a non-SCP file taken for one gets a misleading refusal."""
    assert looks_like_scp(_bare_record(16, b"") + bytes(10))
    not_scp = bytearray(_bare_record(16, b"") + bytes(10))
    not_scp[16:22] = b"NOTSCP"
    assert not looks_like_scp(bytes(not_scp))


def test_bimodal_compression_is_refused_up_to_protocol_29() -> None:
    """Before protocol 3.0 the flag means bimodal compression (reduced resolution outside the QRS):
    decoding it as plain data would halve or quarter amplitudes between beats."""
    bodies = _bodies()
    samples = np.arange(20, dtype="<i2").reshape(2, 10)
    bodies[6] = rhythm_body(samples, 1000, 2000, [row.tobytes() for row in samples], 0, bimodal=1)
    with pytest.raises(UnsupportedFeatureError, match="bimodal"):
        read_scp(build_record(bodies, protocol=29))


def test_second_differences_of_three_values_are_integrated() -> None:
    """x2 = d2 + 2 x1 - x0: with exactly three samples the third is still a difference, not a sample."""
    assert undo_differences(np.array([1, 3, 0]), 2).tolist() == [1, 3, 5]
    assert undo_differences(np.array([1, 3]), 2).tolist() == [1, 3]


def _custom_switching(stream: bytes, count: int) -> bytes:
    """A rhythm of one custom-coded lead where "1" switches table and "0" is the value 0."""
    tables = table_body(
        [
            [HuffmanCode(1, 1, True, 2, 1), HuffmanCode(1, 1, False, 0, 0)],
            [HuffmanCode(1, 1, True, 1, 1), HuffmanCode(1, 1, False, 0, 0)],
        ]
    )
    bodies = _bodies(n_leads=1, n=count)
    bodies[2] = tables
    bodies[6] = rhythm_body(np.zeros((1, count)), 1000, 2000, [stream], 0)
    return build_record(bodies)


def test_many_table_switches_in_a_row_are_data_not_an_endless_loop() -> None:
    """Seven switches then a value: switches consume bits, so a stream mostly of switches is valid;
    one that ends after its switches is short, not "endless"."""
    assert read_scp(_custom_switching(b"\xfe", 1)).samples.shape[1] == 1
    with pytest.raises(ProtocolError, match="ends after 0 of 1 samples"):
        read_scp(_custom_switching(b"\xff", 1))


def _section7(*, p_on: int = 100, p_off: int = 200, qrs_on: int = 260, qrs_off: int = 350, t_off: int = 700) -> bytes:
    block = struct.pack("<5H3h", p_on, p_off, qrs_on, qrs_off, t_off, 60, 45, 30)
    return struct.pack("<BBHH", 1, 0, 800, 810) + block


def test_section7_with_an_undefined_p_onset_gives_no_p_measurements_but_keeps_qrs_and_qt() -> None:
    """An undefined boundary (29999) leaves out only the intervals that start or end at it."""
    found, flags = _findings_of(s7=_section7(p_on=29999))
    assert "p-duration" not in found and "pr-interval" not in found
    assert (found["qrs-duration"], found["qt-interval"], flags) == (90, 440, ())


def test_section7_block_one_byte_short_is_unreadable_and_a_short_tail_is_no_heart_rate() -> None:
    """A measurement block cut short is flagged unreadable (no half-read QRS axis); additional
    measurements one byte short of their 7 are absent, not read from beyond the section."""
    found, flags = _findings_of(s7=_section7()[:-1])
    assert found == {} and flags == ("cart-findings-unreadable:scp-section-7",)
    tail = struct.pack("<H", 0) + struct.pack("<HHH", 75, 76, 420)  # no QRS types; 6 of 7 bytes
    found, flags = _findings_of(s7=_section7() + tail)
    assert "heart-rate" not in found and found["qt-interval"] == 440 and flags == ()
    found, flags = _findings_of(s7=_section7() + tail + b"\x01")
    assert (found["heart-rate"], found["qtc-interval"]) == (75, 420)


def test_a_custom_code_value_uses_both_bytes() -> None:
    """A code's base value is 16 bits: 300 read from its low byte alone would be 44 (a lead
    silently scaled wrong wherever that code occurs)."""
    table = [HuffmanCode(1, 1, False, 300, 0), HuffmanCode(1, 1, False, -300, 1)]
    bodies = _bodies(n_leads=1, n=8)
    bodies[2] = table_body([table])
    bodies[6] = rhythm_body(np.zeros((1, 8)), 1000, 2000, [b"\x0f"], 0)
    assert read_scp(build_record(bodies)).lead("I").tolist() == [300] * 4 + [-300] * 4


def test_a_record_shorter_than_section0s_header_is_refused_with_the_copy_again_advice() -> None:
    """A 21-byte record cannot hold section 0's 16-byte header: the doctor is told the file is not
    readable and to copy it again, whatever its bytes claim further on."""
    record = bytearray(_bare_record(16, b"") + bytes(10))
    record[2:6] = struct.pack("<I", 21)
    record[0:2] = struct.pack("<H", _crc(bytes(record[2:21])))
    with pytest.raises(ProtocolError, match=r"record length of 21 bytes.*Copy the file from the device again"):
        read_sections(bytes(record))


def test_a_section0_claiming_one_byte_beyond_the_record_is_refused() -> None:
    with pytest.raises(ProtocolError, match="section 0 claims 17 bytes in a 22-byte record"):
        read_sections(_bare_record(17, b"") + bytes(10))


def test_a_last_section_claiming_one_byte_beyond_the_record_is_refused() -> None:
    """The rhythm section must end inside the record: its last byte would be read from padding."""
    data = bytearray(_record(_section1()))
    sec0_len = struct.unpack_from("<I", data, 10)[0]
    for pos in range(22, 6 + sec0_len, 10):
        sid, length, index = struct.unpack_from("<HII", data, pos)
        if sid == 6:
            struct.pack_into("<I", data, pos + 2, length + 1)
            struct.pack_into("<I", data, index - 1 + 4, length + 1)
    with pytest.raises(ProtocolError, match=r"section 6 .* lies outside the .*-byte record"):
        read_sections(restamp(bytes(data)))


@pytest.mark.parametrize("undefined", [29999, 29998, 19999, 32767])
def test_every_scp_undefined_marker_leaves_the_interval_out(undefined: int) -> None:
    """EN 1064 marks an unknown wave boundary with 29999, 29998, 19999 or 32767: read as a sample
    number it would give a P duration of ~29,900 ms on the report."""
    found, flags = _findings_of(s7=_section7(p_off=undefined))
    assert "p-duration" not in found and found["pr-interval"] == 160 and flags == ()


@pytest.mark.parametrize("undefined", [-29999, -32768])
def test_negative_undefined_markers_in_section10_are_left_out(undefined: int) -> None:
    values = [undefined, 160, 100, 400]
    block = struct.pack("<HH", 1, 2 * len(values)) + struct.pack(f"<{len(values)}h", *values)
    found, _flags = _findings_of(s10=struct.pack("<HH", 1, 0) + block)
    assert "lead-p-duration@I" not in found and found["lead-qt-interval@I"] == 400


def test_an_r_wave_amplitude_needs_an_r_duration_and_an_s_amplitude_an_s_duration() -> None:
    """With an R wave (40 ms) and no S wave: the R amplitude is reported and no S amplitude (an S
    amplitude without an S wave would feed voltage criteria a wave that is not there)."""
    values = [90, 160, 100, 400, 0, 40, 0, 0, 0, 0, 1200, -400, 0, 0, 50]
    block = struct.pack("<HH", 1, 2 * len(values)) + struct.pack(f"<{len(values)}h", *values)
    found, _flags = _findings_of(s10=struct.pack("<HH", 1, 0) + block)
    assert found["lead-r-amplitude@I"] == 1200 and "lead-s-amplitude@I" not in found


def test_a_record_without_section1_is_not_stat_and_keeps_protocol_0() -> None:
    """No header: the ECG is routine (a false STAT jumps the reading queue) and the protocol is
    what section 0 says."""
    bodies = _bodies()
    del bodies[1]
    scp = parse_scp(build_record(bodies, protocol=0), received_at=RECEIVED)
    assert scp.rhythm.stat is False and scp.protocol_version == 0


def test_a_record_length_beyond_16_mib_is_read_as_32_bits() -> None:
    """The record length is 4 bytes: a header claiming 16 MiB + 32 bytes is refused as longer than
    the file, not read as a 32-byte record."""
    record = bytearray(_bare_record(16, b"") + bytes(10))
    record[2:6] = struct.pack("<I", (1 << 24) + 32)
    with pytest.raises(ProtocolError, match="record length of 16777248 bytes"):
        read_sections(bytes(record))


def test_eight_one_bit_codes_fit_in_one_byte() -> None:
    """Default Huffman "0" is one bit: 8 samples in a byte are a valid lead, not refused."""
    bodies = _bodies(n_leads=1, n=8)
    bodies[2] = struct.pack("<H", 19999)
    bodies[6] = rhythm_body(np.zeros((1, 8)), 1000, 2000, [b"\x00"], 0)
    assert read_scp(build_record(bodies)).lead("I").tolist() == [0] * 8


@pytest.mark.parametrize("undefined", [29999, 29998, 19999, -29999, -32768, 32767])
def test_an_undefined_marker_is_no_r_amplitude(undefined: int) -> None:
    """Amplitudes may be up to 100 mV, so the plausibility bounds do not catch a marker: read as a
    value, 29999 would be a 30 mV R wave, a false voltage criterion for hypertrophy."""
    values = [90, 160, 100, 400, 0, 40, 0, 0, 0, 0, undefined]
    block = struct.pack("<HH", 1, 2 * len(values)) + struct.pack(f"<{len(values)}h", *values)
    found, _flags = _findings_of(s10=struct.pack("<HH", 1, 0) + block)
    assert "lead-r-amplitude@I" not in found and found["lead-qt-interval@I"] == 400


def _section8(*statements: bytes, count: int | None = None) -> bytes:
    head = struct.pack("<B7sB", 0, bytes(7), len(statements) if count is None else count)
    return head + b"".join(struct.pack("<BH", n + 1, len(s)) + s for n, s in enumerate(statements))


def _statements_of(body: bytes) -> tuple[list[str], tuple[str, ...]]:
    bodies = _bodies()
    bodies[8] = body
    recording = read_scp(build_record(bodies))
    return [s.text for s in recording.statements], recording.flags


def test_the_cart_statements_are_all_read_one_after_the_other() -> None:
    """Two statements: the second starts right after the first's 3-byte header and text, and keeps
    its last letter when it has no NUL; an empty last statement ending the section exactly is no
    damage."""
    assert _statements_of(_section8(b"Sinus rhythm\x00", b"Normal ECG", b"")) == (
        ["Sinus rhythm", "Normal ECG"],
        (),
    )


def test_a_statement_section_cut_short_is_flagged_unreadable_without_half_statements() -> None:
    """A statement claiming one byte more than the section, or a section shorter than its 9-byte
    header: the cart's interpretation is flagged unreadable, never shown truncated (a cut "no
    signs of infarction" could read "no signs of"), and never a crash."""
    cut = _section8(b"Sinus rhythm\x00")[:-1]
    assert _statements_of(cut) == ([], ("cart-findings-unreadable:scp-section-8",))
    assert _statements_of(bytes(8)) == ([], ("cart-findings-unreadable:scp-section-8",))


# Lead I's P duration, PR, QRS and QT (section 10's first four slots) and what they read as.
LEAD_I_INTERVALS = {
    "lead-p-duration@I": 90,
    "lead-pr-interval@I": 160,
    "lead-qrs-duration@I": 100,
    "lead-qt-interval@I": 400,
}


def _lead10(code: int, values: list[int], size: int | None = None) -> bytes:
    """A section 10 lead block: lead code, byte count (the values' unless given), int16 values."""
    raw = struct.pack(f"<{len(values)}h", *values)
    return struct.pack("<HH", code, len(raw) if size is None else size) + raw


def test_a_last_lead_with_no_measurements_keeps_the_other_leads_measurements() -> None:
    """Lead II's block is just its header, ending the section exactly: lead I's P, PR, QRS and QT
    still reach the reader, and the section is not called unreadable (which would drop them all)."""
    body = struct.pack("<HH", 2, 0) + _lead10(1, [90, 160, 100, 400]) + _lead10(2, [])
    found, flags = _findings_of(s10=body)
    assert found == LEAD_I_INTERVALS and flags == ()


def test_a_lead_block_claiming_one_byte_beyond_section10_is_unreadable_not_read_in_part() -> None:
    """Lead II's block claims 9 bytes and 8 are there: the section is cut, so its per-lead values
    are flagged unreadable; never a lead II QT read from a block whose end is missing."""
    body = struct.pack("<HH", 2, 0) + _lead10(1, [90, 160, 100, 400]) + _lead10(2, [80, 150, 90, 380], size=9)
    found, flags = _findings_of(s10=body)
    assert found == {} and flags == ("cart-findings-unreadable:scp-section-10",)


def test_a_lead_block_shorter_than_its_own_header_is_unreadable() -> None:
    """A block length of 3 fits neither reading (3 value bytes are not there; 3 bytes cannot
    include the 4-byte header): the section is damaged and said to be, not read as an empty lead."""
    body = struct.pack("<HH", 1, 0) + struct.pack("<HH", 1, 3) + struct.pack("<h", 90)
    found, flags = _findings_of(s10=body)
    assert found == {} and flags == ("cart-findings-unreadable:scp-section-10",)


def test_a_lead_block_of_odd_length_is_read_to_its_own_end_not_into_the_next_lead() -> None:
    """Lead I's block is 3 bytes (one value and a stray byte): its PR interval must not be made up
    from that byte and lead II's header; lead II is read from where its block starts."""
    body = struct.pack("<HH", 2, 0) + struct.pack("<HHhB", 1, 3, 90, 7) + _lead10(2, [80, 150, 90, 380])
    found, flags = _findings_of(s10=body)
    assert flags == ()
    assert found == {
        "lead-p-duration@I": 90,
        "lead-p-duration@II": 80,
        "lead-pr-interval@II": 150,
        "lead-qrs-duration@II": 90,
        "lead-qt-interval@II": 380,
    }


def test_a_section10_of_three_bytes_is_unreadable_not_an_ecg_without_lead_measurements() -> None:
    """One byte short of its 4-byte header: the reader is told the per-lead findings could not be
    read, rather than shown an ECG whose cart seemingly measured nothing."""
    found, flags = _findings_of(s10=b"\x00\x00\x00")
    assert found == {} and flags == ("cart-findings-unreadable:scp-section-10",)


def test_a_lead_with_durations_but_no_amplitudes_gets_no_made_up_zero_amplitudes() -> None:
    """Eight values (P, PR, QRS, QT and the Q, R, S, R' durations) and no amplitude slots: no Q, R,
    S or J amplitude of 0 µV may appear (an R of 0 µV in every lead reads as low voltage)."""
    found, flags = _findings_of(s10=struct.pack("<HH", 1, 0) + _lead10(1, [90, 160, 100, 400, 20, 40, 30, 0]))
    assert found == LEAD_I_INTERVALS and flags == ()


def test_a_lead_of_three_values_gives_them_and_no_qt_not_a_crash() -> None:
    """The block stops before the QT slot: P, PR and QRS are read and the QT is absent; reading
    the slot just past the values would crash the ECG intake on the cart's bytes."""
    found, flags = _findings_of(s10=struct.pack("<HH", 1, 0) + _lead10(1, [90, 160, 100]))
    assert found == {"lead-p-duration@I": 90, "lead-pr-interval@I": 160, "lead-qrs-duration@I": 100}
    assert flags == ()


def test_an_r_wave_of_the_shortest_duration_keeps_its_amplitude() -> None:
    """Any positive R duration (here 1 ms) means the cart found an R wave: its amplitude is a real
    finding for the voltage criteria and is kept; only a duration of 0 means no wave."""
    values = [90, 160, 100, 400, 0, 1, 0, 0, 0, 0, 1200]
    found, _flags = _findings_of(s10=struct.pack("<HH", 1, 0) + _lead10(1, values))
    assert found["lead-r-amplitude@I"] == 1200


def test_a_damaged_median_beat_section_is_named_section_5_in_the_refusal() -> None:
    """The refusal says which part of the file is broken: section 5 (the median beats), not the
    rhythm (6) or section 4, so the service desk knows the tracing itself was not the problem."""
    beats = np.array([[1, 2, 3, 4, 5], [-5, -4, -3, -2, -1]], dtype="<i2")
    bodies = _bodies()
    bodies[5] = rhythm_body(beats, 0, 2000, [row.tobytes() for row in beats], 0)  # no amplitude unit
    with pytest.raises(ProtocolError, match=r"^SCP-ECG section 5: amplitude multiplier is 0"):
        parse_scp(build_record(bodies))


def test_a_section4_one_byte_short_is_refused_not_used_to_cut_the_median_beat() -> None:
    """Section 4 (6-byte header: beat length, then QRS positions) cut to 5 bytes: its beat length
    is not trusted to cut the median beats."""
    beats = np.array([[1, 2, 3, 4, 5], [-5, -4, -3, -2, -1]], dtype="<i2")
    bodies = _bodies()
    bodies[5] = rhythm_body(beats, 1000, 2000, [row.tobytes() for row in beats], 0)
    bodies[4] = struct.pack("<HHB", 10, 0, 0)
    with pytest.raises(ProtocolError, match="section 4 is too short"):
        parse_scp(build_record(bodies))


def test_a_median_beat_of_one_sample_is_read_not_dropped() -> None:
    """One sample per lead is the shortest beat there is: it is returned as it is, never dropped as
    empty (only zero samples are "no median beat")."""
    beats = np.array([[7], [-7]], dtype="<i2")
    bodies = _bodies()
    bodies[5] = rhythm_body(beats, 1000, 2000, [row.tobytes() for row in beats], 0)
    reference = parse_scp(build_record(bodies)).reference_beats
    assert reference is not None and reference.samples.tolist() == [[7], [-7]]


def test_median_beats_of_ten_million_samples_are_checked_against_their_bytes_and_refused() -> None:
    """Section 4 says 20 s of beats at 2 µs: 10,000,000 samples, at the bound, so believed and then
    found not to fit the 10 bytes there (a damaged file refused, naming section 5's lead 1), never
    silently sent without its median beats."""
    beats = np.array([[1, 2, 3, 4, 5], [-5, -4, -3, -2, -1]], dtype="<i2")
    bodies = _bodies()
    bodies[5] = rhythm_body(beats, 1000, 2, [row.tobytes() for row in beats], 0)
    bodies[4] = struct.pack("<HHH", 20_000, 0, 0)
    with pytest.raises(ProtocolError, match=r"^SCP-ECG section 5 lead 1: 10 bytes cannot hold 10000000 samples"):
        parse_scp(build_record(bodies))


@pytest.mark.parametrize(
    ("interval_us", "rate"),
    [(640, 1562.0), (814, 1229.0), (1562, 640.0), (1229, 814.0), (3200, 312.5)],
)
def test_fast_carts_get_the_whole_rate_their_interval_came_from_and_no_neighbour(interval_us: int, rate: float) -> None:
    """Where neighbouring whole rates round to nearly the same interval the exact one must win:
    814 µs is a 1229 Hz cart, not 1228 Hz; 1562 µs is 640 Hz, not 640.2 Hz. A rate off by one
    stretches every interval measured on the tracing (0.08% at 1229 Hz: 8 ms over a 10 s strip)
    and mis-times the samples against the cart's own measurements. 312.5 Hz has no whole rate."""
    assert read_scp(build_record(_bodies(interval=interval_us))).sampling_rate_hz == rate


def test_an_undefined_p_onset_gives_no_p_duration_even_with_a_defined_p_offset_near_it() -> None:
    """P onset 19999 (undefined) and a P offset of 20090: the difference, 91 ms, looks like a normal
    P wave but was never measured; it must be left out, not reported."""
    found, flags = _findings_of(s7=_section7(p_on=19999, p_off=20090))
    assert "p-duration" not in found and found["qrs-duration"] == 90 and flags == ()


def test_custom_huffman_data_tells_a_cut_file_from_a_corrupt_one() -> None:
    """The refusal tells the user what to do: "ends after" means the copy was cut (copy it again),
    "not in the Huffman table" means the bytes are corrupt (copying again will not help). A pattern
    filling exactly the last bits, or one shorter than the table's longest code, is corruption."""
    two_bit = (HuffmanCode(2, 2, False, 0, 0b00), HuffmanCode(2, 2, False, 1, 0b01))
    with pytest.raises(ProtocolError, match="bit pattern at bit 6 is not in the Huffman table"):
        huffman_decode(bytes([0b00000010]), 5, [two_bit])  # 00 00 00 then 10 in the last two bits
    one_or_three = (HuffmanCode(1, 1, False, 0, 0b0), HuffmanCode(3, 3, False, 1, 0b110))
    with pytest.raises(ProtocolError, match="bit pattern at bit 6 is not in the Huffman table"):
        huffman_decode(bytes([0b00000010]), 8, [one_or_three])  # six "0", then "10": no code starts so


def test_the_protocol_from_the_device_tag_is_used_when_section0_says_0() -> None:
    """Section 0 leaves the protocol at 0 and tag 14 (byte 14) says 3.0: the ECG is read as
    protocol 3.0, where the rhythm flag is not bimodal compression, so it is not wrongly refused."""
    head = bytearray(36)
    head[8:14] = b"CART\x00\x00"
    head[13], head[14], head[15] = 29, 30, 29  # neighbours of the protocol byte say otherwise
    bodies = _bodies()
    bodies[1] = _section1(_tag(14, bytes(head) + b"\x00\x00\x00\x00"))
    samples = np.arange(20, dtype="<i2").reshape(2, 10)
    bodies[6] = rhythm_body(samples, 1000, 2000, [row.tobytes() for row in samples], 0, bimodal=1)
    scp = parse_scp(build_record(bodies, protocol=0))
    assert scp.protocol_version == 30 and scp.rhythm.lead("I").tolist() == samples[0].tolist()


def test_a_huffman_table_cut_inside_its_codes_is_refused_not_a_crash() -> None:
    """A table claiming 2 codes with the bytes of 1: a typed refusal of the damaged file, never an
    IndexError from reading the missing code (a crash on bad device bytes)."""
    table = table_body([[HuffmanCode(1, 1, False, 0, 0), HuffmanCode(1, 1, False, 1, 1)]])
    cut = table[: 2 + 2 + 9]
    with pytest.raises(ProtocolError, match="Huffman table 1 claims 2 codes"):
        read_scp(_with(s2=cut))


def test_the_bit_just_above_a_stored_huffman_prefix_is_not_part_of_the_code() -> None:
    """The cart leaves bit 1 set above the 1-bit prefix "0": still code "0" (reading 2 bits would
    turn it into "1", a repeated code, and refuse a good ECG)."""
    body = table_body([[HuffmanCode(1, 1, False, 0, 0), HuffmanCode(1, 1, False, 1, 1)]])
    high = bytearray(body)
    high[2 + 2 + 5] |= 0x02  # the first code's stored value, bit 1
    rhythm = rhythm_body(np.zeros((2, 10)), 1000, 2000, [b"\x55\x01"] * 2, 0)
    plain = read_scp(_with(s2=body, s6=rhythm)).samples
    assert plain.any() and np.array_equal(read_scp(_with(s2=bytes(high), s6=rhythm)).samples, plain)
