"""The SD card is not written while the gateway has nothing to do.

A clinic gateway is idle most of the day and most of the night; the forward service steps
every `idle_poll_s` (2 s). A step with nothing to send must not commit anything: every
commit of a database with synchronous=FULL appends WAL pages and fsyncs them, ~43,000 times a
day, on a card whose flash wears with each erase.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lastmile.config import Config
from lastmile.services.forward import ForwardService
from tests.fhir_server import FhirTestServer
from tests.peers import free_port
from tests.service_harness import fhir_token_file


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


@pytest.mark.parametrize("commitment", [False, True])
def test_an_idle_forward_step_with_fhir_writes_nothing(tmp_path: Path, commitment: bool) -> None:
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.reading_center.storage_commitment = commitment
    config.reading_center.listen_port = free_port()
    config.reading_center.host = "127.0.0.1"
    config.reading_center.port = free_port()  # nothing listens: nothing is queued either
    with FhirTestServer(token="s3cret-token") as server:
        config.fhir.base_url = server.base_url
        config.fhir.token_file = fhir_token_file(tmp_path)
        service = ForwardService(config)
        try:
            service.step(threading.Event())  # the first step may record what it found at start
            wrote = idle_steps_wrote(service, config.data_dir)
        finally:
            service.close()
    assert not wrote, "an idle forward step wrote to the outbox (SD card wear while idle)"
