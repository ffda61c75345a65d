"""Routine sends paced just below the link's measured rate, so a STAT ECG does not queue behind
a modem buffer full of routine bytes.

A village modem (or a satellite terminal) holds tens of kilobytes in its buffer and sends them in
order. An unpaced sender keeps that buffer full: a STAT object that becomes due then waits for
all of it (on a 1 Mbit/s link with a 64 KB buffer, half a second) even after the routine transfers
are cut. Sent at a little under the rate the link delivers, the buffer stays nearly empty and
routine throughput barely changes.

One `LinkPacer` per destination is shared by every association sending routine objects to it
(the link is one bottleneck). Each association calls `on_data_sent` after every PDU it wrote (a
pynetdicom EVT_DATA_SENT handler, on its DUL thread): a token bucket with one PDU of burst
makes that thread wait until the link would have carried what was sent before.

The rate is measured, not configured: the bytes stored (all associations together) since the
first byte of a busy spell, over its time less one round trip (the association negotiation's,
the least seen). Until the first object is stored nothing is paced; then the pace is `HEADROOM`
below the largest such rate (not on a LAN: a round trip under `NEAR_RTT_S`), and lower (`DRAIN_HEADROOM`) while an object's response comes
late, i.e. bytes wait in the buffer (a loss stalled the link): they would otherwise drain at 5 %
of the rate. Fast links (above `FAST_BYTES_PER_S`) are not paced at all: their
buffer drains in milliseconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

HEADROOM = 0.95  # pace at this fraction of the measured rate
DRAIN_HEADROOM = 0.7  # ... and at this one while bytes wait in the buffer (a stall held them back)
QUEUED_TAIL_S = 0.1  # an object's response later than one round trip by this: bytes were waiting
FAST_BYTES_PER_S = 2.5e6  # 20 Mbit/s and faster: not paced
NEAR_RTT_S = 0.02  # a round trip shorter than this: a LAN (or CPU-bound), not paced
PDU_TIME_S = 0.02  # a paced PDU carries about this much of the link's time ...
MIN_PDU_BYTES = 4096  # ... but no less: the burst one PDU may make stays small in the buffer


class LinkPacer:
    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_free = 0.0  # when the link will have carried what was sent so far
        self.measured: float | None = None  # bytes/s the link delivered (smoothed samples)
        self.pace: float | None = None  # bytes/s allowed; None: not paced
        self.rtt_s: float | None = None  # least round trip seen
        self._window_start: float | None = None  # first byte of this busy spell
        self._delivered = 0  # bytes stored since then
        self.draining = False  # the last object's response came late: a queue to drain

    # -- measuring --------------------------------------------------------------------------------
    def observe_rtt(self, seconds: float) -> None:
        """A round trip that queued behind nothing (e.g. the association negotiation)."""
        if seconds > 0:
            with self._lock:
                self.rtt_s = seconds if self.rtt_s is None else min(self.rtt_s, seconds)

    def observe_object(self, wire_bytes: int, tail_s: float | None = None) -> None:
        """An object of `wire_bytes` was stored: a sample of what the link delivers, counted over
        the window since the first byte of this busy spell (all associations together).
        `tail_s`: from its last PDU handed to the socket to its response. More than a round trip
        (and a PDU's time) means bytes were waiting in the buffer ahead of it - e.g. what a
        stall held back: paced well below the rate until a clean tail shows it drained."""
        with self._lock:
            if tail_s is not None and self.rtt_s is not None:
                self.draining = tail_s - self.rtt_s > QUEUED_TAIL_S
            now = self._clock()
            if self._window_start is None or wire_bytes <= 0:
                return
            self._delivered += wire_bytes
            busy = now - self._window_start - (self.rtt_s or 0.0)
            if busy <= 0:
                return
            sample = self._delivered / busy
            # what was delivered over a window can only be less than the link's rate (pacing, gaps
            # between objects, a stall): the largest sample is the best estimate
            self.measured = sample if self.measured is None else max(self.measured, sample)
            pace = self.measured * (DRAIN_HEADROOM if self.draining else HEADROOM)
            near = self.rtt_s is not None and self.rtt_s < NEAR_RTT_S
            self.pace = None if pace >= FAST_BYTES_PER_S or near else pace
            log.debug(
                "link: sample %.0f B/s, measured %.0f B/s, pace %s",
                sample,
                self.measured,
                "off" if self.pace is None else f"{self.pace:.0f} B/s",
            )

    def idle(self) -> None:
        """Nothing is being sent now: the next byte starts a new window."""
        with self._lock:
            self._window_start = None
            self._delivered = 0

    def pdu_bytes(self) -> int | None:
        """The largest PDU a paced association should send (None: not paced, the peer's limit):
        the pace allows one PDU of burst, so a small one keeps the modem buffer small."""
        pace = self.pace
        # whole KiB: an odd PDU length makes odd data-set fragments, and Orthanc (dcmtk) aborts
        return None if pace is None else max(MIN_PDU_BYTES, int(pace * PDU_TIME_S) // 1024 * 1024)

    # -- pacing -----------------------------------------------------------------------------------
    def on_data_sent(self, event: Any) -> None:
        """pynetdicom EVT_DATA_SENT handler (the association's DUL thread): wait until the link
        would have carried what was sent before this PDU."""
        nbytes = len(getattr(event, "data", b"") or b"")
        with self._lock:
            if self._window_start is None:
                self._window_start = self._clock()
            pace = self.pace
            if pace is None or nbytes == 0:
                return
            now = self._clock()
            start = max(now, self._next_free)
            self._next_free = start + nbytes / pace
        wait = start - now
        if wait > 0:
            self._sleep(wait)
