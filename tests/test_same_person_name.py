"""One rule for "is this the same person's name" (`lastmile.clinic.names.same_person_name`): by
name groups and pinyin, so 张三, Zhang^San and Zhang^San=张^三 are one name and a homophone in other
characters (章三) is not; the check-in's "same name" question and the two-names refusal of `patient assign` /
`map-user --name` (`PatientContext.given_name`) use it, as the ECG name check does."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from devices.identity import Patient
from lastmile.clinic.names import no_name, same_person_name
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
        ("LV^Ming", "吕明", True),  # a pinyin keyboard's v for ü: 吕 is Lyu (GB/T 28039), typed LV
        ("Lü Ming", "吕明", True),
        ("NVE^Hong", "虐红", True),
        ("Lu^Ming", "吕明", False),  # 卢, 鲁, 陆 ...: u is not ü
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
        # his name as checked in, characters and all: not the pinyin typed alone
        assert context.given_name(Patient("MZ-1", "Zhang^San"), now).name == "Zhang^San=张^三"
        assert context.given_name(Patient("MZ-1", "ZHANG SAN"), now).patient_id == "MZ-1"
        with pytest.raises(NameConflict):
            context.given_name(Patient("MZ-1", "Li^Si=李^四"), now)
    finally:
        context.close()


@pytest.mark.parametrize(
    ("name", "none"),
    [
        ("^^^^", True),
        ("-", True),
        ("UNKNOWN", True),
        ("Unknown^^^", True),
        ("ANONYMOUS", True),
        ("   ", True),
        ("N/A", True),
        ("未知", True),
        ("Clark", False),
        ("张三", False),
        ("Li^Na", False),
    ],
)
def test_a_carts_empty_or_placeholder_name_is_no_name(name: str, none: bool) -> None:
    assert no_name(name) is none


def test_the_check_ins_name_is_not_corrected_to_a_placeholder(tmp_path: Path) -> None:
    """ "Its name is right" on an ECG whose cart wrote "^^^^" renamed the check-in (and his cuff's
    users) to "^^^^": a name that names nobody is refused, the check-in's kept."""
    context = PatientContext.open(tmp_path, 900)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        context.set_patient("MZ-1", "张三", now=now)
        for placeholder in ("^^^^", "UNKNOWN", "-"):
            with pytest.raises(ValueError, match="is no name"):
                context.correct_name("MZ-1", placeholder, now=now)
        assert context.known_name("MZ-1", now) == "张三"
    finally:
        context.close()
