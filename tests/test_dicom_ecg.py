"""The pure DICOM ECG builder, validated by dciodvfy and read back with pydicom."""

from __future__ import annotations

import datetime as dt
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr._concepts_dict import concepts

from devices.ecg.aecg import read_aecg
from devices.ecg.leads import MDC_LEADS
from devices.ecg.recording import STANDARD_12_LEADS, EcgRecording, SampleGap
from devices.ecg.scp import read_scp
from devices.identity import DeviceIdentity, Patient, TimeSource
from tests.dicom_ecg_samples import (
    ACQUIRED,
    CART,
    PATIENT,
    STATION,
    UIDS,
    raw_samples,
    read,
    recording,
    synthetic,
)
from tests.dicom_validation import dciodvfy_problems
from tests.scp_records import build_record, lead_body, rhythm_body
from uploader.dicom_ecg import (
    GENERAL_ECG,
    PADDING_VALUE,
    TWELVE_LEAD_ECG,
    EcgStudyUids,
    StationInfo,
    build_ecg_dataset,
    check_ecg_iod,
    choose_sop_class,
    encode_dataset,
    mint_uids,
    recording_to_dicom_bytes,
    unassigned_patient_id,
)
from uploader.errors import InvalidObjectError

# pydicom's waveform_ecg.dcm codes its leads in SCP-ECG numbers (5.6.3-9-N).
SCP_LEAD_NUMBER = {
    1: "I",
    2: "II",
    61: "III",
    62: "aVR",
    63: "aVL",
    64: "aVF",
    3: "V1",
    4: "V2",
    5: "V3",
    6: "V4",
    7: "V5",
    8: "V6",
}


def codes(ds: Dataset) -> list[tuple[str, str, str]]:
    return [
        (ch.ChannelLabel, ch.ChannelSourceSequence[0].CodeValue, ch.ChannelSourceSequence[0].CodeMeaning)
        for ch in ds.WaveformSequence[0].ChannelDefinitionSequence
    ]


def texts(ds: Dataset) -> list[str]:
    return [a.UnformattedTextValue for a in ds.WaveformAnnotationSequence if "UnformattedTextValue" in a]


def assert_valid(data: bytes) -> None:
    assert dciodvfy_problems(data) == []


@pytest.fixture(scope="module")
def pydicom_ecg() -> EcgRecording:
    """pydicom's own 12-lead, 1000 Hz ECG (Mortara ELI 250) as a recording."""
    ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    group = ds.WaveformSequence[0]
    microvolts = ds.waveform_array(0).T  # (leads, samples) in µV
    sensitivity = float(group.ChannelDefinitionSequence[0].ChannelSensitivity)
    samples = np.rint(microvolts / sensitivity).astype(np.int32)
    assert np.array_equal(samples * sensitivity, microvolts)
    leads = tuple(
        SCP_LEAD_NUMBER[int(ch.ChannelSourceSequence[0].CodeValue.rsplit("-", 1)[1])]
        for ch in group.ChannelDefinitionSequence
    )
    return EcgRecording(
        samples=samples,
        lead_names=leads,
        sampling_rate_hz=float(group.SamplingFrequency),
        uv_per_unit=sensitivity,
        acquired_at=dt.datetime(2013, 1, 25, 10, 59, 19, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        time_source=TimeSource.FILE,
        device=DeviceIdentity(manufacturer=str(ds.Manufacturer), model=str(ds.ManufacturerModelName)),
        patient=Patient(patient_id=str(ds.PatientID), birth_date=dt.date(1971, 1, 23), sex="F"),
        source_format="dicom",
    )


# ---------------------------------------------------------------------------- real data


def test_the_oracle_reports_the_problems_of_pydicoms_own_sample() -> None:
    """pydicom's waveform_ecg.dcm is no model: dciodvfy (exit code 0) finds errors in it."""
    problems = dciodvfy_problems(Path(get_testdata_file("waveform_ecg.dcm")))
    assert any(p.startswith("Error") and "Laterality" in p for p in problems)
    assert any("Warning - Unrecognized tag" in p for p in problems)  # tag-prefixed lines count


def test_pydicom_ecg_at_1000_hz_validates_and_round_trips(pydicom_ecg: EcgRecording) -> None:
    data = recording_to_dicom_bytes(pydicom_ecg, UIDS, STATION)
    assert_valid(data)
    ds = read(data)
    assert ds.SOPClassUID == TWELVE_LEAD_ECG
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.WaveformSequence[0].WaveformOriginality == "ORIGINAL"
    assert float(ds.WaveformSequence[0].SamplingFrequency) == 1000.0
    assert [c[0] for c in codes(ds)] == list(pydicom_ecg.lead_names)
    assert codes(ds)[2] == ("III", "2:61", "Lead III")
    assert np.array_equal(ds.waveform_array(0).T, pydicom_ecg.microvolts())


def test_pydicom_ecg_resampled_to_500_hz_says_so(pydicom_ecg: EcgRecording) -> None:
    pairs = pydicom_ecg.samples.astype(np.int64)
    halved = np.rint((pairs[:, 0::2] + pairs[:, 1::2]) / 2).astype(np.int32)  # average, decimate
    resampled = EcgRecording(
        samples=halved,
        lead_names=pydicom_ecg.lead_names,
        sampling_rate_hz=500.0,
        uv_per_unit=pydicom_ecg.uv_per_unit,
        acquired_at=pydicom_ecg.acquired_at,
        time_source=pydicom_ecg.time_source,
        device=pydicom_ecg.device,
        patient=pydicom_ecg.patient,
        source_format="dicom",
        resampled_from_hz=1000.0,
    )
    data = recording_to_dicom_bytes(resampled, UIDS, STATION)
    assert_valid(data)
    ds = read(data)
    group = ds.WaveformSequence[0]
    assert ds.SOPClassUID == TWELVE_LEAD_ECG
    assert group.WaveformOriginality == "DERIVED"
    assert float(group.SamplingFrequency) == 500.0 and group.NumberOfWaveformSamples == 5000
    assert all("resampled from 1000 Hz" in ch.ChannelDerivationDescription for ch in group.ChannelDefinitionSequence)
    assert any(t.startswith("Resampled from 1000 Hz to 500 Hz") for t in texts(ds))
    assert "resampled from 1000 Hz" in ds.ContributingEquipmentSequence[0].ContributionDescription
    assert np.array_equal(ds.waveform_array(0).T, resampled.microvolts())


# ---------------------------------------------------------------------------- IOD choice and leads


def test_fifteen_leads_make_a_general_ecg_with_true_labels_and_codes() -> None:
    leads = STANDARD_12_LEADS + ("V3R", "V4R", "V7")
    rec = recording(synthetic(15), leads)
    assert choose_sop_class(rec) == GENERAL_ECG
    data = recording_to_dicom_bytes(rec, UIDS, STATION)
    assert_valid(data)
    ds = read(data)
    assert ds.SOPClassUID == GENERAL_ECG
    assert codes(ds)[12:] == [("V3R", "2:11", "Lead V3R"), ("V4R", "2:12", "Lead V4R"), ("V7", "2:9", "Lead V7")]
    assert np.array_equal(ds.waveform_array(0).T, rec.microvolts())


def test_right_sided_lead_in_a_twelve_lead_set_makes_it_general() -> None:
    leads = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4R", "V5", "V6")
    rec = recording(synthetic(12), leads)
    assert choose_sop_class(rec) == GENERAL_ECG
    assert_valid(recording_to_dicom_bytes(rec, UIDS, STATION))


def test_unknown_label_is_kept_with_the_unspecified_lead_code() -> None:
    rec = recording(synthetic(3), ("I", "AVR", "chest-A"))
    ds = build_ecg_dataset(rec, UIDS, STATION)
    assert codes(ds) == [
        ("I", "2:1", "Lead I"),
        ("AVR", "2:62", "aVR, augmented voltage, right"),
        ("chest-A", "2:0", "Unspecified lead"),
    ]
    assert ds.SOPClassUID == GENERAL_ECG
    assert_valid(encode_dataset(ds))


def test_lead_subset_of_the_standard_twelve_stays_twelve_lead() -> None:
    rec = recording(synthetic(3), ("I", "II", "V2"))
    assert choose_sop_class(rec) == TWELVE_LEAD_ECG
    assert_valid(recording_to_dicom_bytes(rec, UIDS, STATION))


def test_more_than_16384_samples_makes_a_general_ecg() -> None:
    rec = recording(synthetic(12, n=20000))  # 40 s at 500 Hz
    assert choose_sop_class(rec) == GENERAL_ECG
    data = recording_to_dicom_bytes(rec, UIDS, STATION)
    assert_valid(data)
    assert read(data).WaveformSequence[0].NumberOfWaveformSamples == 20000


def test_derived_leads_are_coded_and_described() -> None:
    leads = STANDARD_12_LEADS + ("V7",)
    rec = recording(synthetic(13), leads, derived_leads=frozenset({"III", "aVR", "aVL", "aVF", "V7"}))
    data = recording_to_dicom_bytes(rec, UIDS, STATION)
    assert_valid(data)
    ds = read(data)
    channels = ds.WaveformSequence[0].ChannelDefinitionSequence
    assert codes(ds)[2] == ("III", "2:111", "Derived Lead III")
    assert codes(ds)[3][1:] == ("2:112", "Derived Lead aVR")
    assert channels[2].ChannelDerivationDescription == "computed, not recorded: III = II - I"
    assert codes(ds)[12] == ("V7", "2:9", "Lead V7")  # no derived code for V7: described instead
    assert "computed from other leads" in channels[12].ChannelDerivationDescription
    assert "ChannelDerivationDescription" not in channels[0]
    assert "Derived leads (computed, not recorded): III, aVR, aVL, aVF, V7" in texts(ds)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("rate", [150.0, 199.9, 1000.5, 2000.0])
def test_rate_outside_both_iods_is_refused(rate: float) -> None:
    rec = recording(synthetic(12, n=400), sampling_rate_hz=rate)
    with pytest.raises(InvalidObjectError, match="200-1000 Hz"):
        choose_sop_class(rec)
    with pytest.raises(InvalidObjectError):
        recording_to_dicom_bytes(rec, UIDS, STATION)


def test_thirty_leads_are_refused() -> None:
    rec = recording(synthetic(30, n=100), tuple(f"C{i}" for i in range(30)))
    with pytest.raises(InvalidObjectError, match="at most 24"):
        recording_to_dicom_bytes(rec, UIDS, STATION)


def test_a_gap_too_large_to_pad_is_refused() -> None:
    rec = recording(synthetic(12, n=100), gaps=(SampleGap(50, 10**9),))
    with pytest.raises(InvalidObjectError, match="MiB"):
        recording_to_dicom_bytes(rec, UIDS, STATION)


def test_naive_created_at_is_refused() -> None:
    with pytest.raises(InvalidObjectError, match="zone"):
        build_ecg_dataset(recording(synthetic(2)), UIDS, STATION, created_at=dt.datetime(2024, 5, 1))


@pytest.mark.parametrize(
    "breakage", ["rate", "interpretation", "bits", "channels", "samples", "data", "sop", "groups", "source"]
)
def test_check_ecg_iod_catches_what_dciodvfy_does_not(breakage: str) -> None:
    ds = build_ecg_dataset(recording(synthetic(12, n=600)), UIDS, STATION)
    check_ecg_iod(ds)
    group = ds.WaveformSequence[0]
    if breakage == "rate":
        group.SamplingFrequency = "150"
    elif breakage == "interpretation":
        group.WaveformSampleInterpretation = "SL"
    elif breakage == "bits":
        group.WaveformBitsAllocated = 32
    elif breakage == "channels":  # 14 channels in a 12-lead object
        group.ChannelDefinitionSequence.extend(group.ChannelDefinitionSequence[:2])
        group.NumberOfWaveformChannels = 14
        group.WaveformData = bytes(14 * 600 * 2)
    elif breakage == "samples":
        group.NumberOfWaveformSamples = 20000
        group.WaveformData = bytes(12 * 20000 * 2)
    elif breakage == "data":
        group.WaveformData = group.WaveformData[:-2]
    elif breakage == "sop":
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.9.1.3"  # ambulatory: not ours
    elif breakage == "groups":
        del ds.WaveformSequence
    elif breakage == "source":
        del group.ChannelDefinitionSequence[0].ChannelSourceSequence
    with pytest.raises(InvalidObjectError):
        check_ecg_iod(ds)


# ---------------------------------------------------------------------------- patient, STAT, time, equipment


def test_demographics_station_and_device_travel_in_the_object() -> None:
    ds = read(recording_to_dicom_bytes(recording(synthetic(12, n=500)), UIDS, STATION))
    assert (ds.PatientID, ds.IssuerOfPatientID, str(ds.PatientName)) == (
        "KE-123456",
        "Nairobi County Register",
        "Mwangi^Wanjirũ",
    )
    assert (ds.PatientBirthDate, ds.PatientSex) == ("19800102", "F")
    assert (ds.InstitutionName, ds.StationName) == ("Kibera Health Centre", "gw-kibera-01")
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.DeviceSerialNumber, ds.SoftwareVersions) == (
        "Acme Cardio",
        "Cart 5",
        "SN-0042",
        "2.1.7",
    )
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
        UIDS.study_uid,
        UIDS.series_uid,
        UIDS.sop_instance_uid,
    )
    assert ds.file_meta.MediaStorageSOPInstanceUID == UIDS.sop_instance_uid
    assert ds.ContributingEquipmentSequence[0].Manufacturer == "Lastmile"
    assert ds.StudyDescription == "12-lead ECG"
    assert "PatientComments" not in ds


def test_unassigned_patient_is_empty_and_clearly_marked() -> None:
    rec = recording(synthetic(12, n=500), patient=None)
    data = recording_to_dicom_bytes(rec, UIDS, STATION)
    assert_valid(data)
    ds = read(data)
    assert (str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex) == ("", "", "")
    assert ds.PatientID == unassigned_patient_id(UIDS) and ds.PatientID.startswith("UNASSIGNED-")
    assert ds.IssuerOfPatientID == "LASTMILE-UNASSIGNED"
    assert ds.PatientComments.startswith("UNASSIGNED")
    assert ds.StudyDescription == "12-lead ECG - UNASSIGNED PATIENT"
    assert any(t.startswith("UNASSIGNED PATIENT") for t in texts(ds))
    # one temporary patient per study, so a PACS never files two unassigned ECGs together
    other = EcgStudyUids("2.25.2001", "2.25.2002", "2.25.2003")
    assert unassigned_patient_id(other) != ds.PatientID


def test_stat_is_in_the_description_the_context_and_an_annotation() -> None:
    data = recording_to_dicom_bytes(recording(synthetic(12, n=500), stat=True, patient=None), UIDS, STATION)
    assert_valid(data)
    ds = read(data)
    assert ds.StudyDescription == "STAT 12-lead ECG - UNASSIGNED PATIENT"
    urgent = ds.AcquisitionContextSequence[0]
    assert urgent.ConceptNameCodeSequence[0].CodeValue == "260870009"
    assert urgent.ConceptCodeSequence[0].CodeValue == "103391001"
    assert "STAT: urgent read requested" in texts(ds)
    plain = read(recording_to_dicom_bytes(recording(synthetic(12, n=500)), UIDS, STATION))
    assert len(plain.AcquisitionContextSequence) == 0


def test_time_zone_and_time_source_are_recorded() -> None:
    kolkata = dt.timezone(dt.timedelta(hours=5, minutes=30))
    acquired = dt.datetime(2024, 12, 31, 23, 59, 59, tzinfo=kolkata)
    created = dt.datetime(2025, 1, 1, 0, 10, tzinfo=dt.timezone.utc)
    rec = recording(synthetic(12, n=500), acquired_at=acquired, time_source=TimeSource.GPS)
    data = recording_to_dicom_bytes(rec, UIDS, STATION, created_at=created)
    assert_valid(data)
    ds = read(data)
    assert ds.AcquisitionDateTime == "20241231235959+0530"
    assert (ds.StudyDate, ds.StudyTime, ds.ContentDate) == ("20241231", "235959", "20241231")
    assert ds.TimezoneOffsetFromUTC == "+0530"
    assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == ("20250101", "054000")
    assert ds.ContributingEquipmentSequence[0].ContributionDateTime == "20250101054000+0530"
    assert (ds.AcquisitionTimeSynchronized, ds.TimeSource, ds.TimeDistributionProtocol) == ("Y", "GPS", "GPS")
    assert ds.SynchronizationFrameOfReferenceUID == "1.2.840.10008.15.1.1"
    assert any(t.startswith("Acquisition time source: gps") for t in texts(ds))

    receipt = read(
        recording_to_dicom_bytes(recording(synthetic(12, n=500), time_source=TimeSource.GATEWAY_RECEIPT), UIDS, STATION)
    )
    assert (receipt.AcquisitionTimeSynchronized, receipt.TimeSource) == ("N", "GATEWAY RECEIPT")
    assert "TimeDistributionProtocol" not in receipt
    assert receipt.AcquisitionDateTime == "20240501093000.250000+0300"
    # without created_at there is no creation time at all: no clock inside the builder
    assert "InstanceCreationDate" not in receipt and "InstanceCreationTime" not in receipt
    assert "ContributionDateTime" not in receipt.ContributingEquipmentSequence[0]


def test_hostile_device_text_is_made_valid() -> None:
    han = "心电图导联测试数据" * 3  # 27 characters, 81 bytes of UTF-8
    rec = recording(
        synthetic(3, n=300),
        ("I\\x", han, "V1\x07\n"),
        device=DeviceIdentity("Ac\\me\x00" * 5, han * 3, "S\\N", software_version="v\\1"),
        patient=Patient("ID-1", "王^小明=" + han, issuer=han[:21]),
        flags=("x\\y\n" * 300,),
    )
    data = recording_to_dicom_bytes(rec, UIDS, StationInfo(han, "Cl\\inic" + han * 5))
    assert_valid(data)
    ds = read(data)
    assert [c[:2] for c in codes(ds)] == [("I/x", "2:0"), ("心电图导联", "2:0"), ("V1", "2:3")]
    assert str(ds.PatientName) == "王^小明"  # the ideographic group did not fit 64 bytes
    assert ds.IssuerOfPatientID == han[:21]  # 63 bytes: fits, kept exactly


@pytest.mark.parametrize("patient_id", ["ID\\1", "ID\x1b1", "X" * 65, " padded"])
def test_a_patient_id_that_does_not_fit_is_refused_not_altered(patient_id: str) -> None:
    rec = recording(synthetic(2, n=100), patient=Patient(patient_id))
    with pytest.raises(InvalidObjectError, match="patient ID"):
        recording_to_dicom_bytes(rec, UIDS, STATION)


# ---------------------------------------------------------------------------- gaps and amplitudes


def test_gaps_are_padded_and_annotated_never_closed_up() -> None:
    samples = synthetic(12, n=1000)
    gaps = (SampleGap(0, 10), SampleGap(400, 50), SampleGap(1000, 5))
    rec = recording(samples, gaps=gaps)
    data = recording_to_dicom_bytes(rec, UIDS, STATION)
    assert_valid(data)
    ds = read(data)
    group = ds.WaveformSequence[0]
    assert group.NumberOfWaveformSamples == 1065
    assert group.WaveformPaddingValue == PADDING_VALUE.to_bytes(2, "little", signed=True)
    raw = raw_samples(ds)
    assert np.all(raw[:, :10] == PADDING_VALUE)
    assert np.array_equal(raw[:, 10:410], samples[:, :400])
    assert np.all(raw[:, 410:460] == PADDING_VALUE)
    assert np.array_equal(raw[:, 460:1060], samples[:, 400:])
    assert np.all(raw[:, 1060:] == PADDING_VALUE)
    coded = [
        (list(a.ReferencedSamplePositions), a.TemporalRangeType)
        for a in ds.WaveformAnnotationSequence
        if "ConceptNameCodeSequence" in a and a.ConceptNameCodeSequence[0].CodeValue == "10:11248"
    ]
    assert coded == [([1, 10], "SEGMENT"), ([411, 460], "SEGMENT"), ([1061, 1065], "SEGMENT")]
    assert any("50 samples (0.100 s) missing" in t for t in texts(ds))


def test_gap_forces_int16_minimum_out_of_the_data() -> None:
    samples = np.array([[-32768, 0, 32767, 10]] * 2, dtype=np.int32).repeat(100, axis=1)
    plain = read(recording_to_dicom_bytes(recording(samples, ("I", "II")), UIDS, STATION))
    assert np.array_equal(raw_samples(plain), samples)  # kept as is
    gapped = read(recording_to_dicom_bytes(recording(samples, ("I", "II"), gaps=(SampleGap(4, 3),)), UIDS, STATION))
    raw = raw_samples(gapped)
    assert raw[:, :4].min() > PADDING_VALUE  # -32768 now only ever means "no sample"
    assert float(gapped.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity) == 5.0


def test_wide_samples_requantise_exactly_when_they_share_a_factor() -> None:
    samples = synthetic(12, n=500, peak=20000) * 10  # ±200000 units, all multiples of 10
    rec = recording(samples, uv_per_unit=0.5)
    data = recording_to_dicom_bytes(rec, UIDS, STATION)
    assert_valid(data)
    ds = read(data)
    group = ds.WaveformSequence[0]
    assert float(group.ChannelDefinitionSequence[0].ChannelSensitivity) == 5.0  # 0.5 uV x 10
    assert group.WaveformOriginality == "ORIGINAL"
    assert np.array_equal(ds.waveform_array(0).T, rec.microvolts())
    assert any("exactly" in t for t in texts(ds))


def test_wide_samples_without_a_common_factor_are_rounded_and_flagged() -> None:
    samples = synthetic(12, n=500, peak=1_000_000, seed=3)
    samples[0, 0] = 1_000_001  # prime-ish mix: no common factor
    rec = recording(samples, uv_per_unit=0.1)
    data = recording_to_dicom_bytes(rec, UIDS, STATION)
    assert_valid(data)
    ds = read(data)
    group = ds.WaveformSequence[0]
    sensitivity = float(group.ChannelDefinitionSequence[0].ChannelSensitivity)
    assert group.WaveformOriginality == "DERIVED"
    assert np.max(np.abs(ds.waveform_array(0).T - rec.microvolts())) <= sensitivity / 2 + 1e-9
    assert any("rounded, error at most" in t for t in texts(ds))


# ---------------------------------------------------------------------------- determinism and UIDs


def test_building_twice_gives_identical_bytes() -> None:
    rec = recording(synthetic(12, n=800), gaps=(SampleGap(5, 5),), stat=True, flags=("patient-mismatch",))
    created = dt.datetime(2024, 5, 1, 7, 0, tzinfo=dt.timezone.utc)
    first = recording_to_dicom_bytes(rec, UIDS, STATION, created_at=created)
    assert recording_to_dicom_bytes(rec, UIDS, STATION, created_at=created) == first
    later = recording_to_dicom_bytes(rec, UIDS, STATION, created_at=created + dt.timedelta(minutes=1))
    assert later != first and len(later) == len(first)
    assert "Gateway flag: patient-mismatch" in texts(read(first))


def test_mint_uids_gives_three_distinct_valid_uids_each_time() -> None:
    first, second = mint_uids(), mint_uids()
    values = [
        first.study_uid,
        first.series_uid,
        first.sop_instance_uid,
        second.study_uid,
        second.series_uid,
        second.sop_instance_uid,
    ]
    assert len(set(values)) == 6
    assert all(v.startswith("2.25.") and len(v) <= 64 and pydicom.uid.UID(v).is_valid for v in values)


# ---------------------------------------------------------------------------- properties

ALL_LABELS = STANDARD_12_LEADS + ("V7", "V8", "V9", "V3R", "V4R", "V5R", "X", "Y", "Z", "CH-A", "aux 2")
TIME_SOURCES = st.sampled_from(list(TimeSource))


@st.composite
def valid_recordings(draw: st.DrawFn) -> EcgRecording:
    leads = tuple(draw(st.lists(st.sampled_from(ALL_LABELS), min_size=1, max_size=24, unique=True)))
    n = draw(st.integers(1, 3000))
    peak = draw(st.sampled_from([0, 1, 300, 32767, 70000, 2**31 - 1]))
    seed = draw(st.integers(0, 2**32 - 1))
    samples = np.random.default_rng(seed).integers(-peak, peak + 1, (len(leads), n), dtype=np.int64)
    rate = draw(st.one_of(st.sampled_from([200.0, 250.0, 500.0, 1000.0]), st.floats(200.0, 1000.0, allow_nan=False)))
    gaps = tuple(draw(st.lists(st.builds(SampleGap, st.integers(0, n), st.integers(1, 400)), max_size=3)))
    derived = frozenset(draw(st.lists(st.sampled_from(leads), unique=True, max_size=4)))
    patient = draw(st.one_of(st.none(), st.just(PATIENT)))
    minutes = draw(st.integers(-12 * 60, 14 * 60))
    acquired = dt.datetime(2024, 2, 29, 23, 59, 59, tzinfo=dt.timezone(dt.timedelta(minutes=minutes)))
    return EcgRecording(
        samples=samples,
        lead_names=leads,
        sampling_rate_hz=rate,
        uv_per_unit=draw(st.sampled_from([0.001, 0.5, 1.0, 2.5, 4.88, 1000 / 3])),
        acquired_at=acquired,
        time_source=draw(TIME_SOURCES),
        device=CART,
        patient=patient,
        derived_leads=derived,
        gaps=gaps,
        stat=draw(st.booleans()),
        resampled_from_hz=draw(st.one_of(st.none(), st.just(2000.0))),
        source_format="npz",
    )


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(valid_recordings())
def test_any_valid_recording_gives_an_object_dciodvfy_accepts(rec: EcgRecording) -> None:
    data = recording_to_dicom_bytes(rec, UIDS, STATION)
    assert dciodvfy_problems(data) == []
    ds = read(data)
    assert ds.SOPClassUID == choose_sop_class(rec)
    group = ds.WaveformSequence[0]
    sensitivity = float(group.ChannelDefinitionSequence[0].ChannelSensitivity)
    padded = np.ones(group.NumberOfWaveformSamples, dtype=bool)
    for annotation in ds.WaveformAnnotationSequence:
        if "ConceptNameCodeSequence" in annotation:
            first, last = annotation.ReferencedSamplePositions
            padded[first - 1 : last] = False
    read_back = ds.waveform_array(0).T[:, padded]
    assert read_back.shape == rec.samples.shape
    assert np.allclose(read_back, rec.microvolts(), rtol=1e-9, atol=sensitivity / 2 * (1 + 1e-9))


@st.composite
def invalid_recordings(draw: st.DrawFn) -> EcgRecording:
    too_many = draw(st.booleans())
    if too_many:
        n_leads, rate = draw(st.integers(25, 40)), draw(st.floats(200.0, 1000.0))
    else:
        n_leads = draw(st.integers(1, 12))
        # a DICOM ECG takes 200-1000 Hz; below 25 Hz or above 32 kHz no recording is made at all
        rate = draw(st.one_of(st.floats(25.0, 199.99), st.floats(1000.01, 32000.0)))
    leads = tuple(f"L{i}" for i in range(n_leads))
    return EcgRecording(
        samples=np.zeros((n_leads, draw(st.integers(1, 50))), dtype=np.int16),
        lead_names=leads,
        sampling_rate_hz=rate,
        uv_per_unit=1.0,
        acquired_at=ACQUIRED,
        time_source=TimeSource.UNKNOWN,
    )


@settings(deadline=None, max_examples=60)
@given(invalid_recordings())
def test_any_invalid_recording_is_refused_with_invalid_object_error(rec: EcgRecording) -> None:
    with pytest.raises(InvalidObjectError):
        choose_sop_class(rec)
    with pytest.raises(InvalidObjectError):
        recording_to_dicom_bytes(rec, UIDS, STATION)


# ---------------------------------------------------------------------------- CC5 and CM5


def _cid3001_meaning(code: str) -> str:
    """DICOM's own meaning of an MDC lead code in CID 3001, as pydicom ships the standard."""
    (meaning,) = (
        m for codes_ in concepts["MDC"].values() for c, (m, cids) in codes_.items() if c == code and 3001 in cids
    )
    return meaning


# An SCP-ECG record whose section 3 names leads I, II, CC5 (19) and CM5 (20): a stress-test cart.
# section 1: acquisition date (tag 25) and time (tag 26), end tag 255
SCP_SECTION_1 = b"\x19\x04\x00" + struct.pack("<HBB", 2026, 11, 30) + b"\x1a\x03\x00\x08\x1e\x00" + b"\xff\x00\x00"
CC5_CM5_SCP = build_record(
    {
        1: SCP_SECTION_1,
        3: lead_body([1, 2, 19, 20], 500),
        6: rhythm_body(
            synthetic(4, 500).astype("<i2"),
            1000,
            2000,
            [row.tobytes() for row in synthetic(4, 500).astype("<i2")],
            0,
        ),
    }
)
# The same leads in an HL7 aECG, by their MDC names.
CC5_CM5_AECG = (
    b'<AnnotatedECG xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
    b'<component><series><code code="RHYTHM"/><component><sequenceSet>'
    b'<component><sequence><code code="TIME_ABSOLUTE"/><value xsi:type="GLIST_TS">'
    b'<head value="20261130083000"/><increment value="0.002" unit="s"/></value></sequence></component>'
    + b"".join(
        b'<component><sequence><code code="MDC_ECG_LEAD_' + lead + b'"/><value xsi:type="SLIST_PQ">'
        b'<origin value="0" unit="uV"/><scale value="5" unit="uV"/><digits>1 -2 3 4</digits></value>'
        b"</sequence></component>"
        for lead in (b"I", b"II", b"CC5", b"CM5")
    )
    + b"</sequenceSet></component></series></component></AnnotatedECG>"
)


@pytest.mark.parametrize("source", ["scp", "aecg"])
def test_cc5_and_cm5_keep_their_cid_3001_codes(source: str) -> None:
    """A cart's bipolar chest leads CC5 and CM5 go out coded as themselves (MDC 2:19, 2:20), not as
    "Unspecified lead": a reader's software places leads by code, not by label."""
    rec = read_scp(CC5_CM5_SCP) if source == "scp" else read_aecg(CC5_CM5_AECG)
    assert rec.lead_names[-2:] == ("CC5", "CM5")
    data = recording_to_dicom_bytes(rec, UIDS, STATION)
    assert_valid(data)
    assert codes(read(data))[-2:] == [
        ("CC5", "2:19", _cid3001_meaning("2:19")),
        ("CM5", "2:20", _cid3001_meaning("2:20")),
    ]


def test_a_reset_cart_clock_goes_out_as_the_carts_time_marked_untrusted() -> None:
    """A Contec cart with a flat clock battery dates its ECG 2000-01-01. The PACS got
    AcquisitionDateTime 2000-01-01 under Time Source "DEVICE FILE", as if true. The time is the
    cart's (nothing invented) but Time Source and the annotations say it is not to be believed."""
    from devices.ecg.formats import decode_ecg
    from tests.conftest import shared_file

    data = (
        shared_file("ecg", "contec", "0000037.ECG").read_bytes().replace(b"2020-11-15 12:59:50", b"2000-01-01 00:00:00")
    )
    received = dt.datetime(2026, 12, 6, 9, 0, tzinfo=dt.timezone.utc)
    rec = decode_ecg(data, "0000037.ECG", local_tz=dt.timezone(dt.timedelta(hours=8)), received_at=received)
    ds = read(recording_to_dicom_bytes(rec, UIDS, STATION))
    assert ds.AcquisitionDateTime == "20000101000000+0800"
    assert (ds.AcquisitionTimeSynchronized, ds.TimeSource) == ("N", "DEVICE UNTRUSTED")
    notes = texts(ds)
    assert any(t.startswith("Acquisition time source: device-clock-untrusted") and "clock" in t for t in notes)
    assert "Gateway flag: device-clock-reset" in notes


# ---------------------------------------------------------------------------- every lead the decoders know


def _decoder_leads() -> list[tuple[int, str]]:
    """Every recorded lead of the decoders' table (SCP-ECG numbers = MDC "2:n"): not 0
    (unspecified) and not SCP's calibration signals (31-60, 79-85)."""
    return list(MDC_LEADS.items())


def _scp_record_of(numbers: list[int]) -> bytes:
    samples = synthetic(len(numbers), 500).astype("<i2")
    return build_record(
        {
            1: SCP_SECTION_1,
            3: lead_body(numbers, 500),
            6: rhythm_body(samples, 1000, 2000, [row.tobytes() for row in samples], 0),
        }
    )


_CHUNK = 20  # leads per file: under the General ECG IOD's 24 channels per group


@pytest.mark.parametrize("start", range(0, len(_decoder_leads()), _CHUNK))
def test_every_lead_the_decoders_know_goes_out_with_its_cid_3001_code(start: int) -> None:
    """Frank (fI..fH), Nehb (D, A, J), auxiliary (A1-A4), defibrillator and pacing leads read from
    an SCP-ECG file go out coded as themselves (MDC 2:n with DICOM's meaning), never as
    "Unspecified lead": a reader's software places leads by code, not by label."""
    leads = _decoder_leads()[start : start + _CHUNK]
    rec = read_scp(_scp_record_of([n for n, _ in leads]))
    data = recording_to_dicom_bytes(rec, UIDS, STATION)
    assert_valid(data)
    names = {name for _, name in leads}
    sent = sorted(c for c in codes(read(data)) if c[0] in names)
    assert sent == sorted((name, f"2:{n}", _cid3001_meaning(f"2:{n}")) for n, name in leads)
    # the limb leads derived from I and II too: every code with DICOM's own meaning
    assert [m for _, c, m in codes(read(data))] == [_cid3001_meaning(c) for _, c, _ in codes(read(data))]
