"""DICOM ECG builder: the edges the mutation score found untested (issue 20).

Each test names what the reading centre would see if the edge moved: a toddler's age off by a
unit (paediatric ECG criteria depend on it), a full-scale sample halved in resolution, a lead
label taken for another lead, an annotation that points at no channel.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib

import numpy as np
import pytest
from pydicom.dataset import Dataset

from devices.ecg.findings import EcgMeasurement, EcgStatement, MedianBeats, StatementSource
from devices.ecg.quality import ACCEPTABLE, Problem, QualityReport
from devices.ecg.recording import STANDARD_12_LEADS, SampleGap
from tests.dicom_ecg_samples import PATIENT, STATION, UIDS, raw_samples, read, recording, synthetic
from uploader.dicom_ecg import (
    GENERAL_ECG,
    TWELVE_LEAD_ECG,
    StationInfo,
    StudyRequest,
    build_ecg_dataset,
    canonical_lead,
    check_ecg_iod,
    choose_sop_class,
    median_left_out,
    patient_age,
    reassign_patient,
    recording_to_dicom_bytes,
)
from uploader.errors import InvalidObjectError

BORN = dt.date(2020, 3, 15)


@pytest.mark.parametrize(
    ("on", "age"),
    [
        (dt.date(2020, 3, 15), "000D"),  # the day of birth: 0 days, not "no age"
        (dt.date(2020, 4, 14), "030D"),  # a day short of a month: still days
        (dt.date(2020, 4, 15), "001M"),
        (dt.date(2021, 1, 20), "010M"),  # month arithmetic across a year
        (dt.date(2022, 3, 14), "023M"),  # a day short of two years: still months
        (dt.date(2022, 3, 15), "002Y"),
        (dt.date(2026, 3, 14), "005Y"),
        (dt.date(2020, 3, 14), ""),  # before the birth: a wrong date somewhere, no age at all
    ],
)
def test_patient_age_follows_dicom_as_at_every_unit_boundary(on: dt.date, age: str) -> None:
    """PS3.5 AS: days below a month, months below two years, then years. An infant's age in the
    wrong unit would apply adult (or newborn) ECG criteria."""
    assert patient_age(BORN, on) == age


def test_a_centenarian_age_is_capped_at_three_digits() -> None:
    assert patient_age(dt.date(1000, 1, 1), dt.date(2026, 1, 1)) == "999Y"


def test_assigning_a_patient_writes_the_age_and_a_patient_without_birth_date_has_none() -> None:
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    reassign_patient(ds, PATIENT, "assigned by Dr Li\nat the clinic")
    assert ds.PatientAge == "044Y"  # born 1980-01-02, recorded 2024-05-01
    # ST keeps the note's line break (a person wrote two lines)
    assert any(
        str(a.get("UnformattedTextValue", "")) == "assigned by Dr Li\nat the clinic"
        for a in ds.WaveformAnnotationSequence
    )
    reassign_patient(ds, dataclasses.replace(PATIENT, birth_date=None), "corrected")
    assert "PatientAge" not in ds


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ("Clark", "Clark^"),  # one word is the family name
        ("A" * 70, "A" * 63 + "^"),  # one long word is cut (to 64 bytes with its "^"), never emptied
        ("A" * 40 + "^" + "B" * 10 + "=" + "C" * 12, "A" * 40 + "^" + "B" * 10 + "=" + "C" * 12),  # exactly 64 bytes
        ("A" * 40 + "^" + "B" * 10 + "=" + "C" * 13, "A" * 40 + "^" + "B" * 10),  # 65: the second group goes
    ],
)
def test_person_names_are_cut_by_whole_groups_and_never_emptied(name: str, written: str) -> None:
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    reassign_patient(ds, dataclasses.replace(PATIENT, name=name), "assigned")
    assert str(ds.PatientName) == written


@pytest.mark.parametrize(("label", "lead"), [("Lead II", "II"), ("LEAD V4R", "V4R"), ("aVR", "aVR")])
def test_lead_labels_with_and_without_the_word_lead_are_recognised(label: str, lead: str) -> None:
    assert canonical_lead(label) == lead


def test_a_label_is_not_stripped_of_a_prefix_that_is_not_lead() -> None:
    """ "ABCDV1" is some unknown channel, not V1: taking it for V1 would file a signal as a lead
    the cardiologist reads against V1 criteria."""
    assert canonical_lead("ABCDV1") is None


def test_full_scale_samples_are_stored_as_they_are_not_requantised() -> None:
    """A sample at -32768 or +32767 (without gaps) fits int16: dividing would halve the
    resolution of the whole recording."""
    samples = np.array([[-32768, 0, 32767, 10]] * 2, dtype=np.int32).repeat(50, axis=1)
    ds = read(recording_to_dicom_bytes(recording(samples, ("I", "II")), UIDS, STATION))
    assert np.array_equal(raw_samples(ds), samples)
    assert float(ds.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity) == 2.5


def test_requantised_samples_round_half_up() -> None:
    """65534 needs a factor of 2; with no common factor the values are rounded, half up:
    5 -> 3 (2.5), -5 -> -2 (-2.5), 7 -> 4 (3.5), and the sensitivity doubles."""
    samples = np.array([[65534, 5, -5, 7]] * 2, dtype=np.int64).repeat(50, axis=1)
    ds = read(recording_to_dicom_bytes(recording(samples, ("I", "II")), UIDS, STATION))
    raw = raw_samples(ds)
    assert raw[0, ::50].tolist() == [32767, 3, -2, 4]
    assert float(ds.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity) == 5.0


def test_time_zone_offsets_are_signed_utc_is_plus_zero() -> None:
    utc = dt.datetime(2024, 5, 1, 9, 30, tzinfo=dt.timezone.utc)
    west = dt.datetime(2024, 5, 1, 9, 30, tzinfo=dt.timezone(-dt.timedelta(hours=2, minutes=30)))
    one_west = dt.datetime(2024, 5, 1, 9, 30, tzinfo=dt.timezone(-dt.timedelta(minutes=1)))
    for when, offset in ((utc, "+0000"), (west, "-0230"), (one_west, "-0001")):
        ds = build_ecg_dataset(recording(synthetic(12, 600), acquired_at=when), UIDS, STATION)
        assert ds.AcquisitionDateTime.endswith(offset)


def test_every_annotation_points_at_all_channels_of_group_one_and_every_channel_stores_16_bits() -> None:
    """ReferencedWaveformChannels [1, 0] is "multiplex group 1, all channels" (PS3.3
    C.10.10.1.1): another value would hang a gap or a note on one lead, or on none."""
    ds = build_ecg_dataset(recording(synthetic(12, 600), gaps=(SampleGap(100, 20),)), UIDS, STATION)
    annotations = list(ds.WaveformAnnotationSequence)
    assert annotations and all(list(a.ReferencedWaveformChannels) == [1, 0] for a in annotations)
    assert {int(c.WaveformBitsStored) for c in ds.WaveformSequence[0].ChannelDefinitionSequence} == {16}


def test_the_gateway_names_its_institution_station_and_serial_as_contributing_equipment() -> None:
    station = dataclasses.replace(STATION, gateway_id="GW-0007")
    gateway = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, station).ContributingEquipmentSequence[0]
    assert (gateway.InstitutionName, gateway.StationName, gateway.DeviceSerialNumber) == (
        STATION.institution,
        STATION.station_name,
        "GW-0007",
    )
    bare = build_ecg_dataset(
        recording(synthetic(12, 600)), UIDS, StationInfo(station_name="", institution="")
    ).ContributingEquipmentSequence[0]
    assert "InstitutionName" not in bare and "StationName" not in bare and "DeviceSerialNumber" not in bare


def test_the_quality_check_is_in_the_object_on_the_leads_it_concerns() -> None:
    """The reader sees the gateway's verdict and each problem hung on its own leads (group 1,
    channel n), and a poor recording says so in its Study Description; an acceptable one does not."""
    rec = recording(synthetic(12, 600))
    noisy = Problem("noise", ("V2", "V5"), "warn", "噪声", "mains noise on V2, V5")
    whole = Problem("short", (), "warn", "太短", "recording shorter than 10 s")
    report = QualityReport("poor", 72.4, (), (noisy, whole))
    ds = build_ecg_dataset(rec, UIDS, STATION, quality=report)
    notes = {
        str(a.UnformattedTextValue): list(a.ReferencedWaveformChannels)
        for a in ds.WaveformAnnotationSequence
        if "UnformattedTextValue" in a
    }
    assert notes["Gateway quality check: poor; QRS detected at 72/min"] == [1, 0]
    assert notes["Gateway quality check, noise (warn): mains noise on V2, V5"] == [1, 8, 1, 11]
    assert notes["Gateway quality check, short (warn): recording shorter than 10 s"] == [1, 0]
    assert ds.StudyDescription.endswith(" - quality: poor")
    fine = build_ecg_dataset(rec, UIDS, STATION, quality=QualityReport(ACCEPTABLE, None, (), ()))
    assert "quality" not in fine.StudyDescription
    assert "Gateway quality check: " + ACCEPTABLE in [
        str(a.get("UnformattedTextValue", "")) for a in fine.WaveformAnnotationSequence
    ]


# ---------------------------------------------------------------------------- survivors of the second run


def _texts(ds: Dataset) -> list[str]:
    return [str(a.UnformattedTextValue) for a in ds.WaveformAnnotationSequence if "UnformattedTextValue" in a]


def test_assigning_a_patient_returns_the_object_with_the_patient_and_refuses_one_without_a_date() -> None:
    """Intake encodes and sends what reassign_patient returns: it must be the object with the new
    patient in it. An object whose acquisition date cannot be read gets no age computed from a
    guessed date: it is refused."""
    ds = build_ecg_dataset(recording(synthetic(12, 600), patient=None), UIDS, STATION)
    assigned = reassign_patient(ds, PATIENT, "assigned by Dr Wang")
    assert assigned is ds and assigned.PatientID == PATIENT.patient_id
    undated = build_ecg_dataset(recording(synthetic(12, 600), patient=None), UIDS, STATION)
    del undated.AcquisitionDateTime
    del undated.ContentDate
    with pytest.raises(InvalidObjectError, match="acquisition date"):
        reassign_patient(undated, PATIENT, "assigned by Dr Wang")


def _median(leads: int, n: int = 600, rate: float = 500.0) -> MedianBeats:
    return MedianBeats(
        synthetic(leads, n),
        STANDARD_12_LEADS[:leads] if leads <= 12 else tuple(f"L{i}" for i in range(leads)),
        rate,
        2.5,
    )


def test_median_beats_are_left_out_with_the_iod_limit_they_break_and_kept_when_they_fit() -> None:
    """A median-beat group the IOD forbids makes the reading centre refuse the whole object;
    left out, the reader is told which limit it broke (PS3.3 A.34)."""
    limb = recording(synthetic(3, 600), leads=("I", "II", "III"))
    assert median_left_out(limb, GENERAL_ECG) == ""  # nothing to say: the group goes in
    assert median_left_out(dataclasses.replace(limb, median_beats=_median(3)), GENERAL_ECG) == ""
    assert median_left_out(dataclasses.replace(limb, median_beats=_median(3)), TWELVE_LEAD_ECG) == ""
    assert median_left_out(dataclasses.replace(limb, median_beats=_median(24)), GENERAL_ECG) == ""
    why = median_left_out(dataclasses.replace(limb, median_beats=_median(25)), GENERAL_ECG)
    assert why == "25 median-beat leads exceed 24 per group"
    why = median_left_out(dataclasses.replace(limb, median_beats=_median(3, rate=150.0)), GENERAL_ECG)
    assert why == "median beats at 150 Hz are outside 200-1000 Hz"
    why = median_left_out(dataclasses.replace(limb, median_beats=_median(3, n=16385)), TWELVE_LEAD_ECG)
    assert why == "16385 median-beat samples exceed 16384"
    assert median_left_out(dataclasses.replace(limb, median_beats=_median(3, n=16384)), TWELVE_LEAD_ECG) == ""
    for rate in (200.0, 1000.0):  # the IOD's range, both ends included
        assert median_left_out(dataclasses.replace(limb, median_beats=_median(3, rate=rate)), GENERAL_ECG) == ""
    twelve = recording(synthetic(12, 600))
    assert median_left_out(dataclasses.replace(twelve, median_beats=_median(1)), TWELVE_LEAD_ECG) == ""  # 13 in all
    assert median_left_out(dataclasses.replace(twelve, median_beats=_median(2)), TWELVE_LEAD_ECG) == (
        "the 12-lead ECG IOD allows at most 13 channels in all (PS3.3 A.34.3.4.4); rhythm and median beats would need 14"
    )


def test_the_annotation_groups_are_explained_for_the_sources_present_and_only_then() -> None:
    """Group 1 is the cart's own unconfirmed analysis, group 2 a physician's: the reader must be
    told which is which, and a measurement alone makes group 1 present."""
    rate = EcgMeasurement("heart-rate", 72.0, "test")
    over_read = EcgStatement("Sinus rhythm", StatementSource.PHYSICIAN)

    def group_notes(**findings: object) -> list[str]:
        ds = build_ecg_dataset(recording(synthetic(12, 600), **findings), UIDS, STATION)
        return [t for t in _texts(ds) if t.startswith("Annotation groups")]

    assert group_notes() == []
    device = "group 1: the ECG device's own measurements and automatic interpretation, not confirmed by a physician"
    physician = "group 2: statements confirmed or over-read by a physician, as the device's file says"
    by = " (Acme Cardio Cart 5 SN-0042)"
    assert group_notes(measurements=(rate,)) == [f"Annotation groups from the device{by}: {device}"]
    assert group_notes(statements=(over_read,)) == [f"Annotation groups from the device{by}: {physician}"]
    assert group_notes(measurements=(rate,), statements=(over_read,)) == [
        f"Annotation groups from the device{by}: {device}; {physician}"
    ]


def test_the_reason_for_the_ecg_is_a_statement_only_when_one_was_given() -> None:
    asked = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION, request=StudyRequest(reason="chest pain"))
    assert "Reason for the ECG: chest pain" in _texts(asked)
    plain = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    assert not any(t.startswith("Reason for the ECG") for t in _texts(plain))


def test_a_qtc_by_a_formula_without_its_own_code_is_coded_as_qtc_with_the_algorithm() -> None:
    """Hodges has no QTc code of its own (CID 3227): the value is "QTc interval global" with the
    algorithm as modifier (CID 3678), so the reader knows which correction the cart used."""
    qtc = EcgMeasurement("qtc-interval", 431.0, "test", method="hodges")
    ds = build_ecg_dataset(recording(synthetic(12, 600), measurements=(qtc,)), UIDS, STATION)
    item = next(a for a in ds.WaveformAnnotationSequence if "NumericValue" in a)
    concept = item.ConceptNameCodeSequence[0]
    assert (concept.CodeValue, concept.CodeMeaning) == ("2:15876", "QTc interval global")
    modifier = concept.ModifierCodeSequence[0]
    assert (modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning) == (
        "122731",
        "DCM",
        "Hodges QTc Algorithm",
    )


def test_samples_beyond_64_bits_are_refused_not_wrapped() -> None:
    """Such a value is a decoder's bug, not a voltage; cast to int64 it would wrap to a huge
    negative deflection on the reader's screen."""
    too_high = np.zeros((12, 600), dtype=np.uint64)
    too_high[3, 10] = 2**63
    with pytest.raises(InvalidObjectError, match="beyond 64-bit range"):
        build_ecg_dataset(recording(too_high), UIDS, STATION)
    too_low = np.zeros((12, 600), dtype=np.int64)
    too_low[3, 10] = -(2**63)
    with pytest.raises(InvalidObjectError, match="beyond 64-bit range"):
        build_ecg_dataset(recording(too_low), UIDS, STATION)


def test_a_zone_offset_in_seconds_is_stated_in_utc_at_the_same_instant() -> None:
    """DICOM offsets are whole minutes: a zone such as Shanghai's local mean time (+08:05:43)
    cannot be written, so the object states the same instant in UTC, not a shifted time."""
    lmt = dt.timezone(dt.timedelta(hours=8, minutes=5, seconds=43))
    when = dt.datetime(2024, 5, 1, 9, 30, 0, tzinfo=lmt)
    ds = build_ecg_dataset(recording(synthetic(12, 600), acquired_at=when), UIDS, STATION)
    assert ds.AcquisitionDateTime == when.astimezone(dt.timezone.utc).strftime("%Y%m%d%H%M%S") + "+0000"


def test_a_malformed_object_is_refused_as_invalid_not_passed() -> None:
    """check_ecg_iod is the last gate before the outbox: an object missing a required waveform
    attribute must be refused (InvalidObjectError), never let through or crash the caller."""
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    del ds.WaveformSequence[0].NumberOfWaveformSamples
    with pytest.raises(InvalidObjectError, match="malformed ECG object"):
        check_ecg_iod(ds)


def test_twenty_four_leads_fit_one_general_ecg_group_and_twenty_five_do_not() -> None:
    """PS3.3 A.34.3.4.3: at most 24 channels in a General ECG multiplex group."""
    names = tuple(f"L{i}" for i in range(1, 26))
    assert choose_sop_class(recording(synthetic(24, 600), leads=names)) == GENERAL_ECG
    with pytest.raises(InvalidObjectError, match="25 leads"):
        choose_sop_class(recording(synthetic(25, 600), leads=names))


def test_the_waveform_size_limit_is_32_mib_to_the_byte() -> None:
    """A Pi builds the object in RAM: 32 MiB of samples (gaps padded) is the most it takes."""
    names = tuple(f"L{i}" for i in range(1, 17))
    limit = 32 * 1024 * 1024 // (16 * 2)  # samples per lead, padding included
    at_limit = recording(synthetic(16, 1000), leads=names, gaps=(SampleGap(500, limit - 1000),))
    assert choose_sop_class(at_limit) == GENERAL_ECG
    over = recording(synthetic(16, 1000), leads=names, gaps=(SampleGap(500, limit - 999),))
    with pytest.raises(InvalidObjectError, match="exceed 32 MiB"):
        choose_sop_class(over)


def test_the_conversion_says_what_the_gateway_converted_from() -> None:
    def described(source_format: str) -> str:
        ds = build_ecg_dataset(recording(synthetic(12, 600), source_format=source_format), UIDS, STATION)
        return str(ds.ContributingEquipmentSequence[0].ContributionDescription)

    assert described("scp") == "Converted to DICOM by the Lastmile gateway from scp"
    assert described("") == "Converted to DICOM by the Lastmile gateway from a device recording"


def test_median_beats_keep_their_own_scale_in_microvolts() -> None:
    """The median group's sensitivity is the cart's 2.5 µV per unit: stored as 2 µV, every
    median-beat amplitude (and the ST levels read from it) would be 20 % low."""
    limb = recording(synthetic(3, 600), leads=("I", "II", "III"), median_beats=_median(3))
    ds = build_ecg_dataset(limb, UIDS, STATION)
    assert [g.MultiplexGroupLabel for g in ds.WaveformSequence] == ["RHYTHM", "MEDIAN BEAT"]
    assert {str(c.ChannelSensitivity) for c in ds.WaveformSequence[1].ChannelDefinitionSequence} == {"2.5"}


def test_the_channel_count_over_all_groups_is_checked_against_the_iod() -> None:
    """12-Lead ECG: at most 13 channels in all groups together (rhythm + median)."""
    rec = recording(synthetic(12, 600), median_beats=_median(1))
    ds = build_ecg_dataset(rec, UIDS, STATION)
    assert ds.SOPClassUID == TWELVE_LEAD_ECG and len(ds.WaveformSequence) == 2
    check_ecg_iod(ds)  # 12 + 1
    median = ds.WaveformSequence[1]
    median.ChannelDefinitionSequence.append(copy.deepcopy(median.ChannelDefinitionSequence[0]))
    median.NumberOfWaveformChannels = 2
    median.WaveformData = bytes(2 * int(median.NumberOfWaveformSamples) * 2)
    with pytest.raises(InvalidObjectError, match="14 channels in all"):
        check_ecg_iod(ds)


def test_the_requantisation_note_gives_the_new_and_the_old_unit_and_only_when_there_is_one() -> None:
    """The reader must know a unit is no longer the cart's: 1 unit = 5 µV instead of 2.5 µV. An
    object stored at the cart's own unit carries no such note."""
    wide = synthetic(12, 600, peak=20000) * 2  # +-40000 units: needs a factor of 2, all even
    ds = build_ecg_dataset(recording(wide), UIDS, STATION)
    assert [t for t in _texts(ds) if t.startswith("Amplitudes requantised")] == [
        "Amplitudes requantised to 16 bits: 1 unit = 5 uV instead of 2.5 uV, exactly (every sample was a multiple)"
    ]
    plain = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    assert not any(t.startswith("Amplitudes requantised") for t in _texts(plain))


class _NoOffset(dt.tzinfo):
    """A zone object that does not know its offset (utcoffset() is None): aware in name only."""

    def utcoffset(self, moment: dt.datetime | None) -> dt.timedelta | None:
        return None

    def dst(self, moment: dt.datetime | None) -> dt.timedelta | None:
        return None


def test_a_creation_time_whose_zone_gives_no_offset_is_refused_like_a_naive_one() -> None:
    """Python would read it as the gateway's local time: an instance time that silently depends
    on the machine's zone setting."""
    with pytest.raises(InvalidObjectError, match="created_at must carry a time zone"):
        build_ecg_dataset(
            recording(synthetic(12, 600)), UIDS, STATION, created_at=dt.datetime(2024, 5, 1, tzinfo=_NoOffset())
        )


def test_five_multiplex_groups_are_the_most_a_twelve_lead_object_holds() -> None:
    """PS3.3 A.34.3.4.2: 1-5 multiplex groups in a 12-Lead ECG."""
    ds = build_ecg_dataset(recording(synthetic(1, 600), leads=("II",)), UIDS, STATION)
    rhythm = ds.WaveformSequence[0]
    ds.WaveformSequence.extend(copy.deepcopy(rhythm) for _ in range(4))
    check_ecg_iod(ds)  # 5 groups, 5 channels in all
    ds.WaveformSequence.append(copy.deepcopy(rhythm))
    with pytest.raises(InvalidObjectError, match="6 multiplex groups"):
        check_ecg_iod(ds)


def test_a_twelve_lead_ecg_of_exactly_16384_samples_stays_a_twelve_lead_ecg() -> None:
    """PS3.3 A.34.3.4.4: at most 16384 samples per channel; the limit itself is allowed."""
    assert choose_sop_class(recording(synthetic(12, 16384))) == TWELVE_LEAD_ECG
    assert choose_sop_class(recording(synthetic(12, 16385))) == GENERAL_ECG


def test_a_patient_id_with_a_line_break_inside_is_refused_not_sent() -> None:
    """A scanned ID split by a stray CR/LF is not a DICOM LO value: sent as it is, the reading
    centre would file the ECG under an ID that matches no patient (only ST/LT keep line breaks)."""
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    with pytest.raises(InvalidObjectError, match="patient ID"):
        reassign_patient(ds, dataclasses.replace(PATIENT, patient_id="KE-123\n456"), "assigned")


def test_a_note_keeps_its_line_breaks_but_no_other_control_character() -> None:
    """ST keeps a person's line breaks, never a bell or NUL: a control character in the note makes
    the object invalid DICOM that a strict PACS refuses, so the ECG would not be read."""
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    reassign_patient(ds, PATIENT, "assigned by\x07 Dr Li\x00\nat the clinic")
    assert any(
        str(a.get("UnformattedTextValue", "")) == "assigned by Dr Li\nat the clinic"
        for a in ds.WaveformAnnotationSequence
    )


# ---------------------------------------------------------------- survivors of the full run (issue 20)


def _source_codes(ds: Dataset, group: int = 0) -> dict[str, str]:
    return {
        str(c.ChannelLabel): str(c.ChannelSourceSequence[0].CodeValue)
        for c in ds.WaveformSequence[group].ChannelDefinitionSequence
    }


def test_every_chest_and_right_chest_lead_gets_its_own_code_and_unknown_leads_none() -> None:
    """CID 3001: V1-V7 are 2:3-2:9 and V2R-V7R 2:10-2:15. A lead coded as another (or an unknown
    "V0"/"V1R" channel coded as a real lead) is read against the wrong lead's criteria."""
    leads = tuple(f"V{i}" for i in range(1, 8)) + tuple(f"V{i}R" for i in range(2, 8)) + ("V0", "V1R")
    ds = build_ecg_dataset(recording(synthetic(len(leads), 600), leads), UIDS, STATION)
    expected = {f"V{i}": f"2:{i + 2}" for i in range(1, 8)} | {f"V{i}R": f"2:{i + 8}" for i in range(2, 8)}
    assert _source_codes(ds) == expected | {"V0": "2:0", "V1R": "2:0"}


def test_derived_chest_leads_get_the_derived_codes_from_v1_to_v6() -> None:
    """A computed V1 or V6 is coded "Derived Lead V1" (2:33) / "Derived Lead V6" (2:38), never as a
    recorded lead: the reader must not take an estimate for a measured signal."""
    rec = recording(synthetic(12, 600), derived_leads=frozenset({"V1", "V6"}))
    codes = _source_codes(build_ecg_dataset(rec, UIDS, STATION))
    assert (codes["V1"], codes["V2"], codes["V6"]) == ("2:33", "2:4", "2:38")


@pytest.mark.parametrize(
    ("station", "written"),
    [
        (StationInfo(station_name="S" * 16, institution="I" * 64), ("S" * 16, "I" * 64)),  # exactly full
        (StationInfo(station_name="S" * 17, institution="I" * 65), ("S" * 16, "I" * 64)),  # one over: cut
    ],
)
def test_sh_and_lo_values_are_cut_exactly_at_their_dicom_length(station: StationInfo, written: tuple[str, str]) -> None:
    """SH holds 16 characters and LO 64: one more makes the object invalid (a strict PACS refuses
    the study), one fewer loses the last character of the clinic's name."""
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, station)
    assert (str(ds.StationName), str(ds.InstitutionName)) == written


def test_a_note_of_exactly_1024_characters_is_kept_whole() -> None:
    """ST holds 1024 characters: the doctor's whole note reaches the reader, and no more."""
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    reassign_patient(ds, PATIENT, "n" * 1025)
    assert str(ds.WaveformAnnotationSequence[-1].UnformattedTextValue) == "n" * 1024
    reassign_patient(ds, PATIENT, "m" * 1024)
    assert str(ds.WaveformAnnotationSequence[-1].UnformattedTextValue) == "m" * 1024


@pytest.mark.parametrize("extreme", [2**62, -(2**62)])
def test_samples_within_64_bits_are_requantised_not_refused(extreme: int) -> None:
    """Only values beyond 64 bits are refused: a wild but representable sample (a saturated
    amplifier's garbage) still gives the reader the rest of the ECG."""
    samples = np.array([[extreme, 0]] * 2, dtype=np.int64).repeat(50, axis=1)
    ds = build_ecg_dataset(recording(samples, ("I", "II")), UIDS, STATION)
    check_ecg_iod(ds)


def _sensitivity(samples: np.ndarray) -> float:
    ds = build_ecg_dataset(recording(samples, ("I", "II")), UIDS, STATION)
    return float(ds.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity)


def test_requantisation_divides_by_the_smallest_exact_factor_not_the_common_one() -> None:
    """65532 and 6 need a factor of 2 and every sample is a multiple of 6: dividing by 2 is exact
    and keeps three times the resolution dividing by 6 would (1 unit = 5 uV, not 15)."""
    assert _sensitivity(np.array([[65532, 6, -6]] * 2, dtype=np.int64).repeat(50, axis=1)) == 5.0


@pytest.mark.parametrize(
    ("top", "factor"),
    [
        (120, 4127),  # needs 31: 4127 is the last factor searched (31 + 4096), found: lossless and finest
        (116, 8254),  # needs 30: 4127 is one past the search, the common factor 8254 is used (still exact)
    ],
)
def test_the_exact_factor_search_ends_4096_past_the_factor_needed(top: int, factor: int) -> None:
    """Every sample a multiple of 8254 = 2 x 4127: the search for an exact factor stops 4096 past the
    one needed, its last candidate included, so the resolution kept does not depend on an
    off-by-one."""
    samples = np.array([[8254, top * 8254, 0]] * 2, dtype=np.int64).repeat(50, axis=1)
    assert _sensitivity(samples) == 2.5 * factor


def test_a_rounded_requantisation_states_its_error_bound() -> None:
    """Rounding to a factor of 2 at 2.5 uV/unit is off by at most 2.5 uV: the reader is told the
    true bound, not one twice or half as large."""
    samples = np.array([[65534, 5, -5, 7]] * 2, dtype=np.int64).repeat(50, axis=1)
    ds = build_ecg_dataset(recording(samples, ("I", "II")), UIDS, STATION)
    assert [t for t in _texts(ds) if t.startswith("Amplitudes requantised")] == [
        "Amplitudes requantised to 16 bits: 1 unit = 5 uV instead of 2.5 uV, rounded, error at most 2.5 uV"
    ]


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ("A=B=C", "A=B=C"),  # three groups: all kept
        ("A=B=C=D", "A=B=C"),  # a fourth group is not PN
        ("A^B^C^D^E", "A^B^C^D^E"),  # five components: all kept
        ("A^B^C^D^E^F", "A^B^C^D^E"),  # a sixth component is not PN
    ],
)
def test_person_names_keep_three_groups_of_five_components(name: str, written: str) -> None:
    """PS3.5 PN: a component lost is a wrong name on the report; one too many makes it invalid."""
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    reassign_patient(ds, dataclasses.replace(PATIENT, name=name), "assigned")
    assert str(ds.PatientName) == written


def test_a_zone_of_59_minutes_is_written_as_0059_not_an_hour() -> None:
    """The hours of an offset are whole 60-minute hours: +00:59 written as +01:59 would put the
    ECG an hour away from when it was taken."""
    acquired = dt.datetime(2024, 5, 1, 9, 30, tzinfo=dt.timezone(dt.timedelta(minutes=59)))
    ds = build_ecg_dataset(recording(synthetic(12, 600), acquired_at=acquired), UIDS, STATION)
    assert (str(ds.TimezoneOffsetFromUTC), str(ds.AcquisitionDateTime)[-5:]) == ("+0059", "+0059")


def test_the_unassigned_patient_id_is_unassigned_and_20_hex_digits() -> None:
    """The temporary ID names the study (80 bits of its UID's hash): what the console and the
    reading centre match an unassigned ECG by."""
    ds = build_ecg_dataset(recording(synthetic(12, 600), patient=None), UIDS, STATION)
    assert str(ds.PatientID) == "UNASSIGNED-" + hashlib.sha256(UIDS.study_uid.encode()).hexdigest()[:20].upper()


def test_assigning_reads_the_acquisition_date_with_two_digit_month_and_day() -> None:
    """Born 1980-11-23, recorded 2024-11-23 09:30: 44 years that day. A month or day read from the
    wrong digits would give the wrong age (or refuse the assignment)."""
    acquired = dt.datetime(2024, 11, 23, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    ds = build_ecg_dataset(recording(synthetic(12, 600), acquired_at=acquired), UIDS, STATION)
    reassign_patient(ds, dataclasses.replace(PATIENT, birth_date=dt.date(1980, 11, 23)), "assigned")
    assert ds.PatientAge == "044Y"


def test_an_object_without_acquisition_datetime_is_assigned_by_its_content_date() -> None:
    """An object written by another tool may carry only Content Date: the age still comes from it."""
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    del ds.AcquisitionDateTime
    ds.ContentDate = "20240501"
    reassign_patient(ds, PATIENT, "assigned")
    assert ds.PatientAge == "044Y"


def test_an_object_without_annotations_gets_the_assignment_note() -> None:
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    del ds.WaveformAnnotationSequence
    reassign_patient(ds, PATIENT, "assigned by Dr Li")
    assert [str(a.UnformattedTextValue) for a in ds.WaveformAnnotationSequence] == ["assigned by Dr Li"]


def test_median_beat_channels_are_recorded_leads_not_derived_ones() -> None:
    """The cart's median beat of lead I is lead I (2:1), described as a median, not as "computed
    from other leads": the reader would distrust a real lead."""
    ds = build_ecg_dataset(recording(synthetic(12, 600), median_beats=_median(1)), UIDS, STATION)
    channel = ds.WaveformSequence[1].ChannelDefinitionSequence[0]
    assert (str(channel.ChannelSourceSequence[0].CodeValue), str(channel.ChannelDerivationDescription)) == (
        "2:1",
        "median beat computed by the device",
    )


def test_a_bazett_qtc_carries_its_formula_meaning() -> None:
    qtc = EcgMeasurement("qtc-interval", 431.0, "test", method="bazett")
    ds = build_ecg_dataset(recording(synthetic(12, 600), measurements=(qtc,)), UIDS, STATION)
    concept = next(a for a in ds.WaveformAnnotationSequence if "NumericValue" in a).ConceptNameCodeSequence[0]
    assert (str(concept.CodeValue), str(concept.CodeMeaning)) == ("2:15880", "QTc global using Bazett formula")


def test_the_device_group_is_explained_first_and_the_groups_note_leads_the_notes() -> None:
    """With measurements, a physician's and a comment statement: groups 1, 2, 3 in order, and that
    explanation before the measurement notes it explains."""
    measured = tuple(
        EcgMeasurement(kind, value, "test", note="read from a non-standard field")
        for kind, value in (("heart-rate", 72.0), ("pr-interval", 160.0))
    )
    statements = (EcgStatement("Sinus rhythm", StatementSource.PHYSICIAN), EcgStatement("ok", StatementSource.COMMENT))
    ds = build_ecg_dataset(recording(synthetic(12, 600), measurements=measured, statements=statements), UIDS, STATION)
    notes = [t for t in _texts(ds) if t.startswith(("Annotation groups", "Device measurement"))]
    assert notes[0].startswith("Annotation groups") and len(notes) == 3
    assert notes[0].index("group 1") < notes[0].index("group 2") < notes[0].index("group 3")


# check_ecg_iod: the last gate before the outbox; each limit at its boundary, each refusal naming
# the group and the limit, so the log tells the maintainer what to fix.


def _twelve_lead() -> Dataset:
    ds = build_ecg_dataset(recording(synthetic(12, 600)), UIDS, STATION)
    assert ds.SOPClassUID == TWELVE_LEAD_ECG
    return ds


def _add_channel(group: Dataset) -> None:
    group.ChannelDefinitionSequence.append(copy.deepcopy(group.ChannelDefinitionSequence[0]))
    group.NumberOfWaveformChannels = len(group.ChannelDefinitionSequence)
    group.WaveformData = bytes(int(group.NumberOfWaveformChannels) * int(group.NumberOfWaveformSamples) * 2)


def test_a_twelve_lead_group_holds_13_channels_and_a_14th_is_refused_by_the_group_limit() -> None:
    """PS3.3 A.34.3.4.3: 1-13 channels per 12-lead group (12 leads and one more, e.g. a rhythm strip)."""
    ds = _twelve_lead()
    _add_channel(ds.WaveformSequence[0])
    check_ecg_iod(ds)
    _add_channel(ds.WaveformSequence[0])
    with pytest.raises(InvalidObjectError, match=r"12-lead ECG group 1: 14 channels \(1-13 allowed\)"):
        check_ecg_iod(ds)


def test_a_general_ecg_holds_four_multiplex_groups_and_not_five() -> None:
    """PS3.3 A.34.4.4.2: 1-4 multiplex groups in a General ECG."""
    ds = build_ecg_dataset(recording(synthetic(1, 16385), leads=("II",)), UIDS, STATION)
    assert ds.SOPClassUID == GENERAL_ECG
    ds.WaveformSequence.extend(copy.deepcopy(ds.WaveformSequence[0]) for _ in range(3))
    check_ecg_iod(ds)
    ds.WaveformSequence.append(copy.deepcopy(ds.WaveformSequence[0]))
    with pytest.raises(InvalidObjectError, match=r"5 multiplex groups \(1-4 allowed\)"):
        check_ecg_iod(ds)


def test_a_general_ecg_group_of_24_channels_passes_the_gate() -> None:
    ds = build_ecg_dataset(recording(synthetic(24, 600), tuple(f"L{i}" for i in range(1, 25))), UIDS, STATION)
    assert ds.SOPClassUID == GENERAL_ECG
    check_ecg_iod(ds)


def test_a_twelve_lead_ecg_of_exactly_16384_samples_passes_the_gate() -> None:
    check_ecg_iod(build_ecg_dataset(recording(synthetic(12, 16384)), UIDS, STATION))


@pytest.mark.parametrize(
    ("emptied", "refusal"),
    [
        ("NumberOfWaveformChannels", r"12-lead ECG group 1: 0 channels \(1-13 allowed\)"),
        ("NumberOfWaveformSamples", r"12-lead ECG group 1: 0 samples \(1-16384 allowed\)"),
    ],
)
def test_a_group_with_no_channels_or_no_samples_is_refused(emptied: str, refusal: str) -> None:
    """An empty waveform would be stored as an ECG with nothing to read."""
    ds = _twelve_lead()
    group = ds.WaveformSequence[0]
    setattr(group, emptied, 0)
    if emptied == "NumberOfWaveformChannels":
        group.ChannelDefinitionSequence = []
    group.WaveformData = b""
    with pytest.raises(InvalidObjectError, match=refusal):
        check_ecg_iod(ds)


def test_a_general_ecg_with_no_samples_is_refused_with_no_sample_limit_named() -> None:
    ds = build_ecg_dataset(recording(synthetic(1, 16385), leads=("II",)), UIDS, STATION)
    ds.WaveformSequence[0].NumberOfWaveformSamples = 0
    with pytest.raises(InvalidObjectError, match=r"General ECG group 1: 0 samples \(1-any allowed\)"):
        check_ecg_iod(ds)


def test_waveform_data_of_the_wrong_length_is_refused_with_the_length_expected() -> None:
    """A truncated waveform would shift every later sample onto the wrong lead."""
    ds = _twelve_lead()
    group = ds.WaveformSequence[0]
    group.WaveformData = bytes(group.WaveformData)[:-2]
    with pytest.raises(
        InvalidObjectError, match=f"group 1: {12 * 600 * 2 - 2} bytes of waveform data, expected 14400$"
    ):
        check_ecg_iod(ds)


def test_a_channel_without_a_source_code_is_refused_as_such() -> None:
    """A channel with no lead code cannot be told apart from another lead by the reader."""
    ds = _twelve_lead()
    del ds.WaveformSequence[0].ChannelDefinitionSequence[3].ChannelSourceSequence
    with pytest.raises(InvalidObjectError, match="group 1: a channel has no Channel Source code"):
        check_ecg_iod(ds)


def test_seventeen_bits_stored_in_16_bit_samples_are_refused() -> None:
    ds = _twelve_lead()
    ds.WaveformSequence[0].ChannelDefinitionSequence[0].WaveformBitsStored = 17
    with pytest.raises(InvalidObjectError, match="17 bits stored"):
        check_ecg_iod(ds)


def test_the_signal_lost_note_points_at_the_padded_samples_themselves() -> None:
    """The text note of a gap spans the same samples as its coded annotation (1-based,
    inclusive): pointing one sample off, the reader would take padding for signal or hide a
    real beat."""
    rec = recording(synthetic(12, n=1000), gaps=(SampleGap(0, 10), SampleGap(400, 50)))
    ds = build_ecg_dataset(rec, UIDS, STATION)
    spans = [
        (list(a.ReferencedSamplePositions), str(a.TemporalRangeType))
        for a in ds.WaveformAnnotationSequence
        if str(a.get("UnformattedTextValue", "")).startswith("Signal lost in transit")
    ]
    assert spans == [([1, 10], "SEGMENT"), ([411, 460], "SEGMENT")]


def test_an_integral_sensitivity_of_fifteen_digits_is_written_exactly() -> None:
    """DS holds 16 characters: an integer below 10**15 fits as it is and is not rounded to
    1e+15 (the reader would scale every sample by a unit that is not the cart's)."""
    rec = recording(synthetic(2, 600), ("I", "II"), uv_per_unit=999_999_999_999_999.0)
    channel = build_ecg_dataset(rec, UIDS, STATION).WaveformSequence[0].ChannelDefinitionSequence[0]
    assert str(channel.ChannelSensitivity) == "999999999999999"
