"""Start-up time to READY=1 and idle RSS of both services.

    .venv/bin/python bench/startup.py [--runs 5] [--idle 5]

Each service is started as systemd would (`lastmile acquire|forward` with NOTIFY_SOCKET set to a
socket this script binds); the time from spawning the process to its READY=1 datagram is the
start-up time, and VmRSS after `--idle` seconds of doing nothing is the idle RSS. Reference in
the same run: a bare `python -c pass` (start-up floor) and its RSS. Goals: <= 1.0 s, <= 64 MB.

    .venv/bin/python bench/startup.py --migration-rows 300000 [--cpu-share 0.25]

The first start after an upgrade also migrates the outbox: `--migration-rows N` times the opening
of an outbox of N rows built like a long-running gateway's (two thirds purged readings, a third
purged ECGs, their data erased, rows kept) whose last migration (0008_ecgs_index, a partial index
over the ECG rows) is still to come; the outbox's opening without it is the reference. Each open
runs in a fresh process (with `--cpu-share 0.25`: a quarter core, bench/cpu_share.py, the nearest
this machine comes to a Pi), with the database in the page cache and without (its pages dropped
first, as after the reboot an upgrade ends with; read from this machine's disk, not an SD card).

    .venv/bin/python bench/startup.py --old-reports 2000 [--cpu-share 0.25]

A gateway that ran a year before clinic.db kept report lines (0009) has its reports' lines read
again from their objects (lastmile.reports.old_lines) by the forward service after its start:
`--old-reports N` times that on a clinic.db of N such reports (DICOM SR, every fifth a PDF), in a
fresh process as above: its whole time, and the longest write transaction it holds (what the
other services' 15 s busy timeout waits for; it ran in one transaction in a migration before).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cpu_share import CpuShare  # (after the path: run as a script)

GOAL_READY_S = 1.0
GOAL_RSS_MB = 64.0
MIGRATION = "0008_ecgs_index"  # the migration timed by --migration-rows
OLD_REPORTS_PDF_EVERY = 5


def unit_environment(service: str) -> dict[str, str]:
    """Environment= of the service's unit, so the process runs as under systemd."""
    env = {}
    for line in (REPO / "systemd" / f"lastmile-{service}.service").read_text().splitlines():
        if line.startswith("Environment="):
            for pair in line.removeprefix("Environment=").split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_to_ready(command: list[str], env: dict[str, str], idle_s: float, sock_dir: Path) -> tuple[float, float]:
    path = sock_dir / "notify"
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        began = time.perf_counter()
        proc = subprocess.Popen(
            command,
            env={**env, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while b"READY=1" not in sock.recv(4096).split(b"\n"):
                pass
            ready = time.perf_counter() - began
            time.sleep(idle_s)
            rss = rss_mb(proc.pid)
            proc.send_signal(signal.SIGTERM)
            if proc.wait(timeout=30) != 0:
                raise RuntimeError(f"{command} exited {proc.returncode} on SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return ready, rss


def reference(python: str) -> tuple[float, float]:
    began = time.perf_counter()
    subprocess.run([python, "-c", "pass"], check=True)
    elapsed = time.perf_counter() - began
    proc = subprocess.Popen([python, "-c", "import time; time.sleep(2)"])
    time.sleep(0.5)
    rss = rss_mb(proc.pid)
    proc.wait()
    return elapsed, rss


def build_gateway_outbox(path: Path, rows: int) -> None:
    """An outbox of `rows` purged items as years of a gateway leave it (a reading every ~2 min, an
    ECG every ~4), migrated up to MIGRATION, not through it. Written in one transaction."""
    from uploader.sqlite_store import MIGRATIONS, open_database, transaction

    before = MIGRATIONS[: [m.name for m in MIGRATIONS].index(MIGRATION)]
    db = open_database(path, before)
    t0 = time.time() - 2 * 365 * 86400
    with transaction(db) as conn:
        conn.executemany(
            "INSERT INTO items (kind, key, priority, state, attempts, next_attempt_at, created_at, updated_at, "
            "sent_at, committed_at, transaction_uid, sha256, size) "
            "VALUES (?, ?, 1, 'purged', 1, ?3, ?3, ?3, ?3, ?3, ?4, ?5, ?6)",
            (gateway_row(n, t0 + 200 * n) for n in range(rows)),
        )
    db.conn.close()


def gateway_row(n: int, at: float) -> tuple[str, str, float, str | None, str, int]:
    """(kind, key, time, commitment transaction, sha256, size) of the gateway's `n`th item."""
    sha = f"{n:064x}"
    if n % 3 == 2:  # an ECG: its SOP Instance UID for a key, committed by the reading center
        return "dicom", f"1.2.826.0.1.3680043.10.1234.{n}.{int(at)}", at, f"2.25.{n}{int(at)}", sha, 130_000
    return "observation", f"reading-{n:08d}-{int(at)}-CLINIC01-blood-pressure", at, None, sha, 900


def time_migration(path: Path, python: str, share: CpuShare | None, cold: bool) -> tuple[float, float]:
    """(seconds to open the outbox at `path` through MIGRATION, seconds to open it again):
    each in a fresh process, `cold`: the database's pages first dropped from the page cache (as
    after the reboot an upgrade ends with); MIGRATION is undone afterwards, for the next run."""
    command = [python, __file__, "--open-worker", str(path)]
    if share is not None:
        command = share.wrap(command)
    timed = []
    for _ in range(2):
        if cold:
            evict(path)
        timed.append(float(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("DROP INDEX items_ecgs")
        conn.execute("DELETE FROM migrations WHERE name = ?", (MIGRATION,))
    conn.close()
    return timed[0], timed[1]


def evict(path: Path) -> None:
    """The file's pages out of the page cache (this file's only: no other process's cache dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def open_worker(path: Path) -> None:
    """Print how long opening the outbox at `path` (migrating it) takes in this process."""
    from uploader.sqlite_store import MIGRATIONS, open_database

    began = time.perf_counter()
    db = open_database(path, MIGRATIONS)
    print(time.perf_counter() - began)
    db.conn.close()


def migration_figures(rows: int, runs: int, python: str, cpu_share: float | None) -> None:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        path = Path(tmp) / "outbox.sqlite"
        began = time.perf_counter()
        build_gateway_outbox(path, rows)
        size_mb = path.stat().st_size / 2**20
        print(
            f"{MIGRATION}: outbox of {rows} purged rows, {size_mb:.0f} MB, built in {time.perf_counter() - began:.0f} s"
        )
        for share_of in (None, cpu_share) if cpu_share else (None,):
            share = CpuShare(share_of, "startup") if share_of else None
            for cold in (False, True):
                with share or contextlib.nullcontext():
                    results = [time_migration(path, python, share, cold) for _ in range(runs)]
                where = f"{f'{share_of:g} core' if share_of else 'full speed'}, {'cold' if cold else 'cached'}"
                print(
                    f"  {where:>18}: open with {MIGRATION} median {statistics.median(m for m, _ in results):.2f} s, "
                    f"without {statistics.median(o for _, o in results) * 1000:.0f} ms"
                    f"  [runs: {', '.join(f'{m:.2f}' for m, _ in results)} s]"
                )


def old_lines_worker(data_dir: Path) -> None:
    """Print the seconds reading the old reports' lines again takes in this process, and its
    longest write transaction (each `transaction` timed)."""
    import contextlib as cl

    import lastmile.reports.old_lines as old_lines
    from lastmile.clinic.db import open_clinic_db

    held: list[float] = []
    real_transaction = old_lines.transaction

    @cl.contextmanager
    def timed_transaction(db: Any) -> Iterator[sqlite3.Connection]:
        began = time.perf_counter()
        with real_transaction(db) as conn:
            yield conn
        held.append(time.perf_counter() - began)

    old_lines.transaction = timed_transaction  # each batch's write transaction timed
    db = open_clinic_db(data_dir)
    began = time.perf_counter()
    old_lines.add_old_report_lines(db)
    print(time.perf_counter() - began, max(held, default=0.0))
    db.conn.close()


def old_lines_figures(reports: int, runs: int, python: str, cpu_share: float | None) -> None:
    from tests.old_reports import write_old_reports

    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        for share_of in (None, cpu_share) if cpu_share else (None,):
            share = CpuShare(share_of, "startup") if share_of else None
            results = []
            with share or contextlib.nullcontext():
                for run in range(runs):
                    data_dir = Path(tmp) / f"data-{share_of}-{run}"
                    write_old_reports(data_dir, reports, pdf_every=OLD_REPORTS_PDF_EVERY)
                    command = [python, __file__, "--old-lines-worker", str(data_dir)]
                    out = subprocess.run(share.wrap(command) if share else command, check=True, capture_output=True)
                    results.append(tuple(float(v) for v in out.stdout.split()))
            where = f"{share_of:g} core" if share_of else "full speed"
            print(
                f"old report lines: {reports} reports ({where}): all read again in median "
                f"{statistics.median(t for t, _ in results):.1f} s, longest write transaction "
                f"{max(h for _, h in results) * 1000:.0f} ms  [runs: {', '.join(f'{t:.1f}' for t, _ in results)} s]"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds idle before reading RSS")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--migration-rows", type=int, default=0, help=f"time {MIGRATION} on an outbox of this many rows")
    ap.add_argument("--cpu-share", type=float, default=None, help="also with this share of one core (0.25: a Pi)")
    ap.add_argument("--old-reports", type=int, default=0, help="time reading this many old reports' lines again")
    ap.add_argument("--open-worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--old-lines-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.open_worker:
        open_worker(args.open_worker)
        return 0
    if args.old_lines_worker:
        old_lines_worker(args.old_lines_worker)
        return 0
    if args.old_reports:
        old_lines_figures(args.old_reports, args.runs, args.python, args.cpu_share)
        return 0
    if args.migration_rows:
        migration_figures(args.migration_rows, args.runs, args.python, args.cpu_share)
        return 0

    ref_t, ref_rss = reference(args.python)
    print(f"reference: python -c pass {ref_t * 1000:.0f} ms, idle python RSS {ref_rss:.1f} MB")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        config = tmpdir / "lastmile.toml"
        # Shipped defaults except where the files go; BLE stays enabled as on a gateway.
        config.write_text(f'[gateway]\ndata_dir = "{tmpdir / "data"}"\n')
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
        for service in ("acquire", "forward"):
            command = [args.python, "-m", "lastmile", "-c", str(config), service]
            env = {**env, **unit_environment(service)}
            start_to_ready(command, env, 0.0, tmpdir)  # warm the page cache (.pyc are written)
            results = [start_to_ready(command, env, args.idle, tmpdir) for _ in range(args.runs)]
            ready = statistics.median(r for r, _ in results)
            rss = statistics.median(m for _, m in results)
            verdict = "OK" if ready <= GOAL_READY_S and rss <= GOAL_RSS_MB else "OVER GOAL"
            ok &= verdict == "OK"
            print(
                f"{service:8s} start->READY median {ready * 1000:.0f} ms (x{ready / ref_t:.1f} bare python, "
                f"goal {GOAL_READY_S * 1000:.0f} ms); idle RSS median {rss:.1f} MB "
                f"(x{rss / ref_rss:.1f} bare python, goal {GOAL_RSS_MB:.0f} MB)  {verdict}"
                f"  [runs: {', '.join(f'{r * 1000:.0f}' for r, _ in results)} ms]"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
