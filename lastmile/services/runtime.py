"""Run a long-lived Lastmile service under systemd: signals, readiness, watchdog, logging.

Both services (`lastmile acquire`, `lastmile forward`) are a `Service` driven by one
`ServiceRuntime`:

    runtime = ServiceRuntime("forward", load_config=lambda: config_from_args(args))
    return runtime.run(lambda config: ForwardService(config, alive=runtime.alive, stop=runtime.stop_event))

The runtime calls `setup(config)`, sends READY=1, then calls `service.step(stop)` until SIGTERM.
The watchdog is pinged after a step returned (or while waiting the delay a step asked for), and
during a step only as it makes progress (`alive()`, from any of its threads: the forwarder's
every stored object - a backlog on EDGE is a round of minutes), so a step that hangs stops the
pings and systemd kills and restarts the unit.
SIGTERM/SIGINT set `stop`: the step in hand finishes its write, then `close()` runs. SIGHUP
reloads the configuration (a bad file is logged and the running configuration kept).

Operational faults — the data directory unwritable, read-only, a file, full; a database error;
a name that does not resolve (`is_operational`) — are not bugs a restart cures: the runtime
logs one line (no traceback), shows it in STATUS= and tries again with a capped exponential
backoff, at set-up as at every step, instead of exiting for systemd to restart it every few
seconds. It is READY meanwhile (so systemd does not kill it at TimeoutStartSec), with the
fault in its status (`systemctl status`, `lastmile doctor`). Any other exception is a bug: logged
with its traceback, and the process exits non-zero (systemd restarts it).

Signal handlers do no work themselves: the kernel-level wakeup fd is read by a small thread that
sets the events, because setting a threading.Event from a Python signal handler can deadlock
when the main thread holds that event's lock.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from lastmile import logs
from lastmile.logs import PatientDataFilter, describe_fault, mask_patient_data
from lastmile.services.sdnotify import SystemdNotifier

if TYPE_CHECKING:
    from lastmile.config import Config, ConfigError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1  # systemd restarts us (Restart=on-failure)
EXIT_CONFIG = 78  # EX_CONFIG: the units list it in RestartPreventExitStatus
# how STATUS= begins while the configuration is refused (lastmile doctor reads it)
CONFIG_REFUSED = "configuration refused"
# marks, in STATUS=, work a service that is up cannot do now (a fault waited out, a part down, the
# forwarder's faults): `lastmile doctor` fails an active unit whose status has it
FAULT = "FAULT"
EXIT_RESTART = 75  # EX_TEMPFAIL: a service asked for a fresh start (Restart=on-failure gives it)
STATUS_INTERVAL_S = 1.0
FAULT_BACKOFF_FIRST_S = 5.0  # first retry after an operational fault, doubled each time
FAULT_BACKOFF_MAX_S = 300.0


def is_operational(exc: BaseException) -> bool:
    """A fault of the machine or its surroundings (disk, permissions, database, network), not
    of the code: worth waiting out, not worth a traceback."""
    import sqlite3

    from lastmile.data_dir import DataDirError
    from uploader.errors import UploadError

    if isinstance(exc, sqlite3.DatabaseError):  # locked, full, read-only, malformed; not a misuse
        return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError
    return isinstance(exc, (OSError, DataDirError, UploadError))


class RestartRequested(Exception):
    """Raised by a service's step or reload: exit with EXIT_RESTART so that systemd starts the
    process afresh (the console leaving its refused-configuration page for the real one)."""


class Service(Protocol):
    """One unit of a long-lived service, driven by `ServiceRuntime`."""

    def step(self, stop: threading.Event) -> float:
        """Do one unit of work; return seconds to wait before the next step (0 = at once).

        Must return well within the watchdog period (WatchdogSec/2), or call the runtime's
        `alive()` as it makes progress (each item of a batch); check `stop` between items. An
        exception is logged and the process exits non-zero (systemd restarts it).
        """
        ...

    def reload(self, config: Config) -> None:
        """Apply a new configuration (SIGHUP)."""
        ...

    def close(self) -> None:
        """Finish the write in hand and close associations cleanly."""
        ...

    def status_line(self) -> str:
        """One line for `systemctl status` (STATUS=); no patient data."""
        ...


class ServiceRuntime:
    """Drives one `Service`: signals, sd_notify readiness and a progress-gated watchdog."""

    def __init__(
        self,
        name: str,
        *,
        load_config: Callable[[], Config],
        watchdog_margin: float = 0.5,
        notifier: SystemdNotifier | None = None,
        install_signal_handlers: bool = True,
        configure_logging: bool = True,
        fault_backoff_s: tuple[float, float] = (FAULT_BACKOFF_FIRST_S, FAULT_BACKOFF_MAX_S),
    ) -> None:
        if not 0.0 < watchdog_margin < 1.0:
            raise ValueError("watchdog_margin is the fraction of WatchdogSec between pings: 0 < m < 1")
        self.name = name
        self.load_config = load_config
        self.watchdog_margin = watchdog_margin
        # Our children must not speak to systemd for us.
        self.notifier = notifier if notifier is not None else SystemdNotifier(unset_environment=True)
        self.install_signal_handlers = install_signal_handlers
        self.configure_logging = configure_logging
        self.stop_event = threading.Event()  # handed to every step
        self._wake = threading.Event()  # ends the wait between steps early
        self._reload_requested = False
        self._last_status = 0.0
        self._progress_made = 0  # `alive()` calls: progress inside a step
        self.started = time.monotonic() - process_age()
        self.ready_after: float | None = None  # seconds from process start to READY=1
        self.log_filter: PatientDataFilter | None = None
        self.fault: str | None = None  # the operational fault being waited out, for STATUS=
        self.fault_backoff_s = fault_backoff_s  # (first, cap) of the wait after an operational fault
        self._fault_delay = 0.0

    # -- requests (signal thread, tests, other threads) -------------------------------------------

    def request_stop(self) -> None:
        self.stop_event.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def alive(self) -> None:
        """The step in hand made progress (from any thread: an object stored, a request
        answered): the watchdog is fed as between steps. A step that makes none - hung on a
        peer, deadlocked - stops the pings all the same."""
        self._progress_made += 1
        self.notifier.watchdog_ping(min_interval=(self.ping_interval or 0.0) / 2)

    # -- the loop ---------------------------------------------------------------------------------

    @property
    def ping_interval(self) -> float | None:
        wd = self.notifier.watchdog_s
        return wd * self.watchdog_margin if wd else None

    def run(
        self,
        setup: Callable[[Config], Service],
        *,
        on_config_refused: Callable[[ConfigError], Service] | None = None,
    ) -> int:
        """Set up, announce READY, step until stopped; returns the process exit code.

        A refused configuration exits EXIT_CONFIG, unless `on_config_refused` gives a service to
        run instead (the console's page that says so); if that cannot start either, EXIT_CONFIG."""
        from lastmile.config import ConfigError

        signals = _SignalWatcher(self) if self.install_signal_handlers else None
        if self.install_signal_handlers and not faulthandler.is_enabled():
            # The watchdog kills with SIGABRT: the journal then shows where every thread hung.
            faulthandler.enable(all_threads=True)
        try:
            if signals:
                signals.install()
            try:
                config = self.load_config()
            except ConfigError as exc:
                self._early_logging()
                return self._refused(exc, on_config_refused)
            if self.configure_logging:
                self.log_filter = logs.configure_logging(config)
            log.info("%s starting (config %s, data %s)", self.name, config.source, config.data_dir)
            while True:
                try:
                    service = setup(config)
                    break
                except ConfigError as exc:
                    return self._refused(exc, on_config_refused)
                except Exception as exc:
                    if not is_operational(exc):
                        log.exception("%s could not start", self.name)
                        self.notifier.notify(f"STATUS={self.name}: start failed, see the journal")
                        return EXIT_FAILURE
                    self._wait_out_fault("cannot start", exc, announce_ready=True)
                    if self.stop_event.is_set():
                        return EXIT_OK
                    if self._reload_requested:  # the fix may be in the configuration
                        self._reload_requested = False
                        try:
                            config = self.load_config()
                        except ConfigError as cexc:
                            log.error("reload: configuration refused, keeping the running one: %s", cexc)
            self._fault_cleared()
            return self._serve(service)
        finally:
            if signals:
                signals.uninstall()

    def _refused(self, exc: ConfigError, fallback: Callable[[ConfigError], Service] | None) -> int:
        log.error("configuration refused: %s", exc)
        self.notifier.notify(f"STATUS={CONFIG_REFUSED}: {describe_fault(exc)}", "ERRNO=78")
        if fallback is None:
            return EXIT_CONFIG
        try:
            service = fallback(exc)
        except Exception:
            log.exception("%s: what runs while the configuration is refused could not start", self.name)
            return EXIT_CONFIG
        return self._serve(service)

    def _serve(self, service: Service) -> int:
        try:
            return self._loop(service)
        except RestartRequested as exc:
            log.warning("%s: %s", self.name, exc)
            return EXIT_RESTART
        finally:
            self.notifier.stopping(f"{self.name}: stopping")
            try:
                service.close()
            except Exception:
                log.exception("%s: close failed", self.name)
            log.info("%s stopped", self.name)

    def _loop(self, service: Service) -> int:
        self.ready_after = time.monotonic() - self.started
        self.notifier.ready(self._status(service))
        self.notifier.watchdog_ping()
        log.info(
            "%s ready after %.2f s (watchdog %s)",
            self.name,
            self.ready_after,
            f"{self.notifier.watchdog_s:g} s" if self.notifier.watchdog_s else "off",
        )
        stop = self.stop_event
        while not stop.is_set():
            if self._reload_requested:
                try:
                    self._reload(service)
                except RestartRequested:
                    raise
                except Exception:
                    log.exception("%s: reload failed; exiting so systemd restarts the service", self.name)
                    return EXIT_FAILURE
                continue
            began, progress = time.monotonic(), self._progress_made
            try:
                delay = service.step(stop)
            except RestartRequested:
                raise
            except Exception as exc:
                from uploader.sqlite_store import gave_up_at_stop

                if stop.is_set() and gave_up_at_stop(exc):  # the stop's doing, not a fault
                    log.info("%s: stopping: a write waiting for another process's database lock given up", self.name)
                    break
                if not is_operational(exc):
                    log.exception("%s: step failed; exiting so systemd restarts the service", self.name)
                    self.notifier.notify(f"STATUS={self.name}: failed, restarting (see the journal)")
                    return EXIT_FAILURE
                self._wait_out_fault("step failed", exc)
                continue
            self._fault_cleared()
            took = time.monotonic() - began
            interval = self.ping_interval
            if interval is not None and took > interval and self._progress_made == progress:
                log.warning(
                    "%s: a step took %.1f s; the watchdog allows %.1f s",
                    self.name,
                    took,
                    self.notifier.watchdog_s or 0.0,
                )
            self._progress(service)
            self._wait(float(delay or 0.0))
        return EXIT_OK

    def _wait_out_fault(self, what: str, exc: BaseException, *, announce_ready: bool = False) -> None:
        """Log an operational fault once per change (no traceback), show it, wait the backoff."""
        first, cap = self.fault_backoff_s
        self._fault_delay = min(cap, max(first, self._fault_delay * 2))
        text = mask_patient_data(describe_fault(exc), self.log_filter)
        line = f"{self.name}: {what}: {text}; retrying in {self._fault_delay:g} s"
        if text != self.fault:
            log.error("%s", line)
            log.debug("%s: details", self.name, exc_info=exc)
        else:
            log.info("%s", line)
        self.fault = text
        status = f"{FAULT} {line}"
        if announce_ready and self.ready_after is None:
            # waiting out a fault is not a failed start: no kill at TimeoutStartSec, no restart loop
            self.ready_after = time.monotonic() - self.started
            self.notifier.ready(status)
        else:
            self.notifier.notify(f"STATUS={status}")
        self.notifier.watchdog_ping()
        self._wait(self._fault_delay)

    def _fault_cleared(self) -> None:
        if self.fault is not None:
            log.info("%s: working again (was: %s)", self.name, self.fault)
        self.fault = None
        self._fault_delay = 0.0

    def _progress(self, service: Service) -> None:
        """The loop went round: keep the watchdog fed and the status current."""
        self.notifier.watchdog_ping(min_interval=(self.ping_interval or 0.0) / 2)
        now = time.monotonic()
        if now - self._last_status >= STATUS_INTERVAL_S:  # STATUS= is for humans: once a second
            self._last_status = now
            self.notifier.status(self._status(service))

    def _wait(self, delay: float) -> None:
        """Wait `delay` seconds or until woken; the loop is alive meanwhile, so keep pinging."""
        if delay <= 0:
            return
        deadline = time.monotonic() + delay
        while not self.stop_event.is_set() and not self._reload_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            interval = self.ping_interval
            if self._wake.wait(min(remaining, interval) if interval else remaining):
                self._wake.clear()
                return
            self.notifier.watchdog_ping(min_interval=(interval or 0.0) / 2)

    def _reload(self, service: Service) -> None:
        from lastmile.config import ConfigError

        self._reload_requested = False
        self.notifier.reloading()
        # A device service's reload stops its parts first, up to their whole deadline (24 s of
        # WatchdogSec=30): the watchdog's period counted from here, not from the last step.
        self.notifier.watchdog_ping()
        try:
            config = self.load_config()
        except ConfigError as exc:
            log.error("reload: configuration refused, keeping the running one: %s", exc)
            self.notifier.ready(f"{self._status(service)} (reload refused: {describe_fault(exc)})")
            return
        service.reload(config)
        if self.log_filter is not None:
            self.log_filter.configure(config)
        log.info("%s: configuration reloaded from %s", self.name, config.source)
        self.notifier.ready(self._status(service))

    def _status(self, service: Service) -> str:
        try:
            line = service.status_line()
        except Exception as exc:  # noqa: BLE001 — a status must never take the service down
            line = f"status unavailable ({type(exc).__name__})"
        return mask_patient_data(line, self.log_filter) if self.log_filter else line

    def _early_logging(self) -> None:
        if self.configure_logging and not logging.getLogger().handlers:
            logs.configure_logging(None)


class _SignalWatcher:
    """SIGTERM/SIGINT -> stop, SIGHUP -> reload, handled on a thread fed by the wakeup fd."""

    STOP = (signal.SIGTERM, signal.SIGINT)
    RELOAD = (signal.SIGHUP,)

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        self._previous: dict[int, object] = {}
        self._old_fd = -1
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._thread = threading.Thread(target=self._watch, name="signals", daemon=True)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        self._old_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for sig in self.STOP + self.RELOAD:
            self._previous[sig] = signal.signal(sig, _note_signal)
        self._thread.start()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        signal.set_wakeup_fd(self._old_fd)
        try:
            self._writer.send(b"\0")  # tells the watcher to end
        except OSError:
            pass
        self._thread.join(timeout=1.0)
        self._reader.close()
        self._writer.close()

    def _watch(self) -> None:
        while True:
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            for signum in data:
                if signum == 0:
                    return
                if signum in self.STOP:
                    log.info("signal %s: finishing the work in hand, then stopping", signal.Signals(signum).name)
                    self.runtime.request_stop()
                elif signum in self.RELOAD:
                    log.info("SIGHUP: reloading the configuration")
                    self.runtime.request_reload()


def process_age() -> float:
    """Seconds since this process started (from /proc; 0.0 where that cannot be read)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after "pid (comm)"
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, age)


def _note_signal(signum: int, frame: object) -> None:
    # The wakeup fd already carries the signal to the watcher thread; do nothing here.
    return None
