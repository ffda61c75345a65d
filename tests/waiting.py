"""Waiting for a condition the way the suite must on a loaded 2-core machine: poll until it holds
(so a fast machine waits no longer than it takes), fail only after a generous deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float = 30.0,
    *,
    what: str = "condition",
    interval: float = 0.01,
    tolerate: tuple[type[Exception], ...] = (),
) -> T:
    """Poll `condition()` until it is truthy and return that value; AssertionError after `timeout`
    seconds, naming `what` and the last value. Exceptions of the `tolerate` types count as "not
    yet" (a server still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        last: object
        try:
            last = value = condition()
        except tolerate as exc:
            last = exc
        else:
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s; last: {last!r}")
        time.sleep(interval)
