"""A gateway for the metrics tests: a configuration, ECGs queued through the real intake, the
exposition read back with prometheus_client's own parser, and the report store's schema (issue 14)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from lastmile.config import Config, load_config
from lastmile.demo.loopback import free_port

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
