"""A STAT ECG overtakes routine studies already being sent over a slow link (issue 16, item 3).

The real peer is dcmtk's storescp behind the link emulator (tests/link_emulator.py); its log has
one line per object it received, in the order they arrived: that order is what is asserted, with
counts at the peer (nothing lost, one instance each; a C-STORE repeated only for a transfer the
forwarder cut) and attempts in the outbox (a transfer cut for the STAT one is not charged).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from tests.link_emulator import LinkRelay
from tests.slow_link_setup import (
    arrivals,
    assert_none_lost_and_uncharged,
    cut_uids,
    enqueue,
    forwarding,
    make_config,
    slow_link,
    wait_until_stored_and_sent,
)
from tests.waiting import wait_for
from uploader.outbox import Kind
from uploader.stat_watch import StatWatch, TransferRate


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
