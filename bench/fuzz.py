"""Coverage-guided fuzzing of every decoder and network-facing parser (issue 17, item 3).

    bench/fuzz.py [--inputs N] [--target T ...] [--max-seconds S] [--jobs J] [--resume] [--json]
    bench/fuzz.py --table [--inputs N] [--work-dir D]   (the figures a work dir holds, nothing run)

Each target (bench/fuzz_targets.py) runs in its own process under atheris (libFuzzer over
Python bytecode coverage), seeded from ../shared's ECG files and GNSS logs, the captured bytes the
tests name, and objects built by the harness. The contract checked on every input: decode, or
raise the typed error of that layer (devices: ProtocolError family), nothing else; no impossible
value passed on. Per target it reports inputs run, atheris' coverage counters (cov = edges,
ft = features, corpus size), failures (untyped exceptions, implausible values, with where they
came from), and hangs (an input that took more than 1 s of CPU). Rates are given per wall second
and per CPU second of the worker: on a shared box (a niced run among busy neighbours) the wall
rate says more about the neighbours, the CPU rate is the target's, and the table gives the CPU
seconds a target still needs to reach --inputs at that rate.

A target runs in worker sessions of at most --session-inputs (a fresh process each: a worker's
memory grows under atheris), each going on from the corpus the earlier ones left. With --resume
a run also goes on from the sessions already in the work dir, so several runs (or a run stopped
and started again) add up to --inputs per target, reported as one table.

Corpora and findings (failing inputs, hangs, libFuzzer's log) go under --work-dir (default
.fuzz/ in the checkout, gitignored); the parsers themselves run in a temporary directory.
The goal is 1M inputs per target; --max-seconds caps a heavy target at what fits. With --json
the last line is one object: {"targets": [...], ...}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fuzz_targets import REPO, Implausible, Target, all_targets

log = logging.getLogger("bench.fuzz")

HANG_CPU_S = 1.0  # an input costing more CPU than this is a hang (CPU, not wall: the box is shared)
HARD_TIMEOUT_S = 300  # libFuzzer kills an input stuck this long (wall): an endless loop
RSS_LIMIT_MB = 2048
SESSION_INPUTS = 250_000  # inputs per worker process at most (see run_all)
EXAMPLES_PER_SIGNATURE = 3
OUR_PACKAGES = ["devices", "uploader", "firmware_bridge", "lastmile"]
COVERAGE_LINE = re.compile(rb"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")


@dataclass
class Finding:
    kind: str  # "untyped" | "implausible" | "hang"
    signature: str  # exception type and where it was raised (or "hang")
    message: str
    count: int = 0
    examples: list[str] = field(default_factory=list)  # saved inputs, relative to the work dir


@dataclass
class TargetReport:
    target: str
    what: str
    status: str = "ok"  # ok | failures | aborted | skipped | not run
    inputs: int = 0
    sessions: int = 0  # worker runs these figures add up (--resume)
    seconds: float = 0.0  # wall
    cpu_seconds: float = 0.0
    exec_per_s: float = 0.0
    exec_per_cpu_s: float = 0.0
    cpu_s_to_goal: float = 0.0  # CPU seconds still needed for --inputs, at this target's rate
    cov: int = 0  # atheris/libFuzzer coverage counters: edges
    ft: int = 0  # features
    corpus: int = 0
    seeds: int = 0
    untyped: int = 0
    implausible: int = 0
    hangs: int = 0
    max_input_cpu_s: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    note: str = ""

    @property
    def failures(self) -> int:
        return self.untyped + self.implausible


# -- the worker: one target in its own process under atheris -----------------------------------------


def where_raised(exc: BaseException) -> str:
    """The innermost frame in our code (not the harness), as path:line, for grouping failures."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename.startswith(str(REPO)) and "/bench/" not in f.filename and "/.venv/" not in f.filename
    ]
    if not frames:
        frames = traceback.extract_tb(exc.__traceback__)[-1:]
    if not frames:
        return "?"
    last = frames[-1]
    return f"{os.path.relpath(last.filename, REPO)}:{last.lineno}"


class Worker:
    def __init__(self, target: Target, work_dir: Path, inputs: int, max_seconds: float | None) -> None:
        self.target = target
        self.findings_dir = work_dir / "findings" / target.name
        self.stats_path = self.findings_dir / "stats.json"
        self.inputs_limit = inputs
        self.deadline = time.monotonic() + max_seconds if max_seconds else None
        self.started = time.monotonic()
        self.cpu_started = time.process_time()
        self.inputs = 0
        self.max_cpu = 0.0
        self.findings: dict[str, Finding] = {}
        self.last_write = 0.0

    def one_input(self, data: bytes) -> None:
        self.inputs += 1
        t0 = time.process_time()
        try:
            self.target.run(data)
        except self.target.typed:
            pass
        except Implausible as exc:
            # grouped by what was wrong (the numbers stripped), not by the checking line
            what = re.split(r"[='\"(]", str(exc))[0].strip()[:60]
            self.record("implausible", f"Implausible: {what}", str(exc), data)
        except RecursionError as exc:  # a stack's worth of nesting: untyped, but not a unique site
            self.record("untyped", "RecursionError", str(exc), data)
        except Exception as exc:  # noqa: BLE001 — the point: anything untyped is a finding
            self.record("untyped", f"{type(exc).__name__} at {where_raised(exc)}", str(exc), data)
        spent = time.process_time() - t0
        self.max_cpu = max(self.max_cpu, spent)
        if spent > HANG_CPU_S:
            self.record("hang", f"hang > {HANG_CPU_S:g} s CPU", f"{spent:.2f} s CPU for {len(data)} bytes", data)
        now = time.monotonic()
        if self.inputs >= self.inputs_limit or (self.deadline is not None and now >= self.deadline):
            self.write_stats(finished=True)
            sys.stderr.flush()
            os._exit(0)  # libFuzzer would call exit() without Python's clean-up: stop here ourselves
        if now - self.last_write > 5:
            self.write_stats(finished=False)

    def record(self, kind: str, signature: str, message: str, data: bytes) -> None:
        finding = self.findings.setdefault(signature, Finding(kind, signature, message[:300]))
        finding.count += 1
        if len(finding.examples) < EXAMPLES_PER_SIGNATURE:
            name = f"{kind}-{hashlib.sha1(signature.encode()).hexdigest()[:8]}-{hashlib.sha1(data).hexdigest()[:12]}"
            (self.findings_dir / name).write_bytes(data)
            finding.examples.append(f"findings/{self.target.name}/{name}")
            self.write_stats(finished=False)

    def write_stats(self, finished: bool) -> None:
        self.last_write = time.monotonic()
        stats = {
            "inputs": self.inputs,
            "seconds": round(time.monotonic() - self.started, 3),
            # CPU, not wall: on a shared box the wall rate says more about the neighbours
            "cpu_seconds": round(time.process_time() - self.cpu_started, 3),
            "max_input_cpu_s": round(self.max_cpu, 3),
            "finished": finished,
            "findings": [asdict(f) for f in self.findings.values()],
        }
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        tmp.replace(self.stats_path)


def run_worker(name: str, work_dir: Path, inputs: int, max_seconds: float | None, seed: int) -> None:
    import atheris

    warnings.simplefilter("ignore")  # pydicom warns on every malformed element: noise at 10k/s
    logging.disable(logging.CRITICAL)  # handlers log each refused input
    corpus = work_dir / "corpus" / name
    with atheris.instrument_imports(include=OUR_PACKAGES):
        target = all_targets()[name]
        # the decoders import lazily: run the corpus once here, so they load instrumented
        for path in sorted(corpus.iterdir())[:200]:
            try:
                target.run(path.read_bytes())
            except Exception:  # noqa: BLE001 — only the imports matter in this pass
                pass
    worker = Worker(target, work_dir, inputs, max_seconds)
    worker.findings_dir.mkdir(parents=True, exist_ok=True)
    worker.write_stats(finished=False)
    args = [
        sys.argv[0],
        f"-seed={seed}",
        f"-max_len={target.max_len}",
        f"-timeout={HARD_TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        "-use_value_profile=1",
        "-print_final_stats=1",
        f"-artifact_prefix={worker.findings_dir}/",
        str(corpus),
    ]
    # nothing a parser might write lands in the checkout. In the run's own folder, not a
    # TemporaryDirectory: the worker ends by os._exit (or libFuzzer's exit), which never removed one
    scratch = work_dir / "scratch" / name
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    os.chdir(scratch)
    atheris.Setup(args, worker.one_input)
    atheris.Fuzz()


# -- the driver: seeds, one process per target, the table ------------------------------------------


def prepare_corpus(target: Target, work_dir: Path) -> int:
    corpus = work_dir / "corpus" / target.name
    corpus.mkdir(parents=True, exist_ok=True)
    (work_dir / "findings" / target.name).mkdir(parents=True, exist_ok=True)
    seeds = target.seeds()
    for seed in seeds:
        path = corpus / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}"
        if not path.exists():
            path.write_bytes(seed)
    return len(seeds)


def findings_dir(work_dir: Path, target: Target) -> Path:
    return work_dir / "findings" / target.name


def session_files(work_dir: Path, target: Target) -> list[Path]:
    """Earlier sessions' stats (kept by --resume), oldest first."""
    return sorted(findings_dir(work_dir, target).glob("stats-session-*.json"))


def inputs_done(work_dir: Path, target: Target) -> int:
    """Inputs run on this target so far: earlier sessions and the last one."""
    paths = session_files(work_dir, target) + [findings_dir(work_dir, target) / "stats.json"]
    return sum(json.loads(p.read_text()).get("inputs", 0) for p in paths if p.exists())


def start_target(
    target: Target, work_dir: Path, inputs: int, max_seconds: float | None, seed: int, resume: bool
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start one worker session of `inputs` inputs. With `resume` the last session's stats and
    log are kept as session N; libFuzzer goes on from the corpus directory (every input earlier
    sessions found interesting), so sessions add up."""
    folder = findings_dir(work_dir, target)
    log_path = folder / "libfuzzer.log"
    stats = folder / "stats.json"
    if resume and stats.exists():
        number = len(session_files(work_dir, target)) + 1
        stats.replace(folder / f"stats-session-{number:03d}.json")
        if log_path.exists():
            log_path.replace(folder / f"libfuzzer-session-{number:03d}.log")
    elif not resume:  # a fresh count (the corpus stays: it is what earlier runs found)
        for old in [stats, *session_files(work_dir, target), *folder.glob("libfuzzer-session-*.log")]:
            old.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        target.name,
        "--inputs",
        str(inputs),
        "--seed",
        str(seed),
        "--work-dir",
        str(work_dir),
    ]
    if max_seconds:
        cmd += ["--max-seconds", str(max_seconds)]
    # a fixed hash seed: set and dict orders, so coverage and the mutations it steers, are the same
    # each run; with the same --seed, --inputs and corpus a run replays the same inputs
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, cwd=work_dir, env=env)
    return proc, log_path


def merged_findings(sessions: list[dict[str, Any]]) -> list[Finding]:
    merged: dict[str, Finding] = {}
    for stats in sessions:
        for f in stats.get("findings", []):
            finding = merged.setdefault(f["signature"], Finding(f["kind"], f["signature"], f["message"]))
            finding.count += f["count"]
            finding.examples = (finding.examples + f["examples"])[:EXAMPLES_PER_SIGNATURE]
    return list(merged.values())


def collect(target: Target, work_dir: Path, returncode: int, seeds: int) -> TargetReport:
    """One target's figures over all its sessions (one unless --resume added more)."""
    report = TargetReport(target.name, target.what, seeds=seeds)
    folder = findings_dir(work_dir, target)
    paths = session_files(work_dir, target) + [p for p in [folder / "stats.json"] if p.exists()]
    sessions = [json.loads(p.read_text()) for p in paths]
    last = sessions[-1] if sessions else {}
    report.sessions = len(sessions)
    report.inputs = sum(s.get("inputs", 0) for s in sessions)
    wall = sum(s.get("seconds", 0.0) for s in sessions)
    timed = [s for s in sessions if "cpu_seconds" in s]  # sessions of an older harness have wall time only
    cpu = sum(s["cpu_seconds"] for s in timed)
    report.seconds, report.cpu_seconds = round(wall, 1), round(cpu, 2)
    report.exec_per_s = round(report.inputs / wall) if wall else 0
    report.exec_per_cpu_s = round(sum(s.get("inputs", 0) for s in timed) / cpu) if cpu else 0
    report.max_input_cpu_s = max((s.get("max_input_cpu_s", 0.0) for s in sessions), default=0.0)
    report.findings = merged_findings(sessions)
    # the newest log with a coverage line: libFuzzer re-reads the whole corpus at start, so the
    # last session's figures are those of everything found so far
    logs = sorted(folder.glob("libfuzzer-session-*.log")) + [folder / "libfuzzer.log"]
    libfuzzer_log = b""
    for log_path in reversed(logs):
        libfuzzer_log = log_path.read_bytes() if log_path.exists() else b""
        matches = COVERAGE_LINE.findall(libfuzzer_log)
        if matches:
            _n, cov, ft, corp = matches[-1]
            report.cov, report.ft, report.corpus = int(cov), int(ft), int(corp)
            break
    for f in report.findings:
        if f.kind == "untyped":
            report.untyped += f.count
        elif f.kind == "implausible":
            report.implausible += f.count
        else:
            report.hangs += f.count
    if returncode != 0 or not last.get("finished"):
        # libFuzzer stopped it: an endless input (timeout), memory blow-up (oom) or a crash in C
        artifacts = sorted(
            p.name for p in folder.glob("*") if p.name.startswith(("timeout-", "oom-", "crash-", "slow-unit-"))
        )
        tail = libfuzzer_log.decode(errors="replace").strip().splitlines()[-3:]
        report.status = "aborted" if sessions or returncode else "not run"  # not run: no session here
        if report.status == "aborted":
            report.note = f"worker exit {returncode}; artifacts {artifacts}; {' | '.join(tail)}"[:500]
        if any(a.startswith("timeout-") for a in artifacts):
            report.hangs += 1
    elif report.failures or report.hangs:
        report.status = "failures"
    return report


def run_all(
    targets: list[Target],
    work_dir: Path,
    inputs: int,
    max_seconds: float | None,
    seed: int,
    jobs: int,
    resume: bool = False,
    session_inputs: int = SESSION_INPUTS,
) -> list[TargetReport]:
    """Each target in worker sessions of at most `session_inputs` until it has run `inputs`
    (counting earlier sessions with `resume`), spent `max_seconds` of wall time in this run,
    or failed. A fresh worker per session keeps the worker's memory bounded: under atheris the
    SCP worker grew from 85 MB to 1060 MB in 540k inputs, Contec's by 60 MB in 250k (the same
    decoders run uninstrumented do not grow), which would reach libFuzzer's RSS limit before 1M."""
    reports: dict[str, TargetReport] = {}
    pending = []
    for target in targets:
        if target.skip:
            reports[target.name] = TargetReport(target.name, target.what, status="skipped", note=target.skip)
        else:
            pending.append((target, prepare_corpus(target, work_dir), resume, None))
    # a target's wall-time cap counts from its own first session, not from the start of the run
    running: list[tuple[Target, int, subprocess.Popen[bytes], float]] = []
    while pending or running:
        while pending and len(running) < jobs:
            target, seeds, keep, first_started = pending.pop(0)
            started = time.monotonic() if first_started is None else first_started
            missing = inputs - inputs_done(work_dir, target) if keep else inputs
            left = max_seconds - (time.monotonic() - started) if max_seconds else None
            if missing <= 0 or (left is not None and left <= 0):  # done, or out of time
                reports[target.name] = collect(target, work_dir, 0, seeds)
                print(f"fuzz: {one_line(reports[target.name])}", file=sys.stderr, flush=True)
                continue
            # each session its own seed: the same corpus and seed would replay the same mutations
            session_seed = seed + len(session_files(work_dir, target)) if keep else seed
            proc, _log = start_target(target, work_dir, min(missing, session_inputs), left, session_seed, keep)
            running.append((target, seeds, proc, started))
        time.sleep(0.2)
        for item in list(running):
            target, seeds, proc, started = item
            if proc.poll() is None:
                continue
            running.remove(item)
            report = collect(target, work_dir, proc.returncode, seeds)
            if report.status == "ok" and report.inputs < inputs:  # a session's worth done: the next one
                pending.insert(0, (target, seeds, True, started))
                print(f"fuzz: {one_line(report)} (session {report.sessions})", file=sys.stderr, flush=True)
            else:
                reports[target.name] = report
                print(f"fuzz: {one_line(report)}", file=sys.stderr, flush=True)
    return [reports[t.name] for t in targets]


def table_only(targets: list[Target], work_dir: Path) -> list[TargetReport]:
    """The figures already in the work dir (a run, or several --resume sessions), nothing run."""
    reports = []
    for target in targets:
        if target.skip:
            reports.append(TargetReport(target.name, target.what, status="skipped", note=target.skip))
            continue
        corpus = work_dir / "corpus" / target.name
        seeds = sum(1 for p in corpus.glob("seed-*")) if corpus.is_dir() else 0
        reports.append(collect(target, work_dir, 0, seeds))
    return reports


def one_line(r: TargetReport) -> str:
    if r.status == "skipped":
        return f"{r.target:<18} skipped: {r.note}"
    return (
        f"{r.target:<18} {r.inputs:>9} inputs {r.seconds:>7.0f} s {r.exec_per_s:>6}/s "
        f"{r.exec_per_cpu_s:>6}/CPU s  cov {r.cov:>5} ft {r.ft:>6} corp {r.corpus:>5}  untyped {r.untyped} "
        f"implausible {r.implausible} hangs {r.hangs}  {r.status}"
    )


def print_table(reports: list[TargetReport]) -> None:
    print(
        f"\n{'target':<18} {'inputs':>9} {'sess':>4} {'wall s':>7} {'/s':>6} {'/CPU s':>6} {'cov':>6} {'ft':>7} "
        f"{'corpus':>6} {'untyped':>7} {'implaus.':>8} {'hangs':>5} {'max s':>6}  status"
    )
    for r in reports:
        print(
            f"{r.target:<18} {r.inputs:>9} {r.sessions:>4} {r.seconds:>7.0f} {r.exec_per_s:>6} {r.exec_per_cpu_s:>6} "
            f"{r.cov:>6} {r.ft:>7} {r.corpus:>6} {r.untyped:>7} {r.implausible:>8} {r.hangs:>5} "
            f"{r.max_input_cpu_s:>6.3f}  {r.status}{' (' + r.note + ')' if r.note else ''}"
        )
        for f in r.findings:
            print(f"    {f.kind}: {f.signature} x{f.count}: {f.message[:120]!r} e.g. {f.examples[:1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target (default 1M)")
    parser.add_argument("--target", action="append", default=[], help="a target (repeatable; default all)")
    parser.add_argument("--max-seconds", type=float, default=None, help="cap per target, wall seconds")
    parser.add_argument("--jobs", type=int, default=1, help="targets at once (the box has 2 cores: mind `uptime`)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument("--work-dir", type=Path, default=REPO / ".fuzz", help="corpora and findings")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument(
        "--resume", action="store_true", help="go on from the work dir's earlier sessions: inputs add up to --inputs"
    )
    parser.add_argument("--session-inputs", type=int, default=SESSION_INPUTS, help="inputs per worker process at most")
    parser.add_argument("--table", action="store_true", help="print the work dir's figures, run nothing")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        run_worker(args.worker, args.work_dir.resolve(), args.inputs, args.max_seconds, args.seed)
        return 0
    targets = all_targets()
    if args.list:
        for t in targets.values():
            print(f"{t.name:<18} {t.what}" + (f"  [skipped: {t.skip}]" if t.skip else ""))
        return 0
    unknown = [t for t in args.target if t not in targets]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; --list shows them")
    chosen = [targets[t] for t in args.target] if args.target else list(targets.values())
    work_dir = args.work_dir.resolve()
    if args.table:
        reports = table_only(chosen, work_dir)
    else:
        try:
            import atheris  # noqa: F401
        except ImportError:
            parser.exit(2, "bench/fuzz.py: atheris is not installed (scripts/setup.sh --test installs it)\n")
        reports = run_all(
            chosen, work_dir, args.inputs, args.max_seconds, args.seed, args.jobs, args.resume, args.session_inputs
        )
    for r in reports:  # what is missing, in CPU seconds at the rate seen (wall depends on the neighbours)
        if r.exec_per_cpu_s and r.inputs < args.inputs:
            r.cpu_s_to_goal = round((args.inputs - r.inputs) / r.exec_per_cpu_s)
    print_table(reports)
    short = [f"{r.target} {r.cpu_s_to_goal} CPU s" for r in reports if r.cpu_s_to_goal]
    if short:
        print(f"\nto reach {args.inputs} inputs (at each one's rate per CPU second): {', '.join(short)}")
    if args.json:
        print(
            json.dumps(
                {
                    "inputs_per_target": args.inputs,
                    "max_seconds": args.max_seconds,
                    "work_dir": str(work_dir),
                    "targets": [dict(asdict(r), failures=r.failures) for r in reports],
                }
            )
        )
    bad = [r for r in reports if r.status in ("failures", "aborted")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
