"""GB 11643 resident identity numbers: the check character against an implementation written here
from the standard's own words, normalisation, and what is refused."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.identity import (
    InvalidPatientIdError,
    looks_like_resident_id,
    normalise_resident_id,
    parse_resident_id,
    resident_id_check_char,
)


def check_char_from_the_standard(first17: str) -> str:
    """GB 11643-1999 §8.2: S = sum(a_i * W_i), W_i = 2^(i-1) mod 11 with i counted from the right
    (the check character is position 1); a_1 = (12 - S mod 11) mod 11, 10 written as X."""
    digits = [int(d) for d in first17]
    total = 0
    for position_from_right, digit in zip(range(18, 1, -1), digits):
        total += digit * (2 ** (position_from_right - 1) % 11)
    value = (12 - total % 11) % 11
    return "X" if value == 10 else str(value)


@given(st.text(alphabet="0123456789", min_size=17, max_size=17))
def test_check_character_matches_the_standard(first17: str) -> None:
    assert resident_id_check_char(first17) == check_char_from_the_standard(first17)


@given(
    st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2099, 12, 31)),
    st.integers(0, 999),
    st.text(alphabet="0123456789", min_size=6, max_size=6),
)
def test_a_valid_number_parses_and_one_changed_digit_does_not(born: dt.date, sequence: int, area: str) -> None:
    first17 = f"{area}{born:%Y%m%d}{sequence:03d}"
    number = first17 + check_char_from_the_standard(first17)
    parsed = parse_resident_id(number)
    assert parsed.number == number and parsed.birth_date == born
    assert parsed.sex == ("M" if sequence % 2 else "F")
    # MOD 11-2 catches every single-digit error
    for i in range(17):
        wrong = number[:i] + str((int(number[i]) + 1) % 10) + number[i + 1 :]
        with pytest.raises(InvalidPatientIdError):
            parse_resident_id(wrong)


def test_the_standards_example_and_normalisation() -> None:
    assert parse_resident_id("11010519491231002X").birth_date == dt.date(1949, 12, 31)
    assert parse_resident_id(" 110105 19491231 002x ").number == "11010519491231002X"
    assert normalise_resident_id("１１０１０５１９４９１２３１００２ｘ") == "11010519491231002X"


@pytest.mark.parametrize(
    "text,reason",
    [("110105194912310021", "check-character"), ("1101051949123100", "length"), ("110105194913310021", "birth-date")],
)
def test_refusals_say_why_without_repeating_the_number(text: str, reason: str) -> None:
    with pytest.raises(InvalidPatientIdError) as caught:
        parse_resident_id(text)
    assert caught.value.reason == reason  # which rule the number breaks, for pages that word it
    assert text not in str(caught.value) and "/" in str(caught.value)  # Chinese / English


def test_what_looks_like_a_resident_id() -> None:
    assert looks_like_resident_id("11010519491231002X") and looks_like_resident_id("1101051949123100")
    assert not looks_like_resident_id("DEMO-0001") and not looks_like_resident_id("MRN 42")


def with_check_char(first17: str) -> str:
    return first17 + check_char_from_the_standard(first17)


def test_the_check_character_is_that_of_the_first_17_digits_of_a_whole_number() -> None:
    # A whole number can be checked against its own last character (the 18th is never weighted).
    assert resident_id_check_char("11010519491231002X") == "X"
    assert resident_id_check_char("110101199003077571") == "1"


@pytest.mark.parametrize("born", ["19000101", "22001231"])
def test_the_first_and_last_possible_birth_years_are_accepted(born: str) -> None:
    # A card of a patient born in 1900 is a real card: refusing it leaves the patient unregistered.
    assert parse_resident_id(with_check_char(f"110105{born}003")).birth_date.strftime("%Y%m%d") == born


@pytest.mark.parametrize("born", ["18991231", "22010101"])
def test_a_birth_year_outside_the_possible_ones_is_refused(born: str) -> None:
    # A misread year (3990 for 1990) with a right check character must not become the patient's age.
    with pytest.raises(InvalidPatientIdError) as refused:
        parse_resident_id(with_check_char(f"110105{born}003"))
    assert refused.value.reason == "birth-date"


@pytest.mark.parametrize(
    "text",
    [
        "1101051949123100A2",  # a letter in the 17th place: refused as malformed, not as a crash
        "11010519491231002A",  # a check character that is neither a digit nor X
        "X10105194912310021",
    ],
)
def test_a_letter_where_a_digit_belongs_is_a_malformed_number(text: str) -> None:
    with pytest.raises(InvalidPatientIdError) as refused:
        parse_resident_id(text)
    assert refused.value.reason == "length"  # the page says "17 digits and 0-9 or X", not "wrong check digit"


@pytest.mark.parametrize(
    "digits,resident_id",
    [
        (14, False),  # a clinic's own number
        (15, True),  # a first-generation (15-digit) card, or one digit short
        (17, True),
        (19, True),  # one digit too many: a typo, which must be refused rather than filed as a patient
        (20, False),
    ],
)
def test_how_many_digits_look_like_a_resident_id(digits: int, resident_id: bool) -> None:
    # With any kind of ID allowed, what looks like a resident ID must be a valid one: a mistyped
    # card number taken as a clinic number would file the readings under a patient who does not exist.
    assert looks_like_resident_id("1" * digits) is resident_id
    assert looks_like_resident_id("1" * (digits - 1) + "X") is resident_id


@pytest.mark.parametrize(
    "text",
    [
        "1101051949123100²X",  # a superscript two: str.isdigit() says digit, int() refuses it
        "١١٠١٠٥١٩٤٩١٢٣١٠٠٢X",  # Arabic-Indic digits: another spelling of 11010519491231002X
        "11010519491231002²",
    ],
)
def test_digits_other_than_0_to_9_are_a_malformed_number_not_a_crash_nor_another_patient(text: str) -> None:
    # A garbled scan or pasted text: refused with the typed error (the scanner reports it, the
    # console says so), never a ValueError that takes the page or the scanner's link down, and
    # never a patient whose ID is the same number in other digits.
    from devices.scanner import CodeUnrecognised, ScannerDecoder, ScanRules

    with pytest.raises(InvalidPatientIdError) as refused:
        parse_resident_id(text)
    assert refused.value.reason == "length"
    rules = ScanRules.from_patterns(r"SFZ(?P<id>\w+)", "", "cn-resident-id")
    [event] = ScannerDecoder(rules).feed(f"SFZ{text}\r".encode())
    assert isinstance(event, CodeUnrecognised)
