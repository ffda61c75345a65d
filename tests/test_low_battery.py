"""A BP cuff's low battery said before it dies mid-measurement: its row held 15% (read at connect,
LOW_BATTERY_PERCENT written at once), yet the Devices page said "Battery: 15%" like any level, Today
said nothing and `lastmile doctor` was all good - the village doctor learned the cuff was flat
when it died with a patient in front of him. Now a level at or under LOW_BATTERY_PERCENT is said
plainly, with what to do and when it was read, on the Devices card, on Today's device list and as
a doctor WARN; a level not read lately is said as the last one read, never as now's."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from devices.ble.battery import LOW_BATTERY_PERCENT
from lastmile.clinic.devices import DeviceRegistry
from lastmile.doctor import Level, render_text
from tests.console_harness import DOCTOR, Client, console_config, running_console
from tests.service_harness import doctor

UTC = dt.timezone.utc
CUFF = "C0:00:00:00:00:01"
WARNING = "电量低（{level}%，{{time}} 读取）：请尽快更换电池或充电"
STALE_WARNING = "电量低（{level}%，上次读取 {{time}}）：请尽快更换电池或充电"


def cuff_reported(data: Path, level: int, *, ago: dt.timedelta = dt.timedelta(0), connected: bool = False) -> None:
    """The paired cuff's row: `level` percent read `ago`, connected or not since."""
    data.mkdir(parents=True, exist_ok=True)
    registry = DeviceRegistry.open(data)
    try:
        now = dt.datetime.now(UTC)
        registry.allow(CUFF, now=now - ago, name="血压计")
        registry.update_status(CUFF, now=now - ago, connected=True, battery_level=level)
        registry.update_status(CUFF, now=now - ago, connected=connected)
    finally:
        registry.close()


def said(html: str) -> str:
    """What a piece of page says, its <time> tags as {time}, other tags dropped."""
    return re.sub(r"<[^>]+>", "", re.sub(r"<time [^>]*>[^<]*</time>", "{time}", html)).strip()


def pages(data: Path) -> tuple[str, str]:
    """The cuff's card on the Devices page and Today's device list, as a doctor reads them (zh-CN)."""
    with running_console(console_config(data)) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        devices, today = client.get("/devices").body, client.get("/today").body
    card = devices.split(f'data-address="{CUFF}"', 1)[1].split("</li>", 1)[0]
    listed = today.split('<ul class="devices">', 1)[1].split("</ul>", 1)[0]
    return card, listed


def battery_line(card: str) -> str:
    """The card's line that says its battery (its paragraphs' words, one a line)."""
    lines = [said(p) for p in re.findall(r"<p[ >].*?</p>", card, re.S)]
    return next((line for line in lines if line.startswith("电量")), "")


@pytest.mark.parametrize("level", [15, LOW_BATTERY_PERCENT])
def test_a_cuff_at_or_under_the_low_threshold_is_said_low_on_devices_and_today(tmp_path: Path, level: int) -> None:
    data = tmp_path / "data"
    cuff_reported(data, level)
    card, today = pages(data)
    assert battery_line(card) == WARNING.format(level=level)
    assert 'class="warn battery-low"' in card
    assert said(today).endswith(WARNING.format(level=level)), today


def test_a_cuff_at_60_percent_has_no_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cuff_reported(data, 60)
    card, today = pages(data)
    assert battery_line(card) == "电量：60%，{time} 读取"
    assert "电量低" not in card and "电量" not in today, today


def test_a_low_level_not_read_for_days_is_said_as_the_last_read(tmp_path: Path) -> None:
    """A cuff not seen for two days: its 15% is what it said then, never now's; still low."""
    data = tmp_path / "data"
    cuff_reported(data, 15, ago=dt.timedelta(days=2))
    card, today = pages(data)
    assert battery_line(card) == STALE_WARNING.format(level=15)
    assert said(today).endswith(STALE_WARNING.format(level=15)), today


def test_a_level_read_lately_by_a_device_gone_since_stays_current(tmp_path: Path) -> None:
    """Within 2 x battery_refresh_s the level a cuff connecting per reading gave is current; after,
    and not connected, it is the last read; connected, the link keeps it current however old."""
    data = tmp_path / "data"
    cuff_reported(data, 60, ago=dt.timedelta(minutes=50))
    assert battery_line(pages(data)[0]) == "电量：60%，{time} 读取"
    cuff_reported(data, 60, ago=dt.timedelta(minutes=70))
    assert battery_line(pages(data)[0]) == "电量：60%，上次读取 {time}"
    cuff_reported(data, 60, ago=dt.timedelta(minutes=70), connected=True)
    assert battery_line(pages(data)[0]) == "电量：60%，{time} 读取"


@pytest.mark.parametrize(("level", "warned"), [(15, True), (LOW_BATTERY_PERCENT, True), (60, False)])
def test_lastmile_doctor_warns_of_a_low_battery(tmp_path: Path, level: int, warned: bool) -> None:
    cuff_reported(tmp_path, level)
    findings = doctor(tmp_path).run_all()
    battery = [f for f in findings if f.topic == "battery"]
    assert [f.level for f in battery] == ([Level.WARN] if warned else [])
    out = render_text(findings)
    if warned:
        assert re.search(rf"^WARN\s+devices/battery\s+血压计: battery low, {level}% \(read ", out, re.M), out
    else:
        assert "battery low" not in out, out
