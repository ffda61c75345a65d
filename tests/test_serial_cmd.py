"""`lastmile serial` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lastmile.cli import main
from tests.test_ascii_report import VITALS_REPORT


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "lastmile.toml"
    path.write_text(f"""
[gateway]
data_dir = "{tmp_path / "data"}"
[serial]
patient_card_pattern = '(?P<id>\\d{{20}})'
doctor_badge_pattern = 'DR-(?P<id>\\d{{6}})'
[[serial.devices]]
name = "ward-monitor"
match = "0403:6001:A50285BI"
profile = "example-vitals-monitor"
""")
    return path


def test_profile_test_and_profiles(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.txt"
    report.write_bytes(VITALS_REPORT)
    assert main(["-c", str(config_file), "serial", "profile-test", "example-vitals-monitor", str(report)]) == 0
    out = capsys.readouterr().out
    assert '"code": "systolic"' in out and "1 report(s) parsed, 0 rejected" in out
    report.write_bytes(VITALS_REPORT[:-20])
    assert main(["-c", str(config_file), "serial", "profile-test", "example-vitals-monitor", str(report)]) == 1
    assert "rejected" in capsys.readouterr().out
    assert main(["-c", str(config_file), "serial", "profiles"]) == 0
    assert "example-vitals-monitor" in capsys.readouterr().out


def test_scan_test_and_list(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(config_file), "serial", "scan-test", "80276001234567890123", "DR-004711"]) == 0
    assert capsys.readouterr().out.splitlines() == ["patient 80276001234567890123", "doctor 004711"]
    assert main(["-c", str(config_file), "serial", "scan-test", "hello"]) == 1
    assert main(["-c", str(config_file), "serial", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out.split("not recognised: matches no rule\n")[-1])
    assert listing["configured_but_absent"] == [
        {"name": "ward-monitor", "match": "0403:6001:A50285BI", "profile": "example-vitals-monitor"}
    ]
