"""DICOM ECG builder: the edges the mutation score found untested (issue 20).

Each test names what the reading centre would see if the edge moved: a toddler's age off by a
unit (paediatric ECG criteria depend on it), a full-scale sample halved in resolution, a lead
label taken for another lead, an annotation that points at no channel.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt

import numpy as np
import pytest
from pydicom.dataset import Dataset

from devices.ecg.findings import EcgMeasurement, EcgStatement, MedianBeats, StatementSource
from devices.ecg.quality import ACCEPTABLE, Problem, QualityReport
from devices.ecg.recording import STANDARD_12_LEADS, SampleGap
from tests.test_dicom_ecg import PATIENT, STATION, UIDS, raw_samples, read, recording, synthetic
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
