"""ECGs whose patient the doctor must settle are held (never sent) for `unassigned_ecg_hold_s`,
listed by `patient show`, assigned by `patient assign E<n>` (the object rebuilt under the same
UIDs) - or sent as they are when the hold runs out. STAT ECGs are never held."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from devices.identity import Patient, resident_id_check_char
from lastmile.cli import main as cli
from lastmile.config import Config
from lastmile.ecg.intake import (
    PATIENT_MISMATCH,
    UNASSIGNED_HOLD,
    HeldEcgError,
    assign_held_ecg,
    enqueue_recording,
    held_ecgs,
    with_patient_check,
)
from lastmile.services.forward import forwarder_settings, open_outbox
from tests.conftest import require_private_netns, shared_file
from tests.dicom_validation import dciodvfy_problems
from tests.ecg_factories import make_recording
from tests.forward_setup import make_config
from tests.peers import free_port, gateway_modality
from tests.service_harness import known_name
from uploader.dicom_ecg import EcgStudyUids, unassigned_patient_id
from uploader.ecg_forwarder import EcgForwarder
from uploader.outbox import ItemState, Kind

SAMPLE = "11010519491231002X"
T0 = 1_790_000_000.0
HOLD_S = 900.0


def _config(tmp_path: Path) -> Config:
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.patient.id_kind = "cn-resident-id"
    config.patient.id_issuer = "county register"
    config.outbox.min_free_mb = 1
    config.ecg.re_record_hold_s = 0  # synthetic 2 s ECGs are re-record cases: patient holds are the subject
    return config


def _dataset(outbox, item) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(outbox.read_payload(item)))


def _explicit(ds: pydicom.Dataset) -> bytes:
    """dciodvfy cannot read deflated objects: the same dataset, re-encoded explicit."""
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_unassigned_routine_ecg_is_held_stat_never(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with open_outbox(config) as outbox:
        held = enqueue_recording(outbox, make_recording(1, patient=None), config, key="a", now=T0).item
        urgent = dataclasses.replace(make_recording(2, patient=None), stat=True)
        stat = enqueue_recording(outbox, urgent, config, key="b", now=T0).item
        known = enqueue_recording(outbox, make_recording(3, patient=Patient(SAMPLE)), config, key="c", now=T0).item
        assert held.hold_reason == UNASSIGNED_HOLD and held.hold_until == T0 + HOLD_S
        assert stat.hold_until is None and known.hold_until is None
        assert [i.id for i in held_ecgs(outbox, T0 + 1)] == [held.id]
        # the forwarder's claim never takes a held item, until its hold has run out
        assert {i.key for i in outbox.claim(Kind.DICOM, 10, T0 + 1)} == {"b", "c"}
        assert outbox.claim(Kind.DICOM, 10, T0 + HOLD_S - 1) == []
        late = outbox.claim(Kind.DICOM, 10, T0 + HOLD_S + 1)
        assert [i.key for i in late] == ["a"]
        ds = _dataset(outbox, late[0])
        assert ds.PatientID.startswith("UNASSIGNED-") and "UNASSIGNED" in ds.StudyDescription  # as today


def test_a_file_naming_another_patient_is_held_as_a_mismatch(tmp_path: Path) -> None:
    config = _config(tmp_path)
    other = "11010519491231001" + "9"  # any ID: the file's patient is only compared
    recording = with_patient_check(make_recording(4, patient=Patient(SAMPLE)), frozenset({other}))
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, recording, config, key="m", now=T0).item
        assert item.hold_reason == PATIENT_MISMATCH and item.meta["file_patient_id"] == SAMPLE
        assert [i.id for i in held_ecgs(outbox, T0)] == [item.id]


def test_assign_rebuilds_under_the_same_uids_and_releases(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, make_recording(5, patient=None), config, key="u", now=T0).item
        before = _dataset(outbox, item)
        patient = Patient(SAMPLE, "Zhang^San=张^三", dt.date(1949, 12, 31), "F", "county register")
        now = dt.datetime.fromtimestamp(T0 + 60, dt.timezone.utc)
        assigned = assign_held_ecg(outbox, item.id, patient, now=now, by="Li^Ming")
        assert assigned.hold_until is None and assigned.meta["unassigned"] is False
        assert assigned.patient is not None and assigned.patient["patient_id"] == SAMPLE
        after = _dataset(outbox, assigned)
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber"):
            assert after.get(keyword) == before.get(keyword), keyword
        assert after.WaveformSequence[0].WaveformData == before.WaveformSequence[0].WaveformData
        assert (after.PatientID, str(after.PatientName), after.PatientSex) == (SAMPLE, "Zhang^San=张^三", "F")
        assert after.PatientBirthDate == "19491231" and after.IssuerOfPatientID == "county register"
        assert "UNASSIGNED" not in after.StudyDescription and "PatientComments" not in after
        texts = [str(a.get("UnformattedTextValue", "")) for a in after.WaveformAnnotationSequence]
        assert not any(t.startswith("UNASSIGNED") for t in texts)
        assert any("Patient assigned at the gateway" in t and "Li^Ming" in t for t in texts)
        assert dciodvfy_problems(_explicit(after)) == []
        assert [i.key for i in outbox.claim(Kind.DICOM, 10, T0 + 61)] == ["u"]  # released at once
        with pytest.raises(HeldEcgError, match="already sent"):
            assign_held_ecg(outbox, item.id, patient, now=now)


def test_only_an_ecg_whose_patient_is_unsettled_can_be_assigned_and_only_once(tmp_path: Path) -> None:
    # A routine ECG of a known patient waits in the queue (the link is down): a mistyped E<n> must
    # not rebuild it for someone else; nor may a second doctor's stale page move an ECG just
    # assigned to one patient onto another before the forwarder takes it.
    config = _config(tmp_path)
    other = "32010219800101001" + resident_id_check_char("32010219800101001")
    now = dt.datetime.fromtimestamp(T0 + 60, dt.timezone.utc)
    with open_outbox(config) as outbox:
        known = enqueue_recording(outbox, make_recording(9, patient=Patient(other)), config, key="k", now=T0).item
        with pytest.raises(HeldEcgError, match="not held"):
            assign_held_ecg(outbox, known.id, Patient(SAMPLE), now=now)
        assert outbox.get(known.id).patient["patient_id"] == other  # type: ignore[union-attr]
        held = enqueue_recording(outbox, make_recording(10, patient=None), config, key="h", now=T0).item
        assign_held_ecg(outbox, held.id, Patient(SAMPLE), now=now)
        with pytest.raises(HeldEcgError, match=SAMPLE):
            assign_held_ecg(outbox, held.id, Patient(other), now=now + dt.timedelta(seconds=5))
        assert outbox.get(held.id).patient["patient_id"] == SAMPLE  # type: ignore[union-attr]
        assert _dataset(outbox, outbox.get(held.id)).PatientID == SAMPLE
        assign_held_ecg(outbox, held.id, Patient(SAMPLE), now=now)  # the same again: no harm


def test_cli_lists_and_assigns_a_held_contec_ecg(tmp_path: Path, capsys) -> None:
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 1\n'
        '[patient]\nid_kind = "cn-resident-id"\n'
    )
    run = ["-c", str(config_file)]
    assert cli([*run, "patient", "set", SAMPLE, "--name", "张三"]) == 0
    assert cli([*run, "import", "-q", str(shared_file("ecg", "contec", "0000050.ECG"))]) == 0
    capsys.readouterr()
    assert cli([*run, "queue"]) == 0
    assert "queued 1 (1 held for the doctor)" in capsys.readouterr().out
    assert cli([*run, "patient", "show"]) == 0
    out = capsys.readouterr().out
    assert "held for you" in out and "names no patient" in out and "Contec ECG90A" in out
    number = out.split("  E", 1)[1].split()[0]
    assert cli([*run, "patient", "assign", f"E{number}", "110105194912310020"]) == 2  # wrong check digit
    assert "校验位" in capsys.readouterr().err
    assert cli([*run, "patient", "assign", f"E{number}", SAMPLE, "--name", "张三"]) == 0
    assert "assigned to 11010519491231002X Zhang^San=张^三" in capsys.readouterr().out
    assert cli([*run, "patient", "show", "--json"]) == 0
    assert '"held_ecgs": []' in capsys.readouterr().out


def _clinic_number_cli(tmp_path: Path) -> tuple[Config, list[str]]:
    """A gateway that takes clinic numbers: its config, and the CLI's arguments for its config file."""
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 1\n')
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.outbox.min_free_mb = 1
    config.ecg.re_record_hold_s = 0
    return config, ["-c", str(config_file)]


def test_cli_assigning_a_mismatch_ecg_to_its_own_patient_keeps_what_the_file_said(tmp_path: Path, capsys) -> None:
    """`patient assign E<n> <its file's ID>`: the ECG named 王五 (clinic number, born 1950, male)
    while 张三 was checked in. Assigned to 王五 as the file says, it keeps his name, birth date and
    sex (the reading center reads an ECG by age and sex); assigned to another number, none of them."""
    config, run = _clinic_number_cli(tmp_path)
    wang = Patient("MZ-20418", "Wang^Wu=王^五", dt.date(1950, 3, 2), "M")
    with open_outbox(config) as outbox:
        held = [
            enqueue_recording(
                outbox,
                with_patient_check(make_recording(n, patient=wang), frozenset({SAMPLE})),
                config,
                key=k,
                now=time.time(),
            ).item.id
            for n, k in ((11, "own"), (12, "other"))
        ]
    assert cli([*run, "patient", "assign", f"E{held[0]}", "MZ-20418"]) == 0
    assert cli([*run, "patient", "assign", f"E{held[1]}", "MZ-30001"]) == 0
    with open_outbox(config) as outbox:
        own, other = (_dataset(outbox, outbox.get(i)) for i in held)
    assert (str(own.PatientName), own.PatientBirthDate, own.PatientSex) == ("Wang^Wu=王^五", "19500302", "M")
    assert own.PatientAge.endswith("Y") and dciodvfy_problems(_explicit(own)) == []
    assert (str(other.PatientName), other.PatientBirthDate, other.PatientSex) == ("", "", "")
    assert "PatientAge" not in other


@pytest.mark.orthanc
def test_held_ecg_assigned_in_time_reaches_orthanc_once_under_the_real_patient(tmp_path, orthanc_factory) -> None:
    require_private_netns()
    listen = free_port()
    orthanc = orthanc_factory(modalities=gateway_modality("CLINIC01", listen))
    config = make_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen)
    config.patient.id_kind = "cn-resident-id"
    now = time.time()
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, make_recording(7, patient=None), config, key="held", now=now).item
        other = "32010219800101001" + resident_id_check_char("32010219800101001")
        known = enqueue_recording(outbox, make_recording(8, patient=Patient(other)), config, key="known", now=now).item
        uids = dict(item.meta)
        placeholder = unassigned_patient_id(
            EcgStudyUids(uids["study_uid"], uids["series_uid"], uids["sop_instance_uid"])
        )
    stop = threading.Event()
    deadline = time.monotonic() + 60
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as forwarder:
        # the forwarder runs while the ECG is held: only the other one goes
        while outbox.get(known.id).state != ItemState.PURGED:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, outbox.stats(time.time())
            time.sleep(min(forwarder.step(stop), 0.1))
        for _ in range(3):
            forwarder.run_round(stop)
        assert outbox.get(item.id).state == ItemState.QUEUED  # type: ignore[union-attr]
        assert orthanc.sop_instance_uids() == {known.meta["sop_instance_uid"]}
        assign_held_ecg(
            outbox,
            item.id,
            Patient(SAMPLE, "Zhang^San=张^三", dt.date(1949, 12, 31), "F"),
            now=dt.datetime.now(dt.timezone.utc),
        )
        while outbox.get(item.id).state != ItemState.PURGED:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, outbox.stats(time.time())
            time.sleep(min(forwarder.step(stop), 0.1))
        for _ in range(3):  # nothing more goes, however long it runs
            forwarder.run_round(stop)
    assert orthanc.sop_instance_uids() == {known.meta["sop_instance_uid"], uids["sop_instance_uid"]}
    assert orthanc.statistics()["CountInstances"] == 2
    tags = orthanc.instance_tags(orthanc.instance_id_of(uids["sop_instance_uid"]))
    assert tags["PatientID"] == SAMPLE and tags["PatientName"] == "Zhang^San=张^三"
    assert tags["StudyInstanceUID"] == uids["study_uid"] and tags["AccessionNumber"] == uids["accession_number"]
    patients = {p["MainDicomTags"]["PatientID"] for p in orthanc.rest("/patients?expand")}
    assert placeholder not in patients


def test_cli_assigning_a_held_ecg_with_another_name_than_its_ids_check_in_is_refused_naming_both(
    tmp_path: Path, capsys
) -> None:
    """MZ-1 was checked in as 张三; an ECG that names no patient is held and the doctor assigns it
    to MZ-1 typing 李四. It went to the county PACS as 李四 while MZ-1's readings go as 张三: one
    name is wrong. She is asked which (as map-user asks); with --correct-name, 李四 it is."""
    config, run = _clinic_number_cli(tmp_path)
    assert cli([*run, "patient", "set", "MZ-1", "--name", "张三"]) == 0
    with open_outbox(config) as outbox:
        held = enqueue_recording(outbox, make_recording(21, patient=None), config, key="e", now=time.time()).item.id
    capsys.readouterr()

    assert cli([*run, "patient", "assign", f"E{held}", "MZ-1", "--name", "李四"]) == 2
    said = capsys.readouterr()
    assert "张三" in said.err and "李四" in said.err and "^" not in said.err and "--correct-name" in said.err, said
    with open_outbox(config) as outbox:
        item = outbox.get(held)
        assert item is not None and item.meta["unassigned"] and item.hold_reason == UNASSIGNED_HOLD

    assert cli([*run, "patient", "assign", f"E{held}", "MZ-1", "--name", "李四", "--correct-name"]) == 0
    assert "assigned to MZ-1 Li^Si=李^四" in capsys.readouterr().out
    with open_outbox(config) as outbox:
        item = outbox.get(held)
        assert item is not None and item.patient is not None and item.patient["name"] == "Li^Si=李^四"
        assert str(_dataset(outbox, item).PatientName) == "Li^Si=李^四"
    assert known_name(config, "MZ-1") == "Li^Si=李^四"  # the check-in's name corrected too, once assigned


def test_cli_a_refused_ecg_assignment_with_correct_name_leaves_the_check_ins_name_as_it_was(
    tmp_path: Path, capsys
) -> None:
    """MZ-1 was checked in as 张三; the doctor assigns E<n> with a mistyped number to MZ-1 typing
    李四 with --correct-name: refused (no such ECG held), and MZ-1 was 李四 from then on all the
    same - his readings went under a name given for an assignment never made. Now the check-in's
    name is corrected only once the ECG is assigned."""
    config, run = _clinic_number_cli(tmp_path)
    assert cli([*run, "patient", "set", "MZ-1", "--name", "张三"]) == 0
    with open_outbox(config) as outbox:
        held = enqueue_recording(outbox, make_recording(21, patient=None), config, key="e", now=time.time()).item.id
    capsys.readouterr()

    assert cli([*run, "patient", "assign", f"E{held + 7}", "MZ-1", "--name", "李四", "--correct-name"]) == 1
    assert f"no ECG E{held + 7} held at this gateway" in capsys.readouterr().err
    assert known_name(config, "MZ-1") == "Zhang^San=张^三"
    with open_outbox(config) as outbox:
        item = outbox.get(held)
        assert item is not None and item.meta["unassigned"] and item.hold_reason == UNASSIGNED_HOLD
