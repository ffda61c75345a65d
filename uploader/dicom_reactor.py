"""Less CPU per association: pynetdicom's reactor threads made to wait instead of poll.

pynetdicom 3.0's DUL thread polls: every millisecond it sleeps, then asks `select()` (timeout 0)
whether its socket has data and whether anything waits to be sent. On the forward path that
loop, and pynetdicom's logging handlers that format every PDU and DIMSE message whatever the
log level, were a third of the CPU a study cost. `wait_for_traffic` makes the DUL thread block
in `select()` on its socket and a wake-up pipe (written when a PDU is queued to send or the
thread is told to stop) until either has something, with a short cap so pynetdicom's timers
are still looked at. `drop_log_formatting` unbinds the standard logging handlers while their
logger would discard what they format. `decode_store_responses` reads the usual C-STORE-RSP (a
few fixed Implicit VR LE elements of group 0000) by hand: decoding it with pydicom and turning
it into pynetdicom's primitive was a third of the DUL thread's CPU per store. Anything else
(another message, an ErrorComment, an odd length, a UID pydicom would warn about) goes through
pynetdicom's own decoding, as before. `writes_whole_messages` lets the DUL thread write a C-STORE-RQ's
P-DATA-TF PDUs, encoded by the sender (`EncodedMessage`), with one call: taking each of its ~9
PDUs through pynetdicom's queues, state machine, PDU objects and event triggers was half of the
DUL thread's CPU per store.

All reach into pynetdicom's internals (as `uploader.dicom_store`'s raw send does): each checks
that what it needs is there and otherwise leaves the association as pynetdicom made it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import select
import ssl
import struct
import time
import weakref
from collections.abc import Callable
from typing import Any

from pydicom import config
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.1  # pynetdicom's ARTIM timer is looked at least this often (its timeouts are seconds)
POLL_S = 0.001  # pynetdicom's own loop delay: while there is no connected socket to wait on
_DUL_INTERNALS = ("_is_transport_event", "send_pdu", "kill_dul", "_run_loop_delay", "_kill_thread")
_DUL_PARTS = ("to_provider_queue", "event_queue", "state_machine", "socket")
_LOG_EVENTS = (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT)
_CLOSING = "Sta13"  # waiting for the peer to close: pynetdicom closes the socket itself


def wait_for_traffic(assoc: Association) -> bool:
    """Make `assoc`'s DUL thread wait for its socket or for something to send instead of
    polling every millisecond. Safe to call from the DUL thread itself (EVT_CONN_OPEN) or
    before it starts. Returns False, changing nothing, where pynetdicom lacks what it needs."""
    dul: Any = getattr(assoc, "dul", None)
    if dul is None or not all(hasattr(dul, name) for name in _DUL_INTERNALS + _DUL_PARTS):
        return False
    if getattr(dul, "lastmile_waits", False):
        return True
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    # the pipe lives as long as the DUL object (the closures below are attributes of it)
    weakref.finalize(dul, _close_fds, read_fd, write_fd)
    is_transport_event: Callable[[], bool] = dul._is_transport_event
    send_pdu: Callable[[Any], None] = dul.send_pdu
    kill_dul: Callable[[], None] = dul.kill_dul

    def wake() -> None:
        try:
            os.write(write_fd, b"\0")
        except OSError:  # full: a wake-up is pending already
            pass

    def send_and_wake(primitive: Any) -> None:
        send_pdu(primitive)
        wake()

    def kill_and_wake() -> None:
        kill_dul()
        wake()

    def wait_then_check() -> bool:
        # called by the DUL loop when it had nothing to send; on return it reads the socket
        if not (dul._kill_thread or dul.to_provider_queue.qsize() or dul.event_queue.qsize()):
            sock = dul.socket
            raw = getattr(sock, "socket", None)
            if raw is None or not getattr(sock, "_is_connected", False) or dul.state_machine.current_state == _CLOSING:
                time.sleep(POLL_S)  # nothing to wait on: pynetdicom's own pace
            elif not (isinstance(raw, ssl.SSLSocket) and raw.pending()):
                try:
                    select.select([raw, read_fd], [], [], MAX_WAIT_S)
                except (OSError, ValueError):  # closed meanwhile: pynetdicom's own check says so
                    pass
                _drain(read_fd)
        return is_transport_event()

    dul._is_transport_event = wait_then_check
    dul.send_pdu = send_and_wake
    dul.kill_dul = kill_and_wake
    # the loop's own sleep only delayed what the wait above now wakes for at once
    dul._run_loop_delay = 0.0
    dul.lastmile_waits = True
    return True


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except OSError:  # empty (EAGAIN), or closed
        pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def drop_log_formatting(assoc: Association, *, any_level: bool = False) -> int:
    """Unbind pynetdicom's standard logging handlers (they format every PDU and DIMSE message
    before the logger discards it) while the `pynetdicom` logger would drop their INFO lines,
    or (`any_level`) whatever it would do with them: a store association's data phase, whose
    sender must not change with the log level (bound, they keep it on pynetdicom's PDU path).
    Returns how many were unbound."""
    if not any_level and logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return 0
    dropped = 0
    for event in _LOG_EVENTS:
        for handler, _args in list(assoc.get_handlers(event)):  # type: ignore[misc]
            if getattr(handler, "__module__", "") == "pynetdicom._handlers":
                assoc.unbind(event, handler)
                dropped += 1
    return dropped


# -- C-STORE responses decoded by hand --------------------------------------------------------------
C_STORE_RSP_COMMAND = 0x8001  # Command Field (PS3.7 9.3.1.2)
NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows
LAST_COMMAND_FRAGMENT = 0x03  # PDV message control header: command, last fragment (PS3.8 E.2)
_GROUP_LENGTH, _COMMAND_FIELD, _DATA_SET_TYPE, _SOP_CLASS = 0x00000000, 0x00000100, 0x00000800, 0x00000002
# The elements of a C-STORE-RSP read here, with their VR; any other element (ErrorComment,
# OffendingElement, ...) leaves the response to pynetdicom's decoding.
_STORE_RSP_VRS = {
    _GROUP_LENGTH: "UL",
    0x00000002: "UI",  # Affected SOP Class UID
    _COMMAND_FIELD: "US",
    0x00000120: "US",  # Message ID Being Responded To
    _DATA_SET_TYPE: "US",
    0x00000900: "US",  # Status
    0x00001000: "UI",  # Affected SOP Instance UID
}
_PRIMITIVE_ATTRIBUTES = {
    0x00000002: "AffectedSOPClassUID",
    0x00000120: "MessageIDBeingRespondedTo",
    0x00000900: "Status",
    0x00001000: "AffectedSOPInstanceUID",
}
# Where pynetdicom 3.0's setters of those keep the value. Their checks (three regular expressions
# per UID, through pydicom and pynetdicom) were most of the CPU a response's decoding cost; the
# values read here passed the strictest of them already, so they are stored as the setters would
# store them. Any attribute missing (another pynetdicom): the setters are used.
_PRIMITIVE_SLOTS = {
    "AffectedSOPClassUID": "_affected_sop_class_uid",
    "MessageIDBeingRespondedTo": "_message_id_being_responded_to",
    "Status": "_status",
    "AffectedSOPInstanceUID": "_affected_sop_instance_uid",
}
_SLOTS_PRESENT = all(hasattr(C_STORE(), slot) for slot in _PRIMITIVE_SLOTS.values())
_REQUIRED = frozenset({_COMMAND_FIELD, _DATA_SET_TYPE, 0x00000120, 0x00000900})
# A conformant UID (PS3.5 9.1), as pydicom checks it: pynetdicom logs about any other, so those
# are left to it.
_CONFORMANT_UID = re.compile(rb"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_MAX_UID_CHARS = 64
_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")


def store_response(command: bytes) -> C_STORE | None:
    """The C-STORE primitive pynetdicom 3.0 would decode from `command` (a whole command set,
    Implicit VR LE), or None where the bytes are not a plain C-STORE-RSP: then pynetdicom's own
    decoding must read them. Bounds-checked: never reads past `command`."""
    values: dict[int, int | str] = {}
    offset, end, previous = 0, len(command), -1
    while offset < end:
        if end - offset < _ELEMENT_HEADER.size:
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(command, offset)
        tag = group << 16 | element
        offset += _ELEMENT_HEADER.size
        vr = _STORE_RSP_VRS.get(tag)
        if vr is None or tag <= previous or length > end - offset:
            return None  # another element, out of order or repeated, or cut short
        previous = tag
        value = command[offset : offset + length]
        offset += length
        if vr == "US":
            if length != _US.size:
                return None
            values[tag] = _US.unpack(value)[0]
        elif vr == "UI":
            text = bytes(value).rstrip(b"\0 ")  # as pydicom reads a UI value
            if len(text) > _MAX_UID_CHARS or not _CONFORMANT_UID.fullmatch(text):
                return None
            values[tag] = _checked_uid(text) if tag == _SOP_CLASS else UID(text.decode("ascii"), config.IGNORE)
        elif length != 4:  # the group length (UL): pynetdicom does not check its value either
            return None
    if not values.keys() >= _REQUIRED:
        return None
    if values[_COMMAND_FIELD] != C_STORE_RSP_COMMAND or values[_DATA_SET_TYPE] != NO_DATA_SET:
        return None
    primitive = C_STORE()
    for tag, name in _PRIMITIVE_ATTRIBUTES.items():  # in tag order, as pynetdicom sets them
        if tag in values:
            setattr(primitive, _PRIMITIVE_SLOTS[name] if _SLOTS_PRESENT else name, values[tag])
    return primitive


@functools.lru_cache(maxsize=16)  # the SOP class repeats in every response
def _checked_uid(text: bytes) -> UID:
    """A UID from digits and dots already checked to be conformant: pydicom's checks skipped."""
    return UID(text.decode("ascii"), config.IGNORE)


def decode_store_responses(assoc: Association) -> bool:
    """Decode the C-STORE responses `assoc` receives by hand where they have the usual form
    (`store_response`); everything else still goes through pynetdicom's DIMSE decoding.
    Returns False, changing nothing, where pynetdicom lacks what it needs."""
    dimse: Any = getattr(assoc, "dimse", None)
    if dimse is None or not all(hasattr(dimse, name) for name in ("receive_primitive", "message", "msg_queue")):
        return False
    if getattr(dimse, "lastmile_decodes", None) is not None:
        return True
    receive: Callable[[Any], None] = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        # the DUL thread's call for each P-DATA received (pynetdicom 3.0's DT-2)
        if dimse.message is None and type(primitive) is P_DATA and not assoc.get_handlers(evt.EVT_DIMSE_RECV):
            pdvs = primitive.presentation_data_value_list
            if len(pdvs) == 1 and pdvs[0][1][:1] == bytes((LAST_COMMAND_FRAGMENT,)):
                context_id, data = pdvs[0]
                response = store_response(data[1:])
                if response is not None:
                    # as pynetdicom's message_to_primitive leaves it
                    response._context_id = context_id
                    response._dataset_path = response._dataset_file = None
                    dimse.lastmile_decodes += 1
                    dimse.msg_queue.put((context_id, response))
                    return
        receive(primitive)

    dimse.receive_primitive = receive_primitive
    dimse.lastmile_decodes = 0  # how many responses were decoded here (tests look)
    return True


# -- a DIMSE message's P-DATA-TF PDUs written in one go ---------------------------------------------
P_DATA_TF_TYPE = 0x04
# PDU type, reserved, PDU length, then the one PDV item's length, context ID and message control
# header (PS3.8 9.3.5, E.2): what precedes each fragment
PDU_AND_PDV_HEADER = struct.Struct(">BBIIBB")
# pynetdicom 3.0's actions that send a P-DATA-TF on Evt9 (a P-DATA request), by the state they leave
_P_DATA_ACTIONS = {"Sta6": "DT-1", "Sta8": "AR-7"}


class EncodedMessage(P_DATA):
    """The P-DATA-TF PDUs of one DIMSE message, encoded by the sender, for a DUL that
    `writes_whole_messages`: its thread writes them with one call instead of taking each PDU
    through pynetdicom's queues, state machine, PDU objects and event triggers (a fifth of a
    store's CPU). `pdus` holds them back to back, each ending at the next offset in `ends`.
    `on_sent(pdus)` is called once they are written, in place of EVT_DATA_SENT (the sender
    checks nobody else listens): with `each_pdu` once per PDU, each written only after the
    callback for the one before returned (a paced link), else once with all of them.
    To pynetdicom it is a P-DATA with no PDVs: never hand one to a DUL not set up for it."""

    def __init__(
        self,
        pdus: bytes,
        ends: list[int],
        on_sent: Callable[[memoryview], None] | None = None,
        *,
        each_pdu: bool = False,
    ) -> None:
        super().__init__()
        self.pdus = pdus
        self.ends = ends
        self.on_sent = on_sent
        self.each_pdu = each_pdu


def writes_whole_messages(assoc: Association) -> bool:
    """Make `assoc`'s DUL thread write an `EncodedMessage` whole where pynetdicom would send a
    P-DATA-TF (state Sta6 or Sta8); anything else still goes through its state machine.
    Returns False, changing nothing, where pynetdicom lacks what it needs."""
    dul: Any = getattr(assoc, "dul", None)
    machine: Any = getattr(dul, "state_machine", None)
    needed = ("to_provider_queue", "event_queue", "socket", "assoc")
    if machine is None or not all(hasattr(dul, name) for name in needed):
        return False
    if not all(hasattr(machine, name) for name in ("do_action", "transition", "current_state")):
        return False
    if getattr(dul, "lastmile_whole_messages", None) is not None:
        return True
    do_action: Callable[[str], None] = machine.do_action

    def do_action_whole(event: str) -> None:
        state = machine.current_state
        if event == "Evt9" and state in _P_DATA_ACTIONS:
            try:
                head = dul.to_provider_queue.queue[0]
            except IndexError:
                head = None
            if type(head) is EncodedMessage:
                dul.to_provider_queue.get(False)
                _write_message(dul, head)
                dul.lastmile_whole_messages += 1
                # what do_action tells its listeners (none, on our associations); the state stays
                transition = {"action": _P_DATA_ACTIONS[state], "current_state": state, "fsm_event": event}
                evt.trigger(dul.assoc, evt.EVT_FSM_TRANSITION, {**transition, "next_state": state})
                machine.transition(state)
                return
        do_action(event)

    machine.do_action = do_action_whole
    dul.lastmile_whole_messages = 0  # how many were written whole (tests look)
    return True


def _write_message(dul: Any, message: EncodedMessage) -> None:
    """As pynetdicom's DUL `_send` and AssociationSocket.send do for each PDU: a failed write is
    the transport closing (Evt17), and nothing more of the message is written."""
    sock = dul.socket
    if sock is None:
        log.warning("Attempted to send data over closed connection")
        return
    view = memoryview(message.pdus)
    try:
        raw = sock.socket
        if message.each_pdu and message.on_sent is not None:
            for start, end in zip([0, *message.ends[:-1]], message.ends, strict=True):
                raw.sendall(view[start:end])
                _after_sent(message.on_sent, view[start:end])
            return
        raw.sendall(view)
    except Exception:  # noqa: BLE001 — as pynetdicom: any failure to write is the connection closing
        dul.event_queue.put("Evt17")
        return
    if message.on_sent is not None:
        _after_sent(message.on_sent, view)


def _after_sent(on_sent: Callable[[memoryview], None], pdu: memoryview) -> None:
    try:
        on_sent(pdu)
    except Exception:
        log.exception("the handler for a written PDU failed")
