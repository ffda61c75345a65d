"""Health Thermometer Service: Temperature Measurement (0x2A1C), Intermediate Temperature
(0x2A1E) and Temperature Type (0x2A1D).

Temperature Measurement: Flags u8 (bit 0: Fahrenheit, bit 1: Time Stamp present, bit 2:
Temperature Type present, bits 3-7 reserved); Temperature FLOAT; Time Stamp (Date Time);
Temperature Type u8.
"""

from __future__ import annotations

from devices.ble.measurement import Measurement, quantity
from devices.ble.payload import PayloadReader
from devices.ble.uuids import INTERMEDIATE_TEMPERATURE, TEMPERATURE_MEASUREMENT
from devices.errors import ProtocolError, UnsupportedFeatureError

FLAG_FAHRENHEIT = 0x01
FLAG_TIME_STAMP = 0x02
FLAG_TEMPERATURE_TYPE = 0x04
FLAGS_RESERVED = 0xF8

TEMPERATURE_TYPES: dict[int, str] = {
    1: "armpit",
    2: "body",
    3: "ear",
    4: "finger",
    5: "gastro-intestinal-tract",
    6: "mouth",
    7: "rectum",
    8: "toe",
    9: "tympanum",
}


def temperature_type_name(code: int, what: str) -> str:
    try:
        return TEMPERATURE_TYPES[code]
    except KeyError:
        raise ProtocolError(f"{what}: temperature type {code} is reserved") from None


def _decode(data: bytes, characteristic: int, what: str) -> Measurement:
    r = PayloadReader(data, what)
    flags = r.u8("Flags")
    if flags & FLAGS_RESERVED:
        raise UnsupportedFeatureError(f"{what}: reserved flag bits {flags & FLAGS_RESERVED:#04x} set")
    fahrenheit = bool(flags & FLAG_FAHRENHEIT)
    reading = r.float32("Temperature")
    device_time = r.date_time("Time Stamp") if flags & FLAG_TIME_STAMP else None
    site = temperature_type_name(r.u8("Temperature Type"), what) if flags & FLAG_TEMPERATURE_TYPE else None
    r.end()
    if fahrenheit:
        q = quantity("body-temperature", reading, "Cel", "[degF]", 5 / 9, -32 * 5 / 9, digits=2)
    else:
        q = quantity("body-temperature", reading, "Cel", "Cel")
    details: dict[str, object] = {"flags": flags, "units": "[degF]" if fahrenheit else "Cel"}
    if site:
        details["temperature_type"] = site
    live = characteristic == INTERMEDIATE_TEMPERATURE
    return Measurement(
        characteristic=characteristic,
        kind="body-temperature-intermediate" if live else "body-temperature",
        quantities=(q,),
        device_time=device_time,
        flags=(f"site-{site}",) if site else (),
        details=details,
        live=live,
    )


def decode_temperature_measurement(data: bytes) -> Measurement:
    return _decode(data, TEMPERATURE_MEASUREMENT, "Temperature Measurement (0x2A1C)")


def decode_intermediate_temperature(data: bytes) -> Measurement:
    return _decode(data, INTERMEDIATE_TEMPERATURE, "Intermediate Temperature (0x2A1E)")


def decode_temperature_type(data: bytes) -> str:
    """Temperature Type (0x2A1D): where the thermometer measures ("armpit", "ear" ...)."""
    what = "Temperature Type (0x2A1D)"
    r = PayloadReader(data, what)
    code = r.u8("Temperature Type")
    r.end()
    return temperature_type_name(code, what)
