"""The Sent page still lists the readings that went to the county after the outbox purged them.

An ECG sent survives the purge in `sent_studies`; a reading (BP, temperature, SpO2 ...) did not:
with the default retention (0 days) the outbox purges it at the next round, and the Sent page no
longer listed it. The doctor asked "did the BP go?", saw nothing, and measured and sent it again
(a duplicate at the county)."""

from __future__ import annotations

import threading
from pathlib import Path

from lastmile.clinic.observations import OBSERVATION_KIND
from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.services.forward import ForwardService
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
from tests.peers import free_port
from tests.waiting import wait_for
from uploader.outbox import ItemState

OTHER_ID = "DEMO-0002"  # a clinic-issued ID (no resident card)


def readings_section(page: str) -> str:
    return page.split('id="h-readings"', 1)[1].split("</section>", 1)[0]


def reading_purged(config: object) -> bool:
    with open_outbox(config) as outbox:  # type: ignore[arg-type]
        return [i.state for i in outbox.items(kind=OBSERVATION_KIND)] == [ItemState.PURGED]


def gateway_config(tmp_path: Path) -> Config:
    config = console_config(tmp_path / "data")
    config.gateway.id = "gw-1"
    config.outbox.retention_days = 0  # the default: a full SD card's settings purge at once
    config.reading_center.storage_commitment = False  # no ECGs here: no reading center listens
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


def test_a_reading_sent_to_the_county_is_still_listed_after_the_outbox_purged_it(tmp_path: Path) -> None:
    config = gateway_config(tmp_path)
    with FhirTestServer() as platform, running_console(config) as server:
        config.fhir.base_url = platform.base_url
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
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
    config = gateway_config(tmp_path)
    with FhirTestServer() as platform:
        config.fhir.base_url = platform.base_url
        with running_console(config) as server:
            client = Client(server.url)
            client.login(DOCTOR)
            assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
            record_receipt_timed_bp(config, "bp-old")
            send_and_purge(config, platform)
            assert client.post("/today/end-session", {}).status == 303
        set_aside_outbox(config)
        with running_console(config) as server:
            client = Client(server.url)
            client.login(DOCTOR)
            assert client.post("/today/check-in", {"patient_id": OTHER_ID, "name": "李伟"}).status == 303
            record_receipt_timed_bp(config, "bp-new")
            send_and_purge(config, platform)
            section = readings_section(client.get("/sent").body)
    assert len(platform.resources("Observation")) == 2
    assert "李伟" in section and OTHER_ID in section, section
    assert "张三" not in section and VALID_ID not in section, section
