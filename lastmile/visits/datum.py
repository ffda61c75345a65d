"""The datum of the county's household register, turned into the GPS fix's WGS-84.

A register exported from Gaode or Tencent maps holds GCJ-02 positions (China's obfuscated datum,
300-600 m off WGS-84), one from Baidu maps BD-09 (GCJ-02 shifted once more): compared as they
are with a receiver's WGS-84 fix, nearly every home visit would be flagged outside-radius. The
published GCJ-02 formula (as the public eviltransform/coordtransform libraries give it) only goes
WGS-84 -> GCJ-02; the way back is found by iterating it. Outside China there is no offset.
Pure: no I/O. Written here, not a dependency: the PyPI packages of it are unmaintained (2018-2019)
or one-author, and it is 40 lines.
"""

from __future__ import annotations

import math

DATUMS = ("wgs84", "gcj02", "bd09")

_A = 6378245.0  # Krasovsky 1940 semi-major axis, as the GCJ-02 formula has it
_EE = 0.00669342162296594323  # its first eccentricity squared
_BD_X_PI = math.pi * 3000.0 / 180.0
_INVERSE_TOLERANCE_DEG = 1e-10  # ~0.01 mm
_INVERSE_MAX_STEPS = 30  # converges in 3-5


def in_china(lat: float, lon: float) -> bool:
    """The box the GCJ-02 offset applies in (the formula's own, coarse, bounds)."""
    return 72.004 <= lon <= 137.8347 and 0.8293 <= lat <= 55.8271


def _offset(lat: float, lon: float) -> tuple[float, float]:
    """The GCJ-02 offset (degrees of latitude, longitude) at a WGS-84 position."""
    x, y = lon - 105.0, lat - 35.0
    waves = (20.0 * math.sin(6.0 * x * math.pi) + 20.0 * math.sin(2.0 * x * math.pi)) * 2.0 / 3.0
    d_lat = -100.0 + 2.0 * x + 3.0 * y + 0.2 * y * y + 0.1 * x * y + 0.2 * math.sqrt(abs(x)) + waves
    d_lat += (20.0 * math.sin(y * math.pi) + 40.0 * math.sin(y / 3.0 * math.pi)) * 2.0 / 3.0
    d_lat += (160.0 * math.sin(y / 12.0 * math.pi) + 320.0 * math.sin(y * math.pi / 30.0)) * 2.0 / 3.0
    d_lon = 300.0 + x + 2.0 * y + 0.1 * x * x + 0.1 * x * y + 0.1 * math.sqrt(abs(x)) + waves
    d_lon += (20.0 * math.sin(x * math.pi) + 40.0 * math.sin(x / 3.0 * math.pi)) * 2.0 / 3.0
    d_lon += (150.0 * math.sin(x / 12.0 * math.pi) + 300.0 * math.sin(x / 30.0 * math.pi)) * 2.0 / 3.0
    rad = math.radians(lat)
    magic = 1.0 - _EE * math.sin(rad) ** 2
    d_lat = d_lat * 180.0 / ((_A * (1.0 - _EE)) / (magic * math.sqrt(magic)) * math.pi)
    d_lon = d_lon * 180.0 / (_A / math.sqrt(magic) * math.cos(rad) * math.pi)
    return d_lat, d_lon


def wgs84_to_gcj02(lat: float, lon: float) -> tuple[float, float]:
    if not in_china(lat, lon):
        return lat, lon
    d_lat, d_lon = _offset(lat, lon)
    return lat + d_lat, lon + d_lon


def gcj02_to_wgs84(lat: float, lon: float) -> tuple[float, float]:
    """The WGS-84 position whose GCJ-02 is (lat, lon): the forward formula, iterated."""
    if not in_china(lat, lon):
        return lat, lon
    w_lat, w_lon = lat, lon
    for _ in range(_INVERSE_MAX_STEPS):
        g_lat, g_lon = wgs84_to_gcj02(w_lat, w_lon)
        e_lat, e_lon = lat - g_lat, lon - g_lon
        w_lat, w_lon = w_lat + e_lat, w_lon + e_lon
        if abs(e_lat) < _INVERSE_TOLERANCE_DEG and abs(e_lon) < _INVERSE_TOLERANCE_DEG:
            break
    return w_lat, w_lon


def bd09_to_gcj02(lat: float, lon: float) -> tuple[float, float]:
    if not in_china(lat, lon):
        return lat, lon
    x, y = lon - 0.0065, lat - 0.006
    z = math.hypot(x, y) - 0.00002 * math.sin(y * _BD_X_PI)
    theta = math.atan2(y, x) - 0.000003 * math.cos(x * _BD_X_PI)
    return z * math.sin(theta), z * math.cos(theta)


def to_wgs84(lat: float, lon: float, datum: str) -> tuple[float, float]:
    """A register position in `datum` (one of DATUMS) as WGS-84."""
    if datum == "gcj02":
        return gcj02_to_wgs84(lat, lon)
    if datum == "bd09":
        return gcj02_to_wgs84(*bd09_to_gcj02(lat, lon))
    if datum != "wgs84":
        raise ValueError(f"unknown datum {datum!r} (one of {', '.join(DATUMS)})")
    return lat, lon
