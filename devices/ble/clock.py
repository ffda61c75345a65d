"""Which time a measurement gets: the device clock when it is plausible, corrected when we
measured how far off it is, else the gateway's receipt time. Pure: every time is passed in.

A device clock keeps local wall-clock time with no zone; `tz` says which zone the clinic's
devices are set to (we set them ourselves through Current Time).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from devices.identity import TimeSource, plausible_device_time

DEFAULT_TOLERANCE = dt.timedelta(minutes=5)
# What measuring a device clock cannot resolve: Current Time and Date Time count whole seconds, and
# the gateway reads its own clock a BLE round trip after the device read its. An offset within this
# is no error found, and a stamp this much before the moment we set the clock is the set clock's.
MEASUREMENT_NOISE = dt.timedelta(seconds=3)


@dataclass(frozen=True, slots=True)
class ClockCheck:
    """What we know of a device clock during one connection.

    `offset` is device clock minus true time, measured on something the device stamped just now
    (its Current Time, or a live reading). `set_at` is when we wrote the Current Time: from then
    on the device clock is right, so stamps only the set clock can have made need no correction.
    """

    offset: dt.timedelta | None = None
    set_at: dt.datetime | None = None


def measure_offset(device_now: dt.datetime, gateway_now: dt.datetime, tz: dt.tzinfo) -> dt.timedelta:
    """Device clock minus gateway clock, from a device time stamp taken at `gateway_now`."""
    return device_now.replace(tzinfo=tz) - gateway_now


def resolve_time(
    device_time: dt.datetime | None,
    received_at: dt.datetime,
    clock: ClockCheck,
    tz: dt.tzinfo,
    *,
    clock_untrusted: bool = False,
    tolerance: dt.timedelta = DEFAULT_TOLERANCE,
) -> tuple[dt.datetime, TimeSource]:
    """(measured_at, source) for a reading stamped `device_time` (naive) received at `received_at`."""
    if device_time is None or clock_untrusted:
        return received_at, TimeSource.GATEWAY_RECEIPT

    def plausible(t: dt.datetime) -> bool:
        return plausible_device_time(t, received_at, tolerance)

    stamped = device_time.replace(tzinfo=tz)
    off = clock.offset
    # Whatever we measured, however small, is corrected: a clock 3 min fast stamps the last
    # patient's stored reading after the next one's check-in. Only the measurement's own noise
    # is no error (see MEASUREMENT_NOISE). `tolerance` bounds only what we cannot measure: how
    # far ahead of its receipt an uncorrected stamp may be.
    if off is None or abs(off) <= MEASUREMENT_NOISE:
        return (stamped, TimeSource.DEVICE_CLOCK) if plausible(stamped) else (received_at, TimeSource.GATEWAY_RECEIPT)
    # The clock was off by `off` until we set it at `set_at`. Before that it stamped up to
    # set_at + off; only the set clock stamps later than both that and set_at. A stamp in between
    # may be either and is taken as the wrong clock's: the earlier time holds a reading for the
    # doctor rather than giving it to the patient checked in meanwhile.
    set_clock_from = None if clock.set_at is None else clock.set_at + max(off, dt.timedelta(0)) - MEASUREMENT_NOISE
    if set_clock_from is not None and set_clock_from <= stamped and plausible(stamped):
        return stamped, TimeSource.DEVICE_CLOCK
    # In UTC: the offset is an absolute duration, and a DST change may lie between the two.
    corrected = (stamped.astimezone(dt.timezone.utc) - off).astimezone(tz)
    if plausible(corrected):
        return corrected, TimeSource.DEVICE_CLOCK_CORRECTED
    return received_at, TimeSource.GATEWAY_RECEIPT
