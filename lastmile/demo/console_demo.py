"""`lastmile demo --console`: the demo clinic, then the doctor's console on it until Ctrl-C.

The demo runs as usual into a data directory that is kept; one more ECG is recorded for the
patient still with the doctor (it stays queued: the demo's reading center has gone home), a demo
account is made with a fresh password, and the console serves the lot on loopback (plain HTTP is
allowed there only). The URL and the login are printed.
"""

from __future__ import annotations

import datetime as dt
import secrets
import signal
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from lastmile.config import Config
from lastmile.demo.runner import DEMO_PATIENTS, DemoSummary, Say, run_demo, source_ecg

DEMO_USER = "demo"


def record_one_more_ecg(config: Config) -> None:
    """The ECG "just recorded" for the patient with the doctor, for the Today page."""
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording

    recording = replace(
        source_ecg(), patient=DEMO_PATIENTS[0], acquired_at=dt.datetime.now(dt.timezone.utc), source_format="dicom"
    )
    with open_outbox(config) as outbox:
        enqueue_recording(outbox, recording, config, key="demo-console-ecg")


def demo_account(config: Config) -> str:
    """A fresh password for the demo's admin account (made, or reset, now)."""
    from lastmile.clinic.db import open_clinic_db
    from lastmile.console.accounts import Accounts

    password = secrets.token_urlsafe(9)
    db = open_clinic_db(config.data_dir)
    try:
        accounts = Accounts(db)
        if accounts.get(DEMO_USER) is None:
            accounts.add_user(DEMO_USER, "admin", password, now=dt.datetime.now(dt.timezone.utc))
        else:
            accounts.set_password(DEMO_USER, password)
    finally:
        db.conn.close()
    return password


def run_console_demo(
    say: Say, *, port: int = 8080, n_recordings: int = 12, outage_s: float = 4.0, stop: threading.Event | None = None
) -> DemoSummary:
    from lastmile.console.service import ConsoleServer

    with tempfile.TemporaryDirectory(prefix="lastmile-demo-console-") as tmp:
        data_dir = Path(tmp) / "data"
        summary = run_demo(say, n_recordings=n_recordings, outage_s=outage_s, data_dir=data_dir)
        config = Config()
        config.gateway.id = "demo-gateway"
        config.set_data_dir(data_dir)
        config.gps.source = "none"
        config.outbox.min_free_mb = 1
        config.console.listen = f"127.0.0.1:{port}"
        config.console.https = False  # loopback only
        record_one_more_ecg(config)
        password = demo_account(config)
        server = ConsoleServer(config)
        server.start()
        stop = stop or threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if _main_thread() else None
        try:
            say("")
            say(f"the doctor's console is at {server.url}/ (this computer only)")
            say(f"  log in as: {DEMO_USER}    password: {password}")
            say("  press Ctrl-C to stop")
            stop.wait()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            server.stop()
    return summary


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
