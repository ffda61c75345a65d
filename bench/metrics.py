"""The metrics exporter's cost on a Pi-sized budget: its own process against a thread in the
forward service, CPU and time per scrape, scrape size, and how a scrape grows with the outbox.

    .venv/bin/python bench/metrics.py [--history 20000] [--waiting 300] [--scrapes 40]

The data directory holds an outbox with `--history` purged items (a year or two of a busy clinic)
and `--waiting` queued ECG-sized items. Figures:

- RSS (VmRSS) and USS (private pages, what the process adds to the machine) of `lastmile metrics`
  idle and after the scrapes, against a bare `python -c` (reference, same run);
- the alternative: what serving the same endpoint from inside the forward service adds to that
  process (a child builds `ForwardService`, measures, then starts the metrics server in-process);
- per scrape over HTTP: CPU seconds of the exporter (utime+stime from /proc), wall time, bytes
  (plain and gzip, as Prometheus asks for it);
- collection time in-process for outboxes of 1k / 10k / 50k items.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lastmile.demo.loopback import free_port


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, USS) in MB: VmRSS, and Private_Clean + Private_Dirty from smaps_rollup."""
    rss = next(
        int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:")
    )
    private = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            private += int(line.split()[1])
    return rss / 1024, private / 1024


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def fill_outbox(data_dir: Path, history: int, waiting: int) -> None:
    """Purged history and waiting ECG-sized items, written straight into the outbox's tables."""
    from uploader.outbox import Outbox

    now = time.time()
    with Outbox.open(data_dir) as outbox:
        conn = outbox.db.conn
        conn.execute("BEGIN")
        rows = []
        for i in range(history + waiting):
            purged = i < history
            rows.append(
                (
                    "dicom" if i % 5 else "fhir-bundle",
                    f"bench-{i}",
                    1,
                    "purged" if purged else "queued",
                    now - (history + waiting - i) * 60,
                    now,
                    now,
                    "0" * 64,
                    124_000,
                    None
                    if purged
                    else json.dumps({"quality": {"verdict": ("acceptable", "warn", "re-record")[i % 3]}}),
                    now - 30 if purged else None,
                )
            )
        conn.executemany(
            "INSERT INTO items (kind, key, priority, state, created_at, updated_at, next_attempt_at, sha256, size, "
            "meta, sent_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            rows,
        )
        conn.execute("COMMIT")
        outbox.record_status("reading_center", {"fault": None, "last_success": now - 30}, now)


def write_config(tmp: Path, port: int) -> Path:
    path = tmp / "lastmile.toml"
    path.write_text(
        f'[gateway]\ndata_dir = "{tmp / "data"}"\n[reading_center]\nport = {free_port()}\n'
        f'storage_commitment = false\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    )
    return path


def unit_environment() -> dict[str, str]:
    env = dict(os.environ)
    for line in (REPO / "systemd/lastmile-metrics.service").read_text().splitlines():
        if line.startswith("Environment="):
            env.update(pair.split("=", 1) for pair in line.removeprefix("Environment=").split())  # type: ignore[misc]
    return env


def get(url: str, gzip_ok: bool) -> tuple[int, float]:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzip_ok else {})
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return len(body), time.perf_counter() - began


def separate_process(config: Path, port: int, scrapes: int) -> dict[str, float]:
    lastmile = REPO / ".venv/bin/lastmile"
    proc = subprocess.Popen(
        [str(lastmile), "-c", str(config), "metrics"],
        env=unit_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get(url, False)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        time.sleep(2)
        idle = memory_mb(proc.pid)
        cpu0 = cpu_s(proc.pid)
        plain, zipped, walls = [], [], []
        for i in range(scrapes):
            size, wall = get(url, gzip_ok=bool(i % 2))
            (zipped if i % 2 else plain).append(size)
            walls.append(wall)
        cpu = (cpu_s(proc.pid) - cpu0) / scrapes
        after = memory_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "idle_rss": idle[0],
        "idle_uss": idle[1],
        "rss": after[0],
        "uss": after[1],
        "cpu_ms": cpu * 1000,
        "wall_ms": statistics.median(walls) * 1000,
        "bytes": statistics.median(plain),
        "gzip_bytes": statistics.median(zipped),
    }


IN_FORWARD = """
import json, os, sys, time
from pathlib import Path
from lastmile.config import load_config
from lastmile.services.forward import ForwardService

def mem():
    rss = next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS:'))
    uss = sum(int(l.split()[1]) for l in Path('/proc/self/smaps_rollup').read_text().splitlines()
              if l.startswith(('Private_Clean:', 'Private_Dirty:')))
    return rss / 1024, uss / 1024

config = load_config(sys.argv[1])
service = ForwardService(config)
time.sleep(1)
before = mem()
from lastmile.services.metrics import MetricsService
metrics = MetricsService(config)
import urllib.request
for _ in range(5):
    urllib.request.urlopen(metrics.server.listen.url("/metrics"), timeout=30).read()
time.sleep(1)
after = mem()
metrics.close()
service.close()
print(json.dumps({"before": before, "after": after}))
"""


def in_forward(config: Path) -> dict[str, list[float]]:
    out = subprocess.run(
        [str(REPO / ".venv/bin/python"), "-c", IN_FORWARD, str(config)],
        env=unit_environment(),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bare_python() -> float:
    proc = subprocess.Popen([str(REPO / ".venv/bin/python"), "-c", "import time; time.sleep(3)"])
    time.sleep(1)
    rss = memory_mb(proc.pid)[0]
    proc.wait()
    return rss


def collect_ms(tmp: Path, history: int, runs: int = 5) -> float:
    from lastmile.config import load_config
    from lastmile.services.metrics import GatewayCollector

    sub = tmp / f"h{history}"
    sub.mkdir()
    fill_outbox(sub / "data", history, 300)
    collector = GatewayCollector(load_config(write_config(sub, free_port())))
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        list(collector.collect())
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=20_000, help="purged items in the outbox")
    parser.add_argument("--waiting", type=int, default=300, help="queued items")
    parser.add_argument("--scrapes", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fill_outbox(tmp / "data", args.history, args.waiting)
        port = free_port()
        config = write_config(tmp, port)
        reference = bare_python()
        alone = separate_process(config, port, args.scrapes)
        inside = in_forward(config)
        print(f"outbox: {args.history} purged + {args.waiting} queued items; {args.scrapes} scrapes")
        print(f"reference: bare python            RSS {reference:6.1f} MB")
        print(
            f"lastmile metrics (own process)     RSS {alone['idle_rss']:6.1f} MB idle, {alone['rss']:6.1f} MB after "
            f"(x{alone['rss'] / reference:.2f} bare python); USS {alone['idle_uss']:.1f} / {alone['uss']:.1f} MB"
        )
        (rss0, uss0), (rss1, uss1) = inside["before"], inside["after"]
        print(
            f"in the forward service instead     RSS {rss0:6.1f} -> {rss1:6.1f} MB (+{rss1 - rss0:.1f}), "
            f"USS {uss0:.1f} -> {uss1:.1f} MB (+{uss1 - uss0:.1f})"
        )
        print(
            f"per scrape over HTTP: CPU {alone['cpu_ms']:.1f} ms, wall {alone['wall_ms']:.1f} ms (median), "
            f"{alone['bytes']:.0f} bytes, {alone['gzip_bytes']:.0f} gzip (x{alone['gzip_bytes'] / alone['bytes']:.2f})"
        )
        for history in (1_000, 10_000, 50_000):
            print(f"collect, {history:>6} purged items: {collect_ms(tmp, history):6.1f} ms (median of 5)")


if __name__ == "__main__":
    main()
