"""Serial links: find devices by USB identity, open them exclusively, pump bytes, survive unplugs.

    manager = SerialLinkManager([LinkSpec("bridge", PortMatch.parse("2e8a:000a:E6614104"))],
                                handler_factory)
    manager.run(stop_event)

- **Finding.** A device is named by USB VID:PID (and serial number) as pyserial's port listing
  and `/dev/serial/by-id` report them, or by a stable path (`/dev/serial/by-id/...`), never by
  `ttyUSB0` order, which changes with plug order.
- **Hot-plug.** The manager sleeps in one `select` over every open port and an inotify
  descriptor on `/dev` and `/dev/serial/by-id` (ctypes; pyudev is not available). A USB serial
  device appearing (devtmpfs node, udev symlink) wakes it at once. Because inotify does not see
  every kind of node (devpts, ptys used in tests) and may be unavailable, a cheap rescan (stat
  of configured paths, a sysfs listing only when a VID:PID match is configured) also runs every
  `rescan_s` (1 s without inotify, 10 s as a safety net with it): a device is noticed within
  2 s either way and an idle gateway does no busy polling. A device that disappears is noticed
  at once through the read error on its open descriptor.
- **Exclusive open** (flock through pyserial), reconnect with capped exponential backoff (reset
  when the device reappears), and an unplug mid-message never crashes: the handler is told the
  connection was lost and the protocol object drops the half frame; everything complete before
  it was already delivered.
- The manager only moves bytes: a `LinkHandler` (built per connection by `handler_factory`)
  feeds them to the pure protocol objects of `devices/` and writes what they ask for.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import selectors
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import serial

from devices.device_errors import DEVICE_GONE, DeviceProblem

log = logging.getLogger(__name__)

BY_ID_DIR = Path("/dev/serial/by-id")
READ_CHUNK = 65536


# -- finding ports ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortInfo:
    device: str  # the node, e.g. /dev/ttyACM0
    vid: int | None = None
    pid: int | None = None
    serial_number: str = ""
    manufacturer: str = ""
    product: str = ""
    by_id: str = ""  # /dev/serial/by-id/... link pointing at it, if any

    def usb_id(self) -> str:
        if self.vid is None or self.pid is None:
            return ""
        ident = f"{self.vid:04x}:{self.pid:04x}"
        return f"{ident}:{self.serial_number}" if self.serial_number else ident


def list_ports(by_id_dir: Path = BY_ID_DIR) -> list[PortInfo]:
    """Serial ports present now, with their USB identity where they have one."""
    from serial.tools import list_ports as lp

    links: dict[str, str] = {}
    try:
        for entry in os.scandir(by_id_dir):
            links[os.path.realpath(entry.path)] = entry.path
    except OSError:
        pass
    ports = []
    for p in lp.comports():
        ports.append(
            PortInfo(
                device=p.device,
                vid=p.vid,
                pid=p.pid,
                serial_number=p.serial_number or "",
                manufacturer=p.manufacturer or "",
                product=p.product or "",
                by_id=links.get(os.path.realpath(p.device), ""),
            )
        )
    return sorted(ports, key=lambda p: p.device)


@dataclass(frozen=True, slots=True)
class PortMatch:
    """Which port a configured device is: `VID:PID[:SERIAL]` (hex ids) or a path (`/dev/...`)."""

    vid: int | None = None
    pid: int | None = None
    serial_number: str = ""
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> PortMatch:
        text = text.strip()
        if text.startswith("/"):
            return cls(path=text)
        parts = text.split(":", 2)
        if len(parts) < 2:
            raise ValueError(f"device match {text!r} is neither VID:PID[:SERIAL] nor a /dev path")
        try:
            vid, pid = int(parts[0], 16), int(parts[1], 16)
        except ValueError:
            raise ValueError(f"device match {text!r}: VID and PID are hexadecimal numbers") from None
        if not (0 <= vid <= 0xFFFF and 0 <= pid <= 0xFFFF):
            raise ValueError(f"device match {text!r}: VID and PID are 16-bit")
        return cls(vid=vid, pid=pid, serial_number=parts[2] if len(parts) == 3 else "")

    @property
    def needs_listing(self) -> bool:
        return not self.path

    def __str__(self) -> str:
        if self.path:
            return self.path
        ident = f"{self.vid:04x}:{self.pid:04x}"
        return f"{ident}:{self.serial_number}" if self.serial_number else ident

    def find(self, ports: Iterable[PortInfo]) -> PortInfo | None:
        if self.path:
            if not os.path.exists(self.path):
                return None
            return PortInfo(device=os.path.realpath(self.path), by_id=self.path)
        for p in ports:
            if (
                p.vid == self.vid
                and p.pid == self.pid
                and (not self.serial_number or p.serial_number == self.serial_number)
            ):
                return p
        return None


# -- hot-plug notification -----------------------------------------------------------------------

_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_MOVED_TO = 0x80
_IN_ATTRIB = 0x4
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


class DevWatcher:
    """inotify on a few directories (e.g. /dev, /dev/serial/by-id) through libc, via ctypes.

    `fileno()` becomes readable when an entry is created, deleted or renamed there; `drain()`
    empties it. `available` is False where inotify cannot be used (then callers rescan).
    """

    def __init__(self, directories: Sequence[str | os.PathLike[str]]) -> None:
        self.fd = -1
        self._wanted = [str(d) for d in directories]
        self._watched: set[str] = set()
        try:
            # the process's own symbols (libc among them): find_library("c") would run
            # `ldconfig -p` in a child process and import subprocess into the acquire service
            libc = ctypes.CDLL(None, use_errno=True)
            self._add = libc.inotify_add_watch
            self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError) as exc:
            log.info("inotify unavailable (%s): hot-plug by periodic rescan only", exc)
            return
        if fd < 0:
            log.info("inotify_init1 failed (errno %d): hot-plug by periodic rescan only", ctypes.get_errno())
            return
        self.fd = fd
        self.refresh()

    @property
    def available(self) -> bool:
        return self.fd >= 0

    def refresh(self) -> None:
        """Watch wanted directories that exist now (e.g. /dev/serial/by-id appears with the first device)."""
        if self.fd < 0:
            return
        for d in self._wanted:
            if d in self._watched or not os.path.isdir(d):
                continue
            mask = _IN_CREATE | _IN_DELETE | _IN_MOVED_TO | _IN_ATTRIB
            if self._add(self.fd, os.fsencode(d), mask) >= 0:
                self._watched.add(d)
            else:
                log.debug("cannot watch %s (errno %d)", d, ctypes.get_errno())

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> int:
        """Read pending events; returns how many there were."""
        count = 0
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return count
            except OSError:
                return count
            if not buf:
                return count
            pos = 0
            while pos + 16 <= len(buf):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, pos)
                pos += 16 + length
                count += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- links ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """A configured serial device: which port, at what speed, and what speaks on it."""

    name: str
    match: PortMatch
    profile: str = ""  # "bridge", "scanner" or an ASCII-report profile name
    baudrate: int = 115200
    options: dict = field(default_factory=dict, hash=False, compare=False)


class Link:
    """An open port. Handlers write through it; the manager reads."""

    def __init__(self, spec: LinkSpec, port: PortInfo, *, write_timeout_s: float = 1.0) -> None:
        self.spec = spec
        self.port = port
        # Exclusive: a second gateway process (or a stray terminal) cannot steal half the bytes.
        self._serial = serial.Serial(
            port.device, spec.baudrate, timeout=0, write_timeout=write_timeout_s, exclusive=True
        )
        self.fd = self._serial.fileno()
        self.failed: str | None = None  # set when a write failed; the manager then closes the link

    def write(self, data: bytes) -> None:
        """Send bytes; a failure marks the link broken instead of raising into protocol code."""
        if not data or self.failed:
            return
        try:
            self._serial.write(data)
        except (serial.SerialException, OSError) as exc:
            self.failed = f"write failed: {exc}"

    def read(self) -> bytes:
        """Bytes waiting now; raises OSError when the device is gone."""
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return b""
        if not data:  # readable but empty: the other end went away
            raise OSError(errno.EIO, "device reports readiness to read but returned no data")
        return data

    def close(self) -> None:
        try:
            self._serial.close()
        except (serial.SerialException, OSError):
            pass


class LinkHandler(Protocol):
    """Per-connection glue between the bytes and a protocol object (built by the handler factory)."""

    def connection_made(self, link: Link) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self, reason: str | None, problem: DeviceProblem = DeviceProblem.OTHER) -> None:
        """The link is closed; `reason` (None: closed by us) is of kind `problem`."""
        ...

    def tick(self) -> float | None:
        """Periodic work (timeouts, flushing); seconds until it wants to run again, or None."""
        ...


@dataclass
class LinkStatus:
    name: str
    match: str
    profile: str
    present: bool = False
    connected: bool = False
    port: str = ""
    connected_since: float | None = None  # wall-clock (time.time()) seconds
    last_data_at: float | None = None
    last_error: str = ""
    connects: int = 0
    bytes_in: int = 0  # bytes the handler has taken (parsed, time-stamped)
    retry_in_s: float = 0.0  # backoff before the next open attempt


@dataclass
class _Slot:
    spec: LinkSpec
    status: LinkStatus
    link: Link | None = None
    handler: LinkHandler | None = None
    backoff_s: float = 0.0
    next_attempt: float = 0.0
    opened_at: float = 0.0
    next_tick: float | None = None


class SerialLinkManager:
    """Keeps the configured serial devices connected and pumps their bytes to handlers.

    Single-threaded: `run()` (or repeated `poll()`) does everything; handlers run in that
    thread. Safe to call `statuses()` from another thread.
    """

    def __init__(
        self,
        specs: Sequence[LinkSpec],
        handler_factory: Callable[[LinkSpec, PortInfo], LinkHandler],
        *,
        lister: Callable[[], list[PortInfo]] = list_ports,
        watch_dirs: Sequence[str | os.PathLike[str]] | None = ("/dev", BY_ID_DIR),
        rescan_s: float | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._slots = [_Slot(s, LinkStatus(s.name, str(s.match), s.profile)) for s in specs]
        self._factory = handler_factory
        self._lister = lister
        self._clock = clock
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._selector = selectors.DefaultSelector()
        self._watcher = DevWatcher(watch_dirs) if watch_dirs else None
        if self._watcher is not None and self._watcher.available:
            self._selector.register(self._watcher.fileno(), selectors.EVENT_READ, None)
        inotify = self._watcher is not None and self._watcher.available
        self.rescan_s = rescan_s if rescan_s is not None else (10.0 if inotify else 1.0)
        self._next_rescan = 0.0
        self._lock = threading.Lock()
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, "wakeup")

    # -- public -------------------------------------------------------------------------------

    def statuses(self) -> list[LinkStatus]:
        with self._lock:
            return [LinkStatus(**vars(s.status)) for s in self._slots]

    def wakeup(self) -> None:
        """Make a blocked `poll()` return (e.g. to stop)."""
        try:
            os.write(self._wakeup_w, b"x")
        except OSError:
            pass

    def run(self, stop: threading.Event, *, max_wait_s: float = 1.0) -> None:
        while not stop.is_set():
            self.poll(max_wait_s)

    def poll(self, max_wait_s: float = 1.0) -> None:
        """Wait for bytes, hot-plug events or the next due time (at most `max_wait_s`), then act."""
        now = self._clock()
        if now >= self._next_rescan:
            self._rescan(now)
        timeout = max(0.0, min(self._next_due(now), max_wait_s))
        for key, _ in self._selector.select(timeout):
            if key.data == "wakeup":
                try:
                    os.read(self._wakeup_r, 4096)
                except OSError:
                    pass
            elif key.data is None:  # inotify: something appeared or vanished under /dev
                if self._watcher is not None and self._watcher.drain():
                    self._next_rescan = 0.0
            else:
                self._read(key.data)
        now = self._clock()
        for slot in self._slots:
            if slot.link is not None and slot.link.failed:
                self._disconnect(slot, slot.link.failed)
            elif slot.handler is not None and slot.next_tick is not None and now >= slot.next_tick:
                self._tick(slot, now)
        if now >= self._next_rescan:
            self._rescan(now)

    def close(self) -> None:
        for slot in self._slots:
            if slot.link is not None:
                self._disconnect(slot, None)
        if self._watcher is not None:
            self._watcher.close()
        self._selector.close()
        for fd in (self._wakeup_r, self._wakeup_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- internals ----------------------------------------------------------------------------

    def _next_due(self, now: float) -> float:
        due = self._next_rescan
        for slot in self._slots:
            if slot.next_tick is not None:
                due = min(due, slot.next_tick)
        return due - now

    def _rescan(self, now: float) -> None:
        self._next_rescan = now + self.rescan_s
        if self._watcher is not None:
            self._watcher.refresh()
        ports: list[PortInfo] | None = None
        for slot in self._slots:
            if slot.link is not None:
                continue
            if slot.spec.match.needs_listing and ports is None:
                try:
                    ports = self._lister()
                except OSError as exc:
                    log.warning("cannot list serial ports: %s", exc)
                    ports = []
            port = slot.spec.match.find(ports or [])
            with self._lock:
                was_present = slot.status.present
                slot.status.present = port is not None
            if port is None:
                continue
            if not was_present:  # (re)appeared: a fresh device deserves a fresh try
                slot.backoff_s = 0.0
                slot.next_attempt = now
            if now >= slot.next_attempt:
                self._connect(slot, port, now)

    def _connect(self, slot: _Slot, port: PortInfo, now: float) -> None:
        try:
            link = Link(slot.spec, port)
        except (serial.SerialException, OSError, ValueError) as exc:
            slot.backoff_s = min(max(slot.backoff_s * 2, self._backoff_initial), self._backoff_max)
            slot.next_attempt = now + slot.backoff_s
            self._next_rescan = min(self._next_rescan, slot.next_attempt)
            with self._lock:
                slot.status.last_error = f"open {port.device}: {exc}"
                slot.status.retry_in_s = slot.backoff_s
            log.warning("%s: cannot open %s (%s); next try in %.1f s", slot.spec.name, port.device, exc, slot.backoff_s)
            return
        slot.link = link
        slot.opened_at = now
        with self._lock:
            slot.status.connected = True
            slot.status.retry_in_s = 0.0
            slot.status.port = port.by_id or port.device
            slot.status.connected_since = time.time()
            slot.status.connects += 1
        log.info("%s: connected on %s", slot.spec.name, port.by_id or port.device)
        self._selector.register(link.fd, selectors.EVENT_READ, slot)
        try:
            slot.handler = self._factory(slot.spec, port)
            slot.handler.connection_made(link)
            slot.next_tick = now
        except Exception as exc:  # a broken handler must not take the other devices down
            log.exception("%s: handler failed on connect", slot.spec.name)
            self._disconnect(slot, f"handler error: {exc}")

    def _read(self, slot: _Slot) -> None:
        link = slot.link
        if link is None:
            return
        try:
            data = link.read()
        except OSError as exc:
            self._disconnect(slot, f"{DEVICE_GONE}: {exc.strerror or exc}", DeviceProblem.UNPLUGGED)
            return
        if not data:
            return
        arrived = time.time()
        try:
            assert slot.handler is not None
            slot.handler.data_received(data)
        except Exception as exc:
            log.exception("%s: handler failed on data", slot.spec.name)
            self._count_in(slot, data, arrived)
            self._disconnect(slot, f"handler error: {exc}")
            return
        self._count_in(slot, data, arrived)
        if slot.next_tick is None:  # new data may give the handler something to time out
            slot.next_tick = self._clock()

    def _count_in(self, slot: _Slot, data: bytes, arrived: float) -> None:
        # counted once the handler has taken them: whoever reads `bytes_in` (the console, a
        # test) knows those bytes are parsed and time-stamped, not merely read from the port
        with self._lock:
            slot.status.bytes_in += len(data)
            slot.status.last_data_at = arrived

    def _tick(self, slot: _Slot, now: float) -> None:
        try:
            assert slot.handler is not None
            wait = slot.handler.tick()
        except Exception as exc:
            log.exception("%s: handler failed on tick", slot.spec.name)
            self._disconnect(slot, f"handler error: {exc}")
            return
        slot.next_tick = None if wait is None else now + max(wait, 0.01)

    def _disconnect(self, slot: _Slot, reason: str | None, problem: DeviceProblem = DeviceProblem.OTHER) -> None:
        link, handler = slot.link, slot.handler
        if link is None:
            return
        try:
            self._selector.unregister(link.fd)
        except (KeyError, ValueError):
            pass
        link.close()
        slot.link = None
        slot.handler = None
        slot.next_tick = None
        now = self._clock()
        # A link that dies right after opening (a flapping device) backs off; a long-lived one
        # that was unplugged is retried as soon as it reappears.
        if now - slot.opened_at < 2.0:
            slot.backoff_s = min(max(slot.backoff_s * 2, self._backoff_initial), self._backoff_max)
        else:
            slot.backoff_s = self._backoff_initial
        slot.next_attempt = now + slot.backoff_s
        with self._lock:
            slot.status.connected = False
            slot.status.connected_since = None
            if reason:
                slot.status.last_error = reason
        if reason:
            log.warning("%s: disconnected (%s)", slot.spec.name, reason)
        if handler is not None:
            try:
                handler.connection_lost(reason, problem)
            except Exception:
                log.exception("%s: handler failed on connection loss", slot.spec.name)
        self._next_rescan = min(self._next_rescan, slot.next_attempt)
