"""Patient identity at the gateway: China's resident identity number (GB 11643-1999), checked
wherever an ID enters (CLI, card scanner, ECG files), and names with their pinyin group."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.identity import (
    InvalidPatientIdError,
    Patient,
    normalise_resident_id,
    parse_resident_id,
    resident_id_check_char,
)
from devices.scanner import CodeUnrecognised, PatientScanned, ScannerDecoder, ScanRules
from lastmile.cli import main as cli
from lastmile.clinic.names import dicom_person_name
from lastmile.config import Config, parse_config
from lastmile.ecg.intake import PATIENT_ID_REFUSED, clinic_patient, vetted_patient
from tests.ecg_factories import make_recording

SAMPLE = "11010519491231002X"  # the standard's own example: Beijing, born 1949-12-31, female


def iso7064_mod11_2(digits: str) -> str:
    """ISO 7064 MOD 11-2, the pure system GB 11643 names, written from the standard's recursive
    form (not the weighted sum the gateway uses): P = ((P + a) * 2) mod 11 over the digits; the
    check character C makes (P + C) mod 11 == 1; C = 10 is written X."""
    p = 0
    for ch in digits:
        p = ((p + int(ch)) * 2) % 11
    c = (12 - p) % 11
    assert (p + c) % 11 == 1
    return "X" if c == 10 else str(c)


@given(st.text(alphabet="0123456789", min_size=17, max_size=17))
def test_check_digit_equals_an_independent_iso7064_implementation(first17: str) -> None:
    assert resident_id_check_char(first17) == iso7064_mod11_2(first17)


@given(st.integers(0, 16), st.integers(1, 9))
def test_every_single_digit_error_is_caught(position: int, delta: int) -> None:
    number = list(SAMPLE)
    number[position] = str((int(number[position]) + delta) % 10)
    with pytest.raises(InvalidPatientIdError):
        parse_resident_id("".join(number))


def test_known_number_its_birth_date_and_sex() -> None:
    resident = parse_resident_id(SAMPLE)
    assert resident == parse_resident_id(" 1101 0519 4912 3100 2x ")  # spaces, lower-case x
    assert resident.birth_date == dt.date(1949, 12, 31) and resident.sex == "F"
    male = "11010519491231001" + resident_id_check_char("11010519491231001")
    assert parse_resident_id(male).sex == "M"
    assert normalise_resident_id("１１０１０５１９４９１２３１００２ｘ") == SAMPLE  # full-width digits


@pytest.mark.parametrize(
    "bad, says",
    [
        ("110105194912310020", "校验位"),
        ("1101051949123100", "18"),
        ("11010519491332002" + "X", "出生日期"),
    ],
)
def test_wrong_ids_are_refused_in_chinese_and_english(bad: str, says: str) -> None:
    if says == "出生日期":  # a valid check digit on an impossible date
        bad = bad[:17] + resident_id_check_char(bad[:17])
    with pytest.raises(InvalidPatientIdError) as info:
        parse_resident_id(bad)
    message = str(info.value)
    assert says in message and " / " in message and bad not in message  # bilingual, never the number


def _resident_config(tmp_path: Path) -> Path:
    path = tmp_path / "lastmile.toml"
    path.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[patient]\nid_kind = "cn-resident-id"\n'
        'id_issuer = "Anytown county register"\n'
    )
    return path


def test_cli_patient_set_refuses_a_wrong_check_digit_and_keeps_a_good_one(tmp_path: Path, capsys) -> None:
    config = _resident_config(tmp_path)
    assert cli(["-c", str(config), "patient", "set", "110105194912310020", "--name", "张三"]) == 2
    err = capsys.readouterr().err
    assert "校验位错误" in err and "wrong check digit" in err
    assert cli(["-c", str(config), "patient", "show", "--json"]) == 0
    assert '"current_patient": null' in capsys.readouterr().out
    assert (
        cli(
            [
                "-c",
                str(config),
                "patient",
                "set",
                "1101 0519 4912 3100 2x",
                "--name",
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
    out = capsys.readouterr().out
    assert SAMPLE in out and "Zhang^San=张^三" in out and "1949-12-31 F" in out and "STAT" in out


def test_config_takes_exactly_the_documented_kinds() -> None:
    assert parse_config('[patient]\nid_kind = "cn-resident-id"\n').patient.id_kind == "cn-resident-id"
    with pytest.raises(Exception, match="id_kind"):
        parse_config('[patient]\nid_kind = "resident"\n')


def test_scanner_refuses_a_card_with_a_wrong_check_digit() -> None:
    rules = ScanRules.from_patterns(r"ID:(?P<id>[0-9Xx ]{18,22})", r"DR:(?P<id>\w+)", "cn-resident-id")
    events = ScannerDecoder(rules).feed(b"ID:11010519491231002x\r\nID:110105194912310020\r\n")
    assert events[0] == PatientScanned(SAMPLE)
    assert isinstance(events[1], CodeUnrecognised) and "check digit" in events[1].reason


def test_files_patient_ids_are_vetted() -> None:
    config = Config()
    config.patient.id_kind = "cn-resident-id"
    config.patient.id_issuer = "county"
    good = make_recording(1, patient=Patient(SAMPLE.lower(), "张三"))
    vetted = vetted_patient(good, config).patient
    assert vetted == Patient(SAMPLE, "Zhang^San=张^三", dt.date(1949, 12, 31), "F", "county")
    conflict = vetted_patient(make_recording(1, patient=Patient(SAMPLE, "", dt.date(1950, 1, 1), "M")), config)
    assert {"patient-id-conflict:birth-date", "patient-id-conflict:sex"} <= set(conflict.flags)
    assert conflict.patient is not None and conflict.patient.birth_date == dt.date(1950, 1, 1)  # the file's, flagged
    refused = vetted_patient(make_recording(1, patient=Patient("110105194912310020")), config)
    assert refused.patient is None and PATIENT_ID_REFUSED in refused.flags  # held for the doctor, never guessed
    mrn = dataclasses.replace(config.patient, id_kind="clinic-mrn")
    assert vetted_patient(good, dataclasses.replace(config, patient=mrn)).patient.patient_id == SAMPLE.lower()


def test_clinic_patient_from_cli_or_console() -> None:
    config = Config()
    config.patient.id_kind = "cn-resident-id"
    assert clinic_patient(" 11010519491231002x", "欧阳修", config).name == "Ouyang^Xiu=欧阳^修"
    with pytest.raises(InvalidPatientIdError):
        clinic_patient("110105194912310021", "", config)
    assert clinic_patient("MRN 0042", "", Config()).patient_id == "MRN 0042"  # any ID when no kind is set


@pytest.mark.parametrize(
    "name, pn",
    [
        ("张三", "Zhang^San=张^三"),
        ("张^三", "Zhang^San=张^三"),
        ("欧阳修", "Ouyang^Xiu=欧阳^修"),
        ("单雄信", "Shan^Xiongxin=单^雄信"),
        ("曾国藩", "Zeng^Guofan=曾^国藩"),
        ("吕小明", "Lyu^Xiaoming=吕^小明"),
        ("Clark^Ann", "Clark^Ann"),
        ("Zhang^San=张^三", "Zhang^San=张^三"),
        ("", ""),
    ],
)
def test_names_get_their_pinyin_group(name: str, pn: str) -> None:
    assert dicom_person_name(name) == pn


def test_with_any_kind_of_id_a_resident_id_is_one_patient_on_every_path(tmp_path: Path, capsys) -> None:
    # [patient] id_kind = "" (the default): the console files "1101 0519 4912 3100 2x" as
    # 11010519491231002X and refuses a misread one. The CLI, the card scanner and the cart's ECG
    # file must do the same, or one person becomes two patients (a STAT check-in on the console
    # misses the cart's ECG, which is held as "another patient"), and a misread card a patient.
    from lastmile.clinic.patients import StatSession
    from lastmile.console.sources import patient_identifier
    from lastmile.ecg.intake import PATIENT_MISMATCH, with_patient_check

    config = Config()
    typed = "1101 0519 4912 3100 2x"
    assert patient_identifier(typed, config) == SAMPLE
    assert clinic_patient(typed, "", config).patient_id == SAMPLE
    with pytest.raises(InvalidPatientIdError):
        clinic_patient("110105194912310020", "", config)
    assert clinic_patient("MRN 0042", "", config).patient_id == "MRN 0042"  # any other ID as it is
    path = tmp_path / "lastmile.toml"
    path.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n')
    assert cli(["-c", str(path), "patient", "set", "110105194912310020"]) == 2
    assert cli(["-c", str(path), "patient", "set", "11010519491231002x", "--stat"]) == 0
    capsys.readouterr()
    assert cli(["-c", str(path), "patient", "show", "--json"]) == 0
    assert f'"patient_id": "{SAMPLE}"' in capsys.readouterr().out
    rules = ScanRules.from_patterns(r"SFZ(?P<id>[0-9Xx ]+)", "")
    assert rules.classify("SFZ11010519491231002x") == PatientScanned(SAMPLE)
    assert isinstance(rules.classify("SFZ110105194912310020"), CodeUnrecognised)
    from_cart = vetted_patient(make_recording(1, patient=Patient(SAMPLE.lower())), config)
    assert from_cart.patient is not None and from_cart.patient.patient_id == SAMPLE
    assert PATIENT_MISMATCH not in with_patient_check(from_cart, frozenset({SAMPLE})).flags
    assert StatSession(SAMPLE, from_cart.acquired_at).covers(from_cart.patient.patient_id, from_cart.acquired_at)
    misread = vetted_patient(make_recording(1, patient=Patient("110105194912310020")), config)
    assert misread.patient is None and PATIENT_ID_REFUSED in misread.flags
