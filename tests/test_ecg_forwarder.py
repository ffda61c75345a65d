"""The forwarder against a real pynetdicom reading center on loopback (the demo's embedded one)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lastmile.config import Config
from lastmile.demo import free_port
from lastmile.demo_reading_center import EmbeddedReadingCenter
from lastmile.ecg_intake import enqueue_recording
from lastmile.forward_service import forwarder_settings, open_outbox
from tests.ecg_factories import make_recording
from uploader.ecg_forwarder import EcgForwarder


@pytest.fixture
def config(tmp_path: Path) -> Config:
    c = Config()
    c.gateway.data_dir = str(tmp_path / "data")
    rc = c.reading_center
    rc.port, rc.listen_port = free_port(), free_port()
    rc.listen_host = "127.0.0.1"
    rc.called_ae, rc.calling_ae = "READING_CENTER", "LASTMILE"
    rc.associations, rc.batch_size, rc.timeout_s = 2, 3, 5.0
    rc.commitment_timeout_s = 3.0
    c.outbox.backoff_base_s, c.outbox.backoff_max_s, c.outbox.min_free_mb = 0.1, 0.5, 1
    return c


@pytest.fixture
def center(config: Config):
    rc = config.reading_center
    c = EmbeddedReadingCenter(port=rc.port, gateway_port=rc.listen_port, report_delay_s=0.05)
    c.start()
    yield c
    c.stop()


def pump(forwarder: EcgForwarder, until, limit_s: float = 20.0) -> None:
    stop = threading.Event()
    deadline = time.monotonic() + limit_s
    while not until():
        assert time.monotonic() < deadline, "forwarder made no progress in time"
        time.sleep(min(forwarder.step(stop), 0.05))


def counts(outbox) -> dict:
    return outbox.stats(time.time())["counts"]


def test_everything_arrives_once_is_committed_and_purged(config, center) -> None:
    outbox = open_outbox(config)
    keys = [f"k{i}" for i in range(7)]
    for i, key in enumerate(keys):
        enqueue_recording(outbox, make_recording(i), config, key=key)
    with EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        pump(fwd, lambda: counts(outbox).get("purged", 0) == len(keys))
    assert len(center.received) == len(keys)
    assert all(o.times_stored == 1 for o in center.received.values())
    assert len({o.study_uid for o in center.received.values()}) == len(keys)
    assert center.committed == set(center.received)
    # the purged items keep no patient data
    for item in outbox.items(state=None):
        assert item.patient is None
    outbox.close()


def test_enqueue_is_idempotent_and_uids_are_minted_once(config) -> None:
    outbox = open_outbox(config)
    rec = make_recording(1)
    first = enqueue_recording(outbox, rec, config, key="same")
    again = enqueue_recording(outbox, rec, config, key="same")
    assert first.created and not again.created
    assert again.item.id == first.item.id
    assert again.item.meta["sop_instance_uid"] == first.item.meta["sop_instance_uid"]
    assert outbox.read_payload(again.item) == outbox.read_payload(first.item)
    outbox.close()


def test_reading_center_outage_mid_batch_loses_and_duplicates_nothing(config, center) -> None:
    outbox = open_outbox(config)
    uid_of: dict[int, str] = {}  # item id -> SOP Instance UID (a purged item forgets it)

    def enqueue(i: int) -> None:
        item = enqueue_recording(outbox, make_recording(i), config, key=f"k{i}").item
        uid_of[item.id] = item.meta["sop_instance_uid"]

    for i in range(10):
        enqueue(i)
    events: list[str] = []
    sent: list[int] = []  # item ids, one per C-STORE the gateway saw succeed

    def on_event(kind: str, info: dict) -> None:
        events.append(kind)
        if kind == "sent":
            sent.append(info["id"])

    with EcgForwarder(outbox, forwarder_settings(config), on_event=on_event) as fwd:
        stop = threading.Event()
        fwd.step(stop)  # first batches go through
        center.stop()
        for i in range(10, 14):
            enqueue(i)
        for _ in range(3):
            fwd.step(stop)
            time.sleep(0.2)
        assert "link-down" in events
        assert counts(outbox).get("quarantined", 0) == 0
        center.start()
        pump(fwd, lambda: counts(outbox).get("purged", 0) == 14, limit_s=30)
    assert len(center.received) == 14
    assert len({o.study_uid for o in center.received.values()}) == 14
    # What the reading center counted: one C-STORE per object, no re-send across the outage (no
    # commitment failed), and exactly the C-STOREs the gateway recorded as sent.
    assert {uid: o.times_stored for uid, o in center.received.items()} == dict.fromkeys(center.received, 1)
    assert sorted(uid_of[i] for i in sent) == sorted(center.received)
    outbox.close()


def test_stat_items_go_first(config, center) -> None:
    config.reading_center.associations = 1
    config.reading_center.batch_size = 2
    outbox = open_outbox(config)
    for i in range(5):
        enqueue_recording(outbox, make_recording(i), config, key=f"r{i}")
    stat = enqueue_recording(outbox, make_recording(99, stat=True), config, key="stat")
    with EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        fwd.run_round(threading.Event())
    assert stat.item.meta["sop_instance_uid"] in center.received
    outbox.close()


def test_commitment_report_lost_is_asked_again_with_a_new_transaction(config, center) -> None:
    outbox = open_outbox(config)
    enqueue_recording(outbox, make_recording(3), config, key="k")
    config.reading_center.commitment_timeout_s = 0.5
    real_send = center._send_report
    dropped: list[str] = []

    def drop_first(txn, refs):
        if not dropped:
            dropped.append(txn)  # the PACS never reports this transaction
            return
        real_send(txn, refs)

    center._send_report = drop_first  # type: ignore[method-assign]
    with EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        pump(fwd, lambda: counts(outbox).get("purged", 0) == 1, limit_s=15)
    assert dropped and center.committed == set(center.received)
    outbox.close()


def test_intake_stores_a_deflated_object_equal_to_the_built_one(config) -> None:
    import io

    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.dicom_validation import dciodvfy_problems
    from uploader.dicom_ecg import EcgStudyUids, StationInfo, recording_to_dicom_bytes

    outbox = open_outbox(config)
    rec = make_recording(5)
    item = enqueue_recording(outbox, rec, config, key="k").item
    stored = dcmread(io.BytesIO(outbox.read_payload(item)))
    assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    uids = EcgStudyUids(item.meta["study_uid"], item.meta["series_uid"], item.meta["sop_instance_uid"])
    plain = recording_to_dicom_bytes(rec, uids, StationInfo(config.gateway.id, config.gateway.institution))
    reference = dcmread(io.BytesIO(plain))
    assert stored.SOPInstanceUID == reference.SOPInstanceUID
    assert stored.WaveformSequence[0].WaveformData == reference.WaveformSequence[0].WaveformData
    assert item.size < 0.8 * len(plain)
    assert dciodvfy_problems(plain) == []
    outbox.close()


def test_items_the_pacs_reports_as_failed_are_sent_again(config, center) -> None:
    outbox = open_outbox(config)
    enqueue_recording(outbox, make_recording(7), config, key="k")
    lost_once: list[str] = []
    c_stores: list[str] = []  # every C-STORE the reading center answered, lost or kept
    real_store = center._on_store

    def forget_first_store(event):
        c_stores.append(str(event.dataset.SOPInstanceUID))
        status = real_store(event)
        if not lost_once:  # the PACS answers success but then loses the object
            lost_once.append(str(event.dataset.SOPInstanceUID))
            center.received.pop(lost_once[0])
        return status

    center._on_store = forget_first_store  # type: ignore[method-assign]
    center.stop()
    center.start()  # handlers are bound at start
    reports: list[dict] = []
    with EcgForwarder(outbox, forwarder_settings(config),
                      on_event=lambda kind, info: reports.append(info) if kind == "committed" else None) as fwd:
        pump(fwd, lambda: counts(outbox).get("purged", 0) == 1, limit_s=20)
    assert any(r["failed"] == 1 for r in reports)  # first report: failed (0x0112) → re-sent
    assert center.received[lost_once[0]].times_stored == 1 and center.committed == {lost_once[0]}
    # the one expected re-send, counted: one C-STORE, one commitment failure, one more C-STORE
    assert c_stores == lost_once * 2 and sum(r["failed"] for r in reports) == 1
    outbox.close()
