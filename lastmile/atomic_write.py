"""Replacing a small file whole or not at all, so that a power cut leaves the old copy or the new one.

The data is written to a temporary file beside it (same directory, so the rename cannot cross
filesystems), fsynced, renamed over the file, and the directory fsynced: only then does the
rename itself survive a power cut on the SD card.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from uploader.payload_files import fsync_dir


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """`path` holds `data` afterwards, or (on an error, raised) what it held before. `mode`: the
    file's exact permission bits whatever the umask; None: those a new file gets under the umask."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666 if mode is None else mode)
        with open(fd, "wb") as f:  # a buffered file writes it all, however many writes it takes
            if mode is not None:
                os.fchmod(fd, mode)  # a leftover temporary file keeps its old mode: never trust it
            f.write(data)
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
