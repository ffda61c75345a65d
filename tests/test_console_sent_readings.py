"""The Sent page still lists the readings that went to the county after the outbox purged them.

An ECG sent survives the purge in `sent_studies`; a reading (BP, temperature, SpO2 ...) did not:
with the default retention (0 days) the outbox purges it at the next round, and the Sent page no
longer listed it. The doctor asked "did the BP go?", saw nothing, and measured and sent it again
(a duplicate at the county)."""

from __future__ import annotations

import threading
from pathlib import Path

from lastmile.clinic.observations import OBSERVATION_KIND
from lastmile.data_dir import open_outbox
from lastmile.services.forward import ForwardService
from tests.console_harness import DOCTOR, VALID_ID, Client, console_config, record_receipt_timed_bp, running_console
from tests.fhir_server import FhirTestServer
from tests.peers import free_port
from tests.waiting import wait_for
from uploader.outbox import ItemState


def readings_section(page: str) -> str:
    return page.split('id="h-readings"', 1)[1].split("</section>", 1)[0]


def reading_purged(config: object) -> bool:
    with open_outbox(config) as outbox:  # type: ignore[arg-type]
        return [i.state for i in outbox.items(kind=OBSERVATION_KIND)] == [ItemState.PURGED]


def test_a_reading_sent_to_the_county_is_still_listed_after_the_outbox_purged_it(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data")
    config.gateway.id = "gw-1"
    config.outbox.retention_days = 0  # the default: a full SD card's settings purge at once
    config.reading_center.storage_commitment = False  # no ECGs here: no reading center listens
    config.reading_center.listen_port = free_port()
    config.reading_center.host = "127.0.0.1"
    config.reading_center.port = free_port()
    with FhirTestServer() as platform, running_console(config) as server:
        config.fhir.base_url = platform.base_url
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
        record_receipt_timed_bp(config, "bp-1")
        service = ForwardService(config)  # the real forward path: relay, FHIR round, purge
        try:
            stop = threading.Event()
            wait_for(
                lambda: (service.step(stop), platform.resources("Observation") and reading_purged(config))[1],
                timeout=60.0,
                what="the reading sent to the platform and purged from the outbox",
            )
        finally:
            service.close()
        section = readings_section(client.get("/sent").body)
    assert len(platform.resources("Observation")) == 1
    assert "张三" in section and VALID_ID in section, section
    assert "血压" in section and "131/84 mmHg" in section, section
    assert "已发送" in section, section
