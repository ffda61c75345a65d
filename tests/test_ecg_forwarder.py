"""The forwarder against a real pynetdicom reading center on loopback (the demo's embedded one)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from lastmile.config import Config
from lastmile.demo.loopback import free_port
from lastmile.demo.reading_center import EmbeddedReadingCenter
from lastmile.ecg.intake import enqueue_recording
from lastmile.services.forward import forwarder_settings, open_outbox
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
    c.ecg.re_record_hold_s = 0  # the synthetic 2 s ECGs are re-record cases: forwarding is the subject here
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


def committed_at_center(center, expected: set[str], limit_s: float = 10.0) -> set[str]:
    """What the reading center counts as committed once its report's answer came back (it
    records that a moment after our listener took the report: we may have purged already)."""
    deadline = time.monotonic() + limit_s
    while center.committed != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return center.committed


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
    assert committed_at_center(center, set(center.received)) == set(center.received)
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
    assert dropped and committed_at_center(center, set(center.received)) == set(center.received)
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
    with EcgForwarder(
        outbox,
        forwarder_settings(config),
        on_event=lambda kind, info: reports.append(info) if kind == "committed" else None,
    ) as fwd:
        pump(fwd, lambda: counts(outbox).get("purged", 0) == 1, limit_s=20)
    assert any(r["failed"] == 1 for r in reports)  # first report: failed (0x0112) → re-sent
    assert center.received[lost_once[0]].times_stored == 1
    assert committed_at_center(center, {lost_once[0]}) == {lost_once[0]}  # recorded a moment after our handler
    # the one expected re-send, counted: one C-STORE, one commitment failure, one more C-STORE
    assert c_stores == lost_once * 2 and sum(r["failed"] for r in reports) == 1
    outbox.close()


# -- a full data partition drains ------------------------------------------------------------------

FULL_DISK_SCRIPT = r"""
import errno, json, os, sqlite3, sys, threading, time
from pathlib import Path
from lastmile.config import Config
from lastmile.ecg.intake import enqueue_recording
from lastmile.services.forward import forwarder_settings
from tests.ecg_factories import make_recording
from uploader.ecg_forwarder import EcgForwarder
from uploader.errors import OutboxFullError
from uploader.outbox import Outbox

mnt, port, listen = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = Config()
config.ecg.re_record_hold_s = 0  # synthetic ECGs: quality is not this test's subject
config.gateway.data_dir = str(mnt / "data")
rc = config.reading_center
rc.host, rc.port, rc.listen_port, rc.listen_host = "127.0.0.1", port, listen, "127.0.0.1"
rc.called_ae, rc.calling_ae, rc.timeout_s, rc.commitment_timeout_s = "READING_CENTER", "LASTMILE", 10.0, 5.0
o = config.outbox
o.min_free_mb, o.backoff_base_s, o.backoff_max_s = 2, 0.1, 0.5
data = Path(config.gateway.data_dir)

def opened(**kw):  # as lastmile.data_dir.open_outbox does, plus test-only overrides
    return Outbox.open(data, min_free_bytes=o.min_free_mb * 2**20, backoff_base_s=0.1, backoff_max_s=0.5, **kw)

def free():
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize

out = {"uids": {}}
intake = opened()  # the acquire process's outbox: sets the reserve aside while there is room
reserve = data / "reserve.space"
out["reserve_at_start"] = reserve.exists()
first_reserve = reserve.stat().st_ino
# Days without network: the doctor records ECGs (long ones go to files, short ones inline)
# until the gateway refuses.
for i in range(1000):
    try:
        result = enqueue_recording(intake, make_recording(i, seconds=10.0 if i % 3 else 2.0), config, key=f"k{i}")
    except OutboxFullError as exc:
        out["refused_when_low"] = str(exc)
        break
    out["uids"][f"k{i}"] = result.item.meta["sop_instance_uid"]
intake.checkpoint()  # the WAL is empty, as after any purge
# Then something else fills the partition to the last block (a log, another program).
fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"\0" * 4096)
except OSError as exc:
    assert exc.errno == errno.ENOSPC
os.close(fd)
out["free_when_full"] = free()
try:
    enqueue_recording(intake, make_recording(5000), config, key="while-full")
except OutboxFullError as exc:
    out["refused_when_full"] = str(exc)
# Control: without the reserve the forwarder cannot even claim an item.
control = opened(reserve_bytes=0)
try:
    control.claim("dicom", 10, time.time())
    out["control"] = "claimed"
except sqlite3.OperationalError as exc:
    out["control"] = str(exc)
control._conn.close()
# The link returns: the forward process drains the partition.
wal = data / "outbox.sqlite-wal"
out["wal_max"] = 0
events = {}

def count(kind, info):
    events[kind] = events.get(kind, 0) + (info.get("items", 1) if kind == "link-down" else 1)

with opened() as outbox, EcgForwarder(outbox, forwarder_settings(config), on_event=count) as fwd:
    stop = threading.Event()
    deadline = time.monotonic() + 120
    while outbox.stats(time.time())["counts"]["purged"] < len(out["uids"]):
        assert time.monotonic() < deadline, outbox.stats(time.time())
        time.sleep(min(fwd.step(stop), 0.05))
        out["wal_max"] = max(out["wal_max"], wal.stat().st_size if wal.exists() else 0)
    out["reserve_after_drain"] = reserve.exists()
    out["reserve_released"] = not reserve.exists() or reserve.stat().st_ino != first_reserve  # a new file
    # intake takes ECGs again, and they go too
    out["uids"]["after"] = enqueue_recording(intake, make_recording(6000), config, key="after").item.meta["sop_instance_uid"]
    while outbox.stats(time.time())["counts"]["purged"] < len(out["uids"]):
        assert time.monotonic() < deadline, outbox.stats(time.time())
        time.sleep(min(fwd.step(stop), 0.05))
    out["counts"] = outbox.stats(time.time())["counts"]
    out["integrity"] = outbox.db.execute("PRAGMA integrity_check").fetchone()[0]
    out["events"] = events
intake.close()
print(json.dumps(out))
"""


def test_a_full_disk_drains_and_takes_ecgs_again(tmp_path: Path) -> None:
    """On a 16 MB tmpfs: ECGs queue until intake refuses (with a message for the doctor), the
    partition is then filled to the last block, and the forwarder still sends everything to a
    real reading center (storage commitment included), purges it, and intake takes ECGs again.
    A control shows the forwarder could not have claimed an item without the reserve."""
    import json

    from tests.conftest import run_on_private_tmpfs

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    port, listen = free_port(), free_port()
    center = EmbeddedReadingCenter(port=port, gateway_port=listen, report_delay_s=0.05)
    center.start()
    try:
        proc = run_on_private_tmpfs(mnt, "16m", FULL_DISK_SCRIPT, str(port), str(listen))
    finally:
        center.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    print(
        f"\nfull disk: {len(out['uids']) - 1} ECGs queued; WAL at most {out['wal_max'] / 1024:.0f} KB while "
        f"draining; forwarder events {out['events']}"
    )
    assert out["reserve_at_start"] and out["free_when_full"] < 4096
    for refusal in (out["refused_when_low"], out["refused_when_full"]):
        assert refusal.startswith("storage full: ") and "ECGs are waiting to be sent" in refusal, refusal
        assert "connect the network" in refusal and "county IT" in refusal and "Nothing was lost" in refusal
    assert "database or disk is full" in out["control"]  # the failure the reserve is for
    assert out.get("reserve_released") and out["reserve_after_drain"]  # used, then set aside again
    assert out["integrity"] == "ok"
    assert out["counts"]["purged"] == len(out["uids"]) and out["counts"]["quarantined"] == 0
    assert set(center.received) == set(out["uids"].values())  # nothing lost
    # nothing twice, but for a store whose answer was lost (a retry the forwarder reported)
    again = sum(o.times_stored - 1 for o in center.received.values())
    assert again <= out["events"].get("retry", 0) + out["events"].get("link-down", 0), out["events"]


def test_a_report_that_comes_at_once_finds_its_transaction_recorded(config, caplog) -> None:
    """Found by bench/kill_campaign.py: a PACS that reports before the gateway has written down
    the transaction it asked for (a slow SD card, or the forwarder killed between the N-ACTION and
    that write) had its report refused as a forgery ("not issued by this gateway", a security
    event) and the items waited a whole commitment timeout. The transaction is known before the
    N-ACTION leaves (the fuzz branch found the same seam and its fix is the one kept).

    The write that records the transaction after the N-ACTION (`set_transaction`) is held until
    the gateway has taken the PACS's report for that very transaction: the report provably
    comes first, however fast or slow the machine."""
    rc = config.reading_center
    rc.commitment_timeout_s = 120.0  # a refused report would leave the items waiting past the test
    center = EmbeddedReadingCenter(port=rc.port, gateway_port=rc.listen_port, report_delay_s=0.0)
    center.start()
    outbox = open_outbox(config)
    record = outbox.set_transaction
    taken: set[str] = set()  # transactions whose report the gateway took (its "committed" event)
    report_taken = threading.Condition()
    reported_first: list[bool] = []  # per transaction written: was its report taken before?

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "committed":
            with report_taken:
                taken.add(info["transaction_uid"])
                report_taken.notify_all()

    def held_record(item_ids: Sequence[int], transaction_uid: str, now: float) -> None:
        # the SD card busy until this transaction's report is taken (a refused one never is: 10 s)
        with report_taken:
            reported_first.append(report_taken.wait_for(lambda: transaction_uid in taken, timeout=10.0))
        record(item_ids, transaction_uid, now)

    outbox.set_transaction = held_record
    try:
        for i in range(3):
            enqueue_recording(outbox, make_recording(i), config, key=f"k{i}")
        with EcgForwarder(outbox, forwarder_settings(config), on_event=on_event) as fwd:
            pump(fwd, lambda: counts(outbox).get("purged", 0) == 3 or False in reported_first, limit_s=30.0)
    finally:
        center.stop()
        outbox.close()
    assert reported_first and all(reported_first), (
        f"a report that came before its transaction was written was not taken: {reported_first}"
    )
    assert not [r for r in caplog.records if "refused storage commitment report" in r.getMessage()]


def test_the_metered_budget_counts_every_byte_the_gateway_put_on_the_link(config, center) -> None:
    """The day's budget means what the carrier bills: the bytes on the metered link. A stored
    object was counted as its deflated data set only (no command set, no PDU headers, no
    association set-up or release), while an object cut short counted the PDUs written: two
    measures for one budget, and a clinic whose link carried more than the budget said."""
    from tests.link_emulator import PROFILES, LinkRelay

    rc = config.reading_center
    rc.associations, rc.storage_commitment, rc.deflate = 1, False, True
    rc.metered.daily_budget_mb = 100.0  # metered, never shut here
    outbox = open_outbox(config)
    for i in range(3):
        enqueue_recording(outbox, make_recording(i), config, key=f"k{i}")
    with LinkRelay(PROFILES["lan"], "127.0.0.1", rc.port) as link:
        rc.port = link.port
        with EcgForwarder(outbox, forwarder_settings(config)) as fwd:
            pump(fwd, lambda: len(center.received) == 3, limit_s=60.0)
            assert fwd.meter is not None
        assert link.up is not None
        on_the_link = link.up.bytes_total  # the forwarder closed: its release went out before
    assert fwd.meter.spent_today(time.time()) == on_the_link
    outbox.close()


def test_asking_again_for_a_lost_commitment_report_counts_against_the_budget(config) -> None:
    """A PACS whose reports never reach the gateway is asked again and again for storage
    commitment, each time on an association of its own over the metered link: uncounted, the
    budget said less than the carrier billed."""
    from tests.link_emulator import PROFILES, LinkRelay

    rc = config.reading_center
    rc.associations, rc.storage_commitment, rc.commitment_timeout_s = 1, True, 0.5
    rc.metered.daily_budget_mb = 100.0
    # its reports go to a port nobody listens on: every request goes unanswered
    center = EmbeddedReadingCenter(port=rc.port, gateway_port=free_port(), report_delay_s=0.0)
    center.start()
    outbox = open_outbox(config)
    enqueue_recording(outbox, make_recording(0), config, key="k0")
    asked: list[str] = []
    try:
        with LinkRelay(PROFILES["lan"], "127.0.0.1", rc.port) as link:
            rc.port = link.port
            settings = forwarder_settings(config)
            with EcgForwarder(outbox, settings, on_event=lambda kind, info: asked.append(kind)) as fwd:
                pump(fwd, lambda: asked.count("commitment-asked") >= 3, limit_s=60.0)
                assert fwd.meter is not None
            assert link.up is not None
            on_the_link = link.up.bytes_total
    finally:
        center.stop()
    assert fwd.meter.spent_today(time.time()) == on_the_link
    outbox.close()
