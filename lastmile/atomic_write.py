"""Replacing a small file whole or not at all, so that a power cut leaves the old copy or the new one.

The data is written to a temporary file beside it (same directory, so the rename cannot cross
filesystems), fsynced, renamed over the file, and the directory fsynced: only then does the
rename itself survive a power cut on the SD card. The one implementation is the uploader's
(`uploader.unwritten_records.replace_whole`, which the files a stop leaves for the next start use).
"""

from __future__ import annotations

from pathlib import Path

from uploader.unwritten_records import replace_whole


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """`path` holds `data` afterwards, or (on an error, raised) what it held before. `mode`: the
    file's exact permission bits whatever the umask; None: those a new file gets under the umask."""
    replace_whole(path, data, mode=mode)
