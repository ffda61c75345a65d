"""What Today says of an ECG held while a patient is checked in, when its cart's file named someone:
a resident ID whose check digit is wrong (the file's patient refused, the ECG held with no patient)
or another, valid, patient. REV-R (session 45) findings 2 and 5: the refused one read "无患者" with
the checked-in patient's ID typed in its Assign box (one tap put 李建国's ECG under 张秀兰), and the
other patient's one recorded during the visit read "在本次就诊之前测量". A real console over a real
outbox, the ECGs as the cart's USB stick brings them (`file_enqueuer`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.identity import Patient
from lastmile.cli import main as cli
from lastmile.config import Config
from lastmile.console.service import ConsoleServer
from lastmile.data_dir import open_outbox
from lastmile.ecg.holds import PATIENT_MISMATCH, UNASSIGNED_HOLD
from lastmile.ecg.intake import PATIENT_ID_REFUSED
from tests.cart_files import arrives_from_the_usb_stick
from tests.console_harness import VALID_ID, Client, console_config, held_ecg_row, running_console
from tests.ecg_factories import make_recording

pytestmark = pytest.mark.timeout(600)

CHECKED_IN = "张秀兰"
MISTYPED = Patient("110101196505050016", "李建国")  # its check digit should be 9, not 6
OTHER = Patient("110105198001010016", "Wang^Jianjun=王^建军")  # a valid ID, not the one checked in


@dataclasses.dataclass(frozen=True)
class Clinic:
    config: Config
    server: ConsoleServer
    mistyped: int  # held: its file's ID refused
    other: int  # held: another patient's, recorded during the visit
    nameless: int  # held: its file names nobody, recorded during the visit


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    """张秀兰 checked in; three ECGs from the cart's stick, recorded just now (during her visit):
    one naming 李建国 under a mistyped resident ID, one naming 王建军, one naming nobody."""
    config = console_config(Path(tmp_path_factory.mktemp("held-words")) / "data")
    config.patient.id_kind = "cn-resident-id"
    config.patient.unassigned_ecg_hold_s = 900
    config.ecg.re_record_hold_s = 0  # whose ECG it is is the subject here, not its quality
    with running_console(config) as server:
        doctor = Client(server.url)
        doctor.login()
        assert doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": CHECKED_IN}).status == 303
        now = dt.datetime.now(dt.timezone.utc)
        ids = [
            arrives_from_the_usb_stick(
                config, dataclasses.replace(make_recording(seed, patient=patient), acquired_at=now), f"stick:{seed}"
            ).id
            for seed, patient in ((1, MISTYPED), (2, OTHER), (3, None))
        ]
        yield Clinic(config, server, *ids)


def assign_field(page: str, item_id: int) -> str:
    """The value typed in held ECG E`item_id`'s Assign box on Today ("" for none)."""
    found = re.search(rf'<input id="assign-ecg-{item_id}"[^>]*value="([^"]*)"', page)
    assert found, f"E{item_id} has an Assign box"
    return found.group(1)


def test_an_ecg_whose_file_id_was_refused_keeps_what_the_file_said(clinic: Clinic) -> None:
    """intake dropped the file's patient of a refused ID and kept only the flag: 李建国 and the ID
    the cart wrote were gone. Its outbox item keeps them, and the rule the ID broke."""
    with open_outbox(clinic.config) as outbox:
        item = outbox.get(clinic.mistyped)
    assert item is not None and item.hold_reason == UNASSIGNED_HOLD and item.patient is None
    assert PATIENT_ID_REFUSED in item.meta["flags"], item.meta
    assert (item.meta.get("file_patient_name"), item.meta.get("file_patient_id")) == ("李建国", MISTYPED.patient_id)
    assert item.meta.get("file_patient_id_problem") == "check-character", item.meta


def test_today_says_what_the_cart_wrote_and_offers_nobody_for_a_refused_id(clinic: Clinic) -> None:
    """The row read "心电图 E16 无患者", its Assign box with 张秀兰's ID typed in, "在 … 就诊期间测量".
    It says what the cart wrote and why it was refused; the box is empty, and says only when it
    was measured. An ECG naming nobody, recorded during her visit, still offers her (kept)."""
    doctor = Client(clinic.server.url)
    doctor.login()
    page = doctor.get("/today").body
    row = held_ecg_row(page, clinic.mistyped)
    assert "心电图机上写的是 李建国 110101196505050016：身份证号校验位不对，请核对。" in row, row
    assert assign_field(page, clinic.mistyped) == "", row
    assert "在本次就诊期间测量：请输入是谁的。" in row and VALID_ID not in row, row
    assert assign_field(page, clinic.nameless) == VALID_ID  # names nobody: offered, as before
    assert f"在 {VALID_ID} 就诊期间测量" in held_ecg_row(page, clinic.nameless)


def test_today_says_another_patients_ecg_was_recorded_during_this_visit(clinic: Clinic) -> None:
    """王建军's ECG, recorded during 张秀兰's visit, read "在本次就诊之前测量" (measured before this visit):
    false, and he may take it for an old ECG. It says it was measured during this visit with
    another patient on the cart, and offers nobody."""
    with open_outbox(clinic.config) as outbox:
        item = outbox.get(clinic.other)
    assert item is not None and item.hold_reason == PATIENT_MISMATCH, item
    doctor = Client(clinic.server.url)
    doctor.login()
    page = doctor.get("/today").body
    row = held_ecg_row(page, clinic.other)
    assert "在本次就诊期间测量，但心电图机上是另一位患者：请输入是谁的。" in row, row
    assert "就诊之前" not in row, row
    assert assign_field(page, clinic.other) == "", row


def test_the_same_words_in_english(clinic: Clinic) -> None:
    """Both rows in English: the words the doctor reads on an English console (the names as the cart wrote them)."""
    doctor = Client(clinic.server.url, language="en")
    doctor.login()
    page = doctor.get("/today").body
    refused = html.unescape(held_ecg_row(page, clinic.mistyped))
    assert "The ECG machine says 李建国 110101196505050016: the ID number's check digit is wrong. Check it." in refused
    assert "Measured during this visit: type whose it is." in refused, refused
    other = held_ecg_row(page, clinic.other)
    assert "Measured during this visit, but the ECG machine has another patient on it: type whose it is." in other


def test_patient_show_says_what_the_refused_file_named(clinic: Clinic, capsys: pytest.CaptureFixture[str]) -> None:
    """`lastmile patient show` said "names no patient" of it, as of a file that named nobody."""
    config_file = clinic.config.data_dir.parent / "lastmile.toml"
    config_file.write_text(f'[gateway]\ndata_dir = "{clinic.config.data_dir}"\n[patient]\nid_kind = "cn-resident-id"\n')
    assert cli(["-c", str(config_file), "patient", "show"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  E")}
    assert "its file names 110101196505050016 李建国, but that patient ID is refused" in lines[f"E{clinic.mistyped}"]
    assert "names no patient" in lines[f"E{clinic.nameless}"], lines


def test_the_refused_files_words_are_read_whole_on_a_phone(clinic: Clinic, browser: object) -> None:
    """The row on a 360x800 phone (screenshot: today-held-refused-id-phone): what the cart wrote,
    its ID unbroken, within the screen; the Assign box empty."""
    from tests.console_browser import by, log_in, save_screenshot, set_viewport, text_in

    set_viewport(browser, (360, 800))
    log_in(browser, clinic.server)
    text_in(browser, "#panel-held", "心电图机上写的是")
    row = browser.find_element(by("css"), f'#panel-held li[data-held-ecg="{clinic.mistyped}"]')  # type: ignore[attr-defined]
    said = row.find_element(by("css"), "[data-file-id-refused]")
    browser.execute_script("arguments[0].scrollIntoView()", row)  # type: ignore[attr-defined]
    save_screenshot(browser, "today-held-refused-id-phone")
    width = browser.execute_script("return document.documentElement.clientWidth")  # type: ignore[attr-defined]
    box = said.rect
    assert box["x"] >= 0 and box["x"] + box["width"] <= width, f"off the screen: {box}"
    assert "110101196505050016" in said.text.replace("\n", "")
    assert row.find_element(by("css"), f"#assign-ecg-{clinic.mistyped}").get_attribute("value") == ""
