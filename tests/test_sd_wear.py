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
from tests.sd_writes import idle_steps_wrote
from tests.service_harness import fhir_token_file


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
