"""The console's catalog: every page string extracted and translated, the committed .mo current,
and the language chosen as the issue says (user, then browser, then Chinese)."""

from __future__ import annotations

import ast
import datetime as dt
import gettext
import io
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from lastmile.console.i18n import LOCALE_DIR, Localizer, negotiate, translations

PO = LOCALE_DIR / "zh_CN" / "LC_MESSAGES" / "console.po"
MO = PO.with_suffix(".mo")
KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2), "N_": None}


def extracted_ids() -> set[str]:
    from babel.messages.extract import extract_from_dir

    root = Path(LOCALE_DIR).parents[2]
    method_map = [
        ("lastmile/console/**.py", "python"),
        ("lastmile/reports/report_text.py", "python"),
        ("lastmile/console/templates/**.html", "jinja2"),
    ]
    found = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
        str(root), method_map=method_map, keywords=KEYWORDS
    ):
        found.add(message[0] if isinstance(message, tuple) else message)
    return found


def catalog() -> object:
    from babel.messages.pofile import read_po

    with PO.open("rb") as f:
        return read_po(f)


def test_every_page_string_is_in_the_catalog_and_translated() -> None:
    ids = extracted_ids()
    assert len(ids) > 150  # the extraction saw the templates, not nothing
    cat = catalog()
    by_id = {(m.id[0] if isinstance(m.id, tuple) else m.id): m for m in cat if m.id}  # type: ignore[attr-defined]
    missing = sorted(ids - by_id.keys())
    assert not missing, f"run scripts/i18n.sh and translate: {missing[:10]}"
    untranslated = [k for k in ids if not by_id[k].string or "fuzzy" in by_id[k].flags]
    assert not untranslated, f"translate in {PO}: {untranslated[:10]}"


def test_the_committed_mo_is_the_compiled_po() -> None:
    from babel.messages.mofile import write_mo

    fresh = io.BytesIO()
    write_mo(fresh, catalog())  # type: ignore[arg-type]
    fresh.seek(0)
    compiled = gettext.GNUTranslations(fresh)
    with MO.open("rb") as f:
        committed = gettext.GNUTranslations(f)
    assert committed._catalog == compiled._catalog, "run scripts/i18n.sh compile and commit the .mo"


def test_placeholders_survive_translation() -> None:
    import re

    for message in catalog():  # type: ignore[attr-defined]
        if not message.id:
            continue
        source = message.id if isinstance(message.id, tuple) else (message.id,)
        target = message.string if isinstance(message.string, tuple) else (message.string,)
        wanted = set(re.findall(r"%\(\w+\)[sd]", source[0]))
        for text in target:
            assert set(re.findall(r"%\(\w+\)[sd]", text)) == wanted, message.id


@pytest.mark.parametrize(
    "header,expected",
    [
        ("zh-CN,zh;q=0.9,en;q=0.8", "zh-CN"),
        ("en-US,en;q=0.9", "en"),
        ("zh-TW", "zh-CN"),
        ("fr-FR, en;q=0.5", "en"),
        ("fr-FR", "zh-CN"),
        ("", "zh-CN"),
        (None, "zh-CN"),
        ("en;q=0.4, zh;q=0.8", "zh-CN"),
        ("zh;q=0, en", "en"),
    ],
)
def test_language_from_the_browser(header: str | None, expected: str) -> None:
    assert negotiate(header) == expected


def test_dates_and_numbers_in_the_clinics_locale_and_zone() -> None:
    now = dt.datetime(2026, 12, 1, 6, 5, tzinfo=dt.timezone.utc)
    shanghai = ZoneInfo("Asia/Shanghai")
    zh = Localizer("zh-CN", shanghai, now=lambda: now)
    en = Localizer("en", shanghai, now=lambda: now)
    assert zh.time(now) == "14:05" and en.time(now) == "2:05\u202fPM"
    yesterday = now - dt.timedelta(days=1)
    assert zh.when(yesterday) == "11月30日 14:05" and en.when(yesterday).startswith("Nov 30")
    assert zh.number(12345.6) == "12,346" and zh.number(37.2, 1) == "37.2"
    assert zh.full(now).endswith("+08:00") and "2026年12月1日" in zh.full(now)
    assert translations("zh-CN").gettext("Today") == "今天"
    assert zh.gettext("Heart rate %(rate)s /min", rate="61") == "心率 61 次/分"
    assert en.ngettext("%(n)d study waiting to be sent.", "%(n)d studies waiting to be sent.", 2) == (
        "2 studies waiting to be sent."
    )


def test_every_doctor_check_has_a_heading_in_chinese_on_the_system_page(tmp_path: Path) -> None:
    """A check added to `lastmile doctor` without a heading would show its bare English name to
    the village doctor."""
    from lastmile.console.app import CHECK_LABELS
    from lastmile.doctor import Doctor
    from tests.console_harness import console_config

    names = [name for name, _check, _network in Doctor(console_config(tmp_path / "data")).checks()]
    assert sorted(CHECK_LABELS) == sorted(names)
    zh = Localizer("zh-CN", ZoneInfo("Asia/Shanghai"))
    for label in CHECK_LABELS.values():
        shown = zh.gettext(label)
        assert shown != label and all("\u3400" <= ch <= "\u9fff" for ch in shown), (label, shown)


def test_every_doctor_check_says_in_chinese_what_its_warning_or_problem_means_and_what_to_do(
    tmp_path: Path,
) -> None:
    """The checks' own messages are technical English for the county's technician; without a
    Chinese line of advice the village doctor sees 'Problem' and nothing they can act on. The
    System page runs the doctor offline (console/views.py): a network check is only ever skipped
    there ("offline" advice); advice for its WARN or FAIL would be words no page shows."""
    from lastmile.console.app import CHECK_ADVICE, CHECK_LABELS, UNSURE_ADVICE, advice_for
    from lastmile.doctor import Doctor
    from tests.console_harness import console_config

    assert sorted(CHECK_ADVICE) == sorted(CHECK_LABELS)
    zh = Localizer("zh-CN", ZoneInfo("Asia/Shanghai"))
    for check, _run, network in Doctor(console_config(tmp_path / "data")).checks():
        if network:
            assert set(CHECK_ADVICE[check]) == {"offline"}, check
        for level, key in [("SKIP", "offline")] if network else [("WARN", ""), ("FAIL", "")]:
            advice = advice_for(check, level, key)
            assert advice != UNSURE_ADVICE, (check, level)
            shown = zh.gettext(advice)
            assert shown != advice and sum("\u4e00" <= ch <= "\u9fff" for ch in shown) >= 8, (check, level, shown)
    assert advice_for("commitment", "WARN") != advice_for("commitment", "FAIL")
    assert advice_for("config", "WARN") == advice_for("config", "FAIL")  # only FAIL is written
    assert advice_for("data", "WARN") != advice_for("data", "FAIL")
    assert zh.gettext(advice_for("no-such-check", "FAIL")) == "请告知县信息科。"


def test_the_system_page_tells_the_doctor_in_chinese_what_a_warning_means(tmp_path: Path) -> None:
    """With nothing serving the county's metrics (no lastmile-metrics here), the System page says
    in Chinese what that means and what to do, and keeps the technical message for the technician
    under a Chinese 'details' heading; a check that passed shows no advice."""
    import html

    from tests.console_harness import DOCTOR, Client, console_config, running_console

    config = console_config(tmp_path / "data")
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = html.unescape(client.get("/system").body)
    items = page.split("<li ")
    metrics = next(li for li in items if "<strong>县级监控</strong>" in li)
    assert 'class="finding warn"' in metrics, metrics
    assert '<span class="advice">县里暂时无法远程查看本网关：请告知县信息科。</span>' in metrics
    details = metrics[metrics.index("<details>") :]
    assert "<summary>技术人员查看的详细信息</summary>" in details and "nothing answers on" in details
    settings = next(li for li in items if "<strong>设置</strong>" in li)
    assert 'class="finding ok"' in settings and "advice" not in settings


def test_every_audited_action_has_a_chinese_name_on_the_system_page(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The System page's "who did what" shows an unnamed action as its code ("map-device-user") in
    any language: every action has a name in the table (lastmile.console.audit.ACTIONS), and each
    name there has its Chinese words. A code missing from it is still recorded (the action was
    done: `lastmile user add` said exit 2 over an added account when `record` refused it), shown
    bare, and logged as an error."""
    import logging

    from lastmile.clinic.db import open_clinic_db
    from lastmile.console.audit import ACTIONS, AuditLog

    zh = Localizer("zh-CN", ZoneInfo("Asia/Shanghai"))
    assert {"login", "assign-reading", "pair-device", "user-add"} <= set(ACTIONS)
    assert not [code for code, name in ACTIONS.items() if zh.gettext(name) == name]
    db = open_clinic_db(tmp_path)
    try:
        with caplog.at_level(logging.ERROR, logger="lastmile.console.audit"):
            AuditLog(db).record("doctor", "no-such-action", now=dt.datetime.now(dt.timezone.utc), target="P-1")
        assert [(e.user_name, e.action, e.target) for e in AuditLog(db).recent()] == [
            ("doctor", "no-such-action", "P-1")
        ]
    finally:
        db.conn.close()
    assert [r for r in caplog.records if r.levelno == logging.ERROR and "no-such-action" in r.getMessage()]


def _called_name(call: ast.Call) -> str | None:
    """The name a call calls (`f(...)`, `obj.f(...)`)."""
    if isinstance(call.func, ast.Name):
        return call.func.id
    return call.func.attr if isinstance(call.func, ast.Attribute) else None


def _is_audit_record(node: ast.AST) -> bool:
    """Whether `node` is a call `self.audit.record(user, code, ...)` or `AuditLog(...).record(...)`."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "record"):
        return False
    receiver = node.func.value
    is_audit = (isinstance(receiver, ast.Attribute) and receiver.attr == "audit") or (
        isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id == "AuditLog"
    )
    return is_audit and len(node.args) >= 2


def _audited_codes(tree: ast.Module) -> list[tuple[int, str | None]]:
    """The action codes `AuditLog.record` is called with in one module, by line: a literal, or a
    name the module assigns literals to (`done, code = ..., "user-unlock"`); None: a code no
    reader of the source can name (an f-string), so nobody can check it has a name."""
    assigned: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = (
                    zip(target.elts, node.value.elts)
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                    else [(target, node.value)]
                )
                for name, value in pairs:
                    if isinstance(name, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                        assigned.setdefault(name.id, set()).add(value.value)
    # A wrapper that records the code its caller gives (`_answer_audited(user, "assign-ecg", ...)`):
    # its callers' literals are the codes, at the position of its parameter.
    wrappers: dict[str, int] = {}
    passed_on: set[int] = set()
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef):
            continue
        params = [a.arg for a in func.args.args if a.arg not in ("self", "cls")]
        for call in ast.walk(func):
            if _is_audit_record(call) and isinstance(call.args[1], ast.Name) and call.args[1].id in params:
                wrappers[func.name] = params.index(call.args[1].id)
                passed_on.add(id(call))
    codes: list[tuple[int, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called_name(node) in wrappers:
            code = node.args[wrappers[_called_name(node)]]
            value = code.value if isinstance(code, ast.Constant) and isinstance(code.value, str) else None
            codes.append((node.lineno, value))
            continue
        if not _is_audit_record(node) or id(node) in passed_on:
            continue
        code = node.args[1]
        if isinstance(code, ast.Constant) and isinstance(code.value, str):
            codes.append((node.lineno, code.value))
        elif isinstance(code, ast.Name) and code.id in assigned:
            codes.extend((node.lineno, value) for value in sorted(assigned[code.id]))
        else:
            codes.append((node.lineno, None))
    return codes


def test_every_action_the_console_records_has_a_name_in_english_and_chinese() -> None:
    """An action code recorded somewhere in lastmile/ but missing from ACTIONS shows bare on the
    System page ("user-enable" among Chinese words) and only logs an error when it happens: every
    `AuditLog.record` call's code is read from the source here, so a missing name fails the suite."""
    from lastmile.console.audit import ACTIONS

    root = Path(LOCALE_DIR).parents[2] / "lastmile"
    recorded: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for line, code in _audited_codes(ast.parse(path.read_text(encoding="utf-8"))):
            recorded.setdefault(str(code), []).append(f"{path.relative_to(root.parent)}:{line}")
    assert "None" not in recorded, f"an audit code not written as a literal: {recorded.get('None')}"
    assert {"login", "check-in", "pair-device", "user-add", "user-enable"} <= set(recorded), recorded
    assert {code: where for code, where in recorded.items() if code not in ACTIONS} == {}
    zh = Localizer("zh-CN", ZoneInfo("Asia/Shanghai"))
    en = Localizer("en", ZoneInfo("Asia/Shanghai"))
    assert [c for c in recorded if not en.gettext(ACTIONS[c]) or zh.gettext(ACTIONS[c]) == ACTIONS[c]] == []


def test_a_patients_check_in_is_one_word_in_each_language() -> None:
    """The same thing, the patient's visit from check-in to its end, was 检查 (an examination, the
    word of a study sent to the county) in most strings and 就诊 in others, and "session" beside
    "check-in" in English; measurements were 检查 too. Now: the check-in is 就诊 (登记: checking in),
    "check-in" in English; a measurement is 测量; 检查 is left to studies and to checking."""
    cat = catalog()
    pairs = [
        ((m.id[0] if isinstance(m.id, tuple) else m.id), (m.string[0] if isinstance(m.string, tuple) else m.string))
        for m in cat  # type: ignore[attr-defined]
        if m.id
    ]
    visit = [(i, s) for i, s in pairs if "check-in" in i or "checked in" in i]
    assert len(visit) > 10, visit  # the check-in's strings were found
    assert [i for i, s in visit if "检查" in s.replace("检查原因", "")] == []  # the reason is the ECG's: 检查原因
    assert [i for i in (i for i, _ in pairs) if "session" in i.lower()] == []
    assert [i for i, s in pairs if "measurement" in i and "检查" in s] == []
