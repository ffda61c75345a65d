"""An embedded county reading center for the demo: a pynetdicom storage SCP on loopback that
also answers storage commitment (push model) the way Orthanc does — the report comes later,
on a new association to the gateway's own AE, in the SCP role."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.events import EventHandlerType

from uploader.dicom_association import ECG_STORAGE_CLASSES, STORAGE_COMMITMENT_PUSH, VERIFICATION

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
NO_SUCH_OBJECT_INSTANCE = 0x0112
ALL_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
]


@dataclass
class ReceivedObject:
    sop_class_uid: str
    study_uid: str
    patient_id: str
    transfer_syntax: str
    times_stored: int = 1


@dataclass
class EmbeddedReadingCenter:
    port: int
    gateway_port: int
    ae_title: str = "READING_CENTER"
    gateway_ae: str = "LASTMILE"
    report_delay_s: float = 0.2
    received: dict[str, ReceivedObject] = field(default_factory=dict)
    committed: set[str] = field(default_factory=set)
    _server: object | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        for uid in ECG_STORAGE_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self._on_action),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
        ]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]

    @property
    def running(self) -> bool:
        return self._server is not None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        with self._lock:
            seen = self.received.get(uid)
            if seen:
                seen.times_stored += 1  # a re-send of the same instance: a PACS overwrites it
            else:
                self.received[uid] = ReceivedObject(
                    str(ds.SOPClassUID),
                    str(ds.StudyInstanceUID),
                    str(ds.get("PatientID", "")),
                    str(event.context.transfer_syntax),
                )
        return 0x0000

    def _on_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        info = event.action_information
        refs = [
            (str(r.ReferencedSOPClassUID), str(r.ReferencedSOPInstanceUID))
            for r in info.get("ReferencedSOPSequence", [])
        ]
        txn = str(info.TransactionUID)
        threading.Thread(target=self._send_report, args=(txn, refs), daemon=True, name="commitment-report").start()
        return 0x0000, None

    def _send_report(self, txn: str, refs: list[tuple[str, str]]) -> None:
        time.sleep(self.report_delay_s)
        with self._lock:
            ok = [r for r in refs if r[1] in self.received]
            failed = [r for r in refs if r[1] not in self.received]
        report = Dataset()
        report.TransactionUID = txn
        if ok:
            report.ReferencedSOPSequence = [_ref(c, i) for c, i in ok]
        if failed:
            report.FailedSOPSequence = [_ref(c, i, NO_SUCH_OBJECT_INSTANCE) for c, i in failed]
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        role = build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)
        assoc = ae.associate("127.0.0.1", self.gateway_port, ae_title=self.gateway_ae, ext_neg=[role])
        if not assoc.is_established:
            log.warning("could not deliver the commitment report for %s", txn)
            return
        try:
            status, _ = assoc.send_n_event_report(
                report, 2 if failed else 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            if status is not None and status.Status == 0x0000:
                with self._lock:
                    self.committed.update(i for _c, i in ok)
        finally:
            assoc.release()


def _ref(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item
