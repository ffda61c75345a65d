"""Patient and doctor names as DICOM Person Names: the ideographic group plus a pinyin group.

Many county PACS and viewers sort and search by the alphabetic component group, and some
cannot show Chinese at all: "张三" is sent as "Zhang^San=张^三" (alphabetic=ideographic). The
pinyin comes from pypinyin's single-character dictionary (its 2.5 MB phrase dictionary is not
loaded: a name is not a phrase, and the dictionary costs ~45 MB of RAM on a Pi); surnames
whose reading differs from the character's common one (单 Shan, 曾 Zeng, 解 Xie ...) come from
the table below, compound surnames (欧阳, 司马 ...) are recognised, and ü is written "yu"
(GB/T 28039-2011, for systems that cannot show ü). A name in pinyin only is compared with every
reading of the characters (that same dictionary's heteronyms: 乐 le/yue, 长 chang/zhang), not only
with the one sent.
"""

from __future__ import annotations

import itertools
import math
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


# what carts and HIS exports write in a name field when they have none (compared casefolded,
# without "^", "=", spaces, "-", "_" and "."): "UNKNOWN^^^^", "Anonymous", "未知"
_PLACEHOLDER_NAMES = frozenset(
    [
        "unknown",
        "unknownpatient",
        "anonymous",
        "anonymouspatient",
        "anon",
        "none",
        "null",
        "n/a",
        "未知",
        "匿名",
        "无名氏",
    ]
)
_NOT_IN_A_PLACEHOLDER = re.compile(r"[\s^=\-_.]+")
# a pinyin keyboard's ü: v after l or n (lv, nve), see `_pinyin_key`
_KEYBOARD_U_UMLAUT = re.compile(r"(?<=[ln])v")
# a name's readings are its characters' readings multiplied: every reading accepted is one more
# pinyin that passes for his, so only a name of a usual length with few readings is read every
# way; a longer one (a transliteration: 阿不都热合曼) is read the one way it is sent, and a
# file naming it otherwise is held (the doctor answers), never passed
_MOST_CHARACTERS_READ_EVERY_WAY = 4
_MOST_READINGS = 64


def has_ideographs(text: str) -> bool:
    return bool(_CJK.search(text))


def no_name(name: str) -> bool:
    """A name field that names nobody: empty, a placeholder ("UNKNOWN", "ANONYMOUS", "未知"), or
    with neither a letter nor a Chinese character ("^^^^", "-", "  ", "0"). A cart left without a
    patient's name writes such a thing: it is no one's name, neither the check-in's nor another's,
    and it is never shown as one."""
    if not any(ch.isalpha() for ch in name):  # letters and Chinese characters are both alphabetic
        return True
    return _NOT_IN_A_PLACEHOLDER.sub("", unicodedata.normalize("NFKC", name).casefold()) in _PLACEHOLDER_NAMES


def _load_single_character_dictionary_only() -> None:
    # read once at pypinyin's import: a name needs only the single-character dictionary
    os.environ.setdefault("PYPINYIN_NO_PHRASES", "true")


def _pinyin(chars: str) -> str:
    _load_single_character_dictionary_only()
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


def same_person_name(a: str, b: str) -> bool:
    """Whether two names given for one patient ID are one name (the check-in's and a device file's,
    a mapping's, a name typed again): the same characters however grouped (张三, 张^三,
    Zhang^San=张^三), or one written in pinyin only and the other's reading (Zhang San, ZHANG^SAN,
    Zhāng Sān for 张三: a cart or keyboard without an input method; any reading of each character: Zhang
    Yue for 张乐 (Zhang^Le), Lu or Lyu for 吕, as written where ü cannot be). A name in letters is
    read in its written order only: "San Zhang" is not 张三 (held: the doctor answers), as a swap
    would let "Qian Li" pass for 李倩 and "Wang Li" for 李旺, another patient's ECG left on the
    cart going under the checked-in ID. Two names in characters that
    differ are two names, even read alike (张三, 张叁: the county would get one or the other, and
    only the doctor knows which is his). An empty name is nobody's: False (a caller for whom a
    missing name passes says so)."""
    if not a.strip() or not b.strip():
        return False
    (a_chars, a_readings), (b_chars, b_readings) = _name_forms(a), _name_forms(b)
    if a_chars and b_chars:
        return a_chars == b_chars
    # one in characters: the pinyin is one of its readings, or not his
    return not a_readings.isdisjoint(b_readings)


def _name_forms(name: str) -> tuple[str, frozenset[str]]:
    """(its characters, its pinyin keys) of a name, without the PN's "^" and the spaces between its
    parts: "Zhang^San=张^三" -> ("张三", {"zhangsan"}); "Zhang San" -> ("", {"zhangsan"}); "张乐" ->
    ("张乐", {"zhangle", "zhangyue"}) (its readings). A name's own pinyin group is one of its keys: a
    HIS may read it otherwise than the dictionary does."""
    groups = dicom_person_name(name).split("=")
    chars = "".join(next((g for g in groups if has_ideographs(g)), "").replace("^", "").split())
    letters = next((g for g in groups if g and not has_ideographs(g)), "")
    keys = {_pinyin_key(letters)} | (_readings(chars) if chars else set())
    return chars, frozenset(key for key in keys if key)


def _readings(chars: str) -> set[str]:
    """The pinyin keys of a name in characters besides the one it is sent with (its pinyin group,
    with its surname's reading: 单 Shan): for a name of at most `_MOST_CHARACTERS_READ_EVERY_WAY`
    characters with at most `_MOST_READINGS` readings, any reading of each character (乐 le/yue,
    行 xing/hang), ü as yu and as u (吕 Lyu, Lu: before GB/T 28039 ü was mostly written u); none
    for a longer name."""
    if len(chars) > _MOST_CHARACTERS_READ_EVERY_WAY:
        return set()
    each_character = [_character_readings(ch) for ch in chars]
    if math.prod(len(r) for r in each_character) > _MOST_READINGS:
        return set()
    return {"".join(spelling) for spelling in itertools.product(*each_character)}


def _character_readings(ch: str) -> set[str]:
    if not has_ideographs(ch):
        return {_pinyin_key(ch)}  # a letter or "·" in the characters group: itself
    _load_single_character_dictionary_only()
    from pypinyin import Style, pinyin

    readings = pinyin(ch, style=Style.NORMAL, heteronym=True)[0]  # ü as v: lv, nve
    return {_pinyin_key(r) for r in readings} | {_pinyin_key(r.replace("v", "u")) for r in readings}


def _pinyin_key(group: str) -> str:
    """One spelling of a name in letters: "ZHANG^SAN", "Zhang San", "zhang-san", "Zhāng Sān" ->
    "zhangsan"; ü (lü, lǚ) as yu, as typed on a keyboard without it, and v after l or n (LV, NV,
    LVE: the pinyin keyboard's ü) too: 吕 typed LV is Lyu. Only there: pinyin has no v of its own,
    and l/n are the only initials before which ü is written as ü (ju, qu, xu, yu spell it u)."""
    plain = unicodedata.normalize("NFKD", group.casefold()).replace("u\u0308", "yu")
    letters = "".join(ch for ch in plain if ch.isalnum() and not unicodedata.combining(ch))
    return _KEYBOARD_U_UMLAUT.sub("yu", letters)
