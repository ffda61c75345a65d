"""A gateway for the metrics tests: a configuration, ECGs queued through the real intake, the
exposition read back with prometheus_client's own parser, and the report store's schema (issue 14)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import subprocess
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from lastmile.config import Config, load_config
from lastmile.demo.loopback import free_port
from tests.fhir_samples import queue_visits
from tests.fhir_server import FhirTestServer
from uploader.fhir_forwarder import forward_fhir_once
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.outbox import Outbox

VALID_ID = "11010519491231002X"  # GB 11643's own example

Sample = tuple[str, dict[str, str], float]


def write_config(tmp_path: Path, *, reading_center_port: int = 104, metrics_port: int | None = None) -> Path:
    """A configuration file for a gateway living in tmp_path (data in tmp_path/data)."""
    path = tmp_path / "lastmile.toml"
    path.write_text(
        f"""
[gateway]
id = "clinic-xiaohe-01"
data_dir = "{tmp_path / "data"}"

[reading_center]
host = "127.0.0.1"
port = {reading_center_port}
called_ae = "SCRIPTED"
calling_ae = "CLINIC01"
storage_commitment = false

[outbox]
config_fault_retry_s = 600.0

[metrics]
listen = "127.0.0.1:{metrics_port or free_port()}"
""",
        encoding="utf-8",
    )
    return path


def queue_ecgs(config: Config, good: int, lead_off: int = 0) -> list[dict]:
    """ECGs for VALID_ID through the real intake (quality gate included); `lead_off` of them with
    V3 off (a "re-record" verdict: held for the doctor). Returns each item's meta."""
    import numpy as np

    from devices.identity import Patient
    from lastmile.data_dir import open_outbox
    from lastmile.demo.runner import source_ecg
    from lastmile.ecg.intake import enqueue_recording
    from tests.ecg_faults import electrode_off

    base = dataclasses.replace(
        source_ecg(), patient=Patient(VALID_ID, "Zhang^San"), acquired_at=dt.datetime.now(dt.timezone.utc)
    )
    metas = []
    with open_outbox(config) as outbox:
        for i in range(good + lead_off):
            rec = base
            if i >= good:
                rec, _fault = electrode_off(base, np.random.default_rng(i), "V3", "blank")
            metas.append(enqueue_recording(outbox, rec, config, key=f"metrics-test-ecg-{i}").item.meta)
    return metas


def config_at(path: Path) -> Config:
    return load_config(path)


def parse_exposition(text: str) -> list[Sample]:
    """Every sample of a scrape, as Prometheus' text format defines it (prometheus_client's parser)."""
    return [
        (s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text) for s in family.samples
    ]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == want for k, want in labels.items())]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return response.read()


# SEAM(issue 14): the report store's tables as branch `reports` creates them in clinic.db
# (lastmile/clinic/db.py migration 0004_reports). Once issue 14 is merged, tests should make them
# through `lastmile.reports.store.ReportStore` instead.
REPORT_STORE_DDL = """
CREATE TABLE sent_studies (
    study_uid TEXT PRIMARY KEY, outbox_item_id INTEGER, sop_instance_uid TEXT, accession TEXT,
    patient_id TEXT, patient_name TEXT, ecg_time TEXT, description TEXT, stat INTEGER NOT NULL DEFAULT 0,
    sent_at TEXT NOT NULL, committed_at TEXT, final_at TEXT, last_polled_at TEXT, polls INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE reports (
    id INTEGER PRIMARY KEY, study_uid TEXT NOT NULL REFERENCES sent_studies(study_uid), source TEXT NOT NULL,
    kind TEXT NOT NULL, object_uid TEXT NOT NULL, version TEXT NOT NULL DEFAULT '', sop_class_uid TEXT,
    status TEXT NOT NULL, superseded_by INTEGER, title TEXT, text TEXT, observer TEXT, report_time TEXT,
    patient_id TEXT, patient_name TEXT, critical TEXT, problems TEXT, document_type TEXT, alerted_at TEXT,
    acknowledged_at TEXT, acknowledged_by TEXT, received_at TEXT NOT NULL, data BLOB NOT NULL
);
CREATE TABLE report_status (name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TEXT);
"""


def make_report_store(data_dir: Path) -> sqlite3.Connection:
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(data_dir / "clinic.db", isolation_level=None)
    conn.executescript(REPORT_STORE_DDL)
    return conn


# What the collector is given instead of the clock and the system tools (chronyc, ...).
NOW = 1_796_000_000.0


def tool(answers: dict[str, subprocess.CompletedProcess[str] | None]):  # -> Runner
    """A stand-in for the system tools: `answers[cmd[0]]`, None (not installed) otherwise."""

    def run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
        return answers.get(cmd[0])

    return run


# -- the county platform's link: real FHIR forwarder rounds against a real FHIR test server ---------


@contextmanager
def forwarding(config: Config, base_url: str) -> Iterator[tuple[Outbox, FhirSender]]:
    """The gateway's outbox and a FHIR sender to `base_url`, for the forwarder's rounds."""
    settings = FhirSenderSettings(base_url=base_url, connect_timeout_s=2.0)
    with FhirSender(settings) as sender, Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
        yield outbox, sender


def busy_after_taking_two(config: Config, t0: float, busy_after_s: Sequence[float]) -> None:
    """The platform takes two visit records at `t0`, then answers a third 429 (busy, Retry-After)
    at each round `busy_after_s` later."""
    with FhirTestServer() as server, forwarding(config, server.base_url) as (outbox, sender):
        queue_visits(outbox, range(2))
        assert forward_fhir_once(outbox, sender, t0).sent == 2
        queue_visits(outbox, range(2, 3))
        for after_s in busy_after_s:
            server.faults.append("429")
            assert forward_fhir_once(outbox, sender, t0 + after_s).transient == 1


def not_answering_after_taking_one(config: Config, t0: float) -> None:
    """The platform takes a visit record at `t0`, then nothing listens at its address a second on."""
    with FhirTestServer() as server, forwarding(config, server.base_url) as (outbox, sender):
        queue_visits(outbox, range(1))
        assert forward_fhir_once(outbox, sender, t0).sent == 1
    with forwarding(config, f"http://127.0.0.1:{free_port()}/fhir") as (outbox, sender):
        queue_visits(outbox, range(1, 2))
        assert forward_fhir_once(outbox, sender, t0 + 1).transient == 1
