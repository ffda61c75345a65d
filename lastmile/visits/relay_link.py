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


def _patients_with_open_visits(db_path: Path) -> frozenset[str]:
    if not db_path.exists():
        return frozenset()
    try:
        conn = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=15.0)
    except sqlite3.Error:
        return frozenset()
    try:
        rows = conn.execute("SELECT patient_id FROM visits WHERE state = 'open'").fetchall()
    except sqlite3.Error:  # not migrated yet: no visit was ever started
        return frozenset()
    finally:
        conn.close()
    return frozenset(str(row[0]) for row in rows)


def visit_link(data_dir: Path, gateway_id: str) -> Callable[[Observation, str], str | None]:
    """For one relay round: links a reading to the open visit of its patient if it was taken
    during it (the visit's bundle then carries it, with its Encounter), else None."""

    open_for: list[frozenset[str]] = []  # read once per relay round (one link per round), at first use

    def link(obs: Observation, outbox_key: str) -> str | None:
        if not open_for:
            open_for.append(_patients_with_open_visits(data_dir / DB_NAME))
        if obs.patient_id is None or obs.patient_id not in open_for[0]:
            return None
        from lastmile.visits.book import VisitBook

        # the book checks again, in the transaction that links (the visit may have closed since)
        with VisitBook.open(data_dir, gateway_id=gateway_id) as book:
            return book.attach_observation(obs, outbox_key=outbox_key, taken_during=True)

    return link
