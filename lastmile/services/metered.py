"""Metered links from the configuration: one `Meter` per destination (uploader/metering.py), and
what each holds back now (`metered_waits`): `lastmile queue`, `lastmile doctor` and the console's
Sent page say it from this one computation. Imported by the forward process, which keeps numpy
out: nothing here may import it (tests/test_metering_advice.py runs it so)."""

from __future__ import annotations

from dataclasses import dataclass

from lastmile.clock import local_zone
from lastmile.config import Config, MeteredSection
from uploader.metering import Blocked, Meter, MeterPolicy, SendWindow, StatusStore
from uploader.outbox import Kind, Outbox

# destination → (what `lastmile queue` calls it, where its settings are)
DESTINATIONS = {
    "dicom": "ECGs to the reading center (reading_center.metered)",
    "fhir": "visit records to the county platform (fhir.metered)",
    "reports": "report polling (reports.metered)",
}
# destination → the outbox kind its sender takes (report polling queues nothing)
QUEUED_KINDS = {"dicom": Kind.DICOM, "fhir": Kind.FHIR_BUNDLE}


def meter_policy(section: MeteredSection) -> MeterPolicy | None:
    """None when the destination is not metered (no budget, no windows)."""
    policy = MeterPolicy(
        daily_budget_bytes=int(section.daily_budget_mb * 2**20),
        windows=tuple(SendWindow.parse(w) for w in section.windows),  # checked by check_meaning
        zone=local_zone(),
    )
    return policy if policy.limited else None


def sections(config: Config) -> dict[str, MeteredSection]:
    return {
        "dicom": config.reading_center.metered,
        "fhir": config.fhir.metered,
        "reports": config.reports.metered,
    }


def meters(config: Config, store: StatusStore) -> dict[str, Meter]:
    """The metered destinations only."""
    found = {}
    for name, section in sections(config).items():
        policy = meter_policy(section)
        if policy is not None:
            found[name] = Meter(name, policy, store)
    return found


@dataclass(frozen=True)
class MeteredWait:
    """One metered destination at `now`: whether its meter holds routine traffic back and until
    when, what it has spent today, and the routine items waiting for its sender."""

    destination: str
    blocked: Blocked | None
    spent_today_bytes: int
    budget_bytes: int  # 0: no daily budget
    windows: tuple[str, ...]
    routine_waiting: int | None  # None: nothing queues for it (report polling)
    routine_since: float | None = None  # when the oldest of them was queued

    @property
    def what(self) -> str:
        return DESTINATIONS[self.destination]

    @property
    def holding(self) -> bool:
        """Routine items wait now because of the meter (its window is shut or its budget spent)."""
        return self.blocked is not None and bool(self.routine_waiting)


def metered_wait(meter: Meter, outbox: Outbox, now: float, *, count: bool = True) -> MeteredWait:
    """What `meter` holds back now. `count=False` only asks whether any routine item waits (one
    row read: the Sent page asks at every render), and only while the meter blocks."""
    blocked = meter.blocked(now)
    kind = QUEUED_KINDS.get(meter.name)
    waiting: int | None = None
    since = None
    if kind is not None and count:
        waiting, since = outbox.routine_queued(kind, now)
    elif kind is not None:
        waiting = int(blocked is not None and outbox.has_routine_queued(kind, now))
    return MeteredWait(
        destination=meter.name,
        blocked=blocked,
        spent_today_bytes=meter.spent_today(now),
        budget_bytes=meter.policy.daily_budget_bytes,
        windows=tuple(str(w) for w in meter.policy.windows),
        routine_waiting=waiting,
        routine_since=since,
    )


def metered_waits(config: Config, outbox: Outbox, now: float) -> dict[str, MeteredWait]:
    """Every metered destination's `MeteredWait` (none for one that is not metered)."""
    return {name: metered_wait(meter, outbox, now) for name, meter in meters(config, outbox).items()}
