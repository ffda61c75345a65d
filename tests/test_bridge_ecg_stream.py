"""Streamed ECG: blocks become a recording; gaps flagged, duplicates dropped; 10 minutes over a pty."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import numpy as np
import pytest

from devices.bridge import codec, ecg_stream
from devices.bridge.ecg_stream import GAP_FILL, BlockOutcome, EcgAssembler
from devices.bridge.session import BridgeSession, RecordingReady, SessionProblem
from devices.ecg.recording import STANDARD_12_LEADS, SampleGap
from devices.errors import ProtocolError
from devices.identity import DeviceIdentity, TimeSource
from firmware_bridge.bridge_simulator import EcgStreamSimulator, ecg_samples
from firmware_bridge.firmware.bridge_core import BridgeCore
from firmware_bridge.serial_link import LinkSpec, PortMatch
from tests.serial_pty import ManagerThread, PtyDevice, SessionHandler
from tests.waiting import wait_for

NOW = dt.datetime(2025, 3, 4, 10, 0, tzinfo=dt.timezone.utc)
START = codec.EcgStart(1, codec.TIME_SYNCED, int(NOW.timestamp() * 1000) - 5000, 500, 2.5, STANDARD_12_LEADS)


def _block(first: int, n: int = 25) -> codec.EcgBlock:
    return codec.EcgBlock(1, first, 12, ecg_samples(first, n).astype("<i2").tobytes())


def _assembler(**kw: object) -> EcgAssembler:
    return EcgAssembler(
        START,
        acquired_at=NOW,
        time_source=TimeSource.DEVICE_CLOCK_CORRECTED,
        device=DeviceIdentity(serial="BR-1"),
        **kw,
    )  # type: ignore[arg-type]


def test_gaps_duplicates_and_overlaps() -> None:
    a = _assembler()
    assert a.add_block(_block(0)).accepted == 25
    out = a.add_block(_block(50))  # 25..49 never arrived
    assert out.gap == SampleGap(25, 25)
    assert a.add_block(_block(50)).duplicate == 25  # a resend
    out = a.add_block(_block(60, 40))  # overlaps 60..74, new 75..99
    assert (out.accepted, out.duplicate) == (25, 15)
    rec = a.finish(codec.EcgEnd(1, 110))  # 100..109 missing at the end
    # Missing samples are absent; each gap says before which received sample they belong.
    assert rec.samples.shape == (12, 75)
    assert rec.gaps == (SampleGap(25, 25), SampleGap(75, 10))
    assert rec.flags == ("sample-gap",)
    have = np.ones(110, bool)
    have[25:50] = have[100:] = False
    assert np.array_equal(rec.samples, ecg_samples(0, 110).T[:, have])
    assert not (rec.samples == GAP_FILL).any()
    assert rec.source_format == "bridge" and rec.sampling_rate_hz == 500.0 and rec.uv_per_unit == 2.5


def test_negative_rail_never_looks_like_a_gap() -> None:
    a = _assembler()
    a.add_block(codec.EcgBlock(1, 0, 12, np.full((2, 12), -32768, "<i2").tobytes()))
    rec = a.finish(codec.EcgEnd(1, 2))
    assert (rec.samples == -32767).all() and rec.gaps == ()


def test_bad_streams_raise_protocol_errors() -> None:
    a = _assembler(max_seconds=1.0)
    with pytest.raises(ProtocolError, match="leads"):
        a.add_block(codec.EcgBlock(1, 0, 3, b"\x00" * 6))
    with pytest.raises(ProtocolError, match="exceeds"):
        a.add_block(_block(0xFFFFFF00))  # a wild counter must not allocate gigabytes
    with pytest.raises(ProtocolError, match="without samples"):
        a.finish(codec.EcgEnd(1, 0))
    with pytest.raises(ProtocolError):
        EcgAssembler(
            codec.EcgStart(1, 0, 0, 0, 2.5, ("I",)),
            acquired_at=NOW,
            time_source=TimeSource.UNKNOWN,
            device=DeviceIdentity(),
        )
    with pytest.raises(ProtocolError):
        EcgAssembler(
            codec.EcgStart(1, 0, 0, 500, 2.5, ("I", "I")),
            acquired_at=NOW,
            time_source=TimeSource.UNKNOWN,
            device=DeviceIdentity(),
        )


def test_session_streams_a_recording_and_flags_truncation() -> None:
    core = BridgeCore("BR-9", boot_id=3)
    core.receive(codec.encode_message(codec.TimeSync(int(NOW.timestamp() * 1000)), 0), now_ms=0)
    sim = EcgStreamSimulator(core, recording_id=5)
    session = BridgeSession("/dev/serial/by-id/usb-bridge")
    wire = core.hello(0) + sim.start(0) + b"".join(sim.blocks(4, skip={1})) + sim.end(100, 200)
    events = session.receive_data(wire, NOW)
    ready = [e for e in events if isinstance(e, RecordingReady)]
    assert len(ready) == 1 and ready[0].seq is not None
    rec = ready[0].recording
    assert rec.gaps == (SampleGap(25, 25),) and "sample-gap" in rec.flags
    assert rec.time_source is TimeSource.DEVICE_CLOCK_CORRECTED and rec.acquired_at == NOW
    assert rec.device.serial == "BR-9" and ready[0].key == "bridge-ecg:BR-9:3:5"
    # A second recording cut by an unplug: what arrived is kept, flagged, with nothing to ACK.
    sim2 = EcgStreamSimulator(core, recording_id=6)
    session.receive_data(sim2.start(0) + b"".join(sim2.blocks(2)) + sim2.block(50)[:30], NOW)
    lost = session.connection_lost(NOW)
    assert len(lost) == 1 and lost[0].seq is None and lost[0].recording.n_samples == 50
    assert lost[0].recording.flags == ("ecg-truncated",)
    # Blocks for a recording never started are refused (NACK), not invented.
    problems = session.receive_data(sim2.block(75), NOW)
    assert isinstance(problems[0], SessionProblem)
    nack = codec.decode_message(codec.FrameReader().feed(session.data_to_send())[-1])
    assert isinstance(nack, codec.Nack) and nack.reason == codec.NACK_UNKNOWN_RECORDING


def test_ten_minutes_of_12_lead_500_hz_over_a_pty(tmp_path: Path) -> None:
    """300,000 samples x 12 leads, faster than real time: 0 lost, 0 duplicated, gaps only where made."""
    rate, block = 500, 25
    n_blocks = 10 * 60 * rate // block  # 12,000 blocks
    skip = {100, 101, 5000, n_blocks - 2}
    duplicate = {200, 7000, 11000}
    dev = PtyDevice(tmp_path / "usb-ecg-bridge")
    core = BridgeCore("BR-ECG", boot_id=11)
    sim = EcgStreamSimulator(core, recording_id=1, sampling_rate_hz=rate, block_samples=block)
    made: list[SessionHandler] = []

    def factory(spec: LinkSpec, port: object) -> SessionHandler:
        made.append(SessionHandler())
        return made[-1]

    with ManagerThread(
        [LinkSpec("ecg", PortMatch(path=str(dev.link_path)), "bridge")], factory, watch_dirs=None, rescan_s=0.1
    ):
        wait_for(lambda: made and made[0].session is not None)
        dev.read_available(0.2)

        def stream() -> None:
            dev.write(core.hello(0) + sim.start(0))
            chunk = bytearray()
            for i, frame in enumerate(sim.blocks(n_blocks, skip=skip, duplicate=duplicate)):
                chunk += frame
                if i % 3000 == 1500:  # line noise between frames, ended by a delimiter
                    chunk += b"\x7f\x80 noise \x01\x02\x00"
                if len(chunk) > 32768:
                    dev.write(bytes(chunk))
                    chunk.clear()
            dev.write(bytes(chunk) + sim.end(n_blocks * block, 0))

        writer = threading.Thread(target=stream, daemon=True)
        writer.start()
        wait_for(lambda: made[0].of_type(RecordingReady), timeout=120)
        writer.join(60)
        assert not writer.is_alive()
    dev.unplug()

    rec = made[0].of_type(RecordingReady)[0].recording
    total = n_blocks * block
    have = np.ones(total, bool)
    for b in skip:
        have[b * block : (b + 1) * block] = False
    assert rec.samples.shape == (12, int(have.sum()))  # every sample sent, each once
    # Gaps exactly where the simulator skipped blocks (start = index among received samples).
    assert rec.gaps == (SampleGap(2500, 50), SampleGap(125000 - 50, 25), SampleGap(total - 50 - 75, 25))
    assert np.array_equal(rec.samples, ecg_samples(0, total).T[:, have])  # 0 lost, 0 changed, 0 duplicated
    assert not (rec.samples == GAP_FILL).any()
    session = made[0].session
    assert session is not None and session.protocol.counters.bad_frames == 4  # only the noise


def _start(rate: int = 500, scale: float = 2.5, leads: tuple[str, ...] = ("I", "II")) -> codec.EcgStart:
    return codec.EcgStart(1, 0, 0, rate, scale, leads)


def _make(start: codec.EcgStart, **kw: object) -> EcgAssembler:
    return EcgAssembler(start, acquired_at=NOW, time_source=TimeSource.UNKNOWN, device=DeviceIdentity(), **kw)  # type: ignore[arg-type]


def test_start_limits_refuse_what_would_mis_scale_or_mis_time_the_trace() -> None:
    # the slowest and fastest rates we take are taken; one beyond is a corrupt header, not an ECG
    assert _make(_start(rate=1)).max_samples == 1800 and _make(_start(rate=2000)).start.sampling_rate_hz == 2000
    for rate in (0, 2001):
        with pytest.raises(ProtocolError, match="sampling rate"):
            _make(_start(rate=rate))
    # a zero, negative, absurd or NaN scale would draw a flat or exploded trace
    for scale in (0.0, -2.5, 1e6, float("nan"), float("inf")):
        with pytest.raises(ProtocolError, match="scale"):
            _make(_start(scale=scale))
    assert _make(_start(scale=999_999.0)).start.uv_per_unit == 999_999.0
    with pytest.raises(ProtocolError, match="unique and non-empty"):  # a lead the reader cannot name
        _make(_start(leads=("I", " ")))


def test_stream_length_limit_is_exact() -> None:
    a = _make(_start(rate=25, leads=("I",)), max_seconds=0.4)  # 10 samples at most
    assert a.max_samples == 10
    assert a.add_block(codec.EcgBlock(1, 0, 1, np.arange(10, dtype="<i2").tobytes())).accepted == 10
    with pytest.raises(ProtocolError, match="exceeds 10 samples"):
        a.add_block(codec.EcgBlock(1, 10, 1, b"\x01\x00"))
    # an ECG_END claiming a tail past the limit: the samples that arrived are kept, flagged, not padded
    lying = a.finish(codec.EcgEnd(1, 11))
    assert lying.n_samples == 10 and lying.gaps == () and lying.flags == ("sample-count-mismatch",)
    rec = a.finish(codec.EcgEnd(1, 10))
    assert rec.n_samples == 10 and rec.gaps == () and rec.flags == ()


def test_counters_and_end_status_flags() -> None:
    a = _make(_start(leads=("I",)))
    assert a.recording_id == 1 and a.n_leads == 1
    block = codec.EcgBlock(1, 0, 1, np.arange(4, dtype="<i2").tobytes())
    a.add_block(block)
    assert a.add_block(block) == BlockOutcome(0, 4, None)  # a resend adds nothing
    a.add_block(codec.EcgBlock(1, 2, 1, np.arange(2, 6, dtype="<i2").tobytes()))  # 2 old, 2 new
    assert (a.samples_held, a.duplicates, a.blocks) == (6, 6, 2)
    # the device stopped early (lead off): the doctor must see it was not a full recording
    assert a.finish(codec.EcgEnd(1, 6, codec.ECG_END_ABORTED)).flags == ("ecg-aborted",)
    # the device counted fewer samples than we hold: flagged, never silently trimmed
    rec = a.finish(codec.EcgEnd(1, 5))
    assert rec.flags == ("sample-count-mismatch",) and rec.n_samples == 6
    assert np.array_equal(rec.samples[0], np.arange(6))


def test_flags_order_tail_gap_at_the_limit_and_fine_scales() -> None:
    # gap first, then how the recording ended: the console shows the first flag as the headline
    a = _make(_start(leads=("I",)))
    a.add_block(codec.EcgBlock(1, 0, 1, np.arange(2, dtype="<i2").tobytes()))
    a.add_block(codec.EcgBlock(1, 4, 1, np.arange(4, dtype="<i2").tobytes()))  # 2..3 missing
    rec = a.finish(codec.EcgEnd(1, 6, codec.ECG_END_ABORTED))  # device counted 6, we hold up to 8
    assert rec.flags == ("sample-gap", "ecg-aborted", "sample-count-mismatch")
    # a tail that ends exactly at the limit is a gap to fill, not a refusal
    b = _make(_start(rate=25, leads=("I",)), max_seconds=0.4)
    b.add_block(codec.EcgBlock(1, 0, 1, np.arange(5, dtype="<i2").tobytes()))
    assert b.finish(codec.EcgEnd(1, 10)).gaps == (SampleGap(5, 5),)
    # fine-resolution carts (0.1 µV per unit) are real ECGs, not a broken header
    assert _make(_start(scale=0.1)).start.uv_per_unit == 0.1
    # the default limit is half an hour of signal at any rate
    assert _make(_start(rate=500)).max_samples == int(ecg_stream.DEFAULT_MAX_SECONDS) * 500 == 30 * 60 * 500


def test_an_ecg_end_with_a_wild_sample_count_keeps_the_recording() -> None:
    """An ECG_END whose total_samples lies (past the stream limit: a firmware bug behind a good
    CRC) must not throw away the samples that arrived: the recording is kept, flagged, and its
    END can be acknowledged once it is stored."""
    core = BridgeCore("BR-9", boot_id=3)
    sim = EcgStreamSimulator(core, recording_id=5)
    session = BridgeSession("/dev/serial/by-id/usb-bridge")
    wire = core.hello(0) + sim.start(0) + b"".join(sim.blocks(4)) + sim.end(0xFFFFFFF0, 0)
    ready = [e for e in session.receive_data(wire, NOW) if isinstance(e, RecordingReady)]
    assert len(ready) == 1 and ready[0].seq is not None
    rec = ready[0].recording
    assert rec.n_samples == 100 and np.array_equal(rec.samples, ecg_samples(0, 100).T)
    assert "sample-count-mismatch" in rec.flags and rec.gaps == ()
