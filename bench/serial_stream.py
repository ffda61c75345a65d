"""CPU share and peak RSS of the acquiring process while a 12-lead 500 Hz ECG streams in real time.

    .venv/bin/python bench/serial_stream.py [--seconds 20]

A simulated bridge (the firmware's BridgeCore and the shared codec) writes one ECG_BLOCK of
25 samples x 12 leads every 50 ms into a pty, as a bridge on USB-CDC would. A separate
acquiring process opens the other end with the real SerialLinkManager (exclusive pyserial open,
select loop) and feeds a BridgeSession, which reassembles the recording. That process measures
its own CPU time (getrusage) over the stream and its peak RSS.

Reference measured in the same run: the same process and link manager with a handler that only
counts the bytes (no framing, no decoding): the ratio says what the protocol and ECG assembly
cost on top of moving the bytes. Goal: <= 5 % of one core for the full path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RATE_HZ = 500
BLOCK = 25  # samples per block: 50 ms


def child(mode: str, path: str, expected_bytes: int) -> None:
    """The acquiring process: link manager + (session | byte counter) until the stream ends."""
    import datetime as dt

    from devices.bridge.session import BridgeSession, RecordingReady
    from firmware_bridge.serial_link import LinkSpec, PortMatch, SerialLinkManager

    done = threading.Event()
    state: dict = {"bytes": 0, "t0": None, "r0": None}

    class Handler:
        def __init__(self) -> None:
            self.session = BridgeSession(path)
            self.link = None

        def connection_made(self, link) -> None:
            self.link = link
            if mode == "full":
                link.write(self.session.connection_made(dt.datetime.now(dt.timezone.utc)))
            print("READY", flush=True)

        def data_received(self, data: bytes) -> None:
            if state["t0"] is None:
                state["t0"], state["r0"] = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
            state["bytes"] += len(data)
            if mode == "raw":
                if state["bytes"] >= expected_bytes:
                    done.set()
                return
            for ev in self.session.receive_data(data, dt.datetime.now(dt.timezone.utc)):
                if isinstance(ev, RecordingReady):
                    state["recording"] = (ev.recording.n_leads, ev.recording.n_samples, len(ev.recording.gaps))
                    self.link.write(self.session.acknowledge(ev.seq))
                    done.set()
            self.link.write(self.session.data_to_send())

        def connection_lost(self, reason: str | None, problem: object = None) -> None:
            done.set()

        def tick(self) -> float | None:
            return None

    manager = SerialLinkManager(
        [LinkSpec("bench", PortMatch(path=path), "bridge")], lambda s, p: Handler(), watch_dirs=None, rescan_s=1.0
    )
    while not done.is_set():
        manager.poll(1.0)
    t1, r1 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    manager.close()
    cpu = (r1.ru_utime - state["r0"].ru_utime) + (r1.ru_stime - state["r0"].ru_stime)
    print(
        "RESULT "
        + json.dumps(
            {
                "mode": mode,
                "wall_s": t1 - state["t0"],
                "cpu_s": cpu,
                "cpu_share": cpu / (t1 - state["t0"]),
                "bytes": state["bytes"],
                "peak_rss_mb": r1.ru_maxrss / 1024,
                "recording": state.get("recording"),
            }
        ),
        flush=True,
    )


def run(mode: str, seconds: float) -> dict:
    from firmware_bridge.bridge_simulator import EcgStreamSimulator
    from firmware_bridge.firmware.bridge_core import BridgeCore

    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    n_blocks = int(seconds * RATE_HZ / BLOCK)
    core = BridgeCore("BENCH", boot_id=1, capabilities=("ecg",))
    sim = EcgStreamSimulator(core, recording_id=1, sampling_rate_hz=RATE_HZ, block_samples=BLOCK)
    # Build the frames up front so that the writer's own CPU does not disturb the timing.
    frames = [core.hello(0) + sim.start(0)] + list(sim.blocks(n_blocks)) + [sim.end(n_blocks * BLOCK, 0)]
    total = sum(len(f) for f in frames)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, path, str(total)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    stop_reader = threading.Event()

    def drain() -> None:  # the gateway's replies (HELLO, TIME_SYNC, ACK) must not fill the pty
        import select

        while not stop_reader.is_set():
            if select.select([master], [], [], 0.2)[0]:
                try:
                    os.read(master, 4096)
                except OSError:
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"child did not start: {line!r}")
        start = time.monotonic()
        for i, frame in enumerate(frames):
            due = start + i * BLOCK / RATE_HZ
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            os.write(master, frame)
        out, _ = proc.communicate(timeout=60)
    finally:
        stop_reader.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(2)
        os.close(master)
        os.close(slave)
    result = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(result[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="stream length per run (real time)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path, expected = args.child
        child(mode, path, int(expected))
        return
    print(
        f"12-lead 500 Hz ECG, {args.seconds:.0f} s in real time per run, blocks of {BLOCK} samples "
        f"({RATE_HZ // BLOCK} frames/s), {os.cpu_count()} cores"
    )
    raw = run("raw", args.seconds)
    full = run("full", args.seconds)
    print(
        f"reference (link manager, bytes only): CPU {raw['cpu_share'] * 100:.2f} % of one core, "
        f"peak RSS {raw['peak_rss_mb']:.1f} MB, {raw['bytes'] / raw['wall_s'] / 1024:.1f} KiB/s"
    )
    print(
        f"full acquire path (frames, CRC, session, ECG assembly): CPU {full['cpu_share'] * 100:.2f} % "
        f"of one core, peak RSS {full['peak_rss_mb']:.1f} MB; recording {full['recording']}"
    )
    ratio = full["cpu_s"] / raw["cpu_s"] if raw["cpu_s"] else float("inf")
    print(
        f"full / reference CPU: {ratio:.2f}x; goal <= 5 % of one core: "
        f"{'met' if full['cpu_share'] <= 0.05 else 'NOT met'}"
    )
    print("JSON " + json.dumps({"raw": raw, "full": full, "ratio": ratio}))


if __name__ == "__main__":
    main()
