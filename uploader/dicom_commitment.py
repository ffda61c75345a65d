"""Storage commitment results (PS3.4 Annex J): the N-EVENT-REPORT a PACS sends to say what it
keeps, read into a `CommitmentReport`, and our AE listening for it in the SCP role.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType

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

EVENT_ALL_COMMITTED = 1  # N-EVENT-REPORT Event Type IDs
EVENT_SOME_FAILED = 2


@dataclass(frozen=True)
class CommitmentReport:
    transaction_uid: str
    committed: list[tuple[str, str]]  # (SOP class UID, SOP instance UID)
    failed: list[tuple[str, str, int]]  # (SOP class UID, SOP instance UID, FailureReason)
    calling_ae: str = ""  # who sent the report


class MalformedReport(ValueError):
    """An N-EVENT-REPORT we cannot read as a storage commitment result."""


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


def report_handler(on_report: Callable[[CommitmentReport], None]) -> Callable[[evt.Event], tuple[int, Dataset | None]]:
    def handle(event: evt.Event) -> tuple[int, Dataset | None]:
        if event.request.AffectedSOPClassUID != STORAGE_COMMITMENT_PUSH:
            return 0x0118, None  # no such SOP class
        calling = str(event.assoc.requestor.ae_title)
        try:
            report = parse_commitment_report(event.event_type, event.event_information, calling)
        except UNREADABLE_REPORT as exc:
            log.warning("unreadable storage commitment report from %s: %s", calling, exc)
            return 0x0110, None
        log.info(
            "storage commitment report %s from %s: %d committed, %d failed",
            report.transaction_uid,
            calling,
            len(report.committed),
            len(report.failed),
        )
        try:
            on_report(report)
        except Exception:
            log.exception("storage commitment report %s could not be processed", report.transaction_uid)
            return 0x0110, None
        return 0x0000, None

    return handle


class CommitmentListener:
    """Our AE in the SCP role for N-EVENT-REPORTs: the PACS opens a new association to us
    (role selection: it is the Storage Commitment SCP) and reports what it committed."""

    def __init__(
        self,
        ae_title: str,
        port: int,
        on_report: Callable[[CommitmentReport], None],
        *,
        host: str = "127.0.0.1",
        allowed_peers: Sequence[str] | None = None,
        tls: TlsFiles | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.ae_title = ae_title
        self.port = port
        self.host = host
        self.on_report = on_report
        self.allowed_peers = tuple(allowed_peers or ())
        self.tls = tls
        self.timeout_s = timeout_s
        self._server: object | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        server = self._server
        if server is not None:
            host, port = server.server_address[:2]  # type: ignore[attr-defined]
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
            except ValueError as exc:
                raise ConfigurationFault(f"AE title {self.ae_title!r} is not valid: {exc}") from None
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
            ae.require_called_aet = True
            if self.allowed_peers:
                ae.require_calling_aet = list(self.allowed_peers)
            # the reporting PACS is the Storage Commitment SCP: accept it in that role
            ae.add_supported_context(STORAGE_COMMITMENT_PUSH, COMMITMENT_SYNTAXES, scu_role=False, scp_role=True)
            ae.add_supported_context(VERIFICATION)
            ssl_context = server_tls_context(self.tls) if self.tls is not None else None
            handlers: list[EventHandlerType] = [
                (evt.EVT_CONN_OPEN, set_nodelay),
                (evt.EVT_N_EVENT_REPORT, report_handler(self.on_report)),
            ]
            try:
                self._server = ae.start_server(
                    (self.host, self.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
                )
            except OSError as exc:
                raise ConfigurationFault(
                    f"cannot listen for storage commitment reports on {self.host}:{self.port}: {exc}"
                ) from None
            log.info("listening for storage commitment reports as %s on %s:%d", self.ae_title, *self.address)

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            stop_server(server)

    def __enter__(self) -> CommitmentListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
