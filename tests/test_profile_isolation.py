"""One malformed ASCII-report profile file must stop only the serial devices that name it: the
acquire service runs every other device link, and the refused device's status says which file and
line is wrong (found 2026-12-06: any bad file in serial.profiles_dir stopped the whole acquire
service, used or not)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from devices.bridge import codec
from firmware_bridge.bridge_simulator import EcgStreamSimulator
from firmware_bridge.firmware.bridge_core import BridgeCore
from lastmile.clinic.devices import DeviceRecord, DeviceRegistry
from lastmile.doctor import Level
from tests.conftest import shared_file
from tests.serial_gateway import Running, talk_as_bridge, wait_for_answers, ward_profile_with_bad_baudrate
from tests.serial_pty import PtyDevice
from tests.service_harness import (
    VITALS_REPORT,
    Manager,
    doctor,
    start_acquire,
    status_with,
    stop_child,
)
from tests.waiting import wait_for
from uploader.outbox import Outbox


def refusal_said_then_stopped(
    refused: DeviceRecord | None, line: int, data: Path, serial_toml: str, proc: subprocess.Popen[str]
) -> None:
    """The refused device's entry (`lastmile devices`, the console's Devices page) and `lastmile
    doctor` (on the same `[serial]` configuration) name the ward monitor's file and line; then
    the acquire service stops cleanly."""
    assert refused is not None and not refused.connected
    assert f"ward-monitor.toml:{line}: 'profile.baudrate' out of range" in refused.last_error, refused
    found = [f for f in doctor(data, serial_toml).check_devices() if f.level is Level.WARN]
    assert found and f"ward-monitor.toml:{line}" in found[0].message, found
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_a_bad_profile_file_stops_only_the_device_that_names_it(tmp_path: Path) -> None:
    """A technician drops a new monitor's profile with a typo (and a half-written spare file) into
    serial.profiles_dir. The clinic's vitals monitor, the USB stick and every other link must go
    on being read; the ward monitor alone is refused, and `lastmile devices` / the console /
    `lastmile doctor` say which file and line to fix."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    line = ward_profile_with_bad_baudrate(profiles)
    (profiles / "spare.toml").write_text("[profile\nname = 'spare'\n")  # named by no device
    stick = tmp_path / "stick"
    stick.mkdir()
    # written before the stick came in: imported at once
    os.utime(shutil.copy(shared_file("ecg", "contec", "0000037.ECG"), stick), (time.time() - 3600,) * 2)
    monitor, ward = PtyDevice(tmp_path / "usb-monitor"), PtyDevice(tmp_path / "usb-ward")
    config = tmp_path / "lastmile.toml"
    data = tmp_path / "data"
    serial_toml = (
        f'[serial]\nprofiles_dir = "{profiles}"\n\n'
        f'[[serial.devices]]\nname = "monitor"\nmatch = "{monitor.link_path}"\nprofile = "example-vitals-monitor"\n\n'
        f'[[serial.devices]]\nname = "ward"\nmatch = "{ward.link_path}"\nprofile = "ward-monitor"\n'
    )
    config.write_text(
        f'[gateway]\ndata_dir = "{data}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n'
        f'[usb_import]\nfolders = ["{stick}"]\n' + serial_toml
    )
    manager = Manager(tmp_path / "notify")
    proc = start_acquire(config, manager, watchdog_usec=20_000_000)
    registry: DeviceRegistry | None = None
    try:
        manager.wait_for("READY=1", timeout=60)
        status_with(manager, "usb-import up")
        status_with(manager, "serial up, 1 device refused")  # not "serial up": the ward monitor is not read
        registry = DeviceRegistry.open(data)
        reg = registry

        def device(name: str) -> DeviceRecord | None:
            return reg.get(f"serial:{name}")

        wait_for(lambda: (d := device("monitor")) is not None and d.connected, timeout=60)
        printed = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).strftime("DATE %Y-%m-%d  TIME %H:%M:%S")
        monitor.write(VITALS_REPORT.replace(b"DATE 2025-03-04  TIME 09:41:07", printed.encode()))
        wait_for(lambda: bool(device("monitor").last_reading), timeout=60)  # type: ignore[union-attr]
        refusal_said_then_stopped(device("ward"), line, data, serial_toml, proc)
    finally:
        if registry is not None:
            registry.close()
        stop_child(proc)
        manager.sock.close()
        monitor.unplug()
        ward.unplug()
    outbox = Outbox.open(data)
    try:
        assert len(outbox.items(kind="dicom")) == 1, "the stick's ECG was not imported"
    finally:
        outbox.close()


def test_a_bad_forward_profile_stops_only_the_forwarded_device_not_the_bridge(tmp_path: Path) -> None:
    """An ECG bridge whose RS-232 port forwards a ward monitor, the monitor's profile file mistyped:
    the bridge was not started at all, so its own ECG stream was lost with the monitor. The bridge
    runs and its ECG is stored; only the monitor's forwarded lines are refused (NACK_REFUSED: the
    bridge keeps them for when the file is fixed), and `lastmile devices` / the console / `lastmile
    doctor` say which file and line to fix under the forwarded device's own entry."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    line = ward_profile_with_bad_baudrate(profiles)
    bridge = PtyDevice(tmp_path / "usb-ecg-bridge")
    config = tmp_path / "lastmile.toml"
    data = tmp_path / "data"
    serial_toml = (
        f'[serial]\nprofiles_dir = "{profiles}"\n\n'
        f'[[serial.devices]]\nname = "ecg"\nmatch = "{bridge.link_path}"\nprofile = "bridge"\n'
        'forward_profile = "ward-monitor"\n'
    )
    config.write_text(f'[gateway]\ndata_dir = "{data}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n' + serial_toml)
    manager = Manager(tmp_path / "notify")
    proc = start_acquire(config, manager, watchdog_usec=20_000_000)
    registry: DeviceRegistry | None = None
    try:
        manager.wait_for("READY=1", timeout=60)
        status_with(manager, "serial up, 1 device refused")  # the forwarded monitor is not read
        core, clock = BridgeCore("BR-ECG", boot_id=9, capabilities=("ecg",)), [0]
        talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
        sim = EcgStreamSimulator(core, recording_id=3)
        bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(40)) + sim.end(40 * 25, clock[0]))
        talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)  # ECG_END ACKed: durable
        bridge.write(core.uart_bytes(VITALS_REPORT, clock[0]))
        lines = set(core.pending_seqs())
        answers = wait_for_answers(bridge, lines, core, clock[0])
        assert {(a.seq, type(a), getattr(a, "reason", None)) for a in answers} == {
            (seq, codec.Nack, codec.NACK_REFUSED) for seq in lines
        }
        assert core.pending_count == len(lines)  # kept on the bridge, to be resent
        registry = DeviceRegistry.open(data)
        refusal_said_then_stopped(registry.get("serial:ecg:forwarded"), line, data, serial_toml, proc)
    finally:
        if registry is not None:
            registry.close()
        stop_child(proc)
        manager.sock.close()
        bridge.unplug()
    outbox = Outbox.open(data)
    try:
        assert [i.key for i in outbox.items(kind="dicom")] == ["bridge-ecg:BR-ECG:9:3"]
    finally:
        outbox.close()


def test_a_forwarded_device_refused_before_is_not_said_refused_once_its_profile_is_fixed(tmp_path: Path) -> None:
    """The forwarded device's refusal lives in its own entry, which nothing connects to: once the
    technician fixes the file, the next start must clear it, or `lastmile doctor` warns forever."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    ward_profile_with_bad_baudrate(profiles)
    bridge = {"name": "ecg", "match": "2e8a:000a", "profile": "bridge", "forward_profile": "ward-monitor"}
    refused = Running(tmp_path, [bridge], profiles_dir=str(profiles))
    try:
        record = refused.registry.get("serial:ecg:forwarded")
        assert record is not None and "ward-monitor.toml" in record.last_error, record
    finally:
        refused.close()
    fixed = (profiles / "ward-monitor.toml").read_text().replace("baudrate = 0", "baudrate = 9600")
    (profiles / "ward-monitor.toml").write_text(fixed)
    running = Running(tmp_path, [bridge], profiles_dir=str(profiles))
    try:
        assert running.service.refused == {}
        record = running.registry.get("serial:ecg:forwarded")
        assert record is not None and record.last_error == "", record
        serial_toml = f'[serial]\nprofiles_dir = "{profiles}"\n\n[[serial.devices]]\n' + "".join(
            f"{key} = {value!r}\n" for key, value in bridge.items()
        )
        assert not [f for f in doctor(tmp_path / "data", serial_toml).check_devices() if f.level is Level.WARN]
    finally:
        running.close()
