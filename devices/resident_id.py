"""China's resident identity number (GB 11643-1999): normalise, check, decode.

18 characters: 6-digit area code, birth date YYYYMMDD, 3-digit sequence (odd for men, even for
women), and a check character computed with ISO 7064 MOD 11-2 over the first 17 digits.

Stop-gap for the doctor's console: issue 12 puts the same checks (same names) into
`devices/identity.py`; when it lands, import from there and delete this module.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from devices.errors import DeviceError

# ISO 7064 MOD 11-2: weight of position i (0-based from the left) is 2^(17-i) mod 11.
WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))
CHECK_CHARACTERS = "10X98765432"  # indexed by (weighted sum mod 11)
# What a phone keyboard, an IME or a card reader's QR text may hand us instead of ASCII.
_TO_ASCII = str.maketrans("０１２３４５６７８９ｘＸ", "0123456789XX")
_SEPARATORS = frozenset(" \t\r\n\u3000-_")


class InvalidPatientIdError(DeviceError, ValueError):
    """Not a valid resident identity number. The message is bilingual (Chinese first), meant for
    the doctor as it is, and never repeats the number (messages may be logged). `reason`:
    "length", "check-character" or "birth-date", for callers that word it themselves."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ResidentId:
    number: str  # normalised: 17 digits and the check character (X upper case)
    birth_date: dt.date
    sex: str  # "M" (odd sequence digit) or "F" (even)


def resident_id_check_char(first17: str) -> str:
    if len(first17) != 17 or not first17.isascii() or not first17.isdigit():
        raise ValueError("the check character needs exactly 17 digits")
    return CHECK_CHARACTERS[sum(int(d) * w for d, w in zip(first17, WEIGHTS)) % 11]


def normalise_resident_id(text: str) -> str:
    """Full-width digits to ASCII, lower-case x to X, spaces and separators dropped."""
    return "".join(ch for ch in text.translate(_TO_ASCII).upper() if ch not in _SEPARATORS)


def looks_like_resident_id(text: str) -> bool:
    """Digits (and perhaps an X) only, 15 to 19 of them: what someone typing or scanning a resident
    ID produces, typos included. Such input must pass `parse_resident_id`; anything else (a clinic
    number such as "MRN-0042") is another kind of identifier."""
    number = normalise_resident_id(text)
    return 15 <= len(number) <= 19 and number.rstrip("X").isdigit() and number.isascii()


def parse_resident_id(text: str) -> ResidentId:
    """The checked number and what it encodes; InvalidPatientIdError says what is wrong."""
    number = normalise_resident_id(text)
    if len(number) != 18 or not number.isascii() or not number[:17].isdigit() or number[17] not in "0123456789X":
        raise InvalidPatientIdError(
            f"身份证号应为18位（17位数字加1位校验码 0-9 或 X），这里有 {len(number)} 位 / "
            f"a resident ID has 18 characters (17 digits and a check character 0-9 or X); this has {len(number)}",
            "length",
        )
    expected = resident_id_check_char(number[:17])
    if number[17] != expected:
        raise InvalidPatientIdError(
            "身份证号校验码不对，请核对号码或重新扫描 / "
            "the resident ID's check character does not match: check the number or scan it again",
            "check-character",
        )
    try:
        born = dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        born = None
    if born is None or born.year < 1900:
        raise InvalidPatientIdError(
            "身份证号中的出生日期无效 / the birth date inside the resident ID is not a valid date", "birth-date"
        )
    return ResidentId(number, born, "M" if int(number[16]) % 2 else "F")
