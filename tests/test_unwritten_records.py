"""uploader.unwritten_records: the one file kind in which a stop leaves what it could not write for
the next start (the outbox's stored ids, the sent-study records, the serial rows behind)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uploader.unwritten_records import KEEP_ASIDE, UnwrittenRecords, pending_in, set_aside_in

REPO = Path(__file__).resolve().parent.parent


def test_records_are_replaced_whole_read_a_line_each_and_forgotten(tmp_path: Path) -> None:
    records = UnwrittenRecords(tmp_path / "things.jsonl", what="things the last stop saved")
    assert records.take(json.loads).records == [] and not records.exists()
    records.replace([json.dumps({"n": 1}), json.dumps({"n": 2})])
    records.replace([json.dumps({"n": 3})])  # replaces, never appends
    assert records.take(json.loads).records == [{"n": 3}] and records.lines() == ['{"n": 3}']
    assert (records.path.stat().st_mode & 0o777) == 0o600  # patient names: the service's user only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["things.jsonl"]  # no temporary file left
    records.replace([])  # nothing waits: no file
    assert not records.exists()
    records.forget()  # twice: no error
    with pytest.raises(ValueError):
        records.replace(["two\nlines"])


def test_one_damaged_line_does_not_take_the_others_and_the_file_is_set_aside_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "things.jsonl"
    path.write_bytes(b'{"n": 1}\n\xff\xfe{"n"\n{"n": 2}\n')
    records = UnwrittenRecords(path, what="things the last stop saved")
    with caplog.at_level(logging.ERROR):
        taken = records.take(json.loads, "the things of the lines not readable are lost")
    assert taken.records == [{"n": 1}, {"n": 2}] and taken.damaged == 1
    assert taken.set_aside_as is not None
    assert set_aside_in(tmp_path, path.name) == [taken.set_aside_as]
    assert taken.set_aside_as.read_bytes() == b'{"n": 1}\n\xff\xfe{"n"\n{"n": 2}\n'  # kept as it was, for a look
    # the file keeps its readable records until the caller has written them and forgets it
    assert path.read_bytes() == b'{"n": 1}\n{"n": 2}\n' and pending_in(tmp_path, path.name) == [path]
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("damaged" in m and str(taken.set_aside_as) in m and "lines not readable are lost" in m for m in said), (
        said
    )


def test_only_the_newest_damaged_copies_are_kept_an_sd_card_never_fills_with_them(tmp_path: Path) -> None:
    """A damaged side file set aside at each of many starts (years of them): each copy stayed, and
    the SD card filled. Now only the newest KEEP_ASIDE of a family stay - of one owner's file or
    of many (the outbox's files are one per owner)."""
    for n in range(KEEP_ASIDE + 4):
        records = UnwrittenRecords(tmp_path / f"stored-{n}", what="ids", family="stored-")
        records.path.write_text(f"{n}\nnot an id\n")
        records.take(int)
    kept = set_aside_in(tmp_path, "stored-")
    assert len(kept) == KEEP_ASIDE, kept
    assert [p.name.split(".")[0] for p in kept] == [f"stored-{n}" for n in range(KEEP_ASIDE + 3, 3, -1)]
    # a set-aside copy is no file waiting for a start (each file keeps its readable line)
    assert pending_in(tmp_path, "stored-") == [tmp_path / f"stored-{n}" for n in range(KEEP_ASIDE + 4)]

    one = UnwrittenRecords(tmp_path / "one.jsonl", what="things")  # many in one second: all distinct
    for _ in range(KEEP_ASIDE + 2):
        one.path.write_text("{\n")
        one.take(json.loads)
    assert len(set_aside_in(tmp_path, "one.jsonl")) == KEEP_ASIDE
    assert len(set_aside_in(tmp_path, "stored-")) == KEEP_ASIDE  # another family's cap is its own


def test_an_unreadable_file_is_set_aside_never_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "things.jsonl"
    path.mkdir()  # reading it fails (IsADirectoryError), as an I/O error on a worn card would
    taken = UnwrittenRecords(path, what="things").take(json.loads)
    assert taken.records == [] and taken.damaged == 1 and taken.set_aside_as is not None
    assert not path.exists()


# The start of each script below, run inside `unshare -m` with a 64 KB tmpfs on argv[1] (`d`).
ON_A_TMPFS = """
import errno, os, sys
from pathlib import Path
from uploader.unwritten_records import UnwrittenRecords, pending_in, set_aside_in
d = Path(sys.argv[1])


def fill_the_disk():
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 512)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    os.close(fd)


def damaged_on_a_full_disk(name, damaged):
    (d / name).write_bytes(damaged)
    fill_the_disk()
    return damaged
"""

# A copy written, the disk filled, a bigger copy refused: the old copy whole, no temporary file left.
TMPFS_SCRIPT = """
records = UnwrittenRecords(d / "things.jsonl", what="things")
records.replace(["old"])
fill_the_disk()
try:
    records.replace(["new" * 4096] * 8)
except OSError as exc:
    assert exc.errno == errno.ENOSPC, exc
else:
    raise SystemExit("the bigger copy was written on a full disk")
assert records.lines() == ["old"], records.lines()
assert sorted(p.name for p in d.iterdir()) == ["filler", "things.jsonl"], list(d.iterdir())
print("ok")
"""


def passes_on_a_full_tmpfs(tmp_path: Path, script: str) -> None:
    """`script` (after ON_A_TMPFS) run by this Python inside `unshare -m` with a private 64 KB
    tmpfs as its argv[1] passes its checks (the test is skipped, said, where one cannot be mounted)."""
    from tests.conftest import missing

    if os.geteuid() != 0 or not shutil.which("unshare"):
        missing("needs root and unshare to mount a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = 'mount -t tmpfs -o size=64k tmpfs "$1" && shift && exec "$@"'
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh", str(mnt)]
    proc = subprocess.run(
        [*cmd, sys.executable, "-c", ON_A_TMPFS + script, str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if proc.returncode != 0 and "mount" in proc.stderr and "permission" in proc.stderr.lower():
        missing(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_a_full_disk_leaves_the_old_copy_on_a_real_tmpfs(tmp_path: Path) -> None:
    passes_on_a_full_tmpfs(tmp_path, TMPFS_SCRIPT)


# A damaged file on a full disk, whose copy cannot be written.
FULL_DISK_DAMAGED_SCRIPT = """
damaged = damaged_on_a_full_disk("things.jsonl", b"1\\n\\x00garbage\\n2\\n")
records = UnwrittenRecords(d / "things.jsonl", what="things")
taken = records.take(int)
assert taken.records == [1, 2] and taken.damaged == 1, taken
records.forget()  # the start wrote them
aside = set_aside_in(d, "things.jsonl")
assert taken.set_aside_as is not None and aside == [taken.set_aside_as], (taken, list(d.iterdir()))
assert aside[0].read_bytes() == damaged
assert pending_in(d, "things.jsonl") == []
print("ok")
"""


def test_a_damaged_file_on_a_full_disk_is_moved_aside_when_it_cannot_be_copied(tmp_path: Path) -> None:
    """REV-E 3: copying a damaged file aside needs space; on a full SD card the copy failed, the
    file was left as it was, and the caller forgot it once its readable records were written: the
    damaged bytes went unnamed (the doctor never told). Now it is moved aside (no space needed)."""
    passes_on_a_full_tmpfs(tmp_path, FULL_DISK_DAMAGED_SCRIPT)


# As FULL_DISK_DAMAGED_SCRIPT, with a start that fails before writing the readable records.
FULL_DISK_FAILED_START_SCRIPT = """
damaged = damaged_on_a_full_disk("stored-tok", b"11\\n\\x00garbage\\n12\\n")
first = UnwrittenRecords(d / "stored-tok", what="ids", family="stored-").take(int)
assert first.records == [11, 12] and first.damaged == 1, first
# the start dies here (its commit refused on the full disk, or a power cut): the next start
assert pending_in(d, "stored-") == [d / "stored-tok"], list(d.iterdir())
note = UnwrittenRecords(d / "stored-tok", what="ids", family="stored-")  # the next start's: one to its forget
again = note.take(int)
assert again.records == [11, 12], again
note.forget()  # written now: as the outbox does
assert pending_in(d, "stored-") == [], list(d.iterdir())
aside = set_aside_in(d, "stored-")
assert aside == [again.set_aside_as] and aside[0].read_bytes() == damaged, (again, list(d.iterdir()))
print("ok")
"""


def test_a_damaged_file_on_a_full_disk_is_read_again_by_a_start_after_one_that_failed(tmp_path: Path) -> None:
    """REV-F 1: on a full SD card a damaged file was moved aside and the rewrite of its readable
    lines failed: they lived in the set-aside copy only, which no start reads (`pending_in`), so a
    start that failed before writing them lost them (the outbox sent the county's stored studies
    again). Now the file is renamed back (no space needed) and set aside only by `forget()`."""
    passes_on_a_full_tmpfs(tmp_path, FULL_DISK_FAILED_START_SCRIPT)


def test_set_aside_copies_are_named_newest_first_by_their_time(tmp_path: Path) -> None:
    """An older version's copies (`.damaged-<unix seconds>`) count with today's (UTC time)."""
    now = int(time.time())
    today = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now - 2))
    for stamp in (f"{now - 5}", f"{today}.000001Z", f"{today}.000001Z-1", f"{now - 100}", str(now)):
        (tmp_path / f"a.jsonl.damaged-{stamp}").write_text("x")
    assert [p.name for p in set_aside_in(tmp_path, "a.jsonl")] == [
        f"a.jsonl.damaged-{now}",
        f"a.jsonl.damaged-{today}.000001Z-1",
        f"a.jsonl.damaged-{today}.000001Z",
        f"a.jsonl.damaged-{now - 5}",
        f"a.jsonl.damaged-{now - 100}",
    ]


def test_a_damaged_files_readable_records_stay_in_it_until_written_a_failed_start_reads_them_again(
    tmp_path: Path,
) -> None:
    """take() moved a damaged file aside at once: a start that then failed to write its readable
    records (clinic.db locked, a full disk) left them only in a set-aside copy no start reads, and
    they were forgotten (the outbox sent the county's stored items again). Now the damaged bytes
    are copied aside and the file keeps its readable lines until the caller forgets it."""
    path = tmp_path / "stored-dead"
    path.write_bytes(b"1\n\x00garbage\n2\n")
    records = UnwrittenRecords(path, what="ids", family="stored-")
    first = records.take(int)
    assert first.records == [1, 2] and first.damaged == 1 and first.set_aside_as is not None
    # the start fails here, before writing them: the next one reads them again, undamaged
    assert pending_in(tmp_path, "stored-") == [path]
    again = records.take(int)
    assert again.records == [1, 2] and again.damaged == 0 and again.set_aside_as is None
    records.forget()  # written now
    assert pending_in(tmp_path, "stored-") == [] and set_aside_in(tmp_path, "stored-") == [first.set_aside_as]

    path.write_bytes(b"\x00\x00\n")  # nothing readable: no file left waiting, its copy kept
    assert records.take(int).records == [] and not path.exists()
    assert len(set_aside_in(tmp_path, "stored-")) == 2


def test_the_copy_just_set_aside_is_kept_whatever_the_clock_said_of_the_older_ones(tmp_path: Path) -> None:
    """The cap ordered copies by the clock time in their names: with the clock behind at boot (no
    RTC, no NTP yet) and KEEP_ASIDE copies stamped later, the copy just made was removed at once
    and nobody could look at what the start found damaged. Now the copy just made always stays."""
    later = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() + 365 * 86400))
    ahead = [tmp_path / f"a.jsonl.damaged-{later}.00000{n}Z" for n in range(KEEP_ASIDE)]
    for copy in ahead:
        copy.write_text("x")
    records = UnwrittenRecords(tmp_path / "a.jsonl", what="things")
    records.path.write_text("{\n")
    taken = records.take(json.loads)
    assert taken.set_aside_as is not None and taken.set_aside_as.exists(), set_aside_in(tmp_path, "a.jsonl")
    kept = set_aside_in(tmp_path, "a.jsonl")
    assert len(kept) == KEEP_ASIDE and taken.set_aside_as in kept, kept
    assert ahead[0] not in kept  # the oldest of the others went instead


# The outbox's start, its owners' notes (locks/) on the full tmpfs, its database beside it.
OUTBOX_FULL_DISK_SCRIPT = """
import contextlib, sqlite3
from uploader.outbox import DB_NAME, Outbox
data = d.parent / "data"
data.mkdir()
(data / "locks").symlink_to(d)
with Outbox.open(data, min_free_bytes=0) as ob:
    ids = [ob.add("dicom", key, b"x" * 10).item.id for key in ("a", "b")]
dead = "0000-dead"  # a forwarder killed before recording what the county stored
damaged = f"{ids[0]} sent\\n\\x00garbage\\n{ids[1]} sent\\n".encode()
(d / f"stored-{dead}").write_bytes(damaged)
with contextlib.closing(sqlite3.connect(data / DB_NAME)) as conn, conn:
    conn.execute("UPDATE items SET state = 'sending', claimed_by = ?", (dead,))
fill_the_disk()
with Outbox.open(data, min_free_bytes=0) as ob:  # the start records them, then forgets the note
    states = sorted(item.state.value for item in ob.items())
assert states == ["sent", "sent"], states
assert pending_in(d, "stored-") == [], list(d.iterdir())
aside = set_aside_in(d, "stored-")
assert len(aside) == 1 and aside[0].read_bytes() == damaged, list(d.iterdir())
print("ok")
"""


def test_the_outbox_sets_a_dead_owners_damaged_note_aside_on_a_full_disk_once_it_recorded_its_ids(
    tmp_path: Path,
) -> None:
    """The outbox's start holds one note from its reading to its forgetting (uploader/outbox.py
    _record_stored_by_the_dead): on a full SD card, where the damaged note could be neither copied
    aside nor rewritten, its forgetting sets it aside - named for `lastmile doctor` - never deletes it."""
    passes_on_a_full_tmpfs(tmp_path, OUTBOX_FULL_DISK_SCRIPT)


# The serial service's start (SerialService.open) with its data directory on the full tmpfs: its
# databases, made by a first start on a disk with room, linked in (SQLite writes beside the target).
SERIAL_FULL_DISK_SCRIPT = """
import datetime as dt
from lastmile.services.serial_devices import SerialService
from lastmile.services.serial_spill import (
    CARDS_GIVEN_UP_NAME, ROWS_BEHIND_NAME, CardGivenUp, RowBehind, cards_given_up_file, rows_behind_file,
)
from tests.serial_gateway import serial_config
from uploader.outbox import Outbox
d.chmod(0o700)  # a data directory of its own (a tmpfs is made shared with every user)
room = d.parent / "room"
devices = [{"name": "desk-scanner", "match": str(room / "unplugged"), "profile": "scanner"}]
config = serial_config(room, devices)
with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
    SerialService.open(config, outbox=outbox, watch_dirs=None).close()
    made = sorted(p.name for p in Path(config.data_dir).iterdir())
    for name in made:
        (d / name).symlink_to(Path(config.data_dir) / name)
    # what a stop kept (by the stop's own writers), a line of each then torn on the SD card
    rows_behind_file(d).save([("serial:desk-scanner", RowBehind((1, 0), (1, 0), ""))])
    scanned_at = dt.datetime(2026, 12, 7, 18, 30, tzinfo=dt.timezone.utc)
    card = CardGivenUp("patient", "80276001234567890123", "desk-scanner", scanned_at, "gateway-receipt")
    cards_given_up_file(d).save([card])
    damaged = {}
    for name in (ROWS_BEHIND_NAME, CARDS_GIVEN_UP_NAME):
        with (d / name).open("ab") as f:
            f.write(b'{"address": "serial:desk\\n')
        damaged[name] = (d / name).read_bytes()
    fill_the_disk()
    config.gateway.data_dir = str(d)
    service = SerialService.open(config, outbox=outbox, watch_dirs=None)  # loads both, then forgets them
    try:
        said = service.ctx.registry.get("serial:desk-scanner")
    finally:
        service.close()
assert said is not None and said.card_word_id == card.word_id, said  # the readable card was read
for name, data in damaged.items():
    assert pending_in(d, name) == [], list(d.iterdir())
    aside = set_aside_in(d, name)  # renamed by the forget of the one that read it: never deleted
    assert len(aside) == 1 and aside[0].read_bytes() == data, (name, list(d.iterdir()))
print("ok")
"""


def test_the_serial_start_sets_its_damaged_files_aside_on_a_full_disk_once_it_has_read_them(tmp_path: Path) -> None:
    """REV-A 2: the serial service holds one file object each for the rows a stop gave up and the
    cards it gave up (SerialContext.rows_behind_file, cards_given_up_file) from its start's load to
    its forget: on a full SD card, where a damaged one could be neither copied aside nor rewritten,
    that forget sets it aside - named for `lastmile doctor` - never deletes it. A forget through
    another object (it does not know what the load found) deleted the damaged bytes unnamed."""
    passes_on_a_full_tmpfs(tmp_path, SERIAL_FULL_DISK_SCRIPT)


def test_a_damaged_file_that_cannot_be_copied_says_what_its_lost_lines_mean_at_once_and_forget_raises_if_stuck(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REV-DE 4: on a full disk the file stays in place; what its lost lines mean ("scan the card
    again") was said only at forget(), which a start on a full disk may never reach. And a rename
    that fails at forget() was swallowed: the caller believed the file gone while the next start
    would read its records again."""
    import errno

    import uploader.unwritten_records as module

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "things.jsonl"
    path.write_bytes(b'{"n": 1}\n\xff\xfe{"n"\n')
    records = UnwrittenRecords(path, what="things the last stop saved")
    monkeypatch.setattr(module, "replace_whole", full)
    with caplog.at_level(logging.ERROR):
        taken = records.take(json.loads, "scan the card again")
    assert taken.records == [{"n": 1}] and path.exists()
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("cannot be copied aside" in m and "scan the card again" in m for m in said), said

    def stuck(*_args: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(module.os, "replace", stuck)
    with pytest.raises(OSError, match="could not be set aside"):
        records.forget()
    assert path.exists()
