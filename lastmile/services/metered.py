"""Metered links from the configuration: one `Meter` per destination (uploader/metering.py), and
what each holds back now (`metered_waits`): `lastmile queue`, `lastmile doctor` and the console's
Sent page say it from this one computation. Imported by the forward process, which keeps numpy
out: nothing here may import it (tests/test_metering_advice.py runs it so)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lastmile.clock import local_zone
from lastmile.config import Config, MeteredSection
from lastmile.services.link_status import (
    FHIR_STATUS,
    READING_CENTER_STATUS,
    StatusSnapshot,
    fhir_link_failing,
    fhir_link_worked,
    number,
    reading_center_down,
)
from uploader.fhir_link import LAST_ERROR_AT
from uploader.fhir_link import failed_by as fhir_failed_by
from uploader.kinds import Kind
from uploader.metering import KEEP_DAYS, SENDER_IDLE_POLL_S, Blocked, Meter, MeterPolicy, SendWindow, StatusStore

if TYPE_CHECKING:
    from uploader.outbox import MeterHold, Outbox, OutboxItem

# destination → where its settings are in lastmile.toml
SETTINGS = {"dicom": "reading_center.metered", "fhir": "fhir.metered", "reports": "reports.metered"}
# destination → what `lastmile queue` calls it, with where its settings are
DESTINATIONS = {
    "dicom": f"ECGs to the reading center ({SETTINGS['dicom']})",
    "fhir": f"visit records to the county platform ({SETTINGS['fhir']})",
    "reports": f"report polling ({SETTINGS['reports']})",
}
# destination → the outbox kind its sender takes (report polling queues nothing); from uploader.kinds,
# not uploader.outbox (sqlite-utils: the metrics exporter asks a gateway that meters nothing)
QUEUED_KINDS: dict[str, str] = {"dicom": Kind.DICOM, "fhir": Kind.FHIR_BUNDLE}
DESTINATION_OF_KIND = {kind: destination for destination, kind in QUEUED_KINDS.items()}


def meter_policy(section: MeteredSection) -> MeterPolicy | None:
    """None when the destination is not metered (no budget, no windows)."""
    policy = MeterPolicy(
        daily_budget_bytes=int(section.daily_budget_mb * 2**20),
        windows=tuple(SendWindow.parse(w) for w in section.windows),  # checked by check_meaning
        zone=local_zone(),
    )
    return policy if policy.limited else None


def sender_round_s(config: Config, destination: str) -> float:
    """How long a routine item queued while `destination`'s link is open may wait for its sender to
    try it: the senders' poll between rounds, and a transfer already on the wire, which a round
    finishes first (at most the link's network timeout; report polling queues nothing): its `Meter`'s
    `round_s` (`held_since`)."""
    on_the_wire = {"dicom": config.reading_center.timeout_s, "fhir": config.fhir.timeout_s}
    return SENDER_IDLE_POLL_S + on_the_wire.get(destination, 0.0)


def sections(config: Config) -> dict[str, MeteredSection]:
    return {
        "dicom": config.reading_center.metered,
        "fhir": config.fhir.metered,
        "reports": config.reports.metered,
    }


def meters(config: Config, store: StatusStore) -> dict[str, Meter]:
    """The metered destinations only, each with its sender's round (`sender_round_s`)."""
    found = {}
    for name, section in sections(config).items():
        policy = meter_policy(section)
        if policy is not None:
            found[name] = Meter(name, policy, store, round_s=sender_round_s(config, name))
    return found


def meter_of(config: Config, store: StatusStore, destination: str) -> Meter | None:
    """`destination`'s meter, for its sender to charge; None when it is not metered."""
    return meters(config, store).get(destination)


def held_since(meter: Meter, now: float, blocked: Blocked | None) -> float | None:
    """Since when the routine items `meter` holds now (`blocked`: `meter.blocked(now)`) were
    queued: None when it holds nothing now (routine traffic may go), -inf when it holds them all.
    A routine item queued before that had its chance and did not go - the link's fault, not the
    meter's. Walking back from now, the last chance is:
    - with send windows, each split at midnight into parts of two budget days: the end of the
      last part (now, for one open now) on a day whose budget was not spent (a part of a day whose
      budget ran out, or that has not opened yet, sent what it could; what it left is the meter's);
    - with a daily budget only: the end of the last day whose budget was not spent (an item that
      lived through it had its chance).
    With both, one walk over the windows: a study that waited through last night's window, that
    night's budget spent, and today's window not yet open, is the budget's (too small for the
    clinic: said as such, a WARN), not a dead link's. No chance in the days the meter remembers: -inf.
    While the link fails (`link_failing`), its failed sends spent the budgets: a spent day counts as
    one with budget left (a chance the link missed), but a window that has not opened since is still
    no chance - what was queued since it last opened waits for it, not for the link.
    A chance lets go only what was queued a sender round (`meter.round_s`: `sender_round_s`) before it
    ended: an item queued in the last seconds of a window was never tried before it shut - the
    window holds it until it opens again, not stuck for the ~16 h till then. One a round did try
    then is judged by its failure (`MeterHold.failed_too`, `failed_by`), as any other.
    `meter` over one read of its record (`read_once`): the walk asks it for each day and window."""
    if blocked is None:
        return None
    budget_counts = not link_failing(meter)
    if meter.policy.windows:
        chances = _window_chances(meter, now, budget_counts=budget_counts)
    else:
        chances = _budget_chances(meter, now, budget_counts=budget_counts)
    return next(chances, -math.inf) - meter.round_s


def meter_hold(meter: Meter, now: float, blocked: Blocked | None) -> MeterHold | None:
    """What `meter` (over `read_once`) holds now, as the outbox asks it: the routine items queued
    since `held_since`, with those whose sends failed as `link_worked_since_failing` and `failed_by`
    judge them. None: it holds nothing."""
    since = held_since(meter, now, blocked)
    return None if since is None else _hold(meter, since)


def _hold(meter: Meter, since: float) -> MeterHold:
    # not at import: the metrics exporter of a gateway metering nothing never loads the outbox
    from uploader.outbox import MeterHold

    return MeterHold(since, link_worked_since_failing(meter.name, meter.store), failed_by(meter.name, meter.store))


# destination -> the status its sender records about its link (report polling queues nothing)
LINK_STATUS = {"dicom": READING_CENTER_STATUS, "fhir": FHIR_STATUS}


def read_once(meter: Meter) -> Meter:
    """`meter` over one read of its record and its link's status: what `held_since` asks of them
    for every remembered day and window is then not read again (the Sent and System pages, the
    doctor and every metrics scrape ask)."""
    if isinstance(meter.store, StatusSnapshot):
        return meter
    names = (meter.status_name, *([LINK_STATUS[meter.name]] if meter.name in LINK_STATUS else []))
    values = {name: value for name in names if (value := meter.store.status(name)) is not None}
    return Meter(meter.name, meter.policy, StatusSnapshot(values), round_s=meter.round_s)


def link_failing(meter: Meter) -> bool:
    """Whether `meter`'s link failed since it last succeeded, as its sender recorded it (the
    reading center's forwarder keeps both times; the FHIR sender what the platform said)."""
    if meter.name == "fhir":
        return fhir_link_failing(meter.store.status(FHIR_STATUS))
    return meter.name == "dicom" and reading_center_down(meter.store.status(READING_CENTER_STATUS))


def link_worked_since_failing(destination: str, store: StatusStore) -> bool:
    """Whether `destination`'s link has succeeded since it last failed, as its sender recorded it
    in `store`: a routine item whose send failed before then waits for the meter like any other,
    not for the link (uploader.outbox.MeterHold.failed_too). Not known: the link's."""
    if destination == "fhir":
        return fhir_link_worked(store.status(FHIR_STATUS))
    status = store.status(READING_CENTER_STATUS) if destination == "dicom" else None
    return status is not None and number(status.get("last_success")) is not None and not reading_center_down(status)


# a send failed this soon after the link's recorded failure was the link's: a round marks what no
# association took (uploader.ecg_forwarder) after the last one to fail has recorded it
LINK_FAILURE_SLACK_S = 60.0


def failed_by(destination: str, store: StatusStore) -> float:
    """Until when a routine item's failed send was its link's failure, as its sender recorded it
    in `store` (uploader.outbox.MeterHold.failed_by): one that failed later failed alone while the
    link worked - the reading center answering it 0xA7xx (try later), the county platform answering
    its bundle 5xx, while they store the others - and waits for the peer, which no meter lets go:
    stuck, not held. Both senders record when their link last failed as `LAST_ERROR_AT`."""
    if destination not in LINK_STATUS:
        return math.inf
    status = store.status(LINK_STATUS[destination]) or {}
    failed = number(status.get(LAST_ERROR_AT))
    if destination == "fhir":
        return fhir_failed_by(failed)
    return -math.inf if failed is None else failed + LINK_FAILURE_SLACK_S


def refused_alone(item: OutboxItem, store: StatusStore) -> bool:
    """Whether `item` waits because its peer refuses it alone: its last send failed after its link
    last failed, and the link has worked since (the peer takes the others). Not a link that is down."""
    destination = DESTINATION_OF_KIND.get(item.kind)
    return (
        destination is not None
        and item.attempts > 0
        and item.failed_at is not None
        and link_worked_since_failing(destination, store)
        and item.failed_at > failed_by(destination, store)
    )


def _budget_left(meter: Meter, day: dt.date, *, budget_counts: bool) -> bool:
    """Whether `day`'s budget was not all spent (no budget, or one a failing link spent: always)."""
    budget = meter.policy.daily_budget_bytes if budget_counts else 0
    noon = dt.datetime.combine(day, dt.time(12), meter.policy.zone).timestamp()
    return not budget or meter.spent_today(noon) < budget


def _window_chances(meter: Meter, now: float, *, budget_counts: bool) -> Iterator[float]:
    """The end of each past window part (`_window_parts`) whose day's budget was not spent, newest
    first: what was queued before it could have gone. A part of a day whose budget ran out is no
    chance (when it ran out is not kept; what it left queued is the budget's). `budget_counts` False:
    every day had budget left; a window open now then holds nothing, its chance is now."""
    zone = meter.policy.zone
    today = dt.datetime.fromtimestamp(now, zone).date()
    for days_ago in range(KEEP_DAYS):  # older days: unknown (-inf, see held_since)
        day = today - dt.timedelta(days=days_ago)
        if not _budget_left(meter, day, budget_counts=budget_counts):
            continue
        ends = [min(end, now) for start, end in _window_parts(meter, day) if start <= now]
        if ends:
            yield max(ends)


def _window_parts(meter: Meter, day: dt.date) -> Iterator[tuple[float, float]]:
    """The [start, end) of each send window's part on `day`: a window that runs past midnight is
    two parts, each on its own day - and its own day's budget (the budget is a calendar day's)."""
    midnight = dt.datetime.combine(day, dt.time(), meter.policy.zone)

    def at(minute: int) -> float:
        return (midnight + dt.timedelta(minutes=minute)).timestamp()

    for window in meter.policy.windows:
        end = window.start_min + ((window.end_min - window.start_min) % 1440 or 1440)
        yield at(window.start_min), at(min(end, 1440))
        if end > 1440:  # the part of the window that opened the evening before
            yield at(0), at(end - 1440)


def _budget_chances(meter: Meter, now: float, *, budget_counts: bool) -> Iterator[float]:
    """The end of each past day whose budget was not spent, newest first (today's: now)."""
    zone = meter.policy.zone
    day = dt.datetime.fromtimestamp(now, zone).date()
    for _ in range(KEEP_DAYS):
        if _budget_left(meter, day, budget_counts=budget_counts):
            yield min(now, dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone).timestamp())
        day -= dt.timedelta(days=1)


@dataclass(frozen=True)
class MeteredWait:
    """One metered destination at `now`: whether its meter holds routine traffic back and until
    when, what it has spent today, and the routine items it holds (`held_since`): those waiting
    for its sender since it began holding them."""

    destination: str
    blocked: Blocked | None
    spent_today_bytes: int
    budget_bytes: int  # 0: no daily budget
    windows: tuple[str, ...]
    routine_waiting: int | None  # None: nothing queues for it (report polling)
    routine_since: float | None = None  # when the oldest of them was queued
    hold: MeterHold | None = None  # what it holds now, as the outbox asks it (`meter_hold`; None: nothing)

    @property
    def what(self) -> str:
        return DESTINATIONS[self.destination]

    @property
    def budget_spent_today(self) -> bool:
        """Today's budget is used up (else only a shut window can hold routine items now)."""
        return bool(self.budget_bytes) and self.spent_today_bytes >= self.budget_bytes

    @property
    def holding(self) -> bool:
        """Routine items wait now because of the meter (its window is shut or its budget spent)."""
        return self.blocked is not None and bool(self.routine_waiting)


def metered_wait(meter: Meter, outbox: Outbox, now: float, *, count: bool = True) -> MeteredWait:
    """What `meter` holds back now. `count=False` only asks whether any routine item waits
    (one row read: the Sent page asks at every render), and only while the meter blocks."""
    meter = read_once(meter)
    blocked = meter.blocked(now)
    hold = meter_hold(meter, now, blocked)
    kind = QUEUED_KINDS.get(meter.name)
    waiting: int | None = None
    since = None
    if kind is not None and count:  # while routine traffic may go: every routine item waiting
        waiting, since = outbox.routine_queued(kind, now, hold or _hold(meter, -math.inf))
    elif kind is not None:
        waiting = int(hold is not None and outbox.has_routine_queued(kind, now, hold))
    return MeteredWait(
        destination=meter.name,
        blocked=blocked,
        spent_today_bytes=meter.spent_today(now),
        budget_bytes=meter.policy.daily_budget_bytes,
        windows=tuple(str(w) for w in meter.policy.windows),
        routine_waiting=waiting,
        routine_since=since,
        hold=hold,
    )


def metered_waits(config: Config, outbox: Outbox, now: float) -> dict[str, MeteredWait]:
    """Every metered destination's `MeteredWait` (none for one that is not metered)."""
    return {name: metered_wait(meter, outbox, now) for name, meter in meters(config, outbox).items()}
