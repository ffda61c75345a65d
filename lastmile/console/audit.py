"""The audit trail: every change a console user makes, with who and when.

One row per action in clinic.db's `audit` table (migration 0005_console): check-in, assignment,
"send anyway", "re-record", device pairing, a critical report acknowledged, language changes,
logins and failed logins. Rows are never updated or deleted by the console.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from lastmile.clinic.db import from_iso, iso, transaction
from lastmile.console.i18n import N_

log = logging.getLogger(__name__)

# Every action the console writes to the trail (its code, the `action` column) and its name as the
# System page's "who did what" says it: the one place they live (tests/test_console_i18n.py holds
# their Chinese names). `record` still stores a code missing here - the action is done by then,
# refusing would fail the command that did it - and logs an error: the page shows the bare code.
ACTIONS: dict[str, str] = {
    "login": N_("logged in"),
    "login-failed": N_("login refused"),
    "logout": N_("logged out"),
    "language": N_("changed the language"),
    "check-in": N_("checked in a patient"),
    "end-session": N_("ended a patient's check-in"),
    "assign-reading": N_("assigned a reading"),
    "assign-ecg": N_("assigned an ECG"),
    "send-anyway": N_("sent an ECG as it is"),
    "ecg-checked-in-name": N_("sent an ECG under the check-in's name"),
    "ecg-name-right": N_("corrected a check-in's name to the ECG's"),
    "ecg-id-values": N_("sent an ECG with the sex and birth date of its ID number"),
    "re-record": N_("had an ECG recorded again"),
    "stick-file-seen": N_("saw that an ECG file on the USB stick was not imported"),
    "acknowledge-report": N_("confirmed seeing a critical result"),
    "acknowledge-report-again": N_("confirmed seeing a critical result again"),
    "pair-device": N_("added a device"),
    "unpair-device": N_("removed a device"),
    "map-device-user": N_("gave a device's user to a patient"),
    "unmap-device-user": N_("took a device's user off a patient"),
    # `lastmile user ...` on the gateway itself (lastmile/commands/console.py), as "(command line)"
    "user-add": N_("added an account"),
    "user-passwd": N_("changed an account's password"),
    "user-unlock": N_("unlocked an account"),
    "user-disable": N_("disabled an account"),
    "user-enable": N_("enabled an account"),
}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: dt.datetime
    user_name: str
    action: str
    target: str
    detail: dict[str, Any]


class AuditLog:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def record(
        self, user_name: str, action: str, *, now: dt.datetime, target: str = "", detail: dict[str, Any] | None = None
    ) -> int:
        if action not in ACTIONS:
            log.error("audit action %r has no name in ACTIONS: recorded as its bare code", action)
        with transaction(self.db) as conn:
            cur = conn.execute(
                "INSERT INTO audit (at, user_name, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                (iso(now), user_name, action, target, json.dumps(detail or {}, ensure_ascii=False, sort_keys=True)),
            )
        return int(cur.lastrowid or 0)

    def recent(self, limit: int = 50, *, action: str | None = None, target: str | None = None) -> list[AuditEntry]:
        sql, params = "SELECT * FROM audit", []
        where = []
        if action is not None:
            where.append("action = ?")
            params.append(action)
        if target is not None:
            where.append("target = ?")
            params.append(target)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.db.conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*params, int(limit))).fetchall()
        out = []
        for r in rows:
            at = from_iso(r["at"])
            assert at is not None
            out.append(
                AuditEntry(
                    int(r["id"]), at, r["user_name"], r["action"], r["target"] or "", json.loads(r["detail"] or "{}")
                )
            )
        return out

    def latest(self, action: str, target: str) -> AuditEntry | None:
        found = self.recent(1, action=action, target=target)
        return found[0] if found else None
