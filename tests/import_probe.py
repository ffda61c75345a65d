"""What a fresh process imports: a probe script run in a new interpreter, so the modules a service
loads (or defers) are not clouded by what this test process has already imported."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def run_probe(probe: str) -> str:
    """A fresh interpreter runs `probe` (what a service imports and holds, unclouded by this
    process's); its stdout."""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout
