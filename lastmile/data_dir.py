"""The gateway's state directory (`gateway.data_dir`) and the databases in it.

Every opener goes through `ensure_data_dir(path)` first: the outbox (`open_outbox`), clinic.db
and visits.db. It creates the directory 0700 when missing, refuses one that cannot be used
(a file, unwritable, read-only, shared like /tmp) with `DataDirError` — one line saying what
is wrong and what to do, never a traceback — and takes group/other permissions away from the
directory and from the entries Lastmile keeps in it, whatever the umask or an older version
left. Files inside are created 0600 by their writers (payload files, lock files, the signing
key; `uploader.sqlite_store` for the databases, whose WAL/SHM files SQLite creates with the
database file's mode).

Read-only commands (`lastmile queue`, `echo`, `devices`, `doctor`) never create anything:
they use `existing_data_dir` / `open_existing_outbox`, which answer None when nothing is there.

Importing this module pulls in no DICOM or BLE stack (the acquire process and `lastmile queue`
stay small).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from lastmile.config import Config

if TYPE_CHECKING:
    import threading

    from uploader.outbox import Outbox
    from uploader.sqlite_store import StopWaits

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
# What Lastmile keeps in the data directory (tests/test_data_dir.py checks these against the
# modules that own them): the outbox, its payload files and locks, clinic.db, visits.db and
# the visit chain's signing key. SQLite adds -wal/-shm (and -journal) next to each database.
OUTBOX_DB = "outbox.sqlite"  # uploader.outbox.DB_NAME (not imported: that module brings sqlite-utils)
CLINIC_DB = "clinic.db"  # lastmile.clinic.db.DB_NAME
VISITS_DB = "visits.db"  # lastmile.visits.book.DB_NAME
# what a stop could not write, for the next start (uploader.unwritten_records): named here so
# that `lastmile doctor` in the console process finds them without importing their writers
SENT_STUDIES_UNWRITTEN = "sent-studies-unwritten.jsonl"  # lastmile.reports.sent.UNWRITTEN_NAME
OWN_ENTRIES = (OUTBOX_DB, "payloads", "locks", CLINIC_DB, VISITS_DB, "gateway_ed25519.pem")
READ_BUSY_TIMEOUT_S = 5.0  # a WAL reader waits only while a writer recovers the WAL
_SQLITE_SUFFIXES = ("-wal", "-shm", "-journal")


class DataDirError(Exception):
    """The data directory cannot be used as it is; the message is one line: what and what to do."""


class DataPartitionFullError(DataDirError):
    """The data partition has no room for the outbox to open (SQLite needs a few blocks)."""


def _is_ours(name: str) -> bool:
    return name in OWN_ENTRIES or any(name == own + s for own in OWN_ENTRIES for s in _SQLITE_SUFFIXES)


def _describe(path: Path, exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return f"{path} is on a read-only file system (is the data partition mounted read-only after an error?)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to use {path}: {_ownership_hint(path)}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left for {path}"
    return f"cannot use {path}: {exc.strerror or exc}"


def _ownership_hint(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"run as the user that owns {path.parent} (the service user), or as root"
    return (
        f"it belongs to uid {st.st_uid} (mode {stat.S_IMODE(st.st_mode):04o}) and this is uid {os.geteuid()}; "
        "run the command as the service user (e.g. sudo -u lastmile lastmile ...)"
    )


def _check_directory(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise DataDirError(f"{path} is not a directory: point gateway.data_dir (or --data-dir) at a directory")
    if st.st_mode & stat.S_ISVTX or st.st_mode & stat.S_IWOTH:
        raise DataDirError(
            f"{path} is shared with every user (mode {stat.S_IMODE(st.st_mode):04o}): "
            "gateway.data_dir must be a directory of its own, e.g. /var/lib/lastmile"
        )


def existing_data_dir(path: str | os.PathLike[str]) -> Path | None:
    """The data directory if it exists (created by nothing here), else None; DataDirError if it
    exists but is not a directory this process may read."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataDirError(_describe(p, exc)) from None
    _check_directory(p, st)
    if not os.access(p, os.R_OK | os.X_OK):
        raise DataDirError(f"no permission to read {p}: {_ownership_hint(p)}")
    return p


def ensure_data_dir(path: str | os.PathLike[str]) -> Path:
    """The data directory, created 0700 if missing, checked usable and made private.

    Raises DataDirError (one line, with what to do) when it is a file, cannot be written
    (permissions, read-only file system) or is shared with every user.
    """
    p = Path(path)
    created = False
    try:
        st = p.stat()
    except FileNotFoundError:
        try:
            # parents as the system makes them; the data directory itself is private
            p.parent.mkdir(parents=True, exist_ok=True)
            p.mkdir(mode=DIR_MODE)
            created = True
        except FileExistsError:
            pass  # another process made it a moment ago
        except OSError as exc:
            raise DataDirError(f"cannot create the data directory: {_describe(p, exc)}") from None
        st = p.stat()
    except OSError as exc:
        raise DataDirError(_describe(p, exc)) from None
    _check_directory(p, st)
    if not os.access(p, os.R_OK | os.W_OK | os.X_OK):
        if os.access(p, os.R_OK | os.X_OK) and _read_only_fs(p):
            raise DataDirError(_describe(p, OSError(errno.EROFS, "read-only")))
        raise DataDirError(f"no permission to write in {p}: {_ownership_hint(p)}")
    _make_private(p, st, created)
    return p


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _make_private(path: Path, st: os.stat_result, created: bool) -> None:
    """Take group/other bits off the directory and Lastmile's own entries in it. The directory
    itself only when it is evidently ours (new, empty, a fresh partition or holding our files):
    a mistyped data_dir such as /var/lib must not lose its permissions."""
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise DataDirError(_describe(path, exc)) from None
    ours = [n for n in names if _is_ours(n)]
    # a fresh data partition's root holds only lost+found (and is 0755, as mkfs made it)
    if created or ours or all(n == "lost+found" for n in names):
        _tighten(path, st, DIR_MODE)
    for name in ours:
        entry = path / name
        try:
            est = entry.lstat()
        except OSError:
            continue  # removed meanwhile
        if stat.S_ISDIR(est.st_mode):
            _tighten(entry, est, DIR_MODE)
        elif stat.S_ISREG(est.st_mode):
            _tighten(entry, est, FILE_MODE)


def _tighten(path: Path, st: os.stat_result, wanted: int) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return  # already private: no write at all (and none on a read-only medium)
    if st.st_uid != os.geteuid() and os.geteuid() != 0:
        log.warning("%s is mode %04o and belongs to uid %d: cannot make it private", path, mode, st.st_uid)
        return
    try:
        os.chmod(path, mode & wanted)
    except OSError as exc:
        raise DataDirError(_describe(path, exc)) from None
    log.info("%s was mode %04o: now %04o (patient data stays private)", path, mode, mode & wanted)


def existing_file(config: Config, name: str) -> Path | None:
    """For read-only commands: `name` in the data directory if both exist (nothing created)."""
    data = existing_data_dir(config.data_dir)
    if data is None or not (data / name).is_file():
        return None
    return data / name


def open_outbox(config: Config, *, stop: threading.Event | StopWaits | None = None) -> Outbox:
    """The outbox in the data directory (created if needed) with the configured limits. `stop`: a
    service's (its runtime's, SIGTERM; or its StopWaits, shared with its clinic.db): once set, a
    write waiting for another process's write lock gives up within a second
    (`Outbox.give_up_waits_on`), so the service stops promptly."""
    from uploader.outbox import Outbox, is_disk_full

    o = config.outbox
    data_dir = ensure_data_dir(config.data_dir)
    try:
        outbox = Outbox.open(
            data_dir,
            min_free_bytes=o.min_free_mb * 2**20,
            backoff_base_s=o.backoff_base_s,
            backoff_max_s=o.backoff_max_s,
        )
    except sqlite3.OperationalError as exc:
        free = _free_bytes(data_dir)
        # SQLite reports a -shm it cannot size as "disk I/O error": on an empty partition that is room
        if not (is_disk_full(exc) or ("disk I/O error" in str(exc) and free is not None and free < NO_ROOM_BYTES)):
            raise
        raise DataPartitionFullError(
            f"the data partition is full ({'?' if free is None else free // 1024} KB free in {data_dir}): "
            "the outbox cannot be opened; nothing stored is lost. Free space on it (call the county IT)"
        ) from exc
    if stop is not None:
        outbox.give_up_waits_on(stop)
    return outbox


NO_ROOM_BYTES = 2**20  # below this, an I/O error opening SQLite is the full partition


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def open_existing_outbox(config: Config) -> Outbox | None:
    """For read-only commands: the outbox if it exists, None if it was never created (nothing
    is created either way; a data directory that cannot be used raises DataDirError)."""
    from uploader.outbox import DB_NAME

    return open_outbox(config) if existing_file(config, DB_NAME) is not None else None


@contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to one of the data directory's databases, in one read transaction
    (a consistent snapshot), closed after: for the metrics, the doctor and the update's idle check.

    sqlite3.OperationalError when the file cannot be opened (missing, unreadable)."""
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=READ_BUSY_TIMEOUT_S, isolation_level=None
    )
    try:
        conn.execute("PRAGMA query_only = 1")
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")
    finally:
        conn.close()


def columns_of(conn: sqlite3.Connection, table: str) -> set[str]:
    """A table's columns (a database an older version made may lack the newer ones)."""
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
