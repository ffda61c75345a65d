"""Consistent Overhead Byte Stuffing: frames that never contain 0x00, so 0x00 can delimit them.

Runs unchanged on MicroPython (bridge firmware) and CPython: no `__future__`, no typing imports.
"""

try:
    from devices.errors import ProtocolError
except ImportError:  # on a board that carries only devices/bridge/

    class ProtocolError(ValueError):  # type: ignore[no-redef]
        pass


def encode(data: bytes) -> bytes:
    """COBS-encode `data` (no trailing delimiter)."""
    out = bytearray()
    chunks = bytes(data).split(b"\x00")
    last = len(chunks) - 1
    for index, chunk in enumerate(chunks):
        # A 0xFF code carries 254 bytes and no implied zero, so long runs are split.
        while len(chunk) >= 254:
            out.append(0xFF)
            out.extend(chunk[:254])
            chunk = chunk[254:]
            if not chunk and index == last:
                return bytes(out)  # canonical form: no empty block after a final 0xFF block
        out.append(len(chunk) + 1)
        out.extend(chunk)
    return bytes(out)


def decode(encoded: bytes) -> bytes:
    """Decode one COBS frame (delimiter already removed); raise ProtocolError if malformed."""
    if b"\x00" in encoded:
        raise ProtocolError("zero byte inside a COBS frame")
    out = bytearray()
    n = len(encoded)
    i = 0
    while i < n:
        code = encoded[i]
        end = i + code
        if end > n:
            raise ProtocolError("COBS block runs past the end of the frame")
        out.extend(encoded[i + 1 : end])
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)
