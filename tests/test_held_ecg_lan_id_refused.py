"""A cart on the clinic LAN sends an ECG naming 李建国 under a resident ID whose check digit is
wrong (110101196505050016). s45-W2 held such an ECG from the cart's USB stick and said so on Today;
the LAN path kept the ID as written (flagged "another patient" when someone was checked in) and sent
it to the county under the mistyped ID, the doctor never asked. It is held as a file's is: the same
meta and Today words, an empty Assign box, STAT as short as the other STAT holds; his answer is
written into the cart's object. Real receiver, DCMTK's storescu as the cart, a real console."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from devices.identity import Patient
from firmware_bridge.dicom_receiver import DicomReceiver, ReceiverSettings
from lastmile.clinic.patients import StatSession
from lastmile.config import Config
from lastmile.console.service import ConsoleServer
from lastmile.data_dir import open_outbox
from lastmile.ecg.holds import PATIENT_MISMATCH, UNASSIGNED_HOLD
from lastmile.ecg.intake import PATIENT_ID_REFUSED, assign_held_ecg, lan_object_store
from tests.cart_files import arrives_from_the_usb_stick
from tests.console_harness import VALID_ID, Client, console_config, held_ecg_row, running_console
from tests.dicom_validation import dciodvfy_problems
from tests.ecg_factories import make_recording
from tests.lan_cart import storescu_as_the_cart
from uploader.dicom_ecg import EcgStudyUids, StationInfo, recording_to_dicom_bytes
from uploader.outbox import Outbox, Priority

pytestmark = pytest.mark.timeout(600)

MISTYPED = "110101196505050016"  # its check digit should be 9, not 6
HOLD_S, STAT_HOLD_S = 900.0, 120.0
# what the county reader reads with the study when nobody says whose it is
CART_NAMED = "心电图机上写的患者是 李建国 110101196505050016，身份证号校验位不对，医生未确认是谁的心电图。"


def as_dciodvfy_reads(data: bytes) -> pydicom.Dataset:
    """`data` (a deflated object too), with dciodvfy's verdict on it asserted clean."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian  # what dciodvfy reads
    out = io.BytesIO()
    ds.save_as(out)
    assert dciodvfy_problems(out.getvalue()) == []
    return ds


def cart_object(tmp: Path, n: int, patient_id: str, sex: str = "", born: str = "") -> Path:
    """The cart's ECG, recorded just now, naming 李建国 under `patient_id`, as a file storescu sends."""
    recording = dataclasses.replace(make_recording(n), acquired_at=dt.datetime.now(dt.timezone.utc))
    uids = EcgStudyUids(study_uid=f"2.25.81{n}1", series_uid=f"2.25.81{n}2", sop_instance_uid=f"2.25.81{n}3")
    ds = pydicom.dcmread(io.BytesIO(recording_to_dicom_bytes(recording, uids, StationInfo("cart-1", "Clinic"))))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID, ds.PatientName = patient_id, "李^建国"
    ds.PatientSex, ds.PatientBirthDate = sex, born
    path = tmp / f"cart-{n}.dcm"
    ds.save_as(path)
    return path


def sent_over_the_lan(
    outbox: Outbox, path: Path, *, checked_in: str | None = None, stat: bool = False, id_kind: str = "cn-resident-id"
) -> int:
    """`path` sent by the cart to the gateway's receiver storing into `outbox`, `checked_in` the
    patient checked in (None: nobody), as STAT with `stat`; its outbox item's id."""
    ids = frozenset({checked_in} if checked_in else set())
    session = StatSession(checked_in, dt.datetime.now(dt.timezone.utc)) if stat and checked_in else None
    store = lan_object_store(
        outbox, lambda: ids, lambda: session, id_kind, patient_hold_s=HOLD_S, stat_name_hold_s=STAT_HOLD_S
    )
    settings = ReceiverSettings(port=0, allowed_callers=("CART1",), timeout_s=30)
    with DicomReceiver(settings, store) as receiver:
        storescu_as_the_cart(receiver.port, path)
    uid = pydicom.dcmread(path).SOPInstanceUID
    item = outbox.find(f"dicom-sop:{uid}")
    assert item is not None
    return item.id


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox.open(tmp_path / "data", min_free_bytes=0)
    yield box
    box.close()


@pytest.mark.parametrize(
    ("checked_in", "stat", "held_s"),
    [(VALID_ID, False, HOLD_S), (None, False, HOLD_S), (VALID_ID, True, STAT_HOLD_S)],
    ids=["checked-in", "nobody-checked-in", "stat"],
)
def test_a_lan_ecg_whose_resident_id_is_mistyped_is_held_for_the_doctor(
    tmp_path: Path, outbox: Outbox, checked_in: str | None, stat: bool, held_s: float
) -> None:
    """It was sent at once (with a patient checked in, only flagged "another patient"). It waits
    for the doctor as a file's does, with what the cart wrote; a STAT one as short as the other STAT holds."""
    before = dt.datetime.now(dt.timezone.utc).timestamp()
    item_id = sent_over_the_lan(outbox, cart_object(tmp_path, 1, MISTYPED), checked_in=checked_in, stat=stat)
    item = outbox.get(item_id)
    assert item is not None
    assert item.hold_reason == UNASSIGNED_HOLD and item.hold_until is not None, item
    assert before + held_s - 5 <= item.hold_until <= before + held_s + 60, item.hold_until - before
    assert PATIENT_ID_REFUSED in item.meta["flags"] and PATIENT_MISMATCH not in item.meta["flags"], item.meta
    assert (item.meta["file_patient_id"], item.meta["file_patient_name"]) == (MISTYPED, "李^建国")
    assert item.meta["file_patient_id_problem"] == "check-character"
    assert (item.priority == Priority.STAT) is stat and bool(item.meta.get("stat")) is stat
    ds = as_dciodvfy_reads(outbox.read_payload(item))
    assert ds.PatientID == MISTYPED  # the cart's object as it sent it, the reader told whom it named
    assert (
        ds.PatientComments
        == CART_NAMED
        + " / The ECG machine named 李建国 110101196505050016, but its check digit is wrong: the doctor has not confirmed whose ECG it is."
    )


def test_a_files_ecg_sent_without_a_patient_says_whom_the_cart_named(tmp_path: Path) -> None:
    """From the stick it went as UNASSIGNED with nothing of 李建国: the county could match it to no
    one. Its Patient Comments say whom the cart named; the doctor's answer takes them away."""
    config = console_config(tmp_path / "data")
    config.patient.id_kind = "cn-resident-id"
    config.patient.unassigned_ecg_hold_s = HOLD_S
    recording = make_recording(4, patient=Patient(MISTYPED, "李建国"))
    recording = dataclasses.replace(recording, acquired_at=dt.datetime.now(dt.timezone.utc))
    item = arrives_from_the_usb_stick(config, recording, "stick:4")
    with open_outbox(config) as outbox:
        held = as_dciodvfy_reads(outbox.read_payload(item))
        said = str(held.PatientComments)
        assert said.startswith("UNASSIGNED: no patient was identified") and f"\n{CART_NAMED}" in said, said
        answered = assign_held_ecg(outbox, item.id, Patient(VALID_ID, "张秀兰"), now=dt.datetime.now(dt.timezone.utc))
        ds = as_dciodvfy_reads(outbox.read_payload(answered))
    assert ds.PatientID == VALID_ID and "PatientComments" not in ds


def test_a_loosely_written_valid_resident_id_is_not_held(tmp_path: Path, outbox: Outbox) -> None:
    """The cart's "110105 19491231 002x" is 张秀兰's ID written loosely, not a mistyped one: hers, as before
    (her sex and birth date as the ID says: only the ID's writing is loose)."""
    item = outbox.get(
        sent_over_the_lan(
            outbox, cart_object(tmp_path, 2, "110105 19491231 002x", "F", "19491231"), checked_in=VALID_ID
        )
    )
    assert item is not None and item.hold_reason is None, item
    assert PATIENT_ID_REFUSED not in item.meta["flags"] and "file_patient_id_problem" not in item.meta


@dataclasses.dataclass(frozen=True)
class Clinic:
    config: Config
    server: ConsoleServer
    mistyped: int


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    """张秀兰 checked in on a real console; the cart sends 李建国's ECG under the mistyped ID."""
    tmp = Path(tmp_path_factory.mktemp("lan-refused"))
    config = console_config(tmp / "data")
    config.patient.id_kind = "cn-resident-id"
    config.patient.unassigned_ecg_hold_s = HOLD_S
    with running_console(config) as server:
        doctor = Client(server.url)
        doctor.login()
        assert doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": "张秀兰"}).status == 303
        with open_outbox(config) as outbox:
            mistyped = sent_over_the_lan(outbox, cart_object(tmp, 3, MISTYPED), checked_in=VALID_ID)
        yield Clinic(config, server, mistyped)


def assign_field(page: str, item_id: int) -> str:
    found = re.search(rf'<input id="assign-ecg-{item_id}"[^>]*value="([^"]*)"', page)
    assert found, f"E{item_id} has an Assign box"
    return found.group(1)


def test_today_says_what_the_cart_wrote_and_offers_nobody(clinic: Clinic) -> None:
    """The words a file's row has (W2), its Assign box empty; unanswered it goes as the cart made it."""
    doctor = Client(clinic.server.url)
    doctor.login()
    page = doctor.get("/today").body
    row = held_ecg_row(page, clinic.mistyped)
    assert "心电图机上写的是 李建国 110101196505050016：身份证号校验位不对，请核对。" in row, row
    assert assign_field(page, clinic.mistyped) == "", row
    assert "在本次就诊期间测量：请输入是谁的。" in row and VALID_ID not in row, row
    assert "按原样发送" in row and "无患者”发送" not in row, row


def test_the_sent_page_says_it_goes_as_the_cart_made_it(clinic: Clinic) -> None:
    """Its card on Sent said the held panel's "以“无患者”发送": a cart's object goes under the ID it wrote."""
    doctor = Client(clinic.server.url)
    doctor.login()
    page = doctor.get("/sent").body
    held = [card for card in page.split('<li class="card journey')[1:] if "data-held-for-doctor" in card]
    (card,) = [" ".join(re.sub(r"<[^>]+>", " ", c).split()) for c in held]
    assert "如不处理，将于" in card and "按原样发送" in card and "无患者”发送" not in card, card


def test_the_doctors_answer_is_written_into_the_carts_object(clinic: Clinic) -> None:
    """He types whose it is: the cart's object goes under that ID, the mistyped one kept as another ID."""
    doctor = Client(clinic.server.url)
    doctor.login()
    answer = doctor.post("/today/assign-ecg", {"item_id": str(clinic.mistyped), "patient_id": VALID_ID})
    assert answer.status == 303, answer.body
    with open_outbox(clinic.config) as outbox:
        item = outbox.get(clinic.mistyped)
        assert item is not None and item.hold_reason is None, item
        ds = pydicom.dcmread(io.BytesIO(outbox.read_payload(item)))
    assert ds.PatientID == VALID_ID and [o.PatientID for o in ds.OtherPatientIDsSequence] == [MISTYPED]
    assert "PatientComments" not in ds  # he said whose it is: our words on it go
    assert (item.patient or {}).get("patient_id") == VALID_ID
