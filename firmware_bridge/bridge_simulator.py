"""A simulated bridge for tests, benchmarks and demos: the firmware's own `BridgeCore` plus a
deterministic 12-lead ECG front-end. Everything it sends is built by the shared codec.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from devices.bridge import codec
from devices.ecg.recording import STANDARD_12_LEADS
from firmware_bridge.firmware.bridge_core import BridgeCore


def ecg_samples(first: int, count: int, n_leads: int = 12) -> np.ndarray:
    """Deterministic test signal, shape (count, n_leads) int16: sample k of lead j depends only
    on (k, j), so a receiver can check every sample it got against what was sent."""
    k = np.arange(first, first + count, dtype=np.int64)[:, None]
    j = np.arange(n_leads, dtype=np.int64)[None, :]
    # ±600 units (±1.5 mV at 2.5 µV/unit), like a real ECG: many 0x00/0xFF high bytes, the
    # worst case for COBS (each zero byte ends a block).
    return (((k * (j + 1) * 37 + j * 1013) % 1201) - 600).astype(np.int16)


class EcgStreamSimulator:
    """Frames of one streamed ECG recording as a bridge sends them."""

    def __init__(
        self,
        core: BridgeCore,
        *,
        recording_id: int = 1,
        sampling_rate_hz: int = 500,
        lead_names: tuple[str, ...] = STANDARD_12_LEADS,
        block_samples: int = 25,
        uv_per_unit: float = 2.5,
    ) -> None:
        self.core = core
        self.recording_id = recording_id
        self.rate = sampling_rate_hz
        self.leads = lead_names
        self.block_samples = block_samples
        self.uv_per_unit = uv_per_unit

    def start(self, now_ms: int) -> bytes:
        flags, device_ms = self.core.time_stamp(now_ms)
        return self.core.send(
            codec.EcgStart(self.recording_id, flags, device_ms, self.rate, self.uv_per_unit, self.leads),
            now_ms,
            reliable=False,
        )

    def block(self, first: int, now_ms: int = 0) -> bytes:
        data = ecg_samples(first, self.block_samples, len(self.leads)).astype("<i2").tobytes()
        return self.core.send(codec.EcgBlock(self.recording_id, first, len(self.leads), data), now_ms, reliable=False)

    def blocks(self, n_blocks: int, *, skip: Iterable[int] = (), duplicate: Iterable[int] = ()) -> Iterator[bytes]:
        """Block frames 0..n_blocks-1; `skip` ones are never sent (gaps), `duplicate` ones are
        sent twice (a resend: same counter, new sequence number)."""
        skip, duplicate = set(skip), set(duplicate)
        for i in range(n_blocks):
            if i in skip:
                continue
            frame = self.block(i * self.block_samples)
            yield frame
            if i in duplicate:
                yield self.block(i * self.block_samples)

    def end(self, total_samples: int, now_ms: int, status: int = codec.ECG_END_COMPLETE) -> bytes:
        return self.core.send(codec.EcgEnd(self.recording_id, total_samples, status), now_ms)
