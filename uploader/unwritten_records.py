"""Records a service's stop could not write into its database, kept in a small file for the next start.

One mechanism for each such file (the outbox's items a peer stored that the stop could not record
as sent, the sent-study records clinic.db refused at the stop, the serial device rows a stop gave
up): written whole or not at all (uploader.whole_file: a power cut leaves the old copy or the new
one, a full disk the old copy), read a record
a line so that one damaged line does not take the others, a damaged file copied aside (said, never
a crash) as `<name>.damaged-<time>` with only the newest KEEP_ASIDE such copies kept (an SD card must
not fill with them over years) and left with its readable lines, forgotten once the next start has
written its records (not before: a start that fails first reads them again). On a full disk, where
no copy can be made, the damaged file stays as it is until then and is renamed aside instead.

Each user holds one `UnwrittenRecords` per file from `take()` to `forget()`: what `take()` found
and could not yet set aside (a full disk) is that instance's, set aside by its `forget()`.

`lastmile doctor` reads the same files (`pending_in`, `set_aside_in`): records waiting for a start,
and damaged copies set aside.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from uploader.whole_file import fsync_dir, replace_whole

log = logging.getLogger(__name__)

KEEP_ASIDE = 3  # damaged copies kept of one family of files (the newest): the others are removed
DAMAGED = ".damaged-"  # a set-aside copy: `<name>.damaged-<UTC time, to the microsecond>[-<n>]`
_STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"
# (older copies, lastmile.reports.sent's before: `.damaged-<unix seconds>`)
_ASIDE_STAMP = re.compile(r"\.damaged-(\d{8}T\d{6}\.\d{6}Z|\d+)(?:-(\d+))?$")
# what a record's parser raises for a line that is not one (UnicodeDecodeError is a ValueError)
RECORD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError)

_T = TypeVar("_T")


def is_set_aside(path: Path) -> bool:
    return _ASIDE_STAMP.search(path.name) is not None


def original_of(aside: Path) -> Path:
    """The file a set-aside copy was made of (`aside` itself if it is none)."""
    found = _ASIDE_STAMP.search(aside.name)
    return aside if found is None else aside.with_name(aside.name[: found.start()])


def _aside_order(path: Path) -> tuple[float, int, str]:
    """When it was set aside (seconds), then which of those in one microsecond."""
    found = _ASIDE_STAMP.search(path.name)
    if found is None:
        return (0.0, 0, path.name)
    stamp = found.group(1)
    if stamp.isdigit():
        when = float(stamp)
    else:
        when = dt.datetime.strptime(stamp, _STAMP_FORMAT).replace(tzinfo=dt.timezone.utc).timestamp()
    return (when, int(found.group(2) or 0), path.name)


def set_aside_in(directory: Path, family: str) -> list[Path]:
    """The damaged copies set aside of the files whose names start with `family`, newest first."""
    try:
        found = [p for p in directory.glob(f"{glob.escape(family)}*{DAMAGED}*") if is_set_aside(p)]
    except OSError:
        return []
    return sorted(found, key=_aside_order, reverse=True)


def pending_in(directory: Path, family: str) -> list[Path]:
    """The files whose names start with `family` holding records for a start (no set-aside copy)."""
    try:
        return sorted(p for p in directory.glob(f"{glob.escape(family)}*") if not is_set_aside(p) and p.is_file())
    except OSError:
        return []


@dataclass(frozen=True)
class _DamagedInPlace:
    """A damaged file `take()` could not copy aside (a full disk) and left in place for its
    readable records: why, what its lost lines mean, and the name it is set aside as once they
    are written."""

    why: str
    consequence: str
    aside: Path


@dataclass
class Taken(Generic[_T]):
    """What a start read of a file: its readable records, and how many lines were damaged."""

    records: list[_T] = field(default_factory=list)
    damaged: int = 0
    set_aside_as: Path | None = None  # where the damaged file was copied or moved (None: no damage, or not)


class UnwrittenRecords:
    """One file of records a stop could not write (a record a line), for the next start. Its user
    holds one instance from `take()` to `forget()` (see `forget`)."""

    def __init__(self, path: Path, *, what: str, family: str | None = None, keep_aside: int = KEEP_ASIDE) -> None:
        """`what`: the records as the log says them ("sent-study records the last stop saved");
        `family`: the name prefix its set-aside copies are capped together with (the files of
        one kind in its directory, one an owner: all of them count), by default its own name."""
        self.path = path
        self.what = what
        self.family = path.name if family is None else family
        self.keep_aside = keep_aside
        # found damaged by `take()` and kept with its damaged lines (a full disk: neither copied
        # aside nor rewritten): `forget()` sets it aside. Lost with the process: the file on disk
        # still holds its damaged lines, and the next start's `take()` finds them again.
        self._damaged_in_place: _DamagedInPlace | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def replace(self, lines: Sequence[str]) -> None:
        """The file holds `lines` (one record each, no newline in one) afterwards, fsynced, or
        what it held before (raised: OSError, a full disk). None: it is forgotten."""
        if not lines:
            self.forget()
            return
        if any("\n" in line for line in lines):
            raise ValueError("a record of an unwritten-records file is one line")
        replace_whole(self.path, "".join(f"{line}\n" for line in lines).encode("utf-8"), mode=0o600)
        self._damaged_in_place = None  # its damaged bytes are gone: forgetting it removes it

    def forget(self) -> None:
        """The records are in their database now: the file goes (raised: OSError but none). One
        this instance's `take()` found damaged and could not copy aside (a full disk) is set aside
        now - renamed, which needs no space - never deleted."""
        damaged, self._damaged_in_place = self._damaged_in_place, None
        if damaged is not None:
            why = f"{damaged.why}; its readable records are written now"
            if self.path.exists() and self.set_aside(why, damaged.consequence, damaged.aside) is None:
                # kept for the next start, which reads its records again: the caller must know
                raise OSError(f"the damaged {self.path} could not be set aside")
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.path.parent)

    def lines(self) -> list[str]:
        """Its non-empty lines as they are (nothing set aside: `lastmile doctor` reads this);
        [] when there is no file. OSError if it cannot be read."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return [line.decode("utf-8", errors="replace") for line in data.split(b"\n") if line.strip()]

    def take(self, parse: Callable[[str], _T], consequence: str = "") -> Taken[_T]:
        """Its records, each line by `parse` (raising one of RECORD_ERRORS for a line that is not
        a record): a damaged line does not take the others. A file with a damaged line is copied
        aside as it is (logged at ERROR with `consequence`: what its lost lines mean) and keeps
        its readable lines only: it stays the truth of them until the caller, once they are
        written, forgets it (a start that fails before that reads them again). One that cannot
        be read is set aside (moved: nothing of it can be written)."""
        taken: Taken[_T] = Taken()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return taken
        except OSError as exc:
            taken.damaged = 1
            taken.set_aside_as = self.set_aside(f"unreadable: {exc}", consequence)
            return taken
        readable: list[str] = []
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
                taken.records.append(parse(text))
            except RECORD_ERRORS as exc:
                taken.damaged += 1
                log.debug("a damaged line in %s: %s", self.path, exc)
                continue
            readable.append(text)
        if taken.damaged:
            why = f"{taken.damaged} damaged line(s), {len(taken.records)} readable"
            taken.set_aside_as = self._copy_aside(data, readable, why, consequence)
        return taken

    def _copy_aside(self, data: bytes, readable: list[str], why: str, consequence: str) -> Path | None:
        """The damaged file's bytes copied aside, then the file rewritten with its `readable`
        lines (none: forgotten, the copy says what it held). A copy that cannot be made (a full
        SD card: it needs space) moves the file aside instead, which needs none, and then writes
        its readable lines again if it can: the caller forgetting the file must never take the
        damaged bytes with it unnamed."""
        aside = self._aside_path()
        try:
            replace_whole(aside, data, mode=0o600)
        except OSError as exc:
            if not readable:  # nothing to keep it for
                log.error(
                    "the %s in %s are damaged (%s) and cannot be copied aside: %s", self.what, self.path, why, exc
                )
                return self.set_aside(why, consequence)
            # left as it is, the truth of its readable records for a start that fails before
            # writing them (`pending_in` skips set-aside files); `forget()` sets it aside
            self._damaged_in_place = _DamagedInPlace(why, consequence, aside)
            log.error(
                "the %s in %s are damaged (%s) and cannot be copied aside (%s): it stays as it is until its"
                " readable records are written, then is set aside as %s%s",
                self.what,
                self.path,
                why,
                exc,
                aside,
                f"; {consequence}" if consequence else "",  # said now: a start on a full disk may never forget it
            )
            return aside
        try:
            self.replace(readable)
        except OSError as exc:  # it keeps its damaged lines too: set aside again at the next start
            log.error("cannot rewrite %s with its readable lines only: %s", self.path, exc)
        self._said_aside(why, aside, consequence)
        return aside

    def _aside_path(self) -> Path:
        stamp = dt.datetime.now(dt.timezone.utc).strftime(_STAMP_FORMAT)
        aside = self.path.with_name(f"{self.path.name}{DAMAGED}{stamp}")
        n = 0
        while aside.exists():  # two in one second: both kept
            n += 1
            aside = self.path.with_name(f"{self.path.name}{DAMAGED}{stamp}-{n}")
        return aside

    def set_aside(self, why: str, consequence: str = "", aside: Path | None = None) -> Path | None:
        """Move the damaged file aside (`<name>.damaged-<time>`; as `aside`, a name `take()` said,
        unless a copy took it since: both kept), said at ERROR; only the newest `keep_aside`
        copies of its family stay. None if it could not be moved (said too)."""
        if aside is None or aside.exists():
            aside = self._aside_path()
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            log.error("the %s in %s are damaged (%s) and cannot be set aside: %s", self.what, self.path, why, exc)
            return None
        with contextlib.suppress(OSError):  # moved: a power cut may put it back, to be set aside again
            fsync_dir(self.path.parent)
        self._said_aside(why, aside, consequence)
        return aside

    def _said_aside(self, why: str, aside: Path, consequence: str) -> None:
        log.error(
            "the %s in %s are damaged (%s): set aside as %s%s",
            self.what,
            self.path,
            why,
            aside,
            f"; {consequence}" if consequence else "",
        )
        self._cap_aside(aside)

    def _cap_aside(self, made: Path) -> None:
        """Only the newest `keep_aside` copies stay, `made` (the one just set aside) always among
        them: the stamps in the names are clock times, and a clock behind at boot would order it
        oldest."""
        older = [p for p in set_aside_in(self.path.parent, self.family) if p != made]
        for old in older[max(0, self.keep_aside - 1) :]:
            try:
                old.unlink()
            except OSError as exc:
                log.warning("cannot remove an old damaged copy %s: %s", old, exc)
                continue
            log.warning(
                "an old damaged copy of the %s removed (the newest %d are kept): %s", self.what, self.keep_aside, old
            )
