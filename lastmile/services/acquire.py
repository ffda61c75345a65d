"""The acquire service: every enabled device link feeding the outbox, in one process.

    runtime = ServiceRuntime("acquire", load_config=...)
    runtime.run(AcquireService.start)

Parts (each only when its module exists and the configuration enables it):
- serial: `lastmile.services.serial_devices` (bridges, ASCII-report monitors, card scanners)
- lan-receiver: the clinic-LAN DICOM storage SCP (`lastmile.ecg.intake.lan_receiver`)
- usb-import: folders in `usb_import.folders` watched for new ECG files

Each link runs on its own thread as a part (`lastmile.services.parts`: restarted with backoff
when it fails, the process restarted when it wedges), so a slow device never holds up another. Forwarding is another process (lastmile-forward), so
a hung association or HTTP call never stalls device reads. Bluetooth LE devices are another too
(lastmile-ble, `lastmile.services.ble_service`): the BlueZ/D-Bus/bleak stack restarts on its own
and its ~9 MB stay out of this process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lastmile.services.parts import (
    PARTS_STOP_S,
    STEP_S,
    Beat,
    LeftParts,
    Part,
    ReceiverPart,
    WorkerPart,
    close_parts,
)
from lastmile.services.process_tuning import HeapTrim

if TYPE_CHECKING:
    from lastmile.clinic.patients import StatSession
    from lastmile.config import Config
    from uploader.outbox import Outbox
    from uploader.sqlite_store import StopWaits

log = logging.getLogger(__name__)

# -- the parts, built from the configuration ------------------------------------------------------


def serial_part(config: Config, outbox: Outbox, stop: StopWaits | None = None) -> Part | None:
    """`stop`: the service's, for the devices' clinic.db writes as for the outbox's."""
    from lastmile.services.serial_spill import ECG_SPILL_NAME, waiting_readings

    # readings (ECGs) kept in the spill files are stored even when no serial device is configured any more
    spilled = waiting_readings(config.data_dir) or waiting_readings(config.data_dir, ECG_SPILL_NAME)
    if not config.serial.enabled or not (config.serial.devices or spilled):
        return None
    try:
        from lastmile.services.serial_devices import SerialService
    except ImportError:
        log.warning("serial devices configured but the serial link module is not installed")
        return None
    service = SerialService.open(config, outbox=outbox, stop=stop)  # ConfigError: refused before READY

    def work(stop: threading.Event, beat: Beat) -> None:
        while not stop.is_set():
            service.run_once(1.0)  # also stores what an unplugged device left once there is room
            beat()

    # Its status counts the devices refused at start (a bad profile file: each device's own status
    # in clinic.db says which file and line), so systemd's STATUS does not say "serial up" while a
    # monitor is not being read.
    refused = len(service.refused)
    note = f"{refused} device{'s' if refused > 1 else ''} refused (bad profile file)" if refused else ""
    return WorkerPart("serial", work, on_close=service.close, note=note, left_at_stop=SERIAL_LEFT_AT_STOP)


@dataclass(frozen=True)
class SessionLookup:
    """What the clinic session says at this moment, for ECGs that arrive on their own (LAN, stick):
    the current patient's IDs (his own and those the doctor linked to it), and that patient when
    the doctor checked them in as STAT; the name it knows for an ID (a file's name is compared with it)."""

    patient_ids: Callable[[], frozenset[str]]
    stat_session: Callable[[], StatSession | None]
    checked_in_name: Callable[[str], str] = lambda patient_id: ""


NO_SESSION = SessionLookup(frozenset, lambda: None)
# What a stop that could not wait for a part means for what it was writing (close_parts says it):
# SQLite rolls an unfinished write back whole when the process ends; what keeps it is the part's own.
SERIAL_LEFT_AT_STOP = (
    "a reading being stored is kept if it was held in the spill file (stored after the restart), "
    "else lost with the process; a patient card scanned as the gateway stopped may not be checked in: scan it again"
)
USB_LEFT_AT_STOP = "the ECG file being imported stays on the stick: imported at the next start, once"
GNSS_LEFT_AT_STOP = "the track point being written is dropped: the visit's track goes on from the next fix"


def lan_receiver_part(config: Config, outbox: Outbox, session: SessionLookup) -> Part | None:
    if not config.lan_receiver.enabled:
        return None
    from firmware_bridge.errors import LinkConfigError
    from lastmile.config import ConfigError
    from lastmile.ecg.intake import lan_receiver

    try:
        receiver = lan_receiver(config, outbox, session.patient_ids, session.stat_session, session.checked_in_name)
    except LinkConfigError as exc:  # empty allow-list and the like: refused before READY
        raise ConfigError(f"{config.source}: lan_receiver: {exc}") from None
    # listening starts at the part's first check, and is retried there: a port it cannot have
    # must not keep the serial devices, the USB sticks and GPS from being read
    return ReceiverPart(receiver) if receiver is not None else None


def usb_import_part(config: Config, outbox: Outbox, session: SessionLookup) -> Part | None:
    if not config.usb_import.folders:
        return None
    from lastmile.ecg.intake import usb_import_watcher

    watcher = usb_import_watcher(config, outbox, session.patient_ids, session.stat_session, session.checked_in_name)

    def work(stop: threading.Event, beat: Beat) -> None:
        while not stop.is_set():
            watcher.poll()
            beat()
            stop.wait(5.0)

    # A big import (hundreds of files from a cart) may take minutes: never call it wedged.
    return WorkerPart("usb-import", work, stale_after=None, left_at_stop=USB_LEFT_AT_STOP)


def gnss_part(config: Config, waits: StopWaits | None = None) -> Part | None:
    """Fixes from gpsd or an NMEA receiver: they anchor the clock (a Pi has no RTC) and extend
    the open visit's bounded track. `waits`: the service's stop: at a stop, a fix's visits.db write
    waits at most a second more for another process's lock (that track point given up, said at
    INFO by the part), not 15 s."""
    if config.gps.source == "none":
        return None
    from firmware_bridge.errors import GnssError
    from firmware_bridge.gnss import open_source
    from lastmile.visits.book import VisitBook, VisitPolicy, follow_receiver
    from uploader.sqlite_store import give_up_waits_on

    def work(stop: threading.Event, beat: Beat) -> None:
        warned = False
        with VisitBook.open(
            config.data_dir, gateway_id=config.gateway.id, policy=VisitPolicy.from_config(config.visits)
        ) as book:
            if waits is not None:
                give_up_waits_on(book.db, waits)
            while not stop.is_set():
                beat()
                try:
                    source = open_source(
                        config.gps.source,
                        gpsd_host=config.gps.gpsd_host,
                        gpsd_port=config.gps.gpsd_port,
                        nmea_port=config.gps.nmea_port,
                        nmea_baud=config.gps.nmea_baud,
                    )
                    if source is None:
                        return
                    with contextlib.closing(source):
                        warned = False

                        def should_stop() -> bool:
                            beat()
                            return stop.is_set()

                        follow_receiver(book, source, should_stop)
                except (GnssError, OSError) as exc:
                    # no receiver plugged in is normal at a clinic: say it once, keep trying
                    (log.warning if not warned else log.debug)("GNSS not available: %s", exc)
                    warned = True
                stop.wait(10.0)

    return WorkerPart("gnss", work, left_at_stop=GNSS_LEFT_AT_STOP)


def build_parts(
    config: Config, outbox: Outbox, session: SessionLookup, *, into: list[Part], stop: StopWaits | None = None
) -> None:
    """Every enabled part, appended to `into` as it is made (so a failure can close those made)."""
    for build in (
        lambda: serial_part(config, outbox, stop),
        lambda: lan_receiver_part(config, outbox, session),
        lambda: usb_import_part(config, outbox, session),
        lambda: gnss_part(config, stop),
    ):
        part = build()
        if part is not None:
            into.append(part)


class AcquireService:
    """The `Service` for `lastmile acquire`: composes the enabled parts around one outbox."""

    def __init__(
        self,
        config: Config,
        outbox: Outbox,
        parts: list[Part],
        closers: list[Callable[[], None]],
        stop: StopWaits | None = None,
        alive: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.stop_waits = stop
        # the runtime's watchdog feed (`ServiceRuntime.alive`): a reload's long stop is progress
        self.alive = alive or (lambda: None)
        self.outbox = outbox
        self.parts = parts
        self._closers = closers
        # Parts a reload could not wait for, and the stores only they may still use (an old
        # session's clinic.db connection): closed once those parts have finished (`step`).
        self._left_parts = LeftParts()
        self._left_closers: list[Callable[[], None]] = []
        self.started = time.monotonic()
        self.trim = HeapTrim(self.started)

    @classmethod
    def start(
        cls, config: Config, *, stop: threading.Event | None = None, alive: Callable[[], None] | None = None
    ) -> AcquireService:
        """`stop`: the runtime's (SIGTERM): once set, a reading waiting for another process's
        write lock on the outbox or clinic.db gives up within a second and is held as any the
        outbox refused (the serial spill file, said at the stop), not waited for 15 s per write
        (`open_outbox`, sqlite_store.StopWaits: one second for both databases); a device row's
        write given up is redone at the next start. `alive`: the runtime's watchdog feed (`reload`)."""
        from lastmile.data_dir import open_outbox  # no DICOM stack in the acquire process
        from uploader.sqlite_store import StopWaits

        waits = StopWaits(stop) if stop is not None else None
        outbox = open_outbox(config, stop=waits)
        closers: list[Callable[[], None]] = [outbox.close]
        parts: list[Part] = []
        try:
            build_parts(config, outbox, cls._session_lookup(config, closers, waits), into=parts, stop=waits)
            service = cls(config, outbox, parts, closers, waits, alive)
            service.check_parts()  # starts the worker threads
        except BaseException:
            if not close_parts(list(reversed(parts)), within_s=PARTS_STOP_S):
                for close in reversed(closers):
                    close()
            raise
        log.info("acquire: %s", ", ".join(p.name for p in parts) or "no device links enabled")
        return service

    @staticmethod
    def _session_lookup(
        config: Config, closers: list[Callable[[], None]], stop: StopWaits | None = None
    ) -> SessionLookup:
        try:
            from lastmile.clinic.patients import PatientContext
        except ImportError:
            return NO_SESSION
        from uploader.sqlite_store import give_up_waits_on

        context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
        closers.append(context.close)
        if stop is not None:  # its one write, an idle session ended as it is read
            give_up_waits_on(context.db, stop)
        lock = threading.Lock()

        def current_patient_ids() -> frozenset[str]:
            with lock:
                return context.patient_ids(dt.datetime.now(dt.timezone.utc))

        def stat_session() -> StatSession | None:
            with lock:
                return context.stat_session(dt.datetime.now(dt.timezone.utc))

        def checked_in_name(patient_id: str) -> str:
            with lock:
                return context.known_name(patient_id, dt.datetime.now(dt.timezone.utc))

        return SessionLookup(current_patient_ids, stat_session, checked_in_name)

    def check_parts(self) -> None:
        now = time.monotonic()
        for part in self.parts:
            part.check(now)

    # -- Service ----------------------------------------------------------------------------------

    def step(self, stop: threading.Event) -> float:
        self.check_parts()  # raises Wedged: the runtime exits and systemd restarts us
        self._close_what_was_left()
        self.trim.maybe(time.monotonic())  # what an ECG's decoding freed goes back
        return STEP_S

    def reload(self, config: Config) -> None:
        """Device links are rebuilt from the new configuration; the outbox stays open. The old
        parts are stopped together within PARTS_STOP_S (one after another: a USB import's 15 s
        then a card's 18 s, past the unit's WatchdogSec=30); the old session's clinic.db is not
        closed under one still closing (`_close_what_was_left`)."""
        still = close_parts(list(reversed(self.parts)), within_s=PARTS_STOP_S)
        # The runtime pinged the watchdog as the reload began; the parts' stop may have taken up to
        # 24 s of WatchdogSec=30, and the new parts' opening writes clinic.db (the serial part:
        # each write up to a 15 s lock wait, the stop not set): its period counted from here.
        self.alive()
        old_closers, self._closers = self._closers[1:], self._closers[:1]
        if still:
            self._left_parts.add(still)
            self._left_closers += old_closers
        else:
            for close in reversed(old_closers):
                close()
        self.config = config
        session = self._session_lookup(config, self._closers, self.stop_waits)
        self.parts = []
        build_parts(config, self.outbox, session, into=self.parts, stop=self.stop_waits)
        self.check_parts()

    def _close_what_was_left(self) -> None:
        """The stores a reload left to parts still closing, once those have finished."""
        if self._left_parts and not self._left_parts.forget_finished():
            closers, self._left_closers = self._left_closers, []
            for close in reversed(closers):
                close()
            log.info("acquire: the device links a reload left have finished; their session's database closed")

    def close(self) -> None:
        # Parts first: each finishes the object in hand and makes it durable before the outbox closes.
        still = close_parts(list(reversed(self.parts)), within_s=PARTS_STOP_S)
        still += self._left_parts.forget_finished()
        if still:
            # Not closed under a part still writing to them (a sqlite3 connection closed under
            # another thread's statement crashed the process); they go with the process: SQLite
            # rolls its unfinished write back whole, every committed one is kept (WAL).
            log.warning(
                "acquire: %s still closing: the outbox and clinic.db left open to %s until the process ends; "
                "everything already stored is kept",
                ", ".join(part.name for part in still),
                "it" if len(still) == 1 else "them",
            )
            return
        for close in reversed(self._left_closers + self._closers):
            close()

    def status_line(self) -> str:
        return "; ".join(p.status() for p in self.parts) or "no device links enabled"
