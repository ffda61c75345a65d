"""A service's stop bounds every database write's wait for another process's write lock
(uploader/sqlite_store.py StopWaits: the outbox and clinic.db alike): SIGTERM while another
process holds clinic.db's lock (the console in a long write, a sqlite3 shell left open) waited
SQLite's 15 s busy timeout per write, one after the other - the acquire service's device rows,
held readings, the session's activity: a minute, past systemd's TimeoutStopSec. What was to be
written is kept (the spill file) or written again by the next start."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devices.device_errors import DeviceProblem
from firmware_bridge.bridge_simulator import EcgStreamSimulator
from firmware_bridge.firmware.bridge_core import BridgeCore
from lastmile.clinic.db import iso
from lastmile.clinic.devices import DeviceRecord, DeviceRegistry
from lastmile.clinic.observations import ObservationStore
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config
from lastmile.services.acquire import NO_SESSION, usb_import_part
from lastmile.services.serial_spill import ECG_SPILL_NAME, waiting_readings
from tests.conftest import REPO, shared_file
from tests.serial_gateway import Running, serial_part_whose_stop_gives_up_waits, talk_as_bridge
from tests.serial_pty import PtyDevice
from tests.service_harness import (
    FHIR_TOKEN,
    STOP_WITHIN_S,
    Manager,
    acquire_stopped_under_a_lock,
    errors_said,
    fhir_token_file,
    no_reading_center_toml,
    run_until,
    service_running,
    sigterm_once_a_write_waits,
    start_acquire,
    stop_child,
    write_locked,
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
    try:
        took, out, config, data, _returncode = acquire_stopped_under_a_lock(
            tmp_path, monitor, "clinic.db", patient=patient
        )
    finally:
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


# -- an ECG the stop gave up is kept, said at INFO: no device error ------------------------------------


def an_ecg_bridge_connected(tmp_path: Path) -> tuple[PtyDevice, Running, Callable[[], None]]:
    """An ECG bridge on a pty, greeted by the gateway's serial part (`Running`), and what streams
    one 10 s ECG from it (recording 3)."""
    bridge = PtyDevice(tmp_path / "usb-ecg")
    r = Running(tmp_path, [{"name": "ecg", "match": str(bridge.link_path), "profile": "bridge"}])
    try:
        core, clock = BridgeCore("BR-ECG", boot_id=9, capabilities=("ecg",)), [0]
        wait_for(lambda: r.service.statuses()[0].connected)
        talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
    except BaseException:
        r.close()
        bridge.unplug()
        raise

    def stream_an_ecg() -> None:
        sim = EcgStreamSimulator(core, recording_id=3)
        bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(400)) + sim.end(400 * 25, clock[0]))

    return bridge, r, stream_an_ecg


def assert_the_ecg_stored_once(data_dir: Path) -> None:
    """The ECG is in the outbox, once, and no longer in the ECG spill file."""
    with contextlib.closing(Outbox.open(data_dir, min_free_bytes=0)) as outbox:
        assert len(outbox.items(kind="dicom")) == 1
    assert waiting_readings(data_dir, ECG_SPILL_NAME) == 0


def test_a_streamed_ecg_the_stop_gave_up_is_kept_without_a_device_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """lastmile/services/serial_devices.py store_recording: a bridge's ECG whose store the stop gave
    up (another process holding the outbox's lock) was logged at ERROR "cannot store an ECG
    recording" and marked its row NOT_SAVED, a device fault for the doctor and the county's log
    shipping. At a stop it is expected: said at INFO, the ECG kept in the ECG spill file and held
    (its row says it waits), no device error; stored once the lock is free."""
    bridge, r, stream_an_ecg = an_ecg_bridge_connected(tmp_path)
    try:
        r.patients.set_patient("P-ECG", now=r.now() - dt.timedelta(seconds=5))
        stop = threading.Event()
        r.outbox.give_up_waits_on(stop)
        stop.set()  # the acquire service is stopping
        with (
            contextlib.closing(sqlite3.connect(r.config.data_dir / "outbox.sqlite", isolation_level=None)) as other,
            caplog.at_level(logging.INFO),
        ):
            other.execute("BEGIN IMMEDIATE")
            stream_an_ecg()
            wait_for(lambda: waiting_readings(r.config.data_dir, ECG_SPILL_NAME) == 1, timeout=30)
            wait_for(lambda: (row := r.registry.get("serial:ecg")) is not None and row.held_ecg_count == 1)
            other.rollback()
        row = r.registry.get("serial:ecg")
        assert row is not None and row.problem is not DeviceProblem.NOT_SAVED and not row.last_error, row
        said = [rec for rec in caplog.records if "ECG" in rec.getMessage()]
        assert [rec.getMessage() for rec in said if rec.levelno >= logging.ERROR] == []
        assert any(rec.levelno == logging.INFO and "stopping: an ECG recording" in rec.getMessage() for rec in said)
    finally:
        r.close()  # the lock free: what waits is stored at the close
        bridge.unplug()
    assert_the_ecg_stored_once(r.config.data_dir)


def test_a_streamed_ecg_whose_expired_session_the_stop_could_not_end_is_kept(tmp_path: Path) -> None:
    """lastmile/services/serial_devices.py store_recording: it read the session (which writes
    clinic.db when the session just expired) before its try: at a stop, another process holding
    clinic.db's lock, that write gave up (WaitGivenUp) past the handler, which never held the ECG:
    a bridge cannot resend a stream, it was lost. Now it is held (ECG spill file), the stop's cause
    on the row, and stored once the lock is free."""
    bridge, r, stream_an_ecg = an_ecg_bridge_connected(tmp_path)
    try:
        r.patients.set_patient("P-ECG", now=r.now() - dt.timedelta(minutes=20))  # idle past 15 min: expired
        stop = threading.Event()
        give_up_waits_on(r.service.ctx.store.db, StopWaits(stop))
        stop.set()  # the acquire service is stopping
        with contextlib.closing(sqlite3.connect(r.config.data_dir / "clinic.db", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            stream_an_ecg()
            wait_for(
                lambda: waiting_readings(r.config.data_dir, ECG_SPILL_NAME) == 1,
                timeout=30,
                what="the ECG kept in the ECG spill file",
            )
            other.rollback()
    finally:
        r.close()  # the lock free: what waits is stored at the close
        bridge.unplug()
    assert_the_ecg_stored_once(r.config.data_dir)


def test_a_held_ecg_whose_expired_session_the_stop_could_not_end_does_not_cut_the_close_short(tmp_path: Path) -> None:
    """lastmile/services/serial_devices.py SerialService.close: its last try of a held ECG read the
    session (a write: it had just expired) outside store_recording's try; at a stop, another
    process holding clinic.db's lock, WaitGivenUp left close() half-way: what waits never said,
    the service's databases not closed. Now the ECG stays held (its spill file) and close ends."""
    bridge, r, stream_an_ecg = an_ecg_bridge_connected(tmp_path)
    try:
        stop = StopWaits(threading.Event())
        r.outbox.give_up_waits_on(stop)
        give_up_waits_on(r.service.ctx.store.db, stop)
        stop.stop.set()  # the acquire service is stopping
        with contextlib.closing(sqlite3.connect(r.config.data_dir / "outbox.sqlite", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # the ECG is held: the outbox's lock
            stream_an_ecg()
            wait_for(lambda: waiting_readings(r.config.data_dir, ECG_SPILL_NAME) == 1, timeout=30)
            other.rollback()
        r.patients.set_patient("P-ECG", now=r.now() - dt.timedelta(minutes=20))  # idle past 15 min: expired
        with contextlib.closing(sqlite3.connect(r.config.data_dir / "clinic.db", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            r.service.close()  # raised WaitGivenUp
            other.rollback()
        assert waiting_readings(r.config.data_dir, ECG_SPILL_NAME) == 1  # stored at the next start
    finally:
        r.outbox.close()
        r.patients.close()
        r.registry.close()
        bridge.unplug()


def test_a_usb_import_the_stop_gave_up_is_said_at_info_and_left_on_the_stick(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """lastmile/services/parts.py WorkerPart: an ECG file's import the stop gave up (another process
    holding the outbox's lock) ended the usb-import part with a WARNING and "will try again", as a
    fault. At a stop it is expected: said at INFO; the file stays on the stick, imported once the
    lock is free (here by the next poll; at a restart by the next start)."""
    stick = tmp_path / "stick"
    stick.mkdir()
    ecg = stick / "0000037.ECG"
    shutil.copyfile(shared_file("ecg", "contec", "0000037.ECG"), ecg)
    os.utime(ecg, (time.time() - 3600,) * 2)  # written before the stick came in: imported at once
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.usb_import.folders = [str(stick)]
    stop = threading.Event()
    with contextlib.closing(Outbox.open(config.data_dir, min_free_bytes=0)) as outbox:
        outbox.give_up_waits_on(stop)
        stop.set()  # the acquire service is stopping
        part = usb_import_part(config, outbox, NO_SESSION)
        assert part is not None
        with (
            contextlib.closing(sqlite3.connect(config.data_dir / "outbox.sqlite", isolation_level=None)) as other,
            caplog.at_level(logging.INFO),
        ):
            other.execute("BEGIN IMMEDIATE")
            part.check(time.monotonic())
            wait_for(lambda: not part.running, timeout=30)
            other.rollback()
        said = [rec for rec in caplog.records if rec.name == "lastmile.services.parts"]
        assert [rec.getMessage() for rec in said if rec.levelno >= logging.WARNING] == []
        assert any("usb-import: stopping" in rec.getMessage() for rec in said), [r.getMessage() for r in said]
        assert outbox.items(kind="dicom") == [] and ecg.exists()
        part.check(time.monotonic())  # started again: the file is imported now the lock is free
        wait_for(lambda: len(outbox.items(kind="dicom")) == 1, timeout=60)
        part.close()


# -- visits.db: the GNSS part's track ------------------------------------------------------------------


def test_sigterm_while_a_gnss_fix_waits_for_visits_db_lock_stops_promptly(tmp_path: Path) -> None:
    """lastmile/services/acquire.py gnss_part: with another process holding visits.db's write lock
    (the console signing a visit, a sqlite3 shell left open), a fix extending the open visit's
    track waited the 15 s busy timeout, and SIGTERM with it: 15.1 s, the part "still busy at
    shutdown" (its thread abandoned mid-write at the part's 15 s join). Now the service's stop
    bounds visits.db's writes too: out within seconds, the track point given up said at INFO."""
    from lastmile.visits.book import VisitBook, VisitPolicy

    device = PtyDevice(tmp_path / "gps0")
    data, config = tmp_path / "data", tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{data}"\n[ble]\nenabled = false\n[visits]\ndoctor_id = "DR-1"\n'
        f'[gps]\nsource = "nmea"\nnmea_port = "{device.link_path}"\nnmea_baud = 9600\n'
    )
    with VisitBook.open(data, gateway_id="gw", policy=VisitPolicy()) as book:
        book.start("P1", doctor_id="DR-1")
    nmea = [
        line for line in shared_file("gps", "bt-q818.log").read_bytes().splitlines(keepends=True) if line[:1] == b"$"
    ]
    fed = threading.Event()

    def feed() -> None:  # a receiver's pace, for as long as the test runs
        while not fed.is_set():
            for line in nmea:
                if fed.is_set():
                    return
                device.write(line)
                time.sleep(0.01)

    manager = Manager(tmp_path / "notify")
    proc = start_acquire(config, manager, watchdog_usec=20_000_000)
    feeder = threading.Thread(target=feed, daemon=True)
    try:
        manager.wait_for("READY=1", timeout=60)
        time.sleep(2.0)  # the part opens the port (pyserial drops what waits in it then)
        feeder.start()
        with VisitBook.open(data, gateway_id="gw", policy=VisitPolicy()) as book:
            wait_for(lambda: len(book.track(book.open_visit().id)) > 0, timeout=60, what="the track extended")
        with write_locked(data / "visits.db"):
            took, out = sigterm_once_a_write_waits(proc, "a fix's write")
    finally:
        fed.set()
        if feeder.ident is not None:
            feeder.join(timeout=60)  # before its pty closes
        stop_child(proc)
        manager.sock.close()
        device.unplug()
    print(f"\nSIGTERM to exit, a GNSS fix waiting for visits.db's lock: {took:.1f} s")
    assert took < STOP_WITHIN_S and proc.returncode == 0, (took, out)
    assert "Traceback" not in out and "still busy at shutdown" not in out, out
    assert "gnss: stopping: a write waiting for another process's lock given up" in out, out


@contextlib.contextmanager
def scanned_at_a_stop_under_clinic_db_lock(
    tmp_path: Path, scan: bytes, before: Callable[[PatientContext, dt.datetime], None]
) -> Iterator[PatientContext]:
    """The serial part reading a desk scanner on a pty: `before` writes the session (a minute ago),
    the acquire service starts stopping, and `scan` is scanned while another process holds
    clinic.db's lock past the stop's bound, then frees it. The session, the service still running."""
    from lastmile.services.serial_devices import SerialService
    from tests.serial_gateway import serial_config

    scanner = PtyDevice(tmp_path / "usb-scanner")
    config = serial_config(tmp_path, [{"name": "desk-scanner", "match": str(scanner.link_path), "profile": "scanner"}])
    stop = threading.Event()
    with (
        contextlib.closing(Outbox.open(config.data_dir, min_free_bytes=0)) as outbox,
        contextlib.closing(PatientContext.open(config.data_dir, idle_timeout_s=900)) as patients,
    ):
        service = SerialService.open(config, outbox=outbox, stop=StopWaits(stop), watch_dirs=None, rescan_s=0.1)
        service.start()
        try:
            wait_for(lambda: all(s.connected for s in service.statuses()))
            before(patients, dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1))
            stop.set()  # the acquire service is stopping
            with contextlib.closing(sqlite3.connect(config.data_dir / "clinic.db", isolation_level=None)) as other:
                other.execute("BEGIN IMMEDIATE")
                scanner.write(scan)
                time.sleep(STOP_WAIT_S + 1.5)  # past the stop's bound: the scan's write still waits
                other.rollback()
            yield patients
        finally:
            service.close()
            scanner.unplug()


# `lastmile acquire` (lastmile.cli.main), the parts' stop made short (the unit's 24 s): what a stop
# that cannot wait for a part does to the process and its stores.
ACQUIRE_WITH_A_SHORT_STOP = """
import sys
from lastmile.cli import main
from lastmile.services import acquire
acquire.PARTS_STOP_S = 2.0
sys.exit(main(["-c", sys.argv[1], "acquire"]))
"""


def test_a_card_still_waiting_past_the_stop_deadline_is_left_its_database_and_the_process_exits_cleanly(
    tmp_path: Path,
) -> None:
    """lastmile/services/acquire.py AcquireService.close: a part still closing at the parts'
    deadline (a card scanned at the stop waits clinic.db's lock past it) was left with its stores
    closed under it as the process went on. Now nothing it may use is closed (a sqlite3 connection
    closed under another thread's statement: exit 139), the journal says what is left and what it
    means (the card: scan it again), the process exits cleanly, the databases sound, the card's
    check-in rolled back whole."""
    from tests.service_harness import PATIENT_CARD_SCAN

    scanner = PtyDevice(tmp_path / "usb-scanner")
    data = tmp_path / "data"
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{data}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n'
        f"[serial]\npatient_card_pattern = '(?P<id>\\d{{20}})'\n"
        f'[[serial.devices]]\nname = "desk-scanner"\nmatch = "{scanner.link_path}"\nprofile = "scanner"\n'
    )
    manager = Manager(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "20000000", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", ACQUIRE_WITH_A_SHORT_STOP, str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        manager.wait_for("READY=1", timeout=60)
        with contextlib.closing(DeviceRegistry.open(data)) as registry:
            wait_for(lambda: (r := registry.get("serial:desk-scanner")) is not None and r.connected, timeout=30)
        with contextlib.closing(PatientContext.open(data, idle_timeout_s=900)) as patients:
            patients.set_patient("P-BEFORE", now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1))
        with write_locked(data / "clinic.db"):  # held past the process's exit
            scanner.write(PATIENT_CARD_SCAN)
            took, out = sigterm_once_a_write_waits(proc, "the card's check-in", timeout=60)
    finally:
        out_left = stop_child(proc)
        manager.sock.close()
        scanner.unplug()
    out = out or out_left
    print(f"\nSIGTERM to exit, a card waiting past a 2 s parts' stop: {took:.1f} s")
    assert proc.returncode == 0 and "Traceback" not in out and "Fatal Python error" not in out, (proc.returncode, out)
    assert took < 10, (took, out)  # the deadline, not the card's 15 s wait
    assert "serial: still closing" in out and "scan it again" in out, out
    assert "the outbox and clinic.db left open to it" in out, out
    for name in ("clinic.db", "outbox.sqlite"):
        with contextlib.closing(sqlite3.connect(data / name)) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",), name
    with contextlib.closing(PatientContext.open(data, idle_timeout_s=900)) as patients:
        current = patients.current(dt.datetime.now(dt.timezone.utc))
    assert current is not None and current.patient_id == "P-BEFORE"  # the card's check-in rolled back whole, as said


def test_a_card_scanned_at_a_stop_still_waits_for_clinic_db_lock(tmp_path: Path) -> None:
    """lastmile/services/serial_devices.py ScannerHandler: the stop bounds the serial devices'
    clinic.db writes, but not a scanned patient card's: given up, the previous patient would stay
    current after the restart and the next readings go on him. The card waits for the lock as
    before the stop bounded anything (its write says `wait_past_stop`), and is the session's once it is free."""
    from tests.service_harness import PATIENT_CARD_SCAN

    def before(patients: PatientContext, at: dt.datetime) -> None:
        patients.set_patient("P-BEFORE", now=at)

    with scanned_at_a_stop_under_clinic_db_lock(tmp_path, PATIENT_CARD_SCAN, before) as patients:
        wait_for(lambda: (p := patients.current(dt.datetime.now(dt.timezone.utc))) and p.patient_id != "P-BEFORE")
        current = patients.current(dt.datetime.now(dt.timezone.utc))
        assert current is not None and current.patient_id == "80276001234567890123"


def forward_toml(tmp_path: Path, config: Path, fhir_url: str) -> None:
    """`lastmile forward` toward a loopback FHIR platform; no reading center listens."""
    data = tmp_path / "data"
    config.write_text(
        f'[gateway]\nid = "gw-1"\ndata_dir = "{data}"\n{no_reading_center_toml()}'
        f'[fhir]\nbase_url = "{fhir_url}"\ntoken_file = "{fhir_token_file(tmp_path)}"\n'
        '[outbox]\nmin_free_mb = 0\n[reports]\nsource = "off"\n'
    )


def stopped_promptly(proc: subprocess.Popen[bytes], took: float, journal: Path, waiting: str) -> str:
    """The forward service, SIGTERMed while `waiting` for visits.db's lock, out within seconds,
    exit 0, nothing said at ERROR and no traceback. Its log."""
    out = journal.read_text(errors="replace")
    print(f"\nSIGTERM to exit, {waiting} waiting for visits.db's lock: {took:.1f} s")
    assert took < STOP_WITHIN_S and proc.returncode == 0, (took, out[-3000:])
    assert errors_said(out) == [], out[-3000:]
    return out


def test_sigterm_while_the_forward_service_queues_a_visit_under_visits_db_lock_stops_promptly(tmp_path: Path) -> None:
    """lastmile/visits/relay_link.py VisitQueue: the forward service queues a closed home visit for
    the county platform (the first write: marking it queued, in visits.db) while another process
    holds visits.db's write lock (the doctor's `lastmile visit stop` signing, a sqlite3 shell left
    open); SIGTERM: the write waited out SQLite's 15 s busy timeout, the stop with it (measured
    15.2 s). Now the forward service's StopWaits bounds visits.db's writes too (1.2 s), said at
    INFO; the visit is the next start's, sent once."""
    from lastmile.visits.book import VisitBook
    from tests.fhir_server import FhirTestServer

    data, config, journal = tmp_path / "data", tmp_path / "lastmile.toml", tmp_path / "forward.log"
    with FhirTestServer(token=FHIR_TOKEN) as platform:
        forward_toml(tmp_path, config, platform.base_url)
        with service_running(config, "forward", log=journal) as proc:
            wait_for(lambda: "forward ready after" in journal.read_text() or proc.poll() is not None, timeout=60)
            with VisitBook.open(data, gateway_id="gw-1") as book:  # the doctor's visit, closed and signed
                visit = book.start("P-2", doctor_id="DR-1", household_id="HH-1")
                book.stop()
            with write_locked(data / "visits.db"):
                took, _ = sigterm_once_a_write_waits(proc, "the visit queue's write")
        out = stopped_promptly(proc, took, journal, "the forward service's visit queue")
        assert "stopping: closed home visits queued for the county platform at the next start" in out, out[-3000:]

        run_until(  # the next start queues and sends it, once
            config,
            "forward",
            log=journal,
            until=lambda: sum(platform.applied.values()) >= 1,
            what="the visit sent",
            then_s=1.0,
        )
        assert platform.applied == {visit.id: 1}, (platform.applied, journal.read_text()[-3000:])


def test_sigterm_while_the_forward_service_links_a_reading_to_a_visit_under_visits_db_lock_stops_promptly(
    tmp_path: Path,
) -> None:
    """lastmile/visits/relay_link.py visit_link: the relay links a reading taken during the open
    home visit of its patient (a write in visits.db) while another process holds visits.db's
    write lock; SIGTERM: bounded as the visit queue is (1 s more at most), said at INFO, the
    reading put back at once: the next start links it to its visit."""
    from lastmile.clinic.observations import OBSERVATION_KIND, observation_payload
    from lastmile.visits.book import VisitBook
    from tests.fhir_samples import blood_pressure
    from tests.fhir_server import FhirTestServer

    data, config, journal = tmp_path / "data", tmp_path / "lastmile.toml", tmp_path / "forward.log"
    with FhirTestServer(token=FHIR_TOKEN) as platform:
        forward_toml(tmp_path, config, platform.base_url)
        with VisitBook.open(data, gateway_id="gw-1") as book:  # the doctor at P-2's home
            visit = book.start("P-2", doctor_id="DR-1", household_id="HH-1")
        with service_running(config, "forward", log=journal) as proc:
            wait_for(lambda: "forward ready after" in journal.read_text() or proc.poll() is not None, timeout=60)
            with write_locked(data / "visits.db"):
                reading = blood_pressure(dt.datetime.now(dt.timezone.utc), "P-2", "bp-at-home")
                with Outbox.open(data, min_free_bytes=0) as outbox:  # acquire storing the cuff's reading
                    outbox.add(OBSERVATION_KIND, reading.record_key, observation_payload(reading), meta={})
                took, _ = sigterm_once_a_write_waits(proc, "the link's write")
        out = stopped_promptly(proc, took, journal, "a reading's link to its visit")
        assert "stopping: 1 reading(s) relayed at the next start" in out, out[-3000:]

        with VisitBook.open(data, gateway_id="gw-1") as book:  # the next start links it to the open visit
            run_until(
                config,
                "forward",
                log=journal,
                until=lambda: book.visit_holding(reading.record_key) == visit.id,
                what="the reading linked to its visit",
            )
        with VisitBook.open(data, gateway_id="gw-1") as book:
            assert book.visit_holding(reading.record_key) == visit.id, journal.read_text()[-3000:]


def monitor_config(tmp_path: Path) -> Config:
    """A gateway reading one serial vital-signs monitor, "monitor", not plugged in."""
    from tests.serial_gateway import serial_config

    return serial_config(
        tmp_path, [{"name": "monitor", "match": str(tmp_path / "unplugged"), "profile": "example-vitals-monitor"}]
    )


def a_stop_loses_one_held_in_memory_only(config: Config, outbox: Outbox, bp_id: str) -> DeviceRecord | None:
    """A run of the serial part on `config` whose monitor's reading `bp_id`a is held in memory only
    (spill copy G); at its stop (another process holding clinic.db's lock, its row writes given up) a
    save works (G+1: `bp_id`a and b) and the third reading's does not: `bp_id`c is in memory only,
    lost with the gateway's memory. The monitor's row as it was with `bp_id`a held."""
    from lastmile.services.serial_devices import SerialService
    from lastmile.services.serial_spill import HEADER
    from tests.fhir_samples import blood_pressure

    stop = threading.Event()
    service = SerialService.open(config, outbox=outbox, stop=StopWaits(stop), watch_dirs=None, rescan_s=0.1)
    ctx, spec = service.ctx, service.specs[0]
    assert ctx.spill is not None
    at = ctx.now() - dt.timedelta(minutes=10)  # by the gateway's clock, right or not
    slot = ctx.spill.slot_bytes
    ctx.spill.slot_bytes = HEADER  # the slot full (as many waiting readings make it): in memory only
    ctx.hold_observation(spec, blood_pressure(at, None, bp_id + "a"))
    row = ctx.registry.get("serial:monitor")
    stop.set()  # the acquire service is stopping
    with write_locked(Path(config.data_dir) / "clinic.db"):
        ctx.spill.slot_bytes = slot
        ctx.hold_observation(spec, blood_pressure(at, None, bp_id + "b"))  # saved whole: both on disk
        ctx.spill.slot_bytes = HEADER
        ctx.hold_observation(spec, blood_pressure(at, None, bp_id + "c"))  # not saved: in memory only
        service.close()
    return row


def test_a_reading_held_in_memory_only_whose_row_write_the_stop_gave_up_is_said_lost_at_the_restart(
    tmp_path: Path,
) -> None:
    """lastmile/services/serial_devices.py _say_lost_at_stop: a row said "1 held in memory only"
    (spill copy G); at the stop (another process holding clinic.db's lock) a save worked (G+1, both
    readings) and a third reading's did not (in memory only), their row writes given up. The
    restart took the whole copy G+1, saved after the row's word, as covering all that waited: the
    third reading, lost with the gateway's memory, was never said lost. Now what a given-up row
    write carried while readings were in memory only is kept (an uploader.unwritten_records file)
    for the restart, which says it and forgets the file."""
    from lastmile.services.serial_devices import SerialService

    config = monitor_config(tmp_path)
    data = Path(config.data_dir)
    with contextlib.closing(Outbox.open(data, min_free_bytes=1 << 60)) as outbox:  # full: all held
        row = a_stop_loses_one_held_in_memory_only(config, outbox, "bp-")
        assert row is not None and row.in_memory_only == (1, 0), row
        left = sorted(p.name for p in data.iterdir())
        again = SerialService.open(config, outbox=outbox, watch_dirs=None, rescan_s=0.1)
        try:
            row = again.ctx.registry.get("serial:monitor")
            waiting = len(again.ctx.unstored["monitor"].observations)
        finally:
            again.close()
        after = sorted(p.name for p in data.iterdir())
    assert waiting == 2  # the spill file's whole copy
    assert row is not None and (row.lost_reading_count, row.lost_from_disk) == (1, (0, 0)), (row, left)
    assert "serial-rows-behind.jsonl" in left and "serial-rows-behind.jsonl" not in after, (left, after)


def test_a_stops_word_on_its_rows_read_by_many_starts_counts_the_loss_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serial-rows-behind.jsonl: each start that read it again (its removal failed - "no harm" -,
    a kill or power cut between saying the loss and removing it, another device's row write
    raising) added its loss again: the Devices page and `lastmile doctor` said "3 readings lost"
    for 1. Now the word carries its own id, kept on the row with its loss: read again, it is skipped."""
    from lastmile.services.serial_devices import SerialService
    from uploader.unwritten_records import UnwrittenRecords

    config = monitor_config(tmp_path)
    data = Path(config.data_dir)
    with contextlib.closing(Outbox.open(data, min_free_bytes=1 << 60)) as outbox:  # full: all held
        a_stop_loses_one_held_in_memory_only(config, outbox, "bp-")
        assert (data / "serial-rows-behind.jsonl").exists()

        def cannot(self: UnwrittenRecords) -> None:  # the file cannot be removed: each start reads it
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(UnwrittenRecords, "forget", cannot)
        counts = []
        for _ in range(3):
            again = SerialService.open(config, outbox=outbox, watch_dirs=None, rescan_s=0.1)
            try:
                row = again.ctx.registry.get("serial:monitor")
                assert row is not None
                counts.append(row.lost_reading_count)
            finally:
                again.close()
    assert counts == [1, 1, 1], counts


def test_a_clock_behind_at_boot_does_not_hide_the_next_stops_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REV-E 1: a Pi without RTC, offline, boots with its clock behind the last stop's. The
    rows-behind word was skipped when the row's loss was said at or after the word's time: start
    2 said stop 1's loss at stop 1's (later) time, so stop 2's word, made by the clock behind, was
    taken as applied by start 3 and its loss never said (the Devices page: 1 lost for 2). Now a
    word is skipped only by its id."""
    from lastmile.services.serial_devices import SerialContext, SerialService

    offset = [dt.timedelta(0)]
    init = SerialContext.__init__

    def skewed(self: SerialContext, *args: object, **kwargs: object) -> None:  # the Pi's clock
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.now = lambda: dt.datetime.now(dt.timezone.utc) + offset[0]

    monkeypatch.setattr(SerialContext, "__init__", skewed)
    config = monitor_config(tmp_path)
    data = Path(config.data_dir)
    with contextlib.closing(Outbox.open(data, min_free_bytes=1 << 60)) as outbox:  # full: all held
        a_stop_loses_one_held_in_memory_only(config, outbox, "bp-1")  # stop 1, the clock right
        offset[0] = -dt.timedelta(hours=5)  # boot 2: the clock 5 h behind
        # start 2 counts stop 1's loss; stop 2 loses another
        a_stop_loses_one_held_in_memory_only(config, outbox, "bp-2")
        offset[0] = -dt.timedelta(hours=5) + dt.timedelta(minutes=5)  # boot 3
        again = SerialService.open(config, outbox=outbox, watch_dirs=None, rescan_s=0.1)
        try:
            row = again.ctx.registry.get("serial:monitor")
        finally:
            again.close()
    assert row is not None
    assert row.lost_reading_count == 2  # one reading lost at each stop


def test_a_doctor_badge_scanned_at_a_stop_still_waits_for_clinic_db_lock(tmp_path: Path) -> None:
    """lastmile/services/serial_devices.py ScannerHandler: as a patient card's, a doctor's badge
    scanned as the service stops waits for clinic.db's lock past the stop's bound (`set_doctor`'s
    `wait_past_stop`): given up, the previous doctor would stay on the next readings after the restart."""
    from tests.service_harness import DOCTOR_BADGE_SCAN

    def before(patients: PatientContext, at: dt.datetime) -> None:
        patients.set_doctor("DR-BEFORE", now=at)

    with scanned_at_a_stop_under_clinic_db_lock(tmp_path, DOCTOR_BADGE_SCAN, before) as patients:
        wait_for(lambda: patients.current_doctor(dt.datetime.now(dt.timezone.utc)) != "DR-BEFORE")
        assert patients.current_doctor(dt.datetime.now(dt.timezone.utc)) == "004711"


def test_the_close_waits_for_a_card_still_waiting_for_clinic_db_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """lastmile/services/serial_devices.py SerialService.close: a card scanned at a stop waits
    SQLite's full 15 s busy timeout for clinic.db's lock (`wait_past_stop`), longer than the close
    waits for the links thread (10 s here; the acquire service's part: 15 s after the card's last
    poll began). The close then left the links and clinic.db to that busy turn and returned: the
    acquire service closed its outbox and exited, the links thread (a daemon) went with it inside
    the card's wait (REV-E 2), and after the restart the previous patient was still current - the
    next readings on him. Now the close waits for the turn up to the card's whole lock wait: when it
    returns (the process may end) the card is the session's, well within TimeoutStopSec=30."""
    from lastmile.services.serial_devices import SerialService
    from tests.serial_gateway import serial_config
    from tests.service_harness import PATIENT_CARD_SCAN

    scanner = PtyDevice(tmp_path / "usb-scanner")
    config = serial_config(tmp_path, [{"name": "desk-scanner", "match": str(scanner.link_path), "profile": "scanner"}])
    stop = threading.Event()
    released = threading.Event()
    with (
        contextlib.closing(Outbox.open(config.data_dir, min_free_bytes=0)) as outbox,
        contextlib.closing(PatientContext.open(config.data_dir, idle_timeout_s=900)) as patients,
        contextlib.closing(
            sqlite3.connect(config.data_dir / "clinic.db", isolation_level=None, check_same_thread=False)
        ) as other,
    ):
        service = SerialService.open(config, outbox=outbox, stop=StopWaits(stop), watch_dirs=None, rescan_s=0.1)
        before = set(threading.enumerate())
        service.start()
        links = next(t for t in threading.enumerate() if t.name == "serial-links" and t not in before)

        def release() -> None:  # once the close's wait for the thread is over, inside the card's
            other.rollback()
            released.set()

        freed = threading.Timer(12.0, release)  # 2 s after the close's 10 s, 3 s before the card's 15 s
        try:
            wait_for(lambda: all(s.connected for s in service.statuses()))
            patients.set_patient("P-BEFORE", now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1))
            stop.set()  # the acquire service is stopping
            other.execute("BEGIN IMMEDIATE")
            scanner.write(PATIENT_CARD_SCAN)
            time.sleep(1.0)  # the card's write waits for the lock
            freed.start()
            with caplog.at_level(logging.WARNING):
                started = time.monotonic()
                service.close()  # the thread's wait (10 s) is over before the card's (15 s)
                took = time.monotonic() - started
            # what the process leaves when it exits now, the links thread killed
            current = patients.current(dt.datetime.now(dt.timezone.utc))
            thread_alive = links.is_alive()
        finally:
            freed.cancel()
            if not released.is_set():
                other.rollback()
            links.join(timeout=30)
            service.close()
            scanner.unplug()
    print(f"\nthe close, a card waiting for clinic.db's lock: {took:.1f} s")
    assert current is not None and current.patient_id == "80276001234567890123", (current, took)
    assert released.is_set() and 10.5 < took < 30, took  # waited past the thread's join, within the unit's stop
    assert not thread_alive
    assert not any("still busy at shutdown" in rec.getMessage() for rec in caplog.records), caplog.text


def test_readings_waiting_for_space_whose_retry_the_stop_gave_up_are_said_lost_for_want_of_space(
    tmp_path: Path,
) -> None:
    """lastmile/services/serial_devices.py _held_cause: a reading waited for space in memory only;
    at the stop its last try (space freed, another process holding the outbox's lock) was given up,
    and the stop's cause replaced the space's: at the restart it was said lost as "taken just before
    the stop, nothing is broken" - the advice for the space (keep the gateway powered while readings
    wait for it) gone. Now the stop's cause does not replace the space's of readings already waiting."""
    from lastmile.services.serial_devices import SerialService
    from tests.fhir_samples import blood_pressure

    config = monitor_config(tmp_path)
    data = Path(config.data_dir)
    at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    stop = threading.Event()
    with contextlib.closing(Outbox.open(data, min_free_bytes=1 << 60)) as outbox:  # full: held for space
        service, ctx, spec = serial_part_whose_stop_gives_up_waits(config, outbox, stop)
        reading = blood_pressure(at, "P-1", "bp-1")  # its patient's: to the outbox, which is full
        assert not ctx.store_observation(spec, reading, held=True)  # as the monitor's handler does
        ctx.hold_observation(spec, reading)
        row = ctx.registry.get("serial:monitor")
        assert row is not None and row.in_memory_only == (1, 0) and row.held_cause == "", row
        outbox.min_free_bytes = 1  # space again, just as the acquire service stops
        stop.set()
        with write_locked(data / "outbox.sqlite"):
            service.close()  # its last try given up: another process holds the outbox's lock
        again = SerialService.open(config, outbox=outbox, watch_dirs=None, rescan_s=0.1)
        try:
            row = again.ctx.registry.get("serial:monitor")
        finally:
            again.close()
    assert row is not None and row.lost_from_memory == (1, 0), row
    assert (row.lost_cause, row.lost_at_stop) == ("", False), row


# -- a card whose check-in the stop gave up: said on Today at the next start ---------------------------


def card_given_up_at_a_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scan: bytes, *, finished: bool, real_margin: bool = False
) -> tuple[Config, list[dict], list[str]]:
    """A real card scanner on a pty; the acquire service stops with the doctor's previous patient
    (doctor) current, another process holding clinic.db's lock as the card is scanned; the close
    gives up the card's busy turn (its wait for the turn cut to ~4 s here: the card's own lock wait
    is 15 s). `finished`: the lock is freed once the close has returned and the card's check-in goes
    through before the process would exit; else it is held past the card's wait, whose write fails.
    `real_margin`: the production waits (the close's 1 + 15 + 2 s from the turn's start, past the
    card's own 15 s): the card's write fails first and the close finds the links idle.
    Returns the configuration, its devices and the names the close left in the data directory."""
    from lastmile.services import serial_devices
    from lastmile.services.serial_devices import SerialService
    from tests.serial_gateway import serial_config

    if not real_margin:
        monkeypatch.setattr(serial_devices, "TURN_WRITE_MARGIN_S", -12.0)  # the close waits 1 + 15 - 12 s
    scanner = PtyDevice(tmp_path / "usb-scanner")
    devices = [{"name": "desk-scanner", "match": str(scanner.link_path), "profile": "scanner"}]
    config = serial_config(tmp_path, devices)
    data = Path(config.data_dir)
    stop = threading.Event()
    with (
        contextlib.closing(Outbox.open(data, min_free_bytes=0)) as outbox,
        contextlib.closing(PatientContext.open(data, idle_timeout_s=900)) as patients,
        contextlib.closing(sqlite3.connect(data / "clinic.db", isolation_level=None, check_same_thread=False)) as other,
    ):
        service = SerialService.open(config, outbox=outbox, stop=StopWaits(stop), watch_dirs=None, rescan_s=0.1)
        before = set(threading.enumerate())
        service.start()
        links = next(t for t in threading.enumerate() if t.name == "serial-links" and t not in before)
        try:
            wait_for(lambda: all(s.connected for s in service.statuses()))
            earlier = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
            patients.set_patient("P-BEFORE", now=earlier)
            patients.set_doctor("DR-BEFORE", now=earlier)
            stop.set()  # the acquire service is stopping
            other.execute("BEGIN IMMEDIATE")
            scanner.write(scan)
            time.sleep(1.0)  # the card's write waits for the lock
            service.close()  # gives the busy turn up
            left = sorted(p.name for p in data.iterdir())
            if finished:
                other.rollback()  # the card's write goes through before the process exits
            links.join(timeout=30)  # finished, or its write failed (database is locked) past its wait
        finally:
            if other.in_transaction:
                other.rollback()
            links.join(timeout=30)
            scanner.unplug()
        now = dt.datetime.now(dt.timezone.utc)
        current = patients.current(now)
        checked_in = (current.patient_id if current else "", patients.current_doctor(now))
        assert (checked_in == ("P-BEFORE", "DR-BEFORE")) is not finished, checked_in  # the card's write, or none
    return config, devices, left


def started_again(config: Config) -> None:
    """The acquire service's serial part started again (what it finds at start is written), and closed."""
    from lastmile.services.serial_devices import SerialService

    with contextlib.closing(Outbox.open(config.data_dir, min_free_bytes=0)) as outbox:
        SerialService.open(config, outbox=outbox, watch_dirs=None, rescan_s=0.1).close()


def console_page(config: Config, devices: list[dict], path: str = "/today") -> str:
    """A console page (zh-CN; Today unless `path` says), the scanner configured as the acquire service has it."""
    import html

    from tests.console_harness import DOCTOR, Client, console_config, running_console

    console = console_config(Path(config.data_dir))
    console.serial.devices = devices
    with running_console(console) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        return html.unescape(client.get(path).body)


def test_a_patient_card_the_stop_gave_up_and_never_checked_in_is_said_on_today_after_the_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lastmile/services/serial_devices.py SerialService.close: past a card's whole wait for
    clinic.db's lock the stop gives its busy turn up; it only said "may not be checked in: scan it
    again" in the journal, which the village doctor never reads: after the restart the previous
    patient was still current, and the next readings went on him, unsaid. Now the card (ID, scanner,
    time, time source) is kept for the next start (serial-cards-given-up.jsonl), which finds it not
    checked in and says it on Today for a week - once, however many starts read the file."""
    from tests.service_harness import PATIENT_CARD_SCAN

    config, devices, left = card_given_up_at_a_stop(tmp_path, monkeypatch, PATIENT_CARD_SCAN, finished=False)
    data = Path(config.data_dir)
    assert "serial-cards-given-up.jsonl" in left, left
    kept = (data / "serial-cards-given-up.jsonl").read_bytes()
    started_again(config)
    assert not (data / "serial-cards-given-up.jsonl").exists()
    registry = DeviceRegistry.open(data)
    try:
        row = registry.get("serial:desk-scanner")
        assert row is not None and (row.card_kind, row.card_id) == ("patient", "80276001234567890123"), row
        assert row.card_time_source == "gateway-receipt" and row.card_said_until(dt.datetime.now(dt.timezone.utc))
        # its removal failed (or the start died first): a start that reads it again says nothing anew
        (data / "serial-cards-given-up.jsonl").write_bytes(kept)
        started_again(config)
        again = registry.get("serial:desk-scanner")
    finally:
        registry.close()
    assert again is not None and again.card_found_at == row.card_found_at, (row, again)
    page = console_page(config, devices)
    assert "网关停机时扫描的病人卡（ID 80276001234567890123，" in page, page
    assert "没有登记上。如病人仍在，请再扫一次卡。" in page, page
    # and on Devices, in a paragraph of its own under the scanner
    page = console_page(config, devices, "/devices")
    assert (
        '<p><span class="warn lost card-not-checked-in" data-card="patient">网关停机时扫描的病人卡（ID 80276001234567890123，'
        in page
    ), page


def today_after_a_stop_gave_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scan: bytes, *, real_margin: bool = False
) -> tuple[list[dict], str]:
    """`scan` given up at a stop (card_given_up_at_a_stop, its write never through), kept by the
    close; the acquire service started again. Its devices and the Today page then."""
    config, devices, left = card_given_up_at_a_stop(
        tmp_path, monkeypatch, scan, finished=False, real_margin=real_margin
    )
    assert "serial-cards-given-up.jsonl" in left, left
    started_again(config)
    return devices, console_page(config, devices)


def test_a_card_whose_own_lock_wait_ends_before_the_close_gives_up_is_kept_with_the_real_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the production waits the card's write (SQLite's 15 s busy timeout) fails before the
    close's wait for the turn ends (turn start + 1 + 15 + 2 s): its `finally` cleared the card in
    hand, the close got the turn back and kept nothing - after the restart the previous patient
    was current, Today said nothing, the journal only "handler failed on data". Now a card whose
    write fails once the stop is set is kept, and the close saves it with the links idle too."""
    from tests.service_harness import PATIENT_CARD_SCAN

    _devices, page = today_after_a_stop_gave_up(tmp_path, monkeypatch, PATIENT_CARD_SCAN, real_margin=True)
    assert "网关停机时扫描的病人卡（ID 80276001234567890123，" in page, page
    assert "没有登记上。如病人仍在，请再扫一次卡。" in page, page


def test_a_doctor_badge_the_stop_gave_up_and_never_taken_is_said_on_today_after_the_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a patient card's: a doctor's badge whose write the stop gave up left the previous doctor
    on the next readings after the restart, said only in the journal. Now Today says it, in the
    doctor's words, until the badge is scanned again."""
    from tests.service_harness import DOCTOR_BADGE_SCAN

    devices, page = today_after_a_stop_gave_up(tmp_path, monkeypatch, DOCTOR_BADGE_SCAN)
    assert "网关停机时扫描的医生工牌（004711，" in page, page
    assert "值班医生没有改。如该医生在值班，请再扫一次工牌。" in page, page
    scanner = PtyDevice(tmp_path / "usb-scanner")  # plugged in again
    gateway = Running(tmp_path, devices)
    try:  # the doctor scans the badge again: said no more
        wait_for(lambda: all(s.connected for s in gateway.service.statuses()))
        scanner.write(DOCTOR_BADGE_SCAN)
        wait_for(lambda: (r := gateway.registry.get("serial:desk-scanner")) is not None and not r.card_kind)
        assert gateway.patients.current_doctor(gateway.now()) == "004711"
    finally:
        gateway.close()
        scanner.unplug()


def test_a_card_the_stop_gave_up_that_was_checked_in_before_the_exit_is_forgotten_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The close cannot know whether the card it gave up is written before the process exits: it
    keeps it all the same. The next start finds its check-in in clinic.db (the session log's line
    at its time) and forgets it with a word at INFO: Today says nothing."""
    from tests.service_harness import PATIENT_CARD_SCAN

    config, devices, left = card_given_up_at_a_stop(tmp_path, monkeypatch, PATIENT_CARD_SCAN, finished=True)
    data = Path(config.data_dir)
    assert "serial-cards-given-up.jsonl" in left, left
    with caplog.at_level(logging.INFO, logger="lastmile.services.serial_devices"):
        started_again(config)
    assert not (data / "serial-cards-given-up.jsonl").exists()
    assert any("was checked in before it exited" in r.getMessage() for r in caplog.records), caplog.text
    registry = DeviceRegistry.open(data)
    try:
        row = registry.get("serial:desk-scanner")
    finally:
        registry.close()
    assert row is not None and row.card_kind == "" and row.card_found_at is None, row
    page = console_page(config, devices)
    # nothing of a card not checked in; the card's check-in itself ended P-BEFORE's, and says so
    assert "网关停机时扫描的" not in page and "没有登记上" not in page, page
    assert "P-BEFORE 的就诊已结束" in page, page


def test_a_card_notice_ends_at_the_next_check_in_of_its_kind_or_the_sessions_idle_end(tmp_path: Path) -> None:
    """lastmile/clinic/devices.py card notice: only the same card scanned again on the same scanner
    cleared it; for a week Today kept telling the doctor to scan the old card again - after he had
    typed the patient in, or scanned the next patient's card - and a doctor scanning it only to clear
    the warning made that patient current over the real one. Now any check-in of its kind (typed or
    scanned, on any scanner) ends it, and the session's idle end ends both kinds."""
    from lastmile.clinic.devices import CARD_DOCTOR, CARD_PATIENT

    data = tmp_path / "data"
    data.mkdir()
    scanned = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    found = scanned + dt.timedelta(minutes=30)

    def notices(registry: DeviceRegistry) -> dict[str, str]:
        rows = {a: registry.get(a) for a in ("serial:desk-scanner", "serial:door-scanner")}
        return {a: r.card_kind for a, r in rows.items() if r is not None and r.card_said_until(found)}

    with (
        contextlib.closing(DeviceRegistry.open(data)) as registry,
        contextlib.closing(PatientContext.open(data, idle_timeout_s=900)) as patients,
    ):

        def said_again() -> None:  # a restart found both not checked in (as `settle_cards_at_start`)
            for address, kind, card_id in (
                ("serial:desk-scanner", CARD_PATIENT, "P-NOT-IN"),
                ("serial:door-scanner", CARD_DOCTOR, "DR-NOT-IN"),
            ):
                registry.card_not_checked_in(
                    address, kind, card_id, scanned_at=scanned, time_source="gateway-receipt", word_id="w", now=found
                )

        said_again()
        assert notices(registry) == {"serial:desk-scanner": "patient", "serial:door-scanner": "doctor"}
        patients.check_in("P-TYPED", "张三", now=found + dt.timedelta(minutes=1))  # typed on Today
        assert notices(registry) == {"serial:door-scanner": "doctor"}
        patients.set_doctor("DR-OTHER", now=found + dt.timedelta(minutes=2))  # another doctor's badge
        assert notices(registry) == {}
        said_again()
        patients.touch(now=found + dt.timedelta(hours=1))  # the session ended, idle: nobody left current
        assert notices(registry) == {}


def test_a_card_checked_in_before_the_exit_is_found_done_after_a_stop_longer_than_the_session_logs_day(
    tmp_path: Path,
) -> None:
    """lastmile/clinic/patients.py scan_written looked only for the check-in's own session log line,
    which a write more than NAME_KEPT (24 h) later prunes: after a weekend off, a card the stopping
    process did check in was found not done, and Today said "not checked in" for a week. Now a later
    line naming the ID (its session's idle end) or the session row (its patient set at or after the
    scan, or the one scanned) says it too; a card never written is still found not done."""
    data = tmp_path / "data"
    data.mkdir()
    scanned = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    at = iso(scanned)
    weekend = scanned + dt.timedelta(hours=50)
    with contextlib.closing(PatientContext.open(data, idle_timeout_s=900)) as patients:
        patients.set_patient("P-BEFORE", now=scanned - dt.timedelta(minutes=1))
        patients.set_patient("P-CARD", now=scanned)  # the card the stopping process finished
        patients.set_doctor("DR-BADGE", now=scanned)
        patients.touch(now=weekend)  # the session ended idle, the log of Friday pruned
        assert all(h["at"] != at for h in patients.history(50))  # the check-in's own line is gone
        assert patients.scan_written(patient_id="P-CARD", at=at)
        assert patients.scan_written(doctor_id="DR-BADGE", at=at)
        assert not patients.scan_written(patient_id="P-NEVER", at=at)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with contextlib.closing(PatientContext.open(fresh, idle_timeout_s=900)) as patients:
        patients.set_patient("P-BEFORE", now=scanned - dt.timedelta(minutes=1))  # the card never written
        patients.set_patient("P-MONDAY", now=weekend)  # typed on Monday: a later check-in, the log pruned
        assert patients.scan_written(patient_id="P-CARD", at=at)
        assert not patients.scan_written(doctor_id="DR-BADGE", at=at)  # no doctor since
