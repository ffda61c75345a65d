"""From a byte stream to fixes: sentence reassembly (sans-I/O) and cycle merging.

`NmeaStreamDecoder.receive_data(bytes)` takes whatever the serial port or file gave (split
anywhere, with noise, binary junk or comment lines between sentences) and returns the events it
completed: a `Fix` per receiver cycle, and a `BadSentence` for each sentence it had to drop
(checksum, syntax, over-long line). It never raises on bad input: one bad sentence must not cost
the stream. `flush()` ends the last cycle (end of a file).

A cycle is the set of sentences a receiver sends for one epoch: they share a UTC time stamp
(GGA/RMC/GNS/GLL/ZDA/GST) or carry none (GSA/GSV). A new time stamp closes the cycle; once we have
seen which time-stamped sentence ends a cycle (RMC for most receivers, ZDA for the Quectel L76K)
we close the cycle on that sentence already, as gpsd does, so a fix is not one epoch late.

Dates only come from a *valid* RMC or from ZDA: a receiver without fix reports whatever its
RTC says (often 1980 or 2006), and this time may be used to set a clock. A fix without a known
date has `time=None`, never a guessed date.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace

from devices.gps.dop import dops_from_geometry
from devices.gps.fix import H_UERE, P_UERE, SIGMA_TO_95_1D, SIGMA_TO_95_2D, V_UERE, Fix, FixMode
from devices.gps.nmea import (
    GGA,
    GLL,
    GNS,
    GSA,
    GST,
    GSV,
    MAX_SENTENCE_LENGTH,
    RMC,
    SYSTEM_IDS,
    TALKERS,
    ZDA,
    NmeaError,
    SatelliteInView,
    Sentence,
    SirfEPE,
    UnknownSentence,
    parse_sentence,
)
from devices.identity import EARLIEST_PLAUSIBLE

KNOTS_TO_MPS = 0.514444
GPS_WEEK_ROLLOVER = dt.timedelta(weeks=1024)  # a 10-bit GPS week number wraps after this


def rollover_corrected(fix: Fix) -> Fix:
    """A live receiver counting GPS weeks in 10 bits reports dates 1024 weeks (19.6 years) early
    once its epoch passed: as gpsd does, the date of a fix (a position: not an RTC's guess) before
    this software was built gains 1024 weeks until it is not, and the fix says so. Not for logs:
    a log from before the build is decoded with its own dates."""
    time = fix.time
    if time is None or time >= EARLIEST_PLAUSIBLE or not fix.has_position:
        return fix
    while time < EARLIEST_PLAUSIBLE:
        time += GPS_WEEK_ROLLOVER
    return replace(fix, time=time, time_corrected="gps-week-rollover")


# Sentences a receiver times whenever it knows the time. Before its first fix (a cold start) it
# sends them with an empty time field, once per cycle: the same one again begins the next cycle.
UNTIMED_KINDS = frozenset({"RMC", "GGA", "GNS"})


@dataclass(frozen=True, slots=True)
class BadSentence:
    """A sentence that was dropped, and why (shown to technicians, counted)."""

    line: bytes  # at most the first 100 bytes
    reason: str


Event = Fix | BadSentence


def satellite_key(system: str, prn: int) -> tuple[str, int]:
    """(GNSS, number) for a PRN, across the numbering schemes receivers use."""
    if system in ("GNSS", "GPS"):
        if 33 <= prn <= 64:
            return ("SBAS", prn)
        if 65 <= prn <= 96:
            return ("GLONASS", prn - 64)
        if 193 <= prn <= 200:
            return ("QZSS", prn - 192)
        if system == "GNSS":
            if 201 <= prn <= 263:
                return ("BeiDou", prn - 200)
            if 301 <= prn <= 336:
                return ("Galileo", prn - 300)
            if 401 <= prn <= 463:
                return ("BeiDou", prn - 400)
        return ("GPS", prn)
    if system == "GLONASS":
        return ("GLONASS", prn - 64 if prn > 64 else prn)
    if system == "BeiDou":
        return ("BeiDou", prn - 400 if prn > 400 else prn - 200 if prn > 200 else prn)
    if system == "Galileo":
        return ("Galileo", prn - 300 if prn > 300 else prn)
    if system == "QZSS":
        return ("QZSS", prn - 192 if prn > 192 else prn)
    return (system, prn)


@dataclass
class _Cycle:
    time: dt.time | None = None
    rmc: RMC | None = None
    gga: GGA | None = None
    gns: GNS | None = None
    gll: GLL | None = None
    gst: GST | None = None
    epe: SirfEPE | None = None
    gsa: list[GSA] = field(default_factory=list)
    systems: set[str] = field(default_factory=set)
    last_kind: str = ""
    last_timed: bool = False
    untimed: set[str] = field(default_factory=set)  # of UNTIMED_KINDS, seen here without a time

    @property
    def has_fix_data(self) -> bool:
        return any((self.rmc, self.gga, self.gns, self.gll, self.gsa))


class FixAssembler:
    """Merges parsed sentences into one `Fix` per cycle."""

    def __init__(self) -> None:
        self._cycle = _Cycle()
        self._date: dt.date | None = None
        self._date_tod: dt.time | None = None
        self._ender: str | None = None
        self._last_finished: dt.time | None = None
        self._sky: dict[tuple[str, str | None], dict[tuple[str, int], SatelliteInView]] = {}
        self._gsv_parts: dict[tuple[str, str | None], list[GSV]] = {}

    def add(self, sentence: Sentence) -> list[Fix]:
        out: list[Fix] = []
        if isinstance(sentence, GSV):
            self._add_gsv(sentence)
            self._cycle.last_kind, self._cycle.last_timed = "GSV", False
            return out
        if isinstance(sentence, UnknownSentence):
            self._cycle.last_kind, self._cycle.last_timed = sentence.kind, False
            return out
        kind = type(sentence).__name__
        when = getattr(sentence, "time", None)
        cycle = self._cycle
        if when is not None and cycle.time is not None and when != cycle.time:
            if cycle.last_timed:
                self._ender = cycle.last_kind
            out += self._finish()
            cycle = self._cycle
        elif (when is None and kind in cycle.untimed) or (when is not None and cycle.time is None and cycle.untimed):
            # A cycle without time ends when its sentence comes again or the receiver's first timed
            # sentence comes: else a cold start is one endless cycle, and the first fix gets its DOPs.
            out += self._finish()
            cycle = self._cycle
        if when is None and kind in UNTIMED_KINDS:
            cycle.untimed.add(kind)
        if when is not None and cycle.time is None:
            if when == self._last_finished:
                self._ender = None  # we closed that cycle too early: stop guessing its end
            cycle.time = when
        self._apply(cycle, sentence)
        cycle.last_kind, cycle.last_timed = kind, when is not None
        if self._ender == kind and when is not None:
            out += self._finish()
        return out

    def flush(self) -> list[Fix]:
        return self._finish()

    # --- internals --------------------------------------------------------------------------

    def _apply(self, cycle: _Cycle, s: Sentence) -> None:
        talker = getattr(s, "talker", "")
        if talker in TALKERS and talker != "GN":
            cycle.systems.add(TALKERS[talker])
        if isinstance(s, RMC):
            cycle.rmc = s
            if s.valid and s.date is not None and s.time is not None:
                self._date, self._date_tod = s.date, s.time
        elif isinstance(s, GGA):
            cycle.gga = s
        elif isinstance(s, GNS):
            cycle.gns = s
        elif isinstance(s, GLL):
            cycle.gll = s
        elif isinstance(s, GSA):
            cycle.gsa.append(s)
            if s.system_id in SYSTEM_IDS:
                cycle.systems.add(SYSTEM_IDS[s.system_id])
        elif isinstance(s, GST):
            cycle.gst = s
        elif isinstance(s, SirfEPE):
            cycle.epe = s
        elif isinstance(s, ZDA) and s.date is not None and s.time is not None and s.date.year >= 1999:
            self._date, self._date_tod = s.date, s.time

    def _add_gsv(self, s: GSV) -> None:
        key = (s.talker, s.signal_id)
        if s.message_number == 1:
            self._gsv_parts[key] = []
        parts = self._gsv_parts.get(key)
        if parts is None or len(parts) != s.message_number - 1:
            self._gsv_parts.pop(key, None)  # a part went missing: wait for the next set
            return
        parts.append(s)
        if s.message_number == s.message_count:
            system = TALKERS.get(s.talker, s.talker)
            self._sky[key] = {satellite_key(system, sat.prn): sat for part in parts for sat in part.satellites}
            del self._gsv_parts[key]

    def _utc(self, when: dt.time | None) -> dt.datetime | None:
        if when is None or self._date is None or self._date_tod is None:
            return None
        date = self._date

        # A date learnt late on one day, applied to a time after midnight: next day.
        def seconds(t: dt.time) -> int:
            return t.hour * 3600 + t.minute * 60 + t.second

        if seconds(self._date_tod) - seconds(when) > 12 * 3600:
            date += dt.timedelta(days=1)
        elif seconds(when) - seconds(self._date_tod) > 12 * 3600:
            date -= dt.timedelta(days=1)
        return dt.datetime.combine(date, when, tzinfo=dt.timezone.utc)

    def _finish(self) -> list[Fix]:
        cycle, self._cycle = self._cycle, _Cycle()
        if not cycle.has_fix_data:
            return []
        self._last_finished = cycle.time
        return [self._fix(cycle)]

    def _fix(self, c: _Cycle) -> Fix:
        gga, gns, rmc, gll = c.gga, c.gns, c.rmc, c.gll
        position = None
        altitude = None
        if gga is not None and gga.quality > 0 and gga.position is not None:
            position, altitude = gga.position, gga.altitude_m
        elif gns is not None and gns.position is not None and gns.mode.strip("N"):
            position, altitude = gns.position, gns.altitude_m
        elif rmc is not None and rmc.valid and rmc.position is not None:
            position = rmc.position
        elif gll is not None and gll.valid and gll.position is not None:
            position = gll.position
        gsa_mode = max((g.mode for g in c.gsa), default=0)
        if position is None:
            mode = FixMode.NO_FIX
        elif gsa_mode in (2, 3):
            mode = FixMode(gsa_mode)
        else:
            mode = FixMode.FIX_3D if altitude is not None else FixMode.FIX_2D
        quality = gga.quality if gga is not None else None
        dgps = (quality in (2, 4, 5)) or (rmc is not None and rmc.mode == "D")
        used_sets = [{satellite_key(self._gsa_system(g, prn), prn) for prn in g.prns} for g in c.gsa]
        used = set().union(*used_sets) if used_sets else set()
        sats_used = next(
            (n for n in (gga.satellites_used if gga else None, gns.satellites_used if gns else None) if n is not None),
            len(used) if used else None,
        )
        hdop = next((g.hdop for g in c.gsa if g.hdop is not None), None)
        if hdop is None:
            hdop = next((x.hdop for x in (gga, gns) if x is not None and x.hdop is not None), None)
        vdop = next((g.vdop for g in c.gsa if g.vdop is not None), None)
        pdop = next((g.pdop for g in c.gsa if g.pdop is not None), None)
        sky = {k: v for view in self._sky.values() for k, v in view.items()}
        geometry = [
            (sky[k].elevation_deg, sky[k].azimuth_deg)
            for k in sorted(used)
            if k in sky and sky[k].elevation_deg is not None and sky[k].azimuth_deg is not None
        ]
        dops = dops_from_geometry(geometry)  # type: ignore[arg-type]
        xdop, ydop = (dops.xdop, dops.ydop) if dops else (None, None)
        eph = epv = epx = epy = None
        source = None
        if mode >= FixMode.FIX_2D:
            if c.epe is not None and c.epe.valid and c.epe.ehpe_m is not None:
                eph, epv, source = c.epe.ehpe_m, c.epe.evpe_m, "receiver"
            elif c.gst is not None and c.gst.latitude_sigma_m is not None and c.gst.longitude_sigma_m is not None:
                lat_s, lon_s = c.gst.latitude_sigma_m, c.gst.longitude_sigma_m
                eph = SIGMA_TO_95_2D * ((lat_s**2 + lon_s**2) / 2) ** 0.5
                epx, epy = SIGMA_TO_95_1D * lon_s, SIGMA_TO_95_1D * lat_s
                if c.gst.altitude_sigma_m is not None:
                    epv = SIGMA_TO_95_1D * c.gst.altitude_sigma_m
                source = "receiver"
            if eph is None and hdop is not None:
                eph, source = hdop * P_UERE[dgps], "dop"
            if epv is None and vdop is not None and mode == FixMode.FIX_3D:
                epv = vdop * V_UERE[dgps]
            if epx is None and xdop is not None and ydop is not None:
                epx, epy = xdop * H_UERE[dgps], ydop * H_UERE[dgps]
        speed = (
            rmc.speed_knots * KNOTS_TO_MPS
            if rmc is not None and rmc.speed_knots is not None and position is not None
            else None
        )
        track = rmc.track_deg if rmc is not None and position is not None else None
        return Fix(
            mode=mode,
            time=self._utc(c.time),
            latitude=position.latitude if position else None,
            longitude=position.longitude if position else None,
            altitude_m=altitude if mode == FixMode.FIX_3D else None,
            quality=quality,
            dgps=dgps and position is not None,
            satellites_used=sats_used,
            satellites_visible=len(sky) or None,
            hdop=hdop,
            vdop=vdop,
            pdop=pdop,
            xdop=xdop,
            ydop=ydop,
            eph_m=eph,
            epv_m=epv,
            epx_m=epx,
            epy_m=epy,
            error_source=source,
            speed_mps=speed,
            track_deg=track,
            systems=tuple(sorted(c.systems)),
        )

    @staticmethod
    def _gsa_system(g: GSA, prn: int) -> str:
        if g.system_id in SYSTEM_IDS:
            return SYSTEM_IDS[g.system_id]
        return TALKERS.get(g.talker, "GNSS")


class NmeaStreamDecoder:
    """Sans-I/O: bytes in, fixes and dropped-sentence reports out."""

    def __init__(self, max_line: int = MAX_SENTENCE_LENGTH) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._assembler = FixAssembler()
        self.sentences = 0
        self.bad_sentences = 0
        self.discarded_bytes = 0

    def receive_data(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        self._buffer += data
        while True:
            cut = min((i for i in (self._buffer.find(b"\n"), self._buffer.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            line = bytes(self._buffer[:cut])
            del self._buffer[: cut + 1]
            events += self._line(line)
        if len(self._buffer) > self._max_line:
            start = self._buffer.find(b"$")
            if start < 0:
                self.discarded_bytes += len(self._buffer)
                self._buffer.clear()
            else:
                # Keep only the newest '$...' fragment; an over-long one is dropped whole.
                last = self._buffer.rfind(b"$")
                events += self._garbage(bytes(self._buffer[:last]))
                del self._buffer[:last]
                if len(self._buffer) > self._max_line:
                    events.append(
                        self._bad(bytes(self._buffer), f"line longer than {self._max_line} bytes without an end")
                    )
                    self._buffer.clear()
        return events

    def flush(self) -> list[Event]:
        """End of input: the partial line is dropped, the open cycle becomes a fix."""
        events: list[Event] = []
        if self._buffer:
            events += self._line(bytes(self._buffer))
            self._buffer.clear()
        events += self._assembler.flush()
        return events

    def _garbage(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        start = chunk.find(b"$")
        self.discarded_bytes += len(chunk) if start < 0 else start
        if start >= 0:
            for piece in chunk[start:].split(b"$")[1:]:
                events.append(self._bad(b"$" + piece, "sentence cut short by the next '$'"))
        return events

    def _bad(self, line: bytes, reason: str) -> BadSentence:
        self.bad_sentences += 1
        return BadSentence(line[:100], reason)

    def _line(self, line: bytes) -> list[Event]:
        if not line:
            return []
        last = line.rfind(b"$")
        if last < 0:
            self.discarded_bytes += len(line)  # noise, comment lines of log files
            return []
        events = self._garbage(line[:last])
        sentence_bytes = line[last:]
        if len(sentence_bytes) > self._max_line:
            return events + [self._bad(sentence_bytes, f"longer than {self._max_line} bytes")]
        try:
            sentence = parse_sentence(sentence_bytes)
        except NmeaError as exc:
            return events + [self._bad(sentence_bytes, str(exc))]
        self.sentences += 1
        events += self._assembler.add(sentence)
        return events


def decode_nmea(data: bytes) -> list[Event]:
    """A whole capture (file) at once."""
    decoder = NmeaStreamDecoder()
    return decoder.receive_data(data) + decoder.flush()
