"""Shared helpers for command handlers: load the config once per invocation."""

from __future__ import annotations

import argparse

from lastmile.config import Config, load_config


def config_from_args(args: argparse.Namespace) -> Config:
    config = load_config(getattr(args, "config", None))
    data_dir = getattr(args, "data_dir", None)
    if data_dir:
        config.gateway.data_dir = data_dir
    return config
