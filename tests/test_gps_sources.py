"""GNSS sources: a real gpsd (gpsfake replaying a receiver log) and an NMEA receiver on a pty."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import tty
from pathlib import Path

import pytest

from devices.gps import Fix, FixMode, decode_nmea
from firmware_bridge.errors import GnssError
from firmware_bridge.gnss import GpsdSource, NmeaSerialSource, best_fix, tpv_to_fix
from tests.conftest import require_tool, shared_file
from tests.peers import free_port


def _gpsfake(log: Path) -> tuple[subprocess.Popen, int]:
    require_tool("gpsfake")
    require_tool("gpsd")
    port = free_port()
    proc = subprocess.Popen(
        ["gpsfake", "-1", "-q", "-P", str(port), "-c", "0.05", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, port


def _connect(port: int, proc: subprocess.Popen) -> GpsdSource:
    deadline = time.monotonic() + 15
    while True:
        try:
            return GpsdSource("127.0.0.1", port, connect_timeout_s=1.0)
        except GnssError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=1)  # gpsfake lingers ~10 s on SIGTERM; its gpsd is in the same group
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("name", ["bt-q818", "beidou-gb"])
def test_gpsfake_through_real_gpsd_matches_our_decoder(name: str) -> None:
    """The gateway's gpsd client receives what gpsd decoded; it agrees with our own decoder.

    Dates: gpsd 3.22 treats a receiver date before its own build as a GPS week rollover and adds
    1024 weeks (the 2010 log arrives as 2030), so the comparison is on the UTC time of day.
    """
    log = shared_file("gps", f"{name}.log")
    ours = {f.time.time(): f for f in decode_nmea(log.read_bytes()) if isinstance(f, Fix) and f.has_position and f.time}
    proc, port = _gpsfake(log)
    try:
        with _connect(port, proc) as gpsd:
            received: list[Fix] = []
            overall = time.monotonic() + 20
            while time.monotonic() < overall:
                batch = list(gpsd.fixes(time.monotonic() + 1.0))
                received += [f for f in batch if f.has_position and f.time]
                if received and not batch:
                    break  # the log is over: gpsd has gone quiet
            assert gpsd.version and gpsd.version.get("class") == "VERSION"
    finally:
        _stop(proc)
    assert received, "gpsd reported no fix"
    for fix in received:
        mine = ours.get(fix.time.time())  # type: ignore[union-attr]
        assert mine is not None, fix
        assert (fix.latitude, fix.longitude) == (
            pytest.approx(mine.latitude, abs=1e-9),
            pytest.approx(mine.longitude, abs=1e-9),
        )
    settled = received[1:] or received  # the first report may come from a half-seen cycle
    assert all(f.mode == ours[f.time.time()].mode for f in settled)  # type: ignore[union-attr]


def test_tpv_conversion() -> None:
    fix = tpv_to_fix(
        {
            "class": "TPV",
            "mode": 3,
            "time": "2026-08-05T05:52:34.200Z",
            "lat": 47.6,
            "lon": -122.3,
            "altMSL": 76.5,
            "eph": 17.1,
            "status": 2,
        },
        {"uSat": 14, "nSat": 25, "hdop": 0.9},
    )
    assert fix.mode == FixMode.FIX_3D and fix.altitude_m == 76.5 and fix.dgps and fix.satellites_used == 14
    assert fix.time and fix.time.microsecond == 200000
    assert not tpv_to_fix({"class": "TPV", "mode": 1}).has_position


def test_gpsd_not_running_is_a_typed_error() -> None:
    with pytest.raises(GnssError):
        GpsdSource("127.0.0.1", free_port(), connect_timeout_s=0.5)


def test_nmea_receiver_on_a_pty_gives_the_best_fix() -> None:
    log = shared_file("gps", "bt-q818.log").read_bytes()
    master, slave = os.openpty()
    tty.setraw(master)
    stop = threading.Event()

    def feed() -> None:
        for i in range(0, len(log), 256):
            if stop.is_set():
                return
            os.write(master, log[i : i + 256])
            time.sleep(0.01)

    # opened before the first byte is written: pyserial discards what waits in the port at open
    source = NmeaSerialSource(os.ttyname(slave), 9600)
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        seen: list[Fix] = []
        best = best_fix(source, 2.0, good_enough_eph_m=1.0, on_fix=seen.append)
    finally:
        stop.set()
        source.close()
        writer.join(timeout=60)
        # a write after close lands on whatever file reuses the descriptor (another test's database)
        assert not writer.is_alive(), "the pty feeder is still writing"
        os.close(master)
        os.close(slave)
    assert best is not None and best.mode == FixMode.FIX_3D and best.dgps
    assert best.eph_m == pytest.approx(4.1325)
    assert len(seen) >= 8
