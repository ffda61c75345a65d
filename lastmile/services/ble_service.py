"""The BLE service: Bluetooth LE health devices (BlueZ through bleak) into the outbox, in a process
of its own (`lastmile ble run`, lastmile-ble.service).

    runtime = ServiceRuntime("ble", load_config=...)
    runtime.run(BleService.start)

Why not a part of acquire: the BlueZ / D-Bus / asyncio / bleak stack is the least robust part of
the box and the heaviest (acquire with it peaked at 71 MB RSS, goal 64: bench/soak.py). In its
own unit it has its own watchdog and restarts without cutting a serial ECG stream, a USB import
or the LAN receiver, and its own privileges (the bluetooth group and D-Bus, no serial ports).

The link runs as a `WorkerPart` (thread + event loop, beating while the loop turns) on the same
outbox and clinic.db as acquire; SQLite's locking keeps the two processes' writes apart.

With `[ble] enabled = false` the service stays up, idle and READY, and says so in its status:
`systemctl status`, `lastmile doctor`, the console and the metrics then show a healthy unit
(`lastmile_service_up` 1, no restarts) rather than an inactive one that looks like a fault, and
`systemctl reload lastmile-ble` after enabling BLE starts the link without a restart. Idle, it
imports none of the BLE stack and opens no database (~24 MB RSS, measured: a bare python 11).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from lastmile.services.parts import PARTS_STOP_S, STEP_S, Beat, LeftParts, Part, WorkerPart, close_parts
from lastmile.services.process_tuning import HeapTrim

if TYPE_CHECKING:
    from lastmile.config import Config
    from uploader.outbox import Outbox

log = logging.getLogger(__name__)

IDLE_STEP_S = 60.0  # BLE not enabled: nothing to check (the runtime still feeds the watchdog)
# No spill file (as acquire's serial part has): a stop that could not wait for the link loses the
# reading in hand (SQLite rolls its write back whole), unless the device keeps it in its memory.
BLE_LEFT_AT_STOP = (
    "a reading being stored is lost unless the device keeps it in its memory (read again at its next "
    "connection): take it again"
)

# The radio's bleak backends, entered on the link's own event loop: (scanner, client) classes, or
# (None, None) for bleak's default (BlueZ on Linux). Tests and the bench put bumble's emulated
# radio here; a gateway uses the default.
Backends = tuple[Any, Any]
RadioFactory = Callable[[], AbstractAsyncContextManager[Backends]]


def not_enabled_text(config: Config) -> str:
    return f"BLE not enabled ([ble] enabled = false in {config.source}): idle; enable it and reload lastmile-ble"


def ble_part(
    config: Config,
    outbox: Outbox,
    *,
    radio: RadioFactory | None = None,
    radio_listener: Callable[[str | None], None] | None = None,
) -> Part | None:
    """The BLE link on a thread of its own with its own event loop; None when BLE is not enabled.
    `radio_listener` hears the radio's fault while it cannot scan (the link stays up and retries)."""
    if not config.ble.enabled:
        return None
    try:
        from lastmile.services.ble_devices import run_ble
    except ImportError:
        log.warning("BLE enabled but the BLE link module is not installed")
        return None

    def work(stop: threading.Event, beat: Beat) -> None:
        import asyncio
        import contextlib

        async def main() -> None:
            done = asyncio.Event()

            async def pulse() -> None:
                # Beats only while the event loop turns: a blocked loop is a wedged BLE link.
                while not stop.is_set():
                    beat()
                    await asyncio.sleep(1.0)
                done.set()

            pulser = asyncio.create_task(pulse())
            try:
                async with radio() if radio is not None else contextlib.nullcontext((None, None)) as backends:
                    scanner, client = backends
                    await run_ble(
                        config,
                        done,
                        outbox=outbox,
                        scanner_backend=scanner,
                        client_backend=client,
                        radio_listener=radio_listener,
                    )
            finally:
                pulser.cancel()

        asyncio.run(main())

    return WorkerPart("ble", work, left_at_stop=BLE_LEFT_AT_STOP)


class BleService:
    """The `Service` for `lastmile ble run`: the BLE part around one outbox, or idle when disabled."""

    def __init__(self, config: Config, *, radio: RadioFactory | None = None) -> None:
        self.config = config
        self.radio = radio
        self.outbox: Outbox | None = None
        self.part: Part | None = None
        self._left_parts = LeftParts()  # links a reload could not wait for: on the outbox still
        # Set from the link's thread, read by status_line: one reference swapped whole.
        self.radio_fault: str | None = None
        self.trim = HeapTrim(time.monotonic())

    @classmethod
    def start(cls, config: Config, *, radio: RadioFactory | None = None) -> BleService:
        service = cls(config, radio=radio)
        service._build()
        return service

    def _build(self) -> None:
        if not self.config.ble.enabled:
            log.warning("%s", not_enabled_text(self.config))
            return
        from lastmile.data_dir import open_outbox

        if self.outbox is None:
            # Not given the runtime's stop (as acquire's and the forwarder's are): BLE has no spill
            # file, and a live reading (a thermometer's, no device memory to read it again from) that
            # gave up waiting for another process's write lock at SIGTERM was lost. Its store keeps
            # SQLite's 15 s wait; the link's close waits for it (WorkerPart.close), within
            # PARTS_STOP_S, inside lastmile-ble.service's TimeoutStopSec=30.
            self.outbox = open_outbox(self.config)
        self.radio_fault = None
        self.part = ble_part(self.config, self.outbox, radio=self.radio, radio_listener=self._radio_changed)
        if self.part is not None:
            self.part.check(time.monotonic())  # starts the link's thread
            log.info("ble: link started")

    # -- Service ----------------------------------------------------------------------------------

    def step(self, stop: threading.Event) -> float:
        self._left_parts.forget_finished()  # a link a reload left, once finished, is not kept for ever
        if self.part is None:
            return IDLE_STEP_S
        self.part.check(time.monotonic())  # raises Wedged: the runtime exits and systemd restarts us
        self.trim.maybe(time.monotonic())
        return STEP_S

    def reload(self, config: Config) -> None:
        """The link is rebuilt from the new configuration (started, stopped); the outbox stays
        open. The old link's stop is bounded as the service's (PARTS_STOP_S, within WatchdogSec)."""
        if self.part is not None:
            self._left_parts.add(close_parts([self.part], within_s=PARTS_STOP_S))
            self.part = None
        self.config = config
        self._build()

    def close(self) -> None:
        # The link first: it finishes the reading in hand and makes it durable before the outbox
        # closes - within PARTS_STOP_S (its store waits up to 15 s for the outbox's lock, and as
        # long for clinic.db's). One still storing then keeps the outbox: closing a sqlite3
        # connection under another thread's statement crashes the process.
        still = close_parts([self.part] if self.part is not None else [], within_s=PARTS_STOP_S)
        still += self._left_parts.forget_finished()
        if still:
            log.warning("ble: the link still storing: the outbox left open to it until the process ends")
            return
        if self.outbox is not None:
            self.outbox.close()

    def _radio_changed(self, fault: str | None) -> None:
        self.radio_fault = fault

    def status_line(self) -> str:
        if self.part is not None:
            fault = self.radio_fault
            # A missing or flaky adapter keeps the service up (and an update is not rolled back
            # for it): what is wrong is said here, in STATUS=, not by restarts.
            return self.part.status() + (f"; Bluetooth radio not usable: {fault}" if fault else "")
        if not self.config.ble.enabled:
            return not_enabled_text(self.config)
        return "ble: the BLE link module is not installed"
