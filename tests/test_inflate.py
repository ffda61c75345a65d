"""Capped inflation (devices/inflate.py) and the decoders and senders that use it: a deflate bomb
is refused with a typed error after inflating at most the limit, never inflated whole."""

from __future__ import annotations

import io
import tracemalloc
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
from uploader.dicom_part10 import UnsendablePayload, encode_for, inflate_codec, parse_part10


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


def test_the_forwarder_inflates_with_zlib_ng() -> None:
    # a dependency: without it the forwarder falls back to zlib, silently slower
    assert inflate_codec().__name__ == "zlib_ng.zlib_ng"


@pytest.mark.parametrize("keep", [None, 100])
def test_zlib_ng_inflates_as_zlib_does(keep: int | None) -> None:
    data = bytes(range(256)) * 5000
    packed = raw_deflate(data)
    ng = inflate_codec()
    assert inflate(packed, max_bytes=len(data), keep=keep, codec=ng) == inflate(packed, max_bytes=len(data), keep=keep)
    with pytest.raises(InflateLimitError):
        inflate(packed, max_bytes=len(data) - 1, codec=ng)
    with pytest.raises(ProtocolError, match="truncated"):
        inflate(packed[: len(packed) // 2], max_bytes=1 << 20, codec=ng)
    with pytest.raises(ProtocolError, match="does not inflate"):
        inflate(b"\xff" * 64, max_bytes=1 << 20, codec=ng)


@settings(deadline=None, max_examples=300)
@given(st.one_of(st.binary(max_size=2000), st.binary(max_size=3000).map(raw_deflate)), st.integers(0, 5000))
def test_zlib_ng_fuzz_inflates_what_zlib_inflates_or_raises_the_typed_error(data: bytes, limit: int) -> None:
    def outcome(codec: object) -> object:
        try:
            return inflate(data, max_bytes=limit, codec=codec)  # type: ignore[arg-type]
        except InflateLimitError:
            return "too big"
        except ProtocolError:
            return "refused"

    assert outcome(inflate_codec()) == outcome(zlib)


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


def test_a_stream_that_ends_inside_zlibs_bit_buffer_is_inflated_whole() -> None:
    # 1 MiB + 5 zeros: zlib has read the whole input (into its bit buffer) while 5 bytes of output
    # still wait; stopping there would refuse a sound deflated ECG as truncated.
    data = bytes(2**20 + 5)
    assert inflate(raw_deflate(data), max_bytes=len(data)) == data


def test_a_kept_prefix_longer_than_one_step_is_exact() -> None:
    data = bytes(range(256)) * (3 * 2**12)  # 3 MiB
    keep = 3 * 2**19  # 1.5 MiB: the prefix spans two steps
    assert inflate(raw_deflate(data), max_bytes=len(data), keep=keep) == data[:keep]


def test_inflating_a_bomb_holds_one_step_of_memory_at_a_time() -> None:
    """Counting a 64 MiB stream (keep=0) holds a few MiB at once, not the whole output: on a
    512 MB gateway a hostile file must not take the memory the services need."""
    packed = raw_deflate(bytes(64 * 2**20))
    tracemalloc.start()
    try:
        assert inflate(packed, max_bytes=64 * 2**20, keep=0) == b""
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 1 MiB steps measure ~3.2 MiB (the last piece, the next one and zlib's growing output
    # buffer); 2 MiB steps twice that, the whole output 64 MiB and more
    assert peak < 4 * 2**20


def test_the_head_of_garbage_raises_the_typed_error() -> None:
    with pytest.raises(ProtocolError, match="does not inflate"):
        inflate_head(b"\xff" * 64, 10)
