"""Soak: a compressed clinic day against the real services and Orthanc, judged against the truth.

Run as root (it puts itself and Orthanc in a private network namespace):

    .venv/bin/python bench/soak.py [--minutes 20] [--patients N] [--json]

A day of 8 hours is played at 24x (20 minutes; `--minutes` scales the day and the number of
patients with it): patients checked in and out with `lastmile patient set/clear`, ECGs by USB
stick (`lastmile import`), by the cart's LAN C-STORE to `lastmile acquire`, and files naming no
patient that the doctor assigns (`lastmile patient assign`); the console's pages opened now and
then; the reading center down for a third of the day in three outages. See bench/clinic_day.py.

Prints the figures; with --json the last line is one object: measurements, lost, duplicated,
misattributed, held_unassigned, rss_max_mb (per service), rss_growth_mb_per_h (per service,
per simulated hour), fds_growth, db_mb, payload_mb (after the purge). Goals: lost, duplicated,
misattributed 0; every service <= 64 MB; growth <= 1 MB per simulated hour; payloads back to 0.
The "ble" service (bench/ble_room.py) carries bumble's emulated radio and devices, which a gateway
does not: `ble_emulation_mb` is their share, measured in the same run. With `--ble-in-acquire` the
BLE part runs inside acquire as on a gateway (no "ble" service): `acquire_rss_max_mb_less_emulation`
is then acquire's figure to hold against the 64 MB goal. `report_polls_failed_by_reason`
says why each `lastmile report poll` failed ("link down, said so" is expected; anything else is not).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clinic_day as cd

DAY_H = 8.0  # a clinic day
COMPRESSION = DAY_H * 60 / 20  # 8 h in 20 min
OUTAGES = ((0.12, 0.23), (0.42, 0.53), (0.70, 0.81))  # fractions of the day the link is down: 1/3


def outages(
    day: cd.Day, minutes: float, began: float, stop: threading.Event, log: list[str], down: threading.Event
) -> None:
    """The link to the reading center and the county platform goes away three times (a third of
    the day) and comes back; `down` is set while it is away."""
    day_s = minutes * 60
    for start, end in OUTAGES:
        if stop.wait(max(0.0, began + start * day_s - time.monotonic())):
            return
        down.set()
        day.orthanc.stop()
        day.platform.stop()
        log.append(f"link down at {time.monotonic() - began:.0f} s")
        stop.wait(max(0.0, began + end * day_s - time.monotonic()))
        day.orthanc.start()
        day.platform.start()
        down.clear()
        log.append(f"link up at {time.monotonic() - began:.0f} s")


def run(minutes: float, patients: int | None, seed: int, say: Any, *, ble_in_acquire: bool = False) -> dict[str, Any]:
    patients = patients or max(6, round(30 * minutes / 20))
    with cd.clinic_day("lastmile-soak-", seed, ble_in_acquire=ble_in_acquire) as day:
        data_dir, config, orthanc, clinic, services = day.data_dir, day.config, day.orthanc, day.clinic, day.services
        stop = threading.Event()
        link_log: list[str] = []
        link_down = threading.Event()
        began = time.monotonic()
        link = threading.Thread(target=outages, args=(day, minutes, began, stop, link_log, link_down), daemon=True)
        link.start()
        cardiologist = cd.Cardiologist(orthanc)
        reading = threading.Thread(target=cardiologist.run, args=(stop,), daemon=True)
        reading.start()
        polls_failed: dict[str, int] = {}  # why each failed `report poll` failed -> how many times

        def report_poll() -> None:
            down_before = link_down.is_set()
            proc = cd.lastmile(config, "report", "poll")
            if proc.returncode != 0:
                reason = cd.poll_failure(proc, link_down=down_before or link_down.is_set())
                polls_failed[reason] = polls_failed.get(reason, 0) + 1
                say(f"report poll failed ({reason}): {proc.stderr.strip()[-300:]}")

        try:
            day_s = minutes * 60
            for i in range(patients):
                due = began + day_s * i / patients
                while time.monotonic() < due:
                    clinic.look_at_console()
                    time.sleep(min(5.0, max(0.0, due - time.monotonic())))
                clinic.visit(i + 1, clinic.rng.choice((1, 2, 2, 3)))
                if i % 3 == 2:  # the doctor asks for the reports now and then (`report poll`)
                    report_poll()
                say(f"{time.monotonic() - began:5.0f} s  patient {i + 1}/{patients}, {cd.outbox_states(data_dir)}")
            link.join(max(0.0, began + day_s - time.monotonic()) + 60)
            day_over = time.monotonic()
        finally:
            stop.set()
            link.join(60)
        if not orthanc.running:
            orthanc.start()
        day.platform.start()
        clinic.assign_held_all()
        states = cd.wait_drained(data_dir, limit_s=300)
        drained = time.monotonic()
        reading.join(10)
        reports = cd.judge_reports(data_dir, orthanc, day.truth)
        deadline = time.monotonic() + 120
        while reports["reports_missing"] and time.monotonic() < deadline:
            cardiologist.round()  # the last ECGs of the day are read, the doctor asks again
            report_poll()
            reports = cd.judge_reports(data_dir, orthanc, day.truth)
        services.stop()
        figures = cd.rss_figures(services.samples, DAY_H * minutes / 20)
        emulation_mb = cd.ble_emulation_mb()
        carrier = "acquire" if ble_in_acquire else "ble"  # the process the emulated room is in
        result: dict[str, Any] = {
            "minutes": minutes,
            "simulated_h": round(DAY_H * minutes / 20, 2),
            "patients": clinic.stats.patients,
            **cd.verdict_figures(day, states),
            **reports,
            "report_polls_failed": sum(polls_failed.values()),
            "report_polls_failed_by_reason": polls_failed,
            **figures,
            # the process carrying the emulated radio and devices ("ble", or acquire with
            # --ble-in-acquire) less their share (a gateway has none)
            "ble_in_acquire": ble_in_acquire,
            "ble_emulation_mb": emulation_mb,
            f"{carrier}_rss_max_mb_less_emulation": round(figures["rss_max_mb"].get(carrier, 0.0) - emulation_mb, 1),
            "db_mb": round(sum(p.stat().st_size for p in cd.database_files(data_dir)) / 2**20, 2),
            "payload_mb": round(cd.dir_mb(data_dir / "payloads"), 2) if (data_dir / "payloads").exists() else 0.0,
            "console_pages": clinic.stats.console_pages,
            "console_errors": clinic.stats.console_errors,
            "console_actions": clinic.stats.console_actions,
            "console_problems": clinic.stats.console_problems,
            "imports_retried": clinic.stats.imports_failed,
            "lan_retries": clinic.stats.lan_retries,
            "service_exits": services.unexpected_exits,
            "cli_errors": clinic.stats.cli_errors[:5],
            "outages": link_log,
            "drain_s": round(drained - day_over, 1),  # link back, day over -> outbox empty
            "integrity": cd.integrity_problems(data_dir) or "ok",
        }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="length of the compressed day (default 20)")
    ap.add_argument("--patients", type=int, help="patients in the day (default 30 per 20 minutes)")
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument(
        "--ble-in-acquire",
        action="store_true",
        help="run the BLE part inside the acquire service, as on a gateway (default: as its own process)",
    )
    args = ap.parse_args()
    cd.reexec_in_private_netns()

    def say(line: str) -> None:
        print(line, flush=True)

    result = run(args.minutes, args.patients, args.seed, say, ble_in_acquire=args.ble_in_acquire)
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
