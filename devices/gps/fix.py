"""A position fix with its quality: what one receiver cycle (epoch) says, merged."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import asdict, dataclass
from typing import Any

# gpsd's user equivalent range errors (metres, 95 %): eph = HDOP x P_UERE, epv = VDOP x V_UERE,
# epx/epy = xdop/ydop x H_UERE; the DGPS values apply to DGPS and RTK solutions.
H_UERE = {False: 15.0, True: 3.75}
V_UERE = {False: 23.0, True: 5.75}
P_UERE = {False: 19.0, True: 4.75}
# From 1-sigma (GST) to 95 %: 1.96 along one axis; 2.4477 x the per-axis sigma in the plane.
SIGMA_TO_95_1D = 1.96
SIGMA_TO_95_2D = 2.4477


class FixMode(int, enum.Enum):
    """gpsd's TPV mode."""

    UNKNOWN = 0
    NO_FIX = 1
    FIX_2D = 2
    FIX_3D = 3


@dataclass(frozen=True, slots=True)
class Fix:
    mode: FixMode
    time: dt.datetime | None  # UTC; None until a valid RMC or a ZDA told us the date
    latitude: float | None = None
    longitude: float | None = None
    altitude_m: float | None = None  # above mean sea level (3D fixes only)
    quality: int | None = None  # GGA fix quality
    dgps: bool = False
    satellites_used: int | None = None
    satellites_visible: int | None = None
    hdop: float | None = None
    vdop: float | None = None
    pdop: float | None = None
    xdop: float | None = None
    ydop: float | None = None
    eph_m: float | None = None  # estimated horizontal error, 95 %
    epv_m: float | None = None
    epx_m: float | None = None
    epy_m: float | None = None
    error_source: str | None = None  # "receiver" (EPE/GST) or "dop" (DOP x UERE)
    speed_mps: float | None = None
    track_deg: float | None = None
    systems: tuple[str, ...] = ()  # GNSS seen in this cycle's talkers
    # how `time` was corrected from what the receiver said: "gps-week-rollover" (+1024 weeks)
    time_corrected: str | None = None

    @property
    def has_position(self) -> bool:
        return self.mode >= FixMode.FIX_2D and self.latitude is not None and self.longitude is not None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict (ISO time with "Z", mode as a number)."""
        out = asdict(self)
        out["mode"] = int(self.mode)
        out["systems"] = list(self.systems)
        if self.time is not None:
            out["time"] = self.time.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fix:
        values = dict(data)
        values["mode"] = FixMode(int(values.get("mode", 0)))
        if values.get("time"):
            values["time"] = dt.datetime.fromisoformat(str(values["time"]).replace("Z", "+00:00"))
        values["systems"] = tuple(values.get("systems") or ())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})
