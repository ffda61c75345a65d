"""When to ask the reading center about a study: often while a report is likely and urgent,
rarely once it is old — every byte on a metered 4G link is paid for.

Interval by the study's age (since it was sent):

    STAT, first `stat_hurry_s` (1 h)       stat_poll_s (25 s)
    younger than 6 h                        5 min
    6 h - 1 day                             15 min
    1 - 3 days                              1 h
    3 days - the window (14 days)           4 h
    after a final report                    amendment_poll_s (12 h; 0 = no more)

A round is due when any study's interval has run out. It also takes along every study that would
otherwise fall due before the next round comes anyway (within the shortest interval among the due
ones) and is at least `coalesce` (half) of the way to its turn: a study costs ~65 bytes in a shared
C-FIND, a round of its own ~2 KB on the wire. So studies on one schedule fall into step and share
rounds, and during a STAT study's 25 s hurry the routine ones join only the round just before
their own turn, not every one.
Pure: times are passed in (seconds since the epoch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HOUR = 3600.0
DAY = 24 * HOUR
ROUTINE_SCHEDULE: tuple[tuple[float, float], ...] = (  # (younger than, interval)
    (6 * HOUR, 300.0),
    (DAY, 900.0),
    (3 * DAY, HOUR),
    (float("inf"), 4 * HOUR),
)


@dataclass(frozen=True)
class StudyClock:
    """What the policy needs to know about one study (epoch seconds)."""

    study_uid: str
    sent_at: float
    stat: bool = False
    final: bool = False
    last_polled_at: float | None = None


@dataclass(frozen=True)
class PollPolicy:
    stat_poll_s: float = 25.0
    stat_hurry_s: float = HOUR
    amendment_poll_s: float = 12 * HOUR
    window_s: float = 14 * DAY
    coalesce: float = 0.5

    def interval(self, study: StudyClock, now: float) -> float | None:
        """Seconds between polls of this study now; None: not polled any more."""
        age = max(0.0, now - study.sent_at)
        if age > self.window_s:
            return None
        if study.final:
            return self.amendment_poll_s or None
        if study.stat and age < self.stat_hurry_s:
            return self.stat_poll_s
        return next(interval for younger_than, interval in ROUTINE_SCHEDULE if age < younger_than)

    def due_at(self, study: StudyClock, now: float) -> float | None:
        interval = self.interval(study, now)
        if interval is None:
            return None
        last = study.last_polled_at if study.last_polled_at is not None else study.sent_at
        return last + interval

    def round(self, studies: Iterable[StudyClock], now: float) -> list[str]:
        """The studies to ask about now: none unless one is due; then the due ones and those that
        would fall due before the next round anyway (see the module docstring)."""
        due: list[tuple[StudyClock, float]] = []
        waiting: list[tuple[StudyClock, float, float]] = []  # (study, interval, elapsed)
        for s in studies:
            interval = self.interval(s, now)
            if interval is None:
                continue
            elapsed = now - (s.last_polled_at if s.last_polled_at is not None else s.sent_at)
            if elapsed >= interval:
                due.append((s, elapsed / interval))
            else:
                waiting.append((s, interval, elapsed))
        if not due:
            return []
        horizon = min(self.interval(s, now) or 0.0 for s, _ in due)  # the next round comes by then
        due += [
            (s, elapsed / interval)
            for s, interval, elapsed in waiting
            if elapsed >= self.coalesce * interval and interval - elapsed < horizon
        ]
        # STAT first, then the most overdue: if a round is cut short, they went first
        return [s.study_uid for s, _ in sorted(due, key=lambda d: (not d[0].stat, -d[1]))]

    def next_due_in(self, studies: Sequence[StudyClock], now: float) -> float | None:
        """Seconds until the next round is due (0 if one is due now); None: nothing to poll."""
        times = [t for s in studies if (t := self.due_at(s, now)) is not None]
        return max(0.0, min(times) - now) if times else None
