"""CRC-32 (IEEE 802.3, as zlib/binascii): the frame check of the bridge protocol.

Uses binascii.crc32 where the runtime has it (CPython; most MicroPython ports) and a
table-driven fallback otherwise; both give the same value (tests check it).
"""

_TABLE = None


def crc32_table(data: bytes, crc: int = 0) -> int:
    """Portable CRC-32 for runtimes without binascii.crc32."""
    global _TABLE
    if _TABLE is None:
        table = []
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            table.append(c)
        _TABLE = table
    t = _TABLE
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


try:
    from binascii import crc32 as _native_crc32

    def crc32(data: bytes, crc: int = 0) -> int:
        return _native_crc32(data, crc) & 0xFFFFFFFF
except ImportError:
    crc32 = crc32_table
