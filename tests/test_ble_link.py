"""End to end: the real bleak API (BleakScanner, BleakClient via bleak-retry-connector) talking
to bumble-emulated health devices over bumble's in-process link, into the outbox/clinic.db.

Plus a small hand-written fake for what the emulation never does: BlueZ's InProgress and
connection-abort errors on connect.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing

if importlib.util.find_spec("bumble") is None:
    missing("bumble (the emulation extra) is not installed", module=True)

from bleak.exc import BleakDBusError

from devices.identity import TimeSource
from firmware_bridge.ble.emulated_peripherals import (
    BloodPressureCuff,
    BpRecord,
    GlucoseMeter,
    GlucoseRecord,
    PulseOximeter,
    TemperatureRecord,
    Thermometer,
)
from firmware_bridge.ble.emulation import EmulatedBleakClient
from firmware_bridge.ble.link import BleDeviceManager, LinkSettings, scan_health_devices
from lastmile.clinic.devices import DeviceRegistry
from tests.ble_gateway import CapturedCuff, Gateway

UTC = dt.timezone.utc
CUFF, THERMO, OXI, GLUCO, STRANGER = (
    "C0:00:00:00:00:01",
    "C0:00:00:00:00:02",
    "C0:00:00:00:00:03",
    "C0:00:00:00:00:04",
    "C0:00:00:00:00:99",
)
pytestmark = pytest.mark.timeout(60)


def local_now() -> dt.datetime:
    return dt.datetime.now(UTC).replace(tzinfo=None, microsecond=0)


@pytest.fixture
def gw(tmp_path: Path):
    g = Gateway(tmp_path)
    yield g
    g.close()


def test_bp_cuff_indicates_three_stored_readings_then_hangs_up(gw: Gateway) -> None:
    now = local_now()
    gw.allow(CUFF)
    gw.store.context.set_patient("P-1", "Doe^Jane", now=dt.datetime.now(UTC) - dt.timedelta(hours=1))

    async def main() -> BloodPressureCuff:
        cuff = BloodPressureCuff(
            gw.new_radio(),
            CUFF,
            "BP cuff",
            model="BP-1",
            serial="S1",
            memory=[
                BpRecord(121, 81, 94, 70, now - dt.timedelta(minutes=50)),
                BpRecord(131, 85, 100, 72, now - dt.timedelta(minutes=20)),
                BpRecord(119, 77, 91, None, now - dt.timedelta(minutes=2)),
            ],
        )
        await gw.run(
            [cuff],
            until=lambda: len(gw.events) == 3 and cuff.connection is None and not gw.registry.get(CUFF).connected,
        )
        return cuff

    cuff = asyncio.run(main())

    obs = sorted(gw.observations(), key=lambda o: o["measured_at"])
    assert [[q["value"] for q in o["quantities"]][:2] for o in obs] == [[121, 81], [131, 85], [119, 77]]
    assert all(o["patient_id"] == "P-1" and o["time_source"] == "device-clock" for o in obs)
    assert obs[0]["device"] == {
        "manufacturer": "Lastmile Emulation",
        "model": "BP-1",
        "serial": "S1",
        "address": CUFF,
        "software_version": "1.0",
    }
    assert obs[2]["measured_at"] == (now - dt.timedelta(minutes=2)).replace(tzinfo=UTC).isoformat()
    assert [q["code"] for q in obs[2]["quantities"]] == ["systolic", "diastolic", "mean-arterial-pressure"]
    assert cuff.clock.set_count == 1  # the gateway wrote the current time
    status = gw.registry.get(CUFF)
    assert (status.connected, status.model, status.last_reading, status.last_error) == (
        False,
        "BP-1",
        "119/77 mm[Hg]",
        "",
    )


def test_thermometer(gw: Gateway) -> None:
    gw.allow(THERMO)

    async def main() -> None:
        thermo = Thermometer(gw.new_radio(), THERMO, "Thermo", memory=[TemperatureRecord(37.25, local_now())], site=3)
        await gw.run([thermo], until=lambda: len(gw.events) == 1)

    asyncio.run(main())
    (held,) = gw.store.held()  # no current patient: held for the doctor
    q = held.observation.quantities[0]
    assert (held.observation.kind, q.value, q.unit) == ("body-temperature", 37.25, "Cel")
    assert held.observation.time_source == TimeSource.DEVICE_CLOCK


@pytest.mark.parametrize(
    "interval_s,notifications,stored",
    [
        (3600.0, 40, 1),  # throttled: a whole stream within one interval is one observation, not 40
        (0.0, 8, 8),  # no throttle: every notification is a reading
    ],
    ids=["throttled", "every notification"],
)
def test_oximeter_streaming_continuous_notifications(
    gw: Gateway, interval_s: float, notifications: int, stored: int
) -> None:
    # Counts, not seconds: an interval far longer (or shorter) than any stream under load makes the
    # expected number of observations exact.
    gw.allow(OXI)
    gw.store.context.set_patient("P-2", now=dt.datetime.now(UTC) - dt.timedelta(minutes=1))
    settings = LinkSettings(scan_pass_s=0.5, device_tz=UTC, continuous_store_interval_s=interval_s)

    async def main() -> None:
        oxi = PulseOximeter(gw.new_radio(), OXI, "Oximeter", stream_interval_s=0.02, spo2=96, pulse=71)
        manager = await gw.run(
            [oxi],
            until=lambda: oxi.sent >= notifications and len(gw.observations()) >= stored,
            settings=settings,
            timeout=120.0,
        )
        assert manager.connected() == set()  # stopped cleanly

    asyncio.run(main())
    obs = gw.observations()
    assert len(obs) == stored or (interval_s == 0.0 and len(obs) >= stored), len(obs)
    assert {(o["kind"], o["quantities"][0]["value"], o["time_source"]) for o in obs} == {
        ("spo2", 96.0, "gateway-receipt")
    }
    assert len({o["record_key"] for o in obs}) == len(obs)


def test_glucose_meter_answers_racp_and_only_new_records_are_asked_for(gw: Gateway) -> None:
    gw.allow(GLUCO)
    now = local_now()
    records = [
        GlucoseRecord(seq, 90 + seq, now - dt.timedelta(hours=10 - seq), meal=1 if seq == 2 else None)
        for seq in range(1, 6)
    ]

    async def first() -> GlucoseMeter:
        meter = GlucoseMeter(gw.new_radio(), GLUCO, "Glucose", records=list(records))
        await gw.run([meter], until=lambda: len(gw.events) == 5)
        return meter

    meter = asyncio.run(first())
    assert meter.requests == [bytes.fromhex("0101")]  # nothing stored yet: all records
    assert gw.registry.get(GLUCO).last_sequence == 5
    held = {h.observation.quantities[0].value: h.observation for h in gw.store.held()}
    assert sorted(held) == [91.0, 92.0, 93.0, 94.0, 95.0]
    assert "meal-preprandial" in held[92.0].flags

    async def second() -> GlucoseMeter:
        # Later: two new records; the gateway asks only for sequence >= 6.
        meter = GlucoseMeter(
            gw.new_radio(),
            GLUCO,
            "Glucose",
            records=records
            + [
                GlucoseRecord(6, 120, now - dt.timedelta(minutes=30)),
                GlucoseRecord(7, 130, now - dt.timedelta(minutes=5)),
            ],
        )
        await gw.run([meter], until=lambda: len(gw.events) == 7)
        return meter

    meter2 = asyncio.run(second())
    assert meter2.requests == [bytes.fromhex("0103010600")]
    assert gw.registry.get(GLUCO).last_sequence == 7
    assert len(gw.store.held()) == 7


def test_device_requiring_pairing_is_bonded(gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    gw.allow(THERMO)
    caplog.set_level(logging.INFO, logger="firmware_bridge.ble.link")

    async def main(celsius: float, expected_events: int) -> None:
        thermo = Thermometer(
            gw.new_radio(),
            THERMO,
            "Secure thermo",
            require_pairing=True,
            memory=[TemperatureRecord(celsius, local_now())],
        )
        await gw.run([thermo], until=lambda: len(gw.events) == expected_events)

    asyncio.run(main(36.4, 1))
    assert gw.registry.get(THERMO).pair_required  # found out by itself: next time, bond before subscribing
    asyncio.run(main(37.1, 2))  # second connection: bonded at connect (pair=True), no refused subscribe
    assert sum("requires pairing" in r.message for r in caplog.records) == 1
    assert sorted(h.observation.quantities[0].value for h in gw.store.held()) == [36.4, 37.1]


def test_glucose_download_interrupted_resumes_after_the_last_stored_record(gw: Gateway) -> None:
    gw.allow(GLUCO)
    now = local_now()

    async def main() -> GlucoseMeter:
        meter = GlucoseMeter(
            gw.new_radio(),
            GLUCO,
            "Glucose",
            drop_after=3,
            records=[GlucoseRecord(seq, 100 + seq, now - dt.timedelta(hours=6 - seq)) for seq in range(1, 6)],
        )
        await gw.run([meter], until=lambda: len(gw.events) == 5)
        return meter

    meter = asyncio.run(main())
    assert meter.connections == 2 and meter.requests == [bytes.fromhex("0101"), bytes.fromhex("0103010400")]
    assert [c for _, c in gw.events] == [True] * 5  # nothing twice
    assert gw.registry.get(GLUCO).last_sequence == 5


def test_device_not_on_the_allow_list_is_ignored(gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    gw.allow(THERMO)
    caplog.set_level(logging.INFO, logger="firmware_bridge.ble.link")

    async def main() -> BloodPressureCuff:
        radio = gw.new_radio()
        stranger = BloodPressureCuff(
            radio, STRANGER, "Neighbour's cuff", memory=[BpRecord(150, 95, 113, 80, local_now())]
        )
        thermo = Thermometer(radio, THERMO, "Thermo", memory=[TemperatureRecord(36.9, local_now())])
        await gw.run(
            [stranger, thermo],
            until=lambda: (
                len(gw.events) == 1 and any("ignoring C0:00:00:00:00:99" in r.message for r in caplog.records)
            ),
        )
        return stranger

    stranger = asyncio.run(main())
    assert stranger.connections == 0
    assert [a for a, _ in gw.events] == [THERMO]
    assert gw.registry.get(STRANGER) is None


def test_disconnect_mid_transfer_reconnect_no_duplicates(gw: Gateway) -> None:
    gw.allow(CUFF)
    now = local_now()

    async def main() -> BloodPressureCuff:
        cuff = BloodPressureCuff(
            gw.new_radio(),
            CUFF,
            "Flaky cuff",
            drop_after=2,
            memory=[BpRecord(120 + i, 80, 93, 70, now - dt.timedelta(minutes=10 - i)) for i in range(3)],
        )
        await gw.run([cuff], until=lambda: cuff.connections >= 2 and cuff.connection is None and len(gw.events) == 5)
        return cuff

    cuff = asyncio.run(main())
    assert cuff.dropped
    created = [c for _, c in gw.events]
    assert created == [True, True, False, False, True]  # the second connection re-sent the first two
    assert sorted(h.observation.quantities[0].value for h in gw.store.held()) == [120, 121, 122]


def test_device_clock_wrong_by_a_year_is_corrected_and_recorded_as_such(gw: Gateway) -> None:
    gw.allow(CUFF)
    year = dt.timedelta(days=365)
    now = local_now()

    async def main() -> BloodPressureCuff:
        cuff = BloodPressureCuff(
            gw.new_radio(),
            CUFF,
            "Cuff after battery change",
            clock_offset=-year,
            memory=[
                BpRecord(140, 90, 107, 75, now - year - dt.timedelta(hours=3)),  # stamped by its wrong clock
                BpRecord(135, 88, 104, 74, now - year - dt.timedelta(minutes=5)),
            ],
        )
        await gw.run([cuff], until=lambda: len(gw.events) == 2)
        return cuff

    cuff = asyncio.run(main())
    held = sorted((h.observation for h in gw.store.held()), key=lambda o: o.measured_at)
    assert [o.time_source for o in held] == [TimeSource.DEVICE_CLOCK_CORRECTED] * 2
    for o, ago in zip(held, (dt.timedelta(hours=3), dt.timedelta(minutes=5))):
        assert abs(o.measured_at - (now - ago).replace(tzinfo=UTC)) < dt.timedelta(seconds=3)
    assert abs(cuff.clock.offset) < dt.timedelta(seconds=2)  # and its clock is right now


class FlakyBlueZClient(EmulatedBleakClient):
    """BlueZ's answers the emulation never gives: a connect already in progress, then an abort;
    and a device that always aborts."""

    failures: list[Exception] = []
    always_failing = STRANGER

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        if self.address == self.always_failing:
            raise BleakDBusError("org.bluez.Error.Failed", ["le-connection-abort-by-local"])
        if self.failures:
            raise self.failures.pop(0)
        await super().connect(pair, **kwargs)


def test_bluez_connect_failures_are_retried_and_a_failing_device_stops_nobody(gw: Gateway) -> None:
    gw.allow(CUFF, STRANGER)
    failures: list[Exception] = [
        BleakDBusError("org.bluez.Error.InProgress", ["In Progress"]),
        BleakDBusError("org.bluez.Error.Failed", ["le-connection-abort-by-local"]),
    ]

    def stranger_failed() -> bool:
        record = gw.registry.get(STRANGER)
        return bool(record and record.last_error)

    async def main() -> None:
        radio = gw.new_radio()
        flaky = type("Flaky", (FlakyBlueZClient,), {"radio": radio, "failures": failures})
        cuff = BloodPressureCuff(radio, CUFF, "Cuff", memory=[BpRecord(125, 82, 96, 68, local_now())])
        broken = Thermometer(radio, STRANGER, "Always failing", memory=[TemperatureRecord(37.0, local_now())])
        await gw.run(
            [cuff, broken], client_backend=flaky, timeout=30, until=lambda: len(gw.events) == 1 and stranger_failed()
        )

    asyncio.run(main())
    assert failures == []  # both BlueZ errors happened and were retried
    assert gw.store.held()[0].observation.quantities[0].value == 125
    error = gw.registry.get(STRANGER).last_error
    assert "le-connection-abort-by-local" in error and "Failed to connect" in error
    assert gw.registry.get(CUFF).last_error == ""


def test_a_radio_that_cannot_scan_is_retried_quietly_and_its_reading_still_arrives(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """No adapter yet (or BlueZ restarting): the link stays up and tries again with a capped
    backoff; the fault is told to the service (STATUS=) once per change and logged when it starts
    and ends, not once per try; when the radio comes, the cuff's reading is taken as usual."""
    gw.allow(CUFF)
    faults: list[str | None] = []
    refusals = [OSError(2, "No such file or directory")] * 4

    async def main() -> None:
        radio = gw.new_radio()
        emulated_scanner, _client = radio.backends()

        class NoRadioYet(emulated_scanner):  # type: ignore[misc, valid-type]
            async def start(self) -> None:
                if refusals:
                    raise refusals.pop()
                await super().start()

        cuff = BloodPressureCuff(radio, CUFF, "Cuff", memory=[BpRecord(131, 84, 99, 72, local_now())])
        settings = LinkSettings(scan_pass_s=0.05, radio_retry_max_s=0.2, reconnect_delay_s=0.2, device_tz=UTC)
        await gw.run(
            [cuff], scanner_backend=NoRadioYet, radio_listener=faults.append, settings=settings, until=lambda: gw.events
        )

    with caplog.at_level(logging.DEBUG, logger="firmware_bridge.ble.link"):
        asyncio.run(main())
    assert refusals == [] and gw.store.held()[0].observation.quantities[0].value == 131
    assert len(faults) == 5 and faults[-1] is None and len(set(faults[:4])) == 1
    assert "the system D-Bus or BlueZ is not running" in str(faults[0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "radio" in r.getMessage()]
    assert len(warnings) == 2
    assert warnings[0].startswith("Bluetooth radio not usable: FileNotFoundError: [Errno 2]")
    assert warnings[1] == "Bluetooth radio usable again after 4 failed tries"


def test_a_radio_that_cannot_scan_is_tried_less_and_less_often_up_to_a_cap(caplog: pytest.LogCaptureFixture) -> None:
    """Doubling from the scan pass to the cap, never past it; after the first, only every
    RADIO_LOG_EVERY-th failure reaches the journal (a day without an adapter: ~24 lines, not 8,640)."""
    from firmware_bridge.ble.link import RADIO_LOG_EVERY

    manager = BleDeviceManager(port=None, settings=LinkSettings(scan_pass_s=10.0, radio_retry_max_s=60.0))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="firmware_bridge.ble.link"):
        waits = [manager.radio_failed(OSError(2, "gone")) for _ in range(2 * RADIO_LOG_EVERY)]
    assert waits[:5] == [10.0, 20.0, 40.0, 60.0, 60.0] and max(waits) == 60.0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[1].startswith(f"Bluetooth radio still not usable after {RADIO_LOG_EVERY} tries")


def test_scan_lists_health_devices(gw: Gateway) -> None:
    async def main() -> list:
        radio = gw.new_radio()
        cuff = BloodPressureCuff(radio, CUFF, "BP cuff")
        oxi = PulseOximeter(radio, OXI, "Oximeter")
        await radio.start()
        await cuff.start()
        await oxi.start()
        scanner, _ = radio.backends()
        try:
            return await scan_health_devices(1.5, backend=scanner)  # adverts every 0.1 s: room for a loaded machine
        finally:
            await cuff.stop()
            await oxi.stop()

    found = {r.address: r for r in asyncio.run(main())}
    assert found[CUFF].services == ("Blood Pressure",) and found[CUFF].name == "BP cuff"
    assert found[OXI].services == ("Pulse Oximeter",)


# A two-user cuff's stored readings as it indicates them (flags 0x1E: time stamp, pulse rate, user
# ID and measurement status present; mmHg): 128/84 (MAP 99) pulse 72 of user 1 at 2026-12-06
# 08:00:00, then 151/97 (MAP 115) pulse 80 of user 2 at 08:05:00.
BP_USER_1 = bytes.fromhex("1e800054006300ea070c060800004800010000")
BP_USER_2 = bytes.fromhex("1e970061007300ea070c060805005000020000")


def _record_captured(gw: Gateway, captured: tuple[bytes, ...], received: dt.datetime) -> None:
    """The captured bytes through the real link and port, the gateway's clock at `received`."""
    gw.clock = lambda: received
    gw.allow(CUFF)

    async def main() -> None:
        cuff = CapturedCuff(gw.new_radio(), CUFF, "BP cuff", current_time_service=False, captured=captured)
        await gw.run([cuff], until=lambda: len(gw.events) == len(captured))

    asyncio.run(main())


def test_captured_two_user_cuff_user_1_is_the_checked_in_patients_user_2_is_held(gw: Gateway) -> None:
    """Both readings arrive while P-1 is checked in, and nobody has said whose user 1 or 2 of this
    cuff is. User 1 is what a cuff without user buttons always sends: it is the checked-in
    patient's, as for any cuff. User 2 is certainly someone else: never put on P-1, held for the
    doctor with the user the cuff named."""
    gw.store.context.set_patient("P-1", "Doe^Jane", now=dt.datetime(2026, 12, 6, 7, 0, tzinfo=UTC))
    received = dt.datetime(2026, 12, 6, 8, 6, tzinfo=UTC)
    _record_captured(gw, (BP_USER_1, BP_USER_2), received)
    assert [[q["value"] for q in o["quantities"]][:2] for o in gw.observations() if o["patient_id"] == "P-1"] == [
        [128, 84]
    ]
    assert [(h.observation.device_user, h.observation.quantity("systolic").value) for h in gw.store.held()] == [
        (2, 151)
    ]


def test_a_mapping_for_user_1_overrides_the_checked_in_patient(gw: Gateway) -> None:
    """A family's cuff: user 1 is P-HOME, whoever is checked in. Its reading goes to P-HOME, not
    to P-1 on the examination couch."""
    gw.store.context.set_patient("P-1", "Doe^Jane", now=dt.datetime(2026, 12, 6, 7, 0, tzinfo=UTC))
    gw.store.device_users.map_user(CUFF, 1, "P-HOME", now=dt.datetime(2026, 12, 6, 7, 0, tzinfo=UTC))
    _record_captured(gw, (BP_USER_1,), dt.datetime(2026, 12, 6, 8, 6, tzinfo=UTC))
    assert [o["patient_id"] for o in gw.observations()] == ["P-HOME"]


def test_a_two_user_cuff_puts_no_user_on_another_users_patient(gw: Gateway) -> None:
    """Patient P-1 is checked in and measured as user 1 of the cuff (the default: no mapping);
    the cuff's memory also holds readings of users 2 and 3 (someone else at home or in the
    queue). They must not land on P-1: held for the doctor, showing their user, until someone
    says whose user 2 is."""
    now = local_now()
    gw.allow(CUFF)
    checked_in = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    gw.store.context.set_patient("P-1", "Doe^Jane", now=checked_in)

    async def main() -> None:
        cuff = BloodPressureCuff(
            gw.new_radio(),
            CUFF,
            "BP cuff",
            memory=[
                BpRecord(128, 84, 99, 72, now - dt.timedelta(minutes=10), user_id=1),
                BpRecord(151, 97, 115, 80, now - dt.timedelta(minutes=5), user_id=2),
                BpRecord(117, 76, 90, 64, now - dt.timedelta(minutes=3), user_id=3),
            ],
        )
        await gw.run([cuff], until=lambda: len(gw.events) == 3)

    asyncio.run(main())

    on_p1 = [[q["value"] for q in o["quantities"]][:2] for o in gw.observations() if o["patient_id"] == "P-1"]
    assert on_p1 == [[128, 84]]
    held = sorted(gw.store.held(), key=lambda h: h.observation.measured_at)
    assert [(h.observation.device_user, h.observation.quantity("systolic").value) for h in held] == [(2, 151), (3, 117)]

    # The doctor says user 2 of this cuff is P-2: from then on user 2's readings are P-2's.
    # (A reading measured before that stays held: it may be user 2's previous owner's.)
    mapped_at = dt.datetime.now(UTC)
    gw.store.device_users.map_user(CUFF, 2, "P-2", now=mapped_at)
    later = replace(
        held[0].observation,
        record_key="ble:test:later",
        patient_id=None,
        measured_at=mapped_at + dt.timedelta(minutes=1),
    )
    assert gw.store.record(later, now=mapped_at + dt.timedelta(minutes=1)).patient_id == "P-2"


def test_a_device_unpaired_while_connected_is_disconnected_and_nothing_more_is_stored(
    gw: Gateway, tmp_path: Path
) -> None:
    """`lastmile ble unpair` (its own clinic.db connection, as the command has) while an oximeter
    streams: from then on none of its readings is stored, and the gateway hangs up on it."""
    gw.allow(OXI)
    gw.store.context.set_patient("P-3", now=dt.datetime.now(UTC) - dt.timedelta(minutes=1))
    unpaired: dict[str, int] = {}
    command = DeviceRegistry.open(tmp_path)

    async def main() -> PulseOximeter:
        oxi = PulseOximeter(gw.new_radio(), OXI, "Oximeter", stream_interval_s=0.02, readvertise=True)

        async def unpair_after_two_readings() -> None:
            if not unpaired and len(gw.observations()) >= 2:
                assert command.disallow(OXI, now=dt.datetime.now(UTC))
                unpaired.update(stored=len(gw.observations()), sent=oxi.sent)

        def hung_up_or_kept_streaming() -> bool:
            if not unpaired:
                return False
            gone = oxi.connection is None and not gw.registry.get(OXI).connected
            return gone or oxi.sent >= unpaired["sent"] + 150  # ~3 s of readings after the unpair

        await gw.run([oxi], until=hung_up_or_kept_streaming, during=unpair_after_two_readings, timeout=60.0)
        return oxi

    try:
        oxi = asyncio.run(main())
    finally:
        command.close()
    assert len(gw.observations()) == unpaired["stored"], "readings stored after the unpair"
    assert oxi.connection is None and oxi.connections == 1  # hung up on, and not connected again
    record = gw.registry.get(OXI)
    assert record.removed and not record.connected


class CancelDroppingClient(EmulatedBleakClient):
    """Its first read answers just as the session is cancelled, and the answer wins: what a library
    awaiting with Python 3.11's `asyncio.wait_for` does when a cancel races the result."""

    reading: asyncio.Event  # set once the first read waits

    async def read_gatt_char(self, characteristic: Any, **kwargs: Any) -> bytearray:
        answer = await super().read_gatt_char(characteristic, **kwargs)
        if self.reading.is_set():
            return answer
        self.reading.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # the cancel lost
        return answer


def test_a_stop_during_set_up_ends_the_session_of_a_device_that_never_hangs_up(gw: Gateway) -> None:
    """The BLE service was stopped (or the oximeter unpaired) while the link was still setting the
    oximeter up, and the cancel got lost in a GATT request: the session went on, subscribed, and
    waited for a hang-up the streaming oximeter never makes - the stop hung (systemd's kill after
    its timeout). Now a session cancelled during set-up ends after it, and disconnects."""
    gw.allow(OXI)

    async def main() -> PulseOximeter:
        radio = gw.new_radio()
        reading = asyncio.Event()
        client = type("Dropping", (CancelDroppingClient,), {"radio": radio, "reading": reading})
        oxi = PulseOximeter(radio, OXI, "Oximeter", stream_interval_s=0.05)
        await asyncio.wait_for(gw.run([oxi], client_backend=client, until=reading.is_set), 20)
        return oxi

    oxi = asyncio.run(main())
    assert oxi.connection is None and not gw.registry.get(OXI).connected


@pytest.mark.parametrize(
    "paired_as,shown_as",
    [("血压计 1号诊室", "血压计 1号诊室"), ("", "BP cuff")],
    ids=["named at pairing", "unnamed pairing"],
)
def test_the_name_given_at_pairing_wins_over_the_one_the_device_advertises(
    gw: Gateway, paired_as: str, shown_as: str
) -> None:
    gw.registry.allow(CUFF, name=paired_as, now=dt.datetime.now(UTC))  # as `lastmile ble pair --name` and the console

    async def main() -> None:
        cuff = BloodPressureCuff(gw.new_radio(), CUFF, "BP cuff", memory=[BpRecord(121, 81, 94, 70, local_now())])
        await gw.run([cuff], until=lambda: len(gw.events) == 1 and not gw.registry.get(CUFF).connected)

    asyncio.run(main())
    record = gw.registry.get(CUFF)
    # the doctor tells which room's cuff it is by the name given; the technician still sees what it advertises
    assert record.name == shown_as
    assert record.advertised_name == "BP cuff"
