"""Faults on the acquisition path, found by review (2026-12-05): a USB stick whose import failed
once was never looked at again; a file still being copied was imported, then again when whole;
readings and a bridge ECG not yet stored were dropped with their handler at an unplug; a report
ended by silence was stamped at the flush, on the next patient. Each test failed on the code
before its fix."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest

from lastmile.config import Config
from lastmile.ecg.intake import usb_import_watcher
from tests.conftest import shared_file
from tests.serial_gateway import Running, talk_as_bridge
from uploader.errors import OutboxFullError
from uploader.outbox import Outbox


def _watched(tmp_path: Path) -> tuple[Config, Path]:
    folder = tmp_path / "stick"
    folder.mkdir()
    config = Config()
    config.gateway.data_dir = str(tmp_path / "data")
    config.usb_import.folders = [str(folder)]
    return config, folder


# -- USB folder watcher ------------------------------------------------------------------------


def test_usb_watcher_imports_the_stick_once_the_outbox_has_room_again(tmp_path: Path) -> None:
    """firmware_bridge/usb_import.py FolderWatcher.poll: the folder's signature is remembered
    *before* the import runs. The outbox refuses an item ("storage full ... This one was not
    stored: try again later"), the import raises, the part restarts - and the same watcher
    never looks at the stick again because its signature has not changed. Once the forwarder
    has freed space, the ECGs on the stick are never imported: lost unless someone re-plugs."""
    config, folder = _watched(tmp_path)
    outbox = Outbox.open(config.data_dir, min_free_bytes=0)
    try:
        watcher = usb_import_watcher(config, outbox)
        shutil.copyfile(shared_file("ecg", "contec", "0000037.ECG"), folder / "a.ECG")
        shutil.copyfile(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"), folder / "b.scp")
        for name in ("a.ECG", "b.scp"):  # recorded before the stick came in: imported at the first poll
            os.utime(folder / name, (dt.datetime.now().timestamp() - 3600,) * 2)
        outbox.min_free_bytes = 1 << 60  # the data partition is full for now
        with pytest.raises(OutboxFullError):
            watcher.poll()  # the usb-import part fails; WorkerPart restarts work() on the same watcher
        outbox.min_free_bytes = 0  # the forwarder sent and purged: room again
        for _ in range(3):  # the part's next rounds (every 5 s)
            watcher.poll()
        assert len(outbox.items(kind="dicom")) == 2, "the stick's ECGs were never imported after the outbox had room"
    finally:
        outbox.close()


def test_usb_watcher_does_not_import_a_file_still_being_copied(tmp_path: Path) -> None:
    """A cart (or a technician) copies an ECG file into the watched folder; the 5-second poll
    sees the file half-written, decodes the part that is there (a Contec .ECG decodes from any
    whole number of sample blocks) and queues it; when the copy finishes the signature changes,
    the complete file has another SHA-256, and it is queued again. The reading center gets the
    one recording twice (once truncated) under two Study UIDs."""
    config, folder = _watched(tmp_path)
    data = shared_file("ecg", "contec", "0000037.ECG").read_bytes()
    outbox = Outbox.open(config.data_dir, min_free_bytes=0)
    try:
        watcher = usb_import_watcher(config, outbox)
        target = folder / "0000037.ECG"
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])  # the copy is under way ...
            f.flush()
            os.fsync(f.fileno())
            watcher.poll()  # ... when the watcher looks
            f.write(data[len(data) // 2 :])  # the copy completes
        os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 1_000_000))
        for _ in range(3):
            watcher.poll()
        items = outbox.items(kind="dicom")
        durations = sorted(i.meta["duration_s"] for i in items)
        assert len(items) == 1, f"one recording queued {len(items)} times (durations {durations} s)"
    finally:
        outbox.close()


# -- serial devices: what could not be stored while the device was connected -------------------


@pytest.fixture
def serial_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import lastmile.services.serial_devices as serial_devices

    monkeypatch.setattr(serial_devices, "RETRY_STORE_S", 0.2)  # retry in 0.2 s, not 30 s: a short test
    started: list[Running] = []

    def start(devices: list[dict], profiles_dir: str = "") -> Running:
        started.append(Running(tmp_path, devices, profiles_dir=profiles_dir))
        return started[-1]

    yield start
    for s in started:
        s.close()


def test_monitor_readings_not_yet_stored_survive_an_unplug(tmp_path: Path, serial_service) -> None:
    """lastmile/services/serial_devices.py AsciiReportHandler: readings the outbox refused are
    kept in the handler's `_unstored` list "the device cannot resend: retried from here". But
    the link manager throws the handler away on disconnect (connection_lost neither retries nor
    hands them on) and builds a new one on reconnect: a monitor's cable wiggled, or unplugged to
    move it, while storage was briefly unavailable, and the blood pressure, pulse and temperature
    it printed are gone - after the retry design promised to keep them."""
    from tests.serial_pty import PtyDevice
    from tests.service_harness import VITALS_REPORT
    from tests.waiting import wait_for

    link = tmp_path / "usb-monitor"
    monitor = PtyDevice(link)
    s = serial_service([{"name": "monitor", "match": str(link), "profile": "example-vitals-monitor"}])
    wait_for(lambda: s.service.statuses()[0].connected)
    s.patients.set_patient("P-9", now=s.now() - dt.timedelta(minutes=1))
    s.outbox.min_free_bytes = 1 << 60  # storage full for a moment
    printed = (s.now() + dt.timedelta(hours=1)).strftime("DATE %Y-%m-%d  TIME %H:%M:%S").encode()  # monitor: UTC+1
    monitor.write(VITALS_REPORT.replace(b"DATE 2025-03-04  TIME 09:41:07", printed))
    # its row is written just after the link says connected: under load, not yet at the first look
    wait_for(lambda: (row := s.registry.get("serial:monitor")) is not None and row.waits_for_space)
    monitor.unplug()
    wait_for(lambda: not s.registry.get("serial:monitor").connected)  # connection_lost has run
    s.outbox.min_free_bytes = 0  # room again
    monitor = PtyDevice(link)  # plugged back in
    wait_for(lambda: s.service.statuses()[0].connected)
    try:
        # the service retries what it holds every RETRY_STORE_S (0.2 s here): 3 once it has room;
        # dropped with the handler at the unplug, they never come (the wait times out)
        wait_for(lambda: len(s.outbox.items(kind="observation")) >= 3, timeout=20)
        assert len(s.outbox.items(kind="observation")) == 3  # once each
    finally:
        monitor.unplug()


def test_bridge_ecg_not_yet_stored_survives_an_unplug(tmp_path: Path, serial_service) -> None:
    """Same for a bridge's streamed ECG (BridgeHandler._unstored, "held in memory"): the stream
    cannot be resent, the handler holding it is dropped on disconnect, and the bridge's resent
    ECG_END then meets a new handler that NACKs it as "no such recording": the ECG is lost."""
    from firmware_bridge.bridge_simulator import EcgStreamSimulator
    from firmware_bridge.firmware.bridge_core import BridgeCore
    from tests.serial_pty import PtyDevice
    from tests.waiting import wait_for

    link = tmp_path / "usb-ecg"
    bridge = PtyDevice(link)
    s = serial_service([{"name": "ecg", "match": str(link), "profile": "bridge"}])
    core, clock = BridgeCore("BR-ECG", boot_id=9, capabilities=("ecg",)), [0]
    wait_for(lambda: s.service.statuses()[0].connected)

    talk_as_bridge(bridge, core, clock, lambda: core.gateway_seen and core.pending_count == 0)
    s.outbox.min_free_bytes = 1 << 60  # storage full for a moment
    sim = EcgStreamSimulator(core, recording_id=3)
    bridge.write(sim.start(clock[0]) + b"".join(sim.blocks(40)) + sim.end(40 * 25, clock[0]))
    wait_for(lambda: s.registry.get("serial:ecg").waits_for_space)
    bridge.unplug()
    wait_for(lambda: not s.registry.get("serial:ecg").connected)  # connection_lost (and its retry) has run
    s.outbox.min_free_bytes = 0  # room again
    bridge = PtyDevice(link)
    wait_for(lambda: s.service.statuses()[0].connected)
    try:
        talk_as_bridge(bridge, core, clock, lambda: core.pending_count == 0)  # HELLO again, ECG_END resent and answered
    finally:
        bridge.unplug()
    assert s.outbox.find("bridge-ecg:BR-ECG:9:3") is not None, "the streamed ECG was lost with the dropped handler"


def test_a_report_finished_by_silence_stays_with_the_patient_it_arrived_for(tmp_path: Path, serial_service) -> None:
    """devices/ascii_report.py ReportParser.flush / parse_report: a monitor whose profile has no
    [time] table and no end line (a blank line or silence ends a report - both documented in the
    example profile) gets TimeSource.GATEWAY_RECEIPT with received_at = the moment the report is
    *completed*. Without a blank line that is the idle flush, ASCII_IDLE_FLUSH_S (5 s) after the
    last byte. The nurse scans the next patient's card in those seconds, and the previous
    patient's blood pressure is recorded on the new patient: measured_at (the flush) is after
    the new session began, so ObservationStore.record takes it as theirs."""
    import json

    from lastmile.clinic.observations import ObservationStore
    from tests.serial_pty import PtyDevice
    from tests.service_harness import VITALS_REPORT
    from tests.waiting import wait_for

    example = (Path(__file__).parents[1] / "firmware_bridge" / "profiles" / "example-vitals-monitor.toml").read_text(
        encoding="utf-8"
    )
    quiet = example.replace('name = "example-vitals-monitor"', 'name = "quiet-monitor"')
    quiet = "\n".join(
        line
        for line in quiet.splitlines()
        if not line.startswith(("end =", "[time]", "pattern = '^DATE", "format =", "utc_offset_minutes"))
    )
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "quiet-monitor.toml").write_text(quiet, encoding="utf-8")
    link = tmp_path / "usb-monitor"
    monitor = PtyDevice(link)
    s = serial_service([{"name": "monitor", "match": str(link), "profile": "quiet-monitor"}], str(profiles))
    wait_for(lambda: s.service.statuses()[0].connected)
    s.patients.set_patient("P-FIRST", now=s.now() - dt.timedelta(minutes=2))
    report = VITALS_REPORT.replace(b"===== END =====\r\n", b"")  # ends with its last field, then silence
    monitor.write(report)
    wait_for(lambda: s.service.statuses()[0].bytes_in >= len(report))  # arrived during P-FIRST's session
    s.patients.set_patient("P-NEXT", now=s.now())  # the next patient's card, a second later
    # Stored means in the outbox or held unassigned: a reading from before the current session
    # is held for the doctor (lastmile/clinic/observations.py), never given to the new patient.
    store = ObservationStore.open(s.config.data_dir, outbox=s.outbox, idle_timeout_s=900)
    try:
        wait_for(lambda: len(s.outbox.items(kind="observation")) + len(store.held()) == 3, timeout=10)
    finally:
        monitor.unplug()
        store.close()
    owners = {json.loads(s.outbox.read_payload(i))["patient_id"] for i in s.outbox.items(kind="observation")}
    assert "P-NEXT" not in owners, f"P-FIRST's readings recorded on {owners}"
