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
        2020, 11, 15, 12, 59, 50, tzinfo=local)


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
