"""An object the PACS stored whose "sent" the forward service could not record before a stop is not
sent again by the next start.

The real `lastmile forward` process, Orthanc as the reading center (with storage commitment; its
Lua filter waits for the test before it stores the object and answers), and a second connection
holding the outbox's write lock from the moment Orthanc has the object, through its response,
until the service has stopped: `mark_sent`
waits for the lock, SIGTERM comes, the stop gives the wait up, the settle after the fault and the
close find the lock held too. The claim was left behind and the next start gave it back to the
queue: the ECG went to the reading center a second time (a second storage-commitment round on a
PACS that has one). Now the stored-not-recorded fact is kept in an fsynced file beside the owner's
lock (uploader/payload_files.py `OwnerLock.keep_stored`), and the next open records it as sent
first (uploader/outbox.py `recover_interrupted`).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lastmile.config import load_config
from lastmile.data_dir import open_outbox
from lastmile.ecg.intake import enqueue_recording
from tests.ecg_factories import make_recording
from tests.peers import OrthancServer, c_store_held_for_the_test, forward_to_orthanc_toml, free_port, gateway_modality
from tests.service_harness import log_tail, run_until, service_running, sigterm_and_wait, write_locked
from tests.waiting import wait_for
from uploader.outbox import DB_NAME

GATEWAY_AE = "CLINIC01"


def item_state(data_dir: Path, key: str) -> tuple[str, int] | None:
    """(state, attempts) of the outbox item `key`, read as another process would."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=30)) as conn:
        row = conn.execute("SELECT state, attempts FROM items WHERE key = ?", (key,)).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def committed(data_dir: Path) -> bool:
    """The ECG committed by the PACS (then purged: no retention configured), sent once: one attempt."""
    return item_state(data_dir, "ecg") in (("committed", 1), ("purged", 1))


@pytest.mark.orthanc
def test_an_ecg_the_pacs_stored_is_not_sent_again_after_a_stop_that_could_not_record_it(
    tmp_path: Path, orthanc_factory: Callable[..., OrthancServer]
) -> None:
    received, locked = tmp_path / "received", tmp_path / "locked"
    # Orthanc waits for the test's lock before it stores the ECG and answers
    hook = c_store_held_for_the_test(tmp_path / "wait-for-the-lock.lua", received, locked)
    listen_port = free_port()
    pacs = orthanc_factory(modalities=gateway_modality(GATEWAY_AE, listen_port), extra={"LuaScripts": [str(hook)]})
    cfg = forward_to_orthanc_toml(tmp_path, pacs, listen_port)
    config = load_config(cfg)
    with open_outbox(config) as outbox:
        uid = enqueue_recording(outbox, make_recording(1), config, key="ecg").item.meta["sop_instance_uid"]
    data, log = config.data_dir, tmp_path / "forward.log"

    with service_running(cfg, "forward", log=log) as first:
        wait_for(lambda: received.exists() or first.poll() is not None, 60, what="the PACS receiving the ECG")
        assert first.poll() is None, log_tail(log)
        with write_locked(data / DB_NAME):  # another process: acquire storing a reading, `lastmile patient` ...
            locked.touch()  # the PACS stores it and answers "stored"; the service's mark_sent waits for the lock
            time.sleep(1.5)
            assert sigterm_and_wait(first) == 0, log_tail(log)
    assert pacs.c_stores()[uid] == 1
    after_stop = item_state(data, "ecg")
    assert after_stop is not None and after_stop[0] == "sending", after_stop  # its claim left to the next start

    # committed: recorded as sent at open, then its commitment asked once (the old code: after it
    # was sent again); then rounds of the new process: nothing more goes
    run_until(cfg, "forward", log=log, until=lambda: committed(data), what="ECG committed", timeout=90, then_s=1.0)
    journal = log.read_text(errors="replace")
    assert committed(data), (item_state(data, "ecg"), journal[-3000:])
    assert pacs.c_stores()[uid] == 1, f"sent again at the next start: {pacs.c_stores()}\n{journal[-3000:]}"
    assert "recorded as sent, not sent again" in journal, journal[-3000:]
    assert not list((data / "locks").glob("stored-*")), "the note of the stored ECG outlived its use"
