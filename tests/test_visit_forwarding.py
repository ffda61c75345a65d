"""Closed home visits reach the county platform through the forward service, once each.

The doctor's `lastmile visit stop` queues the visit it closes if its times are known. Any other
closed visit - stopped before GPS or NTP gave the time and signed later by the acquire service's
GPS fix, or closed by a stop that a power cut interrupted before it queued - used to wait in
visits.db until the doctor's next stop: the day's last visit never left the village overnight.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lastmile.config import Config
from lastmile.services.forward import ForwardService
from lastmile.visits.book import VisitBook, VisitPolicy
from tests.fhir_samples import NAMING
from tests.fhir_server import FhirTestServer
from tests.peers import free_port
from tests.serial_pty import wait_for
from tests.test_sd_wear import idle_steps_wrote
from tests.test_visits import GPS_T, HOUSE, FakeClocks, fix_at
from uploader.outbox import Kind, Outbox


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


# --- 2. every fix (1 Hz, all day) reads the open visit once, not twice --------------------------


def test_each_fix_reads_the_open_visit_once(tmp_path: Path) -> None:
    clocks = FakeClocks(wall=GPS_T.timestamp())
    with VisitBook.open(tmp_path / "data", gateway_id="gw-1", clock=clocks.clock()) as book:
        book.start("P-1", doctor_id="DR-1")
        book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())  # the first anchors the clock
        statements: list[str] = []
        conn: sqlite3.Connection = book.db.conn
        conn.set_trace_callback(statements.append)
        try:
            for n in range(10):
                clocks.advance(1.0)
                book.observe_fix(fix_at(*HOUSE, GPS_T.replace(second=n + 1)), book.clock.now())
        finally:
            conn.set_trace_callback(None)
        assert len(book.track(book.open_visit().id)) == 11  # type: ignore[union-attr]
    full_rows = [s for s in statements if "SELECT * FROM visits" in s]
    chain_reads = [s for s in statements if "FROM chain" in s]
    visit_reads = [s for s in statements if "FROM visits" in s]
    # one look for the open visit, one atomic "still open?" in the insert: no Visit built per fix
    assert not full_rows, f"{len(full_rows)} whole visit rows read for 10 fixes"
    assert not chain_reads, f"{len(chain_reads)} reads of the signed chain for 10 fixes"
    assert len(visit_reads) <= 20, f"{len(visit_reads)} reads of visits for 10 fixes"
