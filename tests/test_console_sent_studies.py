"""The Sent page's ECG studies after the outbox purged them: each shows its own patient and
report as `sent_studies` keeps them, also when outbox.sqlite was made anew (item ids from 1 again)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.identity import Patient
from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.demo.cardiologist import ecg_report_sr
from lastmile.demo.reading_center import EmbeddedReadingCenter
from lastmile.reports.store import ReportStore
from tests.console_harness import DOCTOR, VALID_ID, Client, running_console, set_aside_outbox
from tests.ecg_factories import make_recording
from tests.peers import free_port
from tests.report_peers import gateway_config, poller_for, send_ecgs, to_read

OTHER_ID = "DEMO-0002"  # a clinic-issued ID (no resident card)


@pytest.fixture
def center() -> Iterator[EmbeddedReadingCenter]:
    """A reading center with storage commitment: what it commits, the gateway purges."""
    center = EmbeddedReadingCenter(port=free_port(), gateway_port=free_port(), gateway_ae="CLINIC01")
    center.start()
    yield center
    center.stop()


def clinic_config(tmp_path: Path, center: EmbeddedReadingCenter) -> Config:
    config = gateway_config(tmp_path, center.port, center.ae_title, listen_port=center.gateway_port)
    config.console.listen = f"127.0.0.1:{free_port()}"
    config.gps.source = "none"
    return config


def send_and_purge(config: Config, number: int, patient: Patient) -> None:
    """An ECG of `patient` sent for real, committed by the reading center, then purged (its patient
    and study UID erased from the outbox: the sent-study record is what is left)."""
    (study,) = [
        s for s in send_ecgs(config, [make_recording(number, patient=patient)]) if s.patient_id == patient.patient_id
    ]
    with open_outbox(config) as outbox:
        assert outbox.purge_due(time.time() + 1, 0.0) == 1
    assert study.outbox_item_id == 1  # a new outbox's first item: the same id each time


def journeys(page: str) -> list[str]:
    section = page.split('id="h-studies"', 1)[1].split("</section>", 1)[0]
    return section.split('<li class="card journey')[1:]


def test_after_the_outbox_is_made_anew_a_sent_ecg_shows_its_own_patient(
    tmp_path: Path, center: EmbeddedReadingCenter
) -> None:
    """sent_studies is found by outbox item id. A new outbox (the old one damaged and set aside)
    numbers its items from 1 again: 李伟's purged ECG was shown with 张三's record of item 1 -
    another patient, and the cardiologist's report on 张三's ECG linked from 李伟's."""
    config = clinic_config(tmp_path, center)
    send_and_purge(config, 5, Patient(VALID_ID, "Zhang^San=张^三"))
    with ReportStore.open(config.data_dir) as store:
        (old,) = store.studies()
        center.add_report(ecg_report_sr(to_read(old), findings=[], impression="窦性心律"))
        assert poller_for(config, store).run_round(force=True).stored == 1
        (report,) = store.reports()
    set_aside_outbox(config)
    send_and_purge(config, 6, Patient(OTHER_ID, "Li^Wei=李^伟"))
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        (journey,) = journeys(client.get("/sent").body)
    assert "李伟" in journey and OTHER_ID in journey, journey
    assert "张三" not in journey and VALID_ID not in journey, journey
    assert f'href="/reports/{report.id}"' not in journey, journey
