"""A device taken away (out of `[[serial.devices]]`, a bridge's `forward_profile` dropped, a BLE
device unpaired) keeps its row in clinic.db, its readings keep naming it; but it is no current
device: `lastmile devices`, the console and `lastmile doctor` must not go on showing its last
error as a fault (found 2026-12-06: a WARN that never cleared, "tell the county IT", for a
monitor no longer there)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import signal
import threading
from pathlib import Path

import pytest

from lastmile.cli import main
from lastmile.clinic.devices import DeviceRegistry, HeldReadings
from lastmile.console.sources import ClinicData
from lastmile.console.views import devices as devices_page
from lastmile.console.views import today
from lastmile.doctor import Level
from tests.console_harness import DOCTOR, Client, add_users, console_config, running_console
from tests.serial_gateway import (
    Running,
    serial_config,
    serial_part_whose_stop_gives_up_waits,
    ward_profile_with_bad_baudrate,
)
from tests.serial_pty import PtyDevice
from tests.service_harness import VITALS_REPORT, Manager, doctor, start_acquire, status_with, stop_child
from tests.waiting import wait_for

UTC = dt.timezone.utc


def device_entry(name: str, match: str, profile: str) -> str:
    return f'[[serial.devices]]\nname = "{name}"\nmatch = "{match}"\nprofile = "{profile}"\n\n'


def warnings(data: Path, serial_toml: str) -> list[str]:
    """`lastmile doctor`'s devices findings above OK, on the configuration's serial part."""
    found = doctor(data, serial_toml).check_devices()
    return [f.message for f in found if f.level is not Level.OK]


def run_acquire_until_ready(config: Path, tmp_path: Path, *words: str) -> None:
    """`lastmile acquire` on `config` until READY and a STATUS holding `words`, then a clean stop."""
    manager = Manager(tmp_path / f"notify-{len(list(tmp_path.glob('notify-*')))}")
    proc = start_acquire(config, manager, watchdog_usec=20_000_000)
    try:
        manager.wait_for("READY=1", timeout=60)
        status_with(manager, *words)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        stop_child(proc)
        manager.sock.close()


def test_a_serial_device_taken_out_of_the_config_is_no_current_fault(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ward monitor, its profile mistyped, was refused; the technician then took it out of the
    configuration (the monitor went back to the ward). The acquire service starts without it,
    yet `lastmile doctor` warned of it and `lastmile devices` listed its error as current."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    ward_profile_with_bad_baudrate(profiles)
    monitor, ward = PtyDevice(tmp_path / "usb-monitor"), PtyDevice(tmp_path / "usb-ward")
    data = tmp_path / "data"
    head = f'[gateway]\ndata_dir = "{data}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n'
    kept = f'[serial]\nprofiles_dir = "{profiles}"\n\n' + device_entry(
        "monitor", str(monitor.link_path), "example-vitals-monitor"
    )
    both = kept + device_entry("ward", str(ward.link_path), "ward-monitor")
    config = tmp_path / "lastmile.toml"
    try:
        config.write_text(head + both)
        run_acquire_until_ready(config, tmp_path, "serial up, 1 device refused")
        assert any("ward-monitor.toml" in w for w in warnings(data, both))  # a real fault while configured
        config.write_text(head + kept)
        run_acquire_until_ready(config, tmp_path, "serial up")
    finally:
        monitor.unplug()
        ward.unplug()
    assert warnings(data, kept) == []
    assert main(["-c", str(config), "devices", "--json"]) == 0
    rows = {r["address"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["SERIAL:WARD"]["removed"] is True and rows["SERIAL:MONITOR"]["removed"] is False, rows
    assert "ward-monitor.toml" in rows["SERIAL:WARD"]["last_error"]  # its history is kept
    assert main(["-c", str(config), "devices"]) == 0
    out = capsys.readouterr().out
    assert "ward-monitor.toml" not in out, out
    ward_line = next(line for line in out.splitlines() if "SERIAL:WARD" in line)
    assert "removed" in ward_line, out


def test_a_forwarded_device_whose_forward_profile_is_taken_out_is_no_current_fault(tmp_path: Path) -> None:
    """The bridge's RS-232 monitor, its profile mistyped, was refused under `ecg:forwarded`; the
    technician then dropped `forward_profile` (the monitor is no longer on that bridge). The
    bridge runs on, but the forwarded row kept its refusal and the doctor warned for ever."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    ward_profile_with_bad_baudrate(profiles)
    bridge = {"name": "ecg", "match": "2e8a:000a", "profile": "bridge"}
    forwarding = {**bridge, "forward_profile": "ward-monitor"}
    refused = Running(tmp_path, [forwarding], profiles_dir=str(profiles))
    refused.close()
    plain = Running(tmp_path, [bridge], profiles_dir=str(profiles))
    plain.close()
    serial_toml = device_entry("ecg", "2e8a:000a", "bridge")
    assert warnings(tmp_path / "data", serial_toml) == []
    registry = DeviceRegistry.open(tmp_path / "data")
    try:
        records = {r.address: r for r in registry.all(plain.config)}
    finally:
        registry.close()
    assert records["SERIAL:ECG:FORWARDED"].removed, records
    with_forward = serial_toml.rstrip() + '\nforward_profile = "ward-monitor"\n'
    assert warnings(tmp_path / "data", f'[serial]\nprofiles_dir = "{profiles}"\n\n' + with_forward)


def test_an_unpaired_ble_device_is_no_current_fault_but_keeps_its_history(tmp_path: Path) -> None:
    """A cuff that failed (a malformed value) and was then removed on the Devices page: the
    doctor warned of it still, and the Today panel listed it among the clinic's devices."""
    data = tmp_path / "data"
    now = dt.datetime.now(UTC)
    registry = DeviceRegistry.open(data)
    try:
        registry.allow("C0:FF:EE:00:00:01", now=now, name="old cuff")
        registry.update_status("C0:FF:EE:00:00:01", now=now, reading="120/80 mm[Hg]", seen=True)
        registry.update_status("C0:FF:EE:00:00:01", now=now, error="malformed 2A35 value: too short")
        assert warnings(data, "")  # paired: a real fault
        registry.disallow("C0:FF:EE:00:00:01", now=now)
    finally:
        registry.close()
    assert warnings(data, "") == []
    clinic = ClinicData(console_config(data))
    try:
        assert today(clinic, now)["devices"] == []
        (cuff,) = devices_page(clinic, now)["devices"]
        assert cuff.removed and cuff.last_reading == "120/80 mm[Hg]"
    finally:
        clinic.close()


def test_the_devices_page_shows_a_removed_device_as_history_not_as_a_problem(tmp_path: Path) -> None:
    """The Devices page's "last problem" (in warning colours) for a serial monitor no longer in
    the configuration: the doctor read it as a fault of today, with no word that it is gone."""
    config = console_config(tmp_path / "data")
    now = dt.datetime.now(UTC)
    registry = DeviceRegistry.open(config.data_dir)
    try:
        registry.update_status("serial:ward", now=now, transport="serial", connected=False, error="not started")
    finally:
        registry.close()
    with running_console(config) as server:
        client = Client(server.url, language="en")
        client.login(DOCTOR)
        page = client.get("/devices").body
    ward = page.split('data-address="SERIAL:WARD"', 1)[1].split("</li>", 1)[0]
    assert "not started" not in ward and 'class="warn"' not in ward, ward
    assert "removed" in ward.lower(), ward


def test_a_device_refused_before_is_not_said_refused_once_its_profile_is_fixed(tmp_path: Path) -> None:
    """The ward monitor was not started (its profile mistyped); the technician fixed the file and
    the acquire service started it, but the monitor is on its trolley in the ward, unplugged: its
    entry kept "not started: its profile is refused" and the doctor warned of a fixed file until
    the monitor was next plugged in (the bridge's forwarded device had this cleared; not this)."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    ward_profile_with_bad_baudrate(profiles)
    ward = {"name": "ward", "match": "0403:6001:WARD01", "profile": "ward-monitor"}
    serial_toml = f'[serial]\nprofiles_dir = "{profiles}"\n\n' + device_entry(**ward)
    Running(tmp_path, [ward], profiles_dir=str(profiles)).close()
    assert any("ward-monitor.toml" in w for w in warnings(tmp_path / "data", serial_toml))
    fixed = (profiles / "ward-monitor.toml").read_text().replace("baudrate = 0", "baudrate = 9600")
    (profiles / "ward-monitor.toml").write_text(fixed)
    running = Running(tmp_path, [ward], profiles_dir=str(profiles))
    try:
        assert running.service.refused == {}
        assert warnings(tmp_path / "data", serial_toml) == []
    finally:
        running.close()


def test_a_refusal_worded_otherwise_is_not_said_once_its_profile_is_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lastmile/services/serial_devices.py clear_refusals_fixed_since: a refusal was known by its
    opening words ("not started: "), so one written in other words (a version that reworded or
    translated them) was kept once the profile was fixed: the doctor warned of a fixed file until
    the monitor was next plugged in. Now by its recorded kind, whatever its words."""
    import lastmile.services.serial_devices as serial_devices

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    ward_profile_with_bad_baudrate(profiles)
    ward = {"name": "ward", "match": "0403:6001:WARD01", "profile": "ward-monitor"}
    serial_toml = f'[serial]\nprofiles_dir = "{profiles}"\n\n' + device_entry(**ward)
    with monkeypatch.context() as reworded:
        reworded.setattr(serial_devices, "NOT_STARTED", "未启动：")
        Running(tmp_path, [ward], profiles_dir=str(profiles)).close()
    assert any("未启动：" in w for w in warnings(tmp_path / "data", serial_toml))
    fixed = (profiles / "ward-monitor.toml").read_text().replace("baudrate = 0", "baudrate = 9600")
    (profiles / "ward-monitor.toml").write_text(fixed)
    Running(tmp_path, [ward], profiles_dir=str(profiles)).close()
    assert warnings(tmp_path / "data", serial_toml) == []


def test_a_bridge_whose_forwarded_lines_are_not_read_still_says_so_after_a_restart(tmp_path: Path) -> None:
    """A bridge forwards a device's lines but has no forward_profile: its own row says they are
    not read (kept on the bridge). A restart is no fix for that: the row keeps it, whereas a
    refusal fixed since (a profile file corrected) is cleared at start."""
    from devices.device_errors import FORWARD_NOT_READ, DeviceProblem

    bridge = {"name": "ecg", "match": "2e8a:000a", "profile": "bridge"}
    registry = DeviceRegistry.open(tmp_path / "data")
    try:
        registry.update_status(
            "serial:ecg",
            now=dt.datetime.now(dt.timezone.utc),
            transport="serial",
            error=f"{FORWARD_NOT_READ} set forward_profile for this bridge",
            problem=DeviceProblem.FORWARD_NOT_READ,
        )
    finally:
        registry.close()
    Running(tmp_path, [bridge]).close()
    registry = DeviceRegistry.open(tmp_path / "data")
    try:
        row = registry.get("serial:ecg")
    finally:
        registry.close()
    assert row is not None and row.last_error.startswith(FORWARD_NOT_READ), row
    assert row.problem is DeviceProblem.FORWARD_NOT_READ, row


def test_the_console_judges_the_devices_by_the_configuration_it_reloaded(tmp_path: Path) -> None:
    """The technician took the ward monitor out of the configuration and reloaded the services
    (`systemctl reload`): the acquire service rebuilt its links without it, but the console kept
    the serial list it started with, so its Devices page went on listing the monitor under the
    configuration, its refusal a problem of today, until the console was restarted."""
    from lastmile.console.service import ConsoleService

    config = console_config(tmp_path / "data")
    config.serial.devices = [{"name": "ward", "match": "0403:6001:WARD01", "profile": "ward-monitor"}]
    registry = DeviceRegistry.open(config.data_dir)
    try:
        registry.update_status(
            "serial:ward", now=dt.datetime.now(UTC), transport="serial", connected=False, error="not started"
        )
    finally:
        registry.close()
    add_users(config)
    service = ConsoleService.start(config)
    try:
        reloaded = console_config(tmp_path / "data", port=int(config.console.listen.rsplit(":", 1)[1]))
        service.reload(reloaded)  # no serial device any more
        client = Client(service.server.url, language="en")
        client.login(DOCTOR)
        page = client.get("/devices").body
    finally:
        service.close()
    ward = page.split('data-address="SERIAL:WARD"', 1)[1].split("</li>", 1)[0]
    assert "not started" not in ward and "removed" in ward.lower(), ward
    assert 'id="h-serial"' not in page, page  # the configuration's list: none left


def test_a_monitor_that_reports_well_after_a_rejected_report_is_no_current_fault(tmp_path: Path) -> None:
    """A report cut short (the monitor switched off mid-print), then good reports all day from a
    monitor whose clock is behind: each reading was stamped with the monitor's time, older than
    the rejection, so the doctor took the monitor for not seen since its error and warned "report
    rejected" all day, whereas a monitor with a right clock cleared it at its next report."""
    monitor = PtyDevice(tmp_path / "usb-monitor")
    entry = {"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"}
    running = Running(tmp_path, [entry])
    try:
        wait_for(lambda: (d := running.registry.get("serial:monitor")) is not None and d.connected, timeout=60)
        cut = VITALS_REPORT[: VITALS_REPORT.index(b"PULSE")]
        monitor.write(cut + VITALS_REPORT)  # printed by a clock that says 2025-03-04
        record = wait_for(
            lambda: (d := running.registry.get("serial:monitor")) is not None and d.last_reading and d, timeout=60
        )
        assert record is not None and "report rejected" in record.last_error, record
        assert warnings(tmp_path / "data", "[serial]\n\n" + device_entry(**entry)) == []
    finally:
        running.close()
        monitor.unplug()


def test_a_cuff_that_sends_good_records_after_a_malformed_one_is_no_current_fault(tmp_path: Path) -> None:
    """The same through the BLE link's port: a cuff found (seen), one malformed record, then the
    good ones of its memory, measured hours before: the doctor warned of the malformed value
    until the cuff was next found, however many good readings it had sent since."""
    from firmware_bridge.ble.link import DeviceStatus
    from lastmile.clinic.observations import ObservationStore
    from lastmile.services.ble_devices import ClinicBlePort
    from tests.console_harness import bp_reading
    from uploader.outbox import Outbox

    data = tmp_path / "data"
    now = dt.datetime.now(UTC)
    with Outbox.open(data, min_free_bytes=0) as outbox:
        store = ObservationStore.open(data, outbox=outbox, idle_timeout_s=900)
        try:
            ticks = (now + dt.timedelta(seconds=i) for i in itertools.count())  # each event a second on
            port = ClinicBlePort(store, DeviceRegistry(store.db), clock=lambda: next(ticks))
            port.registry.allow("AA:BB:CC:DD:EE:01", now=now - dt.timedelta(minutes=1), name="cuff")
            port.report(DeviceStatus("AA:BB:CC:DD:EE:01", seen=True))
            port.report(DeviceStatus("AA:BB:CC:DD:EE:01", connected=True, error="malformed 2A35 value: too short"))
            assert port.store(bp_reading(now - dt.timedelta(hours=3), "cuff-record-7"))
        finally:
            store.close()
    assert warnings(data, "") == []


def test_a_console_reload_says_which_changed_settings_need_a_restart(tmp_path: Path) -> None:
    """The technician added a USB import folder and changed the BLE scan, then reloaded: the
    console took the serial devices only and went on showing the old BLE and USB settings, and
    nothing said a restart was needed. Now the reload names them (journal, systemd STATUS)."""
    from lastmile.console.service import ConsoleService

    config = console_config(tmp_path / "data")
    add_users(config)
    service = ConsoleService.start(config)
    try:
        reloaded = console_config(tmp_path / "data", port=int(config.console.listen.rsplit(":", 1)[1]))
        reloaded.usb_import.folders = [str(tmp_path / "stick")]
        reloaded.ble.scan_interval_s = 30.0
        reloaded.console.language = "en"
        service.reload(reloaded)
        status = service.status_line()
    finally:
        service.close()
    assert "restart needed for ble, usb_import" in status, status


def test_the_doctor_and_the_system_page_say_in_chinese_which_reloaded_settings_wait_for_a_restart(
    tmp_path: Path,
) -> None:
    """The journal and STATUS= said 'restart needed', in English, where no village doctor looks:
    `lastmile doctor` and the System page said nothing. Now both name the settings and how to
    restart, in zh-CN; what is compared is the running configuration, so a change reverted in
    the file before the restart clears it, and a restart clears it all."""
    import html

    from lastmile.console.service import ConsoleService
    from lastmile.doctor import Doctor

    def restart_findings() -> list[str]:
        return [f.message for f in Doctor(config, offline=True).check_console() if f.topic == "restart-needed"]

    def system_page() -> str:
        client = Client(service.server.url)
        client.login(DOCTOR)
        return html.unescape(client.get("/system").body)

    config = console_config(tmp_path / "data")
    add_users(config)
    port = int(config.console.listen.rsplit(":", 1)[1])
    service = ConsoleService.start(config)
    try:
        changed = console_config(tmp_path / "data", port=port)
        changed.usb_import.folders = [str(tmp_path / "stick")]
        changed.ble.scan_interval_s = 30.0
        service.reload(changed)
        assert restart_findings() == ["changed settings not in use until the console restarts: ble, usb_import"]
        page = system_page()
        assert "等待重启才生效的设置：ble, usb_import" in page, page
        assert "systemctl restart lastmile-console" in page
        changed.usb_import.folders = []  # the stick folder taken out again before any restart
        service.reload(changed)
        assert restart_findings() == ["changed settings not in use until the console restarts: ble"]
        service.reload(console_config(tmp_path / "data", port=port))  # all back as it runs
        assert restart_findings() == []
        assert "等待重启" not in system_page()
        service.reload(changed)
    finally:
        service.close()
    service = ConsoleService.start(changed)  # the restart takes them
    try:
        assert restart_findings() == []
    finally:
        service.close()


def test_an_unreadable_restart_note_is_not_shown_as_a_setting_name(tmp_path: Path) -> None:
    """A torn console-restart-needed.json came back as the English 'unreadable ...: Expecting value'
    in the place of a setting name (the System page's subject, among zh-CN). Now it counts as no
    setting waiting (the next console start rewrites it) and the journal says why."""
    from lastmile.console.pending_restart import RESTART_NEEDED_FILE, restart_needed

    (tmp_path / RESTART_NEEDED_FILE).write_text('["ble", "usb', encoding="utf-8")
    assert restart_needed(tmp_path) == []


def test_lastmile_devices_shows_what_waits_for_space_beside_a_later_unplug_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A serial monitor's 3 readings waited for space (its row said so), then it was unplugged:
    `lastmile devices` printed only the last error, "device gone", and the waiting readings were
    no longer said. Now it prints both; before the unplug, the waiting words once."""
    from lastmile.clinic.devices import HeldReadings

    data = tmp_path / "data"
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{data}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n[serial]\n\n'
        + device_entry("monitor", str(tmp_path / "usb-monitor"), "example-vitals-monitor")
    )
    now = dt.datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
    registry = DeviceRegistry.open(data)
    try:  # as the serial service says it: its held status, not its error
        registry.update_status(
            "serial:monitor", now=now, transport="serial", held=HeldReadings.DISK, held_counts=(3, 0)
        )
        assert main(["-c", str(config), "devices"]) == 0
        before = capsys.readouterr().out
        registry.update_status(
            "serial:monitor",
            now=now + dt.timedelta(minutes=1),
            transport="serial",
            connected=False,
            error="device gone",
        )
    finally:
        registry.close()
    assert before.count("3 reading(s) waiting for space") == 1, before
    assert main(["-c", str(config), "devices"]) == 0
    out = capsys.readouterr().out
    assert "3 reading(s) waiting for space on the data partition (kept on disk)" in out, out
    assert "device gone" in out, out


def test_a_row_an_older_version_wrote_its_waiting_words_as_the_error_says_them_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An older version wrote what waits for space as the row's error too: now that the row's held
    status alone says it, such a row (migrated) would print the sentence twice, as waiting and as
    its last error. The migration clears those words; a row's other error is kept."""
    from lastmile.clinic.db import DB_NAME, MIGRATIONS
    from uploader.sqlite_store import open_database

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{data}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n[serial]\n\n'
        + device_entry("monitor", str(tmp_path / "usb-monitor"), "example-vitals-monitor")
        + device_entry("ward", str(tmp_path / "usb-ward"), "example-vitals-monitor")
    )
    waiting = "3 reading(s) waiting for space on the data partition (kept on disk)"  # as the older version wrote it
    db = open_database(data / DB_NAME, tuple(m for m in MIGRATIONS if m.name < "0020_device_held_at"))
    for address, error in (("SERIAL:MONITOR", waiting), ("SERIAL:WARD", "device gone")):
        db.conn.execute(
            "INSERT INTO devices (address, transport, updated_at, last_error, last_error_at, held_readings, "
            "held_reading_count) VALUES (?, 'serial', ?, ?, ?, 'disk', 3)",
            (address, "2026-12-06T08:00:00+00:00", error, "2026-12-06T08:00:00+00:00"),
        )
    db.conn.close()
    assert main(["-c", str(config), "devices"]) == 0
    out = capsys.readouterr().out
    assert out.count("3 reading(s) waiting for space") == 2, out  # once for each device
    assert out.count("last error") == 1 and "device gone" in out, out


def test_lastmile_devices_names_a_ble_device_by_the_name_given_at_pairing_and_says_what_it_advertises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two cuffs of one model, paired as "血压计 1号诊室" and "血压计 2号诊室": once each had
    connected, `lastmile devices` printed only their manufacturer, model and serial number, and
    the technician could not tell which room's cuff was which. Now the name given at pairing comes
    first, and what the cuff advertises is said beside it."""
    from devices.identity import DeviceIdentity

    data = tmp_path / "data"
    config = tmp_path / "lastmile.toml"
    config.write_text(f'[gateway]\ndata_dir = "{data}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n')
    now = dt.datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
    registry = DeviceRegistry.open(data)
    try:  # as the console's pairing and the BLE link write the row
        registry.allow("C0:00:00:00:00:01", name="血压计 1号诊室", now=now)
        identity = DeviceIdentity(address="C0:00:00:00:00:01", manufacturer="Acme", model="BP-1", serial="S1")
        registry.update_status(
            "C0:00:00:00:00:01", now=now, seen=True, advertised_name="BP cuff", identity=identity, connected=False
        )
    finally:
        registry.close()
    assert main(["-c", str(config), "devices"]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("ble")]
    assert "血压计 1号诊室  Acme BP-1 S1" in line, out
    assert "advertised as BP cuff" in out, out


def hold_three_one_in_memory_only(registry: DeviceRegistry, now: dt.datetime, *, ecgs: bool = False) -> None:
    """The monitor's row as the serial part writes it at a stop: 3 readings held, 1 of them in
    memory only (with `ecgs`, 3 streamed ECGs and 1)."""
    registry.update_status(
        "serial:monitor",
        now=now,
        transport="serial",
        held=HeldReadings.MEMORY,
        held_counts=(0, 3) if ecgs else (3, 0),
        memory_counts=(0, 1) if ecgs else (1, 0),
    )


def pages_with_the_monitor(tmp_path: Path, data: Path, *pages: str) -> dict[str, str]:
    """The console's `pages` (zh-CN) as the doctor sees them, its configuration naming the monitor
    on `tmp_path`/usb-monitor; each page's body by its path."""
    shown = dataclasses.replace(
        console_config(data),
        serial=serial_config(
            tmp_path, [{"name": "monitor", "match": str(tmp_path / "usb-monitor"), "profile": "example-vitals-monitor"}]
        ).serial,
    )
    with running_console(shown) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        return {page: client.get(page).body for page in pages}


def test_a_loss_from_a_damaged_spill_file_is_said_as_that_on_every_page_and_in_lastmile_devices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a stop kept on the SD card and a damaged spill file did not give back was said "held in
    memory only" - as if a power cut had taken it from memory. Now the row keeps the loss by where
    (0034_device_lost_on_disk): the Devices page says it was saved on the SD card and could not be
    read back, Today says a device lost readings, `lastmile devices` and the doctor name the file
    and its .bad copy; what was held in memory only is still said as that, beside it."""
    data = tmp_path / "data"
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{data}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n[serial]\n\n'
        + device_entry("monitor", str(tmp_path / "usb-monitor"), "example-vitals-monitor")
    )
    now = dt.datetime.now(UTC)
    damage = f"{data}/serial-spill.dat (garbage; set aside as {data}/serial-spill.dat.20261207T090000Z.bad)"
    registry = DeviceRegistry.open(data)
    try:  # 3 held, 1 of them in memory only; the restart found the file damaged: all 3 lost, 2 of them on disk
        registry.update_status(
            "serial:monitor", now=now, transport="serial", reading="SpO2 97 %", reading_at=now, seen=True
        )
        hold_three_one_in_memory_only(registry, now)
        row = registry.get("serial:monitor")
        registry.record_lost(row, (3, 0), now=now, on_disk=(2, 0), damage=damage)
        assert main(["-c", str(config), "devices"]) == 0
    finally:
        registry.close()
    listed = capsys.readouterr().out
    assert "1 reading(s) held in memory only" in listed, listed
    assert f"2 reading(s) kept on disk, not read back from {damage}" in listed, listed
    found = doctor(data, device_entry("monitor", str(tmp_path / "usb-monitor"), "example-vitals-monitor"))
    lost = [f for f in found.check_devices() if f.level is Level.FAIL and "lost when" in f.message]
    assert len(lost) == 2 and "1 reading(s) held in memory only" in lost[0].message, lost
    assert "2 reading(s) kept on disk could not be read back" in lost[1].message and damage in lost[1].message, lost
    pages = pages_with_the_monitor(tmp_path, data, "/devices", "/today", "/system")
    assert "网关停机时丢失：1 条测量结果（当时仅在内存中）" in pages["/devices"], pages["/devices"]
    assert "保存在SD卡上的 2 条测量结果无法读回（文件损坏或丢失）：已丢失" in pages["/devices"], pages["/devices"]
    assert "网关停机时丢失了测量数据：请看“设备”页" in pages["/today"], pages["/today"]
    assert "保存在SD卡上的测量数据在网关重新启动时无法读回" in pages["/system"], pages["/system"]


def test_the_words_of_losses_name_readings_and_ecgs_one_card_and_keep_each_bad_copy_s_path_whole(
    tmp_path: Path,
) -> None:
    """Words of what a stop lost or kept: Today named only the ECGs when readings were lost too;
    the Devices page said the spill file's readings were "saved on the disk" (磁盘) and, lost from
    the same file, "on the SD card" (SD卡); a missing file was said "damaged"; a second loss's
    damage, added to the first's, was cut at 402 characters - through its .bad copy's path, the
    one thing the county IT needs. Now: readings and ECGs both named, one word (SD卡), "damaged or
    missing", and each path whole (an older loss's words left out, never cut)."""
    data = tmp_path / "data" / ("a-long-data-directory-name-" * 4)
    now = dt.datetime.now(UTC)
    first = f"{data}/serial-spill.dat (garbage; set aside as {data}/serial-spill.dat.20261207T090000Z.bad)"
    second = (
        f"{data}/serial-ecg-spill.dat (no copy in it; set aside as {data}/serial-ecg-spill.dat.20261207T100000Z.bad)"
    )
    registry = DeviceRegistry.open(data)
    try:  # readings and ECGs lost at two stops; now 3 held, 1 of them in memory only
        registry.update_status(
            "serial:monitor", now=now, transport="serial", reading="SpO2 97 %", reading_at=now, seen=True
        )
        registry.record_lost(registry.get("serial:monitor"), (2, 0), now=now, on_disk=(2, 0), damage=first)
        registry.record_lost(registry.get("serial:monitor"), (0, 1), now=now, on_disk=(0, 1), damage=second)
        hold_three_one_in_memory_only(registry, now)
        row = registry.get("serial:monitor")
    finally:
        registry.close()
    assert second in row.lost_damage, row.lost_damage  # the newest .bad path whole
    assert (row.lost_reading_count, row.lost_ecg_count) == (2, 1), row
    pages = pages_with_the_monitor(tmp_path, data, "/devices", "/today")
    assert "网关停机时丢失了测量数据和心电图：请看“设备”页" in pages["/today"], pages["/today"]
    assert "磁盘" not in pages["/devices"] and "其余已保存在SD卡上" in pages["/devices"], pages["/devices"]
    assert "（文件损坏或丢失）" in pages["/devices"], pages["/devices"]


def test_readings_held_at_a_stop_and_lost_say_how_many_from_which_device_and_to_measure_again(
    tmp_path: Path,
) -> None:
    """Readings held only because the gateway was stopping (HELD_AT_STOP), in memory only, were
    lost with the stop: the System page and `lastmile doctor` said the data store could not be
    written and to call the county IT - for a known stop, where nothing is broken and nobody can
    bring them back. Now they say how many, from which device, when it was found, and to measure
    again; the Devices page says so too."""
    from lastmile.clinic.devices import HELD_AT_STOP

    data = tmp_path / "data"
    monitor = device_entry("monitor", str(tmp_path / "usb-monitor"), "example-vitals-monitor")
    now = dt.datetime.now(UTC)
    registry = DeviceRegistry.open(data)
    try:  # 3 held at the stop, 1 of them in memory only: the restart found that one gone
        registry.update_status(
            "serial:monitor",
            now=now,
            transport="serial",
            name="monitor",
            reading="SpO2 97 %",
            reading_at=now,
            seen=True,
        )
        hold_three_one_in_memory_only(registry, now)
        registry.record_lost(registry.get("serial:monitor"), (1, 0), now=now, cause=HELD_AT_STOP)
    finally:
        registry.close()
    (lost,) = [f for f in doctor(data, monitor).check_devices() if f.level is Level.FAIL and "lost when" in f.message]
    assert lost.message.startswith(
        "monitor: 1 reading(s) held in memory only (not stored yet when the gateway stopped)"
    )
    assert "county IT" not in lost.hint and "record them again" in lost.hint, lost
    assert (lost.advice_key, lost.subject, lost.counts) == ("lost-at-stop", "monitor", (1, 0)), lost
    pages = pages_with_the_monitor(tmp_path, data, "/devices", "/system")
    system = pages["/system"]
    assert "已丢失：monitor 的 1 条测量结果。它们是网关停机前刚测的" in system, system
    assert "如病人仍在，请重新测量。" in system and "县信息科" not in system.split("已丢失：monitor")[1][:200], system
    assert "网关停机时丢失：停机前刚测的 1 条测量结果，尚未保存" in pages["/devices"], pages["/devices"]
    assert "设备和网关都没有坏。如病人仍在，请重新测量。" in pages["/devices"], pages["/devices"]


@pytest.mark.parametrize("space_first", [True, False], ids=["space-then-stop", "stop-then-space"])
def test_a_loss_for_want_of_space_said_with_a_stop_s_loss_keeps_the_space_advice(
    tmp_path: Path, space_first: bool
) -> None:
    """5 readings waiting for space in memory only, lost with a power cut, then (within the week
    said) 1 held at a stop in memory only and lost with it - or the other way round: the merged
    loss took the stop's cause, so the System page said all 6 were "taken just before the stop,
    nothing is broken", the Devices page the same, and `lastmile doctor` "nothing to repair": the
    advice for the space (keep the gateway powered while readings wait for it) was gone. Now the
    space's cause is kept: its words and advice, with the count of both."""
    from lastmile.clinic.devices import HELD_AT_STOP

    data = tmp_path / "data"
    monitor = device_entry("monitor", str(tmp_path / "usb-monitor"), "example-vitals-monitor")
    now = dt.datetime.now(UTC)
    losses = [((5, 0), ""), ((1, 0), HELD_AT_STOP)]  # cause "": waiting for space
    registry = DeviceRegistry.open(data)
    try:
        registry.update_status("serial:monitor", now=now, transport="serial", name="monitor", seen=True)
        for when, (counts, cause) in zip((now - dt.timedelta(days=2), now), losses if space_first else losses[::-1]):
            hold_three_one_in_memory_only(registry, when)
            registry.record_lost(registry.get("serial:monitor"), counts, now=when, cause=cause)
        row = registry.get("serial:monitor")
    finally:
        registry.close()
    assert (row.lost_cause, row.lost_from_memory, row.lost_at_stop) == ("", (6, 0), False), row
    (lost,) = [f for f in doctor(data, monitor).check_devices() if f.level is Level.FAIL and "lost when" in f.message]
    assert lost.message.startswith("monitor: 6 reading(s) held in memory only (waiting for space)"), lost
    assert "keep the gateway powered while readings wait for space" in lost.hint, lost
    assert lost.advice_key == "lost-readings", lost
    if not space_first:
        return  # the pages read the same row: once is enough
    pages = pages_with_the_monitor(tmp_path, data, "/devices", "/system")
    assert "有测量数据因在等待存储空间、尚未保存而丢失" in pages["/system"], pages["/system"]
    assert "停机前刚测" not in pages["/system"] and "停机前刚测" not in pages["/devices"], pages
    assert "网关停机时丢失：6 条测量结果（当时仅在内存中）" in pages["/devices"], pages["/devices"]


def test_ecgs_held_at_a_stop_and_lost_say_to_record_the_ecg_again(tmp_path: Path) -> None:
    """Streamed ECGs held at a stop in memory only and lost with it were told "Measure again"
    (请重新测量) on the System and Devices pages, beside the catalog's words for ECGs held at a stop
    ("Record the ECG again", 请重新做心电图). Now ECGs get those."""
    from lastmile.clinic.devices import HELD_AT_STOP

    data = tmp_path / "data"
    monitor = device_entry("monitor", str(tmp_path / "usb-monitor"), "example-vitals-monitor")
    now = dt.datetime.now(UTC)
    registry = DeviceRegistry.open(data)
    try:  # 3 ECGs held at the stop, 1 of them in memory only: the restart found that one gone
        registry.update_status("serial:monitor", now=now, transport="serial", name="monitor", seen=True)
        hold_three_one_in_memory_only(registry, now, ecgs=True)
        registry.record_lost(registry.get("serial:monitor"), (0, 1), now=now, cause=HELD_AT_STOP)
    finally:
        registry.close()
    (lost,) = [f for f in doctor(data, monitor).check_devices() if f.level is Level.FAIL and "lost when" in f.message]
    assert (lost.advice_key, lost.subject, lost.counts) == ("lost-ecgs-at-stop", "monitor", (0, 1)), lost
    pages = pages_with_the_monitor(tmp_path, data, "/devices", "/system")
    system = pages["/system"].split("已丢失：monitor")[1][:300]
    assert "如病人仍在，请重新做心电图。" in system and "请重新测量" not in system, pages["/system"]
    devices = pages["/devices"].split("网关停机时丢失：")[1][:300]
    assert "设备和网关都没有坏。如病人仍在，请重新做心电图。" in devices and "请重新测量" not in devices, devices


def test_readings_a_stop_held_in_memory_only_are_said_lost_from_its_last_try_to_the_next_start(
    tmp_path: Path,
) -> None:
    """The row says "held in memory only at the stop" from the stop's last try to store them (the
    outbox locked by another process): nothing stores them after it, the process that held them
    ends; the next start counts them lost. Between the two (the acquire service stopped, or the
    console up before it after a reboot) the System page said they "may be lost" (可能已丢失) and
    the Devices page "saved when it starts again" (下次启动时保存): they never are. Now both say
    lost (已丢失) and what to do: measure again - before and after the start alike."""
    from lastmile.services.serial_devices import SerialService
    from tests.fhir_samples import blood_pressure
    from tests.service_harness import write_locked
    from uploader.outbox import Outbox

    config = serial_config(
        tmp_path, [{"name": "monitor", "match": str(tmp_path / "unplugged"), "profile": "example-vitals-monitor"}]
    )
    data = Path(config.data_dir)
    at = dt.datetime.now(UTC) - dt.timedelta(minutes=10)
    stop = threading.Event()
    with contextlib.closing(Outbox.open(data, min_free_bytes=0)) as outbox:  # room: only the lock refuses
        service, ctx, spec = serial_part_whose_stop_gives_up_waits(config, outbox, stop)
        reading = blood_pressure(at, "P-1", "bp-1")
        stop.set()  # the acquire service is stopping as the monitor's report comes
        with write_locked(data / "outbox.sqlite"):
            assert not ctx.store_observation(spec, reading, held=True)  # as the monitor's handler does
            ctx.hold_observation(spec, reading)
            service.close()  # its last try given up too: the process would end here
        with contextlib.closing(DeviceRegistry.open(data)) as registry:
            row = registry.get("serial:monitor")
        assert row is not None and row.held_at_stop and row.in_memory_only == (1, 0), row
        stopped = pages_with_the_monitor(tmp_path, data, "/devices", "/system")
        again = SerialService.open(config, outbox=outbox, watch_dirs=None, rescan_s=0.1)
        again.close()
        assert not outbox.items(kind="observation")  # never stored: lost, as said
    system = stopped["/system"]
    assert "网关停机时测量结果尚未保存，也没有保存在SD卡上：已丢失。" in system, system
    assert "可能已丢失" not in system and "如病人仍在，请重新测量。" in system, system
    devices = stopped["/devices"]
    assert "网关停机时丢失：停机前刚测的 1 条测量结果，尚未保存" in devices, devices
    assert "下次启动时保存" not in devices and "设备和网关都没有坏。如病人仍在，请重新测量。" in devices, devices
    started = pages_with_the_monitor(tmp_path, data, "/system")["/system"]
    assert "已丢失：" in started and "的 1 条测量结果。它们是网关停机前刚测的" in started, started


def test_readings_and_ecgs_lost_together_are_told_to_measure_again_and_record_the_ecg_again(tmp_path: Path) -> None:
    """A monitor that lost readings and ECGs at one stop was told only "record the ECG again"
    (请重新做心电图): the System page's advice and the Devices page chose the ECGs' words whenever
    an ECG was among them, so the readings were not measured again. The same for a loss for want
    of space, for another cause, from a damaged file, and for what a stop holds in memory only.
    Now the words name both."""
    from lastmile.clinic.devices import HELD_AT_STOP

    data = tmp_path / "data"
    monitor = device_entry("monitor", str(tmp_path / "usb-monitor"), "example-vitals-monitor")
    now = dt.datetime.now(UTC)
    both = "请重新测量，并重新做心电图"
    registry = DeviceRegistry.open(data)
    try:  # a readings-and-ECG monitor's row: held at a stop in memory only, 1 reading and 1 ECG
        registry.update_status("serial:monitor", now=now, transport="serial", name="monitor", seen=True)
        registry.update_status(
            "serial:monitor",
            now=now,
            transport="serial",
            held=HeldReadings.MEMORY,
            held_counts=(1, 1),
            memory_counts=(1, 1),
            held_cause=HELD_AT_STOP,
        )
    finally:
        registry.close()
    (held,) = [f for f in doctor(data, monitor).check_devices() if f.level is Level.FAIL]
    assert held.advice_key == "memory-only-readings-and-ecgs-at-stop", held
    pages = pages_with_the_monitor(tmp_path, data, "/devices", "/system")
    assert (
        f"网关停机时测量结果和心电图尚未保存，也没有保存在SD卡上：已丢失。设备和网关都没有坏。如病人仍在，{both}。"
        in (pages["/system"])
    ), pages["/system"]
    assert f"设备和网关都没有坏。如病人仍在，{both}。" in pages["/devices"], pages["/devices"]
    registry = DeviceRegistry.open(data)
    try:  # the next start: both lost at the stop
        registry.update_status("serial:monitor", now=now, transport="serial", held=HeldReadings.NONE)
        registry.record_lost(registry.get("serial:monitor"), (1, 1), now=now, cause=HELD_AT_STOP)
    finally:
        registry.close()
    (lost,) = [f for f in doctor(data, monitor).check_devices() if f.level is Level.FAIL and "lost when" in f.message]
    assert (lost.advice_key, lost.counts) == ("lost-readings-and-ecgs-at-stop", (1, 1)), lost
    pages = pages_with_the_monitor(tmp_path, data, "/devices", "/system")
    system = pages["/system"].split("已丢失：monitor")[1][:300]
    assert f"如病人仍在，{both}。" in system and "1 条测量结果、1 份心电图" in system, pages["/system"]
    devices = pages["/devices"].split("网关停机时丢失：")[1][:300]
    assert f"设备和网关都没有坏。如病人仍在，{both}。" in devices, devices


@pytest.mark.parametrize(
    ("cause", "key", "said"),
    [
        ("", "memory-only-readings-and-ecgs", "有测量结果和心电图在等待存储空间，尚未保存"),
        (
            "cannot store reading: database disk image is malformed",
            "memory-only-readings-and-ecgs-not-stored",
            "有测量结果和心电图在等待保存，尚未保存",
        ),
    ],
    ids=["space", "not-stored"],
)
def test_readings_and_ecgs_held_in_memory_only_are_both_named_on_the_system_page(
    tmp_path: Path, cause: str, key: str, said: str
) -> None:
    """A monitor's row holding a reading and an ECG in memory only (no spill file took them: the
    partition full, or the outbox refusing for another cause): the System page's advice said "ECGs
    are waiting" (有心电图在等待), as the doctor picked the ECGs' key whenever an ECG was among
    them, so his readings went unnamed. Now it names both, for want of space and for another cause."""
    data = tmp_path / "data"
    monitor = device_entry("monitor", str(tmp_path / "usb-monitor"), "example-vitals-monitor")
    now = dt.datetime.now(UTC)
    registry = DeviceRegistry.open(data)
    try:
        registry.update_status("serial:monitor", now=now, transport="serial", name="monitor", seen=True)
        registry.update_status(
            "serial:monitor",
            now=now,
            transport="serial",
            held=HeldReadings.MEMORY,
            held_counts=(1, 1),
            memory_counts=(1, 1),
            held_cause=cause,
        )
    finally:
        registry.close()
    (held,) = [f for f in doctor(data, monitor).check_devices() if f.level is Level.FAIL]
    assert held.advice_key == key, held
    assert "1 reading(s), 1 ECG(s)" in held.message and "do not switch the gateway off" in held.hint, held
    system = pages_with_the_monitor(tmp_path, data, "/system")["/system"]
    assert f"{said}：" in system and "请不要关闭网关，否则这些测量结果和心电图会丢失" in system, system
    assert "有心电图在等待" not in system, system


@pytest.mark.parametrize(
    ("cause", "on_disk", "key"),
    [
        ("", (0, 0), "lost-readings-and-ecgs"),
        ("cannot store reading: database disk image is malformed", (0, 0), "lost-readings-and-ecgs-not-stored"),
        ("", (1, 1), "lost-readings-and-ecgs-damaged-file"),
    ],
    ids=["space", "not-stored", "damaged-file"],
)
def test_every_loss_of_readings_and_ecgs_says_to_measure_again_and_record_the_ecg_again(
    tmp_path: Path, cause: str, on_disk: tuple[int, int], key: str
) -> None:
    """Losses not the stop's own (waiting for space, for another cause, a damaged spill file) of a
    reading and an ECG: the System page said only "record the ECG again". Now both."""
    data = tmp_path / "data"
    monitor = device_entry("monitor", str(tmp_path / "usb-monitor"), "example-vitals-monitor")
    now = dt.datetime.now(UTC)
    damage = f"{data}/serial-spill.dat (garbage; set aside as {data}/serial-spill.dat.20261207T090000Z.bad)"
    registry = DeviceRegistry.open(data)
    try:
        registry.update_status("serial:monitor", now=now, transport="serial", name="monitor", seen=True)
        registry.record_lost(
            registry.get("serial:monitor"),
            (1, 1),
            now=now,
            cause=cause,
            on_disk=on_disk,
            damage=damage if any(on_disk) else "",
        )
    finally:
        registry.close()
    lost = [f for f in doctor(data, monitor).check_devices() if f.level is Level.FAIL]
    assert [f.advice_key for f in lost] == [key], lost
    system = pages_with_the_monitor(tmp_path, data, "/system")["/system"]
    assert "如病人仍在，请重新测量、重新做心电图，并" in system, system
