"""ASCII-report profiles: loading and checking, parsing report streams, fuzzing."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.ascii_report import (
    ProfileError,
    ReportParsed,
    ReportParser,
    ReportRejected,
    load_profile,
    profile_from_dict,
)
from devices.identity import DeviceIdentity, TimeSource
from firmware_bridge.profiles import profile_files

NOW = dt.datetime(2025, 3, 4, 9, 0, tzinfo=dt.timezone.utc)
EXAMPLE_TEXT = profile_files()["example-vitals-monitor"].read_text(encoding="utf-8")
DEVICE = DeviceIdentity(manufacturer="Example Medical", model="VM-100", address="/dev/serial/by-id/usb-x")

# A report as the example monitor prints it (CR LF line ends, a banner before it).
VITALS_REPORT = (b"VM-100 ready\r\n"
                 b"===== VITALS REPORT =====\r\n"
                 b"DEVICE VM-100  SN 004211\r\n"
                 b"DATE 2025-03-04  TIME 09:41:07\r\n"
                 b"RECORD 0172\r\n"
                 b"NIBP   121/79 (93) mmHg\r\n"
                 b"PULSE  72 bpm\r\n"
                 b"SPO2   -- %\r\n"
                 b"TEMP   98.6 F\r\n"
                 b"===== END =====\r\n")


@pytest.fixture(scope="module")
def profile():
    return load_profile(EXAMPLE_TEXT)


def test_example_profile_parses_a_report(profile) -> None:
    parser = ReportParser(profile, DEVICE)
    events = parser.feed(VITALS_REPORT, NOW + dt.timedelta(hours=1))
    assert len(events) == 1 and isinstance(events[0], ReportParsed)
    by_kind = {o.kind: o for o in events[0].observations}
    assert set(by_kind) == {"blood-pressure", "spo2", "body-temperature"}
    bp = by_kind["blood-pressure"]
    assert [(q.code, q.value, q.unit) for q in bp.quantities] == [
        ("systolic", 121.0, "mm[Hg]"), ("diastolic", 79.0, "mm[Hg]"),
        ("mean-arterial-pressure", 93.0, "mm[Hg]"), ("pulse-rate", 72.0, "/min")]
    assert bp.quantity("systolic").sent_unit == "mmHg"
    # Device local time UTC+1 -> 08:41:07Z, from the device clock.
    assert bp.measured_at == dt.datetime(2025, 3, 4, 8, 41, 7, tzinfo=dt.timezone.utc)
    assert bp.time_source is TimeSource.DEVICE_CLOCK
    spo2 = by_kind["spo2"].quantity("spo2")
    assert spo2.value is None and spo2.special == "nres"  # "--" is no value, never 0
    temp = by_kind["body-temperature"].quantity("body-temperature")
    assert temp.value == pytest.approx(37.0, abs=1e-6) and temp.unit == "Cel"
    assert (temp.sent_value, temp.sent_unit) == (98.6, "F")
    assert bp.record_key == "ascii:example-vitals-monitor:/dev/serial/by-id/usb-x:record:0172:blood-pressure"
    assert parser.idle


def test_split_chunks_give_the_same_result(profile) -> None:
    whole = ReportParser(profile, DEVICE).feed(VITALS_REPORT, NOW)
    for size in (1, 2, 3, 7, 50):
        parser = ReportParser(profile, DEVICE)
        events = []
        for i in range(0, len(VITALS_REPORT), size):
            events += parser.feed(VITALS_REPORT[i:i + size], NOW)
        assert events == whole


def test_incomplete_and_bad_reports_are_rejected_whole(profile) -> None:
    parser = ReportParser(profile, DEVICE)
    cut = VITALS_REPORT[: VITALS_REPORT.index(b"PULSE")]
    assert parser.feed(cut, NOW) == [] and not parser.idle
    # The monitor was switched off mid-report; the next report starts.
    events = parser.feed(VITALS_REPORT[VITALS_REPORT.index(b"====="):], NOW)
    assert isinstance(events[0], ReportRejected) and "before the end line" in events[0].reason
    assert isinstance(events[1], ReportParsed)
    # A report that never ends is not stored half.
    parser.feed(cut, NOW)
    flushed = parser.flush(NOW)
    assert len(flushed) == 1 and isinstance(flushed[0], ReportRejected)
    # A unit the profile does not know: rejected, never guessed.
    weird = VITALS_REPORT.replace(b"98.6 F", b"310.1 K")
    events = ReportParser(profile, DEVICE).feed(weird, NOW)
    assert isinstance(events[0], ReportParsed)  # K does not match the pattern: temperature absent
    assert "body-temperature" not in {o.kind for o in events[0].observations}
    no_bp = VITALS_REPORT.replace(b"NIBP   121/79 (93) mmHg\r\n", b"")
    events = ReportParser(profile, DEVICE).feed(no_bp, NOW)
    assert isinstance(events[0], ReportRejected) and "systolic" in events[0].reason


def test_garbage_and_over_long_lines(profile) -> None:
    parser = ReportParser(profile, DEVICE)
    noise = bytes(range(256)) * 3 + b"\r\n"
    events = parser.feed(noise + VITALS_REPORT, NOW)
    assert any(isinstance(e, ReportRejected) and "longer" in e.reason for e in events)
    assert isinstance(events[-1], ReportParsed)


def test_line_mode_profile_without_framing() -> None:
    profile = load_profile("""
[profile]
name = "thermo"
[framing]
line_end = "cr"
[[field]]
code = "body-temperature"
kind = "body-temperature"
pattern = 'T=(?P<value>\\d+,\\d)'
unit = "Cel"
decimal_comma = true
""")
    events = ReportParser(profile, DeviceIdentity(serial="T1")).feed(b"hello\rT=36,9\rT=37,2\r", NOW)
    values = [e.observations[0].quantities[0].value for e in events if isinstance(e, ReportParsed)]
    assert values == [36.9, 37.2]
    obs = events[0].observations[0]
    assert obs.time_source is TimeSource.GATEWAY_RECEIPT and obs.measured_at == NOW
    # Equal readings without a device time or record id still get distinct keys (receipt time).
    again = ReportParser(profile, DeviceIdentity(serial="T1")).feed(b"T=36,9\r", NOW + dt.timedelta(minutes=5))
    assert again[0].observations[0].record_key != obs.record_key


@pytest.mark.parametrize("text,needle", [
    ("[profile]\nname='x'\n", "at least one [[field]]"),
    ("[profile]\nname='x'\n[[field]]\ncode='a'\nunit='b'\npattern='no group'\n", "(?P<value>"),
    ("[profile]\nname='x'\n[[field]]\ncode='a'\nunit='b'\npattern='(?P<value>'\n", "not a valid regular"),
    ("[profile]\nname='x'\ncolour='red'\n[[field]]\ncode='a'\nunit='b'\npattern='(?P<value>1)'\n", "colour"),
    ("[profile]\nname='../etc'\n[[field]]\ncode='a'\nunit='b'\npattern='(?P<value>1)'\n", "profile.name"),
    ("[profile]\nname='x'\n[time]\npattern='(?P<date>.+)'\n[[field]]\ncode='a'\nunit='b'\n"
     "pattern='(?P<value>1)'\n", "time.format"),
    ("[profile]\nname='x'\nbaudrate=true\n[[field]]\ncode='a'\nunit='b'\npattern='(?P<value>1)'\n", "baudrate"),
    ("[profile\n", "not valid TOML"),
])
def test_bad_profiles_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(text)
    assert needle in str(err.value)


# -- fuzzing: load or raise ProfileError; parse streams without raising -------------------------

_toml_scalars = st.one_of(st.text(max_size=20), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                          st.booleans())
_toml_values = st.recursive(_toml_scalars, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.sampled_from(
        ["name", "code", "unit", "pattern", "kind", "units", "C", "scale", "start", "end"]), children, max_size=4)),
    max_leaves=12)
_sections = st.fixed_dictionaries({}, optional={
    "profile": st.dictionaries(st.sampled_from(sorted(["name", "encoding", "baudrate", "kind", "model", "x"])),
                               _toml_values, max_size=4),
    "framing": st.dictionaries(st.sampled_from(["line_end", "start", "end", "max_lines", "max_line_length"]),
                               _toml_values, max_size=4),
    "time": st.dictionaries(st.sampled_from(["pattern", "format", "utc_offset_minutes"]), _toml_values, max_size=3),
    "record": st.dictionaries(st.sampled_from(["pattern"]), _toml_values, max_size=1),
    "field": st.one_of(_toml_values, st.lists(st.dictionaries(st.sampled_from(
        ["code", "unit", "pattern", "kind", "units", "no_value", "scale", "required", "decimal_comma"]),
        _toml_values, max_size=6), max_size=3)),
})


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_sections)
def test_fuzz_profile_structure(data: dict) -> None:
    try:
        profile_from_dict(data)
    except ProfileError:
        pass


@settings(deadline=None, max_examples=300)
@given(st.text(max_size=400))
def test_fuzz_profile_text(text: str) -> None:
    try:
        load_profile(text)
    except ProfileError:
        pass


@settings(deadline=None, max_examples=200)
@given(st.lists(st.integers(0, len(EXAMPLE_TEXT)), min_size=1, max_size=4), st.text(max_size=8))
def test_fuzz_mutated_example_profile(cuts: list[int], insert: str) -> None:
    text = EXAMPLE_TEXT
    for c in sorted(cuts, reverse=True):
        text = text[:c] + insert + text[c + len(insert):]
    try:
        load_profile(text)
    except ProfileError:
        pass


@settings(deadline=None, max_examples=300)
@given(st.lists(st.one_of(st.binary(max_size=80), st.sampled_from(VITALS_REPORT.splitlines(keepends=True))),
                max_size=25))
def test_fuzz_report_stream_never_raises(profile, chunks: list[bytes]) -> None:
    parser = ReportParser(profile, DEVICE)
    for chunk in chunks:
        for ev in parser.feed(chunk, NOW):
            assert isinstance(ev, (ReportParsed, ReportRejected))
    for ev in parser.flush(NOW):
        assert isinstance(ev, (ReportParsed, ReportRejected))
    assert parser.idle
