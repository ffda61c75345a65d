"""Parallel associations that hide the round trip, and a link rate remembered across restarts
(issue 16, items 2 and 3).

- One object's data set at a time on a paced link (uploader/link_pacing.py): the other
  associations wait for their turn, so their responses' round trips overlap its transfer instead
  of every association sending at a fraction of the rate and then all waiting together.
- The rate the forwarder measured is kept in the outbox: after a restart routine sending is paced
  from its first byte, so a STAT study made as a backlog starts does not queue behind a full modem
  buffer; a remembered rate the link no longer has is dropped.
- Through the link emulator into dcmtk's storescp with three associations: every study arrives
  once (exactly once, attempts charged once), and a STAT study overtakes the paced routine ones.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from lastmile.services.forward import forwarder_settings, open_outbox
from tests.link_emulator import LinkProfile, LinkRelay
from tests.slow_link_setup import (
    FakeTime,
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
from uploader.ecg_forwarder import LINK_STATUS_NAME, EcgForwarder
from uploader.link_pacing import (
    COMMAND_DONE,
    DATA_SET_DONE,
    HEADROOM,
    PROBE_EVERY,
    PROBE_GAIN,
    PROBE_PAID,
    STALE_AFTER_LATE,
    LinkPacer,
    last_fragment,
)


def c_store_pdus(size: int, pdu_bytes: int = 4096) -> list[bytes]:
    """The P-DATA-TF PDUs pynetdicom sends for one C-STORE of a `size`-byte data set."""
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.9.1.1", "1.2.3.4"
    req.DataSet = BytesIO(b"\x00" * size)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.context_id = 1
    encoded = []
    for primitive in msg.encode_msg(1, pdu_bytes):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        encoded.append(pdu.encode())
    return encoded


def test_the_last_fragment_of_command_and_data_set_is_read_from_the_pdu() -> None:
    pdus = c_store_pdus(10_000)
    marks = [last_fragment(p) for p in pdus]
    assert marks[0] == COMMAND_DONE and marks[-1] == DATA_SET_DONE
    assert all(m == 0 for m in marks[1:-1]) and len(marks) == 4
    assert last_fragment(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00") is None  # A-RELEASE-RQ: not data
    assert last_fragment(b"\x04\x00") is None  # truncated: nothing read past the end


def test_the_last_fragment_of_pdus_written_back_to_back_is_the_last_ones() -> None:
    # an unpaced association's run of PDUs (uploader.dicom_reactor.EncodedMessage) is seen at once
    pdus = c_store_pdus(10_000)
    for n in range(1, len(pdus) + 1):
        assert last_fragment(b"".join(pdus[:n])) == last_fragment(pdus[n - 1])
    assert last_fragment(b"".join(pdus) + b"\x04\x00") == DATA_SET_DONE  # a cut tail: nothing read past the end


@dataclass
class Sent:
    data: bytes


def paced_pacer() -> LinkPacer:
    pacer = LinkPacer(sleep=lambda s: None)  # the turn is the subject, not the pace's sleeps
    pacer.remember({"bytes_per_s": 100_000.0})
    assert pacer.pace is not None
    return pacer


def test_one_object_at_a_time_on_a_paced_link() -> None:
    pacer = paced_pacer()
    order: list[str] = []
    pdus = c_store_pdus(10_000)

    def store(name: str) -> None:
        assert pacer.take_turn(name)
        for pdu in pdus:
            order.append(name)
            pacer.on_data_sent(Sent(pdu))
        # ... its response comes a round trip later; the turn went with its last PDU
        pacer.end_turn(name)

    assert pacer.take_turn("a")
    b_stores = threading.Thread(target=store, args=("b",))
    b_stores.start()
    b_stores.join(0.3)
    assert b_stores.is_alive() and order == []  # b waits for a's object
    for pdu in pdus:
        order.append("a")
        pacer.on_data_sent(Sent(pdu))  # a's last data-set PDU hands the turn on
    b_stores.join(10)
    assert not b_stores.is_alive()
    assert order == ["a"] * 4 + ["b"] * 4
    pacer.end_turn("a")  # a's response: the turn is b's or nobody's, not taken from it
    assert not pacer.owns_turn("a")


def test_an_ended_c_store_gives_up_its_turn_and_a_stat_study_stops_the_wait() -> None:
    pacer = paced_pacer()
    pdus = c_store_pdus(10_000)
    assert pacer.take_turn("a")
    pacer.on_data_sent(Sent(pdus[0]))  # a is cut mid-object: its last fragment never goes
    stat_due = threading.Event()
    got: list[bool] = []
    b_waits = threading.Thread(target=lambda: got.append(pacer.take_turn("b", stat_due)))
    b_waits.start()
    b_waits.join(0.3)
    assert b_waits.is_alive()
    pacer.end_turn("a")  # its C-STORE ended (TransientError): the turn is free
    b_waits.join(10)
    assert got == [True] and pacer.owns_turn("b")
    c_waits = threading.Thread(target=lambda: got.append(pacer.take_turn("c", stat_due)))
    c_waits.start()
    c_waits.join(0.3)
    assert c_waits.is_alive()
    stat_due.set()  # c carries the STAT study instead, on its open association
    c_waits.join(10)
    assert got == [True, False] and pacer.owns_turn("b")


def test_an_unpaced_link_has_no_turns() -> None:
    pacer = LinkPacer(sleep=lambda s: None)
    assert pacer.take_turn("a") and pacer.take_turn("b")  # neither waits
    assert not pacer.owns_turn("a") and not pacer.owns_turn("b")


def test_every_few_objects_one_probes_for_a_faster_link() -> None:
    t = FakeTime()
    pacer = LinkPacer(clock=t.clock, sleep=t.sleep)
    pacer.remember({"bytes_per_s": 50_000.0})
    pacer.observe_rtt(0.1)
    paced = 50_000 * HEADROOM
    pdus = c_store_pdus(50_000, pdu_bytes=5_000)
    spans = []
    for n in range(1, 2 * PROBE_EVERY + 1):
        pacer.take_turn(n)
        start = t.now
        for pdu in pdus:
            pacer.on_data_sent(Sent(pdu))
        spans.append(t.now - start)
        # the probe's own rate, its response a round trip after its last byte: the link had more
        took = t.now - start + 0.1
        t.now += 0.1
        pacer.observe_object(sum(map(len, pdus)), tail_s=0.1, alone_s=took)
        pacer.end_turn(n)
    normal = spans[0]
    assert spans[PROBE_EVERY - 1] == pytest.approx(normal / PROBE_GAIN, rel=0.05)
    assert spans[-1] < spans[PROBE_EVERY - 1]  # the probe raised the estimate: the next went faster
    assert pacer.pace is not None and pacer.pace > paced * PROBE_GAIN  # two probes, each a step up


def test_a_remembered_rate_paces_from_the_first_byte_and_a_stale_one_is_dropped() -> None:
    t = FakeTime()
    pacer = LinkPacer(clock=t.clock, sleep=t.sleep)
    pacer.remember({"bytes_per_s": 50_000.0})
    assert pacer.pace == pytest.approx(50_000 * HEADROOM)
    assert pacer.remembered() is None  # nothing measured here yet: nothing new to keep
    pacer.observe_rtt(0.4)
    pacer.on_data_sent(Sent(b"x"))
    # the link is slower now (25 kB/s): paced too fast, every response comes late - the first
    # object stored replaces the remembered rate (not STALE_AFTER_LATE of them: a queue that long
    # is what a STAT study waits behind)
    for _ in range(STALE_AFTER_LATE):
        t.now += 3.0
        pacer.observe_object(75_000, tail_s=2.0)
        assert pacer.measured == pytest.approx(75_000 / 2.6)  # the best this process saw
    assert pacer.remembered() == {"bytes_per_s": round(75_000 / 2.6, 1), "rtt_s": 0.4}


def test_a_faster_link_raises_the_remembered_rate() -> None:
    t = FakeTime()
    pacer = LinkPacer(clock=t.clock, sleep=t.sleep)
    pacer.remember({"bytes_per_s": 50_000.0})
    pacer.on_data_sent(Sent(b"x"))
    t.now += 1.0
    pacer.observe_object(80_000, tail_s=None)
    assert pacer.measured == pytest.approx(80_000)
    assert pacer.remembered() == {"bytes_per_s": 80_000.0}
    pacer.remember({"bytes_per_s": 10.0})  # measured here already: that is newer
    assert pacer.measured == pytest.approx(80_000)


def test_the_forwarder_keeps_the_link_rate_for_the_next_start(tmp_path: Path, storescp_factory) -> None:
    scp = storescp_factory(accept="deflated")
    with LinkRelay(slow_link(400e3), "127.0.0.1", scp.port) as relay:
        config = make_config(tmp_path, relay.port, associations=2)
        enqueue(config, range(3), seconds=10.0)  # ~64 kB each: the transfer, not the round trip, counts
        with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
            assert fwd.pacer.pace is None  # a new gateway: nothing known of the link
            deadline = time.monotonic() + 120
            while fwd.step() == 0.0 or len(set(arrivals(scp))) < 3:
                assert time.monotonic() < deadline, "the three studies were not sent"
            kept = outbox.status(LINK_STATUS_NAME)
        # measured from three objects on a loaded machine: roughly the link's rate, never a multiple
        assert kept is not None and 400e3 / 8 / 4 < kept["bytes_per_s"] < 400e3 / 8 * 1.4
        with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
            assert fwd.pacer.pace == pytest.approx(kept["bytes_per_s"] * HEADROOM)  # paced from the first byte


def test_three_paced_associations_send_each_study_once_and_stat_overtakes(
    tmp_path: Path, storescp_factory, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="uploader.stat_watch")
    scp = storescp_factory(accept="deflated")
    with LinkRelay(slow_link(400e3), "127.0.0.1", scp.port) as relay:
        config = make_config(tmp_path, relay.port, associations=3)
        with open_outbox(config) as outbox:  # the link as a previous run measured it: paced at once
            outbox.record_status(LINK_STATUS_NAME, {"bytes_per_s": 400e3 / 8}, time.time())
        routine = enqueue(config, range(9))
        with forwarding(config):
            wait_for(lambda: len(arrivals(scp)) >= 1, 120, what="the first routine study")
            before = len(set(arrivals(scp)))
            [stat] = enqueue(config, range(100, 101), stat=True)
            wait_until_stored_and_sent(config, scp, {*routine, stat}, "all ten studies")
    order = list(dict.fromkeys(arrivals(scp)))
    # at most the three routine objects already on their associations arrive before it
    assert order.index(stat) <= before + 3, (order.index(stat), before, order)
    assert order.index(stat) < len(order) - 3
    cut = cut_uids(config, caplog)
    # one object on the link at a time: only that one is cut; the others' bytes had all left
    assert len(cut) <= 1, cut
    assert_none_lost_and_uncharged(config, scp, [*routine, stat], cut)


@pytest.mark.parametrize(
    ("kept", "associations"),
    [
        (None, 2),  # nothing known of the link: the configured count
        # one sends, those waiting for their responses cover the round trip, one more waits for
        # its turn (free to carry a STAT study at once)
        ({"bytes_per_s": 125_000.0, "rtt_s": 0.65, "object_bytes": 75_000}, 4),  # satellite
        ({"bytes_per_s": 25_000.0, "rtt_s": 0.4, "object_bytes": 75_000}, 3),  # EDGE: the object outlasts the RTT
        ({"bytes_per_s": 125_000.0, "rtt_s": 2.0, "object_bytes": 20_000}, 4),  # at most max_associations
    ],
)
def test_more_associations_where_the_round_trip_is_long_against_an_object(
    tmp_path: Path, kept: dict[str, float] | None, associations: int
) -> None:
    config = make_config(tmp_path, 104, associations=2)
    config.reading_center.max_associations = 4
    with open_outbox(config) as outbox:
        if kept is not None:
            outbox.record_status(LINK_STATUS_NAME, kept, time.time())
        fwd = EcgForwarder(outbox, forwarder_settings(config))
        assert fwd.associations_for_link() == associations


def test_a_round_started_knowing_nothing_of_the_link_adds_associations_once_it_is_measured(
    tmp_path: Path, storescp_factory
) -> None:
    """A new gateway's first backlog: the round starts on the configured two associations; once
    its first objects show a round trip long against an object's time, more join the same round
    and take their share of its items (on 4G two left the link idle a fifth of the time)."""
    scp = storescp_factory(accept="deflated")
    long_trip = LinkProfile("long", 2e6, 2e6, 0.3, queue_bytes=16 * 1024)
    with LinkRelay(long_trip, "127.0.0.1", scp.port) as relay:
        config = make_config(tmp_path, relay.port, associations=2)
        config.reading_center.max_associations = 4
        uids = enqueue(config, range(12), seconds=10.0)  # ~64 kB each
        with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
            assert fwd.associations_for_link() == 2  # nothing known of the link yet
            result = fwd.run_round(threading.Event())  # one round: all twelve claimed at its start
    assert result.sent == 12
    assert 2 < relay.connections <= 4, relay.connections  # joined mid-round, never past max_associations
    assert_none_lost_and_uncharged(config, scp, uids, set())


def test_a_turn_that_comes_free_while_a_stat_study_is_due_goes_to_it() -> None:
    pacer = paced_pacer()
    stat_due = threading.Event()
    stat_due.set()
    # the owner was cut for the STAT study: the free turn is not for the next routine object
    assert pacer.take_turn("b", stat_due) is False
    assert not pacer.owns_turn("b")
    assert pacer.take_turn("b") and pacer.owns_turn("b")  # no STAT study: routine goes on


def test_a_cut_object_leaves_the_link_free_from_then() -> None:
    t = FakeTime()
    pacer = LinkPacer(clock=t.clock, sleep=t.sleep)
    pacer.remember({"bytes_per_s": 10_000.0})
    data = [p for p in c_store_pdus(20_000) if last_fragment(p) not in (COMMAND_DONE, DATA_SET_DONE)]
    assert pacer.take_turn("a")
    pacer.on_data_sent(Sent(data[0]))
    pacer.on_data_sent(Sent(data[1]))  # a waited for the first: the second is scheduled ahead
    assert pacer.link_free_at() > t.now
    pacer.end_turn("a")  # cut before its last fragment: its schedule will never be sent
    assert pacer.link_free_at() == t.now
    # an object that ended normally gave its turn up with its last fragment: end_turn keeps the schedule
    assert pacer.take_turn("b")
    for pdu in c_store_pdus(20_000):
        pacer.on_data_sent(Sent(pdu))
    free_at = pacer.link_free_at()
    pacer.end_turn("b")
    assert pacer.link_free_at() == free_at


def test_a_c_store_command_is_not_waited_after_its_data_follows_at_once() -> None:
    """One PDU ahead at every object boundary too: the next object's first data PDU is written
    while the object before it still crosses the link (waiting after the command, the link idled
    ~20 ms per object on 4G)."""
    t = FakeTime()
    pacer = LinkPacer(clock=t.clock, sleep=t.sleep)
    pacer.remember({"bytes_per_s": 10_000.0})
    command, first, *_ = c_store_pdus(20_000)
    assert last_fragment(command) == COMMAND_DONE
    for pdu in c_store_pdus(20_000):  # the object before, paced
        pacer.on_data_sent(Sent(pdu))
    before = t.now
    pacer.on_data_sent(Sent(command))
    assert t.now == before  # no wait: the data set follows
    pacer.on_data_sent(Sent(first))
    assert t.now > before  # the first data PDU waits for the link, as every other


def test_a_link_not_measured_yet_takes_turns_unless_it_is_a_lan() -> None:
    """Before the first object is stored nothing is paced, but on a link with a round trip the
    objects still go one after another: four written at once cross the link interleaved, the
    first stored only after all four, and that first estimate was a third of the link's rate."""
    pacer = LinkPacer(sleep=lambda s: None)
    pacer.observe_rtt(0.06)  # 4G
    assert pacer.pace is None
    assert pacer.take_turn("a")
    stat_due = threading.Event()
    stat_due.set()
    assert pacer.take_turn("b", stat_due) is False  # b waits for a's object (and gives up for STAT)
    lan = LinkPacer(sleep=lambda s: None)
    lan.observe_rtt(0.0005)
    assert lan.take_turn("a") and lan.take_turn("b")  # a LAN: no turns
    assert not lan.owns_turn("a")


def test_while_samples_raise_the_estimate_the_next_object_probes_again() -> None:
    """A first estimate below the link's rate (measured before the store's round trip was known)
    is raised by probes: one every PROBE_EVERY objects climbed to 4G's rate over 18 objects. A
    sample that raised the estimate by PROBE_PAID or more makes the next object a probe; one that
    did not, does not."""
    t = FakeTime()
    pacer = LinkPacer(clock=t.clock, sleep=t.sleep)
    pacer.remember({"bytes_per_s": 50_000.0})
    pacer.observe_rtt(0.1)
    pdus = c_store_pdus(50_000, pdu_bytes=5_000)
    size = sum(map(len, pdus))
    sent_at: list[float] = []  # each object's time on the link x the pace it was sent at
    estimates: list[float] = []
    for n, link_rate in enumerate((60_000.0, None, None), start=1):  # None: its own rate not known
        pace = pacer.pace
        assert pacer.take_turn(n) and pace is not None
        start = t.now
        for pdu in pdus:
            pacer.on_data_sent(Sent(pdu))
        sent_at.append((t.now - start) * pace)
        t.now += 0.1  # its response, a round trip after its last byte
        pacer.observe_object(size, tail_s=0.1, alone_s=size / link_rate + 0.1 if link_rate else None)
        pacer.end_turn(n)
        assert pacer.measured is not None
        estimates.append(pacer.measured)
    # the first object's own rate raised the estimate (by at most a probe's gain: it was not sent
    # faster than the pace): the second of PROBE_EVERY objects went as a probe, faster than the pace
    assert estimates[0] == pytest.approx(50_000 * HEADROOM * PROBE_GAIN)
    assert estimates[0] >= 50_000 * PROBE_PAID and PROBE_EVERY > 3
    assert sent_at[1] == pytest.approx(sent_at[0] / PROBE_GAIN, rel=0.01)
    # the probe's window raised the estimate by less than PROBE_PAID: the third went at the pace
    assert estimates[1] < estimates[0] * PROBE_PAID
    assert sent_at[2] == pytest.approx(sent_at[0], rel=0.01)
