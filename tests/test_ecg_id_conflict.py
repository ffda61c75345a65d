"""An ECG whose file gives a sex or birth date its resident ID contradicts (the cart still had the
previous patient's details typed in) is held for the doctor as one held for its name is
("patient-id-conflict", STAT ones too, as short), Today says so, and his answer decides what the
county gets: the ID's sex and birth date, or another patient.

A real file: ecgtoolkit's DICOM ECG, its patient made the one of the walkthrough (REV-R 4): 李建国,
resident ID 110101196505050017 (a man born 1965-05-05), the cart's fields saying F, born 1971."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import io
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from devices.identity import Patient
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config
from lastmile.console.service import ConsoleServer
from lastmile.data_dir import open_outbox
from lastmile.ecg.holds import DAMAGED, ID_CONFLICT, NAME_MISMATCH, held_ecgs
from lastmile.ecg.intake import (
    STAT_NAME_HOLD_S,
    assign_held_ecg,
    clinic_patient,
    file_enqueuer,
    read_ecg_file,
)
from tests.cart_files import arrives_from_the_usb_stick, stored_dataset
from tests.conftest import shared_file
from tests.console_harness import Client, console_config, csrf_of, held_ecg_row, running_console
from tests.lan_cart import lan_receiver, storescu_as_the_cart
from uploader.outbox import Hold, ItemState, Kind

RESIDENT_ID = "110101196505050017"  # a man born 1965-05-05
OTHER_ID = "110101198001010010"  # a man born 1980-01-01
DCM = ("ecg", "dicom", "ecgtoolkit_Example.dcm")
# what the county reader reads with the study when nobody answered (Patient Comments)
UNANSWERED = (
    f"心电图上的性别/出生日期与身份证号不符，医生未确认：心电图上是 女，1971-01-01；身份证号 {RESIDENT_ID} 是 男，1965-05-05。"
    " / The ECG's sex/birth date contradicts the resident ID, not confirmed by the doctor: the ECG says F, 1971-01-01;"
    f" ID {RESIDENT_ID} says M, 1965-05-05."
)
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the cart's malformed UIDs


def _cart_file(tmp_path: Path, *, sex: str = "F", birth: str = "19710101", name: str = "Li^Jianguo") -> Path:
    """The real DICOM ECG with the patient as the cart wrote it: his ID, the previous patient's sex and birth date."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(shared_file(*DCM))
        ds.PatientID = RESIDENT_ID
        ds.PatientName = name
        ds.PatientSex = sex
        ds.PatientBirthDate = birth
        if "PatientAge" in ds:
            del ds.PatientAge
        path = tmp_path / f"cart-{sex}-{birth}.dcm"
        ds.save_as(path)
    return path


def _arrives(config: Config, path: Path, key: str, *, stat: bool = False) -> int:
    """The cart's file arrives as from its USB stick while 李建国 is checked in. Its item."""
    return arrives_from_the_usb_stick(config, read_ecg_file(path), key, stat=stat).id


def _the_doctor_answers(doctor: Client, page: str, path: str, fields: dict[str, str] | None = None) -> None:
    """The doctor answers the held ECG's question on Today's `page` (`path`, the form's `fields`):
    the answer is taken, the ECG assigned."""
    reply = doctor.post(path, {"csrf": csrf_of(page), **(fields or {})})
    assert reply.status == 303 and "done=assigned" in reply.location, (reply.status, reply.location)


@pytest.fixture
def clinic(tmp_path: Path) -> Iterator[tuple[Config, ConsoleServer, Client]]:
    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0  # his details are the subject, not the file's quality
    with running_console(config) as server:
        doctor = Client(server.url)
        doctor.login()
        assert doctor.post("/today/check-in", {"patient_id": RESIDENT_ID, "name": "李建国"}).status == 303
        yield config, server, doctor


def test_an_ecg_whose_sex_and_birth_date_contradict_its_id_is_held_and_said_on_today(
    clinic: tuple[Config, ConsoleServer, Client], tmp_path: Path
) -> None:
    """It went at once as a woman born 1971 under a man's ID, and nothing said so: now it waits,
    the forwarder does not take it, and Today says what the ECG and the ID each say."""
    config, _, doctor = clinic
    before = time.time()
    item_id = _arrives(config, _cart_file(tmp_path), "cart")
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
        assert item is not None and item.hold_reason == ID_CONFLICT, (item.hold_reason, item.meta["flags"])
        hold_s = config.patient.unassigned_ecg_hold_s
        assert item.hold_until is not None and before + hold_s <= item.hold_until <= time.time() + hold_s
        assert [i.id for i in held_ecgs(outbox, time.time())] == [item_id]
        assert outbox.claim(item.kind, 10, time.time()) == []  # the forwarder does not take it
    row = held_ecg_row(doctor.get("/today").body, item_id)
    assert "心电图上的性别/出生日期与身份证号不符。" in row, row
    assert f"心电图上是 女，1971-01-01；身份证号 {RESIDENT_ID} 是 男，1965-05-05。" in row, row
    # the cart's Manufacturer "Unknown" is not a maker: the doctor reads its model alone
    assert " · ELI250 " in row and "Unknown" not in row, row
    assert "身份证号是对的：按身份证号的性别和出生日期发送" in row and "是另一位患者的：请输入他的患者编号。" in row
    assert "仍然发送" not in row and "是对的：更正登记的姓名" not in row  # no answer that sends the file's unsaid
    assert " · ELI250 " in row and "Unknown" not in row, row  # the cart's "Unknown" maker is none


def test_an_ecg_held_for_its_id_and_judged_record_again_says_both(
    clinic: tuple[Config, ConsoleServer, Client],
) -> None:
    """Its sex and birth date against the ID, and the quality check's "record again" (contec
    0000037: 50 Hz as big as the ECG): the row says both, as one held for its name does."""
    config, _, doctor = clinic
    noisy = read_ecg_file(shared_file("ecg", "contec", "0000037.ECG"))
    cart = dataclasses.replace(noisy, patient=Patient(RESIDENT_ID, "Li^Jianguo", dt.date(1971, 1, 1), "F"))
    judged = copy.deepcopy(config)
    judged.ecg.re_record_hold_s = 600
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        with open_outbox(config) as outbox:
            now = dt.datetime.now(dt.timezone.utc)
            enqueue = file_enqueuer(outbox, judged, lambda: context.patient_ids(now))
            assert enqueue(cart, "noisy")
            item = outbox.find("noisy")
            assert item is not None and item.hold_reason == ID_CONFLICT, item
            assert item.meta["quality"]["verdict"] == "re-record", item.meta["quality"]
    finally:
        context.close()
    row = held_ecg_row(doctor.get("/today").body, item.id)
    assert "心电图上的性别/出生日期与身份证号不符。" in row and "质量检查结果也是：需要重做。" in row, row


def test_the_doctors_id_is_right_sends_the_ids_sex_and_birth_date(
    clinic: tuple[Config, ConsoleServer, Client], tmp_path: Path
) -> None:
    config, _, doctor = clinic
    item_id = _arrives(config, _cart_file(tmp_path), "cart")
    _the_doctor_answers(doctor, doctor.get("/today").body, f"/today/ecg/{item_id}/id-values")
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
        assert item is not None and item.hold_until is None and item.patient is not None
        assert (item.patient["sex"], item.patient["birth_date"]) == ("M", "1965-05-05")
        assert not any(f.startswith(ID_CONFLICT) for f in item.meta["flags"])
        sent = stored_dataset(outbox, item_id)
    assert (sent.PatientID, sent.PatientSex, sent.PatientBirthDate) == (RESIDENT_ID, "M", "19650505")
    assert sent.PatientAge.endswith("Y") and sent.PatientAge != "055Y"  # his age, not the previous patient's
    assert "PatientComments" not in sent  # answered: nothing left to tell the reader
    assert f'data-held-ecg="{item_id}"' not in doctor.get("/today").body


def test_another_patients_ecg_goes_with_that_patients_details(
    clinic: tuple[Config, ConsoleServer, Client], tmp_path: Path
) -> None:
    config, _, doctor = clinic
    item_id = _arrives(config, _cart_file(tmp_path), "cart")
    assign = {"item_id": str(item_id), "patient_id": OTHER_ID}
    _the_doctor_answers(doctor, doctor.get("/today").body, "/today/assign-ecg", assign)
    with open_outbox(config) as outbox:
        sent = stored_dataset(outbox, item_id)
    assert (sent.PatientID, sent.PatientSex, sent.PatientBirthDate) == (OTHER_ID, "M", "19800101")
    assert "PatientComments" not in sent


def test_a_stat_ecg_with_a_contradicted_sex_is_held_as_short_as_for_its_name(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        context.set_patient(RESIDENT_ID, name="李建国", now=dt.datetime.now(dt.timezone.utc))
    finally:
        context.close()
    before = time.time()
    item_id = _arrives(config, _cart_file(tmp_path, birth="19650505"), "stat", stat=True)
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
        assert item is not None and item.priority == 0 and item.hold_reason == ID_CONFLICT, item
        assert item.meta["flags"].count(f"{ID_CONFLICT}:sex") == 1
        assert f"{ID_CONFLICT}:birth-date" not in item.meta["flags"]
        assert item.hold_until is not None
        assert before + STAT_NAME_HOLD_S <= item.hold_until <= time.time() + STAT_NAME_HOLD_S


def test_a_file_agreeing_with_its_id_or_giving_no_sex_is_not_held(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0
    agreeing = _arrives(config, _cart_file(tmp_path, sex="M", birth="19650505"), "agreeing")
    unsaid = _arrives(config, _cart_file(tmp_path, sex="", birth=""), "unsaid")
    with open_outbox(config) as outbox:
        for item_id in (agreeing, unsaid):
            item = outbox.get(item_id)
            assert item is not None and item.hold_until is None, item
        sent = stored_dataset(outbox, unsaid)
    assert (sent.PatientSex, sent.PatientBirthDate) == ("M", "19650505")  # the ID's, as before


def test_the_ecgs_name_is_right_keeps_the_files_sex_and_birth_date_and_asks_the_id_next(
    clinic: tuple[Config, ConsoleServer, Client], tmp_path: Path
) -> None:
    """A file with both another name and a sex/birth date its ID contradicts: Today asks the name
    first. "The ECG's name is right" answered the name only: it sent the ID's sex and birth date
    (never shown to him) and dropped the conflict. Now the file's stand, flagged, and the ECG
    waits for the ID's question; "the ID is right" then sends the ID's."""
    config, _, doctor = clinic
    item_id = _arrives(config, _cart_file(tmp_path, name="Wang^Fang"), "both")
    page = doctor.get("/today").body
    assert "身份证号是对的" not in held_ecg_row(page, item_id)  # the name's question comes first
    reply = doctor.post(f"/today/ecg/{item_id}/name-right", {"csrf": csrf_of(page)})
    assert reply.status == 303, (reply.status, reply.location)
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
        assert item is not None and item.patient is not None
        assert (item.patient["name"], item.patient["sex"], item.patient["birth_date"]) == (
            "Wang^Fang",
            "F",
            "1971-01-01",
        )
        assert {f"{ID_CONFLICT}:sex", f"{ID_CONFLICT}:birth-date"} <= set(item.meta["flags"]), item.meta["flags"]
        assert item.hold_reason == ID_CONFLICT and item.held(time.time()), (item.hold_reason, item.hold_until)
        sent = stored_dataset(outbox, item_id)
    assert (str(sent.PatientName), sent.PatientSex, sent.PatientBirthDate) == ("Wang^Fang", "F", "19710101")
    assert sent.PatientComments == UNANSWERED  # the ID's question still open: it would go so
    page = doctor.get("/today").body
    assert "身份证号是对的：按身份证号的性别和出生日期发送" in held_ecg_row(page, item_id)
    _the_doctor_answers(doctor, page, f"/today/ecg/{item_id}/id-values")
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
        assert item is not None and item.hold_until is None
        assert not any(f.startswith(ID_CONFLICT) for f in item.meta["flags"])
        sent = stored_dataset(outbox, item_id)
    assert (str(sent.PatientName), sent.PatientSex, sent.PatientBirthDate) == ("Wang^Fang", "M", "19650505")
    assert "PatientComments" not in sent


def test_a_carts_lan_ecg_contradicting_its_id_is_held_and_the_id_is_right_sends_the_ids(
    clinic: tuple[Config, ConsoleServer, Client], tmp_path: Path
) -> None:
    """The same cart sending over the LAN (DICOM C-STORE, REV-H 1): it went at once as a woman
    born 1971 under his ID, unflagged. Now held and asked as a file is; "the ID is right" writes
    the ID's sex and birth date into the cart's object, its UIDs the cart's."""
    config, _, doctor = clinic
    path = _cart_file(tmp_path)
    with open_outbox(config) as outbox:
        with lan_receiver(
            outbox,
            RESIDENT_ID,
            lambda pid: "李建国" if pid == RESIDENT_ID else "",
            patient_hold_s=config.patient.unassigned_ecg_hold_s,
        ) as receiver:
            storescu_as_the_cart(receiver.port, path)
        (item,) = outbox.items(kind=Kind.DICOM)
        assert item.hold_reason == ID_CONFLICT and item.held(time.time()), (item.hold_reason, item.meta["flags"])
        assert {f"{ID_CONFLICT}:sex", f"{ID_CONFLICT}:birth-date"} <= set(item.meta["flags"])
        assert outbox.claim(Kind.DICOM, 10, time.time()) == []
    page = doctor.get("/today").body
    row = held_ecg_row(page, item.id)
    # the cart's own birth date as a file's reads: it said 19710101, as the cart's object spells it
    assert f"心电图上是 女，1971-01-01；身份证号 {RESIDENT_ID} 是 男，1965-05-05。" in row, row
    # the cart's Manufacturer "Unknown" is not a maker: the doctor reads its model alone
    assert " · ELI250 " in row and "Unknown" not in row, row
    _the_doctor_answers(doctor, page, f"/today/ecg/{item.id}/id-values")
    with open_outbox(config) as outbox:
        decided = outbox.get(item.id)
        assert decided is not None and decided.hold_until is None
        assert not any(f.startswith(ID_CONFLICT) for f in decided.meta["flags"])
        sent = stored_dataset(outbox, item.id)
    cart = pydicom.dcmread(path)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
        assert sent.get(keyword) == cart.get(keyword), keyword
    assert (sent.PatientSex, sent.PatientBirthDate) == ("M", "19650505") and "PatientComments" not in sent
    # the cart wrote his name in letters: his characters go with it, as a file's do (REV-H 1)
    assert str(sent.PatientName) == "Li^Jianguo=李^建国" and decided.patient is not None
    assert decided.patient["name"] == "Li^Jianguo=李^建国"


def test_a_lan_ecg_with_another_name_too_keeps_the_carts_values_when_its_name_is_right(tmp_path: Path) -> None:
    """Over the LAN, another name and a contradicted sex/birth date: held for its name first;
    "Wang Fang is right" keeps the cart's F/1971, flagged, held for the ID; then the ID's answer."""
    config = console_config(tmp_path / "data")
    path = _cart_file(tmp_path, name="Wang^Fang")
    with open_outbox(config) as outbox:
        with lan_receiver(outbox, RESIDENT_ID, lambda pid: "李建国", patient_hold_s=900.0) as receiver:
            storescu_as_the_cart(receiver.port, path)
        (item,) = outbox.items(kind=Kind.DICOM)
        assert item.hold_reason == NAME_MISMATCH, (item.hold_reason, item.meta["flags"])
        now = dt.datetime.now(dt.timezone.utc)
        named = assign_held_ecg(outbox, item.id, Patient(RESIDENT_ID, "Wang^Fang"), now=now)
        assert named.hold_reason == ID_CONFLICT and named.held(time.time()), (named.hold_reason, named.hold_until)
        assert f"{ID_CONFLICT}:sex" in named.meta["flags"]
        sent = stored_dataset(outbox, item.id)
        assert (str(sent.PatientName), sent.PatientSex, sent.PatientBirthDate) == ("Wang^Fang", "F", "19710101")
        assert sent.PatientComments == UNANSWERED
        decided = assign_held_ecg(outbox, item.id, clinic_patient(RESIDENT_ID, "Wang^Fang", config), now=now)
        assert decided.hold_until is None and not any(f.startswith(ID_CONFLICT) for f in decided.meta["flags"])
        sent = stored_dataset(outbox, item.id)
    assert (str(sent.PatientName), sent.PatientSex, sent.PatientBirthDate) == ("Wang^Fang", "M", "19650505")
    assert "PatientComments" not in sent


def test_a_lan_ecg_in_pinyin_gets_the_check_ins_characters_and_a_resend_is_the_same_item(tmp_path: Path) -> None:
    """His ECG over the LAN, "Li^Jianguo" on the cart, 李建国 checked in: it went in letters only
    (a file got his characters): now as "Li^Jianguo=李^建国", and the cart's resend is no new content."""
    config = console_config(tmp_path / "data")
    path = _cart_file(tmp_path, sex="M", birth="19650505")
    with open_outbox(config) as outbox:
        with lan_receiver(outbox, RESIDENT_ID, lambda pid: "李建国", patient_hold_s=900.0) as receiver:
            storescu_as_the_cart(receiver.port, path)
            (item,) = outbox.items(kind=Kind.DICOM)
            storescu_as_the_cart(receiver.port, path)  # the cart's retry
        (again,) = outbox.items(kind=Kind.DICOM)
        assert item.hold_until is None and again.sha256 == item.sha256
        sent = stored_dataset(outbox, item.id)
    assert str(sent.PatientName) == "Li^Jianguo=李^建国" and sent.SpecificCharacterSet == "ISO_IR 192"
    assert item.patient is not None and item.patient["name"] == "Li^Jianguo=李^建国"


def _cut_inside_its_annotations(path: Path) -> bytes:
    """The cart's file (Explicit VR Little Endian, sent as it is) cut short inside its Waveform
    Annotation Sequence, in the middle of an item's Referenced Waveform Channels (a write
    interrupted on the cart): a valid header, the patient whole, a sequence that ends mid-value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        written = io.BytesIO()
        ds.save_as(written, implicit_vr=False, little_endian=True)
    data = written.getvalue()
    annotations = data.find(b"\x40\x00\x20\xb0SQ")  # (0040,B020)
    channels = data.find(b"\x40\x00\xb0\xa0US", annotations)  # (0040,A0B0) in its first item
    assert 0 < annotations < channels
    return data[: channels + 8 + 3]  # 3 of its 4 bytes


def test_a_cut_short_lan_ecg_in_pinyin_is_kept_as_the_cart_sent_it_and_nothing_after_it_is_lost(
    tmp_path: Path,
) -> None:
    """His ECG in pinyin, cut short inside a sequence: the gateway read it a second time to add his
    characters, outside the guard that forwards an unreadable object as written, and the error
    came out of the store: the cart was told "out of resources", sent it again, the same again,
    never kept. Now it is kept as the cart wrote it (Success: one item, its name the cart's), its
    resend is that item, and the cart's next ECG goes on with his characters."""
    from uploader.dicom_association import PeerSettings
    from uploader.dicom_part10 import parse_part10
    from uploader.dicom_store import StoreAssociation

    config = console_config(tmp_path / "data")
    path = _cart_file(tmp_path, sex="M", birth="19650505")
    cut = _cut_inside_its_annotations(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = pydicom.dcmread(path)
        whole.SOPInstanceUID = "2.25.1" + RESIDENT_ID  # the cart's next ECG
        buffer = io.BytesIO()
        whole.save_as(buffer)
    with open_outbox(config) as outbox:
        with lan_receiver(outbox, RESIDENT_ID, lambda pid: "李建国", patient_hold_s=900.0) as receiver:
            peer = PeerSettings("127.0.0.1", receiver.port, "LASTMILE", "CART1", timeout_s=30.0, deflate=False)
            with StoreAssociation(peer) as cart:
                first = cart.store(cut)
                again = cart.store(cut)  # the cart's retry
                after = cart.store(buffer.getvalue())
        assert (first.status, again.status, after.status) == (0, 0, 0), (first, again, after)
        kept, following = outbox.items(kind=Kind.DICOM)
        assert kept.hold_until is None and kept.patient is not None and kept.patient["name"] == "Li^Jianguo"
        # as the cart sent it (the receiver writes its own file meta): not lost, not half rewritten
        assert parse_part10(outbox.read_payload(kept)).dataset_bytes() == parse_part10(cut).dataset_bytes()
        assert following.patient is not None and following.patient["name"] == "Li^Jianguo=李^建国"


def _explicit(ds: pydicom.Dataset) -> bytes:
    """dciodvfy cannot read deflated objects: the same data set, written Explicit VR Little Endian."""
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    written = io.BytesIO()
    ds.save_as(written, enforce_file_format=True)
    return written.getvalue()


def test_an_ecg_nobody_answers_for_its_id_goes_with_the_contradiction_in_its_patient_comments(tmp_path: Path) -> None:
    """Held for the sex and birth date its ID contradicts, unanswered, it went when its hold ran
    out with the cart's values, the conflict only in our outbox record: the county reader read a
    woman born 1971 and never knew. Now its Patient Comments say both, in Chinese and English -
    in the object the gateway builds from a file and in the cart's own object over the LAN (after
    anything the cart wrote there), both still valid (dciodvfy: nothing new)."""
    from tests.dicom_validation import dciodvfy_problems

    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        context.set_patient(RESIDENT_ID, name="李建国", now=dt.datetime.now(dt.timezone.utc))
    finally:
        context.close()
    file_item = _arrives(config, _cart_file(tmp_path), "file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cart = pydicom.dcmread(_cart_file(tmp_path))
        cart.SOPInstanceUID = "2.25.2" + RESIDENT_ID  # another of the cart's ECGs, with a comment of its own
        cart.PatientComments = "Pacemaker"
        cart_path = tmp_path / "cart-commented.dcm"
        cart.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        cart.save_as(cart_path, enforce_file_format=True)
    with open_outbox(config) as outbox:
        with lan_receiver(outbox, RESIDENT_ID, lambda pid: "李建国", patient_hold_s=900.0) as receiver:
            storescu_as_the_cart(receiver.port, cart_path)
        (lan_item,) = [i for i in outbox.items(kind=Kind.DICOM) if i.id != file_item]
        for item_id in (file_item, lan_item.id):
            item = outbox.get(item_id)
            assert item is not None and item.hold_reason == ID_CONFLICT, item  # what goes when the hold runs out
        built, forwarded = stored_dataset(outbox, file_item), stored_dataset(outbox, lan_item.id)
    assert built.PatientComments == UNANSWERED and (built.PatientSex, built.PatientBirthDate) == ("F", "19710101")
    assert forwarded.PatientComments == "Pacemaker\n" + UNANSWERED
    assert (forwarded.PatientSex, forwarded.PatientBirthDate) == ("F", "19710101")  # the cart's values, as before
    assert forwarded.SOPInstanceUID == cart.SOPInstanceUID
    assert dciodvfy_problems(_explicit(built)) == []
    problems = dciodvfy_problems(_explicit(forwarded))
    del forwarded.PatientComments
    assert problems == dciodvfy_problems(_explicit(forwarded))  # the comment adds none to the cart's object


def _cut_lan_ecg_held(config: Config, tmp_path: Path, **cart: str) -> int:
    """The cart's file (`_cart_file`'s `cart` values) cut short inside its annotations
    (`_cut_inside_its_annotations`), sent over the LAN as it is while 李建国 is checked in: kept
    as the cart wrote it, held. Its item."""
    from uploader.dicom_association import PeerSettings
    from uploader.dicom_store import StoreAssociation

    cut = _cut_inside_its_annotations(_cart_file(tmp_path, **cart))
    with open_outbox(config) as outbox:
        with lan_receiver(
            outbox, RESIDENT_ID, lambda pid: "李建国", patient_hold_s=config.patient.unassigned_ecg_hold_s
        ) as receiver:
            peer = PeerSettings("127.0.0.1", receiver.port, "LASTMILE", "CART1", timeout_s=30.0, deflate=False)
            with StoreAssociation(peer) as sending:
                assert sending.store(cut).status == 0
        (item,) = outbox.items(kind=Kind.DICOM)
        assert item.held(time.time()) and outbox.read_payload(item).endswith(cut[-64:])
    return item.id


@pytest.mark.parametrize(
    ("cart", "answer", "fields"),
    [
        # "it is his": under 李建国, in characters: the cart's text read again to be written in UTF-8
        ({"sex": "M", "birth": "19650505"}, "/today/ecg/{item}/checked-in-name", {}),
        # his number typed in the assign form, on one whose F/1971 his ID contradicts too
        ({}, "/today/assign-ecg", {"patient_id": RESIDENT_ID}),
    ],
)
def test_a_held_lan_ecg_cut_short_is_set_aside_and_the_doctor_told_to_record_it_again(
    clinic: tuple[Config, ConsoleServer, Client],
    tmp_path: Path,
    cart: dict[str, str],
    answer: str,
    fields: dict[str, str],
) -> None:
    """A cart's ECG cut short (kept as the cart wrote it) held for another name, Wang Fang, on
    李建国's ID: the doctor's answer could not be written into it, the assign worker crashed on
    pydicom's error, and Today said "try again", then "contact the county IT", every time, and at
    the hold's end it went as the cart made it: under the name he had said is not its patient's.
    Now Today says the file is damaged and to record the ECG again; it is set aside (kept, never
    sent), and a second answer is no "try again"."""
    config, _, doctor = clinic
    item_id = _cut_lan_ecg_held(config, tmp_path, name="Wang^Fang", **cart)
    path = answer.format(item=item_id)
    fields = {"item_id": str(item_id), **fields} if "{item}" not in answer else fields
    page = doctor.get("/today").body
    assert held_ecg_row(page, item_id)
    with open_outbox(config) as outbox:
        assert (outbox.get(item_id) or pytest.fail("kept")).hold_reason == NAME_MISMATCH
    reply = doctor.post(path, {"csrf": csrf_of(page), **fields})
    assert reply.status == 303 and "done=assign-damaged" in reply.location, (reply.status, reply.location)
    said = doctor.get(reply.location).body
    assert "心电图机发来的这份心电图文件已损坏（不完整），网关无法更改它是谁的。它已被搁置，不会发送。" in said
    assert "请为正确的患者重新做心电图" in said and "请再试一次" not in said
    assert f'data-held-ecg="{item_id}"' not in said  # no longer asked
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
        assert item is not None and item.state == ItemState.QUARANTINED and item.quarantine_reason
        assert item.quarantine_reason.startswith(DAMAGED), item.quarantine_reason
        assert outbox.claim(Kind.DICOM, 10, time.time()) == []  # never sent under the cart's patient
    # REV-BW 1: set aside here, not refused by the county: no "call the county IT" on Today or Sent
    sent = doctor.get("/sent").body
    assert "data-damaged" in sent and "诊断中心无法接收" not in sent and "could not be changed" not in sent
    assert "诊断中心无法接收" not in said and "could not be changed" not in said
    again = doctor.post(path, {"csrf": csrf_of(said), **fields})  # a second tab's answer
    assert again.status == 303 and "done=too-late" in again.location, again.location


def test_a_held_lan_ecg_pydicom_cannot_read_whose_name_is_right_goes_as_the_cart_wrote_it(
    clinic: tuple[Config, ConsoleServer, Client], tmp_path: Path
) -> None:
    """ "Wang Fang is right" on a held cart object pydicom cannot read at all (cut in its Waveform
    Annotation Sequence's own length, as stored; the receiver refuses such a one today, an older
    gateway's item may be one): the object says so already, nothing is to be written into it. It
    was "try again" every time; now it goes as the cart wrote it, not set aside, the check-in's
    name corrected."""
    config, _, doctor = clinic
    item_id = _cut_lan_ecg_held(config, tmp_path, name="Wang^Fang", sex="M", birth="19650505")
    with open_outbox(config) as outbox:
        held = outbox.get(item_id) or pytest.fail("kept")
        stored = outbox.read_payload(held)
        annotations = stored.find(b"\x40\x00\x20\xb0SQ")  # (0040,B020)
        unreadable = stored[: annotations + 8 + 1]  # 1 of its length's 4 bytes
        assert outbox.replace_held_payload(item_id, unreadable, time.time(), hold=Hold(NAME_MISMATCH, held.hold_until))
    page = doctor.get("/today").body
    reply = doctor.post(f"/today/ecg/{item_id}/name-right", {"csrf": csrf_of(page)})
    assert reply.status == 303 and "done=name-corrected" in reply.location, (reply.status, reply.location)
    with open_outbox(config) as outbox:
        item = outbox.get(item_id)
        assert item is not None and item.hold_until is None and item.state == ItemState.QUEUED
        assert outbox.read_payload(item) == unreadable and NAME_MISMATCH not in item.meta["flags"]


def test_a_bug_of_ours_writing_the_answer_is_not_told_as_the_carts_damaged_file(
    clinic: tuple[Config, ConsoleServer, Client], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doctor's answer on a whole cart object held for another name, Wang Fang (REV-BW finding
    4): any error writing it in was taken as "the cart's file is damaged", so a bug of the gateway's
    (here in writing his name) set a good ECG aside and told him to record it again, hiding the
    bug. Now only pydicom's errors on a damaged object are: the bug is raised, the ECG still held."""
    from lastmile.ecg import intake

    config, _, _ = clinic
    with open_outbox(config) as outbox:
        with lan_receiver(
            outbox, RESIDENT_ID, lambda pid: "李建国", patient_hold_s=config.patient.unassigned_ecg_hold_s
        ) as receiver:
            storescu_as_the_cart(receiver.port, _cart_file(tmp_path, name="Wang^Fang", sex="M", birth="19650505"))
        (item,) = outbox.items(kind=Kind.DICOM)
        assert item.hold_reason == NAME_MISMATCH

        def a_bug_of_ours(ds: pydicom.Dataset, name: str) -> None:
            raise ValueError("a bug of the gateway's")

        monkeypatch.setattr(intake, "with_patient_name", a_bug_of_ours)
        with pytest.raises(Exception) as raised:
            intake.assign_lan_object(outbox, item, Patient(RESIDENT_ID, "李建国"), now=dt.datetime.now(dt.UTC))
        assert raised.type is ValueError, f"told as the cart's damaged file: {raised.value!r}"
        kept = outbox.get(item.id) or pytest.fail("kept")
        assert kept.state != ItemState.QUARANTINED and kept.hold_reason == NAME_MISMATCH
