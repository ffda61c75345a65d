"""The link emulator really adds the latency and rate it is configured with, shares one bottleneck
between connections, and delivers every byte in order. Elapsed times are only ever checked as
lower bounds: a loaded machine can make a link slower, never faster than configured."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.link_emulator import ADMITTED_KEPT, PROFILES, Bottleneck, LinkProfile, LinkRelay


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A plain TCP echo server on loopback."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield port
    stop.set()
    t.join(5)
    listener.close()


def round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = s.recv(65536)
            assert chunk, "connection closed early"
            got += chunk
        elapsed = time.monotonic() - started
        sender.join()
    return bytes(got), elapsed


def test_latency_is_added_both_ways(echo_server: int) -> None:
    profile = LinkProfile("slow", None, None, rtt_s=0.3)
    with LinkRelay(profile, "127.0.0.1", echo_server) as relay:
        got, elapsed = round_trip(relay.port, b"ping")
    assert got == b"ping"
    assert elapsed >= 0.3  # there and back: two one-way delays


def test_rate_limits_the_uplink_and_every_byte_arrives_in_order(echo_server: int) -> None:
    payload = os.urandom(100_000)  # 800 kbit
    profile = LinkProfile("1mbit", up_bps=1e6, down_bps=None, rtt_s=0.02, jitter_s=0.01)
    with LinkRelay(profile, "127.0.0.1", echo_server) as relay:
        got, elapsed = round_trip(relay.port, payload)
        assert relay.up is not None and relay.up.bytes_total == len(payload)
    assert got == payload  # jitter never reorders one connection's bytes
    assert elapsed >= 0.8


def test_connections_share_one_bottleneck(echo_server: int) -> None:
    payload = os.urandom(50_000)  # 400 kbit each; two at once need 0.8 s of a 1 Mbit/s uplink
    profile = LinkProfile("shared", up_bps=1e6, down_bps=None, rtt_s=0.0)
    results: list[tuple[bytes, float]] = []
    with LinkRelay(profile, "127.0.0.1", echo_server) as relay:
        threads = [threading.Thread(target=lambda: results.append(round_trip(relay.port, payload))) for _ in range(2)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        both = time.monotonic() - started
        assert relay.connections == 2
    assert [r[0] == payload for r in results] == [True, True]
    assert both >= 0.8


def test_loss_stalls_the_link_without_losing_bytes(echo_server: int) -> None:
    payload = os.urandom(200_000)
    profile = LinkProfile("lossy", None, None, rtt_s=0.0, loss=0.05, stall_s=0.05)
    with LinkRelay(profile, "127.0.0.1", echo_server, seed=7) as relay:
        got, elapsed = round_trip(relay.port, payload)
        stalls = relay.stalls
    assert got == payload
    assert stalls > 0
    assert elapsed >= 0.05  # at least one stall held the stream
    assert relay.up is not None and relay.down is not None
    assert relay.up.stalls + relay.down.stalls == stalls
    link = relay.up if relay.up.stall_spans else relay.down
    spans = link.stall_spans
    assert spans and all(b - a == pytest.approx(0.05) for a, b in spans)
    a, b = spans[0]  # its first stall
    assert link.stalled_s(a - 1.0, b) == pytest.approx(0.05)
    assert link.stalled_s(a + 0.01, a + 0.02) == pytest.approx(0.01)  # a stall begun before counts
    assert link.stalled_s(a - 1.0, a) == 0.0  # nothing stalled before the first


def test_time_stalled_counts_stalls_begun_before_and_clips_to_the_window() -> None:
    link = Bottleneck(200e3, 0.2, 0.0, 0.0, 1.0, 0, random.Random(0))
    link.stall_spans += [(10.0, 11.0), (13.0, 14.0)]
    assert link.stalls == 2
    assert link.stalled_s(0.0, 20.0) == pytest.approx(2.0)
    assert link.stalled_s(10.8, 13.5) == pytest.approx(0.2 + 0.5)
    assert link.stalled_s(11.0, 13.0) == 0.0


def test_the_queue_a_moment_ago_is_what_the_link_held_then_not_what_came_since() -> None:
    link = Bottleneck(8_000, 0.2, 0.0, 0.0, 1.0, 0, random.Random(0))  # 1000 bytes a second
    assert link.queued_s_at(5.0) == 0.0  # nothing came yet
    link.schedule(10.0, 1000)  # on the link until 11.0
    link.schedule(10.5, 1000)  # ... then until 12.0
    assert link.queued_s_at(9.9) == 0.0
    assert link.queued_s_at(10.25) == pytest.approx(0.75)  # the second chunk came after
    assert link.queued_s_at(10.6) == pytest.approx(1.4)
    assert link.queued_s_at(12.5) == 0.0
    for i in range(ADMITTED_KEPT):
        link.schedule(20.0 + i, 1)
    with pytest.raises(ValueError, match="does not reach back"):
        link.queued_s_at(10.6)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_are_the_issue_s(name: str) -> None:
    p = PROFILES[name]
    expected = {
        "lan": (None, 0.0005),
        "4g": (8e6, 0.060),
        "3g": (1e6, 0.150),
        "edge": (200e3, 0.400),
        "satellite": (1e6, 0.650),
    }[name]
    assert (p.up_bps, p.rtt_s) == expected
    assert (p.loss > 0) == (name == "edge")  # the profile that stalls


def test_floors_count_the_rate_and_the_latency() -> None:
    p = LinkProfile("1mbit", up_bps=1e6, down_bps=None, rtt_s=0.2)
    assert p.floor_s(125_000) == pytest.approx(1.0 + 0.2)  # the bytes, and a round trip
    assert p.arrival_floor_s(125_000) == pytest.approx(1.0 + 0.1)  # the bytes, and the way there
    unlimited = LinkProfile("lan", None, None, rtt_s=0.002)
    assert unlimited.arrival_floor_s(10**9) == pytest.approx(0.001)


def test_closing_with_a_connection_open_reports_no_error(echo_server: int, caplog: pytest.LogCaptureFixture) -> None:
    relay = LinkRelay(LinkProfile("held", None, None, rtt_s=0.0), "127.0.0.1", echo_server).start()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(b"x")
        assert s.recv(1) == b"x"  # the connection is relayed, and still open when the relay closes
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            relay.close()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
