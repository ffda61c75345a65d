"""Inputs `bench/fuzz.py` found that broke a parser's contract, kept as named constants.

Each constant is the smallest form of what the fuzzer found (written by hand, no third-party file
copied); its test would have failed before the fix and says what the contract is.
"""

from __future__ import annotations

import datetime as dt
from urllib.parse import parse_qs

import pytest

from devices.ecg.aecg import read_aecg
from devices.errors import ProtocolError

NOW = dt.datetime(2025, 3, 4, 9, 0, tzinfo=dt.timezone.utc)


SERIES_TIME = '<low value="20240501093000"/><high value="20240501093001"/>'


def aecg_document(time_sequence: str, series_time: str = SERIES_TIME) -> bytes:
    """A one-lead HL7 aECG (our own minimal document) around the given time sequence."""
    return (
        '<AnnotatedECG xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f'<component><series><code code="RHYTHM"/><effectiveTime>{series_time}</effectiveTime>'
        "<component><sequenceSet>"
        f"<component><sequence>{time_sequence}</sequence></component>"
        '<component><sequence><code code="MDC_ECG_LEAD_II"/><value xsi:type="SLIST_PQ">'
        '<origin value="0" unit="uV"/><scale value="5" unit="uV"/><digits>1 2 3 4 5 4 3 2 1 0</digits>'
        "</value></sequence></component>"
        "</sequenceSet></component></series></component></AnnotatedECG>"
    ).encode()


# An XML declaration naming an encoding Python does not know: LookupError escaped read_aecg.
AECG_UNKNOWN_ENCODING = b'<?xml version="1.0" encoding="UTF-6"?>\n<AnnotatedECG xmlns="urn:hl7-org:v3"/>'
# A TIME_RELATIVE head holding a date where seconds belong: 2e13 s overflowed the time stamp
# (OverflowError escaped read_aecg).
AECG_RELATIVE_HEAD_AS_DATE = aecg_document(
    '<code code="TIME_RELATIVE"/><value xsi:type="GLIST_PQ">'
    '<head value="20240501093000"/><increment value="0.002" unit="s"/></value>'
)
# An absolute head whose year lost a digit ("0202"): passed on as an ECG taken in 202 AD.
AECG_GARBLED_YEAR = aecg_document(
    '<code code="TIME_ABSOLUTE"/><value xsi:type="GLIST_TS">'
    '<head value="02020501093000"/><increment value="0.002" unit="s"/></value>'
)
# A NaN increment with only an end time: the duration became NaN and ValueError escaped.
AECG_NAN_INCREMENT = aecg_document(
    '<code code="TIME_RELATIVE"/><value xsi:type="GLIST_PQ"><increment value="NaN" unit="s"/></value>',
    '<high value="20240501093001"/>',
)
# A 1e300 s increment with only an end time: the start before it overflowed (OverflowError).
AECG_HUGE_INCREMENT = aecg_document(
    '<code code="TIME_RELATIVE"/><value xsi:type="GLIST_PQ"><increment value="1e300" unit="s"/></value>',
    '<high value="20240501093001"/>',
)
# The same document with a sane relative head: still decodes (the fix refuses only the absurd).
AECG_RELATIVE_HEAD_2S = aecg_document(
    '<code code="TIME_RELATIVE"/><value xsi:type="GLIST_PQ">'
    '<head value="2" unit="s"/><increment value="0.002" unit="s"/></value>'
)


@pytest.mark.parametrize(
    "data, why",
    [
        (AECG_UNKNOWN_ENCODING, "unknown encoding"),
        (AECG_RELATIVE_HEAD_AS_DATE, "relative start .* out of range"),
        (AECG_GARBLED_YEAR, "impossible date"),
        (AECG_NAN_INCREMENT, "not finite"),
        (AECG_HUGE_INCREMENT, "cannot end at"),
    ],
    ids=["unknown-encoding", "relative-head-as-date", "garbled-year", "nan-increment", "huge-increment"],
)
def test_aecg_refuses_with_the_typed_error(data: bytes, why: str) -> None:
    """Each for its own reason (not, say, a sampling rate check that runs first)."""
    with pytest.raises(ProtocolError, match=why):
        read_aecg(data, received_at=NOW)


def test_aecg_relative_head_in_seconds_still_decodes() -> None:
    rec = read_aecg(AECG_RELATIVE_HEAD_2S, received_at=NOW)
    assert rec.sampling_rate_hz == 500.0 and rec.n_samples == 10
    assert rec.acquired_at == dt.datetime(2024, 5, 1, 9, 30, 2, tzinfo=dt.timezone.utc)


# -- console form inputs -------------------------------------------------------------------------

# A form post whose patient ID ends in DEL and whose name holds a NUL: both were accepted (only
# characters below 0x20 were refused) and would have gone into DICOM PatientID / PatientName.
CONSOLE_FORM_WITH_CONTROLS = b"csrf=abc&patient_id=C-0042%7F&name=Zhang%00San&reason=fever%C2%9Bagain"
# An unassigned code point (U+05F5) and a right-to-left override (U+202E) in an identifier.
CONSOLE_ID_INVISIBLE = ["C-0042\u05f5", "C-\u202e0042"]


def form(body: bytes) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True).items()}


def test_console_refuses_control_characters_in_ids_names_and_reasons() -> None:
    from lastmile.config import Config
    from lastmile.console.sources import ConsoleInputError, checked_patient, patient_identifier, short_text

    config = Config()  # [patient] id_kind = "": any kind of ID
    fields = form(CONSOLE_FORM_WITH_CONTROLS)
    with pytest.raises(ConsoleInputError):
        patient_identifier(fields["patient_id"], config)
    with pytest.raises(ConsoleInputError):
        short_text(fields["name"])
    with pytest.raises(ConsoleInputError):
        checked_patient("C-0042", fields["name"], config)  # the check-in form: the name is checked too
    with pytest.raises(ConsoleInputError):
        short_text(fields["reason"])  # U+009B (CSI), a C1 control
    for ident in CONSOLE_ID_INVISIBLE:
        with pytest.raises(ConsoleInputError):
            patient_identifier(ident, config)
    # what people type still passes: a clinic number, a Chinese name, a reason with spaces
    assert patient_identifier(" C-0042 ", config) == "C-0042"
    assert short_text("张三") == "张三" and short_text("fever  and\tcough") == "fever and cough"


# -- storage-commitment N-EVENT-REPORT (uploader/dicom_commitment.py) ------------------------------

# Event Information (Implicit VR LE) the fuzzer made from a well-formed report; each raised past
# the handler's except list (pynetdicom would log "Exception in handler" instead of our warning).
COMMITMENT_TRUNCATED_ITEM = bytes.fromhex(  # OSError: the undefined-length item ends mid-tag
    "0800951108000000312e322e332e340008009911fffffffffeff00e0ffffffff0800501104"
)
COMMITMENT_UNKNOWN_VR = bytes.fromhex(  # NotImplementedError: read as explicit VR "LL"
    "080095114c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c01000000312e322e3832362e302e3030e0"
)
COMMITMENT_ODD_LENGTH_US = bytes.fromhex(  # BytesLengthException: FailureReason (US) of 1 byte
    "080095111c000000312e322e3832362e302e312e333638303034332e382e3439382e3200080098114a000000"
    "feff00e042000000080050111e000000312e322e3834302e31303030382e352e312e342e312e312e392e312e31"
    "00080055110a000000312e322e332e342e36000800971102002e3500"
)
COMMITMENT_SHORT_HEADER = bytes.fromhex("ffffffffffffffff00")  # struct.error: no full tag header


def commitment_event(event_type: int, information: bytes) -> object:
    """An N-EVENT-REPORT as pynetdicom hands it to the handler (its own Event and primitive)."""
    import io
    from types import SimpleNamespace

    from pydicom.uid import UID
    from pynetdicom import evt
    from pynetdicom.dimse_primitives import N_EVENT_REPORT
    from pynetdicom.events import Event
    from pynetdicom.presentation import PresentationContextTuple

    request = N_EVENT_REPORT()
    request.AffectedSOPClassUID = "1.2.840.10008.1.20.1"
    request.AffectedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    request.EventTypeID = event_type
    request.EventInformation = io.BytesIO(information)
    context = PresentationContextTuple(1, UID("1.2.840.10008.1.20.1"), UID("1.2.840.10008.1.2"))
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="ORTHANC", address="127.0.0.1"))
    return Event(assoc, evt.EVT_N_EVENT_REPORT, {"request": request, "context": context})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "event_type, information",
    [
        (1, COMMITMENT_TRUNCATED_ITEM),
        (2, COMMITMENT_UNKNOWN_VR),
        (2, COMMITMENT_ODD_LENGTH_US),
        (1, COMMITMENT_SHORT_HEADER),
    ],
    ids=["truncated-item", "unknown-vr", "odd-length-us", "short-header"],
)
def test_commitment_handler_answers_processing_failure_for_unreadable_reports(
    event_type: int, information: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    from uploader.dicom_commitment import ReportSenders, report_handler

    reports: list[object] = []
    senders = ReportSenders(ae_titles=("ORTHANC",), networks=("127.0.0.0/8",))  # the reading center's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert report_handler(reports.append, senders)(commitment_event(event_type, information)) == (0x0110, None)
    assert reports == [] and "unreadable storage commitment report" in caplog.text


# -- dates no ECG can carry (SCP-ECG, DICOM) -------------------------------------------------------


def test_scp_garbled_acquisition_year_falls_back_to_the_receipt_time() -> None:
    """Section 1 tag 25 (date of acquisition) with year 202: was passed on as an ECG of 202 AD;
    now the date is unreadable, so the receipt time stands in (and says so)."""
    import struct

    from devices.ecg.scp import read_scp
    from devices.identity import TimeSource
    from tests.conftest import shared_file
    from tests.scp_records import build_record, sections_of

    bodies = sections_of(shared_file("ecg", "scp", "ecgtoolkit_Example.scp").read_bytes())
    header = bytearray(bodies[1])
    pos, patched = 0, False
    while pos + 3 <= len(header) and header[pos] != 255:
        tag, length = header[pos], struct.unpack_from("<H", header, pos + 1)[0]
        if tag == 25:
            struct.pack_into("<H", header, pos + 3, 202)
            patched = True
        pos += 3 + length
    assert patched
    assert read_scp(build_record(bodies), received_at=NOW).acquired_at.year == 2002  # untouched: the file's
    bodies[1] = bytes(header)
    rec = read_scp(build_record(bodies), received_at=NOW)
    assert (rec.acquired_at, rec.time_source) == (NOW, TimeSource.GATEWAY_RECEIPT)


def test_dicom_garbled_years_are_not_passed_on() -> None:
    import io
    import warnings

    import pydicom
    from pydicom.data import get_testdata_file

    from devices.ecg.dicom_input import read_dicom_ecg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
        ds.AcquisitionDateTime = "02020501093000"  # a digit lost: 202 AD
        ds.PatientID, ds.PatientBirthDate = "P-1", "00010101"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=False)
    rec = read_dicom_ecg(buffer.getvalue(), received_at=NOW)
    assert rec.acquired_at.year >= 1900  # the next date the object has (content/study), not 0202
    assert rec.patient is not None and rec.patient.birth_date is None


def contec_file(stamp: bytes, rows: int = 40) -> bytes:
    """A small ECG90A file of our own: case number, time stamp, `rows` sample rows, a footer."""
    import numpy as np

    header = b"0000001\x00\x00\x00" + stamp.ljust(20, b"\x00") + bytes(13)
    samples = (2048 + np.arange(rows * 8).reshape(rows, 8) % 50).astype("<u2")
    return header + samples.tobytes() + bytes(37)


# The cart's clock field reading 6307: was passed on as an ECG taken in the year 6307.
CONTEC_GARBLED_YEAR = contec_file(b"6307-11-15 12:59:50")


def test_contec_garbled_year_falls_back_to_the_receipt_time() -> None:
    from devices.ecg.contec import read_contec
    from devices.identity import TimeSource

    assert read_contec(contec_file(b"2024-11-15 12:59:50"), received_at=NOW).acquired_at.year == 2024
    rec = read_contec(CONTEC_GARBLED_YEAR, received_at=NOW)
    assert (rec.acquired_at, rec.time_source) == (NOW, TimeSource.GATEWAY_RECEIPT)


@pytest.mark.parametrize(
    "acquired, born",
    [(dt.datetime(1850, 5, 1, tzinfo=dt.timezone.utc), dt.date(1960, 1, 1)), (NOW, dt.date(1, 1, 1))],
    ids=["acquired-1850", "born-year-1"],
)
def test_npz_refuses_dates_no_ecg_or_patient_can_have(acquired: dt.datetime, born: dt.date) -> None:
    import numpy as np

    from devices.ecg.npz import read_npz, write_npz
    from devices.ecg.recording import EcgRecording
    from devices.identity import Patient, TimeSource

    def npz(acquired_at: dt.datetime, birth: dt.date) -> bytes:
        return write_npz(
            EcgRecording(
                samples=np.ones((1, 10), dtype=np.int16),
                lead_names=("II",),
                sampling_rate_hz=500.0,
                uv_per_unit=1.0,
                acquired_at=acquired_at,
                time_source=TimeSource.FILE,
                patient=Patient("P-1", "", birth, "F"),
            )
        )

    assert read_npz(npz(NOW, dt.date(1960, 1, 1))).acquired_at == NOW
    with pytest.raises(ProtocolError):
        read_npz(npz(acquired, born))


# -- reports coming back (uploader/report_reading.py) ----------------------------------------------


def report_study() -> object:
    from lastmile.demo.cardiologist import StudyToRead

    return StudyToRead("1.2.826.0.1.3680043.8.498.1", patient_id="P0042", patient_name="Wang^Fang")


def test_sr_content_time_past_59_seconds_is_kept_as_text_not_raised() -> None:
    """Content Time "084967" (67 s), no verification time: `_dicom_time` raised ValueError out of
    read_dicom_report, whose contract is to read odd content with problems and never raise."""
    from lastmile.demo.cardiologist import ecg_report_sr, part10
    from uploader.report_reading import read_dicom_report

    sr = ecg_report_sr(report_study(), findings=["Sinus rhythm"], impression="Normal ECG", verified=False)
    sr.ContentDate, sr.ContentTime = "20261201", "084967"
    content = read_dicom_report(part10(sr))
    assert content.report_time == "20261201 084967" and "Normal ECG" in content.impressions
    sr.ContentTime = "084959"
    assert read_dicom_report(part10(sr)).report_time == "2026-12-01T08:49:59"


# The PatientID element turned into a sequence (VR SQ) whose item holds a UL of 3 bytes: `str()` of
# the sequence decoded the item and pydicom's BytesLengthException escaped read_dicom_report.
SR_PATIENT_ID_AS_SEQUENCE_ITEM = b"\x08\x00\x00\x00UL\x03\x00\x01\x02\x03"


def test_sr_patient_id_sent_as_a_sequence_is_a_problem_not_a_crash_nor_an_id() -> None:
    """A report whose PatientID is a sequence is read with no patient ID (never the sequence's
    text as one) and says so; its conclusion still reaches the doctor."""
    import struct

    from lastmile.demo.cardiologist import ecg_report_sr, part10
    from uploader.report_reading import read_dicom_report

    data = part10(ecg_report_sr(report_study(), findings=["Sinus rhythm"], impression="Normal ECG"))
    patient_id = b"\x10\x00\x20\x00LO\x06\x00P0042 "
    assert data.count(patient_id) == 1 and read_dicom_report(data).patient_id == "P0042"
    item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(SR_PATIENT_ID_AS_SEQUENCE_ITEM)) + SR_PATIENT_ID_AS_SEQUENCE_ITEM
    as_sequence = b"\x10\x00\x20\x00SQ\x00\x00" + struct.pack("<I", len(item)) + item
    content = read_dicom_report(data.replace(patient_id, as_sequence))
    assert content.patient_id == "" and content.problems == ("PatientID unreadable (TypeError)",)
    assert content.impressions == ("Normal ECG",)


@pytest.mark.parametrize("issued", ["1013-11-02T10:00:00+08:00", "0001-01-01", "9999-12-31T23:59:59Z"])
def test_fhir_report_issued_in_an_impossible_year_is_flagged_not_shown(issued: str) -> None:
    """`issued` 1013-11-02 (a garbled 2013) was passed on as the report's time; now it is dropped
    and listed in problems, so the doctor sees the report is odd rather than a date from 1013."""
    from uploader.report_reading import read_fhir_report

    resource = {"resourceType": "DiagnosticReport", "id": "dr-1", "status": "final", "conclusion": "Normal ECG."}
    ok = read_fhir_report({**resource, "issued": "2026-11-02T10:00:00+08:00"})
    assert (ok.report_time, ok.problems, ok.final) == ("2026-11-02T10:00:00+08:00", (), True)
    odd = read_fhir_report({**resource, "issued": issued})
    assert odd.report_time == "" and not odd.final
    assert [p for p in odd.problems if "no possible date" in p and issued[:10] in p]


def test_sr_verified_in_an_impossible_year_is_flagged_not_shown() -> None:
    from lastmile.demo.cardiologist import ecg_report_sr, part10
    from uploader.report_reading import read_dicom_report

    sr = ecg_report_sr(report_study(), findings=["Sinus rhythm"], impression="Normal ECG")
    sr.VerifyingObserverSequence[0].VerificationDateTime = "10131102100000+0800"
    content = read_dicom_report(part10(sr))
    assert content.report_time == "" and any("no possible date" in p for p in content.problems)


# -- resident ID numbers (devices/identity.py) -----------------------------------------------------

# The console's check-in form with the ID's birth year 3990 for 1990 (one digit misread, the check
# character still right): accepted, and the patient was born in 3990.
RESIDENT_ID_BORN_3990 = "110101399003077578"


def test_resident_id_with_a_birth_year_no_patient_can_have_is_refused() -> None:
    from devices.identity import InvalidPatientIdError, parse_resident_id, resident_id_check_char
    from lastmile.config import Config
    from lastmile.console.sources import ConsoleInputError, patient_identifier

    assert parse_resident_id("110101199003077571").birth_date == dt.date(1990, 3, 7)
    with pytest.raises(InvalidPatientIdError) as refused:
        parse_resident_id(RESIDENT_ID_BORN_3990)
    assert refused.value.reason == "birth-date"
    born_1899 = "11010118991231002"
    with pytest.raises(InvalidPatientIdError):
        parse_resident_id(born_1899 + resident_id_check_char(born_1899))
    with pytest.raises(ConsoleInputError):
        patient_identifier(RESIDENT_ID_BORN_3990, Config())
