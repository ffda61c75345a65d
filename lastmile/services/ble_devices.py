"""The gateway side of the BLE link: allow-list, storage and device status for
`firmware_bridge.ble.link`, plus the entry points the acquire service and the demo call.

- `ClinicBlePort`: the link's `GatewayPort` over clinic.db (devices, patient context, held
  observations) and the outbox.
- `run_ble(config, stop)`: the BLE service's link (BlueZ through bleak; lastmile.services.ble_service).
- `run_emulated_clinic(config, ...)`: the same path over an emulated radio with an emulated BP
  cuff and thermometer (bumble, the `emulation` extra), for `lastmile demo`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from devices.observation import Observation
from firmware_bridge.ble.link import BleDeviceManager, DeviceStatus, LinkSettings
from lastmile.clinic.db import utc_now
from lastmile.clinic.devices import DeviceRegistry
from lastmile.clinic.observations import ObservationStore, summary
from lastmile.config import Config
from lastmile.data_dir import open_outbox
from uploader.outbox import Outbox

if TYPE_CHECKING:
    from bleak.backends.client import BaseBleakClient
    from bleak.backends.scanner import BaseBleakScanner

log = logging.getLogger(__name__)


class ClinicBlePort:
    """`GatewayPort` of the BLE link, backed by clinic.db and the outbox."""

    def __init__(
        self, store: ObservationStore, registry: DeviceRegistry, clock: Callable[[], dt.datetime] = utc_now
    ) -> None:
        self.store_ = store
        self.registry = registry
        self.clock = clock
        self.outcomes: dict[str, int] = {"stored": 0, "held": 0, "duplicate": 0}

    def allowed_devices(self) -> dict[str, bool]:
        return {address: record.pair_required for address, record in self.registry.allowed("ble").items()}

    def is_allowed(self, address: str) -> bool:
        return self.registry.is_allowed(address)

    def store(self, observation: Observation) -> bool:
        now = self.clock()
        result = self.store_.record(observation, now=now)
        self.outcomes[result.outcome] += 1
        if result.outcome != "duplicate":
            # seen: heard from now (a record from its memory was measured hours before any error)
            self.registry.update_status(
                observation.device.address,
                now=now,
                seen=True,
                reading=summary(observation),
                reading_at=observation.measured_at,
                sends_users=observation.device_user is not None,
            )
        return result.outcome != "duplicate"

    def report(self, status: DeviceStatus) -> None:
        self.registry.update_status(
            status.address,
            now=self.clock(),
            connected=status.connected,
            seen=status.seen,
            error=status.error,
            problem=status.problem,
            identity=status.identity,
            advertised_name=status.name,  # the name given at pairing stays the one shown
            services=status.services,
            battery_level=status.battery_level,
        )

    def last_sequence(self, address: str) -> int | None:
        return self.registry.last_sequence(address)

    def set_last_sequence(self, address: str, sequence: int) -> None:
        self.registry.set_last_sequence(address, sequence, now=self.clock())

    def note_pair_required(self, address: str) -> None:
        self.registry.set_pair_required(address, now=self.clock())

    def battery_written(self, address: str) -> tuple[int, float] | None:
        record = self.registry.get(address)
        if record is None or record.battery_level is None or record.battery_at is None:
            return None
        # a clock set back since: written "now", never in the future
        return record.battery_level, max(0.0, (self.clock() - record.battery_at).total_seconds())


def link_settings(config: Config) -> LinkSettings:
    ble = config.ble
    return LinkSettings(
        scan_pass_s=ble.scan_interval_s,
        connect_attempts=ble.connect_attempts,
        continuous_store_interval_s=ble.continuous_store_interval_s,
        battery_poll_s=ble.battery_poll_s,
        battery_refresh_s=ble.battery_refresh_s,
    )


async def run_ble(
    config: Config,
    stop: asyncio.Event,
    *,
    outbox: Outbox | None = None,
    scanner_backend: type[BaseBleakScanner] | None = None,
    client_backend: type[BaseBleakClient] | None = None,
    radio_listener: Callable[[str | None], None] | None = None,
) -> None:
    """The BLE service's link, until `stop` is set: on the real radio (BlueZ), or on the radio
    whose bleak backends are given (bumble's emulated one in tests and the bench).
    `radio_listener` hears the radio's fault while scanning cannot start, None once it can."""
    own_outbox = outbox is None
    outbox = outbox or open_outbox(config)
    store = ObservationStore.open(config.data_dir, outbox=outbox, idle_timeout_s=config.patient.idle_timeout_s)
    registry = DeviceRegistry(store.db)
    registry.mark_all_disconnected(now=utc_now())
    try:
        manager = BleDeviceManager(
            ClinicBlePort(store, registry),
            link_settings(config),
            scanner_backend=scanner_backend,
            client_backend=client_backend,
            radio_listener=radio_listener,
        )
        await manager.run(stop)
    finally:
        store.close()
        if own_outbox:
            outbox.close()


# --------------------------------------------------------------------------------------------
# The emulated clinic (demo)

DEMO_CUFF = "C0:FF:EE:00:00:01"
DEMO_THERMOMETER = "C0:FF:EE:00:00:02"


@dataclass
class EmulatedClinicSummary:
    observations: int = 0  # new observations made durable (outbox + held)
    stored: int = 0  # of which went to the outbox (a patient was current)
    held: int = 0  # of which wait, unassigned, for the doctor
    duplicates: int = 0  # re-sent records recognised
    devices: dict[str, dict] = field(default_factory=dict)  # address -> {model, observations, connected ...}
    timed_out: bool = False

    def to_json(self) -> dict:
        return {
            "observations": self.observations,
            "stored": self.stored,
            "held": self.held,
            "duplicates": self.duplicates,
            "devices": self.devices,
            "timed_out": self.timed_out,
        }


async def emulated_clinic(
    config: Config,
    *,
    patient_id: str | None = None,
    patient_name: str = "",
    timeout_s: float = 30.0,
    outbox: Outbox | None = None,
) -> EmulatedClinicSummary:
    """Run an emulated BP cuff (3 stored readings) and thermometer (1 reading) through the real
    BLE path into `config.data_dir`'s outbox / clinic.db; return what happened.

    With `patient_id`, that patient is made current first: the two readings taken now land on
    them (outbox), the cuff's two older readings are held unassigned. Without, all four are held
    (what the gateway does with no current patient).
    """
    from firmware_bridge.ble.emulated_peripherals import BloodPressureCuff, BpRecord, TemperatureRecord, Thermometer
    from firmware_bridge.ble.emulation import EmulatedRadio

    now = utc_now()
    tz = dt.timezone.utc
    local = now.astimezone(tz).replace(tzinfo=None, microsecond=0)
    radio = EmulatedRadio()
    # The cuff's memory: two readings of earlier patients (before this session began: held
    # unassigned, never put on the current patient) and the one just taken (stamped "now" by
    # the cuff's clock when sent). The thermometer has the one just taken.
    cuff = BloodPressureCuff(
        radio,
        DEMO_CUFF,
        "Demo BP Cuff",
        manufacturer="Lastmile Emulation",
        model="BP-EMU",
        serial="CUFF-0001",
        tz=tz,
        memory=[
            BpRecord(128, 84, 99, 71, local - dt.timedelta(hours=26)),
            BpRecord(122, 79, 93, 66, local - dt.timedelta(hours=2)),
            BpRecord(118, 76, 90, 64, None),
        ],
    )
    thermometer = Thermometer(
        radio,
        DEMO_THERMOMETER,
        "Demo Thermometer",
        manufacturer="Lastmile Emulation",
        model="TH-EMU",
        serial="TH-0001",
        tz=tz,
        memory=[TemperatureRecord(37.2, None)],
    )
    expected = len(cuff.memory) + len(thermometer.memory)

    own_outbox = outbox is None
    outbox = outbox or open_outbox(config)
    store = ObservationStore.open(config.data_dir, outbox=outbox, idle_timeout_s=config.patient.idle_timeout_s)
    registry = DeviceRegistry(store.db)
    summary_ = EmulatedClinicSummary()
    try:
        for address, name in ((DEMO_CUFF, cuff.name), (DEMO_THERMOMETER, thermometer.name)):
            registry.allow(address, name=name, now=now)
        if patient_id:
            store.context.set_patient(patient_id, patient_name, now=now)
        port = ClinicBlePort(store, registry)
        done = asyncio.Event()
        counts: dict[str, int] = {}

        def listener(address: str, _obs: Observation, created: bool) -> None:
            counts[address] = counts.get(address, 0) + 1
            if sum(counts.values()) >= expected:
                done.set()

        scanner, client = radio.backends()
        settings = LinkSettings(scan_pass_s=1.0, reconnect_delay_s=60.0, device_tz=tz)
        manager = BleDeviceManager(
            port, settings, scanner_backend=scanner, client_backend=client, observation_listener=listener
        )
        await radio.start()
        await cuff.start()
        await thermometer.start()
        stop = asyncio.Event()
        runner = asyncio.ensure_future(manager.run(stop))
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
            # Both devices hang up once their memory is sent: let them, rather than cut them off.
            for _ in range(100):
                if not manager.connected():
                    break
                await asyncio.sleep(0.02)
        except TimeoutError:
            summary_.timed_out = True
        stop.set()
        await runner
        await cuff.stop()
        await thermometer.stop()
        await radio.close()
        summary_.stored = port.outcomes["stored"]
        summary_.held = port.outcomes["held"]
        summary_.duplicates = port.outcomes["duplicate"]
        summary_.observations = summary_.stored + summary_.held
        for address in (DEMO_CUFF, DEMO_THERMOMETER):
            record = registry.get(address)
            assert record is not None
            summary_.devices[address] = {
                "name": record.name,
                "model": record.model,
                "observations": counts.get(address, 0),
                "last_reading": record.last_reading,
                "last_error": record.last_error,
            }
    finally:
        store.close()
        if own_outbox:
            outbox.close()
    return summary_


def run_emulated_clinic(
    config: Config, *, patient_id: str | None = None, patient_name: str = "", timeout_s: float = 30.0
) -> EmulatedClinicSummary:
    """Synchronous wrapper of `emulated_clinic` (runs its own event loop)."""
    return asyncio.run(emulated_clinic(config, patient_id=patient_id, patient_name=patient_name, timeout_s=timeout_s))


__all__ = ["ClinicBlePort", "EmulatedClinicSummary", "emulated_clinic", "run_ble", "run_emulated_clinic"]
