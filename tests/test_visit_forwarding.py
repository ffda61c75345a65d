"""Closed home visits reach the county platform through the forward service, once each.

The doctor's `lastmile visit stop` queues the visit it closes if its times are known. Any other
closed visit - stopped before GPS or NTP gave the time and signed later by the acquire service's
GPS fix, or closed by a stop that a power cut interrupted before it queued - used to wait in
visits.db until the doctor's next stop: the day's last visit never left the village overnight.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lastmile.config import Config
from lastmile.data_dir import read_only
from lastmile.services.forward import ForwardService
from lastmile.visits.book import Visit, VisitBook, VisitPolicy
from lastmile.visits.relay_link import VisitNotices
from tests.fhir_samples import NAMING
from tests.fhir_server import FhirTestServer
from tests.peers import free_port
from tests.sd_writes import idle_steps_wrote
from tests.visit_harness import (
    GPS_T,
    HOUSE,
    FakeClocks,
    damage_open_row,
    fix_at,
    link_a_reading_then_set_the_visit_aside,
    relay_a_cuff_reading,
    visits_db_opens,
)
from tests.waiting import wait_for
from uploader.outbox import ItemState, Kind, Outbox, OutboxItem


def forward_config(tmp_path: Path, base_url: str) -> Config:
    """The forward service toward a loopback FHIR platform; no reading center listens (no ECGs here)."""
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.gateway.id = "gw-1"
    config.reading_center.storage_commitment = False
    config.reading_center.listen_port = free_port()
    config.reading_center.host = "127.0.0.1"
    config.reading_center.port = free_port()
    config.fhir.base_url = base_url
    return config


@pytest.fixture
def platform() -> Iterator[FhirTestServer]:
    with FhirTestServer() as server:
        yield server


def step_until(service: ForwardService, condition: Callable[[], bool]) -> None:
    """Step the forward service, as its runtime does (without the idle waits), until `condition`."""
    stop = threading.Event()
    wait_for(lambda: (service.step(stop), condition())[1], timeout=60.0)


def visits_applied(server: FhirTestServer) -> int:
    return sum(server.applied.values())


def said_once_as_error(caplog: pytest.LogCaptureFixture, visit_id: str) -> None:
    """The journal named the visit once, as an ERROR (set aside): not at every try."""
    import logging

    about = [r for r in caplog.records if visit_id in r.getMessage()]
    assert len(about) == 1 and about[0].levelno == logging.ERROR, [r.getMessage() for r in about]


def set_aside_and_said_once(caplog: pytest.LogCaptureFixture, visit: Visit | None) -> None:
    assert visit is not None and visit.fhir_fault, "the damaged visit is not set aside"
    said_once_as_error(caplog, visit.id)


def stop_before_time_is_known(data: Path) -> str:
    """A visit stopped indoors before any time was known, then signed by the acquire service's
    first GPS fix outdoors; the doctor's stop queued nothing (no time yet). Its id."""
    clocks = FakeClocks(wall=0.0)  # booted in 1970, no RTC, no GPS yet
    with VisitBook.open(data, gateway_id="gw-1", policy=VisitPolicy(), clock=clocks.clock()) as book:
        visit = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        clocks.advance(900)
        book.stop()
        with Outbox.open(data, min_free_bytes=0) as outbox:
            assert book.queue_closed(outbox, NAMING) == 0  # what `lastmile visit stop` did: not yet
        clocks.advance(120)
        book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())  # acquire's GNSS part, outdoors
        closed = book.get(visit.id)
        assert closed is not None and closed.chain_seq is not None  # signed now, with its times
        assert not closed.fhir_queued
    return visit.id


def test_a_visit_signed_after_its_stop_reaches_the_platform_without_another_stop(
    tmp_path: Path, platform: FhirTestServer
) -> None:
    config = forward_config(tmp_path, platform.base_url)
    visit_id = stop_before_time_is_known(config.data_dir)
    service = ForwardService(config)
    try:
        step_until(service, lambda: visits_applied(platform) >= 1)
    finally:
        service.close()
    encounters = platform.resources("Encounter")
    assert len(encounters) == 1 and visits_applied(platform) == 1
    assert encounters[0]["status"] == "finished" and "end" in encounters[0]["period"]
    with VisitBook.open(config.data_dir, gateway_id="gw-1") as book:
        assert book.get(visit_id).fhir_queued  # type: ignore[union-attr]


def test_a_stop_cut_short_before_queueing_is_sent_once_even_when_the_doctor_stops_again(
    tmp_path: Path, platform: FhirTestServer
) -> None:
    """`visit stop` closed and signed the visit, then the power went before it queued it. The
    forward service queues it; the doctor's next stop (which also queues closed visits) must not
    make a second bundle, and neither must the service's later rounds."""
    config = forward_config(tmp_path, platform.base_url)
    with VisitBook.open(config.data_dir, gateway_id="gw-1") as book:
        visit = book.start("P-2", doctor_id="DR-1", household_id="HH-1")
        book.stop()  # the time is known (the test machine's clock): signed at once
    service = ForwardService(config)
    try:
        step_until(service, lambda: visits_applied(platform) >= 1)
        with (
            VisitBook.open(config.data_dir, gateway_id="gw-1") as book,
            Outbox.open(config.data_dir, min_free_bytes=0) as outbox,
        ):
            assert book.queue_closed(outbox, NAMING) == 0  # the doctor's next `visit stop`
        for _ in range(3):  # a few more rounds of the service
            service.step(threading.Event())
    finally:
        service.close()
    assert visits_applied(platform) == 1
    with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
        assert [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == [f"fhir:visit:{visit.id}"]


def test_idle_forward_steps_with_sent_visits_write_nothing(tmp_path: Path, platform: FhirTestServer) -> None:
    """Looking for closed visits to queue, every round, must not cost the SD card a write."""
    config = forward_config(tmp_path, platform.base_url)
    stop_before_time_is_known(config.data_dir)
    service = ForwardService(config)
    try:
        step_until(service, lambda: visits_applied(platform) >= 1)
        service.step(threading.Event())  # the round after the send may still record it
        wrote = idle_steps_wrote(service, config.data_dir)
    finally:
        service.close()
    assert not wrote, "an idle forward step wrote to the SD card"


def test_a_forward_step_without_visits_creates_no_visit_database(tmp_path: Path, platform: FhirTestServer) -> None:
    config = forward_config(tmp_path, platform.base_url)
    service = ForwardService(config)
    try:
        service.step(threading.Event())
    finally:
        service.close()
    assert not (config.data_dir / "visits.db").exists()


def stop_a_visit_with_a_reading(data: Path, damage: str = "") -> Visit:
    """P-1's visit with a cuff reading, stopped and signed; then `damage` (SQL) done to visits.db
    on the SD card."""
    from tests.fhir_samples import blood_pressure

    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        book.attach_observation(blood_pressure(GPS_T, "P-1", "bp-1"))
        book.stop()
        if damage:
            book.db.execute(damage)
            book.db.conn.commit()
    return visit


def stop_a_visit_whose_reading_is_damaged(data: Path) -> Visit:
    """... the reading's stored record damaged (a field gone): it can never be sent; the visit
    goes without it."""
    return stop_a_visit_with_a_reading(data, "UPDATE visit_items SET record = json_remove(record, '$.quantities')")


def stop_a_visit_whose_record_is_damaged(data: Path) -> Visit:
    """... its doctor blanked: the visit can never be a bundle."""
    return stop_a_visit_with_a_reading(data, "UPDATE visits SET doctor_id = ''")


def test_a_closed_visit_that_cannot_be_a_bundle_holds_up_no_other_and_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A visit whose record was damaged on the SD card (its doctor gone) can never be made a
    FHIR bundle. It stopped every visit closed after it from being queued, for ever, and the
    forward service logged its traceback every minute all day. It is set aside once, said once,
    and shown in `lastmile visit list`; the others go."""
    import logging

    from lastmile.cli import main
    from lastmile.visits.relay_link import UNQUEUED_RETRY_S, VisitQueue

    data = tmp_path / "data"
    damaged = stop_a_visit_whose_record_is_damaged(data)
    with VisitBook.open(data, gateway_id="gw-1") as book:
        later = book.start("P-2", doctor_id="DR-1", household_id="HH-1")
        book.stop()
    now = [1000.0]
    visits = VisitQueue(data, "gw-1", monotonic=lambda: now[0])
    caplog.clear()  # the start/stop lines above are caught too when an earlier test set INFO
    with Outbox.open(data, min_free_bytes=0) as outbox, caplog.at_level(logging.INFO):
        assert visits.queue(outbox, NAMING) == 1
        now[0] += UNQUEUED_RETRY_S + 1
        assert visits.queue(outbox, NAMING) == 0  # a minute later: nothing new, nothing said again
        # the damaged visit's reading went on its own (fhir:obs); of the visits only the later one
        keys = [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE) if i.key.startswith("fhir:visit:")]
        assert keys == [f"fhir:visit:{later.id}"]
    said_once_as_error(caplog, damaged.id)
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the journal"
    toml = tmp_path / "lastmile.toml"
    toml.write_text(f'[gateway]\nid = "gw-1"\ndata_dir = "{data}"\n')
    capsys.readouterr()
    assert main(["-c", str(toml), "visit", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "P-1" in lines[1] and "cannot be sent" in lines[1], lines
    assert "cannot be sent" not in lines[0], lines


def test_a_damaged_visit_waiting_for_its_time_neither_stops_gps_nor_holds_up_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two visits stopped indoors before any time was known; the first one's stamp was damaged
    on the SD card. The acquire service's first fix outdoors repairs and signs them: it raised
    on the first, so the GNSS part died at every fix (restarted, died again), the second was never
    signed nor sent, and the doctor's next stop failed the same way."""
    import logging

    from tests.visit_harness import open_book

    clocks = FakeClocks(wall=0.0)  # booted in 1970, no RTC, no GPS yet
    with open_book(tmp_path / "data", clocks) as book:
        damaged = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        book.stop()
        later = book.start("P-2", doctor_id="DR-1", household_id="HH-1")
        clocks.advance(600)
        book.stop()
        book.db.execute("UPDATE visits SET start_stamp = '{}' WHERE id = ?", [damaged.id])
        book.db.conn.commit()
        clocks.advance(60)
        caplog.clear()  # what the fixes say
        with caplog.at_level(logging.INFO):
            for n in range(3):  # the first fix outdoors, and the next ones
                book.observe_fix(fix_at(*HOUSE, GPS_T + dt.timedelta(seconds=n)), book.clock.now())
                clocks.advance(1.0)
        signed = book.get(later.id)
        set_aside = book.db.execute("SELECT fhir_fault FROM visits WHERE id = ?", [damaged.id]).fetchone()[0]
    assert signed is not None and signed.chain_seq is not None and signed.start.time is not None
    assert set_aside, "the damaged visit is not marked as one that cannot be sent"
    said_once_as_error(caplog, damaged.id)


# --- 2. every fix (1 Hz, all day) reads the open visit once, not twice --------------------------


def statements_of_ten_fixes(book: VisitBook, clocks: FakeClocks) -> list[str]:
    """The SQL the book runs for ten fixes, one a second, after the one that anchored the clock."""
    statements: list[str] = []
    conn: sqlite3.Connection = book.db.conn
    conn.set_trace_callback(statements.append)
    try:
        for n in range(10):
            clocks.advance(1.0)
            book.observe_fix(fix_at(*HOUSE, GPS_T.replace(second=n + 1)), book.clock.now())
    finally:
        conn.set_trace_callback(None)
    return statements


def test_each_fix_reads_the_open_visit_once(tmp_path: Path) -> None:
    clocks = FakeClocks(wall=GPS_T.timestamp())
    with VisitBook.open(tmp_path / "data", gateway_id="gw-1", clock=clocks.clock()) as book:
        book.start("P-1", doctor_id="DR-1")
        book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())  # the first anchors the clock
        statements = statements_of_ten_fixes(book, clocks)
        assert len(book.track(book.open_visit().id)) == 11  # type: ignore[union-attr]
    full_rows = [s for s in statements if "SELECT * FROM visits" in s]
    chain_reads = [s for s in statements if "FROM chain" in s]
    visit_reads = [s for s in statements if "FROM visits" in s]
    # one look for the open visit, one atomic "still open?" in the insert: no Visit built per fix
    assert not full_rows, f"{len(full_rows)} whole visit rows read for 10 fixes"
    assert not chain_reads, f"{len(chain_reads)} reads of the signed chain for 10 fixes"
    assert len(visit_reads) <= 20, f"{len(visit_reads)} reads of visits for 10 fixes"


def test_each_fix_shared_with_a_waiting_command_is_one_statement(tmp_path: Path) -> None:
    """The acquire service shares its fixes (1 Hz) with a waiting `visit stop` or `gps fix`: each
    cost a SELECT of the share and then an UPDATE; one UPDATE that says when it applies is enough."""
    clocks = FakeClocks(wall=GPS_T.timestamp())
    with VisitBook.open(tmp_path / "data", gateway_id="gw-1", clock=clocks.clock()) as book:
        book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())  # the first anchors the clock
        asked = book.want_fixes(60.0)  # a command waits
        statements = statements_of_ten_fixes(book, clocks)
        shared = book.shared_fix(asked)
        clocks.advance(120.0)  # the command's wait is over: nothing is written for it any more
        book.observe_fix(fix_at(*HOUSE, GPS_T.replace(minute=3)), book.clock.now())
        assert book.shared_fix(asked) == shared
    assert shared is not None and shared.fix.time == GPS_T.replace(second=10)
    share_statements = [s for s in statements if "gnss_share" in s]
    assert len(share_statements) <= 10, f"{len(share_statements)} statements on the share for 10 fixes"


def test_a_system_clock_far_from_gps_is_said_once_not_at_every_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Offline with a fake-hwclock a day off and an NMEA receiver (nothing sets the system clock
    from it), the acquire service wrote "system clock differs from GPS" to the journal at every
    fix: 86 400 lines a day on the SD card (and a screenful on the doctor's `visit stop`)."""
    import logging

    clocks = FakeClocks(wall=(GPS_T + dt.timedelta(days=1)).timestamp())
    with VisitBook.open(tmp_path / "data", gateway_id="gw-1", clock=clocks.clock()) as book:
        with caplog.at_level(logging.INFO):
            for n in range(10):
                book.observe_fix(fix_at(*HOUSE, GPS_T + dt.timedelta(seconds=n)), book.clock.now())
                clocks.advance(1.0)
        assert book.clock.last_disagreement_s == pytest.approx(86400, abs=2)
    said = [r for r in caplog.records if "differs from GPS" in r.getMessage() and r.levelno >= logging.INFO]
    assert len(said) == 1, [r.getMessage() for r in said]


# --- 3. the CLI and the acquire service never read the NMEA receiver's port at once --------------


def nmea_cycle(n: int) -> bytes:
    """One receiver cycle (GGA + RMC) at the household, `n` seconds after GPS_T (HDOP 0.5: a fix
    good enough for a command to take at once)."""
    from devices.gps.nmea import checksum

    at = GPS_T + dt.timedelta(seconds=n)
    hhmmss, ddmmyy = at.strftime("%H%M%S.00"), at.strftime("%d%m%y")
    bodies = (
        f"GPGGA,{hhmmss},3114.8800,N,12135.2440,E,1,09,0.50,20.0,M,8.0,M,,",
        f"GPRMC,{hhmmss},A,3114.8800,N,12135.2440,E,0.0,0.0,{ddmmyy},,,A",
    )
    return b"".join(f"${body}*{checksum(body):02X}\r\n".encode() for body in bodies)


class HeldReceiver:
    """The acquire service's GNSS part holding an NMEA receiver (a pty) that sends one cycle every
    50 ms (20 Hz) from when `start_when()` first holds until the test is done, however long the
    commands wait for a fix; and the lastmile.toml of a gateway on it, for the commands."""

    def __init__(self, tmp_path: Path, start_when: Callable[[], bool] = lambda: True, *, service: bool = True) -> None:
        from lastmile.services.acquire import gnss_part
        from tests.serial_pty import PtyDevice

        self.device = PtyDevice(tmp_path / "gps0")
        self.config = forward_config(tmp_path, "")
        self.config.gps.source, self.config.gps.nmea_port = "nmea", str(self.device.link_path)
        self.toml = tmp_path / "lastmile.toml"
        self.toml.write_text(
            f'[gateway]\nid = "gw-1"\ndata_dir = "{self.config.data_dir}"\n'
            f'[gps]\nsource = "nmea"\nnmea_port = "{self.device.link_path}"\n'
            '[visits]\ndoctor_id = "DR-1"\nfix_wait_s = 60.0\n'
        )
        part = gnss_part(self.config)
        assert part is not None
        self.part = part
        self.service = service  # False: no acquire service; the port is free for the commands
        self.start_when = start_when
        self.done = threading.Event()
        self.feeder = threading.Thread(target=self.feed, daemon=True)

    def feed(self) -> None:
        while not self.done.is_set() and not self.start_when():
            self.done.wait(0.05)
        for n in itertools.count():
            if self.done.is_set():
                return
            self.device.write(nmea_cycle(n))
            self.done.wait(0.05)

    def __enter__(self) -> HeldReceiver:
        if self.service:
            self.part.start()
            wait_for(lambda: self.device.opened_elsewhere() >= 1, timeout=60.0)  # pyserial flushes at open
        self.feeder.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self.feeder.ident is not None:
            # joined before its pty closes: a write after that lands on whatever file reuses the
            # master's descriptor number (another test's database, in this worker)
            self.feeder.join(60)
            assert not self.feeder.is_alive(), "the NMEA feeder is still writing"
        if self.service:
            self.part.close()
        self.device.unplug()

    def cli(self, *args: str) -> int:
        from lastmile.cli import main

        return main(["-c", str(self.toml), *args])


def test_gps_fix_and_visit_stop_while_the_acquire_service_reads_the_nmea_receiver_steal_none_of_its_fixes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two readers of one serial port split its bytes: the service lost fixes from the open
    visit's track (and both decoded garbled sentences). The service owns the port; the commands
    get the service's fixes (and record none of them a second time). The GPS time (2026-03-02)
    is far from this machine's clock: the stopped visit says so, as when the command read the
    receiver itself."""
    with HeldReceiver(tmp_path) as receiver:
        with VisitBook.open(receiver.config.data_dir, gateway_id="gw-1") as book:
            visit = book.start("P-1", doctor_id="DR-1")
        assert receiver.cli("gps", "fix", "--wait", "60", "--json") == 0
        assert receiver.cli("visit", "stop") == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed["latitude"] == pytest.approx(31.248, abs=1e-3)
    with VisitBook.open(receiver.config.data_dir, gateway_id="gw-1") as book:
        closed = book.get(visit.id)
        times = [r.fix.time for r in book.track(visit.id)]
    assert closed is not None and closed.end_fix is not None and "no-fix" not in closed.flags
    assert "time-disagreement" in closed.flags, closed.flags
    assert len(times) >= 2
    # every cycle the receiver sent until the stop, each once: none taken by a command
    assert times == [GPS_T + dt.timedelta(seconds=n) for n in range(len(times))]


def test_a_visit_started_while_the_service_waits_for_the_boots_first_fix_is_on_gps_time(tmp_path: Path) -> None:
    """The receiver's first fix of the day reaches the service while `visit start` waits for it:
    the visit starts on the GPS time, not on a system clock 9 months off (a Pi's fake-hwclock)."""
    from devices.identity import TimeSource

    data = tmp_path / "data"

    def a_command_waits() -> bool:
        if not (data / "visits.db").exists():
            return False
        with read_only(data / "visits.db") as conn:
            return conn.execute("SELECT COUNT(*) FROM gnss_share").fetchone()[0] > 0

    with HeldReceiver(tmp_path, start_when=a_command_waits) as receiver:
        assert receiver.cli("visit", "start", "--patient", "P-1") == 0
        with VisitBook.open(data, gateway_id="gw-1") as book:
            started = book.open_visit()
        assert receiver.cli("visit", "stop") == 0
    assert started is not None and started.start.time is not None
    assert started.start.source == TimeSource.GPS, started.start
    assert abs(started.start.time - GPS_T) < dt.timedelta(minutes=5), started.start.time
    with VisitBook.open(data, gateway_id="gw-1") as book:
        closed = book.get(started.id)
    assert closed is not None and "time-disagreement" in closed.flags, closed.flags


def test_a_visit_started_by_a_command_opened_before_the_services_first_fix_is_not_left_provisional(
    tmp_path: Path,
) -> None:
    """Booted in 1970 (no RTC, no network): `visit start` opened visits.db, then the acquire
    service's first fix anchored the boot's time and repaired what was provisional then; the
    start written just after stayed provisional, and the service (whose anchor no longer moves)
    never repaired it."""
    from devices.identity import TimeSource
    from tests.visit_harness import open_book

    clocks = FakeClocks(wall=0.0)
    data = tmp_path / "data"
    with open_book(data, clocks) as service, open_book(data, clocks) as command:
        service.observe_fix(fix_at(*HOUSE, GPS_T), service.clock.now())  # the boot's first fix
        clocks.advance(5)
        visit = command.start("P-1", doctor_id="DR-1", household_id="HH-1")
        clocks.advance(1)
        service.observe_fix(fix_at(*HOUSE, GPS_T + dt.timedelta(seconds=6)), service.clock.now())
        started = service.get(visit.id)
    assert started is not None and started.start.source == TimeSource.GPS, started.start
    assert started.start.time == GPS_T + dt.timedelta(seconds=5)


def test_a_short_gps_fix_does_not_cut_a_waiting_visit_stop_short(tmp_path: Path) -> None:
    """`visit stop` waits up to a minute for the service's fixes; a technician's `gps fix --wait 2`
    meanwhile made the service stop sharing after 2 s: the stop then got no fix (flagged no-fix)."""
    from tests.visit_harness import open_book

    clocks = FakeClocks(wall=GPS_T.timestamp())
    data = tmp_path / "data"
    with open_book(data, clocks) as service, open_book(data, clocks) as stop, open_book(data, clocks) as gps_fix:
        since = stop.want_fixes(60.0)
        clocks.advance(1)
        gps_fix.want_fixes(2.0)
        clocks.advance(10)  # the receiver's first fix comes after the short wait is over
        service.observe_fix(fix_at(*HOUSE, GPS_T + dt.timedelta(seconds=11)), service.clock.now())
        assert stop.shared_fix(since) is not None


def test_gps_fix_on_a_free_receiver_leaves_no_visit_database(tmp_path: Path) -> None:
    """`lastmile gps fix` (run as root by a technician) on a receiver no service holds created
    visits.db, root's and 0600: the acquire service (another user) could then never open it, and
    GPS stopped anchoring the clock and tracking visits. visits.db is only for asking the service."""
    receiver = HeldReceiver(tmp_path, service=False)
    receiver.start_when = lambda: receiver.device.opened_elsewhere() >= 1  # pyserial flushes at open
    with receiver:
        assert receiver.cli("gps", "fix", "--wait", "60", "--json") == 0
    assert not (receiver.config.data_dir / "visits.db").exists()


def test_the_acquire_gnss_part_names_a_visits_db_it_cannot_open_and_recovers_once_it_can(tmp_path: Path) -> None:
    """A visits.db the acquire service cannot open (root's, 0600, left by an older `gps fix`):
    GNSS is down and `lastmile doctor` must say which file is at fault, not only "unable to open
    database file"; once it is mended, the part comes back by itself and anchors the time again."""
    import time

    from lastmile.services.runtime import FAULT

    receiver = HeldReceiver(tmp_path, service=False)
    receiver.start_when = lambda: receiver.device.opened_elsewhere() >= 1  # pyserial flushes at open
    data = receiver.config.data_dir
    data.mkdir(parents=True)
    (data / "visits.db").mkdir()  # no process can open it as a database (root reads any file)
    part = receiver.part

    def checked_status() -> str:
        part.check(time.monotonic())  # what the service's step does each second
        return part.status()

    def anchored() -> bool:
        part.check(time.monotonic())
        if not (data / "visits.db").is_file():
            return False
        try:
            with read_only(data / "visits.db") as conn:
                return conn.execute("SELECT COUNT(*) FROM clock_anchor").fetchone()[0] > 0
        except sqlite3.OperationalError:  # created, not migrated yet
            return False

    try:
        with receiver:
            wait_for(lambda: FAULT in checked_status(), timeout=60.0)
            assert "visits.db" in part.status(), part.status()
            (data / "visits.db").rmdir()
            wait_for(anchored, timeout=60.0)  # started again (backoff), the fixes anchor the time
    finally:
        part.close()


# --- 4. a receiver past the GPS week rollover reports 2006: the visit's times stay provisional ----

# A receiver whose firmware counts GPS weeks in 10 bits, on 2026-03-02 08:00 UTC: 1024 weeks early.
ROLLED_OVER_CYCLES = (
    b"$GPGGA,080000.00,3114.8800,N,12135.2440,E,1,09,0.90,20.0,M,8.0,M,,*5F\r\n"
    b"$GPRMC,080000.00,A,3114.8800,N,12135.2440,E,0.0,0.0,170706,,,A*50\r\n"
    b"$GPGGA,080001.00,3114.8800,N,12135.2440,E,1,09,0.90,20.0,M,8.0,M,,*5E\r\n"
    b"$GPRMC,080001.00,A,3114.8800,N,12135.2440,E,0.0,0.0,170706,,,A*51\r\n"
)


class ReceiverPort:
    """A serial port (pyserial's read) giving `data` once, then nothing."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int) -> bytes:
        out, self.data = self.data[:size], self.data[size:]
        return out

    def close(self) -> None:
        pass


def test_a_receiver_1024_weeks_behind_still_gives_the_visit_its_time(tmp_path: Path) -> None:
    import time

    from devices.gps import Fix, decode_nmea
    from devices.identity import TimeSource
    from firmware_bridge.gnss import NmeaSerialSource

    logged = [e for e in decode_nmea(ROLLED_OVER_CYCLES) if isinstance(e, Fix)]
    assert logged[0].time == GPS_T - dt.timedelta(weeks=1024)  # a log is decoded as it was written
    source = NmeaSerialSource("/dev/gps", serial_factory=lambda *a, **k: ReceiverPort(ROLLED_OVER_CYCLES))
    fix = next(iter(source.fixes(time.monotonic() + 30.0)))
    assert fix.time == GPS_T, fix.time  # the live receiver: 2006-07-17 + 1024 weeks, as gpsd corrects it
    assert fix.time_corrected == "gps-week-rollover"
    clocks = FakeClocks(wall=0.0)  # offline, no RTC: only GPS can give the time
    with VisitBook.open(tmp_path / "data", gateway_id="gw-1", clock=clocks.clock()) as book:
        book.start("P-1", doctor_id="DR-1")
        clocks.advance(30)
        record = book.observe_fix(fix, book.clock.now())
        assert record is not None and record.fix.time_corrected == "gps-week-rollover"
        clocks.advance(600)
        closed = book.stop(record)
    assert closed.start.source == TimeSource.GPS and closed.start.time == GPS_T - dt.timedelta(seconds=30)
    assert "provisional-time" not in closed.flags and closed.chain_seq is not None


# --- 5. a damaged signing key is the gateway's fault, not the visits' ------------------------------


def test_a_damaged_signing_key_sets_no_visit_aside_is_said_and_they_go_once_it_is_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The key file was damaged (SD card): every visit closed or queued afterwards was set aside
    for ever as "damaged" (one journal line, the Visits page said "closed"), and repairing the
    key never brought them back. They stay closed and waiting, the key's fault is said, and once
    the key is repaired they are signed and go."""
    import logging

    from lastmile.visits.chain import KEY_FILE
    from tests.visit_harness import open_book

    data = tmp_path / "data"
    clocks = FakeClocks(wall=GPS_T.timestamp())
    with open_book(data, clocks) as book:
        signed = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        clocks.advance(60)
        book.stop()  # signed: makes the key
    key = data / KEY_FILE
    good = key.read_bytes()
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with (
        open_book(data, clocks) as book,
        Outbox.open(data, min_free_bytes=0) as outbox,
        caplog.at_level(logging.INFO),
    ):
        unsigned = book.start("P-2", doctor_id="DR-1", household_id="HH-1")
        clocks.advance(60)
        assert book.stop().state == "closed"
        assert book.queue_closed(outbox, NAMING) == 0
        faults = {v.id: v.fhir_fault for v in book.visits()}
    assert faults == {signed.id: None, unsigned.id: None}, "visits set aside for the key's fault"
    said = [r for r in caplog.records if r.levelno >= logging.ERROR and KEY_FILE in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records]
    key.write_bytes(good)  # repaired (restored from the backup)
    with open_book(data, clocks) as book, Outbox.open(data, min_free_bytes=0) as outbox:
        assert book.queue_closed(outbox, NAMING) == 2
        assert book.verify_local().ok


def test_a_visit_set_aside_by_an_older_version_is_tried_again_once_after_an_update(tmp_path: Path) -> None:
    """Visits set aside by a version with a fault (the damaged-key one above, or a bundle bug)
    stayed set aside for ever: an update mending the fault never sent them."""
    from lastmile.visits.relay_link import VisitQueue

    data = tmp_path / "data"
    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        book.stop()
        # as the older version left it (it had no column for its version)
        book.db.execute("UPDATE visits SET fhir_fault = 'ValueError: Could not deserialize key data'")
        book.db.conn.commit()
    with Outbox.open(data, min_free_bytes=0) as outbox:
        assert VisitQueue(data, "gw-1").queue(outbox, NAMING) == 1
        assert [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == [f"fhir:visit:{visit.id}"]


def test_a_visit_with_two_damaged_notes_is_set_aside_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A visit stopped before any time was known, two of its notes damaged on the SD card: the
    first fix set it aside once per damaged note, and said so as many times in the journal."""
    import logging

    from tests.visit_harness import open_book

    clocks = FakeClocks(wall=0.0)  # booted in 1970, no RTC, no GPS yet
    with open_book(tmp_path / "data", clocks) as book:
        damaged = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        book.note("dizziness")
        book.note("blood pressure taken twice")
        clocks.advance(600)
        book.stop()
        book.db.execute("UPDATE visit_notes SET stamp = '{}' WHERE visit_id = ?", [damaged.id])
        book.db.conn.commit()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())
        set_aside_and_said_once(caplog, book.get(damaged.id))


# --- 6. a visit whose own data cannot be a bundle, a damaged key every minute, a mending update ----


def test_a_visit_without_a_doctor_is_set_aside_once_and_the_next_visit_still_goes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A closed, signed visit whose doctor was blanked on the SD card: building its bundle raised
    out of queue_closed, so no visit after it was ever queued and the forward service logged a
    traceback every minute. It is set aside once; the next visit goes."""
    import logging

    data = tmp_path / "data"
    with VisitBook.open(data, gateway_id="gw-1") as book:
        damaged = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        book.stop()
        later = book.start("P-2", doctor_id="DR-1", household_id="HH-1")
        book.stop()
        book.db.execute("UPDATE visits SET doctor_id = '' WHERE id = ?", [damaged.id])
        book.db.conn.commit()
        caplog.clear()
        with Outbox.open(data, min_free_bytes=0) as outbox, caplog.at_level(logging.INFO):
            assert book.queue_closed(outbox, NAMING) == 1
            assert book.queue_closed(outbox, NAMING) == 0
            assert [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == [f"fhir:visit:{later.id}"]
        set_aside_and_said_once(caplog, book.get(damaged.id))


def test_a_damaged_signing_key_is_said_once_by_the_forward_service_not_every_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The forward service opens a new book at each retry (every minute): the damaged key's ERROR
    was said every minute all day (SD card wear), each with a wrong "wait for a known time". It is
    said once per damage; a new damage (another file) is said again."""
    import logging

    from lastmile.visits.chain import KEY_FILE
    from lastmile.visits.relay_link import UNQUEUED_RETRY_S, VisitQueue

    data = tmp_path / "data"
    with VisitBook.open(data, gateway_id="gw-1") as book:
        book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        book.stop()  # signed: makes the key
    key = data / KEY_FILE
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    now = [1000.0]
    visits = VisitQueue(data, "gw-1", monotonic=lambda: now[0])
    caplog.clear()
    with Outbox.open(data, min_free_bytes=0) as outbox, caplog.at_level(logging.INFO):
        for _ in range(5):  # five minutes of the forward service
            assert visits.queue(outbox, NAMING) == 0
            now[0] += UNQUEUED_RETRY_S + 1
        said = [r for r in caplog.records if r.levelno >= logging.ERROR and KEY_FILE in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nZGFtYWdlZCBhZ2Fpbg==\n-----END PRIVATE KEY-----\n")
        for _ in range(3):
            assert visits.queue(outbox, NAMING) == 0
            now[0] += UNQUEUED_RETRY_S + 1
    said = [r for r in caplog.records if r.levelno >= logging.ERROR and KEY_FILE in r.getMessage()]
    assert len(said) == 2, [r.getMessage() for r in said]
    wrong = [r.getMessage() for r in caplog.records if "known time" in r.getMessage()]
    assert not wrong, wrong


def test_a_visit_set_aside_is_tried_once_more_after_an_update_that_changes_bundle_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The "tried again after an update" compared lastmile.__version__, which never changes (the
    update bundles carry their own): a mending update never retried anything. A set-aside visit is
    retried once per generation of the bundle code; still damaged, it is set aside again, once;
    never queued twice."""
    import logging

    from lastmile.visits import relay_link
    from lastmile.visits.relay_link import UNQUEUED_RETRY_S, VisitQueue

    data = tmp_path / "data"
    damaged = stop_a_visit_with_a_reading(data)
    now = [1000.0]

    def update_ships() -> None:  # one that changed the bundle code: the next generation
        generation = getattr(relay_link, "FHIR_FAULT_GENERATION", 0)
        monkeypatch.setattr(relay_link, "FHIR_FAULT_GENERATION", generation + 1, raising=False)

    def minutes(visits: VisitQueue, outbox: Outbox, count: int) -> int:
        queued = 0
        for _ in range(count):
            queued += visits.queue(outbox, NAMING)
            now[0] += UNQUEUED_RETRY_S + 1
        return queued

    def said_about() -> int:
        return len([r for r in caplog.records if damaged.id in r.getMessage() and r.levelno >= logging.ERROR])

    def a_bundle_bug(*args: object) -> dict:
        raise ValueError("a bug in the bundle code")

    caplog.clear()
    with Outbox.open(data, min_free_bytes=0) as outbox, caplog.at_level(logging.INFO):
        with monkeypatch.context() as this_version:
            this_version.setattr(VisitBook, "_bundle", staticmethod(a_bundle_bug))
            assert minutes(VisitQueue(data, "gw-1", monotonic=lambda: now[0]), outbox, 3) == 0
        assert said_about() == 1
        # its reading went on its own meanwhile; an update that mends the bundle code tries the
        # visit once: it goes without that reading
        update_ships()
        assert minutes(VisitQueue(data, "gw-1", monotonic=lambda: now[0]), outbox, 3) == 1
        update_ships()
        assert minutes(VisitQueue(data, "gw-1", monotonic=lambda: now[0]), outbox, 2) == 0
        keys = [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)]
        assert [k.split(":")[1] for k in keys] == ["obs", "visit"] and keys[1] == f"fhir:visit:{damaged.id}"


def a_visit_an_older_version_set_aside_for_its_damaged_reading(data: Path) -> str:
    """P-1's visit with two cuff readings, stopped and signed; the second reading's stored record
    then damaged on the SD card, and the visit set aside for it, as a version before readings were
    quarantined on their own left visits.db: its fault of generation 1, no reading released."""
    from tests.fhir_samples import blood_pressure

    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        book.attach_observation(blood_pressure(GPS_T, "P-1", "bp-1"))
        book.attach_observation(blood_pressure(GPS_T + dt.timedelta(minutes=1), "P-1", "bp-2"))
        book.stop()
        book.db.execute("UPDATE visit_items SET record = json_remove(record, '$.quantities') WHERE item_key = 'bp-2'")
        book.db.execute(
            "UPDATE visits SET fhir_fault = ?, fhir_fault_version = '1' WHERE id = ?",
            ["KeyError: 'quantities'", visit.id],
        )
        book.db.conn.commit()
    return visit.id


def test_a_visit_an_older_version_set_aside_for_a_damaged_reading_goes_without_it_once(tmp_path: Path) -> None:
    """A visit an older version set aside because one of its readings was damaged stayed aside for
    good (only `visit retry` sent it), its sound reading went alone, though this version quarantines
    a damaged reading on its own and sends the visit without it. It goes now, by itself, once,
    carrying its sound reading; the damaged one is quarantined (`lastmile queue`)."""
    from lastmile.visits.relay_link import UNQUEUED_RETRY_S, VisitQueue
    from uploader.fhir_bundle import bundle_identifiers
    from uploader.outbox import ItemState

    data = tmp_path / "data"
    visit_id = a_visit_an_older_version_set_aside_for_its_damaged_reading(data)
    now = [1000.0]
    with Outbox.open(data, min_free_bytes=0) as outbox:
        for _ in range(2):  # a forward service restarted: a second queue finds nothing more to do
            visits = VisitQueue(data, "gw-1", monotonic=lambda: now[0])
            for _ in range(3):
                visits.queue(outbox, NAMING)
                now[0] += UNQUEUED_RETRY_S + 1
        bundles = outbox.items(kind=Kind.FHIR_BUNDLE)
        assert [i.key for i in bundles] == [f"fhir:visit:{visit_id}"]
        carried = [v for t, v in bundle_identifiers(json.loads(outbox.read_payload(bundles[0]))) if t == "Observation"]
        assert any(v.endswith("/bp-1") for v in carried) and not any(v.endswith("/bp-2") for v in carried), carried
        quarantined = [i for i in outbox.items(kind="observation") if i.state is ItemState.QUARANTINED]
        assert len(quarantined) == 1 and visit_id in (quarantined[0].quarantine_reason or "")
    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.get(visit_id)
        assert visit is not None and visit.fhir_queued and visit.fhir_fault is None


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("json_set(record, '$.measured_at', '0001-01-01T00:00:00+08:00')", "cannot be said in UTC"),
        ("json_set(record, '$.flags', json('[1]'))", "expected str instance"),
    ],
    ids=["measured-time-out-of-range", "flag-not-text"],
)
def test_a_reading_of_a_visit_whose_own_bundle_cannot_be_built_is_quarantined_alone_and_the_visit_goes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, said: str
) -> None:
    """A visit's reading that decodes but cannot be made a FHIR bundle (a measured time UTC cannot
    say, a device flag that is not text) set the whole visit aside at build time (or, for the
    time, stopped the visits' queueing with an OverflowError): the visit went only by `visit
    retry`, and `visit list` said the reading was "sent without the visit". It is quarantined on
    its own, once, saying what is wrong with it; the visit goes without it."""
    from lastmile.cli import main
    from lastmile.visits.relay_link import VisitQueue
    from uploader.outbox import ItemState

    data = tmp_path / "data"
    visit = stop_a_visit_with_a_reading(data, f"UPDATE visit_items SET record = {damage}")
    with Outbox.open(data, min_free_bytes=0) as outbox:
        for now in (1000.0, 2000.0):  # a second try adds nothing twice
            VisitQueue(data, "gw-1", monotonic=lambda at=now: at).queue(outbox, NAMING)
        bundles = [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)]
        readings = outbox.items(kind="observation")
    assert bundles == [f"fhir:visit:{visit.id}"]
    (reading,) = readings
    assert reading.state is ItemState.QUARANTINED
    reason = reading.quarantine_reason or ""
    assert "cannot be made a FHIR bundle" in reason and said in reason and "damaged" not in reason, reason
    toml = tmp_path / "lastmile.toml"
    toml.write_text(f'[gateway]\nid = "gw-1"\ndata_dir = "{data}"\n')
    capsys.readouterr()
    assert main(["-c", str(toml), "visit", "list"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    # its record is sound: FHIR cannot say it, so the doctor is not told it is damaged
    assert "1 reading not sent: see lastmile queue" in line and "damaged" not in line, line
    assert main(["-c", str(toml), "visit", "list", "--json"]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["fhir_fault"] is None and listed["fhir_queued"]
    assert (listed["readings_sent_alone"], listed["readings_not_sent"]) == (0, 1)


def test_a_forward_try_that_queues_a_visit_opens_visits_db_twice_not_three_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try of the forward service's VisitQueue looked (read-only), opened the book to queue,
    then opened visits.db a third time to learn what still waits: the book it had open knows."""
    from lastmile.visits.relay_link import VisitQueue

    data = tmp_path / "data"
    # the acquire service's GNSS part holds visits.db all day
    with VisitBook.open(data, gateway_id="gw-1") as book, Outbox.open(data, min_free_bytes=0) as outbox:
        visit = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        book.stop()
        visits = VisitQueue(data, "gw-1", monotonic=lambda: 1000.0)
        with visits_db_opens(monkeypatch) as opened:
            assert visits.queue(outbox, NAMING) == 1
        assert len(opened) == 2, opened
        assert visits.queue(outbox, NAMING) == 0  # nothing waits any more, nothing changed since
        assert [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == [f"fhir:visit:{visit.id}"]


def test_a_reading_of_a_patient_whose_open_visit_is_damaged_is_sent_alone_not_quarantined(tmp_path: Path) -> None:
    """The open visit's row was damaged on the SD card: every reading of its patient relayed
    meanwhile raised out of the visit link and was quarantined ("cannot be made a FHIR bundle"):
    the cuff's readings never reached the county. They go on their own, as outside any visit."""
    from lastmile.clinic.observations import OBSERVATION_KIND
    from uploader.outbox import ItemState

    data = tmp_path / "data"
    now = dt.datetime.now(dt.timezone.utc)
    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1")
        damage_open_row(book, visit.id)
    with Outbox.open(data, min_free_bytes=0) as outbox:
        relay_a_cuff_reading(data, outbox, now)
        assert {i.state for i in outbox.items(kind=OBSERVATION_KIND)} == {ItemState.COMMITTED}
        assert [i.key.split(":")[1] for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == ["obs"]


def test_a_damaged_open_visit_is_warned_of_once_not_at_each_reading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every relayed reading opens the book and looks for the open visit: a damaged one was
    warned of at each reading (the journal is on the SD card)."""
    data = tmp_path / "data"
    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1")
        damage_open_row(book, visit.id)
    said = VisitNotices()  # kept by the forward service across its rounds
    with caplog.at_level(logging.WARNING):
        for key in ("ecg:1", "ecg:2"):  # a book per reading, as the relay's visit_link opens it
            with VisitBook.open(data, gateway_id="gw-1", notices=said) as book:
                assert book.attach_ecg(key, "P-1") is None
    assert len([r for r in caplog.records if visit.id in r.getMessage()]) == 1


def test_a_damaged_open_visit_is_warned_of_by_each_gateway_book_not_once_per_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What was warned of was kept module-wide (book._DAMAGED_SAID): a second data directory in
    the process (the demo's, a restored copy of the SD card) holding the same damaged visit was
    never warned of - its readings went on their own in silence. Each book keeps its own."""
    import shutil

    data, copy = tmp_path / "data", tmp_path / "restored"
    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1")
        damage_open_row(book, visit.id)
    shutil.copytree(data, copy)
    with caplog.at_level(logging.WARNING):
        for where in (data, copy):
            with VisitBook.open(where, gateway_id="gw-1") as book:
                assert book.attach_ecg("ecg:1", "P-1") is None
    assert len([r for r in caplog.records if visit.id in r.getMessage()]) == 2


# --- 7. the readings of a visit stopped damaged go on their own, once ------------------------------


def link_a_reading_then_damage_the_visit(data: Path, at: dt.datetime) -> str:
    """A cuff reading relayed while the patient's visit was open (linked to it, the reading's own
    item done), then the visit's row damaged on the SD card. The visit's id."""
    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1")
    with Outbox.open(data, min_free_bytes=0) as outbox:
        relay_a_cuff_reading(data, outbox, at)
        assert outbox.items(kind=Kind.FHIR_BUNDLE) == []  # it went with the visit
    with VisitBook.open(data, gateway_id="gw-1") as book:
        assert len(book.observations(visit.id)) == 1
        damage_open_row(book, visit.id)
    return visit.id


def systolic(component: dict) -> bool:
    return bool(component["code"]["coding"][0]["code"] == "8480-6")


def test_a_reading_linked_to_a_visit_stopped_damaged_reaches_the_platform_once_on_its_own(
    tmp_path: Path, platform: FhirTestServer
) -> None:
    """A reading relayed into an open visit stayed only in it; the visit's row was damaged and
    `visit stop` closed it stopped damaged (never sent, recorded again): the reading never reached
    the county. It goes on its own bundle, once (more rounds, a `visit retry` send it no more)."""
    from lastmile.visits.record import DamagedVisitError, VisitError

    config = forward_config(tmp_path, platform.base_url)
    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)  # taken during the visit
    visit_id = link_a_reading_then_damage_the_visit(config.data_dir, at)
    with VisitBook.open(config.data_dir, gateway_id="gw-1") as book:
        with pytest.raises(DamagedVisitError):
            book.stop()
        with pytest.raises(VisitError):
            book.retry_set_aside(visit_id)
    service = ForwardService(config)
    try:
        step_until(service, lambda: len(platform.resources("Observation")) >= 1)
        for _ in range(3):  # more rounds of the service send nothing more
            service.step(threading.Event())
    finally:
        service.close()
    panels = [o for o in platform.resources("Observation") if any(systolic(c) for c in o.get("component", []))]
    assert len(panels) == 1 and platform.stats.deduplicated == 0, "the reading reached the platform twice"
    obs = panels[0]
    assert obs["subject"]["identifier"]["value"] == "P-1" and "encounter" not in obs
    taken = dt.datetime.fromisoformat(obs["effectiveDateTime"].replace("Z", "+00:00"))
    assert abs(taken - at) < dt.timedelta(milliseconds=1)
    pressure = [c["valueQuantity"] for c in obs["component"] if systolic(c)]
    assert pressure == [{"value": 128.0, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}]
    assert obs["device"]["reference"].startswith("Device/")
    device = platform.resources("Device")[0]
    assert "SN1234" in json.dumps(device)
    with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
        assert [i.key.split(":")[1] for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == ["obs"]


def test_readings_of_visits_stopped_damaged_by_an_older_version_are_released_once_even_after_a_cut(
    tmp_path: Path,
) -> None:
    """A visits.db from before 0007: a visit stopped damaged (as 0005 marked them) still holds its
    reading. The forward service's next round releases it; a round cut short between the outbox
    and the mark (released_at lost) queues nothing twice."""
    from lastmile.visits.record import DamagedVisitError
    from lastmile.visits.relay_link import VisitQueue

    data = tmp_path / "data"
    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    visit_id = link_a_reading_then_damage_the_visit(data, at)
    with VisitBook.open(data, gateway_id="gw-1") as book:
        with pytest.raises(DamagedVisitError):
            book.stop()
        # as an older version left it: no released_at, 0007 never applied
        book.db.execute("ALTER TABLE visit_items DROP COLUMN released_at")
        book.db.execute("DELETE FROM migrations WHERE name = '0007_visit_items_released'")
        book.db.conn.commit()
    with Outbox.open(data, min_free_bytes=0) as outbox:
        visits = VisitQueue(data, "gw-1", monotonic=lambda: 1000.0)
        visits.queue(outbox, NAMING)
        assert [i.key.split(":")[1] for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == ["obs"]
        with VisitBook.open(data, gateway_id="gw-1") as book:
            book.db.execute("UPDATE visit_items SET released_at = NULL WHERE visit_id = ?", [visit_id])
            book.db.conn.commit()  # the mark lost: the round was cut short after the outbox
        for _ in range(2):
            visits.queue(outbox, NAMING)
        assert [i.key.split(":")[1] for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == ["obs"]
        with VisitBook.open(data, gateway_id="gw-1") as book:
            assert book.closed_unqueued() == frozenset()  # nothing waits any more


# --- 8. the readings of a visit set aside go on their own, once; a retried visit does not carry them


def repair_and_retry(data: Path, visit_id: str) -> None:
    """The county IT mends the record; the doctor runs `lastmile visit retry`."""
    with VisitBook.open(data, gateway_id="gw-1") as book:
        book.db.execute("UPDATE visits SET doctor_id = 'DR-1' WHERE id = ?", [visit_id])
        book.db.conn.commit()
        assert book.retry_set_aside(visit_id) == [visit_id]


def one_panel_never_twice(platform: FhirTestServer) -> dict:
    panels = [o for o in platform.resources("Observation") if any(systolic(c) for c in o.get("component", []))]
    assert len(panels) == 1 and platform.stats.deduplicated == 0, "the reading reached the platform twice"
    return panels[0]


@pytest.mark.parametrize("mark_lost", [False, True], ids=["released", "mark-lost-then-retried"])
def test_a_reading_linked_to_a_visit_set_aside_reaches_the_platform_once_even_if_the_visit_is_retried(
    tmp_path: Path, platform: FhirTestServer, mark_lost: bool
) -> None:
    """A reading relayed into a visit that was then set aside (a damaged record, closed, not
    stopped damaged) stayed linked to it: until `visit retry` succeeded - never, if it is not
    repaired - it did not reach the county. It goes on its own at once; a visit retried later
    is sent without it (the platform gets it once), even when the power went after the reading
    was queued and before visits.db marked it released (`mark_lost`)."""
    config = forward_config(tmp_path, platform.base_url)
    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    visit_id = link_a_reading_then_set_the_visit_aside(config.data_dir, at)
    service = ForwardService(config)
    try:
        step_until(service, lambda: len(platform.resources("Observation")) >= 1)
        obs = one_panel_never_twice(platform)
        assert obs["subject"]["identifier"]["value"] == "P-1" and "encounter" not in obs
        if mark_lost:
            with VisitBook.open(config.data_dir, gateway_id="gw-1") as book:
                book.db.execute("UPDATE visit_items SET released_at = NULL WHERE visit_id = ?", [visit_id])
                book.db.conn.commit()
        repair_and_retry(config.data_dir, visit_id)
        step_until(service, lambda: visits_applied(platform) >= 1)
        for _ in range(3):
            service.step(threading.Event())
    finally:
        service.close()
    assert "encounter" not in one_panel_never_twice(platform)
    assert len(platform.resources("Encounter")) == 1


def test_a_released_reading_whose_record_is_damaged_is_shown_in_the_queue_and_by_the_doctor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reading linked to a visit set aside, its own stored record damaged on the SD card: the
    release logged it (ERROR) and marked it - not sent, not in `lastmile queue`, not in the
    doctor: the doctor never knew to measure the patient again. It is a quarantined reading now,
    with why, in `lastmile queue` and in the doctor's queue line (in Chinese on the console)."""
    from lastmile.cli import main
    from lastmile.clock import local_zone
    from lastmile.console.app import advice_text
    from lastmile.console.i18n import Localizer
    from lastmile.doctor import Level
    from lastmile.visits.relay_link import VisitQueue
    from tests.service_harness import doctor

    data = tmp_path / "data"
    visit = stop_a_visit_whose_reading_is_damaged(data)
    with Outbox.open(data, min_free_bytes=0) as outbox:
        for _ in range(2):  # a cut or a second round adds nothing twice
            VisitQueue(data, "gw-1", monotonic=lambda: 1000.0).queue(outbox, NAMING)
    toml = tmp_path / "lastmile.toml"
    toml.write_text(f'[gateway]\nid = "gw-1"\ndata_dir = "{data}"\n')
    capsys.readouterr()
    assert main(["-c", str(toml), "queue"]) == 0
    quarantined = [line for line in capsys.readouterr().out.splitlines() if line.startswith("quarantined #")]
    assert len(quarantined) == 1 and visit.id in quarantined[0] and "damaged" in quarantined[0], quarantined
    found = doctor(data).check_queue()
    # the link's line says what waits (OK: the link is fine); the set-aside reading has its own WARN
    assert [(f.level, f.topic) for f in found] == [(Level.OK, "link"), (Level.WARN, "set-aside")], found
    assert "1 quarantined" in found[0].message and found[1].message == "1 quarantined"
    zh = advice_text(found[1], Localizer("zh-CN", local_zone()))
    assert zh and zh != advice_text(found[1], Localizer("en", local_zone())), zh


def test_a_damaged_visit_readings_quarantine_reason_says_a_restored_record_is_sent_by_lastmile_retry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A visit's reading whose record is damaged is quarantined alone; `lastmile queue` said only
    "measure the patient again" - though the county IT can restore the record in visits.db from
    a backup, and `lastmile retry N` then sends it (the relay reads visits.db). It says both."""
    from lastmile.cli import main
    from lastmile.visits.relay_link import VisitQueue

    data = tmp_path / "data"
    visit = stop_a_visit_whose_reading_is_damaged(data)
    with Outbox.open(data, min_free_bytes=0) as outbox:
        VisitQueue(data, "gw-1", monotonic=lambda: 1000.0).queue(outbox, NAMING)
    toml = tmp_path / "lastmile.toml"
    toml.write_text(f'[gateway]\nid = "gw-1"\ndata_dir = "{data}"\n')
    capsys.readouterr()
    assert main(["-c", str(toml), "queue"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("quarantined #")]
    number = line.split()[1].lstrip("#")
    assert visit.id in line and "measure the patient again" in line, line
    assert "restore" in line and "visits.db" in line and f"`lastmile retry {number}`" in line, line


def test_a_visit_reading_that_cannot_be_a_bundle_is_not_said_to_be_sent_once_its_record_is_restored(
    tmp_path: Path, platform: FhirTestServer
) -> None:
    """A visit's reading that decodes but cannot be made a FHIR bundle (a cuff's clock at year 1:
    a time UTC cannot say) is quarantined alone. Its reason, at the release and again after a
    `lastmile retry`, ended "or have the county IT restore its record in visits.db from a backup:
    `lastmile retry N` then sends it": the county IT would restore the very same record, and it
    would never go. Only a damaged record's reason says so; this one says measure again."""
    from tests.fhir_samples import blood_pressure

    config = forward_config(tmp_path, platform.base_url)
    data = config.data_dir
    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        year_one = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=8)))
        book.attach_observation(blood_pressure(year_one, "P-1", "bp-1"))
        book.stop()
    service = ForwardService(config)
    try:
        step_until(service, lambda: visits_applied(platform) >= 1)
        released = visit_reading_item(data, visit.id)
        lastmile_retry(tmp_path, data, released.id)
        step_until(service, lambda: visit_reading_item(data, visit.id).state is ItemState.QUARANTINED)
    finally:
        service.close()
    retried = visit_reading_item(data, visit.id)
    for reason in (released.quarantine_reason or "", retried.quarantine_reason or ""):
        assert "cannot be made a FHIR bundle" in reason and "measure the patient again" in reason, reason
        assert "restore" not in reason and "lastmile retry" not in reason, reason


class PowerCut(BaseException):
    """The gateway losing power: nothing of the process's code runs after it (not an Exception)."""


def link_a_reading_then_lose_power(data: Path, at: dt.datetime) -> None:
    """P-1's cuff reading relayed during P-1's open visit: linked to it in visits.db, then the
    power went before the outbox marked the reading done (the relay's two writes)."""
    from lastmile.clinic.observations import ObservationStore
    from lastmile.services.observation_relay import relay_observations
    from lastmile.visits.relay_link import visit_link
    from tests.fhir_samples import blood_pressure

    link = visit_link(data, "gw-1", VisitNotices())

    def link_then_cut(obs: object, key: str) -> str | None:
        link(obs, key)  # type: ignore[arg-type]
        raise PowerCut

    with Outbox.open(data, min_free_bytes=0) as outbox:
        store = ObservationStore.open(data, outbox=outbox, idle_timeout_s=900)
        try:
            store.context.set_patient("P-1", "Wang^Fang", now=at)
            assert store.record(blood_pressure(at, None, "bp-1"), now=at).outcome == "stored"
            with pytest.raises(PowerCut):
                relay_observations(outbox, NAMING, at.timestamp(), visit_link=link_then_cut)
        finally:
            store.close()


def reading_relayed(outbox: Outbox) -> bool:
    from lastmile.clinic.observations import OBSERVATION_KIND
    from uploader.outbox import ItemState

    return [i.state for i in outbox.items(kind=OBSERVATION_KIND)] == [ItemState.COMMITTED]


def test_a_reading_linked_to_a_visit_just_before_a_power_cut_is_sent_once_with_the_visit(
    tmp_path: Path, platform: FhirTestServer
) -> None:
    """The relay linked a reading to the open visit, then the power went before the reading was
    marked done; the doctor stopped the visit meanwhile (`visit stop` queued it, reading inside).
    After the restart the relay found no open visit and queued the reading on its own as well:
    the platform got it twice (only its conditional create hid it). It goes with the visit only.
    One bundle per forward round: merging the two in one transaction would hide the fault."""
    config = forward_config(tmp_path, platform.base_url)
    config.fhir.batch_size = 1
    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)  # taken during the visit
    with VisitBook.open(config.data_dir, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1")
    link_a_reading_then_lose_power(config.data_dir, at)
    with (
        VisitBook.open(config.data_dir, gateway_id="gw-1") as book,
        Outbox.open(config.data_dir, min_free_bytes=0) as outbox,
    ):
        book.stop()
        assert book.queue_closed(outbox, NAMING) == 1  # what `lastmile visit stop` does
    service = ForwardService(config)
    try:
        step_until(service, lambda: visits_applied(platform) >= 1 and reading_relayed(service.outbox))
        for _ in range(3):  # more rounds: a reading queued on its own would be sent by now
            service.step(threading.Event())
    finally:
        service.close()
    obs = one_panel_never_twice(platform)
    assert "encounter" in obs and visits_applied(platform) == 1
    with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
        assert [i.key for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == [f"fhir:visit:{visit.id}"]


def test_a_damaged_reading_of_a_visit_restored_in_visits_db_and_retried_is_sent_once(
    tmp_path: Path, platform: FhirTestServer
) -> None:
    """A visit's reading whose record was damaged on the SD card is quarantined on its own
    (`lastmile queue`: measure again, or have it restored). The county IT restored the record in
    visits.db from the backup and the doctor ran `lastmile retry`: the relay read the outbox's copy
    of the damaged bytes again and quarantined it again, for ever. It reads the record visits.db
    holds now: the restored reading reaches the platform, once."""
    config = forward_config(tmp_path, platform.base_url)
    data = config.data_dir
    service = ForwardService(config)
    try:
        visit = restore_and_retry_a_damaged_visit_reading(tmp_path, service, platform, data)

        def sent_or_quarantined_again() -> bool:
            reading = visit_reading_item(data, visit.id)
            return len(platform.resources("Observation")) >= 1 or reading.state is ItemState.QUARANTINED

        step_until(service, sent_or_quarantined_again)
        for _ in range(3):
            service.step(threading.Event())
    finally:
        service.close()
    retried = visit_reading_item(data, visit.id)
    assert retried.state is not ItemState.QUARANTINED, retried.quarantine_reason
    assert "encounter" not in one_panel_never_twice(platform)


def visit_reading_item(data: Path, visit_id: str) -> OutboxItem:
    """The outbox item of a visit's reading quarantined on its own."""
    with Outbox.open(data, min_free_bytes=0) as outbox:
        (item,) = [i for i in outbox.items(kind="observation") if visit_id in i.key]
    return item


def quarantine_a_damaged_visit_reading(service: ForwardService, platform: FhirTestServer, data: Path) -> OutboxItem:
    """P-1's visit stopped, its reading's record damaged: the visit goes without it, the reading is
    quarantined on its own (its outbox item)."""
    visit = stop_a_visit_whose_reading_is_damaged(data)
    step_until(service, lambda: visits_applied(platform) >= 1)
    damaged = visit_reading_item(data, visit.id)
    assert damaged.state is ItemState.QUARANTINED
    return damaged


def lastmile_retry(tmp_path: Path, data: Path, item_id: int) -> None:
    from lastmile.cli import main

    toml = tmp_path / "lastmile.toml"
    toml.write_text(f'[gateway]\nid = "gw-1"\ndata_dir = "{data}"\n')
    assert main(["-c", str(toml), "retry", str(item_id)]) == 0


def restore_and_retry_a_damaged_visit_reading(
    tmp_path: Path, service: ForwardService, platform: FhirTestServer, data: Path
) -> Visit:
    """P-1's visit stopped, its reading's record damaged on the SD card: the visit goes without it,
    the reading is quarantined on its own. The county IT restores the record in visits.db from
    the backup and the doctor runs `lastmile retry`. The visit."""
    visit = stop_a_visit_with_a_reading(data)
    with VisitBook.open(data, gateway_id="gw-1") as book:
        (sound,) = book.db.execute("SELECT record FROM visit_items").fetchone()
        book.db.execute("UPDATE visit_items SET record = json_remove(record, '$.quantities')")
        book.db.conn.commit()
    step_until(service, lambda: visits_applied(platform) >= 1)  # the visit goes without it
    damaged = visit_reading_item(data, visit.id)
    assert damaged.state is ItemState.QUARANTINED
    with VisitBook.open(data, gateway_id="gw-1") as book:  # restored from the backup
        book.db.execute("UPDATE visit_items SET record = ?", [sound])
        book.db.conn.commit()
    lastmile_retry(tmp_path, data, damaged.id)
    return visit


@contextlib.contextmanager
def visits_db_held(data: Path) -> Iterator[None]:
    """Another process in the middle of a write to visits.db, holding its lock (exclusive
    locking mode: WAL readers wait too), until the block ends."""
    conn = sqlite3.connect(data / "visits.db", isolation_level=None)
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("UPDATE visits SET state = state")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@pytest.mark.parametrize("unreadable", ["locked", "damaged"])
def test_a_retried_visit_reading_read_while_visits_db_cannot_be_read_is_put_back_and_sent_once_it_can(
    tmp_path: Path, platform: FhirTestServer, monkeypatch: pytest.MonkeyPatch, unreadable: str
) -> None:
    """A visit's damaged reading, restored in visits.db and retried (`lastmile retry`), was read by
    the relay while visits.db could not be read - another process held it past the busy timeout,
    or its first page was damaged: the read found no rows and the reading was quarantined again as
    "visits.db holds no reading #N" - the reading was there, the file was what failed. It is put
    back saying why, and goes once visits.db can be read again."""
    import time

    from lastmile.services import observation_relay
    from lastmile.visits import relay_link

    monkeypatch.setattr(relay_link, "VISITS_BUSY_TIMEOUT_S", 0.2)  # not 15 s per try in a test
    monkeypatch.setattr(observation_relay, "RELAY_RETRY_S", 0.0)  # the next round tries it again
    config = forward_config(tmp_path, platform.base_url)
    data = config.data_dir
    service = ForwardService(config)
    unreadable_while = visits_db_held if unreadable == "locked" else visits_db_damaged
    try:
        visit = restore_and_retry_a_damaged_visit_reading(tmp_path, service, platform, data)
        with unreadable_while(data), Outbox.open(data, min_free_bytes=0) as outbox:
            relayed = observation_relay.relay_observations(outbox, NAMING, time.time())
            held = visit_reading_item(data, visit.id)
        assert relayed == 0 and held.state is not ItemState.QUARANTINED, held.quarantine_reason
        assert held.last_error is not None and "visits.db cannot be read now" in held.last_error, held.last_error
        step_until(service, lambda: len(platform.resources("Observation")) >= 1)
        for _ in range(3):
            service.step(threading.Event())
    finally:
        service.close()
    assert visit_reading_item(data, visit.id).state is not ItemState.QUARANTINED
    assert "encounter" not in one_panel_never_twice(platform)


def test_a_retried_visit_reading_whose_row_in_a_new_visits_db_is_another_patients_is_not_sent_nor_purged(
    tmp_path: Path, platform: FhirTestServer
) -> None:
    """P-1's visit reading, damaged, quarantined. The county IT replaced the damaged visits.db by
    a fresh one; P-2's visit with a reading took row 1 there. `lastmile retry` of P-1's reading
    read row 1 as it was: P-2's reading went to the platform again, and P-1's item was purged as
    sent (P-1's reading never reached the county, silently). Only the record P-1's visit signed
    (same visit, same sha256) goes: P-1's stays quarantined, saying why."""
    from tests.fhir_samples import blood_pressure

    config = forward_config(tmp_path, platform.base_url)
    data = config.data_dir
    service = ForwardService(config)
    try:
        damaged = quarantine_a_damaged_visit_reading(service, platform, data)
        for path in data.glob("visits.db*"):  # a fresh visits.db for the damaged one
            path.unlink()
        with VisitBook.open(data, gateway_id="gw-1") as book:
            book.start("P-2", doctor_id="DR-1", household_id="HH-2")
            book.attach_observation(blood_pressure(GPS_T, "P-2", "bp-2"))
            book.stop()
            assert [r[0] for r in book.db.execute("SELECT id FROM visit_items")] == [damaged.meta["visit_item"]]
        lastmile_retry(tmp_path, data, damaged.id)
        step_until(service, lambda: visits_applied(platform) >= 2)
        for _ in range(3):
            service.step(threading.Event())
    finally:
        service.close()
    after = visit_reading_item(data, damaged.meta["visit_id"])
    assert after.state is ItemState.QUARANTINED, after.state
    assert "visits.db" in (after.quarantine_reason or "") and "measure the patient again" in (
        after.quarantine_reason or ""
    ), after.quarantine_reason
    (panel,) = [o for o in platform.resources("Observation") if any(systolic(c) for c in o.get("component", []))]
    assert "P-2" in json.dumps(panel["subject"]), panel["subject"]
    with Outbox.open(data, min_free_bytes=0) as outbox:  # the two visits; P-2's reading not on its own too
        assert [i.key.startswith("fhir:visit:") for i in outbox.items(kind=Kind.FHIR_BUNDLE)] == [True, True]
    assert platform.stats.transactions == 2


def test_a_damaged_visit_reading_retried_before_it_is_restored_keeps_saying_it_is_a_visits_reading(
    tmp_path: Path, platform: FhirTestServer
) -> None:
    """`lastmile retry` of a visit's damaged reading nobody restored yet quarantined it again as
    "cannot be made a FHIR bundle: KeyError ...": the visit and "measure the patient again" were
    lost. It says the visit's words again."""
    config = forward_config(tmp_path, platform.base_url)
    data = config.data_dir
    service = ForwardService(config)
    try:
        damaged = quarantine_a_damaged_visit_reading(service, platform, data)
        lastmile_retry(tmp_path, data, damaged.id)
        step_until(service, lambda: visit_reading_item(data, damaged.meta["visit_id"]).state is ItemState.QUARANTINED)
    finally:
        service.close()
    reason = visit_reading_item(data, damaged.meta["visit_id"]).quarantine_reason or ""
    assert damaged.meta["visit_id"] in reason and "measure the patient again" in reason, reason
    assert f"`lastmile retry {damaged.id}`" in reason, reason


def test_a_retried_visit_reading_never_joins_a_new_open_visit_of_its_patient(
    tmp_path: Path, platform: FhirTestServer
) -> None:
    """P-1's visit reading, damaged, quarantined, then restored in visits.db. P-1 has a new visit
    open today, started before any time was known. `lastmile retry` offered the reading to the
    visit link first: it joined today's visit (a reading of another day carried in it). It goes
    on its own, once."""
    from lastmile.clinic.observations import observation_to_json
    from tests.fhir_samples import blood_pressure

    config = forward_config(tmp_path, platform.base_url)
    data = config.data_dir
    service = ForwardService(config)
    try:
        damaged = quarantine_a_damaged_visit_reading(service, platform, data)
        sound = json.dumps(observation_to_json(blood_pressure(GPS_T, "P-1", "bp-1")))  # as the visit linked it
        with VisitBook.open(data, gateway_id="gw-1") as book:  # restored from the backup
            book.db.execute("UPDATE visit_items SET record = ?", [sound])
            book.db.conn.commit()
        clocks = FakeClocks(wall=0.0)  # booted without a time: the new visit's start time unknown
        with VisitBook.open(data, gateway_id="gw-1", policy=VisitPolicy(), clock=clocks.clock()) as book:
            today = book.start("P-1", doctor_id="DR-1", household_id="HH-1")
        lastmile_retry(tmp_path, data, damaged.id)
        step_until(service, lambda: visit_reading_item(data, damaged.meta["visit_id"]).state is not ItemState.QUEUED)
        for _ in range(3):
            service.step(threading.Event())
    finally:
        service.close()
    with VisitBook.open(data, gateway_id="gw-1") as book:
        joined = [r[0] for r in book.db.execute("SELECT item_key FROM visit_items WHERE visit_id = ?", [today.id])]
    assert joined == []
    assert "encounter" not in one_panel_never_twice(platform)


@contextlib.contextmanager
def visits_db_damaged(data: Path) -> Iterator[None]:
    """visits.db's first page overwritten on the SD card (SQLite: "file is not a database",
    SQLITE_NOTADB - not one of the busy/locked names) until the block ends: the county IT then
    restores it from the backup."""
    path = data / "visits.db"
    assert not (data / "visits.db-wal").exists()  # every connection closed: all of it in the file
    sound = path.read_bytes()
    path.write_bytes(b"\xa5" * 512 + sound[512:])
    try:
        yield
    finally:
        path.write_bytes(sound)


def test_a_reading_linked_to_a_closed_visit_is_not_sent_alone_while_visits_db_is_damaged(
    tmp_path: Path, platform: FhirTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay linked a reading to the open visit, then the power went before the reading was
    marked done; the doctor stopped the visit (queued, reading inside). visits.db then could not
    be read (its first page damaged): the relay found "no open visit, not linked" and queued the
    reading on its own too - the county got it twice. It waits, saying why, and goes with its
    visit only once visits.db is repaired."""
    from lastmile.clinic.observations import OBSERVATION_KIND
    from lastmile.services import observation_relay

    def relay_said_why_or_done(outbox: Outbox) -> bool:
        (reading,) = outbox.items(kind=OBSERVATION_KIND)
        return reading.last_error is not None or reading_relayed(outbox)

    monkeypatch.setattr(observation_relay, "RELAY_RETRY_S", 0.0)  # the next round tries it again
    config = forward_config(tmp_path, platform.base_url)
    data = config.data_dir
    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)  # taken during the visit
    with VisitBook.open(data, gateway_id="gw-1") as book:
        visit = book.start("P-1", doctor_id="DR-1")
    link_a_reading_then_lose_power(data, at)
    with VisitBook.open(data, gateway_id="gw-1") as book, Outbox.open(data, min_free_bytes=0) as outbox:
        book.stop()
        assert book.queue_closed(outbox, NAMING) == 1  # what `lastmile visit stop` does
    service = ForwardService(config)
    try:
        with visits_db_damaged(data):
            step_until(service, lambda: relay_said_why_or_done(service.outbox))
            (reading,) = service.outbox.items(kind=OBSERVATION_KIND)
            bundles = [i.key for i in service.outbox.items(kind=Kind.FHIR_BUNDLE)]
        assert bundles == [f"fhir:visit:{visit.id}"], bundles
        assert reading.last_error is not None and "visits.db" in reading.last_error, reading.last_error
        step_until(service, lambda: visits_applied(platform) >= 1 and reading_relayed(service.outbox))
        for _ in range(3):  # more rounds: a reading queued on its own would be sent by now
            service.step(threading.Event())
    finally:
        service.close()
    assert "encounter" in one_panel_never_twice(platform)
