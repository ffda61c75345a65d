"""The receiver for a command (`lastmile visit start|stop`, `lastmile gps fix`).

With gps.source = "nmea" the acquire service holds the receiver's serial port (exclusively: two
readers of one port split its bytes, and both lose fixes). A command then asks the service for
its fixes through visits.db (`VisitBook.want_fixes`: written once by the command; the service
writes its fixes only while one waits) and opens the port itself only when no service holds it.
gpsd serves any number of clients: it is always asked directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from firmware_bridge.errors import GnssBusyError
from firmware_bridge.gnss import FixSource, open_source

if TYPE_CHECKING:
    from devices.gps import Fix
    from lastmile.config import GpsSection
    from lastmile.visits.book import FixRecord, VisitBook

log = logging.getLogger(__name__)

POLL_S = 0.2


class SharedFixes:
    """A FixSource of the fixes the acquire service shares; `records` keeps each one as the
    service received it (its reception stamp: the command must not record it a second time)."""

    def __init__(self, book: VisitBook, wait_s: float) -> None:
        self.book = book
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
        pass


def open_receiver(gps: GpsSection, book: VisitBook, wait_s: float) -> FixSource | None:
    """The configured receiver, or the acquire service's fixes when it holds the receiver."""
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
        return SharedFixes(book, wait_s)
