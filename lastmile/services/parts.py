"""Parts: the device links a device service (acquire, ble) runs, each on its own thread.

A part is checked by its service's `step()` (the loop the watchdog is tied to): a part whose
thread ended or failed (BlueZ not up yet, a port in use) is restarted with backoff and the
service stays up; a part that stops beating is wedged, and the check raises so the process exits
and systemd restarts it. A part that is down says so in its status with the runtime's FAULT
mark, which `lastmile doctor` reads: the unit is active, but not doing all its work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from lastmile.services.runtime import FAULT

log = logging.getLogger(__name__)

STEP_S = 1.0  # how often the parts are checked
STALE_S = 20.0  # a link that has not gone round for this long is wedged (the units' WatchdogSec=30)
RESTART_BACKOFF_S = (5.0, 300.0)  # first and longest wait before restarting a failed part
# The parts' stop, all together (a card's check-in waiting clinic.db's lock: about 18 s at worst),
# within the units' TimeoutStopSec=30 less the stores' close and the process's exit; at a reload,
# within their WatchdogSec=30.
PARTS_STOP_S = 24.0

Beat = Callable[[], None]


def restart_wait(failures: int) -> float:
    """Seconds before the next start of a part that failed `failures` times in a row."""
    low, high = RESTART_BACKOFF_S
    return min(high, low * 2 ** min(failures - 1, 10))


def down_status(name: str, error: str) -> str:
    return f"{FAULT} {name} down ({error or 'starting'})"


class Wedged(RuntimeError):
    """A part stopped making progress; only a restart of the process will help."""


class Part(Protocol):
    name: str
    # What a stop that could not wait for it means for what it was writing (said in the journal).
    left_at_stop: str

    def check(self, now: float) -> None:
        """Restart what ended; raise Wedged if something hangs."""
        ...

    def status(self) -> str: ...

    def stop_soon(self) -> None:
        """Tell it to stop after what it has in hand, not waiting (`close` waits)."""
        ...

    def close(self) -> None: ...

    def finished(self) -> bool:
        """After `close`: none of its threads runs any more, so what it used (the outbox,
        clinic.db) may be closed. A close that gave up waiting for a thread leaves it running."""
        ...


def close_parts(parts: Sequence[Part], *, within_s: float) -> list[Part]:
    """Every part told to stop first, then all closed together, the whole within `within_s`: one
    after another, each kept going while the one before was waited for (a USB import's 15 s,
    then a card scanned meanwhile waiting clinic.db's lock: past the unit's TimeoutStopSec, and
    SIGKILL rolled back the card's check-in). Returns the parts still closing at the end, or
    whose thread outlived their close (said): the caller must not close a store under them - a
    sqlite3 connection closed under another thread's statement crashes the process (exit 139)."""
    for part in parts:
        part.stop_soon()
    ends_by = time.monotonic() + within_s
    closing = [threading.Thread(target=_close_said, args=(part,), name=f"close-{part.name}") for part in parts]
    for thread in closing:
        thread.daemon = True  # one still busy at the end goes with the process
        thread.start()
    while True:
        still = [part for part, thread in zip(parts, closing) if thread.is_alive() or not part.finished()]
        if not still or time.monotonic() >= ends_by:
            break
        time.sleep(CLOSE_POLL_S)
    for part in still:
        log.warning(
            "%s: still closing %g s into the stop: left to finish on its own, nothing it uses closed under it; %s",
            part.name,
            within_s,
            part.left_at_stop or "what it was writing is rolled back whole if the process ends first",
        )
    return still


CLOSE_POLL_S = 0.05  # how often close_parts looks whether every part has finished


class LeftParts:
    """The parts a reload could not wait for (`close_parts` returned them still closing): they may
    still use the stores, which the service must not close under them. Each is forgotten once it
    has finished (said), so a service reloaded again and again holds none that ended."""

    def __init__(self) -> None:
        self._parts: list[Part] = []

    def __bool__(self) -> bool:
        """Whether any is remembered: left by a reload, not yet seen finished."""
        return bool(self._parts)

    def add(self, parts: Sequence[Part]) -> None:
        self._parts += parts

    def forget_finished(self) -> list[Part]:
        """The parts still closing; those finished since are forgotten."""
        still: list[Part] = []
        for part in self._parts:
            if part.finished():
                log.info("%s: the link a reload left has finished", part.name)
            else:
                still.append(part)
        self._parts = still
        return list(still)


def _close_said(part: Part) -> None:
    try:
        part.close()
    except Exception:
        log.exception("%s: close failed", part.name)


class RestartBackoff:
    """A part's failures in a row, the last one's reason, and when it may start again."""

    def __init__(self) -> None:
        self.failures = 0
        self.last_error = ""
        self.next_start = 0.0

    def failed(self, reason: str, now: float) -> float:
        """One more failure at `now`: the wait before the next start (`restart_wait`)."""
        self.failures += 1
        self.last_error = reason
        wait = restart_wait(self.failures)
        self.next_start = now + wait
        return wait


class WorkerPart(RestartBackoff):
    """Runs `work(stop, beat)` on a thread; restarts it with backoff when it ends or fails.

    `stale_after`: seconds without a `beat()` after which the part counts as wedged (None: never).
    `note`: what its status says after "up"/"down" (the serial devices refused at start).
    `left_at_stop`: what a stop that could not wait for its thread means for what it was writing.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[threading.Event, Beat], None],
        *,
        stale_after: float | None = STALE_S,
        on_close: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        note: str = "",
        left_at_stop: str = "",
    ) -> None:
        super().__init__()
        self.name = name
        self.note = note
        self.left_at_stop = left_at_stop
        self.work = work
        self.stale_after = stale_after
        self.on_close = on_close
        self.clock = clock
        self.stop = threading.Event()
        self.last_beat = clock()
        self.thread: threading.Thread | None = None
        self.closed = threading.Event()  # its close has returned, `on_close` done

    def beat(self) -> None:
        self.last_beat = self.clock()

    def start(self) -> None:
        self.last_beat = self.clock()
        self.thread = threading.Thread(target=self._run, name=f"part-{self.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.work(self.stop, self.beat)
            if not self.stop.is_set():
                self._failed("ended")
        except Exception as exc:
            from uploader.sqlite_store import gave_up_at_stop

            if gave_up_at_stop(exc):  # the service's stop, no fault: what was in hand is the next start's
                log.info("%s: stopping: a write waiting for another process's lock given up: %s", self.name, exc)
            elif not self.stop.is_set():
                log.warning("%s: %s: %s", self.name, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                self._failed(f"{type(exc).__name__}: {exc}")

    def _failed(self, reason: str) -> None:
        wait = self.failed(reason, self.clock())
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
        text = f"{self.name} up" if self.running else down_status(self.name, self.last_error)
        return f"{text}, {self.note}" if self.note else text

    def stop_soon(self) -> None:
        self.stop.set()

    def close(self) -> None:
        """Stop: the thread finishes what it has in hand (a report being stored) first; only then
        `on_close` tears down what it was using (the serial links, clinic.db). The other way
        round, the readings still to be stored met a closed database and went with the process."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=15)
            if self.thread.is_alive():
                log.warning("%s: still busy at shutdown", self.name)
        if self.on_close is not None:
            try:
                self.on_close()
            except Exception:
                log.exception("%s: close failed", self.name)
        self.closed.set()

    def finished(self) -> bool:
        # The serial part's close leaves the links and clinic.db to a turn still under way: its thread.
        return self.closed.is_set() and not self.running


class Listener(Protocol):
    """A server that runs its own threads once started (the LAN storage SCP: pynetdicom's)."""

    @property
    def port(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def stop_storing(self, timeout_s: float) -> bool:
        """Refuse objects from now on, once the one being stored is (waited up to `timeout_s`)."""
        ...

    def storing(self) -> bool: ...


class ReceiverPart(RestartBackoff):
    """The LAN storage SCP, started by `check`, and started again with backoff while it cannot
    listen: a port another program holds, the clinic LAN's address not assigned yet at boot (the
    LAN switch off). Meanwhile the other parts - serial devices, USB sticks, GPS - go on."""

    name = "lan-receiver"
    left_at_stop = "an ECG being received is not acknowledged: the cart sends it again"
    STORING_WAIT_S = 15.0  # for the object being stored at the stop, as a worker's thread is waited for

    def __init__(self, receiver: Listener) -> None:
        super().__init__()
        self.receiver = receiver
        self.listening = False
        self.closed = threading.Event()

    def check(self, now: float) -> None:
        if self.listening or now < self.next_start:
            return
        try:
            self.receiver.start()
        except OSError as exc:  # the machine's fault, not ours: say it, try again later
            wait = self.failed(f"{type(exc).__name__}: {exc}", now)
            (log.error if self.failures == 1 else log.info)(
                "%s: cannot listen (%s); the other device links go on; trying again in %.0f s",
                self.name,
                self.last_error,
                wait,
            )
            return
        if self.failures:
            log.info("%s: listening again (was: %s)", self.name, self.last_error)
        self.listening, self.failures, self.last_error = True, 0, ""

    def status(self) -> str:
        if self.listening:
            return f"{self.name} :{self.receiver.port}"
        return down_status(self.name, self.last_error)

    def stop_soon(self) -> None:
        """Its server's threads are stopped by `close`."""

    def close(self) -> None:
        """No new association, and no new object from those under way (a cart's association
        outlives the server's stop): the object in hand is stored first (its C-STORE handler
        writes to the outbox and reads clinic.db's session), waited for as a worker's thread is."""
        if self.listening:
            self.listening = False
            self.receiver.stop()
        if not self.receiver.stop_storing(self.STORING_WAIT_S):
            log.warning("%s: still storing an object at shutdown", self.name)
        self.closed.set()

    def finished(self) -> bool:
        return self.closed.is_set() and not self.receiver.storing()
