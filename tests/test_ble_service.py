"""`lastmile ble run` (lastmile-ble.service): the BLE link in a process of its own.

- With BLE disabled: a real child process under a stand-in notify socket is READY, idle, says why
  in STATUS=, opens no database, loads no BLE stack, reloads and stops cleanly.
- The service's work: the same `BleService` the command runs, driven by the real `ServiceRuntime`,
  with bumble's emulated radio in place of BlueZ under the real bleak API: started idle (BLE
  disabled), a reload enabling BLE starts the link, and a paired thermometer's reading lands in
  clinic.db as the acquire service's BLE part did.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from lastmile.config import Config, load_config
from lastmile.services.runtime import EXIT_OK, ServiceRuntime
from lastmile.services.sdnotify import SystemdNotifier
from tests.conftest import REPO, missing
from tests.service_harness import Manager, waiting_in_a_sleep
from tests.waiting import wait_for

THERMO = "C0:00:00:00:25:02"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify.sock")
    yield m
    m.sock.close()


def write_config(path: Path, data_dir: Path, *, ble: bool) -> Path:
    path.write_text(
        f'[gateway]\ndata_dir = "{data_dir}"\n[gps]\nsource = "none"\n'
        f"[ble]\nenabled = {'true' if ble else 'false'}\nscan_interval_s = 0.5\n"
    )
    return path


@contextlib.contextmanager
def ble_running(
    config: Path, manager: Manager, *, argv: list[str] | None = None, **env: str
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """`lastmile ble run` as systemd starts it (notify socket, 2 s watchdog); its output is in the
    list once the block ends (killed if the block left it running). `argv`: the command, if not
    `lastmile ble run` itself (`ble_run_on_an_emulated_radio`)."""
    env = {**os.environ, "NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "2000000", "PYTHONPATH": str(REPO), **env}
    proc = subprocess.Popen(
        argv or [sys.executable, "-m", "lastmile", "-c", str(config), "ble", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        yield proc, output
    finally:
        if proc.poll() is None:
            proc.kill()
        output.append(proc.communicate(timeout=30)[0])


def test_ble_run_with_ble_disabled_is_ready_idle_and_says_why(tmp_path: Path, manager: Manager) -> None:
    config = write_config(tmp_path / "lastmile.toml", tmp_path / "data", ble=False)
    with ble_running(config, manager) as (proc, output):
        msgs = manager.wait_for("READY=1", timeout=60)
        ready = next(m for m in msgs if "READY=1" in m.split("\n"))
        assert f"STATUS=BLE not enabled ([ble] enabled = false in {config})" in ready
        manager.wait_for("WATCHDOG=1")  # idle, and still fed: systemd sees a healthy unit
        proc.send_signal(signal.SIGHUP)  # reloaded, still disabled: the same idle process
        manager.wait_for("RELOADING=1")
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "dbus_fast" not in maps  # none of the BLE stack (dbus-fast's compiled modules) loaded
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == EXIT_OK
    out = output[0]
    assert "BLE not enabled" in out and "ble stopped" in out
    assert not (tmp_path / "data").exists()  # idle: no outbox, no clinic.db


def test_ble_run_without_a_usable_radio_stays_up_says_why_and_keeps_the_journal_quiet(
    tmp_path: Path, manager: Manager
) -> None:
    """BLE enabled and a device paired, but no Bluetooth (here: no system D-Bus at all, as with
    BlueZ down or the adapter missing). The service must not restart over it: restarts would
    look like a crash to systemd, and a freshly updated gateway with a flaky adapter would be
    rolled back (the mark-good unit requires lastmile-ble). It stays READY, its watchdog fed,
    says what is wrong in STATUS=, and logs the fault once, not once per retry."""
    from lastmile.cli import main as lastmile_main

    config = write_config(tmp_path / "lastmile.toml", tmp_path / "data", ble=True)
    assert lastmile_main(["-c", str(config), "ble", "pair", THERMO]) == 0
    no_bus = f"unix:path={tmp_path / 'no-system-bus'}"
    with ble_running(config, manager, DBUS_SYSTEM_BUS_ADDRESS=no_bus) as (proc, output):
        manager.wait_for("READY=1", timeout=60)
        # all messages so far: READY=1's own STATUS= may already carry it
        said = wait_for(
            lambda: manager.drain(0.5) is None or [m for m in manager.messages if "Bluetooth radio not usable" in m],
            60,
            what="STATUS= with the radio's fault",
            interval=0.1,
        )
        assert "ble up; Bluetooth radio not usable: FileNotFoundError" in said[0]
        assert "(the system D-Bus or BlueZ is not running)" in said[0]
        pings: list[str] = []
        wait_for(
            lambda: pings.extend(m for m in manager.drain(0.5) if "WATCHDOG=1" in m.split("\n")) or len(pings) >= 3,
            60,
            what="three watchdog pings after the fault",
            interval=0.1,
        )
        assert proc.poll() is None  # still the same process: not restarted over the radio
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == EXIT_OK
    out = output[0]
    assert out.count("Bluetooth radio not usable") == 1, out  # retried several times, logged once
    assert "ble stopped" in out


@contextlib.asynccontextmanager
async def emulated_thermometer(reading_c: float) -> AsyncIterator[tuple[Any, Any]]:
    """bumble's radio with a thermometer holding one reading, in place of BlueZ (same event loop
    as the link: the BLE service enters this on its own)."""
    from firmware_bridge.ble.emulated_peripherals import TemperatureRecord, Thermometer
    from firmware_bridge.ble.emulation import EmulatedRadio

    radio = EmulatedRadio()
    thermometer = Thermometer(
        radio, THERMO, "Service Thermometer", tz=dt.timezone.utc, memory=[TemperatureRecord(reading_c, None)]
    )
    await radio.start()
    await thermometer.start()
    try:
        yield radio.backends()
    finally:
        await thermometer.stop()
        await radio.close()


def test_the_ble_service_records_a_paired_device_after_a_reload_enables_ble(tmp_path: Path, manager: Manager) -> None:
    if importlib.util.find_spec("bumble") is None:
        missing("bumble (the emulation extra) is not installed")
    from lastmile.clinic.devices import DeviceRegistry
    from lastmile.clinic.observations import ObservationStore
    from lastmile.services.ble_service import BleService
    from uploader.outbox import Outbox

    data = tmp_path / "data"
    path = write_config(tmp_path / "lastmile.toml", data, ble=False)
    configs: list[Config] = [load_config(path)]
    runtime = ServiceRuntime(
        "ble",
        load_config=lambda: configs[-1],
        notifier=SystemdNotifier(environ={"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "4000000"}),
        install_signal_handlers=False,
        configure_logging=False,
    )
    services: list[BleService] = []

    def setup(config: Config) -> BleService:
        services.append(BleService.start(config, radio=lambda: emulated_thermometer(37.4)))
        return services[-1]

    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(runtime.run(setup)), name="ble-service")
    thread.start()
    try:
        ready = manager.wait_for("READY=1", timeout=60)
        assert any("STATUS=BLE not enabled" in m for m in ready) and not data.exists()

        data.mkdir()
        registry = DeviceRegistry.open(data)  # `lastmile ble pair`
        registry.allow(THERMO, name="room 1", now=dt.datetime.now(dt.timezone.utc))
        registry.close()
        configs.append(load_config(write_config(path, data, ble=True)))
        runtime.request_reload()  # `systemctl reload lastmile-ble`
        manager.wait_for("STATUS=ble up", timeout=60)

        def last_reading() -> str | None:
            registry = DeviceRegistry.open(data)
            try:
                record = registry.get(THERMO)
                return record.last_reading if record else None
            finally:
                registry.close()

        assert "37.4" in wait_for(last_reading, 60, what="the thermometer's reading", interval=0.1)
        assert services[0].part is not None and services[0].part.status() == "ble up"
    finally:
        runtime.request_stop()
        thread.join(timeout=60)
    assert codes == [EXIT_OK] and len(services) == 1  # reloaded in place, never rebuilt or restarted
    outbox = Outbox.open(data, min_free_bytes=0)
    store = ObservationStore.open(data, outbox=outbox, idle_timeout_s=7200)
    try:
        (held,) = store.held()  # no current patient: held for the doctor, never guessed
        quantity = held.observation.quantities[0]
        assert (held.observation.kind, quantity.value, quantity.unit) == ("body-temperature", 37.4, "Cel")
        assert held.observation.device.address == THERMO
    finally:
        store.close()
        outbox.close()


# `lastmile ble run` (lastmile.cli.main: its runtime, BleService, run_ble, the link, ClinicBlePort)
# with bumble's radio in place of BlueZ, and on it a thermometer powered on once the file
# argv[4] exists: it then indicates one reading as it connects (stamped "now" on its clock) -
# nothing the gateway could read again from a device memory (no RACP), as a live reading.
BLE_RUN_ON_AN_EMULATED_RADIO = """
import asyncio, contextlib, datetime as dt, sys
from pathlib import Path
from firmware_bridge.ble.emulated_peripherals import TemperatureRecord, Thermometer
from firmware_bridge.ble.emulation import EmulatedRadio
from lastmile.cli import main
from lastmile.services import ble_service

config, address, celsius, power_on = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])

@contextlib.asynccontextmanager
async def radio():
    radio = EmulatedRadio()
    thermometer = Thermometer(
        radio, address, "Service Thermometer", tz=dt.timezone.utc, memory=[TemperatureRecord(celsius, None)]
    )
    await radio.start()

    async def power_on_when_asked():
        while not power_on.exists():
            await asyncio.sleep(0.05)
        await thermometer.start()
        return True

    powered = asyncio.ensure_future(power_on_when_asked())
    try:
        yield radio.backends()
    finally:
        powered.cancel()
        if powered.done() and not powered.cancelled():
            await thermometer.stop()
        await radio.close()

built = ble_service.ble_part  # looked up by BleService when it builds its link
ble_service.ble_part = lambda config, outbox, **kw: built(config, outbox, **{**kw, "radio": radio})
sys.exit(main(["-c", config, "ble", "run"]))
"""
LOCK_HELD_AFTER_SIGTERM_S = 3.0  # past the 1 s a stop gave a waiting write (Outbox.give_up_waits_on)
TIMEOUT_STOP_S = 30.0  # lastmile-ble.service's TimeoutStopSec


@contextlib.contextmanager
def a_reading_waiting_for_the_outbox_lock(
    tmp_path: Path, manager: Manager, script: str
) -> Iterator[tuple[subprocess.Popen[str], list[str], sqlite3.Connection]]:
    """A thermometer paired (THERMO), P-9 checked in (the reading is his: the outbox's), the BLE
    service run by `script` on an emulated radio; another process holds the outbox's write lock
    (`other`) as the thermometer, powered on, sends 37.6: its store sleeps in SQLite's busy wait
    for the lock. The process, its output (once the block ends) and the lock's connection."""
    if importlib.util.find_spec("bumble") is None:
        missing("bumble (the emulation extra) is not installed")
    from lastmile.cli import main as lastmile_main
    from lastmile.clinic.devices import DeviceRegistry
    from lastmile.clinic.patients import PatientContext

    data = tmp_path / "data"
    config = write_config(tmp_path / "lastmile.toml", data, ble=True)
    assert lastmile_main(["-c", str(config), "ble", "pair", THERMO]) == 0
    with contextlib.closing(PatientContext.open(data, idle_timeout_s=900)) as patients:
        patients.set_patient("P-9", now=dt.datetime.now(dt.timezone.utc))
    power_on = tmp_path / "thermometer-on"
    argv = [sys.executable, "-c", script, str(config), THERMO, "37.6", str(power_on)]

    def connected() -> bool:
        with contextlib.closing(DeviceRegistry.open(data)) as registry:
            record = registry.get(THERMO)
            return record is not None and record.connected

    with ble_running(config, manager, argv=argv) as (proc, output):
        manager.wait_for("READY=1", timeout=60)
        with contextlib.closing(sqlite3.connect(data / "outbox.sqlite", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            power_on.touch()
            wait_for(lambda: connected() and waiting_in_a_sleep(proc.pid), 60, what="the reading waiting for the lock")
            yield proc, output, other


def test_a_live_reading_waiting_for_another_process_lock_at_sigterm_is_stored_once_the_lock_is_released(
    tmp_path: Path, manager: Manager
) -> None:
    """lastmile/services/ble_service.py: another process holds the outbox's write lock (the
    forwarder in a long write, a sqlite3 shell left open) as a thermometer's reading arrives, and
    lastmile-ble is stopped (SIGTERM: an update, a reboot). The stop gave the waiting write up
    within a second, as acquire's: acquire keeps such a reading in its spill file, BLE has none,
    and a reading no device memory holds again was lost, said only in the device list's error.
    Now the BLE service's store keeps SQLite's 15 s wait: stored, once, when the lock is released,
    the stop within TimeoutStopSec."""
    from lastmile.clinic.observations import OBSERVATION_KIND
    from uploader.outbox import Outbox

    data = tmp_path / "data"
    with a_reading_waiting_for_the_outbox_lock(tmp_path, manager, BLE_RUN_ON_AN_EMULATED_RADIO) as (
        proc,
        output,
        other,
    ):
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(LOCK_HELD_AFTER_SIGTERM_S)
        other.rollback()
        code = proc.wait(timeout=TIMEOUT_STOP_S)
        took = time.monotonic() - signalled
    out = output[0]
    print(f"\nSIGTERM to exit, the lock released after {LOCK_HELD_AFTER_SIGTERM_S:g} s: {took:.1f} s")
    with contextlib.closing(Outbox.open(data, min_free_bytes=0)) as outbox:
        items = outbox.items(kind=OBSERVATION_KIND)
        assert len(items) == 1, out  # stored, once
        assert items[0].patient is not None and items[0].patient["patient_id"] == "P-9"
        assert b"37.6" in outbox.read_payload(items[0])
    assert code == EXIT_OK and "Traceback" not in out and "database is locked" not in out, out
    assert took < TIMEOUT_STOP_S


# The same, the link's stop made short (the service's 24 s): what a stop past it does.
BLE_RUN_WITH_A_SHORT_STOP = BLE_RUN_ON_AN_EMULATED_RADIO.replace(
    "sys.exit(main(", "ble_service.PARTS_STOP_S = 1.0\nsys.exit(main("
)


def test_a_link_still_storing_past_the_stop_deadline_leaves_the_outbox_and_exits_cleanly(
    tmp_path: Path, manager: Manager
) -> None:
    """lastmile/services/ble_service.py BleService.close waited for the link with no deadline of its
    own (its join's 15 s, then the outbox's close waiting the link's store: a reading waiting 15 s
    for clinic.db's lock and 15 s for the outbox's went past TimeoutStopSec=30: SIGKILL), then
    closed the outbox whatever the link was doing. Now the link's stop is bounded (PARTS_STOP_S,
    short here) and a link still storing at the end keeps the outbox: it is not closed under it
    (closing a sqlite3 connection under another thread's statement crashes the process), the
    process exits cleanly, the reading in hand rolled back whole and said (take it again), the
    outbox sound."""
    from lastmile.clinic.observations import OBSERVATION_KIND
    from uploader.outbox import Outbox

    data = tmp_path / "data"
    with a_reading_waiting_for_the_outbox_lock(tmp_path, manager, BLE_RUN_WITH_A_SHORT_STOP) as (proc, output, other):
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.wait(timeout=TIMEOUT_STOP_S)  # the lock still held: past the stop's deadline
        took = time.monotonic() - signalled
        other.rollback()
    out = output[0]
    print(f"\nSIGTERM to exit, the link storing past a 1 s deadline: {took:.1f} s")
    assert code == EXIT_OK and "Traceback" not in out and "Fatal Python error" not in out, (code, out)
    assert took < 5, (took, out)  # the deadline, not the link's store (15 s)
    assert "ble: still closing" in out and "take it again" in out, out
    assert "the outbox left open to it" in out, out
    with contextlib.closing(sqlite3.connect(data / "outbox.sqlite")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with contextlib.closing(Outbox.open(data, min_free_bytes=0)) as outbox:
        assert outbox.items(kind=OBSERVATION_KIND) == []  # rolled back whole, as said: nothing half-written


def test_a_link_a_reload_left_still_storing_is_let_go_once_it_has_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """lastmile/services/ble_service.py: a reload whose old link is still storing past the stop's
    deadline (a reading waiting for another process's lock) keeps it, so the outbox is not closed
    under it; but the service then held on to it for as long as the process ran, long after it had
    finished: one more link after each such reload (acquire lets its go). Now its step lets a
    finished one go, said in the journal, and keeps one still storing."""
    import gc
    import logging
    import weakref

    from lastmile.services import ble_service
    from lastmile.services.parts import WorkerPart

    monkeypatch.setattr(ble_service, "PARTS_STOP_S", 0.3)  # the service's 24 s, made short
    config = load_config(write_config(tmp_path / "lastmile.toml", tmp_path / "data", ble=False))
    service = ble_service.BleService(config)
    released = threading.Event()

    def storing(stop: threading.Event, beat: object) -> None:
        released.wait(30)  # a store waiting for another process's write lock: it does not hear the stop

    link = WorkerPart("ble", storing, stale_after=None)
    link.check(time.monotonic())  # its thread started
    service.part = link
    left = weakref.ref(link)
    del link
    stop = threading.Event()
    try:
        service.reload(config)  # the link still storing past the deadline: left to finish on its own
        service.step(stop)
        gc.collect()
        assert left() is not None and not left().finished()  # type: ignore[union-attr]
        released.set()
        wait_for(lambda: (part := left()) is not None and part.finished())
        wait_for(lambda: not [t for t in threading.enumerate() if t.name in ("close-ble", "part-ble")])
        with caplog.at_level(logging.INFO, logger="lastmile.services.parts"):
            service.step(stop)
        gc.collect()
        assert left() is None, "a link a reload left is kept after it finished"
        assert "ble: the link a reload left has finished" in caplog.text, caplog.text
    finally:
        released.set()
        service.close()
