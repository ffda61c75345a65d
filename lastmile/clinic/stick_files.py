"""ECG files on a USB stick that were not imported, said to the doctor until he has seen them.

The stick import (firmware_bridge.usb_import) refuses a damaged file with a journal line only: the
doctor pulls the stick believing every ECG of the cart came in, and that patient's ECG never
reaches the county. Each refused file is kept here (clinic.db `stick_files_refused`: its name, the
kind of trouble, the technician's reason, when) and Today's 待处理 panel says it in his words until
he presses "I have seen it", or the same file name is imported fine later (exported again).

A file that is readable but not an ECG (the cart's PDF report) is not kept: nothing is wrong.
One row per file on the stick (its path): the watcher looks at the whole stick again whenever
anything on it changes, and the same damaged file refused again writes nothing (no duplicate, no
growth, no SD wear); the same path with other bytes (exported again, damaged again) is said anew.
Rows the doctor has seen are removed after SEEN_KEPT: the table stays as small as a stick's trouble.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePath

import sqlite_utils

from lastmile.clinic.db import iso, transaction

log = logging.getLogger(__name__)

SEEN_KEPT = dt.timedelta(days=30)  # a seen row is kept this long: the same bytes refused again stay quiet
MAX_SHOWN = 50  # Today lists at most this many (a stick of a broken cart: the first ones, newest first)


class StickTrouble(StrEnum):
    """What went wrong with the file, as the doctor can act on it."""

    DAMAGED = "damaged"  # read, but not an ECG we can take (broken file, unknown format): export it again
    UNREADABLE = "unreadable"  # the stick could not be read (pulled out, worn): plug it in again
    # a readable file of another kind (the cart's PDF report): nothing wrong, never said on Today
    NOT_ECG = "not-ecg"


@dataclass(frozen=True, slots=True)
class RefusedStickFile:
    id: int
    name: str  # the file's name on the stick (ECG_BAD.dcm)
    path: str  # where it was, for the technician
    trouble: StickTrouble
    reason: str  # the import's own words (English), for the technician
    refused_at: dt.datetime


@dataclass(frozen=True, slots=True)
class StickFileOutcome:
    """One file of a stick import, as this store needs it (not firmware_bridge's type: the
    console and tests build them too)."""

    path: str
    refused: bool
    trouble: StickTrouble = StickTrouble.DAMAGED
    reason: str = ""
    key: str = ""  # the content hash ("" when the file could not be read)


class RefusedStickFiles:
    """clinic.db's refused stick files; one per process thread (a connection is not shared)."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def record(self, outcomes: Iterable[StickFileOutcome], *, now: dt.datetime) -> int:
        """Keep each refused file once (by path and content), and forget those whose name came in
        fine (imported, or known already). Returns how many refusals are new."""
        outcomes = list(outcomes)
        # not an ECG (the cart's PDF report, on every stick): nothing the doctor can act on, so it
        # is not kept, and is "fine" (a row an older gateway kept for it as damaged goes)
        refused = [o for o in outcomes if o.refused and o.trouble != StickTrouble.NOT_ECG]
        # a name refused in this very look (another folder's copy) is not "come in fine"
        fine_names = {PurePath(o.path).name for o in outcomes if not o.refused or o.trouble == StickTrouble.NOT_ECG}
        fine_names -= {PurePath(o.path).name for o in refused}
        # read first (the table is as small as the sticks' trouble): a look at a stick with nothing
        # new to keep or forget takes no write lock and writes nothing
        kept = dict(self.db.conn.execute("SELECT path, key FROM stick_files_refused").fetchall())
        kept_names = {PurePath(path).name for path in kept}
        forget = sorted(fine_names & kept_names)
        changed = [o for o in refused if kept.get(o.path) != o.key]
        if not forget and not changed:
            return 0
        with transaction(self.db) as conn:
            for name in forget:
                conn.execute("DELETE FROM stick_files_refused WHERE name = ?", (name,))
            for o in changed:
                values = (PurePath(o.path).name, o.trouble.value, o.reason, o.key, iso(now), o.path)
                # other bytes under a path said before (exported again, damaged again): said anew,
                # even if the old ones were seen
                conn.execute(
                    "INSERT INTO stick_files_refused (name, trouble, reason, key, refused_at, path) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET name = excluded.name, "
                    "trouble = excluded.trouble, reason = excluded.reason, key = excluded.key, "
                    "refused_at = excluded.refused_at, seen_at = NULL, seen_by = NULL",
                    values,
                )
            if changed:
                conn.execute("DELETE FROM stick_files_refused WHERE seen_at < ?", (iso(now - SEEN_KEPT),))
        return len(changed)

    def unseen(self, limit: int = MAX_SHOWN) -> list[RefusedStickFile]:
        """The refused files the doctor has not said he has seen, newest first."""
        rows = self.db.conn.execute(
            "SELECT id, name, path, trouble, reason, refused_at FROM stick_files_refused "
            "WHERE seen_at IS NULL ORDER BY refused_at DESC, id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            RefusedStickFile(
                id=row[0],
                name=row[1],
                path=row[2],
                trouble=StickTrouble.UNREADABLE if row[3] == StickTrouble.UNREADABLE else StickTrouble.DAMAGED,
                reason=row[4] or "",
                refused_at=dt.datetime.fromisoformat(row[5]),
            )
            for row in rows
        ]

    def seen(self, file_id: int, *, by: str, now: dt.datetime) -> bool:
        """The doctor has seen it: no longer on Today. False: not there (seen already, imported since)."""
        with transaction(self.db) as conn:
            done = conn.execute(
                "UPDATE stick_files_refused SET seen_at = ?, seen_by = ? WHERE id = ? AND seen_at IS NULL",
                (iso(now), by, file_id),
            ).rowcount
        return done > 0
