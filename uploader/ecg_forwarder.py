"""Outbox → reading center: send queued DICOM objects, then get the PACS to commit to them.

One `step()` is one round: claim due items (STAT first), send them over up to N parallel
associations, ask for storage commitment for what was sent, re-ask where no report came in
time, purge what is committed. Item by item the outcome is typed:

- success/warning → `sent`, then `committed` when the PACS's N-EVENT-REPORT lists it;
- transient (0xA7xx, association aborted/refused/timed out) → queued again with backoff;
- permanent (0xA9xx, 0xCxxx ...) → quarantined with the status and its meaning;
- the peer refusing *us* (association rejected permanently) → a configuration fault: every
  item goes back to the queue uncharged, the fault is recorded for `lastmile queue`/`echo`,
  and we retry slowly. Nothing is quarantined for a fault that is not the item's.

Each send is charged before its bytes go out (`Outbox.begin_send`): a forwarder killed mid-send
(OOM, a crash in a library) has paid for it, and an item that kills it `max_interrupted_sends`
times in a row is quarantined. Items with an interrupted send behind them are sent alone, one
at a time, so the others in flight with a crashing object are not blamed with it.

A STAT item takes the link: a round with STAT items due sends only those; a round sending routine
items yields to a STAT item that becomes due meanwhile (uploader/stat_watch.py: between objects,
where an open association carries it, and by cutting a slow transfer on the wire, which goes back
to the queue uncharged; with no open association left to carry it, it goes at once on one of its
own, `StatLane`). Routine objects are paced just below the link's measured rate
(uploader/link_pacing.py) so that little waits in the modem's buffer ahead of a STAT one. With a
`meter` (uploader/metering.py), routine items wait outside the send windows and once the day's
byte budget is spent; STAT items go regardless. The budget counts what the carrier bills: every
byte an association wrote on the link (set-up, commands, PDU headers, objects whole or cut short).

Storage commitment reports come to a `CommitmentListener` bound to this gateway's address toward
the reading center (or `listen_host`), accepting only the reading center (its AE title, from its
address or `report_networks`). A report is believed only for a transaction this gateway issued
(the outbox remembers the last few per item) and only for the instances in it; anything else is
refused with a failure status and changes nothing. Without storage commitment
(`storage_commitment = False`, or a peer that has none), `no_commitment_policy` decides: "keep"
the local copies, or "purge" them once sent.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import generate_uid

from uploader.dicom_association import PeerSettings
from uploader.dicom_commitment import (
    CommitmentListener,
    CommitmentReport,
    ExtraStorage,
    FailedAction,
    ReportRefused,
    ReportSenders,
    failure_action,
)
from uploader.dicom_store import CommitmentUnsupported, StoreAssociation
from uploader.errors import ConfigurationFault, CorruptPayloadError, PermanentError, TransientError
from uploader.fhir_link import LAST_ERROR_AT
from uploader.link_pacing import LinkPacer
from uploader.metering import SENDER_IDLE_POLL_S, Meter, MeterPolicy
from uploader.outbox import (
    DEFAULT_MAX_INTERRUPTED_SENDS,
    ItemState,
    Kind,
    Outbox,
    OutboxItem,
    Priority,
)
from uploader.reachability import address_toward
from uploader.stat_watch import StatWatch, TransferRate

log = logging.getLogger(__name__)

STATUS_NAME = "reading_center"
YIELDED_TO_STAT = "waited for a STAT study to go first"
LINK_STATUS_NAME = "reading_center_link"  # the link's measured rate, kept across restarts
LINK_RATE_CHANGE = 0.05  # kept again when it moved by more than this fraction
RESPONSE_MARGIN_S = 0.05  # the peer's time to store an object, on top of the round trip
DEFAULT_MAX_COMMITMENT_FAILURES = 10  # ~10 resends of a 100-250 KB ECG on a metered link, then a person looks


@dataclass(frozen=True)
class ForwarderSettings:
    peer: PeerSettings
    associations: int = 2
    max_associations: int = 0  # more where the round trip is long against an object's time; 0: `associations`
    batch_size: int = 50
    storage_commitment: bool = True
    listen_port: int = 11113
    listen_host: str = ""  # "": this gateway's address toward the reading center
    report_networks: tuple[str, ...] = ()  # besides the reading center's own address
    commitment_timeout_s: float = 120.0
    no_commitment_policy: str = "keep"  # "keep" or "purge"
    config_fault_retry_s: float = 300.0
    retention_s: float = 0.0
    idle_poll_s: float = SENDER_IDLE_POLL_S
    max_interrupted_sends: int = DEFAULT_MAX_INTERRUPTED_SENDS
    # an instance the PACS fails to commit this many times (resent or re-asked) is quarantined
    max_commitment_failures: int = DEFAULT_MAX_COMMITMENT_FAILURES
    stat_poll_s: float = 0.01  # how often a round sending routine items looks for a STAT one (~10 µs a look)
    stat_cut_after_s: float | None = 0.05  # cut a routine transfer with more than this to go; None: never
    meter: MeterPolicy | None = None  # daily budget and send windows for routine items (STAT exempt)
    also_store: ExtraStorage | None = None  # the commitment listener also takes these (reports C-MOVEd to our AE)


@dataclass
class RoundResult:
    """What one `step()` did; the forward service logs it and the demo shows it."""

    sent: int = 0
    transient: int = 0
    quarantined: int = 0
    committed: int = 0
    requeued: int = 0
    purged: int = 0
    fault: str | None = None
    errors: list[str] = field(default_factory=list)
    cut: bool = False  # (one association's) cut for a STAT study: the round replaces it

    @property
    def did_work(self) -> bool:
        return bool(self.sent or self.transient or self.quarantined or self.committed or self.requeued or self.purged)

    def add_sends(self, other: RoundResult) -> None:
        """Count another association's sends (a round's lanes, a STAT carried after them) in this one."""
        self.sent += other.sent
        self.transient += other.transient
        self.quarantined += other.quarantined
        self.errors += other.errors


EventCallback = Callable[[str, dict[str, Any]], None]


class StatLane:
    """The round's sender of STAT items on an association of their own, when no open association
    of the round can carry them (`StatWatch.needs_new_carrier`): one thread at a time, which
    sends what is due and looks again if it was asked to meanwhile (a second STAT study that came
    while it sent the first is not left for the next round)."""

    def __init__(self, send: Callable[[], list[RoundResult]]) -> None:
        self._send = send
        self._threads: list[threading.Thread] = []
        self._results: list[RoundResult] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._again = False  # asked to look (again) for STAT items since its last look
        self._running = False

    def start(self) -> None:
        with self._lock:
            self._again = True
            if self._running:
                return  # it looks again once it sent what it has
            self._running = True
            thread = threading.Thread(target=self._run, name="dicom-send-stat", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._again or self._errors:
                    self._running = False
                    return
                self._again = False
            try:
                self._results += self._send()
            except BaseException as exc:  # noqa: BLE001 — re-raised by join() in the round's thread
                self._errors.append(exc)

    def wait(self) -> None:
        """Wait for its threads to end, whatever they raised (the round is failing already)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()

    def join(self) -> list[RoundResult]:
        """(once the round's associations have ended: nothing starts it any more)"""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        return self._results


class RoundItems:
    """The items one round claimed (all STAT or all routine), shared by its associations: each
    takes the next one when it is ready to send it. An association added mid-round (the link
    turned out slow against its round trip, `associations_for_link`) gets its share at once, and
    no association sits idle while another still has a backlog. What no association took (all
    died, or the round stopped) is dealt with by the round (`EcgForwarder._send_round`)."""

    def __init__(self, items: Sequence[OutboxItem]) -> None:
        self._items = list(items)
        self._lock = threading.Lock()
        # routine items are paced below the link's rate and yield to STAT ones; STAT items go at once
        self.routine = bool(self._items) and self._items[0].priority != Priority.STAT
        # after each object stored: add associations? (a round that may grow sets it)
        self.on_stored: Callable[[], None] = lambda: None
        self.failure: TransientError | None = None  # the link failure an association died of

    def __len__(self) -> int:
        return len(self._items)

    def take(self) -> list[OutboxItem]:
        """The next item (empty: none left)."""
        with self._lock:
            return [self._items.pop(0)] if self._items else []

    def take_all(self) -> list[OutboxItem]:
        with self._lock:
            items, self._items = self._items, []
            return items


@dataclass(frozen=True)
class SendRound:
    """What a round's associations share: the items they take one at a time, the event that stops
    the round, the configuration faults they met (the peer refusing us: the round raises the first)
    and, in a round sending routine items, the watch that makes it yield to STAT."""

    share: RoundItems
    stop: threading.Event
    faults: list[str]
    watch: StatWatch | None = None


class LanePool:
    """A round's associations (`EcgForwarder._send_round` with more than one), each on a thread
    of its own; more join as the link measured so far asks for them (`lanes_for_link`), up to
    `most`. One per round: `run()` once."""

    def __init__(
        self,
        round_: SendRound,
        most: int,
        *,
        send_lane: Callable[[SendRound], RoundResult],
        lanes_for_link: Callable[[], int],
    ) -> None:
        self._round = round_
        self._most = most
        self._send_lane = send_lane
        self._lanes_for_link = lanes_for_link
        self._pool = ThreadPoolExecutor(max_workers=most, thread_name_prefix="dicom-send")
        self._futures: list[Future[RoundResult]] = []
        # reentrant: a lane that ended before its done-callback was added calls back at once
        self._grow = threading.RLock()
        self._peak = 0  # the most associations this round had open at once
        self._closing = False  # every lane ended: the pool takes no more

    def run(self, lanes: int) -> list[RoundResult]:
        """Start `lanes` associations; return every association's result once all ended."""
        with self._pool:
            self._round.share.on_stored = lambda: self._add_lanes(self._lanes_for_link())
            self._add_lanes(lanes)
            outcomes: list[RoundResult] = []
            try:
                while True:
                    with self._grow:
                        if len(outcomes) == len(self._futures):
                            break
                        future = self._futures[len(outcomes)]
                    outcomes.append(future.result())
            finally:
                with self._grow:
                    self._closing = True  # (a lane's bug raised here too: the pool shuts down)
        return outcomes

    def _add_lanes(self, wanted: int) -> None:
        round_ = self._round
        with self._grow:
            if self._closing or round_.stop.is_set() or round_.faults or round_.share.failure is not None:
                return  # the round is ending: no new association for it
            # associations of this round still open; none without an item to take
            live = sum(not f.done() for f in self._futures)
            if round_.watch is not None and round_.watch.stat_due.is_set():
                # none more while a STAT study is due, but one cut for it is replaced:
                # the next STAT study finds one free at its object boundary, not every
                # one waiting for a response (satellite: 570 ms late)
                wanted = min(wanted, self._peak)
            wanted = min(wanted, self._most, live + len(round_.share))
            self._peak = max(self._peak, wanted)
            while live < wanted:
                future = self._pool.submit(self._send_lane, round_)
                self._futures.append(future)
                future.add_done_callback(self._replace_if_cut)
                live += 1

    def _replace_if_cut(self, future: Future[RoundResult]) -> None:
        if future.exception() is None and future.result().cut:
            self._add_lanes(self._lanes_for_link())


class EcgForwarder:
    def __init__(
        self,
        outbox: Outbox,
        settings: ForwarderSettings,
        *,
        clock: Callable[[], float] = time.time,
        on_event: EventCallback | None = None,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self.clock = clock
        self.on_event = on_event or (lambda kind, info: None)
        self._listener: CommitmentListener | None = None
        self._report_lock = threading.Lock()
        self._pending_committed = 0
        self._commitment_unsupported_until = 0.0
        self._fault_until = 0.0
        self._no_route_logged = False
        self._rate = TransferRate()  # per association, what STAT preemption estimates with
        self.pacer = LinkPacer()  # routine sends just below the link's rate (uploader/link_pacing.py)
        # the rate the last process measured: a backlog after a restart is paced from its first byte
        self._link_kept = outbox.status(LINK_STATUS_NAME)
        self.pacer.remember(self._link_kept)
        self._open: set[StoreAssociation] = set()  # associations sending now (they share the link's rate)
        self._object_bytes: float | None = None  # a routine object's wire bytes (smoothed)
        self._lanes_lock = threading.Lock()
        self.meter = Meter.charging("dicom", settings.meter, outbox) if settings.meter is not None else None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._ensure_listener()

    def _listen_host(self) -> str | None:
        if self.settings.listen_host:
            return self.settings.listen_host
        peer = self.settings.peer
        try:
            host = address_toward(peer.host, peer.port)
        except OSError as exc:  # no route yet (link down at boot): listen once there is one
            if not self._no_route_logged:
                log.warning("no route to the reading center %s (%s): commitment listener waits", peer.where, exc)
                self._no_route_logged = True
            return None
        self._no_route_logged = False
        return host

    def _ensure_listener(self) -> None:
        """Listen for commitment reports on the address toward the reading center; follow it
        when it changes (DHCP), start once a route exists."""
        if not self.settings.storage_commitment:
            return
        host = self._listen_host()
        if host is None or (self._listener is not None and self._listener.host == host):
            return
        if self._listener is not None:
            log.info("the address toward the reading center is now %s: moving the commitment listener", host)
            self._listener.stop()
            self._listener = None
        peer = self.settings.peer
        listener = CommitmentListener(
            peer.calling_ae,
            self.settings.listen_port,
            self._on_report,
            ReportSenders(ae_titles=(peer.called_ae,), hosts=(peer.host,), networks=self.settings.report_networks),
            host=host,
            tls=peer.tls,
            also_store=self.settings.also_store,
        )
        listener.start()
        self._listener = listener

    @property
    def listener_address(self) -> tuple[str, int] | None:
        return self._listener.address if self._listener is not None else None

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def __enter__(self) -> EcgForwarder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one round ---------------------------------------------------------------------------
    def step(self, stop: threading.Event | None = None) -> float:
        """Do one round of work; return how long to wait before the next one."""
        stop = stop or threading.Event()
        result = self.run_round(stop)
        if result.did_work:
            return 0.0
        return self.next_due_in()

    def run_round(self, stop: threading.Event) -> RoundResult:
        result = RoundResult()
        now = self.clock()
        if now < self._fault_until:
            result.fault = (self.outbox.status(STATUS_NAME) or {}).get("fault")
            return result
        with self._report_lock:
            result.committed += self._pending_committed
            self._pending_committed = 0
        try:
            self._ensure_listener()
            self._ask_commitment(result, now)
            if not stop.is_set():
                self._send_due(result, stop)
            result.committed += self._settle_without_commitment()
        except ConfigurationFault as exc:
            self._record_fault(str(exc))
            result.fault = str(exc)
        result.purged = self.outbox.purge_due(self.clock(), self.settings.retention_s)
        if result.purged:
            self.on_event("purged", {"count": result.purged})
        return result

    def next_due_in(self) -> float:
        """Seconds until this forwarder wants its next round when it has nothing to do now
        (longer while the peer refuses our configuration)."""
        now = self.clock()
        if now < self._fault_until:
            return min(self._fault_until - now, self.settings.idle_poll_s * 5)
        return self.settings.idle_poll_s

    # -- sending -----------------------------------------------------------------------------
    def _send_due(self, result: RoundResult, stop: threading.Event) -> None:
        s = self.settings
        # STAT items take the link alone: no routine object shares it with them; routine ones
        # wait while the link is metered shut (outside its windows, or the day's budget spent)
        lanes = self.associations_for_link()
        items = self._claim(lanes * s.batch_size, Priority.STAT)
        if not items and not self._metered_shut():
            items = self._claim(lanes * s.batch_size)
        if not items:
            return
        suspects = [i for i in items if i.interrupted_sends]
        if suspects:
            # a send was cut short (the process died) with these in flight: send them alone, one
            # at a time, so that only the object that kills us is counted against
            others = [i.id for i in items if not i.interrupted_sends]
            self.outbox.release(others, "waiting while a suspect item is sent alone", self.clock(), 0.0)
            items = suspects
            n = 1
        else:
            n = max(1, min(lanes, len(items)))
        share = RoundItems(items)
        faults: list[str] = []
        if not share.routine:
            outcomes = self._send_round(SendRound(share, stop, faults), n)  # STAT: nothing to yield to
        else:
            stat_lane = StatLane(lambda: self._send_stat(stop, faults))
            watch = StatWatch(
                self.outbox,
                Kind.DICOM,
                self.clock,
                self._rate,
                poll_s=s.stat_poll_s,
                cut_after_s=s.stat_cut_after_s,
                still_sending=self._still_sending,
                open_associations=self._open_associations,
                new_carrier=lambda: None if stop.is_set() or faults else stat_lane.start(),
            )
            # suspects stay on their one association; a routine backlog gets more as the link asks
            most = n if suspects else max(n, s.associations, s.max_associations)
            try:
                with watch:
                    outcomes = self._send_round(SendRound(share, stop, faults, watch), n, most)
            except BaseException:
                stat_lane.wait()  # its claims are its own until it ends: not released under it
                raise
            outcomes += stat_lane.join()
        for lane_result in outcomes:
            result.add_sends(lane_result)
        self._keep_link_rate()
        if faults:
            raise ConfigurationFault(faults[0])
        if result.sent:
            self._update_status(fault=None, last_success=self.clock())

    def _observe_object_bytes(self, wire_bytes: int) -> None:
        old = self._object_bytes
        self._object_bytes = float(wire_bytes) if old is None else old + 0.2 * (wire_bytes - old)

    def _keep_link_rate(self) -> None:
        """Record the link's measured rate for the next start, when it changed by more than a
        little (not a write per round)."""
        now = self.pacer.remembered()
        if now is None or self.pacer.pace is None:
            return  # nothing new, or a link not paced (a LAN): nothing to start paced with
        if self._object_bytes is not None:
            now["object_bytes"] = round(self._object_bytes)
        kept = (self._link_kept or {}).get("bytes_per_s") or 0.0
        if kept and abs(now["bytes_per_s"] - kept) <= LINK_RATE_CHANGE * kept:
            return
        try:
            self.outbox.record_status(LINK_STATUS_NAME, now, self.clock())
        except sqlite3.OperationalError as exc:  # a full disk: measured again next time
            log.debug("link rate not kept: %s", exc)
            return
        self._link_kept = now

    def associations_for_link(self) -> int:
        """Associations for this round: `associations`, and more (up to `max_associations`) on a
        paced link whose round trip is long against an object's time there - with one object on
        the link at a time, the others wait for their responses meanwhile: 1 + RTT ÷ object time
        keep it busy, and one more waits for its turn, free to carry a STAT study at once (not a
        round trip later, once its response came) (satellite: 1 Mbit/s, 650 ms, 75 kB objects → 4)."""
        s = self.settings
        most = max(s.associations, s.max_associations)
        kept = self._link_kept or {}  # before this process measured them: what the last one kept
        pace, rtt = self.pacer.pace, self.pacer.rtt_s or kept.get("rtt_s")
        size = self._object_bytes or kept.get("object_bytes")
        if most <= s.associations or pace is None or not rtt or not size:
            return s.associations
        needed = 2 + math.ceil((rtt + RESPONSE_MARGIN_S) * pace / size)
        return max(s.associations, min(most, needed))

    def _still_sending(self, assoc: StoreAssociation) -> bool:
        """Whether `assoc` has object bytes left to send (on a paced link only the turn's owner
        has; the others wait for their responses)."""
        return not assoc.paced or self.pacer.pace is None or self.pacer.owns_turn(assoc)

    def _open_associations(self) -> list[StoreAssociation]:
        with self._lanes_lock:
            return list(self._open)

    def _metered_shut(self) -> str | None:
        """Why routine items may not go now (None: they may)."""
        blocked = self.meter.blocked(self.clock()) if self.meter is not None else None
        return None if blocked is None else f"metered link: {blocked.detail}"

    def _metered_admit(self, assoc: StoreAssociation, item: OutboxItem) -> str | None:
        """Why `item`, routine, may not go on `assoc` now, the objects the round's other
        associations have on the wire counted as spent (None: it goes, and counts so until charged)."""
        blocked = self.meter.admit(assoc, item.size, self.clock()) if self.meter is not None else None
        return None if blocked is None else f"metered link: {blocked.detail}"

    def _spend(self, nbytes: int, now: float) -> None:
        """Count bytes sent against the metered link's budget (after the outcome is recorded:
        a disk too full to count them must not lose the outcome)."""
        if self.meter is None:
            return
        try:
            self.meter.spend(nbytes, now)
        except sqlite3.OperationalError as exc:
            log.warning("metered link: %d bytes sent not counted: %s", nbytes, exc)

    def _spend_written(self, assoc: StoreAssociation, charged: int) -> int:
        """Count what `assoc` wrote since `charged` (of its `bytes_written`): the budget is the
        bytes on the metered link, PDU headers, command sets and negotiation included, whatever
        became of the object. Returns the new mark."""
        self._spend(assoc.bytes_written - charged, self.clock())
        if self.meter is not None:
            self.meter.settle(assoc)  # charged now: no longer in flight (after, not before: never uncounted)
        return assoc.bytes_written

    def _claim(self, limit: int, priority: Priority | None = None) -> list[OutboxItem]:
        return self.outbox.claim(
            Kind.DICOM,
            limit,
            self.clock(),
            max_interrupted_sends=self.settings.max_interrupted_sends,
            priority=priority,
        )

    def _send_round(self, round_: SendRound, lanes: int, most: int = 0) -> list[RoundResult]:
        """`lanes` associations take the round's items one at a time; more join (up to `most`) as
        soon as the link measured so far asks for them - a routine round that started with nothing
        known of the link (a new gateway) would otherwise carry its whole backlog on too few
        associations to hide the round trip. `round_.watch`: a routine round's, which yields to STAT."""
        most = max(lanes, most)
        share, watch = round_.share, round_.watch
        try:
            if most == 1:  # one association, no more: on this thread (a STAT lane's, named for it)
                outcomes = [self._send_lane(round_)]
            else:
                pool = LanePool(round_, most, send_lane=self._send_lane, lanes_for_link=self.associations_for_link)
                outcomes = pool.run(lanes)
        except BaseException:
            # a lane failed (e.g. a database fault): what none took is not left claimed, where no
            # claim ever looks again while this process lives
            self._release_quietly([i.id for i in share.take_all()], "forwarder stopped")
            raise
        left = share.take_all()  # every association ended before taking these
        if left and share.failure is not None:
            now, failure = self.clock(), share.failure
            for item in left:
                self.outbox.mark_transient_failure(
                    item.id, str(failure), now, retry_after=getattr(failure, "retry_after", None)
                )
            outcomes.append(RoundResult(transient=len(left)))
        elif left:
            why = YIELDED_TO_STAT if watch is not None and watch.stat_due.is_set() else "forwarder stopped"
            self.outbox.release([i.id for i in left], why, self.clock(), 0.0)
        return outcomes

    def _release_quietly(self, item_ids: list[int], why: str) -> None:
        """Release on a path already failing: a database still failing must not hide the first
        error (the forward service releases every claim of ours once it answers again)."""
        if not item_ids:
            return
        try:
            self.outbox.release(item_ids, why, self.clock(), 0.0)
        except (sqlite3.Error, OSError) as exc:
            log.warning("%d claimed item(s) not released yet: %s", len(item_ids), exc)

    def _send_stat(self, stop: threading.Event, faults: list[str]) -> list[RoundResult]:
        """The STAT items due, on an association of their own (none if another took them)."""
        stat = self._claim(self.settings.batch_size, Priority.STAT)
        return self._send_round(SendRound(RoundItems(stat), stop, faults), 1) if stat else []

    def _send_lane(self, round_: SendRound) -> RoundResult:
        """One association of a round: it sends what it takes from the round's share, one at a time
        (and the STAT items it is asked to carry meanwhile, before its next routine object)."""
        share, stop, watch = round_.share, round_.stop, round_.watch
        r = RoundResult()
        pending: list[OutboxItem] = []
        in_flight: OutboxItem | None = None
        routine = share.routine
        assoc = StoreAssociation(
            self.settings.peer, commitment=self.settings.storage_commitment, pacer=self.pacer, paced=routine
        )
        carrying = False  # sending STAT items claimed mid-round (`watch.carrying`)
        charged = 0  # of assoc.bytes_written: what the metered budget has counted
        with self._lanes_lock:
            self._open.add(assoc)
        try:
            with assoc:
                sent_now: list[OutboxItem] = []
                while pending or (pending := share.take()):
                    if stop.is_set():
                        break  # finish the store in hand, leave the rest for the next run
                    item = pending[0]
                    if carrying and item.priority != Priority.STAT:
                        carrying = False  # the STAT items it took are sent: routine again, paced
                        assoc.paced = routine
                        assert watch is not None
                        watch.carried()
                    if watch is not None and item.priority != Priority.STAT and watch.stat_due.is_set():
                        # a STAT item waits: this association, open already, carries it before
                        # its next routine object - or, if another took it, waits until it is sent
                        watch.carrying()
                        stat = self._claim(self.settings.batch_size, Priority.STAT)
                        if not stat:
                            watch.carried()
                            watch.wait_clear(stop)
                            continue
                        log.info("carrying %d STAT item(s) on an open association", len(stat))
                        carrying = True
                        pending[:0] = stat
                        assoc.paced = False  # STAT goes as fast as the link allows
                        continue
                    if item.priority != Priority.STAT and (shut := self._metered_admit(assoc, item)):
                        pending += share.take_all()  # (the round's other associations find none left)
                        self.outbox.release([i.id for i in pending], shut, self.clock(), 0.0)
                        pending = []
                        continue
                    try:
                        # the content hash is verified here: a corrupt payload is quarantined, never sent
                        payload = self.outbox.read_payload(item)
                    except CorruptPayloadError as exc:
                        pending.pop(0)
                        r.quarantined += 1
                        r.errors.append(str(exc))
                        self.on_event("quarantined", {"id": item.id, "reason": str(exc)})
                        continue
                    except TransientError as exc:  # e.g. out of file descriptors: this item only, not the link
                        pending.pop(0)
                        self.outbox.mark_transient_failure(item.id, str(exc), self.clock(), exc.retry_after)
                        r.transient += 1
                        r.errors.append(str(exc))
                        self.on_event("retry", {"id": item.id, "meaning": str(exc)})
                        continue
                    if assoc.paced and not self.pacer.take_turn(assoc, watch.stat_due if watch else None):
                        continue  # a STAT item came while it waited for the link: it goes first
                    alone = assoc.paced and self.pacer.owns_turn(assoc)  # the link to itself
                    if not self.outbox.begin_send(item.id, self.clock()):
                        self.pacer.end_turn(assoc)
                        pending.pop(0)  # no longer ours (an operator moved it meanwhile)
                        continue
                    in_flight = item
                    if watch is not None and not carrying:
                        watch.sending(assoc, item)  # a routine transfer: one to cut for STAT
                    try:
                        # alone: timed from when the link is free of the object before it (the
                        # pacer's schedule), not from before its first PDU: that wait is not this
                        # object's, and made every probe look slower than the link
                        clock = self.pacer.clock  # the link's times are all on the pacer's clock
                        started = max(clock(), self.pacer.link_free_at()) if alone else clock()
                        # its tail (last PDU to response) is a round trip only if the object went
                        # paced from its first byte: written unpaced (no rate measured yet) right
                        # after the one before, it queued behind it in the modem, and that queue
                        # taken for the round trip made the second sample 1.6x the link's rate
                        # (4G: paced above the link, then drained at 0.7 of it)
                        paced_throughout = assoc.paced and self.pacer.pace is not None
                        outcome = assoc.store(payload)
                        if watch is not None and not carrying:
                            watch.finished(assoc, stored=outcome.category in ("success", "warning"))
                        if outcome.stored:
                            tail = clock() - assoc.last_sent_at if paced_throughout else None
                            took = clock() - started if alone else None
                            self.pacer.observe_object(outcome.wire_bytes, tail, took, assoc.last_sent_bytes)
                            self._observe_object_bytes(outcome.wire_bytes)
                            share.on_stored()  # the link measured better: more associations?
                    except (TransientError, ConfigurationFault):
                        # the association died, timed out waiting for the answer or was cut for a
                        # STAT study: what went on the wire is paid for all the same, and the object
                        # goes again later - uncounted, a flaky link spent the day's budget many times
                        charged = self._spend_written(assoc, charged)
                        raise
                    except PermanentError as exc:  # e.g. a payload that is no DICOM we can send
                        in_flight = None
                        pending.pop(0)
                        reason = f"cannot be sent: {exc}"
                        self.outbox.quarantine(item.id, reason, self.clock())
                        r.quarantined += 1
                        self.on_event("quarantined", {"id": item.id, "reason": reason})
                        continue
                    finally:
                        self.pacer.end_turn(assoc)
                    pending.pop(0)
                    in_flight = None
                    now = self.clock()
                    if outcome.category in ("success", "warning"):
                        try:
                            self.outbox.mark_sent([item.id], now)
                        except (sqlite3.Error, OSError):
                            # stored at the peer whatever kept us from recording it (full disk, I/O
                            # error, locked): recorded later, by this process (`record_unrecorded_sends`)
                            # or by the next start if this one stops first - never sent again
                            self.outbox.remember_stored([item.id], taken=False)
                            raise
                        sent_now.append(item)
                        r.sent += 1
                        self.on_event(
                            "sent",
                            {"id": item.id, "status": outcome.status, "transfer_syntax": outcome.transfer_syntax},
                        )
                    elif outcome.category == "transient":
                        self.outbox.mark_transient_failure(item.id, f"0x{outcome.status:04X} {outcome.meaning}", now)
                        r.transient += 1
                        self.on_event("retry", {"id": item.id, "status": outcome.status, "meaning": outcome.meaning})
                    else:
                        reason = f"refused by the reading center: 0x{outcome.status:04X} {outcome.meaning}"
                        self.outbox.quarantine(item.id, reason, now)
                        r.quarantined += 1
                        self.on_event("quarantined", {"id": item.id, "reason": reason})
                    charged = self._spend_written(assoc, charged)
                if sent_now and self.settings.storage_commitment:
                    assoc.paced = False  # a small request, and no object's turn
                    self._request_commitment(assoc, sent_now)
        except ConfigurationFault as exc:
            round_.faults.append(str(exc))
            pending += share.take_all()  # the peer refuses us, not an item
            self.outbox.release([i.id for i in pending], str(exc), self.clock(), self.settings.config_fault_retry_s)
            return r
        except TransientError as exc:
            now = self.clock()
            if watch is not None and watch.was_cut(assoc):
                # cut for a STAT item, not failed: back to the queue uncharged, sent again later
                self.outbox.release([i.id for i in pending], YIELDED_TO_STAT, now, 0.0)
                pending = []  # all released: nothing for the clean-up below to look up
                r.cut = True
                return r
            share.failure = exc  # the others go on with the rest; what none takes fails with this
            for item in pending:
                self.outbox.mark_transient_failure(
                    item.id, str(exc), now, retry_after=getattr(exc, "retry_after", None)
                )
            r.transient += len(pending)
            r.errors.append(str(exc))
            self._update_status(last_error=str(exc), **{LAST_ERROR_AT: now})  # the key its readers import
            self.on_event("link-down", {"error": str(exc), "items": len(pending)})
            return r
        except Exception as exc:
            # neither the peer's answer nor a link failure: a bug, or an object that breaks the
            # sender (e.g. exhausts its memory). The attempt stays charged and counts as an
            # interrupted send: repeated, the item is quarantined, not retried forever.
            if in_flight is not None:
                self.outbox.interrupt_sends([in_flight.id], f"send failed: {type(exc).__name__}: {exc}", self.clock())
            raise
        finally:
            self._spend_written(assoc, charged)  # its set-up, commitment request and release
            if carrying:
                assert watch is not None
                watch.carried()  # ended (or failed) with the STAT items it took: the others go on
            with self._lanes_lock:
                self._open.discard(assoc)
                if not self._open:
                    self.pacer.idle()
            if watch is not None:
                watch.carry_if_orphaned()  # the last open one gone with a STAT item due: a new association carries it
            # stopped with items in hand: whatever is still claimed goes back, uncharged
            left = [
                i.id for i in pending if (cur := self.outbox.get(i.id)) is not None and cur.state == ItemState.SENDING
            ]
            if left:
                self.outbox.release(left, "forwarder stopped", self.clock(), 0.0)
        return r

    # -- storage commitment ------------------------------------------------------------------
    def _request_commitment(self, assoc: StoreAssociation, items: Sequence[OutboxItem]) -> None:
        now = self.clock()
        if now < self._commitment_unsupported_until:
            return
        refs = [(i.meta["sop_class_uid"], i.meta["sop_instance_uid"]) for i in items]
        txn = generate_uid()
        # known before asking: the report may overtake the N-ACTION's response
        self.outbox.remember_commitment_request([i.id for i in items], txn, now)
        try:
            assoc.request_commitment(txn, refs)
        except CommitmentUnsupported as exc:
            self._commitment_unsupported(items, str(exc))
            return
        except TransientError as exc:
            log.warning("storage commitment request failed, will ask again: %s", exc)
            return
        self.outbox.set_transaction([i.id for i in items], txn, now)
        self.on_event("commitment-asked", {"transaction_uid": txn, "items": len(items)})

    def _commitment_unsupported(self, items: Sequence[OutboxItem], why: str) -> None:
        now = self.clock()
        self._commitment_unsupported_until = now + self.settings.commitment_timeout_s
        self.outbox.record_status("storage_commitment", {"supported": False, "detail": why}, now)
        if self.settings.no_commitment_policy == "purge":
            self.outbox.mark_committed([i.id for i in items], now)
        log.warning(
            "reading center does not offer storage commitment (%s); policy: %s", why, self.settings.no_commitment_policy
        )

    def _ask_commitment(self, result: RoundResult, now: float) -> None:
        """(Re-)ask for items sent without a transaction, or whose report is overdue."""
        if not self.settings.storage_commitment or now < self._commitment_unsupported_until:
            return
        due = [
            i
            for i in self.outbox.awaiting_commitment(Kind.DICOM)
            if i.transaction_uid is None or now - i.updated_at >= self.settings.commitment_timeout_s
        ]
        if not due:
            return
        for start in range(0, len(due), self.settings.batch_size):
            batch = due[start : start + self.settings.batch_size]
            # on the pacer, unpaced: a small request, whose bytes the link carries and the budget counts
            assoc = StoreAssociation(self.settings.peer, commitment=True, pacer=self.pacer, paced=False)
            try:
                with assoc:
                    self._request_commitment(assoc, batch)
            except TransientError as exc:
                log.info("cannot ask for storage commitment now: %s", exc)
                return
            finally:
                self._spend_written(assoc, 0)

    def _settle_without_commitment(self) -> int:
        """`storage_commitment = False` with `no_commitment_policy = "purge"`: what was sent is
        done (purged after the retention time); with "keep", sent items stay as they are."""
        s = self.settings
        if s.storage_commitment or s.no_commitment_policy != "purge":
            return 0
        sent = [i.id for i in self.outbox.awaiting_commitment(Kind.DICOM)]
        if sent:
            self.outbox.mark_committed(sent, self.clock())
        return len(sent)

    def _on_report(self, report: CommitmentReport) -> None:
        """N-EVENT-REPORT from the PACS (listener thread). Believed only for a transaction this
        gateway issued and the instances in it: anything else raises ReportRefused (the
        listener answers a failure status and logs a security event) and changes nothing."""
        now = self.clock()
        asked = self.outbox.commitment_request(report.transaction_uid)
        if not asked:
            raise ReportRefused(f"transaction {report.transaction_uid} was not issued by this gateway")
        in_txn = {i.meta.get("sop_instance_uid"): i for i in asked}
        named = [(c, u) for c, u in report.committed] + [(c, u) for c, u, _r in report.failed]
        strangers = sorted({u for _c, u in named if u not in in_txn})
        if strangers:
            raise ReportRefused(
                f"report for transaction {report.transaction_uid} names {len(strangers)} instance(s) not in it"
            )
        conflicts = sorted({u for c, u in named if c and c != in_txn[u].meta.get("sop_class_uid")})
        if conflicts:
            raise ReportRefused(
                f"report for transaction {report.transaction_uid} gives {len(conflicts)} instance(s) another SOP class",
                0x0119,  # class-instance conflict
            )
        by_uid = {u: i for u, i in in_txn.items() if i.state == ItemState.SENT}
        committed = [by_uid[uid].id for _cls, uid in report.committed if uid in by_uid]
        failed = [(by_uid[uid], reason) for _cls, uid, reason in report.failed if uid in by_uid]
        if committed:
            self.outbox.mark_committed(committed, now)
        if failed:
            self._commitment_failed(failed, now)
        settled = len(report.committed) + len(report.failed) - len(committed) - len(failed)
        if settled:
            log.info(
                "commitment report %s names %d instance(s) no longer awaiting commitment",
                report.transaction_uid,
                settled,
            )
        with self._report_lock:
            self._pending_committed += len(committed)
        self.on_event(
            "committed", {"transaction_uid": report.transaction_uid, "committed": len(committed), "failed": len(failed)}
        )

    def _commitment_failed(self, failed: Sequence[tuple[OutboxItem, int]], now: float) -> None:
        """Items the PACS would not commit, by FailureReason: sent again (the PACS lacks them), asked
        again (the transaction failed), or quarantined - for a reason that fails the same way at
        every try, or once `max_commitment_failures` failures in a row were resent or re-asked."""
        resend: dict[int, list[int]] = {}
        ask_again: dict[int, list[int]] = {}
        for item, reason in failed:
            meaning, action = failure_action(reason)
            code = f"0x{reason:04X} {meaning}"
            if action == FailedAction.QUARANTINE:
                why = f"the reading center will not commit it: storage commitment failed ({code}); not sent again"
            elif item.commitment_failures + 1 >= self.settings.max_commitment_failures:
                why = f"storage commitment failed {item.commitment_failures + 1} times (last: {code}); not sent again"
            else:
                (ask_again if action == FailedAction.ASK_AGAIN else resend).setdefault(reason, []).append(item.id)
                continue
            self.outbox.quarantine(item.id, why, now)
            log.error("outbox item %d (%s) quarantined: %s", item.id, item.key, why)
            self.on_event("quarantined", {"id": item.id, "reason": why})
        for reason, ids in resend.items():
            meaning, _action = failure_action(reason)
            self.outbox.requeue(ids, f"storage commitment failed (0x{reason:04X} {meaning}); sending again", now)
        for reason, ids in ask_again.items():
            meaning, _action = failure_action(reason)
            self.outbox.reask_commitment(
                ids, f"storage commitment failed (0x{reason:04X} {meaning}); asking again", now
            )

    # -- faults ------------------------------------------------------------------------------
    def _record_fault(self, message: str) -> None:
        now = self.clock()
        self._fault_until = now + self.settings.config_fault_retry_s
        self._update_status(fault=message, fault_since=now, retry_at=self._fault_until)
        log.error(
            "reading center refuses this gateway (configuration fault): %s; items stay queued, retrying in %.0f s",
            message,
            self.settings.config_fault_retry_s,
        )
        self.on_event("config-fault", {"error": message})

    def _update_status(self, **changes: object) -> None:
        now = self.clock()
        current = self.outbox.status(STATUS_NAME) or {}
        current.update(changes)
        self.outbox.record_status(STATUS_NAME, current, now)

    def record_unrecorded_sends(self) -> int:
        """Mark sent what the peer stored while the outbox could not record it (they are still
        claimed by us: `Outbox.remember_stored`); call before releasing this outbox's claims.
        Returns how many."""
        return self.outbox.record_stored(self.clock())

    def clear_fault(self) -> None:
        """Forget a configuration fault now (after SIGHUP reloaded a fixed configuration)."""
        self._fault_until = 0.0
