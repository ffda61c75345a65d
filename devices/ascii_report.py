"""ASCII-report devices: monitors that print their results as text lines on a serial port.

A declarative profile (TOML, see firmware_bridge/profiles/example-vitals-monitor.toml) says how
reports are framed (line ends, start/end lines), which lines carry which quantity in which unit,
and where the device's time and record number are. `load_profile(text)` checks everything up
front and raises `ProfileError` with the reason; `ReportParser` then turns a byte stream into
observations, sans-I/O (bytes and `now` in, events out).

Nothing is guessed: a report missing a required field, with a number that does not parse or a
unit the profile does not know is rejected whole (and says why) rather than stored half right.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from devices.errors import DeviceError, ProtocolError
from devices.identity import DeviceIdentity, TimeSource, plausible_device_time
from devices.observation import Observation, Quantity

LINE_ENDS = ("any", "crlf", "lf", "cr")
ENCODINGS = ("ascii", "latin-1", "utf-8")


class ProfileError(DeviceError, ValueError):
    """An ASCII-report profile cannot be used; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class UnitRule:
    unit: str  # UCUM
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True, slots=True)
class FieldRule:
    code: str
    kind: str
    pattern: re.Pattern[str]
    unit: str  # UCUM unit of `value` after scale/offset
    sent_unit: str  # what the device prints (when the line has no `unit` group)
    scale: float = 1.0
    offset: float = 0.0
    units: tuple[tuple[str, UnitRule], ...] = ()  # printed unit -> conversion (for a `unit` group)
    no_value: tuple[str, ...] = ()  # printed texts meaning "no value" ("---", "--.-")
    required: bool = False
    decimal_comma: bool = False


@dataclass(frozen=True, slots=True)
class ReportProfile:
    name: str
    description: str
    encoding: str
    manufacturer: str
    model: str
    baudrate: int
    line_end: str
    start: re.Pattern[str] | None
    end: re.Pattern[str] | None
    max_lines: int
    max_line_length: int
    time_pattern: re.Pattern[str] | None
    time_format: str
    utc_offset_minutes: int
    record_pattern: re.Pattern[str] | None
    fields: tuple[FieldRule, ...]

    def identity(self, address: str = "", serial: str = "") -> DeviceIdentity:
        return DeviceIdentity(manufacturer=self.manufacturer, model=self.model, serial=serial, address=address)


# -- loading ---------------------------------------------------------------------------------

_KEYS = {
    "profile": {"name", "description", "encoding", "manufacturer", "model", "baudrate", "kind"},
    "framing": {"line_end", "start", "end", "max_lines", "max_line_length"},
    "time": {"pattern", "format", "utc_offset_minutes"},
    "record": {"pattern"},
    "field": {
        "code",
        "kind",
        "pattern",
        "unit",
        "sent_unit",
        "scale",
        "offset",
        "units",
        "no_value",
        "required",
        "decimal_comma",
    },
}


def _get(
    table: dict[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    where: str,
    default: object = None,
    required: bool = False,
) -> object:
    if key not in table:
        if required:
            raise ProfileError(f"{where}.{key} is required")
        return default
    value = table[key]
    if isinstance(value, bool) and kind is not bool and (kind is int or kind is float or kind == (int, float)):
        raise ProfileError(f"{where}.{key} must be a number, not {value!r}")
    if not isinstance(value, kind):
        raise ProfileError(f"{where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _regex(text: object, where: str, need_group: str | None = None) -> re.Pattern[str]:
    if not isinstance(text, str) or not text:
        raise ProfileError(f"{where} must be a non-empty regular expression")
    try:
        pattern = re.compile(text)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ProfileError(f"{where} is not a valid regular expression: {exc}") from None
    if need_group and need_group not in pattern.groupindex:
        raise ProfileError(f"{where} needs a named group (?P<{need_group}>...)")
    return pattern


def _number(table: dict[str, Any], key: str, where: str, default: float) -> float:
    value = _get(table, key, (int, float), where, default)
    assert isinstance(value, (int, float))
    if not math.isfinite(value):
        raise ProfileError(f"{where}.{key} must be finite")
    return float(value)


def _check_keys(table: object, section: str, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ProfileError(f"{where} must be a table")
    unknown = set(table) - _KEYS[section]
    if unknown:
        raise ProfileError(
            f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
            f"(known: {', '.join(sorted(_KEYS[section]))})"
        )
    return table


def _field(table: object, index: int, default_kind: str) -> FieldRule:
    where = f"field[{index}]"
    t = _check_keys(table, "field", where)
    code = _get(t, "code", str, where, required=True)
    unit = _get(t, "unit", str, where, required=True)
    assert isinstance(code, str) and isinstance(unit, str)
    if not code.strip() or not unit.strip():
        raise ProfileError(f"{where}: code and unit must not be empty")
    pattern = _regex(t.get("pattern"), f"{where}.pattern", "value")
    units_table = _get(t, "units", dict, where, {})
    assert isinstance(units_table, dict)
    units = []
    for printed, rule in units_table.items():
        uwhere = f"{where}.units.{printed}"
        if not isinstance(rule, dict) or set(rule) - {"unit", "scale", "offset"}:
            raise ProfileError(f"{uwhere} must be a table with unit, scale, offset")
        target = _get(rule, "unit", str, uwhere, required=True)
        assert isinstance(target, str)
        if not target.strip():
            raise ProfileError(f"{uwhere}.unit must not be empty")
        units.append(
            (printed, UnitRule(target, _number(rule, "scale", uwhere, 1.0), _number(rule, "offset", uwhere, 0.0)))
        )
    if units and "unit" not in pattern.groupindex:
        raise ProfileError(f"{where}: 'units' needs a named group (?P<unit>...) in the pattern")
    no_value = _get(t, "no_value", list, where, [])
    assert isinstance(no_value, list)
    if not all(isinstance(v, str) for v in no_value):
        raise ProfileError(f"{where}.no_value must be a list of strings")
    kind = _get(t, "kind", str, where, default_kind)
    sent_unit = _get(t, "sent_unit", str, where, unit)
    assert isinstance(kind, str) and isinstance(sent_unit, str)
    return FieldRule(
        code=code,
        kind=kind or default_kind,
        pattern=pattern,
        unit=unit,
        sent_unit=sent_unit,
        scale=_number(t, "scale", where, 1.0),
        offset=_number(t, "offset", where, 0.0),
        units=tuple(units),
        no_value=tuple(no_value),
        required=bool(_get(t, "required", bool, where, False)),
        decimal_comma=bool(_get(t, "decimal_comma", bool, where, False)),
    )


def profile_from_dict(data: dict[str, Any]) -> ReportProfile:
    """Build a profile from parsed TOML; ProfileError says what is wrong."""
    if not isinstance(data, dict):
        raise ProfileError("a profile is a TOML document")
    unknown = set(data) - set(_KEYS)
    if unknown:
        raise ProfileError(
            f"unknown section(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(_KEYS))})"
        )
    p = _check_keys(data.get("profile", {}), "profile", "profile")
    name = _get(p, "name", str, "profile", required=True)
    assert isinstance(name, str)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ProfileError("profile.name: letters, digits, '.', '_' and '-' only (at most 64)")
    encoding = _get(p, "encoding", str, "profile", "ascii")
    if encoding not in ENCODINGS:
        raise ProfileError(f"profile.encoding must be one of {', '.join(ENCODINGS)}")
    baudrate = _get(p, "baudrate", int, "profile", 9600)
    assert isinstance(baudrate, int)
    if not 50 <= baudrate <= 4_000_000:
        raise ProfileError("profile.baudrate out of range")
    default_kind = _get(p, "kind", str, "profile", "vital-signs")
    assert isinstance(default_kind, str)

    f = _check_keys(data.get("framing", {}), "framing", "framing")
    line_end = _get(f, "line_end", str, "framing", "any")
    if line_end not in LINE_ENDS:
        raise ProfileError(f"framing.line_end must be one of {', '.join(LINE_ENDS)}")
    start = _regex(f["start"], "framing.start") if "start" in f else None
    end = _regex(f["end"], "framing.end") if "end" in f else None
    if end is not None and start is None:
        raise ProfileError("framing.end needs framing.start")
    max_lines = _get(f, "max_lines", int, "framing", 60)
    max_len = _get(f, "max_line_length", int, "framing", 256)
    assert isinstance(max_lines, int) and isinstance(max_len, int)
    if not 1 <= max_lines <= 1000 or not 8 <= max_len <= 4096:
        raise ProfileError("framing.max_lines must be 1..1000 and max_line_length 8..4096")

    t = _check_keys(data.get("time", {}), "time", "time")
    time_pattern = _regex(t["pattern"], "time.pattern") if "pattern" in t else None
    time_format = _get(t, "format", str, "time", "")
    offset = _get(t, "utc_offset_minutes", int, "time", 0)
    assert isinstance(time_format, str) and isinstance(offset, int)
    if time_pattern is not None:
        if not time_format:
            raise ProfileError("time.format is required with time.pattern (strptime format)")
        if not {"date", "time"} & set(time_pattern.groupindex):
            raise ProfileError("time.pattern needs a named group (?P<date>...) and/or (?P<time>...)")
    if not -24 * 60 < offset < 24 * 60:
        raise ProfileError("time.utc_offset_minutes must be within a day")

    r = _check_keys(data.get("record", {}), "record", "record")
    record_pattern = _regex(r["pattern"], "record.pattern", "id") if "pattern" in r else None

    raw_fields = data.get("field", [])
    if not isinstance(raw_fields, list) or not raw_fields:
        raise ProfileError("a profile needs at least one [[field]]")
    fields = tuple(_field(x, i, default_kind) for i, x in enumerate(raw_fields))
    codes = [(x.kind, x.code) for x in fields]
    if len(set(codes)) != len(codes):
        raise ProfileError("two fields give the same quantity code in the same kind")

    desc = _get(p, "description", str, "profile", "")
    manufacturer = _get(p, "manufacturer", str, "profile", "")
    model = _get(p, "model", str, "profile", "")
    assert isinstance(desc, str) and isinstance(manufacturer, str) and isinstance(model, str)
    return ReportProfile(
        name=name,
        description=desc,
        encoding=encoding,
        manufacturer=manufacturer,
        model=model,
        baudrate=baudrate,
        line_end=line_end,
        start=start,
        end=end,
        max_lines=max_lines,
        max_line_length=max_len,
        time_pattern=time_pattern,
        time_format=time_format,
        utc_offset_minutes=offset,
        record_pattern=record_pattern,
        fields=fields,
    )


def load_profile(text: str) -> ReportProfile:
    """Parse and check a TOML profile; ProfileError for anything wrong."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ProfileError(f"not valid TOML: {exc}") from None
    return profile_from_dict(data)


# -- parsing reports ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportParsed:
    observations: tuple[Observation, ...]
    lines: int
    # it began with the profile's start line: a report the device printed for a measurement, not
    # one line of a start-less monitor's steady stream ("SPO2 -- %" every second while idle)
    framed: bool = False


@dataclass(frozen=True, slots=True)
class ReportRejected:
    reason: str
    lines: int


ReportEvent = ReportParsed | ReportRejected


def _device_time(
    profile: ReportProfile, match: re.Match[str], received_at: dt.datetime
) -> tuple[dt.datetime, TimeSource]:
    parts = [match.group(g) for g in ("date", "time") if g in match.re.groupindex and match.group(g)]
    try:
        naive = dt.datetime.strptime(" ".join(p.strip() for p in parts), profile.time_format)
    except ValueError:
        raise ProtocolError("the report's date/time does not match time.format") from None
    when = naive.replace(tzinfo=dt.timezone(dt.timedelta(minutes=profile.utc_offset_minutes)))
    when = when.astimezone(dt.timezone.utc)
    if plausible_device_time(when, received_at):
        return when, TimeSource.DEVICE_CLOCK
    return received_at, TimeSource.GATEWAY_RECEIPT


def _quantity(rule: FieldRule, match: re.Match[str]) -> Quantity:
    text = match.group("value").strip()
    printed_unit = (
        match.group("unit").strip() if "unit" in match.re.groupindex and match.group("unit") else rule.sent_unit
    )
    unit, scale, offset = rule.unit, rule.scale, rule.offset
    if "unit" in match.re.groupindex and rule.units:
        found = dict(rule.units).get(printed_unit)
        if found is None:
            raise ProtocolError(f"{rule.code}: unit {printed_unit!r} is not in the profile")
        unit, scale, offset = found.unit, found.scale, found.offset
    if text in rule.no_value:
        return Quantity(rule.code, None, unit, None, printed_unit, special="nres")
    number_text = text.replace(",", ".") if rule.decimal_comma else text
    try:
        sent = float(number_text)
    except ValueError:
        raise ProtocolError(f"{rule.code}: {text[:20]!r} is not a number") from None
    if not math.isfinite(sent):
        raise ProtocolError(f"{rule.code}: {text[:20]!r} is not a finite number")
    value = sent * scale + offset
    return Quantity(rule.code, round(value, 6), unit, sent, printed_unit)


def parse_report(
    profile: ReportProfile, lines: list[str], *, received_at: dt.datetime, device: DeviceIdentity
) -> tuple[Observation, ...]:
    """The observations of one complete report; ProtocolError if it cannot be read whole."""
    found: dict[int, Quantity] = {}
    when, source = received_at, TimeSource.GATEWAY_RECEIPT
    have_time = False
    record_id = ""
    for line in lines:
        if profile.time_pattern is not None and not have_time:
            m = profile.time_pattern.search(line)
            if m:
                when, source = _device_time(profile, m, received_at)
                have_time = True
        if profile.record_pattern is not None and not record_id:
            m = profile.record_pattern.search(line)
            if m:
                record_id = m.group("id").strip()
        for i, rule in enumerate(profile.fields):
            if i in found:
                continue
            m = rule.pattern.search(line)
            if m:
                found[i] = _quantity(rule, m)
    missing = [r.code for i, r in enumerate(profile.fields) if r.required and i not in found]
    if missing:
        raise ProtocolError(f"report without required field(s): {', '.join(missing)}")
    if not found:
        raise ProtocolError("report without any known field")
    who = device.serial or device.address
    if record_id:
        ident = f"record:{record_id}"
    else:
        # The report's own text identifies a reprint - but only if it carries a time; without
        # one, two patients' equal readings must not collapse into one, so receipt time counts.
        basis = "\n".join(lines) if have_time else "\n".join(lines) + "\n" + received_at.isoformat()
        ident = "sha256:" + hashlib.sha256(basis.encode("utf-8", "replace")).hexdigest()[:32]
    by_kind: dict[str, list[Quantity]] = {}
    for i in sorted(found):
        by_kind.setdefault(profile.fields[i].kind, []).append(found[i])
    # A kind the report prints only as "no value" in fields none of which is required ("SPO2 -- %":
    # no probe on) was not measured: no reading. Stored, it went to the county as an Observation
    # with no value and, with no patient checked in, waited as an item of its own for the doctor
    # to assign. A required field's "no value" (the cuff's "---/---": it tried and failed) stays.
    required_kinds = {profile.fields[i].kind for i in found if profile.fields[i].required}
    measured = {k: qs for k, qs in by_kind.items() if k in required_kinds or any(q.value is not None for q in qs)}
    return tuple(
        Observation(
            kind=kind,
            quantities=tuple(qs),
            measured_at=when,
            time_source=source,
            received_at=received_at,
            device=device,
            record_key=f"ascii:{profile.name}:{who}:{ident}:{kind}",
        )
        for kind, qs in measured.items()
    )


class ReportParser:
    """A byte stream from an ASCII-report device -> ReportParsed / ReportRejected events."""

    def __init__(self, profile: ReportProfile, device: DeviceIdentity) -> None:
        self.profile = profile
        self.device = device
        self._buf = bytearray()
        self._skip_lf = False  # a CR ended the last line; a following LF belongs to it
        self._discarding = False  # inside an over-long line
        self._report: list[str] | None = None
        # Receipt time of the report's last line, and of the bytes still in `_buf`: a report
        # finished later (by silence, by the next report's start) was received when its text
        # arrived, not when we noticed it was over - by then the next patient may be current.
        self._report_at: dt.datetime | None = None
        self._buf_at: dt.datetime | None = None

    @property
    def idle(self) -> bool:
        """No report in progress and no partial line: everything received so far is settled."""
        return self._report is None and not self._buf and not self._discarding

    def feed(self, data: bytes, now: dt.datetime) -> list[ReportEvent]:
        events: list[ReportEvent] = []
        for line in self._lines(bytes(data)):
            events.extend(self._line(line, now))
        if self._buf:
            self._buf_at = now
        return events

    def flush(self, now: dt.datetime) -> list[ReportEvent]:
        """The device went quiet: finish what can be finished (a report needing an end line
        that never came is rejected, never half-stored)."""
        events: list[ReportEvent] = []
        if self._discarding:  # an over-long line cut by silence is refused like one that ended
            events.extend(self._line(None, now))
        elif self._buf:
            events.extend(self._line(self._decode(bytes(self._buf)), self._buf_at or now))
        self._buf.clear()
        self._buf_at = None
        self._discarding = False
        if self._report is not None:
            if self.profile.end is not None:
                events.append(ReportRejected("report ended without its end line", len(self._report)))
                self._report = None
            else:
                events.extend(self._complete())
        return events

    # -- lines -------------------------------------------------------------------------------

    def _decode(self, raw: bytes) -> str:
        return raw.decode(self.profile.encoding, errors="replace")

    def _lines(self, data: bytes) -> list[str | None]:
        """Complete lines in `data` (None for a line over the length limit)."""
        out: list[str | None] = []
        mode = self.profile.line_end
        i = 0
        n = len(data)
        if self._skip_lf and n and data[0:1] == b"\n":
            i = 1
        self._skip_lf = False
        while i < n:
            if mode in ("lf", "crlf"):  # a CR before the LF is stripped with the line end
                j = data.find(b"\n", i)
            elif mode == "cr":
                j = data.find(b"\r", i)
            else:
                lf, cr = data.find(b"\n", i), data.find(b"\r", i)
                j = min(x for x in (lf, cr) if x >= 0) if (lf >= 0 or cr >= 0) else -1
            if j < 0:
                self._take(data[i:])
                break
            self._take(data[i:j])
            out.append(None if self._discarding else self._decode(bytes(self._buf)))
            self._buf.clear()
            self._discarding = False
            step = 1
            if mode == "any" and data[j : j + 1] == b"\r":
                if j + 1 < n and data[j + 1 : j + 2] == b"\n":
                    step = 2
                elif j + 1 == n:
                    self._skip_lf = True
            i = j + step
        return out

    def _take(self, chunk: bytes) -> None:
        if self._discarding:
            return
        if len(self._buf) + len(chunk) > self.profile.max_line_length:
            self._discarding = True
            self._buf.clear()
            return
        self._buf.extend(chunk)

    def _line(self, line: str | None, now: dt.datetime) -> list[ReportEvent]:
        p = self.profile
        if line is None:  # over-long: whatever report it was part of cannot be trusted
            lines = len(self._report) if self._report is not None else 0
            self._report = None
            return [ReportRejected("line longer than framing.max_line_length", lines)]
        text = line.rstrip("\r\n")
        if p.start is None:  # every line stands alone
            if not text.strip():
                return []
            if not any(f.pattern.search(text) for f in p.fields):
                return []  # chatter between results
            self._report, self._report_at = [text], now
            return self._complete()
        events: list[ReportEvent] = []
        if p.start.search(text):
            if self._report is not None:
                if p.end is not None:
                    events.append(ReportRejected("new report began before the end line", len(self._report)))
                    self._report = None
                else:
                    events.extend(self._complete())
            self._report, self._report_at = [text], now
            return events
        if self._report is None:
            return []  # outside a report: banners, prompts, noise
        if p.end is not None and p.end.search(text):
            self._report.append(text)
            self._report_at = now
            return self._complete()
        if p.end is None and not text.strip():
            return self._complete()
        self._report.append(text)
        self._report_at = now
        if len(self._report) > p.max_lines:
            n = len(self._report)
            self._report = None
            return [ReportRejected(f"report longer than {p.max_lines} lines", n)]
        return []

    def _complete(self) -> list[ReportEvent]:
        """Parse the report in hand, received when its last line arrived."""
        lines = self._report or []
        received_at = self._report_at
        self._report, self._report_at = None, None
        assert received_at is not None  # set with every line a report gets
        try:
            observations = parse_report(self.profile, lines, received_at=received_at, device=self.device)
        except ProtocolError as exc:
            return [ReportRejected(str(exc), len(lines))]
        return [ReportParsed(observations, len(lines), framed=self.profile.start is not None)]
