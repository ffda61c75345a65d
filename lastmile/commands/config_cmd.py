"""`lastmile config check|defaults`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check the configuration file or print every key with its default")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="read the configuration and report every problem with its line")
    check.set_defaults(func=_check)
    defaults = csub.add_parser("defaults", help="print a documented configuration with every default")
    defaults.set_defaults(func=_defaults)


def _check(args: argparse.Namespace) -> int:
    from lastmile.config import check_config_file

    config = check_config_file(args.config)  # every setting's meaning, and the files it names
    print(f"{config.source}: OK")
    return 0


def _defaults(args: argparse.Namespace) -> int:
    from lastmile.config import render_defaults

    print(render_defaults())
    return 0
