"""The gateway's side of the BLE tests: the outbox, clinic.db and the clinic's BLE port, and the real
link (bleak API over bumble-emulated radios) run until something has happened."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_bridge.ble.emulated_peripherals import BloodPressureCuff
from firmware_bridge.ble.emulation import EmulatedRadio
from firmware_bridge.ble.link import BleDeviceManager, LinkSettings, utc_now
from lastmile.clinic.devices import DeviceRegistry
from lastmile.clinic.observations import OBSERVATION_KIND, ObservationStore
from lastmile.services.ble_devices import ClinicBlePort
from uploader.outbox import Outbox

UTC = dt.timezone.utc


class Gateway:
    """Outbox + clinic.db + port, and a way to run the link until something happened."""

    def __init__(self, data_dir: Path) -> None:
        self.outbox = Outbox.open(data_dir, min_free_bytes=0)
        self.store = ObservationStore.open(data_dir, outbox=self.outbox, idle_timeout_s=7200)
        self.registry = DeviceRegistry(self.store.db)
        self.clock: Callable[[], dt.datetime] = utc_now  # the gateway's, for the port and the link
        self.port = ClinicBlePort(self.store, self.registry, clock=lambda: self.clock())
        self.radio: EmulatedRadio | None = None  # made inside the event loop (bumble needs one)
        self.events: list[tuple[str, bool]] = []

    def close(self) -> None:
        self.store.close()
        self.outbox.close()

    def allow(self, *addresses: str) -> None:
        for a in addresses:
            self.registry.allow(a, now=dt.datetime.now(UTC))

    def observations(self) -> list[dict]:
        items = self.outbox.items(kind=OBSERVATION_KIND)
        return [json.loads(self.outbox.read_payload(i)) for i in items]

    def new_radio(self) -> EmulatedRadio:
        self.radio = EmulatedRadio()
        return self.radio

    async def run(
        self,
        peripherals: list,
        until: Callable[[], bool],
        *,
        timeout: float = 15.0,
        settings: LinkSettings | None = None,
        client_backend: Any = None,
        scanner_backend: Any = None,
        radio_listener: Callable[[str | None], None] | None = None,
        during: Callable[[], Any] | None = None,
    ) -> BleDeviceManager:
        assert self.radio is not None
        scanner, client = self.radio.backends()
        scanner = scanner_backend or scanner
        manager = BleDeviceManager(
            self.port,
            settings
            or LinkSettings(
                scan_pass_s=0.5,
                reconnect_delay_s=0.2,
                retry_backoff_s=0.2,
                device_tz=UTC,
                continuous_store_interval_s=0.0,
            ),
            scanner_backend=scanner,
            client_backend=client_backend or client,
            observation_listener=lambda a, _o, created: self.events.append((a, created)),
            radio_listener=radio_listener,
            clock=lambda: self.clock(),
        )
        await self.radio.start()
        for p in peripherals:
            await p.start()
        stop = asyncio.Event()
        task = asyncio.ensure_future(manager.run(stop))
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while not until():
                if task.done():
                    task.result()
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"timed out; events so far: {self.events}")
                if during is not None:
                    await during()
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await task
            for p in peripherals:
                await p.stop()
            await self.radio.close()
        return manager


@dataclass
class CapturedCuff(BloodPressureCuff):
    """A cuff indicating captured measurement bytes as they were, then hanging up."""

    captured: tuple[bytes, ...] = ()

    def on_subscribed(self, connection: Any, characteristic: Any) -> None:
        if characteristic is self.measurement:
            self.spawn(self.indicate_captured())

    async def indicate_captured(self) -> None:
        for data in self.captured:
            if not await self.send(self.measurement, data, indicate=True):
                return
        await self.hang_up()
