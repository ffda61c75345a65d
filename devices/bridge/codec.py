"""Bridge protocol codec: frames and messages, shared by the gateway and the bridge firmware.

Wire format (docs/bridge-protocol.md is the reference for firmware authors):

    frame   = COBS(body) 0x00
    body    = header payload crc32
    header  = version:u8 type:u8 seq:u32          (little-endian)
    crc32   = CRC-32/IEEE of header+payload, u32 little-endian

This module runs unchanged on MicroPython (the reference firmware imports it) and on CPython:
so no `__future__`, dataclasses or typing at run time, only `struct` and our `cobs`/`crc`.
Message classes are therefore plain classes with `__eq__`/`__repr__`. Every length read from
the wire is bounds-checked; malformed input raises `ProtocolError` (or `FrameError`), nothing else.
"""

import struct

from devices.bridge import cobs
from devices.bridge.crc import crc32

try:
    from devices.errors import ProtocolError
except ImportError:  # on a board that carries only devices/bridge/
    from devices.bridge.cobs import ProtocolError  # type: ignore[attr-defined]

VERSION = 1
HEADER_FORMAT = "<BBI"
HEADER_SIZE = 6
CRC_SIZE = 4
MAX_BODY = 4096  # header + payload + CRC; an ECG block of 12 leads x 169 samples fits
MAX_PAYLOAD = MAX_BODY - HEADER_SIZE - CRC_SIZE
MAX_ENCODED = MAX_BODY + MAX_BODY // 254 + 2  # COBS worst case

# Message types (the header's type byte).
HELLO = 0x01
MEASUREMENT = 0x02
ECG_START = 0x10
ECG_BLOCK = 0x11
ECG_END = 0x12
TIME_SYNC = 0x20
ACK = 0x30
NACK = 0x31
LOG = 0x40
SERIAL_DATA = 0x50

# How far a device time stamp can be trusted (MEASUREMENT, ECG_START).
TIME_UNKNOWN = 0  # no clock: the gateway uses its receipt time
TIME_DEVICE_CLOCK = 1  # the device's own clock (RTC), never corrected by us
TIME_SYNCED = 2  # the device's clock, set from the gateway's last TIME_SYNC

# NACK reasons.
NACK_UNSUPPORTED = 1  # version or message type not supported
NACK_MALFORMED = 2  # payload does not decode
NACK_UNKNOWN_RECORDING = 3  # ECG_BLOCK/ECG_END for a recording that was never started
NACK_REFUSED = 4  # understood, but the gateway will not keep it (e.g. outbox full): resend later

# ECG_END status.
ECG_END_COMPLETE = 0
ECG_END_ABORTED = 1  # stopped early (lead off, user cancel): what arrived is still a recording

MAX_LEADS = 16
MAX_STRING = 255


class FrameError(ProtocolError):
    """A frame that cannot be trusted at all (COBS, length or CRC): its sequence number is unknown."""


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def pack(self, fmt: str, *values) -> None:
        self.buf.extend(struct.pack(fmt, *values))

    def string(self, text: str) -> None:
        raw = text.encode("utf-8")
        if len(raw) > MAX_STRING:
            raise ProtocolError("string longer than 255 bytes")
        self.buf.append(len(raw))
        self.buf.extend(raw)

    def blob16(self, data: bytes) -> None:
        if len(data) > 0xFFFF:
            raise ProtocolError("blob longer than 65535 bytes")
        self.buf.extend(struct.pack("<H", len(data)))
        self.buf.extend(data)

    def strings(self, items) -> None:
        if len(items) > 255:
            raise ProtocolError("more than 255 strings")
        self.buf.append(len(items))
        for s in items:
            self.string(s)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise ProtocolError("payload too short")
        chunk = self.data[self.pos : end]
        self.pos = end
        return bytes(chunk)

    def unpack(self, fmt: str, size: int):
        return struct.unpack(fmt, self.take(size))

    def u8(self) -> int:
        return self.take(1)[0]

    def string(self) -> str:
        raw = self.take(self.u8())
        try:
            return raw.decode("utf-8")
        except UnicodeError:
            raise ProtocolError("string is not UTF-8") from None

    def strings(self) -> tuple:
        return tuple(self.string() for _ in range(self.u8()))

    def blob16(self) -> bytes:
        (n,) = self.unpack("<H", 2)
        return self.take(n)

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes after the payload")


class Message:
    """Base of all messages; `TYPE` is the header's type byte, `FIELDS` the attributes."""

    TYPE = 0
    FIELDS = ()

    def as_tuple(self) -> tuple:
        return tuple(getattr(self, f) for f in self.FIELDS)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.as_tuple() == other.as_tuple()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.as_tuple()))

    def __repr__(self) -> str:
        parts = ", ".join("%s=%r" % (f, getattr(self, f)) for f in self.FIELDS)
        return "%s(%s)" % (type(self).__name__, parts)

    def encode_payload(self) -> bytes:
        raise NotImplementedError


class Hello(Message):
    """First message after (re)connect: who the bridge is. A new `boot_id` starts a new session."""

    TYPE = HELLO
    FIELDS = ("device_id", "model", "firmware_version", "boot_id", "capabilities")

    def __init__(
        self, device_id: str, model: str, firmware_version: str, boot_id: int, capabilities: tuple = ()
    ) -> None:
        self.device_id = device_id
        self.model = model
        self.firmware_version = firmware_version
        self.boot_id = boot_id
        self.capabilities = tuple(capabilities)

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.string(self.device_id)
        w.string(self.model)
        w.string(self.firmware_version)
        w.pack("<I", self.boot_id)
        w.strings(self.capabilities)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, r: _Reader) -> "Hello":
        device_id = r.string()
        model = r.string()
        firmware = r.string()
        (boot_id,) = r.unpack("<I", 4)
        return cls(device_id, model, firmware, boot_id, r.strings())


# Value kinds inside a MEASUREMENT.
VALUE_NUMBER = 0  # f64
VALUE_NONE = 1  # no value; a reason string follows ("nan", "nres", "+inf", "-inf", ...)


class MeasuredValue(Message):
    """One value of a MEASUREMENT: `value` None means the device had no value (`special` says why)."""

    FIELDS = ("code", "value", "unit", "special")

    def __init__(self, code: str, value, unit: str, special: str = "") -> None:
        self.code = code
        self.value = value
        self.unit = unit
        self.special = special


class Measurement(Message):
    """A measurement event: typed values with (UCUM) units, taken together."""

    TYPE = MEASUREMENT
    FIELDS = ("kind", "record_id", "time_flags", "device_time_ms", "values", "flags")

    def __init__(
        self, kind: str, record_id: str, time_flags: int, device_time_ms: int, values: tuple, flags: tuple = ()
    ) -> None:
        self.kind = kind
        self.record_id = record_id  # the device's own id for this reading ("" if none)
        self.time_flags = time_flags
        self.device_time_ms = device_time_ms  # ms since the Unix epoch on the device clock
        self.values = tuple(values)
        self.flags = tuple(flags)

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.string(self.kind)
        w.string(self.record_id)
        w.pack("<Bq", self.time_flags, self.device_time_ms)
        if len(self.values) > 255:
            raise ProtocolError("more than 255 values")
        w.buf.append(len(self.values))
        for v in self.values:
            w.string(v.code)
            if v.value is None:
                w.buf.append(VALUE_NONE)
                w.string(v.special or "nres")
            else:
                w.buf.append(VALUE_NUMBER)
                w.pack("<d", v.value)
            w.string(v.unit)
        w.strings(self.flags)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, r: _Reader) -> "Measurement":
        kind = r.string()
        record_id = r.string()
        time_flags, device_time_ms = r.unpack("<Bq", 9)
        values = []
        for _ in range(r.u8()):
            code = r.string()
            tag = r.u8()
            if tag == VALUE_NUMBER:
                (value,) = r.unpack("<d", 8)
                special = ""
            elif tag == VALUE_NONE:
                value = None
                special = r.string()
            else:
                raise ProtocolError("unknown value kind %d" % tag)
            values.append(MeasuredValue(code, value, r.string(), special))
        return cls(kind, record_id, time_flags, device_time_ms, tuple(values), r.strings())


class EcgStart(Message):
    """Start of a streamed ECG: its leads, rate and scale. Blocks follow with the same recording id."""

    TYPE = ECG_START
    FIELDS = ("recording_id", "time_flags", "device_time_ms", "sampling_rate_hz", "uv_per_unit", "lead_names")

    def __init__(
        self,
        recording_id: int,
        time_flags: int,
        device_time_ms: int,
        sampling_rate_hz: int,
        uv_per_unit: float,
        lead_names: tuple,
    ) -> None:
        self.recording_id = recording_id
        self.time_flags = time_flags
        self.device_time_ms = device_time_ms  # time of sample 0
        self.sampling_rate_hz = sampling_rate_hz
        self.uv_per_unit = uv_per_unit
        self.lead_names = tuple(lead_names)

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.pack(
            "<IBqHd", self.recording_id, self.time_flags, self.device_time_ms, self.sampling_rate_hz, self.uv_per_unit
        )
        w.strings(self.lead_names)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, r: _Reader) -> "EcgStart":
        rec, flags, t, rate, scale = r.unpack("<IBqHd", 23)
        leads = r.strings()
        if not 1 <= len(leads) <= MAX_LEADS:
            raise ProtocolError("ECG_START with %d leads" % len(leads))
        return cls(rec, flags, t, rate, scale, leads)


class EcgBlock(Message):
    """`samples`: int16 little-endian, sample-interleaved (all leads of sample k, then k+1 ...).

    `first_sample` is the sample counter of the block's first sample (0 = the recording's first):
    a jump in the counter is a gap, a repeat is a duplicate.
    """

    TYPE = ECG_BLOCK
    FIELDS = ("recording_id", "first_sample", "n_leads", "samples")

    def __init__(self, recording_id: int, first_sample: int, n_leads: int, samples: bytes) -> None:
        self.recording_id = recording_id
        self.first_sample = first_sample
        self.n_leads = n_leads
        self.samples = samples

    @property
    def n_samples(self) -> int:
        return len(self.samples) // (2 * self.n_leads)

    def encode_payload(self) -> bytes:
        if len(self.samples) % (2 * self.n_leads):
            raise ProtocolError("ECG block is not a whole number of samples")
        return struct.pack("<IIB", self.recording_id, self.first_sample, self.n_leads) + bytes(self.samples)

    @classmethod
    def decode_payload(cls, r: _Reader) -> "EcgBlock":
        rec, first, n_leads = r.unpack("<IIB", 9)
        data = r.rest()
        if not 1 <= n_leads <= MAX_LEADS:
            raise ProtocolError("ECG_BLOCK with %d leads" % n_leads)
        if not data or len(data) % (2 * n_leads):
            raise ProtocolError("ECG_BLOCK is not a whole number of samples")
        return cls(rec, first, n_leads, data)


class EcgEnd(Message):
    """End of a streamed ECG; `total_samples` is the counter after its last sample."""

    TYPE = ECG_END
    FIELDS = ("recording_id", "total_samples", "status")

    def __init__(self, recording_id: int, total_samples: int, status: int = ECG_END_COMPLETE) -> None:
        self.recording_id = recording_id
        self.total_samples = total_samples
        self.status = status

    def encode_payload(self) -> bytes:
        return struct.pack("<IIB", self.recording_id, self.total_samples, self.status)

    @classmethod
    def decode_payload(cls, r: _Reader) -> "EcgEnd":
        return cls(*r.unpack("<IIB", 9))


class TimeSync(Message):
    """Gateway -> bridge: the current UTC time. Bridge -> gateway: a request (its clock, 0 = none)."""

    TYPE = TIME_SYNC
    FIELDS = ("unix_ms",)

    def __init__(self, unix_ms: int) -> None:
        self.unix_ms = unix_ms

    def encode_payload(self) -> bytes:
        return struct.pack("<q", self.unix_ms)

    @classmethod
    def decode_payload(cls, r: _Reader) -> "TimeSync":
        return cls(*r.unpack("<q", 8))


class Ack(Message):
    """The message with sequence number `seq` is durable at the gateway: forget it."""

    TYPE = ACK
    FIELDS = ("seq",)

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def encode_payload(self) -> bytes:
        return struct.pack("<I", self.seq)

    @classmethod
    def decode_payload(cls, r: _Reader) -> "Ack":
        return cls(*r.unpack("<I", 4))


class Nack(Message):
    """The message `seq` was refused (`reason` NACK_*); `text` is for the log."""

    TYPE = NACK
    FIELDS = ("seq", "reason", "text")

    def __init__(self, seq: int, reason: int, text: str = "") -> None:
        self.seq = seq
        self.reason = reason
        self.text = text

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.pack("<IB", self.seq, self.reason)
        w.string(self.text)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, r: _Reader) -> "Nack":
        seq, reason = r.unpack("<IB", 5)
        return cls(seq, reason, r.string())


class Log(Message):
    """A log line from the bridge; `level` as Python logging (10 debug ... 40 error)."""

    TYPE = LOG
    FIELDS = ("level", "text")

    def __init__(self, level: int, text: str) -> None:
        self.level = level
        self.text = text

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.buf.append(self.level & 0xFF)
        w.string(self.text)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, r: _Reader) -> "Log":
        level = r.u8()
        return cls(level, r.string())


class SerialData(Message):
    """Bytes the bridge received on one of its legacy ports (`channel`), forwarded verbatim."""

    TYPE = SERIAL_DATA
    FIELDS = ("channel", "data")

    def __init__(self, channel: int, data: bytes) -> None:
        self.channel = channel
        self.data = bytes(data)

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.buf.append(self.channel & 0xFF)
        w.blob16(self.data)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, r: _Reader) -> "SerialData":
        channel = r.u8()
        return cls(channel, r.blob16())


MESSAGE_CLASSES = {
    cls.TYPE: cls for cls in (Hello, Measurement, EcgStart, EcgBlock, EcgEnd, TimeSync, Ack, Nack, Log, SerialData)
}


class Frame:
    """A checked frame whose payload is not yet decoded; `crc` is its CRC (header and payload), as
    read off the wire (`decode_frame`)."""

    def __init__(self, version: int, msg_type: int, seq: int, payload: bytes, crc: int) -> None:
        self.version = version
        self.msg_type = msg_type
        self.seq = seq
        self.payload = payload
        self.crc = crc

    def __eq__(self, other) -> bool:
        return isinstance(other, Frame) and (self.version, self.msg_type, self.seq, self.payload) == (
            other.version,
            other.msg_type,
            other.seq,
            other.payload,
        )

    def __repr__(self) -> str:
        return "Frame(version=%d, type=0x%02x, seq=%d, %d bytes)" % (
            self.version,
            self.msg_type,
            self.seq,
            len(self.payload),
        )


def encode_frame(msg_type: int, seq: int, payload: bytes, version: int = VERSION) -> bytes:
    """Header + payload + CRC, COBS-encoded, with the 0x00 delimiter."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    body = struct.pack(HEADER_FORMAT, version, msg_type, seq & 0xFFFFFFFF) + payload
    body += struct.pack("<I", crc32(body))
    return cobs.encode(body) + b"\x00"


def encode_message(message: Message, seq: int) -> bytes:
    return encode_frame(message.TYPE, seq, message.encode_payload())


def decode_frame(encoded: bytes) -> Frame:
    """Decode one frame (without its delimiter); FrameError if it cannot be trusted."""
    if len(encoded) > MAX_ENCODED:
        raise FrameError("frame longer than %d bytes" % MAX_ENCODED)
    try:
        body = cobs.decode(encoded)
    except ProtocolError as exc:
        raise FrameError(str(exc)) from None
    if len(body) < HEADER_SIZE + CRC_SIZE:
        raise FrameError("frame of %d bytes is shorter than header and CRC" % len(body))
    if len(body) > MAX_BODY:
        raise FrameError("frame body longer than %d bytes" % MAX_BODY)
    (sent_crc,) = struct.unpack("<I", body[-CRC_SIZE:])
    if crc32(body[:-CRC_SIZE]) != sent_crc:
        raise FrameError("CRC mismatch")
    version, msg_type, seq = struct.unpack(HEADER_FORMAT, body[:HEADER_SIZE])
    return Frame(version, msg_type, seq, body[HEADER_SIZE:-CRC_SIZE], sent_crc)


def decode_message(frame: Frame) -> Message:
    """Decode a frame's payload; ProtocolError for unknown versions, types or bad payloads."""
    if frame.version != VERSION:
        raise ProtocolError("unsupported protocol version %d" % frame.version)
    cls = MESSAGE_CLASSES.get(frame.msg_type)
    if cls is None:
        raise ProtocolError("unknown message type 0x%02x" % frame.msg_type)
    r = _Reader(frame.payload)
    message = cls.decode_payload(r)
    r.done()
    return message


class FrameReader:
    """Reassembles frames from a byte stream; resynchronises at the next 0x00 after garbage.

    `feed(data)` returns a list whose items are `Frame`s or `FrameError`s (errors are values,
    so one bad frame never stops the stream). Empty frames (0x00 0x00) are ignored: senders
    put a 0x00 before their first frame after a (re)connect to flush a half-received frame.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._overflow = False  # discarding an over-long frame until the next delimiter

    def reset(self) -> None:
        """Forget a partial frame (the link dropped mid-frame)."""
        self._buf = bytearray()
        self._overflow = False

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list:
        out = []  # type: list[Frame | FrameError]
        start = 0
        n = len(data)
        while start < n:
            end = data.find(b"\x00", start)
            if end < 0:
                self._append(data, start, n)
                break
            self._append(data, start, end)
            start = end + 1
            if self._overflow:
                out.append(FrameError("frame longer than %d bytes" % MAX_ENCODED))
                self._overflow = False
                self._buf = bytearray()
                continue
            if not self._buf:
                continue
            encoded = bytes(self._buf)
            self._buf = bytearray()
            try:
                out.append(decode_frame(encoded))
            except FrameError as exc:
                out.append(exc)
        return out

    def _append(self, data: bytes, start: int, end: int) -> None:
        if self._overflow:
            return
        if len(self._buf) + (end - start) > MAX_ENCODED:
            self._overflow = True
            self._buf = bytearray()
            return
        self._buf.extend(data[start:end])
