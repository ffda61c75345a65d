"""Bluetooth SIG health-profile decoders: spec vectors, every flag combination, every special
value, truncation/trailing-byte checks, and a fuzz test per decoder."""

from __future__ import annotations

import datetime as dt
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.ble import registry, uuids
from devices.ble.blood_pressure import (
    decode_blood_pressure_feature,
    decode_blood_pressure_measurement,
    decode_intermediate_cuff_pressure,
)
from devices.ble.current_time import decode_current_time, encode_current_time
from devices.ble.device_information import decode_pnp_id, decode_string, decode_system_id, device_identity
from devices.ble.glucose import decode_glucose_context, decode_glucose_feature, decode_glucose_measurement, with_context
from devices.ble.measurement import Measurement
from devices.ble.payload import decode_date_time, encode_date_time
from devices.ble.pulse_oximeter import decode_plx_continuous, decode_plx_features, decode_plx_spot_check
from devices.ble.sfloat import MedFloat, decode_float, decode_sfloat, encode_float, encode_sfloat
from devices.ble.thermometer import (
    decode_intermediate_temperature,
    decode_temperature_measurement,
    decode_temperature_type,
)
from devices.ble.weight import decode_weight_measurement
from devices.errors import ProtocolError, UnsupportedFeatureError

# ---------------------------------------------------------------------------------------------
# Spec vectors. Each is written out field by field from the GATT Specification Supplement.

# SFLOAT / FLOAT examples from the HL7 Personal Health Devices IG ("MDER FLOATs and SFLOATs").
SFLOAT_VECTORS = [
    (0x0002, 2.0, 0),
    (0xF014, 2.0, -1),
    (0xE0C8, 2.0, -2),
    (0x1002, 20.0, 1),
    (0x2002, 200.0, 2),
    (0x00C8, 200.0, 0),
    (0x04D2, 1234.0, 0),
    (0x0B2E, -1234.0, 0),
]
FLOAT_VECTORS = [
    (0x00000002, 2.0, 0),
    (0xFF000014, 2.0, -1),
    (0xFE0000C8, 2.0, -2),
    (0x01000002, 20.0, 1),
    (0x02000002, 200.0, 2),
    (0x000000C8, 200.0, 0),
    (0x000004D2, 1234.0, 0),
    (0x00FFFB2E, -1234.0, 0),
]
SFLOAT_SPECIAL_VECTORS = {0x07FF: "nan", 0x0800: "nres", 0x07FE: "+inf", 0x0802: "-inf", 0x0801: "reserved"}
FLOAT_SPECIAL_VECTORS = {
    0x007FFFFF: "nan",
    0x00800000: "nres",
    0x007FFFFE: "+inf",
    0x00800002: "-inf",
    0x00800001: "reserved",
}

# 0x2A35, mmHg, all fields: flags 0x1E | sys 120 | dia 80 | MAP 93 | 2024-03-05 09:30:15 |
# pulse 72 | user 1 | status 0x0004 (irregular pulse)
BP_MMHG_ALL_FIELDS = bytes.fromhex("1e780050005d00e8070305091e0f4800010400")
# 0x2A35, kPa, no options: flags 0x01 | sys 16.0 (0xF0A0) | dia 10.7 (0xF06B) | MAP 12.4 (0xF07C)
BP_KPA_MINIMAL = bytes.fromhex("01a0f06bf07cf0")
# 0x2A36 cuff pressure 45 mmHg, dia/MAP NaN, with time stamp
CUFF_PRESSURE = bytes.fromhex("022d00ff07ff07e8070305091e00")
# 0x2A1C 36.6 Cel (FLOAT 0xFF00016E), time 2024-03-05 09:31:00, type mouth (6)
TEMP_CEL_ALL = bytes.fromhex("066e0100ffe8070305091f0006")
# 0x2A1C 98.6 degF (FLOAT 0xFF0003DA), no options
TEMP_F_MINIMAL = bytes.fromhex("01da0300ff")
# 0x2A5E spot check: flags 0x1F | SpO2 97 | PR 64 | 2024-03-05 09:32:00 | meas status 0x0080
# (validated) | sensor status 0x000020 (low perfusion) | PAI 2.3 (0xF017)
PLX_SPOT_ALL = bytes.fromhex("1f61004000e8070305092000800020000017f0")
# 0x2A5F continuous: flags 0x1F | normal 98/70 | fast 97/71 | slow 98/69 | status 0 | sensor 0 | PAI 1.5
PLX_CONT_ALL = bytes.fromhex("1f62004600610047006200450000000000000ff0")
# 0x2A9D SI: flags 0x0E | 70.5 kg (14100 * 0.005) | 2024-03-05 09:33:00 | user 2 | BMI 23.0 | 1.751 m
WEIGHT_SI_ALL = bytes.fromhex("0e1437e807030509210002e600d706")
# 0x2A9D imperial, weight 154.50 lb, no options
WEIGHT_LB_MINIMAL = bytes.fromhex("015a3c")
# 0x2A18: flags 0x1B | seq 7 | base 2024-03-05 07:00:00 | offset +5 min | 90 mg/dL as kg/L
# (SFLOAT 0xB05A = 90e-5) | type capillary whole blood (1), location finger (1): 0x11 |
# annunciation 0x0001 (battery low)
GLUCOSE_ALL = bytes.fromhex("1b0700e807030507000005005ab0110100")
# 0x2A18 in mol/L: flags 0x06 | seq 8 | 2024-03-05 08:00:00 | 5.5 mmol/L (SFLOAT 0xC037 = 55e-4)
GLUCOSE_MOL = bytes.fromhex("060800e807030508000037c012")
# 0x2A34: flags 0x5F | seq 7 | carbohydrate breakfast 0.045 kg (SFLOAT 0xD02D) | meal preprandial |
# tester self + health no issues (0x51) | exercise 1800 s at 40 % | rapid-acting insulin 4e-6 kg
# (SFLOAT 0xA004) | HbA1c 6.1 % (0xF03D)
GLUCOSE_CONTEXT_ALL = bytes.fromhex("5f0700012dd001510807280104a03df0")
CURRENT_TIME_2024 = bytes.fromhex("e8070305091e0f028003")  # Tue 2024-03-05 09:30:15.5, manual+external
DATE_TIME_2024 = bytes.fromhex("e8070305091e0f")
PNP_ID = bytes.fromhex("025e0401020001")  # USB-IF, vendor 0x045E, product 0x0201, version 0x0100
SYSTEM_ID = bytes.fromhex("0102030405a1b2c3")


def sf(v: float | str, e: int = 0) -> bytes:
    return struct.pack("<H", encode_sfloat(v, e))


def fl(v: float | str, e: int = 0) -> bytes:
    return struct.pack("<I", encode_float(v, e))


T0 = dt.datetime(2024, 3, 5, 9, 30, 15)


def every_truncation_fails(decoder, vector: bytes) -> None:
    for n in range(len(vector)):
        with pytest.raises(ProtocolError):
            decoder(vector[:n])
    with pytest.raises(ProtocolError):
        decoder(vector + b"\x00")


# ---------------------------------------------------------------------------------------------
# SFLOAT / FLOAT


@pytest.mark.parametrize("raw,value,exponent", SFLOAT_VECTORS)
def test_sfloat_vectors(raw: int, value: float, exponent: int) -> None:
    got = decode_sfloat(raw)
    assert (got.value, got.exponent, got.special) == (value, exponent, None)
    assert encode_sfloat(value, exponent) == raw


@pytest.mark.parametrize("raw,value,exponent", FLOAT_VECTORS)
def test_float_vectors(raw: int, value: float, exponent: int) -> None:
    got = decode_float(raw)
    assert (got.value, got.exponent, got.special) == (value, exponent, None)
    assert encode_float(value, exponent) == raw


@pytest.mark.parametrize("exponent", range(-8, 8))
@pytest.mark.parametrize("mantissa,name", SFLOAT_SPECIAL_VECTORS.items())
def test_sfloat_specials_are_no_value_whatever_the_exponent(mantissa: int, name: str, exponent: int) -> None:
    got = decode_sfloat(((exponent & 0xF) << 12) | mantissa)
    assert got.value is None and got.special == name


@pytest.mark.parametrize("exponent", [-128, -1, 0, 1, 127])
@pytest.mark.parametrize("mantissa,name", FLOAT_SPECIAL_VECTORS.items())
def test_float_specials_are_no_value(mantissa: int, name: str, exponent: int) -> None:
    got = decode_float(((exponent & 0xFF) << 24) | mantissa)
    assert got.value is None and got.special == name


def test_sfloat_resolution_is_exact() -> None:
    assert decode_sfloat(encode_sfloat(36.6, -1)).value == 36.6
    assert decode_sfloat(0xF4D2).value == 123.4
    assert decode_sfloat(0x8001).value == 1e-8


def test_sfloat_range_checks() -> None:
    with pytest.raises(ProtocolError):
        decode_sfloat(0x10000)
    with pytest.raises(ValueError):
        encode_sfloat(2047)  # the NaN mantissa
    with pytest.raises(ValueError):
        encode_sfloat(5000)


@pytest.mark.parametrize(
    "decode,raw,value,exponent",
    [
        (decode_sfloat, 0x0000, 0.0, 0),  # a real 0 (0 mmHg cuff pressure, 0 kg tare)
        (decode_sfloat, 0xFFFF, -0.1, -1),  # the top of the range is a number, not a special value
        (decode_sfloat, 0x07FD, 2045.0, 0),
        (decode_sfloat, 0x0803, -2045.0, 0),
        (decode_float, 0x00000000, 0.0, 0),
        (decode_float, 0xFFFFFFFF, -0.1, -1),
        (decode_float, 0x007FFFFD, 8388605.0, 0),
        (decode_float, 0x00800003, -8388605.0, 0),
    ],
)
def test_zero_and_the_ends_of_the_range_decode_to_numbers(decode, raw: int, value: float, exponent: int) -> None:
    """0x0000 is zero, not "no value"; 0xFFFF is -0.1: neither may be refused or become a special."""
    got = decode(raw)
    assert (got.value, got.exponent, got.special, got.is_special) == (value, exponent, None, False)


@pytest.mark.parametrize(
    "decode,raw", [(decode_sfloat, -1), (decode_sfloat, 0x10000), (decode_float, -1), (decode_float, 0x1_0000_0000)]
)
def test_values_wider_than_the_field_are_refused(decode, raw: int) -> None:
    with pytest.raises(ProtocolError, match="must be"):
        decode(raw)


def test_a_special_value_says_so() -> None:
    assert decode_sfloat(0x07FF).is_special and decode_float(0x007FFFFF).is_special
    assert not decode_sfloat(0x0002).is_special
    assert MedFloat(2.0).exponent == 0 and MedFloat(2.0).special is None


@pytest.mark.parametrize(
    "encode,value,exponent,raw",
    [
        (encode_sfloat, 2045, 0, 0x07FD),
        (encode_sfloat, -2045, 0, 0x0803),  # largest non-special mantissas
        (encode_sfloat, 10**7, 7, 0x7001),
        (encode_sfloat, 1e-8, -8, 0x8001),  # exponent limits
        (encode_float, 8388605, 0, 0x007FFFFD),
        (encode_float, -8388605, 0, 0x00800003),
        (encode_float, 10**127, 127, 0x7F000001),
        (encode_float, 1e-128, -128, 0x80000001),
    ],
)
def test_encoding_reaches_the_ends_of_the_range(encode, value: float, exponent: int, raw: int) -> None:
    assert encode(value, exponent) == raw


@pytest.mark.parametrize(
    "encode,value,exponent,match",
    [
        (encode_sfloat, 2048, 0, "does not fit"),
        (encode_sfloat, -2049, 0, "does not fit"),
        (encode_sfloat, 2047, 0, "reserved"),
        (encode_sfloat, -2048, 0, "reserved"),
        (encode_sfloat, 2046, 0, "reserved"),
        (encode_sfloat, -2046, 0, "reserved"),
        (encode_sfloat, -2047, 0, "reserved"),
        (encode_sfloat, 10**8, 8, "does not fit"),
        (encode_sfloat, 1e-9, -9, "does not fit"),
        (encode_float, 2**23, 0, "does not fit"),
        (encode_float, -(2**23) - 1, 0, "does not fit"),
        (encode_float, 2**23 - 1, 0, "reserved"),
        (encode_float, -(2**23), 0, "reserved"),
        (encode_float, 10**128, 128, "does not fit"),
        (encode_float, 1e-129, -129, "does not fit"),
    ],
)
def test_encoding_refuses_what_does_not_fit_or_is_reserved(encode, value: float, exponent: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode(value, exponent)


def test_encoding_defaults_to_whole_units() -> None:
    assert encode_sfloat(2) == 0x0002 and encode_float(2) == 0x00000002
    assert encode_sfloat("nan") == 0x07FF and encode_float("-inf") == 0x00800002


# ---------------------------------------------------------------------------------------------
# Date Time / Current Time


def test_date_time_vector_and_round_trip() -> None:
    assert decode_date_time(DATE_TIME_2024) == T0
    assert encode_date_time(T0) == DATE_TIME_2024
    assert registry.decode(0x2A08, DATE_TIME_2024) == T0


@pytest.mark.parametrize("hexval", ["00000305091e0f", "e8070005091e0f", "e8070300091e0f", "00000000000000"])
def test_date_time_unknown_fields_mean_no_time(hexval: str) -> None:
    assert decode_date_time(bytes.fromhex(hexval)) is None


@pytest.mark.parametrize(
    "hexval",
    [
        "e8070d05091e0f",
        "e8070320091e0f",
        "e8070305181e0f",
        "e8070305093c0f",
        "e8070305091e3c",
        "e807021e091e0f",
        "01000101000000",
        "e8070431000000",
    ],
)
def test_date_time_out_of_range_is_protocol_error(hexval: str) -> None:
    with pytest.raises(ProtocolError):
        decode_date_time(bytes.fromhex(hexval))


def test_current_time_vector_both_directions() -> None:
    ct = decode_current_time(CURRENT_TIME_2024)
    assert ct.local_time == T0.replace(microsecond=500000)
    assert ct.day_of_week == 2 and ct.adjust_reasons == ("manual-time-update", "external-reference-time-update")
    assert encode_current_time(T0.replace(microsecond=500000)) == CURRENT_TIME_2024
    every_truncation_fails(decode_current_time, CURRENT_TIME_2024)


def test_current_time_rejects_inconsistent_values() -> None:
    with pytest.raises(ProtocolError):
        decode_current_time(CURRENT_TIME_2024[:7] + b"\x03\x00\x00")  # 5 March 2024 is a Tuesday
    with pytest.raises(ProtocolError):
        decode_current_time(CURRENT_TIME_2024[:7] + b"\x08\x00\x00")
    with pytest.raises(ProtocolError):
        decode_current_time(CURRENT_TIME_2024[:9] + b"\x10")
    assert decode_current_time(CURRENT_TIME_2024[:7] + b"\x00\x00\x00").day_of_week == 0
    with pytest.raises(ValueError):
        encode_current_time(T0.replace(tzinfo=dt.timezone.utc))


@settings(deadline=None, max_examples=200)
@given(st.datetimes(min_value=dt.datetime(1582, 1, 1), max_value=dt.datetime(9999, 12, 31)))
def test_current_time_round_trip(t: dt.datetime) -> None:
    back = decode_current_time(encode_current_time(t)).local_time
    assert back is not None and abs(back - t) < dt.timedelta(seconds=1 / 256 + 1e-6)


# ---------------------------------------------------------------------------------------------
# Blood pressure (0x2A35 / 0x2A36 / 0x2A49)


def test_bp_vector_all_fields() -> None:
    m = decode_blood_pressure_measurement(BP_MMHG_ALL_FIELDS)
    assert m.kind == "blood-pressure" and m.device_time == T0 and m.user_id == 1
    assert [(q.code, q.value, q.unit) for q in m.quantities] == [
        ("systolic", 120.0, "mm[Hg]"),
        ("diastolic", 80.0, "mm[Hg]"),
        ("mean-arterial-pressure", 93.0, "mm[Hg]"),
        ("pulse-rate", 72.0, "/min"),
    ]
    assert m.flags == ("irregular-pulse",)
    every_truncation_fails(decode_blood_pressure_measurement, BP_MMHG_ALL_FIELDS)


def test_bp_kpa_is_normalised_and_keeps_what_was_sent() -> None:
    m = decode_blood_pressure_measurement(BP_KPA_MINIMAL)
    sys = {q.code: q for q in m.quantities}
    assert (sys["systolic"].value, sys["systolic"].sent_value, sys["systolic"].sent_unit) == (120.0, 16.0, "kPa")
    assert sys["diastolic"].value == 80.3 and sys["mean-arterial-pressure"].value == 93.0
    assert m.device_time is None and m.user_id is None and m.flags == ()


def _bp_payload(flags: int, sys_: bytes, dia: bytes, mean: bytes) -> bytes:
    out = bytes((flags,)) + sys_ + dia + mean
    if flags & 0x02:
        out += DATE_TIME_2024
    if flags & 0x04:
        out += sf(72)
    if flags & 0x08:
        out += b"\x03"
    if flags & 0x10:
        out += struct.pack("<H", 0b101111)  # every status bit + range "above"
    return out


@pytest.mark.parametrize("flags", range(32))
@pytest.mark.parametrize("decoder", [decode_blood_pressure_measurement, decode_intermediate_cuff_pressure])
def test_bp_every_flag_combination(flags: int, decoder) -> None:
    data = _bp_payload(flags, sf(12.0, -1) if flags & 1 else sf(120), sf("nan"), sf("nan"))
    m = decoder(data)
    codes = [q.code for q in m.quantities]
    assert (m.device_time == T0) is bool(flags & 0x02)
    assert ("pulse-rate" in codes) is bool(flags & 0x04)
    assert (m.user_id == 3) is bool(flags & 0x08)
    assert m.quantities[0].sent_unit == ("kPa" if flags & 1 else "mm[Hg]")
    if flags & 0x10:
        assert m.flags == (
            "body-movement",
            "cuff-too-loose",
            "irregular-pulse",
            "improper-measurement-position",
            "pulse-rate-above-range",
        )
    else:
        assert m.flags == ()
    if decoder is decode_intermediate_cuff_pressure:
        assert codes[0] == "cuff-pressure" and m.live and len(codes) == 1 + bool(flags & 0x04)
    else:
        assert codes[:3] == ["systolic", "diastolic", "mean-arterial-pressure"] and not m.live
        assert m.quantities[1].value is None and m.quantities[1].special == "nan"
    every_truncation_fails(decoder, data)


@pytest.mark.parametrize(
    "bits,expected",
    [
        (0b00000, ()),
        (0b00001, ("body-movement",)),
        (0b00010, ("cuff-too-loose",)),
        (0b00100, ("irregular-pulse",)),
        (0b01000, ("pulse-rate-above-range",)),
        (0b10000, ("pulse-rate-below-range",)),
        (0b11000, ("pulse-rate-range-reserved",)),
        (0b100000, ("improper-measurement-position",)),
        (0xFFC0, ()),
    ],
)
def test_bp_each_status_bit(bits: int, expected: tuple[str, ...]) -> None:
    m = decode_blood_pressure_measurement(_bp_payload(0x10, sf(120), sf(80), sf(93))[:7] + struct.pack("<H", bits))
    assert m.flags == expected and m.details["measurement_status"] == bits


@pytest.mark.parametrize("special", ["nan", "nres", "+inf", "-inf", "reserved"])
@pytest.mark.parametrize("position", range(4))
def test_bp_special_values_are_no_value_never_zero(special: str, position: int) -> None:
    fields = [sf(120), sf(80), sf(93), sf(72)]
    fields[position] = sf(special)
    m = decode_blood_pressure_measurement(b"\x04" + b"".join(fields))
    q = m.quantities[position]
    assert q.value is None and q.sent_value is None and q.special == special
    assert all(o.value is not None for i, o in enumerate(m.quantities) if i != position)


def test_bp_special_values_in_kpa_stay_no_value() -> None:
    m = decode_blood_pressure_measurement(b"\x01" + sf("nres") + sf(10.7, -1) + sf(12.4, -1))
    assert m.quantities[0].value is None and m.quantities[0].special == "nres"


@pytest.mark.parametrize("bit", [0x20, 0x40, 0x80])
def test_bp_reserved_flags_are_refused(bit: int) -> None:
    with pytest.raises(UnsupportedFeatureError):
        decode_blood_pressure_measurement(bytes((bit,)) + BP_KPA_MINIMAL[1:])


def test_bp_unknown_user_is_none() -> None:
    m = decode_blood_pressure_measurement(b"\x08" + BP_KPA_MINIMAL[1:] + b"\xff")
    assert m.user_id is None and m.details["user_id"] == 255


def test_cuff_pressure_vector() -> None:
    m = decode_intermediate_cuff_pressure(CUFF_PRESSURE)
    assert m.quantities[0].value == 45.0 and m.device_time == T0.replace(second=0) and m.live


def test_bp_feature() -> None:
    assert decode_blood_pressure_feature(b"\x05\x00") == ("body-movement-detection", "irregular-pulse-detection")
    every_truncation_fails(decode_blood_pressure_feature, b"\x05\x00")


# ---------------------------------------------------------------------------------------------
# Thermometer (0x2A1C / 0x2A1E / 0x2A1D)


def test_temperature_vectors() -> None:
    m = decode_temperature_measurement(TEMP_CEL_ALL)
    q = m.quantities[0]
    assert (q.code, q.value, q.unit, q.sent_unit) == ("body-temperature", 36.6, "Cel", "Cel")
    assert m.device_time == dt.datetime(2024, 3, 5, 9, 31, 0) and m.flags == ("site-mouth",)
    every_truncation_fails(decode_temperature_measurement, TEMP_CEL_ALL)
    f = decode_temperature_measurement(TEMP_F_MINIMAL).quantities[0]
    assert (f.value, f.unit, f.sent_value, f.sent_unit) == (37.0, "Cel", 98.6, "[degF]")


@pytest.mark.parametrize("flags", range(8))
@pytest.mark.parametrize("decoder", [decode_temperature_measurement, decode_intermediate_temperature])
def test_temperature_every_flag_combination(flags: int, decoder) -> None:
    data = bytes((flags,)) + fl(98.6, -1) + (DATE_TIME_2024 if flags & 2 else b"") + (b"\x01" if flags & 4 else b"")
    m = decoder(data)
    assert m.quantities[0].sent_unit == ("[degF]" if flags & 1 else "Cel")
    assert m.quantities[0].value == (37.0 if flags & 1 else 98.6)
    assert (m.device_time == T0) is bool(flags & 2)
    assert m.flags == (("site-armpit",) if flags & 4 else ())
    assert m.live is (decoder is decode_intermediate_temperature)
    every_truncation_fails(decoder, data)


@pytest.mark.parametrize("special", ["nan", "nres", "+inf", "-inf", "reserved"])
@pytest.mark.parametrize("fahrenheit", [0, 1])
def test_temperature_specials(special: str, fahrenheit: int) -> None:
    q = decode_temperature_measurement(bytes((fahrenheit,)) + fl(special)).quantities[0]
    assert q.value is None and q.special == special


@pytest.mark.parametrize(
    "code,name",
    [
        (1, "armpit"),
        (2, "body"),
        (3, "ear"),
        (4, "finger"),
        (5, "gastro-intestinal-tract"),
        (6, "mouth"),
        (7, "rectum"),
        (8, "toe"),
        (9, "tympanum"),
    ],
)
def test_temperature_type(code: int, name: str) -> None:
    assert decode_temperature_type(bytes((code,))) == name


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x0a", b"\xff", b"\x01\x01"])
def test_temperature_type_malformed(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_temperature_type(data)


def test_temperature_reserved_flags_refused() -> None:
    for bit in (0x08, 0x10, 0x20, 0x40, 0x80):
        with pytest.raises(UnsupportedFeatureError):
            decode_temperature_measurement(bytes((bit,)) + TEMP_F_MINIMAL[1:])


# ---------------------------------------------------------------------------------------------
# Pulse oximeter (0x2A5E / 0x2A5F / 0x2A60)


def test_plx_spot_check_vector() -> None:
    m = decode_plx_spot_check(PLX_SPOT_ALL)
    assert [(q.code, q.value, q.unit) for q in m.quantities] == [
        ("spo2", 97.0, "%"),
        ("pulse-rate", 64.0, "/min"),
        ("pulse-amplitude-index", 2.3, "%"),
    ]
    assert m.device_time == dt.datetime(2024, 3, 5, 9, 32, 0)
    assert m.flags == ("validated-data", "low-perfusion", "device-clock-not-set") and m.clock_untrusted
    every_truncation_fails(decode_plx_spot_check, PLX_SPOT_ALL)


def test_plx_continuous_vector() -> None:
    m = decode_plx_continuous(PLX_CONT_ALL)
    assert [(q.code, q.value) for q in m.quantities] == [
        ("spo2", 98.0),
        ("pulse-rate", 70.0),
        ("spo2-fast", 97.0),
        ("pulse-rate-fast", 71.0),
        ("spo2-slow", 98.0),
        ("pulse-rate-slow", 69.0),
        ("pulse-amplitude-index", 1.5),
    ]
    assert m.live and m.device_time is None and m.flags == ()
    every_truncation_fails(decode_plx_continuous, PLX_CONT_ALL)


@pytest.mark.parametrize("flags", range(32))
def test_plx_spot_check_every_flag_combination(flags: int) -> None:
    data = bytes((flags,)) + sf(97) + sf(64)
    data += DATE_TIME_2024 if flags & 1 else b""
    data += struct.pack("<H", 1 << 13) if flags & 2 else b""
    data += (1 << 15).to_bytes(3, "little") if flags & 4 else b""
    data += sf(2.3, -1) if flags & 8 else b""
    m = decode_plx_spot_check(data)
    assert (m.device_time == T0) is bool(flags & 1)
    assert ("measurement-unavailable" in m.flags) is bool(flags & 2)
    assert ("sensor-disconnected" in m.flags) is bool(flags & 4)
    assert (len(m.quantities) == 3) is bool(flags & 8)
    assert m.clock_untrusted is bool(flags & 16)
    every_truncation_fails(decode_plx_spot_check, data)


@pytest.mark.parametrize("flags", range(32))
def test_plx_continuous_every_flag_combination(flags: int) -> None:
    data = bytes((flags,)) + sf(98) + sf(70)
    data += sf(97) + sf(71) if flags & 1 else b""
    data += sf(99) + sf(69) if flags & 2 else b""
    data += struct.pack("<H", 1 << 15) if flags & 4 else b""
    data += (1 << 0).to_bytes(3, "little") if flags & 8 else b""
    data += sf("nan") if flags & 16 else b""
    m = decode_plx_continuous(data)
    codes = [q.code for q in m.quantities]
    assert ("spo2-fast" in codes) is bool(flags & 1) and ("spo2-slow" in codes) is bool(flags & 2)
    assert ("invalid-measurement" in m.flags) is bool(flags & 4)
    assert ("extended-display-update-ongoing" in m.flags) is bool(flags & 8)
    assert ("pulse-amplitude-index" in codes) is bool(flags & 16)
    every_truncation_fails(decode_plx_continuous, data)


@pytest.mark.parametrize("bit", range(16))
def test_plx_each_status_bit(bit: int) -> None:
    statuses = struct.pack("<H", 1 << bit) + (1 << bit).to_bytes(3, "little")
    m = decode_plx_spot_check(b"\x06" + sf(97) + sf(64) + statuses)
    assert m.details["measurement_status"] == 1 << bit
    assert len(m.flags) == (1 if bit < 5 else 2)  # measurement-status bits 0-4 are reserved


@pytest.mark.parametrize("special", ["nan", "nres", "+inf", "-inf", "reserved"])
def test_plx_specials(special: str) -> None:
    m = decode_plx_continuous(b"\x00" + sf(special) + sf(special))
    assert all(q.value is None and q.special == special for q in m.quantities)


def test_plx_reserved_flags_refused_and_features() -> None:
    for decoder in (decode_plx_spot_check, decode_plx_continuous):
        for bit in (0x20, 0x40, 0x80):
            with pytest.raises(UnsupportedFeatureError):
                decoder(bytes((bit,)) + sf(97) + sf(64))
    assert decode_plx_features(b"\x03\x00" + b"\xe0\xff" + b"\xff\xff\x00") == (
        "measurement-status",
        "device-and-sensor-status",
    )
    every_truncation_fails(decode_plx_features, b"\x03\x00" + b"\xe0\xff" + b"\xff\xff\x00")


# ---------------------------------------------------------------------------------------------
# Weight (0x2A9D)


def test_weight_vectors() -> None:
    m = decode_weight_measurement(WEIGHT_SI_ALL)
    assert [(q.code, q.value, q.unit) for q in m.quantities] == [
        ("body-weight", 70.5, "kg"),
        ("body-mass-index", 23.0, "kg/m2"),
        ("body-height", 1.751, "m"),
    ]
    assert m.user_id == 2 and m.device_time == dt.datetime(2024, 3, 5, 9, 33, 0)
    every_truncation_fails(decode_weight_measurement, WEIGHT_SI_ALL)
    q = decode_weight_measurement(WEIGHT_LB_MINIMAL).quantities[0]
    assert (q.value, q.unit, q.sent_value, q.sent_unit) == (70.08, "kg", 154.5, "[lb_av]")


@pytest.mark.parametrize("flags", range(16))
def test_weight_every_flag_combination(flags: int) -> None:
    data = bytes((flags,)) + struct.pack("<H", 14100) + (DATE_TIME_2024 if flags & 2 else b"")
    data += b"\x02" if flags & 4 else b""
    data += struct.pack("<HH", 230, 1751 if not flags & 1 else 689) if flags & 8 else b""
    m = decode_weight_measurement(data)
    assert m.quantities[0].sent_unit == ("[lb_av]" if flags & 1 else "kg")
    assert (m.device_time == T0) is bool(flags & 2)
    assert (m.user_id == 2) is bool(flags & 4)
    assert (len(m.quantities) == 3) is bool(flags & 8)
    if flags & 8:
        assert m.quantities[2].value == (1.751 if not flags & 1 else 1.75)
    every_truncation_fails(decode_weight_measurement, data)


def test_weight_unsuccessful_is_no_value() -> None:
    m = decode_weight_measurement(b"\x00\xff\xff")
    assert m.quantities[0].value is None and m.quantities[0].special == "nan"
    assert m.flags == ("measurement-unsuccessful",)
    with pytest.raises(UnsupportedFeatureError):
        decode_weight_measurement(b"\x10\x00\x00")


# ---------------------------------------------------------------------------------------------
# Glucose (0x2A18 / 0x2A34 / 0x2A51)


def test_glucose_vector() -> None:
    m = decode_glucose_measurement(GLUCOSE_ALL)
    q = m.quantities[0]
    assert (q.code, q.value, q.unit, q.sent_value, q.sent_unit) == ("glucose", 90.0, "mg/dL", 0.0009, "kg/L")
    assert m.sequence == 7 and m.device_time == dt.datetime(2024, 3, 5, 7, 5, 0)
    assert m.flags == ("sample-capillary-whole-blood", "site-finger", "battery-low") and m.context_follows
    every_truncation_fails(decode_glucose_measurement, GLUCOSE_ALL)
    q = decode_glucose_measurement(GLUCOSE_MOL).quantities[0]
    assert (q.value, q.sent_value, q.sent_unit) == (99.1, 0.0055, "mol/L")


@pytest.mark.parametrize("flags", range(32))
def test_glucose_every_flag_combination(flags: int) -> None:
    data = bytes((flags,)) + struct.pack("<H", 300) + DATE_TIME_2024
    data += struct.pack("<h", -90) if flags & 1 else b""
    data += (sf(0.0055, -4) if flags & 4 else sf(0.0009, -5)) + b"\xf2" if flags & 2 else b""
    data += struct.pack("<H", 1 << 11) if flags & 8 else b""
    m = decode_glucose_measurement(data)
    assert m.sequence == 300
    assert m.device_time == T0 - dt.timedelta(minutes=90 if flags & 1 else 0)
    if flags & 2:
        assert m.quantities[0].sent_unit == ("mol/L" if flags & 4 else "kg/L")
        assert m.flags[0] == "sample-capillary-plasma"  # 0xF2: location 15 "not available" adds no site
    else:
        assert m.quantities == ()
    assert m.clock_untrusted is bool(flags & 8)
    assert m.context_follows is bool(flags & 16)
    every_truncation_fails(decode_glucose_measurement, data)


@pytest.mark.parametrize("type_location", [0x00, 0x1B, 0x01, 0x51, 0xE1])
def test_glucose_reserved_type_or_location(type_location: int) -> None:
    # type 0 or 11, location 0, 5 or 14: reserved values
    data = b"\x02" + struct.pack("<H", 1) + DATE_TIME_2024 + sf(0.0009, -5) + bytes((type_location,))
    with pytest.raises(ProtocolError):
        decode_glucose_measurement(data)


@pytest.mark.parametrize("special", ["nan", "nres", "+inf", "-inf", "reserved"])
def test_glucose_specials(special: str) -> None:
    data = b"\x02" + struct.pack("<H", 1) + DATE_TIME_2024 + sf(special) + b"\x11"
    q = decode_glucose_measurement(data).quantities[0]
    assert q.value is None and q.special == special


def test_glucose_context_vector_and_merge() -> None:
    ctx = decode_glucose_context(GLUCOSE_CONTEXT_ALL)
    assert ctx.sequence == 7
    assert ctx.flags == (
        "carbohydrate-breakfast",
        "meal-preprandial",
        "tester-self",
        "health-no-health-issues",
        "medication-rapid-acting-insulin",
    )
    assert [(q.code, q.value, q.unit) for q in ctx.quantities] == [
        ("carbohydrate-intake", 45.0, "g"),
        ("exercise-duration", 1800.0, "s"),
        ("exercise-intensity", 40.0, "%"),
        ("medication", 4.0, "mg"),
        ("hba1c", 6.1, "%"),
    ]
    every_truncation_fails(decode_glucose_context, GLUCOSE_CONTEXT_ALL)
    merged = with_context(decode_glucose_measurement(GLUCOSE_ALL), ctx)
    assert [q.code for q in merged.quantities] == ["glucose"] + [q.code for q in ctx.quantities]
    assert "meal-preprandial" in merged.flags and not merged.context_follows
    with pytest.raises(ProtocolError):
        with_context(decode_glucose_measurement(GLUCOSE_MOL), ctx)


@pytest.mark.parametrize("flags", range(256))
def test_glucose_context_every_flag_combination(flags: int) -> None:
    data = bytes((flags,)) + struct.pack("<H", 9)
    data += b"\x00" if flags & 0x80 else b""
    data += b"\x02" + sf(0.06, -3) if flags & 0x01 else b""
    data += b"\x03" if flags & 0x02 else b""
    data += b"\x22" if flags & 0x04 else b""
    data += struct.pack("<HB", 0xFFFF, 100) if flags & 0x08 else b""
    data += b"\x05" + sf(0.002, -3) if flags & 0x10 else b""
    data += sf(7.2, -1) if flags & 0x40 else b""
    ctx = decode_glucose_context(data)
    codes = [q.code for q in ctx.quantities]
    assert ("carbohydrate-lunch" in ctx.flags) is bool(flags & 0x01)
    assert ("meal-fasting" in ctx.flags) is bool(flags & 0x02)
    assert ("tester-health-care-professional" in ctx.flags) is bool(flags & 0x04)
    assert ("exercise-duration-overrun" in ctx.flags) is bool(flags & 0x08)
    if flags & 0x10:
        med = next(q for q in ctx.quantities if q.code == "medication")
        assert (med.unit, med.value) == (("mL", 2.0) if flags & 0x20 else ("mg", 2000.0))
    assert ("hba1c" in codes) is bool(flags & 0x40)
    every_truncation_fails(decode_glucose_context, data)


@pytest.mark.parametrize("special", ["nan", "nres", "+inf", "-inf", "reserved"])
def test_glucose_context_specials(special: str) -> None:
    ctx = decode_glucose_context(
        b"\x51" + struct.pack("<H", 3) + b"\x01" + sf(special) + b"\x01" + sf(special) + sf(special)
    )
    assert [(q.code, q.value, q.special) for q in ctx.quantities] == [
        ("carbohydrate-intake", None, special),
        ("medication", None, special),
        ("hba1c", None, special),
    ]


def test_glucose_context_reserved_values() -> None:
    with pytest.raises(UnsupportedFeatureError):
        decode_glucose_context(b"\x80\x01\x00\x01")  # extended flags with a reserved bit
    with pytest.raises(ProtocolError):
        decode_glucose_context(b"\x02\x01\x00\x06")  # meal 6 reserved
    with pytest.raises(ProtocolError):
        decode_glucose_context(b"\x08\x01\x00\x10\x00\x65")  # intensity 101 %


def test_glucose_feature() -> None:
    assert decode_glucose_feature(b"\x01\x04") == ("low-battery-detection", "multiple-bond")


# ---------------------------------------------------------------------------------------------
# Device Information (0x180A)


def test_device_information() -> None:
    assert decode_string(b"Omron Healthcare\x00\x00") == "Omron Healthcare"
    assert decode_string("Térmómetro".encode()) == "Térmómetro"
    for bad in (b"\xff\xfe", b"abc\x01", b"x" * 300):
        with pytest.raises(ProtocolError):
            decode_string(bad)
    pnp = decode_pnp_id(PNP_ID)
    assert (pnp.vendor_id_source, pnp.vendor_id, pnp.product_id, pnp.product_version) == (
        "usb-if",
        0x045E,
        0x0201,
        0x0100,
    )
    every_truncation_fails(decode_pnp_id, PNP_ID)
    with pytest.raises(ProtocolError):
        decode_pnp_id(b"\x03" + PNP_ID[1:])
    sid = decode_system_id(SYSTEM_ID)
    assert sid.manufacturer_identifier == 0x0504030201 and sid.organizationally_unique_identifier == 0xC3B2A1
    every_truncation_fails(decode_system_id, SYSTEM_ID)
    ident = device_identity(
        "aa:bb:cc:dd:ee:ff",
        {
            uuids.MANUFACTURER_NAME: "Acme",
            uuids.MODEL_NUMBER: "BP-1",
            uuids.SERIAL_NUMBER: "123",
            uuids.FIRMWARE_REVISION: "1.2",
        },
    )
    assert (ident.manufacturer, ident.model, ident.serial, ident.address, ident.software_version) == (
        "Acme",
        "BP-1",
        "123",
        "AA:BB:CC:DD:EE:FF",
        "1.2",
    )


# ---------------------------------------------------------------------------------------------
# Registry and UUID parsing


@pytest.mark.parametrize("text", ["2a35", "0x2A35", "2A35", " 0x2a35 ", "00002a35-0000-1000-8000-00805f9b34fb"])
def test_uuid_parsing(text: str) -> None:
    assert uuids.parse_uuid16(text) == 0x2A35


@pytest.mark.parametrize("text", ["2a3", "0x12345", "zz35", "00002a35-0000-1000-8000-00805f9b34fc", ""])
def test_uuid_parsing_rejects(text: str) -> None:
    with pytest.raises(ProtocolError):
        uuids.parse_uuid16(text)


def test_registry_json_and_unknown() -> None:
    out = registry.to_jsonable(registry.decode(0x2A35, BP_MMHG_ALL_FIELDS))
    assert out["device_time"] == "2024-03-05T09:30:15" and out["quantities"][0]["value"] == 120.0
    with pytest.raises(UnsupportedFeatureError):
        registry.decode(0x2A99, b"")


# ---------------------------------------------------------------------------------------------
# Fuzz: decode or raise the typed error, nothing else.


@pytest.mark.parametrize("uuid16", sorted(registry.DECODERS), ids=lambda u: f"{u:04x}")
@settings(deadline=None, max_examples=150)
@given(data=st.binary(max_size=40))
def test_fuzz_every_decoder(uuid16: int, data: bytes) -> None:
    try:
        registry.decode(uuid16, data)
    except ProtocolError:
        pass


# A structured fuzz: valid flags with random field bytes reach deeper than random bytes.
@pytest.mark.parametrize(
    "uuid16", [0x2A35, 0x2A36, 0x2A1C, 0x2A5E, 0x2A5F, 0x2A9D, 0x2A18, 0x2A34, 0x2A52, 0x2A2B], ids=lambda u: f"{u:04x}"
)
@settings(deadline=None, max_examples=150)
@given(flags=st.integers(0, 0x1F), body=st.binary(min_size=0, max_size=30))
def test_fuzz_structured(uuid16: int, flags: int, body: bytes) -> None:
    try:
        registry.decode(uuid16, bytes((flags,)) + body)
    except ProtocolError:
        pass


def test_flag_combination_builder_matches_the_hand_written_vector() -> None:
    # The builders above use struct, not the decoders' reader; check them against a spec vector.
    built = _bp_payload(0x1E, sf(120), sf(80), sf(93))
    assert built[:-3] == BP_MMHG_ALL_FIELDS[:14] + sf(72)


@pytest.mark.parametrize(
    "bit,name",
    [
        (0, "body-movement-detection"),
        (1, "cuff-fit-detection"),
        (2, "irregular-pulse-detection"),
        (3, "pulse-rate-range-detection"),
        (4, "measurement-position-detection"),
        (5, "multiple-bond"),
    ],
)
def test_blood_pressure_feature_bits_follow_the_gatt_supplement(bit: int, name: str) -> None:
    """Blood Pressure Feature (0x2A49) bits 0-5, each alone: a cuff that cannot detect an
    irregular pulse must not be shown as one that can (its silence would read as "regular")."""
    assert decode_blood_pressure_feature(struct.pack("<H", 1 << bit)) == (name,)
    assert decode_blood_pressure_feature(struct.pack("<H", 0xFFC0)) == ()  # reserved bits: no feature


# -- the bounds-checked reader and Date Time, at their limits ---------------------------------


def _dt(year: int, month: int, day: int, h: int = 0, m: int = 0, s: int = 0) -> bytes:
    return struct.pack("<HBBBBB", year, month, day, h, m, s)


@pytest.mark.parametrize(
    "raw,expected",
    [
        (_dt(1582, 1, 1), dt.datetime(1582, 1, 1)),
        (_dt(9999, 12, 31, 23, 59, 59), dt.datetime(9999, 12, 31, 23, 59, 59)),
        (_dt(2024, 2, 29, 12, 0, 0), dt.datetime(2024, 2, 29, 12)),
    ],
)
def test_date_time_limits_are_accepted(raw: bytes, expected: dt.datetime) -> None:
    assert decode_date_time(raw) == expected
    assert encode_date_time(expected) == raw


@pytest.mark.parametrize(
    "raw,needle",
    [
        (_dt(1581, 1, 1), "outside 1582-9999"),
        (_dt(10000, 1, 1), "outside 1582-9999"),
        (_dt(2024, 13, 1), "field out of range"),
        (_dt(2024, 1, 32), "field out of range"),
        (_dt(2024, 1, 1, 24), "field out of range"),
        (_dt(2024, 1, 1, 0, 60), "field out of range"),
        (_dt(2024, 1, 1, 0, 0, 60), "field out of range"),
        (_dt(2023, 2, 29), "no such date"),
        (b"\xe8\x07\x03\x05\x09\x1e", "is 7 bytes, got 6"),
    ],
)
def test_date_time_out_of_range_says_which(raw: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        decode_date_time(raw, "Date Time")


def test_date_time_encoding_refuses_years_the_format_cannot_hold() -> None:
    assert encode_date_time(None) == bytes(7)
    with pytest.raises(ValueError, match="year 1581 cannot be sent"):
        encode_date_time(dt.datetime(1581, 12, 31))
    assert encode_date_time(dt.datetime(1582, 1, 1)) == _dt(1582, 1, 1)


def test_the_payload_reader_reads_exactly_what_is_there() -> None:
    from devices.ble.payload import MAX_ATTRIBUTE_LENGTH, PayloadReader

    r = PayloadReader(bytes([0x01, 0x34, 0x12, 0xFE, 0xFF, 0x56, 0x34, 0x12, 0x78, 0x56, 0x34, 0x12, 0x02, 0x00]), "T")
    assert (r.u8("a"), r.u16("b"), r.s16("c"), r.u24("d"), r.u32("e")) == (1, 0x1234, -2, 0x123456, 0x12345678)
    assert r.remaining == 2 and r.sfloat("f").value == 2.0 and r.remaining == 0
    r.end()
    r = PayloadReader(b"\x01\x02\x03", "T")
    assert r.take(0, "nothing") == b"" and r.rest() == b"\x01\x02\x03" and r.remaining == 0
    with pytest.raises(ProtocolError, match=r"T: x needs 1 bytes at offset 3, 0 left \(payload 3 bytes\)"):
        r.u8("x")
    with pytest.raises(ProtocolError, match="needs -1 bytes"):
        PayloadReader(b"\x01", "T").take(-1, "negative")
    with pytest.raises(ProtocolError, match="1 unexpected trailing byte"):
        reader = PayloadReader(b"\x01\x02", "T")
        reader.u8("a")
        reader.end()
    f = PayloadReader(struct.pack("<I", 0xFF00016E), "T").float32("t")
    assert f.value == 36.6
    assert PayloadReader(bytes(MAX_ATTRIBUTE_LENGTH), "T").remaining == 512  # the GATT maximum itself
    with pytest.raises(ProtocolError, match="513 bytes, longer than any GATT value"):
        PayloadReader(bytes(MAX_ATTRIBUTE_LENGTH + 1), "T")
    assert PayloadReader(b"\x00" * 7, "T").date_time("when") is None


def test_fahrenheit_is_converted_to_hundredths_of_a_degree() -> None:
    """100.1 °F is 37.83 °C: the thermometer's resolution, not 37.833333 (nor 37.8)."""
    q = decode_temperature_measurement(b"\x01" + fl(100.1, -1)).quantities[0]
    assert (q.value, q.unit, q.sent_value, q.sent_unit) == (37.83, "Cel", 100.1, "[degF]")


@pytest.mark.parametrize(
    "decoder,kind",
    [
        (decode_temperature_measurement, "body-temperature"),
        (decode_intermediate_temperature, "body-temperature-intermediate"),
    ],
)
def test_temperature_details_say_units_and_site(decoder, kind: str) -> None:
    m = decoder(b"\x05" + fl(98.6, -1) + b"\x01")
    assert m.kind == kind and m.details == {"flags": 5, "units": "[degF]", "temperature_type": "armpit"}
    m = decoder(b"\x00" + fl(36.6, -1))
    assert m.details == {"flags": 0, "units": "Cel"}


@pytest.mark.parametrize(
    "bit,name",
    [
        (0, "measurement-status"),
        (1, "device-and-sensor-status"),
        (2, "spot-check-measurement-storage"),
        (3, "spot-check-timestamp"),
        (4, "spo2pr-fast"),
        (5, "spo2pr-slow"),
        (6, "pulse-amplitude-index"),
        (7, "multiple-bonds"),
    ],
)
def test_plx_feature_bits_and_their_support_masks(bit: int, name: str) -> None:
    """PLX Features (0x2A60): bit 0 is followed by a u16 mask, bit 1 by a u24 mask, others by nothing."""
    mask = {0: b"\xff\xff", 1: b"\xff\xff\xff"}.get(bit, b"")
    assert decode_plx_features(struct.pack("<H", 1 << bit) + mask) == (name,)
    with pytest.raises(ProtocolError):
        decode_plx_features(struct.pack("<H", 1 << bit) + mask + b"\x00")  # one byte too many
    assert decode_plx_features(b"\x03\x00" + b"\x01\x00" + b"\x02\x00\x00") == (
        "measurement-status",
        "device-and-sensor-status",
    )


def test_weight_in_kilograms_pounds_and_the_unsuccessful_marker() -> None:
    m = decode_weight_measurement(b"\x08" + struct.pack("<HHH", 14001, 253, 1753))
    weight, bmi, height = m.quantities
    assert (weight.value, weight.sent_value, weight.unit, weight.sent_unit) == (70.005, 70.005, "kg", "kg")
    assert (bmi.value, bmi.sent_value, bmi.unit) == (25.3, 25.3, "kg/m2")
    assert (height.value, height.sent_value, height.unit) == (1.753, 1.753, "m")
    assert m.details == {"flags": 8, "units": "SI"} and m.user_id is None
    m = decode_weight_measurement(b"\x0d" + struct.pack("<HBHH", 15432, 2, 253, 695))
    weight, bmi, height = m.quantities
    assert (weight.value, weight.sent_value, weight.sent_unit) == (69.9984, 154.32, "[lb_av]")  # kg to 0.1 g
    assert (height.value, height.sent_value, height.sent_unit) == (1.765, 69.5, "[in_i]")  # m to the mm
    assert m.details == {"flags": 13, "units": "imperial", "user_id": 2} and m.user_id == 2
    for flags in (b"\x00", b"\x01"):  # 0xFFFF: "measurement unsuccessful", in either unit system
        q = decode_weight_measurement(flags + b"\xff\xff").quantities[0]
        assert q.value is None and q.special == "nan"
    tall = decode_weight_measurement(b"\x08" + struct.pack("<HHH", 14001, 253, 0xFFFF)).quantities[2]
    assert tall.value == 65.535  # only the weight has an "unsuccessful" code


# -- Glucose: every coded value of the GATT Specification Supplement, one by one -------------
# A wrong entry shows venous plasma as capillary blood, a fasting value as after a meal, a
# long-acting insulin dose as rapid-acting.


def _glucose(type_location: int, status: int | None = None) -> Measurement:
    flags = 0x02 | (0x08 if status is not None else 0)
    data = bytes((flags,)) + b"\x01\x00" + DATE_TIME_2024 + sf(0.0009, -5) + bytes((type_location,))
    return decode_glucose_measurement(data + (struct.pack("<H", status) if status is not None else b""))


@pytest.mark.parametrize(
    "code,name",
    [
        (1, "capillary-whole-blood"),
        (2, "capillary-plasma"),
        (3, "venous-whole-blood"),
        (4, "venous-plasma"),
        (5, "arterial-whole-blood"),
        (6, "arterial-plasma"),
        (7, "undetermined-whole-blood"),
        (8, "undetermined-plasma"),
        (9, "interstitial-fluid"),
        (10, "control-solution"),
    ],
)
def test_glucose_sample_types(code: int, name: str) -> None:
    assert _glucose(0x10 | code).details["sample_type"] == name
    for reserved in (0, 11, 15):
        with pytest.raises(ProtocolError, match=f"Type value {reserved} is reserved"):
            _glucose(0x10 | reserved)


@pytest.mark.parametrize(
    "code,name",
    [(1, "finger"), (2, "alternate-site-test"), (3, "earlobe"), (4, "control-solution"), (15, "not-available")],
)
def test_glucose_sample_locations(code: int, name: str) -> None:
    m = _glucose((code << 4) | 1)
    assert m.details["sample_location"] == name
    assert (f"site-{name}" in m.flags) is (name != "not-available")
    assert ("control-solution" in m.flags) is (name == "control-solution")
    for reserved in (0, 5, 14):
        with pytest.raises(ProtocolError, match=f"Sample Location value {reserved} is reserved"):
            _glucose((reserved << 4) | 1)


@pytest.mark.parametrize(
    "bit,name",
    [
        (0, "battery-low"),
        (1, "sensor-malfunction"),
        (2, "sample-size-insufficient"),
        (3, "strip-insertion-error"),
        (4, "strip-type-incorrect"),
        (5, "result-above-device-range"),
        (6, "result-below-device-range"),
        (7, "sensor-temperature-too-high"),
        (8, "sensor-temperature-too-low"),
        (9, "strip-pulled-too-soon"),
        (10, "general-device-fault"),
        (11, "time-fault"),
    ],
)
def test_glucose_sensor_status_bits(bit: int, name: str) -> None:
    m = _glucose(0x11, status=1 << bit)
    assert m.flags == ("sample-capillary-whole-blood", "site-finger", name)
    assert m.clock_untrusted is (name == "time-fault")
    assert _glucose(0x11, status=0xF000).flags == ("sample-capillary-whole-blood", "site-finger")


def _context(flags: int, body: bytes) -> tuple[str, ...]:
    return decode_glucose_context(bytes((flags,)) + b"\x01\x00" + body).flags


@pytest.mark.parametrize(
    "code,name",
    [(1, "breakfast"), (2, "lunch"), (3, "dinner"), (4, "snack"), (5, "drink"), (6, "supper"), (7, "brunch")],
)
def test_glucose_carbohydrate_ids(code: int, name: str) -> None:
    assert _context(0x01, bytes((code,)) + sf(0.045, -3)) == (f"carbohydrate-{name}",)


@pytest.mark.parametrize(
    "code,name", [(1, "preprandial"), (2, "postprandial"), (3, "fasting"), (4, "casual"), (5, "bedtime")]
)
def test_glucose_meals(code: int, name: str) -> None:
    assert _context(0x02, bytes((code,))) == (f"meal-{name}",)


@pytest.mark.parametrize(
    "tester,tester_name", [(1, "self"), (2, "health-care-professional"), (3, "lab-test"), (15, "not-available")]
)
@pytest.mark.parametrize(
    "health,health_name",
    [
        (1, "minor-health-issues"),
        (2, "major-health-issues"),
        (3, "during-menses"),
        (4, "under-stress"),
        (5, "no-health-issues"),
        (15, "not-available"),
    ],
)
def test_glucose_tester_and_health(tester: int, tester_name: str, health: int, health_name: str) -> None:
    assert _context(0x04, bytes(((health << 4) | tester,))) == (f"tester-{tester_name}", f"health-{health_name}")


@pytest.mark.parametrize(
    "code,name",
    [
        (1, "rapid-acting-insulin"),
        (2, "short-acting-insulin"),
        (3, "intermediate-acting-insulin"),
        (4, "long-acting-insulin"),
        (5, "pre-mixed-insulin"),
    ],
)
def test_glucose_medication_ids(code: int, name: str) -> None:
    assert _context(0x10, bytes((code,)) + sf(0.000002, -6)) == (f"medication-{name}",)


@pytest.mark.parametrize(
    "bit,name",
    [
        (0, "low-battery-detection"),
        (1, "sensor-malfunction-detection"),
        (2, "sensor-sample-size"),
        (3, "sensor-strip-insertion-error-detection"),
        (4, "sensor-strip-type-error-detection"),
        (5, "sensor-result-high-low-detection"),
        (6, "sensor-temperature-high-low-detection"),
        (7, "sensor-read-interrupt-detection"),
        (8, "general-device-fault"),
        (9, "time-fault"),
        (10, "multiple-bond"),
    ],
)
def test_glucose_feature_bits(bit: int, name: str) -> None:
    assert decode_glucose_feature(struct.pack("<H", 1 << bit)) == (name,)


# -- Current Time (0x2A2B): every field at its limits ----------------------------------------


@pytest.mark.parametrize(
    "bit,name",
    [(0, "manual-time-update"), (1, "external-reference-time-update"), (2, "time-zone-change"), (3, "dst-change")],
)
def test_current_time_adjust_reasons(bit: int, name: str) -> None:
    ct = decode_current_time(CURRENT_TIME_2024[:9] + bytes((1 << bit,)))
    assert ct.adjust_reasons == (name,)
    assert encode_current_time(T0, 1 << bit)[-1] == 1 << bit


def test_current_time_limits() -> None:
    from devices.ble.current_time import (
        ADJUST_DST,
        ADJUST_EXTERNAL_REFERENCE,
        ADJUST_MANUAL,
        ADJUST_TIME_ZONE,
        CURRENT_TIME_LENGTH,
        UNKNOWN_DAY_OF_WEEK,
    )

    assert (ADJUST_MANUAL, ADJUST_EXTERNAL_REFERENCE, ADJUST_TIME_ZONE, ADJUST_DST) == (1, 2, 4, 8)
    assert CURRENT_TIME_LENGTH == len(CURRENT_TIME_2024) == 10 and UNKNOWN_DAY_OF_WEEK == 0
    assert encode_current_time(T0)[-1] == ADJUST_MANUAL | ADJUST_EXTERNAL_REFERENCE  # the default reason
    sunday = bytes.fromhex("e8070303091e0f") + b"\x07\x00\x00"  # 2024-03-03 was a Sunday: day 7
    assert decode_current_time(sunday).day_of_week == 7
    assert decode_current_time(bytes.fromhex("e8070305091e0f") + b"\x00\x00\x00").day_of_week == 0  # unknown
    with pytest.raises(ProtocolError, match="day of week 8 is reserved"):
        decode_current_time(bytes(7) + b"\x08\x00\x00")  # even with the date unknown
    last = decode_current_time(CURRENT_TIME_2024[:8] + b"\xff\x00")
    assert last.local_time.microsecond == 996093  # 255/256 s, truncated to the microsecond
    with pytest.raises(ValueError, match="reserved adjust-reason bits 0x10"):
        encode_current_time(T0, 0x10)
    with pytest.raises(ValueError, match="naive datetime"):
        encode_current_time(T0.replace(tzinfo=dt.timezone.utc))


def test_quantities_convert_only_when_asked() -> None:
    from devices.ble.measurement import quantity
    from devices.observation import Quantity

    reading = MedFloat(1.23456789, None, -8)
    assert quantity("x", reading, "u", "u").value == 1.23456789  # no factor, no offset: kept as sent
    assert quantity("x", reading, "u", "v", 2.0).value == 2.469136  # converted: rounded to 6 digits
    assert quantity("x", reading, "u", "v", 1.0, 1.0).value == 2.234568  # an offset alone converts too
    assert quantity("x", MedFloat(None, "nres"), "u", "v", 2.0) == Quantity("x", None, "u", None, "v", "nres")


def test_record_keys_are_24_hex_digits_of_sha256() -> None:
    import re

    from devices.ble.measurement import Measurement, record_key, to_observation
    from devices.identity import DeviceIdentity, TimeSource
    from devices.observation import Quantity

    m = Measurement(
        0x2A1C,
        "body-temperature",
        (Quantity("body-temperature", 36.6, "Cel", 36.6, "Cel"),),
        device_time=dt.datetime(2024, 3, 5, 9, 31),
        flags=("site-mouth",),
    )
    key = record_key("aa:bb", m, T0.replace(tzinfo=dt.timezone.utc))
    assert re.fullmatch(r"ble:AA:BB:body-temperature:20240305T093100:[0-9a-f]{24}", key), key
    obs = to_observation(
        m,
        device=DeviceIdentity(address="AA:BB"),
        measured_at=T0.replace(tzinfo=dt.timezone.utc),
        time_source=TimeSource.DEVICE_CLOCK,
        received_at=T0.replace(tzinfo=dt.timezone.utc),
        key=key,
        patient_id="P-1",
        extra_flags=("clock-corrected",),
    )
    assert (obs.kind, obs.record_key, obs.patient_id, obs.flags) == (
        "body-temperature",
        key,
        "P-1",
        ("site-mouth", "clock-corrected"),
    )


# -- every 16-bit UUID against an independent copy of the SIG assigned numbers (bleak's) -------
# A wrong number subscribes to the wrong characteristic: no readings, or another value read as
# a blood pressure.

SIG_NAMES = {
    "GENERIC_ACCESS": "Generic Access Profile",
    "DEVICE_INFORMATION": "Device Information",
    "CURRENT_TIME_SERVICE": "Current Time Service",
    "HEALTH_THERMOMETER": "Health Thermometer",
    "BLOOD_PRESSURE": "Blood Pressure",
    "GLUCOSE": "Glucose",
    "WEIGHT_SCALE": "Weight Scale",
    "USER_DATA": "User Data",
    "PULSE_OXIMETER": "Pulse Oximeter",
    "DATE_TIME": "Date Time",
    "CURRENT_TIME": "Current Time",
    "LOCAL_TIME_INFORMATION": "Local Time Information",
    "TEMPERATURE_MEASUREMENT": "Temperature Measurement",
    "TEMPERATURE_TYPE": "Temperature Type",
    "INTERMEDIATE_TEMPERATURE": "Intermediate Temperature",
    "GLUCOSE_MEASUREMENT": "Glucose Measurement",
    "GLUCOSE_MEASUREMENT_CONTEXT": "Glucose Measurement Context",
    "GLUCOSE_FEATURE": "Glucose Feature",
    "BLOOD_PRESSURE_MEASUREMENT": "Blood Pressure Measurement",
    "INTERMEDIATE_CUFF_PRESSURE": "Intermediate Cuff Pressure",
    "BLOOD_PRESSURE_FEATURE": "Blood Pressure Feature",
    "RECORD_ACCESS_CONTROL_POINT": "Record Access Control Point",
    "PLX_SPOT_CHECK_MEASUREMENT": "PLX Spot-Check Measurement",
    "PLX_CONTINUOUS_MEASUREMENT": "PLX Continuous Measurement Characteristic",
    "PLX_FEATURES": "PLX Features",
    "WEIGHT_MEASUREMENT": "Weight Measurement",
    "WEIGHT_SCALE_FEATURE": "Weight Scale Feature",
    "SYSTEM_ID": "System ID",
    "MODEL_NUMBER": "Model Number String",
    "SERIAL_NUMBER": "Serial Number String",
    "FIRMWARE_REVISION": "Firmware Revision String",
    "HARDWARE_REVISION": "Hardware Revision String",
    "SOFTWARE_REVISION": "Software Revision String",
    "MANUFACTURER_NAME": "Manufacturer Name String",
    "REGULATORY_CERTIFICATION": "IEEE 11073-20601 Regulatory Cert. Data List",
    "PNP_ID": "PnP ID",
}


@pytest.mark.parametrize("constant,sig_name", SIG_NAMES.items())
def test_every_uuid_is_the_sig_assigned_number(constant: str, sig_name: str) -> None:
    from bleak.uuids import uuid16_dict

    assert uuid16_dict[getattr(uuids, constant)] == sig_name


def test_the_health_services_and_the_base_uuid() -> None:
    assert uuids.HEALTH_SERVICES == {
        0x1810: "Blood Pressure",
        0x1809: "Health Thermometer",
        0x1822: "Pulse Oximeter",
        0x181D: "Weight Scale",
        0x1808: "Glucose",
    }
    assert uuids.full_uuid(0x2A35) == "00002a35-0000-1000-8000-00805f9b34fb"
    assert uuids.full_uuid(0) == "00000000-0000-1000-8000-00805f9b34fb"
    assert uuids.full_uuid(0xFFFF) == "0000ffff-0000-1000-8000-00805f9b34fb"
    for bad in (-1, 0x10000):
        with pytest.raises(ValueError, match="not a 16-bit UUID"):
            uuids.full_uuid(bad)
    assert uuids.short_uuid("00002A35-0000-1000-8000-00805F9B34FB") == 0x2A35
    assert uuids.short_uuid("0000fee0-0000-1000-8000-00805f9b34fc") is None  # a vendor base
    assert uuids.short_uuid("12345678-0000-1000-8000-00805f9b34fb") is None


# (0x2A2A is left out: bleak abbreviates its name, "Regulatory Cert. Data List")
@pytest.mark.parametrize("uuid16,name", [(s.uuid16, s.name) for s in registry.DECODERS.values() if s.uuid16 != 0x2A2A])
def test_the_registry_names_each_characteristic_as_the_sig_does(uuid16: int, name: str) -> None:
    from bleak.uuids import uuid16_dict

    assert name.lower() == uuid16_dict[uuid16].lower().removesuffix(" characteristic")


def test_device_information_strings_at_their_limits() -> None:
    from devices.ble.device_information import MAX_STRING, STRING_CHARACTERISTICS

    assert MAX_STRING == 248
    assert decode_string(b"x" * 248) == "x" * 248  # the limit itself
    with pytest.raises(ProtocolError, match="249 bytes is not a plausible device string"):
        decode_string(b"x" * 249)
    assert decode_string(b"A\tB") == "A\tB" and decode_string(b"  Omron  ") == "Omron"
    with pytest.raises(ProtocolError, match="control characters"):
        decode_string(b"A\x1fB")
    assert decode_string(b"A B\x00") == "A B" and decode_string(b"") == ""
    assert set(STRING_CHARACTERISTICS) == {
        uuids.MANUFACTURER_NAME,
        uuids.MODEL_NUMBER,
        uuids.SERIAL_NUMBER,
        uuids.HARDWARE_REVISION,
        uuids.FIRMWARE_REVISION,
        uuids.SOFTWARE_REVISION,
    }


@pytest.mark.parametrize("source,name", [(1, "bluetooth-sig"), (2, "usb-if")])
def test_pnp_id_vendor_sources(source: int, name: str) -> None:
    pnp = decode_pnp_id(bytes((source,)) + struct.pack("<HHH", 0x000D, 0x1234, 0x0102))
    assert (pnp.vendor_id_source, pnp.vendor_id, pnp.product_id, pnp.product_version) == (name, 13, 0x1234, 0x0102)
    with pytest.raises(ProtocolError, match="vendor ID source 0 is reserved"):
        decode_pnp_id(b"\x00" + struct.pack("<HHH", 1, 2, 3))


def test_system_id_splits_identifier_and_oui() -> None:
    sid = decode_system_id(bytes.fromhex("0102030405aabbcc"))
    assert (sid.manufacturer_identifier, sid.organizationally_unique_identifier) == (0x0504030201, 0xCCBBAA)


def test_device_identity_prefers_the_software_revision() -> None:
    ident = device_identity("aa:bb", {uuids.SOFTWARE_REVISION: "2.0", uuids.FIRMWARE_REVISION: "1.0"})
    assert (ident.software_version, ident.address) == ("2.0", "AA:BB")
    assert device_identity("x", {uuids.FIRMWARE_REVISION: "1.0"}).software_version == "1.0"
    assert device_identity("x", {}).software_version == ""


def test_glucose_units_conversions_and_context_details() -> None:
    from devices.ble.glucose import MG_DL_PER_KG_L, MG_DL_PER_MOL_L

    # 1 kg/L = 100,000 mg/dL exactly; glucose is 180.156 g/mol, so 1 mol/L = 18,015.6 mg/dL
    assert (MG_DL_PER_KG_L, MG_DL_PER_MOL_L) == (100_000.0, 18_015.6)
    mol = decode_glucose_measurement(b"\x06\x01\x00" + DATE_TIME_2024 + sf(0.0055, -4) + b"\x11").quantities[0]
    assert (mol.value, mol.unit, mol.sent_value, mol.sent_unit) == (99.1, "mg/dL", 0.0055, "mol/L")  # 5.5 mmol/L
    with pytest.raises(UnsupportedFeatureError, match="reserved flag bits 0x20"):
        decode_glucose_measurement(b"\x20\x01\x00" + DATE_TIME_2024)
    with pytest.raises(ProtocolError, match="leaves the calendar"):
        decode_glucose_measurement(b"\x01\x01\x00" + _dt(9999, 12, 31, 23, 59) + struct.pack("<h", 32767))
    carb = decode_glucose_context(b"\x01\x01\x00\x01" + sf(0.0001234, -7)).quantities[0]
    assert (carb.value, carb.unit) == (0.123, "g")  # kg to the milligram
    litres = decode_glucose_context(b"\x30\x01\x00\x01" + sf(0.00001234, -8))
    assert (litres.quantities[0].value, litres.quantities[0].unit) == (0.012, "mL")
    assert "medication_units_without_medication" not in litres.details
    units_only = decode_glucose_context(b"\x20\x01\x00")  # the litres flag without a medication
    assert units_only.details["medication_units_without_medication"] is True and units_only.quantities == ()


def test_registry_decodes_strings_and_makes_json_of_anything_it_returns() -> None:
    import enum

    assert registry.decode(uuids.MANUFACTURER_NAME, b"Omron\x00") == "Omron"
    assert registry.decode(uuids.MODEL_NUMBER, b"HEM-9200T") == "HEM-9200T"

    class Colour(enum.Enum):
        DEEP_RED = 1

    assert registry.to_jsonable({1: Colour.DEEP_RED, "when": dt.date(2024, 3, 5), "list": (1, [2])}) == {
        "1": "deep_red",
        "when": "2024-03-05",
        "list": [1, [2]],
    }
    with pytest.raises(UnsupportedFeatureError, match="no decoder for characteristic 0x2a99"):
        registry.spec_for(0x2A99)


def test_a_reading_that_says_nothing_of_its_clock_or_context_keeps_its_time_and_is_not_held() -> None:
    """Measurement's defaults are the safe "no" for decoders that never set them: a blood-pressure
    record is neither re-stamped with its receipt time (clock_untrusted: a stored reading charted at
    the wrong time) nor held for a glucose context that never comes (context_follows: reading lost)."""
    m = decode_blood_pressure_measurement(BP_MMHG_ALL_FIELDS)
    assert m.device_time is not None and m.clock_untrusted is False and m.context_follows is False
    bare = Measurement(0x2A35, "blood-pressure", ())
    assert (bare.live, bare.clock_untrusted, bare.context_follows) == (False, False, False)


def test_a_low_glucose_in_kg_per_l_is_charted_to_the_tenth_of_a_mg_per_dl() -> None:
    """kg/L readings are rounded to 0.1 mg/dL like mol/L ones: a hypoglycaemic 0.0001234 kg/L is
    12.3 mg/dL, neither 12.0 (a low value charted 0.3 mg/dL off) nor 12.34 (a precision no other
    glucose reading has)."""
    data = b"\x02" + struct.pack("<H", 1) + DATE_TIME_2024 + sf(0.0001234, -7) + b"\x11"
    q = decode_glucose_measurement(data).quantities[0]
    assert (q.value, q.unit, q.sent_value, q.sent_unit) == (12.3, "mg/dL", 0.0001234, "kg/L")


def test_a_glucose_context_without_medication_is_not_flagged_as_a_protocol_oddity() -> None:
    """Only the litres flag without a medication is odd: a plain context (meal only) carries no
    'medication_units_without_medication' note that would make a clean record look suspect."""
    plain = decode_glucose_context(b"\x02\x01\x00\x01")  # meal: preprandial
    assert plain.flags == ("meal-preprandial",) and "medication_units_without_medication" not in plain.details
