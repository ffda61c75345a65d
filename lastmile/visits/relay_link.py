"""The forward service's questions to the visit book: is this reading part of an open home
visit? Is a closed visit waiting to be queued for the county?

Kept apart from `lastmile.visits.book` (which signs visits, so imports `cryptography`): the
forward process asks for every reading it relays and every round, and most clinics keep no
visits at all. The book is opened only when visits.db holds an open visit of the reading's
patient, or a closed visit not queued yet.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from devices.observation import Observation
from lastmile.data_dir import OUTBOX_DB, columns_of, read_only

if TYPE_CHECKING:
    from lastmile.visits.book import VisitBook
    from uploader.fhir_bundle import FhirNaming
    from uploader.outbox import Outbox
    from uploader.sqlite_store import StopWaits

log = logging.getLogger(__name__)

DB_NAME = "visits.db"  # lastmile.visits.book.DB_NAME (a test keeps the two the same)


VISITS_BUSY_TIMEOUT_S = 15.0  # how long a read waits for a writer of visits.db (a stop, a GPS fix) to finish
# SQLite's words for a visits.db no visit was ever started in (not migrated yet): no visits in it
_NOT_MIGRATED = ("no such table", "no such column")


def _read_visits(db_path: Path, sql: str, params: Sequence[str | int] = ()) -> list[tuple]:
    """Rows of a read-only query of visits.db; none when there is no visits.db or it is not
    migrated yet (no visit was ever started). Any other sqlite3.Error (busy past the timeout,
    locked, damaged, an I/O error) is raised, naming visits.db: no rows would say "no such visit"
    or "no such reading" of one that may be there (a retried reading quarantined as missing, a
    reading linked to a visit sent on its own too)."""
    if not db_path.exists():
        return []
    try:
        conn = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=VISITS_BUSY_TIMEOUT_S)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if str(exc).startswith(_NOT_MIGRATED):
            return []
        raise type(exc)(f"{db_path.name} cannot be read now, try again: {exc}") from exc


def _patients_with_open_visits(db_path: Path) -> frozenset[str]:
    return frozenset(str(row[0]) for row in _read_visits(db_path, "SELECT patient_id FROM visits WHERE state = 'open'"))


# The visit a reading (by its outbox key) is linked to already: a relay cut short between the link
# and the reading's mark relays it again, maybe after the visit closed (index 0008).
VISIT_HOLDING_SQL = "SELECT visit_id FROM visit_items WHERE kind = 'observation' AND item_key = ? LIMIT 1"


def _visit_holding(db_path: Path, outbox_key: str) -> str | None:
    """VISIT_HOLDING_SQL asked read-only (VisitBook.visit_holding asks its own connection)."""
    rows = _read_visits(db_path, VISIT_HOLDING_SQL, [outbox_key])
    return str(rows[0][0]) if rows else None


def released_record(data_dir: Path, visit_item: int, visit_id: str) -> str:
    """The record of a reading a home visit released (visit_items.id of `visit_id`), as visits.db
    holds it now: the county IT restores a damaged one there, from a backup. Only the record the
    visit took (its sha256, as the visit signed it): a ValueError saying why not otherwise - a
    visits.db replaced by a fresh one gives row `visit_item` to another visit, maybe of another
    patient, and a record still damaged is not the one taken."""
    from lastmile.visits.chain import record_hash  # signing code: only for a retried reading, rarely

    rows = _read_visits(
        data_dir / DB_NAME,
        "SELECT record, sha256 FROM visit_items WHERE id = ? AND visit_id = ? AND kind = 'observation'",
        [visit_item, visit_id],
    )
    if not rows:
        raise ValueError(f"visits.db holds no reading #{visit_item} of the visit (replaced by a fresh file?)")
    record, sha256 = rows[0]
    if record is None or record_hash(json.loads(record)) != sha256:
        raise ValueError(f"reading #{visit_item} in visits.db is not the record the visit took (damaged)")
    return str(record)


class VisitNotices:
    """What was said once to the journal (on the SD card) about visits, kept by a caller that
    opens a book at each try or reading (the forward service: its VisitQueue every minute, its
    relay at each reading), so that it is said once, not every minute all day: the damage of the
    signing key file (once per damage: the file written or replaced again - its inode, size or
    mtime changed - is a new damage), and each damaged open visit a reading found."""

    def __init__(self) -> None:
        self.key_damaged = False  # the key could not be loaded in this try (new_try resets it)
        self.key_said = False  # since the key last loaded
        self.key_said_of: tuple[int, int, int] | None = None  # the file as it was when it was said
        self.damaged_visits: set[str] = set()  # the damaged open visits said

    def new_try(self) -> None:
        """A caller's new try begins: whether the key loads is its own finding (what was said is kept)."""
        self.key_damaged = False

    def key_first_of(self, path: Path) -> bool:
        """The key at `path` failed to load: whether this damage was not said yet."""
        try:
            st = path.stat()
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        first = not self.key_said or seen != self.key_said_of
        self.key_damaged, self.key_said, self.key_said_of = True, True, seen
        return first

    def key_repaired(self) -> None:
        self.key_damaged, self.key_said, self.key_said_of = False, False, None

    def first_damaged(self, visit_id: str) -> bool:
        """The open visit `visit_id` is damaged: whether it was not said yet."""
        first = visit_id not in self.damaged_visits
        self.damaged_visits.add(visit_id)
        return first


def visit_link(
    data_dir: Path, gateway_id: str, notices: VisitNotices, waits: StopWaits | None = None
) -> Callable[[Observation, str], str | None]:
    """For one relay round: links a reading to the open visit of its patient if it was taken
    during it (the visit's bundle then carries it, with its Encounter), else None. A reading
    linked already (a relay cut short before its mark) stays its visit's: sent with it, or on its
    own once if the visit is never sent (VisitBook.release_unsent), never both.
    `notices`: what was said already (the caller keeps it across rounds). `waits`: the service's
    stop: at a stop, the link's write waits at most a second more for another process's lock."""
    open_for: list[frozenset[str]] = []  # read once per relay round (one link per round), at first use

    def link(obs: Observation, outbox_key: str) -> str | None:
        if not open_for:
            open_for.append(_patients_with_open_visits(data_dir / DB_NAME))
        if obs.patient_id is None or obs.patient_id not in open_for[0]:
            return _visit_holding(data_dir / DB_NAME, outbox_key)
        from lastmile.visits.book import VisitBook

        # visits.db opened once for the reading: the book asks whether it is linked already, then
        # checks again, in the transaction that links (the visit may have closed since)
        with VisitBook.open(data_dir, gateway_id=gateway_id, notices=notices) as book:
            _give_up_waits_at_stop(book, waits)
            linked = book.visit_holding(outbox_key)
            if linked is not None:
                return linked
            return book.attach_observation(obs, outbox_key=outbox_key, taken_during=True)

    return link


def _give_up_waits_at_stop(book: VisitBook, waits: StopWaits | None) -> None:
    if waits is not None:
        from uploader.sqlite_store import give_up_waits_on

        give_up_waits_on(book.db, waits)


# The generation of the code that turns a stored visit into a FHIR bundle (lastmile.visits.record:
# row decoding; lastmile.visits.book: `_stored_for_bundle`, `observations`, `_finish_releases`
# and `_decoded_or_quarantined` (which readings it carries), `_bundle`, signing (`_chain`); uploader.fhir_bundle.visit_bundle).
# BUMP IT whenever that code changes (tests/test_fhir_fault_generation.py fails until it is): a
# visit set aside (fhir_fault) by another generation is tried once more, as an update may mend what
# set it aside. Not lastmile.__version__: it never
# changes (update bundles carry their own version). Here, not in the book: this module must not
# import the signing code (the forward service asks every round).
# 2: a damaged reading is quarantined on its own at build time, no longer setting its visit aside.
# 3: so is one that decodes but cannot be made a bundle (fhir_bundle._instant: a time UTC cannot say).
FHIR_FAULT_GENERATION = 3


def fault_generation() -> str:
    """The current generation as visits.fhir_fault_version stores it (rows from before hold a
    version string such as "0.1.0", or NULL: another generation)."""
    return str(FHIR_FAULT_GENERATION)


# How fhir_fault begins for a visit `visit stop` closed unread (its row damaged on the SD card):
# it was never checked (no flags, distance nor end fix) and the doctor was told to record it
# again, so it is never retried nor sent, even once mended: the county would get it twice.
STOPPED_DAMAGED = "stopped damaged, recorded again: "
# SQL, 1 for such a row and 0 for any other (never NULL: `NOT` of it must hold for the others)
IS_STOPPED_DAMAGED = f"COALESCE(substr(fhir_fault, 1, {len(STOPPED_DAMAGED)}) = '{STOPPED_DAMAGED}', 0)"
# SQL condition: a closed visit set aside (never to be sent as it is), not queued, that `lastmile
# visit retry` may try again once the cause is repaired (not one `stop` closed unread). Not the
# open visit a repair pass set aside (a damaged note): it is to be stopped, not retried.
# SQL condition: a closed visit never to be sent as it is (set aside, or stopped damaged), not queued
NOT_SENT_AS_IS_SQL = "state = 'closed' AND fhir_fault IS NOT NULL AND fhir_queued_at IS NULL"
SET_ASIDE_SQL = f"{NOT_SENT_AS_IS_SQL} AND NOT {IS_STOPPED_DAMAGED}"


# A closed visit that could not be queued (signed only once a time is known: no GPS, no NTP yet)
# is looked at again this often, or at once when another visit closes.
UNQUEUED_RETRY_S = 60.0


# The closed visits not queued yet (VisitBook.closed_unqueued asks the same of its connection).
CLOSED_UNQUEUED_SQL = (
    "SELECT id FROM visits WHERE state = 'closed' AND fhir_queued_at IS NULL "
    "AND (fhir_fault IS NULL OR fhir_fault_version IS NOT ?)"
)


def readings_to_release_sql(migrated: bool = True) -> str:
    """SQL: the closed visits never to be sent as they are - stopped damaged (never sent), or set
    aside (a damaged record, sent only if `visit retry` ever succeeds) - holding readings not
    released yet to go on their own (VisitBook.release_unsent). A reading is a measurement of
    the patient: it must not wait on the visit's repair. `migrated`: visit_items has released_at
    (0007); before, every reading of such a visit waits."""
    unreleased = " AND released_at IS NULL" if migrated else ""
    return (
        f"SELECT id FROM visits WHERE {NOT_SENT_AS_IS_SQL} "
        f"AND EXISTS (SELECT 1 FROM visit_items WHERE visit_id = visits.id AND kind = 'observation'{unreleased})"
    )


def closed_unqueued(data_dir: Path) -> frozenset[str]:
    """The closed visits not queued for the county yet, and those never to be sent as they are
    whose readings wait to go on their own (read-only; a clinic without visits never gets a visits.db)."""
    path = data_dir / DB_NAME
    if not path.exists():
        return frozenset()
    with read_only(path) as conn:
        # a visit that can never be a bundle is set aside (fhir_fault), not tried every minute,
        # but one set aside by another generation is tried once more (the book clears it then);
        # a visits.db no process of this version opened yet has no fhir_fault_version column
        if "fhir_fault_version" in columns_of(conn, "visits"):
            migrated = "released_at" in columns_of(conn, "visit_items")
            sql = f"{CLOSED_UNQUEUED_SQL} UNION {readings_to_release_sql(migrated)}"
            rows = conn.execute(sql, [fault_generation()]).fetchall()
        else:
            rows = conn.execute("SELECT id FROM visits WHERE state = 'closed' AND fhir_queued_at IS NULL").fetchall()
    return frozenset(str(row[0]) for row in rows)


@dataclass(frozen=True)
class ReleasedReadings:
    """A visit's readings released to go to the county platform on their own
    (VisitBook.release_unsent): the doctor sees them where she looks at her visits."""

    sent: int = 0  # queued on their own bundle
    # not sent, as the outbox item's state says: quarantined on their own (a damaged record, or one
    # FHIR cannot say: `lastmile queue`), or restored in visits.db and retried, not sent yet
    not_sent: int = 0


def quarantined_reading_key(visit_id: str, item_id: int) -> str:
    """The outbox key of a visit's reading quarantined on its own, never sendable as stored
    (VisitBook._quarantine_reading): one per visit item, so nothing is added twice."""
    return f"visit-reading:{visit_id}:{item_id}"


# A quarantined reading's item is sent once its bundle is queued (the relay marks it so): until
# then - quarantined, or retried and waiting for the relay - it is not sent.
_NOT_SENT_SQL = (
    "SELECT key FROM items WHERE key IN (SELECT value FROM json_each(?)) "
    "AND state NOT IN ('sent', 'committed', 'purged')"
)


def _not_sent(data_dir: Path, keys: Sequence[str]) -> set[str]:
    """Which of `keys` the outbox holds and has not sent (read-only; none without an outbox)."""
    if not keys or not (data_dir / OUTBOX_DB).exists():
        return set()
    with read_only(data_dir / OUTBOX_DB) as conn:
        return {str(row[0]) for row in conn.execute(_NOT_SENT_SQL, [json.dumps(list(keys))])}


def released_readings(
    conn: sqlite3.Connection, visit_ids: Sequence[str], data_dir: Path
) -> dict[str, ReleasedReadings]:
    """What became of the released readings of each visit asked (`visit list`, the console's Visits
    page), one entry per visit: one quarantined on its own (its record damaged, or one FHIR cannot
    say) is not "sent" until the outbox sent it - the outbox item's state is the truth, not the
    record (restored in visits.db, it waits for `lastmile retry`). The outbox is opened once for all
    the visits asked (a Pi's `visit list`). None released on a visits.db not migrated to 0007 yet."""
    released: list[tuple[str, str]] = []
    if visit_ids and "released_at" in columns_of(conn, "visit_items"):
        marks = ",".join("?" * len(visit_ids))
        released = [
            (str(visit_id), quarantined_reading_key(visit_id, item_id))
            for visit_id, item_id in conn.execute(
                "SELECT visit_id, id FROM visit_items WHERE kind = 'observation' AND released_at IS NOT NULL "
                f"AND visit_id IN ({marks})",
                list(visit_ids),
            )
        ]
    not_sent = _not_sent(data_dir, [key for _, key in released])
    sent = Counter(visit_id for visit_id, key in released if key not in not_sent)
    unsent = Counter(visit_id for visit_id, key in released if key in not_sent)
    return {str(v): ReleasedReadings(sent[str(v)], unsent[str(v)]) for v in visit_ids}


FileState = tuple[tuple[int, int, int] | None, ...]


def file_state(data_dir: Path) -> FileState:
    """visits.db and its WAL as the file system sees them: every commit changes one of them."""
    state: list[tuple[int, int, int] | None] = []
    for name in (DB_NAME, DB_NAME + "-wal"):
        try:
            st = (data_dir / name).stat()
        except FileNotFoundError:
            state.append(None)
        else:
            state.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(state)


class VisitQueue:
    """For the forward service, each round: queue every closed visit not queued yet (`visit stop`
    queues the one it closes, but a visit signed later - stopped before the time was known - or
    left unqueued by a stop cut short by a power cut waited for the doctor's next stop).
    Exactly once: `VisitBook.queue_closed` marks what it queued and the outbox key
    `fhir:visit:<id>` absorbs a second queueing by a concurrent `visit stop`.

    Cheap when nothing is new (most rounds, all day): visits.db is looked into only after it
    changed (even a read-only look writes SQLite's shared-memory file on the SD card), and the
    book (signing code, ~8 MB) opened only when a closed visit waits."""

    def __init__(
        self,
        data_dir: Path,
        gateway_id: str,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        notices: VisitNotices | None = None,
        waits: StopWaits | None = None,
    ) -> None:
        """`waits`: the service's stop: at a stop, queueing's visits.db writes wait at most a
        second more for another process's lock (WaitGivenUp; the visit is the next start's), not
        the 15 s busy timeout that held the forward service's SIGTERM 15.2 s."""
        self.data_dir = data_dir
        self._waits = waits
        self.gateway_id = gateway_id
        self._monotonic = monotonic
        self._seen: FileState | None = None  # the files as they were before the last look
        self._waiting: frozenset[str] = frozenset()  # what the last look left unqueued
        self._tried_at = -math.inf
        self._said_waiting: frozenset[str] = frozenset()  # what "wait for a known time" last said
        self._notices = notices or VisitNotices()  # kept across the books of each retry

    def queue(self, outbox: Outbox, naming: FhirNaming) -> int:
        now = self._monotonic()
        retry_due = bool(self._waiting) and now - self._tried_at >= UNQUEUED_RETRY_S
        files = file_state(self.data_dir)
        if files == self._seen and not retry_due:
            return 0
        waiting = closed_unqueued(self.data_dir)  # everything committed before `files` was taken
        self._seen = files
        if not waiting or (waiting <= self._waiting and not retry_due):
            self._waiting = waiting
            return 0
        from lastmile.visits.book import VisitBook

        self._notices.new_try()
        # noted before trying: a visit that fails to queue is tried again in a minute, not each round
        self._waiting, self._tried_at = waiting, now
        with VisitBook.open(self.data_dir, gateway_id=self.gateway_id, notices=self._notices) as book:
            _give_up_waits_at_stop(book, self._waits)
            queued = book.queue_closed(outbox, naming)
            # the files before what waits: a visit closed in between is seen changed next round
            before = file_state(self.data_dir)
            waiting = book.closed_unqueued()
        self._seen = file_state(self.data_dir)
        # Closing the last connection (no acquire service holds visits.db) checkpoints it: the
        # files changed, and another process's commit could hide in that change: read again.
        self._waiting = waiting if self._seen == before else closed_unqueued(self.data_dir)
        if queued:
            log.info("%d closed home visit(s) queued for the county platform", queued)
        # the book said why when the key is the cause; otherwise said when what waits changes,
        # not at every retry (the journal is on the SD card)
        if self._notices.key_damaged or not self._waiting:
            self._said_waiting = frozenset()
        elif self._waiting and self._waiting != self._said_waiting:
            log.info(
                "%d closed home visit(s) wait for a known time before they can be signed and sent", len(self._waiting)
            )
            self._said_waiting = self._waiting
        return queued
