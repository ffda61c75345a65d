"""A patient the doctor checked in as STAT: ECGs of theirs that arrive on their own — from the cart's
USB stick or over the clinic LAN — go first, like the serial cart's; older ECGs of the same patient on
the stick, and other patients' ECGs, keep their routine priority."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

from devices.ecg.npz import write_npz
from devices.identity import Patient
from firmware_bridge.dicom_receiver import ReceivedObject
from lastmile.clinic.patients import PatientContext, SameName, StatSession
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
    linked = StatSession("P00001", T0, frozenset({"MZ-0042"}))  # the doctor said it is his other ID
    assert linked.covers("MZ-0042", T0) and not linked.covers("MZ-0077", T0)


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


ID_CARD, CLINIC_NUMBER, STRANGER = "11010519491231002X", "MZ-0042", "MZ-0077"  # 王五's two IDs; another patient's


def _cli_run(tmp_path: Path) -> list[str]:
    """The `lastmile` arguments naming a configuration as `_config`'s (written to `tmp_path`)."""
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 1\n[ecg]\nre_record_hold_s = 0\n'
    )
    return ["-c", str(config_file)]


def _checked_in_under_his_other_id(run: list[str]) -> None:
    """王五 checked in as STAT for chest pain by his ID card number, then by his clinic number: the
    doctor says it is his other ID (the STAT box not ticked again)."""
    from lastmile.cli import main as cli

    assert cli([*run, "patient", "set", ID_CARD, "--name", "王五", "--stat", "--reason", "胸痛"]) == 0
    assert cli([*run, "patient", "set", CLINIC_NUMBER, "--name", "王五", "--about", ID_CARD, "--other-id"]) == 0


def test_the_stat_patients_ecg_under_his_other_id_goes_first(tmp_path: Path) -> None:
    """The cart on the desk was still programmed with 王五's ID card number after the doctor linked
    his clinic number: the stick's ECG of him went ROUTINE, behind the backlog - the one ECG the
    chest-pain pathway is about. Now it is STAT and the next one sent; another patient's ID (linked
    to nobody) stays routine and held for the doctor."""
    from lastmile.cli import main as cli
    from lastmile.ecg.holds import PATIENT_MISMATCH
    from uploader.outbox import Kind

    config = _config(tmp_path)
    run = _cli_run(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)

    def stick_of(name: str, ecgs: dict[str, str]) -> Path:
        stick = tmp_path / name
        stick.mkdir()
        for seed, (file, patient_id) in enumerate(ecgs.items()):
            # the cart's sex and birth date are what his ID card says (11010519491231002X: F, 1949-12-31)
            recording = make_recording(seed, patient=Patient(patient_id, "", dt.date(1949, 12, 31), "F"))
            recorded = dt.datetime.now(dt.timezone.utc)  # after the check-ins, for the cart's stick
            (stick / file).write_bytes(write_npz(dataclasses.replace(recording, acquired_at=recorded)))
        return stick

    backlog = stick_of("backlog", {"a.npz": "MZ-0001", "b.npz": "MZ-0002"})  # this morning's, nobody checked in
    assert cli([*run, "import", "-q", str(backlog)]) == 0
    _checked_in_under_his_other_id(run)
    assert cli([*run, "import", "-q", str(stick_of("cart", {"his.npz": ID_CARD, "other.npz": STRANGER}))]) == 0
    with open_outbox(config) as outbox:
        items = {item.patient["patient_id"]: item for item in outbox.items() if item.patient}
        his, stranger = items[ID_CARD], items[STRANGER]
        assert (his.priority, his.meta["stat"], his.hold_reason) == (Priority.STAT, True, None), his
        assert (stranger.priority, stranger.meta["stat"]) == (Priority.ROUTINE, False), stranger
        assert PATIENT_MISMATCH in stranger.meta["flags"] and stranger.hold_reason == PATIENT_MISMATCH
        [first] = outbox.claim(Kind.DICOM, 1, now.timestamp() + 60)
    assert first.id == his.id


def _sent_on_the_lan(config: Config, context: PatientContext, *patient_ids: str) -> dict[str, tuple[int, bool, bool]]:
    """A cart on the LAN sends one ECG naming each of `patient_ids` now, as the acquire service
    stores them with `context`'s session: each one's (priority, STAT, flagged as another patient's)
    by its SOP instance UID (1.2.3.1, 1.2.3.2 ...)."""
    from lastmile.ecg.holds import PATIENT_MISMATCH

    def now() -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    with open_outbox(config) as outbox:
        store = lan_object_store(outbox, lambda: context.patient_ids(now()), lambda: context.stat_session(now()))
        for n, patient_id in enumerate(patient_ids, 1):
            store(_received(patient_id, f"1.2.3.{n}"))
        return {
            item.meta["sop_instance_uid"]: (item.priority, item.meta["stat"], PATIENT_MISMATCH in item.meta["flags"])
            for item in outbox.items()
        }


def test_lan_objects_under_the_stat_patients_other_id_go_first(tmp_path: Path) -> None:
    """As from the stick, a cart on the LAN still sending 王五's ID card number after the doctor
    linked his clinic number: his ECG is STAT, another patient's is routine and flagged."""
    config = _config(tmp_path)
    _checked_in_under_his_other_id(_cli_run(tmp_path))
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        got = _sent_on_the_lan(config, context, ID_CARD, STRANGER)
    finally:
        context.close()
    assert got == {"1.2.3.1": (Priority.STAT, True, False), "1.2.3.2": (Priority.ROUTINE, False, True)}


@contextlib.contextmanager
def a_session_kept_past_the_logs_day(tmp_path: Path) -> Iterator[tuple[Config, PatientContext, dt.datetime]]:
    """王五, STAT for 胸痛, checked in by his ID card number 25 h ago and linked to his clinic number
    (the idle timeout configured long, his session touched since: a reading now and then, each
    change of the session pruning its log to its last day). The config, his context and now."""
    config = _config(tmp_path)
    hour = dt.timedelta(hours=1)
    began = dt.datetime.now(dt.timezone.utc) - 25 * hour
    context = PatientContext.open(config.data_dir, idle_timeout_s=12 * 3600)
    try:
        context.check_in(ID_CARD, "Wang^Wu=王^五", now=began, stat=True, reason="胸痛")
        context.check_in(
            CLINIC_NUMBER, "Wang^Wu=王^五", now=began + dt.timedelta(minutes=1), same_name=SameName.OTHER_ID
        )
        for hours in (11, 22, 25):
            assert context.touch(now=began + hours * hour)
        yield config, context, began + 25 * hour
    finally:
        context.close()


def test_his_other_id_stays_his_in_a_session_kept_past_the_session_logs_day(tmp_path: Path) -> None:
    """The links were read back from the session log: his ECG under his ID card number was held as
    another patient's, and routine. The link lives with his session."""
    with a_session_kept_past_the_logs_day(tmp_path) as (config, context, _now):
        got = _sent_on_the_lan(config, context, ID_CARD, STRANGER)
    assert got == {"1.2.3.1": (Priority.STAT, True, False), "1.2.3.2": (Priority.ROUTINE, False, True)}


def test_his_other_id_keeps_his_name_in_a_session_kept_past_the_session_logs_day(tmp_path: Path) -> None:
    """The names of his IDs came from the check-ins in the session log: his ECG under his ID card
    number, its file naming no one, went out with his ID and no name. Every ID of his session is
    his: it has his name."""
    with a_session_kept_past_the_logs_day(tmp_path) as (_config, context, now):
        assert context.known_names([ID_CARD, CLINIC_NUMBER, STRANGER], now) == {
            ID_CARD: "Wang^Wu=王^五",
            CLINIC_NUMBER: "Wang^Wu=王^五",
        }


def test_his_other_id_stays_his_after_his_current_id_is_corrected(tmp_path: Path) -> None:
    """王五, STAT, checked in by his ID card number, linked to his clinic number, which was then
    corrected (a typo: MZ-0042 to MZ-0043). The correction ended the log's walk: his ECG under his
    ID card number was held as another patient's, and routine. A correction keeps his links (the
    typo itself is none: an ECG naming it is not his)."""
    config = _config(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        context.check_in(ID_CARD, "Wang^Wu=王^五", now=now, stat=True, reason="胸痛")
        context.check_in(CLINIC_NUMBER, "Wang^Wu=王^五", now=now, same_name=SameName.OTHER_ID)
        context.check_in("MZ-0043", "Wang^Wu=王^五", now=now)  # unasked: the typo corrected
        got = _sent_on_the_lan(config, context, ID_CARD, CLINIC_NUMBER)
    finally:
        context.close()
    assert got == {"1.2.3.1": (Priority.STAT, True, False), "1.2.3.2": (Priority.ROUTINE, False, True)}


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
