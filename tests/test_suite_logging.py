"""What one test does to logging does not reach the next.

`lastmile.cli.main()` points the root logger at the stderr of the process, which inside a test is
that test's captured stream (capsys), closed once the test ends. A later test whose service thread
logs then hits that closed stream: Python prints "--- Logging error ---" to the real stderr, as the
CI rehearsal of 2026-12-06 did once at 95% of the suite (the `lastmile serial` commands' tests, then
the serial service's threads). Run as the rehearsal ran them, in one pytest process, uncaptured so
that every such error shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_a_command_run_in_a_test_leaves_no_handler_on_its_closed_capture(tmp_path: Path) -> None:
    command_test = "tests/test_serial_cmd.py::test_scan_test_and_list"  # main() under capsys
    threaded_test = "tests/test_serial_link.py::test_bridge_over_pty_delivers_and_acks"  # logs from its thread
    run = subprocess.run(
        # --basetemp: its own temporary directories, never the numbered ones of the run around it
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner")]
        + [command_test, threaded_test],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "--- Logging error ---" not in output, output[-3000:]
