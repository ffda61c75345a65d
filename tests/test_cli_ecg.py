"""`lastmile ecg decode` and `lastmile ecg to-dicom` run through the real CLI entry point on the
shared files: CSV output equals the references, every converted object passes dciodvfy with
no errors and no warnings and decodes back to the same samples, refusals exit 1 with a message."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from devices.ecg.dicom_input import read_dicom_ecg
from devices.ecg.formats import decode_ecg
from lastmile.cli import main
from tests.conftest import shared_file
from tests.dicom_validation import dciodvfy_problems

GOOD_FILES = [
    ("scp", "ecgtoolkit_Example.scp"),
    ("scp", "abtahi_ECG_20170504_163507_123456789.SCP"),
    ("aecg", "fda_hl7_Example_aECG.xml"),
    ("aecg", "fda_minimum_aecg.xml"),
    ("dicom", "ecgtoolkit_Example.dcm"),
    ("contec", "0000050.ECG"),
    ("contec", "0000037.ECG"),
]
REFUSED_FILES = [(("scp", "healforce_62.SCP"), "non-conforming"), (("aecg", "fda_empty.xml"), "no rhythm ECG")]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "lastmile.toml"
    path.write_text(f'[gateway]\nid = "clinic-test"\ninstitution = "Test Clinic"\ndata_dir = "{tmp_path / "data"}"\n')
    return path


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open() as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=float)


@pytest.mark.parametrize("name", ["ecgtoolkit_Example.scp", "abtahi_ECG_20170504_163507_123456789.SCP"])
def test_decode_csv_equals_reference(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.csv"
    assert main(["ecg", "decode", str(shared_file("ecg", "scp", name)), "--csv", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{name}: SCP-ECG, 12 leads") and "\n" not in line
    header, values = _read_csv(out)
    ref_path = shared_file("ecg", "scp", "reference", name + ".uV.csv")
    ref_header = ref_path.read_text().splitlines()[0].split("#")[0].strip().split(",")
    reference = np.loadtxt(ref_path, delimiter=",", skiprows=1)
    for column, lead in enumerate(ref_header):
        np.testing.assert_array_equal(values[:, header.index(lead)], reference[:, column], err_msg=lead)


def test_decode_contec_csv_equals_the_carts_export(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    assert main(["ecg", "decode", str(shared_file("ecg", "contec", "0000050.ECG")), "--csv", str(out)]) == 0
    header, values = _read_csv(out)
    with shared_file("ecg", "contec", "0000050.ECG.csv").open() as f:
        reference = np.array([[int(v) for v in row[:6]] for row in csv.reader(f)]) * 5.0
    for column, lead in enumerate(("I", "II", "III", "aVR", "aVL", "aVF")):
        np.testing.assert_array_equal(values[:, header.index(lead)], reference[:, column], err_msg=lead)


@pytest.mark.parametrize("where,message", REFUSED_FILES, ids=[w[1] for w, _ in REFUSED_FILES])
def test_refused_files_exit_1_with_a_clear_message(
    where: tuple[str, str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    path = str(shared_file("ecg", *where))
    assert main(["ecg", "decode", path, "--csv", str(tmp_path / "x.csv")]) == 1
    assert main(["-c", str(config), "ecg", "to-dicom", path, str(tmp_path / "x.dcm")]) == 1
    err = capsys.readouterr().err
    assert err.count(message) == 2 and "Traceback" not in err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.dcm").exists()


def test_missing_input_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ecg", "decode", str(tmp_path / "nope.scp")]) == 1
    assert "cannot read" in capsys.readouterr().err


def _convert(source: Path, tmp_path: Path, config: Path) -> bytes:
    """The samples are the subject: --force, as some of these files name no patient (the gateway
    would hold them: tests/test_cli_to_dicom_holds.py)."""
    out = tmp_path / (source.name + ".dcm")
    assert main(["-c", str(config), "ecg", "to-dicom", str(source), str(out), "--force"]) == 0
    return out.read_bytes()


@pytest.mark.parametrize("where", GOOD_FILES, ids=[w[1] for w in GOOD_FILES])
def test_to_dicom_passes_dciodvfy_and_keeps_the_samples(where: tuple[str, str], tmp_path: Path, config: Path) -> None:
    source = shared_file("ecg", *where)
    data = _convert(source, tmp_path, config)
    assert dciodvfy_problems(data) == []
    original = decode_ecg(source.read_bytes(), source.name)
    back = read_dicom_ecg(data)
    assert back.lead_names == original.lead_names
    assert back.derived_leads == original.derived_leads  # carried by the "Derived Lead" codes
    np.testing.assert_array_equal(back.microvolts(), original.microvolts())


def test_to_dicom_of_pydicoms_mortara_ecg(tmp_path: Path, config: Path) -> None:
    data = _convert(Path(get_testdata_file("waveform_ecg.dcm")), tmp_path, config)
    assert dciodvfy_problems(data) == []  # the input itself has 3 errors; the output has none
    assert read_dicom_ecg(data).n_samples == 10000


def test_to_dicom_of_npz(tmp_path: Path, config: Path) -> None:
    from devices.ecg.npz import write_npz as writer

    recording = decode_ecg(shared_file("ecg", "scp", "ecgtoolkit_Example.scp").read_bytes())
    source = tmp_path / "recording.npz"
    source.write_bytes(writer(recording))
    data = _convert(source, tmp_path, config)
    assert dciodvfy_problems(data) == []
    np.testing.assert_array_equal(read_dicom_ecg(data).microvolts(), recording.microvolts())


# -- `lastmile ecg check` and `lastmile ecg preview` ------------------------------------------------


def test_check_json_is_the_documented_object(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["ecg", "check", "--json", str(shared_file("ecg", "contec", "0000037.ECG"))]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"verdict", "heart_rate_bpm", "problems"}
    assert out["verdict"] == "re-record"  # limb leads only, strong 50 Hz hum: the cart's own bad case
    kinds = {p["kind"] for p in out["problems"]}
    assert "mains-noise" in kinds
    for p in out["problems"]:
        assert set(p) == {"kind", "leads", "message_zh", "message_en"} and p["leads"] and p["message_zh"]


def test_check_text_says_what_to_do_in_chinese_and_english(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ecg", "check", str(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ecgtoolkit_Example.scp: acceptable (72 bpm")
    assert main(["ecg", "check", str(shared_file("ecg", "contec", "0000037.ECG"))]) == 0
    out = capsys.readouterr().out
    assert "re-record" in out and "电极" in out and "electrode" in out


def test_check_and_preview_refuse_an_undecodable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = shared_file("ecg", "aecg", "fda_empty.xml")
    assert main(["ecg", "check", str(empty)]) == 1
    assert main(["ecg", "preview", str(empty), str(tmp_path / "x.svg")]) == 1
    assert "no rhythm ECG" in capsys.readouterr().err
    assert not (tmp_path / "x.svg").exists()


def test_preview_writes_the_print_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import xml.etree.ElementTree as ET

    out = tmp_path / "preview.svg"
    assert main(["ecg", "preview", str(shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm")), str(out)]) == 0
    root = ET.fromstring(out.read_text(encoding="utf-8"))
    assert root.get("width") == "297mm" and root.get("height") == "210mm"  # A4 landscape, true scale
    text = out.read_text(encoding="utf-8")
    for lead in ("aVR", "V6"):
        assert f">{lead}<" in text or f">{lead} " in text
    assert f"({out.stat().st_size} bytes)" in capsys.readouterr().out
