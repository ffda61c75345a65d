"""The console's "print on the clinic printer": the report goes to CUPS's `lp` on the gateway.

`lp` here is a stand-in on PATH that keeps what it was given (CUPS is not on the test host; the
image's CUPS, fonts and scheduler are checked in tests/system/test_image_boot.py). The console runs
in this process, so it finds the stand-in as it would find /usr/bin/lp on the image.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.console_harness import (
    DOCTOR,
    Client,
    console_config,
    running_console,
    stand_in_lp,
    store_returned_reports,
)


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
