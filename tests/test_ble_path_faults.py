"""Faults on the BLE path found in review: each test fails on the code as it stands.

Pure where the fault is in one function; otherwise the real link (bleak API) against
bumble-emulated peripherals, with the suite's own `Gateway` helper (tests/ble_gateway.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import os
import struct
import time
from pathlib import Path

import pytest

from tests.conftest import missing

if importlib.util.find_spec("bumble") is None:
    missing("bumble (the emulation extra) is not installed", module=True)

from bumble.core import UUID
from bumble.gatt import Characteristic, CharacteristicValue

from devices.ble import uuids
from devices.ble.current_time import decode_current_time, encode_current_time
from devices.ble.pulse_oximeter import decode_plx_continuous
from devices.errors import ProtocolError
from devices.identity import TimeSource
from firmware_bridge.ble.emulated_peripherals import (
    BloodPressureCuff,
    BpRecord,
    GlucoseMeter,
    GlucoseRecord,
    PulseOximeter,
)
from firmware_bridge.ble.link import LinkSettings
from tests.ble_gateway import Gateway

UTC = dt.timezone.utc
CUFF, OXI, GLUCO = "C0:00:00:00:0E:01", "C0:00:00:00:0E:03", "C0:00:00:00:0E:04"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def gw(tmp_path: Path):
    g = Gateway(tmp_path)
    yield g
    g.close()


# --------------------------------------------------------------------------------------------
# 1. The zone device clocks are read in is a fixed UTC offset, frozen when the service started.


@pytest.fixture
def berlin():
    """The gateway's system zone is Europe/Berlin (CET +01:00 in winter, CEST +02:00 in summer)."""
    if not Path("/usr/share/zoneinfo/Europe/Berlin").exists():
        missing("no IANA tz database (Debian package tzdata)")
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_device_clock_zone_follows_daylight_saving_time(berlin: None) -> None:
    """`run_ble` builds LinkSettings without a device_tz, so device wall clocks (Date Time has no
    zone) are read with `local_tz()`: datetime.now().astimezone().tzinfo, a *fixed* offset taken
    when the service started. A gateway started in winter reads a summer stamp from a device
    without Current Time (clock set by hand to the wall clock) one hour late, and vice versa:
    the reading lands an hour off - before the session (held) or after it (the previous
    patient's reading given to the next one)."""
    zone = LinkSettings().device_tz
    winter = zone.utcoffset(dt.datetime(2025, 1, 15, 10, 0))
    summer = zone.utcoffset(dt.datetime(2025, 7, 15, 10, 0))
    assert (winter, summer) == (dt.timedelta(hours=1), dt.timedelta(hours=2)), (
        f"device clocks read in a fixed zone {zone!r}: winter {winter}, summer {summer}"
    )


# --------------------------------------------------------------------------------------------
# 2. A glucose meter's stored records with an unusable clock are put on the current patient.


def test_stored_glucose_records_with_a_reset_clock_are_held_not_given_to_the_current_patient(gw: Gateway) -> None:
    """A glucose meter after a battery change (clock back at 2000-01-01, no Current Time Service)
    is downloaded over RACP for the first time: every record it sends is a *stored* record (we
    asked for the memory), taken by earlier patients on earlier days. Their stamps are implausible,
    so resolve_time gives them the receipt time (GATEWAY_RECEIPT) - which is after the current
    patient's session began, so ObservationStore hands the meter's whole history to today's
    patient. A stored record whose time is unknown must be held for the doctor, never guessed."""
    gw.allow(GLUCO)
    gw.store.context.set_patient("P-TODAY", "Today^Patient", now=dt.datetime.now(UTC) - dt.timedelta(hours=1))
    reset = dt.datetime(2000, 1, 1, 0, 0)  # the meter's clock after the battery change
    records = [GlucoseRecord(seq, 100 + seq, reset + dt.timedelta(hours=seq)) for seq in range(1, 4)]

    async def main() -> None:
        meter = GlucoseMeter(gw.new_radio(), GLUCO, "Glucose", records=records, current_time_service=False)
        await gw.run([meter], until=lambda: len(gw.events) == 3)

    asyncio.run(main())
    on_patient = [(o["patient_id"], o["quantities"][0]["value"], o["time_source"]) for o in gw.observations()]
    assert on_patient == [], f"stored meter records charted on today's patient: {on_patient}"
    assert len(gw.store.held()) == 3


# --------------------------------------------------------------------------------------------
# 3. PLX "data for demonstration / testing / calibration" values are stored as results.

# PLX Continuous Measurement (0x2A5F), GATT Specification Supplement 3.162:
#   Flags u8 (bit 2: Measurement Status present) | SpO2PR-Normal SpO2 SFLOAT | PR SFLOAT |
#   Measurement Status u16 (bit 10: Data for Demonstration, bit 11: Data for Testing,
#   bit 12: Calibration Ongoing)
DEMO_STATUS = 1 << 10
PLX_CONT_DEMO = bytes((0x04,)) + struct.pack("<HHH", 88, 60, DEMO_STATUS)  # SpO2 88 %, PR 60 /min, demo data


def test_plx_demo_bytes_decode_as_spelled() -> None:
    m = decode_plx_continuous(PLX_CONT_DEMO)
    assert [q.value for q in m.quantities] == [88.0, 60.0] and "data-for-demonstration" in m.flags


class DemoModeOximeter(PulseOximeter):
    """An oximeter left in demonstration mode for its first `demo` values (canned 88 %, flagged
    demo data), then measuring for real (97 %, no status): the real value is the marker that the
    link has digested every demo value before it (notifications are handled in order)."""

    demo: int = 5

    async def send_now(self, spo2: float | None = None, pulse: float | None = None) -> bool:
        if self.sent < self.demo:
            return await self.send(self.continuous, PLX_CONT_DEMO, indicate=False)
        return await super().send_now(97.0, 68.0)


def test_oximeter_demonstration_data_is_not_charted_as_the_patients_spo2(gw: Gateway) -> None:
    """pulse_oximeter.UNUSABLE lists the status bits that "mean the numbers must not be taken as a
    result" (demonstration, testing, calibration ongoing ...), but nothing uses it: the link skips
    only measurement-ongoing/unavailable/invalid, so a demo-mode oximeter's canned 88 % is stored
    on the current patient as a numeric SpO2 (FHIR status "final"; the flag only in a note)."""
    gw.allow(OXI)
    gw.store.context.set_patient("P-2", now=dt.datetime.now(UTC) - dt.timedelta(minutes=1))
    settings = LinkSettings(scan_pass_s=0.5, device_tz=UTC, continuous_store_interval_s=0.0)

    async def main() -> None:
        oxi = DemoModeOximeter(gw.new_radio(), OXI, "Oximeter", stream_interval_s=0.02)
        await gw.run(
            [oxi],
            until=lambda: any(o["quantities"][0]["value"] == 97.0 for o in gw.observations()),
            settings=settings,
        )

    asyncio.run(main())
    charted = [
        (o["patient_id"], q["code"], q["value"], o["flags"])
        for o in gw.observations()
        for q in o["quantities"]
        if q["value"] is not None and "data-for-demonstration" in o["flags"]
    ]
    assert charted == [], f"demonstration data stored as results: {charted[:2]}"


# --------------------------------------------------------------------------------------------
# 4. A Current Time the gateway cannot read stops it from *setting* the clock.

# Current Time (0x2A2B), GATT Specification Supplement 3.62: Exact Time 256 = Day Date Time
# (Date Time 7 bytes + Day of Week u8, 1 Monday .. 7 Sunday, 0 unknown) + Fractions256 u8;
# then Adjust Reason u8.


def wrong_weekday(value: bytes) -> bytes:
    """The same Current Time with a wrong (but in-range) Day of Week, as cheap clocks send."""
    dow = value[7]
    return value[:7] + bytes((dow % 7 + 1,)) + value[8:]


def test_wrong_weekday_bytes_are_refused_by_the_decoder() -> None:
    good = encode_current_time(dt.datetime(2025, 6, 2, 10, 0))  # a Monday
    with pytest.raises(ProtocolError, match="day"):
        decode_current_time(wrong_weekday(good))


class WrongWeekdayCuff(BloodPressureCuff):
    """A cuff whose Current Time reads with a wrong Day of Week (its write works)."""

    async def start(self) -> None:
        await super().start()
        ct_uuid = UUID.from_16_bits(uuids.CURRENT_TIME)
        (char,) = [a for a in self.device.gatt_server.attributes if isinstance(a, Characteristic) and a.uuid == ct_uuid]
        original = char.value
        char.value = CharacteristicValue(
            read=lambda _c: wrong_weekday(encode_current_time(self.clock.now().replace(microsecond=0))),
            write=original.write,
        )


def test_a_current_time_read_that_fails_to_decode_still_lets_the_gateway_set_the_clock(gw: Gateway) -> None:
    """link.DeviceSession._set_clock reads, decodes and writes in one try: the decode's
    ProtocolError (wrong weekday) skips the write, so a cuff whose clock is a year behind is
    never set - every reading it takes is stamped a year ago, passes as a plausible DEVICE_CLOCK
    time and is held instead of charted on the patient being examined (on every visit)."""
    gw.allow(CUFF)
    gw.store.context.set_patient("P-NOW", now=dt.datetime.now(UTC) - dt.timedelta(minutes=30))

    async def main() -> BloodPressureCuff:
        cuff = WrongWeekdayCuff(
            gw.new_radio(),
            CUFF,
            "Cuff",
            clock_offset=-dt.timedelta(days=365),
            memory=[BpRecord(128, 82, 97, 70, None)],  # just taken: stamped "now" on its clock when sent
        )
        await gw.run([cuff], until=lambda: len(gw.events) == 1)
        return cuff

    cuff = asyncio.run(main())
    assert cuff.clock.set_count == 1, "the gateway never wrote the current time"
    assert [o["patient_id"] for o in gw.observations()] == ["P-NOW"]


# --------------------------------------------------------------------------------------------
# 4. A device clock fast by less than the tolerance is believed: the previous patient's stored
#    reading lands on the patient checked in since.


def test_stored_reading_from_a_cuff_a_few_minutes_fast_is_not_given_to_the_next_patient(gw: Gateway) -> None:
    """The cuff's clock is 3 min fast (within `clock_tolerance_s`). Patient A measured 90 s ago
    and left; the doctor checked B in 60 s ago; the cuff connects now and sends A's stored reading,
    stamped 90 s *ahead* by its fast clock. The gateway read the cuff's Current Time at connect and
    knows it is 3 min fast: the reading was taken before B's check-in and must be held, with its
    corrected time, never charted on B."""
    gw.allow(CUFF)
    fast = dt.timedelta(minutes=3)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    gw.store.context.set_patient("P-B", "Patient^B", now=now - dt.timedelta(seconds=60))
    taken = now - dt.timedelta(seconds=90)  # true time of A's reading

    async def main() -> None:
        cuff = BloodPressureCuff(
            gw.new_radio(),
            CUFF,
            "Cuff 3 min fast",
            clock_offset=fast,
            memory=[BpRecord(150, 95, 113, 80, (taken + fast).replace(tzinfo=None))],
        )
        await gw.run([cuff], until=lambda: len(gw.events) == 1)

    asyncio.run(main())
    on_b = [(o["patient_id"], o["quantities"][0]["value"]) for o in gw.observations()]
    assert on_b == [], f"patient A's reading charted on the patient checked in after it: {on_b}"
    (held,) = gw.store.held()
    assert held.observation.time_source == TimeSource.DEVICE_CLOCK_CORRECTED
    assert abs(held.observation.measured_at - taken) < dt.timedelta(seconds=3)
