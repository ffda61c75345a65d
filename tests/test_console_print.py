"""The console's "print on the clinic printer": the report goes to CUPS's `lp` on the gateway.

`lp` here is a stand-in on PATH that keeps what it was given (CUPS is not on the test host; the
image's CUPS, fonts and scheduler are checked in tests/system/test_image_boot.py). The console runs
in this process, so it finds the stand-in as it would find /usr/bin/lp on the image.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from lastmile.config import Config
from lastmile.demo.cardiologist import StudyToRead, ecg_report_sr, part10, report_pdf
from lastmile.reports.store import ReportStore, SentStudy
from tests.console_harness import (
    DOCTOR,
    VALID_ID,
    Client,
    console_config,
    printed_jobs,
    running_console,
    stand_in_lp,
    store_returned_reports,
    store_unassigned_ecg_report,
)
from tests.fhir_reports import report_for
from uploader.report_reading import read_dicom_report, read_fhir_report


def printed_from_the_console(config: Config, report_id: int) -> None:
    """A doctor presses "print on the clinic printer" on the report's page; the job is taken."""
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        reply = client.post(f"/reports/{report_id}/print")
        assert reply.status == 303 and reply.location.endswith(f"/reports/{report_id}?printed=1"), reply


def test_a_report_prints_on_the_clinic_printer_in_chinese(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = stand_in_lp(tmp_path, monkeypatch)
    config = console_config(tmp_path / "data")
    _critical, routine = store_returned_reports(config)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = client.get(f"/reports/{routine}").body
        assert f'action="/reports/{routine}/print"' in page and "用诊所打印机打印" in page
        reply = client.post(f"/reports/{routine}/print")
        assert reply.status == 303 and reply.location.endswith(f"/reports/{routine}?printed=1"), reply
        assert "已发送到诊所打印机" in client.get(reply.location).body
    printed = spool.read_bytes().decode("utf-8")
    # the county's text and the patient, in the page's language (zh-CN: the client's default)
    assert "窦性心律，心电图正常" in printed and "李伟" in printed and "DEMO-0002" in printed
    assert "心电图报告" in printed
    assert Path(f"{spool}.args").read_text().strip() == f"-t ECG report {routine}"  # the default printer


def test_a_refused_job_is_said_and_the_browser_print_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_lp(tmp_path, monkeypatch, refuse=True)
    config = console_config(tmp_path / "data")
    _critical, routine = store_returned_reports(config)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        client.get(f"/reports/{routine}")
        reply = client.post(f"/reports/{routine}/print")
        assert reply.status == 303 and reply.location.endswith("?printed=0"), reply
        page = client.get(reply.location).body
        assert "诊所打印机没有接收" in page and "data-print" in page


def test_without_cups_there_is_no_clinic_printer_button(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no lp anywhere
    config = console_config(tmp_path / "data")
    _critical, routine = store_returned_reports(config)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = client.get(f"/reports/{routine}").body
        assert "data-print" in page and "/print" not in page.split("data-print", 1)[1].split("</article>")[0]


def test_printing_needs_the_forms_csrf_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = stand_in_lp(tmp_path, monkeypatch)
    config = console_config(tmp_path / "data")
    _critical, routine = store_returned_reports(config)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        reply = client.post(f"/reports/{routine}/print", csrf=False)
        assert reply.status in (400, 403), reply
    assert not spool.exists()


def test_an_ecg_sent_without_a_patient_prints_the_countys_patient_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paper outlives the page: the printout of a report on an ECG sent unassigned is headed
    "patient not known", and the patient the county typed is printed as what the county wrote."""
    spool = stand_in_lp(tmp_path, monkeypatch)
    config = console_config(tmp_path / "data")
    report_id, device = store_unassigned_ecg_report(config)
    printed_from_the_console(config, report_id)
    printed = spool.read_bytes().decode("utf-8")
    heading = printed.splitlines()[0]
    assert heading == "心电图报告：患者未确定", printed
    assert "发送时没有指定患者" in printed and f"县里的报告写的是 张三 (Zhang San) {VALID_ID}" in printed, printed
    assert device in printed, printed


def test_the_countys_pdf_of_a_replaced_report_prints_behind_a_replaced_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The county sent a PDF, then a corrected report replacing it. Printed on the clinic printer
    from the old report's page, the PDF (the county's own document, which cannot say it) must come
    out behind a page saying it was replaced, as the page and the text printout say."""
    spool = stand_in_lp(tmp_path, monkeypatch)
    config = console_config(tmp_path / "data")
    now = dt.datetime.now(dt.timezone.utc)
    study = StudyToRead(generate_uid(), VALID_ID, "Zhang^San=张^三")
    pdf = report_pdf(study, ["Sinus rhythm"])
    with ReportStore.open(config.data_dir) as store:
        store.record_sent(SentStudy(study.study_uid, now, patient_id=study.patient_id, patient_name=study.patient_name))
        old, current = (
            store.add_report(read_dicom_report(part10(ds)), part10(ds), "dicom", now).report.id
            for ds in (pdf, ecg_report_sr(study, findings=[], impression="一度房室传导阻滞，请复查", amends=pdf))
        )
    printed_from_the_console(config, old)
    jobs = printed_jobs(spool)
    assert len(jobs) == 2 and jobs[1].startswith(b"%PDF-"), [job[:40] for job in jobs]
    assert f"此报告已被第 {current} 号报告替代" in jobs[0].decode("utf-8"), jobs[0]


def test_the_countys_pdf_on_an_ecg_sent_without_a_patient_prints_behind_the_unassigned_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The county's own PDF names the patient its staff typed and cannot say the gateway did not
    know the patient: on the clinic printer a page saying so (and that the name is the county's)
    comes first, as the page and the text printout say it."""
    spool = stand_in_lp(tmp_path, monkeypatch)
    config = console_config(tmp_path / "data")
    report_id, device = store_unassigned_ecg_report(config, as_pdf=True)
    printed_from_the_console(config, report_id)
    jobs = printed_jobs(spool)
    assert len(jobs) == 2 and jobs[1].startswith(b"%PDF-"), [job[:40] for job in jobs]
    note = jobs[0].decode("utf-8")
    assert (
        "发送时没有指定患者" in note and f"县里的报告写的是 张三 (Zhang San) {VALID_ID}" in note and device in note
    ), note


def test_the_reading_doctors_name_on_the_page_and_the_printout_is_written_as_people_write_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Chinese reading doctor was shown "陈 静" (the reader keeps a PN's parts spaced) on the
    report's page and on the clinic printer's printout: 陈静, as a Chinese name is written."""
    spool = stand_in_lp(tmp_path, monkeypatch)
    config = console_config(tmp_path / "data")
    now = dt.datetime.now(dt.timezone.utc)
    study = StudyToRead(generate_uid(), VALID_ID, "Zhang^San=张^三")
    sr = ecg_report_sr(study, findings=[], impression="窦性心律，心电图正常", reader="Chen^Jing=陈^静")
    with ReportStore.open(config.data_dir) as store:
        store.record_sent(SentStudy(study.study_uid, now, patient_id=study.patient_id, patient_name=study.patient_name))
        report_id = store.add_report(read_dicom_report(part10(sr)), part10(sr), "dicom", now).report.id
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        for path in ("/reports", f"/reports/{report_id}"):
            page = client.get(path).body
            assert "陈静" in page and "陈 静" not in page, f"{path}: {page}"
    printed_from_the_console(config, report_id)
    printed = spool.read_bytes().decode("utf-8")
    assert "诊断医生：陈静 (Chen Jing)" in printed and "陈 静" not in printed, printed


FREE_TEXT_READERS = ("李明 (Li Ming)", "Zhang Wei, 陈静", "王小明 主治医师")


def test_a_fhir_reading_doctor_is_shown_as_the_platform_wrote_it(tmp_path: Path) -> None:
    """A FHIR report's reading doctor is free text, not a DICOM person name: its spaces were
    taken out as a Chinese name's (李明(LiMing), ZhangWei,陈静, 王小明主治医师) on the pages."""
    config = console_config(tmp_path / "data")
    now = dt.datetime.now(dt.timezone.utc)
    report_ids = []
    with ReportStore.open(config.data_dir) as store:
        for reader in FREE_TEXT_READERS:
            study_uid = generate_uid()
            store.record_sent(SentStudy(study_uid, now, patient_id="P1"))
            resource = {**report_for(study_uid, resultsInterpreter=[{"display": reader}]), "id": generate_uid()}
            content = read_fhir_report(resource, known_studies=[study_uid])
            report_ids.append(store.add_report(content, b"{}", "fhir", now).report.id)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        listed = client.get("/reports").body
        for reader, report_id in zip(FREE_TEXT_READERS, report_ids, strict=True):
            assert reader in listed, f"/reports: {reader!r} not in {listed}"
            page = client.get(f"/reports/{report_id}").body
            assert page.count(reader) >= 2, f"{reader!r}: {page}"  # Read by, and the report text's footer
