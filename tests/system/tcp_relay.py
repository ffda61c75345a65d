"""stdin/stdout <-> TCP to 127.0.0.1:PORT: what qemu's `guestfwd=...-cmd:` runs for each connection.

    python3 tcp_relay.py PORT

qemu's user-mode network with `restrict=on` reaches nothing on its own; a guestfwd rule hands each
TCP connection the guest opens to a fixed address to this program (one process per connection),
which carries it to a loopback port on the host side (the test's Orthanc): the only way out.
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def pump_in(peer: socket.socket) -> None:
    """What the guest sends (our stdin) to the peer; half-close when the guest is done."""
    while chunk := os.read(0, 65536):
        peer.sendall(chunk)
    peer.shutdown(socket.SHUT_WR)


def main() -> int:
    peer = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
    peer.settimeout(None)
    threading.Thread(target=pump_in, args=(peer,), daemon=True).start()
    while chunk := peer.recv(65536):
        view = memoryview(chunk)
        while view:
            view = view[os.write(1, view) :]
    return 0


if __name__ == "__main__":
    sys.exit(main())
