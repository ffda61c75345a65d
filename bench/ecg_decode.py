"""ECG decode + DICOM build time per shared file, side by side with an independent decoder.

    .venv/bin/python bench/ecg_decode.py [--runs N] [--shared ../shared]

Ours: read the file + devices.ecg.formats.decode_ecg (median of N runs), then
uploader.dicom_ecg.recording_to_dicom_bytes (median of N runs). Reference: ecgdatakit
(PyPI, Apache-2.0; reads SCP-ECG, HL7 aECG and DICOM waveforms, not Contec files), installed
by this script into a temporary folder with `pip install --target` and timed in a child
process (FileParser().parse(path), median of N runs) so it never touches the project's
environment. Ratios below 1.0 mean we are faster.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REFERENCE_PACKAGES = ["ecgdatakit==2.0.3", "xmltodict"]  # its numpy/defusedxml come from our venv
FILES = [
    "scp/ecgtoolkit_Example.scp",
    "scp/abtahi_ECG_20170504_163507_123456789.SCP",
    "aecg/fda_hl7_Example_aECG.xml",
    "aecg/fda_minimum_aecg.xml",
    "dicom/ecgtoolkit_Example.dcm",
    "contec/0000050.ECG",
    "contec/0000037.ECG",
]

WORKER = r"""
import json, statistics, sys, time, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from ecgdatakit import FileParser
paths, runs = json.loads(sys.argv[1]), int(sys.argv[2])
parser = FileParser()
out = {}
for path in paths:
    try:
        parser.parse(Path(path))  # warm-up (imports, caches)
        times = []
        for _ in range(runs):
            t = time.perf_counter(); parser.parse(Path(path)); times.append(time.perf_counter() - t)
        out[path] = statistics.median(times) * 1000
    except Exception as exc:
        out[path] = f"{type(exc).__name__}"
print(json.dumps(out))
"""


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def ours(paths: list[Path], runs: int) -> dict[str, tuple[float, float]]:
    from devices.ecg.formats import decode_ecg
    from uploader.dicom_ecg import StationInfo, mint_uids, recording_to_dicom_bytes

    station = StationInfo(station_name="bench", institution="bench")
    results = {}
    for path in paths:

        def decode(path: Path = path):
            return decode_ecg(path.read_bytes(), path.name)

        recording = decode()
        uids = mint_uids()

        def build(recording: object = recording, uids: object = uids) -> bytes:
            return recording_to_dicom_bytes(recording, uids, station)

        results[str(path)] = (median_ms(decode, runs), median_ms(build, runs))
    return results


def reference(paths: list[Path], runs: int) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory(prefix="ecg-bench-ref-") as target:
        install = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                target,
                *REFERENCE_PACKAGES,
            ],
            capture_output=True,
            text=True,
        )
        if install.returncode:
            print(f"reference decoder not installed: {install.stderr.strip()[-300:]}", file=sys.stderr)
            return {}
        env = {**os.environ, "PYTHONPATH": target}
        run = subprocess.run(
            [sys.executable, "-c", WORKER, json.dumps([str(p) for p in paths]), str(runs)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if run.returncode:
            print(f"reference decoder failed: {run.stderr.strip()[-300:]}", file=sys.stderr)
            return {}
        return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args()
    paths = [args.shared / "ecg" / f for f in FILES]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"missing shared files: {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    mine = ours(paths, args.runs)
    theirs = reference(paths, args.runs)
    print(f"median of {args.runs} runs, ms (ratio = ours / ecgdatakit; < 1 is faster)")
    header = f"{'file':44} {'decode':>8} {'DICOM':>8} {'total':>8} {'ecgdatakit':>11} {'decode×':>8} {'total×':>7}"
    print(header)
    print("-" * len(header))
    ratios = []
    for path in paths:
        decode_ms, build_ms = mine[str(path)]
        ref = theirs.get(str(path), "n/a")
        if isinstance(ref, float):
            ref_text, r1, r2 = f"{ref:11.2f}", f"{decode_ms / ref:8.2f}", f"{(decode_ms + build_ms) / ref:7.2f}"
            ratios.append(decode_ms / ref)
        else:
            ref_text, r1, r2 = f"{ref:>11}", f"{'-':>8}", f"{'-':>7}"
        print(f"{path.name[:44]:44} {decode_ms:8.2f} {build_ms:8.2f} {decode_ms + build_ms:8.2f} {ref_text} {r1} {r2}")
    if ratios:
        print(f"decode time ratio, geometric mean over {len(ratios)} files: {statistics.geometric_mean(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
