"""The Sent page still lists the readings that went to the county after the outbox purged them.

An ECG sent survives the purge in `sent_studies`; a reading (BP, temperature, SpO2 ...) did not:
with the default retention (0 days) the outbox purges it at the next round, and the Sent page no
longer listed it. The doctor asked "did the BP go?", saw nothing, and measured and sent it again
(a duplicate at the county)."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lastmile.clinic.observations import OBSERVATION_KIND
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.reports.sent_readings import SentReading
from lastmile.reports.store import ReportStore
from lastmile.services.forward import ForwardService
from lastmile.services.metered import meters
from tests.console_harness import (
    DOCTOR,
    VALID_ID,
    Client,
    console_config,
    record_receipt_timed_bp,
    running_console,
    set_aside_outbox,
)
from tests.fhir_server import FhirTestServer
from tests.metering_setup import shut_window
from tests.peers import free_port
from tests.statement_trace import traced
from tests.waiting import wait_for
from uploader.outbox import ItemState, Kind, OutboxItem

OTHER_ID = "DEMO-0002"  # a clinic-issued ID (no resident card)


def readings_section(page: str) -> str:
    return page.split('id="h-readings"', 1)[1].split("</section>", 1)[0]


def reading_purged(config: object) -> bool:
    with open_outbox(config) as outbox:  # type: ignore[arg-type]
        return [i.state for i in outbox.items(kind=OBSERVATION_KIND)] == [ItemState.PURGED]


def forward_config(tmp_path: Path) -> Config:
    """The console's clinic, forwarding readings only (no reading center listens: no ECGs here)."""
    config = console_config(tmp_path / "data")
    config.gateway.id = "gw-1"
    config.outbox.retention_days = 0  # the default: a full SD card's settings purge at once
    config.reading_center.storage_commitment = False
    config.reading_center.listen_port = free_port()
    config.reading_center.host = "127.0.0.1"
    config.reading_center.port = free_port()
    return config


def send_and_purge(config: Config, platform: FhirTestServer) -> None:
    """The real forward path (relay, FHIR round, purge) until the outbox's reading is purged."""
    service = ForwardService(config)
    try:
        stop = threading.Event()
        wait_for(
            lambda: (service.step(stop), reading_purged(config))[1],
            timeout=60.0,
            what="the reading sent to the platform and purged from the outbox",
        )
    finally:
        service.close()


def checked_in(
    config: Config, url: str, platform: FhirTestServer, patient_id: str = VALID_ID, name: str = "张三"
) -> Client:
    """The doctor logged in, the patient checked in, readings going to `platform`."""
    config.fhir.base_url = platform.base_url
    client = Client(url)
    client.login(DOCTOR)
    assert client.post("/today/check-in", {"patient_id": patient_id, "name": name}).status == 303
    return client


def test_a_reading_sent_to_the_county_is_still_listed_after_the_outbox_purged_it(tmp_path: Path) -> None:
    config = forward_config(tmp_path)
    with FhirTestServer() as platform, running_console(config) as server:
        client = checked_in(config, server.url, platform)
        record_receipt_timed_bp(config, "bp-1")
        send_and_purge(config, platform)
        section = readings_section(client.get("/sent").body)
    assert len(platform.resources("Observation")) == 1
    assert "张三" in section and VALID_ID in section, section
    assert "血压" in section and "131/84 mmHg" in section, section
    assert "已发送" in section, section


def test_after_the_outbox_is_made_anew_a_sent_reading_shows_its_own_patient(tmp_path: Path) -> None:
    """The sent-reading records are kept by outbox item id. A new outbox (the old one damaged and
    set aside) numbers its items from 1 again: the new patient's reading, purged, was shown with
    the OLD record of item 1 - another patient's blood pressure on the Sent page."""
    config = forward_config(tmp_path)
    with FhirTestServer() as platform:
        with running_console(config) as server:
            client = checked_in(config, server.url, platform)
            record_receipt_timed_bp(config, "bp-old")
            send_and_purge(config, platform)
            assert client.post("/today/end-session", {}).status == 303
        set_aside_outbox(config)
        with running_console(config) as server:
            client = checked_in(config, server.url, platform, OTHER_ID, "李伟")
            record_receipt_timed_bp(config, "bp-new")
            send_and_purge(config, platform)
            section = readings_section(client.get("/sent").body)
    assert len(platform.resources("Observation")) == 2
    assert "李伟" in section and OTHER_ID in section, section
    assert "张三" not in section and VALID_ID not in section, section


def fhir_bundles(config: object) -> list[OutboxItem]:
    with open_outbox(config) as outbox:  # type: ignore[arg-type]
        return outbox.items(kind=Kind.FHIR_BUNDLE)


def step_until(service: ForwardService, done: Callable[[], object], what: str) -> None:
    stop = threading.Event()
    wait_for(lambda: (service.step(stop), done())[1], timeout=60.0, what=what)


def test_a_reading_whose_bundle_the_county_platform_has_not_taken_is_not_shown_as_sent(tmp_path: Path) -> None:
    """The reading's own item is done once relayed into its bundle; the page said 已发送 then,
    while the platform was down, and the doctor was told the BP went when it had not."""
    config = forward_config(tmp_path)
    config.outbox.backoff_base_s = 0.2  # the platform back: its bundle tried again soon
    config.outbox.backoff_max_s = 0.5
    with FhirTestServer() as platform, running_console(config) as server:
        platform.retry_after_s = 0
        client = checked_in(config, server.url, platform)
        record_receipt_timed_bp(config, "bp-1")
        platform.gateway_down = 503  # the county platform is down
        service = ForwardService(config)  # the real forward path: relay, FHIR round, purge
        try:
            step_until(
                service,
                lambda: reading_purged(config) and [b.attempts for b in fhir_bundles(config)] >= [1],
                "the reading relayed and purged, its bundle tried and refused by the down platform",
            )
            waiting = readings_section(client.get("/sent").body)
            platform.gateway_down = None  # back
            step_until(service, lambda: platform.resources("Observation"), "the bundle taken by the platform")
            taken = readings_section(client.get("/sent").body)
            taken_at = fhir_bundles(config)[0].sent_at
            # a second reading, which the platform refuses
            record_receipt_timed_bp(config, "bp-2")
            platform.faults.append("400")
            step_until(
                service,
                lambda: [b.state for b in fhir_bundles(config)][-1:] == [ItemState.QUARANTINED],
                "the second reading's bundle refused",
            )
            refused = readings_section(client.get("/sent").body)
        finally:
            service.close()
    assert "血压" in waiting and "131/84 mmHg" in waiting, waiting
    assert "已发送" not in waiting, waiting
    assert "等待发送" in waiting or "重试" in waiting, waiting
    assert "已发送" in taken, taken
    assert taken_at is not None
    shown = re.search(r'已发送\s*<time datetime="([^"]+)"', taken)
    assert shown is not None, taken
    assert abs(dt.datetime.fromisoformat(shown[1]).timestamp() - taken_at) < 1.0, (shown[1], taken_at)
    with ReportStore.open(config.data_dir) as store:
        first, second = sorted(store.recent_sent_readings(10), key=lambda r: r.outbox_item_id)
    assert first.sent_at is not None and abs(first.sent_at.timestamp() - taken_at) < 1.0, first
    assert second.sent_at is None, second  # refused: never taken
    card = refused.split("<li", 2)[1]  # the newest first: the refused one
    assert "未发送：县健康平台无法接收" in card and "已发送" not in card, card
    assert "400" in card, card


def test_a_reading_taken_during_a_home_visit_is_sent_when_the_visits_bundle_is_taken(tmp_path: Path) -> None:
    """A reading taken during an open home visit goes in the visit's bundle, once the visit is
    stopped: the page said 已发送 from the link on, while the visit was still open."""
    from lastmile.visits.book import VisitBook

    config = forward_config(tmp_path)
    with FhirTestServer() as platform, running_console(config) as server:
        client = checked_in(config, server.url, platform)
        with VisitBook.open(config.data_dir, gateway_id="gw-1") as book:
            book.start(VALID_ID, doctor_id="DR-1")
        record_receipt_timed_bp(config, "bp-1")
        service = ForwardService(config)
        try:
            step_until(service, lambda: reading_purged(config), "the reading linked to the open visit and purged")
            open_visit = readings_section(client.get("/sent").body)
            with VisitBook.open(config.data_dir, gateway_id="gw-1") as book:
                book.stop()
            step_until(service, lambda: platform.resources("Encounter"), "the visit's bundle taken by the platform")
            taken = readings_section(client.get("/sent").body)
        finally:
            service.close()
    assert len(platform.resources("Encounter")) == 1
    assert "131/84 mmHg" in open_visit and "已发送" not in open_visit, open_visit
    assert "随家访记录一起发往县里" in open_visit, open_visit
    assert "已发送" in taken and "随家访记录一起发往县里" in taken, taken
    with ReportStore.open(config.data_dir) as store:
        [record] = store.recent_sent_readings(1)
    assert record.sent_at is not None, record  # by the visit bundle's key, in the round that took it


# The taken record without a rescan. After a FHIR round the forward service read every record with
# no sent time - the readings whose bundles were refused, kept to retention, among them - and looked
# up each one's bundle in the outbox: a clinic with 500 refused readings paid ~500 more queries per
# round on the Pi's SD card, more with each refusal. The round knows the keys the platform took.

FEW_REFUSED, MANY_REFUSED = 2, 500


def clinic(tmp_path: Path, platform: FhirTestServer) -> Config:
    """A clinic forwarding readings to `platform`, its patient checked in."""
    config = forward_config(tmp_path)
    config.fhir.base_url = platform.base_url
    config.outbox.backoff_base_s = 0.05  # a bundle refused for now is tried again soon
    config.outbox.backoff_max_s = 0.1
    now = dt.datetime.now(dt.timezone.utc)
    context = PatientContext.open(config.data_dir, idle_timeout_s=900)
    try:
        context.set_patient(VALID_ID, "张三", now=now)
    finally:
        context.close()
    return config


def refused_readings(config: Config, count: int) -> None:
    """`count` readings relayed earlier whose bundles the platform refused for good: quarantined
    bundles, their records kept (to retention) with no sent time."""
    at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    records = []
    with open_outbox(config) as outbox:
        for n in range(count):
            key = f"fhir:obs:refused-{n}"
            bundle = outbox.add(Kind.FHIR_BUNDLE, key, b"{}", patient={"patient_id": VALID_ID}, now=at.timestamp())
            outbox.quarantine(bundle.item.id, "HTTP 400: Observation.code invalid", at.timestamp())
            records.append(
                SentReading(
                    outbox_item_id=1_000_000 + n,
                    record_key=f"bp-refused-{n}",
                    patient_id=VALID_ID,
                    patient_name="张三",
                    kind="blood-pressure",
                    summary="131/84 mmHg",
                    device="Acme BP-1",
                    measured_at=at,
                    time_source="device-clock",
                    relayed_at=at,
                    destination=config.fhir.base_url,
                    bundle_key=key,
                )
            )
    with ReportStore.open(config.data_dir) as store:
        store.record_sent_readings(records)


def the_new_reading(config: Config) -> SentReading:
    """The record of the reading the test measured (not one of the refused ones)."""
    with ReportStore.open(config.data_dir) as store:
        [record] = [
            r for r in store.recent_sent_readings(MANY_REFUSED + 10) if not r.record_key.startswith("bp-refused-")
        ]
    return record


def taken_time(config: Config) -> float:
    """When the platform took the new reading's bundle, as the outbox has it."""
    [taken] = [b for b in fhir_bundles(config) if b.state in (ItemState.COMMITTED, ItemState.PURGED)]
    assert taken.sent_at is not None
    return taken.sent_at


def statements_of_the_round_that_sends(tmp_path: Path, refused: int) -> int:
    """The SQL statements (outbox and clinic.db) of the forward round in which the platform takes
    a new reading's bundle, with `refused` refused readings on record."""
    with FhirTestServer() as platform:
        config = clinic(tmp_path, platform)
        service = ForwardService(config)
        try:
            stop = threading.Event()
            service.step(stop)  # the process's first round: records caught up from the outbox, once
            refused_readings(config, refused)
            record_receipt_timed_bp(config, "bp-1")
            with traced(service.outbox.db.conn, service.reports.store.db.conn) as statements:
                service.step(stop)
        finally:
            service.close()
        assert len(platform.resources("Observation")) == 1
    record = the_new_reading(config)
    assert record.sent_at is not None and abs(record.sent_at.timestamp() - taken_time(config)) < 1e-3, record
    return len(statements)


def test_the_round_records_what_the_platform_took_in_as_many_statements_whatever_was_refused(
    tmp_path: Path,
) -> None:
    few = statements_of_the_round_that_sends(tmp_path / "few", FEW_REFUSED)
    many = statements_of_the_round_that_sends(tmp_path / "many", MANY_REFUSED)
    assert many == few, (few, many)


def test_a_taken_reading_clinic_db_refused_to_record_is_recorded_by_the_next_round(tmp_path: Path) -> None:
    """clinic.db refuses the round's update (a read-only moment, a full disk): the next round,
    sending nothing, records it - with the time the platform took the bundle."""
    with FhirTestServer() as platform:
        config = clinic(tmp_path, platform)
        refused_readings(config, FEW_REFUSED)
        service = ForwardService(config)
        try:
            refused_then_taken(service, config, platform)
            service.reports.store.db.conn.execute("PRAGMA query_only = 0")  # clinic.db writable again
            service.step(threading.Event())
        finally:
            service.close()
    record = the_new_reading(config)
    assert record.sent_at is not None and abs(record.sent_at.timestamp() - taken_time(config)) < 1e-3, record


def test_a_taken_reading_clinic_db_refused_to_record_is_recorded_after_a_restart(tmp_path: Path) -> None:
    """The service restarted (systemd, a power cut) before it could record it: the new process's
    first round records it, though it sends nothing."""
    with FhirTestServer() as platform:
        config = clinic(tmp_path, platform)
        service = ForwardService(config)
        try:
            refused_then_taken(service, config, platform)
        finally:
            service.close()
        service = ForwardService(config)
        try:
            service.step(threading.Event())
        finally:
            service.close()
    record = the_new_reading(config)
    assert record.sent_at is not None and abs(record.sent_at.timestamp() - taken_time(config)) < 1e-3, record


def refused_then_taken(service: ForwardService, config: Config, platform: FhirTestServer) -> None:
    """A reading relayed (its record written) while the platform is down; then clinic.db refuses
    writes while the platform takes its bundle: the record has no sent time."""
    platform.retry_after_s = 0
    platform.gateway_down = 503
    record_receipt_timed_bp(config, "bp-1")
    step_until(service, lambda: [b.attempts for b in fhir_bundles(config)][-1:] >= [1], "the bundle refused for now")
    service.reports.store.db.conn.execute("PRAGMA query_only = 1")  # clinic.db refuses writes
    platform.gateway_down = None
    step_until(service, lambda: platform.resources("Observation"), "the bundle taken by the platform")
    assert the_new_reading(config).sent_at is None


@pytest.mark.parametrize(
    ("held_by", "words"), [("window", "等待发送时段：将于"), ("budget", "今天的流量额度已用完：将于")]
)
def test_a_reading_the_metered_link_holds_says_when_it_goes_as_a_held_ecg_does(
    tmp_path: Path, held_by: str, words: str
) -> None:
    """The county platform's link is metered (fhir.metered): its send window shut, or today's
    allowance spent, the reading's bundle waits for it. An ECG held so says what it waits for and
    when it goes; the reading said plain 等待发送, as if the link were simply slow."""
    config = forward_config(tmp_path)
    now = time.time()
    if held_by == "window":
        config.fhir.metered.windows = [shut_window(now)]
    else:
        config.fhir.metered.daily_budget_mb = 1.0
    with FhirTestServer() as platform, running_console(config) as server:
        client = checked_in(config, server.url, platform)
        if held_by == "budget":
            with open_outbox(config) as outbox:
                meters(config, outbox)["fhir"].spend(2**20, now)
        record_receipt_timed_bp(config, "bp-1")
        service = ForwardService(config)
        try:
            step_until(service, lambda: reading_purged(config) and fhir_bundles(config), "the reading relayed, held")
            section = readings_section(client.get("/sent").body)
        finally:
            service.close()
    assert not platform.resources("Observation")  # held: not sent
    assert [b.state for b in fhir_bundles(config)] == [ItemState.QUEUED]
    assert "131/84 mmHg" in section and "已发送" not in section, section
    assert words in section, section


def refuse_sent_records(config: Config, refuse: bool) -> None:
    """clinic.db refuses (or takes again) the Sent page's records of relayed readings, as a
    database it cannot write does: a trigger aborting their insert."""
    with sqlite3.connect(config.data_dir / "clinic.db") as db:
        if refuse:
            db.execute(
                "CREATE TRIGGER refuse_sent BEFORE INSERT ON sent_readings BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
            )
        else:
            db.execute("DROP TRIGGER refuse_sent")


@contextlib.contextmanager
def a_reading_taken_unrecorded(tmp_path: Path) -> Iterator[tuple[Config, FhirTestServer, Client, ForwardService]]:
    """A BP checked in and measured; clinic.db refuses its sent record while the forward service
    relays it and the county platform takes its bundle. The config, the platform, the console's
    client and the (running) forward service, then."""
    config = forward_config(tmp_path)
    with FhirTestServer() as platform, running_console(config) as server:
        client = checked_in(config, server.url, platform)
        record_receipt_timed_bp(config, "bp-1")
        refuse_sent_records(config, True)
        service = ForwardService(config)
        try:
            step_until(service, lambda: platform.resources("Observation"), "the reading's bundle taken, unrecorded")
            yield config, platform, client, service
        finally:
            service.close()


def test_a_reading_whose_sent_record_clinic_db_refused_is_still_listed_after_the_purge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay wrote no record (clinic.db refused it) and marked the reading sent anyway: the
    page said 已发送 from the item's state, then, the outbox having purged it, listed it no more -
    the doctor measured the BP again. Its record is written at a later round."""
    from lastmile.services import observation_relay

    monkeypatch.setattr(observation_relay, "RELAY_RETRY_S", 0.5)  # the later round soon
    with a_reading_taken_unrecorded(tmp_path) as (config, platform, client, service):
        refuse_sent_records(config, False)
        step_until(service, lambda: reading_purged(config), "the reading recorded, then purged")
        section = readings_section(client.get("/sent").body)
    assert len(platform.resources("Observation")) == 1
    assert "131/84 mmHg" in section and "已发送" in section, section
    # written after the platform took its bundle: its sent time too (the outbox made anew, it still says 已发送)
    with ReportStore.open(config.data_dir) as store:
        [record] = store.recent_sent_readings(1)
    assert record.sent_at is not None and abs(record.sent_at.timestamp() - taken_time(config)) < 1e-3, record


def test_a_reading_the_platform_took_while_clinic_db_refused_its_record_says_it_is_sent(tmp_path: Path) -> None:
    """clinic.db refused the reading's sent record: the relay put the reading back, unmarked, for a
    later relay to record, while its bundle went on and the platform took it. The page said
    等待发送 meanwhile, and the doctor measured the BP again. It says 已发送 at the time the
    platform took it (the outbox's), and that this gateway's own record is not saved yet."""
    with a_reading_taken_unrecorded(tmp_path) as (config, _platform, client, _service):
        section = readings_section(client.get("/sent").body)
        with open_outbox(config) as outbox:
            [reading] = outbox.items(kind=OBSERVATION_KIND)
    assert reading.state == ItemState.QUEUED, reading  # put back: a later relay records it
    assert "131/84 mmHg" in section and "等待发送" not in section, section
    said = re.search(r'已发送 <time datetime="([^"]+)"', section)
    assert said, section
    assert abs(dt.datetime.fromisoformat(said[1]).timestamp() - taken_time(config)) < 1, (said[1], section)
    assert "县级平台已收到。本机尚未保存它的发送记录" in section, section
