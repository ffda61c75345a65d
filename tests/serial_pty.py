"""Test plumbing for serial devices over pty pairs (real termios), shared by the serial tests.

A `PtyDevice` is the device side: the test writes what the device sends into the pty master,
the gateway opens the slave through a stable symlink (like /dev/serial/by-id), and unplugging
closes the master (the gateway's reads then fail with EIO, as on a real unplug).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

from devices.bridge.session import BridgeSession, ObservationReady, RecordingReady, SerialDataReceived
from firmware_bridge.serial_link import Link, LinkSpec, PortInfo, SerialLinkManager


class PtyDevice:
    def __init__(self, link_path: Path) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line discipline: bytes are bytes
        tty.setraw(self.master)
        self.slave_path = os.ttyname(self.slave)
        self.link_path = link_path
        tmp = link_path.with_name(link_path.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.slave_path)
        tmp.replace(link_path)  # atomic, as udev does
        os.set_blocking(self.master, True)
        self.open = True

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.master, view)
            view = view[n:]

    def opened_elsewhere(self) -> int:
        """How many other descriptors of this process have the port open (the code under test's,
        in a thread): pyserial discards what waits in the port when it opens it, so a test feeds
        it once this is non-zero."""
        count = 0
        for fd in Path("/proc/self/fd").iterdir():
            try:
                count += os.readlink(fd) == self.slave_path
            except OSError:
                pass  # closed meanwhile
        return count - 1  # ours

    def read_available(self, timeout: float = 0.0) -> bytes:
        import select

        out = b""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                return out
            try:
                out += os.read(self.master, 65536)
            except OSError:
                return out
            deadline = time.monotonic()  # got something: only drain what is there now

    def unplug(self) -> None:
        if self.open:
            self.open = False
            os.close(self.master)
            os.close(self.slave)
            self.link_path.unlink(missing_ok=True)


class SessionHandler:
    """A LinkHandler feeding a BridgeSession; records events; optionally ACKs at once."""

    def __init__(self, auto_ack: bool = True) -> None:
        self.auto_ack = auto_ack
        self.events: list = []
        self.lost: list[str | None] = []
        self.link: Link | None = None
        self.session: BridgeSession | None = None
        self.lock = threading.Lock()

    @staticmethod
    def now() -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def connection_made(self, link: Link) -> None:
        self.link = link
        self.session = BridgeSession(link.port.by_id or link.port.device)
        link.write(self.session.connection_made(self.now()))

    def data_received(self, data: bytes) -> None:
        assert self.session is not None and self.link is not None
        events = self.session.receive_data(data, self.now())
        self._take(events)
        self.link.write(self.session.data_to_send())

    def _take(self, events: list) -> None:
        assert self.session is not None and self.link is not None
        with self.lock:
            self.events.extend(events)
        if self.auto_ack:
            for ev in events:
                if isinstance(ev, (ObservationReady, SerialDataReceived)) or (
                    isinstance(ev, RecordingReady) and ev.seq is not None
                ):
                    self.link.write(self.session.acknowledge(ev.seq))

    def connection_lost(self, reason: str | None, problem: object = None) -> None:
        with self.lock:
            self.lost.append(reason)
        if self.session is not None:
            with self.lock:
                self.events.extend(self.session.connection_lost(self.now()))

    def tick(self) -> float | None:
        return None

    def of_type(self, cls: type) -> list:
        with self.lock:
            return [e for e in self.events if isinstance(e, cls)]


class ManagerThread:
    """Runs a SerialLinkManager in a thread for the duration of a test."""

    def __init__(
        self, specs: list[LinkSpec], factory: Callable[[LinkSpec, PortInfo], object], **kwargs: object
    ) -> None:
        self.manager = SerialLinkManager(specs, factory, **kwargs)  # type: ignore[arg-type]
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self.manager.run, args=(self.stop,), kwargs={"max_wait_s": 0.2}, daemon=True
        )

    def __enter__(self) -> SerialLinkManager:
        self.thread.start()
        return self.manager

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.manager.wakeup()
        self.thread.join(10)
        assert not self.thread.is_alive(), "link manager did not stop"
        self.manager.close()
