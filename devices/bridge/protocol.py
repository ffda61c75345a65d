"""Gateway side of the bridge protocol, sans-I/O (in the manner of h11).

    proto = BridgeProtocol()
    for event in proto.receive_data(chunk):      # bytes from the port
        ...                                      # make durable what must be
        port.write(proto.acknowledge(event.seq)) # ACK only once durable
    port.write(proto.data_to_send())             # automatic replies (re-ACKs, NACKs)

What it does for the caller: reassembles frames and resynchronises after garbage, checks
CRC and version, decodes messages, drops duplicate sequence numbers (re-ACKing at once a
duplicate of something already acknowledged, so the bridge stops resending it), and NACKs
well-formed frames it cannot decode. It never touches a port, a clock or a database.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from devices.bridge import codec
from devices.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class MessageReceived:
    seq: int
    message: codec.Message


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """A frame was dropped; `seq` is None when the frame itself could not be trusted."""

    reason: str
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class DuplicateDropped:
    seq: int
    reacknowledged: bool


BridgeEvent = MessageReceived | FrameRejected | DuplicateDropped


class _SeqWindow:
    """The last `size` sequence numbers, for duplicate detection (bounded memory, oldest forgotten),
    each with the fingerprint of the frame that carried it (0 where only the number matters)."""

    def __init__(self, size: int) -> None:
        self._members: OrderedDict[int, int] = OrderedDict()
        self._size = size

    def __contains__(self, seq: int) -> bool:
        return seq in self._members

    def holds(self, seq: int, fingerprint: int) -> bool:
        """`seq` was seen on a frame with this fingerprint: the same frame again."""
        return self._members.get(seq) == fingerprint

    def add(self, seq: int, fingerprint: int = 0) -> None:
        self._members[seq] = fingerprint
        self._members.move_to_end(seq)
        if len(self._members) > self._size:
            self._members.popitem(last=False)

    def discard(self, seq: int) -> None:
        self._members.pop(seq, None)

    def clear(self) -> None:
        self._members.clear()


@dataclass
class ProtocolCounters:
    frames: int = 0
    bad_frames: int = 0
    duplicates: int = 0
    nacks_sent: int = 0
    bytes_in: int = 0


class BridgeProtocol:
    """One bridge connection as seen by the gateway (both directions)."""

    def __init__(self, *, window: int = 4096) -> None:
        self._reader = codec.FrameReader()
        self._seen = _SeqWindow(window)
        self._acked = _SeqWindow(window)
        self._out = bytearray()
        self._next_seq = 0
        self.boot_id: int | None = None
        self.counters = ProtocolCounters()

    # -- incoming ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[BridgeEvent]:
        self.counters.bytes_in += len(data)
        events: list[BridgeEvent] = []
        for item in self._reader.feed(bytes(data)):
            if isinstance(item, codec.FrameError):
                self.counters.bad_frames += 1
                events.append(FrameRejected(str(item)))
                continue
            events.extend(self._frame(item))
        return events

    def _frame(self, frame: codec.Frame) -> list[BridgeEvent]:
        self.counters.frames += 1
        if frame.msg_type == codec.HELLO and frame.version == codec.VERSION:
            # A new boot of the bridge restarts its sequence numbers: forget the old window.
            try:
                hello = codec.decode_message(frame)
            except ProtocolError as exc:
                return [self._refuse(frame.seq, codec.NACK_MALFORMED, str(exc))]
            assert isinstance(hello, codec.Hello)
            if hello.boot_id != self.boot_id:
                self.boot_id = hello.boot_id
                self._seen.clear()
                self._acked.clear()
            return self._deliver(frame, hello)
        # the frame's CRC tells a resend from a new frame under the same number: a bridge resends
        # the frame it kept, byte for byte, while a restarted bridge whose HELLO was lost, or its
        # last words after a crash, numbers new frames from 0 again
        if self._seen.holds(frame.seq, frame.crc):
            return [self._duplicate(frame.seq)]
        try:
            message = codec.decode_message(frame)
        except ProtocolError as exc:
            reason = (
                codec.NACK_UNSUPPORTED
                if frame.version != codec.VERSION or frame.msg_type not in codec.MESSAGE_CLASSES
                else codec.NACK_MALFORMED
            )
            return [self._refuse(frame.seq, reason, str(exc))]
        return self._deliver(frame, message)

    def _deliver(self, frame: codec.Frame, message: codec.Message) -> list[BridgeEvent]:
        seq, fingerprint = frame.seq, frame.crc
        if self._seen.holds(seq, fingerprint):
            return [self._duplicate(seq)]
        self._seen.add(seq, fingerprint)
        self._acked.discard(seq)  # an ACK given to the old frame under this number is not this one's
        return [MessageReceived(seq, message)]

    def _duplicate(self, seq: int) -> DuplicateDropped:
        """Drop a resent frame; if it was acknowledged already, the ACK was lost: send it again."""
        self.counters.duplicates += 1
        again = seq in self._acked
        if again:
            self._out += codec.encode_message(codec.Ack(seq), self._take_seq())
        return DuplicateDropped(seq, again)

    def _refuse(self, seq: int, reason: int, text: str) -> FrameRejected:
        self.counters.nacks_sent += 1
        self._out += codec.encode_message(codec.Nack(seq, reason, text[:200]), self._take_seq())
        return FrameRejected(text, seq)

    def connection_lost(self) -> None:
        """The link dropped: a half-received frame is garbage now (the window is kept)."""
        self._reader.reset()

    # -- outgoing ---------------------------------------------------------------------------

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq = (self._next_seq + 1) & 0xFFFFFFFF
        return seq

    def send(self, message: codec.Message) -> bytes:
        """Frame a message for the bridge (TIME_SYNC, LOG ...)."""
        return codec.encode_message(message, self._take_seq())

    def acknowledge(self, seq: int) -> bytes:
        """The message `seq` is durable: tell the bridge it may forget it."""
        self._acked.add(seq)
        return codec.encode_message(codec.Ack(seq), self._take_seq())

    def reject(self, seq: int, reason: int, text: str = "") -> bytes:
        """Refuse message `seq` (e.g. NACK_REFUSED when it cannot be stored): the bridge may resend.

        The sequence number is forgotten so that the resent copy is not taken for a duplicate.
        """
        self._seen.discard(seq)
        self.counters.nacks_sent += 1
        return codec.encode_message(codec.Nack(seq, reason, text[:200]), self._take_seq())

    def data_to_send(self) -> bytes:
        """Replies the protocol produced by itself since the last call (re-ACKs, NACKs)."""
        out = bytes(self._out)
        self._out.clear()
        return out
