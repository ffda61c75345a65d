"""Loopback ports for the demo's stand-in servers (and the tests' real peers)."""

from __future__ import annotations

import os
import random
import socket

# Below Linux's ephemeral range (32768-60999): a port the OS may also hand out as the local end of
# an outgoing connection is one a restarted server can find taken - by any client on the machine, or
# by a client retrying against it while it is down (TCP self-connect) - and then cannot listen on.
FREE_PORT_RANGE = (20000, 32767)


def port_range() -> tuple[int, int]:
    """FREE_PORT_RANGE, or the slice of it named by LASTMILE_PORT_RANGE ("LOW-HIGH"): parallel test
    workers share one network namespace, and a port one picked is free only until its server
    listens; between a server's restarts another worker could pick it. Each takes its own slice."""
    try:
        low, high = (int(part) for part in os.environ.get("LASTMILE_PORT_RANGE", "").split("-"))
    except ValueError:
        return FREE_PORT_RANGE
    if FREE_PORT_RANGE[0] <= low < high <= FREE_PORT_RANGE[1]:
        return (low, high)
    return FREE_PORT_RANGE


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, outside the ephemeral range (above)."""
    pick = random.SystemRandom()
    low, high = port_range()
    for _attempt in range(200):
        port = pick.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: the OS's pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
