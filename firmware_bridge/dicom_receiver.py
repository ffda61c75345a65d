"""DICOM storage SCP for the clinic LAN: carts and portable units send their objects here.

- Only calling AE titles on the allow-list may store (an empty list refuses to start: a
  receiver open to any device on the LAN is a configuration error, not a default).
- Any storage SOP class in the configured list, in any transfer syntax the cart proposes.
- An object is answered Success only after the `store` callable returned, i.e. after the
  gateway made it durable (the cart may delete it then); any failure there is answered
  0xA700 "Out of resources" so the cart keeps it and retries later.
- Objects are kept as received: the Part-10 bytes are the cart's data set unchanged (its
  transfer syntax, its UIDs, malformed ones included), with a file meta header in front.
- Success means "kept, and it is what you said": a data set pydicom cannot read, one that is not
  the SOP class and instance its C-STORE announced (or in the context it came on), or one without
  the Study/Series Instance UIDs the reading center files it under is refused (0xA900 / 0xC000,
  not 0xA700: sending it again cannot help) - the PACS would refuse it later, when the cart had
  deleted its copy.
- A repeated SOP Instance UID is the store callable's business (the outbox key makes it
  idempotent): the cart just gets Success again. A store callable refuses what it will not keep
  with `ObjectRefused` (its failure status is the answer).
- Bounded: an object larger than `max_object_bytes` as sent, or once inflated (a deflated one
  is inflated piece by piece and dropped at the limit: a 1 MB "decompression bomb" never
  becomes 1 GiB), is answered 0xA700 with a comment saying so, and nothing is kept.
  pynetdicom assembles a message in memory before the handler runs and reads a PDU of whatever
  length its header claims, so `_bound_receipt` caps both while receiving: bytes past the
  limit are read and dropped (the cart still gets its answer), a PDU over `MAX_PDU_BYTES` ends
  the connection. All associations together hold at most `max_receiving_bytes` of data sets
  being received (past that an object is refused "busy", the cart retries), and objects are
  checked and stored one at a time: memory stays within max_receiving_bytes + 3 x max_object_bytes
  over the process's own, however many carts (or attackers) send at once.

The composition (which outbox, which key) lives in lastmile; see `store(obj)`.
"""

from __future__ import annotations

import logging
import socket
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any

from devices.errors import ProtocolError
from devices.inflate import InflateLimitError, inflate
from firmware_bridge.errors import ObjectRefused, ReceiverConfigError

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
# Storage classes carts put ECGs in: 12-lead, General, Ambulatory ECG, Hemodynamic, Cardiac EP.
ECG_STORAGE_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.9.1.1",
    "1.2.840.10008.5.1.4.1.1.9.1.2",
    "1.2.840.10008.5.1.4.1.1.9.1.3",
    "1.2.840.10008.5.1.4.1.1.9.2.1",
    "1.2.840.10008.5.1.4.1.1.9.3.1",
)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
NOT_THE_SOP_CLASS = 0xA900  # "Data Set does not match SOP Class"
CANNOT_UNDERSTAND = 0xC000
DEFLATED = "1.2.840.10008.1.2.1.99"
MAX_PDU_BYTES = 1 << 20  # any PDU (we offer 16 KB P-DATA PDUs; an A-ASSOCIATE-RQ is a few KB)
MAX_COMMAND_BYTES = 64 * 1024  # a DIMSE command set is a few hundred bytes


@dataclass(frozen=True)
class ReceiverSettings:
    ae_title: str = "LASTMILE"
    host: str = "127.0.0.1"  # bind address (the clinic LAN interface in production)
    port: int = 11112  # 0: any free port (tests)
    allowed_callers: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ECG_STORAGE_CLASSES
    timeout_s: float = 30.0
    max_object_bytes: int = 16 * 2**20  # as sent and once inflated; larger: 0xA700, nothing kept
    max_receiving_bytes: int = 0  # data sets being received, all associations together (0: 2 objects)


@dataclass(frozen=True)
class ReceivedObject:
    data: bytes  # Part-10 file: preamble, file meta, the data set exactly as received
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    calling_ae: str
    patient: dict | None = field(default=None)  # patient_id, name, birth_date, sex, issuer


StoreCallable = Callable[[ReceivedObject], None]


class _ReceiveBudget:
    """Bytes that data sets being received may hold, all associations together."""

    def __init__(self, total: int) -> None:
        self._left = total
        self._lock = threading.Lock()

    def take(self, wanted: int) -> int:
        with self._lock:
            granted = min(wanted, self._left)
            self._left -= granted
            return granted

    def give(self, held: list[int]) -> None:
        with self._lock:
            self._left += held[0]
            held[0] = 0


class _CappedDataSet(BytesIO):
    """Where pynetdicom assembles a received data set: keeps at most `limit` bytes, within the
    receiver's budget, and counts what it drops, so an oversized object (or a flood of them)
    costs bandwidth, not memory. The budget is given back on close() (after the C-STORE was
    handled) or when a message never completed is dropped."""

    def __init__(self, limit: int, budget: _ReceiveBudget) -> None:
        super().__init__()
        self.limit = limit
        self.dropped = 0  # past `limit`: the object is too big
        self.starved = 0  # within `limit` but past the budget: the receiver is busy
        self._budget = budget
        self._held = [0]
        weakref.finalize(self, budget.give, self._held)

    def write(self, data: Any) -> int:
        room = max(0, self.limit - self.tell())
        wanted = min(len(data), room)
        granted = self._budget.take(wanted) if not (self.dropped or self.starved) else 0
        self._held[0] += granted
        self.dropped += len(data) - wanted
        self.starved += wanted - granted
        return super().write(data[:granted])

    def close(self) -> None:
        self._budget.give(self._held)
        super().close()


class _CappedCommand(BytesIO):
    def write(self, data: Any) -> int:
        if self.tell() + len(data) > MAX_COMMAND_BYTES:
            raise _ReceiptRefused(f"a DIMSE command set over {MAX_COMMAND_BYTES} bytes")
        return super().write(data)


class _ReceiptRefused(OSError):
    pass


def _bound_receipt(event: Any, max_object_bytes: int, budget: _ReceiveBudget) -> None:
    """EVT_CONN_OPEN: cap what one connection can make pynetdicom hold in memory (its own
    receive path has no limit): each PDU (a longer one ends the connection) and each message's
    data set (bytes past the limit are dropped and the object refused).
    Its twin is `uploader.dicom_commitment.bound_receipt` (reports: refused outright): the import
    rules keep firmware_bridge and uploader apart, and devices/ holds no sockets, so each layer
    keeps its own; a change to one is due in the other."""
    from pynetdicom.dimse_messages import DIMSEMessage

    assoc = event.assoc
    sock = assoc.dul.socket
    if sock is None:
        return
    peer = assoc.requestor.address
    recv = sock.recv

    def bounded_recv(nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_BYTES:
            log.warning("%s announced a %d byte PDU (limit %d): connection closed", peer, nr_bytes, MAX_PDU_BYTES)
            raise _ReceiptRefused(f"PDU of {nr_bytes} bytes refused")
        return recv(nr_bytes)

    setattr(sock, "recv", bounded_recv)  # noqa: B010 — an instance attribute over the method
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def bounded_receive(primitive: Any) -> None:
        if dimse.message is None:
            message = DIMSEMessage()
            message.encoded_command_set = _CappedCommand()
            message.data_set = _CappedDataSet(max_object_bytes, budget)
            dimse.message = message
        try:
            receive(primitive)
        except _ReceiptRefused as exc:
            log.warning("%s sent %s: association aborted", peer, exc)
            dimse.message = None
            dimse.dul.event_queue.put("Evt19")  # invalid PDU: pynetdicom aborts the association

    setattr(dimse, "receive_primitive", bounded_receive)  # noqa: B010 — an instance attribute over the method


def _refused(calling: str, sop_instance: str, exc: ObjectRefused) -> Any:
    log.warning("C-STORE from %s: %s refused: %s", calling, sop_instance, exc)
    return _refusal(exc.status, str(exc))


def _refusal(status: int, comment: str) -> Any:
    from pydicom.dataset import Dataset

    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = comment[:64]  # LO
    return answer


def _text(value: object) -> str:
    """A text or UID value without its padding (spaces; a NUL after a UID)."""
    return str(value if value is not None else "").strip().strip("\x00").strip()


def _patient(ds) -> dict | None:
    patient_id = _text(ds.get("PatientID"))
    if not patient_id:
        return None
    return {
        "patient_id": patient_id,
        "name": _text(ds.get("PatientName")),
        "issuer": _text(ds.get("IssuerOfPatientID")),
        "sex": _text(ds.get("PatientSex")),
        "birth_date": _text(ds.get("PatientBirthDate")) or None,
    }


class DicomReceiver:
    """A pynetdicom storage SCP running in its own threads until stop()."""

    def __init__(self, settings: ReceiverSettings, store: StoreCallable) -> None:
        if not settings.allowed_callers:
            raise ReceiverConfigError(
                "lan_receiver.allowed_callers is empty: list the AE titles of the carts allowed to send"
            )
        if not settings.sop_classes:
            raise ReceiverConfigError("lan_receiver.sop_classes is empty")
        self.settings = settings
        self._store = store
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()
        self._stopping = False  # `stop_storing`: every object refused from then on

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("receiver not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.events import EventHandlerType

        ae = AE(ae_title=self.settings.ae_title)
        ae.require_calling_aet = list(self.settings.allowed_callers)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        ae.maximum_associations = 4
        budget = _ReceiveBudget(self.settings.max_receiving_bytes or 2 * self.settings.max_object_bytes)
        for uid in self.settings.sop_classes:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_CONN_OPEN, lambda event: _bound_receipt(event, self.settings.max_object_bytes, budget)),
        ]
        self._server = ae.start_server((self.settings.host, self.settings.port), block=False, evt_handlers=handlers)
        log.info(
            "DICOM receiver %s listening on %s:%d for %s",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            ", ".join(self.settings.allowed_callers),
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def stop_storing(self, timeout_s: float) -> bool:
        """Refuse every object from now on (the cart sends it again), once the one being stored
        is, waited for up to `timeout_s`: True when none is - what it stores into may be closed.
        Associations accepted before `stop` go on until then: `stop` does not end them."""
        self._stopping = True
        if not self._lock.acquire(timeout=timeout_s):
            return False
        self._lock.release()
        return True

    def storing(self) -> bool:
        """An object is being checked and stored (its handler holds the one-at-a-time lock)."""
        return self._lock.locked()

    def __enter__(self) -> DicomReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _on_open(event) -> None:
        # Nagle + delayed ACK stall every C-STORE by 40-85 ms on loopback (shared/NOTES.md)
        try:
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass

    def handle_store(self, event: Any) -> Any:
        """The EVT_C_STORE handler: check the received data set, keep it, answer a status (or a
        refusal data set with a comment). Public so that the fuzz harness (bench/fuzz_targets.py)
        drives the real handler with pynetdicom events; `event.request.DataSet` is what
        `_bound_receipt` assembled, or any BytesIO (a plain one has dropped nothing)."""
        calling = str(event.assoc.requestor.ae_title).strip()
        request = event.request
        sop_instance = str(request.AffectedSOPInstanceUID)
        received = request.DataSet
        try:
            return self._check_and_store(event, received, calling, sop_instance)
        finally:
            received.close()  # gives its share of the receive budget back

    def _check_and_store(self, event: Any, received: BytesIO, calling: str, sop_instance: str) -> Any:
        limit = self.settings.max_object_bytes
        dropped, starved = getattr(received, "dropped", 0), getattr(received, "starved", 0)
        if dropped:
            size = received.tell() + starved + dropped
            log.warning(
                "C-STORE from %s: %s has %d bytes, over the %d byte limit: refused", calling, sop_instance, size, limit
            )
            return _refusal(OUT_OF_RESOURCES, f"object over the gateway's {limit // 2**20} MB limit")
        if starved:
            log.warning(
                "C-STORE from %s: %s arrived while others filled the receive budget: busy", calling, sop_instance
            )
            return _refusal(OUT_OF_RESOURCES, "gateway busy receiving other objects: try again")
        with self._lock:  # one object at a time: checking and storing hold copies of it
            if self._stopping:  # its store may be closed: not acknowledged, the cart sends it again
                return _refusal(OUT_OF_RESOURCES, "gateway stopping: send it again")
            try:
                obj = self._read(event, received, calling)
            except InflateLimitError:
                log.warning(
                    "C-STORE from %s: %s inflates to over %d bytes (a decompression bomb?): refused",
                    calling,
                    sop_instance,
                    limit,
                )
                return _refusal(OUT_OF_RESOURCES, f"object inflates to over the gateway's {limit // 2**20} MB limit")
            except ObjectRefused as exc:  # not the object its C-STORE announced
                return _refused(calling, sop_instance, exc)
            except Exception as exc:  # noqa: BLE001 — a data set pydicom cannot read: say so, keep nothing
                log.warning("C-STORE from %s: unreadable data set %s (%s)", calling, sop_instance, exc)
                return CANNOT_UNDERSTAND
            try:
                self._store(obj)
            except ObjectRefused as exc:  # the store callable will not keep it
                return _refused(calling, sop_instance, exc)
            except Exception:
                log.exception("C-STORE from %s: could not keep %s; answering 'out of resources'", calling, sop_instance)
                return OUT_OF_RESOURCES
        log.info("C-STORE from %s: kept %s (%d bytes)", calling, sop_instance, len(obj.data))
        return SUCCESS

    def _read(self, event: Any, received: BytesIO, calling: str) -> ReceivedObject:
        """The received object, its data set read (a deflated one inflated with the cap first:
        pynetdicom would inflate it whole, however big)."""
        from pydicom.filereader import read_dataset
        from pydicom.uid import UID

        syntax = UID(str(event.context.transfer_syntax))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # malformed UIDs are kept, not judged here
            if syntax == DEFLATED:
                try:
                    with received.getbuffer() as view:  # no copy of what was received
                        source = BytesIO(inflate(view, max_bytes=self.settings.max_object_bytes))
                except InflateLimitError:
                    raise
                except ProtocolError as exc:
                    raise ValueError(str(exc)) from None
            else:
                received.seek(0)
                source = received  # read in place: no copy of a large object
            implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
            little = syntax.is_little_endian if syntax.is_transfer_syntax else True
            ds = read_dataset(source, implicit, little)
            # (a class not in `sop_classes` has no context here: it is refused as not the context's)
            sop_class, sop_instance = _announced_and_held(event, ds)
            study, series, patient = _text(ds.get("StudyInstanceUID")), _text(ds.get("SeriesInstanceUID")), _patient(ds)
            del ds, source
            if not (study and series):
                raise ObjectRefused(CANNOT_UNDERSTAND, "no Study or Series Instance UID")
            data = event.encoded_dataset(include_meta=True)
        return ReceivedObject(
            data=data,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            study_uid=study,
            series_uid=series,
            transfer_syntax=str(syntax),
            calling_ae=calling,
            patient=patient,
        )


def _announced_and_held(event: Any, ds: Any) -> tuple[str, str]:
    """The SOP class and instance the C-STORE announced, checked against the data set: Success lets
    the cart delete its copy, so it must be the object the key and the meta will say it is."""
    sop_class, sop_instance = _text(event.request.AffectedSOPClassUID), _text(event.request.AffectedSOPInstanceUID)
    if sop_class != _text(event.context.abstract_syntax):
        raise ObjectRefused(NOT_THE_SOP_CLASS, "SOP class is not the presentation context's")
    if _text(ds.get("SOPClassUID")) != sop_class:
        raise ObjectRefused(NOT_THE_SOP_CLASS, "data set's SOP Class UID is not the one announced")
    if _text(ds.get("SOPInstanceUID")) != sop_instance:
        raise ObjectRefused(CANNOT_UNDERSTAND, "data set's SOP Instance UID is not the one announced")
    return sop_class, sop_instance


def settings_from(
    ae_title: str,
    port: int,
    allowed_callers: Sequence[str],
    sop_classes: Sequence[str],
    host: str = "0.0.0.0",
    timeout_s: float = 30.0,
    max_object_bytes: int = ReceiverSettings.max_object_bytes,
) -> ReceiverSettings:
    """Settings from the configuration's lan_receiver section (empty sop_classes: ECG classes)."""
    return ReceiverSettings(
        ae_title=ae_title,
        host=host,
        port=port,
        allowed_callers=tuple(allowed_callers),
        sop_classes=tuple(sop_classes) or ECG_STORAGE_CLASSES,
        timeout_s=timeout_s,
        max_object_bytes=max_object_bytes,
    )
