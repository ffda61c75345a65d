"""The serial service as the serial tests drive it: a gateway configured for pty devices, the service
running on its own thread, the bridge's side of the conversation, and a monitor profile with a typo."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

from devices.bridge import codec
from firmware_bridge.firmware.bridge_core import BridgeCore
from firmware_bridge.serial_link import LinkSpec
from lastmile.clinic.devices import DeviceRegistry
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config
from lastmile.services.serial_devices import SerialContext, SerialService
from lastmile.services.serial_spill import HEADER
from tests.serial_pty import PtyDevice
from tests.service_harness import EXAMPLE_PROFILE, VITALS_REPORT
from tests.waiting import wait_for
from uploader.outbox import Outbox
from uploader.sqlite_store import StopWaits


def serial_config(tmp_path: Path, devices: list[dict]) -> Config:
    """A gateway reading `devices`, with the clinic's card and badge patterns."""
    config = Config()
    config.gateway.data_dir = str(tmp_path / "data")
    config.serial.devices = devices
    config.serial.patient_card_pattern = r"(?P<id>\d{20})"
    config.serial.doctor_badge_pattern = r"DR-(?P<id>\d{6})"
    return config


class Running:
    """The serial service running on its own thread over pty devices, with the outbox and the test
    thread's own clinic.db connections."""

    def __init__(self, tmp_path: Path, devices: list[dict], *, min_free_bytes: int = 0, profiles_dir: str = "") -> None:
        self.config = serial_config(tmp_path, devices)
        self.config.serial.profiles_dir = profiles_dir
        self.outbox = Outbox.open(self.config.data_dir, min_free_bytes=min_free_bytes)
        self.service = SerialService.open(self.config, outbox=self.outbox, watch_dirs=None, rescan_s=0.1)
        self.service.start()
        # The test thread's own clinic.db connections (as `lastmile patient` / `lastmile devices`
        # have in their own processes): the service's connection belongs to its thread.
        self.patients = PatientContext.open(self.config.data_dir, idle_timeout_s=900)
        self.registry = DeviceRegistry.open(self.config.data_dir)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def device_waiting(self, address: str) -> str:
        """What the device row says waits for space, in its status's words; "" until the service
        has written the row (it may not have yet when the test thread looks)."""
        record = self.registry.get(address)
        return record.waiting if record is not None else ""

    def device_reading(self, address: str) -> str:
        """The last reading its device row shows; "" before the service wrote one."""
        record = self.registry.get(address)
        return (record.last_reading or "") if record is not None else ""

    def close(self) -> None:
        self.service.close()
        self.outbox.close()
        self.patients.close()
        self.registry.close()


def serial_part_whose_stop_gives_up_waits(
    config: Config, outbox: Outbox, stop: threading.Event
) -> tuple[SerialService, SerialContext, LinkSpec]:
    """The serial part on `config` whose waits (the outbox's too, as the acquire service's) end at
    `stop`, its spill slot full (as many waiting readings make it): a reading held is in memory only.
    The service, its context and its first device."""
    waits = StopWaits(stop)
    outbox.give_up_waits_on(waits)
    service = SerialService.open(config, outbox=outbox, stop=waits, watch_dirs=None, rescan_s=0.1)
    ctx = service.ctx
    assert ctx.spill is not None
    ctx.spill.slot_bytes = HEADER
    return service, ctx, service.specs[0]


def monitor_prints_a_report_the_full_outbox_refuses(
    r: Running, monitor: PtyDevice, row_says: str, *, patient_id: str = "P-9", full: bool = True
) -> None:
    """The monitor prints a report for `patient_id`, checked in, on a full outbox (not `full`: the
    caller made it refuse otherwise); waits until its device row says `row_says` of what waits."""
    wait_for(lambda: all(s.connected for s in r.service.statuses()))
    if full:
        r.outbox.min_free_bytes = 1 << 60  # storage full
    now = r.now()
    r.patients.set_patient(patient_id, now=now - dt.timedelta(minutes=1))
    printed = (now + dt.timedelta(hours=1)).strftime("DATE %Y-%m-%d  TIME %H:%M:%S").encode()
    monitor.write(VITALS_REPORT.replace(b"DATE 2025-03-04  TIME 09:41:07", printed))
    wait_for(lambda: row_says in r.device_waiting("serial:monitor"), timeout=30, what=f"the row says {row_says!r}")


def talk_as_bridge(dev: PtyDevice, core: BridgeCore, clock: list[int], until, *, timeout: float = 30) -> None:
    """Be the bridge: answer the gateway, resend on timeouts, until `until()` holds (`timeout` s at most)."""

    def step() -> bool:
        data = dev.read_available(0.05)
        if data:
            dev.write(core.receive(data, clock[0]))
        clock[0] += 100
        dev.write(core.poll(clock[0]))
        return until()

    wait_for(step, timeout=timeout)


def wait_for_answers(
    bridge: PtyDevice, seqs: set[int], core: BridgeCore | None = None, now_ms: int = 0
) -> list[codec.Ack | codec.Nack]:
    """The gateway's ACKs and NACKs read from the pty until each of `seqs` has one (30 s at most),
    handed to `core` too when given, so the bridge acts on them as the firmware would."""
    answers: list[codec.Ack | codec.Nack] = []
    reader = codec.FrameReader()

    def answered() -> bool:
        data = bridge.read_available(0.05)
        if core is not None:
            bridge.write(core.receive(data, now_ms))
        messages = (codec.decode_message(f) for f in reader.feed(data))
        answers.extend(m for m in messages if isinstance(m, (codec.Ack, codec.Nack)))
        return seqs <= {a.seq for a in answers}

    wait_for(answered, timeout=30)
    return answers


# a monitor's report in which nothing was measured: the cuff not used ("---/---"), no probe on
# ("SPO2 -- %", "TEMP --.- C"), its pulse line left out as such monitors do
NOTHING_MEASURED_REPORT = (
    b"===== VITALS REPORT =====\r\n"
    b"DEVICE VM-100  SN 004211\r\n"
    b"RECORD 0300\r\n"
    b"NIBP   ---/--- mmHg\r\n"
    b"SPO2   -- %\r\n"
    b"TEMP   --.- C\r\n"
    b"===== END =====\r\n"
)


def monitor_requiring_nothing(profiles: Path) -> str:
    """A spot-check monitor's profile (`profiles`/spot-check.toml) in which no field is required,
    as an SpO2 and temperature monitor's: a report may measure any of them, or none."""
    text = EXAMPLE_PROFILE.read_text().replace('name = "example-vitals-monitor"', 'name = "spot-check"', 1)
    (profiles / "spot-check.toml").write_text(text.replace("required = true", "required = false"))
    return "spot-check"


def ward_profile_with_bad_baudrate(profiles: Path) -> int:
    """`ward-monitor.toml` with its port speed mistyped; returns the line of the mistake."""
    good = EXAMPLE_PROFILE.read_text().replace('name = "example-vitals-monitor"', 'name = "ward-monitor"', 1)
    lines = good.replace("baudrate = 9600", "baudrate = 0", 1).splitlines()
    (profiles / "ward-monitor.toml").write_text("\n".join(lines) + "\n")
    return next(i + 1 for i, text in enumerate(lines) if text.startswith("baudrate = 0"))


def write_spill_copy(path: Path, slot: int, generation: int, content: dict) -> None:
    """One copy in slot `slot` of the spill file at `path`, as the gateway writes it (whole, fsynced)."""
    import hashlib
    import json
    import os

    from lastmile.services.serial_spill import MAGIC, SPILL_BYTES

    body = json.dumps(content).encode()
    header = MAGIC + generation.to_bytes(8, "big") + len(body).to_bytes(4, "big") + hashlib.sha256(body).digest()
    with path.open("r+b") as f:
        f.seek(slot * (SPILL_BYTES // 2))
        f.write(header + body)
        f.flush()
        os.fsync(f.fileno())


def a_spill_file_with_a_record_that_does_not_decode(data: Path) -> list[str]:
    """The spill file in `data`: its newest copy (generation 6) 2 readings and a record that does
    not decode, its older one (5) 3 readings stored since. Returns the 2 readings' record keys."""
    from lastmile.clinic.observations import observation_to_json
    from lastmile.services.serial_spill import SPILL_NAME, SpillFile
    from tests.console_harness import bp_reading

    now = dt.datetime.now(dt.timezone.utc)
    readings = [observation_to_json(bp_reading(now - dt.timedelta(minutes=i), f"bp-{i}")) for i in range(5)]
    SpillFile(data)  # allocated, as the acquire service's start does
    write_spill_copy(data / SPILL_NAME, 1, 5, {"monitor": readings[:3]})
    write_spill_copy(data / SPILL_NAME, 0, 6, {"monitor": [*readings[3:], {"not": "a reading"}]})
    return [r["record_key"] for r in readings[3:]]
