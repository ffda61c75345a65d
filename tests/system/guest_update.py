"""Runs INSIDE the booted gateway, not on the host (Debian's python3, stdlib only).

tests/system/test_ab_boot_update.py copies it to the boot partition and starts it from the kernel
command line at every boot of its card; lastmile-test/action (written by the test before each
boot) says what this boot is for:

- install-good: wait for the recording services, queue an ECG (the watched folder; the reading
  center is unreachable, so it stays in the outbox), install good.raucb from the "USB stick"
  (the second disk, /dev/vdb) with `lastmile update install --file`, reboot;
- check-install-bad: wait for the services and for lastmile-mark-good, report, install
  bad.raucb the same way, reboot;
- bad: report which slot booted and wait (lastmile-mark-good fails and reboots the machine);
- check: wait for the services and for lastmile-mark-good, report, power off.

Reports are `LMTEST <key> <json>` lines on the serial console, as guest_report.py's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

TEST_DIR = Path("/boot/firmware/lastmile-test")
STICK = Path("/run/lastmile-test-stick")
WATCHED = Path("/var/lib/lastmile/import")
LASTMILE = "/opt/lastmile/bin/lastmile"
OUTBOX_DB = "/var/lib/lastmile/outbox.sqlite"
RECORDING = ("lastmile-acquire.service", "lastmile-ble.service", "lastmile-forward.service")
READY_WAIT_S = 1500  # an emulated Pi on a shared 2-core host
MARK_GOOD_WAIT_S = 1200  # the unit's own wait (60 s of good health) and its deadline (600 s)
OUTBOX_WAIT_S = 900


def say(key: str, value: object) -> None:
    print(f"LMTEST {key} {json.dumps(value, sort_keys=True, default=str)}", flush=True)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True)


def show(unit: str, *properties: str) -> dict[str, str]:
    out = run("systemctl", "show", "-p", ",".join(properties), unit).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def slot_state() -> dict[str, object]:
    cmdline = Path("/proc/cmdline").read_text().split()
    env = run("fw_printenv").stdout.splitlines()
    status = run("rauc", "status", "--output-format=json")
    return {
        "slot": next((w.split("=", 1)[1] for w in cmdline if w.startswith("rauc.slot=")), None),
        "root": next((w.split("=", 1)[1] for w in cmdline if w.startswith("root=")), None),
        "env": dict(line.split("=", 1) for line in env if "=" in line),
        "rauc": json.loads(status.stdout) if status.returncode == 0 else status.stderr.strip(),
        "boot_mount": run("findmnt", "-n", "-o", "OPTIONS", "/boot/firmware").stdout.strip(),
    }


def wait_ready() -> None:
    """Until the recording services are active (Type=notify: READY received); seconds since the
    kernel started (CLOCK_MONOTONIC: U-Boot's time is not in it) when the last one was."""
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        states = {u: show(u, "ActiveState", "ActiveEnterTimestampMonotonic", "NRestarts") for u in RECORDING}
        if all(s.get("ActiveState") == "active" for s in states.values()):
            ready_s = max(int(s["ActiveEnterTimestampMonotonic"]) for s in states.values()) / 1e6
            say(
                "ready",
                {"kernel_to_ready_s": round(ready_s, 1), "restarts": {u: s["NRestarts"] for u, s in states.items()}},
            )
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"recording services not active after {READY_WAIT_S} s: {states}")
        time.sleep(5)


def wait_mark_good() -> None:
    deadline = time.monotonic() + MARK_GOOD_WAIT_S
    while True:
        state = show(
            "lastmile-mark-good.service", "ActiveState", "Result", "ExecMainStatus", "ExecMainExitTimestampMonotonic"
        )
        if state.get("ExecMainExitTimestampMonotonic", "0") != "0":
            if state["ActiveState"] == "failed" or state.get("Result") != "success":
                raise RuntimeError(f"lastmile-mark-good did not succeed: {state}")
            log = run("journalctl", "-b", "-u", "lastmile-mark-good", "-o", "cat", "--no-pager").stdout
            say("marked", {"unit": state, "log": log.splitlines()[-3:]})
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"lastmile-mark-good still {state} after {MARK_GOOD_WAIT_S} s")
        time.sleep(5)


def outbox_items() -> list[list[str]]:
    query = (
        "import json, sqlite3; db = sqlite3.connect('file:%s?mode=ro', uri=True); "
        "print(json.dumps(db.execute('SELECT kind, key, state FROM items ORDER BY id').fetchall()))" % OUTBOX_DB
    )
    out = run("runuser", "-u", "lastmile", "--", "/usr/bin/python3", "-c", query).stdout
    return json.loads(out) if out.strip() else []


def queue_ecg() -> None:
    ecg = next(TEST_DIR.glob("*.ECG"))
    # as a cart or stick puts whole files there (guest_report.py does the same): beside it, then renamed in
    staging = WATCHED.parent / f".{WATCHED.name}.staging"
    for folder in (WATCHED, staging):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "lastmile", "lastmile")
    shutil.copyfile(ecg, staging / ecg.name)
    shutil.chown(staging / ecg.name, "lastmile", "lastmile")
    (staging / ecg.name).rename(WATCHED / ecg.name)
    deadline = time.monotonic() + OUTBOX_WAIT_S
    while not outbox_items():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ecg.name} not in the outbox after {OUTBOX_WAIT_S} s")
        time.sleep(5)


def install(bundle: str) -> None:
    STICK.mkdir(exist_ok=True)
    mounted = run("mount", "-o", "ro", "/dev/vdb", str(STICK))
    if mounted.returncode:
        raise RuntimeError(f"the stick did not mount: {mounted.stderr}")
    began = time.monotonic()
    proc = run(LASTMILE, "update", "install", "--no-reboot", "--file", str(STICK / bundle))
    say("install", {"bundle": bundle, "rc": proc.returncode, "out": proc.stdout.splitlines(),
                    "err": proc.stderr.splitlines()[-5:], "seconds": round(time.monotonic() - began, 1)})  # fmt: skip
    run("umount", str(STICK))
    if proc.returncode:
        raise RuntimeError(f"lastmile update install {bundle} failed")
    say("after-install", slot_state())


def main() -> int:
    action = (TEST_DIR / "action").read_text().strip()
    say("boot", {"action": action, "uptime_s": uptime(), **slot_state()})
    try:
        if action == "bad":
            while True:  # lastmile-mark-good reboots this boot; report what the services do meanwhile
                time.sleep(30)
                say("waiting", {u: show(u, "ActiveState", "NRestarts") for u in RECORDING})
        wait_ready()
        if action == "install-good":
            queue_ecg()
            say("outbox", outbox_items())
            install("good.raucb")
        else:
            wait_mark_good()
            say("state", slot_state())
            say("outbox", outbox_items())
            if action == "check-install-bad":
                install("bad.raucb")
            if action == "check":  # after the rollback: one round notes it (no stick, no index: nothing else)
                proc = run(LASTMILE, "update", "install", "--no-reboot")
                status = run(LASTMILE, "update", "status", "--json").stdout
                say("round", {"rc": proc.returncode, "out": proc.stdout.splitlines(), "err": proc.stderr.splitlines()[-5:],
                              "installed": json.loads(status or "{}").get("installed")})  # fmt: skip
        say("done", action)
    except Exception:  # noqa: BLE001 — whatever broke goes on the console, and the machine still powers off
        say("error", traceback.format_exc().splitlines())
        run("systemctl", "poweroff")
        return 1
    run("systemctl", "poweroff" if action == "check" else "reboot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
