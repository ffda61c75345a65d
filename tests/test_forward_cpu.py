"""Less CPU per study (issue 16, item 4): pynetdicom's DUL thread waits for traffic instead of
polling, its log-formatting handlers are unbound while their logger is off, the C-STORE-RQ
command set is encoded by hand (byte for byte what pynetdicom encodes), the usual C-STORE-RSP is
decoded by hand (into the very primitive pynetdicom decodes, anything else left to pynetdicom),
a C-STORE-RQ's PDUs are encoded by hand (byte for byte pynetdicom's) and written in one go, and a
run of C-STOREs keeps pynetdicom's association reactor paused. The CPU figures are
bench/forward.py's; these tests check the behaviour (counts and bytes, no clocks)."""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification

from tests.peers import EcgPayload, ScriptedStoreSCP, ecg_payloads
from uploader import dicom_store
from uploader.dicom_association import PeerSettings, associate, release
from uploader.dicom_part10 import (
    Part10,
    UnsendablePayload,
    parse_part10,
    read_part10_by_hand,
    read_part10_with_pydicom,
)
from uploader.dicom_reactor import MAX_WAIT_S, decode_store_responses, drop_log_formatting, store_response
from uploader.dicom_store import (
    StoreAssociation,
    commitment_request,
    commitment_request_bytes,
    pdata_fragments,
    pdata_pdus,
    store_command_set,
)
from uploader.errors import TransientError
from uploader.link_pacing import LinkPacer

ECG_CLASS = "1.2.840.10008.5.1.4.1.1.9.1.1"
REPORT_WAIT_S = 30.0


@pytest.fixture(scope="module")
def ecgs() -> list[EcgPayload]:
    return ecg_payloads(6)


def peer_at(port: int, called_ae: str) -> PeerSettings:
    return PeerSettings("127.0.0.1", port, called_ae, "LASTMILE", timeout_s=10.0)


# -- the hand-encoded C-STORE-RQ ----------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 5, 16377, 16378, 16379, 40000, 130_001])
@pytest.mark.parametrize("instance", ["1.2.3.45", "1.2.3.4", "2.25.1234567890123456789012345678901234567"])
@pytest.mark.parametrize("max_pdu", [16384, 4096, 0])
def test_command_set_and_fragments_are_pynetdicoms_bytes(size: int, instance: str, max_pdu: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"\x7f" * (size % 256)
    req = C_STORE()
    req.MessageID = 65535
    req.AffectedSOPClassUID = ECG_CLASS
    req.AffectedSOPInstanceUID = instance
    req.Priority = 2
    req.DataSet = BytesIO(data)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    theirs = [p.presentation_data_value_list for p in msg.encode_msg(3, max_pdu)]
    ours = [
        p.presentation_data_value_list
        for p in pdata_fragments(3, store_command_set(65535, ECG_CLASS, instance), data, max_pdu)
    ]
    assert ours == theirs


@pytest.mark.parametrize("size", [0, 1, 16377, 16378, 16379, 130_001])
@pytest.mark.parametrize("max_pdu", [16384, 4096, 0])
@pytest.mark.parametrize("context_id", [1, 255])
def test_whole_message_pdus_are_pynetdicoms_bytes(size: int, max_pdu: int, context_id: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"\x7f" * (size % 256)
    command = store_command_set(7, ECG_CLASS, "1.2.3.45")
    # what pynetdicom's DUL writes for each P-DATA primitive: a P-DATA-TF PDU of it
    theirs = [P_DATA_TF(p).encode() for p in pdata_fragments(context_id, command, data, max_pdu)]
    pdus, ends = pdata_pdus(context_id, command, data, max_pdu)
    assert [pdus[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)] == theirs
    assert ends[-1] == len(pdus)


# -- the C-STORE-RSP decoded by hand -------------------------------------------------------------
def store_rsp(max_pdu: int = 16384, context_id: int = 1, **fields: Any) -> list[P_DATA]:
    """A C-STORE-RSP as pynetdicom 3.0 encodes it (its P-DATA primitives)."""
    rsp = C_STORE()
    for name, value in fields.items():
        setattr(rsp, name, value)
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    return list(msg.encode_msg(context_id, max_pdu))


def received(pdatas: list[P_DATA], *, by_hand: bool) -> tuple[object, int]:
    """What an association's DIMSE layer makes of `pdatas` (pynetdicom's own decoding, or with
    ours in front): the queued primitive's class and attributes, the exception raised, or the
    DUL events it asked for; and how many were decoded by hand."""
    assoc = Association(AE(), "requestor")  # never connected: only its DIMSE layer is used
    drop_log_formatting(assoc)  # as on every association we open (the log level allowing)
    if by_hand:
        assert decode_store_responses(assoc)
    try:
        for pdata in pdatas:
            assoc.dimse.receive_primitive(pdata)
    except Exception as exc:  # noqa: BLE001 — pynetdicom's own failure on bad bytes is the reference
        outcome: object = ("raised", type(exc).__name__)
    else:
        queued = list(assoc.dimse.msg_queue.queue)
        events = list(assoc.dul.event_queue.queue)
        outcome = (
            [(cx, type(p).__name__, comparable(vars(p)), p.is_valid_response) for cx, p in queued],
            events,
            assoc.dimse.message is None,
        )
    return outcome, getattr(assoc.dimse, "lastmile_decodes", 0)


def comparable(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v.getvalue() if isinstance(v, BytesIO) else v for k, v in attributes.items()}


STORE_RSP_CASES: dict[str, dict[str, Any]] = {
    "success": {"MessageIDBeingRespondedTo": 1, "Status": 0x0000},
    "success, both UIDs (odd, even)": {
        "MessageIDBeingRespondedTo": 65535,
        "Status": 0x0000,
        "AffectedSOPClassUID": ECG_CLASS,
        "AffectedSOPInstanceUID": "1.2.3.45",
    },
    "success, 64-char UID": {
        "MessageIDBeingRespondedTo": 7,
        "Status": 0x0000,
        "AffectedSOPInstanceUID": "2.25." + "1" * 59,
    },
    **{
        f"status 0x{status:04X}": {
            "MessageIDBeingRespondedTo": 2,
            "Status": status,
            "AffectedSOPClassUID": ECG_CLASS,
            "AffectedSOPInstanceUID": "1.2.3.4",
        }
        for status in (0x0001, 0x0107, 0x0110, 0x0117, 0x0122, 0x0124, 0x0211, 0xA700, 0xA900, 0xA9FF)
        + (0xB000, 0xB006, 0xB007, 0xC000, 0xC123, 0xCFFF, 0xFE00, 0xFF00, 0xFFFF)
    },
    "warning with comment (odd)": {"MessageIDBeingRespondedTo": 3, "Status": 0xB000, "ErrorComment": "coerced"},
    "failure with comment (even)": {"MessageIDBeingRespondedTo": 3, "Status": 0xC000, "ErrorComment": "bad file"},
    "failure with 64-char comment": {"MessageIDBeingRespondedTo": 3, "Status": 0xA700, "ErrorComment": "x" * 64},
    "failure with offending elements": {
        "MessageIDBeingRespondedTo": 4,
        "Status": 0xA900,
        "OffendingElement": [0x00100010, 0x00080018],
        "ErrorComment": "Patient^Name mismatch",
    },
    "warning with one offending element": {
        "MessageIDBeingRespondedTo": 4,
        "Status": 0xB007,
        "OffendingElement": 0x00100020,
    },
    "no status (invalid)": {"MessageIDBeingRespondedTo": 5},
    "no message id (invalid)": {"Status": 0x0000},
}
# read by hand: Status and Message ID, UIDs or not, no optional status element
PLAIN = {
    name
    for name, fields in STORE_RSP_CASES.items()
    if {"MessageIDBeingRespondedTo", "Status"} <= fields.keys()
    and not {"ErrorComment", "OffendingElement"} & fields.keys()
}


@pytest.mark.parametrize("max_pdu", [16384, 40])
@pytest.mark.parametrize("case", sorted(STORE_RSP_CASES))
def test_store_response_decoded_by_hand_is_pynetdicoms_primitive(case: str, max_pdu: int) -> None:
    pdatas = store_rsp(max_pdu, context_id=3, **STORE_RSP_CASES[case])
    theirs, _ = received(pdatas, by_hand=False)
    ours, by_hand = received(pdatas, by_hand=True)
    assert ours == theirs
    # plain responses in one fragment are read by hand; comments, offending elements, a command
    # set split over several fragments and invalid ones are left to pynetdicom
    assert by_hand == (1 if case in PLAIN and len(pdatas) == 1 else 0)


def test_plain_response_cases_are_the_ones_expected() -> None:
    # the partition above is what the test relies on: a mistake in it would hide a fallback
    assert len(PLAIN) == 22
    assert not any("comment" in name or "offending" in name or "invalid" in name for name in PLAIN)


def raw_command(*elements: tuple[int, bytes]) -> bytes:
    return b"".join(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value for tag, value in elements)


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def command_pdata(command: bytes, header: int = 0x03, context_id: int = 1) -> P_DATA:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, bytes((header,)) + command))
    return pdata


RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS = (
    (0x00000100, us(0x8001)),
    (0x00000120, us(9)),
    (0x00000800, us(0x0101)),
    (0x00000900, us(0)),
)
ODD_COMMANDS: dict[str, bytes] = {
    "minimal (no group length)": raw_command(RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS),
    "group length that lies": raw_command((0, struct.pack("<I", 999)), RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS),
    "UID padded with a space": raw_command((2, b"1.2.3 "), RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS),
    "UID of odd length, unpadded": raw_command((2, b"1.2.3"), RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS),
    "non-conformant UID": raw_command((2, b"1.02.3"), RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS),
    "UID of 65 chars": raw_command((2, b"1." + b"2" * 63), RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS),
    "two UIDs in one": raw_command((2, b"1.2\\1.3\0"), RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS),
    "empty UID": raw_command((0x00001000, b""), RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS),
    "Status of 4 bytes (VM 2)": raw_command(RSP_FIELD, MSG_ID, DATA_SET_TYPE, (0x00000900, us(0) + us(0xC000))),
    "Status of 1 byte": raw_command(RSP_FIELD, MSG_ID, DATA_SET_TYPE, (0x00000900, b"\0")),
    "repeated Status": raw_command(RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS, (0x00000900, us(0xC000))),
    "out of order": raw_command(MSG_ID, RSP_FIELD, DATA_SET_TYPE, STATUS),
    "Priority (a request's element)": raw_command(RSP_FIELD, MSG_ID, (0x00000700, us(2)), DATA_SET_TYPE, STATUS),
    "a C-STORE-RQ": raw_command((0x00000100, us(0x0001)), (0x00000110, us(9)), DATA_SET_TYPE, STATUS),
    "a C-ECHO-RSP": raw_command((0x00000100, us(0x8030)), MSG_ID, DATA_SET_TYPE, STATUS),
    "data set announced": raw_command(RSP_FIELD, MSG_ID, (0x00000800, us(0x0000)), STATUS),
    "no Status": raw_command(RSP_FIELD, MSG_ID, DATA_SET_TYPE),
    "no Command Field": raw_command(MSG_ID, DATA_SET_TYPE, STATUS),
    "trailing bytes": raw_command(RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS) + b"\0\0\0",
    "length past the end": raw_command(RSP_FIELD, MSG_ID, DATA_SET_TYPE, STATUS)[:-2] + b"\xff\xff\xff\xff",
    "empty": b"",
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the damaged bytes
@pytest.mark.parametrize("header", [0x03, 0x01, 0x02, 0x07])
@pytest.mark.parametrize("case", sorted(ODD_COMMANDS))
def test_odd_command_sets_fare_as_with_pynetdicom(case: str, header: int) -> None:
    pdatas = [command_pdata(ODD_COMMANDS[case], header)]
    theirs, _ = received(pdatas, by_hand=False)
    ours, by_hand = received(pdatas, by_hand=True)
    assert ours == theirs
    read_by_hand = {
        "minimal (no group length)",
        "group length that lies",
        "UID padded with a space",
        "UID of odd length, unpadded",
    }
    assert by_hand == (1 if case in read_by_hand and header == 0x03 else 0)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the damaged bytes
def test_every_cut_of_a_response_fares_as_with_pynetdicom() -> None:
    (whole,) = store_rsp(
        MessageIDBeingRespondedTo=9, Status=0xB000, AffectedSOPClassUID=ECG_CLASS, AffectedSOPInstanceUID="1.2.3.4"
    )
    ((_cx, data),) = whole.presentation_data_value_list
    for size in range(1, len(data) + 1):
        pdatas = [command_pdata(data[1:size])]
        assert received(pdatas, by_hand=True)[0] == received(pdatas, by_hand=False)[0], size
    assert store_response(data[1:]) is not None and store_response(data[1:-1]) is None


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the damaged bytes
@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_responses_fare_as_with_pynetdicom(data: st.DataObject) -> None:
    (whole,) = store_rsp(
        MessageIDBeingRespondedTo=9, Status=0x0000, AffectedSOPClassUID=ECG_CLASS, AffectedSOPInstanceUID="1.2.3.4"
    )
    command = bytearray(whole.presentation_data_value_list[0][1][1:])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(command) - 1))
        command[at] = data.draw(st.integers(0, 255))
    pdatas = [command_pdata(bytes(command))]
    assert received(pdatas, by_hand=True)[0] == received(pdatas, by_hand=False)[0]


def test_responses_are_left_to_pynetdicom_while_its_logging_wants_them() -> None:
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        pdatas = store_rsp(MessageIDBeingRespondedTo=1, Status=0x0000)
        ours, by_hand = received(pdatas, by_hand=True)
        assert by_hand == 0  # its EVT_DIMSE_RECV handler formats the message object
        assert ours == received(pdatas, by_hand=False)[0]
    finally:
        logger.setLevel(before)


# -- the storage commitment request encoded by hand ------------------------------------------------
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("count", [1, 2, 40, 500])
@pytest.mark.parametrize("instance_chars", [7, 8, 64])
def test_commitment_request_is_pydicoms_bytes(implicit: bool, count: int, instance_chars: int) -> None:
    refs = [(ECG_CLASS, f"1.{i}." + "9" * (instance_chars - 3 - len(str(i)))) for i in range(count)]
    refs.append(("1.2.840.10008.5.1.4.1.1.9.1.2", "2.25.1"))
    assert all(len(uid) == instance_chars for _c, uid in refs[:-1])
    for txn in ("2.25.12345", "2.25.123456"):
        theirs = encode(commitment_request(txn, refs), implicit, True)
        assert commitment_request_bytes(txn, refs, implicit=implicit) == theirs


@pytest.mark.parametrize("odd", ["1.2.3 ", "", "1." + "2" * 63, "1.2.a", "1.2.\u0663", "1.2\\1.3"])
def test_commitment_request_with_an_odd_uid_is_left_to_pydicom(odd: str) -> None:
    assert commitment_request_bytes("2.25.1", [(ECG_CLASS, odd)], implicit=True) is None
    assert commitment_request_bytes(odd, [(ECG_CLASS, "1.2")], implicit=False) is None


# -- the DUL thread waits ---------------------------------------------------------------------------
class CountingTimer:
    """Stands in for the DUL's ARTIM timer, which its loop reads once per turn: counts the turns."""

    def __init__(self, timer: Any) -> None:
        self._timer = timer
        self.turns = 0

    @property
    def expired(self) -> bool:
        self.turns += 1
        return bool(self._timer.expired)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._timer, name)


@pytest.fixture
def scp(scripted_scp_factory: Callable[..., ScriptedStoreSCP]) -> ScriptedStoreSCP:
    return scripted_scp_factory(commitment=True, report_on_same_association=True)


@pytest.fixture
def echo_association(scp: ScriptedStoreSCP) -> Iterator[Any]:
    assoc = associate(peer_at(scp.port, scp.ae_title), [build_context(Verification)], [])
    try:
        yield assoc
    finally:
        release(assoc)


def test_idle_dul_thread_waits_instead_of_polling_every_millisecond(
    echo_association: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pynetdicom")  # why an association ended, if one does
    counter = CountingTimer(echo_association.dul.artim_timer)
    echo_association.dul.artim_timer = counter
    idle_s = 0.5
    time.sleep(idle_s)
    # polling: one turn a millisecond (~500); waiting: one per MAX_WAIT_S, plus a few
    assert counter.turns <= idle_s / MAX_WAIT_S + 10, counter.turns
    # a request after the idle spell wakes it at once and is answered (once, in a CI rehearsal
    # under heavy load, an echo got no answer: the failure says how the association ended)
    for n in range(3):
        began = time.monotonic()
        answer = echo_association.send_c_echo()
        assert "Status" in answer and answer.Status == 0x0000, (
            f"echo {n + 1}: no answer after {time.monotonic() - began:.1f} s; established "
            f"{echo_association.is_established}, aborted {echo_association.is_aborted}, released "
            f"{echo_association.is_released}, DUL alive {echo_association.dul.is_alive()}, state "
            f"{echo_association.dul.state_machine.current_state}; pynetdicom said: "
            + " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        )
    assert counter.turns <= idle_s / MAX_WAIT_S + 10 + 3 * 20, counter.turns


def test_dul_thread_ends_with_the_association(scp: ScriptedStoreSCP) -> None:
    assoc = associate(peer_at(scp.port, scp.ae_title), [build_context(Verification)], [])
    dul = assoc.dul
    assert dul.lastmile_waits
    release(assoc)
    dul.join(timeout=10)  # told to stop while waiting: woken, not left to its cap
    assert not dul.is_alive()


def test_log_formatting_handlers_unbound_only_while_their_logger_is_off(scp: ScriptedStoreSCP) -> None:
    logger = logging.getLogger("pynetdicom")
    before = logger.level

    def formatting_handlers(assoc: Any) -> list[str]:
        return [
            h.__name__
            for event in (evt.EVT_DIMSE_SENT, evt.EVT_DIMSE_RECV, evt.EVT_PDU_SENT, evt.EVT_PDU_RECV)
            for h, _args in assoc.get_handlers(event)
            if h.__module__ == "pynetdicom._handlers"
        ]

    try:
        for level, expected in ((logging.CRITICAL, 0), (logging.INFO, 4)):
            logger.setLevel(level)
            assoc = associate(peer_at(scp.port, scp.ae_title), [build_context(Verification)], [])
            try:
                assert len(formatting_handlers(assoc)) == expected
                assert assoc.send_c_echo().Status == 0x0000
            finally:
                release(assoc)
    finally:
        logger.setLevel(before)


# -- a run of C-STOREs, then pynetdicom's own requests on the same association ----------------------
@pytest.mark.parametrize("log_level", [logging.CRITICAL, logging.DEBUG], ids=["quiet", "debug-log"])
def test_run_of_stores_then_commitment_on_the_same_association(
    scp: ScriptedStoreSCP, ecgs: list[EcgPayload], log_level: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The same sender at every log level: with pynetdicom logging at DEBUG its handlers would
    take the stores to its own PDU path (a gateway run with debug logs sent otherwise, with
    other timing on a slow link); each C-STORE is logged by us instead."""
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(log_level)
    caplog.set_level(log_level, logger="uploader.dicom_store")
    reports: list[Any] = []
    got = threading.Event()

    def on_report(report: Any) -> None:
        reports.append(report)
        got.set()

    try:
        with StoreAssociation(peer_at(scp.port, scp.ae_title), commitment=True, on_report=on_report) as assoc:
            outcomes = [assoc.store(p.data) for p in ecgs[:4]]
            # written whole and read by hand, whatever pynetdicom's logger does
            assert (assoc.messages_written_whole, assoc.responses_decoded_by_hand) == (4, 4)
            txn = generate_uid()
            assoc.request_commitment(txn, [(p.sop_class_uid, p.sop_instance_uid) for p in ecgs[:4]])
            # the reactor runs again: it serves the report the peer sends on this association
            assert got.wait(REPORT_WAIT_S)
            deadline = time.monotonic() + REPORT_WAIT_S
            while not scp.reports_sent and time.monotonic() < deadline:
                time.sleep(0.02)
            assert assoc.store(ecgs[4].data).stored  # and a store after it pauses it again
    finally:
        logger.setLevel(before)
    assert [o.status for o in outcomes] == [0x0000] * 4
    assert [r.sop_instance_uid for r in scp.received] == [p.sop_instance_uid for p in ecgs[:5]]
    assert [u for _c, u in reports[0].committed] == [p.sop_instance_uid for p in ecgs[:4]]
    assert [o.sop_instance_uid for o in outcomes] == [p.sop_instance_uid for p in ecgs[:4]]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C-STORE ")]
    if log_level == logging.DEBUG:
        assert [m.split()[1] for m in logged] == [p.sop_instance_uid for p in ecgs[:5]]
        assert all(m.endswith(": 0x0000 Success") for m in logged), logged
    else:
        assert logged == []


class RecordingPacer(LinkPacer):
    """A pacer that sees every PDU an association writes (`pdu_limit`: paced, PDUs that small)."""

    def __init__(self, pdu_limit: int | None) -> None:
        super().__init__(sleep=lambda s: None)
        self.pdu_limit = pdu_limit
        self.pdus: list[bytes] = []

    def pdu_bytes(self) -> int | None:
        return self.pdu_limit

    def on_pdu_sent(self, data: bytes | memoryview) -> None:
        self.pdus.append(bytes(data))
        super().on_pdu_sent(data)


def split_pdus(data: bytes) -> list[bytes]:
    pdus, at = [], 0
    while at < len(data):
        end = at + 6 + int.from_bytes(data[at + 2 : at + 6], "big")
        pdus.append(data[at:end])
        at = end
    return pdus


@pytest.mark.parametrize("pdu_limit", [None, 4096], ids=["unpaced", "paced"])
def test_stores_are_written_whole_and_every_pdu_is_seen_by_the_pacer(
    scp: ScriptedStoreSCP, ecgs: list[EcgPayload], pdu_limit: int | None
) -> None:
    pacer = RecordingPacer(pdu_limit)
    with StoreAssociation(peer_at(scp.port, scp.ae_title), pacer=pacer) as assoc:
        outcomes = [assoc.store(p.data) for p in ecgs[:3]]
        whole = assoc.messages_written_whole
    assert whole == 3
    assert [o.status for o in outcomes] == [0x0000] * 3
    assert [r.sop_instance_uid for r in scp.received] == [p.sop_instance_uid for p in ecgs[:3]]
    # each PDU once (paced: one at a time; else each object's run at once), P-DATA-TF, within
    # the limit; per object a command PDU then the data set's
    runs = [p for p in pacer.pdus if p[0] == 0x04]
    assert len(runs) == (3 if pdu_limit is None else len(split_pdus(b"".join(runs))))
    data_pdus = [p for p in split_pdus(b"".join(pacer.pdus)) if p[0] == 0x04]
    assert all(len(p) - 6 <= (pdu_limit or 16382) for p in data_pdus)  # the PDU length field's bound
    headers = [p[11] for p in data_pdus]  # each PDU's one PDV: its message control header
    assert headers.count(0x03) == 3 and headers.count(0x02) == 3
    sizes = [o.wire_bytes for o in outcomes]
    assert sum(len(p) - 12 for p in data_pdus if p[11] in (0x00, 0x02)) == sum(sizes)


def test_peer_abort_while_the_reactor_is_paused_is_transient(
    scripted_scp_factory: Callable[..., ScriptedStoreSCP], ecgs: list[EcgPayload]
) -> None:
    scp = scripted_scp_factory(abort_after=3)  # aborts on the third store
    with StoreAssociation(peer_at(scp.port, scp.ae_title)) as assoc:
        assert assoc.store(ecgs[0].data).stored
        assert assoc.store(ecgs[1].data).stored
        # pynetdicom's reactor is paused since the first store: the DUL's own abort handling
        # wakes the wait for the response (a hang would end in the DIMSE timeout, also transient)
        with pytest.raises(TransientError, match="died during a C-STORE"):
            assoc.store(ecgs[2].data)
        assert not assoc.is_alive


class DescheduledReactor(threading.Event):
    """pynetdicom's reactor checkpoint, its thread descheduled for a while right after passing
    it (a loaded CPU): `_is_paused`, set before the checkpoint, still reads True while the
    reactor is about to take the next message off the queue."""

    def wait(self, timeout: float | None = None) -> bool:
        passing = self.is_set()
        passed = super().wait(timeout)
        if passing:
            time.sleep(0.02)
        return passed


class LateWaking(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE message queue, its blocking reader (the sender waiting for its response)
    woken late (a loaded CPU); a non-blocking one (the reactor) is not."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            time.sleep(0.06)
        return super().get(block, timeout)


def test_a_reactor_that_only_seems_paused_does_not_take_the_response(
    scripted_scp_factory: Callable[..., ScriptedStoreSCP], ecgs: list[EcgPayload], monkeypatch: pytest.MonkeyPatch
) -> None:
    scp = scripted_scp_factory()
    real = dicom_store.associate

    def on_a_loaded_cpu(*args: Any, **kwargs: Any) -> Association:
        raw = real(*args, **kwargs)
        checkpoint = DescheduledReactor()
        checkpoint.set()
        # (pynetdicom's attributes, read by the reactor at every turn of its loop)
        monkeypatch.setattr(raw, "_reactor_checkpoint", checkpoint)
        monkeypatch.setattr(raw.dimse, "msg_queue", LateWaking())
        return raw

    monkeypatch.setattr(dicom_store, "associate", on_a_loaded_cpu)
    for p in ecgs[:3]:
        # each association's first store pauses a running reactor (one that took the response:
        # no answer, TransientError after the DIMSE timeout)
        with StoreAssociation(peer_at(scp.port, scp.ae_title)) as assoc:
            assert assoc.store(p.data).stored
    assert len(scp.received) == 3


# -- the Part-10 file meta and SOP UIDs read by hand -------------------------------------------------
def part10(dataset: bytes, transfer_syntax: str = "1.2.840.10008.1.2.1", meta_extra: bytes = b"") -> bytes:
    """A Part-10 file: preamble, file meta (Explicit VR LE) and `dataset` as given."""
    ts = transfer_syntax.encode() + b"\0" * (len(transfer_syntax) % 2)
    meta = (
        explicit(0x00020001, b"OB", b"\0\1")
        + explicit(0x00020002, b"UI", ECG_CLASS.encode() + b"\0")
        + explicit(0x00020003, b"UI", b"1.2.3.4\0")
        + explicit(0x00020010, b"UI", ts)
        + meta_extra
    )
    return b"\0" * 128 + b"DICM" + explicit(0x00020000, b"UL", struct.pack("<I", len(meta))) + meta + dataset


def explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def ecg_head(
    instance: bytes = b"1.2.3.4.5\0", sop_class: bytes = ECG_CLASS.encode() + b"\0", before: bytes = b""
) -> bytes:
    return (
        explicit(0x00080005, b"CS", b"ISO_IR 192")
        + before
        + explicit(0x00080016, b"UI", sop_class)
        + explicit(0x00080018, b"UI", instance)
        + explicit(0x00100010, b"PN", b"DOE^JOHN")
        + explicit(0x54000100, b"SQ", b"")
    )


def deflated(dataset: bytes) -> bytes:
    out = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = out.compress(dataset) + out.flush()
    return body + b"\0" * (len(body) % 2)


def parsed(reader: Callable[[bytes], Part10], data: bytes) -> object:
    try:
        return reader(data)
    except UnsendablePayload as exc:
        return ("unsendable", str(exc))


DEFLATED_TS = "1.2.840.10008.1.2.1.99"
PART10_CASES: dict[str, tuple[bytes, bool]] = {  # name: (file, read by hand)
    "explicit": (part10(ecg_head()), True),
    "deflated": (part10(deflated(ecg_head()), DEFLATED_TS), True),
    "implicit: pydicom": (part10(b"", "1.2.840.10008.1.2"), False),
    "big endian: pydicom": (part10(ecg_head(), "1.2.840.10008.1.2.2"), False),
    "UIDs padded with spaces, odd length": (part10(ecg_head(b"1.2.3.4 ", ECG_CLASS.encode() + b" ")), True),
    "UID ending in a dot (carts write them)": (part10(ecg_head(b"1.2.3.")), True),
    "UID of 64 chars": (part10(ecg_head(b"1." + b"2" * 62)), True),
    "UID of 65 chars": (part10(ecg_head(b"1." + b"2" * 63 + b"\0")), False),
    "UID with a letter": (part10(ecg_head(b"1.2.a.4\0")), False),
    "UID not ASCII": (part10(ecg_head(b"1.2.\xff\0")), False),
    "empty UID": (part10(ecg_head(b"")), False),
    "no SOP Instance UID": (
        part10(explicit(0x00080016, b"UI", b"1.2\0") + explicit(0x00100010, b"PN", b"X^Y\0")),
        False,
    ),
    "undefined-length sequence first": (
        part10(ecg_head(before=struct.pack("<HH2sHI", 8, 6, b"SQ", 0, 0xFFFFFFFF) + b"\xfe\xff\xdd\xe0\0\0\0\0")),
        False,
    ),
    "unknown VR first": (part10(ecg_head(before=explicit(0x00080006, b"ZZ", b"ab"))), False),
    "long element first": (part10(ecg_head(before=explicit(0x00080010, b"UN", bytes(300)))), True),
    "data set out of order": (
        part10(explicit(0x00080018, b"UI", b"1.2\0") + explicit(0x00080016, b"UI", b"1.3\0")),
        False,
    ),
    "meta out of order": (part10(ecg_head(), meta_extra=explicit(0x00020002, b"UI", b"1.2\0")), False),
    "private meta element": (part10(ecg_head(), meta_extra=explicit(0x00020100, b"UI", b"1.2\0")), True),
    "deflated, UIDs beyond the first head": (
        part10(deflated(ecg_head(before=explicit(0x00080010, b"UN", bytes(3000)))), DEFLATED_TS),
        False,
    ),
    "deflated stream damaged": (part10(b"\xff" * 40, DEFLATED_TS), False),
    "no data set": (part10(b""), False),
    "character set pydicom cannot look up": (
        part10(explicit(0x00080005, b"CS", b"\0SO_IR 192") + ecg_head()[18:]),
        False,
    ),
    "unknown character set (pydicom warns)": (
        part10(explicit(0x00080005, b"CS", b"ISO_IR 999") + ecg_head()[18:]),
        True,
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the damaged bytes
@pytest.mark.parametrize("case", sorted(PART10_CASES))
def test_part10_read_by_hand_is_what_pydicom_reads(case: str) -> None:
    data, by_hand = PART10_CASES[case]
    assert parsed(parse_part10, data) == parsed(read_part10_with_pydicom, data)
    assert (read_part10_by_hand(data) is not None) == by_hand


def test_real_ecgs_are_read_by_hand(ecgs: list[EcgPayload]) -> None:
    for payload in ecgs:
        obj = read_part10_by_hand(payload.data)
        assert obj is not None and obj == read_part10_with_pydicom(payload.data)
        assert str(obj.sop_instance_uid) == payload.sop_instance_uid


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ["explicit", "deflated", "long element first"])
def test_every_cut_of_a_part10_file_reads_as_with_pydicom(case: str) -> None:
    data = PART10_CASES[case][0]
    for size in range(144, min(len(data), 700)):
        assert parsed(parse_part10, data[:size]) == parsed(read_part10_with_pydicom, data[:size]), size


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_part10_files_read_as_with_pydicom(data: st.DataObject) -> None:
    original = PART10_CASES[data.draw(st.sampled_from(["explicit", "deflated", "long element first"]))][0]
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(132, min(len(damaged), 500) - 1))
        damaged[at] = data.draw(st.integers(0, 255))
    assert parsed(parse_part10, bytes(damaged)) == parsed(read_part10_with_pydicom, bytes(damaged))
