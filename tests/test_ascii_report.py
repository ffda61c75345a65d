"""ASCII-report profiles: loading and checking, parsing report streams, fuzzing."""

from __future__ import annotations

import datetime as dt
import re

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
from tests.service_harness import VITALS_REPORT

NOW = dt.datetime(2025, 3, 4, 9, 0, tzinfo=dt.timezone.utc)
EXAMPLE_TEXT = profile_files()["example-vitals-monitor"].read_text(encoding="utf-8")
DEVICE = DeviceIdentity(manufacturer="Example Medical", model="VM-100", address="/dev/serial/by-id/usb-x")


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
        ("systolic", 121.0, "mm[Hg]"),
        ("diastolic", 79.0, "mm[Hg]"),
        ("mean-arterial-pressure", 93.0, "mm[Hg]"),
        ("pulse-rate", 72.0, "/min"),
    ]
    assert bp.quantity("systolic").sent_unit == "mmHg"
    # Device local time UTC+1 -> 08:41:07Z, from the device clock.
    assert bp.measured_at == dt.datetime(2025, 3, 4, 8, 41, 7, tzinfo=dt.timezone.utc)
    assert bp.time_source is TimeSource.DEVICE_CLOCK
    assert by_kind["spo2"].quantity("spo2").value == 97.0
    temp = by_kind["body-temperature"].quantity("body-temperature")
    assert temp.value == pytest.approx(37.0, abs=1e-6) and temp.unit == "Cel"
    assert (temp.sent_value, temp.sent_unit) == (98.6, "F")
    assert bp.record_key == "ascii:example-vitals-monitor:/dev/serial/by-id/usb-x:record:0172:blood-pressure"
    assert parser.idle


def test_a_value_the_monitor_did_not_measure_is_no_reading_but_a_failed_required_one_is(profile) -> None:
    """A monitor's "SPO2 -- %" (no probe on) was stored as an SpO2 reading with no value: "血氧 (nres) %" on
    Today and Sent, a FHIR Observation of nothing for the county and, with no patient checked in,
    an item of its own the doctor had to assign. A kind the report has only as not measured, in
    fields the profile does not require, is no reading now; the cuff's "---/---" (required: it
    tried and failed) is still stored, as no value - never 0."""
    not_measured = VITALS_REPORT.replace(b"SPO2   97 %", b"SPO2   -- %").replace(b"TEMP   98.6 F", b"TEMP   --.- C")
    (parsed,) = ReportParser(profile, DEVICE).feed(not_measured, NOW)
    assert isinstance(parsed, ReportParsed)
    assert [o.kind for o in parsed.observations] == ["blood-pressure"]
    failed = not_measured.replace(b"NIBP   121/79 (93) mmHg", b"NIBP   ---/--- mmHg")
    (parsed,) = ReportParser(profile, DEVICE).feed(failed, NOW)
    assert isinstance(parsed, ReportParsed)
    (bp,) = parsed.observations
    assert [(q.code, q.value, q.special) for q in bp.quantities] == [
        ("systolic", None, "nres"),
        ("diastolic", None, "nres"),
        ("pulse-rate", 72.0, None),
    ]


def test_split_chunks_give_the_same_result(profile) -> None:
    whole = ReportParser(profile, DEVICE).feed(VITALS_REPORT, NOW)
    for size in (1, 2, 3, 7, 50):
        parser = ReportParser(profile, DEVICE)
        events = []
        for i in range(0, len(VITALS_REPORT), size):
            events += parser.feed(VITALS_REPORT[i : i + size], NOW)
        assert events == whole


def test_incomplete_and_bad_reports_are_rejected_whole(profile) -> None:
    parser = ReportParser(profile, DEVICE)
    cut = VITALS_REPORT[: VITALS_REPORT.index(b"PULSE")]
    assert parser.feed(cut, NOW) == [] and not parser.idle
    # The monitor was switched off mid-report; the next report starts.
    events = parser.feed(VITALS_REPORT[VITALS_REPORT.index(b"=====") :], NOW)
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


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[profile]\nname='x'\n", "at least one [[field]]"),
        ("[profile]\nname='x'\n[[field]]\ncode='a'\nunit='b'\npattern='no group'\n", "(?P<value>"),
        ("[profile]\nname='x'\n[[field]]\ncode='a'\nunit='b'\npattern='(?P<value>'\n", "not a valid regular"),
        ("[profile]\nname='x'\ncolour='red'\n[[field]]\ncode='a'\nunit='b'\npattern='(?P<value>1)'\n", "colour"),
        ("[profile]\nname='../etc'\n[[field]]\ncode='a'\nunit='b'\npattern='(?P<value>1)'\n", "profile.name"),
        (
            "[profile]\nname='x'\n[time]\npattern='(?P<date>.+)'\n[[field]]\ncode='a'\nunit='b'\n"
            "pattern='(?P<value>1)'\n",
            "time.format",
        ),
        ("[profile]\nname='x'\nbaudrate=true\n[[field]]\ncode='a'\nunit='b'\npattern='(?P<value>1)'\n", "baudrate"),
        ("[profile\n", "not valid TOML"),
    ],
)
def test_bad_profiles_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(text)
    assert needle in str(err.value)


# -- fuzzing: load or raise ProfileError; parse streams without raising -------------------------

_toml_scalars = st.one_of(st.text(max_size=20), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.booleans())
_toml_values = st.recursive(
    _toml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(["name", "code", "unit", "pattern", "kind", "units", "C", "scale", "start", "end"]),
            children,
            max_size=4,
        ),
    ),
    max_leaves=12,
)
_sections = st.fixed_dictionaries(
    {},
    optional={
        "profile": st.dictionaries(
            st.sampled_from(sorted(["name", "encoding", "baudrate", "kind", "model", "x"])), _toml_values, max_size=4
        ),
        "framing": st.dictionaries(
            st.sampled_from(["line_end", "start", "end", "max_lines", "max_line_length"]), _toml_values, max_size=4
        ),
        "time": st.dictionaries(st.sampled_from(["pattern", "format", "utc_offset_minutes"]), _toml_values, max_size=3),
        "record": st.dictionaries(st.sampled_from(["pattern"]), _toml_values, max_size=1),
        "field": st.one_of(
            _toml_values,
            st.lists(
                st.dictionaries(
                    st.sampled_from(
                        ["code", "unit", "pattern", "kind", "units", "no_value", "scale", "required", "decimal_comma"]
                    ),
                    _toml_values,
                    max_size=6,
                ),
                max_size=3,
            ),
        ),
    },
)


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
        text = text[:c] + insert + text[c + len(insert) :]
    try:
        load_profile(text)
    except ProfileError:
        pass


@settings(deadline=None, max_examples=300)
@given(
    st.lists(st.one_of(st.binary(max_size=80), st.sampled_from(VITALS_REPORT.splitlines(keepends=True))), max_size=25)
)
def test_fuzz_report_stream_never_raises(profile, chunks: list[bytes]) -> None:
    parser = ReportParser(profile, DEVICE)
    for chunk in chunks:
        for ev in parser.feed(chunk, NOW):
            assert isinstance(ev, (ReportParsed, ReportRejected))
    for ev in parser.flush(NOW):
        assert isinstance(ev, (ReportParsed, ReportRejected))
    assert parser.idle


# -- every rule of a profile, and of the report stream, stated ----------------------------------
# What a missed check costs: a monitor's 36,9 read as 369, a 9600 baud port opened at 1, a report
# cut short stored as if whole, a reading stamped with a clock from before the clinic existed.

_FIELD = "[[field]]\ncode='t'\nunit='Cel'\npattern='T=(?P<value>\\S+)'\n"


def _profile(*sections: str, field: str = _FIELD) -> str:
    return "[profile]\nname='p'\n" + "".join(sections) + field


def _values(profile_text: str, data: bytes, now: dt.datetime = NOW) -> list:
    """(value, unit, sent_value, sent_unit) of each parsed report, or the reason it was rejected."""
    parser = ReportParser(load_profile(profile_text), DEVICE)
    out = []
    for event in parser.feed(data, now) + parser.flush(now):
        if isinstance(event, ReportRejected):
            out.append(event.reason)
        else:
            q = event.observations[0].quantities[0]
            out.append((q.value, q.unit, q.sent_value, q.sent_unit))
    return out


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[profile]\nname='p'\nbaudrate=true\n" + _FIELD, "profile.baudrate must be a number"),
        (_profile("[framing]\nmax_lines=true\n"), "framing.max_lines must be a number"),
        (_profile(field=_FIELD + "scale=true\n"), "field[0].scale must be a number"),
        (
            _profile(field="[[field]]\ncode=true\nunit='Cel'\npattern='(?P<value>1)'\n"),
            "field[0].code has the wrong type",
        ),
        (_profile(field="[[field]]\ncode='t'\nunit='Cel'\npattern=5\n"), "must be a non-empty regular expression"),
        (_profile(field="[[field]]\ncode='t'\nunit='Cel'\npattern=''\n"), "must be a non-empty regular expression"),
        (_profile(field=_FIELD + "scale=nan\n"), "field[0].scale must be finite"),
        (_profile(field=_FIELD + "offset=inf\n"), "field[0].offset must be finite"),
        ("profile=5\n" + _FIELD, "profile must be a table"),
        (_profile(field="[[field]]\nunit='Cel'\npattern='(?P<value>1)'\n"), "field[0].code is required"),
        (_profile(field="[[field]]\ncode='t'\npattern='(?P<value>1)'\n"), "field[0].unit is required"),
        (
            _profile(field="[[field]]\ncode=' '\nunit='Cel'\npattern='(?P<value>1)'\n"),
            "code and unit must not be empty",
        ),
        (_profile(field="[[field]]\ncode='t'\nunit=''\npattern='(?P<value>1)'\n"), "code and unit must not be empty"),
        (_profile(field=_FIELD + "units={F=5}\n"), "units.F must be a table with unit, scale, offset"),
        (
            _profile(field=_FIELD + "units={F={unit='Cel',colour=1}}\n"),
            "units.F must be a table with unit, scale, offset",
        ),
        (_profile(field=_FIELD + "units={F={scale=2}}\n"), "units.F.unit is required"),
        (_profile(field=_FIELD + "units={F={unit=' '}}\n"), "units.F.unit must not be empty"),
        (_profile(field=_FIELD + "units={F={unit='Cel'}}\n"), "'units' needs a named group (?P<unit>"),
        (_profile(field=_FIELD + "no_value=[1]\n"), "no_value must be a list of strings"),
        ("[colour]\nx=1\n" + _profile(), "unknown section(s) colour"),
        (_profile().replace("name='p'\n", "name='p'\nencoding='ebcdic'\n"), "profile.encoding must be one of"),
        (_profile().replace("name='p'\n", "name='p'\nbaudrate=49\n"), "profile.baudrate out of range"),
        (_profile().replace("name='p'\n", "name='p'\nbaudrate=4000001\n"), "profile.baudrate out of range"),
        (_profile("[framing]\nline_end='crcr'\n"), "framing.line_end must be one of"),
        (_profile("[framing]\nend='^END$'\n"), "framing.end needs framing.start"),
        (_profile("[framing]\nmax_lines=0\n"), "framing.max_lines must be 1..1000"),
        (_profile("[framing]\nmax_lines=1001\n"), "framing.max_lines must be 1..1000"),
        (_profile("[framing]\nmax_line_length=7\n"), "max_line_length 8..4096"),
        (_profile("[framing]\nmax_line_length=4097\n"), "max_line_length 8..4096"),
        (_profile("[time]\npattern='(?P<x>.)'\nformat='%Y'\n"), "time.pattern needs a named group"),
        (_profile("[time]\nutc_offset_minutes=1440\n"), "utc_offset_minutes must be within a day"),
        (_profile("[time]\nutc_offset_minutes=-1440\n"), "utc_offset_minutes must be within a day"),
        (_profile(field=_FIELD + _FIELD), "two fields give the same quantity code"),
    ],
)
def test_every_profile_rule_is_enforced_with_its_reason(text: str, needle: str) -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(text)
    assert needle in str(err.value)


def test_a_profile_that_is_not_a_document_is_refused() -> None:
    with pytest.raises(ProfileError, match="a profile is a TOML document"):
        profile_from_dict([])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "extra",
    [
        "[profile]\nname='p'\nbaudrate=50\n",
        "[profile]\nname='p'\nbaudrate=4000000\n",
        "[profile]\nname='p'\n[framing]\nmax_lines=1\nmax_line_length=8\n",
        "[profile]\nname='p'\n[framing]\nmax_lines=1000\nmax_line_length=4096\n",
        "[profile]\nname='p'\n[time]\nutc_offset_minutes=1439\n",
        "[profile]\nname='p'\n[time]\nutc_offset_minutes=-1439\n",
    ],
)
def test_the_limits_themselves_are_accepted(extra: str) -> None:
    assert load_profile(extra + _FIELD).name == "p"


def test_defaults_of_a_minimal_profile() -> None:
    p = load_profile(_profile())
    assert (p.baudrate, p.line_end, p.max_lines, p.max_line_length, p.utc_offset_minutes, p.encoding) == (
        9600,
        "any",
        60,
        256,
        0,
        "ascii",
    )
    (f,) = p.fields
    assert (f.scale, f.offset, f.required, f.decimal_comma, f.kind, f.sent_unit) == (
        1.0,
        0.0,
        False,
        False,
        "vital-signs",
        "Cel",
    )
    assert p.identity(address="/dev/ttyUSB0", serial="S1") == DeviceIdentity(
        manufacturer="", model="", serial="S1", address="/dev/ttyUSB0"
    )
    from devices.ascii_report import FieldRule, UnitRule

    assert UnitRule("Cel") == UnitRule("Cel", 1.0, 0.0)
    rule = FieldRule("t", "k", f.pattern, "Cel", "C")
    assert (rule.scale, rule.offset, rule.units, rule.no_value, rule.required, rule.decimal_comma) == (
        1.0,
        0.0,
        (),
        (),
        False,
        False,
    )


def test_a_decimal_comma_is_refused_unless_the_profile_says_so() -> None:
    """Without decimal_comma, 36,9 is not a number (it could be 369 with a thousands comma)."""
    assert _values(_profile(), b"T=36,9\n") == ["t: '36,9' is not a number"]
    assert _values(_profile(field=_FIELD + "decimal_comma=true\n"), b"T=36,9\n") == [(36.9, "Cel", 36.9, "Cel")]


@pytest.mark.parametrize(
    "printed,reason",
    [("abc", "'abc' is not a number"), ("inf", "'inf' is not a finite"), ("nan", "'nan' is not a finite")],
)
def test_values_that_are_not_finite_numbers_are_rejected(printed: str, reason: str) -> None:
    (got,) = _values(_profile(), b"T=" + printed.encode() + b"\n")
    assert reason in got


def test_units_printed_by_the_device_pick_their_conversion() -> None:
    field = (
        "[[field]]\ncode='t'\nunit='Cel'\npattern='T=(?P<value>\\S+) (?P<unit>\\S+)'\n"
        "units={C={unit='Cel'}, F={unit='Cel', scale=0.5555555555555556, offset=-17.77777777777778}}\n"
    )
    text = _profile(field=field)
    assert _values(text, b"T=36.6 C\nT=98.6 F\n") == [(36.6, "Cel", 36.6, "C"), (37.0, "Cel", 98.6, "F")]
    assert _values(text, b"T=310.0 K\n") == ["t: unit 'K' is not in the profile"]
    # a unit group without a units table: the value stays in the profile's unit, the print is kept
    plain = "[[field]]\ncode='t'\nunit='Cel'\npattern='T=(?P<value>\\S+) (?P<unit>\\S+)'\n"
    assert _values(_profile(field=plain), b"T=36.6 C\n") == [(36.6, "Cel", 36.6, "C")]


def test_converted_values_are_rounded_to_six_decimals() -> None:
    assert _values(_profile(), b"T=1.2345678\n") == [(1.234568, "Cel", 1.2345678, "Cel")]


def test_a_field_not_marked_required_may_be_missing() -> None:
    fields = _FIELD + "[[field]]\ncode='p'\nunit='/min'\npattern='P=(?P<value>\\d+)'\n"
    framed = "[framing]\nstart='^BEGIN$'\nend='^END$'\n"
    assert _values(_profile(framed, field=fields), b"BEGIN\nT=36.6\nEND\n") == [(36.6, "Cel", 36.6, "Cel")]
    required = fields + "required=true\n"
    assert _values(_profile(framed, field=required), b"BEGIN\nT=36.6\nEND\n") == ["report without required field(s): p"]
    assert _values(_profile(framed, field=fields), b"BEGIN\nnothing\nEND\n") == ["report without any known field"]


def _timed(time_section: str, line: bytes, now: dt.datetime = NOW) -> tuple[dt.datetime, TimeSource]:
    parser = ReportParser(load_profile(_profile(time_section)), DEVICE)
    (event,) = parser.feed(line + b" T=36.6\n", now)
    assert isinstance(event, ReportParsed), event
    obs = event.observations[0]
    return obs.measured_at, obs.time_source


def test_the_device_time_is_used_only_when_plausible() -> None:
    date_only = "[time]\npattern='D=(?P<date>\\S+)'\nformat='%Y-%m-%d %H:%M'\n"
    both = "[time]\npattern='D=(?P<date>\\S+) (?P<time>\\S+)'\nformat='%Y-%m-%d %H:%M'\n"
    at = dt.datetime(2025, 3, 4, 8, 30, tzinfo=dt.timezone.utc)
    assert _timed(both, b"D=2025-03-04 08:30") == (at, TimeSource.DEVICE_CLOCK)
    # up to 10 minutes ahead of the gateway is a clock a little fast; beyond, it is not believed
    assert _timed(both, b"D=2025-03-04 09:11", now=NOW) == (NOW, TimeSource.GATEWAY_RECEIPT)
    assert _timed(both, b"D=2025-03-04 09:10", now=NOW) == (
        NOW + dt.timedelta(minutes=10),
        TimeSource.DEVICE_CLOCK,
    )  # exactly 10 minutes ahead
    assert _timed(both, b"D=2025-03-04 09:05") == (NOW + dt.timedelta(minutes=5), TimeSource.DEVICE_CLOCK)
    assert _timed(both, b"D=2025-03-04 09:11", now=NOW + dt.timedelta(seconds=30)) == (
        NOW + dt.timedelta(seconds=30),
        TimeSource.GATEWAY_RECEIPT,
    )  # 10.5 minutes ahead
    # a clock reset to before 2020 (an empty RTC battery): the receipt time, said so
    assert _timed(both, b"D=2019-12-31 23:59") == (NOW, TimeSource.GATEWAY_RECEIPT)
    assert _timed(both, b"D=2020-01-01 00:00")[1] is TimeSource.DEVICE_CLOCK
    date_format = date_only.replace("%Y-%m-%d %H:%M", "%Y-%m-%d")
    assert _timed(date_format, b"D=2025-03-04") == (
        dt.datetime(2025, 3, 4, tzinfo=dt.timezone.utc),
        TimeSource.DEVICE_CLOCK,
    )
    parser = ReportParser(load_profile(_profile(both)), DEVICE)
    (event,) = parser.feed(b"D=2025-13-45 08:30 T=36.6\n", NOW)
    assert isinstance(event, ReportRejected) and "does not match time.format" in event.reason


def test_the_first_time_in_a_report_counts() -> None:
    framed = (
        "[framing]\nstart='^BEGIN$'\nend='^END$'\n[time]\npattern='D=(?P<date>\\S+ \\S+)'\nformat='%Y-%m-%d %H:%M'\n"
    )
    parser = ReportParser(load_profile(_profile(framed)), DEVICE)
    (event,) = parser.feed(b"BEGIN\nD=2025-03-04 08:30\nD=2025-03-04 08:45\nT=36.6\nEND\n", NOW)
    assert event.observations[0].measured_at == dt.datetime(2025, 3, 4, 8, 30, tzinfo=dt.timezone.utc)


def test_a_report_without_record_number_is_keyed_by_its_content() -> None:
    (event,) = ReportParser(load_profile(_profile()), DEVICE).feed(b"T=36.6\n", NOW)
    key = event.observations[0].record_key
    assert re.fullmatch(r"ascii:p:/dev/serial/by-id/usb-x:sha256:[0-9a-f]{32}:vital-signs", key), key


def test_line_ends_of_each_mode() -> None:
    cr = _profile("[framing]\nline_end='cr'\n")
    assert _values(cr, b"T=36.6\nT=37.2\r") == [(36.6, "Cel", 36.6, "Cel")]  # LF is not a line end here
    any_end = _profile()
    assert _values(any_end, b"T=36.6\r\nT=37.2\rT=37.4\n") == [
        (36.6, "Cel", 36.6, "Cel"),
        (37.2, "Cel", 37.2, "Cel"),
        (37.4, "Cel", 37.4, "Cel"),
    ]
    lf = _profile("[framing]\nline_end='lf'\n")
    assert _values(lf, b"T=36.6\rT=37.2\n") == [(36.6, "Cel", 36.6, "Cel")]  # one line: CR is not an end


@pytest.mark.parametrize("second", [b"\n", b"\r", b"\r\n"])
def test_a_line_end_arriving_alone_still_ends_the_line(second: bytes) -> None:
    parser = ReportParser(load_profile(_profile()), DEVICE)
    assert parser.feed(b"T=36.6", NOW) == []
    (event,) = parser.feed(second, NOW)
    assert isinstance(event, ReportParsed)
    assert parser.feed(b"\nT=37.2\n", NOW)[0].observations[0].quantities[0].value == 37.2


def test_cr_lf_split_between_reads_is_one_line_end() -> None:
    """A CR at the end of one read and the LF at the start of the next are one line end: in a
    framed report without an end line an extra empty line would end the report early."""
    framed = _profile(
        "[framing]\nstart='^BEGIN$'\n", field=_FIELD + "[[field]]\ncode='p'\nunit='/min'\npattern='P=(?P<value>\\d+)'\n"
    )
    parser = ReportParser(load_profile(framed), DEVICE)
    assert parser.feed(b"BEGIN\r\nT=36.6\r", NOW) == []
    assert parser.feed(b"\nP=72\r\n", NOW) == []
    (event,) = parser.feed(b"\r\n", NOW)  # the blank line ends the report: both values in it
    assert [q.code for q in event.observations[0].quantities] == ["t", "p"]
    lf = ReportParser(load_profile(framed), DEVICE)
    assert lf.feed(b"BEGIN\nT=36.6\n", NOW) == []
    (event,) = lf.feed(b"\n", NOW)  # after an LF, a new LF is a blank line
    assert isinstance(event, ReportParsed)


def test_a_partial_last_line_is_read_on_flush() -> None:
    parser = ReportParser(load_profile(_profile()), DEVICE)
    assert parser.feed(b"T=36.6", NOW) == []
    (event,) = parser.flush(NOW)
    assert isinstance(event, ReportParsed) and parser.idle


def test_line_and_report_length_limits_are_exact() -> None:
    limited = _profile("[framing]\nstart='^B$'\nmax_lines=3\nmax_line_length=8\n")
    # 8 characters is the limit itself: kept; 9 is refused
    assert _values(limited, b"B\nT=36.666\n\n") == [(36.666, "Cel", 36.666, "Cel")]
    assert _values(limited, b"B\nT=36.6666\n\n") == ["line longer than framing.max_line_length"]
    # 3 lines (start included) is the limit; a fourth rejects the report
    assert _values(limited, b"B\nx\nT=36.6\n\n") == [(36.6, "Cel", 36.6, "Cel")]
    assert _values(limited, b"B\nx\ny\nT=36.6\n\n") == ["report longer than 3 lines"]
    parser = ReportParser(load_profile(limited), DEVICE)
    (rejected,) = parser.feed(b"B\nx\n" + b"y" * 20 + b"\n", NOW)
    assert isinstance(rejected, ReportRejected) and rejected.lines == 2  # the lines of the report it spoiled
    (alone,) = ReportParser(load_profile(limited), DEVICE).feed(b"y" * 20 + b"\n", NOW)
    assert isinstance(alone, ReportRejected) and alone.lines == 0


def test_blank_lines_end_a_report_only_without_an_end_line() -> None:
    with_end = _profile("[framing]\nstart='^B$'\nend='^E$'\n")
    assert _values(with_end, b"B\nT=36.6\n\nE\n") == [(36.6, "Cel", 36.6, "Cel")]
    without_end = _profile("[framing]\nstart='^B$'\n")
    parser = ReportParser(load_profile(without_end), DEVICE)
    (event,) = parser.feed(b"B\nT=36.6\n\n", NOW)
    assert isinstance(event, ReportParsed) and parser.idle


def test_an_over_long_line_cut_off_by_silence_spoils_its_report_like_one_that_ended() -> None:
    """Bug found by mutation (issue 20): flush() dropped an over-long last line silently, so a
    report without an end line was stored without it (a value on a line we could not read went
    missing from a report that looked whole) and a lone over-long line vanished unrecorded."""
    framed = _profile("[framing]\nstart='^B$'\nmax_line_length=8\n")
    ended = ReportParser(load_profile(framed), DEVICE).feed(b"B\nT=36.6\n" + b"y" * 20 + b"\n", NOW)
    cut = ReportParser(load_profile(framed), DEVICE)
    assert cut.feed(b"B\nT=36.6\n" + b"y" * 20, NOW) == []
    assert cut.flush(NOW) == ended == [ReportRejected("line longer than framing.max_line_length", 2)]
    assert cut.idle
    lone = ReportParser(load_profile(_profile("[framing]\nmax_line_length=8\n")), DEVICE)
    assert lone.feed(b"T=36.6666", NOW) == []
    assert lone.flush(NOW) == [ReportRejected("line longer than framing.max_line_length", 0)]
    assert lone.flush(NOW) == [] and lone.idle


def test_a_fresh_parser_frames_its_first_bytes_like_any_later_ones() -> None:
    """No CR ended a line before the first read: in CR mode a leading LF is line content from the
    very first byte, so a first line over the length limit is refused as it would be later on (a
    fresh connection does not get a laxer limit: no bad line accepted)."""
    cr = load_profile(_profile("[framing]\nline_end='cr'\nmax_line_length=8\n"))
    first = ReportParser(cr, DEVICE).feed(b"\nT=36.666\r", NOW)
    later = ReportParser(cr, DEVICE)
    assert later.feed(b"\r", NOW) == []
    assert first == later.feed(b"\nT=36.666\r", NOW) == [ReportRejected("line longer than framing.max_line_length", 0)]
