"""Contec ECG90A native files (.ECG), as the cart writes them to its memory / USB stick.

Layout (../shared/ecg/MANIFEST.md, and the reverse-engineered export tool of the same files):
a 43-byte header (case number, "YYYY-MM-DD HH:MM:SS", patient name, sex, age, weight),
8 interleaved little-endian 16-bit series at 800 Hz, a 37-byte footer. A sample is
(value - 2048) counts of 5000 nV; 0x6800 means "no data" (electrode not attached).

Which limb leads are stored: the series are II, III, V1..V6 — not I, II. The cart's own
export (the reference CSV beside the test file) computes I = II - III from the first two series,
and only that reading gives a physiologically plausible axis for both shared recordings
(with I, II the two files would show axes of about -60 and -100 degrees). I, aVR, aVL, aVF are
derived with that export's rounding (leads.derive_limb_leads(rounding="contec")) and marked
derived.

Empty leads: a series that holds only "no data" (chest electrodes not attached, as in
0000037.ECG), or "no data" in the middle of a recording, is dropped from the recording rather
than filled with invented values; the recording carries the flag
"leads-not-recorded:V1,V2,..." so the doctor sees which leads are missing.
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np

from devices.ecg.leads import derive_limb_leads
from devices.ecg.recording import EcgRecording
from devices.errors import InvalidRecordingError, ProtocolError
from devices.identity import POSSIBLE_YEARS, DeviceIdentity, TimeSource

HEADER_LEN = 43
FOOTER_LEN = 37
SERIES = 8
SAMPLE_RATE_HZ = 800.0
UV_PER_COUNT = 5.0  # 5000 nV
OFFSET = 2048
NO_DATA = 0x6800
SERIES_LEADS: tuple[str, ...] = ("II", "III", "V1", "V2", "V3", "V4", "V5", "V6")
DEVICE = DeviceIdentity(manufacturer="Contec", model="ECG90A")
_TIMESTAMP = re.compile(rb"^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})$")


def _asciiz(raw: bytes) -> bytes:
    return raw.split(b"\x00", 1)[0]


def looks_like_contec(data: bytes) -> bool:
    """Header shape: a case number of digits, then the acquisition time stamp at byte 10."""
    if len(data) < HEADER_LEN + FOOTER_LEN + 2 * SERIES:
        return False
    case = _asciiz(data[0:8])
    return bool(case) and case.isdigit() and _TIMESTAMP.match(_asciiz(data[10:30])) is not None


def read_contec(
    data: bytes, *, local_tz: dt.tzinfo = dt.timezone.utc, received_at: dt.datetime | None = None
) -> EcgRecording:
    """Decode an ECG90A file. `local_tz` is the cart's clock zone (the file has none)."""
    data = bytes(data)
    payload = len(data) - HEADER_LEN - FOOTER_LEN
    if payload < 2 * SERIES or payload % (2 * SERIES):
        raise ProtocolError(
            f"not a Contec ECG90A file: {len(data)} bytes is not a 43-byte header + 37-byte footer "
            "+ whole 16-byte sample rows (file truncated?)"
        )
    rows = np.frombuffer(data, dtype="<u2", count=payload // 2, offset=HEADER_LEN).reshape(-1, SERIES)
    # the export tool stops at the first all-zero row: it marks the end of the recording
    zero_rows = np.nonzero(~rows.any(axis=1))[0]
    if zero_rows.size:
        rows = rows[: zero_rows[0]]
    if rows.shape[0] == 0:
        raise ProtocolError("Contec ECG90A file holds no samples")
    missing = rows == NO_DATA
    if np.any((rows > 4095) & ~missing):
        raise ProtocolError("not a Contec ECG90A file: samples exceed the cart's 12-bit range")

    keep = [i for i in range(SERIES) if not missing[:, i].any()]
    dropped = [SERIES_LEADS[i] for i in range(SERIES) if i not in keep]
    if not keep:
        raise ProtocolError("Contec ECG90A file holds no lead with data (all electrodes off?)")
    samples = (rows[:, keep].astype(np.int16) - OFFSET).T.copy()
    names = tuple(SERIES_LEADS[i] for i in keep)

    stamp = _TIMESTAMP.match(_asciiz(data[10:30]))
    acquired_at, source = None, TimeSource.FILE
    if stamp and int(stamp.group(1)) in POSSIBLE_YEARS:  # else a garbled clock: the receipt time stands in
        try:
            year, month, day, hour, minute, second = (int(g) for g in stamp.groups())
            acquired_at = dt.datetime(year, month, day, hour, minute, second, tzinfo=local_tz)
        except ValueError:
            acquired_at = None
    if acquired_at is None:
        if received_at is None:
            raise ProtocolError("Contec ECG90A file has no readable acquisition time")
        acquired_at, source = received_at, TimeSource.GATEWAY_RECEIPT
    all_samples, all_names, derived = derive_limb_leads(samples, names, rounding="contec")
    flags = (f"leads-not-recorded:{','.join(dropped)}",) if dropped else ()
    try:
        # The file names the patient (name, sex, age) but carries no identifier: the
        # recording stays unassigned (patient None) for the doctor.
        return EcgRecording(
            samples=all_samples,
            lead_names=all_names,
            sampling_rate_hz=SAMPLE_RATE_HZ,
            uv_per_unit=UV_PER_COUNT,
            acquired_at=acquired_at,
            time_source=source,
            device=DEVICE,
            derived_leads=derived,
            source_format="contec",
            flags=flags,
        )
    except InvalidRecordingError as exc:
        raise ProtocolError(f"Contec ECG90A: {exc}") from None
