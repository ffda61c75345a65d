"""Part-10 payloads as they go on the wire: the file meta and SOP UIDs read without decoding the
data set, and the data set re-encoded for the transfer syntax the peer accepted.

Explicit and deflated are produced from the stored bytes directly (a slice, or zlib over it),
without decoding the data set: on a Pi that is most of the CPU a store costs. A deflated payload
is never inflated whole without a cap (`MAX_INFLATED_BYTES`): its UIDs are read from the first
inflated bytes only, and inflating it for a peer without deflate stops at the cap.
"""

from __future__ import annotations

import functools
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from types import ModuleType

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.values import convert_string
from pynetdicom.dsutils import encode

from devices.errors import ProtocolError
from devices.inflate import inflate, inflate_head
from uploader.errors import PermanentError

# A stored deflated payload inflates to at most this much (the LAN receiver refuses far smaller
# objects; this is the forwarder's own bound against a bomb that got into the outbox).
MAX_INFLATED_BYTES = 32 * 2**20
_HEAD_BYTES = 64 * 1024  # inflated bytes read at most for the SOP UIDs (they come first in a data set)
_FIRST_HEAD_BYTES = 2048  # tried first: inflating 64 KiB was most of the CPU a store cost here
_TAG_HEADER_BYTES = 8


class UnsendablePayload(PermanentError):
    """The payload is not a DICOM Part-10 file we can put on the wire (never will be)."""


@dataclass(frozen=True)
class Part10:
    data: bytes
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax: UID
    dataset_offset: int  # where the data set starts, after the file meta information

    def dataset_bytes(self) -> bytes:
        return self.data[self.dataset_offset :]


def _outside_group_2(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _past_sop_uids(tag: int, vr: str | None, length: int) -> bool:
    return tag > 0x00080018


# Digits and dots: carts in the field write malformed UIDs (trailing dots, leading zeros);
# we forward objects as received and let the PACS's answer decide.
_UID_TEXT = re.compile(r"[0-9.]*[0-9][0-9.]*\Z")


def _uid_of(ds: Dataset, tag: int, what: str) -> UID:
    elem = ds.get_item(tag)  # raw element: no pydicom conversion (or warnings) for a peek
    if elem is None or elem.value is None:
        raise UnsendablePayload(f"payload has no {what}")
    value = elem.value
    text = value.rstrip(b"\x00 ").decode("ascii") if isinstance(value, bytes) else str(value)
    if len(text) > 64 or not _UID_TEXT.match(text):
        raise UnsendablePayload(f"payload's {what} {text[:80]!r} is not a valid UID")
    return UID(text)


def parse_part10(data: bytes) -> Part10:
    """File meta and the data set's SOP class/instance UIDs, without decoding the rest."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise UnsendablePayload("payload is not a DICOM Part-10 file (no DICM prefix)")
    return read_part10_by_hand(data) or read_part10_with_pydicom(data)


# Explicit VR: the VRs whose length takes 2 bytes, and those with 2 reserved bytes and 4 (PS3.5 7.1.2)
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_HEADER = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<I")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_META_START = 132
_SOP_CLASS_TAG, _SOP_INSTANCE_TAG, _TRANSFER_SYNTAX_TAG = 0x00080016, 0x00080018, 0x00020010
_CHARSET_TAG = 0x00080005
_READ_BY_HAND = frozenset({ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})


def _scan_explicit(
    data: bytes, offset: int, stop: Callable[[int], bool], wanted: tuple[int, ...]
) -> tuple[dict[int, tuple[bytes, bytes]], int] | None:
    """The VRs and values of the `wanted` elements from `offset` (Explicit VR Little Endian) up to the
    first whose tag `stop`s the reading, and where that one starts (or the end of `data`).
    None for what a plain reading does not cover (undefined lengths, unknown VRs, tags out of
    order, an element cut short): pydicom reads those."""
    found: dict[int, tuple[bytes, bytes]] = {}
    end, previous = len(data), -1
    while offset < end:
        if end - offset < _SHORT_HEADER.size:
            return None
        group, element, vr, length = _SHORT_HEADER.unpack_from(data, offset)
        tag = group << 16 | element
        if stop(tag):
            return found, offset
        if tag <= previous:
            return None
        previous = tag
        start = offset + _SHORT_HEADER.size
        if vr in _LONG_VRS:
            if end - start < _LONG_LENGTH.size:
                return None
            (length,) = _LONG_LENGTH.unpack_from(data, start)
            start += _LONG_LENGTH.size
        elif vr not in _SHORT_VRS:
            return None
        if length == _UNDEFINED_LENGTH or length > end - start:
            return None
        if tag in wanted:
            found[tag] = (vr, data[start : start + length])
        offset = start + length
    return found, offset


# `_UID_TEXT`, on the raw value
_UID_BYTES = re.compile(rb"[0-9.]*[0-9][0-9.]*\Z")


def _uid_from_bytes(element: tuple[bytes, bytes] | None) -> UID | None:
    """The UID `_uid_of` would read from the raw value, or None (then `_uid_of` says what is wrong)."""
    if element is None:
        return None
    return _uid_text(element[1].rstrip(b"\x00 "))


@functools.lru_cache(maxsize=64)  # the transfer syntax and SOP class repeat: pydicom's UID() validates
def _uid_text(text: bytes) -> UID | None:
    if len(text) > 64 or not _UID_BYTES.match(text):
        return None
    return UID(text.decode("ascii"))


def read_part10_by_hand(data: bytes) -> Part10 | None:
    """`parse_part10`'s answer for the usual file with the DICM prefix (Explicit VR LE, deflated
    or not), read without pydicom: its reading of a few elements was a tenth of a store's CPU.
    None where pydicom must read the file (then it also says what is wrong with it)."""
    meta = _scan_explicit(data, _META_START, _outside_group_2_tag, (_TRANSFER_SYNTAX_TAG,))
    if meta is None:
        return None
    offset = meta[1]
    ts = _uid_from_bytes(meta[0].get(_TRANSFER_SYNTAX_TAG))
    if ts not in _READ_BY_HAND:
        return None
    body, start = data, offset
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            body, start = inflate_head(data[offset:], _FIRST_HEAD_BYTES), 0
        except ProtocolError:
            return None
    head = _scan_explicit(body, start, _past_sop_uids_tag, (_CHARSET_TAG, _SOP_CLASS_TAG, _SOP_INSTANCE_TAG))
    if head is None:
        return None
    charset = head[0].get(_CHARSET_TAG)
    if charset is not None and not _charset_reads(*charset):
        return None
    sop_class, sop_instance = (_uid_from_bytes(head[0].get(tag)) for tag in (_SOP_CLASS_TAG, _SOP_INSTANCE_TAG))
    if sop_class is None or sop_instance is None or ts is None:
        return None
    return Part10(data, sop_class, sop_instance, ts, offset)


@functools.lru_cache(maxsize=16)  # one or two character sets in a clinic's files
def _charset_reads(vr: bytes, value: bytes) -> bool:
    """Whether pydicom reads this Specific Character Set without raising: it looks the
    encodings up as it reads the data set, before the SOP UIDs (twice, as here). Its warning
    about an unknown one is given once per character set, not once per file."""
    try:
        convert_encodings(convert_string(value, True))
        raw = RawDataElement(BaseTag(_CHARSET_TAG), vr.decode("ascii"), len(value), value, 0, False, True)
        convert_encodings(convert_raw_data_element(raw).value)
    except Exception:  # noqa: BLE001 — whatever pydicom raises there, it raises reading the file
        return False
    return True


def _outside_group_2_tag(tag: int) -> bool:
    return tag >> 16 != 0x0002


def _past_sop_uids_tag(tag: int) -> bool:
    return tag > _SOP_INSTANCE_TAG


def read_part10_with_pydicom(data: bytes) -> Part10:
    """What `parse_part10` falls back to (and what its reading by hand is tested against)."""
    fp = BytesIO(data)
    fp.seek(132)
    try:
        meta = read_dataset(fp, False, True, stop_when=_outside_group_2)
        offset = fp.tell()
        ts = _uid_of(meta, 0x00020010, "Transfer Syntax UID")
        if ts.is_deflated:
            head = _deflated_head(data[offset:], ts)
        else:
            head = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=_past_sop_uids)
        sop_class = _uid_of(head, 0x00080016, "SOP Class UID")
        sop_instance = _uid_of(head, 0x00080018, "SOP Instance UID")
    except UnsendablePayload:
        raise
    except Exception as exc:  # noqa: BLE001 — pydicom raises many types on damaged bytes
        raise UnsendablePayload(f"payload has no readable file meta / SOP UIDs: {type(exc).__name__}: {exc}") from None
    return Part10(data, sop_class, sop_instance, ts, offset)


def _deflated_head(deflated: bytes, ts: UID) -> Dataset:
    """The elements up to the SOP UIDs of a deflated data set, inflating as little as it takes:
    2 KiB, then four times more, up to `_HEAD_BYTES`. A head is believed only if reading stopped
    at the element after the SOP UIDs (so none was cut short) or the stream ended within it."""
    size = _FIRST_HEAD_BYTES
    while True:
        head = inflate_head(deflated, size)
        source = BytesIO(head)
        try:
            ds = read_dataset(source, ts.is_implicit_VR, ts.is_little_endian, stop_when=_past_sop_uids)
        except Exception:  # a head cut inside an element: read more, or give up at the cap
            if size >= _HEAD_BYTES:
                raise
        else:
            whole = len(head) < size or source.tell() + _TAG_HEADER_BYTES <= len(head)
            if whole or size >= _HEAD_BYTES:
                return ds
        size = min(size * 4, _HEAD_BYTES)


def _deflate(raw: bytes, level: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate (PS3.5 A.5)
    out = compressor.compress(raw) + compressor.flush()
    return out + b"\x00" if len(out) % 2 else out


@functools.cache  # imported when first needed: a peer that takes deflate never needs it
def inflate_codec() -> ModuleType:
    """zlib-ng: it inflates a stored ECG 2-3 times faster than zlib (which was a third of the CPU
    a store cost where the peer takes no deflate); the standard library's zlib without it."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:  # a dependency; the standard library's does the same, slower
        return zlib
    return zlib_ng


def _inflated(obj: Part10) -> bytes:
    try:
        return inflate(obj.dataset_bytes(), max_bytes=MAX_INFLATED_BYTES, codec=inflate_codec())
    except ProtocolError as exc:
        raise UnsendablePayload(f"deflated payload cannot be sent inflated: {exc}") from None


def decode_dataset(obj: Part10) -> Dataset:
    """The whole data set decoded, with its file meta. pydicom would inflate a deflated one
    whole, however big: it is inflated here first, capped (UnsendablePayload past the cap)."""
    if not obj.transfer_syntax.is_deflated:
        return dcmread(BytesIO(obj.data))
    ds = read_dataset(BytesIO(_inflated(obj)), False, True)
    ds.file_meta = FileMetaDataset(read_dataset(BytesIO(obj.data[132 : obj.dataset_offset]), False, True))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the decoded data set now is
    return ds


# Bytes per word of the "other" VRs: pydicom keeps their values as the bytes it read and writes
# them back unchanged, so between big and little endian every word must be reversed here.
_WORD_BYTES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def _swap_words(ds: Dataset) -> None:
    """Reverse the byte order of every word of the OW/OL/OF/OD/OV values (Waveform Data,
    Waveform Padding Value ...), sequences included."""
    for elem in ds.iterall():
        size = _WORD_BYTES.get(str(elem.VR))
        if size and isinstance(elem.value, bytes) and elem.value:
            if len(elem.value) % size:
                raise UnsendablePayload(
                    f"{elem.keyword or elem.tag}: {len(elem.value)} bytes are no whole {elem.VR} words"
                )
            elem.value = reversed_words(elem.value, size)


def reversed_words(data: bytes, size: int) -> bytes:
    """`data` with the bytes of each `size`-byte word reversed. Slices, not numpy: the forward
    process keeps numpy out (~12 MB of RSS; lastmile/commands/forwarding.py)."""
    out = bytearray(len(data))
    for i in range(size):
        out[i::size] = data[size - 1 - i :: size]
    return bytes(out)


def encode_for(obj: Part10, syntax: UID, deflate_level: int = 4) -> bytes:
    """The data set encoded in `syntax`; cheap (no decoding) from Explicit VR LE."""
    source = obj.transfer_syntax
    if source == syntax:
        return obj.dataset_bytes()
    if source == ExplicitVRLittleEndian and syntax == DeflatedExplicitVRLittleEndian:
        return _deflate(obj.dataset_bytes(), deflate_level)
    if source == DeflatedExplicitVRLittleEndian and syntax == ExplicitVRLittleEndian:
        return _inflated(obj)
    uncompressed = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}
    if source not in uncompressed or syntax not in uncompressed:
        raise UnsendablePayload(f"cannot convert {source.name} to {syntax.name}")
    try:
        ds = decode_dataset(obj)
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise UnsendablePayload(f"payload does not decode: {exc}") from None
    if source.is_little_endian != syntax.is_little_endian:
        _swap_words(ds)
    encoded = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if encoded is None:
        raise UnsendablePayload(f"payload cannot be encoded as {syntax.name}")
    return encoded
