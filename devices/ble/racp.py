"""Record Access Control Point (0x2A52): requests, responses, and the client's state machine.

A request is Op Code u8, Operator u8, Operand; filtered operators (<=, >=, range) start the
operand with a Filter Type (0x01 sequence number u16, 0x02 user facing time as Date Time).
The server answers with indications: 0x05 Number of Stored Records Response (operator 0x00,
u16 count) or 0x06 Response Code (operator 0x00, request op code u8, response code u8). A
report request streams the records as measurement notifications first, then the response code.

`RacpClient` is sans-I/O: it returns the bytes to write and digests what comes back; the caller
moves the bytes and runs the timer.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from devices.ble.payload import DATE_TIME_LENGTH, PayloadReader, decode_date_time, encode_date_time
from devices.errors import ProtocolError


class OpCode(enum.IntEnum):
    REPORT_STORED_RECORDS = 0x01
    DELETE_STORED_RECORDS = 0x02
    ABORT_OPERATION = 0x03
    REPORT_NUMBER_OF_STORED_RECORDS = 0x04
    NUMBER_OF_STORED_RECORDS_RESPONSE = 0x05
    RESPONSE_CODE = 0x06


class Operator(enum.IntEnum):
    NULL = 0x00
    ALL_RECORDS = 0x01
    LESS_THAN_OR_EQUAL = 0x02
    GREATER_THAN_OR_EQUAL = 0x03
    WITHIN_RANGE = 0x04
    FIRST_RECORD = 0x05
    LAST_RECORD = 0x06


class FilterType(enum.IntEnum):
    SEQUENCE_NUMBER = 0x01
    USER_FACING_TIME = 0x02


class ResponseCode(enum.IntEnum):
    SUCCESS = 0x01
    OP_CODE_NOT_SUPPORTED = 0x02
    INVALID_OPERATOR = 0x03
    OPERATOR_NOT_SUPPORTED = 0x04
    INVALID_OPERAND = 0x05
    NO_RECORDS_FOUND = 0x06
    ABORT_UNSUCCESSFUL = 0x07
    PROCEDURE_NOT_COMPLETED = 0x08
    OPERAND_NOT_SUPPORTED = 0x09


FILTERED = {Operator.LESS_THAN_OR_EQUAL, Operator.GREATER_THAN_OR_EQUAL, Operator.WITHIN_RANGE}
REQUESTS = {
    OpCode.REPORT_STORED_RECORDS,
    OpCode.DELETE_STORED_RECORDS,
    OpCode.ABORT_OPERATION,
    OpCode.REPORT_NUMBER_OF_STORED_RECORDS,
}
MAX_SEQUENCE = 0xFFFF


@dataclass(frozen=True, slots=True)
class RacpMessage:
    """One RACP value, request or response, as the bytes say."""

    op_code: OpCode
    operator: Operator
    filter_type: FilterType | None = None
    filter_values: tuple[int | dt.datetime | None, ...] = ()  # 1 value (<=, >=) or 2 (range)
    request_op_code: OpCode | None = None  # Response Code: which request it answers
    response_code: ResponseCode | None = None
    number_of_records: int | None = None  # Number of Stored Records Response

    @property
    def is_response(self) -> bool:
        return self.op_code in (OpCode.RESPONSE_CODE, OpCode.NUMBER_OF_STORED_RECORDS_RESPONSE)


def _enum(cls: type[enum.IntEnum], value: int, what: str) -> enum.IntEnum:
    try:
        return cls(value)
    except ValueError:
        raise ProtocolError(f"Record Access Control Point: {what} {value:#04x} is reserved") from None


def decode_racp(data: bytes) -> RacpMessage:
    r = PayloadReader(data, "Record Access Control Point (0x2A52)")
    op = _enum(OpCode, r.u8("Op Code"), "op code")
    operator = _enum(Operator, r.u8("Operator"), "operator")
    if op == OpCode.RESPONSE_CODE:
        if operator != Operator.NULL:
            raise ProtocolError(
                f"Record Access Control Point: a response code needs the Null operator, not {operator.name}"
            )
        request = _enum(OpCode, r.u8("Request Op Code"), "request op code")
        code = _enum(ResponseCode, r.u8("Response Code Value"), "response code")
        r.end()
        return RacpMessage(op, operator, request_op_code=request, response_code=code)  # type: ignore[arg-type]
    if op == OpCode.NUMBER_OF_STORED_RECORDS_RESPONSE:
        if operator != Operator.NULL:
            raise ProtocolError("Record Access Control Point: a record count needs the Null operator")
        count = r.u16("Number of Records")
        r.end()
        return RacpMessage(op, operator, number_of_records=count)  # type: ignore[arg-type]
    # A request.
    if op == OpCode.ABORT_OPERATION:
        if operator != Operator.NULL:
            raise ProtocolError("Record Access Control Point: abort needs the Null operator")
        r.end()
        return RacpMessage(op, operator)  # type: ignore[arg-type]
    if operator == Operator.NULL:
        raise ProtocolError(f"Record Access Control Point: {op.name} needs an operator")
    if operator not in FILTERED:
        r.end()
        return RacpMessage(op, operator)  # type: ignore[arg-type]
    filter_type = _enum(FilterType, r.u8("Filter Type"), "filter type")
    count = 2 if operator == Operator.WITHIN_RANGE else 1
    values: list[int | dt.datetime | None] = []
    for i in range(count):
        if filter_type == FilterType.SEQUENCE_NUMBER:
            values.append(r.u16(f"Sequence Number {i + 1}"))
        else:
            values.append(decode_date_time(r.take(DATE_TIME_LENGTH, f"User Facing Time {i + 1}")))
    r.end()
    return RacpMessage(op, operator, filter_type, tuple(values))  # type: ignore[arg-type]


def encode_request(
    op: OpCode,
    operator: Operator = Operator.ALL_RECORDS,
    filter_type: FilterType | None = None,
    values: tuple[int | dt.datetime, ...] = (),
) -> bytes:
    if op not in REQUESTS:
        raise ValueError(f"{op.name} is not a request")
    if op == OpCode.ABORT_OPERATION:
        return bytes((op, Operator.NULL))
    out = bytes((op, operator))
    if operator in FILTERED:
        if filter_type is None or len(values) != (2 if operator == Operator.WITHIN_RANGE else 1):
            raise ValueError(f"{operator.name} needs a filter type and its value(s)")
        out += bytes((filter_type,))
        for v in values:
            if filter_type == FilterType.SEQUENCE_NUMBER:
                assert isinstance(v, int)
                out += v.to_bytes(2, "little")
            else:
                assert isinstance(v, dt.datetime)
                out += encode_date_time(v)
    return out


def encode_response_code(request: OpCode, code: ResponseCode) -> bytes:
    return bytes((OpCode.RESPONSE_CODE, Operator.NULL, request, code))


def encode_number_of_records(count: int) -> bytes:
    return bytes((OpCode.NUMBER_OF_STORED_RECORDS_RESPONSE, Operator.NULL)) + count.to_bytes(2, "little")


class RacpState(str, enum.Enum):
    IDLE = "idle"
    REPORTING = "reporting"  # records arriving, then a response code
    COUNTING = "counting"  # waiting for the number of records
    DELETING = "deleting"
    ABORTING = "aborting"


# (state, event) -> next state; anything else is a protocol error.
TRANSITIONS: dict[tuple[RacpState, str], RacpState] = {
    (RacpState.IDLE, "report"): RacpState.REPORTING,
    (RacpState.IDLE, "count"): RacpState.COUNTING,
    (RacpState.IDLE, "delete"): RacpState.DELETING,
    (RacpState.REPORTING, "record"): RacpState.REPORTING,
    (RacpState.REPORTING, "response-code"): RacpState.IDLE,
    (RacpState.REPORTING, "abort"): RacpState.ABORTING,
    (RacpState.COUNTING, "number-of-records"): RacpState.IDLE,
    (RacpState.COUNTING, "response-code"): RacpState.IDLE,
    (RacpState.DELETING, "response-code"): RacpState.IDLE,
    (RacpState.ABORTING, "response-code"): RacpState.IDLE,
    (RacpState.ABORTING, "record"): RacpState.ABORTING,  # records already in flight
}
PENDING_OP = {
    RacpState.REPORTING: OpCode.REPORT_STORED_RECORDS,
    RacpState.COUNTING: OpCode.REPORT_NUMBER_OF_STORED_RECORDS,
    RacpState.DELETING: OpCode.DELETE_STORED_RECORDS,
    RacpState.ABORTING: OpCode.ABORT_OPERATION,
}


@dataclass(frozen=True, slots=True)
class RacpResult:
    """How a procedure ended. `ok` covers "no records found", which is a normal outcome."""

    op_code: OpCode
    response_code: ResponseCode | None
    records: int = 0  # records received during a report
    number_of_records: int | None = None
    highest_sequence: int | None = None

    @property
    def ok(self) -> bool:
        return self.response_code in (None, ResponseCode.SUCCESS, ResponseCode.NO_RECORDS_FOUND)


class RacpClient:
    def __init__(self) -> None:
        self.state = RacpState.IDLE
        self._records = 0
        self._highest: int | None = None

    def _go(self, event: str) -> None:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise ProtocolError(f"Record Access Control Point: {event} while {self.state.value}")
        self.state = nxt

    def report_records_after(self, last_sequence: int | None) -> bytes:
        """Request the records newer than `last_sequence` (all when None)."""
        if last_sequence is not None and not 0 <= last_sequence <= MAX_SEQUENCE:
            raise ValueError(f"sequence number {last_sequence} out of range")
        self._go("report")
        self._records, self._highest = 0, None
        if last_sequence is None or last_sequence == MAX_SEQUENCE:
            return encode_request(OpCode.REPORT_STORED_RECORDS, Operator.ALL_RECORDS)
        return encode_request(
            OpCode.REPORT_STORED_RECORDS,
            Operator.GREATER_THAN_OR_EQUAL,
            FilterType.SEQUENCE_NUMBER,
            (last_sequence + 1,),
        )

    def report_number_of_records(self) -> bytes:
        self._go("count")
        return encode_request(OpCode.REPORT_NUMBER_OF_STORED_RECORDS, Operator.ALL_RECORDS)

    def delete_all_records(self) -> bytes:
        self._go("delete")
        return encode_request(OpCode.DELETE_STORED_RECORDS, Operator.ALL_RECORDS)

    def abort(self) -> bytes:
        self._go("abort")
        return encode_request(OpCode.ABORT_OPERATION)

    def on_record(self, sequence: int) -> bool:
        """A measurement arrived; True when it belongs to the running report."""
        if self.state not in (RacpState.REPORTING, RacpState.ABORTING):
            return False  # a live measurement, outside any procedure
        self._go("record")
        self._records += 1
        self._highest = sequence if self._highest is None else max(self._highest, sequence)
        return True

    def on_indication(self, data: bytes) -> RacpResult:
        """Digest the server's indication; returns how the running procedure ended."""
        msg = decode_racp(data)
        if not msg.is_response:
            raise ProtocolError(f"Record Access Control Point: server sent a request ({msg.op_code.name})")
        pending = PENDING_OP.get(self.state)
        if msg.op_code == OpCode.NUMBER_OF_STORED_RECORDS_RESPONSE:
            self._go("number-of-records")
            return RacpResult(OpCode.REPORT_NUMBER_OF_STORED_RECORDS, None, number_of_records=msg.number_of_records)
        if msg.request_op_code != pending:
            raise ProtocolError(
                f"Record Access Control Point: response to "
                f"{msg.request_op_code.name if msg.request_op_code else '?'} while "
                f"{self.state.value}"
            )
        self._go("response-code")
        assert pending is not None  # checked equal to the response's request op code above
        return RacpResult(pending, msg.response_code, self._records, None, self._highest)
