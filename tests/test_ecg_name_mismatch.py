"""An ECG whose file names the checked-in patient's ID under another person's name (the cart kept
the previous patient's name; a mistyped ID that is someone else's number) is held for the doctor
("name-mismatch"), STAT ones too but for two minutes at most; Today asks whose it is. Names are
compared by one rule (`same_person_name`): 张三, Zhang^San and Zhang^San=张^三 are one name, a
homophone in other characters is not, a file without a name passes.

Real files: ecgtoolkit's SCP-ECG, HL7 aECG and DICOM ECG all name SBJ-123 "Clark"."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import itertools
import json
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from devices.ecg.recording import EcgRecording
from devices.identity import Patient
from lastmile.cli import main as cli
from lastmile.clinic.device_users import DeviceUsers, mapped_name
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config
from lastmile.console.service import ConsoleServer
from lastmile.console.sources import HeldEcg
from lastmile.console.stores import OutboxHeldEcgs
from lastmile.data_dir import open_outbox
from lastmile.ecg.holds import NAME_MISMATCH, held_ecgs
from lastmile.ecg.intake import (
    STAT_NAME_HOLD_S,
    assign_held_ecg,
    enqueue_recording,
    file_enqueuer,
    read_ecg_file,
)
from tests.cart_files import arrives_from_the_usb_stick, stored_dataset
from tests.conftest import shared_file
from tests.console_harness import Client, console_config, csrf_of, held_ecg_row, running_console
from tests.lan_cart import lan_receiver, storescu_as_the_cart
from tests.serial_gateway import Running
from tests.serial_pty import PtyDevice
from tests.service_harness import PATIENT_CARD_SCAN, known_name
from tests.waiting import wait_for
from uploader.outbox import Kind

FILE_ID = "SBJ-123"  # the ID the three ecgtoolkit files name, with the name "Clark"
HOLD_S = 900.0
SCP = ("ecg", "scp", "ecgtoolkit_Example.scp")
AECG = ("ecg", "aecg", "fda_hl7_Example_aECG.xml")
DCM = ("ecg", "dicom", "ecgtoolkit_Example.dcm")
NOISY = ("ecg", "contec", "0000037.ECG")  # 50 Hz as big as the ECG: the quality check says "record again"
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the cart's malformed UIDs


def _config(tmp_path: Path) -> Config:
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.outbox.min_free_mb = 1
    config.patient.unassigned_ecg_hold_s = HOLD_S
    config.ecg.re_record_hold_s = 0  # the patient's name is the subject, not the file's quality
    return config


def _cli(tmp_path: Path) -> list[str]:
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 1\n[ecg]\nre_record_hold_s = 0\n'
    )
    return ["-c", str(config_file)]


# -- files: `lastmile import` ------------------------------------------------------------------------


def test_a_file_naming_the_checked_in_id_under_another_name_is_held_and_not_forwarded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """张三 is checked in as SBJ-123; the cart's SCP-ECG file names SBJ-123 "Clark" (the previous
    patient's name left on the cart). It was filed to 张三 and sent at once: it is held, said by
    `patient show` and `queue`, and the forwarder's claim does not take it until the hold ends."""
    run = _cli(tmp_path)
    assert cli([*run, "patient", "set", FILE_ID, "--name", "张三"]) == 0
    before = time.time()
    assert cli([*run, "import", "-q", str(shared_file(*SCP))]) == 0
    config = _config(tmp_path)
    with open_outbox(config) as outbox:
        (item,) = outbox.items(kind=Kind.DICOM)
        assert item.hold_reason == NAME_MISMATCH, item.meta["flags"]
        assert item.hold_until is not None and before + HOLD_S <= item.hold_until <= time.time() + HOLD_S
        assert item.meta["file_patient_name"] == "Clark" and item.meta["checked_in_name"] == "Zhang^San=张^三"
        assert [i.id for i in held_ecgs(outbox, time.time())] == [item.id]
        assert outbox.claim(Kind.DICOM, 10, time.time()) == []  # the forwarder does not take it
        assert [i.id for i in outbox.claim(Kind.DICOM, 10, item.hold_until + 1)] == [item.id]  # nobody answered
    capsys.readouterr()
    assert cli([*run, "queue"]) == 0
    assert "1 held for the doctor" in capsys.readouterr().out
    assert cli([*run, "patient", "show"]) == 0
    assert "names SBJ-123 as Clark, checked in as Zhang^San=张^三" in capsys.readouterr().out


def test_patient_show_names_a_held_ecgs_id_as_the_doctor_corrected_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ECG held for its name (file: Clark; check-in: 张三), then the doctor corrects the check-in's
    name to 李四: `patient show` still said "checked in as 张三" (the name stored at intake), not the
    one "it is his" now sends it under. It says 李四, and 张三 as the name it was held against."""
    run = _cli(tmp_path)
    assert cli([*run, "patient", "set", FILE_ID, "--name", "张三"]) == 0
    assert cli([*run, "import", "-q", str(shared_file(*SCP))]) == 0
    assert cli([*run, "patient", "set", FILE_ID, "--name", "李四", "--correct-name"]) == 0
    capsys.readouterr()
    assert cli([*run, "patient", "show"]) == 0
    out = capsys.readouterr().out
    assert "names SBJ-123 as Clark, checked in as Li^Si=李^四 (corrected; Zhang^San=张^三 when it was held)" in out
    assert cli([*run, "patient", "show", "--json"]) == 0
    (held,) = json.loads(capsys.readouterr().out)["held_ecgs"]
    assert (held["file_patient_name"], held["checked_in_name"], held["checked_in_name_at_intake"]) == (
        "Clark",
        "Li^Si=李^四",
        "Zhang^San=张^三",
    )


@pytest.mark.parametrize("checked_in", ["Clark", "CLARK", ""], ids=["same", "capitals", "no-name"])
def test_a_file_under_the_check_ins_own_name_or_none_is_not_held(tmp_path: Path, checked_in: str) -> None:
    run = _cli(tmp_path)
    assert cli([*run, "patient", "set", FILE_ID, *(["--name", checked_in] if checked_in else [])]) == 0
    assert cli([*run, "import", "-q", str(shared_file(*SCP))]) == 0
    with open_outbox(_config(tmp_path)) as outbox:
        (item,) = outbox.items(kind=Kind.DICOM)
    assert item.hold_until is None and NAME_MISMATCH not in item.meta["flags"]


@pytest.mark.parametrize(
    ("checked_in", "cart_name", "sent_as"),
    [
        ("张秀兰", "Zhang Xiulan", "Zhang Xiulan=张^秀兰"),
        ("张秀兰", "ZHANG^XIULAN", "ZHANG^XIULAN=张^秀兰"),
        ("张乐", "Zhang Yue", "Zhang Yue=张^乐"),  # her reading, not the dictionary's Zhang^Le
        ("曾凡", "Ceng^Fan", "Ceng^Fan=曾^凡"),  # not Zeng^Fan
    ],
    ids=["spaced", "capitals", "heteronym-yue", "heteronym-ceng"],
)
def test_a_file_naming_the_check_in_in_pinyin_goes_under_the_check_ins_characters(
    tmp_path: Path, checked_in: str, cart_name: str, sent_as: str
) -> None:
    """张秀兰 is checked in; the cart (no input method) wrote "Zhang Xiulan". Her readings went as
    Zhang^Xiulan=张^秀兰, her ECG as "Zhang Xiulan" with no Chinese name (REV-R 12): now with her
    characters. The cart's letters stay as it wrote them (REV-H 3): 张乐 written "Zhang Yue" went
    as the dictionary's Zhang^Le=张^乐, a pinyin the cart and the HIS do not have."""
    run = _cli(tmp_path)
    assert cli([*run, "patient", "set", FILE_ID, "--name", checked_in]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(shared_file(*DCM))
        ds.PatientName = cart_name
        ds.save_as(tmp_path / "cart.dcm")
    assert cli([*run, "import", "-q", str(tmp_path / "cart.dcm")]) == 0
    with open_outbox(_config(tmp_path)) as outbox:
        (item,) = outbox.items(kind=Kind.DICOM)
        sent = stored_dataset(outbox, item.id)
    assert item.hold_until is None and NAME_MISMATCH not in item.meta["flags"]
    assert item.patient is not None and item.patient["name"] == sent_as
    assert (sent.PatientID, str(sent.PatientName)) == (FILE_ID, sent_as)


def test_a_stat_ecg_held_for_its_name_waits_two_minutes_and_comes_first(tmp_path: Path) -> None:
    """STAT ECGs were never held: one under another name went to the county at once, on the checked-in
    patient. It is held too, for STAT_NAME_HOLD_S (not the routine 900 s), and listed first."""
    config = _config(tmp_path)
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        with open_outbox(config) as outbox:
            context.set_patient(FILE_ID, "张三", now=now)
            routine_cart, stat_cart = (
                file_enqueuer(
                    outbox,
                    config,
                    lambda: context.patient_ids(now),
                    stat=stat,  # `lastmile import --stat`: the files' own dates are long before the check-in
                    checked_in_name=lambda pid: context.known_name(pid, now),
                )
                for stat in (False, True)
            )
            assert routine_cart(read_ecg_file(shared_file(*AECG)), "routine")
            t = time.time()
            assert stat_cart(read_ecg_file(shared_file(*SCP)), "stat")
            routine, stat = outbox.find("routine"), outbox.find("stat")
            assert routine is not None and stat is not None and stat.meta["stat"]
            assert stat.hold_reason == NAME_MISMATCH and stat.hold_until is not None
            assert t + STAT_NAME_HOLD_S <= stat.hold_until <= time.time() + STAT_NAME_HOLD_S < t + HOLD_S
            assert [i.id for i in held_ecgs(outbox, time.time())] == [stat.id, routine.id]  # STAT first
            assert outbox.claim(Kind.DICOM, 10, time.time()) == []
            assert [i.key for i in outbox.claim(Kind.DICOM, 10, stat.hold_until + 1)] == ["stat"]
    finally:
        context.close()


@pytest.mark.parametrize("stat_name_hold_s", [30, 0], ids=["half-a-minute", "not-held"])
def test_the_stat_name_hold_is_the_configured_one(tmp_path: Path, stat_name_hold_s: int) -> None:
    """The STAT ECG's name hold was a constant (120 s): a clinic whose doctor answers at once (or a
    county that wants STAT ECGs never held for their name) could not say so. `ecg.stat_name_hold_s`
    in the TOML the real `lastmile import --stat` reads; the routine hold is not changed by it."""
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[outbox]\nmin_free_mb = 1\n'
        f"[ecg]\nre_record_hold_s = 0\nstat_name_hold_s = {stat_name_hold_s}\n"
    )
    run = ["-c", str(config_file)]
    assert cli([*run, "patient", "set", FILE_ID, "--name", "张三"]) == 0
    t = time.time()
    assert cli([*run, "import", "-q", "--stat", str(shared_file(*SCP))]) == 0
    assert cli([*run, "import", "-q", str(shared_file(*AECG))]) == 0
    with open_outbox(_config(tmp_path)) as outbox:
        stat, routine = sorted(outbox.items(kind=Kind.DICOM), key=lambda item: not item.meta["stat"])
    assert stat.meta["stat"] and NAME_MISMATCH in stat.meta["flags"]
    if stat_name_hold_s:
        assert stat.hold_reason == NAME_MISMATCH and stat.hold_until is not None
        assert t + stat_name_hold_s <= stat.hold_until <= time.time() + stat_name_hold_s
    else:
        assert stat.hold_until is None, stat.hold_reason
    assert routine.hold_reason == NAME_MISMATCH and routine.hold_until is not None
    assert routine.hold_until >= t + HOLD_S  # patient.unassigned_ecg_hold_s, the default 900 s


# -- the clinic LAN: a cart's DICOM ECG, stored as received -----------------------------------------


def test_a_lan_ecg_held_for_its_name_goes_under_the_decided_name_with_the_carts_uids(tmp_path: Path) -> None:
    """The cart sends its DICOM ECG (SBJ-123 "Clark") over the LAN while 张三 is checked in as
    SBJ-123: it was forwarded at once. It is held; the doctor says it is 张三's: the cart's object
    goes with his name (Clark kept as another name), its UIDs the cart's, and the cart sending it
    again does not undo the decision."""
    config = _config(tmp_path)
    path = shared_file(*DCM)
    cart = pydicom.dcmread(path)
    with open_outbox(config) as outbox:
        with lan_receiver(
            outbox, FILE_ID, lambda pid: "Zhang^San=张^三" if pid == FILE_ID else "", patient_hold_s=HOLD_S
        ) as receiver:
            storescu_as_the_cart(receiver.port, path)
            (item,) = outbox.items(kind=Kind.DICOM)
            assert item.hold_reason == NAME_MISMATCH and item.held(time.time())
            assert outbox.claim(Kind.DICOM, 10, time.time()) == []
            now = dt.datetime.now(dt.timezone.utc)
            decided = assign_held_ecg(outbox, item.id, Patient(FILE_ID, "Zhang^San=张^三"), now=now, by="王医生")
            assert decided.hold_until is None and decided.patient is not None
            assert decided.patient["name"] == "Zhang^San=张^三"
            storescu_as_the_cart(receiver.port, path)  # the cart's retry of the same object
        sent = stored_dataset(outbox, item.id)
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
            assert sent.get(keyword) == cart.get(keyword), keyword
        assert str(sent.PatientName) == "Zhang^San=张^三" and str(sent.OtherPatientNames) == "Clark"
        # the cart's 1953 and M were Clark's: 张三's ECG goes without them
        assert (cart.PatientBirthDate, cart.PatientSex) == ("19530508", "M")
        assert (sent.PatientBirthDate, sent.PatientSex) == ("", "")
        assert decided.patient["birth_date"] is None and not decided.patient["sex"]
        assert [i.id for i in outbox.claim(Kind.DICOM, 10, time.time())] == [item.id]


# -- Today -------------------------------------------------------------------------------------------


@pytest.fixture
def clinic(tmp_path: Path) -> Iterator[tuple[Config, ConsoleServer, Client]]:
    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0
    with running_console(config) as server:
        doctor = Client(server.url)
        doctor.login()
        assert doctor.post("/today/check-in", {"patient_id": FILE_ID, "name": "张三"}).status == 303
        yield config, server, doctor


def _arrives(config: Config, parts: tuple[str, ...], key: str) -> int:
    """The cart's file arrives as from its USB stick, while 张三 is checked in as SBJ-123."""
    return _held_for_its_name(config, read_ecg_file(shared_file(*parts)), key)


def _held_on_today(config: Config, doctor: Client, parts: tuple[str, ...], key: str) -> tuple[int, str]:
    """The cart's file arrives and is held for its name (`_arrives`); the doctor opens Today. Its
    id, and Today's page."""
    item_id = _arrives(config, parts, key)
    return item_id, doctor.get("/today").body


def _held_for_its_name(
    config: Config, recording: EcgRecording, key: str, *, re_record_hold_s: float | None = None
) -> int:
    """`recording` arrives as from the cart's USB stick, while 张三 is checked in as SBJ-123 (its
    quality judged by `config`'s ECG settings, held `re_record_hold_s` for "record again" when
    given); held for its name. Its id."""
    judged = config
    if re_record_hold_s is not None:
        judged = copy.deepcopy(config)
        judged.ecg.re_record_hold_s = re_record_hold_s
    item = arrives_from_the_usb_stick(config, recording, key, judged=judged)
    assert item.hold_reason == NAME_MISMATCH, item
    return item.id


def _answered(doctor: Client, item_id: int, answer: str, page: str, done: str) -> str:
    """The doctor's `answer` ("name-right", "checked-in-name") to Today's question on E<item_id>,
    posted from `page`: the console says it is `done`. Where it leads (the page that says so)."""
    reply = doctor.post(f"/today/ecg/{item_id}/{answer}", {"csrf": csrf_of(page)})
    assert reply.status == 303 and f"done={done}" in reply.location, (reply.status, reply.location)
    return reply.location


def test_today_asks_whose_ecg_it_is_and_it_is_the_checked_in_patients(
    clinic: tuple[Config, ConsoleServer, Client],
) -> None:
    config, _, doctor = clinic
    item_id, page = _held_on_today(config, doctor, SCP, "scp")
    row = held_ecg_row(page, item_id)
    assert "心电图上的姓名是 Clark，但 SBJ-123 登记的是 张三：请确认是谁的心电图" in row, row
    assert "是 张三 的：按这个姓名发送" in row and "Clark 是对的：更正登记的姓名" in row, row
    assert "仍然发送" not in row  # the three answers, not a "send anyway" that sends Clark unsaid
    _answered(doctor, item_id, "checked-in-name", page, "assigned")
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
        assert item is not None and item.hold_until is None and item.patient is not None
        # Clark's birth date and sex (the cart's previous patient's) are not 张三's: left out
        assert item.patient["name"] == "Zhang^San=张^三" and item.patient["birth_date"] is None
        assert not item.patient["sex"]
        sent = stored_dataset(outbox, item_id)
    assert (sent.PatientID, str(sent.PatientName)) == (FILE_ID, "Zhang^San=张^三")
    assert (sent.PatientBirthDate, sent.PatientSex, sent.get("PatientAge")) == ("", "", None)
    assert f'data-held-ecg="{item_id}"' not in doctor.get("/today").body


def test_today_another_patients_ecg_is_assigned_by_the_assign_box(
    clinic: tuple[Config, ConsoleServer, Client],
) -> None:
    config, _, doctor = clinic
    item_id, page = _held_on_today(config, doctor, AECG, "aecg")
    assert "是另一位患者的：请输入他的患者编号。" in held_ecg_row(page, item_id)
    reply = doctor.post("/today/assign-ecg", {"csrf": csrf_of(page), "item_id": str(item_id), "patient_id": "MZ-77"})
    assert reply.status == 303 and "done=assigned" in reply.location, (reply.status, reply.location)
    with open_outbox(config) as outbox:
        sent = stored_dataset(outbox, item_id)
        item = outbox.get(item_id)
    assert item is not None and item.hold_until is None
    assert sent.PatientID == "MZ-77" and "Clark" not in str(sent.PatientName) and "Zhang" not in str(sent.PatientName)


def test_today_the_ecgs_name_is_right_and_the_check_in_is_corrected(
    clinic: tuple[Config, ConsoleServer, Client],
) -> None:
    config, _, doctor = clinic
    item_id = _arrives(config, SCP, "scp")
    landing = _answered(doctor, item_id, "name-right", doctor.get("/today").body, "name-corrected")
    assert "登记的姓名已更正，按心电图上的姓名发送" in doctor.get(landing).body
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
        sent = stored_dataset(outbox, item_id)
    assert item is not None and item.hold_until is None and str(sent.PatientName).rstrip("^") == "Clark"
    assert known_name(config, FILE_ID) == "Clark"  # what the session sends now


def test_a_held_stat_ecg_is_first_on_today_and_counted_apart_on_system_and_by_doctor(
    clinic: tuple[Config, ConsoleServer, Client], browser: object
) -> None:
    """A routine ECG and then a STAT one, both under "Clark" while 张三 is checked in as SBJ-123:
    on a 360 px phone (zh-CN screenshot: today-name-mismatch-phone) the STAT one is the first row
    of the held panel, its three answers within the screen; the System page and `lastmile doctor`
    count both as held for the doctor, not as waiting for the link."""
    from lastmile.doctor import Doctor
    from tests.console_browser import PHONE, by, log_in, save_screenshot, set_viewport, text_in

    config, server, doctor = clinic
    routine = _arrives(config, AECG, "aecg")
    assert doctor.post("/today/check-in", {"patient_id": FILE_ID, "name": "张三", "stat": "on"}).status == 303
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        with open_outbox(config) as outbox:
            now = dt.datetime.now(dt.timezone.utc)
            cart = file_enqueuer(
                outbox, config, lambda: context.patient_ids(now), stat=True, checked_in_name=lambda pid: "张三"
            )
            assert cart(read_ecg_file(shared_file(*SCP)), "stat")
            stat = outbox.find("stat")
            assert stat is not None and stat.hold_reason == NAME_MISMATCH
    finally:
        context.close()
    set_viewport(browser, PHONE)
    log_in(browser, server)
    text_in(browser, "#panel-held", "请确认是谁的心电图")
    rows = browser.find_elements(by("css"), "#panel-held li[data-held-ecg]")  # type: ignore[attr-defined]
    assert [r.get_attribute("data-held-ecg") for r in rows] == [str(stat.id), str(routine)]
    assert [b.text for b in rows[0].find_elements(by("css"), ".badge.red")] == ["急"], rows[0].text  # STAT
    width = browser.execute_script("return document.documentElement.clientWidth")  # type: ignore[attr-defined]
    for button in rows[0].find_elements(by("css"), "button"):
        box = button.rect
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, f"off the screen: {box}, {button.text}"
    save_screenshot(browser, "today-name-mismatch-phone")
    state = doctor.get("/system").body
    assert "另有 2 份心电图等待医生处理" in " ".join(re.sub(r"<[^>]+>", " ", state).split())
    [link] = [f for f in Doctor(config).check_queue() if f.topic == "link"]
    assert "2 more ECG(s) held for the doctor" in link.message, link.message


# -- a cart's placeholder is no name; LV is 吕 ------------------------------------------------------


@pytest.mark.parametrize(
    ("checked_in", "on_the_cart"),
    [
        ("张三", "^^^^"),
        ("张三", "UNKNOWN"),
        ("张三", "-"),
        ("张三", "ANONYMOUS"),
        ("吕明", "LV^MING"),
        ("吕明", "LU^MING"),
        ("张乐", "ZHANG^YUE"),
        ("李长青", "LI^ZHANGQING"),
    ],
    ids=[
        "carets",
        "unknown",
        "dash",
        "anonymous",
        "lv-for-lyu",
        "lu-for-lyu",
        "yue-for-le",
        "zhang-for-chang",
    ],
)
def test_a_carts_placeholder_name_or_keyboard_pinyin_is_not_another_persons(
    tmp_path: Path, checked_in: str, on_the_cart: str
) -> None:
    """A cart left without a name writes "^^^^", "UNKNOWN", "-": every ECG from it was held as
    another person's, and "its name is right" offered to rename the patient to it. Such a name is
    no name and passes, as a file without one does. 吕 typed LV (the pinyin keyboard's ü) or LU (ü
    written u) is his, and so is a name in another reading of its characters (乐 le/yue, 长
    chang/zhang): they were held (a STAT one for two minutes) as another person's. (A name in Western order,
    SAN ZHANG, is held: `test_a_cart_name_in_western_order_is_held`.)"""
    cart = pydicom.dcmread(shared_file(*DCM))
    cart.PatientName = on_the_cart
    path = tmp_path / "cart.dcm"
    cart.save_as(path)
    run = _cli(tmp_path)
    assert cli([*run, "patient", "set", FILE_ID, "--name", checked_in]) == 0
    assert cli([*run, "import", "-q", str(path)]) == 0
    with open_outbox(_config(tmp_path)) as outbox:
        (item,) = outbox.items(kind=Kind.DICOM)
    assert item.hold_until is None and NAME_MISMATCH not in item.meta["flags"], (item.hold_reason, item.meta["flags"])


def test_a_cart_name_in_western_order_is_held(tmp_path: Path) -> None:
    """ "SAN ZHANG" for 张三 checked in: held for the doctor's answer (a swap read as his let
    "Qian Li" pass for 李倩, another patient's ECG on the checked-in ID)."""
    cart = pydicom.dcmread(shared_file(*DCM))
    cart.PatientName = "SAN ZHANG"
    path = tmp_path / "cart.dcm"
    cart.save_as(path)
    run = _cli(tmp_path)
    assert cli([*run, "patient", "set", FILE_ID, "--name", "张三"]) == 0
    assert cli([*run, "import", "-q", str(path)]) == 0
    with open_outbox(_config(tmp_path)) as outbox:
        (item,) = outbox.items(kind=Kind.DICOM)
    assert item.hold_reason == NAME_MISMATCH, (item.hold_reason, item.meta["flags"])


def test_cli_assign_with_the_name_typed_in_pinyin_keeps_the_check_ins_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`patient assign E1 SBJ-123 --name "Zhang San"` for 张三 checked in as SBJ-123 is his name
    (no refusal), but the ECG went to the county under the typed pinyin alone: it goes under his
    name as checked in, characters and all."""
    run = _cli(tmp_path)
    assert cli([*run, "patient", "set", FILE_ID, "--name", "张三"]) == 0
    assert cli([*run, "import", "-q", str(shared_file(*SCP))]) == 0
    with open_outbox(_config(tmp_path)) as outbox:
        (item,) = outbox.items(kind=Kind.DICOM)
    capsys.readouterr()
    assert cli([*run, "patient", "assign", f"E{item.id}", FILE_ID, "--name", "Zhang San"]) == 0, capsys.readouterr()
    with open_outbox(_config(tmp_path)) as outbox:
        assert str(stored_dataset(outbox, item.id).PatientName) == "Zhang^San=张^三"


# -- Today: the review's cases ---------------------------------------------------------------------


def test_today_offers_no_rename_to_a_placeholder_held_before_this_version(
    clinic: tuple[Config, ConsoleServer, Client],
) -> None:
    """An ECG held for the cart's "^^^^" (as the first version held it) quoted a name of nothing
    ("心电图上的姓名是 , 但 ...") and its third button renamed 张三 to "^^^^". The row says the name
    differs without quoting nothing, offers no rename, and a rename posted anyway changes nothing."""
    config, _, doctor = clinic
    with open_outbox(config) as outbox:
        recording = read_ecg_file(shared_file(*SCP))
        assert recording.patient is not None
        placeholder = dataclasses.replace(
            recording, patient=dataclasses.replace(recording.patient, name="^^^^"), flags=(NAME_MISMATCH,)
        )
        added = enqueue_recording(outbox, placeholder, config, key="carets", checked_in_name="张三")
        assert added.item.hold_reason == NAME_MISMATCH
    item_id = added.item.id
    page = doctor.get("/today").body
    row = held_ecg_row(page, item_id)
    assert "心电图上的姓名与 SBJ-123 登记的姓名不同" in row and "心电图上的姓名是" not in row, row
    assert "是对的" not in row and 'data-answer="name-right"' not in page, row
    _name_right_renames_nobody(config, doctor, item_id, page)


def _name_right_renames_nobody(config: Config, doctor: Client, item_id: int, page: str) -> None:
    """The doctor's "Clark is right" on E<item_id> from Today's `page`: answered "too late"; SBJ-123's
    check-in keeps the name it was checked in under."""
    _answered(doctor, item_id, "name-right", page, "too-late")
    assert known_name(config, FILE_ID) == "Zhang^San=张^三"  # as checked in


def test_today_the_ecgs_name_is_right_ends_only_the_name_hold_of_an_ecg_to_record_again(
    clinic: tuple[Config, ConsoleServer, Client],
) -> None:
    """An ECG held for its name and judged "record again" (contec 0000037: 50 Hz as big as the
    ECG): Today said only the name; "Clark is right" sent it at once, the quality verdict never
    seen. The row says both; the answer corrects the name and the ECG still waits for "record
    again" or "send anyway"."""
    config, _, doctor = clinic
    noisy = read_ecg_file(shared_file(*NOISY))
    cart = dataclasses.replace(noisy, patient=Patient(FILE_ID, "Clark"))  # the cart kept Clark's entry
    held_id = _held_for_its_name(config, cart, "noisy", re_record_hold_s=600)
    page = doctor.get("/today").body
    row = held_ecg_row(page, held_id)
    assert "心电图上的姓名是 Clark" in row and "质量检查结果也是：需要重做" in row, row
    landing = _answered(doctor, held_id, "name-right", page, "name-corrected")
    assert "此心电图质量待定" in doctor.get(landing).body
    with open_outbox(config) as outbox:
        item = outbox.get(held_id)
        assert item is not None and item.hold_reason == "re-record" and item.held(time.time()), item
        assert outbox.claim(Kind.DICOM, 10, time.time()) == []  # not sent: the doctor decides its quality
        assert item.patient is not None and item.patient["birth_date"] is None  # contec gave none; none added
    assert known_name(config, FILE_ID) == "Clark"
    row = held_ecg_row(doctor.get("/today").body, held_id)
    assert "质量检查结果：需要重做" in row and "重做，不发送这份" in row and "仍然发送" in row, row


class _ForwarderTakesItFirst(OutboxHeldEcgs):
    """The console's own held ECGs over the outbox; armed, the forwarder claims the ECG right
    after the doctor's answer read it as held: its STAT hold ran out meanwhile (the race of 120 s)."""

    armed = False

    def held_ecgs(self, now: dt.datetime) -> list[HeldEcg]:
        held = super().held_ecgs(now)
        if self.armed:
            later = max(h.hold_until.timestamp() for h in held) + 1
            assert [i.id for i in self.outbox.claim(Kind.DICOM, 10, later)] == [h.item_id for h in held]
        return held


def test_today_the_ecgs_name_is_right_too_late_renames_nobody(tmp_path: Path) -> None:
    """The forwarder took the ECG (its hold over) between Today's look and the doctor's "Clark is
    right": Today said "too late: it cannot be changed", but 张三 had been renamed Clark already.
    The check-in's name is corrected only once the ECG is."""
    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0
    with open_outbox(config) as outbox:
        source = _ForwarderTakesItFirst(outbox, config)
        with running_console(config, held_ecgs=source) as server:
            doctor = Client(server.url)
            doctor.login()
            assert doctor.post("/today/check-in", {"patient_id": FILE_ID, "name": "张三"}).status == 303
            item_id, page = _held_on_today(config, doctor, SCP, "scp")
            source.armed = True
            _name_right_renames_nobody(config, doctor, item_id, page)


def test_today_the_ecgs_name_is_right_settles_the_ids_other_ecgs_held_for_that_name(
    clinic: tuple[Config, ConsoleServer, Client],
) -> None:
    """Two ECGs from one cart held for their name while 张三 is checked in as SBJ-123, both naming
    him Clark, the second judged "record again". "Clark is right" on the first renamed the check-in
    Clark, but the second still asked whose it was, offering "是 张三 的": sent so, one ID under two
    names at the county. Its name hold ends with the first's (under Clark); its quality still waits."""
    config, _, doctor = clinic
    e1 = _arrives(config, SCP, "scp")
    noisy = read_ecg_file(shared_file(*NOISY))
    cart = dataclasses.replace(noisy, patient=Patient(FILE_ID, "Clark"))
    e2 = _held_for_its_name(config, cart, "noisy", re_record_hold_s=600)
    _answered(doctor, e1, "name-right", doctor.get("/today").body, "name-corrected")
    with open_outbox(config) as outbox:
        second = outbox.get(e2)
        assert second is not None and second.patient is not None
        assert second.hold_reason == "re-record" and second.held(time.time()), second  # its quality still waits
        assert second.patient["name"].rstrip("^") == "Clark"
    row = held_ecg_row(doctor.get("/today").body, e2)
    assert "请确认是谁的心电图" not in row and "张三" not in row and "重做，不发送这份" in row, row


def test_today_another_ecg_held_for_its_name_names_the_id_as_corrected(
    clinic: tuple[Config, ConsoleServer, Client],
) -> None:
    """From one cart, E1 names SBJ-123 Clark, E3 Lee, while 张三 is checked in as SBJ-123. "Clark is
    right" on E1 renamed the check-in Clark, but E3 still said "登记的是 张三" (the name stored when
    it was held) and "是 张三 的" sent it under 张三: one ID, two names at the county. It says and
    sends the ID's name as corrected."""
    config, _, doctor = clinic
    e1 = _arrives(config, SCP, "scp")
    aecg = read_ecg_file(shared_file(*AECG))
    assert aecg.patient is not None
    e3 = _held_for_its_name(
        config, dataclasses.replace(aecg, patient=dataclasses.replace(aecg.patient, name="Lee")), "lee"
    )
    page = doctor.get("/today").body
    assert "SBJ-123 登记的是 张三" in held_ecg_row(page, e3)
    _answered(doctor, e1, "name-right", page, "name-corrected")
    assert known_name(config, FILE_ID).rstrip("^") == "Clark"
    page = doctor.get("/today").body
    row = held_ecg_row(page, e3)
    assert "心电图上的姓名是 Lee，但 SBJ-123 登记的是 Clark" in row and "是 Clark 的：按这个姓名发送" in row, row
    assert "张三" not in row, row
    _answered(doctor, e3, "checked-in-name", page, "assigned")
    with open_outbox(config) as outbox:
        sent = stored_dataset(outbox, e3)
    assert (sent.PatientID, str(sent.PatientName).rstrip("^")) == (FILE_ID, "Clark")


def on_the_screen_and_apart(browser: Any, row: Any, css: str, *, apart_but: str = "") -> list[tuple[str, dict]]:
    """The page no wider than the screen; each of the `row`'s elements matching `css` within it,
    and none overlapping another (those of tag `apart_but` left out of that). Their names and boxes."""
    from tests.console_browser import by

    width = browser.execute_script("return document.documentElement.clientWidth")
    wide = browser.execute_script("return document.documentElement.scrollWidth")
    assert wide <= width, f"the page is {wide} px wide on a {width} px screen"
    boxes = [
        (e.tag_name + " " + (e.text or e.get_attribute("name") or ""), e.rect)
        for e in row.find_elements(by("css"), css)
    ]
    for what, box in boxes:
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, f"off the screen: {what} {box}"
    controls = [(w, b) for w, b in boxes if not (apart_but and w.startswith(apart_but))]
    for (a, ra), (b, rb) in itertools.combinations(controls, 2):
        apart = (
            ra["x"] + ra["width"] <= rb["x"]
            or rb["x"] + rb["width"] <= ra["x"]
            or ra["y"] + ra["height"] <= rb["y"]
            or rb["y"] + rb["height"] <= ra["y"]
        )
        assert apart, f"{a} {ra} overlaps {b} {rb}"
    return boxes


@pytest.mark.parametrize("size", [(360, 640), (1280, 800)], ids=["phone", "desktop"])
def test_todays_name_question_in_english_is_english_and_nothing_in_it_is_cut_or_overlaps(
    clinic: tuple[Config, ConsoleServer, Client], browser: object, size: tuple[int, int]
) -> None:
    """The name question on Today in English, on a 360 px phone and a 1280 px screen (screenshots:
    today-name-mismatch-en-phone, -desktop): every word of it English but the names, each answer
    (button, field, label) within the screen and clear of the others, nothing wider than the page."""
    from tests.console_browser import by, choose_language, log_in, save_screenshot, set_viewport, text_in

    config, server, _ = clinic
    item_id = _arrives(config, SCP, "scp")
    set_viewport(browser, size)
    log_in(browser, server)
    choose_language(browser, "en")
    text_in(browser, "#panel-held", "say whose ECG it is")
    row = browser.find_element(by("css"), f'#panel-held li[data-held-ecg="{item_id}"]')  # type: ignore[attr-defined]
    words = row.text.replace("张三", "")  # the checked-in name, as checked in; everything else English
    assert not re.search(r"[\u3000-\u9fff\uff00-\uffef]", words), row.text
    assert "Clark" in words and "SBJ-123" in words, row.text
    boxes = on_the_screen_and_apart(browser, row, "button, input:not([type=hidden]), label")
    assert len(boxes) >= 5, boxes  # three answers and the other patient's field with its label
    # each answer apart from the next (the field's label touched the button above: read as its caption)
    answers = row.find_elements(by("css"), "form")
    assert [f.get_attribute("action").rsplit("/", 1)[1] for f in answers] == [
        "checked-in-name",
        "assign-ecg",
        "name-right",
        "re-record",
    ]
    label = row.find_element(by("css"), "form.assign label").text
    assert label == "Another patient's: type his patient ID.", label  # says what the field is for
    for above, below in itertools.pairwise(answers):
        controls = "button, input:not([type=hidden]), label"
        bottom = max(c.rect["y"] + c.rect["height"] for c in above.find_elements(by("css"), controls))
        top = min(c.rect["y"] for c in below.find_elements(by("css"), controls))
        assert top - bottom >= 8, f"{below.get_attribute('action')} {top - bottom:.0f} px under the answer above"
    save_screenshot(browser, f"today-name-mismatch-en-{'phone' if size[0] < 600 else 'desktop'}")


# -- a patient card scanned at the ECG cart ------------------------------------------------------------

CARD = PATIENT_CARD_SCAN.strip().decode()  # the ID a card carries, and no name (devices.scanner.PatientScanned)


@contextlib.contextmanager
def _card_scanner(tmp_path: Path) -> Iterator[tuple[PtyDevice, Running]]:
    """The acquire service's serial part reading a card scanner on a pty, on the data dir of
    `_cli(tmp_path)` and of `console_config(tmp_path / "data")`."""
    scanner = PtyDevice(tmp_path / "usb-scanner")
    gateway = Running(tmp_path, [{"name": "desk-scanner", "match": str(scanner.link_path), "profile": "scanner"}])
    try:
        wait_for(lambda: all(s.connected for s in gateway.service.statuses()), timeout=30)
        yield scanner, gateway
    finally:
        gateway.close()


def _scanned(scanner: PtyDevice, gateway: Running, card: str) -> str:
    """`card` scanned: the name its check-in gave the current patient."""
    scanner.write(card.encode() + b"\r\n")
    wait_for(lambda: getattr(gateway.patients.current(gateway.now()), "patient_id", None) == card, timeout=30)
    current = gateway.patients.current(gateway.now())
    assert current is not None
    return current.name


def _card_ecg(tmp_path: Path, patient_id: str, name: str) -> int:
    """The cart's DICOM ECG recorded under `patient_id` and `name`, imported as from its stick
    (`lastmile import`): the outbox item's id."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cart's malformed UIDs
        ecg = pydicom.dcmread(shared_file(*DCM))
        ecg.PatientID, ecg.PatientName, ecg.SOPInstanceUID = patient_id, name, pydicom.uid.generate_uid()
        path = tmp_path / f"{ecg.SOPInstanceUID}.dcm"
        ecg.save_as(path)
    assert cli([*_cli(tmp_path), "import", "-q", str(path)]) == 0
    with open_outbox(_config(tmp_path)) as outbox:
        return max(item.id for item in outbox.items(kind=Kind.DICOM))


def _hold_of(tmp_path: Path, item_id: int) -> str | None:
    with open_outbox(_config(tmp_path)) as outbox:
        item = outbox.get(item_id)
        assert item is not None
        return item.hold_reason


@contextlib.contextmanager
def _clarks_ecg_under_zhangs_card(tmp_path: Path) -> Iterator[tuple[ConsoleServer, Client, str, int]]:
    """张三 checked in at the desk under his card's ID, 李四 next; then 张三's card scanned at the
    ECG cart, and the cart's ECG under that ID naming Clark (the previous patient's name left on
    the cart) imported. The console, the doctor logged in to it, the name the scan's check-in
    took, and the ECG's outbox item id."""
    config = console_config(tmp_path / "data")
    with running_console(config) as server, _card_scanner(tmp_path) as (scanner, gateway):
        doctor = Client(server.url)
        doctor.login()
        assert doctor.post("/today/check-in", {"patient_id": CARD, "name": "张三"}).status == 303
        assert doctor.post("/today/check-in", {"patient_id": "P-LI", "name": "李四"}).status == 303
        checked_in_as = _scanned(scanner, gateway, CARD)
        yield server, doctor, checked_in_as, _card_ecg(tmp_path, CARD, "Clark")


def test_a_card_scanned_takes_the_name_checked_in_for_its_id_today_and_an_ecg_under_another_is_held(
    tmp_path: Path,
) -> None:
    """张三 was checked in at the desk under his card's ID, 李四 came next; then 张三's card is
    scanned at the ECG cart. A card carries no name, so the check-in had none, and the cart's ECG
    naming that ID "Clark" (the previous patient's name left on the cart) passed the name check:
    one ID under two names at the county. The check-in takes 张三: Clark's is held
    "name-mismatch", Today asks whose it is - saying the name was checked in earlier, not typed
    now - and 张三's passes."""
    with _clarks_ecg_under_zhangs_card(tmp_path) as (_, doctor, checked_in_as, clark):
        assert _hold_of(tmp_path, clark) == NAME_MISMATCH
        assert checked_in_as == "Zhang^San=张^三"
        row = held_ecg_row(doctor.get("/today").body, clark)
        assert (
            f"心电图上的姓名是 Clark，但 {CARD} 之前登记时的姓名是 张三（这次登记没有输入姓名）：请确认是谁的心电图"
            in row
        ), row
        assert "是 张三 的：按这个姓名发送" in row, row
        assert _hold_of(tmp_path, _card_ecg(tmp_path, CARD, "Zhang^San=张^三")) is None


@pytest.mark.parametrize("language", ["zh", "en"])
@pytest.mark.parametrize("size", [(360, 640), (1280, 800)], ids=["phone", "desktop"])
def test_the_question_on_a_name_a_card_took_is_read_whole_on_a_phone_and_a_screen(
    tmp_path: Path, browser: object, size: tuple[int, int], language: str
) -> None:
    """Today's question on the name a card took from an earlier check-in (张三, checked in at the
    desk; the cart's ECG says Clark), in zh-CN and English, on a 360 px phone and a 1280 px screen
    (screenshots: today-inherited-name-<language>-<phone|desktop>): its words in the page's
    language but the names, which name is the ECG's and which the check-in's, each answer within the
    screen and clear of the others, nothing wider than the page. The row's headline said "E1 Clark
    <ID>" above the question: the name in doubt, in bold beside the ID, as if it were the patient's."""
    from tests.console_browser import by, choose_language, log_in, save_screenshot, set_viewport, text_in

    with _clarks_ecg_under_zhangs_card(tmp_path) as (server, _, checked_in_as, clark):
        assert checked_in_as == "Zhang^San=张^三"
        set_viewport(browser, size)
        log_in(browser, server)
        if language == "en":
            choose_language(browser, "en")
        asked = "say whose ECG it is" if language == "en" else "请确认是谁的心电图"
        text_in(browser, "#panel-held", asked)
        row = browser.find_element(by("css"), f'#panel-held li[data-held-ecg="{clark}"]')  # type: ignore[attr-defined]
        question = row.find_element(by("css"), "[data-name-mismatch]").text
        # the ECG's name only in the question that says it is the ECG's: in bold beside the ID
        # above it, it read as the patient's
        headline = row.find_element(by("css"), "p").text.split(question)[0]
        assert "Clark" not in headline and CARD in headline, headline
        # the question begins its own line (it ran on after the device's name, breaking 心电|图 on a phone)
        starts = browser.execute_script(  # type: ignore[attr-defined]
            "return arguments[0].getClientRects()[0].left", row.find_element(by("css"), "[data-name-mismatch]")
        )
        assert starts == row.find_element(by("css"), "p").rect["x"], (starts, headline)
        if language == "en":
            assert "Clark" in question and "checked in earlier as 张三" in question, question
            assert not re.search(r"[\u3000-\u9fff\uff00-\uffef]", row.text.replace("张三", "")), row.text
        else:
            assert f"心电图上的姓名是 Clark，但 {CARD} 之前登记时的姓名是 张三" in question, question
        # the names (strong) on the screen too; only the controls must be apart
        on_the_screen_and_apart(browser, row, "button, input:not([type=hidden]), label, strong", apart_but="strong")
        save_screenshot(browser, f"today-inherited-name-{language}-{'phone' if size[0] < 600 else 'desktop'}")


@contextlib.contextmanager
def _a_daughters_ecg_held_under_her_fathers_card(tmp_path: Path) -> Iterator[tuple[Client, Running, DeviceUsers, int]]:
    """A father, 李四, checked in under the family's card ID, his cuff's user 1 mapped to it; 王五
    next; then the card scanned for his daughter takes 李四, and the cart's ECG under 王芳 (pinyin,
    as the cart writes it) is held for its name. The doctor logged in to the console, the card
    scanner's gateway, the device users and the held ECG's outbox item id."""
    config = console_config(tmp_path / "data")
    with running_console(config) as server, _card_scanner(tmp_path) as (scanner, gateway):
        doctor = Client(server.url)
        doctor.login()
        assert doctor.post("/today/check-in", {"patient_id": CARD, "name": "李四"}).status == 303
        users = DeviceUsers(gateway.patients.db)
        users.map_user("C0:26:DA:01:02:03", 1, CARD, now=gateway.now(), name="Li^Si=李^四")
        assert doctor.post("/today/check-in", {"patient_id": "P-WU", "name": "王五"}).status == 303
        assert _scanned(scanner, gateway, CARD) == "Li^Si=李^四"
        fang = _card_ecg(tmp_path, CARD, "Wang^Fang")  # the cart writes pinyin
        assert _hold_of(tmp_path, fang) == NAME_MISMATCH
        yield doctor, gateway, users, fang


def test_an_answer_on_a_name_a_card_took_renames_nobodys_device_users(tmp_path: Path) -> None:
    """Review C (3): a father, 李四, checked in under the family's card ID, his cuff's user 1 mapped to
    it. His daughter 王芳 comes with the same card: its check-in takes 李四, and the cart's ECG under
    王芳 is held. "王芳 is right" corrected the check-in's name and renamed the father's cuff user
    to 王芳 for good, unasked (a typed check-in asks which name first). Now Today says it corrects
    this check-in only: the ECG goes as 王芳, the session is 王芳's, the cuff stays 李四's."""
    with _a_daughters_ecg_held_under_her_fathers_card(tmp_path) as (doctor, gateway, users, fang):
        page = doctor.get("/today").body
        row = held_ecg_row(page, fang)
        reply = doctor.post(f"/today/ecg/{fang}/name-right", {"csrf": csrf_of(page)})
        assert reply.status == 303 and "done=name-corrected" in reply.location, (reply.status, reply.location)
        assert _hold_of(tmp_path, fang) is None
        current = gateway.patients.current(gateway.now())
        assert current is not None and current.name == "Wang^Fang"
        cuff = users.whose("C0:26:DA:01:02:03", 1)
        assert cuff is not None and cuff.patient_name == "Li^Si=李^四"
        assert "Wang Fang 是对的：只更正这次登记的姓名（设备用户的姓名不变）" in row, row
        # review D (1): the button's word holds after the session too - his readings go as 李四,
        # not as Wang Fang for the next 24 h (the correction was no name said for the card's ID)
        assert doctor.post("/today/check-in", {"patient_id": "P-WU", "name": "王五"}).status == 303
        for hours in (0, 12):
            later = gateway.now() + dt.timedelta(hours=hours)
            assert mapped_name(cuff, gateway.patients, later) == "Li^Si=李^四", hours


def test_a_taken_name_cleared_is_neither_offered_nor_given_to_the_device_users(tmp_path: Path) -> None:
    """Review D (2): the card takes 李四 for the daughter, her ECG (Wang Fang) is held, and the doctor
    presses 清除姓名. Today still said "登记的是 李四" (cleared; nobody typed it), offered "It is 李四's: send it
    under this name", and "Wang Fang is right" renamed the father's cuff user to Wang Fang for good. Cleared, the
    name is neither worded nor offered, and the answer renames no device user."""
    with _a_daughters_ecg_held_under_her_fathers_card(tmp_path) as (doctor, gateway, users, fang):
        page = doctor.get("/today").body
        cleared = doctor.post(
            "/today/check-in",
            {"csrf": csrf_of(page), "patient_id": CARD, "clear": "name", "shown_patient_id": CARD, "confirmed": "yes"},
        )
        assert cleared.status == 303, cleared.status
        current = gateway.patients.current(gateway.now())
        assert current is not None and current.patient_id == CARD and current.name == ""
        page = doctor.get("/today").body
        row = held_ecg_row(page, fang)
        assert "李四" not in row and 'data-answer="checked-in-name"' not in row, row
        assert "Wang Fang 是对的：只更正这次登记的姓名（设备用户的姓名不变）" in row, row
        assert doctor.post(f"/today/ecg/{fang}/checked-in-name", {"csrf": csrf_of(page)}).status == 303
        assert _hold_of(tmp_path, fang) == NAME_MISMATCH  # a stale form: no name to send it under
        assert doctor.post(f"/today/ecg/{fang}/name-right", {"csrf": csrf_of(page)}).status == 303
        assert _hold_of(tmp_path, fang) is None
        cuff = users.whose("C0:26:DA:01:02:03", 1)
        assert cuff is not None and cuff.patient_name == "Li^Si=李^四"
        assert mapped_name(cuff, gateway.patients, gateway.now()) == "Li^Si=李^四"


def test_a_card_whose_id_only_a_cuff_mapping_names_is_checked_in_nameless(tmp_path: Path) -> None:
    """Review C (1, 2): a device user's mapping may be months old, made during a typo'd ID, or its
    name cleared since: it names no check-in. A card whose ID nobody checked in with a name today
    stays nameless, and the cart's ECG under that ID passes (as on main)."""
    with _card_scanner(tmp_path) as (scanner, gateway):
        DeviceUsers(gateway.patients.db).map_user(
            "C0:26:DA:01:02:03", 2, CARD, now=gateway.now(), name="Zhang^San=张^三"
        )
        gateway.patients.set_patient("P-LI", "Li^Si=李^四", now=gateway.now())
        assert _scanned(scanner, gateway, CARD) == ""
        assert _hold_of(tmp_path, _card_ecg(tmp_path, CARD, "Clark")) is None


def test_a_card_never_seen_is_checked_in_nameless_and_its_ecg_passes_under_any_name(tmp_path: Path) -> None:
    """A card whose ID the clinic knows no name for (李四 checked in under another ID): its
    check-in has none, and the cart's ECG under that ID passes whatever name it carries."""
    with _card_scanner(tmp_path) as (scanner, gateway):
        gateway.patients.set_patient("P-LI", "Li^Si=李^四", now=gateway.now())
        assert _scanned(scanner, gateway, CARD) == ""
        assert _hold_of(tmp_path, _card_ecg(tmp_path, CARD, "Clark")) is None
