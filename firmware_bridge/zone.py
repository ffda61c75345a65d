"""The gateway's time zone, with its daylight-saving rules: devices that keep wall-clock time
without a zone (BLE Date Time, ECG carts' files) are read in it, each stamp at its own date."""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

log = logging.getLogger(__name__)


def system_zone() -> dt.tzinfo:
    """The zone named by $TZ, /etc/timezone or the /etc/localtime link, as an IANA zone; only if
    none names one, the current fixed UTC offset (which cannot follow a DST change)."""
    key = os.environ.get("TZ", "").lstrip(":")
    if not key:
        try:
            key = Path("/etc/timezone").read_text().strip()
        except OSError:
            target = os.path.realpath("/etc/localtime")
            key = target.split("zoneinfo/", 1)[1] if "zoneinfo/" in target else ""
    if key:
        try:
            return ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError):
            log.debug("time zone %r unknown to the tz database; using the current UTC offset", key)
    return dt.datetime.now().astimezone().tzinfo or dt.timezone.utc
