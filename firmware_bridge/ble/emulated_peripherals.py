"""Emulated health devices: bumble GATT servers behaving like the devices a clinic buys.

A `BloodPressureCuff` indicates its whole memory when the gateway subscribes, then hangs up;
a `Thermometer` does the same with temperatures; a `PulseOximeter` streams PLX continuous
notifications while connected; a `GlucoseMeter` answers the Record Access Control Point.
Each has Device Information and, optionally, a Current Time service backed by its own clock,
which can be wrong (`clock_offset`) and is corrected when the gateway writes the time.
Options cover the failure scenarios: `require_pairing` (CCCDs need an encrypted link) and
`drop_after` (the link drops after that many records, once).

Used by the tests, `bench/ble_latency.py` and `lastmile demo`; needs bumble (the `emulation` extra).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bumble import att
from bumble.device import Connection, Device
from bumble.gatt import (
    GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR,
    Characteristic,
    CharacteristicValue,
    Service,
)

from devices.ble import racp, uuids
from devices.ble.battery import encode_battery_level
from devices.ble.current_time import decode_current_time, encode_current_time
from devices.ble.payload import encode_date_time
from devices.ble.sfloat import encode_float, encode_sfloat
from devices.errors import ProtocolError
from firmware_bridge.ble.emulation import EmulatedRadio, advertising_data

log = logging.getLogger(__name__)

P = Characteristic.Properties
READABLE = att.Attribute.Permissions.READABLE
WRITEABLE = att.Attribute.Permissions.WRITEABLE


def _sf(value: float | str | None, exponent: int = 0) -> bytes:
    return struct.pack("<H", encode_sfloat("nan" if value is None else value, exponent))


class DeviceClock:
    """A device's wall clock: true local time plus `offset` (wrong after a battery change)."""

    def __init__(
        self,
        tz: dt.tzinfo,
        offset: dt.timedelta = dt.timedelta(0),
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
    ) -> None:
        self.tz, self.offset, self._now = tz, offset, now
        self.set_count = 0

    def now(self) -> dt.datetime:
        """Naive local time as this device believes it."""
        return (self._now().astimezone(self.tz) + self.offset).replace(tzinfo=None)

    def set(self, local: dt.datetime) -> None:
        self.offset = local - self._now().astimezone(self.tz).replace(tzinfo=None)
        self.set_count += 1


@dataclass
class EmulatedPeripheral:
    radio: EmulatedRadio
    address: str
    name: str
    manufacturer: str = "Lastmile Emulation"
    model: str = "EMU"
    serial: str = "0001"
    tz: dt.tzinfo = dt.timezone.utc
    clock_offset: dt.timedelta = dt.timedelta(0)
    current_time_service: bool = True
    require_pairing: bool = False
    hang_up_after_memory: bool = True
    drop_after: int | None = None  # drop the link after this many records, the first time only
    readvertise: bool = False  # advertise again after every disconnection (always after a drop)
    advertising_interval_ms: float = 100.0
    battery_level: int | None = None  # percent: a Battery Service serves it (None: no such service)
    battery_notify: bool = False  # its Battery Level notifies a change (else it can only be read)

    device: Device = field(init=False)
    clock: DeviceClock = field(init=False)
    connection: Connection | None = field(init=False, default=None)
    connections: int = field(init=False, default=0)
    sent: int = field(init=False, default=0)  # records/values sent over the air
    battery_reads: int = field(init=False, default=0)  # Battery Level reads served
    subscribed: list[Characteristic] = field(init=False, default_factory=list)  # by the central, in order
    send_times: list[float] = field(init=False, default_factory=list)  # perf_counter() before each send
    _tasks: set[asyncio.Task] = field(init=False, default_factory=set)
    _dropped: bool = field(init=False, default=False)
    _dropped_now: bool = field(init=False, default=False)

    @property
    def dropped(self) -> bool:
        """Whether it has hung up mid-transfer as `drop_after` asked."""
        return self._dropped

    SERVICE: ClassVar[int] = 0  # the health service 16-bit UUID, set by subclasses

    def __post_init__(self) -> None:
        self.clock = DeviceClock(self.tz, self.clock_offset)
        self.device = self.radio.new_device(self.name, self.address)

    # -- GATT database ----------------------------------------------------------------------
    def health_characteristics(self) -> list[Characteristic]:
        raise NotImplementedError

    def _services(self) -> list[Service]:
        dis = Service(
            f"{uuids.DEVICE_INFORMATION:04X}",
            [
                Characteristic(f"{u:04X}", P.READ, READABLE, text.encode())
                for u, text in (
                    (uuids.MANUFACTURER_NAME, self.manufacturer),
                    (uuids.MODEL_NUMBER, self.model),
                    (uuids.SERIAL_NUMBER, self.serial),
                    (uuids.FIRMWARE_REVISION, "1.0"),
                )
            ],
        )
        services = [dis, Service(f"{self.SERVICE:04X}", self.health_characteristics())]
        if self.battery_level is not None:
            self.battery: Characteristic[bytes] = Characteristic(
                f"{uuids.BATTERY_LEVEL:04X}",
                P.READ | (P.NOTIFY if self.battery_notify else P(0)),
                READABLE,
                CharacteristicValue(read=self._read_battery_level),
            )
            services.append(Service(f"{uuids.BATTERY_SERVICE:04X}", [self.battery]))
        if self.current_time_service:
            value = CharacteristicValue(
                read=lambda _c: encode_current_time(self.clock.now().replace(microsecond=0)),
                write=self._write_current_time,
            )
            services.append(
                Service(
                    f"{uuids.CURRENT_TIME_SERVICE:04X}",
                    [
                        Characteristic(
                            f"{uuids.CURRENT_TIME:04X}", P.READ | P.WRITE | P.NOTIFY, READABLE | WRITEABLE, value
                        )
                    ],
                )
            )
        return services

    def _read_battery_level(self, _conn: Connection) -> bytes:
        assert self.battery_level is not None
        self.battery_reads += 1
        return encode_battery_level(self.battery_level)

    async def drain_battery(self, level: int) -> None:
        """Its charge is now `level`: read so from now on, and notified if it offers that and is subscribed."""
        self.battery_level = level
        if self.battery_notify and self.connection is not None:
            await self.device.notify_subscribers(self.battery, encode_battery_level(level))

    def _write_current_time(self, _conn: Connection, value: bytes) -> None:
        try:
            ct = decode_current_time(value)
        except ProtocolError as exc:
            raise att.ATT_Error(0x80) from exc  # application error: value rejected
        if ct.local_time is not None:
            self.clock.set(ct.local_time)

    async def start(self) -> None:
        self.device.add_services(self._services())
        if self.require_pairing:
            for attribute in self.device.gatt_server.attributes:
                if attribute.type == GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR:
                    attribute.permissions |= att.Attribute.Permissions.WRITE_REQUIRES_ENCRYPTION
        self.device.on("connection", self._on_connection)
        self.device.on("characteristic_subscription", self._on_subscription)
        await self.device.power_on()
        await self.advertise()

    async def advertise(self) -> None:
        await self.device.start_advertising(
            advertising_data=advertising_data(self.name, [self.SERVICE]),
            advertising_interval_min=self.advertising_interval_ms,
            advertising_interval_max=self.advertising_interval_ms,
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.connection is not None:
            await self.hang_up()
        await self.device.stop_advertising()

    def _on_connection(self, connection: Connection) -> None:
        self.connection = connection
        self.connections += 1
        connection.on(connection.EVENT_DISCONNECTION, lambda _reason: self._on_disconnection(connection))

    def _on_disconnection(self, connection: Connection) -> None:
        if self.connection is connection:
            self.connection = None
        for task in list(self._tasks):
            task.cancel()
        if self.readvertise or self._dropped_now:
            self._dropped_now = False
            self.spawn(self.advertise())

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: %r", self.name, task.exception())

    def _on_subscription(
        self, connection: Connection, characteristic: Characteristic, notify: bool, indicate: bool
    ) -> None:
        if notify or indicate:
            self.subscribed.append(characteristic)
            self.on_subscribed(connection, characteristic)

    def on_subscribed(self, connection: Connection, characteristic: Characteristic) -> None:
        """A subclass starts sending here."""

    async def hang_up(self) -> None:
        if self.connection is not None:
            await self.connection.disconnect()

    async def send(self, characteristic: Characteristic, value: bytes, *, indicate: bool) -> bool:
        """Send one value; False if the link is gone or dropped on purpose (`drop_after`)."""
        if self.connection is None:
            return False
        if self.drop_after is not None and not self._dropped and self.sent >= self.drop_after:
            self._dropped = self._dropped_now = True
            log.info("%s: dropping the link mid-transfer", self.name)
            await self.hang_up()
            return False
        self.send_times.append(time.perf_counter())
        if indicate:
            await self.device.indicate_subscribers(characteristic, value)
        else:
            await self.device.notify_subscribers(characteristic, value)
        self.sent += 1
        return True


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BpRecord:
    systolic: float
    diastolic: float
    mean: float
    pulse: float | None
    taken_at: dt.datetime | None  # naive, on the device's clock; None: "now" on its clock
    user_id: int = 1
    status: int = 0


def encode_bp(r: BpRecord, taken_at: dt.datetime | None) -> bytes:
    flags = 0x08 | (0x02 if taken_at else 0) | (0x04 if r.pulse is not None else 0) | 0x10
    out = bytes((flags,)) + _sf(r.systolic) + _sf(r.diastolic) + _sf(r.mean)
    if taken_at:
        out += encode_date_time(taken_at)
    if r.pulse is not None:
        out += _sf(r.pulse)
    return out + bytes((r.user_id,)) + struct.pack("<H", r.status)


@dataclass
class BloodPressureCuff(EmulatedPeripheral):
    """Indicates every stored reading when the gateway subscribes, then hangs up."""

    memory: list[BpRecord] = field(default_factory=list)
    SERVICE: ClassVar[int] = uuids.BLOOD_PRESSURE

    def health_characteristics(self) -> list[Characteristic]:
        self.measurement = Characteristic(f"{uuids.BLOOD_PRESSURE_MEASUREMENT:04X}", P.INDICATE, READABLE, b"")
        self.cuff_pressure = Characteristic(f"{uuids.INTERMEDIATE_CUFF_PRESSURE:04X}", P.NOTIFY, READABLE, b"")
        feature = Characteristic(f"{uuids.BLOOD_PRESSURE_FEATURE:04X}", P.READ, READABLE, b"\x05\x00")
        return [self.measurement, self.cuff_pressure, feature]

    def on_subscribed(self, connection: Connection, characteristic: Characteristic) -> None:
        if characteristic is self.measurement:
            self.spawn(self._send_memory())

    async def _send_memory(self) -> None:
        for record in list(self.memory):
            taken_at = record.taken_at or self.clock.now().replace(microsecond=0)
            if not await self.send(self.measurement, encode_bp(record, taken_at), indicate=True):
                return
        if self.hang_up_after_memory:
            await self.hang_up()

    async def measure(self, record: BpRecord) -> None:
        """A new measurement: into memory, then sent now if connected, else advertised for."""
        stamped = BpRecord(
            record.systolic,
            record.diastolic,
            record.mean,
            record.pulse,
            record.taken_at or self.clock.now().replace(microsecond=0),
            record.user_id,
            record.status,
        )
        self.memory.append(stamped)
        if self.connection is not None:
            await self.send(self.measurement, encode_bp(stamped, stamped.taken_at), indicate=True)
        else:
            await self.advertise()


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TemperatureRecord:
    celsius: float
    taken_at: dt.datetime | None  # naive device time; None: now on its clock


def encode_temperature(celsius: float, taken_at: dt.datetime | None, site: int | None = None) -> bytes:
    flags = (0x02 if taken_at else 0) | (0x04 if site else 0)
    out = bytes((flags,)) + struct.pack("<I", encode_float(celsius, -2))
    if taken_at:
        out += encode_date_time(taken_at)
    return out + (bytes((site,)) if site else b"")


@dataclass
class Thermometer(EmulatedPeripheral):
    memory: list[TemperatureRecord] = field(default_factory=list)
    site: int = 3  # ear
    SERVICE: ClassVar[int] = uuids.HEALTH_THERMOMETER

    def health_characteristics(self) -> list[Characteristic]:
        self.measurement = Characteristic(f"{uuids.TEMPERATURE_MEASUREMENT:04X}", P.INDICATE, READABLE, b"")
        kind = Characteristic(f"{uuids.TEMPERATURE_TYPE:04X}", P.READ, READABLE, bytes((self.site,)))
        return [self.measurement, kind]

    def on_subscribed(self, connection: Connection, characteristic: Characteristic) -> None:
        if characteristic is self.measurement:
            self.spawn(self._send_memory())

    async def _send_memory(self) -> None:
        for record in list(self.memory):
            taken_at = record.taken_at or self.clock.now().replace(microsecond=0)
            if not await self.send(self.measurement, encode_temperature(record.celsius, taken_at), indicate=True):
                return
        if self.hang_up_after_memory:
            await self.hang_up()

    async def measure(self, celsius: float) -> None:
        """A new measurement: into memory, then sent now if connected, else advertised for."""
        record = TemperatureRecord(celsius, self.clock.now().replace(microsecond=0))
        self.memory.append(record)
        if self.connection is not None:
            await self.send(self.measurement, encode_temperature(record.celsius, record.taken_at), indicate=True)
        else:
            await self.advertise()


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightRecord:
    kg: float
    taken_at: dt.datetime | None  # naive device time; None: now on its clock
    user_id: int | None = 1  # the user button pressed (None: the scale sends no User ID)


def encode_weight(r: WeightRecord, taken_at: dt.datetime | None) -> bytes:
    """Weight Measurement (0x2A9D), SI: weight in 0.005 kg steps, its time and user if any."""
    flags = (0x02 if taken_at else 0) | (0x04 if r.user_id is not None else 0)
    out = bytes((flags,)) + struct.pack("<H", round(r.kg / 0.005))
    if taken_at:
        out += encode_date_time(taken_at)
    return out + (bytes((r.user_id,)) if r.user_id is not None else b"")


@dataclass
class WeightScale(EmulatedPeripheral):
    """A family's scale with user buttons: indicates every stored weighing when the gateway
    subscribes, then hangs up."""

    memory: list[WeightRecord] = field(default_factory=list)
    SERVICE: ClassVar[int] = uuids.WEIGHT_SCALE

    def health_characteristics(self) -> list[Characteristic]:
        self.measurement = Characteristic(f"{uuids.WEIGHT_MEASUREMENT:04X}", P.INDICATE, READABLE, b"")
        # Weight Scale Feature: time stamp and multiple users supported, 0.005 kg resolution
        feature = Characteristic(f"{uuids.WEIGHT_SCALE_FEATURE:04X}", P.READ, READABLE, struct.pack("<I", 0x0B))
        return [self.measurement, feature]

    def on_subscribed(self, connection: Connection, characteristic: Characteristic) -> None:
        if characteristic is self.measurement:
            self.spawn(self._send_memory())

    async def _send_memory(self) -> None:
        """Every weighing, stamped now on its clock if it kept no time, until one cannot be sent;
        then it hangs up if asked."""
        now = self.clock.now().replace(microsecond=0)
        for record in self.memory:
            if not await self.send(self.measurement, encode_weight(record, record.taken_at or now), indicate=True):
                return
        if self.hang_up_after_memory:
            await self.hang_up()


# --------------------------------------------------------------------------------------------
def encode_plx_continuous(spo2: float, pulse: float, status: int | None = None) -> bytes:
    flags = 0x04 if status is not None else 0
    return bytes((flags,)) + _sf(spo2) + _sf(pulse) + (struct.pack("<H", status) if status is not None else b"")


@dataclass
class PulseOximeter(EmulatedPeripheral):
    """Streams PLX continuous measurements while the gateway is subscribed (0 = only on `send_now`)."""

    stream_interval_s: float = 1.0
    spo2: float = 97.0
    pulse: float = 68.0
    hang_up_after_memory: bool = False
    SERVICE: ClassVar[int] = uuids.PULSE_OXIMETER

    def health_characteristics(self) -> list[Characteristic]:
        self.continuous = Characteristic(f"{uuids.PLX_CONTINUOUS_MEASUREMENT:04X}", P.NOTIFY, READABLE, b"")
        self.spot_check = Characteristic(f"{uuids.PLX_SPOT_CHECK_MEASUREMENT:04X}", P.INDICATE, READABLE, b"")
        features = Characteristic(f"{uuids.PLX_FEATURES:04X}", P.READ, READABLE, b"\x00\x00")
        return [self.continuous, self.spot_check, features]

    def on_subscribed(self, connection: Connection, characteristic: Characteristic) -> None:
        if characteristic is self.continuous and self.stream_interval_s > 0:
            self.spawn(self._stream())

    async def _stream(self) -> None:
        while self.connection is not None:
            await self.send_now()
            await asyncio.sleep(self.stream_interval_s)

    async def send_now(self, spo2: float | None = None, pulse: float | None = None) -> bool:
        return await self.send(
            self.continuous, encode_plx_continuous(spo2 or self.spo2, pulse or self.pulse), indicate=False
        )


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlucoseRecord:
    sequence: int
    mg_dl: float
    taken_at: dt.datetime  # naive, device clock
    meal: int | None = None  # context: 1 preprandial ... 5 bedtime


def encode_glucose(r: GlucoseRecord) -> bytes:
    flags = 0x02 | (0x10 if r.meal else 0)  # concentration in kg/L (+ context follows)
    return (
        bytes((flags,))
        + struct.pack("<H", r.sequence)
        + encode_date_time(r.taken_at)
        + _sf(round(r.mg_dl) / 100_000, -5)
        + b"\x11"
    )


def encode_glucose_context(r: GlucoseRecord) -> bytes:
    return bytes((0x02,)) + struct.pack("<H", r.sequence) + bytes((r.meal or 0,))


@dataclass
class GlucoseMeter(EmulatedPeripheral):
    """Answers RACP: report all / records >= a sequence number / number of records / abort."""

    records: list[GlucoseRecord] = field(default_factory=list)
    hang_up_after_memory: bool = False
    requests: list[bytes] = field(init=False, default_factory=list)
    SERVICE: ClassVar[int] = uuids.GLUCOSE

    def health_characteristics(self) -> list[Characteristic]:
        self.measurement = Characteristic(f"{uuids.GLUCOSE_MEASUREMENT:04X}", P.NOTIFY, READABLE, b"")
        self.context = Characteristic(f"{uuids.GLUCOSE_MEASUREMENT_CONTEXT:04X}", P.NOTIFY, READABLE, b"")
        feature = Characteristic(f"{uuids.GLUCOSE_FEATURE:04X}", P.READ, READABLE, b"\x00\x00")
        self.racp: Characteristic[bytes] = Characteristic(
            f"{uuids.RECORD_ACCESS_CONTROL_POINT:04X}",
            P.WRITE | P.INDICATE,
            WRITEABLE,
            CharacteristicValue(write=self._on_racp_write),
        )
        return [self.measurement, self.context, feature, self.racp]

    def _on_racp_write(self, _conn: Connection, value: bytes) -> None:
        self.requests.append(bytes(value))
        self.spawn(self._answer(bytes(value)))  # the write response goes out first

    async def _answer(self, value: bytes) -> None:
        await asyncio.sleep(0)
        try:
            request = racp.decode_racp(value)
        except ProtocolError:
            await self._respond(
                racp.OpCode(value[0]) if value and value[0] in racp.REQUESTS else racp.OpCode.REPORT_STORED_RECORDS,
                racp.ResponseCode.INVALID_OPERAND,
            )
            return
        op = request.op_code
        if op == racp.OpCode.ABORT_OPERATION:
            await self._respond(op, racp.ResponseCode.SUCCESS)
            return
        selected = self._select(request)
        if selected is None:
            await self._respond(op, racp.ResponseCode.OPERATOR_NOT_SUPPORTED)
            return
        if op == racp.OpCode.REPORT_NUMBER_OF_STORED_RECORDS:
            await self.send(self.racp, racp.encode_number_of_records(len(selected)), indicate=True)
            return
        if op != racp.OpCode.REPORT_STORED_RECORDS:
            await self._respond(op, racp.ResponseCode.OP_CODE_NOT_SUPPORTED)
            return
        if not selected:
            await self._respond(op, racp.ResponseCode.NO_RECORDS_FOUND)
            return
        for record in selected:
            if not await self.send(self.measurement, encode_glucose(record), indicate=False):
                return
            if record.meal and not await self.send(self.context, encode_glucose_context(record), indicate=False):
                return
        await self._respond(op, racp.ResponseCode.SUCCESS)
        if self.hang_up_after_memory:
            await self.hang_up()

    def _select(self, request: racp.RacpMessage) -> list[GlucoseRecord] | None:
        ordered = sorted(self.records, key=lambda r: r.sequence)
        if request.operator == racp.Operator.ALL_RECORDS:
            return ordered
        if (
            request.operator == racp.Operator.GREATER_THAN_OR_EQUAL
            and request.filter_type == racp.FilterType.SEQUENCE_NUMBER
        ):
            first = request.filter_values[0]
            return [r for r in ordered if r.sequence >= first]  # type: ignore[operator]
        if request.operator == racp.Operator.LAST_RECORD:
            return ordered[-1:]
        return None

    async def _respond(self, request: racp.OpCode, code: racp.ResponseCode) -> None:
        if self.connection is not None:
            await self.device.indicate_subscribers(self.racp, racp.encode_response_code(request, code))
