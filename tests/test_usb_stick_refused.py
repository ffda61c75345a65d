"""A damaged ECG file on the cart's USB stick is said to the doctor on Today (REV-R, session 45,
finding 3): it was refused with a journal line only, and Today, Devices and System said nothing;
the doctor pulled the stick believing every ECG came in, and one patient's ECG never reached the
county. A real stick folder under the real watcher (the acquire service's), a real console."""

from __future__ import annotations

import datetime as dt
import html
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest

from firmware_bridge import usb_import
from firmware_bridge.usb_import import REFUSED, FolderWatcher, ImportOutcome, ImportSummary, import_file
from lastmile.clinic.db import open_clinic_db
from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.doctor import Doctor
from lastmile.ecg.intake import record_stick_outcomes, usb_import_watcher
from tests.conftest import shared_file
from tests.console_browser import by, log_in, save_screenshot, set_viewport, text_in
from tests.console_harness import Client, console_config, running_console

pytestmark = pytest.mark.timeout(300)

DAMAGED_WORDS = "U盘上的 ECG_BAD.dcm 已损坏，没有导入：请在心电图机上重新导出"


def held_panel(page: str) -> str:
    """The words of Today's 待处理 panel, tags gone, spaces single."""
    panel = page.split('id="panel-held"', 1)[1].split(">", 1)[1].split("</section>", 1)[0]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", panel)).split())


def brought_in(path: Path) -> None:
    """A file written to the stick long ago (the cart's morning): imported at the watcher's first look."""
    os.utime(path, (dt.datetime.now().timestamp() - 3600,) * 2)


def refused_rows(config: Config) -> list[tuple]:
    db = open_clinic_db(config.data_dir)
    try:
        return db.conn.execute("SELECT id, name, key, refused_at, seen_at FROM stick_files_refused").fetchall()
    finally:
        db.conn.close()


def test_a_damaged_stick_file_is_said_on_today_once_until_seen_or_imported(tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    stick.mkdir()
    config = console_config(tmp_path / "data")
    config.usb_import.folders = [str(stick)]
    # the cart's stick: one good ECG, one whose DICOM is broken (the preamble, then nothing readable)
    shutil.copyfile(shared_file("ecg", "contec", "0000037.ECG"), stick / "0000037.ECG")
    (stick / "ECG_BAD.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"\x07" * 40)
    for f in stick.iterdir():
        brought_in(f)
    with running_console(config) as server, open_outbox(config) as outbox:
        client = Client(server.url)
        client.login()
        watcher = usb_import_watcher(config, outbox)
        (summary,) = watcher.poll()
        assert (summary.imported, [Path(o.path).name for o in summary.refused]) == (1, ["ECG_BAD.dcm"])

        page = client.get("/today").body
        assert DAMAGED_WORDS in held_panel(page), "Today says nothing of the stick's damaged ECG file"
        # System (and `lastmile doctor`) says it too, not "正常"
        system = html.unescape(re.sub(r"<[^>]+>", " ", client.get("/system").body))
        assert "U盘上的心电图文件：ECG_BAD.dcm" in system and DAMAGED_WORDS in system
        assert [f.subject for f in Doctor(config).check_devices() if f.topic == "stick-file"] == ["ECG_BAD.dcm"]

        # the watcher looks at the whole stick again whenever anything on it changes: the same file,
        # refused again, is neither said twice nor written again
        first = refused_rows(config)
        wal = config.data_dir / "clinic.db-wal"
        written = wal.stat().st_size, wal.stat().st_mtime_ns
        for n in range(3):
            shutil.copyfile(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"), stick / f"more{n}.scp")
            brought_in(stick / f"more{n}.scp")
            (again,) = watcher.poll()
            assert [Path(o.path).name for o in again.refused] == ["ECG_BAD.dcm"]
        assert (wal.stat().st_size, wal.stat().st_mtime_ns) == written, "the same refusal was written again"
        assert refused_rows(config) == first and len(first) == 1
        assert held_panel(client.get("/today").body).count("ECG_BAD.dcm") == 1

        # he has seen it: off Today, and the stick's next look does not bring it back
        (file_id, *_) = first[0]
        reply = client.post(f"/today/stick-file/{file_id}/seen")
        assert reply.status == 303, reply.body[:300]
        done = client.get(reply.location).body
        assert "已记录。请在心电图机上重新导出这份心电图" in done
        assert "ECG_BAD.dcm" not in held_panel(done)
        assert not [f for f in Doctor(config).check_devices() if f.topic == "stick-file"]
        shutil.copyfile(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"), stick / "more9.scp")
        brought_in(stick / "more9.scp")
        watcher.poll()
        assert "ECG_BAD.dcm" not in held_panel(client.get("/today").body)

        # another damaged one is said; exported again on the cart under its name, it comes in and goes
        bad2 = stick / "ECG_0002.dcm"
        bad2.write_bytes((stick / "ECG_BAD.dcm").read_bytes() + b"\x01")
        brought_in(bad2)
        watcher.poll()
        assert "U盘上的 ECG_0002.dcm 已损坏" in held_panel(client.get("/today").body)
        shutil.copyfile(shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm"), bad2)
        brought_in(bad2)
        (fine,) = watcher.poll()
        assert [Path(o.path).name for o in fine.refused] == ["ECG_BAD.dcm"]
        assert "ECG_0002.dcm" not in held_panel(client.get("/today").body)
        assert [row[1] for row in refused_rows(config)] == ["ECG_BAD.dcm"]  # the seen one, kept quiet


def test_a_stick_pulled_out_during_the_import_is_said_as_that(tmp_path: Path) -> None:
    """A file the stick could not give (pulled out after the watcher listed it) is not "damaged":
    plug the stick in again first; plugged in again, it comes in and is no longer said."""
    stick = tmp_path / "stick"
    stick.mkdir()
    config = console_config(tmp_path / "data")
    config.usb_import.folders = [str(stick)]
    listed = stick / "ECG_0003.ECG"
    with running_console(config) as server, open_outbox(config) as outbox:
        client = Client(server.url)
        client.login()
        gone = import_file(
            listed,
            is_known=lambda key: False,
            enqueue=lambda r, k: True,
            local_tz=dt.timezone.utc,
            now=lambda: dt.datetime.now(dt.timezone.utc),
        )
        record_stick_outcomes(config, ImportSummary([gone]))
        words = held_panel(client.get("/today").body)
        assert "U盘上的 ECG_0003.ECG 读不出来，没有导入：请把U盘重新插好" in words
        shutil.copyfile(shared_file("ecg", "contec", "0000037.ECG"), listed)
        brought_in(listed)
        (summary,) = usb_import_watcher(config, outbox).poll()
        assert summary.imported == 1
        assert "ECG_0003.ECG" not in held_panel(client.get("/today").body)


def test_the_open_today_page_says_it_live_on_a_phone(tmp_path: Path, browser: object) -> None:
    """The doctor has Today open on his phone when the cart's stick goes in: the damaged file is
    said in the 待处理 panel without a reload (clinic.db written by the watcher, the live panel
    pushed), and his "我已看到" takes it off."""
    stick = tmp_path / "stick"
    stick.mkdir()
    config = console_config(tmp_path / "data")
    config.usb_import.folders = [str(stick)]
    with running_console(config) as server, open_outbox(config) as outbox:
        set_viewport(browser, (360, 800))
        log_in(browser, server)
        text_in(browser, "#panel-held", "没有待指定的")  # nothing waiting yet
        (stick / "ECG_BAD.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x07" * 40)
        brought_in(stick / "ECG_BAD.dcm")
        usb_import_watcher(config, outbox).poll()
        text_in(browser, "#panel-held", DAMAGED_WORDS)
        save_screenshot(browser, "today-stick-file-refused-360")
        browser.find_element(by("css"), "[data-stick-file] button").click()  # type: ignore[attr-defined]
        text_in(browser, "#done-notice", "已记录。请在心电图机上重新导出这份心电图")
        assert "ECG_BAD.dcm" not in browser.find_element(by("id"), "panel-held").text  # type: ignore[attr-defined]


def pull_out_during_its_import(
    watcher: FolderWatcher, stick: Path, monkeypatch: pytest.MonkeyPatch, *, plugged_back: bool
) -> None:
    """The watcher's next import finds the stick's files and then the stick is pulled out (its
    mount point gone: renamed away, its files' times kept) before they are read; if
    `plugged_back`, it is plugged in again, as it was, before the poll after."""
    run, find = watcher._run_import, usb_import.find_ecg_files

    def listed_then_pulled(roots: Iterable[str | os.PathLike[str]]) -> list[Path]:
        found = find(roots)
        monkeypatch.setattr(usb_import, "find_ecg_files", find)
        stick.rename(stick.with_name("stick-pulled"))
        return found

    def pulled(paths: list[Path]) -> ImportSummary:
        watcher._run_import = run  # type: ignore[method-assign]
        monkeypatch.setattr(usb_import, "find_ecg_files", listed_then_pulled)
        try:
            return run(paths)
        finally:
            if plugged_back:
                stick.with_name("stick-pulled").rename(stick)

    watcher._run_import = pulled  # type: ignore[method-assign]


@pytest.mark.parametrize("plugged_back", ["at a later poll", "within one poll"])
def test_a_stick_plugged_in_again_after_a_file_it_could_not_give_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugged_back: str
) -> None:
    """Today says "请把U盘重新插好" for a file the stick could not give (REV-BW finding 2): he does,
    and the stick (the same device, the same files) was never read again: its signature was
    remembered by the import that could not read it. Now the file comes in and is no longer said."""
    stick = tmp_path / "stick"
    stick.mkdir()
    config = console_config(tmp_path / "data")
    config.usb_import.folders = [str(stick)]
    shutil.copyfile(shared_file("ecg", "contec", "0000037.ECG"), stick / "ECG_0003.ECG")
    brought_in(stick / "ECG_0003.ECG")
    within_one_poll = plugged_back == "within one poll"
    with running_console(config) as server, open_outbox(config) as outbox:
        client = Client(server.url)
        client.login()
        watcher = usb_import_watcher(config, outbox)
        pull_out_during_its_import(watcher, stick, monkeypatch, plugged_back=within_one_poll)
        (first,) = watcher.poll()
        assert [(Path(o.path).name, o.unreadable) for o in first.refused] == [("ECG_0003.ECG", True)]
        assert "U盘上的 ECG_0003.ECG 读不出来，没有导入：请把U盘重新插好" in held_panel(client.get("/today").body)
        if within_one_poll:
            assert watcher.poll() == []  # a worn stick is not read again at every poll
            watcher.read_again_after_s = 0.0  # a minute later
        else:
            assert watcher.poll() == []  # pulled out: nothing there
            stick.with_name("stick-pulled").rename(stick)  # plugged in again, as it was
        (again,) = watcher.poll() or pytest.fail("the stick plugged in again was not read again")
        assert (again.imported, again.refused) == (1, [])
        assert "ECG_0003.ECG" not in held_panel(client.get("/today").body)
        assert watcher.poll() == []  # read, remembered


def cart_pdf_report(path: Path) -> None:
    """The cart's PDF report of an ECG, as a DICOM Encapsulated PDF object (written next to the
    ECG on its stick by carts that print to the stick)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Li^Jianguo", "P-0001", "DOC"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "ECG report"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.save_as(path, enforce_file_format=True)


def test_the_carts_pdf_report_on_the_stick_is_not_called_a_damaged_ecg(tmp_path: Path) -> None:
    """The cart writes its PDF report (a DICOM Encapsulated PDF) next to each ECG on its stick
    (REV-BW finding 3): Today said "U盘上的 ECG_0001_PDF.dcm 已损坏…请在心电图机上重新导出" on
    every stick, though the ECG came in. Now a readable file of another kind is not said (and a
    row an older gateway kept for it goes); an ECG cut short before its waveform still is."""
    stick = tmp_path / "stick"
    stick.mkdir()
    config = console_config(tmp_path / "data")
    config.usb_import.folders = [str(stick)]
    ecg = shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm").read_bytes()
    (stick / "ECG_0001.dcm").write_bytes(ecg)
    cart_pdf_report(stick / "ECG_0001_PDF.dcm")
    for f in stick.iterdir():
        brought_in(f)
    with running_console(config) as server, open_outbox(config) as outbox:
        client = Client(server.url)
        client.login()
        # what an older gateway kept for the PDF: said "damaged" until seen
        record_stick_outcomes(
            config,
            ImportSummary([ImportOutcome(str(stick / "ECG_0001_PDF.dcm"), REFUSED, "not an ECG", key="k")]),
        )
        assert "ECG_0001_PDF.dcm 已损坏" in held_panel(client.get("/today").body)
        watcher = usb_import_watcher(config, outbox)
        (summary,) = watcher.poll()
        assert summary.imported == 1
        panel = held_panel(client.get("/today").body)
        assert "ECG_0001_PDF.dcm" not in panel, panel
        assert [(Path(o.path).name, o.not_ecg) for o in summary.refused] == [("ECG_0001_PDF.dcm", True)]
        assert refused_rows(config) == []
        assert not [f for f in Doctor(config).check_devices() if f.topic == "stick-file"]

        # an ECG cut short before its waveform is damaged, not "another kind of file"
        waveform = ecg.index(b"\x00\x54\x00\x01")  # (5400,0100) Waveform Sequence
        (stick / "ECG_0002.dcm").write_bytes(ecg[:waveform])
        brought_in(stick / "ECG_0002.dcm")
        (again,) = watcher.poll()
        assert [(Path(o.path).name, o.not_ecg) for o in again.refused] == [
            ("ECG_0001_PDF.dcm", True),
            ("ECG_0002.dcm", False),
        ]
        panel = held_panel(client.get("/today").body)
        assert "U盘上的 ECG_0002.dcm 已损坏" in panel and "ECG_0001_PDF.dcm" not in panel
