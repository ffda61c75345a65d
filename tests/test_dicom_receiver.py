"""The clinic-LAN DICOM receiver with dcmtk's storescu as the cart: objects kept as received in a
real outbox before Success, calling-AE allow-list, SOP-class list, repeated instances
idempotent, failure answered "out of resources", and a kill -9 right after Success loses nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from firmware_bridge.dicom_receiver import DicomReceiver, ReceiverSettings
from firmware_bridge.errors import ReceiverConfigError
from lastmile.ecg.intake import lan_object_store
from tests.conftest import REPO, require_tool, shared_file
from uploader.outbox import Outbox

CART = "CART1"
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the cart's malformed UIDs


def _storescu(port: int, *files: Path, calling: str = CART) -> subprocess.CompletedProcess:
    tool = require_tool("storescu")
    return subprocess.run(
        [
            tool,
            "-aet",
            calling,
            "-aec",
            "LASTMILE",
            "-to",
            "10",
            "-ta",
            "10",
            "-td",
            "10",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def _dataset(data: bytes) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), force=True)


@pytest.fixture
def outbox(tmp_path: Path):
    box = Outbox.open(tmp_path / "data", min_free_bytes=0)
    yield box
    box.close()


@pytest.fixture
def receiver(outbox: Outbox):
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=10)
    with DicomReceiver(settings, lan_object_store(outbox)) as r:
        yield r


def _files() -> list[Path]:
    return [shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm"), Path(get_testdata_file("waveform_ecg.dcm"))]


def test_objects_are_kept_as_received(receiver: DicomReceiver, outbox: Outbox) -> None:
    files = _files()
    result = _storescu(receiver.port, *files)
    assert result.returncode == 0, result.stderr
    items = {item.key: item for item in outbox.items()}
    assert len(items) == 2
    for path in files:
        sent = _dataset(path.read_bytes())
        item = items["dicom-sop:" + str(sent.SOPInstanceUID)]  # malformed UIDs kept as they are
        kept = _dataset(outbox.read_payload(item))
        assert kept.SOPInstanceUID == sent.SOPInstanceUID and kept.StudyInstanceUID == sent.StudyInstanceUID
        for group_sent, group_kept in zip(sent.WaveformSequence, kept.WaveformSequence):
            assert bytes(group_kept.WaveformData) == bytes(group_sent.WaveformData)
        assert item.meta["calling_ae"] == CART and item.meta["sop_class_uid"] == str(sent.SOPClassUID)
        assert item.patient is not None and item.patient["patient_id"] == str(sent.PatientID)


def test_repeated_instance_is_idempotent(receiver: DicomReceiver, outbox: Outbox) -> None:
    path = _files()[1]
    assert _storescu(receiver.port, path).returncode == 0
    assert _storescu(receiver.port, path).returncode == 0
    assert len(outbox.items()) == 1


def test_an_instance_sent_again_with_other_content_is_not_silently_dropped(
    receiver: DicomReceiver, outbox: Outbox
) -> None:
    """A cart sends an ECG, the nurse corrects the patient on the cart and sends it again under the
    same SOP Instance UID. The gateway answered Success and kept the first version: the reading
    center got the ECG on the wrong patient. While the first has not gone out, the version the
    cart holds now replaces it; once it has gone, the cart is told (a failure, not Success) -
    never Success for content the gateway dropped."""
    from uploader.dicom_store import StoreAssociation

    ecg = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))

    def as_sent(patient_id: str) -> bytes:
        ecg.PatientID = patient_id
        buffer = io.BytesIO()
        ecg.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    with StoreAssociation(_cart(receiver.port, deflate=False)) as cart:
        assert cart.store(as_sent("P-WRONG")).status == 0x0000
        assert cart.store(as_sent("P-RIGHT")).status == 0x0000  # corrected before it went out
        (item,) = outbox.items()
        assert _dataset(outbox.read_payload(item)).PatientID == "P-RIGHT"
        assert item.patient is not None and item.patient["patient_id"] == "P-RIGHT"
        assert cart.store(as_sent("P-RIGHT")).status == 0x0000  # the same again: nothing changes
        (claimed,) = outbox.claim("dicom", 1, time.time())  # the forwarder takes it ...
        assert outbox.begin_send(claimed.id, time.time())  # ... and sends it
        refused = cart.store(as_sent("P-THIRD"))
    assert refused.status != 0x0000 and refused.status != 0xA700  # retrying cannot help: say so
    (item,) = outbox.items()
    assert _dataset(outbox.read_payload(item)).PatientID == "P-RIGHT"


def test_an_instance_sent_again_with_other_content_looks_its_item_up_once(
    receiver: DicomReceiver, outbox: Outbox
) -> None:
    """lastmile/ecg/intake.py lan_object_store: the item kept under the instance's key is found
    once and replaced, not looked up again by an add that stores nothing."""
    from tests.statement_trace import traced
    from uploader.dicom_store import StoreAssociation

    ecg = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    sent = []
    for patient_id in ("P-WRONG", "P-RIGHT"):
        ecg.PatientID = patient_id
        buffer = io.BytesIO()
        ecg.save_as(buffer, enforce_file_format=True)
        sent.append(buffer.getvalue())
    with StoreAssociation(_cart(receiver.port, deflate=False)) as cart:
        assert cart.store(sent[0]).status == 0x0000
        with traced(outbox.db.conn) as statements:
            assert cart.store(sent[1]).status == 0x0000
    by_key = [s for s in statements if "FROM items WHERE key =" in s]
    assert len(by_key) == 1, by_key
    (item,) = outbox.items()
    assert _dataset(outbox.read_payload(item)).PatientID == "P-RIGHT"


def test_unknown_caller_is_rejected(receiver: DicomReceiver, outbox: Outbox) -> None:
    result = _storescu(receiver.port, _files()[1], calling="ROGUE")
    assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stderr
    assert outbox.items() == []


def test_sop_class_not_in_the_list_is_not_accepted(outbox: Outbox) -> None:
    settings = ReceiverSettings(
        port=0, allowed_callers=(CART,), sop_classes=("1.2.840.10008.5.1.4.1.1.2",), timeout_s=10
    )
    with DicomReceiver(settings, lan_object_store(outbox)) as r:
        result = _storescu(r.port, _files()[1])
    assert result.returncode != 0
    assert outbox.items() == []


def test_failure_to_store_is_not_answered_success(outbox: Outbox) -> None:
    def failing(obj) -> None:
        raise OSError("disk full")

    with DicomReceiver(ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=10), failing) as r:
        result = _storescu(r.port, _files()[1])
    assert result.returncode != 0  # storescu reports the 0xA700 status: the cart keeps its copy


def _ecg_without(*keywords: str, **values: str) -> bytes:
    """The real ECG of pydicom's wheel as a cart would encode it, less `keywords`, with `values`."""
    from pynetdicom.dsutils import encode

    ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    for keyword in keywords:
        delattr(ds, keyword)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return encode(ds, False, True) or b""


def _ct_image() -> bytes:
    from pynetdicom.dsutils import encode

    return encode(pydicom.dcmread(get_testdata_file("CT_small.dcm")), False, True) or b""


ANNOUNCED_UID = "1.2.826.0.1.3680043.8.498.1"
NOT_WHAT_IT_SAYS = {
    "not a data set": lambda: b"\x01\x02garbage" * 10,
    "a CT image sent as a 12-lead ECG": _ct_image,
    "another instance than announced": lambda: _ecg_without(SOPInstanceUID="1.2.826.0.1.3680043.8.498.2"),
    "no Study Instance UID": lambda: _ecg_without("StudyInstanceUID", SOPInstanceUID=ANNOUNCED_UID),
    "no Series Instance UID": lambda: _ecg_without("SeriesInstanceUID", SOPInstanceUID=ANNOUNCED_UID),
}


@pytest.mark.parametrize("what", list(NOT_WHAT_IT_SAYS))
def test_a_data_set_that_is_not_the_ecg_its_c_store_announces_is_refused(
    receiver: DicomReceiver, outbox: Outbox, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """Success tells the cart it may delete its copy: a data set that cannot be read, or is not the
    SOP class and instance its C-STORE announced, or lacks the study/series the reading center
    files it under, would only be refused by the PACS later (quarantined: the ECG lost). It is
    refused now (0xA900 / 0xC000, not "out of resources": sending it again cannot help), and
    nothing is kept; the cart (here pynetdicom) keeps its copy and shows the failure."""
    import pynetdicom.association
    from pydicom.dataset import Dataset, FileMetaDataset
    from pynetdicom import AE

    twelve_lead = "1.2.840.10008.5.1.4.1.1.9.1.1"
    wire = NOT_WHAT_IT_SAYS[what]()
    # the cart announces a 12-lead ECG with ANNOUNCED_UID and sends these bytes as its data set
    monkeypatch.setattr(pynetdicom.association, "encode", lambda *args: wire)
    announced = Dataset()
    announced.SOPClassUID, announced.SOPInstanceUID = twelve_lead, ANNOUNCED_UID
    announced.file_meta = FileMetaDataset()
    announced.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    cart = AE(ae_title=CART)
    cart.add_requested_context(twelve_lead, "1.2.840.10008.1.2.1")
    assoc = cart.associate("127.0.0.1", receiver.port, ae_title="LASTMILE")
    assert assoc.is_established
    try:
        answer = assoc.send_c_store(announced)
    finally:
        assoc.release()
    assert answer.Status in (0xA900, 0xC000), hex(answer.Status)
    assert outbox.items() == []


def test_empty_allow_list_refuses_to_start(outbox: Outbox) -> None:
    with pytest.raises(ReceiverConfigError, match="allowed_callers"):
        DicomReceiver(ReceiverSettings(port=0), lan_object_store(outbox))


RECEIVER_PROCESS = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from firmware_bridge.dicom_receiver import DicomReceiver, ReceiverSettings
    from lastmile.ecg.intake import lan_object_store
    from uploader.outbox import Outbox
    outbox = Outbox.open(Path({data!r}), min_free_bytes=0)
    receiver = DicomReceiver(ReceiverSettings(port=0, allowed_callers=({cart!r},), timeout_s=10),
                             lan_object_store(outbox))
    receiver.start()
    print(receiver.port, flush=True)
    time.sleep(3600)
""")


def test_kill_9_right_after_success_loses_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    code = RECEIVER_PROCESS.format(repo=str(REPO), data=str(data_dir), cart=CART)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip().isdigit(), "receiver process did not start"
        result = _storescu(int(line), *_files())
        assert result.returncode == 0, result.stderr
        os.kill(proc.pid, signal.SIGKILL)  # the cart has its Success: it may delete its copy now
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    with Outbox.open(data_dir, min_free_bytes=0) as box:
        items = box.items()
        assert len(items) == 2
        for item in items:
            assert _dataset(box.read_payload(item)).SOPInstanceUID == item.meta["sop_instance_uid"]


@pytest.mark.orthanc
def test_cart_to_orthanc_unchanged(tmp_path: Path) -> None:
    """storescu (the cart) -> receiver -> outbox -> forwarder -> Orthanc: same UIDs, same waveform.

    Only the object with valid UIDs: the forwarder (uploader.dicom_part10.parse_part10) refuses to
    send the ECGToolkit file's malformed UIDs, which the receiver keeps as received."""
    import threading

    from lastmile.config import Config
    from lastmile.services.forward import forwarder_settings, open_outbox
    from tests.peers import OrthancServer, free_port, gateway_modality
    from uploader.ecg_forwarder import EcgForwarder

    config = Config()
    config.gateway.data_dir = str(tmp_path / "data")
    rc = config.reading_center
    rc.listen_port, rc.called_ae, rc.calling_ae, rc.timeout_s = free_port(), "READING_CENTER", "LASTMILE", 10.0
    config.outbox.min_free_mb, config.outbox.backoff_base_s, config.outbox.backoff_max_s = 1, 0.1, 0.5
    with OrthancServer(tmp_path / "orthanc", modalities=gateway_modality("LASTMILE", rc.listen_port)) as orthanc:
        rc.port = orthanc.dicom_port
        outbox = open_outbox(config)
        try:
            settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=10)
            with DicomReceiver(settings, lan_object_store(outbox)) as receiver:
                assert _storescu(receiver.port, *_files()[1:]).returncode == 0
            with EcgForwarder(outbox, forwarder_settings(config)) as forwarder:
                stop = threading.Event()
                deadline = time.monotonic() + 60
                while len(orthanc.sop_instance_uids()) < 1:
                    assert time.monotonic() < deadline, orthanc.log_tail()
                    time.sleep(min(forwarder.step(stop), 0.1))
        finally:
            outbox.close()
        for path in _files()[1:]:
            sent = _dataset(path.read_bytes())
            instance = orthanc.instance_id_of(str(sent.SOPInstanceUID))
            assert instance is not None
            arrived = _dataset(orthanc.instance_file(instance))
            assert (arrived.StudyInstanceUID, arrived.SeriesInstanceUID) == (
                sent.StudyInstanceUID,
                sent.SeriesInstanceUID,
            )
            for group_sent, group_arrived in zip(sent.WaveformSequence, arrived.WaveformSequence):
                assert bytes(group_arrived.WaveformData) == bytes(group_sent.WaveformData)


def test_other_current_patient_is_flagged_in_meta(outbox: Outbox) -> None:
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=10)
    with DicomReceiver(settings, lan_object_store(outbox, lambda: frozenset({"P-OTHER"}))) as r:
        assert _storescu(r.port, _files()[1]).returncode == 0
    (item,) = outbox.items()
    # pydicom's sample is dated 2013: sent live, its cart's clock is wrong (device-clock-reset)
    assert item.meta["flags"] == ["patient-mismatch", "device-clock-reset"] and item.patient["patient_id"] == "642341"


def test_receiver_from_configuration(outbox: Outbox) -> None:
    from lastmile.config import Config
    from lastmile.ecg.intake import lan_receiver
    from tests.conftest import require_private_netns
    from tests.peers import free_port

    require_private_netns()  # the configured receiver listens on every interface, as on the LAN
    config = Config()
    assert lan_receiver(config, outbox) is None  # disabled by default
    section = config.lan_receiver
    section.enabled, section.port, section.allowed_callers = True, free_port(), [CART]
    receiver = lan_receiver(config, outbox)
    assert receiver is not None
    receiver.start()
    try:
        assert _storescu(receiver.port, _files()[1]).returncode == 0
    finally:
        receiver.stop()
    assert len(outbox.items()) == 1


# -- hostile objects: bounded memory, nothing kept ----------------------------------------------------

BOMB_INFLATED = 1 << 30  # 1 GiB of zeros: about 1 MB deflated
OVERSIZED = 128 << 20  # a plain object eight times the default limit
RSS_LIMIT_MB = 150.0  # a Pi with 1 GB runs both services and the OS


@pytest.fixture(scope="module")
def bomb() -> tuple[str, bytes]:
    from tests.hostile_dicom import deflate_bomb

    return deflate_bomb(BOMB_INFLATED)


def _cart(port: int, *, deflate: bool = True):
    from uploader.dicom_association import PeerSettings

    return PeerSettings("127.0.0.1", port, "LASTMILE", CART, timeout_s=60.0, deflate=deflate)


def test_decompression_bomb_is_refused_in_process_and_the_next_object_is_kept(
    outbox: Outbox, bomb: tuple[str, bytes]
) -> None:
    from tests.hostile_dicom import deflate_bomb
    from uploader.dicom_store import StoreAssociation

    uid, data = bomb
    small_uid, small_bomb = deflate_bomb(20 << 20)  # just over the default 16 MB once inflated
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    with DicomReceiver(settings, lan_object_store(outbox)) as r, StoreAssociation(_cart(r.port)) as cart:
        for sent in (data, small_bomb):
            outcome = cart.store(sent)
            assert outcome.transfer_syntax == "1.2.840.10008.1.2.1.99"  # it travelled deflated
            assert outcome.status == 0xA700 and "inflates to over" in outcome.meaning
        assert outbox.items() == []
        legit = Path(get_testdata_file("waveform_ecg.dcm")).read_bytes()
        assert cart.store(legit).status == 0x0000  # the receiver is fine afterwards
    assert [i.key for i in outbox.items()] == ["dicom-sop:" + str(_dataset(legit).SOPInstanceUID)]
    assert small_uid != uid


def test_deflated_object_within_the_limit_is_kept_as_received(outbox: Outbox) -> None:
    from tests.peers import ecg_payloads
    from uploader.dicom_part10 import encode_for, parse_part10
    from uploader.dicom_store import StoreAssociation

    (ecg,) = ecg_payloads(1)
    # pydicom's sample is dated 2013-01-25; this is about deflate, not the clock: received that day
    that_day = dt.datetime(2013, 1, 25, 12, tzinfo=dt.timezone.utc)
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    store = lan_object_store(outbox, now=lambda: that_day)
    with DicomReceiver(settings, store) as r, StoreAssociation(_cart(r.port)) as cart:
        assert cart.store(ecg.data).status == 0x0000
    (item,) = outbox.items()
    kept = parse_part10(outbox.read_payload(item))
    assert str(kept.transfer_syntax) == "1.2.840.10008.1.2.1.99" and kept.sop_instance_uid == ecg.sop_instance_uid
    assert kept.dataset_bytes() == encode_for(parse_part10(ecg.data), kept.transfer_syntax)  # the bytes sent
    assert item.patient is not None and item.meta["study_uid"] == ecg.study_uid


def test_an_object_sent_on_an_association_open_across_the_stop_is_refused_not_stored(outbox: Outbox) -> None:
    """lastmile/services/parts.py ReceiverPart.close stopped the server only: a cart's association
    open across the acquire service's stop went on, and its next object was stored while the
    service closed the outbox and clinic.db's session under it (a store into a closed outbox, or a
    sqlite3 connection closed under its statement: exit 139). Now the close waits for the object
    in hand and refuses the next ones ("send it again": the cart does), so the stores may close."""
    from lastmile.services.parts import ReceiverPart
    from tests.peers import ecg_payloads
    from uploader.dicom_store import StoreAssociation

    first, second = ecg_payloads(2)
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    part = ReceiverPart(DicomReceiver(settings, lan_object_store(outbox)))
    part.check(time.monotonic())  # listening
    assert part.listening
    with StoreAssociation(_cart(part.receiver.port)) as cart:
        assert cart.store(first.data).status == 0x0000
        part.close()  # SIGTERM: the acquire service closes its parts, then its stores
        outcome = cart.store(second.data)
    assert outcome.status == 0xA700 and "gateway stopping" in outcome.meaning, outcome
    assert [item.key for item in outbox.items()] == ["dicom-sop:" + first.sop_instance_uid]
    assert part.finished()


def _acquire_config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "lastmile.toml"
    path.write_text(
        textwrap.dedent(f"""
        [gateway]
        data_dir = "{tmp_path / "data"}"
        [outbox]
        min_free_mb = 1
        [lan_receiver]
        enabled = true
        host = "127.0.0.1"
        port = {port}
        allowed_callers = ["{CART}"]
        [ble]
        enabled = false
        [serial]
        enabled = false
        [gps]
        source = "none"
    """)
    )
    return path


def _huge_pdu(port: int) -> bool:
    """An A-ASSOCIATE-RQ announcing 2 GiB, then 8 MB of it: True if the receiver hung up."""
    import socket
    import struct

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(b"\x01\x00" + struct.pack(">I", 0x7FFFFFF0))
            for _ in range(8):
                s.sendall(b"\x00" * (1 << 20))
            return s.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def test_decompression_bomb_and_oversized_object_leave_the_acquire_service_small(
    tmp_path: Path, bomb: tuple[str, bytes]
) -> None:
    """The real acquire service in its own process; an attacker (an allowed cart AE) sends a 1 MB
    deflate bomb of 1 GiB, a 128 MB plain object and a PDU announcing 2 GiB. Each is refused,
    nothing is stored, the service keeps working, and its peak RSS stays under 150 MB."""
    from tests.hostile_dicom import oversized_object, peak_rss_mb
    from tests.peers import free_port, wait_for_port
    from uploader.dicom_store import StoreAssociation

    port = free_port()
    config = _acquire_config(tmp_path, port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lastmile", "-c", str(config), "acquire"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        wait_for_port(port, 60, proc)
        idle_mb = peak_rss_mb(proc.pid)
        with StoreAssociation(_cart(port)) as cart:
            outcome = cart.store(bomb[1])
            assert outcome.status == 0xA700 and "inflates to over" in outcome.meaning
        bombed_mb = peak_rss_mb(proc.pid)
        oversized_uid, oversized = oversized_object(OVERSIZED)
        with StoreAssociation(_cart(port, deflate=False)) as cart:
            outcome = cart.store(oversized)
            assert outcome.transfer_syntax == "1.2.840.10008.1.2.1"  # sent plain, all 128 MB of it
            assert outcome.status == 0xA700 and "over the gateway" in outcome.meaning
        del oversized
        assert _huge_pdu(port)
        legit = Path(get_testdata_file("waveform_ecg.dcm")).read_bytes()
        with StoreAssociation(_cart(port)) as cart:
            assert cart.store(legit).status == 0x0000
        peak_mb = peak_rss_mb(proc.pid)
        print(
            f"\nacquire service VmHWM: idle {idle_mb:.0f} MB, after the bomb {bombed_mb:.0f} MB, "
            f"after the bomb, a {OVERSIZED >> 20} MB object and a 2 GiB PDU {peak_mb:.0f} MB"
        )
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert peak_mb < RSS_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    with Outbox.open(tmp_path / "data", min_free_bytes=0) as box:  # the real outbox: only the legit object
        assert [i.key for i in box.items()] == ["dicom-sop:" + str(_dataset(legit).SOPInstanceUID)]
        assert box.find("dicom-sop:" + bomb[0]) is None and box.find("dicom-sop:" + oversized_uid) is None


def test_receiving_objects_share_one_memory_budget(outbox: Outbox) -> None:
    """While an object is being checked and stored its bytes stay counted: another cart's object
    that does not fit what is left is refused "busy" (0xA700, the cart retries) - and accepted
    once the budget is back."""
    import threading

    from tests.hostile_dicom import oversized_object
    from uploader.dicom_store import StoreAssociation

    entered, release = threading.Event(), threading.Event()
    keep = lan_object_store(outbox)

    def slow_store(obj) -> None:
        entered.set()
        assert release.wait(60)
        keep(obj)

    (big_uid, big), (small_uid, small) = oversized_object(3 << 20), oversized_object(2 << 20)
    settings = ReceiverSettings(
        port=0, allowed_callers=(CART,), timeout_s=60, max_object_bytes=4 << 20, max_receiving_bytes=4 << 20
    )
    outcomes: dict[str, int] = {}
    with DicomReceiver(settings, slow_store) as r:

        def send_big() -> None:
            with StoreAssociation(_cart(r.port, deflate=False)) as cart:
                outcomes["big"] = cart.store(big).status

        first = threading.Thread(target=send_big)
        first.start()
        assert entered.wait(60)  # the 3 MB object is being stored: its 3 MB are still held
        with StoreAssociation(_cart(r.port, deflate=False)) as cart:
            busy = cart.store(small)
            release.set()
            first.join(60)
            again = cart.store(small)
    assert outcomes["big"] == 0x0000
    assert busy.status == 0xA700 and "busy" in busy.meaning
    assert again.status == 0x0000
    assert {i.key for i in outbox.items()} == {"dicom-sop:" + big_uid, "dicom-sop:" + small_uid}


def test_resident_id_written_loosely_on_the_cart_is_the_checked_in_stat_patient(outbox: Outbox) -> None:
    # The cart's operator typed the resident ID with a lower-case x and spaces; the doctor checked
    # the same patient in (normalised) as STAT. Not "another patient", and it goes first.
    import datetime as dt

    from lastmile.clinic.patients import StatSession
    from uploader.dicom_store import StoreAssociation
    from uploader.outbox import Priority

    checked_in = "11010519491231002X"
    ecg = _dataset(Path(get_testdata_file("waveform_ecg.dcm")).read_bytes())
    ecg.PatientID = "110105 19491231 002x"
    ecg.PatientSex, ecg.PatientBirthDate = "F", "19491231"  # what the ID says: only the ID's writing is loose
    sent = io.BytesIO()
    ecg.save_as(sent)
    session = StatSession(checked_in, dt.datetime.now(dt.timezone.utc))
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    store = lan_object_store(outbox, lambda: frozenset({checked_in}), lambda: session)
    with DicomReceiver(settings, store) as r, StoreAssociation(_cart(r.port)) as cart:
        assert cart.store(sent.getvalue()).status == 0x0000
    (item,) = outbox.items()
    # pydicom's sample is dated 2013: sent live, its cart's clock is wrong (device-clock-reset)
    assert item.meta["flags"] == ["device-clock-reset"] and item.meta["stat"] is True and item.priority == Priority.STAT


@pytest.mark.parametrize("deflate", [False, True])
def test_a_loosely_written_resident_id_goes_to_the_pacs_as_the_one_resident_id(outbox: Outbox, deflate: bool) -> None:
    """The cart's operator typed "110105 19491231 002x"; the gateway knew it as the checked-in
    11010519491231002X but forwarded the object as the cart wrote it: the county's PACS filed the
    same resident under two patient IDs (his ECGs from the gateway's other paths under the other).
    Forwarded with the normalised ID, the one as typed kept in Other Patient IDs, DICOM-valid."""
    from tests.dicom_validation import dciodvfy_problems
    from tests.ecg_factories import make_recording
    from uploader.dicom_ecg import EcgStudyUids, StationInfo, recording_to_dicom_bytes
    from uploader.dicom_store import StoreAssociation

    uids = EcgStudyUids(study_uid="2.25.2001", series_uid="2.25.2002", sop_instance_uid="2.25.2003")
    built = recording_to_dicom_bytes(make_recording(0), uids, StationInfo(station_name="cart-1", institution="Clinic"))
    ecg = _dataset(built)
    ecg.PatientID = "110105 19491231 002x"
    ecg.PatientSex, ecg.PatientBirthDate = "F", "19491231"  # what the ID says: only the ID's writing is loose
    sent = io.BytesIO()
    ecg.save_as(sent)
    assert dciodvfy_problems(sent.getvalue()) == []  # the cart's object is valid as it is
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    with (
        DicomReceiver(settings, lan_object_store(outbox)) as r,
        StoreAssociation(_cart(r.port, deflate=deflate)) as cart,
    ):
        assert cart.store(sent.getvalue()).status == 0x0000
        assert cart.store(sent.getvalue()).status == 0x0000  # sent again: the same item, not "other content"
    (item,) = outbox.items()
    ds = _dataset(outbox.read_payload(item))
    assert ds.PatientID == "11010519491231002X"
    assert [other.PatientID for other in ds.OtherPatientIDsSequence] == ["110105 19491231 002x"]
    assert ds.SOPInstanceUID == "2.25.2003" and ds.waveform_array(0).tolist() == ecg.waveform_array(0).tolist()
    assert (ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian) is deflate  # as it came
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian  # what dciodvfy reads
    forwarded = io.BytesIO()
    ds.save_as(forwarded)
    assert dciodvfy_problems(forwarded.getvalue()) == []


def test_a_cart_sending_a_stored_object_again_costs_no_parse(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cart resends what it is not sure went through (after a timeout, at every restart). An
    object whose patient ID the gateway rewrote was read with pydicom and written again at every
    resend, only to find the item it already keeps: on a Pi, for each of a cart's retries."""
    from tests.ecg_factories import make_recording
    from uploader.dicom_ecg import EcgStudyUids, StationInfo, recording_to_dicom_bytes
    from uploader.dicom_store import StoreAssociation

    uids = EcgStudyUids(study_uid="2.25.3001", series_uid="2.25.3002", sop_instance_uid="2.25.3003")
    ecg = _dataset(recording_to_dicom_bytes(make_recording(0), uids, StationInfo(station_name="cart-1")))
    ecg.PatientID = "110105 19491231 002x"
    ecg.PatientSex, ecg.PatientBirthDate = "F", "19491231"  # what the ID says: only the ID's writing is loose
    sent = io.BytesIO()
    ecg.save_as(sent)
    reads: list[object] = []
    real_dcmread = pydicom.dcmread

    def counted_dcmread(*args: object, **kwargs: object) -> pydicom.FileDataset:
        reads.append(args[0])
        return real_dcmread(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom, "dcmread", counted_dcmread)
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    with DicomReceiver(settings, lan_object_store(outbox)) as r, StoreAssociation(_cart(r.port)) as cart:
        assert cart.store(sent.getvalue()).status == 0x0000
        first = len(reads)
        assert cart.store(sent.getvalue()).status == 0x0000
        assert cart.store(sent.getvalue()).status == 0x0000
    assert first == 1 and len(reads) == first, f"{len(reads) - first} parses for 2 resends of a stored object"
    (item,) = outbox.items()
    assert _dataset(outbox.read_payload(item)).PatientID == "11010519491231002X"


@pytest.mark.parametrize("deflate", [False, True])
def test_a_cart_on_the_lan_with_a_reset_clock_is_not_believed_and_its_object_is_otherwise_as_sent(
    outbox: Outbox, deflate: bool
) -> None:
    """A cart whose clock battery went flat sends its ECG over the clinic LAN dated 2000-01-01.
    It was forwarded as sent, Time Source "DEVICE CLOCK", synchronized: the PACS believed 2000, the
    doctor was never told. The LAN path judges the time by the one rule (believable_time): the
    cart's time is kept, the item is flagged device-clock-reset (Today and `lastmile doctor` say
    to set the cart's clock), and the object says its time is not believed - Time Source and
    Acquisition Time Synchronized only, the rest as the cart sent it."""
    from devices.identity import DEVICE_CLOCK_RESET, DeviceIdentity, TimeSource
    from tests.dicom_validation import dciodvfy_problems
    from tests.ecg_factories import make_recording
    from uploader.dicom_ecg import EcgStudyUids, StationInfo, recording_to_dicom_bytes
    from uploader.dicom_store import StoreAssociation

    reset = dt.datetime(2000, 1, 1, 0, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    rec = dataclasses.replace(
        make_recording(0),
        acquired_at=reset,
        time_source=TimeSource.DEVICE_CLOCK,
        device=DeviceIdentity(manufacturer="Acme Cardio", model="Cart 5", serial="SN-7"),
    )
    uids = EcgStudyUids(study_uid="2.25.4001", series_uid="2.25.4002", sop_instance_uid="2.25.4003")
    cart_ds = _dataset(recording_to_dicom_bytes(rec, uids, StationInfo(station_name="cart-1", institution="Clinic")))
    cart_ds.AcquisitionTimeSynchronized = "Y"  # the cart believes its own clock
    buffer = io.BytesIO()
    cart_ds.save_as(buffer)
    sent = buffer.getvalue()
    assert (cart_ds.AcquisitionDateTime, cart_ds.TimeSource, cart_ds.AcquisitionTimeSynchronized) == (
        "20000101000005+0800",
        "DEVICE CLOCK",
        "Y",
    )
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    with (
        DicomReceiver(settings, lan_object_store(outbox)) as r,
        StoreAssociation(_cart(r.port, deflate=deflate)) as cart,
    ):
        assert cart.store(sent).status == 0x0000
        assert cart.store(sent).status == 0x0000  # sent again: the same item, not "other content"
    (item,) = outbox.items()
    assert DEVICE_CLOCK_RESET in item.meta["flags"]
    assert item.meta["acquired_at"] == reset.isoformat()  # the cart's time, kept
    forwarded = _dataset(outbox.read_payload(item))
    assert (forwarded.AcquisitionDateTime, forwarded.TimeSource, forwarded.AcquisitionTimeSynchronized) == (
        "20000101000005+0800",
        "DEVICE UNTRUSTED",
        "N",
    )
    marked = ("TimeSource", "AcquisitionTimeSynchronized")
    assert [e for e in forwarded if e.keyword not in marked] == [e for e in cart_ds if e.keyword not in marked]
    assert (
        forwarded.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    ) is deflate  # as it came
    forwarded.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian  # what dciodvfy reads
    out = io.BytesIO()
    forwarded.save_as(out)
    assert dciodvfy_problems(out.getvalue()) == []


def test_a_cart_without_a_synchronization_module_whose_clock_is_not_believed_is_forwarded_valid(
    outbox: Outbox,
) -> None:
    """A cart that writes no Synchronization module (most do not) and whose clock reset: marking its
    time not believed added Acquisition Time Synchronized and Time Source alone, and the county got
    an object dciodvfy calls invalid (the module's Type 1 Synchronization Frame of Reference UID and
    Synchronization Trigger missing). Now the mark brings the module's other Type 1 elements too."""
    from tests.dicom_validation import dciodvfy_problems
    from tests.ecg_factories import make_recording
    from uploader.dicom_ecg import EcgStudyUids, StationInfo, recording_to_dicom_bytes
    from uploader.dicom_store import StoreAssociation

    reset = dt.datetime(2000, 1, 1, 0, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    rec = dataclasses.replace(make_recording(0), acquired_at=reset)
    uids = EcgStudyUids(study_uid="2.25.4101", series_uid="2.25.4102", sop_instance_uid="2.25.4103")
    cart_ds = _dataset(recording_to_dicom_bytes(rec, uids, StationInfo(station_name="cart-1", institution="Clinic")))
    for keyword in ("SynchronizationFrameOfReferenceUID", "SynchronizationTrigger", "AcquisitionTimeSynchronized"):
        delattr(cart_ds, keyword)
    del cart_ds.TimeSource
    buffer = io.BytesIO()
    cart_ds.save_as(buffer)
    assert dciodvfy_problems(buffer.getvalue()) == []  # valid as the cart sent it
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    with DicomReceiver(settings, lan_object_store(outbox)) as r, StoreAssociation(_cart(r.port, deflate=False)) as cart:
        assert cart.store(buffer.getvalue()).status == 0x0000
    (item,) = outbox.items()
    forwarded = _dataset(outbox.read_payload(item))
    assert (forwarded.TimeSource, forwarded.AcquisitionTimeSynchronized) == ("DEVICE UNTRUSTED", "N")
    out = io.BytesIO()
    forwarded.save_as(out)
    assert dciodvfy_problems(out.getvalue()) == []


def test_a_cart_on_the_lan_with_a_believable_clock_is_forwarded_byte_for_byte(outbox: Outbox) -> None:
    from tests.ecg_factories import make_recording
    from uploader.dicom_ecg import EcgStudyUids, StationInfo, recording_to_dicom_bytes
    from uploader.dicom_part10 import parse_part10
    from uploader.dicom_store import StoreAssociation

    uids = EcgStudyUids(study_uid="2.25.5001", series_uid="2.25.5002", sop_instance_uid="2.25.5003")
    sent = recording_to_dicom_bytes(make_recording(0), uids, StationInfo(station_name="cart-1"))
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    with DicomReceiver(settings, lan_object_store(outbox)) as r, StoreAssociation(_cart(r.port, deflate=False)) as cart:
        assert cart.store(sent).status == 0x0000
    (item,) = outbox.items()
    assert parse_part10(outbox.read_payload(item)).dataset_bytes() == parse_part10(sent).dataset_bytes()
    assert item.meta["flags"] == []


def _cart_ecg(acquired_at: dt.datetime, n: int) -> bytes:
    """The ECG the cart Acme Cardio Cart 5 SN-7 sends over the LAN as it records it, dated by its clock."""
    from devices.identity import DeviceIdentity, TimeSource
    from tests.ecg_factories import make_recording
    from uploader.dicom_ecg import EcgStudyUids, StationInfo, recording_to_dicom_bytes

    rec = dataclasses.replace(
        make_recording(n),
        acquired_at=acquired_at,
        time_source=TimeSource.DEVICE_CLOCK,
        device=DeviceIdentity(manufacturer="Acme Cardio", model="Cart 5", serial="SN-7"),
    )
    uids = EcgStudyUids(study_uid=f"2.25.{n}1", series_uid=f"2.25.{n}2", sop_instance_uid=f"2.25.{n}3")
    return recording_to_dicom_bytes(rec, uids, StationInfo(station_name="cart-1", institution="Clinic"))


def test_a_cart_on_the_lan_whose_clock_went_back_to_a_date_after_2020_is_not_believed(outbox: Outbox) -> None:
    """A cart's clock was reset to 2021-01-01 (after the 2020 floor) while the clinic is in 2026:
    its ECG went to the PACS as recorded in 2021, believed, and nobody was told to set the clock.
    The cart had sent an ECG dated today a moment before: one dated long before its newest is a
    clock gone back, kept but not believed and flagged like a reset (Today, `lastmile doctor`)."""
    from devices.identity import DEVICE_CLOCK_RESET
    from lastmile.config import Config
    from lastmile.doctor import Doctor
    from uploader.dicom_store import StoreAssociation

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    east8 = dt.timezone(dt.timedelta(hours=8))
    reset = dt.datetime(2021, 1, 1, 8, 0, 5, tzinfo=east8)
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    with DicomReceiver(settings, lan_object_store(outbox)) as r, StoreAssociation(_cart(r.port)) as cart:
        assert cart.store(_cart_ecg(now - dt.timedelta(hours=1), 71)).status == 0x0000
        assert cart.store(_cart_ecg(reset, 72)).status == 0x0000
    with DicomReceiver(settings, lan_object_store(outbox)) as r, StoreAssociation(_cart(r.port)) as cart:
        assert cart.store(_cart_ecg(reset + dt.timedelta(minutes=5), 73)).status == 0x0000  # after a restart
    today, went_back, after_restart = outbox.items()
    assert DEVICE_CLOCK_RESET in after_restart.meta["flags"], after_restart.meta
    assert today.meta["flags"] == []
    assert DEVICE_CLOCK_RESET in went_back.meta["flags"], went_back.meta
    assert went_back.meta["acquired_at"] == reset.isoformat()  # the cart's time, kept
    forwarded = _dataset(outbox.read_payload(went_back))
    assert (forwarded.TimeSource, forwarded.AcquisitionTimeSynchronized) == ("DEVICE UNTRUSTED", "N")
    assert forwarded.SOPInstanceUID == "2.25.723"
    config = Config()
    config.gateway.data_dir = str(outbox.data_dir)
    clock = [f for f in Doctor(config).check_devices() if f.topic == "ecg-clock"]
    assert [f.subject for f in clock] == ["Acme Cardio Cart 5 SN-7"] and "2021-01-01" in clock[0].message


def test_a_cart_on_the_lan_with_its_clock_set_ahead_keeps_its_uids_and_is_dated_by_receipt(outbox: Outbox) -> None:
    """The serial path puts the receipt time in place of a cart time ahead of it; the LAN path
    forwards the cart's object, so it marks its time not believed and keeps the cart's UIDs (a
    resend is the same instance): the item is dated by its receipt, the cart's time kept as the
    flag, and a resend of the same object is one item."""
    from uploader.dicom_store import StoreAssociation

    before = dt.datetime.now(dt.timezone.utc)
    ahead = (before + dt.timedelta(days=3)).replace(microsecond=0)
    sent = _cart_ecg(ahead, 81)
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    with DicomReceiver(settings, lan_object_store(outbox)) as r, StoreAssociation(_cart(r.port)) as cart:
        assert cart.store(sent).status == 0x0000
        assert cart.store(sent).status == 0x0000  # its retry: the same item
    after = dt.datetime.now(dt.timezone.utc)
    (item,) = outbox.items()
    assert item.meta["flags"] == [f"device-time-ahead:{ahead.isoformat()}"], item.meta
    assert before <= dt.datetime.fromisoformat(item.meta["acquired_at"]) <= after
    forwarded, as_sent = _dataset(outbox.read_payload(item)), _dataset(sent)
    assert (forwarded.TimeSource, forwarded.AcquisitionTimeSynchronized) == ("DEVICE UNTRUSTED", "N")
    assert forwarded.AcquisitionDateTime == as_sent.AcquisitionDateTime  # the cart's, as it wrote it
    uids = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    assert [forwarded[k].value for k in uids] == [as_sent[k].value for k in uids]
    assert (item.meta["study_uid"], item.meta["sop_instance_uid"]) == ("2.25.811", "2.25.813")


def test_an_ecg_under_the_id_the_doctor_said_is_his_other_id_is_his_on_the_lan(tmp_path: Path, outbox: Outbox) -> None:
    """The doctor checked the patient in by his ID card number, then by his clinic number and
    answered "his other ID": the cart on the LAN, still programmed with the first, sends his ECG.
    It is his (the session's IDs, read once per object): not flagged, its patient the cart's; after
    a check-in of someone else, the same ID is another patient's again."""
    from lastmile.clinic.patients import PatientContext, SameName

    context = PatientContext.open(tmp_path / "clinic", idle_timeout_s=900)
    sent = _dataset(_files()[1].read_bytes()).PatientID  # the cart's patient: "642341"
    now = dt.datetime.now(dt.timezone.utc)
    try:
        context.check_in(sent, "Wang^Wu=王^五", now=now)
        context.check_in("MZ-0042", "Wang^Wu=王^五", now=now, same_name=SameName.OTHER_ID)
        store = lan_object_store(outbox, lambda: context.patient_ids(dt.datetime.now(dt.timezone.utc)))
        settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=10)
        with DicomReceiver(settings, store) as r:
            assert _storescu(r.port, _files()[1]).returncode == 0
        (his,) = outbox.items()
        assert "patient-mismatch" not in his.meta["flags"] and his.patient["patient_id"] == sent
        context.check_in("MZ-0099", "Li^Si=李^四", now=dt.datetime.now(dt.timezone.utc))
        assert context.patient_ids(dt.datetime.now(dt.timezone.utc)) == {"MZ-0099"}
    finally:
        context.close()
