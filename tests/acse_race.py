"""Force pynetdicom's requestor/reactor race (see uploader/dicom_rejection.py) every time.

A busy CPU produces it now and then; these handlers produce it always: EVT_REQUESTED holds the
association thread until the DUL reactor has received the peer's answer and closed the socket
(EVT_CONN_CLOSE), so the requestor looks at the transport only after the answer was handled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pynetdicom import evt

Handlers = list[tuple[evt.EventType, Callable]]


def answered_before_the_requestor_looks(wait_s: float = 30.0) -> Handlers:
    closed = threading.Event()

    def hold(_event: evt.Event) -> None:
        closed.wait(wait_s)  # generous: only a peer that never answers makes this wait at all

    return [(evt.EVT_CONN_CLOSE, lambda _event: closed.set()), (evt.EVT_REQUESTED, hold)]
