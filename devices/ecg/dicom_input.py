"""DICOM waveform objects (12-lead ECG, General ECG, and vendor files that store ECG leads
under other waveform classes) to an EcgRecording.

The SOP class does not decide: any object with a Waveform Sequence whose channels are coded as
ECG leads (SCPECG "5.6.3-9-n", MDC "2:n", or a "Lead ..." meaning) is read. Of several
multiplex groups we take the rhythm group (label RHYTHM; otherwise an ORIGINAL group; the
longest), never the median beat. Per channel, physical value = stored * sensitivity *
correction factor + baseline (in the sensitivity units): channels are brought onto one exact
integer unit or refused. Non-ECG channels (pressure, respiration) are left out.

Malformed UIDs (trailing or doubled dots, as some converters write) do not stop decoding: the
recording does not carry the input's UIDs (the gateway mints its own for what it sends).
"""

from __future__ import annotations

import datetime as dt
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np

from devices.ecg.leads import (SCP_LEAD_NAMES, derive_limb_leads, lead_name_from_scp_code, normalise_lead_name,
                               require_unique)
from devices.ecg.recording import EcgRecording
from devices.ecg.scaling import Channel, to_common_unit
from devices.errors import InvalidRecordingError, ProtocolError, UnsupportedFeatureError
from devices.identity import DeviceIdentity, Patient, TimeSource

_DTYPES = {(8, "SB"): "i1", (8, "UB"): "u1", (16, "SS"): "i2", (16, "US"): "u2",
           (32, "SL"): "i4", (32, "UL"): "u4"}
_UNIT_TO_UV = {"uV": 1.0, "mV": 1000.0, "V": 1_000_000.0, "nV": 0.001}
_DT = re.compile(r"^(\d{4})(\d{2})(\d{2})(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$")
MAX_SAMPLES = 50_000_000  # samples x channels of one group, checked before any allocation


# CID 3001 "ECG Leads" in MDC form: "2:n" mostly follows the SCP-ECG lead numbers, but 31-38
# and 111-114 are the *derived* leads there (not SCP's calibration signals).
_MDC_DERIVED: dict[int, str] = {31: "I", 32: "II", **{33 + i: f"V{i + 1}" for i in range(6)},
                                111: "III", 112: "aVR", 113: "aVL", 114: "aVF"}


@dataclass(frozen=True, slots=True)
class _Lead:
    name: str
    index: int  # channel position in the group
    derived: bool  # the file says the lead was computed, not recorded


def _from_text(text: str) -> tuple[str, bool]:
    derived = text.upper().startswith("DERIVED ")
    return normalise_lead_name(text[8:] if derived else text), derived


def _lead_of(channel) -> tuple[str, bool] | None:
    """(lead name, derived) of a channel definition, None for a channel that is not an ECG lead."""
    source = channel.get("ChannelSourceSequence")
    if source:
        item = source[0]
        scheme = str(item.get("CodingSchemeDesignator", "")).upper()
        value = str(item.get("CodeValue", "")).strip()
        meaning = str(item.get("CodeMeaning", "")).strip()
        m = re.fullmatch(r"5\.6\.3-9-(\d+)", value)
        if scheme.startswith("SCPECG") and m:
            return lead_name_from_scp_code(int(m.group(1))), False
        m = re.fullmatch(r"2:(\d+)", value)
        if scheme == "MDC" and m:
            number = int(m.group(1))
            if number in _MDC_DERIVED:
                return _MDC_DERIVED[number], True
            if number in SCP_LEAD_NAMES and not 31 <= number <= 60:
                return lead_name_from_scp_code(number), False
        if meaning.upper().startswith(("LEAD", "MDC_ECG_LEAD", "DERIVED LEAD")):
            return _from_text(meaning)
    label = str(channel.get("ChannelLabel", "")).strip()
    if label.upper().startswith(("LEAD", "MDC_ECG_LEAD", "DERIVED LEAD")):
        return _from_text(label)
    return None


def _group_rank(group, n_ecg: int) -> tuple:
    label = str(group.get("MultiplexGroupLabel", "")).upper()
    originality = str(group.get("WaveformOriginality", "")).upper()
    samples = int(group.get("NumberOfWaveformSamples", 0) or 0)
    is_median = "MEDIAN" in label or "BEAT" in label
    return ("RHYTHM" in label, not is_median, originality == "ORIGINAL", n_ecg, samples)


def _parse_dt(text: str, local_tz: dt.tzinfo, default_offset: str = "") -> dt.datetime | None:
    m = _DT.match(text.strip())
    if not m:
        return None
    y, mo, d, h, mi, s = (int(g) if g else 0 for g in m.groups()[:6])
    micro = int((m.group(7) or "0").ljust(6, "0"))
    offset = m.group(8) or default_offset
    tz = local_tz
    if offset and re.fullmatch(r"[+-]\d{4}", offset):
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[3:5])
        if hours <= 14 and minutes < 60:
            tz = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
    try:
        return dt.datetime(y, mo, d, h, mi, s, micro, tzinfo=tz)
    except ValueError:
        return None


def _acquired_at(ds, local_tz: dt.tzinfo) -> dt.datetime | None:
    offset = str(ds.get("TimezoneOffsetFromUTC", "") or "").strip()
    for value in (ds.get("AcquisitionDateTime"),):
        if value:
            found = _parse_dt(str(value), local_tz, offset)
            if found is not None:
                return found
    for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime"),
                             ("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime")):
        date, time = ds.get(date_kw), ds.get(time_kw)
        if date and time:
            found = _parse_dt(str(date).strip() + str(time).strip(), local_tz, offset)
            if found is not None:
                return found
    return None


def _patient(ds) -> Patient | None:
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        return None
    birth = None
    text = str(ds.get("PatientBirthDate", "") or "").strip()
    if re.fullmatch(r"\d{8}", text):
        try:
            birth = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        except ValueError:
            birth = None
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return Patient(patient_id=patient_id, name=str(ds.get("PatientName", "") or "").strip(),
                   birth_date=birth, sex=sex if sex in ("M", "F", "O") else "",
                   issuer=str(ds.get("IssuerOfPatientID", "") or "").strip())


def _device(ds) -> DeviceIdentity:
    software = ds.get("SoftwareVersions", "")
    if software and not isinstance(software, str):
        software = "\\".join(str(s) for s in software)
    return DeviceIdentity(manufacturer=str(ds.get("Manufacturer", "") or "").strip(),
                          model=str(ds.get("ManufacturerModelName", "") or "").strip(),
                          serial=str(ds.get("DeviceSerialNumber", "") or "").strip(),
                          software_version=str(software or "").strip())


def _read_dataset(data: bytes):
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(bytes(data)), force=True)
            # touch what we need now, so that a malformed element fails here, typed
            ds.get("WaveformSequence")
        return ds
    except Exception as exc:  # pydicom raises many kinds on bad bytes; all mean "not readable"
        raise ProtocolError(f"DICOM file is not readable ({type(exc).__name__}: {exc})"[:300]) from None


def _scale(channel, lead: str) -> tuple[float, float]:
    """(µV per stored unit, µV of stored 0) of one channel."""
    sensitivity = channel.get("ChannelSensitivity")
    if sensitivity in (None, ""):
        raise UnsupportedFeatureError(f"DICOM ECG: lead {lead} has no channel sensitivity; its amplitude is unknown")
    units = channel.get("ChannelSensitivityUnitsSequence")
    unit = str(units[0].get("CodeValue", "")).strip() if units else ""
    if unit not in _UNIT_TO_UV:
        raise UnsupportedFeatureError(f"DICOM ECG: lead {lead} is in units {unit or 'unknown'!r}, not a voltage")
    correction = channel.get("ChannelSensitivityCorrectionFactor")
    baseline = channel.get("ChannelBaseline")
    try:
        factor = float(sensitivity) * (float(correction) if correction not in (None, "") else 1.0)
        offset = float(baseline) if baseline not in (None, "") else 0.0
    except (TypeError, ValueError):
        raise ProtocolError(f"DICOM ECG: lead {lead} has an unreadable sensitivity or baseline") from None
    if not (np.isfinite(factor) and np.isfinite(offset)) or factor == 0:
        raise ProtocolError(f"DICOM ECG: lead {lead} has sensitivity {factor}")
    # A negative sensitivity means an inverted channel: keep the sign in the samples.
    return factor * _UNIT_TO_UV[unit], offset * _UNIT_TO_UV[unit]


def read_dicom_ecg(data: bytes, *, local_tz: dt.tzinfo = dt.timezone.utc,
                   received_at: dt.datetime | None = None) -> EcgRecording:
    """Decode the rhythm ECG of a DICOM waveform object."""
    ds = _read_dataset(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every odd value it decodes lazily
            return _decode(ds, local_tz, received_at)
    except ProtocolError:
        raise
    except InvalidRecordingError as exc:
        raise ProtocolError(f"DICOM ECG: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        # pydicom parses elements lazily: a damaged element surfaces only when it is read, as
        # whatever exception its parser happens to raise (struct.error, EOFError, ...)
        raise ProtocolError(f"DICOM ECG: damaged element ({type(exc).__name__}: {exc})"[:300]) from None


def _decode(ds, local_tz: dt.tzinfo, received_at: dt.datetime | None) -> EcgRecording:
    groups = ds.get("WaveformSequence")
    if not groups:
        raise ProtocolError("DICOM file holds no waveform (no Waveform Sequence): not an ECG")
    best = None
    for group in groups:
        channels = group.get("ChannelDefinitionSequence") or []
        leads = [_Lead(found[0], i, found[1]) for i, ch in enumerate(channels) if (found := _lead_of(ch))]
        if leads and (best is None or _group_rank(group, len(leads)) > _group_rank(best[0], len(best[1]))):
            best = (group, leads)
    if best is None:
        raise ProtocolError("DICOM waveform holds no ECG leads (no channel is coded as an ECG lead)")
    group, leads = best
    n_channels = int(group.get("NumberOfWaveformChannels", 0) or 0)
    n_samples = int(group.get("NumberOfWaveformSamples", 0) or 0)
    channel_defs = group.get("ChannelDefinitionSequence")
    if n_channels != len(channel_defs) or n_channels < 1 or n_samples < 1:
        raise ProtocolError(f"DICOM ECG: group declares {n_channels} channels x {n_samples} samples "
                            f"but defines {len(channel_defs)} channels")
    if n_channels * n_samples > MAX_SAMPLES:
        raise UnsupportedFeatureError(f"DICOM ECG: {n_channels} x {n_samples} samples is more than we accept")
    bits = int(group.get("WaveformBitsAllocated", 0) or 0)
    interpretation = str(group.get("WaveformSampleInterpretation", "")).strip()
    if (bits, interpretation) not in _DTYPES:
        raise UnsupportedFeatureError(f"DICOM ECG: {bits}-bit {interpretation or '?'} samples are not supported")
    raw = group.get("WaveformData")
    if raw is None:
        raise ProtocolError("DICOM ECG: the waveform group has no Waveform Data")
    raw = bytes(raw)
    expected = n_channels * n_samples * bits // 8
    if len(raw) < expected:
        raise ProtocolError(f"DICOM ECG: waveform data has {len(raw)} bytes, {expected} expected (file truncated?)")
    try:
        rate = float(group.get("SamplingFrequency"))
    except (TypeError, ValueError):
        raise ProtocolError("DICOM ECG: sampling frequency is missing or unreadable") from None
    if not (np.isfinite(rate) and rate > 0):
        raise ProtocolError(f"DICOM ECG: sampling frequency {rate}")
    little = getattr(ds, "original_encoding", (None, True))[1]
    dtype = np.dtype(_DTYPES[(bits, interpretation)]).newbyteorder("<" if little in (None, True) else ">")
    matrix = np.frombuffer(raw, dtype=dtype, count=n_channels * n_samples).reshape(n_samples, n_channels)
    channels = []
    for lead in leads:
        definition = channel_defs[lead.index]
        skew = definition.get("ChannelSampleSkew")
        if skew not in (None, "") and float(skew) != 0:
            raise UnsupportedFeatureError(f"DICOM ECG: lead {lead.name} is sampled {skew} ms apart from the others")
        scale, offset = _scale(definition, lead.name)
        channels.append(Channel(raw=matrix[:, lead.index], uv_per_unit=scale, offset_uv=offset))
    names = [lead.name for lead in leads]
    require_unique(names, "DICOM ECG")
    samples, uv_per_unit = to_common_unit(channels, "DICOM ECG")

    start = _acquired_at(ds, local_tz)
    source = TimeSource.FILE
    if start is not None:
        shift = group.get("MultiplexGroupTimeOffset")
        if shift not in (None, ""):
            start += dt.timedelta(milliseconds=float(shift))
    elif received_at is not None:
        start, source = received_at, TimeSource.GATEWAY_RECEIPT
    else:
        raise ProtocolError("DICOM ECG carries no acquisition date/time")
    all_samples, all_names, derived = derive_limb_leads(samples, tuple(names))
    derived |= {lead.name for lead in leads if lead.derived}
    return EcgRecording(samples=all_samples, lead_names=all_names, sampling_rate_hz=rate,
                        uv_per_unit=uv_per_unit, acquired_at=start, time_source=source,
                        device=_device(ds), patient=_patient(ds), derived_leads=frozenset(derived),
                        source_format="dicom")


def looks_like_dicom(data: bytes) -> bool:
    """Part 10 preamble, or a raw data set that starts with a group 0002/0008 element."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    # the element number is little endian too: compare it as a number (as bytes, (0008,0005)
    # Specific Character Set - the usual first element - compared greater than 0x1000)
    return len(data) >= 8 and data[0:2] in (b"\x02\x00", b"\x08\x00") and \
        int.from_bytes(data[2:4], "little") < 0x1000
