"""Streamed ECG: ECG_START / ECG_BLOCK ... / ECG_END become one `EcgRecording`.

The sample counter of each block is the truth: a jump is a gap, a repeat is a duplicate
(dropped). Gaps follow the recording's convention (shared with uploader/dicom_ecg.py): the
missing samples are *absent* from `samples` and `SampleGap(start, missing)` says they belong
just before index `start`; the DICOM builder puts them back as Waveform Padding Value
(`GAP_FILL`) with an annotation, so the time axis stays true and nothing is papered over.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from devices.bridge import codec
from devices.ecg.recording import EcgRecording, SampleGap
from devices.errors import ProtocolError
from devices.identity import DeviceIdentity, TimeSource

# The DICOM Waveform Padding Value that marks samples that never arrived. A real sample at the
# negative rail is moved up by one unit so the marker stays unambiguous (it is saturated anyway).
GAP_FILL = -32768
MAX_RATE_HZ = 2000
DEFAULT_MAX_SECONDS = 1800.0  # a stream longer than this is refused rather than exhausting RAM


@dataclass(frozen=True, slots=True)
class BlockOutcome:
    accepted: int  # new samples taken
    duplicate: int  # samples we already had
    gap: SampleGap | None  # missing samples before this block, if any


class EcgAssembler:
    """Collects the blocks of one recording; `finish()` returns the recording."""

    def __init__(
        self,
        start: codec.EcgStart,
        *,
        acquired_at: dt.datetime,
        time_source: TimeSource,
        device: DeviceIdentity,
        max_seconds: float = DEFAULT_MAX_SECONDS,
    ) -> None:
        if not 1 <= start.sampling_rate_hz <= MAX_RATE_HZ:
            raise ProtocolError(f"ECG_START with a sampling rate of {start.sampling_rate_hz} Hz")
        if not (np.isfinite(start.uv_per_unit) and 0 < start.uv_per_unit < 1e6):
            raise ProtocolError(f"ECG_START with a scale of {start.uv_per_unit!r} µV per unit")
        names = start.lead_names
        if len(set(names)) != len(names) or not all(n.strip() for n in names):
            raise ProtocolError("ECG_START lead names must be unique and non-empty")
        self.start = start
        self.acquired_at = acquired_at
        self.time_source = time_source
        self.device = device
        self.max_samples = int(max_seconds * start.sampling_rate_hz)
        self._chunks: list[np.ndarray] = []  # (samples, leads) int16
        self._next = 0  # the sample counter expected next
        self._held = 0  # samples received (the counter minus the gaps)
        self.gaps: list[SampleGap] = []
        self.duplicates = 0
        self.blocks = 0

    @property
    def recording_id(self) -> int:
        return self.start.recording_id

    @property
    def n_leads(self) -> int:
        return len(self.start.lead_names)

    @property
    def samples_held(self) -> int:
        return self._held

    def _gap(self, missing: int) -> SampleGap:
        gap = SampleGap(start=self._held, missing=missing)
        self.gaps.append(gap)
        self._next += missing
        return gap

    def add_block(self, block: codec.EcgBlock) -> BlockOutcome:
        if block.n_leads != self.n_leads:
            raise ProtocolError(f"ECG_BLOCK with {block.n_leads} leads in a {self.n_leads}-lead recording")
        n = block.n_samples
        first = block.first_sample
        if first + n <= self._next:
            self.duplicates += n
            return BlockOutcome(0, n, None)
        if first + n > self.max_samples:
            raise ProtocolError(f"ECG stream exceeds {self.max_samples} samples")
        data = np.frombuffer(block.samples, dtype="<i2").reshape(n, self.n_leads)
        skip = 0
        if first < self._next:
            skip = self._next - first
            data = data[skip:]
            first = self._next
        gap = self._gap(first - self._next) if first > self._next else None
        self._chunks.append(np.maximum(data, GAP_FILL + 1).astype(np.int16, copy=False))
        self._next = first + len(data)
        self._held += len(data)
        self.duplicates += skip
        self.blocks += 1
        return BlockOutcome(len(data), skip, gap)

    def finish(self, end: codec.EcgEnd | None) -> EcgRecording:
        """The recording so far. `end` None: the link dropped before ECG_END (flagged truncated)."""
        flags: list[str] = []
        if end is None:
            flags.append("ecg-truncated")
        else:
            if end.status == codec.ECG_END_ABORTED:
                flags.append("ecg-aborted")
            if self._next < end.total_samples <= self.max_samples:  # the tail never arrived
                self._gap(end.total_samples - self._next)
            elif end.total_samples != self._next:
                # A count the stream cannot have had (fewer than arrived, or past the limit): the
                # END lies, the samples that arrived do not - keep them, flagged, not padded.
                flags.append("sample-count-mismatch")
        if self._held == 0:
            raise ProtocolError("ECG recording without samples")
        if self.gaps:
            flags.insert(0, "sample-gap")
        samples = np.ascontiguousarray(np.concatenate(self._chunks, axis=0).T)
        return EcgRecording(
            samples=samples,
            lead_names=tuple(self.start.lead_names),
            sampling_rate_hz=float(self.start.sampling_rate_hz),
            uv_per_unit=float(self.start.uv_per_unit),
            acquired_at=self.acquired_at,
            time_source=self.time_source,
            device=self.device,
            source_format="bridge",
            gaps=tuple(self.gaps),
            flags=tuple(flags),
        )
