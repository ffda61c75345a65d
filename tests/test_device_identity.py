"""Who, on whom, and when (devices/identity.py, devices/observation.py): the checks that keep a
value off the wrong patient, a time without a zone out of the record, and "no value" from being 0."""

from __future__ import annotations

import datetime as dt

import pytest

from devices.ble.clock import ClockCheck, resolve_time
from devices.errors import InvalidRecordingError
from devices.identity import EARLIEST_PLAUSIBLE, DeviceIdentity, Patient, TimeSource, require_aware
from devices.observation import Observation, Quantity

UTC = dt.timezone.utc
NOW = dt.datetime(2025, 3, 5, 9, 30, tzinfo=UTC)


def test_a_time_without_a_zone_is_refused() -> None:
    """A naive 09:30 could be UTC or Beijing time: eight hours apart on the patient's record."""
    aware = dt.datetime(2025, 3, 5, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    assert require_aware(aware, "t") is aware
    with pytest.raises(InvalidRecordingError, match="must carry a time zone"):
        require_aware(dt.datetime(2025, 3, 5, 9, 30), "measured_at")

    class NoOffset(dt.tzinfo):  # a zone object that does not know its offset is no zone
        def utcoffset(self, when: dt.datetime | None) -> None:
            return None

    with pytest.raises(InvalidRecordingError, match="measured_at must carry"):
        require_aware(dt.datetime(2025, 3, 5, tzinfo=NoOffset()), "measured_at")


def test_a_device_clock_from_before_2020_is_not_believed() -> None:
    """A meter whose battery ran out restarts in 2000 or 1970: its stamp is replaced by the receipt time."""
    assert dt.datetime(2020, 1, 1, tzinfo=UTC) == EARLIEST_PLAUSIBLE
    for stamped, source in [
        (dt.datetime(2019, 12, 31, 23, 59), TimeSource.GATEWAY_RECEIPT),
        (dt.datetime(2020, 1, 1, 0, 0), TimeSource.DEVICE_CLOCK),
    ]:
        when, got = resolve_time(stamped, NOW, ClockCheck(), UTC)
        assert got is source and when == (NOW if source is TimeSource.GATEWAY_RECEIPT else stamped.replace(tzinfo=UTC))


@pytest.mark.parametrize(
    "device,label",
    [
        (DeviceIdentity("Omron", "HEM-9200T", "SN1", "AA:BB"), "Omron HEM-9200T SN1"),  # serial wins
        (DeviceIdentity("Omron", "HEM-9200T", "", "AA:BB"), "Omron HEM-9200T AA:BB"),  # else the address
        (DeviceIdentity(model="X"), "X"),
        (DeviceIdentity(), "unknown device"),
    ],
)
def test_a_device_label_names_what_is_known(device: DeviceIdentity, label: str) -> None:
    assert device.label() == label


@pytest.mark.parametrize("patient_id", ["", "   ", "\t"])
def test_a_patient_needs_an_identifier(patient_id: str) -> None:
    """A blank identifier would match every other blank one: values on a stranger's record."""
    with pytest.raises(InvalidRecordingError, match="non-empty identifier"):
        Patient(patient_id)


def test_patient_sex_is_coded() -> None:
    for sex in ("", "M", "F", "O"):
        assert Patient("P-1", sex=sex).sex == sex
    with pytest.raises(InvalidRecordingError, match="M, F, O or empty"):
        Patient("P-1", sex="male")


def test_a_quantity_needs_a_code_a_unit_and_a_value_or_a_reason() -> None:
    assert Quantity("spo2", 97.0, "%").value == 97.0
    assert Quantity("spo2", None, "%", special="nres").special == "nres"  # "no value", never 0
    for code, unit in [("", "%"), ("spo2", ""), ("", "")]:
        with pytest.raises(InvalidRecordingError, match="needs a code and a unit"):
            Quantity(code, 97.0, unit)
    with pytest.raises(InvalidRecordingError, match="no value and no reason"):
        Quantity("spo2", None, "%")


def _observation(**overrides: object) -> Observation:
    fields: dict[str, object] = dict(
        kind="spo2",
        quantities=(Quantity("spo2", 97.0, "%"), Quantity("pulse-rate", 71.0, "/min")),
        measured_at=NOW,
        time_source=TimeSource.DEVICE_CLOCK,
        received_at=NOW,
        device=DeviceIdentity(model="PO3"),
        record_key="k1",
    )
    fields.update(overrides)
    return Observation(**fields)  # type: ignore[arg-type]


def test_an_observation_is_complete_or_refused() -> None:
    obs = _observation()
    assert obs.patient_id is None and obs.flags == ()  # unassigned until a doctor says whose it is
    assert obs.quantity("pulse-rate") == Quantity("pulse-rate", 71.0, "/min")
    assert obs.quantity("glucose") is None
    with pytest.raises(InvalidRecordingError, match="at least one quantity"):
        _observation(quantities=())
    with pytest.raises(InvalidRecordingError, match="record key"):
        _observation(record_key="")  # without it a re-sent memory would be stored twice
    with pytest.raises(InvalidRecordingError, match="measured_at must carry"):
        _observation(measured_at=NOW.replace(tzinfo=None))
    with pytest.raises(InvalidRecordingError, match="received_at must carry"):
        _observation(received_at=NOW.replace(tzinfo=None))
