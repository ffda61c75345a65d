"""Which readings did we send: `sent_readings` in clinic.db, the readings' `sent_studies`.

The outbox purges a reading's item once it is relayed to the county platform (retention 0, the
default: at the next round), erasing its patient and payload. The Sent page then had nothing to
show, and a doctor asking "did the BP go?" measured and sent it again. The forward service's
relay (lastmile.services.observation_relay) writes one small row per reading here, before it
marks the readings relayed, in one transaction per round; the Sent page shows a purged reading from
it; `ReportStore.purge_expired` prunes it with the sent studies.

A record belongs to its item only if their keys agree (`lastmile.reports.store.is_record_of`,
the sent studies' rule too: the record keeps its item's key): outbox.sqlite made anew numbers its items from 1 again, and an
earlier outbox's record of item 1 put another patient's reading on the new item 1.

Relayed is not sent: the bundle carrying the reading (its own, or its home visit's) may wait for
a platform that is down, or be refused. `sent_at` is set when the platform took that bundle (the
forward service, by the keys a FHIR round had taken: `ReportStore.record_bundles_taken`; records
that lag are caught up from the outbox by `taken_at`); until then the Sent page reads the
bundle's state (`carrying_bundle`).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from devices.observation import Observation
from lastmile.clinic.db import iso_or_none
from lastmile.clinic.observations import summary
from uploader.fhir_bundle import visit_bundle_key
from uploader.outbox import ItemState, OutboxItem


@dataclass(frozen=True)
class SentReading:
    outbox_item_id: int  # the reading's outbox item (kind "observation")
    record_key: str  # its outbox item's key: the reading's record_key (a visit's reading set free: that item's)
    patient_id: str
    patient_name: str  # as the item carried it (the page shows it as a person's name)
    kind: str  # "blood-pressure", ...
    summary: str  # what was measured, values with their units (lastmile.clinic.observations.summary)
    device: str  # its label
    measured_at: dt.datetime
    time_source: str
    relayed_at: dt.datetime  # put in its bundle or linked to its home visit: retention counts from here
    destination: str  # the county platform's base URL
    sent_at: dt.datetime | None = None  # when the platform took the bundle carrying it; None: not yet
    bundle_key: str = ""  # the outbox key of its own bundle (queued at the relay, or when its visit released it)
    visit_id: str | None = None  # the home visit whose bundle carries it (linked to it at the relay)


def sent_reading_of(
    item: OutboxItem, obs: Observation, relayed_at: float, destination: str, bundle_key: str, visit_id: str | None
) -> SentReading:
    """The record of reading `obs` (outbox item `item`) relayed at `relayed_at` toward
    `destination`, in bundle `bundle_key` or with home visit `visit_id`."""
    return SentReading(
        outbox_item_id=item.id,
        record_key=item.key,  # what ties the record to this item, not to a reused item id (store.is_record_of)
        patient_id=str((item.patient or {}).get("patient_id") or obs.patient_id or ""),
        patient_name=str((item.patient or {}).get("name") or ""),
        kind=obs.kind,
        summary=summary(obs),
        device=obs.device.label(),
        measured_at=obs.measured_at,
        time_source=obs.time_source.value,
        relayed_at=dt.datetime.fromtimestamp(relayed_at, dt.timezone.utc),
        destination=destination,
        bundle_key=bundle_key,
        visit_id=visit_id,
    )


def insert_sent_readings(conn: sqlite3.Connection, readings: list[SentReading]) -> int:
    """Write the records (in the caller's transaction); one already written (a relay cut short
    and done again) stays as it was. A record of another reading under the same item id is an
    earlier outbox's (damaged and set aside: the new one numbers its items from 1 again) and is
    replaced. How many were written."""
    names = [f.name for f in fields(SentReading)]
    updates = ", ".join(f"{n} = excluded.{n}" for n in names if n != "outbox_item_id")
    sql = (
        f"INSERT INTO sent_readings ({', '.join(names)}) VALUES ({', '.join(':' + n for n in names)}) "
        f"ON CONFLICT(outbox_item_id) DO UPDATE SET {updates} WHERE record_key != excluded.record_key"
    )
    rows = [{**asdict(r), **{name: iso_or_none(getattr(r, name)) for name in _TIMES}} for r in readings]
    return sum(conn.execute(sql, row).rowcount for row in rows)


_TIMES = ("measured_at", "relayed_at", "sent_at")


def sent_reading(row: sqlite3.Row) -> SentReading:
    kept = dict(row)
    times = {name: None if kept[name] is None else dt.datetime.fromisoformat(kept[name]) for name in _TIMES}
    return SentReading(**{**kept, **times})


def carrying_keys(record: SentReading) -> list[str]:
    """The outbox keys of the bundles that may carry the reading, in `carrying_bundle`'s order."""
    return [k for k in (record.bundle_key, visit_bundle_key(record.visit_id) if record.visit_id else "") if k]


def carrying_bundle(find: Callable[[str], OutboxItem | None], record: SentReading) -> OutboxItem | None:
    """The bundle carrying the reading to the county platform: its own, else its home visit's;
    None while there is none (the visit still open, not queued yet). `find`: an item by key
    (`Outbox.find`, or `.get` of what `Outbox.find_many` found for many records)."""
    return next((b for b in map(find, carrying_keys(record)) if b is not None), None)


def taken_at(bundle: OutboxItem | None) -> dt.datetime | None:
    """When the county platform took `bundle` (FHIR: sent is committed at once); None: not taken."""
    if bundle is None or bundle.sent_at is None or bundle.state not in _TAKEN:
        return None
    return dt.datetime.fromtimestamp(bundle.sent_at, dt.timezone.utc)


_TAKEN = (ItemState.SENT, ItemState.COMMITTED, ItemState.PURGED)
