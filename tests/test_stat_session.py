"""A patient the doctor checked in as STAT: ECGs of theirs that arrive on their own — from the cart's
USB stick or over the clinic LAN — go first, like the serial cart's; older ECGs of the same patient on
the stick, and other patients' ECGs, keep their routine priority."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from devices.ecg.npz import write_npz
from firmware_bridge.dicom_receiver import ReceivedObject
from lastmile.clinic.patients import PatientContext, StatSession
from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.ecg.intake import import_files, lan_object_store
from tests.ecg_factories import T0, make_recording
from uploader.outbox import Priority


def _config(tmp_path: Path) -> Config:
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.outbox.min_free_mb = 1
    config.ecg.re_record_hold_s = 0  # synthetic ECGs: quality is not this test's subject
    return config


def test_a_stat_session_covers_its_patient_from_check_in_on() -> None:
    session = StatSession("P00001", T0)
    assert session.covers("P00001", T0) and session.covers("P00001", T0 + dt.timedelta(minutes=5))
    assert not session.covers("P00001", T0 - dt.timedelta(seconds=1))  # recorded before the check-in
    assert not session.covers("P00002", T0 + dt.timedelta(minutes=5))
    assert not session.covers(None, T0) and not session.covers("", T0)
    assert session.covers("P00001", None)  # no time known (LAN object): the patient decides


def test_stick_files_of_the_stat_patient_since_check_in_go_first(tmp_path: Path) -> None:
    config = _config(tmp_path)
    stick = tmp_path / "stick"
    stick.mkdir()
    files = {
        "now.npz": make_recording(1),  # P00001, T0 + 1 min
        "older.npz": dataclasses.replace(make_recording(1, seconds=3.0), acquired_at=T0 - dt.timedelta(days=3)),
        "other.npz": make_recording(2),  # P00002
    }
    for name, recording in files.items():
        (stick / name).write_bytes(write_npz(recording))
    session = StatSession("P00001", T0)
    with open_outbox(config) as outbox:
        summary = import_files(outbox, config, [stick], stat_session=lambda: session)
        assert summary.imported == 3, summary
        priorities = {item.meta["acquired_at"]: (item.priority, item.meta["stat"]) for item in outbox.items()}
    assert priorities == {
        (T0 + dt.timedelta(minutes=1)).isoformat(): (Priority.STAT, True),
        (T0 - dt.timedelta(days=3)).isoformat(): (Priority.ROUTINE, False),
        (T0 + dt.timedelta(minutes=2)).isoformat(): (Priority.ROUTINE, False),
    }


def _received(patient_id: str, uid: str) -> ReceivedObject:
    return ReceivedObject(
        data=b"\0" * 128 + b"DICM" + b"\0" * 64,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.9.1.1",
        sop_instance_uid=uid,
        study_uid=uid + ".1",
        series_uid=uid + ".2",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae="CART",
        patient={"patient_id": patient_id, "name": "", "birth_date": "", "sex": "", "issuer": ""},
    )


def test_lan_objects_of_the_stat_patient_go_first(tmp_path: Path) -> None:
    config = _config(tmp_path)
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    now = dt.datetime.now(dt.timezone.utc)
    context.set_patient("P00001", "Test^One", now=now, stat=True, reason="chest pain")

    def stat_session() -> StatSession | None:
        current = context.current(dt.datetime.now(dt.timezone.utc))
        return StatSession(current.patient_id, current.since) if current is not None and current.stat else None

    try:
        with open_outbox(config) as outbox:
            store = lan_object_store(outbox, lambda: frozenset({"P00001"}), stat_session)
            store(_received("P00001", "1.2.3.1"))
            store(_received("P00002", "1.2.3.2"))
            context.set_patient("P00001", "Test^One", now=now, stat=False)  # the doctor took STAT back
            store(_received("P00001", "1.2.3.3"))
            got = {item.meta["sop_instance_uid"]: (item.priority, item.meta["stat"]) for item in outbox.items()}
    finally:
        context.close()
    assert got == {
        "1.2.3.1": (Priority.STAT, True),
        "1.2.3.2": (Priority.ROUTINE, False),
        "1.2.3.3": (Priority.ROUTINE, False),
    }


def test_lastmile_import_of_the_stat_patients_ecg_sends_it_first(tmp_path: Path) -> None:
    # `lastmile patient set P00001 --stat`, then the cart's stick imported with `lastmile import`
    # (no --stat: the doctor relies on the check-in, as the watched USB folder does).
    from lastmile.cli import main as cli

    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 1\n[ecg]\nre_record_hold_s = 0\n'
    )
    run = ["-c", str(config_file)]
    assert cli([*run, "patient", "set", "P00001", "--stat", "--reason", "胸痛"]) == 0
    stick = tmp_path / "stick"
    stick.mkdir()
    now = dt.datetime.now(dt.timezone.utc)
    (stick / "now.npz").write_bytes(write_npz(dataclasses.replace(make_recording(1), acquired_at=now)))
    assert cli([*run, "import", "-q", str(stick)]) == 0
    config = _config(tmp_path)
    with open_outbox(config) as outbox:
        [item] = outbox.items()
    assert (item.priority, item.meta["stat"]) == (Priority.STAT, True)


def test_lastmile_patient_set_again_without_stat_keeps_the_stat_check_in(tmp_path: Path, capsys) -> None:
    # The doctor checks 李四 in as STAT for chest pain; a technician then fixes the name with the
    # same command without --stat: the patient is still STAT, and their ECG still goes first.
    # Only --no-stat takes STAT back.
    import json

    from lastmile.cli import main as cli

    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 1\n[ecg]\nre_record_hold_s = 0\n'
    )
    run = ["-c", str(config_file)]

    def shown() -> tuple[bool, str, str]:
        capsys.readouterr()
        assert cli([*run, "patient", "show", "--json"]) == 0
        current = json.loads(capsys.readouterr().out)["current_patient"]
        return current["stat"], current["reason"], current["name"]

    assert cli([*run, "patient", "set", "P00001", "--name", "李四", "--stat", "--reason", "胸痛"]) == 0
    assert cli([*run, "patient", "set", "P00001", "--name", "李思"]) == 0
    assert shown() == (True, "胸痛", "Li^Si=李^思")
    stick = tmp_path / "stick"
    stick.mkdir()
    now = dt.datetime.now(dt.timezone.utc)
    (stick / "now.npz").write_bytes(write_npz(dataclasses.replace(make_recording(1), acquired_at=now)))
    assert cli([*run, "import", "-q", str(stick)]) == 0
    with open_outbox(_config(tmp_path)) as outbox:
        [item] = outbox.items()
    assert (item.priority, item.meta["stat"]) == (Priority.STAT, True)
    assert cli([*run, "patient", "set", "P00001", "--no-stat"]) == 0
    assert shown() == (False, "胸痛", "Li^Si=李^思")


def test_lastmile_patient_set_clear_name_and_reason_clears_them(tmp_path: Path, capsys) -> None:
    # 李四 checked in under a wrong name with a wrong reason: `--name ""` keeps them (empty is "as
    # it was"); --clear-name and --clear-reason clear them, STAT stays.
    import json

    from lastmile.cli import main as cli

    run = ["--data-dir", str(tmp_path / "data")]

    def shown() -> tuple[bool, str, str]:
        capsys.readouterr()
        assert cli(["patient", "show", "--json", *run]) == 0
        current = json.loads(capsys.readouterr().out)["current_patient"]
        return current["stat"], current["reason"], current["name"]

    assert cli(["patient", "set", "P00001", "--name", "王五", "--stat", "--reason", "胸痛", *run]) == 0
    assert cli(["patient", "set", "P00001", "--name", "", "--reason", "", *run]) == 0
    assert shown() == (True, "胸痛", "Wang^Wu=王^五")
    assert cli(["patient", "set", "P00001", "--clear-name", *run]) == 0
    assert shown() == (True, "胸痛", "")
    assert cli(["patient", "set", "P00001", "--clear-reason", *run]) == 0
    assert shown() == (True, "", "")
