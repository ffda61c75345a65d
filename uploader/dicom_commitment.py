"""Storage commitment results (PS3.4 Annex J): the N-EVENT-REPORT a PACS sends to say what it
keeps, read into a `CommitmentReport`, and our AE listening for it in the SCP role.

A report makes the gateway delete its copies, so a forged one loses studies. Who may send one
(`ReportSenders`) is checked twice before a report is read: the connection must come from the
reading center's address or an allowed network (checked before a byte is read; anything else
is closed at once), and the association must be called by the reading center's AE title and
call ours (rejected otherwise). A report that gets through is still only believed for a
transaction we issued and the instances in it (the forwarder's `on_report` raises
`ReportRefused`, answered with a failure status). Every refusal is logged as a security event
on the `uploader.dicom_commitment.security` logger, and changes nothing.
The listener binds one address (the forwarder picks the interface toward the reading center),
speaks TLS when the sender does, and bounds what a peer can make it hold in memory.
It is the gateway's one AE and port at the PACS, so it can also take C-STOREs for a C-MOVE to
our AE (`also_store`: report objects, lastmile.reports), from the same senders only.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from uploader.dicom_association import (
    COMMITMENT_SYNTAXES,
    STORAGE_COMMITMENT_PUSH,
    VERIFICATION,
    set_nodelay,
    stop_server,
)
from uploader.dicom_tls import TlsFiles, server_tls_context
from uploader.errors import ConfigurationFault

log = logging.getLogger(__name__)
security_log = logging.getLogger(__name__ + ".security")

EVENT_ALL_COMMITTED = 1  # N-EVENT-REPORT Event Type IDs
EVENT_SOME_FAILED = 2
# N-EVENT-REPORT answers (PS3.7 10.1.4.1.10)
PROCESSING_FAILURE = 0x0110
INVALID_ARGUMENT_VALUE = 0x0115  # e.g. a Transaction UID we never issued
NOT_AUTHORISED = 0x0124
MAX_PDU_BYTES = 1 << 20  # any PDU: a report's PDUs are 16 KB, an A-ASSOCIATE-RQ a few KB
STOP_WAIT_S = 5.0  # stop(): how long reports already being taken may take to finish
MAX_REPORT_BYTES = 8 << 20  # one N-EVENT-REPORT (~100 bytes per instance: 80 000 instances)


@dataclass(frozen=True)
class ExtraStorage:
    """Storage contexts the listener also accepts, and their EVT_C_STORE handler (which answers
    the status): e.g. report objects the PACS C-MOVEs to our AE."""

    sop_classes: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]
    on_store: Callable[[evt.Event], int]


class FailedAction(Enum):
    """What a storage commitment FailureReason asks of the sender."""

    RESEND = "resend"  # the PACS does not have it (now): send the object again
    ASK_AGAIN = "ask again"  # the transaction failed, not the object: ask under a new transaction UID
    QUARANTINE = "quarantine"  # the same object fails the same way at every try: stop, say why


# FailureReason (PS3.4 J.3.2.2 / J.3.3.1.2) -> (meaning, action)
FAILURE_REASONS: dict[int, tuple[str, FailedAction]] = {
    0x0110: ("processing failure", FailedAction.RESEND),
    0x0112: ("no such object instance", FailedAction.RESEND),  # not (or no longer) there: store it again
    0x0213: ("resource limitation", FailedAction.RESEND),  # passes: sent again after the backoff
    # the PACS cannot commit this SOP class at all: a property of its setup, the same at every try
    0x0122: ("referenced SOP class not supported", FailedAction.QUARANTINE),
    # the PACS has this instance UID under another SOP class: the same UIDs conflict again
    0x0119: ("class/instance conflict", FailedAction.QUARANTINE),
    # the transaction UID was taken, the object is not at fault: a new transaction, no new send
    0x0131: ("duplicate transaction UID", FailedAction.ASK_AGAIN),
}


def failure_action(reason: int) -> tuple[str, FailedAction]:
    """(meaning, action) of a FailureReason; an unknown one is sent again (the forwarder caps
    how many times an instance may fail commitment)."""
    return FAILURE_REASONS.get(reason, ("unknown failure reason", FailedAction.RESEND))


@dataclass(frozen=True)
class CommitmentReport:
    transaction_uid: str
    committed: list[tuple[str, str]]  # (SOP class UID, SOP instance UID)
    failed: list[tuple[str, str, int]]  # (SOP class UID, SOP instance UID, FailureReason)
    calling_ae: str = ""  # who sent the report


class MalformedReport(ValueError):
    """An N-EVENT-REPORT we cannot read as a storage commitment result."""


class ReportRefused(Exception):
    """A readable report we do not believe (unknown transaction, instances not in it, a sender
    that is not the reading center): answered with `status`, logged as a security event."""

    def __init__(self, reason: str, status: int = INVALID_ARGUMENT_VALUE) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class ReportSenders:
    """Who may send storage commitment reports: the reading center's AE title, connecting from
    its own address (`hosts`: names are resolved when a connection comes in) or from one of
    `networks` (CIDR, e.g. a PACS cluster's subnet). Nothing allowed: nobody may send."""

    ae_titles: tuple[str, ...]
    hosts: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for net in self.networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ConfigurationFault(f"commitment report network {net!r} is not valid: {exc}") from None

    def address_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in ipaddress.ip_network(net, strict=False) for net in self.networks):
            return True
        return any(ip in _addresses_of(host) for host in self.hosts)

    def ae_allowed(self, ae_title: str) -> bool:
        return ae_title.strip() in {t.strip() for t in self.ae_titles}


def _addresses_of(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("cannot resolve the reading center %r to check a commitment report's sender: %s", host, exc)
        return set()
    return {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}


# What reading an untrusted data set raises: pydicom decodes sequences while pynetdicom hands the
# event over and other elements lazily on first access, so a truncated element (OSError, EOFError,
# struct.error), an odd-length number (BytesLengthException) or an unknown VR (NotImplementedError)
# surfaces in our code, not in pynetdicom's.
UNREADABLE_DATASET: tuple[type[Exception], ...] = (
    AttributeError,
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    OverflowError,
    struct.error,
    OSError,
    EOFError,
    NotImplementedError,
    BytesLengthException,
)


UNREADABLE_REPORT: tuple[type[Exception], ...] = (MalformedReport, InvalidDicomError, *UNREADABLE_DATASET)


def _refs(seq: Sequence[Dataset] | None) -> list[tuple[str, str, int]]:
    """(SOP class, SOP instance, FailureReason or 0x0110 when none is given) of each item."""
    out = []
    for item in seq or []:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "")
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not sop_instance:
            raise MalformedReport("a referenced SOP item has no ReferencedSOPInstanceUID")
        reason = item.get("FailureReason")
        out.append((sop_class, sop_instance, int(reason) if reason is not None else 0x0110))
    return out


def parse_commitment_report(event_type: int | None, info: Dataset, calling_ae: str = "") -> CommitmentReport:
    """Event Information of a Storage Commitment N-EVENT-REPORT -> CommitmentReport."""
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
        raise MalformedReport(f"unknown storage commitment event type {event_type!r}")
    try:
        txn = str(info.get("TransactionUID", "") or "")
        committed = [(c, i) for c, i, _ in _refs(info.get("ReferencedSOPSequence"))]
        failed = _refs(info.get("FailedSOPSequence"))
    except UNREADABLE_DATASET as exc:
        raise MalformedReport(f"unreadable event information: {exc}") from None
    if not txn:
        raise MalformedReport("no TransactionUID")
    if event_type == EVENT_SOME_FAILED and not failed:
        raise MalformedReport("event type 2 (some failed) without a FailedSOPSequence")
    return CommitmentReport(txn, committed, failed, calling_ae.strip())


def report_handler(
    on_report: Callable[[CommitmentReport], None], senders: ReportSenders | None = None
) -> Callable[[evt.Event], tuple[int, Dataset | None]]:
    """EVT_N_EVENT_REPORT handler: parse, check the sender (when `senders` is given: the
    listener's associations; on our own outgoing association the peer is the one we called),
    then `on_report`, whose ReportRefused is answered with its status."""

    def handle(event: evt.Event) -> tuple[int, Dataset | None]:
        calling = str(event.assoc.requestor.ae_title).strip()
        address = str(event.assoc.requestor.address)
        if senders is not None and not (senders.ae_allowed(calling) and senders.address_allowed(address)):
            security_log.warning(
                "security: refused a storage commitment report from %s at %s: not the reading center", calling, address
            )
            return NOT_AUTHORISED, None
        if event.request.AffectedSOPClassUID != STORAGE_COMMITMENT_PUSH:
            return 0x0118, None  # no such SOP class
        try:
            report = parse_commitment_report(event.event_type, event.event_information, calling)
        except UNREADABLE_REPORT as exc:
            log.warning("unreadable storage commitment report from %s: %s", calling, exc)
            return PROCESSING_FAILURE, None
        log.info(
            "storage commitment report %s from %s: %d committed, %d failed",
            report.transaction_uid,
            calling,
            len(report.committed),
            len(report.failed),
        )
        try:
            on_report(report)
        except ReportRefused as exc:
            security_log.warning(
                "security: refused storage commitment report %s from %s at %s (0x%04X): %s; nothing changed",
                report.transaction_uid,
                calling,
                address,
                exc.status,
                exc,
            )
            return exc.status, None
        except Exception:
            log.exception("storage commitment report %s could not be processed", report.transaction_uid)
            return PROCESSING_FAILURE, None
        return 0x0000, None

    return handle


class _ReportServer(ThreadedAssociationServer):
    """pynetdicom's server, closing a connection from an address not allowed as soon as it is
    accepted: before a byte is read and before any TLS handshake."""

    senders: ReportSenders
    stopping = False

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, client_address = self.socket.accept()
        if not self._allowed(str(client_address[0])):
            client.close()
            raise ConnectionRefusedError("not an allowed sender")  # socketserver drops the request
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, client_address

    def _allowed(self, address: str) -> bool:
        if self.stopping:
            return False  # stop_server's wake-up connection
        if self.senders.address_allowed(address):
            return True
        if address == str(self.server_address[0]):
            # this machine itself (`lastmile doctor` probing the port): refused, but no attack
            log.info("closed a local connection to the storage commitment listener from %s", address)
            return False
        security_log.warning(
            "security: closed a connection to the storage commitment listener from %s: not the reading center's "
            "address nor an allowed network",
            address,
        )
        return False


class _BoundedBuffer(BytesIO):
    """A DIMSE message buffer that refuses to grow past `limit` (the association is aborted)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.limit:
            raise _TooBig(f"a DIMSE message larger than {self.limit} bytes")
        return super().write(data)


class _TooBig(OSError):
    pass


def bound_receipt(event: evt.Event) -> None:
    """EVT_CONN_OPEN: pynetdicom reads a PDU of whatever length its header claims, and a
    message of any number of PDUs, into memory. Cap both; a peer going past is cut off.
    Its twin is `firmware_bridge.dicom_receiver`'s receipt bound (carts' objects, with a shared
    memory budget): the import rules keep the two layers apart; a change to one is due in the other."""
    assoc = event.assoc
    sock = assoc.dul.socket
    if sock is None:
        return
    peer = assoc.requestor.address
    recv = sock.recv

    def bounded_recv(nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_BYTES:
            security_log.warning(
                "security: %s announced a %d byte PDU (limit %d): connection closed",
                peer,
                nr_bytes,
                MAX_PDU_BYTES,
            )
            raise _TooBig(f"PDU of {nr_bytes} bytes refused")
        return recv(nr_bytes)

    setattr(sock, "recv", bounded_recv)  # noqa: B010 — an instance attribute over the method
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def bounded_receive(primitive: Any) -> None:
        if dimse.message is None:
            message = DIMSEMessage()
            message.encoded_command_set = _BoundedBuffer(MAX_REPORT_BYTES)
            message.data_set = _BoundedBuffer(MAX_REPORT_BYTES)
            dimse.message = message
        try:
            receive(primitive)
        except _TooBig as exc:
            security_log.warning("security: %s sent %s: association aborted", peer, exc)
            dimse.message = None
            dimse.dul.event_queue.put("Evt19")  # invalid PDU: pynetdicom aborts the association

    setattr(dimse, "receive_primitive", bounded_receive)  # noqa: B010 — an instance attribute over the method


def log_rejection(event: evt.Event) -> None:
    """EVT_REJECTED: an association with a wrong calling or called AE title (or too many)."""
    requestor = event.assoc.requestor
    request = requestor.primitive
    security_log.warning(
        "security: rejected an association to the storage commitment listener from %s (calling %r, called %r)",
        requestor.address,
        str(getattr(request, "calling_ae_title", requestor.ae_title)).strip(),
        str(getattr(request, "called_ae_title", "")).strip(),
    )


class CommitmentListener:
    """Our AE in the SCP role for N-EVENT-REPORTs: the PACS opens a new association to us
    (role selection: it is the Storage Commitment SCP) and reports what it committed.
    Only `senders` may connect and associate (see the module's docstring)."""

    def __init__(
        self,
        ae_title: str,
        port: int,
        on_report: Callable[[CommitmentReport], None],
        senders: ReportSenders,
        *,
        host: str = "127.0.0.1",
        tls: TlsFiles | None = None,
        timeout_s: float = 30.0,
        also_store: ExtraStorage | None = None,
    ) -> None:
        if not senders.ae_titles:
            raise ConfigurationFault("storage commitment listener: no AE title is allowed to send reports")
        self.ae_title = ae_title
        self.port = port
        self.host = host
        self.on_report = on_report
        self.senders = senders
        self.tls = tls
        self.timeout_s = timeout_s
        self.also_store = also_store
        self._server: _ReportServer | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        server = self._server
        if server is not None:
            host, port = server.server_address[:2]
            return str(host), int(port)
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            try:
                ae = AE(ae_title=self.ae_title)
                ae.require_calling_aet = list(self.senders.ae_titles)
            except ValueError as exc:
                raise ConfigurationFault(f"AE title {self.ae_title!r} is not valid: {exc}") from None
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
            ae.require_called_aet = True
            ae.maximum_associations = 4
            # the reporting PACS is the Storage Commitment SCP: accept it in that role
            ae.add_supported_context(STORAGE_COMMITMENT_PUSH, COMMITMENT_SYNTAXES, scu_role=False, scp_role=True)
            ae.add_supported_context(VERIFICATION)
            if self.also_store is not None:
                for uid in self.also_store.sop_classes:
                    ae.add_supported_context(uid, list(self.also_store.transfer_syntaxes))
            ssl_context = server_tls_context(self.tls) if self.tls is not None else None
            handlers: list[EventHandlerType] = [
                (evt.EVT_CONN_OPEN, bound_receipt),
                (evt.EVT_CONN_OPEN, set_nodelay),
                (evt.EVT_REJECTED, log_rejection),
                (evt.EVT_N_EVENT_REPORT, report_handler(self.on_report, self.senders)),
            ]
            if self.also_store is not None:
                handlers.append((evt.EVT_C_STORE, self.also_store.on_store))
            try:
                server = cast(
                    _ReportServer,
                    ae.make_server(
                        (self.host, self.port),
                        ssl_context=ssl_context,
                        evt_handlers=handlers,
                        server_class=_ReportServer,
                    ),
                )
            except OSError as exc:
                raise ConfigurationFault(
                    f"cannot listen for storage commitment reports on {self.host}:{self.port}: {exc}"
                ) from None
            server.senders = self.senders  # before the first connection can arrive
            ae._servers.append(server)  # as AE.start_server does; shutdown() removes it
            threading.Thread(target=server.serve_forever, name="commitment-listener", daemon=True).start()
            self._server = server
            if self.host in ("", "0.0.0.0", "::"):
                log.warning(
                    "the storage commitment listener listens on every interface (%s): only %s may send reports",
                    self.host or "all",
                    ", ".join((*self.senders.hosts, *self.senders.networks)) or "nobody",
                )
            log.info("listening for storage commitment reports as %s on %s:%d", self.ae_title, *self.address)

    def stop(self) -> None:
        """Stop listening, and let a report being taken finish (up to STOP_WAIT_S): the caller
        closes the outbox next, and a report's handler that found it closed answered the PACS a
        failure for a report this gateway was about to record (and logged a traceback)."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.stopping = True
        stop_server(server)
        deadline = time.monotonic() + STOP_WAIT_S
        for assoc in server.active_associations:
            assoc.join(max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                log.warning("stopped with a storage commitment association still open: it is aborted")
                assoc.abort()

    def __enter__(self) -> CommitmentListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
