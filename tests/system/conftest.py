"""The SD-card image for the image tests: LASTMILE_IMAGE, or one built once per session."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, missing, require_tool


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("LASTMILE_IMAGE")
    if given:
        path = Path(given)
        assert path.is_file(), f"LASTMILE_IMAGE={given} does not exist"
        return path
    if os.geteuid() != 0:
        missing("building the image needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "qemu-aarch64-static", "mkfs.vfat", "mcopy", "sfdisk"):
        require_tool(tool)
    out = tmp_path_factory.mktemp("image") / "lastmile.img"
    began = time.monotonic()
    subprocess.run([str(REPO / "image" / "build.sh"), str(out)], check=True, timeout=3600)
    print(f"\nimage built in {time.monotonic() - began:.0f} s")
    return out
