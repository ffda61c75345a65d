"""A plain NumPy `.npz` ECG layout (for tests, the demo and research carts that export NumPy).

Layout (`np.savez` / `np.savez_compressed`, no pickled objects). Required arrays:

| key               | type                                   | meaning                                   |
|-------------------|----------------------------------------|-------------------------------------------|
| samples           | integer array, shape (leads, samples)  | raw samples; µV = samples x uv_per_unit   |
| lead_names        | str array, shape (leads,)              | "I", "II", "V1", "V4R" ...                |
| sampling_rate_hz  | number, 0-d                            | samples per second per lead               |
| uv_per_unit       | number, 0-d                            | µV per sample unit                        |
| acquired_at       | str, 0-d                               | ISO-8601 with zone, "2024-05-01T09:30:00+03:00" |
| time_source       | str, 0-d                               | a devices.identity.TimeSource value ("device-clock", "gps" ...) |

Optional: `format_version` (int, 1); `device_manufacturer`, `device_model`, `device_serial`,
`device_address`, `device_software_version` (str); `patient_id`, `patient_name` ("Family^Given"),
`patient_birth_date` (ISO date), `patient_sex` ("M", "F", "O", ""), `patient_issuer` (str; the
other patient keys need `patient_id`); `derived_leads` (str array); `resampled_from_hz`
(number); `gaps` (integer array (k, 2): start, missing, see SampleGap); `stat` (bool);
`flags` (str array). Any other key is refused.

`read_npz` is pure: the bytes are parsed from memory, sizes are checked before anything is
decompressed, and every problem is a ProtocolError.
"""

from __future__ import annotations

import datetime as dt
import io
import lzma
import zipfile
import zlib
from typing import Any

import numpy as np

from devices.ecg.recording import EcgRecording, SampleGap
from devices.errors import InvalidRecordingError, ProtocolError, UnsupportedFeatureError
from devices.identity import POSSIBLE_YEARS, DeviceIdentity, Patient, TimeSource

FORMAT_VERSION = 1
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_ARRAY_BYTES = 64 * 1024 * 1024  # uncompressed, per member (zip bombs)
MAX_LEADS = 64
MAX_TEXT = 256
MAX_GAPS = 65536

REQUIRED = ("samples", "lead_names", "sampling_rate_hz", "uv_per_unit", "acquired_at", "time_source")
_DEVICE_KEYS = {
    "device_manufacturer": "manufacturer",
    "device_model": "model",
    "device_serial": "serial",
    "device_address": "address",
    "device_software_version": "software_version",
}
_PATIENT_KEYS = ("patient_id", "patient_name", "patient_birth_date", "patient_sex", "patient_issuer")
OPTIONAL = (
    "format_version",
    *_DEVICE_KEYS,
    *_PATIENT_KEYS,
    "derived_leads",
    "resampled_from_hz",
    "gaps",
    "stat",
    "flags",
)


def _load_npy(raw: bytes, name: str) -> np.ndarray:
    """One .npy member; its header is checked against the bytes before any array is allocated."""
    stream = io.BytesIO(raw)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ProtocolError(f"npz member {name!r} uses .npy version {version}")
    if dtype.hasobject:
        raise ProtocolError(f"npz member {name!r} holds Python objects (pickles are refused)")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(raw) - stream.tell():
        raise ProtocolError(f"npz member {name!r} declares {expected} bytes of data, has {len(raw) - stream.tell()}")
    stream.seek(0)
    return np.lib.format.read_array(stream, allow_pickle=False)


def _members(data: bytes) -> dict[str, np.ndarray]:
    if len(data) > MAX_FILE_BYTES:
        raise ProtocolError(f"npz of {len(data)} bytes is larger than {MAX_FILE_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            if len(set(names)) != len(names):
                raise ProtocolError("npz has duplicate members")
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise ProtocolError(f"npz member {info.filename!r} is not a .npy array")
                if info.file_size > MAX_ARRAY_BYTES:
                    raise ProtocolError(
                        f"npz member {info.filename!r} unpacks to {info.file_size} bytes (limit {MAX_ARRAY_BYTES})"
                    )
            arrays = {}
            for info in infos:
                # zipfile stops a member's reads at the directory's file_size (checked just
                # above); the read is bounded anyway, and _load_npy checks the length it got
                with archive.open(info) as member:
                    raw = member.read(MAX_ARRAY_BYTES)
                arrays[info.filename[:-4]] = _load_npy(raw, info.filename)
            return arrays
    except ProtocolError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        OverflowError,
        MemoryError,
        UnicodeDecodeError,
        RuntimeError,
        zlib.error,
        lzma.LZMAError,
    ) as exc:
        # RuntimeError: zipfile's "encrypted, password required"; ValueError covers pickles
        raise ProtocolError(f"not a readable npz file: {exc}") from exc


def _scalar(arrays: dict[str, np.ndarray], key: str) -> Any:
    value = arrays[key]
    if value.shape != ():
        raise ProtocolError(f"{key} must be a single value, not shape {value.shape}")
    return value.item()


def _text(arrays: dict[str, np.ndarray], key: str, default: str = "") -> str:
    if key not in arrays:
        return default
    if arrays[key].dtype.kind != "U":
        raise ProtocolError(f"{key} must be a string, not {arrays[key].dtype}")
    value = str(_scalar(arrays, key))
    if len(value) > MAX_TEXT:
        raise ProtocolError(f"{key} is longer than {MAX_TEXT} characters")
    return value


def _number(arrays: dict[str, np.ndarray], key: str) -> float:
    value = arrays[key]
    if value.dtype.kind not in "iuf":
        raise ProtocolError(f"{key} must be a number, not {value.dtype}")
    number = float(_scalar(arrays, key))
    if not np.isfinite(number) or number <= 0:
        raise ProtocolError(f"{key} must be a positive finite number, not {number!r}")
    return number


def _texts(arrays: dict[str, np.ndarray], key: str) -> tuple[str, ...]:
    if key not in arrays:
        return ()
    value = arrays[key]
    if value.dtype.kind != "U" or value.ndim != 1:
        raise ProtocolError(f"{key} must be a 1-D string array, not {value.dtype} {value.shape}")
    if len(value) > MAX_LEADS or any(len(str(v)) > MAX_TEXT for v in value):
        raise ProtocolError(f"{key} has too many or too long entries")
    return tuple(str(v) for v in value)


def _aware(text: str, key: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ProtocolError(f"{key} is not ISO-8601: {text!r}") from exc
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ProtocolError(f"{key} has no time zone: {text!r}")
    if moment.year not in POSSIBLE_YEARS:
        raise ProtocolError(f"{key} {text!r} is no date an ECG was taken")
    return moment


def _patient(arrays: dict[str, np.ndarray]) -> Patient | None:
    if "patient_id" not in arrays:
        if any(k in arrays for k in _PATIENT_KEYS):
            raise ProtocolError("patient fields without patient_id")
        return None
    birth = _text(arrays, "patient_birth_date")
    try:
        birth_date = dt.date.fromisoformat(birth) if birth else None
    except ValueError as exc:
        raise ProtocolError(f"patient_birth_date is not an ISO date: {birth!r}") from exc
    if birth_date is not None and birth_date.year not in POSSIBLE_YEARS:
        raise ProtocolError(f"patient_birth_date {birth!r} is no date of birth")
    return Patient(
        patient_id=_text(arrays, "patient_id"),
        name=_text(arrays, "patient_name"),
        birth_date=birth_date,
        sex=_text(arrays, "patient_sex"),
        issuer=_text(arrays, "patient_issuer"),
    )


def _gaps(arrays: dict[str, np.ndarray]) -> tuple[SampleGap, ...]:
    if "gaps" not in arrays:
        return ()
    value = arrays["gaps"]
    if value.dtype.kind not in "iu" or value.ndim != 2 or value.shape[1] != 2:
        raise ProtocolError(f"gaps must be an integer array (k, 2), not {value.dtype} {value.shape}")
    if len(value) > MAX_GAPS:
        raise ProtocolError(f"{len(value)} gaps (at most {MAX_GAPS})")
    return tuple(SampleGap(int(start), int(missing)) for start, missing in value.tolist())


def read_npz(data: bytes) -> EcgRecording:
    """Decode an .npz ECG (layout in the module docstring), or raise ProtocolError."""
    arrays = _members(data)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ProtocolError(f"npz lacks {', '.join(missing)}")
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise UnsupportedFeatureError(f"npz has keys this reader does not know: {', '.join(unknown)}")
    if "format_version" in arrays:
        version = arrays["format_version"]
        if version.dtype.kind not in "iu" or _scalar(arrays, "format_version") != FORMAT_VERSION:
            raise UnsupportedFeatureError(f"npz format_version {version!r} is not {FORMAT_VERSION}")

    samples = arrays["samples"]
    if samples.dtype.kind not in "iu" or samples.ndim != 2:
        raise ProtocolError(f"samples must be a 2-D integer array, not {samples.dtype} {samples.shape}")
    if not 1 <= samples.shape[0] <= MAX_LEADS:
        raise ProtocolError(f"{samples.shape[0]} leads (1-{MAX_LEADS} allowed)")
    lead_names = _texts(arrays, "lead_names")
    try:
        time_source = TimeSource(_text(arrays, "time_source"))
    except ValueError as exc:
        raise ProtocolError(f"unknown time_source {_text(arrays, 'time_source')!r}") from exc
    stat = False
    if "stat" in arrays:
        if arrays["stat"].dtype.kind != "b":
            raise ProtocolError("stat must be a boolean")
        stat = bool(_scalar(arrays, "stat"))
    device = DeviceIdentity(**{field: _text(arrays, key) for key, field in _DEVICE_KEYS.items()})
    try:
        return EcgRecording(
            samples=np.ascontiguousarray(samples),
            lead_names=lead_names,
            sampling_rate_hz=_number(arrays, "sampling_rate_hz"),
            uv_per_unit=_number(arrays, "uv_per_unit"),
            acquired_at=_aware(_text(arrays, "acquired_at"), "acquired_at"),
            time_source=time_source,
            device=device,
            patient=_patient(arrays),
            derived_leads=frozenset(_texts(arrays, "derived_leads")),
            source_format="npz",
            resampled_from_hz=(_number(arrays, "resampled_from_hz") if "resampled_from_hz" in arrays else None),
            gaps=_gaps(arrays),
            stat=stat,
            flags=_texts(arrays, "flags"),
        )
    except InvalidRecordingError as exc:
        raise ProtocolError(f"inconsistent npz recording: {exc}") from exc


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()


def write_npz(recording: EcgRecording) -> bytes:
    """The recording in the layout `read_npz` reads (deterministic bytes, for tests and the demo)."""
    arrays: dict[str, np.ndarray] = {
        "format_version": np.array(FORMAT_VERSION),
        "samples": recording.samples,
        "lead_names": np.array(recording.lead_names, dtype=str),
        "sampling_rate_hz": np.array(float(recording.sampling_rate_hz)),
        "uv_per_unit": np.array(float(recording.uv_per_unit)),
        "acquired_at": np.array(recording.acquired_at.isoformat()),
        "time_source": np.array(recording.time_source.value),
    }
    device = recording.device
    for key, field in _DEVICE_KEYS.items():
        if getattr(device, field):
            arrays[key] = np.array(getattr(device, field))
    patient = recording.patient
    if patient is not None:
        arrays["patient_id"] = np.array(patient.patient_id)
        for key, text in (
            ("patient_name", patient.name),
            ("patient_sex", patient.sex),
            ("patient_issuer", patient.issuer),
            ("patient_birth_date", patient.birth_date.isoformat() if patient.birth_date else ""),
        ):
            if text:
                arrays[key] = np.array(text)
    if recording.derived_leads:
        arrays["derived_leads"] = np.array(sorted(recording.derived_leads), dtype=str)
    if recording.resampled_from_hz is not None:
        arrays["resampled_from_hz"] = np.array(float(recording.resampled_from_hz))
    if recording.gaps:
        arrays["gaps"] = np.array([(g.start, g.missing) for g in recording.gaps], dtype=np.int64)
    if recording.stat:
        arrays["stat"] = np.array(True)
    if recording.flags:
        arrays["flags"] = np.array(recording.flags, dtype=str)

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            # a fixed timestamp keeps the bytes reproducible
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, _npy(value))
    return buffer.getvalue()
