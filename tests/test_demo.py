"""The main job: `lastmile demo --json` on embedded defaults."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_delivers_everything_once_and_reports_it_as_json() -> None:
    # Its duration ("under a minute") is a figure for bench/, not an assertion: load would flake it.
    out = subprocess.run(
        [sys.executable, "-m", "lastmile", "demo", "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)  # stdout is the JSON object and nothing else; the story is on stderr
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert summary["received"] == summary["recordings"] == summary["studies"]
    assert summary["committed"] == summary["received"] == summary["purged"]
    assert summary["ble_observations"] >= 4
    assert summary["visits_synced"] == summary["visits"] == 3 and summary["visits_flagged"] >= 1
    assert summary["chain_verified"] is True
    # 结果回传: every ECG's report came back (some with a PDF), the STAT one critical
    assert summary["reports_returned"] == summary["recordings"] + summary["report_pdfs"]
    assert summary["report_pdfs"] == summary["recordings"] // 3 and summary["critical_reports"] == 1
    assert "CRITICAL" in out.stderr and "lastmile report ack" in out.stderr
    assert "reading center goes offline" in out.stderr and "back" in out.stderr
