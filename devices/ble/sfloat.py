"""IEEE 11073-20601 SFLOAT (16 bit) and FLOAT (32 bit), as the Bluetooth health profiles use them.

value = mantissa * 10**exponent, both signed (SFLOAT: 4-bit exponent, 12-bit mantissa; FLOAT:
8-bit exponent, 24-bit mantissa). Five mantissas are reserved for special values: NaN, NRes
(not at this resolution), +INFINITY, -INFINITY and one reserved code. They decode to "no value"
(`value` None plus the reason), never to a number. The standard defines them with exponent 0;
we treat the reserved mantissas as special whatever the exponent, because a device that got the
exponent wrong must not turn "no value" into a plausible-looking number.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from devices.errors import ProtocolError

NAN = "nan"
NRES = "nres"
POSITIVE_INFINITY = "+inf"
NEGATIVE_INFINITY = "-inf"
RESERVED = "reserved"

# Raw mantissa (two's-complement field, before sign extension) -> special value.
SFLOAT_SPECIALS: dict[int, str] = {
    0x07FF: NAN,
    0x0800: NRES,
    0x07FE: POSITIVE_INFINITY,
    0x0802: NEGATIVE_INFINITY,
    0x0801: RESERVED,
}
FLOAT_SPECIALS: dict[int, str] = {
    0x7FFFFF: NAN,
    0x800000: NRES,
    0x7FFFFE: POSITIVE_INFINITY,
    0x800002: NEGATIVE_INFINITY,
    0x800001: RESERVED,
}
_SFLOAT_CODES = {v: k for k, v in SFLOAT_SPECIALS.items()}
_FLOAT_CODES = {v: k for k, v in FLOAT_SPECIALS.items()}


@dataclass(frozen=True, slots=True)
class MedFloat:
    """A decoded SFLOAT/FLOAT: a number with its decimal exponent, or a special value."""

    value: float | None
    special: str | None = None
    exponent: int = 0  # kept: it says the device's resolution (2.0 vs 2.00)

    @property
    def is_special(self) -> bool:
        return self.special is not None


def _signed(raw: int, bits: int) -> int:
    return raw - (1 << bits) if raw & (1 << (bits - 1)) else raw


def _value(mantissa: int, exponent: int) -> float:
    # Decimal keeps 10**-1 * 1234 == 123.4 exactly instead of 123.40000000000001.
    return float(Decimal(mantissa).scaleb(exponent))


def decode_sfloat(raw: int) -> MedFloat:
    if not 0 <= raw <= 0xFFFF:
        raise ProtocolError(f"SFLOAT must be 16 bits, got {raw:#x}")
    mantissa_field = raw & 0x0FFF
    exponent = _signed(raw >> 12, 4)
    special = SFLOAT_SPECIALS.get(mantissa_field)
    if special is not None:
        return MedFloat(None, special, exponent)
    return MedFloat(_value(_signed(mantissa_field, 12), exponent), None, exponent)


def decode_float(raw: int) -> MedFloat:
    if not 0 <= raw <= 0xFFFFFFFF:
        raise ProtocolError(f"FLOAT must be 32 bits, got {raw:#x}")
    mantissa_field = raw & 0xFFFFFF
    exponent = _signed(raw >> 24, 8)
    special = FLOAT_SPECIALS.get(mantissa_field)
    if special is not None:
        return MedFloat(None, special, exponent)
    return MedFloat(_value(_signed(mantissa_field, 24), exponent), None, exponent)


def _encode(mantissa: int, exponent: int, m_bits: int, e_bits: int, specials: dict[int, str]) -> int:
    m_lo, m_hi = -(1 << (m_bits - 1)), (1 << (m_bits - 1)) - 1
    e_lo, e_hi = -(1 << (e_bits - 1)), (1 << (e_bits - 1)) - 1
    if not (m_lo <= mantissa <= m_hi and e_lo <= exponent <= e_hi):
        raise ValueError(f"{mantissa}e{exponent} does not fit {m_bits}+{e_bits} bits")
    field = mantissa & ((1 << m_bits) - 1)
    if field in specials:
        raise ValueError(f"mantissa {mantissa} is reserved for {specials[field]}")
    return ((exponent & ((1 << e_bits) - 1)) << m_bits) | field


def encode_sfloat(value: float | str, exponent: int = 0) -> int:
    """The 16-bit SFLOAT for `value` at resolution 10**exponent, or for a special value name."""
    if isinstance(value, str):
        return _SFLOAT_CODES[value]
    return _encode(round(Decimal(str(value)).scaleb(-exponent)), exponent, 12, 4, SFLOAT_SPECIALS)


def encode_float(value: float | str, exponent: int = 0) -> int:
    """The 32-bit FLOAT for `value` at resolution 10**exponent, or for a special value name."""
    if isinstance(value, str):
        return _FLOAT_CODES[value]
    return _encode(round(Decimal(str(value)).scaleb(-exponent)), exponent, 24, 8, FLOAT_SPECIALS)
