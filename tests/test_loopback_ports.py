"""Test servers listen below the ephemeral port range, where no outgoing connection (nor a client's
TCP self-connect while the server restarts) can take their port from under them."""

from __future__ import annotations

import socket

from lastmile.demo.loopback import FREE_PORT_RANGE, free_port, port_range


def test_free_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    low, high = FREE_PORT_RANGE
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    assert high < ephemeral_low
    ports = {free_port() for _ in range(20)}
    assert all(low <= p <= high for p in ports) and len(ports) > 1
    worker_low, worker_high = port_range()  # this worker's own slice, when tests run in parallel
    assert all(worker_low <= p <= worker_high for p in ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free when handed out


def test_a_port_slice_outside_the_free_range_is_ignored(monkeypatch) -> None:
    monkeypatch.setenv("LASTMILE_PORT_RANGE", "20000-20099")
    assert port_range() == (20000, 20099) and all(20000 <= free_port() <= 20099 for _ in range(5))
    for bad in ("1000-2000", "30000-40000", "nonsense", "25000-24000"):
        monkeypatch.setenv("LASTMILE_PORT_RANGE", bad)
        assert port_range() == FREE_PORT_RANGE
