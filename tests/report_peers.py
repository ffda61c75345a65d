"""Plumbing for the report tests: a gateway configuration, ECGs really forwarded to a reading
center (so the sent-study records come from the forwarder's own events), and a poller on them."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom.uid import generate_uid

from devices.ecg.recording import EcgRecording
from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.demo.cardiologist import StudyToRead, part10
from lastmile.ecg.intake import enqueue_recording
from lastmile.reports.poller import ReportPoller
from lastmile.reports.sent import SentStudyRecorder
from lastmile.reports.service import make_poller
from lastmile.reports.store import ReportStore, SentStudy
from lastmile.services.forward import forwarder_settings, peer_settings
from tests.peers import free_port
from uploader.ecg_forwarder import EcgForwarder
from uploader.report_reading import CriticalRules, read_dicom_report

GATEWAY_AE = "CLINIC01"
MOVE_AE = "CLINIC01R"

NOW = 1_800_000_000.0  # the report tests' clock (epoch seconds)
RULES = CriticalRules.parse(["SCT:401303003"], ["危急值"])


def gateway_config(tmp_path: Path, port: int, called_ae: str, *, listen_port: int | None = None) -> Config:
    c = Config()
    c.set_data_dir(tmp_path / "data")
    rc = c.reading_center
    rc.host, rc.port, rc.called_ae, rc.calling_ae = "127.0.0.1", port, called_ae, GATEWAY_AE
    rc.listen_port, rc.listen_host = listen_port or free_port(), "127.0.0.1"
    rc.associations, rc.batch_size, rc.timeout_s, rc.commitment_timeout_s = 1, 10, 10.0, 10.0
    c.outbox.backoff_base_s, c.outbox.backoff_max_s, c.outbox.min_free_mb = 0.1, 0.5, 1
    c.reports.move_host = "127.0.0.1"
    c.reports.backoff_base_s, c.reports.backoff_max_s = 5.0, 20.0
    c.ecg.re_record_hold_s = 0  # synthetic 2 s ECGs are re-record cases: reports are the subject here
    return c


def send_ecgs(config: Config, recordings: Sequence[EcgRecording], limit_s: float = 60.0) -> list[SentStudy]:
    """Forward `recordings` for real until each is committed; returns their sent-study records
    (oldest first), written by the recorder from the forwarder's events."""
    stop = threading.Event()
    with open_outbox(config) as outbox, ReportStore.open(config.data_dir) as store:
        recorder = SentStudyRecorder(outbox, store)
        for i, rec in enumerate(recordings):
            enqueue_recording(outbox, rec, config, key=f"ecg-{time.monotonic_ns()}-{i}")
        deadline = time.monotonic() + limit_s
        with EcgForwarder(outbox, forwarder_settings(config), on_event=recorder.on_event) as fwd:
            while True:
                counts = outbox.stats(time.time())["counts"]
                if counts.get("queued", 0) + counts.get("sending", 0) + counts.get("sent", 0) == 0:
                    break
                assert time.monotonic() < deadline, f"forwarding made no progress: {counts}"
                time.sleep(min(fwd.step(stop), 0.1))
        assert recorder.drain() >= 0
        return sorted(store.studies(), key=lambda s: s.sent_at)


def write_config(config: Config, path: Path) -> Path:
    """The parts of `config` the report commands need, as a TOML file (for `lastmile -c`)."""
    rc, r = config.reading_center, config.reports
    path.write_text(f"""
[gateway]
data_dir = "{config.data_dir}"
[reading_center]
host = "{rc.host}"
port = {rc.port}
called_ae = "{rc.called_ae}"
calling_ae = "{rc.calling_ae}"
timeout_s = {rc.timeout_s}
[reports]
move_ae = "{r.move_ae}"
move_port = {r.move_port}
move_host = "{r.move_host}"
critical_command = {json.dumps(r.critical_command)}
[ecg]
re_record_hold_s = {config.ecg.re_record_hold_s}
""")
    return path


def poller_for(config: Config, store: ReportStore) -> ReportPoller:
    return make_poller(config, store, peer_settings(config.reading_center))


def to_read(study: SentStudy) -> StudyToRead:
    """What the reading center knows of a study we sent (for building its reports)."""
    return StudyToRead(study.study_uid, patient_id=study.patient_id, patient_name=study.patient_name)


def critical_observation(obs_id: str, name: str, value: str) -> dict:
    """A contained FHIR Observation interpreted AA (critical abnormal), as a report's result."""
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "final",
        "code": {"text": name},
        "valueString": value,
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "AA",
                        "display": "Critical abnormal",
                    }
                ]
            }
        ],
    }


# -- a store filled by hand (no forwarder): a study sent, a report read into it --


def utc(ts: float = NOW) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def sent(store: ReportStore, *, patient: str = "P1", stat: bool = False, at: float = NOW) -> StudyToRead:
    uid = generate_uid()
    assert store.record_sent(
        SentStudy(
            uid, utc(at), stat=stat, patient_id=patient, patient_name="Wang^Fang", ecg_time="2026-11-02T09:30:00+08:00"
        )
    )
    return StudyToRead(uid, patient_id=patient, patient_name="Wang^Fang")


def add(store: ReportStore, ds, at: float = NOW):
    data = part10(ds)
    return store.add_report(read_dicom_report(data, RULES), data, "dicom", utc(at))
