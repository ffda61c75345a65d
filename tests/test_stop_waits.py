"""A service's stop bounds every database write's wait for another process's write lock
(uploader/sqlite_store.py StopWaits: the outbox and clinic.db alike): SIGTERM while another
process holds clinic.db's lock (the console in a long write, a sqlite3 shell left open) waited
SQLite's 15 s busy timeout per write, one after the other - the acquire service's device rows,
held readings, the session's activity: a minute, past systemd's TimeoutStopSec. What was to be
written is kept (the spill file) or written again by the next start."""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lastmile.clinic.devices import DeviceRegistry
from lastmile.clinic.observations import ObservationStore
from lastmile.clinic.patients import PatientContext
from lastmile.services.serial_spill import waiting_readings
from tests.serial_pty import PtyDevice
from tests.service_harness import (
    STOP_WITHIN_S,
    Manager,
    acquire_toml,
    report_printed,
    start_acquire,
    stop_child,
    waiting_in_a_sleep,
)
from tests.waiting import wait_for
from uploader.outbox import Outbox
from uploader.sqlite_store import STOP_WAIT_S, StopWaits, WaitGivenUp, give_up_waits_on, transaction


def sigterm_while_clinic_db_is_locked(tmp_path: Path, *, patient: bool) -> tuple[float, str, Path, Path]:
    """The real `lastmile acquire` with a monitor on a pty (a patient checked in, or none: its
    readings held unassigned); another process holds clinic.db's write lock as the monitor prints
    its report; SIGTERM once a write sleeps in SQLite's busy wait. Returns the seconds from SIGTERM
    to exit, the service's output, its configuration and data directory."""
    monitor = PtyDevice(tmp_path / "usb-monitor")
    config, data = acquire_toml(tmp_path, monitor), tmp_path / "data"
    manager = Manager(tmp_path / "notify")
    proc = start_acquire(config, manager, watchdog_usec=20_000_000)
    try:
        manager.wait_for("READY=1", timeout=60)
        with contextlib.closing(DeviceRegistry.open(data)) as registry:
            wait_for(lambda: (r := registry.get("serial:monitor")) is not None and r.connected, timeout=30)
        now = dt.datetime.now(dt.timezone.utc)
        if patient:
            with contextlib.closing(PatientContext.open(data, idle_timeout_s=900)) as patients:
                patients.set_patient("P-9", now=now - dt.timedelta(minutes=1))
        with contextlib.closing(sqlite3.connect(data / "clinic.db", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            monitor.write(report_printed(now))
            wait_for(lambda: waiting_in_a_sleep(proc.pid), timeout=30)  # a clinic.db write waits for the lock
            proc.send_signal(signal.SIGTERM)
            began = time.monotonic()
            out, _ = proc.communicate(timeout=180)
            took = time.monotonic() - began
            other.rollback()
    finally:
        stop_child(proc)
        manager.sock.close()
        monitor.unplug()
    return took, out, config, data


@contextlib.contextmanager
def restarted(tmp_path: Path, config: Path) -> Iterator[None]:
    """`lastmile acquire` started again (on a monitor plugged in again) once it is READY (its
    device rows as it found them written), stopped at the end."""
    monitor = PtyDevice(tmp_path / "usb-monitor")
    manager = Manager(tmp_path / "notify-again")
    again = start_acquire(config, manager, watchdog_usec=20_000_000)
    try:
        manager.wait_for("READY=1", timeout=60)
        yield
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(30)
        manager.sock.close()
        monitor.unplug()


def test_sigterm_while_a_device_row_waits_for_clinic_db_lock_stops_promptly(tmp_path: Path) -> None:
    """lastmile/services/acquire.py, serial_devices.py: the readings went to the outbox, then the
    session's activity and each reading's device row waited 15 s each for clinic.db, and the
    stop's own row writes (disconnected) after them: SIGTERM to exit was ~60 s, past the test's
    2 min only just (systemd kills at TimeoutStopSec=45). Now the service's stop bounds clinic.db's
    writes as the outbox's: out within seconds, no traceback, the readings stored once (not
    held: they were), and the row's status written again by the next start."""
    took, out, config, data = sigterm_while_clinic_db_is_locked(tmp_path, patient=True)
    print(f"\nSIGTERM to exit, device rows waiting for clinic.db's lock: {took:.1f} s")
    assert took < STOP_WITHIN_S and "Traceback" not in out, (took, out)
    assert "device status not recorded" in out and " ERROR " not in out, out
    assert waiting_readings(data) == 0, out  # in the outbox: nothing held for the next start
    with contextlib.closing(Outbox.open(data, min_free_bytes=0)) as outbox:
        assert len(outbox.items(kind="observation")) == 3
    with contextlib.closing(DeviceRegistry.open(data)) as registry:
        assert (row := registry.get("serial:monitor")) is not None and row.connected  # not written at the stop
        with restarted(tmp_path, config):
            wait_for(lambda: (r := registry.get("serial:monitor")) is not None and r.connected, timeout=60)
        row = registry.get("serial:monitor")
        assert row is not None and not row.connected and not row.last_error, row


def test_sigterm_while_a_held_reading_waits_for_clinic_db_lock_keeps_it(tmp_path: Path) -> None:
    """No patient checked in: the readings are held unassigned in clinic.db. Their writes waited
    15 s each at SIGTERM; now given up within seconds, the readings kept in the spill file and held
    by the next start, once each."""
    took, out, config, data = sigterm_while_clinic_db_is_locked(tmp_path, patient=False)
    print(f"\nSIGTERM to exit, held readings waiting for clinic.db's lock: {took:.1f} s")
    assert took < STOP_WITHIN_S and "Traceback" not in out, (took, out)
    assert waiting_readings(data) == 3, out  # kept on disk, and said so
    assert "3 reading(s) (kept on disk, stored after the restart) not stored" in out, out
    with restarted(tmp_path, config):
        wait_for(lambda: waiting_readings(data) == 0, timeout=60)
    with (
        contextlib.closing(Outbox.open(data, min_free_bytes=0)) as outbox,
        contextlib.closing(ObservationStore.open(data, outbox=outbox, idle_timeout_s=900)) as store,
    ):
        assert len(store.held()) == 3 and not outbox.items(kind="observation")


def test_a_stop_ends_a_clinic_db_write_waiting_for_another_process_lock(tmp_path: Path) -> None:
    """sqlite_store.transaction on a database given the stop (`give_up_waits_on`): the wait ends
    STOP_WAIT_S after the stop (WaitGivenUp, a "database is locked"), nothing written; the next
    write once the lock is free goes at once. One StopWaits for two databases counts that second
    once: a second write after it gives up at its first turn."""
    data = tmp_path / "data"
    stop = threading.Event()
    waits = StopWaits(stop)
    with (
        contextlib.closing(DeviceRegistry.open(data)) as registry,
        contextlib.closing(Outbox.open(data, min_free_bytes=0)) as outbox,
    ):
        give_up_waits_on(registry.db, waits)
        outbox.give_up_waits_on(waits)
        now = dt.datetime.now(dt.timezone.utc)
        with contextlib.closing(sqlite3.connect(data / "clinic.db", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            threading.Timer(0.3, stop.set).start()
            began = time.monotonic()
            with pytest.raises(WaitGivenUp, match="locked"):
                registry.update_status("serial:monitor", now=now, transport="serial", connected=True)
            took = time.monotonic() - began
            assert STOP_WAIT_S < took < STOP_WAIT_S + 1.5, took
            with (
                contextlib.closing(sqlite3.connect(data / "outbox.sqlite", isolation_level=None)) as on_outbox,
                pytest.raises(WaitGivenUp),
            ):
                on_outbox.execute("BEGIN IMMEDIATE")
                began = time.monotonic()
                outbox.add("observation", "k", b"{}", now=0.0)
            assert time.monotonic() - began < 0.5  # the second already spent, for both databases
            other.rollback()
        assert registry.get("serial:monitor") is None  # nothing written
        with transaction(registry.db):  # a free lock: at once, whatever the stop
            pass
        registry.update_status("serial:monitor", now=now, transport="serial", connected=True)
        assert registry.get("serial:monitor") is not None
