"""The architecture's import rules, enforced on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"devices", "firmware_bridge", "uploader", "lastmile"}
ALLOWED = {"devices": set(), "firmware_bridge": {"devices"}, "uploader": {"devices"},
           "lastmile": OURS}
# devices/ is sans-I/O: no transports, storage, clocks or concurrency.
BANNED_IN_DEVICES = {"serial", "bleak", "bumble", "socket", "sqlite3", "sqlite_utils", "requests",
                     "pynetdicom", "asyncio", "threading", "time", "subprocess", "multiprocessing",
                     "selectors", "os", "pathlib", "shutil", "urllib", "http", "logging.handlers"}


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
