"""The durable store-and-forward outbox: SQLite (WAL) through sqlite-utils, payloads on disk.

Life of an item::

    queued --claim--> sending --mark_sent--> sent --mark_committed--> committed --purge_due--> purged
      ^                 |  |                  |
      |   transient /   |  |                  +--requeue (commitment failed)--> queued
      +---release-------+  +--quarantine--> quarantined --retry--> queued

Holds: a queued item may carry `hold_until` (epoch seconds) and `hold_reason`; `claim` never
takes it before that time, so the forwarder cannot send it. An ECG with no patient is added held
("unassigned") for the doctor to assign; `replace_held_payload` swaps its payload (the object
rebuilt under the same UIDs) only while it is queued and was never attempted, and releases it;
when the hold runs out it goes as it is. The quality gate's "re-record" hold uses the same columns.

Design (see also `outbox_migrations.py` and `payload_files.py`):

- One database `outbox.sqlite` in the data directory, WAL, synchronous=FULL (an `add` that
  returned survives a power cut: a device may delete its copy once we said "stored"; only the
  per-object send bookkeeping, `begin_send` and `mark_sent`, commits without an fsync: a power
  cut may undo it, which costs a counter or a resend under the same UIDs, never an object; and
  `claim`/`release`, which recovery at open redoes),
  busy_timeout so the acquire and forward processes share it, secure_delete=ON so purged
  patient data is zeroed in the file. Every write is one `BEGIN IMMEDIATE` transaction, so
  `claim` is atomic across threads and processes: two claimers never get the same item.
- Threads: one connection per Outbox, used under one lock (the forwarder's parallel
  associations spend their time on the network; each database call is short). Payload files
  are read and written outside that lock.
- Claims name their owner (a token whose flock is held while this Outbox is open). On open,
  `recover_interrupted` puts items whose owner is dead (SIGKILL, power cut) back to `queued`
  without charging an attempt; items a live process is sending are left alone, so
  `lastmile queue` never disturbs a running forwarder. `close()` releases its own claims; when
  another process holds the write lock it leaves a mark beside its lock instead
  (`OwnerLock.leave_claims`), and recovery gives those claims back as close would have: a stop
  is never charged as a send killed mid-way. An object the peer stored whose `mark_sent` failed
  (`remember_stored`) is noted in an fsynced file beside the owner's lock until it is recorded:
  close records it, or the next open's recovery does first (also after a kill or a power cut),
  so a stop never sends it a second time.
- Payload storage, chosen by measurement (bench/outbox_write.py on this machine: ext4 on virtio,
  300 adds per run, medians of 3; "process" = /proc/self/io write_bytes of the adding process
  including the final WAL checkpoint; "device" = the block device's own counter after sync,
  which adds the ext4 journal/inode/directory writes a new file costs)::

      payload  strategy      bytes written per payload byte   ms per add
                             process        device
      124 KB   file           1.14           1.35-1.6         1.3-2.0
      124 KB   in database    2.22           2.23             0.8-1.1
       32 KB   file           1.56           2.25             1.6
       32 KB   in database    2.83           2.87             0.45
        8 KB   file           3.19           6.15             1.7
        8 KB   in database    5.28           5.54             0.4
        1 KB   file          21.5           45.0              1.1-1.7
        1 KB   in database   25.2           28.1              0.35
      (reference: bare write+fsync of the payload to a new file: 1.00 / 1.07 at 124 KB)

  In the database a blob is written twice (WAL, then checkpoint); a file once, plus a fixed
  cost per file (inode, directory, journal, two more fsyncs). The lines cross between 8 and
  32 KB, so payloads above `inline_max_bytes` (default 16 KiB) go to files - every DICOM
  ECG: 1.14 bytes per byte (about 1.35, noisy, counting the journal), within the 1.5 goal -
  and smaller ones (observations, FHIR bundles) stay in the database: fewer device bytes,
  3x faster.
- Crash safety of files: write temporary file, fsync, rename, fsync the directory, then commit
  the row. A file without a row is removed at open; a queued row whose payload is missing is
  quarantined at open ("lost before it was sent"), and `read_payload` verifies the sha256 of
  every payload before it is sent (mismatch or missing -> quarantined, CorruptPayloadError).
- Purge: payload deleted, `patient` and `meta` set to NULL, WAL checkpointed (TRUNCATE) so the
  old page images leave the WAL too. Payload *files* are unlinked, not overwritten (on flash the
  controller remaps blocks anyway): protect the data partition itself if that matters.
- All files are created 0600 and directories 0700: every lastmile service runs as one user.
- A send is charged before its bytes go out (`begin_send`: attempts + 1, in_flight = 1, durable),
  so a process killed mid-send has paid for it: recovery counts it in `interrupted_sends`, and an
  item whose sends were cut short `max_interrupted_sends` times in a row (an object that crashes
  the forwarder, e.g. by exhausting its memory) is quarantined at the next claim instead of
  taking the forwarder down at every restart. An owner token names the boot it ran in: a send
  whose owner died with an earlier boot was cut by the whole gateway going down (a power cut,
  a reboot), not by its object, and is queued again uncharged - in a village whose power
  flickers, the oldest study is the one in flight at every cut and was quarantined after five
  (bench/power_cut.py).
- A full disk drains (see `space_reserve.py`): writes that move items along (claim, sent,
  committed, purged, status) free the reserve file and try again when SQLite reports a full
  disk; adding a new item never does, and is refused with a message that says what to do.
- Storage commitment transactions asked for each item are kept (the latest few, in
  `commitment_requests`) so a report is believed only for a transaction we issued, and only
  for the items in it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import hashlib
import json
import logging
import math
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from uploader.errors import CorruptPayloadError, OutboxFullError, TransientError
from uploader.kinds import Kind as Kind  # re-exported: the senders and lastmile name it from here
from uploader.payload_files import OwnerLock, PayloadFiles
from uploader.space_reserve import DEFAULT_RESERVE_BYTES, SpaceReserve
from uploader.sqlite_store import BUSY_TIMEOUT_MS, MIGRATIONS, StopWaits, begin_immediate, open_database

# re-exported: the services name the stop's give-up from here, as before it moved to sqlite_store
from uploader.sqlite_store import STOP_WAIT_S as STOP_WAIT_S
from uploader.sqlite_store import WaitGivenUp as WaitGivenUp
from uploader.sqlite_store import gave_up_at_stop as gave_up_at_stop

log = logging.getLogger(__name__)

DB_NAME = "outbox.sqlite"
PAYLOAD_DIR = "payloads"
LOCKS_DIR = "locks"
DEFAULT_INLINE_MAX_BYTES = 16 * 1024
_CHUNK = 500  # ids per statement (well under SQLite's variable limit)
WAL_AUTOCHECKPOINT_PAGES = 1000  # SQLite's default: fewer checkpoints, fewer page writes
# A purge's checkpoint waits this long for readers, not the whole busy timeout: it holds the
# outbox's lock meanwhile, and a console page reading for 15 s must not stall sending each round.
# A checkpoint a reader puts off is owed and done by the next purge.
CHECKPOINT_WAIT_MS = 500
# Releasing claims at close waits this long for another process's write lock, not the whole busy
# timeout: a stop must be prompt (systemd's TimeoutStopSec, a power cut coming). Claims are not
# durable: one left behind is put back in the queue, uncharged, by the next open's recovery.
RELEASE_AT_CLOSE_WAIT_MS = 1000
DRAINING_AUTOCHECKPOINT_PAGES = 64  # on a full disk: the WAL is reused every 256 KB, never grown
# what recovery says of a claim its owner left at a stop, the database write-locked by another process
STOPPED_UNRELEASED = "the forwarder stopped before it could put this back in the queue; queued again"
DEFAULT_MAX_INTERRUPTED_SENDS = 5  # sends cut short in a row (process killed) before quarantine
PURGE_CHUNK = 16  # items purged per transaction
COMMITMENT_HISTORY = 4  # commitment transactions remembered per item (a late report still counts)
_T = TypeVar("_T")


class Priority(enum.IntEnum):
    STAT = 0
    ROUTINE = 1


class ItemState(str, enum.Enum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    COMMITTED = "committed"
    PURGED = "purged"
    QUARANTINED = "quarantined"


# Routine items that wait in the queue for their sender: what a metered link holds back. Not STAT
# (never held), not one on the wire, not one held for the doctor (that waits for a patient), not one
# queued before the meter began holding (an older one had its chance), not one whose send failed
# unless the link has worked since it last failed (while it fails, the link had it and lost it; its
# bytes spent the budget all the same) and that send failed with the link (`failed_at`: one the peer
# refused alone, while it took others, waits for the peer, not the meter). Parameters:
# `MeterHold.params`; shared with the metrics exporter, which reads the outbox by SQL (`waiting_not_held_sql`).
ROUTINE_QUEUED_SQL = (
    "state = ? AND kind = ? AND priority != ? AND (hold_until IS NULL OR hold_until <= ?) AND created_at >= ? "
    "AND (attempts = 0 OR (? AND (failed_at IS NULL OR failed_at <= ?)))"
)


@dataclass(frozen=True)
class MeterHold:
    """Which routine items of a kind its metered link holds now (lastmile.services.metered.held_since)."""

    since: float  # those queued since then (-inf: every one)
    failed_too: bool = False  # and those whose sends failed: the link has worked since it last failed
    # of those, the ones whose last send failed by then (with the link; inf: not known, every one)
    failed_by: float = math.inf

    def params(self, kind: str, now: float) -> tuple[Any, ...]:
        """ROUTINE_QUEUED_SQL's parameters."""
        failed = (int(self.failed_too), self.failed_by)
        return (ItemState.QUEUED.value, kind, int(Priority.STAT), now, self.since, *failed)

    def holds(self, item: OutboxItem, now: float) -> bool:
        """Whether ROUTINE_QUEUED_SQL takes `item` (of the meter's kind), for a page that has the
        item read already (the console's Sent page, per study it lists)."""
        return (
            item.state is ItemState.QUEUED
            and item.priority != Priority.STAT
            and not item.held(now)
            and item.created_at >= self.since
            and (item.attempts == 0 or (self.failed_too and self.failed_with_link(item)))
        )

    def failed_with_link(self, item: OutboxItem) -> bool:
        """Whether `item`'s last failed send was its link's (by `failed_by`; not recorded: as before)."""
        return item.failed_at is None or item.failed_at <= self.failed_by


EVERY_ROUTINE = MeterHold(-math.inf)  # every routine item never sent


def waiting_not_held_sql(now: float, held: Mapping[str, MeterHold]) -> tuple[str, list[Any]]:
    """The condition (and its parameters) on `items` of what waits for a peer - queued or on the
    wire - that no metered link holds: `held` maps an outbox kind to what its link holds."""
    sql = "state IN (?, ?)"
    params: list[Any] = [ItemState.QUEUED.value, ItemState.SENDING.value]
    for kind, hold in held.items():
        sql += f" AND NOT ({ROUTINE_QUEUED_SQL})"
        params += hold.params(kind, now)
    return sql, params


@dataclass(frozen=True)
class OutboxItem:
    id: int
    kind: str
    key: str
    priority: Priority
    state: ItemState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    updated_at: float
    sent_at: float | None
    committed_at: float | None
    transaction_uid: str | None
    sha256: str
    size: int
    meta: dict[str, Any]
    patient: dict[str, Any] | None
    quarantine_reason: str | None
    hold_until: float | None = None  # not claimable before this time (None: not held)
    hold_reason: str | None = None  # why: "unassigned" (no patient yet), "re-record" ...
    interrupted_sends: int = 0  # sends cut short in a row by the sending process dying
    commitment_failures: int = 0  # storage commitment reports that failed it (since a retry)
    failed_at: float | None = None  # when its last send failed (None: never, or before this was recorded)

    def held(self, now: float) -> bool:
        return self.state == ItemState.QUEUED and self.hold_until is not None and self.hold_until > now


def instance_key(sop_instance_uid: str) -> str:
    """The key of an item that is one DICOM instance stored as received (the clinic-LAN path): its
    SOP Instance UID, the object's own identity. Kept after the purge, unlike the item's meta."""
    return "dicom-sop:" + sop_instance_uid


@dataclass(frozen=True)
class Hold:
    """Keep an item out of the forwarder's reach until `until` (epoch seconds), for `reason`."""

    reason: str
    until: float


@dataclass(frozen=True)
class AddResult:
    item: OutboxItem
    created: bool


class PayloadGoneError(LookupError):
    """The item was purged: its payload was deleted on purpose."""


S = ItemState
# Which states each operation moves items out of, and into. Items in any other state are left
# untouched (logged): another process or an operator may have moved them meanwhile.
TRANSITIONS: dict[str, tuple[frozenset[ItemState], ItemState]] = {
    "claim": (frozenset({S.QUEUED}), S.SENDING),
    "begin_send": (frozenset({S.SENDING}), S.SENDING),
    "mark_sent": (frozenset({S.SENDING}), S.SENT),
    "transient_failure": (frozenset({S.SENDING}), S.QUEUED),
    "release": (frozenset({S.SENDING}), S.QUEUED),
    "recover": (frozenset({S.SENDING}), S.QUEUED),
    "quarantine": (frozenset({S.QUEUED, S.SENDING, S.SENT}), S.QUARANTINED),
    "set_transaction": (frozenset({S.SENT}), S.SENT),
    "mark_committed": (frozenset({S.SENT}), S.COMMITTED),
    "mark_taken": (frozenset({S.SENDING}), S.COMMITTED),
    "requeue": (frozenset({S.SENT}), S.QUEUED),
    "reask_commitment": (frozenset({S.SENT}), S.SENT),
    "retry": (frozenset({S.QUARANTINED}), S.QUEUED),
    "purge": (frozenset({S.COMMITTED}), S.PURGED),
}

_ITEM_COLUMNS = (
    "id, kind, key, priority, state, attempts, next_attempt_at, last_error, created_at, "
    "updated_at, sent_at, committed_at, transaction_uid, sha256, size, meta, patient, "
    "quarantine_reason, hold_until, hold_reason, interrupted_sends, commitment_failures, failed_at"
)
_WAITING_NAMES = {Kind.DICOM.value: ("ECG", "ECGs"), Kind.FHIR_BUNDLE.value: ("visit record", "visit records")}


class _Sql(str):
    """A column value given as an SQL expression (e.g. "attempts - in_flight"), not a parameter."""


def backoff_delay(attempts: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Delay after the `attempts`-th failure: ceiling = min(max, base * 2**(attempts-1)),
    uniformly random in [ceiling/2, ceiling] so gateways that failed together spread out
    without ever retrying at once."""
    exponent = min(max(attempts - 1, 0), 62)
    ceiling = min(max_s, base_s * float(2**exponent))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


def is_disk_full(exc: BaseException) -> bool:
    """SQLite (or the file system under it) found no room to write."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc)


def is_storage_full(exc: BaseException) -> bool:
    """No room for what was to be recorded: the outbox refused it (OutboxFullError), or SQLite or
    the file system under it found the partition full."""
    return isinstance(exc, OutboxFullError) or is_disk_full(exc)


def _move(
    conn: sqlite3.Connection, op: str, item_ids: list[int], now: float, sets: dict[str, Any] | None = None
) -> list[int]:
    """(In a write transaction.) Move the items that are in op's source states to its target,
    setting `sets` too; return the ids moved."""
    sources, target = TRANSITIONS[op]
    assignments = {"state": target.value, "updated_at": now, **(sets or {})}
    set_sql = ", ".join(f"{col} = {v}" if isinstance(v, _Sql) else f"{col} = ?" for col, v in assignments.items())
    values = [v for v in assignments.values() if not isinstance(v, _Sql)]
    src = sorted(s.value for s in sources)
    moved: list[int] = []
    for chunk in _chunks(item_ids):
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"UPDATE items SET {set_sql} WHERE id IN ({marks}) AND state IN ({','.join('?' * len(src))}) RETURNING id",
            [*values, *chunk, *src],
        ).fetchall()
        moved += [r[0] for r in rows]
    return moved


def _sent_sets(now: float) -> dict[str, Any]:
    """What `mark_sent` sets besides the state: the peer has it, no claim, no send in flight."""
    return {"sent_at": now, "last_error": None, "claimed_by": None, "in_flight": 0, "interrupted_sends": 0}


# kinds whose peer's answer is its commitment (`mark_taken`: the county platform's
# transaction-response): what an older version's note of the stored says of its items (it kept no
# word of how to record them). One the peer stored whose recording failed is recorded taken, not
# "sent" - a state nothing moves such an item out of (no commitment comes for it): never purged
_TAKEN_WHEN_STORED = (Kind.FHIR_BUNDLE.value,)


def _record_stored_of(conn: sqlite3.Connection, owner: str, items: Mapping[int, bool | None], now: float) -> int:
    """(In a write transaction.) Items the peer stored for `owner` that it could not record
    (`Outbox.remember_stored`: by id, whether taken), recorded as sent - taken (sent and
    committed: `mark_taken`) for those its caller said so of (None, an older version's note: by
    kind, `_TAKEN_WHEN_STORED`): still claimed by it, or - a dead owner - queued again (a power
    cut undid its claim, which is not fsynced). Returns how many."""
    moved = 0
    for taken in (True, False, None):
        ids = [item_id for item_id, its in items.items() if its is taken]
        is_taken_args: tuple[str, ...] = ()
        if taken is None:
            is_taken, is_taken_args = f"kind IN ({','.join('?' * len(_TAKEN_WHEN_STORED))})", _TAKEN_WHEN_STORED
        else:
            is_taken = "1" if taken else "0"
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            moved += conn.execute(
                f"UPDATE items SET state = CASE WHEN {is_taken} THEN ? ELSE ? END, sent_at = ?, "
                f"committed_at = CASE WHEN {is_taken} THEN ? ELSE committed_at END, updated_at = ?, "
                "last_error = NULL, claimed_by = NULL, in_flight = 0, interrupted_sends = 0 "
                f"WHERE id IN ({marks}) AND (state = ? OR (state = ? AND claimed_by IS ?))",
                (
                    *is_taken_args,
                    S.COMMITTED.value,
                    S.SENT.value,
                    now,
                    *is_taken_args,
                    now,
                    now,
                    *chunk,
                    S.QUEUED.value,
                    S.SENDING.value,
                    owner,
                ),
            ).rowcount
    return moved


def _give_back_claims(conn: sqlite3.Connection, owner: str, now: float, error: str | None = None) -> int:
    """(In a write transaction.) `owner`'s claims back to queued, uncharged: its sends whose
    outcome it could not record are given their attempt back. Returns how many."""
    return conn.execute(
        "UPDATE items SET state = ?, claimed_by = NULL, updated_at = ?, last_error = COALESCE(?, last_error), "
        "attempts = attempts - in_flight, in_flight = 0 WHERE state = ? AND claimed_by = ?",
        (S.QUEUED.value, now, error, S.SENDING.value, owner),
    ).rowcount


def _quarantined(reason: str, now: float) -> dict[str, Any]:
    """What a quarantined item records besides its state: why, when, and no send in hand."""
    return {
        "quarantine_reason": reason,
        "quarantined_at": now,
        "last_error": reason,
        "claimed_by": None,
        "in_flight": 0,
    }


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False)


def _time(value: float | None) -> float | None:
    return None if value is None else float(value)


def _item(row: sqlite3.Row) -> OutboxItem:
    return OutboxItem(
        id=row["id"],
        kind=row["kind"],
        key=row["key"],
        priority=Priority(row["priority"]),
        state=ItemState(row["state"]),
        attempts=row["attempts"],
        next_attempt_at=float(row["next_attempt_at"]),
        last_error=row["last_error"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        sent_at=_time(row["sent_at"]),
        committed_at=_time(row["committed_at"]),
        transaction_uid=row["transaction_uid"],
        sha256=row["sha256"],
        size=row["size"],
        meta=json.loads(row["meta"]) if row["meta"] else {},
        patient=json.loads(row["patient"]) if row["patient"] else None,
        quarantine_reason=row["quarantine_reason"],
        hold_until=_time(row["hold_until"]),
        hold_reason=row["hold_reason"],
        interrupted_sends=row["interrupted_sends"],
        commitment_failures=row["commitment_failures"],
        failed_at=_time(row["failed_at"]),
    )


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    return _chunks_of([int(i) for i in ids])


def _chunks_of(values: Sequence[_T]) -> Iterator[list[_T]]:
    unique = list(dict.fromkeys(values))
    for start in range(0, len(unique), _CHUNK):
        yield unique[start : start + _CHUNK]


def _remember_request(conn: sqlite3.Connection, transaction_uid: str, item_id: int, now: float) -> None:
    """One (transaction, item) asked for, keeping only the last COMMITMENT_HISTORY per item."""
    conn.execute(
        "INSERT OR IGNORE INTO commitment_requests (transaction_uid, item_id, asked_at) VALUES (?, ?, ?)",
        (transaction_uid, item_id, now),
    )
    conn.execute(
        "DELETE FROM commitment_requests WHERE item_id = ? AND transaction_uid NOT IN ("
        "  SELECT transaction_uid FROM commitment_requests WHERE item_id = ? "
        "  ORDER BY asked_at DESC LIMIT ?)",
        (item_id, item_id, COMMITMENT_HISTORY),
    )


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def current_boot() -> str:
    """This boot's id (Linux: a new random one at every boot), in the form owner tokens carry it;
    "" where the kernel does not say."""
    try:
        return BOOT_ID.read_text().strip().replace("-", "")
    except OSError:
        return ""


def boot_of(owner: str) -> str:
    """The boot an owner token was made in; "" for a token that does not say (older versions)."""
    boot, sep, _rest = owner.rpartition("-")
    return boot if sep else ""


class Outbox:
    """Open with `Outbox.open(data_dir)`; safe to share between threads; close when done."""

    def __init__(
        self,
        data_dir: Path,
        db: sqlite_utils.Database,
        *,
        min_free_bytes: int,
        backoff_base_s: float,
        backoff_max_s: float,
        rng: random.Random,
        statvfs: Callable[[Any], os.statvfs_result],
        inline_max_bytes: int,
        reserve_bytes: int,
    ) -> None:
        self.data_dir = data_dir
        self.db = db
        self.min_free_bytes = min_free_bytes
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.inline_max_bytes = inline_max_bytes
        self._conn: sqlite3.Connection = db.conn
        self._rng = rng
        self._statvfs = statvfs
        self._lock = threading.RLock()
        self._files = PayloadFiles(data_dir / PAYLOAD_DIR)
        self._reserve = SpaceReserve(data_dir, reserve_bytes)
        self._draining = False  # the reserve was released: keep the WAL small until it is back
        self._checkpoint_owed = False  # a checkpoint found no room or a reader: the next purge_due does it
        self._locks_dir = data_dir / LOCKS_DIR
        self._locks_dir.mkdir(mode=0o700, exist_ok=True)
        self.owner = f"{current_boot()}-{uuid.uuid4().hex}"
        self._owner_lock: OwnerLock | None = OwnerLock(self._locks_dir, self.owner)
        # only an Outbox that claimed (the forwarder's) has claims to release at close: the others'
        # close then writes nothing, and does not wait out the busy timeout on a locked database
        self._has_claimed = False
        # stored at the peer, not yet recorded as sent (`remember_stored`): recorded by `record_stored`;
        # by id, whether its caller records it taken (`mark_taken`) rather than sent
        self._stored_unrecorded: dict[int, bool] = {}
        self._wait_ms = BUSY_TIMEOUT_MS  # how long a write waits for another process's lock
        self._stop_waits: StopWaits | None = None  # its stop set: a write waits at most STOP_WAIT_S more

    # -- opening and closing ---------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        min_free_bytes: int = 200 * 2**20,
        backoff_base_s: float = 5.0,
        backoff_max_s: float = 900.0,
        rng: random.Random | None = None,
        statvfs: Callable[[Any], os.statvfs_result] = os.statvfs,
        inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES,
        reserve_bytes: int | None = None,
        now: float | None = None,
    ) -> Outbox:
        """Open (creating or migrating) the outbox in `data_dir`, then recover from any crash:
        interrupted sends back to queued, orphaned payload files removed, queued items whose
        payload is lost quarantined. `reserve_bytes` (default: 16 MiB, at most half of
        `min_free_bytes`) is set aside for draining a full disk (space_reserve.py)."""
        data_dir = Path(data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        db = open_database(data_dir / DB_NAME, MIGRATIONS, pragmas=(f"journal_size_limit={8 * 2**20}",))
        try:
            outbox = cls(
                data_dir,
                db,
                min_free_bytes=min_free_bytes,
                backoff_base_s=backoff_base_s,
                backoff_max_s=backoff_max_s,
                rng=rng or random.Random(),
                statvfs=statvfs,
                inline_max_bytes=inline_max_bytes,
                reserve_bytes=min(DEFAULT_RESERVE_BYTES, min_free_bytes // 2)
                if reserve_bytes is None
                else reserve_bytes,
            )
        except BaseException:
            db.close()
            raise
        try:
            outbox._recover_at_open(time.time() if now is None else now)
        except BaseException:
            outbox.close()
            raise
        return outbox

    def _recover_at_open(self, now: float) -> None:
        recovered = self.recover_interrupted(now)
        if recovered:
            log.warning("%d interrupted send(s) put back in the queue", recovered)
        self._files.remove_orphans(self._referenced_files)
        self._quarantine_lost_payloads(now)
        self._reserve.remove_leftovers()
        self.ensure_reserve()

    def close(self) -> None:
        """Record what the peer stored as sent (`record_stored`), release this Outbox's other
        claims (back to queued, uncharged) and close the database."""
        with self._lock:
            if self._owner_lock is None:
                return
            try:
                if self._has_claimed:
                    with self._busy_timeout(RELEASE_AT_CLOSE_WAIT_MS):
                        self.record_stored(time.time())
                        self.release_claims(time.time())
            except sqlite3.Error as exc:  # a claim left behind is recovered at the next open
                # (what the peer stored is in its file: the next open records it as sent)
                log.warning(
                    "could not release claims at close (the next open puts them back in the queue, "
                    "and records what the peer stored as sent): %s",
                    exc,
                )
                # before the flock goes: a recovery that finds this owner gone finds the mark too
                self._owner_lock.leave_claims()
            self._conn.close()
            self._owner_lock.release()
            self._owner_lock = None

    def release_claims(self, now: float) -> int:
        """This Outbox's claims back to queued, uncharged (at close, or after a write failed
        mid-round, e.g. on a full disk, and left items claimed); returns how many."""
        with self._lock:
            # None: nothing to write, so no wait for another process's write lock (a round that
            # failed on it claimed nothing, and its settle and the stop's close waited 15 s + 1 s
            # more). Only this Outbox claims for its owner, under this lock: nothing comes meanwhile.
            if not self._claims_of(self.owner):
                return 0
            with self._write() as conn:
                return _give_back_claims(conn, self.owner, now)

    def _claims_of(self, owner: str) -> bool:
        """Whether `owner` has claims (a read: never waits for a writer)."""
        rows = self._read("SELECT 1 FROM items WHERE state = ? AND claimed_by = ? LIMIT 1", (S.SENDING.value, owner))
        return bool(rows)

    def remember_stored(self, item_ids: Sequence[int], *, taken: bool) -> None:
        """The peer stored these items (claimed by this Outbox) but `mark_sent` (`mark_taken`:
        `taken`) could not record it (a full disk, an I/O error, another process's write lock past
        the wait or given up at a stop): kept until `record_stored` does, in memory and in a file
        beside this owner's lock, fsynced, each with how it is to be recorded. If this process
        ends first - a stop whose writes still find the database locked, a kill, a power cut - the
        next open records them (`recover_interrupted`): not sent again, not a second
        storage-commitment round."""
        with self._lock:
            self._stored_unrecorded.update((int(i), taken) for i in item_ids)
            if self._owner_lock is None:
                return
            try:
                self._owner_lock.keep_stored(self._stored_unrecorded)
            except OSError as exc:  # a full disk: this process still records them once it can
                log.warning("items stored at the peer, not recorded as sent yet, kept in memory only: %s", exc)

    def record_stored(self, now: float) -> int:
        """Record as sent (durably) what `remember_stored` kept - taken (sent and committed, as
        `mark_taken`) those its caller said so of; call before releasing this Outbox's claims.
        Returns how many."""
        with self._lock:
            items: dict[int, bool | None] = dict(sorted(self._stored_unrecorded.items()))
            if not items:
                return 0
            # durable: the file naming them goes next
            self._commit(functools.partial(_record_stored_of, owner=self.owner, items=items, now=now))
            self._stored_unrecorded.clear()
            if self._owner_lock is not None:
                try:
                    self._owner_lock.keep_stored({})
                except OSError as exc:  # harmless: the next open finds them sent already
                    log.warning("could not remove the note of items stored at the peer: %s", exc)
        return len(items)

    def give_up_waits_on(self, stop: threading.Event | StopWaits) -> None:
        """Once `stop` is set (from any thread: a service's SIGTERM), a write waiting for another
        process's write lock waits at most STOP_WAIT_S more, then fails as SQLite would
        ("database is locked": WaitGivenUp): the stop is the service's within seconds, whatever
        holds the outbox. What the failed write meant stays as it was (a claim never made, or one
        left to the next open, uncharged: `close`). A StopWaits the service's other databases
        share (clinic.db) counts that second once for all (sqlite_store.StopWaits)."""
        self._stop_waits = stop if isinstance(stop, StopWaits) else StopWaits(stop)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with the write lock up front (BEGIN IMMEDIATE).
        `durable=False`: committed without an fsync (see `_commit`)."""
        with self._lock:
            if self._owner_lock is None:
                raise RuntimeError("the outbox is closed")
            if not durable:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                begin_immediate(self._conn, self._stop_waits, wait_ms=self._wait_ms)
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")

    @contextlib.contextmanager
    def _busy_timeout(self, ms: int) -> Iterator[None]:
        """Meanwhile this connection waits at most `ms` for another's lock ("database is locked"
        after), not the whole busy timeout."""
        with self._lock:
            self._conn.execute(f"PRAGMA busy_timeout={ms}")
            self._wait_ms = ms
            try:
                yield
            finally:
                self._wait_ms = BUSY_TIMEOUT_MS
                self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _commit(
        self, body: Callable[[sqlite3.Connection], _T], *, use_reserve: bool = True, durable: bool = True
    ) -> _T:
        """`body` in one write transaction. If SQLite finds the disk full, the reserve file is
        deleted (or, once it is spent, the WAL restarted over its own blocks) and the transaction
        tried once more: moving items along must not stop on a full disk (adding new ones may:
        they go through `_write` directly).

        `durable=False` (WAL with synchronous=NORMAL for this one commit): no fsync, so it survives
        the process being killed (the page cache keeps it) but a power cut may undo it. Only for
        writes whose loss is harmless - the per-object send bookkeeping (`begin_send`,
        `mark_sent`); the next durable commit (any FULL one appends after it in the WAL and
        fsyncs the whole file) makes it durable too."""
        try:
            with self._write(durable=durable) as conn:
                return body(conn)
        except sqlite3.OperationalError as exc:
            if not (use_reserve and is_disk_full(exc)):
                raise
            self._set_draining(True)
            if not self._reserve.release() and not self._restart_wal():
                raise
        with self._write(durable=durable) as conn:
            return body(conn)

    def _restart_wal(self) -> bool:
        """The reserve is spent and the WAL cannot grow: copy it into the database (whose pages
        exist already) so the next transaction writes over the WAL's own blocks from its start
        instead of asking the file system for new ones. False if readers kept it busy or the
        checkpoint itself found no room."""
        try:
            with self._lock:
                busy, _log, _done = self._conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            return False
        return not busy

    def _set_draining(self, draining: bool) -> None:
        """While the disk is full, checkpoint every few pages: a checkpointed WAL is written
        over from its start (no new blocks), instead of growing to 4 MB before the first
        checkpoint; normally SQLite's default, which writes the database file less often."""
        if draining == self._draining:
            return
        pages = DRAINING_AUTOCHECKPOINT_PAGES if draining else WAL_AUTOCHECKPOINT_PAGES
        with self._lock:
            if self._owner_lock is not None:
                self._conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
        self._draining = draining

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            if self._owner_lock is None:
                raise RuntimeError("the outbox is closed")
            return self._conn.execute(sql, params).fetchall()

    def _transition(
        self, op: str, item_ids: Sequence[int], now: float, sets: dict[str, Any] | None = None, *, durable: bool = True
    ) -> list[int]:
        """Move the given items from op's source states to its target; return the ids moved."""
        wanted = list(dict.fromkeys(int(i) for i in item_ids))
        if not wanted:
            return []
        moved = self._commit(lambda conn: _move(conn, op, wanted, now, sets), durable=durable)
        skipped = sorted(set(wanted) - set(moved))
        if skipped:
            sources, _target = TRANSITIONS[op]
            log.warning(
                "%s: item(s) %s not in state %s, left unchanged",
                op,
                skipped,
                "/".join(sorted(s.value for s in sources)),
            )
        return moved

    def _referenced_files(self) -> set[str]:
        return {r[0] for r in self._read("SELECT payload_file FROM items WHERE payload_file IS NOT NULL")}

    def _free_bytes(self) -> int:
        st = self._statvfs(self.data_dir)
        return int(st.f_bavail * st.f_frsize)

    def _check_space(self, size: int) -> None:
        free = self._free_bytes()
        if size <= self.inline_max_bytes:  # stored in the database: its free pages count too
            free += self._free_pages_bytes()
        if free - size < self.min_free_bytes:
            raise self._full_error(
                f"only {free / 2**20:.1f} MB free on the data partition ({self.data_dir}), "
                f"{self.min_free_bytes / 2**20:.0f} MB must stay free"
            )

    def _free_pages_bytes(self) -> int:
        """Space purged items left inside the database file (reused before it grows)."""
        with self._lock:
            pages = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)

    def _full_error(self, detail: str) -> OutboxFullError:
        """The refusal the doctor reads: what is waiting, what to do, that nothing was lost."""
        try:
            rows = self._read(
                "SELECT kind, COUNT(*) FROM items WHERE state IN (?, ?, ?) GROUP BY kind ORDER BY kind",
                (S.QUEUED.value, S.SENDING.value, S.SENT.value),
            )
        except sqlite3.Error:
            rows = []
        waiting = [f"{n} {_WAITING_NAMES.get(kind, ('item', 'items'))[n != 1]}" for kind, n in rows if n]
        if waiting:
            what = f"{' and '.join(waiting)} {'is' if sum(n for _k, n in rows) == 1 else 'are'} waiting to be sent"
            todo = (
                "connect the network so they can go to the reading center (space is freed once it "
                "has them), or call the county IT"
            )
        else:
            what, todo = "nothing is waiting to be sent", "call the county IT to free space"
        return OutboxFullError(
            f"storage full: {what}; {todo}. Nothing was lost: everything stored before is kept. "
            f"This one was not stored: try again later. ({detail})"
        )

    def ensure_reserve(self) -> bool:
        """Set the reserve space aside again if it is missing and there is room (after a purge)."""
        try:
            present = self._reserve.ensure(self._free_bytes(), self.min_free_bytes)
        except OSError as exc:
            log.warning("cannot check free space for the reserve: %s", exc)
            return False
        if present:
            self._set_draining(False)
        return present

    # -- adding -----------------------------------------------------------------------------------
    def add(
        self,
        kind: str,
        key: str,
        payload: bytes,
        *,
        priority: Priority = Priority.ROUTINE,
        meta: dict[str, Any] | None = None,
        patient: dict[str, Any] | None = None,
        now: float | None = None,
        hold: Hold | None = None,
    ) -> AddResult:
        """Store `payload` durably under the idempotency `key`; an existing key returns the
        existing item (created=False) and writes nothing. `hold`: not sendable until then."""
        now = time.time() if now is None else now
        existing = self.find(key)
        if existing is not None:
            return AddResult(existing, created=False)
        payload = bytes(payload)
        self._check_space(len(payload))
        digest = hashlib.sha256(payload).hexdigest()
        inline = len(payload) <= self.inline_max_bytes
        writing = contextlib.nullcontext() if inline else self._files.writing()
        with writing:
            try:
                name = None if inline else self._files.write(payload)
            except OutboxFullError as exc:
                raise self._full_error(str(exc)) from exc
            try:
                item_id, created = self._insert(
                    kind,
                    key,
                    payload if inline else None,
                    name,
                    len(payload),
                    priority,
                    meta,
                    patient,
                    digest,
                    now,
                    hold,
                )
            except sqlite3.Error as exc:
                if name:
                    self._files.delete(name)
                if is_disk_full(exc):
                    raise self._full_error(f"the outbox database could not store item {key!r}: {exc}") from exc
                raise
            except BaseException:
                if name:
                    self._files.delete(name)
                raise
            if not created and name:
                self._files.delete(name)  # another writer added the same key meanwhile
        item = self.get(item_id)
        assert item is not None
        if created:
            log.debug(
                "outbox item %d added (%s, %d bytes, %s)", item_id, kind, len(payload), "inline" if inline else "file"
            )
        return AddResult(item, created=created)

    def _insert(
        self,
        kind: str,
        key: str,
        inline: bytes | None,
        name: str | None,
        size: int,
        priority: Priority,
        meta: dict[str, Any] | None,
        patient: dict[str, Any] | None,
        digest: str,
        now: float,
        hold: Hold | None = None,
    ) -> tuple[int, bool]:
        with self._write() as conn:
            row = conn.execute("SELECT id FROM items WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return row[0], False
            cur = conn.execute(
                "INSERT INTO items (kind, key, priority, state, attempts, next_attempt_at, "
                "created_at, updated_at, sha256, size, meta, patient, payload_file, hold_until, hold_reason) "
                "VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    key,
                    int(Priority(priority)),
                    S.QUEUED.value,
                    now,
                    now,
                    now,
                    digest,
                    size,
                    _json(meta or {}),
                    _json(patient),
                    name,
                    None if hold is None else float(hold.until),
                    None if hold is None else hold.reason,
                ),
            )
            item_id = int(cur.lastrowid or 0)
            if inline is not None:
                conn.execute("INSERT INTO payloads (item_id, data) VALUES (?, ?)", (item_id, inline))
            return item_id, True

    # -- reading ----------------------------------------------------------------------------------
    def get(self, item_id: int) -> OutboxItem | None:
        rows = self._read(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,))
        return _item(rows[0]) if rows else None

    def find(self, key: str) -> OutboxItem | None:
        rows = self._read(f"SELECT {_ITEM_COLUMNS} FROM items WHERE key = ?", (key,))
        return _item(rows[0]) if rows else None

    def get_many(self, item_ids: Sequence[int]) -> dict[int, OutboxItem]:
        """The items of `item_ids` there are, by id: one statement per _CHUNK ids (a page
        listing 50 items, not 50 statements)."""
        return {item.id: item for item in self._many("id", _chunks(item_ids))}

    def find_many(self, keys: Sequence[str]) -> dict[str, OutboxItem]:
        """The items with the keys `keys` there are, by key, as `get_many`."""
        return {item.key: item for item in self._many("key", _chunks_of(keys))}

    def _many(self, column: str, chunks: Iterator[Sequence[Any]]) -> list[OutboxItem]:
        out = []
        for chunk in chunks:
            marks = ",".join("?" * len(chunk))
            out += [
                _item(r) for r in self._read(f"SELECT {_ITEM_COLUMNS} FROM items WHERE {column} IN ({marks})", chunk)
            ]
        return out

    def latest_ecgs(self, limit: int) -> list[OutboxItem]:
        """The last `limit` ECGs queued, purged ones too, newest first: one search of the
        items_ecgs index, however many other rows the outbox keeps."""
        # the kind as a literal: the partial index items_ecgs serves only a query naming it so
        sql = f"SELECT {_ITEM_COLUMNS} FROM items WHERE kind = '{Kind.DICOM.value}' ORDER BY id DESC LIMIT ?"
        return [_item(r) for r in self._read(sql, (int(limit),))]

    def items(
        self, *, state: ItemState | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[OutboxItem]:
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(ItemState(state).value)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        sql = f"SELECT {_ITEM_COLUMNS} FROM items"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_item(r) for r in self._read(sql, params)]

    def newest(self, kind: str, *, since: float, limit: int) -> list[OutboxItem]:
        """Items of `kind` added since `since` (epoch s), newest first, at most `limit`."""
        # Every state and priority named: the items_claim index (state, kind, priority,
        # created_at) then finds just the recent rows of `kind`, not a scan of every row ever
        # queued (purged rows stay): hundreds of ms on a Pi's 300k-row outbox.
        states = ", ".join("?" * len(ItemState))
        priorities = ", ".join("?" * len(Priority))
        sql = (
            f"SELECT {_ITEM_COLUMNS} FROM items WHERE state IN ({states}) AND kind = ? "
            f"AND priority IN ({priorities}) AND created_at >= ? ORDER BY id DESC LIMIT ?"
        )
        params = (*(s.value for s in ItemState), kind, *(int(p) for p in Priority), since, int(limit))
        return [_item(r) for r in self._read(sql, params)]

    def awaiting_commitment(self, kind: str) -> list[OutboxItem]:
        return self.items(state=S.SENT, kind=kind)

    def payload_path(self, item: OutboxItem) -> Path | None:
        """The payload file of a file-backed item (None for payloads kept in the database or
        purged). Streaming senders must still check the hash: prefer `read_payload`."""
        rows = self._read("SELECT payload_file FROM items WHERE id = ?", (item.id,))
        if not rows or rows[0][0] is None:
            return None
        return self._files.path(rows[0][0])

    def read_payload(self, item: OutboxItem, now: float | None = None) -> bytes:
        """The payload, verified against its sha256. Missing, altered or unreadable for good (an
        I/O error twice): the item is quarantined with the reason and CorruptPayloadError raised,
        so it is never sent. Any other error opening the file (out of descriptors or memory) is
        the process's, not the item's: TransientError, the item stays as it is."""
        rows = self._read("SELECT state, payload_file, sha256, size FROM items WHERE id = ?", (item.id,))
        if not rows:
            raise LookupError(f"outbox item {item.id} does not exist")
        state, name, digest, size = rows[0]
        if state == S.PURGED.value:
            raise PayloadGoneError(f"outbox item {item.id} was purged: its payload is deleted")
        problem: str | None = None
        data = b""
        if name is not None:
            try:
                data = self._read_file(name)
            except FileNotFoundError:
                problem = f"payload file {PAYLOAD_DIR}/{name} is missing"
            except OSError as exc:
                if exc.errno != errno.EIO:
                    # out of descriptors or memory (EMFILE, ENFILE, ENOMEM, EAGAIN ...): the process's
                    # trouble, not the file's; the next attempt reads it
                    raise TransientError(f"payload file {PAYLOAD_DIR}/{name} not read now ({exc.strerror})") from exc
                problem = f"payload file {PAYLOAD_DIR}/{name} cannot be read ({exc.strerror}, twice)"
        else:
            blob = self._read("SELECT data FROM payloads WHERE item_id = ?", (item.id,))
            if not blob:
                problem = "payload is missing from the database"
            else:
                data = bytes(blob[0][0])
        if problem is None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != digest:
                problem = (
                    f"payload corrupt: sha256 {actual[:16]}... ({len(data)} bytes) "
                    f"does not match the stored {digest[:16]}... ({size} bytes)"
                )
        if problem is not None:
            reason = f"{problem}; not sent"
            self.quarantine(item.id, reason, time.time() if now is None else now)
            log.error("outbox item %d (%s %s) quarantined: %s", item.id, item.kind, item.key, reason)
            raise CorruptPayloadError(f"outbox item {item.id} ({item.kind} {item.key}): {reason}")
        return data

    def read_payloads(self, item_ids: Sequence[int], now: float | None = None) -> dict[int, bytes]:
        """The payloads of `item_ids` that can be read now, each verified as `read_payload` verifies
        it, for a page showing many items: those kept in the database in one statement per _CHUNK
        ids; a payload file, or a payload not matching its hash, through `read_payload` (which
        quarantines a corrupt one). Left out (and logged): no such item, purged, corrupt, or not
        readable now."""
        out: dict[int, bytes] = {}
        for chunk in _chunks(item_ids):
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                "SELECT items.id, items.state, items.sha256, payloads.data FROM items "
                f"LEFT JOIN payloads ON payloads.item_id = items.id WHERE items.id IN ({marks})",
                chunk,
            )
            for item_id, state, digest, data in rows:
                if state == S.PURGED.value:
                    continue
                if data is not None and hashlib.sha256(data).hexdigest() == digest:
                    out[item_id] = bytes(data)
                    continue
                item = self.get(item_id)
                if item is None:
                    continue
                try:
                    out[item_id] = self.read_payload(item, now)
                except (CorruptPayloadError, LookupError, TransientError) as exc:
                    log.warning("outbox item %d: payload not read (%s)", item_id, type(exc).__name__)
        return out

    def _read_file(self, name: str) -> bytes:
        """A payload file's bytes; an I/O error is tried once more at once: a card's passing glitch
        reads the second time, a bad block fails again (then the item goes to a person, quarantined
        with the reason, instead of being retried for ever on storage that is failing)."""
        try:
            return self._files.read(name)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            log.warning("payload file %s/%s: I/O error, reading it again: %s", PAYLOAD_DIR, name, exc)
        return self._files.read(name)

    # -- sending ----------------------------------------------------------------------------------
    def claim(
        self,
        kind: str,
        limit: int,
        now: float,
        *,
        max_interrupted_sends: int = DEFAULT_MAX_INTERRUPTED_SENDS,
        priority: Priority | None = None,
    ) -> list[OutboxItem]:
        """Atomically move up to `limit` due queued items of `kind` (only of `priority`, if
        given) to sending: STAT first, then oldest. Two claimers (threads or processes) never get
        the same item. Items whose sends were cut short `max_interrupted_sends` times in a row
        are quarantined instead."""
        if limit <= 0:
            return []
        only = "" if priority is None else f" AND priority = {int(Priority(priority))}"

        def body(conn: sqlite3.Connection) -> tuple[list[sqlite3.Row], list[tuple[int, int]]]:
            doomed = conn.execute(
                "UPDATE items SET state = ?, updated_at = ?, quarantined_at = ?, claimed_by = NULL, "
                "quarantine_reason = 'killed during send ' || interrupted_sends || ' times - possibly an "
                "object that crashes the forwarder; not sent again', last_error = 'killed during send' "
                "WHERE state = ? AND kind = ? AND interrupted_sends >= ? RETURNING id, interrupted_sends",
                (S.QUARANTINED.value, now, now, S.QUEUED.value, kind, max(1, int(max_interrupted_sends))),
            ).fetchall()
            rows = conn.execute(
                f"UPDATE items SET state = ?, updated_at = ?, claimed_by = ? WHERE id IN ("
                f"  SELECT id FROM items WHERE state = ? AND kind = ? AND next_attempt_at <= ?"
                f"  AND (hold_until IS NULL OR hold_until <= ?){only}"
                f"  ORDER BY priority, created_at, id LIMIT ?) RETURNING {_ITEM_COLUMNS}",
                (S.SENDING.value, now, self.owner, S.QUEUED.value, kind, now, now, int(limit)),
            ).fetchall()
            return rows, [(r[0], r[1]) for r in doomed]

        self._has_claimed = True  # before the commit: a claim it may have made is released at close
        # not fsynced: a claim a power cut undoes leaves the items queued, as before it
        rows, doomed = self._commit(body, durable=False)
        for item_id, times in doomed:
            log.error(
                "outbox item %d quarantined: killed during send %d times - possibly an object that crashes the "
                "forwarder",
                item_id,
                times,
            )
        items = [_item(r) for r in rows]
        items.sort(key=lambda i: (i.priority, i.created_at, i.id))
        return items

    def stat_waiting(self, kind: str, now: float) -> bool:
        """Whether a STAT item of `kind` is due and unclaimed (cheap: asked between objects and
        while routine transfers are on the wire, so that STAT can take the link)."""
        rows = self._read(
            "SELECT 1 FROM items WHERE state = ? AND kind = ? AND priority = ? AND next_attempt_at <= ? "
            "AND (hold_until IS NULL OR hold_until <= ?) LIMIT 1",
            (S.QUEUED.value, kind, int(Priority.STAT), now, now),
        )
        return bool(rows)

    def routine_queued(self, kind: str, now: float, hold: MeterHold = EVERY_ROUTINE) -> tuple[int, float | None]:
        """How many routine items of `kind` its meter holds (`hold`) wait for their sender, and when
        the oldest of them was queued."""
        count, oldest = self._read(
            f"SELECT COUNT(*), MIN(created_at) FROM items WHERE {ROUTINE_QUEUED_SQL}", hold.params(kind, now)
        )[0]
        return int(count), oldest

    def has_routine_queued(self, kind: str, now: float, hold: MeterHold = EVERY_ROUTINE) -> bool:
        """Whether any routine item of `kind` its meter holds (`hold`) waits for its sender (one row
        looked at, at most)."""
        return bool(self._read(f"SELECT 1 FROM items WHERE {ROUTINE_QUEUED_SQL} LIMIT 1", hold.params(kind, now)))

    def oldest_waiting_item(
        self,
        now: float,
        *,
        except_routine_of: Mapping[str, MeterHold] | None = None,
        leaving_out: tuple[str, Sequence[Any]] | None = None,
    ) -> OutboxItem | None:
        """The oldest queued or sending item: what it waits for. `except_routine_of` (kind -> what a
        metered link holds of it now) leaves out the routine items it holds; `leaving_out` (a
        condition on `items` and its parameters) those it takes: the application's own holds,
        e.g. ECGs held for the doctor, which wait for him, not for the link."""
        where, params = waiting_not_held_sql(now, except_routine_of or {})
        if leaving_out is not None:
            where += f" AND NOT ({leaving_out[0]})"
            params += leaving_out[1]
        rows = self._read(f"SELECT {_ITEM_COLUMNS} FROM items WHERE {where} ORDER BY created_at, id LIMIT 1", params)
        return _item(rows[0]) if rows else None

    def begin_send(self, item_id: int, now: float) -> bool:
        """Charge the attempt before the item's bytes go out: if this process dies before the
        outcome is recorded, recovery counts an interrupted send. False if the item is not ours
        to send (any more). Committed without an fsync (it is in the file for any process to
        see, only a power cut can undo it): what a power cut loses is one charge on a counter,
        and the fsync was the largest CPU cost of sending an object."""

        def body(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE items SET attempts = attempts + 1, in_flight = 1, updated_at = ? "
                "WHERE id = ? AND state = ? AND claimed_by = ?",
                (now, int(item_id), S.SENDING.value, self.owner),
            )
            return cur.rowcount == 1

        return self._commit(body, durable=False)

    def interrupt_sends(self, item_ids: Sequence[int], reason: str, now: float) -> int:
        """Sends of ours that ended without an outcome (an unexpected error mid-send): back to
        queued, the attempt stays charged and counts as interrupted. Returns how many."""
        wanted = list(dict.fromkeys(int(i) for i in item_ids))

        def body(conn: sqlite3.Connection) -> int:
            n = 0
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                n += conn.execute(
                    "UPDATE items SET state = ?, updated_at = ?, claimed_by = NULL, in_flight = 0, "
                    f"interrupted_sends = interrupted_sends + 1, last_error = ? WHERE id IN ({marks}) "
                    "AND state = ? AND in_flight = 1 AND claimed_by = ?",
                    (S.QUEUED.value, now, reason, *chunk, S.SENDING.value, self.owner),
                ).rowcount
            return n

        return self._commit(body) if wanted else 0

    def mark_sent(self, item_ids: Sequence[int], now: float) -> None:
        """The peer stored them. Committed without an fsync: a power cut may lose the mark, and
        then the item is sent again under the same UIDs (the PACS keeps one copy); everything
        after it that frees a payload (`mark_committed`, purge) is durable and makes it so."""
        self._transition("mark_sent", item_ids, now, _sent_sets(now), durable=False)

    def mark_transient_failure(
        self, item_id: int, error: str, now: float, retry_after: float | None = None
    ) -> OutboxItem:
        """Back to queued with one more attempt and a backoff (at least `retry_after` seconds)."""
        # when: with the link or alone (lastmile.services.metered.failed_by)
        self._charge_and_queue("transient_failure", [item_id], error, now, retry_after, extra={"failed_at": now})
        item = self.get(item_id)
        if item is None:
            raise LookupError(f"outbox item {item_id} does not exist")
        return item

    def _charge_and_queue(
        self,
        op: str,
        item_ids: Sequence[int],
        error: str,
        now: float,
        retry_after: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """One more attempt (unless `begin_send` charged it already) and the backoff it earns,
        read and written in one transaction."""
        sources, target = TRANSITIONS[op]

        def body(conn: sqlite3.Connection) -> list[int]:
            skipped: list[int] = []
            for item_id in dict.fromkeys(int(i) for i in item_ids):
                row = conn.execute("SELECT attempts, state, in_flight FROM items WHERE id = ?", (item_id,)).fetchone()
                if row is None or ItemState(row[1]) not in sources:
                    skipped.append(item_id)
                    continue
                attempts = row[0] + (0 if row[2] else 1)
                delay = backoff_delay(attempts, self.backoff_base_s, self.backoff_max_s, self._rng)
                if retry_after is not None:
                    delay = max(delay, float(retry_after))
                sets = {
                    "state": target.value,
                    "updated_at": now,
                    "attempts": attempts,
                    "next_attempt_at": now + delay,
                    "last_error": error,
                    "claimed_by": None,
                    "in_flight": 0,
                    "interrupted_sends": 0,  # an outcome came back: this object did not kill us
                    **(extra or {}),
                }
                assignments = ", ".join(f"{c} = {v}" if isinstance(v, _Sql) else f"{c} = ?" for c, v in sets.items())
                values = [v for v in sets.values() if not isinstance(v, _Sql)]
                conn.execute(f"UPDATE items SET {assignments} WHERE id = ?", [*values, item_id])
            return skipped

        skipped = self._commit(body)
        if skipped:
            log.warning(
                "%s: item(s) %s not in state %s, left unchanged",
                op,
                skipped,
                "/".join(sorted(s.value for s in sources)),
            )

    def release(self, item_ids: Sequence[int], error: str, now: float, delay_s: float) -> None:
        """Back to queued without charging an attempt (the fault was not the item's). Not
        fsynced: a release a power cut undoes leaves them claimed by a dead owner, and the next
        open puts them back the same way."""
        self._transition(
            "release",
            item_ids,
            now,
            {
                "next_attempt_at": now + delay_s,
                "last_error": error,
                "claimed_by": None,
                "attempts": _Sql("attempts - in_flight"),
                "in_flight": 0,
            },
            durable=False,
        )

    def quarantine(self, item_id: int, reason: str, now: float) -> None:
        self._transition("quarantine", [item_id], now, _quarantined(reason, now))

    def set_transaction(self, item_ids: Sequence[int], transaction_uid: str, now: float) -> None:
        """Storage commitment was asked for these sent items under `transaction_uid`: recorded
        with the item, and remembered with the last few asked for it (a late report for an
        earlier transaction still counts)."""
        wanted = list(dict.fromkeys(int(i) for i in item_ids))

        def body(conn: sqlite3.Connection) -> list[int]:
            moved: list[int] = []
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                moved += [
                    r[0]
                    for r in conn.execute(
                        f"UPDATE items SET transaction_uid = ?, updated_at = ? WHERE id IN ({marks}) AND state = ? "
                        "RETURNING id",
                        (transaction_uid, now, *chunk, S.SENT.value),
                    )
                ]
            for item_id in moved:
                _remember_request(conn, transaction_uid, item_id, now)
            return moved

        moved = self._commit(body) if wanted else []
        skipped = sorted(set(wanted) - set(moved))
        if skipped:  # e.g. the PACS's report came before we got here: already committed
            log.info("set_transaction: item(s) %s no longer just sent, left as they are", skipped)

    def remember_commitment_request(self, item_ids: Sequence[int], transaction_uid: str, now: float) -> None:
        """Before the N-ACTION goes out: a PACS may send its report (on another association) before
        the N-ACTION's response reaches us, and a report is believed only for a transaction this
        outbox knows it issued. `set_transaction` marks the items once the request was accepted."""
        wanted = list(dict.fromkeys(int(i) for i in item_ids))

        def body(conn: sqlite3.Connection) -> None:
            for item_id in wanted:
                _remember_request(conn, transaction_uid, item_id, now)

        if wanted:
            self._commit(body)

    def commitment_request(self, transaction_uid: str) -> list[OutboxItem]:
        """The items storage commitment was asked for under `transaction_uid` (in any state
        now); empty if this outbox never issued that transaction (or its items are purged)."""
        cols = ", ".join(f"i.{c.strip()}" for c in _ITEM_COLUMNS.split(","))
        return [
            _item(r)
            for r in self._read(
                f"SELECT {cols} FROM commitment_requests c JOIN items i ON i.id = c.item_id "
                "WHERE c.transaction_uid = ? ORDER BY i.id",
                (transaction_uid,),
            )
        ]

    def mark_committed(self, item_ids: Sequence[int], now: float) -> None:
        self._transition("mark_committed", item_ids, now, {"committed_at": now})

    def mark_taken(self, item_ids: Sequence[int], now: float) -> None:
        """The peer took them and its answer is its commitment (the county platform's
        transaction-response; a reading relayed into its bundle): sent and committed in ONE
        durable transaction. As two (`mark_sent`, then `mark_committed`), another process's write
        lock refusing the second left them "sent" for ever: never purged, never sent again."""
        sets = {"sent_at": now, "committed_at": now, "last_error": None, "claimed_by": None, "in_flight": 0}
        self._transition("mark_taken", item_ids, now, {**sets, "interrupted_sends": 0})

    def requeue(self, item_ids: Sequence[int], reason: str, now: float) -> None:
        """Sent but not kept by the peer (commitment failed): send again, after a backoff so a
        peer that keeps failing is not hammered; charged as an attempt and counted as a
        commitment failure (`OutboxItem.commitment_failures`)."""
        extra = {"transaction_uid": None, "commitment_failures": _Sql("commitment_failures + 1")}
        self._charge_and_queue("requeue", item_ids, reason, now, extra=extra)

    def reask_commitment(self, item_ids: Sequence[int], reason: str, now: float) -> None:
        """The peer failed the commitment transaction, not the object (e.g. a duplicate
        transaction UID): ask again under a new transaction, without sending the object again;
        counted as a commitment failure."""
        self._transition(
            "reask_commitment",
            item_ids,
            now,
            {"transaction_uid": None, "last_error": reason, "commitment_failures": _Sql("commitment_failures + 1")},
        )

    # -- holds ------------------------------------------------------------------------------------
    def held_items(self, now: float, *, kind: str | None = None, reason: str | None = None) -> list[OutboxItem]:
        """Queued items still held at `now` (oldest first)."""
        sql = f"SELECT {_ITEM_COLUMNS} FROM items WHERE state = ? AND hold_until > ?"
        params: list[Any] = [S.QUEUED.value, now]
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        if reason is not None:
            sql += " AND hold_reason = ?"
            params.append(reason)
        return [_item(r) for r in self._read(sql + " ORDER BY id", params)]

    def release_hold(self, item_id: int, now: float) -> bool:
        """Let a held item go now; False if it is not a queued item."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE items SET hold_until = NULL, updated_at = ? WHERE id = ? AND state = ?",
                (now, item_id, S.QUEUED.value),
            )
        return cur.rowcount == 1

    def replace_held_payload(
        self,
        item_id: int,
        payload: bytes,
        now: float,
        *,
        meta: dict[str, Any] | None = None,
        patient: dict[str, Any] | None = None,
        hold: Hold | None = None,
        replacing_sha256: str | None = None,
    ) -> bool:
        """Swap the payload (and meta/patient) of an item that was never attempted and is still
        queued, e.g. an ECG rebuilt under its own UIDs once its patient is known, and set its hold
        (None: release it). False, and nothing changed, if the item was claimed or tried meanwhile:
        what went out cannot be taken back - or, with `replacing_sha256`, if its payload is no
        longer that one (someone else replaced it since it was read)."""
        payload = bytes(payload)
        self._check_space(len(payload))
        digest = hashlib.sha256(payload).hexdigest()
        inline = len(payload) <= self.inline_max_bytes
        writing = contextlib.nullcontext() if inline else self._files.writing()
        old_file: str | None = None
        replaced = False
        with writing:
            name = None if inline else self._files.write(payload)
            try:
                with self._write() as conn:
                    row = conn.execute(
                        "SELECT payload_file, sha256 FROM items WHERE id = ? AND state = ? AND attempts = 0",
                        (item_id, S.QUEUED.value),
                    ).fetchone()
                    if row is not None and replacing_sha256 not in (None, row[1]):
                        row = None
                    if row is not None:
                        old_file = row[0]
                        sets: dict[str, Any] = {
                            "sha256": digest,
                            "size": len(payload),
                            "payload_file": name,
                            "updated_at": now,
                            "hold_until": None if hold is None else float(hold.until),
                            "hold_reason": None if hold is None else hold.reason,
                        }
                        if meta is not None:
                            sets["meta"] = _json(meta)
                        if patient is not None:
                            sets["patient"] = _json(patient)
                        conn.execute(
                            f"UPDATE items SET {', '.join(f'{c} = ?' for c in sets)} WHERE id = ?",
                            [*sets.values(), item_id],
                        )
                        conn.execute("DELETE FROM payloads WHERE item_id = ?", (item_id,))
                        if inline:
                            conn.execute("INSERT INTO payloads (item_id, data) VALUES (?, ?)", (item_id, payload))
                        replaced = True
            except BaseException:
                if name:
                    self._files.delete(name)
                raise
            if not replaced and name:
                self._files.delete(name)
        if replaced and old_file and old_file != name:
            self._files.delete(old_file)  # after the commit: a crash leaves an orphan, removed at open
        return replaced

    # -- operator actions -------------------------------------------------------------------------
    def retry(self, item_id: int, now: float) -> bool:
        """Quarantined -> queued, attempts reset; False if the item is not quarantined."""
        return bool(
            self._transition(
                "retry",
                [item_id],
                now,
                {
                    "attempts": 0,
                    "next_attempt_at": now,
                    "quarantine_reason": None,
                    "quarantined_at": None,
                    "commitment_failures": 0,
                },
            )
        )

    def retry_quarantined(self, now: float) -> int:
        ids = [r[0] for r in self._read("SELECT id FROM items WHERE state = ?", (S.QUARANTINED.value,))]
        return (
            len(
                self._transition(
                    "retry",
                    ids,
                    now,
                    {
                        "attempts": 0,
                        "next_attempt_at": now,
                        "quarantine_reason": None,
                        "quarantined_at": None,
                        "commitment_failures": 0,
                    },
                )
            )
            if ids
            else 0
        )

    # -- purging ----------------------------------------------------------------------------------
    def purge_due(self, now: float, retention_s: float) -> int:
        """Committed items older than `retention_s`: payload deleted, patient and meta NULL
        (secure_delete zeroes the old bytes), WAL checkpointed so no old copy stays there (a
        checkpoint a full disk or a reader put off is done by the next call, due items or not).
        A few items per transaction: zeroing an inline payload writes its pages to the WAL, and
        on a full disk one transaction must fit in the room the reserve gave back."""
        cutoff = now - retention_s

        def body(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            rows = conn.execute(
                "SELECT id, payload_file FROM items WHERE state = ? AND committed_at <= ? ORDER BY id LIMIT ?",
                (S.COMMITTED.value, cutoff, PURGE_CHUNK),
            ).fetchall()
            ids = [r[0] for r in rows]
            marks = ",".join("?" * len(ids))
            if ids:
                conn.execute(f"DELETE FROM payloads WHERE item_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM commitment_requests WHERE item_id IN ({marks})", ids)
                conn.execute(
                    f"UPDATE items SET state = ?, updated_at = ?, patient = NULL, meta = NULL, "
                    f"payload_file = NULL, claimed_by = NULL WHERE id IN ({marks}) AND state = ?",
                    [S.PURGED.value, now, *ids, S.COMMITTED.value],
                )
            return rows

        purged = 0
        while True:
            rows = self._commit(body)
            # after the commit: a crash between leaves orphan files, which the next open removes
            for _id, name in rows:
                if name:
                    self._files.delete(name)
            purged += len(rows)
            if len(rows) < PURGE_CHUNK:
                break
        if purged or self._checkpoint_owed:
            self.checkpoint()
        if purged:
            log.info("purged %d committed item(s)", purged)
            self.ensure_reserve()
        return purged

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and truncate it; False if readers kept it busy (or
        the disk is too full for it now: the next purge tries again)."""
        try:
            with self._busy_timeout(CHECKPOINT_WAIT_MS):
                busy, _log, _done = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            log.warning("WAL checkpoint failed on a full disk; retried next purge")
            self._checkpoint_owed = True
            return False
        if busy:
            log.info("WAL checkpoint incomplete: another connection is reading; retried next purge")
        self._checkpoint_owed = bool(busy)
        return not busy

    # -- crash recovery ---------------------------------------------------------------------------
    def recover_interrupted(self, now: float | None = None) -> int:
        """Items left in `sending` by an owner that is gone (killed, crashed, closed) go back to
        queued. A claim whose bytes had not started to go out is not charged; a send cut short is
        charged and counted as interrupted, unless its owner died with an earlier boot (a power
        cut or reboot: the attempt is given back) or closed leaving a mark that it could not give
        its claims back (a stop: its sends had ended, none killed it; given back as `close`
        would have). What a gone owner's peer stored and it could not record is recorded as sent
        first (`remember_stored`). Claims of a live process are left alone."""
        now = time.time() if now is None else now
        self._record_stored_by_the_dead(now)
        owners = {r[0] for r in self._read("SELECT DISTINCT claimed_by FROM items WHERE state = ?", (S.SENDING.value,))}
        dead = [o for o in owners if o is None or (o != self.owner and not OwnerLock.is_alive(self._locks_dir, o))]
        recovered = 0

        def body(conn: sqlite3.Connection, *, owner: str | None) -> int:
            # An owner that went down with an earlier boot was cut by the gateway losing power or
            # rebooting, not by its object: the attempt is given back. Killed in this boot (or a
            # token that does not say): the attempt stays charged and counts as interrupted.
            power_cut = owner is not None and boot_of(owner) not in ("", current_boot())
            cut = conn.execute(
                "UPDATE items SET state = :queued, claimed_by = NULL, updated_at = :now, in_flight = 0, "
                "attempts = CASE WHEN :power_cut THEN MAX(0, attempts - 1) ELSE attempts END, "
                "interrupted_sends = interrupted_sends + CASE WHEN :power_cut THEN 0 ELSE 1 END, "
                "last_error = CASE WHEN :power_cut "
                "  THEN 'the gateway went down (power cut or reboot) during the send; queued again' "
                "  ELSE 'the sending process died during the send; queued again' END "
                "WHERE state = :sending AND claimed_by IS :owner AND in_flight = 1",
                {
                    "queued": S.QUEUED.value,
                    "now": now,
                    "power_cut": power_cut,
                    "sending": S.SENDING.value,
                    "owner": owner,
                },
            ).rowcount
            waiting = conn.execute(
                "UPDATE items SET state = ?, claimed_by = NULL, updated_at = ?, "
                "last_error = 'interrupted while sending (process stopped); queued again' "
                "WHERE state = ? AND claimed_by IS ?",
                (S.QUEUED.value, now, S.SENDING.value, owner),
            ).rowcount
            if cut:
                log.warning(
                    "%d send(s) cut short by %s",
                    cut,
                    "the gateway going down: not charged" if power_cut else "a dead process: charged and counted",
                )
            return int(cut + waiting)

        for owner in dead:
            if owner is not None and OwnerLock.left_claims(self._locks_dir, owner):
                # it closed (stopped), its sends ended: what it could not give back is given back
                # now, as it would have - not charged as a process that died mid-send
                recovered += self._commit(
                    functools.partial(_give_back_claims, owner=owner, now=now, error=STOPPED_UNRELEASED)
                )
                OwnerLock.forget_left_claims(self._locks_dir, owner)
            else:
                recovered += self._commit(functools.partial(body, owner=owner))
        self._remove_stale_owner_locks()
        return recovered

    def _record_stored_by_the_dead(self, now: float) -> None:
        """First: what a gone owner's peer stored and it could not record (`remember_stored`) is
        recorded as sent, not given back to the queue to be sent again."""
        for token in OwnerLock.tokens_that_stored(self._locks_dir):
            if token == self.owner or OwnerLock.is_alive(self._locks_dir, token):
                continue
            note = OwnerLock.stored_file(self._locks_dir, token)  # one from its reading to its forgetting
            items = OwnerLock.stored_by(note)
            recorded = self._commit(functools.partial(_record_stored_of, owner=token, items=items, now=now))
            note.forget()
            if recorded:
                log.warning(
                    "%d item(s) the peer stored before the last stop recorded as sent, not sent again", recorded
                )

    def _remove_stale_owner_locks(self) -> None:
        for path in self._locks_dir.glob("owner-*.lock"):
            token = OwnerLock.token_of(path)
            if token and token != self.owner:
                OwnerLock.is_alive(self._locks_dir, token)  # removes the file when nobody holds it
        for token in OwnerLock.tokens_that_left_claims(self._locks_dir):
            # a mark whose claims are gone (recovered, and this process died before removing it)
            if not OwnerLock.is_alive(self._locks_dir, token) and not self._claims_of(token):
                OwnerLock.forget_left_claims(self._locks_dir, token)

    def _quarantine_lost_payloads(self, now: float) -> None:
        """A queued item whose payload is gone can never be sent: say so now, not at send time."""
        rows = self._read(
            "SELECT i.id, i.payload_file, p.item_id IS NOT NULL FROM items i "
            "LEFT JOIN payloads p ON p.item_id = i.id WHERE i.state = ?",
            (S.QUEUED.value,),
        )
        present = self._files.names()
        for item_id, name, inline_present in rows:
            if name is not None and name not in present:
                reason = f"payload file {PAYLOAD_DIR}/{name} was lost before it was sent"
            elif name is None and not inline_present:
                reason = "payload in the database was lost before it was sent"
            else:
                continue
            if self._commit(
                functools.partial(self._quarantine_if_lost, item_id=item_id, name=name, reason=reason, now=now)
            ):
                log.error("outbox item %d quarantined at open: %s", item_id, reason)

    def _quarantine_if_lost(
        self, conn: sqlite3.Connection, *, item_id: int, name: str | None, reason: str, now: float
    ) -> bool:
        """(In a write transaction.) Quarantine the item only if it still names the payload seen
        missing and it is still missing: the rows were read before the files were listed, and
        another process may have replaced a held item's payload in between (`replace_held_payload`
        commits the new file's name, then deletes the old file) - that item is not lost."""
        row = conn.execute(
            "SELECT i.payload_file, p.item_id IS NOT NULL FROM items i LEFT JOIN payloads p ON p.item_id = i.id "
            "WHERE i.id = ? AND i.state = ?",
            (item_id, S.QUEUED.value),
        ).fetchone()
        if row is None or row[0] != name:
            return False
        if (name is not None and self._files.path(name).exists()) or (name is None and row[1]):
            return False
        return bool(_move(conn, "quarantine", [item_id], now, _quarantined(reason, now)))

    # -- health -----------------------------------------------------------------------------------
    def record_status(self, name: str, value: dict[str, Any], now: float) -> None:
        encoded = json.dumps(value, sort_keys=True, default=str)
        self._commit(
            lambda conn: conn.execute(
                "INSERT INTO status (name, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (name, encoded, now),
            )
        )

    def status(self, name: str) -> dict[str, Any] | None:
        rows = self._read("SELECT value FROM status WHERE name = ?", (name,))
        return json.loads(rows[0][0]) if rows else None

    def stats(self, now: float) -> dict[str, Any]:
        return _stats(self._read, self.data_dir, self._statvfs, now)

    def present_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of `keys` the outbox holds, in one query per _CHUNK keys: a page listing many
        rows asks once, not once per row (the console's Today page is rendered every few seconds)."""
        unique = list(dict.fromkeys(keys))
        found: set[str] = set()
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self._read(f"SELECT key FROM items WHERE key IN ({marks})", chunk))
        return found


def snapshot_stats(
    data_dir: Path, now: float, *, read_more: Callable[[sqlite3.Connection], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`Outbox.stats` read without writing anything (no recovery, no reserve, no -shm created
    where SQLite can use the existing one): for `lastmile queue` when the data partition is too
    full for the outbox to open. `read_more`: what the caller reads of the same snapshot, added
    (a rule of its own, e.g. what waits for the link). FileNotFoundError if there is no outbox."""
    db_path = Path(data_dir) / DB_NAME
    if not db_path.exists():
        raise FileNotFoundError(db_path)
    try:
        conn = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute("SELECT 1 FROM items LIMIT 1").fetchall()
    except sqlite3.OperationalError:  # no -shm and no room to make one: the file as it is on disk
        conn = sqlite3.connect(f"{db_path.as_uri()}?immutable=1", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        stats = _stats(lambda sql, params=(): conn.execute(sql, params).fetchall(), Path(data_dir), os.statvfs, now)
        return stats if read_more is None else stats | read_more(conn)
    finally:
        conn.close()


def _stats(
    read: Callable[..., list[sqlite3.Row]], data_dir: Path, statvfs: Callable[[Any], os.statvfs_result], now: float
) -> dict[str, Any]:
    counts = {s.value: 0 for s in ItemState}
    for state, n in read("SELECT state, COUNT(*) FROM items GROUP BY state"):
        counts[state] = n
    # how long items have waited is not said here: which holds are the doctor's (and wait for him,
    # not the link) is the application's rule (lastmile.ecg.holds.oldest_waiting)
    last_sent, last_committed, waiting_bytes = read(
        "SELECT MAX(sent_at), MAX(committed_at), "
        "COALESCE(SUM(CASE WHEN state IN ('queued', 'sending', 'sent') THEN size END), 0) "
        "FROM items"
    )[0]
    quarantined = [
        {
            "id": r["id"],
            "kind": r["kind"],
            "key": r["key"],
            "reason": r["quarantine_reason"],
            "at": r["quarantined_at"],
        }
        for r in read(
            "SELECT id, kind, key, quarantine_reason, quarantined_at FROM items WHERE state = ? ORDER BY id",
            (S.QUARANTINED.value,),
        )
    ]
    statuses = {r[0]: json.loads(r[1]) for r in read("SELECT name, value FROM status ORDER BY name")}
    held = read("SELECT COUNT(*) FROM items WHERE state = ? AND hold_until > ?", (S.QUEUED.value, now))[0][0]
    try:
        st = statvfs(data_dir)
        free_bytes: int | None = st.f_bavail * st.f_frsize
    except OSError:
        free_bytes = None
    return {
        "counts": counts,
        "held": held,  # of the queued: held back (e.g. for the doctor to assign a patient)
        "last_sent_at": last_sent,
        "last_committed_at": last_committed,
        "quarantined": quarantined,
        "statuses": statuses,
        "waiting_bytes": waiting_bytes,
        "free_bytes": free_bytes,
    }
