"""Start-up time to READY=1 and idle RSS of both services.

    .venv/bin/python bench/startup.py [--runs 5] [--idle 5]

Each service is started as systemd would (`lastmile acquire|forward` with NOTIFY_SOCKET set to a
socket this script binds); the time from spawning the process to its READY=1 datagram is the
start-up time, and VmRSS after `--idle` seconds of doing nothing is the idle RSS. Reference in
the same run: a bare `python -c pass` (start-up floor) and its RSS. Goals: <= 1.0 s, <= 64 MB.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_READY_S = 1.0
GOAL_RSS_MB = 64.0


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds idle before reading RSS")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()

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
