"""The forward path against real reading centers: Orthanc (with storage commitment), dcmtk's
storescp (without it, plain and TLS) and a scripted pynetdicom SCP answering chosen statuses.

Orthanc runs inside the private network namespace scripts/test.sh creates.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lastmile.cli import main as cli
from lastmile.config import Config
from lastmile.ecg.intake import enqueue_recording
from lastmile.services.forward import forwarder_settings, open_outbox
from tests.conftest import require_private_netns
from tests.ecg_factories import make_recording
from tests.forward_setup import make_config, send_report
from tests.peers import free_port, gateway_modality
from tests.waiting import wait_for
from uploader.ecg_forwarder import EcgForwarder
from uploader.outbox import DB_NAME, LOCKS_DIR, ItemState
from uploader.payload_files import OwnerLock


def write_toml(config: Config, path: Path, outbox_extra: str = "") -> Path:
    rc = config.reading_center
    path.write_text(
        f"""
[gateway]
data_dir = "{config.gateway.data_dir}"
[reading_center]
host = "{rc.host}"
port = {rc.port}
called_ae = "{rc.called_ae}"
calling_ae = "{rc.calling_ae}"
listen_port = {rc.listen_port}
listen_host = "127.0.0.1"
associations = {rc.associations}
batch_size = {rc.batch_size}
timeout_s = {rc.timeout_s}
commitment_timeout_s = {rc.commitment_timeout_s}
storage_commitment = {str(rc.storage_commitment).lower()}
no_commitment_policy = "{rc.no_commitment_policy}"
[outbox]
backoff_base_s = 0.1
backoff_max_s = 0.5
min_free_mb = 1
config_fault_retry_s = 0.5
"""
        + outbox_extra
    )
    return path


def enqueue(config: Config, n: int, start: int = 0) -> dict[str, str]:
    """n recordings → outbox; returns key → SOP Instance UID."""
    with open_outbox(config) as outbox:
        return {
            f"k{i}": enqueue_recording(outbox, make_recording(i), config, key=f"k{i}").item.meta["sop_instance_uid"]
            for i in range(start, start + n)
        }


def counts(config: Config) -> dict:
    with open_outbox(config) as outbox:
        return outbox.stats(time.time())["counts"]


def wait_for_counts(config: Config, what: str, **states: int) -> None:
    """Until the outbox holds exactly `states[s]` items in each state `s` named (another process sends)."""
    wait_for(lambda: all(counts(config).get(state) == n for state, n in states.items()), 150, what=what, interval=0.05)


def pump(config: Config, until, limit_s: float = 60.0) -> None:
    stop = threading.Event()
    deadline = time.monotonic() + limit_s
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        while not until(outbox):
            assert time.monotonic() < deadline, f"no progress: {outbox.stats(time.time())}"
            time.sleep(min(fwd.step(stop), 0.1))


def done(n: int):
    return lambda outbox: outbox.stats(time.time())["counts"].get("purged", 0) >= n


@pytest.mark.orthanc
def test_orthanc_receives_each_study_once_commits_and_we_purge(tmp_path, orthanc_factory) -> None:
    listen = free_port()
    orthanc = orthanc_factory(modalities=gateway_modality("CLINIC01", listen))
    config = make_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen)
    uids = enqueue(config, 12)
    pump(config, done(12))
    assert orthanc.sop_instance_uids() == set(uids.values())
    assert orthanc.c_stores() == dict.fromkeys(uids.values(), 1)  # each C-STOREd once, no silent re-send
    assert len(orthanc.study_uids()) == 12
    with open_outbox(config) as outbox:
        assert all(i.patient is None and i.state == ItemState.PURGED for i in outbox.items())


@pytest.mark.orthanc
def test_orthanc_refusing_our_ae_is_a_fault_not_a_quarantine(tmp_path, orthanc_factory, capsys) -> None:
    listen = free_port()
    orthanc = orthanc_factory(modalities={})  # knows no gateway: rejects our calling AE
    config = make_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen)
    cfg_file = write_toml(config, tmp_path / "lastmile.toml")
    enqueue(config, 4)
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        result = fwd.run_round(threading.Event())
        assert result.fault and result.quarantined == 0
        c = outbox.stats(time.time())["counts"]
        assert c.get("queued") == 4 and not c.get("quarantined") and not c.get("sending")
        assert all(i.attempts == 0 for i in outbox.items())  # a fault is not the items' fault
    assert cli(["-c", str(cfg_file), "queue"]) == 0
    out = capsys.readouterr().out
    assert "FAULT" in out and "refuses this gateway" in out
    assert cli(["-c", str(cfg_file), "echo"]) == 1
    assert "refuses this gateway" in capsys.readouterr().out
    # the county fixes its configuration: everything goes
    orthanc.restart(modalities=gateway_modality("CLINIC01", listen))
    time.sleep(0.6)
    pump(config, done(4))
    assert len(orthanc.sop_instance_uids()) == 4
    assert cli(["-c", str(cfg_file), "echo"]) == 0
    assert cli(["-c", str(cfg_file), "queue", "--json"]) == 0
    assert '"fault": null' in capsys.readouterr().out


def test_per_object_statuses_permanent_is_quarantined_the_rest_flows(tmp_path, scripted_scp_factory, capsys) -> None:
    config = make_config(tmp_path, 0, "SCRIPTED", storage_commitment=False)
    uids = enqueue(config, 6)
    scp = scripted_scp_factory(
        statuses={uids["k1"]: [0xA900], uids["k2"]: [0xA700, 0x0000], uids["k3"]: [0xC123], uids["k4"]: [0xB000]}
    )
    config.reading_center.port = scp.port
    pump(config, lambda ob: ob.stats(time.time())["counts"].get("sent", 0) == 4)
    with open_outbox(config) as outbox:
        by_key = {i.key: i for i in outbox.items()}
        assert by_key["k1"].state == ItemState.QUARANTINED and "0xA900" in by_key["k1"].quarantine_reason
        assert by_key["k3"].state == ItemState.QUARANTINED and "0xC123" in by_key["k3"].quarantine_reason
        assert (
            by_key["k2"].state == ItemState.SENT and by_key["k2"].attempts == 2
        )  # charged per send: 0xA700, then stored
        assert by_key["k4"].state == ItemState.SENT  # warning = stored
    cfg_file = write_toml(config, tmp_path / "lastmile.toml")
    assert cli(["-c", str(cfg_file), "queue"]) == 0
    out = capsys.readouterr().out
    assert "quarantined #" in out and "0xA900" in out
    assert cli(["-c", str(cfg_file), "retry", "--quarantined"]) == 0
    assert counts(config).get("queued") == 2


@pytest.mark.parametrize("policy", ["keep", "purge"])
def test_storescp_without_storage_commitment_follows_the_policy(tmp_path, storescp_factory, policy) -> None:
    scp = storescp_factory()
    config = make_config(tmp_path, scp.port, scp.ae_title, no_commitment_policy=policy)
    enqueue(config, 3)
    if policy == "keep":
        pump(config, lambda ob: ob.stats(time.time())["counts"].get("sent", 0) == 3)
    else:
        pump(config, done(3))
    assert len(scp.received_files()) == 3
    assert sorted(scp.c_stores().values()) == [1, 1, 1]  # what storescp saw: three C-STOREs, one each
    c = counts(config)
    assert c.get("quarantined", 0) == 0 and c.get("queued", 0) == 0


def test_dicom_tls_to_storescp(tmp_path, storescp_factory, tls_material) -> None:
    scp = storescp_factory(tls=tls_material)
    config = make_config(tmp_path, scp.port, scp.ae_title, storage_commitment=False)
    tls = config.reading_center.tls
    tls.enabled, tls.ca_file = True, str(tls_material.ca_cert)
    tls.cert_file, tls.key_file = str(tls_material.client_cert), str(tls_material.client_key)
    enqueue(config, 2)
    pump(config, lambda ob: ob.stats(time.time())["counts"].get("sent", 0) == 2)
    assert len(scp.received_files()) == 2
    assert sorted(scp.c_stores().values()) == [1, 1]


@pytest.mark.orthanc
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path, orthanc_factory) -> None:
    require_private_netns()
    listen = free_port()
    orthanc = orthanc_factory(modalities=gateway_modality("CLINIC01", listen))
    config = make_config(
        tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen, batch_size=4, commitment_timeout_s=2.0
    )
    cfg_file = write_toml(config, tmp_path / "lastmile.toml")
    n = 60
    uids = enqueue(config, n)
    rng = random.Random(20261123)
    kills = mid_send = 0
    for _ in range(22):
        seen = orthanc.c_stores()
        stores = sum(seen.values())
        proc = subprocess.Popen(
            [sys.executable, "-m", "lastmile", "-c", str(cfg_file), "forward"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # While objects are left to send, each kill is aimed at the sending: once this process's
        # first C-STORE reached Orthanc, a moment later (a timer from start-up mostly hit start-up
        # on a loaded machine, and on a fast one found everything sent after the first few kills).
        # Then the kills land at start-up, awaiting the commitment, purging.
        aimed = len(seen) < n
        if aimed:
            deadline = time.monotonic() + 60
            while sum(orthanc.c_stores().values()) == stores and proc.poll() is None:
                assert time.monotonic() < deadline, "no C-STORE from the forward process"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.1))
        else:
            time.sleep(rng.uniform(0.4, 1.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            mid_send += aimed
        proc.wait(10)
    assert kills >= 20 and mid_send >= 3, (kills, mid_send)
    # mode=rw: a missing file is an error here, not a new empty database that passes every check
    conn = sqlite3.connect(f"file:{Path(config.gateway.data_dir) / DB_NAME}?mode=rw", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == n  # the real outbox, every item in it
    finally:
        conn.close()
    pump(config, done(n), limit_s=120)
    assert orthanc.sop_instance_uids() == set(uids.values())  # every recording, once
    assert len(orthanc.study_uids()) == n  # one study per recording
    assert len(orthanc.instances()) == n
    # What Orthanc received, C-STORE by C-STORE: a process killed after a C-STORE but before it
    # recorded "sent" sends that object again (the PACS keeps one copy: same SOP Instance UID).
    # Only those are allowed: at most the items one process can have in flight, per kill.
    stores = orthanc.c_stores()
    assert set(stores) == set(uids.values())
    in_flight = config.reading_center.batch_size * config.reading_center.associations
    resent = sum(stores.values()) - n
    assert 0 <= resent <= kills * in_flight, (resent, kills, stores)
    c = counts(config)
    assert c.get("sending", 0) == 0 and c.get("purged") == n


@pytest.mark.orthanc
def test_orthanc_dies_mid_batch_and_returns_everything_arrives_exactly_once(tmp_path, orthanc_factory) -> None:
    listen = free_port()
    orthanc = orthanc_factory(modalities=gateway_modality("CLINIC01", listen))
    # one association, and no more: on a loaded machine even loopback can measure like a far link
    # (30-50 ms "round trips", < 20 Mbit/s), and the round then opens up to max_associations - each
    # with its own C-STORE in flight when the power goes (seen under stress-ng: two re-sent)
    config = make_config(
        tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen, batch_size=30, associations=1, max_associations=1
    )
    uids = enqueue(config, 30)
    stop = threading.Event()
    failed_commitments: list[int] = []
    sent: list[int] = []

    def on_event(kind: str, info: dict) -> None:
        if kind == "committed":
            failed_commitments.append(info["failed"])
        elif kind == "sent":
            sent.append(info["id"])
            if len(sent) == 10:
                # a power cut at the reading center, mid-batch: after the 10th study is acknowledged,
                # on the sending thread (a timer raced the batch: on a fast machine all 30 were
                # stored before it fired)
                orthanc.kill()

    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config), on_event=on_event) as fwd:
        first = fwd.run_round(stop)
        assert fwd.associations_for_link() == 1
        assert first.sent == 10 and first.transient == 20  # the batch was cut short, the rest kept
        c = outbox.stats(time.time())["counts"]
        assert c.get("quarantined", 0) == 0 and c.get("queued", 0) > 0
        orthanc.start()  # back, on the same storage
        deadline = time.monotonic() + 60
        while outbox.stats(time.time())["counts"].get("purged", 0) < 30:
            assert time.monotonic() < deadline, outbox.stats(time.time())
            time.sleep(min(fwd.step(stop), 0.1))
    assert orthanc.sop_instance_uids() == set(uids.values())
    assert len(orthanc.instances()) == 30 and len(orthanc.study_uids()) == 30
    # Re-sends, counted at Orthanc: none but an object Orthanc reported as not committed (it died
    # before keeping it) - the power went between two C-STOREs, with none in flight.
    stores = orthanc.c_stores()
    assert set(stores) == set(uids.values())
    assert sum(stores.values()) - 30 <= sum(failed_commitments), (stores, failed_commitments)


# -- storage commitment reports: only the reading center's, only for our transactions --------------


@pytest.fixture
def awaiting_commitment(tmp_path, scripted_scp_factory):
    """A forwarder that sent 3 items to a reading center ("SCRIPTED", which answers the N-ACTION
    but reports nothing yet) and awaits their commitment: (forwarder, outbox, scp)."""
    scp = scripted_scp_factory(commitment=True)
    config = make_config(tmp_path, scp.port, scp.ae_title)
    enqueue(config, 3)
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        result = fwd.run_round(threading.Event())
        assert result.sent == 3 and len(scp.actions) >= 1
        assert all(i.state == ItemState.SENT and i.transaction_uid for i in outbox.items())
        yield fwd, outbox, scp


def test_a_report_that_overtakes_the_n_action_response_is_believed(tmp_path, scripted_scp_factory, caplog) -> None:
    """A PACS may send its N-EVENT-REPORT (a new association) before the N-ACTION's response reaches
    us; the transaction is known before the N-ACTION leaves, so that report commits the items
    instead of being refused as forged (and the studies waiting another commitment timeout)."""
    listen = free_port()
    scp = scripted_scp_factory(
        commitment=True, report_to=("127.0.0.1", listen, "CLINIC01"), report_before_response=True, report_delay_s=0
    )
    config = make_config(tmp_path, scp.port, scp.ae_title, listen_port=listen)
    enqueue(config, 3)
    with caplog.at_level("WARNING", logger="uploader.dicom_commitment.security"):
        with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
            result = fwd.run_round(threading.Event())
            assert result.sent == 3
            assert [status for _type, _info, status in scp.reports_sent] == [0x0000] * len(scp.actions)
            # purged only ever follows commitment
            assert {i.state for i in outbox.items()} <= {ItemState.COMMITTED, ItemState.PURGED}
    assert not [r for r in caplog.records if r.name == "uploader.dicom_commitment.security"]


def refs_of(items) -> list[tuple[str, str]]:
    return [(i.meta["sop_class_uid"], i.meta["sop_instance_uid"]) for i in items]


def test_forged_commitment_from_another_ae_or_address_changes_nothing(awaiting_commitment, caplog) -> None:
    fwd, outbox, scp = awaiting_commitment
    before = outbox.items()
    port = fwd.listener_address[1]
    txn = before[0].transaction_uid
    with caplog.at_level("WARNING", logger="uploader.dicom_commitment.security"):
        # a host on the LAN calling itself something else
        assert send_report(port, txn, refs_of(before), calling_ae="EVIL") == "rejected"
        # the reading center's AE title, from another address: closed before a byte is read
        assert send_report(port, txn, refs_of(before), calling_ae=scp.ae_title, source="127.0.0.2") == "closed"
    assert outbox.items() == before  # the real rows: still sent, same transaction, nothing committed
    assert fwd.run_round(threading.Event()).purged == 0
    security = [r.getMessage() for r in caplog.records if r.name == "uploader.dicom_commitment.security"]
    assert any("rejected an association" in m and "EVIL" in m for m in security)
    assert any("127.0.0.2" in m for m in security)


def test_forged_commitment_with_an_unknown_transaction_changes_nothing(awaiting_commitment, caplog) -> None:
    from pydicom.uid import generate_uid

    fwd, outbox, scp = awaiting_commitment
    before = outbox.items()
    with caplog.at_level("WARNING", logger="uploader.dicom_commitment.security"):
        status = send_report(fwd.listener_address[1], generate_uid(), refs_of(before), calling_ae=scp.ae_title)
    assert status == 0x0115  # invalid argument value: not a transaction of ours
    assert outbox.items() == before
    assert fwd.run_round(threading.Event()).purged == 0
    assert any("not issued by this gateway" in r.getMessage() for r in caplog.records)


def test_forged_commitment_naming_instances_not_in_the_transaction_changes_nothing(
    awaiting_commitment, tmp_path
) -> None:
    from pydicom.uid import generate_uid

    fwd, outbox, scp = awaiting_commitment
    before = outbox.items()
    port = fwd.listener_address[1]
    txn = before[0].transaction_uid
    in_txn = [i for i in before if i.transaction_uid == txn]
    stranger = (before[0].meta["sop_class_uid"], generate_uid())
    assert send_report(port, txn, [*refs_of(in_txn), stranger], calling_ae=scp.ae_title) == 0x0115
    assert send_report(port, txn, refs_of(in_txn), failed=[stranger], calling_ae=scp.ae_title) == 0x0115
    wrong_class = [("1.2.840.10008.5.1.4.1.1.2", in_txn[0].meta["sop_instance_uid"])]  # CT, not its class
    assert send_report(port, txn, wrong_class, calling_ae=scp.ae_title) == 0x0119
    assert outbox.items() == before
    # the genuine report (the reading center, our transaction, its instances) is believed
    assert send_report(port, txn, refs_of(in_txn), calling_ae=scp.ae_title) == 0x0000
    assert {i.id for i in outbox.items(state=ItemState.COMMITTED)} == {i.id for i in in_txn}
    assert fwd.run_round(threading.Event()).purged == len(in_txn)


def test_late_report_for_a_superseded_transaction_still_counts(awaiting_commitment) -> None:
    """No report in time: the forwarder asks again under a new transaction; the first report,
    arriving late, is still ours and commits the items in it."""
    fwd, outbox, scp = awaiting_commitment
    first = outbox.items()
    old_txn = first[0].transaction_uid
    in_old = [i for i in first if i.transaction_uid == old_txn]
    outbox.set_transaction([i.id for i in in_old], "2.25.424242", time.time())  # as a re-ask would
    assert send_report(fwd.listener_address[1], old_txn, refs_of(in_old), calling_ae=scp.ae_title) == 0x0000
    assert {i.id for i in outbox.items(state=ItemState.COMMITTED)} == {i.id for i in in_old}


def test_commitment_listener_binds_the_address_toward_the_reading_center(tmp_path, scripted_scp_factory) -> None:
    scp = scripted_scp_factory(commitment=True)
    config = make_config(tmp_path, scp.port, scp.ae_title)
    config.reading_center.listen_host = ""  # the default: never every interface silently
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        assert fwd.listener_address == ("127.0.0.1", config.reading_center.listen_port)


def test_storage_commitment_off_with_purge_policy_purges_what_was_sent(tmp_path, storescp_factory) -> None:
    scp = storescp_factory()
    config = make_config(tmp_path, scp.port, scp.ae_title, storage_commitment=False, no_commitment_policy="purge")
    enqueue(config, 3)
    pump(config, done(3))
    assert len(scp.received_files()) == 3
    with open_outbox(config) as outbox:
        assert all(i.state == ItemState.PURGED and i.patient is None for i in outbox.items())
    config.reading_center.no_commitment_policy = "keep"
    enqueue(config, 2, start=10)
    pump(config, lambda ob: ob.stats(time.time())["counts"].get("sent", 0) == 2)
    c = counts(config)
    assert c.get("sent") == 2 and c.get("purged") == 3  # "keep": the local copies stay


# -- a send killed mid-way is charged; killed N times, the item is quarantined ---------------------


def test_send_killed_n_times_is_quarantined_and_the_rest_flows(tmp_path, scripted_scp_factory) -> None:
    """An object that takes the forwarder down mid-send (here: the peer never answers and we
    SIGKILL the real `lastmile forward` process while it waits, as the OOM killer would) is
    charged at each try; after `max_interrupted_sends` (3) it is quarantined with the reason,
    never sent again, and the innocent items sent with it are not blamed."""
    config = make_config(tmp_path, 0, "SCRIPTED", storage_commitment=False)
    uids = enqueue(config, 4)
    crasher = uids["k0"]
    scp = scripted_scp_factory(hold=frozenset({crasher}))
    config.reading_center.port = scp.port
    cfg_file = write_toml(config, tmp_path / "lastmile.toml", "max_interrupted_sends = 3\n")
    command = [sys.executable, "-m", "lastmile", "-c", str(cfg_file), "forward"]
    for kill in range(1, 4):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(
                lambda n=kill: scp.arrivals.count(crasher) == n, 150, what=f"send {kill} of the crasher", interval=0.05
            )
            proc.send_signal(signal.SIGKILL)  # mid-send: its bytes went out, no answer recorded
        finally:
            proc.kill()
            proc.wait(10)
        with open_outbox(config) as outbox:  # recovery counts the send cut short, charged
            item = outbox.find("k0")
            assert (item.state, item.attempts, item.interrupted_sends) == (ItemState.QUEUED, kill, kill)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_counts(config, "quarantine of the crasher", quarantined=1, sent=3)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    with open_outbox(config) as outbox:
        item = outbox.find("k0")
        assert item.state == ItemState.QUARANTINED and item.attempts == 3
        assert "killed during send 3 times" in item.quarantine_reason
        innocent = [outbox.find(f"k{i}") for i in range(1, 4)]
        assert all(i.state == ItemState.SENT and i.interrupted_sends == 0 for i in innocent)
    assert scp.arrivals.count(crasher) == 3  # never sent a fourth time
    # an innocent item in flight in the other association when we killed is sent again (same SOP
    # Instance UID: the PACS keeps one copy); every innocent one arrived
    assert set(scp.received_uids()) == {uids[f"k{i}"] for i in range(1, 4)}


def test_decompression_bomb_in_the_outbox_is_quarantined_by_the_forward_service(tmp_path, storescp_factory) -> None:
    """A deflate bomb that got into the outbox (stored before the receiver refused them) and a
    reading center without deflate: the real forward service inflates it with a cap, quarantines
    it as unsendable, sends the rest, and its peak RSS stays under 150 MB."""
    from tests.hostile_dicom import deflate_bomb, peak_rss_mb
    from uploader.outbox import Kind

    scp = storescp_factory()  # no deflate: the forwarder would have to inflate the 1 GiB
    config = make_config(tmp_path, scp.port, scp.ae_title, storage_commitment=False)
    enqueue(config, 2)
    bomb_uid, bomb = deflate_bomb(1 << 30)
    with open_outbox(config) as outbox:
        outbox.add(
            Kind.DICOM,
            "bomb",
            bomb,
            meta={"sop_instance_uid": bomb_uid, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.9.1.1"},
        )
    cfg_file = write_toml(config, tmp_path / "lastmile.toml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lastmile", "-c", str(cfg_file), "forward"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_counts(config, "bomb quarantined and the rest sent", quarantined=1, sent=2)
        peak_mb = peak_rss_mb(proc.pid)
        print(f"\nforward service VmHWM after a 1 GiB deflate bomb: {peak_mb:.0f} MB")
        assert proc.poll() is None
        assert peak_mb < 150.0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    with open_outbox(config) as outbox:
        item = outbox.find("bomb")
        assert item.state == ItemState.QUARANTINED and "inflates to more than" in item.quarantine_reason
    assert len(scp.received_files()) == 2


# -- stopped while another process holds the outbox's write lock -----------------------------------


STOP_WITHIN_S = 8.0  # a stop takes about a second; systemd's own limit is TimeoutStopSec


def live_owner(data_dir: Path) -> str:
    """The claim owner token of the one Outbox open in another process (its flock is held)."""
    locks = data_dir / LOCKS_DIR
    tokens = [t for p in locks.glob("owner-*.lock") if (t := OwnerLock.token_of(p)) and OwnerLock.is_alive(locks, t)]
    assert len(tokens) == 1, tokens
    return tokens[0]


def step_ended(notify: socket.socket) -> None:
    """Until the service sends its next STATUS=: it sends one right after a step (at most one a
    second), then waits idle_poll_s (2 s) before the next. What it sent before is dropped."""
    notify.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while notify.recv(4096):
            pass
    notify.settimeout(120)
    while "STATUS=" not in notify.recv(4096).decode():
        pass


@contextlib.contextmanager
def notified_service(
    command: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, socket.socket]]:
    """`command` run as systemd would (NOTIFY_SOCKET: the socket yielded), its output captured;
    killed if it is still running at the end."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(120)
        environ = {**os.environ, "NOTIFY_SOCKET": str(path), **(env or {})}
        proc = subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            yield proc, notify
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def sent_by_the_next_start(command: list[str], config: Config, sent: int) -> None:
    """The service started again, until the outbox holds `sent` items sent; then stopped."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_counts(config, f"{sent} sent by the next start", sent=sent)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def stopped_holding_the_lock(
    proc: subprocess.Popen, other: sqlite3.Connection, before_sigterm: Callable[[], None] = lambda: None
) -> tuple[float, str]:
    """`other` takes the outbox's write lock (BEGIN IMMEDIATE), then after `before_sigterm` the
    service gets SIGTERM: seconds until it exited, and its output. The lock is given back after."""
    other.execute("BEGIN IMMEDIATE")
    try:
        before_sigterm()
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        return time.monotonic() - began, out
    finally:
        other.rollback()


def test_the_forwarder_stops_promptly_while_another_process_holds_the_outbox(tmp_path, storescp_factory) -> None:
    """lastmile/services/forward.py ForwardService.close: with the outbox write-locked by another
    process (the acquire service in a long write; a damaged database) SIGTERM to `lastmile forward`
    took over 15 s: closing its outbox waited out the busy timeout to release its send claims.
    systemd (TimeoutStopSec) SIGKILLs a stop that hangs, and a power cut does not wait. Now the
    release at close waits a moment, then leaves the claim to the next open's recovery: the next
    start sends the item once, nothing lost."""
    scp = storescp_factory()
    config = make_config(tmp_path, scp.port, scp.ae_title, storage_commitment=False)
    uids = enqueue(config, 2)
    db = Path(config.gateway.data_dir) / DB_NAME
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("UPDATE items SET hold_until = 9e18 WHERE key = 'k1'")  # not this run's to send
    command = [sys.executable, "-m", "lastmile", "-c", str(write_toml(config, tmp_path / "lastmile.toml")), "forward"]
    with contextlib.closing(other), notified_service(command, tmp_path) as (proc, notify):
        wait_for_counts(config, "k0 sent by the forwarder (it has claimed)", sent=1)
        # k1 claimed by the running forwarder, as a round a database fault cut short leaves it
        # (ForwardService._unsettled): its close has a claim of its own to release
        other.execute(
            "UPDATE items SET state = 'sending', claimed_by = ?, hold_until = NULL WHERE key = 'k1'",
            (live_owner(Path(config.gateway.data_dir)),),
        )
        step_ended(notify)  # the next step, which waits for the lock too, is 2 s away
        took, out = stopped_holding_the_lock(proc, other)
    assert took < STOP_WITHIN_S and proc.returncode == 0, (took, out)
    assert "Traceback" not in out, out
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:  # the claim is left
        assert conn.execute("SELECT state FROM items WHERE key = 'k1'").fetchone() == ("sending",)
    # the next start recovers the claim left behind (its owner is gone) and sends k1, once
    sent_by_the_next_start(command, config, 2)
    assert scp.c_stores() == {uids["k0"]: 1, uids["k1"]: 1}
    with open_outbox(config) as outbox:
        assert outbox.find("k1").attempts == 1  # a claim, not a send cut short: nothing charged


STOP_BLOCKED_WITHIN_S = 5.0  # the goal is ~3 s; TimeoutStopSec=45 is systemd's own limit
WATCHDOG_USEC = 1_000_000  # an idle service pings every 0.5 s (ServiceRuntime.watchdog_margin)
STEP_BLOCKED_QUIET_S = 2.0  # no ping for this long: the step in hand is waiting, not idle


def step_blocked(notify: socket.socket) -> None:
    """Until the service's pings stop for STEP_BLOCKED_QUIET_S: idle it pings every 0.5 s, and a
    step pings only as it makes progress, so a silence is a step waiting (here: for the lock)."""
    deadline = time.monotonic() + 120
    notify.settimeout(STEP_BLOCKED_QUIET_S)
    while time.monotonic() < deadline:
        try:
            notify.recv(4096)
        except TimeoutError:
            return
    raise AssertionError("the service never stopped pinging: no step waited for the lock")


def test_a_step_waiting_for_the_write_lock_stops_promptly_losing_nothing(tmp_path, storescp_factory) -> None:
    """lastmile/services/forward.py + uploader/outbox.py: with another process holding the outbox's
    write lock (the acquire service in a long write; a sqlite3 shell left open) a step of
    `lastmile forward` waits the 15 s busy timeout to claim, and SIGTERM meanwhile waited it out:
    12 s to stop, a quarter of TimeoutStopSec, and the Pi's slower card adds more. Now the stop
    ends that wait: the service exits within seconds, the item still queued and uncharged, sent
    once by the next start."""
    scp = storescp_factory()
    config = make_config(tmp_path, scp.port, scp.ae_title, storage_commitment=False)
    uids = enqueue(config, 1)
    db = Path(config.gateway.data_dir) / DB_NAME
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("UPDATE items SET hold_until = 9e18 WHERE key = 'k0'")  # nothing to send yet
    command = [sys.executable, "-m", "lastmile", "-c", str(write_toml(config, tmp_path / "lastmile.toml")), "forward"]
    watchdog = {"WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with contextlib.closing(other), notified_service(command, tmp_path, watchdog) as (proc, notify):
        step_ended(notify)  # the next step is 2 s away: k0 is its to claim, behind the lock
        other.execute("UPDATE items SET hold_until = NULL WHERE key = 'k0'")
        took, out = stopped_holding_the_lock(proc, other, before_sigterm=lambda: step_blocked(notify))
    print(f"\nSIGTERM to exit, the step waiting for the write lock: {took:.1f} s")
    assert took < STOP_BLOCKED_WITHIN_S and proc.returncode == 0, (took, out)
    assert "Traceback" not in out, out
    # a stop, said as one: not "step failed ... retrying" at ERROR (journald, the county's log shipping)
    said = [line for line in out.splitlines() if "given up" in line or "step failed" in line]
    assert said and all(
        " INFO " in line and "stopping: a write waiting for another process's database lock given up" in line
        for line in said
    ), out
    with open_outbox(config) as outbox:
        item = outbox.find("k0")
        assert (item.state, item.attempts) == (ItemState.QUEUED, 0)  # nothing lost, nothing charged
    assert scp.c_stores() == {}
    sent_by_the_next_start(command, config, 1)
    assert scp.c_stores() == {uids["k0"]: 1}
    with open_outbox(config) as outbox:
        assert outbox.find("k0").attempts == 1


def test_a_sent_record_waiting_for_clinic_db_lock_stops_promptly(tmp_path, storescp_factory) -> None:
    """lastmile/services/forward.py + lastmile/reports: the forward service's clinic.db writes (the
    sent-study records, written by a thread of their own) waited SQLite's 15 s busy timeout each
    while another process held clinic.db's write lock (the console in a long write, a sqlite3 shell
    left open), and SIGTERM waited the writer's join and the stop's last try of it after. Now the
    service's stop bounds clinic.db's writes as the outbox's: out within seconds; the study sent
    once, and its record written by the next start (backfill)."""
    from lastmile.reports.store import ReportStore

    scp = storescp_factory()
    config = make_config(tmp_path, scp.port, scp.ae_title, storage_commitment=False)
    uids = enqueue(config, 1)
    data = Path(config.gateway.data_dir)
    command = [sys.executable, "-m", "lastmile", "-c", str(write_toml(config, tmp_path / "lastmile.toml")), "forward"]
    with contextlib.closing(sqlite3.connect(data / DB_NAME, isolation_level=None)) as outbox_db:
        outbox_db.execute("UPDATE items SET hold_until = 9e18 WHERE key = 'k0'")  # sent once clinic.db is locked
    with notified_service(command, tmp_path) as (proc, notify):
        step_ended(notify)
        with contextlib.closing(sqlite3.connect(data / "clinic.db", isolation_level=None)) as other:

            def sent_while_locked() -> None:
                with contextlib.closing(sqlite3.connect(data / DB_NAME, isolation_level=None)) as outbox_db:
                    outbox_db.execute("UPDATE items SET hold_until = NULL WHERE key = 'k0'")
                wait_for_counts(config, "k0 sent", sent=1)
                time.sleep(1.0)  # its record's batch is written (BATCH_WINDOW_S): waiting for the lock

            took, out = stopped_holding_the_lock(proc, other, before_sigterm=sent_while_locked)
    print(f"\nSIGTERM to exit, a sent record waiting for clinic.db's lock: {took:.1f} s")
    assert took < STOP_BLOCKED_WITHIN_S and proc.returncode == 0, (took, out)
    assert "Traceback" not in out, out
    assert scp.c_stores() == {uids["k0"]: 1}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with contextlib.closing(ReportStore.open(data)) as store:
            wait_for(lambda: len(store.studies()) == 1, 60, what="the record written by the next start")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
