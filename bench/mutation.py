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
  score does not depend on the machine's load or on a previous run; at most --max-examples
  (default 50) examples per property test, which can only lower a score.
Messages are not mutated: constants inside a `raise` statement's exception or a logging call only
change the text a person reads; nor are `assert` statements (type narrowing, stripped by -O),
decorators and annotations.

With --json the last line maps each module to its score (percent, one decimal).
"""

from __future__ import annotations

import argparse
import ast
import collections
import ctypes
import functools
import importlib.abc
import importlib.util
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from types import CodeType, FunctionType, ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOW_LIST = REPO / "bench" / "mutation_equivalent.toml"

# Module -> the test files that state what it must do (only pure tests: no peers, no processes);
# an entry "--deselect=<test id>" leaves out one slow test of a file (pytest's own option).
FOCUSED_TESTS: dict[str, list[str]] = {
    "devices/errors.py": ["tests/test_ble_decoders.py", "tests/test_bridge_codec.py"],
    "devices/identity.py": [
        "tests/test_device_identity.py",
        "tests/test_resident_id.py",
        "tests/test_ascii_report.py",
    ],
    "devices/observation.py": [
        "tests/test_device_identity.py",
        "tests/test_ble_decoders.py",
        "tests/test_ascii_report.py",
        "tests/test_plausibility.py",
    ],
    "devices/ascii_report.py": ["tests/test_ascii_report.py"],
    "devices/inflate.py": ["tests/test_inflate.py"],
    "devices/plausibility.py": ["tests/test_plausibility.py", "tests/test_ble_decoders.py"],
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
    "devices/bridge/codec.py": [
        "tests/test_bridge_codec.py",
        "tests/test_bridge_codec_mutants.py",
        "tests/test_bridge_ecg_stream.py",
    ],
    "devices/bridge/crc.py": ["tests/test_bridge_codec.py"],
    "devices/bridge/ecg_stream.py": ["tests/test_bridge_ecg_stream.py"],
    "devices/bridge/protocol.py": ["tests/test_bridge_protocol.py", "tests/test_bridge_codec.py"],
    "devices/bridge/session.py": [
        "tests/test_bridge_session.py",
        "tests/test_bridge_codec.py",
        "tests/test_bridge_ecg_stream.py",
    ],
    "devices/ecg/aecg.py": ["tests/test_ecg_aecg.py", "tests/test_ecg_findings.py"],
    "devices/ecg/contec.py": ["tests/test_ecg_contec.py", "tests/test_ecg_formats.py"],
    "devices/ecg/dicom_input.py": [
        "tests/test_ecg_dicom_rules.py",
        "tests/test_ecg_dicom_input.py",
        "tests/test_ecg_findings.py",  # the cart's annotations: measurements, statements, median beats
        "tests/test_inflate.py",  # deflated objects and the inflation cap
    ],
    "devices/ecg/findings.py": ["tests/test_ecg_findings_mutants.py"],
    "devices/ecg/formats.py": ["tests/test_ecg_formats.py"],
    "devices/ecg/leads.py": ["tests/test_ecg_leads.py", "tests/test_ecg_formats.py"],
    "devices/ecg/median_beat.py": ["tests/test_ecg_beats_mutants.py"],
    "devices/ecg/npz.py": ["tests/test_npz.py"],
    "devices/ecg/order_statistics.py": [
        "tests/test_order_statistics.py",
        # a child process (what a fresh `lastmile` imports): it never sees the mutant
        "--deselect=tests/test_order_statistics.py::test_checking_a_real_ecgs_quality_leaves_numpy_ma_unimported",
    ],
    "devices/ecg/qrs.py": ["tests/test_ecg_beats_mutants.py", "tests/test_ecg_tall_beats.py"],
    "devices/ecg/quality.py": ["tests/test_ecg_quality_mutants.py", "tests/test_ecg_tall_beats.py"],
    "devices/ecg/quality_wording.py": ["tests/test_ecg_quality_mutants.py"],
    "devices/ecg/recording.py": ["tests/test_ecg_recording.py", "tests/test_npz.py"],
    "devices/ecg/scaling.py": ["tests/test_ecg_scaling.py", "tests/test_ecg_aecg.py", "tests/test_ecg_dicom_input.py"],
    "devices/ecg/scp.py": ["tests/test_ecg_scp.py", "tests/test_ecg_scp_mutants.py", "tests/test_ecg_findings.py"],
    "devices/gps/dop.py": ["tests/test_gps_dop.py", "tests/test_gps_nmea.py"],
    "devices/gps/fix.py": ["tests/test_gps_fix.py", "tests/test_gps_nmea.py"],
    "devices/gps/nmea.py": ["tests/test_gps_sentences.py", "tests/test_gps_nmea.py"],
    "devices/gps/stream.py": ["tests/test_gps_nmea.py", "tests/test_gps_fix.py"],
    "uploader/dicom_ecg.py": [
        "tests/test_dicom_ecg.py",
        "tests/test_dicom_ecg_mutants.py",
        "tests/test_ecg_findings.py",
    ],
    "uploader/fhir_bundle.py": ["tests/test_fhir_bundle.py"],
    "uploader/outbox.py": [
        "tests/test_outbox.py",
        "tests/test_outbox_mutants.py",
        # Several processes racing or killed at random moments (18 s of the file's 20, paid again by
        # every surviving mutant): what they check is also checked in one process, by the threads
        # and interrupted-send tests. The suite still runs them.
        "--deselect=tests/test_outbox.py::test_sigkill_at_random_moments_leaves_a_consistent_outbox",
        "--deselect=tests/test_outbox.py::test_two_processes_never_claim_the_same_item_while_a_third_adds",
        "--deselect=tests/test_outbox.py::test_processes_opening_a_new_outbox_at_once_migrate_it_once",
    ],
    "uploader/report_lines.py": ["tests/test_report_lines.py"],
}

# Imported once in the parent so that each forked child starts warm. None of them imports ours.
WARM_IMPORTS = [
    "numpy",
    "pydicom",
    "pydicom.dataset",
    "pynetdicom",
    "hypothesis",
    "pytest",
    "sqlite_utils",
    "defusedxml.ElementTree",
    "fhir.resources",
    "requests",
    "cryptography",
]

COMPARE_SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
BINOP_SWAPS: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.BitXor: ast.BitOr,
    ast.Pow: ast.Mult,
}
SYMBOL: dict[type, str] = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.Pow: "**",
    ast.And: "and",
    ast.Or: "or",
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
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LOG_METHODS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in {"log", "logger", "LOG", "_log"}
        ):
            roots = [node]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            roots = [node.returns] + [a.annotation for a in ast.walk(node.args) if isinstance(a, ast.arg)]
        elif isinstance(node, ast.AnnAssign):
            roots = [node.annotation]
        elif isinstance(node, ast.Assert):
            roots = [node]  # type narrowing for mypy, stripped by python -O: not behaviour
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
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    mutants: list[Mutant] = []
    seen: dict[str, int] = {}
    for index, node in enumerate(ast.walk(tree)):
        if node in skipped or id(node) in docstrings or _is_future_or_typing(node, parents):
            continue
        for kind, detail, description in _changes(node, parents):
            shown = node.test if isinstance(node, (ast.If, ast.While)) else node
            if isinstance(node, ast.Constant) and isinstance(parents.get(node), ast.expr):
                shown = parents[node]  # `s == 0`: 0 -> 1 says more than `0`: 0 -> 1
            base = f"{qualnames.get(node, '<module>')}: `{_snippet(source, shown)}` {description}"
            seen[base] = seen.get(base, 0) + 1
            mutant_id = base if seen[base] == 1 else f"{base} #{seen[base]}"
            statement = _enclosing_statement(node, parents)
            end = node.test.end_lineno if isinstance(node, (ast.If, ast.While)) else node.end_lineno
            span = (statement.lineno, max(statement.lineno, end or node.lineno))
            mutants.append(
                Mutant(module, index, kind, detail, mutant_id, node.lineno, span, not _in_function_body(node, parents))
            )
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


def mutated_code(path: Path, source: str, mutant: Mutant) -> CodeType:
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
        for _name, value in ast.iter_fields(parent):
            if isinstance(value, list) and any(v is node for v in value):
                value[[id(v) for v in value].index(id(node))] = ast.copy_location(ast.Pass(), node)
    ast.fix_missing_locations(tree)
    return compile(tree, str(path), "exec", dont_inherit=True)


# -- running tests in forked children -------------------------------------------------------------
#
# Fast path: a "zygote" child imports the module and collects the focused tests once, then forks one
# grandchild per mutant. The grandchild swaps the mutated function's code object into the live
# function objects (so `from module import f` copies elsewhere see the mutant too) and runs the chosen
# tests. Slow path, for code that runs at import (module tables, class bodies, defaults): a fresh
# child with an import hook that serves the whole mutated module, then pytest collects as usual.


class MutantFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the mutated module's code object in place of the file on disk."""

    def __init__(self, name: str, path: Path, code: CodeType) -> None:
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(fullname, self.path, loader=self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        exec(self.code, module.__dict__)


def _code_objects(code: CodeType) -> Iterator[CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _code_objects(const)


def _live_functions(module: ModuleType) -> Iterator[FunctionType]:
    """Every function object defined by the module: top level, in classes, behind decorators."""
    seen: set[int] = set()
    stack: list[object] = list(vars(module).values())
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, FunctionType):
            if obj.__module__ == module.__name__:
                yield obj
            if hasattr(obj, "__wrapped__"):
                stack.append(obj.__wrapped__)
        elif isinstance(obj, type) and obj.__module__ == module.__name__:
            stack.extend(vars(obj).values())
        elif isinstance(obj, (staticmethod, classmethod)):
            stack.append(obj.__func__)
        elif isinstance(obj, property):
            stack.extend(f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
        elif isinstance(obj, (functools.cached_property, functools.partial)):
            stack.append(obj.func)


def swap_in(module: ModuleType, code: CodeType) -> int:
    """Give the live functions whose code the mutation changed their mutated code; how many."""
    new = {c.co_qualname: c for c in _code_objects(code)}
    swapped = 0
    for function in _live_functions(module):
        replacement = new.get(function.__code__.co_qualname)
        if replacement is not None and replacement != function.__code__:
            function.__code__ = replacement
            swapped += 1
    return swapped


def _is_data(value: object, depth: int = 0) -> bool:
    """Plain data (numbers, text, containers of them, compiled patterns): safe to swap in."""
    if depth > 20:
        return False
    if value is None or type(value) in (int, float, complex, bool, str, bytes, re.Pattern):
        return True
    if type(value) in (tuple, list, set, frozenset):
        return all(_is_data(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    if type(value) is dict:
        return all(_is_data(k, depth + 1) and _is_data(v, depth + 1) for k, v in value.items())  # type: ignore[attr-defined]
    return False


def patch_tables(module: ModuleType, code: CodeType) -> int:
    """For a mutant in import-time code: run the mutated module into a scratch namespace and, for
    every module-level name whose value is plain data and now differs, put the new value in the
    live module and wherever another module imported it under the same name (`from m import X`).
    0 (use the slow path) when anything else changed (a class, a function's defaults ...)."""
    scratch: dict[str, object] = {
        "__name__": module.__name__,
        "__file__": module.__file__,
        "__builtins__": __builtins__,
    }
    try:
        exec(code, scratch)
    except Exception:
        return 0  # the mutated module does not even import: the slow path reports that
    live = vars(module)
    changed = {}
    for name, new in scratch.items():
        if name.startswith("__") or name not in live:
            continue
        old = live[name]
        if _is_data(old):
            try:
                same = bool(new == old) and type(new) is type(old)
            except Exception:
                same = False
            if not same:
                if not _is_data(new):
                    return 0
                changed[name] = (old, new)
        elif isinstance(old, (FunctionType, type)):
            old_code = getattr(old, "__code__", None)
            new_code = getattr(new, "__code__", None)
            if (
                old_code is not None
                and new_code is not None
                and (
                    old_code != new_code
                    or old.__defaults__ != new.__defaults__
                    or old.__kwdefaults__ != new.__kwdefaults__
                )
            ):
                return 0  # a default argument changed: only a fresh import shows it
            if isinstance(old, type) and _class_body_differs(old, new):
                return 0
        elif type(old) in (tuple, list, set, frozenset, dict) or is_dataclass(old):
            # Built from a table at import (a dict of frozen dataclasses): it changes with the table,
            # and only a fresh import rebuilds it. Its instances are of the scratch run's classes,
            # never == the live ones: their repr says whether the values differ.
            try:
                same = bool(new == old) or repr(new) == repr(old)
            except Exception:
                same = False
            if not same:
                return 0
    if not changed:
        return 0
    for name, (old, new) in changed.items():
        live[name] = new
        for other in list(sys.modules.values()):
            namespace = getattr(other, "__dict__", None)
            if namespace is not None and other is not module and namespace.get(name) is old:
                namespace[name] = new
    return len(changed)


def _class_body_differs(old: type, new: object) -> bool:
    """Did the mutation change a class attribute (a dataclass default, a class constant)?"""
    if not isinstance(new, type):
        return True
    for key, value in vars(old).items():
        if key.startswith("__") and key not in ("__dataclass_fields__",):
            continue
        other = vars(new).get(key)
        if key == "__dataclass_fields__":
            if {k: (f.default, f.default_factory) for k, f in value.items()} != {
                k: (f.default, f.default_factory) for k, f in other.items()
            }:
                return True
        elif isinstance(value, (FunctionType, classmethod, staticmethod)):
            if _data_defaults(value) != _data_defaults(other):
                return True  # a method's default argument (`limit: int = SOME_CONSTANT`) changed
        elif _is_data(value) and value != other:
            return True
    return False


def _data_defaults(function: object) -> list[object]:
    """The plain-data default arguments of a function or method, positional and keyword-only."""
    function = getattr(function, "__func__", function)
    positional = getattr(function, "__defaults__", None) or ()
    keyword = getattr(function, "__kwdefaults__", None) or {}
    return [value for value in (*positional, *keyword.values()) if _is_data(value)]


def clear_caches(module: ModuleType) -> int:
    """Empty the functools caches (lru_cache, cache) of the module's own functions, top level and
    in its classes; how many. A cached result hides the function's body from whoever calls next."""
    cleared = 0
    stack: list[object] = list(vars(module).values())
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", "") == module.__name__:
            value.cache_clear()  # type: ignore[attr-defined]
            cleared += 1
        elif isinstance(value, type) and value.__module__ == module.__name__:
            stack.extend(vars(value).values())
    return cleared


class Recorder:
    """pytest plugin: the first failing test, and (baseline) who executes which lines, how long.

    In the baseline (`module` given) the module's caches are emptied before every test: a cached
    function runs its body only for the first test that calls it, and the tests after it would
    not be known to reach its lines, so a mutant there would never meet them."""

    def __init__(self, filename: str | None = None, module: str | None = None) -> None:
        self.filename = filename
        self.module = module
        self.current = "<between>"
        self.first_failure = ""
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
        if self.module is not None and self.module in sys.modules:
            clear_caches(sys.modules[self.module])
        self.current = item.nodeid
        started = time.perf_counter()
        yield
        self.durations[item.nodeid] = time.perf_counter() - started
        self.current = "<between>"

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and not self.first_failure:
            self.first_failure = report.nodeid


IMPORT_RUN = "<import>"  # the baseline's name for lines run while the module is imported

EXAMPLE_CAP = 50  # --max-examples


def _cap_examples(item) -> None:
    """At most EXAMPLE_CAP hypothesis examples per property test, in the baseline and every mutant
    alike: a survivor then costs seconds, not minutes. It can only lower a score (fewer chances
    to kill), never raise it."""
    function = getattr(getattr(item, "obj", None), "__func__", getattr(item, "obj", None))
    current = getattr(function, "_hypothesis_internal_use_settings", None)
    if current is not None and current.max_examples > EXAMPLE_CAP:
        from hypothesis import settings

        function._hypothesis_internal_use_settings = settings(current, max_examples=EXAMPLE_CAP)


def run_items(session, recorder: Recorder, order: list[str]) -> None:
    """Run the chosen tests in this order, stopping at the first failure (like -x)."""
    by_id = {item.nodeid: item for item in session.items}
    items = [by_id[nodeid] for nodeid in order if nodeid in by_id]
    for item in items:
        _cap_examples(item)
    for i, item in enumerate(items):
        nextitem = items[i + 1] if i + 1 < len(items) else None
        item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if recorder.first_failure:
            break


def _pytest_args(test_files: list[str]) -> list[str]:
    return [
        *test_files,
        "-x",
        "-q",
        "--no-header",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        "-p",
        "no:randomly",
        "-o",
        "addopts=",
        "--timeout=0",
        "-W",
        "ignore",
    ]


def _die_with_parent() -> None:
    """A child (and its test's processes) must not outlive an interrupted run."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_setup() -> None:
    _die_with_parent()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.chdir(REPO)
    from hypothesis import HealthCheck, settings

    # Same examples every run, no database of earlier failures, nothing that depends on load.
    settings.register_profile(
        "mutation",
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    settings.load_profile("mutation")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(path)


@dataclass
class Job:
    mutant: Mutant
    order: list[str]
    budget_s: float


class Zygote:
    """pytest plugin run in the zygote: after collection, one forked child per job instead of the loop."""

    def __init__(
        self, module: str, path: Path, source: str, jobs: list[Job], workdir: Path, parallel: int, baseline_only: bool
    ) -> None:
        self.module, self.path, self.source = module, path, source
        self.jobs, self.workdir, self.parallel = jobs, workdir, parallel
        self.baseline_only = baseline_only
        self.import_recorder: Recorder | None = None

    def before_collection(self) -> None:
        """Baseline only, in the child before pytest starts: trace the module's import, so that a
        function the module calls while importing (a table built by `TABLE = _build()`) is known to
        run at import, where swapping its code in afterwards changes nothing."""
        if self.baseline_only:
            self.import_recorder = Recorder(str(self.path))
            self.import_recorder.current = IMPORT_RUN
            sys.settrace(self.import_recorder.trace)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session) -> bool:
        if self.baseline_only:
            self._baseline(session)
            return True
        running: dict[int, tuple[int, float]] = {}
        queue = list(enumerate(self.jobs))
        killers: collections.Counter[str] = collections.Counter()  # test -> mutants it killed so far
        while queue or running:
            while queue and len(running) < self.parallel:
                number, job = queue.pop(0)
                # a test that killed neighbours is likely to kill this one: it goes first (only
                # the order changes, never which tests run)
                job.order = sorted(
                    job.order, key=lambda t, rank={t: i for i, t in enumerate(job.order)}: (-killers[t], rank[t])
                )
                pid = os.fork()
                if pid == 0:
                    self._child(session, number, job)
                running[pid] = (number, time.monotonic() + job.budget_s)
            time.sleep(0.005)
            for pid, (number, deadline) in list(running.items()):
                done, _status = os.waitpid(pid, os.WNOHANG)
                if done:
                    running.pop(pid)
                    result = self.workdir / f"{number}.json"
                    if result.exists():
                        killers[json.loads(result.read_text()).get("by", "")] += 1
                elif time.monotonic() > deadline:
                    _kill_group(pid)
                    running.pop(pid)
                    _write(self.workdir / f"{number}.json", {"status": "killed", "by": "timeout"})
        return True

    def _baseline(self, session) -> None:
        sys.settrace(None)  # the import trace ends with collection
        import_lines = sorted(self.import_recorder.lines.get(IMPORT_RUN, ())) if self.import_recorder else []
        if session.testsfailed:
            _write(self.workdir / "baseline.json", {"first_failure": "collection error", "durations": {}, "lines": {}})
            return
        recorder = Recorder(str(self.path), module_name(self.module))
        session.config.pluginmanager.register(recorder)
        sys.settrace(recorder.trace)
        threading.settrace(recorder.trace)
        run_items(session, recorder, [item.nodeid for item in session.items])
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
        _write(
            self.workdir / "baseline.json",
            {
                "first_failure": recorder.first_failure,
                "durations": recorder.durations,
                "lines": {k: sorted(v) for k, v in recorder.lines.items()},
                "import_lines": import_lines,
            },
        )

    def _child(self, session, number: int, job: Job) -> None:
        code = 3
        try:
            _die_with_parent()
            result: dict[str, object]
            module = sys.modules.get(module_name(self.module))
            code = mutated_code(self.path, self.source, job.mutant)
            if module is None:
                swapped = 0
            elif job.mutant.at_import:
                swapped = patch_tables(module, code)
            else:
                swapped = swap_in(module, code)
            if module is not None:  # results the unmutated code cached in the zygote would hide the mutant
                clear_caches(module)
            if not swapped:
                result = {"status": "slow path"}
            else:
                recorder = Recorder()
                session.config.pluginmanager.register(recorder)
                run_items(session, recorder, job.order)
                result = {"status": "killed" if recorder.first_failure else "survived", "by": recorder.first_failure}
            _write(self.workdir / f"{number}.json", result)
            code = 0
        finally:
            os._exit(code)


def fork_pytest(test_files: list[str], plugin: object, *, finder: MutantFinder | None = None) -> int:
    """Fork a child that runs pytest with this plugin (and maybe the mutated module); its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        _child_setup()
        if finder is not None:
            sys.meta_path.insert(0, finder)
        if isinstance(plugin, Zygote):
            plugin.before_collection()
        code = int(pytest.main(_pytest_args(test_files), plugins=[plugin]))
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
    _kill_group(pid)
    return False


class SlowPathRun:
    """pytest plugin for a fresh child with the whole mutated module: run the chosen tests, note the verdict."""

    def __init__(self, order: list[str], result_path: Path) -> None:
        self.order, self.result_path = order, result_path

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session) -> bool:
        collected = {item.nodeid for item in session.items}
        if session.testsfailed or not set(self.order) <= collected:
            # the mutated module breaks the import of a test module: its tests cannot pass
            _write(self.result_path, {"status": "killed", "by": "collection error"})
            return True
        recorder = Recorder()
        session.config.pluginmanager.register(recorder)
        run_items(session, recorder, self.order)
        _write(
            self.result_path,
            {"status": "killed" if recorder.first_failure else "survived", "by": recorder.first_failure},
        )
        return True


# -- one module -----------------------------------------------------------------------------------


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def load_allow_list() -> dict[str, dict[str, str]]:
    if not ALLOW_LIST.exists():
        return {}
    return tomllib.loads(ALLOW_LIST.read_text())


ONLY: list[str] = []  # --only: run just the mutants whose id contains one of these


def run_module(module: str, allowed: dict[str, str], parallel: int, workdir: Path) -> ModuleReport:
    report = ModuleReport(module)
    path = REPO / module
    source = path.read_text()
    tests = [t for t in FOCUSED_TESTS[module] if t.startswith("--deselect=") or (REPO / t).exists()]
    if not tests:
        report.error = "no focused test file exists"
        return report
    mutants = generate_mutants(module, source)
    every_id = {m.mutant_id for m in mutants}
    if ONLY:  # a partial run while killing survivors: its score covers the chosen mutants only
        mutants = [m for m in mutants if any(part in m.mutant_id for part in ONLY)]
    if not mutants:
        return report  # nothing to mutate (declarations only): no need for a baseline
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pid = fork_pytest(tests, Zygote(module, path, source, [], workdir, 1, baseline_only=True))
    baseline_path = workdir / "baseline.json"
    if not wait_child(pid, 3600) or not baseline_path.exists():
        report.error = "the baseline run did not finish (collection error?)"
        return report
    baseline = json.loads(baseline_path.read_text())
    if baseline["first_failure"]:
        report.error = f"the focused tests fail without any mutation (first: {baseline['first_failure']})"
        return report
    lines = {k: set(v) for k, v in baseline["lines"].items()}
    # Function bodies the module runs while importing (DEFAULT_TABLE = _default_table()): their
    # mutants are import-time mutants too, run on a fresh import of the mutated module.
    import_lines = set(baseline.get("import_lines", ()))
    mutants = [
        replace(m, at_import=True) if not m.at_import and import_lines & set(range(m.span[0], m.span[1] + 1)) else m
        for m in mutants
    ]
    durations: dict[str, float] = baseline["durations"]
    collect_s = max(0.0, time.monotonic() - started - sum(durations.values()))
    by_speed = sorted(durations, key=durations.__getitem__)

    report.stale_equivalents = sorted(set(allowed) - every_id)
    fast: list[Job] = []
    slow: list[Job] = []
    for mutant in mutants:
        span = set(range(mutant.span[0], mutant.span[1] + 1))
        # import-time code (tables, class bodies, defaults): any test may depend on it
        order = by_speed if mutant.at_import else [t for t in by_speed if span & lines.get(t, set())]
        budget = 15.0 + 4 * sum(durations[t] for t in order)
        if not order:
            report.outcomes.append(Outcome(mutant, "not covered", argued=allowed.get(mutant.mutant_id, "")))
        else:  # import-time mutants try the fast path too (patch_tables), else fall back to slow
            fast.append(Job(mutant, order, budget))

    if fast:
        zygote_dir = workdir / "fast"
        zygote_dir.mkdir()
        pid = fork_pytest(tests, Zygote(module, path, source, fast, zygote_dir, parallel, False))
        wait_child(pid, 60 + sum(job.budget_s for job in fast))
        for number, job in enumerate(fast):
            result_path = zygote_dir / f"{number}.json"
            verdict = json.loads(result_path.read_text()) if result_path.exists() else {"status": "slow path"}
            if verdict["status"] == "slow path":
                slow.append(Job(job.mutant, job.order, job.budget_s + 3 * collect_s))
            else:
                _record(report, job.mutant, verdict, allowed)
    for number, job in enumerate(slow):
        result_path = workdir / f"slow-{number}.json"
        finder = MutantFinder(module_name(module), path, mutated_code(path, source, job.mutant))
        pid = fork_pytest(tests, SlowPathRun(job.order, result_path), finder=finder)
        if not wait_child(pid, job.budget_s):
            verdict = {"status": "killed", "by": "timeout"}
        elif result_path.exists():
            verdict = json.loads(result_path.read_text())
        else:
            verdict = {"status": "killed", "by": "the mutated module fails to import"}
        _record(report, job.mutant, verdict, allowed)
    report.outcomes.sort(key=lambda o: (o.mutant.lineno, o.mutant.index, o.mutant.mutant_id))
    return report


def _record(report: ModuleReport, mutant: Mutant, verdict: dict, allowed: dict[str, str]) -> None:
    argued = allowed.get(mutant.mutant_id, "")
    if verdict["status"] == "killed":
        report.outcomes.append(Outcome(mutant, "killed", verdict.get("by", ""), argued))
    else:
        report.outcomes.append(Outcome(mutant, "equivalent" if argued else "survived", argued=argued))


def print_report(report: ModuleReport, show_killed: bool) -> None:
    if report.error:
        print(f"{report.module}: ERROR {report.error}")
        return
    print(
        f"{report.module}: {report.score:5.1f} %  killed {report.count('killed')}  "
        f"survived {report.count('survived', 'not covered')} "
        f"(not covered {report.count('not covered')})  equivalent {report.count('equivalent')}"
    )
    for outcome in report.outcomes:
        if outcome.status in ("survived", "not covered"):
            note = "  [not covered]" if outcome.status == "not covered" else ""
            if outcome.argued:
                note += "  [allow-listed, but not covered: not counted as equivalent]"
            print(
                f"  survived {report.module}:{outcome.mutant.lineno}  {json.dumps(outcome.mutant.mutant_id, ensure_ascii=False)}{note}"
            )
        elif show_killed and outcome.status == "killed":
            print(f"  killed   {report.module}:{outcome.mutant.lineno}  {outcome.mutant.mutant_id}  by {outcome.by}")
    for stale in report.stale_equivalents:
        print(f"  stale allow-list entry (no such mutant): {json.dumps(stale, ensure_ascii=False)}")


def main(argv: list[str] | None = None) -> int:
    global EXAMPLE_CAP, ONLY
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--module",
        action="append",
        help="a module path such as devices/ecg/scaling.py (repeatable; default: every module)",
    )
    parser.add_argument("--json", action="store_true", help="last line: {module: score}")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1: shared cores)")
    parser.add_argument("--killed", action="store_true", help="also list killed mutants and their killer")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument(
        "--max-examples",
        type=int,
        default=EXAMPLE_CAP,
        help=f"cap on hypothesis examples per test (default {EXAMPLE_CAP}; lowers, never raises, a score)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the mutants whose id contains TEXT, e.g. a function's name (repeatable; partial score)",
    )
    args = parser.parse_args(argv)
    EXAMPLE_CAP = args.max_examples
    ONLY = args.only
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
    assert not any(
        m.split(".")[0] in {"devices", "uploader", "lastmile", "firmware_bridge", "tests"} for m in sys.modules
    ), "a warm import pulled in our own code: mutants would not load"
    allow_list = load_allow_list()
    scores: dict[str, float | None] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        for number, module in enumerate(modules):
            started = time.monotonic()
            report = run_module(module, allow_list.get(module, {}), args.jobs, Path(tmp) / str(number))
            print_report(report, args.killed)
            print(f"  ({len(report.outcomes)} mutants in {time.monotonic() - started:.0f} s)", flush=True)
            scores[module] = None if report.error else round(report.score, 1)
            failed |= bool(report.error)
    if args.json:
        print(json.dumps(scores))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
