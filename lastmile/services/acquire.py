"""The acquire service: every enabled device link feeding the outbox, in one process.

    runtime = ServiceRuntime("acquire", load_config=...)
    runtime.run(AcquireService.start)

Parts (each only when its module exists and the configuration enables it):
- serial: `lastmile.services.serial_devices` (bridges, ASCII-report monitors, card scanners)
- ble: `lastmile.services.ble_devices.run_ble` (BlueZ through bleak) on its own asyncio loop
- lan-receiver: the clinic-LAN DICOM storage SCP (`lastmile.ecg.intake.start_lan_receiver`)
- usb-import: folders in `usb_import.folders` watched for new ECG files

Each link runs on its own thread, so a slow device never holds up another, and beats a
heartbeat as it goes round. The service's `step()` (the loop the watchdog is tied to) checks the
parts: a part whose thread ended or failed (BlueZ not up yet, a port in use) is restarted with
backoff and the service stays up; a part that stops beating is wedged, and the step raises so
the process exits and systemd restarts it. Forwarding is another process (lastmile-forward), so
a hung association or HTTP call never stalls device reads.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lastmile.clinic.patients import StatSession
    from lastmile.config import Config
    from uploader.outbox import Outbox

log = logging.getLogger(__name__)

STEP_S = 1.0  # how often the parts are checked
STALE_S = 20.0  # a link that has not gone round for this long is wedged (acquire WatchdogSec=30)
RESTART_BACKOFF_S = (5.0, 300.0)  # first and longest wait before restarting a failed part

Beat = Callable[[], None]


class Wedged(RuntimeError):
    """A part stopped making progress; only a restart of the process will help."""


class Part(Protocol):
    name: str

    def check(self, now: float) -> None:
        """Restart what ended; raise Wedged if something hangs."""
        ...

    def status(self) -> str: ...

    def close(self) -> None: ...


class WorkerPart:
    """Runs `work(stop, beat)` on a thread; restarts it with backoff when it ends or fails.

    `stale_after`: seconds without a `beat()` after which the part counts as wedged (None: never).
    """

    def __init__(
        self,
        name: str,
        work: Callable[[threading.Event, Beat], None],
        *,
        stale_after: float | None = STALE_S,
        on_close: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.work = work
        self.stale_after = stale_after
        self.on_close = on_close
        self.clock = clock
        self.stop = threading.Event()
        self.last_beat = clock()
        self.failures = 0
        self.last_error = ""
        self.next_start = 0.0
        self.thread: threading.Thread | None = None

    def beat(self) -> None:
        self.last_beat = self.clock()

    def start(self) -> None:
        self.last_beat = self.clock()
        self.thread = threading.Thread(target=self._run, name=f"acquire-{self.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.work(self.stop, self.beat)
            if not self.stop.is_set():
                self._failed("ended")
        except Exception as exc:
            if not self.stop.is_set():
                log.warning("%s: %s: %s", self.name, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                self._failed(f"{type(exc).__name__}: {exc}")

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        low, high = RESTART_BACKOFF_S
        wait = min(high, low * 2 ** min(self.failures - 1, 10))
        self.next_start = self.clock() + wait
        log.info("%s: will try again in %.0f s", self.name, wait)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def check(self, now: float) -> None:
        if self.stop.is_set():
            return
        if not self.running:
            if now >= self.next_start:
                log.info("%s: starting (attempt %d)", self.name, self.failures + 1)
                self.start()
            return
        if self.stale_after is not None and now - self.last_beat > self.stale_after:
            raise Wedged(f"{self.name} made no progress for {now - self.last_beat:.0f} s")
        if self.failures and now - self.last_beat < 1.0 and now > self.next_start + 60:
            self.failures = 0  # it has been running fine for a minute: forget old failures

    def status(self) -> str:
        if self.running:
            return f"{self.name} up"
        return f"{self.name} down ({self.last_error or 'starting'})"

    def close(self) -> None:
        self.stop.set()
        if self.on_close is not None:
            try:
                self.on_close()
            except Exception:
                log.exception("%s: close failed", self.name)
        if self.thread is not None:
            self.thread.join(timeout=15)
            if self.thread.is_alive():
                log.warning("%s: still busy at shutdown", self.name)


class ReceiverPart:
    """The LAN storage SCP: pynetdicom runs its own server threads."""

    name = "lan-receiver"

    def __init__(self, receiver: object) -> None:
        self.receiver = receiver

    def check(self, now: float) -> None:
        return None

    def status(self) -> str:
        return f"{self.name} :{getattr(self.receiver, 'port', '?')}"

    def close(self) -> None:
        self.receiver.stop()  # type: ignore[attr-defined]


# -- the parts, built from the configuration ------------------------------------------------------


# pydicom 3 imports pydicom.examples -> pydicom.data -> its test-file downloader, which imports
# requests and tqdm when they are installed (the forward service needs requests for FHIR). The
# acquire process sends nothing over HTTP and downloads no test files: ~4.5 MB of RSS it never
# uses, found by bench/soak.py (acquire at 65 MB with the LAN receiver, over the 64 MB goal).
NOT_IN_ACQUIRE = ("requests", "tqdm")
# sqlite-utils imports dateutil's parser for its command line's date recipes (sqlite_utils.recipes),
# which no service calls: deferred, its code (and dateutil.tz, relativedelta, six) loads only if
# one ever is. ~1 MB of acquire's RSS (bench/soak.py --ble-in-acquire).
DEFERRED_IN_ACQUIRE = ("dateutil.parser",)


def prepare_acquire_process() -> None:
    """Call first thing in the acquire process, before pydicom and sqlite-utils are imported."""
    import sys

    for name in NOT_IN_ACQUIRE:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    for name in DEFERRED_IN_ACQUIRE:
        defer_import(name)
    GLIBC_MALLOC.tune(arenas=MALLOC_ARENAS, mmap_threshold=MMAP_THRESHOLD)


def defer_import(name: str) -> None:
    """Import `name` lazily: a module object now, its code run at the first use of one of its
    attributes (importlib.util.LazyLoader). Nothing if it is imported already or not installed."""
    import importlib.util
    import sys

    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    if parent:
        # `from parent import child` must find it as an attribute: otherwise the import system
        # looks it up again, touching the module, and Python 3.11 then loads it there and then
        setattr(sys.modules[parent], child, module)


# glibc gives each thread that allocates its own malloc arena (up to 8 per core), and an arena
# rarely hands freed memory back: the LAN receiver's association threads, the serial link's and
# the BLE loop's each kept one. And glibc raises its mmap threshold to the size of each large
# block freed, so after the first ECG's quality check the next ones' arrays (~1.5 MB) came from
# the heap and stayed there. Two arenas, a fixed threshold and a trim now and then took ~2 MB
# off acquire's RSS with the serial bridge and the LAN receiver (bench/soak.py). The trim comes
# soon after each ECG: decoding, checking and building one leaves ~1.3 MB of free heap pages,
# which a trim a minute later left resident meanwhile (a trim with nothing to give back: ~25 µs).
MALLOC_ARENAS = 2
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept: larger blocks are mapped and unmapped
TRIM_EVERY_S = 2.0  # how often free heap pages go back to the system
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt() parameter numbers


class GlibcMalloc:
    """glibc's allocator tuning, through ctypes; does nothing on another C library."""

    def __init__(self) -> None:
        self._libc: Any = None
        self._loaded = False

    def _lib(self) -> Any:
        if not self._loaded:
            self._loaded = True
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                    self._libc = libc
            except OSError:
                pass  # not glibc (musl, another system): nothing to tune
        return self._libc

    def tune(self, *, arenas: int, mmap_threshold: int) -> bool:
        """Before the process starts its threads; True if glibc took both settings."""
        libc = self._lib()
        if libc is None:
            return False
        took_arenas = libc.mallopt(M_ARENA_MAX, arenas) == 1
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and took_arenas)

    def trim(self) -> None:
        """Give free pages at the top and in the middle of every arena back to the system."""
        libc = self._lib()
        if libc is not None:
            libc.malloc_trim(0)


GLIBC_MALLOC = GlibcMalloc()


def serial_part(config: Config, outbox: Outbox) -> Part | None:
    if not config.serial.enabled or not config.serial.devices:
        return None
    try:
        from lastmile.services.serial_devices import SerialService
    except ImportError:
        log.warning("serial devices configured but the serial link module is not installed")
        return None
    service = SerialService.open(config, outbox=outbox)  # ConfigError: refused before READY

    def work(stop: threading.Event, beat: Beat) -> None:
        while not stop.is_set():
            service.manager.poll(1.0)
            beat()

    return WorkerPart("serial", work, on_close=service.close)


def ble_part(config: Config, outbox: Outbox) -> Part | None:
    if not config.ble.enabled:
        return None
    try:
        from lastmile.services.ble_devices import run_ble
    except ImportError:
        log.warning("BLE enabled but the BLE link module is not installed")
        return None

    def work(stop: threading.Event, beat: Beat) -> None:
        import asyncio

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
                await run_ble(config, done, outbox=outbox)
            finally:
                pulser.cancel()

        asyncio.run(main())

    return WorkerPart("ble", work)


@dataclass(frozen=True)
class SessionLookup:
    """What the clinic session says at this moment, for ECGs that arrive on their own (LAN, stick):
    the current patient's id, and that patient when the doctor checked them in as STAT."""

    patient_id: Callable[[], str | None]
    stat_session: Callable[[], StatSession | None]


NO_SESSION = SessionLookup(lambda: None, lambda: None)


def lan_receiver_part(config: Config, outbox: Outbox, session: SessionLookup) -> Part | None:
    if not config.lan_receiver.enabled:
        return None
    from firmware_bridge.errors import LinkConfigError
    from lastmile.config import ConfigError
    from lastmile.ecg.intake import start_lan_receiver

    try:
        receiver = start_lan_receiver(config, outbox, session.patient_id, session.stat_session)
    except LinkConfigError as exc:  # empty allow-list and the like
        raise ConfigError(f"{config.source}: lan_receiver: {exc}") from None
    return ReceiverPart(receiver) if receiver is not None else None


def usb_import_part(config: Config, outbox: Outbox, session: SessionLookup) -> Part | None:
    if not config.usb_import.folders:
        return None
    from lastmile.ecg.intake import usb_import_watcher

    watcher = usb_import_watcher(config, outbox, session.patient_id, session.stat_session)

    def work(stop: threading.Event, beat: Beat) -> None:
        while not stop.is_set():
            watcher.poll()
            beat()
            stop.wait(5.0)

    # A big import (hundreds of files from a cart) may take minutes: never call it wedged.
    return WorkerPart("usb-import", work, stale_after=None)


def gnss_part(config: Config) -> Part | None:
    """Fixes from gpsd or an NMEA receiver: they anchor the clock (a Pi has no RTC) and extend
    the open visit's bounded track."""
    if config.gps.source == "none":
        return None
    from firmware_bridge.errors import GnssError
    from firmware_bridge.gnss import open_source
    from lastmile.visits.book import VisitBook, VisitPolicy, follow_receiver

    def work(stop: threading.Event, beat: Beat) -> None:
        warned = False
        with VisitBook.open(
            config.data_dir, gateway_id=config.gateway.id, policy=VisitPolicy.from_config(config.visits)
        ) as book:
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

    return WorkerPart("gnss", work)


def build_parts(config: Config, outbox: Outbox, session: SessionLookup, *, into: list[Part]) -> None:
    """Every enabled part, appended to `into` as it is made (so a failure can close those made)."""
    for build in (
        lambda: serial_part(config, outbox),
        lambda: ble_part(config, outbox),
        lambda: lan_receiver_part(config, outbox, session),
        lambda: usb_import_part(config, outbox, session),
        lambda: gnss_part(config),
    ):
        part = build()
        if part is not None:
            into.append(part)


class AcquireService:
    """The `Service` for `lastmile acquire`: composes the enabled parts around one outbox."""

    def __init__(self, config: Config, outbox: Outbox, parts: list[Part], closers: list[Callable[[], None]]) -> None:
        self.config = config
        self.outbox = outbox
        self.parts = parts
        self._closers = closers
        self.started = time.monotonic()
        self.trimmed = self.started

    @classmethod
    def start(cls, config: Config) -> AcquireService:
        from lastmile.data_dir import open_outbox  # no DICOM stack in the acquire process

        outbox = open_outbox(config)
        closers: list[Callable[[], None]] = [outbox.close]
        parts: list[Part] = []
        try:
            build_parts(config, outbox, cls._session_lookup(config, closers), into=parts)
            service = cls(config, outbox, parts, closers)
            service.check_parts()  # starts the worker threads
        except BaseException:
            for part in reversed(parts):
                part.close()
            for close in reversed(closers):
                close()
            raise
        log.info("acquire: %s", ", ".join(p.name for p in parts) or "no device links enabled")
        return service

    @staticmethod
    def _session_lookup(config: Config, closers: list[Callable[[], None]]) -> SessionLookup:
        try:
            from lastmile.clinic.patients import PatientContext, StatSession
        except ImportError:
            return NO_SESSION
        context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
        closers.append(context.close)
        lock = threading.Lock()

        def current_patient_id() -> str | None:
            with lock:
                current = context.current(dt.datetime.now(dt.timezone.utc))
            return current.patient_id if current else None

        def stat_session() -> StatSession | None:
            with lock:
                current = context.current(dt.datetime.now(dt.timezone.utc))
            if current is None or not current.stat:
                return None
            return StatSession(current.patient_id, current.since)

        return SessionLookup(current_patient_id, stat_session)

    def check_parts(self) -> None:
        now = time.monotonic()
        for part in self.parts:
            part.check(now)

    # -- Service ----------------------------------------------------------------------------------

    def step(self, stop: threading.Event) -> float:
        self.check_parts()  # raises Wedged: the runtime exits and systemd restarts us
        now = time.monotonic()
        if now - self.trimmed >= TRIM_EVERY_S:  # what an ECG's decoding freed goes back
            self.trimmed = now
            GLIBC_MALLOC.trim()
        return STEP_S

    def reload(self, config: Config) -> None:
        """Device links are rebuilt from the new configuration; the outbox stays open."""
        for part in reversed(self.parts):
            part.close()
        for close in self._closers[1:]:
            close()
        self.config = config
        self._closers = self._closers[:1]
        session = self._session_lookup(config, self._closers)
        self.parts = []
        build_parts(config, self.outbox, session, into=self.parts)
        self.check_parts()

    def close(self) -> None:
        # Parts first: each finishes the object in hand and makes it durable before the outbox closes.
        for part in reversed(self.parts):
            part.close()
        for close in reversed(self._closers):
            close()

    def status_line(self) -> str:
        return "; ".join(p.status() for p in self.parts) or "no device links enabled"
