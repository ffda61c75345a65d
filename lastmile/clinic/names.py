"""Patient and doctor names as DICOM Person Names: the ideographic group plus a pinyin group.

Many county PACS and viewers sort and search by the alphabetic component group, and some
cannot show Chinese at all: "张三" is sent as "Zhang^San=张^三" (alphabetic=ideographic). The
pinyin comes from pypinyin's single-character dictionary (its 2.5 MB phrase dictionary is not
loaded: a name is not a phrase, and the dictionary costs ~45 MB of RAM on a Pi); surnames
whose reading differs from the character's common one (单 Shan, 曾 Zeng, 解 Xie ...) come from
the table below, compound surnames (欧阳, 司马 ...) are recognised, and ü is written "yu"
(GB/T 28039-2011, for systems that cannot show ü).
"""

from __future__ import annotations

import os
import re
import unicodedata

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# compound surnames first: the family name is then two characters
_COMPOUND_SURNAMES = frozenset(
    [
        "欧阳",
        "司马",
        "诸葛",
        "上官",
        "东方",
        "皇甫",
        "尉迟",
        "公孙",
        "慕容",
        "长孙",
        "宇文",
        "司徒",
        "夏侯",
        "轩辕",
        "令狐",
        "端木",
        "独孤",
        "南宫",
        "西门",
        "呼延",
        "万俟",
        "澹台",
        "司空",
        "闻人",
    ]
)
# surnames read otherwise than the character's most common reading
_SURNAME_READINGS: dict[str, str] = {
    "单": "shan",
    "曾": "zeng",
    "解": "xie",
    "仇": "qiu",
    "朴": "piao",
    "区": "ou",
    "查": "zha",
    "乐": "yue",
    "盖": "ge",
    "缪": "miao",
    "翟": "zhai",
    "覃": "qin",
    "种": "chong",
    "繁": "po",
    "员": "yun",
    "召": "shao",
    "秘": "bi",
    "隗": "wei",
    "黑": "he",
    "能": "nai",
    "宓": "mi",
    "薄": "bo",
    "尉迟": "yuchi",
    "万俟": "moqi",
    "长孙": "zhangsun",
    "澹台": "tantai",
    "柏": "bai",
    "藏": "zang",
    "尉": "yu",
}


def has_ideographs(text: str) -> bool:
    return bool(_CJK.search(text))


def _pinyin(chars: str) -> str:
    # read once at pypinyin's import: a name needs only the single-character dictionary
    os.environ.setdefault("PYPINYIN_NO_PHRASES", "true")
    from pypinyin import lazy_pinyin

    syllables = lazy_pinyin(chars)  # characters without a reading (·, letters) are kept as they are
    return "".join(s.replace("ve", "yue").replace("v", "yu") for s in syllables)


def _romanise(part: str, *, surname: bool = False) -> str:
    if surname and part in _SURNAME_READINGS:
        return _SURNAME_READINGS[part].capitalize()
    if surname and len(part) > 1 and part[0] in _SURNAME_READINGS:
        return (_SURNAME_READINGS[part[0]] + _pinyin(part[1:])).capitalize()
    return _pinyin(part).capitalize()


def split_chinese_name(name: str) -> tuple[str, str]:
    """(family, given) of a name written without "^", e.g. "欧阳修" -> ("欧阳", "修")."""
    name = name.strip()
    cut = 2 if name[:2] in _COMPOUND_SURNAMES and len(name) > 2 else 1
    return name[:cut], name[cut:]


def dicom_person_name(name: str) -> str:
    """A name as a DICOM PN value with an alphabetic (pinyin) group when it is in Chinese.

    Already grouped values ("Zhang^San=张^三") and names without ideographs ("Clark^Ann")
    are returned unchanged; "张三" and "张^三" become "Zhang^San=张^三".
    """
    name = name.strip()
    if not name or "=" in name or not has_ideographs(name):
        return name
    components = name.split("^") if "^" in name else list(split_chinese_name(name))
    components = [c.strip() for c in components]
    alphabetic = [_romanise(c, surname=(i == 0)) if has_ideographs(c) else c for i, c in enumerate(components)]
    return "^".join(alphabetic).rstrip("^") + "=" + "^".join(components).rstrip("^")


def _ideographic_key(group: str) -> str:
    return "".join(group.replace("^", "").split())


def _alphabetic_key(group: str) -> str:
    # "ZHANG^SAN", "Zhang San", "zhang-san": one spelling; the accents of a toned pinyin dropped
    plain = unicodedata.normalize("NFKD", group.casefold())
    return "".join(ch for ch in plain if ch.isalnum() and not unicodedata.combining(ch))


def _name_keys(name: str) -> tuple[str, str]:
    """(ideographic, alphabetic) keys of a name as any path writes it: "张三", "张^三",
    "Zhang^San", "Zhang^San=张^三" (DICOM PN groups: alphabetic=ideographic=phonetic)."""
    groups = dicom_person_name(name).split("=")
    alphabetic = groups[0]
    ideographic = groups[1] if len(groups) > 1 else ""
    if not ideographic and has_ideographs(alphabetic):  # ideographs written in the first group
        alphabetic, ideographic = "", alphabetic
    if ideographic and not _alphabetic_key(alphabetic):
        alphabetic = dicom_person_name(ideographic).split("=")[0]
    return _ideographic_key(ideographic), _alphabetic_key(alphabetic)


def same_person_name(a: str, b: str) -> bool:
    """Whether two names are one person's name as the gateway compares names (the check-in's
    and a device file's, a name typed again): the same characters, or the same pinyin - "张三",
    "Zhang^San", "ZHANG SAN" and "Zhang^San=张^三" are one name, and so is a homophone (章三):
    what this catches is another person's name (the previous patient's, 李四), not a character
    the cart or the doctor typed otherwise. An empty name is nobody's: False (a caller for whom
    a missing name passes says so)."""
    if not a.strip() or not b.strip():
        return False
    a_chars, a_sound = _name_keys(a)
    b_chars, b_sound = _name_keys(b)
    return bool((a_chars and a_chars == b_chars) or (a_sound and a_sound == b_sound))
