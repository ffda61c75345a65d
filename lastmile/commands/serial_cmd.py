"""`lastmile serial ...`: see the serial ports, try ASCII-report profiles and scanner rules."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serial", help="serial devices: ports, ASCII-report profiles, scanner rules")
    cmds = p.add_subparsers(dest="serial_command", metavar="SUBCOMMAND")

    ls = cmds.add_parser("list", help="serial ports present now and which configured device each is")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    pr = cmds.add_parser("profiles", help="ASCII-report profiles available (built-in and serial.profiles_dir)")
    pr.set_defaults(func=cmd_profiles)

    pt = cmds.add_parser("profile-test", help="parse a captured report file with a profile")
    pt.add_argument("profile", help="profile name, or a path to a .toml profile")
    pt.add_argument("file", help="captured bytes of the device's output")
    pt.set_defaults(func=cmd_profile_test)

    st = cmds.add_parser("scan-test", help="classify scanned codes with the configured scanner rules")
    st.add_argument("codes", nargs="+", metavar="CODE")
    st.set_defaults(func=cmd_scan_test)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def cmd_list(args: argparse.Namespace) -> int:
    import os

    from firmware_bridge.serial_link import list_ports
    from lastmile.commands.common import config_from_args
    from lastmile.config import load_profiles_apart
    from lastmile.services.serial_devices import link_specs, refused_devices

    config = config_from_args(args)
    profiles, bad = load_profiles_apart(config)  # a bad profile file stops only the devices naming it
    specs = link_specs(config, profiles, bad)
    refused = [{"name": name, "reason": reason} for name, reason in refused_devices(config, bad).items()]
    ports = list_ports()

    def is_spec(spec: object, port: object) -> bool:
        if spec.match.path:  # type: ignore[attr-defined]
            found = spec.match.find([])  # type: ignore[attr-defined]
            return found is not None and found.device == os.path.realpath(port.device)  # type: ignore[attr-defined]
        return spec.match.find([port]) is not None  # type: ignore[attr-defined]

    rows: list[dict[str, Any]] = []
    for port in ports:
        names = [s.name for s in specs if is_spec(s, port)]
        rows.append(
            {
                "device": port.device,
                "usb_id": port.usb_id(),
                "by_id": port.by_id,
                "manufacturer": port.manufacturer,
                "product": port.product,
                "configured_as": names,
            }
        )
    missing: list[dict[str, str]] = [
        {"name": s.name, "match": str(s.match), "profile": s.profile}
        for s in specs
        if not any(s.name in r["configured_as"] for r in rows)
    ]
    if args.json:
        print(json.dumps({"ports": rows, "configured_but_absent": missing, "refused": refused}, indent=2))
        return 0
    if not rows:
        print("no serial ports found")
    for r in rows:
        ident = r["usb_id"] or "-"
        label = " ".join(x for x in (r["manufacturer"], r["product"]) if x)
        used = f"  <- {', '.join(r['configured_as'])}" if r["configured_as"] else ""
        print(f"{r['device']:<16} {ident:<28} {label}{used}")
        if r["by_id"]:
            print(f"{'':<16} {r['by_id']}")
    for m in missing:
        print(f"absent: {m['name']} ({m['profile']}) expects {m['match']}")
    for r in refused:
        print(f"refused: {r['name']}: {r['reason']}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    """The profiles that load, then each bad file with its line (exit 1: something to fix)."""
    from lastmile.commands.common import config_from_args
    from lastmile.config import load_profiles_apart

    profiles, bad = load_profiles_apart(config_from_args(args))
    for name, profile in sorted(profiles.items()):
        codes = ", ".join(f.code for f in profile.fields)
        print(f"{name}: {profile.description or '-'} [{profile.baudrate} baud; {codes}]")
    for name, problem in sorted(bad.items()):
        print(f"{name}: refused: {problem}")
    return 1 if bad else 0


def cmd_profile_test(args: argparse.Namespace) -> int:
    import datetime as dt
    from pathlib import Path

    from devices.ascii_report import ReportParsed, ReportParser, load_profile
    from lastmile.clinic.observations import observation_to_json
    from lastmile.commands.common import config_from_args
    from lastmile.config import load_profiles_apart

    if args.profile.endswith(".toml"):
        profile = load_profile(Path(args.profile).read_text(encoding="utf-8"))
    else:
        profiles, bad = load_profiles_apart(config_from_args(args))  # another file's mistake is not this one's
        if args.profile in bad:
            print(f"lastmile: profile {args.profile!r} is refused: {bad[args.profile]}")
            return 1
        if args.profile not in profiles:
            print(f"lastmile: no profile {args.profile!r} (have: {', '.join(sorted(profiles))})")
            return 1
        profile = profiles[args.profile]
    data = Path(args.file).read_bytes()
    now = dt.datetime.now(dt.timezone.utc)
    parser = ReportParser(profile, profile.identity(address=args.file))
    events = parser.feed(data, now) + parser.flush(now)
    parsed = 0
    for ev in events:
        if isinstance(ev, ReportParsed):
            parsed += 1
            print(json.dumps([observation_to_json(o) for o in ev.observations], indent=2))
        else:
            print(f"rejected ({ev.lines} lines): {ev.reason}")
    print(f"{parsed} report(s) parsed, {len(events) - parsed} rejected")
    return 0 if parsed and parsed == len(events) else 1


def cmd_scan_test(args: argparse.Namespace) -> int:
    from devices.scanner import CodeUnrecognised, DoctorScanned, PatientScanned
    from lastmile.commands.common import config_from_args
    from lastmile.services.serial_devices import scan_rules

    rules = scan_rules(config_from_args(args))
    ok = True
    for code in args.codes:
        ev = rules.classify(code)
        if isinstance(ev, PatientScanned):
            print(f"patient {ev.patient_id}")
        elif isinstance(ev, DoctorScanned):
            print(f"doctor {ev.doctor_id}")
        elif isinstance(ev, CodeUnrecognised):
            ok = False
            print(f"not recognised: {ev.reason}")
    return 0 if ok else 1
