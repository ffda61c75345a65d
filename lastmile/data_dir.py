"""The gateway's state directory (`gateway.data_dir`) and the databases in it.

Every caller opens the outbox through `open_outbox(config)`: one place for the configured
limits, and importing this module pulls in no DICOM or BLE stack (the acquire process and
`lastmile queue` stay small). The clinic database and the visit book have their own `open`
classmethods taking `config.data_dir`; all three go through `uploader.sqlite_store`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lastmile.config import Config

if TYPE_CHECKING:
    from uploader.outbox import Outbox


def open_outbox(config: Config) -> Outbox:
    """The outbox in the data directory with the configured limits."""
    from uploader.outbox import Outbox

    o = config.outbox
    return Outbox.open(
        config.data_dir,
        min_free_bytes=o.min_free_mb * 2**20,
        backoff_base_s=o.backoff_base_s,
        backoff_max_s=o.backoff_max_s,
    )
