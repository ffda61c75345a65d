"""A returned report's whole text in the reader's language (issue 15): the gateway's own words
around the report come from the console's catalog (zh-CN first, English second); the county's
words (titles, concept names, values, Chinese or not) are printed exactly as written; a report
stored before lines were kept still shows its English text after the store's migration."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from lastmile.clinic.db import DB_NAME, MIGRATIONS
from lastmile.clock import local_zone
from lastmile.console.i18n import Localizer
from lastmile.demo.cardiologist import STEMI, DemoCardiologist, StudyToRead, ecg_report_sr, part10, report_pdf
from lastmile.reports.report_text import (
    English,
    Speaker,
    concept_name,
    display_name,
    page_text,
    readable_time,
    report_text,
    shown_critical,
    shown_reasons,
    shown_text,
)
from lastmile.reports.store import ReportStore, SentStudy
from lastmile.reports.views import printable, render_list, render_report, speaker_for, study_lines
from tests.report_peers import critical_observation
from tests.report_samples import RULES, STUDY, everything_sr
from uploader.report_lines import PERSON_NAME, LineKind, ReportLine, split_concept
from uploader.report_reading import ReportContent, read_dicom_report, read_fhir_report
from uploader.sqlite_store import open_database

ZH = Localizer("zh-CN", ZoneInfo("Asia/Shanghai"))
EN = Localizer("en", ZoneInfo("Asia/Shanghai"))
ENGLISH = English()  # the stored text's words
# the clinic zone's offset, which a report's time written without one is shown with
CLINIC_OFFSET = dt.datetime(2026, 12, 1, 10, 15, tzinfo=local_zone()).isoformat()[-6:]
# what may stay Latin in the Chinese text besides the county's words: a file type and its size
LATIN_IN_CHINESE = ("PDF", "KB", "ST")  # ST: the ECG's segment, so named in Chinese too


def fhir_everything() -> dict:
    pdf = report_pdf(STUDY, ["ECG report"], reader="Chen^Jing")
    return {
        "resourceType": "DiagnosticReport",
        "id": "r1",
        "meta": {"versionId": "2"},
        "status": "corrected",
        "code": {"text": "心电图报告"},
        "conclusion": "窦性心律。Critical Result: 室性心动过速",
        "conclusionCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "401303003", "display": "STEMI"}]}],
        "contained": [critical_observation("o1", "ST 段", "抬高")],
        "result": [{"reference": "#o1"}],
        "presentedForm": [
            {"contentType": "text/plain", "data": base64.b64encode("全文：窦性心律".encode()).decode()},
            {"contentType": "application/pdf", "data": base64.b64encode(pdf.EncapsulatedDocument).decode()},
        ],
        "resultsInterpreter": [{"display": "陈静"}],
        "issued": "2026-12-01T10:15:00+08:00",
    }


def the_reports() -> dict[str, tuple[ReportLine, ...]]:
    sr = read_dicom_report(part10(everything_sr()), RULES)
    pdf = read_dicom_report(part10(report_pdf(STUDY, ["ECG report"], reader="Chen^Jing")), RULES)
    fhir = read_fhir_report(fhir_everything(), RULES)
    unreadable = (ReportLine(LineKind.UNREADABLE), ReportLine(LineKind.PROBLEM, value="not a DICOM object"))
    mismatch = (*pdf.lines, ReportLine(LineKind.CHECK_PATIENT, name="P999", value="P0077"))
    return {"sr": sr.lines, "pdf": pdf.lines, "fhir": fhir.lines, "unreadable": unreadable, "mismatch": mismatch}


def shown_name(line: ReportLine, speaker: Speaker = ENGLISH) -> str:
    """A line's name as the text shows it: the reading doctor's as people write a name (李明), a
    concept the gateway knows by its code in the reader's language (Findings → 所见)."""
    if line.kind == LineKind.READ_BY:
        return display_name(line.name)
    if line.kind == LineKind.CRITICAL_CODE and not line.value:  # a coded concept: known by its critical code
        return concept_name(line.name, split_concept(line.code), speaker)
    return concept_name(line.name, line.concept, speaker) if line.name else ""


def shown_value(line: ReportLine, speaker: Speaker = ENGLISH) -> str:
    """A line's value as the text shows it: the report's time only spaced for reading, a person's
    name (a PNAME item) as people write it, a title or a coded value the gateway knows by its
    code in the reader's language (a critical finding: by its critical code)."""
    if line.kind == LineKind.READ_BY:
        return readable_time(line.value, speaker.zone)
    if line.kind == LineKind.TITLE:
        return concept_name(line.value, line.concept, speaker)
    if line.kind == LineKind.CRITICAL_CODE and line.value:  # a coded value (a coded concept: its name)
        return concept_name(line.value, split_concept(line.code), speaker)
    return (
        display_name(line.value) if line.code == PERSON_NAME else concept_name(line.value, line.value_concept, speaker)
    )


def county_words(lines: tuple[ReportLine, ...]) -> list[str]:
    """Everything in the lines that the county (or DICOM, or the gateway's technical record) wrote."""
    return [w for line in lines for w in (shown_name(line), shown_value(line), line.code) if w]


@pytest.mark.parametrize("name", ["sr", "pdf", "fhir", "unreadable", "mismatch"])
def test_every_gateway_word_is_chinese_and_the_countys_words_are_as_written(name: str) -> None:
    lines = the_reports()[name]
    zh, en = report_text(lines, ZH), report_text(lines, EN)
    assert zh != en
    for text, speaker in ((zh, ZH), (en, EN)):  # the county's words, verbatim, in both languages
        for line in lines:  # (but for the concepts the gateway knows by their code)
            if line.kind != LineKind.DOCUMENT:  # its MIME type is worded ("PDF document")
                assert shown_name(line, speaker) in text and shown_value(line, speaker) in text, (line, text)
    leftover = zh
    for word in sorted(county_words(lines) + list(LATIN_IN_CHINESE), key=len, reverse=True):
        leftover = leftover.replace(word, " ")
    assert not re.findall(r"[A-Za-z]{2,}", leftover), f"English left in the Chinese text:\n{zh}"


def test_the_chinese_sr_reads_as_a_village_doctor_expects() -> None:
    lines = the_reports()["sr"]
    zh = report_text(lines, ZH).splitlines()
    assert zh[0] == "心电图报告" and zh[1] == "=" * len("心电图报告") * 2  # the county's title, coded LN 28010-7
    assert zh[2] == "已更正：替代之前的 1 份报告"
    assert zh[3].startswith("危急值：所见：急性ST段抬高型心肌梗死;") and "县里报告写明“危急值”：急性前壁" in zh[3]
    assert "SCT" not in zh[3]  # the code: apart, on the page (shown_critical's detail)
    assert "  诊断意见：急性前壁心肌梗死，危急值，请立即转诊" in zh  # DCM 121073 in Chinese, the value as written
    assert "  所见：ST 段抬高 V1-V4" in zh and "  所见：Sinus rhythm, 88/min" in zh
    assert "心率：（无数值）" in zh and "Image Region：（坐标，此处不显示）" in zh
    assert "心电波形：（引用：12-lead ECG Waveform Storage）" in zh
    assert "文字：备注：复查" in zh  # an item the county gave no name: named by its kind
    assert any(line.startswith("诊断医生：李明，") for line in zh) and "观察者姓名：李明" in zh
    assert zh[-1].startswith("无法读取：") and "has no concept name" in zh[-1]  # the technical detail as recorded
    en = report_text(lines, EN).splitlines()
    assert en[2] == "AMENDED: replaces 1 earlier report" and en[3].startswith("CRITICAL RESULT: ")
    assert "心率: (no value)" in en and any(line.startswith("Read by 李明, ") for line in en)
    # the page and the paper, as a patient may read it: no rule, no critical line (said above it),
    # no observer context (the footer names the reading doctor); the county's words all there
    page = page_text(lines, ZH).splitlines()
    assert page[:2] == ["心电图报告", "已更正：替代之前的 1 份报告"]
    assert not any(line.startswith(("危急值", "观察者", "=")) for line in page), page
    assert set(zh) - set(page) == {zh[1], zh[3], "观察者类型：人员", "观察者姓名：李明"}


def test_pdf_fhir_and_the_patient_check_in_both_languages() -> None:
    reports = the_reports()
    assert "PDF 文件，" in report_text(reports["pdf"], ZH) and "PDF document, " in report_text(reports["pdf"], EN)
    fhir_zh = report_text(reports["fhir"], ZH)
    assert "已更正：这是本报告的更正版本" in fhir_zh and "诊断意见：窦性心律。Critical Result: 室性心动过速" in fhir_zh
    assert "编码诊断：急性ST段抬高型心肌梗死" in fhir_zh and "ST 段：抬高" in fhir_zh and "全文：窦性心律" in fhir_zh
    assert "ST 段 标记为 危急异常" in fhir_zh and "诊断医生：陈静，2026-12-01 10:15:00 +08:00" in fhir_zh
    check = report_text(reports["mismatch"], ZH).splitlines()[-1]
    assert check == "请核对：报告写的患者是 P999，心电图是 P0077 的：使用前请核对"
    assert report_text(reports["unreadable"], ZH).splitlines()[:2] == ["无法读取的报告", "=" * 14]  # wide characters
    # its code's term: the county's "STEMI" is only the code's standard abbreviation (the technician's detail keeps it)
    assert shown_reasons(reports["fhir"], ("english reason",), ZH)[0] == "急性ST段抬高型心肌梗死"
    assert shown_critical(reports["fhir"], (), ZH)[0].detail == "http://snomed.info/sct 401303003 · STEMI"


def test_english_without_a_catalog_is_the_localizers_english() -> None:
    plain: Speaker = English()
    en_here = Localizer("en", local_zone())  # English() reads a time without its offset in the gateway's zone
    for lines in the_reports().values():
        assert report_text(lines, plain) == report_text(lines, en_here) == report_text(lines, speaker_for("en"))
    assert "已更正" in report_text(the_reports()["sr"], speaker_for("zh-CN"))


def test_the_text_printout_is_the_consoles_in_the_configured_language(tmp_path: Path) -> None:
    """`lastmile report print` without a PDF: the facts and the report as the console's clinic
    printer gets them, in console.language."""
    now = dt.datetime(2026, 12, 1, 2, 5, tzinfo=dt.timezone.utc)
    with ReportStore.open(tmp_path / "data") as store:
        store.record_sent(
            SentStudy(
                STUDY.study_uid, now, patient_id="P0077", patient_name=STUDY.patient_name, ecg_time=now.isoformat()
            )
        )
        data = part10(everything_sr())
        report = store.add_report(read_dicom_report(data, RULES), data, "dicom", now).report
        zh, suffix = printable(store, report, ZH)
        en, _ = printable(store, report, EN)
    assert suffix == ".txt"
    head = zh.decode().splitlines()
    assert head[:4] == [
        "心电图报告：张三 (Zhang San)  P0077",  # the name as lastmile.ecg.preview prints it
        f"心电图记录时间：{ZH.full(now)}",
        f"已收到报告：{ZH.full(now)}",
        "诊断医生：李明",
    ]
    assert head[4].startswith("危急值：所见：急性ST段抬高型心肌梗死") and "县里报告写明“危急值”" in head[4]
    assert not any(line.startswith(("危急值", "观察者", "=")) for line in head[5:]), head  # said once, above
    assert "  诊断意见：急性前壁心肌梗死，危急值，请立即转诊" in head
    assert (
        en.decode().startswith("ECG report: 张三 (Zhang San)  P0077\nECG recorded: ")
        and "Read by 李明, " in en.decode()
    )


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("2026-12-01T10:15:00+08:00", "2026-12-01 10:15:00 +08:00"),
        ("2026-12-01T10:15:00.123456", "2026-12-01 10:15:00 " + CLINIC_OFFSET),  # no zone: the clinic's
        ("2026-12-01T10:15Z", "2026-12-01 10:15 Z"),
        ("20261201 1015", "20261201 1015"),  # odd: as the report gave it
        ("", ""),
    ],
)
def test_the_reports_time_is_spaced_for_reading_not_changed(given: str, shown: str) -> None:
    assert readable_time(given, local_zone()) == shown


def test_lines_survive_the_store_as_json() -> None:
    for lines in the_reports().values():
        stored = json.loads(json.dumps([line.to_json() for line in lines], ensure_ascii=False))
        assert tuple(ReportLine.from_json(x) for x in stored) == lines
    with pytest.raises(ValueError):
        ReportLine.from_json({"kind": "a kind from a newer gateway"})


OLD_TEXT = "ECG Report\n==========\n  Impression: 窦性心律\n\nRead by Chen Jing, 2026-11-30T10:00:00"


def clinic_db_before(data_dir: Path, migration: str, patient_id: str, **report: object) -> None:
    """clinic.db as the gateway left it before `migration`: a study sent and one report on it (its
    columns as that gateway wrote them)."""
    data_dir.mkdir(mode=0o700)
    db = open_database(data_dir / DB_NAME, tuple(m for m in MIGRATIONS if m.name < migration))
    db.conn.execute(
        "INSERT INTO sent_studies (study_uid, patient_id, sent_at, stat, polls) VALUES (?, ?, ?, 0, 0)",
        (STUDY.study_uid, patient_id or None, "2026-11-30T01:00:00+00:00"),
    )
    row = {"study_uid": STUDY.study_uid, "source": "dicom", "kind": "sr", "object_uid": "1.2.3.9", "version": ""}
    row |= {"status": "final", "title": "ECG Report", "received_at": "2026-11-30T02:00:00+00:00", "data": b"\0"}
    row |= report
    db.conn.execute(f"INSERT INTO reports ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    db.conn.close()


def old_clinic_db(data_dir: Path) -> None:
    """clinic.db as the gateway left it before 0009_report_lines: a report with its English text only."""
    critical = json.dumps(["keyword '危急值' in: 危急值"], ensure_ascii=False)
    clinic_db_before(data_dir, "0009_report_lines", "P0077", text=OLD_TEXT, observer="Chen Jing", critical=critical)


def test_an_old_database_is_migrated_and_its_reports_still_show(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    old_clinic_db(data_dir)
    with ReportStore.open(data_dir) as store:
        applied = [r[0] for r in store.db.conn.execute("SELECT name FROM migrations ORDER BY name")]
        assert applied == sorted(m.name for m in MIGRATIONS)  # 0009_report_lines and every later one
        old = store.get(1)
        assert old is not None and old.lines is None and old.text == OLD_TEXT
        assert shown_text(old.lines, old.text, ZH) == OLD_TEXT  # as it was stored: nothing lost
        assert shown_reasons(old.lines, old.critical, ZH) == ["keyword '危急值' in: 危急值"]
        assert render_report(store, old, ZH).endswith(OLD_TEXT)
        new = store.add_report(
            read_dicom_report(part10(everything_sr()), RULES), b"x", "dicom", dt.datetime.now(dt.timezone.utc)
        ).report
        assert new.lines and new.text == report_text(new.lines, English())  # English kept beside the lines
        assert "已更正：替代之前的 1 份报告" in render_report(store, new, ZH)


def test_the_stored_lines_of_a_content_are_the_lines_it_was_read_into(tmp_path: Path) -> None:
    content: ReportContent = read_dicom_report(part10(everything_sr()), RULES)
    with ReportStore.open(tmp_path / "data") as store:
        store.record_sent(SentStudy(STUDY.study_uid, dt.datetime.now(dt.timezone.utc), patient_id="P0077"))
        kept = store.add_report(content, b"x", "dicom", dt.datetime.now(dt.timezone.utc)).report
    assert kept.lines == content.lines


def test_a_replaced_report_on_paper_says_first_that_it_was_replaced(tmp_path: Path) -> None:
    """An old report number printed (`lastmile report print`, the console's clinic printer): a
    newer version replaced it, and the paper says so on its first line, with the current one's
    number, in the reader's language; the current report's paper says nothing of the kind."""
    now = dt.datetime(2026, 12, 1, 2, 5, tzinfo=dt.timezone.utc)
    first = ecg_report_sr(STUDY, findings=[], impression="正常心电图")
    newer = ecg_report_sr(STUDY, findings=[], impression="一度房室传导阻滞", amends=first)
    with ReportStore.open(tmp_path / "data") as store:
        store.record_sent(SentStudy(STUDY.study_uid, now, patient_id="P0077", patient_name=STUDY.patient_name))
        old, current = (
            store.add_report(read_dicom_report(part10(ds)), part10(ds), "dicom", now).report for ds in (first, newer)
        )
        replaced = store.get(old.id)
        zh = printable(store, replaced, ZH)[0].decode().splitlines()
        en = printable(store, replaced, EN)[0].decode().splitlines()
        now_zh = printable(store, current, ZH)[0].decode()
    assert zh[0] == f"此报告已被第 {current.id} 号报告替代，请勿依据此报告处理。", zh
    assert en[0] == f"This report was replaced by report {current.id}: do not act on it.", en
    assert "替代" not in now_zh.splitlines()[0] and "请勿依据" not in now_zh, now_zh


def test_a_three_part_chinese_name_is_written_whole_as_the_county_sent_its_parts(tmp_path: Path) -> None:
    """The reader stored a PN's "^" as spaces and the display guessed them back for two parts
    only: a reading doctor sent as family^given^middle ("欧阳^娜^娜") was printed "欧阳 娜 娜",
    on the report's text, its paper and `lastmile report list`. Now the PN is kept as sent and
    its parts written as a Chinese name is: 欧阳娜娜."""
    now = dt.datetime(2026, 12, 1, 2, 5, tzinfo=dt.timezone.utc)
    study = StudyToRead(STUDY.study_uid, patient_id="", patient_name="Ouyang^Na^Na=欧阳^娜^娜")
    sr = ecg_report_sr(study, findings=[], impression="正常心电图", reader="欧阳^娜^娜")
    with ReportStore.open(tmp_path / "data") as store:
        store.record_sent(SentStudy(STUDY.study_uid, now))  # sent without a patient: the county's is flagged
        report = store.add_report(read_dicom_report(part10(sr)), part10(sr), "dicom", now).report
        zh = printable(store, report, ZH)[0].decode()
        listed = render_list(study_lines(store))
    assert "诊断医生：欧阳娜娜，" in zh and "观察者姓名：欧阳娜娜" in report_text(report.lines or (), ZH), zh
    assert "县里的报告写的是 欧阳娜娜 (Ouyang Na Na)" in zh, zh
    assert "欧阳娜娜" in listed and "欧阳 娜 娜" not in listed, listed


def test_a_free_text_reading_doctor_is_shown_as_the_platform_wrote_it() -> None:
    """A county doctor typed "王 医生" (a name and a title) into the FHIR report's free-text
    reading doctor: the display took it for a PN's spaced parts and joined it, "王医生"."""
    report = {**fhir_everything(), "resultsInterpreter": [{"display": "王 医生"}]}
    zh = report_text(read_fhir_report(report, RULES).lines, ZH)
    assert "诊断医生：王 医生，" in zh, zh


def spaced_clinic_db(data_dir: Path, sr_lines: list[ReportLine]) -> None:
    """clinic.db as the gateway left it before 0014: an SR's person names stored with "^" spaced."""
    lines = json.dumps([line.to_json() for line in sr_lines], ensure_ascii=False)
    names = {"observer": "Chen Jing=陈 静", "patient_name": "Ouyang Na Na=欧阳 娜 娜"}
    clinic_db_before(data_dir, "0014_report_names_spaced", "", text="", lines=lines, **names)


def written_by_this_process() -> int:
    """Bytes this process has handed to write() so far (/proc/self/io wchar): the WAL and its checkpoints."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(io["wchar"])


def test_keeping_old_reports_names_as_they_showed_rewrites_no_stored_report(tmp_path: Path) -> None:
    """The upgrade must not rewrite every stored report to mark its names: a row's update rewrites its
    PDF too (a year of county PDFs: minutes of SD-card writes, and as much free space again)."""
    data_dir = tmp_path / "data"
    pdf = os.urandom(2 << 20)
    read_by = [ReportLine(LineKind.READ_BY, name="Chen Jing=陈 静", value="2026-11-30T10:00:00+08:00")]
    lines = json.dumps([line.to_json() for line in read_by], ensure_ascii=False)
    clinic_db_before(data_dir, "0014_report_names_spaced", "", observer="Chen Jing=陈 静", lines=lines, data=pdf)
    before = written_by_this_process()
    with ReportStore.open(data_dir) as store:
        written = written_by_this_process() - before
        old = store.get(1)
    assert old is not None and old.reading_doctor == "陈静 (Chen Jing)", old
    # a rewrite of the report writes its 2 MB again; each migration since 0014 commits a few pages
    # (~16-33 KB of WAL each: 317 KB for the 15 of them on 2026-12-07, 536 KB once 0040-0042 came):
    # half the report's size tells the two apart for many migrations yet
    assert written < len(pdf) // 2, f"the upgrade wrote {written} bytes for a clinic.db holding a 2 MB report"


def test_reports_stored_with_spaced_names_show_as_they_did(tmp_path: Path) -> None:
    """Names stored by the old reader ("陈 静", "欧阳 娜 娜") are shown as before 0014: no report
    already on the console changes how it names anyone."""
    data_dir = tmp_path / "data"
    spaced_clinic_db(
        data_dir,
        [
            ReportLine(LineKind.TITLE, value="ECG Report"),
            ReportLine(LineKind.ITEM, name="Person Observer Name", value="Chen Jing=陈 静", code="PNAME"),
            ReportLine(LineKind.READ_BY, name="Chen Jing=陈 静", value="2026-11-30T10:00:00+08:00"),
        ],
    )
    with ReportStore.open(data_dir) as store:
        old = store.get(1)
        assert old is not None and old.lines is not None
        zh = printable(store, old, ZH)[0].decode()
        listed = render_list(study_lines(store))
    assert "观察者姓名：陈静 (Chen Jing)" in report_text(old.lines, ZH) and "诊断医生：陈静 (Chen Jing)，" in zh, zh
    assert "县里的报告写的是 欧阳 娜 娜 (Ouyang Na Na)" in zh, zh  # three runs: not joined then, nor now
    assert "陈静 (Chen Jing)" in listed, listed


def test_person_names_stored_with_the_older_codes_still_read_as_names(tmp_path: Path) -> None:
    """Lines stored after 0014 by a gateway that coded the reading doctor "PN" and a person name item
    "PNAME" (one code now, PERSON_NAME): both are still written as people write a name, not as sent."""
    data_dir = tmp_path / "data"
    stored = [
        {"kind": "title", "value": "ECG Report"},
        {"kind": "item", "name": "Person Observer Name", "value": "Chen^Jing=陈^静", "code": "PNAME"},
        {"kind": "read-by", "name": "Chen^Jing=陈^静", "value": "2026-11-30T10:00:00+08:00", "code": "PN"},
    ]
    lines = json.dumps(stored, ensure_ascii=False)
    clinic_db_before(data_dir, "9999", "", observer="Chen^Jing=陈^静", lines=lines, names_spaced=0)
    with ReportStore.open(data_dir) as store:
        old = store.get(1)
        assert old is not None and old.lines is not None
        zh = printable(store, old, ZH)[0].decode()
    assert [line.code for line in old.lines[1:]] == [PERSON_NAME, PERSON_NAME], old.lines
    assert "观察者姓名：陈静 (Chen Jing)" in report_text(old.lines, ZH) and "诊断医生：陈静 (Chen Jing)，" in zh, zh


def stemi_report(meaning: str = STEMI[2], impression: str = "急性前壁心肌梗死，请立即转诊") -> tuple[ReportLine, ...]:
    """The demo cardiologist's critical SR: observer context, Findings with a coded STEMI whose
    meaning is `meaning` (the county's words for it), Impressions."""
    stemi = (STEMI[0], STEMI[1], meaning)
    sr = ecg_report_sr(STUDY, findings=["窦性心律"], impression=impression, coded_findings=[stemi])
    return read_dicom_report(part10(sr), RULES).lines


def test_why_a_report_is_critical_reads_in_chinese_its_code_kept_apart() -> None:
    """Issue s37-R1: the one line that says why the patient must be referred now was English
    with a SNOMED code ("Finding: Acute ST segment elevation myocardial infarction (SCT 401303003)")."""
    lines = stemi_report()
    zh = report_text(lines, ZH).splitlines()
    assert "危急值：所见：急性ST段抬高型心肌梗死" in zh
    # a keyword in an item's value: the county's sentence, said as the county's (not "the words ... in: Impression: ...")
    critical = stemi_report(impression="急性前壁心肌梗死（危急值），请立即转诊")
    assert shown_reasons(critical, (), ZH)[1] == "县里报告写明“危急值”：急性前壁心肌梗死（危急值），请立即转诊"
    (reason,) = shown_critical(lines, (), ZH)
    assert (reason.text, reason.detail) == (
        "所见：急性ST段抬高型心肌梗死",
        "SCT 401303003 · Acute ST segment elevation myocardial infarction",
    )  # the code and the county's English words, for a county technician, apart
    assert shown_reasons(lines, (), EN) == ["Finding: Acute ST segment elevation myocardial infarction"]
    # the county wrote Chinese already: its words are the reason
    (chinese,) = shown_critical(stemi_report("急性下壁 ST 段抬高型心肌梗死"), (), ZH)
    assert (chinese.text, chinese.detail) == ("所见：急性下壁 ST 段抬高型心肌梗死", "SCT 401303003")


def test_the_srs_well_known_headings_read_in_chinese_unknown_ones_as_written() -> None:
    """Issue s37-R2: "Observer Type: Person", "Person Observer Name: Chen Jing", Findings, Impressions,
    ECG Report - DICOM's concept names in English - on a page read in Chinese."""
    zh = report_text(stemi_report(), ZH).splitlines()
    assert zh[0] == "心电图报告"
    assert "观察者类型：人员" in zh and any(line.startswith("观察者姓名：") for line in zh)
    assert "所见" in zh and "  所见：窦性心律" in zh and "诊断意见" in zh
    en = report_text(stemi_report(), EN).splitlines()
    assert en[0] == "ECG Report" and "Findings" in en and "Observer Type: Person" in en  # English: DICOM's words
    assert "Image Region：（坐标，此处不显示）" in report_text(the_reports()["sr"], ZH)  # unknown: as written


def test_a_coded_value_the_gateway_knows_reads_in_chinese_unknown_ones_as_written() -> None:
    """Issue s37-R2 (found in s37-R1): a coded value stayed as the county wrote it in English -
    "观察者类型 Person", and the coded STEMI finding in the body "所见 Acute ST segment ..." while its
    critical reason above read 急性ST段抬高型心肌梗死. Known by the value's code, never its words."""
    zh = report_text(stemi_report(), ZH).splitlines()
    assert "观察者类型：人员" in zh and "  所见：急性ST段抬高型心肌梗死" in zh, zh
    assert "  所见：窦性心律" in zh  # a text value: the county's words
    en = report_text(stemi_report(), EN).splitlines()
    assert "Observer Type: Person" in en and "  Finding: Acute ST segment elevation myocardial infarction" in en
    # the county's Chinese words for a known code are kept; an unknown code's words as written
    assert "  所见：急性下壁 ST 段抬高型心肌梗死" in report_text(stemi_report("急性下壁 ST 段抬高型心肌梗死"), ZH)
    unknown = (ReportLine(LineKind.ITEM, name="Finding", value="Left axis deviation", value_concept="SCT 49101008"),)
    assert "所见：Left axis deviation" in report_text(unknown, ZH)
    assert ReportLine.from_json(unknown[0].to_json()) == unknown[0]  # stored and read back with its code


def test_a_report_stored_before_the_codes_were_kept_reads_in_chinese_by_its_standard_words() -> None:
    """Issue s39-G: lines stored before the gateway kept the county's concept codes read in DICOM's
    English on a Chinese page (Findings, Observer Type: Person, the STEMI in the body): a word that
    is only a known concept's standard name is known by it, as a coded one is; other words as written."""
    coded = stemi_report()
    old = tuple(replace(line, concept="", value_concept="") for line in coded)
    zh = report_text(old, ZH).splitlines()
    assert zh[0] == "心电图报告" and "所见" in zh and "观察者类型：人员" in zh, zh
    assert zh == report_text(coded, ZH).splitlines()  # as a report stored with its codes
    assert report_text(old, EN) == report_text(coded, EN)  # English: DICOM's words as written
    detailed = ReportLine(LineKind.ITEM, name="Findings (revised)", value="Sinus rhythm with first-degree AV block")
    assert "Findings (revised)：Sinus rhythm with first-degree AV block" in report_text((detailed,), ZH)


def test_a_critical_findings_standard_abbreviation_is_not_printed_again_beside_our_term() -> None:
    """One rule for "only the standard name": the county's "STEMI" (a synonym of SCT 401303003) is
    our term's, as in the body; the printed critical line said it again, "... (STEMI)"."""
    assert shown_reasons(stemi_report("STEMI"), (), ZH)[0] == "所见：急性ST段抬高型心肌梗死"


def test_a_report_time_without_a_zone_is_shown_in_the_clinics_zone(monkeypatch) -> None:
    """Issue s37-R2: a PDF's read time "2026-12-06 19:10:35" said no zone, every other time on the
    console does; the county writes its local time, the clinic's zone: the one the console speaks
    in (a gateway whose system clock is on UTC labelled a Beijing-time report "+00:00")."""
    monkeypatch.setenv("TZ", "UTC")
    pdf = report_pdf(STUDY, ["ECG report"], when=dt.datetime(2026, 12, 6, 19, 10, 35))
    lines = read_dicom_report(part10(pdf), RULES).lines
    assert "诊断医生：（未署名），2026-12-06 19:10:35 +08:00" in report_text(lines, ZH)  # ZH: Asia/Shanghai


def test_a_report_time_with_the_objects_own_offset_keeps_it() -> None:
    """The county's DICOM object says its offset (Timezone Offset From UTC): that, not a guess."""
    pdf = report_pdf(STUDY, ["ECG report"], when=dt.datetime(2026, 12, 6, 19, 10, 35))
    pdf.TimezoneOffsetFromUTC = "+0800"
    lines = read_dicom_report(part10(pdf), RULES).lines
    assert "诊断医生：（未署名），2026-12-06 19:10:35 +08:00" in report_text(lines, ZH)


def test_a_pdfs_own_title_is_shown_as_the_county_wrote_it() -> None:
    """A PDF titled "Holter 24h report - REVISED" was shown as our generic 心电图报告 because its
    concept code is known: the county's title (what the report is, that it was revised) was lost.
    Only a title taken from the code is the gateway's term."""
    titled = read_dicom_report(part10(report_pdf(STUDY, ["x"], title="Holter 24h report - REVISED")), RULES)
    assert report_text(titled.lines, ZH).splitlines()[0] == "Holter 24h report - REVISED"
    untitled = report_pdf(STUDY, ["x"], title="")
    assert report_text(read_dicom_report(part10(untitled), RULES).lines, ZH).splitlines()[0] == "心电图报告"


def test_the_demo_reading_centers_pdf_is_titled_in_chinese() -> None:
    """Issue s39-G: the demo's PDF report (every third ECG) was titled "ECG report": its own title,
    kept as the county wrote it, so the demo's village doctor read English (the list's title, the
    English page). The demo's reading center is ours: it titles its PDF as a Chinese county does."""
    study = StudyToRead(STUDY.study_uid, patient_id="P0077", patient_name="张^三", description="Routine ECG")
    _sr, pdf = DemoCardiologist(pdf_every=1)(study)
    content = read_dicom_report(part10(pdf), RULES)
    assert content.title == "心电图报告", content.title
    assert (
        report_text(content.lines, ZH).splitlines()[0] == report_text(content.lines, EN).splitlines()[0] == "心电图报告"
    )
    assert (
        pdf.EncapsulatedDocument.startswith(b"%PDF-") and b"(ECG Report) Tj" in pdf.EncapsulatedDocument
    )  # Helvetica: ASCII


@pytest.mark.parametrize(
    ("meaning", "printed"),
    [
        (
            "Acute STEMI, anterior wall - call 120",
            "危急值：所见：急性ST段抬高型心肌梗死（Acute STEMI, anterior wall - call 120）",
        ),
        ("急性前壁ST段抬高型心梗", "危急值：所见：急性前壁ST段抬高型心梗"),  # the county's words already: once
    ],
)
def test_the_printed_critical_line_keeps_the_countys_words_for_a_coded_finding(
    tmp_path: Path, meaning: str, printed: str
) -> None:
    """The printout and `lastmile report show` said only our term for the coded STEMI: the
    county's "Acute STEMI, anterior wall - call 120" (where, what to do) was on no paper."""
    now = dt.datetime(2026, 12, 1, 2, 5, tzinfo=dt.timezone.utc)
    stemi = (STEMI[0], STEMI[1], meaning)
    sr = ecg_report_sr(STUDY, findings=["窦性心律"], impression="请立即转诊", coded_findings=[stemi])
    with ReportStore.open(tmp_path / "data") as store:
        store.record_sent(SentStudy(STUDY.study_uid, now, patient_id="P0077", patient_name=STUDY.patient_name))
        report = store.add_report(read_dicom_report(part10(sr), RULES), part10(sr), "dicom", now).report
        paper = printable(store, report, ZH)[0].decode().splitlines()
    assert paper.count(printed) == 1, paper  # the page's facts (the report's text below does not repeat it)


def test_a_known_code_does_not_replace_the_countys_own_fhir_words() -> None:
    """A FHIR report titled "Holter 24h report - REVISED" whose rhythm reads "Sinus rhythm with
    first-degree AV block" printed in Chinese as 心电图报告 / 窦性心律: because each was coded
    (LN 11524-6, SCT 426783006), our term replaced the county's words and the AV block was lost.
    Our term stands in only for words that are just the code's standard name."""
    report = {
        "resourceType": "DiagnosticReport",
        "id": "holter",
        "status": "final",
        "code": {
            "text": "Holter 24h report - REVISED",
            "coding": [{"system": "http://loinc.org", "code": "11524-6", "display": "EKG study"}],
        },
        "contained": [
            {
                "resourceType": "Observation",
                "id": "rhythm",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8884-9", "display": "Heart rate rhythm"}]},
                "valueCodeableConcept": {
                    "text": "Sinus rhythm with first-degree AV block",
                    "coding": [{"system": "http://snomed.info/sct", "code": "426783006", "display": "Sinus rhythm"}],
                },
            }
        ],
        "result": [{"reference": "#rhythm"}],
    }
    zh = report_text(read_fhir_report(report, RULES).lines, ZH).splitlines()
    assert zh[0] == "Holter 24h report - REVISED", zh
    assert "Heart rate rhythm：Sinus rhythm with first-degree AV block" in zh, zh


def test_a_known_code_does_not_replace_the_countys_own_dicom_words() -> None:
    """An SR's CODE item coded SCT 426783006 whose CodeMeaning says more than the code's name
    ("Sinus rhythm with first-degree AV block") printed as 窦性心律: the AV block was lost. A
    CodeMeaning that is only the code's name ("SINUS RHYTHM") still reads as our term."""
    detailed = ecg_report_sr(
        STUDY,
        findings=["x"],
        impression="y",
        coded_findings=[("426783006", "SCT", "Sinus rhythm with first-degree AV block")],
    )
    zh = report_text(read_dicom_report(part10(detailed), RULES).lines, ZH)
    assert "Sinus rhythm with first-degree AV block" in zh and "窦性心律" not in zh, zh
    plain = ecg_report_sr(STUDY, findings=["x"], impression="y", coded_findings=[("426783006", "SCT", "SINUS RHYTHM")])
    assert "窦性心律" in report_text(read_dicom_report(part10(plain), RULES).lines, ZH)


def flagged_report(code: str, display: str = "") -> tuple[ReportLine, ...]:
    """A FHIR report whose one result the county flagged with an HL7 interpretation `code`."""
    obs = critical_observation("o1", "ST 段", "抬高")
    coding = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": code}
    obs["interpretation"] = [{"coding": [{**coding, **({"display": display} if display else {})}]}]
    report = {"resourceType": "DiagnosticReport", "id": "r2", "status": "final", "code": {"text": "心电图报告"}}
    return read_fhir_report({**report, "contained": [obs], "result": [{"reference": "#o1"}]}, RULES).lines


def test_an_interpretation_flag_reads_in_the_doctors_words_its_code_kept_apart() -> None:
    """Issue s38-H: a result the county flagged critical read "ST 段 标记为 HH" - a village doctor
    cannot read HL7's "HH". Its meaning in the reader's language; the code for the technician."""
    lines = flagged_report("HH")
    zh = report_text(lines, ZH)
    assert "危急值：ST 段 标记为 危急偏高" in zh.splitlines(), zh
    assert not re.search(r"\bHH\b", zh), zh
    (reason,) = shown_critical(lines, (), ZH)
    assert (reason.text, reason.detail) == ("ST 段 标记为 危急偏高", "HH")
    assert shown_reasons(lines, (), EN) == ["ST 段 marked Critical high"]  # HL7's display name
    # the county's display: its standard name, so the doctor's term; kept for the technician
    (shown,) = shown_critical(flagged_report("LL", "Critical low"), (), ZH)
    assert (shown.text, shown.detail) == ("ST 段 标记为 危急偏低", "LL · Critical low")
    assert shown_reasons(flagged_report("AA", "Critical abnormal"), (), EN) == ["ST 段 marked Critical abnormal"]
    # a report stored before the code was kept: its bare code is still read; an unknown flag stays as written
    old = ReportLine(LineKind.CRITICAL_INTERPRETED, name="ST 段", value="AA")
    assert shown_reasons([old], (), ZH) == ["ST 段 标记为 危急异常"]
    unknown = ReportLine(LineKind.CRITICAL_INTERPRETED, name="ST 段", value="Panic value", value_concept="V3-OBSINT PV")
    assert shown_reasons([unknown], (), ZH) == ["ST 段 标记为 Panic value"]
