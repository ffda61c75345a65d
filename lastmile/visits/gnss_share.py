"""The receiver for a command (`lastmile visit start|stop`, `lastmile gps fix`).

With gps.source = "nmea" the acquire service holds the receiver's serial port (exclusively: two
readers of one port split its bytes, and both lose fixes). A command then asks the service for
its fixes through visits.db (`VisitBook.want_fixes`: written once by the command; the service
writes its fixes only while one waits) and opens the port itself only when no service holds it.
gpsd serves any number of clients: it is always asked directly.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from firmware_bridge.errors import GnssBusyError, GnssError
from firmware_bridge.gnss import FixSource, open_source
from lastmile.data_dir import DataDirError

if TYPE_CHECKING:
    from devices.gps import Fix
    from lastmile.config import GpsSection
    from lastmile.visits.book import FixRecord, VisitBook

log = logging.getLogger(__name__)

POLL_S = 0.2


class SharedFixes:
    """A FixSource of the fixes the acquire service shares; `records` keeps each one as the
    service received it (its reception stamp: the command must not record it a second time)."""

    def __init__(self, book: VisitBook, wait_s: float, *, owns_book: bool = False) -> None:
        self.book = book
        self.owns_book = owns_book  # opened for this: closed with it
        self.since = book.want_fixes(wait_s)
        self.records: dict[int, FixRecord] = {}

    def fixes(self, deadline: float) -> Iterator[Fix]:
        last = None
        while time.monotonic() < deadline:
            record = self.book.shared_fix(self.since)
            if record is not None and record.received != last:
                last = record.received
                self.book.adopt_shared_fix(record)  # the command's own stamps and checks
                self.records[id(record.fix)] = record
                yield record.fix
            else:
                time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        if self.owns_book:
            self.book.close()


def open_receiver(
    gps: GpsSection, open_book: Callable[[], VisitBook], wait_s: float, *, owns_book: bool = True
) -> FixSource | None:
    """The configured receiver, or the acquire service's fixes when it holds the receiver.
    `open_book`: how to get the visit book, called only to ask the service (`lastmile gps fix`
    run as root must not create visits.db: the service could not open a root-owned one);
    `owns_book`: the book is opened for this, and closed with the source (a visit command passes
    its own open book, and keeps it)."""
    try:
        return open_source(
            gps.source,
            gpsd_host=gps.gpsd_host,
            gpsd_port=gps.gpsd_port,
            nmea_port=gps.nmea_port,
            nmea_baud=gps.nmea_baud,
        )
    except GnssBusyError as exc:
        log.info("%s: asking the acquire service for its fixes", exc)
        opened: VisitBook | None = None
        try:
            opened = open_book()
            return SharedFixes(opened, wait_s, owns_book=owns_book)
        except (sqlite3.Error, OSError, DataDirError) as db_exc:  # said as the command says any GNSS fault
            if opened is not None and owns_book:
                opened.close()
            raise GnssError(f"{exc}, and visits.db cannot be opened to ask it for fixes: {db_exc}") from db_exc
