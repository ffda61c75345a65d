"""HL7 aECG decoder: the FDA examples, time variants, scale/origin, refusals, unsafe XML, fuzzing."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from devices.ecg.aecg import parse_ts, read_aecg
from devices.errors import ProtocolError, UnsupportedFeatureError
from devices.identity import DeviceIdentity, Patient, TimeSource
from tests.conftest import shared_file
from tests.ecg_file_mutations import apply, decodes_or_refuses, mutations

UTC = dt.timezone.utc
ACQUIRED = dt.datetime(2002, 11, 22, 9, 10, tzinfo=UTC)
MINIMUM_DIGITS = [-2, -2, -2, -2, -3, -4, -3, -5, -5, -4, -6, -9, -9]


def _read(name: str) -> bytes:
    return shared_file("ecg", "aecg", name).read_bytes()


def test_fda_example_matches_the_scp_reference_csv() -> None:
    r = read_aecg(_read("fda_hl7_Example_aECG.xml"))
    path = shared_file("ecg", "scp", "reference", "ecgtoolkit_Example.scp.uV.csv")
    header = path.read_text().splitlines()[0].split("#")[0].strip().split(",")
    reference = np.loadtxt(path, delimiter=",", skiprows=1)
    uv = r.microvolts()
    for column, lead in enumerate(header):
        np.testing.assert_array_equal(uv[r.lead_names.index(lead)], reference[:, column], err_msg=lead)
    assert (r.sampling_rate_hz, r.uv_per_unit, r.n_samples) == (500.0, 2.5, 5000)
    assert r.acquired_at == ACQUIRED and r.time_source is TimeSource.FILE
    assert r.patient == Patient("SBJ-123", "Clark", dt.date(1953, 5, 8), "M", issuer="2.16.840.1.113883.3.400")
    assert (r.device.manufacturer, r.device.model, r.device.software_version) == (
        "Mortara Instrument, Inc.",
        "ELI250",
        "5.3",
    )
    assert r.source_format == "aecg" and r.derived_leads == frozenset()


@pytest.mark.parametrize(
    "name",
    [
        "fda_minimum_aecg.xml",
        "fda_minimum_aecg_effectiveTime_high.xml",
        "fda_minimum_aecg_effectiveTime_interval.xml",
        "fda_minimum_aecg_effectiveTime_low.xml",
        "fda_minimum_aecg_nouuid.xml",
    ],
)
def test_minimal_documents(name: str) -> None:
    r = read_aecg(_read(name))
    assert r.lead_names == ("II",)
    assert r.samples[0].tolist() == MINIMUM_DIGITS
    assert r.acquired_at == ACQUIRED and r.uv_per_unit == 2.5 and r.sampling_rate_hz == 500.0


def _without_absolute_time(doc: bytes) -> bytes:
    """The minimal document with a relative time sequence instead of an absolute one."""
    return doc.replace(b'code="TIME_ABSOLUTE"', b'code="TIME_RELATIVE"').replace(
        b'<head value="20021122091000"/>', b'<head value="0.5" unit="s"/>'
    )


@pytest.mark.parametrize(
    "name,expected",
    [
        ("fda_minimum_aecg.xml", ACQUIRED + dt.timedelta(seconds=0.5)),  # series low + relative head
    ],
)
def test_relative_time_uses_the_series_interval(name: str, expected: dt.datetime) -> None:
    r = read_aecg(_without_absolute_time(_read(name)))
    assert r.acquired_at == expected and r.time_source is TimeSource.FILE


@pytest.mark.parametrize(
    "name,expected",
    [
        ("fda_minimum_aecg.xml", ACQUIRED),  # center
        ("fda_minimum_aecg_effectiveTime_low.xml", ACQUIRED),
        ("fda_minimum_aecg_effectiveTime_interval.xml", ACQUIRED),
        # high only: start = high - duration (13 samples at 500 Hz)
        ("fda_minimum_aecg_effectiveTime_high.xml", ACQUIRED + dt.timedelta(seconds=10 - 13 / 500)),
    ],
)
def test_document_effective_time_variants(name: str, expected: dt.datetime) -> None:
    doc = _without_absolute_time(_read(name)).replace(b'<head value="0.5" unit="s"/>', b'<head value="0" unit="s"/>')
    start = doc.index(b"<series>")
    series_time = doc[doc.index(b"<effectiveTime>", start) : doc.index(b"</effectiveTime>", start) + 16]
    doc = doc.replace(series_time, b"")
    assert read_aecg(doc).acquired_at == expected


def test_scale_origin_and_units() -> None:
    doc = _read("fda_minimum_aecg.xml").replace(b'<origin value="0" unit="uV"/>', b'<origin value="5" unit="uV"/>')
    r = read_aecg(doc)
    np.testing.assert_array_equal(r.microvolts()[0], np.array(MINIMUM_DIGITS) * 2.5 + 5)
    doc = _read("fda_minimum_aecg.xml").replace(b'<scale value="2.5" unit="uV"/>', b'<scale value="0.005" unit="mV"/>')
    np.testing.assert_allclose(read_aecg(doc).microvolts()[0], np.array(MINIMUM_DIGITS) * 5)
    doc = _read("fda_minimum_aecg.xml").replace(b'<scale value="2.5" unit="uV"/>', b'<scale value="2.5" unit="mmHg"/>')
    with pytest.raises(UnsupportedFeatureError, match="not a voltage"):
        read_aecg(doc)


def test_time_zone_in_time_stamp_and_local_zone() -> None:
    assert parse_ts("20021122091000.250+0200", UTC) == dt.datetime(
        2002, 11, 22, 9, 10, 0, 250000, tzinfo=dt.timezone(dt.timedelta(hours=2))
    )
    zone = dt.timezone(dt.timedelta(hours=-5))
    assert read_aecg(_read("fda_minimum_aecg.xml"), local_tz=zone).acquired_at.utcoffset() == dt.timedelta(hours=-5)


def test_only_i_and_ii_recorded_derives_the_rest() -> None:
    doc = _read("fda_hl7_Example_aECG.xml")
    rhythm_end = doc.index(b"REPRESENTATIVE_BEAT")
    head, tail = doc[:rhythm_end], doc[rhythm_end:]
    for lead in (b"III", b"AVR", b"AVL", b"AVF"):
        head = head.replace(b'code="MDC_ECG_LEAD_' + lead + b'"', b'code="MDC_ECG_LEAD_X' + lead + b'"', 1)
    r = read_aecg(head + tail)
    full = read_aecg(doc)
    assert {"III", "aVR", "aVL", "aVF"} <= r.derived_leads
    for lead in ("III", "aVR", "aVL", "aVF"):
        np.testing.assert_array_equal(r.lead(lead), full.lead(lead), err_msg=lead)


def test_empty_document_is_refused() -> None:
    with pytest.raises(ProtocolError, match="no rhythm ECG"):
        read_aecg(_read("fda_empty.xml"))


@pytest.mark.parametrize(
    "doc,match",
    [
        (b"<html/>", "not an HL7 aECG"),
        (b"<AnnotatedECG", "not well-formed"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>', "unsafe XML"),
    ],
)
def test_bad_xml_is_refused(doc: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        read_aecg(doc)


def test_non_integer_digits_are_refused() -> None:
    doc = _read("fda_minimum_aecg.xml").replace(b"-2 -2 -2", b"-2 -2.5 -2", 1)
    with pytest.raises(ProtocolError, match="whole numbers"):
        read_aecg(doc)


@settings(deadline=None, max_examples=200)
@given(ops=mutations())
def test_fuzz_minimal_document(ops: list[tuple]) -> None:
    decodes_or_refuses(read_aecg, apply(_read("fda_minimum_aecg.xml"), ops))


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(ops=mutations())
def test_fuzz_full_example(ops: list[tuple]) -> None:
    data = _read("fda_hl7_Example_aECG.xml")
    # mutate mostly around the structure before the first digits, where it matters
    decodes_or_refuses(read_aecg, apply(data, ops, lo=0, hi=data.index(b"<digits>") + 4000))


@pytest.mark.parametrize(
    "increment,needle",
    [
        ("inf", "is not finite"),
        ("-inf", "is not finite"),
        ("nan", "is not finite"),
        ("1e-320", "no usable sampling rate"),
        ("0", "positive increment"),
        ("-0.002", "positive increment"),
        # issue 10: decoded as 1e300 Hz; a rate no ECG format or cart uses (devices/plausibility.py)
        ("1e-300", "ecg-sampling-rate 1e\\+300 Hz is outside the plausible 25-32000 Hz"),
        ("10", "ecg-sampling-rate 0.1 Hz is outside the plausible"),
    ],
)
def test_a_time_increment_that_gives_no_sampling_rate_is_refused(increment: str, needle: str) -> None:
    """Bug found by the mutation audit: "inf" and "nan" parse as floats, and 1 / 1e-320 overflows;
    they crashed the decoder with ZeroDivisionError, ValueError and OverflowError instead of
    the typed refusal (a cart's file must never crash the gateway)."""
    doc = _read("fda_minimum_aecg.xml").replace(
        b'<increment value="0.002" unit="s"/>', f'<increment value="{increment}" unit="s"/>'.encode()
    )
    with pytest.raises(ProtocolError, match=needle):
        read_aecg(doc)


# -- built documents: every rule of the decoder, stated ---------------------------------------
# What each check prevents: a lead at the wrong amplitude (a unit or scale misread), a recording
# on the wrong time axis (rate, time zone, start), a sample wrapped past 32 bits, a patient's
# name or birth date garbled, a document that is not an aECG taken for one.


def _lead(
    code: str = "MDC_ECG_LEAD_II",
    digits: str = "1 -2 3",
    scale: str = '<scale value="2.5" unit="uV"/>',
    origin: str = '<origin value="0" unit="uV"/>',
    vtype: str = "SLIST_PQ",
) -> str:
    type_attr = f' xsi:type="{vtype}"' if vtype else ""
    return (
        f'<component><sequence><code code="{code}"/><value{type_attr}>{origin}{scale}'
        f"<digits>{digits}</digits></value></sequence></component>"
    )


def _doc(
    *leads: str,
    time: str = '<head value="20021122091000"/><increment value="0.002" unit="s"/>',
    time_code: str = "TIME_ABSOLUTE",
    series_time: str = "",
    doc_time: str = "",
    subject: str = "",
    author: str = "",
) -> bytes:
    leads = leads or (_lead(),)
    return (
        f'<AnnotatedECG xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f'{doc_time}{subject}<component><series><code code="RHYTHM"/>{series_time}{author}'
        f'<component><sequenceSet><component><sequence><code code="{time_code}"/>'
        f'<value xsi:type="GLIST_TS">{time}</value></sequence></component>{"".join(leads)}'
        f"</sequenceSet></component></series></component></AnnotatedECG>"
    ).encode()


def _subject(inner: str, ident: str = '<id root="2.16.1" extension="P-7"/>') -> str:
    return (
        f"<componentOf><timepointEvent><componentOf><subjectAssignment><subject><trialSubject>{ident}"
        f"{inner}</trialSubject></subject></subjectAssignment></componentOf></timepointEvent></componentOf>"
    )


def test_a_built_document_decodes() -> None:
    r = read_aecg(_doc())
    assert r.lead_names == ("II",) and r.samples.tolist() == [[1, -2, 3]] and r.uv_per_unit == 2.5
    assert r.sampling_rate_hz == 500.0 and r.acquired_at == ACQUIRED and r.patient is None
    assert r.device == DeviceIdentity()


@pytest.mark.parametrize("unit,factor", [("uV", 1.0), ("mV", 1000.0), ("V", 1_000_000.0), ("nV", 0.001)])
def test_every_voltage_unit_of_scale_and_origin(unit: str, factor: float) -> None:
    r = read_aecg(_doc(_lead(scale=f'<scale value="5" unit="{unit}"/>', origin=f'<origin value="2" unit="{unit}"/>')))
    assert r.microvolts().tolist() == [[(5 * d + 2) * factor for d in (1, -2, 3)]]


def test_scale_and_origin_default_to_one_microvolt_and_zero() -> None:
    r = read_aecg(_doc(_lead(scale="", origin="")))
    assert r.uv_per_unit == 1.0 and r.microvolts().tolist() == [[1.0, -2.0, 3.0]]


@pytest.mark.parametrize(
    "scale,origin,error,needle",
    [
        ('<scale value="0" unit="uV"/>', "", ProtocolError, "has scale 0"),
        ('<scale value="-2.5" unit="uV"/>', "", ProtocolError, "has scale -2.5"),
        ('<scale value="x" unit="uV"/>', "", ProtocolError, "scale 'x' is not a number"),
        ('<scale value="inf" unit="uV"/>', "", ProtocolError, "scale is not finite"),
        ('<scale unit="uV"/>', "", None, None),  # no value: the default 1 µV
        ('<scale value="2.5" unit="mmHg"/>', "", UnsupportedFeatureError, "not a voltage"),
        ("", '<origin value="5" unit="Cel"/>', UnsupportedFeatureError, "not a voltage"),
    ],
)
def test_scale_and_origin_refusals(scale: str, origin: str, error: type | None, needle: str | None) -> None:
    doc = _doc(_lead(scale=scale, origin=origin))
    if error is None:
        assert read_aecg(doc).uv_per_unit == 1.0
        return
    with pytest.raises(error, match=needle):
        read_aecg(doc)


def test_samples_are_stored_as_a_list_of_whole_numbers() -> None:
    with pytest.raises(UnsupportedFeatureError, match="stores its samples as GLIST_PQ"):
        read_aecg(_doc(_lead(vtype="GLIST_PQ")))
    assert read_aecg(_doc(_lead(vtype=""))).samples.tolist() == [[1, -2, 3]]  # untyped: read as SLIST


@pytest.mark.parametrize(
    "digits,ok",
    [
        (f"{-(2**31)} {2**31 - 1}", True),
        (f"{-(2**31) - 1} 0", False),
        (f"0 {2**31}", False),
    ],
)
def test_digits_must_fit_32_bits(digits: str, ok: bool) -> None:
    doc = _doc(_lead(digits=digits, scale='<scale value="1" unit="uV"/>'))
    if ok:
        assert read_aecg(doc).samples.tolist() == [[int(d) for d in digits.split()]]
    else:
        with pytest.raises(ProtocolError, match="beyond 32 bits"):
            read_aecg(doc)


def test_too_many_samples_are_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    import devices.ecg.aecg as aecg

    monkeypatch.setattr(aecg, "MAX_SAMPLES_PER_LEAD", 3)
    assert read_aecg(_doc(_lead(digits="1 2 3"))).n_samples == 3  # the limit itself is allowed
    with pytest.raises(UnsupportedFeatureError, match="has 4 samples"):
        read_aecg(_doc(_lead(digits="1 2 3 4")))
    assert aecg.__dict__["MAX_SAMPLES_PER_LEAD"] == 3
    monkeypatch.undo()
    assert aecg.MAX_SAMPLES_PER_LEAD == 10_000_000  # 10 million: 5.5 h at 500 Hz, far beyond a rest ECG


def test_leads_of_different_or_zero_length_are_refused() -> None:
    with pytest.raises(UnsupportedFeatureError, match="different or zero lengths"):
        read_aecg(_doc(_lead(), _lead(code="MDC_ECG_LEAD_I", digits="1 2")))
    with pytest.raises(UnsupportedFeatureError, match=r"different or zero lengths \[0\]"):
        read_aecg(_doc(_lead(digits="")))
    with pytest.raises(ProtocolError, match="no lead sequences"):
        read_aecg(_doc(_lead().replace("<digits>1 -2 3</digits>", "")))


@pytest.mark.parametrize(
    "increment,rate",
    [
        ('<increment value="2" unit="ms"/>', 500.0),
        ('<increment value="1000" unit="us"/>', 1000.0),
        ('<increment value="0.0033333333333" unit="s"/>', 300.0),  # 1/300 written to 13 digits: 300 Hz
        ('<increment value="0.0033" unit="s"/>', 1 / 0.0033),  # not a whole rate: kept as it is
        ('<increment value="0.002"/>', 500.0),  # no unit: seconds
    ],
)
def test_the_sampling_rate_from_the_time_increment(increment: str, rate: float) -> None:
    r = read_aecg(_doc(time='<head value="20021122091000"/>' + increment))
    assert r.sampling_rate_hz == rate


@pytest.mark.parametrize(
    "increment,error,needle",
    [
        ('<increment value="2" unit="min"/>', UnsupportedFeatureError, "in unit 'min'"),
        ('<increment value="fast" unit="s"/>', ProtocolError, "'fast' is not a number"),
        ('<increment unit="s"/>', ProtocolError, "positive increment"),
        ("", ProtocolError, "positive increment"),
    ],
)
def test_an_unusable_time_increment_is_refused(increment: str, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle):
        read_aecg(_doc(time='<head value="20021122091000"/>' + increment))


@pytest.mark.parametrize(
    "stamp,expected",
    [
        ("20021122", dt.datetime(2002, 11, 22, tzinfo=UTC)),
        ("200211220910", dt.datetime(2002, 11, 22, 9, 10, tzinfo=UTC)),
        ("20021122091005.5", dt.datetime(2002, 11, 22, 9, 10, 5, 500000, tzinfo=UTC)),
        ("20021122091005.1234567", dt.datetime(2002, 11, 22, 9, 10, 5, 123456, tzinfo=UTC)),
        (
            "20021122091005-0530",
            dt.datetime(2002, 11, 22, 9, 10, 5, tzinfo=dt.timezone(-dt.timedelta(hours=5, minutes=30))),
        ),
        ("20021122091005+1400", dt.datetime(2002, 11, 22, 9, 10, 5, tzinfo=dt.timezone(dt.timedelta(hours=14)))),
        ("20021122091005+0059", dt.datetime(2002, 11, 22, 9, 10, 5, tzinfo=dt.timezone(dt.timedelta(minutes=59)))),
    ],
)
def test_time_stamps_of_every_precision_and_zone(stamp: str, expected: dt.datetime) -> None:
    assert parse_ts(stamp, UTC) == expected


@pytest.mark.parametrize(
    "stamp,needle",
    [
        ("2002", "unreadable time stamp"),
        ("200211", "unreadable time stamp"),
        ("yesterday", "unreadable"),
        ("20021122091005+1500", "bad time zone"),
        ("20021122091005+0060", "bad time zone"),
        ("20021322", "impossible date/time"),
        ("20021122250000", "impossible date/time"),
    ],
)
def test_unreadable_time_stamps_are_refused(stamp: str, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        parse_ts(stamp, UTC)


def test_start_time_sources_in_order() -> None:
    relative = '<head value="0.5" unit="s"/><increment value="0.002" unit="s"/>'
    series = '<effectiveTime><low value="20021122091000"/></effectiveTime>'
    doc_center = '<effectiveTime><center value="20021122091100"/></effectiveTime>'
    r = read_aecg(_doc(time=relative, time_code="TIME_RELATIVE", series_time=series, doc_time=doc_center))
    assert r.acquired_at == ACQUIRED + dt.timedelta(seconds=0.5)  # series low + relative head
    r = read_aecg(_doc(time=relative, time_code="TIME_RELATIVE", doc_time=doc_center))
    assert r.acquired_at == ACQUIRED + dt.timedelta(minutes=1, seconds=0.5)  # document center + head
    no_head = '<increment value="0.002" unit="s"/>'
    r = read_aecg(_doc(time=no_head, time_code="TIME_RELATIVE", series_time=series))
    assert r.acquired_at == ACQUIRED  # a relative sequence without head starts at its base
    r = read_aecg(_doc(time=no_head, series_time=series))
    assert (r.acquired_at, r.time_source) == (ACQUIRED, TimeSource.FILE)  # absolute without head
    with pytest.raises(ProtocolError, match="carries no acquisition time"):
        read_aecg(_doc(time=no_head))
    received = dt.datetime(2026, 1, 2, tzinfo=UTC)
    r = read_aecg(_doc(time=no_head), received_at=received)
    assert (r.acquired_at, r.time_source) == (received, TimeSource.GATEWAY_RECEIPT)
    with pytest.raises(ProtocolError, match="acquired_at must carry a time zone"):
        read_aecg(_doc(time=no_head), received_at=dt.datetime(2026, 1, 2))


def test_the_patient_as_the_document_names_them() -> None:
    person = (
        "<subjectDemographicPerson><name><family> Li </family><given>Wei</given></name>"
        '<administrativeGenderCode code="F"/><birthTime value="19530508"/></subjectDemographicPerson>'
    )
    p = read_aecg(_doc(subject=_subject(person))).patient
    assert p == Patient("P-7", "Li^Wei", dt.date(1953, 5, 8), "F", issuer="2.16.1")
    only_given = person.replace("<family> Li </family>", "")
    assert read_aecg(_doc(subject=_subject(only_given))).patient.name == "^Wei"
    only_family = person.replace("<given>Wei</given>", "")
    assert read_aecg(_doc(subject=_subject(only_family))).patient.name == "Li^"
    plain = person.replace("<family> Li </family><given>Wei</given>", " Li Wei ")
    assert read_aecg(_doc(subject=_subject(plain))).patient.name == "Li Wei"
    for born, expected in [("19530508120000", dt.date(1953, 5, 8)), ("19531308", None), ("1953", None), ("", None)]:
        doc = _doc(subject=_subject(person.replace("19530508", born)))
        assert read_aecg(doc).patient.birth_date == expected, born
    unknown_sex = person.replace('code="F"', 'code="UN"')
    assert read_aecg(_doc(subject=_subject(unknown_sex))).patient.sex == ""
    no_person = read_aecg(_doc(subject=_subject(""))).patient
    assert no_person == Patient("P-7", issuer="2.16.1")
    # an id with only a root names the register, not the patient: unassigned
    assert read_aecg(_doc(subject=_subject(person, ident='<id root="2.16.1"/>'))).patient is None
    assert read_aecg(_doc(subject=_subject(person, ident=""))).patient is None


def test_the_cart_as_the_document_names_it() -> None:
    author = (
        '<author><seriesAuthor><manufacturedSeriesDevice><id extension=" SN-9 "/>'
        "<manufacturerModelName> ELI250 </manufacturerModelName><softwareName>5.3</softwareName>"
        "</manufacturedSeriesDevice><manufacturerOrganization><name> Mortara </name>"
        "</manufacturerOrganization></seriesAuthor></author>"
    )
    assert read_aecg(_doc(author=author)).device == DeviceIdentity("Mortara", "ELI250", "SN-9", "", "5.3")
    no_device = "<author><seriesAuthor><manufacturerOrganization><name>M</name></manufacturerOrganization></seriesAuthor></author>"
    assert read_aecg(_doc(author=no_device)).device == DeviceIdentity(manufacturer="M")


def test_what_looks_like_an_aecg() -> None:
    from devices.ecg.aecg import looks_like_aecg

    assert looks_like_aecg(_doc())
    assert not looks_like_aecg(b"AnnotatedECG without any markup")
    assert not looks_like_aecg(b"<ECG/>")
    assert looks_like_aecg(b" " * 4080 + b"<AnnotatedECG")  # within the first 4 KiB
    assert not looks_like_aecg(b" " * 4084 + b"<AnnotatedECG")  # beyond them


def test_a_birth_date_needs_all_eight_digits_and_may_be_absent() -> None:
    person = '<subjectDemographicPerson><name>X</name><birthTime value="19530518"/></subjectDemographicPerson>'
    assert read_aecg(_doc(subject=_subject(person))).patient.birth_date == dt.date(1953, 5, 18)
    no_birth = person.replace('<birthTime value="19530518"/>', "")
    assert read_aecg(_doc(subject=_subject(no_birth))).patient.birth_date is None


def test_a_document_type_declaration_is_refused() -> None:
    """No DTD at all (forbid_dtd): even one without entities could be the first step of an attack."""
    doc = b'<?xml version="1.0"?><!DOCTYPE AnnotatedECG>' + _doc()
    with pytest.raises(ProtocolError, match="refused unsafe XML"):
        read_aecg(doc)


def test_the_root_element_may_end_at_the_last_byte_of_the_first_4_kib() -> None:
    from devices.ecg.aecg import looks_like_aecg

    assert looks_like_aecg(b" " * 4083 + b"<AnnotatedECG")  # "G" is byte 4096


def _annotation(code: str, value: str, inner: str = "") -> str:
    return f'<component><annotation><code code="{code}"/>{value}{inner}</annotation></component>'


def _pq(value: str, unit: str) -> str:
    return f'<value xsi:type="PQ" value="{value}" unit="{unit}"/>'


def test_only_the_global_findings_of_the_whole_ecg_are_kept_in_the_cart_unit() -> None:
    """A beat's or a lead's own QT is not the ECG's QT (a value put on the wrong record), the
    first global value of a kind wins, seconds and microseconds become ms, the QTc keeps its
    formula, an angle sent in ms is not taken for degrees, and an empty statement is no statement."""
    per_lead = "<support><supportingROI><component><boundary><code code='MDC_ECG_LEAD_V2'/></boundary></component></supportingROI></support>"
    annotations = (
        _annotation("MDC_ECG_BEAT", "", _annotation("MDC_ECG_TIME_PD_QT", _pq("999", "ms")))
        + _annotation("MDC_ECG_TIME_PD_QT", _pq("450", "ms"), per_lead)
        + _annotation("MDC_ECG_TIME_PD_QT", _pq("0.4", "s"))
        + _annotation("MDC_ECG_TIME_PD_QT", _pq("380", "ms"))
        + _annotation("MDC_ECG_TIME_PD_QTcB", _pq("420000", "us"))
        + _annotation("MDC_ECG_ANGLE_QRS_FRONT", _pq("45", "ms"))
        + _annotation("MDC_ECG_INTERPRETATION_STATEMENT", '<value xsi:type="ST"/>')
        + _annotation("MDC_ECG_INTERPRETATION_STATEMENT", '<value xsi:type="ST"> Sinus rhythm </value>')
    )
    # a representative beat whose only sequence set is unreadable: no median beats, the rhythm stands
    representative = (
        '<derivation><derivedSeries><code code="REPRESENTATIVE_BEAT"/>'
        "<component><sequenceSet></sequenceSet></component></derivedSeries></derivation>"
    )
    r = read_aecg(_doc(author=f"{representative}<subjectOf><annotationSet>{annotations}</annotationSet></subjectOf>"))
    assert [(m.kind, m.value, m.method) for m in r.measurements] == [
        ("qt-interval", 400.0, ""),
        ("qtc-interval", 420.0, "bazett"),
    ]
    assert [s.text for s in r.statements] == ["Sinus rhythm"] and r.median_beats is None


@pytest.mark.parametrize(
    "code,value,unit,expected",
    [
        ("MDC_ECG_HEART_RATE", "72", "/min", ("heart-rate", 72.0)),
        ("MDC_ECG_HEART_RATE", "72", "bpm", ("heart-rate", 72.0)),
        ("MDC_ECG_HEART_RATE", "72", "{beats}/min", ("heart-rate", 72.0)),
        ("MDC_ECG_TIME_PD_QT", "0.4", "s", ("qt-interval", 400.0)),
        ("MDC_ECG_TIME_PD_QT", "400000", "us", ("qt-interval", 400.0)),
    ],
)
def test_each_unit_a_cart_writes_gives_the_value_it_meant(code: str, value: str, unit: str, expected: tuple) -> None:
    """72 bpm is charted as 72/min and 0.4 s or 400,000 µs as a 400 ms QT: a wrong factor puts a
    doubled heart rate or a stretched QT on the patient's ECG."""
    annotation_set = f"<subjectOf><annotationSet>{_annotation(code, _pq(value, unit))}</annotationSet></subjectOf>"
    (m,) = read_aecg(_doc(author=annotation_set)).measurements
    assert (m.kind, m.value) == expected


def _representative_beat(*digits: str) -> str:
    time = (
        '<component><sequence><code code="TIME_RELATIVE"/><value xsi:type="GLIST_PQ"><head value="0" unit="s"/>'
        '<increment value="0.002" unit="s"/></value></sequence></component>'
    )
    leads = "".join(_lead(code, digits=d) for code, d in zip(("MDC_ECG_LEAD_II", "MDC_ECG_LEAD_I"), digits))
    return (
        '<derivation><derivedSeries><code code="REPRESENTATIVE_BEAT"/><component><sequenceSet>'
        f"{time}{leads}</sequenceSet></component></derivedSeries></derivation>"
    )


def test_median_beats_need_samples_in_every_lead_even_one() -> None:
    """Empty median beats are no median beats (a blank beat would be stored and shown as the
    cart's summary); a one-sample beat is still the cart's beat and kept."""
    assert read_aecg(_doc(author=_representative_beat("", ""))).median_beats is None
    assert read_aecg(_doc(author=_representative_beat("5 6", "5"))).median_beats is None
    one = read_aecg(_doc(author=_representative_beat("5", "7"))).median_beats
    assert one is not None and one.samples.tolist() == [[5], [7]] and one.lead_names == ("II", "I")


def test_an_ecg_dated_outside_possible_years_is_refused_not_filed_a_century_off() -> None:
    """A garbled cart clock (1899, 2201) is refused: the ECG is never filed at an impossible date."""
    for stamp in ("18991231235959", "22010101"):
        with pytest.raises(ProtocolError, match="impossible date/time"):
            parse_ts(stamp, UTC)


@pytest.mark.parametrize(
    "head,increment,series_time,needle",
    [
        ("1e20", "0.002", '<effectiveTime><low value="20021122091000"/></effectiveTime>', "relative start 1e\\+20 s"),
        ("0", "1e12", '<effectiveTime><high value="20021122091000"/></effectiveTime>', "3e\\+12 s cannot end"),
    ],
)
def test_a_start_time_off_the_calendar_is_refused(head: str, increment: str, series_time: str, needle: str) -> None:
    """A date written where seconds belong, or a recording too long to end at its stated end, has no
    start we could trust: refused, never filed at a made-up time."""
    time = f'<head value="{head}" unit="s"/><increment value="{increment}" unit="s"/>'
    with pytest.raises(ProtocolError, match=needle):
        read_aecg(_doc(time=time, time_code="TIME_RELATIVE", series_time=series_time))


@pytest.mark.parametrize("encoding", ["GB18030", "GBK", "GB2312"])
def test_a_chinese_cart_s_document_in_its_declared_gb_encoding(encoding: str) -> None:
    """A Chinese cart's PC software writes its aECG in GB 2312/GBK/GB 18030 and declares it.
    The XML parser handles no multi-byte encoding but UTF-8/16: the whole ECG was refused as
    "not well-formed XML". The declared encoding is honoured; samples and name come through."""
    utf8 = _read("fda_hl7_Example_aECG.xml").decode("utf-8")
    assert utf8.startswith('<?xml version="1.0" encoding="utf-8"?>')
    text = utf8.replace('encoding="utf-8"', f'encoding="{encoding}"', 1).replace(
        "<name>Clark</name>", "<name>王伟</name>", 1
    )
    r = read_aecg(text.encode(encoding))
    assert r.patient is not None and r.patient.name == "王伟"
    np.testing.assert_array_equal(r.microvolts(), read_aecg(utf8.encode("utf-8")).microvolts())
