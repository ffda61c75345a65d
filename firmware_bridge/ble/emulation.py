"""An in-process Bluetooth LE radio for bleak, made of bumble parts (tests and `lastmile demo`).

`EmulatedRadio` is a bumble `LocalLink` with one controller for the gateway (the central) and
one per emulated peripheral. `radio.backends()` gives a scanner and a client class that plug
into the *real* bleak API (`BleakScanner(..., backend=S)`, `BleakClient(..., backend=C)`), so
the gateway's BLE code runs unmodified over it.

What the emulation does not do like BlueZ: no D-Bus errors (InProgress, le-connection-abort;
the link tests use a small fake for those), and connections are serialised here the way BlueZ
serialises them on one adapter. Needs the optional `bumble` package (the `emulation` extra):
import this module only when emulation is asked for.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError, BleakGATTProtocolError
from bumble import core as bumble_core
from bumble.att import ATT_Error
from bumble.controller import Controller
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt_client import CharacteristicProxy, DescriptorProxy, ServiceProxy
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

log = logging.getLogger(__name__)

CENTRAL_ADDRESS = "F0:F0:F0:F0:F0:F0"
SIG_SUFFIX = "-0000-1000-8000-00805f9b34fb"

# GATT characteristic property bits -> bleak's property names.
_PROPERTY_NAMES = {
    0x01: "broadcast",
    0x02: "read",
    0x04: "write-without-response",
    0x08: "write",
    0x10: "notify",
    0x20: "indicate",
    0x40: "authenticated-signed-writes",
    0x80: "extended-properties",
}


def bleak_uuid(uuid: Any) -> str:
    """bumble UUID -> bleak's lower-case 128-bit string."""
    text = uuid.to_hex_str() if hasattr(uuid, "to_hex_str") else str(uuid)
    text = text.replace("-", "").lower()
    if len(text) == 4:
        return f"0000{text}{SIG_SUFFIX}"
    return f"{text[0:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:32]}"


def parse_advertising_data(data: bytes) -> dict[str, Any]:
    """The AD structures bleak reports (name, service UUIDs, service/manufacturer data, tx power)."""
    out: dict[str, Any] = {
        "local_name": None,
        "service_uuids": [],
        "service_data": {},
        "manufacturer_data": {},
        "tx_power": None,
    }
    i = 0
    while i < len(data):
        length = data[i]
        if length == 0 or i + 1 + length > len(data):
            break
        ad_type, value = data[i + 1], data[i + 2 : i + 1 + length]
        i += 1 + length
        if ad_type in (0x02, 0x03):
            out["service_uuids"] += [
                f"0000{int.from_bytes(value[k : k + 2], 'little'):04x}{SIG_SUFFIX}" for k in range(0, len(value) - 1, 2)
            ]
        elif ad_type in (0x06, 0x07):
            for k in range(0, len(value) - 15, 16):
                h = value[k : k + 16][::-1].hex()
                out["service_uuids"].append(f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}")
        elif ad_type in (0x08, 0x09):
            out["local_name"] = value.decode("utf-8", "replace")
        elif ad_type == 0x0A and value:
            out["tx_power"] = int.from_bytes(value[:1], "little", signed=True)
        elif ad_type == 0x16 and len(value) >= 2:
            out["service_data"][f"0000{int.from_bytes(value[:2], 'little'):04x}{SIG_SUFFIX}"] = bytes(value[2:])
        elif ad_type == 0xFF and len(value) >= 2:
            out["manufacturer_data"][int.from_bytes(value[:2], "little")] = bytes(value[2:])
    return out


def advertising_data(name: str, service_uuids16: list[int]) -> bytes:
    """Flags (LE General Discoverable, no BR/EDR), complete 16-bit UUID list, complete local name."""
    out = bytes((2, 0x01, 0x06))
    if service_uuids16:
        uuids = b"".join(u.to_bytes(2, "little") for u in service_uuids16)
        out += bytes((len(uuids) + 1, 0x03)) + uuids
    encoded = name.encode()[: 29 - len(out)]
    return out + bytes((len(encoded) + 1, 0x09)) + encoded


class EmulatedRadio:
    """The shared in-process BLE medium and the gateway's own (central) controller."""

    def __init__(self, central_address: str = CENTRAL_ADDRESS) -> None:
        self.link = LocalLink()
        self.central = self.new_device("lastmile-gateway", central_address)
        self._scan_listeners: list[Callable[[Advertisement], None]] = []
        self._connect_lock = asyncio.Lock()  # one LE connection attempt at a time, like BlueZ
        self.central.on("advertisement", self._on_advertisement)
        self._started = False

    def new_device(self, name: str, address: str) -> Device:
        controller = Controller(name, link=self.link, public_address=address)
        return Device(name=name, address=Address(address), host=Host(controller, AsyncPipeSink(controller)))

    async def start(self) -> None:
        if not self._started:
            await self.central.power_on()
            self._started = True

    async def close(self) -> None:
        for conn in list(self.central.connections.values()):
            try:
                await conn.disconnect()
            except Exception:
                log.debug("disconnect at close failed", exc_info=True)
        if self.central.scanning:
            await self.central.stop_scanning()

    def backends(self) -> tuple[type[BaseBleakScanner], type[BaseBleakClient]]:
        """A bleak scanner backend and client backend bound to this radio."""
        radio = self
        return (
            type("EmulatedBleakScanner", (EmulatedBleakScanner,), {"radio": radio}),
            type("EmulatedBleakClient", (EmulatedBleakClient,), {"radio": radio}),
        )

    # -- scanning, shared by all scanners ---------------------------------------------------
    def _on_advertisement(self, adv: Advertisement) -> None:
        for listener in list(self._scan_listeners):
            listener(adv)

    async def add_scan_listener(self, listener: Callable[[Advertisement], None]) -> None:
        await self.start()
        self._scan_listeners.append(listener)
        if not self.central.scanning:
            await self.central.start_scanning(filter_duplicates=False)

    async def remove_scan_listener(self, listener: Callable[[Advertisement], None]) -> None:
        if listener in self._scan_listeners:
            self._scan_listeners.remove(listener)
        if not self._scan_listeners and self.central.scanning:
            await self.central.stop_scanning()

    async def connect(self, address: str, timeout: float) -> Connection:
        await self.start()
        async with self._connect_lock:
            return await self.central.connect(Address(address), timeout=timeout)


class EmulatedBleakScanner(BaseBleakScanner):
    radio: EmulatedRadio

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)

    async def start(self) -> None:
        self.seen_devices = {}
        await self.radio.add_scan_listener(self._on_advertisement)

    async def stop(self) -> None:
        await self.radio.remove_scan_listener(self._on_advertisement)

    def _on_advertisement(self, adv: Advertisement) -> None:
        ad = parse_advertising_data(adv.data_bytes)
        if not self.is_allowed_uuid(ad["service_uuids"]):
            return
        address = adv.address.to_string(False)
        data = AdvertisementData(
            local_name=ad["local_name"],
            manufacturer_data=ad["manufacturer_data"],
            service_data=ad["service_data"],
            service_uuids=ad["service_uuids"],
            tx_power=ad["tx_power"],
            rssi=adv.rssi,
            platform_data=(adv,),
        )
        device = self.create_or_update_device(address, address, ad["local_name"], {"emulated": address}, data)
        self.call_detection_callbacks(device, data)


def _protocol_error(exc: ATT_Error) -> BleakGATTProtocolError:
    return BleakGATTProtocolError(int(exc.error_code))


class EmulatedBleakClient(BaseBleakClient):
    radio: EmulatedRadio

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout)
        self.address = self.address.upper()
        self._conn: Connection | None = None
        self._peer: Peer | None = None
        self._callbacks: dict[int, NotifyCallback] = {}
        self._dispatchers: dict[int, Callable[[bytes], None]] = {}
        self._name = getattr(address_or_ble_device, "name", None) or self.address

    @property
    def name(self) -> str:
        return self._name

    @property
    def mtu_size(self) -> int:
        return int(self._conn.att_mtu) if self._conn else 23

    @property
    def is_connected(self) -> bool:
        return self._conn is not None

    def _require(self) -> tuple[Connection, Peer]:
        if self._conn is None or self._peer is None:
            raise BleakError("Not connected")
        return self._conn, self._peer

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        timeout = float(kwargs.get("timeout", self._timeout))
        try:
            conn = await self.radio.connect(self.address, timeout)
        except (TimeoutError, bumble_core.TimeoutError) as exc:
            raise BleakDeviceNotFoundError(self.address, f"Device with address {self.address} was not found") from exc
        except bumble_core.BaseBumbleError as exc:
            raise BleakError(f"connection to {self.address} failed: {exc}") from exc
        self._conn = conn
        self._peer = Peer(conn)
        conn.on(conn.EVENT_DISCONNECTION, self._on_disconnection)
        try:
            if pair:
                await conn.pair()
            self.services = await self._discover()
        except bumble_core.BaseBumbleError as exc:
            await self.disconnect()
            raise BleakError(f"set-up of {self.address} failed: {exc}") from exc
        except BaseException:
            await self.disconnect()
            raise

    def _on_disconnection(self, reason: int) -> None:
        log.debug("%s: disconnected (reason %#04x)", self.address, reason)
        was = self._conn is not None
        self._conn = self._peer = None
        self.services = None
        if was and self._disconnected_callback is not None:
            self._disconnected_callback()

    async def _discover(self) -> BleakGATTServiceCollection:
        _, peer = self._require()
        collection = BleakGATTServiceCollection()
        services: list[ServiceProxy] = await peer.discover_services()
        for s in services:
            service = BleakGATTService(s, s.handle, bleak_uuid(s.uuid))
            collection.add_service(service)
            for c in await s.discover_characteristics():
                props = [name for bit, name in _PROPERTY_NAMES.items() if int(c.properties) & bit]
                char = BleakGATTCharacteristic(
                    c,
                    c.handle,
                    bleak_uuid(c.uuid),
                    props,  # type: ignore[arg-type]
                    lambda: self.mtu_size - 3,
                    service,
                )
                collection.add_characteristic(char)
                for d in await peer.discover_descriptors(c):
                    collection.add_descriptor(BleakGATTDescriptor(d, d.handle, bleak_uuid(d.type), char))
        return collection

    async def disconnect(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = self._peer = None  # a disconnect we asked for: no callback
        self.services = None
        try:
            await conn.disconnect()
        except bumble_core.BaseBumbleError:
            log.debug("%s: disconnect failed", self.address, exc_info=True)

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        conn, _ = self._require()
        try:
            await conn.pair()
        except bumble_core.BaseBumbleError as exc:
            raise BleakError(f"pairing with {self.address} failed: {exc}") from exc

    async def unpair(self) -> None:
        await self.disconnect()

    async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, **kwargs: Any) -> bytearray:
        _, peer = self._require()
        proxy: CharacteristicProxy = characteristic.obj
        try:
            return bytearray(await peer.read_value(proxy))
        except ATT_Error as exc:
            raise _protocol_error(exc) from exc
        except bumble_core.BaseBumbleError as exc:
            raise BleakError(f"read of {characteristic.uuid} failed: {exc}") from exc

    async def read_gatt_descriptor(self, descriptor: BleakGATTDescriptor, **kwargs: Any) -> bytearray:
        _, peer = self._require()
        proxy: DescriptorProxy = descriptor.obj
        try:
            return bytearray(await peer.read_value(proxy))
        except ATT_Error as exc:
            raise _protocol_error(exc) from exc

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: Any, response: bool) -> None:
        _, peer = self._require()
        try:
            await peer.write_value(characteristic.obj, bytes(data), with_response=response)
        except ATT_Error as exc:
            raise _protocol_error(exc) from exc
        except bumble_core.BaseBumbleError as exc:
            raise BleakError(f"write of {characteristic.uuid} failed: {exc}") from exc

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        _, peer = self._require()
        try:
            await peer.write_value(descriptor.obj, bytes(data), with_response=True)
        except ATT_Error as exc:
            raise _protocol_error(exc) from exc

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        _, peer = self._require()
        handle = characteristic.handle
        self._callbacks[handle] = callback
        # One stable dispatcher per handle: subscribing again (after pairing) must not register twice.
        dispatcher = self._dispatchers.get(handle)
        if dispatcher is None:
            dispatcher = self._dispatchers[handle] = functools.partial(self._dispatch, handle)
        try:
            await peer.subscribe(characteristic.obj, dispatcher, prefer_notify=True)
        except ATT_Error as exc:
            raise _protocol_error(exc) from exc
        except bumble_core.BaseBumbleError as exc:
            raise BleakError(f"subscribe to {characteristic.uuid} failed: {exc}") from exc

    def _dispatch(self, handle: int, value: bytes) -> None:
        callback = self._callbacks.get(handle)
        if callback is not None:
            callback(bytearray(value))

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        _, peer = self._require()
        self._callbacks.pop(characteristic.handle, None)
        dispatcher = self._dispatchers.pop(characteristic.handle, None)
        try:
            await peer.unsubscribe(characteristic.obj, dispatcher)
        except ATT_Error as exc:
            raise _protocol_error(exc) from exc
