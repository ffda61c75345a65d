"""Counting what a page or a command asks the database: every SQL statement run on given sqlite3
connections, shared by the page-cost tests and the tests that bound a service's queries."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

# A page costs the same statements with FEW readings as with MANY: the sizes the page-cost tests compare.
T0 = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.timezone.utc)
FEW, MANY = 2, 60


@contextmanager
def traced(*connections: object) -> Iterator[list[str]]:
    """Every SQL statement run on `connections` (sqlite3 connections) while the block runs."""
    statements: list[str] = []
    for conn in connections:
        conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
    try:
        yield statements
    finally:
        for conn in connections:
            conn.set_trace_callback(None)  # type: ignore[attr-defined]
