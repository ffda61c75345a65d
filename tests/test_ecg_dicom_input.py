"""DICOM ECG input: the ECGToolkit file (malformed UIDs), pydicom's Mortara ECG, vendor
variants (other waveform classes, MDC codes, extra channels, group order), channel scaling,
refusals and fuzzing."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import io
import warnings

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from devices.ecg.dicom_input import read_dicom_ecg
from devices.ecg.recording import SampleGap
from devices.ecg.scp import read_scp
from devices.errors import ProtocolError, UnsupportedFeatureError
from devices.identity import Patient, TimeSource
from tests.conftest import shared_file
from tests.ecg_file_mutations import apply, decodes_or_refuses, mutations

GENERAL_ECG = "1.2.840.10008.5.1.4.1.1.9.1.2"
HEMODYNAMIC = "1.2.840.10008.5.1.4.1.1.9.2.1"


def _toolkit() -> bytes:
    return shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm").read_bytes()


def _mortara() -> bytes:
    with open(get_testdata_file("waveform_ecg.dcm"), "rb") as f:
        return f.read()


def _load(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), force=True)


def _dump(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def test_toolkit_file_equals_the_scp_of_the_same_ecg() -> None:
    r = read_dicom_ecg(_toolkit())
    scp = read_scp(shared_file("ecg", "scp", "ecgtoolkit_Example.scp").read_bytes())
    assert r.lead_names == scp.lead_names
    np.testing.assert_array_equal(r.microvolts(), scp.microvolts())
    assert r.n_samples == 5000  # the rhythm group, not the 600-sample median beat
    assert r.acquired_at == dt.datetime(2002, 11, 22, 9, 10, tzinfo=dt.timezone.utc)
    assert r.time_source is TimeSource.FILE
    assert r.patient == Patient("SBJ-123", "Clark", dt.date(1953, 5, 8), "M")
    assert r.source_format == "dicom"


def test_malformed_uids_do_not_stop_decoding() -> None:
    ds = _load(_toolkit())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert str(ds.SOPInstanceUID).endswith("..1") and str(ds.StudyInstanceUID).endswith(".")
    assert read_dicom_ecg(_toolkit()).n_leads == 12


def test_pydicom_mortara_ecg_equals_pydicom_scaling() -> None:
    r = read_dicom_ecg(_mortara())
    ds = _load(_mortara())
    expected = ds.waveform_array(0).T  # pydicom applies sensitivity, correction and baseline
    assert (r.n_samples, r.sampling_rate_hz, r.uv_per_unit) == (10000, 1000.0, 1.25)
    np.testing.assert_array_equal(r.microvolts(), expected)
    assert r.device.manufacturer == "Mortara Instrument, Inc."
    assert r.patient is not None and r.patient.patient_id == "642341" and r.patient.sex == "F"


def test_median_group_first_still_picks_rhythm() -> None:
    ds = _load(_mortara())
    ds.WaveformSequence = [ds.WaveformSequence[1], ds.WaveformSequence[0]]
    assert read_dicom_ecg(_dump(ds)).n_samples == 10000


def _with_pressure_channel(ds: Dataset) -> Dataset:
    """Add a non-ECG channel (arterial pressure, mmHg) to the rhythm group."""
    group = ds.WaveformSequence[0]
    n, c = group.NumberOfWaveformSamples, group.NumberOfWaveformChannels
    data = np.frombuffer(group.WaveformData, dtype="<i2").reshape(n, c)
    pressure = (np.arange(n) % 120).astype("<i2")[:, None]
    group.WaveformData = np.hstack([data, pressure]).astype("<i2").tobytes()
    channel = copy.deepcopy(group.ChannelDefinitionSequence[0])
    channel.ChannelSourceSequence[0].CodeValue = "2:4106"
    channel.ChannelSourceSequence[0].CodingSchemeDesignator = "MDC"
    channel.ChannelSourceSequence[0].CodeMeaning = "Arterial blood pressure"
    channel.ChannelSensitivityUnitsSequence[0].CodeValue = "mm[Hg]"
    group.ChannelDefinitionSequence.append(channel)
    group.NumberOfWaveformChannels = c + 1
    return ds


@pytest.mark.parametrize("sop_class", [GENERAL_ECG, HEMODYNAMIC])
def test_vendor_file_under_another_class_with_extra_channel(sop_class: str) -> None:
    ds = _with_pressure_channel(_load(_toolkit()))
    ds.SOPClassUID = sop_class
    r = read_dicom_ecg(_dump(ds))
    assert r.n_leads == 12
    np.testing.assert_array_equal(r.microvolts(), read_dicom_ecg(_toolkit()).microvolts())


def test_mdc_lead_codes() -> None:
    ds = _load(_toolkit())
    for channel in ds.WaveformSequence[0].ChannelDefinitionSequence:
        item = channel.ChannelSourceSequence[0]
        item.CodeValue = "2:" + item.CodeValue.rsplit("-", 1)[1]
        item.CodingSchemeDesignator = "MDC"
    r = read_dicom_ecg(_dump(ds))
    assert r.lead_names[:6] == ("I", "II", "III", "aVR", "aVL", "aVF")


def test_mdc_codes_79_to_85_are_not_scp_calibration_signals() -> None:
    """SCP-ECG's 79-85 are the calibration signals of V8..J; MDC 2:79-85 are no such thing, and
    the writer never sends them. The reader named a lead coded 2:79 "V8-cal" whatever its meaning
    said; now such a code counts for nothing and the meaning names the lead."""
    ds = _load(_toolkit())
    item = ds.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSourceSequence[0]
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "2:79", "MDC", "Lead I"
    assert read_dicom_ecg(_dump(ds)).lead_names == read_dicom_ecg(_toolkit()).lead_names


def test_units_correction_factor_and_baseline() -> None:
    reference = read_dicom_ecg(_toolkit()).microvolts()
    ds = _load(_toolkit())
    for channel in ds.WaveformSequence[0].ChannelDefinitionSequence:
        channel.ChannelSensitivity = "0.00125"
        channel.ChannelSensitivityUnitsSequence[0].CodeValue = "mV"
        channel.ChannelSensitivityCorrectionFactor = "2"
    ds.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelBaseline = "0.01"  # 10 µV
    r = read_dicom_ecg(_dump(ds))
    expected = reference.copy()
    expected[0] += 10
    np.testing.assert_allclose(r.microvolts(), expected, atol=1e-9)


def test_channels_with_different_sensitivities_are_exact() -> None:
    ds = _load(_toolkit())
    ds.WaveformSequence[0].ChannelDefinitionSequence[6].ChannelSensitivity = "1.25"
    r = read_dicom_ecg(_dump(ds))
    reference = read_dicom_ecg(_toolkit())
    assert r.uv_per_unit == 1.25
    v1 = r.lead_names.index("V1")  # channel 6 of the file is V1
    np.testing.assert_array_equal(r.microvolts()[v1], reference.microvolts()[v1] / 2)
    np.testing.assert_array_equal(np.delete(r.microvolts(), v1, 0), np.delete(reference.microvolts(), v1, 0))


def test_missing_sensitivity_is_refused() -> None:
    ds = _load(_toolkit())
    del ds.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity
    with pytest.raises(UnsupportedFeatureError, match="no channel sensitivity"):
        read_dicom_ecg(_dump(ds))


def test_truncated_waveform_data_is_refused() -> None:
    ds = _load(_toolkit())
    ds.WaveformSequence[0].WaveformData = ds.WaveformSequence[0].WaveformData[:1000]
    with pytest.raises(ProtocolError, match="truncated"):
        read_dicom_ecg(_dump(ds))


def test_huge_sample_count_is_refused_without_allocating() -> None:
    ds = _load(_toolkit())
    ds.WaveformSequence[0].NumberOfWaveformSamples = 4_000_000_000
    with pytest.raises(ProtocolError):
        read_dicom_ecg(_dump(ds))


def test_not_a_waveform_is_refused() -> None:
    ds = _load(_toolkit())
    del ds.WaveformSequence
    with pytest.raises(ProtocolError, match="no waveform"):
        read_dicom_ecg(_dump(ds))
    with pytest.raises(ProtocolError, match=r"no waveform|not readable"):
        read_dicom_ecg(b"\x00" * 128 + b"DICM" + b"\xff" * 50)


def test_time_zone_offset_attribute() -> None:
    ds = _load(_toolkit())
    ds.TimezoneOffsetFromUTC = "+0530"
    r = read_dicom_ecg(_dump(ds))
    assert r.acquired_at.utcoffset() == dt.timedelta(hours=5, minutes=30)


def test_no_patient_id_means_unassigned() -> None:
    ds = _load(_toolkit())
    ds.PatientID = ""
    assert read_dicom_ecg(_dump(ds)).patient is None


@settings(deadline=None, max_examples=250)
@given(ops=mutations())
def test_fuzz_toolkit_file(ops: list[tuple]) -> None:
    data = _toolkit()
    # the header holds the structure; most of the file is sample data
    decodes_or_refuses(
        read_dicom_ecg,
        apply(data, ops, hi=data.index(b"\x00\x54\x10\x10") + 64 if b"\x00\x54\x10\x10" in data else 4000),
    )


@settings(deadline=None, max_examples=200)
@given(ops=mutations())
def test_fuzz_mortara_file(ops: list[tuple]) -> None:
    decodes_or_refuses(read_dicom_ecg, apply(_mortara(), ops, hi=6000))


def _padded_mortara(rows: slice, channels: slice = slice(None)) -> tuple[bytes, np.ndarray]:
    """The Mortara ECG with Waveform Padding Value -32768 over `rows` x `channels` of its rhythm
    group (a cart's "no sample here"), and pydicom's µV of the untouched file."""
    ds = _load(_mortara())
    expected = ds.waveform_array(0).T
    group = ds.WaveformSequence[0]
    raw = np.frombuffer(group.WaveformData, dtype="<i2").reshape(int(group.NumberOfWaveformSamples), -1).copy()
    raw[rows, channels] = -32768
    group.WaveformData = raw.tobytes()
    group.add_new(0x5400100A, "OW", (-32768).to_bytes(2, "little", signed=True))  # Waveform Padding Value
    return _dump(ds), expected


def test_padding_rows_become_gaps_not_minus_41_mv() -> None:
    """Rows of Waveform Padding Value are samples that never arrived (the gateway's own objects
    pad gaps so): read as values they drew -41 mV cliffs across every lead of the ECG."""
    data, expected = _padded_mortara(slice(2000, 2050))
    r = read_dicom_ecg(data)
    assert r.gaps == (SampleGap(2000, 50),)
    assert r.n_samples == 10000 - 50
    np.testing.assert_array_equal(r.microvolts(), np.delete(expected, np.s_[2000:2050], axis=1))


def test_padding_in_one_lead_leaves_that_lead_out() -> None:
    data, expected = _padded_mortara(slice(3000, 3100), slice(7, 8))  # V2's electrode fell off
    r = read_dicom_ecg(data)
    assert "V2" not in r.lead_names and r.n_samples == 10000 and r.gaps == ()
    assert "leads-not-recorded:V2" in r.flags
    np.testing.assert_array_equal(r.lead("V1") * r.uv_per_unit, expected[6])


def test_our_own_object_with_a_gap_reads_back_with_the_gap() -> None:
    from tests.ecg_factories import make_recording
    from uploader.dicom_ecg import StationInfo, mint_uids, recording_to_dicom_bytes

    sent = dataclasses.replace(make_recording(), gaps=(SampleGap(500, 25),))
    back = read_dicom_ecg(recording_to_dicom_bytes(sent, mint_uids(), StationInfo()))
    assert back.gaps == sent.gaps and back.lead_names == sent.lead_names
    np.testing.assert_array_equal(back.microvolts(), sent.microvolts())


def test_our_unassigned_placeholder_is_no_patient() -> None:
    """An ECG the gateway sent unassigned carries a per-study placeholder Patient ID: read back
    (a copy on a stick, another gateway's object) it must stay unassigned and be held for the
    doctor, not filed under a patient called "UNASSIGNED-..."."""
    from tests.ecg_factories import make_recording
    from uploader.dicom_ecg import StationInfo, mint_uids, recording_to_dicom_bytes

    sent = make_recording(patient=None)
    back = read_dicom_ecg(recording_to_dicom_bytes(sent, mint_uids(), StationInfo()))
    assert back.patient is None


def test_unspecified_lead_code_keeps_the_channel_label() -> None:
    """A lead with no code of its own is coded "2:0 Unspecified lead" with its name in Channel
    Label (as the gateway's own builder writes CM5, CC5, Frank leads ...). The label was
    ignored: one such lead came out named "unspecified", two made the whole ECG refused."""
    ds = _load(_mortara())
    expected = ds.waveform_array(0).T
    channels = ds.WaveformSequence[0].ChannelDefinitionSequence
    for index, label in ((10, "CM5"), (11, "CC5")):  # V5, V6 re-labelled as bipolar chest leads
        source = channels[index].ChannelSourceSequence[0]
        source.CodeValue, source.CodingSchemeDesignator, source.CodeMeaning = "2:0", "MDC", "Unspecified lead"
        channels[index].ChannelLabel = label
    r = read_dicom_ecg(_dump(ds))
    assert r.lead_names[-2:] == ("CM5", "CC5")
    np.testing.assert_array_equal(r.lead("CM5") * r.uv_per_unit, expected[10])
