"""dciodvfy (dicom3tools) as a test oracle for DICOM objects.

dciodvfy exits 0 even when it reports errors, and cannot read deflated files: validate
Explicit VR Little Endian bytes and read its output. Lines are reported either as
"Error - ..." / "Warning - ..." or prefixed with a tag, "(0x0009,0x0010) ... - Warning - ...".
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from tests.conftest import require_tool

DCIODVFY_TIMEOUT_S = 60


def _is_problem(line: str) -> bool:
    text = line.strip()
    return text.startswith(("Error", "Warning")) or " - Error - " in text or " - Warning - " in text


def dciodvfy_problems(data: bytes | Path) -> list[str]:
    """Every Error/Warning line dciodvfy prints for `data` (Part-10 bytes or a file)."""
    tool = require_tool("dciodvfy")
    if isinstance(data, Path):
        return _run(tool, data)
    with tempfile.TemporaryDirectory(prefix="dciodvfy-") as folder:
        path = Path(folder) / "object.dcm"
        path.write_bytes(data)
        return _run(tool, path)


def _run(tool: str, path: Path) -> list[str]:
    result = subprocess.run(
        [tool, str(path)], capture_output=True, text=True, errors="replace", timeout=DCIODVFY_TIMEOUT_S, check=False
    )
    return [line.strip() for line in (result.stdout + result.stderr).splitlines() if _is_problem(line)]
