"""Quality verdicts and previews of recent ECGs, made by the worker process and kept in memory.

The console asks for the ECG just recorded; the first request starts `ecg_worker` in a child
process (numpy and pydicom stay out of the console's memory), later ones get the result from a
small cache (the SVG gzipped: ~10 KB each). When a result arrives `on_ready()` is called, and the
live page updates itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 120.0  # a Pi 3 under load: decoding + analysis + preview of a 10 s 12-lead
CACHE_ENTRIES = 8


@dataclass(frozen=True, slots=True)
class EcgAnalysis:
    quality: dict[str, Any] | None
    svg_gzip: bytes | None
    error: str = ""


class EcgAnalyses:
    def __init__(
        self, on_ready: Callable[[], None], *, worker: list[str] | None = None, max_entries: int = CACHE_ENTRIES
    ) -> None:
        self.on_ready = on_ready
        self.worker = worker or [sys.executable, "-m", "lastmile.console.ecg_worker"]
        self.max_entries = max_entries
        self._done: OrderedDict[str, EcgAnalysis] = OrderedDict()
        self._running: dict[str, asyncio.Task[None]] = {}

    def result(self, sha256: str) -> EcgAnalysis | None:
        found = self._done.get(sha256)
        if found is not None:
            self._done.move_to_end(sha256)
        return found

    def pending(self, sha256: str) -> bool:
        return sha256 in self._running

    def request(self, sha256: str, load_payload: Callable[[], Awaitable[bytes | None]]) -> None:
        """Start the analysis of the ECG whose payload hash is `sha256`, unless known or running."""
        if sha256 in self._done or sha256 in self._running:
            return
        task = asyncio.get_running_loop().create_task(self._run(sha256, load_payload))
        self._running[sha256] = task

    async def close(self) -> None:
        """Stop the running analyses and their workers before the event loop ends.

        A worker left running outlives the console, and its transport, collected after the loop
        closed, raises from its finaliser ("Event loop is closed").
        """
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, sha256: str, load_payload: Callable[[], Awaitable[bytes | None]]) -> None:
        try:
            payload = await load_payload()
            result = EcgAnalysis(None, None, "payload gone") if payload is None else await self._analyse(payload)
        except Exception as exc:  # noqa: BLE001 — reported on the page, never a dead task
            log.warning("ECG analysis failed: %s: %s", type(exc).__name__, exc)
            result = EcgAnalysis(None, None, f"{type(exc).__name__}")
        finally:
            self._running.pop(sha256, None)
        self._done[sha256] = result
        while len(self._done) > self.max_entries:
            self._done.popitem(last=False)
        self.on_ready()

    async def _analyse(self, payload: bytes) -> EcgAnalysis:
        proc = await asyncio.create_subprocess_exec(
            *self.worker,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(payload), WORKER_TIMEOUT_S)
        except TimeoutError:
            await self._end(proc)
            return EcgAnalysis(None, None, "analysis timed out")
        except asyncio.CancelledError:
            await self._end(proc)  # the console is stopping
            raise
        if proc.returncode != 0:
            log.warning("ECG worker exited %s: %s", proc.returncode, err.decode(errors="replace")[-500:])
            return EcgAnalysis(None, None, f"worker exited {proc.returncode}")
        data = json.loads(out)
        if "error" in data:
            return EcgAnalysis(None, None, str(data["error"]))
        return EcgAnalysis(data["quality"], gzip.compress(data["svg"].encode(), 6))

    @staticmethod
    async def _end(proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):  # it may have just exited
            proc.kill()
        await proc.wait()
