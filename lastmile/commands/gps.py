"""`lastmile gps decode FILE [--json]` and `lastmile gps fix`: NMEA logs and the live receiver."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    gps = sub.add_parser("gps", help="GNSS: decode NMEA logs, read the receiver")
    gsub = gps.add_subparsers(dest="gps_command", metavar="SUBCOMMAND")
    p = gsub.add_parser("decode", help="decode an NMEA 0183 log: one fix per line")
    p.add_argument("file", help="NMEA log (raw receiver output; '#' comment lines are skipped)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--all", action="store_true", help="also print cycles without a position fix")
    p.set_defaults(func=decode)
    p = gsub.add_parser("fix", help="wait for the best fix from the configured receiver")
    p.add_argument("--wait", type=float, default=None, metavar="S", help="seconds (default visits.fix_wait_s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=live_fix)
    gps.set_defaults(func=lambda args: (gps.print_help(), 2)[1])


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def format_fix(fix: object) -> str:
    from devices.gps import Fix

    assert isinstance(fix, Fix)
    when = fix.to_json()["time"] or "time-unknown"
    return (
        f"{when}  {_fmt(fix.latitude, '.7f')}  {_fmt(fix.longitude, '.7f')}  "
        f"alt {_fmt(fix.altitude_m, '.1f', ' m')}  mode {int(fix.mode)}  "
        f"hdop {_fmt(fix.hdop, '.2f')}  eph {_fmt(fix.eph_m, '.1f', ' m')}"
    )


def _line(fix: object, as_json: bool) -> str:
    if not as_json:
        return format_fix(fix)
    data = fix.to_json()  # type: ignore[attr-defined]
    keys = (
        "time",
        "latitude",
        "longitude",
        "altitude_m",
        "mode",
        "hdop",
        "eph_m",
        "epx_m",
        "epy_m",
        "satellites_used",
        "dgps",
        "systems",
    )
    return json.dumps({k: data[k] for k in keys})


def decode(args: argparse.Namespace) -> int:
    from devices.gps import BadSentence, Fix, NmeaStreamDecoder

    decoder = NmeaStreamDecoder()
    fixes = bad = 0
    try:
        with open(args.file, "rb") as f:
            while True:
                chunk = f.read(65536)
                events = decoder.receive_data(chunk) if chunk else decoder.flush()
                for event in events:
                    if isinstance(event, BadSentence):
                        bad += 1
                        print(f"dropped: {event.reason}: {event.line[:60]!r}", file=sys.stderr)
                    elif isinstance(event, Fix) and (event.has_position or args.all):
                        fixes += 1
                        print(_line(event, args.json))
                if not chunk:
                    break
    except BrokenPipeError:
        return 0
    except OSError as exc:
        print(f"lastmile gps decode: {exc}", file=sys.stderr)
        return 1
    print(f"{fixes} fixes, {decoder.sentences} sentences, {bad} dropped", file=sys.stderr)
    return 0


def live_fix(args: argparse.Namespace) -> int:
    from firmware_bridge.errors import GnssError
    from firmware_bridge.gnss import best_fix
    from lastmile.commands.common import config_from_args
    from lastmile.visits.book import VisitBook
    from lastmile.visits.gnss_share import open_receiver

    config = config_from_args(args)
    if config.gps.source == "none":
        print("gps.source is none: no receiver configured", file=sys.stderr)
        return 1
    wait_s = args.wait if args.wait is not None else config.visits.fix_wait_s
    try:
        # the book: opened only to ask the acquire service for its fixes when it holds the port
        source = open_receiver(
            config.gps, lambda: VisitBook.open(config.data_dir, gateway_id=config.gateway.id), wait_s
        )
        assert source is not None
        try:
            fix = best_fix(source, wait_s)
        finally:
            source.close()
    except GnssError as exc:
        print(f"lastmile gps fix: {exc}", file=sys.stderr)
        return 1
    if fix is None:
        print("no position fix", file=sys.stderr)
        return 1
    print(_line(fix, args.json))
    return 0
