"""An ECG cart's files as the ECG tests drive them: brought on its USB stick, stored by the
gateway's file intake (`file_enqueuer`, as `lastmile import` does) with the patients the check-in
has now; and the DICOM object the outbox keeps of one, as the county will get it."""

from __future__ import annotations

import datetime as dt
import io
import warnings

import pydicom

from devices.ecg.recording import EcgRecording
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.ecg.intake import file_enqueuer
from uploader.outbox import Outbox, OutboxItem


def arrives_from_the_usb_stick(
    config: Config, recording: EcgRecording, key: str, *, stat: bool = False, judged: Config | None = None
) -> OutboxItem:
    """`recording` stored under `key` as from the cart's USB stick (`stat`: `lastmile import
    --stat`), judged by `judged`'s ECG settings (`config`'s by default). Its outbox item."""
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        with open_outbox(config) as outbox:
            now = dt.datetime.now(dt.timezone.utc)
            enqueue = file_enqueuer(
                outbox,
                judged or config,
                lambda: context.patient_ids(now),
                stat=stat,
                checked_in_name=lambda pid: context.known_name(pid, now),
            )
            assert enqueue(recording, key)
            item = outbox.find(key)
            assert item is not None
            return item
    finally:
        context.close()


def stored_dataset(outbox: Outbox, item_id: int) -> pydicom.Dataset:
    """The DICOM object `outbox` keeps for item `item_id`: what the county gets."""
    item = outbox.get(item_id)
    assert item is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cart's malformed UIDs
        return pydicom.dcmread(io.BytesIO(outbox.read_payload(item)))
