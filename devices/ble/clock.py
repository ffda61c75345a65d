"""Which time a measurement gets: the device clock when it is plausible, corrected when we
measured how far off it is, else the gateway's receipt time. Pure: every time is passed in.

A device clock keeps local wall-clock time with no zone; `tz` says which zone the clinic's
devices are set to (we set them ourselves through Current Time).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from devices.identity import EARLIEST_PLAUSIBLE, TimeSource

DEFAULT_TOLERANCE = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class ClockCheck:
    """What we know of a device clock during one connection.

    `offset` is device clock minus true time, measured on something the device stamped just now
    (its Current Time, or a live reading). `set_at` is when we wrote the Current Time: from then
    on the device clock is right, so stamps that agree with the receipt time need no correction.
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
        return EARLIEST_PLAUSIBLE <= t <= received_at + tolerance

    stamped = device_time.replace(tzinfo=tz)
    off = clock.offset
    if off is None or abs(off) <= tolerance:
        return (stamped, TimeSource.DEVICE_CLOCK) if plausible(stamped) else (received_at, TimeSource.GATEWAY_RECEIPT)
    # The clock was off by `off`. A stamp agreeing with the receipt time, made after we set the
    # clock, was made by the corrected clock; anything else was stamped by the wrong one.
    if clock.set_at is not None and clock.set_at - tolerance <= stamped and abs(stamped - received_at) <= tolerance:
        return stamped, TimeSource.DEVICE_CLOCK
    # In UTC: the offset is an absolute duration, and a DST change may lie between the two.
    corrected = (stamped.astimezone(dt.timezone.utc) - off).astimezone(tz)
    if plausible(corrected):
        return corrected, TimeSource.DEVICE_CLOCK_CORRECTED
    return received_at, TimeSource.GATEWAY_RECEIPT
