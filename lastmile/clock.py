"""Time on a computer without a real-time clock.

A Pi boots in 1970 (or at the fake-hwclock's last saved time) until NTP or GPS sets the clock,
and the clock may jump at any moment when they do. So:

- every stamp carries its time *and* where that time came from (`TimeSource`), plus the
  monotonic clock reading and the boot it belongs to;
- nothing is ever stamped before 2020: with no plausible time known yet the stamp's time is
  None (provisional) and `repair()` fills it in later in the same boot, from the monotonic
  reading, once GPS (or a plausible system clock) gives an anchor - "GPS time repairs the times";
- stamps are monotonic + offset: the system clock jumping backwards does not make a later stamp
  earlier than an earlier one (a forward jump is followed: that is NTP correcting a stale clock);
- GPS time wins when the system time is implausible or disagrees with it by more than
  `disagreement_s` (the disagreement is kept, so a visit can be flagged);
- a GPS time well behind the one the boot already has is stale (`stale_gps`: a receiver's
  buffered output), never a new anchor nor a visit's position.

Clocks are injectable (`wall`, `monotonic`, `boot_id`) so tests can boot in 1970.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devices.identity import EARLIEST_PLAUSIBLE, TimeSource
from firmware_bridge.zone import system_zone

log = logging.getLogger(__name__)

LATEST_PLAUSIBLE = dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)
# A live fix reaches us within a cycle or two of its time; one this far behind the GPS time the boot
# already has is old output (a USB receiver keeps what it could not send while its port was closed).
STALE_GPS_S = 10.0
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def local_zone() -> dt.tzinfo:
    """This gateway's zone (with its DST rules when known): carts write local wall-clock times,
    and the clinic reads times in it. The BLE link reads device clocks in the same zone."""
    return system_zone()


def clinic_time(value: dt.datetime | None, *, minutes: bool = False) -> str:
    """How the CLI shows a time: in the clinic's zone with its UTC offset,
    "2026-12-01 14:03:05+08:00" ("-" when unknown); naive values are taken as UTC."""
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(local_zone()).isoformat(sep=" ", timespec="minutes" if minutes else "seconds")


def read_boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text(encoding="ascii").strip()
    except OSError:
        return "unknown-boot"


def plausible(value: dt.datetime | float | None) -> bool:
    if value is None:
        return False
    if isinstance(value, (int, float)):
        try:
            value = dt.datetime.fromtimestamp(value, dt.timezone.utc)
        except (OverflowError, OSError, ValueError):
            return False
    return EARLIEST_PLAUSIBLE <= value < LATEST_PLAUSIBLE


@dataclass(frozen=True)
class Stamp:
    time: dt.datetime | None  # None: provisional, no plausible time known yet
    source: TimeSource
    monotonic: float
    boot_id: str

    @property
    def provisional(self) -> bool:
        return self.time is None

    def to_json(self) -> dict:
        return {
            "time": self.time.isoformat() if self.time else None,
            "source": self.source.value,
            "monotonic": self.monotonic,
            "boot_id": self.boot_id,
        }

    @classmethod
    def from_json(cls, data: dict) -> Stamp:
        return cls(
            dt.datetime.fromisoformat(data["time"]) if data.get("time") else None,
            TimeSource(data["source"]),
            float(data["monotonic"]),
            str(data["boot_id"]),
        )


@dataclass(frozen=True)
class Anchor:
    """UTC epoch seconds = monotonic + offset, within one boot."""

    boot_id: str
    offset: float
    source: TimeSource


class GatewayClock:
    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        boot_id: Callable[[], str] = read_boot_id,
        *,
        jump_tolerance_s: float = 2.0,
        disagreement_s: float = 60.0,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self.boot_id = boot_id()
        self.jump_tolerance_s = jump_tolerance_s
        self.disagreement_s = disagreement_s
        self._system: float | None = None  # offset learnt from a plausible system clock
        self._gps: float | None = None  # offset learnt from GPS
        self.last_disagreement_s: float | None = None  # system minus GPS, when both were known
        self._said_disagreement_s: float | None = None  # the one last logged (not each fix, all day)

    # --- anchors ---------------------------------------------------------------------------------
    @property
    def anchor(self) -> Anchor | None:
        if self._gps is not None:
            return Anchor(self.boot_id, self._gps, TimeSource.GPS)
        if self._system is not None:
            return Anchor(self.boot_id, self._system, TimeSource.GATEWAY_RECEIPT)
        return None

    def restore(self, anchor: Anchor) -> None:
        """An anchor saved by an earlier process of the same boot (the CLI is many processes)."""
        if anchor.boot_id != self.boot_id:
            return
        if anchor.source == TimeSource.GPS and self._gps is None:
            self._gps = anchor.offset
        elif anchor.source != TimeSource.GPS and self._system is None:
            self._system = anchor.offset

    def observe_gps(self, gps_time: dt.datetime, at_monotonic: float | None = None) -> bool:
        """A fix's UTC time, received at `at_monotonic`. False (ignored) if implausible."""
        if not plausible(gps_time):
            log.warning("ignoring implausible GPS time %s", gps_time.isoformat())
            return False
        m = self._monotonic() if at_monotonic is None else at_monotonic
        self._gps = gps_time.timestamp() - m
        wall = self._wall()
        if plausible(wall):
            # What the system clock said at the fix, minus what GPS said.
            self.last_disagreement_s = disagreement = (wall - (self._monotonic() - m)) - gps_time.timestamp()
            said = self._said_disagreement_s
            if abs(disagreement) <= self.disagreement_s:
                self._said_disagreement_s = None  # agreeing again: a new disagreement is news
            elif said is None or abs(disagreement - said) > self.disagreement_s:
                # once per disagreement, not at every fix (1 Hz, all day, into the journal)
                log.warning("system clock differs from GPS by %.0f s: using GPS time", disagreement)
                self._said_disagreement_s = disagreement
        return True

    def stale_gps(self, gps_time: dt.datetime, at_monotonic: float | None = None) -> bool:
        """True for a GPS time more than STALE_GPS_S behind the GPS time this boot already has:
        an old fix, not a live one. Unless a plausible system clock agrees with it (then the
        earlier GPS time was the wrong one, and refusing every later fix would keep it)."""
        if self._gps is None:
            return False
        m = self._monotonic() if at_monotonic is None else at_monotonic
        if m + self._gps - gps_time.timestamp() <= STALE_GPS_S:
            return False
        wall = self._wall() - (self._monotonic() - m)
        return not plausible(wall) or abs(wall - gps_time.timestamp()) > STALE_GPS_S

    # --- stamping --------------------------------------------------------------------------------
    def now(self) -> Stamp:
        m = self._monotonic()
        if self._gps is not None:
            return self._stamp(m + self._gps, TimeSource.GPS, m)
        wall = self._wall()
        if plausible(wall):
            expected = None if self._system is None else m + self._system
            if expected is not None and wall < expected - self.jump_tolerance_s:
                # Backwards jump: keep our scale, so later stamps never precede earlier ones.
                log.warning("system clock jumped back %.1f s; keeping the earlier time scale", expected - wall)
                return self._stamp(expected, TimeSource.GATEWAY_RECEIPT, m)
            if expected is not None and wall > expected + self.jump_tolerance_s:
                log.info("system clock jumped forward %.1f s (NTP?); following it", wall - expected)
            self._system = wall - m
            return self._stamp(wall, TimeSource.GATEWAY_RECEIPT, m)
        if self._system is not None:
            return self._stamp(m + self._system, TimeSource.GATEWAY_RECEIPT, m)
        return Stamp(None, TimeSource.UNKNOWN, m, self.boot_id)

    def _stamp(self, epoch: float, source: TimeSource, m: float) -> Stamp:
        return Stamp(dt.datetime.fromtimestamp(epoch, dt.timezone.utc), source, m, self.boot_id)

    def repair(self, stamp: Stamp) -> Stamp:
        """A provisional stamp of this boot, given its time from the anchor known now."""
        anchor = self.anchor
        if not stamp.provisional or anchor is None or stamp.boot_id != self.boot_id:
            return stamp
        return Stamp(
            dt.datetime.fromtimestamp(stamp.monotonic + anchor.offset, dt.timezone.utc),
            anchor.source,
            stamp.monotonic,
            stamp.boot_id,
        )

    def elapsed_s(self, since: Stamp) -> float | None:
        """Seconds since a stamp of this boot, by the monotonic clock (None across reboots)."""
        if since.boot_id != self.boot_id:
            return None
        return self._monotonic() - since.monotonic
