"""GNSS sources: gpsd over loopback (its JSON protocol), or an NMEA receiver on a serial port.

gpsd is the convention on a Pi (it owns the receiver, serves several clients, handles baud
detection and binary protocols). We speak its JSON protocol directly over a socket - ~80 lines,
no client library to ship: `?WATCH={"enable":true,"json":true}` and then TPV/SKY reports, one
JSON object per line. TPV becomes a `devices.gps.Fix` (SKY adds satellites and DOPs).

Without gpsd (or with an LTE modem's NMEA port), `NmeaSerialSource` reads the port with
pyserial and decodes with our own `devices.gps.NmeaStreamDecoder`. (The serial-devices
workstream's port layer can replace the pyserial part once it exists.)

Every source yields fixes until a deadline (monotonic seconds), so a command can wait "up to N
seconds for a fix" and a service can loop with short deadlines and still stop promptly.
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from devices.gps import Fix, FixMode, NmeaStreamDecoder
from devices.gps.stream import rollover_corrected
from firmware_bridge.errors import GnssBusyError, GnssError

log = logging.getLogger(__name__)

WATCH = b'?WATCH={"enable":true,"json":true};\n'
MAX_REPORT_BYTES = 64 * 1024  # a SKY with 100+ satellites is ~10 KB


class FixSource(Protocol):
    def fixes(self, deadline: float) -> Iterator[Fix]: ...
    def close(self) -> None: ...


def _utc(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _num(report: dict, key: str) -> float | None:
    value = report.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def tpv_to_fix(tpv: dict, sky: dict | None = None) -> Fix:
    """gpsd's TPV (+ the latest SKY) as our Fix."""
    sky = sky or {}
    try:
        mode = FixMode(int(tpv.get("mode", 0)))
    except ValueError:
        mode = FixMode.UNKNOWN
    lat, lon = _num(tpv, "lat"), _num(tpv, "lon")
    has_pos = mode >= FixMode.FIX_2D and lat is not None and lon is not None
    used = sky.get("uSat")
    if used is None and isinstance(sky.get("satellites"), list):
        used = sum(1 for s in sky["satellites"] if isinstance(s, dict) and s.get("used"))
    visible = sky.get("nSat")
    if visible is None and isinstance(sky.get("satellites"), list):
        visible = len(sky["satellites"])
    eph = _num(tpv, "eph")
    return Fix(
        mode=mode,
        time=_utc(tpv.get("time")),
        latitude=lat if has_pos else None,
        longitude=lon if has_pos else None,
        altitude_m=(_num(tpv, "altMSL") if _num(tpv, "altMSL") is not None else _num(tpv, "alt"))
        if mode == FixMode.FIX_3D
        else None,
        dgps=tpv.get("status") == 2,
        satellites_used=used,
        satellites_visible=visible,
        hdop=_num(sky, "hdop"),
        vdop=_num(sky, "vdop"),
        pdop=_num(sky, "pdop"),
        xdop=_num(sky, "xdop"),
        ydop=_num(sky, "ydop"),
        eph_m=eph,
        epv_m=_num(tpv, "epv"),
        epx_m=_num(tpv, "epx"),
        epy_m=_num(tpv, "epy"),
        error_source="gpsd" if eph is not None else None,
        speed_mps=_num(tpv, "speed"),
        track_deg=_num(tpv, "track"),
    )


class GpsdSource:
    """A gpsd client (JSON protocol) on loopback."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2947, *, connect_timeout_s: float = 3.0) -> None:
        self.host, self.port = host, port
        try:
            self._sock = socket.create_connection((host, port), timeout=connect_timeout_s)
        except OSError as exc:
            raise GnssError(f"gpsd at {host}:{port} is not reachable: {exc}") from None
        self._buffer = b""
        self._sky: dict | None = None
        self.version: dict | None = None
        self._sock.sendall(WATCH)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> GpsdSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reports(self, deadline: float) -> Iterator[dict]:
        """gpsd's JSON reports until the deadline (monotonic) or until gpsd closes."""
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                try:
                    report = json.loads(line)
                except ValueError:
                    log.debug("gpsd sent a line that is not JSON: %r", line[:80])
                    continue
                if isinstance(report, dict):
                    yield report
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return
            except OSError as exc:
                raise GnssError(f"gpsd connection lost: {exc}") from None
            if not chunk:
                return
            self._buffer += chunk
            if len(self._buffer) > MAX_REPORT_BYTES and b"\n" not in self._buffer:
                raise GnssError("gpsd sent an over-long report")

    def fixes(self, deadline: float) -> Iterator[Fix]:
        for report in self.reports(deadline):
            cls = report.get("class")
            if cls == "VERSION":
                self.version = report
            elif cls == "SKY":
                self._sky = {**(self._sky or {}), **report}
            elif cls == "TPV":
                yield tpv_to_fix(report, self._sky)


class NmeaSerialSource:
    """An NMEA receiver read directly with pyserial, exclusively: two readers of one serial port
    split its bytes between them (garbled sentences, lost fixes for both). GnssBusyError when
    another process (the acquire service) holds it."""

    def __init__(self, port: str, baud: int = 9600, *, serial_factory: Callable[..., Any] | None = None) -> None:
        if serial_factory is None:
            import serial  # only when a serial receiver is configured

            serial_factory = functools.partial(serial.Serial, exclusive=True)  # flock(LOCK_EX | LOCK_NB)
            errors: tuple[type[BaseException], ...] = (serial.SerialException, OSError)
        else:
            errors = (OSError,)
        self._errors = errors
        try:
            self._port = serial_factory(port, baud, timeout=0.2)
        except errors as exc:
            if getattr(exc, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise GnssBusyError(f"NMEA receiver {port} is in use by another process") from None
            raise GnssError(f"cannot open NMEA receiver {port}: {exc}") from None
        self._decoder = NmeaStreamDecoder()
        self._rollover_said = False

    def close(self) -> None:
        try:
            self._port.close()
        except self._errors:
            pass

    def fixes(self, deadline: float) -> Iterator[Fix]:
        while time.monotonic() < deadline:
            try:
                data = self._port.read(4096)
            except self._errors as exc:
                raise GnssError(f"NMEA receiver lost: {exc}") from None
            for event in self._decoder.receive_data(data):
                if isinstance(event, Fix):
                    fix = rollover_corrected(event)  # live: a date before our build is a rollover
                    if fix.time_corrected and not self._rollover_said:
                        self._rollover_said = True  # once: the receiver says it every second
                        log.warning(
                            "NMEA receiver dates are 1024 weeks early (GPS week rollover, %s): corrected to %s",
                            event.time,
                            fix.time,
                        )
                    yield fix
                else:
                    log.debug("dropped NMEA sentence: %s", event.reason)


def open_source(
    source: str, *, gpsd_host: str = "127.0.0.1", gpsd_port: int = 2947, nmea_port: str = "", nmea_baud: int = 9600
) -> FixSource | None:
    """The configured source ("gpsd", "nmea" or "none")."""
    if source == "none":
        return None
    if source == "gpsd":
        return GpsdSource(gpsd_host, gpsd_port)
    if source == "nmea":
        if not nmea_port:
            raise GnssError("gps.source is nmea but gps.nmea_port is empty")
        return NmeaSerialSource(nmea_port, nmea_baud)
    raise GnssError(f"unknown GNSS source {source!r}")


def best_fix(
    source: FixSource,
    wait_s: float,
    *,
    good_enough_eph_m: float = 10.0,
    on_fix: Callable[[Fix], bool | None] | None = None,
) -> Fix | None:
    """The most accurate fix seen within `wait_s` seconds (early out once one is good enough).
    `on_fix` sees every fix; one it answers False for (e.g. stale) is not a candidate."""
    best: Fix | None = None
    deadline = time.monotonic() + wait_s
    for fix in source.fixes(deadline):
        if on_fix is not None and on_fix(fix) is False:
            continue
        if not fix.has_position:
            continue
        if (
            best is None
            or (fix.eph_m or float("inf")) < (best.eph_m or float("inf"))
            or (fix.eph_m == best.eph_m and fix.mode > best.mode)
        ):
            best = fix
        if best.eph_m is not None and best.eph_m <= good_enough_eph_m:
            break
    return best
