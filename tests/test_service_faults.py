"""Silent failures of the running services, found by review (2026-12-06): one device link that
cannot start held every other link of the acquire service down; `lastmile doctor` said OK for a
service that was up but could not do its work; the acquire service never stored what an
unplugged monitor had left unstored. Each test failed on the code before its fix."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.device_errors import DeviceProblem
from lastmile.clinic.devices import DeviceRecord, DeviceRegistry
from lastmile.config import Config
from lastmile.doctor import Level
from lastmile.logs import describe_fault
from lastmile.services.parts import Part, WorkerPart, down_status
from lastmile.services.runtime import FAULT
from tests.conftest import REPO, shared_file
from tests.serial_pty import PtyDevice
from tests.service_harness import (
    STOP_WITHIN_S,
    Manager,
    acquire_stopped_under_a_lock,
    acquire_toml,
    doctor,
    report_printed,
    start_acquire,
    status_with,
    stop_child,
)
from tests.waiting import wait_for
from uploader.outbox import Outbox


@contextlib.contextmanager
def acquire_with_lan_port_taken(tmp_path: Path) -> Iterator[tuple[Manager, subprocess.Popen[str], socket.socket, int]]:
    """`lastmile acquire` with a USB folder holding an ECG, and the LAN receiver's port held by
    another program (a leftover storescp; the same as its address not assigned yet at boot).
    Yields systemd's notification socket, the process, the socket holding the port (closed to
    free it) and the port."""
    manager = Manager(tmp_path / "notify")
    stick = tmp_path / "stick"
    stick.mkdir()
    ecg = stick / "0000037.ECG"
    shutil.copyfile(shared_file("ecg", "contec", "0000037.ECG"), ecg)
    os.utime(ecg, (time.time() - 3600,) * 2)  # written before the stick came in: imported at once
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n'
        f'[usb_import]\nfolders = ["{stick}"]\n'
        f'[lan_receiver]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\nallowed_callers = ["CART"]\n'
    )
    proc = start_acquire(config, manager, watchdog_usec=20_000_000)
    try:
        yield manager, proc, holder, port
    finally:
        holder.close()
        stop_child(proc)
        manager.sock.close()


# -- one link down must not take the others with it ------------------------------------------------


def test_a_lan_receiver_that_cannot_listen_does_not_stop_the_other_device_links(tmp_path: Path) -> None:
    """lastmile/services/acquire.py lan_receiver_part: the receiver is started while the parts
    are built, so its bind error (port held by another program, the clinic LAN's address not yet
    assigned at boot, the LAN switch off) fails AcquireService.start as a whole: the runtime waits
    it out with a backoff up to 5 min, READY, and meanwhile no serial device, no USB stick and no
    GPS is read at all. The BP monitor's readings and the stick's ECGs are simply not recorded."""
    with acquire_with_lan_port_taken(tmp_path) as (manager, proc, holder, port):
        manager.wait_for("READY=1", timeout=60)
        # the stick is imported while the LAN receiver cannot listen ...
        status_with(manager, "usb-import up")
        down = status_with(manager, "lan-receiver", "Address already in use")
        assert "usb-import up" in down, down
        holder.close()  # ... and the receiver comes up by itself once the port is free
        status_with(manager, f"lan-receiver :{port}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    outbox = Outbox.open(tmp_path / "data")
    try:
        assert len(outbox.items(kind="dicom")) == 1, "the stick's ECG was not imported"
    finally:
        outbox.close()


# -- lastmile doctor: up is not the same as working -------------------------------------------------


def systemctl_showing(acquire_status: str):
    """systemctl as `lastmile doctor` asks it: every unit active, acquire saying `acquire_status`."""

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        unit = cmd[2]
        text = "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\nSubState=running\nNRestarts=0\n"
        if unit == "lastmile-acquire.service":
            text += f"StatusText={acquire_status}\n"
        return subprocess.CompletedProcess(cmd, 0, text, "")

    return run


def test_doctor_fails_a_service_that_is_up_but_cannot_do_its_work(tmp_path: Path) -> None:
    """lastmile/doctor.py check_services: a unit that is active is OK, whatever its status says.
    The runtime waits out operational faults READY ("acquire: cannot start: Address already in
    use; retrying in 40 s"), and a part of a service can be down and retried: the unit stays
    active with the fault only in STATUS=, and the technician's self-check says OK - "all good"
    when nothing else is wrong - while the carts on the clinic LAN are refused."""
    (tmp_path / "systemd").mkdir()
    # what acquire says in STATUS= while the LAN receiver's port is held by another program:
    # the receiver down, the other parts up; or, waited out, the whole service not started
    in_use = OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    part_down = "; ".join([down_status("lan-receiver", f"OSError: {in_use}"), "usb-import up"])
    waited_out = f"{FAULT} acquire: cannot start: {describe_fault(in_use)}; retrying in 40 s"
    for status in (part_down, waited_out):
        d = doctor(tmp_path, run=systemctl_showing(status), systemd_run_dir=tmp_path / "systemd")
        acquire = next(f for f in d.check_services() if f.message.startswith("lastmile-acquire.service"))
        assert acquire.level is Level.FAIL, acquire
        assert "Address already in use" in acquire.message and "journalctl -u lastmile-acquire" in acquire.hint
    healthy = doctor(tmp_path, run=systemctl_showing("usb-import up"), systemd_run_dir=tmp_path / "systemd")
    assert [f.level for f in healthy.check_services()] == [Level.OK] * 4


# -- the acquire service's serial part: what it holds, what it has in hand at SIGTERM ----------------


@dataclasses.dataclass
class MonitorOnPart:
    monitor: PtyDevice
    outbox: Outbox
    outbox_path: Path
    part: Part
    registry: DeviceRegistry
    report: bytes  # what the monitor prints: three readings
    config: Config

    def device(self) -> DeviceRecord:
        record = self.registry.get("serial:monitor")
        assert record is not None
        return record


@contextlib.contextmanager
def monitor_on_the_acquire_part(tmp_path: Path) -> Iterator[MonitorOnPart]:
    """A vital-signs monitor on a pty, connected through the acquire service's serial part (its
    thread started as the service's step starts it), a patient checked in."""
    from lastmile.clinic.patients import PatientContext
    from lastmile.services.acquire import serial_part

    link = tmp_path / "usb-monitor"
    monitor = PtyDevice(link)
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.serial.devices = [{"name": "monitor", "match": str(link), "profile": "example-vitals-monitor"}]
    outbox = Outbox.open(config.data_dir, min_free_bytes=0)
    part = serial_part(config, outbox)
    assert part is not None
    patients = PatientContext.open(config.data_dir, idle_timeout_s=900)
    registry = DeviceRegistry.open(config.data_dir)
    now = dt.datetime.now(dt.timezone.utc)
    m = MonitorOnPart(monitor, outbox, config.data_dir / "outbox.sqlite", part, registry, report_printed(now), config)
    try:
        part.check(time.monotonic())
        wait_for(lambda: registry.get("serial:monitor") is not None and m.device().connected, timeout=30)
        patients.set_patient("P-9", now=now - dt.timedelta(minutes=1))
        yield m
    finally:
        part.close()
        monitor.unplug()
        registry.close()
        patients.close()
        outbox.close()


def test_acquire_stores_what_an_unplugged_monitor_left_once_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lastmile/services/acquire.py serial_part: the acquire service runs the serial link manager
    in its own loop (poll, beat) and never calls SerialService.retry_unstored, which stores what
    an unplugged device left in memory when the outbox refused it ("held in memory, retried in
    30 s"). A monitor printed its readings while the data partition was full and was then
    unplugged (taken on a home visit): once the forwarder has freed space the readings still sit
    in memory - not forwarded, and gone at the next power cut."""
    import lastmile.services.serial_devices as serial_devices

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 0.2)  # retried every 0.2 s, not 30 s
    with monitor_on_the_acquire_part(tmp_path) as m:
        m.outbox.min_free_bytes = 1 << 60  # the data partition is full for now
        m.monitor.write(m.report)
        # refused by the full outbox: held, as the row's held status says (a space failure is not its error)
        wait_for(lambda: m.device().waits_for_space, timeout=30)
        m.monitor.unplug()
        wait_for(lambda: not m.device().connected, timeout=30)
        m.outbox.min_free_bytes = 0  # the forwarder sent and purged: room again
        wait_for(lambda: len(m.outbox.items(kind="observation")) >= 3, timeout=30)
        assert len(m.outbox.items(kind="observation")) == 3  # once each


@contextlib.contextmanager
def outbox_locked(m: MonitorOnPart) -> Iterator[None]:
    """Another process holds the outbox's write lock (a cause that is not space): the monitor's
    readings are refused with "database is locked" after 50 ms rather than the 15 s busy wait."""
    import sqlite3

    m.outbox.db.conn.execute("PRAGMA busy_timeout=50")  # the outbox's own connection (SQLite serialises the call)
    other = sqlite3.connect(m.outbox_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.rollback()
        other.close()


def readings_held_by_a_locked_outbox(m: MonitorOnPart) -> None:
    """The monitor prints its report while the outbox is locked: all three held (spill file), the
    row's error says why."""
    m.monitor.write(m.report)
    wait_for(lambda: m.device().held_reading_count == 3 and "database is locked" in m.device().last_error, timeout=30)


def test_a_monitor_row_says_no_store_error_once_its_held_readings_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lastmile/services/serial_devices.py retry_unstored: readings the outbox refused for another
    cause than space (locked by another process) were held and the row said "cannot store
    reading: database is locked"; once they were stored, the row still said it (the Devices page's
    "could not be saved: please measure again", `lastmile devices`) for a monitor that was fine."""
    import lastmile.services.serial_devices as serial_devices

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 0.2)
    with monitor_on_the_acquire_part(tmp_path) as m:
        with outbox_locked(m):
            readings_held_by_a_locked_outbox(m)
        wait_for(lambda: not m.device().waits_for_space, timeout=30)
        assert len(m.outbox.items(kind="observation")) == 3
        assert m.device().last_error == "", m.device().last_error


def test_the_doctor_advises_by_the_cause_of_held_readings_not_free_space(tmp_path: Path) -> None:
    """lastmile/doctor.py _readings_waiting_for_space: readings held because the outbox was locked
    (not full) got the FAIL "free space on the data partition" (the System page: "waiting for
    storage space ... free space"), beside the WARN that says the real cause: freeing space does
    nothing for them. Now the FAIL names the cause and says to call the county IT."""
    from lastmile.console.app import advice_text
    from lastmile.console.i18n import Localizer
    from lastmile.doctor import Doctor

    with monitor_on_the_acquire_part(tmp_path) as m, outbox_locked(m):
        readings_held_by_a_locked_outbox(m)
        findings = Doctor(m.config).check_devices()
    (held,) = [f for f in findings if f.level is Level.FAIL]
    assert "free space" not in held.hint and "database is locked" in held.message, (held.message, held.hint)
    zh = advice_text(held, Localizer("zh-CN", dt.timezone.utc))
    assert "存储空间" not in zh and "信息" in zh, zh  # not "waiting for storage space": call the county IT


def devices_command_says(m: MonitorOnPart, capsys: pytest.CaptureFixture[str]) -> str:
    """What `lastmile devices` prints of the monitor's data directory."""
    from lastmile.cli import main

    toml = m.config.data_dir.parent / "lastmile.toml"
    (entry,) = m.config.serial.devices
    toml.write_text(
        f'[gateway]\ndata_dir = "{m.config.data_dir}"\n[[serial.devices]]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in entry.items())
    )
    capsys.readouterr()
    assert main(["-c", str(toml), "devices"]) == 0
    return capsys.readouterr().out


def devices_page_card(m: MonitorOnPart, browser: object) -> str:
    """The monitor's card on the Devices page (zh-CN), in a real Chromium."""
    from tests.console_browser import by, log_in
    from tests.console_harness import console_config, running_console

    config = console_config(m.config.data_dir)
    config.serial.devices = m.config.serial.devices
    with running_console(config) as console:
        log_in(browser, console)
        browser.get(console.url + "/devices")  # type: ignore[attr-defined]
        return browser.find_element(by("css"), "ul.device-list li.card").text  # type: ignore[attr-defined]


def test_a_row_held_by_a_locked_outbox_says_its_cause_not_waiting_for_space(
    tmp_path: Path, browser: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """lastmile/clinic/devices.py waiting_message and the Devices page: readings held because the
    outbox was locked (not full) were said "3 reading(s) waiting for space on the data partition"
    by `lastmile devices` and "等待存储空间" (waiting for storage space) on the Devices page, which
    also told the doctor to measure again (they are kept): the doctor frees space for nothing.
    Now both say they wait to be saved, for another cause than space, and name it."""
    import lastmile.services.serial_devices as serial_devices

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 3600)  # still held when the pages are read
    with monitor_on_the_acquire_part(tmp_path) as m:
        with outbox_locked(m):  # the row keeps the cause once the lock is gone
            readings_held_by_a_locked_outbox(m)
        said = devices_command_says(m, capsys)
        card = devices_page_card(m, browser)
    assert "waiting for space" not in said and "3 reading(s) waiting to be stored" in said, said
    assert "database is locked" in said, said
    assert "等待存储空间" not in card and "等待保存" in card and "并非空间不足" in card, card
    assert "请重新测量" not in card, card  # they are kept: nothing to measure again


def test_held_readings_refused_for_space_after_a_lock_are_said_waiting_for_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """lastmile/services/serial_devices.py store_observation: readings held by a locked outbox kept
    the row's "cannot store reading: database is locked" when the lock went and the data partition
    was full instead (a space failure writes no error), so the row and `lastmile doctor` kept the
    lock's advice (call the county IT) rather than "free space". Now a held store refused for space
    clears that error, and only that kind (a write to clinic.db when it changes, not per retry)."""
    import lastmile.services.serial_devices as serial_devices
    from lastmile.doctor import Doctor

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 0.2)
    with monitor_on_the_acquire_part(tmp_path) as m:
        with outbox_locked(m):
            readings_held_by_a_locked_outbox(m)
            m.outbox.min_free_bytes = 1 << 60  # the lock goes; the data partition is full now
        wait_for(lambda: m.device().last_error == "", timeout=30)
        assert m.device().waits_for_space
        said = devices_command_says(m, capsys)
        findings = Doctor(m.config).check_devices()
    assert "3 reading(s) waiting for space" in said and "database is locked" not in said, said
    (held,) = [f for f in findings if f.level is Level.FAIL]
    assert "free space" in held.hint, (held.message, held.hint)


def test_the_journal_says_the_cause_of_readings_held_by_a_locked_outbox_not_space(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lastmile/services/serial_devices.py _say_waiting: readings held because the outbox was
    locked (not full) were journalled "3 reading(s) waiting for space on the data partition",
    while the row (DeviceRecord.held_cause) said the real cause: the county technician reading
    the journal freed disk space that was not the problem. Now the journal says what the row says."""
    import logging

    import lastmile.services.serial_devices as serial_devices

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 3600)  # the lines of the holding, not of retries
    with (
        caplog.at_level(logging.INFO, logger="lastmile.services.serial_devices"),
        monitor_on_the_acquire_part(tmp_path) as m,
        outbox_locked(m),
    ):
        readings_held_by_a_locked_outbox(m)
        said = [r.getMessage() for r in caplog.records if r.name == serial_devices.__name__]
    assert not [line for line in said if "space" in line], said
    waiting = [line for line in said if "waiting to be stored" in line]
    assert waiting and all("database is locked" in line for line in waiting), said


def test_a_store_error_worded_otherwise_keeps_its_advice_and_is_cleared_by_its_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lastmile/clinic/devices.py problem_kind: a device row's error was told to the doctor by its
    opening words, so the serial service's "cannot store" error worded otherwise (here translated,
    "无法保存") was "it reported a problem": `lastmile doctor` told to free space for readings a
    locked outbox held, and the error stayed once they were stored. Now the writer records the
    error's kind with it: the words are the technician's alone."""
    import lastmile.services.serial_devices as serial_devices
    from lastmile.doctor import Doctor

    monkeypatch.setattr(serial_devices, "CANNOT_STORE", "无法保存：")
    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 0.5)
    with monitor_on_the_acquire_part(tmp_path) as m:
        with outbox_locked(m):
            readings_held_by_a_locked_outbox(m)
            assert m.device().last_error.startswith("无法保存："), m.device().last_error
            findings = Doctor(m.config).check_devices()
            (held,) = [f for f in findings if f.level is Level.FAIL]
            assert "free space" not in held.hint and "database is locked" in held.message, (held.message, held.hint)
        wait_for(lambda: not m.device().waits_for_space, timeout=30)
        assert m.device().last_error == "", m.device().last_error  # cleared by its kind, whatever its words


@contextlib.contextmanager
def a_report_stored_while_another_process_writes(
    m: MonitorOnPart, monkeypatch: pytest.MonkeyPatch, *, lock_held_s: float
) -> Iterator[None]:
    """The monitor's report being stored (its first reading's add begun) while another process
    holds the outbox's write lock, released `lock_held_s` after; that process gone on exit."""
    storing = threading.Event()
    add = m.outbox.add

    def add_noting(*args: object, **kwargs: object) -> object:
        storing.set()
        return add(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(m.outbox, "add", add_noting)
    other = sqlite3.connect(m.outbox_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process writes: the report waits for it
    release = threading.Timer(lock_held_s, other.rollback)
    try:
        m.monitor.write(m.report)
        assert storing.wait(30), "the report was never stored"
        release.start()
        yield
    finally:
        release.join()
        other.close()


def test_sigterm_while_a_report_is_stored_keeps_every_reading_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lastmile/services/parts.py WorkerPart.close: `on_close` ran before the part's thread was
    joined. For the serial part that is SerialService.close - links torn down from the main
    thread and clinic.db closed - while the link's thread was still storing the report in hand
    (the outbox busy for a moment: another process writing). SIGTERM then (a restart, an update's
    reboot, a shutdown): the first reading is stored, the next ones meet a closed database,
    "cannot store ... closed database", are held in memory and are gone with the process -
    although the runtime promises that the work in hand is finished before close."""
    with monitor_on_the_acquire_part(tmp_path) as m:
        with a_report_stored_while_another_process_writes(m, monkeypatch, lock_held_s=1.0):
            m.part.close()  # SIGTERM: the acquire service closes its parts
        assert len(m.outbox.items(kind="observation")) == 3, "readings of the report in hand were lost at SIGTERM"


def test_the_acquire_stop_tells_every_part_to_stop_before_waiting_for_any(tmp_path: Path) -> None:
    """REV-F 2: AcquireService.close closed its parts one after another: a USB import (no stop
    check inside one) was waited for 15 s while the serial part kept going round, and a card
    scanned meanwhile then waited clinic.db's lock up to 18 s more: past the unit's
    TimeoutStopSec=30, SIGKILL rolled the card's check-in back. Now every part is told to stop
    first and all are closed together: the serial part is closed while the import still runs."""
    import threading

    from lastmile.services.acquire import AcquireService
    from lastmile.services.parts import WorkerPart

    importing, import_may_end = threading.Event(), threading.Event()

    def usb_import(stop: threading.Event, beat: object) -> None:  # a cart's stick: hundreds of files
        importing.set()
        import_may_end.wait(60)

    with monitor_on_the_acquire_part(tmp_path) as m:
        serial = m.part
        assert isinstance(serial, WorkerPart)
        usb = WorkerPart("usb-import", usb_import, stale_after=None)
        usb.start()
        assert importing.wait(10)
        service = AcquireService(m.config, m.outbox, [serial, usb], closers=[])  # as build_parts orders them
        stopping = threading.Thread(target=service.close)
        stopping.start()  # SIGTERM
        try:
            wait_for(lambda: not serial.running, timeout=10, what="the serial part stopped during the import")
            assert usb.running and stopping.is_alive()
        finally:
            import_may_end.set()
            stopping.join(30)
        assert not stopping.is_alive()


def test_the_acquire_parts_stop_ends_within_the_units_stop_timeout(tmp_path: Path) -> None:
    """A part whose close hangs is left at the parts' deadline (said) and returned as still
    closing (its stores are not closed under it), and that deadline leaves the stores' close room
    inside the acquire and BLE units' TimeoutStopSec: no SIGKILL mid-commit."""
    import re
    import threading

    from lastmile.services.acquire import PARTS_STOP_S
    from lastmile.services.parts import close_parts

    for name in ("lastmile-acquire.service", "lastmile-ble.service"):
        unit = (REPO / "systemd" / name).read_text()
        found = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
        assert found is not None and int(found.group(1)) >= PARTS_STOP_S + 5, (name, PARTS_STOP_S, unit)

    never = threading.Event()
    hung = WorkerPart("hung", lambda stop, beat: stop.wait(60), on_close=lambda: never.wait(60))
    quick = WorkerPart("quick", lambda stop, beat: stop.wait(60))
    hung.start()
    quick.start()
    started = time.monotonic()
    try:
        still = close_parts([hung, quick], within_s=1.0)
        took = time.monotonic() - started
    finally:
        never.set()
    assert took < 10, took  # not the hung close's 60 s
    assert not quick.running and not hung.running  # both told to stop at once, both threads ended
    assert still == [hung]  # its close under way: what it tears down may still be in use


def slow_writer(outbox: Outbox, name: str, in_hand_s: float) -> WorkerPart:
    """A part that, told to stop, still stores what it has in hand for `in_hand_s` (an import's
    file, a report's readings): one outbox item a second before that, one after."""

    def work(stop: threading.Event, beat: object) -> None:
        stop.wait(60)
        time.sleep(in_hand_s)
        outbox.add("observation", f"{name}-in-hand", b"{}")

    return WorkerPart(name, work, stale_after=None)


def test_a_part_still_storing_past_the_stop_keeps_the_outbox_open_and_every_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """lastmile/services/acquire.py AcquireService.close: past the parts' deadline the outbox and
    clinic.db were closed although a part was still storing into them - the serial part's report
    in hand, waiting for another process's lock. Its next readings met a closed outbox and were
    not stored (and a sqlite3 connection closed under another thread's statement crashes the
    process: exit 139). Now the stores are left open to a part still closing (said, with what it
    means): the report is stored whole once the lock is free."""
    import logging

    from lastmile.services import acquire
    from lastmile.services.acquire import AcquireService

    monkeypatch.setattr(acquire, "PARTS_STOP_S", 0.5)  # the unit's 24 s, made short
    with monitor_on_the_acquire_part(tmp_path) as m:
        service = AcquireService(m.config, m.outbox, [m.part], closers=[m.outbox.close])
        with a_report_stored_while_another_process_writes(m, monkeypatch, lock_held_s=2.0):
            started = time.monotonic()
            with caplog.at_level(logging.WARNING):
                service.close()  # SIGTERM
            took = time.monotonic() - started
        # every reading of the report in hand stored: none met a closed outbox
        wait_for(lambda: len(m.outbox.items(kind="observation")) == 3, timeout=30, what="the report stored")
        wait_for(m.part.finished, timeout=30, what="the serial part finishing the report in hand")
        print(f"\nthe acquire close, a report waiting for the outbox lock: {took:.1f} s")
        assert took < 1.9, took  # at the deadline, not when the report is stored
    said = caplog.text
    assert "serial: still closing" in said and "spill file" in said, said
    assert "the outbox and clinic.db left open" in said, said


def test_a_reload_stops_the_parts_together_within_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lastmile/services/acquire.py AcquireService.reload closed its parts one after another with
    no deadline (a USB import's 15 s join, then a card's 18 s wait: past WatchdogSec=30). Now as
    the stop: together, so it takes about the slowest, not the sum; one past the deadline is left
    (its stores open) and what it had in hand is still stored."""
    import threading

    from lastmile.services import acquire
    from lastmile.services.acquire import AcquireService

    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.gps.source = "none"  # the reload builds no part: only the old ones' stop is timed
    with contextlib.closing(Outbox.open(config.data_dir, min_free_bytes=0)) as outbox:
        parts: list[Part] = [slow_writer(outbox, "usb-import", 1.5), slow_writer(outbox, "serial", 1.5)]
        service = AcquireService(config, outbox, parts, closers=[outbox.close])
        service.check_parts()
        started = time.monotonic()
        service.reload(config)
        took = time.monotonic() - started
        print(f"\nreload, two parts each 1.5 s to stop: {took:.1f} s")
        assert took < 2.6, took  # the slowest, not the sum (3 s)
        assert len(outbox.items(kind="observation")) == 2

        monkeypatch.setattr(acquire, "PARTS_STOP_S", 0.5)
        service.parts = [slow_writer(outbox, "usb-import-again", 2.0)]
        service.check_parts()
        started = time.monotonic()
        service.reload(config)
        took = time.monotonic() - started
        assert took < 1.9, took  # at the deadline
        wait_for(lambda: len(outbox.items(kind="observation")) == 3, timeout=30, what="the left part's item")
        service.step(threading.Event())  # closes the old session's clinic.db once the left part finished
        service.close()


def test_sigterm_while_a_reading_waits_for_another_process_lock_stops_promptly_keeping_it(tmp_path: Path) -> None:
    """lastmile/services/acquire.py + uploader/outbox.py: another process holds the outbox's write
    lock (the forwarder in a long write; a sqlite3 shell left open) while the monitor's report is
    stored: SIGTERM to `lastmile acquire` waited out the 15 s busy timeout, past a quarter of
    TimeoutStopSec. Now the stop ends that wait (Outbox.give_up_waits_on, as the forwarder's):
    the service exits within seconds, the readings kept in the spill file and said so, stored
    once by the next start."""
    from lastmile.services.serial_spill import waiting_readings

    monitor = PtyDevice(tmp_path / "usb-monitor")  # left plugged in: the next start finds it
    # its store waits for the outbox's lock
    took, out, config, data, returncode = acquire_stopped_under_a_lock(tmp_path, monitor, "outbox.sqlite", patient=True)
    print(f"\nSIGTERM to exit, a reading waiting for the outbox lock: {took:.1f} s")
    assert took < STOP_WITHIN_S and returncode == 0, (took, out)
    assert "Traceback" not in out, out
    assert waiting_readings(data) == 3, out  # kept on disk, and said so
    assert "3 reading(s) (kept on disk, stored after the restart) not stored" in out, out
    # a store the stop gave up is the stop's, not a fault: no "cannot store" problem on the row, no ERROR
    with contextlib.closing(DeviceRegistry.open(data)) as registry:
        row = registry.get("serial:monitor")
    assert row.problem is not DeviceProblem.NOT_SAVED and "cannot store" not in row.last_error, row
    assert "cannot store a" not in out, out
    # held for the stop's own cause, never said as waiting for space (the row, the stop's line, the doctor)
    assert "space" not in row.waiting and "the gateway was stopping" in row.waiting, row.waiting
    assert row.held_at_stop and row.held_reading_count == 3, row
    assert "the outbox refused them" not in out, out
    devices_toml = config.read_text().split("\n", 2)[2]  # its devices: the doctor's data_dir is `data`
    # `lastmile doctor` while the service is stopped
    waiting = [f for f in doctor(data, devices_toml).check_devices() if "from serial devices" in f.message]
    assert [(f.level, f.advice_key) for f in waiting] == [(Level.WARN, "readings-kept-at-stop")], waiting
    assert all("space" not in f.message + f.hint for f in waiting), waiting
    again = start_acquire(config, Manager(tmp_path / "notify-again"), watchdog_usec=20_000_000)
    try:
        with contextlib.closing(Outbox.open(data, min_free_bytes=0)) as outbox:
            wait_for(lambda: len(outbox.items(kind="observation")) >= 3, timeout=60)
            assert len(outbox.items(kind="observation")) == 3  # once each
        with contextlib.closing(DeviceRegistry.open(data)) as registry:  # the next start stored them: the row clean
            wait_for(lambda: not (r := registry.get("serial:monitor")).waits_for_space and not r.held_cause, timeout=30)
            row = registry.get("serial:monitor")
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(30)
    assert waiting_readings(data) == 0
    assert not row.lost_words and not row.last_error, row
    assert not [f for f in doctor(data, devices_toml).check_devices() if "from serial devices" in f.message]


# -- lastmile doctor: a port that answers is not our listener ----------------------------------------


def test_doctor_says_ok_for_the_commitment_port_held_by_lastmile_forward(tmp_path: Path) -> None:
    """lastmile/doctor.py check_commitment_listener: anything that accepted a TCP connection on
    reading_center.listen_port was "listener up" - OK, though a program holding that port (a
    leftover storescp) is exactly what keeps lastmile-forward from starting. That such a port
    FAILs is tests/test_doctor.py's test_commitment_listener; here, that its line names the port and
    the setting, and that the port is OK when it is a real `lastmile forward` that holds it."""
    from lastmile.demo.loopback import free_port
    from tests.peers import wait_for_port

    port = free_port()
    toml = f'[reading_center]\nhost = "127.0.0.1"\nport = {free_port()}\nlisten_port = {port}\n'
    with socket.socket() as other:  # another program: FAIL (test_doctor), saying which port and setting
        other.bind(("127.0.0.1", port))
        other.listen()
        (held,) = doctor(tmp_path, toml).check_commitment_listener()
    assert f"port {port}" in held.message and "listen_port" in held.hint, held
    config = tmp_path / "lastmile.toml"
    config.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n' + toml)
    forward = subprocess.Popen(
        [sys.executable, "-m", "lastmile", "-c", str(config), "forward"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_for_port(port, 60, forward)
        ours = doctor(tmp_path, toml).check_commitment_listener()
    finally:
        stop_child(forward)
    assert ours[0].level is Level.OK and f"port {port}" in ours[0].message, ours


def test_a_store_error_just_after_a_rejected_report_is_said_not_space(tmp_path: Path) -> None:
    """lastmile/services/serial_devices.py SerialContext.error: a row's error was written at most
    once every ERROR_STATUS_EVERY_S, whatever its kind. A monitor switched off mid-print (its cut
    report rejected), then its next report refused by a locked outbox: the "cannot store" error
    came within the 5 s and was dropped, so the row said the readings wait for space and
    `lastmile doctor` told to free space, which does nothing for a lock. A new kind of error is
    written at once now (the same kind still at most every 5 s: a port spewing garbage)."""
    from lastmile.doctor import Doctor

    with monitor_on_the_acquire_part(tmp_path) as m, outbox_locked(m):
        m.monitor.write(m.report[: m.report.index(b"PULSE")] + m.report)  # cut short, then printed again
        wait_for(lambda: m.device().held_reading_count == 3, timeout=30)
        row = m.device()
        findings = Doctor(m.config).check_devices()
    assert "database is locked" in row.waiting and "space" not in row.waiting, (row.last_error, row.waiting)
    (held,) = [f for f in findings if f.level is Level.FAIL]
    assert "free space" not in held.hint, (held.message, held.hint)


# -- the restart and the spill file: no false loss ---------------------------------------------------


@pytest.mark.parametrize("held", ["on disk", "1 in memory only", "1 in memory only, saved since"])
def test_a_row_written_before_the_spill_file_was_saved_empty_is_no_loss_at_the_restart(
    tmp_path: Path, held: str
) -> None:
    """lastmile/services/serial_devices.py _say_lost_at_stop: the lost count at a restart was the
    row's held count - what the spill file gave back, even when the file came back whole. A row
    written before the file was saved empty (a power cut between the two; a best-effort row write
    that failed) said "3 readings waiting": the real `lastmile acquire` started again and FAILed
    "3 reading(s) ... lost when the gateway stopped" for readings safe in the outbox. A whole spill
    file is the truth of what was on disk: only what the row said was held in memory only is lost -
    and not even that when the file's newest copy was saved after the row was written (its spill
    generation, 0035_device_held_spill_generation): a save that works writes all that waits."""
    from lastmile.clinic.devices import HeldReadings
    from lastmile.services.serial_spill import SpillFile

    monitor = PtyDevice(tmp_path / "usb-monitor")
    config, data = acquire_toml(tmp_path, monitor), tmp_path / "data"
    data.mkdir()
    memory = (1, 0) if held.startswith("1 in memory only") else (0, 0)
    # the spill file's generation the row names: the file allocated, never saved yet (None: a row from before)
    generation = 0 if held.endswith("saved since") else None
    with contextlib.closing(DeviceRegistry.open(data)) as registry:  # the row the last run wrote: 3 held
        registry.update_status(
            "serial:monitor",
            now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5),
            transport="serial",
            held=HeldReadings.MEMORY if any(memory) else HeldReadings.DISK,
            held_counts=(3, 0),
            memory_counts=memory,
            spill_generations=(generation, None),
        )
    SpillFile(data).save({})  # then all stored, the file saved empty - and the row not written after
    manager = Manager(tmp_path / "notify")
    proc = start_acquire(config, manager, watchdog_usec=20_000_000)
    try:
        manager.wait_for("READY=1", timeout=60)
        with contextlib.closing(DeviceRegistry.open(data)) as registry:
            wait_for(lambda: not registry.get("serial:monitor").waits_for_space, timeout=30)
            row = registry.get("serial:monitor")
        found = doctor(
            data,
            f'[[serial.devices]]\nname = "monitor"\nmatch = "{monitor.link_path}"\n'
            'profile = "example-vitals-monitor"\n',
        ).check_devices()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        stop_child(proc)
        manager.sock.close()
    lost = [f.message for f in found if "lost" in f.message]
    if generation is not None:  # saved after the row: all that waited was on disk, then stored
        memory = (0, 0)
    assert row.lost_reading_count == memory[0], (row, out[-3000:])
    assert row.lost_from_disk == (0, 0), row
    if any(memory):  # what the row said memory alone held: lost, said as that
        assert len(lost) == 1 and "1 reading(s) held in memory only" in lost[0], lost
    else:
        assert lost == [], lost


def test_a_reload_feeds_the_watchdog_again_once_the_old_parts_have_stopped(tmp_path: Path) -> None:
    """lastmile/services/acquire.py AcquireService.reload: the runtime pinged the watchdog once as
    the reload began; the old parts' stop may take 24 s of WatchdogSec=30, then the new serial part's
    opening writes clinic.db (each write up to a 15 s lock wait): past the watchdog, SIGABRT, not a
    clean restart. Now the reload feeds it again (`ServiceRuntime.alive`) once the parts stopped.
    The runtime's real notifier and ping rule, its datagrams recorded (WatchdogSec made 2 s)."""
    from lastmile.services.acquire import AcquireService
    from lastmile.services.runtime import ServiceRuntime
    from lastmile.services.sdnotify import SystemdNotifier

    class RecordedNotifier(SystemdNotifier):
        def __init__(self) -> None:
            super().__init__("/run/notify-test", environ={"WATCHDOG_USEC": "2000000"})
            self.sent: list[tuple[float, str]] = []

        def notify(self, *assignments: str) -> bool:
            self.sent.append((time.monotonic(), "\n".join(assignments)))
            return True

    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.gps.source = "none"  # the reload builds no part: only the old one's stop
    notifier = RecordedNotifier()
    runtime = ServiceRuntime(
        "acquire", load_config=lambda: config, notifier=notifier, install_signal_handlers=False, configure_logging=False
    )
    with contextlib.closing(Outbox.open(config.data_dir, min_free_bytes=0)) as outbox:
        service = AcquireService(
            config, outbox, [slow_writer(outbox, "serial", 1.5)], [outbox.close], alive=runtime.alive
        )
        service.check_parts()
        notifier.watchdog_ping()  # as the runtime's reload does before `service.reload`
        began = time.monotonic()
        service.reload(config)
        stopped = began + 1.5
        service.close()
    pings = [at for at, what in notifier.sent if what == "WATCHDOG=1"]
    assert any(at >= stopped for at in pings), (began, pings)
