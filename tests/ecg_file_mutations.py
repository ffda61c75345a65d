"""Hypothesis strategies that damage real ECG files: byte flips, truncations, insertions,
deletions. Every decoder's fuzz test feeds these to its decoder with the contract
"decode to a valid recording, or raise ProtocolError - nothing else"."""

from __future__ import annotations

from hypothesis import strategies as st

from devices.ecg.recording import EcgRecording
from devices.errors import ProtocolError

_OP = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("set"), st.floats(0, 1, exclude_max=True), st.sampled_from([0, 0xFF, 0x7F, 0x80])),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.floats(0, 1, exclude_max=True), st.integers(1, 64)),
)


def apply(data: bytes, ops: list[tuple], lo: int = 0, hi: int | None = None) -> bytes:
    """Apply mutation ops; positions are fractions of the byte range [lo, hi)."""
    buf = bytearray(data)
    for kind, where, arg in ops:
        end = len(buf) if hi is None else min(hi, len(buf))
        if end <= lo:
            break
        pos = lo + int(where * (end - lo))
        if kind == "flip":
            buf[pos] ^= arg
        elif kind == "set":
            buf[pos] = arg
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "delete":
            del buf[pos : pos + arg]
    return bytes(buf)


def mutations(max_ops: int = 4) -> st.SearchStrategy[list[tuple]]:
    return st.lists(_OP, min_size=1, max_size=max_ops)


def decodes_or_refuses(decode, data: bytes) -> EcgRecording | None:
    """The fuzz contract: a valid recording (checked by its constructor) or ProtocolError."""
    try:
        recording = decode(data)
    except ProtocolError as exc:
        refusal = str(exc)
    else:
        assert isinstance(recording, EcgRecording)
        return recording
    assert refusal, "a refusal must say why"
    return None
