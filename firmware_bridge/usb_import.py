"""Import ECG files from USB storage (a stick, a cart's mass storage, the import folder).

Each file is imported once: its key is the SHA-256 of its bytes, so re-plugging the same stick
imports nothing twice (the caller's `is_known(key)` answers from the outbox before anything is
decoded). The stick is only ever read: files are opened O_RDONLY (O_NOATIME where allowed),
nothing is renamed, moved, marked or deleted. One bad file never stops the others: every file
ends as imported, already known, or refused with the reason a technician can act on.

A watched folder's file is imported once it has stopped changing (`FolderWatcher`): a file
still being copied in would otherwise be queued truncated and then again, whole, under another hash.

The composition (decode -> DICOM -> outbox) lives in lastmile; this module takes it as the
`enqueue(recording, key) -> bool` callable (True: a new item was created).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from devices.ecg.dicom_input import looks_like_dicom
from devices.ecg.formats import EXTENSIONS, decode_ecg
from devices.ecg.recording import EcgRecording
from devices.errors import DeviceError, NotAnEcgError
from firmware_bridge.errors import FileRefused

log = logging.getLogger(__name__)

KEY_PREFIX = "ecg-file-sha256:"
MAX_FILE_BYTES = 64 * 2**20  # a 12-lead resting ECG is < 1 MB; a Pi must hold one in RAM
# Folders that operating systems put on sticks; never ECGs.
SKIPPED_DIRS = frozenset(
    {"System Volume Information", "$RECYCLE.BIN", ".Trashes", ".Spotlight-V100", ".fseventsd", "lost+found"}
)
SKIPPED_NAMES = frozenset({"DICOMDIR"})
# A file last written this long ago is complete (longer than the watcher's 5 s poll interval).
SETTLED_AFTER_S = 10.0
# A watched folder whose files the stick could not all give (worn, pulled and put back between two
# polls) is read again this long after: it comes in without a new change, and a worn stick's refusals
# are not logged at every poll.
READ_AGAIN_AFTER_S = 60.0


class ImportStatus(StrEnum):
    """What happened to one file of an import."""

    IMPORTED = "imported"
    KNOWN = "already known"  # the outbox has this content already: nothing to do
    REFUSED = "refused"  # not an ECG we can take; the reason says why


IMPORTED, KNOWN, REFUSED = ImportStatus.IMPORTED, ImportStatus.KNOWN, ImportStatus.REFUSED


@dataclass(frozen=True, slots=True)
class ImportOutcome:
    path: str
    status: ImportStatus
    reason: str = ""  # why it was refused
    key: str = ""
    # refused because the stick could not be read (pulled out, worn), not for the file's bytes
    unreadable: bool = False
    # refused because it is a readable file of another kind (the cart's PDF report): nothing is wrong
    not_ecg: bool = False
    recording: EcgRecording | None = None


@dataclass
class ImportSummary:
    outcomes: list[ImportOutcome] = field(default_factory=list)

    def _count(self, status: ImportStatus) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def imported(self) -> int:
        return self._count(IMPORTED)

    @property
    def known(self) -> int:
        return self._count(KNOWN)

    @property
    def refused(self) -> list[ImportOutcome]:
        return [o for o in self.outcomes if o.status == REFUSED]

    def line(self) -> str:
        return (
            f"{len(self.outcomes)} ECG file(s): {self.imported} imported, {self.known} already known, "
            f"{len(self.refused)} refused"
        )


ProgressCallback = Callable[[int, int, ImportOutcome], None]  # (done, total, outcome of that file)


def content_key(data: bytes) -> str:
    return KEY_PREFIX + hashlib.sha256(data).hexdigest()


def _is_candidate(path: Path) -> bool:
    if path.name in SKIPPED_NAMES or path.name.startswith("._"):  # macOS resource forks
        return False
    suffix = path.suffix.lower()
    if suffix in EXTENSIONS:
        return True
    if suffix:
        return False
    # Carts write DICOM files without an extension (IM0001, ...): look at the preamble.
    try:
        with _open_read_only(path) as f:
            return looks_like_dicom(f.read(132))
    except OSError:
        return False


def find_ecg_files(roots: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """ECG files under the roots (files or folders), sorted, without following symlinks."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            found.append(root)
            continue
        for folder, dirs, files in os.walk(root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
            for name in sorted(files):
                path = Path(folder) / name
                if not path.is_symlink() and _is_candidate(path):
                    found.append(path)
    return found


class _open_read_only:
    """open(path, "rb") without updating the access time where the kernel lets us."""

    def __init__(self, path: Path) -> None:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
        noatime = getattr(os, "O_NOATIME", 0)
        try:
            self.fd = os.open(path, flags | noatime)
        except PermissionError:  # O_NOATIME needs file ownership
            self.fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, flags)

    def __enter__(self):
        self.file = os.fdopen(self.fd, "rb")
        return self.file

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def read_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    with _open_read_only(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{size} bytes is larger than any ECG file ({max_bytes // 2**20} MiB limit)")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than any ECG file ({max_bytes // 2**20} MiB limit)")
    return data


def import_file(
    path: Path,
    *,
    is_known: Callable[[str], bool],
    enqueue: Callable[[EcgRecording, str], bool],
    local_tz: dt.tzinfo,
    now: Callable[[], dt.datetime],
    max_bytes: int = MAX_FILE_BYTES,
) -> ImportOutcome:
    """Import one file; never raises for a bad file (the outcome says why it was refused)."""
    shown = str(path)
    try:
        data = read_file(path, max_bytes)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ImportOutcome(shown, REFUSED, f"cannot read: {reason}", unreadable=isinstance(exc, OSError))
    key = content_key(data)
    if is_known(key):
        return ImportOutcome(shown, KNOWN, key=key)
    try:
        recording = decode_ecg(data, path.name, local_tz=local_tz, received_at=now())
    except DeviceError as exc:
        return ImportOutcome(shown, REFUSED, str(exc), key=key, not_ecg=isinstance(exc, NotAnEcgError))
    try:
        created = enqueue(recording, key)
    except (DeviceError, FileRefused) as exc:
        return ImportOutcome(shown, REFUSED, str(exc), key=key)
    return ImportOutcome(shown, IMPORTED if created else KNOWN, key=key, recording=recording)


def import_paths(
    roots: Iterable[str | os.PathLike[str]],
    *,
    is_known: Callable[[str], bool],
    enqueue: Callable[[EcgRecording, str], bool],
    local_tz: dt.tzinfo,
    now: Callable[[], dt.datetime],
    progress: ProgressCallback | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> ImportSummary:
    """Find and import every ECG file under `roots`; errors of the gateway itself (outbox full,
    database unusable) propagate, a bad file never does."""
    files = find_ecg_files(roots)
    summary = ImportSummary()
    for done, path in enumerate(files, 1):
        outcome = import_file(path, is_known=is_known, enqueue=enqueue, local_tz=local_tz, now=now, max_bytes=max_bytes)
        summary.outcomes.append(outcome)
        if outcome.not_ecg:
            log.info("not an ECG, left on the stick: %s: %s", path.name, outcome.reason)
        elif outcome.status == REFUSED:
            log.warning("ECG file refused: %s: %s", path.name, outcome.reason)
        if progress is not None:
            progress(done, len(files), outcome)
    log.info("USB import: %s", summary.line())
    return summary


class FolderWatcher:
    """Import from the configured folders when something new shows up there.

    A stick mounted on a watched folder (udev/automount) or files a cart copies into it change
    the folder's signature (device id + names, sizes, times of its ECG files); the folder is
    imported once its files have stopped changing: the signature is the same as at the previous
    poll, or every file was last written more than SETTLED_AFTER_S ago (a stick brought in with
    the day's recordings is imported at the first poll). A poll landing mid-copy would otherwise
    queue the part already written (a Contec .ECG decodes from any whole number of sample blocks)
    and then the whole file under another hash: one recording twice.

    The signature is remembered only once the import has returned: an import that raised
    (outbox full: try again later) is tried again at the next poll. Re-imports are cheap: known
    files are skipped by their hash. A stick plugged in again is read again ("请把U盘重新插好"
    after a file it could not give): it holds the same files on the same device, so its signature
    is forgotten when its folder goes away, and one with a file it could not give is never
    remembered: read again `read_again_after_s` later (a stick plugged back within one poll; a worn
    one read once a minute, not at every poll).
    """

    def __init__(
        self,
        folders: Iterable[str | os.PathLike[str]],
        run_import: Callable[[list[Path]], ImportSummary],
        *,
        read_again_after_s: float = READ_AGAIN_AFTER_S,
    ) -> None:
        self.folders = [Path(f) for f in folders]
        self._run_import = run_import
        self.read_again_after_s = read_again_after_s
        self._seen: dict[Path, tuple] = {}  # the signature each folder was last imported at
        self._looked: dict[Path, tuple | None] = {}  # its signature at the previous poll
        # a folder whose import found files it could not give: its signature then, and when (monotonic)
        self._unreadable: dict[Path, tuple[tuple, float]] = {}

    @staticmethod
    def signature(folder: Path) -> tuple | None:
        try:
            device = folder.stat().st_dev
            files = find_ecg_files([folder])
            return (device, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
        except OSError:  # not mounted / not there (yet)
            return None

    @staticmethod
    def _written_long_ago(signature: tuple) -> bool:
        # File times are wall-clock times. One in the future (the Pi's clock behind the
        # writer's) is not "long ago": the folder then waits for a poll that sees no change.
        oldest_allowed_ns = (time.time() - SETTLED_AFTER_S) * 1e9
        return all(mtime_ns <= oldest_allowed_ns for _, _, mtime_ns in signature[1])

    def poll(self) -> list[ImportSummary]:
        summaries = []
        for folder in self.folders:
            signature = self.signature(folder)
            previous, self._looked[folder] = self._looked.get(folder), signature
            if signature is None:  # pulled out (or not mounted): plugged in again, it is read again
                self._seen.pop(folder, None)
                self._unreadable.pop(folder, None)
                continue
            if signature == self._seen.get(folder):
                continue
            unreadable = self._unreadable.get(folder)
            if (
                unreadable is not None
                and unreadable[0] == signature
                and time.monotonic() < unreadable[1] + self.read_again_after_s
            ):
                continue  # the same stick that could not give a file: not read again at every poll
            if signature != previous and not self._written_long_ago(signature):
                continue  # something is being written there: look again at the next poll
            summary = None
            if signature[1]:
                # The files that were looked at, not the folder: one a copy has begun to write
                # since is left for the next poll.
                summary = self._run_import([Path(name) for name, _, _ in signature[1]])
                summaries.append(summary)
            # not before: after a failed import the next poll retries
            if summary is not None and any(o.unreadable for o in summary.outcomes):
                self._unreadable[folder] = (signature, time.monotonic())
                self._seen.pop(folder, None)
            else:
                self._unreadable.pop(folder, None)
                self._seen[folder] = signature
        return summaries
