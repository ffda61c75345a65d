"""Less CPU per study (issue 16, item 4): pynetdicom's DUL thread waits for traffic instead of
polling, its log-formatting handlers are unbound while their logger is off, the C-STORE-RQ
command set is encoded by hand (byte for byte what pynetdicom encodes), and a run of C-STOREs
keeps pynetdicom's association reactor paused. The CPU figures are bench/forward.py's; these
tests check the behaviour (counts and bytes, no clocks)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import build_context, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification

from tests.peers import EcgPayload, ScriptedStoreSCP, ecg_payloads
from uploader.dicom_association import PeerSettings, associate, release
from uploader.dicom_reactor import MAX_WAIT_S
from uploader.dicom_store import StoreAssociation, pdata_fragments, store_command_set
from uploader.errors import TransientError

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


def test_idle_dul_thread_waits_instead_of_polling_every_millisecond(echo_association: Any) -> None:
    counter = CountingTimer(echo_association.dul.artim_timer)
    echo_association.dul.artim_timer = counter
    idle_s = 0.5
    time.sleep(idle_s)
    # polling: one turn a millisecond (~500); waiting: one per MAX_WAIT_S, plus a few
    assert counter.turns <= idle_s / MAX_WAIT_S + 10, counter.turns
    # a request after the idle spell wakes it at once and is answered
    for _ in range(3):
        assert echo_association.send_c_echo().Status == 0x0000
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
@pytest.mark.parametrize("log_level", [logging.CRITICAL, logging.INFO], ids=["hand-encoded", "pynetdicom-message"])
def test_run_of_stores_then_commitment_on_the_same_association(
    scp: ScriptedStoreSCP, ecgs: list[EcgPayload], log_level: int
) -> None:
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(log_level)
    reports: list[Any] = []
    got = threading.Event()

    def on_report(report: Any) -> None:
        reports.append(report)
        got.set()

    try:
        with StoreAssociation(peer_at(scp.port, scp.ae_title), commitment=True, on_report=on_report) as assoc:
            outcomes = [assoc.store(p.data) for p in ecgs[:4]]
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
