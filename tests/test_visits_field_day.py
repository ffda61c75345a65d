"""The scripted field day: 12 visits along a replayed GPS track, link down all day, then the sync."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

from devices.identity import EARLIEST_PLAUSIBLE, TimeSource
from lastmile.demo.field_day import run_field_day
from lastmile.visits.book import VisitBook
from lastmile.visits.chain import verify_export
from tests.fhir_server import FhirTestServer


def test_field_day_every_visit_arrives_exactly_once(tmp_path: Path) -> None:
    servers: list[FhirTestServer] = []

    def validating_server() -> FhirTestServer:
        servers.append(FhirTestServer())  # every resource validated with fhir.resources
        return servers[-1]

    result = run_field_day(
        tmp_path, visits=12, far_visit=7, receiver_factory=validating_server, gps_day=dt.date(2026, 3, 2)
    )
    assert result["link_down_attempts"] >= 12  # the link was down: tried, nothing lost
    assert result["visits_synced"] == 12 and result["encounters_on_server"] == 12  # exactly once
    assert result["bundles_committed"] == 12
    assert result["observations_synced"] == 12 * 2 + 6  # BP panel + its pulse each, 6 temperatures
    assert result["chain_verified"]
    # The visit made 2 km from its household is flagged; the others are clean.
    far_id = result["visit_ids"][6]
    assert result["flags"] == {far_id: ["outside-radius"]}
    (server,) = servers
    far = next(r for r in server.resources("Encounter") if r["identifier"][0]["value"] == far_id)
    assert "outside-radius" in {t["code"] for t in far["meta"]["tag"]}

    # The gateway booted in 1970: GPS gave every record its time, none before 2020.
    with VisitBook.open(result["data_dir"], gateway_id="demo-gateway") as book:
        visits = book.visits()
        assert len(visits) == 12
        for v in visits:
            assert v.start.source == TimeSource.GPS and v.start.time and v.start.time >= EARLIEST_PLAUSIBLE
            assert v.end and v.end.time and v.end.time > v.start.time
        export = tmp_path / "chain.jsonl"
        book.export_chain(export)
    assert verify_export(export).ok
    # Someone edits a stored visit afterwards: verification fails and names it.
    conn = sqlite3.connect(Path(result["data_dir"]) / "visits.db")
    with conn:
        conn.execute("UPDATE visits SET household_id = 'HH-012', flags = '[]' WHERE id = ?", [far_id])
    conn.close()
    with VisitBook.open(result["data_dir"], gateway_id="demo-gateway") as book:
        book.export_chain(export)
    report = verify_export(export)
    assert not report.ok
    assert any(far_id in p and "edited after capture" in p for p in report.problems)
