"""Short versions of bench/soak.py (a 2-minute clinic day) and bench/kill_campaign.py (30 kill
rounds), run by CI: the real services against Orthanc, judged against the truth the simulated
devices carry in a side channel. Their figures (RSS, growth, time) are bench output, not asserted
here; the zeros are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_private_netns, require_tool

REPO = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, timeout_s: float) -> dict:
    require_private_netns()
    require_tool("Orthanc")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))  # --json: the last line


@pytest.mark.orthanc
def test_a_short_clinic_day_loses_duplicates_and_misattributes_nothing() -> None:
    result = bench("soak.py", "--minutes", "2", "--patients", "8", timeout_s=900)
    # the day really happened: every channel carried ECGs, the link went down and came back
    assert result["measurements"] >= 8
    assert len(result["outages"]) == 6
    assert all(result["by_channel"].get(c, 0) for c in ("usb", "lan", "unassigned"))
    assert result["console_actions"] > 0
    assert set(result["rss_max_mb"]) == {"acquire", "forward", "console"}
    # and the reading center holds each ECG once, on its true patient
    assert result["received"] == result["measurements"]
    assert (result["lost"], result["duplicated"], result["misattributed"], result["unreadable"]) == (0, 0, 0, 0)
    assert (result["held_unassigned"], result["stuck"], result["quarantined"]) == (0, 0, 0)
    # the county's reports came back, each on the patient the ECG was really taken from
    assert result["studies_reported"] == result["measurements"]
    assert (result["reports_missing"], result["reports_misattributed"]) == (0, 0)
    assert result["integrity"] == "ok"
    assert result["payload_mb"] == 0.0  # everything committed was purged
    assert result["service_exits"] == [] and result["cli_errors"] == []


@pytest.mark.orthanc
def test_thirty_kills_across_the_services_lose_and_duplicate_nothing() -> None:
    result = bench("kill_campaign.py", "--kills", "30", timeout_s=1200)
    assert result["kills"] >= 20  # most rounds caught their target still running
    assert len(result["by_target"]) >= 4
    assert result["integrity_checks_failed"] == 0, result["integrity_failures"]
    assert result["received"] == result["measurements"] > 0
    assert (result["lost"], result["duplicated"], result["misattributed"], result["unreadable"]) == (0, 0, 0, 0)
    assert (result["stuck"], result["held_unassigned"], result["quarantined"]) == (0, 0, 0)
    assert result["service_exits"] == [] and result["cli_errors"] == []


def test_the_acquire_process_leaves_out_what_it_never_uses() -> None:
    """Found by the soak: `lastmile acquire` with the LAN receiver sat at 65 MB RSS (goal 64),
    ~4.5 MB of it requests and tqdm, pulled in by pydicom's test-file downloader. The process is
    started as the CLI starts it; what it imports for its parts must not bring them back."""
    probe = (
        "import sys\n"
        "import lastmile.cli\n"
        "assert 'pydicom' not in sys.modules, 'too late: pydicom is imported before the acquire command runs'\n"
        "from lastmile.services.acquire import prepare_acquire_process\n"
        "prepare_acquire_process()\n"
        "import firmware_bridge.dicom_receiver, lastmile.ecg.intake, lastmile.services.acquire\n"
        "import pydicom.data\n"
        "print(sorted(n for n in ('requests', 'tqdm', 'pydicom') if sys.modules.get(n) is not None))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['pydicom']"]  # pydicom there (it is used), requests and tqdm not


def test_the_judge_sees_a_lost_a_duplicated_and_a_misattributed_ecg(monkeypatch: pytest.MonkeyPatch) -> None:
    """The soak's zeros mean something: the same judge, shown a reading center that lost one
    ECG, holds another twice and has a third on the wrong patient, counts each."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("clinic_day", REPO / "bench" / "clinic_day.py")
    assert spec is not None and spec.loader is not None
    clinic_day = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "clinic_day", clinic_day)  # bench/ is not a package
    spec.loader.exec_module(clinic_day)

    truth = clinic_day.Truth()
    cart = clinic_day.EcgCart()
    serials = [truth.new(f"P{i}", "usb") for i in range(4)]
    held = {  # Orthanc id -> (file, PatientID it shows)
        "a": (cart.ecg_bytes(serials[0], "P0", "A", 0.0)[0], "P0"),
        "b": (cart.ecg_bytes(serials[1], "P1", "B", 0.0)[0], "P1"),
        "b2": (cart.ecg_bytes(serials[1], "P1", "B", 0.0)[0], "P1"),  # sent twice as two objects
        "c": (cart.ecg_bytes(serials[2], "P0", "C", 0.0)[0], "P0"),  # P2's ECG on P0
    }  # serials[3] never arrived

    class ReadingCenter:
        def rest(self, path: str) -> list:
            assert path == "/series?expand"
            return [{"MainDicomTags": {"Modality": "ECG"}, "Instances": list(held)}]

        def instance_file(self, instance_id: str) -> bytes:
            return held[instance_id][0]

        def instance_tags(self, instance_id: str) -> dict:
            return {"PatientID": held[instance_id][1]}

    verdict = clinic_day.judge(ReadingCenter(), truth)
    assert (verdict.measurements, verdict.received) == (4, 4)
    assert (verdict.lost, verdict.duplicated, verdict.misattributed, verdict.unreadable) == (1, 1, 1, 0)
