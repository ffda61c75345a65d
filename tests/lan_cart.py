"""An ECG cart on the clinic LAN as the ECG tests drive it: the gateway's DICOM receiver storing
into an outbox (`lan_object_store`), and DCMTK's storescu sending as the cart (AE CART1)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from firmware_bridge.dicom_receiver import DicomReceiver, ReceiverSettings
from lastmile.ecg.intake import lan_object_store
from tests.conftest import require_tool
from uploader.outbox import Outbox


@contextlib.contextmanager
def lan_receiver(
    outbox: Outbox, patient_id: str, checked_in_name: Callable[[str], str], *, patient_hold_s: float
) -> Iterator[DicomReceiver]:
    """The gateway's DICOM receiver (CART1 allowed) storing into `outbox`, `patient_id` checked in
    under the name `checked_in_name` gives it."""
    store = lan_object_store(
        outbox, lambda: frozenset({patient_id}), checked_in_name=checked_in_name, patient_hold_s=patient_hold_s
    )
    with DicomReceiver(ReceiverSettings(port=0, allowed_callers=("CART1",), timeout_s=10), store) as receiver:
        yield receiver


def storescu_as_the_cart(port: int, path: Path) -> None:
    """The cart sends `path` over the LAN as a DICOM C-STORE (DCMTK's storescu, calling AE CART1)."""
    done = subprocess.run(
        [require_tool("storescu"), "-aet", "CART1", "-aec", "LASTMILE", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert done.returncode == 0, done.stderr
