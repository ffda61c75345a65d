"""`lastmile demo [--json]`: the main job on embedded defaults."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole gateway on embedded defaults (under a minute)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print only the summary, as one JSON object, on stdout (the story on stderr)",
    )
    p.add_argument("--recordings", type=int, default=12, help="ECGs the demo clinic records")
    p.add_argument("--outage", type=float, default=4.0, help="seconds the reading center is down")
    p.add_argument(
        "--console", action="store_true", help="then leave the doctor's console running on it (until Ctrl-C)"
    )
    p.add_argument("--console-port", type=int, default=8080, help="the console's port on 127.0.0.1 (0: any free one)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import logging

    from lastmile.demo.runner import run_demo

    if not args.verbose:
        # the demo narrates; the outage it stages would otherwise fill the screen with
        # pynetdicom's connection-refused errors
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

    # With --json, stdout is for programs: the JSON object alone; the story goes to stderr.
    story = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=story, flush=True)

    if args.console:
        from lastmile.demo.console_demo import run_console_demo

        summary = run_console_demo(say, port=args.console_port, n_recordings=args.recordings, outage_s=args.outage)
    else:
        summary = run_demo(say, n_recordings=args.recordings, outage_s=args.outage)
    say("")
    say(
        f"summary: {summary.recordings} ECGs recorded, {summary.received} received by the "
        f"reading center ({summary.studies} studies), {summary.committed} committed, "
        f"{summary.purged} purged locally, {summary.lost} lost, {summary.duplicated} duplicated, "
        f"{summary.quarantined} quarantined — {summary.elapsed_s:.1f} s"
    )
    for key, value in summary.extra.items():
        say(f"  {key}: {value}")
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True), flush=True)
    ok = summary.lost == 0 and summary.duplicated == 0
    if not ok:
        print("demo: something was lost or duplicated", file=sys.stderr)
    return 0 if ok else 1
