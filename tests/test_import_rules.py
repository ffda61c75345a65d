"""The architecture's import rules, enforced on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"devices", "firmware_bridge", "uploader", "lastmile"}
ALLOWED = {"devices": set(), "firmware_bridge": {"devices"}, "uploader": {"devices"}, "lastmile": OURS}
# devices/ is sans-I/O: no transports, storage, clocks or concurrency.
BANNED_IN_DEVICES = {
    "serial",
    "bleak",
    "bumble",
    "socket",
    "sqlite3",
    "sqlite_utils",
    "requests",
    "pynetdicom",
    "asyncio",
    "threading",
    "time",
    "subprocess",
    "multiprocessing",
    "selectors",
    "os",
    "pathlib",
    "shutil",
    "urllib",
    "http",
    "logging.handlers",
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_architecture_allows(package: str) -> None:
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        if "firmware" in path.relative_to(REPO).parts[1:2]:
            continue  # MicroPython firmware: runs on the bridge, not in the gateway
        for line, name in imports_of(path):
            top = name.split(".")[0]
            if top in OURS and top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
            if package == "devices" and (top in BANNED_IN_DEVICES or name in BANNED_IN_DEVICES):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name} (devices/ stays pure)")
    assert not bad, "\n".join(bad)


def test_rules_catch_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("import uploader.outbox\nfrom lastmile import cli\n")
    assert [n for _, n in imports_of(f)] == ["uploader.outbox", "lastmile"]


def test_commands_are_imported_only_by_the_cli_entry() -> None:
    """`lastmile/commands/` is the CLI's thin shell: parse, call, print. Nothing else may lean on it."""
    bad = []
    for path in sorted(REPO.glob("*/**/*.py")):
        rel = path.relative_to(REPO)
        if (
            rel.parts[0] in {".venv", "tests"}
            or rel.parts[:2] == ("lastmile", "commands")
            or rel == Path("lastmile/cli.py")
        ):
            continue
        bad += [
            f"{rel}:{line} imports {name}"
            for line, name in imports_of(path)
            if name == "lastmile.commands" or name.startswith("lastmile.commands.")
        ]
    assert not bad, "\n".join(bad)


PRODUCT = ("devices", "firmware_bridge", "uploader", "lastmile", "bench")


def private_names_defined(tree: ast.AST) -> set[str]:
    """Underscore names a module defines: functions, classes, methods, globals, self._attributes."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
    return {n for n in found if n.startswith("_") and not n.startswith("__")}


def private_uses_across_modules(files: list[Path]) -> list[str]:
    trees = {f: ast.parse(f.read_text(encoding="utf-8"), filename=str(f)) for f in files}
    defined = {f: private_names_defined(t) for f, t in trees.items()}
    ours_private = set().union(*defined.values()) if defined else set()
    bad = []
    for f, tree in trees.items():
        own = defined[f]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
                bad += [
                    f"{f}:{node.lineno} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in ours_private
                and node.attr not in own
                and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
            ):
                bad.append(f"{f}:{node.lineno} uses .{node.attr}, private to another module")
    return bad


def test_no_private_name_is_used_outside_its_module() -> None:
    files = [p for pkg in (*PRODUCT, "tests") for p in sorted((REPO / pkg).rglob("*.py"))]
    bad = private_uses_across_modules(files)
    assert not bad, "\n".join(str(b).replace(str(REPO) + "/", "") for b in bad)


def test_private_name_rule_catches_a_crossing(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("class Forwarder:\n    def _idle_delay(self):\n        return 1\n")
    b.write_text("def step(service):\n    return service.ecg._idle_delay()\n")
    assert private_uses_across_modules([a, b]) == [f"{b}:2 uses ._idle_delay, private to another module"]
    b.write_text("from uploader.dicom_net import _fast_send_available\n")
    assert private_uses_across_modules([a, b]) == [f"{b}:1 imports uploader.dicom_net._fast_send_available"]
