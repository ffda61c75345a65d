"""The main job: `lastmile demo --json` on embedded defaults."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_delivers_everything_once_and_reports_it_as_json() -> None:
    # Its duration ("under a minute") is a figure for bench/, not an assertion: load would flake it.
    out = subprocess.run([sys.executable, "-m", "lastmile", "demo", "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert summary["received"] == summary["recordings"] == summary["studies"]
    assert summary["committed"] == summary["received"] == summary["purged"]
    assert summary["ble_observations"] >= 4
    assert summary["visits_synced"] == summary["visits"] == 3 and summary["visits_flagged"] >= 1
    assert summary["chain_verified"] is True
    assert "reading center goes offline" in out.stdout and "back" in out.stdout
