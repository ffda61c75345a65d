"""Which readings did we send: `sent_readings` in clinic.db, the readings' `sent_studies`.

The outbox purges a reading's item once it is relayed to the county platform (retention 0, the
default: at the next round), erasing its patient and payload. The Sent page then had nothing to
show, and a doctor asking "did the BP go?" measured and sent it again. The forward service's
relay (lastmile.services.observation_relay) writes one small row per reading here, before it
marks the readings sent, in one transaction per round; the Sent page shows a purged reading from
it; `ReportStore.purge_expired` prunes it with the sent studies.

A record belongs to its item only if their keys agree (`lastmile.reports.store.is_record_of`,
the sent studies' rule too: the record keeps its item's key): outbox.sqlite made anew numbers its items from 1 again, and an
earlier outbox's record of item 1 put another patient's reading on the new item 1.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import asdict, dataclass, fields

from devices.observation import Observation
from lastmile.clinic.db import iso
from lastmile.clinic.observations import summary
from uploader.outbox import OutboxItem


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
    sent_at: dt.datetime
    destination: str  # the county platform's base URL


def sent_reading_of(item: OutboxItem, obs: Observation, sent_at: float, destination: str) -> SentReading:
    """The record of reading `obs` (outbox item `item`) relayed at `sent_at` toward `destination`."""
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
        sent_at=dt.datetime.fromtimestamp(sent_at, dt.timezone.utc),
        destination=destination,
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
    rows = [{**asdict(r), "measured_at": iso(r.measured_at), "sent_at": iso(r.sent_at)} for r in readings]
    return sum(conn.execute(sql, row).rowcount for row in rows)


def sent_reading(row: sqlite3.Row) -> SentReading:
    kept = dict(row)
    times = {name: dt.datetime.fromisoformat(kept[name]) for name in ("measured_at", "sent_at")}
    return SentReading(**{**kept, **times})
