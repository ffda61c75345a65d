"""Waiting for a condition the way the suite must on a loaded 2-core machine: poll until it holds
(so a fast machine waits no longer than it takes), fail only after a generous deadline."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CHANGES_SHOWN = 5  # a timeout lists the last changes seen: what happened, in a CI log line
VALUE_CHARS = 200  # each value's repr cut to this: a page's whole text must not flood the log


def wait_for(
    condition: Callable[[], T],
    timeout: float = 30.0,
    *,
    what: str = "condition",
    interval: float = 0.01,
    tolerate: tuple[type[Exception], ...] = (),
) -> T:
    """Poll `condition()` until it is truthy and return that value; AssertionError after `timeout`
    seconds, naming `what` and the last CHANGES_SHOWN distinct values seen, each with when it was
    first seen. Exceptions of the `tolerate` types count as "not yet" (a server still starting)."""
    start = time.monotonic()
    seen = _Changes()
    while True:
        last: object
        try:
            last = value = condition()
        except tolerate as exc:
            last = exc
        else:
            if value:
                return value
        now = time.monotonic()
        seen.note(last, now - start)
        if now - start > timeout:
            raise AssertionError(f"{what} not met within {timeout} s; {seen}")
        time.sleep(interval)


class _Changes:
    """The values a wait saw, kept only when one differs from the one before (by repr), the last
    CHANGES_SHOWN of them with the seconds since the wait began."""

    def __init__(self) -> None:
        self.kept: deque[tuple[float, str]] = deque(maxlen=CHANGES_SHOWN)
        self.count = 0

    def note(self, value: object, at: float) -> None:
        shown = _cut(repr(value))
        if self.kept and self.kept[-1][1] == shown:
            return
        self.kept.append((at, shown))
        self.count += 1

    def __str__(self) -> str:
        changes = ", ".join(f"+{at:.2f} s: {shown}" for at, shown in self.kept)
        earlier = self.count - len(self.kept)
        before = f" ({earlier} earlier changes not shown)" if earlier else ""
        return f"seen{before}: {changes}; last: {self.kept[-1][1]}"


def _cut(text: str) -> str:
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS] + "…"
