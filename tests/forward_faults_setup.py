"""The gateway as the forward-path fault tests drive it: one association at a time to a reading center
on loopback (AE LASTMILE), ECGs queued through the real intake, a reading center's failure report, and
forwarding rounds until an ECG is sent and its commitment asked."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from lastmile.config import Config
from lastmile.demo.loopback import free_port
from lastmile.ecg.intake import enqueue_recording
from lastmile.services.forward import open_outbox
from tests.ecg_factories import make_recording
from tests.forward_setup import send_report
from uploader.ecg_forwarder import EcgForwarder
from uploader.outbox import ItemState, Outbox, OutboxItem


def make_config(tmp_path: Path, port: int, called_ae: str, *, listen_port: int | None = None) -> Config:
    c = Config()
    c.gateway.data_dir = str(tmp_path / "data")
    rc = c.reading_center
    rc.host, rc.port, rc.called_ae, rc.calling_ae = "127.0.0.1", port, called_ae, "LASTMILE"
    rc.listen_port = listen_port or free_port()
    rc.listen_host = "127.0.0.1"
    rc.associations, rc.max_associations, rc.batch_size, rc.timeout_s = 1, 1, 5, 10.0
    rc.commitment_timeout_s = 30.0
    c.outbox.backoff_base_s, c.outbox.backoff_max_s, c.outbox.min_free_mb = 0.05, 0.2, 1
    c.outbox.config_fault_retry_s = 0.5
    c.ecg.re_record_hold_s = 0  # synthetic 2 s ECGs would be held for re-recording
    c.reports.source = "off"
    return c


def enqueue(config: Config, n: int, seconds: float = 2.0) -> dict[str, str]:
    with open_outbox(config) as outbox:
        return {
            f"k{i}": enqueue_recording(outbox, make_recording(i, seconds=seconds), config, key=f"k{i}").item.meta[
                "sop_instance_uid"
            ]
            for i in range(n)
        }


def send_failure_report(port: int, calling_ae: str, txn: str, sop_class: str, sop_instance: str, reason: int) -> int:
    """The reading center's N-EVENT-REPORT (event type 2): `sop_instance` failed with `reason`."""
    status = send_report(
        port, txn, [], calling_ae=calling_ae, called_ae="LASTMILE", failed=[(sop_class, sop_instance)], reason=reason
    )
    assert isinstance(status, int), status  # the association was accepted
    return status


def sent_with_transaction(outbox: Outbox, fwd: EcgForwarder, stop: threading.Event) -> OutboxItem:
    """Rounds until item k0 is sent and its commitment asked (a transaction UID)."""
    deadline = time.monotonic() + 30
    while (item := outbox.find("k0")).state != ItemState.SENT or not item.transaction_uid:
        assert item.state in (ItemState.QUEUED, ItemState.SENDING, ItemState.SENT), item
        assert time.monotonic() < deadline, item
        fwd.run_round(stop)
        time.sleep(0.05)
    return item
