"""The Devices page in the village doctor's words, in a real Chromium: a device's problem says
what happened and what to do (its raw text kept for the technician), the header names the device
without registry codes, and a removed device is not shown connected while what it holds or lost
is still said."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from devices import device_errors
from lastmile.clinic.devices import DeviceProblem, DeviceRegistry, HeldReadings
from tests.console_browser import by, log_in
from tests.console_harness import console_config, running_console
from tests.serial_gateway import Running
from tests.serial_pty import PtyDevice
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(600)
CUFF = "C0:00:00:00:00:01"


def card_of(browser: object, title: str) -> object:
    """The device card whose heading ends with `title` in any case (an unnamed serial device's
    used to be its registry address, "SERIAL:CART": the header test says what it is now)."""
    cards = browser.find_elements(by("css"), "ul.device-list > li")  # type: ignore[attr-defined]
    (card,) = [c for c in cards if c.find_element(by("css"), "strong").text.lower().endswith(title)]
    return card


def a_cuff_sends_a_malformed_value(data_dir: Path, name: str, advertised: str = "") -> None:
    """A cuff named `name` (paired so, and advertised so unless `advertised` is given) indicating a
    blood pressure value too short to read, through the real BLE link (bumble) and the clinic's
    port into `data_dir`'s device row."""
    from tests.ble_gateway import CapturedCuff, Gateway

    gw = Gateway(data_dir)
    try:
        gw.registry.allow(CUFF, now=dt.datetime.now(dt.timezone.utc), name=name)

        async def main() -> None:
            cuff = CapturedCuff(
                gw.new_radio(), CUFF, advertised or name, current_time_service=False, captured=(b"\x00\x01",)
            )
            await gw.run([cuff], until=lambda: bool((row := gw.registry.get(CUFF)) and row.last_error))

        asyncio.run(main())
    finally:
        gw.close()


def test_an_unplugged_serial_device_and_a_malformed_ble_value_are_said_in_chinese(
    browser: object, tmp_path: Path
) -> None:
    """A monitor's cable pulled out: the page said "最近的问题 19:06: device gone" (serial_link's
    words), and a cuff's bad value "malformed 2A35 value: too short": the doctor was not told to
    plug it back. Now it says so in Chinese; the raw text is under the technician's details."""
    monitor = PtyDevice(tmp_path / "usb-monitor")
    r = Running(tmp_path, [{"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"}])
    try:
        wait_for(lambda: all(s.connected for s in r.service.statuses()), what="the monitor connected")
        monitor.unplug()
        wait_for(
            lambda: (row := r.registry.get("serial:monitor")) is not None and row.last_error.startswith("device gone"),
            what="the row says it is gone",
        )
    finally:
        r.close()
    a_cuff_sends_a_malformed_value(Path(r.config.data_dir), "血压计")
    shown = dataclasses.replace(console_config(Path(r.config.data_dir)), serial=r.config.serial)
    with running_console(shown) as console:
        log_in(browser, console)
        browser.get(console.url + "/devices")
        monitor_card, cuff_card = card_of(browser, "monitor"), card_of(browser, "血压计")
        assert "已拔出：请插回数据线" in monitor_card.text, monitor_card.text
        assert "device gone" not in monitor_card.text, monitor_card.text  # folded under the details
        assert "请重新测量" in cuff_card.text and "malformed" not in cuff_card.text, cuff_card.text
        monitor_card.find_element(by("css"), "details summary").click()
        assert "device gone" in monitor_card.find_element(by("css"), "details").text


def test_the_device_header_names_the_device_without_registry_codes(browser: object, tmp_path: Path) -> None:
    """A serial device's header read "SERIAL SERIAL:BRIDGE", an unnamed one was titled
    "SERIAL:CART", and every card, a mains-powered serial one too, said the battery was "not reported"."""
    data = tmp_path / "data"
    now = dt.datetime.now(dt.timezone.utc)
    with contextlib.closing(DeviceRegistry.open(data)) as registry:
        registry.update_status("serial:cart", now=now, transport="serial", connected=False)
        registry.update_status("serial:cart:forwarded", now=now, transport="serial", connected=False)
    config = console_config(data)
    config.serial.devices = [{"name": "cart", "match": "/dev/serial/by-id/usb-cart", "profile": "bridge"}]
    with running_console(config) as console:
        log_in(browser, console)
        browser.get(console.url + "/devices")
        card = card_of(browser, "cart")
        assert card.find_element(by("css"), "strong").text == "cart", card.text
        assert "SERIAL" not in card.text and "串口" in card.text, card.text
        assert "电量" not in card.text, card.text
        assert card_of(browser, "cart 上连接的设备")  # the device the bridge forwards, after the bridge


def test_a_removed_device_is_not_connected_and_what_it_holds_or_lost_is_said(browser: object, tmp_path: Path) -> None:
    """A serial monitor taken out of the settings while its readings waited for space kept its
    green "connected" dot beside "removed (no longer in the settings)", and what a stop lost of it was not
    said at all (`not d.removed`)."""
    data = tmp_path / "data"
    now = dt.datetime.now(dt.timezone.utc)
    with contextlib.closing(DeviceRegistry.open(data)) as registry:
        registry.update_status(
            "serial:monitor", now=now, transport="serial", connected=True, held=HeldReadings.DISK, held_counts=(3, 0)
        )
        row = registry.get("serial:monitor")
        assert row is not None
        registry.record_lost(row, (2, 0), now=now)
    with running_console(console_config(data)) as console:  # no [[serial.devices]]: the monitor is removed
        log_in(browser, console)
        browser.get(console.url + "/devices")
        card = card_of(browser, "monitor")
        assert "已移除" in card.text, card.text
        assert "on" not in card.find_element(by("css"), ".dot").get_attribute("class").split(), card.text
        assert "等待存储空间：3 条测量结果" in card.text, card.text
        assert "网关停机时丢失：2 条测量结果" in card.text, card.text


def test_a_running_serial_device_is_titled_by_its_settings_name_its_port_only_for_the_technician(
    browser: object, tmp_path: Path
) -> None:
    """A monitor read on its port was titled "monitor (example-vitals-monitor) on /tmp/.../usb-monitor"
    (the row's name, as `lastmile devices` says it for the technician): a device path shown to the
    doctor. Now its card is titled by its name in the settings; the port is under the technician's details."""
    monitor = PtyDevice(tmp_path / "usb-monitor")
    r = Running(tmp_path, [{"name": "monitor", "match": str(monitor.link_path), "profile": "example-vitals-monitor"}])
    try:
        wait_for(
            lambda: (row := r.registry.get("serial:monitor")) is not None and row.connected and bool(row.name),
            what="the monitor's row says it is connected, on its port",
        )
        shown = dataclasses.replace(console_config(Path(r.config.data_dir)), serial=r.config.serial)
        with running_console(shown) as console:
            log_in(browser, console)
            browser.get(console.url + "/devices")
            card = card_of(browser, "monitor")
            assert card.find_element(by("css"), "strong").text == "monitor", card.text
            assert str(tmp_path) not in card.text, card.text  # folded under the details
            card.find_element(by("css"), "details summary").click()
            assert str(monitor.link_path) in card.find_element(by("css"), "details").text, card.text
    finally:
        r.close()


def test_a_cuff_is_titled_by_the_name_given_at_pairing_its_advertised_name_only_for_the_technician(
    browser: object, tmp_path: Path
) -> None:
    """A cuff paired as "血压计 1号诊室" was titled "BP cuff" (what it advertises) once the link saw
    it: the doctor could not tell which room's cuff it was. Now the name given at pairing stays its
    title; what it advertises is under the technician's details."""
    data = tmp_path / "data"
    a_cuff_sends_a_malformed_value(data, "血压计 1号诊室", advertised="BP cuff")
    with running_console(console_config(data)) as console:
        log_in(browser, console)
        browser.get(console.url + "/devices")
        card = card_of(browser, "血压计 1号诊室")
        assert "BP cuff" not in card.text, card.text  # folded under the details
        card.find_element(by("css"), "details summary").click()
        assert "蓝牙名称：BP cuff" in card.find_element(by("css"), "details").text, card.text


def test_every_word_a_link_began_a_device_error_with_keeps_its_advice_after_the_kind_is_recorded(
    tmp_path: Path,
) -> None:
    """Rows written before an error's kind was recorded with it (migration 0026): each of the words
    our links began an error with (devices.device_errors) gets its kind once, from those words, so
    a gateway updated with a device fault keeps telling the doctor what to do, not "it reported a
    problem"; an error in no such words is OTHER."""
    from lastmile.clinic.db import DB_NAME, MIGRATIONS
    from uploader.sqlite_store import open_database

    words = {name: value for name, value in vars(device_errors).items() if name.isupper()}
    assert len(words) == 9, words
    errors = {name: f"pulse{value}x" if name == "NOT_A_RESULT" else f"{value} why" for name, value in words.items()}
    errors["FOREIGN"] = "RuntimeError: boom"
    db = open_database(tmp_path / DB_NAME, tuple(m for m in MIGRATIONS if m.name < "0026_device_error_kind"))
    for name, error in errors.items():
        db.conn.execute(
            "INSERT INTO devices (address, transport, updated_at, last_error) VALUES (?, 'serial', ?, ?)",
            (name, "2026-12-06T08:00:00+00:00", error),
        )
    db.conn.close()
    registry = DeviceRegistry.open(tmp_path)
    try:
        told = {name: registry.get(name).problem for name in errors}  # type: ignore[union-attr]
    finally:
        registry.close()
    assert told.pop("FOREIGN") is DeviceProblem.OTHER
    assert DeviceProblem.OTHER not in told.values(), told
    assert told["DEVICE_GONE"] is DeviceProblem.UNPLUGGED and told["CANNOT_STORE"] is DeviceProblem.NOT_SAVED, told
    # not a refusal a start with the profile fixed clears (0026): a restart keeps it
    assert told["FORWARD_NOT_READ"] is DeviceProblem.FORWARD_NOT_READ and told["NOT_STARTED"] is DeviceProblem.SETTINGS
