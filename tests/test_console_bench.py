"""bench/console.py within its budget: Lighthouse accessibility and best practices >= 95 on Today and
Reports (Debian's Chromium), console RSS <= 64 MB, start <= 1 s of CPU, every page <= 100 KB."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, missing, require_tool

LIGHTHOUSE = REPO / ".tools" / "lighthouse" / "node_modules" / ".bin" / "lighthouse"


@pytest.mark.timeout(900)
def test_console_bench_is_within_budget() -> None:
    require_tool("chromium")
    require_tool("node")
    if not LIGHTHOUSE.exists():
        missing(f"{LIGHTHOUSE} is absent: scripts/setup.sh --test installs lighthouse there")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "console.py"), "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=840,
    )
    print(proc.stdout)
    scores = re.findall(r"lighthouse (\w+): accessibility (\d+), best practices (\d+)", proc.stdout)
    assert [s[0] for s in scores] == ["today", "reports"], proc.stdout + proc.stderr[-3000:]
    assert all(int(a) >= 95 and int(b) >= 95 for _page, a, b in scores), scores
    assert proc.returncode == 0 and "within budget" in proc.stdout, proc.stdout + proc.stderr[-3000:]
