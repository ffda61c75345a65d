"""How an ECG recording enters the outbox: once, with its UIDs minted once, from every path.

The paths: a file (`lastmile import`, a USB stick's watched folder), the clinic-LAN DICOM
receiver, the serial bridge's streamed ECG. The DICOM object is built here, at intake, and
stored as the payload: a retry, a crash or a restart later sends the very same bytes (same
Study/Series/SOP Instance UIDs), so the reading center can never see one recording as two
studies. Every path describes its item with the one `ecg_item_meta` builder.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from devices.ecg.recording import EcgRecording
from lastmile.clock import local_zone
from lastmile.config import Config
from uploader.dicom_ecg import (
    StationInfo,
    build_ecg_dataset,
    check_ecg_iod,
    choose_sop_class,
    mint_uids,
)
from uploader.outbox import AddResult, Kind, Outbox, Priority

if TYPE_CHECKING:
    from firmware_bridge.dicom_receiver import DicomReceiver, ReceivedObject
    from firmware_bridge.usb_import import FolderWatcher, ImportSummary

log = logging.getLogger(__name__)

PATIENT_MISMATCH = "patient-mismatch"
LAN_SOURCE_FORMAT = "dicom-lan"

CurrentPatient = Callable[[], "str | None"]


def _no_current_patient() -> str | None:
    return None


def station_of(config: Config) -> StationInfo:
    return StationInfo(station_name=config.gateway.id, institution=config.gateway.institution)


def patient_fields(recording: EcgRecording) -> dict | None:
    p = recording.patient
    if p is None:
        return None
    return {
        "patient_id": p.patient_id,
        "name": p.name,
        "issuer": p.issuer,
        "sex": p.sex,
        "birth_date": p.birth_date.isoformat() if p.birth_date else None,
    }


def ecg_item_meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    study_uid: str,
    series_uid: str,
    source_format: str,
    flags: Iterable[str],
    unassigned: bool,
    **extra: object,
) -> dict:
    """The outbox meta of an ECG item, whatever path it came by: the routing UIDs, where it came
    from, the flags the doctor must see, whether a patient is known. `extra` carries what only
    one path knows (leads and rate of a decoded recording; transfer syntax and calling AE of an
    object received as it is)."""
    return {
        "sop_class_uid": sop_class_uid,
        "sop_instance_uid": sop_instance_uid,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "source_format": source_format,
        "flags": list(flags),
        "unassigned": unassigned,
        **extra,
    }


def deflated_part10(ds: Dataset) -> bytes:
    """The object as a Deflated Explicit VR Little Endian Part-10 file.

    Deflated once here, at intake: the SD card stores ~40 % fewer bytes, and the forwarder sends
    the stored bytes as they are to a PACS that accepts deflate (inflating only for one that
    does not), instead of compressing again at every send.
    """
    check_ecg_iod(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def enqueue_recording(
    outbox: Outbox,
    recording: EcgRecording,
    config: Config,
    *,
    key: str,
    now: float | None = None,
    created_at: dt.datetime | None = None,
) -> AddResult:
    """Build the DICOM object for `recording` and make it durable in the outbox under `key`.

    Idempotent: a key already in the outbox returns the existing item and builds nothing.
    """
    existing = outbox.find(key)
    if existing is not None:
        return AddResult(item=existing, created=False)
    uids = mint_uids()
    data = deflated_part10(build_ecg_dataset(recording, uids, station_of(config), created_at=created_at))
    meta = ecg_item_meta(
        sop_class_uid=choose_sop_class(recording),
        sop_instance_uid=uids.sop_instance_uid,
        study_uid=uids.study_uid,
        series_uid=uids.series_uid,
        source_format=recording.source_format,
        flags=recording.flags,
        unassigned=recording.patient is None,
        leads=recording.n_leads,
        sampling_rate_hz=recording.sampling_rate_hz,
    )
    result = outbox.add(
        Kind.DICOM,
        key,
        data,
        priority=Priority.STAT if recording.stat else Priority.ROUTINE,
        meta=meta,
        patient=patient_fields(recording),
        now=now,
    )
    if result.created:
        log.info(
            "ECG queued as item %d (%d leads, %.0f Hz, %d bytes%s)",
            result.item.id,
            recording.n_leads,
            recording.sampling_rate_hz,
            len(data),
            ", STAT" if recording.stat else "",
        )
    return result


def with_patient_check(recording: EcgRecording, current_patient_id: str | None) -> EcgRecording:
    """The file's patient is kept; if the gateway's current patient is another one, the
    recording is flagged for the doctor (never re-assigned). A file without a patient stays
    unassigned: a stick may hold ECGs of many patients."""
    if (
        current_patient_id
        and recording.patient is not None
        and recording.patient.patient_id != current_patient_id
        and PATIENT_MISMATCH not in recording.flags
    ):
        return dataclasses.replace(recording, flags=recording.flags + (PATIENT_MISMATCH,))
    return recording


# -- files: `lastmile import` and the watched USB folders -----------------------------------------


def read_ecg_file(path: str | Path) -> EcgRecording:
    """Decode a file from disk (read-only); the receipt time stands in when the file has none."""
    from devices.ecg.formats import decode_ecg

    path = Path(path)
    return decode_ecg(path.read_bytes(), path.name, local_tz=local_zone(), received_at=dt.datetime.now(dt.timezone.utc))


def file_enqueuer(
    outbox: Outbox, config: Config, current_patient_id: CurrentPatient = _no_current_patient
) -> Callable[[EcgRecording, str], bool]:
    """(recording, key) -> created, for firmware_bridge.usb_import: builds the DICOM object (UIDs
    minted once) and stores it; a recording no DICOM ECG can hold is refused (FileRefused)."""
    from firmware_bridge.errors import FileRefused
    from uploader.errors import InvalidObjectError

    def enqueue(recording: EcgRecording, key: str) -> bool:
        recording = with_patient_check(recording, current_patient_id())
        try:
            return enqueue_recording(outbox, recording, config, key=key).created
        except InvalidObjectError as exc:
            raise FileRefused(f"cannot become a DICOM ECG: {exc}") from None

    return enqueue


def import_files(
    outbox: Outbox,
    config: Config,
    roots: Iterable[str | Path],
    *,
    current_patient_id: CurrentPatient = _no_current_patient,
    progress: Callable | None = None,
) -> ImportSummary:
    """Import every ECG file under `roots`, each once (by content hash)."""
    from firmware_bridge.usb_import import import_paths

    return import_paths(
        roots,
        is_known=lambda key: outbox.find(key) is not None,
        enqueue=file_enqueuer(outbox, config, current_patient_id),
        local_tz=local_zone(),
        now=lambda: dt.datetime.now(dt.timezone.utc),
        progress=progress,
    )


def usb_import_watcher(
    config: Config, outbox: Outbox, current_patient_id: CurrentPatient = _no_current_patient
) -> FolderWatcher:
    """A FolderWatcher over `usb_import.folders`; call its poll() every few seconds (or on a
    udev 'add' event for a mass-storage device mounted there)."""
    from firmware_bridge.usb_import import FolderWatcher

    def run(roots: Iterable[str | Path]) -> ImportSummary:
        return import_files(outbox, config, roots, current_patient_id=current_patient_id)

    return FolderWatcher(config.usb_import.folders, run)


# -- the clinic-LAN receiver: objects stored as received ------------------------------------------


def lan_object_store(
    outbox: Outbox, current_patient_id: CurrentPatient = _no_current_patient
) -> Callable[[ReceivedObject], None]:
    """ReceivedObject -> durable outbox item, for firmware_bridge.dicom_receiver: the object is
    stored as received (its bytes, its UIDs); the SOP Instance UID is the key, so a cart that
    sends the same object again gets Success without a second item. A patient other than the
    gateway's current one is flagged in the item's meta (the object itself is not touched)."""

    def store(obj: ReceivedObject) -> None:
        current = current_patient_id()
        mismatch = bool(current and obj.patient and obj.patient["patient_id"] != current)
        meta = ecg_item_meta(
            sop_class_uid=obj.sop_class_uid,
            sop_instance_uid=obj.sop_instance_uid,
            study_uid=obj.study_uid,
            series_uid=obj.series_uid,
            source_format=LAN_SOURCE_FORMAT,
            flags=[PATIENT_MISMATCH] if mismatch else [],
            unassigned=obj.patient is None,
            transfer_syntax=obj.transfer_syntax,
            calling_ae=obj.calling_ae,
        )
        outbox.add(
            Kind.DICOM,
            "dicom-sop:" + obj.sop_instance_uid,
            obj.data,
            priority=Priority.ROUTINE,
            meta=meta,
            patient=obj.patient,
        )

    return store


def start_lan_receiver(
    config: Config, outbox: Outbox, current_patient_id: CurrentPatient = _no_current_patient
) -> DicomReceiver | None:
    """The clinic-LAN storage SCP from `lan_receiver.*`, started; None when disabled."""
    from firmware_bridge.dicom_receiver import DicomReceiver, settings_from

    section = config.lan_receiver
    if not section.enabled:
        return None
    receiver = DicomReceiver(
        settings_from(
            section.ae_title,
            section.port,
            section.allowed_callers,
            section.sop_classes,
            host=section.host,
            timeout_s=config.reading_center.timeout_s,
            max_object_bytes=max(1, section.max_object_mb) * 2**20,
        ),
        lan_object_store(outbox, current_patient_id),
    )
    receiver.start()
    return receiver
