"""`lastmile serial` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lastmile.cli import main
from tests.service_harness import VITALS_REPORT


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


def test_list_and_profiles_name_a_bad_profile_file_and_go_on(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A technician drops a profile with a typo into serial.profiles_dir: `lastmile serial
    profiles` and `serial list` refused to show anything at all (the very tools to find it);
    they list what loads and name the bad file and line."""
    from tests.serial_gateway import ward_profile_with_bad_baudrate

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    line = ward_profile_with_bad_baudrate(profiles)
    bad = f"ward-monitor.toml:{line}: 'profile.baudrate' out of range"
    config_file.write_text(
        config_file.read_text().replace("[serial]\n", f'[serial]\nprofiles_dir = "{profiles}"\n', 1)
        + '\n[[serial.devices]]\nname = "ward"\nmatch = "0403:6001:WARD0001"\nprofile = "ward-monitor"\n'
    )
    assert main(["-c", str(config_file), "serial", "profiles"]) == 1  # something to fix
    out = capsys.readouterr().out
    assert "example-vitals-monitor:" in out and bad in out, out
    report = tmp_path / "report.txt"
    report.write_bytes(VITALS_REPORT)
    assert main(["-c", str(config_file), "serial", "profile-test", "example-vitals-monitor", str(report)]) == 0
    assert "1 report(s) parsed, 0 rejected" in capsys.readouterr().out
    assert main(["-c", str(config_file), "serial", "profile-test", "ward-monitor", str(report)]) == 1
    assert bad in capsys.readouterr().out
    assert main(["-c", str(config_file), "serial", "list"]) == 0
    out = capsys.readouterr().out
    assert "absent: ward-monitor (example-vitals-monitor)" in out and "refused: ward: " in out and bad in out, out
    assert main(["-c", str(config_file), "serial", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listing["configured_but_absent"]] == ["ward-monitor"]
    [refused] = listing["refused"]
    assert refused["name"] == "ward" and bad in refused["reason"], refused
