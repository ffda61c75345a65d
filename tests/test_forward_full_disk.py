"""The forward service on a full data partition with no reserve left (issue 10, item 3).

The reserve file (uploader/space_reserve.py) buys room for the first transactions on a full
disk; once it is spent - or was never set aside - SQLite answers "database or disk is full".
The forward service must then keep draining (sending and purging free space) and back off on
what it cannot write, with one clear log line and a fault the doctor sees in `lastmile queue`,
never exit. Tested on a real 16 MB tmpfs in a private mount namespace, the real `lastmile
forward` process and dcmtk's storescp as the reading center.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO, on_private_tmpfs, run_on_private_tmpfs
from tests.peers import forward_toml, free_port

# Runs inside `unshare -m` with a 16 MB tmpfs on argv[1]: queue ECGs until intake refuses, fill
# the partition to its last block, spend the reserve, then run the real forward service.
FULL_NO_RESERVE_SCRIPT = r"""
import errno, json, os, signal, subprocess, sys, time
from pathlib import Path
from lastmile.config import load_config
from lastmile.ecg.intake import enqueue_recording
from lastmile.data_dir import open_outbox
from tests.ecg_factories import make_recording
from tests.waiting import wait_for
from uploader.errors import OutboxFullError

mnt, cfg_file, log_file, marker = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
config = load_config(cfg_file)
data = config.data_dir
reserve = data / "reserve.space"
out = {"uids": []}

def drained(condition, what, limit_s):  # until condition(), or the service is gone (the test shows its journal)
    wait_for(lambda: condition() or service.poll() is not None, limit_s, what=f"{what}: {out}", interval=0.2)

def fill():
    fd = os.open(mnt / f"filler{len(list(mnt.glob('filler*')))}", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    os.close(fd)

def lastmile(*args):
    proc = subprocess.run([sys.executable, "-m", "lastmile", "-c", cfg_file, *args],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr

def counts():
    code, stdout, _ = lastmile("queue", "--json")
    return json.loads(stdout)["counts"] if code == 0 else {}

log = open(log_file, "wb")
# The link is down (no reading center yet) while the doctor records ECGs until intake refuses.
service = subprocess.Popen([sys.executable, "-m", "lastmile", "-c", cfg_file, "forward"], stdout=log, stderr=log)
try:
    with open_outbox(config) as intake:
        for i in range(1000):
            try:
                item = enqueue_recording(intake, make_recording(i, seconds=10.0 if i % 3 else 2.0), config, key=f"k{i}").item
            except OutboxFullError as exc:
                out["refused"] = str(exc)
                break
            out["uids"].append(item.meta["sop_instance_uid"])
        intake.checkpoint()  # the WAL is empty, as after any purge
    # Something fills the partition to its last block, the reserve is spent (an earlier
    # drain used it) and the room it gave back is taken too: SQLite cannot add a block.
    fill()
    # The service may have spent the reserve itself already (it does when it meets the full
    # partition): either way the gateway had one, and now it is gone.
    out["reserve_was_there"] = reserve.exists() or b"of reserve space" in Path(log_file).read_bytes()
    reserve.unlink(missing_ok=True)
    fill()
    st = os.statvfs(mnt)
    out["free_when_full"] = st.f_bavail * st.f_frsize
    time.sleep(8)  # the link is still down: retries record their failures until the WAL must grow
    out["queue_while_full"] = lastmile("queue")
    out["counts_while_full"] = counts()
    out["alive_while_full"] = service.poll() is None
    marker.write_text("link up")  # the test starts the reading center
    # A little room comes back (a log rotated): half the size of the spent reserve.
    with open(mnt / "filler0", "r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size - 512 * 1024)
    drained(lambda: counts().get("purged", 0) == len(out["uids"]), "everything sent and purged", 240)
    out["alive"] = service.poll() is None
    # and intake takes ECGs again, which go too
    with open_outbox(config) as intake:
        out["uids"].append(enqueue_recording(intake, make_recording(5000), config, key="after").item.meta["sop_instance_uid"])
    drained(lambda: counts().get("purged", 0) == len(out["uids"]), "the new ECG sent and purged", 120)
    out["counts"] = counts()
    out["queue_after"] = lastmile("queue")
finally:
    service.send_signal(signal.SIGTERM)
    out["exit"] = service.wait(60)
    log.close()
print(json.dumps(out))
"""


def test_forward_service_drains_a_full_disk_without_its_reserve(tmp_path: Path, storescp_factory) -> None:
    """Not one byte free and no reserve while the link is down: the service keeps running (no
    exit, no "step failed"), `lastmile queue` shows the full partition; when the link returns
    and half a reserve's worth of room with it, everything is sent and purged and intake takes
    ECGs again."""
    scp = storescp_factory(start=False)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = forward_toml(
        tmp_path / "lastmile.toml",
        mnt / "data",
        port=scp.port,
        called_ae=scp.ae_title,
        listen_port=free_port(),
        timeout_s=10.0,
        commitment=False,
        min_free_mb=2,
        reports="dicom",  # the default: the service polls for reports as a clinic's does
    )
    log = tmp_path / "forward.log"
    marker = tmp_path / "link-up"
    script = subprocess.Popen(
        on_private_tmpfs(mnt, "16m", FULL_NO_RESERVE_SCRIPT, str(cfg), str(log), str(marker)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and script.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if marker.exists():
        scp.start()
    stdout, stderr = script.communicate(timeout=400)
    journal = log.read_text(errors="replace") if log.exists() else ""
    assert script.returncode == 0, stderr[-3000:] + journal[-3000:]
    out = json.loads(stdout)
    print(f"\n{len(out['uids'])} ECGs; counts {out['counts']}; journal:\n{journal[-2500:]}")
    assert out["reserve_was_there"] and out["free_when_full"] < 4096 and "refused" in out
    # while full: the service runs, says why once, and the doctor's `lastmile queue` shows it
    assert out["alive_while_full"] and out["alive"] and out["exit"] == 0, journal[-3000:]
    code, stdout, stderr = out["queue_while_full"]
    assert code == 0, stderr
    assert "FAULT data partition full" in stdout and "New ECGs and readings are refused" in stdout, stdout
    while_full = out["counts_while_full"]
    assert while_full["queued"] + while_full["sending"] == len(out["uids"]) - 1, while_full  # link down
    assert "step failed" not in journal and "exiting" not in journal, journal[-3000:]
    # then: everything drained, nothing lost, nothing twice
    assert out["counts"]["purged"] == len(out["uids"]) and out["counts"]["quarantined"] == 0, out["counts"]
    received = scp.c_stores()
    assert set(received) == set(out["uids"]), received
    # nothing twice, but for a store whose answer was lost as the link came up (a retry the
    # forwarder reported in a round that also sent)
    again = sum(n - 1 for n in received.values())
    retried = sum(
        int(z) for x, z in re.findall(r"forward round: sent (\d+), committed \d+, retry (\d+)", journal) if x != "0"
    )
    assert again <= retried, (received, retried)
    assert "FAULT" not in out["queue_after"][1]


def test_a_step_that_finds_no_room_backs_off_and_says_so(tmp_path: Path, storescp_factory, caplog) -> None:
    """When even the WAL cannot be written (the disk full, the reserve and the WAL's room both
    spent), a step does not raise for the runtime's long backoff, nor exit: it logs one clear
    line, shows the fault in its status, retries within FULL_DISK_RETRY_MAX_S, puts back what a
    cut-short round left claimed, and drains to the real reading center once there is room."""
    import logging
    import sqlite3
    import threading

    from lastmile.config import Config
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from lastmile.services.forward import FULL_DISK_RETRY_MAX_S, ForwardService
    from tests.ecg_factories import make_recording
    from uploader.outbox import ItemState

    scp = storescp_factory()
    config = Config()
    config.gateway.data_dir = str(tmp_path / "data")
    rc = config.reading_center
    rc.host, rc.port, rc.called_ae, rc.calling_ae = "127.0.0.1", scp.port, scp.ae_title, "CLINIC01"
    rc.listen_port, rc.listen_host, rc.timeout_s = free_port(), "127.0.0.1", 10.0
    rc.storage_commitment, rc.no_commitment_policy = False, "purge"
    config.outbox.min_free_mb, config.ecg.re_record_hold_s, config.reports.source = 1, 0, "off"
    with open_outbox(config) as outbox:
        for i in range(4):
            enqueue_recording(outbox, make_recording(i), config, key=f"k{i}")

    service = ForwardService(config)
    stop = threading.Event()
    try:
        full = {"on": True}
        room_left = {"claim": 1, "begin_send": 1}  # room for a claim and one send; none to record it

        def on_a_full_disk(name: str):
            real = getattr(service.outbox, name)

            def write(*args, **kwargs):
                if full["on"] and room_left.get(name, 0) <= 0:
                    raise sqlite3.OperationalError("database or disk is full")
                room_left[name] = room_left.get(name, 0) - 1
                return real(*args, **kwargs)

            return write

        for name in ("claim", "begin_send", "mark_sent", "release", "release_claims", "mark_transient_failure"):
            setattr(service.outbox, name, on_a_full_disk(name))
        with caplog.at_level(logging.DEBUG, logger="lastmile.services.forward"):
            delays = [service.step(stop) for _ in range(6)]
        assert all(0 < d <= FULL_DISK_RETRY_MAX_S for d in delays) and delays == sorted(delays), delays
        assert "FAULT data partition full" in service.status_line()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "data partition full" in r.message]
        assert len(errors) == 1 and "nothing is lost" in errors[0].message
        full["on"] = False
        for _ in range(20):
            service.step(stop)
            counts = service.outbox.stats(0)["counts"]
            if counts["purged"] == 4:
                break
        assert counts["purged"] == 4 and counts["sending"] == 0, counts  # the cut-short claim put back
        assert "data partition has room again" in caplog.text
        assert all(i.state == ItemState.PURGED for i in service.outbox.items())
    finally:
        service.close()
    assert len(scp.c_stores()) == 4 and set(scp.c_stores().values()) == {1}  # nothing sent twice


def test_the_report_poller_survives_a_full_disk() -> None:
    """The report poller's thread used to die on "database or disk is full" and take the whole
    forward service with it (ReportService.check raised): now it logs and tries again."""
    import sqlite3
    import threading
    from typing import cast

    from lastmile.reports.poller import PollerThread, PollRound, ReportPoller

    rounds: list[str] = []
    done = threading.Event()

    class DiskFullFirst:
        def run_round(self) -> PollRound:
            if len(rounds) < 2:
                rounds.append("full")
                raise sqlite3.OperationalError("database or disk is full")
            rounds.append("ok")
            done.set()
            return PollRound()

        def next_due_in(self) -> float:
            return 0.01

    thread = PollerThread(cast(ReportPoller, DiskFullFirst()), idle_s=0.05)
    thread.start()
    try:
        assert done.wait(30), rounds
        assert thread.alive and thread.error is None
        assert rounds[:3] == ["full", "full", "ok"]
    finally:
        thread.stop()


# Runs inside `unshare -m` with a 1 MB tmpfs on argv[1]: one queued item, the outbox closed (its
# WAL and -shm gone), the partition filled: what a power cut on a full disk leaves behind.
CLOSED_ON_A_FULL_DISK_SCRIPT = r"""
import errno, json, os, signal, subprocess, sys, time
from pathlib import Path
from lastmile.config import load_config
from lastmile.data_dir import DataPartitionFullError, open_outbox

mnt, cfg_file, log_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
config = load_config(cfg_file)
with open_outbox(config) as outbox:
    outbox.add("dicom", "k1", b"\0" * 2000)
fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"\0" * 4096)
except OSError as exc:
    assert exc.errno == errno.ENOSPC
os.close(fd)
out = {}
try:
    open_outbox(config).close()
    out["open"] = "opened"
except DataPartitionFullError as exc:
    out["open"] = str(exc)
queue = subprocess.run([sys.executable, "-m", "lastmile", "-c", cfg_file, "queue"], capture_output=True, text=True)
out["queue"] = [queue.returncode, queue.stdout, queue.stderr]
with open(log_file, "wb") as log:
    service = subprocess.Popen([sys.executable, "-m", "lastmile", "-c", cfg_file, "forward"], stdout=log, stderr=log)
deadline = time.monotonic() + 60
while b"cannot start" not in Path(log_file).read_bytes() and time.monotonic() < deadline and service.poll() is None:
    time.sleep(0.2)
out["alive"] = service.poll() is None
service.send_signal(signal.SIGTERM)
out["exit"] = service.wait(60)
print(json.dumps(out))
"""


def test_a_closed_outbox_on_a_full_disk_says_so(tmp_path: Path) -> None:
    """No room even for SQLite's -shm: opening the outbox says the partition is full (not "disk
    I/O error"), `lastmile queue` still shows what is waiting and the fault, and the forward
    service waits with that line instead of exiting."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = tmp_path / "lastmile.toml"
    cfg.write_text(f'[gateway]\ndata_dir = "{mnt / "data"}"\n[outbox]\nmin_free_mb = 0\n[reports]\nsource = "off"\n')
    log = tmp_path / "forward.log"
    proc = run_on_private_tmpfs(mnt, "1m", CLOSED_ON_A_FULL_DISK_SCRIPT, str(cfg), str(log))
    journal = log.read_text(errors="replace") if log.exists() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + journal[-2000:]
    out = json.loads(proc.stdout)
    assert out["open"].startswith("the data partition is full (") and "nothing stored is lost" in out["open"]
    code, stdout, stderr = out["queue"]
    assert code == 0 and "queued 1" in stdout, stdout + stderr
    assert out["alive"] and out["exit"] == 0, journal
    assert "forward: cannot start: the data partition is full" in journal, journal
    assert "Traceback" not in journal
