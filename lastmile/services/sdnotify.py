"""A small sd_notify(3) client: tell systemd we are ready, reloading, stopping, alive.

Stdlib only, in the spirit of nobodd's `systemd` module. Without $NOTIFY_SOCKET (a terminal,
a test, a container without systemd) every call is a no-op that returns False, so services
never need to ask whether they run under systemd.

The watchdog is not pinged from a timer thread: the service loop calls `watchdog_ping()`
only after it has made progress, so a wedged loop stops the pings and systemd restarts us.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
SEND_TIMEOUT_S = 0.5


def _socket_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET as an AF_UNIX address: a path, or '@name' for the abstract namespace."""
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte, no terminating NUL.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:... and other forms are not used on our targets


def watchdog_period(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd gave this process, in seconds; None if there is none for us.

    Follows sd_watchdog_enabled(3): WATCHDOG_PID, when set, must name this process.
    """
    env = os.environ if environ is None else environ
    usec = env.get(ENV_WATCHDOG_USEC, "")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    wd_pid = env.get(ENV_WATCHDOG_PID, "")
    if wd_pid:
        try:
            if int(wd_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return value / 1_000_000


class SystemdNotifier:
    """Sends notification messages to the service manager over $NOTIFY_SOCKET.

    `unset_environment=True` removes NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from the
    environment once read, so child processes do not speak for us (like sd_notify's flag).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        environ: MutableMapping[str, str] | None = None,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        raw = address if address is not None else env.get(ENV_SOCKET, "")
        self.address: str | bytes | None = _socket_address(raw) if raw else None
        if raw and self.address is None:
            log.warning("ignoring unsupported NOTIFY_SOCKET %r", raw)
        self.watchdog_s: float | None = watchdog_period(env) if self.address is not None else None
        if unset_environment:
            for key in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                env.pop(key, None)
        self._sock: socket.socket | None = None
        self._last_ping = 0.0
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send 'KEY=value' lines in one datagram; True if the manager got it (or may have)."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A busy or wedged manager must not wedge us: drop the message instead.
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            # The manager went away (or we are in a test): never let notification break the service.
            log.debug("sd_notify %r failed: %s", assignments, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
            self._last_status = _one_line(status)
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """STATUS=text, sent only when it changed (it is shown by `systemctl status`)."""
        line = _one_line(text)
        if line == self._last_status:
            return False
        self._last_status = line
        return self.notify(f"STATUS={line}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) pair it; older ones ignore it.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (EXTEND_TIMEOUT_USEC)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def errno(self, code: int) -> bool:
        return self.notify(f"ERRNO={code}")

    def watchdog_ping(self, *, min_interval: float = 0.0, now: float | None = None) -> bool:
        """WATCHDOG=1, at most every `min_interval` seconds; no-op without a watchdog."""
        if self.watchdog_s is None:
            return False
        t = time.monotonic() if now is None else now
        if self._last_ping and t - self._last_ping < min_interval:
            return False
        self._last_ping = t
        return self.notify("WATCHDOG=1")

    def watchdog_trigger(self) -> bool:
        """Ask systemd to act as if the watchdog had expired (a fatal condition we detected)."""
        return self.notify("WATCHDOG=trigger")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return " ".join(text.split())[:400]
