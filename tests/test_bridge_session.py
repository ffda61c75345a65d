"""BridgeSession's own rules, message by message: device times, values, keys, answers on the wire."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from devices.bridge import codec
from devices.bridge.session import (
    BridgeSession,
    DeviceHello,
    DeviceLog,
    ObservationReady,
    RecordingReady,
    SessionProblem,
    device_time,
)
from devices.ecg.recording import STANDARD_12_LEADS
from devices.identity import EARLIEST_PLAUSIBLE, TimeSource

NOW = dt.datetime(2025, 3, 4, 10, 0, 0, 123000, tzinfo=dt.timezone.utc)
NOW_MS = 1741082400123


def _ms(when: dt.datetime) -> int:
    return round(when.timestamp() * 1000)


def _sent(data: bytes) -> list[codec.Message]:
    return [codec.decode_message(f) for f in codec.FrameReader().feed(data) if isinstance(f, codec.Frame)]


def _session(boot_id: int = 7, device_id: str = "BR-1") -> BridgeSession:
    session = BridgeSession("/dev/ttyACM0")
    session.receive_data(codec.encode_message(codec.Hello(device_id, "bridge-v2", "1.4", boot_id), 1), NOW)
    session.data_to_send()
    return session


def test_device_times_are_believed_only_within_their_limits() -> None:
    ahead = NOW + dt.timedelta(minutes=10)
    # a synced clock is "corrected", the device's own RTC is not: the record says which
    assert device_time(codec.TIME_SYNCED, _ms(ahead), NOW) == (ahead, TimeSource.DEVICE_CLOCK_CORRECTED)
    assert device_time(codec.TIME_DEVICE_CLOCK, _ms(EARLIEST_PLAUSIBLE), NOW) == (
        EARLIEST_PLAUSIBLE,
        TimeSource.DEVICE_CLOCK,
    )
    # one millisecond past ten minutes ahead, or before 2020: a clock that was never set
    receipt = (NOW, TimeSource.GATEWAY_RECEIPT)
    assert device_time(codec.TIME_SYNCED, _ms(ahead) + 1, NOW) == receipt
    assert device_time(codec.TIME_DEVICE_CLOCK, _ms(EARLIEST_PLAUSIBLE) - 1, NOW) == receipt
    # a device that says it has no clock is not believed even with a plausible number
    assert device_time(codec.TIME_UNKNOWN, _ms(NOW), NOW) == receipt
    assert device_time(codec.TIME_SYNCED, 2**62, NOW) == receipt  # overflow: not a crash


def test_time_sync_carries_the_gateway_time_to_the_millisecond() -> None:
    session = BridgeSession("/dev/ttyACM0")
    (sync,) = _sent(session.time_sync(NOW))
    assert isinstance(sync, codec.TimeSync) and sync.unix_ms == NOW_MS
    # on connect: a delimiter, our HELLO (boot 0: the gateway has no boots of its own), then the time
    out = session.connection_made(NOW)
    assert out[:1] == b"\x00"
    hello, sync = _sent(out)
    assert isinstance(hello, codec.Hello) and hello.device_id == "lastmile" and hello.boot_id == 0
    assert isinstance(sync, codec.TimeSync) and sync.unix_ms == NOW_MS
    # the bridge asking for the time is answered with an ACK and the time
    session.receive_data(codec.encode_message(codec.TimeSync(0), 5), NOW)
    ack, sync = _sent(session.data_to_send())
    assert isinstance(ack, codec.Ack) and ack.seq == 5 and isinstance(sync, codec.TimeSync)


def test_acknowledge_and_reject_answer_on_the_wire() -> None:
    session = _session()
    session.receive_data(codec.encode_message(codec.SerialData(0, b"abc"), 9), NOW)
    (ack,) = _sent(session.acknowledge(9))
    assert isinstance(ack, codec.Ack) and ack.seq == 9
    session.receive_data(codec.encode_message(codec.SerialData(0, b"def"), 10), NOW)
    (nack,) = _sent(session.reject(10, codec.NACK_REFUSED, "outbox full"))
    assert isinstance(nack, codec.Nack) and (nack.seq, nack.reason, nack.text) == (
        10,
        codec.NACK_REFUSED,
        "outbox full",
    )
    session.receive_data(codec.encode_message(codec.Log(3, "low battery"), 11), NOW)
    assert session.receive_data(codec.encode_message(codec.Log(3, "again"), 12), NOW) == [DeviceLog(3, "again")]


def _reading(record_id: str, *values: codec.MeasuredValue, flags: int = codec.TIME_SYNCED) -> codec.Measurement:
    return codec.Measurement("body-temperature", record_id, flags, _ms(NOW) - 60_000, values)


def test_values_keep_their_reason_when_the_device_had_none() -> None:
    session = _session()
    values = (
        codec.MeasuredValue("body-temperature", 36.6, "Cel"),
        codec.MeasuredValue("a", math.nan, "Cel"),
        codec.MeasuredValue("b", math.inf, "Cel"),
        codec.MeasuredValue("c", -math.inf, "Cel"),
        codec.MeasuredValue("d", None, "Cel", "nres"),
        codec.MeasuredValue("e", 1.0, "Cel", "ignored"),
    )
    (ready,) = session.receive_data(codec.encode_message(_reading("r-1", *values), 2), NOW)
    assert isinstance(ready, ObservationReady) and ready.seq == 2
    got = [(q.code, q.value, q.special) for q in ready.observation.quantities]
    # a NaN or infinity never reaches a chart as a number; a value that exists carries no reason
    assert got == [
        ("body-temperature", 36.6, None),
        ("a", None, "nan"),
        ("b", None, "+inf"),
        ("c", None, "-inf"),
        ("d", None, "nres"),
        ("e", 1.0, None),
    ]
    obs = ready.observation
    assert obs.kind == "body-temperature"
    assert obs.measured_at == NOW - dt.timedelta(minutes=1) and obs.time_source is TimeSource.DEVICE_CLOCK_CORRECTED
    assert obs.record_key == "bridge:BR-1:r-1" and obs.device.serial == "BR-1" and obs.received_at == NOW


def test_readings_without_a_record_id_are_keyed_by_content_and_by_address_without_a_serial() -> None:
    value = codec.MeasuredValue("body-temperature", 36.6, "Cel")
    session = _session(device_id="")
    (first,) = session.receive_data(codec.encode_message(_reading("", value), 2), NOW)
    (again,) = session.receive_data(codec.encode_message(_reading("", value), 3), NOW)
    key = first.observation.record_key
    # the same reading resent is the same key (deduplicated), keyed under the port when no serial
    assert key == again.observation.record_key and key.startswith("bridge:/dev/ttyACM0:sha256:")
    assert len(key.rsplit(":", 1)[1]) == 32
    (other,) = session.receive_data(
        codec.encode_message(_reading("", codec.MeasuredValue("body-temperature", 36.7, "Cel")), 4), NOW
    )
    assert other.observation.record_key != key
    # a MEASUREMENT without values is refused with a NACK, not stored as an empty reading
    (problem,) = session.receive_data(codec.encode_message(_reading(""), 5), NOW)
    assert isinstance(problem, SessionProblem) and problem.seq == 5
    (nack,) = _sent(session.data_to_send())
    assert isinstance(nack, codec.Nack) and nack.reason == codec.NACK_MALFORMED


def _start(rec_id: int) -> bytes:
    start = codec.EcgStart(rec_id, codec.TIME_SYNCED, _ms(NOW), 500, 2.5, STANDARD_12_LEADS)
    block = codec.EcgBlock(rec_id, 0, 12, bytes(24 * 4))
    return codec.encode_message(start, 100 + rec_id) + codec.encode_message(block, 200 + rec_id)


def test_open_recordings_are_bounded_and_a_reboot_closes_them() -> None:
    session = _session()
    assert session.receive_data(_start(1) + _start(2), NOW) == [] and session.recordings_in_progress == 2
    # a third stream: the oldest is kept as truncated (its samples are not thrown away)
    (closed,) = session.receive_data(_start(3), NOW)
    assert (
        isinstance(closed, RecordingReady)
        and closed.key.startswith("bridge-ecg:BR-1:7:1:truncated:")
        and closed.seq is None
    )
    assert closed.recording.flags == ("ecg-truncated",) and session.recordings_in_progress == 2
    # the same boot says HELLO again (reconnect): the streams go on
    events = session.receive_data(codec.encode_message(codec.Hello("BR-1", "bridge-v2", "1.4", 7), 50), NOW)
    assert [type(e) for e in events] == [DeviceHello] and session.recordings_in_progress == 2
    # a new boot: what it was streaming will never continue
    events = session.receive_data(codec.encode_message(codec.Hello("BR-1", "bridge-v2", "1.4", 8), 51), NOW)
    assert [type(e) for e in events] == [RecordingReady, RecordingReady, DeviceHello]
    assert session.recordings_in_progress == 0


@pytest.mark.parametrize("seconds", [0.004])
def test_max_ecg_seconds_reaches_the_assembler(seconds: float) -> None:
    session = BridgeSession("/dev/ttyACM0", max_ecg_seconds=seconds)  # 2 samples at 500 Hz
    (problem,) = session.receive_data(_start(1), NOW)
    assert isinstance(problem, SessionProblem) and "exceeds" in problem.reason


def test_kind_defaults_and_keys_before_any_hello() -> None:
    session = BridgeSession("/dev/ttyACM0")
    value = codec.MeasuredValue("spo2", 97.0, "%")
    (ready,) = session.receive_data(codec.encode_message(codec.Measurement("spo2", "r", 0, 0, (value,)), 1), NOW)
    assert ready.observation.kind == "spo2"
    (ready,) = session.receive_data(codec.encode_message(codec.Measurement("", "s", 0, 0, (value,)), 2), NOW)
    assert ready.observation.kind == "measurement"  # a kind the bridge left out is not invented
    # a stream cut before the bridge said who it is: boot 0, keyed under the port
    session.receive_data(_start(4), NOW)
    (lost,) = session.connection_lost(NOW)
    assert lost.key.startswith("bridge-ecg:/dev/ttyACM0:0:4:truncated:")


def test_a_reading_resent_within_the_bridges_4096_frame_window_is_stored_once() -> None:
    """The session keeps the bridge's window of 4096 sequence numbers: a reading resent after a
    lost ACK 4095 frames later is dropped (not stored twice), while the frame 4096 back is
    forgotten, so a number the bridge uses again is a new reading (not one lost as a duplicate)."""
    session = BridgeSession("/dev/ttyACM0")
    first = codec.encode_message(_reading("r0", codec.MeasuredValue("body-temperature", 36.6, "Cel")), 0)
    resent = codec.encode_message(_reading("r1", codec.MeasuredValue("body-temperature", 38.2, "Cel")), 1)
    logs = b"".join(codec.encode_message(codec.Log(20, "tick"), seq) for seq in range(2, 4097))
    events = session.receive_data(first + resent + logs, NOW)
    assert sum(isinstance(e, ObservationReady) for e in events) == 2
    assert session.receive_data(resent, NOW) == []
    (again,) = session.receive_data(first, NOW)
    assert isinstance(again, ObservationReady) and again.seq == 0


def test_a_bad_ecg_start_never_costs_the_recordings_already_streaming() -> None:
    """An ECG_START the gateway refuses (here a 0 Hz rate: a firmware bug behind a good CRC) is
    NACKed; the two recordings in progress are not thrown away with it: one restarted under the
    refused start's id is kept (truncated), the other streams on."""
    session = _session()
    session.receive_data(_start(1) + _start(2), NOW)
    bad = codec.EcgStart(1, codec.TIME_SYNCED, _ms(NOW), 0, 2.5, STANDARD_12_LEADS)
    events = session.receive_data(codec.encode_message(bad, 300), NOW)
    kept = [e for e in events if isinstance(e, RecordingReady)]
    assert [e.recording.n_samples for e in kept] == [4], events  # recording 1: kept, not lost
    assert "ecg-truncated" in kept[0].recording.flags
    assert any(isinstance(e, SessionProblem) and e.seq == 300 for e in events)
    (nack,) = _sent(session.data_to_send())
    assert isinstance(nack, codec.Nack) and (nack.seq, nack.reason) == (300, codec.NACK_MALFORMED)
    # recording 2 goes on and ends as a whole recording
    block = codec.EcgBlock(2, 4, 12, bytes(24 * 4))
    end = codec.EcgEnd(2, 8)
    (ready,) = session.receive_data(codec.encode_message(block, 301) + codec.encode_message(end, 302), NOW)
    assert isinstance(ready, RecordingReady) and ready.seq == 302 and ready.recording.n_samples == 8
