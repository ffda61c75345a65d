"""ID/health-card scanner lines -> patient and doctor codes, by configurable rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.scanner import (
    MAX_CODE_LENGTH,
    CodeUnrecognised,
    DoctorScanned,
    PatientScanned,
    ScannerDecoder,
    ScanRuleError,
    ScanRules,
)
from tests.service_harness import DOCTOR_BADGE_SCAN, PATIENT_CARD_SCAN

RULES = ScanRules.from_patterns(r"(?P<id>\d{20})", r"DR-(?P<id>\d{6})")


def test_patient_and_doctor_codes() -> None:
    dec = ScannerDecoder(RULES)
    assert dec.feed(PATIENT_CARD_SCAN + DOCTOR_BADGE_SCAN) == [
        PatientScanned("80276001234567890123"),
        DoctorScanned("004711"),
    ]


def test_codes_split_across_reads_and_line_end_variants() -> None:
    dec = ScannerDecoder(RULES)
    events = []
    for chunk in (b"8027600123", b"4567890123\r", b"\nDR-00", b"4711\n"):
        events += dec.feed(chunk)
    assert events == [PatientScanned("80276001234567890123"), DoctorScanned("004711")]


def test_unknown_ambiguous_and_unconfigured_codes_are_never_guessed() -> None:
    dec = ScannerDecoder(RULES)
    (ev,) = dec.feed(b"8027600123\r\n")  # too short for a card number
    assert isinstance(ev, CodeUnrecognised) and ev.reason == "matches no rule" and ev.length == 10
    both = ScanRules.from_patterns(r"X\d+", r"X\d+")
    assert isinstance(both.classify("X1"), CodeUnrecognised)
    assert isinstance(ScanRules().classify("anything"), CodeUnrecognised)
    # Without an id group the whole code is the identifier; control characters are dropped.
    prefix = ScanRules.from_patterns(r"P:[A-Z0-9]+", "")
    assert ScannerDecoder(prefix).feed(b"\x02P:AB12\x03\r\n") == [PatientScanned("P:AB12")]


def test_bad_rules_and_long_codes() -> None:
    with pytest.raises(ScanRuleError, match="patient_card_pattern"):
        ScanRules.from_patterns("(", "")
    dec = ScannerDecoder(RULES)
    events = dec.feed(b"9" * (MAX_CODE_LENGTH + 10) + b"\r\n" + PATIENT_CARD_SCAN)
    assert isinstance(events[0], CodeUnrecognised) and events[1] == PatientScanned("80276001234567890123")


@settings(deadline=None, max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_fuzz_scanner_stream(chunks: list[bytes]) -> None:
    dec = ScannerDecoder(RULES)
    for chunk in chunks:
        for ev in dec.feed(chunk):
            assert isinstance(ev, (PatientScanned, DoctorScanned, CodeUnrecognised))
    assert dec.feed(b"\r\n" + PATIENT_CARD_SCAN)[-1] == PatientScanned("80276001234567890123")


def test_without_rules_nothing_is_a_patient_and_the_reason_says_why() -> None:
    assert ScanRules().classify("80276001234567890123") == CodeUnrecognised("no scanner rules configured", 20)
    only_patients = ScanRules.from_patterns(r"(?P<id>\d{20})", "")
    assert only_patients.classify("80276001234567890123") == PatientScanned("80276001234567890123")
    assert only_patients.classify("DR-004711") == CodeUnrecognised("matches no rule", 9)


def test_the_length_limit_is_exact_even_across_reads_and_after_a_line_end() -> None:
    """1,024 characters is the limit itself (a long 2D code is read), one more is noise."""
    rules = ScanRules.from_patterns(r"(?P<id>A+)", "")
    assert MAX_CODE_LENGTH == 1024
    longest = b"A" * MAX_CODE_LENGTH
    assert ScannerDecoder(rules).feed(b"\r\n" + longest + b"\r\n") == [PatientScanned(longest.decode())]
    assert ScannerDecoder(rules).feed(longest + b"A\r\n") == [CodeUnrecognised("code too long", MAX_CODE_LENGTH)]
    dec = ScannerDecoder(rules)
    assert dec.feed(b"A" * 1000) == []
    assert dec.feed(b"A" * 100 + b"\r") == [CodeUnrecognised("code too long", MAX_CODE_LENGTH)]


def test_with_resident_ids_required_a_card_is_normalised_or_refused_with_the_reason() -> None:
    # A resident ID card scanned with spaces and a lower-case x is the same patient as the typed number;
    # one with a wrong check character is reported, never filed as a patient nobody is.
    rules = ScanRules.from_patterns(r"SFZ(?P<id>[0-9Xx ]+)", "", "cn-resident-id")
    scanned, misread = ScannerDecoder(rules).feed(b"SFZ110105 19491231 002x\rSFZ110105194912310021\r")
    assert scanned == PatientScanned("11010519491231002X")
    assert isinstance(misread, CodeUnrecognised) and misread.length == len("SFZ110105194912310021")
    assert "check digit" in misread.reason and "110105194912310021" not in misread.reason
    # Without the rule any identifier the pattern gives is taken as it is - but one that looks like
    # a resident ID must be a valid one, as on the console (a misread card is no patient).
    anything = ScanRules.from_patterns(r"SFZ(?P<id>\w+)", "")
    assert anything.classify("SFZMRN0042") == PatientScanned("MRN0042")
    assert isinstance(anything.classify("SFZ110105194912310021"), CodeUnrecognised)
