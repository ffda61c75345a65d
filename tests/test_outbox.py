"""The durable outbox: transitions, idempotency, ordering, concurrency, corruption, full disk,
crashes (SIGKILL) and secure purge. Real SQLite files and real processes, no mocks of the store."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest

import uploader.outbox as outbox_module
import uploader.payload_files as payload_files
from tests.conftest import REPO, run_python
from uploader.errors import CorruptPayloadError, OutboxFullError
from uploader.outbox import (
    DB_NAME,
    DEFAULT_MAX_INTERRUPTED_SENDS,
    PAYLOAD_DIR,
    TRANSITIONS,
    AddResult,
    Hold,
    ItemState,
    Outbox,
    OutboxItem,
    PayloadGoneError,
    Priority,
    backoff_delay,
    boot_of,
    current_boot,
)
from uploader.sqlite_store import MIGRATIONS, Migration, applied_migrations, migrate

S = ItemState
T0 = 1_700_000_000.0
PATIENT_NAME = "ZYXWVUT^QUENTIN"  # a string that appears nowhere else
ECG_SIZE = 124 * 1024


def ecg_bytes(seed: int = 0, size: int = ECG_SIZE) -> bytes:
    """A DICOM-sized payload that carries the patient's name, like a real ECG object."""
    body = random.Random(seed).randbytes(size)
    return PATIENT_NAME.encode() + body[len(PATIENT_NAME) :]


SMALL = b'{"resourceType": "Observation", "valueQuantity": {"value": 37.2, "unit": "Cel"}}' * 12

# Both payload placements: "file" (above inline_max_bytes) and "inline" (in the database).
STORAGES = {"file": -1, "inline": 1 << 30}

Vfs = namedtuple("Vfs", "f_bavail f_frsize")


def open_outbox(data_dir: Path, **kw) -> Outbox:
    kw.setdefault("min_free_bytes", 0)
    kw.setdefault("rng", random.Random(7))
    return Outbox.open(data_dir, now=T0, **kw)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(params=sorted(STORAGES))
def storage(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def ob(data_dir: Path, storage: str):
    with open_outbox(data_dir, inline_max_bytes=STORAGES[storage]) as outbox:
        yield outbox


def add(
    ob: Outbox,
    key: str,
    *,
    payload: bytes | None = None,
    kind: str = "dicom",
    priority: Priority = Priority.ROUTINE,
    now: float = T0,
) -> OutboxItem:
    result = ob.add(
        kind,
        key,
        payload if payload is not None else ecg_bytes(hash(key) % 1000),
        priority=priority,
        meta={"sop_instance_uid": f"1.2.826.0.1.{abs(hash(key))}"},
        patient={"name": PATIENT_NAME, "id": "P-001"},
        now=now,
    )
    assert result.created
    return result.item


def payload_files_of(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / PAYLOAD_DIR).iterdir() if p.name != ".lock"}


def raw_db(data_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(data_dir / DB_NAME, isolation_level=None, timeout=15)
    conn.execute("PRAGMA busy_timeout=15000")
    return conn


# -- schema ---------------------------------------------------------------------------------------
def test_migrations_are_recorded_applied_once_and_wal_is_on(data_dir: Path) -> None:
    with open_outbox(data_dir) as ob:
        assert applied_migrations(ob.db) == [m.name for m in MIGRATIONS]
        assert migrate(ob.db) == []  # idempotent while open
        assert ob.db.journal_mode == "wal"
        assert ob.db.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert ob.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
        assert {"items", "payloads", "status", "migrations"} <= set(ob.db.table_names())
    with open_outbox(data_dir) as ob:  # re-open: nothing applied again
        assert applied_migrations(ob.db) == [m.name for m in MIGRATIONS]
        assert ob.db.execute("SELECT COUNT(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)


OPENER_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from uploader.outbox import Outbox
    print("ready", flush=True)
    sys.stdin.readline()  # all go at once
    with Outbox.open(Path(sys.argv[1]), min_free_bytes=0) as ob:
        ob.add("dicom", sys.argv[2], b"x", now=1.0)
""")


def test_processes_opening_a_new_outbox_at_once_migrate_it_once(data_dir: Path) -> None:
    procs = release_together([python(OPENER_SCRIPT, data_dir, f"k{i}") for i in range(3)])
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    with open_outbox(data_dir) as ob:
        assert ob.db.execute("SELECT COUNT(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)
        assert sorted(i.key for i in ob.items()) == ["k0", "k1", "k2"]


def test_a_failing_migration_leaves_nothing_behind(data_dir: Path) -> None:
    with open_outbox(data_dir) as ob:

        def half_done(db) -> None:
            db["half"].create({"x": int})
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            migrate(ob.db, (*MIGRATIONS, Migration("0099_half", half_done)))
        assert "half" not in ob.db.table_names()
        assert "0099_half" not in applied_migrations(ob.db)
        assert ob.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# -- adding ---------------------------------------------------------------------------------------
def test_add_stores_every_field_and_the_payload(ob: Outbox, storage: str) -> None:
    payload = ecg_bytes(1)
    result = ob.add(
        "dicom",
        "cart-7/ecg-1",
        payload,
        priority=Priority.STAT,
        meta={"sop_class_uid": "1.2.840.10008.5.1.4.1.1.9.1.1", "sop_instance_uid": "1.2.3"},
        patient={"name": PATIENT_NAME},
        now=T0,
    )
    assert isinstance(result, AddResult) and result.created
    item = result.item
    assert (item.kind, item.key, item.priority, item.state) == ("dicom", "cart-7/ecg-1", Priority.STAT, S.QUEUED)
    assert (item.attempts, item.next_attempt_at, item.created_at, item.updated_at) == (0, T0, T0, T0)
    assert item.sha256 == hashlib.sha256(payload).hexdigest() and item.size == len(payload)
    assert item.meta["sop_instance_uid"] == "1.2.3" and item.patient == {"name": PATIENT_NAME}
    assert (item.sent_at, item.committed_at, item.transaction_uid, item.last_error, item.quarantine_reason) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert ob.read_payload(item) == payload
    assert ob.get(item.id) == item == ob.find("cart-7/ecg-1")
    path = ob.payload_path(item)
    if storage == "file":
        assert path is not None and path.read_bytes() == payload
        assert path.stat().st_mode & 0o777 == 0o600
    else:
        assert path is None and payload_files_of(ob.data_dir) == set()


def test_default_placement_files_for_ecgs_database_for_small_items(data_dir: Path) -> None:
    with open_outbox(data_dir) as ob:
        ecg = add(ob, "ecg", payload=ecg_bytes())
        obs = add(ob, "obs", payload=SMALL, kind="observation")
        assert ob.payload_path(ecg) is not None and ob.payload_path(obs) is None
        assert ob.read_payload(obs) == SMALL


def test_add_with_an_existing_key_returns_it_and_writes_nothing(ob: Outbox) -> None:
    first = add(ob, "k")
    files_before = payload_files_of(ob.data_dir)
    changes_before = ob.db.conn.total_changes
    again = ob.add("dicom", "k", b"different bytes", priority=Priority.STAT, now=T0 + 5)
    assert again == AddResult(first, created=False)
    assert ob.db.conn.total_changes == changes_before
    assert payload_files_of(ob.data_dir) == files_before
    assert ob.read_payload(first) == ecg_bytes(hash("k") % 1000)


def test_items_get_find_filters(ob: Outbox) -> None:
    a = add(ob, "a")
    b = add(ob, "b", kind="observation", payload=SMALL)
    add(ob, "c")
    ob.claim("dicom", 1, T0)
    assert [i.key for i in ob.items()] == ["a", "b", "c"]
    assert [i.key for i in ob.items(kind="dicom")] == ["a", "c"]
    assert [i.key for i in ob.items(state=S.SENDING)] == ["a"]
    assert [i.key for i in ob.items(state=S.QUEUED, limit=1)] == ["b"]
    assert ob.get(999) is None and ob.find("nope") is None
    assert ob.get(b.id).kind == "observation" and ob.get(a.id).state == S.SENDING


# -- claiming -------------------------------------------------------------------------------------
def test_claim_takes_stat_first_then_oldest_only_due_and_of_its_kind(ob: Outbox) -> None:
    old = add(ob, "old", now=T0)
    newer = add(ob, "newer", now=T0 + 1)
    stat = add(ob, "stat", priority=Priority.STAT, now=T0 + 2)
    add(ob, "fhir", kind="fhir-bundle", payload=SMALL, now=T0 - 10)
    later = add(ob, "not-due", now=T0 + 3)
    ob.claim("dicom", 10, T0 + 3)
    ob.mark_transient_failure(later.id, "x", T0 + 3)  # now due only after its backoff
    ob.release([old.id, newer.id, stat.id], "put back", T0 + 3, 0.0)

    claimed = ob.claim("dicom", 2, T0 + 4)
    assert [i.key for i in claimed] == ["stat", "old"]
    assert all(i.state == S.SENDING and i.updated_at == T0 + 4 for i in claimed)
    assert [i.key for i in ob.claim("dicom", 10, T0 + 4)] == ["newer"]
    assert ob.claim("dicom", 10, T0 + 4) == []  # "not-due" waits for its backoff
    assert [i.key for i in ob.claim("fhir-bundle", 10, T0 + 4)] == ["fhir"]
    assert ob.claim("dicom", 0, T0 + 4) == []


# -- every transition, from every state -----------------------------------------------------------
def drive_to(ob: Outbox, key: str, state: ItemState) -> OutboxItem:
    """A fresh item brought to `state` through the public API."""
    item = add(ob, key)
    if state == S.QUARANTINED:
        ob.quarantine(item.id, "test", T0)
    if state in (S.SENDING, S.SENT, S.COMMITTED, S.PURGED):
        assert [i.id for i in ob.claim("dicom", 10, T0)] == [item.id]
    if state in (S.SENT, S.COMMITTED, S.PURGED):
        ob.mark_sent([item.id], T0)
    if state in (S.COMMITTED, S.PURGED):
        ob.mark_committed([item.id], T0)
    if state == S.PURGED:
        assert ob.purge_due(T0, 0.0) == 1
    driven = ob.get(item.id)
    assert driven.state == state
    return driven


OPS = {
    "mark_sent": lambda ob, i: ob.mark_sent([i], T0 + 1),
    "transient_failure": lambda ob, i: ob.mark_transient_failure(i, "timeout", T0 + 1),
    "release": lambda ob, i: ob.release([i], "fault", T0 + 1, 60.0),
    "quarantine": lambda ob, i: ob.quarantine(i, "bad", T0 + 1),
    "set_transaction": lambda ob, i: ob.set_transaction([i], "1.2.3.4", T0 + 1),
    "mark_committed": lambda ob, i: ob.mark_committed([i], T0 + 1),
    "mark_taken": lambda ob, i: ob.mark_taken([i], T0 + 1),
    "requeue": lambda ob, i: ob.requeue([i], "commitment failed", T0 + 1),
    "reask_commitment": lambda ob, i: ob.reask_commitment([i], "duplicate transaction UID", T0 + 1),
    "retry": lambda ob, i: ob.retry(i, T0 + 1),
    "purge": lambda ob, i: ob.purge_due(T0 + 1, 0.0),
    "claim": lambda ob, i: ob.claim("dicom", 10, T0 + 1),
    "begin_send": lambda ob, i: ob.begin_send(i, T0 + 1),
}


def test_every_operation_is_tested() -> None:
    assert set(OPS) == set(TRANSITIONS) - {"recover"}


@pytest.mark.parametrize("state", list(ItemState), ids=lambda s: s.value)
@pytest.mark.parametrize("op", sorted(OPS))
def test_each_operation_moves_only_items_in_its_source_states(data_dir: Path, op: str, state: ItemState) -> None:
    sources, target = TRANSITIONS[op]
    with open_outbox(data_dir, inline_max_bytes=-1) as ob:
        before = drive_to(ob, "x", state)
        OPS[op](ob, before.id)
        after = ob.get(before.id)
        if state in sources:
            assert (after.state, after.updated_at) == (target, T0 + 1)
        else:
            assert after == before, f"{op} changed an item in state {state.value}"


def test_full_life_of_an_item(ob: Outbox, storage: str) -> None:
    item = add(ob, "life")
    (claimed,) = ob.claim("dicom", 5, T0 + 1)
    assert claimed.state == S.SENDING
    assert ob.read_payload(claimed) == ecg_bytes(hash("life") % 1000)
    ob.mark_sent([item.id], T0 + 2)
    sent = ob.get(item.id)
    assert (sent.state, sent.sent_at, sent.last_error) == (S.SENT, T0 + 2, None)
    assert ob.awaiting_commitment("dicom") == [sent]
    assert ob.awaiting_commitment("fhir-bundle") == []
    ob.set_transaction([item.id], "2.25.1", T0 + 3)
    asked = ob.get(item.id)
    assert (asked.state, asked.transaction_uid, asked.updated_at) == (S.SENT, "2.25.1", T0 + 3)
    ob.mark_committed([item.id], T0 + 4)
    committed = ob.get(item.id)
    assert (committed.state, committed.committed_at) == (S.COMMITTED, T0 + 4)
    assert ob.awaiting_commitment("dicom") == []
    assert ob.purge_due(T0 + 50, retention_s=100) == 0  # kept for the retention period
    assert ob.purge_due(T0 + 104, retention_s=100) == 1
    purged = ob.get(item.id)
    assert (purged.state, purged.patient, purged.meta, purged.sha256) == (S.PURGED, None, {}, item.sha256)
    assert ob.payload_path(purged) is None and payload_files_of(ob.data_dir) == set()
    with pytest.raises(PayloadGoneError):
        ob.read_payload(purged)
    stats = ob.stats(T0 + 104)
    assert stats["counts"]["purged"] == 1 and stats["last_sent_at"] == T0 + 2
    assert stats["last_committed_at"] == T0 + 4


def test_requeue_after_failed_commitment_sends_again_with_backoff(ob: Outbox) -> None:
    item = add(ob, "r")
    ob.claim("dicom", 1, T0)
    ob.mark_sent([item.id], T0)
    ob.set_transaction([item.id], "2.25.9", T0)
    ob.requeue([item.id], "storage commitment failed (0x0112)", T0 + 10)
    again = ob.get(item.id)
    assert (again.state, again.transaction_uid, again.attempts) == (S.QUEUED, None, 1)
    assert again.last_error == "storage commitment failed (0x0112)"
    assert T0 + 10 + 2.5 <= again.next_attempt_at <= T0 + 10 + 5.0
    assert ob.claim("dicom", 1, T0 + 16)[0].id == item.id


# -- backoff ----------------------------------------------------------------------------------------
def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(3)
    for attempts in range(1, 30):
        ceiling = min(900.0, 5.0 * 2 ** (attempts - 1))
        for _ in range(20):
            assert ceiling / 2 <= backoff_delay(attempts, 5.0, 900.0, rng) <= ceiling
    delays = {round(backoff_delay(4, 5.0, 900.0, random.Random(seed)), 6) for seed in range(20)}
    assert len(delays) > 15  # jitter: gateways that failed together do not retry together
    assert backoff_delay(10_000, 5.0, 900.0, rng) <= 900.0  # no overflow
    assert backoff_delay(3, 5.0, 900.0, random.Random(1)) == backoff_delay(3, 5.0, 900.0, random.Random(1))


def test_transient_failure_charges_an_attempt_and_backs_off(data_dir: Path) -> None:
    with open_outbox(data_dir, backoff_base_s=5.0, backoff_max_s=60.0, rng=random.Random(11)) as ob:
        item = add(ob, "t")
        now = T0
        for attempt in range(1, 8):
            (claimed,) = ob.claim("dicom", 1, now)
            failed = ob.mark_transient_failure(claimed.id, f"timeout {attempt}", now)
            ceiling = min(60.0, 5.0 * 2 ** (attempt - 1))
            assert failed.state == S.QUEUED and failed.attempts == attempt
            assert failed.last_error == f"timeout {attempt}"
            assert now + ceiling / 2 <= failed.next_attempt_at <= now + ceiling
            assert ob.claim("dicom", 1, failed.next_attempt_at - 0.01) == []
            now = failed.next_attempt_at
        ob.claim("dicom", 1, now)
        honoured = ob.mark_transient_failure(item.id, "503", now, retry_after=600.0)
        assert honoured.next_attempt_at == now + 600.0  # the peer's Retry-After wins when longer
        with pytest.raises(LookupError):
            ob.mark_transient_failure(12345, "x", now)


def test_release_puts_items_back_without_charging(ob: Outbox) -> None:
    a, b = add(ob, "a"), add(ob, "b")
    ob.claim("dicom", 2, T0)
    ob.release([a.id, b.id], "association rejected: calling AE not recognized", T0 + 1, 300.0)
    for item in (ob.get(a.id), ob.get(b.id)):
        assert (item.state, item.attempts, item.next_attempt_at) == (S.QUEUED, 0, T0 + 301)
        assert "calling AE" in item.last_error
    assert ob.claim("dicom", 5, T0 + 300) == []
    assert len(ob.claim("dicom", 5, T0 + 301)) == 2


# -- corruption -------------------------------------------------------------------------------------
def corrupt(ob: Outbox, item: OutboxItem, storage: str) -> None:
    if storage == "file":
        path = ob.payload_path(item)
        data = bytearray(path.read_bytes())
        data[5000] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        with raw_db(ob.data_dir) as conn:
            conn.execute("UPDATE payloads SET data = ? WHERE item_id = ?", (b"garbled", item.id))


def test_a_corrupt_payload_is_quarantined_and_never_sent(ob: Outbox, storage: str) -> None:
    item = add(ob, "bad")
    good = add(ob, "good")
    corrupt(ob, item, storage)
    claimed = ob.claim("dicom", 5, T0 + 1)
    bad = next(i for i in claimed if i.id == item.id)
    with pytest.raises(CorruptPayloadError, match="sha256") as err:
        ob.read_payload(bad, now=T0 + 2)
    assert "not sent" in str(err.value)
    q = ob.get(item.id)
    assert q.state == S.QUARANTINED and "sha256" in q.quarantine_reason
    assert ob.read_payload(ob.get(good.id)) == ecg_bytes(hash("good") % 1000)
    ob.mark_sent([item.id], T0 + 3)  # a forwarder racing on: refused, stays quarantined
    assert ob.get(item.id).state == S.QUARANTINED
    (entry,) = ob.stats(T0 + 3)["quarantined"]
    assert entry == {"id": item.id, "kind": "dicom", "key": "bad", "reason": q.quarantine_reason, "at": T0 + 2}


def test_payloads_read_together_are_checked_as_one_read_checks_them(ob: Outbox, storage: str) -> None:
    """`read_payloads`: a page showing many items reads their payloads at once, each checked
    against its hash as `read_payload` checks it: a corrupt one is left out and quarantined,
    a purged or unknown one left out; the database's ones in one statement however many."""
    items = [add(ob, f"r{n}", payload=SMALL * 8 + bytes([n])) for n in range(6)]
    statements: list[str] = []
    ob.db.conn.set_trace_callback(statements.append)
    try:
        assert ob.read_payloads([i.id for i in items]) == {i.id: SMALL * 8 + bytes([n]) for n, i in enumerate(items)}
    finally:
        ob.db.conn.set_trace_callback(None)
    if storage == "inline":
        assert len(statements) == 1, statements
    corrupt(ob, items[2], storage)
    with raw_db(ob.data_dir) as conn:
        conn.execute("UPDATE items SET state = 'purged' WHERE id = ?", (items[4].id,))
    read = ob.read_payloads([i.id for i in items] + [10_000])
    assert read == {i.id: SMALL * 8 + bytes([n]) for n, i in enumerate(items) if n not in (2, 4)}
    assert ob.get(items[2].id).state == S.QUARANTINED and "sha256" in ob.get(items[2].id).quarantine_reason
    assert ob.get(items[4].id).state == S.PURGED
    assert ob.read_payloads([]) == {}


def test_a_missing_payload_file_is_quarantined_at_read(data_dir: Path) -> None:
    with open_outbox(data_dir, inline_max_bytes=-1) as ob:
        item = add(ob, "gone")
        (claimed,) = ob.claim("dicom", 1, T0)
        ob.payload_path(item).unlink()
        with pytest.raises(CorruptPayloadError, match="missing"):
            ob.read_payload(claimed)
        assert ob.get(item.id).state == S.QUARANTINED


def test_retry_of_quarantined_items_resets_attempts(ob: Outbox) -> None:
    a, b, c = add(ob, "a"), add(ob, "b"), add(ob, "c")
    for item in (a, b):
        ob.claim("dicom", 1, T0)
        ob.mark_transient_failure(item.id, "x", T0)
        ob.quarantine(item.id, "refused: 0xA900 dataset does not match SOP class", T0 + 1)
    assert ob.retry(c.id, T0 + 2) is False  # not quarantined
    assert ob.retry(a.id, T0 + 2) is True
    back = ob.get(a.id)
    assert (back.state, back.attempts, back.next_attempt_at, back.quarantine_reason) == (S.QUEUED, 0, T0 + 2, None)
    assert ob.retry_quarantined(T0 + 3) == 1 and ob.get(b.id).state == S.QUEUED
    assert ob.retry_quarantined(T0 + 3) == 0
    assert ob.stats(T0 + 3)["quarantined"] == []


# -- crash leftovers at open --------------------------------------------------------------------------
def test_open_removes_payload_files_without_a_row(data_dir: Path) -> None:
    with open_outbox(data_dir, inline_max_bytes=-1) as ob:
        kept = add(ob, "kept")
        kept_name = ob.payload_path(kept).name
    pdir = data_dir / PAYLOAD_DIR
    (pdir / "0123456789abcdef0123456789abcdef.bin").write_bytes(b"renamed, row never committed")
    (pdir / ".tmp-deadbeef").write_bytes(b"half written")
    with open_outbox(data_dir, inline_max_bytes=-1) as ob:
        assert payload_files_of(data_dir) == {kept_name}
        assert ob.read_payload(ob.get(kept.id)) == ecg_bytes(hash("kept") % 1000)


def test_open_quarantines_queued_items_whose_payload_was_lost(data_dir: Path) -> None:
    with open_outbox(data_dir) as ob:  # ECGs in files, the small observation in the database
        lost_file = add(ob, "lost-file")
        ok = add(ob, "ok")
        lost_inline = add(ob, "lost-inline", payload=SMALL, kind="observation")
        ob.payload_path(lost_file).unlink()
    with raw_db(data_dir) as conn:  # e.g. restored from an inconsistent backup
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("DELETE FROM payloads WHERE item_id = ?", (lost_inline.id,))
    with open_outbox(data_dir) as ob:
        for item in (lost_file, lost_inline):
            q = ob.get(item.id)
            assert q.state == S.QUARANTINED and "lost before it was sent" in q.quarantine_reason
        assert ob.get(ok.id).state == S.QUEUED
        assert [i.key for i in ob.claim("dicom", 10, T0)] == ["ok"]


HOLDER_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from uploader.outbox import Outbox
    ob = Outbox.open(Path(sys.argv[1]), min_free_bytes=0)
    print(len(ob.claim("dicom", 10, 2e9)), flush=True)
    time.sleep(60)
""")


def test_recover_interrupted_requeues_only_claims_of_dead_owners(data_dir: Path) -> None:
    with open_outbox(data_dir) as ob:
        a, b = add(ob, "a"), add(ob, "b")
    forwarder = python(HOLDER_SCRIPT, data_dir)
    try:
        assert forwarder.stdout.readline().strip() == "2"
        # `lastmile queue` opening the outbox meanwhile must not take the forwarder's items away
        with open_outbox(data_dir) as cli:
            assert {i.state for i in cli.items()} == {S.SENDING}
            assert cli.recover_interrupted(T0 + 1) == 0
            forwarder.send_signal(signal.SIGKILL)  # dies mid-send: the kernel drops its lock
            forwarder.communicate(timeout=30)
            assert cli.recover_interrupted(T0 + 2) == 2
            for item in (cli.get(a.id), cli.get(b.id)):
                assert (item.state, item.attempts, item.updated_at) == (S.QUEUED, 0, T0 + 2)  # not charged
                assert "interrupted" in item.last_error
            assert [p.name for p in (data_dir / "locks").iterdir()] == [f"owner-{cli.owner}.lock"]
    finally:
        forwarder.kill()
        forwarder.communicate(timeout=30)


SENDER_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from uploader.outbox import Outbox
    ob = Outbox.open(Path(sys.argv[1]), min_free_bytes=0)
    first, second = ob.claim("dicom", 10, 2e9)
    ob.begin_send(first.id, 2e9)  # its bytes are going out when the process dies
    print(first.id, flush=True)
    time.sleep(60)
""")


def killed_once_it_says(script: str, data_dir: Path) -> int:
    """`script` run as its own process until it prints the id of the item it left mid-way, then
    SIGKILLed (nothing closed: its claims are left to the next open). That id."""
    sender = python(script, data_dir)
    try:
        return int(sender.stdout.readline())
    finally:
        sender.kill()  # SIGKILL
        sender.communicate(timeout=30)


def test_a_send_killed_mid_way_was_charged_before_it_started(data_dir: Path) -> None:
    with open_outbox(data_dir) as ob:
        add(ob, "a"), add(ob, "b")
    in_flight = killed_once_it_says(SENDER_SCRIPT, data_dir)
    with open_outbox(data_dir) as ob:  # recovery at open
        cut, waiting = (ob.get(i.id) for i in sorted(ob.items(), key=lambda i: i.id != in_flight))
        assert (cut.state, cut.attempts, cut.interrupted_sends) == (S.QUEUED, 1, 1)
        assert "died during the send" in cut.last_error
        assert (waiting.state, waiting.attempts, waiting.interrupted_sends) == (S.QUEUED, 0, 0)


def test_a_send_cut_by_the_gateway_going_down_is_never_charged(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut mid-send (bench/power_cut.py) is not the object's fault: the oldest study is the
    one in flight at every cut of a flickering supply, and more cuts than max_interrupted_sends
    must not quarantine it. The sender runs in this boot; recovery runs as if after a reboot."""
    with open_outbox(data_dir) as ob:
        add(ob, "a"), add(ob, "b")
    rebooted = tmp_path / "boot_id"
    for cut in range(1, DEFAULT_MAX_INTERRUPTED_SENDS + 2):
        monkeypatch.setattr(outbox_module, "BOOT_ID", Path("/proc/sys/kernel/random/boot_id"))
        in_flight = killed_once_it_says(SENDER_SCRIPT, data_dir)  # the power goes with the bytes on the wire
        rebooted.write_text(f"00000000-0000-4000-8000-{cut:012d}\n")  # the next boot's id
        monkeypatch.setattr(outbox_module, "BOOT_ID", rebooted)
        with open_outbox(data_dir) as ob:  # recovery at open, in the next boot
            item = ob.get(in_flight)
            assert (item.state, item.attempts, item.interrupted_sends) == (S.QUEUED, 0, 0), cut
            assert "power cut or reboot" in item.last_error
    with open_outbox(data_dir) as ob:
        assert {i.key for i in ob.claim("dicom", 10, 2e9)} == {"a", "b"}  # nothing quarantined


def stop_with_the_outbox_write_locked(data_dir: Path, item_id: int) -> None:
    """The forwarder's stop (lastmile/services/forward.py) while another process holds the outbox's
    write lock: its send of `item_id` had begun and its outcome could not be recorded; closing
    cannot release the claim (RELEASE_AT_CLOSE_WAIT_MS) and leaves it to the next open."""
    locker = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    try:
        with open_outbox(data_dir) as forwarder:
            assert [i.id for i in forwarder.claim("dicom", 10, 2e9)] == [item_id]
            assert forwarder.begin_send(item_id, 2e9)
            locker.execute("BEGIN IMMEDIATE")  # e.g. the acquire service in a long write
        locker.rollback()
        with contextlib.closing(sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True)) as conn:
            assert conn.execute("SELECT state FROM items WHERE id = ?", (item_id,)).fetchone() == ("sending",)
    finally:
        locker.close()


def test_a_send_left_claimed_at_a_stop_is_never_charged(data_dir: Path) -> None:
    """Stopping the forwarder (an update, a reboot the doctor asked for) while the outbox is
    write-locked left its send's claim for the next open, whose recovery charged it as a send
    killed mid-way: after max_interrupted_sends such stops the study was quarantined ("killed
    during send 5 times") though it never crashed anything. The stopped process said so: the
    next open gives the attempt back, and the study is still sent (under the same UIDs)."""
    with open_outbox(data_dir) as ob:
        item = add(ob, "a")
    for _stop in range(DEFAULT_MAX_INTERRUPTED_SENDS + 1):
        stop_with_the_outbox_write_locked(data_dir, item.id)
    with open_outbox(data_dir) as ob:  # recovery at open
        after = ob.get(item.id)
        assert (after.state, after.attempts, after.interrupted_sends) == (S.QUEUED, 0, 0)
        assert [i.id for i in ob.claim("dicom", 10, 2e9)] == [item.id]  # not quarantined
    assert list((data_dir / "locks").iterdir()) == []  # what the stops left is gone with them


def test_a_left_claims_mark_whose_claims_are_gone_is_removed_at_open(data_dir: Path) -> None:
    """A mark whose claims were recovered by a process that died before removing it does not
    pile up in locks/ (one per stop)."""
    with open_outbox(data_dir) as ob:
        add(ob, "a")
    (data_dir / "locks" / "left-claims-0123abcd").touch()
    with open_outbox(data_dir) as ob:
        assert [p.name for p in (data_dir / "locks").iterdir()] == [f"owner-{ob.owner}.lock"]


STORED_UNRECORDED_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from uploader.outbox import Outbox
    ob = Outbox.open(Path(sys.argv[1]), min_free_bytes=0)
    first, second = ob.claim("dicom", 10, 2e9)
    ob.begin_send(first.id, 2e9)
    ob.remember_stored([first.id], taken=False)  # the peer stored it; mark_sent failed (the forwarder's except)
    print(first.id, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("end", ["killed", "power cut"])
def test_what_the_peer_stored_unrecorded_is_recorded_as_sent_by_the_next_open(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """The peer stored an object, `mark_sent` failed (another process's write lock, an I/O error)
    and the forwarder ended before recording it: the next open put it back in the queue and it
    was sent again (a second send and storage-commitment round). Its note beside the owner's lock
    (fsynced) makes the next open record it as sent - after a kill, and after a power cut that
    undid the claim and the charge (neither is fsynced): the item is queued then, the note says
    the peer has it. The other claim goes back to the queue as before."""
    with open_outbox(data_dir) as ob:
        add(ob, "a"), add(ob, "b")
    stored = killed_once_it_says(STORED_UNRECORDED_SCRIPT, data_dir)
    if end == "power cut":
        with contextlib.closing(sqlite3.connect(data_dir / DB_NAME)) as conn, conn:
            conn.execute("UPDATE items SET state = 'queued', claimed_by = NULL, in_flight = 0, attempts = 0")
        rebooted = tmp_path / "boot_id"
        rebooted.write_text("00000000-0000-4000-8000-000000000001\n")
        monkeypatch.setattr(outbox_module, "BOOT_ID", rebooted)
    with open_outbox(data_dir) as ob:  # recovery at open
        item = ob.get(stored)
        assert (item.state, item.interrupted_sends, item.sent_at) == (S.SENT, 0, T0), item
        assert [i.key for i in ob.items() if i.state == S.QUEUED] == ["b"]
        assert ob.claim("dicom", 10, 2e9)[0].key == "b"
    assert not list((data_dir / "locks").glob("stored-*"))


def test_close_records_what_the_peer_stored_before_giving_back_its_claims(data_dir: Path) -> None:
    """A stop once the lock that failed `mark_sent` is free: close gave the stored object back to the
    queue with the others (uncharged), and the next start sent it again. Now close records it as
    sent first, and its note goes."""
    with open_outbox(data_dir) as ob:
        a, b = add(ob, "a"), add(ob, "b")
    with open_outbox(data_dir) as forwarder:
        assert len(forwarder.claim("dicom", 10, 2e9)) == 2
        assert forwarder.begin_send(a.id, 2e9)
        forwarder.remember_stored([a.id], taken=False)
        assert [p.name for p in (data_dir / "locks").glob("stored-*")] == [f"stored-{forwarder.owner}"]
    with open_outbox(data_dir) as ob:
        assert (ob.get(a.id).state, ob.get(a.id).attempts, ob.get(b.id).state) == (S.SENT, 1, S.QUEUED)
    assert not list((data_dir / "locks").glob("stored-*"))


def test_with_nothing_claimed_releasing_claims_does_not_wait_for_the_write_lock(data_dir: Path) -> None:
    """A forward round that failed on a write-locked outbox (its claim waited out the busy timeout)
    settles its claims (ForwardService._settle), and a stop closes the outbox: each waited for the
    write lock though the round had claimed nothing - a stop took 31 s (15 s claim, 15 s settle,
    1 s close), near systemd's TimeoutStopSec. With nothing of its own claimed there is nothing to
    write: at once, and no mark is left for the next open."""
    with open_outbox(data_dir) as ob:
        item = add(ob, "a")
    locker = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    with contextlib.closing(locker), open_outbox(data_dir) as forwarder:
        assert [i.id for i in forwarder.claim("dicom", 10, 2e9)] == [item.id]
        forwarder.release([item.id], "its round ended", 2e9, 0.0)
        locker.execute("BEGIN IMMEDIATE")  # held until the outbox is closed
        assert forwarder.release_claims(2e9) == 0
    assert list((data_dir / "locks").iterdir()) == []


def test_a_stop_ends_a_write_waiting_for_another_process_lock(data_dir: Path) -> None:
    """The forward service's stop (`give_up_waits_on`): a claim waiting for another process's write
    lock waited out the 15 s busy timeout, and SIGTERM with it. Now it gives up STOP_WAIT_S after
    the stop; nothing was claimed, and the item is claimed once the lock is free."""
    with open_outbox(data_dir) as ob:
        item = add(ob, "a")
    locker = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    stop = threading.Event()
    with contextlib.closing(locker), open_outbox(data_dir) as forwarder:
        forwarder.give_up_waits_on(stop)
        locker.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, stop.set).start()
        began = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            forwarder.claim("dicom", 10, 2e9)
        assert time.monotonic() - began < 5.0
        locker.rollback()
        assert forwarder.get(item.id).state == ItemState.QUEUED
        assert [i.id for i in forwarder.claim("dicom", 10, 2e9)] == [item.id]  # a free lock: at once


def test_a_process_killed_mid_send_again_and_again_still_ends_in_quarantine(data_dir: Path) -> None:
    """The other side of the stop above: a send whose process dies (an object that exhausts its
    memory) is charged and counted at every death, and the object is quarantined, not retried for ever."""
    with open_outbox(data_dir) as ob:
        add(ob, "a"), add(ob, "b")
    for _death in range(DEFAULT_MAX_INTERRUPTED_SENDS):
        in_flight = killed_once_it_says(SENDER_SCRIPT, data_dir)
    with open_outbox(data_dir) as ob:
        assert [i.key for i in ob.claim("dicom", 10, 2e9)] == ["b"]
        poison = ob.get(in_flight)
        assert (poison.state, poison.attempts) == (S.QUARANTINED, DEFAULT_MAX_INTERRUPTED_SENDS)
        assert "killed during send 5 times" in poison.quarantine_reason


def test_owner_tokens_name_their_boot() -> None:
    boot = current_boot()
    assert len(boot) == 32 and boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    assert boot_of(f"{boot}-{'ab' * 16}") == boot
    assert boot_of("ab" * 16) == ""  # a token from before boots were named: charged as a crash


def test_interrupted_sends_quarantine_at_the_limit_and_outcomes_reset_them(ob: Outbox) -> None:
    crasher, fine = add(ob, "crasher"), add(ob, "fine")
    for n in range(1, 3):
        t = T0 + 10_000 * n  # past any backoff
        assert len(ob.claim("dicom", 10, t)) == 2
        assert ob.begin_send(crasher.id, t) and ob.begin_send(fine.id, t)
        assert ob.interrupt_sends([crasher.id], "send failed: MemoryError", t) == 1
        ob.mark_transient_failure(fine.id, "timeout", t)  # an outcome: charged once, not twice
        assert (ob.get(crasher.id).interrupted_sends, ob.get(crasher.id).attempts) == (n, n)
        assert (ob.get(fine.id).interrupted_sends, ob.get(fine.id).attempts) == (0, n)
    assert [i.key for i in ob.claim("dicom", 10, T0 + 50_000, max_interrupted_sends=3)] == ["crasher", "fine"]
    assert ob.begin_send(crasher.id, T0) and ob.interrupt_sends([crasher.id], "again", T0) == 1
    ob.release([fine.id], "config fault", T0, 0.0)  # not the item's fault: its attempt is given back
    assert ob.get(fine.id).attempts == 2
    assert [i.key for i in ob.claim("dicom", 10, T0 + 50_000, max_interrupted_sends=3)] == ["fine"]
    q = ob.get(crasher.id)
    assert q.state == S.QUARANTINED and "killed during send 3 times" in q.quarantine_reason
    assert ob.begin_send(crasher.id, T0) is False  # not ours to send


def test_commitment_transactions_are_remembered_per_item(ob: Outbox) -> None:
    item = add(ob, "x")
    other = add(ob, "y")
    ob.claim("dicom", 10, T0)
    ob.mark_sent([item.id, other.id], T0)
    for n in range(6):
        ob.set_transaction([item.id], f"2.25.{n}", T0 + n)
    ob.set_transaction([other.id], "2.25.99", T0 + 9)
    assert ob.get(item.id).transaction_uid == "2.25.5"
    remembered = [n for n in range(6) if ob.commitment_request(f"2.25.{n}")]
    assert remembered == [2, 3, 4, 5]  # the last four asked
    assert [i.id for i in ob.commitment_request("2.25.99")] == [other.id]
    assert ob.commitment_request("2.25.12345") == []  # never issued
    ob.mark_committed([item.id, other.id], T0 + 20)
    assert ob.purge_due(T0 + 20, 0.0) == 2
    assert ob.commitment_request("2.25.5") == [] and ob.commitment_request("2.25.99") == []


def test_the_refusal_says_what_waits_and_what_to_do(data_dir: Path) -> None:
    free = {"bytes": 10 * 2**30}
    with open_outbox(data_dir, min_free_bytes=100 * 2**20, statvfs=lambda _p: Vfs(free["bytes"] // 4096, 4096)) as ob:
        for i in range(3):
            add(ob, f"ecg{i}")
        add(ob, "visit", kind="fhir-bundle", payload=SMALL)
        free["bytes"] = 50 * 2**20
        with pytest.raises(OutboxFullError) as refused:
            ob.add("dicom", "new", ecg_bytes(1))
    message = str(refused.value)
    assert message.startswith("storage full: 3 ECGs and 1 visit record are waiting to be sent; connect the network")
    assert "call the county IT" in message and "Nothing was lost" in message and "50.0 MB free" in message


def test_close_gives_back_its_own_claims(data_dir: Path) -> None:
    with open_outbox(data_dir) as ob:
        add(ob, "a")
        ob.claim("dicom", 1, T0)
    with open_outbox(data_dir) as ob:
        (item,) = ob.items()
        assert (item.state, item.attempts) == (S.QUEUED, 0)
        assert list((data_dir / "locks").iterdir()) != []  # its own lock only
    assert list((data_dir / "locks").iterdir()) == []


# -- full disk ----------------------------------------------------------------------------------------
def test_add_refuses_when_free_space_would_drop_below_the_minimum(data_dir: Path) -> None:
    free = {"bytes": 10 * 2**30}

    def statvfs(path: os.PathLike) -> Vfs:
        return Vfs(f_bavail=free["bytes"] // 4096, f_frsize=4096)

    with open_outbox(data_dir, min_free_bytes=200 * 2**20, statvfs=statvfs, inline_max_bytes=-1) as ob:
        kept = add(ob, "kept")
        free["bytes"] = 200 * 2**20 + ECG_SIZE - 1  # one byte short
        before = (payload_files_of(data_dir), ob.db.conn.total_changes)
        with pytest.raises(OutboxFullError, match=r"only 200\.1 MB free .* 200 MB must stay free"):
            ob.add("dicom", "new", ecg_bytes(9))
        assert (payload_files_of(data_dir), ob.db.conn.total_changes) == before
        assert ob.find("new") is None
        assert ob.add("dicom", "kept", b"").created is False  # known keys still answer
        assert ob.read_payload(ob.get(kept.id)) == ecg_bytes(hash("kept") % 1000)
        free["bytes"] += 1
        assert ob.add("dicom", "new", ecg_bytes(9)).created
        assert ob.stats(T0)["free_bytes"] == free["bytes"] // 4096 * 4096


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_enospc_while_writing_a_file_leaves_nothing(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    with open_outbox(data_dir, inline_max_bytes=-1) as ob:
        kept = add(ob, "kept")
        real = getattr(os, failing)

        def no_space(fd, *args):
            if failing == "write":
                real(fd, bytes(args[0])[:1000])  # a partial write first, as a real disk would
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(payload_files.os, failing, no_space)
        with pytest.raises(OutboxFullError, match="full"):
            ob.add("dicom", "new", ecg_bytes(3))
        monkeypatch.undo()
        assert payload_files_of(data_dir) == {ob.payload_path(kept).name}
        assert ob.find("new") is None
        assert ob.read_payload(ob.get(kept.id)) == ecg_bytes(hash("kept") % 1000)
        assert ob.add("dicom", "new", ecg_bytes(3)).created  # works again once there is room


@pytest.mark.parametrize("storage_name", sorted(STORAGES))
def test_database_full_becomes_outbox_full_and_leaves_nothing(data_dir: Path, storage_name: str) -> None:
    with open_outbox(data_dir, inline_max_bytes=STORAGES[storage_name]) as ob:
        kept = add(ob, "kept", payload=SMALL)
        pages = ob.db.execute("PRAGMA page_count").fetchone()[0]
        ob.db.execute(f"PRAGMA max_page_count={pages}")  # the database cannot grow: SQLITE_FULL
        with pytest.raises(OutboxFullError, match="full"):
            for i in range(50):
                ob.add("dicom", f"new-{i}", ecg_bytes(i))
        ob.db.execute("PRAGMA max_page_count=1073741823")
        referenced = {r[0] for r in ob.db.execute("SELECT payload_file FROM items WHERE payload_file IS NOT NULL")}
        assert payload_files_of(data_dir) == referenced  # the refused item left no file
        assert ob.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert ob.read_payload(ob.get(kept.id)) == SMALL
        for item in ob.items():  # whatever was stored is whole
            assert hashlib.sha256(ob.read_payload(item)).hexdigest() == item.sha256
        assert ob.add("dicom", "after", SMALL).created


TMPFS_SCRIPT = textwrap.dedent("""
    import json, os, random, sys
    from collections import namedtuple
    from pathlib import Path
    from uploader.errors import OutboxFullError
    from uploader.outbox import Outbox, ItemState
    Vfs = namedtuple("Vfs", "f_bavail f_frsize")
    lying = lambda path: Vfs(1 << 40, 4096)  # pretend there is room: hit the real ENOSPC
    d = Path(sys.argv[1]) / "data"
    out = {}
    for name, inline_max, size in (("file", -1, 124 * 1024), ("inline", 1 << 30, 4096)):
        ob = Outbox.open(d / name, min_free_bytes=0, statvfs=lying, inline_max_bytes=inline_max)
        stored, error = 0, None
        for i in range(1000):
            try:
                ob.add("dicom", f"k{i}", random.Random(i).randbytes(size), now=1.0)
                stored += 1
            except OutboxFullError as exc:
                error = str(exc)
                break
        ok = all(ob.read_payload(it) == random.Random(int(it.key[1:])).randbytes(size) for it in ob.items())
        integrity = ob.db.execute("PRAGMA integrity_check").fetchone()[0]
        files = sorted(p.name for p in (d / name / "payloads").iterdir() if p.name != ".lock")
        ob.close()
        out[name] = {"stored": stored, "error": error, "ok": ok, "integrity": integrity,
                     "files": len(files), "tmp": [f for f in files if f.startswith(".tmp")]}
        for p in (d / name / "payloads").iterdir():  # make room for the next strategy
            p.unlink()
    print(json.dumps(out))
""")


def test_real_enospc_on_a_tiny_tmpfs(tmp_path: Path) -> None:
    from tests.conftest import run_on_private_tmpfs

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_on_private_tmpfs(mnt, "2m", TMPFS_SCRIPT, timeout_s=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for name, r in result.items():
        assert r["error"] and "full" in r["error"], (name, r)
        assert r["stored"] > 0 and r["ok"] and r["integrity"] == "ok" and r["tmp"] == [], (name, r)
    assert result["file"]["files"] == result["file"]["stored"]


# -- concurrency ----------------------------------------------------------------------------------------
def fill(ob: Outbox, n: int) -> set[int]:
    return {add(ob, f"item-{i}", payload=SMALL + str(i).encode(), now=T0 + i).id for i in range(n)}


def test_threads_sharing_one_outbox_never_claim_the_same_item(data_dir: Path) -> None:
    with open_outbox(data_dir) as ob:
        ids = fill(ob, 150)
        got: list[list[int]] = [[] for _ in range(4)]

        def claimer(slot: int) -> None:
            while batch := ob.claim("dicom", 3, T0 + 1000):
                got[slot] += [i.id for i in batch]
                ob.mark_sent([i.id for i in batch], T0 + 1000)

        threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        flat = [i for g in got for i in g]
        assert len(flat) == len(set(flat)) and set(flat) == ids
        assert ob.stats(T0)["counts"]["sent"] == 150


def test_two_outboxes_in_threads_never_claim_the_same_item(data_dir: Path) -> None:
    with open_outbox(data_dir) as one, open_outbox(data_dir) as two:
        ids = fill(one, 120)
        got: dict[str, list[int]] = {"one": [], "two": []}

        def claimer(name: str, ob: Outbox) -> None:
            while batch := ob.claim("dicom", 2, T0 + 1000):
                got[name] += [i.id for i in batch]

        threads = [threading.Thread(target=claimer, args=a) for a in (("one", one), ("two", two))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not set(got["one"]) & set(got["two"])
        assert set(got["one"]) | set(got["two"]) == ids


CLAIMER_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from uploader.outbox import Outbox
    ob = Outbox.open(Path(sys.argv[1]), min_free_bytes=0)
    print("ready", flush=True)
    sys.stdin.readline()  # both claim at once
    got = []
    while batch := ob.claim("dicom", 2, 2e9):
        got += [i.id for i in batch]
        ob.mark_sent([i.id for i in batch], 2e9)
    ob.close()
    print(json.dumps(got))
""")

ADDER_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from uploader.outbox import Outbox
    ob = Outbox.open(Path(sys.argv[1]), min_free_bytes=0, inline_max_bytes=-1)
    for i in range(int(sys.argv[2])):
        ob.add("dicom", f"acq-{i}", bytes([i % 256]) * 20000, now=1.0)
    ob.close()
""")


def python(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def release_together(procs: list[subprocess.Popen]) -> list[subprocess.Popen]:
    """Wait until every process says it is ready (imports done: they take longer than the race),
    then let them all go at once - a barrier, not a wall-clock rendezvous a slow start misses."""
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n", p.communicate(timeout=60)
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    return procs


def test_two_processes_never_claim_the_same_item_while_a_third_adds(data_dir: Path) -> None:
    with open_outbox(data_dir) as ob:
        ids = fill(ob, 200)
    claimers = [python(CLAIMER_SCRIPT, data_dir) for _ in range(2)]
    adder = python(ADDER_SCRIPT, data_dir, 40)
    release_together(claimers)
    outs = [p.communicate(timeout=60) for p in (*claimers, adder)]
    assert all(p.returncode == 0 for p in (*claimers, adder)), [o[1] for o in outs]
    a, b = (json.loads(o[0]) for o in outs[:2])  # (their "ready" lines were read)
    assert not set(a) & set(b)
    with open_outbox(data_dir) as ob:
        added = {i.id for i in ob.items() if i.key.startswith("acq-")}
        assert len(added) == 40
        assert ids <= set(a) | set(b) <= ids | added  # every item once; late adds maybe too
        assert ob.stats(T0)["counts"]["sending"] == 0


# -- crashes --------------------------------------------------------------------------------------------
CRASH_SCRIPT = textwrap.dedent("""
    import random, sys, time
    from pathlib import Path
    from uploader.outbox import Outbox
    from uploader.errors import CorruptPayloadError
    d, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    ob = Outbox.open(d, min_free_bytes=0, rng=rng)
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        now = time.time()
        op = rng.random()
        if op < 0.45:
            size = rng.choice([900, 124 * 1024])
            ob.add(rng.choice(["dicom", "observation"]), f"{seed}-{n}", rng.randbytes(size),
                   priority=rng.choice([0, 1]), patient={"name": "CRASH^TEST"}, now=now)
        elif op < 0.7:
            for item in ob.claim(rng.choice(["dicom", "observation"]), 3, now + 1e6):
                ob.read_payload(item)
                r = rng.random()
                if r < 0.6:
                    ob.mark_sent([item.id], now)
                elif r < 0.8:
                    ob.mark_transient_failure(item.id, "timeout", now)
                # else: left in sending (killed mid-send)
        elif op < 0.85:
            sent = ob.items(state="sent", limit=5)
            ob.set_transaction([i.id for i in sent], f"2.25.{n}", now)
            ob.mark_committed([i.id for i in sent[:3]], now)
            ob.requeue([i.id for i in sent[3:]], "commitment failed", now)
        else:
            ob.purge_due(now, 0.0)
""")


def check_consistent(data_dir: Path) -> dict:
    with open_outbox(data_dir) as ob:
        assert ob.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert ob.db.execute("PRAGMA foreign_key_check").fetchall() == []
        counts = ob.stats(time.time())["counts"]
        assert counts["sending"] == 0, counts
        assert counts["quarantined"] == 0, ob.stats(time.time())["quarantined"]
        referenced = {r[0] for r in ob.db.execute("SELECT payload_file FROM items WHERE payload_file IS NOT NULL")}
        assert payload_files_of(data_dir) == referenced  # no orphan, nothing missing
        for item in ob.items():
            if item.state != S.PURGED:
                assert hashlib.sha256(ob.read_payload(item)).hexdigest() == item.sha256
        return counts


def test_sigkill_at_random_moments_leaves_a_consistent_outbox(data_dir: Path) -> None:
    rng = random.Random(2024)
    check_consistent(data_dir)  # creates it
    for round_no in range(20):
        child = python(CRASH_SCRIPT, data_dir, round_no)
        try:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
            time.sleep(rng.uniform(0.0, 0.3))
            assert child.poll() is None, child.stderr.read()  # still working when killed
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=30)
        counts = check_consistent(data_dir)
    assert sum(counts.values()) > 20  # the children did real work
    assert counts["queued"] and (counts["sent"] or counts["committed"] or counts["purged"])


# -- purge secrecy and status ---------------------------------------------------------------------------
def files_contain(data_dir: Path, needle: bytes) -> list[str]:
    return [p.name for p in data_dir.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_purge_leaves_no_trace_of_the_patient_in_the_database_files(data_dir: Path, storage: str) -> None:
    with open_outbox(data_dir, inline_max_bytes=STORAGES[storage]) as ob:
        # inline: payloads that carry the name in the database; file: 124 KB ECG files
        items = [add(ob, f"p{i}", payload=ecg_bytes(i, 4000) if storage == "inline" else None) for i in range(5)]
        anonymous = ob.add("dicom", "anonymous", b"\0" * 3000, now=T0).item
        needle = PATIENT_NAME.encode()
        assert files_contain(data_dir, needle)  # the test would prove nothing otherwise
        ids = [i.id for i in items]
        ob.claim("dicom", 10, T0)
        ob.release([anonymous.id], "not this one", T0, 0.0)
        ob.mark_sent(ids, T0)
        ob.mark_committed(ids, T0)
        assert ob.purge_due(T0 + 10, 0.0) == 5
        assert ob.checkpoint()
        assert files_contain(data_dir, needle) == []
        assert (data_dir / f"{DB_NAME}-wal").stat().st_size == 0
        assert ob.read_payload(ob.get(anonymous.id)) == b"\0" * 3000


def test_record_status_and_stats(ob: Outbox) -> None:
    assert ob.status("reading_center") is None
    ob.record_status("reading_center", {"fault": "AE rejected", "fault_since": T0}, T0)
    ob.record_status("reading_center", {"fault": None, "last_success": T0 + 5}, T0 + 5)
    ob.record_status("storage_commitment", {"supported": False}, T0 + 5)
    assert ob.status("reading_center") == {"fault": None, "last_success": T0 + 5}
    add(ob, "old", now=T0)
    add(ob, "new", now=T0 + 50)
    stats = ob.stats(T0 + 100)
    assert stats["counts"] == {"queued": 2, "sending": 0, "sent": 0, "committed": 0, "purged": 0, "quarantined": 0}
    assert (stats["last_sent_at"], stats["last_committed_at"], stats["quarantined"]) == (None, None, [])
    assert stats["statuses"] == {
        "reading_center": {"fault": None, "last_success": T0 + 5},
        "storage_commitment": {"supported": False},
    }
    assert stats["waiting_bytes"] == 2 * ECG_SIZE
    json.dumps(stats)  # `lastmile queue --json` prints it as is


# The doctor assigns a held ECG (the console's worker process): its payload is rebuilt, the row
# then names the new file and the old one is deleted.
REPLACE_SCRIPT = r"""
import sys
from uploader.outbox import Outbox
with Outbox.open(sys.argv[1], min_free_bytes=0) as ob:
    assert ob.replace_held_payload(int(sys.argv[2]), b"assigned" * 4000, 1_700_000_010.0)
"""


def test_an_outbox_opened_while_a_held_ecg_is_assigned_does_not_quarantine_it(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A technician runs `lastmile queue` (or a service starts) just as the doctor assigns a held
    ECG on the console. The opening outbox looks for queued items whose payload is lost: it read
    the rows before the assignment committed and the payload files after it deleted the old file.
    The ECG must stay queued for the reading center, not be quarantined as "lost"."""
    with open_outbox(data_dir) as ob:
        held = ob.add("dicom", "held", ecg_bytes(3), now=T0, hold=Hold("unassigned", T0 + 3600)).item
    real_names = payload_files.PayloadFiles.names
    calls = []

    def names_after_the_assignment(self: payload_files.PayloadFiles) -> set[str]:
        calls.append(1)
        if len(calls) == 2:  # the lost-payload check (the first is the orphan sweep, under its lock)
            assert run_python(REPLACE_SCRIPT, data_dir, held.id).returncode == 0
        return real_names(self)

    monkeypatch.setattr(payload_files.PayloadFiles, "names", names_after_the_assignment)
    with open_outbox(data_dir) as ob:
        assert len(calls) >= 2, "the interleaving was not reached"
        item = ob.get(held.id)
        assert item is not None
        assert item.state == S.QUEUED, f"an assigned ECG was quarantined: {item.quarantine_reason}"
        assert ob.read_payload(item) == b"assigned" * 4000


def test_a_fhir_bundle_the_platform_took_unrecorded_is_recorded_taken_and_purged(data_dir: Path) -> None:
    """The county platform's 200 for a FHIR bundle is its commitment (`mark_taken`): one whose
    recording failed (`remember_stored`) recorded only "sent" would stay so for ever - no
    commitment comes for a bundle - never purged. Recorded taken (committed), by this process
    (`record_stored`: the settle, the close) as by the next open; an ECG still only sent."""
    with open_outbox(data_dir) as ob:
        bundle, ecg = add(ob, "fhir:a", kind="fhir-bundle"), add(ob, "ecg")
        assert len(ob.claim("fhir-bundle", 10, 2e9)) == 1 and len(ob.claim("dicom", 10, 2e9)) == 1
        ob.remember_stored([bundle.id], taken=True)  # the FHIR forwarder's mark_taken failed
        ob.remember_stored([ecg.id], taken=False)  # the ECG forwarder's mark_sent
        assert ob.record_stored(2e9 + 1) == 2
        assert (ob.get(bundle.id).state, ob.get(bundle.id).committed_at) == (S.COMMITTED, 2e9 + 1)
        assert (ob.get(ecg.id).state, ob.get(ecg.id).committed_at) == (S.SENT, None)
        assert ob.purge_due(2e9 + 2, 0.0) == 1
        assert ob.get(bundle.id).state == S.PURGED


def test_the_next_open_records_what_the_peer_stored_as_its_caller_would_have_not_by_its_kind(data_dir: Path) -> None:
    """`record_stored` decided "taken" by the item's kind (`_TAKEN_WHEN_STORED`), though the caller
    that remembered it knew which it meant (`mark_taken` or `mark_sent`): the flag is now the
    caller's, kept in the note beside the owner's lock, and the next open after a stop that could
    not record them records each as its caller would have. A note an older version left (bare
    ids) is still read by kind."""
    from uploader.payload_files import OwnerLock

    with open_outbox(data_dir) as ob:
        taken_ecg, sent_ecg, bundle = add(ob, "ecg-a"), add(ob, "ecg-b"), add(ob, "fhir:a", kind="fhir-bundle")
    with open_outbox(data_dir) as forwarder:
        assert len(forwarder.claim("dicom", 10, 2e9)) == 2
        forwarder.remember_stored([taken_ecg.id], taken=True)
        forwarder.remember_stored([sent_ecg.id], taken=False)
        owner = forwarder.owner
        note = OwnerLock.stored_file(data_dir / "locks", owner)
        assert OwnerLock.stored_by(note) == {taken_ecg.id: True, sent_ecg.id: False}
        kept = (data_dir / "locks" / f"stored-{owner}").read_bytes()
    older = "0000-older"  # a dead owner's note as an older version wrote it, and this one's at a kill
    (data_dir / "locks" / f"stored-{older}").write_text(f"{bundle.id}\n")
    (data_dir / "locks" / f"stored-{owner}").write_bytes(kept)
    with contextlib.closing(sqlite3.connect(data_dir / DB_NAME)) as conn, conn:  # as a kill leaves them
        conn.execute("UPDATE items SET state = 'sending', committed_at = NULL, sent_at = NULL")
        conn.execute("UPDATE items SET claimed_by = ? WHERE key LIKE 'ecg-%'", (owner,))
        conn.execute("UPDATE items SET claimed_by = ? WHERE key = 'fhir:a'", (older,))
    with open_outbox(data_dir) as ob:  # recovery at open
        states = {i.key: (i.state, i.committed_at is not None) for i in ob.items()}
    assert states == {"ecg-a": (S.COMMITTED, True), "ecg-b": (S.SENT, False), "fhir:a": (S.COMMITTED, True)}
    assert not list((data_dir / "locks").glob("stored-*"))


def test_a_damaged_note_of_what_the_peer_stored_is_not_forgotten_by_a_start_that_fails(tmp_path: Path) -> None:
    """A dead forwarder's `locks/stored-<token>` with one line damaged on the SD card was moved
    aside by the start before its readable ids were recorded; a start that then failed (the
    outbox database refusing the write: an I/O error, a full disk) left them in the copy no start reads: the
    next start gave the dead owner's claims back to the queue and the ECGs were sent again. Now
    the note keeps its readable ids until they are recorded."""
    data = tmp_path / "data"
    with open_outbox(data) as ob:
        a, b = add(ob, "ecg-a"), add(ob, "ecg-b")
    dead = "0000-dead"
    (data / "locks" / f"stored-{dead}").write_text(f"{a.id} sent\n{b.id} sent\n\x00garbage\n")
    with contextlib.closing(sqlite3.connect(data / outbox_module.DB_NAME)) as conn, conn:
        conn.execute("UPDATE items SET state = 'sending', claimed_by = ?", (dead,))
    # recording them fails in the database (as an I/O error or a full disk makes it): the start fails
    fault = "CREATE TRIGGER no_sent BEFORE UPDATE OF state ON items WHEN NEW.state = 'sent' BEGIN "
    with contextlib.closing(sqlite3.connect(data / outbox_module.DB_NAME)) as conn, conn:
        conn.execute(fault + "SELECT RAISE(ABORT, 'disk I/O error'); END")
    with pytest.raises(sqlite3.Error, match="disk I/O error"):
        open_outbox(data)
    with contextlib.closing(sqlite3.connect(data / outbox_module.DB_NAME)) as conn, conn:
        conn.execute("DROP TRIGGER no_sent")
    with open_outbox(data) as ob:
        states = {i.key: i.state for i in ob.items()}
    assert states == {"ecg-a": S.SENT, "ecg-b": S.SENT}, states
    assert not (data / "locks" / f"stored-{dead}").exists()
    assert len(list((data / "locks").glob(f"stored-{dead}.damaged-*"))) == 1
