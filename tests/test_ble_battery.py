"""A BLE device's battery on the Devices page: every BLE card said its battery was "not
reported" (设备未报告), as nothing ever read a level, so a cuff about to go flat looked like one that cannot say.
Now the link reads Battery Level (0x2A19) when it connects and the page says it; a device that
never reported one has no battery line."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import re
from pathlib import Path

import pytest

from tests.conftest import missing

if importlib.util.find_spec("bumble") is None:
    missing("bumble (the emulation extra) is not installed", module=True)

from devices.ble.battery import decode_battery_level
from devices.errors import ProtocolError
from firmware_bridge.ble.emulated_peripherals import (
    BloodPressureCuff,
    BpRecord,
    EmulatedPeripheral,
    TemperatureRecord,
    Thermometer,
)
from lastmile.cli import main
from lastmile.clinic.devices import DeviceRecord
from tests.ble_gateway import Gateway
from tests.console_harness import DOCTOR, Client, console_config, running_console

UTC = dt.timezone.utc
CUFF, THERMO = "C0:00:00:00:00:01", "C0:00:00:00:00:02"
pytestmark = pytest.mark.timeout(120)


def local_now() -> dt.datetime:
    return dt.datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def connected_once(data: Path, make: type[EmulatedPeripheral], address: str, **kwargs: object) -> DeviceRecord:
    """The device at `address` connects to the gateway's link, sends its one reading and hangs up:
    its row in clinic.db then."""
    gw = Gateway(data)
    try:
        gw.allow(address)

        async def main() -> None:
            device = make(gw.new_radio(), address, "device", **kwargs)  # type: ignore[call-arg]
            record = gw.registry.get
            await gw.run([device], until=lambda: len(gw.events) == 1 and not record(address).connected)  # type: ignore[union-attr]

        asyncio.run(main())
        row = gw.registry.get(address)
    finally:
        gw.close()
    assert row is not None
    return row


def devices_card(data: Path, address: str) -> str:
    """The Devices page's card of `address`, as a doctor reads it (zh-CN)."""
    with running_console(console_config(data)) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = client.get("/devices").body
    return page.split(f'data-address="{address}"', 1)[1].split("</li>", 1)[0]


def test_the_devices_page_says_the_battery_a_cuff_reported_when_it_connected(tmp_path: Path) -> None:
    data = tmp_path / "data"
    memory = [BpRecord(121, 81, 94, 70, local_now())]
    row = connected_once(data, BloodPressureCuff, CUFF, battery_level=23, memory=memory)
    assert row.battery_level == 23 and row.battery_at is not None
    card = devices_card(data, CUFF)
    assert "电量：23%" in card and "未报告" not in card, card


def printed_for(out: str, address: str) -> str:
    """What `lastmile devices` printed for `address`: its row and the indented lines under it."""
    (block,) = [b for b in re.split(r"\n(?=\S)", out.rstrip("\n")) if address in b.splitlines()[0]]
    return block


def test_lastmile_devices_says_the_battery_a_cuff_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lastmile devices` printed no battery line for a cuff that reported 23% when it connected
    (the Devices page and --json said it): a technician at the terminal could not see it going
    flat. Now it says the level and when it was read, as it says the last reading."""
    data = tmp_path / "data"
    memory = [BpRecord(121, 81, 94, 70, local_now())]
    connected_once(data, BloodPressureCuff, CUFF, battery_level=23, memory=memory)
    connected_once(data, Thermometer, THERMO, memory=[TemperatureRecord(37.2, local_now())])
    assert main(["devices", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+battery\s+\S.*: 23%$", printed_for(out, CUFF), re.M), out
    assert "battery" not in printed_for(out, THERMO), out  # it never reported one


def test_a_ble_device_that_never_reported_its_battery_has_no_battery_line(tmp_path: Path) -> None:
    """A thermometer without a Battery Service connected and sent its reading: its card said its
    battery was "not reported", as every BLE card did, whatever the device could say."""
    data = tmp_path / "data"
    row = connected_once(data, Thermometer, THERMO, memory=[TemperatureRecord(37.2, local_now())])
    assert row.last_reading
    card = devices_card(data, THERMO)
    assert "电量" not in card, card
    assert row.battery_level is None


@pytest.mark.parametrize("data", [b"", b"\x65", b"\xff", b"\x50\x00"])
def test_a_battery_level_that_is_no_percentage_is_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_battery_level(data)
