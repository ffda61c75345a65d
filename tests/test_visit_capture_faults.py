"""Faults in field-visit capture, GPS and the visit chain, found by review (2026-12-06): a track
point written into a visit just stopped and signed, a receiver's buffered fix tagging the next
visit, a cold start without time as one endless cycle, lost-time flags in English on the Chinese
page, verify crashing on a damaged export. Each test (but the stale-GPS guard's) failed on the
code before its fix. The empty signing key and the clock anchor written at every fix, found then
too, are tested in test_visits.py (a real power cut at the key's creation; a jittery receiver)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from devices.gps import Fix, FixMode, NmeaStreamDecoder
from lastmile.cli import main
from lastmile.demo.field_day import nmea_cycle
from lastmile.visits.book import FixRecord, VisitBook
from lastmile.visits.households import distance_m
from tests.serial_pty import PtyDevice
from tests.visit_harness import GPS_T, HOUSE, FakeClocks, fix_at, offset, open_book
from tests.waiting import wait_for

# --- 1. a fix the acquire service tracks while the doctor stops the visit breaks the signed chain --


def test_a_fix_tracked_while_the_doctor_stops_the_visit_does_not_break_its_signed_record(tmp_path: Path) -> None:
    clocks = FakeClocks(wall=GPS_T.timestamp())
    data = tmp_path / "data"
    # Two processes on one visits.db: the acquire service follows the receiver, the doctor's CLI stops.
    with open_book(data, clocks) as service, open_book(data, clocks) as doctor:
        doctor.start("P-1", doctor_id="DR-1", fix=FixRecord(fix_at(*HOUSE, GPS_T), doctor.clock.now()))
        clocks.advance(600)
        stopped: list = []
        failed: list[Exception] = []  # sqlite3 drops what a trace callback raises: kept to be said

        def doctor_stops_as_the_service_begins_its_write(statement: str) -> None:
            # The doctor's stop commits exactly when the service begins the write of its track point.
            if statement.startswith("BEGIN IMMEDIATE") and not stopped and not failed:
                try:
                    stopped.append(doctor.stop(FixRecord(fix_at(*HOUSE, None), doctor.clock.now())))
                except Exception as exc:  # noqa: BLE001 - whatever it is, sqlite3 would drop it
                    failed.append(exc)

        service.db.conn.set_trace_callback(doctor_stops_as_the_service_begins_its_write)
        # a fix without a date yet (the receiver sends one each second): a track point, no clock anchor
        service.observe_fix(Fix(mode=FixMode.FIX_2D, time=None, latitude=HOUSE[0], longitude=HOUSE[1], eph_m=9.0))
        service.db.conn.set_trace_callback(None)
        assert not failed, f"the doctor's stop failed inside the service's write: {failed!r}"
        assert stopped, "the service began no write (no track point): the doctor's stop never ran"
        assert stopped[0].chain_seq == 1, stopped
        report = doctor.verify_local()
        # nobody edited the visit: a point after its stop is not part of it
        assert report.ok, report.problems


# --- 2. a cycle the receiver buffered since the last visit tags the next visit ---------------------


def test_a_fix_buffered_in_the_receiver_since_the_last_visit_does_not_tag_the_next_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A USB receiver keeps what it could not send while the port was closed: the first bytes
    `visit start` reads are the last cycle from the previous household, minutes old."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    previous_house = offset(*HOUSE, 400.0)
    register = tmp_path / "households.csv"
    register.write_text("household_id,latitude,longitude\nHH-2,%f,%f\n" % HOUSE)
    device = PtyDevice(tmp_path / "gps0")
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\nid = "gw-cli"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[visits]\ndoctor_id = "DR-9"\nhousehold_register = "{register}"\nfix_wait_s = 20\n'
        f'[gps]\nsource = "nmea"\nnmea_port = "{device.link_path}"\n'
    )
    with VisitBook.open(tmp_path / "data", gateway_id="gw-cli") as book:
        book.observe_fix(fix_at(*previous_house, now))  # GPS gave this boot its time at the last visit
    done = threading.Event()

    def receiver() -> None:
        wait_for(device.opened_elsewhere, timeout=30)
        device.write(nmea_cycle(now - dt.timedelta(minutes=10), *previous_house, hdop=0.5))  # buffered
        second = 0
        while not done.is_set():
            second += 1
            device.write(nmea_cycle(now + dt.timedelta(seconds=second), *HOUSE, hdop=0.5))
            done.wait(0.05)

    feeder = threading.Thread(target=receiver, daemon=True)
    feeder.start()
    try:
        assert main(["-c", str(config), "visit", "start", "--patient", "P-2", "--household", "HH-2"]) == 0
    finally:
        done.set()
        feeder.join(timeout=60)
        # a write after unplug lands on whatever file reuses the master's descriptor (a database)
        assert not feeder.is_alive(), "the NMEA feeder is still writing"
        device.unplug()
    capsys.readouterr()
    with VisitBook.open(tmp_path / "data", gateway_id="gw-cli") as book:
        visit = book.open_visit()
    assert visit is not None and visit.start_fix is not None and visit.start.time is not None
    where = (visit.start_fix.fix.latitude, visit.start_fix.fix.longitude)
    assert distance_m(*where, *HOUSE) < 1.0, f"tagged {distance_m(*where, *HOUSE):.0f} m away, at {where}"
    assert abs((visit.start.time - now).total_seconds()) < 120, visit.start.time


# --- 3. a receiver's cold start (no time yet) is one endless cycle ----------------------------------

# What a u-blox NEO-6/7/M8 (the commonest module) sends each second until its first fix: no time.
COLD_START_CYCLE = (
    b"$GPRMC,,V,,,,,,,,,,N*53\r\n$GPVTG,,,,,,,,,N*30\r\n$GPGGA,,,,,,0,00,99.99,,,,,,*48\r\n"
    b"$GPGSA,A,1,,,,,,,,,,,,,99.99,99.99,99.99*30\r\n$GPGSV,1,1,00*79\r\n$GPGLL,,,,,,V,N*64\r\n"
)


def test_a_cold_start_without_time_gives_one_no_fix_per_second_and_its_first_fix_its_own_error() -> None:
    """gpsd 3.22 (gpsfake) reports this stream as mode-1 TPVs, then its first fix with eph 17.1 m.
    Before: no event for as long as the receiver had no time (the open cycle kept every GSA: a
    clinic's receiver indoors for days grew the acquire service without end), and the first fix
    took the cold start's HDOP 99.99: "within 1900 m", which disarms the outside-radius check."""
    first = dt.datetime(2026, 12, 5, 23, 0, tzinfo=dt.timezone.utc)
    decoder = NmeaStreamDecoder()
    events = []
    for _ in range(1000):  # a quarter of an hour indoors
        events += decoder.receive_data(COLD_START_CYCLE)
    for second in range(3):
        events += decoder.receive_data(nmea_cycle(first + dt.timedelta(seconds=second), *HOUSE, hdop=0.9))
    events += decoder.flush()
    fixes = [e for e in events if isinstance(e, Fix)]
    assert [f.mode for f in fixes[:1000]] == [FixMode.NO_FIX] * 1000
    assert [f.time for f in fixes[1000:]] == [first + dt.timedelta(seconds=s) for s in range(3)]
    assert fixes[1000].hdop == 0.9 and fixes[1000].eph_m == pytest.approx(17.1)


def test_a_wrong_gps_time_earlier_in_the_boot_does_not_make_every_later_fix_stale() -> None:
    """The stale test trusts the GPS time the boot already has, unless a plausible system clock
    vouches for the newer fix: one bad time from a receiver must not refuse GPS for the whole boot."""
    synced = FakeClocks(wall=GPS_T.timestamp()).clock()  # NTP set the clock
    assert synced.observe_gps(GPS_T + dt.timedelta(days=1))  # a receiver's bad day
    assert not synced.stale_gps(GPS_T) and synced.stale_gps(GPS_T - dt.timedelta(minutes=10))
    unset = FakeClocks(wall=0.0).clock()  # no RTC, no network: GPS is all there is
    assert unset.observe_gps(GPS_T)
    assert unset.stale_gps(GPS_T - dt.timedelta(minutes=10)) and not unset.stale_gps(GPS_T - dt.timedelta(seconds=5))


# --- 4. the Visits page shows a visit whose times were lost to reboots in English ----------------


def test_the_visits_page_names_a_lost_start_and_end_in_chinese(tmp_path: Path) -> None:
    import html

    from tests.console_harness import DOCTOR, Client, console_config, running_console

    data = tmp_path / "data"
    with open_book(data, FakeClocks(wall=0.0, boot="boot-1")) as book:  # 1970, indoors: no time
        book.start("P-1", doctor_id="DR-1")
    with open_book(data, FakeClocks(wall=0.0, boot="boot-2")) as book:  # the battery died; still no time
        book.stop()
    boot3 = FakeClocks(wall=0.0, boot="boot-3")
    with open_book(data, boot3) as book:  # and again; then GPS gives the time: signed with both lost
        book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())
        (visit,) = book.visits()
    assert {"start-time-lost", "end-time-lost"} <= set(visit.flags) and visit.chain_seq == 1
    with running_console(console_config(data)) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = html.unescape(client.get("/visits").body)
    card = page[page.index('class="visit-list"') :]
    assert "time-lost" not in card, card  # the doctor reads Chinese, not the flag's code
    # ... and is told which times were lost (not merely shown no flag at all)
    assert "开始时间因网关重启而丢失" in card and "结束时间因网关重启而丢失" in card, card


# --- 5. `lastmile visit verify` crashes on a damaged or tampered export ---------------------------


def _record_in_a_list(entry: dict) -> None:
    entry["record"] = [entry["record"]]


def _not_a_number(entry: dict) -> None:
    entry["record"]["distance_m"] = float("nan")  # JSON's NaN, which Python reads


def _infinite_seq(entry: dict) -> None:
    entry["seq"] = float("inf")


def _lone_surrogate(entry: dict) -> None:
    entry["record"]["patient_id"] = "P-\udcff"  # "\udcff" in the file: valid JSON, not a character


@pytest.mark.parametrize("damage", [_record_in_a_list, _not_a_number, _infinite_seq, _lone_surrogate])
def test_verify_reports_a_damaged_export_as_failed_not_with_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[dict], None]
) -> None:
    """The county verifies exports it did not make: a damaged or tampered line must give FAILED
    with the reason, never a traceback (AttributeError, ValueError, OverflowError before)."""
    clocks = FakeClocks(wall=GPS_T.timestamp())
    export = tmp_path / "chain.jsonl"
    with open_book(tmp_path / "data", clocks) as book:
        book.start("P-1", doctor_id="DR-1", fix=FixRecord(fix_at(*HOUSE, GPS_T), book.clock.now()))
        clocks.advance(600)
        book.stop()
        book.export_chain(export)
    header, line = export.read_text(encoding="utf-8").splitlines()
    entry = json.loads(line)
    damage(entry)
    export.write_text(f"{header}\n{json.dumps(entry)}\n", encoding="utf-8")
    assert main(["visit", "verify", str(export)]) == 1
    assert "FAILED" in capsys.readouterr().out
