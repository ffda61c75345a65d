"""A peer's error text may name the patient: masked in logs, stored reasons and `lastmile queue`,
its meaning kept (issue 10, item 4). Real peers: the loopback FHIR receiver and a pynetdicom SCP."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from devices.identity import Patient
from lastmile.cli import main as cli
from lastmile.config import Config, parse_config
from lastmile.data_dir import open_outbox
from lastmile.demo.fhir_receiver import FhirReceiver
from lastmile.ecg.intake import enqueue_recording
from lastmile.services.forward import ForwardService
from tests.ecg_factories import make_recording
from tests.fhir_samples import NAMING, T0, all_kinds, signature, visit
from tests.peers import free_port
from uploader.dicom_association import ECG_STORAGE_CLASSES, stop_server
from uploader.fhir_bundle import visit_bundle
from uploader.fhir_forwarder import enqueue_bundle, forward_fhir_once
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.masking import mask_server_text

PATIENT_ID = "P-778899"
NAME = "Zhang^San"


def test_known_values_and_patient_shapes_are_masked_meaning_kept() -> None:
    text = (
        "Patient P-778899 (Zhang San, birthDate: 1950-03-07) already registered as Patient/4711; "
        "Encounter.subject references urn:lastmile:patient-id|P-778899; PatientName=Li^Si"
    )
    masked = mask_server_text(text, [PATIENT_ID, "Zhang San", "1950-03-07"])
    for secret in (PATIENT_ID, "Zhang", "1950-03-07", "4711", "Li^Si"):
        assert secret not in masked
    assert masked.startswith("Patient <patient> (<patient>, birthDate: <patient>) already registered")
    assert "Encounter.subject references" in masked


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "lastmile.toml"
    # the synthetic ECG is a re-record case: not held, so the forwarder meets the commenting SCP
    path.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 0\n[ecg]\nre_record_hold_s = 0\n{extra}'
    )
    return path


def test_fhir_outcome_naming_the_patient_is_masked_in_logs_storage_and_queue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse_naming_the_patient(bundle: dict) -> None:
        raise ValueError(
            f"Patient with identifier {PATIENT_ID} is already registered under another name;"
            f" {PATIENT_ID} must be merged first"
        )

    config_file = _config(tmp_path)
    config = parse_config(config_file.read_text(), str(config_file))
    bundle = visit_bundle(visit(1, patient=PATIENT_ID), all_kinds(T0, PATIENT_ID), NAMING, signature(1))
    with open_outbox(config) as outbox:
        enqueue_bundle(outbox, bundle, "visit-1", patient_id=PATIENT_ID)
        with (
            FhirReceiver(validator=refuse_naming_the_patient) as server,
            FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender,
            caplog.at_level(logging.INFO),
        ):
            result = forward_fhir_once(outbox, sender, time.time())
        assert result.quarantined == 1
        item = outbox.find("visit-1")
    assert item is not None and item.quarantine_reason
    assert PATIENT_ID not in item.quarantine_reason and PATIENT_ID not in (item.last_error or "")
    assert "(400)" in item.quarantine_reason and "is already registered under another name" in item.quarantine_reason
    assert "quarantined" in caplog.text and PATIENT_ID not in caplog.text
    assert cli(["-c", str(config_file), "queue"]) == 0
    out = capsys.readouterr().out
    assert "quarantined #" in out and "must be merged first" in out and PATIENT_ID not in out


class CommentingSCP:
    """A storage SCP that refuses every C-STORE with 0xC000 and an ErrorComment naming the patient."""

    def __init__(self) -> None:
        self.port = free_port()
        ae = AE(ae_title="READING_CENTER")
        for uid in ECG_STORAGE_CLASSES:
            ae.add_supported_context(uid)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: evt.Event) -> Dataset:
        ds = event.dataset
        status = Dataset()
        status.Status = 0xC000
        status.ErrorComment = f"{ds.PatientName} {ds.PatientID} b. {ds.PatientBirthDate}: duplicate study"[:64]
        return status


@pytest.fixture
def commenting_scp() -> Iterator[CommentingSCP]:
    scp = CommentingSCP()
    yield scp
    stop_server(scp.server)


def test_dicom_error_comment_naming_the_patient_is_masked(
    tmp_path: Path, commenting_scp: CommentingSCP, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = _config(tmp_path, f"[reading_center]\nport = {commenting_scp.port}\nstorage_commitment = false\n")
    config: Config = parse_config(config_file.read_text(), str(config_file))
    recording = make_recording(1, patient=Patient(PATIENT_ID, NAME, dt.date(1950, 3, 7), "M"))
    with open_outbox(config) as outbox:
        enqueue_recording(outbox, recording, config, key="ecg-1")
    service = ForwardService(config)
    try:
        with caplog.at_level(logging.INFO):
            service.step(threading.Event())
    finally:
        service.close()
    with open_outbox(config) as outbox:
        item = outbox.find("ecg-1")
    assert item is not None and item.state.value == "quarantined", item
    reason = item.quarantine_reason or ""
    assert "0xC000" in reason and "duplicate study" in reason  # the meaning stays
    for secret in (PATIENT_ID, "Zhang", "19500307"):
        assert secret not in reason and secret not in caplog.text
    assert cli(["-c", str(config_file), "queue"]) == 0
    out = capsys.readouterr().out
    assert "duplicate study" in out and PATIENT_ID not in out and "Zhang" not in out
