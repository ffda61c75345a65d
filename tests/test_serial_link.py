"""Serial links over real pty pairs: finding, exclusive open, hot-plug, unplug mid-message, backoff."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import serial

from devices.bridge import codec
from devices.bridge.session import DeviceHello, ObservationReady, SessionProblem
from firmware_bridge.firmware.bridge_core import BridgeCore
from firmware_bridge.serial_link import DevWatcher, LinkSpec, PortInfo, PortMatch, list_ports
from tests.serial_pty import ManagerThread, PtyDevice, SessionHandler
from tests.waiting import wait_for

BP = (codec.MeasuredValue("systolic", 120.0, "mm[Hg]"), codec.MeasuredValue("diastolic", 80.0, "mm[Hg]"))


def _spec(path: Path) -> LinkSpec:
    return LinkSpec("bridge", PortMatch(path=str(path)), "bridge")


def _handlers() -> tuple[list[SessionHandler], object]:
    made: list[SessionHandler] = []

    def factory(spec: LinkSpec, port: PortInfo) -> SessionHandler:
        made.append(SessionHandler())
        return made[-1]

    return made, factory


def test_port_match_parsing() -> None:
    m = PortMatch.parse("2E8A:000a:E6614104")
    assert (m.vid, m.pid, m.serial_number) == (0x2E8A, 0x000A, "E6614104")
    assert str(m) == "2e8a:000a:E6614104"
    assert PortMatch.parse("/dev/serial/by-id/usb-x").path == "/dev/serial/by-id/usb-x"
    ports = [PortInfo("/dev/ttyACM0", 0x2E8A, 0x000A, "OTHER"), PortInfo("/dev/ttyACM1", 0x2E8A, 0x000A, "E6614104")]
    assert m.find(ports).device == "/dev/ttyACM1"  # by serial number, not by plug order
    assert PortMatch.parse("2e8a:000a").find(ports).device == "/dev/ttyACM0"
    for bad in ("ttyUSB0", "zz:01", "10000:1"):
        with pytest.raises(ValueError):
            PortMatch.parse(bad)
    assert isinstance(list_ports(), list)  # the real listing runs here (no USB devices)


def test_bridge_over_pty_delivers_and_acks(tmp_path: Path) -> None:
    dev = PtyDevice(tmp_path / "usb-bridge")
    core = BridgeCore("BR-1", boot_id=7)
    made, factory = _handlers()
    with ManagerThread([_spec(dev.link_path)], factory, watch_dirs=None, rescan_s=0.1) as manager:
        wait_for(lambda: made and made[0].session is not None)
        # The gateway greets first; the bridge answers with its HELLO.
        greeting = dev.read_available(1.0)
        dev.write(core.receive(greeting, now_ms=0))
        dev.write(core.measurement("blood-pressure", BP, now_ms=10, record_id="m1"))
        wait_for(lambda: made[0].of_type(ObservationReady))
        wait_for(lambda: (core.receive(dev.read_available(0.05), 20) is not None) and core.pending_count == 0)
        hello = made[0].of_type(DeviceHello)[0]
        assert hello.identity.serial == "BR-1" and hello.boot_id == 7
        obs = made[0].of_type(ObservationReady)[0].observation
        assert obs.quantity("systolic").value == 120.0 and obs.device.serial == "BR-1"
        assert manager.statuses()[0].connected
    dev.unplug()


def test_garbage_and_frames_cut_in_pieces(tmp_path: Path) -> None:
    dev = PtyDevice(tmp_path / "usb-bridge")
    core = BridgeCore("BR-2", boot_id=1)
    made, factory = _handlers()
    with ManagerThread([_spec(dev.link_path)], factory, watch_dirs=None, rescan_s=0.1):
        wait_for(lambda: made and made[0].session is not None)
        dev.write(b"\xff\xfe garbage at 9600 baud \x81\x00\x13")
        frames = b"".join(
            core.measurement("spo2", (codec.MeasuredValue("spo2", 97.0 + i, "%"),), 0, record_id=f"r{i}")
            for i in range(3)
        )
        for i in range(0, len(frames), 7):  # frames cut into 7-byte pieces with pauses
            dev.write(frames[i : i + 7])
            time.sleep(0.002)
        # The garbage had no delimiter after its last byte, so it spoiled the first frame; the
        # bridge resends what was not acknowledged (same seq) until everything is.
        clock = [0]

        def settled() -> bool:
            core.receive(dev.read_available(0.05), clock[0])
            clock[0] += 2500
            dev.write(core.poll(clock[0]))
            return core.pending_count == 0

        wait_for(settled)
        values = sorted(e.observation.quantity("spo2").value for e in made[0].of_type(ObservationReady))
        assert values == [97.0, 98.0, 99.0]  # each once: resent copies of received ones were dropped
        assert any("CRC" in p.reason or "COBS" in p.reason for p in made[0].of_type(SessionProblem))
    dev.unplug()


def test_unplug_mid_message_keeps_complete_ones_and_replug_reconnects(tmp_path: Path) -> None:
    link = tmp_path / "usb-bridge"
    dev = PtyDevice(link)
    core = BridgeCore("BR-3", boot_id=1)
    made, factory = _handlers()
    with ManagerThread([_spec(link)], factory, watch_dirs=None, rescan_s=0.2) as manager:
        wait_for(lambda: made and made[0].session is not None)
        complete = core.measurement(
            "body-temperature", (codec.MeasuredValue("body-temperature", 36.6, "Cel"),), 0, record_id="t1"
        )
        half = core.measurement(
            "body-temperature", (codec.MeasuredValue("body-temperature", 39.9, "Cel"),), 0, record_id="t2"
        )
        dev.write(complete + half[: len(half) // 2])
        wait_for(lambda: made[0].of_type(ObservationReady))
        dev.unplug()  # mid-frame
        wait_for(lambda: made[0].lost)
        assert not manager.statuses()[0].connected
        # Replug: the same by-id name now points at a new node; the bridge rebooted.
        dev2 = PtyDevice(link)
        wait_for(lambda: len(made) == 2 and made[1].session is not None, timeout=60.0)
        core2 = BridgeCore("BR-3", boot_id=2)
        dev2.write(
            core2.hello(0)
            + core2.measurement(
                "body-temperature", (codec.MeasuredValue("body-temperature", 37.1, "Cel"),), 0, record_id="t3"
            )
        )
        wait_for(lambda: made[1].of_type(ObservationReady))
        first = [e.observation.quantity("body-temperature").value for e in made[0].of_type(ObservationReady)]
        second = [e.observation.quantity("body-temperature").value for e in made[1].of_type(ObservationReady)]
        assert first == [36.6] and second == [37.1]  # nothing complete lost, the half frame not invented
        status = manager.statuses()[0]
        assert status.connected and status.connects == 2 and "gone" in status.last_error
        dev2.unplug()


def _counting_rescans(threaded: ManagerThread) -> list[tuple[float, bool]]:
    """Each finished rescan: its time and whether it connected the (first) device. The events a
    hot-plug test can wait on: which scan connected is known without racing the manager thread
    (the status says "connected" inside the scan, before the scan is counted)."""
    scans: list[tuple[float, bool]] = []
    rescan = threaded.manager._rescan

    def counted(now: float) -> None:
        before = threaded.manager.statuses()[0].connected
        rescan(now)
        scans.append((now, threaded.manager.statuses()[0].connected and not before))

    threaded.manager._rescan = counted  # type: ignore[method-assign]
    return scans


def test_hot_plug_noticed_by_the_one_second_rescan(tmp_path: Path) -> None:
    link = tmp_path / "usb-late"
    _made, factory = _handlers()
    threaded = ManagerThread([_spec(link)], factory, watch_dirs=None)  # no inotify: default rescan
    scans = _counting_rescans(threaded)
    with threaded as manager:
        assert manager.rescan_s == 1.0
        wait_for(lambda: scans, timeout=60.0)  # the start-up scan is done, before the device exists
        assert not manager.statuses()[0].present
        dev = PtyDevice(link)
        wait_for(lambda: any(connected for _t, connected in scans), timeout=60.0)
        # a later rescan, the only way to notice it here, found it (not the start-up scan)
        assert next(i for i, (_t, connected) in enumerate(scans) if connected) >= 1
        dev.unplug()


def test_inotify_wakes_the_manager_at_once(tmp_path: Path) -> None:
    watcher = DevWatcher([tmp_path])
    if not watcher.available:
        from tests.conftest import missing

        missing("inotify not available in this kernel")
    watcher.close()
    link = tmp_path / "usb-hotplug"
    _made, factory = _handlers()
    # An hour between rescans: only the inotify event can explain a connect within the minute waited.
    threaded = ManagerThread([_spec(link)], factory, watch_dirs=[tmp_path], rescan_s=3600.0)
    scans = _counting_rescans(threaded)
    with threaded:
        wait_for(lambda: scans, timeout=60.0)  # the start-up scan is done, before the device exists
        dev = PtyDevice(link)
        wait_for(lambda: any(connected for _t, connected in scans), timeout=60.0)
        (at, _), *_ = [scan for scan in scans if scan[1]]
        assert at - scans[0][0] < 3600.0  # a rescan woken early by inotify, not the hourly one
        dev.unplug()


def test_the_hot_plug_watcher_starts_no_child_process(tmp_path: Path) -> None:
    """Found looking at acquire's RSS (bench/soak.py): finding libc by name ran `ldconfig -p` in a
    child process (a fork of the whole service) and left subprocess imported in it. The watcher
    takes libc from the process's own symbols, and still sees an entry appear."""
    import subprocess
    import sys

    probe = (
        "import os, select, sys\n"
        "from firmware_bridge.serial_link import DevWatcher\n"
        f"watcher = DevWatcher([{str(tmp_path)!r}])\n"
        f"open(os.path.join({str(tmp_path)!r}, 'ttyUSB0'), 'w').close()\n"
        "seen = bool(select.select([watcher], [], [], 30)[0]) if watcher.available else 'no inotify'\n"
        "print(seen, 'subprocess' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_open_is_exclusive(tmp_path: Path) -> None:
    dev = PtyDevice(tmp_path / "usb-bridge")
    _made, factory = _handlers()
    with ManagerThread([_spec(dev.link_path)], factory, watch_dirs=None, rescan_s=0.1) as manager:
        wait_for(lambda: manager.statuses()[0].connected)
        with pytest.raises(serial.SerialException):
            serial.Serial(str(dev.link_path), exclusive=True)
    dev.unplug()


def test_found_by_vid_pid_serial_through_the_listing(tmp_path: Path) -> None:
    dev = PtyDevice(tmp_path / "usb-bridge")
    listing = [PortInfo(dev.slave_path, 0x2E8A, 0x000A, "E6614104", by_id=str(dev.link_path))]
    _made, factory = _handlers()
    spec = LinkSpec("bridge", PortMatch.parse("2e8a:000a:E6614104"), "bridge")
    with ManagerThread([spec], factory, lister=lambda: listing, watch_dirs=None, rescan_s=0.1) as manager:
        wait_for(lambda: manager.statuses()[0].connected)
        assert manager.statuses()[0].port == str(dev.link_path)
    dev.unplug()


def test_open_failure_backs_off_and_reports(tmp_path: Path) -> None:
    not_a_tty = tmp_path / "not-a-tty"
    not_a_tty.write_bytes(b"")
    clock = [100.0]
    _made, factory = _handlers()
    from firmware_bridge.serial_link import SerialLinkManager

    manager = SerialLinkManager([_spec(not_a_tty)], factory, watch_dirs=None, rescan_s=1.0, clock=lambda: clock[0])
    delays = []
    try:
        for _ in range(8):
            manager.poll(0.0)
            delays.append(manager.statuses()[0].retry_in_s)
            clock[0] += 40.0
    finally:
        manager.close()
    status = manager.statuses()[0]
    assert not status.connected and status.connects == 0 and "open" in status.last_error
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0] and max(delays) == 30.0
