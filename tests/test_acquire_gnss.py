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
    part.check(time.monotonic())  # starts the worker
    try:
        wait_for(device.opened_elsewhere, timeout=20)  # fed once the worker has the port open
        feeder_stop = threading.Event()

        def feed() -> None:
            for line in log_lines:
                if feeder_stop.is_set():
                    return
                device.write(line)
                time.sleep(0.002)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        deadline = time.monotonic() + 20
        points = 0
        while time.monotonic() < deadline:
            with VisitBook.open(
                config.data_dir, gateway_id="gw", policy=VisitPolicy.from_config(config.visits)
            ) as book:
                points = len(book.track(visit.id))
            if points >= 5:
                break
            time.sleep(0.2)
        feeder_stop.set()
        assert points >= 5
    finally:
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
