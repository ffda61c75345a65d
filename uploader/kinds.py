"""The outbox's item kinds (uploader.outbox re-exports them): a module of their own, so that what
only names them (lastmile.services.metered, in the metrics exporter) does not load the outbox and
sqlite-utils with it."""

from __future__ import annotations

import enum


class Kind(enum.StrEnum):
    """What an item is, which decides who sends it (one sender per kind)."""

    DICOM = "dicom"  # a Part-10 ECG object for the reading center (uploader/ecg_forwarder.py)
    FHIR_BUNDLE = "fhir-bundle"  # a FHIR R4 transaction bundle (uploader/fhir_forwarder.py)
