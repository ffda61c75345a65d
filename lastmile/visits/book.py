"""Home visits: captured offline with where and when, checked, chained, signed, queued as FHIR.

One SQLite database `visits.db` in the data directory (WAL, named migrations), separate from the
outbox: a visit is the doctor's record first and a message to the county second. A visit holds
doctor, patient, household, start/end stamps (time + its source + monotonic reading + boot, see
`lastmile.clock`), the best fix at start and at stop, a bounded GPS track while open, notes, and
the observations/ECGs taken during it (linked by their outbox key; observations are kept whole
so the FHIR bundle can be built offline).

Authenticity checks run at stop and are stored as flags, never as rejections:

- no-fix: no position at all; poor-accuracy: the best fix's 95 % error exceeds `max_eph_m`;
- stale-fix: the fix used is older than `stale_fix_s`;
- outside-radius: household farther than `radius_m` + the fix's error; unknown-household /
  no-household: cannot be checked against the register;
- impossible-jump: consecutive track points further apart than speed x time + their errors;
- time-disagreement: GPS and system clock further apart than `time_disagreement_s` (the visit's
  times of the boot GPS anchored are then GPS times: monotonic reading + GPS offset);
- provisional-time: no plausible time was known when the visit started (repaired later);
- start-time-lost: ... and the gateway rebooted before it could be repaired (only the boot that
  stamped it can): the start stays unknown, and the visit is sent without period.start;
- end-time-lost: the same for a visit stopped before any time was known (sent as finished,
  without period.end).

A stopped visit becomes a record in the gateway's hash chain, signed with its Ed25519 key
(`lastmile.visits.chain`); an export re-derives every record from the tables, so a row edited in
the database afterwards no longer matches its signed hash. So a record is signed only once its
times are settled - known, or lost to a reboot (start-time-lost, end-time-lost) - and never
changed afterwards: a visit stopped before GPS or NTP gave the time is closed (nothing more can
be added to it) but signed when the time comes, after its stamps were repaired. It is queued
for the county only once signed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import sqlite_utils

from devices.gps.fix import Fix
from devices.identity import TimeSource
from devices.observation import Observation
from lastmile.clinic.observations import observation_from_json, observation_to_json
from lastmile.clock import Anchor, GatewayClock, Stamp
from lastmile.data_dir import ensure_data_dir
from lastmile.visits.chain import (
    GENESIS,
    KEY_FILE,
    ChainLink,
    SigningKeyError,
    VerifyReport,
    canonical,
    export_lines,
    link,
    load_or_create_key,
    public_key_b64,
    verify_lines,
)
from lastmile.visits.households import Household, HouseholdRegister, distance_m
from lastmile.visits.record import (
    BUNDLE_ERRORS,
    DamagedVisitError,
    FixRecord,
    VisitError,
    decode_row,
    fault_text,
    open_row_damage,
    quarantined_reading_reason,
    stored_reading,
)
from lastmile.visits.relay_link import (
    CLOSED_UNQUEUED_SQL,
    IS_STOPPED_DAMAGED,
    SET_ASIDE_SQL,
    STOPPED_DAMAGED,
    VISIT_HOLDING_SQL,
    ReleasedReadings,
    VisitNotices,
    fault_generation,
    quarantined_reading_key,
    readings_to_release_sql,
    released_readings,
)
from uploader.sqlite_store import Migration, open_database, transaction

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware_bridge.gnss import FixSource
    from uploader.fhir_bundle import FhirNaming, VisitSummary
    from uploader.outbox import Outbox

log = logging.getLogger(__name__)

DB_NAME = "visits.db"

MIGRATIONS: tuple[Migration, ...] = (
    Migration.sql(
        "0001_visits",
        """
        CREATE TABLE visits (
            id TEXT PRIMARY KEY, gateway_id TEXT NOT NULL, doctor_id TEXT NOT NULL,
            patient_id TEXT NOT NULL, household_id TEXT, setting TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
            start_stamp TEXT NOT NULL, end_stamp TEXT, started_at TEXT, ended_at TEXT,
            start_fix TEXT, end_fix TEXT, flags TEXT NOT NULL DEFAULT '[]', distance_m REAL,
            household_lat REAL, household_lon REAL, fhir_queued_at TEXT);
        CREATE UNIQUE INDEX one_open_visit ON visits (state) WHERE state = 'open';
        CREATE TABLE visit_notes (id INTEGER PRIMARY KEY, visit_id TEXT NOT NULL REFERENCES visits(id),
            stamp TEXT NOT NULL, text TEXT NOT NULL);
        CREATE TABLE visit_track (id INTEGER PRIMARY KEY, visit_id TEXT NOT NULL REFERENCES visits(id),
            fix TEXT NOT NULL, received TEXT NOT NULL);
        CREATE INDEX visit_track_visit ON visit_track (visit_id, id);
        CREATE TABLE visit_items (id INTEGER PRIMARY KEY, visit_id TEXT NOT NULL REFERENCES visits(id),
            kind TEXT NOT NULL, item_key TEXT NOT NULL, record TEXT, sha256 TEXT NOT NULL,
            UNIQUE (visit_id, kind, item_key));
        CREATE TABLE chain (seq INTEGER PRIMARY KEY, visit_id TEXT NOT NULL UNIQUE REFERENCES visits(id),
            prev_hash TEXT NOT NULL, hash TEXT NOT NULL, signature TEXT NOT NULL, signed_at TEXT NOT NULL);
        CREATE TABLE households (household_id TEXT PRIMARY KEY, latitude REAL NOT NULL,
            longitude REAL NOT NULL);
        CREATE TABLE register_imports (id INTEGER PRIMARY KEY, imported_at TEXT, source TEXT,
            sha256 TEXT, count INTEGER);
        CREATE TABLE clock_anchor (boot_id TEXT PRIMARY KEY, offset REAL NOT NULL, source TEXT NOT NULL);
    """,
    ),
    # visit-queue: the acquire service owns the NMEA receiver's port; a command asks it for its
    # fixes (until a monotonic time of this boot) instead of opening the port a second time.
    Migration.sql(
        "0002_gnss_share",
        """
        CREATE TABLE gnss_share (id INTEGER PRIMARY KEY CHECK (id = 1), boot_id TEXT NOT NULL,
            wanted_until REAL NOT NULL, record TEXT);
    """,
    ),
    # r1-fix: why a closed visit can never be made a FHIR bundle (a damaged record): it is set
    # aside, said once and shown by `lastmile visit list`, and holds up no visit closed after it.
    Migration.sql("0003_visit_fhir_fault", "ALTER TABLE visits ADD COLUMN fhir_fault TEXT;"),
    # r3-fix: the version that set a visit aside: an update (mending the fault) tries it once more.
    Migration.sql("0004_visit_fhir_fault_version", "ALTER TABLE visits ADD COLUMN fhir_fault_version TEXT;"),
    # v-fix: visits `visit stop` closed unread before STOPPED_DAMAGED existed carry no mark, and
    # `visit retry` sent them (twice: the doctor recorded them again, as stop said). Marked now.
    # Closed unread, never checked nor signed: every visit `stop` checked has a flag (no-household,
    # unknown-household or no-fix at least) or a distance, written with a list of flags; one closed
    # unread kept the flags its row had when open: none, or damaged. Inlined: an old migration
    # must not change when code it would share is edited.
    Migration.sql(
        "0005_mark_stopped_damaged",
        f"""
        UPDATE visits SET fhir_fault = '{STOPPED_DAMAGED}' || COALESCE(fhir_fault, 'closed unread by an earlier version'),
            fhir_fault_version = '{fault_generation()}'
        WHERE state = 'closed' AND fhir_queued_at IS NULL AND id NOT IN (SELECT visit_id FROM chain)
            AND distance_m IS NULL AND household_lat IS NULL AND end_fix IS NULL
            AND CASE WHEN json_valid(flags) THEN json_array_length(flags) = 0 ELSE 1 END
            AND NOT {IS_STOPPED_DAMAGED};
    """,
    ),
    # v2-fix: the datum the register file was read in (visits.register_datum): a changed setting
    # imports the same file again. Earlier imports read it as WGS-84.
    Migration.sql(
        "0006_register_datum", "ALTER TABLE register_imports ADD COLUMN datum TEXT NOT NULL DEFAULT 'wgs84';"
    ),
    # v4-fix: the readings linked to a visit stopped damaged (never sent) go to the county on their
    # own: when each was queued so. Those of visits stopped damaged before (0005 marked some) have
    # none yet: the forward service's next round releases them.
    Migration.sql("0007_visit_items_released", "ALTER TABLE visit_items ADD COLUMN released_at TEXT;"),
    # s36-v: the relay asks, for every reading, whether its outbox key is linked to a visit already
    # (relay_link.VISIT_HOLDING_SQL): an index, not a scan of every visit's items.
    Migration.sql("0008_visit_items_item_key", "CREATE INDEX visit_items_item_key ON visit_items (item_key);"),
)

# The saved clock anchor (what other processes of this boot restore) is rewritten only when it moved
# more than this: a receiver's fix each second barely moves it (monotonic drift is ~4 s a day at most).
ANCHOR_SAVE_S = 0.5

START_TIME_LOST = "start-time-lost"
END_TIME_LOST = "end-time-lost"


@dataclass(frozen=True)
class VisitPolicy:
    radius_m: float = 200.0
    max_eph_m: float = 100.0
    stale_fix_s: float = 120.0
    max_speed_mps: float = 60.0
    time_disagreement_s: float = 60.0
    track_max_points: int = 2000
    setting: str = "home"

    @classmethod
    def from_config(cls, visits_section: object) -> VisitPolicy:
        names = cls.__dataclass_fields__
        return cls(**{n: getattr(visits_section, n) for n in names if hasattr(visits_section, n)})


@dataclass
class Visit:
    id: str
    doctor_id: str
    patient_id: str
    household_id: str | None
    setting: str
    state: str
    start: Stamp
    end: Stamp | None
    start_fix: FixRecord | None
    end_fix: FixRecord | None
    flags: list[str] = field(default_factory=list)
    distance_m: float | None = None
    chain_seq: int | None = None
    fhir_queued: bool = False
    fhir_fault: str | None = None  # why it can never be sent to the county platform
    row_damaged: bool = False  # its row could not be read: stamps and fixes are placeholders
    # its readings sent to the county platform on their own, not with it (it was never to be sent
    # as it was: release_unsent): the doctor sees them where she looks at visits, not in the journal
    readings_sent_alone: int = 0
    # ... and those released not sent (ReleasedReadings.not_sent): quarantined in the outbox (a
    # damaged record, or one FHIR cannot say), or retried and not sent yet
    readings_not_sent: int = 0

    @property
    def recorded_again(self) -> bool:
        """`stop` closed it unread (damaged) and told the doctor to record it again: never sent."""
        return (self.fhir_fault or "").startswith(STOPPED_DAMAGED)

    def to_json(self) -> dict:
        def fix(r: FixRecord | None) -> dict | None:
            if r is None or not r.fix.has_position:
                return None
            return {"lat": r.fix.latitude, "lon": r.fix.longitude, "eph_m": r.fix.eph_m, "mode": int(r.fix.mode)}

        return {
            "visit_id": self.id,
            "state": self.state,
            "doctor_id": self.doctor_id,
            "patient_id": self.patient_id,
            "household_id": self.household_id,
            "setting": self.setting,
            "started_at": _iso(self.start.time),
            "start_source": self.start.source.value,
            "ended_at": _iso(self.end.time) if self.end else None,
            "start_fix": fix(self.start_fix),
            "end_fix": fix(self.end_fix),
            "flags": self.flags,
            "distance_m": self.distance_m,
            "chain_seq": self.chain_seq,
            "fhir_queued": self.fhir_queued,
            "fhir_fault": self.fhir_fault,
            "readings_sent_alone": self.readings_sent_alone,
            "readings_not_sent": self.readings_not_sent,
        }


def _iso(value: dt.datetime | None) -> str | None:
    return (
        value.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z") if value else None
    )


def _on_anchor(stamp: Stamp, gps_offset: float) -> Stamp:
    """A stamp's time from its monotonic reading and a GPS offset of its boot."""
    epoch = stamp.monotonic + gps_offset
    return Stamp(dt.datetime.fromtimestamp(epoch, dt.timezone.utc), TimeSource.GPS, stamp.monotonic, stamp.boot_id)


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# --- observations kept whole (for the FHIR bundle built after days offline) ---------------------

# --- checks ---------------------------------------------------------------------------------------


def _age_s(record: FixRecord, at: Stamp) -> float | None:
    if record.received.boot_id == at.boot_id:
        return at.monotonic - record.received.monotonic
    if record.fix.time and at.time:
        return (at.time - record.fix.time).total_seconds()
    return None


def check_visit(
    policy: VisitPolicy,
    *,
    household_id: str | None,
    household: Household | None,
    start: Stamp,
    end: Stamp,
    start_fix: FixRecord | None,
    end_fix: FixRecord | None,
    track: Sequence[FixRecord],
    clock_disagreement_s: float | None,
) -> tuple[list[str], float | None]:
    """Flags (sorted) and the distance from the household of the best fix."""
    flags: set[str] = set()
    ends = [(r, s) for r, s in ((start_fix, start), (end_fix, end)) if r is not None and r.fix.has_position]
    candidates = [r for r, _ in ends] or [r for r in track if r.fix.has_position]
    if not candidates:
        flags.add("no-fix")
    for record, stamp in ends:
        age = _age_s(record, stamp)
        if age is not None and age > policy.stale_fix_s:
            flags.add("stale-fix")
    best = min(candidates, key=lambda r: r.fix.eph_m if r.fix.eph_m is not None else float("inf"), default=None)
    if best is not None and (best.fix.eph_m is None or best.fix.eph_m > policy.max_eph_m):
        flags.add("poor-accuracy")
    distance = None
    if household_id is None:
        flags.add("no-household")
    elif household is None:
        flags.add("unknown-household")
    elif best is not None:
        assert best.fix.latitude is not None and best.fix.longitude is not None
        distance = distance_m(best.fix.latitude, best.fix.longitude, household.latitude, household.longitude)
        if distance - (best.fix.eph_m or 0.0) > policy.radius_m:
            flags.add("outside-radius")
    points = [r for r in track if r.fix.has_position]
    for a, b in itertools.pairwise(points):
        dt_s = b.received.monotonic - a.received.monotonic if a.received.boot_id == b.received.boot_id else None
        if dt_s is None and a.fix.time and b.fix.time:
            dt_s = (b.fix.time - a.fix.time).total_seconds()
        if dt_s is None or dt_s < 0:
            continue
        d = distance_m(a.fix.latitude, a.fix.longitude, b.fix.latitude, b.fix.longitude)  # type: ignore[arg-type]
        slack = (a.fix.eph_m or 0.0) + (b.fix.eph_m or 0.0)
        if d - slack > policy.max_speed_mps * max(dt_s, 1.0):
            flags.add("impossible-jump")
            break
    if clock_disagreement_s is not None and abs(clock_disagreement_s) > policy.time_disagreement_s:
        flags.add("time-disagreement")
    if start.source == TimeSource.UNKNOWN:
        flags.add("provisional-time")
    if start.provisional and start.boot_id != end.boot_id:
        flags.add(START_TIME_LOST)
    return sorted(flags), distance


@dataclass(frozen=True)
class StoredVisit:
    """What a closed, signed visit's bundle is made of, as decoded from visits.db."""

    summary: VisitSummary
    observations: list[Observation]
    chain: dict  # its row in the chain table
    signed_at: dt.datetime


# --- the book -------------------------------------------------------------------------------------


class VisitBook:
    def __init__(
        self,
        db: sqlite_utils.Database,
        data_dir: Path,
        gateway_id: str,
        policy: VisitPolicy,
        clock: GatewayClock,
        notices: VisitNotices | None = None,
    ) -> None:
        self.db = db
        self.data_dir = data_dir
        self.gateway_id = gateway_id
        self.policy = policy
        self.clock = clock
        self.register = HouseholdRegister(db)
        self._key: Ed25519PrivateKey | None = None
        # what was said once (a damaged key file, a damaged open visit): a caller that opens a book
        # at each try or reading (the forward service) keeps it across them
        self.notices = notices or VisitNotices()
        self._stale_fixes = 0  # in a row, for the log
        self._repaired = False  # provisional stamps repaired with this process's GPS time
        self._saved_anchor: Anchor | None = None  # as visits.db holds it for this boot
        self._restore_anchor()
        # an update changes the generation only with a new process: once per book, not per pass
        self._set_aside_retried = False

    @classmethod
    def open(
        cls,
        data_dir: str | Path,
        *,
        gateway_id: str,
        policy: VisitPolicy | None = None,
        clock: GatewayClock | None = None,
        notices: VisitNotices | None = None,
    ) -> VisitBook:
        data_dir = ensure_data_dir(data_dir)
        try:
            db = open_database(data_dir / DB_NAME, MIGRATIONS)
        except sqlite3.Error as exc:  # "unable to open database file": say which (doctor, part status)
            named = type(exc)(f"{data_dir / DB_NAME}: {exc}")
            # disk full? SQLite's own errors say; ours ("cannot switch the database to WAL") do not
            for attr in ("sqlite_errorcode", "sqlite_errorname"):
                if hasattr(exc, attr):
                    setattr(named, attr, getattr(exc, attr))
            raise named from exc
        return cls(db, data_dir, gateway_id, policy or VisitPolicy(), clock or GatewayClock(), notices)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> VisitBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            self._key = load_or_create_key(self.data_dir)
        return self._key

    def _usable_key(self) -> Ed25519PrivateKey | None:
        """The signing key, or None when its file is damaged: the gateway's fault, said loudly,
        not any visit's. Nothing is set aside for it: the visits wait, closed, and are signed and
        sent once the key is repaired (read again at every try)."""
        try:
            key = self.signing_key
        except SigningKeyError as exc:
            (log.error if self.notices.key_first_of(self.data_dir / KEY_FILE) else log.debug)(
                "home visits cannot be signed nor sent to the county platform until the gateway's "
                "signing key is repaired (restore it from its backup): %s",
                exc,
            )
            return None
        self.notices.key_repaired()
        return key

    # --- time ------------------------------------------------------------------------------------
    def _restore_anchor(self) -> None:
        """The anchor another process of this boot saved (the acquire service's GPS fixes)."""
        rows = list(self.db.query("SELECT offset, source FROM clock_anchor WHERE boot_id = ?", [self.clock.boot_id]))
        if rows:
            self._saved_anchor = Anchor(self.clock.boot_id, rows[0]["offset"], TimeSource(rows[0]["source"]))
            self.clock.restore(self._saved_anchor)

    def _stamp_now(self) -> Stamp:
        """(A command, in a write transaction.) Now, on the anchor as visits.db holds it now: the
        acquire service's first fix may have come since this book was opened, and the service
        repairs only the stamps written before it saved that anchor."""
        self._restore_anchor()
        return self.clock.now()

    def adopt_shared_fix(self, record: FixRecord) -> None:
        """(A command.) A fix the acquire service received and recorded (track, saved anchor,
        repairs): this process's clock learns from it too - its GPS time for the stamps the
        command writes, and how far the system clock is from it (the time-disagreement flag)."""
        fix = record.fix
        if fix.time is not None and fix.has_position and record.received.boot_id == self.clock.boot_id:
            self.clock.observe_gps(fix.time, record.received.monotonic)

    def _save_anchor(self) -> bool:
        """Whether the anchor moved (and was saved)."""
        anchor = self.clock.anchor
        saved = self._saved_anchor
        if anchor is None or (
            saved is not None
            and (saved.boot_id, saved.source) == (anchor.boot_id, anchor.source)
            and abs(saved.offset - anchor.offset) <= ANCHOR_SAVE_S
        ):
            return False  # unchanged: not one SD-card write per fix, all day
        with transaction(self.db):  # as every write: a service's stop bounds its wait for the lock
            self.db.table("clock_anchor").upsert(
                {"boot_id": anchor.boot_id, "offset": anchor.offset, "source": anchor.source.value}, pk="boot_id"
            )
        self._saved_anchor = anchor
        return True

    def observe_fix(self, fix: Fix, received: Stamp | None = None) -> FixRecord | None:
        """Every fix from the receiver: anchors the clock (GPS time), extends the open visit's track.
        None for a stale fix (its time well behind the GPS time already known): it is not where the
        doctor is now, so it neither moves the clock back nor tags a visit."""
        received = received or self.clock.now()
        if fix.time is not None and fix.has_position and self.clock.stale_gps(fix.time, received.monotonic):
            # said once per run of them: a receiver stuck behind must not write the journal every second
            (log.debug if self._stale_fixes else log.warning)(
                "ignoring a fix of %s: older than the GPS time already known (receiver buffer?)", _iso(fix.time)
            )
            self._stale_fixes += 1
            return None
        self._stale_fixes = 0
        if fix.time is not None and fix.has_position and self.clock.observe_gps(fix.time, received.monotonic):
            moved = self._save_anchor()
            received = self.clock.repair(received) if received.provisional else received
            if moved or not self._repaired:
                # only when the time changed: not a chain walk each second, all day
                self._repair_provisional()
                self._repaired = True
        record = FixRecord(fix, received)
        if fix.has_position:
            self._extend_track(record)
            self._share(record)
        return record

    # --- a command asking the service that owns the receiver -------------------------------------
    def want_fixes(self, wait_s: float) -> Stamp:
        """(A command, while the acquire service holds the receiver's port.) Ask the service to
        share its fixes for `wait_s` seconds; returns when it was asked."""
        now = self.clock.now()
        self.db.execute(
            "INSERT INTO gnss_share (id, boot_id, wanted_until, record) VALUES (1, ?, ?, NULL) "
            "ON CONFLICT (id) DO UPDATE SET boot_id = excluded.boot_id, wanted_until = "
            # another command of this boot may wait longer: a short wait must not cut its wait short
            "CASE WHEN boot_id = excluded.boot_id THEN MAX(wanted_until, excluded.wanted_until) "
            "ELSE excluded.wanted_until END",
            [now.boot_id, now.monotonic + wait_s],
        )
        return now

    def shared_fix(self, since: Stamp) -> FixRecord | None:
        """The latest fix the service shared, if it was received after `since` (this boot)."""
        row = self.db.execute("SELECT record FROM gnss_share WHERE id = 1").fetchone()
        record = FixRecord.from_json(row[0]) if row is not None else None
        if record is None or record.received.boot_id != since.boot_id or record.received.monotonic < since.monotonic:
            return None
        return record

    def _share(self, record: FixRecord) -> None:
        """(The service.) A fix for a command waiting for one: written only while one waits (an
        UPDATE that matches nothing writes nothing: the files stay as they were). In a transaction
        as every write: it takes the write lock all the same, and a service's stop bounds that wait."""
        with transaction(self.db):
            self.db.execute(
                "UPDATE gnss_share SET record = ? WHERE id = 1 AND boot_id = ? AND wanted_until >= ?",
                [record.to_json(), record.received.boot_id, record.received.monotonic],
            )

    def _extend_track(self, record: FixRecord) -> None:
        """A fix (1 Hz, all day) joins the open visit's track: one indexed look when none is open."""
        row = self.db.execute("SELECT id FROM visits WHERE state = 'open'").fetchone()
        if row is None:
            return
        visit_id = row[0]
        with transaction(self.db):
            # "Still open?" asked by the insert itself, under the write lock: the doctor's stop
            # (another process) may have closed and signed it since, and a point added then
            # breaks its signed record.
            added = self.db.execute(
                "INSERT INTO visit_track (visit_id, fix, received) SELECT id, ?, ? FROM visits "
                "WHERE id = ? AND state = 'open'",
                [record.to_json(), json.dumps(record.received.to_json()), visit_id],
            ).rowcount
            if added:
                self._bound_track(visit_id)

    def _bound_track(self, visit_id: str) -> None:
        count = self.db.execute("SELECT COUNT(*) FROM visit_track WHERE visit_id = ?", [visit_id]).fetchone()[0]
        if count <= self.policy.track_max_points:
            return
        # Halve the resolution evenly, keeping the first and last points.
        self.db.execute(
            """DELETE FROM visit_track WHERE id IN (
            SELECT id FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS rn, COUNT(*) OVER () AS n
                            FROM visit_track WHERE visit_id = ?) WHERE rn % 2 = 0 AND rn < n)""",
            [visit_id],
        )

    def _repair_provisional(self) -> None:
        """Give provisional stamps of this boot their time, now that the clock has an anchor, and
        sign the closed visits whose times are now settled."""
        with transaction(self.db):
            self._sign_settled()

    def _repair_unsigned(self) -> None:
        """(In a write transaction.) Repair the stamps of visits not signed yet: a signed record is
        never changed (its hash would no longer match), and its times were settled before signing."""
        unsigned = "SELECT visit_id FROM chain UNION SELECT id FROM visits WHERE fhir_fault IS NOT NULL"
        for row in list(
            self.db.query(
                f"SELECT id, start_stamp, end_stamp FROM visits WHERE id NOT IN ({unsigned}) "
                "AND (started_at IS NULL OR (end_stamp IS NOT NULL AND ended_at IS NULL))"
            )
        ):
            sets = {}
            try:
                for col, at_col in (("start_stamp", "started_at"), ("end_stamp", "ended_at")):
                    if row[col]:
                        fixed = self.clock.repair(Stamp.from_json(json.loads(row[col])))
                        if fixed.time is not None:
                            sets[col], sets[at_col] = json.dumps(fixed.to_json()), fixed.time.isoformat()
            except BUNDLE_ERRORS as exc:
                self._set_aside(row["id"], exc)
                continue
            if sets:
                self.db.table("visits").update(row["id"], sets)
        for row in list(
            self.db.query(f"SELECT id, visit_id, stamp FROM visit_notes WHERE visit_id NOT IN ({unsigned})")
        ):
            try:
                stamp = Stamp.from_json(json.loads(row["stamp"]))
            except BUNDLE_ERRORS as exc:
                self._set_aside(row["visit_id"], exc)
                continue
            if stamp.provisional:
                fixed = self.clock.repair(stamp)
                if not fixed.provisional:
                    self.db.table("visit_notes").update(row["id"], {"stamp": json.dumps(fixed.to_json())})

    def _set_aside(self, visit_id: str, exc: Exception) -> None:
        """(In a write transaction.) A visit whose stored record is damaged can never be signed or
        made a bundle: why is kept on it (`lastmile visit list`), it is said once, and it no
        longer stops the fixes, the signing or the sending of any other visit."""
        fault = fault_text(exc)
        # only if not set aside yet: a pass may meet the same visit again (each damaged note)
        newly = self.db.execute(
            "UPDATE visits SET fhir_fault = ?, fhir_fault_version = ? WHERE id = ? AND fhir_fault IS NULL",
            [fault, fault_generation(), visit_id],
        ).rowcount
        if newly:
            log.error("home visit %s is damaged and cannot be sent to the county platform: %s", visit_id, fault)

    def _retry_set_aside(self) -> None:
        """(In a write transaction.) Visits set aside by another generation of the bundle code
        (relay_link.FHIR_FAULT_GENERATION) are tried once more: the update may mend what set them
        aside (a bundle bug, or an older version's verdict on a damaged key file); one still
        damaged is set aside again, under this generation. Not one `stop` closed unread: it was
        recorded again (it only moves to this generation, or the forward service would look at it
        every minute)."""
        self.db.execute(
            f"UPDATE visits SET fhir_fault_version = ? WHERE {IS_STOPPED_DAMAGED} AND fhir_fault_version IS NOT ?",
            [fault_generation(), fault_generation()],
        )
        retried = self.db.execute(
            "UPDATE visits SET fhir_fault = NULL, fhir_fault_version = NULL "
            f"WHERE fhir_fault IS NOT NULL AND fhir_fault_version IS NOT ? AND NOT {IS_STOPPED_DAMAGED}",
            [fault_generation()],
        ).rowcount
        if retried:
            log.info("%d home visit(s) set aside by an earlier version are tried again", retried)

    def retry_set_aside(self, visit_id: str | None = None) -> list[str]:
        """(`lastmile visit retry`, once the cause is repaired.) Clear the set-aside of one visit
        (its id, or a beginning of it that names one) or of all: the forward service then signs
        and queues them once each (outbox key `fhir:visit:<id>`); one still damaged is set aside
        again, with why. Never one `stop` closed unread: the doctor recorded it again, as told.
        Returns the ids cleared."""
        sql, params = f"SELECT id FROM visits WHERE {SET_ASIDE_SQL}", []
        if visit_id is not None:
            sql, params = sql + " AND substr(id, 1, length(?)) = ?", [visit_id, visit_id]
        with transaction(self.db):
            ids = [r["id"] for r in self.db.query(sql, params)]
            if visit_id is not None and len(ids) != 1:
                raise VisitError(self._not_retried(visit_id, len(ids)))
            self.db.conn.executemany(
                "UPDATE visits SET fhir_fault = NULL, fhir_fault_version = NULL WHERE id = ?", [[i] for i in ids]
            )
        if ids:
            log.info("%d home visit(s) set aside are tried again (lastmile visit retry)", len(ids))
        return ids

    def _not_retried(self, visit_id: str, set_aside: int) -> str:
        """Why `lastmile visit retry ID` retries nothing: the beginning of an id names no visit
        set aside or several."""
        if set_aside:
            return f"{set_aside} visits set aside have an id beginning with {visit_id!r}"
        rows = list(self.db.query("SELECT * FROM visits WHERE substr(id, 1, length(?)) = ?", [visit_id, visit_id]))
        if len(rows) != 1:
            return f"{len(rows) or 'no'} visits have an id beginning with {visit_id!r}"
        visit = self._visit(rows[0], lenient=True)
        if visit.recorded_again:
            return (
                f"visit {visit.id} was damaged when it was stopped and recorded again: it is never "
                "sent (the county would get the visit twice)"
            )
        return f"visit {visit.id} is not set aside: nothing to retry"

    def _sign_settled(self) -> int:
        """(In a write transaction.) Repair, then sign every closed visit whose times are settled:
        known, or lost because they were stamped in an earlier boot that never learnt the time.
        Nothing is signed before this boot has a time: signed_at must be a real time too."""
        if not self._set_aside_retried:
            self._retry_set_aside()
            self._set_aside_retried = True
        now = self.clock.now()
        if now.time is None:
            return 0
        self._repair_unsigned()
        rows = list(
            self.db.query(
                "SELECT id, start_stamp, end_stamp, started_at, ended_at, flags FROM visits "
                "WHERE state = 'closed' AND fhir_fault IS NULL AND id NOT IN (SELECT visit_id FROM chain) "
                "ORDER BY rowid"
            )
        )
        # Loaded before any visit is tried, and outside their `try`: a damaged key sets none aside.
        key = self._usable_key() if rows else None
        if key is None:
            return 0
        signed = 0
        for row in rows:
            try:  # decoding the record and its canonical form (a NaN in it): the visit's own data
                body = self._settled_body(row)
                if body is not None:
                    self._chain(row["id"], body, now.time, key)
                    signed += 1
            except BUNDLE_ERRORS as exc:
                self._set_aside(row["id"], exc)
        return signed

    def _settled_body(self, row: dict) -> dict | None:
        """The record to sign of a closed visit whose times are settled (flagged if lost), or None
        while they can still be repaired."""
        flags = set(json.loads(row["flags"]))
        for stamp_col, at_col, flag in (
            ("start_stamp", "started_at", START_TIME_LOST),
            ("end_stamp", "ended_at", END_TIME_LOST),
        ):
            if row[at_col] is None:
                if Stamp.from_json(json.loads(row[stamp_col])).boot_id == self.clock.boot_id:
                    return None  # still repairable in this boot (cannot happen once the clock has a time)
                flags.add(flag)
        if flags != set(json.loads(row["flags"])):
            self.db.table("visits").update(row["id"], {"flags": json.dumps(sorted(flags))})
        return self.record_body(row["id"])

    # --- visits ----------------------------------------------------------------------------------
    def _visit(self, row: dict, *, lenient: bool = False, released: ReleasedReadings | None = None) -> Visit:
        """A visit from its row. `lenient`: a row damaged on the SD card gives what can be read
        of it and why it cannot be sent (a list must show it with the others), not an error.
        `released`: its released readings, when a list asked them for all its visits at once."""
        fault = row["fhir_fault"]
        try:
            decoded: dict = decode_row(row)
        except BUNDLE_ERRORS as exc:
            if not lenient:
                raise
            decoded = {
                "start": Stamp(None, TimeSource.UNKNOWN, 0.0, ""),
                "end": None,
                "start_fix": None,
                "end_fix": None,
                "row_damaged": True,
            }
            fault = fault or fault_text(exc)
        chain = list(self.db.query("SELECT seq FROM chain WHERE visit_id = ?", [row["id"]]))
        if released is None:
            released = released_readings(self.db.conn, [row["id"]], self.data_dir)[row["id"]]
        return Visit(
            id=row["id"],
            doctor_id=row["doctor_id"],
            patient_id=row["patient_id"],
            household_id=row["household_id"],
            setting=row["setting"],
            state=row["state"],
            distance_m=row["distance_m"],
            chain_seq=chain[0]["seq"] if chain else None,
            fhir_queued=bool(row["fhir_queued_at"]),
            fhir_fault=fault,
            readings_sent_alone=released.sent,
            readings_not_sent=released.not_sent,
            **decoded,
        )

    def get(self, visit_id: str) -> Visit | None:
        rows = list(self.db.query("SELECT * FROM visits WHERE id = ?", [visit_id]))
        return self._visit(rows[0]) if rows else None

    def open_visit(self) -> Visit | None:
        row = self._open_row()
        return self._visit(row) if row is not None else None

    def visits(self, limit: int | None = None) -> list[Visit]:
        """Newest first; a row damaged on the SD card is listed with what can be read of it (and
        why it cannot be sent), never hiding the others."""
        sql = "SELECT * FROM visits ORDER BY rowid DESC" + (f" LIMIT {int(limit)}" if limit else "")
        rows = list(self.db.query(sql))
        # the outbox asked once for the list, not once per visit (read-only opens on a Pi's SD card)
        released = released_readings(self.db.conn, [r["id"] for r in rows], self.data_dir)
        return [self._visit(r, lenient=True, released=released[r["id"]]) for r in rows]

    def _open_row(self) -> dict | None:
        rows = list(self.db.query("SELECT * FROM visits WHERE state = 'open'"))
        return rows[0] if rows else None

    def start(
        self,
        patient_id: str,
        *,
        doctor_id: str,
        household_id: str | None = None,
        fix: FixRecord | None = None,
        setting: str | None = None,
    ) -> Visit:
        if not patient_id.strip():
            raise VisitError("a visit needs a patient id")
        if not doctor_id.strip():
            raise VisitError("no doctor configured: set visits.doctor_id")
        visit_id = str(uuid.uuid4())  # minted at capture: the FHIR identifiers derive from it
        # Stamped and written under the write lock: the acquire service saves the boot's first
        # anchor either before (the stamp takes it) or after (and then repairs the stamp).
        with transaction(self.db):
            if self._open_row() is not None:
                self._require_open()  # a damaged one says so, and how to get past it
                raise VisitError("a visit is already open: stop it first (lastmile visit stop)")
            stamp = self._stamp_now()
            self.db.table("visits").insert(
                {
                    "id": visit_id,
                    "gateway_id": self.gateway_id,
                    "doctor_id": doctor_id,
                    "patient_id": patient_id,
                    "household_id": household_id,
                    "setting": setting or self.policy.setting,
                    "state": "open",
                    "start_stamp": json.dumps(stamp.to_json()),
                    "started_at": stamp.time.isoformat() if stamp.time else None,
                    "start_fix": fix.to_json() if fix else None,
                }
            )
        visit = self.get(visit_id)
        assert visit is not None
        log.info("visit %s started", visit_id)
        return visit

    def _require_open_row(self) -> dict:
        row = self._open_row()
        if row is None:
            raise VisitError("no visit is open (lastmile visit start --patient ID)")
        return row

    def _require_open(self) -> Visit:
        return self._open_visit(self._require_open_row())

    def _open_visit(self, row: dict) -> Visit:
        """The open visit; DamagedVisitError when its row cannot be read, or a repair pass set it
        aside (a note of it damaged, its row reading well): either way it can never be sent."""
        cause = open_row_damage(row)
        if cause is not None:
            raise DamagedVisitError(row["id"], row["patient_id"], cause) from (
                cause if isinstance(cause, Exception) else None
            )
        return self._visit(row)

    def _open_to_link(self) -> Visit | None:
        """The open visit a reading or an ECG may join; None when there is none, or when it is
        damaged (it can never be sent: the reading goes on its own, never lost with it)."""
        row = self._open_row()
        if row is None:
            return None
        try:
            return self._open_visit(row)
        except DamagedVisitError as damaged:
            if self.notices.first_damaged(row["id"]):  # said once per visit, not at each reading
                log.warning("%s; a reading of its patient is sent on its own", damaged)
            return None

    def note(self, text: str) -> None:
        if not text.strip():
            raise VisitError("empty note")
        with transaction(self.db):  # checked and written at once: never into a visit stopped meanwhile
            visit = self._require_open()
            self.db.table("visit_notes").insert(
                {"visit_id": visit.id, "stamp": json.dumps(self._stamp_now().to_json()), "text": text}
            )

    def visit_holding(self, item_key: str) -> str | None:
        """The visit a reading (by its outbox key) is linked to already (relay_link.visit_link)."""
        row = self.db.execute(VISIT_HOLDING_SQL, [item_key]).fetchone()
        return str(row[0]) if row is not None else None

    def attach_observation(
        self, obs: Observation, *, outbox_key: str | None = None, taken_during: bool = False
    ) -> str | None:
        """Link a reading to the open visit if it is of the visit's patient; returns the visit id.
        An unassigned reading is not linked (it is held for the doctor, never guessed).
        `taken_during`: link it only if it was measured after the visit began (a reading relayed
        later, or one a cuff kept in its memory from days before, is not the visit's).
        Checked and linked in one write transaction: `stop` closes and chains the visit in one
        too, so a reading is either in the signed visit or not linked at all."""
        if obs.patient_id is None:
            return None
        record = observation_to_json(obs)
        digest = hashlib.sha256(canonical(record)).hexdigest()
        with transaction(self.db):
            visit = self._open_to_link()
            if visit is None or obs.patient_id != visit.patient_id:
                return None
            if taken_during and visit.start.time is not None and obs.measured_at < visit.start.time:
                return None
            self.db.table("visit_items").insert(
                {
                    "visit_id": visit.id,
                    "kind": "observation",
                    "item_key": outbox_key or obs.record_key,
                    "record": json.dumps(record),
                    "sha256": digest,
                },
                ignore=True,
            )
        return visit.id

    def attach_ecg(self, outbox_key: str, patient_id: str | None, sha256: str = "") -> str | None:
        with transaction(self.db):  # as attach_observation: linked only to a visit still open
            visit = self._open_to_link()
            if visit is None or patient_id != visit.patient_id:
                return None
            self.db.table("visit_items").insert(
                {
                    "visit_id": visit.id,
                    "kind": "ecg",
                    "item_key": outbox_key,
                    "record": None,
                    "sha256": sha256 or hashlib.sha256(outbox_key.encode()).hexdigest(),
                },
                ignore=True,
            )
        return visit.id

    def track(self, visit_id: str) -> list[FixRecord]:
        return [
            FixRecord.from_json(r["fix"])  # type: ignore[misc]
            for r in self.db.query("SELECT fix FROM visit_track WHERE visit_id = ? ORDER BY id", [visit_id])
        ]

    def stop(self, fix: FixRecord | None = None) -> Visit:
        # One write transaction from the open check to the signature: a second stop, a note or a
        # track point from another process cannot slip between them.
        error: Exception | None = None
        cause: Exception | str = ""
        with transaction(self.db):
            row = self._require_open_row()
            try:
                visit = self._open_visit(row)
                flags = self._close(visit, fix)
            except DamagedVisitError as exc:  # its row, or set aside while open (a damaged note)
                error, cause = exc, exc.cause
            except BUNDLE_ERRORS as exc:  # a note or a track point of it
                error, cause = exc, exc
            if error is not None:
                self._close_damaged(row["id"], cause)
        if error is not None:
            raise DamagedVisitError(row["id"], row["patient_id"], cause, closed=True) from error
        closed = self.get(visit.id)
        assert closed is not None
        log.info("visit %s stopped; flags: %s", visit.id, ", ".join(flags) or "none")
        return closed

    def _close_damaged(self, visit_id: str, cause: Exception | str) -> None:
        """(In a write transaction.) An open visit that cannot be read is closed, with when it was
        stopped, and set aside for good: the one-open-visit rule must not keep the doctor from the
        next visit, and its row is kept as it is (evidence). It was never checked, and the doctor
        is told to record it again: marked STOPPED_DAMAGED (over any fault set while it was open),
        so neither `visit retry` nor an update sends it."""
        end = self._stamp_now()
        fault = STOPPED_DAMAGED + fault_text(cause)
        self.db.execute(
            "UPDATE visits SET state = 'closed', end_stamp = ?, ended_at = ?, fhir_fault = ?, fhir_fault_version = ? "
            "WHERE id = ?",
            [
                json.dumps(end.to_json()),
                end.time.isoformat() if end.time else None,
                fault,
                fault_generation(),
                visit_id,
            ],
        )
        log.error("home visit %s is damaged and was closed aside; it is to be recorded again: %s", visit_id, fault)

    def _close(self, visit: Visit, fix: FixRecord | None) -> list[str]:
        """(In a write transaction.) Close the open visit, check it, sign it if its times are settled."""
        end = self._stamp_now()
        if visit.start.provisional:
            visit.start = self.clock.repair(visit.start)
        gps = self.clock.anchor
        if gps is not None and gps.source == TimeSource.GPS and gps.boot_id == visit.start.boot_id:
            # GPS came during the visit (or before): its offset wins over a system clock that may
            # have been wrong at the start (fake-hwclock, drift); the end follows from the start.
            visit.start = _on_anchor(visit.start, gps.offset)
        if visit.start.time is not None and not end.provisional and visit.start.boot_id == end.boot_id:
            # Duration by the monotonic clock: a clock jump during the visit changes nothing.
            end = Stamp(
                visit.start.time + dt.timedelta(seconds=end.monotonic - visit.start.monotonic),
                visit.start.source if visit.start.source != TimeSource.UNKNOWN else end.source,
                end.monotonic,
                end.boot_id,
            )
        household = self.register.get(visit.household_id) if visit.household_id else None
        flags, distance = check_visit(
            self.policy,
            household_id=visit.household_id,
            household=household,
            start=visit.start,
            end=end,
            start_fix=visit.start_fix,
            end_fix=fix,
            track=self.track(visit.id),
            clock_disagreement_s=self.clock.last_disagreement_s,
        )
        if gps is not None and gps.source == TimeSource.GPS:
            self._notes_on_gps(visit.id, gps.offset, gps.boot_id)
        self.db.table("visits").update(
            visit.id,
            {
                "state": "closed",
                "end_stamp": json.dumps(end.to_json()),
                "ended_at": end.time.isoformat() if end.time else None,
                "start_stamp": json.dumps(visit.start.to_json()),
                "started_at": visit.start.time.isoformat() if visit.start.time else None,
                "end_fix": fix.to_json() if fix else None,
                "flags": json.dumps(flags),
                "distance_m": distance,
                "household_lat": household.latitude if household else None,
                "household_lon": household.longitude if household else None,
            },
        )
        # Signed now if its times are known, else once GPS or NTP gives them (see _sign_settled).
        self._sign_settled()
        return flags

    def _notes_on_gps(self, visit_id: str, offset: float, boot_id: str) -> None:
        """(In a write transaction, before signing.) The visit's notes of this boot on GPS time too."""
        for row in list(self.db.query("SELECT id, stamp FROM visit_notes WHERE visit_id = ?", [visit_id])):
            stamp = Stamp.from_json(json.loads(row["stamp"]))
            if stamp.boot_id == boot_id and stamp.source != TimeSource.GPS:
                fixed = _on_anchor(stamp, offset)
                self.db.table("visit_notes").update(row["id"], {"stamp": json.dumps(fixed.to_json())})

    # --- chain -----------------------------------------------------------------------------------
    def record_body(self, visit_id: str) -> dict:
        """The canonical content of a visit as hashed: re-derived from the tables every time."""
        row = next(iter(self.db.query("SELECT * FROM visits WHERE id = ?", [visit_id])))

        def fix(text: str | None) -> dict | None:
            r = FixRecord.from_json(text)
            if r is None:
                return None
            f = r.fix
            return {
                "lat": _r(f.latitude, 7),
                "lon": _r(f.longitude, 7),
                "alt": _r(f.altitude_m, 1),
                "eph": _r(f.eph_m, 1),
                "mode": int(f.mode),
                "time": _iso(f.time),
                "sats": f.satellites_used,
            }

        start, end = json.loads(row["start_stamp"]), json.loads(row["end_stamp"]) if row["end_stamp"] else {}
        track = [
            r["fix"] for r in self.db.query("SELECT fix FROM visit_track WHERE visit_id = ? ORDER BY id", [visit_id])
        ]
        notes = [
            {"at": json.loads(r["stamp"]).get("time"), "text": r["text"]}
            for r in self.db.query("SELECT stamp, text FROM visit_notes WHERE visit_id = ? ORDER BY id", [visit_id])
        ]
        items = [
            {"kind": r["kind"], "key": r["item_key"], "sha256": r["sha256"]}
            for r in self.db.query(
                "SELECT kind, item_key, sha256 FROM visit_items WHERE visit_id = ? ORDER BY id", [visit_id]
            )
        ]
        return {
            "visit_id": row["id"],
            "gateway_id": row["gateway_id"],
            "doctor_id": row["doctor_id"],
            "patient_id": row["patient_id"],
            "household_id": row["household_id"],
            "setting": row["setting"],
            "started_at": row["started_at"],
            "start_source": start.get("source"),
            "ended_at": row["ended_at"],
            "end_source": end.get("source"),
            "start_fix": fix(row["start_fix"]),
            "end_fix": fix(row["end_fix"]),
            "household": None
            if row["household_lat"] is None
            else {"lat": _r(row["household_lat"], 7), "lon": _r(row["household_lon"], 7)},
            "distance_m": _r(row["distance_m"], 1),
            "flags": json.loads(row["flags"]),
            "notes": notes,
            "items": items,
            "track": {"points": len(track), "sha256": hashlib.sha256("\n".join(track).encode()).hexdigest()},
        }

    def _chain(self, visit_id: str, body: dict, signed_at: dt.datetime, key: Ed25519PrivateKey) -> ChainLink:
        last = list(self.db.query("SELECT seq, hash FROM chain ORDER BY seq DESC LIMIT 1"))
        seq, prev = (last[0]["seq"] + 1, last[0]["hash"]) if last else (1, GENESIS)
        _, chain_link = link(body, seq, prev, key)
        self.db.table("chain").insert(
            {
                "seq": seq,
                "visit_id": visit_id,
                "prev_hash": prev,
                "hash": chain_link.hash,
                "signature": chain_link.signature,
                "signed_at": signed_at.isoformat(),
            }
        )
        return chain_link

    def chain_entries(self) -> list[tuple[dict, ChainLink]]:
        out = []
        for row in self.db.query("SELECT * FROM chain ORDER BY seq"):
            record = dict(self.record_body(row["visit_id"]), seq=row["seq"], prev_hash=row["prev_hash"])
            out.append((record, ChainLink(row["seq"], row["prev_hash"], row["hash"], row["signature"])))
        return out

    def export_chain(self, path: str | Path) -> int:
        entries = self.chain_entries()
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for line in export_lines(self.gateway_id, public_key_b64(self.signing_key), entries):
                f.write(line + "\n")
        tmp.replace(path)
        return len(entries)

    def verify_local(self) -> VerifyReport:
        return verify_lines(export_lines(self.gateway_id, public_key_b64(self.signing_key), self.chain_entries()))

    # --- FHIR --------------------------------------------------------------------------------------
    def observations(self, visit_id: str) -> list[Observation]:
        """The readings the visit's bundle carries: not those released to go on their own (a
        visit set aside, then retried), which the platform must not get twice."""
        return [
            observation_from_json(json.loads(r["record"]))
            for r in self.db.query(
                "SELECT record FROM visit_items WHERE visit_id = ? AND kind = 'observation' AND released_at IS NULL "
                "ORDER BY id",
                [visit_id],
            )
        ]

    def fhir_bundle(self, visit_id: str, naming: FhirNaming) -> dict:
        return self._bundle(self._stored_for_bundle(visit_id), naming, self.signing_key)

    def _stored_for_bundle(self, visit_id: str) -> StoredVisit:
        """A closed, signed visit decoded from its tables (what a damaged record fails)."""
        from uploader.fhir_bundle import VisitNote, VisitPosition, VisitSummary

        visit = self.get(visit_id)
        chains = list(self.db.query("SELECT * FROM chain WHERE visit_id = ?", [visit_id]))
        if visit is None or visit.state != "closed" or visit.end is None or not chains:
            raise VisitError(f"visit {visit_id} is not closed and signed (with settled times) yet")
        fixes = [r for r in (visit.start_fix, visit.end_fix) if r is not None and r.fix.has_position]
        best = min(fixes, key=lambda r: r.fix.eph_m if r.fix.eph_m is not None else float("inf"), default=None)
        position = None
        if best is not None:
            f = best.fix
            position = VisitPosition(f.latitude, f.longitude, f.altitude_m, f.eph_m, f.time, int(f.mode))  # type: ignore[arg-type]
        chain = chains[0]
        signed_at = dt.datetime.fromisoformat(chain["signed_at"])
        summary = VisitSummary(
            visit_id=visit.id,
            doctor_id=visit.doctor_id,
            patient_id=visit.patient_id,
            started_at=visit.start.time,
            ended_at=visit.end.time,
            finished=True,  # closed by the doctor, even when its end time was lost
            # a lost start says nothing of the end's source
            time_source=visit.start.source if visit.start.time is not None else visit.end.source,
            setting=visit.setting,
            household_id=visit.household_id,
            position=position,
            flags=tuple(visit.flags),
            notes=tuple(
                VisitNote(r["text"], Stamp.from_json(json.loads(r["stamp"])).time)
                for r in self.db.query("SELECT stamp, text FROM visit_notes WHERE visit_id = ? ORDER BY id", [visit_id])
            ),
        )
        return StoredVisit(summary, self.observations(visit_id), chain, signed_at)

    @staticmethod
    def _bundle(stored: StoredVisit, naming: FhirNaming, key: Ed25519PrivateKey) -> dict:
        from uploader.fhir_bundle import VisitSignature, visit_bundle

        chain = stored.chain
        signature = VisitSignature(
            chain["seq"], chain["hash"], chain["prev_hash"], chain["signature"], public_key_b64(key), stored.signed_at
        )
        return visit_bundle(stored.summary, stored.observations, naming, signature)

    def closed_unqueued(self) -> frozenset[str]:
        """The closed visits not queued yet, and those stopped damaged whose readings wait to go on
        their own (as relay_link.closed_unqueued reads them)."""
        sql = f"{CLOSED_UNQUEUED_SQL} UNION {readings_to_release_sql()}"
        rows = self.db.execute(sql, [fault_generation()]).fetchall()
        return frozenset(str(row[0]) for row in rows)

    def release_unsent(self, outbox: Outbox, naming: FhirNaming, now: float | None = None) -> int:
        """The readings linked to visits never to be sent as they are (stopped damaged, or set
        aside until a repair that may never come): each goes on its own bundle, as outside any
        visit. Exactly once: queued in the outbox first, under its reading's key (a release cut
        short before the mark queues nothing twice), then marked released; a visit retried later
        carries only the readings not released. Returns how many were queued."""
        from uploader.fhir_forwarder import enqueue_observation

        rows = self._unreleased_readings(f"visit_id IN ({readings_to_release_sql()})")
        queued = 0
        for row, reading in self._decoded_or_quarantined(outbox, rows, naming, now):
            queued += enqueue_observation(outbox, reading, naming, meta={"visit_item": row["id"]}, now=now)
            self._mark_released([row["id"]])
        if queued:
            log.info("%d reading(s) of home visits not sent queued for the county platform on their own", queued)
        return queued

    def _unreleased_readings(self, where_sql: str, params: Sequence[str] = ()) -> list[dict]:
        """The readings linked to visits (`where_sql` on visit_items joined with visits) not released yet."""
        return list(
            self.db.query(
                "SELECT visit_items.id, visit_id, record, patient_id FROM visit_items JOIN visits "
                f"ON visits.id = visit_id WHERE kind = 'observation' AND released_at IS NULL AND {where_sql} "
                "ORDER BY visit_items.id",
                list(params),
            )
        )

    def _decoded_or_quarantined(
        self, outbox: Outbox, rows: Sequence[dict], naming: FhirNaming, now: float | None
    ) -> list[tuple[dict, Observation]]:
        """Each row with its reading; one that can never go (its record damaged, or not one FHIR
        can say) is quarantined on its own instead - the doctor sees it - and marked released."""
        sound: list[tuple[dict, Observation]] = []
        never: list[int] = []
        for row in rows:
            reading = self._sendable_reading(outbox, row, naming, now)
            if reading is None:
                never.append(row["id"])
            else:
                sound.append((row, reading))
        if never:
            self._mark_released(never)
        return sound

    @classmethod
    def _sendable_reading(cls, outbox: Outbox, row: dict, naming: FhirNaming, now: float | None) -> Observation | None:
        """A visit item's reading, checked as its own bundle is built (what the visit's bundle
        builds of it too); or None, quarantined on its own, if it can never go: its record damaged
        on the SD card, or one that decodes but cannot be said in FHIR."""
        from uploader.fhir_bundle import observation_bundle

        obs: Observation | None = None
        try:
            obs = stored_reading(row["record"])
            observation_bundle(obs, naming)
        except BUNDLE_ERRORS as exc:
            cls._quarantine_reading(outbox, row, exc, decoded=obs is not None, now=now)
            return None
        return obs

    @staticmethod
    def _quarantine_reading(outbox: Outbox, row: dict, exc: Exception, *, decoded: bool, now: float | None) -> None:
        """A visit's reading that can never go as stored (`exc`; `decoded`: its record decodes but
        cannot be said in FHIR): not silent - a quarantined reading in the outbox, with why
        (`lastmile queue`, the doctor's queue line) and, for a damaged record, the other way out:
        a record restored in visits.db from a backup is what a retry sends (the relay reads
        visits.db, observation_relay._reading). Its key is the visit item's: a release cut short
        before the mark adds nothing twice."""
        from lastmile.clinic.observations import OBSERVATION_KIND

        added = outbox.add(
            OBSERVATION_KIND,
            quarantined_reading_key(row["visit_id"], row["id"]),
            (row["record"] or "").encode(),
            meta={"visit_item": row["id"], "visit_id": row["visit_id"]},
            patient={"patient_id": row["patient_id"]},
            now=now,
        )
        if added.created:
            reason = quarantined_reading_reason(row["visit_id"], added.item.id, exc, decoded=decoded)
            outbox.quarantine(added.item.id, reason, time.time() if now is None else now)
            # the visit's id is in the reason (`lastmile queue`): the journal says the visit once
            log.error("a reading of a home visit cannot be sent: quarantined as #%d", added.item.id)

    def _mark_released(self, item_ids: Sequence[int]) -> None:
        with transaction(self.db):
            self.db.conn.executemany(
                "UPDATE visit_items SET released_at = ? WHERE id = ?",
                [[dt.datetime.now(dt.timezone.utc).isoformat(), i] for i in item_ids],
            )

    def _finish_releases(self, outbox: Outbox, naming: FhirNaming, visit_id: str, now: float | None) -> None:
        """Before a visit's bundle is built: its readings already queued on their own by a release
        whose mark was lost (cut short, then the visit retried) are marked now, so the bundle does
        not carry them a second time. The outbox is the truth: its key is the reading's. A reading
        that can never go (its record damaged, or not one FHIR can say) is quarantined on its own
        (as a release does), and the visit goes without it: one such reading must not keep the
        whole visit from the county."""
        from uploader.fhir_bundle import observation_key

        rows = self._unreleased_readings("visit_id = ?", [visit_id])
        keys = {
            observation_key(reading, naming): row["id"]
            for row, reading in self._decoded_or_quarantined(outbox, rows, naming, now)
        }
        if keys:
            self._mark_released([keys[k] for k in outbox.present_keys(list(keys))])

    def queue_closed(self, outbox: Outbox, naming: FhirNaming, now: float | None = None) -> int:
        """Queue every closed, not yet queued visit as a FHIR bundle (idempotent)."""
        with transaction(self.db):
            self._sign_settled()  # visits stopped in an earlier boot that never had a time
        queued = self._queue_signed(outbox, naming, now)
        self.release_unsent(outbox, naming, now)  # after: a visit set aside now lets its readings go now
        return queued

    def _queue_signed(self, outbox: Outbox, naming: FhirNaming, now: float | None) -> int:
        from uploader.fhir_bundle import visit_bundle_key
        from uploader.fhir_forwarder import enqueue_bundle

        queued = 0
        # Only once signed, and so with its times settled: the platform keeps the first version it
        # gets (conditional create), so a visit sent before its end was known would stay
        # "in-progress" there for ever. A time lost to a reboot is never repaired: such a visit
        # goes without it (flagged). Records signed before times were settled (older versions)
        # and still without them are not sent. One that can never be a bundle is set aside (with
        # why), once: it must not keep the visits closed after it from the county.
        rows = list(
            self.db.query(
                "SELECT id, patient_id FROM visits WHERE state = 'closed' AND fhir_queued_at IS NULL "
                "AND fhir_fault IS NULL "
                "AND id IN (SELECT visit_id FROM chain) "
                "AND (ended_at IS NOT NULL OR EXISTS (SELECT 1 FROM json_each(visits.flags) WHERE value = ?)) "
                "AND (started_at IS NOT NULL OR EXISTS (SELECT 1 FROM json_each(visits.flags) WHERE value = ?)) "
                "ORDER BY rowid",
                [END_TIME_LOST, START_TIME_LOST],
            )
        )
        # As for signing: the key (its public half goes in each bundle) before any visit is tried.
        key = self._usable_key() if rows else None
        if key is None:
            return 0
        for row in rows:
            self._finish_releases(outbox, naming, row["id"], now)
            try:  # decoding the record and building its bundle: both fail on the visit's own data
                bundle = self._bundle(self._stored_for_bundle(row["id"]), naming, key)
            except BUNDLE_ERRORS as exc:
                with transaction(self.db):
                    self._set_aside(row["id"], exc)
                continue
            enqueue_bundle(
                outbox,
                bundle,
                visit_bundle_key(row["id"]),
                patient_id=row["patient_id"],
                meta={"visit_id": row["id"], "type": "visit"},
                now=now,
            )
            self.db.table("visits").update(row["id"], {"fhir_queued_at": dt.datetime.now(dt.timezone.utc).isoformat()})
            queued += 1
        return queued


def record_observation(
    book: VisitBook,
    outbox: Outbox,
    naming: FhirNaming,
    obs: Observation,
    *,
    outbox_key: str | None = None,
    now: float | None = None,
) -> str:
    """Where a reading goes: "visit" (linked to the open visit of its patient, sent with it),
    "queued" (a known patient outside any visit: its own FHIR bundle), or "held" (unassigned)."""
    from uploader.fhir_forwarder import enqueue_observation

    if book.attach_observation(obs, outbox_key=outbox_key):
        return "visit"
    if obs.patient_id is None:
        return "held"
    enqueue_observation(outbox, obs, naming, now=now)
    return "queued"


def follow_receiver(book: VisitBook, source: FixSource, should_stop: Callable[[], bool], chunk_s: float = 1.0) -> int:
    """Service loop: every fix anchors the clock and extends the open visit's track. Returns the
    number of fixes seen when `should_stop()` says so or the source ends."""
    seen = 0
    while not should_stop():
        got = 0
        for fix in source.fixes(time.monotonic() + chunk_s):
            book.observe_fix(fix)
            got += 1
            if should_stop():
                break
        seen += got
        if got == 0 and should_stop():
            break
    return seen
