"""An ECG sent just before a stop keeps its sent-study record though another process held clinic.db's
write lock past the stop's one second, so its report is asked for after the next start.

The real `lastmile forward` process, Orthanc as the reading center (its Lua filter waits for the test
before it stores the object and answers), and a second connection holding clinic.db's write lock
(the console, `lastmile patient` ...) from the moment Orthanc has the ECG until a few seconds after
SIGTERM. The recorder's write waits for the lock; the stop gives that wait up after a second; its
last try at close (`SentStudyRecorder.stop` -> `drain`) came after the ECG listener's close, when
that second was gone: one 100 ms try, the record dropped. With outbox.retention_days 0 the
committed ECG is purged before the next start, so `backfill` found nothing either: the reading
center's report (a critical result too) was never asked for. Now the stop does not wait for the
lock (it stays prompt) but saves the record to a small fsynced side file in the data directory,
which the next start writes into clinic.db first, then removes (lastmile.reports.sent).
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lastmile.clinic.db import DB_NAME as CLINIC_DB
from lastmile.config import load_config
from lastmile.data_dir import open_outbox
from lastmile.ecg.intake import enqueue_recording
from lastmile.reports.sent import UNWRITTEN_NAME
from tests.ecg_factories import make_recording
from tests.peers import OrthancServer, c_store_held_for_the_test, forward_to_orthanc_toml, free_port, gateway_modality
from tests.service_harness import start, stop, write_locked
from tests.waiting import wait_for
from uploader.outbox import DB_NAME as OUTBOX_DB

GATEWAY_AE = "CLINIC01"
HELD_AFTER_SIGTERM_S = 4.0  # well past the stop's one second: the lock's holder is slow, not gone
STOP_WITHIN_S = 3.0  # the stop does not wait for the lock's holder


def recorded(data_dir: Path, study_uid: str) -> bool:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / CLINIC_DB}?mode=ro", uri=True, timeout=30)) as conn:
        return conn.execute("SELECT 1 FROM sent_studies WHERE study_uid = ?", (study_uid,)).fetchone() is not None


def purged(data_dir: Path) -> bool:
    """The ECG's outbox item is purged (its study UID wiped): `backfill` cannot find it."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / OUTBOX_DB}?mode=ro", uri=True, timeout=30)) as conn:
        return conn.execute("SELECT state FROM items WHERE key = 'ecg'").fetchone() == ("purged",)


@pytest.mark.orthanc
def test_a_sent_record_waiting_for_clinic_db_at_a_stop_is_written_not_dropped(
    tmp_path: Path, orthanc_factory: Callable[..., OrthancServer]
) -> None:
    received, locked = tmp_path / "received", tmp_path / "locked"
    # Orthanc waits for the test's lock on clinic.db before it stores the ECG and answers
    hook = c_store_held_for_the_test(tmp_path / "wait-for-the-lock.lua", received, locked)
    listen_port = free_port()
    pacs = orthanc_factory(modalities=gateway_modality(GATEWAY_AE, listen_port), extra={"LuaScripts": [str(hook)]})
    cfg = forward_to_orthanc_toml(tmp_path, pacs, listen_port, retention_days=0)
    config = load_config(cfg)
    with open_outbox(config) as outbox:
        study_uid = str(enqueue_recording(outbox, make_recording(1), config, key="ecg").item.meta["study_uid"])
    data, log = config.data_dir, tmp_path / "forward.log"

    forward = start(cfg, "forward", log=log)
    try:
        wait_for(lambda: received.exists() or forward.poll() is not None, 60, what="the PACS receiving the ECG")
        assert forward.poll() is None, log.read_text(errors="replace")[-3000:]
        with write_locked(data / CLINIC_DB):
            locked.touch()  # the PACS stores it and answers; the recorder's write waits for clinic.db
            # committed and purged (retention_days 0): nothing is left for the next start's backfill
            wait_for(lambda: purged(data) or forward.poll() is not None, 30, what="the committed ECG purged")
            time.sleep(0.5)
            forward.send_signal(signal.SIGTERM)
            sigterm_at = time.monotonic()
            held_until = sigterm_at + HELD_AFTER_SIGTERM_S
            while forward.poll() is None and time.monotonic() < held_until:
                time.sleep(0.1)
            took = time.monotonic() - sigterm_at
        forward.wait(40)
        assert forward.returncode == 0, log.read_text(errors="replace")[-3000:]
    finally:
        stop(forward)
    journal = log.read_text(errors="replace")
    print(f"\nSIGTERM to exit, clinic.db locked {HELD_AFTER_SIGTERM_S:g} s after it: {took:.1f} s")
    assert took < STOP_WITHIN_S, journal[-3000:]  # prompt: it did not wait for the lock's holder
    assert not recorded(data, study_uid), journal[-3000:]  # the lock was held: the stop could not write it
    assert (data / UNWRITTEN_NAME).exists(), journal[-3000:]
    assert purged(data), journal[-3000:]

    again_log = tmp_path / "forward-again.log"
    forward = start(cfg, "forward", log=again_log)
    try:
        wait_for(lambda: recorded(data, study_uid) or forward.poll() is not None, 60, what="the next start's record")
        assert forward.poll() is None, again_log.read_text(errors="replace")[-3000:]
    finally:
        stop(forward)
    journal += again_log.read_text(errors="replace")
    assert recorded(data, study_uid), f"the sent-study record was dropped at the stop\n{journal[-3000:]}"
    assert not (data / UNWRITTEN_NAME).exists(), journal[-3000:]  # written: the side file removed
    assert "dropped" not in journal.lower(), journal[-3000:]
