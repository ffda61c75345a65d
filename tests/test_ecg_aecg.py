"""HL7 aECG decoder: the FDA examples, time variants, scale/origin, refusals, unsafe XML, fuzzing."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from devices.ecg.aecg import parse_ts, read_aecg
from devices.errors import ProtocolError, UnsupportedFeatureError
from devices.identity import Patient, TimeSource
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
    assert (r.device.manufacturer, r.device.model, r.device.software_version) == \
        ("Mortara Instrument, Inc.", "ELI250", "5.3")
    assert r.source_format == "aecg" and r.derived_leads == frozenset()


@pytest.mark.parametrize("name", ["fda_minimum_aecg.xml", "fda_minimum_aecg_effectiveTime_high.xml",
                                  "fda_minimum_aecg_effectiveTime_interval.xml",
                                  "fda_minimum_aecg_effectiveTime_low.xml", "fda_minimum_aecg_nouuid.xml"])
def test_minimal_documents(name: str) -> None:
    r = read_aecg(_read(name))
    assert r.lead_names == ("II",)
    assert r.samples[0].tolist() == MINIMUM_DIGITS
    assert r.acquired_at == ACQUIRED and r.uv_per_unit == 2.5 and r.sampling_rate_hz == 500.0


def _without_absolute_time(doc: bytes) -> bytes:
    """The minimal document with a relative time sequence instead of an absolute one."""
    return doc.replace(b'code="TIME_ABSOLUTE"', b'code="TIME_RELATIVE"').replace(
        b'<head value="20021122091000"/>', b'<head value="0.5" unit="s"/>')


@pytest.mark.parametrize("name,expected", [
    ("fda_minimum_aecg.xml", ACQUIRED + dt.timedelta(seconds=0.5)),  # series low + relative head
])
def test_relative_time_uses_the_series_interval(name: str, expected: dt.datetime) -> None:
    r = read_aecg(_without_absolute_time(_read(name)))
    assert r.acquired_at == expected and r.time_source is TimeSource.FILE


@pytest.mark.parametrize("name,expected", [
    ("fda_minimum_aecg.xml", ACQUIRED),  # center
    ("fda_minimum_aecg_effectiveTime_low.xml", ACQUIRED),
    ("fda_minimum_aecg_effectiveTime_interval.xml", ACQUIRED),
    # high only: start = high - duration (13 samples at 500 Hz)
    ("fda_minimum_aecg_effectiveTime_high.xml", ACQUIRED + dt.timedelta(seconds=10 - 13 / 500)),
])
def test_document_effective_time_variants(name: str, expected: dt.datetime) -> None:
    doc = _without_absolute_time(_read(name)).replace(b'<head value="0.5" unit="s"/>', b'<head value="0" unit="s"/>')
    start = doc.index(b"<series>")
    series_time = doc[doc.index(b"<effectiveTime>", start):doc.index(b"</effectiveTime>", start) + 16]
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
        2002, 11, 22, 9, 10, 0, 250000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
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


@pytest.mark.parametrize("doc,match", [
    (b"<html/>", "not an HL7 aECG"),
    (b"<AnnotatedECG", "not well-formed"),
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>', "unsafe XML"),
])
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


@pytest.mark.parametrize("increment,needle", [
    ("inf", "is not finite"), ("-inf", "is not finite"), ("nan", "is not finite"),
    ("1e-320", "no usable sampling rate"), ("0", "positive increment"), ("-0.002", "positive increment"),
])
def test_a_time_increment_that_gives_no_sampling_rate_is_refused(increment: str, needle: str) -> None:
    """Bug found by the mutation audit: "inf" and "nan" parse as floats, and 1 / 1e-320 overflows;
    they crashed the decoder with ZeroDivisionError, ValueError and OverflowError instead of
    the typed refusal (a cart's file must never crash the gateway)."""
    doc = _read("fda_minimum_aecg.xml").replace(b'<increment value="0.002" unit="s"/>',
                                                 f'<increment value="{increment}" unit="s"/>'.encode())
    with pytest.raises(ProtocolError, match=needle):
        read_aecg(doc)
