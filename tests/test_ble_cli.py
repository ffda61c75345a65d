"""`lastmile ble decode | pair | unpair | scan`, `lastmile devices`, `lastmile patient ...`."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
from pathlib import Path

import pytest

from devices.identity import DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity
from lastmile.cli import main
from lastmile.clinic.observations import ObservationStore
from tests.conftest import missing
from uploader.outbox import Outbox

BP_HEX = "1e 7800 5000 5d00 e807030509 1e0f 4800 01 0400"  # see tests/test_ble_decoders.py


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_decode_human_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ble", "decode", "0x2A35", *BP_HEX.split())
    assert code == 0
    assert "Blood Pressure Measurement (0x2A35), 19 bytes" in out and "systolic: 120 mm[Hg]" in out
    assert "irregular-pulse" in out and "device time: 2024-03-05T09:30:15" in out
    code, out, _ = run(capsys, "ble", "decode", "2a35", BP_HEX.replace(" ", ""), "--json")
    doc = json.loads(out)
    assert doc["characteristic"] == "0x2A35" and doc["value"]["quantities"][0]["value"] == 120.0
    code, out, _ = run(capsys, "ble", "decode", "2a35", "01a0f06bf07cf0")
    assert "systolic: 120 mm[Hg]  (sent 16 kPa)" in out


def test_decode_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "ble", "decode", "2a35", "1e78")
    assert code == 1 and "ProtocolError" in err and "Systolic" in err
    code, _, err = run(capsys, "ble", "decode", "2a35", "zz")
    assert code == 2 and "not hex" in err
    code, _, err = run(capsys, "ble", "decode", "12345", "00")
    assert code == 1 and "not a 16-bit" in err
    code, _, err = run(capsys, "ble", "decode", "2a99", "00")
    assert code == 1 and "no decoder" in err


def test_pair_devices_unpair(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = str(tmp_path)
    assert run(capsys, "ble", "pair", "c0:ff:ee:00:00:01", "--name", "cuff room 2", "--data-dir", d)[0] == 0
    assert run(capsys, "ble", "pair", "not-an-address", "--data-dir", d)[0] == 2
    _code, out, _ = run(capsys, "devices", "--json", "--data-dir", d)
    (dev,) = json.loads(out)
    assert (dev["address"], dev["name"], dev["allowed"], dev["connected"]) == (
        "C0:FF:EE:00:00:01",
        "cuff room 2",
        True,
        False,
    )
    _code, out, _ = run(capsys, "devices", "--data-dir", d)
    assert "C0:FF:EE:00:00:01  not connected" in out
    assert run(capsys, "ble", "unpair", "C0:FF:EE:00:00:01", "--data-dir", d)[0] == 0
    assert run(capsys, "ble", "unpair", "C0:FF:EE:00:00:01", "--data-dir", d)[0] == 1


def test_scan_emulated(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if importlib.util.find_spec("bumble") is None:
        missing("bumble (the emulation extra) is not installed")
    run(capsys, "ble", "pair", "C0:FF:EE:00:00:01", "--data-dir", str(tmp_path))
    _code, out, _ = run(capsys, "ble", "scan", "--emulated", "--timeout", "1.5", "--json", "--data-dir", str(tmp_path))
    found = {r["address"]: r for r in json.loads(out)}
    assert found["C0:FF:EE:00:00:01"]["services"] == ["Blood Pressure"] and found["C0:FF:EE:00:00:01"]["paired"]
    assert found["C0:FF:EE:00:00:02"]["services"] == ["Health Thermometer"]


def test_patient_set_show_assign_clear(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = str(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        store = ObservationStore.open(tmp_path, outbox=outbox, idle_timeout_s=900)
        held = store.record(
            Observation(
                "body-temperature",
                (Quantity("body-temperature", 37.5, "Cel", 37.5, "Cel"),),
                now,
                TimeSource.DEVICE_CLOCK,
                now,
                DeviceIdentity("Acme", "TH-1", "7", "C0:FF:EE:00:00:02"),
                "test:th:1",
            ),
            now=now,
        )
        store.close()
    assert held.outcome == "held"
    code, out, _ = run(capsys, "patient", "show", "--data-dir", d)
    assert "no current patient" in out and f"#{held.held_id}" in out and "body-temperature 37.5 Cel" in out
    assert run(capsys, "patient", "set", "P-5", "--name", "Doe^John", "--data-dir", d)[0] == 0
    code, out, _ = run(capsys, "patient", "show", "--json", "--data-dir", d)
    doc = json.loads(out)
    assert doc["current_patient"]["patient_id"] == "P-5" and doc["unassigned"][0]["id"] == held.held_id
    code, out, _ = run(capsys, "patient", "assign", str(held.held_id), "P-4", "--data-dir", d)
    assert code == 0 and "assigned to P-4" in out
    assert run(capsys, "patient", "assign", str(held.held_id), "P-4", "--data-dir", d)[0] == 1
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        (item,) = outbox.items(kind="observation")
        assert item.patient["patient_id"] == "P-4"
    assert "patient session ended" in run(capsys, "patient", "clear", "--data-dir", d)[1]
    assert "no current patient" in run(capsys, "patient", "show", "--data-dir", d)[1]
