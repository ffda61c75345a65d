"""One rule for "is this the same person's name" (`lastmile.clinic.names.same_person_name`): by
name groups and pinyin, so 张三, Zhang^San and Zhang^San=张^三 are one name and a homophone in other
characters (章三) is not; the check-in's "same name" question and the two-names refusal of `patient assign` /
`map-user --name` (`PatientContext.given_name`) use it, as the ECG name check does."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from devices.identity import Patient
from lastmile.clinic.names import same_person_name
from lastmile.clinic.patients import NameConflict, PatientContext


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("Zhang^San", "张^三", True),
        ("Zhang^San=张^三", "张三", True),
        ("ZHANG SAN", "Zhang^San=张^三", True),
        ("Zhāng Sān", "张三", True),  # a toned pinyin
        ("章三", "张三", False),  # read alike, written otherwise: the doctor says which is his
        ("Ouyang^Xiu", "欧阳修", True),
        ("Li^Si=李^四", "Zhang^San=张^三", False),
        ("李四", "张三", False),
        ("Clark", "张三", False),
        ("", "张三", False),  # no name is nobody's
    ],
)
def test_names_are_one_persons_by_their_characters_or_their_pinyin(a: str, b: str, same: bool) -> None:
    assert same_person_name(a, b) is same and same_person_name(b, a) is same


def test_a_name_typed_in_pinyin_for_a_patient_checked_in_in_characters_is_his_not_a_conflict(tmp_path: Path) -> None:
    """`patient assign` / `map-user --name` compared the typed name with the check-in's as raw
    strings: MZ-1 checked in as 张三 (Zhang^San=张^三), the doctor types Zhang^San, and was told
    these are two names. 李四 still is another name."""
    context = PatientContext.open(tmp_path, 900)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        context.set_patient("MZ-1", "Zhang^San=张^三", now=now)
        assert context.given_name(Patient("MZ-1", "Zhang^San"), now).name == "Zhang^San"
        assert context.given_name(Patient("MZ-1", "ZHANG SAN"), now).patient_id == "MZ-1"
        with pytest.raises(NameConflict):
            context.given_name(Patient("MZ-1", "Li^Si=李^四"), now)
    finally:
        context.close()
