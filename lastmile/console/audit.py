"""The audit trail: every change a console user makes, with who and when.

One row per action in clinic.db's `audit` table (migration 0005_console): check-in, assignment,
"send anyway", "re-record", device pairing, a critical report acknowledged, language changes,
logins and failed logins. Rows are never updated or deleted by the console.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from lastmile.clinic.db import from_iso, iso, transaction


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
