"""`lastmile ecg to-dicom` says what the forward path would hold an ECG for, and writes nothing
without --force: a file it writes may be carried to the county by hand. The real CLI process, the
shared ECG files, a data directory with a real check-in (`lastmile patient set`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom

from tests.conftest import REPO, require_tool, shared_file

SAMPLE = "11010519491231002X"
HELD_EXIT = 3  # lastmile.commands.ecg.HELD_EXIT, as a script reading the exit code sees it


def lastmile(config: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "lastmile", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def _config(tmp_path: Path, id_kind: str = "") -> Path:
    path = tmp_path / "lastmile.toml"
    path.write_text(
        f'[gateway]\nid = "clinic-test"\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 1\n'
        f'[patient]\nid_kind = "{id_kind}"\n'
    )
    return path


def _flags(out: Path) -> str:
    ds = pydicom.dcmread(out)
    return " ".join(str(a.get("UnformattedTextValue", "")) for a in ds.WaveformAnnotationSequence)


def test_a_file_naming_no_patient_is_not_written_without_force(tmp_path: Path) -> None:
    config, out = _config(tmp_path, "cn-resident-id"), tmp_path / "out.dcm"
    contec = str(shared_file("ecg", "contec", "0000050.ECG"))  # a Contec cart writes no patient
    held = lastmile(config, "ecg", "to-dicom", contec, str(out))
    assert held.returncode == HELD_EXIT, held.stderr
    assert "names no patient" in held.stderr and "--patient-id" in held.stderr
    assert f"{out} not written" in held.stderr and "(unassigned)" in held.stderr and "Traceback" not in held.stderr
    assert not out.exists()
    forced = lastmile(config, "ecg", "to-dicom", contec, str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "written anyway (--force)" in forced.stderr and out.exists()
    assert pydicom.dcmread(out).PatientID.startswith("UNASSIGNED-")  # as the gateway sends it at the hold's end
    out.unlink()
    named = lastmile(config, "ecg", "to-dicom", contec, str(out), "--patient-id", SAMPLE, "--patient-name", "张三")
    assert named.returncode == 0, named.stderr
    assert "not written" not in named.stderr and "anyway" not in named.stderr
    assert pydicom.dcmread(out).PatientID == SAMPLE


def test_an_ecg_to_record_again_is_held_but_not_a_stat_one(tmp_path: Path) -> None:
    config, out = _config(tmp_path, "cn-resident-id"), tmp_path / "out.dcm"
    contec = str(shared_file("ecg", "contec", "0000037.ECG"))  # chest electrodes off, 50 Hz hum
    patient = ("--patient-id", SAMPLE, "--patient-name", "张三")
    held = lastmile(config, "ecg", "to-dicom", contec, str(out), *patient)
    assert held.returncode == HELD_EXIT, held.stderr
    assert "record again" in held.stderr and "(re-record)" in held.stderr
    assert "50 Hz" in held.stderr and "电极" in held.stderr  # what to fix, Chinese and English
    assert not out.exists()
    stat = lastmile(config, "ecg", "to-dicom", contec, str(out), *patient, "--stat")
    assert stat.returncode == 0, stat.stderr
    assert "quality: re-record" in stat.stderr and "not written" not in stat.stderr  # said, not held
    assert out.exists()


def test_a_file_naming_the_checked_in_id_under_another_name_is_held(tmp_path: Path) -> None:
    config, out = _config(tmp_path), tmp_path / "out.dcm"
    aecg = str(shared_file("ecg", "aecg", "fda_hl7_Example_aECG.xml"))  # SBJ-123 "Clark", a good ECG
    assert lastmile(config, "patient", "set", "SBJ-123", "--name", "张三").returncode == 0
    held = lastmile(config, "ecg", "to-dicom", aecg, str(out))
    assert held.returncode == HELD_EXIT, held.stderr
    assert "names patient SBJ-123 Clark, but SBJ-123 is checked in as 张三" in held.stderr
    assert "(name-mismatch)" in held.stderr and not out.exists()
    # the doctor's answer: it is 张三's after all - his name, nothing held
    answered = lastmile(config, "ecg", "to-dicom", aecg, str(out), "--patient-id", "SBJ-123", "--patient-name", "张三")
    assert answered.returncode == 0, answered.stderr
    assert "name-mismatch" not in _flags(out)
    forced = lastmile(config, "ecg", "to-dicom", aecg, str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "name-mismatch" in _flags(out)  # flagged for the reader, as the gateway sends it


def test_a_file_naming_another_patient_than_the_check_in_is_held(tmp_path: Path) -> None:
    config, out = _config(tmp_path), tmp_path / "out.dcm"
    aecg = str(shared_file("ecg", "aecg", "fda_hl7_Example_aECG.xml"))
    assert lastmile(config, "patient", "set", "P-77", "--name", "李四").returncode == 0
    held = lastmile(config, "ecg", "to-dicom", aecg, str(out))
    assert held.returncode == HELD_EXIT, held.stderr
    assert "names patient SBJ-123, but P-77 is checked in" in held.stderr and "(patient-mismatch)" in held.stderr
    assert not out.exists()
    assert lastmile(config, "patient", "clear").returncode == 0
    free = lastmile(config, "ecg", "to-dicom", aecg, str(out))  # nobody checked in: nothing to hold for
    assert free.returncode == 0, free.stderr
    assert "not written" not in free.stderr and "anyway" not in free.stderr


def test_the_exit_codes_are_in_the_help(tmp_path: Path) -> None:
    shown = lastmile(_config(tmp_path), "ecg", "to-dicom", "--help")
    assert shown.returncode == 0
    assert "exit codes:" in shown.stdout and f"  {HELD_EXIT}  not written: the gateway would hold" in shown.stdout
    assert "  78 not written: the settings file has a mistake" in shown.stdout, shown.stdout


def test_an_ecg_not_compared_with_a_check_in_is_written_and_stderr_says_so(tmp_path: Path) -> None:
    """A user who may not read clinic.db (the gateway's data directory is its service user's) got
    "lastmile: Permission denied: .../clinic.db", exit 1, and no file - a conversion that needs none
    of the gateway's data; with no clinic.db (a laptop, another --data-dir) nothing was compared
    with a check-in and stderr did not say so. Now both write the file and say it was not compared."""
    config, out = _config(tmp_path), tmp_path / "out.dcm"
    aecg = str(shared_file("ecg", "aecg", "fda_hl7_Example_aECG.xml"))  # SBJ-123, a good ECG
    clinic_db = tmp_path / "data" / "clinic.db"
    laptop = lastmile(config, "ecg", "to-dicom", aecg, str(out))
    assert laptop.returncode == 0, laptop.stderr
    assert f"not compared with a check-in (no {clinic_db})" in laptop.stderr, laptop.stderr
    out.unlink()
    assert lastmile(config, "patient", "set", "P-77", "--name", "李四").returncode == 0
    clinic_db.chmod(0)
    # root reads any file: take away the capability that lets it, as another user is refused
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        prefix = (require_tool("setpriv"), "--bounding-set=-dac_override,-dac_read_search", "--")
    refused = lastmile(config, "ecg", "to-dicom", aecg, str(out), prefix=prefix)
    assert refused.returncode == 0, refused.stderr
    assert f"not compared with a check-in (cannot read {clinic_db}: " in refused.stderr, refused.stderr
    assert "Permission denied" in refused.stderr or "unable to open" in refused.stderr, refused.stderr
    assert out.exists() and "Traceback" not in refused.stderr


def test_a_patient_name_without_a_patient_id_is_wrong_arguments(tmp_path: Path) -> None:
    config, out = _config(tmp_path), tmp_path / "out.dcm"
    contec = str(shared_file("ecg", "contec", "0000050.ECG"))
    wrong = lastmile(config, "ecg", "to-dicom", contec, str(out), "--patient-name", "张三")
    assert wrong.returncode == 2, wrong  # the help: "2  wrong arguments"
    assert "--patient-name needs --patient-id" in wrong.stderr and not out.exists()


def test_an_ecg_whose_sex_and_birth_date_its_id_contradicts_written_with_force_says_both(tmp_path: Path) -> None:
    """A woman born 1971 on a man's resident ID (the previous patient's details left in the cart):
    held for the doctor; written with --force it went without a word of it, where the gateway,
    unanswered, sends both in its Patient Comments: now the file carried by hand says the same."""
    config, out = _config(tmp_path, "cn-resident-id"), tmp_path / "out.dcm"
    resident_id = "110101196505050017"  # a man born 1965-05-05
    cart = pydicom.dcmread(shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm"))
    cart.PatientID, cart.PatientName, cart.PatientSex, cart.PatientBirthDate = (
        resident_id,
        "Li^Jianguo",
        "F",
        "19710101",
    )
    if "PatientAge" in cart:
        del cart.PatientAge
    cart.save_as(tmp_path / "cart.dcm")
    held = lastmile(config, "ecg", "to-dicom", str(tmp_path / "cart.dcm"), str(out))
    assert held.returncode == HELD_EXIT and "(patient-id-conflict)" in held.stderr, held.stderr
    forced = lastmile(config, "ecg", "to-dicom", str(tmp_path / "cart.dcm"), str(out), "--force")
    assert forced.returncode == 0 and "written anyway (--force)" in forced.stderr, forced.stderr
    written = pydicom.dcmread(out)
    assert (written.PatientSex, written.PatientBirthDate) == ("F", "19710101")  # the cart's, as the gateway's
    assert written.PatientComments == (
        f"心电图上的性别/出生日期与身份证号不符，医生未确认：心电图上是 女，1971-01-01；身份证号 {resident_id} 是 男，"
        "1965-05-05。 / The ECG's sex/birth date contradicts the resident ID, not confirmed by the doctor: the ECG "
        f"says F, 1971-01-01; ID {resident_id} says M, 1965-05-05."
    )
    # the doctor's answer (his ID, his details): nothing contradicted, nothing said
    answered = lastmile(config, "ecg", "to-dicom", str(tmp_path / "cart.dcm"), str(out), "--patient-id", resident_id)
    assert answered.returncode == 0, answered.stderr
    assert "PatientComments" not in pydicom.dcmread(out)
