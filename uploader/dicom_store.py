"""C-STOREs (and the storage-commitment N-ACTION after them) on one association.

Payloads are stored as Part-10 files. For each SOP class we propose one presentation context per
transfer syntax (Deflated Explicit VR LE first, then Explicit VR LE, then Implicit VR LE) so the
peer can pick; each object is sent in the best one it accepted. Per object,
`StoreOutcome.category` says stored / retry / never (see uploader.dicom_status).

Objects are not thread-safe; use one `StoreAssociation` per thread (each has its own AE).
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import TracebackType

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.dsutils import decode
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from uploader.dicom_association import (
    COMMITMENT_SYNTAXES,
    ECG_STORAGE_CLASSES,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    STORE_SYNTAXES_DEFLATE,
    STORE_SYNTAXES_PLAIN,
    PeerSettings,
    associate,
    release,
)
from uploader.dicom_commitment import CommitmentReport, report_handler
from uploader.dicom_part10 import Part10, UnsendablePayload, decode_dataset, encode_for, parse_part10
from uploader.dicom_reactor import (
    P_DATA_TF_TYPE,
    PDU_AND_PDV_HEADER,
    EncodedMessage,
    decode_store_responses,
    drop_log_formatting,
    writes_whole_messages,
)
from uploader.dicom_status import (
    SOP_CLASS_NOT_SUPPORTED,
    STORED_CATEGORIES,
    Category,
    classify_status,
    is_refusal_of_us,
    status_meaning,
)
from uploader.errors import ConfigurationFault, PermanentError, TransientError
from uploader.link_pacing import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, LinkPacer
from uploader.masking import mask_server_text

log = logging.getLogger(__name__)

COMMITMENT_REQUEST = 1  # N-ACTION Action Type ID
MAX_CONTEXTS = 127  # odd context IDs 1..255
# N-ACTION statuses that mean "this peer does not do storage commitment"
NO_COMMITMENT_STATUSES = frozenset({0x0118, 0x0122, 0x0123, 0x0211})
C_STORE_RQ_COMMAND = 0x0001  # Command Field (PS3.7 E.1)
DATA_SET_PRESENT = 0x0001  # Command Data Set Type: anything but 0x0101 (what pynetdicom 3.0 writes)


class CommitmentUnsupported(PermanentError):
    """The peer accepted no Storage Commitment Push Model context (or says it has none):
    the forwarder applies its no-commitment policy."""


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    category: Category
    meaning: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str  # the one it travelled in
    wire_bytes: int = 0  # size of the data set as sent (after deflating)

    @property
    def stored(self) -> bool:
        return self.category in STORED_CATEGORIES


def store_contexts(sop_class_uids: Sequence[str], *, deflate: bool, commitment: bool) -> list[PresentationContext]:
    syntaxes = STORE_SYNTAXES_DEFLATE if deflate else STORE_SYNTAXES_PLAIN
    # one context per transfer syntax: the peer accepts each it can read, we pick the best
    contexts = [build_context(uid, [ts]) for uid in sop_class_uids for ts in syntaxes]
    if commitment:
        contexts.append(build_context(STORAGE_COMMITMENT_PUSH, COMMITMENT_SYNTAXES))
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts; an association allows {MAX_CONTEXTS}")
    return contexts


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def store_command_set(message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int = 2) -> bytes:
    """A C-STORE-RQ's command set (PS3.7 9.3.1.1) in Implicit VR Little Endian, byte for byte as
    pynetdicom 3.0 encodes it; built with pydicom it was the largest share of a store's CPU."""
    body = b"".join(
        (
            _element(0x00000002, _uid_value(sop_class_uid)),  # Affected SOP Class UID
            _element(0x00000100, struct.pack("<H", C_STORE_RQ_COMMAND)),  # Command Field
            _element(0x00000110, struct.pack("<H", message_id)),  # Message ID
            _element(0x00000700, struct.pack("<H", priority)),  # Priority
            _element(0x00000800, struct.pack("<H", DATA_SET_PRESENT)),  # Command Data Set Type
            _element(0x00001000, _uid_value(sop_instance_uid)),  # Affected SOP Instance UID
        )
    )
    return _element(0x00000000, struct.pack("<I", len(body))) + body  # Command Group Length


def commitment_request(transaction_uid: str, refs: Sequence[tuple[str, str]]) -> Dataset:
    """The Storage Commitment request's Action Information (PS3.4 J.3.2)."""
    request = Dataset()
    request.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    request.ReferencedSOPSequence = items
    return request


_PLAIN_UID = re.compile(r"[0-9.]{1,64}\Z")
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000), Little Endian


def commitment_request_bytes(transaction_uid: str, refs: Sequence[tuple[str, str]], *, implicit: bool) -> bytes | None:
    """`commitment_request` encoded in Implicit or Explicit VR Little Endian byte for byte as
    pydicom 3.0 encodes it (defined lengths), or None for a UID pydicom might encode otherwise
    (anything but 1-64 digits and dots): then pydicom encodes it."""
    uids = [transaction_uid, *(uid for ref in refs for uid in ref)]
    if not all(_PLAIN_UID.match(uid) for uid in uids):
        return None

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        if implicit:
            return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
        if vr == b"SQ":
            return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value

    items = b"".join(
        _ITEM_TAG + struct.pack("<I", len(item)) + item
        for item in (
            element(0x00081150, b"UI", _uid_value(sop_class)) + element(0x00081155, b"UI", _uid_value(sop_instance))
            for sop_class, sop_instance in refs
        )
    )
    return element(0x00081195, b"UI", _uid_value(transaction_uid)) + element(0x00081199, b"SQ", items)


def pdata_fragments(context_id: int, command: bytes, dataset: bytes, max_pdu_length: int) -> Iterator[P_DATA]:
    """The P-DATA primitives of one DIMSE message, as pynetdicom 3.0's `encode_msg` cuts them: the
    command set, then the data set, each in PDVs of at most `max_pdu_length - 6` bytes (0: whole),
    the first byte of each saying command/data and last/not last (PS3.8 E.2)."""
    for header, fragment in _message_fragments(command, dataset, max_pdu_length):
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, bytes((header,)) + fragment))
        yield pdata


def pdata_pdus(context_id: int, command: bytes, dataset: bytes, max_pdu_length: int) -> tuple[bytes, list[int]]:
    """The P-DATA-TF PDUs of `pdata_fragments`' primitives, each encoded byte for byte as pynetdicom
    3.0 encodes it, back to back (one copy of the data set), and the offset where each ends."""
    parts: list[bytes | memoryview] = []
    ends: list[int] = []
    total = 0
    for header, fragment in _message_fragments(command, dataset, max_pdu_length):
        size = len(fragment)
        parts += (PDU_AND_PDV_HEADER.pack(P_DATA_TF_TYPE, 0, size + 6, size + 2, context_id, header), fragment)
        total += PDU_AND_PDV_HEADER.size + size
        ends.append(total)
    return b"".join(parts), ends


def _message_fragments(command: bytes, dataset: bytes, max_pdu_length: int) -> Iterator[tuple[int, memoryview]]:
    """Each PDV's message control header and fragment: the command set's, then the data set's."""
    parts = [(_fragments(command, max_pdu_length), 0x01, 0x03)]
    if dataset:
        parts.append((_fragments(dataset, max_pdu_length), 0x00, 0x02))
    for fragments, more, last in parts:
        for i, fragment in enumerate(fragments):
            yield (last if i == len(fragments) - 1 else more), fragment


def _fragments(data: bytes, max_pdu_length: int) -> list[memoryview]:
    view = memoryview(data)
    if max_pdu_length == 0:
        return [view]
    size = max_pdu_length - 6  # the PDV item's own length and context ID
    return [view[i : i + size] for i in range(0, len(data), size)]


def raw_send_available(assoc: Association) -> bool:
    """Whether pynetdicom still has the internals the raw send path mirrors (3.0)."""
    return all(
        hasattr(assoc, name)
        for name in (
            "_reactor_checkpoint",
            "_is_paused",
            "_handle_no_response",
            "_check_received_status",
            "_get_valid_context",
        )
    )


def reactor_stopped(assoc: Association) -> bool:
    """Whether pynetdicom's reactor thread is stopped at its cleared checkpoint (or no longer
    runs), so that it cannot take a response off the queue before the request's sender does.
    Its `_is_paused` alone (what pynetdicom's own send methods wait for) is no proof: the
    reactor sets it before every checkpoint, also one it then passes at once, and clears it
    only after. Descheduled there (a loaded CPU), it reads as paused while it is about to take
    the next message: seen under stress-ng, a storage commitment request's N-ACTION-RSP taken
    by it - "no answer" - though the PACS had answered and sent its report."""
    if not assoc.is_alive():
        return True  # released or aborted: no reactor left to race with
    if not assoc._is_paused:
        return False
    # blocked in the checkpoint's wait(): a waiter on its condition (CPython's Event; without
    # that internal, the flag as pynetdicom reads it)
    waiters = getattr(getattr(assoc._reactor_checkpoint, "_cond", None), "_waiters", None)
    return waiters is None or len(waiters) > 0


# Patient Module attributes whose values a peer's ErrorComment might repeat.
_PATIENT_TAGS = (0x00100010, 0x00100020, 0x00100030, 0x00101000, 0x00101001)
_PATIENT_PEEK_BYTES = 64 * 1024  # group 0010 comes long before the waveform


def patient_values(obj: Part10) -> list[str]:
    """The object's patient names, ids and birth date (to mask them in what the peer says
    about it). Reads at most the first 64 KiB of the data set, inflated if deflated."""
    raw = obj.dataset_bytes()
    ts = obj.transfer_syntax
    try:
        if ts.is_deflated:
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, _PATIENT_PEEK_BYTES)
        ds = read_dataset(
            BytesIO(raw[:_PATIENT_PEEK_BYTES]),
            ts.is_implicit_VR,
            ts.is_little_endian,
            stop_when=lambda tag, vr, length: tag > _PATIENT_TAGS[-1],
        )
        values: list[str] = []
        for tag in _PATIENT_TAGS:
            elem = ds.get(tag)
            if elem is None or elem.value in (None, ""):
                continue
            items = elem.value if elem.VM > 1 else [elem.value]
            for item in items:
                text = str(item)
                values += [text, text.replace("^", " ").strip(), text.replace("^", "")]
                values += [group for group in text.split("=") if group]
        return values
    except Exception:  # noqa: BLE001 — damaged bytes: the patterns still mask what they can
        return []


def _status_and_comment(status: Dataset) -> tuple[int, object] | None:
    """Status and ErrorComment of pynetdicom's status data set (None if it has no Status: no
    valid response came, the association is aborted)."""
    if "Status" not in status:
        return None
    return int(status.Status), status.get("ErrorComment")


class StoreAssociation:
    """One association for many C-STOREs (and, with commitment=True, the N-ACTION after them).

    `with StoreAssociation(peer) as a: a.store(bytes)`; opening raises TransientError or
    ConfigurationFault. `on_report` receives an N-EVENT-REPORT if the peer sends it on this
    association (most send it on a new one, to the CommitmentListener).
    `raw_send=False` takes pynetdicom's public path (decode, let it encode) instead of sending the
    stored bytes as they are: what we fall back to if its internals change, kept testable.
    """

    def __init__(
        self,
        peer: PeerSettings,
        sop_class_uids: Sequence[str] = ECG_STORAGE_CLASSES,
        *,
        commitment: bool = False,
        on_report: Callable[[CommitmentReport], None] | None = None,
        raw_send: bool = True,
        pacer: LinkPacer | None = None,
        paced: bool = True,
    ) -> None:
        self.peer = peer
        # the destination's pacer: paced, this association's bytes wait for it; unpaced (a STAT
        # object's), they are only counted in its schedule
        self.pacer = pacer
        self.paced = pacer is not None and paced
        self.opened_in_s = 0.0  # the association negotiation's time, the whole of it
        self.negotiated_in_s: float | None = None  # ... on the wire: A-ASSOCIATE-RQ written to -AC read
        self._request_sent_at: float | None = None  # (the pacer's clock)
        self.last_sent_at = 0.0  # when the last PDU was handed to the socket (the pacer's clock)
        self.last_sent_bytes = 0  # ... and its size (a run of PDUs written at once: theirs)
        # every byte written on this association (with a pacer: the forwarder's metered links
        # count what a C-STORE cut short or left unanswered put on the wire)
        self.bytes_written = 0
        self.raw_send = raw_send
        self.sop_class_uids = tuple(sop_class_uids)
        self.commitment = commitment
        self._on_report = on_report
        self._assoc: Association | None = None
        self._message_id = 0
        self._preference = STORE_SYNTAXES_DEFLATE if peer.deflate else STORE_SYNTAXES_PLAIN
        self._contexts_by_class: dict[str, list[PresentationContext]] = {}
        self._broken = False  # a request went unanswered: never use (or politely release) it again
        self._reactor_held = False  # pynetdicom's association reactor paused by us (raw sends)
        self.stores = 0

    # -- lifecycle --
    def open(self) -> None:
        if self._assoc is not None:
            raise RuntimeError("association already opened")
        self._broken = False
        self._reactor_held = False
        self._contexts_by_class = {}
        contexts = store_contexts(self.sop_class_uids, deflate=self.peer.deflate, commitment=self.commitment)
        handlers: list[EventHandlerType] = []
        if self._on_report is not None:
            handlers.append((evt.EVT_N_EVENT_REPORT, report_handler(self._on_report)))
        if self.pacer is not None:
            handlers.append((evt.EVT_DATA_SENT, self._pace))
            handlers.append((evt.EVT_DATA_RECV, self._note_accept))
        self._request_sent_at = self.negotiated_in_s = None
        started = time.monotonic()
        self._assoc = associate(self.peer, contexts, handlers)
        self.opened_in_s = time.monotonic() - started
        if self.pacer is not None:
            self._assoc.unbind(evt.EVT_DATA_RECV, self._note_accept)  # the one PDU it was for has come
        # pynetdicom logged the negotiation (at its level); from here its handlers would switch
        # the sender to its PDU path (other timing on a slow link) whenever pynetdicom logs at
        # INFO: one path at every level, and each C-STORE logged here (`store`)
        drop_log_formatting(self._assoc, any_level=True)
        decode_store_responses(self._assoc)  # the usual C-STORE-RSP read without pydicom
        writes_whole_messages(self._assoc)  # a C-STORE-RQ's PDUs written in one go
        if self.pacer is not None:
            # the round trip on the wire, not the whole negotiation: on a slow or busy CPU
            # (a Pi) pynetdicom's own work doubled it (138 ms on a 60 ms link at a quarter of a
            # core), every early sample of the link's rate came out twice too high, and the
            # pace filled the modem's buffer a STAT study then waited behind
            self.pacer.observe_rtt(self.negotiated_in_s or self.opened_in_s)
        rank = {ts: i for i, ts in enumerate(self._preference)}
        for cx in self._assoc.accepted_contexts:
            ts = UID(cx.transfer_syntax[0])
            if cx.abstract_syntax in self.sop_class_uids and cx.as_scu and ts in rank:
                self._contexts_by_class.setdefault(str(cx.abstract_syntax), []).append(cx)
        for found in self._contexts_by_class.values():
            found.sort(key=lambda cx: rank[UID(cx.transfer_syntax[0])])
        if self.sop_class_uids and not self._contexts_by_class:
            # e.g. only commitment accepted: every object would bounce; that is the PACS's
            # configuration, not the objects' fault
            self.close()
            names = ", ".join(sorted(UID(u).name for u in self.sop_class_uids))
            raise ConfigurationFault(
                f"{self.peer.where} accepts none of the storage SOP classes {self.peer.calling_ae} sends ({names})"
            )
        log.debug(
            "association with %s: %s",
            self.peer.where,
            {UID(k).name: [UID(c.transfer_syntax[0]).name for c in v] for k, v in self._contexts_by_class.items()},
        )

    def _pace(self, event: evt.Event) -> None:
        self._after_sent(getattr(event, "data", b"") or b"")

    def _note_accept(self, event: evt.Event) -> None:
        """EVT_DATA_RECV while negotiating (the DUL thread): the A-ASSOCIATE-AC read, before it is
        decoded - the negotiation's round trip without our CPU's part (pynetdicom starting its
        threads, encoding the request, decoding and checking the answer)."""
        data = getattr(event, "data", b"") or b""
        if data and data[0] == A_ASSOCIATE_AC and self._request_sent_at is not None and self.pacer is not None:
            self.negotiated_in_s = max(0.0, self.pacer.clock() - self._request_sent_at)

    def _after_sent(self, pdu: bytes | memoryview) -> None:
        """After each PDU (or run of PDUs) written (the DUL thread): paced, and its time noted."""
        if self.pacer is not None:
            if self.paced:
                self.pacer.on_pdu_sent(pdu)
            else:
                self.pacer.on_unpaced_sent(pdu)
        self.last_sent_at = self.pacer.clock() if self.pacer is not None else time.monotonic()
        if self._request_sent_at is None and pdu and pdu[0] == A_ASSOCIATE_RQ:  # once per association
            self._request_sent_at = self.last_sent_at
        self.last_sent_bytes = len(pdu)
        self.bytes_written += len(pdu)

    def _writes_whole(self, assoc: Association) -> bool:
        """Whether a message's PDUs may go as one `EncodedMessage`: its DUL is set up for it and
        nobody but our pacing listens to the PDUs it would skip the events of."""
        if getattr(assoc.dul, "lastmile_whole_messages", None) is None:
            return False
        if assoc.get_handlers(evt.EVT_PDU_SENT):
            return False
        return all(handler == self._pace for handler, _args in assoc.get_handlers(evt.EVT_DATA_SENT))  # type: ignore[misc]

    def close(self) -> None:
        self._resume_reactor()
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        if self._broken:
            if assoc.is_established:
                assoc.abort()
            return
        release(assoc)

    def abort(self) -> None:
        self._resume_reactor()
        assoc, self._assoc = self._assoc, None
        if assoc is not None and assoc.is_established:
            assoc.abort()

    def cut(self) -> None:
        """Drop the connection now, from another thread: a C-STORE on the wire ends with
        TransientError and the peer discards the partial object. (An A-ABORT would queue behind
        the object's remaining PDUs and go out only after them.)"""
        self._broken = True
        raw = getattr(getattr(getattr(self._assoc, "dul", None), "socket", None), "socket", None)
        if raw is not None:
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed: nothing left to cut
                pass

    def __enter__(self) -> StoreAssociation:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def is_alive(self) -> bool:
        a = self._assoc
        return a is not None and not self._broken and a.is_established and not a.is_aborted and not a.is_released

    @property
    def tcp_nodelay(self) -> bool:
        """Whether Nagle is off on this association's TCP socket (it stalled every C-STORE)."""
        raw = getattr(getattr(getattr(self._assoc, "dul", None), "socket", None), "socket", None)
        return bool(raw is not None and raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @property
    def responses_decoded_by_hand(self) -> int:
        """C-STORE responses on this association read without pydicom (uploader.dicom_reactor)."""
        return int(getattr(getattr(self._assoc, "dimse", None), "lastmile_decodes", 0))

    @property
    def messages_written_whole(self) -> int:
        """C-STORE-RQs on this association written as one `EncodedMessage` (uploader.dicom_reactor)."""
        return int(getattr(getattr(self._assoc, "dul", None), "lastmile_whole_messages", 0) or 0)

    @property
    def accepted_transfer_syntaxes(self) -> dict[str, list[str]]:
        """SOP class UID -> accepted transfer syntaxes, best first."""
        return {k: [str(c.transfer_syntax[0]) for c in v] for k, v in self._contexts_by_class.items()}

    def _require_alive(self) -> Association:
        if not self.is_alive:
            raise TransientError(f"the association with {self.peer.where} is no longer open")
        assert self._assoc is not None
        return self._assoc

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    # -- C-STORE --
    def store(self, payload: bytes | Path) -> StoreOutcome:
        """Send one Part-10 object. Returns the peer's verdict; raises TransientError if the
        association died (nothing is known about this object), ConfigurationFault if the peer
        says the gateway is not authorised, UnsendablePayload for bytes that are not DICOM."""
        assoc = self._require_alive()
        if isinstance(payload, Path):
            try:
                data = payload.read_bytes()
            except OSError as exc:
                raise UnsendablePayload(f"cannot read payload {payload}: {exc}") from None
        else:
            data = payload
        obj = parse_part10(data)
        candidates = self._contexts_by_class.get(str(obj.sop_class_uid), [])
        if not candidates:
            why = (
                "the peer accepted no presentation context for it"
                if obj.sop_class_uid in self.sop_class_uids
                else "it was not proposed"
            )
            return StoreOutcome(
                SOP_CLASS_NOT_SUPPORTED,
                Category.PERMANENT,
                f"{status_meaning(SOP_CLASS_NOT_SUPPORTED)}: {obj.sop_class_uid.name} ({why})",
                str(obj.sop_instance_uid),
                str(obj.sop_class_uid),
                "",
            )
        cx = candidates[0]
        syntax = UID(cx.transfer_syntax[0])
        data = encode_for(obj, syntax, self.peer.deflate_level)
        answer = self._send_store(assoc, cx, obj, data)
        if answer is None:
            self._broken = True
            raise TransientError(
                f"the association with {self.peer.where} died during a C-STORE (aborted, reset or timed out)"
            )
        code, comment = answer
        category, meaning = classify_status(code)
        log.debug(
            "C-STORE %s (%d bytes, %s) to %s: 0x%04X %s",
            obj.sop_instance_uid,
            len(data),
            syntax.name,
            self.peer.where,
            code,
            meaning,
        )
        if is_refusal_of_us(code):
            raise ConfigurationFault(
                f"{self.peer.where} refuses C-STOREs from {self.peer.calling_ae}: 0x{code:04X} {meaning}"
            )
        if comment:
            # the peer's free text may name the patient: it goes into logs and stored reasons
            meaning = f"{meaning} ({mask_server_text(str(comment), patient_values(obj))})"
        self.stores += 1
        return StoreOutcome(
            code, category, meaning, str(obj.sop_instance_uid), str(obj.sop_class_uid), str(syntax), len(data)
        )

    def _send_store(
        self, assoc: Association, cx: PresentationContext, obj: Part10, data: bytes
    ) -> tuple[int, object] | None:
        """The peer's Status and ErrorComment (None: no comment), or None if no valid response came."""
        if not (self.raw_send and raw_send_available(assoc)):
            return _status_and_comment(self._send_store_decoded(assoc, cx, obj))
        message_id = self._next_message_id()
        # Mirrors Association.send_c_store() after its encoding step (pynetdicom 3.0): pause the
        # reactor so it does not take our response off the queue, send, wait. It stays paused
        # until something else needs it (`_resume_reactor`): resuming it between objects cost a
        # thread waking every millisecond, and each new pause raced with its waking up.
        self._hold_reactor(assoc)
        if self.paced and self.pacer is not None:
            self.pacer.start_window()
        try:
            limit = assoc.dimse.maximum_pdu_size
            pdu_bytes = self.pacer.pdu_bytes() if self.paced and self.pacer is not None else None
            if pdu_bytes is not None:
                limit = min(limit, pdu_bytes) if limit else pdu_bytes
            # (pynetdicom's message logging is unbound at `open`: no EVT_DIMSE_SENT handler wants
            # a message object)
            command = store_command_set(message_id, str(obj.sop_class_uid), str(obj.sop_instance_uid))
            if self._writes_whole(assoc):
                pdus, ends = pdata_pdus(int(cx.context_id), command, data, limit)  # type: ignore[arg-type]
                on_sent = self._after_sent if self.pacer is not None else None
                assoc.dul.send_pdu(EncodedMessage(pdus, ends, on_sent, each_pdu=pdu_bytes is not None))
            else:
                for pdata in pdata_fragments(int(cx.context_id), command, data, limit):  # type: ignore[arg-type]
                    assoc.dul.send_pdu(pdata)
            _cx_id, rsp = assoc.dimse.get_msg(block=True)
        except BaseException:
            self._resume_reactor()
            raise
        if rsp is None:
            self._resume_reactor()
            assoc._handle_no_response()
            return None
        if rsp.is_valid_response and not any(getattr(rsp, k, None) is not None for k in rsp.STATUS_OPTIONAL_KEYWORDS):
            # what _check_received_status would say, without building a pydicom Dataset for it
            return int(rsp.Status), None  # type: ignore[arg-type]
        return _status_and_comment(assoc._check_received_status(rsp))

    def _hold_reactor(self, assoc: Association) -> None:
        if self._reactor_held:
            return
        assoc._reactor_checkpoint.clear()
        while not reactor_stopped(assoc):
            time.sleep(0.0001)
        self._reactor_held = True

    def _resume_reactor(self) -> None:
        """Before anything pynetdicom does itself on this association (N-ACTION, release,
        abort): its methods pause the reactor on their own, and expect it running."""
        if self._reactor_held:
            self._reactor_held = False
            if self._assoc is not None:
                self._assoc._reactor_checkpoint.set()

    def _send_store_decoded(self, assoc: Association, cx: PresentationContext, obj: Part10) -> Dataset:
        """Public-API path (decode, let pynetdicom encode) if its internals ever change."""
        self._resume_reactor()
        syntax = UID(cx.transfer_syntax[0])
        try:
            ds = decode_dataset(obj)  # a deflated payload inflated with a cap, not whole
            if syntax != ImplicitVRLittleEndian:  # exact match picks our context; implicit converts
                ds.file_meta.TransferSyntaxUID = syntax
            return assoc.send_c_store(ds, msg_id=self._next_message_id())
        except (AttributeError, ValueError, InvalidDicomError, EOFError) as exc:
            raise UnsendablePayload(f"cannot encode the payload as {syntax.name}: {exc}") from None

    # -- storage commitment (N-ACTION) --
    def _send_commitment_request(
        self, assoc: Association, transaction_uid: str, refs: Sequence[tuple[str, str]]
    ) -> Dataset:
        """pynetdicom's send_n_action (3.0), with the Action Information encoded by hand where
        it can be (building and encoding it with pydicom cost about a tenth of a study's CPU)."""
        message_id = self._next_message_id()
        context = assoc._get_valid_context(STORAGE_COMMITMENT_PUSH, "", "scu") if raw_send_available(assoc) else None
        syntax = UID(context.transfer_syntax[0]) if context is not None else None
        action_information = None
        if self.raw_send and syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            action_information = commitment_request_bytes(
                transaction_uid, refs, implicit=syntax == ImplicitVRLittleEndian
            )
        if context is None or action_information is None:
            self._resume_reactor()
            status, _reply = assoc.send_n_action(
                commitment_request(transaction_uid, refs),
                COMMITMENT_REQUEST,
                STORAGE_COMMITMENT_PUSH,
                STORAGE_COMMITMENT_INSTANCE,
                msg_id=message_id,
            )
            return status
        req = N_ACTION()
        req.MessageID = message_id
        req.RequestedSOPClassUID = UID(STORAGE_COMMITMENT_PUSH)
        req.RequestedSOPInstanceUID = UID(STORAGE_COMMITMENT_INSTANCE)
        req.ActionTypeID = COMMITMENT_REQUEST
        req.ActionInformation = BytesIO(action_information)
        self._hold_reactor(assoc)
        try:
            assoc.dimse.send_msg(req, int(context.context_id))  # type: ignore[arg-type]
            _cx_id, rsp = assoc.dimse.get_msg(block=True)
        finally:
            self._resume_reactor()  # as send_n_action leaves it: running
        if rsp is None:
            assoc._handle_no_response()
            return Dataset()
        status = assoc._check_received_status(rsp)
        reply = getattr(rsp, "ActionReply", None)
        if (
            "Status" in status
            and code_to_category(int(status.Status)) in (STATUS_SUCCESS, STATUS_WARNING)
            and reply is not None
            and reply.getvalue() != b""
        ):
            # as send_n_action: an Action Reply that does not decode is a processing failure
            try:
                decode(reply, syntax == ImplicitVRLittleEndian, True, False)
            except Exception:  # noqa: BLE001 — pynetdicom catches everything here too
                log.error("Unable to decode the received 'Action Reply' dataset")
                status.Status = 0x0110
        return status

    def request_commitment(self, transaction_uid: str, refs: Sequence[tuple[str, str]]) -> None:
        """Ask the peer to commit to (SOP class, SOP instance) pairs. The answer comes later as
        an N-EVENT-REPORT (to the CommitmentListener). Raises CommitmentUnsupported if the peer
        has no storage commitment, TransientError if it failed now."""
        if not self.commitment:
            raise ValueError("open the StoreAssociation with commitment=True to request commitment")
        if not refs:
            raise ValueError("no instances to ask commitment for")
        assoc = self._require_alive()
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == STORAGE_COMMITMENT_PUSH and cx.as_scu]
        if not accepted:
            raise CommitmentUnsupported(
                f"{self.peer.where} does not offer Storage Commitment Push Model (presentation context rejected)"
            )
        status = self._send_commitment_request(assoc, transaction_uid, refs)
        if "Status" not in status:
            self._broken = True
            raise TransientError(
                f"no answer from {self.peer.where} to the storage commitment request (aborted or timed out)"
            )
        code = int(status.Status)
        category, meaning = classify_status(code)
        if category in STORED_CATEGORIES:
            log.debug("commitment requested: %s (%d instances)", transaction_uid, len(refs))
            return
        message = f"{self.peer.where} refused the storage commitment request: 0x{code:04X} {meaning}"
        if code in NO_COMMITMENT_STATUSES:
            raise CommitmentUnsupported(message)
        if is_refusal_of_us(code):
            raise ConfigurationFault(message)
        raise TransientError(message)
