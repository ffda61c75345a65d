"""The cart's own findings (measurements, statements, median beats), per format, against the
values the files carry - decoded, written into DICOM, validated by dciodvfy, and read back by our
DICOM decoder and by an independent one (ecgdatakit).

Where each cart value is in the files:
- ecgtoolkit_Example.scp section 7: reference-beat boundaries P 286-388, QRS 434-554, T end 854 ms
  (PR 148, QRS 120, QT 420, P 102), axes 44/-61/86, QTc 443 (formula not given); no statements.
- abtahi_…SCP (Welch Allyn): section 7 RR 1000, boundaries 100/192/267/355/653 (PR 167, QRS 88,
  QT 386, P 92), axes 48/48/49, ventricular rate 60, QTc 386 Bazett; section 8 three statements
  (Swedish, latin-1); section 10 per-lead values (lead I: QRS 88, R 803 uV).
- fda_hl7_Example_aECG.xml: representative-beat annotation set P 102, PR 148, QRS 120, QT 420,
  QTc 443, axes 44/-61/86; rhythm annotation "Sinus Rhythm" by the ELI250; the subject finding
  comment; a REPRESENTATIVE_BEAT series (12 x 599 at 500 Hz).
- ecgtoolkit_Example.dcm: annotations PR 148, QRS 120, QT 420, QTc 443 and axes 44/-61/86 (with
  the unit "ms", ECGToolkit's bug); a MEDIAN BEAT group of 12 x 600.
"""

from __future__ import annotations

import binascii
import dataclasses
import datetime as dt
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.ecg.dicom_input import read_dicom_ecg
from devices.ecg.findings import EcgMeasurement, MedianBeats, StatementSource
from devices.ecg.formats import decode_ecg
from devices.ecg.recording import EcgRecording
from devices.ecg.scp import parse_scp, read_scp
from devices.identity import Patient
from tests.conftest import shared_file
from tests.dicom_validation import dciodvfy_problems
from tests.ecg_file_mutations import decodes_or_refuses
from uploader.dicom_ecg import (
    GENERAL_ECG,
    TWELVE_LEAD_ECG,
    StationInfo,
    StudyRequest,
    build_ecg_dataset,
    mint_uids,
    recording_to_dicom_bytes,
)

UTC = dt.timezone.utc
STATION = StationInfo("clinic-01", "Village clinic")
GLOBAL = (
    "heart-rate",
    "rr-interval",
    "p-duration",
    "pr-interval",
    "qrs-duration",
    "qt-interval",
    "qtc-interval",
    "p-axis",
    "qrs-axis",
    "t-axis",
)
TOOLKIT = {
    "p-duration": 102,
    "pr-interval": 148,
    "qrs-duration": 120,
    "qt-interval": 420,
    "qtc-interval": 443,
    "p-axis": 44,
    "qrs-axis": -61,
    "t-axis": 86,
}
# The cart's values, per file (see the module docstring for where each one is).
CART: dict[str, dict[str, float]] = {
    "scp/ecgtoolkit_Example.scp": TOOLKIT,
    "scp/abtahi_ECG_20170504_163507_123456789.SCP": {
        "heart-rate": 60,
        "rr-interval": 1000,
        "p-duration": 92,
        "pr-interval": 167,
        "qrs-duration": 88,
        "qt-interval": 386,
        "qtc-interval": 386,
        "p-axis": 48,
        "qrs-axis": 48,
        "t-axis": 49,
    },
    "aecg/fda_hl7_Example_aECG.xml": TOOLKIT,
    "dicom/ecgtoolkit_Example.dcm": {k: v for k, v in TOOLKIT.items() if k != "p-duration"},
}
STATEMENTS: dict[str, list[tuple[str, StatementSource]]] = {
    "scp/ecgtoolkit_Example.scp": [],
    "scp/abtahi_ECG_20170504_163507_123456789.SCP": [
        ("sinusrytm (långsam)", StatementSource.DEVICE),
        ("hög P-amplitud", StatementSource.DEVICE),
        ("normal EKG-variant", StatementSource.DEVICE),
    ],
    "aecg/fda_hl7_Example_aECG.xml": [
        ("Sinus Rhythm", StatementSource.DEVICE),
        ("Subject felt dizzy 2 minutes prior to ECG collection", StatementSource.COMMENT),
    ],
    "dicom/ecgtoolkit_Example.dcm": [],
}
# ecgdatakit's GlobalMeasurements field for each of ours
ECGDATAKIT_FIELDS = {
    "heart-rate": "heart_rate",
    "rr-interval": "rr_interval",
    "pr-interval": "pr_interval",
    "qrs-duration": "qrs_duration",
    "qt-interval": "qt_interval",
    "p-axis": "p_axis",
    "qrs-axis": "qrs_axis",
    "t-axis": "t_axis",
}


def _decode(name: str) -> EcgRecording:
    path = shared_file("ecg", *name.split("/"))
    return decode_ecg(path.read_bytes(), path.name, local_tz=UTC, received_at=dt.datetime(2026, 1, 1, tzinfo=UTC))


def _globals(recording: EcgRecording) -> dict[str, float]:
    return {m.kind: m.value for m in recording.measurements if not m.lead}


def _statements(recording: EcgRecording) -> list[tuple[str, StatementSource]]:
    return [(s.text, s.source) for s in recording.statements]


@pytest.mark.parametrize("name", sorted(CART))
def test_decoders_carry_the_carts_findings(name: str) -> None:
    recording = _decode(name)
    assert _globals(recording) == CART[name]
    assert _statements(recording) == STATEMENTS[name]


@pytest.mark.parametrize("name", sorted(CART))
def test_findings_round_trip_through_our_dicom(name: str, tmp_path: Path) -> None:
    recording = _decode(name)
    data = recording_to_dicom_bytes(recording, mint_uids(), STATION)
    assert dciodvfy_problems(data) == []
    back = read_dicom_ecg(data)
    assert _globals(back) == CART[name]
    assert _statements(back) == STATEMENTS[name]
    assert [(m.kind, m.lead, m.value, m.method) for m in back.measurements] == [
        (m.kind, m.lead, m.value, m.method) for m in recording.measurements
    ]
    # an independent decoder reads the same values from the object we wrote
    import ecgdatakit  # test extra: installed by scripts/setup.sh --test

    path = tmp_path / "out.dcm"
    path.write_bytes(data)
    record = ecgdatakit.FileParser().parse(str(path))
    expected = {ECGDATAKIT_FIELDS[k]: v for k, v in CART[name].items() if k in ECGDATAKIT_FIELDS}
    got = {f: getattr(record.measurements, f) for f in expected}
    assert got == expected
    if "qtc-interval" in CART[name]:
        qtc = record.measurements.qtc_bazett or record.annotations.get("QTc interval global")
        assert qtc in (CART[name]["qtc-interval"], f"{CART[name]['qtc-interval']:g} ms")
    read = [text for text, _ in (record.interpretation.statements if record.interpretation else [])]
    assert [text for text, _ in STATEMENTS[name]] == [t for t in read if t in dict(STATEMENTS[name])]


def test_abtahi_qtc_formula_and_per_lead_values_survive() -> None:
    recording = _decode("scp/abtahi_ECG_20170504_163507_123456789.SCP")
    qtc = next(m for m in recording.measurements if m.kind == "qtc-interval")
    assert qtc.method == "bazett"
    per_lead = {(m.kind, m.lead): m.value for m in recording.measurements if m.lead}
    assert per_lead[("lead-qrs-duration", "I")] == 88 and per_lead[("lead-r-amplitude", "I")] == 803
    assert per_lead[("lead-r-amplitude", "V4")] == 1752
    ds = pydicom.dcmread(io.BytesIO(recording_to_dicom_bytes(recording, mint_uids(), STATION)))
    items = [a for a in ds.WaveformAnnotationSequence if "ConceptNameCodeSequence" in a]
    bazett = [a for a in items if a.ConceptNameCodeSequence[0].CodeValue == "2:15880"]
    assert len(bazett) == 1 and float(bazett[0].NumericValue) == 386
    assert bazett[0].MeasurementUnitsCodeSequence[0].CodeValue == "ms"
    r_v4 = [
        a
        for a in items
        if a.ConceptNameCodeSequence[0].CodeValue == "2:2048"
        and list(a.ReferencedWaveformChannels) == [1, recording.lead_names.index("V4") + 1]
    ]
    assert len(r_v4) == 1 and float(r_v4[0].NumericValue) == 1752
    assert all(a.AnnotationGroupNumber == 1 for a in items if a.ConceptNameCodeSequence[0].CodeValue != "10:11248")


def test_axes_with_a_wrong_unit_are_read_as_degrees_and_say_so() -> None:
    recording = _decode("dicom/ecgtoolkit_Example.dcm")
    axis = next(m for m in recording.measurements if m.kind == "qrs-axis")
    assert axis.value == -61 and axis.unit == "deg" and "'ms'" in axis.note
    ds = build_ecg_dataset(recording, mint_uids(), STATION)
    texts = [str(a.get("UnformattedTextValue", "")) for a in ds.WaveformAnnotationSequence]
    assert any("QRS axis" in t and "read as degrees" in t for t in texts)


def test_mortara_dicom_statements_and_scpecg_codes() -> None:
    from pydicom.data import get_testdata_file

    recording = read_dicom_ecg(Path(get_testdata_file("waveform_ecg.dcm")).read_bytes())
    assert _globals(recording) == {
        "rr-interval": 982,
        "pr-interval": 161,
        "qrs-duration": 75,
        "qt-interval": 368,
        "qtc-interval": 370,
        "p-axis": 74,
        "qrs-axis": 52,
        "t-axis": 57,
    }  # PP 0: dropped
    assert _statements(recording) == [
        ("RITMO SINUSALE", StatementSource.DEVICE),
        ("ECG NORMALE", StatementSource.DEVICE),
    ]
    assert recording.median_beats is not None and recording.median_beats.samples.shape == (12, 1200)


def test_median_beats_of_each_format() -> None:
    scp = _decode("scp/ecgtoolkit_Example.scp").median_beats
    aecg = _decode("aecg/fda_hl7_Example_aECG.xml").median_beats
    dcm = _decode("dicom/ecgtoolkit_Example.dcm").median_beats
    assert scp is not None and aecg is not None and dcm is not None
    assert scp.samples.shape == (12, 599) and aecg.samples.shape == (12, 599) and dcm.samples.shape == (12, 600)
    assert scp.sampling_rate_hz == aecg.sampling_rate_hz == dcm.sampling_rate_hz == 500
    # the same beats in µV, whichever file they came from
    order = [aecg.lead_names.index(n) for n in scp.lead_names]
    assert np.array_equal(scp.samples * scp.uv_per_unit, aecg.samples[order] * aecg.uv_per_unit)


def test_median_group_only_where_the_iod_allows() -> None:
    twelve = _decode("dicom/ecgtoolkit_Example.dcm")
    ds = build_ecg_dataset(twelve, mint_uids(), STATION)
    assert ds.SOPClassUID == TWELVE_LEAD_ECG and len(ds.WaveformSequence) == 1  # 13 channels in all at most
    assert any("median beats" in str(a.get("UnformattedTextValue", "")) for a in ds.WaveformAnnotationSequence)
    # a General ECG object (here: limb leads only) takes a second group
    contec = _decode("contec/0000050.ECG")
    median = MedianBeats(contec.samples[:, :800].copy(), contec.lead_names, 800.0, contec.uv_per_unit, "test")
    data = recording_to_dicom_bytes(dataclasses.replace(contec, median_beats=median), mint_uids(), STATION)
    assert dciodvfy_problems(data) == []
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == GENERAL_ECG and [g.MultiplexGroupLabel for g in ds.WaveformSequence] == [
        "RHYTHM",
        "MEDIAN BEAT",
    ]
    assert ds.WaveformSequence[1].WaveformOriginality == "DERIVED"
    back = read_dicom_ecg(data)
    assert back.median_beats is not None
    assert np.array_equal(
        back.median_beats.samples * back.median_beats.uv_per_unit, median.samples * median.uv_per_unit
    )
    assert np.array_equal(back.microvolts(), contec.microvolts())  # the rhythm is still the rhythm


def test_triage_fields_and_patient_age_pass_dciodvfy() -> None:
    recording = dataclasses.replace(
        _decode("scp/abtahi_ECG_20170504_163507_123456789.SCP"),
        patient=Patient("11010519491231002X", "Zhang^San=张^三", dt.date(1949, 12, 31), "F", "county register"),
        stat=True,
    )
    uids = mint_uids()
    request = StudyRequest(referring_physician="Li^Ming=李^明", reason="胸痛 chest pain")
    data = recording_to_dicom_bytes(recording, uids, STATION, request=request)
    assert dciodvfy_problems(data) == []
    ds = pydicom.dcmread(io.BytesIO(data))
    assert str(ds.ReferringPhysicianName) == "Li^Ming=李^明"
    assert ds.AccessionNumber == uids.accession_number and len(uids.accession_number) == 16
    assert ds.PatientAge == "067Y"  # acquired 2017-05-04, born 1949-12-31
    assert ds.RequestAttributesSequence[0].ReasonForTheRequestedProcedure == "胸痛 chest pain"
    assert ds.StudyDescription.startswith("STAT ") and "胸痛" in ds.StudyDescription
    assert str(ds.PatientName) == "Zhang^San=张^三" and ds.IssuerOfPatientID == "county register"


# -- SCP-ECG findings sections built and damaged by hand ------------------------------------------


def _crc(chunk: bytes) -> int:
    return binascii.crc_hqx(chunk, 0xFFFF)


def _u16(b: bytes | bytearray, p: int) -> int:
    return int.from_bytes(b[p : p + 2], "little")


def _u32(b: bytes | bytearray, p: int) -> int:
    return int.from_bytes(b[p : p + 4], "little")


def _sections(record: bytes | bytearray) -> dict[int, tuple[int, int]]:
    """id -> (offset of the section header, length), from section 0's pointers (EN 1064)."""
    out = {}
    for pos in range(6 + 16, 6 + _u32(record, 10), 10):
        sid, length, index = _u16(record, pos), _u32(record, pos + 2), _u32(record, pos + 6)
        if length:
            out[sid] = (index - 1, length)
    return out


def _reseal(buf: bytearray, offsets: list[int]) -> bytes:
    for offset in offsets:
        length = _u32(buf, offset + 4)
        buf[offset : offset + 2] = _crc(bytes(buf[offset + 2 : offset + length])).to_bytes(2, "little")
    buf[0:2] = _crc(bytes(buf[2:])).to_bytes(2, "little")
    return bytes(buf)


def with_section_body(record: bytes, sid: int, body: bytes) -> bytes:
    """The record with section `sid`'s body replaced by `body` of the same length, CRCs redone."""
    offset, length = _sections(record)[sid]
    assert len(body) == length - 16
    buf = bytearray(record)
    buf[offset + 16 : offset + length] = body
    return _reseal(buf, [offset])


def with_new_section(record: bytes, sid: int, body: bytes) -> bytes:
    """The record with a section appended (section 0 must have an empty slot for `sid`)."""
    buf = bytearray(record[: _u32(record, 2)])
    index = len(buf) + 1
    header = bytearray(16)
    header[2:4] = sid.to_bytes(2, "little")
    header[4:8] = (16 + len(body)).to_bytes(4, "little")
    header[8:10] = bytes([20, 20])
    buf += header + body
    for pos in range(6 + 16, 6 + _u32(buf, 10), 10):
        if _u16(buf, pos) == sid:
            buf[pos + 2 : pos + 6] = (16 + len(body)).to_bytes(4, "little")
            buf[pos + 6 : pos + 10] = index.to_bytes(4, "little")
            break
    else:
        raise AssertionError(f"section 0 has no slot for section {sid}")
    buf[2:6] = len(buf).to_bytes(4, "little")
    return _reseal(buf, [6, index - 1])


def _statement(seq: int, raw: bytes) -> bytes:
    return bytes([seq]) + len(raw).to_bytes(2, "little") + raw


ABTAHI = "abtahi_ECG_20170504_163507_123456789.SCP"


def test_scp_section11_coded_and_text_statements_and_a_confirmed_section8() -> None:
    record = shared_file("ecg", "scp", ABTAHI).read_bytes()
    header = bytes([1]) + (2017).to_bytes(2, "little") + bytes([5, 4, 16, 40, 0])  # confirmed, 2017-05-04 16:40
    body = header + bytes([2]) + _statement(1, b"\x01SR\x00") + _statement(2, b"\x02Normal ECG\x00")
    data = with_new_section(record, 11, body)
    statements = read_scp(data).statements
    assert [(s.text, s.source, s.code, s.origin) for s in statements][-2:] == [
        ("SR", StatementSource.PHYSICIAN, "SR", "scp:section11"),
        ("Normal ECG", StatementSource.PHYSICIAN, "", "scp:section11"),
    ]
    assert [s.source for s in statements[:3]] == [StatementSource.DEVICE] * 3  # section 8: original report


def test_an_unreadable_findings_section_costs_only_its_findings() -> None:
    record = shared_file("ecg", "scp", ABTAHI).read_bytes()
    offset, length = _sections(record)[7]
    bad = bytes([200]) + record[offset + 17 : offset + length]  # 200 measurement blocks in 34 bytes
    recording = read_scp(with_section_body(record, 7, bad))
    assert "cart-findings-unreadable:scp-section-7" in recording.flags
    assert not any(m.source.startswith("scp:section7") for m in recording.measurements)
    assert len(recording.statements) == 3 and recording.n_samples == 6000  # the rest is all there


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(section=st.sampled_from([7, 8, 10]), data=st.data())
def test_fuzz_findings_sections_decode_or_refuse(section: int, data: st.DataObject) -> None:
    record = shared_file("ecg", "scp", ABTAHI).read_bytes()
    _offset, length = _sections(record)[section]
    body = data.draw(st.binary(min_size=length - 16, max_size=length - 16))
    recording = decodes_or_refuses(lambda d: parse_scp(d).rhythm, with_section_body(record, section, body))
    assert recording is not None  # findings never cost the ECG
    assert all(isinstance(m, EcgMeasurement) for m in recording.measurements)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.binary(min_size=1, max_size=300))
def test_fuzz_section11_decode_or_refuse(junk: bytes) -> None:
    record = shared_file("ecg", "scp", ABTAHI).read_bytes()
    assert decodes_or_refuses(read_scp, with_new_section(record, 11, junk)) is not None
