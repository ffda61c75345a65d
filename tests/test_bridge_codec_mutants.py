"""Bridge codec: the edges the mutation score found untested (issue 20).

Each test names what a bridge or the clinic loses if the edge moves: a firmware written from
docs/bridge-protocol.md that the gateway misreads, the largest ECG block dropped as "too long",
a string whose length byte wraps and shifts every field after it.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from devices.bridge import cobs, codec
from devices.bridge.crc import crc32
from devices.errors import ProtocolError

DOC = (Path(__file__).resolve().parents[1] / "docs" / "bridge-protocol.md").read_text()


def _round_trip(message: codec.Message) -> codec.Message:
    encoded = codec.encode_message(message, 5)
    assert encoded.endswith(b"\x00")
    return codec.decode_message(codec.decode_frame(encoded[:-1]))


# ---------------------------------------------------------------- the wire numbers are the doc's


def test_every_message_type_byte_is_the_one_the_protocol_document_gives_firmware_authors() -> None:
    """A bridge firmware is written from the document: a type byte that differs here would make the
    gateway read a MEASUREMENT as something else, or NACK every ECG as unsupported."""
    rows = re.findall(r"^\| (0x[0-9a-f]{2}) \| ([A-Z_]+) \|", DOC, re.MULTILINE)
    assert len(rows) == 10
    for value, name in rows:
        assert getattr(codec, name) == int(value, 16), name
        number = int(value, 16)
        assert number == codec.MESSAGE_CLASSES[number].TYPE


def test_every_nack_reason_is_the_documented_one() -> None:
    """NACK_REFUSED tells a bridge to resend later; read as NACK_MALFORMED it would drop the reading."""
    rows = re.findall(r"^\| (\d) \| (NACK_[A-Z_]+) \|", DOC, re.MULTILINE)
    assert len(rows) == 4
    for value, name in rows:
        assert getattr(codec, name) == int(value), name


def test_time_flags_and_ecg_end_status_are_the_documented_numbers() -> None:
    """A device clock taken for a synced one (or an aborted ECG for a complete one) mislabels the
    time source or hides a cut-short recording."""
    assert "| 0 | no clock |" in DOC and "| 1 | the device's own RTC |" in DOC
    assert "| 2 | a clock set from the gateway's TIME_SYNC |" in DOC
    assert (codec.TIME_UNKNOWN, codec.TIME_DEVICE_CLOCK, codec.TIME_SYNCED) == (0, 1, 2)
    assert "`status` 0 = complete, 1 = aborted" in " ".join(DOC.split())
    assert (codec.ECG_END_COMPLETE, codec.ECG_END_ABORTED) == (0, 1)
    assert "A decoded body is at most 4096 bytes (payload at most 4086)" in DOC
    assert (codec.MAX_BODY, codec.MAX_PAYLOAD) == (4096, 4086)
    assert "(1–16 leads)" in DOC and codec.MAX_LEADS == 16


# ---------------------------------------------------------------- frame size limits


def test_the_largest_payload_the_document_allows_is_delivered_not_dropped_as_too_long() -> None:
    # no zero bytes: COBS adds its worst-case overhead, so the encoded frame is as long as any can be
    payload = bytes(range(1, 256)) * 16 + bytes(range(1, 7))
    assert len(payload) == codec.MAX_PAYLOAD
    encoded = codec.encode_frame(codec.SERIAL_DATA, 9, payload)
    assert codec.decode_frame(encoded[:-1]).payload == payload
    reader = codec.FrameReader()
    (frame,) = reader.feed(encoded)
    assert isinstance(frame, codec.Frame) and frame.payload == payload and frame.seq == 9


def test_one_byte_over_the_limit_is_refused_by_the_encoder() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        codec.encode_frame(codec.SERIAL_DATA, 1, bytes(codec.MAX_PAYLOAD + 1))


def test_a_body_over_4096_bytes_is_refused_even_with_a_good_crc() -> None:
    """A sender that ignores the limit must not get a 4087-byte payload past the gateway."""
    body = struct.pack(codec.HEADER_FORMAT, 1, codec.SERIAL_DATA, 1) + bytes(range(1, 256)) * 16 + bytes(range(1, 8))
    body += struct.pack("<I", crc32(body))
    assert len(body) == codec.MAX_BODY + 1
    encoded = cobs.encode(body)
    assert len(encoded) <= codec.MAX_ENCODED  # only the body check can refuse it
    with pytest.raises(codec.FrameError, match="body longer"):
        codec.decode_frame(encoded)


def test_an_over_long_encoded_frame_is_refused_before_decoding() -> None:
    with pytest.raises(codec.FrameError, match="frame longer"):
        codec.decode_frame(b"\x01" * (codec.MAX_ENCODED + 1))


def test_a_delimiterless_flood_is_not_buffered_and_the_next_frame_still_arrives() -> None:
    """Line noise with no 0x00 (a bridge babbling at the wrong baud rate) costs bounded memory."""
    reader = codec.FrameReader()
    assert reader.feed(b"\x55" * 3000) == []
    assert reader.feed(b"\x55" * 3000) == []
    assert reader.pending == 0  # discarded, not kept
    out = reader.feed(b"\x00" + codec.encode_message(codec.Ack(7), 3))
    assert isinstance(out[0], codec.FrameError)
    assert isinstance(out[1], codec.Frame) and codec.decode_message(out[1]) == codec.Ack(7)


# ---------------------------------------------------------------- field limits


def test_a_255_byte_string_fits_and_a_256_byte_one_is_refused_not_wrapped() -> None:
    """A 256-byte name would write a length byte of 0 and shift every later field."""
    assert _round_trip(codec.Log(20, "x" * 255)) == codec.Log(20, "x" * 255)
    with pytest.raises(ProtocolError, match="255 bytes"):
        codec.Log(20, "x" * 256).encode_payload()


def test_255_capabilities_fit_and_256_are_refused() -> None:
    caps = tuple(f"c{i}" for i in range(255))
    hello = codec.Hello("BR-1", "m", "1", 1, caps)
    assert _round_trip(hello) == hello
    with pytest.raises(ProtocolError, match="more than 255 strings"):
        codec.Hello("BR-1", "m", "1", 1, (*caps, "one-more")).encode_payload()


def test_255_values_fit_in_a_measurement_and_256_are_refused() -> None:
    values = tuple(codec.MeasuredValue(f"v{i}", float(i), "1") for i in range(255))
    message = codec.Measurement("bulk", "", codec.TIME_UNKNOWN, 0, values)
    assert _round_trip(message) == message
    with pytest.raises(ProtocolError, match="more than 255 values"):
        codec.Measurement("bulk", "", codec.TIME_UNKNOWN, 0, (*values, values[0])).encode_payload()


def test_a_65535_byte_serial_blob_fits_and_a_longer_one_is_refused() -> None:
    codec.SerialData(1, bytes(0xFFFF)).encode_payload()  # fits the u16 count (not a frame)
    with pytest.raises(ProtocolError, match="65535"):
        codec.SerialData(1, bytes(0x10000)).encode_payload()


def test_empty_strings_and_an_empty_blob_decode() -> None:
    """A reading without a device record id ("" as the document allows) must not be NACKed."""
    message = codec.Measurement("temperature", "", codec.TIME_UNKNOWN, 0, (codec.MeasuredValue("", 36.5, ""),))
    assert _round_trip(message) == message
    assert _round_trip(codec.SerialData(2, b"")) == codec.SerialData(2, b"")


def test_a_value_without_a_reason_is_sent_as_nres_not_as_an_empty_reason() -> None:
    decoded = _round_trip(codec.Measurement("bp", "1", 0, 0, (codec.MeasuredValue("systolic", None, "mm[Hg]"),)))
    assert isinstance(decoded, codec.Measurement)
    assert decoded.values[0].value is None and decoded.values[0].special == "nres"


@pytest.mark.parametrize("n_leads", [1, 16])
def test_one_lead_and_sixteen_leads_are_accepted(n_leads: int) -> None:
    names = tuple(f"L{i}" for i in range(n_leads))
    start = codec.EcgStart(1, codec.TIME_SYNCED, 0, 500, 2.5, names)
    assert _round_trip(start) == start
    block = codec.EcgBlock(1, 0, n_leads, bytes(2 * n_leads * 3))
    assert _round_trip(block) == block


def read_frame(msg_type: int, payload: bytes) -> codec.Frame:
    """A frame of `payload` as the gateway reads it off the wire (its CRC checked)."""
    return codec.decode_frame(codec.encode_frame(msg_type, 0, payload)[:-1])


def test_seventeen_leads_are_refused_on_decode() -> None:
    payload = codec.EcgStart(1, 0, 0, 500, 2.5, tuple(f"L{i}" for i in range(17))).encode_payload()
    with pytest.raises(ProtocolError, match="17 leads"):
        codec.decode_message(read_frame(codec.ECG_START, payload))
    block = codec.EcgBlock(1, 0, 17, bytes(34)).encode_payload()
    with pytest.raises(ProtocolError, match="17 leads"):
        codec.decode_message(read_frame(codec.ECG_BLOCK, block))


def test_an_ecg_block_that_is_not_whole_samples_is_refused_by_the_encoder() -> None:
    """Six bytes for two leads is one and a half samples: sent, it would shift every lead after it."""
    with pytest.raises(ProtocolError, match="whole number"):
        codec.EcgBlock(1, 0, 2, bytes(6)).encode_payload()


def test_an_odd_log_level_is_kept() -> None:
    assert _round_trip(codec.Log(5, "trace")) == codec.Log(5, "trace")


# ---------------------------------------------------------------- message and frame values


def test_messages_compare_by_type_and_every_field() -> None:
    """The session drops a repeated message as a duplicate by comparing it: two different ACKs,
    or an ACK and a TIME_SYNC with the same number, must never compare equal."""
    assert codec.Ack(1) == codec.Ack(1) and codec.Ack(1) != codec.Ack(2)
    assert codec.Ack(5) != codec.TimeSync(5)
    assert len({codec.Ack(1), codec.Ack(1), codec.Ack(2)}) == 2
    assert repr(codec.Nack(3, codec.NACK_REFUSED, "disk full")) == "Nack(seq=3, reason=4, text='disk full')"
    with pytest.raises(NotImplementedError):
        codec.Message().encode_payload()


def test_frames_compare_by_every_header_field_and_payload() -> None:
    frame = codec.Frame(1, codec.ACK, 7, b"\x01", 0)
    assert frame == codec.Frame(1, codec.ACK, 7, b"\x01", 1)  # the CRC is the bytes', not the frame's
    assert frame != codec.Frame(1, codec.ACK, 8, b"\x01", 0) and frame != codec.Frame(1, codec.ACK, 7, b"\x02", 0)
    assert frame != (1, codec.ACK, 7, b"\x01")
    assert repr(frame) == "Frame(version=1, type=0x30, seq=7, 1 bytes)"
