"""What a bridge connection means for the gateway: devices, observations, ECG recordings.

`BridgeSession` sits on `BridgeProtocol` and turns messages into application events. It
acknowledges by itself only what needs no storage (HELLO, LOG, TIME_SYNC requests);
MEASUREMENT, ECG_END and SERIAL_DATA wait for the application's `acknowledge(seq)` once
what they carried is durable. ECG_START/ECG_BLOCK are never acknowledged one by one: the
ACK of ECG_END covers the whole recording (docs/bridge-protocol.md).

Sans-I/O: times come in as arguments (`now`, aware UTC datetimes), bytes go out as return values.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from dataclasses import dataclass

from devices.bridge import codec
from devices.bridge.ecg_stream import DEFAULT_MAX_SECONDS, EcgAssembler
from devices.bridge.protocol import BridgeProtocol, FrameRejected, MessageReceived
from devices.ecg.recording import EcgRecording
from devices.errors import InvalidRecordingError, ProtocolError
from devices.identity import DeviceIdentity, TimeSource, plausible_device_time
from devices.observation import Observation, Quantity

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
MAX_OPEN_RECORDINGS = 2


@dataclass(frozen=True, slots=True)
class DeviceHello:
    seq: int
    identity: DeviceIdentity
    capabilities: tuple[str, ...]
    boot_id: int


@dataclass(frozen=True, slots=True)
class ObservationReady:
    """Store `observation`, then `acknowledge(seq)`."""

    seq: int
    observation: Observation


@dataclass(frozen=True, slots=True)
class RecordingReady:
    """Store `recording` under `key`, then `acknowledge(seq)`; seq None: the link dropped (nothing to ACK)."""

    seq: int | None
    recording: EcgRecording
    key: str


@dataclass(frozen=True, slots=True)
class EcgEndUnknown:
    """ECG_END of a recording not in progress here: `acknowledge(seq)` if `key` is already durable
    (stored before this gateway restarted: only its ACK was lost, and a NACK would make the nurse
    take the ECG again - a duplicate study), else `reject(seq, NACK_UNKNOWN_RECORDING)`."""

    seq: int
    key: str


@dataclass(frozen=True, slots=True)
class SerialDataReceived:
    """Bytes from a legacy port of the bridge; acknowledge once what they completed is durable."""

    seq: int
    channel: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DeviceLog:
    level: int
    text: str


@dataclass(frozen=True, slots=True)
class SessionProblem:
    """Something was dropped or refused (bad frame, bad message); for status and logs."""

    reason: str
    seq: int | None = None


SessionEvent = (
    DeviceHello | ObservationReady | RecordingReady | EcgEndUnknown | SerialDataReceived | DeviceLog | SessionProblem
)


def device_time(time_flags: int, device_time_ms: int, received_at: dt.datetime) -> tuple[dt.datetime, TimeSource]:
    """A device time stamp, or the receipt time when the device's clock cannot be believed."""
    if time_flags in (codec.TIME_DEVICE_CLOCK, codec.TIME_SYNCED) and device_time_ms > 0:
        try:
            when = EPOCH + dt.timedelta(milliseconds=device_time_ms)
        except OverflowError:
            when = None
        if when is not None and plausible_device_time(when, received_at):
            source = TimeSource.DEVICE_CLOCK_CORRECTED if time_flags == codec.TIME_SYNCED else TimeSource.DEVICE_CLOCK
            return when, source
    return received_at, TimeSource.GATEWAY_RECEIPT


def unix_ms(now: dt.datetime) -> int:
    return int((now - EPOCH).total_seconds() * 1000)


def _quantity(value: codec.MeasuredValue) -> Quantity:
    number = value.value
    special = value.special or None
    if number is not None and not math.isfinite(number):
        special = "nan" if math.isnan(number) else ("+inf" if number > 0 else "-inf")
        number = None
    return Quantity(
        code=value.code,
        value=number,
        unit=value.unit,
        sent_value=number,
        sent_unit=value.unit,
        special=special if number is None else None,
    )


def _samples_digest(recording: EcgRecording) -> str:
    digest = hashlib.sha256(recording.samples.tobytes())
    digest.update(repr((recording.lead_names, recording.sampling_rate_hz, recording.gaps)).encode())
    return digest.hexdigest()[:32]


class BridgeSession:
    """One connected bridge, from the gateway's side."""

    def __init__(
        self,
        address: str,
        *,
        gateway_hello: codec.Hello | None = None,
        max_ecg_seconds: float = DEFAULT_MAX_SECONDS,
        window: int = 4096,
    ) -> None:
        self.address = address
        self.protocol = BridgeProtocol(window=window)
        self.gateway_hello = gateway_hello or codec.Hello("lastmile", "lastmile-gateway", "", 0)
        self.max_ecg_seconds = max_ecg_seconds
        self.identity = DeviceIdentity(address=address)
        self.hello: codec.Hello | None = None
        self._recordings: dict[int, EcgAssembler] = {}
        self._out = bytearray()

    # -- link events ---------------------------------------------------------------------

    def connection_made(self, now: dt.datetime) -> bytes:
        """Bytes to send on (re)connect: a delimiter to flush any half frame, our HELLO (the
        bridge answers with its own) and the time."""
        return b"\x00" + self.protocol.send(self.gateway_hello) + self.time_sync(now)

    def connection_lost(self, now: dt.datetime) -> list[SessionEvent]:
        """The link dropped: a half frame is garbage; recordings in progress are kept as truncated."""
        self.protocol.connection_lost()
        events: list[SessionEvent] = []
        for rec_id in list(self._recordings):
            events.extend(self._close_recording(rec_id, None, None))
        return events

    def time_sync(self, now: dt.datetime) -> bytes:
        return self.protocol.send(codec.TimeSync(unix_ms(now)))

    def acknowledge(self, seq: int) -> bytes:
        return self.protocol.acknowledge(seq)

    def reject(self, seq: int, reason: int = codec.NACK_REFUSED, text: str = "") -> bytes:
        return self.protocol.reject(seq, reason, text)

    def data_to_send(self) -> bytes:
        out = bytes(self._out) + self.protocol.data_to_send()
        self._out.clear()
        return out

    @property
    def recordings_in_progress(self) -> int:
        return len(self._recordings)

    # -- incoming ------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: dt.datetime) -> list[SessionEvent]:
        events: list[SessionEvent] = []
        for ev in self.protocol.receive_data(data):
            if isinstance(ev, MessageReceived):
                try:
                    events.extend(self._message(ev.seq, ev.message, now))
                except (ProtocolError, InvalidRecordingError) as exc:
                    self._out += self.protocol.reject(ev.seq, codec.NACK_MALFORMED, str(exc))
                    events.append(SessionProblem(str(exc), ev.seq))
            elif isinstance(ev, FrameRejected):
                events.append(SessionProblem(ev.reason, ev.seq))
        return events

    def _message(self, seq: int, msg: codec.Message, now: dt.datetime) -> list[SessionEvent]:
        if isinstance(msg, codec.Hello):
            return self._hello(seq, msg, now)
        if isinstance(msg, codec.Measurement):
            return [ObservationReady(seq, self._observation(msg, now))]
        if isinstance(msg, codec.EcgStart):
            return self._ecg_start(seq, msg, now)
        if isinstance(msg, codec.EcgBlock):
            return self._ecg_block(seq, msg)
        if isinstance(msg, codec.EcgEnd):
            if msg.recording_id not in self._recordings:
                return [EcgEndUnknown(seq, self._recording_key(msg.recording_id))]
            return self._close_recording(msg.recording_id, msg, seq)
        if isinstance(msg, codec.TimeSync):
            self._out += self.protocol.acknowledge(seq) + self.time_sync(now)
            return []
        if isinstance(msg, codec.Log):
            self._out += self.protocol.acknowledge(seq)
            return [DeviceLog(msg.level, msg.text)]
        if isinstance(msg, codec.SerialData):
            return [SerialDataReceived(seq, msg.channel, msg.data)]
        # ACK/NACK from the bridge answer frames we sent: nothing waits for them.
        return []

    def _hello(self, seq: int, msg: codec.Hello, now: dt.datetime) -> list[SessionEvent]:
        events: list[SessionEvent] = []
        if self.hello is not None and self.hello.boot_id != msg.boot_id:
            # The bridge restarted: what it was streaming will never continue.
            for rec_id in list(self._recordings):
                events.extend(self._close_recording(rec_id, None, None))
        self.hello = msg
        self.identity = DeviceIdentity(
            model=msg.model, serial=msg.device_id, address=self.address, software_version=msg.firmware_version
        )
        self._out += self.protocol.acknowledge(seq) + self.time_sync(now)
        events.append(DeviceHello(seq, self.identity, msg.capabilities, msg.boot_id))
        return events

    def _recording_key(self, rec_id: int) -> str:
        boot = self.hello.boot_id if self.hello is not None else 0
        return f"bridge-ecg:{self._device_key()}:{boot}:{rec_id}"

    def _device_key(self) -> str:
        if self.hello is not None and self.hello.device_id:
            return self.hello.device_id
        return self.address

    def _observation(self, msg: codec.Measurement, now: dt.datetime) -> Observation:
        if not msg.values:
            raise ProtocolError("MEASUREMENT without values")
        measured_at, source = device_time(msg.time_flags, msg.device_time_ms, now)
        if msg.record_id:
            key = f"bridge:{self._device_key()}:{msg.record_id}"
        else:  # the content identifies a resent reading even across gateway restarts
            digest = hashlib.sha256(
                repr((msg.kind, msg.time_flags, msg.device_time_ms, [v.as_tuple() for v in msg.values])).encode()
            ).hexdigest()
            key = f"bridge:{self._device_key()}:sha256:{digest[:32]}"
        return Observation(
            kind=msg.kind or "measurement",
            quantities=tuple(_quantity(v) for v in msg.values),
            measured_at=measured_at,
            time_source=source,
            received_at=now,
            device=self.identity,
            record_key=key,
            flags=tuple(msg.flags),
        )

    def _ecg_start(self, seq: int, msg: codec.EcgStart, now: dt.datetime) -> list[SessionEvent]:
        events: list[SessionEvent] = []
        if msg.recording_id in self._recordings:  # restarted under the same id: keep what we had
            events.extend(self._close_recording(msg.recording_id, None, None))
        acquired_at, source = device_time(msg.time_flags, msg.device_time_ms, now)
        try:
            assembler = EcgAssembler(
                msg, acquired_at=acquired_at, time_source=source, device=self.identity, max_seconds=self.max_ecg_seconds
            )
        except ProtocolError as exc:
            # Refused here, not raised: the recording closed above must reach the caller.
            self._out += self.protocol.reject(seq, codec.NACK_MALFORMED, str(exc))
            return [*events, SessionProblem(str(exc), seq)]
        if len(self._recordings) >= MAX_OPEN_RECORDINGS:
            oldest = next(iter(self._recordings))
            events.extend(self._close_recording(oldest, None, None))
        self._recordings[msg.recording_id] = assembler
        return events

    def _ecg_block(self, seq: int, msg: codec.EcgBlock) -> list[SessionEvent]:
        assembler = self._recordings.get(msg.recording_id)
        if assembler is None:
            self._out += self.protocol.reject(seq, codec.NACK_UNKNOWN_RECORDING, "no such recording in progress")
            return [SessionProblem("ECG_BLOCK for an unknown recording", seq)]
        assembler.add_block(msg)
        return []

    def _close_recording(self, rec_id: int, end: codec.EcgEnd | None, seq: int | None) -> list[SessionEvent]:
        assembler = self._recordings.pop(rec_id)
        key = self._recording_key(rec_id)
        try:
            recording = assembler.finish(end)
        except (ProtocolError, InvalidRecordingError) as exc:
            if seq is not None:
                self._out += self.protocol.reject(seq, codec.NACK_MALFORMED, str(exc))
            return [SessionProblem(f"ECG recording {rec_id} dropped: {exc}", seq)]
        if end is None:
            # Cut without its ECG_END (restarted under its id, evicted, reboot, unplug): no END will
            # ever look for it, and its id may carry the next take, which must not find this one
            # "already stored". Its samples name it.
            key += ":truncated:" + _samples_digest(recording)
        return [RecordingReady(seq, recording, key)]
