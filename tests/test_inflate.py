"""Capped inflation (devices/inflate.py) and the decoders and senders that use it: a deflate bomb
is refused with a typed error after inflating at most the limit, never inflated whole."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from devices.ecg.dicom_input import read_dicom_ecg
from devices.ecg.formats import decode_ecg
from devices.errors import ProtocolError
from devices.inflate import InflateLimitError, inflate, inflate_head
from tests.hostile_dicom import deflate_bomb
from uploader.dicom_part10 import UnsendablePayload, encode_for, parse_part10


def raw_deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


@pytest.fixture(scope="module")
def bomb() -> tuple[str, bytes]:
    return deflate_bomb(1 << 30)


def test_inflate_round_trips_and_keeps_a_prefix_on_request() -> None:
    data = bytes(range(256)) * 5000
    packed = raw_deflate(data)
    assert inflate(packed, max_bytes=len(data)) == data
    assert inflate(packed, max_bytes=len(data), keep=100) == data[:100]
    assert inflate_head(packed, 1000) == data[:1000]
    with pytest.raises(InflateLimitError) as too_big:
        inflate(packed, max_bytes=len(data) - 1)
    assert too_big.value.limit == len(data) - 1


def test_truncated_or_garbage_streams_raise_the_typed_error() -> None:
    packed = raw_deflate(b"x" * 100_000)
    with pytest.raises(ProtocolError, match="truncated"):
        inflate(packed[: len(packed) // 2], max_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="does not inflate"):
        inflate(b"\xff" * 64, max_bytes=1 << 20)


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=2000), st.integers(0, 5000))
def test_inflate_fuzz_inflates_within_the_limit_or_raises_the_typed_error(data: bytes, limit: int) -> None:
    try:
        out = inflate(data, max_bytes=limit)
    except ProtocolError:
        return
    assert len(out) <= limit


def test_decompression_bomb_is_refused_by_the_dicom_ecg_decoder(bomb: tuple[str, bytes]) -> None:
    # the limit is the decoder's 64 MiB cap: raised there, not after inflating the 1 GiB
    with pytest.raises(InflateLimitError, match=f"more than {64 * 2**20} bytes"):
        read_dicom_ecg(bomb[1])
    with pytest.raises(ProtocolError):  # a stick with a bomb on it: the import path refuses it typed
        decode_ecg(bomb[1], "bomb.dcm")


def test_deflated_dicom_ecg_decodes_like_the_plain_one() -> None:
    path = get_testdata_file("waveform_ecg.dcm")
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    plain, deflated = read_dicom_ecg(Path(path).read_bytes()), read_dicom_ecg(buf.getvalue())
    assert (plain.samples == deflated.samples).all() and plain.lead_names == deflated.lead_names


def test_decompression_bomb_in_the_outbox_is_unsendable_not_inflated(bomb: tuple[str, bytes]) -> None:
    uid, data = bomb
    obj = parse_part10(data)  # reads the UIDs from the first inflated bytes only
    assert obj.sop_instance_uid == uid
    assert encode_for(obj, DeflatedExplicitVRLittleEndian) == obj.dataset_bytes()  # sent as stored
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        with pytest.raises(UnsendablePayload, match="inflates to more than"):
            encode_for(obj, syntax)
