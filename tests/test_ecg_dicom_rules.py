"""DICOM ECG input (devices/ecg/dicom_input.py) on built waveform objects: every rule, stated.

Each check stands between a file and a misread ECG: a lead named after the wrong electrode,
samples read with the wrong width or byte order, a median beat taken for the rhythm, an
acquisition time in the wrong zone, an amplitude off by the units' factor, a QT interval taken
from the wrong annotation or in the wrong unit, a deflated file misread or inflated without a cap.
"""

from __future__ import annotations

import datetime as dt
import io
import warnings
import zlib

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian

from devices.ecg.dicom_input import looks_like_dicom, read_dicom_ecg
from devices.ecg.findings import StatementSource
from devices.errors import ProtocolError, UnsupportedFeatureError
from devices.identity import DeviceIdentity, Patient, TimeSource
from devices.inflate import InflateLimitError

UTC = dt.timezone.utc
SAMPLES = np.array([[10, -20], [30, -40], [50, -60]])  # 3 samples x 2 channels (I, II)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _channel(
    source: Dataset | None,
    *,
    sensitivity: str | None = "2.5",
    unit: str = "uV",
    correction: str | None = None,
    baseline: str | None = None,
    label: str = "",
    skew: str | None = None,
) -> Dataset:
    ch = Dataset()
    if source is not None:
        ch.ChannelSourceSequence = Sequence([source])
    if label:
        ch.ChannelLabel = label
    if sensitivity is not None:
        ch.ChannelSensitivity = sensitivity
        ch.ChannelSensitivityUnitsSequence = Sequence([_code(unit, "UCUM", unit)])
    if correction is not None:
        ch.ChannelSensitivityCorrectionFactor = correction
    if baseline is not None:
        ch.ChannelBaseline = baseline
    if skew is not None:
        ch.ChannelSampleSkew = skew
    return ch


def _scp(n: int) -> Dataset:
    return _code(f"5.6.3-9-{n}", "SCPECG", f"Lead {n}")


def _group(
    channels: list[Dataset] | None = None,
    samples: np.ndarray = SAMPLES,
    *,
    bits: int = 16,
    interpretation: str = "SS",
    rate: str | None = "500",
    label: str = "RHYTHM",
    originality: str = "ORIGINAL",
    n_channels: int | None = None,
    n_samples: int | None = None,
    data: bytes | None = None,
    big_endian: bool = False,
) -> Dataset:
    g = Dataset()
    g.MultiplexGroupLabel, g.WaveformOriginality = label, originality
    channels = channels if channels is not None else [_channel(_scp(1)), _channel(_scp(2))]
    g.ChannelDefinitionSequence = Sequence(channels)
    g.NumberOfWaveformChannels = len(channels) if n_channels is None else n_channels
    g.NumberOfWaveformSamples = samples.shape[0] if n_samples is None else n_samples
    if rate is not None:
        g.SamplingFrequency = rate
    g.WaveformBitsAllocated, g.WaveformSampleInterpretation = bits, interpretation
    dtype = {
        (8, "SB"): "i1",
        (8, "UB"): "u1",
        (16, "SS"): "i2",
        (16, "US"): "u2",
        (32, "SL"): "i4",
        (32, "UL"): "u4",
    }.get((bits, interpretation), "i2")
    g.WaveformData = data if data is not None else samples.astype((">" if big_endian else "<") + dtype).tobytes()
    return g


def _dump(*groups: Dataset, big_endian: bool = False, deflated: bool = False, **attrs: object) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.9.1.1"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.AcquisitionDateTime = "20240506070809"
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.WaveformSequence = Sequence(list(groups) or [_group(big_endian=big_endian)])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian if big_endian else ExplicitVRLittleEndian
    if deflated:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, "1.2.3.4"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True, little_endian=not big_endian, implicit_vr=False)
    return buf.getvalue()


def test_a_built_object_decodes() -> None:
    r = read_dicom_ecg(_dump())
    assert r.lead_names[:3] == ("I", "II", "III") and r.uv_per_unit == 2.5 and r.sampling_rate_hz == 500.0
    assert r.lead("I").tolist() == [10, 30, 50] and r.lead("II").tolist() == [-20, -40, -60]
    assert r.acquired_at == dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC) and r.time_source is TimeSource.FILE
    assert r.derived_leads == {"III", "aVR", "aVL", "aVF"}


@pytest.mark.parametrize("bits,interpretation", [(8, "SB"), (8, "UB"), (16, "SS"), (16, "US"), (32, "SL"), (32, "UL")])
def test_every_sample_width_and_sign(bits: int, interpretation: str) -> None:
    samples = np.abs(SAMPLES) if interpretation.startswith("U") else SAMPLES
    r = read_dicom_ecg(_dump(_group(samples=samples, bits=bits, interpretation=interpretation)))
    assert r.lead("I").tolist() == samples[:, 0].tolist() and r.lead("II").tolist() == samples[:, 1].tolist()


@pytest.mark.parametrize("bits,interpretation", [(12, "SS"), (16, "SB"), (64, "SV"), (16, "")])
def test_sample_formats_we_do_not_read_are_refused(bits: int, interpretation: str) -> None:
    with pytest.raises(UnsupportedFeatureError, match="samples are not supported"):
        read_dicom_ecg(_dump(_group(bits=bits, interpretation=interpretation)))


def test_big_endian_objects_are_read_in_their_byte_order() -> None:
    r = read_dicom_ecg(_dump(big_endian=True))
    assert r.lead("I").tolist() == [10, 30, 50]


@pytest.mark.parametrize("unit,factor", [("uV", 1.0), ("mV", 1000.0), ("V", 1_000_000.0), ("nV", 0.001)])
def test_every_voltage_unit(unit: str, factor: float) -> None:
    channels = [_channel(_scp(1), sensitivity="4", unit=unit), _channel(_scp(2), sensitivity="4", unit=unit)]
    r = read_dicom_ecg(_dump(_group(channels)))
    assert r.uv_per_unit == 4 * factor  # exactly: a factor off by a millionth is a wrong amplitude
    assert r.microvolts()[0].tolist() == pytest.approx([v * 4 * factor for v in (10, 30, 50)])


def test_correction_factor_and_baseline_default_to_none() -> None:
    plain = read_dicom_ecg(_dump(_group([_channel(_scp(1), correction=""), _channel(_scp(2), baseline="")])))
    assert plain.microvolts()[0].tolist() == [25.0, 75.0, 125.0]
    corrected = read_dicom_ecg(
        _dump(
            _group([_channel(_scp(1), correction="2", baseline="5"), _channel(_scp(2), correction="2", baseline="5")])
        )
    )
    assert corrected.microvolts()[0].tolist() == [55.0, 155.0, 255.0]  # 10 x 2.5 x 2 + 5


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        (dict(unit="mm[Hg]"), UnsupportedFeatureError, "units 'mm[Hg]', not a voltage"),
        (dict(sensitivity="9.99"), ProtocolError, "unreadable sensitivity or baseline"),  # 9.99: see below
        (dict(baseline="9.99"), ProtocolError, "unreadable sensitivity or baseline"),
        (dict(sensitivity="0"), ProtocolError, "has sensitivity 0"),
        (dict(correction="0"), ProtocolError, "has sensitivity 0"),
        (dict(baseline="inf"), ProtocolError, "has sensitivity 2.5"),
    ],
)
def test_channel_scale_refusals(kwargs: dict, error: type, needle: str) -> None:
    data = _dump(_group([_channel(_scp(1), **kwargs), _channel(_scp(2))]))
    data = data.replace(b"9.99", b"abc ")  # pydicom will not write a DS that is not a number: we do
    with pytest.raises(error, match=needle.replace("[", r"\[").replace("]", r"\]")):
        read_dicom_ecg(data)


def test_an_inverted_channel_keeps_its_sign() -> None:
    r = read_dicom_ecg(_dump(_group([_channel(_scp(1), sensitivity="-2.5"), _channel(_scp(2))])))
    assert r.microvolts()[0].tolist() == [-25.0, -75.0, -125.0]


@pytest.mark.parametrize(
    "source,label,name,derived",
    [
        (_scp(61), "", "III", False),
        (_code("2:61", "MDC", "Lead III"), "", "III", False),
        (_code("2:31", "MDC", "Derived Lead I"), "", "I", True),  # MDC 31-38, 111-114: derived leads
        (_code("2:38", "MDC", "Derived Lead V6"), "", "V6", True),
        (_code("2:111", "MDC", "Derived Lead III"), "", "III", True),
        (_code("2:114", "MDC", "Derived Lead aVF"), "", "aVF", True),
        (_code("2:30", "MDC", "Frank Lead H"), "", "fH", False),
        (_code("2:61", "SCPECG", "x"), "", None, None),  # an MDC code under the SCP scheme: not a lead code
        (_code("5.6.3-9-61", "MDC", "x"), "", None, None),  # and the other way round
        (_code("2:45", "MDC", "Lead V4"), "", "V4", False),  # 31-60 (SCP calibration) are not taken as numbers
        (_code("99", "LN", "Derived Lead aVR"), "", "aVR", True),  # by its meaning
        (_code("99", "LN", "Lead V5R"), "", "V5R", False),
        (None, "Lead V2", "V2", False),  # by its label
        (None, "MDC_ECG_LEAD_V3", "V3", False),
        (None, "Derived lead II", "II", True),
        (None, "Respiration", None, None),
    ],
)
def test_how_a_channel_is_recognised_as_a_lead(
    source: Dataset | None, label: str, name: str | None, derived: bool | None
) -> None:
    channels = [_channel(_scp(4)), _channel(source, label=label)]  # V2 plus the channel under test
    if name is None:
        r = read_dicom_ecg(_dump(_group(channels)))
        assert r.lead_names == ("V2",) or (name is None and len(r.lead_names) == 1)
        return
    if name == "V2":
        channels[0] = _channel(_scp(5))  # keep the names unique
    r = read_dicom_ecg(_dump(_group(channels)))
    assert name in r.lead_names
    assert (name in r.derived_leads) is derived


def test_the_rhythm_group_is_chosen_over_median_beats_and_derived_data() -> None:
    median = _group(samples=np.ones((3, 2), dtype=int), label="MEDIAN BEAT")
    rhythm = _group(label="RHYTHM")
    assert read_dicom_ecg(_dump(median, rhythm)).lead("I").tolist() == [10, 30, 50]
    assert read_dicom_ecg(_dump(rhythm, median)).lead("I").tolist() == [10, 30, 50]
    beat = _group(samples=np.ones((3, 2), dtype=int), label="BEAT 1")
    unlabelled = _group(label="")
    assert read_dicom_ecg(_dump(beat, unlabelled)).lead("I").tolist() == [10, 30, 50]
    derived = _group(samples=np.ones((3, 2), dtype=int), label="", originality="DERIVED")
    assert read_dicom_ecg(_dump(derived, unlabelled)).lead("I").tolist() == [10, 30, 50]
    short = _group(samples=SAMPLES[:2], label="")
    assert read_dicom_ecg(_dump(short, unlabelled)).n_samples == 3  # then the longest
    assert read_dicom_ecg(_dump(unlabelled, short)).n_samples == 3
    one_lead = _group([_channel(_scp(1)), _channel(None, label="Pleth")], label="")
    assert read_dicom_ecg(_dump(one_lead, unlabelled)).n_leads == 6  # then the one with more leads


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(n_channels=3), "declares 3 channels x 3 samples but defines 2"),
        (dict(n_channels=0), "declares 0 channels"),
        (dict(n_samples=0), "x 0 samples"),
        (dict(rate=None), "sampling frequency is missing or unreadable"),
        (dict(rate="0"), "sampling frequency 0.0"),
        (dict(rate="-500"), "sampling frequency -500.0"),
        (dict(data=b"\x01\x02"), "2 bytes, 12 expected"),
    ],
)
def test_group_refusals(kwargs: dict, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        read_dicom_ecg(_dump(_group(**kwargs)))


def test_one_channel_and_one_sample_is_enough() -> None:
    r = read_dicom_ecg(_dump(_group([_channel(_scp(4))], samples=np.array([[7]]))))
    assert r.lead_names == ("V2",) and r.samples.tolist() == [[7]]


def test_the_sample_count_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import devices.ecg.dicom_input as dicom_input

    assert dicom_input.MAX_SAMPLES == 50_000_000  # 12 leads x 500 Hz x 2.3 h: far beyond a rest ECG
    monkeypatch.setattr(dicom_input, "MAX_SAMPLES", 6)
    assert read_dicom_ecg(_dump()).n_samples == 3  # 2 x 3 = 6: the limit itself
    monkeypatch.setattr(dicom_input, "MAX_SAMPLES", 5)
    with pytest.raises(UnsupportedFeatureError, match="2 x 3 samples is more than we accept"):
        read_dicom_ecg(_dump())


def test_a_group_without_data_or_without_leads_is_refused() -> None:
    g = _group()
    del g.WaveformData
    with pytest.raises(ProtocolError, match="no Waveform Data"):
        read_dicom_ecg(_dump(g))
    with pytest.raises(ProtocolError, match="no ECG leads"):
        read_dicom_ecg(_dump(_group([_channel(None, label="Pleth"), _channel(None, label="Resp")])))


def test_channels_sampled_apart_are_refused() -> None:
    assert read_dicom_ecg(_dump(_group([_channel(_scp(1), skew="0"), _channel(_scp(2), skew="")]))).n_leads == 6
    with pytest.raises(UnsupportedFeatureError, match=r"sampled 0\.5 ms apart"):
        read_dicom_ecg(_dump(_group([_channel(_scp(1), skew="0.5"), _channel(_scp(2))])))


@pytest.mark.parametrize(
    "attrs,expected",
    [
        (
            dict(AcquisitionDateTime="20240506070809.25+0200"),
            dt.datetime(2024, 5, 6, 7, 8, 9, 250000, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        ),
        (
            dict(AcquisitionDateTime="20240506070809.123456-0530"),
            dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(-dt.timedelta(hours=5, minutes=30))),
        ),
        (
            dict(AcquisitionDateTime="20240506070809+1400"),
            dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=14))),
        ),
        (dict(AcquisitionDateTime="20240506070809+1500"), dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),  # no such zone
        (dict(AcquisitionDateTime="20240506070809+0160"), dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
        (
            dict(AcquisitionDateTime="20240506070809+0159"),
            dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=1, minutes=59))),
        ),
        (
            dict(AcquisitionDateTime="20240506", TimezoneOffsetFromUTC="+0800"),
            dt.datetime(2024, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=8))),
        ),
        (
            dict(AcquisitionDateTime="2024050607", TimezoneOffsetFromUTC="-0100"),
            dt.datetime(2024, 5, 6, 7, tzinfo=dt.timezone(-dt.timedelta(hours=1))),
        ),
        (dict(AcquisitionDateTime="20241306"), None),  # impossible: the next source is used
        (
            dict(AcquisitionDateTime=None, AcquisitionDate="20240506", AcquisitionTime="0708"),
            dt.datetime(2024, 5, 6, 7, 8, tzinfo=UTC),
        ),
        (
            dict(AcquisitionDateTime=None, AcquisitionDate="20240506", ContentDate="20240507", ContentTime="010203"),
            dt.datetime(2024, 5, 7, 1, 2, 3, tzinfo=UTC),
        ),  # a date without its time is skipped
        (
            dict(AcquisitionDateTime="garbage", SeriesDate="20240508", SeriesTime="1200"),
            dt.datetime(2024, 5, 8, 12, tzinfo=UTC),
        ),
        (
            dict(AcquisitionDateTime=None, StudyDate="20240509", StudyTime="1300"),
            dt.datetime(2024, 5, 9, 13, tzinfo=UTC),
        ),
    ],
)
def test_acquisition_time_sources_and_zones(attrs: dict, expected: dt.datetime | None) -> None:
    data = _dump(**attrs)
    received = dt.datetime(2026, 1, 1, tzinfo=UTC)
    r = read_dicom_ecg(data, received_at=received)
    if expected is None:
        assert (r.acquired_at, r.time_source) == (received, TimeSource.GATEWAY_RECEIPT)
    else:
        assert (r.acquired_at, r.time_source) == (expected, TimeSource.FILE)


def test_the_group_time_offset_shifts_the_start_and_no_time_is_refused() -> None:
    g = _group()
    g.MultiplexGroupTimeOffset = "1500"
    assert read_dicom_ecg(_dump(g)).acquired_at == dt.datetime(2024, 5, 6, 7, 8, 10, 500000, tzinfo=UTC)
    g.MultiplexGroupTimeOffset = ""
    assert read_dicom_ecg(_dump(g)).acquired_at == dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    with pytest.raises(ProtocolError, match="no acquisition date/time"):
        read_dicom_ecg(_dump(AcquisitionDateTime=None))


def test_patient_and_device_as_the_object_names_them() -> None:
    data = _dump(
        PatientID=" P-9 ",
        PatientName="Li^Wei",
        PatientBirthDate="19530518",
        PatientSex="f",
        IssuerOfPatientID="county",
        Manufacturer=" Mortara ",
        ManufacturerModelName="ELI",
        DeviceSerialNumber="S1",
        SoftwareVersions=["1.0", "2.1"],
    )
    r = read_dicom_ecg(data)
    assert r.patient == Patient("P-9", "Li^Wei", dt.date(1953, 5, 18), "F", issuer="county")
    assert r.device == DeviceIdentity("Mortara", "ELI", "S1", "", "1.0\\2.1")
    r = read_dicom_ecg(_dump(PatientID="P-9", PatientBirthDate="19531318", PatientSex="X", SoftwareVersions="3.1"))
    assert r.patient == Patient("P-9") and r.device.software_version == "3.1"
    assert read_dicom_ecg(_dump(PatientID="  ")).patient is None  # no identifier: unassigned


def test_what_looks_like_dicom() -> None:
    assert looks_like_dicom(_dump())
    assert looks_like_dicom(bytes(128) + b"DICM")  # the preamble alone says so
    assert not looks_like_dicom(bytes(128) + b"DICX")
    assert not looks_like_dicom(bytes(127) + b"DICM")
    assert looks_like_dicom(b"\x08\x00\x05\x00CS\x0a\x00")  # a raw data set: (0008,0005) first
    assert looks_like_dicom(b"\x08\x00\xff\x0fCS\x0a\x00")  # element 0FFF: still the header
    assert looks_like_dicom(b"\x02\x00\x00\x00UL\x04\x00")  # or its file meta group 0002
    assert not looks_like_dicom(b"\x08\x00\x05\x00CS\x0a")  # shorter than one element header
    assert not looks_like_dicom(b"\x10\x00\x10\x00PN\x04\x00")  # group 0010 first: not a start
    assert not looks_like_dicom(b"\x08\x00\x00\x10CS\x0a\x00")  # element 1000 of group 0008: too far
    assert not looks_like_dicom(b"\x00\x08\x00\x05CS\x0a\x00")  # big-endian tag order


def test_a_raw_data_set_without_preamble_is_recognised_whatever_its_name() -> None:
    """Bug found by the mutation audit: the element number was compared as bytes, so a raw data
    set starting with (0008,0005) Specific Character Set - the usual first element - was not
    recognised, and a cart's file named without ".dcm" was refused as "not an ECG file"."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from devices.ecg.formats import decode_ecg, detect_format

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, dcmread(get_testdata_file("waveform_ecg.dcm")))
    raw = buf.getvalue()
    assert raw[:4] == b"\x08\x00\x05\x00"
    assert detect_format(raw, "ECG0001") == "dicom"
    assert decode_ecg(raw, "ECG0001").n_samples == 10000


@pytest.mark.parametrize(
    "number,name",
    [
        (31, "I"),
        (32, "II"),
        (33, "V1"),
        (34, "V2"),
        (35, "V3"),
        (36, "V4"),
        (37, "V5"),
        (38, "V6"),
        (111, "III"),
        (112, "aVR"),
        (113, "aVL"),
        (114, "aVF"),
    ],
)
def test_every_mdc_derived_lead_code(number: int, name: str) -> None:
    """By the code alone (a meaningless CodeMeaning): MDC 2:31-38 and 2:111-114 are derived leads."""
    other = _channel(_scp(9 if name != "V7" else 10))  # V7: a lead none of these is
    r = read_dicom_ecg(_dump(_group([other, _channel(_code(f"2:{number}", "MDC", "x"))])))
    assert name in r.lead_names and name in r.derived_leads


@pytest.mark.parametrize("number,lead", [(39, None), (60, None), (61, "III"), (30, "fH"), (39 + 40, None)])
def test_mdc_numbers_that_are_scp_calibration_signals_are_not_leads(number: int, lead: str | None) -> None:
    r = read_dicom_ecg(_dump(_group([_channel(_scp(9)), _channel(_code(f"2:{number}", "MDC", "x"))])))
    assert r.lead_names == ("V7",) if lead is None else lead in r.lead_names


def test_missing_counts_are_not_guessed() -> None:
    g = _group([_channel(_scp(4))], samples=np.array([[7], [8]]))
    del g.NumberOfWaveformChannels
    with pytest.raises(ProtocolError, match="declares 0 channels"):
        read_dicom_ecg(_dump(g))
    g = _group([_channel(_scp(4))], samples=np.array([[7], [8]]))
    del g.NumberOfWaveformSamples
    with pytest.raises(ProtocolError, match="x 0 samples"):
        read_dicom_ecg(_dump(g))


def test_a_slow_but_positive_rate_is_read_and_equal_groups_keep_the_first() -> None:
    assert read_dicom_ecg(_dump(_group(rate="25"))).sampling_rate_hz == 25.0  # the slowest an ECG can be
    with pytest.raises(ProtocolError, match=r"0\.5 Hz is outside the plausible 25-32000 Hz"):
        read_dicom_ecg(_dump(_group(rate="0.5")))
    first = _group(label="RHYTHM")
    second = _group(samples=SAMPLES * 2, label="RHYTHM")
    assert read_dicom_ecg(_dump(first, second)).lead("I").tolist() == [10, 30, 50]


def test_a_recording_the_object_cannot_make_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="DICOM ECG: acquired_at must carry a time zone"):
        read_dicom_ecg(_dump(AcquisitionDateTime=None), received_at=dt.datetime(2026, 1, 1))


# -- the cart's annotations: measurements and statements ------------------------------------------


def _annotation(
    value: str | list[str] | None = "420",
    code: tuple[str, str] | None = ("2:16160", "MDC"),
    unit: str | None = "ms",
    *,
    refs: list[int] | int | None = None,
    group: int | None = None,
    text: str | None = None,
    statement_code: tuple[str, str] | None = None,
    algorithm: str | None = None,
    temporal: str | None = None,
) -> Dataset:
    """One Waveform Annotation item as carts write them (refs (1, 0): the whole group)."""
    item = Dataset()
    if code is not None:
        concept = _code(code[0], code[1], "x")
        if algorithm is not None:
            concept.ModifierCodeSequence = Sequence([_code(algorithm, "DCM", "QTc algorithm")])
        item.ConceptNameCodeSequence = Sequence([concept])
    if unit is not None:
        item.MeasurementUnitsCodeSequence = Sequence([_code(unit, "UCUM", unit)])
    if value is not None:
        item.NumericValue = value
    item.ReferencedWaveformChannels = [1, 0] if refs is None else refs
    if group is not None:
        item.AnnotationGroupNumber = group
    if text is not None:
        item.UnformattedTextValue = text
    if statement_code is not None:
        item.ConceptCodeSequence = Sequence([_code(statement_code[0], "SCPECG", statement_code[1])])
    if temporal is not None:
        item.TemporalRangeType, item.ReferencedSamplePositions = temporal, 2
    return item


def _measured(*items: Dataset, groups: tuple[Dataset, ...] = (), **attrs: object) -> list[tuple]:
    """(kind, value, lead, method, note) of every measurement the decoder takes from the items."""
    r = read_dicom_ecg(_dump(*groups, WaveformAnnotationSequence=Sequence(list(items)), **attrs))
    return [(m.kind, m.value, m.lead, m.method, m.note) for m in r.measurements]


@pytest.mark.parametrize(
    "code,expected",
    [
        (("2:16160", "MDC"), [("qt-interval", 420.0, "", "", "")]),
        (("5.13.5-11", "SCPECG"), [("qt-interval", 420.0, "", "", "")]),  # the retired code Mortara writes
        (("5.13.5-11", "scpecg"), [("qt-interval", 420.0, "", "", "")]),  # schemes compare case-blind
        (("5.13.5-9", "SCPECG"), [("qrs-duration", 420.0, "", "", "")]),
        (("2:15880", "MDC"), [("qtc-interval", 420.0, "", "bazett", "")]),  # the formula in the code
        (("2:15892", "MDC"), [("qtc-interval", 420.0, "", "fridericia", "")]),
        (("2:15876", "MDC"), [("qtc-interval", 420.0, "", "", "")]),  # no formula named: none guessed
        (("5.13.5-11", "MDC"), []),  # an SCP code under the MDC scheme names nothing
        (("2:16160", "SCPECG"), []),  # and an MDC code under the SCP scheme
        (("2:15880", "SCPECG"), []),
        (("2:99999", "MDC"), []),  # a code we do not know: dropped, never guessed
        (("8867-4", "LN"), []),
    ],
)
def test_an_annotation_is_a_measurement_only_under_a_code_we_know(code: tuple[str, str], expected: list[tuple]) -> None:
    """A QT interval filed under the wrong kind (or a code we do not know read as one) would put a
    wrong number in front of the reading cardiologist."""
    assert _measured(_annotation(code=code)) == expected


@pytest.mark.parametrize(
    "algorithm,method",
    [("122730", "bazett"), ("122731", "hodges"), ("122732", "fridericia"), ("122733", "framingham"), ("999", "")],
)
def test_the_qtc_formula_is_read_from_the_algorithm_modifier(algorithm: str, method: str) -> None:
    """A QTc without its formula (or with the wrong one) cannot be compared with a later ECG's."""
    assert _measured(_annotation(code=("2:15876", "MDC"), algorithm=algorithm)) == [
        ("qtc-interval", 420.0, "", method, "")
    ]


@pytest.mark.parametrize(
    "unit,value,kind,expected",
    [
        ("ms", "420", "2:16160", 420.0),
        ("s", "0.42", "2:16160", 420.0),  # seconds: a QT of 0.42 must not be read as 0.42 ms (dropped)
        ("us", "420000", "2:16160", 420.0),
        ("/min", "60", "2:16770", 60.0),
        ("{beats}/min", "61", "2:16770", 61.0),
        ("{H.B.}/min", "62", "2:16770", 62.0),
        ("bpm", "63", "2:16770", 63.0),
        ("deg", "-61", "2:16132", -61.0),
        ("uV", "803", "2:2048", 803.0),
        ("mV", "0.803", "2:2048", 803.0),
    ],
)
def test_every_measurement_unit_is_brought_to_the_kinds_unit(unit: str, value: str, kind: str, expected: float) -> None:
    """A value in seconds or millivolts read as milliseconds or microvolts is off by a thousand."""
    refs = [1, 1] if kind == "2:2048" else None  # R amplitude is per lead
    found = _measured(_annotation(value, (kind, "MDC"), unit, refs=refs))
    assert [(m[1], m[2]) for m in found] == [(pytest.approx(expected, rel=1e-12), "I" if refs else "")]


@pytest.mark.parametrize(
    "unit,value",
    [
        ("deg", "420"),  # an interval in degrees: not an interval
        ("uV", "420"),
        ("min", "420"),  # a unit we do not know
        (None, "420"),  # no unit at all
        ("ms", "0"),  # a cart's "not computed" (Mortara's PP 0): not a finding
        ("ms", "abc "),  # not a number
    ],
)
def test_a_measurement_in_a_unit_that_is_not_its_own_is_dropped(unit: str | None, value: str) -> None:
    """Better no QT interval than one whose unit we had to guess; the rest of the ECG still decodes."""
    item = _annotation("9.99" if value == "abc " else value, unit=unit)
    data = _dump(WaveformAnnotationSequence=Sequence([item, _annotation("88", ("2:16156", "MDC"))]))
    r = read_dicom_ecg(data.replace(b"9.99", b"abc "))  # pydicom will not write a DS that is not a number
    assert [(m.kind, m.value) for m in r.measurements] == [("qrs-duration", 88.0)]


@pytest.mark.parametrize(
    "unit,note",
    [
        ("ms", "unit written as 'ms', read as degrees"),
        (None, "unit written as 'nothing', read as degrees"),
        ("deg", ""),
    ],
)
def test_an_axis_is_an_angle_whatever_unit_its_writer_gave(unit: str | None, note: str) -> None:
    """ECGToolkit writes "ms" for its axes: the QRS axis is still -61 degrees, and says what we read."""
    assert _measured(_annotation("-61", ("2:16132", "MDC"), unit)) == [("qrs-axis", -61.0, "", "", note)]


def test_several_numeric_values_keep_the_first() -> None:
    """The first value is the measurement; a later one (a cart's second reading) must not replace it."""
    assert _measured(_annotation(["420", "999"])) == [("qt-interval", 420.0, "", "", "")]


def test_per_lead_measurements_name_the_lead_of_the_referenced_channel() -> None:
    """An R amplitude on the wrong lead misplaces a hypertrophy criterion: the channel number counts
    every channel of the group (a respiration channel too), from 1."""
    rhythm = _group(
        [_channel(_scp(1)), _channel(None, label="Respiration"), _channel(_scp(2))],
        samples=np.array([[10, 0, -20], [30, 0, -40], [50, 0, -60]]),
    )
    r_amplitude = ("2:2048", "MDC")
    assert _measured(_annotation("803", r_amplitude, "uV", refs=[1, 3]), groups=(rhythm,)) == [
        ("lead-r-amplitude", 803.0, "II", "", "")
    ]
    assert _measured(_annotation("803", r_amplitude, "uV", refs=[1, 1]), groups=(rhythm,)) == [
        ("lead-r-amplitude", 803.0, "I", "", "")
    ]
    # a global code on one lead is that lead's value (the lead-qrs-duration of V1, not the QRS duration)
    assert _measured(_annotation("88", ("2:16156", "MDC"), refs=[1, 1]), groups=(rhythm,)) == [
        ("lead-qrs-duration", 88.0, "I", "", "")
    ]
    # the per-lead code itself on one lead
    assert _measured(_annotation("88", ("2:7936", "MDC"), refs=[1, 3]), groups=(rhythm,)) == [
        ("lead-qrs-duration", 88.0, "II", "", "")
    ]


def test_a_per_lead_measurement_in_the_second_group_names_that_groups_lead() -> None:
    """Groups are numbered from 1 in the order of the object: group 2's first channel is its own."""
    rhythm = _group()
    median = _group([_channel(_scp(2)), _channel(_scp(1))], label="MEDIAN BEAT")
    assert _measured(_annotation("803", ("2:2048", "MDC"), "uV", refs=[2, 1]), groups=(rhythm, median)) == [
        ("lead-r-amplitude", 803.0, "II", "", "")
    ]


@pytest.mark.parametrize(
    "refs",
    [
        [1, 3],  # the group has 2 channels
        [1, 1, 1, 2],  # two leads at once: whose value is it?
        [2, 1],  # there is no group 2
        [0, 1],  # nor a group 0
    ],
)
def test_a_per_lead_measurement_whose_lead_cannot_be_named_is_dropped(refs: list[int]) -> None:
    """A per-lead value put on a guessed lead (or on every lead) would be a value on the wrong lead."""
    assert _measured(_annotation("803", ("2:2048", "MDC"), "uV", refs=refs)) == []
    assert _measured(_annotation("88", ("2:16156", "MDC"), refs=refs)) == []


def test_a_per_lead_code_without_a_lead_and_a_reference_to_a_non_lead_channel_are_dropped() -> None:
    """An R amplitude that names no lead is no finding; nor is a QRS duration 'of' a respiration channel."""
    assert _measured(_annotation("803", ("2:2048", "MDC"), "uV")) == []  # refs (1, 0): the whole group
    rhythm = _group(
        [_channel(_scp(1)), _channel(None, label="Respiration"), _channel(_scp(2))],
        samples=np.array([[10, 0, -20], [30, 0, -40], [50, 0, -60]]),
    )
    assert _measured(_annotation("88", ("2:16156", "MDC"), refs=[1, 2]), groups=(rhythm,)) == []


@pytest.mark.parametrize("refs,lead", [([1, 2, 7], "II"), (1, ""), ([], "")])
def test_odd_channel_references_do_not_stop_decoding(refs: list[int] | int, lead: str) -> None:
    """A writer's stray value after the (group, channel) pairs is ignored; a lone value is no pair:
    the measurement is the whole group's."""
    kind = "lead-qrs-duration" if lead else "qrs-duration"
    assert _measured(_annotation("88", ("2:16156", "MDC"), refs=refs)) == [(kind, 88.0, lead, "", "")]


def test_the_first_of_two_values_for_one_measurement_is_kept() -> None:
    """A cart that writes QT twice (measured, then rounded) must not have the later one win silently."""
    assert _measured(_annotation("420"), _annotation("424")) == [("qt-interval", 420.0, "", "", "")]


def test_fiducial_points_are_not_findings() -> None:
    """A QRS-onset point at sample 460 (Mortara writes dozens) is not a QRS duration of 460 ms."""
    assert _measured(_annotation("460", temporal="POINT"), _annotation("88", ("2:16156", "MDC"))) == [
        ("qrs-duration", 88.0, "", "", "")
    ]


# Contributing Equipment of an object the gateway converted (padded as some writers pad it)
LASTMILE_EQUIPMENT = Sequence([Dataset()])
LASTMILE_EQUIPMENT[0].Manufacturer = " Lastmile "


def _statements_of(*items: Dataset, **attrs: object) -> list[tuple[str, StatementSource, str]]:
    r = read_dicom_ecg(_dump(WaveformAnnotationSequence=Sequence(list(items)), **attrs))
    return [(s.text, s.source, s.code) for s in r.statements]


def test_statements_as_text_or_as_codes() -> None:
    """The cart's interpretation reaches the cardiologist as it wrote it: text, or a coded statement's meaning."""
    items = [
        _annotation(None, None, None, text=" SINUS RHYTHM "),
        _annotation(None, None, None, statement_code=("NORM", "Normal ECG")),
        _annotation(None, None, None, text=""),  # nothing to say: no statement
        _annotation(None, None, None, group=2, text="LVH"),  # group 2 of a vendor's object is still the device's
    ]
    assert _statements_of(*items) == [
        ("SINUS RHYTHM", StatementSource.DEVICE, ""),
        ("Normal ECG", StatementSource.DEVICE, "NORM"),
        ("LVH", StatementSource.DEVICE, ""),
    ]


def test_in_an_object_we_converted_the_group_says_who_made_the_statement() -> None:
    """A physician's over-read shown as the cart's guess (or our own note shown as a finding) would
    mislead the cardiologist who reads the ECG again."""
    items = [
        _annotation(None, None, None, group=1, text="device"),
        _annotation(None, None, None, group=2, text="physician"),
        _annotation(None, None, None, group=3, text="comment"),
        _annotation(None, None, None, group=0, text="ours"),
        _annotation(None, None, None, group=4, text="ours"),
        _annotation(None, None, None, text="ours"),
        _annotation("420", group=1),
        _annotation("88", ("2:16156", "MDC"), group=None),  # the gateway's own note: skipped
    ]
    assert _statements_of(*items, ContributingEquipmentSequence=LASTMILE_EQUIPMENT) == [
        ("device", StatementSource.DEVICE, ""),
        ("physician", StatementSource.PHYSICIAN, ""),
        ("comment", StatementSource.COMMENT, ""),
    ]
    assert _measured(*items, ContributingEquipmentSequence=LASTMILE_EQUIPMENT) == [("qt-interval", 420.0, "", "", "")]
    other = Sequence([Dataset()])
    other[0].Manufacturer = "Lastmile Converter"  # not us
    assert len(_statements_of(*items, ContributingEquipmentSequence=other)) == 6


# -- deflated objects -------------------------------------------------------------------------------


def _inflated_size(part10: bytes) -> int:
    """Bytes the deflated data set of a Part-10 file inflates to (it starts where the file meta
    group, whose length the element at 132-143 gives, ends)."""
    meta_end = 144 + int.from_bytes(part10[140:144], "little")
    return len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(part10[meta_end:]))


def test_a_deflated_object_reads_as_the_same_ecg() -> None:
    """A cart's deflated file misread (or refused) would lose the ECG: it decodes to the same one."""
    plain, deflated = read_dicom_ecg(_dump()), read_dicom_ecg(_dump(deflated=True))
    assert deflated.samples.tolist() == plain.samples.tolist() and deflated.lead_names == plain.lead_names
    assert (deflated.acquired_at, deflated.uv_per_unit) == (plain.acquired_at, plain.uv_per_unit)


def test_a_deflated_object_is_inflated_by_us_up_to_the_cap_and_no_further(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deflate bomb (1 MB that inflates to 1 GiB) must be refused, typed, after inflating at most
    the cap, before pydicom would inflate it whole in the 512 MB of a Pi: the cap is ours, exact."""
    import devices.ecg.dicom_input as dicom_input

    assert dicom_input.MAX_INFLATED_BYTES == 64 * 2**20  # 4x a 10-minute 12-lead 1000 Hz 16-bit rhythm (14.4 MB)
    data = _dump(deflated=True)
    size = _inflated_size(data)
    assert size > 400  # the waveform, its definitions and the header: a real data set
    monkeypatch.setattr(dicom_input, "MAX_INFLATED_BYTES", size)
    assert read_dicom_ecg(data).lead("I").tolist() == [10, 30, 50]  # the cap itself
    monkeypatch.setattr(dicom_input, "MAX_INFLATED_BYTES", size - 1)
    with pytest.raises(InflateLimitError, match=f"more than {size - 1} bytes"):
        read_dicom_ecg(data)
    # objects that are not deflated are not inflated: no cap applies to them
    monkeypatch.setattr(dicom_input, "MAX_INFLATED_BYTES", 1)
    assert read_dicom_ecg(_dump()).lead("I").tolist() == [10, 30, 50]
    assert read_dicom_ecg(_dump(big_endian=True)).lead("I").tolist() == [10, 30, 50]


def test_a_raw_data_set_is_never_taken_for_a_deflated_file_by_its_bytes_at_132() -> None:
    """A cart's data set written without the Part-10 preamble, whose text happens to hold at byte
    132 what a deflated file's meta group holds there, is still read: only "DICM" at 128 makes a
    file Part 10 (refusing it as a broken deflate stream would lose the ECG)."""
    filler = "X" * 120
    part10 = _dump(InstitutionAddress=filler)
    raw = bytearray(part10[144 + int.from_bytes(part10[140:144], "little") :])
    at = raw.index(filler.encode())
    assert at < 132 and at + len(filler) > 162
    raw[132:162] = b"\x02\x00\x10\x00UI\x16\x00" + DeflatedExplicitVRLittleEndian.encode()
    assert looks_like_dicom(bytes(raw))
    assert read_dicom_ecg(bytes(raw)).lead("I").tolist() == [10, 30, 50]


def test_unreadable_bytes_and_damaged_elements_are_refused_typed_and_say_which() -> None:
    """The operator is told what is wrong with the cart's file (not a crash, nor a misleading
    reason): a file pydicom cannot parse is "not readable"; an element that fails only when it
    is read (a group time offset that is not a number) is a "damaged element"."""
    data = _dump()
    with pytest.raises(ProtocolError, match=r"^DICOM file is not readable \("):
        read_dicom_ecg(data[: data.index(b"\x00\x54\x00\x01") + 9])  # cut inside the waveform sequence's header
    g = _group()
    g.MultiplexGroupTimeOffset = "9.99"
    damaged = _dump(g).replace(b"9.99", b"abc ")
    with pytest.raises(ProtocolError, match=r"^DICOM ECG: damaged element \(ValueError: "):
        read_dicom_ecg(damaged)


def test_only_a_median_group_becomes_the_median_beats() -> None:
    """A second rhythm group (or the rhythm itself) shown as the cart's median beat would put
    seconds of rhythm where the cardiologist expects one averaged beat per lead."""
    second_rhythm = _group(samples=SAMPLES * 2, label="")
    assert read_dicom_ecg(_dump(_group(), second_rhythm)).median_beats is None
    median_only = _group(label="MEDIAN BEAT")
    assert read_dicom_ecg(_dump(median_only)).median_beats is None  # it is taken as the rhythm, once
    median = read_dicom_ecg(_dump(_group(), _group(samples=SAMPLES * 2, label="MEDIAN BEAT"))).median_beats
    assert median is not None and median.samples.tolist() == (SAMPLES * 2).T.tolist()
