"""Field visits in tests: a Pi's clocks by hand, GPS fixes at a household, a visit book on them."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devices.gps import Fix, FixMode
from lastmile.clock import GatewayClock
from lastmile.visits.book import VisitBook, VisitPolicy

if TYPE_CHECKING:
    from uploader.outbox import Outbox

GPS_T = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.timezone.utc)
HOUSE = (31.2480, 121.5874)


class FakeClocks:
    """A Pi's clocks: wall time settable (boots at 1970), monotonic time advanced by hand."""

    def __init__(self, wall: float = 0.0, boot: str = "boot-1") -> None:
        self.mono = 100.0
        self.wall_offset = wall - self.mono
        self.boot = boot  # the boot id: a stamp from another boot cannot be repaired by this one

    def wall(self) -> float:
        return self.mono + self.wall_offset

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.mono += seconds

    def clock(self) -> GatewayClock:
        return GatewayClock(self.wall, self.monotonic, lambda: self.boot)


def fix_at(lat: float, lon: float, when: dt.datetime | None, eph: float = 8.0) -> Fix:
    return Fix(
        mode=FixMode.FIX_3D,
        time=when,
        latitude=lat,
        longitude=lon,
        altitude_m=20.0,
        eph_m=eph,
        satellites_used=9,
        hdop=0.9,
    )


def offset(lat: float, lon: float, north_m: float) -> tuple[float, float]:
    return lat + north_m / 111_195.0, lon


def open_book(data: Path, clocks: FakeClocks, **policy: object) -> VisitBook:
    """The visit book of gateway gw-1 in `data`, as one process (service or command) opens it."""
    return VisitBook.open(data, gateway_id="gw-1", policy=VisitPolicy(**policy), clock=clocks.clock())  # type: ignore[arg-type]


@contextmanager
def visits_db_opens(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every connection opened to a visits.db inside: what looking at it costs (the SD card)."""
    opened: list[str] = []
    real_connect = sqlite3.connect

    def connect(database: str, *args: object, **kwargs: object) -> sqlite3.Connection:
        if "visits.db" in str(database):
            opened.append(str(database))
        return real_connect(database, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(sqlite3, "connect", connect)
        yield opened


def damage_open_row(book: VisitBook, visit_id: str) -> None:
    """The visit's row damaged on the SD card (its start stamp no longer one): it cannot be read."""
    book.db.execute("UPDATE visits SET start_stamp = '{}' WHERE id = ?", [visit_id])
    book.db.conn.commit()


def set_aside_by_a_damaged_note(book: VisitBook, outbox: Outbox) -> None:
    """The open visit's notes damaged on the SD card, then the forward service's pass: it meets
    them and sets the visit aside (fhir_fault), its row reading well."""
    from tests.fhir_samples import NAMING

    book.db.execute("UPDATE visit_notes SET stamp = 'not json'")
    book.db.conn.commit()
    book.queue_closed(outbox, NAMING)


def relay_a_cuff_reading(data: Path, outbox: Outbox, at: dt.datetime) -> None:
    """P-1's cuff reading, recorded at the clinic, relayed by the forward service's relay."""
    from lastmile.clinic.observations import ObservationStore
    from lastmile.services.observation_relay import relay_observations
    from lastmile.visits.relay_link import VisitNotices, visit_link
    from tests.fhir_samples import NAMING, blood_pressure

    store = ObservationStore.open(data, outbox=outbox, idle_timeout_s=900)
    try:
        store.context.set_patient("P-1", "Wang^Fang", now=at)
        assert store.record(blood_pressure(at, None, "bp-1"), now=at).outcome == "stored"
        assert (
            relay_observations(outbox, NAMING, at.timestamp(), visit_link=visit_link(data, "gw-1", VisitNotices())) == 1
        )
    finally:
        store.close()


def link_a_reading_then_set_the_visit_aside(data: Path, at: dt.datetime) -> str:
    """A cuff reading relayed into P-1's open visit; the visit stopped and signed, then its doctor
    blanked on the SD card, so queueing it sets it aside (closed, retryable). The visit's id."""
    from uploader.outbox import Outbox

    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1")
    with Outbox.open(data, min_free_bytes=0) as outbox:
        relay_a_cuff_reading(data, outbox, at)
    with VisitBook.open(data, gateway_id="gw-1") as book:
        book.stop()
        book.db.execute("UPDATE visits SET doctor_id = '' WHERE id = ?", [visit.id])
        book.db.conn.commit()
    return visit.id
