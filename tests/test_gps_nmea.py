"""NMEA 0183 decoding (devices/gps): sentences, stream reassembly, fixes against gpsd's own output."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.errors import ProtocolError
from devices.gps import (
    BadSentence,
    ChecksumError,
    Fix,
    FixMode,
    NmeaError,
    NmeaStreamDecoder,
    decode_nmea,
    parse_sentence,
)
from devices.gps.nmea import GGA, GSA, GST, GSV, RMC, UnknownSentence, checksum
from devices.gps.stream import satellite_key
from tests.conftest import shared_file
from tests.gps_reference import final_by_time, tpv_reports

# Captured sentences (gpsd regression logs: BT-Q818 MTK receiver, SiRF-TriG BeiDou, Quectel L76K).
BTQ818_GGA = b"$GPGGA,145243.000,3401.9764,N,11744.8274,W,2,10,0.87,234.7,M,-33.2,M,0000,0000*5F\r\n"
BTQ818_GSA = b"$GPGSA,A,3,14,09,22,18,19,24,06,21,03,31,,,1.58,0.87,1.31*0D\r\n"
BTQ818_RMC = b"$GPRMC,145243.000,A,3401.9764,N,11744.8274,W,0.00,119.27,030610,,,D*70\r\n"
SIRF_GBGSV = b"$GBGSV,3,1,11,201,49,147,44,202,23,250,35,204,35,123,42,213,83,243,*6D\r\n"
SIRF_VOID_RMC = b"$GNRMC,053229.438,V,,,,,,,020315,,,N*56\r\n"
SIRF_GNS = b"$GNGNS,053232.438,3114.8789,N,12135.2442,E,ANNA,07,1.2,153.8,8.3,,0000*5F\r\n"
QUECTEL_GSA_BDS = b"$GNGSA,A,3,13,27,37,,,,,,,,,,1.5,0.9,1.2,4*39\r\n"
QUECTEL_GLGSV = b"$GLGSV,3,3,10,71,23,216,,72,43,277,,0*7A\r\n"
# Trimble's documented GST example (1-sigma errors in metres).
TRIMBLE_GST = b"$GPGST,172814.0,0.006,0.023,0.020,273.6,0.023,0.020,0.031*6A\r\n"

LOGS = ("beidou-gb", "bt-q818", "quectel-l76k-nmea")


def test_sentences_parse_to_typed_records() -> None:
    gga = parse_sentence(BTQ818_GGA)
    assert isinstance(gga, GGA) and gga.quality == 2 and gga.satellites_used == 10
    assert gga.position and gga.position.latitude == pytest.approx(34 + 1.9764 / 60)
    assert gga.position.longitude == pytest.approx(-(117 + 44.8274 / 60))
    assert gga.altitude_m == 234.7 and gga.geoid_separation_m == -33.2
    gsa = parse_sentence(BTQ818_GSA)
    assert isinstance(gsa, GSA) and gsa.mode == 3 and len(gsa.prns) == 10 and gsa.vdop == 1.31
    rmc = parse_sentence(BTQ818_RMC)
    assert isinstance(rmc, RMC) and rmc.valid and rmc.date == dt.date(2010, 6, 3) and rmc.mode == "D"
    void = parse_sentence(SIRF_VOID_RMC)
    assert isinstance(void, RMC) and not void.valid and void.position is None
    gsv = parse_sentence(SIRF_GBGSV)
    assert isinstance(gsv, GSV) and gsv.talker == "GB" and [s.prn for s in gsv.satellites] == [201, 202, 204, 213]
    assert gsv.satellites[3].snr_db is None
    glgsv = parse_sentence(QUECTEL_GLGSV)
    assert isinstance(glgsv, GSV) and glgsv.signal_id == "0" and len(glgsv.satellites) == 2
    assert parse_sentence(QUECTEL_GSA_BDS).system_id == 4  # type: ignore[union-attr]
    gst = parse_sentence(TRIMBLE_GST)
    assert isinstance(gst, GST) and gst.latitude_sigma_m == 0.023 and gst.altitude_sigma_m == 0.031
    assert isinstance(parse_sentence(b"$GNVTG,286.35,T,,M,0.00,N,0.00,K,A*29"), UnknownSentence)


def test_checksum_and_syntax_errors_are_typed() -> None:
    with pytest.raises(ChecksumError):
        parse_sentence(BTQ818_GGA.replace(b"3401.9764", b"3401.9765"))
    for bad in (b"GPGGA,1*00", b"$GPGGA,145243.000", b"$GP\xffGA*00", b"$GPRMC,256099,A*00"):
        with pytest.raises(NmeaError):
            parse_sentence(bad)
    body = "GPGGA,145243.000,9100.0000,N,00000.0000,E,1,05,1.0,1.0,M,0.0,M,,"
    with pytest.raises(NmeaError, match="beyond"):
        parse_sentence(f"${body}*{checksum(body):02X}")


def test_beidou_numbering_maps_to_one_satellite() -> None:
    # SiRF's GB talker numbers BeiDou 201..; NMEA 4.11 receivers number it 1..63 with system id 4.
    assert satellite_key("BeiDou", 201) == satellite_key("GNSS", 201) == ("BeiDou", 1)
    assert satellite_key("BeiDou", 13) == ("BeiDou", 13)
    assert satellite_key("GNSS", 73) == satellite_key("GLONASS", 73) == ("GLONASS", 9)


def test_stream_reassembles_split_and_noisy_input() -> None:
    data = b"\x00\xff garbage" + BTQ818_GGA + BTQ818_GSA[:20] + b"$GPGGA,trunc" + b"\r\n" + BTQ818_RMC
    decoder = NmeaStreamDecoder()
    events = []
    for i in range(0, len(data), 7):  # split anywhere
        events += decoder.receive_data(data[i : i + 7])
    events += decoder.flush()
    fixes = [e for e in events if isinstance(e, Fix)]
    bad = [e for e in events if isinstance(e, BadSentence)]
    assert len(fixes) == 1 and fixes[0].time == dt.datetime(2010, 6, 3, 14, 52, 43, tzinfo=dt.timezone.utc)
    assert fixes[0].mode == FixMode.FIX_3D and fixes[0].dgps
    assert len(bad) == 2 and decoder.discarded_bytes >= 10


def test_overlong_line_is_dropped_and_stream_recovers() -> None:
    decoder = NmeaStreamDecoder()
    events = decoder.receive_data(b"$GPGGA," + b"1" * 5000)
    events += decoder.receive_data(b"\r\n" + BTQ818_GGA + BTQ818_RMC)
    assert any(isinstance(e, BadSentence) for e in events)
    assert [e for e in events + decoder.flush() if isinstance(e, Fix)]


def test_gst_gives_receiver_error_estimate() -> None:
    body = "GPGGA,172814.0,3723.46587704,N,12202.26957864,W,2,6,1.2,18.893,M,-25.669,M,2.0,0031"
    events = decode_nmea(f"${body}*{checksum(body):02X}\r\n".encode() + TRIMBLE_GST)
    (fix,) = [e for e in events if isinstance(e, Fix)]
    assert fix.error_source == "receiver"
    assert fix.epx_m == pytest.approx(1.96 * 0.020) and fix.epy_m == pytest.approx(1.96 * 0.023)
    assert fix.eph_m == pytest.approx(2.4477 * ((0.023**2 + 0.020**2) / 2) ** 0.5)
    assert fix.time is None  # no RMC/ZDA: the date is unknown, so no time is made up


def test_void_rmc_does_not_give_a_date() -> None:
    # A receiver without fix reports its RTC's date; it must not become a time stamp.
    body = "GPGGA,053232.438,3114.8789,N,12135.2442,E,1,06,1.2,153.8,M,8.3,M,,0000"
    events = decode_nmea(SIRF_VOID_RMC + f"${body}*{checksum(body):02X}\r\n".encode())
    fixes = [e for e in events if isinstance(e, Fix)]
    assert [f.mode for f in fixes] == [FixMode.NO_FIX, FixMode.FIX_3D]
    assert all(f.time is None for f in fixes)


def _fixes(name: str) -> list[Fix]:
    events = decode_nmea(shared_file("gps", f"{name}.log").read_bytes())
    assert not [e for e in events if isinstance(e, BadSentence)]
    return [e for e in events if isinstance(e, Fix)]


@pytest.mark.parametrize("name", LOGS)
def test_fixes_equal_gpsd_reports(name: str) -> None:
    """time, latitude, longitude and mode of every fix equal gpsd's TPV for that time."""
    reports = tpv_reports(shared_file("gps", f"{name}.log.chk"))
    by_time = final_by_time(reports)
    fixes = [f for f in _fixes(name) if f.mode >= FixMode.FIX_2D]
    mine = {f.time: f for f in fixes}
    assert by_time, "the reference has timed fixes"
    for when, ref in by_time.items():
        fix = mine.get(when)
        assert fix is not None, f"gpsd reported a fix at {when} that we did not"
        assert fix.mode == ref.mode, when
        assert fix.latitude == pytest.approx(ref.lat, abs=1e-9), when
        assert fix.longitude == pytest.approx(ref.lon, abs=1e-9), when
    # Fixes gpsd did not time: only where gpsd had not learnt the date yet (it reported the same
    # position without a time), or the log's last, unterminated cycle.
    untimed = {(round(r.lat, 9), round(r.lon, 9)) for r in reports if r.time is None and r.mode >= 2}
    extra = [f for f in fixes if f.time not in by_time]
    for f in extra:
        assert f is fixes[-1] or (round(f.latitude, 9), round(f.longitude, 9)) in untimed, f


def test_error_estimates_match_gpsd() -> None:
    """eph/epv (HDOP, VDOP x UERE, or SiRF's own EPE) and epx/epy from the satellite geometry."""
    btq = _fixes("bt-q818")[0]  # DGPS: the smaller UERE applies
    assert (btq.eph_m, btq.epv_m) == (pytest.approx(4.133, abs=5e-4), pytest.approx(7.533, abs=5e-4))
    assert (btq.epx_m, btq.epy_m) == (pytest.approx(2.158, abs=5e-4), pytest.approx(2.473, abs=5e-4))
    sirf = [f for f in _fixes("beidou-gb") if f.has_position]
    assert [f.eph_m for f in sirf] == [5.77, 25.61] and sirf[0].error_source == "receiver"
    # gpsd computed these once, on the first skyview with a fix (GPS + BeiDou 201).
    assert (sirf[0].epx_m, sirf[0].epy_m) == (pytest.approx(16.817, abs=5e-4), pytest.approx(14.633, abs=5e-4))
    quectel = [f for f in _fixes("quectel-l76k-nmea") if f.mode == FixMode.FIX_3D]
    assert {round(f.eph_m, 3) for f in quectel} == {17.1}  # HDOP 0.9 x 19 m
    assert {round(f.epv_m, 3) for f in quectel} == {27.6}
    assert {f.satellites_used for f in quectel} <= {14, 15}
    assert set(quectel[0].systems) == {"BeiDou", "GLONASS", "GPS"}


@given(st.binary(max_size=120))
@settings(deadline=None, max_examples=400)
def test_fuzz_sentence_decodes_or_raises_typed_error(data: bytes) -> None:
    try:
        parse_sentence(b"$" + data)
    except ProtocolError:
        pass


_FIELD = st.text(alphabet="0123456789.,-+NSEWAVDMT", max_size=12)


@given(
    kind=st.sampled_from(["GPGGA", "GNRMC", "GNGSA", "GPGSV", "GPGST", "GNGNS", "GNZDA", "GBGSV", "GPGLL", "PSRFEPE"]),
    fields=st.lists(_FIELD, max_size=22),
)
@settings(deadline=None, max_examples=600)
def test_fuzz_checksummed_fields_decode_or_raise_typed_error(kind: str, fields: list[str]) -> None:
    """Past the checksum: random field contents must still only ever raise ProtocolError."""
    body = ",".join([kind, *fields])
    try:
        parse_sentence(f"${body}*{checksum(body):02X}")
    except ProtocolError:
        pass


@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([BTQ818_GGA, BTQ818_GSA, BTQ818_RMC, SIRF_GBGSV, SIRF_GNS, QUECTEL_GLGSV, TRIMBLE_GST]),
        ),
        max_size=30,
    )
)
@settings(deadline=None, max_examples=300)
def test_fuzz_stream_never_raises(chunks: list[bytes]) -> None:
    decoder = NmeaStreamDecoder()
    for chunk in chunks:
        for event in decoder.receive_data(chunk):
            assert isinstance(event, (Fix, BadSentence))
    decoder.flush()
