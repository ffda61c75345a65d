"""Bridge protocol codec: COBS, CRC-32, frames, messages, resynchronisation, and fuzzing."""

from __future__ import annotations

import datetime as dt
import random
import re
import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.bridge import cobs, codec
from devices.bridge.crc import crc32, crc32_table
from devices.errors import ProtocolError

# Third-party vectors: the COBS examples of Cheshire & Baker as tabulated on Wikipedia
# ("Consistent Overhead Byte Stuffing", examples 1-10), encoded form without the delimiter.
COBS_VECTORS: list[tuple[bytes, bytes]] = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
    (bytes(range(255)), b"\x01\xff" + bytes(range(1, 255))),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    (bytes(range(3, 256)) + b"\x00\x01", b"\xfe" + bytes(range(3, 256)) + b"\x02\x01"),
]

# Check value of CRC-32/ISO-HDLC (the catalogue's "123456789" check).
CRC32_CHECK = 0xCBF43926

# Golden frames: the wire format of protocol version 1, frozen. A firmware author can compare
# their encoder against these bytes (they are repeated in docs/bridge-protocol.md).
HELLO_FRAME = (
    b'\x03\x01\x01\x01\x01\x01?\x07BR-0001\x16lastmile-bridge-rp2040\x051.0.0xV4\x12\x02\x0bmeasurement\x03ecg"!\n$\x00'
)
HELLO_MESSAGE = codec.Hello("BR-0001", "lastmile-bridge-rp2040", "1.0.0", 0x12345678, ("measurement", "ecg"))
MEASUREMENT_FRAME = (
    b"\x04\x01\x02\x07\x01\x01\x1a\x0eblood-pressure\x0242\x01\x88\x03i\xcf\x8f"
    b"\x01\x01\x0b\x02\x08systolic\x01\x01\x01\x01\x01\x016^@\x06mm[Hg]\tdiastolic"
    b"\x01\x04nres\x06mm[Hg]\x01\x0firregular-pulse%\x01An\x00"
)
MEASUREMENT_MESSAGE = codec.Measurement(
    "blood-pressure",
    "42",
    codec.TIME_DEVICE_CLOCK,
    1717171717000,
    (codec.MeasuredValue("systolic", 120.0, "mm[Hg]"), codec.MeasuredValue("diastolic", None, "mm[Hg]", "nres")),
    ("irregular-pulse",),
)
ACK_FRAME = b"\x04\x010\x03\x01\x01\x02\x07\x01\x01\x05\xc0\xfc!1\x00"


@pytest.mark.parametrize("raw,encoded", COBS_VECTORS)
def test_cobs_matches_published_vectors(raw: bytes, encoded: bytes) -> None:
    assert cobs.encode(raw) == encoded
    assert cobs.decode(encoded) == raw


@pytest.mark.parametrize("bad", [b"\x05\x11\x22", b"\x02\x00", b"\xff\x01"])
def test_cobs_rejects_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        cobs.decode(bad)


def test_crc32_native_and_table_agree() -> None:
    assert crc32(b"123456789") == CRC32_CHECK
    assert crc32_table(b"123456789") == CRC32_CHECK
    data = bytes(range(256)) * 5
    assert crc32(data) == crc32_table(data)
    assert crc32(data[100:], crc32(data[:100])) == crc32(data)
    # the MicroPython fallback continues a running CRC too (a frame checked in pieces)
    assert crc32_table(data[100:], crc32_table(data[:100])) == crc32(data)


def test_golden_frames_are_stable() -> None:
    assert codec.encode_message(HELLO_MESSAGE, 0) == HELLO_FRAME
    assert codec.encode_message(MEASUREMENT_MESSAGE, 7) == MEASUREMENT_FRAME
    assert codec.encode_message(codec.Ack(7), 3) == ACK_FRAME
    frame = codec.decode_frame(MEASUREMENT_FRAME[:-1])
    assert (frame.version, frame.msg_type, frame.seq) == (1, codec.MEASUREMENT, 7)
    assert codec.decode_message(frame) == MEASUREMENT_MESSAGE


ALL_MESSAGES: list[codec.Message] = [
    HELLO_MESSAGE,
    MEASUREMENT_MESSAGE,
    codec.EcgStart(9, codec.TIME_SYNCED, 1717171717000, 500, 4.88, ("I", "II", "V1")),
    codec.EcgBlock(9, 1000, 3, struct.pack("<6h", 1, -2, 3, -32768, 32767, 0)),
    codec.EcgEnd(9, 1002, codec.ECG_END_ABORTED),
    codec.TimeSync(1717171717123),
    codec.Ack(0xFFFFFFFF),
    codec.Nack(5, codec.NACK_REFUSED, "outbox full"),
    codec.Log(30, "UART framing errors: 3"),
    codec.SerialData(1, b"SYS 120 mmHg\r\n\x00\xff"),
]


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: codec.Message) -> None:
    wire = codec.encode_message(message, 1234)
    assert wire.endswith(b"\x00") and b"\x00" not in wire[:-1]
    frames = codec.FrameReader().feed(wire)
    assert len(frames) == 1 and frames[0].seq == 1234
    assert codec.decode_message(frames[0]) == message


def test_reader_resynchronises_after_garbage_and_split_frames() -> None:
    a = codec.encode_message(codec.Log(20, "first"), 1)
    b = codec.encode_message(codec.Log(20, "second"), 2)
    garbage = b"\x13\x37garbage at the wrong baud rate\xff\xfe"
    stream = garbage + b"\x00" + a + garbage + b"\x00" + b
    for cut in range(len(stream) + 1):  # every possible split point
        reader = codec.FrameReader()
        items = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        frames = [i for i in items if isinstance(i, codec.Frame)]
        assert [f.seq for f in frames] == [1, 2]
        assert all(isinstance(i, (codec.Frame, codec.FrameError)) for i in items)


def test_a_half_frame_followed_by_a_new_frame_costs_only_the_half() -> None:
    a = codec.encode_message(codec.Log(20, "cut by an unplug"), 1)
    b = codec.encode_message(codec.Log(20, "after replug"), 2)
    reader = codec.FrameReader()
    assert reader.feed(a[:10]) == []
    # The sender flushes with a leading delimiter after a reconnect; the receiver may also reset.
    items = reader.feed(b"\x00" + b)
    assert isinstance(items[0], codec.FrameError)
    assert [i.seq for i in items if isinstance(i, codec.Frame)] == [2]


def test_over_long_garbage_is_bounded_and_then_resyncs() -> None:
    reader = codec.FrameReader()
    assert reader.feed(b"\x55" * (codec.MAX_ENCODED * 3)) == []
    assert reader.pending == 0  # bounded: nothing kept while discarding
    items = reader.feed(b"\x00" + codec.encode_message(codec.Ack(1), 5))
    assert isinstance(items[0], codec.FrameError)
    assert isinstance(items[1], codec.Frame) and items[1].seq == 5


def test_bad_crc_and_bad_headers_are_typed_errors() -> None:
    wire = bytearray(codec.encode_message(codec.Ack(1), 1))
    body = bytearray(cobs.decode(bytes(wire[:-1])))
    body[-1] ^= 0x01
    with pytest.raises(codec.FrameError, match="CRC"):
        codec.decode_frame(cobs.encode(bytes(body)))
    with pytest.raises(codec.FrameError):
        codec.decode_frame(cobs.encode(b"\x01\x02\x03"))
    v2 = codec.decode_frame(codec.encode_frame(codec.ACK, 1, b"\x01\x00\x00\x00", version=2)[:-1])
    with pytest.raises(ProtocolError, match="version"):
        codec.decode_message(v2)
    unknown = codec.decode_frame(codec.encode_frame(0x7F, 1, b"")[:-1])
    with pytest.raises(ProtocolError, match="unknown message type"):
        codec.decode_message(unknown)


def test_lengths_from_the_wire_are_bounds_checked() -> None:
    # A string length byte that points past the payload.
    frame = codec.decode_frame(codec.encode_frame(codec.LOG, 1, b"\x14\xff" + b"x" * 3)[:-1])
    with pytest.raises(ProtocolError, match="too short"):
        codec.decode_message(frame)
    # Trailing bytes, and an ECG block that is not a whole number of samples.
    with pytest.raises(ProtocolError, match="trailing"):
        codec.decode_message(codec.decode_frame(codec.encode_frame(codec.ACK, 1, b"\x00" * 5)[:-1]))
    block = struct.pack("<IIB", 1, 0, 12) + b"\x00" * 23
    with pytest.raises(ProtocolError, match="whole number"):
        codec.decode_message(codec.decode_frame(codec.encode_frame(codec.ECG_BLOCK, 1, block)[:-1]))
    with pytest.raises(ProtocolError):
        codec.encode_frame(codec.LOG, 1, b"x" * (codec.MAX_PAYLOAD + 1))


# -- fuzzing: decode or raise the typed error, nothing else ---------------------------------


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=3000))
def test_fuzz_cobs_round_trip(data: bytes) -> None:
    encoded = cobs.encode(data)
    assert b"\x00" not in encoded
    assert cobs.decode(encoded) == data


@settings(deadline=None, max_examples=400)
@given(st.binary(max_size=600))
def test_fuzz_decode_frame_and_message(data: bytes) -> None:
    try:
        frame = codec.decode_frame(data)
    except codec.FrameError:
        return
    try:
        codec.decode_message(frame)
    except ProtocolError:
        pass


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(msg_type=st.sampled_from(sorted(codec.MESSAGE_CLASSES) + [0x7F]), payload=st.binary(max_size=300))
def test_fuzz_payloads_with_valid_crc(msg_type: int, payload: bytes) -> None:
    """Past the CRC, every payload decoder sees arbitrary bytes: only ProtocolError may escape."""
    frame = codec.decode_frame(codec.encode_frame(msg_type, 1, payload)[:-1])
    try:
        message = codec.decode_message(frame)
    except ProtocolError:
        return
    # Re-encoding is stable (compared as bytes: a NaN value never equals itself).
    again = codec.decode_message(codec.decode_frame(codec.encode_message(message, 1)[:-1]))
    assert again.encode_payload() == message.encode_payload()


def _mutate(payload: bytes, rng: random.Random) -> bytes:
    """One to three edits of a valid payload: a flipped bit, a boundary byte, a cut, an insertion,
    a deletion or trailing bytes. Mostly-valid payloads reach past the first field of a decoder."""
    data = bytearray(payload)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        if op == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[rng.randrange(len(data))] = rng.choice([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFE, 0xFF])
        elif op == 2:
            del data[rng.randrange(len(data) + 1) :]
        elif op == 3:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif op == 4 and data:
            del data[rng.randrange(len(data))]
        else:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


def _decode_behind_valid_crc(msg_type: int, payload: bytes) -> codec.Message:
    """Frame a payload with a correct COBS/CRC, read it back and decode the message: the CRC
    check passes by construction, so what is exercised is the message decoder."""
    items = codec.FrameReader().feed(codec.encode_frame(msg_type, 7, payload))
    assert len(items) == 1 and isinstance(items[0], codec.Frame), items  # the frame layer let it through
    return codec.decode_message(items[0])


def _refusal_kind(exc: ProtocolError) -> str:
    return re.sub(r"\d+", "N", str(exc))


def test_mutated_payloads_behind_a_valid_crc_reach_every_message_decoder() -> None:
    """The frame layer never stops these, so every decoder sees them; the coverage is checked by
    the outcomes: each message type both decodes some mutants and refuses others, for the reasons
    its fields can be wrong (length, UTF-8, value kind, lead count, whole samples)."""
    rng = random.Random(20)
    outcomes: dict[str, Counter[str]] = {}
    for message in ALL_MESSAGES:
        seen = outcomes.setdefault(type(message).__name__, Counter())
        payload = message.encode_payload()
        for _ in range(300):
            mutated = _mutate(payload, rng)
            try:
                decoded = _decode_behind_valid_crc(message.TYPE, mutated)
            except ProtocolError as exc:
                seen[_refusal_kind(exc)] += 1
                continue
            seen["decoded"] += 1
            again = _decode_behind_valid_crc(decoded.TYPE, decoded.encode_payload())
            assert again.encode_payload() == decoded.encode_payload()  # bytes: NaN never equals itself
    for name, seen in outcomes.items():
        assert seen["decoded"] and sum(seen.values()) > seen["decoded"], (name, seen)
        assert {"payload too short", "trailing bytes after the payload"} & set(seen), (name, seen)
    kinds = set().union(*outcomes.values())
    assert {
        "string is not UTF-N",
        "unknown value kind N",
        "ECG_START with N leads",
        "ECG_BLOCK with N leads",
        "ECG_BLOCK is not a whole number of samples",
    } <= kinds, kinds


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_MESSAGES), st.randoms(use_true_random=False))
def test_fuzz_mutated_payloads_decode_or_refuse(message: codec.Message, rng: random.Random) -> None:
    """Only ProtocolError may escape a decoder, and the gateway session survives the same frames."""
    from devices.bridge.session import BridgeSession

    mutated = _mutate(message.encode_payload(), rng)
    try:
        _decode_behind_valid_crc(message.TYPE, mutated)
    except ProtocolError:
        pass
    session = BridgeSession("/dev/ttyACM0", max_ecg_seconds=5.0)
    now = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    # a session that is past HELLO (and, for ECG, inside a recording) so the mutant reaches its handler
    session.receive_data(codec.encode_message(HELLO_MESSAGE, 1) + codec.encode_message(ALL_MESSAGES[2], 2), now)
    session.receive_data(codec.encode_frame(message.TYPE, 3, mutated), now)
    session.data_to_send()
    session.connection_lost(now)


@settings(deadline=None, max_examples=200)
@given(st.lists(st.binary(max_size=200), max_size=8), st.lists(st.sampled_from(ALL_MESSAGES), max_size=5))
def test_fuzz_stream_reader_with_valid_frames_among_garbage(chunks: list[bytes], messages: list[codec.Message]) -> None:
    reader = codec.FrameReader()
    got = []
    for chunk in chunks:
        got += reader.feed(chunk)
    assert all(isinstance(i, (codec.Frame, codec.FrameError)) for i in got)
    # Whatever came before, after a delimiter every valid frame is decoded.
    wire = b"\x00" + b"".join(codec.encode_message(m, i) for i, m in enumerate(messages))
    frames = [i for i in reader.feed(wire) if isinstance(i, codec.Frame)]
    assert [codec.decode_message(f) for f in frames] == messages


def test_duplicate_window_is_bounded() -> None:
    from devices.bridge.protocol import BridgeProtocol, DuplicateDropped, MessageReceived

    proto = BridgeProtocol(window=4)
    wire = [codec.encode_message(codec.Log(20, str(i)), i) for i in range(6)]
    assert all(isinstance(e, MessageReceived) for w in wire for e in proto.receive_data(w))
    assert isinstance(proto.receive_data(wire[5])[0], DuplicateDropped)
    assert isinstance(proto.receive_data(wire[0])[0], MessageReceived)  # aged out of the window


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(ALL_MESSAGES), st.integers(0, 20)).map(lambda m: codec.encode_message(*m)),
            st.tuples(st.sampled_from(sorted(codec.MESSAGE_CLASSES)), st.integers(0, 20), st.binary(max_size=120)).map(
                lambda t: codec.encode_frame(*t)
            ),
            st.binary(max_size=60),
        ),
        max_size=20,
    )
)
def test_fuzz_gateway_session_never_raises(chunks: list[bytes]) -> None:
    """Whatever a bridge sends, the gateway session answers with events, never an exception."""
    import datetime as dt

    from devices.bridge.session import BridgeSession

    session = BridgeSession("/dev/ttyACM0", max_ecg_seconds=5.0)
    now = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    for chunk in chunks:
        session.receive_data(chunk, now)
        session.data_to_send()
    session.connection_lost(now)
