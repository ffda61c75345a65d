"""Which ECG format a file is, and one entry point that decodes any of them.

Detection looks at the bytes first (DICOM preamble, aECG root element, SCP section 0,
Contec header, zip signature) and at the file name only to break ties, so a renamed file
still decodes and a file that is nothing we know is refused with a clear message.

Each decoder's module is imported when its format is first met: a clinic whose cart sends
DICOM never loads the aECG reader's XML parser or the SCP reader (~0.9 MB of the acquire
service's RSS, whose goal is 64 MB; bench/soak.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
from collections.abc import Callable

from devices.ecg.recording import EcgRecording
from devices.errors import NotAnEcgError
from devices.identity import (
    DEVICE_CLOCK_BACKWARDS,
    DEVICE_CLOCK_RESET,
    DEVICE_CLOCK_TOLERANCE,
    DEVICE_TIME_AHEAD,
    EARLIEST_PLAUSIBLE,
    TimeSource,
)

FORMATS: tuple[str, ...] = ("scp", "aecg", "dicom", "contec", "npz")
# file name endings that name a format (lower case); used when the bytes are not conclusive
EXTENSIONS: dict[str, str] = {
    ".scp": "scp",
    ".xml": "aecg",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".ecg": "contec",
    ".npz": "npz",
}
_ZIP = b"PK\x03\x04"
# format -> (module, function): each taking (data, *, local_tz, received_at); npz carries its own times
_DECODERS: dict[str, tuple[str, str]] = {
    "dicom": ("devices.ecg.dicom_input", "read_dicom_ecg"),
    "scp": ("devices.ecg.scp", "read_scp"),
    "aecg": ("devices.ecg.aecg", "read_aecg"),
    "contec": ("devices.ecg.contec", "read_contec"),
}


def _extension_format(filename: str) -> str | None:
    name = filename.lower()
    return next((fmt for ext, fmt in EXTENSIONS.items() if name.endswith(ext)), None)


def detect_format(data: bytes, filename: str = "") -> str:
    """One of FORMATS, or ProtocolError when the bytes are no ECG format we read."""
    head = bytes(data[:4096])
    from devices.ecg.dicom_input import looks_like_dicom

    if looks_like_dicom(head):
        return "dicom"
    if b"AnnotatedECG" in head:  # aECG's root element: its reader (and XML parser) only then
        from devices.ecg.aecg import looks_like_aecg

        if looks_like_aecg(head):
            return "aecg"
    from devices.ecg.scp import looks_like_scp

    if looks_like_scp(head):
        return "scp"
    from devices.ecg.contec import looks_like_contec

    if looks_like_contec(data):
        return "contec"
    if head.startswith(_ZIP) and _extension_format(filename) == "npz":
        return "npz"
    by_name = _extension_format(filename)
    # An .SCP that fails the structural check is still handed to the SCP decoder, which says
    # precisely what is wrong (e.g. a handheld's non-conforming record length).
    if by_name in ("scp", "contec", "dicom"):
        return by_name
    shown = filename or "the file"
    raise NotAnEcgError(
        f"{shown} is not an ECG file this gateway reads (SCP-ECG, HL7 aECG XML, "
        "DICOM ECG, Contec ECG90A .ECG, or gateway .npz)"
    )


def _decoder(fmt: str) -> Callable[..., EcgRecording]:
    """`fmt`'s decoding function, its module imported the first time it is asked for."""
    module, function = _DECODERS[fmt]
    decode: Callable[..., EcgRecording] = getattr(importlib.import_module(module), function)
    return decode


def decode_ecg(
    data: bytes, filename: str = "", *, local_tz: dt.tzinfo = dt.timezone.utc, received_at: dt.datetime | None = None
) -> EcgRecording:
    """Decode any supported ECG file.

    `local_tz`: the zone of the cart's clock, for times written without one. `received_at`:
    used (TimeSource.GATEWAY_RECEIPT) only when the file carries no acquisition time.
    Raises ProtocolError (or UnsupportedFeatureError) and nothing else for bad bytes.
    """
    fmt = detect_format(data, filename)
    if fmt == "npz":  # the gateway's own files carry their times and zone
        from devices.ecg.npz import read_npz

        return read_npz(data)
    return believable_time(_decoder(fmt)(data, local_tz=local_tz, received_at=received_at), received_at)


@dataclasses.dataclass(frozen=True)
class JudgedTime:
    """A file's acquisition time as the gateway takes it (`judged_time`)."""

    acquired_at: dt.datetime
    time_source: TimeSource
    flags: tuple[str, ...] = ()  # added to the recording's (or item's) flags; none: believed as it is


def believable_time(recording: EcgRecording, received_at: dt.datetime | None) -> EcgRecording:
    """`recording` with its time judged by `judged_time` (the one rule, also for objects a cart
    sends over the clinic LAN, which are forwarded as sent and never decoded to a recording)."""
    judged = judged_time(recording.acquired_at, recording.time_source, received_at)
    if not judged.flags:
        return recording
    return dataclasses.replace(
        recording,
        acquired_at=judged.acquired_at,
        time_source=judged.time_source,
        flags=(*recording.flags, *judged.flags),
    )


def judged_time(
    acquired_at: dt.datetime,
    time_source: TimeSource,
    received_at: dt.datetime | None,
    *,
    newest_from_device: dt.datetime | None = None,
) -> JudgedTime:
    """A file's acquisition time, judged against the gateway's receipt time (passed in, trusted
    only from EARLIEST_PLAUSIBLE on: a gateway whose clock is not set yet judges nothing).

    - Later than the file's arrival (a cart clock set ahead): the receipt time stands in
      (TimeSource.GATEWAY_RECEIPT, "acquisition was earlier") and the device's time is kept as
      the flag "device-time-ahead:<ISO time>".
    - Before EARLIEST_PLAUSIBLE (a cart clock reset, e.g. to 2000-01-01): the cart's time is kept
      (there is no better one; the receipt time of a stick's files says nothing of when they were
      recorded) under TimeSource.DEVICE_CLOCK_UNTRUSTED, flagged "device-clock-reset" so the
      doctor is told to set the cart's clock. Older files of a genuine import (a stick with last
      year's recordings) are after EARLIEST_PLAUSIBLE and believed.
    - More than DEVICE_CLOCK_BACKWARDS before `newest_from_device`, the time of the newest ECG this
      device sent before (a cart reset to 2021-01-01 while the clinic is in 2026): the same as a
      reset. Given only by paths where a device sends each ECG as it records it (the clinic LAN),
      never for imports, whose old files are legitimate.
    """
    believed = JudgedTime(acquired_at, time_source)
    if received_at is None or received_at < EARLIEST_PLAUSIBLE or time_source is not TimeSource.FILE:
        return believed
    went_back = newest_from_device is not None and acquired_at < newest_from_device - DEVICE_CLOCK_BACKWARDS
    if acquired_at < EARLIEST_PLAUSIBLE or went_back:
        return JudgedTime(acquired_at, TimeSource.DEVICE_CLOCK_UNTRUSTED, (DEVICE_CLOCK_RESET,))
    if acquired_at <= received_at + DEVICE_CLOCK_TOLERANCE:
        return believed
    return JudgedTime(received_at, TimeSource.GATEWAY_RECEIPT, (f"{DEVICE_TIME_AHEAD}:{acquired_at.isoformat()}",))
