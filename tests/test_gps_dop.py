"""DOPs from satellite geometry (devices/gps/dop.py) against numpy's inverse of the same matrix.

What a wrong DOP costs: a home-visit fix whose error estimate (epx/epy, from xdop/ydop) is too
small says "within 5 m" of a house 50 m away; a missing one loses the error estimate entirely.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.gps.dop import dops_from_geometry, invert_matrix

# (elevation, azimuth) in degrees: a usual open-sky geometry, and exactly four satellites.
OPEN_SKY = [(62.0, 41.0), (17.0, 118.0), (35.0, 203.0), (48.0, 297.0), (8.0, 330.0), (80.0, 160.0)]
FOUR = [(70.0, 10.0), (20.0, 100.0), (25.0, 220.0), (30.0, 310.0)]


def _reference(sky: list[tuple[float, float]]) -> dict[str, float]:
    """The DOPs the textbook way: diag((HᵀH)⁻¹) with numpy."""
    h = np.array(
        [
            [
                math.cos(math.radians(el)) * math.sin(math.radians(az)),
                math.cos(math.radians(el)) * math.cos(math.radians(az)),
                math.sin(math.radians(el)),
                1.0,
            ]
            for el, az in sky
        ]
    )
    q = np.diag(np.linalg.inv(h.T @ h))
    return {
        "xdop": math.sqrt(q[0]),
        "ydop": math.sqrt(q[1]),
        "vdop": math.sqrt(q[2]),
        "tdop": math.sqrt(q[3]),
        "hdop": math.sqrt(q[0] + q[1]),
        "pdop": math.sqrt(q[0] + q[1] + q[2]),
        "gdop": math.sqrt(q.sum()),
    }


def _as_dict(d) -> dict[str, float]:
    return {name: getattr(d, name) for name in ("xdop", "ydop", "vdop", "tdop", "hdop", "pdop", "gdop")}


@pytest.mark.parametrize("sky", [OPEN_SKY, FOUR], ids=["six satellites", "exactly four"])
def test_every_dop_matches_the_textbook_inverse(sky: list[tuple[float, float]]) -> None:
    got = dops_from_geometry(sky)
    assert got is not None
    assert _as_dict(got) == pytest.approx(_reference(sky), rel=1e-9)


def test_a_fix_with_exactly_four_satellites_keeps_its_error_estimate() -> None:
    """Four satellites are the minimum for a 3D fix; three cannot give a position and time."""
    assert dops_from_geometry(FOUR) is not None
    assert dops_from_geometry(FOUR[:3]) is None
    assert dops_from_geometry([]) is None


@pytest.mark.parametrize(
    "sky",
    [
        [(90.0, 0.0)] * 4,  # four times the same satellite
        [(45.0, 0.0), (45.0, 120.0), (45.0, 240.0), (45.0, 0.0), (45.0, 120.0)],  # one cone: height = clock
        [(0.0, 0.0), (0.0, 90.0), (0.0, 180.0), (0.0, 270.0), (0.0, 45.0)],  # all on the horizon: no height
    ],
    ids=["same satellite", "one elevation", "horizon"],
)
def test_singular_geometry_gives_no_estimate_and_no_crash(sky: list[tuple[float, float]]) -> None:
    """With ≥ 4 satellites that still cannot separate the unknowns there is no DOP: None, not a
    TypeError or ZeroDivisionError out of the NMEA stream (and not a made-up number)."""
    assert dops_from_geometry(sky) is None


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(5.0, 89.0), st.floats(0.0, 359.9)), min_size=4, max_size=12))
def test_any_geometry_gives_the_reference_or_none(sky: list[tuple[float, float]]) -> None:
    got = dops_from_geometry(sky)
    try:
        reference = _reference(sky)
    except (np.linalg.LinAlgError, ValueError):
        reference = None  # singular for numpy too
    if reference is not None and max(reference.values()) < 1e3:
        assert got is not None and _as_dict(got) == pytest.approx(reference, rel=1e-6)
    elif got is not None:  # (near-)singular: a DOP, if any, is still a positive finite number
        assert all(v > 0 and math.isfinite(v) for v in _as_dict(got).values())


@pytest.mark.parametrize(
    "m",
    [
        [[2.0, 1.0], [1.0, 2.0]],
        [[2.0, -1.0, 0.0], [-1.0, 2.0, -1.0], [0.0, -1.0, 2.0]],
        [[4.0, 1.0, 1.0, 1.0], [1.0, 3.0, -1.0, 0.5], [1.0, -1.0, 5.0, 1.0], [1.0, 0.5, 1.0, 6.0]],
        [[0.0, 1.0], [1.0, 0.0]],  # needs a row swap
    ],
)
def test_the_gauss_jordan_inverse_matches_numpy(m: list[list[float]]) -> None:
    """Entries of exactly ±1 and 0 are where a skipped elimination step would hide."""
    got = invert_matrix(m)
    assert got is not None
    np.testing.assert_allclose(np.array(got), np.linalg.inv(np.array(m)), rtol=1e-12, atol=1e-12)


def test_a_singular_matrix_is_notinvert_matrixed() -> None:
    assert invert_matrix([[1.0, 2.0], [2.0, 4.0]]) is None
    assert invert_matrix([[0.0, 0.0], [0.0, 1.0]]) is None
