"""Contec ECG90A .ECG decoder: the cart's own export as reference, empty chest leads, refusals,
fuzzing."""

from __future__ import annotations

import csv
import datetime as dt
import struct

import numpy as np
import pytest
from hypothesis import given, settings

from devices.ecg.contec import HEADER_LEN, NO_DATA, read_contec
from devices.errors import ProtocolError
from devices.identity import TimeSource
from tests.conftest import shared_file
from tests.ecg_file_mutations import apply, decodes_or_refuses, mutations

LIMB_COLUMNS = ("I", "II", "III", "aVR", "aVL", "aVF")  # column order of the cart's CSV export


def _read(name: str) -> bytes:
    return shared_file("ecg", "contec", name).read_bytes()


def test_matches_the_carts_export_exactly() -> None:
    r = read_contec(_read("0000050.ECG"))
    with shared_file("ecg", "contec", "0000050.ECG.csv").open() as f:
        rows = list(csv.reader(f))
    reference = np.array([[int(v) for v in row[:6]] for row in rows]) * 5.0  # counts of 5 µV
    assert all(not any(row[6:]) for row in rows)  # chest columns empty in the export too
    assert r.n_samples == len(rows) == 37855
    uv = r.microvolts()
    for column, lead in enumerate(LIMB_COLUMNS):
        np.testing.assert_array_equal(uv[r.lead_names.index(lead)], reference[:, column], err_msg=lead)


def test_recording_fields() -> None:
    r = read_contec(_read("0000050.ECG"))
    assert (r.sampling_rate_hz, r.uv_per_unit) == (800.0, 5.0)
    assert r.lead_names == ("I", "II", "III", "aVR", "aVL", "aVF")
    assert r.derived_leads == {"I", "aVR", "aVL", "aVF"}  # II and III are the stored series
    assert r.acquired_at == dt.datetime(2020, 11, 16, 21, 44, 39, tzinfo=dt.timezone.utc)
    assert r.time_source is TimeSource.FILE
    assert r.patient is None  # the file has a name but no identifier: never guessed
    assert (r.device.manufacturer, r.device.model) == ("Contec", "ECG90A")
    assert r.flags == ("leads-not-recorded:V1,V2,V3,V4,V5,V6",)


def test_limb_leads_only_file_drops_empty_chest_leads() -> None:
    r = read_contec(_read("0000037.ECG"))
    assert r.lead_names == ("I", "II", "III", "aVR", "aVL", "aVF") and r.n_samples == 8375
    assert "leads-not-recorded:V1,V2,V3,V4,V5,V6" in r.flags
    local = dt.timezone(dt.timedelta(hours=1))
    assert read_contec(_read("0000037.ECG"), local_tz=local).acquired_at == dt.datetime(
        2020, 11, 15, 12, 59, 50, tzinfo=local
    )


def test_chest_leads_with_data_are_kept() -> None:
    data = bytearray(_read("0000037.ECG"))
    n = (len(data) - 80) // 16
    for row in range(n):
        for series in range(2, 8):
            struct.pack_into("<H", data, HEADER_LEN + 16 * row + 2 * series, 2048 + series)
    r = read_contec(bytes(data))
    assert r.lead_names == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    assert r.flags == () and r.lead("V6")[0] == 7


def test_lead_off_in_the_middle_drops_that_lead() -> None:
    data = bytearray(_read("0000037.ECG"))
    struct.pack_into("<H", data, HEADER_LEN + 16 * 100, NO_DATA)  # series 0 (II), one sample
    r = read_contec(bytes(data))
    assert "II" not in r.lead_names and r.lead_names == ("III",)
    assert r.flags == ("leads-not-recorded:II,V1,V2,V3,V4,V5,V6",)


@pytest.mark.parametrize("cut", [1, 15, 37])
def test_bad_sizes_are_refused(cut: int) -> None:
    with pytest.raises(ProtocolError, match="not a Contec ECG90A file"):
        read_contec(_read("0000037.ECG")[:-cut])


def test_out_of_range_samples_are_refused() -> None:
    data = bytearray(_read("0000037.ECG"))
    struct.pack_into("<H", data, HEADER_LEN, 0x1000)
    with pytest.raises(ProtocolError, match="12-bit"):
        read_contec(bytes(data))


def test_unreadable_time_uses_the_receipt_time() -> None:
    data = bytearray(_read("0000037.ECG"))
    data[10:14] = b"20x0"
    with pytest.raises(ProtocolError, match="acquisition time"):
        read_contec(bytes(data))
    received = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)
    r = read_contec(bytes(data), received_at=received)
    assert (r.acquired_at, r.time_source) == (received, TimeSource.GATEWAY_RECEIPT)


@settings(deadline=None, max_examples=400)
@given(ops=mutations())
def test_fuzz(ops: list[tuple]) -> None:
    decodes_or_refuses(read_contec, apply(_read("0000037.ECG"), ops))


# -- synthetic files: every limit of the layout, stated -----------------------------------------
# A wrong limit here cuts a recording short, keeps a saturated or disconnected lead as if it were
# signal, or misreads the acquisition time.


def _file(rows: list[list[int]], *, case: bytes = b"0000042", stamp: bytes = b"2024-05-06 07:08:09\x00") -> bytes:
    header = bytearray(HEADER_LEN)
    header[0 : len(case)] = case
    header[10 : 10 + len(stamp)] = stamp
    body = b"".join(struct.pack("<8H", *row) for row in rows)
    return bytes(header) + body + bytes(37)


FLAT = [2048] * 8  # 0 µV on every series


def test_looks_like_contec_needs_digits_a_time_stamp_and_one_row() -> None:
    from devices.ecg.contec import looks_like_contec

    assert looks_like_contec(_file([FLAT]))
    assert not looks_like_contec(_file([FLAT])[:-1])  # shorter than header + footer + one row
    assert not looks_like_contec(_file([FLAT], case=b"00A0042"))
    assert not looks_like_contec(_file([FLAT], case=b"\x00"))  # no case number at all
    assert not looks_like_contec(_file([FLAT], stamp=b"2024-05-06 07:08"))
    assert not looks_like_contec(_file([FLAT], stamp=b"2024-05-06 07:08:09X"))  # field not ended
    assert not looks_like_contec(b"\x00" * 200)
    # the case number may fill its eight bytes, the stamp its twenty (the rest of the header is not read)
    assert looks_like_contec(_file([FLAT], case=b"12345678X", stamp=b"2024-05-06 07:08:09\x00Z"))
    assert not looks_like_contec(_file([FLAT], case=b"1234567X"))  # the eighth byte is part of it
    assert not looks_like_contec(_file([FLAT], case=b"X234567"))


def test_one_row_is_a_recording_and_an_odd_size_is_not() -> None:
    r = read_contec(_file([[2049, 2047, 2048, 2048, 2048, 2048, 2048, 2048]]))
    assert r.n_samples == 1 and r.lead("II").tolist() == [1] and r.lead("III").tolist() == [-1]
    assert r.acquired_at == dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
    with pytest.raises(ProtocolError, match="not a Contec ECG90A file"):
        read_contec(_file([]))
    with pytest.raises(ProtocolError, match="not a Contec ECG90A file"):
        read_contec(_file([FLAT]) + b"\x00" * 8)  # half a row


def test_the_recording_ends_at_the_first_all_zero_row() -> None:
    rows = [[2048 + i] * 8 for i in range(5)] + [[0] * 8] + [[2100] * 8] + [[0] * 8] + [[2200] * 8]
    r = read_contec(_file(rows))
    assert r.lead("II").tolist() == [0, 1, 2, 3, 4]  # the cart's export stops there too
    with pytest.raises(ProtocolError, match="holds no samples"):
        read_contec(_file([[0] * 8, FLAT]))


def test_a_series_stuck_at_zero_is_still_a_series() -> None:
    """A lead saturated at the bottom of the range (raw 0) on every sample is not an end marker:
    only a row that is zero on all eight series ends the recording."""
    rows = [[0, 2050, 2048, 2048, 2048, 2048, 2048, 2048]] * 3
    r = read_contec(_file(rows))
    assert r.n_samples == 3 and r.lead("II").tolist() == [-2048] * 3


def test_the_12_bit_range_is_exact_and_no_data_is_not_a_value() -> None:
    top = read_contec(_file([[4095] + [2048] * 7]))
    assert top.lead("II").tolist() == [2047]
    with pytest.raises(ProtocolError, match="12-bit"):
        read_contec(_file([[4096] + [2048] * 7]))
    with pytest.raises(ProtocolError, match="no lead with data"):
        read_contec(_file([[NO_DATA] * 8]))


def test_an_unended_time_stamp_is_not_trusted() -> None:
    received = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    r = read_contec(_file([FLAT], stamp=b"2024-05-06 07:08:09X"), received_at=received)
    assert (r.acquired_at, r.time_source) == (received, TimeSource.GATEWAY_RECEIPT)
    with pytest.raises(ProtocolError, match="Contec ECG90A: acquired_at must carry a time zone"):
        read_contec(_file([FLAT], stamp=b"2024-13-06 07:08:09\x00"), received_at=dt.datetime(2026, 1, 2))
