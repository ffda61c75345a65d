"""The console's ECG analyses: results cached, workers never outlive the console."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from lastmile.console.ecg_analysis import EcgAnalyses

SLOW_WORKER = [
    sys.executable,
    "-c",
    "import time; time.sleep(120)",
]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose but still answers kill(0): look at its state.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_closing_stops_a_running_worker_and_leaves_nothing_to_a_closed_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    ready: list[None] = []
    spawned: list[int] = []
    # Hold every worker's Process as a traceback would: then only close() itself can end the worker
    # (otherwise the transport's finaliser may kill it by chance, after the loop closed).
    held: list[asyncio.subprocess.Process] = []
    real_exec = asyncio.create_subprocess_exec

    async def holding_exec(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await real_exec(*args, **kwargs)
        held.append(proc)
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", holding_exec)

    async def scenario() -> None:
        analyses = EcgAnalyses(lambda: ready.append(None), worker=SLOW_WORKER)

        async def payload() -> bytes:
            return b"not an ECG"

        analyses.request("a" * 64, payload)
        for _ in range(6000):  # the worker process appears
            await asyncio.sleep(0.01)
            if held:
                spawned.append(held[0].pid)
                break
        assert spawned, "the worker never started"
        assert analyses.pending("a" * 64)
        await analyses.close()
        assert not analyses.pending("a" * 64)
        # Gone while the loop still runs: nothing is left to a finaliser after the loop closed.
        assert not any(alive(pid) for pid in spawned), "the worker still runs after close()"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unraisable "Event loop is closed" would surface here
        asyncio.run(scenario())
    assert ready == [], "a cancelled analysis is not reported as a result"
    for proc in held:  # a failed run must not leave a sleeping worker behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, 9)
