"""Inflating untrusted deflate streams with a cap (DICOM Deflated Explicit VR Little Endian, PS3.5 A.5).

`zlib.decompress` inflates everything it is given: a 1 MB stream can become 1 GiB in memory
(a "decompression bomb"). Here the stream is inflated piece by piece (`decompressobj` with
`max_length`), and inflating stops as soon as the output passes the caller's limit.
"""

from __future__ import annotations

import zlib
from types import ModuleType

from devices.errors import ProtocolError

_PIECE = 1 << 20  # output bytes per decompress call: bounds the memory of one step


class InflateLimitError(ProtocolError):
    """The stream inflates to more than the caller allows (a decompression bomb, or simply too big)."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


def inflate(
    data: bytes | bytearray | memoryview, *, max_bytes: int, keep: int | None = None, codec: ModuleType = zlib
) -> bytes:
    """Inflate raw deflate `data` whole, refusing (InflateLimitError) once the output exceeds
    `max_bytes`; a stream that is not valid or ends early raises ProtocolError.

    Returns the inflated bytes, or only their first `keep` bytes (the rest is counted, checked
    and dropped: memory stays at `keep` plus one piece whatever the object's size).
    `codec`: a module with zlib's API (`decompressobj`, `error`), e.g. a faster implementation
    the caller may depend on (this package uses the standard library only).
    """
    inflater = codec.decompressobj(-zlib.MAX_WBITS)
    kept: list[bytes] = []
    kept_len = 0
    total = 0
    pending = data
    try:
        while True:
            piece = inflater.decompress(pending, _PIECE)
            pending = inflater.unconsumed_tail
            total += len(piece)
            if total > max_bytes:
                raise InflateLimitError(
                    f"deflated data inflates to more than {max_bytes} bytes (from {len(data)} bytes)", max_bytes
                )
            if keep is None or kept_len < keep:
                if keep is not None:
                    piece = piece[: keep - kept_len]
                kept.append(piece)
                kept_len += len(piece)
            if inflater.eof or not (piece or pending):
                break  # the end, or nothing more to inflate from what was given (truncated)
    except codec.error as exc:
        raise ProtocolError(f"deflated data does not inflate: {exc}") from None
    if not inflater.eof:
        raise ProtocolError("deflated data ends before its stream does (truncated)")
    return b"".join(kept)


def inflate_head(data: bytes, n: int) -> bytes:
    """The first `n` inflated bytes of raw deflate `data` (fewer if the stream is shorter), without
    inflating the rest: enough to read the first elements of a deflated data set."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        return inflater.decompress(data, n)
    except zlib.error as exc:
        raise ProtocolError(f"deflated data does not inflate: {exc}") from None
