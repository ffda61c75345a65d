"""ECGs forwarded over a slow link (the link emulator in front of dcmtk's storescp), as the STAT-lane and
link-pacing tests drive it: the link, the gateway's configuration, forwarding on a thread, what arrived at
the peer and in which order, the transfers cut for a STAT study; and a fake clock for the pacer."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lastmile.config import Config
from lastmile.ecg.intake import enqueue_recording
from lastmile.services.forward import forwarder_settings, open_outbox
from tests.ecg_factories import make_recording
from tests.link_emulator import LinkProfile
from tests.peers import StorescpServer, free_port
from tests.waiting import wait_for
from uploader.ecg_forwarder import EcgForwarder
from uploader.outbox import ItemState

CUT_LOG = re.compile(r"cutting routine transfer of outbox item (\d+)")


def slow_link(up_bps: float) -> LinkProfile:
    # a small modem buffer: what is queued in it is committed to the wire, STAT or not
    return LinkProfile("slow", up_bps, 1e6, 0.1, queue_bytes=4096)


def make_config(tmp_path: Path, port: int, *, associations: int) -> Config:
    c = Config()
    c.gateway.data_dir = str(tmp_path / "data")
    rc = c.reading_center
    rc.host, rc.port, rc.called_ae, rc.calling_ae = "127.0.0.1", port, "STORESCP", "CLINIC01"
    rc.listen_port, rc.listen_host = free_port(), "127.0.0.1"
    rc.associations, rc.batch_size, rc.timeout_s = associations, 50, 60.0
    rc.storage_commitment, rc.no_commitment_policy = False, "keep"
    c.outbox.backoff_base_s, c.outbox.backoff_max_s, c.outbox.min_free_mb = 0.1, 0.5, 1
    c.ecg.re_record_hold_s = 0  # the synthetic 2 s ECGs are re-record cases: forwarding is the subject here
    return c


@contextmanager
def forwarding(config: Config) -> Iterator[None]:
    """The forwarder sending in rounds on its own thread, as the forward service does."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
                while not stop.is_set():
                    stop.wait(min(fwd.step(stop), 0.05))
        except BaseException as exc:  # noqa: BLE001 — re-raised in the test thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="forwarder", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(120)
    assert not failure, failure


def wait_until_stored_and_sent(
    config: Config, scp: StorescpServer, uids: set[str], what: str, limit_s: float = 120.0
) -> None:
    """Until the peer has every study and the outbox has marked every one sent: storescp logs a
    C-STORE before its response is on the wire, and a forwarder stopped between the two puts the
    item back in the queue (its outcome unknown), rightly, so the peer's log alone is too early."""

    def done() -> bool:
        if set(arrivals(scp)) != uids:
            return False
        with open_outbox(config) as outbox:
            return {i.state for i in outbox.items()} == {ItemState.SENT}

    wait_for(done, limit_s, what=what)


def arrivals(scp: StorescpServer) -> list[str]:
    """SOP Instance UIDs in the order storescp received them (one line per C-STORE)."""
    if not scp.c_store_log.exists():
        return []
    return [line.split(".", 1)[1] for line in scp.c_store_log.read_text().split()]


def enqueue(config: Config, indexes: range, *, stat: bool = False, seconds: float = 2.0) -> list[str]:
    with open_outbox(config) as outbox:
        return [
            enqueue_recording(outbox, make_recording(i, stat=stat, seconds=seconds), config, key=f"k{i}").item.meta[
                "sop_instance_uid"
            ]
            for i in indexes
        ]


def cut_uids(config: Config, caplog: pytest.LogCaptureFixture) -> set[str]:
    """SOP Instance UIDs of the routine transfers the forwarder cut (it logs each)."""
    ids = {int(m.group(1)) for r in caplog.records if (m := CUT_LOG.search(r.getMessage()))}
    with open_outbox(config) as outbox:
        return {i.meta["sop_instance_uid"] for i in outbox.items() if i.id in ids}


def assert_none_lost_and_uncharged(config: Config, scp: StorescpServer, uids: list[str], cut: set[str]) -> None:
    stores = scp.c_stores()
    assert set(stores) == set(uids)  # none lost, none the peer did not expect
    assert len(scp.received_files()) == len(uids)  # one instance each at the peer
    # a C-STORE is repeated only where a transfer was cut for the STAT one after its last byte
    # had left (its outcome unknown): resent with the same UIDs, the same instance at the peer
    assert {u for u, n in stores.items() if n > 1} <= cut, (stores, cut)
    with open_outbox(config) as outbox:
        items = outbox.items()
    assert {i.state for i in items} == {ItemState.SENT}
    # a routine transfer cut (or put back) for the STAT one is not charged as a failed attempt
    assert [i.attempts for i in items] == [1] * len(uids)


class FakeTime:
    """A clock and a sleep for the pacer: sleeping moves the clock on at once, and is recorded."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
