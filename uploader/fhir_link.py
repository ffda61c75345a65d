"""When the FHIR sender last found the county platform failing, as it records it in its outbox
status (`last_error_at`) and as the metered-link judgement reads it (lastmile.services.metered):
both sides here, so the rule for a gateway upgraded from a sender that never recorded it is stated
once. Imports nothing (the metrics exporter reads it without requests or the outbox).

A round records when it found the platform unavailable (no answer, a gateway's 5xx, busy: 429); a
bundle whose send failed later failed alone, the platform refusing it while it takes others. The
first round after the upgrade records the instant just before itself: what failed before it is the
link's (never said "refused alone"), what that round refuses alone is judged by the rule. Until
that round, nothing is recorded: every failure is the link's.

What the platform said in the round (`Said`: busy, not answering, refusing one bundle ...) is
recorded with it (`recorded_judgement`): the metrics exporter's link state and the console's
System page say what the forwarder judged, not what they would guess from the queued items."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

LAST_ERROR_AT = "last_error_at"  # the reading center's status (uploader.ecg_forwarder) writes it too
SAID = "said"  # what the platform said in the last round that heard it, or missed it (`Said`)
DOWN_SINCE = "down_since"  # when the rounds began finding it not answering (with `Said.DOWN`)
BUSY_SINCE = "busy_since"  # when the rounds began finding it busy (with `Said.BUSY`)
LAST_SENT_AT = "last_sent_at"  # the last round it took a bundle in


class Said(enum.StrEnum):
    """What the platform said in a round: the refusal policy, stated once (uploader.fhir_forwarder)."""

    NOTHING = "nothing"  # no answer yet
    ANSWERED = "answered"  # it took or refused (for ever) a send: it is there
    REFUSED_ONE = "refused one"  # one bundle alone refused for now (a 500): the others go on
    REFUSES_ALL = "refuses all"  # a second refused for now: it refuses everything, don't hammer it
    BUSY = "busy"  # a 429: it answers, and takes nothing now - the platform's failure, never the bundle's
    DOWN = "down"  # no answer, or a gateway's 502/503/504 saying it is not there: the link's failure
    FAULT = "fault"  # it refuses this gateway (token, TLS)

    @property
    def unavailable(self) -> bool:
        """The platform took nothing, whatever was sent (`LAST_ERROR_AT` records it)."""
        return self in (Said.BUSY, Said.DOWN)

    @property
    def stops(self) -> bool:
        """The round sends nothing more after it."""
        return self in (Said.REFUSES_ALL, Said.BUSY, Said.DOWN, Said.FAULT)


_SPELLS = {Said.DOWN.value: DOWN_SINCE, Said.BUSY.value: BUSY_SINCE}  # judgements whose spell's start is kept


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


def recorded_judgement(previous: Mapping[str, Any], now: float, said: Said, *, sent: bool) -> dict[str, Any]:
    """The `SAID`, `DOWN_SINCE` (`BUSY_SINCE`) and `LAST_SENT_AT` a round at `now` records over its
    `previous` status (`sent`: the platform took bundles in it). A round that sent nothing (all it
    claimed waited: a metered link, an earlier bundle of the patient) keeps the last judgement."""
    judged = previous.get(SAID) if said is Said.NOTHING else said.value
    record: dict[str, Any] = {} if judged is None else {SAID: judged}
    since = _SPELLS.get(judged) if isinstance(judged, str) else None
    if since is not None:  # a spell of rounds finding it not answering (busy) began with the first of them
        record[since] = previous.get(since, now) if previous.get(SAID) == judged else now
    last_sent = now if sent else previous.get(LAST_SENT_AT)
    if last_sent is not None:
        record[LAST_SENT_AT] = last_sent
    return record
