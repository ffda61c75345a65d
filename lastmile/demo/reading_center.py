"""An embedded county reading center for the demo: a pynetdicom storage SCP on loopback that
also answers storage commitment (push model) the way Orthanc does — the report comes later,
on a new association to the gateway's own AE, in the SCP role.

It also gives the reports back as a PACS does: study-root C-FIND (IMAGE level, UID lists),
C-GET on the requesting association, and C-MOVE to a known AE (`offer_get=False`: only C-MOVE,
like a PACS that refuses C-GET). With `reader` set, each ECG it stores is "read" at once: the
reader returns report objects (lastmile.demo.cardiologist) that the center then holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, build_role, evt
from pynetdicom.events import EventHandlerType

from lastmile.demo.cardiologist import StudyToRead
from uploader.dicom_association import ECG_STORAGE_CLASSES, STORAGE_COMMITMENT_PUSH, VERIFICATION
from uploader.dicom_query import FIND, GET, MOVE
from uploader.report_reading import REPORT_SOP_CLASSES

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


Reader = Callable[[StudyToRead], list[Dataset]]


@dataclass
class EmbeddedReadingCenter:
    port: int
    gateway_port: int
    ae_title: str = "READING_CENTER"
    gateway_ae: str = "LASTMILE"
    report_delay_s: float = 0.2
    reader: Reader | None = None  # reads each ECG stored: returns its report objects
    offer_get: bool = True  # False: refuses C-GET (context rejected), retrieval only by C-MOVE
    move_destinations: dict[str, tuple[str, int]] = field(default_factory=dict)  # AE -> (host, port)
    received: dict[str, ReceivedObject] = field(default_factory=dict)
    committed: set[str] = field(default_factory=set)
    reports: dict[str, Dataset] = field(default_factory=dict)  # SOP Instance UID -> report object
    queries: int = 0  # C-FIND requests answered
    _server: object | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        for uid in ECG_STORAGE_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH)
        ae.add_supported_context(FIND)
        ae.add_supported_context(MOVE)
        for uid in REPORT_SOP_CLASSES:  # C-MOVE: we open the association to the destination
            ae.add_requested_context(uid, ALL_TRANSFER_SYNTAXES)
        if self.offer_get:
            ae.add_supported_context(GET)
            for uid in REPORT_SOP_CLASSES:  # C-GET: we store back to the requestor, in its SCP role
                ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES, scu_role=False, scp_role=True)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self._on_action),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
        ]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def add_report(self, ds: Dataset) -> None:
        """Hold a report object (as a PACS does after a C-STORE or a REST upload)."""
        with self._lock:
            self.reports[str(ds.SOPInstanceUID)] = ds

    def _matching(self, identifier: Dataset) -> list[Dataset]:
        def values(keyword: str) -> set[str]:
            value = identifier.get(keyword)
            if value in (None, ""):
                return set()
            return {str(v) for v in value} if isinstance(value, (list, tuple, MultiValue)) else {str(value)}

        studies, classes = values("StudyInstanceUID"), values("SOPClassUID")
        series, instances = values("SeriesInstanceUID"), values("SOPInstanceUID")
        with self._lock:
            held = list(self.reports.values())
        return [
            ds
            for ds in held
            if (not studies or ds.StudyInstanceUID in studies)
            and (not classes or ds.SOPClassUID in classes)
            and (not series or ds.SeriesInstanceUID in series)
            and (not instances or ds.SOPInstanceUID in instances)
        ]

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        identifier = event.identifier
        with self._lock:
            self.queries += 1
        if identifier.get("QueryRetrieveLevel") != "IMAGE":
            yield 0xC000, None  # this demo PACS answers instance-level queries only
            return
        for ds in self._matching(identifier):
            answer = Dataset()
            answer.QueryRetrieveLevel = "IMAGE"
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
                setattr(answer, keyword, getattr(ds, keyword))
            for keyword in ("CompletionFlag", "VerificationFlag", "ContentDate", "ContentTime"):
                if keyword in identifier:
                    setattr(answer, keyword, ds.get(keyword, ""))
            yield 0xFF00, answer

    def _on_get(self, event: evt.Event) -> Iterator[int | tuple[int, Dataset | None]]:
        found = self._matching(event.identifier)
        yield len(found)
        for ds in found:
            yield 0xFF00, ds

    def _on_move(self, event: evt.Event) -> Iterator[object]:
        destination: object = event.move_destination
        name = destination.decode() if isinstance(destination, bytes) else str(destination or "")
        where = self.move_destinations.get(name.strip())
        if where is None:
            yield None, None  # move destination unknown (0xA801)
            return
        yield where
        found = self._matching(event.identifier)
        yield len(found)
        for ds in found:
            yield 0xFF00, ds

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
        if self.reader is not None and not seen:
            for report in self.reader(study_to_read(ds)):
                self.add_report(report)
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
            report.ReferencedSOPSequence = [commitment_item(c, i) for c, i in ok]
        if failed:
            report.FailedSOPSequence = [commitment_item(c, i, NO_SUCH_OBJECT_INSTANCE) for c, i in failed]
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


def study_to_read(ds: Dataset) -> StudyToRead:
    """What a reader needs from a stored ECG object."""
    return StudyToRead(
        study_uid=str(ds.StudyInstanceUID),
        patient_id=str(ds.get("PatientID", "")),
        patient_name=str(ds.get("PatientName", "")),
        patient_birth_date=str(ds.get("PatientBirthDate", "")),
        patient_sex=str(ds.get("PatientSex", "")),
        accession=str(ds.get("AccessionNumber", "")),
        description=str(ds.get("StudyDescription", "")),
        ecg_sop_class_uid=str(ds.SOPClassUID),
        ecg_sop_instance_uid=str(ds.SOPInstanceUID),
        ecg_series_uid=str(ds.get("SeriesInstanceUID", "")),
    )


def commitment_item(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    """One instance in a Storage Commitment report (PS3.4 J.3.3): in its Referenced SOP Sequence,
    or with the reason it is not kept (`reason`) in its Failed SOP Sequence."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item
