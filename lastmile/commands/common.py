"""What several commands share: the `--data-dir` option, declared once, and the configuration
loaded once per invocation with it applied."""

from __future__ import annotations

import argparse

from lastmile.config import Config, load_config

# A parent parser: `sub.add_parser(..., parents=[DATA_DIR])` gives a command the option.
DATA_DIR = argparse.ArgumentParser(add_help=False)
DATA_DIR.add_argument(
    "--data-dir", metavar="DIR", help="state directory: outbox, clinic database, visits (default: gateway.data_dir)"
)


def config_from_args(args: argparse.Namespace) -> Config:
    """The configuration (`--config`, $LASTMILE_CONFIG or the default file) with `--data-dir`
    applied when given."""
    config = load_config(getattr(args, "config", None))
    data_dir = getattr(args, "data_dir", None)
    if data_dir:
        config.set_data_dir(data_dir)
    return config


def quality_lines(quality: dict | None) -> list[str]:
    """The quality verdict of a queued ECG and what to fix, Chinese then English."""
    if not quality or quality.get("verdict") in (None, "acceptable"):
        return []
    rate = quality.get("heart_rate_bpm")
    lines = [f"quality: {quality['verdict']}" + (f", heart rate {rate} bpm" if rate is not None else "")]
    for problem in quality.get("problems", []):
        lines += [f"- {problem['message_zh']}", f"  {problem['message_en']}"]
    return lines
