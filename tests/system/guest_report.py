"""Runs INSIDE the booted gateway, not on the host (Debian's python3, stdlib only).

tests/system/test_image_boot.py copies it and a test ECG to the boot partition and starts it
from the kernel command line once multi-user.target is reached. It reports on the serial
console as `LMTEST <key> <json>` lines (lastmile-test/expect.json, when present, says what else to wait for): the root filesystem, the provisioned configuration,
every Lastmile service, what the console (HTTPS) and the metrics endpoint answer, then drops the ECG into the provisioned watched folder, waits for it in
the outbox, reports every unit's state and powers the machine off (also after an error, so the
host never waits for a timeout to learn what went wrong).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
import traceback
import urllib.request
from pathlib import Path

TEST_DIR = Path("/boot/firmware/lastmile-test")
CONFIG = Path("/etc/lastmile/lastmile.toml")
LASTMILE = "/opt/lastmile/bin/lastmile"
OUTBOX_DB = "/var/lib/lastmile/outbox.sqlite"
OUTBOX_WAIT_S = 900  # emulated Pi: decoding and building the DICOM object takes a while
SERVICES = (
    "lastmile-acquire.service",
    "lastmile-ble.service",
    "lastmile-forward.service",
    "lastmile-console.service",
    "lastmile-metrics.service",
)
CONSOLE_URL = "https://127.0.0.1:8443/login"  # [console] listen default; its self-signed certificate
METRICS_URL = "http://127.0.0.1:9560/metrics"  # [metrics] listen default
UNIT_PROPERTIES = (
    "ActiveState",
    "SubState",
    "Result",
    "NRestarts",
    "ConditionResult",
    "Type",
    "StatusText",
    "ExecMainStartTimestampMonotonic",
    "ActiveEnterTimestampMonotonic",
)


def say(key: str, value: object) -> None:
    # One short line per fact: the console interleaves other writers only between lines.
    print(f"LMTEST {key} {json.dumps(value, sort_keys=True, default=str)}", flush=True)


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()


def as_lastmile(*cmd: str) -> str:
    # The outbox belongs to the service account: never let root create files next to it.
    return run("runuser", "-u", "lastmile", "--", *cmd)


def units(*names: str, properties: tuple[str, ...] = UNIT_PROPERTIES) -> list[dict[str, str]]:
    """`systemctl show` of several units in one call (each call costs seconds under emulation)."""
    out = run("systemctl", "show", "-p", ",".join(("Id", *properties)), "--", *names)
    return [
        dict(line.split("=", 1) for line in record.splitlines() if "=" in line)
        for record in out.split("\n\n")
        if record.strip()
    ]


def unit_lines(listing: str) -> list[str]:
    # systemctl marks failed units with a "●" even with --plain.
    return [line.lstrip("●* ").strip() for line in listing.splitlines() if line.strip()]


def outbox_items() -> list[list[str]]:
    query = (
        "import json, sqlite3; db = sqlite3.connect('file:%s?mode=ro', uri=True); "
        "print(json.dumps(db.execute('SELECT kind, key, state FROM items ORDER BY id').fetchall()))" % OUTBOX_DB
    )
    out = as_lastmile("/usr/bin/python3", "-c", query)
    return json.loads(out) if out else []


def fetch(url: str) -> dict[str, object]:
    """Status and body of a GET on this machine (the console's certificate is its own: not checked)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=120, context=context) as answer:
            return {"status": answer.status, "body": answer.read().decode("utf-8", "replace")}
    except OSError as exc:  # URLError, HTTPError, timeouts: what went wrong is the report
        return {"status": getattr(exc, "code", None), "error": repr(exc)}


def report() -> None:
    say("system", run("systemctl", "is-system-running", "--wait"))
    say("startup", run("systemd-analyze", "time"))
    say(
        "root",
        {
            "fstype": run("findmnt", "-n", "-o", "FSTYPE", "/"),
            "state": Path("/run/lastmile-root.state").read_text().strip()
            if Path("/run/lastmile-root.state").exists()
            else None,
            "lower": run("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "/media/root-ro"),
            "upper": run("findmnt", "-n", "-o", "FSTYPE,OPTIONS", "/media/root-rw"),
            "boot": run("findmnt", "-n", "-o", "FSTYPE,OPTIONS", "/boot/firmware"),
            "data": run("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "/var/lib/lastmile"),
        },
    )
    data_part = Path("/sys/class/block", Path(run("findmnt", "-n", "-o", "SOURCE", "/var/lib/lastmile")).name)
    data_fs = os.statvfs("/var/lib/lastmile")
    say(
        "data",
        {
            "fs_bytes": data_fs.f_blocks * data_fs.f_frsize,
            "partition_start": int((data_part / "start").read_text()) * 512,
            "partition_bytes": int((data_part / "size").read_text()) * 512,
            "card_bytes": int((data_part.resolve().parent / "size").read_text()) * 512,
            "grow": run("journalctl", "-b", "-u", "lastmile-grow-data", "-o", "cat", "--no-pager").splitlines(),
        },
    )
    say(
        "config",
        {
            "sha256": hashlib.sha256(CONFIG.read_bytes()).hexdigest() if CONFIG.exists() else None,
            "owner": run("stat", "-c", "%U:%G %a", str(CONFIG)),
        },
    )
    for state in units(*SERVICES):
        say("service", state)
    page = fetch(CONSOLE_URL)
    lang = re.search(r'<html lang="([^"]+)"', str(page.get("body", "")))
    say("console", {"status": page["status"], "lang": lang and lang.group(1), "error": page.get("error")})

    before = outbox_items()
    say("outbox-before", before)
    watched = Path(tomllib.loads(CONFIG.read_text())["usb_import"]["folders"][0])
    ecg = next(TEST_DIR.glob("*.ECG"))
    # A cart or stick puts whole files there: copy beside it, then rename into the folder.
    staging = watched.parent / f".{watched.name}.staging"
    for folder in (watched, staging):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "lastmile", "lastmile")
    shutil.copyfile(ecg, staging / ecg.name)
    shutil.chown(staging / ecg.name, "lastmile", "lastmile")
    os.rename(staging / ecg.name, watched / ecg.name)
    dropped = time.monotonic()
    say("dropped", {"file": str(watched / ecg.name), "sha256": hashlib.sha256(ecg.read_bytes()).hexdigest()})
    items = before
    while len(items) == len(before) and time.monotonic() - dropped < OUTBOX_WAIT_S:
        time.sleep(5)
        items = outbox_items()
    say("outbox-after", {"items": items, "seconds": round(time.monotonic() - dropped, 1)})
    expect = json.loads((TEST_DIR / "expect.json").read_text()) if (TEST_DIR / "expect.json").exists() else {}
    if "outbox_states" in expect:  # a boot with a reading center: wait for every item to get there
        done = set(expect["outbox_states"])
        while any(state not in done for _, _, state in items) and time.monotonic() - dropped < OUTBOX_WAIT_S:
            time.sleep(5)
            items = outbox_items()
        reached = bool(items) and all(state in done for _, _, state in items)
        say("outbox-final", {"items": items, "reached": reached, "seconds": round(time.monotonic() - dropped, 1)})
    say("queue", json.loads(as_lastmile(LASTMILE, "queue", "--json") or "null"))
    scrape = fetch(METRICS_URL)
    say(
        "metrics",
        {
            "status": scrape["status"],
            "error": scrape.get("error"),
            "queue": [ln for ln in str(scrape.get("body", "")).splitlines() if ln.startswith("lastmile_queue_items{")],
            "up": [ln for ln in str(scrape.get("body", "")).splitlines() if ln.startswith("lastmile_service_up{")],
        },
    )
    say(
        "acquire-log",
        run("journalctl", "-b", "-u", "lastmile-acquire", "-o", "cat", "--no-pager", "-n", "30").splitlines(),
    )

    report_printing_time_links()

    # Last, so that a unit in a restart loop has had time to show it.
    loaded = run(
        "systemctl",
        "list-units",
        "--all",
        "--plain",
        "--no-legend",
        "--type=service,socket,mount,timer",
        "--state=loaded",
    )
    names = [line.split()[0] for line in unit_lines(loaded)]
    for state in units(*names, properties=("ActiveState", "SubState", "Result", "NRestarts")):
        if state.get("ActiveState") != "inactive" or state.get("NRestarts", "0") != "0":
            say("unit", state)
    say("failed", unit_lines(run("systemctl", "--failed", "--plain", "--no-legend")))
    say("system-final", run("systemctl", "is-system-running"))


ZH_TEXT = "心电图报告：窦性心律，心电图正常。\nECG report: sinus rhythm, normal ECG.\n"


def report_printing_time_links() -> None:
    """CUPS and the CJK fonts, chrony with gpsd, the watchdog, NetworkManager's connections."""
    say("lpstat", run("lpstat", "-r"))
    say("fc-match", run("fc-match", "-f", "%{family[0]}|%{file}", "sans-serif:lang=zh-cn"))
    say("fc-match-texttopdf", run("fc-match", "-f", "%{family[0]}|%{fontformat}", "ARPLUmingCN"))
    # A Chinese text as CUPS's own filter lays it out (cups-filters' texttopdf, the fonts through
    # fontconfig): which fonts the PDF embeds (poppler's pdffonts).
    sample = Path("/run/lastmile-print-sample.txt")
    sample.write_text(ZH_TEXT, encoding="utf-8")
    env = {**os.environ, "CHARSET": "utf-8", "CONTENT_TYPE": "text/plain", "PPD": "", "PRINTER": "boottest"}
    pdf = subprocess.run(
        ["/usr/lib/cups/filter/texttopdf", "1", "root", "zh", "1", "", str(sample)],
        capture_output=True,
        env=env,
    )
    Path("/run/lastmile-print-sample.pdf").write_bytes(pdf.stdout)
    # kept on the data partition too, for a look from the host after the boot (debugfs)
    Path("/var/lib/lastmile/print-sample.pdf").write_bytes(pdf.stdout)
    say(
        "texttopdf",
        {
            "exit": pdf.returncode,
            "bytes": len(pdf.stdout),
            "stderr": pdf.stderr.decode(errors="replace")[-400:],
            "fonts": run("pdffonts", "/run/lastmile-print-sample.pdf").splitlines(),
            # ghostscript's text extraction: with no ToUnicode the characters come out shifted,
            # but a glyph the font lacks (an empty box) comes out as a blank
            "text": run(
                "gs", "-q", "-dNOPAUSE", "-dBATCH", "-sDEVICE=txtwrite", "-o", "-", "/run/lastmile-print-sample.pdf"
            ).splitlines(),
            "charset": [
                ln
                for ln in Path("/usr/share/cups/charsets/pdf.utf-8.simple").read_text().splitlines()
                if ln and not ln.startswith("#")
            ][:12]
            if Path("/usr/share/cups/charsets/pdf.utf-8.simple").exists()
            else None,
        },
    )
    # The whole path, scheduler and all, into a queue that writes to /dev/null (no printer here).
    made = subprocess.run(["lpadmin", "-p", "boottest", "-E", "-v", "file:///dev/null"], capture_output=True, text=True)
    job = subprocess.run(["lp", "-d", "boottest", "-t", "boot test", str(sample)], capture_output=True, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run("lpstat", "-o", "boottest"):
        time.sleep(2)  # the job leaves the queue once the (emulated) filters are done
    say(
        "lp",
        {
            "lpadmin": made.returncode,
            "lpadmin_err": made.stderr.strip(),
            "lp": job.stdout.strip(),
            "lp_err": job.stderr.strip(),
            "completed": run("lpstat", "-W", "completed", "-o", "boottest").splitlines(),
            "pending": run("lpstat", "-o", "boottest").splitlines(),
        },
    )
    models = run("lpinfo", "-m").splitlines()
    say(
        "pcl-driver",
        {
            "lpinfo_models": len(models),
            "lpinfo_pxlmono": [ln for ln in models if "pxlmono.ppd" in ln],
            "ppd_file": Path("/usr/share/ppd/cupsfilters/pxlmono.ppd").is_file(),
        },
    )
    say("printer-unit", run("journalctl", "-b", "-u", "lastmile-printer", "-o", "cat", "--no-pager").splitlines())
    say(
        "chrony",
        {
            "state": units("chrony.service", properties=("ActiveState", "SubState"))[0],
            "sources": run("chronyc", "-n", "sources").splitlines(),
            "tracking": run("chronyc", "-c", "-n", "tracking"),
            "timesyncd": units("systemd-timesyncd.service", properties=("LoadState", "ActiveState"))[0],
            "gpsd_options": [ln for ln in Path("/etc/default/gpsd").read_text().splitlines() if "GPSD_OPTIONS" in ln],
        },
    )
    say(
        "watchdog",
        {
            "manager": run("systemctl", "show", "-p", "RuntimeWatchdogUSec,RebootWatchdogUSec"),
            "devices": sorted(str(p) for p in Path("/dev").glob("watchdog*")),
            "journal": [
                ln
                for ln in run("journalctl", "-b", "_PID=1", "-o", "cat", "--no-pager").splitlines()
                if "atchdog" in ln
            ][:10],
        },
    )
    say(
        "links",
        {
            "connections": run("nmcli", "-t", "-f", "NAME,TYPE,FILENAME", "connection", "show").splitlines(),
            "devices": run("nmcli", "-t", "-f", "DEVICE,TYPE,STATE", "device").splitlines(),
            "units": units(
                "NetworkManager.service",
                "ModemManager.service",
                "lastmile-network.service",
                "systemd-networkd.service",
                properties=("ActiveState", "SubState", "Result"),
            ),
            "provisioned": run("journalctl", "-b", "-u", "lastmile-network", "-o", "cat", "--no-pager").splitlines(),
        },
    )


def main() -> int:
    try:
        report()
        say("done", True)
        return 0
    except Exception:  # noqa: BLE001 — whatever broke goes on the console, and the machine still powers off
        say("error", traceback.format_exc().splitlines())
        return 1
    finally:
        sys.stdout.flush()
        subprocess.run(["systemctl", "poweroff", "--no-block"])


if __name__ == "__main__":
    sys.exit(main())
