"""The fuzz harness (bench/fuzz.py) in short: every target under atheris for a few hundred inputs
with a fixed seed (a count, not a time: the same inputs on a fast or a loaded machine), every
seed through its target, and the harness's own checks shown to catch what they are for (an
untyped exception, an impossible value, a hang). The long runs are bench/fuzz.py's, not the suite's."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.fuzz import Worker
from bench.fuzz_targets import Implausible, Target, all_targets, check_recording, check_values
from tests.conftest import REPO, SHARED, missing

# per target: the seeds first (libFuzzer runs its corpus: up to 217, NMEA sentences), then
# mutations; ~1 s of CPU per target with the worker's start-up: ~15 s on two idle cores
SMOKE_INPUTS = 300
TARGETS = all_targets()


def test_every_target_runs_under_atheris_without_a_failure(tmp_path: Path) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        missing("atheris is not installed (scripts/setup.sh --test installs it on x86-64)")
    if not SHARED.is_dir():
        missing("../shared (the ECG files and GNSS logs that seed the fuzzer) is absent")
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "fuzz.py"),
            "--inputs",
            str(SMOKE_INPUTS),
            "--seed",
            "7",
            "--jobs",
            "2",
            "--work-dir",
            str(work),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=work,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    assert proc.stdout.strip(), proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    by_name = {t["target"]: t for t in result["targets"]}
    assert set(by_name) == set(TARGETS)
    for name, t in by_name.items():
        if TARGETS[name].skip:
            assert t["status"] == "skipped"
            continue
        assert t["status"] == "ok", f"{name}: {t['status']} {t['note']} {t['findings']}"
        # it really ran, instrumented, past its seeds, exactly the inputs asked for
        assert t["inputs"] == SMOKE_INPUTS > t["seeds"] and t["cov"] > 0 and t["corpus"] >= 1, t
    assert proc.returncode == 0
    # nothing outside the work dir: corpora and findings there, and the workers' scratch folders,
    # which nothing wrote to; nothing left in the temporary directory (workers end by os._exit)
    assert {p.name for p in work.iterdir()} == {"corpus", "findings", "scratch"}
    assert [p for p in (work / "scratch").rglob("*") if not p.is_dir()] == []
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("name", [n for n, t in TARGETS.items() if not t.skip])
def test_every_seed_decodes_or_raises_the_typed_error(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()
    if not seeds:
        missing(f"{name}: no seeds (../shared absent?)")
    decoded = 0
    for seed in seeds:
        try:
            target.run(seed)
            decoded += 1
        except target.typed:
            pass
    assert decoded, f"{name}: no seed decodes, so the fuzzer would start from refusals only"


# -- the harness's checks catch what they are for -------------------------------------------------


def test_plausibility_checks_catch_impossible_values() -> None:
    from devices.ecg.recording import EcgRecording
    from devices.identity import TimeSource
    from devices.observation import Quantity

    with pytest.raises(Implausible):
        check_values(Quantity("spo2", math.nan, "%"))
    with pytest.raises(Implausible):
        check_values({"track": [1.0, math.inf]})
    check_values(Quantity("spo2", None, "%", special="nres"))  # "no value" with its reason is fine
    rec = EcgRecording(
        samples=np.ones((1, 10), dtype=np.int16),
        lead_names=("II",),
        sampling_rate_hz=500.0,
        uv_per_unit=1.0,
        acquired_at=dt.datetime(1850, 1, 1, tzinfo=dt.timezone.utc),
        time_source=TimeSource.FILE,
    )
    with pytest.raises(Implausible):
        check_recording(rec)  # an ECG from 1850


def _target(run, typed=(ValueError,)) -> Target:
    return Target("probe", "harness self-test", run, typed, lambda: [b""])


@pytest.mark.parametrize("error, kind", [(KeyError("x"), "untyped"), (Implausible("rate = nan"), "implausible")])
def test_worker_records_untyped_errors_and_impossible_values(tmp_path: Path, error: Exception, kind: str) -> None:
    def run(data: bytes) -> None:
        if data == b"bad":
            raise error
        raise ValueError("typed: refused")

    worker = Worker(_target(run), tmp_path, inputs=10**9, max_seconds=None)
    worker.findings_dir.mkdir(parents=True)
    for data in (b"ok", b"bad", b"bad", b"fine"):
        worker.one_input(data)
    assert worker.inputs == 4
    [finding] = worker.findings.values()
    assert finding.kind == kind and finding.count == 2
    assert (tmp_path / finding.examples[0]).read_bytes() == b"bad"  # the input is kept to reproduce it
    stats = json.loads(worker.stats_path.read_text())
    assert stats["findings"][0]["count"] >= 1


def test_worker_records_an_input_that_costs_more_than_a_second_of_cpu(tmp_path: Path) -> None:
    import time

    def run(data: bytes) -> None:
        end = time.process_time() + 1.1
        while time.process_time() < end:
            pass

    worker = Worker(_target(run), tmp_path, inputs=10**9, max_seconds=None)
    worker.findings_dir.mkdir(parents=True)
    worker.one_input(b"slow")
    assert [f.kind for f in worker.findings.values()] == ["hang"]


def test_seeds_come_from_shared_files_and_test_constants() -> None:
    if not SHARED.is_dir():
        missing("../shared (the ECG files and GNSS logs that seed the fuzzer) is absent")
    # the SCP target starts from the three shared carts' files, the BLE one from the tests' captures
    assert len(TARGETS["scp"].seeds()) >= 3
    assert len(TARGETS["ble"].seeds()) >= 15


def test_harness_frames_bridge_messages_as_the_codec_does() -> None:
    """bench/fuzz_targets.plain_frame (an uninstrumented copy, for speed) writes the same bytes as
    devices/bridge/codec.encode_frame: the bridge_messages target feeds the session real frames."""
    import random

    from bench.fuzz_targets import bridge_message_seeds, messages_in, plain_frame
    from devices.bridge import codec

    cases = [(t, s, p[: codec.MAX_PAYLOAD]) for seed in bridge_message_seeds() for t, s, p in messages_in(seed)]
    rng = random.Random(17)
    for _ in range(300):  # zeros, runs past 254 bytes (COBS' long blocks), up to the largest payload
        size = rng.choice([0, 1, 253, 254, 255, 508, rng.randrange(codec.MAX_PAYLOAD + 1)])
        payload = bytes(0 if rng.random() < 0.1 else rng.randrange(1, 256) for _ in range(size))
        cases.append((rng.randrange(256), rng.randrange(256), payload))
    assert len(cases) > 300
    for msg_type, seq, payload in cases:
        assert plain_frame(msg_type, seq, payload) == codec.encode_frame(msg_type, seq, payload)


def test_sessions_add_up_and_findings_merge(tmp_path: Path) -> None:
    """--resume and the per-worker sessions: the figures are the sum of every session's, a
    finding seen in two sessions is one line with both counts, coverage is the last session's."""
    from bench.fuzz import collect, table_only

    target = TARGETS["ble_racp"]
    folder = tmp_path / "findings" / target.name
    folder.mkdir(parents=True)
    finding = {"kind": "untyped", "signature": "KeyError at devices/x.py:1", "message": "k", "examples": ["a"]}
    sessions = [
        {
            "inputs": 250_000,
            "seconds": 40.0,
            "cpu_seconds": 10.0,
            "max_input_cpu_s": 0.2,
            "finished": True,
            "findings": [dict(finding, count=2)],
        },
        # an older harness's session: wall time only, so it counts in inputs but not in the CPU rate
        {"inputs": 100_000, "seconds": 50.0, "max_input_cpu_s": 0.1, "finished": False, "findings": []},
    ]
    for number, stats in enumerate(sessions, 1):
        (folder / f"stats-session-{number:03d}.json").write_text(json.dumps(stats))
    (folder / "libfuzzer-session-001.log").write_bytes(b"#250000\tpulse  cov: 80 ft: 150 corp: 40/1Kb lim: 9\n")
    last = {
        "inputs": 150_000,
        "seconds": 30.0,
        "cpu_seconds": 5.0,
        "max_input_cpu_s": 0.05,
        "finished": True,
        "findings": [dict(finding, count=1, examples=["b"])],
    }
    (folder / "stats.json").write_text(json.dumps(last))
    (folder / "libfuzzer.log").write_bytes(b"#150000\tREDUCE cov: 87 ft: 163 corp: 43/2Kb lim: 9 exec/s: 1\n")

    report = collect(target, tmp_path, 0, seeds=3)
    assert (report.inputs, report.sessions, report.seconds) == (500_000, 3, 120.0)
    assert report.cpu_seconds == 15.0 and report.exec_per_cpu_s == 26667  # 400k inputs timed in CPU
    assert (report.cov, report.ft, report.corpus) == (87, 163, 43)
    assert report.max_input_cpu_s == 0.2
    [merged] = report.findings
    assert merged.count == 3 and merged.examples == ["a", "b"] and report.untyped == 3
    assert report.status == "failures"
    # --table reads the same figures without running anything; a target with no session says so
    racp, npz = table_only([target, TARGETS["npz"]], tmp_path)
    assert racp.inputs == 500_000 and npz.status == "not run" and npz.inputs == 0


def test_a_target_runs_in_sessions_and_resume_goes_on(tmp_path: Path) -> None:
    """Each worker runs at most --session-inputs; --resume adds sessions up to the new --inputs
    from the corpus the earlier ones left (the count is exact: a count, not a time)."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        missing("atheris is not installed (scripts/setup.sh --test installs it on x86-64)")

    def run(*extra: str) -> dict:
        proc = subprocess.run(
            [sys.executable, str(REPO / "bench" / "fuzz.py"), "--target", "ble_racp", "--seed", "3",
             "--work-dir", str(tmp_path), "--json", *extra],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        [result] = json.loads(proc.stdout.strip().splitlines()[-1])["targets"]
        return result

    first = run("--inputs", "500", "--session-inputs", "200")
    assert (first["inputs"], first["sessions"], first["status"]) == (500, 3, "ok")
    again = run("--inputs", "800", "--session-inputs", "200", "--resume")
    assert (again["inputs"], again["sessions"]) == (800, 5)
    assert again["corpus"] >= first["corpus"] > 0 and "cpu_seconds" in again
    table = run("--inputs", "800", "--table")
    assert (table["inputs"], table["sessions"]) == (800, 5)
    fresh = run("--inputs", "300")  # without --resume the count starts again (the corpus stays)
    assert (fresh["inputs"], fresh["sessions"]) == (300, 1)


def test_every_test_file_the_fuzzer_takes_seeds_from_still_names_captured_bytes() -> None:
    """Captured bytes moved out of a test module (into a harness) silently starve a fuzz target of
    its seeds: every file `constants_in_tests` is asked for must still hold some."""
    import ast

    from bench.fuzz_targets import constants_in_tests

    source = (REPO / "bench" / "fuzz_targets.py").read_text(encoding="utf-8")
    named = {
        arg.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "constants_in_tests"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    }
    assert len(named) >= 6
    assert {name for name in named if not constants_in_tests(name)} == set()
