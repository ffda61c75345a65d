"""Implausible values are kept and flagged, never passed on as measurements (issue 10, item 5).

Real decoder paths: BLE payloads through the decoders and `to_observation`, a serial monitor's
report through the example ASCII profile, a bridge frame's value; then the stored outbox
payload, the console summary and the FHIR bundle. A hypothesis property over BLE payloads.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.ascii_report import ReportParsed, ReportParser, load_profile
from devices.ble.blood_pressure import decode_blood_pressure_measurement
from devices.ble.measurement import Measurement, record_key, to_observation
from devices.ble.pulse_oximeter import decode_plx_continuous
from devices.ble.sfloat import encode_float, encode_sfloat
from devices.ble.thermometer import decode_temperature_measurement
from devices.ble.weight import decode_weight_measurement
from devices.errors import ProtocolError
from devices.identity import DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity, screened
from devices.plausibility import IMPLAUSIBLE, PLAUSIBLE_RANGES, implausibility, plausible_range
from firmware_bridge.profiles import profile_files
from lastmile.clinic.observations import ObservationStore, observation_from_json, observation_to_json, summary
from tests.fhir_samples import NAMING
from tests.fhir_server import validate_transaction
from uploader.fhir_bundle import observation_bundle
from uploader.outbox import Outbox

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 3, 4, 9, 30, tzinfo=UTC)
CUFF = DeviceIdentity(manufacturer="Omron", model="BP7000", address="AA:BB:CC:DD:EE:01")

# Payloads seen from damaged BLE traffic (issue 10): flags, SFLOAT systolic/diastolic/MAP.
# Systolic mantissa 1136 exponent +4 = 11,360,000 mmHg; diastolic 80, MAP 93 are sound.
BP_SYSTOLIC_11360000 = bytes.fromhex("00704450005d00")
# Temperature Measurement, Celsius: FLOAT mantissa 26251, exponent 0 = 26,251 °C.
TEMP_26251_CEL = bytes.fromhex("008b660000")
# The same thermometer, sound: 98.6 °F (mantissa 986, exponent -1) = 37.0 °C.
TEMP_98_6_F = bytes.fromhex("01da0300ff")
# Weight Scale, SI: raw 0xFDE8 * 0.005 kg = 324.84 kg (heavy, but a person); then raw 2 = 0.01 kg.
WEIGHT_324_KG = bytes.fromhex("00e8fd")
WEIGHT_10_G = bytes.fromhex("000200")


def observe(m: Measurement, patient: str | None = "P-1") -> Observation:
    return to_observation(
        m,
        device=CUFF,
        measured_at=T0,
        time_source=TimeSource.GATEWAY_RECEIPT,
        received_at=T0,
        key=record_key(CUFF.address, m, T0),
        patient_id=patient,
    )


def test_the_payload_constants_say_what_their_names_say() -> None:
    assert BP_SYSTOLIC_11360000[1:3] == struct.pack("<H", encode_sfloat(11_360_000, 4))
    assert TEMP_26251_CEL[1:] == struct.pack("<I", encode_float(26251))


def test_systolic_of_eleven_million_is_flagged_and_its_companions_kept() -> None:
    m = decode_blood_pressure_measurement(BP_SYSTOLIC_11360000)
    assert m.quantities[0].value == 11_360_000  # the bytes say it; the decoder reports what they say
    obs = observe(m)
    sys_, dia, mean = (obs.quantity(c) for c in ("systolic", "diastolic", "mean-arterial-pressure"))
    assert sys_ is not None and dia is not None and mean is not None
    assert (sys_.value, sys_.special, sys_.sent_value, sys_.sent_unit) == (None, IMPLAUSIBLE, 11_360_000, "mm[Hg]")
    assert (dia.value, mean.value) == (80, 93)  # sound values stay values
    assert obs.flags == ("implausible-systolic",)
    assert [q.code for q in obs.implausible] == ["systolic"]
    # the reading keeps its device, time and time source
    assert (obs.device, obs.measured_at, obs.time_source) == (CUFF, T0, TimeSource.GATEWAY_RECEIPT)


def test_a_thermometer_at_26251_celsius_is_flagged_98_6_fahrenheit_is_not() -> None:
    hot = observe(decode_temperature_measurement(TEMP_26251_CEL))
    (q,) = hot.quantities
    assert (q.value, q.special, q.sent_value, q.unit) == (None, IMPLAUSIBLE, 26251, "Cel")
    assert hot.flags == ("implausible-body-temperature",)
    fine = observe(decode_temperature_measurement(TEMP_98_6_F))
    assert fine.quantities[0].value == pytest.approx(37.0) and fine.flags == ()


def test_weight_limits_from_the_scale() -> None:
    assert observe(decode_weight_measurement(WEIGHT_324_KG)).flags == ()
    light = observe(decode_weight_measurement(WEIGHT_10_G))
    assert light.flags == ("implausible-body-weight",) and light.quantities[0].sent_value == 0.01


def test_continuous_oximeter_fast_and_slow_values_use_the_base_ranges() -> None:
    # normal 97 %, 72 /min; fast 140 % (impossible), 72 /min
    payload = bytes([0x01]) + b"".join(struct.pack("<H", encode_sfloat(v)) for v in (97, 72, 140, 72))
    obs = observe(decode_plx_continuous(payload))
    assert obs.flags == ("implausible-spo2-fast",)
    assert obs.quantity("spo2") is not None and obs.quantity("spo2").value == 97  # type: ignore[union-attr]


def test_a_serial_monitor_report_with_an_impossible_temperature() -> None:
    profile = load_profile(profile_files()["example-vitals-monitor"].read_text(encoding="utf-8"))
    parser = ReportParser(profile, DeviceIdentity(manufacturer="Example Medical", model="VM-100", address="/dev/x"))
    report = (
        b"===== VITALS REPORT =====\r\nDATE 2025-03-04  TIME 09:41:07\r\nRECORD 0173\r\n"
        b"NIBP   121/79 (93) mmHg\r\nPULSE  720 bpm\r\nSPO2   98 %\r\nTEMP   986 F\r\n===== END =====\r\n"
    )
    (event,) = parser.feed(report, T0 + dt.timedelta(hours=1))
    assert isinstance(event, ReportParsed)
    by_kind = {o.kind: o for o in event.observations}
    assert by_kind["blood-pressure"].flags == ("implausible-pulse-rate",)
    assert by_kind["blood-pressure"].quantity("systolic").value == 121  # type: ignore[union-attr]
    temp = by_kind["body-temperature"].quantities[0]
    assert (temp.special, temp.sent_value, temp.sent_unit) == (IMPLAUSIBLE, 986, "F")
    assert by_kind["spo2"].flags == ()


def test_stored_flagged_shown_to_the_doctor_and_not_sent_as_a_value(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path, min_free_bytes=0)
    store = ObservationStore.open(tmp_path, outbox=outbox, idle_timeout_s=900)
    try:
        obs = observe(decode_blood_pressure_measurement(BP_SYSTOLIC_11360000))
        result = store.record(obs, now=T0)
        assert result.outcome == "stored" and result.item_id is not None
        item = outbox.get(result.item_id)
        assert item is not None and item.meta["flags"] == ["implausible-systolic"]
        stored = observation_from_json(json.loads(outbox.read_payload(item)))
        assert stored == obs  # the flag and the device's number survive the round trip
        assert "(implausible: 11360000 mm[Hg])/80 mm[Hg]" in summary(stored)
    finally:
        store.close()
        outbox.close()

    bundle = observation_bundle(obs, NAMING)
    validate_transaction(bundle)  # still a valid R4 transaction (fhir.resources)
    (panel,) = [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation" and "component" in e["resource"]
    ]
    systolic = panel["component"][0]
    assert "valueQuantity" not in systolic and systolic["dataAbsentReason"]["coding"][0]["code"] == "error"
    assert panel["component"][1]["valueQuantity"]["value"] == 80
    notes = [n["text"] for n in panel["note"]]
    assert "device flags: implausible-systolic" in notes
    assert any("the device sent 1.136e+07 mm[Hg], outside the plausible range" in n for n in notes)
    assert "11360000" not in json.dumps(bundle).replace(".", "")  # the number goes nowhere as a value


def test_older_stored_observations_are_screened_when_read() -> None:
    """An outbox payload written before screening existed is flagged when it is read back."""
    obs = observe(decode_temperature_measurement(TEMP_98_6_F))
    data = observation_to_json(obs)
    data["quantities"][0].update(value=26251.0, sent_value=26251.0, sent_unit="Cel")
    again = observation_from_json(data)
    assert again.flags == ("implausible-body-temperature",) and again.quantities[0].value is None


def test_every_range_has_a_unit_a_source_and_sound_bounds() -> None:
    for (code, unit), r in PLAUSIBLE_RANGES.items():
        assert r.unit == unit and r.source and r.low < r.high, code
    assert plausible_range("systolic", "mm[Hg]") is not None and plausible_range("systolic", "kPa") is None
    assert implausibility("systolic", 20, "mm[Hg]") is None and implausibility("systolic", 300, "mm[Hg]") is None
    assert implausibility("systolic", 301, "mm[Hg]") == "systolic 301 mm[Hg] is outside the plausible 20-300 mm[Hg]"
    assert implausibility("spo2", float("nan"), "%") is not None
    assert implausibility("unknown-code", 1e9, "mm[Hg]") is None


# The edges the module's sources give (its docstring and table): the last value of a living patient
# (or a working device) is kept as a value; the next one beyond is flagged, the device's number kept.
EDGES = [
    ("systolic", "mm[Hg]", 20, 300),
    ("diastolic", "mm[Hg]", 10, 250),
    ("mean-arterial-pressure", "mm[Hg]", 15, 280),
    ("cuff-pressure", "mm[Hg]", 0, 330),
    ("pulse-rate", "/min", 20, 300),
    ("heart-rate", "/min", 20, 300),
    ("spo2", "%", 0, 100),
    ("pulse-amplitude-index", "%", 0, 100),
    ("body-temperature", "Cel", 25, 45),
    ("body-weight", "kg", 0.2, 650),
    ("body-height", "m", 0.2, 2.8),
    ("body-mass-index", "kg/m2", 5, 250),
    ("glucose", "mg/dL", 5, 2700),
    ("glucose", "mmol/L", 0.3, 150),
    ("hba1c", "%", 2, 25),
    ("ecg-sampling-rate", "Hz", 25, 32_000),
]


@pytest.mark.parametrize(("code", "unit", "low", "high"), EDGES)
def test_each_range_keeps_its_edges_and_flags_what_lies_beyond(code: str, unit: str, low: float, high: float) -> None:
    assert implausibility(code, low, unit) is None and implausibility(code, high, unit) is None
    assert implausibility(code, math.nextafter(low, -math.inf), unit) is not None
    assert implausibility(code, math.nextafter(high, math.inf), unit) is not None


def test_the_edge_table_names_every_range() -> None:
    assert sorted((code, unit) for code, unit, _low, _high in EDGES) == sorted(PLAUSIBLE_RANGES)


@settings(max_examples=300, deadline=None)
@given(
    flags=st.sampled_from([0x00, 0x01, 0x04, 0x05]),
    values=st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
)
def test_no_bp_payload_passes_an_impossible_value_on(flags: int, values: list[int]) -> None:
    """Property: decode any BP payload or raise the typed error; whatever is decoded, every
    value an observation carries lies in its range, and every value outside it is flagged
    with the device's number kept."""
    payload = bytes([flags]) + struct.pack("<3H", *values[:3]) + (struct.pack("<H", values[3]) if flags & 4 else b"")
    try:
        m = decode_blood_pressure_measurement(payload)
    except ProtocolError:
        return
    obs = observe(m)
    for raw, q in zip(m.quantities, obs.quantities, strict=True):
        found = plausible_range(q.code, q.unit)
        assert found is not None
        if q.value is not None:
            assert found.low <= q.value <= found.high
        elif raw.value is not None:  # the device sent a number: it was implausible, and kept
            assert q.special == IMPLAUSIBLE and q.sent_value == raw.sent_value
            assert f"implausible-{q.code}" in obs.flags
        else:
            assert q.special == raw.special  # a device "no value" stays what it was
    assert len(set(obs.flags)) == len(obs.flags)


@given(code=st.sampled_from(sorted({c for c, _ in PLAUSIBLE_RANGES})), value=st.floats(allow_nan=True))
def test_screening_is_idempotent_and_total(code: str, value: float) -> None:
    unit = next(u for c, u in PLAUSIBLE_RANGES if c == code)
    q = screened(Quantity(code, value, unit, value, unit))
    assert screened(q) == q
    assert (q.value is None) == (implausibility(code, value, unit) is not None)


def test_an_implausible_value_sent_without_its_original_keeps_the_number_it_had() -> None:
    """A quantity with no separate sent value (the device's number is its value) still keeps that
    number when screened out, so the clinician sees what the device said (not a reading lost)."""
    q = screened(Quantity("spo2", 140.0, "%"))
    assert (q.value, q.sent_value, q.sent_unit, q.special) == (None, 140.0, "%", IMPLAUSIBLE)
