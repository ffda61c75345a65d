"""`lastmile console` (the doctor's web console, lastmile-console.service) and `lastmile user`
(its accounts: one per person)."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import sys
from typing import TYPE_CHECKING

from lastmile.commands.common import DATA_DIR

if TYPE_CHECKING:
    from lastmile.config import Config
    from lastmile.console.refused import RefusedConsole


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "console",
        help="serve the doctor's console: web pages in Chinese and English (systemd: lastmile-console.service)",
        parents=[DATA_DIR],
    )
    p.set_defaults(func=_console)

    user = sub.add_parser("user", help="console accounts: add, list, passwd, unlock, disable, enable")
    usub = user.add_subparsers(dest="user_command", metavar="COMMAND")
    user.set_defaults(func=lambda _a: (user.print_help(), 2)[1])
    u = usub.add_parser("add", help="add an account; the password is read from stdin", parents=[DATA_DIR])
    u.add_argument("name")
    u.add_argument("--role", choices=("doctor", "admin"), default="doctor")
    u.set_defaults(func=_user_add)
    u = usub.add_parser(
        "passwd", help="set a new password (read from stdin); ends the user's logins", parents=[DATA_DIR]
    )
    u.add_argument("name")
    u.set_defaults(func=_user_passwd)
    u = usub.add_parser("list", help="every account, its role and whether it is locked", parents=[DATA_DIR])
    u.set_defaults(func=_user_list)
    for name, helptext in (
        ("unlock", "unlock an account locked after wrong passwords"),
        ("disable", "disable an account (ends its logins)"),
        ("enable", "enable a disabled account"),
    ):
        u = usub.add_parser(name, help=helptext, parents=[DATA_DIR])
        u.add_argument("name")
        u.set_defaults(func=_user_state, action=name)


def _console(args: argparse.Namespace) -> int:
    from lastmile.console.service import prepare_console_process

    prepare_console_process()
    from lastmile.commands.common import config_from_args
    from lastmile.config import ConfigError, salvage_console_config
    from lastmile.console.service import ConsoleService
    from lastmile.services.runtime import ServiceRuntime

    def load() -> Config:
        return config_from_args(args)

    def refused(error: ConfigError) -> RefusedConsole:
        from lastmile.console.refused import RefusedConsole

        salvaged = salvage_console_config(getattr(args, "config", None))
        if getattr(args, "data_dir", None):
            salvaged.set_data_dir(args.data_dir)
        return RefusedConsole.start(salvaged, error, load_config=load)

    runtime = ServiceRuntime("console", load_config=load)
    return runtime.run(ConsoleService.start, on_config_refused=refused)


def _accounts(args: argparse.Namespace):  # -> Accounts, imported lazily
    from lastmile.clinic.db import open_clinic_db
    from lastmile.commands.common import config_from_args
    from lastmile.console.accounts import Accounts

    config = config_from_args(args)
    c = config.console
    return Accounts(
        open_clinic_db(config.data_dir),
        max_failures=c.max_login_failures,
        lockout_s=c.lockout_s,
        idle_s=c.session_idle_s,
    )


def _read_password() -> str:
    """From a terminal: asked twice, not echoed. Otherwise the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ValueError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _user_add(args: argparse.Namespace) -> int:
    from lastmile.console.accounts import AccountError
    from lastmile.console.audit import AuditLog

    accounts = _accounts(args)
    try:
        user = accounts.add_user(args.name, args.role, _read_password(), now=_now())
        AuditLog(accounts.db).record(
            "(command line)", "user-add", now=_now(), target=user.name, detail={"role": user.role}
        )
    except (AccountError, ValueError) as exc:
        print(f"lastmile user add: {exc}", file=sys.stderr)
        return 2
    finally:
        accounts.db.conn.close()
    print(f"user {user.name} added ({user.role})")
    return 0


def _user_passwd(args: argparse.Namespace) -> int:
    from lastmile.console.accounts import AccountError
    from lastmile.console.audit import AuditLog

    accounts = _accounts(args)
    try:
        accounts.set_password(args.name, _read_password())
        AuditLog(accounts.db).record("(command line)", "user-passwd", now=_now(), target=args.name)
    except (AccountError, ValueError) as exc:
        print(f"lastmile user passwd: {exc}", file=sys.stderr)
        return 2
    finally:
        accounts.db.conn.close()
    print(f"password of {args.name} changed; their logins ended")
    return 0


def _user_list(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    try:
        users = accounts.users()
    finally:
        accounts.db.conn.close()
    if not users:
        print("no accounts yet: lastmile user add NAME --role admin")
    now = _now()
    for u in users:
        notes = [n for n, on in (("disabled", u.disabled), ("locked", u.locked(now))) if on]
        last = u.last_login_at.astimezone().strftime("%Y-%m-%d %H:%M") if u.last_login_at else "never"
        print(f"{u.name:20s} {u.role:7s} last login {last}{'  (' + ', '.join(notes) + ')' if notes else ''}")
    return 0


def _user_state(args: argparse.Namespace) -> int:
    from lastmile.console.audit import AuditLog

    accounts = _accounts(args)
    try:
        # each code a literal: tests/test_console_i18n.py reads them here to check each has a name
        if args.action == "unlock":
            done, code = accounts.unlock(args.name), "user-unlock"
        elif args.action == "disable":
            done, code = accounts.set_disabled(args.name, True), "user-disable"
        else:
            done, code = accounts.set_disabled(args.name, False), "user-enable"
        if done:
            AuditLog(accounts.db).record("(command line)", code, now=_now(), target=args.name)
    finally:
        accounts.db.conn.close()
    if not done:
        print(f"lastmile user {args.action}: no user {args.name!r}", file=sys.stderr)
        return 1
    print(f"user {args.name}: {args.action}d")
    return 0
