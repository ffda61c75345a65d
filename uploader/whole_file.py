"""A small file replaced whole, fsynced: the update state, the console's TLS key and certificate,
the settings waiting for a restart, the files of records a stop could not write.

What a power cut (or a full disk, or any error) leaves: the file's old bytes or its new ones,
never a mix nor an empty file - the new bytes go to a temporary file beside it (`.<name>.tmp`),
fsynced, renamed over it, and the directory fsynced, so that the rename itself survives the cut.
A temporary file a cut left behind is only ever overwritten by the next replace.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """A rename or unlink in `path` survives a power cut on the SD card only once this returns."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_whole(path: Path, data: bytes, *, mode: int | None = None) -> None:
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
