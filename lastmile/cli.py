"""The `lastmile` command line.

Each command group lives in its own module under `lastmile.commands` with a
`register(subparsers)` function; handlers import what they need lazily so that
`lastmile --version` and the services start fast on a Pi.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from lastmile import __version__

log = logging.getLogger(__name__)

# One module per command group; each registers its sub-commands.
COMMAND_MODULES: tuple[str, ...] = (
    "lastmile.commands.forwarding",  # forward, echo, queue, retry
    "lastmile.commands.ecg",  # ecg decode / to-dicom, import
    "lastmile.commands.demo",  # demo
    "lastmile.commands.config_cmd",  # config check / defaults
    "lastmile.commands.ble",  # ble scan / pair / decode
    "lastmile.commands.patient",  # patient set / clear / assign, devices
    "lastmile.commands.serial_cmd",  # acquire-side serial tools
    "lastmile.commands.gps",  # gps decode
    "lastmile.commands.visit",  # visit start / note / stop / list / verify
    "lastmile.commands.service",  # acquire service, doctor
    "lastmile.commands.console",  # console service, user accounts
    "lastmile.commands.report",  # report list / show / print / ack / poll
    "lastmile.commands.update",  # update check / install / poll / status
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lastmile", description="Lastmile clinic device gateway: devices in, DICOM and FHIR out."
    )
    parser.add_argument("--version", action="version", version=f"lastmile {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="configuration file (default: $LASTMILE_CONFIG or /etc/lastmile/lastmile.toml)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from lastmile.logs import configure_logging

    # Commands log to stderr (stdout is their output); patient data masked as in the services.
    level = logging.WARNING - 10 * args.verbose if args.verbose else logging.INFO
    configure_logging(None, level=max(level, logging.DEBUG), stream=sys.stderr, verbosity=args.verbose)
    import sqlite3

    from devices.errors import DeviceError
    from lastmile.config import ConfigError
    from lastmile.data_dir import DataDirError
    from lastmile.logs import describe_fault
    from uploader.errors import UploadError

    # Operational faults (a file system, a database, the network) get one line, not a
    # traceback: the person at the keyboard is a county technician. -v adds the traceback.
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"lastmile: configuration error: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG: systemd does not restart-loop on it with RestartPreventExitStatus
    except DataDirError as exc:
        _log_traceback(args, exc)
        print(f"lastmile: {exc}", file=sys.stderr)
        return 1
    except (DeviceError, UploadError) as exc:
        _log_traceback(args, exc)
        print(f"lastmile: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        _log_traceback(args, exc)
        print(f"lastmile: {describe_fault(exc)}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        _log_traceback(args, exc)
        print(f"lastmile: database error: {exc} (run `lastmile doctor`)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _log_traceback(args: argparse.Namespace, exc: BaseException) -> None:
    if args.verbose:
        log.error("details", exc_info=exc)
