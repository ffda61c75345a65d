"""The BLE link: find the clinic's paired health devices, connect, and turn what they send into
observations - one asyncio task per device, so one failing device never stops the others.

Per connection (`DeviceSession`):

1. connect with bleak-retry-connector's `establish_connection` (BlueZ on a Pi: "InProgress",
   "le-connection-abort-by-local" and friends are retried with its backoffs), bonding first if
   the device is known to need it;
2. read Device Information (manufacturer, model, serial, firmware) for the device identity;
3. Current Time, when offered: read it (device clock minus ours = the clock's error), then
   write ours so the device's next readings are right;
4. subscribe to every measurement characteristic it has (bonding and retrying once if the
   device answers "insufficient authentication/encryption");
5. glucose meters: RACP "report records with sequence >= last stored + 1"; the last stored
   sequence is kept by the gateway per device and only advanced once a record is stored;
   BP cuffs and thermometers indicate their memory by themselves once subscribed;
6. stay connected until the device hangs up (or we stop, or it is unpaired: nothing more is stored),
   keeping its Battery Level current meanwhile (`BatteryWatch`).

Each value is decoded (`devices.ble.registry`), its time resolved (`devices.ble.clock`: device
clock if plausible, corrected when we measured its error, else our receipt time), keyed
(`devices.ble.measurement.record_key`: re-sent memory gives the same key) and handed to the
`GatewayPort.store`, which makes it durable before returning. Live values (intermediate cuff
pressure/temperature) are not stored; they only measure the device clock. Continuous SpO2 is
stored at most every `continuous_store_interval_s`.

The gateway side (allow-list, storage, device status) is behind `GatewayPort`, so this module
imports only `devices` and bleak.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakDBusError, BleakError, BleakGATTProtocolError
from bleak_retry_connector import establish_connection

from devices.ble import registry, uuids
from devices.ble.battery import LOW_BATTERY_PERCENT, decode_battery_level
from devices.ble.clock import ClockCheck, measure_offset, resolve_time
from devices.ble.current_time import CurrentTime, encode_current_time
from devices.ble.device_information import STRING_CHARACTERISTICS, device_identity
from devices.ble.glucose import GlucoseContext, with_context
from devices.ble.measurement import Measurement, record_key, to_observation
from devices.ble.pulse_oximeter import UNUSABLE
from devices.ble.racp import RacpClient, RacpResult
from devices.ble.uuids import full_uuid, short_uuid
from devices.device_errors import MALFORMED, NOT_A_RESULT, DeviceProblem
from devices.errors import ProtocolError
from devices.identity import DeviceIdentity
from devices.observation import Observation
from firmware_bridge.errors import SessionEnded
from firmware_bridge.zone import system_zone

log = logging.getLogger(__name__)

HEALTH_SERVICE_UUIDS = [full_uuid(u) for u in uuids.HEALTH_SERVICES]
# Subscribed in this order: glucose records and context before the RACP that asks for them.
SUBSCRIBED = (
    uuids.GLUCOSE_MEASUREMENT,
    uuids.GLUCOSE_MEASUREMENT_CONTEXT,
    uuids.RECORD_ACCESS_CONTROL_POINT,
    uuids.BLOOD_PRESSURE_MEASUREMENT,
    uuids.INTERMEDIATE_CUFF_PRESSURE,
    uuids.TEMPERATURE_MEASUREMENT,
    uuids.INTERMEDIATE_TEMPERATURE,
    uuids.PLX_SPOT_CHECK_MEASUREMENT,
    uuids.PLX_CONTINUOUS_MEASUREMENT,
    uuids.WEIGHT_MEASUREMENT,
)
AUTH_ERROR_CODES = {0x05, 0x0C, 0x0F}  # insufficient authentication / key size / encryption
AUTH_DBUS_HINTS = ("NotPermitted", "NotAuthorized", "Insufficient", "AuthenticationFailed")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A fact about a device for the gateway's device list; None/False fields say nothing."""

    address: str
    connected: bool | None = None
    seen: bool = False
    error: str | None = None
    problem: DeviceProblem = DeviceProblem.OTHER  # the kind of `error`, what the doctor is told
    identity: DeviceIdentity | None = None
    name: str | None = None  # the name it advertises (the gateway keeps the one it was paired by)
    # 16-bit SIG UUIDs of the services it advertised (seen) or offers (connected): a cuff called
    # by its model number is still known by its Blood Pressure service before its first reading
    services: frozenset[int] = frozenset()
    battery_level: int | None = None  # percent, as its Battery Level said (at connect, then as it changes)


class GatewayPort(Protocol):
    """What the link needs from the gateway. Calls are short and synchronous (SQLite)."""

    def allowed_devices(self) -> dict[str, bool]:
        """Allow-listed addresses (upper case) -> whether to bond before using them."""

    def is_allowed(self, address: str) -> bool:
        """Whether `address` is on the allow-list now (asked before each reading is stored)."""

    def store(self, observation: Observation) -> bool:
        """Make `observation` durable; False if its record key was already known."""

    def report(self, status: DeviceStatus) -> None: ...

    def last_sequence(self, address: str) -> int | None: ...

    def set_last_sequence(self, address: str, sequence: int) -> None: ...

    def note_pair_required(self, address: str) -> None: ...

    def battery_written(self, address: str) -> tuple[int, float] | None:
        """The Battery Level its row holds and how many seconds ago it was written (None: none)."""


@dataclass(frozen=True)
class LinkSettings:
    scan_pass_s: float = 10.0  # scanner restarted and allow-list re-read this often
    connect_attempts: int = 4
    racp_timeout_s: float = 30.0
    reconnect_delay_s: float = 2.0  # after a device hung up normally
    retry_backoff_s: float = 5.0  # after a failed session, doubling ...
    retry_backoff_max_s: float = 120.0  # ... up to this
    radio_retry_max_s: float = 60.0  # a radio that cannot scan is tried again after scan_pass_s, doubling up to this
    continuous_store_interval_s: float = 10.0  # continuous SpO2: one observation per interval
    clock_tolerance_s: float = 300.0  # how far ahead of its receipt an unmeasured device clock's stamp is believed
    # A device connected for days: its Battery Level is re-read this often when it cannot notify;
    # a level within 1 point of the one written is written to clinic.db again at most every
    # battery_refresh_s (the SD card), a bigger change or a drop to low at once (`BatteryWatch`).
    battery_poll_s: float = 600.0
    battery_refresh_s: float = 1800.0
    # The zone device clocks are set to: an IANA zone, so each stamp is read with the UTC offset
    # of its own date (a fixed offset taken at start would be an hour off across a DST change).
    device_tz: dt.tzinfo = field(default_factory=system_zone)


class DeviceSession:
    """One connection to one device, from connect to hang-up."""

    def __init__(
        self,
        manager: BleDeviceManager,
        ble_device: BLEDevice,
        pair_required: bool,
        advertised: frozenset[int] = frozenset(),
    ) -> None:
        self.m = manager
        self.port = manager.port
        self.s = manager.settings
        self.ble_device = ble_device
        self.address = ble_device.address.upper()
        self.pair_required = pair_required
        self.advertised = advertised  # the SIG services it advertised when seen
        self.paired = False
        self.client: BleakClient | None = None
        self.identity = DeviceIdentity(address=self.address)
        self.clock = ClockCheck()
        self.racp = RacpClient()
        self._racp_result: asyncio.Future[RacpResult] | None = None
        self._pending_glucose: dict[int, tuple[Measurement, dt.datetime]] = {}
        self._sequence_broken = False  # a record failed to store: stop advancing the last sequence
        self._last_continuous: float | None = None
        self._gone = asyncio.Event()
        self.stored = 0
        self.duplicates = 0
        self.unusable: Counter[str] = Counter()  # readings not stored, by the status that made them so
        self.battery = BatteryWatch(self.s.battery_refresh_s)
        self._battery_poll: asyncio.Task[None] | None = None
        self._battery_awaits_bonding = False  # its notifications were refused for want of bonding

    # -- the session ------------------------------------------------------------------------
    async def run(self) -> None:
        written = self.port.battery_written(self.address)
        if written is not None:  # a cuff connecting once per reading: its unchanged level is no news
            level, age_s = written
            self.battery.seed(level, time.monotonic() - age_s)
        self.port.report(DeviceStatus(self.address, seen=True, name=self.ble_device.name, services=self.advertised))
        kwargs: dict[str, Any] = {}
        if self.m.client_backend is not None:
            kwargs["backend"] = self.m.client_backend
        self.client = await establish_connection(
            self.m.client_class,
            self.ble_device,
            self.ble_device.name or self.address,
            disconnected_callback=lambda _c: self._gone.set(),
            max_attempts=self.s.connect_attempts,
            pair=self.pair_required,
            **kwargs,
        )
        self.paired = self.pair_required
        try:
            log.info("%s: connected", self.address)
            offered = sig_services(service.uuid for service in self.client.services)
            self.port.report(DeviceStatus(self.address, connected=True, services=offered))
            try:
                self.identity = await self._read_identity()
                self.port.report(DeviceStatus(self.address, identity=self.identity))
                await self._read_battery()
                await self._watch_battery()
                await self._set_clock()
                await self._subscribe_all()
                if self._char(uuids.RECORD_ACCESS_CONTROL_POINT) is not None:
                    await self._download_records()
            except BleakError:
                if not self._gone.is_set():
                    raise
                # A cuff that has sent its memory hangs up, even while we are still subscribing.
                log.info("%s: device hung up during set-up", self.address)
            _end_if_cancelled()
            await self._gone.wait()
            log.info(
                "%s: disconnected (%d stored, %d already known, %d not results%s)",
                self.address,
                self.stored,
                self.duplicates,
                sum(self.unusable.values()),
                "".join(f"; {n} {why}" for why, n in self.unusable.items()),
            )
        finally:
            if self._battery_poll is not None:
                self._battery_poll.cancel()
            try:
                self._flush_glucose()  # records whose context never came are still records
            except Exception:
                log.exception("%s: could not store the last glucose records", self.address)
            client, self.client = self.client, None
            if client is not None and client.is_connected:
                try:
                    await asyncio.wait_for(client.disconnect(), 10)
                except (TimeoutError, BleakError, OSError):
                    log.debug("%s: disconnect failed", self.address, exc_info=True)
            self.port.report(DeviceStatus(self.address, connected=False))

    def _char(self, uuid16: int) -> BleakGATTCharacteristic | None:
        assert self.client is not None
        return self.client.services.get_characteristic(full_uuid(uuid16))

    async def _read(self, uuid16: int) -> bytes | None:
        char = self._char(uuid16)
        if char is None or "read" not in char.properties:
            return None
        assert self.client is not None
        return bytes(await self.client.read_gatt_char(char))

    async def _read_identity(self) -> DeviceIdentity:
        strings: dict[int, str] = {}
        for uuid16, what in STRING_CHARACTERISTICS.items():
            try:
                raw = await self._read(uuid16)
                if raw is not None:
                    decoded = registry.decode(uuid16, raw)
                    assert isinstance(decoded, str)
                    strings[uuid16] = decoded
            except (ProtocolError, BleakGATTProtocolError) as exc:
                log.warning("%s: %s unreadable: %s", self.address, what, exc)
        return device_identity(self.address, strings)

    async def _read_battery(self) -> None:
        """Its charge, when it offers a readable Battery Level: the Devices page says it, and a
        cuff's flat battery is seen before it dies mid-clinic. A value that makes no sense is logged."""
        try:
            raw = await self._read(uuids.BATTERY_LEVEL)
        except BleakGATTProtocolError as exc:
            log.warning("%s: Battery Level unreadable: %s", self.address, exc)
            return
        if raw is not None:
            self._on_battery(raw)

    def _on_battery(self, raw: bytes | bytearray) -> None:
        """A Battery Level read or notified: reported when `BatteryWatch` says it is news."""
        try:
            level = decode_battery_level(bytes(raw))
        except ProtocolError as exc:
            log.warning("%s: Battery Level unreadable: %s", self.address, exc)
            return
        if self.battery.is_news(level, time.monotonic()):
            self.port.report(DeviceStatus(self.address, battery_level=level))

    def _on_battery_notified(self, data: bytearray) -> None:
        try:
            self._on_battery(data)
        except Exception:
            log.exception("%s: could not record its Battery Level", self.address)

    async def _watch_battery(self) -> None:
        """Keep its charge current while connected (a BP monitor stays connected for days): its
        notifications when Battery Level offers them (Battery Service), else a re-read every
        `battery_poll_s`. A device that refuses the subscription is re-read instead; one that
        refuses it for want of bonding is asked again once `_bond` has bonded (in this connection:
        it may stay connected for days, and at the next connect it is bonded first anyway)."""
        char = self._char(uuids.BATTERY_LEVEL)
        if char is None:
            return
        assert self.client is not None
        if "notify" in char.properties:
            try:
                await self.client.start_notify(char, lambda _sender, data: self._on_battery_notified(data))
            except (TimeoutError, BleakError) as exc:
                # any failure: the battery is a nicety, the measurements subscribed after it are not
                log.info("%s: Battery Level notifications refused (%s); re-reading it instead", self.address, exc)
                self._battery_awaits_bonding = not self.paired and _needs_bonding(exc)
            else:
                if self._battery_poll is not None:
                    self._battery_poll.cancel()
                    self._battery_poll = None
                return
        if "read" in char.properties and self._battery_poll is None:
            self._battery_poll = asyncio.get_running_loop().create_task(self._poll_battery())

    async def _poll_battery(self) -> None:
        while not self._gone.is_set():
            await asyncio.sleep(self.s.battery_poll_s)
            try:
                await self._read_battery()
            except BleakError as exc:  # the link going: the session ends on its own
                log.debug("%s: Battery Level re-read failed: %s", self.address, exc)
            except Exception:
                log.exception("%s: could not record its Battery Level", self.address)

    async def _set_clock(self) -> None:
        """Measure the device clock's error, then set it (Current Time Service, when offered)."""
        char = self._char(uuids.CURRENT_TIME)
        if char is None:
            return
        assert self.client is not None
        # Reading and setting are independent: a Current Time we cannot decode (a wrong day of
        # week, a reserved bit) must not stop us from setting the clock right.
        try:
            raw = await self._read(uuids.CURRENT_TIME)
            if raw is not None:
                gateway_now = self.m.clock()
                ct = registry.decode(uuids.CURRENT_TIME, raw)
                assert isinstance(ct, CurrentTime)
                if ct.local_time is not None:
                    offset = measure_offset(ct.local_time, gateway_now, self.s.device_tz)
                    self.clock = ClockCheck(offset=offset)
                    log.info("%s: device clock off by %+.0f s", self.address, offset.total_seconds())
        except (ProtocolError, BleakGATTProtocolError) as exc:
            log.warning("%s: current time not readable (setting it anyway): %s", self.address, exc)
        if "write" not in char.properties:
            return
        try:
            now = self.m.clock()
            await self.client.write_gatt_char(
                char, encode_current_time(now.astimezone(self.s.device_tz).replace(tzinfo=None)), response=True
            )
            self.clock = ClockCheck(offset=self.clock.offset, set_at=now)
        except (ProtocolError, BleakGATTProtocolError) as exc:
            log.warning("%s: current time not settable: %s", self.address, exc)

    async def _subscribe_all(self) -> None:
        assert self.client is not None
        for uuid16 in SUBSCRIBED:
            char = self._char(uuid16)
            if char is None or not {"notify", "indicate"} & set(char.properties):
                continue

            def callback(_sender: BleakGATTCharacteristic, data: bytearray, u: int = uuid16) -> None:
                self._on_value(u, data)

            try:
                await self.client.start_notify(char, callback)
            except (BleakGATTProtocolError, BleakDBusError) as exc:
                if self.paired or not _needs_bonding(exc):
                    raise
                await self._bond()
                await self.client.start_notify(char, callback)

    async def _bond(self) -> None:
        """Bond with a device that refused a subscription for want of it; the Battery Level
        subscription it refused too is asked again (else only re-read, for days)."""
        assert self.client is not None
        log.info("%s: device requires pairing; bonding", self.address)
        await self.client.pair()
        self.paired = True
        self.port.note_pair_required(self.address)
        if self._battery_awaits_bonding:
            self._battery_awaits_bonding = False
            await self._watch_battery()

    async def _download_records(self) -> None:
        char = self._char(uuids.RECORD_ACCESS_CONTROL_POINT)
        assert char is not None and self.client is not None
        last = self.port.last_sequence(self.address)
        request = self.racp.report_records_after(last)
        answer: asyncio.Future[RacpResult] = asyncio.get_running_loop().create_future()
        self._racp_result = answer
        await self.client.write_gatt_char(char, request, response=True)
        gone: asyncio.Future[bool] = asyncio.ensure_future(self._gone.wait())
        try:
            done, _ = await asyncio.wait(
                [answer, gone],
                timeout=self.s.racp_timeout_s,  # type: ignore[type-var]
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone.cancel()
        if answer not in done:
            raise SessionEnded(
                "link lost during the record download"
                if self._gone.is_set()
                else f"no RACP answer in {self.s.racp_timeout_s:.0f} s"
            )
        result = answer.result()
        self._flush_glucose()
        if not result.ok:
            raise ProtocolError(f"record download refused: {result.response_code}")
        log.info("%s: %d stored record(s) downloaded after sequence %s", self.address, result.records, last)

    # -- values -----------------------------------------------------------------------------
    def _on_value(self, uuid16: int, data: bytearray) -> None:
        received_at = self.m.clock()
        try:
            if uuid16 == uuids.RECORD_ACCESS_CONTROL_POINT:
                self._on_racp(bytes(data))
                return
            decoded = registry.decode(uuid16, bytes(data))
            if isinstance(decoded, GlucoseContext):
                self._on_glucose_context(decoded)
            elif isinstance(decoded, Measurement):
                self._on_measurement(decoded, received_at)
        except ProtocolError as exc:
            log.warning("%s: malformed %04X value %s: %s", self.address, uuid16, bytes(data).hex(), exc)
            self.port.report(
                DeviceStatus(
                    self.address, error=f"{MALFORMED}{uuid16:04X} value: {exc}", problem=DeviceProblem.UNREADABLE
                )
            )
        except Exception as exc:
            log.exception("%s: could not handle a %04X value", self.address, uuid16)
            self.port.report(DeviceStatus(self.address, error=f"{type(exc).__name__}: {exc}"))

    def _on_racp(self, data: bytes) -> None:
        try:
            result = self.racp.on_indication(data)
        except ProtocolError as exc:
            if self._racp_result and not self._racp_result.done():
                self._racp_result.set_exception(exc)
            raise
        if self._racp_result and not self._racp_result.done():
            self._racp_result.set_result(result)

    def _on_measurement(self, m: Measurement, received_at: dt.datetime) -> None:
        if not m.live and not m.stored and self._racp_result is not None and not self._racp_result.done():
            m = dataclasses.replace(m, stored=True)  # sent for our RACP request: a record from memory
        if m.sequence is not None:  # glucose
            self.racp.on_record(m.sequence)
            self._flush_glucose()  # a context follows its own measurement at once
            if m.context_follows:
                self._pending_glucose[m.sequence] = (m, received_at)
                return
        if m.live:
            if m.device_time is not None and not m.clock_untrusted and self.clock.offset is None:
                # A live value is stamped "now": it measures the clock of a device without Current Time.
                self.clock = ClockCheck(offset=measure_offset(m.device_time, received_at, self.s.device_tz))
            if m.characteristic != uuids.PLX_CONTINUOUS_MEASUREMENT:
                return  # cuff pressure while inflating, a thermometer's running value: not results
        unusable = UNUSABLE.intersection(m.flags)
        if unusable:
            self._not_a_result(m, ", ".join(sorted(unusable)))
            return
        if m.live:
            now = time.monotonic()
            if self._last_continuous is not None and now - self._last_continuous < self.s.continuous_store_interval_s:
                return
            self._last_continuous = now
        self._store(m, received_at)

    def _not_a_result(self, m: Measurement, why: str) -> None:
        """A reading the device itself marks as no result (demonstration, testing, calibration,
        invalid ...): not stored, but counted, logged and shown in the device list once per reason
        and connection - a demo-mode oximeter must not look like one that sends nothing."""
        first = why not in self.unusable
        self.unusable[why] += 1
        if not first:
            log.debug("%s: %s reading not stored (%s)", self.address, m.kind, why)
            return
        log.warning("%s: %s reading not stored: the device marks it %s", self.address, m.kind, why)
        self.port.report(
            DeviceStatus(self.address, error=f"{m.kind}{NOT_A_RESULT}{why}", problem=DeviceProblem.NOT_A_RESULT)
        )

    def _unpaired(self, m: Measurement) -> None:
        """Unpaired while connected (`lastmile ble unpair`): the doctor took it off this clinic's
        list, so nothing more from it is stored, and the session ends (hanging up on it) at once
        rather than at the manager's next scan pass."""
        if not self._gone.is_set():
            log.warning("%s: unpaired while connected; %s reading not stored, disconnecting", self.address, m.kind)
        else:
            log.debug("%s: unpaired; %s reading not stored", self.address, m.kind)
        self._gone.set()

    def _on_glucose_context(self, context: GlucoseContext) -> None:
        pending = self._pending_glucose.pop(context.sequence, None)
        if pending is None:
            log.warning("%s: glucose context for unknown record %d", self.address, context.sequence)
            return
        self._store(with_context(pending[0], context), pending[1])

    def _flush_glucose(self) -> None:
        while self._pending_glucose:
            _, (m, received_at) = self._pending_glucose.popitem()
            self._store(m, received_at)

    def _store(self, m: Measurement, received_at: dt.datetime) -> None:
        if not m.quantities:
            log.info("%s: %s record without a value skipped", self.address, m.kind)
            return
        if not self.port.is_allowed(self.address):
            self._unpaired(m)
            return
        measured_at, source = resolve_time(
            m.device_time,
            received_at,
            self.clock,
            self.s.device_tz,
            clock_untrusted=m.clock_untrusted,
            tolerance=dt.timedelta(seconds=self.s.clock_tolerance_s),
        )
        obs = to_observation(
            m,
            device=self.identity,
            measured_at=measured_at,
            time_source=source,
            received_at=received_at,
            key=record_key(self.address, m, received_at),
        )
        try:
            created = self.port.store(obs)
        except Exception:
            self._sequence_broken = True
            raise
        if created:
            self.stored += 1
        else:
            self.duplicates += 1
        if m.sequence is not None and not self._sequence_broken:
            self.port.set_last_sequence(self.address, m.sequence)
        self.m.on_observation(self.address, obs, created)


class BatteryWatch:
    """Which Battery Levels are worth a clinic.db write (the SD card): a cell under load flickers
    50<->51 all day. Written: the first, a level 2 points or more from the one written, one
    dropping to `LOW_BATTERY_PERCENT` or below (at once, even 1 point down), and any level after
    `refresh_s` seconds (so the time shown stays recent). The row is never more than 1 point off."""

    def __init__(self, refresh_s: float) -> None:
        self.refresh_s = refresh_s
        self.level: int | None = None  # the last reported: what the row holds
        self.at = 0.0  # when (monotonic seconds)

    def seed(self, level: int, at: float) -> None:
        """Start from what the row holds, written at `at` (monotonic) by an earlier connection."""
        self.level, self.at = level, at

    def is_news(self, level: int, now: float) -> bool:
        """Whether to report `level`, seen at `now`; if so it becomes the last reported."""
        if self.level is not None and now - self.at < self.refresh_s and not self._moved(level):
            return False
        self.level, self.at = level, now
        return True

    def _moved(self, level: int) -> bool:
        assert self.level is not None
        went_low = level <= LOW_BATTERY_PERCENT < self.level
        return went_low or abs(level - self.level) >= 2


def _end_if_cancelled() -> None:
    """End a session cancelled (a stop, an unpair) during its set-up even if the cancel was lost
    there: a library awaiting with Python 3.11's `asyncio.wait_for` can drop one that races its
    result, and a device that never hangs up (a streaming oximeter) would keep the session, and
    the stop, waiting for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def sig_services(uuid_texts: Iterable[str]) -> frozenset[int]:
    """The 16-bit numbers of the SIG-base service UUIDs among `uuid_texts` (vendor UUIDs left out)."""
    return frozenset(u for u in map(short_uuid, uuid_texts) if u is not None)


def _needs_bonding(exc: Exception) -> bool:
    if isinstance(exc, BleakGATTProtocolError):
        return int(exc.code) in AUTH_ERROR_CODES
    return any(h in str(exc) for h in AUTH_DBUS_HINTS)


# A radio that cannot scan (no adapter, adapter off, BlueZ or the system D-Bus not running) is
# logged when it fails, when it works again and every this many tries in between: not a journal
# line per try, for days, on an SD card.
RADIO_LOG_EVERY = 60


def radio_fault_text(exc: BaseException) -> str:
    """What the county's IT reads in STATUS= and the journal: the error, and what it usually means."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and not isinstance(exc, BleakError):
        return f"{text} (the system D-Bus or BlueZ is not running)"
    return f"{text} (no Bluetooth adapter, the adapter off, or BlueZ not running)"


class BleDeviceManager:
    """Scans for allow-listed devices and runs one `DeviceSession` task per connected device.

    `radio_listener` hears the radio's fault when scanning cannot start (text) and None when it
    works again; the link keeps trying meanwhile, with a capped backoff, and stays up."""

    def __init__(
        self,
        port: GatewayPort,
        settings: LinkSettings | None = None,
        *,
        scanner_backend: type[BaseBleakScanner] | None = None,
        client_backend: type[BaseBleakClient] | None = None,
        client_class: type[BleakClient] = BleakClient,
        clock: Callable[[], dt.datetime] = utc_now,
        observation_listener: Callable[[str, Observation, bool], None] | None = None,
        radio_listener: Callable[[str | None], None] | None = None,
    ) -> None:
        self.port = port
        self.radio_listener = radio_listener
        self.radio_failures = 0  # scans that could not start in a row
        self.settings = settings or LinkSettings()
        self.scanner_backend = scanner_backend
        self.client_backend = client_backend
        self.client_class = client_class
        self.clock = clock
        self.observation_listener = observation_listener
        self.sessions: dict[str, asyncio.Task[None]] = {}
        self.failures: dict[str, int] = {}
        self._not_before: dict[str, float] = {}
        self._allowed: dict[str, bool] = {}
        self._ignored: set[str] = set()
        self._changed = asyncio.Event()

    def on_observation(self, address: str, obs: Observation, created: bool) -> None:
        if self.observation_listener is not None:
            self.observation_listener(address, obs, created)

    def connected(self) -> set[str]:
        return set(self.sessions)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: scan while an allow-listed device is missing, connect what appears."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                try:
                    self._allowed = self.port.allowed_devices()
                except Exception:
                    log.exception("allow-list not readable; using the previous one")
                else:
                    self._end_unpaired_sessions()
                loop_now = time.monotonic()
                missing = [a for a in self._allowed if a not in self.sessions]
                ready = [a for a in missing if self._not_before.get(a, 0.0) <= loop_now]
                if ready:
                    scanner = BleakScanner(self._on_detection, **self._scanner_kwargs())
                    try:
                        await scanner.start()
                    except (BleakError, OSError) as exc:  # adapter off or gone, BlueZ restarting
                        await self._wait(stopping, self.radio_failed(exc))
                        continue
                    self.radio_works()
                    try:
                        await self._wait(
                            stopping,
                            self.settings.scan_pass_s,
                            until=lambda: all(a in self.sessions for a in self._allowed),
                        )
                    finally:
                        try:
                            await scanner.stop()
                        except (BleakError, OSError) as exc:
                            log.warning("stopping the scan failed: %s", exc)
                else:
                    due = [self._not_before[a] - loop_now for a in missing if a in self._not_before]
                    await self._wait(stopping, min([self.settings.scan_pass_s, *due]))
        finally:
            stopping.cancel()
            tasks = list(self.sessions.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _end_unpaired_sessions(self) -> None:
        """A device taken off the allow-list while connected is hung up on (its session's
        `finally` disconnects), even one that sends nothing more."""
        for address, task in list(self.sessions.items()):
            if address not in self._allowed and not task.done():
                log.warning("%s: unpaired while connected; disconnecting", address)
                task.cancel()

    def radio_failed(self, exc: BaseException) -> float:
        """Note a scan that could not start; the seconds to wait before the next try."""
        self.radio_failures += 1
        fault = radio_fault_text(exc)
        s = self.settings
        wait = min(s.radio_retry_max_s, s.scan_pass_s * 2 ** min(self.radio_failures - 1, 16))
        if self.radio_failures == 1:
            log.warning(
                "Bluetooth radio not usable: %s; trying again, at longest every %g s", fault, s.radio_retry_max_s
            )
        elif self.radio_failures % RADIO_LOG_EVERY == 0:
            log.warning("Bluetooth radio still not usable after %d tries: %s", self.radio_failures, fault)
        else:
            log.debug("cannot scan (try %d): %s", self.radio_failures, fault)
        if self.radio_listener is not None:
            self.radio_listener(fault)
        return wait

    def radio_works(self) -> None:
        if not self.radio_failures:
            return
        log.warning("Bluetooth radio usable again after %d failed tries", self.radio_failures)
        self.radio_failures = 0
        if self.radio_listener is not None:
            self.radio_listener(None)

    def _scanner_kwargs(self) -> dict[str, Any]:
        return {"backend": self.scanner_backend} if self.scanner_backend is not None else {}

    async def _wait(self, stopping: asyncio.Future, timeout: float, until: Callable[[], bool] | None = None) -> None:
        deadline = time.monotonic() + max(timeout, 0.0)
        while not stopping.done():
            if until is not None and until():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({stopping, changed}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()

    def _on_detection(self, device: BLEDevice, adv: AdvertisementData) -> None:
        address = device.address.upper()
        if address not in self._allowed:
            if address not in self._ignored and set(adv.service_uuids) & set(HEALTH_SERVICE_UUIDS):
                self._ignored.add(address)
                log.info("ignoring %s (%s): not paired for this clinic", address, adv.local_name or "no name")
            return
        if address in self.sessions or self._not_before.get(address, 0.0) > time.monotonic():
            return
        session = DeviceSession(self, device, self._allowed[address], sig_services(adv.service_uuids))
        task = asyncio.get_running_loop().create_task(session.run(), name=f"ble {address}")
        self.sessions[address] = task
        task.add_done_callback(functools.partial(self._session_done, address))
        self._changed.set()

    def _session_done(self, address: str, task: asyncio.Task[None]) -> None:
        self.sessions.pop(address, None)
        self._changed.set()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.failures.pop(address, None)
            self._not_before[address] = time.monotonic() + self.settings.reconnect_delay_s
            return
        failures = self.failures[address] = self.failures.get(address, 0) + 1
        backoff = min(self.settings.retry_backoff_max_s, self.settings.retry_backoff_s * 2 ** (failures - 1))
        self._not_before[address] = time.monotonic() + backoff
        log.warning("%s: session failed (%s: %s); retrying in %.0f s", address, type(exc).__name__, exc, backoff)
        try:
            self.port.report(DeviceStatus(address, connected=False, error=f"{type(exc).__name__}: {exc}"))
        except Exception:
            log.exception("%s: could not record the error", address)


@dataclass(frozen=True, slots=True)
class ScanResult:
    address: str
    name: str
    rssi: int
    services: tuple[str, ...]  # names of the health services advertised


async def scan_health_devices(
    timeout_s: float = 5.0, *, backend: type[BaseBleakScanner] | None = None, every_device: bool = False
) -> list[ScanResult]:
    """Devices advertising a health service (or every device), strongest first."""
    found: dict[str, ScanResult] = {}

    def on_detection(device: BLEDevice, adv: AdvertisementData) -> None:
        names = tuple(
            uuids.HEALTH_SERVICES[u] for u in map(short_uuid, adv.service_uuids) if u in uuids.HEALTH_SERVICES
        )
        if names or every_device:
            found[device.address.upper()] = ScanResult(
                device.address.upper(), adv.local_name or device.name or "", adv.rssi, names
            )

    scanner = BleakScanner(on_detection, backend=backend)
    await scanner.start()
    try:
        await asyncio.sleep(timeout_s)
    finally:
        await scanner.stop()
    return sorted(found.values(), key=lambda r: -r.rssi)
