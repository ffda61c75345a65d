"""Live pages: notice changes other processes commit, wake the pages' event streams.

The acquire and BLE services (a reading arrives, a device connects, a card is scanned) and the
forwarder (a study sent, confirmed) write clinic.db and the outbox from their own processes. A watcher
asks SQLite each second whether anything was committed there since it last looked
(`PRAGMA data_version`, answered from the WAL index without reading a page), and wakes every
open event stream; each stream re-renders its live panels and sends only those that changed.
Every `refresh_s` the streams wake anyway: a session that ran out of time changes no table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

POLL_S = 1.0
REFRESH_S = 30.0


class Broker:
    """Wakes subscribers; each subscriber is one event stream (one open page)."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Event] = set()

    def subscribe(self) -> asyncio.Event:
        event = asyncio.Event()
        self._subscribers.add(event)
        return event

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._subscribers.discard(event)

    def publish(self) -> None:
        for event in self._subscribers:
            event.set()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


class ChangeWatcher:
    def __init__(self, files: list[Path], broker: Broker, *, poll_s: float = POLL_S, refresh_s: float = REFRESH_S):
        self.files = files
        self.broker = broker
        self.poll_s = poll_s
        self.refresh_s = refresh_s
        self._connections: dict[Path, sqlite3.Connection] = {}
        self._versions: dict[Path, int] = {}
        self.changes_seen = 0

    def _version(self, path: Path) -> int | None:
        conn = self._connections.get(path)
        if conn is None:
            if not path.exists():
                return None
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=5.0)
            self._connections[path] = conn
        try:
            return int(conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as exc:
            log.debug("data_version of %s: %s", path.name, exc)
            conn.close()
            self._connections.pop(path, None)
            return None

    def poll(self) -> bool:
        """True if any watched database changed since the last poll."""
        changed = False
        for path in self.files:
            version = self._version(path)
            if version is None:
                continue
            if path in self._versions and self._versions[path] != version:
                changed = True
            self._versions[path] = version
        return changed

    async def run(self, stop: asyncio.Event) -> None:
        since_refresh = 0.0
        try:
            while not stop.is_set():
                changed = await asyncio.to_thread(self.poll)
                since_refresh += self.poll_s
                if changed or since_refresh >= self.refresh_s:
                    since_refresh = 0.0
                    if changed:
                        self.changes_seen += 1
                    self.broker.publish()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_s)
        finally:
            for conn in self._connections.values():
                conn.close()
            self._connections.clear()
