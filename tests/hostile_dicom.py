"""DICOM objects an attacker on the clinic LAN would send, and the memory a process spent on them.

- `deflate_bomb(n)`: a 12-lead ECG object in Deflated Explicit VR Little Endian whose data set
  inflates to more than `n` bytes (a WaveformData element of zeros): 1 GiB takes about 1 MB.
- `oversized_object(n)`: the same object plain (Explicit VR LE), `n` bytes of waveform.
- `peak_rss_mb(pid)`: VmHWM (the peak resident set) of a live process, from /proc.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode

TWELVE_LEAD = "1.2.840.10008.5.1.4.1.1.9.1.1"
_WAVEFORM_DATA = (0x5400, 0x1010)
_CHUNK = b"\x00" * (1 << 20)


def _header(sop_instance_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = TWELVE_LEAD
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientName = "Bomb^Attacker"
    ds.PatientID = "P-BOMB"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "ECG"
    return ds


def _part10_head(sop_instance_uid: str, syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = TWELVE_LEAD
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.7433.1.1"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


def _waveform_element_header(length: int) -> bytes:
    group, element = _WAVEFORM_DATA
    return struct.pack("<HH2sHI", group, element, b"OW", 0, length)


def deflate_bomb(inflated_bytes: int) -> tuple[str, bytes]:
    """(SOP Instance UID, Part-10 bytes) of a deflated object inflating past `inflated_bytes`."""
    uid = generate_uid()
    zeros = -(-inflated_bytes // len(_CHUNK)) * len(_CHUNK)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(encode(_header(uid), False, True) or b"")]
    body.append(deflater.compress(_waveform_element_header(zeros)))
    body += [deflater.compress(_CHUNK) for _ in range(zeros // len(_CHUNK))]
    body.append(deflater.flush())
    data = b"".join(body)
    return uid, _part10_head(uid, DeflatedExplicitVRLittleEndian) + data + (b"\x00" if len(data) % 2 else b"")


def oversized_object(waveform_bytes: int) -> tuple[str, bytes]:
    """(SOP Instance UID, Part-10 bytes) of a plain object carrying `waveform_bytes` of samples."""
    uid = generate_uid()
    size = waveform_bytes + waveform_bytes % 2
    head = _part10_head(uid, ExplicitVRLittleEndian) + (encode(_header(uid), False, True) or b"")
    return uid, head + _waveform_element_header(size) + bytes(size)


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size (VmHWM) of process `pid` so far, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmHWM for process {pid}")
