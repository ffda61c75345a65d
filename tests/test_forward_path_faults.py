"""Faults on the ECG forward path (outbox -> C-STORE -> storage commitment -> purge) that a
user would see: studies stuck, lost, resent forever or quarantined for a passing fault.

Each test drives the real forwarder against a real pynetdicom peer on loopback."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from lastmile.demo.loopback import free_port
from lastmile.demo.reading_center import EmbeddedReadingCenter
from lastmile.services.forward import ForwardService, forwarder_settings, open_outbox
from tests.forward_faults_setup import enqueue, make_config, send_failure_report, sent_with_transaction
from uploader.ecg_forwarder import EcgForwarder
from uploader.outbox import ItemState


def states(outbox) -> dict[str, int]:
    return {k: v for k, v in outbox.stats(time.time())["counts"].items() if v}


# -- 1. an operational database fault mid-round strands claimed items in `sending` -----------------


def test_a_database_fault_while_recording_a_send_strands_nothing_in_sending(tmp_path: Path) -> None:
    """The SD card answers one write with an I/O error ("disk I/O error", or "database is locked"
    after the busy timeout) right after the PACS stored an object. The forward service raises it
    to the runtime, which waits the fault out and steps the SAME service again (runtime.py:
    operational faults are not restarts). Every study must still reach the PACS and be purged:
    none may stay `sending`, claimed by a live process, where no claim or recovery ever looks."""
    listen = free_port()
    port = free_port()
    center = EmbeddedReadingCenter(port=port, gateway_port=listen, report_delay_s=0.05)
    center.start()
    try:
        config = make_config(tmp_path, port, center.ae_title, listen_port=listen)
        uids = enqueue(config, 3)
        service = ForwardService(config)
        try:
            real_mark_sent = service.outbox.mark_sent
            faults = {"left": 1}

            def flaky_mark_sent(item_ids, now):
                if faults["left"]:
                    faults["left"] -= 1
                    raise sqlite3.OperationalError("disk I/O error")
                return real_mark_sent(item_ids, now)

            service.outbox.mark_sent = flaky_mark_sent  # type: ignore[method-assign]
            stop = threading.Event()
            with pytest.raises(sqlite3.OperationalError):
                service.step(stop)  # the runtime logs it and waits out the fault ...
            deadline = time.monotonic() + 30  # generous: the loop ends once done
            while time.monotonic() < deadline:  # ... then steps the same service again
                service.step(stop)
                if states(service.outbox).get("purged", 0) == len(uids):
                    break
                time.sleep(0.05)
            final = states(service.outbox)
        finally:
            service.close()
    finally:
        center.stop()
    assert final.get("sending", 0) == 0 and final.get("purged", 0) == len(uids), final


# -- 2. a permanent storage commitment failure is resent forever -----------------------------------


def test_a_permanent_commitment_failure_is_not_resent_forever(tmp_path: Path, scripted_scp_factory) -> None:
    """The PACS stores the ECG (C-STORE 0x0000) but its storage commitment report says it will not
    commit it: FailureReason 0x0122 "Referenced SOP Class not supported" (PS3.4 J.3.3.1.2) - a
    property of the PACS's configuration, the same at every try. The gateway must stop and say so
    (quarantine, with the reason); instead it requeues and resends the whole study after every
    report, for ever (no attempt limit), on a metered link, with nothing in the quarantine list."""
    scp = scripted_scp_factory(ae_title="SCRIPTED", commitment=True)  # answers the N-ACTION, reports nothing
    config = make_config(tmp_path, scp.port, scp.ae_title)
    uid = enqueue(config, 1)["k0"]
    stop = threading.Event()
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        port = fwd.listener_address[1]
        for _cycle in range(3):
            item = sent_with_transaction(outbox, fwd, stop)
            status = send_failure_report(
                port, scp.ae_title, item.transaction_uid, item.meta["sop_class_uid"], uid, 0x0122
            )
            assert status == 0x0000
            if outbox.find("k0").state != ItemState.QUEUED:
                break
        final = outbox.find("k0")
    stores = scp.received_uids().count(uid)
    assert final.state == ItemState.QUARANTINED, (
        f"state {final.state.value} after {stores} C-STOREs of the same study; last error: {final.last_error}"
    )


# -- 3. a passing fault reading a payload file quarantines a good study --------------------------


def test_a_passing_error_reading_a_payload_file_does_not_quarantine_the_study(
    tmp_path: Path, scripted_scp_factory, monkeypatch
) -> None:
    """The forward process briefly runs out of file descriptors (EMFILE: associations, the
    listener, sqlite, the report poller all hold some) just as it opens an ECG's payload file.
    The file is there and intact; the next attempt reads it. The study must go out, not be
    quarantined as "payload file cannot be read" for a doctor to find and retry by hand."""
    import errno

    scp = scripted_scp_factory(ae_title="SCRIPTED")
    config = make_config(tmp_path, scp.port, scp.ae_title)
    config.reading_center.storage_commitment = False
    uid = enqueue(config, 1, seconds=10.0)["k0"]
    payloads = Path(config.gateway.data_dir) / "payloads"
    assert [p for p in payloads.iterdir() if p.suffix == ".bin"], "an ECG's payload is a file"
    real_read_bytes = Path.read_bytes
    faults = {"left": 1}

    def read_bytes(self: Path) -> bytes:
        if faults["left"] and self.parent == payloads and self.suffix == ".bin":
            faults["left"] -= 1
            raise OSError(errno.EMFILE, "Too many open files", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    stop = threading.Event()
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        deadline = time.monotonic() + 30  # generous: the loop ends once done
        while (item := outbox.find("k0")).state in (ItemState.QUEUED, ItemState.SENDING):
            if time.monotonic() > deadline:
                break
            fwd.run_round(stop)
            time.sleep(0.05)
    assert item.state == ItemState.SENT and uid in scp.received_uids(), (item.state.value, item.quarantine_reason)
