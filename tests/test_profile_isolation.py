"""One malformed ASCII-report profile file must stop only the serial devices that name it: the
acquire service runs every other device link, and the refused device's status says which file and
line is wrong (found 2026-12-06: any bad file in serial.profiles_dir stopped the whole acquire
service, used or not)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import time
from pathlib import Path

from lastmile.clinic.devices import DeviceRecord, DeviceRegistry
from lastmile.doctor import Level
from tests.conftest import shared_file
from tests.serial_pty import PtyDevice
from tests.service_harness import (
    EXAMPLE_PROFILE,
    VITALS_REPORT,
    Manager,
    doctor,
    start_acquire,
    status_with,
    stop_child,
)
from tests.waiting import wait_for
from uploader.outbox import Outbox


def ward_profile_with_bad_baudrate(profiles: Path) -> int:
    """`ward-monitor.toml` with its port speed mistyped; returns the line of the mistake."""
    good = EXAMPLE_PROFILE.read_text().replace('name = "example-vitals-monitor"', 'name = "ward-monitor"', 1)
    lines = good.replace("baudrate = 9600", "baudrate = 0", 1).splitlines()
    (profiles / "ward-monitor.toml").write_text("\n".join(lines) + "\n")
    return next(i + 1 for i, text in enumerate(lines) if text.startswith("baudrate = 0"))


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
    config.write_text(
        f'[gateway]\ndata_dir = "{data}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n'
        f'[usb_import]\nfolders = ["{stick}"]\n'
        f'[serial]\nprofiles_dir = "{profiles}"\n\n'
        f'[[serial.devices]]\nname = "monitor"\nmatch = "{monitor.link_path}"\nprofile = "example-vitals-monitor"\n\n'
        f'[[serial.devices]]\nname = "ward"\nmatch = "{ward.link_path}"\nprofile = "ward-monitor"\n'
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
        refused = device("ward")
        assert refused is not None and not refused.connected
        assert f"ward-monitor.toml:{line}: 'profile.baudrate' out of range" in refused.last_error, refused
        found = [f for f in doctor(data).check_devices() if f.level is Level.WARN]
        assert found and f"ward-monitor.toml:{line}" in found[0].message, found
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
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
