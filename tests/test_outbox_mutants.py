"""Outbox: the edges the mutation score found untested (issue 20).

Each test names what a clinic loses if the edge moves: a full disk misread (the forwarder stops
instead of draining), space inside the database not counted (an observation refused on a card
that has room), a purge that leaves patient data in the WAL, a late commitment report ignored.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import resource
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import uploader.outbox as outbox_module
from lastmile.ecg.holds import oldest_wait_s
from uploader.errors import OutboxFullError
from uploader.outbox import (
    COMMITMENT_HISTORY,
    DEFAULT_INLINE_MAX_BYTES,
    Hold,
    Kind,
    Outbox,
    Priority,
    backoff_delay,
    current_boot,
    is_disk_full,
    snapshot_stats,
)
from uploader.payload_files import PayloadFiles
from uploader.space_reserve import SpaceReserve


class LowestDraw(random.Random):
    """A random source that always draws the lowest value: the shortest delay allowed."""

    def uniform(self, a: float, b: float) -> float:
        return a


class HighestDraw(random.Random):
    """A random source that always draws the highest value: the longest delay allowed."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_a_full_disk_is_recognised_in_each_form_sqlite_and_the_kernel_report_it() -> None:
    """Recognised, the outbox drains (frees its reserve and goes on); missed, the forwarder stops
    on its first write; and an I/O error taken for "full" would be retried for ever, silently."""
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))
    full = sqlite3.OperationalError("database or disk is full")
    assert is_disk_full(full)
    coded = sqlite3.OperationalError("disk I/O error")
    coded.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert is_disk_full(coded)
    other = sqlite3.OperationalError("disk I/O error")
    other.sqlite_errorcode = sqlite3.SQLITE_IOERR  # type: ignore[attr-defined]
    assert not is_disk_full(other)


def test_backoff_is_never_shorter_than_half_its_ceiling_and_attempt_zero_is_attempt_one() -> None:
    """Gateways that failed together spread out but never retry at once: the lowest draw is
    exactly half the ceiling (base, then doubling), not more and not less."""
    low = LowestDraw()
    assert backoff_delay(0, 10.0, 1000.0, low) == 5.0
    assert backoff_delay(1, 10.0, 1000.0, low) == 5.0
    assert backoff_delay(3, 10.0, 1000.0, low) == 20.0
    assert backoff_delay(50, 10.0, 1000.0, low) == 500.0
    high = HighestDraw()  # and the longest is the ceiling itself: the whole window is used
    assert backoff_delay(1, 10.0, 1000.0, high) == 10.0
    assert backoff_delay(3, 10.0, 1000.0, high) == 40.0
    assert backoff_delay(50, 10.0, 1000.0, high) == 1000.0


def _open(tmp_path: Path, **kw: Any) -> Outbox:
    return Outbox.open(tmp_path / "data", min_free_bytes=0, **kw)


def test_payloads_up_to_16_kib_stay_in_the_database_and_larger_ones_go_to_files(tmp_path: Path) -> None:
    """The measured crossing point (module docstring): an ECG goes to a file, a FHIR bundle or
    an observation stays in the database, where it costs fewer card writes."""
    assert DEFAULT_INLINE_MAX_BYTES == 16 * 1024
    with _open(tmp_path) as outbox:
        at_limit = outbox.add(Kind.FHIR_BUNDLE, "k1", b"x" * 16384, now=1.0).item
        over = outbox.add(Kind.FHIR_BUNDLE, "k2", b"x" * 16385, now=1.0).item
        assert outbox.payload_path(at_limit) is None
        assert outbox.payload_path(over) is not None
        assert outbox.read_payload(at_limit) == b"x" * 16384 and outbox.read_payload(over) == b"x" * 16385


def test_space_freed_inside_the_database_counts_for_database_payloads_only(tmp_path: Path) -> None:
    """After a purge the database file has free pages that SQLite reuses before growing: a
    16 KiB observation fits there even when the partition is at its floor. A payload that goes
    to a file gets no such credit."""
    floor = 50 * 2**20
    free = {"bytes": 10 * 2**30}

    def statvfs(_path: object) -> os.statvfs_result:
        return SimpleNamespace(f_bavail=free["bytes"] // 4096, f_frsize=4096)  # type: ignore[return-value]

    with Outbox.open(tmp_path / "data", min_free_bytes=floor, statvfs=statvfs, reserve_bytes=0) as outbox:
        ids = [outbox.add(Kind.FHIR_BUNDLE, f"old{i}", os.urandom(12_000), now=1.0).item.id for i in range(40)]
        assert len(outbox.claim(Kind.FHIR_BUNDLE, len(ids), 1.5)) == len(ids)
        outbox.mark_sent(ids, now=2.0)
        outbox.mark_committed(ids, now=3.0)
        assert outbox.purge_due(now=10.0, retention_s=0.0) == 40
        free["bytes"] = floor + 100  # the partition itself has 100 bytes to spare
        assert outbox.add(Kind.FHIR_BUNDLE, "fits-in-free-pages", b"y" * 16384, now=11.0).created
        with pytest.raises(OutboxFullError):
            outbox.add(Kind.FHIR_BUNDLE, "needs-a-file", b"z" * 16385, now=11.0)


def test_a_purge_leaves_no_patient_bytes_in_the_wal(tmp_path: Path) -> None:
    """The purge checkpoints at once (TRUNCATE): the old page images with the patient's data
    must not wait in the WAL for some later checkpoint."""
    with _open(tmp_path) as outbox:
        ids = [outbox.add(Kind.FHIR_BUNDLE, f"k{i}", b"PATIENT-ZHANG-SAN", now=1.0).item.id for i in range(3)]
        assert len(outbox.claim(Kind.FHIR_BUNDLE, len(ids), 1.5)) == len(ids)
        outbox.mark_sent(ids, now=2.0)
        outbox.mark_committed(ids, now=3.0)
        assert outbox.purge_due(now=10.0, retention_s=0.0) == 3
        wal = tmp_path / "data" / "outbox.sqlite-wal"
        assert not wal.exists() or wal.stat().st_size == 0


def test_the_last_four_commitment_transactions_of_an_item_are_believed(tmp_path: Path) -> None:
    """A PACS may answer a commitment request late, after we asked again: the latest
    COMMITMENT_HISTORY (4) requests still count, an older one no longer does."""
    assert COMMITMENT_HISTORY == 4
    with _open(tmp_path) as outbox:
        item = outbox.add(Kind.DICOM, "ecg", b"dicom", now=1.0).item
        for n in range(6):
            outbox.remember_commitment_request([item.id], f"1.2.3.{n}", now=10.0 + n)
        remembered = [n for n in range(6) if outbox.commitment_request(f"1.2.3.{n}")]
        assert remembered == [2, 3, 4, 5]


def test_release_claims_says_how_many_it_put_back_and_the_reserve_says_it_is_there(tmp_path: Path) -> None:
    with Outbox.open(tmp_path / "data", min_free_bytes=64 * 2**20) as outbox:
        for i in range(3):
            outbox.add(Kind.FHIR_BUNDLE, f"k{i}", b"v", now=1.0)
        assert len(outbox.claim(Kind.FHIR_BUNDLE, 2, 1.0)) == 2
        assert outbox.release_claims(now=2.0) == 2
        assert outbox.ensure_reserve() is True


def test_a_dead_processes_owner_lock_is_removed_at_open(tmp_path: Path) -> None:
    """Lock files of processes that are gone do not pile up in the data directory."""
    with _open(tmp_path):
        pass
    stale = tmp_path / "data" / "locks" / "owner-0123456789abcdef0123456789abcdef.lock"
    stale.write_text("")
    with _open(tmp_path) as outbox:
        assert not stale.exists()
        assert (tmp_path / "data" / "locks" / f"owner-{outbox.owner}.lock").exists()


def _payload_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "data" / "payloads").rglob("*.bin"))


def test_an_unassigned_ecg_is_held_found_rebuilt_for_its_patient_and_released(tmp_path: Path) -> None:
    """The doctor assigns the patient later: the held object is found by kind and reason, its
    payload swapped (file for file, the old one removed; database for database) with the new
    patient and meta, and it goes. One already on its way is never swapped: what went out
    cannot be taken back."""
    with _open(tmp_path) as outbox:
        hold = Hold("unassigned", until=1000.0)
        ecg = outbox.add(Kind.DICOM, "ecg", b"a" * 20_000, now=1.0, hold=hold).item
        small = outbox.add(Kind.DICOM, "small", b"s", now=1.0, hold=Hold("re-record", until=1000.0)).item
        bundle = outbox.add(Kind.FHIR_BUNDLE, "fhir", b"{}", now=1.0, hold=hold).item
        assert ecg.held(10.0) and not ecg.held(1000.0)
        assert [i.key for i in outbox.held_items(10.0)] == ["ecg", "small", "fhir"]
        assert [i.key for i in outbox.held_items(10.0, kind=Kind.DICOM)] == ["ecg", "small"]
        assert [i.key for i in outbox.held_items(10.0, kind=Kind.DICOM, reason="unassigned")] == ["ecg"]
        old_files = _payload_files(tmp_path)
        assert len(old_files) == 1

        assert outbox.replace_held_payload(ecg.id, b"b" * 20_000, 20.0, meta={"v": 2}, patient={"id": "P-1"})
        swapped = outbox.get(ecg.id)
        assert swapped is not None and not swapped.held(20.0) and swapped.hold_reason is None
        assert (swapped.meta, swapped.patient) == ({"v": 2}, {"id": "P-1"})
        assert outbox.read_payload(swapped) == b"b" * 20_000
        new_files = _payload_files(tmp_path)
        assert len(new_files) == 1 and new_files != old_files  # the old file is gone, not orphaned

        assert outbox.replace_held_payload(small.id, b"t", 20.0, hold=Hold("re-record", until=2000.0))
        kept = outbox.get(small.id)
        assert kept is not None and kept.held(1500.0) and kept.meta == {} and outbox.read_payload(kept) == b"t"
        assert outbox.payload_path(kept) is None

        assert outbox.release_hold(bundle.id, 30.0) is True
        assert outbox.release_hold(999, 30.0) is False
        (claimed,) = outbox.claim(Kind.FHIR_BUNDLE, 5, 31.0)
        assert outbox.begin_send(claimed.id, 31.0)  # on its way: no longer replaceable
        assert outbox.replace_held_payload(bundle.id, b"x" * 20_000, 40.0) is False
        assert outbox.read_payload(outbox.get(bundle.id)) == b"{}"  # type: ignore[arg-type]
        assert len(_payload_files(tmp_path)) == 1  # the unused new file was removed


# -- recovery of claims whose owner is gone: who pays for the attempt -----------------------------
EARLIER_BOOT = "0" * 32  # a boot id that is not this one (current_boot() is 32 random hex digits)


def _claimed_by_a_dead_owner(outbox: Outbox, data_dir: Path, owner: str | None, *, in_flight: int) -> list[int]:
    """Claim `in_flight` + 1 items and start sending `in_flight` of them, then hand the claims to
    `owner`, a process that is gone (no one holds its lock): what a SIGKILL or a power cut leaves."""
    ids = [outbox.add(Kind.DICOM, f"ecg{n}", b"dicom", now=1.0).item.id for n in range(in_flight + 1)]
    assert [i.id for i in outbox.claim(Kind.DICOM, 10, 2.0)] == ids
    for item_id in ids[:in_flight]:
        assert outbox.begin_send(item_id, 2.0)
    with sqlite3.connect(data_dir / "outbox.sqlite") as conn:
        conn.execute("UPDATE items SET claimed_by = ? WHERE state = 'sending'", (owner,))
    conn.close()
    return ids


def _progress(outbox: Outbox, item_id: int) -> tuple[str, int, int, float]:
    item = outbox.get(item_id)
    assert item is not None
    return item.state.value, item.attempts, item.interrupted_sends, item.updated_at


def test_a_send_cut_by_a_power_cut_is_given_back_and_the_waiting_claim_was_never_charged(tmp_path: Path) -> None:
    """The oldest study is the one on the wire at every cut of a flickering supply: charged for
    each cut, it would be quarantined as "an object that crashes the forwarder" after five."""
    data_dir = tmp_path / "data"
    with _open(tmp_path) as outbox:
        cut, waiting = _claimed_by_a_dead_owner(outbox, data_dir, f"{EARLIER_BOOT}-{'ab' * 16}", in_flight=1)
        assert outbox.recover_interrupted(now=5.0) == 2
        assert _progress(outbox, cut) == ("queued", 0, 0, 5.0)
        assert _progress(outbox, waiting) == ("queued", 0, 0, 5.0)
        assert "power cut or reboot" in (outbox.get(cut).last_error or "")
        assert "process stopped" in (outbox.get(waiting).last_error or "")
        # both can be claimed again, by anyone: the dead owner's name is gone from them
        assert [i.id for i in outbox.claim(Kind.DICOM, 10, 6.0)] == [cut, waiting]


@pytest.mark.parametrize(
    "owner",
    [f"{'cd' * 16}-{'ab' * 16}", "ab" * 16, None],
    ids=["killed-in-this-boot", "token-without-a-boot", "no-owner-recorded"],
)
def test_a_send_cut_by_its_process_dying_stays_charged_and_counts_as_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner: str | None
) -> None:
    """A process killed in this boot with an object's bytes going out may have been killed by
    that object (memory): the attempt stays charged and counts towards quarantine, so one bad
    object cannot take the forwarder down at every restart. A token that does not name its boot
    (older versions) or no owner at all cannot prove a power cut: charged alike."""
    boot = tmp_path / "boot_id"
    boot.write_text("cdcdcdcd-cdcd-cdcd-cdcd-cdcdcdcdcdcd\n")
    monkeypatch.setattr(outbox_module, "BOOT_ID", boot)
    data_dir = tmp_path / "data"
    with _open(tmp_path) as outbox:
        cut, waiting = _claimed_by_a_dead_owner(outbox, data_dir, owner, in_flight=1)
        assert outbox.recover_interrupted(now=5.0) == 2
        assert _progress(outbox, cut) == ("queued", 1, 1, 5.0)
        assert _progress(outbox, waiting) == ("queued", 0, 0, 5.0)
        assert "died during the send" in (outbox.get(cut).last_error or "")


def test_recovery_leaves_the_claims_of_this_outbox_and_of_a_live_one_alone(tmp_path: Path) -> None:
    """`lastmile queue` opens the outbox while the forwarder sends: taking the forwarder's items
    back would send them twice."""
    with _open(tmp_path) as forwarder, _open(tmp_path) as cli:
        mine = forwarder.add(Kind.DICOM, "a", b"dicom", now=1.0).item.id
        theirs = forwarder.add(Kind.DICOM, "b", b"dicom", now=1.0).item.id
        assert [i.id for i in forwarder.claim(Kind.DICOM, 1, 2.0)] == [mine]
        assert forwarder.begin_send(mine, 2.0)
        assert [i.id for i in cli.claim(Kind.DICOM, 1, 2.0)] == [theirs]
        assert forwarder.recover_interrupted(now=5.0) == 0
        assert cli.recover_interrupted(now=5.0) == 0
        assert _progress(cli, mine) == ("sending", 1, 0, 2.0)
        assert _progress(cli, theirs) == ("sending", 0, 0, 2.0)


# -- a full disk: moving items along must go on ----------------------------------------------------
def _autocheckpoint(outbox: Outbox) -> int:
    return int(outbox.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])


def _cap_database_at_its_size(outbox: Outbox) -> None:
    """SQLite answers "database or disk is full" as soon as the file would grow."""
    pages = outbox.db.execute("PRAGMA page_count").fetchone()[0]
    outbox.db.execute(f"PRAGMA max_page_count={pages}")


def _uncap(outbox: Outbox) -> None:
    outbox.db.execute("PRAGMA max_page_count=1073741823")


def test_on_a_full_disk_a_write_that_moves_items_along_spends_the_reserve_and_keeps_the_wal_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sending and purging free space; stopping them on a full disk would keep it full for ever.
    The reserve file's room is given to the database, and while it is spent the WAL is
    checkpointed every 64 pages (reused, never grown), back to SQLite's 1000 once it is back."""
    reserve = tmp_path / "data" / "reserve.space"
    with Outbox.open(tmp_path / "data", min_free_bytes=2 * 2**20, reserve_bytes=2**20) as outbox:
        assert reserve.exists() and _autocheckpoint(outbox) == 1000
        real_release = SpaceReserve.release

        def release(self: SpaceReserve) -> bool:  # the reserve file's blocks are free again
            freed = real_release(self)
            _uncap(outbox)
            return freed

        monkeypatch.setattr(SpaceReserve, "release", release)
        _cap_database_at_its_size(outbox)
        outbox.record_status("reading_center", {"log": "x" * 200_000}, 1.0)
        assert outbox.status("reading_center") == {"log": "x" * 200_000}
        assert not reserve.exists() and _autocheckpoint(outbox) == 64
        assert outbox.ensure_reserve() is True
        assert reserve.exists() and _autocheckpoint(outbox) == 1000


def test_with_the_reserve_spent_the_wal_is_restarted_and_the_write_tried_once_more(tmp_path: Path) -> None:
    """No reserve left: the WAL is copied into the database so the next transaction writes over
    its own blocks, and the write is tried once more; when even that finds no room the error
    reaches the caller (the forwarder backs off and says so). A reader keeping the WAL busy
    means no room was made: not tried again."""
    with Outbox.open(tmp_path / "data", min_free_bytes=0, reserve_bytes=0) as outbox:
        statements: list[str] = []
        outbox.db.conn.set_trace_callback(statements.append)
        _cap_database_at_its_size(outbox)
        with pytest.raises(sqlite3.OperationalError, match="full"):
            outbox.record_status("reading_center", {"log": "x" * 200_000}, 1.0)
        tries = [s for s in statements if s.startswith("INSERT INTO status")]
        assert len(tries) == 2 and "PRAGMA wal_checkpoint(RESTART)" in statements

        outbox.db.execute("PRAGMA busy_timeout=0")  # the busy reader answers at once
        outbox.record_status("small", {"ok": True}, 1.5)  # fits in a page: a frame in the WAL
        reader = sqlite3.connect(tmp_path / "data" / "outbox.sqlite", isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM status").fetchall()  # reads from the WAL
            statements.clear()
            with pytest.raises(sqlite3.OperationalError, match="full"):
                outbox.record_status("reading_center", {"log": "x" * 200_000}, 2.0)
        finally:
            reader.close()
        assert len([s for s in statements if s.startswith("INSERT INTO status")]) == 1
        _uncap(outbox)
        outbox.record_status("reading_center", {"ok": True}, 3.0)
        assert outbox.status("reading_center") == {"ok": True}


def test_an_error_that_is_not_a_full_disk_spends_no_reserve(tmp_path: Path) -> None:
    """The reserve is for a full disk only: spent on any other error, it would be gone when the
    disk really fills."""
    reserve = tmp_path / "data" / "reserve.space"
    with Outbox.open(tmp_path / "data", min_free_bytes=2 * 2**20, reserve_bytes=2**20) as outbox:
        outbox.db.execute("PRAGMA query_only=ON")  # "attempt to write a readonly database"
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            outbox.record_status("reading_center", {"ok": True}, 1.0)
        assert reserve.exists() and _autocheckpoint(outbox) == 1000


def test_a_free_space_check_that_fails_does_not_claim_a_reserve(tmp_path: Path) -> None:
    def statvfs(_path: object) -> os.statvfs_result:
        raise OSError(errno.EIO, "Input/output error")

    with Outbox.open(tmp_path / "data", min_free_bytes=0, reserve_bytes=2**20, statvfs=statvfs) as outbox:
        assert outbox.ensure_reserve() is False


# -- a WAL checkpoint that fails ---------------------------------------------------------------------
class CheckpointsFindNoRoom(sqlite3.Connection):
    """While `no_room` is set, WAL checkpoints fail as they do on a full card (SQLite's own error
    for ENOSPC, which no in-process file system here can give)."""

    no_room = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.no_room and sql.startswith("PRAGMA wal_checkpoint"):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)


@pytest.fixture
def card_full_at_checkpoints(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """Outboxes opened in the test use CheckpointsFindNoRoom; call with True/False to fill/free the card."""
    monkeypatch.setattr(sqlite3, "connect", functools.partial(sqlite3.connect, factory=CheckpointsFindNoRoom))
    return lambda full: monkeypatch.setattr(CheckpointsFindNoRoom, "no_room", full)


@contextlib.contextmanager
def files_cannot_grow_past(path: Path) -> Iterator[None]:
    """A real write failure, not a full disk: the kernel refuses writes past the file's size
    limit (EFBIG under RLIMIT_FSIZE), which SQLite reports as "disk I/O error"."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal kills the test
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 2048, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _wal(tmp_path: Path) -> Path:
    return tmp_path / "data" / "outbox.sqlite-wal"


def _purge_one(outbox: Outbox, payload: bytes, now: float) -> None:
    item = outbox.add(Kind.FHIR_BUNDLE, f"k{now}", payload, now=now).item
    assert outbox.claim(Kind.FHIR_BUNDLE, 1, now)
    outbox.mark_sent([item.id], now=now)
    outbox.mark_committed([item.id], now=now)
    assert outbox.purge_due(now=now + 10.0, retention_s=0.0) == 1


def test_a_checkpoint_a_full_card_put_off_is_done_by_the_next_purge_even_with_nothing_due(
    tmp_path: Path, card_full_at_checkpoints: Callable[[bool], None]
) -> None:
    """Purging must not stop on a full card (it is what frees space), but the purged patient's
    bytes stay in the WAL until a checkpoint: the next purge must do it, not wait for the next
    item to purge (the last patient of a retention period would stay on the card for ever)."""
    with _open(tmp_path) as outbox:
        card_full_at_checkpoints(True)
        _purge_one(outbox, b"PATIENT-ZHANG-SAN", 1.0)
        assert b"PATIENT-ZHANG-SAN" in _wal(tmp_path).read_bytes()
        assert outbox.checkpoint() is False
        card_full_at_checkpoints(False)
        assert outbox.purge_due(now=100.0, retention_s=0.0) == 0
        assert _wal(tmp_path).stat().st_size == 0
        _purge_one(outbox, b"PATIENT-LI-SI", 200.0)  # done: the next purge checkpoints again
        card_full_at_checkpoints(True)
        assert outbox.checkpoint() is False and b"PATIENT-LI-SI" not in _wal(tmp_path).read_bytes()


def test_a_purge_with_nothing_due_writes_nothing(tmp_path: Path) -> None:
    """The forward loop purges every cycle: a checkpoint each time would write every page to the
    card twice (WAL, then database) instead of letting SQLite batch them."""
    with _open(tmp_path) as outbox:
        outbox.add(Kind.FHIR_BUNDLE, "waiting", b"w" * 3000, now=1.0)
        wal_bytes = _wal(tmp_path).stat().st_size
        assert wal_bytes > 0 and outbox.purge_due(now=2.0, retention_s=0.0) == 0
        assert _wal(tmp_path).stat().st_size == wal_bytes


def test_the_space_a_purge_frees_first_sets_the_reserve_aside_again(tmp_path: Path) -> None:
    """The reserve spent on a full card comes back with the first purge that frees room, so the
    next full card can be drained again."""
    reserve = tmp_path / "data" / "reserve.space"
    with Outbox.open(tmp_path / "data", min_free_bytes=2 * 2**20, reserve_bytes=2**20) as outbox:
        reserve.unlink()  # spent on a full card
        _purge_one(outbox, b"PATIENT-ZHANG-SAN", 1.0)
        assert reserve.stat().st_size == 2**20


def test_a_checkpoint_that_fails_for_another_reason_than_room_reaches_the_caller(tmp_path: Path) -> None:
    """An I/O error taken for "no room" would be retried at every purge, silently, on a failing card."""
    with _open(tmp_path) as outbox:
        assert outbox.checkpoint()
        item = outbox.add(Kind.FHIR_BUNDLE, "obs", b"o" * 12_000, now=1.0).item  # new pages, in the WAL only
        with files_cannot_grow_past(tmp_path / "data" / "outbox.sqlite"):
            with pytest.raises(sqlite3.OperationalError, match="I/O"):
                outbox.checkpoint()
        assert outbox.checkpoint() and outbox.read_payload(item) == b"o" * 12_000


def test_with_the_reserve_spent_a_wal_restart_that_fails_is_not_taken_for_room(
    tmp_path: Path, card_full_at_checkpoints: Callable[[bool], None]
) -> None:
    """A full card with the reserve spent: when the WAL restart finds no room either, the write is
    not tried again (it would fail the same way) and the caller hears "full"; when the restart
    fails with an I/O error, the caller hears that error, not "full" (which says: free space)."""
    with Outbox.open(tmp_path / "data", min_free_bytes=0, reserve_bytes=0) as outbox:
        statements: list[str] = []
        outbox.db.conn.set_trace_callback(statements.append)
        assert outbox.checkpoint()
        item = outbox.add(Kind.FHIR_BUNDLE, "obs", b"o" * 12_000, now=1.0).item  # new pages, in the WAL only
        _cap_database_at_its_size(outbox)
        card_full_at_checkpoints(True)
        statements.clear()
        with pytest.raises(sqlite3.OperationalError, match="full"):
            outbox.record_status("reading_center", {"log": "x" * 200_000}, 2.0)
        assert len([s for s in statements if s.startswith("INSERT INTO status")]) == 1
        card_full_at_checkpoints(False)
        with files_cannot_grow_past(tmp_path / "data" / "outbox.sqlite"):
            with pytest.raises(sqlite3.OperationalError, match="I/O"):
                outbox.record_status("reading_center", {"log": "x" * 200_000}, 3.0)
        _uncap(outbox)
        outbox.record_status("reading_center", {"ok": True}, 4.0)
        assert outbox.status("reading_center") == {"ok": True} and outbox.read_payload(item) == b"o" * 12_000


# -- what add and replace leave behind when the database refuses ------------------------------------
def _files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "data" / "payloads").rglob("*.bin"))


def test_an_add_the_database_refuses_leaves_no_payload_file_and_says_why(tmp_path: Path) -> None:
    """Not a full disk: the real error reaches the caller (no "storage full" advice that would
    send the doctor to free space), and the file written for it is removed, not orphaned."""
    with _open(tmp_path) as outbox:
        kept = outbox.add(Kind.DICOM, "kept", b"a" * 20_000, now=1.0).item
        held = outbox.add(Kind.DICOM, "held", b"b" * 20_000, now=1.0, hold=Hold("unassigned", 100.0)).item
        before = _files(tmp_path)
        outbox.db.execute("PRAGMA query_only=ON")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            outbox.add(Kind.DICOM, "new", b"c" * 20_000, now=2.0)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            outbox.replace_held_payload(held.id, b"d" * 20_000, 2.0)
        assert _files(tmp_path) == before
        outbox.db.execute("PRAGMA query_only=OFF")
        assert outbox.find("new") is None
        assert outbox.read_payload(kept) == b"a" * 20_000 and outbox.read_payload(held) == b"b" * 20_000


def test_the_same_key_added_by_two_writers_at_once_is_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes importing the same ECG: the second finds no item, writes its file, and
    meets the first one's row inside its transaction. One item (sent once), the first payload,
    the second file removed."""
    with _open(tmp_path) as outbox:
        first = outbox.add(Kind.DICOM, "ecg", b"a" * 20_000, now=1.0).item
        files = _files(tmp_path)
        monkeypatch.setattr(outbox, "find", lambda key: None)  # the other writer's row came after the look-up
        again = outbox.add(Kind.DICOM, "ecg", b"b" * 20_000, now=2.0)
        assert (again.created, again.item.id, again.item.sha256) == (False, first.id, first.sha256)
        assert _files(tmp_path) == files
        assert outbox.read_payload(again.item) == b"a" * 20_000
        assert len(outbox.items()) == 1


# -- the defaults a gateway runs with ---------------------------------------------------------------
def test_an_outbox_opened_with_the_defaults_keeps_200_mb_free_and_retries_from_5_s_to_15_min(tmp_path: Path) -> None:
    with Outbox.open(tmp_path / "data") as outbox:
        assert outbox.min_free_bytes == 200 * 2**20
        assert (outbox.backoff_base_s, outbox.backoff_max_s) == (5.0, 900.0)


def test_adding_is_fsynced_and_only_the_send_bookkeeping_is_not(tmp_path: Path) -> None:
    """A device may delete its copy once `add` returned: that commit must survive a power cut
    (synchronous=FULL). Claims, send charges, sent marks and releases skip the fsync (a power
    cut costs a counter or a resend under the same UIDs); quarantine and commitment do not."""
    with _open(tmp_path) as outbox:
        statements: list[str] = []
        outbox.db.conn.set_trace_callback(statements.append)

        def relaxed(action: Any) -> bool:
            statements.clear()
            action()
            # whatever the write, the connection is back to FULL for the next one
            assert outbox.db.execute("PRAGMA synchronous").fetchone()[0] == 2
            return "PRAGMA synchronous=NORMAL" in statements

        item = outbox.add(Kind.DICOM, "a", b"x", now=1.0).item
        other = outbox.add(Kind.DICOM, "b", b"y", now=1.0).item
        assert not relaxed(lambda: outbox.add(Kind.DICOM, "c", b"z", now=1.0))
        assert relaxed(lambda: outbox.claim(Kind.DICOM, 10, 2.0))
        assert relaxed(lambda: outbox.begin_send(item.id, 2.0))
        assert relaxed(lambda: outbox.mark_sent([item.id], 3.0))
        assert relaxed(lambda: outbox.release([other.id], "peer down", 3.0, 0.0))
        outbox.claim(Kind.DICOM, 10, 3.0)
        assert not relaxed(lambda: outbox.mark_transient_failure(other.id, "timeout", 3.0))
        assert not relaxed(lambda: outbox.quarantine(other.id, "refused", 4.0))
        assert not relaxed(lambda: outbox.mark_committed([item.id], 5.0))


def test_a_stat_ecg_stored_by_an_earlier_version_is_still_stat(tmp_path: Path) -> None:
    """Priorities are stored as numbers (0 STAT, 1 routine) that every version must read alike:
    read otherwise after an upgrade, a waiting STAT ECG would queue behind routine ones."""
    with _open(tmp_path) as outbox:
        outbox.add(Kind.DICOM, "routine", b"r", now=1.0)
        outbox.add(Kind.DICOM, "stat", b"s", priority=Priority.STAT, now=2.0)
    with sqlite3.connect(tmp_path / "data" / "outbox.sqlite") as conn:
        assert conn.execute("SELECT key, priority FROM items ORDER BY id").fetchall() == [("routine", 1), ("stat", 0)]
    conn.close()
    assert (Priority(0), Priority(1)) == (Priority.STAT, Priority.ROUTINE)


def test_an_object_that_kills_the_forwarder_five_times_is_quarantined_not_four(tmp_path: Path) -> None:
    with _open(tmp_path) as outbox:
        item = outbox.add(Kind.DICOM, "crasher", b"x", now=1.0).item
        for n in range(1, 6):
            assert [i.id for i in outbox.claim(Kind.DICOM, 1, 10.0 * n)] == [item.id], n
            assert outbox.begin_send(item.id, 10.0 * n)
            assert outbox.interrupt_sends([item.id], "killed", 10.0 * n) == 1
        assert outbox.claim(Kind.DICOM, 1, 100.0) == []
        quarantined = outbox.get(item.id)
        assert quarantined is not None and "killed during send 5 times" in (quarantined.quarantine_reason or "")


# -- edges of reading and opening --------------------------------------------------------------------
def test_a_closed_outbox_says_so(tmp_path: Path) -> None:
    outbox = _open(tmp_path)
    outbox.close()
    with pytest.raises(RuntimeError, match="closed"):
        outbox.get(1)
    with pytest.raises(RuntimeError, match="closed"):
        outbox.record_status("x", {}, 1.0)
    outbox.close()  # twice is fine


def test_reading_the_payload_of_an_item_that_is_not_there_says_so(tmp_path: Path) -> None:
    with _open(tmp_path) as outbox, _open(tmp_path / "other") as other:
        stranger = other.add(Kind.DICOM, "x", b"x", now=1.0).item
        with pytest.raises(LookupError, match="does not exist"):
            outbox.read_payload(stranger)


def test_an_outbox_that_cannot_be_opened_says_why(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "locks").write_text("not a directory")
    with pytest.raises(FileExistsError):
        _open(tmp_path)


def test_an_empty_batch_changes_nothing(tmp_path: Path) -> None:
    with _open(tmp_path) as outbox:
        outbox.add(Kind.DICOM, "a", b"x", now=1.0)
        changes = outbox.db.conn.total_changes
        outbox.mark_sent([], 2.0)
        outbox.release([], "x", 2.0, 0.0)
        assert outbox.interrupt_sends([], "x", 2.0) == 0
        outbox.set_transaction([], "1.2.3", 2.0)
        outbox.remember_commitment_request([], "1.2.3", 2.0)
        assert outbox.db.conn.total_changes == changes


def test_a_kernel_that_does_not_name_its_boot_gives_tokens_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a boot id a send cut short can never be taken for a power cut: charged."""
    monkeypatch.setattr(outbox_module, "BOOT_ID", tmp_path / "no-such-file")
    assert current_boot() == ""
    with _open(tmp_path) as outbox:
        assert outbox.owner.startswith("-") and len(outbox.owner) == 33


def test_lastmile_queue_reads_the_outbox_without_writing_and_sees_what_is_in_the_wal(tmp_path: Path) -> None:
    """`lastmile queue` on a partition too full for the outbox to open: the same figures, read
    only, including items committed to the WAL but not yet checkpointed into the database."""
    with pytest.raises(FileNotFoundError):
        snapshot_stats(tmp_path / "data", 10.0)
    with _open(tmp_path) as outbox:
        outbox.add(Kind.DICOM, "a", b"x" * 100, now=1.0)
        outbox.add(Kind.FHIR_BUNDLE, "b", b"y" * 50, now=2.0, hold=Hold("unassigned", 100.0))
        outbox.claim(Kind.DICOM, 1, 3.0)
        outbox.record_status("reading_center", {"fault": None}, 3.0)
        snapshot = snapshot_stats(tmp_path / "data", 10.0)
        live = outbox.stats(10.0)
        assert snapshot["counts"]["queued"] == snapshot["counts"]["sending"] == 1
        assert (snapshot["held"], snapshot["waiting_bytes"]) == (1, 150)
        assert snapshot["statuses"] == {"reading_center": {"fault": None}}
        assert {k: v for k, v in snapshot.items() if k != "free_bytes"} == {
            k: v for k, v in live.items() if k != "free_bytes"
        }
        assert isinstance(snapshot["free_bytes"], int)


def test_lastmile_queue_on_a_locked_outbox_waits_the_busy_timeout_then_reads_the_file_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection holding the outbox in exclusive locking mode (what SQLite does with no room
    for the -shm index) keeps the read-only reader out: it waits the busy timeout in seconds
    (milliseconds taken as seconds would hang the technician's command for days), then reads
    the database file as it is on disk, without the lock."""
    with _open(tmp_path) as outbox:
        outbox.add(Kind.DICOM, "a", b"x" * 100, now=1.0)
    holder = sqlite3.connect(tmp_path / "data" / outbox_module.DB_NAME)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        monkeypatch.setattr(outbox_module, "BUSY_TIMEOUT_MS", 200)
        # what `lastmile queue` reads more of the same snapshot (the oldest wait for the link)
        snapshot = snapshot_stats(  # the suite's timeout catches a hang
            tmp_path / "data", 10.0, read_more=lambda conn: {"oldest_waiting_s": oldest_wait_s(conn, 10.0)}
        )
    finally:
        holder.close()
    assert snapshot["counts"]["queued"] == 1 and snapshot["oldest_waiting_s"] == 9.0


# -- what each outcome leaves on the item: the next send must be charged exactly once ---------------
def _attempts(outbox: Outbox, item_id: int) -> tuple[int, int]:
    item = outbox.get(item_id)
    assert item is not None
    return item.attempts, item.interrupted_sends


def test_a_successful_send_clears_the_crash_count_and_a_later_requeue_is_charged(tmp_path: Path) -> None:
    """An object stored by the peer did not crash the forwarder: its count of cut-short sends
    starts again (else an old count could quarantine it later), and when the commitment then
    fails the resend is charged like any other."""
    with _open(tmp_path) as outbox:
        item = outbox.add(Kind.DICOM, "ecg", b"x", now=1.0).item.id
        outbox.claim(Kind.DICOM, 1, 2.0)
        assert outbox.begin_send(item, 2.0) and outbox.interrupt_sends([item], "killed", 2.0) == 1
        assert _attempts(outbox, item) == (1, 1)
        outbox.claim(Kind.DICOM, 1, 10_000.0)
        assert outbox.begin_send(item, 10_000.0)
        outbox.mark_sent([item], 10_001.0)
        assert _attempts(outbox, item) == (2, 0)
        outbox.requeue([item], "commitment failed", 10_002.0)
        assert _attempts(outbox, item) == (3, 0)


def test_an_item_released_or_quarantined_mid_send_is_charged_once_on_its_next_failure(tmp_path: Path) -> None:
    """Released (the fault was not the item's) or quarantined and retried by the operator, an
    item is no longer on the wire: its next failure without a new `begin_send` charges one."""
    with _open(tmp_path) as outbox:
        released = outbox.add(Kind.DICOM, "released", b"x", now=1.0).item.id
        retried = outbox.add(Kind.DICOM, "retried", b"y", now=1.0).item.id
        outbox.claim(Kind.DICOM, 10, 2.0)
        assert outbox.begin_send(released, 2.0) and outbox.begin_send(retried, 2.0)
        outbox.release([released], "association rejected", 3.0, 0.0)
        outbox.quarantine(retried, "refused", 3.0)
        assert outbox.retry(retried, 4.0)
        assert _attempts(outbox, released) == (0, 0) and _attempts(outbox, retried) == (0, 0)
        assert {i.id for i in outbox.claim(Kind.DICOM, 10, 5.0)} == {released, retried}
        for item_id in (released, retried):
            outbox.mark_transient_failure(item_id, "timeout", 5.0)
            assert _attempts(outbox, item_id) == (1, 0)


def test_retrying_every_quarantined_item_starts_their_attempts_again(tmp_path: Path) -> None:
    with _open(tmp_path) as outbox:
        item = outbox.add(Kind.DICOM, "ecg", b"x", now=1.0).item.id
        outbox.claim(Kind.DICOM, 1, 2.0)
        outbox.mark_transient_failure(item, "timeout", 2.0)
        outbox.quarantine(item, "refused", 3.0)
        assert outbox.retry_quarantined(4.0) == 1
        retried = outbox.get(item)
        assert retried is not None and (retried.state.value, retried.attempts, retried.next_attempt_at) == (
            "queued",
            0,
            4.0,
        )


@pytest.mark.parametrize("limit", [0, 1])
def test_a_limit_of_zero_or_one_interrupted_send_quarantines_after_the_first_never_before(
    tmp_path: Path, limit: int
) -> None:
    """However low the setting, an object that never cut a send short is never quarantined for it."""
    with _open(tmp_path) as outbox:
        crasher = outbox.add(Kind.DICOM, "crasher", b"x", now=1.0).item.id
        fine = outbox.add(Kind.DICOM, "fine", b"y", now=1.0).item.id
        outbox.claim(Kind.DICOM, 10, 2.0, max_interrupted_sends=limit)
        assert outbox.begin_send(crasher, 2.0) and outbox.interrupt_sends([crasher], "killed", 2.0) == 1
        outbox.release([fine], "peer down", 2.0, 0.0)
        assert [i.id for i in outbox.claim(Kind.DICOM, 10, 100.0, max_interrupted_sends=limit)] == [fine]
        assert outbox.get(crasher).state.value == "quarantined"  # type: ignore[union-attr]


def test_claiming_nothing_writes_nothing(tmp_path: Path) -> None:
    """A forwarder with no free association asks for 0 items: no claim and no quarantine."""
    with _open(tmp_path) as outbox:
        item = outbox.add(Kind.DICOM, "crasher", b"x", now=1.0).item.id
        outbox.claim(Kind.DICOM, 1, 2.0)
        assert outbox.begin_send(item, 2.0) and outbox.interrupt_sends([item], "killed", 2.0) == 1
        changes = outbox.db.conn.total_changes
        assert outbox.claim(Kind.DICOM, 0, 100.0, max_interrupted_sends=1) == []
        assert outbox.db.conn.total_changes == changes
        assert outbox.get(item).state.value == "queued"  # type: ignore[union-attr]


# -- what the doctor and the forwarder are told ------------------------------------------------------
def _full_outbox(tmp_path: Path) -> tuple[Outbox, dict[str, int]]:
    free = {"bytes": 10 * 2**30}

    def statvfs(_path: object) -> os.statvfs_result:
        return SimpleNamespace(f_bavail=free["bytes"] // 4096, f_frsize=4096)  # type: ignore[return-value]

    return Outbox.open(tmp_path / "data", min_free_bytes=100 * 2**20, statvfs=statvfs, reserve_bytes=0), free


def test_the_refusal_counts_one_waiting_item_in_the_singular_and_says_when_nothing_waits(tmp_path: Path) -> None:
    outbox, free = _full_outbox(tmp_path)
    with outbox:
        free["bytes"] = 50 * 2**20
        with pytest.raises(OutboxFullError) as nothing:
            outbox.add(Kind.DICOM, "new", b"x" * 20_000)
        assert str(nothing.value).startswith("storage full: nothing is waiting to be sent; call the county IT")
        free["bytes"] = 10 * 2**30
        outbox.add(Kind.DICOM, "ecg", b"x" * 20_000)
        free["bytes"] = 50 * 2**20
        with pytest.raises(OutboxFullError) as one:
            outbox.add(Kind.DICOM, "new", b"x" * 20_000)
        assert str(one.value).startswith("storage full: 1 ECG is waiting to be sent; connect the network")


def test_a_stat_ecg_waiting_takes_the_link_only_while_it_is_due_unclaimed_and_not_held(tmp_path: Path) -> None:
    """The forwarder asks between routine objects whether a STAT one waits: a wrong "no" lets a
    STAT ECG be overtaken by a backlog; a wrong "yes" stalls the routine ones for nothing."""
    with _open(tmp_path) as outbox:
        outbox.add(Kind.DICOM, "routine", b"r", now=1.0)
        assert outbox.stat_waiting(Kind.DICOM, 2.0) is False
        outbox.add(Kind.DICOM, "held", b"h", priority=Priority.STAT, now=1.0, hold=Hold("re-record", 50.0))
        assert outbox.stat_waiting(Kind.DICOM, 2.0) is False
        assert outbox.stat_waiting(Kind.DICOM, 50.0) is True
        assert outbox.stat_waiting(Kind.FHIR_BUNDLE, 50.0) is False
        outbox.claim(Kind.DICOM, 10, 50.0)
        assert outbox.stat_waiting(Kind.DICOM, 50.0) is False


def test_the_oldest_wait_is_never_negative_when_the_clock_was_set_back(tmp_path: Path) -> None:
    with _open(tmp_path) as outbox:
        outbox.add(Kind.DICOM, "ecg", b"x", now=100.0)
        assert oldest_wait_s(outbox.db.conn, 40.0) == 0.0
        assert oldest_wait_s(outbox.db.conn, 100.5) == 0.5


def test_an_item_of_another_outbox_has_no_payload_file_here(tmp_path: Path) -> None:
    with _open(tmp_path) as outbox, _open(tmp_path / "other") as other:
        stranger = other.add(Kind.DICOM, "x", b"x" * 20_000, now=1.0).item
        assert other.payload_path(stranger) is not None
        assert outbox.payload_path(stranger) is None


def test_the_owner_locks_directory_is_private(tmp_path: Path) -> None:
    """Every lastmile service runs as one user: nobody else lists who is sending."""
    with _open(tmp_path):
        assert (tmp_path / "data" / "locks").stat().st_mode & 0o777 == 0o700


def test_a_payload_file_being_added_is_not_swept_as_an_orphan_by_another_process_opening(tmp_path: Path) -> None:
    """Between writing an ECG's file and committing its row, the file has no row: another
    process opening the outbox then (`lastmile queue`, a restarted service) sweeps files without
    a row. The writer holds the payload lock until its commit, so the sweep waits (here: gives
    up) instead of deleting an ECG the device was told is stored. Replacing a held payload alike."""
    with _open(tmp_path) as outbox:
        held = outbox.add(Kind.DICOM, "held", b"h" * 20_000, now=1.0, hold=Hold("unassigned", 100.0)).item
        sweeps: list[list[str]] = []

        def sweep_at_commit(statement: str) -> None:
            if statement == "BEGIN IMMEDIATE":  # the file is written, its row not yet committed
                other = PayloadFiles(tmp_path / "data" / "payloads")
                sweeps.append(other.remove_orphans(lambda: set(_files(tmp_path)) - set(new_files()), wait_s=0.05))

        def new_files() -> list[str]:
            return [name for name in _files(tmp_path) if name not in before]

        before = _files(tmp_path)
        outbox.db.conn.set_trace_callback(sweep_at_commit)
        item = outbox.add(Kind.DICOM, "ecg", b"e" * 20_000, now=2.0).item
        before = _files(tmp_path)
        assert outbox.replace_held_payload(held.id, b"r" * 20_000, 3.0)
        outbox.db.conn.set_trace_callback(None)
        assert sweeps == [[], []]
        assert outbox.read_payload(item) == b"e" * 20_000
        assert outbox.read_payload(held) == b"r" * 20_000


def test_a_replacement_of_exactly_16_kib_stays_in_the_database(tmp_path: Path) -> None:
    with _open(tmp_path) as outbox:
        held = outbox.add(Kind.DICOM, "held", b"h" * 20_000, now=1.0, hold=Hold("unassigned", 100.0)).item
        assert outbox.replace_held_payload(held.id, b"r" * 16384, 2.0)
        assert outbox.payload_path(held) is None and _files(tmp_path) == []
        assert outbox.read_payload(held) == b"r" * 16384


def test_the_data_directory_is_private_and_made_with_its_parents(tmp_path: Path) -> None:
    """Patient data: only lastmile's user may enter; a fresh SD card has no directories yet."""
    data_dir = tmp_path / "card" / "lastmile" / "data"
    with Outbox.open(data_dir, min_free_bytes=0):
        assert data_dir.stat().st_mode & 0o777 == 0o700


def test_the_wal_is_cut_back_to_8_mib_after_a_checkpoint(tmp_path: Path) -> None:
    """A burst of ECGs may grow the WAL; left at its largest it would hold card space for ever."""
    with _open(tmp_path) as outbox:
        assert outbox.db.execute("PRAGMA journal_size_limit").fetchone()[0] == 8 * 2**20


@pytest.mark.parametrize(("min_free_mb", "reserve_mb"), [(4, 2), (200, 16)])
def test_the_reserve_is_half_the_free_space_floor_at_most_16_mib(
    tmp_path: Path, min_free_mb: int, reserve_mb: int
) -> None:
    """The reserve must fit in the space the floor keeps free (else adding would eat it), and
    16 MiB is enough to send and purge about a hundred items on a full disk."""
    with Outbox.open(tmp_path / "data", min_free_bytes=min_free_mb * 2**20):
        assert (tmp_path / "data" / "reserve.space").stat().st_size == reserve_mb * 2**20


def test_recovery_at_open_is_stamped_with_the_time_given(tmp_path: Path) -> None:
    """`lastmile` passes its own clock (tests, or a clock set from GPS): the recovered claims
    and the items quarantined at open carry that time, not the system's."""
    data_dir = tmp_path / "data"
    with _open(tmp_path) as outbox:
        cut, waiting = _claimed_by_a_dead_owner(outbox, data_dir, f"{EARLIER_BOOT}-{'ab' * 16}", in_flight=1)
    with Outbox.open(data_dir, min_free_bytes=0, now=50.0) as outbox:
        assert _progress(outbox, cut) == ("queued", 0, 0, 50.0)
        assert _progress(outbox, waiting) == ("queued", 0, 0, 50.0)


def test_an_outbox_whose_recovery_fails_at_open_is_not_handed_out_half_open(tmp_path: Path) -> None:
    """The caller gets the error, not an outbox that skipped its recovery; its owner lock is let
    go, so the next open (once the cause is gone) recovers normally."""
    with _open(tmp_path):
        pass
    odd = tmp_path / "data" / "locks" / f"owner-{'ef' * 16}.lock"
    odd.mkdir()  # a lock "file" that cannot be opened: the stale-lock sweep fails
    with pytest.raises(IsADirectoryError):
        _open(tmp_path)
    assert sorted(p.name for p in odd.parent.iterdir()) == [odd.name]
    odd.rmdir()
    with _open(tmp_path) as outbox:
        assert outbox.items() == []


class _StopsTheService:
    """A hold time whose conversion is where the service's SIGTERM handler raises SystemExit."""

    def __float__(self) -> float:
        raise SystemExit("SIGTERM")


def test_a_service_stopped_while_the_row_is_written_leaves_no_payload_file(tmp_path: Path) -> None:
    """systemd stops the acquire service in the middle of an add: the transaction rolls back and
    the ECG's file, written a moment before, goes with it (no orphan until the next open), and
    the stop goes on."""
    with _open(tmp_path) as outbox:
        with pytest.raises(SystemExit):
            outbox.add(Kind.DICOM, "ecg", b"e" * 20_000, now=1.0, hold=Hold("unassigned", _StopsTheService()))  # type: ignore[arg-type]
        assert _files(tmp_path) == [] and outbox.find("ecg") is None


def test_a_reader_puts_a_purges_checkpoint_off_briefly_not_for_the_busy_timeout(tmp_path: Path) -> None:
    """A console page holding a read transaction keeps the WAL busy: the purge's checkpoint (run
    with the outbox's lock held, in the forward loop) gives up after CHECKPOINT_WAIT_MS instead of
    SQLite's 15 s busy timeout, so sending is not stalled each round; the checkpoint is owed, and
    the next purge does it once the reader is gone. The connection's busy timeout is given back."""
    import threading

    with _open(tmp_path) as outbox:
        statements: list[str] = []
        outbox.db.conn.set_trace_callback(statements.append)
        reader = sqlite3.connect(tmp_path / "data" / "outbox.sqlite", isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM items").fetchone()  # a snapshot: the WAL is in use
        outbox.add(Kind.FHIR_BUNDLE, "later", b"l" * 3000, now=1.0)  # frames the reader does not see
        result: list[bool] = []
        purge = threading.Thread(target=lambda: result.append(outbox.checkpoint()))
        purge.start()
        purge.join(timeout=10.0)  # 1/20 of it would do; far under the 15 s the busy timeout would take
        assert not purge.is_alive() and result == [False]
        wait = f"PRAGMA busy_timeout={outbox_module.CHECKPOINT_WAIT_MS}"
        assert statements.index(wait) < statements.index("PRAGMA wal_checkpoint(TRUNCATE)")
        assert outbox.db.execute("PRAGMA busy_timeout").fetchone()[0] == outbox_module.BUSY_TIMEOUT_MS
        reader.execute("COMMIT")
        reader.close()
        assert outbox.purge_due(now=2.0, retention_s=0.0) == 0  # nothing due, but the checkpoint owed
        assert _wal(tmp_path).stat().st_size == 0
