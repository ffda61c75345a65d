"""DICOM storage SCP for the clinic LAN: carts and portable units send their objects here.

- Only calling AE titles on the allow-list may store (an empty list refuses to start: a
  receiver open to any device on the LAN is a configuration error, not a default).
- Any storage SOP class in the configured list, in any transfer syntax the cart proposes.
- An object is answered Success only after the `store` callable returned, i.e. after the
  gateway made it durable (the cart may delete it then); any failure there is answered
  0xA700 "Out of resources" so the cart keeps it and retries later.
- Objects are kept as received: the Part-10 bytes are the cart's data set unchanged (its
  transfer syntax, its UIDs, malformed ones included), with a file meta header in front.
- A repeated SOP Instance UID is the store callable's business (the outbox key makes it
  idempotent): the cart just gets Success again.

The composition (which outbox, which key) lives in lastmile; see `store(obj)`.
"""

from __future__ import annotations

import logging
import socket
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from firmware_bridge.errors import ReceiverConfigError

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
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class ReceiverSettings:
    ae_title: str = "LASTMILE"
    host: str = "127.0.0.1"  # bind address (the clinic LAN interface in production)
    port: int = 11112  # 0: any free port (tests)
    allowed_callers: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ECG_STORAGE_CLASSES
    timeout_s: float = 30.0


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


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def _patient(ds) -> dict | None:
    patient_id = _text(ds, "PatientID")
    if not patient_id:
        return None
    return {
        "patient_id": patient_id,
        "name": _text(ds, "PatientName"),
        "issuer": _text(ds, "IssuerOfPatientID"),
        "sex": _text(ds, "PatientSex"),
        "birth_date": _text(ds, "PatientBirthDate") or None,
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
        for uid in self.settings.sop_classes:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_CONN_OPEN, self._on_open),
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

    def handle_store(self, event) -> int:
        """The C-STORE handler: keep the data set as received, or answer why not (public: the
        fuzz harness drives it with synthetic events)."""
        calling = str(event.assoc.requestor.ae_title).strip()
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # malformed UIDs are kept, not judged here
                data = event.encoded_dataset(include_meta=True)
                ds = event.dataset
                study, series, patient = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID"), _patient(ds)
        except Exception as exc:  # noqa: BLE001 — a data set pydicom cannot read: say so, keep nothing
            log.warning("C-STORE from %s: unreadable data set %s (%s)", calling, sop_instance, exc)
            return CANNOT_UNDERSTAND
        obj = ReceivedObject(
            data=data,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            study_uid=study,
            series_uid=series,
            transfer_syntax=str(event.context.transfer_syntax),
            calling_ae=calling,
            patient=patient,
        )
        try:
            with self._lock:  # one durable write at a time; SQLite serialises anyway
                self._store(obj)
        except Exception:
            log.exception("C-STORE from %s: could not keep %s; answering 'out of resources'", calling, sop_instance)
            return OUT_OF_RESOURCES
        log.info("C-STORE from %s: kept %s (%d bytes)", calling, sop_instance, len(data))
        return SUCCESS


def settings_from(
    ae_title: str,
    port: int,
    allowed_callers: Sequence[str],
    sop_classes: Sequence[str],
    host: str = "0.0.0.0",
    timeout_s: float = 30.0,
) -> ReceiverSettings:
    """Settings from the configuration's lan_receiver section (empty sop_classes: ECG classes)."""
    return ReceiverSettings(
        ae_title=ae_title,
        host=host,
        port=port,
        allowed_callers=tuple(allowed_callers),
        sop_classes=tuple(sop_classes) or ECG_STORAGE_CLASSES,
        timeout_s=timeout_s,
    )
