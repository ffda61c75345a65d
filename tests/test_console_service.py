"""`lastmile console` and `lastmile demo --console` as real processes: READY=1 once serving over
HTTPS, the watchdog fed, SIGTERM ends it cleanly; the demo prints a URL and a login that work."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lastmile.demo.loopback import free_port
from tests.conftest import require_module
from tests.console_harness import DOCTOR, Client, add_users, console_config

WAIT_S = 120.0
STOP_WITHIN_S = 8.0  # a stop takes under 1 s; systemd's own limit is TimeoutStopSec


@contextlib.contextmanager
def console_process(tmp_path: Path, *, https: bool) -> Iterator[tuple[subprocess.Popen[str], socket.socket, int]]:
    """`lastmile console` as systemd starts it (notify socket, watchdog), with a doctor's account;
    yields it once it said READY=1, with the stand-in for systemd's socket (the messages after
    READY left on it) and its port; killed at the end if it is still up."""
    port = free_port()
    config = console_config(tmp_path / "data", https=https, port=port)
    add_users(config)
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(
        f'[gateway]\ndata_dir = "{config.data_dir}"\n[gps]\nsource = "none"\n[outbox]\nmin_free_mb = 1\n'
        f'[console]\nlisten = "127.0.0.1:{port}"\nhttps = {"true" if https else "false"}\n'
    )
    notify = tmp_path / "notify.sock"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(notify))
    manager.settimeout(WAIT_S)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lastmile", "-c", str(config_file), "console"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        while not (said := manager.recv(4096).decode()).startswith("READY=1") and "\nREADY=1" not in said:
            pass
        yield proc, manager, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        manager.close()


def test_lastmile_console_runs_under_systemds_protocol(tmp_path: Path) -> None:
    with console_process(tmp_path, https=True) as (proc, manager, port):
        client = Client(f"https://127.0.0.1:{port}")  # READY means it serves, certificate made
        client.login(DOCTOR)
        assert client.get("/today").status == 200
        messages: list[str] = []
        deadline = time.monotonic() + WAIT_S
        while not any("WATCHDOG=1" in m for m in messages) and time.monotonic() < deadline:
            messages.append(manager.recv(4096).decode())
        assert any("WATCHDOG=1" in m for m in messages)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, out
    assert "certificate made; SHA-256 fingerprint" in out


def test_the_console_stops_promptly_while_another_process_holds_the_outbox(tmp_path: Path) -> None:
    """lastmile/console/service.py ConsoleServer.stop: with the outbox write-locked by another
    process (the acquire service in a long write; a damaged database) SIGTERM took over 15 s and
    ended in a TimeoutError traceback: closing the console's outbox waited out the busy timeout to
    release send claims the console never takes. systemd (TimeoutStopSec) SIGKILLs a stop that
    hangs, mid-write on a Pi. Now it stops in a moment, cleanly."""
    with console_process(tmp_path, https=False) as (proc, _manager, _port):
        other = sqlite3.connect(tmp_path / "data" / "outbox.sqlite", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            proc.send_signal(signal.SIGTERM)
            began = time.monotonic()
            out, _ = proc.communicate(timeout=WAIT_S)
            took = time.monotonic() - began
        finally:
            other.rollback()
            other.close()
    assert took < STOP_WITHIN_S and proc.returncode == 0, (took, out)
    assert "Traceback" not in out, out


@pytest.mark.timeout(600)
def test_demo_with_the_console(tmp_path: Path) -> None:
    require_module("bumble", "the demo's BLE part is the `emulation` extra")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lastmile",
            "demo",
            "--console",
            "--console-port",
            "0",
            "--recordings",
            "4",
            "--outage",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        url = password = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := re.search(r"console is at (http://127\.0\.0\.1:\d+)/", line):
                url = m.group(1)
            if m := re.search(r"log in as: (\S+)\s+password: (\S+)", line):
                password = m.group(2)
                break
        assert url and password, "the demo printed no URL and login"
        client = Client(url)
        client.login(("demo", password))
        today = client.get("/today").body
        assert "DEMO-0001" in today  # the patient still with the doctor
        assert "Demo BP Cuff" in today  # the emulated cuff's reading
        assert client.get("/sent").body.count('class="card journey') >= 4
        # the demo's field day signs 3 visits: the console on the demo's data lists them (it said none)
        visits = client.get("/visits").body
        assert ("本网关没有入户随访记录" in visits, visits.count('<li class="card')) == (False, 3)
        assert all(f"P-000{n}" in visits for n in (1, 2, 3))
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
