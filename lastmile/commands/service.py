"""`lastmile acquire` (the device-side service), `lastmile metrics` (what the county's Prometheus
scrapes) and `lastmile doctor` (the self-check)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lastmile.commands.common import DATA_DIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "acquire",
        help="run the acquire service: device links and LAN receiver into the "
        "outbox (systemd: lastmile-acquire.service)",
        parents=[DATA_DIR],
    )
    p.set_defaults(func=_acquire)

    m = sub.add_parser(
        "metrics",
        help="serve the gateway's Prometheus metrics on [metrics] listen (systemd: lastmile-metrics.service)",
        parents=[DATA_DIR],
    )
    m.add_argument("--print", action="store_true", help="print one scrape to stdout and exit")
    m.add_argument(
        "--cgroup-root", metavar="DIR", type=Path, help="where the cgroup tree is mounted (default: /sys/fs/cgroup)"
    )
    m.set_defaults(func=_metrics)

    d = sub.add_parser(
        "doctor",
        help="check configuration, storage, clock, peers, devices and queue; each line OK/WARN/FAIL with a hint",
        parents=[DATA_DIR],
    )
    d.add_argument("--offline", action="store_true", help="skip the checks that need the network")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=_doctor)


def _acquire(args: argparse.Namespace) -> int:
    from lastmile.services.process_tuning import prepare_device_process

    prepare_device_process()
    from lastmile.commands.common import config_from_args
    from lastmile.services.acquire import AcquireService
    from lastmile.services.runtime import ServiceRuntime

    runtime = ServiceRuntime("acquire", load_config=lambda: config_from_args(args))
    return runtime.run(lambda config: AcquireService.start(config, stop=runtime.stop_event, alive=runtime.alive))


def _metrics(args: argparse.Namespace) -> int:
    from lastmile.commands.common import config_from_args

    if args.print:
        import sys

        from lastmile.doctor import as_owner_of
        from lastmile.services.metrics import render_once

        config = config_from_args(args)
        with as_owner_of(config.data_dir):  # run as root, SQLite's -shm files must stay the service user's
            sys.stdout.write(render_once(config, cgroup_root=args.cgroup_root))
        return 0
    from lastmile.services.metrics import MetricsService
    from lastmile.services.runtime import ServiceRuntime

    runtime = ServiceRuntime("metrics", load_config=lambda: config_from_args(args))
    return runtime.run(lambda config: MetricsService(config, cgroup_root=args.cgroup_root))


def _doctor(args: argparse.Namespace) -> int:
    from lastmile.doctor import diagnose, exit_code, render_json, render_text

    findings = diagnose(args.config, offline=args.offline, data_dir=args.data_dir)
    print(render_json(findings) if args.json else render_text(findings))
    return exit_code(findings)
