"""Loopback ports for the demo's stand-in servers (and the tests' real peers)."""

from __future__ import annotations

import random
import socket

# Below Linux's ephemeral range (32768-60999): a port the OS may also hand out as the local end of
# an outgoing connection is one a restarted server can find taken - by any client on the machine, or
# by a client retrying against it while it is down (TCP self-connect) - and then cannot listen on.
FREE_PORT_RANGE = (20000, 32767)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, outside the ephemeral range (above)."""
    pick = random.SystemRandom()
    for _attempt in range(200):
        port = pick.randint(*FREE_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: the OS's pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
