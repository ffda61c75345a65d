"""The serial service end to end over ptys: bridge -> outbox/held + ACK when durable, streamed ECG ->
DICOM in the outbox, scanner -> patient context, ASCII monitor -> observations, device status."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from devices.bridge import codec
from devices.device_errors import DeviceProblem
from firmware_bridge.bridge_simulator import EcgStreamSimulator
from firmware_bridge.firmware.bridge_core import BridgeCore
from lastmile.clinic.devices import DeviceRegistry
from lastmile.config import Config, ConfigError, load_profiles_apart
from lastmile.services.serial_devices import link_specs
from tests.conftest import REPO, run_on_private_tmpfs
from tests.console_harness import Client, console_config, running_console
from tests.serial_gateway import (
    NOTHING_MEASURED_REPORT,
    Running,
    a_spill_file_with_a_record_that_does_not_decode,
    monitor_prints_a_report_the_full_outbox_refuses,
    monitor_requiring_nothing,
    serial_config,
    talk_as_bridge,
    wait_for_answers,
)
from tests.serial_pty import PtyDevice
from tests.service_harness import DOCTOR_BADGE_SCAN, PATIENT_CARD_SCAN, VITALS_REPORT, report_printed
from tests.waiting import wait_for

BP = (codec.MeasuredValue("systolic", 118.0, "mm[Hg]"), codec.MeasuredValue("diastolic", 76.0, "mm[Hg]"))


@pytest.fixture
def running(tmp_path: Path) -> Iterator[callable]:
    started: list[Running] = []

    def start(devices: list[dict], **kw: object) -> Running:
        started.append(Running(tmp_path, devices, **kw))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for r in started:
        r.close()


def answered_up_to_here(bridge: PtyDevice, core: BridgeCore, now_ms: int) -> list[codec.Ack | codec.Nack]:
    """Send a LOG, which the gateway ACKs at once after whatever came before it, and read the
    answers (handed to `core`) until its ACK: every message sent so far has been answered if it
    is going to be. Returns the answers read meanwhile."""
    before = set(core.pending_seqs())
    bridge.write(core.log(20, "probe", now_ms))
    (probe,) = set(core.pending_seqs()) - before
    return wait_for_answers(bridge, {probe}, core, now_ms)


def ecg_bridge_greeted(tmp_path: Path, running) -> tuple[PtyDevice, Running, BridgeCore, list[int]]:
    """An ECG bridge (BR-ECG, boot 9) on a pty, its HELLO exchanged with the running service."""
    bridge = PtyDevice(tmp_path / "usb-ecg")
    r = running([{"name": "ecg", "match": str(bridge.link_path), "profile": "bridge"}])
    core, clock = BridgeCore("BR-ECG", boot_id=9, capabilities=("ecg",)), [0]
    wait_for(lambda: r.service.statuses()[0].connected)
    talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
    return bridge, r, core, clock


def test_scanner_then_bridge_measurement_lands_on_the_patient(tmp_path: Path, running) -> None:
    scanner = PtyDevice(tmp_path / "usb-scanner")
    bridge = PtyDevice(tmp_path / "usb-bridge")
    r = running(
        [
            {"name": "desk-scanner", "match": str(scanner.link_path), "profile": "scanner"},
            {"name": "bp-bridge", "match": str(bridge.link_path), "profile": "bridge"},
        ]
    )
    wait_for(lambda: all(s.connected for s in r.service.statuses()))
    scanner.write(PATIENT_CARD_SCAN + DOCTOR_BADGE_SCAN)
    wait_for(lambda: r.patients.current(r.now()) is not None and r.patients.current_doctor(r.now()) == "004711")
    assert r.patients.current(r.now()).patient_id == "80276001234567890123"

    core, clock = BridgeCore("BR-77", boot_id=5), [0]
    talk_as_bridge(
        bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0
    )  # HELLO exchange, time synced
    bridge.write(core.measurement("blood-pressure", BP, clock[0], record_id="42"))
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)  # ACKed ...
    item = r.outbox.find("bridge:BR-77:42")  # ... because it is in the outbox
    assert item is not None and item.kind == "observation"
    payload = json.loads(r.outbox.read_payload(item))
    assert payload["patient_id"] == "80276001234567890123"
    assert payload["time_source"] == "device-clock-corrected"
    # Resent after the ACK was lost: recognised, stored once.
    bridge.write(core.hello(clock[0]))
    bridge.write(core.measurement("blood-pressure", BP, clock[0], record_id="42"))
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)
    assert len(r.outbox.items(kind="observation")) == 1
    # `lastmile devices` sees the serial devices too.
    records = {d.address: d for d in r.registry.all()}
    assert records["SERIAL:BP-BRIDGE"].connected and records["SERIAL:BP-BRIDGE"].serial == "BR-77"
    assert "118/76" in records["SERIAL:BP-BRIDGE"].last_reading
    assert records["SERIAL:DESK-SCANNER"].transport == "serial"
    assert records["SERIAL:BP-BRIDGE"].name == f"bp-bridge (bridge) on {bridge.link_path}"
    scanner.unplug()
    bridge.unplug()
    wait_for(lambda: not r.registry.get("serial:bp-bridge").connected)


def test_no_ack_until_durable(tmp_path: Path, running) -> None:
    bridge = PtyDevice(tmp_path / "usb-bridge")
    r = running([{"name": "b", "match": str(bridge.link_path), "profile": "bridge"}])
    core, clock = BridgeCore("BR-1", boot_id=1), [0]
    wait_for(lambda: r.service.statuses()[0].connected)
    talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
    r.outbox.min_free_bytes = 1 << 60  # the data partition is "full": nothing can be stored
    r.patients.set_patient("P-1", now=r.now() - dt.timedelta(minutes=1))  # else it would be held: durable too
    bridge.write(core.measurement("blood-pressure", BP, clock[0], record_id="7"))
    (seq,) = core.pending_seqs()
    (answer,) = wait_for_answers(bridge, {seq}, core, clock[0])
    assert isinstance(answer, codec.Nack) and answer.reason == codec.NACK_REFUSED, answer
    assert "cannot store" in (r.registry.get("serial:b").last_error or "")
    assert core.pending_count == 1 and r.outbox.find("bridge:BR-1:7") is None  # NACKed, kept on the bridge
    r.outbox.min_free_bytes = 0
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)  # resent, stored, ACKed
    assert r.outbox.find("bridge:BR-1:7") is not None


def test_streamed_ecg_becomes_a_dicom_item(tmp_path: Path, running) -> None:
    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    r.patients.set_patient("P-ECG", name="Doe^Jane", now=r.now() - dt.timedelta(seconds=5))
    sim = EcgStreamSimulator(core, recording_id=3)
    bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(400, skip={10})) + sim.end(400 * 25, clock[0]))
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)
    item = r.outbox.find("bridge-ecg:BR-ECG:9:3")
    assert item is not None and item.kind == "dicom"
    assert item.meta["source_format"] == "bridge" and "sample-gap" in item.meta["flags"]
    assert item.meta["unassigned"] is False
    status = r.registry.get("serial:ecg")
    assert "25 samples missing" in status.last_reading


def test_an_ecg_end_resent_after_a_restart_is_acked_if_stored(tmp_path: Path, running) -> None:
    """Found by bench/kill_campaign.py (a duplicate study at the reading center): the gateway
    stored a streamed ECG and was killed before its ACK; the bridge resent ECG_END to the restarted
    gateway, which NACKed it as unknown, so the cart asked for the ECG again. A resent END of a
    recording already durable is ACKed (once, no second item); one never stored is still NACKed."""
    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    sim = EcgStreamSimulator(core, recording_id=3)
    bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(40)) + sim.end(40 * 25, clock[0]))
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)
    assert r.outbox.find("bridge-ecg:BR-ECG:9:3") is not None
    # the restarted gateway has no recording 3 in progress: the END comes again (its ACK was lost)
    # and, for recording 4, an END of a stream it never stored
    resent_end = core.send(codec.EcgEnd(3, 40 * 25), clock[0])
    never_stored_end = core.send(codec.EcgEnd(4, 40 * 25), clock[0])
    resent, never_stored = core.pending_seqs()[-2:]
    bridge.write(resent_end + never_stored_end)
    answers = wait_for_answers(bridge, {resent, never_stored})
    acks = {a.seq for a in answers if isinstance(a, codec.Ack)}
    nacks = {a.seq: a.reason for a in answers if isinstance(a, codec.Nack)}
    assert resent in acks and nacks == {never_stored: codec.NACK_UNKNOWN_RECORDING}
    assert [i.key for i in r.outbox.items(kind="dicom")] == ["bridge-ecg:BR-ECG:9:3"]  # no second item


def test_a_recording_restarted_under_its_id_is_stored_too(tmp_path: Path, running) -> None:
    """The nurse restarts a recording (lead off) and the bridge streams it again under the same
    recording id: the cut first take is kept (flagged truncated) and the whole second take is
    stored and acknowledged as a recording of its own, not ACKed and dropped as "already stored"."""
    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    sim = EcgStreamSimulator(core, recording_id=3)
    first_take = sim.start(clock[0]) + b"".join(sim.blocks(10))
    second_take = sim.start(clock[0]) + b"".join(sim.blocks(40)) + sim.end(40 * 25, clock[0])
    bridge.write(first_take + second_take)
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)
    items = r.outbox.items(kind="dicom")
    assert sorted(i.meta["duration_s"] for i in items) == [0.5, 2.0], [i.key for i in items]
    (whole,) = [i for i in items if i.meta["duration_s"] == 2.0]
    assert "ecg-truncated" not in whole.meta["flags"]


def test_a_streamed_ecg_no_dicom_object_can_hold_is_refused_not_held_forever(tmp_path: Path, running) -> None:
    """A bridge streaming at 100 Hz (below both DICOM ECG IODs' 200 Hz): the recording can never be
    stored, however often it is tried. It was held in memory and retried every 30 s like one the
    full disk refused, its ECG_END never answered (the bridge kept it pending for good) and nothing
    said why to anyone but the journal. It is refused at once: a NACK the bridge logs and drops, and
    the reason in the device's status for `lastmile devices`."""
    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    sim = EcgStreamSimulator(core, recording_id=3, sampling_rate_hz=100)
    bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(40)) + sim.end(40 * 25, clock[0]))
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)  # answered, not left pending
    assert r.outbox.items(kind="dicom") == []
    assert "100 Hz" in (r.registry.get("serial:ecg").last_error or "")
    assert not r.service.ctx.unstored  # nothing held to be retried for ever


def test_an_ecg_end_resent_while_its_recording_is_held_waits_for_storage(
    tmp_path: Path, running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed ECG the full outbox refused is held per device across an unplug; the END the
    bridge resends after the re-plug is neither NACKed (the bridge would drop the ECG) nor ACKed
    before the recording is durable - it is ACKed once the outbox has room and it is stored."""
    import lastmile.services.serial_devices as serial_devices

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 0.2)
    key = "bridge-ecg:BR-ECG:9:3"
    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    r.outbox.min_free_bytes = 1 << 60  # storage full, through the re-plug
    sim = EcgStreamSimulator(core, recording_id=3)
    bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(40)) + sim.end(40 * 25, clock[0]))
    wait_for(lambda: "waiting for space" in r.device_waiting("serial:ecg"))
    bridge.unplug()
    wait_for(lambda: not r.registry.get("serial:ecg").connected)
    bridge = PtyDevice(bridge.link_path)
    wait_for(lambda: r.service.statuses()[0].connected)
    connects = r.service.statuses()[0].connects
    core.gateway_seen, until = False, clock[0] + 8000  # simulated ms: the END is resent meanwhile
    talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and clock[0] > until)
    answered_up_to_here(bridge, core, clock[0])  # however late the resent END's answer would come
    assert r.service.statuses()[0].connects == connects
    assert core.pending_count == 1 and r.outbox.find(key) is None  # not dropped, not ACKed
    r.outbox.min_free_bytes = 0  # room again: the handler stores it and ACKs the resent END
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)
    bridge.unplug()
    assert [i.key for i in r.outbox.items(kind="dicom")] == [key]


TEN_SECONDS = 200  # ECG_BLOCKs of 25 samples at 500 Hz


class RealisticEcg(EcgStreamSimulator):
    """A bridge's ECG whose samples compress about as a real 12-lead ECG's do (noise of +-200
    units, not the simulator's periodic test signal): ~25 ten-second ones fill the ECG spill file."""

    def block(self, first: int, now_ms: int = 0) -> bytes:
        rng = np.random.default_rng((self.recording_id, first))
        data = rng.integers(-200, 201, size=(self.block_samples, len(self.leads))).astype("<i2").tobytes()
        return self.core.send(codec.EcgBlock(self.recording_id, first, len(self.leads), data), now_ms, reliable=False)


def stream_until_held_in_memory(bridge: PtyDevice, core: BridgeCore, clock: list[int], r: Running) -> int:
    """Ten-second ECGs streamed to a gateway whose outbox refuses them, until one no longer fits in
    the ECG spill file (the device row says memory only); returns how many were streamed."""
    from lastmile.services.serial_spill import ECG_SPILL_NAME, waiting_readings

    data = Path(r.config.data_dir)

    def in_memory() -> bool:
        return r.registry.get("serial:ecg").held_in_memory_only

    sent = 0
    while not in_memory():
        assert sent < 60, "the ECG spill file never filled"
        sent += 1
        sim = RealisticEcg(core, recording_id=sent)
        bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(TEN_SECONDS)) + sim.end(TEN_SECONDS * 25, clock[0]))
        wait_for(lambda: waiting_readings(data, ECG_SPILL_NAME) == sent or in_memory(), timeout=60)  # noqa: B023
    return sent


def test_streamed_ecgs_past_a_full_ecg_spill_file_are_said_in_memory_only_and_all_arrive_once(
    tmp_path: Path, running
) -> None:
    """A bridge streams ECG after ECG while the disk refuses them: the 4 MB ECG spill file holds
    ~25; the next one is held in memory only. The row said so, but `lastmile doctor` and the
    System page said "readings" wait for space (a village doctor does not take a reading for an
    ECG). Now they say ECG(s), in Chinese on the page, and with room again every ECG, spilled or in
    memory, is stored once and ACKed. The doctor and the row said all of them were held in memory
    only ("19 ECG(s)" beside the spill file's "18 streamed ECG(s) ... kept"): now only the one is."""
    from lastmile.clock import local_zone
    from lastmile.console.app import advice_text
    from lastmile.console.i18n import Localizer
    from lastmile.doctor import Doctor, Level
    from lastmile.services.serial_spill import ECG_SPILL_NAME, waiting_readings

    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    r.outbox.min_free_bytes = 1 << 60  # the data partition is full
    sent = stream_until_held_in_memory(bridge, core, clock, r)
    assert waiting_readings(Path(r.config.data_dir), ECG_SPILL_NAME) == sent - 1  # the last one: memory only
    row = r.registry.get("serial:ecg").waiting
    assert f"{sent} ECG(s) waiting" in row and "(1 ECG(s) of them held in memory only" in row, row
    assert "the rest kept on disk" in row, row
    findings = Doctor(r.config).check_devices()
    (memory,) = [f for f in findings if f.advice_key.startswith("memory-only")]
    assert memory.level is Level.FAIL and ": 1 ECG(s) wait for space" in memory.message, memory.message
    assert "memory only" in memory.message and "do not switch the gateway off" in memory.hint, memory
    zh = Localizer("zh-CN", local_zone())
    for finding in (f for f in findings if f.level is Level.FAIL):  # the spill file's ECGs, and the one in memory
        assert "心电图" in advice_text(finding, zh), (finding.message, advice_text(finding, zh))
    with running_console(console_config(Path(r.config.data_dir))) as console:  # the Devices page, in Chinese
        client = Client(console.url)
        client.login()
        page = client.get("/devices").body
    assert f"{sent} 份心电图（其中1 份心电图仅在内存中，断电即丢失；其余已保存在SD卡上）" in page, page
    r.outbox.min_free_bytes = 0  # room again: the next retry (every 30 s) stores them, then they are ACKed
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0, timeout=120)
    keys = sorted(f"bridge-ecg:BR-ECG:9:{n}" for n in range(1, sent + 1))
    assert sorted(i.key for i in r.outbox.items(kind="dicom")) == keys, "an ECG the full disk refused was lost"
    assert waiting_readings(Path(r.config.data_dir), ECG_SPILL_NAME) == 0
    assert not [f for f in Doctor(r.config).check_devices() if f.level is Level.FAIL]


# The gateway (a child process, so that it can lose its power; its data in `argv[1]`/data) with
# the bridge `argv[2]` and a data partition full to the last byte the outbox may use.
BRIDGE_GATEWAY_ON_A_FULL_DISK = r"""
import sys, threading
from pathlib import Path
from tests.serial_gateway import Running

Running(Path(sys.argv[1]), [{"name": "ecg", "match": sys.argv[2], "profile": "bridge"}], min_free_bytes=1 << 60)
threading.Event().wait()  # until the power fails (SIGKILL)
"""


@contextlib.contextmanager
def gateway_on_a_full_disk(tmp_path: Path, bridge: PtyDevice, core: BridgeCore, clock: list[int]) -> Iterator[None]:
    """The gateway (BRIDGE_GATEWAY_ON_A_FULL_DISK, a child process) greeted by the bridge; its
    power fails (SIGKILL) when the block ends."""
    gateway = subprocess.Popen(
        [sys.executable, "-c", BRIDGE_GATEWAY_ON_A_FULL_DISK, str(tmp_path), str(bridge.link_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
        yield
    finally:
        gateway.send_signal(signal.SIGKILL)  # the power fails
        gateway.wait(30)


def test_a_streamed_ecg_a_full_disk_refused_survives_a_power_cut_and_arrives_once(tmp_path: Path, running) -> None:
    """A bridge streams an ECG once: its blocks are never resent, only its ECG_END. The full outbox
    refused the recording, the gateway held it in memory only and lost its power; the restarted
    gateway had no such recording, NACKed the resent ECG_END as unknown and the bridge dropped it:
    the ECG was lost. Now it is kept in the ECG spill file, the device row says so, and once there
    is room the restarted gateway stores it and ACKs the resent ECG_END: one study."""
    from lastmile.doctor import Doctor

    key = "bridge-ecg:BR-ECG:9:3"
    bridge = PtyDevice(tmp_path / "usb-ecg")
    core, clock = BridgeCore("BR-ECG", boot_id=9, capabilities=("ecg",)), [0]
    data_dir = tmp_path / "data"
    with gateway_on_a_full_disk(tmp_path, bridge, core, clock):
        sim = EcgStreamSimulator(core, recording_id=3)
        bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(40)) + sim.end(40 * 25, clock[0]))
        registry = DeviceRegistry.open(str(data_dir))
        try:
            wait_for(lambda: "waiting for space" in registry.get("serial:ecg").waiting)
            row = registry.get("serial:ecg").waiting
        finally:
            registry.close()
    assert "1 ECG(s)" in row and "kept on disk" in row, row
    config = serial_config(tmp_path, [])
    doctor = [(f.level.value, f.message) for f in Doctor(config).check_devices()]
    assert any(level == "FAIL" and "1 streamed ECG(s)" in text for level, text in doctor), doctor
    assert core.pending_count == 1  # the bridge forgot the blocks; only the ECG_END waits for its ACK
    r = running([{"name": "ecg", "match": str(bridge.link_path), "profile": "bridge"}])  # room again
    core.gateway_seen = False
    talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
    assert [i.key for i in r.outbox.items(kind="dicom")] == [key], "the ECG the full disk refused was lost"
    doctor = [(f.level.value, f.message) for f in Doctor(config).check_devices()]
    assert not any(level == "FAIL" for level, _ in doctor), doctor


ONE_ECG_SPILL_BYTES = 80_000  # ECG spill slots of 40 KB: one EcgStreamSimulator ECG of 40 blocks (27 KB), not two


def bridge_streams_two_ecgs_one_past_the_spill_file(
    bridge: PtyDevice, core: BridgeCore, clock: list[int], data_dir: Path
) -> str:
    """Two ECGs streamed to a gateway whose outbox refuses them and whose ECG spill file holds one
    (the 4 MB one full, as ~25 ECGs leave it): the first is kept on disk, the second held in
    memory only. Returns what the device row says then."""
    registry = DeviceRegistry.open(str(data_dir))
    try:
        for n, where in ((1, "kept on disk"), (2, "held in memory only")):
            sim = EcgStreamSimulator(core, recording_id=n)
            bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(40)) + sim.end(40 * 25, clock[0]))
            wait_for(lambda: f"{n} ECG(s)" in (e := registry.get("serial:ecg").waiting) and where in e)  # noqa: B023
        return registry.get("serial:ecg").waiting
    finally:
        registry.close()


def lastmile_devices_lists(config: Config, tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    """What `lastmile devices` prints for the gateway `config` (its data_dir and serial devices)."""
    from lastmile.cli import main

    entries = "".join(
        f'\n[[serial.devices]]\nname = "{d["name"]}"\nmatch = "{d["match"]}"\nprofile = "{d["profile"]}"\n'
        for d in config.serial.devices
    )
    toml = tmp_path / "lastmile.toml"
    toml.write_text(f'[gateway]\ndata_dir = "{config.data_dir}"\n' + entries)
    capsys.readouterr()  # what was printed before is not the listing
    assert main(["-c", str(toml), "devices"]) == 0
    return capsys.readouterr().out


def an_ecg_lost_at_a_power_cut(
    tmp_path: Path, running, *, bridge_rebooted: bool = False, replugged_before_it_speaks: bool = False
) -> tuple[Running, PtyDevice, BridgeCore, list[int]]:
    """Two ECGs streamed to a gateway on a full disk, the ECG spill file holding one (ONE_ECG_SPILL_BYTES);
    its power fails, and it restarts with room: the spilled ECG is stored, the bridge's resent
    ECG_END of the other (held in memory only, lost) answered - none resent if the power cut
    `bridge_rebooted` too. `replugged_before_it_speaks`: the bridge's USB port enumerates, goes
    away and comes back (as at boot) before it says anything. Returns the restarted gateway and
    the bridge (its pty, core and clock)."""
    from lastmile.services.serial_spill import ECG_SPILL_NAME

    bridge = PtyDevice(tmp_path / "usb-ecg")
    core, clock = BridgeCore("BR-ECG", boot_id=9, capabilities=("ecg",)), [0]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / ECG_SPILL_NAME).write_bytes(bytes(ONE_ECG_SPILL_BYTES))
    with gateway_on_a_full_disk(tmp_path, bridge, core, clock):
        row = bridge_streams_two_ecgs_one_past_the_spill_file(bridge, core, clock, data_dir)
    assert "2 ECG(s)" in row and "held in memory only" in row, row
    if bridge_rebooted:  # what it had not sent yet is gone with its RAM
        core = BridgeCore("BR-ECG", boot_id=10, capabilities=("ecg",))
    r = running([{"name": "ecg", "match": str(bridge.link_path), "profile": "bridge"}])  # room again
    if replugged_before_it_speaks:
        bridge = replugged(r, bridge)
    core.gateway_seen = False
    talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
    spilled = ["bridge-ecg:BR-ECG:9:1"]  # stored at its resent ECG_END, or at its first retry
    wait_for(lambda: [i.key for i in r.outbox.items(kind="dicom")] == spilled, what="the spilled ECG stored")
    return r, bridge, core, clock


def replugged(r: Running, bridge: PtyDevice) -> PtyDevice:
    """`bridge` (the gateway connected to it) unplugged and plugged in again: its new pty."""
    wait_for(lambda: r.registry.get("serial:ecg").connected)  # its handler has the connection
    connects = r.service.statuses()[0].connects
    bridge.unplug()
    wait_for(lambda: not r.registry.get("serial:ecg").connected)  # ... and has lost it
    bridge = PtyDevice(bridge.link_path)
    wait_for(lambda: (s := r.service.statuses()[0]).connected and s.connects > connects, what="the re-plugged bridge")
    return bridge


def test_a_streamed_ecg_held_in_memory_only_and_lost_at_a_power_cut_is_said_until_a_week_later(
    tmp_path: Path, running, capsys: pytest.CaptureFixture
) -> None:
    """The ECG spill file full (it holds 1 ECG here, 18 of the 4 MB one), the next ECG was held in
    memory only, and the power failed. The restarted gateway loaded the spilled ECG and the row
    said "1 ECG(s) ... kept on disk"; the other was gone without a word (the bridge's resent
    ECG_END NACKed as unknown, a journal line). Now the row keeps what was lost and from when,
    and `lastmile doctor` FAILs on it (the System page, in Chinese) for a week, whatever is
    stored since. Its advice on the System page said only until when: when the loss was found too."""
    from lastmile.clock import local_zone
    from lastmile.console.app import advice_text
    from lastmile.console.i18n import Localizer
    from lastmile.doctor import Doctor, Level

    r, *_ = an_ecg_lost_at_a_power_cut(tmp_path, running)
    findings = [f for f in Doctor(r.config).check_devices() if f.level is Level.FAIL]
    said = [f.message for f in findings]
    assert any("1 ECG(s)" in m and "lost when the gateway stopped" in m for m in said), said
    (lost,) = findings
    assert "found at its restart at" in lost.message and "after " in lost.message, lost.message
    zh_cn = Localizer("zh-CN", local_zone())
    zh = advice_text(lost, zh_cn)
    assert "心电图" in zh and "丢失" in zh, zh
    row = r.registry.get("serial:ecg")
    said_until = row.lost_said_until(row.lost_at)
    assert said_until is not None and zh_cn.when(said_until) in zh, zh
    assert zh_cn.when(row.lost_at) in zh.replace(zh_cn.when(said_until), ""), zh  # when it was found, too
    assert (row.lost_ecg_count, row.lost_reading_count) == (1, 0), row
    listed = lastmile_devices_lists(r.config, tmp_path, capsys)
    assert "1 ECG(s) held in memory only, when the gateway stopped after" in listed, listed
    a_week_on = (row.lost_at + dt.timedelta(days=7, seconds=1)).timestamp()
    assert not [f for f in Doctor(r.config, now=lambda: a_week_on).check_devices() if f.level is Level.FAIL]


def test_a_clean_stop_says_which_streamed_ecgs_are_kept_on_disk_and_which_are_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two ECGs the full disk refused, one in the ECG spill file and one in memory only: stopping
    the gateway logged "2 ECG recording(s) (lost)" (and "0 reading(s) (lost)"), though one is
    stored after the restart. Now the line says 1 kept on disk and 1 lost."""
    import logging

    from lastmile.services.serial_spill import ECG_SPILL_NAME

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ECG_SPILL_NAME).write_bytes(bytes(ONE_ECG_SPILL_BYTES))
    bridge = PtyDevice(tmp_path / "usb-ecg")
    r = Running(
        tmp_path, [{"name": "ecg", "match": str(bridge.link_path), "profile": "bridge"}], min_free_bytes=1 << 60
    )
    try:
        core, clock = BridgeCore("BR-ECG", boot_id=9, capabilities=("ecg",)), [0]
        talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
        bridge_streams_two_ecgs_one_past_the_spill_file(bridge, core, clock, tmp_path / "data")
    finally:
        with caplog.at_level(logging.ERROR, logger="lastmile.services.serial_devices"):
            r.close()
    stopped = [m for m in caplog.messages if "the outbox refused them" in m]
    assert stopped == [
        "ecg: 2 ECG recording(s) (1 kept on disk, stored after the restart; 1 lost) not stored: the outbox refused them"
    ], stopped


def test_the_ecg_spill_file_takes_the_sd_card_only_where_a_bridge_can_stream_ecgs(tmp_path: Path, running) -> None:
    """4 MB set aside for streamed ECGs a full disk refuses: not on a gateway with a monitor only."""
    from lastmile.services.serial_spill import ECG_SPILL_NAME, SPILL_NAME

    monitor = PtyDevice(tmp_path / "usb-monitor")
    r = running([{"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"}])
    data = Path(r.config.data_dir)
    assert (data / SPILL_NAME).exists() and not (data / ECG_SPILL_NAME).exists()
    r.close()
    bridge = PtyDevice(tmp_path / "usb-bridge")
    r = running([{"name": "bridge", "match": str(bridge.link_path), "profile": "bridge"}])
    assert (data / ECG_SPILL_NAME).exists()


def test_ascii_monitor_and_forwarding_bridge(tmp_path: Path, running) -> None:
    monitor = PtyDevice(tmp_path / "usb-monitor")
    bridge = PtyDevice(tmp_path / "usb-bridge")
    r = running(
        [
            {"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"},
            {
                "name": "legacy",
                "match": str(bridge.link_path),
                "profile": "bridge",
                "forward_profile": "example-vitals-monitor",
            },
        ]
    )
    wait_for(lambda: all(s.connected for s in r.service.statuses()))
    r.patients.set_patient("P-9", now=r.now() - dt.timedelta(minutes=1))
    # Printed now by the monitor's clock (UTC+1): after the patient's session began, so it is theirs.
    printed = (r.now() + dt.timedelta(hours=1)).strftime("DATE %Y-%m-%d  TIME %H:%M:%S").encode()
    report = VITALS_REPORT.replace(b"DATE 2025-03-04  TIME 09:41:07", printed)
    monitor.write(report)
    wait_for(lambda: len(r.outbox.items(kind="observation")) == 3)
    keys = {i.key for i in r.outbox.items(kind="observation")}
    assert any(k.endswith("record:0172:blood-pressure") for k in keys)
    # The same report through a bridge's RS-232 port: lines forwarded, ACKed once the report is stored.
    core, clock = BridgeCore("BR-LEG", boot_id=1), [0]
    talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
    other = report.replace(b"RECORD 0172", b"RECORD 0173")
    start, half = other.index(b"===== VITALS"), other.index(b"PULSE")
    bridge.write(core.uart_bytes(other[:start], clock[0]))  # the monitor's banner, part of no report
    before = set(core.pending_seqs())
    bridge.write(core.uart_bytes(other[start:half], clock[0]))
    in_report = set(core.pending_seqs()) - before
    answers = answered_up_to_here(bridge, core, clock[0])
    assert not in_report & {a.seq for a in answers}, answers  # a report in progress is not durable yet: no ACK
    assert in_report <= set(core.pending_seqs())
    bridge.write(core.uart_bytes(other[half:], clock[0]))
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)
    assert len(r.outbox.items(kind="observation")) == 6


def test_a_monitor_forwarded_through_a_bridge_is_not_named_on_today_as_the_bridge(tmp_path: Path, running) -> None:
    """REV-FI 1: a monitor's report forwarded by the ECG cart's bridge names the bridge's port as
    its device's, and Today named every reading from that port by the bridge's settings name:
    "血压 121/79 · cart", the ECG cart's name on a blood pressure. Now it says the monitor's maker
    and model, as before Today named devices by their settings names."""
    bridge = PtyDevice(tmp_path / "usb-bridge")
    cart = {"name": "cart", "match": str(bridge.link_path), "profile": "bridge"}
    r = running([{**cart, "forward_profile": "example-vitals-monitor"}])
    wait_for(lambda: all(s.connected for s in r.service.statuses()))
    r.patients.set_patient("P-9", now=r.now() - dt.timedelta(minutes=1))
    core, clock = BridgeCore("BR-CART", boot_id=3, capabilities=("ecg",)), [0]
    talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
    printed = (r.now() + dt.timedelta(hours=1)).strftime("DATE %Y-%m-%d  TIME %H:%M:%S").encode()
    bridge.write(core.uart_bytes(VITALS_REPORT.replace(b"DATE 2025-03-04  TIME 09:41:07", printed), clock[0]))
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)
    assert len(r.outbox.items(kind="observation")) == 3
    shown = dataclasses.replace(console_config(Path(r.config.data_dir)), serial=r.config.serial)
    with running_console(shown) as console:
        client = Client(console.url)
        client.login()
        page = client.get("/today").body
    readings = page.split('<ul class="readings">', 1)[1].split("</ul>", 1)[0]
    lines = [" ".join(re.sub(r"<[^>]+>", " ", li).split()) for li in readings.split("<li ")[1:]]
    assert len(lines) == 3, lines
    assert all(line.endswith("· Example Medical VM-100") for line in lines), lines


def test_a_forwarded_report_with_nothing_measured_is_acknowledged_and_said_on_the_bridge(
    tmp_path: Path, running
) -> None:
    """A monitor on a bridge's RS-232 port printed a report whose every value was "--" (no probe
    on): the lines were ACKed and nothing said it. Now the bridge's row says a report with nothing
    measured came (its kind: Today's words for it), nothing is stored, and the lines are ACKed
    (nothing is lost by them: a resend would say the same)."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    bridge = PtyDevice(tmp_path / "usb-bridge")
    cart = {"name": "cart", "match": str(bridge.link_path), "profile": "bridge"}
    r = running([{**cart, "forward_profile": monitor_requiring_nothing(profiles)}], profiles_dir=str(profiles))
    wait_for(lambda: all(s.connected for s in r.service.statuses()))
    core, clock = BridgeCore("BR-CART", boot_id=3, capabilities=("ecg",)), [0]
    talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
    bridge.write(core.uart_bytes(NOTHING_MEASURED_REPORT, clock[0]))
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)
    wait_for(lambda: getattr(r.registry.get("serial:cart"), "last_error", ""), what="the bridge's row says it")
    row = r.registry.get("serial:cart")
    assert row is not None and row.problem is DeviceProblem.NOTHING_MEASURED, row
    assert r.outbox.items(kind="observation") == []


# an SpO2 monitor printing its value on a line of its own every second, no report framing
STREAMING_OXIMETER = """
[profile]
name = "streaming-oximeter"
manufacturer = "Example Medical"
model = "OX-1"
kind = "spo2"

[framing]
line_end = "any"

[[field]]
code = "spo2"
pattern = '^SPO2\\s+(?P<value>\\d+|--)\\s*%'
unit = "%"
no_value = ["--"]
"""


def row_writes(r: Running) -> list[dict]:
    """Every write of the service's own registry on a device row from now on (its facts)."""
    registry = r.service.ctx.registry
    writes: list[dict] = []
    update = registry.update_status

    def counted(address: str, **facts: object) -> object:
        writes.append(facts)
        return update(address, **facts)

    registry.update_status = counted  # type: ignore[method-assign]
    return writes


def test_a_streaming_monitor_idle_between_readings_says_nothing_and_writes_no_row(
    tmp_path: Path, running, caplog: pytest.LogCaptureFixture
) -> None:
    """A monitor without report framing prints "SPO2 -- %" every second while no finger is in
    it. Each such line was taken for a report with nothing measured: a WARNING log line per line,
    the row rewritten every 5 s all day (SD wear) and "请检查探头" on Today, also just after a
    good reading when the finger came out. Now nothing is said or written for them: the row is
    written for the readings only."""
    import logging

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "streaming-oximeter.toml").write_text(STREAMING_OXIMETER)
    monitor = PtyDevice(tmp_path / "usb-oximeter")
    r = running(
        [{"name": "oximeter", "match": str(monitor.link_path), "profile": "streaming-oximeter"}],
        profiles_dir=str(profiles),
    )
    wait_for(lambda: all(s.connected for s in r.service.statuses()), what="the oximeter connected")
    r.patients.set_patient("P-9", now=r.now() - dt.timedelta(minutes=1))
    monitor.write(b"SPO2 97 %\r\n")
    wait_for(lambda: "97" in r.device_reading("serial:oximeter"), what="the first reading on its row")
    writes = row_writes(r)
    with caplog.at_level(logging.DEBUG, logger="lastmile.services.serial_devices"):
        for _ in range(10):  # the finger out: ten seconds of "no value"
            monitor.write(b"SPO2 -- %\r\n")
            time.sleep(0.05)
        time.sleep(0.5)
        monitor.write(b"SPO2 96 %\r\n")  # the finger back: the lines before it were read
        wait_for(lambda: "96" in r.device_reading("serial:oximeter"), what="the second reading on its row")
    assert [w.get("seen") for w in writes] == [True], writes  # the second reading's, no other
    assert not [m for m in caplog.messages if "nothing measured" in m], caplog.messages
    row = r.registry.get("serial:oximeter")
    assert row is not None and not row.last_error and row.problem is not DeviceProblem.NOTHING_MEASURED, row


def test_repeated_reports_with_nothing_measured_are_said_once_until_the_next_reading(
    tmp_path: Path, running, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A framed report with nothing measured (the doctor pressed measure, no probe on) is still
    said on the row; three in a row were three WARNING lines and row writes (the last held back
    and written after the next good reading, whose row then said "nothing measured" again). Now
    one line and one write until the next reading; after it, the next empty report is said again."""
    import logging

    import lastmile.services.serial_devices as serial_devices

    monkeypatch.setattr(serial_devices, "ERROR_STATUS_EVERY_S", 0.3)  # a held-back repeat shows soon
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    monitor = PtyDevice(tmp_path / "usb-monitor")
    device = {"name": "monitor", "match": str(monitor.link_path), "profile": monitor_requiring_nothing(profiles)}
    r = running([device], profiles_dir=str(profiles))
    wait_for(lambda: all(s.connected for s in r.service.statuses()), what="the monitor connected")
    r.patients.set_patient("P-9", now=r.now() - dt.timedelta(minutes=1))
    writes = row_writes(r)

    def said() -> list[dict]:
        return [w for w in writes if w.get("problem") is DeviceProblem.NOTHING_MEASURED]

    with caplog.at_level(logging.WARNING, logger="lastmile.services.serial_devices"):
        for _ in range(3):
            monitor.write(NOTHING_MEASURED_REPORT)
            time.sleep(0.4)  # each in a window of its own
        monitor.write(report_printed(r.now()))
        wait_for(lambda: len(r.outbox.items(kind="observation")) == 3, what="the good report stored")
        time.sleep(1.0)  # what a window held back would be written by now
        assert len(said()) == 1, writes  # none after the reading either

        monitor.write(NOTHING_MEASURED_REPORT)  # after the reading: said again
        wait_for(lambda: len(said()) == 2, what="the next report with nothing measured said")
    warned = [m for m in caplog.messages if "nothing measured" in m]
    assert len(warned) == 2, warned


def test_forwarded_lines_with_no_profile_to_read_them_are_kept_on_the_bridge(tmp_path: Path, running) -> None:
    """A bridge forwarding a monitor's report lines, configured without `forward_profile`: the
    gateway ACKed every line and dropped it - the readings gone for good, the bridge told they
    were stored, `lastmile devices` showing nothing wrong. The lines are refused (NACK_REFUSED:
    the bridge keeps and resends them, so they arrive once the profile is added) and the device's
    status says what to configure."""
    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    bridge.write(core.uart_bytes(VITALS_REPORT, clock[0]))
    lines = set(core.pending_seqs())
    assert len(lines) == VITALS_REPORT.count(b"\n")
    answers = wait_for_answers(bridge, lines, core, clock[0])  # one answer per line, whenever it comes
    assert {(a.seq, type(a), getattr(a, "reason", None)) for a in answers} == {
        (seq, codec.Nack, codec.NACK_REFUSED) for seq in lines
    }
    assert core.pending_count == len(lines)  # every line still held by the bridge, to be resent
    assert "forward_profile" in (r.registry.get("serial:ecg").last_error or "")


# The serial service's process, started; then its code tree replaced in place (an update that
# kept it running), so no module of ours can be imported any more; then an ECG is held at a stop.
ECG_HELD_AFTER_THE_CODE_TREE_WAS_REPLACED = r"""
import importlib.abc, sys
import lastmile.services.serial_devices
from lastmile.services.serial_spill import recording_to_json
from tests.ecg_factories import make_recording

recording = make_recording(seconds=1.0)


class CodeTreeReplaced(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("devices", "lastmile", "firmware_bridge", "uploader"):
            raise ImportError(f"{name}: its file was replaced since the start")
        return None


sys.meta_path.insert(0, CodeTreeReplaced())
print(len(recording_to_json("bridge-ecg:BR-ECG:9:1", recording)["npz"]) > 0)
"""


def test_an_ecg_held_at_a_stop_needs_no_import_after_the_start(tmp_path: Path) -> None:
    """REV-FI 5: the serial service first imported devices.ecg.npz when it first held an ECG,
    typically as it stopped; had the code tree been replaced in place since the start, the ECG
    was lost to an ImportError. It is loaded at the start now, with the rest of the ECG code."""
    done = subprocess.run(
        [sys.executable, "-c", ECG_HELD_AFTER_THE_CODE_TREE_WAS_REPLACED],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


def test_device_configuration_is_checked(tmp_path: Path) -> None:
    config = serial_config(tmp_path, [])
    profiles, bad = load_profiles_apart(config)
    assert "example-vitals-monitor" in profiles and not bad
    for devices, needle in [
        ([{"name": "a", "match": "ttyUSB0", "profile": "bridge"}], "VID:PID"),
        ([{"name": "a", "match": "2e8a:000a", "profile": "nope"}], "unknown profile"),
        ([{"name": "a", "match": "2e8a:000a", "profile": "bridge", "speed": 1}], "unknown key"),
        ([{"name": "a", "match": "2e8a:000a", "profile": "scanner"}] * 2, "used twice"),
        ([{"name": "a", "match": "2e8a:000a", "profile": "scanner", "forward_profile": "x"}], "forward_profile"),
    ]:
        config.serial.devices = devices
        with pytest.raises(ConfigError, match=needle):
            link_specs(config, profiles)
    config.serial.devices = [{"name": "m", "match": "0403:6001:A50285BI", "profile": "example-vitals-monitor"}]
    (spec,) = link_specs(config, profiles)
    assert spec.baudrate == 9600 and str(spec.match) == "0403:6001:A50285BI"


def test_a_card_scanned_for_the_checked_in_patient_keeps_their_name_and_stat(tmp_path: Path, running) -> None:
    # The doctor checks in 张三 as STAT (chest pain) on the console; the nurse then scans the same
    # card at the ECG cart. The card names nobody's name or urgency: the ECG recorded next must
    # still be STAT and carry the name, not go as a routine ECG of a nameless patient.
    scanner = PtyDevice(tmp_path / "usb-scanner")
    r = running([{"name": "desk-scanner", "match": str(scanner.link_path), "profile": "scanner"}])
    wait_for(lambda: all(s.connected for s in r.service.statuses()), timeout=30)
    card = PATIENT_CARD_SCAN.strip().decode()
    r.patients.set_patient(card, "Zhang^San=张^三", now=r.now(), stat=True, reason="胸痛 chest pain")
    scanner.write(PATIENT_CARD_SCAN)
    wait_for(lambda: [e["event"] for e in r.patients.history()].count("patient-set") == 2, timeout=30)
    current = r.patients.current(r.now())
    assert current is not None and current.patient_id == card
    assert (current.name, current.stat, current.reason) == ("Zhang^San=张^三", True, "胸痛 chest pain")
    # Another patient's card starts that patient's session, without the previous one's triage.
    scanner.write(b"80276001234567890999\r\n")
    # current() is None for a moment if the scan ends the session before starting the next one
    wait_for(lambda: getattr(r.patients.current(r.now()), "patient_id", None) == "80276001234567890999", timeout=30)
    current = r.patients.current(r.now())
    assert (current.name, current.stat, current.reason) == ("", False, "")


def test_a_card_scanned_while_the_patient_is_checked_in_never_corrects_his_id(tmp_path: Path, running) -> None:
    """张三 is checked in under one card's ID, with his name; a card with another ID is scanned (his
    other card, or the next patient's). A card read by a reader is not a typo: the first ID keeps
    his name (no patient-id-corrected). The card names no one, so the scanned ID has no name and
    is linked to nobody: an ECG under the first ID is another patient's until the doctor says so."""
    from lastmile.clinic.patients import CORRECTED

    scanner = PtyDevice(tmp_path / "usb-scanner")
    r = running([{"name": "desk-scanner", "match": str(scanner.link_path), "profile": "scanner"}])
    wait_for(lambda: all(s.connected for s in r.service.statuses()), timeout=30)
    first, scanned, name = PATIENT_CARD_SCAN.strip().decode(), "80276001234567890999", "Zhang^San=张^三"
    r.patients.set_patient(first, name, now=r.now())
    scanner.write(scanned.encode() + b"\r\n")
    wait_for(lambda: getattr(r.patients.current(r.now()), "patient_id", None) == scanned, timeout=30)
    assert CORRECTED not in [e["event"] for e in r.patients.history()]
    assert r.patients.known_names([first, scanned], r.now()) == {first: name}
    assert r.patients.patient_ids(r.now()) == {scanned}


# The start of the scripts below (run inside `unshare -m` with a small tmpfs on argv[1]): a monitor
# on a pty, the gateway's serial part on the tmpfs, and the monitor printing a report it refuses.
TMPFS_GATEWAY = r"""
import datetime as dt, json, os, signal, sys
from pathlib import Path
from lastmile.clinic.devices import DeviceRegistry
from lastmile.services.serial_spill import waiting_readings
from tests.conftest import fill_to_the_last_block
from tests.serial_gateway import Running, serial_config
from tests.serial_pty import PtyDevice
from tests.service_harness import VITALS_REPORT
from tests.waiting import wait_for

mnt = Path(sys.argv[1])
monitor = PtyDevice(mnt / "usb-monitor")
DEVICES = [{"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"}]
config = serial_config(mnt, DEVICES)  # the gateway's, as Running builds it

def start():
    gateway = Running(mnt, DEVICES, min_free_bytes=1 << 20)
    wait_for(lambda: all(s.connected for s in gateway.service.statuses()))
    return gateway

def monitor_prints_a_refused_report(gateway, fill=False):
    now = dt.datetime.now(dt.timezone.utc)
    gateway.patients.set_patient("P-9", now=now - dt.timedelta(minutes=1))
    if fill:
        fill_to_the_last_block(mnt / "filler")
    printed = (now + dt.timedelta(hours=1)).strftime("DATE %Y-%m-%d  TIME %H:%M:%S").encode()
    monitor.write(VITALS_REPORT.replace(b"DATE 2025-03-04  TIME 09:41:07", printed))
    # the gateway's promise starts when it says where the readings are, not when memory holds
    # them: in the spill file (read back from it), else on the device row (memory only)
    if fill:
        wait_for(lambda: waiting_readings(mnt / "data") == 3, timeout=60)
    else:
        wait_for(lambda: said_held_in_memory(3), timeout=60)

def said_held_in_memory(count):
    registry = DeviceRegistry.open(config.data_dir)
    try:
        row = registry.get("serial:monitor")
    finally:
        registry.close()
    return row.held_in_memory_only and f"{count} reading(s)" in row.waiting
"""

# The gateway (a child process) reads a monitor's report on a partition full to its last block,
# then loses its power (SIGKILL).
SPILL_GATEWAY = (
    TMPFS_GATEWAY
    + r"""
gateway = start()
monitor_prints_a_refused_report(gateway, fill=True)
print("held", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the power fails
"""
)

SPILL_SCRIPT = r"""
import json, os, subprocess, sys, time
from pathlib import Path
from lastmile.config import Config
from lastmile.doctor import Doctor
from lastmile.services.acquire import serial_part
from uploader.outbox import Outbox

mnt, gateway, monitor_after = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
out = {}
run = subprocess.run([sys.executable, "-c", gateway, str(mnt)], capture_output=True, text=True, timeout=180)
out["gateway"] = [run.returncode, run.stdout, run.stderr[-2000:]]
config = Config()
config.gateway.data_dir = str(mnt / "data")
out["doctor"] = [(f.level.value, f.message) for f in Doctor(config).check_devices()]
assert (mnt / "filler").exists(), out["gateway"]
os.unlink(mnt / "filler")  # space again; the gateway starts (the monitor is not plugged in now)
if monitor_after == "configured":  # else the technician took it out of the configuration meanwhile
    config.serial.devices = [{"name": "monitor", "match": str(mnt / "usb-monitor"), "profile": "example-vitals-monitor"}]
outbox = Outbox.open(config.data_dir, min_free_bytes=1 << 20)
part = serial_part(config, outbox)  # as the acquire service starts it
if part is not None:
    part.check(time.monotonic())
deadline = time.monotonic() + 60
while len(outbox.items(kind="observation")) < 3 and time.monotonic() < deadline:
    time.sleep(0.1)
out["stored_after_restart"] = [json.loads(outbox.read_payload(i))["patient_id"] for i in outbox.items(kind="observation")]
if part is not None:
    part.close()
outbox.close()
out["doctor_after"] = [(f.level.value, f.message) for f in Doctor(config).check_devices()]
print(json.dumps(out))
"""


def spill_and_restart(tmp_path: Path, monitor_after: str) -> dict:
    """SPILL_SCRIPT's findings, the monitor `configured` or `removed` when the gateway restarts."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = run_on_private_tmpfs(mnt, "16m", SPILL_SCRIPT, SPILL_GATEWAY, monitor_after, timeout_s=400)
    assert script.returncode == 0, script.stderr[-3000:]
    return json.loads(script.stdout.strip().splitlines()[-1])


def test_readings_a_full_disk_refuses_survive_a_power_cut_and_are_stored_when_space_returns(tmp_path: Path) -> None:
    """A monitor prints its report once; the outbox refuses it (the partition is full to its last
    block). Held in memory only, a power cut lost it without a word. Now it is kept in the spill
    file set aside at start, `lastmile doctor` FAILs saying readings wait for space, and once
    there is room the restarted gateway stores them on the patient they were taken for."""
    out = spill_and_restart(tmp_path, "configured")
    code, stdout, stderr = out["gateway"]
    assert code == -9 and stdout.strip() == "held", stderr
    assert out["stored_after_restart"] == ["P-9"] * 3, "readings the full disk refused were lost in the power cut"
    assert any(level == "FAIL" and "3 reading(s)" in text and "wait for space" in text for level, text in out["doctor"])
    # said once: the devices WARN does not repeat the monitor's "waiting for space" error
    assert not any(level == "WARN" and "waiting for space" in text for level, text in out["doctor"]), out["doctor"]
    assert not any(level == "FAIL" for level, _ in out["doctor_after"]), out["doctor_after"]


def test_spilled_readings_of_a_monitor_taken_out_of_the_configuration_are_stored_after_the_restart(
    tmp_path: Path,
) -> None:
    """The readings were in the spill file, and the technician took the monitor out of the
    configuration before the gateway restarted: they were loaded but never retried (only
    configured devices were; with no serial device left the serial part did not even start), so
    `lastmile doctor` FAILed for ever. The reading names its device: it is stored all the same."""
    out = spill_and_restart(tmp_path, "removed")
    assert out["stored_after_restart"] == ["P-9"] * 3, out["doctor_after"]
    assert not any(level == "FAIL" for level, _ in out["doctor_after"]), out["doctor_after"]


# A gateway that ran before the spill file existed (an update) starts again on a partition
# already full, then a monitor prints its report.
NO_SPILL_SCRIPT = (
    TMPFS_GATEWAY
    + r"""
from lastmile.doctor import Doctor
from lastmile.services.serial_spill import SPILL_NAME

start().close()
os.unlink(mnt / "data" / SPILL_NAME)  # the version before had none
# room for SQLite to open its files, not for the spill file; below what the outbox keeps free
fill_to_the_last_block(mnt / "filler", leave=128 * 1024)
gateway = start()
monitor_prints_a_refused_report(gateway)
registry = DeviceRegistry.open(config.data_dir)
out = {"rows": [r.waiting for r in registry.all(config)]}
registry.close()
out["doctor"] = [(f.level.value, f.message) for f in Doctor(config).check_devices()]
os.unlink(mnt / "filler")
gateway.close()
print(json.dumps(out))
"""
)


def test_readings_held_in_memory_only_because_no_spill_file_could_be_set_aside_are_a_doctor_fail(
    tmp_path: Path,
) -> None:
    """The partition was already full when the acquire service started, so the spill file could
    not be set aside: a reading the outbox refused was held in memory only. The device row said
    so, but `lastmile doctor` (and the System page) only warned of a device problem. A power cut
    loses these readings: now it is a FAIL."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = run_on_private_tmpfs(mnt, "16m", NO_SPILL_SCRIPT, timeout_s=400)
    assert script.returncode == 0, script.stderr[-3000:]
    out = json.loads(script.stdout.strip().splitlines()[-1])
    assert any("3 reading(s)" in row and "held in memory only" in row for row in out["rows"]), out["rows"]
    assert any(level == "FAIL" and "memory only" in text for level, text in out["doctor"]), out["doctor"]
    assert not any(level == "WARN" and "memory only" in text for level, text in out["doctor"]), out["doctor"]


def running_with_a_spill_file_too_small(tmp_path: Path) -> tuple[Running, PtyDevice]:
    """The serial service reading one monitor, its spill file's slots (256 bytes) too small for
    one report: what the outbox refuses is held in memory only."""
    from lastmile.services.serial_spill import SPILL_NAME

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / SPILL_NAME).write_bytes(bytes(512))
    monitor = PtyDevice(tmp_path / "usb-monitor")
    r = Running(tmp_path, [{"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"}])
    return r, monitor


def test_readings_that_do_not_fit_the_spill_file_are_said_lost_when_the_service_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The outbox refused a monitor's report and the readings did not fit in the spill file (its
    slot too small; many readings waiting do the same): they were in memory only, yet stopping the
    service logged them "kept on disk, stored after the restart" because the file existed. Now the
    line says what the last save did: lost."""
    import logging

    r, monitor = running_with_a_spill_file_too_small(tmp_path)
    try:
        monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "held in memory only")
    finally:
        with caplog.at_level(logging.ERROR, logger="lastmile.services.serial_devices"):
            r.close()
    stopped = [m for m in caplog.messages if "the outbox refused them" in m]
    assert stopped and "3 reading(s) (lost)" in stopped[0], stopped


def test_readings_all_held_in_memory_only_and_lost_at_a_stop_are_said_once(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A monitor's 3 readings, all held in memory only (its spill file too small), were lost when
    the gateway stopped. The restarted gateway wrote the loss twice: as the row's error and as its
    lost counts, so `lastmile devices` printed it under "last error" and again under "lost", and
    `lastmile doctor` gave a FAIL and a devices WARN in the same words. Now the lost counts are
    the one record of it."""
    from lastmile.doctor import Doctor, Level

    r, monitor = running_with_a_spill_file_too_small(tmp_path)
    try:
        monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "held in memory only")
    finally:
        r.close()  # the readings are lost with the gateway's memory
        monitor.unplug()  # not seen again after the restart: its row's error is its current state
    r = Running(tmp_path, r.config.serial.devices)
    try:
        row = r.registry.get("serial:monitor")
        assert (row.lost_reading_count, row.lost_ecg_count) == (3, 0), row
        said = [(f.level, f.message) for f in Doctor(r.config).check_devices() if "lost when" in f.message]
        listed = lastmile_devices_lists(r.config, tmp_path, capsys)
        # the Devices page, in Chinese, of a console that knows the monitor (else: a removed device's history)
        shown = dataclasses.replace(console_config(Path(r.config.data_dir)), serial=r.config.serial)
        with running_console(shown) as console:
            client = Client(console.url)
            client.login()
            page = client.get("/devices").body
    finally:
        r.close()
    assert [level for level, _ in said] == [Level.FAIL], said
    assert listed.count("3 reading(s) held in memory only") == 1, listed
    assert "网关停机时丢失：3 条测量结果（当时仅在内存中）" in page, page  # not on the doctor's and CLI's word only


def a_stop_lost_readings_a_locked_outbox_held_in_memory(tmp_path: Path) -> list[dict]:
    """A monitor's 3 readings refused by a locked outbox (another process writing) and held in
    memory only (its spill file too small), then the gateway stopped (they are lost with its
    memory) and the monitor unplugged (not seen again); returns the configured devices."""
    r, monitor = running_with_a_spill_file_too_small(tmp_path)
    r.outbox.db.conn.execute("PRAGMA busy_timeout=50")  # refused at once, not after the 15 s busy wait
    other = sqlite3.connect(r.config.data_dir / "outbox.sqlite", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process holds the outbox's write lock
    try:
        monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "database is locked", full=False)
        assert r.registry.get("serial:monitor").held_in_memory_only
    finally:
        r.close()
        monitor.unplug()
        other.rollback()
        other.close()
    return r.config.serial.devices


def test_readings_a_locked_outbox_held_in_memory_only_and_a_stop_lost_are_said_lost_for_that_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """lastmile/clinic/devices.py lost_message: a monitor's readings, refused by a locked outbox
    (another process writing) and held in memory only, were lost when the gateway stopped; the
    restarted gateway's journal and `lastmile doctor` said they were "held in memory only (waiting
    for space)", so the county technician freed disk space that was not the problem. Now the loss
    says the cause its row said (DeviceRecord.held_cause), and its advice is the county IT's."""
    import logging

    from lastmile.clock import local_zone
    from lastmile.console.app import advice_text
    from lastmile.console.i18n import Localizer
    from lastmile.doctor import Doctor, Level
    from lastmile.services import serial_devices

    devices = a_stop_lost_readings_a_locked_outbox_held_in_memory(tmp_path)
    with caplog.at_level(logging.ERROR, logger=serial_devices.__name__):
        r = Running(tmp_path, devices)
    try:
        found = [f for f in Doctor(r.config).check_devices() if "lost when" in f.message]
    finally:
        r.close()
    journal = [m for m in caplog.messages if "lost when the gateway stopped" in m]
    assert journal and all("database is locked" in m and "space" not in m for m in journal), journal
    (lost,) = found
    assert lost.level is Level.FAIL and "database is locked" in lost.message, lost.message
    assert "for space" not in lost.message + lost.hint, (lost.message, lost.hint)
    zh = advice_text(lost, Localizer("zh-CN", local_zone()))  # the System page's advice
    assert "丢失" in zh and "存储空间不足" in zh and "等待存储空间" not in zh, zh


def test_the_cause_of_readings_a_stop_lost_is_said_as_that_loss_not_as_the_monitor_s_problem_today(
    tmp_path: Path,
) -> None:
    """lastmile/services/serial_devices.py settle_held_at_start: a monitor's readings, refused by a
    locked outbox and held in memory only, were lost when the gateway stopped, and the monitor
    was not plugged back. The restarted gateway said the loss (its cause, its times) but left the
    row's "cannot store" error of before the stop as it was: `lastmile doctor` warned the monitor
    was failing, and the Devices page said its last problem was a measurement not saved ("measure
    again"), for good - a lock gone with the stop, shown as the monitor's state today. That cause
    is now said by the stop's loss alone, with its time."""
    from lastmile.doctor import Doctor, Level

    r = Running(tmp_path, a_stop_lost_readings_a_locked_outbox_held_in_memory(tmp_path))
    try:
        row = r.registry.get("serial:monitor")
        said = [(f.level, f.message) for f in Doctor(r.config).check_devices() if f.level is not Level.OK]
        shown = dataclasses.replace(console_config(Path(r.config.data_dir)), serial=r.config.serial)
        with running_console(shown) as console:  # the Devices page, in Chinese
            client = Client(console.url)
            client.login()
            page = client.get("/devices").body
    finally:
        r.close()
    assert [level for level, _ in said] == [Level.FAIL], said  # the loss, not a failing monitor too
    assert "database is locked" in said[0][1] and "lost when the gateway stopped" in said[0][1], said
    assert "网关停机时丢失：3 条测量结果（当时仅在内存中）" in page, page
    assert "它的一次测量结果未能保存" not in page and "最近的问题" not in page, page
    assert row.lost_cause and not row.last_error, row


def test_readings_a_row_from_before_the_counts_held_in_memory_only_are_not_lost_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A row the version before the held counts wrote (memory only, counts 0/0: what a gateway
    updated while readings waited for space leaves) had its loss written only as lost counts -
    none to count, and its error cleared: the readings were gone without a word. The row keeps
    the loss in words then, as the older version did."""
    import sqlite3

    r, monitor = running_with_a_spill_file_too_small(tmp_path)
    try:
        monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "held in memory only")
    finally:
        r.close()  # the readings are lost with the gateway's memory
        monitor.unplug()
    with contextlib.closing(sqlite3.connect(r.config.data_dir / "clinic.db")) as db, db:
        db.execute(  # as the older version left it: no counts, nothing said lost yet
            "UPDATE devices SET held_reading_count = 0, held_ecg_count = 0, lost_reading_count = 0, "
            "lost_ecg_count = 0, lost_after = NULL, lost_at = NULL WHERE address = 'SERIAL:MONITOR'"
        )
    r = Running(tmp_path, r.config.serial.devices)
    try:
        listed = lastmile_devices_lists(r.config, tmp_path, capsys)
    finally:
        r.close()
    assert "readings held in memory only (waiting for space) were lost when the gateway stopped" in listed, listed


def test_readings_held_in_memory_only_stay_a_doctor_fail_whatever_the_row_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doctor found readings held in memory only by looking for the English words of the
    device row's error: a reworded (or translated) status line turned its FAIL into a device
    WARN, and a power cut lost the readings with no FAIL said. Now the row keeps where the
    waiting readings are as a status of its own, whatever its error says."""
    from lastmile.clinic import devices
    from lastmile.doctor import Doctor

    monkeypatch.setattr(devices, "MEMORY_ONLY", "仅在内存中，断电即丢失")  # the line, reworded
    r, monitor = running_with_a_spill_file_too_small(tmp_path)
    try:
        monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "仅在内存中")
        found = [(f.level.value, f.advice_key) for f in Doctor(r.config).check_devices()]
    finally:
        r.close()
    assert ("FAIL", "memory-only") in found, found


def test_readings_held_in_memory_only_stay_a_doctor_fail_after_the_monitor_reconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doctor's memory-only FAIL needed the device's error to be newer than its last "seen":
    the monitor unplugged and plugged in again while its readings were still held in memory
    only, and the FAIL was gone though nothing was stored. Where the readings are is the fact:
    it stays until they are stored or kept on disk."""
    from lastmile.doctor import Doctor
    from lastmile.services import serial_devices

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 0.5)
    r, monitor = running_with_a_spill_file_too_small(tmp_path)
    try:
        monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "held in memory only")
        monitor.unplug()
        wait_for(lambda: not r.registry.get("serial:monitor").connected)
        monitor = PtyDevice(monitor.link_path)
        wait_for(lambda: r.registry.get("serial:monitor").connected)
        found = [(f.level.value, f.advice_key, f.message) for f in Doctor(r.config).check_devices()]
        assert ("FAIL", "memory-only") in [f[:2] for f in found], found
        r.outbox.min_free_bytes = 0  # room again: stored at the next retry, the FAIL ends
        wait_for(lambda: not any(f.level.value == "FAIL" for f in Doctor(r.config).check_devices()))
        assert len(r.outbox.items(kind="observation")) == 3
    finally:
        r.close()


def monitor_unplugged_while_its_readings_wait_for_space(tmp_path: Path) -> tuple[Running, str]:
    """A monitor's report of 3 readings refused by the full outbox (kept on disk), then the monitor
    unplugged: the running service (for the caller to close) and the row's error saying so."""
    monitor = PtyDevice(tmp_path / "usb-monitor")
    r = Running(tmp_path, [{"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"}])
    monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "3 reading(s) waiting for space")
    monitor.unplug()
    wait_for(lambda: not r.registry.get("serial:monitor").connected)
    unplugged = r.registry.get("serial:monitor").last_error
    assert unplugged and "waiting for space" not in unplugged, unplugged
    return r, unplugged


def test_a_monitor_unplugged_while_its_readings_waited_for_space_still_says_so_once_they_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A monitor's 3 readings waited for space, then it was unplugged (its row's error said so).
    Space came back and the readings were stored: storing them wrote the row's error "" and so
    cleared the unplug error too - the row no longer said the monitor was unplugged. What waits
    is the row's status alone now; its error is only another problem, and stays until replaced."""
    from lastmile.services import serial_devices

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 0.2)
    r, unplugged = monitor_unplugged_while_its_readings_wait_for_space(tmp_path)
    try:
        r.outbox.min_free_bytes = 0  # room again: the service stores what the unplugged monitor left
        wait_for(lambda: len(r.outbox.items(kind="observation")) == 3)
        wait_for(lambda: not r.registry.get("serial:monitor").waits_for_space)
        row = r.registry.get("serial:monitor")
    finally:
        r.close()
    assert row.last_error == unplugged, row


def test_a_monitor_unplugged_while_its_readings_wait_for_space_is_a_doctor_warning_beside_the_space_fail(
    tmp_path: Path,
) -> None:
    """A monitor's readings wait for space (kept on disk: the doctor FAILs on the space), then it is
    unplugged: the doctor skipped every device error on a row that waits for space, so the unplug
    was no WARN anywhere a doctor looks first. Now it is, and the space FAIL stays the space FAIL."""
    from lastmile.doctor import Doctor, Level

    r, unplugged = monitor_unplugged_while_its_readings_wait_for_space(tmp_path)
    try:
        found = [(f.level, f.message) for f in Doctor(r.config).check_devices()]
    finally:
        r.close()
    assert any(level is Level.FAIL and "3 reading(s)" in text and "wait for space" in text for level, text in found)
    warned = [text for level, text in found if level is Level.WARN]
    assert any(unplugged in text for text in warned), found
    assert not any("wait" in text for text in warned), found  # the space is said once, by its FAIL


def test_the_resent_ecg_end_of_an_ecg_lost_at_a_power_cut_is_not_said_again_as_a_device_error(
    tmp_path: Path, running
) -> None:
    """After a restart that lost a streamed ECG, the bridge resends its ECG_END, NACKed as unknown:
    the row's error said "ECG_END for an unknown recording" and `lastmile doctor` WARNed with it
    beside the lost FAIL until the bridge was seen again - the same loss said twice, the second
    time in words a village doctor cannot read. Now the lost FAIL says it once."""
    from lastmile.doctor import Doctor, Level

    r, *_ = an_ecg_lost_at_a_power_cut(tmp_path, running)
    found = [(f.level, f.message) for f in Doctor(r.config).check_devices()]
    assert [level for level, text in found if "lost when the gateway stopped" in text] == [Level.FAIL], found
    assert not [text for level, text in found if level is Level.WARN], found
    assert "unknown recording" not in r.registry.get("serial:ecg").last_error


def test_the_resent_ecg_end_of_an_ecg_lost_at_a_power_cut_after_a_silent_replug_is_not_a_device_error(
    tmp_path: Path, running
) -> None:
    """At boot a USB bridge often enumerates, goes away and enumerates again before it says
    anything. The restarted gateway stopped expecting the resent ECG_END of the ECG a power cut
    lost as that first, silent connection ended: the resend on the next one was the row's error
    "ECG_END for an unknown recording" (a doctor WARN beside the lost FAIL: the loss said twice).
    Only a connection the bridge spoke on (its HELLO) is one its resends were due on."""
    r, *_ = an_ecg_lost_at_a_power_cut(tmp_path, running, replugged_before_it_speaks=True)
    assert "unknown recording" not in (r.registry.get("serial:ecg").last_error or "")


def the_row_error_after_an_unknown_ecg_end(r: Running, bridge: PtyDevice, core: BridgeCore, clock: list[int]) -> str:
    """The bridge greets the gateway again and sends the ECG_END of an ECG whose blocks never
    reached it (streamed while it was down): the row's error once that is answered."""
    core.gateway_seen = False
    talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
    bridge.write(core.send(codec.EcgEnd(7, 40 * 25), clock[0]))
    talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)
    answered_up_to_here(bridge, core, clock[0])
    return r.registry.get("serial:ecg").last_error or ""


def test_an_unknown_ecg_end_after_a_later_restart_is_still_the_device_error(tmp_path: Path, running) -> None:
    """A restart lost a streamed ECG and the bridge's resent ECG_END was NACKed quietly (the lost
    FAIL says it). Every later start (for the week the row says the loss) took as many unknown
    ECG_ENDs again for that resend: an ECG streamed while the gateway was down, whose ECG_END is
    all that arrives, was gone with a journal line only. Only the start that finds the loss expects
    its resend: after a later restart an unknown ECG_END is the row's error again."""
    r, bridge, core, clock = an_ecg_lost_at_a_power_cut(tmp_path, running)
    r.close()  # an ordinary restart: nothing held, nothing lost at this stop
    r = running([{"name": "ecg", "match": str(bridge.link_path), "profile": "bridge"}])
    assert "unknown recording" in the_row_error_after_an_unknown_ecg_end(r, bridge, core, clock)


def test_a_reading_held_because_the_outbox_is_locked_says_why_on_its_row(tmp_path: Path) -> None:
    """The outbox database locked (another process holding its write lock past the busy timeout):
    the monitor's reading was held and the row said only "waiting for space on the data partition",
    so `lastmile doctor` FAILed with advice to free space while the real cause was in the journal
    alone. Now a store that fails for another reason than space is the row's error too."""
    import sqlite3

    from uploader.outbox import DB_NAME

    monitor = PtyDevice(tmp_path / "usb-monitor")
    r = Running(tmp_path, [{"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"}])
    locker = sqlite3.connect(Path(r.config.data_dir) / DB_NAME, isolation_level=None)
    try:
        wait_for(lambda: all(s.connected for s in r.service.statuses()))
        r.patients.set_patient("P-9", now=r.now() - dt.timedelta(minutes=1))
        locker.execute("BEGIN EXCLUSIVE")  # held past the service's busy timeout
        printed = (r.now() + dt.timedelta(hours=1)).strftime("DATE %Y-%m-%d  TIME %H:%M:%S").encode()
        monitor.write(VITALS_REPORT.replace(b"DATE 2025-03-04  TIME 09:41:07", printed))
        # held for the lock, and said so: not "waiting for space"
        wait_for(lambda: "waiting to be stored" in r.device_waiting("serial:monitor"), timeout=60)
        locker.execute("ROLLBACK")
        assert "database is locked" in (r.registry.get("serial:monitor").last_error or "")
    finally:
        locker.close()
        r.close()


@pytest.mark.parametrize("silent_replug_first", [False, True])
def test_an_unknown_ecg_end_after_the_bridge_reconnects_is_still_the_device_error(
    tmp_path: Path, running, silent_replug_first: bool
) -> None:
    """The power cut that lost a streamed ECG rebooted the bridge too: it resent no ECG_END. The
    restarted gateway kept expecting that resend for as long as it ran, so the next genuine unknown
    ECG_END (an ECG whose stream never arrived) was NACKed with a journal line only. The resend
    comes on the bridge's first connection it speaks on (a silent one before it, at boot, or not):
    after that one ends, an unknown ECG_END is the row's error."""
    r, bridge, core, clock = an_ecg_lost_at_a_power_cut(
        tmp_path, running, bridge_rebooted=True, replugged_before_it_speaks=silent_replug_first
    )
    bridge = replugged(r, bridge)
    assert "unknown recording" in the_row_error_after_an_unknown_ecg_end(r, bridge, core, clock)


NOISE = b"line noise\x00"  # a frame the bridge protocol cannot read: the session's problem (OTHER)


def count_error_writes(r: Running, address: str) -> sqlite3.Connection:
    """A trigger in clinic.db counting each write of `address`'s row error (its `last_error_at`
    changes with every one), whoever writes it."""
    db = sqlite3.connect(r.config.data_dir / "clinic.db", isolation_level=None)
    db.executescript(
        "CREATE TABLE error_writes (n INTEGER);"
        "CREATE TRIGGER count_error_writes AFTER UPDATE OF last_error_at ON devices "
        f"WHEN NEW.address = '{address}' BEGIN INSERT INTO error_writes VALUES (1); END;"
    )
    return db


def error_writes(db: sqlite3.Connection) -> int:
    return db.execute("SELECT count(*) FROM error_writes").fetchone()[0]


def test_a_port_alternating_two_kinds_of_garbage_writes_the_row_a_few_times_not_per_frame(
    tmp_path: Path,
    running,
) -> None:
    """lastmile/services/serial_devices.py SerialContext.error: the same kind at most every 5 s, but
    a kind other than the last written one at once - so a bridge whose garbage alternates two
    kinds (forwarded lines it has no profile for, line noise) wrote its clinic.db row on every
    frame: an SD card write per frame. Now a kind is written at once the first time in the 5 s,
    then the latest waits to the end of them; the row still ends saying the last cause."""
    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    with contextlib.closing(count_error_writes(r, "SERIAL:ECG")) as db:
        frames = 20
        started = time.monotonic()
        for _ in range(frames):
            bridge.write(core.uart_bytes(b"PULSE 71\n", clock[0]) + NOISE)  # forwarded, not read; then noise
        bridge.write(core.uart_bytes(b"PULSE 72\n", clock[0]))  # the last word: forwarded lines not read
        answered_up_to_here(bridge, core, clock[0])
        windows = (time.monotonic() - started) // 5 + 1  # ERROR_STATUS_EVERY_S: a loaded machine takes longer
        written = error_writes(db)
    assert written <= 3 * windows, (written, windows)  # each kind once, then the latest: not per frame
    wait_for(lambda: r.registry.get("serial:ecg").problem is DeviceProblem.FORWARD_NOT_READ, timeout=30)


def test_line_noise_held_back_by_the_throttle_is_not_written_after_a_good_reading(tmp_path: Path, running) -> None:
    """SerialContext.error holds back a repeated error to the end of ERROR_STATUS_EVERY_S: written
    then, it was stamped after a reading the bridge sent well meanwhile, and the doctor took the
    bridge for failing since it was last seen. A reading heard well drops what was held back."""
    from lastmile.doctor import failing_since_seen

    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    r.patients.set_patient("P-1", now=r.now() - dt.timedelta(minutes=1))
    bridge.write(NOISE + NOISE)  # the first said at once, the second held back
    bridge.write(core.measurement("blood-pressure", BP, clock[0], record_id="7"))
    (seq,) = core.pending_seqs()
    wait_for_answers(bridge, {seq}, core, clock[0])  # stored and ACKed: heard well
    over = time.monotonic() + 6  # ERROR_STATUS_EVERY_S over, and a turn of the service after it
    wait_for(lambda: time.monotonic() > over, timeout=30)
    answered_up_to_here(bridge, core, clock[0])
    answered_up_to_here(bridge, core, clock[0])
    row = r.registry.get("serial:ecg")
    assert "COBS" in row.last_error and not failing_since_seen(row), row


def test_an_error_the_throttle_held_back_keeps_the_time_it_happened(tmp_path: Path, running) -> None:
    """lastmile/services/serial_devices.py SerialContext.write_pending_errors: an error held back
    to the end of its ERROR_STATUS_EVERY_S window was stamped when it was written, up to 5 s after
    it happened, and the row's time (the Devices page's "last problem" time, `lastmile devices`'
    last error) said the bridge failed since then. The row keeps the time the error happened."""
    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    bridge.write(NOISE)  # written at once
    bridge.write(core.uart_bytes(b"PULSE 71\n", clock[0]))  # another kind: written at once too
    answered_up_to_here(bridge, core, clock[0])
    wait_for(lambda: r.registry.get("serial:ecg").problem is DeviceProblem.FORWARD_NOT_READ)
    bridge.write(NOISE)  # a repeat in the window: held back to its end
    answered_up_to_here(bridge, core, clock[0])
    happened_by = r.now()
    wait_for(lambda: r.registry.get("serial:ecg").problem is DeviceProblem.OTHER, timeout=30)
    row = r.registry.get("serial:ecg")
    assert row.last_error_at <= happened_by, (row.last_error_at, happened_by)


def test_line_noise_after_a_good_reading_in_the_same_window_says_the_bridge_fails_since(
    tmp_path: Path, running
) -> None:
    """Noise (written), a reading heard well, noise again in the same ERROR_STATUS_EVERY_S window
    (held back): the held-back error was stamped with the first noise's time, before the good
    reading, and the doctor took the bridge for fine while it was failing again. A reading heard
    well ends what the row showed too: the noise after it is said with its own time."""
    bridge, r, core, clock = ecg_bridge_greeted(tmp_path, running)
    r.patients.set_patient("P-1", now=r.now() - dt.timedelta(minutes=1))
    bridge.write(NOISE)  # said at once
    answered_up_to_here(bridge, core, clock[0])
    wait_for(lambda: r.registry.get("serial:ecg").last_error)
    bridge.write(core.measurement("blood-pressure", BP, clock[0], record_id="7"))
    (seq,) = core.pending_seqs()
    wait_for_answers(bridge, {seq}, core, clock[0])  # stored and ACKed: heard well
    heard_well = r.registry.get("serial:ecg").last_seen_at
    bridge.write(NOISE)  # a repeat in the window: held back to its end
    answered_up_to_here(bridge, core, clock[0])
    over = time.monotonic() + 6  # ERROR_STATUS_EVERY_S over, and a turn of the service after it
    wait_for(lambda: time.monotonic() > over, timeout=30)
    answered_up_to_here(bridge, core, clock[0])
    answered_up_to_here(bridge, core, clock[0])
    row = r.registry.get("serial:ecg")
    # (the probes after it were heard well: the doctor's "failing since seen" is theirs to end)
    assert "COBS" in row.last_error and row.last_error_at > heard_well, (row.last_error_at, heard_well)


# -- a spill file that does not give back what a stop kept in it -----------------------------------


def a_stop_kept_readings_on_disk(tmp_path: Path) -> list[dict]:
    """A monitor's 3 readings the full outbox refused, kept in the spill file; then the gateway
    stopped and the monitor was unplugged. Returns the configured devices."""
    monitor = PtyDevice(tmp_path / "usb-monitor")
    r = Running(tmp_path, [{"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"}])
    try:
        monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "3 reading(s) waiting for space")
        assert not r.registry.get("serial:monitor").held_in_memory_only  # kept on disk
    finally:
        r.close()
        monitor.unplug()
    return r.config.serial.devices


def damage_spill_file(path: Path, how: str) -> None:
    """The spill file at `path` as an SD card, a crash or a technician may leave it."""
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":  # cut in the middle of the newest copy's body, the older one with it
        with path.open("r+b") as f:
            f.truncate(120)
    elif how == "garbage":
        path.write_bytes(os.urandom(path.stat().st_size))
    else:  # unreadable, even by root: a directory where the file was
        path.unlink()
        path.mkdir()
        (path / "x").write_bytes(b"x")


def lost_as_the_doctor_and_page_say(r: Running) -> tuple[list, str]:
    """`lastmile doctor`'s devices findings not OK, and the Devices page in Chinese."""
    said, pages = lost_as_the_doctor_and_pages_say(r)
    return said, pages["/devices"]


def lost_as_the_doctor_and_pages_say(r: Running) -> tuple[list, dict[str, str]]:
    """`lastmile doctor`'s devices findings not OK, and the Devices, Today and System pages in Chinese."""
    from lastmile.doctor import Doctor, Level

    said = [f for f in Doctor(r.config).check_devices() if f.level is not Level.OK]
    shown = dataclasses.replace(console_config(Path(r.config.data_dir)), serial=r.config.serial)
    with running_console(shown) as console:
        client = Client(console.url)
        client.login()
        pages = {page: client.get(page).body for page in ("/devices", "/today", "/system")}
    return said, pages


@pytest.mark.parametrize("how", ["missing", "empty", "truncated", "garbage", "unreadable"])
def test_readings_a_stop_kept_on_disk_whose_spill_file_gives_nothing_back_are_said_lost(
    tmp_path: Path, how: str
) -> None:
    """lastmile/services/serial_devices.py settle_held_at_start: a monitor's readings were kept in
    the spill file at a stop; at the restart the file gave nothing back (missing, empty, cut short,
    garbage, unreadable). The row's held status was cleared and no loss said: 3 readings gone
    without a word. Now the stop's loss is said as for readings held in memory only - the
    doctor's FAIL with the count and the stop's time, the Devices page's "lost when the gateway stopped: 3"."""
    from lastmile.doctor import Level
    from lastmile.services.serial_spill import SPILL_NAME

    devices = a_stop_kept_readings_on_disk(tmp_path)
    stopped_after = DeviceRegistry.open(tmp_path / "data")
    try:
        held_at = stopped_after.get("serial:monitor").held_at
    finally:
        stopped_after.close()
    spill = tmp_path / "data" / SPILL_NAME
    damage_spill_file(spill, how)
    r = Running(tmp_path, devices)  # never a crash at start
    try:
        row = r.registry.get("serial:monitor")
        said, pages = lost_as_the_doctor_and_pages_say(r)
    finally:
        r.close()
    assert (row.lost_reading_count, row.held_reading_count) == (3, 0), row
    lost = [f for f in said if "lost when the gateway stopped" in f.message]
    assert [f.level for f in lost] == [Level.FAIL], said
    assert "3 reading(s)" in lost[0].message and held_at.strftime("%Y-%m-%d %H:%M:%S") in lost[0].message, lost
    # said as what it is - kept on the SD card, not read back from a damaged file - never "held in memory only"
    assert "保存在SD卡上的 3 条测量结果无法读回（文件损坏或丢失）：已丢失" in pages["/devices"], pages["/devices"]
    assert row.lost_from_disk == (3, 0) and row.lost_from_memory == (0, 0), row
    assert "仅在内存中" not in pages["/devices"], pages["/devices"]
    assert "保存在SD卡上的测量数据在网关重新启动时无法读回" in pages["/system"], pages["/system"]
    assert "in memory only" not in lost[0].message and "kept on disk could not be read back" in lost[0].message, lost
    assert str(spill) in lost[0].message, lost  # the file, and its .bad copy for the county IT
    aside = sorted(spill.parent.glob(f"{SPILL_NAME}.*.bad"))
    assert len(aside) == (0 if how == "missing" else 1) and all(str(a) in lost[0].message for a in aside), lost


def test_readings_a_spill_file_gives_back_in_part_are_stored_and_the_rest_said_lost(tmp_path: Path) -> None:
    """The spill file's newest copy (3 readings) torn, the older one (2 of them) whole: the 2 are
    stored after the restart and the 1 the file did not give back is said lost (held - given back),
    not left unsaid as before."""
    from lastmile.services.serial_spill import SPILL_NAME, newest_copy, waiting_readings

    devices = a_stop_kept_readings_on_disk(tmp_path)
    spill = tmp_path / "data" / SPILL_NAME
    slot, _generation, _content = newest_copy(spill)
    with spill.open("r+b") as f:  # a byte of the newest copy's body flipped
        at = slot * (spill.stat().st_size // 2) + 60
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert waiting_readings(tmp_path / "data") == 2
    r = Running(tmp_path, devices)
    try:
        wait_for(lambda: not r.registry.get("serial:monitor").waits_for_space)  # stored, its row says
        stored = len(r.outbox.items(kind="observation"))
        row = r.registry.get("serial:monitor")
    finally:
        r.close()
    assert stored == 2 and row.lost_reading_count == 1, (stored, row)


def test_an_unreadable_spill_file_is_set_aside_said_once_and_a_new_one_keeps_the_next_readings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spill file that cannot be read is not deleted: it is set aside (`.bad`) for the county IT,
    said once in the journal with its path, and a new one is allocated, which keeps the readings
    the next full outbox refuses. At most SET_ASIDE_KEPT are kept (bounded by number)."""
    import logging

    from lastmile.services.serial_spill import SET_ASIDE_KEPT, SPILL_NAME, waiting_readings

    devices = a_stop_kept_readings_on_disk(tmp_path)
    data = tmp_path / "data"
    for earlier in range(SET_ASIDE_KEPT + 1):  # set aside at earlier starts
        (data / f"{SPILL_NAME}.2026010{earlier}T000000Z.bad").write_bytes(b"x")
    damage_spill_file(data / SPILL_NAME, "unreadable")
    with caplog.at_level(logging.ERROR, logger="lastmile.services.serial_spill"):
        r = Running(tmp_path, devices)
    monitor = PtyDevice(tmp_path / "usb-monitor")
    try:
        monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "3 reading(s) waiting for space")
        assert waiting_readings(data) == 3  # in the new spill file
    finally:
        r.close()
        monitor.unplug()
    aside = sorted(data.glob(f"{SPILL_NAME}.*.bad"))
    assert len(aside) == SET_ASIDE_KEPT and (aside[-1] / "x").read_bytes() == b"x", aside  # kept, not deleted
    # the spill file's own word (the device row's loss names the .bad copy too: its own line)
    said = [r.getMessage() for r in caplog.records if r.name.endswith("serial_spill") and "set aside" in r.getMessage()]
    assert len(said) == 1 and str(data / SPILL_NAME) in said[0] and str(aside[-1]) in said[0], said


def test_a_bad_readings_spill_file_does_not_stop_a_bridge_s_ecg_kept_on_disk_from_being_stored(
    tmp_path: Path,
) -> None:
    """Two devices held on disk at a stop - a monitor's readings, a bridge's streamed ECG - and the
    readings' spill file unreadable at the restart: the start goes on, the ECG is stored from its
    own spill file, the monitor's readings are said lost."""
    from lastmile.services.serial_spill import SPILL_NAME

    monitor, bridge = PtyDevice(tmp_path / "usb-monitor"), PtyDevice(tmp_path / "usb-ecg")
    devices = [
        {"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"},
        {"name": "ecg", "match": str(bridge.link_path), "profile": "bridge"},
    ]
    r = Running(tmp_path, devices)
    try:
        monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "3 reading(s) waiting for space")
        core, clock = BridgeCore("BR-ECG", boot_id=9, capabilities=("ecg",)), [0]
        talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
        sim = EcgStreamSimulator(core, recording_id=3)
        bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(40)) + sim.end(40 * 25, clock[0]))
        wait_for(lambda: "1 ECG(s) waiting for space" in r.device_waiting("serial:ecg"))
    finally:
        r.close()
        monitor.unplug()
        bridge.unplug()
    damage_spill_file(tmp_path / "data" / SPILL_NAME, "unreadable")
    r = Running(tmp_path, devices)
    try:
        wait_for(lambda: [i.key for i in r.outbox.items(kind="dicom")] == ["bridge-ecg:BR-ECG:9:3"])
        row = r.registry.get("serial:monitor")
    finally:
        r.close()
    assert row.lost_reading_count == 3, row


# The restart of a gateway whose spill file holds a record that does not decode, on a full disk.
SPILL_ON_A_FULL_DISK = r"""
import json, sys
from pathlib import Path
from lastmile.services.serial_spill import SPILL_NAME, SpillFile, newest_copy
from tests.conftest import fill_to_the_last_block
from tests.serial_gateway import a_spill_file_with_a_record_that_does_not_decode

data = Path(sys.argv[1]) / "data"
data.mkdir()
given_back = a_spill_file_with_a_record_that_does_not_decode(data)
fill_to_the_last_block(data.parent / "filler")  # the disk full: when the spill file is used
spill = SpillFile(data)  # the restart
loaded = spill.load()
newest = newest_copy(data / SPILL_NAME)
print(json.dumps({
    "loaded": [o.record_key for o in loaded.get("monitor", [])],
    "given_back": given_back,
    "kept": spill.kept,
    "on_disk": [r["record_key"] for r in newest[2].get("monitor", [])] if newest else [],
    "names": sorted(p.name for p in data.iterdir() if "spill" in p.name),
}))
"""


def test_what_a_damaged_spill_file_gives_back_on_a_full_disk_stays_on_disk(tmp_path: Path) -> None:
    """lastmile/services/serial_spill.py SpillFile: a damaged spill file was set aside (renamed)
    before its replacement was allocated. On a full disk - exactly when the spill file is used -
    the new one could not be, so the readings the damaged file gave back were in memory only for
    the rest of the run (a power cut lost them). Now the new file is allocated first; with no room
    for it, the damaged file's own blocks are written in place, so what it gave back stays on disk."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = run_on_private_tmpfs(mnt, "4m", SPILL_ON_A_FULL_DISK, timeout_s=120)
    assert script.returncode == 0, script.stderr[-3000:]
    out = json.loads(script.stdout.strip().splitlines()[-1])
    assert out["loaded"] == out["given_back"], out
    assert out["kept"] and out["on_disk"] == out["given_back"], out  # on disk, not in memory only
    assert out["names"] == ["serial-spill.dat"], out  # no room for a .bad copy: the file itself kept


def test_a_damaged_spill_file_that_cannot_be_set_aside_never_gives_an_old_copy_back(tmp_path: Path) -> None:
    """lastmile/services/serial_spill.py SpillFile: a damaged spill file that could not be set aside
    (the rename failed) was written on from generation 1, into the slot of its newest copy: its
    other slot's older copy (generation 5: 3 readings stored since) became the newest, and the next
    start gave those back again. Now the file is written above the highest generation in it, and
    the old copy cleared once the new one is in."""
    import time as clock

    from lastmile.services.serial_spill import SPILL_NAME, SpillFile, newest_copy, waiting_readings

    data = tmp_path / "data"
    data.mkdir()
    given_back = a_spill_file_with_a_record_that_does_not_decode(data)
    for s in range(-5, 120):  # every name it could be set aside as now is taken: the rename fails
        stamp = clock.strftime("%Y%m%dT%H%M%SZ", clock.gmtime(clock.time() + s))
        (data / f"{SPILL_NAME}.{stamp}.bad").mkdir(exist_ok=True)
        (data / f"{SPILL_NAME}.{stamp}.bad" / "x").write_bytes(b"x")
    spill = SpillFile(data)  # the restart
    loaded = spill.load().get("monitor", [])
    assert [o.record_key for o in loaded] == given_back and spill.set_aside is None
    spill.save({"monitor": loaded[1:]})  # the first stored: the next save
    assert waiting_readings(data) == 1  # the 3 stored before never come back
    newest = newest_copy(data / SPILL_NAME)
    assert newest is not None and [r["record_key"] for r in newest[2]["monitor"]] == given_back[1:], newest
    assert not (data / f".{SPILL_NAME}.new").exists()


def test_a_patient_card_names_nobody_so_a_mapped_cuff_user_keeps_the_mappings_name(tmp_path: Path, running) -> None:
    """Cuff user 2 is mapped to the card's ID as 张三; 李四 (another ID) is checked in, typed; then the
    card is scanned at the ACQUIRE service, where nobody can be asked. A card carries an ID and no
    name (devices.scanner.PatientScanned): its check-in names nobody, so user 2's readings go on
    under the mapping's 张三 - never under another name unasked - and the mapping is unchanged."""
    from lastmile.clinic.device_users import DeviceUsers, mapped_name

    scanner = PtyDevice(tmp_path / "usb-scanner")
    r = running([{"name": "desk-scanner", "match": str(scanner.link_path), "profile": "scanner"}])
    wait_for(lambda: all(s.connected for s in r.service.statuses()), timeout=30)
    card, cuff, mapped_as = PATIENT_CARD_SCAN.strip().decode(), "C0:26:DA:01:02:03", "Zhang^San=张^三"
    users = DeviceUsers(r.patients.db)
    users.map_user(cuff, 2, card, now=r.now(), name=mapped_as)
    r.patients.set_patient("P-LI", "Li^Si=李^四", now=r.now())
    scanner.write(PATIENT_CARD_SCAN)
    wait_for(lambda: getattr(r.patients.current(r.now()), "patient_id", None) == card, timeout=30)
    (user,) = users.mappings()
    assert user.mapping.patient_name == mapped_as
    assert mapped_name(user.mapping, r.patients, r.now()) == mapped_as
    assert users.mapped_otherwise(card, r.patients.current(r.now()).name) == []  # nothing to ask
