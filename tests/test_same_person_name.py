"""One rule for "is this the same person's name" (`lastmile.clinic.names.same_person_name`): by
name groups and pinyin, so 张三, Zhang^San and Zhang^San=张^三 are one name and a homophone in other
characters (章三) is not; the check-in's "same name" question and the two-names refusal of `patient assign` /
`map-user --name` (`PatientContext.given_name`) use it, as the ECG name check does."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
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
        ("Lu^Ming", "吕明", True),  # ü written u, as on forms and IDs before GB/T 28039
        ("Lyu^Ming", "卢明", False),  # but a u is no ü: 卢 is Lu only
    ],
)
def test_names_are_one_persons_by_their_characters_or_their_pinyin(a: str, b: str, same: bool) -> None:
    assert same_person_name(a, b) is same and same_person_name(b, a) is same


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("ZHANG^YUE", "张乐", True),  # sent as Zhang^Le: 乐 is le and yue
        ("ZHANG YUE", "Zhang^Le=张^乐", True),  # the check-in as stored, its pinyin group the one sent
        ("Zhang^Le", "张乐", True),
        ("LI ZHANG QING", "李长青", True),  # 长 chang/zhang
        ("Li Chang Qing", "李长青", True),
        ("WANG HANG", "王行", True),  # 行 xing/hang
        ("ZHAO ZHAO YANG", "赵朝阳", True),  # 朝 chao/zhao
        ("LU^LE", "吕乐", True),  # ü as u and another reading in one name
        ("LYU YUE", "吕乐", True),
        ("ZHANG^SHAN", "张乐", False),  # a reading of none of its characters: another name
        ("Zhang^Yao", "张乐", False),  # 乐 is not yao
        ("YUE^LE", "乐乐", True),  # a surname's reading (乐 Yue) as any other
    ],
)
def test_a_name_in_pinyin_is_his_by_any_reading_of_his_names_characters(a: str, b: str, same: bool) -> None:
    """A cart without an input method writes its own reading of a name: a character read more than
    one way (乐, 长, 行, 朝) was compared with its common reading only, and 吕 written LU (as before
    GB/T 28039) with Lyu only: the doctor's ECG was held for another person's name."""
    assert same_person_name(a, b) is same and same_person_name(b, a) is same


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("San Zhang", "张三"),  # Western order: held, the doctor answers
        ("SAN ZHANG", "Zhang^San=张^三"),
        ("Xiaoming Wang", "王小明"),
        ("Xiu Ouyang", "欧阳修"),
        ("Yue Zhang", "张乐"),
        ("San Zhang", "Zhang San"),
        ("San^Zhang", "张三"),
        ("Wang Li", "李旺"),  # 王丽 as written, never 李旺
        ("Qian Li", "李倩"),  # 钱 is a family name too: swapped, another patient's ECG would pass
        ("Hao Li", "李浩"),
        ("Wen Li", "李文"),
        ("Qian Zhao", "赵倩"),
        ("Wei Zhang", "张伟"),
        ("Qing Zhang Li", "李长青"),
        ("Si Li", "张三"),
        ("三张", "张三"),
    ],
)
def test_a_pinyin_name_in_the_other_order_is_another_name(a: str, b: str) -> None:
    """A name in letters is read in its written order only. Read in either order (s43-D), a two-part
    name passed for the swapped one whenever its first part was not on a list of common family
    names: "Qian Li" for 李倩, "Hao Li" for 李浩 (钱 and 郝 are family names): a previous patient's
    ECG left on the cart went under the checked-in ID. Held, the doctor answers whose it is."""
    assert not same_person_name(a, b) and not same_person_name(b, a)


def test_a_pinyin_name_in_the_written_order_is_his() -> None:
    assert same_person_name("Wang Li", "王丽") and same_person_name("Zhang San", "张叁")


def test_only_a_name_of_a_usual_length_with_few_readings_is_read_every_way() -> None:
    """Every reading accepted is one more pinyin that passes for his: a name longer than four
    characters, or with more than 64 readings, is read only as it is sent (a file naming it
    otherwise is held for the doctor to answer, never passed)."""
    assert same_person_name("ZHANG YUE", "张乐")
    assert same_person_name("Zhang^Le^Le^Le^Le", "张乐乐乐乐")  # as sent
    assert not same_person_name("Zhang^Le^Le^Le^Yue", "张乐乐乐乐")  # five characters
    assert same_person_name("Xing^Xing^Chao^Dan", "行行朝单")  # as sent
    assert not same_person_name("Hang^Hang^Zhao^Shan", "行行朝单")  # 3 x 3 x 3 x 3 readings


def test_reading_a_name_every_way_loads_no_phrase_dictionary() -> None:
    """pypinyin's phrase dictionary costs ~45 MB of RAM on a Pi; a name needs the single-character
    one, which holds every reading of a character."""
    probe = (
        "from lastmile.clinic.names import same_person_name\n"
        "assert same_person_name('ZHANG YUE', '张乐')\n"
        "import pypinyin.constants\n"
        "assert not pypinyin.constants.PHRASES_DICT, len(pypinyin.constants.PHRASES_DICT)\n"
    )
    subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYPINYIN")},
    )


def test_a_cart_writing_his_name_in_another_reading_names_him_and_keeps_his_characters(tmp_path: Path) -> None:
    """MZ-1 checked in as 张乐; `map-user --name ZHANG^YUE` (the cart's reading) was refused as
    another name: it is his, and his name stays the check-in's, in characters."""
    context = PatientContext.open(tmp_path, 900)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        context.set_patient("MZ-1", "张乐", now=now)
        given = context.given_name(Patient("MZ-1", "ZHANG^YUE"), now)
        assert given.patient_id == "MZ-1" and given.name == "张乐"
    finally:
        context.close()


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
