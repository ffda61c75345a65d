"""SCP-ECG decoder: sample-exact against third-party references, refusals, synthetic records for
the features no public file uses (custom Huffman tables, table switching, no compression,
other protocol versions), and fuzzing of the real files."""

from __future__ import annotations

import datetime as dt
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from devices.ecg.aecg import read_aecg
from devices.ecg.scp import DEFAULT_TABLE, HuffmanCode, huffman_decode, parse_scp, read_scp, undo_differences
from devices.errors import ProtocolError, UnsupportedFeatureError
from devices.identity import Patient, TimeSource
from tests.conftest import shared_file
from tests.ecg_file_mutations import apply, decodes_or_refuses, mutations
from tests.scp_records import (
    TABLE_1,
    TABLE_2,
    build_record,
    differences_of,
    encode_custom,
    encode_default,
    record_crc,
    restamp,
    rhythm_body,
    sections_of,
    table_body,
)

# Worked example of the default Huffman table with second differences (EN 1064 annex; the
# printed standard shows F5 for the sixth byte but its own bit table gives F1, and one more
# zero byte is needed for the final bits).
EN1064_HUFFMAN_EXAMPLE = bytes.fromhex("FF837FE0E6F1536559B65B964B9600")
EN1064_HUFFMAN_EXAMPLE_SAMPLES = [
    13,
    14,
    15,
    14,
    16,
    18,
    19,
    20,
    22,
    22,
    23,
    23,
    23,
    22,
    22,
    20,
    17,
    15,
    12,
    8,
    6,
    3,
    1,
    0,
    -2,
    -2,
    -3,
    -3,
]


def _read(name: str) -> bytes:
    return shared_file("ecg", "scp", name).read_bytes()


def _reference(name: str) -> tuple[list[str], np.ndarray]:
    path = shared_file("ecg", "scp", "reference", name + ".uV.csv")
    header = path.read_text().splitlines()[0].split("#")[0].strip().split(",")
    return header, np.loadtxt(path, delimiter=",", skiprows=1)


# ------------------------------------------------------------------ reference files


@pytest.mark.parametrize("name", ["ecgtoolkit_Example.scp", "abtahi_ECG_20170504_163507_123456789.SCP"])
def test_samples_equal_reference_csv_exactly(name: str) -> None:
    recording = read_scp(_read(name))
    header, reference = _reference(name)
    assert recording.n_samples == reference.shape[0]
    uv = recording.microvolts()
    for column, lead in enumerate(header):
        np.testing.assert_array_equal(uv[recording.lead_names.index(lead)], reference[:, column], err_msg=lead)


def test_example_file_fields() -> None:
    scp = parse_scp(_read("ecgtoolkit_Example.scp"))
    r = scp.rhythm
    assert scp.protocol_version == 20 and scp.sections == (0, 1, 2, 3, 4, 5, 6, 7)
    assert r.lead_names == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    assert r.derived_leads == frozenset()  # all twelve are stored in the file
    assert (r.sampling_rate_hz, r.uv_per_unit, r.n_samples) == (500.0, 2.5, 5000)
    assert r.acquired_at == dt.datetime(2002, 11, 22, 9, 10, tzinfo=dt.timezone.utc)
    assert r.time_source is TimeSource.FILE
    assert r.patient == Patient("SBJ-123", "Clark", dt.date(1953, 5, 8), "M")
    assert (r.device.model, r.device.manufacturer) == ("ELI250", "ECGConversion")
    assert r.source_format == "scp"


def test_welch_allyn_cart_derives_limb_leads() -> None:
    r = read_scp(_read("abtahi_ECG_20170504_163507_123456789.SCP"))
    assert r.derived_leads == {"III", "aVR", "aVL", "aVF"}
    assert (r.sampling_rate_hz, r.uv_per_unit) == (600.0, 3.75)  # 1667 us is 600 Hz
    assert r.device.manufacturer == "Welch Allyn Cardio Control" and r.device.model == "MDW14"
    assert r.patient is not None and r.patient.patient_id == "123456789"
    i, ii = r.lead("I").astype(int), r.lead("II").astype(int)
    np.testing.assert_array_equal(r.lead("III"), ii - i)
    # Goldberger, truncated toward zero in sample units (as ECGToolkit's files store them)
    np.testing.assert_array_equal(r.lead("aVR"), np.fix(-(i + ii) / 2))
    np.testing.assert_array_equal(r.lead("aVL"), np.fix((2 * i - ii) / 2))
    np.testing.assert_array_equal(r.lead("aVF"), np.fix((2 * ii - i) / 2))


def test_stored_derived_leads_follow_the_same_rounding() -> None:
    """ECGToolkit's example stores all 12 leads; its III/aVR/aVL/aVF equal our derivation."""
    from devices.ecg.leads import derive_limb_leads

    r = read_scp(_read("ecgtoolkit_Example.scp"))
    keep = [r.lead_names.index(n) for n in ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")]
    samples, names, derived = derive_limb_leads(r.samples[keep], tuple(r.lead_names[i] for i in keep))
    assert names == r.lead_names and derived == {"III", "aVR", "aVL", "aVF"}
    np.testing.assert_array_equal(samples, r.samples)


def test_reference_beats_equal_the_aecg_median_of_the_same_ecg() -> None:
    scp = parse_scp(_read("ecgtoolkit_Example.scp"))
    beats = scp.reference_beats
    assert beats is not None and beats.n_samples == 599 and beats.sampling_rate_hz == 500.0
    import re

    xml = shared_file("ecg", "aecg", "fda_hl7_Example_aECG.xml").read_text()
    median = xml[xml.index("REPRESENTATIVE_BEAT") :]
    for lead, digits in re.findall(r'code="MDC_ECG_LEAD_(\w+)".*?<digits>(.*?)</digits>', median, re.S)[:12]:
        name = {"AVR": "aVR", "AVL": "aVL", "AVF": "aVF"}.get(lead, lead)
        np.testing.assert_array_equal(beats.lead(name), np.array(digits.split(), dtype=int), err_msg=name)


def test_triad_scp_equals_aecg() -> None:
    scp = read_scp(_read("ecgtoolkit_Example.scp"))
    aecg = read_aecg(shared_file("ecg", "aecg", "fda_hl7_Example_aECG.xml").read_bytes())
    assert scp.lead_names == aecg.lead_names
    np.testing.assert_array_equal(scp.microvolts(), aecg.microvolts())


# ------------------------------------------------------------------ refusals


def test_healforce_handheld_file_is_refused_clearly() -> None:
    with pytest.raises(ProtocolError) as err:
        read_scp(_read("healforce_62.SCP"))
    message = str(err.value)
    assert "non-conforming" in message and "32768" in message and "export" in message
    # a damaged or non-conforming file, not a well-formed one using a refused feature
    assert type(err.value) is ProtocolError and not isinstance(err.value, UnsupportedFeatureError)


def test_damaged_section_is_refused_by_its_checksum() -> None:
    data = bytearray(_read("ecgtoolkit_Example.scp"))
    data[5000] ^= 0x10  # inside section 6
    data[0:2] = struct.pack("<H", record_crc(bytes(data[2:])))  # record CRC made to match
    with pytest.raises(ProtocolError, match="section 6 is damaged"):
        read_scp(bytes(data))


def test_record_checksum_is_checked() -> None:
    data = bytearray(_read("ecgtoolkit_Example.scp"))
    data[0] ^= 1
    with pytest.raises(ProtocolError, match="record checksum"):
        read_scp(bytes(data))


def test_truncated_file_is_refused() -> None:
    with pytest.raises(ProtocolError, match="incomplete"):
        read_scp(_read("ecgtoolkit_Example.scp")[:-100])


def test_bimodal_compression_is_refused_as_unsupported() -> None:
    bodies = sections_of(_read("ecgtoolkit_Example.scp"))
    bodies[6] = bodies[6][:5] + b"\x01" + bodies[6][6:]
    with pytest.raises(UnsupportedFeatureError, match="bimodal"):
        read_scp(build_record(bodies))
    # from version 3.0 on that byte is reserved: the same record decodes
    assert read_scp(build_record(bodies, protocol=30)).n_samples == 5000


def test_reference_beat_subtraction_is_refused_as_unsupported() -> None:
    bodies = sections_of(_read("ecgtoolkit_Example.scp"))
    bodies[3] = bodies[3][:1] + bytes([bodies[3][1] | 0x01]) + bodies[3][2:]
    with pytest.raises(UnsupportedFeatureError, match="reference-beat subtraction"):
        read_scp(build_record(bodies))


def test_sequential_leads_are_refused() -> None:
    bodies = sections_of(_read("ecgtoolkit_Example.scp"))
    lead3 = bytearray(bodies[3])
    struct.pack_into("<I", lead3, 2, 2)  # first lead starts at sample 2
    bodies[3] = bytes(lead3)
    with pytest.raises(UnsupportedFeatureError, match="different times"):
        read_scp(build_record(bodies))


def test_huge_claimed_lengths_allocate_nothing_big() -> None:
    bodies = sections_of(_read("ecgtoolkit_Example.scp"))
    lead3 = bytearray(bodies[3])
    for i in range(lead3[0]):
        struct.pack_into("<I", lead3, 2 + 9 * i + 4, 9_000_000)  # 9 M samples claimed per lead
    bodies[3] = bytes(lead3)
    record = build_record(bodies)
    tracemalloc.start()
    with pytest.raises(ProtocolError, match="cannot hold"):
        read_scp(record)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000_000


def test_file_without_time_needs_a_receipt_time() -> None:
    bodies = sections_of(_read("ecgtoolkit_Example.scp"))
    del bodies[1]
    record = build_record(bodies)
    with pytest.raises(ProtocolError, match="no acquisition"):
        read_scp(record)
    received = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.timezone.utc)
    r = read_scp(record, received_at=received)
    assert (r.acquired_at, r.time_source, r.patient) == (received, TimeSource.GATEWAY_RECEIPT, None)


def test_time_zone_tag_and_local_zone() -> None:
    data = _read("ecgtoolkit_Example.scp")
    zone = dt.timezone(dt.timedelta(hours=3))
    assert read_scp(data, local_tz=zone).acquired_at.utcoffset() == dt.timedelta(hours=3)
    bodies = sections_of(data)
    tags = bodies[1][:-3] + b"\x22" + struct.pack("<HhH", 4, -120, 0) + b"\xff\x00\x00"
    bodies[1] = tags
    r = read_scp(build_record(bodies), local_tz=zone)
    assert r.acquired_at.utcoffset() == dt.timedelta(hours=-2)


# ------------------------------------------------------------------ Huffman and encodings


def test_en1064_huffman_example() -> None:
    values = huffman_decode(EN1064_HUFFMAN_EXAMPLE, 28, [DEFAULT_TABLE])
    assert undo_differences(values, 2).tolist() == EN1064_HUFFMAN_EXAMPLE_SAMPLES


@pytest.mark.parametrize("differences", [0, 1, 2])
@pytest.mark.parametrize("coding", ["none", "default", "custom"])
def test_synthetic_encodings_round_trip(differences: int, coding: str) -> None:
    original = read_scp(_read("abtahi_ECG_20170504_163507_123456789.SCP"))
    stored = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
    samples = np.stack([original.lead(n) for n in stored])
    bodies = sections_of(_read("abtahi_ECG_20170504_163507_123456789.SCP"))
    bodies.pop(5)  # reference beats are coded like the rhythm; not needed here
    bodies.pop(4)
    values = [differences_of(s, differences) for s in samples]
    if coding == "none":
        bodies.pop(2)
        encoded = [v.astype("<i2").tobytes() for v in values]
    elif coding == "default":
        bodies[2] = struct.pack("<H", 19999)
        encoded = [encode_default(v) for v in values]
    else:
        bodies[2] = table_body([TABLE_1, TABLE_2])
        encoded = [encode_custom(v) for v in values]
    bodies[6] = rhythm_body(samples, 3750, 1667, encoded, differences)
    decoded = read_scp(build_record(bodies))
    np.testing.assert_array_equal(decoded.samples, original.samples)


def test_custom_table_switching_and_base_value() -> None:
    values = np.array([0, 1, -1, 300, 7, 0, 99, 100, 227, -28] * 10)
    chunk = encode_custom(values)
    tables = [tuple(TABLE_1), tuple(TABLE_2)]
    assert huffman_decode(chunk, len(values), tables).tolist() == values.tolist()


def test_unknown_bit_pattern_is_refused() -> None:
    table = (HuffmanCode(2, 2, False, 0, 0b00), HuffmanCode(2, 2, False, 1, 0b01))
    with pytest.raises(ProtocolError, match="not in the Huffman table"):
        huffman_decode(b"\xff", 4, [table])


def test_short_huffman_data_is_refused() -> None:
    with pytest.raises(ProtocolError, match="ends after"):
        huffman_decode(b"\xff\xff", 3, [DEFAULT_TABLE])


@pytest.mark.parametrize("protocol", [10, 11, 12, 13, 30])
def test_other_protocol_versions(protocol: int) -> None:
    bodies = sections_of(_read("ecgtoolkit_Example.scp"))
    r = read_scp(build_record(bodies, protocol=protocol))
    assert r.n_samples == 5000 and r.n_leads == 12


def test_sixteen_bit_wrap_matches_encoders() -> None:
    assert undo_differences(np.array([32767, 1]), 1).tolist() == [32767, -32768]


# ------------------------------------------------------------------ fuzzing


@pytest.mark.parametrize("name", ["ecgtoolkit_Example.scp", "abtahi_ECG_20170504_163507_123456789.SCP"])
@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=mutations())
def test_fuzz_real_files(name: str, ops: list[tuple]) -> None:
    decodes_or_refuses(read_scp, apply(_read(name), ops))


@settings(deadline=None, max_examples=300)
@given(ops=mutations())
def test_fuzz_behind_valid_checksums(ops: list[tuple]) -> None:
    """Mutate inside the sections, then re-stamp every CRC, so the decoder itself is tested."""
    data = _read("abtahi_ECG_20170504_163507_123456789.SCP")
    mutated = apply(data, [op for op in ops if op[0] in ("flip", "set")], lo=6)
    decodes_or_refuses(read_scp, restamp(mutated))


# ------------------------------------------------------------------ text in the cart's character set


def _section1_tags(body: bytes) -> list[tuple[int, bytes]]:
    tags, pos = [], 0
    while pos + 3 <= len(body) and body[pos] != 255:
        length = struct.unpack_from("<H", body, pos + 1)[0]
        tags.append((body[pos], body[pos + 3 : pos + 3 + length]))
        pos += 3 + length
    return tags


def _section1_body(tags: list[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes([tag]) + struct.pack("<H", len(value)) + value for tag, value in tags) + b"\xff\x00\x00"


@pytest.mark.parametrize("name", ["ecgtoolkit_Example.scp", "abtahi_ECG_20170504_163507_123456789.SCP"])
def test_chinese_name_in_the_declared_gb2312_character_set(name: str) -> None:
    """A Chinese cart writes the patient's name in GB 2312 and says so in the language support
    code (section 1 tag 14, byte 16: 0x27). Read as Latin-1, 王伟 became "Íõ^Î°" on the PACS."""
    bodies = sections_of(_read(name))
    tags = []
    for tag, value in _section1_tags(bodies[1]):
        if tag == 0:
            value = "王".encode("gb2312") + b"\x00"
        elif tag == 1:
            value = "伟".encode("gb2312") + b"\x00"
        elif tag == 14:
            value = value[:16] + b"\x27" + value[17:]
        tags.append((tag, value))
    if not any(tag == 1 for tag, _ in tags):
        tags.insert(1, (1, "伟".encode("gb2312") + b"\x00"))
    bodies[1] = _section1_body(tags)
    r = read_scp(build_record(bodies))
    assert r.patient is not None and r.patient.name == "王^伟"
