"""Bring channels with their own scale and offset onto one integer unit, exactly.

XML and DICOM files give every lead its own sensitivity and baseline; a recording has one
`uv_per_unit`. When every channel's scale is a whole multiple of a common unit and every
offset a whole number of that unit, the integer samples are rescaled without loss; otherwise
we refuse rather than round physiological values.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import gcd

import numpy as np

from devices.errors import UnsupportedFeatureError

MAX_MULTIPLIER = 1024  # beyond this the common unit is so fine that int32 could overflow


@dataclass(frozen=True, slots=True)
class Channel:
    raw: np.ndarray  # integer samples as stored
    uv_per_unit: float  # scale of one stored unit, in µV (negative: an inverted channel)
    offset_uv: float = 0.0  # physical value of the stored 0, in µV


def _fraction(value: float) -> Fraction:
    return Fraction(value).limit_denominator(1_000_000)


def to_common_unit(channels: list[Channel], what: str) -> tuple[np.ndarray, float]:
    """Stack channels as integers in one unit: returns (samples (channels, n), µV per unit)."""
    if not channels:
        raise UnsupportedFeatureError(f"{what}: no channel to scale")
    if len({c.raw.shape for c in channels}) != 1:
        # a lead one sample short would shift its beats against the other leads
        raise UnsupportedFeatureError(
            f"{what}: channels have different lengths {sorted({c.raw.shape[0] for c in channels})}"
        )
    scales = [_fraction(c.uv_per_unit) for c in channels]
    offsets = [_fraction(c.offset_uv) for c in channels]
    if any(s == 0 for s in scales):
        raise UnsupportedFeatureError(f"{what}: a channel has a zero scale")
    # the largest unit that divides every scale and every offset
    numer = 0
    denom = 1
    for f in scales + [o for o in offsets if o]:
        denom = denom * f.denominator // gcd(denom, f.denominator)
    for f in scales + [o for o in offsets if o]:
        numer = gcd(numer, abs(f.numerator * (denom // f.denominator)))
    unit = Fraction(numer, denom)
    multipliers = [int(s / unit) for s in scales]
    if max(abs(k) for k in multipliers) > MAX_MULTIPLIER:
        raise UnsupportedFeatureError(
            f"{what}: channel scales {sorted({float(s) for s in scales})} µV have no practical "
            "common unit; the samples cannot be represented exactly"
        )
    n = channels[0].raw.shape[0]
    out = np.empty((len(channels), n), dtype=np.int64)
    for i, (channel, k, offset) in enumerate(zip(channels, multipliers, offsets)):
        out[i] = channel.raw.astype(np.int64) * k + int(offset / unit)
    lo, hi = (int(out.min()), int(out.max())) if out.size else (0, 0)
    dtype = np.int16 if lo >= -32768 and hi <= 32767 else np.int32
    if not (lo >= -(2**31) and hi < 2**31):
        raise UnsupportedFeatureError(f"{what}: samples exceed 32-bit range after scaling")
    return out.astype(dtype), float(unit)
