"""A serial device row's causes as the serial service writes them (2026-12-07): its error after an
unplug between two store errors, and what two stops lost from memory. Real rows in clinic.db, a
monitor on a pty pair. Each test failed on the code before its fix."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.device_errors import DeviceProblem
from tests.serial_gateway import Running, monitor_prints_a_report_the_full_outbox_refuses, serial_config
from tests.serial_pty import PtyDevice
from tests.waiting import wait_for


def monitor_devices(tmp_path: Path) -> list[dict]:
    """The configured monitor (its port never there: only its row matters)."""
    return [{"name": "monitor", "match": str(tmp_path / "usb-monitor"), "profile": "example-vitals-monitor"}]


@contextlib.contextmanager
def a_monitor_unplugged_with_readings_a_locked_outbox_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Running]:
    """The gateway with the monitor's report held by another process's write lock on the outbox
    (the row: "database is locked", no retry meanwhile), then its cable pulled (the row: unplugged);
    the lock is held until the end."""
    from lastmile.services import serial_devices

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 3600)  # no retry writes it meanwhile
    monitor = PtyDevice(tmp_path / "usb-monitor")
    r = Running(tmp_path, monitor_devices(tmp_path))
    try:
        r.outbox.db.conn.execute("PRAGMA busy_timeout=50")  # refused at once, not after the 15 s busy wait
        with contextlib.closing(sqlite3.connect(r.config.data_dir / "outbox.sqlite", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # another process holds the outbox's write lock
            monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "database is locked", full=False)
            monitor.unplug()
            wait_for(lambda: r.registry.get("serial:monitor").problem is DeviceProblem.UNPLUGGED)
            yield r
            other.rollback()
    finally:
        r.close()
        monitor.unplug()


def assert_the_row_and_the_doctor_say_the_lock(r: Running) -> None:
    """What the monitor's row says waits, and the doctor's FAIL on it, name the lock, not space."""
    from lastmile.doctor import Doctor, Level

    row = r.registry.get("serial:monitor")
    assert row is not None
    (held,) = [f for f in Doctor(r.config).check_devices() if f.level is Level.FAIL]
    assert "database is locked" in row.waiting and "space" not in row.waiting, (row.last_error, row.waiting)
    assert "free space" not in held.hint, (held.message, held.hint)


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
    from lastmile.services import serial_devices

    monkeypatch.setattr(serial_devices, "ERROR_STATUS_EVERY_S", 3600)  # however slow the machine
    with a_monitor_unplugged_with_readings_a_locked_outbox_holds(tmp_path, monkeypatch) as r:
        monitor = PtyDevice(tmp_path / "usb-monitor")  # the cable back in
        try:
            monitor_prints_a_report_the_full_outbox_refuses(r, monitor, "6 reading(s)", full=False)
            assert_the_row_and_the_doctor_say_the_lock(r)
        finally:
            monitor.unplug()


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
            held_cause=cause and f"cannot store reading: {cause}",
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


def test_readings_held_by_a_locked_outbox_say_the_lock_after_the_monitor_is_unplugged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lastmile/clinic/devices.py DeviceRecord.held_cause: why what waits was not stored was read
    from the row's error, which the unplug after it replaced. A monitor's report held by a
    write-locked outbox (not a full one), its cable then pulled with no store error after it: the
    row, `lastmile devices` and the doctor said the readings wait for space ("free space", which
    does nothing for a lock) until the next retry, or for good if it is not plugged back. The held
    cause is a column of its own now, written with the held status."""
    with a_monitor_unplugged_with_readings_a_locked_outbox_holds(tmp_path, monkeypatch) as r:
        assert_the_row_and_the_doctor_say_the_lock(r)


def test_a_row_held_for_a_lock_before_the_held_cause_was_kept_still_says_the_lock(tmp_path: Path) -> None:
    """A row the version before the held cause's column wrote (migration 0030): its readings held
    by a locked outbox, said by its "cannot store" error; the row held for space says space."""
    from lastmile.clinic.db import DB_NAME, MIGRATIONS
    from lastmile.clinic.devices import DeviceRegistry
    from uploader.sqlite_store import open_database

    db = open_database(tmp_path / DB_NAME, tuple(m for m in MIGRATIONS if m.name < "0031_device_held_cause"))
    for address, error, kind in (
        ("LOCKED", "cannot store reading: database is locked", "not-saved"),
        ("FULL", "device gone: unplugged", "unplugged"),
    ):
        db.conn.execute(
            "INSERT INTO devices (address, transport, updated_at, last_error, last_error_kind, held_readings, "
            "held_reading_count) VALUES (?, 'serial', '2026-12-06T08:00:00+00:00', ?, ?, 'disk', 2)",
            (address, error, kind),
        )
    db.conn.close()
    registry = DeviceRegistry.open(tmp_path)
    try:
        locked, full = registry.get("LOCKED"), registry.get("FULL")
    finally:
        registry.close()
    assert locked is not None and "database is locked" in locked.waiting, locked
    assert full is not None and "waiting for space" in full.waiting, full


def test_two_stops_losses_for_two_causes_other_than_space_say_both(tmp_path: Path) -> None:
    """lastmile/clinic/devices.py record_lost: a monitor's readings held by a locked outbox were
    lost at a power cut, then more held for a damaged one ("disk I/O error") at another: the
    doctor named the lock alone for all 5, and the county IT looked for the other process only.
    Now each cause (other than space) the losses still said waited for is named, once."""
    from lastmile.doctor import Doctor

    for readings, cause in ((3, "database is locked"), (2, "disk I/O error"), (1, "database is locked")):
        a_stop_lost_what_the_row_held_in_memory(tmp_path, readings, cause)
    config = serial_config(tmp_path, monitor_devices(tmp_path))
    (lost,) = [f for f in Doctor(config).check_devices() if "lost when" in f.message]
    assert "6 reading(s)" in lost.message, lost.message
    assert "database is locked" in lost.message and "disk I/O error" in lost.message, lost.message
    assert lost.message.count("database is locked") == 1, lost.message
