"""Readings a serial monitor printed that the outbox refused (a full data partition), kept on disk.

An ASCII-report monitor prints each reading once and cannot be asked again, so what the outbox
refuses is held by the acquire service and retried. Held in memory only, a power cut lost it
without a word. So it is also written here: a file of `SPILL_BYTES` allocated (fallocate) when
the service starts, while the partition has room, and later only overwritten in place - writing
it needs no new blocks on a partition filled to its last one.

Two slots of half the file each; every save writes the slot not holding the newest copy
(header: magic, generation, length, SHA-256) and fsyncs it, so a power cut mid-write leaves the
other, older copy whole. When the partition has room again the readings are stored in the
outbox (their patient decided then by when they were measured, as for any reading) and the
file says none are waiting. `waiting_readings` lets `lastmile doctor` say so (once a minute: it
reads the slot headers and one body, not the whole file) and the acquire service start for them.

A bridge streams an ECG once too: its blocks are never resent, only its ECG_END is (after a
reconnect or a gateway restart), and a restarted gateway that has no such recording answers it
NACK_UNKNOWN_RECORDING, so the bridge drops it. Streamed ECGs the outbox refuses are therefore
kept the same way, in a second, larger file (`ECG_SPILL_NAME`), under their outbox key: after
a power cut the resent ECG_END finds its recording held again, and it is stored and ACKed once.

A file that gives back less than a whole copy (unreadable, empty, cut short, garbage, records that
do not decode) never stops the start: what it gives back waits again, the file is set aside
(`<name>.<time>.bad`, said once in the journal with its path, for the county IT) once a new one
is allocated - on a full disk (when the file is used) none can be: the damaged file's own blocks
are then written in place, so what it gave back stays on disk. `damage` says why, for the device
rows to say what it did not give back as lost; a file that gives back its newest copy whole is
the truth of what was on disk (`gave_back_all`), whatever a row written before (or not) says.
Bounded by number: the newest SET_ASIDE_KEPT set aside per spill file are kept, older ones removed.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Generic, TypeVar

from devices.observation import Observation
from lastmile.clinic.db import iso
from lastmile.clinic.devices import CARD_DOCTOR, CARD_PATIENT
from lastmile.clinic.observations import observation_from_json, observation_to_json
from uploader.unwritten_records import UnwrittenRecords
from uploader.whole_file import fsync_dir

if TYPE_CHECKING:
    # numpy, loaded only where an ECG is (de)coded: the console process blocks numpy, and its
    # System page's checks read this module's file names and `waiting_readings`
    from devices.ecg.recording import EcgRecording

log = logging.getLogger(__name__)

SPILL_NAME = "serial-spill.dat"
SPILL_BYTES = 256 * 1024  # two slots of 128 KB: ~200 readings of ~600 bytes each
ECG_SPILL_NAME = "serial-ecg-spill.dat"
ECG_SPILL_BYTES = 4 * 1024 * 1024  # two slots of 2 MB: ~25 streamed 10 s 12-lead ECGs, compressed
MAGIC = b"LMSPILL1"
HEADER = len(MAGIC) + 8 + 4 + 32  # magic, generation, length, sha256
SET_ASIDE_KEPT = 2  # damaged spill files kept per name for the county IT: <= 2 x 4 MB of the SD card
MISSING = "missing"  # `SpillFile.damage` of a file not there at start
# a slot header's generation at or above this is none the gateway wrote (a torn header, 0xFF bytes):
# trusted, the next save's generation overflowed its 8 bytes (a crash at every start)
MAX_GENERATION = 2**63
# one at or above this (one save a second would take 10**11 years) is not the gateway's either: the
# file is damaged and replaced, numbered from 1 again, far below MAX_GENERATION
PLAUSIBLE_GENERATION = 2**62

T = TypeVar("T")

Spilled = dict[str, list[Observation]]  # device name -> readings waiting for space
SpilledRecordings = dict[str, dict[str, "EcgRecording"]]  # device name -> outbox key -> streamed ECG


def recording_to_json(key: str, recording: EcgRecording) -> dict:
    """A streamed ECG held for space (it names no patient yet: that is decided when it is stored),
    in the .npz layout devices.ecg.npz reads back whole (deflated: the file holds ~25 ECGs)."""
    from devices.ecg.npz import write_npz

    return {
        "key": key,
        "npz": base64.b64encode(write_npz(recording)).decode(),
        "source_format": recording.source_format,
    }


def recording_from_json(data: dict) -> tuple[str, EcgRecording]:
    from devices.ecg.npz import read_npz

    recording = read_npz(base64.b64decode(data["npz"]))
    return data["key"], dataclasses.replace(recording, source_format=data["source_format"])


def _slot_header(f: BinaryIO, offset: int) -> tuple[int, int, bytes] | None:
    """(generation, length, sha256) of the slot at `offset`, None if it never held a copy."""
    return _parse_header(os.pread(f.fileno(), HEADER, offset))


def _parse_header(raw: bytes) -> tuple[int, int, bytes] | None:
    """(generation, length, sha256) of a slot header as the gateway writes it, None if it is not
    one (never written, garbage, or a generation it never wrote: `MAX_GENERATION`)."""
    if len(raw) < HEADER or not raw.startswith(MAGIC):
        return None
    at = len(MAGIC)
    generation = int.from_bytes(raw[at : at + 8], "big")
    if generation >= MAX_GENERATION:
        return None
    return generation, int.from_bytes(raw[at + 8 : at + 12], "big"), raw[at + 12 : HEADER]


def highest_header(path: Path) -> tuple[int, int] | None:
    """(slot, generation) of the slot header with the highest generation in the file at `path`,
    whole copy behind it or not (None: none, or unreadable): a copy written after it must be above
    it, or an old one comes back at the next start."""
    try:
        with path.open("rb") as f:
            half = os.fstat(f.fileno()).st_size // 2
            headers = [(h[0], slot) for slot in (0, 1) if half and (h := _slot_header(f, slot * half)) is not None]
    except OSError:
        return None
    return (max(headers)[1], max(headers)[0]) if headers else None


def newest_copy(path: Path) -> tuple[int, int, dict[str, list[dict]]] | None:
    """(slot, generation, content) of the newest whole copy in the file at `path`: the two slot
    headers, then only the body of the newest one (the other's too if that one is torn)."""
    try:
        with path.open("rb") as f:
            half = os.fstat(f.fileno()).st_size // 2
            headers = [(slot, _slot_header(f, slot * half)) for slot in (0, 1)]
            found = sorted(((h[0], slot, h[1], h[2]) for slot, h in headers if h is not None), reverse=True)
            for generation, slot, length, digest in found:
                body = os.pread(f.fileno(), length, slot * half + HEADER) if HEADER + length <= half else b""
                content = _content(body) if len(body) == length and hashlib.sha256(body).digest() == digest else None
                if content is not None:
                    return slot, generation, content
    except OSError:  # unreadable (a directory in its place, EIO): `damage` says so
        return None
    return None


def _content(body: bytes) -> dict[str, list[dict]] | None:
    """A slot's body as saved (device name -> records), None if it is not that."""
    try:
        content = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to be ours
        return None
    if not isinstance(content, dict) or not all(isinstance(v, list) for v in content.values()):
        return None
    return content


def damage(path: Path) -> str:
    """Why the spill file at `path` does not give back a whole copy it should ("" when it is whole,
    or never held one, or is not there): unreadable, empty, a slot header that is neither never
    written (zeros) nor ours, or headers with no whole copy behind them (cut short)."""
    try:
        with path.open("rb") as f:
            half = os.fstat(f.fileno()).st_size // 2
            raw = [os.pread(f.fileno(), HEADER, slot * half) for slot in (0, 1)] if half else []
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"unreadable: {exc}"
    if not raw:
        return "empty"
    if any(r.startswith(MAGIC) for r in raw) and newest_copy(path) is None:
        return "no whole copy in it (cut short or torn)"
    if any(r.strip(b"\0") and _parse_header(r) is None for r in raw):
        return "not what the gateway wrote (garbage)"
    if any((h := _parse_header(r)) is not None and h[0] >= PLAUSIBLE_GENERATION for r in raw):
        return "a copy numbered higher than the gateway ever writes (garbage)"
    return ""


def set_aside(path: Path, why: str) -> Path | None:
    """Move the damaged spill file `path` aside (`<name>.<UTC time>.bad`) for the county IT, said
    once in the journal; older ones beyond SET_ASIDE_KEPT removed. None if it cannot be moved."""
    aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.bad")
    try:
        os.rename(path, aside)
        fsync_dir(path.parent)
    except OSError as exc:
        log.error("spill file %s gives nothing back (%s) and cannot be set aside: %s", path, why, exc)
        return None
    log.error("spill file %s gives back less than it kept (%s): set aside as %s for the county IT", path, why, aside)
    for old in sorted(path.parent.glob(f"{path.name}.*.bad"))[:-SET_ASIDE_KEPT]:
        with contextlib.suppress(OSError):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    return aside


def kept_in(spill: SpillFile | None) -> bool:
    """Whether `spill` (None: no file set aside) holds all that waits."""
    return spill is not None and spill.kept


def waiting_readings(data_dir: Path, name: str = SPILL_NAME) -> int:
    """How many readings (ECGs with `ECG_SPILL_NAME`) the spill file `name` in `data_dir` holds
    (0 without one); never creates it."""
    newest = newest_copy(Path(data_dir) / name)
    return 0 if newest is None else sum(len(v) for v in newest[2].values())


class SpillFile:
    """The spill file of one data directory; `usable` is False when it could not be allocated.
    `kept`: whether it holds all that waits (what its last save did, or what it held at `load`);
    `holds`: how many readings (ECGs) of each device it holds, what a restart would load (a save
    that failed left the copy before it)."""

    def __init__(self, data_dir: Path, size: int = SPILL_BYTES, name: str = SPILL_NAME) -> None:
        self.path, self._size = Path(data_dir) / name, size
        self.kept = False
        newest = newest_copy(self.path)
        highest = highest_header(self.path)
        self._at_start = newest[2] if newest else {}  # for `load`: the file is read once
        # the slot of its newest whole copy: written in place, a save never goes there (a power cut
        # mid-save would lose the only whole copy)
        self._whole_slot = newest[0] if newest else None
        self._generation_at_start = newest[1] if newest else None
        # why it may not give back all it kept: MISSING, or its damage (then set aside)
        self.damage = damage(self.path) if self.path.exists() or self.path.is_symlink() else MISSING
        # its newest copy torn (a power cut mid-save, a flipped bit): the older one is given back
        self.torn = newest is not None and highest is not None and highest[1] > newest[1]
        self._held_a_copy = newest is not None
        self.set_aside: Path | None = None
        self.in_place = False  # damaged, and written in place: no room for a new one
        self._replaced = False
        self._clear_other_slot = False
        self.usable = False
        self.holds: dict[str, int] = {}
        if self.damage not in ("", MISSING):
            self._replace(self.damage)
        else:
            self._open(newest, highest)

    @property
    def gave_back_all(self) -> bool:
        """Its newest copy came back whole, every record read: the truth of what was on disk at the
        stop (a device row saying more was written before it was saved, or not written after)."""
        return self._held_a_copy and not self.damage and not self.torn

    @property
    def generation(self) -> int | None:
        """The generation of its last copy (found at start or saved since; None: not usable), for
        the device rows: a whole copy found above the one a row names was saved after the row."""
        return self._generation if self.usable else None

    def saved_after(self, generation: int | None) -> bool:
        """Whether the newest copy it gave back whole at start (`gave_back_all`) was saved after
        the copy of `generation` a device row names (None: the row names none: never)."""
        at_start = self._generation_at_start if self.gave_back_all else None
        return generation is not None and at_start is not None and at_start > generation

    @property
    def not_given_back(self) -> str:
        """Why it did not give back all it kept, for people: the file, its damage, where the county
        IT finds it ("" when it did)."""
        if self.gave_back_all:
            return ""
        why = (self.damage or ("its newest copy is torn" if self.torn else "no copy in it"))[:100]
        if self.set_aside is not None:  # both paths whole: where the county IT finds them
            return f"{self.path} ({why}; set aside as {self.set_aside})"
        kept = "; kept in place: no room to set it aside" if self.in_place else ""
        return f"{self.path} ({why}{kept})"

    def _open(self, newest: tuple[int, int, dict[str, list[dict]]] | None, highest: tuple[int, int] | None) -> None:
        self.usable = self._allocate()
        self._slot, self._generation = (newest[0], newest[1]) if newest else (1, 0)
        if highest is not None and highest[1] > self._generation:  # a torn newer copy: ours go above it
            self._generation = highest[1]
        self.holds = {name: len(items) for name, items in (newest[2] if newest else {}).items() if items}
        self.slot_bytes = self.path.stat().st_size // 2 if self.usable else 0

    def _replace(self, why: str) -> None:
        """The file is damaged: a new one allocated first, then the damaged one set aside for the
        county IT and the new one put in its place (what it gave back is saved there by `load`).
        No room for a new one (a full disk: when the file is used), or the damaged one cannot be
        moved: it is written in place, above every generation in it (an old copy never comes
        back), so what it gave back stays on disk either way."""
        self.damage, self._replaced, self.holds = why, True, {}
        fresh = self._allocate_new()
        if fresh is not None:
            self.set_aside = set_aside(self.path, why)
            if self.set_aside is not None or not (self.path.exists() or self.path.is_symlink()):
                try:
                    os.rename(fresh, self.path)
                    fsync_dir(self.path.parent)
                except OSError as exc:
                    log.error("cannot put a new spill file in place of %s: %s", self.path, exc)
                else:
                    self.usable, self._slot, self._generation = True, 1, 0
                    self.slot_bytes = self._size // 2
                    return
        with contextlib.suppress(OSError):
            if fresh is not None:
                fresh.unlink()
        if self.set_aside is None and self._reuse_in_place():
            log.error(
                "spill file %s gives back less than it kept (%s) and cannot be set aside: %s",
                self.path,
                why,
                "no room for a new one; written in place" if fresh is None else "written in place",
            )
            return
        if fresh is None and self.set_aside is None:  # not one to write in place either: for the county IT
            self.set_aside = set_aside(self.path, why)
        self.usable, self.slot_bytes = False, 0

    def _reuse_in_place(self) -> bool:
        """Write the damaged file in place from now on: only a regular file of its size, whose
        blocks are all there (fallocate takes none new then), holds the next copies."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)  # no O_TRUNC: its blocks stay ours
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != self._size:
                    return False
                os.posix_fallocate(fd, 0, self._size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            return False
        highest = highest_header(self.path)
        self._slot, self._generation = highest if highest is not None else (1, 0)
        if self._whole_slot is not None:  # the next save goes into the other slot: never over the only whole copy
            self._slot = self._whole_slot
        self.usable, self.in_place, self.slot_bytes = True, True, self._size // 2
        self._clear_other_slot = True  # once a copy of ours is in: the other slot's old one (or garbage) goes
        return True

    def _allocate(self) -> bool:
        if self.path.exists():
            return True
        fresh = self._allocate_new()
        if fresh is None:
            return False
        try:
            os.rename(fresh, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                fresh.unlink()
            log.error("cannot set aside %s for readings a full disk refuses: %s", self.path, exc)
            return False
        return True

    def _allocate_new(self) -> Path | None:
        """A new file of the spill file's size beside it, its blocks taken now (None: no room)."""
        tmp = self.path.with_name(f".{self.path.name}.new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self._size)  # the blocks, taken now while there is room
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.error("cannot set aside %s for readings a full disk refuses: %s", self.path, exc)
            return None
        return tmp

    def load(self) -> Spilled:
        """What the file held when it was opened (a previous run's readings): kept there until the next save."""
        return self._load(observation_from_json)

    def save(self, spilled: Spilled) -> None:
        """Write `spilled` (all that waits, replacing what the file held) in place and fsync it;
        `kept` False when it cannot be (no file, too many readings, an I/O error)."""
        self._save({name: [observation_to_json(o) for o in obs] for name, obs in spilled.items() if obs})

    def load_recordings(self) -> SpilledRecordings:
        """The streamed ECGs the file held when it was opened (a previous run's), as `load`."""
        return {name: dict(pairs) for name, pairs in self._load(recording_from_json).items()}

    def _load(self, decode: Callable[[dict], T]) -> dict[str, list[T]]:
        """What the file held when opened, each record `decode`d; one that does not decode is left
        out (counted lost by its device's row) and the file set aside. What is given back is kept
        in the file (saved again to a new one set aside)."""
        loaded: dict[str, list[T]] = {}
        good: dict[str, list[dict]] = {}
        for name, records in self._at_start.items():
            for record in records:
                try:
                    loaded.setdefault(name, []).append(decode(record))
                except Exception as exc:  # noqa: BLE001 - whatever a damaged record raises: never a crash at start
                    log.error("%s: a record kept in %s cannot be read back: %s", name, self.path, exc)
                    if not self._replaced:
                        self._replace(f"a record that cannot be read back: {exc}"[:150])
                    continue
                good.setdefault(name, []).append(record)
        if self._replaced:
            self._save(good)
        else:
            self.kept = bool(good)
        return {name: items for name, items in loaded.items() if items}

    def save_recordings(self, spilled: SpilledRecordings) -> None:
        """As `save`, for streamed ECGs by device and outbox key."""
        self._save({name: [recording_to_json(k, r) for k, r in held.items()] for name, held in spilled.items() if held})

    def _save(self, content: dict[str, list[dict]]) -> None:
        self.kept = self._write(content)
        if self.kept:
            self.holds = {name: len(items) for name, items in content.items()}

    def _write(self, content: dict[str, list[dict]]) -> bool:
        if not self.usable:
            return False
        body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
        if HEADER + len(body) > self.slot_bytes:
            log.error("%d bytes of waiting readings do not fit in %s", len(body), self.path)
            return False
        generation, slot = self._generation + 1, 1 - self._slot
        if generation >= MAX_GENERATION:  # only a damaged file written in place: never read back as ours
            log.error("cannot write waiting readings to %s: its copies are numbered too high", self.path)
            return False
        try:  # OverflowError: a generation past 8 bytes (never ours: MAX_GENERATION), a failed save, not a crash
            header = (
                MAGIC + generation.to_bytes(8, "big") + len(body).to_bytes(4, "big") + hashlib.sha256(body).digest()
            )
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)  # no O_TRUNC: the blocks stay ours
            try:
                os.pwrite(fd, header + body, slot * self.slot_bytes)
                os.fsync(fd)
                if self._clear_other_slot:  # the damaged file's other copy (or garbage) never comes back
                    os.pwrite(fd, bytes(HEADER), (1 - slot) * self.slot_bytes)
                    os.fsync(fd)
                    self._clear_other_slot = False
            finally:
                os.close(fd)
        except (OSError, OverflowError) as exc:
            log.error("cannot write waiting readings to %s: %s", self.path, exc)
            return False
        self._slot, self._generation = slot, generation
        return True


# -- what a stop could not write, for the next start ----------------------------------------------


class LeftAtStopFile(Generic[T]):
    """A file of what the serial service's stop could not write (`UnwrittenRecords`, one record a
    line by `line_of`, read back by `record_of`), for its next start. The service holds one from its
    start's `load` to its `forget` (a damaged file a full disk kept in place is set aside by that
    `forget`), and saves with it at its stop. `what`: its records as the journal says them; `lost`:
    what a damaged line of it means; `appends`: a stop's save adds to what an earlier stop kept there
    and no start took yet (a start that failed first), else replaces it."""

    def __init__(
        self,
        path: Path,
        *,
        what: str,
        lost: str,
        line_of: Callable[[T], str],
        record_of: Callable[[str], T],
        appends: bool = False,
    ) -> None:
        self.records = UnwrittenRecords(path, what=what)
        self.lost = lost
        self.line_of, self.record_of = line_of, record_of
        self.appends = appends

    def save(self, records: Sequence[T], *, unsaved: str = "") -> None:
        """Keep `records` for the next start, fsynced (none: nothing is written), after what the file
        holds if it `appends`. A few hundred bytes at a stop, only when one is given up. `unsaved`:
        what a failure to keep them means, for the journal (the next start cannot say it)."""
        if not records:
            return
        kept: list[str] = []
        if self.appends:
            try:
                kept = self.records.lines()
            except OSError as exc:  # unreadable: the next start sets it aside and says so; these go on
                log.error(
                    "cannot read %s (its %s are replaced by this stop's): %s", self.records.path, self.records.what, exc
                )
        try:
            self.records.replace([*kept, *(self.line_of(record) for record in records)])
        except OSError as exc:
            log.error(
                "%scannot keep the %s in %s: %s",
                f"{unsaved}: " if unsaved else "",
                self.records.what,
                self.records.path,
                exc,
            )

    def load(self) -> list[T]:
        """What `save` kept ([] when none; a damaged file is copied aside, said, its readable lines
        taken: the file keeps them until `forget`)."""
        return self.records.take(self.record_of, self.lost).records

    def forget(self) -> None:
        """The start has said what the last stop left: the file's records are spent. One it cannot
        remove is read again at the next start, whose rows skip what they said (their word ids)."""
        try:
            self.records.forget()
        except OSError as exc:  # no harm: a row skips the word it said
            log.error(
                "cannot remove %s (the rows say what it held now; read again at the next start): %s",
                self.records.path,
                exc,
            )


# -- device rows a stop left behind ----------------------------------------------------------------

ROWS_BEHIND_NAME = "serial-rows-behind.jsonl"
ROWS_BEHIND_WHAT = "device rows' held counts the last stop could not write"
ROWS_BEHIND_LOST = "readings held in memory only of those rows may have been lost unsaid (see the journal)"


@dataclasses.dataclass(frozen=True)
class RowBehind:
    """The held status a device row's write carried and did not get (given up at a stop) while
    some of what waited was held in memory only: the row keeps an older word (count, spill
    generation), by which a newer whole spill copy would seem to cover all - it did not."""

    held: tuple[int, int]  # readings, streamed ECGs waiting
    memory: tuple[int, int]  # of them, held in memory only
    cause: str  # the row's held cause ("": space)
    # this word's own id (random): the row keeps the id of the last word whose loss it counted, and
    # a start that reads the file again (its removal failed, or it died first) skips only that word -
    # never by clocks, which a Pi without RTC sets back at boot; "": an older version's line
    word_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)

    def applied_to(self, applied_word_id: str | None) -> bool:
        """Whether a row that says it applied `applied_word_id` last has had this word's loss counted."""
        return bool(self.word_id) and self.word_id == applied_word_id


def _row_behind_line(behind: tuple[str, RowBehind]) -> str:
    address, row = behind
    return json.dumps({"address": address, **dataclasses.asdict(row)}, ensure_ascii=False, sort_keys=True)


def _row_behind_of(line: str) -> tuple[str, RowBehind]:
    raw = json.loads(line)
    row = RowBehind(
        (int(raw["held"][0]), int(raw["held"][1])),
        (int(raw["memory"][0]), int(raw["memory"][1])),
        str(raw["cause"]),
        str(raw.get("word_id") or ""),  # lead15's lines carried a time instead: never skipped
    )
    return str(raw["address"]), row


def rows_behind_file(data_dir: Path) -> LeftAtStopFile[tuple[str, RowBehind]]:
    """`serial-rows-behind.jsonl`: the device rows a stop gave up (`RowBehind`, by row address)."""
    return LeftAtStopFile(
        Path(data_dir) / ROWS_BEHIND_NAME,
        what=ROWS_BEHIND_WHAT,
        lost=ROWS_BEHIND_LOST,
        line_of=_row_behind_line,
        record_of=_row_behind_of,
    )


# -- a card whose check-in a stop gave up ----------------------------------------------------------

CARDS_GIVEN_UP_NAME = "serial-cards-given-up.jsonl"
CARDS_GIVEN_UP_WHAT = "cards scanned as the gateway stopped whose check-in the stop gave up"
CARDS_GIVEN_UP_LOST = "a card in those lines is not said on Today: if its patient is still here, scan the card again"


@dataclasses.dataclass(frozen=True)
class CardGivenUp:
    """A card (a doctor's badge) a scanner read whose check-in was still waiting for clinic.db's
    lock when the stop gave up its turn: the process ends, maybe before it is written. The next
    start looks whether it was (`PatientContext.scan_written`), and says it on Today if not."""

    kind: str  # CARD_PATIENT or CARD_DOCTOR
    scanned_id: str  # the patient's ID, the doctor's
    device: str  # the scanner's name (`[[serial.devices]]`)
    scanned_at: dt.datetime  # the check-in's own time: its session log line's (as lastmile.clinic.db.iso writes it)
    time_source: str  # where that time came from (devices.identity.TimeSource: the gateway's clock)
    # this record's own id (random): the row keeps the id of the one it said, and a start that
    # reads the file again (its removal failed, or it died first) does not say it anew
    word_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def unkept(self) -> str:
        """What its record lost at a stop means, for the journal (never its ID: personal data)."""
        return f"{self.device}: a {self.kind} card scanned as the gateway stopped may not be checked in, and the next start cannot say it"


def _card_line(card: CardGivenUp) -> str:
    line = dataclasses.asdict(card) | {"scanned_at": iso(card.scanned_at)}
    return json.dumps(line, ensure_ascii=False, sort_keys=True)


def _card_of(line: str) -> CardGivenUp:
    raw = json.loads(line)
    if raw["kind"] not in (CARD_PATIENT, CARD_DOCTOR) or not str(raw["scanned_id"]).strip():
        raise ValueError(f"not a scanned card: {raw['kind']!r}")
    scanned_at = dt.datetime.fromisoformat(str(raw["scanned_at"]))  # ValueError: not a time
    if scanned_at.tzinfo is None:
        raise ValueError("a scan's time without its zone")
    return CardGivenUp(
        str(raw["kind"]),
        str(raw["scanned_id"]),
        str(raw["device"]),
        scanned_at,
        str(raw["time_source"]),
        str(raw["word_id"]),
    )


def cards_given_up_file(data_dir: Path) -> LeftAtStopFile[CardGivenUp]:
    """`serial-cards-given-up.jsonl`: the cards a stop gave up (`CardGivenUp`)."""
    return LeftAtStopFile(
        Path(data_dir) / CARDS_GIVEN_UP_NAME,
        what=CARDS_GIVEN_UP_WHAT,
        lost=CARDS_GIVEN_UP_LOST,
        line_of=_card_line,
        record_of=_card_of,
        appends=True,  # two stops, the start between them failed: both cards are said
    )
