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


# --- what a visit record keeps from a cycle: times, speeds, modes, counts (mutation survivors) -----


def _fixes(*sentences: bytes) -> list[Fix]:
    return [e for e in decode_nmea(b"".join(sentences)) if isinstance(e, Fix)]


RMC_10KN = _sentence("GPRMC,120000.00,A,3401.0000,N,11744.0000,W,10.0,87.5,010624,,,A")


def test_a_date_learnt_12_hours_and_a_second_before_moves_on() -> None:
    # one second past the 12-hour line, with minutes in play: a visit logged on the wrong day
    assert _day_rollover("121500.00", "010624", "001459.00") == dt.datetime(
        2024, 6, 2, 0, 14, 59, tzinfo=dt.timezone.utc
    )
    assert _day_rollover("001459.00", "020624", "121500.00") == dt.datetime(
        2024, 6, 1, 12, 15, 0, tzinfo=dt.timezone.utc
    )


def test_speed_and_track_only_with_a_position() -> None:
    (fix,) = _fixes(RMC_10KN)
    assert fix.speed_mps == pytest.approx(5.14444) and fix.track_deg == 87.5  # knots, not m/s
    no_speed = _sentence("GPRMC,120000.00,A,3401.0000,N,11744.0000,W,,,010624,,,A")
    (fix,) = _fixes(no_speed)
    assert fix.speed_mps is None and fix.track_deg is None
    # a receiver without a fix still fills speed/track from its last solution: not believed
    void = _sentence("GPRMC,120000.00,V,,,,,10.0,87.5,010624,,,N")
    (fix,) = _fixes(void)
    assert fix.speed_mps is None and fix.track_deg is None and fix.latitude is None


def test_zda_dates_only_from_a_set_clock() -> None:
    gga = _sentence("GPGGA,120001.00,3401.0000,N,11744.0000,W,1,08,1.0,100.0,M,-33.0,M,,")

    def time_after(zda: str) -> dt.datetime | None:
        return _fixes(_sentence(zda), gga)[-1].time

    assert time_after("GPZDA,120000.00,01,06,1999,00,00") == dt.datetime(1999, 6, 1, 12, 0, 1, tzinfo=dt.timezone.utc)
    assert time_after("GPZDA,120000.00,01,06,1998,00,00") is None  # an unset RTC's year
    assert time_after("GPZDA,,01,06,2024,00,00") is None  # a date without its time of day
    # a ZDA without a date keeps the date a valid RMC gave (it must not erase it)
    rmc = _sentence("GPRMC,115959.00,A,3401.0000,N,11744.0000,W,0.0,0.0,010624,,,A")
    (*_, fix) = _fixes(rmc, _sentence("GPZDA,120000.00,,,,00,00"), gga)
    assert fix.time == dt.datetime(2024, 6, 1, 12, 0, 1, tzinfo=dt.timezone.utc)


def test_modes_positions_and_dops_from_the_right_sentence() -> None:
    # GGA quality 0 is "no fix": its stale position must not be used
    (fix,) = _fixes(_sentence("GPGGA,120000.00,3401.0000,N,11744.0000,W,0,00,,,M,,M,,"))
    assert fix.mode == FixMode.NO_FIX and fix.latitude is None and fix.satellites_visible is None
    # the receiver says 2D: its altitude is a guess, and no vertical error is claimed
    gga = _sentence("GPGGA,120000.00,3401.0000,N,11744.0000,W,1,08,,100.0,M,-33.0,M,,")
    (fix,) = _fixes(gga, _sentence("GPGSA,A,2,01,02,03,,,,,,,,,,2.50,1.50,"))
    assert fix.mode == FixMode.FIX_2D and fix.altitude_m is None and fix.epv_m is None
    assert fix.hdop == 1.5 and fix.pdop == 2.5 and fix.eph_m == pytest.approx(1.5 * P_UERE[False])
    # 3D from GSA even when GGA carries no altitude
    no_alt = _sentence("GPGGA,120000.00,3401.0000,N,11744.0000,W,1,08,,,M,,M,,")
    (fix,) = _fixes(no_alt, _sentence("GPGSA,A,3,01,02,03,04,,,,,,,,,2.50,1.50,2.00"))
    assert fix.mode == FixMode.FIX_3D and fix.epv_m == pytest.approx(2.0 * V_UERE[False])
    # no HDOP in GSA: GGA's is used; satellites used counted from GSA when GGA does not say
    (fix,) = _fixes(
        _sentence("GPGGA,120000.00,3401.0000,N,11744.0000,W,1,,1.10,100.0,M,-33.0,M,,"),
        _sentence("GPGSA,A,3,01,02,03,04,05,,,,,,,,,,"),
    )
    assert fix.hdop == 1.1 and fix.satellites_used == 5


def test_gst_altitude_sigma_gives_the_vertical_error() -> None:
    gga = _sentence("GPGGA,172814.0,3723.4658,N,12202.2695,W,2,6,1.2,18.893,M,-25.669,M,2.0,0031")
    gst = _sentence("GPGST,172814.0,0.006,0.023,0.020,273.6,0.023,0.020,0.031")
    (fix,) = _fixes(gga, gst)
    assert fix.epv_m == pytest.approx(SIGMA_TO_95_1D * 0.031) and fix.error_source == "receiver"
    (fix,) = _fixes(gga, _sentence("GPGST,172814.0,0.006,0.023,0.020,273.6,0.023,0.020,"))
    assert fix.epv_m is None  # no sigma, no vertical claim from GST (no VDOP either)


def test_a_cycle_without_time_at_a_pause_does_not_make_the_next_fix_a_cycle_late() -> None:
    """The receiver's last sentence of a cycle (here GGA) closes it at once, so a field visit's
    position is the one of that second. A pause that flushed a cycle carrying no time (only a GSA)
    must not make the assembler forget which sentence ends a cycle: the next fix would come one
    cycle (a second or more) late, and the last one of a visit not until the receiver says more."""
    from devices.gps.nmea import parse_sentence
    from devices.gps.stream import FixAssembler

    def rmc(t: str) -> bytes:
        return _sentence(f"GPRMC,{t},A,3401.9764,N,11744.8274,W,0.00,119.27,030610,,,A")

    def gga(t: str) -> bytes:
        return _sentence(f"GPGGA,{t},3401.9764,N,11744.8274,W,1,10,0.87,234.7,M,-33.2,M,,")

    gsa = _sentence("GPGSA,A,3,14,09,22,18,19,24,06,21,03,31,,,1.58,0.87,1.31")
    assembler = FixAssembler()

    def fixes(*lines: bytes) -> list[dt.time | None]:
        return [fix.time.time() if fix.time else None for line in lines for fix in assembler.add(parse_sentence(line))]

    assert fixes(rmc("145243.000"), gga("145243.000"), rmc("145244.000")) == [dt.time(14, 52, 43)]
    assert fixes(gga("145244.000")) == [dt.time(14, 52, 44)]  # GGA ends a cycle: learnt
    assert fixes(gsa) == [] and len(assembler.flush()) == 1  # a pause: a cycle with no time flushed
    assert fixes(gsa) == []  # the next cycle starts untimed
    assert fixes(rmc("145250.000"), gga("145250.000")) == [dt.time(14, 52, 50)]  # closed by its GGA, not later
