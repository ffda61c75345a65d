"""The sd_notify client against real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lastmile.services.sdnotify import SystemdNotifier, watchdog_period


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A stand-in for systemd's notification socket, bound to a path."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_without_notify_socket_every_call_is_a_quiet_no_op() -> None:
    n = SystemdNotifier(environ={})
    assert not n.enabled
    assert n.watchdog_s is None
    assert n.ready("x") is False
    assert n.watchdog_ping() is False
    assert n.stopping() is False


def test_ready_status_and_stopping_reach_a_path_socket(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("listening on 11113")
    assert received(sock) == ["READY=1", "STATUS=listening on 11113"]
    assert n.status("sent 3\nof 4")  # a newline would start a new assignment
    assert received(sock) == ["STATUS=sent 3 of 4"]
    assert n.status("sent 3 of 4") is False  # unchanged status is not resent
    assert n.stopping("bye")
    assert received(sock) == ["STOPPING=1", "STATUS=bye"]
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"lastmile-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        n = SystemdNotifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert received(sock) == ["READY=1"]
    finally:
        sock.close()


def test_reloading_carries_monotonic_usec(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    n.reloading()
    lines = received(sock)
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=")[1]) > 0


def test_watchdog_period_follows_sd_watchdog_enabled() -> None:
    assert watchdog_period({}) is None
    assert watchdog_period({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_period({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "junk"}) is None
    mine = str(os.getpid())
    assert watchdog_period({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": mine}) == 2.0
    # Another process's watchdog (e.g. inherited by a child) is not ours to ping.
    assert watchdog_period({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


def test_watchdog_pings_are_rate_limited(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    assert n.watchdog_s == 1.0
    assert n.watchdog_ping(min_interval=0.5, now=100.0)
    assert received(sock) == ["WATCHDOG=1"]
    assert n.watchdog_ping(min_interval=0.5, now=100.2) is False
    assert n.watchdog_ping(min_interval=0.5, now=100.6)
    assert received(sock) == ["WATCHDOG=1"]


def test_unset_environment_hides_the_socket_from_children(manager: tuple[socket.socket, str]) -> None:
    _, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    n = SystemdNotifier(environ=env, unset_environment=True)
    assert n.enabled and n.watchdog_s == 1.0
    assert env == {"PATH": "/bin"}


def test_a_vanished_manager_never_breaks_the_service(tmp_path: Path) -> None:
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "1000"})
    assert n.ready() is False
    assert n.watchdog_ping() is False


def test_unsupported_address_forms_are_ignored() -> None:
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
