"""Every real ECG the suite has (under ../shared/ecg, and pydicom's own 12-lead ECG), and what a
cardiologist would say of each, decoded by the gateway's own decoders."""

from __future__ import annotations

from pathlib import Path

import pydicom

from devices.ecg.formats import decode_ecg
from devices.ecg.recording import EcgRecording
from tests.conftest import shared_file

# Every real ECG we have, and what a cardiologist would say of it.
GOOD = {  # name -> path parts under ../shared/ecg
    "ecgtoolkit-scp": ("scp", "ecgtoolkit_Example.scp"),
    "ecgtoolkit-aecg": ("aecg", "fda_hl7_Example_aECG.xml"),
    "ecgtoolkit-dicom": ("dicom", "ecgtoolkit_Example.dcm"),
    "welch-allyn-scp": ("scp", "abtahi_ECG_20170504_163507_123456789.SCP"),
    "contec-50": ("contec", "0000050.ECG"),  # limb leads only, atrial fibrillation ~120/min: readable
    "mortara-dicom": None,  # pydicom's waveform_ecg.dcm
}


def load(name: str) -> EcgRecording:
    """The real ECG `name` (a key of GOOD, or "contec-37"), decoded afresh."""
    parts = GOOD.get(name, ("contec", "0000037.ECG") if name == "contec-37" else None)
    path = Path(pydicom.data.get_testdata_file("waveform_ecg.dcm")) if parts is None else shared_file("ecg", *parts)
    return decode_ecg(path.read_bytes(), path.name)


_decoded: dict[str, EcgRecording] = {}


def recording(name: str) -> EcgRecording:
    """The real ECG `name`, decoded once per test process (the tests only read it)."""
    if name not in _decoded:
        _decoded[name] = load(name)
    return _decoded[name]
