"""A fix and its error estimate (devices/gps/fix.py): gpsd's constants, DGPS, JSON round trip.

The estimate is what a family doctor's visit record keeps as "position within N metres": a
factor too small claims a house was visited that was 50 m away; DGPS must only tighten it when
the receiver really had corrections.
"""

from __future__ import annotations

import datetime as dt

import pytest

from devices.gps import Fix, FixMode, decode_nmea
from devices.gps.fix import H_UERE, P_UERE, SIGMA_TO_95_1D, SIGMA_TO_95_2D, V_UERE
from devices.gps.nmea import checksum


def _sentence(body: str) -> bytes:
    return f"${body}*{checksum(body):02X}\r\n".encode()


def _fix(quality: int, hdop: str = "1.00", vdop: str = "2.00") -> Fix:
    gga = _sentence(f"GPGGA,120000.00,3401.0000,N,11744.0000,W,{quality},08,{hdop},100.0,M,-33.0,M,,")
    gsa = _sentence(f"GPGSA,A,3,01,02,03,04,05,06,07,08,,,,,2.50,{hdop},{vdop}")
    rmc = _sentence("GPRMC,120000.00,A,3401.0000,N,11744.0000,W,0.0,0.0,010624,,,A")
    (fix,) = [e for e in decode_nmea(gga + gsa + rmc) if isinstance(e, Fix)]
    return fix


def test_gpsds_user_equivalent_range_errors() -> None:
    """gpsd (libgpsd_core.c): 15 / 23 / 19 m without corrections, 3.75 / 5.75 / 4.75 m with."""
    assert (H_UERE[False], V_UERE[False], P_UERE[False]) == (15.0, 23.0, 19.0)
    assert (H_UERE[True], V_UERE[True], P_UERE[True]) == (3.75, 5.75, 4.75)
    assert (SIGMA_TO_95_1D, SIGMA_TO_95_2D) == (1.96, 2.4477)


@pytest.mark.parametrize("quality,dgps", [(1, False), (2, True), (4, True), (5, True), (6, False)])
def test_dop_error_estimate_with_and_without_corrections(quality: int, dgps: bool) -> None:
    """GGA quality 2 (DGPS), 4 and 5 (RTK) use the corrected UERE; 1 (GPS) and 6 (dead reckoning) do not."""
    fix = _fix(quality, hdop="1.20", vdop="2.00")
    assert fix.dgps is dgps and fix.error_source == "dop"
    assert fix.eph_m == pytest.approx(1.20 * P_UERE[dgps])
    assert fix.epv_m == pytest.approx(2.00 * V_UERE[dgps])


def test_has_position_needs_a_2d_fix_and_both_coordinates() -> None:
    at = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
    assert Fix(FixMode.FIX_2D, at, 1.0, 2.0).has_position
    assert Fix(FixMode.FIX_3D, at, 0.0, 0.0).has_position  # 0°, 0° is a place (in the sea)
    assert not Fix(FixMode.NO_FIX, at, 1.0, 2.0).has_position
    assert not Fix(FixMode.FIX_3D, at, None, 2.0).has_position
    assert not Fix(FixMode.FIX_3D, at, 1.0, None).has_position


def test_json_round_trip() -> None:
    fix = _fix(2)
    data = fix.to_json()
    assert data["mode"] == 3 and data["time"] == "2024-06-01T12:00:00Z" and isinstance(data["systems"], list)
    assert Fix.from_json(data) == fix
    assert Fix.from_json({"mode": 1, "time": None, "unknown": 5}) == Fix(FixMode.NO_FIX, None)
    east8 = Fix(FixMode.FIX_2D, dt.datetime(2024, 6, 1, 20, tzinfo=dt.timezone(dt.timedelta(hours=8))), 1.0, 2.0)
    assert east8.to_json()["time"] == "2024-06-01T12:00:00Z"


def test_modes_are_gpsds_numbers_and_defaults_claim_nothing() -> None:
    """TPV "mode": 0 unknown, 1 no fix, 2 2D, 3 3D - the numbers in gpsd's JSON and ours."""
    assert [int(m) for m in (FixMode.UNKNOWN, FixMode.NO_FIX, FixMode.FIX_2D, FixMode.FIX_3D)] == [0, 1, 2, 3]
    bare = Fix(FixMode.FIX_3D, None)
    assert not bare.dgps and bare.error_source is None and bare.systems == ()  # no DGPS claimed
    assert Fix.from_json({"time": None}) == Fix(FixMode.UNKNOWN, None)  # a record without a mode knows nothing


@pytest.mark.parametrize(
    "system,prn,key",
    [
        ("GPS", 1, ("GPS", 1)),
        ("GPS", 32, ("GPS", 32)),
        ("GPS", 33, ("SBAS", 33)),
        ("GPS", 64, ("SBAS", 64)),
        ("GPS", 65, ("GLONASS", 1)),
        ("GPS", 96, ("GLONASS", 32)),
        ("GPS", 97, ("GPS", 97)),
        ("GPS", 192, ("GPS", 192)),
        ("GPS", 193, ("QZSS", 1)),
        ("GPS", 200, ("QZSS", 8)),
        ("GPS", 201, ("GPS", 201)),
        ("GNSS", 201, ("BeiDou", 1)),
        ("GNSS", 263, ("BeiDou", 63)),
        ("GNSS", 264, ("GPS", 264)),
        ("GNSS", 300, ("GPS", 300)),
        ("GNSS", 301, ("Galileo", 1)),
        ("GNSS", 336, ("Galileo", 36)),
        ("GNSS", 337, ("GPS", 337)),
        ("GNSS", 400, ("GPS", 400)),
        ("GNSS", 401, ("BeiDou", 1)),
        ("GNSS", 463, ("BeiDou", 63)),
        ("GNSS", 464, ("GPS", 464)),
        ("GNSS", 65, ("GLONASS", 1)),
        ("GLONASS", 64, ("GLONASS", 64)),
        ("GLONASS", 65, ("GLONASS", 1)),
        ("BeiDou", 200, ("BeiDou", 200)),
        ("BeiDou", 201, ("BeiDou", 1)),
        ("BeiDou", 400, ("BeiDou", 200)),
        ("BeiDou", 401, ("BeiDou", 1)),
        ("Galileo", 300, ("Galileo", 300)),
        ("Galileo", 301, ("Galileo", 1)),
        ("QZSS", 192, ("QZSS", 192)),
        ("QZSS", 193, ("QZSS", 1)),
        ("NavIC", 5, ("NavIC", 5)),
    ],
)
def test_satellite_numbering_schemes(system: str, prn: int, key: tuple[str, int]) -> None:
    """One satellite, one key, whichever numbering the receiver used (NMEA 2.x/4.x, gpsd's
    extended PRNs): counted twice, it would make the geometry - and the error estimate - look
    better than it is."""
    from devices.gps.stream import satellite_key

    assert satellite_key(system, prn) == key


def _day_rollover(rmc_time: str, rmc_date: str, gga_time: str) -> dt.datetime | None:
    """A valid RMC fixes the date at one time of day; a later fix without a date uses it."""
    rmc = _sentence(f"GPRMC,{rmc_time},A,3401.0000,N,11744.0000,W,0.0,0.0,{rmc_date},,,A")
    gga = _sentence(f"GPGGA,{gga_time},3401.0000,N,11744.0000,W,1,08,1.0,100.0,M,-33.0,M,,")
    fixes = [e for e in decode_nmea(rmc + gga) if isinstance(e, Fix)]
    return fixes[-1].time


def test_a_date_learnt_before_midnight_moves_on_after_it() -> None:
    assert _day_rollover("235959.00", "010624", "000001.00") == dt.datetime(2024, 6, 2, 0, 0, 1, tzinfo=dt.timezone.utc)
    assert _day_rollover("000001.00", "020624", "235959.00") == dt.datetime(
        2024, 6, 1, 23, 59, 59, tzinfo=dt.timezone.utc
    )
    # less than 12 hours apart: the same day
    assert _day_rollover("120000.00", "010624", "235959.00") == dt.datetime(
        2024, 6, 1, 23, 59, 59, tzinfo=dt.timezone.utc
    )
    assert _day_rollover("120000.00", "010624", "000001.00") == dt.datetime(2024, 6, 1, 0, 0, 1, tzinfo=dt.timezone.utc)
    # exactly 12 hours apart is still the same day, both ways
    assert _day_rollover("120000.00", "010624", "000000.00") == dt.datetime(2024, 6, 1, 0, 0, 0, tzinfo=dt.timezone.utc)
    assert _day_rollover("000000.00", "020624", "120000.00") == dt.datetime(
        2024, 6, 2, 12, 0, 0, tzinfo=dt.timezone.utc
    )
