"""What one outbox `add` costs the SD card: payload in a file vs. payload in the database.

For each payload size (124 KB: a 12-lead ECG as DICOM; 1 KB: an observation or a small FHIR
bundle) and each strategy, a fresh worker process opens a new outbox, adds N items and forces
the final WAL checkpoint (every byte the WAL holds is written again to the database sooner or
later, so it counts). Figures from /proc/self/io write_bytes of that worker:

    bytes written to disk per item / payload size, and wall time per item.

A third, noisier figure comes from the block device's own counter (after sync), because the
ext4 journal, inode and directory blocks a new file costs are written by the kernel, not
charged to the process.

The reference, measured in the same run, is the least any durable store can do: write the
payload to a new file and fsync it (no rename, no directory fsync, no row).

    .venv/bin/python bench/outbox_write.py [--items 300] [--repeats 3] [--dir DIR]

DIR must be on the disk being measured (tmpfs writes are not counted); default: a temporary
directory under the current directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"124 KB": 124 * 1024, "32 KB": 32 * 1024, "8 KB": 8 * 1024, "1 KB": 1024}
STRATEGIES = {"file": -1, "in database": 1 << 40}  # inline_max_bytes


def write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def device_write_bytes(path: Path) -> int:
    """Bytes written to the block device holding `path`, system-wide: includes what the kernel
    writes for us later (ext4 journal, inodes, directories) but also everyone else's writes."""
    dev = os.stat(path).st_dev
    with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat") as f:
        return int(f.read().split()[6]) * 512


def worker(strategy: str, size: int, items: int, data_dir: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from uploader.outbox import Outbox

    payloads = [os.urandom(size) for _ in range(items)]
    if strategy == "reference":
        data_dir.mkdir(parents=True)
        os.sync()
        device_before = device_write_bytes(data_dir)
        before, t0 = write_bytes(), time.perf_counter()
        for i, data in enumerate(payloads):
            fd = os.open(data_dir / f"{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
    else:
        outbox = Outbox.open(data_dir, min_free_bytes=0, inline_max_bytes=STRATEGIES[strategy])
        os.sync()
        device_before = device_write_bytes(data_dir)
        before, t0 = write_bytes(), time.perf_counter()
        for i, data in enumerate(payloads):
            outbox.add(
                "dicom",
                f"bench-{i}",
                data,
                meta={"sop_instance_uid": f"1.2.3.{i}"},
                patient={"name": "BENCH^PATIENT", "id": f"P{i}"},
                now=1e9 + i,
            )
        outbox.checkpoint()
    elapsed = time.perf_counter() - t0
    written = write_bytes() - before
    os.sync()  # the journal and metadata writes the kernel does for us
    device = device_write_bytes(data_dir) - device_before
    if strategy != "reference":
        outbox.close()
    return {
        "bytes_per_payload_byte": written / (items * size),
        "ms_per_item": 1000 * elapsed / items,
        "device_bytes_per_payload_byte": device / (items * size),
    }


def run(strategy: str, size: int, items: int, base: Path, n: int) -> dict:
    data_dir = base / f"run-{n}"
    cmd = [sys.executable, __file__, "--worker", strategy, str(size), str(items), str(data_dir)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    shutil.rmtree(data_dir, ignore_errors=True)
    return json.loads(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--worker", nargs=4, metavar=("STRATEGY", "SIZE", "ITEMS", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        strategy, size, items, data_dir = args.worker
        print(json.dumps(worker(strategy, int(size), int(items), Path(data_dir))))
        return 0

    base = Path(tempfile.mkdtemp(prefix="outbox-bench-", dir=args.dir or Path.cwd()))
    print(f"outbox add: {args.items} items per run, medians of {args.repeats} runs, in {base}")
    print(
        f"{'payload':>8}  {'strategy':<12} {'bytes written/payload byte':>27} {'x reference':>12} "
        f"{'ms/item':>8} {'x reference':>12} {'device bytes/payload byte':>26}"
    )
    n = 0
    try:
        for label, size in SIZES.items():
            results = {}
            for strategy in ("reference", *STRATEGIES):
                runs = []
                for _ in range(args.repeats):
                    runs.append(run(strategy, size, args.items, base, n))
                    n += 1
                results[strategy] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            ref = results["reference"]
            if ref["bytes_per_payload_byte"] == 0:
                print(f"warning: {base} is not on a block device (tmpfs?): write_bytes is 0", file=sys.stderr)
            for strategy, r in results.items():
                bpb, ms = r["bytes_per_payload_byte"], r["ms_per_item"]
                rb = bpb / ref["bytes_per_payload_byte"] if ref["bytes_per_payload_byte"] else float("nan")
                print(
                    f"{label:>8}  {strategy:<12} {bpb:>27.2f} {rb:>12.2f} {ms:>8.2f} "
                    f"{ms / ref['ms_per_item']:>12.2f} {r['device_bytes_per_payload_byte']:>26.2f}"
                )
        print(
            "bytes written: /proc/self/io write_bytes of the worker (incl. the final WAL checkpoint);\n"
            "device bytes: the whole block device's sectors written over the same span after sync\n"
            "(adds ext4 journal and metadata writes, and other processes' writes: noisy)."
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
