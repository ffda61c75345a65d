"""STAT takes the link: while routine objects are on the wire, watch for a STAT item.

A STAT ECG (chest pain → PCI) that becomes durable while a forwarder round is sending routine
studies must not wait for the round, nor share a slow link with it. During a round, a thread asks
the outbox every `poll_s` whether a STAT item is due. Once one is (`stat_due`):

- every association stops taking routine objects at its next object boundary; the first there
  claims the STAT object(s) and carries them on its open association (no association to
  negotiate first: `carrying`/`carried`); the others wait (`wait_clear`) until the STAT items are
  sent, then every association goes on with the round's routine objects - a STAT study pauses
  the backlog, it does not end its round (a new round would pay a round trip per association);
- a routine transfer still on the wire that is expected to need more than `cut_after_s` is cut
  (connection dropped): on a slow link it would hold the link for seconds. The cut item goes back
  to the queue uncharged (the fault is not its) and is sent later with the same UIDs;
- with no open association left to carry it (every one was cut, or the last one ended),
  `new_carrier` opens one for it at once (`needs_new_carrier`, the one place that decides).

On a fast link transfers end within milliseconds and nothing is cut.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from uploader.dicom_store import StoreAssociation
from uploader.outbox import Outbox, OutboxItem

log = logging.getLogger(__name__)


class TransferRate:
    """Payload bytes per second one association achieves (smoothed over the last objects)."""

    SMOOTHING = 0.3

    def __init__(self) -> None:
        self.bytes_per_s: float | None = None

    def observe(self, size: int, seconds: float) -> None:
        if size <= 0 or seconds <= 0:
            return
        rate = size / seconds
        old = self.bytes_per_s
        self.bytes_per_s = rate if old is None else old + self.SMOOTHING * (rate - old)

    def remaining_s(self, size: int, elapsed_s: float) -> float | None:
        """Expected seconds still needed by a transfer of `size` bytes started `elapsed_s` ago
        (None: no rate known yet)."""
        if self.bytes_per_s is None:
            return None
        return size / self.bytes_per_s - elapsed_s


@dataclass
class InFlight:
    assoc: StoreAssociation
    item: OutboxItem
    started: float  # time.monotonic()


class StatWatch:
    """One per round that sends routine items: `with StatWatch(...) as watch:`; senders call
    `sending()`/`finished()` around each C-STORE and check `stat_due` between objects."""

    def __init__(
        self,
        outbox: Outbox,
        kind: str,
        clock: Callable[[], float],
        rate: TransferRate,
        *,
        poll_s: float = 0.025,
        cut_after_s: float | None = 0.2,  # None: never cut a transfer
        # False for an association whose object has left (it waits for its response): cutting it
        # frees nothing on the link and loses a transfer already made
        still_sending: Callable[[StoreAssociation], bool] | None = None,
        open_associations: Callable[[], Iterable[StoreAssociation]] = tuple,  # the round's, open now
        new_carrier: Callable[[], None] | None = None,  # opens an association for the STAT items due
    ) -> None:
        self.still_sending = still_sending
        self.open_associations = open_associations
        self.new_carrier = new_carrier
        self.outbox = outbox
        self.kind = kind
        self.clock = clock
        self.rate = rate
        self.poll_s = poll_s
        self.cut_after_s = cut_after_s
        self.stat_due = threading.Event()
        self._carriers = 0  # associations sending STAT items now
        self._clear = threading.Condition()  # notified when stat_due is cleared
        self._lock = threading.Lock()
        self._in_flight: dict[int, InFlight] = {}  # id(assoc) → what it is sending
        self._cut: set[int] = set()  # id(assoc) of associations cut
        self._done = threading.Event()
        self._look = threading.Event()  # look now, not at the next poll (the last carrier is done)
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StatWatch:
        self._thread = threading.Thread(target=self._run, name="stat-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._look.set()
        if self._thread is not None:
            self._thread.join()

    def sending(self, assoc: StoreAssociation, item: OutboxItem) -> None:
        with self._lock:
            self._in_flight[id(assoc)] = InFlight(assoc, item, time.monotonic())

    def finished(self, assoc: StoreAssociation, *, stored: bool) -> None:
        with self._lock:
            flight = self._in_flight.pop(id(assoc), None)
        if flight is not None and stored:
            self.rate.observe(flight.item.size, time.monotonic() - flight.started)

    def carrying(self) -> None:
        """An association is about to claim STAT items and send them (said before the claim:
        the watch must not see the items claimed, no carrier, and let routine sending go on)."""
        with self._clear:
            self._carriers += 1

    def carried(self) -> None:
        """An association sent the STAT items it claimed (or found none to claim): the watch
        looks at once whether any is left to carry (on its own thread: the outbox is not asked
        with the watch's lock held on a sender's), and with none routine sending goes on."""
        with self._clear:
            self._carriers -= 1
            if self._carriers == 0:
                self._look.set()

    def needs_new_carrier(self) -> bool:
        """Whether the STAT items due need an association of their own: no open association of
        the round is left to carry them at its next object boundary (every one was cut, or none
        is open). Otherwise an open one carries them, without a new one's round trip."""
        if not self.stat_due.is_set():
            return False
        open_now = list(self.open_associations())  # (before our lock: the caller's lock comes first)
        with self._lock:
            return all(id(a) in self._cut for a in open_now)

    def carry_if_orphaned(self) -> None:
        """After an association of the round ended or was cut: if no open one is left to carry
        the STAT items due, a new one carries them (`new_carrier`), now."""
        if self.new_carrier is not None and self.needs_new_carrier():
            self.new_carrier()

    def wait_clear(self, stop: threading.Event) -> None:
        """Until no STAT item is due or being carried (or `stop`): another association carries
        them, and the link is theirs meanwhile."""
        with self._clear:
            while self.stat_due.is_set() and not stop.is_set() and not self._done.is_set():
                self._clear.wait(self.poll_s)

    def was_cut(self, assoc: StoreAssociation) -> bool:
        with self._lock:
            return id(assoc) in self._cut

    def _run(self) -> None:
        while not self._done.is_set():
            self._look.wait(self.poll_s)
            self._look.clear()
            if self._done.is_set():
                return
            try:
                with self._clear:
                    if self._carriers == 0:  # (while one carries them, the carrier says when they are sent)
                        waiting = self.outbox.stat_waiting(self.kind, self.clock())
                        if waiting and not self.stat_due.is_set():
                            log.info("a STAT study is waiting: routine sending yields the link")
                            self.stat_due.set()
                        elif not waiting and self.stat_due.is_set():
                            self.stat_due.clear()  # e.g. another process took it: routine goes on
                            self._clear.notify_all()
            except Exception as exc:  # noqa: BLE001 — the outbox closing under us ends the watch, not the round
                log.debug("STAT watch stopped: %s", exc)
                return
            if self.stat_due.is_set():
                self._cut_slow_transfers()

    def _cut_slow_transfers(self) -> None:
        if self.cut_after_s is None:
            return
        now = time.monotonic()
        with self._lock:
            flights = [f for f in self._in_flight.values() if id(f.assoc) not in self._cut]
        for f in flights:
            if self.still_sending is not None and not self.still_sending(f.assoc):
                continue
            elapsed = now - f.started
            remaining = self.rate.remaining_s(f.item.size, elapsed)
            # no rate known yet: a transfer already slower than the threshold is a slow one
            if (elapsed if remaining is None else remaining) <= self.cut_after_s:
                continue
            with self._lock:
                if self._in_flight.get(id(f.assoc)) is not f:
                    continue  # it ended meanwhile
                self._cut.add(id(f.assoc))
            log.info(
                "cutting routine transfer of outbox item %d (%.1f s in) so that the STAT study gets the link",
                f.item.id,
                elapsed,
            )
            f.assoc.cut()
            # a new association for the STAT item now if no open one is left to carry it, not
            # once the cut one is cleaned up
            self.carry_if_orphaned()
