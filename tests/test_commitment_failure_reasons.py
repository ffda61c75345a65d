"""Storage commitment FailureReasons (PS3.4 Annex J) and what the forwarder does with each:
send the study again, ask again under a new transaction, or quarantine it with the reason -
and a reason that keeps coming back is not answered by sending the same study for ever."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lastmile.services.forward import forwarder_settings, open_outbox
from tests.forward_faults_setup import enqueue, make_config, send_failure_report, sent_with_transaction
from uploader.dicom_commitment import FAILURE_REASONS, FailedAction, failure_action
from uploader.ecg_forwarder import EcgForwarder
from uploader.outbox import ItemState


@pytest.mark.parametrize(
    ("reason", "action"),
    [
        (0x0110, FailedAction.RESEND),  # processing failure: may pass
        (0x0112, FailedAction.RESEND),  # no such object instance: store it again
        (0x0213, FailedAction.RESEND),  # resource limitation: passes
        (0x0122, FailedAction.QUARANTINE),  # SOP class not supported: the PACS's setup
        (0x0119, FailedAction.QUARANTINE),  # class/instance conflict: same UIDs, same conflict
        (0x0131, FailedAction.ASK_AGAIN),  # duplicate transaction UID: the transaction, not the object
        (0xC000, FailedAction.RESEND),  # unknown: sent again, up to the cap
    ],
)
def test_each_failure_reason_gets_the_action_a_resend_can_or_cannot_change(reason: int, action: FailedAction) -> None:
    meaning, got = failure_action(reason)
    assert got == action
    assert meaning == (FAILURE_REASONS[reason][0] if reason in FAILURE_REASONS else "unknown failure reason")


def test_a_passing_failure_is_resent_until_the_cap_then_quarantined(tmp_path: Path, scripted_scp_factory) -> None:
    scp = scripted_scp_factory(ae_title="SCRIPTED", commitment=True)
    config = make_config(tmp_path, scp.port, scp.ae_title)
    uid = enqueue(config, 1)["k0"]
    stop = threading.Event()
    settings = replace(forwarder_settings(config), max_commitment_failures=2)
    with open_outbox(config) as outbox, EcgForwarder(outbox, settings) as fwd:
        port = fwd.listener_address[1]
        for failures in (1, 2):
            item = sent_with_transaction(outbox, fwd, stop)
            status = send_failure_report(
                port, scp.ae_title, item.transaction_uid, item.meta["sop_class_uid"], uid, 0x0110
            )
            assert status == 0x0000
            after = outbox.find("k0")
            if failures == 1:
                assert (after.state, after.commitment_failures) == (ItemState.QUEUED, 1), after
                assert "0x0110 processing failure" in (after.last_error or "")
        final = outbox.find("k0")
    assert final.state == ItemState.QUARANTINED, final
    assert "failed 2 times" in (final.quarantine_reason or "") and "0x0110" in final.quarantine_reason
    assert scp.received_uids().count(uid) == 2


def test_a_duplicate_transaction_uid_is_asked_again_without_resending(tmp_path: Path, scripted_scp_factory) -> None:
    scp = scripted_scp_factory(ae_title="SCRIPTED", commitment=True)
    config = make_config(tmp_path, scp.port, scp.ae_title)
    uid = enqueue(config, 1)["k0"]
    stop = threading.Event()
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        port = fwd.listener_address[1]
        item = sent_with_transaction(outbox, fwd, stop)
        status = send_failure_report(port, scp.ae_title, item.transaction_uid, item.meta["sop_class_uid"], uid, 0x0131)
        assert status == 0x0000
        after = outbox.find("k0")
        assert (after.state, after.transaction_uid, after.commitment_failures) == (ItemState.SENT, None, 1), after
        again = sent_with_transaction(outbox, fwd, stop)  # the next round asks under a new transaction
    assert again.transaction_uid not in (None, item.transaction_uid)
    assert scp.received_uids().count(uid) == 1


def test_a_retry_from_quarantine_starts_the_failure_count_again(tmp_path: Path) -> None:
    config = make_config(tmp_path, 11112, "ANY")
    enqueue(config, 1)
    with open_outbox(config) as outbox:
        item = outbox.find("k0")
        [claimed] = outbox.claim(item.kind, 1, time.time())
        outbox.mark_sent([claimed.id], time.time())
        outbox.requeue([claimed.id], "storage commitment failed (0x0110 processing failure)", time.time())
        assert outbox.find("k0").commitment_failures == 1
        outbox.quarantine(claimed.id, "by hand", time.time())
        assert outbox.retry(claimed.id, time.time())
        assert outbox.find("k0").commitment_failures == 0
