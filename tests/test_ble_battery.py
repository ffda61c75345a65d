"""A BLE device's battery on the Devices page: every BLE card said its battery was "not
reported" (设备未报告), as nothing ever read a level, so a cuff about to go flat looked like one that cannot say.
Now the link reads Battery Level (0x2A19) when it connects and the page says it; a device that
never reported one has no battery line. A device that stays connected for days keeps it current:
notified when its Battery Level notifies, else re-read while connected; the row is written when
the level changes (an unchanged one at most every `battery_refresh_s`: the SD card)."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import missing

if importlib.util.find_spec("bumble") is None:
    missing("bumble (the emulation extra) is not installed", module=True)

from devices.ble.battery import LOW_BATTERY_PERCENT, decode_battery_level
from devices.errors import ProtocolError
from firmware_bridge.ble.emulated_peripherals import (
    BloodPressureCuff,
    BpRecord,
    EmulatedPeripheral,
    TemperatureRecord,
    Thermometer,
)
from firmware_bridge.ble.link import BatteryWatch, LinkSettings
from lastmile.cli import main
from lastmile.clinic.devices import DeviceRecord
from lastmile.config import parse_config
from lastmile.services.ble_devices import link_settings
from tests.ble_gateway import Gateway
from tests.console_harness import DOCTOR, Client, console_config, running_console
from tests.statement_trace import traced

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


def battery_on_card(card: str) -> tuple[str, dt.datetime]:
    """The battery line of a Devices card: what it says (its time as {time}) and the time it gives."""
    line = card.split("data-battery=", 1)[1].split(">", 1)[1].split("</p>", 1)[0]
    when = re.search(r'<time datetime="([^"]+)">[^<]*</time>', line)
    assert when is not None, line
    return line.replace(when[0], "{time}"), dt.datetime.fromisoformat(when[1])


def low_words(level: int) -> str:
    return f"电量低（{level}%，{{time}} 读取）：请尽快更换电池或充电"


def stays_connected(
    data: Path,
    change_to: int,
    *,
    notify: bool,
    settings: LinkSettings | None = None,
    after_change: int = 0,
    require_pairing: bool = False,
) -> tuple[DeviceRecord, dt.datetime, BloodPressureCuff]:
    """A cuff at 80% (its subscriptions needing an encrypted link if `require_pairing`) connects and
    stays connected; once the link has set it up, a day later by the gateway's clock, its charge
    drops to `change_to` (notified if `notify`). Runs until the row says so (or 10 s pass), then
    `after_change` more Battery Level reads a minute later still. Its row then, the time of the
    drop and the cuff."""
    gw = Gateway(data)
    later = dt.datetime.now(UTC).replace(microsecond=0) + dt.timedelta(days=1)
    try:
        gw.allow(CUFF)

        async def run() -> BloodPressureCuff:
            cuff = BloodPressureCuff(
                gw.new_radio(),
                CUFF,
                "cuff",
                battery_level=80,
                battery_notify=notify,
                hang_up_after_memory=False,
                require_pairing=require_pairing,
            )
            changed: list[float] = []  # when (monotonic) the charge dropped
            reads: list[int] = []  # reads served when the row said the new level

            async def during() -> None:
                row = gw.registry.get(CUFF)
                if not changed and row is not None and row.battery_level == 80 and cuff.measurement in cuff.subscribed:
                    gw.clock = lambda: later
                    await cuff.drain_battery(change_to)
                    changed.append(time.monotonic())
                elif changed and not reads and row is not None and row.battery_level == change_to:
                    reads.append(cuff.battery_reads)
                    gw.clock = lambda: later + dt.timedelta(minutes=1)

            def done() -> bool:
                if changed and time.monotonic() - changed[0] > 10:
                    return True  # the row never said it: asserted below
                return bool(reads) and cuff.battery_reads >= reads[0] + after_change

            await gw.run([cuff], until=done, during=during, timeout=60, settings=settings)
            return cuff

        cuff = asyncio.run(run())
        row = gw.registry.get(CUFF)
    finally:
        gw.close()
    assert row is not None
    return row, later, cuff


def test_a_cuff_left_connected_tells_the_doctor_its_battery_went_low(tmp_path: Path) -> None:
    """A BP monitor connected for days showed the level it had when it connected (80%, with that
    time): its Battery Level notified 15% and nobody listened. Now the link subscribes to it: the
    row and the Devices page say 15% and when it was said."""
    data = tmp_path / "data"
    row, dropped_at, _ = stays_connected(data, 15, notify=True)
    assert (row.battery_level, row.battery_at) == (15, dropped_at)
    assert battery_on_card(devices_card(data, CUFF)) == (low_words(15), dropped_at)


def test_a_cuff_bonded_after_refusing_battery_notifications_notifies_its_battery(tmp_path: Path) -> None:
    """A cuff whose subscriptions need an encrypted link refused the Battery Level one (asked before
    bonding); the link bonded for its measurements but only re-read the level every
    `battery_poll_s` for the rest of the connection (days). Now it subscribes again once bonded:
    the level it notifies reaches the row and the page without waiting for a re-read."""
    data = tmp_path / "data"
    settings = LinkSettings(
        scan_pass_s=0.5, reconnect_delay_s=0.2, retry_backoff_s=0.2, device_tz=UTC, battery_poll_s=3600
    )
    row, dropped_at, cuff = stays_connected(data, 15, notify=True, settings=settings, require_pairing=True)
    assert row.pair_required  # it was bonded in this connection
    assert (row.battery_level, row.battery_at) == (15, dropped_at)
    assert cuff.battery_reads == 1  # the read at connect: the level came notified
    assert battery_on_card(devices_card(data, CUFF)) == (low_words(15), dropped_at)


def test_a_battery_subscription_failing_never_keeps_the_cuffs_measurements_from_being_subscribed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Battery Level subscription is a nicety; the measurements are not. Its descriptor write
    failing otherwise than by a GATT error or D-Bus (a plain BleakError: a stack timing out) ended
    the set-up before the measurements were subscribed - at connect, and again once bonded - and the
    cuff's readings waited for a connection that never got further. It is re-read instead."""
    from bleak import BleakClient
    from bleak.exc import BleakError

    from devices.ble import uuids

    start_notify = BleakClient.start_notify

    async def battery_fails(self, char, callback, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(char, "uuid", "").startswith(f"0000{uuids.BATTERY_LEVEL:04x}"):
            raise BleakError("descriptor write timed out")
        return await start_notify(self, char, callback, **kwargs)

    monkeypatch.setattr(BleakClient, "start_notify", battery_fails)
    data = tmp_path / "data"
    settings = LinkSettings(
        scan_pass_s=0.5, reconnect_delay_s=0.2, retry_backoff_s=0.2, device_tz=UTC, battery_poll_s=1
    )
    row, _, _ = stays_connected(data, 15, notify=True, settings=settings, require_pairing=True)
    assert row.battery_level == 15  # the measurements subscribed (the drop comes after), the level re-read


FLICKERS = 40  # notifications of a cell under load flickering 50<->51


def battery_written(statements: list[str]) -> list[int]:
    """The Battery Levels written to the device row, in order, from the statements run on clinic.db."""
    return [int(m[1]) for m in map(re.compile(r"UPDATE devices SET .*battery_level = (\d+)").search, statements) if m]


def test_a_battery_level_flickering_by_one_point_does_not_write_the_row_each_time(tmp_path: Path) -> None:
    """A cuff left connected whose cell flickers 50<->51 under load wrote its device row in
    clinic.db at every notification (the SD card, all day). Now a level 1 point from the one
    written waits for `battery_refresh_s`; a bigger change and a drop to the low threshold are
    written at once, and the page is never more than 1 point off."""
    data = tmp_path / "data"
    gw = Gateway(data)
    low = LOW_BATTERY_PERCENT
    levels = [51, 50] * (FLICKERS // 2) + [low + 3, low + 1, low]
    try:
        gw.allow(CUFF)

        async def run() -> None:
            cuff = BloodPressureCuff(
                gw.new_radio(), CUFF, "cuff", battery_level=50, battery_notify=True, hang_up_after_memory=False
            )
            sent: list[int] = []

            async def during() -> None:
                row = gw.registry.get(CUFF)
                if not sent and row is not None and row.battery_level == 50 and cuff.battery in cuff.subscribed:
                    for level in levels:
                        await cuff.drain_battery(level)
                        sent.append(level)

            def done() -> bool:
                row = gw.registry.get(CUFF)
                return bool(sent) and row is not None and row.battery_level == low

            await gw.run([cuff], until=done, during=during, timeout=60)

        with traced(gw.store.db.conn) as statements:
            asyncio.run(run())
    finally:
        gw.close()
    assert battery_written(statements) == [50, low + 3, low + 1, low]
    assert battery_on_card(devices_card(data, CUFF))[0] == low_words(low)


def test_a_battery_level_without_notify_is_read_again_and_written_only_when_it_changed(tmp_path: Path) -> None:
    """A device whose Battery Level cannot notify is re-read while connected (every
    `battery_poll_s`); an unchanged level does not rewrite the row at every read."""
    data = tmp_path / "data"
    settings = LinkSettings(
        scan_pass_s=0.5, reconnect_delay_s=0.2, retry_backoff_s=0.2, device_tz=UTC, battery_poll_s=0.2
    )
    row, dropped_at, cuff = stays_connected(data, 40, notify=False, settings=settings, after_change=3)
    assert (row.battery_level, row.battery_at) == (40, dropped_at)  # not the minute after, read 3 times more
    assert cuff.measurement in cuff.subscribed and cuff.battery not in cuff.subscribed
    assert battery_on_card(devices_card(data, CUFF)) == ("电量：40%，{time} 读取", dropped_at)


def test_the_battery_poll_and_refresh_of_the_config_reach_the_link(tmp_path: Path) -> None:
    """`[ble] battery_poll_s` / `battery_refresh_s` were no settings: the link always re-read a
    Battery Level that cannot notify every 600 s and wrote an unchanged one every 1800 s, whatever
    the clinic needed. Now the configuration's reach the link (here a poll short enough to see the
    cuff's drop while it stays connected)."""
    config = parse_config("[ble]\nscan_interval_s = 0.5\nbattery_poll_s = 0.2\nbattery_refresh_s = 7200\n")
    settings = replace(link_settings(config), reconnect_delay_s=0.2, retry_backoff_s=0.2, device_tz=UTC)
    assert settings.battery_refresh_s == 7200, settings
    row, dropped_at, _ = stays_connected(tmp_path / "data", 40, notify=False, settings=settings)
    assert (row.battery_level, row.battery_at) == (40, dropped_at)


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


def test_an_unchanged_battery_level_is_written_again_only_after_the_refresh_interval() -> None:
    """The time beside the level stays recent on a device that notifies the same level all day,
    without a clinic.db write per notification."""
    watch = BatteryWatch(refresh_s=1800)
    assert watch.is_news(50, now=0.0)
    assert not watch.is_news(50, now=1799.0)
    assert watch.is_news(48, now=1799.5)  # a change of 2 points: at once
    assert not watch.is_news(48, now=3000.0)
    assert watch.is_news(48, now=3599.5)


def test_a_battery_level_dropping_to_low_is_written_at_once_even_one_point_down() -> None:
    """A flicker of 1 point waits for the refresh interval, except a drop to the low threshold:
    the doctor must see a cuff going flat at once. Flickering back up and down there stays quiet."""
    watch = BatteryWatch(refresh_s=1800)
    assert watch.is_news(LOW_BATTERY_PERCENT + 1, now=0.0)
    assert not watch.is_news(LOW_BATTERY_PERCENT + 2, now=1.0)  # 1 point from the row: not worth a write
    assert watch.is_news(LOW_BATTERY_PERCENT, now=2.0)  # down to low: at once
    assert not watch.is_news(LOW_BATTERY_PERCENT + 1, now=3.0)
    assert not watch.is_news(LOW_BATTERY_PERCENT, now=4.0)


CONNECTS = 5


def test_a_cuff_connecting_once_per_reading_does_not_write_an_unchanged_battery_level_each_time(tmp_path: Path) -> None:
    """A cuff that connects for each reading and hangs up wrote its row's battery level at every
    connect, unchanged (each connection's `BatteryWatch` started empty): an SD-card write per
    reading for nothing. Now the watch starts from the level the row holds and when it was written:
    over 5 connects at the same level the row is written once."""
    data = tmp_path / "data"
    gw = Gateway(data)
    try:
        gw.allow(CUFF)

        async def run() -> None:
            memory = [BpRecord(121, 81, 94, 70, local_now())]  # sent again at each connect: known, not stored
            cuff = BloodPressureCuff(gw.new_radio(), CUFF, "cuff", battery_level=60, memory=memory, readvertise=True)
            await gw.run([cuff], until=lambda: cuff.connections >= CONNECTS and cuff.connection is None, timeout=60)

        with traced(gw.store.db.conn) as statements:
            asyncio.run(run())
        row = gw.registry.get(CUFF)
    finally:
        gw.close()
    assert row is not None and row.battery_level == 60
    assert battery_written(statements) == [60]
