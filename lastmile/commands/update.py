"""`lastmile update`: county-signed RAUC bundles from the county's HTTPS index or a USB stick
(the logic is lastmile/services/update.py; docs/updates.md has the design)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lastmile.commands.common import DATA_DIR

# Exit 0 for these; anything else is 1 (the timer's unit shows failed: a refused bundle, a full card,
# a failed install). A village link that is down is recorded and shown, not a failed unit every round.
_FINE = {
    "check": frozenset({"available", "up-to-date"}),
    "install": frozenset({"installed", "up-to-date"}),
    "poll": frozenset({"installed", "up-to-date", "deferred", "source-failed", "download-failed", "already-running"}),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("update", help="gateway software updates: check, install, poll (timer), status")
    actions = p.add_subparsers(dest="update_action", metavar="ACTION", required=True)
    for name, text in (
        ("check", "say whether a new bundle is on offer (nothing is downloaded)"),
        ("install", "download or copy, verify (rauc info) and install (rauc install) a new bundle"),
    ):
        a = actions.add_parser(name, help=text, parents=[DATA_DIR])
        where = a.add_mutually_exclusive_group()
        where.add_argument("--url", help="the index to ask (default: update.url, then the USB sticks)")
        where.add_argument("--file", type=Path, help="a bundle file (e.g. on a stick) instead")
        if name == "install":
            a.add_argument("--no-reboot", action="store_true", help="never reboot, even when the clinic is idle")
        a.set_defaults(func=_round, install=name == "install")
    poll = actions.add_parser(
        "poll",
        help="one round of the update timer (lastmile-update.timer): sticks, the index when due, reboot when idle",
        parents=[DATA_DIR],
    )
    poll.set_defaults(func=_poll)
    status = actions.add_parser("status", help="what the last round did, what is installed", parents=[DATA_DIR])
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)


def _round(args: argparse.Namespace) -> int:
    from lastmile.commands.common import config_from_args
    from lastmile.services.update import Updater

    config = config_from_args(args)
    file = args.file.resolve() if args.file else None
    if file is not None and not file.is_file():
        print(f"lastmile: {file}: no such bundle file")
        return 1
    result = Updater(config).run(
        url=args.url, file=file, install=args.install, reboot=args.install and not args.no_reboot
    )
    for line in result.lines():
        print(line)
    return 0 if result.outcome.value in _FINE["install" if args.install else "check"] else 1


def _poll(args: argparse.Namespace) -> int:
    from lastmile.commands.common import config_from_args
    from lastmile.services.update import Updater

    config = config_from_args(args)
    if not config.update.enabled:
        print("updates are off (update.enabled = false)")
        return 0
    result = Updater(config).run()
    for line in result.lines():
        print(line)
    return 0 if result.outcome.value in _FINE["poll"] else 1


def _status(args: argparse.Namespace) -> int:
    import datetime as dt

    from lastmile.clock import clinic_time
    from lastmile.commands.common import config_from_args
    from lastmile.services.update import OUTCOME_ZH, Outcome, read_state, reboot_pending, retry_due, rolled_back

    config = config_from_args(args)
    state = read_state(config.data_dir)
    if args.json:
        print(json.dumps({} if state is None else {**vars(state), "reboot_pending": reboot_pending(state)}, indent=1))
        return 0
    print(f"updates: {'on' if config.update.enabled else 'off'}; index: {config.update.url or '(none)'}")
    if state is None:
        print("no update round has run yet")
        return 0
    last = state.last_result
    if last:
        outcome = Outcome(last["outcome"])
        print(
            f"last round: {clinic_time(dt.datetime.fromtimestamp(last['at'], dt.timezone.utc))}: {OUTCOME_ZH[outcome]}"
        )
        print(f"  {outcome.value}: {last['message']}")
    if state.installing:  # a round is writing the other slot (or was, when the power went)
        started = clinic_time(dt.datetime.fromtimestamp(float(state.installing.get("at", 0)), dt.timezone.utc))
        print(f"installing: version {state.installing.get('version')} into slot {state.installing.get('slot') or '?'}")
        print(f"  正在安装新版本 {state.installing.get('version')}（测量照常进行）; started {started}")
    if state.installed:
        waiting = " (waiting to reboot into it)" if reboot_pending(state) else ""
        print(f"installed: version {state.installed.get('version')}{waiting}")
        record = rolled_back(state)
        if record is not None and retry_due(state):
            print("  新版本启动时多次断电，网关已退回原版本；将再安装一次")
            print(
                "  rolled back: every boot of it ended before it was judged (power cuts?); "
                f"slot {record.get('booted_slot') or '?'} (version {record.get('booted_version') or 'unknown'}) "
                "runs again; installed once more"
            )
        elif record is not None:
            print("  新版本未能正常启动，网关已自动退回原版本")
            print(
                f"  rolled back: it did not come up healthy; slot {record.get('booted_slot') or '?'} "
                f"(version {record.get('booted_version') or 'unknown'}) runs again; not installed again"
            )
    for sha, why in state.refused.items():
        print(f"refused: bundle {sha[:12]}: {why}")
    return 0
