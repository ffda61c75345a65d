"""Faults on the visits and FHIR sync path, found by review (2026-12-05): visit times repaired
after signing (the chain said "edited"), sent in-progress forever, never queued after a reboot,
or kept on a wrong system clock GPS had corrected; a malformed or non-transaction 2xx crashed the
round or counted as stored; a wrong endpoint quarantined every visit; passing faults quarantined
readings. Each test failed on the code before its fix."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import requests

from lastmile.visits.book import FixRecord, VisitBook, VisitPolicy
from tests.fhir_samples import NAMING, all_kinds, queue_visits, signature, visit
from tests.visit_harness import GPS_T, HOUSE, FakeClocks, fix_at
from uploader.fhir_bundle import visit_bundle
from uploader.fhir_forwarder import enqueue_bundle, forward_fhir_once
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.outbox import ItemState, Kind, Outbox


def _book(data: Path, clocks: FakeClocks) -> VisitBook:
    return VisitBook.open(data, gateway_id="gw-1", policy=VisitPolicy(), clock=clocks.clock())


def _queued_encounter(outbox: Outbox, visit_id: str) -> dict:
    item = outbox.find(f"fhir:visit:{visit_id}")
    assert item is not None, "the visit was never queued"
    bundle = json.loads(outbox.read_payload(item))
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter")


# --- 1. a visit stopped before the clock had a time breaks its own signed chain ------------------


def test_visit_stopped_before_gps_still_verifies_after_gps_gives_the_time(tmp_path: Path) -> None:
    clocks = FakeClocks(wall=0.0)  # booted in 1970, no GPS yet (indoors)
    with _book(tmp_path / "data", clocks) as book:
        book.start("P-1", doctor_id="DR-1")
        book.note("dizziness")
        clocks.advance(600)
        book.stop()  # closed and chained with started_at/ended_at unknown
        assert book.verify_local().ok
        clocks.advance(60)
        book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())  # outdoors: GPS repairs the times
        report = book.verify_local()
        # nobody edited anything: the gateway's own repair must not look like tampering
        assert report.ok, report.problems


# --- 2. a visit closed after a reboot, before the clock had a time, goes as "in-progress" forever -


def test_visit_closed_after_reboot_is_not_sent_as_in_progress_forever(tmp_path: Path) -> None:
    data = tmp_path / "data"
    boot1 = FakeClocks(wall=GPS_T.timestamp(), boot="boot-1")  # a good time in the first boot
    with _book(data, boot1) as book:
        v = book.start("P-1", doctor_id="DR-1", fix=FixRecord(fix_at(*HOUSE, GPS_T), book.clock.now()))
    # the battery dies during the visit; the Pi boots in 1970, no GPS fix yet
    boot2 = FakeClocks(wall=0.0, boot="boot-2")
    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    with _book(data, boot2) as book:
        closed = book.stop()
        assert closed.state == "closed"
        book.queue_closed(outbox, NAMING)  # what `lastmile visit stop` does right after
        boot2.advance(30)
        book.observe_fix(fix_at(*HOUSE, GPS_T + dt.timedelta(hours=1)), book.clock.now())  # time known now
        book.queue_closed(outbox, NAMING)
        assert book.get(v.id).end.time is not None  # type: ignore[union-attr]  # the gateway knows the end
        encounter = _queued_encounter(outbox, v.id)
    outbox.close()
    # The platform keeps what came first (conditional create never updates): it must be the
    # finished visit, not an "in-progress" visit with no end that the doctor closed long ago.
    assert encounter["status"] == "finished", encounter
    assert "end" in encounter["period"], encounter["period"]


# --- 3. a visit started on a wrong (but plausible) system clock keeps the wrong times ------------


def test_visit_times_follow_gps_once_gps_disagrees_with_the_system_clock(tmp_path: Path) -> None:
    clocks = FakeClocks(wall=GPS_T.timestamp() + 3600)  # fake-hwclock / drift: the system is 1 h fast
    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    with _book(tmp_path / "data", clocks) as book:
        v = book.start("P-1", doctor_id="DR-1")
        clocks.advance(10)
        book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())  # GPS: it is really GPS_T
        clocks.advance(600)
        assert book.clock.now().time == GPS_T + dt.timedelta(seconds=600)  # the gateway knows the time
        closed = book.stop(FixRecord(fix_at(*HOUSE, GPS_T + dt.timedelta(seconds=600)), book.clock.now()))
        book.queue_closed(outbox, NAMING)
        encounter = _queued_encounter(outbox, v.id)
    outbox.close()
    assert "time-disagreement" in closed.flags
    # The end was stamped when GPS time was known; the start is this boot's monotonic + GPS offset.
    assert encounter["period"]["end"] == "2026-03-02T08:10:00.000Z", encounter["period"]
    assert encounter["period"]["start"] == "2026-03-02T07:59:50.000Z", encounter["period"]


# --- 4. malformed 2xx answers from the platform ----------------------------------------------------


class _AnsweringSession(requests.Session):
    """A session whose every request is answered with the given status and body."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__()
        self.status, self.body = status, body

    def send(self, request, **kwargs):  # type: ignore[override]
        r = requests.Response()
        r.status_code = self.status
        r._content = self.body
        r.headers["Content-Type"] = "application/fhir+json"
        r.url = request.url
        return r


def _one_visit(tmp_path: Path) -> Outbox:
    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    v = visit(1)
    enqueue_bundle(
        outbox,
        visit_bundle(v, all_kinds(v.started_at, v.patient_id), NAMING, signature(1)),
        f"fhir:visit:{v.visit_id}",
        patient_id=v.patient_id,
        now=1000.0,
    )
    return outbox


@pytest.mark.parametrize("body", [b"[]", b"null", b'"ok"', b'{"resourceType":"Bundle","entry":["x"]}'])
def test_a_malformed_2xx_answer_does_not_crash_the_round(tmp_path: Path, body: bytes) -> None:
    outbox = _one_visit(tmp_path)
    sender = FhirSender(FhirSenderSettings(base_url="http://127.0.0.1:9/fhir"), session=_AnsweringSession(200, body))
    try:
        forward_fhir_once(outbox, sender, 2000.0)  # raises AttributeError today: the forward service exits
    finally:
        states = {i.state for i in outbox.items(kind=Kind.FHIR_BUNDLE)}
        outbox.close()
    assert states <= {ItemState.QUEUED, ItemState.QUARANTINED}, states


@pytest.mark.parametrize(
    "body",
    [
        b"{}",  # a proxy's JSON
        b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception"}]}',
        b'{"resourceType":"Bundle","type":"transaction-response"}',  # no entry for what we sent
    ],
)
def test_a_2xx_that_is_not_a_transaction_response_does_not_commit_the_visit(tmp_path: Path, body: bytes) -> None:
    outbox = _one_visit(tmp_path)
    sender = FhirSender(FhirSenderSettings(base_url="http://127.0.0.1:9/fhir"), session=_AnsweringSession(200, body))
    counts = forward_fhir_once(outbox, sender, 2000.0)
    committed = outbox.items(state=ItemState.COMMITTED, kind=Kind.FHIR_BUNDLE)
    outbox.close()
    # Nothing says the platform stored the visit: it must not be dropped from the queue as sent.
    assert counts.sent == 0 and not committed, counts


# --- 5. the relay quarantines a reading for a passing fault (full disk, visits.db busy) ---------


def _reading_in_outbox(tmp_path: Path) -> tuple[Outbox, int]:
    from lastmile.clinic.observations import OBSERVATION_KIND, observation_payload
    from tests.fhir_samples import blood_pressure

    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    obs = blood_pressure(GPS_T, "P-1", "bp-77")
    item = outbox.add(
        OBSERVATION_KIND,
        obs.record_key,
        observation_payload(obs),
        patient={"patient_id": "P-1"},
        now=GPS_T.timestamp() - 60,
    )
    return outbox, item.item.id


def test_relay_does_not_quarantine_a_reading_when_the_disk_is_full_for_a_while(tmp_path: Path) -> None:
    from lastmile.services.observation_relay import relay_observations

    outbox, reading = _reading_in_outbox(tmp_path)
    outbox.min_free_bytes = 2**62  # the data partition is full now (the doctor will free space)
    relay_observations(outbox, NAMING, GPS_T.timestamp())
    state = outbox.get(reading).state  # type: ignore[union-attr]
    reason = outbox.get(reading).last_error  # type: ignore[union-attr]
    outbox.close()
    # "Nothing was lost ... try again later": a passing fault, not a reading that can never be sent
    assert state != ItemState.QUARANTINED, reason


def test_relay_does_not_quarantine_a_reading_when_visits_db_is_busy(tmp_path: Path) -> None:
    import sqlite3

    from lastmile.services.observation_relay import relay_observations

    def busy_link(obs, key):  # VisitBook.open / attach under a long `lastmile visit stop` write
        raise sqlite3.OperationalError("database is locked")

    outbox, reading = _reading_in_outbox(tmp_path)
    relay_observations(outbox, NAMING, GPS_T.timestamp(), visit_link=busy_link)
    state = outbox.get(reading).state  # type: ignore[union-attr]
    reason = outbox.get(reading).last_error  # type: ignore[union-attr]
    outbox.close()
    assert state != ItemState.QUARANTINED, reason


# --- 6. an endpoint that is not there (404 for every POST) quarantines every visit ---------------


def test_a_wrong_endpoint_does_not_quarantine_every_visit(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    queue_visits(outbox, range(3), patient_of=lambda n: f"P-{n}")
    # the county moved its FHIR endpoint (or fhir.base_url lost its /fhir): the web server says 404
    nginx = b"<html><head><title>404 Not Found</title></head><body>nginx</body></html>"
    sender = FhirSender(FhirSenderSettings(base_url="http://127.0.0.1:9/fhir"), session=_AnsweringSession(404, nginx))
    counts = forward_fhir_once(outbox, sender, 2000.0, batch_size=10)
    quarantined = outbox.items(state=ItemState.QUARANTINED, kind=Kind.FHIR_BUNDLE)
    outbox.close()
    # nothing is wrong with any of the visits: the platform refuses *us* (as for 401/403)
    assert not quarantined, (counts, [q.quarantine_reason for q in quarantined])


# --- 7. a visit started before any time was known, then a reboot: never sent, nothing said -------


def test_visit_started_without_time_before_a_reboot_still_reaches_the_queue(tmp_path: Path) -> None:
    data = tmp_path / "data"
    boot1 = FakeClocks(wall=0.0, boot="boot-1")  # 1970, indoors: no GPS
    with _book(data, boot1) as book:
        v = book.start("P-1", doctor_id="DR-1")  # "time provisional until GPS or NTP"
    boot2 = FakeClocks(wall=0.0, boot="boot-2")  # the battery died; after the reboot GPS gives the time
    outbox = Outbox.open(data, min_free_bytes=0)
    with _book(data, boot2) as book:
        book.observe_fix(fix_at(*HOUSE, GPS_T), book.clock.now())
        boot2.advance(300)
        closed = book.stop(FixRecord(fix_at(*HOUSE, GPS_T + dt.timedelta(seconds=300)), book.clock.now()))
        assert closed.end is not None and closed.end.time is not None  # its end is known
        book.queue_closed(outbox, NAMING)
        boot2.advance(3600)
        book.observe_fix(fix_at(*HOUSE, GPS_T + dt.timedelta(seconds=3900)), book.clock.now())
        book.queue_closed(outbox, NAMING)
    queued = outbox.find(f"fhir:visit:{v.id}")
    outbox.close()
    # the start can never be repaired (another boot): the visit waits forever, silently
    assert queued is not None, f"visit {v.id} closed with a known end but is never queued for the county"
