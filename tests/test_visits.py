"""Visits: clock without RTC, checks as flags, the signed hash chain, households."""

from __future__ import annotations

import datetime as dt
import json
import signal
import sqlite3
import stat
from pathlib import Path

import pytest

from devices.identity import EARLIEST_PLAUSIBLE, TimeSource
from lastmile.clock import Stamp
from lastmile.visits.book import FixRecord, VisitBook, VisitError
from lastmile.visits.chain import KEY_FILE, verify_export
from lastmile.visits.households import RegisterError, distance_m, parse_register
from tests.conftest import run_python
from tests.fhir_samples import blood_pressure
from tests.visit_harness import GPS_T, HOUSE, FakeClocks, fix_at, offset, open_book


@pytest.fixture
def book_factory(tmp_path: Path):
    books = []

    def make(clocks: FakeClocks, **policy: object) -> VisitBook:
        book = open_book(tmp_path / "data", clocks, **policy)
        books.append(book)
        register = tmp_path / "households.csv"
        register.write_text("household_id,latitude,longitude\nHH-1,%f,%f\n" % HOUSE)
        book.register.sync_from(register, "2026-01-01")
        return book

    yield make
    for b in books:
        b.close()


def test_boot_at_1970_nothing_before_2020_and_gps_repairs(book_factory) -> None:
    clocks = FakeClocks(wall=0.0)  # 1970
    book = book_factory(clocks)
    visit = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
    assert visit.start.time is None and visit.start.source == TimeSource.UNKNOWN
    clocks.advance(30)
    book.note("patient reports dizziness")
    clocks.advance(30)
    # The receiver gets a fix: GPS time repairs everything stamped in this boot.
    book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())
    repaired = book.get(visit.id)
    assert repaired is not None and repaired.start.time == GPS_T - dt.timedelta(seconds=60)
    assert repaired.start.source == TimeSource.GPS
    clocks.advance(600)
    closed = book.stop(FixRecord(fix_at(*HOUSE, GPS_T + dt.timedelta(seconds=600)), book.clock.now()))
    assert closed.end is not None and closed.end.time == GPS_T + dt.timedelta(seconds=600)
    body = book.record_body(visit.id)
    assert body["notes"][0]["at"].startswith("2026-03-02T07:59:30")
    for stamp in (closed.start, closed.end):
        assert stamp.time is not None and stamp.time >= EARLIEST_PLAUSIBLE
    assert "provisional-time" not in closed.flags


def test_one_visit_that_fails_to_sign_is_set_aside_and_the_others_are_signed(book_factory, tmp_path: Path) -> None:
    """Visits stopped before any time was known are signed when GPS gives it: one whose record
    was damaged on the SD card meanwhile (its start fix) raised out of the signing pass, out of
    the receiver's fix (the acquire service's GNSS part), and no visit after it was ever signed.
    It is set aside, with why; the others are signed and verify."""
    clocks = FakeClocks(wall=0.0)  # 1970: nothing can be signed yet
    book = book_factory(clocks)
    fix = FixRecord(fix_at(*HOUSE, None), book.clock.now())
    damaged = book.start("P-1", doctor_id="DR-1", household_id="HH-1", fix=fix)
    book.stop()
    sound = book.start("P-2", doctor_id="DR-1", household_id="HH-1")
    book.stop()
    assert [v.chain_seq for v in book.visits()] == [None, None]
    book.db.execute("UPDATE visits SET start_fix = 'not json' WHERE id = ?", [damaged.id])
    book.db.conn.commit()
    clocks.advance(60)
    book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())  # the time comes: the signing pass
    visits = {v.id: v for v in book.visits()}
    signed, aside = visits[sound.id], visits[damaged.id]
    assert signed.chain_seq == 1, signed
    assert aside.chain_seq is None and "JSONDecodeError" in (aside.fhir_fault or ""), aside
    export = tmp_path / "chain.jsonl"
    assert book.export_chain(export) == 1
    assert verify_export(export).ok


def test_clock_jump_back_keeps_times_consistent() -> None:
    clocks = FakeClocks(wall=GPS_T.timestamp())
    clock = clocks.clock()
    first = clock.now()
    clocks.advance(10)
    clocks.wall_offset -= 3600  # someone sets the clock an hour back
    second = clock.now()
    assert second.time is not None and first.time is not None
    assert second.time - first.time == dt.timedelta(seconds=10)
    clocks.wall_offset += 7200  # NTP jumps it forward: followed
    assert clock.now().time - first.time > dt.timedelta(minutes=59)  # type: ignore[operator]


def test_implausible_gps_time_is_ignored_and_disagreement_measured() -> None:
    clocks = FakeClocks(wall=GPS_T.timestamp() + 300)  # system clock 5 min fast
    clock = clocks.clock()
    assert not clock.observe_gps(dt.datetime(2006, 1, 1, tzinfo=dt.timezone.utc))  # receiver RTC default
    assert clock.observe_gps(GPS_T, clocks.mono)
    assert clock.last_disagreement_s == pytest.approx(300)
    assert clock.now().time == GPS_T and clock.now().source == TimeSource.GPS


def test_distance_and_flags(book_factory) -> None:
    clocks = FakeClocks(wall=GPS_T.timestamp())
    book = book_factory(clocks, radius_m=200.0)
    near = fix_at(*offset(*HOUSE, 50), GPS_T)
    far = fix_at(*offset(*HOUSE, 2000), GPS_T)
    book.start("P-1", doctor_id="DR-1", household_id="HH-1", fix=FixRecord(near, book.clock.now()))
    assert book.stop(FixRecord(near, book.clock.now())).flags == []
    book.start("P-2", doctor_id="DR-1", household_id="HH-1", fix=FixRecord(far, book.clock.now()))
    visit = book.stop(FixRecord(far, book.clock.now()))
    assert visit.flags == ["outside-radius"] and visit.distance_m == pytest.approx(2000, rel=0.01)
    book.start("P-3", doctor_id="DR-1", household_id="HH-404")
    assert book.stop().flags == ["no-fix", "unknown-household"]
    old = FixRecord(fix_at(*HOUSE, GPS_T, eph=250.0), book.clock.now())
    clocks.advance(600)
    book.start("P-4", doctor_id="DR-1", household_id="HH-1", fix=old)
    assert set(book.stop().flags) == {"stale-fix", "poor-accuracy"}
    book.start("P-5", doctor_id="DR-1", household_id="HH-1")
    book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())
    clocks.advance(1)
    book.observe_fix(fix_at(*offset(*HOUSE, 5000), GPS_T), book.clock.now())  # 5 km in 1 s
    assert "impossible-jump" in book.stop().flags
    assert distance_m(0, 0, 0, 1) == pytest.approx(111_195, rel=1e-4)


def test_time_disagreement_is_flagged(book_factory) -> None:
    clocks = FakeClocks(wall=GPS_T.timestamp() + 3600)
    book = book_factory(clocks)
    book.start("P-1", doctor_id="DR-1", household_id="HH-1")
    book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())
    assert "time-disagreement" in book.stop().flags


def test_one_open_visit_and_linked_observations(book_factory) -> None:
    book = book_factory(FakeClocks(wall=GPS_T.timestamp()))
    with pytest.raises(VisitError):
        book.note("nothing open")
    visit = book.start("P-1", doctor_id="DR-1")
    with pytest.raises(VisitError, match="already open"):
        book.start("P-2", doctor_id="DR-1")
    assert book.attach_observation(blood_pressure(GPS_T, "P-1", "bp-1")) == visit.id
    assert book.attach_observation(blood_pressure(GPS_T, None, "bp-2")) is None  # never guessed
    assert book.attach_observation(blood_pressure(GPS_T, "P-9", "bp-3")) is None
    assert book.attach_ecg("dicom:1.2.3", "P-1") == visit.id
    book.stop()
    assert [o.record_key for o in book.observations(visit.id)] == ["bp-1"]
    assert [i["kind"] for i in book.record_body(visit.id)["items"]] == ["observation", "ecg"]


def test_track_is_bounded(book_factory) -> None:
    clocks = FakeClocks(wall=GPS_T.timestamp())
    book = book_factory(clocks, track_max_points=50)
    visit = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
    for i in range(400):
        clocks.advance(1)
        book.observe_fix(fix_at(*offset(*HOUSE, i * 0.5), GPS_T + dt.timedelta(seconds=i)), book.clock.now())
    track = book.track(visit.id)
    assert 25 <= len(track) <= 50
    assert track[0].fix.latitude == pytest.approx(HOUSE[0]) and track[-1].fix.latitude > track[-2].fix.latitude
    assert book.stop().flags == []


def test_chain_verifies_and_detects_edits_and_removals(book_factory, tmp_path: Path) -> None:
    clocks = FakeClocks(wall=GPS_T.timestamp())
    book = book_factory(clocks)
    for n in range(4):
        book.start(
            f"P-{n}", doctor_id="DR-1", household_id="HH-1", fix=FixRecord(fix_at(*HOUSE, GPS_T), book.clock.now())
        )
        book.note(f"note {n}")
        clocks.advance(300)
        book.stop()
    key = tmp_path / "data" / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    export = tmp_path / "chain.jsonl"
    assert book.export_chain(export) == 4
    report = verify_export(export)
    assert report.ok and report.records == 4, report.problems
    # An edit in the database after capture (here: with the sqlite3 shell's equivalent).
    conn = sqlite3.connect(tmp_path / "data" / "visits.db")
    with conn:
        conn.execute("UPDATE visits SET patient_id = 'P-other' WHERE rowid = 2")
    conn.close()
    book.export_chain(export)
    bad = verify_export(export)
    assert not bad.ok and any("edited after capture" in p for p in bad.problems)
    # Removing a record from an export breaks the chain too.
    lines = (tmp_path / "chain.jsonl").read_text().splitlines()
    (tmp_path / "cut.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    cut = verify_export(tmp_path / "cut.jsonl")
    assert any("removed" in p for p in cut.problems)
    # A chain re-signed with another key is caught when the key is pinned.
    assert not verify_export(export, expected_public_key="AAAA").ok


def test_household_register_parsing() -> None:
    rows = parse_register("latitude,household_id,longitude,name\n31.1,HH-9,121.2,Wang\n")
    assert rows[0].household_id == "HH-9" and rows[0].longitude == 121.2
    for bad in (
        "household_id,latitude\nx,1\n",
        "household_id,latitude,longitude\nx,91,0\n",
        "household_id,latitude,longitude\nx,1,1\nx,2,2\n",
        "household_id,latitude,longitude\nx,a,1\n",
    ):
        with pytest.raises(RegisterError):
            parse_register(bad)


def test_stamp_round_trip() -> None:
    s = Stamp(GPS_T, TimeSource.GPS, 12.5, "b")
    assert Stamp.from_json(json.loads(json.dumps(s.to_json()))) == s


def test_follow_receiver_tracks_the_open_visit(book_factory) -> None:
    from lastmile.visits.book import follow_receiver

    clocks = FakeClocks(wall=0.0)
    book = book_factory(clocks)
    visit = book.start("P-1", doctor_id="DR-1", household_id="HH-1")

    class ReplayedReceiver:  # a FixSource that has five fixes, then nothing more
        def __init__(self) -> None:
            self.left = [fix_at(*HOUSE, GPS_T + dt.timedelta(seconds=i)) for i in range(5)]

        def fixes(self, deadline: float):
            while self.left:
                clocks.advance(1)
                yield self.left.pop(0)

        def close(self) -> None:
            pass

    receiver = ReplayedReceiver()
    assert follow_receiver(book, receiver, lambda: not receiver.left) == 5
    assert len(book.track(visit.id)) == 5
    assert book.get(visit.id).start.source == TimeSource.GPS  # type: ignore[union-attr]


def test_a_receiver_sending_fixes_all_day_does_not_rewrite_the_clock_anchor(book_factory) -> None:
    """A GNSS receiver gives a fix every second, all day, with no visit open: the clock's anchor
    is saved once, not rewritten (and fsynced) at every fix - that would wear the SD card
    86,400 times a day. Each fix arrives a few ms late or early, as on a real serial line."""
    clocks = FakeClocks(wall=GPS_T.timestamp())
    book = book_factory(clocks)
    book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())
    anchored_at, changes = clocks.mono, book.db.conn.total_changes
    for second in range(1, 120):
        clocks.advance(1.0 + (0.003 if second % 2 else -0.002))
        book.observe_fix(fix_at(*HOUSE, GPS_T + dt.timedelta(seconds=second)), book.clock.now())
    assert book.db.conn.total_changes == changes, "the anchor was written again at every fix"
    # another process of this boot (a `lastmile visit` command) still learns GPS time from it
    other = book_factory(clocks)
    assert other.clock.now().source == TimeSource.GPS
    assert other.clock.now().time == GPS_T + dt.timedelta(seconds=clocks.mono - anchored_at)


# The first visit ever closed makes the gateway's signing key; the process dies (power cut,
# SIGKILL) the moment the key's file exists on disk, before its bytes are in it.
KEY_CUT_SCRIPT = r"""
import os, signal, sys
from pathlib import Path
from lastmile.visits.chain import KEY_FILE, load_or_create_key

real_open = os.open

def open_then_die(path, *args, **kwargs):
    fd = real_open(path, *args, **kwargs)
    if KEY_FILE in os.fspath(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return fd

os.open = open_then_die
load_or_create_key(Path(sys.argv[1]))
"""


def test_a_power_cut_while_the_signing_key_is_made_does_not_stop_visits_being_signed(
    book_factory, tmp_path: Path
) -> None:
    """The power goes while the first visit is signed, just as the key file was created. After
    the reboot the doctor closes visits as before: they are signed, the chain verifies - not a
    ValueError at every visit stop (and in the GNSS part) for ever because of an empty key file."""
    data = tmp_path / "data"
    data.mkdir()
    child = run_python(KEY_CUT_SCRIPT, str(data))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    clocks = FakeClocks(wall=GPS_T.timestamp())
    book = book_factory(clocks)
    book.start("P-1", doctor_id="DR-1", household_id="HH-1", fix=FixRecord(fix_at(*HOUSE, GPS_T), book.clock.now()))
    clocks.advance(300)
    closed = book.stop()
    assert closed.chain_seq == 1, "the visit was not signed"
    assert book.verify_local().ok
    assert sorted(p.name for p in data.iterdir() if "ed25519" in p.name) == [KEY_FILE], "a key's leftovers stay"
    assert (data / KEY_FILE).stat().st_mode & 0o777 == 0o600


def test_an_empty_key_file_left_by_an_older_version_is_made_again_and_the_visit_signs(
    book_factory, tmp_path: Path
) -> None:
    """An older version's key creation cut short by a power cut left an empty key file: every
    visit stop failed on it for ever. A new key is made (nothing was signed with the empty one)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / KEY_FILE).touch(mode=0o600)
    clocks = FakeClocks(wall=GPS_T.timestamp())
    book = book_factory(clocks)
    book.start("P-1", doctor_id="DR-1", household_id="HH-1", fix=FixRecord(fix_at(*HOUSE, GPS_T), book.clock.now()))
    clocks.advance(300)
    assert book.stop().chain_seq == 1, "the visit was not signed"
    assert book.verify_local().ok
    assert (data / KEY_FILE).stat().st_size > 0


def test_a_visits_db_that_cannot_be_switched_to_wal_is_named_not_an_attribute_error(tmp_path: Path) -> None:
    """uploader.sqlite_store raises its own OperationalError (no SQLite error code) when another
    process keeps the new visits.db locked: VisitBook.open died with an AttributeError (the GNSS
    part's and `gps fix`'s meaningless traceback) instead of naming the file."""
    data = tmp_path / "data"
    data.mkdir()
    path = data / "visits.db"
    other = sqlite3.connect(path, isolation_level=None)  # another process, reading the new database
    try:
        other.execute("CREATE TABLE t (x)")
        other.execute("BEGIN")
        other.execute("SELECT * FROM t").fetchall()  # holds its shared lock: no switch to WAL
        with pytest.raises(sqlite3.OperationalError, match=r"visits\.db.*WAL"):
            VisitBook.open(data, gateway_id="gw-1")
    finally:
        other.close()


def test_two_processes_starting_on_an_old_empty_key_file_end_with_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older version left an empty key file; the acquire service and the doctor's `visit stop`
    start at once, and both see it empty. The first remade the key and signed with it; the
    second then deleted that key and made its own: a visit signed with a key that no longer
    exists, which no export verifies. Both must end with the key on disk."""
    import pathlib
    import threading

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from lastmile.visits.chain import load_or_create_key, public_key_b64

    data = tmp_path / "data"
    data.mkdir()
    (data / KEY_FILE).touch(mode=0o600)
    second_saw_empty, first_done = threading.Event(), threading.Event()
    real_stat = pathlib.Path.stat
    looked: set[str] = set()

    def stat_in_order(self: pathlib.Path, **kwargs: bool):  # type: ignore[no-untyped-def]
        # the second process looks first (the empty file), then waits while the first does it all
        who = threading.current_thread().name
        first_look = self.name == KEY_FILE and who not in looked
        looked.add(who)
        if first_look and who == "first":
            assert second_saw_empty.wait(30)
        result = real_stat(self, **kwargs)
        if first_look and who == "second":
            second_saw_empty.set()
            assert first_done.wait(30)
        return result

    monkeypatch.setattr(pathlib.Path, "stat", stat_in_order)
    keys: dict[str, Ed25519PrivateKey] = {}

    def process(name: str) -> None:
        keys[name] = load_or_create_key(data)
        if name == "first":
            first_done.set()

    threads = [threading.Thread(target=process, args=(n,), name=n) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.undo()
    on_disk = public_key_b64(load_or_create_key(data))
    assert public_key_b64(keys["first"]) == on_disk, "the first process signed with a key that was replaced"
    assert public_key_b64(keys["second"]) == on_disk
