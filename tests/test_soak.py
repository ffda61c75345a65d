"""Short versions of bench/soak.py (a 2-minute clinic day) and bench/kill_campaign.py (30 kill
rounds), run by CI: the real services against Orthanc and the county FHIR platform, with BLE
devices (bumble, through bleak), the serial bridge (pty) and field visits, judged against the
truth the simulated devices carry in a side channel. Their figures (RSS, growth, time) are bench output, not asserted
here; the zeros are."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_private_netns, require_tool
from tests.import_probe import run_probe

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
    result = bench("soak.py", "--minutes", "2", "--patients", "8", timeout_s=1200)
    # the day really happened: every channel carried ECGs, every BLE device readings, field
    # visits were made, the link went down and came back
    assert result["ecgs"] >= 8
    assert len(result["outages"]) == 6
    assert all(result["by_channel"].get(c, 0) for c in ("usb", "lan", "bridge", "unassigned"))
    assert all(result["ble_by_device"].get(d, 0) for d in ("ble-cuff", "ble-thermometer", "ble-oximeter"))
    assert result["visits"] >= 2
    assert result["console_actions"] > 0
    assert set(result["rss_max_mb"]) == {"acquire", "forward", "console", "ble"}
    assert result["measurements"] == result["ecgs"] + result["visits"] + result["ble_readings"]
    # and the reading center holds each ECG once, on its true patient; the county platform each
    # visit once, on its patient, no resource twice; the gateway each BLE reading once, on its patient
    assert result["received"] == result["ecgs"]
    assert result["visits_received"] == result["visits"]
    assert (result["lost"], result["duplicated"], result["misattributed"], result["unreadable"]) == (0, 0, 0, 0), result
    assert (result["held_unassigned"], result["stuck"], result["quarantined"]) == (0, 0, 0)
    assert result["ble_unknown"] == 0
    # every reading went on to the county platform (none left unsent on the gateway)
    assert result["ble_at_platform"] == result["ble_readings"] and result["observations_unsent"] == 0
    # the county's reports came back, each on the patient the ECG was really taken from
    assert result["studies_reported"] == result["ecgs"]
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
    assert result["received"] == result["ecgs"] > 0
    assert result["visits_received"] == result["visits"] > 0 and result["ble_readings"] > 0
    # the whole verdict on failure: which kind (ECG, visit, FHIR resource, BLE reading) and which kill
    assert (result["lost"], result["duplicated"], result["misattributed"], result["unreadable"]) == (0, 0, 0, 0), result
    assert result["fhir_resources_duplicated"] == 0  # a kill mid-FHIR-send re-sends; nothing is stored twice
    assert result["ble_at_platform"] == result["ble_readings"] and result["observations_unsent"] == 0
    assert (result["stuck"], result["held_unassigned"], result["quarantined"]) == (0, 0, 0)
    assert result["service_exits"] == [] and result["cli_errors"] == []


@pytest.fixture
def clinic_day(monkeypatch: pytest.MonkeyPatch) -> Any:
    """bench/clinic_day.py, the soak's and the kill campaign's clinic (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("clinic_day", REPO / "bench" / "clinic_day.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "clinic_day", module)
    spec.loader.exec_module(module)
    return module


def test_the_acquire_process_leaves_out_what_it_never_uses() -> None:
    """Found by the soak: `lastmile acquire` with the LAN receiver sat at 65 MB RSS (goal 64),
    ~4.5 MB of it requests and tqdm, pulled in by pydicom's test-file downloader. The process is
    started as the CLI starts it; what it imports for its parts must not bring them back."""
    probe = (
        "import sys\n"
        "import lastmile.cli\n"
        "assert 'pydicom' not in sys.modules, 'too late: pydicom is imported before the acquire command runs'\n"
        "from lastmile.services.process_tuning import prepare_device_process\n"
        "prepare_device_process()\n"
        "import firmware_bridge.dicom_receiver, lastmile.ecg.intake, lastmile.services.acquire\n"
        "import pydicom.data\n"
        "print(sorted(n for n in ('requests', 'tqdm', 'pydicom') if sys.modules.get(n) is not None))\n"
    )
    assert run_probe(probe).split() == ["['pydicom']"]  # pydicom there (it is used), requests and tqdm not


def test_the_acquire_process_defers_dateutil_until_a_date_recipe_is_used(tmp_path: Path) -> None:
    """Issue 17 (acquire with BLE at ~72 MB, goal 64): sqlite-utils imports dateutil's parser for
    its command line's date recipes, which no service calls. In acquire it is deferred: with every
    part's modules loaded (BLE too) and a database written, none of dateutil's heavy modules ran;
    a recipe still works when called (and only then loads them)."""
    heavy = ("dateutil.relativedelta", "dateutil.tz")
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "import lastmile.cli\n"
        "from lastmile.services.process_tuning import prepare_device_process\n"
        "prepare_device_process()\n"
        "import firmware_bridge.dicom_receiver, lastmile.ecg.intake, lastmile.services.acquire\n"
        "import lastmile.services.ble_devices, lastmile.services.serial_devices, lastmile.clinic.patients\n"
        "from uploader.sqlite_store import MIGRATIONS, open_database\n"
        f"db = open_database(Path({str(tmp_path / 'outbox.sqlite')!r}), MIGRATIONS)\n"
        "db['probe'].insert({'a': 1})\n"
        "db.close()\n"
        f"print(sorted(n for n in {heavy!r} if n in sys.modules))\n"
        "from sqlite_utils import recipes\n"
        "print(recipes.parsedate('02/01/2024', dayfirst=True))\n"
        f"print(sorted(n for n in {heavy!r} if n in sys.modules))\n"
    )
    assert run_probe(probe).split("\n")[:3] == ["[]", "2024-01-02", str(sorted(heavy))]


def test_the_acquire_process_loads_the_ble_stack_only_for_its_ble_part() -> None:
    """Issue 17: bleak, dbus-fast and asyncio are ~7 MB of acquire's RSS; a gateway without BLE
    devices must not carry them. What acquire imports for its other parts leaves them out."""
    probe = (
        "import sys\n"
        "import lastmile.cli\n"
        "from lastmile.services.process_tuning import prepare_device_process\n"
        "prepare_device_process()\n"
        "import firmware_bridge.dicom_receiver, lastmile.ecg.intake, lastmile.services.acquire\n"
        "import lastmile.services.serial_devices, lastmile.clinic.patients, lastmile.visits.book\n"
        "stack = ('bleak', 'bleak_retry_connector', 'dbus_fast', 'asyncio')\n"
        "print(sorted(n for n in stack if n in sys.modules))\n"
        "import lastmile.services.ble_devices\n"
        "print(sorted(n for n in stack if n in sys.modules))\n"
    )
    assert run_probe(probe).split("\n")[:2] == [
        "[]",
        str(sorted(("bleak", "bleak_retry_connector", "dbus_fast", "asyncio"))),
    ]


def test_lastmile_acquire_with_ble_enabled_runs_no_ble_part_and_loads_no_ble_stack(tmp_path: Path) -> None:
    """Issue 17: the BLE link is lastmile-ble's (its own process). `lastmile acquire` composed from
    a configuration with [ble] enabled (the default) and a USB-import folder starts its parts and
    goes round, and neither builds a BLE part nor imports bleak, dbus-fast or asyncio."""
    inbox = tmp_path / "usb"
    inbox.mkdir()
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[ble]\nenabled = true\n[usb_import]\nfolders = ["{inbox}"]\n'
    )
    probe = (
        "import sys, threading\n"
        "import lastmile.cli\n"
        "from lastmile.services.process_tuning import prepare_device_process\n"
        "prepare_device_process()\n"
        "from lastmile.config import load_config\n"
        "from lastmile.services.acquire import AcquireService\n"
        f"config = load_config({str(config)!r})\n"
        "assert config.ble.enabled\n"
        "service = AcquireService.start(config)\n"
        "service.step(threading.Event())\n"
        "print(sorted(p.name for p in service.parts))\n"
        "service.close()\n"
        "stack = ('bleak', 'bleak_retry_connector', 'dbus_fast', 'asyncio', 'lastmile.services.ble_devices')\n"
        "print(sorted(n for n in stack if n in sys.modules))\n"
    )
    assert run_probe(probe).split("\n")[:2] == [str(["gnss", "usb-import"]), "[]"]


def test_deferring_leaves_imported_and_missing_modules_alone() -> None:
    from lastmile.services.process_tuning import defer_import

    json_module = sys.modules["json"]
    defer_import("json")  # imported already: kept as it is
    defer_import("lastmile_no_such_module")  # not installed: nothing to defer, nothing put in place
    assert sys.modules["json"] is json_module and "lastmile_no_such_module" not in sys.modules


def test_opening_a_database_reads_no_installed_packages_for_plugins(tmp_path: Path) -> None:
    """Found by the soak (acquire over 64 MB): sqlite-utils looked for plugins in every installed
    package's metadata when the first database was opened (importlib.metadata and the packages'
    metadata kept in memory, in every service), and a plugin that anything installed could have
    changed our connections."""
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from uploader.sqlite_store import MIGRATIONS, open_database\n"
        f"db = open_database(Path({str(tmp_path / 'outbox.sqlite')!r}), MIGRATIONS)\n"
        "db['probe'].insert({'a': 1})\n"
        "db.close()\n"
        "print('importlib.metadata' in sys.modules)\n"
    )
    assert run_probe(probe).split() == ["False"]


def test_the_acquire_process_tunes_glibc_malloc_and_trims_it() -> None:
    """glibc takes the arena limit and the fixed mmap threshold before acquire starts its threads
    (each thread would otherwise keep an arena of its own), and a trim can run at any time."""
    probe = (
        "from lastmile.services.process_tuning import MALLOC_ARENAS, MMAP_THRESHOLD, GlibcMalloc\n"
        "malloc = GlibcMalloc()\n"
        "print(malloc.tune(arenas=MALLOC_ARENAS, mmap_threshold=MMAP_THRESHOLD))\n"
        "malloc.trim()\n"
    )
    assert run_probe(probe).split() == ["True"]  # this is a glibc system: mallopt() said yes


def test_the_judge_sees_a_lost_a_duplicated_and_a_misattributed_ecg(clinic_day: Any) -> None:
    """The soak's zeros mean something: the same judge, shown a reading center that lost one
    ECG, holds another twice and has a third on the wrong patient, counts each."""

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
    assert verdict.duplicates == [f"{serials[1]}: usb, held 2"]  # which one: to find the kill that did it


def test_the_platform_judge_sees_a_lost_a_twice_stored_and_a_misattributed_visit(clinic_day: Any) -> None:
    """The field visits' zeros mean something too: a county platform that lost one visit, stored
    another's Encounter twice and filed a third's note on the wrong patient is counted so."""

    truth = clinic_day.Truth()
    serials = [truth.new(f"P{i}", clinic_day.FIELD_VISIT) for i in range(4)]

    def on(patient: str) -> dict:
        return {"identifier": {"system": "urn:lastmile:patient-id", "value": patient}}

    def encounter(n: int, patient: str) -> dict:
        return {"id": f"e{n}", "identifier": [{"value": f"visit-{n}"}], "subject": on(patient)}

    def note(n: int, serial: int, patient: str, encounter_id: str) -> dict:
        return {
            "id": f"o{n}",
            "identifier": [{"value": f"visit-{n}/note/1"}],
            "subject": on(patient),
            "encounter": {"reference": f"Encounter/{encounter_id}"},
            "valueString": f"{clinic_day.NOTE_PREFIX}{serial}",
        }

    class Platform:
        applied = {"visit-0": 1, "visit-1": 2, "visit-2": 1}
        stored = {
            "Encounter": [encounter(0, "P0"), encounter(1, "P1"), encounter(1, "P1"), encounter(2, "P0")],
            "Observation": [
                note(0, serials[0], "P0", "e0"),
                note(1, serials[1], "P1", "e1"),
                note(2, serials[2], "P0", "e2"),
            ],
            "Provenance": [{"id": "p0"}, {"id": "p1"}, {"id": "p2"}],
        }  # serials[3]'s visit never arrived; P2's visit filed on P0

        def resources(self, kind: str) -> list:
            return self.stored.get(kind, [])

    verdict = clinic_day.judge_platform(Platform(), truth)
    assert (verdict["visits"], verdict["visits_received"], verdict["visits_lost"]) == (4, 3, 1)
    assert (verdict["visits_duplicated"], verdict["visits_misattributed"]) == (0, 1)
    assert verdict["fhir_resources_duplicated"] == 1  # visit-1's Encounter stored twice
    assert verdict["fhir_duplicates"] == ["Encounter visit-1: 2"]
    assert verdict["fhir_resends_absorbed"] == 1


def test_the_day_is_not_over_while_a_reading_waits_to_be_relayed(
    clinic_day: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A reading the doctor assigns in the day's last minute is made a FHIR bundle by the forward
    service's next round: the drain must wait for it, not stop because no bundle is unsent yet
    (the soak once judged two readings 'not at the platform' that were about to be relayed)."""
    from uploader.outbox import Outbox

    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        item = outbox.add("observation", "obs:1", b"{}", now=1.0).item
        began = time.monotonic()
        states = clinic_day.wait_drained(tmp_path, limit_s=1.0)
        assert time.monotonic() - began >= 1.0  # it waited for the reading, to the limit
        assert states["observations_unrelayed"] == 1
        assert states.get("fhir_unsent", 0) == 0  # the state that once ended the day early
        assert [i.id for i in outbox.claim("observation", 10, 2.0)] == [item.id]  # as the relay does
        outbox.mark_sent([item.id], 2.0)
        outbox.mark_committed([item.id], 2.0)
        states = clinic_day.wait_drained(tmp_path, limit_s=60.0)  # relayed: over at once
        assert states["observations_unrelayed"] == 0


def test_the_soak_tells_a_poll_that_said_the_link_is_down_from_a_real_error(clinic_day: Any) -> None:
    """The 20-minute soak counted 5 of 10 `report poll` calls failed and could not say why: each
    failure is now counted by its reason, and only "link down, said so" is expected."""

    def failed(stderr: str) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(["lastmile", "report", "poll"], 1, "", stderr)

    refused = (
        "2026-12-01 18:12:52,578 WARNING lastmile.reports.poller: reports: cannot ask the reading center now"
        " (cannot connect to READING_CENTER@127.0.0.1:31540: refused or unreachable); again in 1 s\n"
        "lastmile report poll: cannot connect to READING_CENTER@127.0.0.1:31540: refused or unreachable\n"
    )
    locked = 'Traceback (most recent call last):\n  File "x.py"\nsqlite3.OperationalError: database is locked\n'
    assert clinic_day.poll_failure(failed(refused), link_down=True) == "link down, said so"
    assert clinic_day.poll_failure(failed(refused), link_down=False) == (
        "link up: cannot connect to READING_CENTER@127.0.0.1:31540: refused or unreachable"
    )
    assert clinic_day.poll_failure(failed(locked), link_down=True) == (
        "exception: sqlite3.OperationalError: database is locked"
    )
    assert clinic_day.poll_failure(failed(""), link_down=True) == "link down: exit 1, silent"


def test_a_service_step_trims_the_heap_at_most_every_trim_interval() -> None:
    """What an ECG's decoding freed goes back soon (a step a second), but not a trim per step."""
    from lastmile.services.process_tuning import TRIM_EVERY_S, GlibcMalloc, HeapTrim

    class CountingMalloc(GlibcMalloc):
        trims = 0

        def trim(self) -> None:
            self.trims += 1

    malloc = CountingMalloc()
    trim = HeapTrim(100.0, malloc=malloc)
    steps = [100.0 + TRIM_EVERY_S / 2 * i for i in range(21)]  # ten intervals in half-interval steps
    done = [trim.maybe(now) for now in steps]
    assert malloc.trims == sum(done) == 10
    assert not trim.maybe(steps[-1] + TRIM_EVERY_S - 0.01) and trim.maybe(steps[-1] + TRIM_EVERY_S)


def test_the_ble_service_does_not_load_the_acquire_service() -> None:
    """Two device services share parts and process tuning, not each other: `lastmile ble run` loads
    none of acquire's device links (the serial stack, the LAN receiver, the USB importer)."""
    probe = (
        "import sys\n"
        "from lastmile.services.process_tuning import prepare_device_process\n"
        "prepare_device_process()\n"
        "import lastmile.commands.ble, lastmile.services.ble_service\n"
        "print('lastmile.services.acquire' in sys.modules)\n"
    )
    assert run_probe(probe).split() == ["False"]
