"""The county's household register (CSV: household_id, latitude, longitude) and distances.

Positions are kept in WGS-84, the GPS fix's datum: a register in GCJ-02 or BD-09 (exported from
Chinese maps; config visits.register_datum) is converted once, when it is imported."""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from lastmile.visits.datum import to_wgs84
from uploader.sqlite_store import transaction

EARTH_RADIUS_M = 6_371_008.8  # mean radius (IUGG)


class RegisterError(ValueError):
    """The register file cannot be imported; the message names the line."""


@dataclass(frozen=True)
class Household:
    household_id: str
    latitude: float
    longitude: float


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine); metres-level exact at village scale."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def parse_register(text: str, where: str = "<register>", datum: str = "wgs84") -> list[Household]:
    """Strict: header with the three columns (any order, extra columns ignored), valid numbers.
    Positions in `datum` (lastmile.visits.datum.DATUMS), returned in WGS-84."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    wanted = {"household_id", "latitude", "longitude"}
    columns = {c.strip().lower() for c in reader.fieldnames or []}
    if not wanted <= columns:
        raise RegisterError(f"{where}: the header must name {', '.join(sorted(wanted))}")
    out: dict[str, Household] = {}
    for row in reader:
        line = reader.line_num
        clean = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        hid = clean["household_id"]
        if not hid:
            raise RegisterError(f"{where}:{line}: empty household_id")
        try:
            lat, lon = float(clean["latitude"]), float(clean["longitude"])
        except ValueError:
            raise RegisterError(f"{where}:{line}: latitude/longitude must be decimal degrees") from None
        if not (-90 <= lat <= 90 and -180 <= lon <= 180) or not (math.isfinite(lat) and math.isfinite(lon)):
            raise RegisterError(f"{where}:{line}: position {lat}, {lon} is off the globe")
        if hid in out:
            raise RegisterError(f"{where}:{line}: household {hid} appears twice")
        out[hid] = Household(hid, *to_wgs84(lat, lon, datum))
    return list(out.values())


class HouseholdRegister:
    """The register as a table of the visits database."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def import_csv(self, path: str | Path, now_iso: str, datum: str = "wgs84") -> int:
        """Replace the register with the file's content, its positions in `datum` (atomically);
        returns the count."""
        raw = Path(path).read_bytes()
        households = parse_register(raw.decode("utf-8"), str(path), datum)
        digest = hashlib.sha256(raw).hexdigest()
        with transaction(self.db):
            self.db.execute("DELETE FROM households")
            self.db.table("households").insert_all(
                [{"household_id": h.household_id, "latitude": h.latitude, "longitude": h.longitude} for h in households]
            )
            self.db.table("register_imports").insert(
                {
                    "imported_at": now_iso,
                    "source": str(path),
                    "sha256": digest,
                    "count": len(households),
                    "datum": datum,
                }
            )
        return len(households)

    def sync_from(self, path: str | Path, now_iso: str, datum: str = "wgs84") -> bool:
        """Import the file if it or its datum changed since the last import (cheap on every visit
        start)."""
        p = Path(path)
        if not p.is_file():
            return False
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        last = list(self.db.query("SELECT sha256, datum FROM register_imports ORDER BY id DESC LIMIT 1"))
        if last and (last[0]["sha256"], last[0]["datum"]) == (digest, datum):
            return False
        self.import_csv(p, now_iso, datum)
        return True

    def get(self, household_id: str) -> Household | None:
        rows = list(
            self.db.query(
                "SELECT household_id, latitude, longitude FROM households WHERE household_id = ?", [household_id]
            )
        )
        return Household(**rows[0]) if rows else None

    def count(self) -> int:
        return self.db.table("households").count
