"""Mutation score of the decoders and the pure parts of the uploader: would the tests catch the bug?

    .venv/bin/python bench/mutation.py [--module devices/ecg/scaling.py ...] [--json] [--jobs N]

For every module below, a small AST mutator makes one change at a time, the kind a tired programmer
makes: a flipped comparison (< to <=, == to !=, in to not in), an integer or float constant ±1, `and`
swapped with `or`, an arithmetic or bit operator swapped (+ -, << >>, & |), a deleted `raise`, a negated
`if`/`while`/conditional, a `return` that returns None (or the other bool). Each mutant runs against the
module's focused tests (FOCUSED_TESTS below). A failing test kills it; a mutant every test passes
survived, unless bench/mutation_equivalent.toml argues it is equivalent (no test could tell it apart).
score = killed / (killed + survived); equivalent mutants are left out of both.

Why not mutmut or cosmic-ray: mutmut 3 copies the tree into mutants/ and first runs the whole suite
(real Orthanc, dcmtk, bumble) to map tests; cosmic-ray starts a fresh interpreter per mutant (numpy,
pydicom, pynetdicom, fhir.resources are ~2 s of imports on a Pi-class core). This runner is cheap
enough to run on two shared cores:
- one parent process imports the third-party libraries once and forks a child per mutant; the child
  installs an import hook that serves the mutated module (compiled from the changed AST, so line
  numbers stay true), then runs pytest in-process with `-x`;
- a baseline run (unmutated) records which focused tests execute which lines of the module; a mutant
  runs only the tests that execute its lines, fastest first. A mutant on a line no focused test
  executes is counted as survived ("not covered"), without running: that is the point of the score.
- hypothesis runs derandomized with no example database, no deadline and no health checks, so a
  score does not depend on the machine's load or on a previous run.
Messages are not mutated: constants inside a `raise` statement's exception or a logging call only
change the text a person reads.

With --json the last line maps each module to its score (percent, one decimal).
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOW_LIST = REPO / "bench" / "mutation_equivalent.toml"

# Module -> the test files that state what it must do (only pure tests: no peers, no processes).
FOCUSED_TESTS: dict[str, list[str]] = {
    "devices/errors.py": ["tests/test_ble_decoders.py", "tests/test_bridge_codec.py"],
    "devices/identity.py": ["tests/test_patient_identity.py", "tests/test_ascii_report.py",
                            "tests/test_ecg_scp.py", "tests/test_ecg_aecg.py", "tests/test_dicom_ecg.py"],
    "devices/observation.py": ["tests/test_device_observation.py", "tests/test_ble_decoders.py",
                               "tests/test_ascii_report.py"],
    "devices/ascii_report.py": ["tests/test_ascii_report.py"],
    "devices/scanner.py": ["tests/test_scanner.py"],
    "devices/ble/blood_pressure.py": ["tests/test_ble_decoders.py", "tests/test_ble_protocol.py"],
    "devices/ble/clock.py": ["tests/test_ble_protocol.py"],
    "devices/ble/current_time.py": ["tests/test_ble_decoders.py"],
    "devices/ble/device_information.py": ["tests/test_ble_decoders.py"],
    "devices/ble/glucose.py": ["tests/test_ble_decoders.py", "tests/test_ble_protocol.py"],
    "devices/ble/measurement.py": ["tests/test_ble_protocol.py", "tests/test_ble_decoders.py"],
    "devices/ble/payload.py": ["tests/test_ble_decoders.py"],
    "devices/ble/pulse_oximeter.py": ["tests/test_ble_decoders.py"],
    "devices/ble/racp.py": ["tests/test_ble_protocol.py"],
    "devices/ble/registry.py": ["tests/test_ble_decoders.py", "tests/test_ble_protocol.py"],
    "devices/ble/sfloat.py": ["tests/test_ble_decoders.py"],
    "devices/ble/thermometer.py": ["tests/test_ble_decoders.py"],
    "devices/ble/uuids.py": ["tests/test_ble_decoders.py", "tests/test_ble_protocol.py"],
    "devices/ble/weight.py": ["tests/test_ble_decoders.py"],
    "devices/bridge/cobs.py": ["tests/test_bridge_codec.py"],
    "devices/bridge/codec.py": ["tests/test_bridge_codec.py", "tests/test_bridge_ecg_stream.py"],
    "devices/bridge/crc.py": ["tests/test_bridge_codec.py"],
    "devices/bridge/ecg_stream.py": ["tests/test_bridge_ecg_stream.py"],
    "devices/bridge/protocol.py": ["tests/test_bridge_codec.py"],
    "devices/bridge/session.py": ["tests/test_bridge_codec.py", "tests/test_bridge_ecg_stream.py"],
    "devices/ecg/aecg.py": ["tests/test_ecg_aecg.py"],
    "devices/ecg/contec.py": ["tests/test_ecg_contec.py"],
    "devices/ecg/dicom_input.py": ["tests/test_ecg_dicom_input.py"],
    "devices/ecg/formats.py": ["tests/test_ecg_formats.py"],
    "devices/ecg/leads.py": ["tests/test_ecg_formats.py", "tests/test_ecg_scp.py"],
    "devices/ecg/npz.py": ["tests/test_npz.py"],
    "devices/ecg/recording.py": ["tests/test_ecg_recording.py", "tests/test_npz.py",
                                 "tests/test_dicom_ecg.py"],
    "devices/ecg/scaling.py": ["tests/test_ecg_scaling.py", "tests/test_ecg_aecg.py",
                               "tests/test_ecg_dicom_input.py"],
    "devices/ecg/scp.py": ["tests/test_ecg_scp.py"],
    "devices/gps/dop.py": ["tests/test_gps_dop.py", "tests/test_gps_nmea.py"],
    "devices/gps/fix.py": ["tests/test_gps_nmea.py"],
    "devices/gps/nmea.py": ["tests/test_gps_nmea.py"],
    "devices/gps/stream.py": ["tests/test_gps_nmea.py"],
    "uploader/dicom_ecg.py": ["tests/test_dicom_ecg.py"],
    "uploader/fhir_bundle.py": ["tests/test_fhir_bundle.py"],
    "uploader/outbox.py": ["tests/test_outbox.py"],
}

# Imported once in the parent so that each forked child starts warm. None of them imports ours.
WARM_IMPORTS = ["numpy", "pydicom", "pydicom.dataset", "pynetdicom", "hypothesis", "pytest",
                "sqlite_utils", "defusedxml.ElementTree", "fhir.resources", "requests", "cryptography"]

COMPARE_SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}
BINOP_SWAPS: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv, ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr, ast.Pow: ast.Mult,
}
SYMBOL: dict[type, str] = {
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is",
    ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
    ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&",
    ast.BitOr: "|", ast.BitXor: "^", ast.Pow: "**", ast.And: "and", ast.Or: "or",
}
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # position of the node in ast.walk order (the same in every fresh parse)
    kind: str  # compare | boolop | binop | const | bool | negate | raise | return
    detail: int | float | None  # which op / which new constant
    mutant_id: str  # stable across edits elsewhere in the file: qualname, snippet, change, occurrence
    lineno: int
    span: tuple[int, int]  # lines whose execution means a test reached the mutant
    at_import: bool  # runs when the module is imported (module or class body, defaults, decorators)


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | equivalent | not covered
    by: str = ""  # the test that killed it, or "timeout"
    argued: str = ""  # the allow-list's argument


@dataclass
class ModuleReport:
    module: str
    outcomes: list[Outcome] = field(default_factory=list)
    stale_equivalents: list[str] = field(default_factory=list)
    error: str = ""

    def count(self, *statuses: str) -> int:
        return sum(o.status in statuses for o in self.outcomes)

    @property
    def score(self) -> float:
        killed, survived = self.count("killed"), self.count("survived", "not covered")
        return 100.0 * killed / (killed + survived) if killed + survived else 100.0


# -- generating mutants ---------------------------------------------------------------------------

def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _message_only(tree: ast.AST) -> set[ast.AST]:
    """Nodes that only shape a message or an annotation: a raise's exception, a logging call."""
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        roots: list[ast.AST | None] = []
        if isinstance(node, ast.Raise):
            roots = [node.exc, node.cause]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in LOG_METHODS and isinstance(node.func.value, ast.Name)
              and node.func.value.id in {"log", "logger", "LOG", "_log"}):
            roots = [node]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            roots = [node.returns] + [a.annotation for a in ast.walk(node.args) if isinstance(a, ast.arg)]
        elif isinstance(node, ast.AnnAssign):
            roots = [node.annotation]
        elif isinstance(node, ast.Assert):
            roots = [node.msg]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            roots += node.decorator_list  # @dataclass(frozen=True, slots=True) is not logic
        for root in roots:
            if root is not None:
                skipped.update(ast.walk(root))
    return skipped


def _qualnames(tree: ast.AST) -> dict[ast.AST, str]:
    names: dict[ast.AST, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}" if prefix else child.name
            names[child] = name or "<module>"
            visit(child, name)

    visit(tree, "")
    return names


def _enclosing_statement(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.AST:
    while not isinstance(node, ast.stmt) and node in parents:
        node = parents[node]
    return node


def _snippet(source: str, node: ast.AST, limit: int = 70) -> str:
    text = " ".join((ast.get_source_segment(source, node) or ast.unparse(node)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _changes(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> Iterator[tuple[str, int | float | None, str]]:
    """(kind, detail, human description) for every mutation of this node."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in COMPARE_SWAPS:
                yield "compare", i, f"{SYMBOL[type(op)]} -> {SYMBOL[COMPARE_SWAPS[type(op)]]}"
    elif isinstance(node, ast.BoolOp):
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        yield "boolop", None, f"{SYMBOL[type(node.op)]} -> {SYMBOL[other]}"
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP_SWAPS:
        yield "binop", None, f"{SYMBOL[type(node.op)]} -> {SYMBOL[BINOP_SWAPS[type(node.op)]]}"
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        yield "bool", None, f"{node.value} -> {not node.value}"
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        for delta in (1, -1):
            yield "const", delta, f"{node.value!r} -> {node.value + delta!r}"
    elif isinstance(node, (ast.If, ast.While, ast.IfExp)):
        yield "negate", None, "condition negated"
    elif isinstance(node, ast.Raise):
        yield "raise", None, "raise deleted"
    elif isinstance(node, ast.Return) and node.value is not None:
        value = node.value
        if not (isinstance(value, ast.Constant) and (value.value is None or type(value.value) is bool)):
            yield "return", None, "returns None"


def generate_mutants(module: str, source: str) -> list[Mutant]:
    tree = ast.parse(source)
    parents, skipped, qualnames = _parents(tree), _message_only(tree), _qualnames(tree)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    mutants: list[Mutant] = []
    seen: dict[str, int] = {}
    for index, node in enumerate(ast.walk(tree)):
        if node in skipped or id(node) in docstrings or _is_future_or_typing(node, parents):
            continue
        for kind, detail, description in _changes(node, parents):
            shown = node.test if isinstance(node, (ast.If, ast.While)) else node
            base = f"{qualnames.get(node, '<module>')}: `{_snippet(source, shown)}` {description}"
            seen[base] = seen.get(base, 0) + 1
            mutant_id = base if seen[base] == 1 else f"{base} #{seen[base]}"
            statement = _enclosing_statement(node, parents)
            end = shown.end_lineno if shown is not node or not isinstance(node, ast.stmt) else node.end_lineno
            span = (statement.lineno, max(statement.lineno, end or node.lineno))
            mutants.append(Mutant(module, index, kind, detail, mutant_id, node.lineno, span,
                                  not _in_function_body(node, parents)))
    return mutants


def _in_function_body(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        parent = parents[node]
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(s is node for s in parent.body):
            return True
        if isinstance(parent, ast.Lambda) and parent.body is node:
            return True
        node = parent
    return False


def _is_future_or_typing(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
            return True
    return False


def mutated_code(path: Path, source: str, mutant: Mutant):
    tree = ast.parse(source)
    node = next(n for i, n in enumerate(ast.walk(tree)) if i == mutant.index)
    if mutant.kind == "compare":
        node.ops[mutant.detail] = COMPARE_SWAPS[type(node.ops[mutant.detail])]()
    elif mutant.kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif mutant.kind == "binop":
        node.op = BINOP_SWAPS[type(node.op)]()
    elif mutant.kind == "bool":
        node.value = not node.value
    elif mutant.kind == "const":
        node.value = node.value + mutant.detail
    elif mutant.kind == "negate":
        node.test = ast.copy_location(ast.UnaryOp(ast.Not(), node.test), node.test)
    elif mutant.kind == "return":
        node.value = ast.copy_location(ast.Constant(None), node.value)
    elif mutant.kind == "raise":
        parent = _parents(tree)[node]
        for name, value in ast.iter_fields(parent):
            if isinstance(value, list) and any(v is node for v in value):
                value[[id(v) for v in value].index(id(node))] = ast.copy_location(ast.Pass(), node)
    ast.fix_missing_locations(tree)
    return compile(tree, str(path), "exec", dont_inherit=True)


# -- running tests in forked children -------------------------------------------------------------

class MutantFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the mutated module's code object in place of the file on disk."""

    def __init__(self, name: str, path: Path, code) -> None:
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        spec = importlib.util.spec_from_file_location(fullname, self.path, loader=self)
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        exec(self.code, module.__dict__)


class TestSelection:
    """pytest plugin: keep only the chosen tests (in the given order), note the first failure."""

    def __init__(self, order: list[str] | None) -> None:
        self.order = order
        self.first_failure = ""

    def pytest_collection_modifyitems(self, session, config, items) -> None:
        if self.order is None:
            return
        rank = {nodeid: i for i, nodeid in enumerate(self.order)}
        kept = sorted((item for item in items if item.nodeid in rank), key=lambda item: rank[item.nodeid])
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in rank])
        items[:] = kept

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and not self.first_failure:
            self.first_failure = report.nodeid


class LineRecorder:
    """pytest plugin for the baseline: which test executes which lines of the module, how long it takes."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.current = "<collect>"
        self.lines: dict[str, set[int]] = {}
        self.durations: dict[str, float] = {}

    def trace(self, frame, event, arg):
        if frame.f_code.co_filename != self.filename:
            return None
        self.lines.setdefault(self.current, set()).add(frame.f_lineno)
        return self._local

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines.setdefault(self.current, set()).add(frame.f_lineno)
        return self._local

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        started = time.perf_counter()
        yield
        self.durations[item.nodeid] = time.perf_counter() - started
        self.current = "<between>"


def _pytest_args(test_files: list[str]) -> list[str]:
    return [*test_files, "-x", "-q", "--no-header", "-p", "no:cacheprovider", "-p", "no:xdist",
            "-p", "no:randomly", "-o", "addopts=", "--timeout=0", "-W", "ignore"]


def _child_setup() -> None:
    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.chdir(REPO)
    from hypothesis import HealthCheck, settings

    # Same examples every run, no database of earlier failures, nothing that depends on load.
    settings.register_profile("mutation", derandomize=True, database=None, deadline=None,
                              suppress_health_check=list(HealthCheck), print_blob=False)
    settings.load_profile("mutation")


def fork_pytest(test_files: list[str], result_path: str, *, finder: MutantFinder | None = None,
                order: list[str] | None = None, recorder_for: str | None = None) -> int:
    """Fork a child that runs pytest and writes its result as JSON to result_path; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        _child_setup()
        import pytest

        if finder is not None:
            sys.meta_path.insert(0, finder)
        selection = TestSelection(order)
        plugins: list[object] = [selection]
        recorder = None
        if recorder_for is not None:
            recorder = LineRecorder(recorder_for)
            plugins.append(recorder)
            sys.settrace(recorder.trace)
            import threading
            threading.settrace(recorder.trace)
        exit_code = int(pytest.main(_pytest_args(test_files), plugins=plugins))
        sys.settrace(None)
        result: dict[str, object] = {"exit": exit_code, "first_failure": selection.first_failure}
        if recorder is not None:
            result["lines"] = {k: sorted(v) for k, v in recorder.lines.items()}
            result["durations"] = recorder.durations
        Path(result_path).write_text(json.dumps(result))
        code = 0
    finally:
        os._exit(code)


def wait_child(pid: int, timeout_s: float) -> bool:
    """True if the child ended in time; otherwise kill its process group and return False."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
        time.sleep(0.01)
    with _ignore_missing():
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


class _ignore_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is ProcessLookupError


# -- one module -----------------------------------------------------------------------------------

def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def load_allow_list() -> dict[str, dict[str, str]]:
    if not ALLOW_LIST.exists():
        return {}
    return tomllib.loads(ALLOW_LIST.read_text())


def run_module(module: str, allowed: dict[str, str], jobs: int, workdir: Path,
               progress: Callable[[str], None]) -> ModuleReport:
    report = ModuleReport(module)
    path = REPO / module
    source = path.read_text()
    tests = [t for t in FOCUSED_TESTS[module] if (REPO / t).exists()]
    if not tests:
        report.error = "no focused test file exists"
        return report
    baseline_path = str(workdir / "baseline.json")
    started = time.monotonic()
    pid = fork_pytest(tests, baseline_path, recorder_for=str(path))
    if not wait_child(pid, 1800) or not Path(baseline_path).exists():
        report.error = "baseline run did not finish"
        return report
    baseline = json.loads(Path(baseline_path).read_text())
    if baseline["exit"] != 0:
        report.error = f"the focused tests fail without any mutation (first: {baseline['first_failure']})"
        return report
    collect_s = max(0.0, time.monotonic() - started - sum(baseline["durations"].values()))
    lines = {k: set(v) for k, v in baseline["lines"].items()}
    durations: dict[str, float] = baseline["durations"]
    by_speed = sorted(durations, key=durations.__getitem__)

    mutants = generate_mutants(module, source)
    ids = {m.mutant_id for m in mutants}
    report.stale_equivalents = sorted(set(allowed) - ids)
    pending: list[tuple[Mutant, list[str]]] = []
    for mutant in mutants:
        span = set(range(mutant.span[0], mutant.span[1] + 1))
        if mutant.at_import:
            order = by_speed  # module-level code: any test may depend on it
        else:
            order = [t for t in by_speed if span & lines.get(t, set())]
        if not order:
            report.outcomes.append(Outcome(mutant, "not covered", argued=allowed.get(mutant.mutant_id, "")))
        else:
            pending.append((mutant, order))

    running: dict[int, tuple[Mutant, str, float]] = {}
    serial = 0

    def reap(pid: int, status: int) -> None:
        mutant, result_path, _deadline = running.pop(pid)
        by = ""
        if Path(result_path).exists():
            result = json.loads(Path(result_path).read_text())
            killed = result["exit"] != 0
            by = result["first_failure"] or f"pytest exit {result['exit']}"
            Path(result_path).unlink()
        else:
            killed, by = True, f"child died (status {status})"
        argued = allowed.get(mutant.mutant_id, "")
        status_name = "killed" if killed else ("equivalent" if argued else "survived")
        report.outcomes.append(Outcome(mutant, status_name, by if killed else "", argued))

    queue = list(pending)
    while queue or running:
        while queue and len(running) < jobs:
            mutant, order = queue.pop(0)
            serial += 1
            result_path = str(workdir / f"mutant-{serial}.json")
            code = mutated_code(path, source, mutant)
            pid = fork_pytest(tests, result_path, finder=MutantFinder(module_name(module), path, code),
                              order=order)
            budget = 20.0 + collect_s * 3 + 4 * sum(durations[t] for t in order)
            running[pid] = (mutant, result_path, time.monotonic() + budget)
        time.sleep(0.01)
        for pid, (mutant, result_path, deadline) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reap(pid, status)
            elif time.monotonic() > deadline:
                with _ignore_missing():
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                running.pop(pid)
                report.outcomes.append(Outcome(mutant, "killed", "timeout"))
        progress(f"\r{module}: {len(report.outcomes)}/{len(mutants)} mutants")
    progress("\n")
    report.outcomes.sort(key=lambda o: (o.mutant.lineno, o.mutant.index, o.mutant.mutant_id))
    return report


def print_report(report: ModuleReport, show_killed: bool) -> None:
    if report.error:
        print(f"{report.module}: ERROR {report.error}")
        return
    print(f"{report.module}: {report.score:5.1f} %  killed {report.count('killed')}  "
          f"survived {report.count('survived', 'not covered')} "
          f"(not covered {report.count('not covered')})  equivalent {report.count('equivalent')}")
    for outcome in report.outcomes:
        if outcome.status in ("survived", "not covered"):
            note = "  [not covered]" if outcome.status == "not covered" else ""
            if outcome.argued:
                note += "  [allow-listed, but not covered: not counted as equivalent]"
            print(f"  survived {report.module}:{outcome.mutant.lineno}  {json.dumps(outcome.mutant.mutant_id, ensure_ascii=False)}{note}")
        elif show_killed and outcome.status == "killed":
            print(f"  killed   {report.module}:{outcome.mutant.lineno}  {outcome.mutant.mutant_id}  by {outcome.by}")
    for stale in report.stale_equivalents:
        print(f"  stale allow-list entry (no such mutant): {json.dumps(stale, ensure_ascii=False)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", action="append", help="a module path such as devices/ecg/scaling.py "
                        "(repeatable; default: every module)")
    parser.add_argument("--json", action="store_true", help="last line: {module: score}")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1: shared cores)")
    parser.add_argument("--killed", action="store_true", help="also list killed mutants and their killer")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    args = parser.parse_args(argv)
    modules = args.module or list(FOCUSED_TESTS)
    unknown = [m for m in modules if m not in FOCUSED_TESTS]
    if unknown:
        parser.error(f"no focused tests mapped for {unknown}; known: {', '.join(FOCUSED_TESTS)}")
    if args.list:
        for module in modules:
            for mutant in generate_mutants(module, (REPO / module).read_text()):
                print(f"{module}:{mutant.lineno}  {mutant.mutant_id}")
        return 0
    sys.path.insert(0, str(REPO))
    for name in WARM_IMPORTS:
        try:
            __import__(name)
        except ImportError:
            pass
    assert not any(m.split(".")[0] in {"devices", "uploader", "lastmile", "firmware_bridge", "tests"}
                   for m in sys.modules), "a warm import pulled in our own code: mutants would not load"
    allow_list = load_allow_list()
    scores: dict[str, float | None] = {}
    failed = False
    progress = (lambda s: None) if not sys.stderr.isatty() else (lambda s: print(s, end="", file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        for module in modules:
            started = time.monotonic()
            report = run_module(module, allow_list.get(module, {}), args.jobs, Path(tmp), progress)
            print_report(report, args.killed)
            print(f"  ({len(report.outcomes)} mutants in {time.monotonic() - started:.0f} s)", flush=True)
            scores[module] = None if report.error else round(report.score, 1)
            failed |= bool(report.error)
    if args.json:
        print(json.dumps(scores))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
