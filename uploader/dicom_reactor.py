"""Less CPU per association: pynetdicom's reactor threads made to wait instead of poll.

pynetdicom 3.0's DUL thread polls: every millisecond it sleeps, then asks `select()` (timeout 0)
whether its socket has data and whether anything waits to be sent. On the forward path that
loop, and pynetdicom's logging handlers that format every PDU and DIMSE message whatever the
log level, were a third of the CPU a study cost. `wait_for_traffic` makes the DUL thread block
in `select()` on its socket and a wake-up pipe (written when a PDU is queued to send or the
thread is told to stop) until either has something, with a short cap so pynetdicom's timers
are still looked at. `drop_log_formatting` unbinds the standard logging handlers while their
logger would discard what they format.

Both reach into pynetdicom's internals (as `uploader.dicom_store`'s raw send does): each checks
that what it needs is there and otherwise leaves the association as pynetdicom made it.
"""

from __future__ import annotations

import logging
import os
import select
import ssl
import time
import weakref
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.1  # pynetdicom's ARTIM timer is looked at least this often (its timeouts are seconds)
POLL_S = 0.001  # pynetdicom's own loop delay: while there is no connected socket to wait on
_DUL_INTERNALS = ("_is_transport_event", "send_pdu", "kill_dul", "_run_loop_delay", "_kill_thread")
_DUL_PARTS = ("to_provider_queue", "event_queue", "state_machine", "socket")
_LOG_EVENTS = (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT)
_CLOSING = "Sta13"  # waiting for the peer to close: pynetdicom closes the socket itself


def wait_for_traffic(assoc: Association) -> bool:
    """Make `assoc`'s DUL thread wait for its socket or for something to send instead of
    polling every millisecond. Safe to call from the DUL thread itself (EVT_CONN_OPEN) or
    before it starts. Returns False, changing nothing, where pynetdicom lacks what it needs."""
    dul: Any = getattr(assoc, "dul", None)
    if dul is None or not all(hasattr(dul, name) for name in _DUL_INTERNALS + _DUL_PARTS):
        return False
    if getattr(dul, "lastmile_waits", False):
        return True
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    # the pipe lives as long as the DUL object (the closures below are attributes of it)
    weakref.finalize(dul, _close_fds, read_fd, write_fd)
    is_transport_event: Callable[[], bool] = dul._is_transport_event
    send_pdu: Callable[[Any], None] = dul.send_pdu
    kill_dul: Callable[[], None] = dul.kill_dul

    def wake() -> None:
        try:
            os.write(write_fd, b"\0")
        except OSError:  # full: a wake-up is pending already
            pass

    def send_and_wake(primitive: Any) -> None:
        send_pdu(primitive)
        wake()

    def kill_and_wake() -> None:
        kill_dul()
        wake()

    def wait_then_check() -> bool:
        # called by the DUL loop when it had nothing to send; on return it reads the socket
        if not (dul._kill_thread or dul.to_provider_queue.qsize() or dul.event_queue.qsize()):
            sock = dul.socket
            raw = getattr(sock, "socket", None)
            if raw is None or not getattr(sock, "_is_connected", False) or dul.state_machine.current_state == _CLOSING:
                time.sleep(POLL_S)  # nothing to wait on: pynetdicom's own pace
            elif not (isinstance(raw, ssl.SSLSocket) and raw.pending()):
                try:
                    select.select([raw, read_fd], [], [], MAX_WAIT_S)
                except (OSError, ValueError):  # closed meanwhile: pynetdicom's own check says so
                    pass
                _drain(read_fd)
        return is_transport_event()

    dul._is_transport_event = wait_then_check
    dul.send_pdu = send_and_wake
    dul.kill_dul = kill_and_wake
    # the loop's own sleep only delayed what the wait above now wakes for at once
    dul._run_loop_delay = 0.0
    dul.lastmile_waits = True
    return True


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except OSError:  # empty (EAGAIN), or closed
        pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def drop_log_formatting(assoc: Association) -> int:
    """Unbind pynetdicom's standard logging handlers (they format every PDU and DIMSE message
    before the logger discards it) while the `pynetdicom` logger would drop their INFO lines.
    Returns how many were unbound."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return 0
    dropped = 0
    for event in _LOG_EVENTS:
        for handler, _args in list(assoc.get_handlers(event)):  # type: ignore[misc]
            if getattr(handler, "__module__", "") == "pynetdicom._handlers":
                assoc.unbind(event, handler)
                dropped += 1
    return dropped
