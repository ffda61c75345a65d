"""How every Lastmile SQLite database is opened: the project's pragmas, named migrations.

One way for all three databases (the outbox here, `clinic.db` and `visits.db` in lastmile/):
`open_database(path, migrations)` connects in autocommit mode with explicit transactions
(`transaction(db)`), WAL, a busy timeout, FULL sync (a returned write survives a power cut),
secure delete (deleted patient data is zeroed), mode 0600.

A `migrations` table records the names applied. `migrate()` is idempotent: on every open it
applies only what is missing, and two processes opening the same database at once do not both
apply a migration (the check and the change happen inside one `BEGIN IMMEDIATE` transaction).
Migrations are append-only: never edit or reorder a released one, add a new one.
`MIGRATIONS` here is the outbox's schema.

A service's stop bounds its writes' wait for another process's write lock, one way for every
database: `StopWaits(stop)` given to a database (`give_up_waits_on(db, waits)`, the outbox's
`Outbox.give_up_waits_on`) makes its writes take the lock with `begin_immediate(conn, waits)`:
once the stop is set they wait at most STOP_WAIT_S more, then fail `WaitGivenUp` ("database is
locked"), a stop and not a fault (`gave_up_at_stop`). A write nothing can redo after the restart
says so (`transaction(db, wait_past_stop=True)`): it waits the full busy timeout, stop or not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 15_000
# Durable commits (a returned write survives a power cut), zeroed deleted content.
BASE_PRAGMAS = (f"busy_timeout={BUSY_TIMEOUT_MS}", "synchronous=FULL", "secure_delete=ON", "foreign_keys=ON")
# Once a service's stop is set (`StopWaits`), a write waits at most this much more for another
# process's write lock: a write waiting out the 15 s busy timeout held SIGTERM 12-15 s, and several
# in a row (a reading's row writes in clinic.db) ~60 s, past systemd's TimeoutStopSec. A short write
# of another process is still waited for; a lock held longer is the next start's.
STOP_WAIT_S = 1.0
# how often a write waiting for the lock looks at the stop (SQLite's busy wait cannot be
# interrupted: sqlite3 Connection.interrupt does not end it, no progress handler runs in it)
LOCK_POLL_MS = 100


class WaitGivenUp(sqlite3.OperationalError):
    """ "database is locked", from a write that gave up waiting for another process's write lock
    because the service is stopping (`StopWaits`): a stop, not a fault. Callers that catch the
    lock's failure catch this one too."""


def gave_up_at_stop(exc: BaseException) -> bool:
    """Whether `exc`, or what it was raised from, is a write the stop gave up (`WaitGivenUp`)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, WaitGivenUp):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


class StopWaits:
    """A service's stop as its databases' writes see it. Once `stop` is set (from any thread: the
    runtime's SIGTERM), a write waiting for another process's write lock waits at most STOP_WAIT_S
    more, counted from the first write that saw the stop: one StopWaits given to all of a service's
    databases (its outbox and clinic.db) ends a stop with writes waiting on both within about a
    second, not a second per write."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._seen_at: float | None = None  # monotonic time a waiting write first saw the stop
        self._lock = threading.Lock()

    def deadline(self, deadline: float) -> float:
        """`deadline`, or STOP_WAIT_S after the stop was first seen if that is sooner."""
        if not self.stop.is_set():
            return deadline
        with self._lock:
            if self._seen_at is None:
                self._seen_at = time.monotonic()
                log.info("stopping: writes wait at most %g s more for another process's write lock", STOP_WAIT_S)
            return min(deadline, self._seen_at + STOP_WAIT_S)


def begin_immediate(conn: sqlite3.Connection, waits: StopWaits | None, *, wait_ms: int = BUSY_TIMEOUT_MS) -> None:
    """BEGIN IMMEDIATE on `conn` (whose busy timeout is `wait_ms`), waiting for another process's
    write lock up to `wait_ms`, or with `waits` in LOCK_POLL_MS turns that end STOP_WAIT_S after
    the stop: WaitGivenUp then."""
    if waits is None:
        conn.execute("BEGIN IMMEDIATE")
        return
    deadline = time.monotonic() + wait_ms / 1000
    conn.execute(f"PRAGMA busy_timeout={min(LOCK_POLL_MS, wait_ms)}")
    try:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                now = time.monotonic()
                if "locked" not in str(exc) or now >= deadline:
                    raise
                if now >= waits.deadline(deadline):
                    raise WaitGivenUp(str(exc)) from exc
    finally:
        conn.execute(f"PRAGMA busy_timeout={wait_ms}")


# the StopWaits each database's `transaction` takes its write lock with (`give_up_waits_on`); a
# database closed and forgotten leaves by itself
_stop_waits: weakref.WeakKeyDictionary[sqlite_utils.Database, StopWaits] = weakref.WeakKeyDictionary()


def give_up_waits_on(db: sqlite_utils.Database, waits: StopWaits) -> None:
    """`transaction(db)` from now on waits for another process's write lock as `waits` says: at
    most STOP_WAIT_S more once the service's stop is set (WaitGivenUp after). What the write meant
    is the caller's to keep (the serial spill file, a row redone at the next start)."""
    _stop_waits[db] = waits


@dataclass(frozen=True)
class Migration:
    name: str
    apply: Callable[[sqlite_utils.Database], None]

    @classmethod
    def sql(cls, name: str, script: str) -> Migration:
        """A migration written as SQL statements (run one by one inside the migration's
        transaction: `executescript` would commit half-way)."""
        statements = _split_sql(script)

        def apply(db: sqlite_utils.Database) -> None:
            for statement in statements:
                db.conn.execute(statement)

        return cls(name, apply)


def _split_sql(script: str) -> list[str]:
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:60]}")
    return statements


def _items(db: sqlite_utils.Database) -> None:
    db.table("items").create(
        {
            "id": int,
            "kind": str,
            "key": str,  # idempotency key, UNIQUE
            "priority": int,  # Priority: 0 STAT before 1 ROUTINE
            "state": str,  # ItemState value
            "attempts": int,
            "next_attempt_at": float,
            "last_error": str,
            "created_at": float,
            "updated_at": float,
            "sent_at": float,
            "committed_at": float,
            "transaction_uid": str,  # storage commitment transaction
            "sha256": str,
            "size": int,
            "meta": str,  # JSON, non-patient routing data; NULL once purged
            "patient": str,  # JSON, patient-identifying; NULL once purged
            "quarantine_reason": str,
            "quarantined_at": float,
            "payload_file": str,  # name under payloads/, NULL when the payload is in `payloads`
            "claimed_by": str,  # owner token of the Outbox that moved it to `sending`
        },
        pk="id",
        not_null=[
            "kind",
            "key",
            "priority",
            "state",
            "attempts",
            "next_attempt_at",
            "created_at",
            "updated_at",
            "sha256",
            "size",
        ],
        defaults={"attempts": 0},
    )
    db.table("items").create_index(["key"], index_name="items_key", unique=True)
    # claim(): queued & due of one kind, STAT first, then oldest
    db.table("items").create_index(["state", "kind", "priority", "created_at"], index_name="items_claim")


def _payloads(db: sqlite_utils.Database) -> None:
    # Separate table so scans of `items` never touch payload pages.
    db.table("payloads").create(
        {"item_id": int, "data": bytes}, pk="item_id", not_null=["data"], foreign_keys=[("item_id", "items", "id")]
    )


def _status(db: sqlite_utils.Database) -> None:
    db.table("status").create(
        {"name": str, "value": str, "updated_at": float}, pk="name", not_null=["value", "updated_at"]
    )


# Send tracking: `in_flight` = 1 from the moment an item's bytes start to go out until its outcome
# is recorded; a process killed meanwhile leaves it at 1, and recovery counts the send in
# `interrupted_sends`. `commitment_requests`: every storage commitment transaction asked for an
# item (the latest few), so only a report naming one of ours, for items in it, is believed.
_SEND_TRACKING = """
ALTER TABLE items ADD COLUMN in_flight INTEGER NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN interrupted_sends INTEGER NOT NULL DEFAULT 0;
CREATE TABLE commitment_requests (
    transaction_uid TEXT NOT NULL,
    item_id INTEGER NOT NULL REFERENCES items (id),
    asked_at FLOAT NOT NULL,
    PRIMARY KEY (transaction_uid, item_id)
) WITHOUT ROWID;
CREATE INDEX commitment_requests_item ON commitment_requests (item_id);
INSERT INTO commitment_requests (transaction_uid, item_id, asked_at)
    SELECT transaction_uid, id, updated_at FROM items WHERE state = 'sent' AND transaction_uid IS NOT NULL;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001_items", _items),
    Migration("0002_payloads", _payloads),
    Migration("0003_status", _status),
    # a queued item may be held back (not claimable) until a time, for a reason: an ECG waiting
    # for the doctor to assign its patient, later one waiting to be re-recorded
    Migration.sql(
        "0004_holds",
        "ALTER TABLE items ADD COLUMN hold_until REAL;\nALTER TABLE items ADD COLUMN hold_reason TEXT;",
    ),
    Migration.sql("0005_send_tracking", _SEND_TRACKING),
    # storage commitment failures since the last send that was committed (or an operator's retry):
    # a PACS that keeps failing an instance is not sent the same study for ever
    Migration.sql(
        "0006_commitment_failures", "ALTER TABLE items ADD COLUMN commitment_failures INTEGER NOT NULL DEFAULT 0;"
    ),
    # when an item's last send failed: with the link (then a metered link holds it again once the
    # link works) or alone, the peer refusing it while it took others (then it is stuck, not held)
    Migration.sql("0007_failed_at", "ALTER TABLE items ADD COLUMN failed_at REAL;"),
    # the latest ECGs, purged ones too (the Sent page): without it a backward walk of every row
    # since the 50th newest ECG (purged readings stay: hundreds of thousands). Partial: only ECG
    # rows, ~12 bytes each on the SD card (items (kind, id) would be 4.5 MB at 200k rows, written
    # on every reading, and taken by the readings' own queries); used by a query naming the kind
    # as this literal, not as a parameter (Outbox.latest_ecgs)
    Migration.sql("0008_ecgs_index", "CREATE INDEX items_ecgs ON items (id) WHERE kind = 'dicom';"),
)


def open_database(
    db_path: Path, migrations: tuple[Migration, ...], *, pragmas: Sequence[str] = ()
) -> sqlite_utils.Database:
    """Connect to `db_path` (mode 0600) in autocommit mode with explicit transactions, shareable
    between threads under the caller's lock and between processes (WAL, busy_timeout), and
    bring its schema up to date. Rows come back as sqlite3.Row."""
    create_private(db_path)
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        for pragma in (*BASE_PRAGMAS, *pragmas):
            conn.execute(f"PRAGMA {pragma}")
        # No sqlite-utils plugins: whatever a package installs must not change our databases'
        # connections, and looking for them reads every installed package's metadata
        # (importlib.metadata, ~0.6 MB of RSS in each service; bench/soak.py).
        db = sqlite_utils.Database(conn, execute_plugins=False)
        enable_wal(conn)
        migrate(db, migrations)
    except BaseException:
        conn.close()
        raise
    return db


def enable_wal(conn: sqlite3.Connection) -> None:
    """Switch a database to WAL, as the first of several processes opening a new one at once.
    The switch needs the exclusive lock, and SQLite answers "database is locked" at once instead
    of waiting when another connection's lock makes waiting a possible deadlock (seen 1 in 40 with
    three services starting on a new data directory): so it is tried again, within the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode != "wal":
                mode = str(conn.execute("PRAGMA journal_mode=wal").fetchone()[0]).lower()
            if mode == "wal":
                return
            problem = f"the journal mode stayed {mode!r}"
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            problem = str(exc)
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError(f"cannot switch the database to WAL: {problem}")
        time.sleep(0.05)


def create_private(db_path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (SQLite would make it 0644 minus
    the umask, and its -wal/-shm files copy the database file's mode); an existing file with
    group/other bits loses them. Nothing is written when the file is already private."""
    try:
        fd = os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        st = os.stat(db_path)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.chmod(db_path, 0o600)
        return
    os.close(fd)


def applied_migrations(db: sqlite_utils.Database) -> list[str]:
    if "migrations" not in db.table_names():
        return []
    return [r[0] for r in db.execute("SELECT name FROM migrations ORDER BY rowid")]


def migrate(db: sqlite_utils.Database, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded; return the names applied now.

    The connection must be in autocommit mode (isolation_level=None): transactions are explicit.
    """
    conn: sqlite3.Connection = db.conn
    already = set(applied_migrations(db))
    unknown = sorted(already - {m.name for m in migrations})
    if unknown:
        log.warning(
            "database has migrations this version does not know: %s (written by a newer lastmile?)", ", ".join(unknown)
        )
    if all(m.name in already for m in migrations):
        return []  # the usual open: no write lock taken at all

    def create_table() -> None:
        db.table("migrations").create(
            {"name": str, "applied_at": float}, pk="name", not_null=["applied_at"], if_not_exists=True
        )

    _in_transaction(conn, create_table)
    applied_now: list[str] = []
    for migration in (m for m in migrations if m.name not in already):

        def step(m: Migration = migration) -> None:
            if conn.execute("SELECT 1 FROM migrations WHERE name = ?", (m.name,)).fetchone():
                return  # already there (possibly applied by another process a moment ago)
            m.apply(db)
            conn.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (m.name, time.time()))
            applied_now.append(m.name)

        _in_transaction(conn, step)
    if applied_now:
        where = conn.execute("PRAGMA database_list").fetchone()[2]
        log.info("schema migrations applied to %s: %s", where, ", ".join(applied_now))
    return applied_now


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database, *, wait_past_stop: bool = False) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE: the write lock is taken at once, so two processes
    never both read-then-write); rolled back on any exception. With `give_up_waits_on(db, ...)`,
    the wait for another process's lock ends at a stop (`begin_immediate`: WaitGivenUp), unless
    `wait_past_stop`: this write waits the full busy timeout as before the stop (one the next
    start cannot redo: a scanned patient card)."""
    conn: sqlite3.Connection = db.conn
    begin_immediate(conn, None if wait_past_stop else _stop_waits.get(db))
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _in_transaction(conn: sqlite3.Connection, body: Callable[[], None]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        body()
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
