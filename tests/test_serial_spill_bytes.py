"""lastmile/services/serial_spill.py: whatever bytes the spill file holds at a start (a torn
header, a flipped bit, garbage), reading it never crashes the serial part and the next save works."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import tempfile
import time as clock
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lastmile.clinic.observations import observation_to_json
from lastmile.services import serial_spill
from lastmile.services.serial_spill import HEADER, MAGIC, SPILL_NAME, SpillFile, newest_copy, waiting_readings
from tests.console_harness import bp_reading

SIZE = 16384  # a small spill file: two slots of 8 KB
NOW = dt.datetime(2026, 12, 7, 8, 0, tzinfo=dt.timezone.utc)
READING = observation_to_json(bp_reading(NOW, "bp-held"))


def slot_bytes(generation: int, body: bytes, *, length: int | None = None, digest: bytes | None = None) -> bytes:
    """One slot as the gateway writes it (or with another length or digest: torn)."""
    length = len(body) if length is None else length
    return (
        MAGIC
        + generation.to_bytes(8, "big")
        + length.to_bytes(4, "big")
        + (hashlib.sha256(body).digest() if digest is None else digest)
        + body
    )


def spill_file(data: Path, slots: list[bytes], size: int = SIZE) -> Path:
    path = data / SPILL_NAME
    raw = bytearray(size)
    for i, content in enumerate(slots):
        raw[i * (size // 2) : i * (size // 2) + len(content)] = content[: size // 2]
    path.write_bytes(bytes(raw))
    return path


def test_a_torn_header_s_generation_of_8_bytes_0xff_is_not_trusted(tmp_path: Path) -> None:
    """A slot header whose generation is 8 bytes 0xFF (a torn write): trusted, the next save's
    generation did not fit its 8 bytes, and OverflowError crashed `load` at every start (all serial
    devices down) or `hold_observation` (the reading in memory only, the row never saying it). Now a
    generation >= 2**63 is none the gateway wrote: the file is damaged, what is whole comes back,
    and the next save works."""
    data = tmp_path / "data"
    data.mkdir()
    body = json.dumps({"monitor": [READING]}).encode()
    spill_file(data, [slot_bytes(3, body), slot_bytes(2**64 - 1, b"{}")])
    spill = SpillFile(data, size=SIZE)  # the start
    loaded = spill.load()
    assert [o.record_key for o in loaded["monitor"]] == [READING["record_key"]]
    assert spill.damage and not spill.gave_back_all, spill.damage
    spill.save({"monitor": [*loaded["monitor"], bp_reading(NOW, "bp-next")]})  # hold_observation's save
    assert spill.kept and waiting_readings(data) == 2


def test_a_save_into_a_damaged_file_written_in_place_never_goes_over_its_only_whole_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged spill file that cannot be set aside is written in place. Its newest copy torn
    (generation 7), the older one (6) whole but holding a record that does not decode: the next
    save went into the slot of the highest header's other slot - the only whole copy's - and a
    power cut mid-save lost the readings it gave back. Now the save goes into the torn copy's slot,
    above its generation."""
    data = tmp_path / "data"
    data.mkdir()
    whole = json.dumps({"monitor": [READING, {"not": "a reading"}]}).encode()
    spill_file(data, [slot_bytes(6, whole), slot_bytes(7, b'{"monitor":[]}', digest=bytes(32))])
    for s in range(-5, 120):  # every name it could be set aside as is taken: the rename fails
        stamp = clock.strftime("%Y%m%dT%H%M%SZ", clock.gmtime(clock.time() + s))
        (data / f"{SPILL_NAME}.{stamp}.bad").mkdir(exist_ok=True)
        (data / f"{SPILL_NAME}.{stamp}.bad" / "x").write_bytes(b"x")
    real_pwrite = os.pwrite

    def power_cut(fd: int, data: bytes, offset: int) -> int:  # half of the copy written, then nothing
        real_pwrite(fd, data[: len(data) // 2], offset)
        raise OSError(errno.EIO, "the power failed")

    spill = SpillFile(data, size=SIZE)  # the start
    monkeypatch.setattr(serial_spill.os, "pwrite", power_cut)
    loaded = spill.load()  # what it gave back saved again, in place: the power fails mid-save
    monkeypatch.undo()
    assert [o.record_key for o in loaded["monitor"]] == [READING["record_key"]] and spill.in_place
    newest = newest_copy(data / SPILL_NAME)  # the next start
    assert newest is not None and newest[1] == 6, newest
    assert newest[2]["monitor"][0]["record_key"] == READING["record_key"]
    spill.save({"monitor": loaded["monitor"]})  # power back: above every generation in it
    newest = newest_copy(data / SPILL_NAME)
    assert newest is not None and newest[1] == 8 and newest[2] == {"monitor": [READING]}, newest


def _record() -> st.SearchStrategy[object]:
    anything = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    )
    spoiled = st.builds(lambda k, v: {**READING, k: v}, st.sampled_from(sorted(READING)), anything)
    return st.just(READING) | spoiled | anything


def _body() -> st.SearchStrategy[bytes]:
    content = st.dictionaries(st.sampled_from(["monitor", "bridge", ""]), st.lists(_record(), max_size=3), max_size=2)
    return st.binary(max_size=64) | content.map(lambda c: json.dumps(c).encode()) | st.just(b"[" * 3000)


def _slot() -> st.SearchStrategy[bytes]:
    generation = st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 2**63 - 2, 2**63 - 1, 2**63, 2**64 - 1])
    whole = st.builds(lambda g, b: slot_bytes(g, b), generation, _body())
    torn = st.builds(
        lambda g, b, n, d: slot_bytes(g, b, length=n, digest=d),
        generation,
        _body(),
        st.integers(0, 2**32 - 1),
        st.binary(min_size=32, max_size=32),
    )
    return whole | torn | st.binary(max_size=HEADER + 8) | st.just(b"")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slots=st.lists(_slot(), min_size=2, max_size=2), size=st.sampled_from([SIZE, SIZE, SIZE, 0, 1, SIZE * 2]))
def test_any_bytes_in_the_spill_file_give_back_what_is_whole_or_say_damaged_and_the_next_save_works(
    slots: list[bytes], size: int
) -> None:
    """Any bytes in the spill file at a start: `load` gives back the records of its newest whole
    copy or says the file is damaged, never raises, and a save after it keeps the next reading."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        spill_file(data, slots, size)
        before = newest_copy(data / SPILL_NAME)
        spill = SpillFile(data, size=SIZE)
        loaded = spill.load()
        records = sum(len(v) for v in before[2].values()) if before else 0
        assert spill.damage or sum(len(v) for v in loaded.values()) == records, (spill.damage, loaded, before)
        held = [o for obs in loaded.values() for o in obs] + [bp_reading(NOW, "bp-next")]
        spill.save({"monitor": held})
        assert spill.kept and waiting_readings(data) == len(held), spill.damage
        again = SpillFile(data, size=SIZE).load()
        assert [o.record_key for o in again["monitor"]] == [o.record_key for o in held]
