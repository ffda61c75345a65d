"""When the FHIR sender last found the county platform failing, as it records it in its outbox
status (`last_error_at`) and as the metered-link judgement reads it (lastmile.services.metered):
both sides here, so the rule for a gateway upgraded from a sender that never recorded it is stated
once. Imports nothing (the metrics exporter reads it without requests or the outbox).

A round records when it found the platform unavailable (no answer, a gateway's 5xx, busy: 429); a
bundle whose send failed later failed alone, the platform refusing it while it takes others. The
first round after the upgrade records the instant just before itself: what failed before it is the
link's (never said "refused alone"), what that round refuses alone is judged by the rule. Until
that round, nothing is recorded: every failure is the link's."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

LAST_ERROR_AT = "last_error_at"  # the reading center's status keeps the same key


def recorded_failure(previous: Mapping[str, Any], now: float, *, unavailable: bool) -> Any:
    """The `last_error_at` a round at `now` records over its `previous` status (`unavailable`: it
    found the platform so). Its marks are made at `now` too, so the reader needs no slack."""
    if unavailable:
        return now
    return previous.get(LAST_ERROR_AT, math.nextafter(now, -math.inf))


def failed_by(recorded: float | None) -> float:
    """Until when a bundle's failed send was the link's failure, by what a round `recorded` (None:
    no round since the upgrade - every failure the link's)."""
    return math.inf if recorded is None else recorded
