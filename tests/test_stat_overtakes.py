"""A STAT ECG overtakes routine studies already being sent over a slow link (issue 16, item 3).

The real peer is dcmtk's storescp behind the link emulator (tests/link_emulator.py); its log has
one line per object it received, in the order they arrived: that order is what is asserted, with
counts at the peer (nothing lost, one instance each; a C-STORE repeated only for a transfer the
forwarder cut) and attempts in the outbox (a transfer cut for the STAT one is not charged).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from lastmile.config import Config
from lastmile.ecg.intake import enqueue_recording
from lastmile.services.forward import forwarder_settings, open_outbox
from tests.ecg_factories import make_recording
from tests.link_emulator import LinkProfile, LinkRelay
from tests.peers import StorescpServer, free_port
from tests.waiting import wait_for
from uploader.ecg_forwarder import EcgForwarder
from uploader.outbox import ItemState, Kind
from uploader.stat_watch import StatWatch, TransferRate

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


def test_stat_takes_the_next_object_slot_from_routine_studies_in_flight(tmp_path, storescp_factory, caplog) -> None:
    caplog.set_level(logging.INFO, logger="uploader.stat_watch")
    scp = storescp_factory(accept="deflated")
    with LinkRelay(slow_link(400e3), "127.0.0.1", scp.port) as relay:
        config = make_config(tmp_path, relay.port, associations=2)
        routine = enqueue(config, range(8))
        with forwarding(config):
            wait_for(lambda: len(arrivals(scp)) >= 1, 120, what="the first routine study")
            [stat] = enqueue(config, range(100, 101), stat=True)
            before = len(set(arrivals(scp)))  # counted once it is durable (its enqueue took a while)
            wait_until_stored_and_sent(config, scp, {*routine, stat}, "all nine studies")
    order = list(dict.fromkeys(arrivals(scp)))  # first arrival of each
    # at most the two routine objects already on the wire arrive between STAT durable and STAT
    # stored; the rest of the round (claimed with it) waits
    assert order.index(stat) <= before + 2, (order.index(stat), before, order)
    assert order.index(stat) < len(order) - 2
    assert_none_lost_and_uncharged(config, scp, [*routine, stat], cut_uids(config, caplog))


def test_stat_cuts_a_routine_transfer_on_a_slow_link(tmp_path, storescp_factory, caplog) -> None:
    caplog.set_level(logging.INFO, logger="uploader.stat_watch")
    scp = storescp_factory(accept="deflated")
    # one association and a 10 s routine ECG taking ~6 s on this link: the STAT one can only
    # come first if the routine transfer on the wire is cut
    with LinkRelay(slow_link(96e3), "127.0.0.1", scp.port) as relay:
        config = make_config(tmp_path, relay.port, associations=1)
        [routine] = enqueue(config, range(1), seconds=10.0)
        with forwarding(config):
            wait_for(
                lambda: relay.up is not None and relay.up.bytes_total > 4000, 120, what="a routine transfer on the wire"
            )
            [stat] = enqueue(config, range(100, 101), stat=True)
            wait_until_stored_and_sent(config, scp, {routine, stat}, "both studies", limit_s=180)
    assert arrivals(scp)[0] == stat
    cut = cut_uids(config, caplog)
    assert cut == {routine}
    assert_none_lost_and_uncharged(config, scp, [routine, stat], cut)


def test_a_stat_study_pauses_the_round_on_its_open_associations(tmp_path, storescp_factory, caplog) -> None:
    """The STAT study goes on an association already open, and the routine backlog goes on after
    it on the same associations: no round ended and begun again (every association of a new
    round costs a round trip on a village link before its first byte)."""
    caplog.set_level(logging.INFO, logger="uploader")
    scp = storescp_factory(accept="deflated")
    with LinkRelay(slow_link(400e3), "127.0.0.1", scp.port) as relay:
        config = make_config(tmp_path, relay.port, associations=2)
        config.reading_center.max_associations = 2
        config.reading_center.stat_cuts_routine = False  # a cut ends an association: not the subject here
        routine = enqueue(config, range(8))
        with forwarding(config):
            wait_for(lambda: len(arrivals(scp)) >= 1, 120, what="the first routine study")
            [stat] = enqueue(config, range(100, 101), stat=True)
            wait_until_stored_and_sent(config, scp, {*routine, stat}, "all nine studies")
    order = list(dict.fromkeys(arrivals(scp)))
    assert order.index(stat) < len(order) - 2  # it overtook the backlog
    assert any("carrying 1 STAT item(s) on an open association" in r.getMessage() for r in caplog.records)
    assert relay.connections == 2  # the round's two associations carried everything
    assert_none_lost_and_uncharged(config, scp, [*routine, stat], set())


def test_an_association_cut_for_a_stat_study_is_replaced_at_once(tmp_path, storescp_factory, caplog) -> None:
    """A routine association cut for a STAT study is replaced as soon as it ends, while the STAT
    study is still on the link - not once the next routine object is stored. A second STAT study
    soon after then finds an association free at its object boundary (on a satellite link every
    one left was waiting for a response, and it was carried 570 ms late)."""
    caplog.set_level(logging.INFO, logger="uploader.stat_watch")
    scp = storescp_factory(accept="deflated")
    # 10 s ECGs: ~3 s each on this link, STAT too; the round's two associations start unpaced
    # (nothing is known of the link yet), so one or both are cut, and a third study is left
    # for a replacement to take
    with LinkRelay(slow_link(192e3), "127.0.0.1", scp.port) as relay:
        config = make_config(tmp_path, relay.port, associations=2)
        config.reading_center.max_associations = 2
        routine = enqueue(config, range(3), seconds=10.0)
        with forwarding(config):
            wait_for(
                lambda: relay.connections == 2 and relay.up is not None and relay.up.bytes_total > 8000,
                120,
                what="two routine transfers on the wire",
            )
            [stat] = enqueue(config, range(100, 101), stat=True, seconds=10.0)
            wait_for(lambda: stat in arrivals(scp), 180, what="the STAT study")
            opened_by_then = relay.connections - 2
            wait_until_stored_and_sent(config, scp, {*routine, stat}, "all four studies", limit_s=240)
    cut = cut_uids(config, caplog)
    assert cut, "no routine transfer was cut: not the case under test"
    # every cut association replaced, and perhaps one opened for the STAT study (when all were
    # cut), before the STAT study was stored; the old way opened none but that carrier by then
    carrier = 1 if len(cut) == 2 else 0
    assert opened_by_then >= len(cut) + carrier, (opened_by_then, len(cut))
    assert arrivals(scp)[0] == stat
    assert_none_lost_and_uncharged(config, scp, [*routine, stat], cut)


@dataclass
class WireTransfer:
    """What the watch needs of an association on the wire."""

    was_cut: bool = False

    def cut(self) -> None:
        self.was_cut = True


@dataclass
class RoutineItem:
    id: int = 1
    size: int = 75_000


class StatDue:
    """The outbox, as the watch asks it: a STAT item is waiting."""

    def stat_waiting(self, kind: Kind, now: float) -> bool:
        return True


def test_a_new_association_carries_the_stat_study_only_when_no_open_one_can() -> None:
    """An open association carries a STAT study at its next object boundary, without a new
    association's round trip; a new one is opened only when every open one was cut (or ended)."""
    a, b = WireTransfer(), WireTransfer()
    open_now = [a, b]
    opened = threading.Event()
    watch = StatWatch(
        StatDue(),  # type: ignore[arg-type]
        Kind.DICOM,
        time.monotonic,
        TransferRate(),
        poll_s=0.005,
        cut_after_s=0.0,  # every routine transfer on the wire is cut
        open_associations=lambda: list(open_now),  # type: ignore[arg-type,return-value]
        new_carrier=opened.set,
    )
    with watch:
        watch.sending(a, RoutineItem())  # type: ignore[arg-type]
        wait_for(lambda: a.was_cut, 120, what="the routine transfer on the wire cut")
        assert watch.needs_new_carrier() is False and not opened.is_set()  # b carries it
        open_now.remove(b)  # b ended (its share done) before its next object
        watch.carry_if_orphaned()
        assert opened.wait(10), "no association opened for the STAT study"
        assert watch.needs_new_carrier() is True
        open_now.clear()
        assert watch.needs_new_carrier() is True  # none open at all
