"""The gateway side of the bridge protocol (devices/bridge/protocol.py), event by event.

What a slip costs: a resent ECG block stored twice, an ACK never repeated (the bridge resends
forever and its buffer fills), a NACK that says "malformed" where "unsupported" would have told the
firmware author to upgrade, a counter that hides a noisy cable from the technician.
"""

from __future__ import annotations

import pytest

from devices.bridge import codec
from devices.bridge.protocol import BridgeProtocol, DuplicateDropped, FrameRejected, MessageReceived


def _decode_all(wire: bytes) -> list[codec.Message]:
    return [codec.decode_message(f) for f in codec.FrameReader().feed(wire) if isinstance(f, codec.Frame)]


def _frames(wire: bytes) -> list[codec.Frame]:
    return [f for f in codec.FrameReader().feed(wire) if isinstance(f, codec.Frame)]


LOG = codec.Log(20, "hello")


def test_counters_start_at_zero_and_count_each_event() -> None:
    p = BridgeProtocol()
    assert (
        p.counters.frames,
        p.counters.bad_frames,
        p.counters.duplicates,
        p.counters.nacks_sent,
        p.counters.bytes_in,
    ) == (0, 0, 0, 0, 0)
    wire = codec.encode_message(LOG, 1)
    p.receive_data(wire)
    p.receive_data(wire)  # a duplicate
    p.receive_data(b"\x05garbage\x00")  # a bad frame
    p.reject(7, codec.NACK_REFUSED, "full")
    assert (p.counters.frames, p.counters.bad_frames, p.counters.duplicates, p.counters.nacks_sent) == (2, 1, 1, 1)
    assert p.counters.bytes_in == 2 * len(wire) + len(b"\x05garbage\x00")


def test_a_duplicate_is_reacknowledged_only_if_it_was_acknowledged() -> None:
    p = BridgeProtocol()
    wire = codec.encode_message(LOG, 5)
    assert p.receive_data(wire) == [MessageReceived(5, LOG)]
    assert p.receive_data(wire) == [DuplicateDropped(5, False)]  # not durable yet: no ACK
    assert p.data_to_send() == b""
    ack = p.acknowledge(5)
    assert _decode_all(ack) == [codec.Ack(5)]
    assert p.receive_data(wire) == [DuplicateDropped(5, True)]  # the ACK was lost: send it again
    assert _decode_all(p.data_to_send()) == [codec.Ack(5)]
    assert p.data_to_send() == b""  # handed out once


def test_outgoing_sequence_numbers_count_up_and_wrap() -> None:
    p = BridgeProtocol()
    assert [f.seq for f in _frames(p.send(LOG) + p.send(LOG) + p.acknowledge(9))] == [0, 1, 2]
    p._next_seq = 0xFFFFFFFF
    assert [f.seq for f in _frames(p.send(LOG) + p.send(LOG))] == [0xFFFFFFFF, 0]


def test_a_new_boot_of_the_bridge_forgets_the_old_window_the_same_boot_does_not() -> None:
    p = BridgeProtocol()
    hello = codec.Hello("BR-1", "fw", "1.0", 1, ("measurement",))
    assert p.receive_data(codec.encode_message(hello, 0)) == [MessageReceived(0, hello)] and p.boot_id == 1
    p.receive_data(codec.encode_message(LOG, 1))
    p.acknowledge(1)
    again = codec.encode_message(hello, 0)
    assert p.receive_data(again) == [DuplicateDropped(0, False)]  # the same boot: HELLO 0 is a resend
    assert p.receive_data(codec.encode_message(LOG, 1)) == [DuplicateDropped(1, True)]
    p.data_to_send()
    reboot = codec.Hello("BR-1", "fw", "1.0", 2, ("measurement",))
    assert p.receive_data(codec.encode_message(reboot, 0)) == [MessageReceived(0, reboot)] and p.boot_id == 2
    assert p.receive_data(codec.encode_message(LOG, 1)) == [MessageReceived(1, LOG)]  # new numbering
    assert p.data_to_send() == b""  # and nothing re-acknowledged from the old boot


def test_undecodable_frames_are_nacked_with_the_right_reason() -> None:
    p = BridgeProtocol()
    events = p.receive_data(codec.encode_frame(0x7F, 3, b"\x00"))  # a type we do not know
    assert isinstance(events[0], FrameRejected) and events[0].seq == 3
    (nack,) = _decode_all(p.data_to_send())
    assert isinstance(nack, codec.Nack) and (nack.seq, nack.reason) == (3, codec.NACK_UNSUPPORTED)
    p.receive_data(codec.encode_frame(LOG.TYPE, 4, b"\x01"))  # a known type, a broken payload
    (nack,) = _decode_all(p.data_to_send())
    assert (nack.seq, nack.reason) == (4, codec.NACK_MALFORMED)
    p.receive_data(codec.encode_frame(LOG.TYPE, 6, LOG.encode_payload(), version=codec.VERSION + 1))
    (nack,) = _decode_all(p.data_to_send())
    assert (nack.seq, nack.reason) == (6, codec.NACK_UNSUPPORTED)  # a newer protocol: upgrade
    p.receive_data(codec.encode_frame(codec.HELLO, 8, b"\x01"))
    (nack,) = _decode_all(p.data_to_send())
    assert (nack.seq, nack.reason) == (8, codec.NACK_MALFORMED)


def test_nack_texts_are_cut_at_200_characters() -> None:
    p = BridgeProtocol()
    (nack,) = _decode_all(p.reject(1, codec.NACK_REFUSED, "x" * 300))
    assert nack.text == "x" * 200
    (nack,) = _decode_all(p.reject(2, codec.NACK_REFUSED, "y" * 200))
    assert nack.text == "y" * 200


def test_a_rejected_message_may_come_again() -> None:
    p = BridgeProtocol()
    wire = codec.encode_message(LOG, 9)
    p.receive_data(wire)
    p.reject(9, codec.NACK_REFUSED, "outbox full")
    assert p.receive_data(wire) == [MessageReceived(9, LOG)]  # not taken for a duplicate


@pytest.mark.parametrize("window", [1, 4])
def test_the_duplicate_window_holds_exactly_its_size(window: int) -> None:
    p = BridgeProtocol(window=window)
    for seq in range(window + 1):
        p.receive_data(codec.encode_message(LOG, seq))
    # the newest `window` are remembered, the oldest forgotten
    assert p.receive_data(codec.encode_message(LOG, window)) == [DuplicateDropped(window, False)]
    assert p.receive_data(codec.encode_message(LOG, 0)) == [MessageReceived(0, LOG)]


def test_the_default_window_is_4096() -> None:
    p = BridgeProtocol()
    for seq in range(4097):
        p.receive_data(codec.encode_message(LOG, seq))
    assert p.receive_data(codec.encode_message(LOG, 1)) == [DuplicateDropped(1, False)]
    assert p.receive_data(codec.encode_message(LOG, 4096)) == [DuplicateDropped(4096, False)]
    assert p.receive_data(codec.encode_message(LOG, 0)) == [MessageReceived(0, LOG)]  # forgotten


def test_every_undecodable_frame_counts_one_nack_sent() -> None:
    """The NACK counter counts refusals of frames we could not decode too, one each: a bridge
    whose firmware sends what we cannot read shows on the technician's counters."""
    p = BridgeProtocol()
    p.receive_data(codec.encode_frame(0x7F, 3, b"\x00"))  # a type we do not know
    assert p.counters.nacks_sent == 1
    p.receive_data(codec.encode_frame(LOG.TYPE, 4, b"\x01") + codec.encode_frame(codec.HELLO, 8, b"\x01"))
    assert p.counters.nacks_sent == 3 and len(_decode_all(p.data_to_send())) == 3
