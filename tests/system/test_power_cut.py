"""System test: real power cuts of the whole gateway (bench/power_cut.py, a few cuts).

    LASTMILE_IMAGE=/path/to/lastmile.img scripts/test.sh -m slow tests/system/test_power_cut.py
    (without LASTMILE_IMAGE the session builds one with image/build.sh first)

The image boots under qemu-system-aarch64 -M virt on a raw copy of itself (disk cache=none: no
host cache between the guest and the card file) while a cart C-STOREs ECGs to its LAN receiver
and the gateway forwards them to Orthanc; qemu is SIGKILLed at chosen risky moments and the card
booted again. Each boot takes minutes under software emulation: three cuts and the final drain
take 15-30 min on a loaded 2-core machine. The campaign's own JSON is the evidence; this test
asserts on it (the real Orthanc's count of C-STOREs per SOP Instance UID, the card's data
partition read after each cut).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * 3600)]

BENCH = REPO / "bench" / "power_cut.py"
CUTS = 3


def test_power_cuts_lose_nothing_and_corrupt_nothing(image: Path, tmp_path: Path) -> None:
    for tool in ("qemu-system-aarch64", "qemu-img", "qemu-io", "mcopy", "sfdisk", "e2fsck", "debugfs", "Orthanc"):
        require_tool(tool)
    # seed 3: the first cuts aim at a cart's C-STORE, the gateway's send and the wait for commitment
    run = subprocess.run(
        [sys.executable, str(BENCH), "--cuts", str(CUTS), "--seed", "3", "--json", "--image", str(image)]
        + ["--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=3 * 3600,
    )
    assert run.stdout.strip(), run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    detail = json.dumps(result, indent=1)
    assert result["cuts"] == CUTS, detail
    assert result["boots_never_ready"] == 0, detail
    # the cart got ECGs through between the cuts (else nothing below could fail)
    assert result["acknowledged"] >= CUTS, detail
    assert result["drained"], detail
    # every study the gateway acknowledged is at the reading center ...
    assert result["lost"] == 0 and result["received"] == result["acknowledged"], detail
    # ... stored again only across a cut (same UID: one instance), never twice within one boot
    assert result["duplicated_same_boot"] == 0, detail
    assert result["orthanc_instances"] == result["received"] + result["unacknowledged_in_orthanc"], detail
    # the card: ext4 clean once its journal is replayed, every database intact, nothing left behind
    assert result["fsck_repairs"] == 0, detail
    assert result["integrity_failures"] == 0 and "outbox.sqlite" in result["databases"], detail
    assert result["stuck"] == 0, detail
    assert result["failed_units"] == [], detail
