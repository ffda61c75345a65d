"""`lastmile gps decode` and `lastmile visit ...` end to end through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lastmile.cli import main
from tests.conftest import shared_file


def test_gps_decode_prints_one_fix_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    log = shared_file("gps", "beidou-gb.log")
    assert main(["gps", "decode", str(log)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("2015-03-02T05:32:33.438000Z  31.2480350  121.5873800")
    assert "mode 3" in lines[1] and "hdop 1.20" in lines[1] and "eph 25.6 m" in lines[1]
    assert main(["gps", "decode", "--json", str(log)]) == 0
    fix = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert {k: fix[k] for k in ("mode", "hdop", "eph_m")} == {"mode": 3, "hdop": 1.2, "eph_m": 25.61}
    assert fix["latitude"] == pytest.approx(31.248035) and fix["altitude_m"] == 167.2


def test_visit_commands_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    register = tmp_path / "households.csv"
    register.write_text("household_id,latitude,longitude\nHH-1,31.2,121.5\n")
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\nid = "gw-cli"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[visits]\ndoctor_id = "DR-9"\nhousehold_register = "{register}"\n'
        '[gps]\nsource = "none"\n'
    )
    run = lambda *a: main(["-c", str(config), *a])
    assert run("visit", "stop") == 1  # nothing open
    assert run("visit", "start", "--patient", "P-1", "--household", "HH-1") == 0
    assert run("visit", "start", "--patient", "P-2") == 1  # one at a time
    assert run("visit", "note", "BP taken, patient well") == 0
    assert run("visit", "stop") == 0
    out = capsys.readouterr().out
    assert "queued for the county platform" in out and "flags: no-fix" in out
    assert run("visit", "list", "--json") == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["patient_id"] == "P-1" and listed["fhir_queued"] and listed["chain_seq"] == 1
    export = tmp_path / "chain.jsonl"
    assert run("visit", "export", str(export)) == 0
    assert run("visit", "verify", str(export)) == 0
    assert "OK: 1 records" in capsys.readouterr().out
    export.write_text(export.read_text().replace('"P-1"', '"P-7"'))
    assert run("visit", "verify", "--json", str(export)) == 1
    assert "edited after capture" in capsys.readouterr().out


def test_a_stop_that_died_before_queueing_is_queued_by_the_next_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by bench/kill_campaign.py: `visit stop` killed after closing the visit and before
    queueing it left the visit closed and unqueued, and the doctor's second stop ("no visit is
    open") returned without queueing it: the county never got it."""
    from lastmile.visits.book import VisitBook, VisitPolicy
    from uploader.outbox import Outbox

    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\nid = "gw-cli"\ndata_dir = "{tmp_path / "data"}"\n[visits]\ndoctor_id = "DR-9"\n[gps]\nsource = "none"\n'
    )
    run = lambda *a: main(["-c", str(config), *a])
    assert run("visit", "start", "--patient", "P-1") == 0
    with VisitBook.open(tmp_path / "data", gateway_id="gw-cli", policy=VisitPolicy()) as book:
        book.stop(None)  # what the killed stop got done: closed and signed, not queued
    capsys.readouterr()
    assert run("visit", "stop") == 1  # nothing open any more ...
    assert "1 visit(s) queued" in capsys.readouterr().out  # ... and the closed visit is queued
    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    try:
        assert [i.key.split(":")[1] for i in outbox.items(kind="fhir-bundle")] == ["visit"]
    finally:
        outbox.close()
