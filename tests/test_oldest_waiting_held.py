"""The "oldest waiting" ages say how long something has waited for the LINK: an ECG held for the
doctor (no patient yet, another patient's, a re-record verdict) waits for him, not for the link.

One ECG held for the doctor since 3 h ago and one waiting for the link since 10 min ago: the
metrics the county alerts on (lastmile_queue_oldest_waiting_seconds / _stuck_seconds), `lastmile
doctor`'s queue line and `lastmile queue`'s "oldest waiting" line (also read from the file on a
full disk) said 3 h - a false "link stuck" at the county - and now say 10 min. The held ECG keeps
its own count (lastmile_queue_held_items, "held for the doctor")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from lastmile.config import Config
from lastmile.doctor import Level
from lastmile.ecg.holds import QUALITY_HOLD, UNASSIGNED_HOLD
from lastmile.services.metrics import GatewayCollector, make_registry
from tests.conftest import REPO, missing, run_on_private_tmpfs
from tests.metrics_harness import parse_exposition, tool, value
from tests.service_harness import doctor
from uploader.outbox import Hold, Kind, Outbox

HOUR = 3600.0


def held_and_waiting(outbox: Outbox, now: float) -> None:
    """An ECG with no patient held for the doctor (queued 3 h ago, held another hour) and an ECG
    waiting for the link since 10 min ago."""
    outbox.add(Kind.DICOM, "held", b"h" * 100, now=now - 3 * HOUR, hold=Hold(UNASSIGNED_HOLD, now + HOUR))
    outbox.add(Kind.DICOM, "waiting", b"w" * 100, now=now - 600)


def queued_in(data_dir: Path, now: float) -> None:
    with Outbox.open(data_dir, now=now - 3 * HOUR) as outbox:
        held_and_waiting(outbox, now)


def about_ten_minutes(said: str, stdout: str) -> None:
    """`said` (a number of minutes, as the command printed it) is the 10 min ECG's wait, read a
    little later (the command's start, under load): not the held one's 180 min."""
    minutes = re.search(rf"{said} (\d+\.\d) min", stdout)
    assert minutes is not None and 10.0 <= float(minutes[1]) < 20.0, stdout


def lastmile(config_file: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "lastmile", "-c", str(config_file), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    return done.stdout


def config_file(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "lastmile.toml"
    path.write_text(f'[gateway]\ndata_dir = "{data_dir}"\n[outbox]\nmin_free_mb = 0\n[reports]\nsource = "off"\n')
    return path


def test_the_metrics_ages_leave_out_an_ecg_held_for_the_doctor(tmp_path: Path) -> None:
    now = time.time()
    queued_in(tmp_path, now)
    config = Config()
    config.set_data_dir(tmp_path)
    collector = GatewayCollector(config, run=tool({}), clock=lambda: now)
    samples = parse_exposition(generate_latest(make_registry(collector)).decode("utf-8"))
    assert value(samples, "lastmile_queue_oldest_waiting_seconds", kind="dicom") == 600.0
    assert value(samples, "lastmile_queue_oldest_stuck_seconds", kind="dicom") == 600.0
    assert value(samples, "lastmile_queue_held_items", kind="dicom", reason=UNASSIGNED_HOLD) == 1


def test_lastmile_doctor_says_how_long_the_oldest_has_waited_for_the_link(tmp_path: Path) -> None:
    queued_in(tmp_path / "data", time.time())
    stdout = lastmile(config_file(tmp_path, tmp_path / "data"), "doctor", "--offline")
    [line] = [line for line in stdout.splitlines() if "1 waiting, " in line]
    assert "1 more ECG(s) held for the doctor" in line, stdout
    about_ten_minutes("oldest waiting", line)


def test_lastmile_queue_says_how_long_the_oldest_has_waited_for_the_link(tmp_path: Path) -> None:
    queued_in(tmp_path / "data", time.time())
    stdout = lastmile(config_file(tmp_path, tmp_path / "data"), "queue")
    assert "queued 2 (1 held for the doctor)" in stdout, stdout
    about_ten_minutes("oldest waiting:", stdout)


# Runs inside `unshare -m` with a 1 MB tmpfs on argv[1]: the two ECGs, the outbox closed, the
# partition filled to its last block: `lastmile queue` reads the file on disk (snapshot_stats).
FULL_DISK_SCRIPT = r"""
import subprocess, sys, time
from pathlib import Path
from lastmile.config import load_config
from lastmile.data_dir import DataPartitionFullError, open_outbox
from tests.conftest import fill_to_the_last_block
from tests.test_oldest_waiting_held import held_and_waiting

mnt, cfg_file = Path(sys.argv[1]), sys.argv[2]
config = load_config(cfg_file)  # min_free_mb = 0: the ECGs are stored, then the partition fills
with open_outbox(config) as outbox:
    held_and_waiting(outbox, time.time())
fill_to_the_last_block(mnt / "filler")
try:
    open_outbox(config).close()
    print("the outbox opened: the partition is not full")
except DataPartitionFullError:
    print(subprocess.run([sys.executable, "-m", "lastmile", "-c", cfg_file, "queue"], capture_output=True, text=True).stdout)
"""


def test_lastmile_queue_on_a_full_disk_says_how_long_the_oldest_has_waited_for_the_link(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        missing("mounting a private tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run_on_private_tmpfs(mnt, "1m", FULL_DISK_SCRIPT, str(config_file(tmp_path, mnt / "data")))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "queued 2 (1 held for the doctor)" in done.stdout, done.stdout
    about_ten_minutes("oldest waiting:", done.stdout)


# -- the link's level in `lastmile doctor` (WARN: "is the link down?", FAIL: "nothing has gone out") --

DAY = 24 * HOUR


def link_levels(data_dir: Path, now: float) -> list[tuple[Level, str]]:
    """`lastmile doctor`'s queue row about the link (topic "link"): its level and message."""
    return [(f.level, f.message) for f in doctor(data_dir, now=lambda: now).check_queue() if f.topic == "link"]


@pytest.mark.parametrize(("age", "level"), [(2 * DAY, Level.WARN), (8 * DAY, Level.FAIL)])
def test_an_ecg_held_for_the_doctor_alone_does_not_say_the_link_is_down(
    tmp_path: Path, age: float, level: Level
) -> None:
    """lastmile/doctor.py _read_outbox judged the link on the oldest item waiting, held for the
    doctor or not: one ECG the quality gate holds for him (queued `age` ago, nothing else waiting)
    made the doctor say "items wait for more than a day: is the link down?" (WARN) or "nothing
    has gone out for a week" (FAIL) of a link that is fine. Now OK; a routine item as old waiting
    for the link still gives that level."""
    now = time.time()
    with Outbox.open(tmp_path, min_free_bytes=0, now=now - age) as outbox:
        outbox.add(Kind.DICOM, "held", b"h" * 100, now=now - age, hold=Hold(QUALITY_HOLD, now + HOUR))
    [(found, message)] = link_levels(tmp_path, now)
    assert found is Level.OK, message
    assert "0 waiting" in message and "1 more ECG(s) held for the doctor" in message, message

    with Outbox.open(tmp_path, min_free_bytes=0, now=now - age) as outbox:
        outbox.add(Kind.DICOM, "routine", b"r" * 100, now=now - age)
    [(found, message)] = link_levels(tmp_path, now)
    assert found is level, message
    assert "1 waiting" in message and "1 more ECG(s) held for the doctor" in message, message
