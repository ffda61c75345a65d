"""The forward service's question to the visit book: is this reading part of an open home visit?

Kept apart from `lastmile.visits.book` (which signs visits, so imports `cryptography`): the
forward process asks for every reading it relays, and most clinics keep no visits at all. The
book is opened only when visits.db holds an open visit of the reading's patient.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from devices.observation import Observation

DB_NAME = "visits.db"  # lastmile.visits.book.DB_NAME (a test keeps the two the same)


def _open_visit_of(db_path: Path, patient_id: str) -> bool:
    try:
        conn = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=15.0)
    except sqlite3.Error:
        return False
    try:
        row = conn.execute(
            "SELECT 1 FROM visits WHERE state = 'open' AND patient_id = ? LIMIT 1", (patient_id,)
        ).fetchone()
    except sqlite3.Error:  # not migrated yet: no visit was ever started
        return False
    finally:
        conn.close()
    return row is not None


def visit_link(data_dir: Path, gateway_id: str) -> Callable[[Observation, str], str | None]:
    """For the relay: links a reading to the open visit of its patient if it was taken during
    it (the visit's bundle then carries it, with its Encounter), else None."""

    def link(obs: Observation, outbox_key: str) -> str | None:
        db_path = data_dir / DB_NAME
        if obs.patient_id is None or not db_path.exists() or not _open_visit_of(db_path, obs.patient_id):
            return None
        from lastmile.visits.book import VisitBook

        with VisitBook.open(data_dir, gateway_id=gateway_id) as book:
            return book.attach_observation(obs, outbox_key=outbox_key, taken_during=True)

    return link
