"""The doctor's console on a full data partition: every click that writes says so, in Chinese.

clinic.db (check-in, the audit trail, acknowledgements) lives on the data partition with the
outbox; when something fills it to its last block, SQLite answers "database or disk is full".
The doctor must read that the storage is full and what to do - not "Internal Server Error" -
and the console must keep serving. Tested on a real 16 MB tmpfs in a private mount namespace
with the real console on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_on_private_tmpfs

# Runs inside `unshare -m` with a 16 MB tmpfs on argv[1].
CONSOLE_FULL_SCRIPT = r"""
import datetime as dt, json, os, sys
from pathlib import Path
from lastmile.clinic.observations import ObservationStore
from lastmile.data_dir import open_outbox
from lastmile.ecg.intake import enqueue_recording
from tests.ecg_factories import make_recording
from tests.fhir_samples import blood_pressure
from tests.conftest import fill_to_the_last_block
from tests.console_harness import VALID_ID, Client, console_config, running_console

mnt = Path(sys.argv[1])
out = {}
config = console_config(mnt / "data")
with running_console(config) as server:
    # a cuff's reading from before the session: held for the doctor to assign
    with open_outbox(config) as outbox:
        store = ObservationStore.open(config.data_dir, outbox=outbox, idle_timeout_s=900)
        measured = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
        held_id = store.record(blood_pressure(measured, None, "full:bp"), now=dt.datetime.now(dt.timezone.utc)).held_id
        store.close()
        # an ECG that named no patient: held for the doctor too
        ecg_id = enqueue_recording(outbox, make_recording(7, patient=None), config, key="full:ecg").item.id
    doctor = Client(server.url)
    doctor.login()
    out["before"] = doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status
    # below the outbox's floor (outbox.min_free_mb, here 1 MB): new items are refused, clinic.db still writes
    fill_to_the_last_block(mnt / "filler", leave=512 * 1024)
    reply = doctor.post("/today/assign-reading", {"held_id": str(held_id), "patient_id": VALID_ID, "name": "张三"})
    out["assign_full"] = [reply.status, reply.body[:2000]]
    reply = doctor.post("/today/assign-ecg", {"item_id": str(ecg_id), "patient_id": VALID_ID, "name": "张三"})
    out["assign_ecg_full"] = [reply.status, reply.location, reply.body[:2000]]
    # and to the last block: clinic.db cannot write either
    fill_to_the_last_block(mnt / "filler")
    reply = doctor.post("/today/check-in", {"patient_id": "110105198001010016", "name": "李四"})
    out["full"] = [reply.status, reply.body[:2000]]
    out["page_while_full"] = doctor.get("/today").status
    os.unlink(mnt / "filler")
    out["after"] = doctor.post("/today/check-in", {"patient_id": "110105198001010016", "name": "李四"}).status
print(json.dumps(out, ensure_ascii=False))
"""


def test_a_check_in_on_a_full_data_partition_says_storage_full_in_chinese(tmp_path: Path) -> None:
    """The partition fills (logs, a stick imported past the limit); the doctor checks in the
    next patient. She must be told, in Chinese, that the storage is full and nothing was
    recorded - not shown an English "Internal Server Error" - and the console goes on."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = run_on_private_tmpfs(mnt, "16m", CONSOLE_FULL_SCRIPT)
    assert script.returncode == 0, script.stderr[-3000:]
    out = json.loads(script.stdout.strip().splitlines()[-1])
    assert out["before"] == 303
    status, body = out["full"]
    assert status != 500, f"the doctor sees HTTP 500: {body[:300]!r}"
    assert status == 507 and "存储已满" in body, (status, body[:500])
    status, body = out["assign_full"]  # a held reading assigned: the outbox refuses it
    assert status == 507 and "存储已满" in body, (status, body[:500])
    # the held ECG: its rebuild (the console's DICOM worker) is refused - not "too late: it has
    # been sent already", which would leave the doctor believing it went
    status, location, body = out["assign_ecg_full"]
    assert "too-late" not in location, f"the doctor reads 'too late: sent already' ({location})"
    assert status == 507 and "存储已满" in body, (status, location, body[:500])
    assert out["page_while_full"] == 200 and out["after"] == 303, out
