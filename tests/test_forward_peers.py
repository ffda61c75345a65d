"""The forward path against real reading centers: Orthanc (with storage commitment), dcmtk's
storescp (without it, plain and TLS) and a scripted pynetdicom SCP answering chosen statuses.

Orthanc runs inside the private network namespace scripts/test.sh creates.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lastmile.cli import main as cli
from lastmile.config import Config
from lastmile.ecg_intake import enqueue_recording
from lastmile.forward_service import forwarder_settings, open_outbox
from tests.conftest import require_private_netns
from tests.ecg_factories import make_recording
from tests.peers import free_port, gateway_modality
from uploader.ecg_forwarder import EcgForwarder
from uploader.outbox import ItemState


def make_config(tmp_path: Path, port: int, called_ae: str, **rc_overrides) -> Config:
    c = Config()
    c.gateway.data_dir = str(tmp_path / "data")
    rc = c.reading_center
    rc.host, rc.port, rc.called_ae, rc.calling_ae = "127.0.0.1", port, called_ae, "CLINIC01"
    rc.listen_port = rc_overrides.pop("listen_port", free_port())
    rc.listen_host = "127.0.0.1"
    rc.associations, rc.batch_size, rc.timeout_s, rc.commitment_timeout_s = 2, 5, 10.0, 10.0
    for k, v in rc_overrides.items():
        setattr(rc, k, v)
    c.outbox.backoff_base_s, c.outbox.backoff_max_s, c.outbox.min_free_mb = 0.1, 0.5, 1
    c.outbox.config_fault_retry_s = 0.5
    return c


def write_toml(config: Config, path: Path) -> Path:
    rc = config.reading_center
    path.write_text(f"""
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
""")
    return path


def enqueue(config: Config, n: int, start: int = 0) -> dict[str, str]:
    """n recordings → outbox; returns key → SOP Instance UID."""
    with open_outbox(config) as outbox:
        return {f"k{i}": enqueue_recording(outbox, make_recording(i), config, key=f"k{i}")
                .item.meta["sop_instance_uid"] for i in range(start, start + n)}


def counts(config: Config) -> dict:
    with open_outbox(config) as outbox:
        return outbox.stats(time.time())["counts"]


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


def test_per_object_statuses_permanent_is_quarantined_the_rest_flows(
        tmp_path, scripted_scp_factory, capsys) -> None:
    config = make_config(tmp_path, 0, "SCRIPTED", storage_commitment=False)
    uids = enqueue(config, 6)
    scp = scripted_scp_factory(statuses={uids["k1"]: [0xA900], uids["k2"]: [0xA700, 0x0000],
                                         uids["k3"]: [0xC123], uids["k4"]: [0xB000]})
    config.reading_center.port = scp.port
    pump(config, lambda ob: ob.stats(time.time())["counts"].get("sent", 0) == 4)
    with open_outbox(config) as outbox:
        by_key = {i.key: i for i in outbox.items()}
        assert by_key["k1"].state == ItemState.QUARANTINED and "0xA900" in by_key["k1"].quarantine_reason
        assert by_key["k3"].state == ItemState.QUARANTINED and "0xC123" in by_key["k3"].quarantine_reason
        assert by_key["k2"].state == ItemState.SENT and by_key["k2"].attempts == 1  # one transient retry
        assert by_key["k4"].state == ItemState.SENT  # warning = stored
    cfg_file = write_toml(config, tmp_path / "lastmile.toml")
    assert cli(["-c", str(cfg_file), "queue"]) == 0
    out = capsys.readouterr().out
    assert "quarantined #" in out and "0xA900" in out
    assert cli(["-c", str(cfg_file), "retry", "--quarantined"]) == 0
    assert counts(config).get("queued") == 2


@pytest.mark.parametrize("policy", ["keep", "purge"])
def test_storescp_without_storage_commitment_follows_the_policy(
        tmp_path, storescp_factory, policy) -> None:
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
    config = make_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen,
                         batch_size=4, commitment_timeout_s=2.0)
    cfg_file = write_toml(config, tmp_path / "lastmile.toml")
    n = 60
    uids = enqueue(config, n)
    rng = random.Random(20261123)
    kills = 0
    for _ in range(22):
        proc = subprocess.Popen([sys.executable, "-m", "lastmile", "-c", str(cfg_file), "forward"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.4, 1.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(10)
    assert kills >= 20
    db = Path(config.gateway.data_dir) / "outbox.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
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
def test_orthanc_dies_mid_batch_and_returns_everything_arrives_exactly_once(
        tmp_path, orthanc_factory) -> None:
    listen = free_port()
    orthanc = orthanc_factory(modalities=gateway_modality("CLINIC01", listen))
    config = make_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen,
                         batch_size=30, associations=1)
    uids = enqueue(config, 30)
    stop = threading.Event()
    failed_commitments: list[int] = []
    on_event = lambda kind, info: failed_commitments.append(info["failed"]) if kind == "committed" else None  # noqa: E731
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config), on_event=on_event) as fwd:
        killer = threading.Timer(0.15, orthanc.kill)  # a power cut at the reading center, mid-batch
        killer.start()
        first = fwd.run_round(stop)
        killer.join()
        assert first.sent < 30 and first.transient > 0  # the batch was cut short
        c = outbox.stats(time.time())["counts"]
        assert c.get("quarantined", 0) == 0 and c.get("queued", 0) > 0
        orthanc.start()  # back, on the same storage
        deadline = time.monotonic() + 60
        while outbox.stats(time.time())["counts"].get("purged", 0) < 30:
            assert time.monotonic() < deadline, outbox.stats(time.time())
            time.sleep(min(fwd.step(stop), 0.1))
    assert orthanc.sop_instance_uids() == set(uids.values())
    assert len(orthanc.instances()) == 30 and len(orthanc.study_uids()) == 30
    # Re-sends, counted at Orthanc: the one C-STORE in flight when the power went (one association),
    # and any object Orthanc reported as not committed (it died before keeping it) - no others.
    stores = orthanc.c_stores()
    assert set(stores) == set(uids.values())
    assert sum(stores.values()) - 30 <= 1 + sum(failed_commitments), (stores, failed_commitments)
