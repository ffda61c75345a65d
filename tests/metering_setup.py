"""What the metering tests set up: an outbox with items queued at a given time, a send window shut
at a given time, in the clinic's time (tests/test_metering_advice.py and the pages and alerts that
say what a meter holds)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from lastmile.clock import local_zone
from uploader.outbox import Kind, Outbox, Priority

DAY = 86400.0


def shut_window(at: float) -> str:
    """A one-hour send window opening two hours after `at` (clinic time): shut at `at`."""
    opens = dt.datetime.fromtimestamp(at, local_zone()) + dt.timedelta(hours=2)
    return f"{opens:%H:%M}-{opens + dt.timedelta(hours=1):%H:%M}"


def shut_window_open_after_midnight(at: float) -> str:
    """shut_window(at), or, when that one is open at the next midnight (`at` 21:00-22:00), a window
    01:00-02:00: a daily budget spent today is new at midnight, and a window open then lets the
    held studies go at midnight - the budget alone holds them (seen in a CI rehearsal at 21:31)."""
    now = dt.datetime.fromtimestamp(at, local_zone())
    opens = now + dt.timedelta(hours=2)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(0), local_zone())
    if opens <= midnight < opens + dt.timedelta(hours=1):
        return "01:00-02:00"
    return shut_window(at)


def queue_items(
    data_dir: Path, n: int, *, at: float, priority: Priority = Priority.ROUTINE, kind: str = Kind.DICOM
) -> None:
    with Outbox.open(data_dir, min_free_bytes=0) as outbox:
        for i in range(n):
            outbox.add(kind, f"{kind}-{priority.name}-{at}-{i}", b"x" * 100, priority=priority, now=at)
