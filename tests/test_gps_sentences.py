"""NMEA 0183 sentence syntax (devices/gps/nmea.py), rule by rule, at the limits.

What a loose rule costs: a visit placed in the wrong hemisphere, a time off by the fraction of a
second that orders two visits, a DOP of 150 believed, a position with only a latitude.
"""

from __future__ import annotations

import datetime as dt
import math
import re

import pytest

from devices.gps.nmea import (
    GGA,
    GLL,
    GNS,
    GSA,
    GST,
    GSV,
    MAX_SENTENCE_LENGTH,
    RMC,
    ZDA,
    ChecksumError,
    NmeaError,
    Position,
    SatelliteInView,
    SirfEPE,
    UnknownSentence,
    checksum,
    parse_sentence,
    split_sentence,
)


def s(body: str) -> str:
    return f"${body}*{checksum(body):02X}\r\n"


def test_the_sentence_limit_keeps_every_number_finite() -> None:
    """The parser takes numbers as they come: a field of digits as long as a whole sentence must
    still be a finite float (float() of a longer one is infinity, with no error)."""
    assert math.isfinite(float("9" * MAX_SENTENCE_LENGTH)) and not math.isfinite(float("9" * 400))


def test_checksum_and_framing() -> None:
    assert checksum("GPGGA") == 0x47 ^ 0x50 ^ 0x47 ^ 0x47 ^ 0x41 and checksum("") == 0
    assert split_sentence(s("GPXYZ,1,2")) == ("GPXYZ", ["1", "2"])
    assert split_sentence(s("GPXYZ,1").lower().replace("$gpxyz", "$GPXYZ")) == ("GPXYZ", ["1"])  # hex in lower case
    long_body = "GPXYZ," + "1" * (MAX_SENTENCE_LENGTH - 10)
    assert len(s(long_body).rstrip()) == MAX_SENTENCE_LENGTH
    assert split_sentence(s(long_body))[0] == "GPXYZ"  # the limit itself
    for bad, needle in [
        (s(long_body + "1"), "characters (limit 200)"),
        ("GPGGA*00", "starts with '$'"),
        ("$GPXYZ,1", "no checksum"),
        ("$GPXYZ,1*7", "two hex digits"),
        ("$GPXYZ,1*7G", "two hex digits"),
        ("$GPXYZ,1*123", "two hex digits"),
        ("$GPX\x01Z*00", "control or non-printable"),
        ("$GPX\x7fZ*00", "control or non-printable"),
        (s("GP"), "not an NMEA address"),
        (s("GPXYZABCDEF"), "not an NMEA address"),
        (s("gpgga"), "not an NMEA address"),
    ]:
        with pytest.raises(NmeaError, match=re.escape(needle)):
            split_sentence(bad)
    assert split_sentence(s("GPXYZABCDE"))[0] == "GPXYZABCDE"  # ten characters: the longest address
    with pytest.raises(ChecksumError, match="does not match"):
        split_sentence("$GPXYZ,1*00")
    with pytest.raises(NmeaError, match="non-ASCII"):
        split_sentence(b"$GP\xc3\xa9*00")


def test_unknown_and_proprietary_sentences_are_kept_not_refused() -> None:
    assert parse_sentence(s("GPVTG,1,2")) == UnknownSentence("GP", "VTG", ("1", "2"))
    assert parse_sentence(s("XXGGA,1")) == UnknownSentence("XX", "GGA", ("1",))  # a talker we do not know
    assert parse_sentence(s("PGRME,1")) == UnknownSentence("P", "GRME", ("1",))


def _rmc(
    time: str = "123519.50",
    status: str = "A",
    lat: str = "4807.038",
    ns: str = "N",
    lon: str = "01131.000",
    ew: str = "E",
    speed: str = "022.4",
    track: str = "084.4",
    date: str = "230394",
    mode: str | None = None,
) -> RMC:
    fields = [time, status, lat, ns, lon, ew, speed, track, date, "003.1", "W"] + ([mode] if mode is not None else [])
    result = parse_sentence(s("GPRMC," + ",".join(fields)))
    assert isinstance(result, RMC)
    return result


def test_rmc_fields() -> None:
    r = _rmc()
    assert r.time == dt.time(12, 35, 19, 500000) and r.valid and r.mode == ""
    assert r.position == Position(48 + 7.038 / 60, 11 + 31 / 60)
    assert (r.speed_knots, r.track_deg, r.date) == (22.4, 84.4, dt.date(1994, 3, 23))
    assert _rmc(date="010180").date == dt.date(1980, 1, 1) and _rmc(date="311279").date == dt.date(2079, 12, 31)
    assert _rmc(status="D").valid and not _rmc(status="V").valid and not _rmc(status="").valid
    assert not _rmc(mode="N").valid and _rmc(mode="A").mode == "A" and _rmc(mode="D").valid
    assert _rmc(date="").date is None and _rmc(time="").time is None
    assert _rmc(lat="", ns="", lon="", ew="").position is None
    assert _rmc(ns="S", ew="W").position == Position(-(48 + 7.038 / 60), -(11 + 31 / 60))
    assert _rmc(speed="100000", track="-360").speed_knots == 1e5
    assert _rmc(track="360").track_deg == 360.0


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(status="X"), "RMC status 'X'"),
        (dict(date="2303941"), "not ddmmyy"),
        (dict(date="23039a"), "not ddmmyy"),
        (dict(date="300294"), "does not exist"),
        (dict(mode="AD"), "mode indicator 'AD'"),
        (dict(speed="100000.1"), "speed 100000.1 is outside"),
        (dict(speed="-1"), "speed -1.0 is outside"),
        (dict(track="360.1"), "track 360.1 is outside"),
        (dict(track="-360.1"), "track -360.1 is outside"),
        (dict(time="246000"), "out of range"),
        (dict(time="236000"), "out of range"),
        (dict(time="235960"), "out of range"),
        (dict(time="12351"), "not hhmmss"),
        (dict(time="123519.1234567"), "not hhmmss"),
        (dict(lat="4807.038", ns=""), "hemisphere ''"),
        (dict(lat="", ns="N"), "is not [d]ddmm.mmmm"),
        (dict(lat="4860.000"), "has 60.0 minutes"),
        (dict(lat="9000.001"), "beyond 90.0"),
        (dict(lon="18000.001"), "beyond 180.0"),
        (dict(lat="4807.038", ns="E"), "hemisphere 'E'"),
        (dict(lon="01131.000", ew="N"), "hemisphere 'N'"),
        (
            dict(
                lat="",
                ns="",
            ),
            "both latitude and longitude",
        ),
        (dict(lat="48a7.038"), "is not [d]ddmm.mmmm"),
        (dict(lat="4807.0381234567"), "is not [d]ddmm.mmmm"),
        (dict(speed="1e3"), "speed '1e3' is not a number"),
        (dict(speed="nan"), "is not a number"),
    ],
)
def test_rmc_refusals(kwargs: dict, needle: str) -> None:
    with pytest.raises(NmeaError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        _rmc(**kwargs)


@pytest.mark.parametrize(
    "lat,ns,expected",
    [
        ("9000.000", "N", 90.0),
        ("0000.000", "S", 0.0),
        ("0012.5", "N", 12.5 / 60),
        ("10159.999", "N", 101 + 59.999 / 60),
    ],
)
def test_latitude_limits(lat: str, ns: str, expected: float) -> None:
    if expected > 90:
        with pytest.raises(NmeaError, match="beyond 90"):
            _rmc(lat=lat, ns=ns)
        return
    assert _rmc(lat=lat, ns=ns).position.latitude == pytest.approx(expected)


def test_longitude_of_three_degree_digits() -> None:
    assert _rmc(lon="18000.000", ew="W").position.longitude == -180.0
    assert _rmc(lon="0001.5", ew="E").position.longitude == pytest.approx(1.5 / 60)
    with pytest.raises(NmeaError, match=r"not \[d\]ddmm\.mmmm"):
        _rmc(lon="1.5")  # whole minutes need two digits


def _gga(quality: str = "1", sats: str = "08", hdop: str = "0.9", alt: str = "545.4", geoid: str = "46.9") -> GGA:
    result = parse_sentence(s(f"GPGGA,123519,4807.038,N,01131.000,E,{quality},{sats},{hdop},{alt},M,{geoid},M,,"))
    assert isinstance(result, GGA)
    return result


def test_gga_fields_and_limits() -> None:
    g = _gga()
    assert (g.quality, g.satellites_used, g.hdop, g.altitude_m, g.geoid_separation_m) == (1, 8, 0.9, 545.4, 46.9)
    assert _gga(quality="9").quality == 9 and _gga(quality="0").quality == 0
    assert _gga(hdop="100").hdop == 100.0 and _gga(hdop="0").hdop == 0.0
    assert _gga(alt="-20000").altitude_m == -20000.0 and _gga(alt="1000000").altitude_m == 1e6
    assert _gga(geoid="-1000").geoid_separation_m == -1000.0 and _gga(geoid="1000").geoid_separation_m == 1000.0
    assert _gga(sats="").satellites_used is None and _gga(hdop="").hdop is None
    for kwargs, needle in [
        (dict(quality="10"), "not 0..9"),
        (dict(quality=""), "not 0..9"),
        (dict(hdop="100.1"), "HDOP 100.1"),
        (dict(hdop="-0.1"), "HDOP -0.1"),
        (dict(alt="-20000.1"), "altitude"),
        (dict(alt="1000000.1"), "altitude"),
        (dict(geoid="1000.1"), "geoid separation"),
        (dict(geoid="-1000.1"), "geoid separation"),
        (dict(sats="12345"), "not a small whole number"),
        (dict(sats="-1"), "not a small whole"),
    ]:
        with pytest.raises(NmeaError, match=needle):
            _gga(**kwargs)
    with pytest.raises(NmeaError, match="GGA needs at least 11 fields, got 9"):
        parse_sentence(s("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4"))


def test_gns_fields() -> None:
    g = parse_sentence(s("GNGNS,053232.438,3114.8789,N,12135.2442,E,ANNA,07,1.2,153.8,8.3,,"))
    assert isinstance(g, GNS) and g.mode == "ANNA" and g.satellites_used == 7 and g.geoid_separation_m == 8.3
    assert parse_sentence(s("GNGNS,053232.438,,,,,,07,,,,,")).mode == ""
    for mode in ("ANNAX", "ANNANNANN"):
        with pytest.raises(NmeaError, match="mode indicators"):
            parse_sentence(s(f"GNGNS,053232.438,3114.8789,N,12135.2442,E,{mode},07,1.2,153.8,8.3,,"))
    with pytest.raises(NmeaError, match="GNS needs at least 10"):
        parse_sentence(s("GNGNS,053232.438,3114.8789,N,12135.2442,E,ANNA,07,1.2"))


def _gsa(mode: str = "3", prns: str = "04,05,,09,12,,,24,,,,", dops: str = "2.5,1.3,2.1", extra: str = "") -> GSA:
    result = parse_sentence(s(f"GPGSA,A,{mode},{prns},{dops}{extra}"))
    assert isinstance(result, GSA)
    return result


def test_gsa_fields() -> None:
    g = _gsa()
    assert (g.selection, g.mode, g.prns, g.pdop, g.hdop, g.vdop, g.system_id) == (
        "A",
        3,
        (4, 5, 9, 12, 24),
        2.5,
        1.3,
        2.1,
        None,
    )
    assert _gsa(extra=",4").system_id == 4 and _gsa(mode="1").mode == 1 and _gsa(mode="2").mode == 2
    assert _gsa(dops="100,0,100").pdop == 100.0
    for kwargs, needle in [
        (dict(mode="4"), "not 1, 2 or 3"),
        (dict(mode="0"), "not 1, 2 or 3"),
        (dict(mode=""), "not 1, 2 or 3"),
        (dict(extra=",4,5"), "at most 18"),
        (dict(dops="100.1,1,1"), "PDOP"),
        (dict(dops="1,100.1,1"), "HDOP"),
        (dict(dops="1,1,100.1"), "VDOP"),
    ]:
        with pytest.raises(NmeaError, match=needle):
            _gsa(**kwargs)
    with pytest.raises(NmeaError, match="GSA needs at least 17"):
        parse_sentence(s("GPGSA,A,3,04,05,,09,12,,,24,,,,,2.5,1.3"))


def test_gsv_fields_and_limits() -> None:
    g = parse_sentence(s("GPGSV,2,1,08,01,40,083,46,02,17,308,41,12,07,344,39,14,22,228,45"))
    assert isinstance(g, GSV) and (g.message_count, g.message_number, g.satellites_in_view) == (2, 1, 8)
    assert g.satellites[0] == SatelliteInView(1, 40.0, 83.0, 46.0) and len(g.satellites) == 4 and g.signal_id is None
    g = parse_sentence(s("GLGSV,3,3,10,71,23,216,,72,43,277,,1"))
    assert g.signal_id == "1" and [sat.prn for sat in g.satellites] == [71, 72] and g.satellites[0].snr_db is None
    assert (
        parse_sentence(s("GPGSV,1,1,00")).satellites == () and parse_sentence(s("GPGSV,1,1,")).satellites_in_view == 0
    )
    assert parse_sentence(s("GPGSV,1,1,01,,,,,05,-90,0,0")).satellites == (
        SatelliteInView(5, -90.0, 0.0, 0.0),
    )  # padding
    assert parse_sentence(s("GPGSV,99,99,01,05,90,360,99")).satellites == (SatelliteInView(5, 90.0, 360.0, 99.0),)
    for body, needle in [
        ("GPGSV,1,2,08", "not a valid part number"),
        ("GPGSV,1,0,08", "not a valid part number"),
        ("GPGSV,100,1,08", "not a valid part number"),
        ("GPGSV,,1,08", "not a valid part number"),
        ("GPGSV,1,,08", "not a valid part number"),
        ("GPGSV,1,1,08,01,40", "groups of 4"),
        ("GPGSV,1,1,08,01,40,083,46,02,17,308,41,12,07,344,39,14,22,228,45,15,1,1,1", "more than four"),
        ("GPGSV,1,1,01,01,91,083,46", "elevation"),
        ("GPGSV,1,1,01,01,-91,083,46", "elevation"),
        ("GPGSV,1,1,01,01,40,361,46", "azimuth"),
        ("GPGSV,1,1,01,01,40,-1,46", "azimuth"),
        ("GPGSV,1,1,01,01,40,083,100", "SNR"),
        ("GPGSV,1,1,01,01,40,083,-1", "SNR"),
        ("GPGSV,1,1", "GSV needs at least 3"),
    ]:
        with pytest.raises(NmeaError, match=needle):
            parse_sentence(s(body))


def test_gst_zda_gll_and_sirf_epe() -> None:
    g = parse_sentence(s("GPGST,172814.0,0.006,0.023,0.020,273.6,0.023,0.020,0.031"))
    assert isinstance(g, GST) and (g.rms_range_m, g.major_m, g.minor_m, g.orientation_deg) == (
        0.006,
        0.023,
        0.020,
        273.6,
    )
    assert (g.latitude_sigma_m, g.longitude_sigma_m, g.altitude_sigma_m) == (0.023, 0.020, 0.031)
    for body, needle in [
        ("GPGST,172814.0,10000000.1,0,0,0,0,0,0", "GST error"),
        ("GPGST,172814.0,-0.1,0,0,0,0,0,0", "GST error"),
        ("GPGST,172814.0,1,1,1,360.1,1,1,1", "GST orientation"),
        ("GPGST,172814.0,1,1,1,-360.1,1,1,1", "GST orientation"),
        ("GPGST,1,1,1,1,1,1,1", "GST needs"),
    ]:
        with pytest.raises(NmeaError, match=needle):
            parse_sentence(s(body))
    assert parse_sentence(s("GPGST,172814.0,10000000,0,0,360,0,0,0")).rms_range_m == 1e7
    z = parse_sentence(s("GPZDA,201530.00,04,07,2002,00,00"))
    assert isinstance(z, ZDA) and z.date == dt.date(2002, 7, 4) and z.time == dt.time(20, 15, 30)
    assert parse_sentence(s("GPZDA,201530.00,,,,00,00")).date is None
    for body, needle in [
        ("GPZDA,201530.00,04,,2002", "incomplete"),
        ("GPZDA,201530.00,,07,", "incomplete"),
        ("GPZDA,201530.00,31,02,2002", "does not exist"),
        ("GPZDA,201530.00,04,07", "ZDA needs"),
    ]:
        with pytest.raises(NmeaError, match=needle):
            parse_sentence(s(body))
    gll = parse_sentence(s("GPGLL,4916.45,N,12311.12,W,225444,A"))
    assert isinstance(gll, GLL) and gll.valid and gll.position == Position(49 + 16.45 / 60, -(123 + 11.12 / 60))
    assert not parse_sentence(s("GPGLL,4916.45,N,12311.12,W,225444,V")).valid
    assert not parse_sentence(s("GPGLL,4916.45,N,12311.12,W,225444,A,N")).valid
    assert parse_sentence(s("GPGLL,4916.45,N,12311.12,W,225444,A,A")).valid
    with pytest.raises(NmeaError, match="GLL needs at least 6"):
        parse_sentence(s("GPGLL,4916.45,N,12311.12,W"))
    e = parse_sentence(s("PSRFEPE,100542.000,A,0.7,6.82,10.69"))
    assert isinstance(e, SirfEPE) and e.valid and (e.hdop, e.ehpe_m, e.evpe_m) == (0.7, 6.82, 10.69)
    assert not parse_sentence(s("PSRFEPE,100542.000,V,0.7,6.82,10.69")).valid
    for body, needle in [
        ("PSRFEPE,100542.000,A,100.1,1,1", "HDOP"),
        ("PSRFEPE,100542.000,A,1,10000000.1,1", "EHPE"),
        ("PSRFEPE,100542.000,A,1,1,-1", "EVPE"),
        ("PSRFEPE,100542.000,A,1", "PSRFEPE needs"),
    ]:
        with pytest.raises(NmeaError, match=needle):
            parse_sentence(s(body))


def test_time_fractions() -> None:
    assert _rmc(time="000000").time == dt.time(0, 0, 0)
    assert _rmc(time="235959.999999").time == dt.time(23, 59, 59, 999999)
    assert _rmc(time="120000.5").time == dt.time(12, 0, 0, 500000)
    assert _rmc(time="120000.05").time == dt.time(12, 0, 0, 50000)


GNS_T = "GNGNS,053232.438,3114.8789,N,12135.2442,E,ANNA,07,{f7},{f8},{f9},,"
GSA_T = "GPGSA,A,3,04,05,,09,12,,,24,,,,,{f14},{f15},{f16}"
EPE = "PSRFEPE,100542.000,A,{f2},{f3},{f4}"
GST_T = "GPGST,172814.0,1,1,1,{f4},1,1,1"
DEFAULTS = {
    GNS_T: {7: "1.2", 8: "153.8", 9: "8.3"},
    GSA_T: {14: "2.5", 15: "1.3", 16: "2.1"},
    EPE: {2: "0.7", 3: "6.82", 4: "10.69"},
    GST_T: {4: "273.6"},
}


@pytest.mark.parametrize(
    "template,field,low,high,attribute",
    [
        (GNS_T, 7, "0", "100", "hdop"),
        (GNS_T, 8, "-20000", "1000000", "altitude_m"),
        (GNS_T, 9, "-1000", "1000", "geoid_separation_m"),
        (GSA_T, 14, "0", "100", "pdop"),
        (GSA_T, 15, "0", "100", "hdop"),
        (GSA_T, 16, "0", "100", "vdop"),
        (EPE, 2, "0", "100", "hdop"),
        (EPE, 3, "0", "10000000", "ehpe_m"),
        (EPE, 4, "0", "10000000", "evpe_m"),
        (GST_T, 4, "-360", "360", "orientation_deg"),
    ],
)
def test_every_range_is_inclusive_at_both_ends(template: str, field: int, low: str, high: str, attribute: str) -> None:
    def parsed(value: str):
        values = dict(DEFAULTS[template])
        values[field] = value
        return parse_sentence(s(template.format(**{f"f{k}": v for k, v in values.items()})))

    assert getattr(parsed(low), attribute) == float(low)
    assert getattr(parsed(high), attribute) == float(high)
    step = 0.5 if abs(float(high)) < 1e6 else 1.0
    for outside in (float(low) - step, float(high) + step):
        with pytest.raises(NmeaError, match="is outside"):
            parsed(repr(outside))


@pytest.mark.parametrize(
    "system_id,name", [(1, "GPS"), (2, "GLONASS"), (3, "Galileo"), (4, "BeiDou"), (5, "QZSS"), (6, "NavIC")]
)
def test_nmea_4_10_system_ids(system_id: int, name: str) -> None:
    from devices.gps.nmea import SYSTEM_IDS

    assert SYSTEM_IDS[system_id] == name and len(SYSTEM_IDS) == 6


def test_more_framing_limits() -> None:
    assert split_sentence(s("GPXYZ, ~"))[1] == [" ~"]  # space and tilde are printable
    for bad in ("$GPXYZ,\x1f*00", "$GPXYZ,\x7f*00"):
        with pytest.raises(NmeaError, match="control or non-printable"):
            split_sentence(bad)
    with pytest.raises(NmeaError, match="time '240000' is out of range"):
        parse_sentence(s("GPGGA,240000,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"))
    assert parse_sentence(s("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394")).date == dt.date(1994, 3, 23)
    with pytest.raises(NmeaError, match="RMC needs at least 9 fields, got 8"):
        parse_sentence(s("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4"))
    g = parse_sentence(s("GPGSA,A,3,01,02,03,04,05,06,07,08,09,10,11,12,1,1,1"))
    assert g.prns == tuple(range(1, 13))  # all twelve satellite slots
    assert parse_sentence(s("PSRFEPE,100542.000,A,0.7,6.82,10.69")).evpe_m == 10.69
    with pytest.raises(NmeaError, match="PSRFEPE needs at least 5 fields, got 4"):
        parse_sentence(s("PSRFEPE,100542.000,A,0.7,6.82"))
