"""lastmile/visits/datum.py against published reference points (the public eviltransform test
pairs and coordtransform's README example) and its own round trip."""

from __future__ import annotations

import pytest

from lastmile.visits.datum import bd09_to_gcj02, gcj02_to_wgs84, to_wgs84, wgs84_to_gcj02
from lastmile.visits.households import distance_m

# (WGS-84 lat, lon, GCJ-02 lat, lon): eviltransform's test points (Shanghai, Shenzhen, Beijing)
PAIRS = [
    (31.1774276, 121.5272106, 31.17530398364597, 121.531541859215),
    (22.543847, 113.912316, 22.540796131694766, 113.9171764808363),
    (39.911954, 116.377817, 39.91334545536069, 116.38404722455657),
    (39.915, 116.404, 39.91640428150164, 116.41024449916938),  # coordtransform's README example
]


@pytest.mark.parametrize(("w_lat", "w_lon", "g_lat", "g_lon"), PAIRS)
def test_gcj02_of_published_points(w_lat: float, w_lon: float, g_lat: float, g_lon: float) -> None:
    assert wgs84_to_gcj02(w_lat, w_lon) == pytest.approx((g_lat, g_lon), abs=1e-9)
    assert distance_m(w_lat, w_lon, g_lat, g_lon) > 300  # what a register in GCJ-02 was off by
    assert distance_m(*to_wgs84(g_lat, g_lon, "gcj02"), w_lat, w_lon) < 0.01


def test_bd09_to_gcj02_of_the_published_point() -> None:
    assert bd09_to_gcj02(39.915, 116.404) == pytest.approx((39.90865673957631, 116.39762729119315), abs=1e-9)
    lat, lon = to_wgs84(39.915, 116.404, "bd09")  # BD-09 -> GCJ-02 -> WGS-84
    assert distance_m(lat, lon, *gcj02_to_wgs84(39.90865673957631, 116.39762729119315)) < 0.01


def test_the_inverse_round_trips_within_a_metre_across_china() -> None:
    for lat in (18.3, 25.0, 31.2, 39.9, 45.8, 53.0):
        for lon in (75.0, 87.6, 100.0, 113.3, 121.5, 134.0):
            back = gcj02_to_wgs84(*wgs84_to_gcj02(lat, lon))
            assert distance_m(*back, lat, lon) < 1.0, (lat, lon)


def test_outside_china_no_offset() -> None:
    for datum in ("wgs84", "gcj02", "bd09"):
        assert to_wgs84(48.8566, 2.3522, datum) == (48.8566, 2.3522)  # Paris
        assert to_wgs84(-33.87, 151.21, datum) == (-33.87, 151.21)  # Sydney
    with pytest.raises(ValueError, match="unknown datum"):
        to_wgs84(31.2, 121.5, "cgcs2000")
