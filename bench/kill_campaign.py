"""Kill campaign: SIGKILL any part of the gateway at risky moments, under a clinic's traffic.

Run as root (it puts itself and Orthanc in a private network namespace):

    .venv/bin/python bench/kill_campaign.py [--kills 500] [--json]

The gateway runs as its services (bench/clinic_day.py: acquire with the LAN receiver and the
serial bridge, forward with report retrieval and FHIR, console, the BLE part; restarted at once
after a kill, as systemd would) while the clinic's day goes on (patients, USB imports, LAN
C-STOREs, bridge ECGs, BLE readings, assignments, field visits). Each kill picks a target
and waits for a risky moment:
- forward: mid-send (items `sending`), awaiting commitment (`sent`), committed-not-purged, or any;
- acquire: mid-intake, while a cart's C-STORE is arriving (the cart retries until Success), or
  mid-stream (below);
- import: a `lastmile import` of a stick, part-way (then run again, as the doctor would);
- assign: a `lastmile patient assign E<n>`, part-way (then again);
- report-poll: a `lastmile report poll`, part-way;
- console: any moment;
- field visit: a `lastmile visit stop` (close, sign, queue), part-way (then again), and then
  forward mid-FHIR-send: the visit's transaction applied by the county platform, not yet answered;
- acquire mid-stream: the serial bridge's ECG recording arriving (the cart takes it again);
- ble: the BLE service (bench/ble_room.py: `lastmile ble run` with the emulated devices as its link).
After every kill, `PRAGMA integrity_check` on every database file in the data directory. At the
end the link stays up until the outbox drains; the reading center's and the county platform's
copies (and the BLE readings the gateway keeps) are judged against the truth. Goals: integrity ok after every kill; 0 lost, 0 duplicated, 0 misattributed, 0 stuck.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clinic_day as cd

TARGETS = {  # weight of each target
    "forward": 5,
    "field-visit": 2,  # kills `visit stop`, then forward mid-FHIR-send ("forward-fhir")
    "acquire": 2,
    "import": 2,
    "assign": 1,
    "report-poll": 1,
    "console": 1,
    "ble": 1,
}
FORWARD_MOMENTS = ("sending", "sent", "committed", "any")


def wait_for_state(data_dir: Path, state: str, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if cd.outbox_states(data_dir).get(state, 0):
            return True
        time.sleep(0.02)
    return False


def killed_cli(config: Path, args: list[str], after_s: float) -> bool:
    """Start a `lastmile` command and SIGKILL it `after_s` later; True if it was still running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lastmile", "-c", str(config), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=cd.REPO,
    )
    try:
        proc.wait(after_s)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return True


class Campaign:
    def __init__(self, day: cd.Day, seed: int) -> None:
        self.day = day
        self.work = day.work
        self.data_dir = day.data_dir
        self.config = day.config
        self.clinic = day.clinic
        self.services = day.services
        self.rng = random.Random(seed)
        self.kills: collections.Counter[str] = collections.Counter()
        self.moments: collections.Counter[str] = collections.Counter()
        self.seconds: collections.Counter[str] = collections.Counter()  # time spent per target
        self.integrity_failures: list[str] = []
        self.sticks = 0

    def one(self) -> None:
        target = self.rng.choices(list(TARGETS), weights=list(TARGETS.values()))[0]
        began = time.monotonic()
        killed = getattr(self, "kill_" + target.replace("-", "_"))()
        self.seconds[target] += time.monotonic() - began
        if killed:
            self.kills["forward-fhir" if target == "field-visit" else target] += 1
        for problem in cd.integrity_problems(self.data_dir):
            self.integrity_failures.append(f"after killing {target}: {problem}")

    def cart_burst(self, n: int) -> None:
        """A few ECGs from the cart at once, so that the forwarder has a batch in hand."""
        for _ in range(n):
            serial = self.clinic.truth.new("P-KILL-LAN", "lan")
            data, uid = self.clinic.cart.ecg_bytes(serial, "P-KILL-LAN", "Kill^Lan", time.time())
            self.clinic.lan_store(data, uid)

    def kill_forward(self) -> bool:
        moment = self.rng.choice(FORWARD_MOMENTS)
        if moment != "any":
            self.cart_burst(self.rng.randint(1, 4))
        if moment != "any" and wait_for_state(self.data_dir, moment, 4.0):
            self.moments[f"forward:{moment}"] += 1
        else:
            time.sleep(self.rng.uniform(0.0, 1.5))
            self.moments["forward:any"] += 1
        return self.services.kill("forward")

    def kill_field_visit(self) -> bool:
        """Two kills on one field visit (its CLI runs are what costs here): `lastmile visit stop`
        (close, sign, queue) part-way, then again; then the forwarder mid-FHIR-send, once the
        county platform has applied the visit's transaction and not yet answered (conditional
        create must absorb the re-send: no resource twice). No clinic lock: a field visit is not
        the clinic's session, and the day's own visits make none here (traffic)."""
        platform = self.day.platform
        platform.applied_unanswered.clear()
        serial = self.clinic.truth.new("P-KILL-VISIT", cd.FIELD_VISIT)
        self.clinic.stats.field_visits += 1
        cd.lastmile(self.config, "visit", "start", "--patient", "P-KILL-VISIT", "--no-gps")
        cd.lastmile(self.config, "visit", "note", f"{cd.NOTE_PREFIX}{serial}")
        if killed_cli(self.config, ["visit", "stop", "--no-gps"], self.rng.uniform(0.2, 1.2)):
            self.kills["visit-stop"] += 1
        self.moments["visit-stop:mid-stop"] += 1
        self.clinic.stop_visit()
        if platform.applied_unanswered.wait(30.0):
            time.sleep(self.rng.uniform(0.0, 0.2))  # within the platform's 0.3 s before it answers
            self.moments["forward-fhir:applied-unanswered"] += 1
        else:
            self.moments["forward-fhir:any"] += 1
        return self.services.kill("forward")

    def kill_acquire(self) -> bool:
        return self.kill_acquire_mid_stream() if self.rng.random() < 0.5 else self.kill_acquire_mid_store()

    def kill_acquire_mid_stream(self) -> bool:
        """Mid-stream: the cart behind the serial bridge is sending a recording (it takes it again
        when the gateway does not ACK its end)."""
        assert self.clinic.bridge is not None
        with self.clinic.lock:  # a patient of its own: the bridge ECG lands on the current one
            cd.lastmile(self.config, "patient", "set", "P-KILL-BRIDGE", "--name", "Kill^Bridge")
            time.sleep(2.0)  # an ECG begun in the first seconds of the session could be dated before it
            serial = self.clinic.truth.new("P-KILL-BRIDGE", "bridge")
            cart = threading.Thread(target=self.clinic.bridge.record, args=(serial,), daemon=True)
            cart.start()
            time.sleep(self.rng.uniform(0.0, 0.4))
            killed = self.services.kill("acquire")
            cart.join(600)
            cd.lastmile(self.config, "patient", "clear")
        self.moments["acquire:mid-bridge-stream"] += 1
        return killed

    def kill_ble(self) -> bool:
        """The BLE service (`lastmile ble run`, bench/ble_room.py), at any moment of the clinic's readings."""
        time.sleep(self.rng.uniform(0.0, 1.0))
        self.moments["ble:any"] += 1
        return self.services.kill("ble")

    def kill_acquire_mid_store(self) -> bool:
        """Mid-intake: a cart's C-STORE under way."""
        serial = self.clinic.truth.new("P-KILL-LAN", "lan")
        data, uid = self.clinic.cart.ecg_bytes(serial, "P-KILL-LAN", "Kill^Lan", time.time())
        cart = threading.Thread(target=self.clinic.lan_store, args=(data, uid), daemon=True)
        cart.start()
        time.sleep(self.rng.uniform(0.0, 0.6))
        killed = self.services.kill("acquire")
        cart.join(120)
        self.moments["acquire:mid-intake"] += 1
        return killed

    def new_stick(self, patient_id: str | None, n: int) -> tuple[Path, list[int]]:
        self.sticks += 1
        stick = self.work / "sticks" / f"kill-{self.sticks:05d}"
        stick.mkdir(parents=True, exist_ok=True)
        serials = []
        for _ in range(n):
            serial = self.clinic.truth.new(patient_id or "P-KILL-ASSIGN", "usb" if patient_id else "unassigned")
            data, _uid = self.clinic.cart.ecg_bytes(serial, patient_id, "Kill^Usb", time.time())
            (stick / f"ECG{serial:06d}.dcm").write_bytes(data)
            serials.append(serial)
            if patient_id is None:
                self.clinic.pending_assign[f"serial:{serial}"] = (serial, "P-KILL-ASSIGN")
        return stick, serials

    def kill_import(self) -> bool:
        # between two patients of the day (a stick naming another patient than the one checked in
        # is rightly held for the doctor: not this test's subject)
        with self.clinic.lock:
            stick, _serials = self.new_stick("P-KILL-USB", self.rng.randint(2, 4))
            killed = killed_cli(self.config, ["import", "-q", str(stick)], self.rng.uniform(0.5, 3.0))
            self.clinic.import_stick(stick)  # the doctor plugs the stick in again
        self.moments["import:mid-import"] += 1
        return killed

    def kill_assign(self) -> bool:
        with self.clinic.lock:
            return self.assign_killed()

    def assign_killed(self) -> bool:
        stick, (serial,) = self.new_stick(None, 1)
        self.clinic.import_stick(stick)
        item = next((i for i, _k in cd.held_ecg_ids(self.data_dir) if self.clinic.serial_of_item(i) == serial), None)
        killed = False
        if item is not None:
            args = ["patient", "assign", f"E{item}", "P-KILL-ASSIGN", "--name", "Kill^Assign"]
            killed = killed_cli(self.config, args, self.rng.uniform(0.3, 2.0))
            self.moments["assign:mid-assign"] += 1
        self.clinic.assign_held("P-KILL-ASSIGN", "Kill^Assign")
        return killed

    def kill_report_poll(self) -> bool:
        self.moments["report-poll:mid-poll"] += 1
        return killed_cli(self.config, ["report", "poll"], self.rng.uniform(0.3, 2.5))

    def kill_console(self) -> bool:
        time.sleep(self.rng.uniform(0.0, 1.0))
        self.moments["console:any"] += 1
        return self.services.kill("console")


def traffic(clinic: cd.Clinic, stop: threading.Event) -> None:
    """The clinic's own day goes on under the kills (short visits, BLE readings every other one:
    a kill that needs the doctor waits for the visit in hand; field visits come from the kill
    targets that make them)."""
    clinic.field_visit_every = 0
    clinic.ble_every = 2
    i = 0
    while not stop.is_set():
        i += 1
        clinic.visit(i, clinic.rng.choice((1, 2)))
        clinic.look_at_console()
        stop.wait(2.0)  # the doctor free between patients: a kill that needs her comes in then


def run(kills: int, seed: int, say: Any, budget_s: float | None = None) -> dict[str, Any]:
    with cd.clinic_day("lastmile-kills-", seed) as day:
        data_dir, clinic, services = day.data_dir, day.clinic, day.services
        campaign = Campaign(day, seed)
        stop = threading.Event()
        traffic_thread = threading.Thread(target=traffic, args=(clinic, stop), daemon=True)
        began = time.monotonic()
        traffic_thread.start()
        rounds = 0
        try:
            for k in range(kills):
                if budget_s is not None and time.monotonic() - began > budget_s:
                    say(f"budget of {budget_s / 60:.0f} min spent after {k} rounds: draining")
                    break
                campaign.one()
                rounds += 1
                if (k + 1) % 10 == 0:
                    say(f"{time.monotonic() - began:5.0f} s  {k + 1} rounds, {dict(campaign.kills)}")
        finally:
            stop.set()
            traffic_thread.join(300)
        clinic.assign_held_all()
        states = cd.wait_drained(data_dir, limit_s=300)
        clinic.assign_held_all()
        states = cd.wait_drained(data_dir, limit_s=120)
        services.stop()
        c_stores = day.orthanc.c_stores()
        result: dict[str, Any] = {
            "kills": sum(campaign.kills.values()),
            "rounds": rounds,
            "rounds_asked": kills,
            "by_target": dict(campaign.kills),
            "moments": dict(campaign.moments),
            "seconds_by_target": {t: round(v, 1) for t, v in campaign.seconds.most_common()},
            **cd.verdict_figures(day, states),
            "resent_c_stores": sum(c_stores.values()) - len(c_stores),
            "integrity_checks_failed": len(campaign.integrity_failures),
            "integrity_failures": campaign.integrity_failures[:5],
            "service_exits": services.unexpected_exits[:5],
            "cli_errors": clinic.stats.cli_errors[:5],
            "console_actions": clinic.stats.console_actions,
            "console_problems": clinic.stats.console_problems,
            "console_errors": clinic.stats.console_errors,
            "elapsed_s": round(time.monotonic() - began, 1),
        }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=500, help="kill rounds (default 500)")
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument(
        "--budget-min",
        type=float,
        help="start no new kill round after this many minutes (then drain and judge as usual)",
    )
    args = ap.parse_args()
    cd.reexec_in_private_netns()

    def say(line: str) -> None:
        print(line, flush=True)

    result = run(args.kills, args.seed, say, args.budget_min * 60 if args.budget_min else None)
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
