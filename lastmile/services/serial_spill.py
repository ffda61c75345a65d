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
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO

from devices.ecg.npz import read_npz, write_npz
from devices.ecg.recording import EcgRecording
from devices.observation import Observation
from lastmile.clinic.observations import observation_from_json, observation_to_json
from uploader.payload_files import fsync_dir

log = logging.getLogger(__name__)

SPILL_NAME = "serial-spill.dat"
SPILL_BYTES = 256 * 1024  # two slots of 128 KB: ~200 readings of ~600 bytes each
ECG_SPILL_NAME = "serial-ecg-spill.dat"
ECG_SPILL_BYTES = 4 * 1024 * 1024  # two slots of 2 MB: ~25 streamed 10 s 12-lead ECGs, compressed
MAGIC = b"LMSPILL1"
HEADER = len(MAGIC) + 8 + 4 + 32  # magic, generation, length, sha256

Spilled = dict[str, list[Observation]]  # device name -> readings waiting for space
SpilledRecordings = dict[str, dict[str, EcgRecording]]  # device name -> outbox key -> streamed ECG


def recording_to_json(key: str, recording: EcgRecording) -> dict:
    """A streamed ECG held for space (it names no patient yet: that is decided when it is stored),
    in the .npz layout devices.ecg.npz reads back whole (deflated: the file holds ~25 ECGs)."""
    return {
        "key": key,
        "npz": base64.b64encode(write_npz(recording)).decode(),
        "source_format": recording.source_format,
    }


def recording_from_json(data: dict) -> tuple[str, EcgRecording]:
    recording = read_npz(base64.b64decode(data["npz"]))
    return data["key"], dataclasses.replace(recording, source_format=data["source_format"])


def _slot_header(f: BinaryIO, offset: int) -> tuple[int, int, bytes] | None:
    """(generation, length, sha256) of the slot at `offset`, None if it never held a copy."""
    raw = os.pread(f.fileno(), HEADER, offset)
    if len(raw) < HEADER or not raw.startswith(MAGIC):
        return None
    at = len(MAGIC)
    return int.from_bytes(raw[at : at + 8], "big"), int.from_bytes(raw[at + 8 : at + 12], "big"), raw[at + 12 :]


def _newest(path: Path) -> tuple[int, int, dict[str, list[dict]]] | None:
    """(slot, generation, content) of the newest whole copy in the file at `path`: the two slot
    headers, then only the body of the newest one (the other's too if that one is torn)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None
    with f:
        half = os.fstat(f.fileno()).st_size // 2
        headers = [(slot, _slot_header(f, slot * half)) for slot in (0, 1)]
        found = sorted(((h[0], slot, h[1], h[2]) for slot, h in headers if h is not None), reverse=True)
        for generation, slot, length, digest in found:
            body = os.pread(f.fileno(), length, slot * half + HEADER) if HEADER + length <= half else b""
            if len(body) == length and hashlib.sha256(body).digest() == digest:
                return slot, generation, json.loads(body)
    return None


def kept_in(spill: SpillFile | None) -> bool:
    """Whether `spill` (None: no file set aside) holds all that waits."""
    return spill is not None and spill.kept


def waiting_readings(data_dir: Path, name: str = SPILL_NAME) -> int:
    """How many readings (ECGs with `ECG_SPILL_NAME`) the spill file `name` in `data_dir` holds
    (0 without one); never creates it."""
    newest = _newest(Path(data_dir) / name)
    return 0 if newest is None else sum(len(v) for v in newest[2].values())


class SpillFile:
    """The spill file of one data directory; `usable` is False when it could not be allocated.
    `kept`: whether it holds all that waits (what its last save did, or what it held at `load`);
    `holds`: how many readings (ECGs) of each device it holds, what a restart would load (a save
    that failed left the copy before it)."""

    def __init__(self, data_dir: Path, size: int = SPILL_BYTES, name: str = SPILL_NAME) -> None:
        self.path = Path(data_dir) / name
        self.usable = self._allocate(size)
        self.kept = False
        newest = _newest(self.path) if self.usable else None
        self._slot, self._generation = (newest[0], newest[1]) if newest else (1, 0)
        self._at_start = newest[2] if newest else {}  # for `load`: the file is read once
        self.holds = {name: len(items) for name, items in self._at_start.items() if items}
        self.slot_bytes = self.path.stat().st_size // 2 if self.usable else 0

    def _allocate(self, size: int) -> bool:
        if self.path.exists():
            return True
        tmp = self.path.with_name(f".{self.path.name}.new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # the blocks, taken now while there is room
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.error("cannot set aside %s for readings a full disk refuses: %s", self.path, exc)
            return False
        return True

    def load(self) -> Spilled:
        """What the file held when it was opened (a previous run's readings): kept there until the next save."""
        loaded = {name: [observation_from_json(o) for o in obs] for name, obs in self._at_start.items() if obs}
        self.kept = bool(loaded)
        return loaded

    def save(self, spilled: Spilled) -> None:
        """Write `spilled` (all that waits, replacing what the file held) in place and fsync it;
        `kept` False when it cannot be (no file, too many readings, an I/O error)."""
        self._save({name: [observation_to_json(o) for o in obs] for name, obs in spilled.items() if obs})

    def load_recordings(self) -> SpilledRecordings:
        """The streamed ECGs the file held when it was opened (a previous run's), as `load`."""
        loaded = {
            name: dict(recording_from_json(r) for r in recordings)
            for name, recordings in self._at_start.items()
            if recordings
        }
        self.kept = bool(loaded)
        return loaded

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
        header = MAGIC + generation.to_bytes(8, "big") + len(body).to_bytes(4, "big") + hashlib.sha256(body).digest()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)  # no O_TRUNC: the blocks stay ours
            try:
                os.pwrite(fd, header + body, slot * self.slot_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot write waiting readings to %s: %s", self.path, exc)
            return False
        self._slot, self._generation = slot, generation
        return True
