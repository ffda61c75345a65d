"""RACP state machine, device-clock resolution and record keys (pure parts of the BLE path)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import zoneinfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.ble.blood_pressure import decode_blood_pressure_measurement
from devices.ble.clock import MEASUREMENT_NOISE, ClockCheck, measure_offset, resolve_time
from devices.ble.measurement import record_key, to_observation
from devices.ble.pulse_oximeter import decode_plx_spot_check
from devices.ble.racp import (
    FilterType,
    OpCode,
    Operator,
    RacpClient,
    RacpState,
    ResponseCode,
    decode_racp,
    encode_number_of_records,
    encode_request,
    encode_response_code,
)
from devices.errors import ProtocolError
from devices.identity import STORED_TIME_UNKNOWN, DeviceIdentity, TimeSource
from tests.conftest import missing

UTC = dt.timezone.utc

# RACP spec vectors: requests and responses as the Glucose Profile writes them.
RACP_REPORT_ALL = bytes.fromhex("0101")
RACP_REPORT_FROM_SEQ_8 = bytes.fromhex("0103010800")  # report, >=, sequence number, 8
RACP_REPORT_RANGE = bytes.fromhex("01040105000a00")  # report, within 5..10
RACP_REPORT_BY_TIME = bytes.fromhex("010302e8070305091e0f")  # >= user facing time
RACP_COUNT_ALL = bytes.fromhex("0401")
RACP_ABORT = bytes.fromhex("0300")
RACP_SUCCESS_FOR_REPORT = bytes.fromhex("06000101")
RACP_NO_RECORDS = bytes.fromhex("06000106")
RACP_COUNT_5 = bytes.fromhex("05000500")


def test_racp_vectors_decode() -> None:
    assert decode_racp(RACP_REPORT_ALL).operator == Operator.ALL_RECORDS
    m = decode_racp(RACP_REPORT_FROM_SEQ_8)
    assert (m.op_code, m.operator, m.filter_type, m.filter_values) == (
        OpCode.REPORT_STORED_RECORDS,
        Operator.GREATER_THAN_OR_EQUAL,
        FilterType.SEQUENCE_NUMBER,
        (8,),
    )
    assert decode_racp(RACP_REPORT_RANGE).filter_values == (5, 10)
    assert decode_racp(RACP_REPORT_BY_TIME).filter_values == (dt.datetime(2024, 3, 5, 9, 30, 15),)
    ok = decode_racp(RACP_SUCCESS_FOR_REPORT)
    assert (ok.request_op_code, ok.response_code) == (OpCode.REPORT_STORED_RECORDS, ResponseCode.SUCCESS)
    assert decode_racp(RACP_COUNT_5).number_of_records == 5
    assert decode_racp(RACP_ABORT).op_code == OpCode.ABORT_OPERATION


def test_racp_encoders_match_vectors() -> None:
    assert encode_request(OpCode.REPORT_STORED_RECORDS) == RACP_REPORT_ALL
    assert (
        encode_request(OpCode.REPORT_STORED_RECORDS, Operator.GREATER_THAN_OR_EQUAL, FilterType.SEQUENCE_NUMBER, (8,))
        == RACP_REPORT_FROM_SEQ_8
    )
    assert (
        encode_request(OpCode.REPORT_STORED_RECORDS, Operator.WITHIN_RANGE, FilterType.SEQUENCE_NUMBER, (5, 10))
        == RACP_REPORT_RANGE
    )
    assert encode_request(OpCode.ABORT_OPERATION) == RACP_ABORT
    assert encode_response_code(OpCode.REPORT_STORED_RECORDS, ResponseCode.SUCCESS) == RACP_SUCCESS_FOR_REPORT
    assert encode_number_of_records(5) == RACP_COUNT_5
    with pytest.raises(ValueError):
        encode_request(OpCode.RESPONSE_CODE)
    with pytest.raises(ValueError):
        encode_request(OpCode.REPORT_STORED_RECORDS, Operator.WITHIN_RANGE, FilterType.SEQUENCE_NUMBER, (5,))


@pytest.mark.parametrize(
    "data",
    [
        "",
        "01",
        "0700",
        "0107",
        "0103",
        "010303",
        "01030108",
        "0104010500",
        "060101",
        "0600010a",
        "06000101ff",
        "050005",
        "0301",
        "0100",
        "0101ff",
        "05010500",
    ],
)
def test_racp_malformed(data: str) -> None:
    with pytest.raises(ProtocolError):
        decode_racp(bytes.fromhex(data))


def test_racp_client_reports_after_the_last_sequence() -> None:
    c = RacpClient()
    assert c.report_records_after(7) == RACP_REPORT_FROM_SEQ_8
    assert c.state == RacpState.REPORTING
    assert c.on_record(8) and c.on_record(10) and c.on_record(9)
    result = c.on_indication(RACP_SUCCESS_FOR_REPORT)
    assert result.ok and result.records == 3 and result.highest_sequence == 10
    assert c.state == RacpState.IDLE
    assert not c.on_record(11)  # a live measurement outside a report


def test_racp_client_first_download_and_no_records() -> None:
    c = RacpClient()
    assert c.report_records_after(None) == RACP_REPORT_ALL
    result = c.on_indication(RACP_NO_RECORDS)
    assert result.ok and result.records == 0 and result.response_code == ResponseCode.NO_RECORDS_FOUND
    assert c.report_records_after(0xFFFF) == RACP_REPORT_ALL  # nothing can follow 65535: ask for all


def test_racp_client_failure_abort_and_count() -> None:
    c = RacpClient()
    c.report_records_after(3)
    failed = c.on_indication(bytes.fromhex("06000102"))
    assert not failed.ok and failed.response_code == ResponseCode.OP_CODE_NOT_SUPPORTED
    c.report_records_after(3)
    assert c.abort() == RACP_ABORT and c.state == RacpState.ABORTING
    assert c.on_record(4)  # in flight
    assert c.on_indication(bytes.fromhex("06000301")).op_code == OpCode.ABORT_OPERATION
    assert c.report_number_of_records() == RACP_COUNT_ALL
    assert c.on_indication(RACP_COUNT_5).number_of_records == 5


def test_racp_client_rejects_out_of_order_messages() -> None:
    c = RacpClient()
    with pytest.raises(ProtocolError):
        c.on_indication(RACP_SUCCESS_FOR_REPORT)  # nothing asked
    c.report_records_after(None)
    with pytest.raises(ProtocolError):
        c.report_number_of_records()  # one procedure at a time
    with pytest.raises(ProtocolError):
        c.on_indication(RACP_COUNT_5)  # a count while reporting
    with pytest.raises(ProtocolError):
        c.on_indication(RACP_REPORT_ALL)  # a request from the server


@settings(deadline=None, max_examples=300)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=8),
            st.sampled_from([RACP_SUCCESS_FOR_REPORT, RACP_NO_RECORDS, RACP_COUNT_5, bytes.fromhex("06000301")]),
        ),
        max_size=6,
    ),
    st.lists(st.sampled_from(["report", "count", "abort", "record"]), max_size=6),
)
def test_fuzz_racp_client(indications: list[bytes], actions: list[str]) -> None:
    c = RacpClient()
    for action, data in zip(actions, indications):
        try:
            if action == "report":
                c.report_records_after(1)
            elif action == "count":
                c.report_number_of_records()
            elif action == "abort":
                c.abort()
            else:
                c.on_record(2)
            c.on_indication(data)
        except ProtocolError:
            pass
        assert c.state in RacpState


# --------------------------------------------------------------------------------------------
# Device clock

RX = dt.datetime(2025, 6, 1, 10, 0, 0, tzinfo=UTC)


def test_plausible_clock_is_used() -> None:
    assert resolve_time(dt.datetime(2025, 6, 1, 9, 58), RX, ClockCheck(), UTC) == (
        dt.datetime(2025, 6, 1, 9, 58, tzinfo=UTC),
        TimeSource.DEVICE_CLOCK,
    )


def test_no_time_or_untrusted_clock_gives_receipt() -> None:
    assert resolve_time(None, RX, ClockCheck(), UTC) == (RX, TimeSource.GATEWAY_RECEIPT)
    assert (
        resolve_time(dt.datetime(2025, 6, 1, 9, 58), RX, ClockCheck(), UTC, clock_untrusted=True)[1]
        == TimeSource.GATEWAY_RECEIPT
    )


# PLX Spot-check: Flags 0x02 (Measurement Status) | SpO2 97 | PR 70 | status bit 9 (data from storage)
PLX_SPOT_FROM_STORAGE = bytes.fromhex("02610046000002")


@pytest.mark.parametrize(
    ("stored", "source", "flagged"),
    [
        (True, TimeSource.GATEWAY_RECEIPT, True),
        (True, TimeSource.DEVICE_CLOCK, False),
        (False, TimeSource.GATEWAY_RECEIPT, False),
    ],
)
def test_a_stored_record_timed_by_receipt_is_flagged(stored: bool, source: TimeSource, flagged: bool) -> None:
    m = decode_plx_spot_check(PLX_SPOT_FROM_STORAGE)
    assert m.stored and "data-from-storage" in m.flags
    if not stored:
        m = dataclasses.replace(m, stored=False)
    obs = to_observation(m, device=DeviceIdentity(), measured_at=RX, time_source=source, received_at=RX, key="k")
    assert (STORED_TIME_UNKNOWN in obs.flags) is flagged


@pytest.mark.parametrize(
    "stamp", [dt.datetime(2000, 1, 1), dt.datetime(2019, 12, 31, 23, 59), dt.datetime(2025, 6, 1, 10, 6)]
)
def test_implausible_clock_without_offset_gives_receipt(stamp: dt.datetime) -> None:
    assert resolve_time(stamp, RX, ClockCheck(), UTC) == (RX, TimeSource.GATEWAY_RECEIPT)


def test_clock_a_year_behind_is_corrected() -> None:
    device_now = dt.datetime(2024, 6, 1, 10, 0, 0)
    offset = measure_offset(device_now, RX, UTC)
    assert offset == dt.timedelta(days=-365)
    clock = ClockCheck(offset=offset, set_at=RX)
    stored = dt.datetime(2024, 5, 31, 18, 0)  # stamped by the wrong clock before we set it
    assert resolve_time(stored, RX, clock, UTC) == (
        dt.datetime(2025, 5, 31, 18, 0, tzinfo=UTC),
        TimeSource.DEVICE_CLOCK_CORRECTED,
    )
    fresh = dt.datetime(2025, 6, 1, 10, 1)  # stamped after we set the clock
    assert resolve_time(fresh, RX + dt.timedelta(minutes=1), clock, UTC) == (
        dt.datetime(2025, 6, 1, 10, 1, tzinfo=UTC),
        TimeSource.DEVICE_CLOCK,
    )


def test_clock_reset_to_2000_is_corrected_when_offset_known() -> None:
    device_now = dt.datetime(2000, 1, 1, 0, 30)
    clock = ClockCheck(offset=measure_offset(device_now, RX, UTC), set_at=RX)
    measured, source = resolve_time(dt.datetime(2000, 1, 1, 0, 10), RX, clock, UTC)
    assert (measured, source) == (RX - dt.timedelta(minutes=20), TimeSource.DEVICE_CLOCK_CORRECTED)


def test_clock_limits_are_inclusive() -> None:
    """Five minutes is the tolerance itself: a stamp exactly 5 min ahead is believed, one second
    more is not. An offset of MEASUREMENT_NOISE is no error, one second more is corrected; a stamp
    from the first moment only the set clock can have made it (less the noise) is the set clock's.
    2020-01-01 00:00 is the earliest plausible time itself."""
    five = dt.timedelta(minutes=5)
    second = dt.timedelta(seconds=1)
    assert resolve_time((RX + five).replace(tzinfo=None), RX, ClockCheck(), UTC) == (RX + five, TimeSource.DEVICE_CLOCK)
    assert (
        resolve_time((RX + five + second).replace(tzinfo=None), RX, ClockCheck(), UTC)[1] == TimeSource.GATEWAY_RECEIPT
    )
    assert resolve_time(dt.datetime(2020, 1, 1), RX, ClockCheck(), UTC)[1] == TimeSource.DEVICE_CLOCK
    # an offset within what the measurement resolves is left alone; one second more is corrected
    stamp = dt.datetime(2025, 6, 1, 9, 0)
    assert resolve_time(stamp, RX, ClockCheck(offset=MEASUREMENT_NOISE), UTC)[1] == TimeSource.DEVICE_CLOCK
    assert resolve_time(stamp, RX, ClockCheck(offset=MEASUREMENT_NOISE + second), UTC) == (
        stamp.replace(tzinfo=UTC) - MEASUREMENT_NOISE - second,
        TimeSource.DEVICE_CLOCK_CORRECTED,
    )
    # after we set a clock that was an hour fast at RX: it stamped up to RX + 1 h before the
    # setting, so only later stamps (less the noise) are the set clock's own
    hour = dt.timedelta(hours=1)
    later = RX + hour + five
    fast = ClockCheck(offset=hour, set_at=RX)
    first_own = RX + hour - MEASUREMENT_NOISE
    assert resolve_time(first_own.replace(tzinfo=None), later, fast, UTC) == (first_own, TimeSource.DEVICE_CLOCK)
    assert resolve_time((first_own - second).replace(tzinfo=None), later, fast, UTC) == (
        first_own - second - hour,
        TimeSource.DEVICE_CLOCK_CORRECTED,
    )
    # an hour slow: anything from the setting on (less the noise) is the set clock's, up to the tolerance ahead
    slow = ClockCheck(offset=-hour, set_at=RX)
    assert resolve_time((RX - MEASUREMENT_NOISE).replace(tzinfo=None), RX, slow, UTC)[1] == TimeSource.DEVICE_CLOCK
    assert resolve_time((RX + five).replace(tzinfo=None), RX, slow, UTC)[1] == TimeSource.DEVICE_CLOCK
    minute = dt.timedelta(minutes=1)
    assert resolve_time((RX - hour - minute).replace(tzinfo=None), RX, slow, UTC) == (
        RX - minute,
        TimeSource.DEVICE_CLOCK_CORRECTED,
    )


def test_a_second_of_offset_is_not_corrected_and_correction_into_future_is_refused() -> None:
    clock = ClockCheck(offset=dt.timedelta(seconds=1))
    assert resolve_time(dt.datetime(2025, 6, 1, 9, 0), RX, clock, UTC)[1] == TimeSource.DEVICE_CLOCK
    ahead = ClockCheck(offset=dt.timedelta(days=-30))
    # corrected time would be a month in the future: nonsense, use receipt
    assert resolve_time(dt.datetime(2025, 6, 1, 9, 0), RX, ahead, UTC) == (RX, TimeSource.GATEWAY_RECEIPT)


# --------------------------------------------------------------------------------------------
# Record keys

BP = bytes.fromhex("1e780050005d00e8070305091e0f4800010400")


def test_record_key_stable_across_resends_and_distinct_otherwise() -> None:
    m = decode_blood_pressure_measurement(BP)
    k1 = record_key("aa:bb:cc:dd:ee:ff", m, RX)
    assert k1 == record_key("AA:BB:CC:DD:EE:FF", m, RX + dt.timedelta(days=1))
    other = decode_blood_pressure_measurement(BP[:1] + bytes.fromhex("7900") + BP[3:])
    assert record_key("aa:bb:cc:dd:ee:ff", other, RX) != k1
    assert record_key("aa:bb:cc:dd:ee:00", m, RX) != k1
    assert k1.startswith("ble:AA:BB:CC:DD:EE:FF:blood-pressure:20240305T093015:")
    no_time = decode_blood_pressure_measurement(bytes.fromhex("00780050005d00"))
    assert record_key("x", no_time, RX) != record_key("x", no_time, RX + dt.timedelta(seconds=1))


# RACP codes as the Glucose Profile numbers them (GATT Specification Supplement, 0x2A52).
RACP_RESPONSE_CODES = {
    0x01: ResponseCode.SUCCESS,
    0x02: ResponseCode.OP_CODE_NOT_SUPPORTED,
    0x03: ResponseCode.INVALID_OPERATOR,
    0x04: ResponseCode.OPERATOR_NOT_SUPPORTED,
    0x05: ResponseCode.INVALID_OPERAND,
    0x06: ResponseCode.NO_RECORDS_FOUND,
    0x07: ResponseCode.ABORT_UNSUCCESSFUL,
    0x08: ResponseCode.PROCEDURE_NOT_COMPLETED,
    0x09: ResponseCode.OPERAND_NOT_SUPPORTED,
}


@pytest.mark.parametrize(("code", "meaning"), RACP_RESPONSE_CODES.items())
def test_each_racp_response_code_is_read_as_the_meter_meant_it(code: int, meaning: ResponseCode) -> None:
    """A meter's 'procedure not completed' or 'abort unsuccessful' must not be read as another
    code (nor 'no records found' as a failure): a download taken for complete loses the readings
    still on the meter."""
    c = RacpClient()
    c.report_records_after(None)
    result = c.on_indication(bytes((0x06, 0x00, 0x01, code)))
    assert result.response_code is meaning and result.response_code.name == meaning.name
    assert result.ok is (meaning in (ResponseCode.SUCCESS, ResponseCode.NO_RECORDS_FOUND))


def test_racp_operators_and_delete_are_the_profile_numbers() -> None:
    """A request is read with the operator the bytes name: <= is not >= (the wrong records
    asked for), first and last record are not swapped, 0x02 is delete (not a report)."""
    assert decode_racp(bytes.fromhex("0102010800")).operator is Operator.LESS_THAN_OR_EQUAL
    assert decode_racp(bytes.fromhex("0105")).operator is Operator.FIRST_RECORD
    assert decode_racp(bytes.fromhex("0106")).operator is Operator.LAST_RECORD
    assert decode_racp(bytes.fromhex("0201")).op_code is OpCode.DELETE_STORED_RECORDS
    assert [(o.name, o.value) for o in Operator][4:] == [("WITHIN_RANGE", 4), ("FIRST_RECORD", 5), ("LAST_RECORD", 6)]
    assert RacpClient().delete_all_records() == bytes.fromhex("0201")


def test_a_fresh_client_counts_no_records_for_a_delete_or_a_count() -> None:
    """Only records received during a report are counted: a delete or a count on a fresh
    client reports 0 received (a count would otherwise claim readings that never arrived)."""
    c = RacpClient()
    c.delete_all_records()
    deleted = c.on_indication(bytes.fromhex("06000201"))
    assert (deleted.op_code, deleted.ok, deleted.records) == (OpCode.DELETE_STORED_RECORDS, True, 0)
    c.report_number_of_records()
    counted = c.on_indication(RACP_COUNT_5)
    assert (counted.records, counted.number_of_records) == (0, 5)


def test_records_after_every_sequence_number_and_no_other() -> None:
    """0 and 65535 are sequence numbers a meter has (0: ask from 1; 65535: nothing can follow,
    ask for all); -1 or 65536 are a caller's bug, refused rather than asking for the wrong records."""
    assert RacpClient().report_records_after(0) == bytes.fromhex("0103010100")
    assert RacpClient().report_records_after(0xFFFE) == bytes.fromhex("010301ffff")
    assert RacpClient().report_records_after(0xFFFF) == RACP_REPORT_ALL
    for wrong in (-1, 0x10000):
        c = RacpClient()
        with pytest.raises(ValueError, match="out of range"):
            c.report_records_after(wrong)
        assert c.state is RacpState.IDLE


def test_a_time_filtered_request_is_encoded_like_the_profile_vector() -> None:
    request = encode_request(
        OpCode.REPORT_STORED_RECORDS,
        Operator.GREATER_THAN_OR_EQUAL,
        FilterType.USER_FACING_TIME,
        (dt.datetime(2024, 3, 5, 9, 30, 15),),
    )
    assert request == RACP_REPORT_BY_TIME


def test_a_cut_range_request_names_the_missing_bound() -> None:
    """The error says which bound of a range is missing, so a log shows what the meter sent."""
    with pytest.raises(ProtocolError, match="Sequence Number 2 needs 2 bytes"):
        decode_racp(bytes.fromhex("0104010500"))
    with pytest.raises(ProtocolError, match="Sequence Number 1 needs 2 bytes"):
        decode_racp(bytes.fromhex("010401"))
    with pytest.raises(ProtocolError, match="User Facing Time 2 needs 7 bytes"):
        decode_racp(bytes.fromhex("010402e8070305091e0f"))
    with pytest.raises(ProtocolError, match="User Facing Time 1 needs 7 bytes"):
        decode_racp(bytes.fromhex("010402"))


def test_a_response_must_answer_the_running_request() -> None:
    """A response code with an operator, a request sent by the server, or a response to another
    procedure is refused: never taken as the end of the running download (readings still in
    flight would be lost)."""
    with pytest.raises(ProtocolError, match="needs the Null operator"):
        decode_racp(bytes.fromhex("06010101"))
    c = RacpClient()
    c.report_records_after(None)
    with pytest.raises(ProtocolError, match="server sent a request"):
        c.on_indication(RACP_REPORT_ALL)
    c.on_record(1)
    with pytest.raises(ProtocolError, match="response to DELETE_STORED_RECORDS while reporting"):
        c.on_indication(bytes.fromhex("06000201"))
    assert c.state is RacpState.REPORTING
    result = c.on_indication(RACP_SUCCESS_FOR_REPORT)
    assert (result.op_code, result.records, result.highest_sequence) == (OpCode.REPORT_STORED_RECORDS, 1, 1)


def test_device_stamps_are_read_with_the_offset_of_their_own_date() -> None:
    try:
        berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    except zoneinfo.ZoneInfoNotFoundError:
        missing("no IANA tz database (Debian package tzdata)")
    rx = dt.datetime(2025, 7, 15, 9, 0, tzinfo=UTC)
    assert resolve_time(dt.datetime(2025, 7, 15, 10, 0), rx, ClockCheck(), berlin) == (
        dt.datetime(2025, 7, 15, 8, 0, tzinfo=UTC),  # CEST, +02:00
        TimeSource.DEVICE_CLOCK,
    )
    # A clock a day behind, stamping in CET the day before the change to CEST: the correction
    # is a duration, made in UTC, so the DST change in between does not shift it by an hour.
    clock = ClockCheck(offset=dt.timedelta(days=-1))
    rx = dt.datetime(2025, 3, 31, 10, 0, tzinfo=UTC)
    assert resolve_time(dt.datetime(2025, 3, 29, 12, 0), rx, clock, berlin) == (
        dt.datetime(2025, 3, 30, 11, 0, tzinfo=UTC),
        TimeSource.DEVICE_CLOCK_CORRECTED,
    )


def test_a_clock_fast_by_less_than_the_tolerance_is_corrected_when_its_offset_was_measured() -> None:
    """A cuff 3 min fast (within the 5 min tolerance) whose Current Time we read at connect: its
    stored reading stamped just after the next patient's check-in was taken 3 min earlier."""
    fast = ClockCheck(offset=dt.timedelta(minutes=3), set_at=RX)
    stored = dt.datetime(2025, 6, 1, 10, 1)  # taken 09:58, before we set the clock
    assert resolve_time(stored, RX + dt.timedelta(seconds=30), fast, UTC) == (
        dt.datetime(2025, 6, 1, 9, 58, tzinfo=UTC),
        TimeSource.DEVICE_CLOCK_CORRECTED,
    )
    fresh = dt.datetime(2025, 6, 1, 10, 4)  # past anything the fast clock stamped before we set it
    assert resolve_time(fresh, RX + dt.timedelta(minutes=4), fast, UTC) == (
        fresh.replace(tzinfo=UTC),
        TimeSource.DEVICE_CLOCK,
    )
    # measured from a live value (no Current Time to set): every stamp is the fast clock's
    live = ClockCheck(offset=dt.timedelta(minutes=3))
    assert resolve_time(dt.datetime(2025, 6, 1, 10, 0), RX, live, UTC) == (
        RX - dt.timedelta(minutes=3),
        TimeSource.DEVICE_CLOCK_CORRECTED,
    )
    # a second off is what the measurement itself resolves: left as the device's clock
    assert resolve_time(stored, RX, ClockCheck(offset=dt.timedelta(seconds=1)), UTC)[1] == TimeSource.DEVICE_CLOCK
