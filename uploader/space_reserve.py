"""Disk space held back so that a full data partition can still drain.

Sending and purging write too: every state change appends pages to SQLite's WAL, and a
checkpoint that truncates the WAL gives the space back only afterwards. On a partition filled
to the last block (by logs, another program, a stick imported past the limit) those writes fail
with "database or disk is full" - and the forwarder, the one thing that frees space, stops.

So the outbox keeps a file of a few MB (`reserve.space`, allocated with fallocate: no data is
written) while there is room, and deletes it the first time a write other than adding a new
item fails for lack of space. That gives the forwarder room to mark items sent, committed and
purged; purging frees far more than the reserve (payload files) and the reserve is taken again
once the partition has room to spare. New items never use it: intake refuses before it would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path

from uploader.payload_files import is_no_space
from uploader.whole_file import fsync_dir

log = logging.getLogger(__name__)

RESERVE_NAME = "reserve.space"
DEFAULT_RESERVE_BYTES = 16 * 2**20  # measured: sending and purging 100 items writes ~1-3 MB of WAL


class SpaceReserve:
    """The reserve file `RESERVE_NAME` in `directory`, of `size` bytes (0: no reserve)."""

    def __init__(self, directory: Path, size: int) -> None:
        self.path = directory / RESERVE_NAME
        self.size = max(0, int(size))

    @property
    def present(self) -> bool:
        return self.path.exists()

    def ensure(self, free_bytes: int, keep_free: int) -> bool:
        """Take the reserve if it is missing and `free_bytes` minus the reserve leaves at least
        `keep_free`. Returns whether the reserve is there afterwards."""
        if self.size == 0:
            return False
        if self.present:
            return True
        if free_bytes - self.size < keep_free:
            return False
        tmp = self.path.with_name(f".{RESERVE_NAME}.{uuid.uuid4().hex}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # blocks allocated, nothing written
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)  # another process taking it at the same time: one file stays
            fsync_dir(self.path.parent)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if is_no_space(exc):
                return False
            log.warning("cannot set aside %d bytes of reserve space in %s: %s", self.size, self.path.parent, exc)
            return False
        log.info("set aside %.1f MB of reserve space for draining a full disk", self.size / 2**20)
        return True

    def release(self) -> bool:
        """Delete the reserve to make room; False if there was none to delete (or this outbox
        was opened without one: it leaves the others' reserve alone)."""
        if self.size == 0:
            return False
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("cannot delete the reserve space file %s: %s", self.path, exc)
            return False
        log.warning(
            "the data partition is full: released %.1f MB of reserve space so sending and purging can go on",
            self.size / 2**20,
        )
        return True

    def remove_leftovers(self) -> None:
        """Temporary files of a reserve whose creation was interrupted."""
        for leftover in self.path.parent.glob(f".{RESERVE_NAME}.*"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
