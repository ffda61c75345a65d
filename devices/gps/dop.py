"""Dilution of precision from satellite geometry, the way gpsd computes xdop/ydop.

The receiver reports HDOP/VDOP/PDOP; it does not report the east/north split, which gpsd
derives from the azimuth/elevation of the satellites used (GSA) as seen in GSV. We do the same
so that epx/epy agree with gpsd's. Pure Python: a 4x4 inverse does not need numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Dops:
    xdop: float  # east
    ydop: float  # north
    vdop: float
    tdop: float
    hdop: float
    pdop: float
    gdop: float


def invert_matrix(m: list[list[float]]) -> list[list[float]] | None:
    """Gauss-Jordan inverse with partial pivoting; None for a (near-)singular matrix."""
    n = len(m)
    a = [row[:] + [1.0 if i == j else 0.0 for j in range(n)] for i, row in enumerate(m)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        scale = a[col][col]
        a[col] = [v / scale for v in a[col]]
        for r in range(n):
            if r != col and a[r][col] != 0.0:
                factor = a[r][col]
                a[r] = [v - factor * p for v, p in zip(a[r], a[col])]
    return [row[n:] for row in a]


def dops_from_geometry(sky: Sequence[tuple[float, float]]) -> Dops | None:
    """`sky`: (elevation, azimuth) in degrees of each satellite used. None if under-determined."""
    if len(sky) < 4:
        return None
    rows = []
    for el_deg, az_deg in sky:
        el, az = math.radians(el_deg), math.radians(az_deg)
        rows.append((math.cos(el) * math.sin(az), math.cos(el) * math.cos(az), math.sin(el), 1.0))
    normal = [[sum(r[i] * r[j] for r in rows) for j in range(4)] for i in range(4)]
    q = invert_matrix(normal)
    if q is None or any(q[i][i] <= 0.0 for i in range(4)):
        return None
    x, y, v, t = (math.sqrt(q[i][i]) for i in range(4))
    return Dops(
        x, y, v, t, math.hypot(x, y), math.sqrt(x * x + y * y + v * v), math.sqrt(x * x + y * y + v * v + t * t)
    )
