"""The clinic-LAN DICOM receiver with dcmtk's storescu as the cart: objects kept as received in a
real outbox before Success, calling-AE allow-list, SOP-class list, repeated instances
idempotent, failure answered "out of resources", and a kill -9 right after Success loses nothing."""

from __future__ import annotations

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

from firmware_bridge.dicom_receiver import DicomReceiver, ReceiverConfigError, ReceiverSettings
from lastmile.commands.ecg import store_received_callable
from tests.conftest import REPO, require_tool, shared_file
from uploader.outbox import Outbox

CART = "CART1"
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the cart's malformed UIDs


def _storescu(port: int, *files: Path, calling: str = CART) -> subprocess.CompletedProcess:
    tool = require_tool("storescu")
    return subprocess.run([tool, "-aet", calling, "-aec", "LASTMILE", "-to", "10", "-ta", "10", "-td", "10",
                           "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TCP_NODELAY": "1"})


def _dataset(data: bytes) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), force=True)


@pytest.fixture()
def outbox(tmp_path: Path):
    box = Outbox.open(tmp_path / "data", min_free_bytes=0)
    yield box
    box.close()


@pytest.fixture()
def receiver(outbox: Outbox):
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=10)
    with DicomReceiver(settings, store_received_callable(outbox)) as r:
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


def test_unknown_caller_is_rejected(receiver: DicomReceiver, outbox: Outbox) -> None:
    result = _storescu(receiver.port, _files()[1], calling="ROGUE")
    assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stderr
    assert outbox.items() == []


def test_sop_class_not_in_the_list_is_not_accepted(outbox: Outbox) -> None:
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), sop_classes=("1.2.840.10008.5.1.4.1.1.2",),
                                timeout_s=10)
    with DicomReceiver(settings, store_received_callable(outbox)) as r:
        result = _storescu(r.port, _files()[1])
    assert result.returncode != 0
    assert outbox.items() == []


def test_failure_to_store_is_not_answered_success(outbox: Outbox) -> None:
    def failing(obj) -> None:
        raise OSError("disk full")

    with DicomReceiver(ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=10), failing) as r:
        result = _storescu(r.port, _files()[1])
    assert result.returncode != 0  # storescu reports the 0xA700 status: the cart keeps its copy


def test_empty_allow_list_refuses_to_start(outbox: Outbox) -> None:
    with pytest.raises(ReceiverConfigError, match="allowed_callers"):
        DicomReceiver(ReceiverSettings(port=0), store_received_callable(outbox))


RECEIVER_PROCESS = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from firmware_bridge.dicom_receiver import DicomReceiver, ReceiverSettings
    from lastmile.commands.ecg import store_received_callable
    from uploader.outbox import Outbox
    outbox = Outbox.open(Path({data!r}), min_free_bytes=0)
    receiver = DicomReceiver(ReceiverSettings(port=0, allowed_callers=({cart!r},), timeout_s=10),
                             store_received_callable(outbox))
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

    Only the object with valid UIDs: the forwarder (uploader.dicom_net.parse_part10) refuses to
    send the ECGToolkit file's malformed UIDs, which the receiver keeps as received."""
    import threading

    from lastmile.config import Config
    from lastmile.forward_service import forwarder_settings, open_outbox
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
            with DicomReceiver(settings, store_received_callable(outbox)) as receiver:
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
            assert (arrived.StudyInstanceUID, arrived.SeriesInstanceUID) == (sent.StudyInstanceUID,
                                                                            sent.SeriesInstanceUID)
            for group_sent, group_arrived in zip(sent.WaveformSequence, arrived.WaveformSequence):
                assert bytes(group_arrived.WaveformData) == bytes(group_sent.WaveformData)


def test_other_current_patient_is_flagged_in_meta(outbox: Outbox) -> None:
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=10)
    with DicomReceiver(settings, store_received_callable(outbox, lambda: "P-OTHER")) as r:
        assert _storescu(r.port, _files()[1]).returncode == 0
    (item,) = outbox.items()
    assert item.meta["flags"] == ["patient-mismatch"] and item.patient["patient_id"] == "642341"


def test_receiver_from_configuration(outbox: Outbox) -> None:
    from lastmile.commands.ecg import start_lan_receiver
    from lastmile.config import Config
    from tests.conftest import require_private_netns
    from tests.peers import free_port

    require_private_netns()  # the configured receiver listens on every interface, as on the LAN
    config = Config()
    assert start_lan_receiver(config, outbox) is None  # disabled by default
    section = config.lan_receiver
    section.enabled, section.port, section.allowed_callers = True, free_port(), [CART]
    receiver = start_lan_receiver(config, outbox)
    try:
        assert _storescu(receiver.port, _files()[1]).returncode == 0
    finally:
        receiver.stop()
    assert len(outbox.items()) == 1
