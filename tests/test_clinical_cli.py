"""What the doctor types: `ecg to-dicom` with the patient, doctor, urgency and reason a file
lacks; `ecg decode --json` with the cart's findings; visit notes reaching the county inside the
visit's bundle; every time the CLI prints in the clinic's zone with its offset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest

from lastmile.cli import main
from tests.conftest import shared_file
from tests.dicom_validation import dciodvfy_problems
from tests.fhir_server import validate_transaction
from uploader.outbox import Outbox

SAMPLE = "11010519491231002X"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "lastmile.toml"
    path.write_text(
        f'[gateway]\nid = "clinic-test"\ninstitution = "Test Clinic"\ndata_dir = "{tmp_path / "data"}"\n'
        '[patient]\nid_kind = "cn-resident-id"\nid_issuer = "Anytown county register"\n'
    )
    return path


def test_to_dicom_with_patient_doctor_stat_and_reason(config: Path, tmp_path: Path, capsys) -> None:
    contec = shared_file("ecg", "contec", "0000050.ECG")  # names no patient
    out = tmp_path / "out.dcm"
    assert (
        main(
            [
                "-c",
                str(config),
                "ecg",
                "to-dicom",
                str(contec),
                str(out),
                "--patient-id",
                "1101 0519 4912 3100 2x",
                "--patient-name",
                "张三",
                "--doctor",
                "李明",
                "--stat",
                "--reason",
                "胸痛 chest pain",
            ]
        )
        == 0
    )
    data = out.read_bytes()
    assert dciodvfy_problems(data) == []
    ds = pydicom.dcmread(io.BytesIO(data))
    assert (ds.PatientID, str(ds.PatientName), ds.PatientSex, ds.PatientBirthDate) == (
        SAMPLE,
        "Zhang^San=张^三",
        "F",
        "19491231",
    )
    assert ds.IssuerOfPatientID == "Anytown county register" and ds.PatientAge.endswith("Y")
    assert str(ds.ReferringPhysicianName) == "Li^Ming=李^明"
    assert ds.StudyDescription.startswith("STAT") and "胸痛 chest pain" in ds.StudyDescription
    assert ds.RequestAttributesSequence[0].ReasonForTheRequestedProcedure == "胸痛 chest pain"
    assert ds.AcquisitionContextSequence[0].ConceptCodeSequence[0].CodeValue == "103391001"  # urgent
    assert len(ds.AccessionNumber) == 16
    assert (
        main(["-c", str(config), "ecg", "to-dicom", str(contec), str(out), "--patient-id", "110105194912310020"]) == 1
    )
    assert "校验位" in capsys.readouterr().err


def test_to_dicom_refuses_another_patient_unless_overridden(config: Path, tmp_path: Path, capsys) -> None:
    scp = shared_file("ecg", "scp", "ecgtoolkit_Example.scp")  # names SBJ-123 (not a resident ID)
    out = tmp_path / "out.dcm"
    # the file's ID fails the resident-ID check: it is refused, so the file names no usable patient
    assert main(["-c", str(config), "ecg", "to-dicom", str(scp), str(out), "--patient-id", SAMPLE]) == 0
    ds = pydicom.dcmread(out)
    assert ds.PatientID == SAMPLE
    assert any("patient-id-refused" in str(a.get("UnformattedTextValue", "")) for a in ds.WaveformAnnotationSequence)
    plain = tmp_path / "plain.toml"
    plain.write_text('[gateway]\nid = "clinic-test"\n')
    assert main(["-c", str(plain), "ecg", "to-dicom", str(scp), str(out), "--patient-id", "P-77"]) == 1
    assert "names patient SBJ-123, not P-77" in capsys.readouterr().err
    assert (
        main(["-c", str(plain), "ecg", "to-dicom", str(scp), str(out), "--patient-id", "P-77", "--override-patient"])
        == 0
    )
    ds = pydicom.dcmread(out)
    assert ds.PatientID == "P-77"
    assert any(
        "patient-overridden:file-named-SBJ-123" in str(a.get("UnformattedTextValue", ""))
        for a in ds.WaveformAnnotationSequence
    )


def test_decode_json_shows_the_carts_findings(capsys) -> None:
    path = shared_file("ecg", "scp", "abtahi_ECG_20170504_163507_123456789.SCP")
    assert main(["ecg", "decode", "--json", str(path)]) == 0
    found = json.loads(capsys.readouterr().out)
    by_kind = {m["kind"]: m for m in found["measurements"] if "lead" not in m}
    assert by_kind["qtc-interval"] == {
        "kind": "qtc-interval",
        "value": 386.0,
        "unit": "ms",
        "code": "MDC 2:15876",
        "source": "scp:section7",
        "method": "bazett",
    }
    assert by_kind["qrs-axis"]["value"] == 48 and by_kind["qrs-axis"]["unit"] == "deg"
    assert [s["text"] for s in found["statements"]] == ["sinusrytm (långsam)", "hög P-amplitud", "normal EKG-variant"]
    assert found["median_beats"]["leads"][:2] == ["I", "II"]
    assert main(["ecg", "decode", str(path)]) == 0
    assert "cart findings: rr-interval 1000 ms" in capsys.readouterr().out


def test_import_stat_and_reason_reach_the_object(config: Path, tmp_path: Path) -> None:
    assert main(["-c", str(config), "patient", "set", SAMPLE, "--doctor", "李明"]) == 0
    contec = shared_file("ecg", "contec", "0000037.ECG")
    assert main(["-c", str(config), "import", "-q", "--stat", "--reason", "心悸 palpitations", str(contec)]) == 0
    with Outbox.open(tmp_path / "data") as outbox:
        (item,) = outbox.items()
        assert item.hold_until is None and item.priority == 0  # STAT: never held, first in line
        ds = pydicom.dcmread(io.BytesIO(outbox.read_payload(item)))
    assert str(ds.ReferringPhysicianName) == "Li^Ming=李^明"
    assert "心悸 palpitations" in ds.StudyDescription and ds.StudyDescription.startswith("STAT")


def test_visit_notes_travel_with_the_encounter_and_times_show_the_clinic_zone(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\nid = "gw-cli"\ndata_dir = "{tmp_path / "data"}"\n'
        '[visits]\ndoctor_id = "DR-9"\n[gps]\nsource = "none"\n'
    )
    run = lambda *a: main(["-c", str(config), *a])
    resident = tmp_path / "resident.toml"
    resident.write_text(config.read_text() + '[patient]\nid_kind = "cn-resident-id"\n')
    assert main(["-c", str(resident), "visit", "start", "--patient", "110105194912310020"]) == 1
    assert "校验位" in capsys.readouterr().err  # a visit's patient ID is checked too
    assert run("visit", "start", "--patient", "P-1") == 0
    assert "+08:00" in capsys.readouterr().out
    assert run("visit", "note", "血压偏高，建议复查 BP high, recheck in a week") == 0
    assert run("visit", "stop") == 0
    capsys.readouterr()
    assert run("visit", "list") == 0
    assert "+08:00" in capsys.readouterr().out
    assert run("patient", "set", "P-1") == 0
    assert "+08:00" in capsys.readouterr().out
    with Outbox.open(tmp_path / "data") as outbox:
        (item,) = outbox.items(kind="fhir-bundle")
        bundle = json.loads(outbox.read_payload(item))
    validate_transaction(bundle)
    encounter = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter")
    notes = [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") == "34109-9"
    ]
    assert [n["valueString"] for n in notes] == ["血压偏高，建议复查 BP high, recheck in a week"]
    assert notes[0]["encounter"]["reference"] == encounter["fullUrl"]
    provenance = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Provenance")
    assert {"reference": next(e["fullUrl"] for e in bundle["entry"] if e["resource"] is notes[0])} in provenance[
        "resource"
    ]["target"]
