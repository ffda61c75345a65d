"""16-bit characteristic UUID -> decoder: what `lastmile ble decode` and the BLE link use."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass

from devices.ble import uuids
from devices.ble.battery import decode_battery_level
from devices.ble.blood_pressure import (
    decode_blood_pressure_feature,
    decode_blood_pressure_measurement,
    decode_intermediate_cuff_pressure,
)
from devices.ble.current_time import decode_current_time
from devices.ble.device_information import STRING_CHARACTERISTICS, decode_pnp_id, decode_string, decode_system_id
from devices.ble.glucose import decode_glucose_context, decode_glucose_feature, decode_glucose_measurement
from devices.ble.payload import decode_date_time
from devices.ble.pulse_oximeter import decode_plx_continuous, decode_plx_features, decode_plx_spot_check
from devices.ble.racp import decode_racp
from devices.ble.thermometer import (
    decode_intermediate_temperature,
    decode_temperature_measurement,
    decode_temperature_type,
)
from devices.ble.weight import decode_weight_measurement
from devices.errors import UnsupportedFeatureError


@dataclass(frozen=True, slots=True)
class CharacteristicSpec:
    uuid16: int
    name: str
    decode: Callable[[bytes], object]


def _string_decoder(name: str) -> Callable[[bytes], object]:
    return lambda data: decode_string(data, name)


_SPECS = [
    CharacteristicSpec(
        uuids.BLOOD_PRESSURE_MEASUREMENT, "Blood Pressure Measurement", decode_blood_pressure_measurement
    ),
    CharacteristicSpec(
        uuids.INTERMEDIATE_CUFF_PRESSURE, "Intermediate Cuff Pressure", decode_intermediate_cuff_pressure
    ),
    CharacteristicSpec(uuids.BLOOD_PRESSURE_FEATURE, "Blood Pressure Feature", decode_blood_pressure_feature),
    CharacteristicSpec(uuids.TEMPERATURE_MEASUREMENT, "Temperature Measurement", decode_temperature_measurement),
    CharacteristicSpec(uuids.INTERMEDIATE_TEMPERATURE, "Intermediate Temperature", decode_intermediate_temperature),
    CharacteristicSpec(uuids.TEMPERATURE_TYPE, "Temperature Type", decode_temperature_type),
    CharacteristicSpec(uuids.PLX_SPOT_CHECK_MEASUREMENT, "PLX Spot-check Measurement", decode_plx_spot_check),
    CharacteristicSpec(uuids.PLX_CONTINUOUS_MEASUREMENT, "PLX Continuous Measurement", decode_plx_continuous),
    CharacteristicSpec(uuids.PLX_FEATURES, "PLX Features", decode_plx_features),
    CharacteristicSpec(uuids.WEIGHT_MEASUREMENT, "Weight Measurement", decode_weight_measurement),
    CharacteristicSpec(uuids.GLUCOSE_MEASUREMENT, "Glucose Measurement", decode_glucose_measurement),
    CharacteristicSpec(uuids.GLUCOSE_MEASUREMENT_CONTEXT, "Glucose Measurement Context", decode_glucose_context),
    CharacteristicSpec(uuids.GLUCOSE_FEATURE, "Glucose Feature", decode_glucose_feature),
    CharacteristicSpec(uuids.RECORD_ACCESS_CONTROL_POINT, "Record Access Control Point", decode_racp),
    CharacteristicSpec(uuids.CURRENT_TIME, "Current Time", decode_current_time),
    CharacteristicSpec(uuids.DATE_TIME, "Date Time", lambda data: decode_date_time(bytes(data))),
    CharacteristicSpec(uuids.SYSTEM_ID, "System ID", decode_system_id),
    CharacteristicSpec(uuids.PNP_ID, "PnP ID", decode_pnp_id),
    CharacteristicSpec(uuids.BATTERY_LEVEL, "Battery Level", decode_battery_level),
    *(CharacteristicSpec(u, name, _string_decoder(name)) for u, name in STRING_CHARACTERISTICS.items()),
]
DECODERS: dict[int, CharacteristicSpec] = {s.uuid16: s for s in _SPECS}


def spec_for(uuid16: int) -> CharacteristicSpec:
    try:
        return DECODERS[uuid16]
    except KeyError:
        raise UnsupportedFeatureError(f"no decoder for characteristic {uuid16:#06x}") from None


def decode(uuid16: int, data: bytes) -> object:
    """Decode a characteristic value; ProtocolError (or UnsupportedFeatureError) if it is malformed."""
    return spec_for(uuid16).decode(bytes(data))


def to_jsonable(value: object) -> object:
    """A decoded value as plain JSON types (for `ble decode --json` and logs)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value
