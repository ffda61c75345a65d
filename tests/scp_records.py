"""Building SCP-ECG records from section bodies, for the tests of the SCP decoder and of what
reads or writes SCP records (shared by several test files)."""

from __future__ import annotations

import binascii
import struct

import numpy as np

from devices.ecg.scp import HuffmanCode


def record_crc(chunk: bytes) -> int:
    """The CRC-CCITT of SCP-ECG sections and records."""
    return binascii.crc_hqx(chunk, 0xFFFF)


def build_record(bodies: dict[int, bytes], protocol: int = 20, *, listed_only: bool = False) -> bytes:
    """An SCP-ECG record from section bodies (without headers); section 0 is made here and lists
    sections 1-11 (absent ones with length 0), or with `listed_only` just the given ones."""
    ids = sorted(set(bodies) if listed_only else set(range(1, 12)) | set(bodies))
    sec0_len = 16 + 10 * (len(ids) + 1)
    layout = []
    index = 7 + sec0_len
    for sid in ids:
        body = bodies.get(sid)
        length = 16 + len(body) if body is not None else 0
        layout.append((sid, length, index if length else 0))
        index += length
    pointers = struct.pack("<HII", 0, sec0_len, 7) + b"".join(struct.pack("<HII", *p) for p in layout)

    def section(sid: int, body: bytes) -> bytes:
        reserved = b"SCPECG" if sid == 0 else bytes(6)
        rest = struct.pack("<HIBB", sid, 16 + len(body), protocol, protocol) + reserved + body
        return struct.pack("<H", record_crc(rest)) + rest

    content = section(0, pointers) + b"".join(section(sid, bodies[sid]) for sid in ids if sid in bodies)
    rest = struct.pack("<I", 6 + len(content)) + content
    return struct.pack("<H", record_crc(rest)) + rest


def sections_of(data: bytes) -> dict[int, bytes]:
    """Section bodies of a record (inverse of build_record)."""
    out = {}
    sec0_len = struct.unpack_from("<I", data, 10)[0]
    for pos in range(22, 6 + sec0_len, 10):
        sid, length, index = struct.unpack_from("<HII", data, pos)
        if sid and length:
            out[sid] = data[index - 1 + 16 : index - 1 + length]
    return out


def restamp(data: bytes) -> bytes:
    """Recompute every section CRC and the record CRC in place (lengths unchanged)."""
    buf = bytearray(data)
    sec0_len = struct.unpack_from("<I", buf, 10)[0]
    spans = [(6, sec0_len)]
    for pos in range(22, min(6 + sec0_len, len(buf) - 9), 10):
        sid, length, index = struct.unpack_from("<HII", buf, pos)
        if sid and length >= 16 and index and index - 1 + length <= len(buf):
            spans.append((index - 1, length))
    for offset, length in spans:
        if offset + length <= len(buf):
            struct.pack_into("<H", buf, offset, record_crc(bytes(buf[offset + 2 : offset + length])))
    struct.pack_into("<H", buf, 0, record_crc(bytes(buf[2:])))
    return bytes(buf)


def rhythm_body(
    samples: np.ndarray, avm_nv: int, interval_us: int, encoded: list[bytes], differences: int, bimodal: int = 0
) -> bytes:
    head = struct.pack("<HHBB", avm_nv, interval_us, differences, bimodal)
    return head + b"".join(struct.pack("<H", len(e)) for e in encoded) + b"".join(encoded)


def lead_body(codes: list[int], n: int, flags: int = 0x04) -> bytes:
    return bytes([len(codes), flags]) + b"".join(struct.pack("<IIB", 1, n, c) for c in codes)


def differences_of(x: np.ndarray, mode: int) -> np.ndarray:
    x = x.astype(np.int64)
    if mode == 0:
        return x
    if mode == 1:
        return np.concatenate(([x[0]], np.diff(x)))
    return np.concatenate((x[:2], x[2:] - 2 * x[1:-1] + x[:-2]))


class BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def put(self, value: int, width: int) -> None:
        self.bits.extend((value >> (width - 1 - i)) & 1 for i in range(width))

    def bytes(self) -> bytes:
        bits = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


def table_body(tables: list[list[HuffmanCode]]) -> bytes:
    out = struct.pack("<H", len(tables))
    for table in tables:
        out += struct.pack("<H", len(table))
        for c in table:
            stored = int(format(c.code, f"0{c.prefix_bits}b")[::-1], 2)  # first bit in the LSB
            out += struct.pack("<BBBhI", c.prefix_bits, c.total_bits, 0 if c.switch else 1, c.value, stored)
    return out


# Two custom tables: table 1 codes small values and switches to table 2, which codes
# values with an 8-bit payload on top of a base value (+100) and switches back.
TABLE_1 = [
    HuffmanCode(1, 1, False, 0, 0b0),
    HuffmanCode(3, 3, False, 1, 0b100),
    HuffmanCode(3, 3, False, -1, 0b101),
    HuffmanCode(3, 3, True, 2, 0b110),
    HuffmanCode(3, 19, False, 0, 0b111),
]
TABLE_2 = [HuffmanCode(1, 1, True, 1, 0b1), HuffmanCode(2, 10, False, 100, 0b00), HuffmanCode(2, 2, False, 7, 0b01)]


def encode_custom(values: np.ndarray) -> bytes:
    w = BitWriter()
    for i, v in enumerate(int(x) for x in values):
        if i % 50 == 25 and (v == 7 or -128 <= v - 100 <= 127):  # exercise table 2
            w.put(0b110, 3)
            if v == 7:
                w.put(0b01, 2)
            else:
                w.put(0b00, 2)
                w.put((v - 100) & 0xFF, 8)
            w.put(0b1, 1)
        elif v == 0:
            w.put(0, 1)
        elif v in (1, -1):
            w.put(0b100 if v == 1 else 0b101, 3)
        else:
            w.put(0b111, 3)
            w.put(v & 0xFFFF, 16)
    return w.bytes()


def encode_default(values: np.ndarray) -> bytes:
    w = BitWriter()
    for v in (int(x) for x in values):
        if v == 0:
            w.put(0, 1)
        elif -8 <= v <= 8:
            n = abs(v)
            w.put((((1 << n) - 1) << 2) | (v < 0), n + 2)
        elif -128 <= v <= 127:
            w.put(0b1111111110, 10)
            w.put(v & 0xFF, 8)
        else:
            w.put(0b1111111111, 10)
            w.put(v & 0xFFFF, 16)
    return w.bytes()
