"""The acquire service's GNSS part: a receiver's NMEA over a serial port (pty) extends the open
visit's track, and a missing receiver is reported once, never fatal."""

from __future__ import annotations

import threading
import time

from lastmile.config import Config
from lastmile.services.acquire import gnss_part
from lastmile.visits.book import VisitBook, VisitPolicy
from tests.conftest import shared_file
from tests.serial_pty import PtyDevice
from tests.waiting import wait_for


def config_for(tmp_path, **gps) -> Config:
    c = Config()
    c.gateway.data_dir = str(tmp_path / "data")
    c.visits.doctor_id = "DR-1"
    for k, v in gps.items():
        setattr(c.gps, k, v)
    return c


def test_nmea_receiver_extends_the_open_visit_track(tmp_path) -> None:
    log_lines = [
        ln for ln in shared_file("gps", "bt-q818.log").read_bytes().splitlines(keepends=True) if ln.startswith(b"$")
    ]
    device = PtyDevice(tmp_path / "gps0")
    config = config_for(tmp_path, source="nmea", nmea_port=str(device.link_path), nmea_baud=9600)
    with VisitBook.open(config.data_dir, gateway_id="gw", policy=VisitPolicy.from_config(config.visits)) as book:
        visit = book.start("P1", doctor_id="DR-1")
    part = gnss_part(config)
    assert part is not None
    feeder_stop = threading.Event()

    def feed() -> None:
        for line in log_lines:
            if feeder_stop.is_set():
                return
            device.write(line)
            time.sleep(0.002)  # a receiver's pace, not a wait

    def track_points() -> int:
        with VisitBook.open(config.data_dir, gateway_id="gw", policy=VisitPolicy.from_config(config.visits)) as book:
            return len(book.track(visit.id))

    feeder = threading.Thread(target=feed, daemon=True)
    part.check(time.monotonic())  # starts the worker
    try:
        wait_for(device.opened_elsewhere, timeout=20)  # fed once the worker has the port open
        feeder.start()
        wait_for(lambda: track_points() >= 5, timeout=60, what="5 points on the open visit's track")
    finally:
        feeder_stop.set()
        if feeder.ident is not None:
            # joined before its pty closes: a write after that lands on whatever file reuses the
            # master's descriptor number (another test's database, in this worker)
            feeder.join(timeout=60)
            assert not feeder.is_alive()
        part.close()
        device.unplug()


def test_no_receiver_is_not_fatal(tmp_path, caplog) -> None:
    config = config_for(tmp_path, source="gpsd", gpsd_port=1)  # nothing listens there
    part = gnss_part(config)
    assert part is not None
    part.check(time.monotonic())
    wait_for(lambda: "GNSS not available" in caplog.text, timeout=20)  # reported...
    part.check(time.monotonic())  # ...and still alive: raises if the worker died
    part.close()
