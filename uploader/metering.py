"""Metered links: a daily byte budget and send windows per destination; STAT is exempt.

Village clinics often pay for mobile data by the gigabyte, or share a link that is cheap only at
night. Per destination (the reading center's DICOM, the county platform's FHIR, report polling)
a `MeterPolicy` says how many bytes a day routine traffic may use and in which local time windows
it may be sent. A STAT study always goes (chest pain does not wait for the night tariff), and its
bytes count against the day's budget like any others.

The bytes spent each day are kept in the outbox's status table (`meter:<name>`), so a restart does
not give the day a fresh budget (nor does a clock set back to yesterday for a while), and
`lastmile queue` reads the same numbers the senders use.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from dataclasses import dataclass
from typing import Any, Protocol

STATUS_PREFIX = "meter:"
KEEP_DAYS = 7  # days whose counts are kept: a clock days behind still finds the real day's count
# the senders' wait between rounds with nothing to send (uploader.ecg_forwarder's idle poll; the FHIR
# round runs in the same forward step): a routine item queued while its link is open waits this long
# for a round to take it
SENDER_IDLE_POLL_S = 2.0
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class StatusStore(Protocol):
    def status(self, name: str) -> dict[str, Any] | None: ...

    def record_status(self, name: str, value: dict[str, Any], now: float) -> None: ...


@dataclass(frozen=True)
class SendWindow:
    """Local wall-clock minutes [start, end) of a day; `end` before `start` runs past midnight."""

    start_min: int
    end_min: int

    @classmethod
    def parse(cls, text: str) -> SendWindow:
        """ "HH:MM-HH:MM" (24 h, local time), e.g. "22:00-06:00". Raises ValueError."""
        m = _WINDOW.match(text)
        if not m:
            raise ValueError(f"{text!r} is not HH:MM-HH:MM")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if not (h1 <= 24 and h2 <= 24 and m1 < 60 and m2 < 60) or (h1 == 24 and m1) or (h2 == 24 and m2):
            raise ValueError(f"{text!r}: hours are 00-24, minutes 00-59")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        # the same instant of the day at both ends is empty ("24:00-00:00" too), except
        # "00:00-24:00", the whole day
        if start % 1440 == end % 1440 and (start, end) != (0, 1440):
            raise ValueError(f"{text!r} is empty: start and end are the same time")
        # "24:00" starting a window is the midnight it opens at (as minute 1440 it never opened)
        return cls(start % 1440, end)

    def contains(self, minute: float) -> bool:
        if self.start_min < self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min

    def __str__(self) -> str:
        return f"{self.start_min // 60:02d}:{self.start_min % 60:02d}-{self.end_min // 60:02d}:{self.end_min % 60:02d}"


@dataclass(frozen=True)
class MeterPolicy:
    daily_budget_bytes: int = 0  # 0: no budget
    windows: tuple[SendWindow, ...] = ()  # empty: any time
    zone: dt.tzinfo = dt.timezone.utc  # the clinic's: windows and "today" are local

    @property
    def limited(self) -> bool:
        return bool(self.daily_budget_bytes or self.windows)


@dataclass(frozen=True)
class Blocked:
    """Why routine traffic waits and until when (epoch seconds)."""

    reason: str  # "window" or "budget"
    until: float
    detail: str


class Meter:
    """One destination's budget and windows. Thread-safe within a process. `round_s`: how long its
    sender's round takes to try a routine item queued while the link is open (what the meter holds
    is judged with it: lastmile.services.metered.held_since, sender_round_s). Required: a meter made
    without it judged an item held as soon as it was queued; one that only charges and admits is
    `Meter.charging`."""

    def __init__(self, name: str, policy: MeterPolicy, store: StatusStore, round_s: float) -> None:
        self.name = name
        self.policy = policy
        self.store = store
        self.round_s = round_s
        self._lock = threading.Lock()
        # routine transfers admitted and not yet charged, by sender (one object each): several
        # associations each checking only what was charged all went while the others' objects
        # were on the wire, and spent the budget several times over
        self._in_flight: dict[object, int] = {}

    @classmethod
    def charging(cls, name: str, policy: MeterPolicy, store: StatusStore) -> Meter:
        """A sender's meter that only charges and admits what it sends, never asked what it holds
        (`held_since`): no sender round to judge with."""
        return cls(name, policy, store, round_s=0.0)

    @property
    def status_name(self) -> str:
        return STATUS_PREFIX + self.name

    def _local(self, now: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(now, self.policy.zone)

    def _days(self) -> dict[str, int]:
        """Bytes per local day, the last few days counted (a record of one day only, as an older
        version kept it, is that day)."""
        record = self.store.status(self.status_name) or {}
        days = record.get("days")
        if isinstance(days, dict):
            return {str(day): int(n) for day, n in days.items()}
        return {str(record["day"]): int(record.get("bytes", 0))} if record.get("day") else {}

    def spent_today(self, now: float) -> int:
        return self._days().get(self._local(now).date().isoformat(), 0)

    def spend(self, nbytes: int, now: float) -> None:
        """Count bytes sent now (STAT's too). Each day keeps its own count: a clock set back
        across midnight (a Pi booting at the fake-hwclock's last save, before chrony steps it)
        counts against that earlier day, and the real day's count is still there once the
        clock is right (one record of "today" was replaced, and the day's budget spent twice)."""
        if nbytes <= 0:
            return
        with self._lock:
            day = self._local(now).date().isoformat()
            days = self._days()
            days[day] = days.get(day, 0) + nbytes
            kept = dict(sorted(days.items())[-KEEP_DAYS:])
            kept[day] = days[day]  # even an implausibly early one: the budget holds while the clock is wrong
            self.store.record_status(self.status_name, {"day": day, "bytes": days[day], "days": kept}, now)

    def admit(self, sender: object, nbytes: int, now: float) -> Blocked | None:
        """Whether `sender` may start a routine transfer of about `nbytes` now, counting the other
        senders' transfers admitted and not yet charged as spent (None: it may, and its own counts
        so until `settle`). Routine traffic so overspends the budget by less than one transfer,
        however many senders it has."""
        with self._lock:
            self._in_flight.pop(sender, None)
            blocked = self.blocked(now, in_flight=sum(self._in_flight.values()))
            if blocked is None:
                self._in_flight[sender] = nbytes
            return blocked

    def settle(self, sender: object) -> None:
        """`sender`'s admitted transfer ended (its bytes `spend`-counted, or it never went)."""
        with self._lock:
            self._in_flight.pop(sender, None)

    def blocked(self, now: float, in_flight: int = 0) -> Blocked | None:
        """None if routine traffic may go now. `until` is when the windows and the budget both
        allow it (a window opening while today's budget is spent, or tomorrow's budget coming
        outside every window, is not when it goes); `reason` is the one it waits for last.
        `in_flight`: bytes on their way, not yet spent, counted as spent."""
        p = self.policy
        spent = self.spent_today(now) + in_flight if p.daily_budget_bytes else 0
        budget_spent = bool(p.daily_budget_bytes) and spent >= p.daily_budget_bytes
        details = []
        if self._outside_windows(now):
            details.append("outside " + ", ".join(map(str, p.windows)))
        if budget_spent:
            details.append(f"{spent / 2**20:.1f} of {p.daily_budget_bytes / 2**20:.1f} MB used today")
        if not details:
            return None
        today, until, reason = self._local(now).date(), now, "window"
        # each step passes one constraint: a window's start, then midnight, then a window's start
        for _ in range(4):
            if self._outside_windows(until):
                until, reason = self._next_window_start(self._local(until)), "window"
            elif budget_spent and self._local(until).date() == today:
                until, reason = self._next_midnight(until), "budget"
            else:
                break
        return Blocked(reason, until, "; ".join(details))

    def _outside_windows(self, at: float) -> bool:
        if not self.policy.windows:
            return False
        local = self._local(at)
        minute = local.hour * 60 + local.minute + local.second / 60
        return not any(w.contains(minute) for w in self.policy.windows)

    def _next_midnight(self, at: float) -> float:
        day = self._local(at).date() + dt.timedelta(days=1)
        return dt.datetime.combine(day, dt.time(), self.policy.zone).timestamp()

    def _next_window_start(self, local: dt.datetime) -> float:
        starts = []
        for w in self.policy.windows:
            for days in (0, 1):
                day = local.date() + dt.timedelta(days=days)
                at = dt.datetime.combine(day, dt.time(), self.policy.zone) + dt.timedelta(minutes=w.start_min)
                if at > local:
                    starts.append(at.timestamp())
                    break
        return min(starts)
