"""Shared helpers for command handlers: load the config once per invocation."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lastmile.config import Config, load_config

if TYPE_CHECKING:
    from uploader.outbox import Outbox


def open_outbox(config: Config) -> "Outbox":
    """The outbox in `gateway.data_dir` with the configured limits (one place for every caller;
    importing it pulls in no DICOM or BLE stack)."""
    from pathlib import Path

    from uploader.outbox import Outbox

    data_dir = Path(config.gateway.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    o = config.outbox
    return Outbox.open(data_dir, min_free_bytes=o.min_free_mb * 2**20,
                       backoff_base_s=o.backoff_base_s, backoff_max_s=o.backoff_max_s)


def config_from_args(args: argparse.Namespace) -> Config:
    config = load_config(getattr(args, "config", None))
    data_dir = getattr(args, "data_dir", None)
    if data_dir:
        config.gateway.data_dir = data_dir
    return config
