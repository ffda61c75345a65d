"""The quality gate at intake (issue 13): the verdict travels with the study (outbox meta, DICOM
statements, Study Description), a 're-record' verdict is held for the doctor's decision (release =
send anyway, discard = recorded again) and then sent flagged; an urgent ECG is never held."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from lastmile.cli import main as cli
from lastmile.config import Config, load_config
from lastmile.data_dir import open_outbox
from lastmile.ecg.intake import (
    QUALITY_HOLD,
    UNASSIGNED_HOLD,
    HeldEcgError,
    assign_held_ecg,
    discard_held_ecg,
    enqueue_recording,
    held_ecgs,
    read_ecg_file,
    release_held_ecg,
)
from tests.conftest import shared_file
from tests.dicom_validation import dciodvfy_problems
from uploader.outbox import ItemState, Kind

T0 = 1_790_000_000.0
HOLD_S = 600.0


def _config(tmp_path: Path) -> Config:
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.outbox.min_free_mb = 1
    return config


def _bad():  # the Contec cart's own bad case: limb leads only, strong 50 Hz hum
    return read_ecg_file(shared_file("ecg", "contec", "0000037.ECG"))


def _good():
    return read_ecg_file(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"))


def _dataset(outbox, item) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(outbox.read_payload(item)))


def test_re_record_is_held_marked_in_the_study_and_valid_dicom(tmp_path: Path) -> None:
    config = _config(tmp_path)
    bad = dataclasses.replace(_bad(), patient=_good().patient)  # a known patient: only quality holds it
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, bad, config, key="bad", now=T0).item
        assert (item.hold_reason, item.hold_until) == (QUALITY_HOLD, T0 + HOLD_S)
        quality = item.meta["quality"]
        assert quality["verdict"] == "re-record"
        assert "mains-noise" in {p["kind"] for p in quality["problems"]}
        assert outbox.claim(Kind.DICOM, 10, T0 + 1) == []  # never sent while the doctor decides
        ds = _dataset(outbox, item)
    assert ds.StudyDescription.endswith("quality: re-record")
    texts = [str(a.get("UnformattedTextValue", "")) for a in ds.WaveformAnnotationSequence]
    assert any(t.startswith("Gateway quality check: re-record") for t in texts)
    mains = next(a for a in ds.WaveformAnnotationSequence if "mains-noise" in str(a.get("UnformattedTextValue", "")))
    channels = list(mains.ReferencedWaveformChannels)
    assert channels[0::2] == [1] * (len(channels) // 2)  # multiplex group 1
    problem = next(p for p in quality["problems"] if p["kind"] == "mains-noise")
    # channels in the object follow the recording's lead order
    assert channels[1::2] == [bad.lead_names.index(lead) + 1 for lead in problem["leads"]]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path = tmp_path / "bad.dcm"
    path.write_bytes(buf.getvalue())
    assert dciodvfy_problems(path) == []


def test_acceptable_is_not_held_and_not_marked(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, _good(), config, key="good", now=T0).item
        assert item.hold_until is None and item.meta["quality"]["verdict"] == "acceptable"
        ds = _dataset(outbox, item)
    assert "quality" not in ds.StudyDescription
    assert any(
        str(a.get("UnformattedTextValue", "")).startswith("Gateway quality check: acceptable")
        for a in ds.WaveformAnnotationSequence
    )


def test_stat_with_problems_is_sent_at_once_but_marked(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, dataclasses.replace(_bad(), stat=True), config, key="stat", now=T0).item
        assert item.hold_until is None and item.meta["quality"]["verdict"] == "re-record"
        assert [i.key for i in outbox.claim(Kind.DICOM, 10, T0 + 1)] == ["stat"]
        assert _dataset(outbox, item).StudyDescription.endswith("quality: re-record")


def test_hold_runs_out_then_it_goes_flagged(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with open_outbox(config) as outbox:
        enqueue_recording(outbox, dataclasses.replace(_bad(), patient=_good().patient), config, key="b", now=T0)
        assert outbox.claim(Kind.DICOM, 10, T0 + HOLD_S - 1) == []
        (late,) = outbox.claim(Kind.DICOM, 10, T0 + HOLD_S + 1)
        assert late.meta["quality"]["verdict"] == "re-record"


def test_unassigned_and_re_record_hold_for_the_longer_with_the_patient_first(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.patient.unassigned_ecg_hold_s = 300.0
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, _bad(), config, key="b", now=T0).item  # no patient, bad signal
        assert (item.hold_reason, item.hold_until) == (UNASSIGNED_HOLD, T0 + HOLD_S)
        # assigning the patient keeps the quality hold: the recording itself still needs a decision
        import datetime as dt

        from lastmile.ecg.intake import clinic_patient

        assigned = assign_held_ecg(
            outbox, item.id, clinic_patient("P-77", "Wang^Wu", config), now=dt.datetime.fromtimestamp(T0 + 10, dt.UTC)
        )
        assert (assigned.hold_reason, assigned.hold_until) == (QUALITY_HOLD, T0 + HOLD_S)


def test_doctor_releases_or_discards(tmp_path: Path) -> None:
    config = _config(tmp_path)
    bad = dataclasses.replace(_bad(), patient=_good().patient)
    with open_outbox(config) as outbox:
        one = enqueue_recording(outbox, bad, config, key="one", now=T0).item
        two = enqueue_recording(outbox, bad, config, key="two", now=T0).item
        assert {i.id for i in held_ecgs(outbox, T0 + 1)} == {one.id, two.id}
        release_held_ecg(outbox, one.id, T0 + 2)
        assert [i.key for i in outbox.claim(Kind.DICOM, 10, T0 + 3)] == ["one"]  # send anyway
        gone = discard_held_ecg(outbox, two.id, T0 + 4)
        assert gone.state == ItemState.QUARANTINED and "recorded again" in (gone.quarantine_reason or "")
        assert held_ecgs(outbox, T0 + 5) == []
        with pytest.raises(HeldEcgError):
            release_held_ecg(outbox, two.id, T0 + 6)  # not held any more


def test_cli_shows_the_verdict_and_takes_the_doctor_s_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 1\n')
    args = ["-c", str(config_file)]
    assert cli([*args, "import", "-q", str(shared_file("ecg", "contec", "0000037.ECG"))]) == 0
    capsys.readouterr()
    assert cli([*args, "patient", "show"]) == 0
    out = capsys.readouterr().out
    assert "E1 " in out and "quality: re-record" in out and "50 Hz" in out and "交流电" in out
    assert cli([*args, "queue"]) == 0
    assert "ECG E1 (held until" in capsys.readouterr().out
    assert cli([*args, "queue", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)["ecgs_with_problems"]
    assert listed["id"] == "E1" and listed["held"] and listed["quality"]["verdict"] == "re-record"
    assert cli([*args, "ecg", "release", "E1"]) == 0
    assert "released" in capsys.readouterr().out
    assert cli([*args, "ecg", "release", "E1"]) == 1  # once released it is no longer held
    assert cli([*args, "ecg", "discard", "E9"]) == 1
    assert "no ECG E9 is held" in capsys.readouterr().err


def test_cli_assigning_an_ecg_held_for_its_quality_says_it_is_still_held(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`patient assign E1 ...` of an ECG with no patient and a 're-record' verdict said "released
    for sending": it stays held until the doctor releases or discards it (or the hold ends)."""
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 1\n')
    args = ["-c", str(config_file)]
    assert cli([*args, "import", "-q", str(shared_file("ecg", "contec", "0000037.ECG"))]) == 0
    capsys.readouterr()
    assert cli([*args, "patient", "assign", "E1", "P-77", "--name", "Wang^Wu"]) == 0
    out = capsys.readouterr().out
    assert "assigned to P-77 Wang^Wu, still held: its quality is in doubt" in out and "released" not in out, out
    with open_outbox(load_config(config_file)) as outbox:
        (held,) = held_ecgs(outbox, time.time())
    assert held.hold_reason == QUALITY_HOLD and held.patient is not None and held.patient["patient_id"] == "P-77"
