"""`lastmile gps decode` and `lastmile visit ...` end to end through the CLI entry point."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lastmile.cli import main
from tests.conftest import shared_file


def test_gps_decode_prints_one_fix_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    log = shared_file("gps", "beidou-gb.log")
    assert main(["gps", "decode", str(log)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("2015-03-02T05:32:33.438000Z  31.2480350  121.5873800")
    assert "mode 3" in lines[1] and "hdop 1.20" in lines[1] and "eph 25.6 m" in lines[1]
    assert main(["gps", "decode", "--json", str(log)]) == 0
    fix = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert {k: fix[k] for k in ("mode", "hdop", "eph_m")} == {"mode": 3, "hdop": 1.2, "eph_m": 25.61}
    assert fix["latitude"] == pytest.approx(31.248035) and fix["altitude_m"] == 167.2


def test_visit_commands_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    register = tmp_path / "households.csv"
    register.write_text("household_id,latitude,longitude\nHH-1,31.2,121.5\n")
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\nid = "gw-cli"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[visits]\ndoctor_id = "DR-9"\nhousehold_register = "{register}"\n'
        '[gps]\nsource = "none"\n'
    )
    run = lambda *a: main(["-c", str(config), *a])
    assert run("visit", "stop") == 1  # nothing open
    assert run("visit", "start", "--patient", "P-1", "--household", "HH-1") == 0
    assert run("visit", "start", "--patient", "P-2") == 1  # one at a time
    assert run("visit", "note", "BP taken, patient well") == 0
    assert run("visit", "stop") == 0
    out = capsys.readouterr().out
    assert "queued for the county platform" in out and "flags: no-fix" in out
    assert run("visit", "list", "--json") == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["patient_id"] == "P-1" and listed["fhir_queued"] and listed["chain_seq"] == 1
    export = tmp_path / "chain.jsonl"
    assert run("visit", "export", str(export)) == 0
    assert run("visit", "verify", str(export)) == 0
    assert "OK: 1 records" in capsys.readouterr().out
    export.write_text(export.read_text().replace('"P-1"', '"P-7"'))
    assert run("visit", "verify", "--json", str(export)) == 1
    assert "edited after capture" in capsys.readouterr().out


def visit_cli(tmp_path: Path) -> Callable[..., int]:
    """`lastmile -c CONFIG ...` for a gateway without GPS (times from the system clock) whose data
    is in tmp_path/data; returns its exit code."""
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\nid = "gw-cli"\ndata_dir = "{tmp_path / "data"}"\n[visits]\ndoctor_id = "DR-9"\n[gps]\nsource = "none"\n'
    )
    return lambda *args: main(["-c", str(config), *args])


def test_a_stop_that_died_before_queueing_is_queued_by_the_next_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by bench/kill_campaign.py: `visit stop` killed after closing the visit and before
    queueing it left the visit closed and unqueued, and the doctor's second stop ("no visit is
    open") returned without queueing it: the county never got it."""
    from lastmile.visits.book import VisitBook, VisitPolicy
    from uploader.outbox import Outbox

    run = visit_cli(tmp_path)
    assert run("visit", "start", "--patient", "P-1") == 0
    with VisitBook.open(tmp_path / "data", gateway_id="gw-cli", policy=VisitPolicy()) as book:
        book.stop(None)  # what the killed stop got done: closed and signed, not queued
    capsys.readouterr()
    assert run("visit", "stop") == 1  # nothing open any more ...
    assert "1 visit(s) queued" in capsys.readouterr().out  # ... and the closed visit is queued
    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    try:
        assert [i.key.split(":")[1] for i in outbox.items(kind="fhir-bundle")] == ["visit"]
    finally:
        outbox.close()


@pytest.mark.parametrize(
    ("column", "damage"), [("start_stamp", "{}"), ("start_fix", "not json"), ("flags", "[[[")], ids=str
)
def test_a_damaged_open_visit_is_closed_and_set_aside_by_stop_with_what_to_do_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], column: str, damage: str
) -> None:
    """The open visit's row was damaged on the SD card: `visit stop` (and start, note, list)
    printed a Python traceback, and no visit could ever be started again (one open at a time).
    Stop says what is wrong and what to do, closes it set aside; the other visits stay."""
    from lastmile.visits.book import VisitBook

    run = visit_cli(tmp_path)
    assert run("visit", "start", "--patient", "P-1") == 0
    assert run("visit", "stop") == 0
    assert run("visit", "start", "--patient", "P-2") == 0
    with VisitBook.open(tmp_path / "data", gateway_id="gw-cli") as book:
        book.db.execute(f"UPDATE visits SET {column} = ? WHERE patient_id = 'P-2'", [damage])
        book.db.conn.commit()
    capsys.readouterr()
    assert run("visit", "note", "BP taken") == 1
    assert "damaged" in capsys.readouterr().err
    assert run("visit", "start", "--patient", "P-3") == 1
    assert "damaged" in capsys.readouterr().err
    assert run("visit", "stop") == 1
    said = capsys.readouterr().err
    assert "damaged" in said and "P-2" in said and "lastmile visit start --patient P-2" in said, said
    assert run("visit", "list") == 0
    listed = capsys.readouterr().out
    assert "patient P-1" in listed and "patient P-2" in listed and "damaged" in listed, listed
    assert run("visit", "start", "--patient", "P-3") == 0  # the doctor can go on
    assert run("visit", "stop") == 0
    export = tmp_path / "chain.jsonl"
    assert run("visit", "export", str(export)) == 0
    assert run("visit", "verify", str(export)) == 0
    assert "OK: 2 records" in capsys.readouterr().out  # P-1 and P-3: the damaged one is not signed


def test_a_stop_with_a_damaged_signing_key_says_the_key_is_damaged_not_wait_for_gps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The key file was damaged (SD card): `visit stop` said "signed once GPS or NTP gives the
    time" and "its time is provisional", on a gateway whose time is known: the doctor waits for
    a GPS that will change nothing. It says the key is damaged and what to do."""
    from lastmile.visits.chain import KEY_FILE

    run = visit_cli(tmp_path)
    assert run("visit", "start", "--patient", "P-1") == 0
    assert run("visit", "stop") == 0  # makes the key
    (tmp_path / "data" / KEY_FILE).write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    )
    assert run("visit", "start", "--patient", "P-2") == 0
    capsys.readouterr()
    assert run("visit", "stop") == 0  # the visit is closed and kept
    out = capsys.readouterr().out
    assert "GPS or NTP" not in out and "provisional" not in out, out
    assert "signing key" in out and "damaged" in out and "backup" in out, out


def test_visit_retry_sends_a_set_aside_visit_once_through_the_forward_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A visit set aside (its record damaged on the SD card: its doctor gone) waited for a software
    update even after the technician restored the record: no command sent it again. `visit retry`
    clears the set-aside; the forward service's queueing queues it, once (its reading went on its
    own meanwhile, and the visit goes without it)."""
    import datetime as dt

    from lastmile.visits.book import VisitBook
    from lastmile.visits.relay_link import VisitQueue
    from tests.fhir_samples import NAMING, blood_pressure
    from uploader.outbox import Kind, Outbox

    data = tmp_path / "data"
    run = visit_cli(tmp_path)
    assert run("visit", "retry", "--all") == 0
    assert "no visit is set aside" in capsys.readouterr().out
    with VisitBook.open(data, gateway_id="gw-cli") as book:
        damaged = book.start("P-1", doctor_id="DR-9")
        book.attach_observation(blood_pressure(dt.datetime.now(dt.timezone.utc), "P-1", "bp-1"))
        book.stop()
        book.db.execute("UPDATE visits SET doctor_id = '' WHERE id = ?", [damaged.id])
        book.db.conn.commit()
    forward = VisitQueue(data, "gw-cli", monotonic=lambda: 1000.0)  # no minute passes: only changes count
    with Outbox.open(data, min_free_bytes=0) as outbox:
        assert forward.queue(outbox, NAMING) == 0  # set aside; its reading went on its own
        assert [i.key.split(":")[1] for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == ["obs"]
        with VisitBook.open(data, gateway_id="gw-cli") as book:  # the technician restores the record
            book.db.execute("UPDATE visits SET doctor_id = 'DR-9' WHERE id = ?", [damaged.id])
            book.db.conn.commit()
        capsys.readouterr()
        assert run("visit", "retry", damaged.id[:8]) == 0
        assert "1 visit(s)" in capsys.readouterr().out
        assert forward.queue(outbox, NAMING) == 1  # without the damaged reading: nothing else holds it
        assert run("visit", "retry", "--all") == 0  # nothing set aside any more
        assert run("visit", "retry", damaged.id) == 1  # not set aside: nothing to retry
        assert "not set aside" in capsys.readouterr().err
        assert forward.queue(outbox, NAMING) == 0
        assert [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)][1:] == [f"fhir:visit:{damaged.id}"]


def damaged_at_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """P-2's visit gets a track point damaged on the SD card, and `visit stop` closes it aside,
    telling the doctor to record it again. Returns the visit's id."""
    from lastmile.visits.book import VisitBook

    run = visit_cli(tmp_path)
    assert run("visit", "start", "--patient", "P-2") == 0
    with VisitBook.open(tmp_path / "data", gateway_id="gw-cli") as book:
        visit = book.open_visit()
        assert visit is not None
        book.db.execute("INSERT INTO visit_track (visit_id, fix, received) VALUES (?, 'not json', '{}')", [visit.id])
        book.db.conn.commit()
    capsys.readouterr()
    assert run("visit", "stop") == 1
    assert "lastmile visit start --patient P-2" in capsys.readouterr().err
    return visit.id


def test_a_damaged_track_point_of_the_open_visit_is_said_by_stop_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A track point of the open visit damaged on the SD card: `visit stop` printed a traceback
    and left the visit open for ever. It is closed and set aside, and the doctor told what to do."""
    damaged_at_stop(tmp_path, capsys)
    assert visit_cli(tmp_path)("visit", "start", "--patient", "P-2") == 0


def test_list_tells_to_stop_a_damaged_open_visit_not_to_retry_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`visit list` gave the open visit whose row was damaged the advice "once repaired:
    lastmile visit retry ID", and `visit retry ID` then said "not set aside: nothing to retry".
    An open damaged visit is closed (and kept aside) by `visit stop`: the list says that."""
    from lastmile.visits.book import VisitBook

    run = visit_cli(tmp_path)
    assert run("visit", "start", "--patient", "P-2") == 0
    with VisitBook.open(tmp_path / "data", gateway_id="gw-cli") as book:
        book.db.execute("UPDATE visits SET start_fix = 'not json' WHERE patient_id = 'P-2'")
        book.db.conn.commit()
    capsys.readouterr()
    assert run("visit", "list") == 0
    listed = capsys.readouterr().out
    assert "visit retry" not in listed, listed
    assert "patient P-2" in listed and "damaged" in listed and "lastmile visit stop" in listed, listed
    assert listed.startswith("record damaged"), listed  # its unreadable start is not "time pending"


def mend_track(tmp_path: Path) -> None:
    """The technician removes the damaged track point."""
    from lastmile.visits.book import VisitBook

    with VisitBook.open(tmp_path / "data", gateway_id="gw-cli") as book:
        book.db.execute("DELETE FROM visit_track WHERE fix = 'not json'")
        book.db.conn.commit()


def test_a_visit_stop_set_aside_as_damaged_and_recorded_again_is_never_sent_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`visit stop` told the doctor to record the damaged visit again (visit start --patient
    P-2), while `visit list` and `lastmile doctor` said "once repaired: lastmile visit retry":
    following both, the county got P-2's visit twice. The visit stop closed as damaged is never
    offered for retry nor sent, not even after an update tries the others again."""
    from lastmile.doctor import Level
    from lastmile.visits import relay_link
    from lastmile.visits.relay_link import VisitQueue
    from tests.fhir_samples import NAMING
    from tests.service_harness import doctor
    from uploader.outbox import Kind, Outbox

    run = visit_cli(tmp_path)
    first = damaged_at_stop(tmp_path, capsys)
    assert run("visit", "start", "--patient", "P-2") == 0  # recorded again, as stop said
    assert run("visit", "stop") == 0
    mend_track(tmp_path)
    capsys.readouterr()
    refused = run("visit", "retry", first[:8])  # as list and doctor advised
    said = capsys.readouterr().err
    data = tmp_path / "data"
    with Outbox.open(data, min_free_bytes=0) as outbox:
        VisitQueue(data, "gw-cli", monotonic=lambda: 1000.0).queue(outbox, NAMING)
        monkeypatch.setattr(relay_link, "FHIR_FAULT_GENERATION", relay_link.FHIR_FAULT_GENERATION + 1)  # an update
        VisitQueue(data, "gw-cli", monotonic=lambda: 1000.0).queue(outbox, NAMING)
        keys = [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)]
    assert f"fhir:visit:{first}" not in keys, keys  # P-2's visit sent twice
    assert len(keys) == 1, keys  # P-2's visit recorded again
    assert refused == 1 and "recorded again" in said, said
    assert run("visit", "retry", "--all") == 0
    assert "no visit is set aside" in capsys.readouterr().out
    assert run("visit", "list") == 0
    listed = capsys.readouterr().out
    assert "visit retry" not in listed and "recorded again" in listed and "not checked" in listed, listed
    found = doctor(data).check_visits()
    assert not [f for f in found if "visit retry" in (f.hint or "")], found
    assert [f.level for f in found] == [Level.OK] and "1 damaged when stopped, kept aside" in found[0].message, found


def test_a_visit_stop_closed_as_damaged_before_the_mark_existed_is_never_retried_nor_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A visit `stop` closed unread by an earlier version (before the 'stopped damaged' mark)
    carried only its fault: `visit retry` accepted it and the forward service sent it - the
    doctor had recorded it again, as stop said, and it was never checked. Such a visit is
    recognised (never checked, never signed) and kept aside like the newer ones."""
    from lastmile.visits.relay_link import STOPPED_DAMAGED

    run = visit_cli(tmp_path)
    first = damaged_at_stop(tmp_path, capsys)
    data = tmp_path / "data"
    with sqlite3.connect(data / "visits.db") as db:  # as the earlier version left it
        db.execute("UPDATE visits SET fhir_fault = substr(fhir_fault, ?)", [len(STOPPED_DAMAGED) + 1])
        db.execute("DELETE FROM migrations WHERE name = '0005_mark_stopped_damaged'")
    assert run("visit", "start", "--patient", "P-2") == 0  # recorded again, as stop said
    assert run("visit", "stop") == 0
    mend_track(tmp_path)
    capsys.readouterr()
    assert run("visit", "retry", first[:8]) == 1
    assert "recorded again" in capsys.readouterr().err
    retry_all_sends_only_the_visit_recorded_again(run, capsys, tmp_path / "data", first)


def retry_all_sends_only_the_visit_recorded_again(
    run: Callable[..., int], capsys: pytest.CaptureFixture[str], data: Path, first: str
) -> None:
    """`visit retry --all` finds nothing set aside, and the forward service's round queues only
    the visit recorded again: never `first`, the one stop closed damaged."""
    from lastmile.visits.relay_link import VisitQueue
    from tests.fhir_samples import NAMING
    from uploader.outbox import Kind, Outbox

    assert run("visit", "retry", "--all") == 0
    assert "no visit is set aside" in capsys.readouterr().out
    with Outbox.open(data, min_free_bytes=0) as outbox:
        VisitQueue(data, "gw-cli", monotonic=lambda: 1000.0).queue(outbox, NAMING)
        keys = [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)]
    assert f"fhir:visit:{first}" not in keys and len(keys) == 1, keys


def test_a_visit_stop_set_aside_as_damaged_is_never_signed_with_flags_it_was_not_checked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A visit `stop` closed as damaged was never checked (no flags, no distance, no end fix):
    once the technician mended the row, `visit retry` let the forward service sign and send it
    with flags [] - a visit without GPS or household that looks clean to the county."""
    from lastmile.visits.book import VisitBook
    from lastmile.visits.relay_link import VisitQueue
    from tests.fhir_samples import NAMING
    from uploader.outbox import Kind, Outbox

    run = visit_cli(tmp_path)
    first = damaged_at_stop(tmp_path, capsys)
    mend_track(tmp_path)
    run("visit", "retry", first)
    run("visit", "retry", "--all")
    data = tmp_path / "data"
    with Outbox.open(data, min_free_bytes=0) as outbox:
        VisitQueue(data, "gw-cli", monotonic=lambda: 1000.0).queue(outbox, NAMING)
        keys = [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)]
    with VisitBook.open(data, gateway_id="gw-cli") as book:
        unchecked = book.get(first)
    assert unchecked is not None and unchecked.chain_seq is None, unchecked  # never signed
    assert f"fhir:visit:{first}" not in keys, keys


def test_an_open_visit_set_aside_before_its_stop_is_still_marked_recorded_again_by_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An open visit whose provisional start stamp was damaged is set aside by the first pass
    that repairs stamps, while still open; `visit stop` then closes it unread and tells the doctor
    to record it again: its mark must not be lost to the earlier fault (a retry would send it)."""
    from lastmile.visits.book import VisitBook
    from tests.fhir_samples import NAMING
    from uploader.outbox import Outbox

    data = tmp_path / "data"
    run = visit_cli(tmp_path)
    assert run("visit", "start", "--patient", "P-2") == 0
    with VisitBook.open(data, gateway_id="gw-cli") as book, Outbox.open(data, min_free_bytes=0) as outbox:
        book.db.execute("UPDATE visits SET start_stamp = '{}', started_at = NULL")
        book.db.conn.commit()
        book.queue_closed(outbox, NAMING)  # the forward service's pass: repairs, sets it aside
        assert [v.fhir_fault for v in book.visits()] != [None]
    assert run("visit", "stop") == 1
    assert "lastmile visit start --patient P-2" in capsys.readouterr().err
    with VisitBook.open(data, gateway_id="gw-cli") as book:
        assert [v.recorded_again for v in book.visits()] == [True]
    assert run("visit", "retry", "--all") == 0
    assert "no visit is set aside" in capsys.readouterr().out


def test_a_gcj02_register_is_read_in_wgs84_and_a_visit_at_the_house_is_not_outside_radius(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A county that exports its household register from Gaode or Tencent maps gives GCJ-02
    positions (475 m off here, in Shanghai): compared as WGS-84 with the GPS fix, a visit at the
    house itself was flagged outside-radius, the offset position signed into the chain. With
    visits.register_datum = "gcj02" the register is converted to WGS-84 when it is imported."""
    from lastmile.visits.book import FixRecord
    from tests.visit_harness import GPS_T, FakeClocks, fix_at, open_book

    home_wgs84, home_gcj02 = (31.1774276, 121.5272106), (31.17530398364597, 121.531541859215)  # published pair
    register = tmp_path / "households.csv"
    register.write_text("household_id,latitude,longitude\nHH-1,%r,%r\n" % home_gcj02)

    def visit_at_home(datum: str | None) -> tuple[list[str], float | None, tuple[float, float]]:
        config = tmp_path / f"{datum}.toml"
        config.write_text(
            f'[gateway]\nid = "gw-1"\ndata_dir = "{tmp_path / "data"}"\n'
            f'[visits]\ndoctor_id = "DR-9"\nhousehold_register = "{register}"\n'
            + (f'register_datum = "{datum}"\n' if datum else "")
            + '[gps]\nsource = "none"\n'
        )
        assert main(["-c", str(config), "visit", "households"]) == 0
        clocks = FakeClocks(wall=GPS_T.timestamp())
        with open_book(tmp_path / "data", clocks) as book:
            at_home = FixRecord(fix_at(*home_wgs84, GPS_T), book.clock.now())
            book.start("P-1", doctor_id="DR-9", household_id="HH-1", fix=at_home)
            visit = book.stop(at_home)
            body = book.record_body(visit.id)
        return visit.flags, visit.distance_m, (body["household"]["lat"], body["household"]["lon"])

    flags, distance, _ = visit_at_home(None)  # read as GPS positions (WGS-84), as before
    assert flags == ["outside-radius"] and distance == pytest.approx(475, abs=5), (flags, distance)
    flags, distance, signed = visit_at_home("gcj02")
    assert flags == [] and distance is not None and distance < 1.0, (flags, distance)
    assert signed == pytest.approx(home_wgs84, abs=1e-5), signed  # the chain holds the real position
    assert "read in gcj02" in capsys.readouterr().out


def test_an_open_visit_set_aside_for_a_damaged_note_is_refused_notes_and_stopped_as_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A repair pass set the open visit aside for a damaged note (its row reads well): the doctor
    advised to stop it and record it again, but `visit note` still added notes to it and `visit
    stop` closed it as an ordinary set-aside visit, retry-able: once the note was mended, `visit
    retry` sent it, and the county got the visit twice. Note refuses it with the same advice; stop
    closes it stopped damaged: never retried nor sent."""
    from lastmile.visits.book import VisitBook
    from tests.visit_harness import set_aside_by_a_damaged_note
    from uploader.outbox import Outbox

    data = tmp_path / "data"
    run = visit_cli(tmp_path)
    assert run("visit", "start", "--patient", "P-2") == 0
    assert run("visit", "note", "wound dressed") == 0
    with VisitBook.open(data, gateway_id="gw-cli") as book, Outbox.open(data, min_free_bytes=0) as outbox:
        set_aside_by_a_damaged_note(book, outbox)
        (first,) = [v.id for v in book.visits()]
    capsys.readouterr()
    assert run("visit", "note", "second dressing") == 1
    assert "lastmile visit stop" in capsys.readouterr().err
    assert run("visit", "stop") == 1
    assert "lastmile visit start --patient P-2" in capsys.readouterr().err
    assert run("visit", "start", "--patient", "P-2") == 0  # recorded again, as stop said
    assert run("visit", "stop") == 0
    with VisitBook.open(data, gateway_id="gw-cli") as book:  # the technician mends the note
        book.db.execute("DELETE FROM visit_notes WHERE stamp = 'not json'")
        book.db.conn.commit()
        assert [v.recorded_again for v in book.visits() if v.id == first] == [True]
    capsys.readouterr()
    retry_all_sends_only_the_visit_recorded_again(run, capsys, tmp_path / "data", first)


def a_visit_whose_reading_went_alone(data: Path, *, reading_damaged: bool = False) -> str:
    """A visit set aside (its doctor blanked on the SD card) whose cuff reading the forward
    service then sent to the county on its own. `reading_damaged`: the reading's own record was
    damaged too, so it went nowhere: quarantined in the outbox (`lastmile queue`). The visit's id."""
    import datetime as dt

    from lastmile.visits.book import VisitBook
    from lastmile.visits.relay_link import VisitQueue
    from tests.fhir_samples import NAMING
    from tests.visit_harness import link_a_reading_then_set_the_visit_aside
    from uploader.outbox import ItemState, Outbox

    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    visit_id = link_a_reading_then_set_the_visit_aside(data, at)
    if reading_damaged:
        with VisitBook.open(data, gateway_id="gw-1") as book:
            book.db.execute("UPDATE visit_items SET record = json_remove(record, '$.quantities')")
            book.db.conn.commit()
    with Outbox.open(data, min_free_bytes=0) as outbox:
        VisitQueue(data, "gw-1", monotonic=lambda: 1000.0).queue(outbox, NAMING)
        sent_alone = [i.key.split(":")[1] for i in outbox.items(kind="fhir-bundle")]
        quarantined = [i for i in outbox.items(kind="observation") if i.state is ItemState.QUARANTINED]
        assert (sent_alone, len(quarantined)) == (([], 1) if reading_damaged else (["obs"], 0))
    return visit_id


def test_visit_list_says_how_many_readings_of_a_visit_went_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A visit set aside: its cuff reading went to the county on its own, which only the journal
    said; the family doctor looking at her visits saw nothing. `visit list` (and its JSON) says
    how many readings were sent without the visit."""
    run = visit_cli(tmp_path)
    visit_id = a_visit_whose_reading_went_alone(tmp_path / "data")
    capsys.readouterr()
    assert run("visit", "list") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "1 reading sent without the visit" in line, line
    assert run("visit", "list", "--json") == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["visit_id"] == visit_id and listed["readings_sent_alone"] == 1


def test_the_visits_page_says_in_chinese_how_many_readings_of_a_visit_went_without_it(tmp_path: Path) -> None:
    """The same on the console's Visits page, where the family doctor reviews her visits on her
    phone: in Chinese, on the visit's card."""
    import html

    from tests.console_harness import DOCTOR, Client, console_config, running_console

    config = console_config(tmp_path / "data")
    a_visit_whose_reading_went_alone(config.data_dir)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = html.unescape(client.get("/visits").body)
    (card,) = [li for li in page.split("<li ")[1:] if "P-1" in li]
    assert "1 条测量结果未随本次随访发送，已单独发往县平台" in card, card


def test_visit_list_does_not_count_a_damaged_reading_as_sent_without_the_visit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A visit set aside whose cuff reading's own record was damaged too: the reading went
    nowhere (quarantined, `lastmile queue`), yet `visit list` said "1 reading sent without the
    visit". It says the reading is not sent, and where to look."""
    run = visit_cli(tmp_path)
    a_visit_whose_reading_went_alone(tmp_path / "data", reading_damaged=True)
    capsys.readouterr()
    assert run("visit", "list") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "sent without the visit" not in line, line
    assert "1 reading not sent: see lastmile queue" in line, line
    assert run("visit", "list", "--json") == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (listed["readings_sent_alone"], listed["readings_not_sent"]) == (0, 1)


def test_a_damaged_reading_restored_in_visits_db_is_counted_sent_only_once_retried_and_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The county IT restored a visit's damaged reading in visits.db from a backup; until the
    doctor runs `lastmile retry`, it is still a quarantined item in the outbox, not sent - yet
    `visit list` said "1 reading sent without the visit" (it judged the record, which decodes
    now). The outbox item's state is the truth: damaged until it is retried and relayed."""
    from lastmile.clinic.observations import observation_to_json
    from lastmile.services.observation_relay import relay_observations
    from lastmile.visits.book import VisitBook
    from tests.fhir_samples import NAMING, blood_pressure
    from uploader.outbox import ItemState, Outbox

    run = visit_cli(tmp_path)
    data = tmp_path / "data"
    a_visit_whose_reading_went_alone(data, reading_damaged=True)
    sound = observation_to_json(blood_pressure(dt.datetime.now(dt.timezone.utc), "P-1", "bp-1"))["quantities"]
    with VisitBook.open(data, gateway_id="gw-1") as book:  # restored from the backup
        book.db.execute(
            "UPDATE visit_items SET record = json_set(record, '$.quantities', json(?))", [json.dumps(sound)]
        )
        book.db.conn.commit()

    def counted() -> tuple[int, int]:
        capsys.readouterr()
        assert run("visit", "list", "--json") == 0
        (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        return listed["readings_sent_alone"], listed["readings_not_sent"]

    assert counted() == (0, 1)  # restored, not retried: still quarantined
    with Outbox.open(data, min_free_bytes=0) as outbox:
        (item,) = outbox.items(kind="observation", state=ItemState.QUARANTINED)
        assert outbox.retry(item.id, time.time())
        assert counted() == (0, 1)  # retried, not relayed yet
        relay_observations(outbox, NAMING, time.time())
        assert outbox.get(item.id).state is ItemState.COMMITTED  # type: ignore[union-attr]
    assert counted() == (1, 0)


def test_the_visits_page_does_not_count_a_damaged_reading_as_sent_without_the_visit(tmp_path: Path) -> None:
    """The same on the console's Visits page: in Chinese, the damaged reading is said apart."""
    import html

    from tests.console_harness import DOCTOR, Client, console_config, running_console

    config = console_config(tmp_path / "data")
    a_visit_whose_reading_went_alone(config.data_dir, reading_damaged=True)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = html.unescape(client.get("/visits").body)
    (card,) = [li for li in page.split("<li ")[1:] if "P-1" in li]
    assert "已单独发往县平台" not in card, card
    assert "1 条测量结果未能发送（见发送队列）" in card, card


def test_visit_list_opens_the_outbox_once_not_once_per_visit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three visits whose damaged readings were quarantined on their own: `visit list` asked the
    outbox what became of them once per visit listed (a read-only open each, on a Pi's SD card).
    Once for the list now, with the same counts."""
    from lastmile.visits.book import VisitBook
    from lastmile.visits.relay_link import VisitQueue
    from tests.fhir_samples import NAMING, blood_pressure
    from uploader.outbox import DB_NAME as OUTBOX_DB
    from uploader.outbox import Outbox

    run = visit_cli(tmp_path)
    data = tmp_path / "data"
    at = dt.datetime.now(dt.timezone.utc)
    with VisitBook.open(data, gateway_id="gw-cli") as book:
        for n in range(3):
            book.start(f"P-{n}", doctor_id="DR-1", household_id="HH-1")
            book.attach_observation(blood_pressure(at, f"P-{n}", f"bp-{n}"))
            book.stop()
        book.db.execute("UPDATE visit_items SET record = json_remove(record, '$.quantities')")
        book.db.conn.commit()
    with Outbox.open(data, min_free_bytes=0) as outbox:
        VisitQueue(data, "gw-cli", monotonic=lambda: 1000.0).queue(outbox, NAMING)
    opened: list[str] = []
    real_connect = sqlite3.connect

    def connect(database: str, *args: object, **kwargs: object) -> sqlite3.Connection:
        opened.append(str(database))
        return real_connect(database, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite3, "connect", connect)
    capsys.readouterr()
    assert run("visit", "list", "--json") == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [v["readings_not_sent"] for v in listed] == [1, 1, 1]
    assert len([db for db in opened if OUTBOX_DB in db]) == 1, opened
