"""Payload files of the outbox: written durably, found orphaned, removed.

A payload is written as: temporary file (O_EXCL, mode 0600) -> write -> fsync -> atomic rename
to its final name -> fsync of the directory. Only then does the outbox commit the row naming it,
so a crash leaves at worst a file without a row (an orphan), never a row without its file.

Orphans are removed at open by `remove_orphans`. Another process may be between "file renamed"
and "row committed" at that moment, so writers hold a *shared* flock on `payloads/.lock` for that
whole span and the sweep takes it *exclusively*: the sweep sees each file either with its
committed row or truly orphaned.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from uploader.errors import OutboxFullError
from uploader.unwritten_records import UnwrittenRecords, pending_in
from uploader.whole_file import fsync_dir

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
SUFFIX = ".bin"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


class PayloadFiles:
    """The `payloads/` directory of one outbox."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_path = root / LOCK_NAME

    def path(self, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"not a payload file name: {name!r}")
        return self.root / name

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold while a file is written and until its row is committed (shared with other writers)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def write(self, data: bytes) -> str:
        """Write `data` durably under a new unique name and return the name.

        Out of space (ENOSPC/EDQUOT) becomes OutboxFullError with nothing left behind.
        """
        name = uuid.uuid4().hex + SUFFIX
        tmp = self.root / (TMP_PREFIX + uuid.uuid4().hex)
        final = self.root / name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            fsync_dir(self.root)
        except BaseException as exc:
            for leftover in (tmp, final):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            if isinstance(exc, OSError) and is_no_space(exc):
                raise OutboxFullError(
                    f"the data partition is full: could not write a {len(data)} byte payload "
                    f"into {self.root} ({os.strerror(exc.errno or 0)}); nothing was stored"
                ) from exc
            raise
        return name

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def delete(self, name: str) -> bool:
        try:
            self.path(name).unlink()
            return True
        except FileNotFoundError:
            return False

    def names(self) -> set[str]:
        """Every file but the lock (including temporary files of interrupted writes)."""
        with os.scandir(self.root) as entries:
            return {e.name for e in entries if e.name != LOCK_NAME and e.is_file(follow_symlinks=False)}

    def remove_orphans(self, referenced: Callable[[], set[str]], *, wait_s: float = 10.0) -> list[str]:
        """Delete files no row refers to; `referenced()` is read while writers are held off.

        Gives up (returns []) if writers keep the lock longer than `wait_s`: the next open retries.
        """
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        log.warning("payload orphan sweep skipped: writers held %s for %.0f s", self._lock_path, wait_s)
                        return []
                    time.sleep(0.02)
            orphans = sorted(self.names() - referenced())
            for name in orphans:
                with contextlib.suppress(FileNotFoundError):
                    (self.root / name).unlink()
            if orphans:
                fsync_dir(self.root)
                log.warning("removed %d orphaned payload file(s) left by an interrupted write or purge", len(orphans))
            return orphans
        finally:
            os.close(fd)


_LEFT_PREFIX = "left-claims-"  # + owner token: it closed leaving claims (OwnerLock.leave_claims)
_LEFT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
# + owner token: ids of items its peer stored that it has not recorded as sent (OwnerLock.keep_stored)
STORED_PREFIX = "stored-"
STORED_WHAT = "ids of items the peer stored that the last stop could not record as sent"
STORED_LOST = "the items of the lines not readable may be sent again (the peer keeps one copy of each)"


# how an item of the note is to be recorded (`keep_stored`): a bare id is an older version's line
TAKEN, SENT = "taken", "sent"


def _stored_item(line: str) -> tuple[int, bool | None]:
    item_id, _, how = line.strip().partition(" ")
    if not item_id.isdigit() or how not in ("", TAKEN, SENT):
        raise ValueError(f"not an outbox item of the note of the stored: {line[:40]!r}")
    return int(item_id), (how == TAKEN) if how else None


PROC_LOCKS = Path("/proc/locks")


class OwnerLock:
    """Liveness of an outbox owner: held (flock) for as long as that Outbox is open.

    Items in `sending` name the owner that claimed them. When that owner's lock can be taken,
    its process died (the kernel dropped the flock) or it closed: its claims are interrupted.
    """

    def __init__(self, locks_dir: Path, token: str) -> None:
        self.token = token
        self.path = locks_dir / f"owner-{token}.lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._stored = self.stored_file(locks_dir, token)  # its own note (`keep_stored`)

    def leave_claims(self) -> None:
        """Closing with claims the owner could not give back (another process held the database's
        write lock): a mark beside its lock says so, for the next open to give them back as this
        owner would have - a process that died mid-send leaves none. Not fsynced: a power cut
        that loses it is a new boot, whose recovery gives the attempt back anyway."""
        if self._fd is not None:
            os.close(os.open(self._left_path(self.path.parent, self.token), _LEFT_FLAGS, 0o600))

    @staticmethod
    def left_claims(locks_dir: Path, token: str) -> bool:
        """Whether the owner closed leaving claims it could not give back (`leave_claims`)."""
        return OwnerLock._left_path(locks_dir, token).exists()

    @staticmethod
    def forget_left_claims(locks_dir: Path, token: str) -> None:
        OwnerLock._left_path(locks_dir, token).unlink(missing_ok=True)

    @staticmethod
    def tokens_that_left_claims(locks_dir: Path) -> list[str]:
        return [p.name[len(_LEFT_PREFIX) :] for p in locks_dir.glob(f"{_LEFT_PREFIX}*")]

    @staticmethod
    def _left_path(locks_dir: Path, token: str) -> Path:
        return locks_dir / f"{_LEFT_PREFIX}{token}"

    def keep_stored(self, items: Mapping[int, bool]) -> None:
        """The items the peer stored that this owner has not recorded as sent yet (by id: whether
        its caller records it taken, `Outbox.mark_taken`, rather than sent), in a file beside its
        lock, written whole and fsynced (`UnwrittenRecords`): it outlives a stop, a kill and a
        power cut, and the next open records them rather than sending them again. None: the file
        goes. OSError (a full disk): the file it would have replaced stays."""
        lines = [f"{int(i)} {TAKEN if taken else SENT}" for i, taken in sorted(items.items())]
        self._stored.replace(lines)

    @staticmethod
    def stored_by(note: UnwrittenRecords) -> dict[int, bool | None]:
        """What `keep_stored` kept in `note` (`stored_file`), by id: taken or not (None: an older
        version's line, which did not say). None kept: no file. A line that is no item is skipped,
        and the file set aside (said): the others are still recorded. The caller forgets the same
        `note` once it has recorded them (on a full disk that is when the damaged file is set aside)."""
        return dict(note.take(_stored_item, STORED_LOST).records)

    @staticmethod
    def tokens_that_stored(locks_dir: Path) -> list[str]:
        return [p.name[len(STORED_PREFIX) :] for p in pending_in(locks_dir, STORED_PREFIX)]

    @staticmethod
    def stored_file(locks_dir: Path, token: str) -> UnwrittenRecords:
        """The file of what `token`'s peer stored that it has not recorded as sent (`keep_stored`)."""
        return UnwrittenRecords(locks_dir / f"{STORED_PREFIX}{token}", what=STORED_WHAT, family=STORED_PREFIX)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    @staticmethod
    def token_of(path: Path) -> str | None:
        name = path.name
        if name.startswith("owner-") and name.endswith(".lock"):
            return name[len("owner-") : -len(".lock")]
        return None

    @staticmethod
    def seen_held(locks_dir: Path, token: str, *, device_is_stats: bool, proc_locks: Path = PROC_LOCKS) -> bool:
        """Whether someone holds the owner's lock, only looked at (`lastmile doctor`): never taken
        nor its file removed - an outbox opening at that moment would find a dead owner's lock
        taken (alive) and skip its note of what the county stored, then send those again. flock
        locks are not seen by fcntl's F_GETLK; /proc/locks lists them by device and inode: both
        must agree (an inode number alone is shared by a lock on another filesystem, a tmpfs /run),
        but where /proc/locks does not name `locks_dir`'s locks by the device stat gives
        (`device_is_stats` False: overlayfs, or a filesystem not found - the caller reads the
        mounts, lastmile.doctor.locks_named_by_stats_device) the inode number alone is taken.
        OSError: not known."""
        try:
            lock = (locks_dir / f"owner-{token}.lock").stat()
        except FileNotFoundError:
            return False
        device = (os.major(lock.st_dev), os.minor(lock.st_dev))
        inode_elsewhere = False
        for line in proc_locks.read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5637086 0 EOF" (major:minor in hex); a waiter's
            # line has "->" after its id
            if len(fields) < 6 or fields[1] != "FLOCK":
                continue
            major, _, rest = fields[5].partition(":")
            minor, _, inode = rest.partition(":")
            if inode != str(lock.st_ino):
                continue
            try:
                if (int(major, 16), int(minor, 16)) == device:
                    return True
            except ValueError:
                pass
            inode_elsewhere = True
        return inode_elsewhere and not device_is_stats

    @staticmethod
    def is_alive(locks_dir: Path, token: str) -> bool:
        """False when nobody holds the owner's lock (and then the stale lock file is removed)."""
        path = locks_dir / f"owner-{token}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return False
        finally:
            os.close(fd)
