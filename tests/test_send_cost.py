"""What sending one object costs the gateway (issue 16, item 4): the per-object bookkeeping
commits without an fsync, and a deflated object's UIDs are read from a small inflated head.

Durability is reasoned in uploader/outbox.py: a power cut may undo `begin_send` (a counter) or
`mark_sent` (the object is sent again under the same UIDs); everything that lets a payload go
(`mark_committed`, purge) stays an fsynced commit. A killed process loses none of them
(tests/test_outbox.py's SIGKILL tests)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, DeflatedExplicitVRLittleEndian

import uploader.dicom_part10
from uploader.dicom_part10 import UnsendablePayload, parse_part10
from uploader.outbox import Outbox

T0 = 1_700_000_000.0
ECG_CLASS = "1.2.840.10008.5.1.4.1.1.9.1.1"
INSTANCE = "2.25.1234567890123456789012345678901234567"


# -- outbox: which commits are fsynced ---------------------------------------------------------
@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox.open(tmp_path / "data", min_free_bytes=0, reserve_bytes=0, now=T0) as ob:
        yield ob


def synchronous_of_writes(outbox: Outbox, action: Callable[[], object]) -> list[tuple[str, str]]:
    """(synchronous setting, statement) for each write `action` makes on the outbox's connection."""
    seen: list[tuple[str, str]] = []
    mode = ["FULL"]

    def trace(sql: str) -> None:
        text = " ".join(sql.split())
        if text.upper().startswith("PRAGMA SYNCHRONOUS="):
            mode[0] = text.split("=", 1)[1].upper()
        elif text.split(" ", 1)[0].upper() in ("UPDATE", "INSERT", "DELETE"):
            seen.append((mode[0], text))

    outbox.db.conn.set_trace_callback(trace)
    try:
        action()
    finally:
        outbox.db.conn.set_trace_callback(None)
    return seen


def test_send_bookkeeping_is_not_fsynced_but_what_frees_a_payload_is(outbox: Outbox) -> None:
    item = outbox.add("dicom", "k1", b"x" * 100, now=T0).item
    (claimed,) = outbox.claim("dicom", 1, T0)
    assert claimed.id == item.id

    begin = synchronous_of_writes(outbox, lambda: outbox.begin_send(item.id, T0))
    sent = synchronous_of_writes(outbox, lambda: outbox.mark_sent([item.id], T0))
    committed = synchronous_of_writes(outbox, lambda: outbox.mark_committed([item.id], T0))
    added = synchronous_of_writes(outbox, lambda: outbox.add("dicom", "k2", b"y" * 100, now=T0))

    assert begin and {mode for mode, _sql in begin} == {"NORMAL"}, begin
    assert sent and {mode for mode, _sql in sent} == {"NORMAL"}, sent
    assert committed and {mode for mode, _sql in committed} == {"FULL"}, committed
    assert added and {mode for mode, _sql in added} == {"FULL"}, added
    # the connection is left fsyncing for whoever writes next (2 = FULL)
    assert outbox.db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    got = outbox.get(item.id)
    assert got is not None and got.state.value == "committed" and got.attempts == 1


def test_a_failed_unsynced_write_leaves_the_connection_fsyncing(outbox: Outbox) -> None:
    item = outbox.add("dicom", "k1", b"x" * 100, now=T0).item
    outbox.claim("dicom", 1, T0)
    outbox.db.conn.execute(
        "CREATE TRIGGER no_sent BEFORE UPDATE OF sent_at ON items BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    with pytest.raises(Exception, match="no"):
        outbox.mark_sent([item.id], T0)
    assert outbox.db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert not outbox.db.conn.in_transaction


# -- a deflated object's head --------------------------------------------------------------------
def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in (b"UN", b"OB", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def deflated_part10(padding: int, instance: str = INSTANCE) -> bytes:
    """A deflated Part-10 object with `padding` bytes in an element before the SOP UIDs."""
    dataset = (
        element(0x0008, 0x0005, b"CS", b"ISO_IR 192")
        + element(0x0008, 0x0010, b"UN", bytes(range(256)) * (padding // 256) + b"p" * (padding % 256))
        + element(0x0008, 0x0016, b"UI", ECG_CLASS.encode())
        + element(0x0008, 0x0018, b"UI", instance.encode())
        + element(0x0008, 0x0020, b"DA", b"20261201")
        + element(0x0010, 0x0010, b"PN", b"DOE^JOHN")
    )
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflater.compress(dataset) + deflater.flush()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ECG_CLASS
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out = BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta)  # type: ignore[arg-type]
    return out.getvalue() + body


def instance_offset(padding: int) -> int:
    """Where the SOP Instance UID's value starts in the inflated data set."""
    return 18 + (12 + padding + padding % 2) + (8 + len(ECG_CLASS) + len(ECG_CLASS) % 2) + 8


@pytest.mark.parametrize(
    "cut_at",
    # the UID's value cut by the first head (2 KiB), by the second (8 KiB), by the third (32 KiB),
    # whole in the first, and an element header cut
    [2048 - 10, 8192 - 30, 32768 - 5, 100, 2048 + 4],
)
def test_uids_are_whole_wherever_a_head_ends(cut_at: int) -> None:
    padding = max(0, cut_at - instance_offset(0))
    payload = deflated_part10(padding)
    obj = parse_part10(payload)
    assert str(obj.sop_instance_uid) == INSTANCE
    assert str(obj.sop_class_uid) == ECG_CLASS
    assert obj.transfer_syntax == DeflatedExplicitVRLittleEndian


def test_uids_beyond_the_head_cap_are_refused() -> None:
    with pytest.raises(UnsendablePayload):
        parse_part10(deflated_part10(70_000))


def test_a_deflated_ecg_inflates_only_a_small_head(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    real = uploader.dicom_part10.inflate_head

    def counting(data: bytes, n: int) -> bytes:
        asked.append(n)
        return real(data, n)

    monkeypatch.setattr(uploader.dicom_part10, "inflate_head", counting)
    obj = parse_part10(deflated_part10(300))
    assert str(obj.sop_instance_uid) == INSTANCE
    assert asked and max(asked) <= 4096, asked
