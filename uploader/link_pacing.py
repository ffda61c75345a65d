"""Routine sends paced just below the link's measured rate, so a STAT ECG does not queue behind
a modem buffer full of routine bytes.

A village modem (or a satellite terminal) holds tens of kilobytes in its buffer and sends them in
order. An unpaced sender keeps that buffer full: a STAT object that becomes due then waits for
all of it (on a 1 Mbit/s link with a 64 KB buffer, half a second) even after the routine transfers
are cut. Sent at a little under the rate the link delivers, the buffer stays nearly empty and
routine throughput barely changes.

One `LinkPacer` per destination is shared by every association sending routine objects to it
(the link is one bottleneck). Each association calls `on_pdu_sent` after every PDU it wrote (on
its DUL thread: pynetdicom's EVT_DATA_SENT, or `EncodedMessage.on_sent`): a token bucket with one PDU of burst
makes that thread wait until the link would have carried what was sent before. A thread woken
late (a loaded CPU) makes up for it on its next PDU, by up to `LATE_CREDIT_S`: otherwise every
late wake-up (and a write that blocked a moment) is link time lost for good. An association that
goes unpaced (a STAT object's) reports its PDUs too (`on_unpaced_sent`): it never waits, but the
schedule counts its bytes, and the routine PDU after them waits until they have crossed.

The rate is measured, not configured: the bytes stored (all associations together) since the
first byte of a busy spell, over its time less one round trip: a C-STORE's own (its response's
least delay after its last PDU crossed the link, of the clean ones), or until one is seen the
association negotiation's on the wire (the least seen; on Orthanc the shorter of the two). Until the first
object is stored nothing is paced (what was written meanwhile is counted: the pace's schedule
starts once it has crossed); then the pace is `HEADROOM` below the largest such rate (not on
a LAN: a round trip under `NEAR_RTT_S`), and lower (`DRAIN_HEADROOM`) while bytes wait in the
buffer (a loss stalled the link), for as long as the lateness of the response that showed them
says they take to drain: at `HEADROOM` they would drain at 3 % of the rate. Fast links (above
`FAST_BYTES_PER_S`) are not paced at all: their buffer drains in milliseconds. Paced objects
only ever show the pace: every `PROBE_EVERY`-th goes `PROBE_GAIN` faster to see whether the link
has more, and while samples keep raising the estimate the next object probes again; its time is
counted less the typical round trip (the median of the clean tails), not the least one, which
no typical object sees (on 4G a probe then showed the link 6 % slower than it is). A response's
delay is a round trip only for an object paced from its first byte (the forwarder's `tail_s`):
the first objects, unpaced, queue behind each other in the buffer. Responses late
`STALE_AFTER_LATE` times in a row, delivering less than even the drain pace, show the estimate
above what the link carries (one sample too high, e.g. a busy CPU's late response taken for the
round trip): the samples that came late replace it.

The rate is remembered (`remembered()`/`remember()`, kept in the outbox by the forwarder): a
backlog that starts after a restart is paced from its first byte at the last measured rate
instead of filling the modem buffer until its first object is stored - a STAT study made in
those first seconds would wait for all of it. The remembered rate only paces those first bytes:
from its first sample the estimate is what this process measured, lower (the kept rate came out
above the link, or 4G fell back to EDGE) or higher.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

HEADROOM = 0.97  # pace at this fraction of the measured rate (0.95 left 1-2 % of every slow link idle)
DRAIN_HEADROOM = 0.7  # ... and at this one while bytes wait in the buffer (a stall held them back)
QUEUED_TAIL_S = 0.1  # a response later than the least clean tail by this at most: bytes were waiting
MIN_QUEUED_TAIL_S = 0.02  # ... by this at least (`_queue_threshold`: from the spread of clean tails)
FAST_BYTES_PER_S = 2.5e6  # 20 Mbit/s and faster: not paced
NEAR_RTT_S = 0.02  # a round trip shorter than this: a LAN (or CPU-bound), not paced
PDU_TIME_S = 0.008  # a paced PDU carries about this much of the link's time ...
MIN_PDU_BYTES = 4096  # ... but no less: the burst one PDU may make stays small in the buffer
LATE_CREDIT_S = PDU_TIME_S  # a sender woken this much late (a loaded CPU) catches up: the link's time is not lost
SAMPLE_WINDOW = 12  # the estimate: the largest of this many last samples (two probes among them)
STALE_AFTER_LATE = 3  # this many late responses in a row: a remembered rate is stale (and one measured, far too high)
PROBE_EVERY = 6  # every this many objects one is sent faster, to see whether the link is faster ...
PROBE_GAIN = 1.15  # ... by this factor (what may queue in the buffer meanwhile stays a fraction of one object)
PROBE_PAID = 1.02  # a sample that raised the estimate by this much: the next object probes again
TURN_POLL_S = 0.01  # an association waiting for its turn looks this often whether it should give up
A_ASSOCIATE_RQ = 0x01  # PDU types (PS3.8 9.3): a PDU's first byte
A_ASSOCIATE_AC = 0x02
P_DATA_TF = 0x04
# A-ASSOCIATE-RQ, -AC, -RJ, A-RELEASE-RQ, -RP, A-ABORT
CONTROL_PDU_TYPES = frozenset({A_ASSOCIATE_RQ, A_ASSOCIATE_AC, 0x03, 0x05, 0x06, 0x07})
COMMAND_DONE = 0x03  # message control header: command, last fragment
DATA_SET_DONE = 0x02  # ... data set, last fragment


def last_fragment(pdu: bytes | memoryview) -> int | None:
    """The message control header of the last PDV in a P-DATA-TF PDU (or in the last of several
    written back to back), masked to its command and last-fragment bits (COMMAND_DONE,
    DATA_SET_DONE, ...); None for any other PDU."""
    if len(pdu) < 12 or pdu[0] != P_DATA_TF:
        return None
    start, header = 0, None
    while start + 12 <= len(pdu) and pdu[start] == P_DATA_TF:
        end = min(len(pdu), start + 6 + int.from_bytes(pdu[start + 2 : start + 6], "big"))
        at = start + 6
        while at + 6 <= end:  # PDV items: length (4), context id (1), message control header (1), data
            header = pdu[at + 5] & 0x03
            at += 4 + int.from_bytes(pdu[at : at + 4], "big")
        start = end
    return header


class LinkPacer:
    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.clock = clock  # the associations and the forwarder time the link's objects by it too
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_free = 0.0  # when the link will have carried what was sent so far
        self.measured: float | None = None  # bytes/s the link delivered (smoothed samples)
        self.pace: float | None = None  # bytes/s allowed; None: not paced
        self.rtt_s: float | None = None  # least round trip seen (the association negotiation's)
        self.store_rtt_s: float | None = None  # least C-STORE response delay after its last PDU's link time
        self._store_rtts: deque[float] = deque(maxlen=SAMPLE_WINDOW)  # the last clean tails (their spread)
        self._window_start: float | None = None  # first byte of this busy spell
        self._delivered = 0  # bytes stored since then
        # bytes written since then, paced or not: a pace dropped (a fast sample) and set again in
        # the same window still sees what is ahead of it
        self._written = 0
        self.draining = False  # the last object's response came late: a queue to drain ...
        self._drain_until = 0.0  # ... until about then (this pacer's clock)
        self._seeded = False  # `measured` is a remembered rate no sample of this process replaced yet
        self._samples: deque[float] = deque(maxlen=SAMPLE_WINDOW)  # this process's last samples
        self._late = 0  # late responses in a row
        self._turn = threading.Condition()
        self._turn_owner: object | None = None  # whose object is on the link (`take_turn`)
        self._objects = 0  # turns taken
        self._probe_soon = False  # the last sample raised the estimate: the next turn probes (`_lock`)
        self._gain = 1.0  # the pace's factor for the object on the link now (PROBE_GAIN: a probe)

    # -- remembering -----------------------------------------------------------------------------
    def remembered(self) -> dict[str, float] | None:
        """What to keep for the next start (None: nothing measured yet)."""
        with self._lock:
            if self.measured is None or self._seeded:
                return None
            return {"bytes_per_s": round(self.measured, 1), **({"rtt_s": self.rtt_s} if self.rtt_s else {})}

    def remember(self, record: dict[str, float] | None) -> None:
        """Start from a rate measured before (e.g. by the previous process): paced from the first byte."""
        rate = (record or {}).get("bytes_per_s")
        if not isinstance(rate, int | float) or rate <= 0:
            return
        with self._lock:
            if self.measured is not None:
                return  # measured here already: that is newer
            self.measured = float(rate)
            self._seeded = True
            self._set_pace()
        log.debug("link: starting from the remembered rate %.0f B/s", rate)

    # -- measuring --------------------------------------------------------------------------------
    def observe_rtt(self, seconds: float) -> None:
        """A round trip that queued behind nothing (e.g. the association negotiation)."""
        if seconds > 0:
            with self._lock:
                self.rtt_s = seconds if self.rtt_s is None else min(self.rtt_s, seconds)
                self._set_pace()  # a LAN is not paced, whatever was remembered

    def _set_pace(self) -> None:
        """The pace from the estimate (lock held)."""
        if self.measured is None:
            self.pace = None
            return
        pace = self.measured * (DRAIN_HEADROOM if self.draining else HEADROOM)
        self.pace = None if pace >= FAST_BYTES_PER_S or self._near() else pace

    def _near(self) -> bool:
        """A LAN (or a peer on this machine): its round trip is too short for a buffer to matter."""
        return self.rtt_s is not None and self.rtt_s < NEAR_RTT_S

    def observe_object(
        self, wire_bytes: int, tail_s: float | None = None, alone_s: float | None = None, last_pdu_bytes: int = 0
    ) -> None:
        """An object of `wire_bytes` was stored: a sample of what the link delivers, counted over
        the window since the first byte of this busy spell (all associations together).
        `tail_s`: from its last PDU (of `last_pdu_bytes`) handed to the socket, paced (the link
        free of what went before), to its response. More than a round trip (and a PDU's time)
        means bytes were waiting in the buffer ahead of it - e.g. what a stall held back: paced
        well below the rate until a clean tail shows it drained. Less that PDU's time on the
        link, the least tail is the C-STORE's own round trip (`store_rtt_s`).
        `alone_s`: from its C-STORE request to its response, for an object that had the link to
        itself (`take_turn`): one more sample, this object's own rate (a probe's shows a faster link)."""
        with self._lock:
            unpaced = self.pace is None
            if tail_s is not None:
                # the tail less its last PDU's own time on the link (on EDGE a 4 KiB PDU takes
                # 160 ms: judged by the tail alone, every response came late and the link was
                # paced at DRAIN_HEADROOM for good)
                store_rtt = tail_s - (last_pdu_bytes / self.measured if self.measured else 0.0)
                if self.rtt_s is not None or self.store_rtt_s is not None:
                    excess = store_rtt - self._object_rtt()  # how long its last byte queued
                    self.draining = excess > self._queue_threshold()
                    if self.draining:
                        # what queued ahead of it drains at the rate less the drain pace; then
                        # the link is paced as before, not below its rate until the next
                        # object's response shows it (on EDGE, 0.3 of up to an object's 3 s idle)
                        self._drain_until = self.clock() + excess / (1 - DRAIN_HEADROOM)
                if self.measured is not None and not self.draining and store_rtt > 0:
                    # the least of all clean tails, never a late one: a queue's delay taken for
                    # the round trip would raise every sample above the link's rate (tried: on
                    # 4G the pace then kept the buffer full). A route that grew is paced low in
                    # turns instead: slower, never queued
                    self._store_rtts.append(store_rtt)  # the recent ones: their spread
                    self.store_rtt_s = store_rtt if self.store_rtt_s is None else min(self.store_rtt_s, store_rtt)
            now = self.clock()
            if self._window_start is None or wire_bytes <= 0:
                return
            self._delivered += wire_bytes
            rtt = self._object_rtt()
            busy = now - self._window_start - rtt
            if busy <= 0:
                return
            sample = self._delivered / busy
            typical = self._typical_rtt() if alone_s is not None else rtt
            if alone_s is not None and alone_s - typical > 0 and not self.draining:
                # believed only with nothing queued ahead of it, and at most the rate it was sent
                # at (a probe's): it cannot have crossed faster than that
                alone = wire_bytes / (alone_s - typical)
                if self.measured is not None:
                    alone = min(alone, self.measured * HEADROOM * PROBE_GAIN)
                sample = max(sample, alone)
            # what was delivered over a window can only be less than the link's rate (pacing, gaps
            # between objects, a stall): the largest recent sample is the best estimate. Recent:
            # a link that got slower (4G fell back to EDGE) is not paced at what it once did
            self._samples.append(sample)
            recent = max(self._samples)
            self._late = self._late + 1 if self.draining else 0
            late = list(self._samples)[-self._late :] if self._late >= STALE_AFTER_LATE else []
            if late and self.measured is not None and max(late) < self.measured * DRAIN_HEADROOM:
                # paced at the estimate, responses keep coming late: the buffer keeps filling.
                # A sample that came out too high - the link carries less than even the drain
                # pace, so the buffer never drains (on a busy CPU one late response taken for the
                # round trip made 1.47 MB/s of a 1 MB/s link, paced above it until that sample
                # left the window). Not a few stalls in a row (EDGE): what comes late then is a
                # little below the estimate. What came late replaces it, and the samples before
                # are forgotten
                log.info("link: slower than estimated (%.0f B/s): %.0f B/s", self.measured, max(late))
                self.measured = max(late)
                self._samples = deque(late, maxlen=SAMPLE_WINDOW)
            else:
                # this process's samples, from its first: a remembered rate only paced the bytes
                # before it, and is not trusted above what the link now shows (kept from the
                # largest of a bulk run's samples, it came out 2 % above 4G's rate; trusted until
                # a sample exceeded it, the pace had no headroom, every probe's excess stayed in
                # the modem buffer and a STAT study waited behind 24-70 ms of routine bytes).
                # A sample well above the estimate (a probe's): the link may have more yet - the
                # next object probes again, rather than PROBE_EVERY later (paced at a first
                # estimate 8 % under 4G's rate, the backlog climbed to it over 18 objects)
                self._probe_soon = self.measured is not None and recent >= self.measured * PROBE_PAID
                if self._seeded and self.measured is not None and recent < self.measured:
                    log.debug("link: slower than remembered (%.0f B/s): %.0f B/s", self.measured, recent)
                self.measured = recent
                self._seeded = False
            self._set_pace()
            if unpaced and self.pace is not None:
                self._pace_after_unpaced(now)
            log.debug(
                "link: sample %.0f B/s%s (round trip %.3f s), measured %.0f B/s, pace %s",
                sample,
                "" if alone_s is None else f" (alone {alone_s:.3f} s)",
                rtt,
                self.measured,
                "off" if self.pace is None else f"{self.pace:.0f} B/s",
            )

    def _pace_after_unpaced(self, now: float) -> None:
        """The first pace (lock held): what was written unpaced and not yet stored - the objects
        after the first, written before anything was known of the link - is in the modem buffer
        or on its way. The paced schedule starts once it has crossed, not now: paced from now, the
        next object queued behind it and the buffer stayed full (a new gateway's STAT study on
        EDGE found 3.7 s of bytes ahead of it; on 3G 0.45 s). At the estimate, from the moment the
        first object's last byte crossed: its response's round trip before now."""
        ahead = self._written - self._delivered
        if ahead > 0 and self.measured:
            crossed_at = now - self._object_rtt() + ahead / self.measured
            self._next_free = max(self._next_free, crossed_at)

    def _queue_threshold(self) -> float:
        """How much later than the least clean tail a response must come to show bytes waiting
        in the buffer (lock held): twice how far recent clean tails came above the least (the
        peer's storing time and the link's jitter vary), within MIN_QUEUED_TAIL_S..QUEUED_TAIL_S.
        On 4G a fixed 0.1 s let 100 kB queue unseen, and a STAT study waited behind it."""
        if len(self._store_rtts) < SAMPLE_WINDOW // 2:
            return QUEUED_TAIL_S  # too few to know the spread
        spread = max(self._store_rtts) - self._object_rtt()
        return min(QUEUED_TAIL_S, max(MIN_QUEUED_TAIL_S, 2 * spread))

    def _typical_rtt(self) -> float:
        """The round trip an object alone on the link typically sees (lock held): the median of
        the recent clean tails. Not the least: a probe's time less the least is short by the
        jitter and the peer's storing time the least one happened not to have (4G: 5-7 ms of an
        object's 75) - every probe then showed the link ~6 % slower than it is, and a backlog
        whose first estimate came out low stayed paced at 0.9 of the link for good."""
        if len(self._store_rtts) < SAMPLE_WINDOW // 2:
            return self._object_rtt()  # too few to know the typical one
        return statistics.median_high(self._store_rtts)

    def _object_rtt(self) -> float:
        """The round trip an object's response comes after its last byte crossed (lock held)."""
        return self.store_rtt_s if self.store_rtt_s is not None else (self.rtt_s or 0.0)

    def start_window(self) -> None:
        """An object's first byte is about to be written (before `on_pdu_sent`, which an unpaced
        association calls only once its whole message is written: a window started then is
        short by that write, and the first sample - the estimate - too high)."""
        with self._lock:
            if self._window_start is None:
                self._window_start = self.clock()

    def link_free_at(self) -> float:
        """When the link will have carried what was sent so far, as the pace counts it (this pacer's clock)."""
        with self._lock:
            return self._next_free

    def idle(self) -> None:
        """Nothing is being sent now: the next byte starts a new window."""
        with self._lock:
            self._window_start = None
            self._delivered = 0
            self._written = 0
        with self._turn:
            self._release_turn()

    def pdu_bytes(self) -> int | None:
        """The largest PDU a paced association should send (None: not paced, the peer's limit):
        the pace allows one PDU of burst, so a small one keeps the modem buffer small."""
        pace = self.pace
        # whole KiB: an odd PDU length makes odd data-set fragments, and Orthanc (dcmtk) aborts
        return None if pace is None else max(MIN_PDU_BYTES, int(pace * PDU_TIME_S) // 1024 * 1024)

    # -- one object on the link at a time -------------------------------------------------------
    def take_turn(self, owner: object, give_up: threading.Event | None = None) -> bool:
        """Before a routine C-STORE on a paced link: wait until no other association's object is
        on the link, then hold the turn until this object's last data-set PDU went (or
        `end_turn`). One object at a time goes at the whole pace; the other associations' round
        trips (waiting for their responses) overlap it, instead of every association sending at
        a fraction of the pace and then all waiting together. False: `give_up` was set while
        waiting (a STAT study is due: the caller carries it instead, on its open association)."""
        with self._turn:
            while self._turn_owner is not None and self._turn_owner is not owner:
                if not self._turns():
                    return True  # not paced (any more): no turns
                if give_up is not None and give_up.is_set():
                    return False
                self._turn.wait(TURN_POLL_S)
            if not self._turns():
                return True
            if give_up is not None and give_up.is_set() and self._turn_owner is None:
                return False  # the turn came free (e.g. its owner was cut) for the STAT study, not this object
            self._turn_owner = owner
            self._objects += 1
            # now and then one object goes faster: paced objects only ever show the pace
            with self._lock:  # (set by `observe_object`, on another association's thread)
                probe, self._probe_soon = self._probe_soon or self._objects % PROBE_EVERY == 0, False
            self._gain = PROBE_GAIN if probe else 1.0
            return True

    def _turns(self) -> bool:
        """Whether objects take turns: on a paced link, and on a link not measured yet that is no
        LAN - its first objects, unpaced, are written one after another instead of all at once,
        so that the first stored is one object's time on the link, not all of theirs interleaved
        (a first estimate a third of the link's rate paced a new gateway's backlog that slowly)."""
        if self.pace is not None:
            return True
        return self.measured is None and self.rtt_s is not None and not self._near()

    def owns_turn(self, owner: object) -> bool:
        return self._turn_owner is owner

    def end_turn(self, owner: object) -> None:
        """The owner's C-STORE ended (whatever its outcome): its turn, if it still holds it, ends.
        Still holding it, its object never finished (cut for a STAT study, or failed): what the
        schedule still counted for it will never be sent, so the link is free from now - the
        next object timed from the old schedule would seem to cross faster than the link, and
        every such probe raised the estimate (up to PROBE_GAIN) for good."""
        with self._turn:
            if self._turn_owner is owner:
                self._release_turn()
                with self._lock:
                    self._next_free = min(self._next_free, self.clock())

    def _release_turn(self) -> None:
        """(turn lock held)"""
        self._turn_owner = None
        self._gain = 1.0
        self._turn.notify_all()

    # -- pacing -----------------------------------------------------------------------------------
    def on_data_sent(self, event: Any) -> None:
        """pynetdicom EVT_DATA_SENT handler (the association's DUL thread): `on_pdu_sent`."""
        self.on_pdu_sent(getattr(event, "data", b"") or b"")

    def on_unpaced_sent(self, data: bytes | memoryview) -> None:
        """After a PDU (or run of PDUs) written unpaced to the same link - a STAT object's, a
        commitment request: it takes the link's time all the same, so the schedule counts it
        and the next paced PDU waits until it has crossed. Uncounted, the routine object written
        right after a STAT study was paced as if the link were free: it queued behind the STAT
        bytes and its response came late, read as a queue the pace had let build (the drain
        pace; in a row, an estimate above the link)."""
        if not data or data[0] in CONTROL_PDU_TYPES:
            return
        with self._lock:
            self._written += len(data)
            if self.pace is None or not self.measured:
                return  # nothing is paced: nothing waits on the schedule
            now = self.clock()
            # at the link's rate (not the pace): nothing holds it back
            self._next_free = max(now, self._next_free) + len(data) / self.measured

    def on_pdu_sent(self, data: bytes | memoryview) -> None:
        """After each PDU a paced association wrote, or each run of PDUs while no pace is set yet
        (the association's DUL thread): wait until the link would have carried what was sent
        before. (Associations that never wait - STAT - report to `on_unpaced_sent`.)"""
        nbytes = len(data)
        if data and data[0] in CONTROL_PDU_TYPES:
            return  # association set-up and release: not an object's bytes, not paced
        marks = last_fragment(data)
        gain = self._gain
        if marks == DATA_SET_DONE and self._turn_owner is not None:
            # only the turn's owner sends a data set on a paced association: its object has
            # left, the next association may send while this one waits for its response
            with self._turn:
                self._release_turn()
        with self._lock:
            now = self.clock()
            if self._window_start is None:
                self._window_start = now
            self._written += nbytes
            if self.draining and now >= self._drain_until:
                self.draining = False  # the queue a late response showed has drained by now
                self._set_pace()
            pace = None if self.pace is None else self.pace * gain
            if pace is None or nbytes == 0:
                return
            # late by a little (woken late, or the time the write itself took): counted from when
            # the link became free, so the next PDU catches up; later than that, the link was idle
            start = self._next_free if now - LATE_CREDIT_S <= self._next_free else now
            self._next_free = start + nbytes / pace
        if marks == COMMAND_DONE:
            # a C-STORE's command: its data set follows at once. Waiting here would write the
            # object's first data PDU only once the object before it had left by the schedule,
            # not one PDU ahead as every other PDU is: the link idled ~20 ms per object on 4G
            return
        wait = start - now
        if wait > 0:
            self._sleep(wait)
