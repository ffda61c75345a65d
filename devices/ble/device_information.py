"""Device Information Service (0x180A): who made the device, which model, which unit.

Strings (manufacturer 0x2A29, model 0x2A24, serial 0x2A25, hardware 0x2A27, firmware 0x2A26,
software 0x2A28 revisions) are UTF-8; some devices pad them with NULs, which we strip. System ID
(0x2A23) is 8 bytes: 40-bit manufacturer-defined identifier, then the 24-bit OUI. PnP ID (0x2A50)
is Vendor ID Source u8, Vendor ID u16, Product ID u16, Product Version u16.
"""

from __future__ import annotations

from dataclasses import dataclass

from devices.ble.payload import PayloadReader
from devices.ble.uuids import (
    FIRMWARE_REVISION,
    HARDWARE_REVISION,
    MANUFACTURER_NAME,
    MODEL_NUMBER,
    SERIAL_NUMBER,
    SOFTWARE_REVISION,
)
from devices.errors import ProtocolError
from devices.identity import DeviceIdentity

STRING_CHARACTERISTICS: dict[int, str] = {
    MANUFACTURER_NAME: "Manufacturer Name String",
    MODEL_NUMBER: "Model Number String",
    SERIAL_NUMBER: "Serial Number String",
    HARDWARE_REVISION: "Hardware Revision String",
    FIRMWARE_REVISION: "Firmware Revision String",
    SOFTWARE_REVISION: "Software Revision String",
}
MAX_STRING = 248  # longer than any real device name; longer values are junk


def decode_string(data: bytes, what: str = "Device Information string") -> str:
    r = PayloadReader(data, what)
    raw = r.rest().rstrip(b"\x00")
    if len(raw) > MAX_STRING:
        raise ProtocolError(f"{what}: {len(raw)} bytes is not a plausible device string")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if any(ch < " " and ch not in "\t" for ch in text):
        raise ProtocolError(f"{what}: control characters in {text!r}")
    return text.strip()


@dataclass(frozen=True, slots=True)
class SystemId:
    manufacturer_identifier: int  # 40 bits
    organizationally_unique_identifier: int  # 24 bits


def decode_system_id(data: bytes) -> SystemId:
    r = PayloadReader(data, "System ID (0x2A23)")
    ident = int.from_bytes(r.take(5, "Manufacturer Identifier"), "little")
    oui = r.u24("Organizationally Unique Identifier")
    r.end()
    return SystemId(ident, oui)


VENDOR_ID_SOURCES = {1: "bluetooth-sig", 2: "usb-if"}


@dataclass(frozen=True, slots=True)
class PnpId:
    vendor_id_source: str
    vendor_id: int
    product_id: int
    product_version: int


def decode_pnp_id(data: bytes) -> PnpId:
    what = "PnP ID (0x2A50)"
    r = PayloadReader(data, what)
    source = r.u8("Vendor ID Source")
    if source not in VENDOR_ID_SOURCES:
        raise ProtocolError(f"{what}: vendor ID source {source} is reserved")
    pnp = PnpId(VENDOR_ID_SOURCES[source], r.u16("Vendor ID"), r.u16("Product ID"), r.u16("Product Version"))
    r.end()
    return pnp


def device_identity(address: str, strings: dict[int, str]) -> DeviceIdentity:
    """A DeviceIdentity from the decoded Device Information strings (UUID -> text)."""
    software = strings.get(SOFTWARE_REVISION) or strings.get(FIRMWARE_REVISION, "")
    return DeviceIdentity(
        manufacturer=strings.get(MANUFACTURER_NAME, ""),
        model=strings.get(MODEL_NUMBER, ""),
        serial=strings.get(SERIAL_NUMBER, ""),
        address=address.upper(),
        software_version=software,
    )
