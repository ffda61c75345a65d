"""USB-storage import into a real outbox: each file once (content hash), re-plugging imports
nothing twice, the stick is never written, bad files are refused with their reason and never
stop the good ones; `lastmile import` through the CLI."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from firmware_bridge.usb_import import IMPORTED, KNOWN, REFUSED, FileRefused, content_key, find_ecg_files, import_paths
from lastmile.cli import main
from lastmile.config import parse_config
from lastmile.ecg.intake import file_enqueuer
from tests.conftest import shared_file
from uploader.outbox import Outbox

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
GOOD = [
    ("scp", "ecgtoolkit_Example.scp"),
    ("scp", "abtahi_ECG_20170504_163507_123456789.SCP"),
    ("aecg", "fda_hl7_Example_aECG.xml"),
    ("contec", "0000050.ECG"),
    ("contec", "0000037.ECG"),
]
BAD = [("scp", "healforce_62.SCP"), ("aecg", "fda_empty.xml")]


def _snapshot(root: Path) -> dict[str, tuple]:
    """Everything a write to the stick could change: names, sizes, contents, mtimes."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture
def stick(tmp_path: Path) -> Path:
    root = tmp_path / "stick"
    (root / "ECG" / "2026").mkdir(parents=True)
    for where in GOOD + BAD:
        shutil.copyfile(shared_file("ecg", *where), root / "ECG" / "2026" / where[1])
    shutil.copyfile(shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm"), root / "ECG" / "IM0001")  # no extension
    (root / "ECG" / "readme.txt").write_text("not an ECG")
    (root / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM")
    (root / "System Volume Information").mkdir()
    shutil.copyfile(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"), root / "System Volume Information" / "x.scp")
    (root / ".hidden").mkdir()
    (root / "ECG" / "link.scp").symlink_to(root / "ECG" / "2026" / "ecgtoolkit_Example.scp")
    for folder, _dirs, files in os.walk(root):
        for name in files:
            os.chmod(Path(folder) / name, 0o444)
    return root


@pytest.fixture
def outbox(tmp_path: Path):
    box = Outbox.open(tmp_path / "data", min_free_bytes=0)
    yield box
    box.close()


def _run(stick: Path, outbox: Outbox, progress=None):
    config = parse_config('[gateway]\nid = "clinic-test"\n')
    return import_paths(
        [stick],
        is_known=lambda key: outbox.find(key) is not None,
        enqueue=file_enqueuer(outbox, config),
        local_tz=UTC,
        now=lambda: NOW,
        progress=progress,
    )


def test_finds_ecg_files_only(stick: Path) -> None:
    names = [p.name for p in find_ecg_files([stick])]
    assert sorted(names) == sorted(["IM0001"] + [w[1] for w in GOOD + BAD])


def test_import_once_then_nothing_on_replug(stick: Path, outbox: Outbox) -> None:
    before = _snapshot(stick)
    calls: list[tuple[int, int, str]] = []
    first = _run(stick, outbox, progress=lambda done, total, o: calls.append((done, total, o.status)))
    assert first.imported == len(GOOD) + 1 and first.known == 0
    assert sorted(Path(o.path).name for o in first.refused) == sorted(w[1] for w in BAD)
    assert [c[:2] for c in calls] == [(i, len(GOOD) + len(BAD) + 1) for i in range(1, len(calls) + 1)]
    items = outbox.items()
    assert len(items) == len(GOOD) + 1 and all(item.kind == "dicom" for item in items)
    keys = {item.key for item in items}
    assert content_key(shared_file("ecg", "contec", "0000050.ECG").read_bytes()) in keys

    second = _run(stick, outbox)
    assert (second.imported, second.known, len(second.refused)) == (0, len(GOOD) + 1, len(BAD))
    assert len(outbox.items()) == len(GOOD) + 1
    assert _snapshot(stick) == before  # nothing on the stick was written, moved or touched


def test_refusals_say_why(stick: Path, outbox: Outbox) -> None:
    reasons = {Path(o.path).name: o.reason for o in _run(stick, outbox).refused}
    assert "non-conforming" in reasons["healforce_62.SCP"]
    assert "no rhythm ECG" in reasons["fda_empty.xml"]


def test_unassigned_and_assigned_patients_reach_the_outbox(stick: Path, outbox: Outbox) -> None:
    _run(stick, outbox)
    by_key = {item.key: item for item in outbox.items()}
    contec = by_key[content_key(shared_file("ecg", "contec", "0000037.ECG").read_bytes())]
    scp = by_key[content_key(shared_file("ecg", "scp", "ecgtoolkit_Example.scp").read_bytes())]
    assert contec.patient is None and contec.meta["unassigned"] is True
    assert scp.patient is not None and scp.patient["patient_id"] == "SBJ-123"


def test_one_failing_enqueue_does_not_stop_the_others(stick: Path) -> None:
    taken: list[str] = []

    def enqueue(recording, key: str) -> bool:
        if recording.source_format == "contec":
            raise FileRefused("cannot become a DICOM ECG: test refusal")
        taken.append(key)
        return True

    summary = import_paths([stick], is_known=lambda key: False, enqueue=enqueue, local_tz=UTC, now=lambda: NOW)
    assert summary.imported == len(taken) == len(GOOD) - 1
    assert sum("test refusal" in o.reason for o in summary.refused) == 2


def test_oversized_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "stick"
    root.mkdir()
    shutil.copyfile(shared_file("ecg", "contec", "0000050.ECG"), root / "big.ECG")
    shutil.copyfile(shared_file("ecg", "contec", "0000037.ECG"), root / "small.ECG")
    summary = import_paths(
        [root], is_known=lambda key: False, enqueue=lambda r, k: True, local_tz=UTC, now=lambda: NOW, max_bytes=200_000
    )
    status = {Path(o.path).name: (o.status, o.reason) for o in summary.outcomes}
    assert status["small.ECG"][0] == IMPORTED
    assert status["big.ECG"][0] == REFUSED and "larger than any ECG file" in status["big.ECG"][1]


def test_enqueue_reporting_existing_item_counts_as_known(stick: Path) -> None:
    summary = import_paths(
        [stick], is_known=lambda key: False, enqueue=lambda r, k: False, local_tz=UTC, now=lambda: NOW
    )
    assert summary.imported == 0 and summary.known == len(GOOD) + 1


def test_cli_import(stick: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lastmile.toml"
    config.write_text(f'[gateway]\nid = "clinic-test"\ndata_dir = "{tmp_path / "gw"}"\n')
    assert main(["-c", str(config), "import", "-q", str(stick)]) == 1  # two files refused
    out = capsys.readouterr().out
    assert f"{len(GOOD) + len(BAD) + 1} ECG file(s): {len(GOOD) + 1} imported, 0 already known, 2 refused" in out
    assert "refused: " in out and "healforce_62.SCP" in out
    good_only = tmp_path / "good"
    good_only.mkdir()
    shutil.copyfile(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"), good_only / "a.scp")
    assert main(["-c", str(config), "import", str(good_only)]) == 0
    assert "0 imported, 1 already known, 0 refused" in capsys.readouterr().out
    assert main(["-c", str(config), "import", str(tmp_path / "nowhere")]) == 1
    assert KNOWN == "already known"


def test_folder_watcher_imports_what_shows_up(tmp_path: Path) -> None:
    from firmware_bridge.usb_import import FolderWatcher

    folder = tmp_path / "import"
    taken: list[str] = []

    def run(roots):
        return import_paths(
            roots,
            is_known=lambda key: key in taken,
            enqueue=lambda r, key: taken.append(key) is None,
            local_tz=UTC,
            now=lambda: NOW,
        )

    watcher = FolderWatcher([folder], run)
    assert watcher.poll() == []  # not there yet
    folder.mkdir()
    assert watcher.poll() == []  # empty
    shutil.copyfile(shared_file("ecg", "contec", "0000037.ECG"), folder / "a.ECG")
    os.utime(folder / "a.ECG", (time.time() - 3600,) * 2)  # a stick's file, written an hour ago
    (first,) = watcher.poll()
    assert first.imported == 1
    assert watcher.poll() == []  # nothing changed
    shutil.copyfile(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"), folder / "b.scp")
    assert watcher.poll() == []  # written just now: it may still be being copied
    (second,) = watcher.poll()  # the same size and time as at the previous poll: complete
    assert (second.imported, second.known) == (1, 1) and len(taken) == 2


def test_other_current_patient_flags_never_reassigns(stick: Path, outbox: Outbox) -> None:
    config = parse_config('[gateway]\nid = "clinic-test"\n')
    summary = import_paths(
        [stick],
        is_known=lambda key: outbox.find(key) is not None,
        enqueue=file_enqueuer(outbox, config, lambda: frozenset({"P-OTHER"})),
        local_tz=UTC,
        now=lambda: NOW,
    )
    assert summary.imported == len(GOOD) + 1
    by_key = {item.key: item for item in outbox.items()}
    scp = by_key[content_key(shared_file("ecg", "scp", "ecgtoolkit_Example.scp").read_bytes())]
    contec = by_key[content_key(shared_file("ecg", "contec", "0000037.ECG").read_bytes())]
    assert scp.patient is not None and scp.patient["patient_id"] == "SBJ-123"  # the file's patient
    assert "patient-mismatch" in scp.meta["flags"]
    assert contec.patient is None and "patient-mismatch" not in contec.meta["flags"]


@pytest.mark.parametrize("typed", ["MRN  0042", "110105 19491231 002x"])
def test_a_loosely_typed_id_on_the_cart_is_the_checked_in_patient_and_one_id_at_the_county(
    tmp_path: Path, outbox: Outbox, typed: str
) -> None:
    """The cart's operator typed the patient's ID with a double space; the doctor checked the
    patient in (the ID kept with spaces as one, as every entry path keeps it) and the cart's file
    came in on its USB stick. The same file sent over the LAN was the checked-in patient and went
    to the PACS under the kept ID; from the stick it was held as "another patient" and would have
    gone under the ID as typed: one resident under two IDs at the county."""
    import io

    import pydicom

    from lastmile.clinic.patient_ids import clinic_patient
    from lastmile.ecg.intake import comparable_patient_id, import_files

    config = parse_config('[gateway]\nid = "clinic-test"\n')
    checked_in = clinic_patient(typed, "", config).patient_id
    assert checked_in == comparable_patient_id(typed, config.patient.id_kind)  # the LAN path's ID
    ds = pydicom.dcmread(shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm"))
    ds.PatientID = typed
    ds.PatientSex = ds.PatientBirthDate = ""  # left to the ID: Clark's contradict it (held: test_ecg_id_conflict)
    stick = tmp_path / "cart-stick"
    stick.mkdir()
    ds.save_as(stick / "ECG0001.dcm")

    summary = import_files(outbox, config, [stick], current_patient_ids=lambda: frozenset({checked_in}))
    assert summary.imported == 1
    (item,) = outbox.items()
    assert item.patient is not None and item.patient["patient_id"] == checked_in
    assert "patient-mismatch" not in item.meta["flags"] and item.hold_until is None
    assert pydicom.dcmread(io.BytesIO(outbox.read_payload(item))).PatientID == checked_in


def test_an_ecg_under_the_id_the_doctor_said_is_his_other_id_is_not_another_patients(tmp_path: Path) -> None:
    """王五 is checked in by his ID card number, then again by his clinic number: the doctor
    answered "his other ID" (both are his). The cart was still programmed with his ID card number:
    `lastmile import` of its stick held his ECG as another patient's, for the doctor to settle what
    he had already said. It is his now - kept under the ID the file names (never re-assigned), not
    flagged, not held; an ID the doctor linked to nobody is still another patient."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    from lastmile.clinic.patients import PatientContext, SameName
    from lastmile.ecg.holds import PATIENT_MISMATCH

    id_card, clinic_number, stranger, name = "11010519491231002X", "MZ-0042", "MZ-0077", "Wang^Wu=王^五"
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(f'[gateway]\nid = "clinic-test"\ndata_dir = "{tmp_path / "gw"}"\n')
    config = parse_config(config_file.read_text())
    stick = tmp_path / "cart-stick"
    stick.mkdir()
    for number, patient_id in enumerate((id_card, stranger)):
        ds = pydicom.dcmread(shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm"))
        ds.PatientID, ds.SOPInstanceUID = patient_id, generate_uid()
        ds.PatientName = "Wang^Wu"  # his name as the cart writes it (another name is held: test_ecg_name_mismatch)
        ds.PatientSex = ds.PatientBirthDate = ""  # left to the ID: Clark's contradict it (test_ecg_id_conflict)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(stick / f"ECG000{number}.dcm")
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        now = dt.datetime.now(UTC)
        context.check_in(id_card, name, now=now)
        context.check_in(clinic_number, name, now=now, same_name=SameName.OTHER_ID)
    finally:
        context.close()

    assert main(["-c", str(config_file), "import", "-q", str(stick)]) == 0
    outbox = Outbox.open(config.data_dir, min_free_bytes=0)
    try:
        items = {item.patient["patient_id"]: item for item in outbox.items() if item.patient}
        assert set(items) == {id_card, stranger}
        his = items[id_card]
        assert pydicom.dcmread(io.BytesIO(outbox.read_payload(his))).PatientID == id_card  # the file's patient
        assert PATIENT_MISMATCH not in his.meta["flags"] and his.hold_reason is None
        assert PATIENT_MISMATCH in items[stranger].meta["flags"] and items[stranger].hold_reason == PATIENT_MISMATCH
    finally:
        outbox.close()
