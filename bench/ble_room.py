"""The clinic's BLE room, for the soak and the kill campaign: a BP cuff, a thermometer and a pulse
oximeter (bumble-emulated) and the gateway's own BLE link (firmware_bridge.ble.link's
BleDeviceManager with lastmile.services.ble_devices.ClinicBlePort on the real data directory),
through the real bleak API.

It runs as the gateway's BLE service, `lastmile ble run` (lastmile-ble.service: runtime, READY,
watchdog, the link as a restartable part, malloc trims), with this room as the link in place of
`run_ble` on BlueZ (there is no Bluetooth here); the bench's supervisor restarts it when it dies. The devices' memory is theirs, not this process's:
each device reads its stored readings from a file the clinic writes (its flash), so a killed
gateway loses nothing a device still holds:

- `cuff.jsonl`: readings the cuff stored offline; sent (all of them, every time: the gateway
  knows each by its record key) when `cuff.upload` changes - the cuff came into range;
- `thermometer.jsonl`: the thermometer's readings; it advertises as soon as one is added;
- `oximeter.json`: {"generation", "on", "spo2", "pulse"}: a finger in the clip (it streams while
  the gateway is subscribed) or not; the process writes `oximeter.done` = generation once the
  state is applied (off: the link is down, nothing more will come).

    python bench/ble_room.py CONFIG DEVICES_DIR   (`lastmile -c CONFIG ble run`, [ble] enabled)
    python bench/ble_room.py --emulation-only | --bare   (prints its RSS in MB; the difference is the
                                                        emulated radio's and devices' share)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CUFF = "C0:FF:EE:50:00:01"
THERMOMETER = "C0:FF:EE:50:00:02"
OXIMETER = "C0:FF:EE:50:00:03"
POLL_S = 0.2

log = logging.getLogger("ble_room")


def read_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    # the clinic appends whole lines; a line being written is taken on the next look
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def stamp(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


async def advertise_when_free(peripheral: Any, powered: set[str]) -> bool:
    """Advertise (the device has something to send) unless a link is up; False: try again.
    A device is powered on the first time it has something: an idle one stays silent, so the
    gateway's connections are made one after another, as in a clinic."""
    from bumble.core import BaseBumbleError, BaseError

    if peripheral.connection is not None:
        return False
    try:
        if peripheral.address not in powered:
            await peripheral.start()
            powered.add(peripheral.address)
        else:
            await peripheral.advertise()
    except (BaseBumbleError, BaseError) as exc:  # already advertising, controller busy: look again later
        log.debug("%s: advertise: %s", peripheral.name, exc)
        return False
    return True


def emulated_room() -> tuple[Any, Any, Any, Any]:
    """The emulated radio and the cuff, thermometer and oximeter on it (not started)."""
    from firmware_bridge.ble.emulated_peripherals import BloodPressureCuff, PulseOximeter, Thermometer
    from firmware_bridge.ble.emulation import EmulatedRadio

    radio = EmulatedRadio()
    common: dict[str, Any] = {"manufacturer": "Lastmile Emulation", "tz": dt.timezone.utc}
    cuff = BloodPressureCuff(radio, CUFF, "Soak BP Cuff", model="BP-EMU", serial="CUFF-SOAK", **common)
    thermometer = Thermometer(radio, THERMOMETER, "Soak Thermometer", model="TH-EMU", serial="TH-SOAK", **common)
    oximeter = PulseOximeter(radio, OXIMETER, "Soak Oximeter", model="OX-EMU", serial="OX-SOAK", **common)
    return radio, cuff, thermometer, oximeter


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


# What the BLE service imports on a gateway (BlueZ backend included): both
# reference processes import it first, so that the emulation's share is only what bumble and the
# emulated room add on top (a module both would load is counted as the gateway's, not subtracted).
GATEWAY_MODULES = (
    "lastmile.cli",
    "lastmile.services.runtime",
    "lastmile.services.ble_service",
    "lastmile.data_dir",
    "lastmile.services.ble_devices",
    "bleak.backends.bluezdbus.client",
    "bleak.backends.bluezdbus.scanner",
)


def import_gateway_modules() -> None:
    import importlib

    for name in GATEWAY_MODULES:
        importlib.import_module(name)


async def emulation_only() -> float:
    """This process's RSS with the gateway's modules loaded and the emulated room started (radio
    and its three devices powered on): less `--bare`'s (the same modules, nothing started), what
    the radio and the devices hold, which a gateway on a Pi does not."""
    import_gateway_modules()
    radio, *peripherals = emulated_room()
    await radio.start()
    try:
        for peripheral in peripherals:
            await peripheral.start()
        return rss_mb()
    finally:
        for peripheral in peripherals:
            await peripheral.stop()
        await radio.close()


async def room(config: Any, devices: Path, outbox: Any, turn: Callable[[], bool]) -> None:
    """The gateway's BLE link (ClinicBlePort on `outbox`) and the emulated devices, until `turn()`
    (called every POLL_S) says False."""
    from firmware_bridge.ble.emulated_peripherals import BpRecord, TemperatureRecord
    from firmware_bridge.ble.link import BleDeviceManager, LinkSettings
    from lastmile.clinic.db import utc_now
    from lastmile.clinic.devices import DeviceRegistry
    from lastmile.clinic.observations import ObservationStore
    from lastmile.services.ble_devices import ClinicBlePort

    utc = dt.timezone.utc
    radio, cuff, thermometer, oximeter = emulated_room()

    def cuff_memory() -> list[BpRecord]:
        return [
            BpRecord(r["systolic"], r["diastolic"], r["mean"], r["pulse"], dt.datetime.fromisoformat(r["taken_at"]))
            for r in read_lines(devices / "cuff.jsonl")
        ]

    def thermometer_memory() -> list[TemperatureRecord]:
        return [
            TemperatureRecord(r["celsius"], dt.datetime.fromisoformat(r["taken_at"]))
            for r in read_lines(devices / "thermometer.jsonl")
        ]

    def oximeter_state() -> dict[str, Any]:
        try:
            return dict(json.loads((devices / "oximeter.json").read_text()))
        except (FileNotFoundError, ValueError):
            return {"generation": 0, "on": False}

    cuff.memory = cuff_memory()
    thermometer.memory = thermometer_memory()
    state = oximeter_state()
    oximeter.stream_interval_s = 0.5 if state["on"] else 0.0  # no finger, no stream
    oximeter.spo2, oximeter.pulse = state.get("spo2", 97.0), state.get("pulse", 68.0)

    store = ObservationStore.open(config.data_dir, outbox=outbox, idle_timeout_s=config.patient.idle_timeout_s)
    registry = DeviceRegistry(store.db)
    registry.mark_all_disconnected(now=utc_now())
    for peripheral in (cuff, thermometer, oximeter):
        registry.allow(peripheral.address, name=peripheral.name, now=utc_now())
    scanner, client = radio.backends()
    settings = LinkSettings(
        scan_pass_s=1.0,
        reconnect_delay_s=0.5,
        retry_backoff_s=1.0,
        retry_backoff_max_s=4.0,
        continuous_store_interval_s=1.0,
        device_tz=utc,
    )
    manager = BleDeviceManager(ClinicBlePort(store, registry), settings, scanner_backend=scanner, client_backend=client)
    await radio.start()
    powered: set[str] = set()
    stop = asyncio.Event()
    runner = asyncio.ensure_future(manager.run(stop))
    seen_upload, seen_thermometer = stamp(devices / "cuff.upload"), len(thermometer.memory)
    # what a device holds is sent again after a restart (the gateway knows each by its record key)
    cuff_due, thermometer_due = bool(cuff.memory), bool(thermometer.memory)
    applied = -1
    try:
        while not runner.done():
            await asyncio.sleep(POLL_S)
            if not turn():
                break
            upload = stamp(devices / "cuff.upload")
            if upload != seen_upload:  # the cuff came into range
                seen_upload, cuff.memory, cuff_due = upload, cuff_memory(), True
            memory = thermometer_memory()
            if len(memory) != seen_thermometer:
                seen_thermometer, thermometer.memory, thermometer_due = len(memory), memory, True
            if cuff_due:
                cuff_due = not await advertise_when_free(cuff, powered)
            if thermometer_due:
                thermometer_due = not await advertise_when_free(thermometer, powered)
            state = oximeter_state()
            if state["generation"] != applied:
                if state["on"]:
                    oximeter.spo2, oximeter.pulse, oximeter.stream_interval_s = state["spo2"], state["pulse"], 0.5
                    if not await advertise_when_free(oximeter, powered):
                        continue
                else:
                    oximeter.stream_interval_s = 0.0
                    if OXIMETER in powered:
                        await oximeter.stop()  # the finger is out: hang up, stop advertising
                applied = state["generation"]
                (devices / "oximeter.done").write_text(str(applied))
    finally:
        stop.set()
        await runner
        store.close()
        await radio.close()


def as_service(config_path: Path, devices: Path) -> int:
    """`lastmile ble run` as on a gateway, with this room (link + emulated devices) as the BLE
    service's link in place of `run_ble` on BlueZ, on the service's own outbox."""
    import importlib
    import threading

    from lastmile.cli import main as lastmile_main
    from lastmile.services import ble_service, parts

    def ble_part(config: Any, outbox: Any, **_: Any) -> Any:
        def work(stop: threading.Event, beat: Callable[[], None]) -> None:
            def turn() -> bool:
                beat()
                return not stop.is_set()

            asyncio.run(room(config, devices, outbox, turn))

        return parts.WorkerPart("ble", work)

    # What bleak loads on a gateway, where BleakScanner/BleakClient pick the BlueZ backend: the
    # emulated radio stands in for BlueZ here, but these modules are part of the service's RSS there.
    for name in ("bleak.backends.bluezdbus.client", "bleak.backends.bluezdbus.scanner"):
        importlib.import_module(name)
    ble_service.ble_part = ble_part  # BleService looks it up when it builds its link
    return lastmile_main(["-c", str(config_path), "ble", "run"])


def main() -> int:
    from lastmile.logs import configure_logging
    from lastmile.services.process_tuning import prepare_device_process

    # as `lastmile ble run` does first thing: malloc tuned before anything else
    prepare_device_process()
    if sys.argv[1:2] not in (["--bare"], ["--emulation-only"]):
        return as_service(Path(sys.argv[1]), Path(sys.argv[2]))  # its runtime sets up the logging
    configure_logging(None)
    if sys.argv[1:] == ["--bare"]:  # the reference for --emulation-only: the same start, nothing else
        import_gateway_modules()
        print(f"{rss_mb():.2f}")
    else:
        print(f"{asyncio.run(emulation_only()):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
