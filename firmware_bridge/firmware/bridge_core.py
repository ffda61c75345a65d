"""The bridge's protocol logic, free of hardware: runs on MicroPython and under CPython tests.

`BridgeCore` turns what happens on the board (a line from the legacy device's RS-232 port, a
measurement, ECG samples, bytes from the gateway, the passing of time) into bytes for the USB
link. It keeps every reliable message until the gateway ACKs it and resends it, with the same
sequence number, on a doubling timeout. Times are milliseconds of a monotonic clock passed in
(`time.ticks_ms()` on the board, anything under test): no clock is read here.

MicroPython constraints kept: no `__future__`, dataclasses or typing at run time; only the
shared codec (`devices.bridge.codec`), which the board carries as the same file.
"""

from devices.bridge import codec

FIRMWARE_VERSION = "1.0.0"
MODEL = "lastmile-bridge-rp2040"
LINE_MAX = 512  # longest forwarded line; longer input is forwarded in pieces of this size
MAX_PENDING = 64  # unacknowledged reliable messages kept (RAM bound: 64 x ~520 bytes)
RESEND_MS = 2000
RESEND_MAX_MS = 30000


class _Pending:
    def __init__(self, seq: int, frame: bytes, due_ms: int, interval_ms: int) -> None:
        self.seq = seq
        self.frame = frame
        self.due_ms = due_ms
        self.interval_ms = interval_ms


class BridgeCore:
    """One bridge: build frames for the gateway, track ACKs, resend, forward lines."""

    def __init__(
        self,
        device_id: str,
        boot_id: int,
        capabilities: tuple = ("serial-forward", "time-sync"),
        model: str = MODEL,
        firmware_version: str = FIRMWARE_VERSION,
        first_seq: int = 0,
    ) -> None:
        self.device_id = device_id
        self.boot_id = boot_id & 0xFFFFFFFF
        self.capabilities = tuple(capabilities)
        self.model = model
        self.firmware_version = firmware_version
        self._seq = first_seq
        self._reader = codec.FrameReader()
        self._pending = []  # oldest first
        self._line = b""  # bytes, not bytearray: bytearray.find is missing on some MicroPython ports
        self._clock_offset_ms = None  # unix_ms - monotonic ms, once the gateway sent TIME_SYNC
        self.dropped = 0  # reliable messages dropped because the gateway was away too long
        self.gateway_seen = False

    # -- clock ------------------------------------------------------------------------------

    def time_stamp(self, now_ms: int) -> tuple:
        """(time_flags, device_time_ms) for a message made now."""
        if self._clock_offset_ms is None:
            return codec.TIME_UNKNOWN, 0
        return codec.TIME_SYNCED, self._clock_offset_ms + now_ms

    # -- sending ----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return seq

    def send(self, message, now_ms: int, reliable: bool = True) -> bytes:
        """Frame `message`; reliable ones are kept until the gateway acknowledges them."""
        seq = self._next_seq()
        frame = codec.encode_message(message, seq)
        if reliable:
            if len(self._pending) >= MAX_PENDING:
                self._pending.pop(0)
                self.dropped += 1
            self._pending.append(_Pending(seq, frame, now_ms + RESEND_MS, RESEND_MS))
        return frame

    def hello(self, now_ms: int) -> bytes:
        """What to send at power-up or when the gateway says HELLO: a flush, our HELLO, and
        everything still unacknowledged (same sequence numbers)."""
        msg = codec.Hello(self.device_id, self.model, self.firmware_version, self.boot_id, self.capabilities)
        out = b"\x00" + self.send(msg, now_ms)
        for p in self._pending[:-1]:
            out += p.frame
            p.due_ms = now_ms + p.interval_ms
        return out

    def measurement(self, kind: str, values: tuple, now_ms: int, record_id: str = "", flags: tuple = ()) -> bytes:
        time_flags, device_ms = self.time_stamp(now_ms)
        return self.send(codec.Measurement(kind, record_id, time_flags, device_ms, values, flags), now_ms)

    def log(self, level: int, text: str, now_ms: int) -> bytes:
        return self.send(codec.Log(level, text[:255]), now_ms)

    def uart_bytes(self, data: bytes, now_ms: int, channel: int = 0) -> bytes:
        """Bytes from the legacy port: forward each complete line (through LF) as SERIAL_DATA."""
        out = b""
        self._line += bytes(data)
        while True:
            end = self._line.find(b"\n")
            if end < 0:
                if len(self._line) >= LINE_MAX:  # no line end in sight: forward a piece
                    out += self.send(codec.SerialData(channel, self._line[:LINE_MAX]), now_ms)
                    self._line = self._line[LINE_MAX:]
                    continue
                return out
            cut = min(end + 1, LINE_MAX)
            out += self.send(codec.SerialData(channel, self._line[:cut]), now_ms)
            self._line = self._line[cut:]

    def uart_idle(self, now_ms: int, channel: int = 0) -> bytes:
        """The legacy port went quiet: forward a last line that had no line end."""
        if not self._line:
            return b""
        data = self._line
        self._line = b""
        return self.send(codec.SerialData(channel, data), now_ms)

    # -- receiving ---------------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def pending_seqs(self) -> list:
        return [p.seq for p in self._pending]

    def receive(self, data: bytes, now_ms: int) -> bytes:
        """Bytes from the gateway; returns bytes to send back."""
        out = b""
        for item in self._reader.feed(data):
            if not isinstance(item, codec.Frame):
                continue  # a damaged frame: the gateway will resend what matters
            try:
                msg = codec.decode_message(item)
            except codec.ProtocolError:
                continue
            self.gateway_seen = True
            if isinstance(msg, codec.Ack):
                self._forget(msg.seq)
            elif isinstance(msg, codec.Nack):
                if msg.reason == codec.NACK_REFUSED:
                    self._postpone(msg.seq, now_ms)
                else:  # will never be accepted as it is
                    self._forget(msg.seq)
            elif isinstance(msg, codec.TimeSync):
                if msg.unix_ms > 0:
                    self._clock_offset_ms = msg.unix_ms - now_ms
            elif isinstance(msg, codec.Hello):
                out += self.hello(now_ms)
        return out

    def _forget(self, seq: int) -> None:
        for i in range(len(self._pending)):
            if self._pending[i].seq == seq:
                del self._pending[i]
                return

    def _postpone(self, seq: int, now_ms: int) -> None:
        for p in self._pending:
            if p.seq == seq:
                p.interval_ms = min(p.interval_ms * 2, RESEND_MAX_MS)
                p.due_ms = now_ms + p.interval_ms

    def connection_lost(self) -> None:
        self._reader.reset()

    def poll(self, now_ms: int) -> bytes:
        """Resend what is due (doubling the interval each time)."""
        out = b""
        for p in self._pending:
            if now_ms - p.due_ms >= 0:
                out += p.frame
                p.interval_ms = min(p.interval_ms * 2, RESEND_MAX_MS)
                p.due_ms = now_ms + p.interval_ms
        return out
