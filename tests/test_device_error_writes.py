"""A serial device row's causes as the serial service writes them (2026-12-07): its error after an
unplug between two store errors, and what two stops lost from memory. Real rows in clinic.db, a
monitor on a pty pair. Each test failed on the code before its fix."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from devices.device_errors import DeviceProblem
from tests.serial_gateway import Running, monitor_prints_a_report_the_full_outbox_refuses, serial_config
from tests.serial_pty import PtyDevice
from tests.waiting import wait_for


def monitor_devices(tmp_path: Path) -> list[dict]:
    """The configured monitor (its port never there: only its row matters)."""
    return [{"name": "monitor", "match": str(tmp_path / "usb-monitor"), "profile": "example-vitals-monitor"}]


def test_a_store_error_after_an_unplug_and_replug_says_its_cause_again_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lastmile/services/serial_devices.py SerialContext.status: an error written there (the unplug
    a link reports) was not seen by the error throttle, which still took "cannot store" for the
    row's error. A monitor's report was held by a locked outbox (the row: "database is locked"),
    its cable pulled (the row: "device gone") and put back, and its next report refused by the
    same lock: that store error was throttled as a repeat, so the row's cause was the unplug and
    `lastmile devices` / the doctor said the 6 readings wait for space ("free space", which does
    nothing for a lock) until a store error came after the throttle's seconds (the next retry,
    30 s on). The throttle knows what the row holds now: the lock is said again at once."""
    from lastmile.doctor import Doctor, Level
    from lastmile.services import serial_devices

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 3600)  # no retry writes it meanwhile
    monkeypatch.setattr(serial_devices, "ERROR_STATUS_EVERY_S", 3600)  # however slow the machine
    monitor = PtyDevice(tmp_path / "usb-monitor")
    r = Running(tmp_path, monitor_devices(tmp_path))
    try:
        r.outbox.db.conn.execute("PRAGMA busy_timeout=50")  # refused at once, not after the 15 s busy wait
        with contextlib.closing(sqlite3.connect(r.config.data_dir / "outbox.sqlite", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # another process holds the outbox's write lock
            monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "database is locked", full=False)
            monitor.unplug()
            wait_for(lambda: r.registry.get("serial:monitor").problem is DeviceProblem.UNPLUGGED)
            monitor = PtyDevice(tmp_path / "usb-monitor")  # the cable back in
            monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "6 reading(s)", full=False)
            row = r.registry.get("serial:monitor")
            (held,) = [f for f in Doctor(r.config).check_devices() if f.level is Level.FAIL]
            other.rollback()
    finally:
        r.close()
        monitor.unplug()
    assert "database is locked" in row.waiting and "space" not in row.waiting, (row.last_error, row.waiting)
    assert "free space" not in held.hint, (held.message, held.hint)


def a_stop_lost_what_the_row_held_in_memory(tmp_path: Path, readings: int, cause: str) -> None:
    """The monitor's row as a stop left it - `readings` held in memory only, refused for `cause`
    ("": space, as a space failure writes no error) - found by the next start (which records the
    loss on the row) and stopped again."""
    from lastmile.clinic.devices import DeviceRegistry, HeldReadings

    data = tmp_path / "data"
    registry = DeviceRegistry.open(data)
    try:
        registry.update_status(
            "serial:monitor",
            now=dt.datetime.now(dt.timezone.utc),
            transport="serial",
            error=cause and f"cannot store reading: {cause}",
            problem=DeviceProblem.NOT_SAVED,
            held=HeldReadings.MEMORY,
            held_counts=(readings, 0),
        )
    finally:
        registry.close()
    Running(tmp_path, monitor_devices(tmp_path)).close()


def test_a_second_stop_s_loss_keeps_the_cause_of_the_first_still_said(tmp_path: Path) -> None:
    """lastmile/clinic/devices.py record_lost: a monitor's 3 readings held in memory only because
    the outbox was locked were lost at a power cut (the doctor: "... waiting to be stored: database
    is locked", call the county IT); a day later 2 more, held for space, were lost at another. The
    second loss wrote its cause ("" for space) over the first: the doctor said all 5 were lost
    waiting for space - the lock, which still needs the county IT, was gone from every page. Now a
    cause other than space is kept while its loss is said (the counts add up, as before)."""
    from lastmile.doctor import Doctor, Level

    a_stop_lost_what_the_row_held_in_memory(tmp_path, 3, "database is locked")
    a_stop_lost_what_the_row_held_in_memory(tmp_path, 2, "")
    config = serial_config(tmp_path, monitor_devices(tmp_path))
    (lost,) = [f for f in Doctor(config).check_devices() if "lost when" in f.message]
    assert lost.level is Level.FAIL and "5 reading(s)" in lost.message, lost.message
    assert "database is locked" in lost.message, lost.message
    assert lost.advice_key.endswith("-not-stored"), lost.advice_key  # the county IT's advice
