"""What the gateway writes to the SD card while it has nothing to do: the outbox's commits and the
data directory's files, before and after some idle steps of the forward service."""

from __future__ import annotations

import threading
from pathlib import Path

from lastmile.services.forward import ForwardService


def files_written(data_dir: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file in the data directory."""
    return {
        str(p.relative_to(data_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in data_dir.rglob("*")
        if p.is_file()
    }


def idle_steps_wrote(service: ForwardService, data_dir: Path, steps: int = 5) -> bool:
    """Whether `steps` more steps of the service changed the outbox or any file of `data_dir`."""
    stop = threading.Event()
    before = (service.outbox.db.conn.total_changes, files_written(data_dir))
    for _ in range(steps):
        service.step(stop)
    return (service.outbox.db.conn.total_changes, files_written(data_dir)) != before
