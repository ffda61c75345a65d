"""gpsd's own decoded reports (the .chk files beside the logs in ../shared/gps), for comparison."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GpsdTpv:
    time: dt.datetime | None
    lat: float | None
    lon: float | None
    mode: int
    report: dict


def _utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def tpv_reports(path: Path) -> list[GpsdTpv]:
    """Every TPV report gpsd wrote for a log, in order."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("{"):
            continue
        report = json.loads(line)
        if report.get("class") != "TPV":
            continue
        out.append(
            GpsdTpv(
                _utc(report["time"]) if "time" in report else None,
                report.get("lat"),
                report.get("lon"),
                int(report.get("mode", 0)),
                report,
            )
        )
    return out


def final_by_time(reports: list[GpsdTpv]) -> dict[dt.datetime, GpsdTpv]:
    """gpsd reports after every sentence; the last report of a time is the cycle's result."""
    out: dict[dt.datetime, GpsdTpv] = {}
    for r in reports:
        if r.time is not None and r.mode >= 2:
            out[r.time] = r
    return out
