"""`lastmile doctor` on a gateway whose clinic uses Bluetooth LE devices (paired with `lastmile ble
pair`) but which has no Bluetooth radio (a Pi without one, a USB dongle left out, the adapter
disabled by rfkill at the kernel): the BLE service stays up and says so only in its status, so
the doctor must say it, with what to do, not "all good"."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

import lastmile.doctor_ble
from lastmile.clinic.devices import DeviceRegistry
from lastmile.doctor import Level, render_text
from tests.service_harness import doctor, levels

NOW = dt.datetime(2026, 12, 6, 9, 0, tzinfo=dt.timezone.utc)


def pair_a_cuff(data_dir: Path) -> None:
    registry = DeviceRegistry.open(data_dir)
    try:
        registry.allow("C0:FF:EE:00:00:01", now=NOW, name="BP cuff")
    finally:
        registry.close()


@pytest.fixture
def radios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The kernel's Bluetooth class directory (/sys/class/bluetooth): empty, no adapter."""
    found = tmp_path / "sys-class-bluetooth"
    found.mkdir()
    monkeypatch.setattr(lastmile.doctor_ble, "BLUETOOTH_CLASS", found)
    return found


def test_paired_ble_devices_and_no_radio_is_a_warning_with_advice(tmp_path: Path, radios: Path) -> None:
    pair_a_cuff(tmp_path)
    findings = doctor(tmp_path).run_all()
    assert levels(findings, "bluetooth") == [Level.WARN], render_text(findings)
    (warning,) = [f for f in findings if f.check == "bluetooth"]
    assert "no Bluetooth adapter" in warning.message and "1 paired" in warning.message
    assert "adapter" in warning.hint and "lastmile ble" in warning.hint


def test_a_radio_or_no_ble_use_is_ok(tmp_path: Path, radios: Path) -> None:
    d = doctor(tmp_path)
    assert levels(d.run_all(), "bluetooth") == [Level.OK]  # nothing paired: no radio needed
    pair_a_cuff(tmp_path)
    (radios / "hci0").mkdir()
    assert levels(d.run_all(), "bluetooth") == [Level.OK]
    (radios / "hci0").rmdir()
    off = doctor(tmp_path, toml="[ble]\nenabled = false\n")  # BLE switched off on purpose
    assert levels(off.run_all(), "bluetooth") == [Level.OK]


def test_an_adapter_blocked_by_rfkill_is_no_radio(tmp_path: Path, radios: Path) -> None:
    pair_a_cuff(tmp_path)
    switch = radios / "hci0" / "rfkill0"
    switch.mkdir(parents=True)
    (switch / "soft").write_text("1\n")
    (switch / "hard").write_text("0\n")
    (warning,) = [f for f in doctor(tmp_path).run_all() if f.check == "bluetooth"]
    assert warning.level is Level.WARN and "hci0 blocked by rfkill" in warning.message
    (switch / "soft").write_text("0\n")
    assert levels(doctor(tmp_path).run_all(), "bluetooth") == [Level.OK]


def test_one_doctor_run_opens_clinic_db_for_its_devices_once(
    tmp_path: Path, radios: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The devices and bluetooth checks both look at clinic.db's devices: one read per run (the
    console runs the doctor every minute), and a later run sees what changed since."""
    opened: list[Path] = []
    real_open = DeviceRegistry.open

    def counted_open(cls: type[DeviceRegistry], data_dir: Path, *args: object, **kw: object) -> DeviceRegistry:
        opened.append(data_dir)
        return real_open(data_dir, *args, **kw)  # type: ignore[arg-type]

    d = doctor(tmp_path)
    pair_a_cuff(tmp_path)
    monkeypatch.setattr(DeviceRegistry, "open", classmethod(counted_open))
    findings = d.run_all()
    assert levels(findings, "bluetooth") == [Level.WARN] and levels(findings, "devices") == [Level.OK]
    assert len(opened) == 1, opened
    (radios / "hci0").mkdir()
    assert levels(d.run_all(), "bluetooth") == [Level.OK] and len(opened) == 2
