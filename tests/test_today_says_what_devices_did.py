"""Today says what the devices did while the doctor was not looking at the Devices page: a patient
card that ended another patient's check-in (a STAT one above all), a card refused or a report that
could not be read, and every device by its name in the settings, never by its port. Real parts: the
serial service over pty devices, the console over the same data directory, read as a browser
reads it (zh-CN)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.identity import DeviceIdentity
from lastmile.clinic.devices import DeviceRegistry
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config
from lastmile.doctor import failing_since_seen
from lastmile.services.serial_devices import SerialService
from tests.console_harness import (
    DOCTOR,
    VALID_ID,
    Client,
    bp_reading,
    console_config,
    record_readings,
    running_console,
)
from tests.serial_gateway import NOTHING_MEASURED_REPORT, Running, monitor_requiring_nothing, serial_config
from tests.serial_pty import PtyDevice
from tests.service_harness import PATIENT_CARD_SCAN, report_printed
from tests.waiting import wait_for
from uploader.outbox import Outbox

pytestmark = pytest.mark.timeout(300)

MONITOR, SCANNER = "血压监护仪", "前台扫码枪"
# 110101198001010010 is a valid resident ID (REV-R's card); its last digit misread or misprinted
WRONG_CHECK_DIGIT_CARD = b"110101198001010011\r\n"


def today_of(config: Config) -> str:
    """The Today page as the doctor's phone gets it (zh-CN), from a console over `config`'s data."""
    with running_console(config) as console:
        client = Client(console.url)
        client.login(DOCTOR)
        reply = client.get("/today")
    assert reply.status == 200, reply.status
    return reply.body


def panel(page: str, name: str) -> str:
    """The live panel `name` of the Today page: what the doctor sees in it, tags left out."""
    html = page.split(f'id="panel-{name}"', 1)[1].split('<div id="panel-', 1)[0]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def device_line(page: str, name: str) -> str:
    """The Today device line titled `name`, tags left out."""
    lines = page.split('<ul class="devices">', 1)[1].split("</ul>", 1)[0].split("<li>")[1:]
    (line,) = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", li)) for li in lines if name in li]
    return line


def test_a_card_that_ends_a_stat_patients_check_in_says_so_on_today(tmp_path: Path) -> None:
    """李建国 checked in as STAT (胸痛); a card read by mistake at the desk checked another patient in
    and Today showed the other patient alone: nothing said 李建国's check-in ended, nor that his STAT
    and reason were gone (the typed check-in says "X 的就诊已结束"). Now Today says whose check-in the
    card ended and when, in red for a STAT one, amber for a routine one, until the next check-in."""
    scanner = PtyDevice(tmp_path / "usb-scanner")
    r = Running(tmp_path, [{"name": SCANNER, "match": str(scanner.link_path), "profile": "scanner"}])
    card, next_card = PATIENT_CARD_SCAN.strip().decode(), "80276001234567890999"
    try:
        shown = dataclasses.replace(console_config(Path(r.config.data_dir)), serial=r.config.serial)
        wait_for(lambda: all(s.connected for s in r.service.statuses()), what="the scanner connected")
        r.patients.set_patient("P-STAT-1", "李建国", now=r.now(), stat=True, reason="胸痛")
        scanner.write(PATIENT_CARD_SCAN)
        wait_for(lambda: getattr(r.patients.current(r.now()), "patient_id", "") == card, what="the card checked in")
        page = today_of(shown)
        session = panel(page, "session")
        assert "李建国（加急）的就诊已结束" in session, session
        assert "加急和就诊原因（胸痛）没有转给下面这位患者" in session and "请重新登记 李建国" in session, session
        assert card in session.split("请重新登记 李建国", 1)[1], session  # the patient the card checked in, below it
        assert '<p class="error ended-by-card" id="ended-by-card" data-stat="yes">' in page, page  # red

        # the card's patient ended by the next card: routine, said in amber, by his ID (no name)
        scanner.write(next_card.encode() + b"\r\n")
        wait_for(lambda: getattr(r.patients.current(r.now()), "patient_id", "") == next_card, what="the next card")
        session = panel(today_of(shown), "session")
        assert f"{card} 的就诊已结束" in session and "李建国" not in session and "加急" not in session, session

        # the doctor checks the next patient in by typing: that check-in is news of its own, the card's is old
        r.patients.set_patient(VALID_ID, "张秀兰", now=r.now())
        page = today_of(shown)
        assert 'id="ended-by-card"' not in page, panel(page, "session")
    finally:
        r.close()


def console_of(g: Gateway) -> Config:
    """A console over `g`'s data, with its serial devices and patient ID rules."""
    return dataclasses.replace(
        console_config(Path(g.config.data_dir)), serial=g.config.serial, patient=g.config.patient
    )


class Gateway:
    """The serial service over pty devices with resident IDs required on cards (`[patient]
    id_kind`), as REV-R's gateway had it; the test thread's own clinic.db connections."""

    def __init__(self, tmp_path: Path, devices: list[dict]) -> None:
        self.config = serial_config(tmp_path, devices)
        self.config.patient.id_kind = "cn-resident-id"
        self.config.serial.patient_card_pattern = r"(?P<id>\d{17}[\dXx])"
        self.outbox = Outbox.open(self.config.data_dir)
        self.service = SerialService.open(self.config, outbox=self.outbox, watch_dirs=None, rescan_s=0.1)
        self.service.start()
        self.patients = PatientContext.open(self.config.data_dir, idle_timeout_s=900)
        self.registry = DeviceRegistry.open(self.config.data_dir)

    def close(self) -> None:
        self.service.close()
        self.outbox.close()
        self.patients.close()
        self.registry.close()


def a_report_cut_short(g: Gateway, monitor: PtyDevice) -> None:
    """The monitor switched off mid-print: its half report is rejected when it goes quiet."""
    printed = report_printed(dt.datetime.now(dt.timezone.utc))
    monitor.write(printed[: printed.index(b"PULSE")])
    wait_for(
        lambda: (d := g.registry.get(f"serial:{MONITOR}")) is not None and "report rejected" in d.last_error,
        timeout=60,
        what="the cut report rejected",
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Gateway, PtyDevice, PtyDevice]]:
    monitor, scanner = PtyDevice(tmp_path / "usb-monitor"), PtyDevice(tmp_path / "usb-scanner")
    g = Gateway(
        tmp_path,
        [
            {"name": MONITOR, "match": str(monitor.link_path), "profile": "example-vitals-monitor"},
            {"name": SCANNER, "match": str(scanner.link_path), "profile": "scanner"},
        ],
    )
    try:
        wait_for(lambda: len(g.service.statuses()) == 2 and all(s.connected for s in g.service.statuses()))
        yield g, monitor, scanner
    finally:
        g.close()


def test_a_refused_card_and_an_unreadable_report_are_said_on_today_with_the_reason(
    tmp_path: Path, gateway: tuple[Gateway, PtyDevice, PtyDevice]
) -> None:
    """A card with a wrong check digit changed nothing and said nothing on Today, and a report the
    monitor cut short left it "已连接": both were said on Devices only, the card's advice there
    "请再扫一次" (a rescan reads the same digits). Now each device's line on Today says its fresh
    error in plain words, the card's with what helps: type the number from the card."""
    g, monitor, scanner = gateway
    g.patients.set_patient(VALID_ID, "张秀兰", now=dt.datetime.now(dt.timezone.utc))
    scanner.write(WRONG_CHECK_DIGIT_CARD)
    wait_for(lambda: (d := g.registry.get(f"serial:{SCANNER}")) is not None and bool(d.last_error), what="refused")
    a_report_cut_short(g, monitor)
    current = g.patients.current(dt.datetime.now(dt.timezone.utc))
    assert current is not None and current.patient_id == VALID_ID  # the refused card changed nothing

    page = today_of(console_of(g))
    card_line = device_line(page, SCANNER)
    assert "号码校验位不对：请重新扫描，或照卡上的号码手动输入患者编号" in card_line, card_line
    assert "请再扫一次" not in card_line, card_line
    monitor_line = device_line(page, MONITOR)
    assert "已连接" in monitor_line and "它发来的测量结果无法读取：请重新测量" in monitor_line, monitor_line
    # the technician's words stay on Devices
    assert "report rejected" not in page and "check digit" not in page, panel(page, "readings")
    # its kind, so Devices gives the same advice (its raw words stay under the technician's details)
    scanner_row = g.registry.get(f"serial:{SCANNER}")
    assert scanner_row is not None and scanner_row.problem.value == "card-check-digit", scanner_row


def test_today_names_devices_and_readings_by_their_settings_names_never_their_ports(
    tmp_path: Path, gateway: tuple[Gateway, PtyDevice, PtyDevice]
) -> None:
    """Today's device line read "血压监护仪 (example-vitals-monitor) on /tmp/.../usb-monitor" and the
    reading's "Example Medical VM-100 /tmp/.../usb-monitor": the row's name and the report's device,
    for the technician, wrapping to three lines on a phone. Now both say 血压监护仪, as Devices does."""
    g, monitor, _scanner = gateway
    g.patients.set_patient(VALID_ID, "张秀兰", now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5))
    monitor.write(report_printed(dt.datetime.now(dt.timezone.utc)))
    wait_for(
        lambda: (d := g.registry.get(f"serial:{MONITOR}")) is not None and bool(d.last_reading) and bool(d.name),
        timeout=60,
        what="the report stored, the row on its port",
    )
    page = today_of(console_of(g))
    readings = panel(page, "readings")
    assert str(tmp_path) not in readings and "example-vitals-monitor" not in readings, readings
    assert device_line(page, MONITOR).startswith(f" {MONITOR} "), readings
    assert device_line(page, SCANNER)  # the scanner by its own
    lines = page.split('<ul class="readings">', 1)[1].split("</ul>", 1)[0].split("<li ")[1:]
    assert len(lines) >= 2, readings  # blood pressure and pulse at least
    assert all(f"· {MONITOR}" in re.sub(r"\s+", " ", line) for line in lines), lines


def test_a_good_report_after_an_unreadable_one_ends_measure_again_though_the_monitor_s_clock_is_slow(
    tmp_path: Path, gateway: tuple[Gateway, PtyDevice, PtyDevice]
) -> None:
    """REV-FI 2 (a): a report cut short said "请重新测量" on Today; the doctor measured again and the
    good report was stored, but the monitor's clock is 2 minutes slow: its measured time is before
    the error's, so Today kept saying "measure again" for 10 minutes and he measured a third time.
    A reading now ends the error by when the gateway got it."""
    g, monitor, _scanner = gateway
    g.patients.set_patient(VALID_ID, "张秀兰", now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5))
    a_report_cut_short(g, monitor)
    assert "请重新测量" in device_line(today_of(console_of(g)), MONITOR)
    slow = report_printed(dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=2))
    monitor.write(slow.replace(b"RECORD 0172", b"RECORD 0173"))
    wait_for(
        lambda: (d := g.registry.get(f"serial:{MONITOR}")) is not None and d.last_reading != "",
        timeout=60,
        what="the good report stored",
    )
    row = g.registry.get(f"serial:{MONITOR}")
    assert row is not None and row.last_reading_at is not None and row.last_error_at is not None
    assert row.last_reading_at < row.last_error_at, row  # measured, by its clock, before the error
    line = device_line(today_of(console_of(g)), MONITOR)
    assert "请重新测量" not in line, line


def test_a_cuff_s_reading_sent_after_a_failed_connection_ends_its_problem_on_today(tmp_path: Path) -> None:
    """REV-FI 2 (b): a cuff's connection failed (BleakError); its next connection sent the reading
    kept in its memory, measured before the failure. Today said "它报告了一个问题" for 10 minutes
    after the reading was stored. Now the reading ends it; a connection that sends none does not."""
    from firmware_bridge.ble.link import DeviceStatus
    from lastmile.clinic.observations import ObservationStore
    from lastmile.services.ble_devices import ClinicBlePort
    from tests.console_harness import bp_reading

    cuff, now = "AA:BB:CC:DD:EE:01", dt.datetime.now(dt.timezone.utc)
    clock = [now]
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        store = ObservationStore.open(tmp_path, outbox=outbox, idle_timeout_s=900)
        try:
            port = ClinicBlePort(store, DeviceRegistry(store.db), clock=lambda: clock[0])
            port.registry.allow(cuff, now=now - dt.timedelta(minutes=5), name="cuff")
            port.report(DeviceStatus(cuff, seen=True))  # found: its session starts
            clock[0] = now + dt.timedelta(seconds=5)
            port.report(DeviceStatus(cuff, connected=False, error="BleakError: failed to discover services"))
            clock[0] = now + dt.timedelta(seconds=40)
            port.report(DeviceStatus(cuff, seen=True))  # found again: a session that sends nothing yet
            row = port.registry.get(cuff)
            assert row is not None and row.problem_said_on_today(clock[0]), row
            assert port.store(bp_reading(now - dt.timedelta(seconds=20), "cuff-record-8"))  # measured before
            row = port.registry.get(cuff)
            assert row is not None and row.last_reading_at is not None and row.last_error_at is not None
            assert row.last_reading_at < row.last_error_at, row
            assert not row.problem_said_on_today(clock[0] + dt.timedelta(seconds=1)), row
        finally:
            store.close()


def reading_lines(page: str) -> list[str]:
    """The lines of Today's "this patient's readings", tags left out."""
    readings = page.split('<ul class="readings">', 1)[1].split("</ul>", 1)[0]
    return [" ".join(re.sub(r"<[^>]+>", " ", li).split()) for li in readings.split("<li ")[1:]]


def test_a_reading_is_named_by_the_device_that_sent_it_not_by_a_row_that_had_its_port_before(tmp_path: Path) -> None:
    """The desk's monitor, set up as "monitor", was renamed "BP on desk" when a second monitor came and
    was given the name "monitor" on another port (not plugged in yet). The old row of "monitor" still
    said the desk's port, and Today, which found a reading's device by the port in the rows' words
    ("<name> (<profile>) on <port>"), said every reading of the desk's monitor came from "monitor".
    The serial service now stamps each reading with the settings address of the device that sent
    it, and Today names the reading by that; a reading stored before it was stamped by its maker
    and model, never by another device's name."""
    desk = PtyDevice(tmp_path / "usb-desk")
    monitor = {"match": str(desk.link_path), "profile": "example-vitals-monitor"}
    first = Running(tmp_path, [{"name": "monitor", **monitor}])
    try:
        wait_for(lambda: bool(getattr(first.registry.get("serial:monitor"), "name", "")), what="on its port")
    finally:
        first.close()
    renamed = "BP on desk"
    r = Running(
        tmp_path,
        [
            {"name": renamed, **monitor},
            {"name": "monitor", "match": str(tmp_path / "usb-new-monitor"), "profile": "example-vitals-monitor"},
        ],
    )
    try:
        wait_for(lambda: bool(getattr(r.registry.get(f"serial:{renamed}"), "name", "")), what="renamed, on its port")
        row = r.registry.get("serial:monitor")
        assert row is not None and str(desk.link_path) in row.name, row  # the old row: the desk's port
        now = r.now()
        r.patients.set_patient(VALID_ID, "张秀兰", now=now - dt.timedelta(seconds=5))
        desk.write(report_printed(now))
        wait_for(lambda: len(r.outbox.items(kind="observation")) == 3, timeout=60, what="the report stored")
        shown = dataclasses.replace(console_config(Path(r.config.data_dir)), serial=r.config.serial)
        # as a gateway before the stamp stored it: the reading of a device on the desk's port
        stored_before = dataclasses.replace(
            bp_reading(now, "stored-before-the-stamp"),
            device=DeviceIdentity("Example Medical", "VM-100", "", str(desk.link_path)),
        )
        (result,) = record_readings(shown, stored_before, now=now + dt.timedelta(seconds=1))
        assert result.outcome == "stored", result
        lines = reading_lines(today_of(shown))
        assert len(lines) == 4, lines
        assert [line.endswith(f"· {renamed}") for line in lines] == [False, True, True, True], lines
        assert lines[0].endswith("· Example Medical VM-100"), lines  # the newest: the one stored before
    finally:
        r.close()


def test_a_report_with_nothing_measured_is_said_on_today_until_the_next_reading(tmp_path: Path) -> None:
    """A monitor's report whose every value was "--" (no probe on, the cuff not used) stored
    nothing, rightly, and left no trace: the doctor pressed measure, nothing showed on Today, and
    nobody knew whether the device had answered. Now the monitor's line on Today says it sent a
    result with nothing measured, until its next reading; nothing is stored for it."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    monitor = PtyDevice(tmp_path / "usb-monitor")
    device = {"name": MONITOR, "match": str(monitor.link_path), "profile": monitor_requiring_nothing(profiles)}
    r = Running(tmp_path, [device], profiles_dir=str(profiles))
    try:
        shown = dataclasses.replace(console_config(Path(r.config.data_dir)), serial=r.config.serial)
        wait_for(lambda: all(s.connected for s in r.service.statuses()), what="the monitor connected")
        r.patients.set_patient(VALID_ID, "张秀兰", now=r.now() - dt.timedelta(seconds=5))
        monitor.write(NOTHING_MEASURED_REPORT)
        wait_for(
            lambda: (d := r.registry.get(f"serial:{MONITOR}")) is not None and bool(d.last_error),
            what="the report with nothing measured said on the monitor's row",
        )
        assert r.outbox.items(kind="observation") == []  # nothing measured: nothing stored
        line = device_line(today_of(shown), MONITOR)
        assert "它发来了结果，但什么也没有测到：请检查探头是否接好、放好，然后重新测量" in line, line
        assert "nothing measured" not in line, line  # the technician's words stay on Devices
        row = r.registry.get(f"serial:{MONITOR}")
        assert row is not None and not failing_since_seen(row), row  # not a fault `lastmile doctor` warns of

        monitor.write(report_printed(r.now()).replace(b"RECORD 0172", b"RECORD 0301"))
        wait_for(lambda: len(r.outbox.items(kind="observation")) == 3, timeout=60, what="the next report stored")
        line = device_line(today_of(shown), MONITOR)
        assert "什么也没有测到" not in line, line
    finally:
        r.close()
